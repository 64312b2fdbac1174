//! Notifications to init: init passes the write end of a pipe as the fd named by
//! `KEELSON_NOTIFY_FD`; sysd writes `READY=1\n` once, and `WATCHDOG=1\n` at a quarter of the
//! silence init allows (`KEELSON_WATCHDOG_USEC`) while init pets the hardware watchdog
//! (sd_notify's vocabulary, s6's transport).
//!
//! The heartbeat is a task on sysd's current-thread runtime, so it stops whenever that runtime
//! stops turning (a blocked task, a deadlock, SIGSTOP): exactly what should end in a reset. It
//! costs one 11-byte pipe write every few seconds, and init needs no client for sysd's API.

use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

/// Environment variable carrying the notify fd number.
pub const NOTIFY_FD_ENV: &str = "KEELSON_NOTIFY_FD";
/// Environment variable carrying how long sysd may be silent before init stops petting.
pub const WATCHDOG_ENV: &str = "KEELSON_WATCHDOG_USEC";

/// The notify pipe (absent for a sysd run by hand).
#[derive(Debug)]
pub struct Notifier {
    pipe: Option<std::fs::File>,
}

impl Notifier {
    /// Takes the pipe init gave (once: the variable is removed).
    pub fn from_env() -> Notifier {
        let fd = std::env::var(NOTIFY_FD_ENV)
            .ok()
            .and_then(|v| v.parse::<i32>().ok());
        std::env::remove_var(NOTIFY_FD_ENV);
        let pipe = fd.filter(|&fd| fd >= 3).map(|fd| {
            // SAFETY: init opened this fd for us and nothing else in sysd knows or closes it; we
            // take ownership once (the variable is removed above).
            let owned = unsafe { OwnedFd::from_raw_fd(fd) };
            // Never block the runtime on a full pipe (init reads it; a hung init is reset anyway).
            // SAFETY: fcntl on an fd we own; only its status flags change.
            unsafe {
                let flags = libc::fcntl(owned.as_raw_fd(), libc::F_GETFL);
                if flags >= 0 {
                    libc::fcntl(owned.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK);
                }
            }
            std::fs::File::from(owned)
        });
        Notifier { pipe }
    }

    /// Starts the `WATCHDOG=1` heartbeat when init asked for one (`KEELSON_WATCHDOG_USEC`).
    pub fn heartbeat(&self) -> Option<Duration> {
        let silence = std::env::var(WATCHDOG_ENV)
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .map(Duration::from_micros)
            .filter(|d| !d.is_zero())?;
        let mut pipe = self.pipe.as_ref()?.try_clone().ok()?;
        let every = silence / 4;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                if let Err(e) = pipe.write_all(b"WATCHDOG=1\n") {
                    if e.kind() != std::io::ErrorKind::WouldBlock {
                        tracing::warn!("watchdog: cannot reach init ({e}); heartbeat stopped");
                        return;
                    }
                }
            }
        });
        Some(every)
    }

    /// Sends `READY=1`.
    pub fn ready(&mut self) -> std::io::Result<()> {
        match self.pipe.as_mut() {
            Some(p) => p.write_all(b"READY=1\n"),
            None => Ok(()),
        }
    }
}
