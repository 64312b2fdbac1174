//! System extensions (`image-build extension`): two builds of configs/extensions/etcd.toml in
//! different directories, with different umask and TZ, are bit-identical; the image is what
//! systemd-sysext takes (Debian's `systemd-dissect` calls it an "extension for system" and
//! matches its partitions to the root hash); and the hash tree verifies with cryptsetup's own
//! implementation.

use std::io::{Read, Seek, SeekFrom};
use std::path::Path;
use std::process::Command;

mod common;

fn build(out: &Path, cwd: &Path, umask: libc::mode_t, tz: &str) {
    common::build(
        "extension",
        "configs/extensions/etcd.toml",
        out,
        cwd,
        umask,
        tz,
    );
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

/// Copies `len` bytes at `offset` of `from` into a new file `to`.
fn extract(from: &Path, offset: u64, len: u64, to: &Path) {
    let mut f = std::fs::File::open(from).unwrap();
    f.seek(SeekFrom::Start(offset)).unwrap();
    let mut buf = vec![0u8; usize::try_from(len).unwrap()];
    f.read_exact(&mut buf).unwrap();
    std::fs::write(to, buf).unwrap();
}

fn dissect(raw: &Path, args: &[&str]) -> std::process::Output {
    Command::new("systemd-dissect")
        .args(args)
        .arg(raw)
        .output()
        .expect("systemd-dissect (apt-get install systemd-container)")
}

#[test]
fn etcd_extension_is_reproducible_and_a_system_extension() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    let one = a.path().join("one/etcd");
    let two = b.path().join("two/elsewhere/etcd");
    let start = std::time::Instant::now();
    build(&one, a.path(), 0o022, "UTC");
    eprintln!("first build: {:.1} s", start.elapsed().as_secs_f64());
    std::thread::sleep(std::time::Duration::from_secs(2));
    build(&two, b.path(), 0o077, "Pacific/Kiritimati");
    for f in ["etcd.raw", "roothash", "manifest.json"] {
        let x = std::fs::read(one.join(f)).unwrap();
        let y = std::fs::read(two.join(f)).unwrap();
        assert!(x == y, "{f} differs between the two builds");
    }

    let m = json(&one.join("manifest.json"));
    let roothash = std::fs::read_to_string(one.join("roothash")).unwrap();
    let roothash = roothash.trim_end();
    assert_eq!(m["roothash"], roothash);
    assert_eq!(roothash.len(), 64);
    let raw = one.join("etcd.raw");
    assert_eq!(m["raw"]["size"], std::fs::metadata(&raw).unwrap().len());
    // Nothing outside /usr; the pieces the node reads are where it reads them.
    let files: Vec<&str> = m["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["path"].as_str().unwrap())
        .collect();
    assert!(
        files.iter().all(|p| *p == "/usr" || p.starts_with("/usr/")),
        "{files:?}"
    );
    for p in [
        "/usr/lib/extension-release.d/extension-release.etcd",
        "/usr/lib/keelson/services.d/etcd.toml",
        "/usr/lib/keelson/images/etcd/usr/bin/etcd",
        "/usr/lib/keelson/images/etcd/var/lib/etcd",
    ] {
        assert!(files.contains(&p), "{p} missing from the extension");
    }

    // systemd-dissect (systemd 252) reads extension-release and calls it a system extension.
    let out = dissect(&raw, &["--json=short"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["useSystemExtension"], true, "{v}");
    assert_eq!(v["useBootableUefi"], false, "{v}");
    let release: Vec<&str> = v["extensionRelease"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l.as_str().unwrap())
        .collect();
    let os_version = m["os_version"].as_str().unwrap();
    for line in [
        "ID=keelson".to_owned(),
        format!("VERSION_ID={os_version}"),
        "SYSEXT_ID=etcd".to_owned(),
        format!("SYSEXT_VERSION_ID={}", m["version"].as_str().unwrap()),
    ] {
        assert!(
            release.contains(&line.as_str()),
            "{line} not in {release:?}"
        );
    }
    let mounts = v["mounts"].as_array().unwrap();
    let part = |d: &str| {
        mounts
            .iter()
            .find(|p| p["designator"] == d)
            .unwrap_or_else(|| panic!("no {d} partition in {v}"))
    };
    let label = format!("etcd_{}", m["version"].as_str().unwrap());
    assert_eq!(part("root")["fstype"], "erofs");
    assert_eq!(part("root")["partition_label"], label.as_str());
    assert_eq!(
        part("root-verity")["partition_label"],
        format!("{label}_verity").as_str()
    );
    // Partition UUIDs are the halves of the root hash, so dissect picks them for that hash...
    let uuid = |d: &str| part(d)["partition_uuid"].as_str().unwrap().replace('-', "");
    assert_eq!(uuid("root"), roothash[..32]);
    assert_eq!(uuid("root-verity"), roothash[32..]);
    let out = dissect(&raw, &["--json=short", &format!("--root-hash={roothash}")]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let root = v["mounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["designator"] == "root")
        .unwrap();
    assert_eq!(root["verity"], "yes", "{v}");
    // ...and finds nothing for another one.
    let wrong = format!(
        "{}{}",
        if roothash.starts_with('0') { "1" } else { "0" },
        &roothash[1..]
    );
    let out = dissect(&raw, &["--json=short", &format!("--root-hash={wrong}")]);
    assert!(!out.status.success());

    // The hash tree verifies the file system with cryptsetup's implementation.
    let parts = m["partitions"].as_array().unwrap();
    let range = |n: u64| {
        let p = parts.iter().find(|p| p["number"] == n).unwrap();
        let first = p["first_lba"].as_u64().unwrap();
        let last = p["last_lba"].as_u64().unwrap();
        (first * 512, (last + 1 - first) * 512)
    };
    let (data_at, data_len) = range(1);
    let (hash_at, hash_len) = range(2);
    let data = a.path().join("data.img");
    let hash = a.path().join("hash.img");
    extract(&raw, data_at, data_len, &data);
    extract(&raw, hash_at, hash_len, &hash);
    let verify = |h: &str| {
        Command::new("veritysetup")
            .arg("verify")
            .arg(&data)
            .arg(&hash)
            .arg(h)
            .output()
            .expect("veritysetup (apt-get install cryptsetup-bin)")
    };
    let out = verify(roothash);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!verify(&wrong).status.success());
}

/// A copy of the etcd extension (and the OS config it names) in `dir` with `[kernel]` added.
fn etcd_with_kernel(dir: &Path, kernel: &str) -> std::path::PathBuf {
    let ws = common::workspace();
    let ext = dir.join("extensions");
    std::fs::create_dir_all(ext.join("services")).unwrap();
    std::fs::create_dir_all(dir.join("services")).unwrap();
    for f in ["test.toml", "test.lock"] {
        std::fs::copy(ws.join("configs").join(f), dir.join(f)).unwrap();
    }
    for f in std::fs::read_dir(ws.join("configs/services")).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, dir.join("services").join(f.file_name().unwrap())).unwrap();
    }
    std::fs::copy(
        ws.join("configs/extensions/etcd.lock"),
        ext.join("etcd.lock"),
    )
    .unwrap();
    std::fs::copy(
        ws.join("configs/extensions/services/etcd.toml"),
        ext.join("services/etcd.toml"),
    )
    .unwrap();
    let def = std::fs::read_to_string(ws.join("configs/extensions/etcd.toml")).unwrap();
    std::fs::write(ext.join("etcd.toml"), format!("{def}\n{kernel}")).unwrap();
    ext.join("etcd.toml")
}

#[test]
fn an_extension_ships_its_modules_with_their_closure_and_its_sysctls() {
    let d = tempfile::tempdir().unwrap();
    let def = etcd_with_kernel(
        d.path(),
        "[kernel]\nmodules = [\"br_netfilter\", \"vxlan\"]\n[kernel.sysctls]\n\"net.bridge.bridge-nf-call-iptables\" = \"1\"\n",
    );
    let out = d.path().join("out");
    common::build(
        "extension",
        def.to_str().unwrap(),
        &out,
        d.path(),
        0o022,
        "UTC",
    );
    let m = json(&out.join("manifest.json"));
    let k = &m["kernel"];
    let release = k["release"].as_str().unwrap();
    assert!(
        release.starts_with("6.") && release.ends_with("-cloud-amd64"),
        "{k}"
    );
    assert_eq!(k["modules"], serde_json::json!(["br_netfilter", "vxlan"]));
    assert_eq!(k["sysctls"]["net.bridge.bridge-nf-call-iptables"], "1");
    let files: Vec<&str> = m["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["path"].as_str().unwrap())
        .collect();
    let base = format!("/usr/lib/keelson/kernel/etcd/modules/{release}");
    // The requested modules and their dependencies (bridge, stp, llc; udp_tunnel for vxlan).
    for f in [
        "modules.dep",
        "modules.load",
        "kernel/net/bridge/br_netfilter.ko",
        "kernel/net/bridge/bridge.ko",
        "kernel/net/802/stp.ko",
        "kernel/net/llc/llc.ko",
        "kernel/drivers/net/vxlan/vxlan.ko",
        "kernel/net/ipv4/udp_tunnel.ko",
    ] {
        let p = format!("{base}/{f}");
        assert!(files.contains(&p.as_str()), "{p} missing: {files:?}");
    }
    assert!(files.contains(&"/usr/lib/keelson/kernel/etcd/sysctl.conf"));
    assert_eq!(
        k["files"].as_u64().unwrap() as usize,
        files.iter().filter(|f| f.ends_with(".ko")).count()
    );
    // The kernel package the modules come from is an input of the build.
    assert!(
        m["inputs"]
            .as_array()
            .unwrap()
            .iter()
            .any(|i| i["name"].as_str().unwrap().starts_with("linux-image-")),
        "{}",
        m["inputs"]
    );
}
