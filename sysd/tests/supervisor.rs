//! Host integration tests of the supervisor: a real sysd (the built binary) with real
//! containers from a busybox root file system, driven through its HTTP API on a unix socket,
//! as keelctl drives it.
//!
//! Each test starts its own sysd in a private mount namespace (`unshare -m`) with cgroup2
//! mounted at /sys/fs/cgroup (these hosts have a hybrid v1 layout), its own cgroup parent,
//! state, log and volume directories, and TCP ports of its own on the host network. They need
//! root and busybox-static (installed by `./dev deps`) and fail without them.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::Duration;

use keelson_testkit::daemon::Daemon;
use keelson_testkit::{busybox, cgroup};
use serde_json::Value;

const SYSD: &str = env!("CARGO_BIN_EXE_sysd");
static PORTS: AtomicU16 = AtomicU16::new(0);

/// A free-ish TCP port range per test (process id spreads parallel runs apart).
fn port() -> u16 {
    let base = 20_000 + (std::process::id() % 2000) as u16 * 10;
    base + PORTS.fetch_add(1, Ordering::SeqCst)
}

struct Sysd {
    daemon: Daemon,
    dir: tempfile::TempDir,
}

impl Sysd {
    /// A sysd whose system services are `system` (the TOML text; `ROOTFS` is replaced by the
    /// busybox root file system path).
    fn start(system: &str) -> Option<Sysd> {
        Sysd::start_with(system, false)
    }

