//! First-boot scenarios (cloud-init style user data) on the test image: a NoCloud seed made by
//! `cloud-localds` with `#cloud-config`, and QEMU fw_cfg with Keelson TOML. Each node is booted
//! several times on the same disk to check "once per instance": the same instance id is not
//! re-applied, a new one is, and invalid user data leaves the last good config running and the
//! node reachable.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use qemu_tests::scenario::{fresh_disk, run, test_guest};
use qemu_tests::{DiskFormat, Guest, GuestBuilder};
use serde_json::Value;

const BOOT: Duration = Duration::from_secs(240);
const SSH_PORT: u16 = 10022;

/// The test image with the admin container's SSH port forwarded too.
fn builder(disk: &Path) -> GuestBuilder {
    test_guest(disk).forward(SSH_PORT, 22)
}

fn json(g: &Guest, cmd: &str) -> Value {
    let out = g.sh(cmd);
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{cmd}: {e}: {out}"))
}

/// The node's host name, read from PID 1's root (containers have their own UTS namespace).
fn hostname(g: &Guest) -> String {
    g.sh("cat /proc/1/root/etc/hostname").trim().to_string()
}

fn service_state(g: &Guest, name: &str) -> Value {
    let list = json(g, "keelctl -o json ps");
    list.as_array()
        .and_then(|l| l.iter().find(|s| s["name"] == name).cloned())
        .unwrap_or(Value::Null)
}

fn wait_running(g: &Guest, name: &str) -> Value {
    let deadline = Instant::now() + BOOT;
    loop {
        let s = service_state(g, name);
        if s["state"] == "running" {
            return s;
        }
        if Instant::now() > deadline {
            let log = g.serial_log();
            let relevant: Vec<&str> = log
                .lines()
                .filter(|l| {
                    [
                        "firstboot",
                        "datasource",
                        "network",
                        "applied",
                        "dhcp",
                        name,
                    ]
                    .iter()
                    .any(|k| l.contains(k))
                })
                .collect();
            panic!(
                "{name} not running: {s:#}\n--- first boot and network lines ---\n{}\n--- console ---\n{}",
                relevant.join("\n"),
                g.serial_tail(40)
            );
        }
        std::thread::sleep(Duration::from_secs(2));
    }
}

fn power_off(g: Guest) {
    g.powerdown().unwrap();
    g.wait_exit(Duration::from_secs(120))
        .unwrap_or_else(|e| panic!("{e}\n{}", g.serial_tail(60)));
}

/// A NoCloud seed as users make it: `cloud-localds seed.iso user-data meta-data`.
fn seed(dir: &Path, user_data: &str, meta_data: &str) -> PathBuf {
    std::fs::write(dir.join("user-data"), user_data).unwrap();
    std::fs::write(dir.join("meta-data"), meta_data).unwrap();
    let iso = dir.join("seed.iso");
    let _ = std::fs::remove_file(&iso);
    run(Command::new("cloud-localds")
        .arg(&iso)
        .arg(dir.join("user-data"))
        .arg(dir.join("meta-data")));
    iso
}

