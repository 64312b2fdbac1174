//! Watching a node from off it, against real peers: Debian's Prometheus scrapes a sysd and
//! the test asks Prometheus (its HTTP query API) for a node series and a service's series;
//! Debian's rsyslog receives the forwarded logs over TCP and over TLS (rsyslog-gnutls), goes
//! away and comes back, and every line arrives in order.
//!
//! Each test runs in a network namespace of its own (`registry::private_netns`), where sysd,
//! Prometheus and rsyslog listen on loopback. Root, busybox-static, prometheus, rsyslog,
//! rsyslog-gnutls and openssl are needed (`./dev deps`); a missing one fails, naming it.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use keelson_testkit::daemon::Daemon;
use keelson_testkit::peers::{http_get, Here, Prometheus, Rsyslog};
use keelson_testkit::registry::{private_ca, private_netns};
use keelson_testkit::{busybox, tools};

const SYSD: &str = env!("CARGO_BIN_EXE_sysd");

/// A sysd with `config` as its system file (`ROOTFS` replaced by the busybox root).
fn sysd(dir: &Path, config: &str) -> Daemon {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(unsafe { libc::geteuid() }, 0, "these tests need root");
    let rootfs = dir.join("rootfs");
    busybox::rootfs(&rootfs).expect("busybox rootfs");
    let d = dir.display().to_string();
    let mut daemon = Daemon::new(SYSD, dir, Daemon::cgroup_parent_for("obs", dir)).args([
        "--userdata-config".to_string(),
        format!("{d}/var/user-data.toml"),
        "--forward-dir".to_string(),
        format!("{d}/var/forward"),
        "--no-firstboot".to_string(),
    ]);
    std::fs::create_dir_all(dir.join("system")).unwrap();
    std::fs::write(
        dir.join("system/10-test.toml"),
        config.replace("ROOTFS", &rootfs.display().to_string()),
    )
    .unwrap();
    daemon.start(Duration::from_secs(60));
    daemon
}

#[test]
fn prometheus_scrapes_node_and_service_figures() {
    private_netns().expect("network namespace (run as root)");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut daemon = sysd(
        d,
        r#"version = 1
[metrics]
listen = "127.0.0.1:9100"

[services.hog]
image = "ROOTFS"
command = ["sh", "-c", "head -c 41943040 /dev/zero > /blob/fill && echo allocated && exec sleep 100000"]
mounts = [{ type = "tmpfs", target = "/blob", size = "64M" }]
"#,
    );
    daemon.wait_until("hog to allocate", Duration::from_secs(60), |d| {
        d.request("GET", "/v1/services/hog/logs", "")
            .1
            .contains("allocated")
    });
    // The format parses in Prometheus' own checker.
    let (status, scrape) = http_get("127.0.0.1:9100", "/metrics").unwrap();
    assert_eq!(status, 200, "{scrape}");
    let mut check = Command::new(tools::resolve("promtool").expect("promtool"))
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    check
        .stdin
        .take()
        .unwrap()
        .write_all(scrape.as_bytes())
        .unwrap();
    let out = check.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // Exit 1 is a parse error; 3 is lint advice. The only advice allowed is about
    // node_exporter's own camelCase meminfo names, which dashboards expect as they are.
    let lint_ok = said.lines().all(|l| {
        l.is_empty()
            || (l.starts_with("node_memory_")
                && l.ends_with("should be written in 'snake_case' not 'camelCase'"))
    });
    assert!(
        out.status.success() || (out.status.code() == Some(3) && lint_ok),
        "promtool check metrics: {said}\n--- scrape ---\n{scrape}"
    );

    let prom = Prometheus::start(
        &Here,
        &d.join("prometheus"),
        "127.0.0.1:9090",
        "127.0.0.1:9100",
    );
    let query = |q: &str, _: &Path| prom.value(&Here, q);
    assert_eq!(query("up{job=\"keelson\"}", d), 1.0);
    let mem_total = query("node_memory_MemTotal_bytes", d);
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap();
    let kb: f64 = meminfo
        .lines()
        .next()
        .unwrap()
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(mem_total, kb * 1024.0);
    // cpu.stat is in every cgroup v2; the memory controller is not on hosts whose memory
    // controller sits in a v1 hierarchy (the QEMU scenario checks the 40 MiB on a node).
    assert!(query("container_cpu_usage_seconds_total{name=\"hog\"}", d) > 0.0);
    if scrape.contains("container_memory_usage_bytes{name=\"hog\"") {
        let used = query("container_memory_usage_bytes{name=\"hog\"}", d);
        let mib = used / f64::from(1 << 20);
        assert!(
            (40.0..48.0).contains(&mib),
            "hog uses {mib:.1} MiB, expected ~40"
        );
        let peak = query("container_memory_max_usage_bytes{name=\"hog\"}", d);
        assert!(peak >= used, "peak {peak} < current {used}");
    } else {
        // Where cgroup2 is mounted on this host (sysd mounts the same hierarchy).
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
        let v2 = mounts
            .lines()
            .find_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f.get(2) == Some(&"cgroup2")).then(|| f[1].to_string())
            })
            .expect("a cgroup2 mount");
        let controllers =
            std::fs::read_to_string(Path::new(&v2).join("cgroup.controllers")).unwrap();
        assert!(
            !controllers.split_whitespace().any(|c| c == "memory"),
            "the memory controller is there ({controllers}) but no memory series was exported"
        );
    }
    assert_eq!(
        query("keelson_service_state{name=\"hog\",state=\"running\"}", d),
        1.0
    );
    assert!(query("sum(node_cpu_seconds_total)", d) > 0.0);
    assert!(query("process_resident_memory_bytes{job=\"keelson\"}", d) > 1e6);
    assert!(query("sum(keelson_api_requests_total{code=\"200\"})", d) >= 1.0);
    daemon.terminate();
}

