//! The kernel command line as init uses it: the boot slot, the root hash, the reaction to fatal
//! errors and the boot-disk wait (keys from `keelson_common::cmdline`).

use std::time::Duration;

use keelson_common::cmdline::{self, Cmdline};
use keelson_common::partitions::Slot;

use crate::fatal::PowerAction;

/// Default wait for the boot disk.
pub const DEFAULT_DISK_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the command line cannot be booted.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error("kernel command line has no {key}= (expected a or b)", key = cmdline::SLOT)]
    NoSlot,
    #[error("kernel command line has {key}={0:?} (expected a or b)", key = cmdline::SLOT)]
    BadSlot(String),
    #[error("kernel command line has no {key}=", key = cmdline::ROOTHASH)]
    NoRootHash,
    #[error("kernel command line has {key}={0:?} (expected 64 hex digits)", key = cmdline::ROOTHASH)]
    BadRootHash(String),
}

/// What stage 1 needs from the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootArgs {
    pub slot: Slot,
    /// Lowercase hex SHA-256.
    pub roothash: String,
    pub disk_timeout: Duration,
    /// Problems with optional keys that fell back to defaults, to be logged.
    pub warnings: Vec<String>,
}

/// The reaction to fatal errors; unknown values fall back to halt (the safe choice: it keeps the
/// message on screen).
pub fn fatal_action(c: &Cmdline) -> (PowerAction, Option<String>) {
    match c.get(cmdline::FATAL) {
        None => (PowerAction::Halt, None),
        Some(v) => match PowerAction::parse(v) {
            Some(a) => (a, None),
            None => (
                PowerAction::Halt,
                Some(format!(
                    "ignoring {}={v:?} (expected halt, reboot or poweroff); using halt",
                    cmdline::FATAL
                )),
            ),
        },
    }
}

/// Parses the keys stage 1 requires.
pub fn parse(c: &Cmdline) -> Result<BootArgs, Error> {
    let slot = match c.get(cmdline::SLOT) {
        None => return Err(Error::NoSlot),
        Some(s) => Slot::parse(s).ok_or_else(|| Error::BadSlot(s.to_owned()))?,
    };
    let roothash = match c.get(cmdline::ROOTHASH) {
        None => return Err(Error::NoRootHash),
        Some(h) if h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()) => {
            h.to_ascii_lowercase()
        }
        Some(h) => return Err(Error::BadRootHash(h.to_owned())),
    };
    let mut warnings = Vec::new();
    let disk_timeout = match c.get(cmdline::DISK_TIMEOUT) {
        None => DEFAULT_DISK_TIMEOUT,
        Some(v) => match v.parse::<u64>() {
            Ok(secs) if (1..=3600).contains(&secs) => Duration::from_secs(secs),
            _ => {
                warnings.push(format!(
                    "ignoring {}={v:?} (expected 1..3600 seconds); using {} s",
                    cmdline::DISK_TIMEOUT,
                    DEFAULT_DISK_TIMEOUT.as_secs()
                ));
                DEFAULT_DISK_TIMEOUT
            }
        },
    };
    Ok(BootArgs {
        slot,
        roothash,
        disk_timeout,
        warnings,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const HASH: &str = "AB12ab12ab12ab12ab12ab12ab12ab12ab12ab12ab12ab12ab12ab12ab12ab12";

    #[test]
    fn parses_a_full_command_line() {
        let c = Cmdline::parse(&format!(
            "console=ttyS0 quiet keelson.slot=b roothash={HASH} keelson.disk_timeout=3 keelson.fatal=reboot\n"
        ));
        let a = parse(&c).unwrap();
        assert_eq!(a.slot, Slot::B);
        assert_eq!(a.roothash, HASH.to_ascii_lowercase());
        assert_eq!(a.disk_timeout, Duration::from_secs(3));
        assert!(a.warnings.is_empty());
        assert_eq!(fatal_action(&c), (PowerAction::Reboot, None));
    }

    #[test]
    fn defaults_and_warnings() {
        let c = Cmdline::parse(&format!(
            "keelson.slot=a roothash={HASH} keelson.disk_timeout=soon keelson.fatal=explode"
        ));
        let a = parse(&c).unwrap();
        assert_eq!(a.disk_timeout, DEFAULT_DISK_TIMEOUT);
        assert_eq!(a.warnings.len(), 1);
        let (action, warning) = fatal_action(&c);
        assert_eq!(action, PowerAction::Halt);
        assert!(warning.is_some());
        assert_eq!(
            fatal_action(&Cmdline::parse("quiet")),
            (PowerAction::Halt, None)
        );
    }

    #[test]
    fn missing_or_bad_required_keys() {
        assert_eq!(
            parse(&Cmdline::parse(&format!("roothash={HASH}"))),
            Err(Error::NoSlot)
        );
        assert_eq!(
            parse(&Cmdline::parse(&format!("keelson.slot=c roothash={HASH}"))),
            Err(Error::BadSlot("c".into()))
        );
        assert_eq!(
            parse(&Cmdline::parse("keelson.slot=a")),
            Err(Error::NoRootHash)
        );
        assert_eq!(
            parse(&Cmdline::parse("keelson.slot=a roothash=abc")),
            Err(Error::BadRootHash("abc".into()))
        );
    }
}
