//! What a `keelctl apply` costs in fsyncs: a real sysd (the `sysd` next to this binary, or
//! `$KEELSON_SYSD`) in a private mount namespace, three applies of three busybox services
//! (each apply changes every service, so each restarts), with `strace -f -y` attached to sysd
//! for exactly the apply and the services' restarts. Every fsync/fdatasync/syncfs is counted
//! by the file system it hit: /var (the state directory, ext4 on a node) or /run (tmpfs, where
//! an fsync does no I/O). Needs root, /bin/busybox and strace. Prints a table; asserts nothing.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use keelson_testkit::daemon::Daemon;

const SERVICES: usize = 3;
const ROUNDS: usize = 3;

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench-durable: {e:#}");
            ExitCode::FAILURE
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
    let strace = keelson_testkit::tools::resolve("strace")?;
    // On /var/tmp, not /tmp: the state directory should be a disk file system, as on a node.
    let tmp = RemoveDir(PathBuf::from(format!(
        "/var/tmp/keelson-bench-durable-{}",
        std::process::id()
    )));
    std::fs::create_dir_all(&tmp.0)?;
    let dir = tmp.0.as_path();
    let rootfs = dir.join("rootfs");
    keelson_testkit::busybox::rootfs(&rootfs)?;
    let mut d = Daemon::new(&sysd, dir, Daemon::cgroup_parent_for("bench-durable", dir)).args([
        "--no-firstboot".to_string(),
        format!("--userdata-config={}/var/user-data.toml", dir.display()),
    ]);
    d.start(Duration::from_secs(60));
    let pid = d.pid().context("sysd's pid")?;
    println!(
        "{:>5}  {:>10}  {:>10}  {:>7}  {:>9}",
        "apply", "fsync /var", "fsync /run", "other", "apply ms"
    );
    let mut pids = Vec::new();
    for round in 1..=ROUNDS {
        let trace = dir.join(format!("trace.{round}"));
        let mut st = Command::new(&strace)
            .args(["-f", "-y", "-e", "trace=fsync,fdatasync,syncfs", "-o"])
            .arg(&trace)
            .args(["-p", &pid.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting strace")?;
        // strace reports the attach on stderr; give it a moment to take hold.
        std::thread::sleep(Duration::from_millis(500));
        let mut config = String::from("version = 1\n");
        for i in 0..SERVICES {
            config.push_str(&format!(
                "\n[services.s{i}]\nimage = \"{}\"\ncommand = [\"sleep\", \"{round}00000\"]\nstop_signal = \"SIGKILL\"\n",
                rootfs.display()
            ));
        }
        let t0 = Instant::now();
        let (code, body) = d.request("POST", "/v1/apply", &config);
        if code != 200 {
            bail!("apply answered {code}: {body}");
        }
        let applied = t0.elapsed();
        pids = wait_restarted(&d, round, &pids)?;
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(st.id() as i32, libc::SIGINT) };
        st.wait()?;
        let (var, run, other) = count(&trace, dir)?;
        println!(
            "{round:>5}  {var:>10}  {run:>10}  {other:>7}  {:>9.1}",
            applied.as_secs_f64() * 1000.0
        );
    }
    d.terminate();
    Ok(())
}

/// Removes the bench's directory however the run ends.
struct RemoveDir(PathBuf);

impl Drop for RemoveDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Waits until every service runs again with none of the `before` pids; returns the new pids.
fn wait_restarted(d: &Daemon, round: usize, before: &[u64]) -> Result<Vec<u64>> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, body) = d.request("GET", "/v1/services", "");
        let list: serde_json::Value = serde_json::from_str(&body)?;
        let pids: Vec<u64> = list
            .as_array()
            .into_iter()
            .flatten()
            .filter(|s| s["state"] == "running")
            .filter_map(|s| s["pid"].as_u64())
            .collect();
        if pids.len() == SERVICES && !pids.iter().any(|p| before.contains(p)) {
            return Ok(pids);
        }
        if Instant::now() > deadline {
            bail!("services not running after apply {round}: {body}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// (under the state dir but not run/, under run/, elsewhere) from `strace -y` lines such as
/// `1234  fsync(7</var/tmp/…/var/services.toml>) = 0`.
fn count(trace: &Path, dir: &Path) -> Result<(usize, usize, usize)> {
    let text = std::fs::read_to_string(trace).with_context(|| format!("{}", trace.display()))?;
    let run = format!("<{}/run", dir.display());
    let var = format!("<{}/", dir.display());
    let (mut v, mut r, mut o) = (0, 0, 0);
    for line in text
        .lines()
        .filter(|l| l.contains("fsync(") || l.contains("fdatasync(") || l.contains("syncfs("))
    {
        if line.contains(&run) {
            r += 1;
        } else if line.contains(&var) {
            v += 1;
        } else {
            o += 1;
        }
    }
    Ok((v, r, o))
}
