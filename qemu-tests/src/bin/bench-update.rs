//! `bench-update`: what a typical version bump costs to ship and to apply, in one run.
//!
//! Builds the test image as N (0.1.0) and N+1 (0.2.0 with one more system service: one piece of
//! the root changed), adds both to a fresh TUF repository, then prints
//! 1. bytes on the wire: the whole disk image and the raw root (what image-copy updaters send),
//!    Keelson's full payload (gzip root + verity + one UKI), Keelson's delta as the repository
//!    publishes it (chunk list + the chunks of N+1 that N lacks, zstd, + verity + the UKI's
//!    `--patch-from` patch against N's), and two
//!    schemes not built, for comparison: 4 KiB blocks (update_engine-style block copy) and the
//!    delta with the UKI chunked against the node's own; as ratios to the full image;
//! 2. the node's cost of indexing its running slot (here on the host: CPU time, index size);
//! 3. under QEMU (TCG, UEFI), once with deltas off and once on, side by side: the bytes the
//!    node downloaded (its `update-staged` event), `keelctl update apply` until staged
//!    (download, write, read-back verification, boot entry) and until N+1 is blessed.
//!
//! Asserts nothing. Usage: `./dev bench`, or `cargo run --release -p qemu-tests --bin
//! bench-update`.

use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use keelson_common::update::{chunking, ChunkList};
use qemu_tests::scenario::{image_build, test_guest_uefi, Httpd};
use qemu_tests::{create_overlay, workspace_root};

const BOOT: Duration = Duration::from_secs(400);
const REPO_PORT: u16 = 8000;

