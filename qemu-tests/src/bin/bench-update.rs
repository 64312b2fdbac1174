//! `bench-update`: what a typical version bump costs to ship and to apply, in one run.
//!
//! Builds the test image as N (0.1.0) and N+1 (0.2.0 with one more system service: one piece of
//! the root changed), adds both to a fresh TUF repository, then prints
//! 1. bytes on the wire: the whole disk image and the raw root (what image-copy updaters send),
//!    Keelson's full payload (gzip root + verity + one UKI), and what two delta schemes would
//!    send against the running slot: content-defined chunks (the design in ARCHITECTURE.md) and
//!    4 KiB blocks, each compressed the same way, as ratios to the full image;
//! 2. time under QEMU (TCG, UEFI): `keelctl update apply` until staged (download, write,
//!    read-back verification, boot entry) and until N+1 is blessed after its reboot.
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

/// Content-defined chunks (a gear rolling hash, FastCDC's cut condition without its
/// normalisation): 16 KiB minimum, ~32 KiB average, 64 KiB maximum.
fn cdc(data: &[u8]) -> Vec<&[u8]> {
    let mut gear = [0u64; 256];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for g in gear.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *g = x;
    }
    const MIN: usize = 16 << 10;
    const MAX: usize = 64 << 10;
    const MASK: u64 = (1 << 15) - 1;
    let mut out = Vec::new();
    let mut start = 0;
    while start < data.len() {
        let end = (start + MAX).min(data.len());
        let mut h: u64 = 0;
        let mut cut = end;
        let mut i = start + MIN.min(end - start);
        while i < end {
            h = (h << 1).wrapping_add(gear[data[i] as usize]);
            if h & MASK == 0 {
                cut = i + 1;
                break;
            }
            i += 1;
        }
        out.push(&data[start..cut]);
        start = cut;
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
    let (cdc_raw, cdc_gz) = delta(&old, &new, cdc)?;
    let (blk_raw, blk_gz) = delta(&old, &new, blocks)?;
    let cdc_total = cdc_gz + verity + uki;
    let blk_total = blk_gz + verity + uki;
    // The UKIs differ only in .osrel and .cmdline: chunking them against the node's own UKI
    // (on its ESP) leaves almost nothing to send.
    let old_uki = std::fs::read(n.join("keelson_0.1.0+3.efi"))?;
    let new_uki = std::fs::read(n1.join("uki-slot-b.efi"))?;
    let (_, uki_cdc_gz) = delta(&old_uki, &new_uki, cdc)?;
    let full_delta = cdc_gz + verity + uki_cdc_gz;

    println!("\n## Update download for a version bump (N -> N+1: one system service added)\n");
    println!("| what is sent | bytes | MiB | vs full disk image |");
    println!("|---|---:|---:|---:|");
    let row = |what: &str, b: u64| {
        println!(
            "| {what} | {b} | {:.1} | {:.3} |",
            b as f64 / 1048576.0,
            b as f64 / disk_qcow2 as f64
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
        "delta: content-defined chunks missing from N (gzip) + verity + UKI",
        cdc_total,
    );
    row(
        "delta: 4 KiB blocks missing from N (gzip) + verity + UKI",
        blk_total,
    );
    row(
        "delta: CDC on root and UKI (against the node's own UKI) + verity",
        full_delta,
    );
    println!(
        "\nchunks of N+1's root not in N: CDC {} KiB of {} KiB raw, 4 KiB blocks {} KiB; the UKI ({} KiB) is always whole: the kernel and initramfs did not change but the UKI carries the new root hash",
        cdc_raw >> 10,
        new.len() >> 10,
        blk_raw >> 10,
        uki >> 10
    );
    for (what, d) in [("root only", cdc_total), ("root and UKI", full_delta)] {
        println!(
            "bytes saved by the CDC delta ({what}) vs the full payload: {} KiB ({:.0} %)",
            (payload.saturating_sub(d)) >> 10,
            100.0 * (payload.saturating_sub(d)) as f64 / payload as f64
        );
    }

    // Time under QEMU.
    let disk = dir.join("node.qcow2");
    create_overlay(&n.join("disk.raw"), &disk, Some(2 << 30))?;
    let g = test_guest_uefi(&disk).spawn()?;
    let httpd = Httpd::serve(
        g.netns(),
        SocketAddr::from((Ipv4Addr::LOCALHOST, REPO_PORT)),
        &repo,
    )?;
    let result = (|| -> Result<(f64, f64)> {
        g.wait_for("update-blessed: 0.1.0", BOOT)?;
        g.try_sh(
            &format!("printf 'version = 1\\n[update]\\nrepository = \"http://10.0.2.2:{REPO_PORT}/\"\\n' > /tmp/u.toml && keelctl apply /tmp/u.toml"),
        )?;
        let t0 = g.spawned_at().elapsed();
        let out = g.try_sh("keelctl update apply --reboot --no-wait")?;
        if out.contains("keelctl:") {
            bail!("apply: {out}");
        }
        let staged = g.wait_for_match(&["update-staged"], BOOT)?.at;
        let blessed = g.wait_for_match(&["update-blessed: 0.2.0"], BOOT)?.at;
        Ok((
            staged.saturating_sub(t0).as_secs_f64(),
            blessed.saturating_sub(t0).as_secs_f64(),
        ))
    })();
    drop(httpd);
    let (staged, blessed) = result.map_err(|e| anyhow::anyhow!("{e:#}\n{}", g.serial_tail(60)))?;
    println!("\n## Apply under QEMU (TCG, UEFI, 1 GiB, test image)\n");
    println!("| step | seconds |");
    println!("|---|---:|");
    println!("| `keelctl update apply` until staged (TUF refresh, download, write, read-back verity, UKI) | {staged:.1} |");
    println!(
        "| apply until N+1 blessed (including the reboot and the health gate) | {blessed:.1} |"
    );
    Ok(())
}
