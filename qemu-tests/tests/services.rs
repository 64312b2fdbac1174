//! Service scenarios of the sysd issue: the test image (`configs/test.toml`: the vm image plus
//! `configs/services/test.toml`) booted under QEMU TCG. The harness drives the node the way an
//! operator would, with keelctl, from the `testshell` service (a root shell on guest port 7000,
//! reached through a QEMU port forward inside the test's network namespace), and reads sysd's
//! event lines on the console.

use std::io::Read;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use keelson_common::api::boot::Boot;
use qemu_tests::scenario::{fresh_disk, http_get, test_guest};
use qemu_tests::Guest;
use serde_json::Value;

/// Generous: TCG on a loaded 2-core machine.
const BOOT: Duration = Duration::from_secs(240);
const SETTLE: Duration = Duration::from_secs(240);
const WEB_PORT: u16 = 18080;
const SSH_PORT: u16 = 10022;

/// Services of the test config that must all reach `running`.
const LONG_RUNNING: &[&str] = &[
    "testshell",
    "timesync",
    "web",
    "counter",
    "db",
    "app",
    "worker",
    "flusher",
    "isolated",
];

/// The test image with the web service's and the admin container's ports forwarded too.
fn boot(disk: &Path) -> Guest {
    test_guest(disk)
        .forward(WEB_PORT, 8080)
        .forward(SSH_PORT, 22)
        .spawn()
        .unwrap()
}

/// `keelctl analyze` on the node: init's steps of both stages in their order, the services'
/// starts in dependency order on the same clock, every service settled (the crasher failed),
/// and the blame, chain and plot made from them.
fn analyze(g: &Guest) {
    let deadline = Instant::now() + SETTLE;
    let b: Boot = loop {
        let out = g.sh("keelctl -o json analyze");
        let b: Boot = serde_json::from_str(out.trim())
            .unwrap_or_else(|e| panic!("keelctl -o json analyze: {e}: {out}"));
        if b.all_ready_us.is_some() {
            break b;
        }
        assert!(Instant::now() < deadline, "never all ready: {b:#?}");
        std::thread::sleep(Duration::from_secs(2));
    };
    let at = |prefix: &str| {
        b.mark(prefix)
            .unwrap_or_else(|| panic!("no init line {prefix:?} in {:#?}", b.init))
            .at_us
    };
    let order = [
        "stage1: start",
        "stage1: modules loaded",
        "stage1: boot disk",
        "stage1: root verified by dm-verity",
        "stage1: switching root",
        "stage2: start",
        "machine-id: ",
        "stage2: sysd started",
        "boot complete in",
    ];
    for w in order.windows(2) {
        assert!(
            at(w[0]) <= at(w[1]),
            "{} after {}: {:#?}",
            w[0],
            w[1],
            b.init
        );
    }
    assert!(
        b.init.windows(2).all(|w| w[0].at_us <= w[1].at_us),
        "{:#?}",
        b.init
    );
    let svc = |name: &str| {
        b.services
            .iter()
            .find(|s| s.name == name)
            .cloned()
            .unwrap_or_else(|| panic!("no {name} in {:#?}", b.services))
    };
    let sysd = at("stage2: sysd started");
    for name in ["db", "migrate", "app", "worker"] {
        let s = svc(name);
        let (Some(a), Some(st), Some(r)) = (s.starting_us, s.started_us, s.ready_us) else {
            panic!("{s:?}");
        };
        assert!(sysd <= a && a <= st && st <= r, "{s:?}");
    }
    assert!(svc("app").starting_us >= svc("migrate").ready_us);
    assert!(svc("worker").starting_us >= svc("app").ready_us);
    assert_eq!(
        svc("app").after,
        vec!["db".to_string(), "migrate".to_string()]
    );
    // Without a readiness check the crasher counted as ready while its process ran; it failed
    // for good since, which settles it.
    assert_eq!(
        svc("crasher").state,
        Some(keelson_common::api::State::Failed)
    );
    let summary = g.sh("keelctl analyze");
    assert!(summary.starts_with("Boot complete after "), "{summary}");
    assert!(
        summary.contains("All services ready after ") && summary.contains("failed: crasher"),
        "{summary}"
    );
    let blame = g.sh("keelctl analyze blame");
    assert!(
        blame.contains("stage1: modules loaded") && blame.contains("db [service]"),
        "{blame}"
    );
    let chain = g.sh("keelctl analyze critical-chain");
    assert!(
        chain.contains("all services ready @") && chain.contains("kernel (until stage1: start)"),
        "{chain}"
    );
    let plot = g.sh("keelctl analyze plot");
    assert!(
        plot.starts_with("<?xml") && plot.trim_end().ends_with("</svg>"),
        "{plot}"
    );
    assert!(plot.contains(">worker ("), "{plot}");
}

