//! The hardware watchdog: init arms `/dev/watchdog` and pets it while init's loop turns and sysd
//! shows signs of life (`WATCHDOG=1` lines on its notify pipe, sd_notify's vocabulary), so a hung
//! sysd or a hung init ends in a reset within the configured time.
//!
//! `keelson.watchdog=<seconds>|off` on the command line (default [`DEFAULT_TIMEOUT`], used
//! whenever a watchdog device exists). The configured time T is split in two halves: sysd may be
//! silent for T/2 before init stops petting, and the device is set to reset T/2 after the last
//! pet, so a hang is followed by a reset within T.
//!
//! A reset is counted at the next boot: from the device's boot status (`WDIOF_CARDRESET`) and
//! from a marker init writes on /var when it stops petting (which also names the reason, and
//! covers drivers that cannot tell). Init writes what it found to [`STATUS`] for sysd to report.

use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::{Duration, Instant};

use keelson_common::cmdline::Cmdline;
use keelson_common::durable;

use crate::say;

/// The command line key.
pub const KEY: &str = "keelson.watchdog";
/// The configured time T when the command line says nothing.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);
/// The device.
pub const DEVICE: &str = "/dev/watchdog";
/// Written when init stops petting (the reason), removed when sysd recovers; read at boot.
pub const MARKER: &str = "/var/lib/keelson/watchdog-starved";
/// How many resets the watchdog caused, across boots.
pub const COUNT: &str = "/var/lib/keelson/watchdog-resets";
/// What init found at this boot, for sysd (`keelctl status`, the `watchdog` event).
pub const STATUS: &str = "/run/keelson/watchdog.json";
/// The environment variable telling sysd how often to say `WATCHDOG=1` (microseconds of
/// allowed silence; sysd writes four times as often).
pub const ENV: &str = "KEELSON_WATCHDOG_USEC";

const WDIOF_CARDRESET: libc::c_int = 0x0020;
const WDIOS_DISABLECARD: libc::c_int = 0x0001;

#[repr(C)]
#[derive(Debug, Default)]
pub struct WatchdogInfo {
    options: u32,
    firmware_version: u32,
    identity: [u8; 32],
}

nix::ioctl_read!(wdioc_getsupport, b'W', 0, WatchdogInfo);
nix::ioctl_read!(wdioc_getbootstatus, b'W', 2, libc::c_int);
nix::ioctl_read!(wdioc_setoptions, b'W', 4, libc::c_int);
nix::ioctl_read!(wdioc_keepalive, b'W', 5, libc::c_int);
nix::ioctl_readwrite!(wdioc_settimeout, b'W', 6, libc::c_int);

/// `keelson.watchdog=`: the configured time, `None` for off; a bad value is the default with a
/// warning.
pub fn configured(c: &Cmdline) -> (Option<Duration>, Option<String>) {
    match c.get(KEY) {
        None => (Some(DEFAULT_TIMEOUT), None),
        Some("off" | "0") => (None, None),
        Some(v) => match v.parse::<u64>() {
            Ok(s) if (4..=3600).contains(&s) => (Some(Duration::from_secs(s)), None),
            _ => (
                Some(DEFAULT_TIMEOUT),
                Some(format!(
                    "ignoring {KEY}={v:?} (expected seconds from 4 to 3600, or off); using {} s",
                    DEFAULT_TIMEOUT.as_secs()
                )),
            ),
        },
    }
}

/// When to pet, given the configured time T.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// The device's timeout: T/2.
    pub device_timeout: Duration,
    /// How long sysd may be silent before init stops petting: T/2.
    pub silence: Duration,
    /// How often init pets: a quarter of the device timeout.
    pub interval: Duration,
}

impl Policy {
    pub fn new(t: Duration) -> Policy {
        let half = t / 2;
        Policy {
            device_timeout: half,
            silence: half,
            interval: half / 4,
        }
    }

    /// Whether to pet now: sysd not running (init is restarting it: init's own loop is the sign
    /// of life) or its last sign of life is recent enough.
    pub fn healthy(&self, now: Instant, sysd_last_seen: Option<Instant>) -> bool {
        match sysd_last_seen {
            None => true,
            Some(t) => now.saturating_duration_since(t) <= self.silence,
        }
    }
}

/// An armed watchdog.
pub struct Watchdog {
    file: File,
    pub policy: Policy,
    next_pet: Instant,
    starving: bool,
}

/// What the previous boot's end and this boot's arming were, for the status file.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Found {
    pub identity: String,
    pub timeout_s: u64,
    /// The previous boot ended in a watchdog reset, and why if init knew.
    pub previous_reset: Option<String>,
    pub resets: u64,
}

