//! Host integration tests of the image store: a real sysd (the built binary) pulling from the
//! reference registry (Debian's `docker-registry`) on the loopback of a network namespace each
//! test creates, with images built here and pushed with `skopeo`. They need root,
//! busybox-static, docker-registry, skopeo, apache2-utils and openssl (`./dev deps`) and fail
//! without them.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use keelson_testkit::busybox;
use keelson_testkit::daemon::Daemon;
use keelson_testkit::http::encode;
use keelson_testkit::registry::{
    self as registry, Layout, Proxy, Registry, RegistryOptions, E, TAR, TGZ,
};
use serde_json::Value;

const SYSD: &str = env!("CARGO_BIN_EXE_sysd");

struct Sysd {
    daemon: Daemon,
    dir: PathBuf,
}

impl Sysd {
    /// A sysd with no system services, its state under `dir`, in this thread's network
    /// namespace.
    fn start(dir: &Path) -> Sysd {
        // SAFETY: geteuid has no preconditions.
        assert_eq!(unsafe { libc::geteuid() }, 0, "these tests need root");
        let mut daemon = Daemon::new(SYSD, dir, Daemon::cgroup_parent_for("reg", dir))
            // As on a node: no CA bundle on the system (sysd carries its own roots).
            .env("SSL_CERT_FILE", "/nonexistent/ca.pem")
            .env("SSL_CERT_DIR", "/nonexistent");
        daemon.start(Duration::from_secs(30));
        Sysd {
            daemon,
            dir: dir.to_path_buf(),
        }
    }

    fn spawn(&mut self) {
        self.daemon.start(Duration::from_secs(30));
    }

    fn stop(&mut self) {
        self.daemon.terminate();
    }

    fn store(&self) -> PathBuf {
        self.dir.join("var/images")
    }

    fn log(&self) -> String {
        self.daemon.log()
    }

    fn request(&self, method: &str, path: &str, body: &str) -> (u16, String) {
        self.daemon.request(method, path, body)
    }

    fn apply(&self, config: &str) {
        let (status, body) = self.request("POST", "/v1/apply", config);
        assert_eq!(status, 200, "apply: {body}");
    }

    /// Pulls through the API; returns the progress items (the last is done or error).
    fn pull(&self, image: &str) -> Vec<Value> {
        let (status, body) = self.request(
            "POST",
            &format!("/v1/images/pull?reference={}", encode(image)),
            "",
        );
        assert_eq!(status, 200, "pull {image}: {body}");
        let items: Vec<Value> = body
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert!(
            !items.is_empty(),
            "pull {image}: empty stream\n{}",
            self.log()
        );
        items
    }

    fn pull_ok(&self, image: &str) -> Vec<Value> {
        let items = self.pull(image);
        let last = items.last().unwrap();
        assert_eq!(
            last["type"],
            "done",
            "pull {image}: {items:#?}\n{}",
            self.log()
        );
        items
    }

    fn pull_err(&self, image: &str) -> String {
        let items = self.pull(image);
        let last = items.last().unwrap();
        assert_eq!(
            last["type"], "error",
            "pull {image} should fail: {items:#?}"
        );
        last["message"].as_str().unwrap().to_string()
    }

    fn images(&self) -> Vec<Value> {
        let (status, body) = self.request("GET", "/v1/images", "");
        assert_eq!(status, 200, "{body}");
        serde_json::from_str(&body).unwrap()
    }

    fn state(&self, name: &str) -> String {
        let (_, body) = self.request("GET", &format!("/v1/services/{name}"), "");
        serde_json::from_str::<Value>(&body).map_or(String::new(), |v| {
            v["state"].as_str().unwrap_or("").to_string()
        })
    }

