//! Read-only loop devices over a byte range of a file (`LOOP_CTL_GET_FREE` + `LOOP_CONFIGURE`,
//! Linux 5.8+), with autoclear so the device goes away when its last user (the dm-verity
//! mapping) closes it.
//!
//! Written here rather than taken from a crate: `loopdev-3` generates its bindings with bindgen
//! at build time (libclang on every build machine) for two ioctls and one struct.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

const LOOP_CTL_GET_FREE: libc::c_ulong = 0x4C82;
const LOOP_CONFIGURE: libc::c_ulong = 0x4C0A;
const LO_FLAGS_READ_ONLY: u32 = 1;
const LO_FLAGS_AUTOCLEAR: u32 = 4;

/// `struct loop_info64` (linux/loop.h).
#[repr(C)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; 64],
    lo_crypt_name: [u8; 64],
    lo_encrypt_key: [u8; 32],
    lo_init: [u64; 2],
}

/// `struct loop_config` (linux/loop.h).
#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

/// An attached loop device. It stays open (and so attached) while this value lives; with
/// autoclear the kernel detaches it once this and every other opener have closed it.
#[derive(Debug)]
pub struct Loop {
    pub path: PathBuf,
    pub major: u32,
    pub minor: u32,
    _dev: File,
}

/// Attaches `file[offset .. offset + size]` read-only.
pub fn attach(file: &Path, offset: u64, size: u64) -> std::io::Result<Loop> {
    let backing = File::open(file)?;
    let control = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/loop-control")?;
    // A free device can be taken by someone else between GET_FREE and CONFIGURE (EBUSY): retry.
    for _ in 0..16 {
        // SAFETY: LOOP_CTL_GET_FREE takes no argument and returns a device number or -1.
        let n = unsafe { libc::ioctl(control.as_raw_fd(), LOOP_CTL_GET_FREE) };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let path = PathBuf::from(format!("/dev/loop{n}"));
        let dev = OpenOptions::new().read(true).open(&path)?;
        let mut info = LoopInfo64 {
            lo_device: 0,
            lo_inode: 0,
            lo_rdevice: 0,
            lo_offset: offset,
            lo_sizelimit: size,
            lo_number: 0,
            lo_encrypt_type: 0,
            lo_encrypt_key_size: 0,
            lo_flags: LO_FLAGS_READ_ONLY | LO_FLAGS_AUTOCLEAR,
            lo_file_name: [0; 64],
            lo_crypt_name: [0; 64],
            lo_encrypt_key: [0; 32],
            lo_init: [0; 2],
        };
        let name = file.as_os_str().as_encoded_bytes();
        let take = name.len().min(63);
        info.lo_file_name[..take].copy_from_slice(&name[..take]);
        let config = LoopConfig {
            fd: u32::try_from(backing.as_raw_fd()).unwrap_or(u32::MAX),
            block_size: 0,
            info,
            reserved: [0; 8],
        };
        // SAFETY: `config` is a properly laid out `struct loop_config` that outlives the call;
        // the kernel only reads it.
        let rc = unsafe { libc::ioctl(dev.as_raw_fd(), LOOP_CONFIGURE, &config) };
        if rc < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EBUSY) {
                continue;
            }
            return Err(e);
        }
        let rdev = dev.metadata()?.rdev();
        return Ok(Loop {
            path,
            major: libc::major(rdev),
            minor: libc::minor(rdev),
            _dev: dev,
        });
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::ResourceBusy,
        "no free loop device after 16 tries",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn struct_sizes_match_the_kernel_header() {
        assert_eq!(std::mem::size_of::<LoopInfo64>(), 232);
        assert_eq!(std::mem::size_of::<LoopConfig>(), 304);
    }

    #[test]
    fn attaches_a_read_only_window_of_a_file() {
        use std::io::Read;
        if !nix::unistd::Uid::effective().is_root() || !Path::new("/dev/loop-control").exists() {
            eprintln!("skipped: needs root and /dev/loop-control");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("img");
        let mut bytes = vec![0u8; 3 * 4096];
        bytes[4096..8192].fill(0xab);
        std::fs::write(&file, &bytes).unwrap();
        let lo = attach(&file, 4096, 4096).unwrap();
        let mut seen = Vec::new();
        File::open(&lo.path)
            .unwrap()
            .read_to_end(&mut seen)
            .unwrap();
        assert_eq!(seen, vec![0xab; 4096]);
        let written = OpenOptions::new()
            .write(true)
            .open(&lo.path)
            .and_then(|mut f| {
                std::io::Write::write_all(&mut f, &[0; 512]).and_then(|()| f.sync_all())
            });
        assert!(written.is_err(), "must be read-only");
        let name = lo.path.file_name().unwrap().to_string_lossy().into_owned();
        drop(lo);
        // Autoclear: closed by its last user, the device lets go of the file.
        let backing = PathBuf::from(format!("/sys/block/{name}/loop/backing_file"));
        for _ in 0..50 {
            if !backing.exists() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        panic!("{name} still attached after its last close");
    }
}