fn ps(g: &Guest) -> Vec<Value> {
    let out = g.sh("keelctl -o json ps");
    serde_json::from_str::<Value>(out.trim())
        .unwrap_or_else(|e| panic!("keelctl ps: {e}: {out}"))
        .as_array()
        .cloned()
        .unwrap_or_default()
}

fn service(list: &[Value], name: &str) -> Value {
    list.iter()
        .find(|s| s["name"] == name)
        .cloned()
        .unwrap_or(Value::Null)
}

fn wait_until(
    g: &Guest,
    what: &str,
    timeout: Duration,
    mut ok: impl FnMut(&[Value]) -> bool,
) -> Vec<Value> {
    let deadline = Instant::now() + timeout;
    loop {
        let list = ps(g);
        if ok(&list) {
            return list;
        }
        if Instant::now() > deadline {
            panic!(
                "timed out waiting for {what}: {list:#?}\n{}",
                g.serial_tail(80)
            );
        }
        std::thread::sleep(Duration::from_secs(2));
    }
}

fn events(g: &Guest) -> Vec<Value> {
    g.sh("timeout 3 keelctl -o json events")
        .lines()
        .filter_map(|l| serde_json::from_str(l.trim()).ok())
        .collect()
}

fn index(events: &[Value], svc: &str, kind: &str) -> usize {
    events
        .iter()
        .position(|e| e["service"] == svc && e["kind"] == kind)
        .unwrap_or_else(|| panic!("no `{kind}` event for {svc}: {events:#?}"))
}

