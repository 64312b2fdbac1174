//! The multi-node harness on the test image: three nodes on one LAN (a bridge in the test's
//! network namespace, dnsmasq handing out reserved addresses and names), each with its own
//! first-boot user data. The nodes reach each other and the namespace reaches them; a node cut
//! off the LAN is unreachable while the others are not, and reachable again once healed; a node
//! killed hard boots again with what it wrote to /var and its address. Prints the cold, parallel
//! boot times of the three nodes (a benchmark input for the fleet issue, not an assertion).

use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use qemu_tests::cluster::HOST_ADDR;
use qemu_tests::scenario::{http_get_until, test_image};
use qemu_tests::{Cluster, GuestBuilder, NodeConfig, TEST_SHELL_PORT};

/// Generous: three TCG guests share two cores (with whatever else the machine runs).
const BOOT: Duration = Duration::from_secs(900);
const REACH: Duration = Duration::from_secs(120);
const HELLO_PORT: u16 = 8090;

/// A service of the node's own, from its user data: the node's name over HTTP.
fn user_data(name: &str) -> String {
    format!(
        r#"version = 1

[services.hello]
image = "/usr/lib/keelson/images/base"
command = ["sh", "-c", "mkdir -p /tmp/www && echo hello from {name} > /tmp/www/index.html && exec httpd -f -p {HELLO_PORT} -h /tmp/www"]
network = "host"
ready = {{ tcp = "127.0.0.1:{HELLO_PORT}", interval = "1s" }}
"#
    )
}

/// From `from`'s shell: the host name that `to`'s shell reports, or what went wrong.
fn hostname_via(c: &Cluster, from: usize, to: Ipv4Addr) -> String {
    c.guest(from).sh(&format!(
        "printf 'cat /proc/1/root/etc/hostname\\nexit\\n' | nc -w 5 {to} {TEST_SHELL_PORT}; echo \"nc=$?\""
    ))
}

/// Whether the namespace opens a TCP connection to `addr` within 5 s.
fn reachable(c: &Cluster, addr: Ipv4Addr) -> bool {
    let addr = SocketAddr::from((addr, TEST_SHELL_PORT));
    c.run_in(|| TcpStream::connect_timeout(&addr, Duration::from_secs(5)).is_ok())
}

/// Retries `check` every 2 s until it holds, failing the test after [`REACH`].
fn eventually(what: &str, mut check: impl FnMut() -> Result<(), String>) {
    let deadline = Instant::now() + REACH;
    loop {
        match check() {
            Ok(()) => return,
            Err(e) if Instant::now() > deadline => panic!("{what}: {e}"),
            Err(_) => std::thread::sleep(Duration::from_secs(2)),
        }
    }
}

/// The time of the first console line containing `pattern`, counted from the cluster's spawn.
fn line_time(c: &Cluster, i: usize, pattern: &str) -> Duration {
    let g = c.guest(i);
    let (at, _) = g
        .lines_with_times()
        .into_iter()
        .find(|(_, l)| l.contains(pattern))
        .unwrap_or_else(|| panic!("{}: no line {pattern:?}", c.name(i)));
    g.spawned_at().saturating_duration_since(c.spawned_at()) + at
}

