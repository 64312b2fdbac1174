//! The remote API on real nodes: three test-image guests on one LAN (the multi-node harness),
//! each given its `[api.remote]` (CA, node certificate and key inline) in first-boot user data
//! made by `keelctl pki node-config`; keelctl on the host, in the cluster's namespace, reaches
//! them over mutual TLS with certificates from `keelctl pki` on the test's own PKI. A reader
//! lists and follows events but cannot stop a service; an admin applies a service remotely;
//! `--nodes` shows all three nodes in one table (and JSON grouped per node); a CA that did not
//! sign the nodes is a clear error naming the node. No TOFU anywhere: the trust comes from the
//! user data.
//!
//! keelctl is the host binary from this workspace's target directory (`cargo build -p keelctl`;
//! `./dev test` builds the workspace first).

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use qemu_tests::scenario::test_image;
use qemu_tests::{Cluster, GuestBuilder, NodeConfig};

const BOOT: Duration = Duration::from_secs(900);
const NODES: [&str; 3] = ["node1", "node2", "node3"];

fn keelctl_exe() -> PathBuf {
    // target/debug/deps/remote_api-HASH -> target/debug/keelctl
    let exe = std::env::current_exe().expect("test exe");
    let keelctl = exe
        .parent()
        .and_then(Path::parent)
        .map(|dir| dir.join("keelctl"))
        .expect("target directory");
    assert!(
        keelctl.exists(),
        "{} missing: cargo build -p keelctl (./dev test builds the workspace)",
        keelctl.display()
    );
    keelctl
}

fn keelctl(args: &[&str]) -> Output {
    let out = Command::new(keelctl_exe())
        .args(args)
        .output()
        .expect("keelctl");
    assert!(out.status.success(), "keelctl {args:?}: {}", text(&out));
    out
}

