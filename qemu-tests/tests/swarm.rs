//! Docker Swarm across three Keelson nodes (issue 17): three TCG guests of the test image on one
//! LAN (`Cluster`, booted through OVMF and systemd-boot so that one of them can take an A/B
//! update), each given first-boot user data that names an update repository on the LAN,
//! enables the docker extension and turns its `docker` service on. A reference registry
//! (Debian's `docker-registry`) at `10.77.0.1:5000` holds the pipeline's own OCI layout of the
//! `base` image (busybox).
//!
//! One scenario, in order: `docker swarm init` on node1; a join token rotated since it was
//! taken (an expired one) handed to node2's `swarm-join` service (the extension's oneshot,
//! configured through `[overrides.swarm-join]`) fails it with Docker's own error, shown by
//! `keelctl status swarm-join`; the current token joins node2 and node3 the same way; an
//! overlay network, a replicated service published on 8080 through the routing mesh (busybox
//! httpd naming its container) and a global service on the overlay that fetches the first
//! through its virtual IP from every node; every node's 8080 answers from the test's namespace,
//! and every replica is reached through it; node3 killed: the swarm sees it down, runs its replica elsewhere, and the
//! surviving nodes keep answering; node3 restarted: it comes back Ready under the same node ID
//! and runs its global task again; node2 updated A/B to 0.2.0 (its docker extension built for
//! 0.2.0): the same node ID Ready after it boots the other slot, its global task running again.
//!
//! Printed, never asserted (TCG on a shared machine): a table of the swarm's join times beside
//! `swarm init` on the same run.
//!
//! `KEELSON_SWARM_REUSE=1` reuses the images and repositories of an earlier run in
//! `target/qemu-swarm` (when complete).

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use keelson_testkit::registry::{Layout, Registry, RegistryOptions};
use qemu_tests::cluster::HOST_ADDR;
use qemu_tests::scenario::{fixture_dir, http_get, run, Httpd};
use qemu_tests::update::Signing;
use qemu_tests::{Cluster, Guest, GuestBuilder, NodeConfig};

/// Three cold UEFI boots at once, the extension's download and activation, dockerd's start.
const READY: Duration = Duration::from_secs(1200);
/// One node's boot (a restart, or the reboot into the other slot) until dockerd answers.
const BOOT: Duration = Duration::from_secs(900);
/// One swarm step (a join, replicas starting, a node seen down).
const STEP: Duration = Duration::from_secs(300);
/// A published port answering once its tasks run.
const MESH: Duration = Duration::from_secs(120);
const REPO_PORT: u16 = 8000;
const REGISTRY_PORT: u16 = 5000;
const WEB_PORT: u16 = 8080;
const NODES: usize = 3;

/// The images, the extension built for each version and the repositories.
struct Fixture {
    /// The 0.1.0 image directory.
    n: PathBuf,
    /// `base` (0.1.0) and `next` (0.1.0, 0.2.0), each listing the docker extension.
    repos: PathBuf,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let dir = fixture_dir("swarm", build_fixture);
        Fixture {
            n: dir.join("0.1.0"),
            repos: dir.join("repos"),
        }
    })
}

/// The run's shared builds (`Signing`: the images and the docker extension for 0.1.0 are
/// docker.rs's too), the repositories made here.
fn build_fixture(dir: &Path) {
    let signing = Signing::for_scenario(dir);
    let mut ext = BTreeMap::new();
    for v in ["0.1.0", "0.2.0"] {
        std::os::unix::fs::symlink(signing.image(v, None, &[]), dir.join(v)).unwrap();
        ext.insert(v, signing.extension("configs/extensions/docker.toml", v));
    }
    let repos = dir.join("repos");
    std::fs::create_dir_all(&repos).unwrap();
    signing.add_with_extensions(&repos.join("base"), &dir.join("0.1.0"), &[&ext["0.1.0"]]);
    // Publishing 0.2.0: the same repository, one version more.
    run(Command::new("cp")
        .arg("-a")
        .arg(repos.join("base"))
        .arg(repos.join("next")));
    signing.add_with_extensions(&repos.join("next"), &dir.join("0.2.0"), &[&ext["0.2.0"]]);
}