#[test]
fn three_nodes_share_a_lan_are_cut_off_healed_and_survive_a_hard_kill() {
    let started = Instant::now();
    let template = GuestBuilder::from_image_dir(&test_image())
        .unwrap()
        .disk_size(2 << 30)
        .memory_mib(512);
    let mut c = ["node1", "node2", "node3"]
        .iter()
        .fold(Cluster::builder(template), |b, name| {
            b.node(NodeConfig::new(name).user_data(&user_data(name)))
        })
        .spawn()
        .unwrap();

    // Cold boot, all three at once.
    let ready = c.expect_all("sysd: testshell: ready", BOOT);
    let wall = ready.iter().max().copied().unwrap_or_default();
    let rows: Vec<(String, f64, f64, f64)> = (0..c.len())
        .map(|i| {
            (
                c.name(i).to_string(),
                line_time(&c, i, "keelson-init: boot complete").as_secs_f64(),
                line_time(&c, i, "sysd: dhcp-lease: eth0:").as_secs_f64(),
                ready[i].as_secs_f64(),
            )
        })
        .collect();
    for i in 0..c.len() {
        let (name, addr) = (c.name(i), c.addr(i));
        let log = c.guest(i).serial_log();
        assert!(
            log.contains(&format!(
                "sysd: dhcp-lease: eth0: offered {addr}/24 from {HOST_ADDR}"
            )),
            "{name} did not get its reserved address {addr}:\n{}",
            c.guest(i).serial_tail(60)
        );
        assert_eq!(
            c.guest(i).sh("cat /proc/1/root/etc/hostname").trim(),
            name,
            "{name}'s host name (from its DHCP reservation)"
        );
    }

    // The namespace reaches every node's shell and the service from its own user data.
    for i in 0..c.len() {
        assert!(reachable(&c, c.addr(i)), "{} unreachable", c.name(i));
        let hello = SocketAddr::from((c.addr(i), HELLO_PORT));
        http_get_until(c.guest(i), hello, "/", &format!("hello from {}", c.name(i)));
    }

    // Node to node, by address (through node2's and node3's shells) and by name (dnsmasq).
    for to in [1, 2] {
        let out = hostname_via(&c, 0, c.addr(to));
        assert!(out.contains(c.name(to)), "node1 -> {}: {out}", c.name(to));
    }
    let ping = c
        .guest(0)
        .sh(&format!("ping -c 1 -W 5 {} && echo ping=ok", c.addr(2)));
    assert!(ping.contains("ping=ok"), "node1 -> node3: {ping}");
    // (Asked of dnsmasq by address: the test shell's container has no resolv.conf of its own.)
    let lookup = c.guest(0).sh(&format!("nslookup node3 {HOST_ADDR}"));
    assert!(lookup.contains("Address: 10.77.0.13"), "{lookup}");

    // node2 cut off: neither node1 nor the namespace reaches it; node3 still answers.
    c.cut(1).unwrap();
    let out = hostname_via(&c, 0, c.addr(1));
    assert!(
        !out.contains("node2"),
        "node2 answered while cut off: {out}"
    );
    assert!(
        !reachable(&c, c.addr(1)),
        "namespace reached node2 while cut"
    );
    let out = hostname_via(&c, 0, c.addr(2));
    assert!(out.contains("node3"), "node3 while node2 is cut: {out}");
    c.heal(1).unwrap();
    eventually("node1 -> node2 after heal", || {
        let out = hostname_via(&c, 0, c.addr(1));
        if out.contains("node2") {
            Ok(())
        } else {
            Err(out)
        }
    });
    assert!(reachable(&c, c.addr(1)), "namespace -> node2 after heal");

    // node3 writes to /var, is killed hard and restarted: the file and the address are back.
    let token = format!("written before the power cut {}", std::process::id());
    let out = c.guest(2).sh(&format!(
        "echo '{token}' > /proc/1/root/var/lib/keelson/cluster-test && sync && echo wrote"
    ));
    assert!(out.contains("wrote"), "{out}");
    c.kill(2).unwrap();
    assert!(!reachable(&c, c.addr(2)), "node3 answered after its kill");
    c.restart(2).unwrap();
    c.guest(2).expect("keelson-init: boot complete", BOOT);
    c.guest(2).expect("sysd: testshell: ready", BOOT);
    assert_eq!(
        c.guest(2)
            .sh("cat /proc/1/root/var/lib/keelson/cluster-test")
            .trim(),
        token
    );
    let addr = c.guest(2).sh("ip -4 -o addr show eth0");
    assert!(addr.contains("10.77.0.13/24"), "{addr}");
    let log = c.guest(2).serial_log();
    assert!(
        log.contains("dhcp-reboot: eth0: requesting the previous lease 10.77.0.13"),
        "the lease kept on /var was not asked for again:\n{}",
        c.guest(2).serial_tail(60)
    );
    let out = hostname_via(&c, 0, c.addr(2));
    assert!(out.contains("node3"), "node1 -> restarted node3: {out}");

    println!("\n## Cold boot of 3 test-image nodes in parallel (TCG, 512 MiB, 1 vCPU each)\n");
    println!("| node | boot complete (s) | DHCP lease (s) | test shell ready (s) |");
    println!("|---|---:|---:|---:|");
    for (name, complete, lease, ready) in rows {
        println!("| {name} | {complete:.1} | {lease:.1} | {ready:.1} |");
    }
    println!(
        "\nall three ready {:.1} s after the first spawn (times from it); scenario {:.0} s",
        wall.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
}