    fn wait_state(&self, name: &str, state: &str) {
        let deadline = Instant::now() + Duration::from_secs(90);
        while self.state(name) != state {
            assert!(
                Instant::now() < deadline,
                "{name} never became {state} (is {})\n{}",
                self.state(name),
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn logs(&self, name: &str) -> String {
        self.request("GET", &format!("/v1/services/{name}/logs"), "")
            .1
    }

    fn events(&self) -> Vec<Value> {
        self.daemon.events()
    }

    /// An unpacked image's root as sysd sees it: its only layer, or the view of its layers
    /// mounted in sysd's mount namespace (read through /proc/PID/root).
    fn image_root(&self, hex: &str) -> PathBuf {
        let list = std::fs::read(self.store().join(hex).join("layers.json"))
            .unwrap_or_else(|e| panic!("image {hex} is not unpacked: {e}"));
        let chains: Vec<String> = serde_json::from_slice(&list).unwrap();
        match chains.as_slice() {
            [only] => self
                .store()
                .join("layers")
                .join(only.strip_prefix("sha256:").unwrap()),
            _ => {
                let pid = self.daemon.pid().expect("sysd runs");
                let view = self.store().join(hex).join("merged");
                Path::new(&format!("/proc/{pid}/root")).join(view.strip_prefix("/").unwrap())
            }
        }
    }

    /// Layers in the store that no unpacked image lists.
    fn unlisted_layers(&self) -> Vec<String> {
        let mut listed = std::collections::HashSet::new();
        for e in std::fs::read_dir(self.store()).unwrap().flatten() {
            if let Ok(list) = std::fs::read(e.path().join("layers.json")) {
                let chains: Vec<String> = serde_json::from_slice(&list).unwrap();
                listed.extend(chains.into_iter().map(|c| c[7..].to_string()));
            }
        }
        std::fs::read_dir(self.store().join("layers"))
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| !listed.contains(n))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Files (not directories) under the store, relative.
    fn store_files(&self) -> Vec<String> {
        let mut out = Vec::new();
        fn walk(root: &Path, p: &Path, out: &mut Vec<String>) {
            if let Ok(rd) = std::fs::read_dir(p) {
                for e in rd.flatten() {
                    let path = e.path();
                    if e.file_type().is_ok_and(|t| t.is_dir()) {
                        walk(root, &path, out);
                    } else {
                        out.push(path.strip_prefix(root).unwrap().display().to_string());
                    }
                }
            }
        }
        walk(&self.store(), &self.store(), &mut out);
        out.sort();
        out
    }
}

fn setup() -> tempfile::TempDir {
    registry::private_netns().expect("network namespace (run as root)");
    tempfile::tempdir().unwrap()
}

fn insecure(addr: &str) -> String {
    format!("version = 1\n[registries.\"{addr}\"]\ninsecure = true\n")
}

/// The busybox root file system as a gzip layer.
fn busybox_layer(dir: &Path) -> Vec<u8> {
    let rootfs = dir.join("bb-rootfs");
    busybox::rootfs(&rootfs).expect("busybox rootfs");
    registry::gzip(&registry::tar_dir(&rootfs))
}

#[test]
fn pull_by_tag_digest_and_index_then_run_on_demand_and_gc() {
    let t = setup();
    let reg = Registry::start(&t.path().join("reg"), 5000, RegistryOptions::default());
    let mut layout = Layout::new(&t.path().join("layout"));
    let base = busybox_layer(t.path());
    // The upper layer: a whiteout, an opaque directory, a hard link, a new file.
    let lower = registry::tar(&[
        E::Dir("srv/"),
        E::File("srv/gone", b"gone", 0o644),
        E::Dir("srv/opaque/"),
        E::File("srv/opaque/old", b"old", 0o644),
    ]);
    let upper = registry::tar(&[
        E::File("srv/.wh.gone", b"", 0o644),
        E::File("srv/opaque/.wh..wh..opq", b"", 0o644),
        E::File("srv/opaque/new", b"new", 0o644),
        E::File("srv/index.html", b"hello from the registry", 0o644),
        E::Hardlink("srv/link.html", "srv/index.html"),
    ]);
    let cmd = [
        "sh",
        "-c",
        "cat /srv/index.html; echo; ls /srv/opaque; exec sleep 1000",
    ];
    let amd64 = layout.image(
        "amd64",
        &[
            (TGZ, base.clone()),
            (TAR, lower),
            (TGZ, registry::gzip(&upper)),
        ],
        &cmd,
    );
    layout.tag(&amd64, "v1");
    let arm64 = layout.image(
        "arm64",
        &[(TAR, registry::tar(&[E::File("arch", b"arm64", 0o644)]))],
        &["true"],
    );
    let index = layout.index(&[(arm64, "arm64"), (amd64.clone(), "amd64")]);
    layout.tag(&index, "multi");
    let v2 = layout.image(
        "amd64",
        &[
            (TGZ, base),
            (
                TAR,
                registry::tar(&[E::File("srv/index.html", b"v2 here", 0o644)]),
            ),
        ],
        &["sh", "-c", "cat /srv/index.html; echo; exec sleep 1000"],
    );
    layout.tag(&v2, "v2");
    for tag in ["v1", "multi", "v2"] {
        layout.push(tag, &format!("{}/app:{tag}", reg.addr), None);
    }

    let mut sysd = Sysd::start(&t.path().join("sysd"));
    // Without settings the registry is HTTPS: a plain-HTTP registry fails clearly.
    let err = sysd.pull_err(&format!("{}/app:v1", reg.addr));
    assert!(err.contains("127.0.0.1:5000"), "{err}");
    sysd.apply(&insecure(&reg.addr));

    // By tag: layers applied in order, with whiteouts, opaque dirs and hard links.
    let items = sysd.pull_ok(&format!("{}/app:v1", reg.addr));
    assert!(
        items
            .iter()
            .any(|i| i["type"] == "resolved" && i["layers"] == 3),
        "{items:#?}"
    );
    let manifest = amd64["digest"].as_str().unwrap();
    let hex = manifest.strip_prefix("sha256:").unwrap();
    let root = sysd.image_root(hex);
    // Three layers, each stored once, stacked.
    assert_eq!(
        std::fs::read_dir(sysd.store().join("layers"))
            .unwrap()
            .count(),
        3
    );
    assert_eq!(
        std::fs::read_to_string(root.join("srv/index.html")).unwrap(),
        "hello from the registry"
    );
    assert!(!root.join("srv/gone").exists());
    assert!(!root.join("srv/opaque/old").exists() && root.join("srv/opaque/new").exists());
    use std::os::unix::fs::MetadataExt;
    assert_eq!(
        std::fs::metadata(root.join("srv/link.html")).unwrap().ino(),
        std::fs::metadata(root.join("srv/index.html"))
            .unwrap()
            .ino()
    );

    // By digest: the same manifest, nothing downloaded again.
    let pinned = format!("{}/app@{manifest}", reg.addr);
    let items = sysd.pull_ok(&pinned);
    assert_eq!(items.last().unwrap()["downloaded_bytes"], 0, "{items:#?}");
    // A pin the registry cannot satisfy is refused.
    let wrong = format!("{}/app@sha256:{}", reg.addr, "0".repeat(64));
    let err = sysd.pull_err(&wrong);
    assert!(
        err.contains("MANIFEST_UNKNOWN") || err.contains("unknown") || err.contains("404"),
        "{err}"
    );

    // A multi-arch index resolves to linux/amd64: the same manifest as v1.
    let items = sysd.pull_ok(&format!("{}/app:multi", reg.addr));
    assert_eq!(items.last().unwrap()["manifest"], manifest, "{items:#?}");
    assert!(!root.join("arch").exists());

    let images = sysd.images();
    assert_eq!(images.len(), 3, "{images:#?}");
    assert!(images
        .iter()
        .all(|i| i["unpacked"] == true && i["manifest"] == manifest));

    // A service whose image was never pulled: pulled on demand, then it runs.
    sysd.apply(&format!(
        "{}\n[services.web]\nimage = \"{}/app:v2\"\n",
        insecure(&reg.addr),
        reg.addr
    ));
    sysd.wait_state("web", "running");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !sysd.logs("web").contains("v2 here") {
        assert!(Instant::now() < deadline, "logs: {}", sysd.logs("web"));
        std::thread::sleep(Duration::from_millis(100));
    }
    let events = sysd.events();
    assert!(
        events
            .iter()
            .any(|e| e["service"] == "web" && e["kind"] == "image-pulled"),
        "{events:#?}"
    );

    // In use: refused. Unused: removed; shared blobs stay while another image needs them.
    let (status, body) = sysd.request(
        "POST",
        &format!(
            "/v1/images/remove?reference={}",
            encode(&format!("{}/app:v2", reg.addr))
        ),
        "",
    );
    assert_eq!(status, 409, "{body}");
    assert!(body.contains("web"), "{body}");
    let (status, body) = sysd.request(
        "POST",
        &format!(
            "/v1/images/remove?reference={}",
            encode(&format!("{}/app:v1", reg.addr))
        ),
        "",
    );
    assert_eq!(status, 200, "{body}");
    let removed: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        removed["blobs"], 0,
        "v1's manifest is still reached by the pin and the index: {body}"
    );
    let (status, body) = sysd.request("POST", "/v1/images/prune", "");
    assert_eq!(status, 200, "{body}");
    let pruned: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(pruned["removed"].as_array().unwrap().len(), 2, "{body}");
    assert!(pruned["rootfs"].as_u64().unwrap() >= 1, "{body}");
    assert!(
        !sysd.store().join(hex).exists(),
        "v1's unpacked image is collected"
    );
    assert!(pruned["layers"].as_u64().unwrap() >= 1, "{body}");
    assert_eq!(sysd.unlisted_layers(), Vec::<String>::new(), "{body}");
    let images = sysd.images();
    assert_eq!(images.len(), 1, "{images:#?}");
    assert_eq!(images[0]["used_by"][0], "web");
    // v2's busybox layer survived (shared with v1, still used by v2).
    let blobs = sysd.store_files();
    assert!(
        blobs.iter().all(|b| !b.starts_with(".downloads/")),
        "{blobs:#?}"
    );

    // After a restart, with the registry gone, the service starts from the store.
    drop(reg);
    sysd.stop();
    let before = sysd.log().len();
    sysd.spawn();
    sysd.wait_state("web", "running");
    let after = &sysd.log()[before..];
    assert!(!after.contains("image-pull"), "{after}");
}

#[test]
fn basic_auth_credentials_from_config_never_logged() {
    let t = setup();
    let reg = Registry::start(
        &t.path().join("reg"),
        5000,
        RegistryOptions {
            basic: Some(("alice", "s3cret-pass")),
            ..RegistryOptions::default()
        },
    );
    let mut layout = Layout::new(&t.path().join("layout"));
    let m = layout.image(
        "amd64",
        &[(TAR, registry::tar(&[E::File("f", b"x", 0o644)]))],
        &["true"],
    );
    layout.tag(&m, "v1");
    layout.push(
        "v1",
        &format!("{}/private:v1", reg.addr),
        Some(("alice", "s3cret-pass")),
    );

    let sysd = Sysd::start(&t.path().join("sysd"));
    sysd.apply(&insecure(&reg.addr));
    let err = sysd.pull_err(&format!("{}/private:v1", reg.addr));
    assert!(
        err.to_lowercase().contains("authoriz") || err.contains("401"),
        "{err}"
    );

    sysd.apply(&format!(
        "{}username = \"alice\"\npassword = \"wrong\"\n",
        insecure(&reg.addr)
    ));
    let err = sysd.pull_err(&format!("{}/private:v1", reg.addr));
    assert!(
        err.to_lowercase().contains("authoriz") || err.contains("401"),
        "{err}"
    );

    // From an auth file (Docker's format).
    let auth = t.path().join("auth.json");
    std::fs::write(
        &auth,
        format!(
            r#"{{"auths": {{"{}": {{"auth": "{}"}}}}}}"#,
            reg.addr,
            "YWxpY2U6czNjcmV0LXBhc3M=" // alice:s3cret-pass
        ),
    )
    .unwrap();
    sysd.apply(&format!(
        "{}auth_file = \"{}\"\n",
        insecure(&reg.addr),
        auth.display()
    ));
    sysd.pull_ok(&format!("{}/private:v1", reg.addr));
    sysd.apply(&format!(
        "{}username = \"alice\"\npassword = \"s3cret-pass\"\n",
        insecure(&reg.addr)
    ));
    sysd.pull_ok(&format!("{}/private:v1", reg.addr));
    assert!(!sysd.log().contains("s3cret-pass"), "{}", sysd.log());
    let events = serde_json::to_string(&sysd.events()).unwrap();
    assert!(!events.contains("s3cret-pass"));
}

#[test]
fn registry_going_away_mid_pull_is_resumed() {
    let t = setup();
    let reg = Registry::start(&t.path().join("reg"), 5000, RegistryOptions::default());
    let mut layout = Layout::new(&t.path().join("layout"));
    let big = registry::noise(6 << 20, 1);
    let m = layout.image(
        "amd64",
        &[(TAR, registry::tar(&[E::File("big", &big, 0o644)]))],
        &["true"],
    );
    layout.tag(&m, "v1");
    layout.push("v1", &format!("{}/big:v1", reg.addr), None);
    // Clients see the registry through a proxy that dies after 3 MiB, for 1.5 s.
    let proxy = Proxy::start(5001, &reg.addr, 3 << 20, Duration::from_millis(1500));

    let sysd = Sysd::start(&t.path().join("sysd"));
    sysd.apply(&insecure(&proxy.addr));
    let items = sysd.pull_ok(&format!("{}/big:v1", proxy.addr));
    assert_eq!(proxy.cuts.load(std::sync::atomic::Ordering::SeqCst), 1);
    assert!(items.iter().any(|i| i["type"] == "retrying"), "{items:#?}");
    let resumed = items
        .iter()
        .filter(|i| i["type"] == "downloading")
        .filter_map(|i| i["resumed_at"].as_u64())
        .max()
        .unwrap_or(0);
    assert!(
        resumed > 1 << 20,
        "the retry resumed where it stopped: {items:#?}"
    );
    let done = items.last().unwrap()["downloaded_bytes"].as_u64().unwrap();
    assert!(
        done < big.len() as u64 + (1 << 20),
        "not downloaded twice: {done}"
    );
    assert_eq!(
        items.last().unwrap()["manifest"],
        m["digest"],
        "skopeo pushed the manifest unchanged"
    );
    let hex = m["digest"]
        .as_str()
        .unwrap()
        .strip_prefix("sha256:")
        .unwrap();
    assert_eq!(
        std::fs::read(sysd.image_root(hex).join("big")).unwrap(),
        big
    );
}

/// The digest is computed as the blob arrives, across a resumed transfer: a wrong byte after
/// the point where the connection was cut still fails the pull, naming the blob, and nothing of
/// the image is left unpacked.
#[test]
fn wrong_byte_after_a_resume_is_refused() {
    let t = setup();
    let reg = Registry::start(&t.path().join("reg"), 5000, RegistryOptions::default());
    let mut layout = Layout::new(&t.path().join("layout"));
    let layer = registry::tar(&[E::File("big", &registry::noise(6 << 20, 3), 0o644)]);
    let m = layout.image("amd64", &[(TAR, layer.clone())], &["true"]);
    layout.tag(&m, "v1");
    layout.push("v1", &format!("{}/big:v1", reg.addr), None);
    let digest = format!(
        "sha256:{}",
        hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&layer))
    );
    // Same size, one other byte, past the 3 MiB the proxy lets through before its cut.
    let file = reg.blob_file(&digest);
    let mut bytes = std::fs::read(&file).unwrap();
    bytes[5 << 20] ^= 0xff;
    std::fs::write(&file, bytes).unwrap();
    let proxy = Proxy::start(5001, &reg.addr, 3 << 20, Duration::from_millis(500));

