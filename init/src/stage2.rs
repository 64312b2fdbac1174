//! Stage 2, PID 1 in the real root: the writable overlays (/etc, /tmp, cgroup2), the machine's
//! identity, the checks that the root really is read-only, and the event loop that supervises
//! sysd and turns signals and the power button into a shutdown.

use std::fs::File;
use std::os::fd::AsFd;
use std::path::Path;
use std::time::Instant;

use keelson_common::cmdline::Cmdline;
use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{SigSet, SigmaskHow, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};

use crate::fatal::{self, fatal, PowerAction};
use crate::mounts::{self, Kernel};
use crate::supervise::{reap_all, Supervisor};
use crate::watchdog::Watchdog;

/// Where init and sysd leave each other runtime state (init.log, the module loader's marks).
const RUN_DIR: &str = "/run/keelson";
use crate::{bootargs, etc, power_button, random_seed, say, shutdown, state};

/// The file stage 2 tries to create to prove the root is read-only.
pub const WRITE_PROBE: &str = "/.keelson-write-probe";

/// What a signal asks init to do.
pub fn signal_action(sig: Signal) -> Option<PowerAction> {
    match sig {
        // SIGINT is ctrl-alt-del once the kernel's own handling is disabled.
        Signal::SIGTERM | Signal::SIGINT => Some(PowerAction::Reboot),
        Signal::SIGUSR1 => Some(PowerAction::Halt),
        Signal::SIGUSR2 | Signal::SIGPWR => Some(PowerAction::Poweroff),
        _ => None,
    }
}

/// The signals the event loop handles.
pub fn handled_signals() -> SigSet {
    let mut set = SigSet::empty();
    for s in [
        Signal::SIGCHLD,
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGUSR1,
        Signal::SIGUSR2,
        Signal::SIGPWR,
    ] {
        set.add(s);
    }
    set
}

/// Runs stage 2; never returns.
/// Who may open ICMP echo sockets: everyone.
const PING_GROUP_RANGE: (&str, &str) = ("/proc/sys/net/ipv4/ping_group_range", "0 2147483647");

pub fn run() -> ! {
    // Blocked before anything else so no signal is lost (or, for PID 1, dropped) before the
    // signalfd exists; children get a clean mask in `supervise`.
    let blocked = nix::sys::signal::sigprocmask(SigmaskHow::SIG_BLOCK, Some(&SigSet::all()), None);
    crate::log::ensure_stdio();
    crate::log::open_console();
    crate::log::open_record(crate::log::RECORD_PATH);
    say!("stage2: start");
    if let Err(e) = blocked {
        fatal(&format!("cannot block signals: {e}"));
    }
    let cmdline = Cmdline::parse(&std::fs::read_to_string("/proc/cmdline").unwrap_or_default());
    let (action, _) = bootargs::fatal_action(&cmdline);
    fatal::set_action(action);

    if let Err(e) = mounts::mount_cgroup2(&mut Kernel) {
        say!("{e}; services will run without cgroups");
    }
    if let Err(e) = mounts::mount_all(&mut Kernel, &mounts::STAGE2_TMPFS) {
        fatal(&e.to_string());
    }
    for dir in [state::DIR, "/var/log"] {
        if let Err(e) = std::fs::create_dir_all(dir) {
            say!("cannot create {dir}: {e}");
        }
    }
    if let Err(e) = nix::sys::reboot::set_cad_enabled(false) {
        say!("cannot route ctrl-alt-del to init: {e}");
    }
    // ICMP echo sockets for every group: ping without CAP_NET_RAW, which services no longer
    // get by default (most distributions set this on the host, Docker in each container).
    if let Err(e) = std::fs::write(PING_GROUP_RANGE.0, PING_GROUP_RANGE.1) {
        say!("cannot set {}: {e}", PING_GROUP_RANGE.0);
    }

    // Before anything may want blocking randomness.
    match random_seed::load(Path::new(random_seed::SEED), Path::new("/dev/urandom")) {
        random_seed::Loaded::Credited(n) => {
            say!("random-seed: {n} bytes credited, a new one stored")
        }
        random_seed::Loaded::None => {
            say!("random-seed: none yet; one is stored once the kernel's pool is ready");
            random_seed::store_when_ready(random_seed::SEED);
        }
        random_seed::Loaded::NotCredited(why) => say!("random-seed: mixed in, not credited: {why}"),
    }
    identity();
    check_root_read_only();
    log_network_interfaces();

    let sfd = match SignalFd::with_flags(
        &handled_signals(),
        SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC,
    ) {
        Ok(s) => s,
        Err(e) => fatal(&format!("cannot create signalfd: {e}")),
    };
    let mut buttons = power_button::open_all();
    if buttons.is_empty() {
        say!("power button: none found; ACPI power-off requests will be ignored");
    }
    for (path, _) in &buttons {
        say!("power button: {path}");
    }
    // Armed after /var is set up (it counts the previous boot's reset there) and before sysd
    // starts (sysd learns how often to say WATCHDOG=1 from the environment).
    let wd = Watchdog::open(&cmdline);
    crate::supervise::raise_fd_limit();
    crate::modules::load_root_modules_in_background(Path::new(RUN_DIR));
    event_loop(&sfd, &mut buttons, wd)
}

