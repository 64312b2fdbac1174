//! Mount tables of both stages (the API file systems, /etc, /tmp, cgroup2) and the mount(2)
//! seam they go through, so the order can be checked without a kernel.

use std::path::Path;

use nix::errno::Errno;
use nix::mount::MsFlags;

/// One mount.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mount {
    pub source: &'static str,
    pub target: &'static str,
    pub fstype: &'static str,
    pub flags: MsFlags,
    pub data: Option<&'static str>,
}

const NOSUID_NODEV_NOEXEC: MsFlags = MsFlags::MS_NOSUID
    .union(MsFlags::MS_NODEV)
    .union(MsFlags::MS_NOEXEC);

/// Stage 1's API file systems, in order. devtmpfs before /run only because the console and
/// block device nodes are needed soonest.
pub const STAGE1: [Mount; 4] = [
    Mount {
        source: "proc",
        target: "/proc",
        fstype: "proc",
        flags: NOSUID_NODEV_NOEXEC,
        data: None,
    },
    Mount {
        source: "sysfs",
        target: "/sys",
        fstype: "sysfs",
        flags: NOSUID_NODEV_NOEXEC,
        data: None,
    },
    Mount {
        source: "devtmpfs",
        target: "/dev",
        fstype: "devtmpfs",
        flags: MsFlags::MS_NOSUID,
        data: Some("mode=0755"),
    },
    Mount {
        source: "tmpfs",
        target: "/run",
        fstype: "tmpfs",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
        data: Some("mode=0755"),
    },
];

/// Stage 2's tmpfs mounts over the read-only root.
pub const STAGE2_TMPFS: [Mount; 2] = [
    Mount {
        source: "tmpfs",
        target: "/etc",
        fstype: "tmpfs",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
        data: Some("mode=0755"),
    },
    Mount {
        source: "tmpfs",
        target: "/tmp",
        fstype: "tmpfs",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
        data: Some("mode=1777"),
    },
];

/// The unified cgroup hierarchy; `nsdelegate` is tried first and dropped if the kernel refuses it.
pub const CGROUP2: Mount = Mount {
    source: "cgroup2",
    target: "/sys/fs/cgroup",
    fstype: "cgroup2",
    flags: NOSUID_NODEV_NOEXEC,
    data: Some("nsdelegate"),
};

/// The system calls the mount tables need.
pub trait Sys {
    fn mount(&mut self, m: &Mount) -> Result<(), Errno>;
    fn mkdir_p(&mut self, path: &str);
}

/// The real kernel.
#[derive(Debug, Default)]
pub struct Kernel;

impl Sys for Kernel {
    fn mount(&mut self, m: &Mount) -> Result<(), Errno> {
        nix::mount::mount(Some(m.source), m.target, Some(m.fstype), m.flags, m.data)
    }

    fn mkdir_p(&mut self, path: &str) {
        // Failure shows up as the mount's ENOENT, which names the target.
        let _ = std::fs::create_dir_all(path);
    }
}

/// A failed mount.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("cannot mount {fstype} on {target}: {errno}")]
pub struct Error {
    pub fstype: &'static str,
    pub target: &'static str,
    pub errno: Errno,
}

/// Mounts each in order, creating mount points. EBUSY counts as done: the kernel may already have
/// mounted devtmpfs (CONFIG_DEVTMPFS_MOUNT) and a re-run must not fail on it.
pub fn mount_all(sys: &mut impl Sys, mounts: &[Mount]) -> Result<(), Error> {
    for m in mounts {
        sys.mkdir_p(m.target);
        match sys.mount(m) {
            Ok(()) | Err(Errno::EBUSY) => {}
            Err(errno) => {
                return Err(Error {
                    fstype: m.fstype,
                    target: m.target,
                    errno,
                })
            }
        }
    }
    Ok(())
}

/// Mounts cgroup2, without `nsdelegate` if the kernel rejects that option.
pub fn mount_cgroup2(sys: &mut impl Sys) -> Result<(), Error> {
    match mount_all(sys, &[CGROUP2]) {
        Err(Error {
            errno: Errno::EINVAL,
            ..
        }) => mount_all(
            sys,
            &[Mount {
                data: None,
                ..CGROUP2
            }],
        ),
        other => other,
    }
}

/// Moves mount `from` to `to` (`mount --move`).
pub fn move_mount(from: &Path, to: &Path) -> Result<(), Errno> {
    nix::mount::mount(Some(from), to, None::<&str>, MsFlags::MS_MOVE, None::<&str>)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder {
        log: Vec<String>,
        fail: Vec<(&'static str, Errno)>,
    }

    impl Sys for Recorder {
        fn mount(&mut self, m: &Mount) -> Result<(), Errno> {
            self.log.push(format!(
                "mount {} {} {}",
                m.fstype,
                m.target,
                m.data.unwrap_or("-")
            ));
            match self.fail.iter().position(|(t, _)| *t == m.target) {
                Some(i) => Err(self.fail.remove(i).1),
                None => Ok(()),
            }
        }

        fn mkdir_p(&mut self, path: &str) {
            self.log.push(format!("mkdir {path}"));
        }
    }

    #[test]
    fn stage1_order_and_busy_devtmpfs() {
        let mut r = Recorder {
            fail: vec![("/dev", Errno::EBUSY)],
            ..Default::default()
        };
        mount_all(&mut r, &STAGE1).unwrap();
        assert_eq!(
            r.log,
            [
                "mkdir /proc",
                "mount proc /proc -",
                "mkdir /sys",
                "mount sysfs /sys -",
                "mkdir /dev",
                "mount devtmpfs /dev mode=0755",
                "mkdir /run",
                "mount tmpfs /run mode=0755",
            ]
        );
    }

    #[test]
    fn failure_names_the_target_and_stops() {
        let mut r = Recorder {
            fail: vec![("/sys", Errno::ENODEV)],
            ..Default::default()
        };
        let e = mount_all(&mut r, &STAGE1).unwrap_err();
        assert_eq!(
            e.to_string(),
            "cannot mount sysfs on /sys: ENODEV: No such device"
        );
        assert_eq!(r.log.len(), 4);
    }

    #[test]
    fn cgroup2_falls_back_without_nsdelegate() {
        let mut r = Recorder {
            fail: vec![("/sys/fs/cgroup", Errno::EINVAL)],
            ..Default::default()
        };
        mount_cgroup2(&mut r).unwrap();
        assert_eq!(
            r.log,
            [
                "mkdir /sys/fs/cgroup",
                "mount cgroup2 /sys/fs/cgroup nsdelegate",
                "mkdir /sys/fs/cgroup",
                "mount cgroup2 /sys/fs/cgroup -",
            ]
        );
    }

    #[test]
    fn stage2_tmpfs_modes() {
        assert_eq!(STAGE2_TMPFS[0].data, Some("mode=0755"));
        assert_eq!(STAGE2_TMPFS[1].target, "/tmp");
        assert_eq!(STAGE2_TMPFS[1].data, Some("mode=1777"));
    }
}
