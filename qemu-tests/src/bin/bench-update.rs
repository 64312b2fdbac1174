//! `bench-update`: what version bumps cost to ship and to apply, delta vs full, in one run.
//!
//! Builds the test image as N (0.1.0) and, each in a repository of its own beside N, one
//! version per kind of change:
//! - one system service added (a services file more in the root);
//! - sysd changed: the same sources with a build note compiled into sysd
//!   (`KEELSON_BUILD_NOTE`), the smallest change to its code, relinked with LTO as every release;
//! - the kernel package bumped: Debian's `linux-image-6.1.0-56-cloud-amd64` 6.1.192-2 replaced in
//!   a copy of the lock by the next security update (the newest `linux-image-*-cloud-amd64` the
//!   apt index has), which changes the UKI's kernel and initramfs and the modules in the root;
//! - everything rebuilt with a new seed (every UUID, salt and the verity tree differ: the
//!   worst case).
//!
//! Then prints
//! 1. per scenario, bytes on the wire: Keelson's full payload (gzip root + verity + one UKI)
//!    and its delta as the repository publishes it (the root's zstd `--patch-from` patch
//!    against N's root, made at image-build's default level, or for a node without one the
//!    chunk list + the chunks of the new root N lacks; + verity + the UKI's patch against N's),
//!    with the root and UKI parts apart; for the first scenario also the whole disk image, the
//!    raw root, and 4 KiB blocks (update_engine-style block copy, not built) for comparison;
//! 2. the node's costs, each in a child process (CPU time, peak RSS): indexing its running
//!    slot (the agent's chunker and index) and building the new root from its patch (the
//!    agent's decoder);
//! 3. under QEMU (TCG, UEFI), N -> N+1 (the service added, and sysd changed) with deltas off
//!    and on, side by side: the bytes the node downloaded (its `update-staged` event),
//!    `keelctl update apply` until staged (download, write, read-back verification, boot entry)
//!    and until the new version is blessed.
//!
//! Figures go to the benchmark history (`testkit::history`). Asserts nothing. Usage:
//! `./dev bench`, or `cargo run --release -p qemu-tests --bin bench-update`.

use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use keelson_common::update::chunking;
use keelson_testkit::history;
use qemu_tests::scenario::{test_guest_uefi, Httpd};
use qemu_tests::update::{self, Signing};
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

/// One scenario: N and another image in a repository of their own.
struct Scenario {
    name: String,
    version: String,
    repo: PathBuf,
    image: PathBuf,
}

/// What a node running N downloads for a scenario's version, full and by delta.
struct Bytes {
    full_root: u64,
    verity: u64,
    uki: u64,
    /// The chunk list and the chunks N lacks (stored).
    chunks_root: u64,
    /// The root's patch against N's, as published (at image-build's default level).
    root_patch: Option<u64>,
    uki_patch: Option<u64>,
    missing: usize,
    chunks: usize,
}

impl Bytes {
    fn full(&self) -> u64 {
        self.full_root + self.verity + self.uki
    }
    /// What the agent downloads: the root patch where there is one (it tries it first).
    fn delta(&self) -> u64 {
        self.root_patch.unwrap_or(self.chunks_root)
            + self.verity
            + self.uki_patch.unwrap_or(self.uki)
    }
    /// What it downloads by chunks (a node the repository has no root patch for).
    fn chunks_delta(&self) -> u64 {
        self.chunks_root + self.verity + self.uki_patch.unwrap_or(self.uki)
    }
}

/// The scenario version's manifest entry.
fn payload(s: &Scenario) -> Result<keelson_common::update::Payload> {
    update::manifest(&s.repo)
        .updates
        .into_iter()
        .find(|p| p.version == s.version)
        .context("the scenario's version is not in its repository")
}

fn bytes(s: &Scenario) -> Result<Bytes> {
    let p = payload(s)?;
    let list = update::chunk_list(&s.repo, &s.version);
    let new = update::new_chunks(&s.repo, "0.1.0", &s.version);
    let stored: u64 = new
        .iter()
        .filter_map(|sha| list.chunks.iter().find(|c| &c.sha256 == sha))
        .map(|c| c.stored)
        .sum();
    let len = |name: &str| file_len(&update::target_path(&s.repo, name));
    let list_len = len(&p.chunks.as_ref().context("no chunk list")?.target)?;
    let uki_patch = match p
        .uki_patches
        .iter()
        .find(|u| u.slot == "b" && u.from_version == "0.1.0")
    {
        Some(u) => Some(len(&u.target)?),
        None => None,
    };
    let root_patch = match root_patch_target(s)? {
        Some(t) => Some(len(&t)?),
        None => None,
    };
    Ok(Bytes {
        full_root: len(&p.root)?,
        verity: len(&p.verity)?,
        uki: len(&p.uki_b)?,
        chunks_root: list_len + stored,
        root_patch,
        uki_patch,
        missing: new.len(),
        chunks: list.chunks.len(),
    })
}

