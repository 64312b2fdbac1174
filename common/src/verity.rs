//! dm-verity hash devices in veritysetup's format: a 512-byte superblock in the first hash block,
//! then the hash tree, top level first (the layout the kernel's `dm-verity` target reads with
//! `hash_start = 1`).
//!
//! PID 1 reads only the superblock (salt, block count) and hands verification to the kernel; the
//! image pipeline builds the tree with [`build`] (feature `verity-build`). The root hash itself is
//! never read from disk: it comes from the kernel command line inside the signed-by-hash UKI.

/// Data and hash block size Keelson uses.
pub const BLOCK: u64 = 4096;
const SIGNATURE: &[u8; 8] = b"verity\0\0";

/// Errors decoding a superblock.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no verity superblock signature")]
    NoSignature,
    #[error("unsupported verity superblock: {0}")]
    Unsupported(&'static str),
    #[error("i/o building the hash tree")]
    Io(#[from] std::io::Error),
}

/// The fields of a veritysetup superblock that matter to Keelson.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Superblock {
    /// Number of data blocks covered.
    pub data_blocks: u64,
    /// The salt hashed in front of every block.
    pub salt: Vec<u8>,
    /// The UUID stored by veritysetup (informational).
    pub uuid: [u8; 16],
}

impl Superblock {
    /// Encodes the 512-byte superblock (version 1, hash type 1, sha256, 4 KiB blocks).
    pub fn encode(&self) -> [u8; 512] {
        let mut b = [0u8; 512];
        b[0..8].copy_from_slice(SIGNATURE);
        b[8..12].copy_from_slice(&1u32.to_le_bytes());
        b[12..16].copy_from_slice(&1u32.to_le_bytes());
        b[16..32].copy_from_slice(&self.uuid);
        b[32..38].copy_from_slice(b"sha256");
        b[64..68].copy_from_slice(&(BLOCK as u32).to_le_bytes());
        b[68..72].copy_from_slice(&(BLOCK as u32).to_le_bytes());
        b[72..80].copy_from_slice(&self.data_blocks.to_le_bytes());
        let salt_len = self.salt.len().min(256);
        b[80..82].copy_from_slice(&(salt_len as u16).to_le_bytes());
        b[88..88 + salt_len].copy_from_slice(&self.salt[..salt_len]);
        b
    }

    /// Decodes and checks a superblock; only the format Keelson writes is accepted.
    pub fn decode(b: &[u8]) -> Result<Superblock, Error> {
        if b.len() < 512 || &b[0..8] != SIGNATURE {
            return Err(Error::NoSignature);
        }
        let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        if u32_at(8) != 1 || u32_at(12) != 1 {
            return Err(Error::Unsupported("version or hash type other than 1"));
        }
        let alg_end = b[32..64].iter().position(|&c| c == 0).unwrap_or(32);
        if &b[32..32 + alg_end] != b"sha256" {
            return Err(Error::Unsupported("hash algorithm other than sha256"));
        }
        if u64::from(u32_at(64)) != BLOCK || u64::from(u32_at(68)) != BLOCK {
            return Err(Error::Unsupported("block size other than 4096"));
        }
        let mut blocks = [0u8; 8];
        blocks.copy_from_slice(&b[72..80]);
        let salt_len = usize::from(u16::from_le_bytes([b[80], b[81]]));
        if salt_len > 256 {
            return Err(Error::Unsupported("salt longer than 256 bytes"));
        }
        let mut uuid = [0u8; 16];
        uuid.copy_from_slice(&b[16..32]);
        Ok(Superblock {
            data_blocks: u64::from_le_bytes(blocks),
            salt: b[88..88 + salt_len].to_vec(),
            uuid,
        })
    }

    /// The kernel `verity` target line for this superblock, mapping `data_dev` with the tree on
    /// `hash_dev` (devices as `major:minor`), 512-byte sectors.
    pub fn dm_table(&self, data_dev: &str, hash_dev: &str, root_hash_hex: &str) -> (u64, String) {
        // `data_blocks` is read from the partition: a huge count must not wrap to a small size
        // that passes stage 1's check against the data partition (found by
        // `verity_superblock`); saturated, it is refused by that check.
        let sectors = self.data_blocks.saturating_mul(BLOCK / 512);
        let salt = if self.salt.is_empty() {
            "-".to_owned()
        } else {
            to_hex(&self.salt)
        };
        let params = format!(
            "1 {data_dev} {hash_dev} {BLOCK} {BLOCK} {} 1 sha256 {root_hash_hex} {salt}",
            self.data_blocks
        );
        (sectors, params)
    }
}

