//! sysd at scale: time from sysd's start until N services are ready, and sysd's resident
//! memory once idle, for 10 and 100 services (busybox `sleep` containers). Each run is a real
//! sysd (the `sysd` next to this binary, or `$KEELSON_SYSD`) in a private mount namespace with
//! cgroup2 at /sys/fs/cgroup, driven through its API socket. Needs root and /bin/busybox.
//! Prints a table; asserts nothing about time (the machines are shared).

use std::io::{Read, Write};
use std::os::unix::fs::symlink;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench-sysd: {e:#}");
            ExitCode::FAILURE
        }
    }
}

struct Row {
    services: usize,
    ready_s: f64,
    per_service_ms: f64,
    rss_kib: u64,
    helper_rss_kib: Option<u64>,
}

fn run() -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("needs root");
    }
    let sysd = match std::env::var_os("KEELSON_SYSD") {
        Some(p) => PathBuf::from(p),
        None => std::env::current_exe()?.with_file_name("sysd"),
    };
    let mut rows = Vec::new();
    for n in [10, 100] {
        rows.push(measure(&sysd, n).with_context(|| format!("{n} services"))?);
    }
    println!("sysd: {}", sysd.display());
    println!(
        "{:>9} {:>16} {:>14} {:>15}",
        "services", "start→ready (s)", "per service", "sysd RSS idle"
    );
    for r in &rows {
        println!(
            "{:>9} {:>16.2} {:>11.1} ms {:>11.1} MiB",
            r.services,
            r.ready_s,
            r.per_service_ms,
            r.rss_kib as f64 / 1024.0
        );
    }
    if let (Some(a), Some(b)) = (rows.first(), rows.last()) {
        let per = (b.rss_kib.saturating_sub(a.rss_kib)) as f64 / (b.services - a.services) as f64;
        println!("memory per additional service in sysd: {per:.1} KiB");
    }
    if let Some(h) = rows.iter().find_map(|r| r.helper_rss_kib) {
        println!("(a container start runs the `sysd runtime create` helper briefly; its peak RSS: {:.1} MiB)", h as f64 / 1024.0);
    }
    Ok(())
}

fn measure(sysd: &Path, n: usize) -> Result<Row> {
    let dir = std::env::temp_dir().join(format!("keelson-bench-sysd-{}-{n}", std::process::id()));
    let _cleanup = RemoveDir(dir.clone());
    let rootfs = dir.join("rootfs");
    std::fs::create_dir_all(rootfs.join("bin"))?;
    std::fs::copy("/bin/busybox", rootfs.join("bin/busybox"))
        .context("/bin/busybox (apt-get install busybox-static)")?;
    for applet in ["sh", "sleep"] {
        symlink("busybox", rootfs.join("bin").join(applet))?;
    }
    std::fs::create_dir_all(dir.join("system"))?;
    let mut config = String::from("version = 1\n");
    for i in 0..n {
        config.push_str(&format!(
            "\n[services.s{i:03}]\nimage = \"{}\"\ncommand = [\"sleep\", \"1000000\"]\nstop_signal = \"SIGKILL\"\n",
            rootfs.display()
        ));
    }
    std::fs::write(dir.join("system/10-bench.toml"), config)?;
    let d = dir.display();
    let cgroup = format!("/keelson-bench-{}-{n}", std::process::id());
    let script = format!(
        "mount -t cgroup2 none /sys/fs/cgroup 2>/dev/null; exec {} --system-dir {d}/system --user-config {d}/var/services.toml --run-dir {d}/run --socket {d}/run/sysd.sock --volumes {d}/var/volumes --log-dir {d}/var/log --cgroup-parent {cgroup}",
        sysd.display()
    );
    let t0 = Instant::now();
    let child = Command::new("unshare")
        .args(["-m", "--propagation", "private", "sh", "-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("spawning sysd")?;
    let mut guard = Guard(child);
    let socket = dir.join("run/sysd.sock");
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut helper_peak = None;
    loop {
        if Instant::now() > deadline {
            bail!("services not ready after 600 s");
        }
        if let Ok(list) = get(&socket, "/v1/services") {
            let running = list.matches("\"state\":\"running\"").count();
            if running == n {
                break;
            }
        }
        helper_peak = helper_peak.max(helper_rss());
        std::thread::sleep(Duration::from_millis(20));
    }
    let ready = t0.elapsed();
    std::thread::sleep(Duration::from_secs(3));
    let rss = rss_kib(guard.0.id()).context("reading sysd's VmRSS")?;
    // SAFETY: signalling our own child.
    unsafe { libc::kill(guard.0.id() as i32, libc::SIGTERM) };
    let _ = guard.0.wait();
    Ok(Row {
        services: n,
        ready_s: ready.as_secs_f64(),
        per_service_ms: ready.as_secs_f64() * 1000.0 / n as f64,
        rss_kib: rss,
        helper_rss_kib: helper_peak,
    })
}

struct RemoveDir(PathBuf);

impl Drop for RemoveDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn get(socket: &Path, path: &str) -> Result<String> {
    let mut s = UnixStream::connect(socket)?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: k\r\nConnection: close\r\n\r\n"
    )?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

/// Largest RSS among running `sysd runtime` helpers right now.
fn helper_rss() -> Option<u64> {
    let mut best = None;
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        if args.get(1) == Some(&&b"runtime"[..]) && args.get(2) == Some(&&b"create"[..]) {
            best = best.max(rss_kib(pid));
        }
    }
    best
}