/// The test image's exercises for other scenarios, off: they would only load the guests. `web`
/// is off too: the swarm publishes 8080.
const QUIET: [&str; 14] = [
    "counter", "hog", "flaky", "crasher", "isolated", "plain", "flusher", "bweb", "bclient", "app",
    "worker", "migrate", "web", "db",
];

/// Every node's first-boot user data: the repository (`/swarm/` on the LAN's httpd, a symlink
/// the test turns on publish), the docker extension and its engine, the test registry allowed
/// over HTTP.
fn user_data() -> String {
    format!(
        r#"version = 1

[update]
repository = "http://{HOST_ADDR}:{REPO_PORT}/swarm/"

[extensions]
enabled = ["docker"]

[overrides.docker]
enabled = true

[overrides.docker.env]
DOCKERD_ARGS = "--insecure-registry {HOST_ADDR}:{REGISTRY_PORT}"
{quiet}"#,
        quiet = QUIET
            .iter()
            .map(|svc| format!("\n[overrides.{svc}]\nenabled = false\n"))
            .collect::<String>(),
    )
}

/// The docker CLI of the extension, in the docker service's mount namespace: that of the
/// dockerd tini started (swarm mode runs more processes named dockerd).
const DOCKER: &str = r#"nsenter -t $(for p in $(pidof dockerd); do [ "$(cat /proc/$(sed -n 's/^PPid:[[:space:]]*//p' /proc/$p/status)/comm)" = tini ] && echo $p; done) -m -- docker -H unix:///run/docker.sock"#;

/// `docker ARGS` on `g`, its output followed by `rc=N`.
fn docker(g: &Guest, args: &str) -> String {
    g.sh(&format!("{DOCKER} {args} 2>&1; echo rc=$?"))
}

/// Polls `script` in `g`'s shell every 2 s until its output contains `needle`.
fn until(g: &Guest, script: &str, needle: &str, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let out = g.sh(script);
        if out.contains(needle) {
            return out;
        }
        assert!(
            Instant::now() < deadline,
            "{}: {script:?} never printed {needle:?} within {timeout:?}; last:\n{out}\n--- console ---\n{}",
            g.label(),
            g.serial_tail(60)
        );
        std::thread::sleep(Duration::from_secs(2));
    }
}

/// Waits until dockerd answers on `g`.
fn dockerd_up(g: &Guest, timeout: Duration) {
    until(
        g,
        &format!("{DOCKER} version >/dev/null 2>&1 && echo dockerd-up"),
        "dockerd-up",
        timeout,
    );
}

/// `docker node ls` on the manager (node1): host name → (node ID, status).
fn nodes(c: &Cluster) -> BTreeMap<String, (String, String)> {
    let out = c.guest(0).sh(&format!(
        "{DOCKER} node ls --format 'node {{{{.ID}}}} {{{{.Hostname}}}} {{{{.Status}}}}'"
    ));
    out.lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            (w.next() == Some("node")).then_some(())?;
            let (id, host, status) = (w.next()?, w.next()?, w.next()?);
            Some((host.to_owned(), (id.to_owned(), status.to_owned())))
        })
        .collect()
}

