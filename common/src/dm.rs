//! Device-mapper through `/dev/mapper/control`: the `struct dm_ioctl` / `struct dm_target_spec`
//! encoding of `linux/dm-ioctl.h` (interface version 4): the three ioctls that turn a table
//! line into a read-only mapped device (create, load table, resume), and removal.
//!
//! PID 1 maps the verified root with it; sysd maps engine extensions. Hand-written rather than
//! through a crate: the two device-mapper crates on crates.io wrap the whole interface (and
//! `devicemapper` pulls in a large dependency tree) for the four calls Keelson makes.

use std::fs::File;
use std::os::fd::AsRawFd;

/// `sizeof(struct dm_ioctl)`.
pub const DM_IOCTL_SIZE: usize = 312;
/// `sizeof(struct dm_target_spec)`.
pub const TARGET_SPEC_SIZE: usize = 40;
const DM_NAME_LEN: usize = 128;
const NAME_OFFSET: usize = 48;
const DM_IOCTL_TYPE: u64 = 0xfd;

/// The table is read-only.
pub const DM_READONLY_FLAG: u32 = 1 << 0;

/// The ioctl commands Keelson uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    DevCreate = 3,
    DevRemove = 4,
    DevSuspend = 6,
    TableLoad = 9,
}

impl Command {
    /// `_IOWR(DM_IOCTL, cmd, struct dm_ioctl)`.
    pub const fn request(self) -> u64 {
        const IOC_READ_WRITE: u64 = 3;
        (IOC_READ_WRITE << 30) | ((DM_IOCTL_SIZE as u64) << 16) | (DM_IOCTL_TYPE << 8) | self as u64
    }

    fn name(self) -> &'static str {
        match self {
            Self::DevCreate => "DM_DEV_CREATE",
            Self::DevRemove => "DM_DEV_REMOVE",
            Self::DevSuspend => "DM_DEV_SUSPEND",
            Self::TableLoad => "DM_TABLE_LOAD",
        }
    }
}

/// One table line: `length` sectors from sector 0 handled by `target_type` with `params`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub sectors: u64,
    pub target_type: String,
    pub params: String,
}

/// Errors talking to device-mapper.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot open /dev/mapper/control: {0}")]
    Control(std::io::Error),
    #[error("{0} failed: {1}")]
    Ioctl(&'static str, std::io::Error),
    #[error("device name {0:?} is empty, too long or contains NUL")]
    BadName(String),
    #[error("target type {0:?} is empty, too long or contains NUL")]
    BadTargetType(String),
    #[error("table parameters contain NUL")]
    BadParams,
}

fn put_u32(buf: &mut [u8], at: usize, v: u32) {
    if let Some(dst) = buf.get_mut(at..at + 4) {
        dst.copy_from_slice(&v.to_ne_bytes());
    }
}

fn put_u64(buf: &mut [u8], at: usize, v: u64) {
    if let Some(dst) = buf.get_mut(at..at + 8) {
        dst.copy_from_slice(&v.to_ne_bytes());
    }
}

#[cfg(test)]
fn get_u32(buf: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    if let Some(src) = buf.get(at..at + 4) {
        a.copy_from_slice(src);
    }
    u32::from_ne_bytes(a)
}

fn get_u64(buf: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    if let Some(src) = buf.get(at..at + 8) {
        a.copy_from_slice(src);
    }
    u64::from_ne_bytes(a)
}

/// Encodes a `struct dm_ioctl` header for device `name` followed by `targets`, as one buffer
/// whose `data_size` is its own length.
pub fn encode(name: &str, flags: u32, targets: &[Target]) -> Result<Vec<u8>, Error> {
    if name.is_empty() || name.len() >= DM_NAME_LEN || name.contains('\0') {
        return Err(Error::BadName(name.to_owned()));
    }
    let mut buf = vec![0u8; DM_IOCTL_SIZE];
    // version {4, 0, 0}: any 4.x kernel accepts it and reports its own version back.
    put_u32(&mut buf, 0, 4);
    put_u32(&mut buf, 16, DM_IOCTL_SIZE as u32);
    put_u32(
        &mut buf,
        20,
        u32::try_from(targets.len()).unwrap_or(u32::MAX),
    );
    put_u32(&mut buf, 28, flags);
    if let Some(dst) = buf.get_mut(NAME_OFFSET..NAME_OFFSET + name.len()) {
        dst.copy_from_slice(name.as_bytes());
    }
    for t in targets {
        if t.target_type.is_empty() || t.target_type.len() >= 16 || t.target_type.contains('\0') {
            return Err(Error::BadTargetType(t.target_type.clone()));
        }
        if t.params.contains('\0') {
            return Err(Error::BadParams);
        }
        // The params string is NUL-terminated and the next spec must start 8-byte aligned.
        let params_len = (t.params.len() + 1).next_multiple_of(8);
        let start = buf.len();
        buf.resize(start + TARGET_SPEC_SIZE + params_len, 0);
        put_u64(&mut buf, start, 0);
        put_u64(&mut buf, start + 8, t.sectors);
        put_u32(
            &mut buf,
            start + 20,
            u32::try_from(TARGET_SPEC_SIZE + params_len).unwrap_or(u32::MAX),
        );
        if let Some(dst) = buf.get_mut(start + 24..start + 24 + t.target_type.len()) {
            dst.copy_from_slice(t.target_type.as_bytes());
        }
        let p = start + TARGET_SPEC_SIZE;
        if let Some(dst) = buf.get_mut(p..p + t.params.len()) {
            dst.copy_from_slice(t.params.as_bytes());
        }
    }
    let size = u32::try_from(buf.len()).unwrap_or(u32::MAX);
    put_u32(&mut buf, 12, size);
    Ok(buf)
}

