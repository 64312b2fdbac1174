//! Shutdown: stopping sysd, then every other process, unmounting /var so its journal is clean
//! for the next boot, and finally halting, rebooting or powering off.

use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::mount::{MntFlags, MsFlags};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::reboot::reboot;
use nix::sys::signal::{kill, Signal};
use nix::sys::signalfd::SignalFd;
use nix::sys::wait::WaitStatus;
use nix::unistd::{sync, Pid};

use crate::fatal::{fatal, PowerAction};
use crate::say;
use crate::supervise::{reap_all, Supervisor};
use crate::watchdog::Watchdog;

/// How long sysd gets to stop its services.
pub const SYSD_GRACE: Duration = Duration::from_secs(20);
/// How long everything else gets after SIGTERM.
pub const OTHERS_GRACE: Duration = Duration::from_secs(2);

/// The last log line's verb.
pub fn final_word(action: PowerAction) -> &'static str {
    match action {
        PowerAction::Poweroff => "powering off",
        PowerAction::Reboot => "rebooting",
        PowerAction::Halt => "halting",
    }
}

/// Reaps children until `done` says so (given everything reaped so far and whether any children
/// remain) or the deadline passes; returns whether `done` was satisfied. Signals arriving
/// meanwhile are drained and ignored: a shutdown is already under way.
fn reap_until(
    sfd: &SignalFd,
    timeout: Duration,
    mut done: impl FnMut(&[(Pid, WaitStatus)], bool) -> bool,
) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        let (reaped, none_left) = reap_all();
        if done(&reaped, none_left) {
            return true;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        let ms = u16::try_from(left.as_millis().saturating_add(1)).unwrap_or(u16::MAX);
        let mut fds = [PollFd::new(
            std::os::fd::AsFd::as_fd(sfd),
            PollFlags::POLLIN,
        )];
        let _ = poll(&mut fds, PollTimeout::from(ms));
        while let Ok(Some(_)) = sfd.read_signal() {}
    }
}

/// Carries out `action`. Never returns.
pub fn run(
    action: PowerAction,
    sup: &mut Supervisor,
    sfd: &SignalFd,
    mut wd: Option<Watchdog>,
) -> ! {
    say!("shutdown: {} requested", action.name());
    // Petted between the steps: each is bounded, and a shutdown that hangs is reset.
    let pet = |wd: &mut Option<Watchdog>| {
        if let Some(w) = wd.as_mut() {
            w.pet(std::time::Instant::now());
        }
    };
    pet(&mut wd);
    sup.stop_restarting();
    if let Some(pid) = sup.pid() {
        let _ = kill(pid, Signal::SIGTERM);
        // While sysd stops its services, the containers it adopted are init's children: their
        // exits still go to sysd (it reports how each ended), as they do outside a shutdown.
        let mut sysd_ended = |reaped: &[(Pid, WaitStatus)], _: bool| {
            for (p, status) in reaped {
                if *p != pid {
                    sup.on_reaped(*p, status);
                }
            }
            reaped.iter().any(|(p, _)| *p == pid)
        };
        if !reap_until(sfd, SYSD_GRACE, &mut sysd_ended) {
            say!(
                "shutdown: sysd did not stop within {} s; killing it",
                SYSD_GRACE.as_secs()
            );
            let _ = kill(pid, Signal::SIGKILL);
            reap_until(sfd, OTHERS_GRACE, &mut sysd_ended);
        }
    }
    sup.mark_stopped();
    say!("shutdown: sysd stopped");
    pet(&mut wd);

    let all = Pid::from_raw(-1);
    let no_children = |_: &[(Pid, WaitStatus)], none_left: bool| none_left;
    if kill(all, Signal::SIGTERM).is_ok() && !reap_until(sfd, OTHERS_GRACE, no_children) {
        say!("shutdown: processes left after SIGTERM; sending SIGKILL");
    }
    // Always: kill(-1) reports ESRCH when nothing is left, and stragglers of other sessions
    // may not be init's children yet.
    let _ = kill(all, Signal::SIGKILL);
    reap_until(sfd, Duration::from_secs(1), no_children);

    pet(&mut wd);
    match crate::random_seed::save(std::path::Path::new(crate::random_seed::SEED)) {
        crate::random_seed::Saved::Refreshed => say!("random-seed: refreshed for the next boot"),
        crate::random_seed::Saved::PoolNotReady => {
            say!("random-seed: the pool is not initialized; keeping the stored seed")
        }
        crate::random_seed::Saved::Failed(why) => say!("random-seed: not refreshed: {why}"),
    }
    sync();
    unmount_var();
    sync();
    if let Some(mut w) = wd {
        if action == PowerAction::Reboot {
            w.pet(std::time::Instant::now());
        } else {
            // A halted or powered-off machine must stay so.
            w.disarm();
        }
    }
    say!("shutdown: {}", final_word(action));
    match reboot(action.mode()) {
        Ok(never) => match never {},
        Err(e) => fatal(&format!("reboot(2) for {} failed: {e}", action.name())),
    }
}

