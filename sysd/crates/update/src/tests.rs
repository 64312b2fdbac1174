//! Host tests of the update agent against real repositories: signed by the real
//! `image-build update` (keys generated here), served over HTTP from inside a network namespace
//! of the test's own, installed into plain files standing in for slot B's partitions and a
//! directory standing in for the ESP. Needs root (for the namespace), like the other host tests.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, Once};
use std::time::Duration;

use keelson_common::api::update::{ApplyRequest, OfferedVersion, Phase};
use keelson_common::api::{Kind, ServiceStatus, State};
use keelson_common::verity;

use super::slots::{self, Discovery, SlotDevices};
use super::{Agent, Channels, Paths, Report};
use keelson_spec::extensions::ExtensionsSpec;
use keelson_spec::update::{Coordination, Strategy, UpdateSpec};
use keelson_spec::ConfigError;
use tokio::sync::{mpsc, watch};

fn image_build() -> PathBuf {
    static BUILD: Once = Once::new();
    // sysd/crates/update → the workspace root.
    let ws = Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(3)
        .unwrap()
        .to_path_buf();
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| ws.join("target"));
    BUILD.call_once(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let st = Command::new(cargo)
            .args(["build", "-q", "-p", "image-build"])
            .current_dir(&ws)
            .status()
            .expect("cargo build -p image-build");
        assert!(st.success(), "building image-build failed");
    });
    target.join("debug/image-build")
}

fn ib(args: &[&str]) -> String {
    let out = Command::new(image_build()).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "image-build {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A minimal PE image with `.osrel` and `.cmdline` sections, as a UKI looks to the agent.
fn fake_uki(osrel: &str, cmdline: &str) -> Vec<u8> {
    let mut pe = vec![0u8; 0x200];
    pe[0..2].copy_from_slice(b"MZ");
    pe[0x3c..0x40].copy_from_slice(&0x40u32.to_le_bytes());
    pe[0x40..0x44].copy_from_slice(b"PE\0\0");
    pe[0x46..0x48].copy_from_slice(&2u16.to_le_bytes()); // sections
    pe[0x54..0x56].copy_from_slice(&240u16.to_le_bytes()); // a PE32+ optional header
    let opt = 0x40 + 24;
    pe[opt..opt + 2].copy_from_slice(&0x20bu16.to_le_bytes());
    pe[opt + 60..opt + 64].copy_from_slice(&0x200u32.to_le_bytes()); // SizeOfHeaders
    pe[opt + 108..opt + 112].copy_from_slice(&16u32.to_le_bytes()); // data directories
    let table = opt + 240;
    let mut data_at = 0x200usize;
    let mut body = Vec::new();
    for (i, (name, content)) in [(".osrel", osrel), (".cmdline", cmdline)]
        .iter()
        .enumerate()
    {
        let s = table + i * 40;
        pe[s..s + name.len()].copy_from_slice(name.as_bytes());
        let len = content.len() as u32;
        pe[s + 8..s + 12].copy_from_slice(&len.to_le_bytes());
        pe[s + 16..s + 20].copy_from_slice(&len.to_le_bytes());
        pe[s + 20..s + 24].copy_from_slice(&(data_at as u32).to_le_bytes());
        body.extend_from_slice(content.as_bytes());
        data_at += content.len();
    }
    pe.extend_from_slice(&body);
    // Bulk, so the UKI is big enough for progress and ESP space checks to mean something.
    pe.extend(std::iter::repeat_n(0xccu8, 64 << 10));
    pe
}

/// A built image directory as `image-build build` leaves it (small, synthetic root).
struct FakeImage {
    dir: PathBuf,
    roothash: String,
}

fn fake_image(parent: &Path, version: &str, blocks: usize) -> FakeImage {
    fake_image_claiming(parent, version, version, blocks)
}

/// An image whose UKIs say `real` while the build manifest (and so the repository) says
/// `version`: an older version dressed up as a newer one.
fn fake_image_claiming(parent: &Path, version: &str, real: &str, blocks: usize) -> FakeImage {
    let mut root = Vec::with_capacity(blocks * 4096);
    let mut x: u32 = version
        .bytes()
        .fold(7, |a, b| a.wrapping_mul(31).wrapping_add(b as u32));
    for _ in 0..blocks * 4096 / 4 {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        // Compressible, like a file system: small values.
        root.extend_from_slice(&(x % 16).to_le_bytes());
    }
    fake_image_with_root(parent, version, real, &root)
}

/// An image of `version` whose root image is `root` (a multiple of 4096 bytes).
fn fake_image_with_root(parent: &Path, version: &str, real: &str, root: &[u8]) -> FakeImage {
    let dir = parent.join(format!("img-{version}"));
    std::fs::create_dir_all(&dir).unwrap();
    let tree = verity::build(&mut &root[..], root.len() as u64, &[9; 32], [3; 16]).unwrap();
    let roothash = verity::to_hex(&tree.root_hash);
    std::fs::write(dir.join("root.erofs"), root).unwrap();
    std::fs::write(dir.join("root.verity"), &tree.hash_device).unwrap();
    let osrel = format!("ID=keelson\nIMAGE_ID=keelson\nIMAGE_VERSION={real}\nVARIANT_ID=test\n");
    let uki = format!("keelson_{version}+3.efi");
    for (file, slot) in [(uki.as_str(), "a"), ("uki-slot-b.efi", "b")] {
        let cmd = format!("console=ttyS0 keelson.slot={slot} roothash={roothash}");
        std::fs::write(dir.join(file), fake_uki(&osrel, &cmd)).unwrap();
    }
    let manifest = serde_json::json!({"image": {"name": "test", "version": version, "roothash_a": roothash, "uki": uki}});
    std::fs::write(dir.join("manifest.json"), manifest.to_string()).unwrap();
    FakeImage { dir, roothash }
}

/// A static file server with faults to inject.
#[derive(Default)]
struct Faults {
    /// Close the connection after this many body bytes, once, for paths ending like this.
    drop_once: Option<(String, usize)>,
    /// Always stop after this many body bytes (announcing the full length).
    truncate: Option<(String, usize)>,
    /// Answer every request with this instead of the file.
    garbage: bool,
}

struct Server {
    port: u16,
    faults: Arc<Mutex<Faults>>,
}

fn serve(root: PathBuf) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let faults = Arc::new(Mutex::new(Faults::default()));
    let f2 = Arc::clone(&faults);
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let root = root.clone();
            let faults = Arc::clone(&f2);
            std::thread::spawn(move || handle(conn, &root, &faults));
        }
    });
    Server { port, faults }
}

fn handle(mut conn: TcpStream, root: &Path, faults: &Mutex<Faults>) {
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut line = String::new();
    if reader.read_line(&mut line).is_err() {
        return;
    }
    let path = line.split(' ').nth(1).unwrap_or("/").to_string();
    let mut from = 0usize;
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
            break;
        }
        if let Some(r) = h.to_ascii_lowercase().strip_prefix("range: bytes=") {
            from = r.trim().trim_end_matches('-').parse().unwrap_or(0);
        }
    }
    let mut f = faults.lock().unwrap();
    let data = if f.garbage {
        b"<html>this is not what you asked for</html>".repeat(100)
    } else {
        match std::fs::read(root.join(path.trim_start_matches('/'))) {
            Ok(d) => d,
            Err(_) => {
                let _ = conn.write_all(
                    b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                );
                return;
            }
        }
    };
    let mut limit = data.len();
    if let Some((suffix, n)) = f.drop_once.clone() {
        if path.ends_with(&suffix) && from == 0 {
            limit = n;
            f.drop_once = None;
        }
    }
    if let Some((suffix, n)) = &f.truncate {
        if path.ends_with(suffix.as_str()) {
            limit = limit.min(*n);
        }
    }
    drop(f);
    let from = from.min(data.len());
    let head = if from > 0 {
        format!(
            "HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\nContent-Range: bytes {from}-{}/{}\r\nConnection: close\r\n\r\n",
            data.len() - from,
            data.len() - 1,
            data.len()
        )
    } else {
        format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            data.len()
        )
    };
    let _ = conn.write_all(head.as_bytes());
    let _ = conn.write_all(&data[from..limit.max(from)]);
    let _ = conn.flush();
}

/// What an agent reported, collected as a test reads it.
struct Reports {
    rx: Mutex<mpsc::UnboundedReceiver<Report>>,
    seen: Mutex<Vec<Report>>,
}

impl Reports {
    fn channel() -> (mpsc::UnboundedSender<Report>, Reports) {
        let (tx, rx) = mpsc::unbounded_channel();
        let reports = Reports {
            rx: Mutex::new(rx),
            seen: Mutex::new(Vec::new()),
        };
        (tx, reports)
    }

    /// Everything reported so far.
    fn all(&self) -> Vec<Report> {
        let mut seen = self.seen.lock().unwrap();
        let mut rx = self.rx.lock().unwrap();
        while let Ok(r) = rx.try_recv() {
            seen.push(r);
        }
        seen.clone()
    }

    fn events(&self) -> String {
        self.all()
            .iter()
            .filter_map(|r| match r {
                Report::Event(n) => Some(format!("{}: {}\n", n.kind, n.message)),
                Report::Reboot => None,
            })
            .collect()
    }

    fn rebooted(&self) -> bool {
        self.all().contains(&Report::Reboot)
    }
}