    /// [`Sysd::start`], under init's supervision when `under_init` (the FD store, orphan
    /// exits, restarts: `keelson-init supervise`).
    fn start_with(system: &str, under_init: bool) -> Option<Sysd> {
        // Fail, never skip: `./dev test` runs as root and installs busybox-static.
        // SAFETY: geteuid has no preconditions.
        let euid = unsafe { libc::geteuid() };
        assert_eq!(
            euid, 0,
            "these tests need root (./dev test runs them as root)"
        );
        assert!(
            Path::new("/bin/busybox").exists(),
            "/bin/busybox missing: apt-get install busybox-static (./dev deps)"
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let rootfs = dir.path().join("rootfs");
        busybox::rootfs(&rootfs).expect("busybox rootfs");
        let d = dir.path().display().to_string();
        let mut daemon = Daemon::new(
            SYSD,
            dir.path(),
            Daemon::cgroup_parent_for("sv", dir.path()),
        )
        .args([
            "--userdata-config".to_string(),
            format!("{d}/var/user-data.toml"),
            "--no-firstboot".to_string(),
        ]);
        if under_init {
            daemon = daemon.under_init(keelson_testkit::daemon::init_exe());
        }
        std::fs::write(
            dir.path().join("system/10-test.toml"),
            system.replace("ROOTFS", &rootfs.display().to_string()),
        )
        .expect("write system config");
        daemon.start(Duration::from_secs(60));
        Some(Sysd { daemon, dir })
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn rootfs(&self) -> String {
        self.path("rootfs").display().to_string()
    }

    fn log(&self) -> String {
        self.daemon.log()
    }

    /// One HTTP request; returns status and body.
    fn request(&self, method: &str, path: &str, body: &str) -> (u16, String) {
        self.daemon.request(method, path, body)
    }

    fn json(&self, method: &str, path: &str) -> Value {
        let (status, body) = self.request(method, path, "");
        assert!(status < 300, "{method} {path}: {status} {body}");
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: {e}: {body}"))
    }

    fn service(&self, name: &str) -> Value {
        self.json("GET", &format!("/v1/services/{name}"))
    }

    fn state(&self, name: &str) -> String {
        self.service(name)["state"]
            .as_str()
            .unwrap_or("")
            .to_string()
    }

    fn wait_until(&self, what: &str, mut ok: impl FnMut() -> bool) {
        self.daemon
            .wait_until(what, Duration::from_secs(60), |_| ok());
    }

    fn wait_state(&self, name: &str, state: &str) -> Value {
        self.wait_until(&format!("{name} to be {state}"), || {
            self.state(name) == state
        });
        self.service(name)
    }

    /// Events so far (the stream is read until it has been quiet for a moment).
    fn events(&self) -> Vec<Value> {
        self.daemon.events()
    }

    fn event_index(events: &[Value], service: &str, kind: &str) -> Option<usize> {
        events
            .iter()
            .position(|e| e["service"] == service && e["kind"] == kind)
    }

    /// Container inits running under this sysd's cgroup parent, per service.
    fn running_instances(&self, service: &str) -> usize {
        cgroup::procs(self.daemon.cgroup_parent(), service)
    }

    fn terminate(&mut self) {
        self.daemon.terminate();
    }
}

#[test]
fn dependencies_oneshots_readiness_and_a_failing_service() {
    let p = port();
    let Some(sysd) = Sysd::start(&format!(
        r#"version = 1
[services.db]
image = "ROOTFS"
command = ["sh", "-c", "sleep 1; exec nc -ll -p {p} -e cat"]
ready = {{ tcp = "127.0.0.1:{p}", interval = "200ms", retries = 50 }}

[services.migrate]
image = "ROOTFS"
kind = "oneshot"
command = ["sh", "-c", "echo migrating; sleep 1"]

[services.app]
image = "ROOTFS"
command = ["sh", "-c", "echo app up as $(id -u):$(id -g); exec sleep 1000"]
requires = ["db", "migrate"]
user = "nobody"

[services.worker]
image = "ROOTFS"
command = ["sleep", "1000"]
after = ["app"]
critical = true

[services.standby]
image = "ROOTFS"
command = ["sleep", "1000"]
critical = true
enabled = false

[services.broken]
image = "ROOTFS"
command = ["/bin/does-not-exist"]
restart = "on-failure"
max_retries = 2

[services.noimage]
image = "/nonexistent/image"
command = ["true"]

[services.waiting]
image = "ROOTFS"
command = ["sleep", "1000"]
ready = {{ tcp = "127.0.0.1:{q}", interval = "200ms", start_period = "10m" }}
"#,
        q = port()
    )) else {
        return;
    };
    sysd.wait_state("worker", "running");
    assert_eq!(sysd.state("migrate"), "completed");
    let events = sysd.events();
    let at = |s: &str, k: &str| {
        Sysd::event_index(&events, s, k).unwrap_or_else(|| panic!("no {s} {k} in {events:#?}"))
    };
    assert!(
        at("db", "ready") < at("app", "started"),
        "app started before db was ready"
    );
    assert!(
        at("migrate", "completed") < at("app", "started"),
        "app started before migrate completed"
    );
    assert!(at("app", "ready") < at("worker", "started"));
    // Not ready yet, in its start period: still starting, and `ps` says why.
    let waiting = sysd.service("waiting");
    assert_eq!(waiting["state"], "starting", "{waiting}");
    let why = waiting["reason"].as_str().unwrap_or_default();
    assert!(
        why.starts_with("readiness check failing (start period, not counted): "),
        "{waiting}"
    );
    // Critical means the update health gate waits for it, which it does not for a disabled
    // service.
    assert_eq!(sysd.service("worker")["critical"], true);
    let standby = sysd.service("standby");
    assert_eq!(standby["critical"], false, "{standby}");
    assert_eq!(standby["state"], "stopped", "{standby}");

    // The program is missing: a clear reason, retried with backoff, then failed for good.
    let broken = sysd.wait_state("broken", "failed");
    let reason = broken["reason"].as_str().unwrap();
    assert!(
        reason.contains("/bin/does-not-exist") && reason.contains("gave up after 2 retries"),
        "{reason}"
    );
    assert_eq!(broken["restarts"], 2);
    // The image is missing: in backoff with the reason, retried forever (restart = always).
    sysd.wait_until("noimage to retry", || {
        sysd.service("noimage")["restarts"].as_u64().unwrap_or(0) >= 2
    });
    let noimage = sysd.service("noimage");
    assert!(
        noimage["reason"]
            .as_str()
            .unwrap()
            .contains("/nonexistent/image"),
        "{noimage}"
    );
    // The others did not notice.
    for s in ["db", "app", "worker"] {
        assert_eq!(sysd.state(s), "running", "{s}");
        assert_eq!(sysd.service(s)["restarts"], 0, "{s}");
    }
    // Logs: captured, timestamped, in memory and on disk.
    let (status, logs) = sysd.request("GET", "/v1/services/app/logs", "");
    assert_eq!(status, 200);
    assert!(logs.contains("app up as 65534:65534"), "{logs}");
    let file = std::fs::read_to_string(sysd.path("var/log/app.log")).unwrap();
    assert!(file.contains(" stdout app up as 65534:65534"), "{file}");
    let (status, body) = sysd.request("GET", "/v1/services/nope", "");
    assert_eq!(status, 404, "{body}");
}

#[test]
fn kill_restarts_health_failure_restarts_and_requires_follows() {
    let p = port();
    let Some(sysd) = Sysd::start(&format!(
        r#"version = 1
[services.db]
image = "ROOTFS"
command = ["nc", "-ll", "-p", "{p}", "-e", "cat"]
ready = {{ tcp = "127.0.0.1:{p}", interval = "200ms" }}
stop_timeout = "1s"

[services.app]
image = "ROOTFS"
command = ["sleep", "1000"]
requires = ["db"]
stop_timeout = "1s"

[services.flaky]
image = "ROOTFS"
command = ["sh", "-c", "touch /tmp/ok; sleep 2; rm /tmp/ok; exec sleep 1000"]
health = {{ exec = ["test", "-f", "/tmp/ok"], interval = "300ms", retries = 2 }}
"#
    )) else {
        return;
    };
    let before = sysd.wait_state("app", "running");
    let pid = before["pid"].as_i64().unwrap() as i32;
    // SAFETY: killing a container init of this test's sysd.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    sysd.wait_until("app to restart", || {
        let s = sysd.service("app");
        s["restarts"] == 1 && s["state"] == "running"
    });
    let app = sysd.service("app");
    assert_ne!(app["pid"].as_i64().unwrap() as i32, pid);
    assert_eq!(app["last_exit"]["signal"], 9);
    let events = sysd.events();
    assert!(
        events.iter().any(|e| e["service"] == "app"
            && e["kind"] == "restarting"
            && e["message"].as_str().unwrap().contains("SIGKILL")),
        "{events:#?}"
    );

