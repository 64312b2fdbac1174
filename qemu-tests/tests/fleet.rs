//! Fleet scenarios (issue 16): three test-image nodes on one LAN (`Cluster`) carrying etcd as a
//! system extension, and rolling A/B updates coordinated through it.
//!
//! Everything is built here, from the workspace's sources, once per test process (like
//! `tests/update.rs`): a signing key and a TUF root trusted by the images, the test image as
//! 0.1.0, 0.2.0 and a broken 0.3.0 (a critical service that never gets ready), the etcd
//! extension built for each of them, and update repositories (`image-build update add
//! --extension`) that list the right build under each version, plus three that lie about an
//! extension in signed metadata. The repositories are served by busybox httpd at
//! `10.77.0.1:8000` on the cluster's LAN; publishing a version turns the path the nodes know
//! (a symlink) to the repository that has it (its metadata versions are higher, as a real
//! publish makes them).
//!
//! Each node's first-boot user data names the repository, enables the `etcd` extension and turns
//! its service on as a member of a static three-member cluster (`[overrides.etcd]`, the
//! `ETCD_*` settings of docs/extensions.md for the node's reserved address), and turns off the
//! test image's exercises for other scenarios (OOM and crash loops), which only load the
//! guests. The test drives
//! etcd from the test's namespace through its v3 JSON gateway (`/v3/kv/put` …, keys and values
//! base64) and reads each node's story from its serial console, where sysd prints every event.
//!
//! TCG guests on a shared two-core machine are slow and their timing is noisy: timeouts are
//! generous and no assertion is about how long something took; the times are printed.
//!
//! `KEELSON_FLEET_REUSE=1` reuses the images and repositories of an earlier run in
//! `target/qemu-fleet` (when complete) instead of building them again: for working on the
//! scenarios themselves, never after changing what goes into the images.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use base64::Engine;
use qemu_tests::cluster::HOST_ADDR;
use qemu_tests::scenario::{fixture_dir, run, Httpd};
use qemu_tests::update::{self, Signing};
use qemu_tests::{workspace_root, Cluster, Guest, GuestBuilder, NodeConfig};
use serde_json::{json, Value};

/// A cold boot of three TCG nodes, the extension's download, and etcd forming its cluster.
const FORM: Duration = Duration::from_secs(1500);
/// One node's boot (a restart, or a reboot into another version).
const BOOT: Duration = Duration::from_secs(900);
/// The whole rolling update of three nodes.
const ROLL: Duration = Duration::from_secs(4800);
const REPO_PORT: u16 = 8000;
const NODES: usize = 3;
const ETCD_CLIENT_PORT: u16 = 2379;
/// How often the quorum probe writes.
const PROBE_EVERY: Duration = Duration::from_millis(200);
/// The longest stretch in which no endpoint may accept a write.
const MAX_OUTAGE: Duration = Duration::from_secs(2);
/// How long the probe waits for one endpoint's answer: longer than etcd's own request timeout
/// (5 s + two election timeouts, 15 s with the members' settings), so that etcd, not the
/// probe, says when a write cannot be committed.
const PROBE_TIMEOUT: Duration = Duration::from_secs(20);
/// How long the probe gives one endpoint before trying the next as well.
const PROBE_HEDGE: Duration = Duration::from_secs(1);

/// Images, extension builds and repositories, built once per test process.
struct Fixture {
    /// The 0.1.0 image directory: every node's first version.
    n: PathBuf,
    /// One repository per directory: `base` (0.1.0), `next` (0.1.0, 0.2.0), `broken` (0.1.0,
    /// 0.3.0), and the lying ones `bad-hash`, `bad-image` and `bad-release` (0.1.0 each).
    repos: PathBuf,
    /// The etcd extension's root hash per OS version it was built for.
    etcd_roothash: BTreeMap<String, String>,
}

const VERSIONS: [&str; 3] = ["0.1.0", "0.2.0", "0.3.0"];

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let ws = workspace_root();
        let dir = fixture_dir("fleet", |dir| build_fixture(&ws, dir));
        let etcd_roothash = VERSIONS
            .iter()
            .map(|v| {
                let id = read_json(&dir.join(format!("ext-{v}/manifest.json")));
                (v.to_string(), id["roothash"].as_str().unwrap().to_string())
            })
            .collect();
        Fixture {
            n: dir.join("0.1.0"),
            repos: dir.join("repos"),
            etcd_roothash,
        }
    })
}

fn read_json(path: &Path) -> Value {
    let text = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_slice(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn write_json(path: &Path, v: &Value) {
    std::fs::write(path, serde_json::to_vec_pretty(v).unwrap()).unwrap();
}

fn sha256_hex(path: &Path) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(std::fs::read(path).unwrap()))
}

/// Copies an extension build directory (flat: the image, its root hash, its manifest).
fn copy_ext(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

fn build_fixture(ws: &Path, dir: &Path) {
    let signing = Signing::for_scenario(dir);
    let broken = dir.join("broken.toml");
    std::fs::write(&broken, update::NEVER_READY).unwrap();
    for v in VERSIONS {
        let extra = (v == "0.3.0").then_some(broken.as_path());
        // The run's shared build of this version, under the name the fixture uses.
        std::os::unix::fs::symlink(signing.image(v, extra, &[]), dir.join(v)).unwrap();
        run(Command::new(&signing.image_build)
            .current_dir(ws)
            .args(["-q", "extension", "configs/extensions/etcd.toml"])
            .args(["--os-version", v, "--out"])
            .arg(dir.join(format!("ext-{v}"))));
    }
    let Signing {
        image_build: ib,
        key,
        root,
        ..
    } = signing;

    let add = |repo: &Path, version: &str, ext: &Path| {
        let img = dir.join(version);
        let mut c = Command::new(&ib);
        c.args(["-q", "update", "add", "--repo"]).arg(repo);
        c.arg("--root").arg(&root).arg("--key").arg(&key);
        c.args(["--patch-level", update::TEST_PATCH_LEVEL]);
        c.arg(&img).arg("--extension").arg(ext);
        run(&mut c);
    };
    let repos = dir.join("repos");
    std::fs::create_dir_all(&repos).unwrap();
    let ext = |v: &str| dir.join(format!("ext-{v}"));
    add(&repos.join("base"), "0.1.0", &ext("0.1.0"));
    // Publishing N+1 (or the broken one) to a fleet on N: the same repository, one version
    // more, its metadata signed again with higher versions.
    for (name, v) in [("next", "0.2.0"), ("broken", "0.3.0")] {
        run(Command::new("cp")
            .arg("-a")
            .arg(repos.join("base"))
            .arg(repos.join(name)));
        add(&repos.join(name), v, &ext(v));
    }

    // Lies told through correctly signed metadata (TUF passes: the repository's key signed
    // them); the node itself must notice.
    // 1. The listing names the root hash of another build (0.2.0's) for 0.1.0's image.
    let bad_hash = dir.join("ext-bad-hash");
    copy_ext(&ext("0.1.0"), &bad_hash);
    let mut m = read_json(&bad_hash.join("manifest.json"));
    let other = read_json(&ext("0.2.0").join("manifest.json"))["roothash"].clone();
    m["roothash"] = other.clone();
    write_json(&bad_hash.join("manifest.json"), &m);
    std::fs::write(
        bad_hash.join("roothash"),
        format!("{}\n", other.as_str().unwrap()),
    )
    .unwrap();
    add(&repos.join("bad-hash"), "0.1.0", &bad_hash);
    // 2. The image's content changed after the build (its EROFS superblock), the listing has
    //    the original root hash and the new file's sha256: only dm-verity can tell.
    let bad_image = dir.join("ext-bad-image");
    copy_ext(&ext("0.1.0"), &bad_image);
    let raw = bad_image.join("etcd.raw");
    let gpt = keelson_common::gpt::Gpt::read(&mut std::fs::File::open(&raw).unwrap()).unwrap();
    let (_, part) = gpt
        .find(
            keelson_common::partitions::ROOT_X86_64_TYPE,
            "etcd_3.4.23-1",
        )
        .expect("the extension's root partition");
    let at = part.first_lba * 512 + 1024;
    let mut bytes = std::fs::read(&raw).unwrap();
    for b in &mut bytes[at as usize..at as usize + 16] {
        *b ^= 0xff;
    }
    std::fs::write(&raw, &bytes).unwrap();
    let mut m = read_json(&bad_image.join("manifest.json"));
    m["raw"]["sha256"] = json!(sha256_hex(&raw));
    write_json(&bad_image.join("manifest.json"), &m);
    add(&repos.join("bad-image"), "0.1.0", &bad_image);
    // 3. The build for 0.2.0, listed as if it had been built for 0.1.0.
    let bad_release = dir.join("ext-bad-release");
    copy_ext(&ext("0.2.0"), &bad_release);
    let mut m = read_json(&bad_release.join("manifest.json"));
    m["os_version"] = json!("0.1.0");
    write_json(&bad_release.join("manifest.json"), &m);
    add(&repos.join("bad-release"), "0.1.0", &bad_release);
}

/// Node `i`'s reserved address on the cluster's LAN (`qemu_tests::cluster`: 10.77.0.(11 + i)).
fn node_addr(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 77, 0, 11 + i as u8)
}

