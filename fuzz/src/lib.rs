//! What the fuzz targets share: a scratch directory on tmpfs for the parsers that read or
//! write files (config layers, first boot's writes, unpacked layers).

use std::path::{Path, PathBuf};

/// A directory of this process under /dev/shm (or the temporary directory), emptied on every
/// call: each input starts from nothing, and nothing an input wrote outlives the next one.
pub fn scratch(target: &str) -> PathBuf {
    let base = if Path::new("/dev/shm").is_dir() {
        PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    let dir = base.join(format!("keelson-fuzz-{target}-{}", std::process::id()));
    if dir.exists() {
        std::fs::remove_dir_all(&dir).expect("emptying the scratch directory");
    }
    std::fs::create_dir_all(&dir).expect("creating the scratch directory");
    dir
}

/// Splits `data` into a first part of the length its first two bytes give (little endian,
/// clamped) and the rest: how targets that take two documents get both from one input.
pub fn two_parts(data: &[u8]) -> (&[u8], &[u8]) {
    if data.len() < 2 {
        return (data, &[]);
    }
    let n = usize::from(u16::from_le_bytes([data[0], data[1]])).min(data.len() - 2);
    data[2..].split_at(n)
}
