//! Remote `keelctl ps` against local: the latency of one whole `keelctl ps` (process start,
//! connect, request, table) on the unix socket and over mutual TLS (`--node`, a fresh TCP +
//! TLS 1.3 handshake with ECDSA P-256 certificates from `keelctl pki` each time), median and
//! p90 of N runs, with 10 services running. A real sysd (the `sysd` next to this binary, or
//! `$KEELSON_SYSD`) in its own network and mount namespaces, `[api.remote]` on 127.0.0.1:50000
//! there; keelctl (`keelctl` next to this binary, or `$KEELSON_KEELCTL`) runs in that namespace
//! through `nsenter`, both ways alike. Needs root and /bin/busybox. Prints a table; asserts
//! nothing about time (the machines are shared).

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use keelson_testkit::daemon::Daemon;
use keelson_testkit::{busybox, stats};

const SERVICES: usize = 10;
const RUNS: usize = 30;

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench-remote: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn sibling(env: &str, name: &str) -> Result<PathBuf> {
    let path = match std::env::var_os(env) {
        Some(p) => PathBuf::from(p),
        None => std::env::current_exe()?.with_file_name(name),
    };
    if !path.exists() {
        bail!("{} missing (build it, or set {env})", path.display());
    }
    Ok(path)
}

fn run() -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("needs root");
    }
    let sysd = sibling("KEELSON_SYSD", "sysd")?;
    let keelctl = sibling("KEELSON_KEELCTL", "keelctl")?;
    let dir =
        Scratch(std::env::temp_dir().join(format!("keelson-bench-remote-{}", std::process::id())));
    std::fs::create_dir_all(dir.path())?;
    let pki = dir.path().join("pki");
    let p = pki.display().to_string();
    for args in [
        vec!["pki", "init", "--dir", &p],
        vec![
            "pki", "issue", "--dir", &p, "--role", "reader", "--name", "bench",
        ],
        vec![
            "pki",
            "issue",
            "--dir",
            &p,
            "--node",
            "node",
            "--ip",
            "127.0.0.1",
        ],
    ] {
        let out = Command::new(&keelctl).args(&args).output()?;
        if !out.status.success() {
            bail!("keelctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
    }
    let rootfs = dir.path().join("rootfs");
    busybox::rootfs(&rootfs).context("busybox rootfs")?;
    std::fs::create_dir_all(dir.path().join("system"))?;
    std::fs::create_dir_all(dir.path().join("var"))?;
    let mut system = String::from("version = 1\n");
    for i in 0..SERVICES {
        system.push_str(&format!(
            "[services.s{i:03}]\nimage = \"{}\"\ncommand = [\"sleep\", \"100000\"]\n",
            rootfs.display()
        ));
    }
    std::fs::write(dir.path().join("system/10-bench.toml"), system)?;
    std::fs::write(
        dir.path().join("var/services.toml"),
        format!("version = 1\n[api.remote]\nlisten = \"127.0.0.1:50000\"\nca = \"{p}/ca.crt\"\ncert = \"{p}/nodes/node.crt\"\nkey = \"{p}/nodes/node.key\"\n"),
    )?;
    let d = dir.path().display().to_string();
    let mut daemon = Daemon::new(
        &sysd,
        dir.path(),
        Daemon::cgroup_parent_for("bench-remote", dir.path()),
    )
    .unshare(["-n"])
    .args([
        "--userdata-config".to_string(),
        format!("{d}/var/user-data.toml"),
        "--no-firstboot".to_string(),
    ]);
    daemon.start(Duration::from_secs(60));
    daemon.wait_until("every service running", Duration::from_secs(120), |d| {
        d.request("GET", "/v1/services", "")
            .1
            .matches("\"running\"")
            .count()
            == SERVICES
    });
    let netns = format!("--net=/proc/{}/ns/net", daemon.pid().context("sysd pid")?);
    let socket = daemon.socket().display().to_string();
    let (ca, crt, key) = (
        format!("{p}/ca.crt"),
        format!("{p}/clients/bench.crt"),
        format!("{p}/clients/bench.key"),
    );
    let local: Vec<&str> = vec!["--socket", &socket, "ps"];
    let remote: Vec<&str> = vec![
        "--node",
        "127.0.0.1",
        "--ca",
        &ca,
        "--cert",
        &crt,
        "--key",
        &key,
        "ps",
    ];

    let time = |args: &[&str]| -> Result<f64> {
        let started = Instant::now();
        let out = Command::new("nsenter")
            .arg(&netns)
            .arg(&keelctl)
            .args(args)
            .env_remove("KEELCONFIG")
            .stdin(Stdio::null())
            .output()?;
        let ms = started.elapsed().as_secs_f64() * 1000.0;
        let table = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() || table.lines().count() != SERVICES + 1 {
            bail!(
                "keelctl {args:?}: {}{}",
                table,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(ms)
    };
    // Warm both paths once (page cache, the node's first TLS session).
    time(&local)?;
    time(&remote)?;
    let (mut local_ms, mut remote_ms) = (Vec::new(), Vec::new());
    for _ in 0..RUNS {
        local_ms.push(time(&local)?);
        remote_ms.push(time(&remote)?);
    }
    let rss = rss_kib(daemon.pid().context("sysd pid")?);
    println!("## bench-remote: `keelctl ps`, {SERVICES} services, {RUNS} runs each (ms)\n");
    println!("| transport | median | p90 | min |");
    println!("|---|---|---|---|");
    for (name, samples) in [
        ("unix socket (local)", &local_ms),
        ("mutual TLS on 127.0.0.1:50000 (--node)", &remote_ms),
    ] {
        let min = samples.iter().copied().fold(f64::INFINITY, f64::min);
        println!(
            "| {name} | {:.1} | {:.1} | {min:.1} |",
            stats::median(samples).unwrap_or_default(),
            stats::percentile(samples, 90).unwrap_or_default()
        );
    }
    if let Some(rss) = rss {
        println!("\nsysd RSS with the remote API on: {rss} KiB");
    }
    daemon.terminate();
    Ok(())
}

/// VmRSS of `pid` (sysd: `unshare` execs `sh`, which execs sysd, so the pid is sysd's).
fn rss_kib(pid: u32) -> Option<u64> {
    let status =
        std::fs::read_to_string(Path::new("/proc").join(pid.to_string()).join("status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
}

/// A scratch directory removed when the benchmark ends.
struct Scratch(PathBuf);

impl Scratch {
    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
