//! The console log: every line init prints, stamped with CLOCK_BOOTTIME in the kernel's dmesg
//! style (`[    1.234567] keelson-init: ...`) so init's lines interleave readably with the
//! kernel's and the boot-timeline benchmark can parse them.

use std::os::fd::{IntoRawFd, RawFd};
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::Duration;

use nix::time::{clock_gettime, ClockId};

/// The console fd once opened; until then (or if /dev/console cannot be opened) lines go to
/// stderr, which the kernel points at the console for PID 1 anyway.
static CONSOLE: AtomicI32 = AtomicI32::new(-1);

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
    fn boottime_moves_forward() {
        let a = boottime();
        let b = boottime();
        assert!(b >= a);
        assert!(a > Duration::ZERO);
    }
}
