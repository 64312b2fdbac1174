//! The console log: every line init prints, stamped with CLOCK_BOOTTIME in the kernel's dmesg
//! style (`[    1.234567] keelson-init: ...`) so init's lines interleave readably with the
//! kernel's and the boot-timeline benchmark can parse them. Each line also goes to the boot
//! record (`/run/keelson/init.log`, [`open_record`]), which sysd serves as `GET /v1/boot`.

use std::os::fd::{IntoRawFd, RawFd};
use std::sync::atomic::{AtomicI32, AtomicUsize, Ordering};
use std::time::Duration;

use nix::time::{clock_gettime, ClockId};

/// The console fd once opened; until then (or if /dev/console cannot be opened) lines go to
/// stderr, which the kernel points at the console for PID 1 anyway.
static CONSOLE: AtomicI32 = AtomicI32::new(-1);

/// The boot record's fd once opened (-1: none), and how much has been written to it.
static RECORD: AtomicI32 = AtomicI32::new(-1);
static RECORDED: AtomicUsize = AtomicUsize::new(0);

/// Where init records its lines for `keelctl analyze` (keelson_common's `api::boot::INIT_LOG`).
pub const RECORD_PATH: &str = "/run/keelson/init.log";

/// The record stops growing here (about 2000 lines): a boot needs a few dozen, and a node that
/// logs on for months (sysd restarts) must not fill /run.
pub const RECORD_MAX: usize = 256 * 1024;

/// Opens the boot record for appending: stage 1 once /run is mounted, stage 2 again after the
/// switch (its /run is stage 1's, moved, so the file holds both stages' lines). O_CLOEXEC: the
/// exec into stage 2 and sysd do not inherit it. Without /run the lines only reach the console.
pub fn open_record(path: &str) {
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(dir) = std::path::Path::new(path).parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    let opened = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o644)
        .custom_flags(libc::O_CLOEXEC | libc::O_NOCTTY)
        .open(path);
    if let Ok(file) = opened {
        let len = file.metadata().map(|m| m.len()).unwrap_or(0);
        RECORDED.store(
            usize::try_from(len).unwrap_or(usize::MAX),
            Ordering::Relaxed,
        );
        let old = RECORD.swap(file.into_raw_fd(), Ordering::Relaxed);
        if old >= 0 {
            // SAFETY: `old` was ours (from an earlier open_record) and nothing else holds it.
            unsafe { libc::close(old) };
        }
    }
}

/// Opens /dev/console for logging. Safe to call again (for instance after /dev changed); the old
/// fd is kept open, as a log line racing with the swap must never hit a closed fd.
pub fn open_console() {
    use std::os::unix::fs::OpenOptionsExt;
    // O_NOCTTY: PID 1 must not acquire the console as its controlling tty, or a hangup or ^C on
    // it would be delivered to init.
    let opened = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NOCTTY)
        .open("/dev/console");
    if let Ok(file) = opened {
        CONSOLE.store(file.into_raw_fd(), Ordering::Relaxed);
    }
}

/// Points any of fds 0-2 that the kernel left closed (no /dev/console in the initramfs when it
/// started us) at the console, so children and stray writes have somewhere to go.
pub fn ensure_stdio() {
    for fd in 0..3 {
        // SAFETY: F_GETFD only queries the fd table.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } >= 0 {
            continue;
        }
        // SAFETY: the path is a NUL-terminated literal; the returned fd is checked.
        let console =
            unsafe { libc::open(c"/dev/console".as_ptr(), libc::O_RDWR | libc::O_NOCTTY) };
        if console < 0 {
            return;
        }
        if console != fd {
            // SAFETY: both fds are valid; dup2 onto a closed fd has no side effect on others.
            unsafe {
                libc::dup2(console, fd);
                libc::close(console);
            }
        }
    }
}

/// Time since the kernel started, suspend included.
pub fn boottime() -> Duration {
    match clock_gettime(ClockId::CLOCK_BOOTTIME) {
        Ok(ts) => Duration::new(
            u64::try_from(ts.tv_sec()).unwrap_or(0),
            u32::try_from(ts.tv_nsec()).unwrap_or(0),
        ),
        Err(_) => Duration::ZERO,
    }
}

