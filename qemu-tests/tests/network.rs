//! Host networking scenarios of the networking issue, on the test image under QEMU TCG with
//! QEMU's user network (its DHCP server hands out 10.0.2.15, gateway 10.0.2.2, DNS 10.0.2.3).
//! The guest runs in the test's own network namespace; "the outside" is a small HTTP server
//! the test starts in that namespace, which the guest reaches at 10.0.2.2.
//!
//! Driven like services.rs: keelctl in the `testshell` service (port 7000, forwarded), and
//! sysd's event lines on the console.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::time::{Duration, Instant};

use qemu_tests::scenario::{fresh_disk, http_get_until, test_guest};
use qemu_tests::Guest;

const BOOT: Duration = Duration::from_secs(240);

/// An HTTP server on 127.0.0.1 of the guest's namespace (10.0.2.2 from inside the guest).
fn outside_server(g: &Guest) -> u16 {
    outside_server_on(g, 0)
}

fn outside_server_on(g: &Guest, port: u16) -> u16 {
    let listener = g.run_in_netns(|| TcpListener::bind(("127.0.0.1", port)).unwrap());
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for mut conn in listener.incoming().flatten() {
            let mut buf = [0u8; 1024];
            let _ = conn.read(&mut buf);
            let body = "hello from the test namespace\n";
            let _ = write!(
                conn,
                "HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
        }
    });
    port
}

/// The default route line of `keelctl net`, blanks squeezed: `default 10.0.2.2 eth0 static 0`.
fn default_route(g: &Guest) -> String {
    let net = g.sh("keelctl net");
    net.lines()
        .find(|l| l.starts_with("default "))
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|| panic!("no default route: {net}"))
}

fn apply(g: &Guest, toml: &str) -> String {
    g.sh(&format!(
        "cat > /tmp/net.toml <<'EOF'\n{toml}\nEOF\nkeelctl apply /tmp/net.toml; echo \"exit=$?\""
    ))
}

