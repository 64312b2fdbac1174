//! Harness shared by sysd's host integration tests and its benchmarks (included with
//! `#[path]`; not part of the daemon): a busybox root file system to run containers from, and
//! cgroup v2 at /sys/fs/cgroup on hosts whose own layout is the v1/v2 hybrid.

use std::io;
use std::os::unix::fs::symlink;
use std::path::Path;
use std::process::Command;

/// Makes `rootfs` a busybox root file system: /bin/busybox (Debian's busybox-static) with every
/// applet linked, the usual empty top-level directories, and root/nobody in passwd and group.
pub fn busybox_rootfs(rootfs: &Path) -> io::Result<()> {
    for d in ["bin", "etc", "tmp", "proc", "sys", "dev", "srv"] {
        std::fs::create_dir_all(rootfs.join(d))?;
    }
    std::fs::copy("/bin/busybox", rootfs.join("bin/busybox")).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("/bin/busybox: {e} (apt-get install busybox-static)"),
        )
    })?;
    let list = Command::new("/bin/busybox").arg("--list").output()?;
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        if applet != "busybox" {
            symlink("busybox", rootfs.join("bin").join(applet))?;
        }
    }
    std::fs::write(
        rootfs.join("etc/passwd"),
        "root:x:0:0::/root:/bin/sh\nnobody:x:65534:65534::/:/bin/false\n",
    )?;
    std::fs::write(rootfs.join("etc/group"), "root:x:0:\nnogroup:x:65534:\n")
}

/// Moves the calling thread (and what it spawns) into a private mount namespace with cgroup2
/// mounted at /sys/fs/cgroup, unless /sys/fs/cgroup already is cgroup2.
pub fn private_cgroup2() -> io::Result<()> {
    let context = |what: &str| {
        let e = io::Error::last_os_error();
        io::Error::new(e.kind(), format!("{what}: {e}"))
    };
    // SAFETY: statfs into a zeroed struct with a valid C string.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::statfs(c"/sys/fs/cgroup".as_ptr(), &mut st) } == 0
        && st.f_type == libc::CGROUP2_SUPER_MAGIC
    {
        return Ok(());
    }
    // SAFETY: unshare/mount with valid C strings; they only change this thread's view.
    unsafe {
        if libc::unshare(libc::CLONE_NEWNS) != 0 {
            return Err(context("unshare(CLONE_NEWNS)"));
        }
        let private = libc::MS_REC | libc::MS_PRIVATE;
        let null = std::ptr::null();
        if libc::mount(null, c"/".as_ptr(), null, private, std::ptr::null()) != 0 {
            return Err(context("making / private"));
        }
        let (none, cgroup, fstype) = (c"none", c"/sys/fs/cgroup", c"cgroup2");
        if libc::mount(
            none.as_ptr(),
            cgroup.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        ) != 0
        {
            return Err(context("mounting cgroup2"));
        }
    }
    Ok(())
}
