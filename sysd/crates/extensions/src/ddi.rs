//! Reading a system extension's Discoverable Disk Image (UAPI DDI): a GPT with a root
//! partition and its dm-verity hash partition. Only the table and the verity superblock are
//! read here; the file system itself is read only through dm-verity, which checks every block
//! against the root hash.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use keelson_common::gpt::{Gpt, Guid, Partition};
use keelson_common::partitions::{ROOT_X86_64_TYPE, ROOT_X86_64_VERITY_TYPE};
use keelson_common::verity::{self, Superblock};

use crate::Error;

/// Where the data and hash partitions are inside the image file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// Byte offset and length of the file system partition.
    pub data: (u64, u64),
    /// Byte offset and length of the hash partition.
    pub hash: (u64, u64),
    /// Its partition label (`<name>_<version>` for Keelson's builds).
    pub label: String,
    pub superblock: Superblock,
}

/// Reads the layout of `path` and checks it against the expected `roothash` (64 hex digits):
/// the UAPI convention names the data partition by the first 128 bits of the root hash and the
/// verity partition by the last 128, so an image for another root hash is refused before any
/// device is set up.
pub fn read(path: &Path, roothash: &str) -> Result<Layout, Error> {
    let bad = |why: String| Error::BadImage {
        path: path.to_owned(),
        why,
    };
    let hash = decode_roothash(roothash).map_err(|why| bad(why.into()))?;
    let mut f = File::open(path).map_err(|e| Error::io(path, e))?;
    let len = f.metadata().map_err(|e| Error::io(path, e))?.len();
    let gpt = Gpt::read(&mut f).map_err(|e| bad(format!("no valid GPT: {e}")))?;
    let data = one(&gpt, ROOT_X86_64_TYPE, "root (x86-64)").map_err(bad)?;
    let hash_part = one(&gpt, ROOT_X86_64_VERITY_TYPE, "root verity (x86-64)").map_err(bad)?;
    let mut first = [0u8; 16];
    first.copy_from_slice(&hash[..16]);
    let mut last = [0u8; 16];
    last.copy_from_slice(&hash[16..]);
    if data.unique_guid != Guid(first) || hash_part.unique_guid != Guid(last) {
        return Err(bad(format!(
            "its partition UUIDs ({}, {}) are not those of root hash {roothash}: a different image than the one listed",
            data.unique_guid, hash_part.unique_guid
        )));
    }
    let span = |p: &Partition| -> Result<(u64, u64), Error> {
        let off = p.first_lba * keelson_common::gpt::SECTOR;
        let size = p.size_bytes();
        if off.checked_add(size).is_none_or(|end| end > len) {
            return Err(bad(format!(
                "partition {:?} ends beyond the file ({len} bytes): truncated",
                p.name
            )));
        }
        Ok((off, size))
    };
    let data_span = span(data)?;
    let hash_span = span(hash_part)?;
    let mut sb = [0u8; 512];
    f.seek(SeekFrom::Start(hash_span.0))
        .and_then(|_| f.read_exact(&mut sb))
        .map_err(|e| Error::io(path, e))?;
    let superblock = Superblock::decode(&sb).map_err(|e| bad(format!("verity partition: {e}")))?;
    if superblock.data_blocks * verity::BLOCK > data_span.1 {
        return Err(bad(format!(
            "the verity superblock covers {} blocks, the data partition holds {} bytes",
            superblock.data_blocks, data_span.1
        )));
    }
    Ok(Layout {
        data: data_span,
        hash: hash_span,
        label: data.name.clone(),
        superblock,
    })
}

fn one<'a>(gpt: &'a Gpt, type_guid: Guid, what: &str) -> Result<&'a Partition, String> {
    let mut found = gpt.partitions().filter(|(_, p)| p.type_guid == type_guid);
    match (found.next(), found.next()) {
        (Some((_, p)), None) => Ok(p),
        (None, _) => Err(format!("no {what} partition")),
        (Some(_), Some(_)) => Err(format!("more than one {what} partition")),
    }
}

