//! cgroup v2 for host tests: a private cgroup2 mount on hosts whose own layout is the v1/v2
//! hybrid, and the removal of what a test's sysd left under its cgroup parent.

use std::io;
use std::path::Path;
use std::time::Duration;

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

/// Kills every process under `parent` (a cgroup path such as `/keelson-sv-1-x`, below the
/// host's cgroup2 hierarchy at /sys/fs/cgroup/unified) and removes its leaves and itself.
pub fn remove_tree(parent: &str) {
    let parent = Path::new("/sys/fs/cgroup/unified").join(parent.trim_start_matches('/'));
    if let Ok(entries) = std::fs::read_dir(&parent) {
        for e in entries.flatten() {
            let _ = std::fs::write(e.path().join("cgroup.kill"), "1");
            for _ in 0..50 {
                if std::fs::remove_dir(e.path()).is_ok() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
    let _ = std::fs::remove_dir(parent);
}

/// How many processes run in `service`'s cgroup under `parent` (as [`remove_tree`] names it).
pub fn procs(parent: &str, service: &str) -> usize {
    let procs = Path::new("/sys/fs/cgroup/unified")
        .join(parent.trim_start_matches('/'))
        .join(service)
        .join("cgroup.procs");
    std::fs::read_to_string(procs)
        .map(|t| t.lines().count())
        .unwrap_or(0)
}
