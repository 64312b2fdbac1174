//! The one way init gives up: print `FATAL: ...` and then halt, reboot or power off as
//! `keelson.fatal=` says. PID 1 exiting would panic the kernel and lose the message, so this never
//! returns.

use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use nix::sys::reboot::{reboot, RebootMode};

/// What to do after a fatal error (and, for shutdown, what was requested).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PowerAction {
    Halt,
    Reboot,
    Poweroff,
}

impl PowerAction {
    /// Parses the value of `keelson.fatal=`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "halt" => Some(Self::Halt),
            "reboot" => Some(Self::Reboot),
            "poweroff" => Some(Self::Poweroff),
            _ => None,
        }
    }

    /// The name used in log lines and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Self::Halt => "halt",
            Self::Reboot => "reboot",
            Self::Poweroff => "poweroff",
        }
    }

    /// The reboot(2) command carrying it out.
    pub fn mode(self) -> RebootMode {
        match self {
            Self::Halt => RebootMode::RB_HALT_SYSTEM,
            Self::Reboot => RebootMode::RB_AUTOBOOT,
            Self::Poweroff => RebootMode::RB_POWER_OFF,
        }
    }

    fn to_u8(self) -> u8 {
        match self {
            Self::Halt => 0,
            Self::Reboot => 1,
            Self::Poweroff => 2,
        }
    }

    fn from_u8(v: u8) -> Self {
        match v {
            1 => Self::Reboot,
            2 => Self::Poweroff,
            _ => Self::Halt,
        }
    }
}

static ON_FATAL: AtomicU8 = AtomicU8::new(0);

/// Sets what [`fatal`] does once it has printed its message.
pub fn set_action(action: PowerAction) {
    ON_FATAL.store(action.to_u8(), Ordering::Relaxed);
}

/// Prints `FATAL: <msg>`, syncs, and halts/reboots/powers off. Never returns.
pub fn fatal(msg: &str) -> ! {
    crate::log::line(&format!("FATAL: {msg}"));
    nix::unistd::sync();
    let action = PowerAction::from_u8(ON_FATAL.load(Ordering::Relaxed));
    let _ = reboot(action.mode());
    // reboot(2) failed (not PID 1 in the init namespace, or no CAP_SYS_BOOT): park forever rather
    // than exit, which would panic the kernel and scroll the message away.
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// Routes panics (which should not happen: init avoids every panicking operation on runtime data)
/// through [`fatal`], so even a bug ends with a readable message and the configured action
/// instead of a kernel panic from PID 1 aborting.
pub fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| fatal(&format!("init panicked: {info}"))));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_actions_and_round_trips() {
        for a in [
            PowerAction::Halt,
            PowerAction::Reboot,
            PowerAction::Poweroff,
        ] {
            assert_eq!(PowerAction::parse(a.name()), Some(a));
            assert_eq!(PowerAction::from_u8(a.to_u8()), a);
        }
        assert_eq!(PowerAction::parse("explode"), None);
    }
}
