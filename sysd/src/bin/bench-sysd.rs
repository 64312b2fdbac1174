//! sysd at scale: time from sysd's start until N services are ready, and sysd's resident
//! memory once idle, for 10 and 100 services (busybox `sleep` containers). Each run is a real
//! sysd (the `sysd` next to this binary, or `$KEELSON_SYSD`) in a private mount namespace with
//! cgroup2 at /sys/fs/cgroup, driven through its API socket. Needs root and /bin/busybox.
//! The peer, in the same run: containerd (Debian's, with runc and one
//! `containerd-shim-runc-v2` per container, as Docker, nerdctl and Kubernetes run them)
//! starting the same containers from the same root file system through `ctr run -d`, eight at
//! a time; its memory is containerd's plus every shim's. (containerd uses this host's own
//! cgroup setup; it is skipped with a note when it is not installed.)
//! Prints a table; asserts nothing about time (the machines are shared).
//!
//! `--restart`: sysd under init's supervision (`keelson-init supervise`: the notify channel and
//! FD store as on a node; `$KEELSON_INIT` or the `keelson-init` next to this binary), N
//! services running, `kill -9` of sysd: the time until the next sysd has adopted every one
//! (the same pids, running), against a fresh start of the same services under init.

use std::io::{Read, Write};
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

// Only the rootfs builder: sysd itself is started under `unshare -m` with cgroup2.

struct Row {
    services: usize,
    ready_s: f64,
    per_service_ms: f64,
    rss_kib: u64,
    helper_rss_kib: Option<u64>,
}

impl Row {
    fn new(services: usize, ready: Duration, rss_kib: u64, helper_rss_kib: Option<u64>) -> Row {
        Row {
            services,
            ready_s: ready.as_secs_f64(),
            per_service_ms: ready.as_secs_f64() * 1000.0 / services as f64,
            rss_kib,
            helper_rss_kib,
        }
    }
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
    if std::env::args().any(|a| a == "--restart") {
        return restart_table(&sysd);
    }
    let mut rows = Vec::new();
    for n in [10, 100] {
        rows.push(measure(&sysd, n).with_context(|| format!("{n} services"))?);
    }
    let mut peers = Vec::new();
    if Command::new("ctr")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok()
    {
        for n in [10, 100] {
            peers.push(containerd(n).with_context(|| format!("containerd, {n} containers"))?);
        }
    } else {
        println!("(containerd not installed: apt-get install containerd for the peer rows)");
    }
    println!("sysd: {}", sysd.display());
    println!(
        "{:<11} {:>9} {:>16} {:>14} {:>15} {:>12}",
        "supervisor", "services", "start→ready (s)", "per service", "RSS idle (MiB)", "RSS vs sysd"
    );
    for r in &rows {
        println!(
            "{:<11} {:>9} {:>16.2} {:>11.1} ms {:>15.1} {:>12}",
            "keelson",
            r.services,
            r.ready_s,
            r.per_service_ms,
            r.rss_kib as f64 / 1024.0,
            "1.00x"
        );
    }
    for p in &peers {
        let ours = rows
            .iter()
            .find(|r| r.services == p.services)
            .map_or(1, |r| r.rss_kib);
        println!(
            "{:<11} {:>9} {:>16.2} {:>11.1} ms {:>15.1} {:>11.2}x",
            "containerd",
            p.services,
            p.ready_s,
            p.per_service_ms,
            p.rss_kib as f64 / 1024.0,
            p.rss_kib as f64 / ours as f64
        );
    }
    if let (Some(a), Some(b)) = (rows.first(), rows.last()) {
        let per = (b.rss_kib.saturating_sub(a.rss_kib)) as f64 / (b.services - a.services) as f64;
        println!("sysd memory per additional service: {per:.1} KiB");
    }
    if let Some(h) = rows.iter().find_map(|r| r.helper_rss_kib) {
        println!(
            "(a container start runs the `sysd runtime create` helper briefly; its peak RSS: {:.1} MiB)",
            h as f64 / 1024.0
        );
    }
    Ok(())
}