fn node_name(i: usize) -> String {
    format!("node{}", i + 1)
}

fn client_url(i: usize) -> String {
    format!("http://{}:{ETCD_CLIENT_PORT}", node_addr(i))
}

/// First-boot user data of node `i`: the repository at `repo` (a path on the LAN's httpd), the
/// etcd extension, its member settings, and `extra` (more TOML tables).
fn user_data(i: usize, repo: &str, update: &str, extra: &str) -> String {
    let me = node_addr(i);
    let cluster: Vec<String> = (0..NODES)
        .map(|j| format!("{}=http://{}:2380", node_name(j), node_addr(j)))
        .collect();
    format!(
        r#"version = 1

[update]
repository = "http://{HOST_ADDR}:{REPO_PORT}/{repo}/"
{update}
{extra}
[extensions]
enabled = ["etcd"]
{quiet}
[overrides.etcd]
enabled = true

[overrides.etcd.env]
ETCD_NAME = "{name}"
ETCD_LISTEN_PEER_URLS = "http://{me}:2380"
ETCD_INITIAL_ADVERTISE_PEER_URLS = "http://{me}:2380"
ETCD_LISTEN_CLIENT_URLS = "http://127.0.0.1:2379,http://{me}:2379"
ETCD_ADVERTISE_CLIENT_URLS = "http://{me}:2379"
ETCD_INITIAL_CLUSTER = "{cluster}"
ETCD_INITIAL_CLUSTER_STATE = "new"
ETCD_INITIAL_CLUSTER_TOKEN = "keelson-fleet-test"
# TCG guests sharing two cores miss 100 ms heartbeats: elections only when a member is gone.
ETCD_HEARTBEAT_INTERVAL = "500"
ETCD_ELECTION_TIMEOUT = "5000"
"#,
        name = node_name(i),
        cluster = cluster.join(","),
        quiet = QUIET
            .iter()
            .map(|svc| format!("[overrides.{svc}]\nenabled = false\n"))
            .collect::<String>(),
    )
}

/// The test image's exercises for other scenarios (OOM and crash loops, health flaps, the
/// bridge network), off on fleet nodes: they would only load the TCG guests. `testshell`,
/// `timesync` (critical), `web` and `db` stay.
const QUIET: [&str; 12] = [
    "counter", "hog", "flaky", "crasher", "isolated", "plain", "flusher", "bweb", "bclient", "app",
    "worker", "migrate",
];

/// The `[update.coordination]` table for the three members.
fn coordination() -> String {
    let endpoints: Vec<String> = (0..NODES)
        .map(|i| format!("\"{}\"", client_url(i)))
        .collect();
    format!(
        "[update.coordination]\nstrategy = \"etcd-lock\"\nendpoints = [{}]\ngroup = \"test\"\nholders = 1\nlease = \"30m\"\n",
        endpoints.join(", ")
    )
}

/// Three nodes of `template`, node `i` with `user_data(i)`.
fn spawn(template: GuestBuilder, user_data: impl Fn(usize) -> String) -> Cluster {
    spawn_nodes(template, |i| {
        NodeConfig::new(&node_name(i)).user_data(&user_data(i))
    })
}

/// Three nodes of `template`, node `i` as `node(i)` says.
fn spawn_nodes(template: GuestBuilder, node: impl Fn(usize) -> NodeConfig) -> Cluster {
    let c = (0..NODES)
        .fold(Cluster::builder(template), |b, i| b.node(node(i)))
        .spawn()
        .unwrap();
    for i in 0..NODES {
        assert_eq!(
            c.addr(i),
            node_addr(i),
            "the cluster's address plan changed"
        );
    }
    c
}

/// The 0.1.0 image booted directly (kernel, initramfs, command line): for scenarios that do not
/// update, and so need neither firmware nor boot loader.
fn direct_template(f: &Fixture) -> GuestBuilder {
    GuestBuilder::from_image_dir(&f.n)
        .unwrap()
        .disk_size(2 << 30)
        .memory_mib(768)
}

/// The 0.1.0 disk booted through OVMF and systemd-boot, as A/B updates need.
fn uefi_template(f: &Fixture) -> GuestBuilder {
    GuestBuilder::uefi(f.n.join("disk.raw"))
        .disk_size(2 << 30)
        .memory_mib(768)
}

fn serve(c: &Cluster, dir: &Path) -> Httpd {
    Httpd::serve(c.netns(), SocketAddr::from((HOST_ADDR, REPO_PORT)), dir).unwrap()
}

// --- etcd through its v3 JSON gateway, from the test's namespace -----------------------------