/// Lowercase hex of `bytes`.
pub fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A built hash device and the root hash that authenticates it.
#[cfg(feature = "verity-build")]
#[derive(Debug, Clone)]
pub struct Tree {
    /// The whole hash device: superblock block, then the levels, top first.
    pub hash_device: Vec<u8>,
    /// The root hash to put on the kernel command line.
    pub root_hash: [u8; 32],
}

/// Builds the hash tree of `data` (whose length must be a multiple of 4096) the way
/// `veritysetup format --salt=<salt> --uuid=<uuid>` does.
#[cfg(feature = "verity-build")]
pub fn build<R: std::io::Read>(
    data: &mut R,
    data_len: u64,
    salt: &[u8],
    uuid: [u8; 16],
) -> Result<Tree, Error> {
    use sha2::{Digest, Sha256};
    if data_len % BLOCK != 0 || data_len == 0 {
        return Err(Error::Unsupported(
            "data length not a positive multiple of 4096",
        ));
    }
    let hash_block = |block: &[u8]| -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(salt);
        h.update(block);
        h.finalize().into()
    };
    let per_block = (BLOCK / 32) as usize;
    let data_blocks = data_len / BLOCK;
    let mut buf = vec![0u8; BLOCK as usize];
    let mut hashes = Vec::with_capacity(data_blocks as usize);
    for _ in 0..data_blocks {
        data.read_exact(&mut buf)?;
        hashes.push(hash_block(&buf));
    }
    // Each level packs the hashes of the level below into 4 KiB blocks, zero padded.
    let mut levels: Vec<Vec<u8>> = Vec::new();
    loop {
        let mut level = Vec::with_capacity(hashes.len().div_ceil(per_block) * BLOCK as usize);
        for chunk in hashes.chunks(per_block) {
            let start = level.len();
            level.resize(start + BLOCK as usize, 0);
            for (i, h) in chunk.iter().enumerate() {
                level[start + 32 * i..start + 32 * (i + 1)].copy_from_slice(h);
            }
        }
        hashes = level.chunks(BLOCK as usize).map(hash_block).collect();
        levels.push(level);
        if hashes.len() == 1 {
            break;
        }
    }
    let sb = Superblock {
        data_blocks,
        salt: salt.to_vec(),
        uuid,
    };
    let mut hash_device = vec![0u8; BLOCK as usize];
    hash_device[..512].copy_from_slice(&sb.encode());
    for level in levels.iter().rev() {
        hash_device.extend_from_slice(level);
    }
    Ok(Tree {
        hash_device,
        root_hash: hashes[0],
    })
}

#[cfg(all(test, feature = "verity-build"))]
mod tests {
    use super::*;

    #[test]
    fn superblock_round_trips() {
        let sb = Superblock {
            data_blocks: 1234,
            salt: vec![1, 2, 3],
            uuid: [5; 16],
        };
        assert_eq!(Superblock::decode(&sb.encode()).unwrap(), sb);
    }

    /// Found by the `verity_superblock` fuzz target: a block count whose sector count does not
    /// fit in 64 bits wrapped to a small one, which would pass stage 1's size check.
    #[test]
    fn a_huge_block_count_is_not_a_small_table() {
        let mut raw = Superblock {
            data_blocks: 0,
            salt: vec![],
            uuid: [0; 16],
        }
        .encode();
        raw[72..80].copy_from_slice(&(u64::MAX / 4).to_le_bytes());
        let (sectors, table) = Superblock::decode(&raw)
            .unwrap()
            .dm_table("254:1", "254:2", "aa");
        assert_eq!(sectors, u64::MAX);
        assert!(
            table.contains(&format!(" {} 1 sha256 ", u64::MAX / 4)),
            "{table}"
        );
    }

    #[test]
    fn tree_has_one_level_per_128_fanout() {
        let data = vec![0xabu8; 4096 * 200];
        let t = build(&mut &data[..], data.len() as u64, &[0; 32], [0; 16]).unwrap();
        // 200 leaves -> 2 blocks at level 0 -> 1 block at level 1; plus the superblock block.
        assert_eq!(t.hash_device.len(), 4096 * 4);
        let (sectors, table) = Superblock::decode(&t.hash_device)
            .unwrap()
            .dm_table("254:1", "254:2", "aa");
        assert_eq!(sectors, 200 * 8);
        assert!(table.starts_with("1 254:1 254:2 4096 4096 200 1 sha256 aa "));
    }
}