    let sysd = Sysd::start(&t.path().join("sysd"));
    sysd.apply(&insecure(&proxy.addr));
    let err = sysd.pull_err(&format!("{}/big:v1", proxy.addr));
    assert_eq!(proxy.cuts.load(std::sync::atomic::Ordering::SeqCst), 1);
    assert!(
        err.contains("does not match") && err.contains(&digest),
        "{err}"
    );
    assert!(sysd.images().is_empty());
    let files = sysd.store_files();
    assert!(
        files
            .iter()
            .all(|f| f.starts_with("blobs/") || *f == "index.json" || *f == "oci-layout"),
        "{files:#?}"
    );
    assert!(
        !files
            .iter()
            .any(|f| f.ends_with(&digest["sha256:".len()..])),
        "the wrong blob is not kept: {files:#?}"
    );
}

#[test]
fn bad_blobs_and_bad_registries_are_refused_and_nothing_runs() {
    let t = setup();
    let reg = Registry::start(&t.path().join("reg"), 5000, RegistryOptions::default());
    let mut layout = Layout::new(&t.path().join("layout"));
    // A blob whose content does not match its digest.
    let layer = registry::tar(&[E::File("data", &registry::noise(100_000, 2), 0o644)]);
    let m = layout.image("amd64", &[(TAR, layer.clone())], &["true"]);
    layout.tag(&m, "corrupt");
    // Layers that try to escape the root.
    let dotdot = layout.image(
        "amd64",
        &[(TAR, registry::tar(&[E::File("../../escaped", b"x", 0o644)]))],
        &["true"],
    );
    layout.tag(&dotdot, "dotdot");
    let hardlink = layout.image(
        "amd64",
        &[(
            TAR,
            registry::tar(&[E::Hardlink("passwd", "../../../../etc/passwd")]),
        )],
        &["true"],
    );
    layout.tag(&hardlink, "hardlink");
    let through = layout.image(
        "amd64",
        &[(
            TAR,
            registry::tar(&[
                E::Symlink("etc", "/tmp"),
                E::File("etc/escaped-through-symlink", b"x", 0o644),
            ]),
        )],
        &["true"],
    );
    layout.tag(&through, "symlink");
    // A manifest of 40 layers: over a 1K manifest limit.
    let many: Vec<(&str, Vec<u8>)> = (0..40)
        .map(|i| {
            (
                TAR,
                registry::tar(&[E::File(&format!("f{i}"), b"x", 0o644)]),
            )
        })
        .collect();
    let big = layout.image("amd64", &many, &["true"]);
    layout.tag(&big, "many");
    for tag in ["corrupt", "dotdot", "hardlink", "symlink", "many"] {
        layout.push(tag, &format!("{}/bad:{tag}", reg.addr), None);
    }
    // Corrupt the stored layer in place (same size, other bytes).
    let layer_digest = format!(
        "sha256:{}",
        hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&layer))
    );
    let file = reg.blob_file(&layer_digest);
    let mut bytes = std::fs::read(&file).unwrap();
    let at = bytes.len() - 2000;
    bytes[at] ^= 0xff;
    std::fs::write(&file, bytes).unwrap();

    let sysd = Sysd::start(&t.path().join("sysd"));
    sysd.apply(&insecure(&reg.addr));
    let err = sysd.pull_err(&format!("{}/bad:corrupt", reg.addr));
    assert!(
        err.contains("does not match") && err.contains(&layer_digest),
        "{err}"
    );

    let err = sysd.pull_err(&format!("{}/bad:dotdot", reg.addr));
    assert!(err.contains("`..`"), "{err}");
    assert!(!t.path().join("escaped").exists() && !sysd.store().join("escaped").exists());
    let err = sysd.pull_err(&format!("{}/bad:hardlink", reg.addr));
    assert!(err.contains("hard link target"), "{err}");
    let err = sysd.pull_err(&format!("{}/bad:symlink", reg.addr));
    assert!(err.contains("symlink"), "{err}");
    assert!(!Path::new("/tmp/escaped-through-symlink").exists());

    // Limits: a blob over max_blob_size is refused before it is fetched.
    sysd.apply(&format!("{}max_blob_size = \"4K\"\n", insecure(&reg.addr)));
    let err = sysd.pull_err(&format!("{}/bad:corrupt", reg.addr));
    assert!(
        err.contains("over the limit") && err.contains("max_blob_size"),
        "{err}"
    );

    sysd.apply(&format!(
        "{}max_manifest_size = \"1K\"\n",
        insecure(&reg.addr)
    ));
    let err = sysd.pull_err(&format!("{}/bad:many", reg.addr));
    assert!(
        err.contains("over the limit") && err.contains("max_manifest_size"),
        "{err}"
    );

    // Nothing of any of them is listed or runnable; no unpacked root was left.
    assert!(sysd.images().is_empty());
    let files = sysd.store_files();
    assert!(
        files.iter().all(|f| f.starts_with("blobs/")
            || f.starts_with(".downloads/")
            || *f == "index.json"
            || *f == "oci-layout"),
        "{files:#?}"
    );
    sysd.apply(&format!(
        "{}[services.bad]\nimage = \"{}/bad:dotdot\"\n",
        insecure(&reg.addr),
        reg.addr
    ));
    let deadline = Instant::now() + Duration::from_secs(20);
    while !sysd
        .events()
        .iter()
        .any(|e| e["service"] == "bad" && e["kind"] == "start-failed")
    {
        assert!(Instant::now() < deadline, "{}", sysd.log());
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_ne!(sysd.state("bad"), "running");

    // A redirect loop and a TLS error are refused with their reason.
    let looping = registry::redirect_loop(5002);
    sysd.apply(&insecure(&looping));
    let err = sysd.pull_err(&format!("{looping}/x:v1"));
    assert!(err.to_lowercase().contains("redirect"), "{err}");
    let (ca, cert, key) = registry::private_ca(t.path());
    let tls = Registry::start(
        &t.path().join("tls"),
        5443,
        RegistryOptions {
            tls: Some((&cert, &key)),
            ..RegistryOptions::default()
        },
    );
    let err = sysd.pull_err(&format!("{}/x:v1", tls.addr));
    assert!(err.to_lowercase().contains("certificate"), "{err}");
    // Trusting its CA makes it work (the image does not exist: a 404, past TLS).
    sysd.apply(&format!(
        "version = 1\n[registries.\"{}\"]\nca_file = \"{}\"\n",
        tls.addr,
        ca.display()
    ));
    let err = sysd.pull_err(&format!("{}/x:v1", tls.addr));
    assert!(!err.to_lowercase().contains("certificate"), "{err}");
}