fn b64(s: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

fn unb64(s: &str) -> String {
    String::from_utf8(base64::engine::general_purpose::STANDARD.decode(s).unwrap()).unwrap()
}

/// One call to etcd's JSON gateway at `addr` (HTTP/1.0, so the answer ends with the
/// connection); must run inside the cluster's namespace. The answer's JSON, or why not.
fn etcd(addr: Ipv4Addr, path: &str, body: &Value, timeout: Duration) -> Result<Value, String> {
    let sa = SocketAddr::from((addr, ETCD_CLIENT_PORT));
    let attempt = || -> std::io::Result<String> {
        let mut s = TcpStream::connect_timeout(&sa, Duration::from_secs(1))?;
        s.set_read_timeout(Some(timeout))?;
        s.set_write_timeout(Some(timeout))?;
        let body = body.to_string();
        write!(
            s,
            "POST {path} HTTP/1.0\r\nHost: {sa}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out)
    };
    let out = attempt().map_err(|e| format!("{sa}{path}: {e}"))?;
    let (head, body) = out
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("{sa}{path}: no HTTP answer: {out:?}"))?;
    let status = head.split(' ').nth(1).unwrap_or("");
    if status != "200" {
        return Err(format!("{sa}{path}: HTTP {status}: {}", body.trim()));
    }
    serde_json::from_str(body).map_err(|e| format!("{sa}{path}: {e}: {body:?}"))
}

const CALL: Duration = Duration::from_secs(10);

fn put(c: &Cluster, i: usize, key: &str, value: &str) -> Result<Value, String> {
    let body = json!({"key": b64(key), "value": b64(value)});
    c.run_in(|| etcd(node_addr(i), "/v3/kv/put", &body, CALL))
}

/// A linearizable read of `key` through node `i` (`None`: no such key).
fn get(c: &Cluster, i: usize, key: &str) -> Result<Option<String>, String> {
    let body = json!({"key": b64(key)});
    let a = c.run_in(|| etcd(node_addr(i), "/v3/kv/range", &body, CALL))?;
    Ok(a["kvs"]
        .as_array()
        .and_then(|kvs| kvs.first())
        .map(|kv| unb64(kv["value"].as_str().unwrap_or(""))))
}

/// The ID of the member serving node `i`'s client URL.
fn member_id(c: &Cluster, i: usize) -> Result<String, String> {
    let a = c.run_in(|| etcd(node_addr(i), "/v3/maintenance/status", &json!({}), CALL))?;
    a["header"]["member_id"]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| format!("no member_id in {a}"))
}

/// The cluster's members as node `i` reports them: name → ID.
fn members(c: &Cluster, i: usize) -> Result<BTreeMap<String, String>, String> {
    let a = c.run_in(|| etcd(node_addr(i), "/v3/cluster/member/list", &json!({}), CALL))?;
    Ok(a["members"]
        .as_array()
        .map(|ms| {
            ms.iter()
                .map(|m| {
                    (
                        m["name"].as_str().unwrap_or("").to_owned(),
                        m["ID"].as_str().unwrap_or("").to_owned(),
                    )
                })
                .collect()
        })
        .unwrap_or_default())
}

/// Retries `f` every 2 s until it returns `Ok`, failing the test after `timeout` with the last
/// error and every node's console tail.
fn until<T>(
    c: &Cluster,
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> Result<T, String>,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        match f() {
            Ok(v) => return v,
            Err(e) if Instant::now() > deadline => {
                for g in c.guests() {
                    eprintln!("--- {} ---\n{}", g.label(), g.serial_tail(40));
                }
                panic!("{what}: {e}");
            }
            Err(_) => std::thread::sleep(Duration::from_secs(2)),
        }
    }
}

// --- reading the nodes -----------------------------------------------------------------------

/// The JSON of a keelctl command (`keelctl -o json ARGS`) on node `i`.
fn keelctl_json(c: &Cluster, i: usize, args: &str) -> Value {
    let out = c.guest(i).sh(&format!("keelctl -o json {args}"));
    serde_json::from_str(out.trim())
        .unwrap_or_else(|e| panic!("{}: keelctl {args}: {e}: {out}", c.name(i)))
}

/// The first console line of `g` at or after `from` (cluster time) containing `pattern`, with
/// its time counted from the cluster's spawn.
fn line_after(c: &Cluster, g: &Guest, from: Duration, pattern: &str) -> Option<(Duration, String)> {
    let offset = g.spawned_at().saturating_duration_since(c.spawned_at());
    g.lines_with_times()
        .into_iter()
        .map(|(at, l)| (offset + at, l))
        .find(|(at, l)| *at >= from && l.contains(pattern))
}

