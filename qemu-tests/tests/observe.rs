//! Issue 18 on a node: Debian's Prometheus scrapes a Keelson guest's `/metrics` and is asked,
//! through its HTTP query API, for node and service series (a service that fills 40 MiB of
//! tmpfs shows ~40 MiB); Debian's rsyslog receives the guest's forwarded service lines with
//! the service as app-name and `[keelson@32473 service=… stream=…]`. Both peers run in the
//! guest's network namespace (QEMU's `10.0.2.2` is their 127.0.0.1).

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use keelson_testkit::peers::{Place, Prometheus, Rsyslog};
use qemu_tests::scenario::{fresh_disk, test_guest};
use qemu_tests::Guest;

const METRICS_PORT: u16 = 19100;

struct GuestNs<'g>(&'g Guest);

impl Place for GuestNs<'_> {
    fn command(&self, program: &Path) -> Command {
        self.0.netns().command(program)
    }
    fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        self.0.run_in_netns(f)
    }
}

const CONFIG: &str = r#"version = 1
[metrics]
listen = "0.0.0.0:9100"

[logging.forward]
target = "10.0.2.2:1601"

[services.filler]
image = "/usr/lib/keelson/images/base"
command = ["sh", "-c", "head -c 41943040 /dev/zero > /blob/fill && echo allocated && exec sleep 100000"]
mounts = [{ type = "tmpfs", target = "/blob", size = "64M" }]

[services.ticker]
image = "/usr/lib/keelson/images/base"
command = ["sh", "-c", "i=0; while true; do echo tick $i; i=$((i+1)); sleep 1; done"]
"#;

#[test]
fn prometheus_scrapes_a_node_and_rsyslog_receives_its_logs() {
    let dir = tempfile::tempdir().unwrap();
    let disk = fresh_disk(dir.path());
    let g = test_guest(&disk)
        .forward(METRICS_PORT, 9100)
        .spawn()
        .unwrap();
    g.expect("sysd: testshell: ready", Duration::from_secs(300));
    let ns = GuestNs(&g);
    let rsyslog = Rsyslog::start(&ns, &dir.path().join("rsyslog"), 1601, None);
    let out = g.sh(&format!(
        "cat > /tmp/u.toml <<'EOF'\n{CONFIG}EOF\nkeelctl apply /tmp/u.toml"
    ));
    assert!(out.contains("filler") && out.contains("ticker"), "{out}");
    let deadline = Instant::now() + Duration::from_secs(120);
    while !g.sh("keelctl logs filler").contains("allocated") {
        assert!(
            Instant::now() < deadline,
            "filler never filled its 40 MiB\n{}",
            g.serial_tail(40)
        );
        std::thread::sleep(Duration::from_secs(1));
    }

    let prom = Prometheus::start(
        &ns,
        &dir.path().join("prometheus"),
        "127.0.0.1:9090",
        &format!("127.0.0.1:{METRICS_PORT}"),
    );
    assert_eq!(prom.value(&ns, "up{job=\"keelson\"}"), 1.0);
    let total = prom.value(&ns, "node_memory_MemTotal_bytes") / f64::from(1 << 20);
    assert!(
        (800.0..=1024.0).contains(&total),
        "MemTotal {total} MiB of a 1 GiB guest"
    );
    let var = prom.value(&ns, "node_filesystem_size_bytes{mountpoint=\"/var\"}");
    assert!(var > 1e8, "/var is {var} bytes");
    assert_eq!(
        prom.value(&ns, "keelson_os_info{slot=\"a\",id=\"keelson\"}"),
        1.0
    );
    assert!(prom.value(&ns, "sum(rate(node_cpu_seconds_total[1m]))") >= 0.0);
    assert!(prom.value(&ns, "node_network_receive_bytes_total{device=\"eth0\"}") > 0.0);
    let used =
        prom.value(&ns, "container_memory_usage_bytes{name=\"filler\"}") / f64::from(1 << 20);
    assert!(
        (40.0..48.0).contains(&used),
        "filler uses {used:.1} MiB, expected ~40"
    );
    let peak =
        prom.value(&ns, "container_memory_max_usage_bytes{name=\"filler\"}") / f64::from(1 << 20);
    assert!(peak >= 40.0, "filler's peak {peak:.1} MiB");
    assert_eq!(
        prom.value(
            &ns,
            "keelson_service_state{name=\"ticker\",state=\"running\"}"
        ),
        1.0
    );

    let prefix = "ticker stdout [keelson@32473 service=\"ticker\" stream=\"stdout\"] tick ";
    let lines = rsyslog.wait_for("the ticker's lines", Duration::from_secs(90), |l| {
        l.iter().filter(|l| l.starts_with(prefix)).count() >= 5
    });
    let ticks: Vec<u32> = lines
        .iter()
        .filter_map(|l| l.strip_prefix(prefix)?.parse().ok())
        .collect();
    assert!(
        ticks.windows(2).all(|w| w[1] == w[0] + 1),
        "in order, none missing: {ticks:?}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("sysd forward [keelson@32473 kind=\"forward\"")),
        "sysd's own events arrive too: {lines:#?}"
    );
}