/// The scenario version's root patch against N's (its target name), if published.
fn root_patch_target(s: &Scenario) -> Result<Option<String>> {
    Ok(payload(s)?
        .root_patches
        .iter()
        .find(|r| r.from_version == "0.1.0")
        .map(|r| r.target.clone()))
}

/// `configs/` copied to `dir/name` (the test image's lock and services beside it, as
/// image-build expects), `edit` applied to the copy's `test.toml` and `test.lock` texts.
fn configs_copy(
    ws: &Path,
    dir: &Path,
    name: &str,
    edit: impl Fn(&str, String) -> Result<String>,
) -> Result<PathBuf> {
    fn copy(from: &Path, to: &Path) -> Result<()> {
        std::fs::create_dir_all(to)?;
        for e in std::fs::read_dir(from)? {
            let e = e?;
            if e.file_type()?.is_dir() {
                copy(&e.path(), &to.join(e.file_name()))?;
            } else {
                std::fs::copy(e.path(), to.join(e.file_name()))?;
            }
        }
        Ok(())
    }
    let out = dir.join(name);
    let _ = std::fs::remove_dir_all(&out);
    copy(&ws.join("configs"), &out)?;
    for file in ["test.toml", "test.lock"] {
        let path = out.join(file);
        let text = std::fs::read_to_string(&path)?;
        std::fs::write(&path, edit(file, text)?)?;
    }
    Ok(out.join("test.toml"))
}

/// The test config with its seed changed.
fn reseeded(file: &str, text: String) -> Result<String> {
    if file != "test.toml" {
        return Ok(text);
    }
    if !text.contains("seed = \"keelson-test\"") {
        bail!("configs/test.toml has no seed = \"keelson-test\" line to change");
    }
    Ok(text.replace(
        "seed = \"keelson-test\"",
        "seed = \"keelson-test-reseeded\"",
    ))
}

/// The lock's kernel package entry (`requested = "linux-image-cloud-amd64"`): name, version.
fn locked_kernel(lock: &str) -> Result<(String, String)> {
    let entry = lock
        .split("[[package]]")
        .find(|e| e.contains("requested = \"linux-image-cloud-amd64\""))
        .context("the lock pins no linux-image-cloud-amd64")?;
    let field = |key: &str| {
        entry
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{key} = \"")))
            .and_then(|v| v.strip_suffix('"'))
            .map(str::to_owned)
            .with_context(|| format!("the kernel's lock entry has no {key}"))
    };
    Ok((field("name")?, field("version")?))
}

/// The newest `linux-image-*-cloud-amd64` the apt index has other than `locked`: (name,
/// version, sha256), from `apt-cache`.
fn next_kernel(locked: &str) -> Result<(String, String, String)> {
    let out = Command::new("apt-cache")
        .args([
            "search",
            "--names-only",
            "^linux-image-[0-9.-]+-cloud-amd64$",
        ])
        .output()
        .context("apt-cache search")?;
    // The same series (linux-image-6.1.0-56-cloud-amd64 -> linux-image-6.1.0-NN-…), by ABI.
    let series = locked
        .rsplit_once('-')
        .and_then(|(head, _)| head.strip_suffix("-cloud"))
        .and_then(|head| head.rsplit_once('-'))
        .map(|(series, _)| format!("{series}-"))
        .with_context(|| format!("{locked} is not linux-image-<series>-<abi>-cloud-amd64"))?;
    let abi = |n: &str| -> u32 {
        n.strip_prefix(series.as_str())
            .and_then(|rest| rest.split('-').next())
            .and_then(|a| a.parse().ok())
            .unwrap_or(0)
    };
    let mut names: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .filter(|n| n != locked && n.starts_with(series.as_str()) && abi(n) > 0)
        .collect();
    names.sort_by_key(|n| abi(n));
    let name = names
        .pop()
        .context("the apt index has no other linux-image-*-cloud-amd64 (apt-get update?)")?;
    let show = Command::new("apt-cache")
        .args(["show", &name])
        .output()
        .context("apt-cache show")?;
    let text = String::from_utf8_lossy(&show.stdout);
    let first = text.split("\n\n").next().unwrap_or_default();
    let field = |key: &str| {
        first
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{key}: ")))
            .map(str::to_owned)
            .with_context(|| format!("apt-cache show {name}: no {key}"))
    };
    Ok((name.clone(), field("Version")?, field("SHA256")?))
}