/// A node on the host: running `running` from slot A; slot B is two files; the ESP a directory.
struct Node {
    dir: tempfile::TempDir,
    reports: Reports,
    services: watch::Sender<Vec<ServiceStatus>>,
    extensions: watch::Sender<Result<ExtensionsSpec, ConfigError>>,
    spec: watch::Sender<Result<UpdateSpec, ConfigError>>,
    agent: Arc<Agent>,
    key: PathBuf,
    root_json: PathBuf,
    repo: PathBuf,
    server: Server,
}

fn netns() {
    // SAFETY: unshare affects only this thread (and threads and children it creates later).
    let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
    assert_eq!(
        rc,
        0,
        "unshare(CLONE_NEWNET) needs root: {}",
        std::io::Error::last_os_error()
    );
    keelson_net::loopback::loopback_up().unwrap();
}

fn node(running: &FakeImage, version: &str, slot: &str) -> Node {
    node_with(running, version, slot, false)
}

/// A node; with `verity_root`, the running slot's root (as its dm-verity device would serve
/// it) is a file of the running image's root, which delta updates copy chunks from.
fn node_with(running: &FakeImage, version: &str, slot: &str, verity_root: bool) -> Node {
    netns();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let key = d.join("key.pk8");
    let root_json = d.join("root.json");
    ib(&["update", "keygen", key.to_str().unwrap()]);
    ib(&[
        "update",
        "root",
        "--key",
        key.to_str().unwrap(),
        "--out",
        root_json.to_str().unwrap(),
    ]);
    let repo = d.join("repo");
    std::fs::create_dir_all(&repo).unwrap();
    let esp = d.join("esp");
    std::fs::create_dir_all(esp.join("EFI/Linux")).unwrap();
    // UEFI variables: none (Secure Boot off) unless a test writes some.
    let efivars = Some(d.join("efivars"));
    std::fs::create_dir_all(d.join("efivars")).unwrap();
    // The running entry, and a stale entry of the other slot (invalidated by an install).
    let other = if slot == "a" { "b" } else { "a" };
    std::fs::write(
        esp.join(format!("EFI/Linux/keelson_{version}.efi")),
        fake_uki(
            &format!("IMAGE_VERSION={version}\n"),
            &format!("keelson.slot={slot} roothash={}", running.roothash),
        ),
    )
    .unwrap();
    std::fs::write(
        esp.join("EFI/Linux/keelson_0.0.1.efi"),
        fake_uki(
            "IMAGE_VERSION=0.0.1\n",
            &format!("keelson.slot={other} roothash=00"),
        ),
    )
    .unwrap();
    std::fs::write(d.join("root-b"), vec![0u8; 1 << 20]).unwrap();
    std::fs::write(d.join("root-b-verity"), vec![0u8; 64 << 10]).unwrap();
    std::fs::write(
        d.join("os-release"),
        format!("ID=keelson\nIMAGE_VERSION={version}\nVARIANT_ID=test\n"),
    )
    .unwrap();
    std::fs::write(d.join("machine-id"), "0123456789abcdef0123456789abcdef\n").unwrap();
    let server = serve(repo.clone());
    let (spec, spec_rx) = watch::channel(Ok(UpdateSpec {
        repository: Some(format!("http://127.0.0.1:{}/", server.port)),
        health_timeout: keelson_spec::units::Span(Duration::from_secs(3)),
        ..UpdateSpec::default()
    }));
    let (services, services_rx) = watch::channel(Vec::new());
    let (extensions, extensions_rx) = watch::channel(Ok(ExtensionsSpec::default()));
    let (reports_tx, reports) = Reports::channel();
    let agent = Agent::new(
        Paths {
            state_dir: d.join("var/update"),
            trusted_root: root_json.clone(),
            os_release: d.join("os-release"),
            machine_id: d.join("machine-id"),
            extensions: d.join("var/extensions"),
        },
        Discovery::Files {
            cmdline: format!("quiet keelson.slot={slot} roothash={}", running.roothash),
            target: SlotDevices {
                root: d.join("root-b"),
                root_size: 1 << 20,
                verity: d.join("root-b-verity"),
                verity_size: 64 << 10,
            },
            running_root: verity_root.then(|| {
                let path = d.join("running-root");
                std::fs::copy(running.dir.join("root.erofs"), &path).unwrap();
                path
            }),
            esp,
            efivars: efivars.clone(),
        },
        Channels {
            spec: spec_rx,
            services: services_rx,
            extensions: extensions_rx,
            reports: reports_tx,
        },
    );
    Node {
        dir,
        reports,
        services,
        extensions,
        spec,
        agent,
        key,
        root_json,
        repo,
        server,
    }
}

