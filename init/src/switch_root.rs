//! Leaving the initramfs: moving the API mounts into the new root, freeing the initramfs' RAM by
//! deleting its files (only those on its own device, like busybox `switch_root`), making /sysroot
//! the root, and exec'ing the real root's init.

use std::convert::Infallible;
use std::ffi::CString;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use nix::errno::Errno;
use nix::sys::statfs::{statfs, FsType, TMPFS_MAGIC};

use crate::mounts::move_mount;

/// Where stage 1 assembles the real root.
pub const NEW_ROOT: &str = "/sysroot";
/// The init of the real root.
pub const NEXT_INIT: &str = "/usr/sbin/init";
/// `RAMFS_MAGIC` from linux/magic.h (nix does not export it).
const RAMFS_MAGIC: FsType = FsType(0x8584_58f6);
const MOVED: [&str; 4] = ["/proc", "/sys", "/dev", "/run"];

/// What went wrong; each names the step.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot move {0} to {NEW_ROOT}{0}: {1}")]
    Move(&'static str, Errno),
    #[error("cannot make {NEW_ROOT} the root: {0} failed: {1}")]
    Pivot(&'static str, Errno),
    #[error("cannot exec {NEXT_INIT}: {0}")]
    Exec(Errno),
}

/// Moves the API mounts, empties the initramfs, switches root and execs [`NEXT_INIT`]; returns
/// only on failure.
pub fn switch_root() -> Result<Infallible, Error> {
    for m in MOVED {
        let to = format!("{NEW_ROOT}{m}");
        move_mount(Path::new(m), Path::new(&to)).map_err(|e| Error::Move(m, e))?;
    }
    free_initramfs();
    nix::unistd::chdir(NEW_ROOT).map_err(|e| Error::Pivot("chdir", e))?;
    move_mount(Path::new("."), Path::new("/")).map_err(|e| Error::Pivot("mount --move", e))?;
    nix::unistd::chroot(".").map_err(|e| Error::Pivot("chroot", e))?;
    nix::unistd::chdir("/").map_err(|e| Error::Pivot("chdir /", e))?;
    let path = CString::new(NEXT_INIT).map_err(|_| Error::Exec(Errno::EINVAL))?;
    match nix::unistd::execv(&path, &[&path]) {
        Ok(never) => match never {},
        Err(e) => Err(Error::Exec(e)),
    }
}

/// Deletes the initramfs' files, which otherwise pin their RAM for the whole uptime. Only done on
/// ramfs/tmpfs, and never crossing into another device (the new root mounted below it).
fn free_initramfs() {
    let is_ram = statfs("/").is_ok_and(|s| {
        let t = s.filesystem_type();
        t == RAMFS_MAGIC || t == TMPFS_MAGIC
    });
    if !is_ram {
        crate::say!("stage1: / is not an initramfs; not deleting its contents");
        return;
    }
    let Ok(root) = std::fs::symlink_metadata("/") else {
        return;
    };
    remove_children(Path::new("/"), root.dev());
}

fn remove_children(dir: &Path, dev: u64) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.filter_map(Result::ok) {
        let path = entry.path();
        if path == Path::new(NEW_ROOT) {
            continue;
        }
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        if meta.dev() != dev {
            continue;
        }
        // Best effort: whatever cannot be removed only costs a little RAM.
        if meta.is_dir() {
            remove_children(&path, dev);
            let _ = std::fs::remove_dir(&path);
        } else {
            let _ = std::fs::remove_file(&path);
        }
    }
}