impl Watchdog {
    /// Opens and arms the device; `None` (with the reason logged) when there is none or it is
    /// off.
    pub fn open(cmdline: &Cmdline) -> Option<Watchdog> {
        let (t, warning) = configured(cmdline);
        if let Some(w) = warning {
            say!("watchdog: {w}");
        }
        let Some(t) = t else {
            say!("watchdog: off ({KEY}=off)");
            disarm_leftover();
            return None;
        };
        if !Path::new(DEVICE).exists() {
            say!("watchdog: no {DEVICE} (no watchdog driver for this machine); not armed");
            return None;
        }
        let file = match std::fs::OpenOptions::new().write(true).open(DEVICE) {
            Ok(f) => f,
            Err(e) => {
                say!("watchdog: cannot open {DEVICE}: {e}; not armed");
                return None;
            }
        };
        let policy = Policy::new(t);
        let fd = file.as_raw_fd();
        let mut info = WatchdogInfo::default();
        // SAFETY: WDIOC_GETSUPPORT fills a watchdog_info we own, on an open watchdog fd.
        let identity = match unsafe { wdioc_getsupport(fd, &mut info) } {
            Ok(_) => {
                let end = info.identity.iter().position(|&b| b == 0).unwrap_or(32);
                String::from_utf8_lossy(info.identity.get(..end).unwrap_or(&[])).into_owned()
            }
            Err(_) => "unknown".into(),
        };
        let mut boot_status: libc::c_int = 0;
        // SAFETY: WDIOC_GETBOOTSTATUS writes one int we own.
        let card_reset = unsafe { wdioc_getbootstatus(fd, &mut boot_status) }.is_ok()
            && boot_status & WDIOF_CARDRESET != 0;
        let mut secs = libc::c_int::try_from(policy.device_timeout.as_secs()).unwrap_or(30);
        // SAFETY: WDIOC_SETTIMEOUT reads and writes back one int we own.
        let set = unsafe { wdioc_settimeout(fd, &mut secs) };
        let mut wd = Watchdog {
            file,
            policy,
            next_pet: Instant::now(),
            starving: false,
        };
        match set {
            Ok(_) => {
                let actual = Duration::from_secs(u64::try_from(secs).unwrap_or(0));
                if actual != policy.device_timeout {
                    say!(
                        "watchdog: {identity} took a timeout of {} s instead of {} s",
                        actual.as_secs(),
                        policy.device_timeout.as_secs()
                    );
                }
                if actual > Duration::ZERO && actual < wd.policy.device_timeout {
                    wd.policy.device_timeout = actual;
                    wd.policy.interval = actual / 4;
                }
            }
            Err(e) => {
                say!("watchdog: {identity} refused a timeout of {secs} s ({e}); keeping its own")
            }
        }
        wd.pet(Instant::now());
        let found = account_previous_boot(card_reset, &identity, &wd.policy);
        say!(
            "watchdog: {identity} armed ({} s; sysd may be silent {} s; pets every {} ms)",
            wd.policy.device_timeout.as_secs(),
            wd.policy.silence.as_secs(),
            wd.policy.interval.as_millis()
        );
        write_status(&found);
        std::env::set_var(ENV, wd.policy.silence.as_micros().to_string());
        Some(wd)
    }

    /// How long until the next pet is due.
    pub fn timeout(&self, now: Instant) -> Duration {
        self.next_pet.saturating_duration_since(now)
    }

    /// Pets the device if due and sysd is healthy; stops (once, with the reason on the console
    /// and on /var) when it is not, and resumes if sysd speaks again before the reset.
    pub fn tick(&mut self, now: Instant, sysd_last_seen: Option<Instant>) {
        if now < self.next_pet {
            return;
        }
        if self.policy.healthy(now, sysd_last_seen) {
            if self.starving {
                self.starving = false;
                say!("watchdog: sysd is answering again; petting resumed");
                let _ = std::fs::remove_file(MARKER);
            }
            self.pet(now);
            return;
        }
        self.next_pet = now + self.policy.interval;
        if !self.starving {
            self.starving = true;
            let silent = sysd_last_seen
                .map(|t| now.saturating_duration_since(t).as_secs())
                .unwrap_or(0);
            let reason = format!("sysd silent for {silent} s");
            say!(
                "watchdog: {reason}; no longer petting, the watchdog resets the node within {} s",
                self.policy.device_timeout.as_secs()
            );
            if let Err(e) = durable::replace(Path::new(MARKER), format!("{reason}\n").as_bytes()) {
                say!("watchdog: cannot record why on /var: {e}");
            }
        }
    }

    /// Pets now, whatever sysd's state (shutdown steps).
    pub fn pet(&mut self, now: Instant) {
        let mut dummy: libc::c_int = 0;
        // SAFETY: WDIOC_KEEPALIVE on an open watchdog fd; its argument is ignored.
        if unsafe { wdioc_keepalive(self.file.as_raw_fd(), &mut dummy) }.is_err() {
            // Writing any byte is the classic keep-alive.
            let _ = self.file.write_all(b"\0");
        }
        self.next_pet = now + self.policy.interval;
    }

    /// Disarms the device for a halt or power-off (a reboot keeps it armed: a hung reboot is
    /// reset too).
    pub fn disarm(mut self) {
        let mut opt = WDIOS_DISABLECARD;
        // SAFETY: WDIOC_SETOPTIONS reads one int we own.
        let _ = unsafe { wdioc_setoptions(self.file.as_raw_fd(), &mut opt) };
        // The magic close, for drivers without WDIOS_DISABLECARD.
        let _ = self.file.write_all(b"V");
    }
}