#[test]
fn default_services_reach_ready_and_are_supervised() {
    let dir = tempfile::tempdir().unwrap();
    let g = boot(&fresh_disk(dir.path()));
    g.expect("sysd: testshell: ready", BOOT);

    // Everything comes up; the one-shot completes; the crasher gives up with its reason.
    let list = wait_until(&g, "every service to be ready", SETTLE, |l| {
        LONG_RUNNING
            .iter()
            .all(|n| service(l, n)["state"] == "running")
            && service(l, "migrate")["state"] == "completed"
    });
    assert!(list.len() >= 12, "{list:#?}");

    // Dependency order, from the event stream.
    let ev = events(&g);
    assert!(index(&ev, "db", "ready") < index(&ev, "migrate", "started"));
    assert!(index(&ev, "migrate", "completed") < index(&ev, "app", "started"));
    assert!(index(&ev, "app", "ready") < index(&ev, "worker", "started"));

    // The web service answers through the port forward.
    let web = SocketAddr::from((Ipv4Addr::LOCALHOST, WEB_PORT));
    let body = g.run_in_netns(|| http_get(web, "/")).unwrap();
    assert!(body.contains("hello from web"), "{body}");

    // kill -9 of a service's main process: restarted, with an event saying why.
    let counter = service(&list, "counter");
    let out = g.sh("keelctl kill -s KILL counter");
    assert!(!out.contains("error"), "{out}");
    wait_until(&g, "counter to be restarted", SETTLE, |l| {
        let c = service(l, "counter");
        c["state"] == "running" && c["pid"] != counter["pid"]
    });
    g.expect(
        "sysd: counter: restarting: killed by signal 9 (SIGKILL)",
        SETTLE,
    );

    // Over its memory limit: OOM-killed by the kernel, reported, restarted. (Lines printed
    // together are matched by one wait: the console reader moves past what it has read.)
    let oom = g.expect(
        "sysd: hog: restarting: OOM-killed at its memory limit",
        SETTLE,
    );
    assert!(oom.contains("restarting in"), "{oom}");
    // A failing health check restarts its service.
    g.expect(
        "sysd: flaky: restarting: health check failed 3 times",
        SETTLE,
    );
    let list = wait_until(&g, "crasher to give up", SETTLE, |l| {
        service(l, "crasher")["state"] == "failed"
    });
    let reason = service(&list, "crasher")["reason"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        reason.contains("exited with status 3") && reason.contains("gave up after 2 retries"),
        "{reason}"
    );

    analyze(&g);

    // stats come from the services' cgroups (cgroup v2 controllers on the real kernel).
    let stats: Value = serde_json::from_str(g.sh("keelctl -o json stats").trim()).unwrap();
    let c = stats
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["service"] == "counter")
        .cloned()
        .unwrap();
    assert!(c["memory_current"].as_u64().unwrap_or(0) > 0, "{stats:#}");
    assert_eq!(c["memory_max"], 8 << 20, "{stats:#}");
    assert!(c["pids_current"].as_u64().unwrap_or(0) >= 1, "{stats:#}");
    let logs = g.sh("keelctl logs -n 3 counter");
    assert!(logs.contains("count "), "{logs}");

    // apply: user services start; a change restarts only that service; bad config is
    // rejected whole with the field named, and nothing changes.
    let user = |arg: &str| {
        format!(
            "version = 1\n[services.u1]\nimage = \"/usr/lib/keelson/images/base\"\ncommand = [\"sleep\", \"100000\"]\n\n[services.u2]\nimage = \"/usr/lib/keelson/images/base\"\ncommand = [\"sleep\", \"{arg}\"]\n"
        )
    };
    let out = g.sh(&format!(
        "cat > /tmp/u.toml <<'EOF'\n{}EOF\nkeelctl apply /tmp/u.toml",
        user("100000")
    ));
    assert!(out.contains("u1") && out.contains("u2"), "{out}");
    let before = wait_until(&g, "user services", SETTLE, |l| {
        service(l, "u1")["state"] == "running" && service(l, "u2")["state"] == "running"
    });
    let out = g.sh(&format!(
        "cat > /tmp/u.toml <<'EOF'\n{}EOF\nkeelctl apply /tmp/u.toml",
        user("200000")
    ));
    assert!(out.contains("u2"), "{out}");
    let after = wait_until(&g, "u2 to restart", SETTLE, |l| {
        let u2 = service(l, "u2");
        u2["state"] == "running" && u2["pid"] != service(&before, "u2")["pid"]
    });
    for unchanged in ["u1", "web", "db", "app", "counter"] {
        assert_eq!(
            service(&after, unchanged)["pid"],
            service(&before, unchanged)["pid"],
            "{unchanged} restarted"
        );
    }
    let out = g.sh("printf 'version = 1\\n[services.u1]\\nimage = \"/x\"\\nresources = { memory_max = \"lots\" }\\n' > /tmp/bad.toml; keelctl apply /tmp/bad.toml; echo rc=$?");
    assert!(
        out.contains("rc=1") && out.contains("memory_max") && out.contains("invalid size"),
        "{out}"
    );
    let unchanged = ps(&g);
    assert_eq!(
        service(&unchanged, "u1")["pid"],
        service(&after, "u1")["pid"]
    );
    assert_eq!(
        service(&unchanged, "u2")["pid"],
        service(&after, "u2")["pid"]
    );

    // The admin container is opt-in: defined, stopped, and an SSH server once started.
    assert_eq!(service(&unchanged, "admin")["state"], "stopped");
    let out = g.sh("keelctl start admin");
    assert!(!out.contains("error"), "{out}");
    wait_until(&g, "the admin container", SETTLE, |l| {
        service(l, "admin")["state"] == "running"
    });
    let banner = g.run_in_netns(|| {
        let mut s = TcpStream::connect(("127.0.0.1", SSH_PORT)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut buf = [0u8; 64];
        let n = s.read(&mut buf).unwrap_or(0);
        String::from_utf8_lossy(&buf[..n]).to_string()
    });
    assert!(banner.starts_with("SSH-2.0-dropbear"), "{banner:?}");
}