impl Node {
    fn add(&self, img: &FakeImage, extra: &[&str]) {
        let mut args = vec![
            "update",
            "add",
            "--repo",
            self.repo.to_str().unwrap(),
            "--root",
            self.root_json.to_str().unwrap(),
            "--key",
            self.key.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        args.push(img.dir.to_str().unwrap());
        ib(&args);
    }

    fn esp_files(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(self.dir.path().join("esp/EFI/Linux"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    fn events(&self) -> String {
        self.reports.events()
    }

    /// Changes the effective `[update]` table, as an apply would.
    fn set_spec(&self, change: impl FnOnce(&mut UpdateSpec)) {
        self.spec.send_modify(|s| change(s.as_mut().unwrap()));
    }

    /// Applies and waits for the background install to end; Err is the refusal or failure.
    fn apply(&self, rt: &tokio::runtime::Runtime, req: ApplyRequest) -> Result<(), String> {
        rt.block_on(async {
            self.agent.apply(req).await.map_err(|f| f.message)?;
            for _ in 0..600 {
                let s = self.agent.status();
                if s.phase == Phase::Staged {
                    return Ok(());
                }
                if s.phase == Phase::Idle && !self.agent.busy.load(Ordering::SeqCst) {
                    return Err(s.last_error.unwrap_or_default());
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err("timed out".into())
        })
    }

    fn slot_b_hash(&self, img: &FakeImage) -> String {
        let root = std::fs::read(self.dir.path().join("root-b")).unwrap();
        let len = std::fs::metadata(img.dir.join("root.erofs")).unwrap().len() as usize;
        let tree = verity::build(&mut &root[..len], len as u64, &[9; 32], [3; 16]).unwrap();
        verity::to_hex(&tree.root_hash)
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn critical(name: &str, state: State) -> ServiceStatus {
    ServiceStatus {
        name: name.into(),
        kind: Kind::Service,
        state,
        health: None,
        critical: true,
        source: "system".into(),
        image: "/".into(),
        pid: None,
        started_at_ms: None,
        restarts: 0,
        last_exit: None,
        reason: None,
        next_restart_ms: None,
        spec_hash: String::new(),
    }
}

#[test]
fn apply_installs_verified_slot_with_try_counter_and_refuses_what_it_must() {
    let t = tempfile::tempdir().unwrap();
    let v1 = fake_image(t.path(), "0.1.0", 64);
    let v2 = fake_image(t.path(), "0.2.0", 64);
    let n = node(&v1, "0.1.0", "a");
    let rt = rt();
    n.add(&v1, &[]);
    n.add(&v2, &["--wave", "0:100"]);

    let check = rt.block_on(n.agent.check()).unwrap();
    assert_eq!(check.available.as_deref(), Some("0.2.0"), "{check:?}");
    let verdicts: BTreeMap<_, _> = check
        .versions
        .iter()
        .map(|v| (v.version.clone(), v.verdict.clone()))
        .collect();
    assert_eq!(verdicts["0.1.0"], "running");

    // A truncated payload: nothing marked bootable, the stale slot-B entry already gone.
    n.server.faults.lock().unwrap().truncate = Some(("root.erofs.gz".into(), 1000));
    let err = n.apply(&rt, ApplyRequest::default()).unwrap_err();
    assert!(
        err.contains("truncated") || err.contains("download failed"),
        "{err}"
    );
    assert_eq!(n.esp_files(), ["keelson_0.1.0.efi"], "{}", n.events());
    n.server.faults.lock().unwrap().truncate = None;

    // A dropped connection mid-download resumes with a range request.
    n.server.faults.lock().unwrap().drop_once = Some(("root.erofs.gz".into(), 3000));
    n.apply(&rt, ApplyRequest::default())
        .unwrap_or_else(|e| panic!("{e}\n{}", n.events()));
    assert!(n.events().contains("update-retry"), "{}", n.events());
    assert_eq!(n.esp_files(), ["keelson_0.1.0.efi", "keelson_0.2.0+3.efi"]);
    assert_eq!(n.slot_b_hash(&v2), v2.roothash);
    let s = n.agent.status();
    assert_eq!(s.staged.as_deref(), Some("0.2.0"));
    let uki = n.dir.path().join("esp/EFI/Linux/keelson_0.2.0+3.efi");
    let cmd = slots::pe_section(&uki, ".cmdline").unwrap().unwrap();
    assert!(String::from_utf8_lossy(&cmd).contains("keelson.slot=b"));
    // Staged already: a second apply says so.
    let err = n.apply(&rt, ApplyRequest::default()).unwrap_err();
    assert!(err.contains("already staged"), "{err}");
    // cancel discards it: the running slot is the only entry again.
    rt.block_on(n.agent.cancel()).unwrap();
    assert_eq!(n.esp_files(), ["keelson_0.1.0.efi"]);
    assert!(n.agent.status().staged.is_none());
}

#[test]
fn tampered_payload_bad_signature_expiry_and_replayed_metadata_are_refused() {
    let t = tempfile::tempdir().unwrap();
    let v1 = fake_image(t.path(), "0.1.0", 32);
    let v2 = fake_image(t.path(), "0.2.0", 32);
    let n = node(&v1, "0.1.0", "a");
    let rt = rt();
    n.add(&v1, &[]);
    let old_metadata = t.path().join("old-metadata");
    copy_dir(&n.repo.join("metadata"), &old_metadata);
    n.add(&v2, &[]);

    // Tampered payload: one flipped byte in the compressed root.
    let target = std::fs::read_dir(n.repo.join("targets"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.to_string_lossy().ends_with("test-0.2.0-root.erofs.gz"))
        .unwrap();
    let good = std::fs::read(&target).unwrap();
    let mut bad = good.clone();
    let mid = bad.len() / 2;
    bad[mid] ^= 0xff;
    std::fs::write(&target, &bad).unwrap();
    let err = n.apply(&rt, ApplyRequest::default()).unwrap_err();
    assert!(
        err.contains("sha256") || err.contains("gzip") || err.contains("corrupt"),
        "{err}"
    );
    assert_eq!(
        n.esp_files(),
        ["keelson_0.1.0.efi"],
        "no entry for a bad slot"
    );
    std::fs::write(&target, &good).unwrap();

    // Bad signature: timestamp.json's signed part edited.
    let ts = n.repo.join("metadata/timestamp.json");
    let good_ts = std::fs::read_to_string(&ts).unwrap();
    std::fs::write(&ts, good_ts.replacen("\"version\": 2", "\"version\": 3", 1)).unwrap();
    let err = rt.block_on(n.agent.check()).unwrap_err().message;
    assert!(err.contains("rejected"), "{err}");
    std::fs::write(&ts, &good_ts).unwrap();

    // Now the node trusts version 2 of the metadata: replaying version 1 is refused.
    rt.block_on(n.agent.check()).unwrap();
    copy_dir(&old_metadata, &n.repo.join("metadata"));
    let err = rt.block_on(n.agent.check()).unwrap_err().message;
    assert!(err.contains("rejected"), "{err}");

    // Garbage from the server.
    n.server.faults.lock().unwrap().garbage = true;
    let err = rt.block_on(n.agent.check()).unwrap_err().message;
    assert!(err.contains("rejected"), "{err}");
    n.server.faults.lock().unwrap().garbage = false;

    // Expired metadata.
    let v3 = fake_image(t.path(), "0.3.0", 32);
    std::fs::remove_dir_all(n.repo.join("metadata")).unwrap();
    std::fs::remove_dir_all(n.dir.path().join("var/update/tuf")).unwrap();
    n.add(&v3, &["--expires-in", "1s"]);
    std::thread::sleep(Duration::from_secs(2));
    let err = rt.block_on(n.agent.check()).unwrap_err().message;
    assert!(err.to_lowercase().contains("expired"), "{err}");
    assert_eq!(n.esp_files(), ["keelson_0.1.0.efi"]);
}

#[test]
fn downgrades_waves_pins_full_disk_and_concurrent_applies() {
    let t = tempfile::tempdir().unwrap();
    let v1 = fake_image(t.path(), "0.1.0", 32);
    let v2 = fake_image(t.path(), "0.2.0", 32);
    let v3 = fake_image(t.path(), "0.3.0", 32);
    let big = fake_image(t.path(), "0.9.0", 300);
    let n = node(&v2, "0.2.0", "a");
    let rt = rt();
    n.add(&v1, &[]);
    n.add(&v3, &["--wave", "1000:100"]);
    let check = rt.block_on(n.agent.check()).unwrap();
    assert_eq!(check.available, None, "{check:?}");
    let v: BTreeMap<_, _> = check
        .versions
        .iter()
        .map(|v| (v.version.clone(), v.verdict.clone()))
        .collect();
    assert!(v["0.1.0"].contains("downgrade"), "{v:?}");
    assert!(v["0.3.0"].contains("wave"), "{v:?}");
    let err = n
        .apply(
            &rt,
            ApplyRequest {
                version: Some("0.1.0".into()),
                ..Default::default()
            },
        )
        .unwrap_err();
    assert!(err.contains("downgrade needs --force"), "{err}");
    assert_eq!(n.esp_files(), ["keelson_0.0.1.efi", "keelson_0.2.0.efi"]);

    // A pin below 0.9.0, then the pin lifted: the root does not fit slot B.
    n.add(&big, &[]);
    n.set_spec(|s| s.max_version = Some("0.5".into()));
    let err = n
        .apply(
            &rt,
            ApplyRequest {
                version: Some("0.9.0".into()),
                ..Default::default()
            },
        )
        .unwrap_err();
    assert!(err.contains("max_version"), "{err}");
    n.set_spec(|s| s.max_version = None);
    let err = n.apply(&rt, ApplyRequest::default()).unwrap_err();
    assert!(err.contains("full disk"), "{err}");
    assert_eq!(n.esp_files(), ["keelson_0.0.1.efi", "keelson_0.2.0.efi"]);

    // Forced downgrade: installed, and the running entry demoted so the old one boots first.
    // Two applies at once: the second is refused while the first runs.
    let second = rt.block_on(async {
        let first = n.agent.apply(ApplyRequest {
            version: Some("0.1.0".into()),
            force: true,
            reboot: false,
        });
        let second = n.agent.apply(ApplyRequest {
            version: Some("0.1.0".into()),
            force: true,
            reboot: false,
        });
        let (a, b) = tokio::join!(first, second);
        a.unwrap();
        b
    });
    assert!(second.unwrap_err().message.contains("already in progress"));
    for _ in 0..200 {
        if n.agent.status().phase == Phase::Staged {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        n.esp_files(),
        ["keelson_0.1.0+3.efi", "keelson_0.2.0+0.efi"],
        "{}",
        n.events()
    );
}

#[test]
fn an_older_version_offered_as_newer_is_refused_before_it_gets_an_entry() {
    let t = tempfile::tempdir().unwrap();
    let v1 = fake_image(t.path(), "0.1.0", 16);
    let fake = fake_image_claiming(t.path(), "0.5.0", "0.0.9", 16);
    let n = node(&v1, "0.1.0", "a");
    let rt = rt();
    n.add(&fake, &[]);
    let err = n.apply(&rt, ApplyRequest::default()).unwrap_err();
    assert!(
        err.contains("the UKI is version \"0.0.9\" but is offered as 0.5.0"),
        "{err}"
    );
    assert_eq!(n.esp_files(), ["keelson_0.1.0.efi"]);
    assert!(n.agent.status().staged.is_none());
}

#[test]
fn health_gate_blesses_or_reboots_and_rollbacks_are_reported() {
    let t = tempfile::tempdir().unwrap();
    let v2 = fake_image(t.path(), "0.2.0", 16);
    // Running 0.2.0 from slot B, freshly booted with a try counter.
    let n = node(&v2, "0.2.0", "b");
    let linux = n.dir.path().join("esp/EFI/Linux");
    std::fs::rename(
        linux.join("keelson_0.2.0.efi"),
        linux.join("keelson_0.2.0+2-1.efi"),
    )
    .unwrap();
    let rt = rt();
    n.services
        .send_replace(vec![critical("timesync", State::Starting)]);
    // Coordinated through an etcd that is not there (yet): this boot took no slot (no lease
    // in state.json), so it has none to give back and says nothing about etcd.
    n.set_spec(|s| {
        s.coordination = Some(keelson_spec::update::Coordination {
            strategy: keelson_spec::update::Strategy::EtcdLock,
            endpoints: vec!["http://127.0.0.1:1".into()],
            group: "default".into(),
            holders: 1,
            lease: keelson_spec::units::Span(Duration::from_secs(60)),
        })
    });
    rt.block_on(async {
        n.agent.boot();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(n.agent.status().assessment, "pending");
        n.services.send_modify(|s| s[0].state = State::Running);
        tokio::time::sleep(Duration::from_millis(1500)).await;
    });
    assert!(n.events().contains("update-blessed"), "{}", n.events());
    assert!(
        !n.events().contains("update-waiting-for-etcd") && !n.events().contains("slot"),
        "{}",
        n.events()
    );
    assert!(
        n.esp_files().contains(&"keelson_0.2.0.efi".to_string()),
        "{:?}",
        n.esp_files()
    );
    assert_eq!(n.agent.status().last_good.as_deref(), Some("0.2.0"));
    assert!(!n.reports.rebooted());

    // A gate that fails: reboot requested, entry keeps its counter.
    let n = node(&v2, "0.2.0", "b");
    let linux = n.dir.path().join("esp/EFI/Linux");
    std::fs::rename(
        linux.join("keelson_0.2.0.efi"),
        linux.join("keelson_0.2.0+1-2.efi"),
    )
    .unwrap();
    n.services
        .send_replace(vec![critical("timesync", State::Backoff)]);
    rt.block_on(async {
        n.agent.boot();
        tokio::time::sleep(Duration::from_secs(5)).await;
    });
    assert!(n.reports.rebooted(), "{}", n.events());
    assert!(n.events().contains("timesync (backoff)"), "{}", n.events());
    assert!(n.esp_files().contains(&"keelson_0.2.0+1-2.efi".to_string()));

    // Back on slot A after the tries ran out: reported as a rollback, failed entry removed.
    let v1 = fake_image(t.path(), "0.1.0", 16);
    let n = node(&v1, "0.1.0", "a");
    let linux = n.dir.path().join("esp/EFI/Linux");
    std::fs::write(
        linux.join("keelson_0.2.0+0-3.efi"),
        fake_uki("IMAGE_VERSION=0.2.0\n", "keelson.slot=b roothash=ff"),
    )
    .unwrap();
    std::fs::create_dir_all(n.dir.path().join("var/update")).unwrap();
    std::fs::write(
        n.dir.path().join("var/update/state.json"),
        r#"{"staged": {"version": "0.2.0", "slot": "b", "entry": "keelson_0.2.0+3.efi"}}"#,
    )
    .unwrap();
    let (reports_tx, reports) = Reports::channel();
    let agent = Agent::new(
        n.agent.paths.clone(),
        n.agent.discovery.clone(),
        Channels {
            spec: watch::channel(Ok(UpdateSpec::default())).1,
            services: watch::channel(Vec::new()).1,
            extensions: watch::channel(Ok(Default::default())).1,
            reports: reports_tx,
        },
    );
    rt.block_on(async {
        agent.boot();
        tokio::time::sleep(Duration::from_millis(500)).await;
    });
    assert!(
        reports.events().contains("rolled back from 0.2.0"),
        "{}",
        reports.events()
    );
    assert_eq!(agent.status().rolled_back_from.as_deref(), Some("0.2.0"));
    assert!(!n.esp_files().iter().any(|f| f.starts_with("keelson_0.2.0")));
}

#[test]
fn a_coordinated_rollback_halts_under_the_takers_name_and_a_halted_waiter_leaves_the_queue() {
    use keelson_fleet::{Acquire, Client, Lock};

    let t = tempfile::tempdir().unwrap();
    let v1 = fake_image(t.path(), "0.1.0", 16);
    let v2 = fake_image(t.path(), "0.2.0", 16);
    let n = node(&v1, "0.1.0", "a");
    let etcd = keelson_testkit::etcd::Etcd::start(23791, 23801);
    let coordination = |group: &str| Coordination {
        strategy: Strategy::EtcdLock,
        endpoints: vec![etcd.endpoint.clone()],
        group: group.into(),
        holders: 1,
        lease: keelson_spec::units::Span(Duration::from_secs(60)),
    };
    let client = Client::new(std::slice::from_ref(&etcd.endpoint)).unwrap();
    let rt = rt();

    // This node took the slot as node2 and rebooted into 0.2.0, which failed: slot A again,
    // early in a boot whose host name is not node2 yet (here: the test host's).
    let lease = rt.block_on(async {
        let lease = client.grant(Duration::from_secs(60)).await.unwrap();
        let lock = Lock::new(client.clone(), "g", 1, "node2");
        let got = lock.try_acquire(lease, "0.2.0", "now").await.unwrap();
        assert_eq!(got, Acquire::Held { slot: 0 });
        lease
    });
    std::fs::write(
        n.dir.path().join("esp/EFI/Linux/keelson_0.2.0+0-3.efi"),
        fake_uki("IMAGE_VERSION=0.2.0\n", "keelson.slot=b roothash=ff"),
    )
    .unwrap();
    std::fs::create_dir_all(n.dir.path().join("var/update")).unwrap();
    std::fs::write(
        n.dir.path().join("var/update/state.json"),
        format!(
            r#"{{"staged": {{"version": "0.2.0", "slot": "b", "entry": "keelson_0.2.0+3.efi"}}, "lock_lease": {lease}, "lock_node": "node2"}}"#
        ),
    )
    .unwrap();
    let (reports_tx, reports) = Reports::channel();
    let agent = Agent::new(
        n.agent.paths.clone(),
        n.agent.discovery.clone(),
        Channels {
            spec: watch::channel(Ok(UpdateSpec {
                coordination: Some(coordination("g")),
                ..UpdateSpec::default()
            }))
            .1,
            services: watch::channel(Vec::new()).1,
            extensions: watch::channel(Ok(Default::default())).1,
            reports: reports_tx,
        },
    );
    rt.block_on(async {
        agent.boot();
        for _ in 0..100 {
            if reports.events().contains("update-slot-released") {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let events = reports.events();
    assert!(
        events.contains("halted the rollout of 0.2.0")
            && events.contains("gave back 1 reboot slot"),
        "{events}"
    );
    let group = rt
        .block_on(Lock::new(client.clone(), "g", 1, "any").state())
        .unwrap();
    assert!(group.holders.is_empty(), "{group:?}");
    let halt = group.halted.expect("the rollout of 0.2.0 halted");
    assert_eq!(
        (halt.version.as_str(), halt.node.as_str()),
        ("0.2.0", "node2")
    );

    // A node with 0.2.0 staged waits while node9 holds the slot; node9's rollout halts: the
    // waiter drops 0.2.0 and leaves the queue (nobody sees it waiting any more).
    n.add(&v2, &[]);
    n.set_spec(|s| s.coordination = Some(coordination("g2")));
    rt.block_on(async {
        let lock9 = Lock::new(client.clone(), "g2", 1, "node9");
        let lease9 = client.grant(Duration::from_secs(60)).await.unwrap();
        let got = lock9.try_acquire(lease9, "0.2.0", "now").await.unwrap();
        assert_eq!(got, Acquire::Held { slot: 0 });
        n.agent
            .apply(ApplyRequest {
                version: None,
                force: false,
                reboot: true,
            })
            .await
            .unwrap();
        let wait_for = |what: &'static str| {
            let events = &n.reports;
            async move {
                for _ in 0..600 {
                    if events.events().contains(what) {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                panic!("no {what}: {}", events.events());
            }
        };
        wait_for("update-waiting-for-slot").await;
        let group = lock9.state().await.unwrap();
        assert_eq!(group.waiting.len(), 1, "{group:?}");
        lock9
            .halt("0.2.0", "it did not come up healthy", "now")
            .await
            .unwrap();
        wait_for("update-halted").await;
        let group = lock9.state().await.unwrap();
        assert!(group.waiting.is_empty(), "{group:?}");
    });
    assert!(!n.reports.rebooted(), "{}", n.events());
    assert_eq!(n.agent.status().staged, None);
    assert!(!n.esp_files().iter().any(|f| f.starts_with("keelson_0.2.0")));
}

/// `[update.coordination]` whose etcd is not there when an update is staged for an automatic
/// reboot: the node says so once, waits, and never reboots without a slot; once etcd answers,
/// it takes a slot and only then asks for the reboot.
#[test]
fn a_staged_update_waits_for_etcd_and_never_reboots_without_a_slot() {
    let t = tempfile::tempdir().unwrap();
    let v1 = fake_image(t.path(), "0.1.0", 16);
    let v2 = fake_image(t.path(), "0.2.0", 16);
    let n = node(&v1, "0.1.0", "a");
    n.add(&v2, &[]);
    n.set_spec(|s| {
        s.coordination = Some(Coordination {
            strategy: Strategy::EtcdLock,
            endpoints: vec!["http://127.0.0.1:23795".into()],
            group: "default".into(),
            holders: 1,
            lease: keelson_spec::units::Span(Duration::from_secs(60)),
        })
    });
    let rt = rt();
    rt.block_on(async {
        n.agent
            .apply(ApplyRequest {
                reboot: true,
                ..Default::default()
            })
            .await
            .unwrap();
        for _ in 0..600 {
            if n.agent.status().phase == Phase::WaitingForSlot {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Two more retries of the lock.
        tokio::time::sleep(Duration::from_secs(11)).await;
    });
    assert_eq!(
        n.agent.status().phase,
        Phase::WaitingForSlot,
        "{}",
        n.events()
    );
    assert!(!n.reports.rebooted(), "{}", n.events());
    let events = n.events();
    assert!(
        events.contains("update-waiting-for-etcd: 0.2.0 is staged; not rebooting without a slot: ")
            && events.contains("127.0.0.1:23795"),
        "{events}"
    );
    assert_eq!(
        events.matches("update-waiting-for-etcd").count(),
        1,
        "said once, not at every retry: {events}"
    );
    // The new slot is staged and stays so.
    assert!(
        n.esp_files().contains(&"keelson_0.2.0+3.efi".to_string()),
        "{:?}",
        n.esp_files()
    );

    // etcd comes up: the next retry takes the slot, and the reboot follows.
    let _etcd = keelson_testkit::etcd::Etcd::start(23795, 23805);
    rt.block_on(async {
        for _ in 0..300 {
            if n.reports.rebooted() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    assert!(n.reports.rebooted(), "{}", n.events());
    let events = n.events();
    let taken = events.find("update-slot-taken").expect("a slot taken");
    assert!(taken > events.find("update-waiting-for-etcd").unwrap());
    let c = n.agent.status().coordination.expect("coordination status");
    assert_eq!(c.held_by.len(), 1, "{c:?}");
    assert!(c.held_by[0].contains("0.2.0"), "{c:?}");
}

/// An extension build directory as `image-build extension` writes it, around `raw`.
fn fake_extension(parent: &Path, name: &str, os_version: &str, raw: &[u8]) -> PathBuf {
    use sha2::Digest;
    let dir = parent.join(format!("ext-{name}-{os_version}"));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(format!("{name}.raw")), raw).unwrap();
    let manifest = serde_json::json!({
        "name": name,
        "version": "1.0",
        "os_version": os_version,
        "roothash": "ab".repeat(32),
        "raw": {
            "path": format!("{name}.raw"),
            "size": raw.len(),
            "sha256": hex::encode(sha2::Sha256::digest(raw)),
        },
    });
    std::fs::write(dir.join("manifest.json"), manifest.to_string()).unwrap();
    dir
}

/// A small /var (tmpfs) under the node, unmounted on drop.
struct SmallVar(PathBuf);

impl SmallVar {
    fn mount(path: PathBuf, size_mib: u64) -> SmallVar {
        std::fs::create_dir_all(&path).unwrap();
        nix::mount::mount(
            Some("tmpfs"),
            &path,
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            Some(format!("size={size_mib}m").as_str()),
        )
        .expect("mounting a tmpfs (run the tests as root)");
        SmallVar(path)
    }
}

impl Drop for SmallVar {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
    }
}

/// Every file under `dir`, relative to it.
fn files_under(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                todo.push(p);
            } else {
                out.push(p.strip_prefix(dir).unwrap().display().to_string());
            }
        }
    }
    out.sort();
    out
}

/// An extension download that /var cannot hold: refused before a byte is written when its
/// compressed size says so, stopped when its content grows past the room left; either way the
/// partial file is gone, the error names the extension and /var, and the set the node had
/// stays recorded.
#[test]
fn an_extension_download_that_fills_var_is_stopped_and_the_old_set_kept() {
    let t = tempfile::tempdir().unwrap();
    let v1 = fake_image(t.path(), "0.1.0", 16);
    let n = node(&v1, "0.1.0", "a");
    // 72 MiB of /var: 8 MiB beyond the 64 MiB an extension download leaves free.
    let _var = SmallVar::mount(n.dir.path().join("var"), 72);
    // The set the node runs: one extension already in the store.
    let store = keelson_extensions::Store::new(n.dir.path().join("var/extensions"));
    let old = keelson_extensions::Entry {
        name: "old".into(),
        version: "1.0".into(),
        roothash: "cd".repeat(32),
        built_for: "0.1.0".into(),
        source: "http://elsewhere/old".into(),
        listed_for: Vec::new(),
    };
    std::fs::write(store.staging(&old).unwrap(), b"an image").unwrap();
    std::fs::rename(store.staging(&old).unwrap(), store.image(&old)).unwrap();
    store.record("0.1.0", vec![old.clone()]).unwrap();
    let before = files_under(store.dir());

    // Compressed, 10 MiB of noise: larger than the 8 MiB left.
    let mut noise = vec![0u8; 10 << 20];
    let mut x: u32 = 1;
    for b in noise.iter_mut() {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        *b = x as u8;
    }
    let big = fake_extension(t.path(), "big", "0.1.0", &noise);
    // Compressed, a few KiB; uncompressed, 24 MiB of zeros.
    let bomb = fake_extension(t.path(), "bomb", "0.1.0", &vec![0u8; 24 << 20]);
    n.add(
        &v1,
        &[
            "--extension",
            big.to_str().unwrap(),
            "--extension",
            bomb.to_str().unwrap(),
        ],
    );
    let rt = rt();
    for (name, says) in [
        ("big", "its download (10 MiB compressed) does not fit on /var (7 MiB free beyond the 64 MiB kept for logs and state): nothing written"),
        ("bomb", "(uncompressed) does not fit on /var (7 MiB free beyond the 64 MiB kept for logs and state)"),
    ] {
        n.extensions.send_modify(|x| {
            *x = Ok(ExtensionsSpec {
                enabled: vec![name.into()],
            })
        });
        let err = rt
            .block_on(n.agent.sync_running_extensions())
            .unwrap_err()
            .message;
        assert!(err.starts_with(&format!("extension {name} 1.0: ")), "{err}");
        assert!(err.contains(says), "{err}");
        assert_eq!(files_under(store.dir()), before, "{name}: nothing left behind");
        assert_eq!(store.set("0.1.0").unwrap(), vec![old.clone()]);
    }
    assert!(
        n.events().contains("extension-downloading: bomb 1.0"),
        "{}",
        n.events()
    );
}

fn copy_dir(from: &Path, to: &Path) {
    let _ = std::fs::remove_dir_all(to);
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

#[allow(dead_code)]
fn read_all(mut r: impl Read) -> Vec<u8> {
    let mut v = Vec::new();
    r.read_to_end(&mut v).unwrap();
    v
}

/// An RSA key and self-signed certificate (PEM) made by openssl, as a Secure Boot db key.
fn sb_key(dir: &Path, cn: &str) -> keelson_common::authenticode::Signer {
    let (key, crt) = keelson_testkit::secure_boot::keypair(dir, cn, cn);
    keelson_common::authenticode::Signer::new(
        &std::fs::read(key).unwrap(),
        &std::fs::read(crt).unwrap(),
    )
    .unwrap()
}

/// Signs both UKIs of a fake image.
fn sign_image(img: &FakeImage, version: &str, key: &keelson_common::authenticode::Signer) {
    for f in [format!("keelson_{version}+3.efi"), "uki-slot-b.efi".into()] {
        let p = img.dir.join(f);
        std::fs::write(&p, key.sign(&std::fs::read(&p).unwrap()).unwrap()).unwrap();
    }
}

/// Writes efivarfs files saying Secure Boot is on, with `db` holding `cert` (DER).
fn secure_boot_on(efivars: &Path, cert: &[u8]) {
    let attrs = 7u32.to_le_bytes();
    std::fs::write(
        efivars.join("SecureBoot-8be4df61-93ca-11d2-aa0d-00e098032b8c"),
        [&attrs[..], &[1]].concat(),
    )
    .unwrap();
    // One EFI_SIGNATURE_LIST of EFI_CERT_X509_GUID.
    let x509 = [
        0xa1, 0x59, 0xc0, 0xa5, 0xe4, 0x94, 0xa7, 0x4a, 0x87, 0xb5, 0xab, 0x15, 0x5c, 0x2b, 0xf0,
        0x72,
    ];
    let size = 16 + cert.len() as u32;
    let mut db = attrs.to_vec();
    db.extend_from_slice(&x509);
    db.extend_from_slice(&(28 + size).to_le_bytes());
    db.extend_from_slice(&0u32.to_le_bytes());
    db.extend_from_slice(&size.to_le_bytes());
    db.extend_from_slice(&[0x11; 16]);
    db.extend_from_slice(cert);
    std::fs::write(efivars.join("db-d719b2cb-3d3a-4596-a3bc-dad00e67656f"), db).unwrap();
}

#[test]
fn a_secure_boot_node_refuses_an_unsigned_or_foreign_uki_before_touching_the_esp() {
    let t = tempfile::tempdir().unwrap();
    let ours = sb_key(t.path(), "Keelson db");
    let theirs = sb_key(t.path(), "Someone else");
    let v1 = fake_image(t.path(), "0.1.0", 16);
    let unsigned = fake_image(t.path(), "0.2.0", 16);
    let n = node(&v1, "0.1.0", "a");
    secure_boot_on(&n.dir.path().join("efivars"), ours.cert_der());
    let rt = rt();
    n.add(&unsigned, &[]);
    let before = n.esp_files();
    assert_eq!(before, ["keelson_0.0.1.efi", "keelson_0.1.0.efi"]);

    let err = n.apply(&rt, ApplyRequest::default()).unwrap_err();
    assert!(
        err.contains("0.2.0's UKI for slot b (test-0.2.0-uki-b.efi) would not boot under Secure Boot: unsigned"),
        "{err}"
    );
    assert!(err.contains("refused before touching the ESP"), "{err}");
    // Not even slot B's stale entry was removed.
    assert_eq!(n.esp_files(), before);
    assert!(n.agent.status().last_error.unwrap().contains("unsigned"));

    let foreign = fake_image(t.path(), "0.3.0", 16);
    sign_image(&foreign, "0.3.0", &theirs);
    n.add(&foreign, &[]);
    let err = n.apply(&rt, ApplyRequest::default()).unwrap_err();
    assert!(
        err.contains("signed by \"Someone else\", which the firmware's db does not trust"),
        "{err}"
    );
    assert_eq!(n.esp_files(), before);

    let good = fake_image(t.path(), "0.4.0", 16);
    sign_image(&good, "0.4.0", &ours);
    n.add(&good, &[]);
    n.apply(&rt, ApplyRequest::default())
        .unwrap_or_else(|e| panic!("{e}\n{}", n.events()));
    assert!(
        n.events()
            .contains("is signed by \"Keelson db\", trusted by the firmware's db"),
        "{}",
        n.events()
    );
    assert_eq!(n.esp_files(), ["keelson_0.1.0.efi", "keelson_0.4.0+3.efi"]);
    // The UKI on the ESP is the signed one, byte for byte.
    assert_eq!(
        std::fs::read(n.dir.path().join("esp/EFI/Linux/keelson_0.4.0+3.efi")).unwrap(),
        std::fs::read(good.dir.join("uki-slot-b.efi")).unwrap()
    );
}

/// Incompressible bytes (so every stored chunk is a raw zstd block and a flipped byte of it is
/// a flipped byte of the chunk).
pub(crate) fn random_bytes(seed: u32, len: usize) -> Vec<u8> {
    let mut x = seed.max(1);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x >> 7) as u8
        })
        .collect()
}

/// Versions 0.1.0 and 0.2.0 whose roots differ in one 8 KiB stretch (one service changed).
fn related_images(parent: &Path) -> (FakeImage, FakeImage, Vec<u8>) {
    let v1 = random_bytes(11, 200 * 4096);
    let mut v2 = v1.clone();
    v2[400_000..408_192].copy_from_slice(&random_bytes(12, 8192));
    let a = fake_image_with_root(parent, "0.1.0", "0.1.0", &v1);
    let b = fake_image_with_root(parent, "0.2.0", "0.2.0", &v2);
    (a, b, v2)
}

/// A node running 0.1.0 from slot A with its root readable as through dm-verity, and a
/// repository with 0.1.0 and 0.2.0 (added with `v2_options`): what every delta test starts
/// from. Returns the node, both images and 0.2.0's root.
fn delta_node(parent: &Path, v2_options: &[&str]) -> (Node, FakeImage, FakeImage, Vec<u8>) {
    let (v1, v2, v2_root) = related_images(parent);
    let n = node_with(&v1, "0.1.0", "a", true);
    n.add(&v1, &[]);
    n.add(&v2, v2_options);
    (n, v1, v2, v2_root)
}

impl Node {
    /// The file of the signed target `name` in the repository (consistent snapshots: its
    /// sha256 before the name).
    fn target_file(&self, name: &str) -> PathBuf {
        std::fs::read_dir(self.repo.join("targets"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.to_string_lossy().ends_with(&format!(".{name}")))
            .unwrap_or_else(|| panic!("no {name} in the repository"))
    }

    /// What `keelctl update check` says of `version`.
    fn offered(&self, rt: &tokio::runtime::Runtime, version: &str) -> OfferedVersion {
        let check = rt.block_on(self.agent.check()).unwrap();
        check
            .versions
            .into_iter()
            .find(|v| v.version == version)
            .unwrap_or_else(|| panic!("{version} is not offered"))
    }

    /// The chunk list the repository signed for `version`.
    fn chunk_list(&self, version: &str) -> keelson_common::update::ChunkList {
        let file = self.target_file(&format!("test-{version}-root.chunks.json"));
        serde_json::from_slice(&std::fs::read(file).unwrap()).unwrap()
    }

    /// The running slot's root, as its dm-verity device serves it.
    fn running_root(&self) -> Vec<u8> {
        std::fs::read(self.dir.path().join("running-root")).unwrap()
    }

    /// The first `len` bytes of slot B's root partition.
    fn slot_b_root(&self, len: usize) -> Vec<u8> {
        std::fs::read(self.dir.path().join("root-b")).unwrap()[..len].to_vec()
    }

    fn chunk_file(&self, sha: &str) -> PathBuf {
        self.repo.join("targets/chunks").join(sha)
    }

    /// Discards the staged version and scribbles over slot B, so the next install has to
    /// write every byte of it again.
    fn reset_slot_b(&self, rt: &tokio::runtime::Runtime) {
        rt.block_on(self.agent.cancel()).unwrap();
        std::fs::write(self.dir.path().join("root-b"), vec![0x5a; 1 << 20]).unwrap();
    }

    /// Replaces the target `name` with `bytes` and signs the repository anew with the test's
    /// key (targets, snapshot and timestamp one version up): a repository that signs bad input.
    fn resign_target(&self, rt: &tokio::runtime::Runtime, name: &str, bytes: &[u8]) {
        use tough::editor::signed::PathExists;
        use tough::editor::RepositoryEditor;
        use tough::key_source::{KeySource, LocalKeySource};
        let staging = tempfile::tempdir().unwrap();
        std::fs::write(staging.path().join(name), bytes).unwrap();
        let meta = self.repo.join("metadata");
        let targets = self.repo.join("targets");
        let url = |p: &Path| url::Url::from_directory_path(p).unwrap();
        rt.block_on(async {
            let repo = tough::RepositoryLoader::new(
                &std::fs::read(&self.root_json).unwrap(),
                url(&meta),
                url(&targets),
            )
            .load()
            .await
            .unwrap();
            let next = |v: std::num::NonZeroU64| v.checked_add(1).unwrap();
            let (t, s, ts) = (
                next(repo.targets().signed.version),
                next(repo.snapshot().signed.version),
                next(repo.timestamp().signed.version),
            );
            let expires = repo.targets().signed.expires;
            let mut e = RepositoryEditor::from_repo(&self.root_json, repo)
                .await
                .unwrap();
            e.remove_target(&tough::TargetName::new(name).unwrap())
                .unwrap();
            let (tn, target) = RepositoryEditor::build_target(staging.path().join(name))
                .await
                .unwrap();
            e.add_target(tn, target).unwrap();
            e.targets_version(t)
                .unwrap()
                .targets_expires(expires)
                .unwrap()
                .snapshot_version(s)
                .snapshot_expires(expires)
                .timestamp_version(ts)
                .timestamp_expires(expires);
            let keys: Vec<Box<dyn KeySource>> = vec![Box::new(LocalKeySource {
                path: self.key.clone(),
            })];
            let signed = e.sign(&keys).await.unwrap();
            signed
                .copy_targets(staging.path(), &targets, PathExists::Skip)
                .await
                .unwrap();
            signed.write(&meta).await.unwrap();
        });
    }
}

/// N → N+1 by delta: only the changed chunks are downloaded, the rest copied from the running
/// slot, and slot B is bit-identical to N+1's root; the running slot is only read. Then each
/// way a delta must give up ends in the full root, with an event saying why, and a good slot:
/// over the configured share, a chunk with wrong content (refused on arrival), a missing chunk.
#[test]
fn a_version_comes_by_delta_and_every_failure_falls_back_to_the_full_root() {
    let t = tempfile::tempdir().unwrap();
    // Chunks only: the root-patch path has its own test.
    let (n, v1, v2, v2_root) = delta_node(t.path(), &["--root-patches", "0"]);
    let rt = rt();
    let running_before = n.running_root();
    let slot_b = || n.slot_b_root(v2_root.len());
    // The node booted 0.1.0's UKI for slot A: 0.2.0's for slot B comes as a patch against it.
    std::fs::copy(
        v1.dir.join("keelson_0.1.0+3.efi"),
        n.dir.path().join("esp/EFI/Linux/keelson_0.1.0.efi"),
    )
    .unwrap();

    // `keelctl update check`: both sizes.
    let offered = n.offered(&rt, "0.2.0");
    let delta = offered.delta_size.expect("a delta size for 0.2.0");
    assert!(offered.delta_note.is_none(), "{:?}", offered.delta_note);
    assert!(
        delta * 4 < offered.download_size,
        "delta {delta} vs full {}",
        offered.download_size
    );

    n.apply(&rt, ApplyRequest::default()).unwrap();
    let ev = n.events();
    assert!(
        ev.contains("update-delta: 0.2.0 by delta: downloading"),
        "{ev}"
    );
    assert!(!ev.contains("update-delta-fallback"), "{ev}");
    assert!(
        ev.contains("update-uki-patch: 0.2.0's UKI for slot b"),
        "{ev}"
    );
    assert!(
        slot_b() == v2_root,
        "slot B is not 0.2.0's root byte for byte"
    );
    assert_eq!(n.slot_b_hash(&v2), v2.roothash);
    let progress = n.agent.status().progress.unwrap();
    let list = n.chunk_list("0.2.0");
    let new: Vec<_> = {
        let old = n.chunk_list("0.1.0");
        list.chunks
            .iter()
            .filter(|c| !old.chunks.iter().any(|o| o.sha256 == c.sha256))
            .cloned()
            .collect()
    };
    assert!(
        !new.is_empty() && new.len() <= 3,
        "{} new chunks",
        new.len()
    );
    let new_bytes: u64 = new.iter().map(|c| c.stored).sum();
    let full_root = std::fs::metadata(v2.dir.join("root.erofs")).unwrap().len();
    // Downloaded: the chunk list, the new chunks, the verity tree and the UKI's patch; said so.
    assert!(
        progress.downloaded < new_bytes + (100 << 10) && progress.downloaded < full_root / 4,
        "downloaded {} (new chunks {new_bytes}, root {full_root})",
        progress.downloaded
    );
    assert!(
        ev.contains(&format!(
            "it boots next (downloaded {} KiB)",
            progress.downloaded >> 10
        )),
        "{ev}"
    );
    assert_eq!(progress.downloaded, progress.download_total);
    assert!(n.running_root() == running_before);

    // Resuming: slot B still holds what that install wrote (as after an attempt cut off while
    // downloading): the chunks to download are found in place, hashed, and not fetched again.
    rt.block_on(n.agent.cancel()).unwrap();
    n.apply(&rt, ApplyRequest::default()).unwrap();
    let ev = n.events();
    assert!(
        ev.contains(&format!(
            "update-delta-resumed: {0} of the {0} chunks to download are in slot b already",
            new.len()
        )),
        "{ev}"
    );
    assert!(slot_b() == v2_root);
    assert_eq!(n.slot_b_hash(&v2), v2.roothash);
    let resumed = n.agent.status().progress.unwrap().downloaded;
    assert_eq!(
        resumed,
        progress.downloaded - new_bytes,
        "resumed without the chunks"
    );

    // Over the share: the full root, and why.
    n.reset_slot_b(&rt);
    n.set_spec(|s| s.delta_max_percent = 1);
    n.apply(&rt, ApplyRequest::default()).unwrap();
    let ev = n.events();
    assert!(
        ev.contains("update-delta-fallback: 0.2.0 comes whole")
            && ev.contains("above update.delta_max_percent (1%)"),
        "{ev}"
    );
    assert!(slot_b() == v2_root);
    n.set_spec(|s| s.delta_max_percent = 70);

    // A chunk whose content is wrong (one byte flipped in its raw zstd block): refused on
    // arrival, then the full root.
    let bad = &new[0];
    let good = std::fs::read(n.chunk_file(&bad.sha256)).unwrap();
    let mut flipped = good.clone();
    *flipped.last_mut().unwrap() ^= 0xff;
    std::fs::write(n.chunk_file(&bad.sha256), &flipped).unwrap();
    n.reset_slot_b(&rt);
    n.apply(&rt, ApplyRequest::default()).unwrap();
    let ev = n.events();
    assert!(
        ev.contains(&format!(
            "chunk {} (bytes {}..{} of the new root): its content hashes to",
            bad.sha256,
            bad.offset,
            bad.offset + bad.length
        )) && ev.contains("(wrong content refused on arrival); downloading the full root"),
        "{ev}"
    );
    assert!(slot_b() == v2_root);
    assert_eq!(n.slot_b_hash(&v2), v2.roothash);

    // A chunk the repository lost: the full root.
    std::fs::remove_file(n.chunk_file(&bad.sha256)).unwrap();
    n.reset_slot_b(&rt);
    n.apply(&rt, ApplyRequest::default()).unwrap();
    let ev = n.events();
    assert!(
        ev.contains(&format!("chunk {} (bytes", bad.sha256))
            && ev.contains("HTTP 404; downloading the full root"),
        "{ev}"
    );
    assert!(slot_b() == v2_root);
    std::fs::write(n.chunk_file(&bad.sha256), &good).unwrap();
    assert!(
        n.running_root() == running_before,
        "the running slot was written"
    );

    // Deltas off: said so.
    n.reset_slot_b(&rt);
    n.set_spec(|s| s.delta_max_percent = 0);
    n.apply(&rt, ApplyRequest::default()).unwrap();
    assert!(
        n.events()
            .contains("comes whole (800 KiB root): deltas are off"),
        "{}",
        n.events()
    );
    assert!(
        n.events()
            .contains("0.2.0's UKI for slot b comes whole (64 KiB): deltas are off"),
        "{}",
        n.events()
    );
}

/// A repository that signs a bad chunk list (past the image's end, overlapping chunks, a chunk
/// of 1 GiB, a million entries): refused with the reason, before any chunk is fetched, the
/// full root installed instead, the running slot untouched; a million entries is refused by
/// its signed length, unread.
#[test]
fn bad_chunk_lists_are_refused_and_the_full_root_installed() {
    let t = tempfile::tempdir().unwrap();
    let (n, _, _, v2_root) = delta_node(t.path(), &["--root-patches", "0"]);
    let rt = rt();
    let running_before = n.running_root();
    let good = n.chunk_list("0.2.0");
    let size = good.size;
    let mut past = good.clone();
    past.chunks.last_mut().unwrap().length += 4096;
    let mut overlap = good.clone();
    overlap.chunks[1].offset -= 100;
    let mut huge = good.clone();
    huge.chunks = vec![keelson_common::update::ChunkEntry {
        length: 1 << 30,
        stored: 1 << 20,
        ..good.chunks[0].clone()
    }];
    huge.size = size;
    let mut million = good.clone();
    million.chunks = (0..1_000_000u64)
        .map(|i| keelson_common::update::ChunkEntry {
            sha256: format!("{i:064x}"),
            offset: i,
            length: 1,
            stored: 1,
        })
        .collect();
    let name = "test-0.2.0-root.chunks.json";
    let cases: [(&keelson_common::update::ChunkList, String); 4] = [
        (
            &past,
            format!("{name} is refused: chunk {} ends at byte {}, past the root image's end ({size})", past.chunks.len() - 1, size + 4096),
        ),
        (
            &overlap,
            format!("{name} is refused: chunk 1 starts at byte {} but the previous one ends at {} (overlap)", good.chunks[1].offset - 100, good.chunks[1].offset),
        ),
        (
            &huge,
            format!("{name} is refused: chunk 0 is 1073741824 bytes long"),
        ),
        (
            &million,
            format!("{name}: {} bytes signed, more than a chunk list of a {size}-byte root can take", serde_json::to_vec(&million).unwrap().len()),
        ),
    ];
    for (list, why) in cases {
        n.resign_target(&rt, name, &serde_json::to_vec(list).unwrap());
        let started = std::time::Instant::now();
        n.apply(&rt, ApplyRequest::default()).unwrap();
        let ev = n.events();
        assert!(ev.contains(&why), "expected {why:?} in\n{ev}");
        assert!(
            std::fs::read(n.dir.path().join("root-b")).unwrap()[..v2_root.len()] == v2_root[..]
        );
        assert!(n.running_root() == running_before);
        assert!(started.elapsed() < Duration::from_secs(60));
        n.reset_slot_b(&rt);
    }
}

/// The UKI as a patch against the running one: a node whose running UKI is the one the patch
/// was made from downloads the patch (far smaller than the UKI) and installs exactly the
/// signed UKI; a node running another UKI, and a patch that builds the wrong bytes, each get
/// the whole UKI with an event saying why.
#[test]
fn a_uki_comes_as_a_patch_against_the_running_one_and_every_failure_downloads_it_whole() {
    let t = tempfile::tempdir().unwrap();
    let (n, v1, v2, _) = delta_node(t.path(), &[]);
    let rt = rt();
    let m: keelson_common::update::Manifest = {
        let file = std::fs::read_dir(n.repo.join("targets"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.to_string_lossy().ends_with(".manifest.json"))
            .max_by_key(|p| std::fs::metadata(p).unwrap().modified().unwrap())
            .unwrap();
        serde_json::from_slice(&std::fs::read(file).unwrap()).unwrap()
    };
    let p2 = m.updates.iter().find(|p| p.version == "0.2.0").unwrap();
    let patch = p2
        .uki_patches
        .iter()
        .find(|u| u.slot == "b")
        .expect("a patch of 0.2.0's UKI for slot b");
    assert_eq!(patch.from_version, "0.1.0");
    let new_uki = std::fs::read(v2.dir.join("uki-slot-b.efi")).unwrap();
    let installed = || {
        let dir = n.dir.path().join("esp/EFI/Linux");
        let f = n
            .esp_files()
            .into_iter()
            .find(|f| f.starts_with("keelson_0.2.0"))
            .unwrap();
        std::fs::read(dir.join(f)).unwrap()
    };

    // The harness's running UKI is not 0.1.0's as the repository has it: the whole UKI.
    n.apply(&rt, ApplyRequest::default()).unwrap();
    let ev = n.events();
    assert!(
        ev.contains("update-delta-fallback: 0.2.0's UKI for slot b comes whole")
            && ev.contains(&format!(
                "applies to 0.1.0's UKI (sha256 {})",
                patch.from_sha256
            )),
        "{ev}"
    );
    assert!(installed() == new_uki);
    let whole = n.agent.status().progress.unwrap().downloaded;

    // The running UKI is 0.1.0's for slot A: patched, exactly the signed UKI, and only the
    // patch downloaded for it.
    n.reset_slot_b(&rt);
    let running = n.dir.path().join("esp/EFI/Linux/keelson_0.1.0.efi");
    let original = std::fs::read(&running).unwrap();
    std::fs::copy(v1.dir.join("keelson_0.1.0+3.efi"), &running).unwrap();
    n.apply(&rt, ApplyRequest::default()).unwrap();
    let ev = n.events();
    assert!(
        ev.contains(
            "update-uki-patch: 0.2.0's UKI for slot b built from the running one (0.1.0's)"
        ),
        "{ev}"
    );
    assert!(
        installed() == new_uki,
        "the patched UKI is not the signed one"
    );
    let patch_len = std::fs::metadata(n.target_file(&patch.target))
        .unwrap()
        .len();
    assert!(
        patch_len * 10 < new_uki.len() as u64,
        "patch {patch_len} bytes for a {}-byte UKI",
        new_uki.len()
    );
    // The same root chunks and verity tree as before; the patch instead of the UKI.
    let progress = n.agent.status().progress.unwrap();
    assert_eq!(progress.downloaded, progress.download_total);
    assert_eq!(
        progress.downloaded,
        whole - new_uki.len() as u64 + patch_len,
        "downloaded {} (with the whole UKI: {whole})",
        progress.downloaded
    );

    // A signed patch that builds other bytes (made against another reference): refused by
    // the signed UKI's sha256, the whole UKI installed.
    let wrong = {
        use std::io::Write;
        let other = std::fs::read(v2.dir.join("keelson_0.2.0+3.efi")).unwrap();
        let mut enc =
            zstd::stream::write::Encoder::with_ref_prefix(Vec::new(), 3, &original[..]).unwrap();
        enc.write_all(&other).unwrap();
        enc.finish().unwrap()
    };
    n.resign_target(&rt, &patch.target, &wrong);
    n.reset_slot_b(&rt);
    n.apply(&rt, ApplyRequest::default()).unwrap();
    let ev = n.events();
    let line = ev
        .lines()
        .find(|l| l.contains("update-delta-fallback: 0.2.0's UKI for slot b: "))
        .unwrap_or_else(|| panic!("{ev}"));
    assert!(
        line.contains(&patch.target) && line.contains("downloading the whole UKI"),
        "{line}"
    );
    assert!(installed() == new_uki);
}

/// N → N+1 with the root as a patch against the running root (what `update add` publishes by
/// default): only the patch is downloaded for the root, slot B is N+1's root byte for byte and
/// the running root is only read. A signed patch that builds other bytes is refused and the
/// root comes as chunks; a patch over the configured share is not used.
#[test]
fn a_root_comes_as_a_patch_against_the_running_one_and_a_bad_patch_falls_back_to_chunks() {
    let t = tempfile::tempdir().unwrap();
    let (n, _, v2, v2_root) = delta_node(t.path(), &["--patch-level", "3"]);
    let rt = rt();
    let running_before = n.running_root();
    let slot_b = || n.slot_b_root(v2_root.len());
    let target = "test-0.2.0-root.from-0.1.0.zst";
    let good_patch = std::fs::read(n.target_file(target)).unwrap();
    let patch_len = good_patch.len() as u64;
    let full_root = v2_root.len() as u64;
    assert!(
        patch_len < 16 << 10,
        "an 8 KiB change patched in {patch_len} bytes"
    );

    // `keelctl update check` counts the patch for the root.
    let offered = n.offered(&rt, "0.2.0");
    let delta = offered.delta_size.expect("a delta size for 0.2.0");
    assert!(offered.delta_note.is_none(), "{:?}", offered.delta_note);

    n.apply(&rt, ApplyRequest::default()).unwrap();
    let ev = n.events();
    assert!(
        ev.contains(&format!(
            "update-delta: 0.2.0 by root patch: downloading {} KiB ({target})",
            patch_len >> 10
        )) && ev.contains("update-root-patch: 0.2.0's root built from the running one (0.1.0's)"),
        "{ev}"
    );
    assert!(!ev.contains("update-delta-fallback: 0.2.0's root"), "{ev}");
    assert!(!ev.contains("by delta"), "chunks were used: {ev}");
    assert!(
        slot_b() == v2_root,
        "slot B is not 0.2.0's root byte for byte"
    );
    assert_eq!(n.slot_b_hash(&v2), v2.roothash);
    let progress = n.agent.status().progress.unwrap();
    assert_eq!(progress.downloaded, progress.download_total);
    assert_eq!(
        progress.downloaded, delta,
        "what check said it would download"
    );
    assert!(
        progress.downloaded < full_root / 4,
        "downloaded {} for an {full_root}-byte root",
        progress.downloaded
    );
    assert!(n.running_root() == running_before);

    // A signed patch made against another root (0.2.0's own: applied to 0.1.0's it copies
    // the old bytes where 0.2.0 changed): zstd's checksum refuses what it builds, and the root
    // comes as chunks, exactly the signed one.
    let wrong = {
        use zstd::zstd_safe::{CCtx, CParameter};
        let other = v2_root.clone();
        let mut c = CCtx::create();
        c.set_parameter(CParameter::ChecksumFlag(true)).unwrap();
        c.set_parameter(CParameter::EnableLongDistanceMatching(true))
            .unwrap();
        c.ref_prefix(&other[..]).unwrap();
        let mut out = Vec::with_capacity(zstd::zstd_safe::compress_bound(v2_root.len()));
        c.compress2(&mut out, &v2_root[..]).unwrap();
        out
    };
    n.resign_target(&rt, target, &wrong);
    n.reset_slot_b(&rt);
    n.apply(&rt, ApplyRequest::default()).unwrap();
    let ev = n.events();
    let line = ev
        .lines()
        .find(|l| l.contains("update-delta-fallback: 0.2.0's root patch"))
        .unwrap_or_else(|| panic!("{ev}"));
    assert!(
        line.contains(target)
            && line.contains("another image")
            && line.contains("trying its chunks"),
        "{line}"
    );
    assert!(ev.contains("update-delta: 0.2.0 by delta"), "{ev}");
    assert!(slot_b() == v2_root);
    assert_eq!(n.slot_b_hash(&v2), v2.roothash);

    // Over the configured share (the good patch and a 100 KiB skippable zstd frame, 12% of
    // the root): not downloaded; the chunks are over it too, so the whole root.
    let mut padded = good_patch.clone();
    padded.extend_from_slice(&0x184D_2A50u32.to_le_bytes());
    padded.extend_from_slice(&(100u32 << 10).to_le_bytes());
    padded.resize(padded.len() + (100 << 10), 0);
    n.resign_target(&rt, target, &padded);
    n.reset_slot_b(&rt);
    n.set_spec(|s| s.delta_max_percent = 1);
    n.apply(&rt, ApplyRequest::default()).unwrap();
    let ev = n.events();
    let last = &ev[ev.rfind("update-started").unwrap()..];
    assert!(
        !last.contains("by root patch")
            && last.contains("update-delta-fallback: 0.2.0 comes whole"),
        "{last}"
    );
    assert!(slot_b() == v2_root);
    assert!(n.running_root() == running_before);
}

/// A real extension build directory (a DDI with its dm-verity tree, as `image-build extension`
/// writes) around the file system `fs`; returns it and the image's root hash.
fn ddi_extension(parent: &Path, name: &str, os_version: &str, fs: &[u8]) -> (PathBuf, String) {
    use sha2::Digest;
    let dir = parent.join(format!("ext-{name}-{os_version}"));
    std::fs::create_dir_all(&dir).unwrap();
    let raw = dir.join(format!("{name}.raw"));
    let roothash = keelson_extensions::ddi::testing::make_ddi(&raw, fs, &format!("{name}_1.0"));
    let bytes = std::fs::read(&raw).unwrap();
    let manifest = serde_json::json!({
        "name": name,
        "version": "1.0",
        "os_version": os_version,
        "roothash": roothash,
        "raw": {
            "path": format!("{name}.raw"),
            "size": bytes.len(),
            "sha256": hex::encode(sha2::Sha256::digest(&bytes)),
        },
    });
    std::fs::write(dir.join("manifest.json"), manifest.to_string()).unwrap();
    (dir, roothash)
}

/// The extension built for N+1 comes as a patch against the one built for N that the node's
/// store has: only the patch is downloaded and the stored image is N+1's byte for byte. A
/// signed patch that builds other bytes is refused and the whole image downloaded.
#[test]
fn an_extension_comes_as_a_patch_against_the_stored_one_and_a_bad_patch_downloads_it_whole() {
    let t = tempfile::tempdir().unwrap();
    let (v1, v2, _) = related_images(t.path());
    let n = node(&v1, "0.1.0", "a");
    // The same engine built for two OS versions: 1 MiB alike but for 8 KiB.
    let fs1 = random_bytes(31, 256 * 4096);
    let mut fs2 = fs1.clone();
    fs2[300_000..308_192].copy_from_slice(&random_bytes(32, 8192));
    let (x1, rh1) = ddi_extension(t.path(), "etcd", "0.1.0", &fs1);
    let (x2, rh2) = ddi_extension(t.path(), "etcd", "0.2.0", &fs2);
    let image2 = std::fs::read(x2.join("etcd.raw")).unwrap();
    n.add(&v1, &["--extension", x1.to_str().unwrap()]);
    n.add(
        &v2,
        &["--patch-level", "3", "--extension", x2.to_str().unwrap()],
    );
    let target = format!("ext-etcd-1.0-for-0.2.0.from-{}.zst", &rh1[..16]);
    let rt = rt();
    n.extensions.send_modify(|x| {
        *x = Ok(ExtensionsSpec {
            enabled: vec!["etcd".into()],
        })
    });
    // The node runs 0.1.0 with its extension: downloaded whole.
    rt.block_on(n.agent.sync_running_extensions()).unwrap();
    assert!(
        n.events()
            .contains("extension-downloaded: etcd 1.0 verified against root hash"),
        "{}",
        n.events()
    );
    let store = keelson_extensions::Store::new(n.dir.path().join("var/extensions"));
    let stored2 = || std::fs::read(store.dir().join("etcd").join(format!("{rh2}.raw"))).ok();

    // Installing 0.2.0 fetches its extension first: as the patch.
    n.apply(&rt, ApplyRequest::default()).unwrap();
    let ev = n.events();
    let line = ev
        .lines()
        .find(|l| l.starts_with("extension-patched: etcd 1.0 for version 0.2.0"))
        .unwrap_or_else(|| panic!("{ev}"));
    assert!(line.contains(&rh1) && line.contains(&target), "{line}");
    let patch_len: u64 = line
        .split("downloaded ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap();
    assert!(
        patch_len > 0 && patch_len < 16 << 10,
        "a {patch_len}-byte patch for an 8 KiB change"
    );
    assert!(
        stored2() == Some(image2.clone()),
        "the patched image is not 0.2.0's"
    );
    assert!(!ev.contains("extension-delta-fallback"), "{ev}");

    // A signed patch made against another image (0.2.0's own): refused, the whole image.
    // A copy: zstd ignores a prefix that overlaps the input.
    let reference = image2.clone();
    let wrong = {
        use zstd::zstd_safe::{CCtx, CParameter};
        let mut c = CCtx::create();
        c.set_parameter(CParameter::ChecksumFlag(true)).unwrap();
        c.set_parameter(CParameter::WindowLog(23)).unwrap();
        c.set_parameter(CParameter::EnableLongDistanceMatching(true))
            .unwrap();
        c.ref_prefix(&reference[..]).unwrap();
        let mut out = Vec::with_capacity(zstd::zstd_safe::compress_bound(image2.len()));
        c.compress2(&mut out, &image2[..]).unwrap();
        out
    };
    n.resign_target(&rt, &target, &wrong);
    std::fs::remove_file(store.dir().join("etcd").join(format!("{rh2}.raw"))).unwrap();
    n.reset_slot_b(&rt);
    n.apply(&rt, ApplyRequest::default()).unwrap();
    let ev = n.events();
    let line = ev
        .lines()
        .find(|l| l.starts_with("extension-delta-fallback: etcd 1.0 for version 0.2.0"))
        .unwrap_or_else(|| panic!("{ev}"));
    assert!(
        line.contains(&target) && line.contains("downloading the whole image"),
        "{line}"
    );
    assert!(
        stored2() == Some(image2),
        "the downloaded image is not 0.2.0's"
    );
    let mut want = [format!("{rh1}.raw"), format!("{rh2}.raw")];
    want.sort();
    assert_eq!(
        files_under(&store.dir().join("etcd")),
        want,
        "no partial file left"
    );
}