/// Child mode (`bench-update --index ROOT`): indexes a root image as the agent indexes its
/// running slot (the chunker, one map entry per chunk) and prints the chunk count.
fn index_child(root: &Path) -> Result<()> {
    let mut index = std::collections::HashMap::new();
    for c in chunking::cut(std::io::BufReader::with_capacity(
        1 << 20,
        std::fs::File::open(root)?,
    )) {
        let c = c?;
        index
            .entry(c.sha256)
            .or_insert((c.offset, c.data.len() as u64));
    }
    println!("{}", index.len());
    Ok(())
}

/// Child mode (`bench-update --apply-patch REFERENCE PATCH SIZE`): builds a root from a root
/// patch as the agent does (`keelson_update::root_patch::apply`, the reference and the new root
/// in memory) and prints the new root's sha256.
fn apply_child(reference: &Path, patch: &Path, size: &str) -> Result<()> {
    let reference = std::fs::read(reference)?;
    let patch = std::fs::read(patch)?;
    let root = keelson_update::root_patch::apply(&reference, &patch, size.parse()?)?;
    println!("{}", hex(&sha(&root)));
    Ok(())
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Runs this program as a child with `args`: (CPU seconds, peak RSS in KiB, wall seconds, its
/// output).
fn measure_child(args: &[&std::ffi::OsStr]) -> Result<(f64, u64, f64, String)> {
    let t0 = std::time::Instant::now();
    let child = Command::new(std::env::current_exe()?)
        .args(args)
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let pid = child.id() as libc::pid_t;
    let mut out = String::new();
    child
        .stdout
        .context("the child's stdout")?
        .read_to_string(&mut out)?;
    let mut status = 0;
    let mut ru = unsafe_rusage();
    // SAFETY: wait4 on our own child's pid, writing into the status and rusage it is given.
    let rc = unsafe { libc::wait4(pid, &mut status, 0, &mut ru) };
    if rc != pid || status != 0 {
        bail!("the child {args:?} failed (wait4 {rc}, status {status})");
    }
    let cpu = ru.ru_utime.tv_sec as f64
        + ru.ru_utime.tv_usec as f64 / 1e6
        + ru.ru_stime.tv_sec as f64
        + ru.ru_stime.tv_usec as f64 / 1e6;
    Ok((cpu, ru.ru_maxrss as u64, t0.elapsed().as_secs_f64(), out))
}

/// Runs the index child on `root`: (CPU seconds, peak RSS in KiB, wall seconds, chunks).
fn measure_index(root: &Path) -> Result<(f64, u64, f64, usize)> {
    let (cpu, rss, wall, out) = measure_child(&["--index".as_ref(), root.as_os_str()])?;
    let chunks = out.trim().parse().context("the index child's output")?;
    Ok((cpu, rss, wall, chunks))
}

fn kib(b: u64) -> String {
    format!("{:.1}", b as f64 / 1024.0)
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    match &args[..] {
        [_, flag, root] if flag == "--index" => return index_child(Path::new(root)),
        [_, flag, reference, patch, size] if flag == "--apply-patch" => {
            return apply_child(Path::new(reference), Path::new(patch), size)
        }
        _ => {}
    }
    let ws = workspace_root();
    let dir = ws.join("target/bench-update");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let signing = Signing::new(&dir);
    let extra = dir.join("extra.toml");
    std::fs::write(
        &extra,
        "version = 1\n[services.hello]\nimage = \"/usr/lib/keelson/images/base\"\ncommand = [\"sh\", \"-c\", \"trap 'exit 0' TERM; while :; do sleep 60 & wait $!; done\"]\n",
    )?;
    eprintln!("building N and one version per kind of change ...");
    let n = signing.image("0.1.0", None, &[]);
    let service_added = signing.image("0.2.0", Some(&extra), &[]);
    let build = |config: &Path, version: &str, env: &[(&str, &str)]| -> Result<PathBuf> {
        let out = dir.join(format!(
            "{version}-{}",
            config
                .parent()
                .and_then(|p| p.file_name())
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        ));
        let mut c = Command::new(&signing.image_build);
        c.current_dir(&ws)
            .args(["-q", "build"])
            .arg(config)
            .args(["--version", version, "--trusted-root"])
            .arg(&signing.root)
            .arg("--out")
            .arg(&out);
        for (k, v) in env {
            c.env(k, v);
        }
        run(&mut c)?;
        Ok(out)
    };
    // The build note changes sysd's bytes (cargo rebuilds it when the variable changes, and
    // again without it at the next ordinary build).
    let sysd_changed = build(
        &ws.join("configs/test.toml"),
        "0.3.0",
        &[("KEELSON_BUILD_NOTE", "bench-update: sysd changed")],
    )?;
    let lock = std::fs::read_to_string(ws.join("configs/test.lock"))?;
    let (kernel, kernel_version) = locked_kernel(&lock)?;
    let (next, next_version, next_sha) = next_kernel(&kernel)?;
    let old_sha = lock
        .split("[[package]]")
        .find(|e| e.contains(&format!("name = \"{kernel}\"")))
        .and_then(|e| e.lines().find_map(|l| l.strip_prefix("sha256 = \"")))
        .and_then(|v| v.strip_suffix('"'))
        .context("the kernel's lock entry has no sha256")?
        .to_owned();
    let kernel_bumped = build(
        &configs_copy(&ws, &dir, "configs-kernel", |file, text| {
            Ok(if file == "test.lock" {
                text.replace(
                    &format!("name = \"{kernel}\""),
                    &format!("name = \"{next}\""),
                )
                .replace(
                    &format!("version = \"{kernel_version}\"\nsha256 = \"{old_sha}\""),
                    &format!("version = \"{next_version}\"\nsha256 = \"{next_sha}\""),
                )
            } else {
                text
            })
        })?,
        "0.4.0",
        &[],
    )?;
    let reseeded = build(
        &configs_copy(&ws, &dir, "configs-reseeded", reseeded)?,
        "0.5.0",
        &[],
    )?;
    let kernel_scenario = format!("kernel package bumped ({kernel_version} -> {next_version})");
    let mut scenarios = Vec::new();
    for (name, version, image) in [
        ("one system service added", "0.2.0", &service_added),
        ("sysd changed", "0.3.0", &sysd_changed),
        (kernel_scenario.as_str(), "0.4.0", &kernel_bumped),
        ("everything rebuilt with a new seed", "0.5.0", &reseeded),
    ] {
        let repo = dir.join(format!("repo-{version}"));
        // As a release is published: root patches at image-build's default level.
        signing.add_with(&repo, &n, &[], &[]);
        signing.add_with(&repo, image, &[], &[]);
        scenarios.push(Scenario {
            name: name.to_owned(),
            version: version.into(),
            repo,
            image: image.clone(),
        });
    }

    // 1. Bytes.
    println!("\n## Update download, N -> the scenario's version, full vs delta (KiB)\n");
    println!("The agent downloads the root's patch against N's where the repository has one, else the chunks N lacks (both columns shown).\n");
    println!("| scenario | full payload | delta | delta / full | by chunks instead | root: gzip / patch / chunks (new of all) | UKI: whole / patch | verity |");
    println!("|---|---:|---:|---:|---:|---|---|---:|");
    let mut measured = Vec::new();
    for s in &scenarios {
        let b = bytes(s)?;
        println!(
            "| {} | {} | {} | {:.1} % | {} = {:.1} % | {} / {} / {} ({} of {}) | {} / {} | {} |",
            s.name,
            kib(b.full()),
            kib(b.delta()),
            100.0 * b.delta() as f64 / b.full() as f64,
            kib(b.chunks_delta()),
            100.0 * b.chunks_delta() as f64 / b.full() as f64,
            kib(b.full_root),
            b.root_patch.map_or("none".into(), kib),
            kib(b.chunks_root),
            b.missing,
            b.chunks,
            kib(b.uki),
            b.uki_patch.map_or("none".into(), kib),
            kib(b.verity)
        );
        let fig = |name: String, unit: &str, v: f64| {
            history::record(history::Figure::from_samples(
                "bench-update",
                &name,
                unit,
                true,
                &[v],
            ))
        };
        fig(
            format!("delta download, {}", s.name),
            "KiB",
            b.delta() as f64 / 1024.0,
        )?;
        fig(
            format!("delta / full download, {}", s.name),
            "%",
            100.0 * b.delta() as f64 / b.full() as f64,
        )?;
        fig(
            format!("delta by chunks / full download, {}", s.name),
            "%",
            100.0 * b.chunks_delta() as f64 / b.full() as f64,
        )?;
        measured.push(b);
    }

    // The first scenario beside what other updaters send.
    let b = &measured[0];
    let s = &scenarios[0];
    let disk_qcow2 = file_len(&s.image.join("disk.qcow2"))?;
    let root_raw = file_len(&s.image.join("root.erofs"))?;
    let old = std::fs::read(n.join("root.erofs"))?;
    let new = std::fs::read(s.image.join("root.erofs"))?;
    let (blk_raw, blk_gz) = delta(&old, &new, blocks)?;
    let (cdc_raw, cdc_gz) = delta(&old, &new, cdc)?;
    println!("\n## {} beside other schemes\n", s.name);
    println!("| what is sent | KiB | vs full disk image | vs Keelson full payload |");
    println!("|---|---:|---:|---:|");
    let row = |what: &str, v: u64| {
        println!(
            "| {what} | {} | {:.3} | {:.3} |",
            kib(v),
            v as f64 / disk_qcow2 as f64,
            v as f64 / b.full() as f64
        )
    };
    row(
        "whole disk image (qcow2, what a disk-image flasher ships)",
        disk_qcow2,
    );
    row(
        "raw root image + UKI (uncompressed image copy)",
        root_raw + b.uki,
    );
    row(
        "Keelson full payload (gzip root + verity + one UKI)",
        b.full(),
    );
    row(
        "4 KiB blocks missing from N (gzip) + verity + UKI patch (not built)",
        blk_gz + b.verity + b.uki_patch.unwrap_or(b.uki),
    );
    row(
        "Keelson delta by chunks (chunk list + missing chunks, zstd + verity + UKI patch)",
        b.chunks_delta(),
    );
    row(
        "**Keelson delta** (root patch + verity + UKI patch)",
        b.delta(),
    );
    println!(
        "\nraw bytes not in N: {} KiB by 4 KiB blocks, {} KiB by chunks (gzip {} / {} KiB)",
        blk_raw >> 10,
        cdc_raw >> 10,
        blk_gz >> 10,
        cdc_gz >> 10
    );

    // 2. Indexing the running slot, in a child process.
    let mut idx = Vec::new();
    for _ in 0..3 {
        idx.push(measure_index(&n.join("root.erofs"))?);
    }
    println!(
        "\n## Indexing the running slot (N's {} KiB root, on the host, 3 runs)\n",
        old.len() >> 10
    );
    println!("| run | CPU s | wall s | peak RSS (MiB) | chunks |");
    println!("|---:|---:|---:|---:|---:|");
    for (i, (cpu, rss, wall, chunks)) in idx.iter().enumerate() {
        println!(
            "| {} | {cpu:.3} | {wall:.3} | {:.1} | {chunks} |",
            i + 1,
            *rss as f64 / 1024.0
        );
    }
    history::record(history::Figure::from_samples(
        "bench-update",
        "indexing N's root, CPU",
        "s",
        true,
        &idx.iter().map(|r| r.0).collect::<Vec<_>>(),
    ))?;
    history::record(history::Figure::from_samples(
        "bench-update",
        "indexing N's root, peak RSS",
        "MiB",
        true,
        &idx.iter().map(|r| r.1 as f64 / 1024.0).collect::<Vec<_>>(),
    ))?;

    // Building the new root from a root patch, as the agent does, in a child process.
    println!(
        "\n## Building the new root from its patch against N's (N's {} KiB root as the reference, on the host, 3 runs each)\n",
        old.len() >> 10
    );
    println!("| scenario | patch (KiB) | CPU s (min) | wall s (min) | peak RSS (MiB, max) |");
    println!("|---|---:|---:|---:|---:|");
    for s in &scenarios {
        let Some(target) = root_patch_target(s)? else {
            println!("| {} | none published | | | |", s.name);
            continue;
        };
        let patch = update::target_path(&s.repo, &target);
        let new_root = s.image.join("root.erofs");
        let want = hex(&sha(&std::fs::read(&new_root)?));
        let size = file_len(&new_root)?.to_string();
        let mut runs = Vec::new();
        for _ in 0..3 {
            let (cpu, rss, wall, out) = measure_child(&[
                "--apply-patch".as_ref(),
                n.join("root.erofs").as_os_str(),
                patch.as_os_str(),
                size.as_ref(),
            ])?;
            if out.trim() != want {
                bail!("{target} applied to N's root is not {}'s root", s.version);
            }
            runs.push((cpu, rss, wall));
        }
        let min = |f: fn(&(f64, u64, f64)) -> f64| runs.iter().map(f).fold(f64::INFINITY, f64::min);
        let rss = runs.iter().map(|r| r.1).max().unwrap_or(0);
        println!(
            "| {} | {} | {:.3} | {:.3} | {:.1} |",
            s.name,
            kib(file_len(&patch)?),
            min(|r| r.0),
            min(|r| r.2),
            rss as f64 / 1024.0
        );
        history::record(history::Figure::from_samples(
            "bench-update",
            &format!("root patch applied, CPU, {}", s.name),
            "s",
            true,
            &runs.iter().map(|r| r.0).collect::<Vec<_>>(),
        ))?;
    }

    // 3. Under QEMU, deltas off and on, the two nodes side by side (the same load for both).
    for s in &scenarios[..2] {
        eprintln!(
            "applying N -> {} ({}) under QEMU, full and delta ...",
            s.version, s.name
        );
        let runs: Vec<(&str, Result<Applied>)> = std::thread::scope(|scope| {
            let handles: Vec<_> = [("full", 0u8), ("delta", 70u8)]
                .into_iter()
                .map(|(mode, percent)| {
                    let (dir, n) = (&dir, &n);
                    (
                        mode,
                        scope.spawn(move || apply_under_qemu(dir, n, s, mode, percent)),
                    )
                })
                .collect();
            handles
                .into_iter()
                .map(|(mode, h)| {
                    (
                        mode,
                        h.join()
                            .unwrap_or_else(|_| Err(anyhow::anyhow!("panicked"))),
                    )
                })
                .collect()
        });
        println!(
            "\n## Apply N -> {} ({}) under QEMU (TCG, UEFI, test image; both nodes at once), full vs delta\n",
            s.version, s.name
        );
        println!("| mode | downloaded (KiB, the node's count) | apply until staged (s) | apply until blessed (s) |");
        println!("|---|---:|---:|---:|");
        let mut done = Vec::new();
        for (mode, r) in runs {
            let (kib, staged, blessed) = r?;
            println!("| {mode} | {kib} | {staged:.1} | {blessed:.1} |");
            history::record(history::Figure::from_samples(
                "bench-update",
                &format!("QEMU apply until staged, {}, {mode}", s.name),
                "s",
                true,
                &[staged],
            ))?;
            done.push((kib, staged));
        }
        if let [(full, fs), (delta, ds)] = done[..] {
            println!(
                "\ndelta downloads {:.1} % of the full payload; staged in {:.2}x the full update's time",
                100.0 * delta as f64 / full.max(1) as f64,
                ds / fs.max(0.001)
            );
        }
    }
    Ok(())
}

/// KiB downloaded, seconds until staged, seconds until blessed.
type Applied = (u64, f64, f64);

fn unsafe_rusage() -> libc::rusage {
    // SAFETY: rusage is plain integers; all zeros is a valid value.
    unsafe { std::mem::zeroed() }
}

/// Boots N from a fresh overlay, applies the scenario's version with `delta_max_percent =
/// percent`; returns the KiB downloaded (from `update-staged`), seconds until staged and until
/// that version is blessed.
fn apply_under_qemu(
    dir: &Path,
    n: &Path,
    s: &Scenario,
    mode: &str,
    percent: u8,
) -> Result<Applied> {
    let repo = &s.repo;
    let disk = dir.join(format!("node-{}-{mode}.qcow2", s.version));
    create_overlay(&n.join("disk.raw"), &disk, Some(2 << 30))?;
    let g = test_guest_uefi(&disk).spawn()?;
    let httpd = Httpd::serve(
        g.netns(),
        SocketAddr::from((Ipv4Addr::LOCALHOST, REPO_PORT)),
        repo,
    )?;
    let result = (|| -> Result<Applied> {
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
        let blessed = g
            .wait_for_match(&[&format!("update-blessed: {}", s.version)], BOOT)?
            .at;
        Ok((
            kib,
            staged.at.saturating_sub(t0).as_secs_f64(),
            blessed.saturating_sub(t0).as_secs_f64(),
        ))
    })();
    drop(httpd);
    result.map_err(|e| anyhow::anyhow!("{e:#}\n{}", g.serial_tail(60)))
}
