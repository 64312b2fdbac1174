//! What the scenarios under `tests/` share beyond the guest harness: the test image and fresh
//! disks of it.

use std::path::{Path, PathBuf};

use crate::{create_overlay, image};

/// The test image (`out/test/`); panics naming the command that builds it.
pub fn test_image() -> PathBuf {
    image("test").expect("the test image (./dev image configs/test.toml)")
}

/// `dir/disk.qcow2`: a fresh 2 GiB overlay of the test image's disk (a first boot).
pub fn fresh_disk(dir: &Path) -> PathBuf {
    let disk = dir.join("disk.qcow2");
    create_overlay(&test_image().join("disk.raw"), &disk, Some(2 << 30)).unwrap();
    disk
}
