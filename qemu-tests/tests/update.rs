//! Over-the-air update scenarios through the real UEFI path (OVMF + systemd-boot + UKIs with
//! boot counting), on images the test builds itself: version N (0.1.0), N+1 (0.2.0) and a
//! broken N+2 (0.3.0, with a critical service that never becomes ready), all trusting a TUF
//! root made from a key generated here. The repository (`image-build update add`) is served by
//! busybox httpd inside the guest's network namespace (the guest reaches it as 10.0.2.2).
//! The node is driven with keelctl from the test image's remote shell; the agent's events are
//! read on the console.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use qemu_tests::repo_server::RepoServer;
use qemu_tests::scenario::{run, test_guest_uefi};
use qemu_tests::update::{
    self, apply_until_phase, assert_intact, configure_with, serve, status, Signing, REPO_PORT,
};
use qemu_tests::{workspace_root, Guest};

const BOOT: Duration = Duration::from_secs(300);

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
        let dir = workspace_root().join("target/qemu-update");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let s = Signing::for_scenario(&dir);
        let broken = dir.join("broken.toml");
        std::fs::write(&broken, update::NEVER_READY).unwrap();
        let n = s.image("0.1.0", None, &[]);
        let n1 = s.image("0.2.0", None, &[]);
        let n2 = s.image("0.3.0", Some(&broken), &[]);
        let n4 = s.image("0.4.0", None, &["keelson.fatal=reboot"]);
        let repo_good = dir.join("repo-good");
        let repo_all = dir.join("repo-all");
        for img in [&n, &n1] {
            s.add(&repo_good, img);
            s.add(&repo_all, img);
        }
        s.add(&repo_all, &n2);
        let repo_fatal = dir.join("repo-fatal");
        s.add(&repo_fatal, &n);
        s.add(&repo_fatal, &n4);
        Fixture {
            dir,
            repo_good,
            repo_all,
            repo_fatal,
            n,
        }
    })
}

fn fresh_disk(f: &Fixture, name: &str) -> PathBuf {
    update::fresh_disk(&f.n, &f.dir, name)
}

