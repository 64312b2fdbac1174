//! Resilience scenarios of issue 21 on the test image under QEMU TCG: a hung sysd ends in a
//! watchdog reset within the configured time, and the next boot counts and reports it.
//!
//! The test image's cloud kernel has no i6300esb driver, so its watchdog is the kernel's softdog
//! (`configs/test.toml`); init's side (arming, petting while sysd says WATCHDOG=1, the marker
//! that names the reason) is the same for any driver.

use std::time::{Duration, Instant};

use qemu_tests::scenario::{fresh_disk, test_guest};

/// Generous: TCG on a loaded 2-core machine.
const BOOT: Duration = Duration::from_secs(240);
/// `keelson.watchdog=` of the scenario: sysd may be silent 10 s, the device resets 10 s later.
const WATCHDOG_S: u64 = 20;

#[test]
fn a_stopped_sysd_is_reset_by_the_watchdog_and_the_next_boot_reports_it() {
    let dir = tempfile::tempdir().unwrap();
    let disk = fresh_disk(dir.path());
    let g = test_guest(&disk)
        .append_cmdline(&format!("keelson.watchdog={WATCHDOG_S}"))
        .spawn()
        .unwrap();
    let armed = g.expect("keelson-init: watchdog: ", BOOT);
    assert!(
        armed.contains("armed (10 s; sysd may be silent 10 s"),
        "{armed}"
    );
    g.expect("boot complete", BOOT);
    let status = g.sh("keelctl status");
    assert!(
        status.contains(&format!("resets a hung node within {WATCHDOG_S}s"))
            && status.contains("resets:    0"),
        "{status}"
    );
    assert!(!status.contains("last boot"), "{status}");

    // Well past the silence allowed: a healthy sysd keeps the node up.
    std::thread::sleep(Duration::from_secs(WATCHDOG_S + 5));
    assert!(
        !g.serial_log().contains("sysd silent"),
        "{}",
        g.serial_tail(40)
    );

    g.skip_to_end();
    // The daemon is init's child; `sysd init` inside containers has the same name.
    g.sh("for p in $(cat /proc/1/task/1/children); do \
          [ \"$(cat /proc/$p/comm)\" = sysd ] && kill -STOP $p; done; true");
    let stopped = Instant::now();
    let stopped_at = g.spawned_at().elapsed();
    let starved = g
        .wait_for_match(
            &["watchdog: sysd silent for"],
            Duration::from_secs(WATCHDOG_S * 2),
        )
        .unwrap_or_else(|e| panic!("init never noticed: {e}"));
    assert!(
        starved.line.contains("no longer petting"),
        "{}",
        starved.line
    );
    // softdog says when it resets (KERN_CRIT passes `quiet`); a hardware watchdog does not.
    let first = g
        .wait_for_match(
            &["Initiating system reboot", "stage1: start"],
            Duration::from_secs(WATCHDOG_S * 3),
        )
        .unwrap_or_else(|e| panic!("no reset after sysd stopped: {e}"));
    let reset = if first.pattern == 0 {
        eprintln!(
            "watchdog: the device reset the node {:.1} s after SIGSTOP",
            first.at.saturating_sub(stopped_at).as_secs_f64()
        );
        g.wait_for_match(&["stage1: start"], BOOT)
            .unwrap_or_else(|e| panic!("no boot after the reset: {e}"))
    } else {
        first
    };
    let latency = reset.at.saturating_sub(stopped_at);
    eprintln!(
        "watchdog: SIGSTOP -> init stops petting {:.1} s -> next boot's stage 1 {:.1} s \
         (configured {WATCHDOG_S} s)",
        starved.at.saturating_sub(stopped_at).as_secs_f64(),
        latency.as_secs_f64()
    );
    // The reset itself within the configured time, plus the kernel's start to stage 1 (TCG).
    assert!(
        stopped.elapsed() < Duration::from_secs(WATCHDOG_S * 3),
        "reset took {:?}",
        stopped.elapsed()
    );

    let counted = g.expect(
        "watchdog: the previous boot was reset by the watchdog",
        BOOT,
    );
    assert!(
        counted.contains("sysd silent for") && counted.contains("1 so far"),
        "{counted}"
    );
    g.expect(
        "sysd: watchdog-reset: the previous boot was reset by the watchdog",
        BOOT,
    );
    g.expect("boot complete", BOOT);
    let status = g.sh("keelctl status");
    assert!(
        status.contains("resets:    1")
            && status.contains("last boot: reset by the watchdog (sysd silent for"),
        "{status}"
    );
}