#[test]
fn mirror_serves_the_pull() {
    let t = setup();
    let mirror = Registry::start(&t.path().join("mirror"), 5000, RegistryOptions::default());
    let mut layout = Layout::new(&t.path().join("layout"));
    let m = layout.image(
        "amd64",
        &[(
            TAR,
            registry::tar(&[E::File("m", b"from the mirror", 0o644)]),
        )],
        &["true"],
    );
    layout.tag(&m, "v1");
    // The mirror stores it under the same repository name; the upstream does not exist.
    layout.push("v1", &format!("{}/team/app:v1", mirror.addr), None);
    let sysd = Sysd::start(&t.path().join("sysd"));
    sysd.apply(&format!(
        "version = 1\n[registries.\"upstream.invalid:5000\"]\nmirrors = [\"{0}\"]\n[registries.\"{0}\"]\ninsecure = true\n",
        mirror.addr
    ));
    let items = sysd.pull_ok("upstream.invalid:5000/team/app:v1");
    assert_eq!(
        items.last().unwrap()["reference"],
        "upstream.invalid:5000/team/app:v1"
    );
}

#[test]
fn bearer_token_auth() {
    let t = setup();
    let tokens = registry::TokenServer::start(
        &t.path().join("token"),
        5001,
        "bob",
        "t0ken-pass",
        "private/app",
    );
    let reg = Registry::start(
        &t.path().join("reg"),
        5000,
        RegistryOptions {
            token: Some(&tokens),
            ..RegistryOptions::default()
        },
    );
    let mut layout = Layout::new(&t.path().join("layout"));
    let m = layout.image(
        "amd64",
        &[(TAR, registry::tar(&[E::File("f", b"x", 0o644)]))],
        &["true"],
    );
    layout.tag(&m, "v1");
    layout.push(
        "v1",
        &format!("{}/private/app:v1", reg.addr),
        Some(("bob", "t0ken-pass")),
    );

    let sysd = Sysd::start(&t.path().join("sysd"));
    sysd.apply(&insecure(&reg.addr));
    let err = sysd.pull_err(&format!("{}/private/app:v1", reg.addr));
    assert!(
        err.to_lowercase().contains("authoriz") || err.contains("401"),
        "{err}"
    );
    let before = tokens.issued.load(std::sync::atomic::Ordering::SeqCst);
    sysd.apply(&format!(
        "{}username = \"bob\"\npassword = \"t0ken-pass\"\n",
        insecure(&reg.addr)
    ));
    let items = sysd.pull_ok(&format!("{}/private/app:v1", reg.addr));
    assert_eq!(items.last().unwrap()["manifest"], m["digest"]);
    assert!(
        tokens.issued.load(std::sync::atomic::Ordering::SeqCst) > before,
        "the credentials were exchanged for a bearer token"
    );
    assert!(!sysd.log().contains("t0ken-pass"));
}