#[test]
fn update_to_n_plus_1_is_blessed_and_a_broken_n_plus_2_rolls_back() {
    let f = fixture();
    let disk = fresh_disk(f, "update");
    let g = test_guest_uefi(&disk).spawn().unwrap();
    let mut httpd = serve(&g, &f.repo_good);
    // N's own first boot has a try counter too: the gate blesses it.
    g.expect("update-blessed: 0.1.0", BOOT);
    configure_with(&g, "");
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

/// Cuts power (SIGKILL of QEMU) and boots the disk again with a fresh repository server.
fn cut_and_boot(g: Guest, repo: RepoServer, disk: &Path, f: &Fixture) -> (Guest, RepoServer) {
    g.kill().unwrap();
    drop(repo);
    drop(g);
    let g = test_guest_uefi(disk).spawn().unwrap();
    let repo = RepoServer::serve(&g, REPO_PORT, &f.repo_good).unwrap();
    (g, repo)
}

/// Power cuts at each step of writing the other slot, each at an exact point (the repository
/// server stops at a chosen byte, or the test waits for the agent's phase): the running slot
/// boots every time with /var intact, and the update still lands afterwards.
#[test]
fn power_cut_at_each_step_of_an_install_keeps_the_running_slot() {
    let f = fixture();
    let disk = fresh_disk(f, "cuts");
    let g = test_guest_uefi(&disk).spawn().unwrap();
    let mut repo = RepoServer::serve(&g, REPO_PORT, &f.repo_good).unwrap();
    g.expect("update-blessed: 0.1.0", BOOT);
    // The cut points below are the full payload's (the root streamed as it arrives): deltas
    // off, or the root would come as chunks and its stall point never be reached.
    configure_with(&g, "delta_max_percent = 0\n");
    g.sh("echo kept > /flush/marker");
    let mut g = g;
    let arrive = Duration::from_secs(240);

    // The agent's order: the UKI into memory (checked against db on a Secure Boot node), the
    // old entry of slot B removed, root and verity streamed into slot B, the read-back, then
    // the UKI written to the ESP under a temporary name, fsynced and renamed with its tries.

    // 1. The UKI half downloaded: nothing written yet.
    repo.stall("0.2.0-uki-b.efi", 4 << 20);
    g.sh("keelctl update apply --no-wait");
    let at = repo.wait(arrive).unwrap();
    eprintln!("cut 1: {at:?}");
    (g, repo) = cut_and_boot(g, repo, &disk, f);
    g.expect("boot complete", BOOT);
    assert_intact(&g, "0.1.0", "a");

    // 2. The root image half downloaded (it streams into slot B as it arrives).
    repo.stall("0.2.0-root.erofs.gz", 8 << 20);
    g.sh("keelctl update apply --no-wait");
    let at = repo.wait(arrive).unwrap();
    eprintln!("cut 2: {at:?}");
    (g, repo) = cut_and_boot(g, repo, &disk, f);
    g.expect("boot complete", BOOT);
    assert_intact(&g, "0.1.0", "a");

    // 3. Root written and synced, its verity tree half downloaded.
    repo.stall("0.2.0-root.verity", 64 << 10);
    g.sh("keelctl update apply --no-wait");
    let at = repo.wait(arrive).unwrap();
    eprintln!("cut 3: {at:?}");
    (g, repo) = cut_and_boot(g, repo, &disk, f);
    g.expect("boot complete", BOOT);
    assert_intact(&g, "0.1.0", "a");

    // 4. Reading slot B back to check its root hash (the node's own view of its phase).
    let out = g.sh(&apply_until_phase("verifying"));
    assert!(out.contains("reached verifying"), "{out}");
    eprintln!("cut 4: phase verifying");
    (g, repo) = cut_and_boot(g, repo, &disk, f);
    g.expect("boot complete", BOOT);
    assert_intact(&g, "0.1.0", "a");

    // 5. Installing: the UKI being written to the ESP, fsynced, checked and renamed with its
    // try counter. Either slot may boot next; whichever does must be good.
    let out = g.sh(&apply_until_phase("installing"));
    assert!(out.contains("reached installing"), "{out}");
    eprintln!("cut 5: phase installing");
    (g, repo) = cut_and_boot(g, repo, &disk, f);
    g.expect("boot complete", BOOT);
    if status(&g)["slot"] == "b" {
        eprintln!("cut 5 landed after the rename: slot B boots");
        g.expect("update-blessed: 0.2.0", BOOT);
        assert_intact(&g, "0.2.0", "b");
        return;
    }
    eprintln!("cut 5 landed before the rename: slot A boots");
    assert_intact(&g, "0.1.0", "a");

    // Whatever the cuts left on slot B and the ESP, the next update writes it whole.
    let out = g.sh("keelctl update apply --reboot --no-wait");
    assert!(!out.contains("keelctl:"), "{out}");
    g.expect("update-blessed: 0.2.0", BOOT);
    assert_intact(&g, "0.2.0", "b");
    drop(repo);
}

/// Power cuts on the boot side of an update: staged before the reboot, during the new slot's
/// first boot, right after its bless, and during a rollback from a broken version.
#[test]
fn power_cuts_while_staged_booting_blessed_and_rolling_back_leave_a_good_slot() {
    let f = fixture();
    let disk = fresh_disk(f, "power");
    let g = test_guest_uefi(&disk).spawn().unwrap();
    let httpd = serve(&g, &f.repo_good);
    g.expect("update-blessed: 0.1.0", BOOT);
    configure_with(&g, "");
    g.sh("echo kept > /flush/marker");

    // 6. Power cut after the new slot is staged, before any reboot: it boots next.
    let out = g.sh("keelctl update apply");
    assert!(out.contains("staged 0.2.0"), "{out}");
    g.kill().unwrap();
    drop(httpd);
    drop(g);

    // 7. Power cut while the new slot boots (its first try is used up).
    let g = test_guest_uefi(&disk).spawn().unwrap();
    g.expect("stage1: start", BOOT);
    g.kill().unwrap();
    drop(g);

    // 8. Power cut right after the new slot is blessed: it stays the good one.
    let g = test_guest_uefi(&disk).spawn().unwrap();
    g.expect("update-blessed: 0.2.0", BOOT);
    g.kill().unwrap();
    drop(g);
    let g = test_guest_uefi(&disk).spawn().unwrap();
    let httpd = serve(&g, &f.repo_all);
    g.expect("boot complete", BOOT);
    assert_intact(&g, "0.2.0", "b");
    let s = status(&g);
    assert_eq!(s["last_good"], "0.2.0", "{s}");

    // 9. A broken 0.3.0 uses up its tries; power is cut while the node boots back into
    // 0.2.0, before that boot has reported the rollback. The next boot reports it.
    let out = g.sh("keelctl update apply --reboot --no-wait");
    assert!(!out.contains("keelctl:"), "{out}");
    for _ in 0..2 {
        g.expect("update-health-failed: 0.3.0", BOOT);
    }
    g.expect("stage1: start", BOOT);
    g.kill().unwrap();
    drop(httpd);
    drop(g);
    let g = test_guest_uefi(&disk).spawn().unwrap();
    g.expect("rolled back from 0.3.0", BOOT);
    assert_intact(&g, "0.2.0", "b");
    let s = status(&g);
    assert_eq!(s["rolled_back_from"], "0.3.0", "{s}");
}

#[test]
fn a_new_slot_whose_init_fails_rolls_back_within_its_tries() {
    let f = fixture();
    let disk = fresh_disk(f, "fatal");
    let g = test_guest_uefi(&disk).spawn().unwrap();
    let httpd = serve(&g, &f.repo_fatal);
    g.expect("update-blessed: 0.1.0", BOOT);
    configure_with(&g, "");
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
