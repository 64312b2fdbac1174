//! Delta updates through the real UEFI path (OVMF + systemd-boot + UKIs with boot counting), on
//! images the test builds: N (0.1.0), N+1 (0.2.0) and N+2 (0.3.0, one more system service), in
//! repositories made with `image-build update add` (each version's root cut into chunks, and in
//! one of them also published as a patch against the previous root). What each install did is
//! read from the agent's events on the console (`update-delta`, `update-root-patch`,
//! `update-delta-fallback`, `update-staged` with the bytes downloaded) and checked against the
//! repository's own chunk lists and patches; the slots written are read back from the guest's
//! disk after it powered off and compared byte for byte with the images built (what a full
//! update writes).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use keelson_common::partitions::Slot;
use qemu_tests::repo_server::{Reached, RepoServer};
use qemu_tests::scenario::test_guest_uefi;
use qemu_tests::update::{
    self, apply_until_phase, assert_intact, assert_slot_holds, chunk_list, chunks_in_place,
    configure_with, manifest, new_chunks, serve, status, target_path, Signing, REPO_PORT,
};
use qemu_tests::{workspace_root, Guest};

const BOOT: Duration = Duration::from_secs(300);
const ARRIVE: Duration = Duration::from_secs(240);

struct Fixture {
    dir: PathBuf,
    n: PathBuf,
    n1: PathBuf,
    n2: PathBuf,
    /// Offers 0.1.0 and 0.2.0, 0.2.0's root also as a patch against 0.1.0's (as releases do).
    repo12_patch: PathBuf,
    /// Offers 0.1.0 and 0.2.0, roots as chunks only (no root patches).
    repo12: PathBuf,
    /// Offers 0.1.0, 0.2.0 and 0.3.0, roots as chunks only.
    repo123: PathBuf,
    /// `repo12` without one chunk 0.2.0 has and 0.1.0 lacks (`missing`).
    repo_missing: PathBuf,
    missing: String,
    /// `repo12` with that chunk's stored bytes changed (same length).
    repo_wrong: PathBuf,
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dst = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &dst);
        } else {
            std::fs::copy(e.path(), &dst).unwrap();
        }
    }
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let dir = workspace_root().join("target/qemu-delta");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let s = Signing::for_scenario(&dir);
        let hello = dir.join("hello.toml");
        std::fs::write(
            &hello,
            "version = 1\n[services.hello]\nimage = \"/usr/lib/keelson/images/base\"\ncommand = [\"sh\", \"-c\", \"trap 'exit 0' TERM; while :; do sleep 60 & wait $!; done\"]\n",
        )
        .unwrap();
        let n = s.image("0.1.0", None, &[]);
        let n1 = s.image("0.2.0", None, &[]);
        let n2 = s.image("0.3.0", Some(&hello), &[]);
        let repo12_patch = dir.join("repo12-patch");
        let repo12 = dir.join("repo12");
        let repo123 = dir.join("repo123");
        let chunks_only = |repo: &Path, img: &Path| {
            s.add_with(repo, img, &[], &["--root-patches", "0"]);
        };
        for img in [&n, &n1] {
            s.add(&repo12_patch, img);
            chunks_only(&repo12, img);
            chunks_only(&repo123, img);
        }
        chunks_only(&repo123, &n2);

        let new = new_chunks(&repo12, "0.1.0", "0.2.0");
        assert!(!new.is_empty(), "0.2.0's root has no chunk 0.1.0 lacks");
        let missing = new[0].clone();
        let repo_missing = dir.join("repo-missing");
        copy_dir(&repo12, &repo_missing);
        std::fs::remove_file(repo_missing.join("targets/chunks").join(&missing)).unwrap();
        let repo_wrong = dir.join("repo-wrong");
        copy_dir(&repo12, &repo_wrong);
        let chunk = repo_wrong.join("targets/chunks").join(&missing);
        let mut bytes = std::fs::read(&chunk).unwrap();
        assert!(bytes.len() > 32, "chunk {missing} is stored in {} bytes", bytes.len());
        // Past the zstd frame header: the stored length stays the signed one.
        for b in bytes.iter_mut().skip(16).step_by(7) {
            *b ^= 0x5a;
        }
        std::fs::write(&chunk, &bytes).unwrap();
        Fixture {
            dir,
            n,
            n1,
            n2,
            repo12_patch,
            repo12,
            repo123,
            repo_missing,
            missing,
            repo_wrong,
        }
    })
}