#[test]
fn killed_sysd_is_restarted_adopts_its_services_and_power_off_stops_them_gracefully() {
    let dir = tempfile::tempdir().unwrap();
    let disk = fresh_disk(dir.path());
    let g = boot(&disk);
    g.expect("sysd: testshell: ready", BOOT);
    let before = wait_until(&g, "services", SETTLE, |l| {
        LONG_RUNNING
            .iter()
            .all(|n| service(l, n)["state"] == "running")
    });

    // The test shell shares the host's pid namespace: kill sysd like a crash would.
    g.sh("kill -9 $(pidof sysd)");
    g.expect("sysd killed by signal SIGKILL", SETTLE);
    // Every service is adopted, the bridge ones only once their place on the bridge is
    // taken back (`endpoint: ... (kept)` comes first).
    g.expect("sysd: bweb: adopted: pid", SETTLE);
    let after = wait_until(&g, "services after the sysd restart", SETTLE, |l| {
        LONG_RUNNING
            .iter()
            .all(|n| service(l, n)["state"] == "running")
    });
    // The new sysd adopted them (issue 21): the same containers, not new instances.
    let serial = g.serial_log();
    assert!(
        serial
            .lines()
            .any(|l| l.contains("endpoint: bweb: ") && l.contains("(kept)")),
        "bweb's endpoint was not taken back"
    );
    assert!(
        !serial.contains("adopt-refused"),
        "a service was refused adoption"
    );
    for name in ["web", "counter", "db", "bweb"] {
        assert_eq!(
            service(&after, name)["pid"],
            service(&before, name)["pid"],
            "{name} was restarted instead of adopted"
        );
    }
    // One instance per service: the container inits, children of sysd (started by it) or of
    // init (adopted: reparented to PID 1 when the old sysd died), by cgroup leaf.
    let out = g.sh("S=$(pidof sysd); for p in /proc/[0-9]*; do pp=$(cut -d' ' -f4 $p/stat 2>/dev/null); { [ \"$pp\" = \"$S\" ] || [ \"$pp\" = 1 ]; } && sed 's|.*/||' $p/cgroup; done | sort | uniq -c",
    );
    // (The test shell itself sits at the root of its own cgroup namespace, so it is not named.)
    for name in ["web", "counter", "db", "app", "worker", "flusher"] {
        let count = out
            .lines()
            .find(|l| l.split_whitespace().nth(1) == Some(name))
            .and_then(|l| l.split_whitespace().next())
            .unwrap_or_else(|| panic!("no instance of {name}: {out}"));
        assert_eq!(count, "1", "{name} runs {count} times: {out}");
    }
    let initial_stops = g
        .sh("cat /flush/stops 2>/dev/null | wc -l")
        .trim()
        .to_string();

    // Power-off: every service gets its stop signal; the flusher writes to /var.
    g.powerdown().unwrap();
    g.expect("sysd: flusher: stopped: exited with status 0", SETTLE);
    // `plain` (sleep, no SIGTERM handler) runs under sysd's init: TERM ends it, no SIGKILL;
    // adopted, its status comes from init.
    // (Either may stop first: look through the whole console.)
    g.wait_for_from_start("sysd: plain: stopped: exited with status 143", SETTLE)
        .unwrap_or_else(|e| panic!("{e}"));
    let console = g.serial_log();
    assert!(!console.contains("sysd: plain: killing"), "{console}");
    g.expect("shutdown: /var unmounted cleanly", SETTLE);
    let console = g.serial_log();
    assert!(
        console.contains("sysd: shutdown: all services stopped"),
        "{console}"
    );
    g.wait_exit(SETTLE).unwrap();
    drop(g);

    let g = boot(&disk);
    g.expect("sysd: testshell: ready", BOOT);
    let stops = g.sh("cat /flush/stops | wc -l");
    let n: usize = stops.trim().parse().unwrap_or(0);
    let before: usize = initial_stops.parse().unwrap_or(0);
    assert_eq!(
        n,
        before + 1,
        "flusher's stop record did not survive the reboot: {stops}"
    );
}