/// Makes the `talker` service print `lines` (it cats what appears in its volume).
fn talk(d: &Path, lines: &[String]) {
    let vol = d.join("var/volumes/talk");
    std::fs::create_dir_all(&vol).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while vol.join("lines").exists() {
        assert!(
            Instant::now() < deadline,
            "talker never took its last lines"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    std::fs::write(vol.join("lines.tmp"), lines.join("\n") + "\n").unwrap();
    std::fs::rename(vol.join("lines.tmp"), vol.join("lines")).unwrap();
}

fn forwarding_config(target: &str, tls: Option<&Path>) -> String {
    let tls = tls.map_or(String::new(), |ca| {
        format!(
            "transport = \"tls\"\nca_file = \"{}\"\nserver_name = \"127.0.0.1\"\n",
            ca.display()
        )
    });
    format!(
        r#"version = 1
[logging.forward]
target = "{target}"
{tls}exclude = ["quiet"]

[services.talker]
image = "ROOTFS"
command = ["sh", "-c", "while true; do if [ -f /data/lines ]; then cat /data/lines; rm /data/lines; fi; sleep 0.1; done"]
mounts = [{{ type = "volume", source = "talk", target = "/data" }}]

[services.quiet]
image = "ROOTFS"
command = ["sh", "-c", "while true; do echo secret; sleep 0.5; done"]
"#
    )
}

/// The talker's `tag N` lines rsyslog has, as N in arrival order.
fn numbers(lines: &[String], tag: &str) -> Vec<u32> {
    lines
        .iter()
        .filter_map(|l| {
            l.strip_prefix("talker stdout [keelson@32473 service=\"talker\" stream=\"stdout\"] ")?
                .strip_prefix(tag)?
                .trim()
                .parse()
                .ok()
        })
        .collect()
}

const WAIT: Duration = Duration::from_secs(60);

fn batch(tag: &str, n: u32) -> Vec<String> {
    (0..n).map(|i| format!("{tag} {i}")).collect()
}

#[test]
fn rsyslog_over_tcp_gets_every_line_in_order_across_an_outage() {
    private_netns().expect("network namespace (run as root)");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut rsyslog = Rsyslog::start(&Here, &d.join("rsyslog"), 1601, None);
    let mut daemon = sysd(d, &forwarding_config("127.0.0.1:1601", None));
    talk(d, &batch("before", 50));
    let lines = rsyslog.wait_for("the first batch", WAIT, |l| {
        numbers(l, "before").len() == 50
    });
    assert_eq!(numbers(&lines, "before"), (0..50).collect::<Vec<_>>());
    assert!(
        lines.iter().any(
            |l| l.starts_with("sysd started [keelson@32473 kind=\"started\"")
                && l.contains("service=\"talker\"")
        ),
        "sysd's events arrive with app-name sysd: {lines:#?}"
    );
    assert!(
        !lines.iter().any(|l| l.contains("secret")),
        "quiet is excluded"
    );

    rsyslog.stop();
    talk(d, &batch("away", 300));
    daemon.wait_until("the lines while away", Duration::from_secs(30), |d| {
        d.request("GET", "/v1/services/talker/logs?tail=1", "")
            .1
            .contains("away 299")
    });
    std::thread::sleep(Duration::from_secs(2));
    rsyslog.restart(&Here);
    let lines = rsyslog.wait_for("the lines written while it was away", WAIT, |l| {
        numbers(l, "away").contains(&299)
    });
    assert_eq!(
        numbers(&lines, "away"),
        (0..300).collect::<Vec<_>>(),
        "every line, in order, once"
    );
    daemon.terminate();
}

#[test]
fn rsyslog_over_tls_gets_the_service_lines() {
    private_netns().expect("network namespace (run as root)");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let pki = d.join("pki");
    std::fs::create_dir_all(&pki).unwrap();
    let (ca, cert, key) = private_ca(&pki);
    let rsyslog = Rsyslog::start(&Here, &d.join("rsyslog"), 6514, Some((&ca, &cert, &key)));
    let mut daemon = sysd(d, &forwarding_config("127.0.0.1:6514", Some(&ca)));
    talk(d, &batch("secure", 20));
    let lines = rsyslog.wait_for("the lines over TLS", WAIT, |l| {
        numbers(l, "secure").len() == 20
    });
    assert_eq!(numbers(&lines, "secure"), (0..20).collect::<Vec<_>>());
    let events = daemon.events();
    assert!(
        events.iter().any(|e| e["kind"] == "forward"
            && e["message"] == "forwarding logs to 127.0.0.1:6514 over tls"),
        "{events:#?}"
    );
    daemon.terminate();
}

#[test]
fn a_receiver_with_another_ca_gets_nothing_and_a_bad_ca_file_is_named() {
    private_netns().expect("network namespace (run as root)");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (theirs, mine) = (d.join("theirs"), d.join("mine"));
    std::fs::create_dir_all(&theirs).unwrap();
    std::fs::create_dir_all(&mine).unwrap();
    let (ca, cert, key) = private_ca(&theirs);
    let (other_ca, _, _) = private_ca(&mine);
    let rsyslog = Rsyslog::start(&Here, &d.join("rsyslog"), 6514, Some((&ca, &cert, &key)));
    let mut daemon = sysd(d, &forwarding_config("127.0.0.1:6514", Some(&other_ca)));
    talk(d, &batch("leak", 5));
    std::thread::sleep(Duration::from_secs(3));
    assert!(numbers(&rsyslog.lines(), "leak").is_empty());
    daemon.wait_until(
        "the refused certificate in the log",
        Duration::from_secs(30),
        |d| {
            d.log()
                .contains("forward: cannot reach tls://127.0.0.1:6514")
        },
    );
    daemon.terminate();

    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nowhere/ca.pem");
    let mut daemon = sysd(
        dir.path(),
        &forwarding_config("127.0.0.1:6514", Some(&missing)),
    );
    let events = daemon.events();
    let error = events
        .iter()
        .find(|e| e["kind"] == "forward-error")
        .unwrap_or_else(|| panic!("{events:#?}"));
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .starts_with(&format!("logging.forward.ca_file {}: ", missing.display())),
        "{error}"
    );
    daemon.terminate();
}

/// `[metrics.tls]`: Prometheus scrapes over HTTPS with a client certificate of the CA the node
/// names (files on the node, as user data would write them); plain HTTP to the port and a
/// client without a certificate get nothing.
#[test]
fn prometheus_scrapes_over_https_with_a_client_certificate() {
    private_netns().expect("network namespace (run as root)");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let pki = d.join("pki");
    std::fs::create_dir_all(&pki).unwrap();
    let ca = |name: &str| {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let cert = params.self_signed(&key).unwrap();
        (cert.pem(), rcgen::Issuer::new(params, key))
    };
    let issue = |ca: &rcgen::Issuer<'static, rcgen::KeyPair>, name: &str, file: &str| {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec![name.to_owned()])
            .unwrap()
            .signed_by(&key, ca)
            .unwrap();
        let (c, k) = (
            pki.join(format!("{file}.crt")),
            pki.join(format!("{file}.key")),
        );
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        (c, k)
    };
    let (node_ca, node_issuer) = ca("node CA");
    let (scrapers_ca, scrapers_issuer) = ca("scrapers");
    std::fs::write(pki.join("node-ca.crt"), &node_ca).unwrap();
    std::fs::write(pki.join("scrapers.crt"), &scrapers_ca).unwrap();
    let (node_cert, node_key) = issue(&node_issuer, "127.0.0.1", "node");
    let (prom_cert, prom_key) = issue(&scrapers_issuer, "prometheus", "prometheus");

    let mut daemon = sysd(
        d,
        &format!(
            r#"version = 1
[metrics]
listen = "127.0.0.1:9443"

[metrics.tls]
cert = "{}"
key = "{}"
client_ca = "{}"
"#,
            node_cert.display(),
            node_key.display(),
            pki.join("scrapers.crt").display()
        ),
    );
    daemon.wait_until("the exporter", Duration::from_secs(30), |d| {
        d.log()
            .contains("serving /metrics on https://127.0.0.1:9443")
    });
    // Plain HTTP to the HTTPS port: no scrape.
    let plain = http_get("127.0.0.1:9443", "/metrics");
    assert!(
        plain.as_ref().map_or(true, |(status, _)| *status != 200),
        "{plain:?}"
    );

    let prom = Prometheus::start_https(
        &Here,
        &d.join("prometheus"),
        "127.0.0.1:9090",
        "127.0.0.1:9443",
        &pki.join("node-ca.crt"),
        Some((&prom_cert, &prom_key)),
    );
    assert_eq!(prom.value(&Here, "up{job=\"keelson\"}"), 1.0);
    assert!(prom.value(&Here, "node_memory_MemTotal_bytes") > 0.0);
    drop(prom);

    // Without a client certificate the scrape fails: `up` is 0.
    let prom = Prometheus::start_https(
        &Here,
        &d.join("prometheus-anonymous"),
        "127.0.0.1:9091",
        "127.0.0.1:9443",
        &pki.join("node-ca.crt"),
        None,
    );
    assert_eq!(prom.value(&Here, "up{job=\"keelson\"}"), 0.0);
    daemon.terminate();
}