/// The 32 bytes of a hex root hash.
pub fn decode_roothash(roothash: &str) -> Result<[u8; 32], &'static str> {
    let mut out = [0u8; 32];
    if roothash.len() != 64 {
        return Err("root hash is not 64 hex digits");
    }
    hex::decode_to_slice(roothash, &mut out).map_err(|_| "root hash is not 64 hex digits")?;
    Ok(out)
}

/// Extension images for tests (of this crate, and of the crates that keep them: feature
/// `testing`).
#[cfg(any(test, feature = "testing"))]
pub mod testing {
    use super::*;
    use keelson_common::gpt::SECTOR;

    /// Writes a DDI like image-build's: `fs` (a multiple of 4096 bytes) and its verity tree.
    pub fn make_ddi(path: &Path, fs: &[u8], label: &str) -> String {
        use std::io::Write;
        let tree = verity::build(&mut &fs[..], fs.len() as u64, b"salt", [7; 16]).unwrap();
        let roothash = verity::to_hex(&tree.root_hash);
        let data_sectors = fs.len() as u64 / SECTOR;
        let hash_sectors = (tree.hash_device.len() as u64).div_ceil(4096) * 8;
        let first = 2048;
        let total = first + data_sectors + hash_sectors + 2048;
        let mut gpt = Gpt::new(Guid([1; 16]), total).unwrap();
        let mut a = [0u8; 16];
        a.copy_from_slice(&tree.root_hash[..16]);
        let mut b = [0u8; 16];
        b.copy_from_slice(&tree.root_hash[16..]);
        gpt.entries[0] = Some(Partition {
            type_guid: ROOT_X86_64_TYPE,
            unique_guid: Guid(a),
            first_lba: first,
            last_lba: first + data_sectors - 1,
            attributes: 1 << 60,
            name: label.into(),
        });
        gpt.entries[1] = Some(Partition {
            type_guid: ROOT_X86_64_VERITY_TYPE,
            unique_guid: Guid(b),
            first_lba: first + data_sectors,
            last_lba: first + data_sectors + hash_sectors - 1,
            attributes: 1 << 60,
            name: format!("{label}_verity"),
        });
        let mut f = File::create(path).unwrap();
        f.set_len(total * SECTOR).unwrap();
        gpt.write(&mut f).unwrap();
        f.seek(SeekFrom::Start(first * SECTOR)).unwrap();
        f.write_all(fs).unwrap();
        f.seek(SeekFrom::Start((first + data_sectors) * SECTOR))
            .unwrap();
        f.write_all(&tree.hash_device).unwrap();
        roothash
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::testing::make_ddi;
    use super::*;

    #[test]
    fn reads_what_the_pipeline_writes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.raw");
        let fs = vec![0x5a; 64 * 4096];
        let rh = make_ddi(&p, &fs, "etcd_1");
        let l = read(&p, &rh).unwrap();
        assert_eq!(l.data, (2048 * 512, 64 * 4096));
        assert_eq!(l.hash.0, 2048 * 512 + 64 * 4096);
        assert_eq!(l.label, "etcd_1");
        assert_eq!(l.superblock.data_blocks, 64);
    }

    #[test]
    fn refuses_another_root_hash_and_junk() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.raw");
        make_ddi(&p, &vec![1; 8 * 4096], "x_1");
        let other = "ab".repeat(32);
        let e = read(&p, &other).unwrap_err().to_string();
        assert!(e.contains("are not those of root hash"), "{e}");
        assert!(read(&p, "zz")
            .unwrap_err()
            .to_string()
            .contains("64 hex digits"));
        std::fs::write(&p, vec![0u8; 1 << 20]).unwrap();
        let e = read(&p, &other).unwrap_err().to_string();
        assert!(e.contains("no valid GPT"), "{e}");
    }

    #[test]
    fn refuses_a_truncated_image() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.raw");
        let rh = make_ddi(&p, &vec![1; 8 * 4096], "x_1");
        let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
        f.set_len(2048 * 512 + 4096).unwrap();
        let e = read(&p, &rh).unwrap_err().to_string();
        // The backup GPT is gone too; either refusal names the file.
        assert!(e.contains("x.raw"), "{e}");
    }
}