fn fresh_disk(f: &Fixture, name: &str) -> PathBuf {
    update::fresh_disk(&f.n, &f.dir, name)
}

fn file_len(p: &Path) -> u64 {
    std::fs::metadata(p).unwrap().len()
}

/// What installing `to` on a node running `from` (into slot `slot`) downloads from `repo`:
/// the root (by delta: the chunk list and the stored chunks the node lacks; whole: the gzip
/// root), the UKI (by delta: its patch against `from`'s; whole: the UKI), and the verity tree.
struct Expected {
    /// The chunk list and the chunks `from` lacks; or, when the repository has a patch of
    /// `to`'s root against `from`'s (which the agent takes first), that patch.
    delta_root: u64,
    /// Whether `delta_root` is a root patch.
    patch: bool,
    /// By chunks: how many chunks `from` lacks, and how many of those the slot written
    /// already holds at their place (left there by the version it held before), which the
    /// agent keeps instead of downloading.
    missing: usize,
    kept: usize,
    /// The kept chunks' stored bytes: planned, not downloaded.
    kept_stored: u64,
    full_root: u64,
    uki_patch: u64,
    uki: u64,
    verity: u64,
}

fn expected(repo: &Path, from: &str, to: &str, slot: &str, held: Option<&Path>) -> Expected {
    let m = manifest(repo);
    let p = m.updates.iter().find(|p| p.version == to).unwrap();
    let list = chunk_list(repo, to);
    let new = new_chunks(repo, from, to);
    let kept = held.map_or_else(Vec::new, |h| {
        chunks_in_place(repo, to, &new, &h.join("root.erofs"))
    });
    let stored_len = |sha: &String| {
        list.chunks
            .iter()
            .find(|c| &c.sha256 == sha)
            .unwrap()
            .stored
    };
    let stored: u64 = new.iter().map(stored_len).sum();
    let list_len = file_len(&target_path(repo, &p.chunks.as_ref().unwrap().target));
    let root_patch = p
        .root_patches
        .iter()
        .find(|r| r.from_version == from)
        .map(|r| file_len(&target_path(repo, &r.target)));
    let patch = p
        .uki_patches
        .iter()
        .find(|u| u.slot == slot && u.from_version == from)
        .unwrap_or_else(|| panic!("{to} has no UKI patch for slot {slot} from {from}"));
    Expected {
        delta_root: root_patch.unwrap_or(list_len + stored),
        patch: root_patch.is_some(),
        missing: new.len(),
        kept: kept.len(),
        kept_stored: kept.iter().map(stored_len).sum(),
        full_root: file_len(&target_path(repo, &p.root)),
        uki_patch: file_len(&target_path(repo, &patch.target)),
        uki: file_len(&target_path(repo, p.uki_for(slot))),
        verity: file_len(&target_path(repo, &p.verity)),
    }
}

/// The number before `unit` in `line` following `after` (`… downloading 12 KiB …`).
fn number_after(line: &str, after: &str) -> u64 {
    let rest = &line[line
        .find(after)
        .unwrap_or_else(|| panic!("no {after:?} in {line}"))
        + after.len()..];
    rest.split_whitespace()
        .next()
        .and_then(|n| n.trim_start_matches('(').parse().ok())
        .unwrap_or_else(|| panic!("no number after {after:?} in {line}"))
}