/// One line per network interface with the driver bound to it: on real hardware, the first thing
/// to know when a node does not come up on the network is whether its NIC has a driver.
fn log_network_interfaces() {
    let Ok(entries) = std::fs::read_dir("/sys/class/net") else {
        say!("network interfaces: /sys/class/net unreadable");
        return;
    };
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != "lo")
        .collect();
    names.sort();
    if names.is_empty() {
        say!("network interfaces: none (no NIC, or no driver for it)");
    }
    for name in names {
        let driver = std::fs::read_link(format!("/sys/class/net/{name}/device/driver"))
            .ok()
            .and_then(|p| p.file_name().map(|f| f.to_string_lossy().into_owned()))
            .unwrap_or_else(|| "virtual".into());
        let mac =
            std::fs::read_to_string(format!("/sys/class/net/{name}/address")).unwrap_or_default();
        say!("network interface {name} ({driver}) {}", mac.trim());
    }
}

/// Machine ID, hostname, /etc and the boot counter.
fn identity() {
    let machine_id = match state::machine_id() {
        Ok(state::MachineId::Kept(id)) => {
            say!("machine-id: {id} (kept on /var)");
            id
        }
        Ok(state::MachineId::Generated(id)) => {
            say!("machine-id: generated {id}");
            id
        }
        Ok(state::MachineId::FromVm(id)) => {
            say!("machine-id: generated {id} (the VM's SMBIOS UUID)");
            id
        }
        Err(e) => {
            // Keep booting with an ID that lives for this boot only: a broken /var is better
            // diagnosed from a running system.
            let mut bytes = [0u8; 16];
            if let Err(r) = state::random_bytes(&mut bytes) {
                fatal(&format!(
                    "cannot store a machine ID ({e}) nor generate one ({r})"
                ));
            }
            let id = state::machine_id_from_random(bytes);
            say!("machine-id: generated {id} (not stored: {e})");
            id
        }
    };
    let configured = std::fs::read_to_string(state::HOSTNAME).ok();
    let (hostname, warning) = state::choose_hostname(configured.as_deref(), &machine_id);
    if let Some(w) = warning {
        say!("{w}");
    }
    if let Err(e) = nix::unistd::sethostname(&hostname) {
        say!("cannot set hostname {hostname}: {e}");
    }
    let os_release = std::fs::read_to_string(etc::OS_RELEASE_SOURCE).ok();
    if os_release.is_none() {
        say!(
            "{} missing; /etc/os-release not written",
            etc::OS_RELEASE_SOURCE
        );
    }
    let entries = etc::render(&machine_id, &hostname, os_release.as_deref());
    for failure in etc::apply(Path::new("/etc"), Path::new("/run/keelson"), &entries) {
        say!("/etc: cannot write {failure}");
    }
    match state::count_boot() {
        Ok(n) => say!("boot #{n}"),
        Err(e) => say!("boot counter: cannot update {}: {e}", state::BOOT_COUNT),
    }
}