/// Unmounts /var, retrying briefly while the last processes' files close; falls back to a
/// read-only remount, which also leaves the journal clean. What is mounted below it first
/// (sysd's image views, a container's leftovers), deepest first.
fn unmount_var() {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    for point in mounts_below(&info, "/var") {
        if nix::mount::umount2(point.as_str(), MntFlags::empty()).is_err() {
            let _ = nix::mount::umount2(point.as_str(), MntFlags::MNT_DETACH);
        }
    }
    let mut last = Errno::UnknownErrno;
    for _ in 0..10 {
        match nix::mount::umount2("/var", MntFlags::empty()) {
            Ok(()) => {
                say!("shutdown: /var unmounted cleanly");
                return;
            }
            Err(Errno::EINVAL) => {
                say!("shutdown: /var was not mounted");
                return;
            }
            Err(e) => last = e,
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let remount = nix::mount::mount(
        None::<&str>,
        "/var",
        None::<&str>,
        MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
        None::<&str>,
    );
    match remount {
        Ok(()) => say!("shutdown: cannot unmount /var ({last:?}); remounted it read-only"),
        Err(e) => say!(
            "shutdown: cannot unmount /var ({last:?}) nor remount it read-only ({e:?}); \
             it will need journal recovery"
        ),
    }
}

/// The mount points strictly below `dir` in a mountinfo text, deepest (and latest) first.
/// Points with escaped characters (`\040` for a space) are left out: sysd makes none.
fn mounts_below(mountinfo: &str, dir: &str) -> Vec<String> {
    let prefix = format!("{}/", dir.trim_end_matches('/'));
    let mut points: Vec<String> = mountinfo
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|p| p.starts_with(&prefix) && !p.contains('\\'))
        .map(str::to_string)
        .collect();
    points.reverse();
    // Stable: among equal depths the later mount (on top) stays first.
    points.sort_by_key(|p| std::cmp::Reverse(p.matches('/').count()));
    points
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mounts_below_var_deepest_first() {
        let info = "\
22 1 254:0 / / ro - erofs /dev/dm-0 ro
30 22 254:3 / /var rw - ext4 /dev/vda4 rw
41 30 0:40 / /var/lib/keelson/images/ab/merged ro - overlay overlay ro,lowerdir=/var/a:/var/b
42 30 0:41 / /var/lib/keelson/x rw - tmpfs tmpfs rw
43 42 0:42 / /var/lib/keelson/x/y rw - tmpfs tmpfs rw
44 30 0:43 / /var/with\\040space rw - tmpfs tmpfs rw
45 22 0:44 / /variable rw - tmpfs tmpfs rw
";
        assert_eq!(
            mounts_below(info, "/var"),
            [
                "/var/lib/keelson/images/ab/merged",
                "/var/lib/keelson/x/y",
                "/var/lib/keelson/x"
            ]
        );
    }

    #[test]
    fn final_words() {
        assert_eq!(final_word(PowerAction::Poweroff), "powering off");
        assert_eq!(final_word(PowerAction::Reboot), "rebooting");
        assert_eq!(final_word(PowerAction::Halt), "halting");
    }
}