/// Applies (and reboots into) `to`: the agent must take the cheapest way the repository
/// offers for the root (its patch against `from`'s root if there is one, else the chunks) and
/// the UKI's patch, not fall back, and download exactly that (the patch, or the chunk list and
/// the chunks the running slot lacks), the UKI's patch and the verity tree; then the new slot
/// is blessed with /var intact. `held` is the image the written slot held before: chunks of
/// `to` it still has at their place are kept, not downloaded.
fn update_by_delta(g: &Guest, repo: &Path, from: &str, to: &str, slot: &str, held: Option<&Path>) {
    let e = expected(repo, from, to, slot, held);
    let out = g.sh("keelctl update apply --reboot --no-wait");
    assert!(!out.contains("keelctl:"), "{out}");
    let way = if e.patch { "by root patch" } else { "by delta" };
    let (i, line) = g
        .wait_for_any(
            &[
                &format!("update-delta: {to} {way}"),
                "update-delta-fallback",
            ],
            BOOT,
        )
        .unwrap();
    assert_eq!(i, 0, "{to} did not come {way}: {line}");
    let root_kib = number_after(&line, "downloading ");
    assert_eq!(
        root_kib,
        e.delta_root >> 10,
        "the agent plans another download than {to}'s root {way} from {from}'s: {line}"
    );
    if e.patch {
        let (i, line) = g
            .wait_for_any(&["update-root-patch", "update-delta-fallback"], BOOT)
            .unwrap();
        assert_eq!(i, 0, "{to}'s root patch was not applied: {line}");
        assert!(
            line.contains(&format!(
                "{to}'s root built from the running one ({from}'s)"
            )),
            "{line}"
        );
    }
    let (i, line) = g
        .wait_for_any(&["update-uki-patch", "update-delta-fallback"], BOOT)
        .unwrap();
    assert_eq!(i, 0, "{to}'s UKI came whole: {line}");
    assert!(
        line.contains(&format!(
            "{to}'s UKI for slot {slot} built from the running one ({from}'s)"
        )),
        "{line}"
    );
    let (i, staged) = g
        .wait_for_any(&["update-staged", "update-delta-fallback"], BOOT)
        .unwrap();
    assert_eq!(i, 0, "{to} fell back to the full root: {staged}");
    let downloaded = number_after(&staged, "(downloaded ");
    let delta = e.delta_root + e.uki_patch + e.verity;
    assert_eq!(
        downloaded,
        (delta - e.kept_stored) >> 10,
        "{staged}: not the root {way} + UKI patch + verity, less the {} chunks slot {slot} already held",
        e.kept
    );
    let log = g.serial_log();
    let attempt = &log[log
        .rfind(&format!("update-started: installing {to}"))
        .unwrap_or_else(|| panic!("no update-started for {to}"))..];
    let resumed = attempt.lines().find(|l| l.contains("update-delta-resumed"));
    if e.kept == 0 {
        assert!(
            resumed.is_none(),
            "slot {slot} held none of {to}'s chunks: {resumed:?}"
        );
    } else {
        let want = format!(
            "update-delta-resumed: {} of the {} chunks",
            e.kept, e.missing
        );
        assert!(
            resumed.is_some_and(|l| l.contains(&want)),
            "slot {slot} held {} of {to}'s {} missing chunks at their place: {resumed:?}",
            e.kept,
            e.missing
        );
    }
    let full = e.full_root + e.uki + e.verity;
    eprintln!(
        "{from} -> {to} {way}: root {} KiB of {} KiB full ({:.1} %; {} of its {} new chunks already in slot {slot}), UKI {} B of {} KiB; with the verity tree {} KiB of {} KiB ({:.1} %)",
        e.delta_root >> 10,
        e.full_root >> 10,
        e.delta_root as f64 * 100.0 / e.full_root as f64,
        e.kept,
        e.missing,
        e.uki_patch,
        e.uki >> 10,
        delta >> 10,
        full >> 10,
        delta as f64 * 100.0 / full as f64
    );
    assert!(
        delta * 10 < full,
        "{to} by delta downloads {delta} bytes, not under 10 % of the full {full}"
    );
    assert!(
        e.delta_root * 10 < e.full_root,
        "{to}'s root delta is {} bytes, not under 10 % of the full root's {}",
        e.delta_root,
        e.full_root
    );
    g.expect(&format!("update-blessed: {to}"), BOOT);
    assert_intact(g, to, slot);
}

/// Powers the guest off cleanly (its disk is then readable from here).
fn power_off(g: Guest) {
    g.powerdown().unwrap();
    g.wait_exit(Duration::from_secs(120)).unwrap();
}

