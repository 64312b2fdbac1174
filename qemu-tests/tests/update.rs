//! Over-the-air update scenarios through the real UEFI path (OVMF + systemd-boot + UKIs with
//! boot counting), on images the test builds itself: version N (0.1.0), N+1 (0.2.0) and a
//! broken N+2 (0.3.0, with a critical service that never becomes ready), all trusting a TUF
//! root made from a key generated here. The repository (`image-build update add`) is served by
//! busybox httpd inside the guest's network namespace (the guest reaches it as 10.0.2.2).
//! The node is driven with keelctl from the test image's remote shell; the agent's events are
//! read on the console.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use qemu_tests::scenario::{image_build, run, test_guest_uefi, Httpd};
use qemu_tests::{create_overlay, workspace_root, Guest};
use serde_json::Value;

const BOOT: Duration = Duration::from_secs(300);
const REPO_PORT: u16 = 8000;

/// Images and repositories, built once per test process.
struct Fixture {
    dir: PathBuf,
    /// Offers 0.1.0 and 0.2.0.
    repo_good: PathBuf,
    /// Also offers the broken 0.3.0.
    repo_all: PathBuf,
    /// Offers 0.1.0 and 0.4.0, built with `keelson.fatal=reboot` (init failures reboot).
    repo_fatal: PathBuf,
    n: PathBuf,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let ws = workspace_root();
        let dir = ws.join("target/qemu-update");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let ib = image_build().unwrap();
        let key = dir.join("test-key.pk8");
        let root = dir.join("root.json");
        run(Command::new(&ib).args(["update", "keygen"]).arg(&key));
        run(Command::new(&ib)
            .args(["update", "root", "--key"])
            .arg(&key)
            .arg("--out")
            .arg(&root));
        let broken = dir.join("broken.toml");
        std::fs::write(
            &broken,
            r#"version = 1
# Never ready: the health gate of the version carrying it must fail.
[services.canary]
image = "/usr/lib/keelson/images/base"
command = ["sh", "-c", "trap 'exit 0' TERM; while :; do sleep 5 & wait $!; done"]
ready = { tcp = "127.0.0.1:9", interval = "1s" }
critical = true
stop_timeout = "2s"
"#,
        )
        .unwrap();
        let build = |version: &str, extra: Option<&Path>| -> PathBuf {
            let out = dir.join(version);
            let mut c = Command::new(&ib);
            c.current_dir(&ws)
                .args(["-q", "build", "configs/test.toml", "--version", version])
                .arg("--trusted-root")
                .arg(&root)
                .arg("--out")
                .arg(&out);
            if let Some(e) = extra {
                c.arg("--extra-services").arg(e);
            }
            run(&mut c);
            out
        };
        let n = build("0.1.0", None);
        let n1 = build("0.2.0", None);
        let n2 = build("0.3.0", Some(&broken));
        let n4 = {
            let out = dir.join("0.4.0");
            run(Command::new(&ib)
                .current_dir(&ws)
                .args(["-q", "build", "configs/test.toml", "--version", "0.4.0"])
                .args(["--kernel-arg", "keelson.fatal=reboot", "--trusted-root"])
                .arg(&root)
                .arg("--out")
                .arg(&out));
            out
        };
        let add = |repo: &Path, img: &Path| {
            run(Command::new(&ib)
                .args(["-q", "update", "add", "--repo"])
                .arg(repo)
                .arg("--root")
                .arg(&root)
                .arg("--key")
                .arg(&key)
                .arg(img));
        };
        let repo_good = dir.join("repo-good");
        let repo_all = dir.join("repo-all");
        for img in [&n, &n1] {
            add(&repo_good, img);
            add(&repo_all, img);
        }
        add(&repo_all, &n2);
        let repo_fatal = dir.join("repo-fatal");
        add(&repo_fatal, &n);
        add(&repo_fatal, &n4);
        Fixture {
            dir,
            repo_good,
            repo_all,
            repo_fatal,
            n,
        }
    })
}

/// busybox httpd serving a repository in the guest's namespace (10.0.2.2 for the guest).
fn serve(g: &Guest, repo: &Path) -> Httpd {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, REPO_PORT));
    Httpd::serve(g.netns(), addr, repo).unwrap()
}

fn status(g: &Guest) -> Value {
    let out = g.sh("keelctl -o json update status");
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("update status: {e}: {out}"))
}

/// The node's update policy (the user's config on /var, which every version reads).
fn configure(g: &Guest) {
    let out = g.sh(&format!(
            "cat > /tmp/update.toml <<'EOF'\nversion = 1\n[update]\nrepository = \"http://10.0.2.2:{REPO_PORT}/\"\nhealth_timeout = \"40s\"\nboot_tries = 2\nEOF\nkeelctl apply /tmp/update.toml"
        ),
    );
    assert!(!out.contains("error"), "{out}");
}

fn fresh_disk(f: &Fixture, name: &str) -> PathBuf {
    let disk = f.dir.join(format!("{name}.qcow2"));
    let _ = std::fs::remove_file(&disk);
    create_overlay(&f.n.join("disk.raw"), &disk, Some(2 << 30)).unwrap();
    disk
}