#[test]
fn nocloud_cloud_config_sets_hostname_and_admin_keys_once_per_instance() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("id_ed25519");
    run(Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "keelson-test", "-f"])
        .arg(&key));
    let public = std::fs::read_to_string(key.with_extension("pub")).unwrap();
    let user_data = |host: &str| {
        format!(
            "#cloud-config\nhostname: {host}\nssh_authorized_keys:\n  - {}\nwrite_files:\n  - path: /var/lib/keelson/volumes/www/note.txt\n    content: written by cloud-config\npackages: [nginx]\n",
            public.trim()
        )
    };
    let disk = fresh_disk(dir.path());

    // First boot of instance iid-1: applied.
    let iso = seed(dir.path(), &user_data("seeded"), "instance-id: iid-1\n");
    let g = builder(&disk)
        .extra_drive(&iso, DiskFormat::Raw)
        .spawn()
        .unwrap();
    g.expect(
        "sysd: firstboot: applied cloud-config user data of instance iid-1 from nocloud:/dev/vdb",
        BOOT,
    );
    g.expect("sysd: testshell: ready", BOOT);
    assert_eq!(hostname(&g), "seeded");
    let fb = json(&g, "keelctl -o json firstboot");
    assert_eq!(fb["outcome"], "applied", "{fb:#}");
    let warnings = fb["warnings"].to_string();
    assert!(
        warnings.contains("not supported, ignored: packages"),
        "{fb:#}"
    );
    assert_eq!(
        g.sh("cat /proc/1/root/var/lib/keelson/volumes/www/note.txt"),
        "written by cloud-config"
    );
    // The key turned the admin container on, and it accepts that key.
    wait_running(&g, "admin");
    let out = g.run_in_netns(|| {
        Command::new("ssh")
            .args([
                "-o",
                "StrictHostKeyChecking=no",
                "-o",
                "UserKnownHostsFile=/dev/null",
            ])
            .args(["-o", "BatchMode=yes", "-o", "ConnectTimeout=30", "-i"])
            .arg(&key)
            .args(["-p", &SSH_PORT.to_string(), "root@127.0.0.1"])
            .arg("hostname; keelctl -o json firstboot")
            .output()
            .unwrap()
    });
    let stdout = String::from_utf8_lossy(&out.stdout);
    // The admin container is on the host network: it has the node's host name.
    assert_eq!(stdout.lines().next(), Some("seeded"), "ssh: {stdout}");
    assert!(
        out.status.success() && stdout.contains("\"instance_id\":\"iid-1\""),
        "ssh: {stdout}{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        g.serial_tail(40)
    );
    let config = g.sh("keelctl config show");
    assert!(
        config.contains("# from /var/lib/keelson/user-data.toml"),
        "{config}"
    );
    power_off(g);

    // Same instance, changed seed: not re-applied.
    let iso = seed(dir.path(), &user_data("changed"), "instance-id: iid-1\n");
    let g = builder(&disk)
        .extra_drive(&iso, DiskFormat::Raw)
        .spawn()
        .unwrap();
    g.expect(
        "sysd: firstboot: instance iid-1 already configured; using the persisted config",
        BOOT,
    );
    g.expect("sysd: testshell: ready", BOOT);
    assert_eq!(hostname(&g), "seeded");
    power_off(g);

    // A new instance id: applied again.
    let iso = seed(dir.path(), &user_data("second"), "instance-id: iid-2\n");
    let g = builder(&disk)
        .extra_drive(&iso, DiskFormat::Raw)
        .spawn()
        .unwrap();
    g.expect("applied cloud-config user data of instance iid-2", BOOT);
    g.expect("sysd: testshell: ready", BOOT);
    assert_eq!(hostname(&g), "second");
    power_off(g);
}

#[test]
fn fw_cfg_toml_then_invalid_user_data_keeps_the_last_good_config() {
    let dir = tempfile::tempdir().unwrap();
    let disk = fresh_disk(dir.path());
    let ud = dir.path().join("user-data.toml");
    let md = dir.path().join("meta-data");
    std::fs::write(
        &ud,
        r#"version = 1

[services.hello]
image = "/usr/lib/keelson/images/base"
command = ["sh", "-c", "mkdir -p /tmp/www && echo hello from user data > /tmp/www/index.html && exec httpd -f -p 8090 -h /tmp/www"]
network = "host"
ready = { tcp = "127.0.0.1:8090", interval = "1s" }
"#,
    )
    .unwrap();
    std::fs::write(&md, "instance-id: fw-1\nlocal-hostname: fw-node\n").unwrap();
    let g = builder(&disk)
        .fw_cfg("opt/keelson/user-data", &ud)
        .fw_cfg("opt/keelson/meta-data", &md)
        .spawn()
        .unwrap();
    g.expect(
        "sysd: firstboot: applied toml user data of instance fw-1 from fw_cfg",
        BOOT,
    );
    g.expect("sysd: testshell: ready", BOOT);
    let hello = wait_running(&g, "hello");
    assert_eq!(hello["source"], "user-data", "{hello:#}");
    assert_eq!(
        g.sh("wget -qO- http://127.0.0.1:8090/").trim(),
        "hello from user data"
    );
    assert_eq!(hostname(&g), "fw-node");
    power_off(g);

    // Invalid user data of a new instance: reported with its line, nothing applied, the node
    // runs its last good config and is reachable.
    std::fs::write(
        &ud,
        "version = 1\n\n[services.broken]\nimage = \"/usr/lib/keelson/images/base\"\nmemory = \"64M\"\n",
    )
    .unwrap();
    std::fs::write(&md, "instance-id: fw-2\nlocal-hostname: other\n").unwrap();
    let g = builder(&disk)
        .fw_cfg("opt/keelson/user-data", &ud)
        .fw_cfg("opt/keelson/meta-data", &md)
        .spawn()
        .unwrap();
    let line = g.expect("sysd: firstboot-error: user data rejected", BOOT);
    assert!(
        line.contains("fw_cfg: user-data:5:1: services.broken.memory: unknown field `memory`"),
        "{line}"
    );
    g.expect("sysd: testshell: ready", BOOT);
    let fb = json(&g, "keelctl -o json firstboot");
    assert_eq!(fb["outcome"], "rejected", "{fb:#}");
    assert_eq!(fb["instance_id"], "fw-2");
    wait_running(&g, "hello");
    assert_eq!(hostname(&g), "fw-node");
    let text = g.sh("keelctl firstboot");
    assert!(text.contains("user data REJECTED"), "{text}");
    power_off(g);
}