/// Splits a kernel `dev_t` as device-mapper reports it (`huge_encode_dev`) into major and minor.
pub fn decode_dev(dev: u64) -> (u32, u32) {
    let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff);
    let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
    (
        u32::try_from(major).unwrap_or(u32::MAX),
        u32::try_from(minor & 0xffff_ffff).unwrap_or(u32::MAX),
    )
}

/// The `dev` field of an answer.
pub fn answer_dev(buf: &[u8]) -> u64 {
    get_u64(buf, 40)
}

fn ioctl(control: &File, cmd: Command, buf: &mut [u8]) -> Result<(), Error> {
    // SAFETY: buf holds a dm_ioctl whose data_size is buf's length (see `encode`), so the kernel
    // reads and writes only within it; the fd stays open for the call.
    let rc = unsafe {
        libc::ioctl(
            control.as_raw_fd(),
            cmd.request() as libc::c_ulong,
            buf.as_mut_ptr(),
        )
    };
    if rc < 0 {
        return Err(Error::Ioctl(cmd.name(), std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Creates device `name` with the single read-only `target` and activates it. Returns its
/// (major, minor).
pub fn create_readonly(name: &str, target: Target) -> Result<(u32, u32), Error> {
    let control = control()?;
    let mut create = encode(name, 0, &[])?;
    ioctl(&control, Command::DevCreate, &mut create)?;
    let mut load = encode(name, DM_READONLY_FLAG, &[target])?;
    if let Err(e) = ioctl(&control, Command::TableLoad, &mut load) {
        // Leave no half-made device behind (a rejected table, e.g. a wrong root hash format).
        let _ = ioctl(&control, Command::DevRemove, &mut encode(name, 0, &[])?);
        return Err(e);
    }
    // DM_DEV_SUSPEND without DM_SUSPEND_FLAG is "resume": it swaps the loaded table in.
    let mut resume = encode(name, 0, &[])?;
    ioctl(&control, Command::DevSuspend, &mut resume)?;
    Ok(decode_dev(answer_dev(&resume)))
}

/// Removes device `name` (it must not be open or mounted).
pub fn remove(name: &str) -> Result<(), Error> {
    let control = control()?;
    let mut buf = encode(name, 0, &[])?;
    ioctl(&control, Command::DevRemove, &mut buf)
}

fn control() -> Result<File, Error> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/mapper/control")
        .map_err(Error::Control)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_the_kernel_header() {
        assert_eq!(Command::DevCreate.request(), 0xc138_fd03);
        assert_eq!(Command::DevRemove.request(), 0xc138_fd04);
        assert_eq!(Command::DevSuspend.request(), 0xc138_fd06);
        assert_eq!(Command::TableLoad.request(), 0xc138_fd09);
    }

    #[test]
    fn header_only() {
        let b = encode("root", 0, &[]).unwrap();
        assert_eq!(b.len(), 312);
        assert_eq!(get_u32(&b, 0), 4);
        assert_eq!(get_u32(&b, 4), 0);
        assert_eq!(get_u32(&b, 8), 0);
        assert_eq!(get_u32(&b, 12), 312);
        assert_eq!(get_u32(&b, 16), 312);
        assert_eq!(get_u32(&b, 20), 0);
        assert_eq!(&b[48..53], b"root\0");
        assert!(b[53..].iter().all(|&c| c == 0));
    }

    #[test]
    fn table_load_with_one_target() {
        let params = "1 254:1 254:2 4096 4096 10 1 sha256 ab -";
        assert_eq!(params.len(), 40);
        let b = encode(
            "root",
            DM_READONLY_FLAG,
            &[Target {
                sectors: 80,
                target_type: "verity".into(),
                params: params.into(),
            }],
        )
        .unwrap();
        // 40 bytes of params + NUL round up to 48.
        assert_eq!(b.len(), 312 + 40 + 48);
        assert_eq!(get_u32(&b, 12), 400);
        assert_eq!(get_u32(&b, 16), 312);
        assert_eq!(get_u32(&b, 20), 1);
        assert_eq!(get_u32(&b, 28), 1);
        assert_eq!(get_u64(&b, 312), 0);
        assert_eq!(get_u64(&b, 320), 80);
        assert_eq!(get_u32(&b, 328), 0);
        assert_eq!(get_u32(&b, 332), 88);
        assert_eq!(&b[336..343], b"verity\0");
        assert_eq!(&b[352..392], params.as_bytes());
        assert!(b[392..].iter().all(|&c| c == 0));
    }

    #[test]
    fn rejects_bad_names() {
        assert!(encode("", 0, &[]).is_err());
        assert!(encode(&"x".repeat(128), 0, &[]).is_err());
        assert!(encode(&"x".repeat(127), 0, &[]).is_ok());
        let t = Target {
            sectors: 1,
            target_type: "a-very-long-target".into(),
            params: String::new(),
        };
        assert!(encode("root", 0, &[t]).is_err());
    }

    #[test]
    fn dev_numbers_decode() {
        // new_encode_dev(MKDEV(253, 0)) and MKDEV(253, 300).
        assert_eq!(decode_dev(253 << 8), (253, 0));
        assert_eq!(
            decode_dev((253 << 8) | (300 & 0xff) | ((300 & !0xff) << 12)),
            (253, 300)
        );
    }
}
