//! Docker Engine as a system extension (configs/extensions/docker.toml, docs/node-agent.md):
//! one TCG guest of the test image built with a trusted update root, whose first-boot user data
//! names a repository (busybox httpd in the guest's namespace, `10.0.2.2:8000` for the guest)
//! listing the docker extension, enables the extension and turns its `docker` service on. A
//! reference registry (Debian's `docker-registry`) in the same namespace (`10.0.2.2:5000`)
//! holds the pipeline's own OCI layout of the `base` image (busybox).
//!
//! Checked: the extension's kernel modules are loaded and its sysctls set on activation,
//! before dockerd starts; dockerd moves itself into a leaf of its delegated cgroup and its
//! containers nest below it; `docker run --rm` of the registry's image works; `docker run -d
//! -p 8088:80` answers from the test's namespace while the test image's own bridge service
//! (`bweb`, published on 8081, reached by name from `bclient`) keeps answering beside it;
//! dockerd given a bad flag crash-loops with backoff and `restarting` events while Keelson's
//! services stay up; stopping the service leaves no process of it running.
//!
//! The docker CLI is the extension's own, run in the docker service's mount namespace from the
//! test shell (`nsenter`), as an operator would from the admin container.
//!
//! `KEELSON_DOCKER_REUSE=1` reuses the images and repository of an earlier run in
//! `target/qemu-docker` (when complete).

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use keelson_testkit::registry::{Layout, Registry, RegistryOptions};
use qemu_tests::scenario::{fixture_dir, http_get_until, Httpd, SHELL_PORT};
use qemu_tests::update::Signing;
use qemu_tests::{create_overlay, DiskFormat, Guest, GuestBuilder};

/// Boot, the extension's download (~80 MB) and its activation, dockerd's first start.
const READY: Duration = Duration::from_secs(1500);
const REPO_PORT: u16 = 8000;
const REGISTRY_PORT: u16 = 5000;
/// The namespace's ports forwarded to the guest's 8088 (a docker container's published port;
/// the test image's `web` has 8080) and 8081 (bweb).
const DOCKER_APP: u16 = 18088;
const BWEB: u16 = 18081;

/// The image, the extension and the repository, built once per test process.
struct Fixture {
    image: PathBuf,
    repo: PathBuf,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let dir = fixture_dir("docker", build_fixture);
        Fixture {
            image: dir.join("0.1.0"),
            repo: dir.join("repo"),
        }
    })
}

fn build_fixture(dir: &Path) {
    let signing = Signing::for_scenario(dir);
    let img = signing.image("0.1.0", None, &[]);
    std::os::unix::fs::symlink(&img, dir.join("0.1.0")).unwrap();
    let ext = signing.extension("configs/extensions/docker.toml", "0.1.0");
    signing.add_with_extensions(&dir.join("repo"), &img, &[&ext]);
}

/// The test image's exercises for other scenarios, off here: they would only load the guest.
/// `testshell`, `timesync`, `web`, `db`, the bridge pair `bweb`/`bclient` and `plain` (the
/// engine layer's benchmark peer) stay.
const QUIET: [&str; 9] = [
    "counter", "hog", "flaky", "crasher", "isolated", "flusher", "app", "worker", "migrate",
];

fn user_data() -> String {
    user_data_for("10.0.2.2", &QUIET)
}

/// User data naming the repository and the registry at `host` (as the guest reaches the test's
/// namespace), with the services `quiet` off.
fn user_data_for(host: &str, quiet: &[&str]) -> String {
    format!(
        r#"version = 1

[update]
repository = "http://{host}:{REPO_PORT}/"

[extensions]
enabled = ["docker"]

[overrides.docker]
enabled = true

[overrides.docker.env]
DOCKERD_ARGS = "--insecure-registry {host}:{REGISTRY_PORT}"
{quiet}"#,
        quiet = quiet
            .iter()
            .map(|svc| format!("\n[overrides.{svc}]\nenabled = false\n"))
            .collect::<String>(),
    )
}

/// The docker service's state, as `state=…`.
const STATE: &str = "echo state=$(keelctl status docker | sed -n 's/^state: *//p')";