#[test]
fn nocloud_network_config_v2_gives_a_static_address() {
    let dir = tempfile::tempdir().unwrap();
    let disk = fresh_disk(dir.path());
    // QEMU's user network, configured statically: the harness's forwards reach 10.0.2.15.
    std::fs::write(
        dir.path().join("network-config"),
        "version: 2\nethernets:\n  lan:\n    match: {driver: virtio_net}\n    addresses: [10.0.2.15/24]\n    gateway4: 10.0.2.2\n    nameservers: {addresses: [10.0.2.3], search: [seeded.test]}\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("user-data"),
        "#cloud-config\nhostname: static-node\n",
    )
    .unwrap();
    std::fs::write(dir.path().join("meta-data"), "instance-id: net-1\n").unwrap();
    let iso = dir.path().join("seed.iso");
    run(Command::new("cloud-localds")
        .arg("-N")
        .arg(dir.path().join("network-config"))
        .arg(&iso)
        .arg(dir.path().join("user-data"))
        .arg(dir.path().join("meta-data")));
    let g = builder(&disk)
        .extra_drive(&iso, DiskFormat::Raw)
        .spawn()
        .unwrap();
    g.expect("applied cloud-config user data of instance net-1", BOOT);
    g.expect("sysd: testshell: ready", BOOT);
    let net = json(&g, "keelctl -o json net");
    let links = net["links"].as_array().cloned().unwrap_or_default();
    let lan = links
        .iter()
        .find(|l| l["managed"] == "static")
        .unwrap_or_else(|| panic!("no statically managed link: {net:#}"));
    assert!(
        lan["addresses"].to_string().contains("10.0.2.15/24"),
        "{net:#}"
    );
    assert_eq!(net["leases"].as_array().map(Vec::len), Some(0), "{net:#}");
    assert!(net["search"].to_string().contains("seeded.test"), "{net:#}");
    assert_eq!(hostname(&g), "static-node");
    let config = g.sh("keelctl config show");
    assert!(config.contains("[network.interfaces.lan"), "{config}");
    power_off(g);
}

/// An EC2-style metadata service (IMDSv2: a session token is required) on the test namespace's
/// loopback port 80, which the guest reaches as 169.254.169.254 (QEMU's user network with that
/// address as its host). Returns the request lines it saw.
fn imds_server(
    g: &Guest,
    user_data: &'static str,
) -> std::sync::Arc<std::sync::Mutex<Vec<String>>> {
    imds_server_telling(g, user_data.to_string(), None)
}