#[test]
fn update_to_n_plus_1_is_blessed_and_a_broken_n_plus_2_rolls_back() {
    let f = fixture();
    let disk = fresh_disk(f, "update");
    let g = test_guest_uefi(&disk).spawn().unwrap();
    let mut httpd = serve(&g, &f.repo_good);
    // N's own first boot has a try counter too: the gate blesses it.
    g.expect("update-blessed: 0.1.0", BOOT);
    configure(&g);
    g.sh("echo kept > /flush/marker");
    let out = g.sh("keelctl update check");
    assert!(out.contains("available: 0.2.0"), "{out}");

    let started = Instant::now();
    // --no-wait: the shell answers before the node goes down for the reboot.
    let out = g.sh("keelctl update apply --reboot --no-wait");
    assert!(!out.contains("keelctl:"), "{out}");
    g.expect("update-staged", BOOT);
    g.expect("update-blessed: 0.2.0", BOOT);
    eprintln!(
        "apply -> blessed on N+1: {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let s = status(&g);
    assert_eq!(s["version"], "0.2.0", "{s}");
    assert_eq!(s["slot"], "b", "{s}");
    assert_eq!(s["assessment"], "good", "{s}");
    assert_eq!(s["boot_entry"], "keelson_0.2.0.efi", "{s}");
    assert_eq!(s["last_good"], "0.2.0", "{s}");
    assert_eq!(g.sh("cat /flush/marker").trim(), "kept");

    // N+2 is broken: its critical `canary` never gets ready. Two tries, then systemd-boot
    // falls back to N+1 in slot B, which reports the rollback.
    drop(httpd);
    httpd = serve(&g, &f.repo_all);
    // --no-wait: the shell answers before the node goes down for the reboot.
    let out = g.sh("keelctl update apply --reboot --no-wait");
    assert!(!out.contains("keelctl:"), "{out}");
    for _ in 0..2 {
        g.expect("update-health-failed: 0.3.0", BOOT);
    }
    g.expect("rolled back from 0.3.0", BOOT);
    let s = status(&g);
    assert_eq!(s["version"], "0.2.0", "{s}");
    assert_eq!(s["slot"], "b", "{s}");
    assert_eq!(s["rolled_back_from"], "0.3.0", "{s}");
    assert_eq!(g.sh("cat /flush/marker").trim(), "kept");
    let out = g.sh("keelctl update status");
    assert!(out.contains("rolled back from: 0.3.0"), "{out}");
    drop(httpd);
}

#[test]
fn power_loss_during_write_before_reboot_and_during_boot_leaves_a_good_slot() {
    let f = fixture();
    let disk = fresh_disk(f, "power");

    // 1. Power cut while slot B is being written.
    let g = test_guest_uefi(&disk).spawn().unwrap();
    let httpd = serve(&g, &f.repo_good);
    g.expect("update-blessed: 0.1.0", BOOT);
    configure(&g);
    g.sh("echo kept > /flush/marker");
    g.sh("keelctl update apply --no-wait");
    g.expect("update-started", BOOT);
    std::thread::sleep(Duration::from_secs(2));
    g.kill().unwrap();
    drop(httpd);
    drop(g);

    let g = test_guest_uefi(&disk).spawn().unwrap();
    let httpd = serve(&g, &f.repo_good);
    g.expect("boot complete", BOOT);
    let s = status(&g);
    assert_eq!(s["version"], "0.1.0", "{s}");
    assert_eq!(s["slot"], "a", "{s}");
    assert_eq!(s["assessment"], "good", "{s}");
    assert_eq!(g.sh("cat /flush/marker").trim(), "kept");

    // 2. Power cut after the new slot is staged, before any reboot: it boots next.
    let out = g.sh("keelctl update apply");
    assert!(out.contains("staged 0.2.0"), "{out}");
    g.kill().unwrap();
    drop(httpd);
    drop(g);

    // 3. Power cut while the new slot boots (its first try is used up).
    let g = test_guest_uefi(&disk).spawn().unwrap();
    g.expect("stage1: start", BOOT);
    g.kill().unwrap();
    drop(g);

    let g = test_guest_uefi(&disk).spawn().unwrap();
    g.expect("update-blessed: 0.2.0", BOOT);
    let s = status(&g);
    assert_eq!(s["version"], "0.2.0", "{s}");
    assert_eq!(s["slot"], "b", "{s}");
    assert_eq!(s["assessment"], "good", "{s}");
    assert_eq!(g.sh("cat /flush/marker").trim(), "kept");
}

#[test]
fn a_new_slot_whose_init_fails_rolls_back_within_its_tries() {
    let f = fixture();
    let disk = fresh_disk(f, "fatal");
    let g = test_guest_uefi(&disk).spawn().unwrap();
    let httpd = serve(&g, &f.repo_fatal);
    g.expect("update-blessed: 0.1.0", BOOT);
    configure(&g);
    g.sh("echo kept > /flush/marker");
    let out = g.sh("keelctl update apply");
    assert!(out.contains("staged 0.4.0"), "{out}");
    g.kill().unwrap();
    drop(httpd);
    drop(g);

    // Behind the node's back, slot B's verity superblock goes bad: stage 1 of 0.4.0 fails
    // (FATAL), and its `keelson.fatal=reboot` makes each failure cost one try.
    let gpt =
        keelson_common::gpt::Gpt::read(&mut std::fs::File::open(f.n.join("disk.raw")).unwrap())
            .unwrap();
    let (_, part) = gpt
        .find(
            keelson_common::partitions::ROOT_X86_64_VERITY_TYPE,
            "root-b-verity",
        )
        .unwrap();
    let offset = part.first_lba * 512;
    run(Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", &format!("write -P 0 {offset} 4096")])
        .arg(&disk));

    let g = test_guest_uefi(&disk).spawn().unwrap();
    for _ in 0..2 {
        let line = g.expect("FATAL:", BOOT);
        assert!(line.contains("verity"), "{line}");
    }
    g.expect("rolled back from 0.4.0", BOOT);
    let s = status(&g);
    assert_eq!(s["version"], "0.1.0", "{s}");
    assert_eq!(s["slot"], "a", "{s}");
    assert_eq!(s["assessment"], "good", "{s}");
    assert_eq!(s["rolled_back_from"], "0.4.0", "{s}");
    assert_eq!(g.sh("cat /flush/marker").trim(), "kept");
}