    sysd.wait_until("flaky to be restarted as unhealthy", || {
        sysd.service("flaky")["restarts"].as_u64().unwrap_or(0) >= 1
    });
    let events = sysd.events();
    let unhealthy = events
        .iter()
        .find(|e| e["service"] == "flaky" && e["kind"] == "unhealthy")
        .expect("unhealthy event");
    assert!(
        unhealthy["message"]
            .as_str()
            .unwrap()
            .contains("health check failed 2 times"),
        "{unhealthy}"
    );

    // Stopping a required service stops its dependents; starting it brings them back.
    let (status, _) = sysd.request("POST", "/v1/services/db/stop", "");
    assert_eq!(status, 200);
    sysd.wait_state("app", "waiting");
    let (status, _) = sysd.request("POST", "/v1/services/db/start", "");
    assert_eq!(status, 200);
    sysd.wait_state("app", "running");
}

#[test]
fn apply_restarts_only_what_changed_and_rejects_bad_config_whole() {
    let Some(sysd) = Sysd::start(
        "version = 1\n[services.base]\nimage = \"ROOTFS\"\ncommand = [\"sleep\", \"1000\"]\n",
    ) else {
        return;
    };
    let root = sysd.rootfs();
    let user = |cmd_b: &str| {
        format!(
            "version = 1\n[services.a]\nimage = \"{root}\"\ncommand = [\"sleep\", \"1000\"]\n\n[services.b]\nimage = \"{root}\"\ncommand = [\"sleep\", \"{cmd_b}\"]\nstop_timeout = \"1s\"\n"
        )
    };
    let (status, body) = sysd.request("POST", "/v1/apply", &user("1000"));
    assert_eq!(status, 200, "{body}");
    let a = sysd.wait_state("a", "running");
    let b = sysd.wait_state("b", "running");
    let base = sysd.wait_state("base", "running");

    let (status, body) = sysd.request("POST", "/v1/apply?dry_run=1", &user("2000"));
    assert_eq!(status, 200, "{body}");
    let plan: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(plan["restart"], serde_json::json!(["b"]));
    assert_eq!(plan["unchanged"], serde_json::json!(["a", "base"]));
    assert_eq!(
        sysd.service("b")["pid"],
        b["pid"],
        "a dry run changed something"
    );

    let (status, body) = sysd.request("POST", "/v1/apply", &user("2000"));
    assert_eq!(status, 200, "{body}");
    sysd.wait_until("b to restart with the new spec", || {
        let s = sysd.service("b");
        s["state"] == "running" && s["pid"] != b["pid"]
    });
    assert_eq!(sysd.service("a")["pid"], a["pid"], "a was restarted");
    assert_eq!(
        sysd.service("base")["pid"],
        base["pid"],
        "base was restarted"
    );

    // Invalid: rejected whole, naming position, service and field; nothing changes.
    let stored = std::fs::read_to_string(sysd.path("var/services.toml")).unwrap();
    let bad = format!("{}\n[services.c]\nimage = \"{root}\"\ncommand = [\"true\"]\nresources = {{ cpu_weight = 0 }}\n", user("3000"));
    let (status, body) = sysd.request("POST", "/v1/apply", &bad);
    assert_eq!(status, 400);
    assert!(
        body.contains(":11:1: service `c`: resources.cpu_weight: must be between 1 and 10000"),
        "{body}"
    );
    let (status, body) = sysd.request(
        "POST",
        "/v1/apply",
        "version = 1\n[services.base]\nimage = \"/x\"\n",
    );
    assert_eq!(status, 400);
    assert!(body.contains("service `base` is already defined"), "{body}");
    assert_eq!(
        std::fs::read_to_string(sysd.path("var/services.toml")).unwrap(),
        stored
    );
    assert!(sysd
        .json("GET", "/v1/services")
        .as_array()
        .unwrap()
        .iter()
        .all(|s| s["name"] != "c"));

    // Removing a service stops it.
    let (status, body) = sysd.request(
        "POST",
        "/v1/apply",
        &format!(
            "version = 1\n[services.a]\nimage = \"{root}\"\ncommand = [\"sleep\", \"1000\"]\n"
        ),
    );
    assert_eq!(status, 200, "{body}");
    let (status, _) = sysd.request("GET", "/v1/services/b", "");
    assert_eq!(status, 404);
    assert_eq!(sysd.service("a")["pid"], a["pid"]);
}