/// The peer: containerd + one shim per container, `n` busybox `sleep` containers started with
/// `ctr run -d --rootfs`, eight at a time.
fn containerd(n: usize) -> Result<Row> {
    let dir = std::env::temp_dir().join(format!("keelson-bench-ctd-{}-{n}", std::process::id()));
    let _cleanup = RemoveDir(dir.clone());
    let rootfs = dir.join("rootfs");
    keelson_testkit::busybox::rootfs(&rootfs)?;
    // The gRPC API only: the CRI plugin (Kubernetes) is not part of the comparison.
    std::fs::write(
        dir.join("config.toml"),
        "version = 2\ndisabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n",
    )?;
    let address = dir.join("containerd.sock");
    let child = Command::new("containerd")
        .arg("-c")
        .arg(dir.join("config.toml"))
        .arg("--root")
        .arg(dir.join("root"))
        .arg("--state")
        .arg(dir.join("state"))
        .arg("--address")
        .arg(&address)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting containerd")?;
    let mut guard = Guard(child);
    let ctr = |args: &[&str]| -> Result<std::process::Output> {
        Ok(Command::new("ctr")
            .arg("--address")
            .arg(&address)
            .args(["-n", "bench"])
            .args(args)
            .output()?)
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while ctr(&["version"])
        .map(|o| !o.status.success())
        .unwrap_or(true)
    {
        if Instant::now() > deadline {
            bail!("containerd did not answer");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let t0 = Instant::now();
    let ids: Vec<String> = (0..n).map(|i| format!("s{i:03}")).collect();
    let root = rootfs.display().to_string();
    std::thread::scope(|scope| -> Result<()> {
        let workers: Vec<_> = ids
            .chunks(n.div_ceil(8))
            .map(|chunk| {
                let (ctr, root) = (&ctr, &root);
                scope.spawn(move || -> Result<()> {
                    for id in chunk {
                        let out =
                            ctr(&["run", "-d", "--rootfs", root, id, "/bin/sleep", "1000000"])?;
                        if !out.status.success() {
                            bail!(
                                "ctr run {id}: {}",
                                String::from_utf8_lossy(&out.stderr).trim()
                            );
                        }
                    }
                    Ok(())
                })
            })
            .collect();
        for w in workers {
            w.join()
                .map_err(|_| anyhow::anyhow!("a ctr worker panicked"))??;
        }
        Ok(())
    })?;
    let ready = t0.elapsed();
    std::thread::sleep(Duration::from_secs(3));
    let address_arg = address.display().to_string();
    let mut rss = rss_kib(guard.0.id()).context("containerd's VmRSS")?;
    for entry in std::fs::read_dir("/proc")?.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read_to_string(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        if cmdline.starts_with("/usr/bin/containerd-shim") && cmdline.contains(&address_arg) {
            rss += rss_kib(pid).unwrap_or(0);
        }
    }
    for id in &ids {
        let _ = ctr(&["task", "kill", "-s", "SIGKILL", id]);
    }
    std::thread::sleep(Duration::from_millis(500));
    for id in &ids {
        let _ = ctr(&["task", "delete", "-f", id]);
        let _ = ctr(&["container", "delete", id]);
    }
    let _ = guard.0.kill();
    Ok(Row::new(n, ready, rss, None))
}

fn measure(sysd: &Path, n: usize) -> Result<Row> {
    let dir = std::env::temp_dir().join(format!("keelson-bench-sysd-{}-{n}", std::process::id()));
    let _cleanup = RemoveDir(dir.clone());
    let rootfs = dir.join("rootfs");
    keelson_testkit::busybox::rootfs(&rootfs)?;
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
        "mount -t cgroup2 none /sys/fs/cgroup 2>/dev/null; exec {} --system-dir {d}/system --userdata-config {d}/var/user-data.toml --user-config {d}/var/services.toml --no-firstboot --run-dir {d}/run --socket {d}/run/sysd.sock --volumes {d}/var/volumes --log-dir {d}/var/log --cgroup-parent {cgroup}",
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
    Ok(Row::new(n, ready, rss, helper_peak))
}

/// `--restart`: fresh start vs adoption after `kill -9`, at 10 and 100 services.
fn restart_table(sysd: &Path) -> Result<()> {
    let init = match std::env::var_os("KEELSON_INIT") {
        Some(p) => PathBuf::from(p),
        None => std::env::current_exe()?.with_file_name("keelson-init"),
    };
    if !init.exists() {
        bail!(
            "{} missing: cargo build --release -p keelson-init (or set KEELSON_INIT)",
            init.display()
        );
    }
    let mut rows = Vec::new();
    for n in [10, 100] {
        rows.push(restart(sysd, &init, n).with_context(|| format!("{n} services, restart"))?);
    }
    println!("sysd: {}  init: {}", sysd.display(), init.display());
    println!(
        "{:>9} {:>22} {:>26} {:>10}",
        "services", "fresh start→running (s)", "kill -9→all adopted (s)", "ratio"
    );
    for (n, fresh, adopted) in rows {
        println!(
            "{:>9} {:>22.2} {:>26.2} {:>9.2}x",
            n,
            fresh.as_secs_f64(),
            adopted.as_secs_f64(),
            adopted.as_secs_f64() / fresh.as_secs_f64()
        );
    }
    Ok(())
}

/// Every service's (state, pid), when sysd answers.
fn states(d: &keelson_testkit::daemon::Daemon) -> Option<Vec<(String, Option<i64>)>> {
    let (status, body) = d.try_request("GET", "/v1/services", "").ok()?;
    if status != 200 {
        return None;
    }
    let list: serde_json::Value = serde_json::from_str(&body).ok()?;
    Some(
        list.as_array()?
            .iter()
            .map(|s| {
                (
                    s["state"].as_str().unwrap_or("").to_owned(),
                    s["pid"].as_i64(),
                )
            })
            .collect(),
    )
}

fn restart(sysd: &Path, init: &Path, n: usize) -> Result<(usize, Duration, Duration)> {
    let dir = std::env::temp_dir().join(format!("keelson-bench-adopt-{}-{n}", std::process::id()));
    let _cleanup = RemoveDir(dir.clone());
    let rootfs = dir.join("rootfs");
    keelson_testkit::busybox::rootfs(&rootfs)?;
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
    let mut daemon = keelson_testkit::daemon::Daemon::new(
        sysd,
        &dir,
        format!("/keelson-bench-adopt-{}-{n}", std::process::id()),
    )
    .args([
        "--userdata-config".to_string(),
        format!("{d}/var/user-data.toml"),
        "--no-firstboot".to_string(),
    ])
    .under_init(init);
    let all_running = |d: &keelson_testkit::daemon::Daemon| {
        states(d).filter(|s| s.len() == n && s.iter().all(|(st, _)| st == "running"))
    };
    let wait = |d: &keelson_testkit::daemon::Daemon,
                ok: &dyn Fn(&keelson_testkit::daemon::Daemon) -> bool|
     -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(600);
        while !ok(d) {
            if Instant::now() > deadline {
                bail!("not done after 600 s");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    };
    let t0 = Instant::now();
    daemon.spawn()?;
    wait(&daemon, &|d| all_running(d).is_some())?;
    let fresh = t0.elapsed();
    let before: Vec<Option<i64>> = all_running(&daemon)
        .context("services")?
        .into_iter()
        .map(|(_, pid)| pid)
        .collect();
    std::thread::sleep(Duration::from_secs(2));
    let old = daemon.pid().context("sysd's pid")?;
    let t0 = Instant::now();
    daemon.kill_sysd();
    wait(&daemon, &|d| {
        d.pid().is_some_and(|p| p != old)
            && all_running(d).is_some_and(|s| s.iter().map(|(_, p)| *p).eq(before.iter().copied()))
    })?;
    let adopted = t0.elapsed();
    daemon.terminate();
    Ok((n, fresh, adopted))
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