/// Sends later lines to stderr: for a forked child whose fds were rearranged (the console's fd
/// number may now hold something else, such as sysd's notify pipe on fd 3).
pub fn use_stderr() {
    CONSOLE.store(-1, Ordering::Relaxed);
}

/// One log line, newline included.
pub fn format_line(at: Duration, msg: &str) -> String {
    format!(
        "[{:>5}.{:06}] keelson-init: {}\n",
        at.as_secs(),
        at.subsec_micros(),
        msg
    )
}

/// Writes one line to the console with a single write(2) per chunk, so lines of concurrent
/// writers (the kernel, sysd) do not interleave mid-line.
pub fn line(msg: &str) {
    let text = format_line(boottime(), msg);
    let fd = match CONSOLE.load(Ordering::Relaxed) {
        -1 => libc::STDERR_FILENO,
        fd => fd,
    };
    write_all(fd, text.as_bytes());
    record(text.as_bytes());
}

/// Appends one line to the boot record, whole (O_APPEND: one write per line, so the
/// background module loader's lines never land inside init's), until [`RECORD_MAX`].
fn record(line: &[u8]) {
    let fd = RECORD.load(Ordering::Relaxed);
    if fd < 0 {
        return;
    }
    let before = RECORDED.fetch_add(line.len(), Ordering::Relaxed);
    if before.saturating_add(line.len()) <= RECORD_MAX {
        write_all(fd, line);
    }
}

fn write_all(fd: RawFd, mut buf: &[u8]) {
    while !buf.is_empty() {
        // SAFETY: buf is a valid readable slice for its length; fd is an fd we own or stderr,
        // and a bad fd only makes write fail with EBADF.
        let n = unsafe { libc::write(fd, buf.as_ptr().cast(), buf.len()) };
        if n < 0 {
            if nix::errno::Errno::last() == nix::errno::Errno::EINTR {
                continue;
            }
            return;
        }
        let Ok(n) = usize::try_from(n) else { return };
        if n == 0 {
            return;
        }
        buf = buf.get(n..).unwrap_or(&[]);
    }
}

/// Logs a formatted line: `say!("boot #{n}")`.
#[macro_export]
macro_rules! say {
    ($($arg:tt)*) => {
        $crate::log::line(&format!($($arg)*))
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_dmesg_layout() {
        assert_eq!(
            format_line(Duration::new(1, 234_567_890), "stage1: start"),
            "[    1.234567] keelson-init: stage1: start\n"
        );
        assert_eq!(
            format_line(Duration::new(123_456, 7_000), "x"),
            "[123456.000007] keelson-init: x\n"
        );
        assert_eq!(
            format_line(Duration::ZERO, ""),
            "[    0.000000] keelson-init: \n"
        );
    }

    #[test]
    fn record_gets_every_line_appended_until_full() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keelson/init.log");
        let path = path.to_str().unwrap();
        std::fs::create_dir_all(dir.path().join("keelson")).unwrap();
        std::fs::write(path, "[    1.000000] keelson-init: stage1: start\n").unwrap();
        // Stage 2 reopens what stage 1 wrote and appends.
        open_record(path);
        line("stage2: start");
        let text = std::fs::read_to_string(path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        // (Other tests' lines may land here too while the record is open.)
        assert_eq!(lines[0], "[    1.000000] keelson-init: stage1: start");
        assert!(
            lines
                .iter()
                .any(|l| l.ends_with("] keelson-init: stage2: start")),
            "{text}"
        );
        // Full: further lines reach the console only.
        RECORDED.store(RECORD_MAX, Ordering::Relaxed);
        line("after the cap");
        assert!(!std::fs::read_to_string(path)
            .unwrap()
            .contains("after the cap"));
        let fd = RECORD.swap(-1, Ordering::Relaxed);
        // SAFETY: the fd open_record opened; no other test uses the record.
        unsafe { libc::close(fd) };
    }

    #[test]
    fn boottime_moves_forward() {
        let a = boottime();
        let b = boottime();
        assert!(b >= a);
        assert!(a > Duration::ZERO);
    }
}