/// `up` once dockerd answers on its socket (the service has no readiness check: see its file).
const UP: &str = "nsenter -t $(pidof dockerd) -m -- docker -H unix:///run/docker.sock version >/dev/null 2>&1 && echo dockerd-up";

/// The docker CLI of the extension, in the docker service's mount namespace.
const DOCKER: &str = "nsenter -t $(pidof dockerd) -m -- docker -H unix:///run/docker.sock";

fn docker(g: &Guest, args: &str) -> String {
    g.sh(&format!("{DOCKER} {args}; echo rc=$?"))
}

/// Polls `script` in the guest's shell until its output contains `needle`.
fn until(g: &Guest, script: &str, needle: &str, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let out = g.sh(script);
        if out.contains(needle) {
            return out;
        }
        assert!(
            Instant::now() < deadline,
            "{script:?} never printed {needle:?}; last:\n{out}\n--- console ---\n{}",
            g.serial_tail(80)
        );
        std::thread::sleep(Duration::from_secs(3));
    }
}

fn bweb_answers(g: &Guest) {
    let body = http_get_until(
        g,
        SocketAddr::from((Ipv4Addr::LOCALHOST, BWEB)),
        "/",
        "hello from bweb",
    );
    assert!(body.contains("hello from bweb"), "{body}");
}

