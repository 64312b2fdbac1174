//! Readiness notification to init: init passes the write end of a pipe as the fd named by
//! `KEELSON_NOTIFY_FD`; sysd writes `READY=1\n` once (sd_notify's vocabulary, s6's transport).

use std::io::Write;
use std::os::fd::{FromRawFd, OwnedFd};

/// Environment variable carrying the notify fd number.
pub const NOTIFY_FD_ENV: &str = "KEELSON_NOTIFY_FD";

/// Sends `READY=1` if init gave us a notify fd; a sysd run by hand has none and that is fine.
pub fn ready() -> std::io::Result<()> {
    let Some(fd) = std::env::var(NOTIFY_FD_ENV)
        .ok()
        .and_then(|v| v.parse::<i32>().ok())
    else {
        return Ok(());
    };
    std::env::remove_var(NOTIFY_FD_ENV);
    if fd < 3 {
        return Ok(());
    }
    // SAFETY: init opened this fd for us and nothing else in sysd knows or closes it; we take
    // ownership once (the variable is removed above) and close it after writing.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut pipe = std::fs::File::from(owned);
    pipe.write_all(b"READY=1\n")
}