/// Waits until the manager lists `host` as `status`; returns its node ID.
fn node_status(c: &Cluster, host: &str, status: &str, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let all = nodes(c);
        if let Some((id, s)) = all.get(host) {
            if s == status {
                return id.clone();
            }
        }
        assert!(
            Instant::now() < deadline,
            "{host} never {status} in docker node ls within {timeout:?}: {all:?}"
        );
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// `keelctl apply` on `g` of a user config that configures and turns on `swarm-join`.
fn join_with(c: &Cluster, i: usize, token: &str) -> String {
    let manager = c.addr(0);
    let me = c.addr(i);
    c.guest(i).sh(&format!(
        "cat > /tmp/swarm.toml <<'EOF'\nversion = 1\n\n[overrides.swarm-join]\nenabled = true\n\n\
         [overrides.swarm-join.env]\nSWARM_MANAGER = \"{manager}:2377\"\nSWARM_TOKEN = \"{token}\"\n\
         SWARM_ADVERTISE_ADDR = \"{me}\"\nEOF\nkeelctl apply /tmp/swarm.toml"
    ))
}

/// The swarm-join service's state on `g`, as `state=…`.
const JOIN_STATE: &str = "echo state=$(keelctl status swarm-join | sed -n 's/^state: *//p')";

/// Whether `svc`'s task on `host` runs (the manager's `docker service ps`).
fn task_runs_on(c: &Cluster, svc: &str, host: &str, timeout: Duration) {
    until(
        c.guest(0),
        &format!(
            "{DOCKER} service ps {svc} --filter desired-state=running --format '{{{{.Node}}}} {{{{.CurrentState}}}}'"
        ),
        &format!("{host} Running"),
        timeout,
    );
}

/// What the routing mesh is made of on `g`: dockerd's complaints, the node's NAT rules (the
/// DNAT of published ports to the ingress sandbox), the sandbox's marks and IPVS table.
fn mesh_state(g: &Guest) -> String {
    g.sh(&format!(
        "keelctl logs docker | grep -E 'level=(error|warning)' | tail -n 25; \
         {NS} -- /run/docker-bin/iptables-save -t nat 2>&1 | grep -v '^#'; \
         {NS} -- nsenter --net=/var/run/docker/netns/ingress_sbox sh -c \
           '/run/docker-bin/iptables-save -t mangle 2>&1 | grep -v \"^#\"; cat /proc/net/ip_vs; ip -4 addr' 2>&1; \
         netstat -ltn 2>&1 | grep 8080"
    ))
}

/// Runs in the mount namespace of the dockerd tini started (see [`DOCKER`]).
const NS: &str = r#"nsenter -t $(for p in $(pidof dockerd); do [ "$(cat /proc/$(sed -n 's/^PPid:[[:space:]]*//p' /proc/$p/status)/comm)" = tini ] && echo $p; done) -m"#;

/// `GET /` on node `i`'s published port from the cluster's namespace until it answers with a
/// page of the service; returns the page's container name.
fn web_page(c: &Cluster, i: usize, timeout: Duration) -> String {
    let addr = SocketAddr::from((c.addr(i), WEB_PORT));
    let deadline = Instant::now() + timeout;
    loop {
        let got = c.run_in(|| http_get(addr, "/"));
        if let Ok(body) = &got {
            if let Some(name) = body
                .lines()
                .find_map(|l| l.trim().strip_prefix("hello-from-swarm-"))
            {
                return name.to_owned();
            }
        }
        if Instant::now() >= deadline {
            panic!(
                "GET http://{addr}/ never answered with the service's page within {timeout:?}: \
                 {got:?}\n--- {}'s routing mesh ---\n{}",
                c.name(i),
                mesh_state(c.guest(i))
            );
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// The guest's uptime in seconds (its own clock: the time a guest command took).
const UPTIME: &str = "cut -d' ' -f1 /proc/uptime";

#[test]
fn swarm_across_three_nodes_survives_a_kill_and_an_update() {
    let f = fixture();
    let ud = user_data();
    let template = GuestBuilder::uefi(f.n.join("disk.raw"))
        .disk_size(6 << 30)
        .memory_mib(1536);
    let started = Instant::now();
    let mut c = (0..NODES)
        .fold(Cluster::builder(template), |b, i| {
            b.node(NodeConfig::new(&format!("node{}", i + 1)).user_data(&ud))
        })
        .spawn()
        .unwrap();
    // The nodes know the repository as /swarm/: the directory served changes on publish.
    let www = tempfile::tempdir().unwrap();
    let link = www.path().join("swarm");
    std::os::unix::fs::symlink(f.repos.join("base"), &link).unwrap();
    let _repo = Httpd::serve(
        c.netns(),
        SocketAddr::from((HOST_ADDR, REPO_PORT)),
        www.path(),
    )
    .unwrap();
    let work = c.dir().to_path_buf();
    let layout_dir = f.n.join("oci/base");
    let image = format!("{HOST_ADDR}:{REGISTRY_PORT}/keelson/base:v1");
    let _registry = c.run_in(|| {
        let reg = Registry::start(
            &work.join("registry"),
            REGISTRY_PORT,
            RegistryOptions {
                host: Some(HOST_ADDR),
                ..RegistryOptions::default()
            },
        );
        Layout::new(&layout_dir).push("base", &format!("{}/keelson/base:v1", reg.addr), None);
        reg
    });

    c.expect_all("sysd: extension-active: docker 20.10.24-1", READY);
    for g in c.guests() {
        dockerd_up(g, READY.saturating_sub(started.elapsed()));
    }
    let formed = started.elapsed();
    eprintln!(
        "dockerd answering on {NODES} nodes after {:.0} s",
        formed.as_secs_f64()
    );
    // Rows of the join-time table: (node, what, the command's time, issued → Ready).
    let mut table: Vec<(String, &str, String, f64)> = Vec::new();

    // --- The swarm: initialised on node1 ---
    let manager = c.addr(0);
    let t = Instant::now();
    let out = c.guest(0).sh(&format!(
        "a=$({UPTIME}); {DOCKER} swarm init --advertise-addr {manager} 2>&1; echo rc=$?; \
         b=$({UPTIME}); echo took=$(awk \"BEGIN {{ print $b - $a }}\")"
    ));
    assert!(out.contains("rc=0"), "swarm init: {out}");
    let node1 = node_status(&c, "node1", "Ready", STEP);
    let init_cmd = out
        .lines()
        .find_map(|l| l.strip_prefix("took="))
        .unwrap_or("-")
        .to_owned();
    table.push((
        "node1".into(),
        "`docker swarm init`",
        init_cmd,
        t.elapsed().as_secs_f64(),
    ));
    let token = docker(c.guest(0), "swarm join-token -q worker");
    let token = token
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("SWMTKN-"))
        .unwrap_or_else(|| panic!("no token in {token}"))
        .to_owned();

    // --- An expired token: the one taken above, rotated since ---
    let out = docker(c.guest(0), "swarm join-token --rotate -q worker");
    let fresh = out
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("SWMTKN-"))
        .unwrap_or_else(|| panic!("no rotated token in {out}"))
        .to_owned();
    assert_ne!(fresh, token, "the token did not change on rotation");
    let out = join_with(&c, 1, &token);
    assert!(!out.contains("error"), "apply: {out}");
    until(c.guest(1), JOIN_STATE, "state=failed", STEP);
    let status = c.guest(1).sh("keelctl status swarm-join");
    eprintln!("node2, joining with a rotated token:\n{status}");
    assert!(
        status.contains("last output:") && status.contains("valid join token"),
        "keelctl status swarm-join does not show Docker's error:\n{status}"
    );
    let engine = c
        .guest(1)
        .sh("keelctl logs docker | grep 'level=error' | tail -n 5");
    eprintln!("node2, dockerd's log on the failed join:\n{engine}");
    assert!(
        engine.contains("A valid join token is necessary to join this cluster"),
        "dockerd's log does not name the refused token:\n{engine}"
    );
    // Still outside the swarm.
    let state = docker(c.guest(1), "info --format '{{.Swarm.LocalNodeState}}'");
    assert!(state.contains("inactive"), "{state}");

    // --- The current token: node2 and node3 join through their swarm-join service ---
    let mut issued = Vec::new();
    for i in 1..NODES {
        let out = join_with(&c, i, &fresh);
        assert!(!out.contains("error"), "apply: {out}");
        issued.push((i, Instant::now()));
    }
    let mut ids = BTreeMap::new();
    ids.insert("node1".to_owned(), node1);
    for (i, at) in issued {
        let name = c.name(i).to_owned();
        let id = node_status(&c, &name, "Ready", STEP);
        let ready = at.elapsed().as_secs_f64();
        until(c.guest(i), JOIN_STATE, "state=completed", STEP);
        let log = c.guest(i).sh("keelctl logs swarm-join");
        let took = log
            .lines()
            .find_map(|l| l.split(" in ").nth(1)?.strip_suffix(" s"))
            .unwrap_or("-")
            .to_owned();
        assert!(log.contains(&format!("joined as node {id}")), "{log}");
        table.push((
            name.clone(),
            "`swarm-join` (`docker swarm join`)",
            took,
            ready,
        ));
        ids.insert(name, id);
    }
    eprintln!("swarm formed: {:?}", nodes(&c));

    // --- An overlay network, the routing mesh, a global service on the overlay ---
    let out = docker(c.guest(0), "network create --driver overlay mesh");
    assert!(out.contains("rc=0"), "{out}");
    let out = docker(
        c.guest(0),
        &format!(
            "service create --detach --name web --replicas 3 --network mesh \
             --publish published={WEB_PORT},target=80 {image} \
             sh -c 'mkdir -p /w && echo hello-from-swarm-$(hostname) > /w/index.html && exec httpd -f -p 80 -h /w'"
        ),
    );
    assert!(out.contains("rc=0"), "{out}");
    // web's virtual IP on the overlay, fetched with nc (the base image's busybox wget dies of
    // SIGSEGV in these containers, whatever the address).
    let net = docker(c.guest(0), "network inspect mesh --format 'net={{.Id}}'");
    let net = net
        .lines()
        .find_map(|l| l.trim().strip_prefix("net="))
        .unwrap_or_else(|| panic!("no network ID: {net}"))
        .to_owned();
    let vips = docker(
        c.guest(0),
        "service inspect web --format '{{range .Endpoint.VirtualIPs}}vip={{.NetworkID}},{{.Addr}} {{end}}'",
    );
    let vip = vips
        .split_whitespace()
        .filter_map(|w| w.strip_prefix("vip="))
        .find_map(|w| {
            let (id, addr) = w.split_once(',')?;
            (id == net).then(|| addr.split('/').next().unwrap_or(addr).to_owned())
        })
        .unwrap_or_else(|| panic!("web has no virtual IP on mesh ({net}): {vips}"));
    let out = docker(
        c.guest(0),
        &format!(
            "service create --detach --name probe --mode global --network mesh {image} \
             sh -c 'trap \"exit 0\" TERM; while :; do printf \"GET / HTTP/1.0\\r\\n\\r\\n\" | nc -w 5 {vip} 80 2>&1 | grep hello | sed \"s/^/probe: /\"; sleep 5 & wait $!; done'"
        ),
    );
    assert!(out.contains("rc=0"), "{out}");
    let t = Instant::now();
    until(
        c.guest(0),
        &format!("{DOCKER} service ls --format '{{{{.Name}}}}={{{{.Replicas}}}}'"),
        "web=3/3",
        STEP,
    );
    until(
        c.guest(0),
        &format!("{DOCKER} service ls --format '{{{{.Name}}}}={{{{.Replicas}}}}'"),
        "probe=3/3",
        STEP,
    );
    eprintln!(
        "web 3/3 and probe 3/3 after {:.0} s",
        t.elapsed().as_secs_f64()
    );
    let placement = docker(
        c.guest(0),
        "service ps web --filter desired-state=running --format '{{.Name}} {{.Node}} {{.CurrentState}}'",
    );
    eprintln!("web's tasks:\n{placement}");
    // Every node's 8080 answers, and the mesh reaches every replica (wherever it runs).
    let mut seen = BTreeSet::new();
    for i in 0..NODES {
        let name = web_page(&c, i, MESH);
        eprintln!("{}:{WEB_PORT} -> {name}", c.name(i));
        seen.insert(name);
    }
    for n in 0.. {
        if seen.len() == 3 {
            break;
        }
        assert!(
            n < 60,
            "the routing mesh reached only {seen:?} of 3 replicas in 60 more requests"
        );
        let i = n % NODES;
        seen.insert(web_page(&c, i, MESH));
    }
    eprintln!("replicas reached through the mesh: {seen:?}");
    // The global service reaches web over the overlay, through its virtual IP (IPVS in the
    // task's namespace), from every node.
    let logs = until(
        c.guest(0),
        &format!(
            "{DOCKER} service logs --tail 30 probe 2>&1 | grep 'probe: hello-from-swarm-' | tail -n 6; \
             echo from: $({DOCKER} service logs --tail 30 probe 2>&1 | grep 'probe: hello-from-swarm-' | grep -o '@node[0-9]' | sort -u)"
        ),
        "from: @node1 @node2 @node3",
        STEP,
    );
    eprintln!(
        "probe: {}",
        logs.lines()
            .find(|l| l.contains("hello-from"))
            .unwrap_or("")
    );

    // --- node3 killed: seen down, its replica runs elsewhere, the others keep answering ---
    c.kill(2).unwrap();
    let t = Instant::now();
    node_status(&c, "node3", "Down", STEP);
    let down = t.elapsed().as_secs_f64();
    let tasks = until(
        c.guest(0),
        &format!(
            "echo count=$({DOCKER} service ps web --filter desired-state=running --format '{{{{.Node}}}} {{{{.CurrentState}}}}' | grep -v '^node3 ' | grep -c ' Running ')"
        ),
        "count=3",
        STEP,
    );
    eprintln!(
        "node3 down after {down:.0} s, web's 3 replicas on node1/node2 after {:.0} s ({})",
        t.elapsed().as_secs_f64(),
        tasks.trim()
    );
    for i in 0..2 {
        let name = web_page(&c, i, MESH);
        eprintln!("{}:{WEB_PORT} -> {name} (node3 down)", c.name(i));
    }

    // --- node3 back: Ready under the same ID, its global task again ---
    let t = Instant::now();
    c.restart(2).unwrap();
    dockerd_up(c.guest(2), BOOT);
    let id = node_status(&c, "node3", "Ready", STEP);
    assert_eq!(id, ids["node3"], "node3 came back as another node");
    table.push((
        "node3".into(),
        "restart after a kill (boot included)",
        "-".into(),
        t.elapsed().as_secs_f64(),
    ));
    task_runs_on(&c, "probe", "node3", STEP);
    let join_log = c.guest(2).sh("keelctl logs swarm-join");
    assert!(join_log.contains("already in a swarm"), "{join_log}");
    let name = web_page(&c, 2, MESH);
    eprintln!("node3:{WEB_PORT} -> {name} (back)");

    // --- node2 updated A/B to 0.2.0: its swarm membership and state survive ---
    let tmp = www.path().join("swarm.new");
    std::os::unix::fs::symlink(f.repos.join("next"), &tmp).unwrap();
    std::fs::rename(&tmp, &link).unwrap();
    let t = Instant::now();
    let out = c
        .guest(1)
        .sh("keelctl update apply --reboot --no-wait 2>&1");
    assert!(!out.contains("error"), "update apply: {out}");
    c.guest(1)
        .expect("sysd: update-blessed: 0.2.0 is good", BOOT + STEP);
    dockerd_up(c.guest(1), STEP);
    let id = node_status(&c, "node2", "Ready", STEP);
    assert_eq!(
        id, ids["node2"],
        "node2 came back from its update as another node"
    );
    table.push((
        "node2".into(),
        "A/B update to 0.2.0 (download, reboot included)",
        "-".into(),
        t.elapsed().as_secs_f64(),
    ));
    let status = c.guest(1).sh("keelctl -o json update status");
    assert!(status.contains("\"0.2.0\""), "{status}");
    let local = docker(
        c.guest(1),
        "info --format '{{.Swarm.NodeID}} {{.Swarm.LocalNodeState}}'",
    );
    assert!(local.contains(&format!("{id} active")), "{local}");
    task_runs_on(&c, "probe", "node2", STEP);
    let name = web_page(&c, 1, MESH);
    eprintln!("node2:{WEB_PORT} -> {name} (on 0.2.0)");
    eprintln!("final: {:?}", nodes(&c));

    println!(
        "\n## Docker Swarm on Keelson: three TCG nodes (UEFI, 1536 MiB, 1 vCPU each), dockerd answering on all after {:.0} s\n",
        formed.as_secs_f64()
    );
    println!("| node | step | the command (guest clock, s) | issued → Ready in `docker node ls` on node1 (s, polled each ~1 s) |");
    println!("|---|---|---:|---:|");
    for (node, what, cmd, ready) in &table {
        println!("| {node} | {what} | {cmd} | {ready:.1} |");
    }
}
