//! Resilience scenarios of issue 21 on the test image under QEMU TCG: a hung sysd ends in a
//! watchdog reset within the configured time, and the next boot counts and reports it; a
//! killed sysd comes back and adopts every running service, with no log line lost.
//!
//! The test image's cloud kernel has no i6300esb driver, so its watchdog is the kernel's softdog
//! (`configs/test.toml`); init's side (arming, petting while sysd says WATCHDOG=1, the marker
//! that names the reason) is the same for any driver.

use std::time::{Duration, Instant};

use qemu_tests::scenario::{fresh_disk, test_guest};
use qemu_tests::Guest;
use serde_json::Value;

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

/// `keelctl -o json ps`, by name: (state, pid, restarts).
fn ps(g: &Guest) -> std::collections::BTreeMap<String, (String, i64, i64)> {
    let out = g.sh("keelctl -o json ps 2>/dev/null || echo '[]'");
    let list: Value = serde_json::from_str(out.trim()).unwrap_or(Value::Null);
    list.as_array()
        .into_iter()
        .flatten()
        .map(|s| {
            (
                s["name"].as_str().unwrap_or("").to_owned(),
                (
                    s["state"].as_str().unwrap_or("").to_owned(),
                    s["pid"].as_i64().unwrap_or(0),
                    s["restarts"].as_i64().unwrap_or(0),
                ),
            )
        })
        .collect()
}

/// The N of every `line N` in `text`.
fn numbers(text: &str) -> Vec<u64> {
    text.split("line ")
        .skip(1)
        .filter_map(|rest| {
            let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
            digits.parse().ok()
        })
        .collect()
}

#[test]
fn a_killed_sysd_adopts_ten_running_services_and_loses_no_log_line() {
    let dir = tempfile::tempdir().unwrap();
    let disk = fresh_disk(dir.path());
    let g = test_guest(&disk).spawn().unwrap();
    g.expect("boot complete", BOOT);
    // Ten services: s0 writes a numbered line every 100 ms, s9 restarts always; s0-s4 are on
    // the bridge (schema 2's default), s5-s9 on the host network.
    let mut config = String::from("version = 2\n");
    config.push_str(
        "[services.s0]\nimage = \"/usr/lib/keelson/images/base\"\n\
         command = [\"sh\", \"-c\", \"i=0; while :; do i=$((i+1)); echo line $i; sleep 0.1; done\"]\n",
    );
    for i in 1..10 {
        let network = if i < 5 { "bridge" } else { "host" };
        config.push_str(&format!(
            "[services.s{i}]\nimage = \"/usr/lib/keelson/images/base\"\ncommand = [\"sleep\", \"100000\"]\nrestart = \"always\"\nnetwork = \"{network}\"\n"
        ));
    }
    let applied = g.sh(&format!(
        "cat > /tmp/ten.toml <<'EOF'\n{config}EOF\nkeelctl apply /tmp/ten.toml"
    ));
    assert!(
        applied.contains("10 started") || applied.contains("start"),
        "{applied}"
    );
    let deadline = Instant::now() + BOOT;
    let before = loop {
        let now = ps(&g);
        let ours: Vec<_> = (0..10).filter_map(|i| now.get(&format!("s{i}"))).collect();
        if ours.len() == 10 && ours.iter().all(|(state, _, _)| state == "running") {
            break now;
        }
        assert!(Instant::now() < deadline, "not all running: {now:?}");
        std::thread::sleep(Duration::from_secs(2));
    };
    let s9 = before["s9"].1;

    // kill -9 of sysd, and of s9's container while no sysd runs (init restarts sysd after
    // 200 ms; both kills are one shell command).
    g.skip_to_end();
    g.sh(&format!(
        "for p in $(cat /proc/1/task/1/children); do \
         [ \"$(cat /proc/$p/comm)\" = sysd ] && kill -9 $p && while [ -e /proc/$p ]; do :; done; done; \
         kill -9 {s9}; true"
    ));
    g.expect("fd store: handing", BOOT);
    let deadline = Instant::now() + BOOT;
    let after = loop {
        let now = ps(&g);
        if now
            .get("s9")
            .is_some_and(|(state, pid, _)| state == "running" && *pid != s9)
            && (0..9).all(|i| now.get(&format!("s{i}")).is_some_and(|s| s.0 == "running"))
        {
            break now;
        }
        if Instant::now() >= deadline {
            let serial = g.serial_log();
            let relevant: Vec<&str> = serial
                .lines()
                .filter(|l| {
                    ["adopt", "fd store", "notify", "sysd", "s9", "cleanup"]
                        .iter()
                        .any(|w| l.contains(w))
                        && !l.contains("flaky")
                        && !l.contains("hog")
                })
                .collect();
            panic!(
                "not back: {now:?}\n{}\n--- console ---\n{}",
                g.sh("keelctl -o json ps 2>&1 | head -c 3000"),
                relevant[relevant.len().saturating_sub(80)..].join("\n")
            );
        }
        std::thread::sleep(Duration::from_secs(2));
    };
    // None restarted: same pids, and the new sysd started none of them.
    for i in 0..9 {
        let name = format!("s{i}");
        assert_eq!(after[&name].1, before[&name].1, "{name} was restarted");
    }
    assert_eq!(after["s9"].2, before["s9"].2 + 1, "s9's restart counter");
    let events = g.sh("timeout 5 keelctl events; true");
    // `TIME SERVICE KIND MESSAGE` lines: the kinds each service had in this sysd.
    let kinds = |name: &str| -> Vec<String> {
        events
            .lines()
            .filter_map(|l| {
                let mut w = l.split_whitespace().skip(1);
                (w.next()? == name).then(|| w.next().map(str::to_owned))?
            })
            .collect()
    };
    for i in 0..9 {
        let name = format!("s{i}");
        let k = kinds(&name);
        assert!(k.iter().any(|k| k == "adopted"), "{name}: {events}");
        for not in ["started", "stopped", "restarting", "adopt-refused"] {
            assert!(!k.iter().any(|k| k == not), "{name} {not}: {events}");
        }
    }
    assert!(
        kinds("s9").iter().any(|k| k == "exited-unsupervised"),
        "{events}"
    );
    // The bridge services got their place back as they had it (address, hosts, ports).
    let serial = g.serial_log();
    for i in 0..5 {
        assert!(
            serial
                .lines()
                .any(|l| l.contains(&format!("endpoint: s{i}: ")) && l.contains("(kept)")),
            "s{i}'s endpoint was not taken back"
        );
    }
    // Every line s0 wrote, through the gap, is in its log once and in order.
    std::thread::sleep(Duration::from_secs(2));
    let file = numbers(&g.sh("cat /proc/1/root/var/log/keelson/s0.log"));
    assert!(
        file.first() == Some(&1) && file.windows(2).all(|w| w[1] == w[0] + 1),
        "a gap in s0's log file: {file:?}"
    );
    let logs = numbers(&g.sh("keelctl logs s0"));
    assert!(
        logs.first().is_some_and(|n| file.contains(n)) && logs.windows(2).all(|w| w[1] == w[0] + 1),
        "keelctl logs s0: {logs:?}"
    );
}