#[test]
fn a_killed_sysd_comes_back_without_duplicates_and_stops_gracefully() {
    let Some(mut sysd) = Sysd::start(
        "version = 1\n[services.one]\nimage = \"ROOTFS\"\ncommand = [\"sleep\", \"1000\"]\nstop_timeout = \"1s\"\n\n[services.flusher]\nimage = \"ROOTFS\"\ncommand = [\"sh\", \"-c\", \"trap 'echo flushed > /data/stopped; exit 0' TERM; while :; do sleep 0.2; done\"]\nmounts = [{ type = \"volume\", source = \"flush\", target = \"/data\" }]\n",
    ) else {
        return;
    };
    let first = sysd.wait_state("one", "running");
    sysd.wait_state("flusher", "running");
    // Killed the way a crash would end it.
    sysd.daemon.kill();
    // Each container left its adoption record; flusher's is made unreadable (bad input).
    let mut corrupted = false;
    for b in std::fs::read_dir(sysd.path("run/runtime/bundles"))
        .unwrap()
        .flatten()
    {
        let config = std::fs::read_to_string(b.path().join("config.json")).unwrap_or_default();
        assert!(
            b.path().join("adopt.json").is_file(),
            "{}",
            b.path().display()
        );
        if config.contains("\"org.keelson.service\": \"flusher\"") {
            std::fs::write(b.path().join("adopt.json"), "{\"pid\": ").unwrap();
            corrupted = true;
        }
    }
    assert!(corrupted, "flusher's bundle");
    sysd.daemon.start(Duration::from_secs(60));
    sysd.wait_until("one to run again", || {
        sysd.state("one") == "running" && sysd.service("one")["pid"] != first["pid"]
    });
    sysd.wait_state("flusher", "running");
    assert!(
        sysd.log()
            .contains("removed what a previous sysd left: container one"),
        "{}",
        sysd.log()
    );
    // Without init nothing kept the log pipes, so nothing is adopted, and it says why; the
    // corrupt record is named.
    let events = sysd.events();
    let refused = |svc: &str| {
        events
            .iter()
            .find(|e| e["service"] == svc && e["kind"] == "adopt-refused")
            .map(|e| e["message"].as_str().unwrap_or_default().to_owned())
            .unwrap_or_default()
    };
    assert!(
        refused("one").contains("did not come back from init"),
        "{events:?}"
    );
    assert!(
        refused("flusher").contains("adopt.json")
            && refused("flusher").contains("not an adoption record"),
        "{events:?}"
    );
    // Exactly one instance of each, and the old init is gone.
    assert_eq!(sysd.running_instances("one"), 1);
    let old = first["pid"].as_i64().unwrap() as i32;
    assert!(
        !Path::new(&format!("/proc/{old}")).exists()
            || std::fs::read_to_string(format!("/proc/{old}/stat"))
                .map(|s| s.contains(") Z "))
                .unwrap_or(true)
    );

    sysd.terminate();
    assert_eq!(
        std::fs::read_to_string(sysd.path("var/volumes/flush/stopped")).unwrap(),
        "flushed\n"
    );
    assert!(sysd.log().contains("sysd: stopped"), "{}", sysd.log());
}