/// N -> N+1 with the root as a patch against N's, then N+1 -> N+2 by chunks from the slot the
/// patch wrote; each slot read back from the disk is the version's root image and verity tree
/// byte for byte.
#[test]
fn delta_updates_n_to_n1_to_n2_write_each_slot_as_the_image_built() {
    let f = fixture();
    let disk = fresh_disk(f, "chain");
    let g = test_guest_uefi(&disk).spawn().unwrap();
    let httpd = serve(&g, &f.repo12_patch);
    g.expect("update-blessed: 0.1.0", BOOT);
    configure_with(&g, "");
    g.sh("echo kept > /flush/marker");

    // `keelctl update check` offers 0.2.0 with a delta download size below the full one.
    let out = g.sh("keelctl -o json update check");
    let check: serde_json::Value =
        serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"));
    let v = check["versions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["version"] == "0.2.0")
        .unwrap_or_else(|| panic!("{check}"));
    let (full, delta) = (
        v["download_size"].as_u64().unwrap(),
        v["delta_size"].as_u64().unwrap_or_else(|| panic!("{v}")),
    );
    assert!(delta < full, "{v}");
    eprintln!("keelctl update check: 0.2.0 {full} bytes full, {delta} by delta");

    update_by_delta(&g, &f.repo12_patch, "0.1.0", "0.2.0", "b", None);
    drop(httpd);
    let httpd = serve(&g, &f.repo123);
    // Slot A still holds 0.1.0: chunks of 0.3.0 that 0.2.0 changed but 0.1.0 had at the
    // same place are kept (found by hashing the slot), not downloaded.
    update_by_delta(&g, &f.repo123, "0.2.0", "0.3.0", "a", Some(&f.n));
    let ps = g.sh("keelctl ps");
    assert!(ps.contains("hello"), "0.3.0's added service: {ps}");
    drop(httpd);
    power_off(g);
    assert_slot_holds(&f.n, &disk, Slot::B, &f.n1);
    assert_slot_holds(&f.n, &disk, Slot::A, &f.n2);
}

/// A repository that lacks a chunk, then one serving a chunk with wrong content: each time the
/// agent plans a delta, refuses the chunk naming it, and installs the full root instead; the
/// slot it stages boots and is 0.2.0's image byte for byte, and the running slot is untouched.
#[test]
fn a_missing_or_wrong_chunk_falls_back_to_the_full_root_and_never_makes_a_bad_slot() {
    let f = fixture();
    let disk = fresh_disk(f, "bad-chunks");
    let g = test_guest_uefi(&disk).spawn().unwrap();
    let httpd = serve(&g, &f.repo_missing);
    g.expect("update-blessed: 0.1.0", BOOT);
    configure_with(&g, "");
    g.sh("echo kept > /flush/marker");

    // 1. The chunk is missing (404): the fallback names it.
    let out = g.sh("keelctl update apply");
    assert!(out.contains("staged 0.2.0"), "{out}");
    g.expect("update-delta: 0.2.0 by delta", BOOT);
    let line = g.expect("update-delta-fallback", BOOT);
    assert!(
        line.contains(&f.missing) && line.contains("downloading the full root"),
        "the fallback does not name the missing chunk {}: {line}",
        f.missing
    );
    let s = status(&g);
    assert_eq!(s["version"], "0.1.0", "{s}");
    assert_eq!(s["slot"], "a", "{s}");
    assert_eq!(s["staged"], "0.2.0", "{s}");
    g.sh("keelctl update cancel");
    g.expect("staged 0.2.0 discarded", BOOT);
    let s = status(&g);
    assert!(s["staged"].is_null(), "{s}");

    // 2. The chunk has wrong content: refused on arrival, the full root installed, and the
    // node reboots into it. The fallback above wrote the whole of 0.2.0's root into slot B, so
    // the next attempt would find every chunk in place (`update-delta-resumed`) and fetch
    // none: slot B is wiped first, as a slot that never held 0.2.0.
    wipe_root(&g, Slot::B);
    drop(httpd);
    let httpd = serve(&g, &f.repo_wrong);
    let out = g.sh("keelctl update apply --reboot --no-wait");
    assert!(!out.contains("keelctl:"), "{out}");
    g.expect("update-delta: 0.2.0 by delta", BOOT);
    let line = g.expect("update-delta-fallback", BOOT);
    assert!(
        line.contains(&f.missing) && line.contains("downloading the full root"),
        "the fallback does not name the wrong chunk {}: {line}",
        f.missing
    );
    g.expect("update-staged", BOOT);
    g.expect("update-blessed: 0.2.0", BOOT);
    assert_intact(&g, "0.2.0", "b");
    drop(httpd);
    power_off(g);
    assert_slot_holds(&f.n, &disk, Slot::B, &f.n1);
    assert_slot_holds(&f.n, &disk, Slot::A, &f.n);
}

/// Zeroes `slot`'s root partition from the test shell (privileged, in the host's pid
/// namespace: the partition is found by its GPT label in init's /sys and written through init's
/// /dev).
fn wipe_root(g: &Guest, slot: Slot) {
    let label = slot.root_label();
    let out = g.sh(&format!(
        "n=; for u in /proc/1/root/sys/class/block/*/uevent; do \
           grep -qx PARTNAME={label} $u && n=$(basename $(dirname $u)); done; \
         if [ -n \"$n\" ]; then \
           s=$(cat /proc/1/root/sys/class/block/$n/size); \
           dd if=/dev/zero of=/proc/1/root/dev/$n bs=1M count=$((s / 2048)) conv=fsync \
             2>&1 && echo wiped $n; \
         else echo no partition labelled {label}; fi"
    ));
    assert!(out.contains("wiped"), "wiping {label}: {out}");
}

/// Cuts power (SIGKILL of QEMU) and boots the disk again with a fresh repository server; the
/// running slot must come up good with /var intact.
fn cut_and_boot(g: Guest, repo: RepoServer, disk: &Path, f: &Fixture) -> (Guest, RepoServer) {
    g.kill().unwrap();
    drop(repo);
    drop(g);
    let g = test_guest_uefi(disk).spawn().unwrap();
    let repo = RepoServer::serve(&g, REPO_PORT, &f.repo12).unwrap();
    g.expect("boot complete", BOOT);
    (g, repo)
}

/// Whether the agent's index of its running slot is cached on /var.
fn index_cached(g: &Guest) -> bool {
    g.sh("test -f /proc/1/root/var/lib/keelson/update/delta-index.json && echo yes || echo no")
        .trim()
        == "yes"
}

/// Power cuts at each step of a delta install, each at an exact point (the repository server
/// stops at a chosen byte of a chosen file, or the test waits for the agent's phase), on one
/// node cut again and again: the running slot boots every time with /var intact, and the
/// update still lands by delta afterwards.
#[test]
fn power_cuts_along_the_delta_path_always_leave_a_good_slot() {
    let f = fixture();
    let disk = fresh_disk(f, "cuts");
    let g = test_guest_uefi(&disk).spawn().unwrap();
    let mut repo = RepoServer::serve(&g, REPO_PORT, &f.repo12).unwrap();
    g.expect("update-blessed: 0.1.0", BOOT);
    configure_with(&g, "");
    g.sh("echo kept > /flush/marker");
    let mut g = g;
    let new = new_chunks(&f.repo12, "0.1.0", "0.2.0");
    let list = chunk_list(&f.repo12, "0.2.0");
    let delta_line = "update-delta: 0.2.0 by delta";

    // The agent's order on the delta path: the chunk list, the running slot indexed through
    // dm-verity (cached on /var), the UKI into memory (patched from the running one), slot B's
    // old entry removed, the chunks
    // the running slot has copied into slot B, the others downloaded, the verity tree, the
    // read-back, then the UKI written to the ESP and renamed with its tries.

    // 1. Indexing: the chunk list has arrived whole; the agent is reading its running root.
    repo.notify_sent("0.2.0-root.chunks.json");
    g.sh("keelctl update apply --no-wait");
    let at = repo.wait(ARRIVE).unwrap();
    eprintln!("cut 1 (indexing): {at:?}");
    (g, repo) = cut_and_boot(g, repo, &disk, f);
    assert_intact(&g, "0.1.0", "a");
    assert!(
        !index_cached(&g),
        "the index was complete before the cut: not a cut while indexing"
    );

    // 2. Indexed; the UKI's patch half downloaded: slot B not touched yet.
    let e = expected(&f.repo12, "0.1.0", "0.2.0", "b", None);
    repo.stall(".from-0.1.0.zst", (e.uki_patch / 2).max(1));
    g.sh("keelctl update apply --no-wait");
    g.expect(delta_line, BOOT);
    let at = repo.wait(ARRIVE).unwrap();
    assert!(
        matches!(&at, Reached::Stalled { file, .. } if file.ends_with("test-0.2.0-uki-b.from-0.1.0.zst")),
        "{at:?}"
    );
    eprintln!("cut 2 (UKI patch download): {at:?}");
    (g, repo) = cut_and_boot(g, repo, &disk, f);
    assert_intact(&g, "0.1.0", "a");
    assert!(index_cached(&g), "the index was not cached after indexing");

    // 3. Copying the running slot's chunks into slot B: every chunk to download is held at
    // its first byte, so the cut comes before any download completes.
    for sha in &new {
        repo.stall(sha, 0);
    }
    let out = g.sh(&apply_until_phase("downloading"));
    assert!(out.contains("reached downloading"), "{out}");
    eprintln!("cut 3 (copying): {}", out.lines().last().unwrap_or(""));
    (g, repo) = cut_and_boot(g, repo, &disk, f);
    assert_intact(&g, "0.1.0", "a");

    // 4. Downloading: copying done, one missing chunk half sent.
    let first = list.chunks.iter().find(|c| c.sha256 == new[0]).unwrap();
    repo.stall(&new[0], (first.stored / 2).max(1));
    g.sh("keelctl update apply --no-wait");
    g.expect(delta_line, BOOT);
    let at = repo.wait(ARRIVE).unwrap();
    assert!(
        matches!(&at, Reached::Stalled { file, .. } if file.ends_with(&new[0])),
        "{at:?}"
    );
    eprintln!("cut 4 (downloading a chunk): {at:?}");
    (g, repo) = cut_and_boot(g, repo, &disk, f);
    assert_intact(&g, "0.1.0", "a");

    // 5. The root assembled and synced, its verity tree half downloaded.
    repo.stall("0.2.0-root.verity", 64 << 10);
    g.sh("keelctl update apply --no-wait");
    g.expect(delta_line, BOOT);
    let at = repo.wait(ARRIVE).unwrap();
    eprintln!("cut 5 (verity tree): {at:?}");
    (g, repo) = cut_and_boot(g, repo, &disk, f);
    assert_intact(&g, "0.1.0", "a");

    // 6. Reading slot B back to check its root hash. The root cut 5 left synced in slot B is
    // found in place: no chunk is downloaded again.
    let out = g.sh(&apply_until_phase("verifying"));
    assert!(out.contains("reached verifying"), "{out}");
    g.expect(delta_line, BOOT);
    g.expect(
        &format!(
            "update-delta-resumed: {0} of the {0} chunks to download are in slot b already",
            new.len()
        ),
        BOOT,
    );
    eprintln!("cut 6 (verifying)");
    (g, repo) = cut_and_boot(g, repo, &disk, f);
    assert_intact(&g, "0.1.0", "a");

    // 7. Installing the UKI on the ESP: either slot may boot next; whichever does is good.
    let out = g.sh(&apply_until_phase("installing"));
    assert!(out.contains("reached installing"), "{out}");
    g.expect(delta_line, BOOT);
    eprintln!("cut 7 (installing the UKI)");
    (g, repo) = cut_and_boot(g, repo, &disk, f);
    if status(&g)["slot"] == "b" {
        eprintln!("cut 7 landed after the rename: slot B boots");
        g.expect("update-blessed: 0.2.0", BOOT);
        assert_intact(&g, "0.2.0", "b");
    } else {
        eprintln!("cut 7 landed before the rename: slot A boots");
        assert_intact(&g, "0.1.0", "a");
        // 8. Rebooting into the new slot: cut as its stage 1 starts (a try used up).
        let out = g.sh("keelctl update apply --reboot --no-wait");
        assert!(!out.contains("keelctl:"), "{out}");
        let (i, line) = g
            .wait_for_any(&[delta_line, "update-delta-fallback"], BOOT)
            .unwrap();
        assert_eq!(i, 0, "{line}");
        g.expect("update-rebooting", BOOT);
        g.expect("stage1: start", BOOT);
        eprintln!("cut 8 (rebooting into slot B)");
        g.kill().unwrap();
        drop(repo);
        drop(g);
        g = test_guest_uefi(&disk).spawn().unwrap();
        repo = RepoServer::serve(&g, REPO_PORT, &f.repo12).unwrap();
        g.expect("update-blessed: 0.2.0", BOOT);
        assert_intact(&g, "0.2.0", "b");
    }
    drop(repo);
    power_off(g);
    assert_slot_holds(&f.n, &disk, Slot::B, &f.n1);
    assert_slot_holds(&f.n, &disk, Slot::A, &f.n);
}
