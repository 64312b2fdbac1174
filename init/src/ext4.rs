//! The ext4 file system on the data partition: the few superblock fields init reads before
//! mounting (is it ext4, was it shut down cleanly, how big is it) and online growth with
//! `EXT4_IOC_RESIZE_FS` after the partition grew on first boot.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::path::Path;

use nix::errno::Errno;

/// Where the primary superblock starts.
pub const SUPERBLOCK_OFFSET: u64 = 1024;
/// Bytes of the superblock init reads.
pub const SUPERBLOCK_LEN: usize = 1024;
const MAGIC: u16 = 0xEF53;
const INCOMPAT_RECOVER: u32 = 0x4;
const INCOMPAT_64BIT: u32 = 0x80;
/// `_IOW('f', 16, __u64)`.
pub const EXT4_IOC_RESIZE_FS: u64 = (1 << 30) | (8 << 16) | ((b'f' as u64) << 8) | 16;

/// Superblock fields init cares about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Superblock {
    /// `s_state` (bit 0: cleanly unmounted, bit 1: errors detected).
    pub state: u16,
    pub feature_incompat: u32,
    /// Block size in bytes.
    pub block_size: u64,
    pub blocks: u64,
}

/// Errors reading or resizing.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read the superblock: {0}")]
    Io(#[from] std::io::Error),
    #[error("no ext4 file system (found {0})")]
    NotExt4(String),
    #[error("implausible block size exponent {0}")]
    BadBlockSize(u32),
    #[error("EXT4_IOC_RESIZE_FS: {0}")]
    Resize(Errno),
}

fn le16(b: &[u8], at: usize) -> u16 {
    match b.get(at..at + 2) {
        Some(s) => u16::from_le_bytes([s[0], s[1]]),
        None => 0,
    }
}

fn le32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    if let Some(s) = b.get(at..at + 4) {
        a.copy_from_slice(s);
    }
    u32::from_le_bytes(a)
}

/// Describes bytes that are not a superblock, for the FATAL message.
pub fn describe_non_ext4(b: &[u8]) -> String {
    if b.iter().all(|&c| c == 0) {
        return "only zeros".to_owned();
    }
    let head: String = b
        .iter()
        .take(16)
        .map(|c| format!("{c:02x}"))
        .collect::<Vec<_>>()
        .join(" ");
    format!("magic {:#06x}, first bytes {head}", le16(b, 0x38))
}

impl Superblock {
    /// Parses the 1024 bytes at offset 1024 of the device.
    pub fn parse(b: &[u8]) -> Result<Superblock, Error> {
        if b.len() < SUPERBLOCK_LEN || le16(b, 0x38) != MAGIC {
            return Err(Error::NotExt4(describe_non_ext4(b)));
        }
        let log = le32(b, 0x18);
        // ext4 allows 1 KiB..64 KiB blocks.
        if log > 6 {
            return Err(Error::BadBlockSize(log));
        }
        let feature_incompat = le32(b, 0x60);
        let hi = if feature_incompat & INCOMPAT_64BIT != 0 {
            u64::from(le32(b, 0x150))
        } else {
            0
        };
        Ok(Superblock {
            state: le16(b, 0x3A),
            feature_incompat,
            block_size: 1024 << log,
            blocks: (hi << 32) | u64::from(le32(b, 0x04)),
        })
    }

    /// Reads the superblock of a block device or image.
    pub fn read(device: &Path) -> Result<Superblock, Error> {
        let mut f = File::open(device)?;
        f.seek(SeekFrom::Start(SUPERBLOCK_OFFSET))?;
        let mut b = vec![0u8; SUPERBLOCK_LEN];
        // A device shorter than 2 KiB is not ext4 either; show what there was.
        let mut got = 0;
        while got < b.len() {
            match f.read(b.get_mut(got..).unwrap_or(&mut [])) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        if got < SUPERBLOCK_LEN {
            return Err(Error::NotExt4(format!(
                "nothing: device ends after {} bytes",
                SUPERBLOCK_OFFSET + got as u64
            )));
        }
        Superblock::parse(&b)
    }

    /// Whether the journal has to be replayed (the last mount did not end in a clean unmount).
    pub fn needs_recovery(&self) -> bool {
        self.feature_incompat & INCOMPAT_RECOVER != 0
    }

    /// Size in bytes.
    pub fn size_bytes(&self) -> u64 {
        self.blocks.saturating_mul(self.block_size)
    }
}

/// Grows the ext4 file system mounted at `mountpoint` to `new_blocks` blocks while mounted.
pub fn resize_online(mountpoint: &Path, new_blocks: u64) -> Result<(), Error> {
    let dir = File::open(mountpoint)?;
    let count: u64 = new_blocks;
    // SAFETY: the ioctl reads one u64 through the pointer, which is valid for the call; the fd
    // is open for the call.
    let rc = unsafe {
        libc::ioctl(
            dir.as_raw_fd(),
            EXT4_IOC_RESIZE_FS as libc::c_ulong,
            &count as *const u64,
        )
    };
    if rc < 0 {
        return Err(Error::Resize(Errno::last()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(incompat: u32) -> Vec<u8> {
        let mut b = vec![0u8; 1024];
        b[0x04..0x08].copy_from_slice(&262_144u32.to_le_bytes());
        b[0x18..0x1c].copy_from_slice(&2u32.to_le_bytes());
        b[0x38..0x3a].copy_from_slice(&0xEF53u16.to_le_bytes());
        b[0x3a..0x3c].copy_from_slice(&1u16.to_le_bytes());
        b[0x60..0x64].copy_from_slice(&incompat.to_le_bytes());
        b[0x150..0x154].copy_from_slice(&1u32.to_le_bytes());
        b
    }

    #[test]
    fn clean_32bit_fs() {
        let sb = Superblock::parse(&sample(0x2 | 0x40)).unwrap();
        assert_eq!(sb.block_size, 4096);
        assert_eq!(sb.blocks, 262_144);
        assert_eq!(sb.size_bytes(), 1 << 30);
        assert_eq!(sb.state, 1);
        assert!(!sb.needs_recovery());
    }

    #[test]
    fn dirty_64bit_fs() {
        let sb = Superblock::parse(&sample(0x2 | 0x4 | 0x80)).unwrap();
        assert!(sb.needs_recovery());
        assert_eq!(sb.blocks, (1 << 32) + 262_144);
    }

    #[test]
    fn not_ext4() {
        match Superblock::parse(&[0u8; 1024]) {
            Err(Error::NotExt4(s)) => assert_eq!(s, "only zeros"),
            other => panic!("{other:?}"),
        }
        let mut b = vec![0xffu8; 1024];
        b[0] = 0x12;
        match Superblock::parse(&b) {
            Err(Error::NotExt4(s)) => assert!(s.starts_with("magic 0xffff, first bytes 12 ff")),
            other => panic!("{other:?}"),
        }
        assert!(Superblock::parse(&[0u8; 10]).is_err());
    }

    #[test]
    fn resize_ioctl_number() {
        assert_eq!(EXT4_IOC_RESIZE_FS, 0x4008_6610);
    }
}