#[test]
fn with_init_a_program_that_ignores_sigterm_as_pid_1_still_stops_on_sigterm() {
    let Some(sysd) = Sysd::start(
        "version = 1\n[services.plain]\nimage = \"ROOTFS\"\ncommand = [\"sleep\", \"100000\"]\ninit = true\nstop_timeout = \"60s\"\n",
    ) else {
        return;
    };
    // The init is sysd's own binary, mounted into the container: it must be static (it is in
    // the image; the QEMU power-off scenario covers it there). A debug build is not, and then
    // the start fails with a clear reason.
    sysd.wait_until("plain to start or fail", || {
        matches!(sysd.state("plain").as_str(), "running" | "backoff")
    });
    let plain = sysd.service("plain");
    if plain["state"] == "backoff" {
        let reason = plain["reason"].as_str().unwrap_or("");
        assert!(reason.contains("needs a statically linked sysd"), "{plain}");
        eprintln!("skipping the signal check: {SYSD} is dynamically linked");
        return;
    }
    let (status, body) = sysd.request("POST", "/v1/services/plain/stop", "");
    assert_eq!(status, 200, "{body}");
    let plain = sysd.service("plain");
    assert_eq!(plain["state"], "stopped");
    let events = sysd.events();
    assert!(
        events.iter().any(|e| e["service"] == "plain"
            && e["kind"] == "stopped"
            && e["message"] == "exited with status 143"),
        "{events:#?}"
    );
    assert!(
        !events
            .iter()
            .any(|e| e["service"] == "plain" && e["kind"] == "killing"),
        "the stop timeout's SIGKILL was needed: {events:#?}"
    );
}

#[test]
fn a_service_network_shares_the_other_services_namespace_and_follows_its_restarts() {
    let p = port();
    let Some(sysd) = Sysd::start(&format!(
        r#"version = 1
[services.a]
image = "ROOTFS"
command = ["nc", "-ll", "-p", "{p}", "-e", "echo", "hi"]
network = "none"
ready = {{ tcp = "127.0.0.1:{p}", interval = "200ms", retries = 50 }}
stop_timeout = "1s"

[services.b]
image = "ROOTFS"
command = ["sh", "-c", "echo got $(nc 127.0.0.1 {p} </dev/null); exec sleep 1000"]
network = "service:a"
stop_timeout = "1s"

[services.c]
image = "ROOTFS"
command = ["sh", "-c", "echo alone $(nc 127.0.0.1 {p} </dev/null 2>&1); exec sleep 1000"]
network = "none"
stop_timeout = "1s"
"#
    )) else {
        return;
    };
    let netns = |pid: i64| std::fs::read_link(format!("/proc/{pid}/ns/net")).expect("ns link");
    let a = sysd.wait_state("a", "running");
    let b = sysd.wait_state("b", "running");
    let c = sysd.wait_state("c", "running");
    let (a_pid, b_pid) = (a["pid"].as_i64().unwrap(), b["pid"].as_i64().unwrap());
    assert_eq!(netns(a_pid), netns(b_pid), "b is not in a's namespace");
    assert_ne!(netns(a_pid), netns(c["pid"].as_i64().unwrap()));
    assert_ne!(
        netns(a_pid),
        std::fs::read_link("/proc/self/ns/net").unwrap()
    );
    sysd.wait_until("b to reach a on 127.0.0.1", || {
        sysd.request("GET", "/v1/services/b/logs", "")
            .1
            .contains("got hi")
    });
    // c, on a private network of its own, does not reach a's listener.
    sysd.wait_until("c to try", || {
        sysd.request("GET", "/v1/services/c/logs", "")
            .1
            .contains("alone")
    });
    assert!(!sysd
        .request("GET", "/v1/services/c/logs", "")
        .1
        .contains("hi"));
    let events = sysd.events();
    assert!(
        Sysd::event_index(&events, "a", "ready").unwrap()
            < Sysd::event_index(&events, "b", "started").unwrap()
    );

    // a's container goes away: b follows it into its new namespace.
    // SAFETY: killing a container init of this test's sysd.
    unsafe { libc::kill(a_pid as i32, libc::SIGKILL) };
    sysd.wait_until("a and b to run again, together", || {
        let (a, b) = (sysd.service("a"), sysd.service("b"));
        a["state"] == "running"
            && b["state"] == "running"
            && a["pid"].as_i64() != Some(a_pid)
            && b["pid"].as_i64() != Some(b_pid)
            && netns(a["pid"].as_i64().unwrap()) == netns(b["pid"].as_i64().unwrap())
    });

    // Stopping a stops b; starting a brings b back.
    let (status, _) = sysd.request("POST", "/v1/services/a/stop", "");
    assert_eq!(status, 200);
    sysd.wait_state("b", "waiting");
    let (status, _) = sysd.request("POST", "/v1/services/a/start", "");
    assert_eq!(status, 200);
    sysd.wait_state("b", "running");
}

/// The N of every `line N` in `text`, in order.
fn numbered_lines(text: &str) -> Vec<u64> {
    text.split("line ")
        .skip(1)
        .filter_map(|rest| {
            let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
            digits.parse().ok()
        })
        .collect()
}