fn text(out: &Output) -> String {
    format!(
        "exit {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// keelctl in the cluster's namespace.
fn remote(c: &Cluster, args: &[&str]) -> Output {
    let mut cmd = c.command(&keelctl_exe().display().to_string());
    cmd.args(args).env_remove("KEELCONFIG").stdin(Stdio::null());
    cmd.output().expect("keelctl in the namespace")
}

#[test]
fn keelctl_manages_three_nodes_over_mutual_tls_with_trust_from_user_data() {
    let started = Instant::now();
    let work = tempfile::tempdir().unwrap();
    let pki = work.path().join("pki");
    let p = pki.display().to_string();
    keelctl(&["pki", "init", "--dir", &p]);
    keelctl(&[
        "pki", "issue", "--dir", &p, "--role", "admin", "--name", "ops",
    ]);
    keelctl(&[
        "pki", "issue", "--dir", &p, "--role", "reader", "--name", "watch",
    ]);
    let mut builder = Cluster::builder(
        GuestBuilder::from_image_dir(&test_image())
            .unwrap()
            .disk_size(2 << 30)
            .memory_mib(512),
    );
    for (i, name) in NODES.iter().enumerate() {
        let ip = format!("10.77.0.{}", 11 + i);
        keelctl(&["pki", "issue", "--dir", &p, "--node", name, "--ip", &ip]);
        let table = keelctl(&["pki", "node-config", "--dir", &p, "--node", name]);
        let user_data = format!("version = 1\n{}", String::from_utf8_lossy(&table.stdout));
        builder = builder.node(NodeConfig::new(name).user_data(&user_data));
    }
    let c = builder.spawn().unwrap();
    c.expect_all("sysd: api-remote: remote API on 0.0.0.0:50000", BOOT);
    c.expect_all("sysd: testshell: ready", BOOT);

    let (ca, admin, reader) = (
        format!("{p}/ca.crt"),
        [
            format!("{p}/clients/ops.crt"),
            format!("{p}/clients/ops.key"),
        ],
        [
            format!("{p}/clients/watch.crt"),
            format!("{p}/clients/watch.key"),
        ],
    );
    let as_client = |who: &[String; 2], node: &str, rest: &[&str]| {
        let mut args = vec![
            "--node", node, "--ca", &ca, "--cert", &who[0], "--key", &who[1],
        ];
        args.extend_from_slice(rest);
        remote(&c, &args)
    };

    // A reader lists and reads, and is refused a change with a clear 403.
    let ps = as_client(&reader, "10.77.0.11", &["ps"]);
    assert!(ps.status.success(), "{}", text(&ps));
    assert!(
        String::from_utf8_lossy(&ps.stdout).contains("testshell"),
        "{}",
        text(&ps)
    );
    let stop = as_client(&reader, "10.77.0.11", &["stop", "testshell"]);
    assert_eq!(stop.status.code(), Some(1), "{}", text(&stop));
    assert!(
        String::from_utf8_lossy(&stop.stderr)
            .contains("node 10.77.0.11: client \"watch\" has role reader, which may only read"),
        "{}",
        text(&stop)
    );
    // Events stream remotely (read for a while, then stop).
    let mut events = c.command(&keelctl_exe().display().to_string());
    events
        .args([
            "--node",
            "10.77.0.12",
            "--ca",
            &ca,
            "--cert",
            &reader[0],
            "--key",
            &reader[1],
            "events",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = events.spawn().unwrap();
    // The stream read until the line comes (a loaded machine can take more than a few seconds
    // to connect and replay), then ended.
    let (tx, rx) = std::sync::mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let mut seen = Vec::new();
    while !seen
        .iter()
        .any(|l: &String| l.contains("remote API on 0.0.0.0:50000"))
    {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => seen.push(line),
            Err(_) => break,
        }
    }
    // SAFETY: kill(2) on our own child (ip netns exec, which execs keelctl).
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let ended = child.wait_with_output().unwrap();
    let events = seen.join("\n");
    assert!(
        events.contains("remote API on 0.0.0.0:50000"),
        "{events}\nstderr: {}",
        String::from_utf8_lossy(&ended.stderr)
    );

    // An admin applies a service on node2 remotely; it runs there.
    let file = work.path().join("hello.toml");
    std::fs::write(
        &file,
        "version = 1\n[services.hello]\nimage = \"/usr/lib/keelson/images/base\"\ncommand = [\"sh\", \"-c\", \"echo hello over mTLS; exec sleep 100000\"]\n",
    )
    .unwrap();
    let apply = as_client(
        &admin,
        "10.77.0.12",
        &["apply", &file.display().to_string()],
    );
    assert!(apply.status.success(), "{}", text(&apply));
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let logs = as_client(&reader, "10.77.0.12", &["logs", "hello"]);
        if String::from_utf8_lossy(&logs.stdout).contains("hello over mTLS") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "hello never logged: {}",
            text(&logs)
        );
        std::thread::sleep(Duration::from_secs(2));
    }

    // Three nodes, one table; JSON grouped per node.
    let nodes = "10.77.0.11,10.77.0.12,10.77.0.13";
    let ps = remote(
        &c,
        &[
            "--nodes", nodes, "--ca", &ca, "--cert", &reader[0], "--key", &reader[1], "ps",
        ],
    );
    assert!(ps.status.success(), "{}", text(&ps));
    let table = String::from_utf8_lossy(&ps.stdout).to_string();
    assert!(table.starts_with("NODE"), "{table}");
    for addr in ["10.77.0.11", "10.77.0.12", "10.77.0.13"] {
        assert!(
            table
                .lines()
                .any(|l| l.starts_with(addr) && l.contains("testshell")),
            "{addr} missing:\n{table}"
        );
    }
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("10.77.0.12") && l.contains("hello")),
        "{table}"
    );
    let json = remote(
        &c,
        &[
            "--nodes", nodes, "--ca", &ca, "--cert", &reader[0], "--key", &reader[1], "-o", "json",
            "ps",
        ],
    );
    let grouped: serde_json::Value = serde_json::from_slice(&json.stdout).expect("json");
    assert_eq!(grouped.as_array().map(Vec::len), Some(3), "{grouped}");
    assert_eq!(grouped[2]["node"], "10.77.0.13");

    // keelctl checks the node against its CA: another CA is a clear error naming the node.
    let other = work.path().join("other");
    let o = other.display().to_string();
    keelctl(&["pki", "init", "--dir", &o, "--name", "other-ca"]);
    let wrong = remote(
        &c,
        &[
            "--node",
            "10.77.0.13",
            "--ca",
            &format!("{o}/ca.crt"),
            "--cert",
            &admin[0],
            "--key",
            &admin[1],
            "ps",
        ],
    );
    assert_eq!(
        String::from_utf8_lossy(&wrong.stderr).trim(),
        format!(
            "keelctl: node 10.77.0.13: its certificate is not signed by the CA keelctl trusts \
             ({o}/ca.crt): wrong CA, or not a node of this PKI"
        )
    );
    println!("scenario {:.0} s", started.elapsed().as_secs_f64());
}