#[test]
fn dockerd_runs_as_an_extension_beside_keelson_services() {
    let f = fixture();
    let tmp = tempfile::tempdir().unwrap();
    let disk = tmp.path().join("disk.qcow2");
    create_overlay(&f.image.join("disk.raw"), &disk, Some(6 << 30)).unwrap();
    let ud = tmp.path().join("user-data.toml");
    std::fs::write(&ud, user_data()).unwrap();
    let started = Instant::now();
    let g = GuestBuilder::from_image_dir(&f.image)
        .unwrap()
        .disk_no_copy(&disk, DiskFormat::Qcow2)
        .memory_mib(2048)
        .forward_test_shell(SHELL_PORT)
        .forward(DOCKER_APP, 8088)
        .forward(BWEB, 8081)
        .fw_cfg("opt/keelson/user-data", &ud)
        .spawn()
        .unwrap();
    let _repo = Httpd::serve(
        g.netns(),
        SocketAddr::from((Ipv4Addr::LOCALHOST, REPO_PORT)),
        &f.repo,
    )
    .unwrap();
    let work = tmp.path().to_path_buf();
    let layout_dir = f.image.join("oci/base");
    let _registry = g.run_in_netns(move || {
        let reg = Registry::start(&work.join("reg"), REGISTRY_PORT, RegistryOptions::default());
        Layout::new(&layout_dir).push("base", &format!("{}/keelson/base:v1", reg.addr), None);
        reg
    });

    // Activation: the extension's modules and sysctls, then its services.
    g.expect("sysd: extension-active: docker 20.10.24-1", READY);
    eprintln!(
        "extension active after {:.0} s",
        started.elapsed().as_secs_f64()
    );
    let out = g.sh(
        "for m in br_netfilter vxlan ip_vs nft_compat xt_conntrack; do [ -d /sys/module/$m ] && echo loaded:$m; done; \
         cat /proc/sys/net/bridge/bridge-nf-call-iptables",
    );
    for m in [
        "br_netfilter",
        "vxlan",
        "ip_vs",
        "nft_compat",
        "xt_conntrack",
    ] {
        assert!(
            out.contains(&format!("loaded:{m}")),
            "{m} not loaded:\n{out}"
        );
    }
    assert!(
        out.trim_end().ends_with('1'),
        "bridge-nf-call-iptables:\n{out}"
    );

    until(
        &g,
        UP,
        "dockerd-up",
        READY.saturating_sub(started.elapsed()),
    );
    eprintln!(
        "dockerd ready after {:.0} s",
        started.elapsed().as_secs_f64()
    );
    let info = docker(
        &g,
        "info --format '{{.Driver}} {{.CgroupVersion}} {{.CgroupDriver}}'",
    );
    assert!(
        info.contains("overlay2 2 cgroupfs") && info.contains("rc=0"),
        "{info}"
    );
    // dockerd moved itself into a leaf of its delegated cgroup (paths as the test shell's own
    // cgroup namespace shows them: relative to /keelson/testshell).
    let cg = g.sh("cat /proc/$(pidof dockerd)/cgroup");
    assert!(cg.trim_end().ends_with("0::/../docker/init"), "{cg}");

    // A container from the test registry, run and removed.
    let t = Instant::now();
    let out = docker(
        &g,
        "run --rm 10.0.2.2:5000/keelson/base:v1 echo hello-from-docker",
    );
    assert!(
        out.contains("hello-from-docker") && out.contains("rc=0"),
        "{out}"
    );
    eprintln!(
        "first docker run --rm (pull included): {:.1} s",
        t.elapsed().as_secs_f64()
    );

    // What the engine layer costs here (printed, not asserted: TCG on a shared machine).
    let times = g.sh(&format!(
        "for i in 1 2 3; do a=$(cut -d' ' -f1 /proc/uptime); {DOCKER} run --rm 10.0.2.2:5000/keelson/base:v1 true; \
         b=$(cut -d' ' -f1 /proc/uptime); echo run-ms=$(awk \"BEGIN {{ print ($b - $a) * 1000 }}\"); done; \
         for p in sysd dockerd containerd; do echo rss-$p=$(sed -n 's/^VmRSS: *//p' /proc/$(pidof $p)/status); done"
    ));
    eprintln!("docker run --rm (image present) and RSS, TCG guest:\n{times}");
    assert_eq!(times.matches("run-ms=").count(), 3, "{times}");
    // The engine layer's cost: a container of a local image started on the host network until
    // it runs, by dockerd (`docker run -d` returns once it has started) and by sysd itself
    // (`keelctl start plain` until the API says running), 3 runs each in this guest, timed with
    // /proc/uptime. Printed, never asserted.
    let run_ms = |script: &str| -> f64 {
        let out = g.sh(&format!(
            "a=$(cut -d' ' -f1 /proc/uptime); {script}; \
             b=$(cut -d' ' -f1 /proc/uptime); echo took-ms=$(awk \"BEGIN {{ print ($b - $a) * 1000 }}\")"
        ));
        out.lines()
            .find_map(|l| l.strip_prefix("took-ms="))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no time in:\n{out}"))
    };
    let mut engine = Vec::new();
    let mut own = Vec::new();
    for i in 0..3 {
        engine.push(run_ms(&format!(
            "{DOCKER} run -d --name bench{i} --network host 10.0.2.2:5000/keelson/base:v1 sleep 1000 >/dev/null"
        )));
        let out = docker(&g, &format!("rm -f bench{i}"));
        assert!(out.contains("rc=0"), "{out}");
        g.sh("keelctl stop plain >/dev/null; \
              until keelctl status plain | grep -q '^state: *stopped'; do sleep 0.2; done");
        own.push(run_ms(
            "keelctl start plain >/dev/null; \
             until keelctl status plain | grep -q '^state: *running'; do :; done",
        ));
    }
    let (engine, own) = (median_min(&mut engine), median_min(&mut own));
    eprintln!(
        "\nstarting a container of a local image on the host network, one TCG guest, 3 runs (ms)\n\
         | path | min | median | median ÷ sysd |\n\
         |---|---:|---:|---:|\n\
         | dockerd: `docker run -d` (dockerd → containerd → shim → runc) | {:.0} | {:.0} | {:.2} |\n\
         | sysd: `keelctl start` until running (sysd's runtime) | {:.0} | {:.0} | 1.00 |\n",
        engine.0,
        engine.1,
        engine.1 / own.1,
        own.0,
        own.1,
    );

    // The shims of the containers that ran and were removed are gone: tini, dockerd's
    // subreaper, reaped them (no zombie anywhere on the node).
    // (A zombie that lasts: one seen for an instant is a parent about to reap it.)
    until(
        &g,
        "z=$(grep -l '^State:.*Z' /proc/[0-9]*/status); [ -z \"$z\" ] && echo no-zombies || echo $z",
        "no-zombies",
        Duration::from_secs(30),
    );

    // A published port, beside Keelson's own bridge service.
    let out = docker(
        &g,
        "run -d --name dweb -p 8088:80 10.0.2.2:5000/keelson/base:v1 \
         sh -c 'mkdir -p /w && echo hello-from-a-docker-container > /w/index.html && exec httpd -f -p 80 -h /w'",
    );
    assert!(out.contains("rc=0"), "{out}");
    let body = http_get_until(
        &g,
        SocketAddr::from((Ipv4Addr::LOCALHOST, DOCKER_APP)),
        "/",
        "hello-from-a-docker-container",
    );
    assert!(body.contains("hello-from-a-docker-container"), "{body}");
    // The container's cgroup is below the engine's.
    let cg = g.sh(&format!(
        "cat /proc/$({DOCKER} inspect -f '{{{{.State.Pid}}}}' dweb)/cgroup"
    ));
    assert!(cg.contains("0::/../docker/docker/"), "{cg}");
    bweb_answers(&g);
    // bclient reaches bweb by name over Keelson's bridge, after dockerd wrote its rules.
    let mark = g.sh("keelctl logs bclient | grep -c 'hello from bweb'");
    let before: u32 = mark.trim().parse().unwrap_or(0);
    until(
        &g,
        &format!("n=$(keelctl logs bclient | grep -c 'hello from bweb'); [ $n -gt {before} ] && echo more"),
        "more",
        Duration::from_secs(60),
    );

    // Bad input: dockerd given a flag it does not know exits at once, again and again.
    g.sh(&format!(
        "printf '%s\\n' 'version = 1' '[overrides.docker]' 'enabled = true' '[overrides.docker.env]' \
         'DOCKERD_ARGS = \"--no-such-flag --insecure-registry 10.0.2.2:{REGISTRY_PORT}\"' > /tmp/bad.toml \
         && keelctl apply /tmp/bad.toml"
    ));
    g.expect("docker: restarting:", Duration::from_secs(300));
    let out = until(
        &g,
        "keelctl status docker; echo state=$(keelctl status docker | sed -n 's/^state: *//p')",
        "state=backoff",
        Duration::from_secs(300),
    );
    eprintln!("crash loop:\n{out}");
    let log = g.sh("keelctl logs docker | tail -n 20");
    assert!(log.contains("no-such-flag"), "{log}");
    // Keelson's own services are unaffected.
    bweb_answers(&g);
    let ps = g.sh("keelctl ps");
    for svc in ["bweb", "bclient", "web", "db", "testshell"] {
        let line = ps
            .lines()
            .find(|l| l.split_whitespace().next() == Some(svc))
            .unwrap_or_else(|| panic!("{svc} not in:\n{ps}"));
        assert!(line.contains("running"), "{svc}: {line}");
    }
    // Fixed: dockerd back, and the container it was told to keep is not (no restart policy).
    g.sh("printf '%s\\n' 'version = 1' > /tmp/good.toml && keelctl apply /tmp/good.toml");
    until(&g, UP, "dockerd-up", Duration::from_secs(600));

    // Stopping the service stops dockerd, containerd and every container.
    let out = docker(
        &g,
        "run -d 10.0.2.2:5000/keelson/base:v1 sh -c 'trap \"exit 0\" TERM; while :; do sleep 1; done'",
    );
    assert!(out.contains("rc=0"), "{out}");
    // Every live process of the engine's cgroup subtree (dockerd, containerd, shims,
    // containers). Zombies are left out: a shim still running when tini has exited is
    // reparented to sysd by the stop's kill, and sysd reaps only the container inits it
    // started (the process is gone, nothing runs).
    let procs = "echo procs=$(for f in $(grep -ls '^0::/\\.\\./docker' /proc/[0-9]*/cgroup); do \
                 grep -q '^State:.*Z' ${f%cgroup}status || echo $f; done | wc -l)";
    let before = g.sh(procs);
    assert!(!before.contains("procs=0"), "{before}");
    g.sh("keelctl stop docker");
    let after = until(&g, STATE, "state=stopped", Duration::from_secs(120));
    let left = g.sh(&format!(
        "{procs}; pidof dockerd containerd containerd-shim-runc-v2 || echo none-left"
    ));
    assert!(
        left.contains("procs=0") && left.contains("none-left"),
        "processes left after stop ({after}):\n{left}"
    );
    bweb_answers(&g);
}

/// `(min, median)` of a few timings.
fn median_min(v: &mut [f64]) -> (f64, f64) {
    v.sort_by(f64::total_cmp);
    (v[0], v[v.len() / 2])
}