#[test]
fn under_init_a_killed_sysd_adopts_running_services_and_loses_no_log_line() {
    let Some(mut sysd) = Sysd::start_with(
        "version = 1\n\
         [services.talker]\nimage = \"ROOTFS\"\ncommand = [\"sh\", \"-c\", \"i=0; while :; do i=$((i+1)); echo line $i; sleep 0.02; done\"]\n\n\
         [services.steady]\nimage = \"ROOTFS\"\ncommand = [\"sleep\", \"1000\"]\nstop_timeout = \"1s\"\nhealth = { exec = [\"true\"], interval = \"1s\" }\n\n\
         [services.quitter]\nimage = \"ROOTFS\"\ncommand = [\"sleep\", \"1000\"]\nrestart = \"always\"\nstop_timeout = \"1s\"\n",
        true,
    ) else {
        return;
    };
    // 0 while it has none (between instances).
    let pid_of = |s: &Sysd, name: &str| s.service(name)["pid"].as_i64().unwrap_or(0) as i32;
    // The API socket's file: a container that bind-mounts it keeps reaching sysd only if a
    // restarted sysd serves the same one (init keeps the listener too).
    let socket_inode = || {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(sysd.path("run/sysd.sock")).unwrap().ino()
    };
    let api_socket = socket_inode();
    for name in ["talker", "steady", "quitter"] {
        sysd.wait_state(name, "running");
    }
    sysd.wait_until("steady to be healthy", || {
        sysd.service("steady")["health"] == "healthy"
    });
    let (talker, steady, quitter) = (
        pid_of(&sysd, "talker"),
        pid_of(&sysd, "steady"),
        pid_of(&sysd, "quitter"),
    );

    // A crash; while no sysd runs (init restarts it after 200 ms), quitter's container dies.
    let old = sysd.daemon.kill_sysd().expect("sysd's pid");
    while Path::new(&format!("/proc/{old}")).exists() {
        std::thread::sleep(Duration::from_millis(1));
    }
    // SAFETY: kill(2) with integer arguments, on the container init the API reported.
    unsafe { libc::kill(quitter, libc::SIGKILL) };
    sysd.daemon
        .wait_until("init to restart sysd", Duration::from_secs(30), |d| {
            d.pid().is_some_and(|p| p != old) && d.try_request("GET", "/v1/services", "").is_ok()
        });
    sysd.wait_until("quitter to run again", || {
        sysd.state("quitter") == "running" && pid_of(&sysd, "quitter") != quitter
    });
    assert_eq!(socket_inode(), api_socket, "the API socket was replaced");
    // Adopted, not restarted: same pids, no start of them in this sysd's events.
    assert_eq!(pid_of(&sysd, "talker"), talker);
    assert_eq!(pid_of(&sysd, "steady"), steady);
    assert_eq!(sysd.state("talker"), "running");
    let events = sysd.events();
    for name in ["talker", "steady"] {
        assert!(
            Sysd::event_index(&events, name, "adopted").is_some(),
            "{events:?}"
        );
        for kind in ["started", "stopped", "restarting", "cleanup"] {
            assert!(
                Sysd::event_index(&events, name, kind).is_none(),
                "{name} {kind}: {events:?}"
            );
        }
    }
    // quitter's end, told by init, went to its restart policy.
    let i = Sysd::event_index(&events, "quitter", "exited-unsupervised")
        .unwrap_or_else(|| panic!("quitter's exit: {events:#?}\n{}", sysd.log()));
    assert!(
        events[i]["message"].as_str().unwrap().contains("signal 9"),
        "{events:?}"
    );
    assert_eq!(sysd.service("quitter")["restarts"], 1);
    // Health checks resumed on the adopted container.
    sysd.wait_until("steady's health checks to resume", || {
        sysd.service("steady")["health"] == "healthy"
    });
    // The log kept flowing through the gap: every line is on disk, in order, once.
    std::thread::sleep(Duration::from_millis(500));
    let file = std::fs::read_to_string(sysd.path("var/log/talker.log")).unwrap();
    let numbers = numbered_lines(&file);
    assert!(numbers.len() > 20, "{file}");
    assert!(
        numbers.windows(2).all(|w| w[1] == w[0] + 1) && numbers[0] == 1,
        "a gap or a repeat in talker's log: {numbers:?}"
    );
    // And in the new sysd's memory (`keelctl logs`): the lines written during the gap.
    let fresh = numbered_lines(
        &sysd
            .request("GET", "/v1/services/talker/logs?tail=1000", "")
            .1,
    );
    assert!(
        fresh.first().is_some_and(|n| numbers.contains(n)),
        "{fresh:?}"
    );

    // Evidence that disagrees is refused, and only the container's cgroup is killed: steady's
    // config changes, talker's record names a process that is not its container.
    let mut bystander = std::process::Command::new("sleep")
        .arg("60")
        .spawn()
        .unwrap();
    for b in std::fs::read_dir(sysd.path("run/runtime/bundles"))
        .unwrap()
        .flatten()
    {
        if b.file_name() == "talker" {
            let path = b.path().join("adopt.json");
            let mut r: Value =
                serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
            r["pid"] = bystander.id().into();
            std::fs::write(&path, r.to_string()).unwrap();
        }
    }
    let config = std::fs::read_to_string(sysd.path("system/10-test.toml")).unwrap();
    std::fs::write(
        sysd.path("system/10-test.toml"),
        config.replace(
            "[\"sleep\", \"1000\"]\nstop_timeout = \"1s\"\nhealth",
            "[\"sleep\", \"1001\"]\nstop_timeout = \"1s\"\nhealth",
        ),
    )
    .unwrap();
    let old = sysd.daemon.kill_sysd().expect("sysd's pid");
    sysd.daemon
        .wait_until("init to restart sysd", Duration::from_secs(30), |d| {
            d.pid().is_some_and(|p| p != old) && d.try_request("GET", "/v1/services", "").is_ok()
        });
    sysd.wait_until("talker and steady to run again, fresh", || {
        sysd.state("talker") == "running"
            && sysd.state("steady") == "running"
            && pid_of(&sysd, "talker") != talker
            && pid_of(&sysd, "steady") != steady
    });
    let events = sysd.events();
    let refused = |svc: &str| {
        events
            .iter()
            .find(|e| e["service"] == svc && e["kind"] == "adopt-refused")
            .map(|e| e["message"].as_str().unwrap_or_default().to_owned())
            .unwrap_or_default()
    };
    assert!(refused("steady").contains("config changed"), "{events:?}");
    assert!(refused("talker").contains("was reused"), "{events:?}");
    // quitter's new container was adopted this time.
    assert!(
        Sysd::event_index(&events, "quitter", "adopted").is_some(),
        "{events:?}"
    );
    // The bystander was never touched; the old containers are gone, nothing runs twice.
    assert!(
        bystander.try_wait().unwrap().is_none(),
        "the bystander was killed"
    );
    let _ = bystander.kill();
    let _ = bystander.wait();
    for name in ["steady", "quitter"] {
        assert_eq!(sysd.running_instances(name), 1, "{name}");
    }
    for old in [talker, steady] {
        let stat = std::fs::read_to_string(format!("/proc/{old}/stat")).unwrap_or_default();
        assert!(
            stat.is_empty() || stat.contains(") Z "),
            "{old} still runs: {stat}"
        );
    }
    sysd.terminate();
    assert!(sysd.log().contains("sysd: stopped"), "{}", sysd.log());
}