/// Proves the root file system refuses writes: the image's integrity rests on it.
fn check_root_read_only() {
    let probe = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(WRITE_PROBE);
    match probe {
        Ok(file) => {
            drop(file);
            let _ = std::fs::remove_file(WRITE_PROBE);
            fatal(&format!(
                "root is writable (created {WRITE_PROBE}); the root must be the read-only dm-verity image"
            ));
        }
        Err(e) => {
            let errno = e.raw_os_error().map(Errno::from_raw);
            match errno {
                Some(errno) => say!("root: read-only (write refused: {errno:?})"),
                None => say!("root: read-only (write refused: {e})"),
            }
        }
    }
}

fn event_loop(sfd: &SignalFd, buttons: &mut [(String, File)], mut wd: Option<Watchdog>) -> ! {
    let mut sup = Supervisor::new();
    loop {
        sup.tick(Instant::now());
        if let Some(w) = wd.as_mut() {
            w.tick(Instant::now(), sup.sysd_last_seen());
        }
        let now = Instant::now();
        let due = match (sup.timeout(now), wd.as_ref().map(|w| w.timeout(now))) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let timeout = match due {
            None => PollTimeout::NONE,
            // Rounded up so the wake-up is never early (which would spin until the deadline).
            Some(d) => PollTimeout::from(
                u16::try_from(d.as_millis().saturating_add(1)).unwrap_or(u16::MAX),
            ),
        };
        let (signals_ready, notify_ready, pressed_ready) = {
            let mut fds = vec![PollFd::new(sfd.as_fd(), PollFlags::POLLIN)];
            let notify = sup.notify_fd();
            if let Some((fd, wants_write)) = notify {
                let mut events = PollFlags::POLLIN;
                events.set(PollFlags::POLLOUT, wants_write);
                fds.push(PollFd::new(fd, events));
            }
            for (_, f) in buttons.iter() {
                fds.push(PollFd::new(f.as_fd(), PollFlags::POLLIN));
            }
            match poll(&mut fds, timeout) {
                Ok(_) | Err(Errno::EINTR) => {}
                Err(e) => {
                    say!("poll: {e}");
                    std::thread::sleep(std::time::Duration::from_millis(100));
                }
            }
            let ready = |fd: &PollFd| fd.revents().is_some_and(|r| !r.is_empty());
            let mut it = fds.iter();
            let signals = it.next().is_some_and(ready);
            let notify_ready = notify.is_some() && it.next().is_some_and(ready);
            let buttons_ready: Vec<bool> = it.map(ready).collect();
            (signals, notify_ready, buttons_ready)
        };

        let mut request = None;
        if signals_ready {
            while let Ok(Some(info)) = sfd.read_signal() {
                let Ok(sig) = Signal::try_from(i32::try_from(info.ssi_signo).unwrap_or(0)) else {
                    continue;
                };
                if sig == Signal::SIGCHLD {
                    continue;
                }
                if let Some(action) = signal_action(sig) {
                    say!("{sig} received");
                    request = request.or(Some(action));
                }
            }
        }
        // Reaped on every wake-up, not only on SIGCHLD: signals coalesce, and it is cheap.
        let (reaped, _) = reap_all();
        for (pid, status) in &reaped {
            sup.on_reaped(*pid, status);
        }
        if notify_ready {
            sup.on_notify();
        }
        for ((path, file), ready) in buttons.iter_mut().zip(pressed_ready) {
            if ready && power_button::read_press(file) {
                say!("power button pressed ({path})");
                request = request.or(Some(PowerAction::Poweroff));
            }
        }
        if let Some(action) = request {
            shutdown::run(action, &mut sup, sfd, wd.take());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busybox_signal_conventions() {
        assert_eq!(signal_action(Signal::SIGTERM), Some(PowerAction::Reboot));
        assert_eq!(signal_action(Signal::SIGINT), Some(PowerAction::Reboot));
        assert_eq!(signal_action(Signal::SIGUSR1), Some(PowerAction::Halt));
        assert_eq!(signal_action(Signal::SIGUSR2), Some(PowerAction::Poweroff));
        assert_eq!(signal_action(Signal::SIGPWR), Some(PowerAction::Poweroff));
        assert_eq!(signal_action(Signal::SIGCHLD), None);
        assert_eq!(signal_action(Signal::SIGHUP), None);
        let set = handled_signals();
        assert!(set.contains(Signal::SIGCHLD) && set.contains(Signal::SIGPWR));
        assert!(!set.contains(Signal::SIGHUP));
    }
}