/// sysd's peak resident memory (VmHWM), in KiB.
fn peak_kib(sysd: &Sysd) -> u64 {
    let pid = sysd.daemon.pid().expect("sysd runs");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[test]
fn hostile_registries_are_refused_with_bounded_memory_and_no_credentials_leak() {
    let t = setup();
    let h = registry::Hostile::start(5000);
    let sysd = Sysd::start(&t.path().join("sysd"));
    // Credentials are configured, so a realm elsewhere would get them if anything did.
    sysd.apply(&format!(
        "{}username = \"bob\"\npassword = \"s3cret-pass\"\n",
        insecure(&h.addr)
    ));
    let before = peak_kib(&sysd);

    let err = sysd.pull_err(&format!("{}/endless/manifest:v1", h.addr));
    assert!(
        err.contains("over the limit") && err.contains("max_manifest_size"),
        "{err}"
    );
    let err = sysd.pull_err(&format!("{}/endless/error:v1", h.addr));
    assert!(err.contains("404"), "{err}");
    let err = sysd.pull_err(&format!("{}/endless/token:v1", h.addr));
    assert!(
        err.contains("over the limit") && err.contains("token"),
        "{err}"
    );
    let err = sysd.pull_err(&format!("{}/elsewhere/app:v1", h.addr));
    assert!(
        err.contains("another site") && err.contains("127.0.0.2"),
        "{err}"
    );
    assert_eq!(
        h.elsewhere.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "nothing may reach the other host"
    );
    let err = sysd.pull_err(&format!("{}/oversize/app:v1", h.addr));
    assert!(err.contains("more than the descriptor"), "{err}");

    // The client stopped reading each endless body near its limit (the server would have
    // sent 1 GiB per request), and sysd's memory never held one.
    let sent = h.sent.load(std::sync::atomic::Ordering::SeqCst);
    assert!(sent < 64 << 20, "the hostile registry sent {sent} bytes");
    let grew = peak_kib(&sysd).saturating_sub(before);
    assert!(grew < 48 << 10, "sysd's peak memory grew by {grew} KiB");
    assert!(!sysd.log().contains("s3cret-pass"));
    // Nothing was kept: no image, no partial download beyond a descriptor's size.
    assert!(sysd.images().is_empty());
    for f in sysd.store_files() {
        if let Some(rest) = f.strip_prefix(".downloads/") {
            let len = std::fs::metadata(sysd.store().join(".downloads").join(rest))
                .map(|m| m.len())
                .unwrap_or(0);
            assert!(len <= 1024, ".downloads/{rest} is {len} bytes");
        }
    }
}