/// `GET /v1/boot`: init's record (the real init's lines, recorded as PID 1 records them) and
/// each service's start on the same clock, in dependency order, then all services ready; a
/// record that does not read is an error naming its line.
#[test]
fn boot_timeline_has_init_steps_and_services_in_dependency_order() {
    use keelson_common::api::boot::{self, Boot};
    let p = port();
    let tmp = tempfile::tempdir().expect("tempdir");
    let record = tmp.path().join("init.log");
    let record_s = record.display().to_string();
    let dir = tempfile::tempdir().expect("tempdir");
    let rootfs = dir.path().join("rootfs");
    busybox::rootfs(&rootfs).expect("busybox rootfs");
    let mut daemon = Daemon::new(
        SYSD,
        dir.path(),
        Daemon::cgroup_parent_for("bt", dir.path()),
    )
    .under_init(keelson_testkit::daemon::init_exe())
    .env("KEELSON_INIT_LOG", &record_s)
    .args([
        "--no-firstboot".to_string(),
        "--init-log".into(),
        record_s.clone(),
    ]);
    std::fs::write(
        dir.path().join("system/10-test.toml"),
        format!(
            r#"version = 1
[services.db]
image = "{r}"
command = ["sh", "-c", "sleep 1; exec nc -ll -p {p} -e cat"]
ready = {{ tcp = "127.0.0.1:{p}", interval = "100ms", retries = 100 }}

[services.migrate]
image = "{r}"
kind = "oneshot"
command = ["true"]

[services.web]
image = "{r}"
command = ["sleep", "1000"]
requires = ["db", "migrate"]

[services.standby]
image = "{r}"
command = ["sleep", "1000"]
enabled = false
"#,
            r = rootfs.display()
        ),
    )
    .expect("write system config");
    daemon.start(Duration::from_secs(60));
    let fetch = || -> Boot {
        let (status, body) = daemon.request("GET", "/v1/boot", "");
        assert_eq!(status, 200, "{body}");
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"))
    };
    daemon.wait_until("all services ready", Duration::from_secs(60), |_| {
        fetch().all_ready_us.is_some()
    });
    let b = fetch();
    // init's own lines, from its record.
    let started = b.mark("stage2: sysd started").expect("sysd started line");
    let complete = b.boot_complete_us().expect("boot complete line");
    assert!(started.at_us <= complete, "{:?}", b.init);
    let svc = |name: &str| b.services.iter().find(|s| s.name == name).cloned().unwrap();
    let (db, migrate, web) = (svc("db"), svc("migrate"), svc("web"));
    for s in [&db, &migrate, &web] {
        let (Some(a), Some(st), Some(r)) = (s.starting_us, s.started_us, s.ready_us) else {
            panic!("{s:?} in {b:#?}\n{}", daemon.log());
        };
        assert!(started.at_us <= a && a <= st && st <= r, "{s:?}");
    }
    // db takes a second to listen: web, which requires it, starts after it is ready.
    assert!(
        db.ready_us.unwrap() >= db.started_us.unwrap() + 900_000,
        "{db:?}"
    );
    assert!(
        web.starting_us.unwrap() >= db.ready_us.unwrap(),
        "{web:?} {db:?}"
    );
    assert!(web.starting_us.unwrap() >= migrate.ready_us.unwrap());
    assert_eq!(web.after, vec!["db".to_string(), "migrate".to_string()]);
    let standby = svc("standby");
    assert_eq!(
        (standby.starting_us, standby.state),
        (None, Some(keelson_common::api::State::Stopped))
    );
    let all = b.all_ready_us.unwrap();
    assert!(all >= web.ready_us.unwrap() && all <= b.now_us);
    assert!(daemon.events().iter().any(|e| e["kind"] == "boot-ready"
        && e["message"]
            .as_str()
            .unwrap_or("")
            .starts_with("all 3 service(s) ready")));
    // What keelctl renders from it: the chain runs web ← db ← sysd's start.
    let chain = boot::critical_chain(&b);
    let pos = |what: &str| {
        chain
            .find(what)
            .unwrap_or_else(|| panic!("{what} in {chain}"))
    };
    assert!(pos("all services ready") < pos("└─web @") && pos("└─web @") < pos("└─db @"));
    assert!(pos("└─db @") < pos("stage2: sysd started"), "{chain}");
    assert!(boot::blame(&b).contains("db [service]"));
    // sysd's console lines carry the same clock: the console alone gives the same times.
    let console = Boot::from_console(&daemon.log());
    let db2 = console.services.iter().find(|s| s.name == "db").unwrap();
    // (Two reads of the clock a few microseconds apart: the event's and the log line's.)
    let (r1, r2) = (db.ready_us.unwrap(), db2.ready_us.unwrap());
    assert!(r2 >= r1 && r2 - r1 < 50_000, "{r1} {r2}\n{}", daemon.log());
    // A crashed sysd, restarted by init, adopts the services and keeps their first times.
    let old = daemon.kill_sysd().expect("sysd's pid");
    daemon.wait_until("init to restart sysd", Duration::from_secs(60), |d| {
        d.pid().is_some_and(|p| p != old) && d.try_request("GET", "/v1/boot", "").is_ok()
    });
    daemon.wait_until("the services adopted", Duration::from_secs(60), |d| {
        d.events().iter().filter(|e| e["kind"] == "adopted").count() == 2
    });
    let again = fetch();
    let times = |b: &Boot| -> Vec<_> {
        b.services
            .iter()
            .map(|s| (s.name.clone(), s.starting_us, s.started_us, s.ready_us))
            .collect()
    };
    assert_eq!(times(&again), times(&b), "{again:#?}");
    assert_eq!(again.all_ready_us, b.all_ready_us);
    let starts = again
        .init
        .iter()
        .filter(|m| m.message.starts_with("stage2: sysd started"))
        .count();
    assert_eq!(starts, 2, "{:#?}", again.init);
    // A record that does not read: a 500 naming the file and the line.
    let mut text = std::fs::read_to_string(&record).unwrap();
    let line = text.lines().count() + 1;
    text.push_str("not a stamped line\n");
    std::fs::write(&record, text).unwrap();
    let (status, body) = daemon.request("GET", "/v1/boot", "");
    assert_eq!(status, 500, "{body}");
    assert!(
        body.contains(&format!("init.log: line {line}: no [seconds] stamp")),
        "{body}"
    );
    daemon.terminate();
}