/// Waits until some node prints `pattern` (from `from` on); returns which and when.
fn first_node_with(
    c: &Cluster,
    from: Duration,
    pattern: &str,
    timeout: Duration,
) -> (usize, Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let mut hits: Vec<(Duration, usize)> = (0..NODES)
            .filter_map(|i| line_after(c, c.guest(i), from, pattern).map(|(at, _)| (at, i)))
            .collect();
        hits.sort();
        if let Some(&(at, i)) = hits.first() {
            return (i, at);
        }
        if Instant::now() > deadline {
            for g in c.guests() {
                eprintln!("--- {} ---\n{}", g.label(), g.serial_tail(60));
            }
            panic!("no node printed {pattern:?} within {timeout:?}");
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// Cluster time now.
fn now(c: &Cluster) -> Duration {
    c.spawned_at().elapsed()
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

/// Peer TLS for the three members: a CA and one certificate per node (its LAN address as the
/// subject's IP, for server and client use), made with openssl in `dir`. Returns node `i`'s
/// (CA, certificate, key) PEMs.
fn peer_certificates(dir: &Path) -> Vec<(String, String, String)> {
    let openssl = |args: &[&str]| {
        run(keelson_testkit::tools::command("openssl")
            .args(args)
            .current_dir(dir))
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    openssl(
        &[
            &["req", "-x509"][..],
            &ec,
            &["-keyout", "ca.key", "-out", "ca.crt", "-days", "3"],
            &["-subj", "/CN=keelson fleet test CA"],
        ]
        .concat(),
    );
    let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap();
    (0..NODES)
        .map(|i| {
            let n = node_name(i);
            let (key, csr, crt, ext) = (
                format!("{n}.key"),
                format!("{n}.csr"),
                format!("{n}.crt"),
                format!("{n}.ext"),
            );
            std::fs::write(
                dir.join(&ext),
                format!(
                    "subjectAltName=IP:{}\nextendedKeyUsage=serverAuth,clientAuth\n",
                    node_addr(i)
                ),
            )
            .unwrap();
            openssl(
                &[
                    &["req"][..],
                    &ec,
                    &["-keyout", &key, "-out", &csr, "-subj", &format!("/CN={n}")],
                ]
                .concat(),
            );
            openssl(&[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &crt,
                "-days",
                "3",
                "-extfile",
                &ext,
            ]);
            (read("ca.crt"), read(&crt), read(&key))
        })
        .collect()
}

/// Node `i`'s user data with TLS between the members: `#cloud-config` that writes the CA,
/// certificate and key into the etcd volume (`write_files` may write under
/// `/var/lib/keelson/volumes/`) and the Keelson TOML of [`user_data`] with `https://` peer URLs
/// and etcd's peer TLS settings (the member sees the volume at `/var/lib/etcd`).
fn tls_user_data(i: usize, (ca, crt, key): &(String, String, String)) -> String {
    let mut toml = user_data(i, "base", "", "");
    for j in 0..NODES {
        let plain = format!("http://{}:2380", node_addr(j));
        toml = toml.replace(&plain, &format!("https://{}:2380", node_addr(j)));
    }
    toml.push_str(
        "ETCD_PEER_CERT_FILE = \"/var/lib/etcd/tls/peer.crt\"\n\
         ETCD_PEER_KEY_FILE = \"/var/lib/etcd/tls/peer.key\"\n\
         ETCD_PEER_TRUSTED_CA_FILE = \"/var/lib/etcd/tls/ca.crt\"\n\
         ETCD_PEER_CLIENT_CERT_AUTH = \"true\"\n",
    );
    let dir = "/var/lib/keelson/volumes/etcd/tls";
    let file = |path: &str, content: &str, mode: &str| {
        format!(
            "  - path: {path}\n    encoding: b64\n    permissions: '{mode}'\n    content: {}\n",
            b64(content)
        )
    };
    let doc = format!(
        "#cloud-config\nwrite_files:\n{}{}{}{}",
        file(&format!("{dir}/ca.crt"), ca, "0644"),
        file(&format!("{dir}/peer.crt"), crt, "0644"),
        file(&format!("{dir}/peer.key"), key, "0600"),
        file("/etc/keelson/config.toml", &toml, "0600"),
    );
    assert!(
        doc.len() < 16 << 10,
        "user data over EC2's 16 KiB: {}",
        doc.len()
    );
    doc
}

/// Waits for etcd to be ready on every node; returns each node's time (cluster time).
fn etcd_ready(c: &Cluster) -> Vec<Duration> {
    let ready = c.expect_all("sysd: etcd: ready", FORM);
    for i in 0..NODES {
        let log = c.guest(i).serial_log();
        assert!(
            log.contains("sysd: extension-active: etcd 3.4.23-1"),
            "{}: etcd ready without its extension active?\n{}",
            c.name(i),
            c.guest(i).serial_tail(80)
        );
    }
    ready
}

#[test]
fn etcd_cluster_forms_survives_a_member_and_catches_up() {
    let f = fixture();
    let started = Instant::now();
    let certs = tempfile::tempdir().unwrap();
    let certs = peer_certificates(certs.path());
    let mut c = spawn(direct_template(f), |i| tls_user_data(i, &certs[i]));
    let _httpd = serve(&c, &f.repos);

    let ready = etcd_ready(&c);
    let ids = until(&c, "the member list", BOOT, || members(&c, 0));
    assert_eq!(
        ids.keys().cloned().collect::<Vec<_>>(),
        ["node1", "node2", "node3"],
        "{ids:?}"
    );
    // The members talk TLS to each other (etcd refuses https peer URLs without certificates).
    let list = c.run_in(|| etcd(node_addr(0), "/v3/cluster/member/list", &json!({}), CALL));
    for m in list.unwrap()["members"].as_array().unwrap() {
        let urls = m["peerURLs"].as_array().unwrap();
        assert!(
            !urls.is_empty()
                && urls
                    .iter()
                    .all(|u| u.as_str().unwrap().starts_with("https://")),
            "{m}"
        );
    }
    for i in 0..NODES {
        let x = keelctl_json(&c, i, "extensions");
        assert_eq!(x["extensions"][0]["state"], "active", "{}: {x}", c.name(i));
        assert_eq!(x["extensions"][0]["built_for"], "0.1.0", "{x}");
        assert_eq!(
            x["extensions"][0]["roothash"], f.etcd_roothash["0.1.0"],
            "{x}"
        );
    }

    // Written through node1, read through node3.
    until(&c, "a write through node1", BOOT, || {
        put(&c, 0, "/fleet/k1", "written through node1")
    });
    assert_eq!(
        get(&c, 2, "/fleet/k1").unwrap().as_deref(),
        Some("written through node1")
    );

    // node2's member before the power cut: its ID, and the first file of its write-ahead log
    // on /var (by inode, so a file written anew would not pass for it).
    let id2 = member_id(&c, 1).unwrap();
    assert_eq!(ids["node2"], id2);
    let wal = "/proc/1/root/var/lib/keelson/volumes/etcd/default/member/wal";
    // The first segment by name; etcd also keeps preallocated `N.tmp` files there, which may
    // get any inode (a freed one, lower than the segment's), so those are not compared.
    let first_segment = format!("ls -i {wal} | grep '[.]wal$' | sort -k2 | head -1");
    let wal_before = c.guest(1).sh(&first_segment);
    assert!(wal_before.contains(".wal"), "{wal_before}");

    c.kill(1).unwrap();
    // Two of three members keep quorum: writes through node1 go on (after an election if
    // node2 led).
    let killed = Instant::now();
    until(&c, "a write through node1 with node2 down", BOOT, || {
        put(&c, 0, "/fleet/k2", "written while node2 was down")
    });
    let write_after_kill = killed.elapsed();
    assert!(
        put(&c, 2, "/fleet/k3", "also while node2 was down").is_ok(),
        "a write through node3 with node2 down"
    );

    c.restart(1).unwrap();
    let g2 = c.guest(1);
    g2.expect("sysd: etcd: ready", BOOT);
    let rejoined = killed.elapsed();
    // It caught up: what was written while it was down reads back through it.
    for (key, value) in [
        ("/fleet/k1", "written through node1"),
        ("/fleet/k2", "written while node2 was down"),
        ("/fleet/k3", "also while node2 was down"),
    ] {
        let got = until(&c, &format!("reading {key} through node2"), BOOT, || {
            get(&c, 1, key)
        });
        assert_eq!(got.as_deref(), Some(value), "{key} through node2");
    }
    // The same member, restarted from its data on /var (not a new one bootstrapped in an
    // empty directory): same ID, the same first WAL file, and etcd says it restarted.
    assert_eq!(member_id(&c, 1).unwrap(), id2, "node2's member ID changed");
    assert_eq!(members(&c, 0).unwrap(), ids, "the member list changed");
    let wal_after = g2.sh(&first_segment);
    assert_eq!(
        wal_after.trim(),
        wal_before.trim(),
        "node2's WAL was replaced"
    );
    let logs = g2.sh("keelctl logs etcd");
    assert!(
        logs.contains("restarting local member"),
        "etcd on node2 did not restart from its data:\n{logs}"
    );
    let extension = keelctl_json(&c, 1, "extensions");
    assert_eq!(extension["extensions"][0]["state"], "active", "{extension}");

    println!("\n## etcd on three test-image nodes, TLS between members (TCG, 768 MiB, 1 vCPU each; times from the first spawn)\n");
    println!("| node | etcd ready (s) |");
    println!("|---|---:|");
    for (i, t) in ready.iter().enumerate() {
        println!("| {} | {:.1} |", c.name(i), secs(*t));
    }
    println!(
        "\ncluster formed (all three ready) {:.1} s after the cold boot; node2 killed: a write through node1 succeeded {:.1} s later; node2 restarted and ready {:.1} s after its kill; scenario {:.0} s",
        secs(ready.iter().copied().max().unwrap_or_default()),
        secs(write_after_kill),
        secs(rejoined),
        started.elapsed().as_secs_f64()
    );
}

/// Bad input from the operator and from the platform, at once: node3's member list disagrees
/// with the others' (node1's peer URL on another port, so node3 computes other member IDs and
/// another cluster ID), and node2's clock runs six hours ahead (its RTC; nothing on the LAN
/// serves time). Nodes 1 and 2 form the cluster (two of its three members: quorum) and take
/// writes, node2's clock notwithstanding (raft and leases run on each member's monotonic
/// clock). node3's member is refused by its peers: it stays `starting`, `keelctl ps` says why
/// (its readiness check failing) and its log has etcd's own "cluster ID mismatch"; every other
/// service on node3 runs, and the node answers.
#[test]
fn disagreeing_member_lists_and_an_offset_clock_end_in_a_clear_state() {
    let f = fixture();
    let started = Instant::now();
    let ahead = jiff::Timestamp::now() + jiff::SignedDuration::from_hours(6);
    let good = format!("node1=http://{}:2380", node_addr(0));
    let c = spawn_nodes(direct_template(f), |i| {
        let mut ud = user_data(i, "base", "", "");
        let mut node = NodeConfig::new(&node_name(i));
        match i {
            1 => {
                node = node.qemu_args([
                    "-rtc".to_owned(),
                    format!("base={}", ahead.strftime("%Y-%m-%dT%H:%M:%S")),
                ])
            }
            2 => {
                assert!(ud.contains(&good), "{ud}");
                ud = ud.replace(&good, &format!("node1=http://{}:2390", node_addr(0)));
            }
            _ => {}
        }
        node.user_data(&ud)
    });
    let _httpd = serve(&c, &f.repos);

    // node2's clock is off, as the scenario wants.
    let guest_now: i64 = c.guest(1).sh("date +%s").trim().parse().unwrap();
    let skew = guest_now - jiff::Timestamp::now().as_second();
    assert!(
        (5 * 3600..7 * 3600).contains(&skew),
        "node2's clock is {skew} s off, not about six hours"
    );

    // node1 and node2 form the cluster and take writes, through node2 too.
    for i in [0, 1] {
        c.guest(i).expect("sysd: etcd: ready", FORM);
    }
    let formed = now(&c);
    until(&c, "a write through node2", BOOT, || {
        put(
            &c,
            1,
            "/fleet/skewed",
            "written through the node whose clock is off",
        )
    });
    assert_eq!(
        get(&c, 0, "/fleet/skewed").unwrap().as_deref(),
        Some("written through the node whose clock is off")
    );

    // node3's member is refused: etcd says why in its log, sysd keeps it starting and says
    // why in its status; it is never ready.
    let g3 = c.guest(2);
    let logs = until(&c, "etcd on node3 reporting the mismatch", BOOT, || {
        let logs = g3.sh("keelctl logs etcd");
        if logs.contains("cluster ID mismatch") {
            Ok(logs)
        } else {
            Err(format!("no \"cluster ID mismatch\" yet:\n{logs}"))
        }
    });
    assert!(!g3.serial_log().contains("sysd: etcd: ready"), "{logs}");
    let ps = keelctl_json(&c, 2, "ps");
    let services = ps.as_array().unwrap_or_else(|| panic!("{ps}"));
    let member = services
        .iter()
        .find(|s| s["name"] == "etcd")
        .unwrap_or_else(|| panic!("no etcd in {ps}"));
    assert_eq!(member["state"], "starting", "{member}");
    assert!(
        member["reason"]
            .as_str()
            .unwrap_or_default()
            .starts_with("readiness check failing (start period, not counted): "),
        "{member}"
    );
    for name in ["timesync", "web", "db", "testshell"] {
        let s = services
            .iter()
            .find(|s| s["name"] == name)
            .unwrap_or_else(|| panic!("no {name} in {ps}"));
        assert_eq!(s["state"], "running", "node3: {s}");
    }
    // The cluster is what nodes 1 and 2 made of it: node3's member, named in their initial
    // cluster, never joined (it never published its client URLs).
    let list = c
        .run_in(|| etcd(node_addr(0), "/v3/cluster/member/list", &json!({}), CALL))
        .unwrap();
    let clients: BTreeMap<String, usize> = list["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            let urls = m["clientURLs"].as_array().map_or(0, Vec::len);
            (m["name"].as_str().unwrap_or("").to_owned(), urls)
        })
        .collect();
    assert_eq!(
        clients,
        BTreeMap::from([
            ("node1".into(), 1),
            ("node2".into(), 1),
            ("node3".into(), 0)
        ]),
        "{list}"
    );
    println!(
        "\nnode3's disagreeing member refused and node2's clock {:.1} h ahead: cluster of node1 and node2 formed at {:.1} s; scenario {:.0} s",
        skew as f64 / 3600.0,
        secs(formed),
        started.elapsed().as_secs_f64()
    );
}

/// One write of the quorum probe.
struct Probe {
    /// Cluster time at the start and end of the attempt.
    start: Duration,
    end: Duration,
    /// The node whose endpoint was tried first.
    first: usize,
    /// The node whose endpoint took the write, how long that endpoint took, and the raft term
    /// its answer carried.
    ok: Option<(usize, Duration, u64)>,
    /// The failures answered before one endpoint took it (or all failed).
    errors: Vec<String>,
}

/// Writes a key every [`PROBE_EVERY`] until `stop`, trying the three endpoints in turn
/// (starting one further each time): the next endpoint is tried when the previous one failed,
/// or has not answered within [`PROBE_HEDGE`] (it keeps its chance: the first to take the
/// write ends the attempt). An endpoint fails when it refuses the connection or the write, or
/// gives no answer within [`PROBE_TIMEOUT`]: a slow answer (TCG guests installing an update are
/// slow) is an answer, and one stuck request (a proposal lost in a leader change waits for
/// etcd's request timeout) does not hold the probe up. Runs inside the namespace (the threads
/// it starts inherit it).
fn probe(spawned_at: Instant, stop: &AtomicBool) -> Vec<Probe> {
    let mut out = Vec::new();
    let mut n = 0usize;
    while !stop.load(Ordering::SeqCst) {
        let t0 = Instant::now();
        let start = spawned_at.elapsed();
        let (tx, rx) = std::sync::mpsc::channel();
        let launch = |k: usize| {
            let i = (n + k) % NODES;
            let tx = tx.clone();
            let body = json!({"key": b64("/fleet/probe"), "value": b64(&n.to_string())});
            std::thread::spawn(move || {
                let t = Instant::now();
                let answer = etcd(node_addr(i), "/v3/kv/put", &body, PROBE_TIMEOUT);
                let _ = tx.send((i, t.elapsed(), answer));
            });
        };
        let (mut launched, mut answered) = (0, 0);
        let mut ok = None;
        let mut errors = Vec::new();
        while ok.is_none() && answered < NODES {
            if answered == launched {
                launch(launched);
                launched += 1;
            }
            let answer = if launched < NODES {
                match rx.recv_timeout(PROBE_HEDGE) {
                    Ok(a) => a,
                    Err(_) => {
                        launch(launched);
                        launched += 1;
                        continue;
                    }
                }
            } else {
                // Every request ends within its timeouts, answering.
                rx.recv().expect("a probe request's answer")
            };
            answered += 1;
            match answer {
                (i, took, Ok(a)) => {
                    let term = a["header"]["raft_term"]
                        .as_str()
                        .and_then(|t| t.parse().ok())
                        .unwrap_or(0);
                    ok = Some((i, took, term));
                }
                (_, _, Err(e)) => errors.push(e),
            }
        }
        out.push(Probe {
            start,
            end: spawned_at.elapsed(),
            first: n % NODES,
            ok,
            errors,
        });
        n += 1;
        std::thread::sleep(PROBE_EVERY.saturating_sub(t0.elapsed()));
    }
    out
}

/// Sets its flag when dropped.
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// Stretches in which every endpoint refused the probe: (start of the first failed attempt,
/// end of the last), with the errors of the first.
fn outages(probes: &[Probe]) -> Vec<(Duration, Duration, Vec<String>)> {
    let mut out = Vec::new();
    let mut current: Option<(Duration, Duration, Vec<String>)> = None;
    for p in probes {
        match (p.ok, current.as_mut()) {
            (None, None) => current = Some((p.start, p.end, p.errors.clone())),
            (None, Some(cur)) => cur.1 = p.end,
            (Some(_), _) => out.extend(current.take()),
        }
    }
    out.extend(current);
    out
}

/// A node's reboot into `version`: (update-rebooting, update-blessed on `version`), and its
/// slot: (update-slot-taken, update-slot-released), in cluster time.
struct Window {
    rebooting: Duration,
    blessed: Duration,
    slot_taken: Duration,
    slot_released: Duration,
}

fn window(c: &Cluster, i: usize, from: Duration, version: &str) -> Window {
    let g = c.guest(i);
    let at = |from: Duration, pattern: &str| {
        line_after(c, g, from, pattern)
            .unwrap_or_else(|| {
                panic!(
                    "{}: no {pattern:?} after {:.1} s:\n{}",
                    c.name(i),
                    secs(from),
                    g.serial_tail(100)
                )
            })
            .0
    };
    let slot_taken = at(from, "sysd: update-slot-taken:");
    let rebooting = at(slot_taken, "sysd: update-rebooting:");
    let blessed = at(
        rebooting,
        &format!("sysd: update-blessed: {version} is good"),
    );
    let slot_released = at(blessed, "sysd: update-slot-released:");
    Window {
        rebooting,
        blessed,
        slot_taken,
        slot_released,
    }
}

fn overlap(a: (Duration, Duration), b: (Duration, Duration)) -> bool {
    a.0 < b.1 && b.0 < a.1
}

#[test]
fn rolling_update_keeps_quorum() {
    let f = fixture();
    let started = Instant::now();
    let update = format!(
        "policy = \"automatic\"\ninterval = \"1m\"\nhealth_timeout = \"15m\"\n{}",
        coordination()
    );
    let c = spawn(uefi_template(f), |i| user_data(i, "fleet", &update, ""));
    // The nodes know the repository as /fleet/: the directory served changes on publish.
    let www = tempfile::tempdir().unwrap();
    let link = www.path().join("fleet");
    std::os::unix::fs::symlink(f.repos.join("base"), &link).unwrap();
    let _httpd = serve(&c, www.path());

    let ready = etcd_ready(&c);
    let formed = ready.iter().copied().max().unwrap_or_default();
    for i in 0..NODES {
        c.guest(i)
            .wait_for_from_start("sysd: update-blessed: 0.1.0 is good", BOOT)
            .unwrap_or_else(|e| panic!("{}: {e}", c.name(i)));
    }
    until(&c, "a first write", BOOT, || {
        put(&c, 0, "/fleet/before", "0.1.0")
    });

    let stop = AtomicBool::new(false);
    let (probes, published, done) = std::thread::scope(|s| {
        let netns = c.netns();
        let spawned_at = c.spawned_at();
        let stop = &stop;
        let writer = s.spawn(move || netns.run_in(|| probe(spawned_at, stop)));
        // Stops the probe however this thread leaves (a failed wait panics).
        let _stop = StopOnDrop(stop);
        // Publish 0.2.0: the same repository, one version more.
        let published = now(&c);
        let tmp = www.path().join("fleet.new");
        std::os::unix::fs::symlink(f.repos.join("next"), &tmp).unwrap();
        std::fs::rename(&tmp, &link).unwrap();
        let blessed = c.expect_all("sysd: update-blessed: 0.2.0 is good", ROLL);
        let done = blessed.iter().copied().max().unwrap_or_default();
        // A little more of the probe after the last node is back.
        std::thread::sleep(Duration::from_secs(10));
        drop(_stop);
        (writer.join().unwrap(), published, done)
    });

    // Each node's reboot and its slot, from the outside (its console).
    let windows: Vec<Window> = (0..NODES)
        .map(|i| window(&c, i, published, "0.2.0"))
        .collect();
    // Every node built 0.2.0's root and its etcd extension from what it had (the repository's
    // patches against 0.1.0's), not from full downloads.
    for i in 0..NODES {
        for needle in [
            "sysd: update-root-patch: 0.2.0's root built from the running one (0.1.0's)",
            "sysd: extension-patched: etcd 3.4.23-1 for version 0.2.0",
        ] {
            assert!(
                line_after(&c, c.guest(i), published, needle).is_some(),
                "{}: no {needle:?} after 0.2.0 was published",
                c.name(i)
            );
        }
    }
    // Somebody waited for the slot (all three staged 0.2.0 within a minute of each other).
    let waited = (0..NODES)
        .filter(|&i| {
            line_after(&c, c.guest(i), published, "sysd: update-waiting-for-slot:").is_some()
        })
        .count();
    let failed = probes.iter().filter(|p| p.ok.is_none()).count();
    let retried = probes
        .iter()
        .filter(|p| p.ok.is_some_and(|(i, _, _)| i != p.first))
        .count();
    let slowest = probes
        .iter()
        .filter_map(|p| p.ok.map(|(_, took, _)| took))
        .max()
        .unwrap_or_default();
    // The longest time between two writes taken (slowness included).
    let taken: Vec<Duration> = probes
        .iter()
        .filter(|p| p.ok.is_some())
        .map(|p| p.end)
        .collect();
    let longest_gap = taken
        .windows(2)
        .map(|w| w[1].saturating_sub(w[0]))
        .max()
        .unwrap_or_default();
    // Leader elections seen by the probe: the raft term of the answers going up.
    let mut terms: Vec<(Duration, u64)> = Vec::new();
    for p in &probes {
        if let Some((_, _, term)) = p.ok {
            if terms.last().is_none_or(|&(_, t)| term > t) {
                terms.push((p.end, term));
            }
        }
    }
    let gaps = outages(&probes);
    let longest = gaps
        .iter()
        .map(|(a, b, _)| b.saturating_sub(*a))
        .max()
        .unwrap_or_default();

    println!("\n## Rolling update of three etcd members, 0.1.0 -> 0.2.0 (TCG, UEFI, 768 MiB, 1 vCPU each)\n");
    println!(
        "Times in seconds from the first spawn; 0.2.0 published at {:.1}.\n",
        secs(published)
    );
    println!("| node | etcd ready (cold boot) | slot taken | rebooting | blessed 0.2.0 | slot released |");
    println!("|---|---:|---:|---:|---:|---:|");
    for (i, w) in windows.iter().enumerate() {
        println!(
            "| {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} |",
            c.name(i),
            secs(ready[i]),
            secs(w.slot_taken),
            secs(w.rebooting),
            secs(w.blessed),
            secs(w.slot_released)
        );
    }
    println!("\n| measure | value |");
    println!("|---|---:|");
    println!(
        "| cluster formed from cold boot (s) | {:.1} |",
        secs(formed)
    );
    println!(
        "| whole rolling update, publish -> last blessed (s) | {:.1} |",
        secs(done.saturating_sub(published))
    );
    println!("| nodes that waited for the slot | {waited} |");
    println!(
        "| probe writes (every {} ms) | {} |",
        PROBE_EVERY.as_millis(),
        probes.len()
    );
    println!("| writes taken by another endpoint than the first tried | {retried} |");
    println!("| writes no endpoint took | {failed} |");
    println!("| slowest write taken (s) | {:.1} |", secs(slowest));
    println!(
        "| longest time between two writes taken (s) | {:.1} |",
        secs(longest_gap)
    );
    // What made the slowest probe slow: the failures answered before an endpoint took it.
    if let Some(p) = probes.iter().max_by_key(|p| p.end.saturating_sub(p.start)) {
        println!(
            "| slowest probe (s) | {:.1} at {:.1} s: {} |",
            secs(p.end.saturating_sub(p.start)),
            secs(p.start),
            if p.errors.is_empty() {
                "no endpoint failed".to_owned()
            } else {
                p.errors.join("; ").replace('|', "/")
            }
        );
    }
    let elections: Vec<String> = terms
        .iter()
        .skip(1)
        .map(|(at, term)| format!("{:.1} s (term {term})", secs(*at)))
        .collect();
    println!(
        "| leader elections seen (raft term going up) | {} |",
        if elections.is_empty() {
            "none".to_owned()
        } else {
            elections.join(", ")
        }
    );
    println!(
        "| longest stretch without a write (s) | {:.1} |",
        secs(longest)
    );
    if !gaps.is_empty() {
        explain_outages(&c, &gaps);
    }
    print_etcd_elections(&c);

    // Never two nodes rebooting at once, never two holding a reboot slot at once.
    for a in 0..NODES {
        for b in a + 1..NODES {
            let (wa, wb) = (&windows[a], &windows[b]);
            assert!(
                !overlap((wa.rebooting, wa.blessed), (wb.rebooting, wb.blessed)),
                "{} and {} rebooted at the same time: {:.1}-{:.1} s and {:.1}-{:.1} s",
                c.name(a),
                c.name(b),
                secs(wa.rebooting),
                secs(wa.blessed),
                secs(wb.rebooting),
                secs(wb.blessed)
            );
            assert!(
                !overlap(
                    (wa.slot_taken, wa.slot_released),
                    (wb.slot_taken, wb.slot_released)
                ),
                "{} and {} held the reboot slot at the same time",
                c.name(a),
                c.name(b)
            );
        }
    }
    // The client never saw the cluster without quorum.
    assert!(
        probes.len() > 100,
        "the probe wrote only {} times",
        probes.len()
    );
    assert!(
        longest <= MAX_OUTAGE,
        "the cluster took no write for {:.1} s (over {MAX_OUTAGE:?}): quorum lost",
        secs(longest)
    );

    // All three on 0.2.0, blessed, with the etcd extension built for 0.2.0.
    for i in 0..NODES {
        let s = keelctl_json(&c, i, "update status");
        assert_eq!(s["version"], "0.2.0", "{}: {s}", c.name(i));
        assert_eq!(s["assessment"], "good", "{}: {s}", c.name(i));
        assert_eq!(s["last_good"], "0.2.0", "{}: {s}", c.name(i));
        assert_eq!(s["slot"], "b", "{}: {s}", c.name(i));
        let x = keelctl_json(&c, i, "extensions");
        let etcd = &x["extensions"][0];
        assert_eq!(etcd["name"], "etcd", "{x}");
        assert_eq!(etcd["state"], "active", "{}: {x}", c.name(i));
        assert_eq!(etcd["built_for"], "0.2.0", "{}: {x}", c.name(i));
        assert_eq!(etcd["roothash"], f.etcd_roothash["0.2.0"], "{x}");
        assert_eq!(
            get(&c, i, "/fleet/before").unwrap().as_deref(),
            Some("0.1.0"),
            "{}: the data written on 0.1.0",
            c.name(i)
        );
    }
    let s = keelctl_json(&c, 0, "update status");
    let coord = &s["coordination"];
    assert_eq!(coord["held_by"], json!([]), "{s}");
    assert!(coord["halted"].is_null(), "{s}");
    println!("\nscenario {:.0} s", started.elapsed().as_secs_f64());
}

/// For each stretch without a write: every node's console around it (and the UTC times, to
/// compare with etcd's own logs).
fn explain_outages(c: &Cluster, gaps: &[(Duration, Duration, Vec<String>)]) {
    let spawned_wall = std::time::SystemTime::now() - c.spawned_at().elapsed();
    let utc = |d: Duration| {
        let t = (spawned_wall + d)
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let day = t.as_secs() % 86400;
        format!(
            "{:02}:{:02}:{:02}.{:03}Z",
            day / 3600,
            day / 60 % 60,
            day % 60,
            t.subsec_millis()
        )
    };
    for (a, b, errors) in gaps {
        println!(
            "\nno endpoint took a write from {:.1} s to {:.1} s ({} to {}): {}",
            secs(*a),
            secs(*b),
            utc(*a),
            utc(*b),
            errors.join("; ")
        );
        for g in c.guests() {
            let offset = g.spawned_at().saturating_duration_since(c.spawned_at());
            println!("--- {} around it ---", g.label());
            for (at, line) in g.lines_with_times() {
                let at = offset + at;
                if at + Duration::from_secs(20) >= *a && at <= *b + Duration::from_secs(20) {
                    println!("{:8.1} {line}", secs(at));
                }
            }
        }
    }
}

/// What each etcd member logged about leaders and elections (its log on /var, times in UTC).
fn print_etcd_elections(c: &Cluster) {
    for (i, g) in c.guests().enumerate() {
        let log = g.try_sh(
            "grep -E 'became|elected|lost leader|leader changed|transfer|campaign|stopping|starting|restarting|prevote|pre-vote' /proc/1/root/var/log/keelson/etcd.log | cut -c1-400 | tail -60",
        );
        println!(
            "--- etcd on {} ---\n{}",
            c.name(i),
            log.unwrap_or_else(|e| format!("{e:#}"))
        );
    }
}

#[test]
fn broken_version_halts_the_rollout() {
    let f = fixture();
    let started = Instant::now();
    // One try: the broken version's boot fails its gate once, then 0.1.0 boots again. (The
    // gate's time also covers 0.1.0's own first boot, which may find etcd there and wait for
    // the cluster to form.)
    let update = format!(
        "policy = \"automatic\"\ninterval = \"1m\"\nhealth_timeout = \"3m\"\nboot_tries = 1\n{}",
        coordination()
    );
    let c = spawn(uefi_template(f), |i| user_data(i, "fleet", &update, ""));
    let www = tempfile::tempdir().unwrap();
    let link = www.path().join("fleet");
    std::os::unix::fs::symlink(f.repos.join("base"), &link).unwrap();
    let _httpd = serve(&c, www.path());
    etcd_ready(&c);
    for i in 0..NODES {
        c.guest(i)
            .wait_for_from_start("sysd: update-blessed: 0.1.0 is good", BOOT)
            .unwrap_or_else(|e| panic!("{}: {e}", c.name(i)));
    }

    let published = now(&c);
    let tmp = www.path().join("fleet.new");
    std::os::unix::fs::symlink(f.repos.join("broken"), &tmp).unwrap();
    std::fs::rename(&tmp, &link).unwrap();

    // The first node to take the slot boots 0.3.0, fails its gate, falls back to 0.1.0, halts
    // the rollout and gives the slot back.
    let (first, taken) = first_node_with(&c, published, "sysd: update-slot-taken:", ROLL);
    let g = c.guest(first);
    g.skip_to_end();
    let failed = g.expect("sysd: update-health-failed: 0.3.0", BOOT);
    assert!(failed.contains("canary"), "{failed}");
    let rolled = g.expect("sysd: update-rolled-back: rolled back from 0.3.0", BOOT);
    let released = g.expect("sysd: update-slot-released:", BOOT);
    assert!(
        released.contains("halted the rollout of 0.3.0"),
        "{rolled}\n{released}"
    );
    let s = keelctl_json(&c, first, "update status");
    assert_eq!(s["version"], "0.1.0", "{s}");
    assert_eq!(s["rolled_back_from"], "0.3.0", "{s}");

    // The others never reboot into it: they learn of the halt (while waiting for the slot
    // with 0.3.0 staged, or before installing it) and drop it.
    let halted_at = now(&c);
    let others: Vec<usize> = (0..NODES).filter(|&i| i != first).collect();
    for &i in &others {
        let g = c.guest(i);
        let (which, line) = g
            .wait_for_any(
                &["sysd: update-halted:", "the rollout of 0.3.0 is halted"],
                BOOT,
            )
            .unwrap_or_else(|e| panic!("{}: {e}", c.name(i)));
        assert!(line.contains("0.3.0"), "{}: {which}: {line}", c.name(i));
    }
    // Another automatic check (every minute) comes and goes without an install.
    std::thread::sleep(Duration::from_secs(90));
    for &i in &others {
        let g = c.guest(i);
        assert!(
            line_after(&c, g, published, "sysd: update-rebooting:").is_none(),
            "{} rebooted into the halted version:\n{}",
            c.name(i),
            g.serial_tail(80)
        );
        assert!(
            line_after(&c, g, halted_at, "sysd: update-started:").is_none(),
            "{} installed the halted version:\n{}",
            c.name(i),
            g.serial_tail(80)
        );
        let s = keelctl_json(&c, i, "update status");
        assert_eq!(s["version"], "0.1.0", "{}: {s}", c.name(i));
        assert!(s["staged"].is_null(), "{}: {s}", c.name(i));
        let coord = &s["coordination"];
        let halted = coord["halted"].as_str().unwrap_or_default();
        assert!(
            halted.starts_with(&format!("0.3.0 by {}", c.name(first))),
            "{}: {s}",
            c.name(i)
        );
        assert_eq!(coord["held_by"], json!([]), "{}: {s}", c.name(i));
        assert_eq!(coord["waiting"], json!([]), "{}: {s}", c.name(i));
        let text = c.guest(i).sh("keelctl update status");
        assert!(
            text.contains(&format!(
                "halted:         rollout of 0.3.0 by {}",
                c.name(first)
            )),
            "{text}"
        );
    }
    // etcd came through: three members answer.
    for i in 0..NODES {
        until(&c, "a write after the halt", BOOT, || {
            put(&c, i, "/fleet/after-halt", &node_name(i))
        });
    }
    println!(
        "\nbroken 0.3.0 published at {:.1} s; {} took the slot at {:.1} s, rolled back and halted the rollout by {:.1} s; scenario {:.0} s",
        secs(published),
        c.name(first),
        secs(taken),
        secs(halted_at),
        started.elapsed().as_secs_f64()
    );
}

#[test]
fn a_tampered_extension_is_refused() {
    let f = fixture();
    let started = Instant::now();
    // node1: a listing with another build's root hash; node2: an image changed after it was
    // built (listing and sha256 made to match it); node3: the 0.2.0 build listed as built for
    // 0.1.0. All signed with the repository's key.
    let repos = ["bad-hash", "bad-image", "bad-release"];
    let c = spawn(direct_template(f), |i| user_data(i, repos[i], "", ""));
    let _httpd = serve(&c, &f.repos);
    c.expect_all("sysd: testshell: ready", FORM);

    // Each verdict comes as soon as the extension is downloaded, before or after the test shell
    // is ready (it waits for the root's modules, the download does not): searched from the start.
    // node1: the store refuses the download (its partitions are not those of the listed root
    // hash); nothing is recorded, so nothing is activated.
    let line = c
        .guest(0)
        .expect_from_start("sysd: extensions-sync-failed:", FORM);
    assert!(line.contains("root hash"), "{line}");
    // node2: it downloads (the layout matches), dm-verity refuses its first block.
    let line2 = c
        .guest(1)
        .expect_from_start("sysd: extension-refused:", FORM);
    assert!(
        line2.contains("its content does not match root hash") && line2.contains("dm-verity"),
        "{line2}"
    );
    let log2 = c.guest(1).serial_log();
    assert!(
        log2.contains("device-mapper: verity:") && log2.contains("is corrupted"),
        "the kernel did not report the corrupted block:\n{}",
        c.guest(1).serial_tail(80)
    );
    // node3: its extension-release names 0.2.0, the signed listing said 0.1.0.
    let line3 = c
        .guest(2)
        .expect_from_start("sysd: extension-refused:", FORM);
    assert!(
        line3.contains("VERSION_ID=0.2.0, the repository listed it as built for 0.1.0"),
        "{line3}"
    );

    let x = keelctl_json(&c, 0, "extensions");
    assert_eq!(x["extensions"][0]["state"], "pending", "{x}");
    let err = x["last_error"].as_str().unwrap_or_default();
    assert!(err.contains("root hash"), "{x}");
    let text = c.guest(0).sh("keelctl extensions");
    assert!(
        text.contains("last error:") && text.contains("root hash"),
        "{text}"
    );
    for (i, needle) in [
        (1, "its content does not match root hash"),
        (2, "the repository listed it as built for 0.1.0"),
    ] {
        let x = keelctl_json(&c, i, "extensions");
        let e = &x["extensions"][0];
        assert_eq!(e["state"], "refused", "{}: {x}", c.name(i));
        assert!(
            e["error"].as_str().unwrap_or_default().contains(needle),
            "{}: {x}",
            c.name(i)
        );
        let text = c.guest(i).sh("keelctl extensions");
        assert!(text.contains("refused") && text.contains(needle), "{text}");
    }
    // Every node runs everything else; none runs anything of the extension.
    for i in 0..NODES {
        let g = c.guest(i);
        let ps = keelctl_json(&c, i, "ps");
        let names: Vec<&str> = ps
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|s| s["name"].as_str())
            .collect();
        assert!(!names.contains(&"etcd"), "{}: {names:?}", c.name(i));
        for svc in ["testshell", "db", "timesync"] {
            let s = ps
                .as_array()
                .unwrap()
                .iter()
                .find(|s| s["name"] == svc)
                .unwrap_or_else(|| panic!("{}: no {svc} in {ps}", c.name(i)));
            assert_eq!(s["state"], "running", "{}: {s}", c.name(i));
        }
        let merged = g.sh("ls /proc/1/root/usr/lib/keelson/services.d/");
        assert!(!merged.contains("etcd"), "{}: {merged}", c.name(i));
        // (Its readiness check may have timed out under TCG and restarted it: retried.)
        until(&c, "the web service", BOOT, || {
            let web = g.sh("wget -q -O - http://127.0.0.1:8080/");
            web.contains("hello from web").then_some(()).ok_or(web)
        });
    }
    println!(
        "\ntampered extensions refused on all three nodes; scenario {:.0} s",
        started.elapsed().as_secs_f64()
    );
}
