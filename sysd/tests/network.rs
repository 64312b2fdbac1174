//! Host integration tests of host networking: a real sysd (`--host-network`) in a network
//! namespace the test creates, joined by a veth pair to a second namespace where a real
//! `dnsmasq` serves DHCP (or nothing, for static configs). Nothing here touches the host's
//! own network. They need root, iproute2 and dnsmasq (`./dev deps` installs them).
//!
//! sysd's event lines (mirrored on its stderr) are what the tests wait on; the kernel's view
//! is read back with `ip`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

use keelson_testkit::busybox;
use keelson_testkit::daemon::Daemon;

const SYSD: &str = env!("CARGO_BIN_EXE_sysd");
static NEXT: AtomicU32 = AtomicU32::new(0);

fn run(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Two namespaces: `server` (10.77.N.1 on `vs`) and `client` (sysd's, link `ve0`).
struct Lab {
    server: String,
    client: String,
    subnet: String,
    dir: tempfile::TempDir,
    dnsmasq: Option<Child>,
    sysd: Daemon,
}

impl Lab {
    fn new() -> Lab {
        Lab::build(false)
    }

    /// A lab whose sysd runs under init's supervision (`keelson-init supervise`: the FD
    /// store, orphans' exits, restarts after a crash).
    fn under_init() -> Lab {
        Lab::build(true)
    }

    fn build(under_init: bool) -> Lab {
        // SAFETY: geteuid has no preconditions.
        assert_eq!(unsafe { libc::geteuid() }, 0, "these tests need root");
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let id = format!("{}-{n}", std::process::id() % 100_000);
        let client = format!("kn-c-{id}");
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path().display().to_string();
        let sysd = Daemon::new(SYSD, dir.path(), format!("/keelson-net-{client}"))
            .prefix(["ip", "netns", "exec", &client])
            .unshare(["-u"])
            .args([
                "--host-network".to_string(),
                "--network-state".to_string(),
                format!("{d}/var/network"),
                "--resolv-conf".to_string(),
                format!("{d}/run/resolv.conf"),
                "--hostname-file".to_string(),
                format!("{d}/hostname"),
                "--machine-id".to_string(),
                format!("{d}/machine-id"),
                "--nft".to_string(),
                "/usr/sbin/nft".to_string(),
            ]);
        let sysd = if under_init {
            sysd.under_init(keelson_testkit::daemon::init_exe())
        } else {
            sysd
        };
        let lab = Lab {
            server: format!("kn-s-{id}"),
            client,
            subnet: format!("10.77.{}", 10 + (std::process::id() % 200 + n) % 240),
            dir,
            dnsmasq: None,
            sysd,
        };
        run(&["ip", "netns", "add", &lab.server]);
        run(&["ip", "netns", "add", &lab.client]);
        run(&[
            "ip",
            "-n",
            &lab.server,
            "link",
            "add",
            "vs",
            "type",
            "veth",
            "peer",
            "name",
            "ve0",
            "netns",
            &lab.client,
        ]);
        let gw = format!("{}.1/24", lab.subnet);
        run(&["ip", "-n", &lab.server, "addr", "add", &gw, "dev", "vs"]);
        run(&["ip", "-n", &lab.server, "link", "set", "vs", "up"]);
        run(&["ip", "-n", &lab.server, "link", "set", "lo", "up"]);
        std::fs::create_dir_all(lab.path("system")).unwrap();
        std::fs::create_dir_all(lab.path("var")).unwrap();
        std::fs::write(lab.path("machine-id"), "0123456789abcdef0123456789abcdef\n").unwrap();
        lab
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn gw(&self) -> String {
        format!("{}.1", self.subnet)
    }

    /// dnsmasq on `vs`: range .100-.150, 2 min leases (its minimum) with T1/T2 as given.
    fn start_dnsmasq(&mut self, extra: &[&str]) {
        assert!(
            Path::new("/usr/sbin/dnsmasq").exists(),
            "dnsmasq missing: apt-get install dnsmasq-base (./dev deps)"
        );
        let s = &self.subnet;
        let range = format!("--dhcp-range={s}.100,{s}.150,255.255.255.0,2m");
        let router = format!("--dhcp-option=option:router,{s}.1");
        let dns = format!("--dhcp-option=option:dns-server,{s}.1");
        let leases = format!("--dhcp-leasefile={}", self.path("dnsmasq.leases").display());
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.path("dnsmasq.log"))
            .unwrap();
        let mut args = vec![
            "netns",
            "exec",
            &self.server,
            "dnsmasq",
            "--no-daemon",
            "--conf-file=/dev/null",
            "--interface=vs",
            "--bind-interfaces",
            "--port=0",
            "--log-dhcp",
            "--dhcp-option=option:domain-name,lab.test",
            &range,
            &router,
            &dns,
            &leases,
        ];
        args.extend_from_slice(extra);
        let child = Command::new("ip")
            .args(&args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("dnsmasq");
        self.dnsmasq = Some(child);
        // Its socket is bound before it logs "started".
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.dnsmasq_log().contains("DHCP, IP range") && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn stop_dnsmasq(&mut self) {
        if let Some(mut c) = self.dnsmasq.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn dnsmasq_log(&self) -> String {
        std::fs::read_to_string(self.path("dnsmasq.log")).unwrap_or_default()
    }

    /// sysd with `config` as its system file; its own mount and UTS namespaces (cgroup2,
    /// hostname), in the client network namespace.
    fn start_sysd(&mut self, config: &str) {
        std::fs::write(self.path("system/10-net.toml"), config).unwrap();
        self.spawn_sysd();
    }

    fn spawn_sysd(&mut self) {
        self.sysd.spawn().expect("sysd");
        self.wait_log("sysd: ready", 1);
    }

    /// SIGTERM and wait (sysd releases its leases on the way out).
    fn stop_sysd(&mut self) {
        self.sysd.terminate();
    }

    fn log(&self) -> String {
        self.sysd.log()
    }

    /// Waits until `needle` appears `count` times in sysd's log.
    fn wait_log(&self, needle: &str, count: usize) -> String {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let log = self.log();
            if log.matches(needle).count() >= count {
                return log;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {needle:?} (x{count})\n--- sysd log ---\n{log}\n--- dnsmasq log ---\n{}",
                self.dnsmasq_log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `url` fetched from the server namespace (outside the node): what wget printed.
    fn outside_get(&self, url: &str) -> String {
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.server,
                "busybox",
                "wget",
                "-q",
                "-O",
                "-",
                url,
            ])
            .output()
            .unwrap();
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }

    /// Waits (at most `timeout`) until `url`, fetched from outside the node, answers `want`.
    fn wait_outside_get(&self, what: &str, url: &str, want: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let got = self.outside_get(url);
            if got == want {
                return;
            }
            assert!(Instant::now() < deadline, "{what}: {got}\n{}", self.log());
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    fn ip(&self, args: &[&str]) -> String {
        let mut all = vec!["ip", "-n", &self.client];
        all.extend_from_slice(args);
        run(&all)
    }

    fn request(&self, method: &str, path: &str, body: &str) -> (u16, String) {
        self.sysd.request(method, path, body)
    }

    fn status(&self) -> Value {
        let (code, body) = self.request("GET", "/v1/network", "");
        assert_eq!(code, 200, "{body}");
        serde_json::from_str(&body).unwrap()
    }

    /// The address sysd's last lease event names on ve0.
    fn leased_address(&self) -> String {
        let st = self.status();
        st["leases"][0]["address"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.stop_sysd();
        self.stop_dnsmasq();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.server])
            .status();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.client])
            .status();
    }
}

/// A node where no link can bring network-online does not hold its dependents for
/// `online_timeout`: with no link to configure, and with the configured link's cable out
/// (its veth peer down), it settles as unreachable; the cable plugged in and a DHCP server
/// answering, it becomes online.
#[test]
fn network_online_settles_without_a_link_or_carrier_and_comes_later() {
    let mut bare = Lab::new();
    run(&["ip", "-n", &bare.client, "link", "del", "ve0"]);
    bare.start_sysd("version = 1\n[network]\nonline_timeout = \"10m\"\n");
    let log = bare.wait_log(
        "network-unreachable: no network link to configure (only loopback)",
        1,
    );
    assert!(!log.contains("network-online-timeout"), "{log}");
    let st = bare.status();
    assert_eq!(st["online"], "unreachable", "{st}");
    assert_eq!(
        st["online_reason"],
        "no network link to configure (only loopback)"
    );
    drop(bare);

    let mut lab = Lab::new();
    run(&["ip", "-n", &lab.server, "link", "set", "vs", "down"]);
    lab.start_sysd(
        "version = 1\n[network]\nonline_timeout = \"10m\"\n[network.interfaces.ve0]\ndhcp = true\n",
    );
    lab.wait_log("network-unreachable: no carrier on ve0", 1);
    assert_eq!(lab.status()["online"], "unreachable");
    run(&["ip", "-n", &lab.server, "link", "set", "vs", "up"]);
    lab.start_dnsmasq(&[]);
    let log = lab.wait_log("network-online: default route and DNS server present", 1);
    assert!(!log.contains("network-online-timeout"), "{log}");
    assert_eq!(lab.status()["online"], "online");
}

const DHCP_CONFIG: &str = "version = 1\n[network.interfaces.ve0]\ndhcp = true\n";

/// Lease, resolv.conf, hostname default, online; renew at T1; the server stops answering
/// (renewing fails, rebinding starts at T2) and comes back (rebound, same address).
#[test]
fn dhcp_lease_renew_and_server_outage() {
    let mut lab = Lab::new();
    lab.start_dnsmasq(&["--dhcp-option=58,4", "--dhcp-option=59,8"]);
    lab.start_sysd(DHCP_CONFIG);
    let log = lab.wait_log("dhcp-lease: ve0: offered", 1);
    let addr = lab.leased_address();
    assert!(
        addr.starts_with(&format!("{}.1", lab.subnet)),
        "{addr}\n{log}"
    );
    assert!(lab.ip(&["-4", "addr", "show", "ve0"]).contains(&addr));
    let routes = lab.ip(&["-4", "route"]);
    assert!(
        routes.contains(&format!("default via {} dev ve0 proto dhcp", lab.gw())),
        "{routes}"
    );
    let resolv = std::fs::read_to_string(lab.path("run/resolv.conf")).unwrap();
    assert!(
        resolv.contains(&format!("nameserver {}\n", lab.gw())),
        "{resolv}"
    );
    assert!(resolv.contains("search lab.test\n"), "{resolv}");
    lab.wait_log("network-online: default route and DNS server present", 1);
    let st = lab.status();
    assert_eq!(st["online"], "online");
    assert_eq!(st["hostname"], "keelson-01234567");
    assert_eq!(st["hostname_source"], "machine-id");
    assert_eq!(st["leases"][0]["t1_secs"], 4);
    assert_eq!(
        std::fs::read_to_string(lab.path("hostname")).unwrap(),
        "keelson-01234567\n"
    );

    // T1 = 4 s: renewed by unicast, same address.
    lab.wait_log("dhcp-lease: ve0: renewed", 1);
    assert_eq!(lab.leased_address(), addr);

    // The server goes away: renewing gets no answer, rebinding starts at T2.
    lab.stop_dnsmasq();
    lab.wait_log("dhcp-rebinding", 1);
    assert!(lab.ip(&["-4", "addr", "show", "ve0"]).contains(&addr));
    // It returns (same lease database): the broadcast rebind is answered.
    lab.start_dnsmasq(&["--dhcp-option=58,4", "--dhcp-option=59,8"]);
    lab.wait_log("dhcp-lease: ve0: rebound", 1);
    assert_eq!(lab.leased_address(), addr);
}

/// Option 121 routes win over the router option; a remembered lease the server does not
/// know is NAKed (authoritative server) and replaced; carrier loss and return are events and
/// the lease is confirmed again; after a restart (a reboot for the client) the lease kept on
/// /var is requested again and confirmed.
#[test]
fn dhcp_option_121_nak_and_lease_kept_across_restart() {
    let mut lab = Lab::new();
    let gw = lab.gw();
    let opt121 = format!("--dhcp-option=121,192.168.177.0/24,{gw},0.0.0.0/0,{gw}");
    lab.start_dnsmasq(&["--dhcp-authoritative", &opt121]);
    // A lease from "another network": outside the server's range.
    std::fs::create_dir_all(lab.path("var/network")).unwrap();
    let stale = format!(
        r#"{{"address":"{}.250","prefix":24,"server":"{gw}","routers":[],"dns":[],"domain":null,"hostname":null,"mtu":null,"classless_routes":[],"lease_secs":120,"t1_secs":60,"t2_secs":105,"acquired_unix":1}}"#,
        lab.subnet
    );
    std::fs::write(lab.path("var/network/lease-ve0.json"), stale).unwrap();
    lab.start_sysd(DHCP_CONFIG);
    let log = lab.wait_log("dhcp-lease: ve0: offered", 1);
    assert!(
        log.contains(&format!("requesting the previous lease {}.250", lab.subnet)),
        "{log}"
    );
    assert!(log.contains("dhcp-nak: ve0: server"), "{log}");
    let addr = lab.leased_address();
    assert!(!addr.starts_with(&format!("{}.250", lab.subnet)), "{addr}");
    let routes = lab.ip(&["-4", "route"]);
    assert!(
        routes.contains(&format!("192.168.177.0/24 via {gw} dev ve0 proto dhcp")),
        "{routes}"
    );
    assert!(
        routes.contains(&format!("default via {gw} dev ve0 proto dhcp")),
        "{routes}"
    );

    // Carrier lost (the server's end goes down) and back: events, and the lease confirmed.
    run(&["ip", "-n", &lab.server, "link", "set", "vs", "down"]);
    lab.wait_log("sysd: link: ve0: carrier down", 1);
    run(&["ip", "-n", &lab.server, "link", "set", "vs", "up"]);
    lab.wait_log("sysd: link: ve0: carrier up", 1);
    lab.wait_log("dhcp-reboot: ve0: requesting the previous lease", 2);
    lab.wait_log("dhcp-lease: ve0: confirmed", 1);
    assert_eq!(lab.leased_address(), addr);

    // A restart: the lease is released on the way down, kept on /var, and requested again.
    lab.stop_sysd();
    assert!(lab.log().contains("released"), "{}", lab.log());
    assert!(!lab.ip(&["-4", "addr", "show", "ve0"]).contains(&addr));
    lab.spawn_sysd();
    lab.wait_log("dhcp-lease: ve0: confirmed", 2);
    let bare = addr.split('/').next().unwrap();
    assert!(
        lab.log()
            .contains(&format!("requesting the previous lease {bare}")),
        "{}",
        lab.log()
    );
    assert_eq!(lab.leased_address(), addr);
}

/// A static config is applied, re-applied without change, changed (the old address goes),
/// and bad configs are refused or rolled back with the node keeping its network.
#[test]
fn static_config_idempotent_and_bad_applies_roll_back() {
    let mut lab = Lab::new();
    let s = lab.subnet.clone();
    let good = format!(
        "version = 1\n[host]\nhostname = \"node-a\"\n[network]\ndns = [\"{s}.53\"]\nsearch = [\"example.test\"]\n[network.interfaces.ve0]\naddresses = [\"{s}.2/24\", \"fd77::2/64\"]\ngateway = \"{s}.1\"\nroutes = [{{ to = \"172.31.0.0/16\", via = \"{s}.1\" }}]\nmtu = 1400\n"
    );
    lab.start_sysd(&good);
    lab.wait_log("network-online", 1);
    let addrs = lab.ip(&["addr", "show", "ve0"]);
    assert!(addrs.contains(&format!("inet {s}.2/24")), "{addrs}");
    assert!(addrs.contains("inet6 fd77::2/64"), "{addrs}");
    assert!(addrs.contains("mtu 1400"), "{addrs}");
    let routes = lab.ip(&["-4", "route"]);
    assert!(
        routes.contains(&format!("default via {s}.1 dev ve0 proto static")),
        "{routes}"
    );
    assert!(
        routes.contains(&format!("172.31.0.0/16 via {s}.1 dev ve0 proto static")),
        "{routes}"
    );
    let resolv = std::fs::read_to_string(lab.path("run/resolv.conf")).unwrap();
    assert!(resolv.contains(&format!("nameserver {s}.53")), "{resolv}");
    let st = lab.status();
    assert_eq!(st["hostname"], "node-a");
    assert_eq!(st["hostname_source"], "config");

    // The same config through apply: nothing changes, nothing is duplicated.
    let (code, body) = lab.request("POST", "/v1/apply", &good);
    assert_eq!(code, 200, "{body}");
    assert_eq!(
        lab.ip(&["-4", "addr", "show", "ve0"])
            .matches("inet ")
            .count(),
        1
    );
    assert_eq!(
        lab.ip(&["-4", "route"]).matches("default").count(),
        1,
        "{}",
        lab.ip(&["-4", "route"])
    );

    let before = lab.ip(&["-4", "addr", "show", "ve0"]);
    // An invalid address: refused by validation, with the key.
    let bad = good.replace(&format!("{s}.2/24"), &format!("{s}.300/24"));
    let (code, body) = lab.request("POST", "/v1/apply", &bad);
    assert_eq!(code, 400, "{body}");
    assert!(
        body.contains("network.interfaces.ve0.addresses[0]"),
        "{body}"
    );
    // An unknown interface: refused before anything changes.
    let bad = good.replace("interfaces.ve0", "interfaces.eth9");
    let (code, body) = lab.request("POST", "/v1/apply", &bad);
    assert_eq!(code, 400, "{body}");
    assert!(
        body.contains("network.interfaces.eth9: no such link"),
        "{body}"
    );
    assert!(body.contains("ve0"), "{body}");
    // A gateway outside every address: refused by validation.
    let bad = good.replace(&format!("gateway = \"{s}.1\""), "gateway = \"10.99.0.1\"");
    let (code, body) = lab.request("POST", "/v1/apply", &bad);
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("gateway: 10.99.0.1 is not inside"), "{body}");
    // No address at all: refused.
    let (code, body) = lab.request(
        "POST",
        "/v1/apply",
        "version = 1\n[network.interfaces.ve0]\nmtu = 1500\n",
    );
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("without an address"), "{body}");
    // A gateway in the subnet that does not answer: applied, checked, rolled back.
    let bad = good
        .replace(&format!("{s}.2/24"), &format!("{s}.3/24"))
        .replace(
            &format!("gateway = \"{s}.1\""),
            &format!("gateway = \"{s}.99\""),
        );
    let (code, body) = lab.request("POST", "/v1/apply", &bad);
    assert_eq!(code, 400, "{body}");
    assert!(
        body.contains(&format!("gateway {s}.99 does not answer")),
        "{body}"
    );
    assert!(body.contains("rolled back"), "{body}");
    let after = lab.ip(&["-4", "addr", "show", "ve0"]);
    assert!(after.contains(&format!("inet {s}.2/24")), "{after}");
    assert!(!after.contains(&format!("inet {s}.3/24")), "{after}");
    assert_eq!(
        before.matches("inet ").count(),
        after.matches("inet ").count()
    );
    let routes = lab.ip(&["-4", "route"]);
    assert!(
        routes.contains(&format!("default via {s}.1 dev ve0 proto static")),
        "{routes}"
    );
    assert!(lab.log().contains("network-rollback"), "{}", lab.log());

    // A good change: the new address replaces the old one.
    let changed = good.replace(&format!("{s}.2/24"), &format!("{s}.4/24"));
    let (code, body) = lab.request("POST", "/v1/apply", &changed);
    assert_eq!(code, 200, "{body}");
    let addrs = lab.ip(&["-4", "addr", "show", "ve0"]);
    assert!(addrs.contains(&format!("inet {s}.4/24")), "{addrs}");
    assert!(!addrs.contains(&format!("inet {s}.2/24")), "{addrs}");
}

/// Two bridge services: addresses from the configured subnet (kept across a restart), names
/// resolvable from each other, outbound traffic masqueraded to a server that has no route
/// back to the bridge, and a published port reachable from outside the node.
#[test]
fn bridge_services_talk_by_name_reach_out_and_publish_ports() {
    assert!(
        Path::new("/usr/sbin/nft").exists(),
        "nft missing: apt-get install nftables (./dev deps)"
    );
    let mut lab = Lab::new();
    let s = lab.subnet.clone();
    let rootfs = lab.path("rootfs");
    busybox::rootfs(&rootfs).unwrap();
    std::fs::create_dir_all(rootfs.join("www")).unwrap();
    std::fs::write(rootfs.join("www/index.html"), "hello from web\n").unwrap();
    std::fs::create_dir_all(lab.path("out")).unwrap();
    // The outside: an HTTP server in the server namespace.
    std::fs::create_dir_all(lab.path("outside")).unwrap();
    std::fs::write(lab.path("outside/ok"), "outside ok\n").unwrap();
    let outside = lab.path("outside").display().to_string();
    run(&[
        "ip",
        "netns",
        "exec",
        &lab.server,
        "busybox",
        "httpd",
        "-p",
        &format!("{s}.1:8099"),
        "-h",
        &outside,
    ]);
    let config = format!(
        r#"version = 1
[network]
dns = ["{s}.1"]
[network.bridge]
subnet = "10.89.0.0/24"
[network.interfaces.ve0]
addresses = ["{s}.2/24"]
gateway = "{s}.1"

[services.web]
image = "{root}"
command = ["httpd", "-f", "-p", "80", "-h", "/www"]
network = "bridge"
ports = ["18081:80/tcp"]
ready = {{ tcp = "127.0.0.1:80", interval = "200ms" }}

[services.client]
image = "{root}"
command = ["sh", "-c", "until wget -q -O /out/by-name http://web/; do sleep 1; done; until wget -q -O /out/outside http://{s}.1:8099/ok; do sleep 1; done; cat /etc/hosts > /out/hosts; exec sleep 100000"]
network = "bridge"
requires = ["web"]
mounts = [{{ type = "bind", source = "{out}", target = "/out" }}]
"#,
        root = rootfs.display(),
        out = lab.path("out").display()
    );
    lab.start_sysd(&config);
    let log = lab.wait_log("sysd: endpoint: client: 10.89.0.", 1);
    assert!(
        log.contains(
            "endpoint: web: 10.89.0.2/24 on keel0 via 10.89.0.1, publishing 18081->80/tcp"
        ),
        "{log}"
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while !lab.path("out/hosts").exists() {
        assert!(
            Instant::now() < deadline,
            "client never finished\n{}",
            lab.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let by_name = std::fs::read_to_string(lab.path("out/by-name")).unwrap();
    assert_eq!(by_name, "hello from web\n");
    let outside = std::fs::read_to_string(lab.path("out/outside")).unwrap();
    assert_eq!(outside, "outside ok\n");
    let hosts = std::fs::read_to_string(lab.path("out/hosts")).unwrap();
    assert!(hosts.contains("10.89.0.2 web\n"), "{hosts}");
    assert!(hosts.contains("10.89.0.3 client\n"), "{hosts}");

    // The published port, from outside the node (the server namespace).
    let url = format!("http://{s}.2:18081/");
    let got = lab.outside_get(&url);
    assert_eq!(got, "hello from web\n");

    // A restart keeps the address.
    let (code, body) = lab.request("POST", "/v1/services/web/restart", "");
    assert_eq!(code, 200, "{body}");
    let log = lab.wait_log("sysd: endpoint: web: 10.89.0.2/24", 2);
    assert!(!log.contains("endpoint: web: 10.89.0.4"), "{log}");
    lab.wait_outside_get(
        "web unreachable after its restart",
        &url,
        "hello from web\n",
        Duration::from_secs(30),
    );

    // Two services cannot publish the same host port: refused at apply time.
    let clash = format!(
        "version = 1\n[services.other]\nimage = \"{}\"\ncommand = [\"sleep\", \"100\"]\nnetwork = \"bridge\"\nports = [\"18081:81\"]\n",
        rootfs.display()
    );
    let (code, body) = lab.request("POST", "/v1/apply", &clash);
    assert_eq!(code, 400, "{body}");
    assert!(
        body.contains("host port 18081/tcp is already published by service"),
        "{body}"
    );
    assert!(body.contains("`web`") && body.contains("`other`"), "{body}");
}

/// A crash of sysd keeps bridge services running: the restarted sysd adopts each container
/// with its place on the bridge (same pid, same address, its published port forwarded and in
/// the ruleset, its name in the hosts file). A container whose address the store now keeps at
/// another one (bad input: state that disagrees with what runs) is refused, says why, and
/// starts fresh at the store's address.
#[test]
fn under_init_a_killed_sysd_adopts_bridge_services_with_their_address_and_ports() {
    assert!(
        Path::new("/usr/sbin/nft").exists(),
        "nft missing: apt-get install nftables (./dev deps)"
    );
    let mut lab = Lab::under_init();
    let s = lab.subnet.clone();
    let rootfs = lab.path("rootfs");
    busybox::rootfs(&rootfs).unwrap();
    std::fs::create_dir_all(rootfs.join("www")).unwrap();
    std::fs::write(rootfs.join("www/index.html"), "hello from web\n").unwrap();
    let config = format!(
        r#"version = 2
[network.bridge]
subnet = "10.91.0.0/24"
[network.interfaces.ve0]
addresses = ["{s}.2/24"]
gateway = "{s}.1"

[services.web]
image = "{root}"
command = ["httpd", "-f", "-p", "80", "-h", "/www"]
ports = ["18082:80/tcp"]
ready = {{ tcp = "127.0.0.1:80", interval = "200ms" }}
stop_timeout = "1s"

[services.other]
image = "{root}"
command = ["sleep", "100000"]
stop_timeout = "1s"
"#,
        root = rootfs.display(),
    );
    lab.start_sysd(&config);
    lab.wait_log("sysd: endpoint: other: 10.91.0.", 1);
    let state = |lab: &Lab, name: &str| -> Value {
        let (code, body) = lab.request("GET", &format!("/v1/services/{name}"), "");
        assert_eq!(code, 200, "{body}");
        serde_json::from_str(&body).unwrap()
    };
    let wait = |lab: &Lab, what: &str, ok: &dyn Fn(&Lab) -> bool| {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !ok(lab) {
            assert!(Instant::now() < deadline, "{what}\n{}", lab.log());
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    let pid = |lab: &Lab, name: &str| state(lab, name)["pid"].as_i64().unwrap_or(0);
    wait(&lab, "web and other running", &|l| {
        state(l, "web")["state"] == "running" && state(l, "other")["state"] == "running"
    });
    let url = format!("http://{s}.2:18082/");
    lab.wait_outside_get(
        "web's published port",
        &url,
        "hello from web\n",
        Duration::from_secs(60),
    );
    let (web, other) = (pid(&lab, "web"), pid(&lab, "other"));
    // Each one's address, as the hosts file names it (.2 and .3, in the order they started).
    let hosts = std::fs::read_to_string(lab.path("run/hosts")).unwrap();
    let address_of = |name: &str| {
        hosts
            .lines()
            .find_map(|l| l.strip_suffix(&format!(" {name}")))
            .unwrap_or_else(|| panic!("{name} not in the hosts file:\n{hosts}"))
            .to_string()
    };
    let (web_ip, other_ip) = (address_of("web"), address_of("other"));
    assert!(
        [&web_ip, &other_ip]
            .iter()
            .all(|a| a.starts_with("10.91.0.")),
        "{hosts}"
    );

    // The store now keeps `other` at .9 (as if its lease had been edited while sysd was
    // down): its running container disagrees with it.
    let ipam = lab.path("var/network/ipam.json");
    let text = std::fs::read_to_string(&ipam).unwrap();
    let quoted = format!("\"{other_ip}\"");
    assert!(text.contains(&quoted), "{text}");
    std::fs::write(&ipam, text.replace(&quoted, "\"10.91.0.9\"")).unwrap();

    let old = lab.sysd.kill_sysd().expect("sysd's pid");
    while Path::new(&format!("/proc/{old}")).exists() {
        std::thread::sleep(Duration::from_millis(1));
    }
    wait(&lab, "init to restart sysd", &|l| {
        l.sysd.pid().is_some_and(|p| p != old)
            && l.sysd.try_request("GET", "/v1/services", "").is_ok()
    });
    wait(&lab, "other to run again", &|l| {
        state(l, "other")["state"] == "running" && pid(l, "other") != other
    });
    let events = lab.sysd.events();
    let find = |svc: &str, kind: &str| {
        events
            .iter()
            .find(|e| e["service"] == svc && e["kind"] == kind)
            .map(|e| e["message"].as_str().unwrap_or_default().to_string())
    };
    // web: adopted, the same process, its place taken back.
    assert!(find("web", "adopted").is_some(), "{events:#?}");
    assert!(find("web", "adopt-refused").is_none(), "{events:#?}");
    assert_eq!(pid(&lab, "web"), web);
    assert_eq!(state(&lab, "web")["state"], "running");
    let log = lab.log();
    assert!(
        log.contains(&format!(
            "endpoint: web: {web_ip}/24 on keel0 via 10.91.0.1 (kept), publishing 18082->80/tcp"
        )),
        "{log}"
    );
    // other: refused with the reason, then started fresh at the store's address.
    let refused = find("other", "adopt-refused").unwrap_or_else(|| panic!("{events:#?}"));
    assert!(
        refused.contains(&format!("{other_ip}/24"))
            && refused.contains("differs from the address the store keeps for it, 10.91.0.9"),
        "{refused}"
    );
    assert!(find("other", "adopted").is_none(), "{events:#?}");
    lab.wait_log("sysd: endpoint: other: 10.91.0.9/24", 1);
    // Both in the hosts file and web's port in the ruleset the last attach loaded (it renders
    // every attached service's ports: web's are there only because its adoption put them back).
    let hosts = std::fs::read_to_string(lab.path("run/hosts")).unwrap();
    assert!(
        hosts.contains(&format!("{web_ip} web\n")) && hosts.contains("10.91.0.9 other\n"),
        "{hosts}"
    );
    let rules = run(&[
        "ip",
        "netns",
        "exec",
        &lab.client,
        "nft",
        "list",
        "table",
        "ip",
        "keelson",
    ]);
    assert!(rules.contains("18082"), "{rules}");
    assert_eq!(lab.outside_get(&url), "hello from web\n", "{}", lab.log());
    // The veth of other's first container went with it; one per service remains.
    let links = lab.ip(&["-o", "link", "show", "master", "keel0"]);
    assert_eq!(links.lines().count(), 2, "{links}");
}