fn run(cmd: &mut Command) -> Result<()> {
    let out = cmd.output().with_context(|| format!("{cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

fn gzip_len(data: &[u8]) -> Result<u64> {
    let mut out = Command::new("gzip")
        .args(["-9", "-c"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("gzip")?;
    let mut stdin = out.stdin.take().context("gzip stdin")?;
    let owned = data.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&owned));
    let mut buf = Vec::new();
    out.stdout
        .take()
        .context("gzip stdout")?
        .read_to_end(&mut buf)?;
    writer
        .join()
        .map_err(|_| anyhow::anyhow!("gzip writer"))??;
    out.wait()?;
    Ok(buf.len() as u64)
}

/// Chunks as nodes and repositories cut them (FastCDC 2020, 16/32/64 KiB).
fn cdc(data: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    let mut at = 0;
    for c in chunking::cut(data) {
        let len = c.map(|c| c.data.len()).unwrap_or(0);
        out.push(&data[at..at + len]);
        at += len;
    }
    out
}

fn sha(b: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(b).into()
}

/// Bytes of `new` not found in `old` under a chunking, and those bytes gzip-compressed.
fn delta(old: &[u8], new: &[u8], chunker: fn(&[u8]) -> Vec<&[u8]>) -> Result<(u64, u64)> {
    let have: HashSet<[u8; 32]> = chunker(old).into_iter().map(sha).collect();
    let mut missing = Vec::new();
    for c in chunker(new) {
        if !have.contains(&sha(c)) {
            missing.extend_from_slice(c);
        }
    }
    Ok((missing.len() as u64, gzip_len(&missing)?))
}

fn blocks(data: &[u8]) -> Vec<&[u8]> {
    data.chunks(4096).collect()
}

fn file_len(p: &Path) -> Result<u64> {
    Ok(std::fs::metadata(p)
        .with_context(|| p.display().to_string())?
        .len())
}

fn main() -> Result<()> {
    let ws = workspace_root();
    let dir = ws.join("target/bench-update");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let ib = image_build()?;
    let key = dir.join("key.pk8");
    let root = dir.join("root.json");
    run(Command::new(&ib).args(["update", "keygen"]).arg(&key))?;
    run(Command::new(&ib)
        .args(["update", "root", "--key"])
        .arg(&key)
        .arg("--out")
        .arg(&root))?;
    let extra = dir.join("extra.toml");
    std::fs::write(
        &extra,
        "version = 1\n[services.hello]\nimage = \"/usr/lib/keelson/images/base\"\ncommand = [\"sh\", \"-c\", \"trap 'exit 0' TERM; while :; do sleep 60 & wait $!; done\"]\n",
    )?;
    let build = |v: &str, extra: Option<&Path>| -> Result<PathBuf> {
        let out = dir.join(v);
        let mut c = Command::new(&ib);
        c.current_dir(&ws)
            .args([
                "-q",
                "build",
                "configs/test.toml",
                "--version",
                v,
                "--trusted-root",
            ])
            .arg(&root)
            .arg("--out")
            .arg(&out);
        if let Some(e) = extra {
            c.arg("--extra-services").arg(e);
        }
        run(&mut c)?;
        Ok(out)
    };
    eprintln!("building N and N+1 ...");
    let n = build("0.1.0", None)?;
    let n1 = build("0.2.0", Some(&extra))?;
    let repo = dir.join("repo");
    for img in [&n, &n1] {
        run(Command::new(&ib)
            .args(["-q", "update", "add", "--repo"])
            .arg(&repo)
            .arg("--root")
            .arg(&root)
            .arg("--key")
            .arg(&key)
            .arg(img))?;
    }
    let target = |suffix: &str| -> Result<u64> {
        for e in std::fs::read_dir(repo.join("targets"))? {
            let p = e?.path();
            if p.to_string_lossy().ends_with(suffix) {
                return file_len(&p);
            }
        }
        bail!("no target {suffix}")
    };
    let disk_qcow2 = file_len(&n1.join("disk.qcow2"))?;
    let root_raw = file_len(&n1.join("root.erofs"))?;
    let verity = target("test-0.2.0-root.verity")?;
    let uki = target("test-0.2.0-uki-b.efi")?;
    let payload = target("test-0.2.0-root.erofs.gz")? + verity + uki;
    let old = std::fs::read(n.join("root.erofs"))?;
    let new = std::fs::read(n1.join("root.erofs"))?;
    // The delta as published: what a node running N downloads for N+1 (it indexes its slot
    // with the same chunker, so it has exactly N's chunks).
    let list = |v: &str| -> Result<(ChunkList, u64)> {
        let name = format!("test-{v}-root.chunks.json");
        for e in std::fs::read_dir(repo.join("targets"))? {
            let p = e?.path();
            if p.to_string_lossy().ends_with(&format!(".{name}")) {
                let bytes = std::fs::read(&p)?;
                return Ok((serde_json::from_slice(&bytes)?, bytes.len() as u64));
            }
        }
        bail!("no {name} in the repository")
    };
    let (list_n, _) = list("0.1.0")?;
    let (list_n1, list_len) = list("0.2.0")?;
    let have: HashSet<&str> = list_n.chunks.iter().map(|c| c.sha256.as_str()).collect();
    let mut fetched = HashSet::new();
    let (mut missing_raw, mut missing_stored, mut missing_count) = (0u64, 0u64, 0usize);
    for c in &list_n1.chunks {
        if !have.contains(c.sha256.as_str()) && fetched.insert(c.sha256.as_str()) {
            missing_raw += c.length;
            missing_stored += c.stored;
            missing_count += 1;
        }
    }
    let uki_patch = target("test-0.2.0-uki-b.from-0.1.0.zst")?;
    let delta_total = list_len + missing_stored + verity + uki_patch;
    let (blk_raw, blk_gz) = delta(&old, &new, blocks)?;
    let blk_total = blk_gz + verity + uki;
    // The UKIs differ only in .osrel and .cmdline: chunking them against the node's own UKI
    // (on its ESP) would leave almost nothing to send (not built).
    let old_uki = std::fs::read(n.join("keelson_0.1.0+3.efi"))?;
    let new_uki = std::fs::read(n1.join("uki-slot-b.efi"))?;
    let (_, uki_cdc_gz) = delta(&old_uki, &new_uki, cdc)?;
    let with_uki = list_len + missing_stored + verity + uki_cdc_gz;

    println!("\n## Update download for a version bump (N -> N+1: one system service added)\n");
    println!("| what is sent | bytes | MiB | vs full disk image | vs Keelson full payload |");
    println!("|---|---:|---:|---:|---:|");
    let row = |what: &str, b: u64| {
        println!(
            "| {what} | {b} | {:.2} | {:.3} | {:.3} |",
            b as f64 / 1048576.0,
            b as f64 / disk_qcow2 as f64,
            b as f64 / payload as f64
        )
    };
    row(
        "whole disk image (qcow2, what a disk-image flasher ships)",
        disk_qcow2,
    );
    row(
        "raw root image + UKI (uncompressed image copy, e.g. Mender full rootfs)",
        root_raw + uki,
    );
    row(
        "Keelson full payload (gzip root + verity + one UKI)",
        payload,
    );
    row(
        "**Keelson delta** (chunk list + missing chunks, zstd + verity + UKI patch)",
        delta_total,
    );
    row(
        "not built: 4 KiB blocks missing from N (gzip) + verity + UKI",
        blk_total,
    );
    row(
        "the same with the UKI chunked against the node's own instead of patched (not built)",
        with_uki,
    );
    println!(
        "\nchunks of N+1's root not in N: {missing_count} of {} ({} KiB of {} KiB raw, {} KiB stored); 4 KiB blocks not in N: {} KiB; chunk list {} KiB; verity {} KiB; UKI {} KiB whole, its patch against N's {} B",
        list_n1.chunks.len(),
        missing_raw >> 10,
        new.len() >> 10,
        missing_stored >> 10,
        blk_raw >> 10,
        list_len >> 10,
        verity >> 10,
        uki >> 10,
        uki_patch
    );

    // The node's cost of indexing its running slot (the same code, on the host's CPU).
    let cpu = || {
        let mut ru: libc::rusage = unsafe_rusage();
        // SAFETY: getrusage writes into the struct it is given.
        unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
        ru.ru_utime.tv_sec as f64 + ru.ru_utime.tv_usec as f64 / 1e6
    };
    let (c0, t0) = (cpu(), std::time::Instant::now());
    let mut entries = 0usize;
    for c in chunking::cut(std::io::BufReader::new(std::fs::File::open(
        n.join("root.erofs"),
    )?)) {
        c?;
        entries += 1;
    }
    let (cpu_s, wall_s) = (cpu() - c0, t0.elapsed().as_secs_f64());
    println!(
        "\n## Indexing the running slot (N's {} KiB root, on the host)\n",
        old.len() >> 10
    );
    println!("| CPU s | wall s | chunks | index in memory (KiB, 48 B a chunk) | buffer (KiB) |");
    println!("|---:|---:|---:|---:|---:|");
    println!(
        "| {cpu_s:.3} | {wall_s:.3} | {entries} | {} | 1088 |",
        entries * 48 / 1024
    );

    // Under QEMU, deltas off and on.
    let mut runs = Vec::new();
    for (mode, percent) in [("full", 0u8), ("delta", 70u8)] {
        eprintln!("applying N -> N+1 under QEMU ({mode}) ...");
        runs.push((mode, apply_under_qemu(&dir, &n, &repo, mode, percent)?));
    }
    println!("\n## Apply N -> N+1 under QEMU (TCG, UEFI, 1 GiB, test image), full vs delta\n");
    println!("| mode | downloaded (KiB, the node's count) | apply until staged (s) | apply until N+1 blessed (s) |");
    println!("|---|---:|---:|---:|");
    for (mode, (kib, staged, blessed)) in &runs {
        println!("| {mode} | {kib} | {staged:.1} | {blessed:.1} |");
    }
    if let [(_, (full, ..)), (_, (delta, ..))] = &runs[..] {
        println!(
            "\ndelta downloads {:.1} % of the full payload",
            100.0 * *delta as f64 / (*full).max(1) as f64
        );
    }
    Ok(())
}

fn unsafe_rusage() -> libc::rusage {
    // SAFETY: rusage is plain integers; all zeros is a valid value.
    unsafe { std::mem::zeroed() }
}

/// Boots N from a fresh overlay, applies N+1 with `delta_max_percent = percent`; returns the
/// KiB downloaded (from `update-staged`), seconds until staged and until N+1 is blessed.
fn apply_under_qemu(
    dir: &Path,
    n: &Path,
    repo: &Path,
    mode: &str,
    percent: u8,
) -> Result<(u64, f64, f64)> {
    let disk = dir.join(format!("node-{mode}.qcow2"));
    create_overlay(&n.join("disk.raw"), &disk, Some(2 << 30))?;
    let g = test_guest_uefi(&disk).spawn()?;
    let httpd = Httpd::serve(
        g.netns(),
        SocketAddr::from((Ipv4Addr::LOCALHOST, REPO_PORT)),
        repo,
    )?;
    let result = (|| -> Result<(u64, f64, f64)> {
        g.wait_for("update-blessed: 0.1.0", BOOT)?;
        g.try_sh(
            &format!("printf 'version = 1\\n[update]\\nrepository = \"http://10.0.2.2:{REPO_PORT}/\"\\ndelta_max_percent = {percent}\\n' > /tmp/u.toml && keelctl apply /tmp/u.toml"),
        )?;
        let t0 = g.spawned_at().elapsed();
        let out = g.try_sh("keelctl update apply --reboot --no-wait")?;
        if out.contains("keelctl:") {
            bail!("apply: {out}");
        }
        let staged = g.wait_for_match(&["update-staged"], BOOT)?;
        let kib = staged
            .line
            .split("(downloaded ")
            .nth(1)
            .and_then(|r| r.split(' ').next())
            .and_then(|k| k.parse().ok())
            .with_context(|| format!("no download size in {:?}", staged.line))?;
        let blessed = g.wait_for_match(&["update-blessed: 0.2.0"], BOOT)?.at;
        Ok((
            kib,
            staged.at.saturating_sub(t0).as_secs_f64(),
            blessed.saturating_sub(t0).as_secs_f64(),
        ))
    })();
    drop(httpd);
    result.map_err(|e| anyhow::anyhow!("{e:#}\n{}", g.serial_tail(60)))
}