/// With the watchdog off, a device the firmware or a previous boot armed is stopped.
fn disarm_leftover() {
    if let Ok(mut f) = std::fs::OpenOptions::new().write(true).open(DEVICE) {
        let mut opt = WDIOS_DISABLECARD;
        // SAFETY: WDIOC_SETOPTIONS reads one int we own.
        let _ = unsafe { wdioc_setoptions(f.as_raw_fd(), &mut opt) };
        let _ = f.write_all(b"V");
    }
}

/// Counts a reset of the previous boot (device boot status or init's marker) and clears the
/// marker.
fn account_previous_boot(card_reset: bool, identity: &str, policy: &Policy) -> Found {
    let marker = std::fs::read_to_string(MARKER).ok();
    let previous: u64 = std::fs::read_to_string(COUNT)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0);
    let previous_reset = previous_reset(card_reset, marker.as_deref());
    let mut resets = previous;
    if let Some(why) = &previous_reset {
        resets += 1;
        say!("watchdog: the previous boot was reset by the watchdog ({why}); {resets} so far");
        if let Err(e) = durable::replace(Path::new(COUNT), format!("{resets}\n").as_bytes()) {
            say!("watchdog: cannot count the reset on /var: {e}");
        }
    }
    if marker.is_some() {
        let _ = std::fs::remove_file(MARKER);
    }
    Found {
        identity: identity.to_owned(),
        timeout_s: (policy.device_timeout + policy.silence).as_secs(),
        previous_reset,
        resets,
    }
}

/// Why the previous boot ended in a watchdog reset, if it did.
pub fn previous_reset(card_reset: bool, marker: Option<&str>) -> Option<String> {
    match (card_reset, marker.map(str::trim)) {
        (_, Some(why)) if !why.is_empty() => Some(why.to_owned()),
        (_, Some(_)) => Some("init stopped petting".into()),
        (true, None) => Some("reported by the device; init or the kernel hung".into()),
        (false, None) => None,
    }
}

/// The status file sysd reads (JSON, written by hand: init has no serde).
pub fn render_status(f: &Found) -> String {
    let esc = |s: &str| s.replace('\\', "\\\\").replace('"', "\\\"");
    let previous = match &f.previous_reset {
        Some(why) => format!("\"{}\"", esc(why)),
        None => "null".into(),
    };
    format!(
        "{{\"device\":\"{}\",\"timeout_s\":{},\"resets\":{},\"previous_boot_reset\":{previous}}}\n",
        esc(&f.identity),
        f.timeout_s,
        f.resets
    )
}

fn write_status(f: &Found) {
    if let Err(e) = durable::replace(Path::new(STATUS), render_status(f).as_bytes()) {
        say!("watchdog: cannot write {STATUS}: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_line() {
        let c = |s: &str| Cmdline::parse(s);
        assert_eq!(configured(&c("quiet")), (Some(DEFAULT_TIMEOUT), None));
        assert_eq!(configured(&c("keelson.watchdog=off")), (None, None));
        assert_eq!(
            configured(&c("keelson.watchdog=20")),
            (Some(Duration::from_secs(20)), None)
        );
        let (t, w) = configured(&c("keelson.watchdog=2"));
        assert_eq!(t, Some(DEFAULT_TIMEOUT));
        assert!(w.unwrap().contains("keelson.watchdog=\"2\""));
        assert!(configured(&c("keelson.watchdog=soon")).1.is_some());
    }

    #[test]
    fn policy_splits_the_time_and_stops_on_silence() {
        let p = Policy::new(Duration::from_secs(20));
        assert_eq!(p.device_timeout, Duration::from_secs(10));
        assert_eq!(p.silence, Duration::from_secs(10));
        assert_eq!(p.interval, Duration::from_millis(2500));
        let now = Instant::now() + Duration::from_secs(100);
        assert!(p.healthy(now, None), "sysd being restarted by init");
        assert!(p.healthy(now, Some(now - Duration::from_secs(10))));
        assert!(!p.healthy(now, Some(now - Duration::from_secs(11))));
    }

    #[test]
    fn previous_boot_and_status() {
        assert_eq!(previous_reset(false, None), None);
        assert_eq!(
            previous_reset(true, Some("sysd silent for 11 s\n")).as_deref(),
            Some("sysd silent for 11 s")
        );
        assert!(previous_reset(true, None).unwrap().contains("device"));
        assert!(previous_reset(false, Some("")).is_some());
        let s = render_status(&Found {
            identity: "i6300ESB \"timer\"".into(),
            timeout_s: 20,
            previous_reset: Some("sysd silent for 11 s".into()),
            resets: 2,
        });
        assert_eq!(
            s,
            "{\"device\":\"i6300ESB \\\"timer\\\"\",\"timeout_s\":20,\"resets\":2,\"previous_boot_reset\":\"sysd silent for 11 s\"}\n"
        );
    }
}