/// The default rule gets QEMU's DHCP lease and reaches the outside; a static config applied
/// through the API replaces it; a config whose gateway does not answer is rolled back; after
/// going back to DHCP and a reboot, the lease kept on /var is requested again.
#[test]
fn default_dhcp_static_apply_rollback_and_lease_after_reboot() {
    let dir = tempfile::tempdir().unwrap();
    let disk = fresh_disk(dir.path());
    let g = test_guest(&disk).spawn().unwrap();
    g.expect(
        "sysd: dhcp-lease: eth0: offered 10.0.2.15/24 from 10.0.2.2",
        BOOT,
    );
    g.expect(
        "sysd: network-online: default route and DNS server present",
        BOOT,
    );
    g.expect("sysd: testshell: ready", BOOT);
    let console = g.serial_log();
    // The test shell waits for network-online (after = ["network-online"]).
    let online = console.find("sysd: network-online").unwrap();
    let shell = console.find("sysd: testshell: started").unwrap();
    assert!(online < shell, "testshell started before network-online");

    let net = g.sh("keelctl net");
    assert!(net.contains("online:   online"), "{net}");
    assert!(net.contains("10.0.2.15/24"), "{net}");
    assert!(net.contains("dns:      10.0.2.3"), "{net}");
    assert!(net.contains("default"), "{net}");
    assert!(net.contains("dhcp"), "{net}");
    let resolv = g.sh("cat /proc/1/root/run/keelson/resolv.conf");
    assert!(resolv.contains("nameserver 10.0.2.3"), "{resolv}");
    let host = g.sh("cat /proc/1/root/etc/hostname");
    assert!(host.trim().starts_with("keelson-"), "{host}");

    let port = outside_server(&g);
    let got = g.sh(&format!("wget -q -O - http://10.0.2.2:{port}/"));
    assert!(got.contains("hello from the test namespace"), "{got}");

    // A static config through the API (what first-boot user data will also produce).
    let static_cfg = "version = 1\n[host]\nhostname = \"static-node\"\n[network]\ndns = [\"10.0.2.3\"]\n[network.interfaces.eth0]\naddresses = [\"10.0.2.15/24\"]\ngateway = \"10.0.2.2\"\n";
    let out = apply(&g, static_cfg);
    assert!(out.contains("exit=0"), "{out}");
    let net = g.sh("keelctl net");
    assert!(net.contains("static"), "{net}");
    assert!(net.contains("static-node"), "{net}");
    assert!(default_route(&g).contains("10.0.2.2 eth0 static"), "{net}");
    let got = g.sh(&format!("wget -q -O - http://10.0.2.2:{port}/"));
    assert!(got.contains("hello from the test namespace"), "{got}");

    // A gateway that does not answer: tried, rolled back, the node keeps its network.
    let bad = static_cfg.replace("gateway = \"10.0.2.2\"", "gateway = \"10.0.2.99\"");
    let out = apply(&g, &bad);
    assert!(out.contains("exit=1"), "{out}");
    assert!(out.contains("gateway 10.0.2.99 does not answer"), "{out}");
    assert!(out.contains("rolled back"), "{out}");
    assert!(default_route(&g).contains("10.0.2.2 eth0 static"));
    let routes = g.sh("ip route");
    assert!(!routes.contains("10.0.2.99"), "{routes}");
    // An unknown interface: refused before anything changes.
    let out = apply(
        &g,
        &static_cfg.replace("interfaces.eth0", "interfaces.eth7"),
    );
    assert!(
        out.contains("network.interfaces.eth7: no such link"),
        "{out}"
    );

    // Back to the default rule (DHCP), then a reboot: the kept lease is requested again.
    let out = apply(&g, "version = 1\n");
    assert!(out.contains("exit=0"), "{out}");
    g.expect("sysd: dhcp-lease: eth0: confirmed 10.0.2.15/24", BOOT);
    g.powerdown().unwrap();
    g.expect(
        "sysd: dhcp-unbound: eth0: no lease (released 10.0.2.15 to 10.0.2.2)",
        BOOT,
    );
    g.wait_exit(BOOT).unwrap();
    drop(g);

    let g = test_guest(&disk).spawn().unwrap();
    g.expect(
        "sysd: dhcp-reboot: eth0: requesting the previous lease 10.0.2.15",
        BOOT,
    );
    g.expect(
        "sysd: dhcp-lease: eth0: confirmed 10.0.2.15/24 from 10.0.2.2",
        BOOT,
    );
    g.expect("sysd: testshell: ready", BOOT);
    // A new guest, a new namespace: a new server in it.
    let port = outside_server(&g);
    let got = g.sh(&format!("wget -q -O - http://10.0.2.2:{port}/"));
    assert!(got.contains("hello from the test namespace"), "{got}");
}

/// Two bridge services of the test image: bweb's published port answers through a QEMU port
/// forward (host → guest 8081 → DNAT → bweb:80), bclient reaches bweb by name and the
/// outside (the test's namespace) through masquerade.
#[test]
fn bridge_services_publish_ports_and_resolve_each_other() {
    let dir = tempfile::tempdir().unwrap();
    let g = test_guest(&fresh_disk(dir.path()))
        .forward(18081, 8081)
        .spawn()
        .unwrap();
    outside_server_on(&g, 18099);
    g.expect("sysd: endpoint: bweb: 10.88.0.", BOOT);
    g.expect("sysd: bweb: ready", BOOT);
    g.expect("sysd: bclient: started", BOOT);
    let console = g.serial_log();
    assert!(
        console.contains("publishing 8081->80/tcp"),
        "{}",
        g.serial_tail(80)
    );

    // The published port from the host side of QEMU's forward.
    let published = SocketAddr::from((Ipv4Addr::LOCALHOST, 18081));
    let body = http_get_until(&g, published, "/", "hello from bweb");
    assert!(body.contains(" 200 OK"), "{body}");

    // bclient: bweb by name, and the outside through masquerade.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let logs = g.sh("keelctl logs bclient");
        if logs.contains("hello from bweb") && logs.contains("hello from the test namespace") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "bclient: {logs}\n{}",
            g.serial_tail(60)
        );
        std::thread::sleep(Duration::from_secs(2));
    }
    let net = g.sh("keelctl net");
    assert!(net.contains("keel0"), "{net}");
    assert!(net.contains("10.88.0.1/16"), "{net}");
    // The endpoints: bweb with its published port.
    let line = net
        .lines()
        .find(|l| l.starts_with("bweb "))
        .unwrap_or_else(|| panic!("no bweb endpoint: {net}"));
    assert!(line.contains("8081:80/tcp"), "{net}");
}
