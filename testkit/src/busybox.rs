//! A busybox root file system to run containers from (Debian's busybox-static).

use std::io;
use std::os::unix::fs::symlink;
use std::path::Path;
use std::process::Command;

/// Makes `rootfs` a busybox root file system: /bin/busybox (Debian's busybox-static) with every
/// applet linked, the usual empty top-level directories, and root/nobody in passwd and group.
pub fn rootfs(rootfs: &Path) -> io::Result<()> {
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