/// [`imds_server`], also saying on `answered` each time it has sent the user data.
fn imds_server_telling(
    g: &Guest,
    user_data: String,
    answered: Option<std::sync::mpsc::Sender<()>>,
) -> std::sync::Arc<std::sync::Mutex<Vec<String>>> {
    use std::sync::{Arc, Mutex};
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let listener = g.run_in_netns(|| std::net::TcpListener::bind("127.0.0.1:80").unwrap());
    let log = Arc::clone(&seen);
    std::thread::spawn(move || {
        for s in listener.incoming() {
            let Ok(mut s) = s else { continue };
            let mut buf = [0u8; 4096];
            let n = s.read(&mut buf).unwrap_or(0);
            let req = String::from_utf8_lossy(&buf[..n]).to_string();
            let line = req.lines().next().unwrap_or("").to_string();
            log.lock().unwrap().push(line.clone());
            let token = req.contains("X-aws-ec2-metadata-token: imds-token-1");
            let (status, body) = if line.starts_with("PUT /latest/api/token ") {
                if req.contains("X-aws-ec2-metadata-token-ttl-seconds:") {
                    (200, "imds-token-1")
                } else {
                    (400, "")
                }
            } else if !token {
                (401, "")
            } else if line.starts_with("GET /latest/meta-data/instance-id ") {
                (200, "i-0keelson000001")
            } else if line.starts_with("GET /latest/meta-data/local-hostname ") {
                (200, "ip-169-254-0-15.ec2.internal")
            } else if line.starts_with("GET /latest/user-data ") {
                (200, user_data.as_str())
            } else {
                (404, "")
            };
            let _ = write!(
                s,
                "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = s.flush();
            if line.starts_with("GET /latest/user-data ") {
                if let Some(tx) = &answered {
                    let _ = tx.send(());
                }
            }
        }
    });
    seen
}

#[test]
fn ec2_style_metadata_service_with_a_session_token() {
    let dir = tempfile::tempdir().unwrap();
    let disk = fresh_disk(dir.path());
    let g = builder(&disk)
        .user_net("169.254.0.0/16", "169.254.169.254")
        // What EC2's firmware says, so the image looks for the metadata service.
        .args(["-smbios", "type=1,manufacturer=Amazon EC2"])
        .spawn()
        .unwrap();
    let seen = imds_server(
        &g,
        "version = 1\n\n[host]\nhostname = \"imds-node\"\n\n[services.fromimds]\nimage = \"/usr/lib/keelson/images/base\"\ncommand = [\"sleep\", \"1000000\"]\n",
    );
    g.expect("sysd: datasource: imds: asked once the network is up", BOOT);
    g.expect("sysd: firstboot: applied toml user data of instance i-0keelson000001 from imds:http://169.254.169.254:80",
        BOOT,
    );
    g.expect("sysd: testshell: ready", BOOT);
    let svc = wait_running(&g, "fromimds");
    assert_eq!(svc["source"], "user-data", "{svc:#}");
    assert_eq!(hostname(&g), "imds-node");
    let lines = seen.lock().unwrap().clone();
    assert!(lines[0].starts_with("PUT /latest/api/token"), "{lines:?}");
    assert!(
        lines.iter().any(|l| l.starts_with("GET /latest/user-data")),
        "{lines:?}"
    );
    let fb = json(&g, "keelctl -o json firstboot");
    assert_eq!(fb["source"], "imds:http://169.254.169.254:80", "{fb:#}");
    power_off(g);
}

/// Power cuts in the two places where the node writes the user's configuration: while first
/// boot applies user data (many `write_files`, each a durable write, then the instance id last)
/// and around a `keelctl apply`. Nothing reported written is lost, and nothing is half there:
/// a first boot cut before it recorded its instance applies it again, whole.
#[test]
fn power_cuts_during_first_boot_and_a_config_apply_lose_nothing_reported() {
    const FILES: usize = 150;
    let dir = tempfile::tempdir().unwrap();
    let disk = fresh_disk(dir.path());
    let mut user_data = String::from("#cloud-config\nhostname: cut-node\nwrite_files:\n");
    for i in 0..FILES {
        user_data += &format!(
            "  - path: /var/lib/keelson/volumes/data/f{i:03}\n    content: \"file {i}\\n\"\n"
        );
    }
    let boot = |answered: Option<std::sync::mpsc::Sender<()>>| {
        let g = builder(&disk)
            .user_net("169.254.0.0/16", "169.254.169.254")
            .args(["-smbios", "type=1,manufacturer=Amazon EC2"])
            .spawn()
            .unwrap();
        imds_server_telling(&g, user_data.clone(), answered);
        g
    };

    // 10. Cut as soon as the metadata service has handed over the user data: first boot is
    // applying it.
    let (tx, rx) = std::sync::mpsc::channel();
    let g = boot(Some(tx));
    rx.recv_timeout(BOOT)
        .unwrap_or_else(|_| panic!("user data never asked for\n{}", g.serial_tail(60)));
    g.kill().unwrap();
    drop(g);

    let g = boot(None);
    let (i, line) = g
        .wait_for_any(
            &[
                "applied cloud-config user data of instance i-0keelson000001",
                "instance i-0keelson000001 already configured",
            ],
            BOOT,
        )
        .unwrap_or_else(|e| panic!("{e}\n{}", g.serial_tail(80)));
    eprintln!(
        "after the first-boot cut: {}",
        if i == 0 {
            "applied again"
        } else {
            "it had finished: already configured"
        }
    );
    assert!(line.contains("i-0keelson000001"), "{line}");
    g.expect("sysd: testshell: ready", BOOT);
    assert_eq!(hostname(&g), "cut-node");
    let files = g.sh("cd /proc/1/root/var/lib/keelson/volumes/data && for f in f*; do printf '%s:' $f; cat $f; done");
    let expected: String = (0..FILES).map(|i| format!("f{i:03}:file {i}\n")).collect();
    assert_eq!(files, expected, "write_files after the cut");

    // 11. A config apply that was answered is on disk when power goes right after.
    let applied = "version = 1\n[services.kept]\nimage = \"/usr/lib/keelson/images/base\"\ncommand = [\"sleep\", \"1000000\"]\n";
    let out = g.sh(&format!(
        "cat > /tmp/a.toml <<'EOF'\n{applied}EOF\nkeelctl apply /tmp/a.toml"
    ));
    assert!(!out.contains("error"), "{out}");
    g.kill().unwrap();
    drop(g);
    let g = boot(None);
    g.expect("sysd: testshell: ready", BOOT);
    let svc = wait_running(&g, "kept");
    assert_eq!(svc["source"], "user", "{svc:#}");

    // 12. Power cut while an apply is in flight: the old config or the new one, whole.
    let next = applied.replace("kept", "maybe");
    g.sh(&format!(
        "cat > /tmp/b.toml <<'EOF'\n{next}EOF\n(keelctl apply /tmp/b.toml >/dev/null 2>&1 &)"
    ));
    g.kill().unwrap();
    drop(g);
    let g = boot(None);
    g.expect("sysd: testshell: ready", BOOT);
    let config = g.sh("cat /proc/1/root/var/lib/keelson/services.toml");
    assert!(
        config == applied || config == next,
        "services.toml is neither the old nor the new config: {config:?}"
    );
    let shown = g.sh("keelctl config show");
    assert!(!shown.contains("keelctl:"), "{shown}");
    eprintln!(
        "after the cut in flight: the {} config",
        if config == next { "new" } else { "old" }
    );
    power_off(g);
}

/// A service that owns a volume cannot turn first boot's `write_files` against the host: it
/// replaces the file write_files wrote with a symbolic link to a host file, and plants the old
/// temporary name (`<file>.new`) as another; the next instance's write_files (root, on the
/// host) follows neither, and both host files stay as they were.
#[test]
fn write_files_never_follow_symlinks_a_container_planted() {
    let dir = tempfile::tempdir().unwrap();
    let disk = fresh_disk(dir.path());
    let (ud, md) = (dir.path().join("user-data"), dir.path().join("meta-data"));
    let user_data = |content: &str| {
        format!(
            "#cloud-config\nwrite_files:\n  - path: /var/lib/keelson/volumes/www/page.txt\n    content: \"{content}\\n\"\n"
        )
    };
    let spawn = || {
        builder(&disk)
            .fw_cfg("opt/keelson/user-data", &ud)
            .fw_cfg("opt/keelson/meta-data", &md)
            .spawn()
            .unwrap()
    };
    std::fs::write(&ud, user_data("first")).unwrap();
    std::fs::write(&md, "instance-id: wf-1\n").unwrap();
    let g = spawn();
    g.expect("applied cloud-config user data of instance wf-1", BOOT);
    g.expect("sysd: testshell: ready", BOOT);
    let web = wait_running(&g, "web");
    let pid = web["pid"].as_u64().expect("web's pid");
    // Two host files the attack aims at (the testshell writes them through PID 1's root).
    g.sh("echo untouched > /proc/1/root/var/lib/keelson/target-a; echo untouched > /proc/1/root/var/lib/keelson/target-b");
    // Inside web's mount namespace, where /www is the volume: the file becomes a link to one
    // host file, and the old temporary name a link to the other.
    let out = g.sh(&format!(
        "nsenter -t {pid} -m -- sh -c 'cat /www/page.txt; rm /www/page.txt; ln -s /var/lib/keelson/target-a /www/page.txt; ln -s /var/lib/keelson/target-b /www/page.txt.new; ls -l /www'"
    ));
    assert!(
        out.contains("first") && out.contains("page.txt.new ->"),
        "{out}"
    );
    power_off(g);

    std::fs::write(&ud, user_data("second")).unwrap();
    std::fs::write(&md, "instance-id: wf-2\n").unwrap();
    let g = spawn();
    g.expect("applied cloud-config user data of instance wf-2", BOOT);
    g.expect("sysd: testshell: ready", BOOT);
    let root = "/proc/1/root/var/lib/keelson";
    assert_eq!(
        g.sh(&format!("cat {root}/target-a {root}/target-b")),
        "untouched\nuntouched\n"
    );
    let page = g.sh(&format!(
        "test -L {root}/volumes/www/page.txt && echo link; cat {root}/volumes/www/page.txt"
    ));
    assert_eq!(
        page, "second\n",
        "write_files replaced the link with the file"
    );
    power_off(g);
}
