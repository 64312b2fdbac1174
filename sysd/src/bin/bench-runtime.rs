//! Container start latency: Keelson's runtime (sysd's helper on libcontainer) against `crun`
//! and `runc` on the same bundle (a busybox rootfs running `/bin/true`, the spec sysd
//! generates: namespaces, Docker's capabilities, masked paths, seccomp).
//!
//! Two measures per runtime, N iterations each:
//! - *started*: until the container's process has been told to run (Keelson: `start()`
//!   returns, which is after libcontainer's start; crun/runc: `run -d` returns);
//! - *exited*: until it has run and exited (Keelson: `start()` then `wait_exit` on the pidfd;
//!   crun/runc: foreground `run` returns).
//!
//! Everything runs in one private mount namespace with cgroup2 at /sys/fs/cgroup, so the
//! three use cgroup v2 the same way even on a hybrid host. Each start follows a 100 ms pause,
//! as starts on a node are spread out, not back to back. Needs root, `crun`, `runc` and
//! `/bin/busybox`. Usage: `bench-runtime [ITERATIONS]` (default 20); the helper is the `sysd`
//! next to this binary unless `$KEELSON_RUNTIME_EXE` says otherwise. No assertions on time.

use std::fs;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use keelson_testkit::{history, stats};

use keelson_runtime::{ContainerConfig, Runtime};

const CGROUP_PARENT: &str = "/keelson-bench";

/// The pause before each start. A node starts containers seconds apart, not back to back:
/// caches are colder, and the kernel's cost of moving a process into a cgroup depends on
/// whether another move happened just before (an RCU grace period for the first).
const SPACING: Duration = Duration::from_millis(100);

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench-runtime: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<()> {
    let n: usize = match std::env::args().nth(1) {
        Some(a) => a.parse().with_context(|| format!("iterations {a:?}"))?,
        None => 20,
    };
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("needs root");
    }
    for tool in ["crun", "runc"] {
        if Command::new(tool)
            .arg("--version")
            .stdout(Stdio::null())
            .status()
            .is_err()
        {
            bail!("{tool} not found (apt-get install crun runc)");
        }
    }
    keelson_testkit::cgroup::private_cgroup2()?;
    keelson_runtime::become_subreaper().context("PR_SET_CHILD_SUBREAPER")?;

    let base_dir = std::env::temp_dir().join(format!("keelson-bench-{}", std::process::id()));
    fs::create_dir_all(&base_dir)?;
    let base = base_dir.as_path();
    let rootfs = base.join("rootfs");
    keelson_testkit::busybox::rootfs(&rootfs)?;
    let cfg = config(&rootfs, "bench");

    // One bundle for crun and runc: the spec sysd generates, its seccomp profile in
    // config.json as they read it (Keelson's runtime gets the same profile compiled).
    let spec = keelson_runtime::bundle::spec(&cfg)?;
    let oci_bundle = base.join("oci-bundle");
    keelson_runtime::bundle::write(&oci_bundle, &spec)?;

    let exe = std::env::var_os(keelson_runtime::EXE_ENV)
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            std::env::current_exe()
                .ok()
                .and_then(|p| p.parent().map(|d| d.join("sysd")))
                .unwrap_or_else(|| PathBuf::from("sysd"))
        });
    let rt = Runtime::new(base.join("keelson"))
        .with_exe(&exe)
        .with_cgroup_parent(CGROUP_PARENT);

    // Warm up the page cache and each runtime once.
    let tokio = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    tokio.block_on(keelson_once(&rt, &cfg))?;
    let (keelson_started, keelson_exited) = tokio.block_on(async {
        let mut started = Vec::new();
        let mut exited = Vec::new();
        for i in 0..n {
            tokio::time::sleep(SPACING).await;
            let mut c = cfg.clone();
            c.id = format!("bench-{i}");
            let (s, e) = keelson_once(&rt, &c).await?;
            started.push(s);
            exited.push(e);
        }
        anyhow::Ok((started, exited))
    })?;
    let helper_rss_kib = max_child_rss_kib();

    let mut rows = vec![("keelson".to_owned(), keelson_started, keelson_exited)];
    for tool in ["crun", "runc"] {
        let state = base.join(format!("{tool}-state"));
        fs::create_dir_all(&state)?;
        oci_once(tool, &state, &oci_bundle, "warmup", true)?;
        let mut started = Vec::new();
        let mut exited = Vec::new();
        for i in 0..n {
            std::thread::sleep(SPACING);
            started.push(oci_once(tool, &state, &oci_bundle, &format!("d{i}"), true)?);
            std::thread::sleep(SPACING);
            exited.push(oci_once(
                tool,
                &state,
                &oci_bundle,
                &format!("f{i}"),
                false,
            )?);
        }
        rows.push((tool.to_owned(), started, exited));
    }
    let _ = fs::remove_dir(Path::new("/sys/fs/cgroup").join(CGROUP_PARENT.trim_start_matches('/')));
    let _ = fs::remove_dir_all(base);

    println!(
        "container start latency, busybox /bin/true, {n} iterations, each {} ms after the last (ms)",
        SPACING.as_millis()
    );
    println!(
        "{:<8} {:>14} {:>11} {:>9} {:>14} {:>11} {:>9}",
        "runtime", "started med", "p90", "vs crun", "exited med", "p90", "vs crun"
    );
    let crun = rows
        .iter()
        .find(|r| r.0 == "crun")
        .map(|r| (median(&r.1), median(&r.2)));
    for (name, started, exited) in &rows {
        let (sm, em) = (median(started), median(exited));
        let (cs, ce) = crun.unwrap_or((sm, em));
        println!(
            "{name:<8} {sm:>14.1} {:>11.1} {:>8.2}x {em:>14.1} {:>11.1} {:>8.2}x",
            p90(started),
            sm / cs,
            p90(exited),
            em / ce,
        );
    }
    // The goal row: Keelson's median against crun's, both to exited.
    if let (Some(k), Some(c)) = (
        rows.iter().find(|r| r.0 == "keelson"),
        rows.iter().find(|r| r.0 == "crun"),
    ) {
        history::record(history::Figure::from_samples(
            "bench-runtime",
            "container start, create → exited, keelson median vs crun median",
            "ratio",
            true,
            &[median(&k.2) / median(&c.2)],
        ))?;
    }
    for (name, started, exited) in &rows {
        for (what, samples) in [("started", started), ("exited", exited)] {
            history::record(history::Figure::from_samples(
                "bench-runtime",
                &format!("{name}: container start, busybox /bin/true, create → {what}"),
                "ms",
                true,
                samples,
            ))?;
        }
    }
    println!(
        "helper ({}) peak RSS: {:.1} MiB",
        exe.display(),
        helper_rss_kib as f64 / 1024.0
    );
    Ok(())
}

/// One Keelson container: (ms until started, ms until exited).
async fn keelson_once(rt: &Runtime, cfg: &ContainerConfig) -> Result<(f64, f64)> {
    let (out, err) = (devnull()?, devnull()?);
    let t0 = Instant::now();
    let started = rt.start(cfg, out, err).await?;
    let t_started = t0.elapsed();
    let exit = keelson_runtime::wait_exit(&started.pidfd).await?;
    let t_exited = t0.elapsed();
    if exit != keelson_runtime::ExitInfo::Exited(0) {
        bail!("keelson container exited {exit:?}");
    }
    rt.remove(&cfg.id, &cfg.cgroup_path).await?;
    Ok((ms(t_started), ms(t_exited)))
}

/// One crun/runc container: `run -d` (ms until it returns; then waits and deletes, untimed)
/// or foreground `run` (ms until the container has exited).
fn oci_once(tool: &str, state: &Path, bundle: &Path, id: &str, detached: bool) -> Result<f64> {
    let pid_file = state.join(format!("{id}.pid"));
    let mut cmd = Command::new(tool);
    cmd.arg("--root").arg(state).arg("run");
    if detached {
        cmd.arg("-d").arg("--pid-file").arg(&pid_file);
    }
    cmd.arg("--bundle")
        .arg(bundle)
        .arg(id)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let t0 = Instant::now();
    let out = cmd.output().with_context(|| format!("running {tool}"))?;
    let elapsed = t0.elapsed();
    if !out.status.success() {
        bail!(
            "{tool} run {id}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    if detached {
        let pid: i32 = fs::read_to_string(&pid_file)?
            .trim()
            .parse()
            .context("pid file")?;
        let mut status = 0;
        // SAFETY: the detached init was reparented to us (subreaper); reap it.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        let del = Command::new(tool)
            .arg("--root")
            .arg(state)
            .args(["delete", "-f", id])
            .output()?;
        if !del.status.success() {
            bail!(
                "{tool} delete {id}: {}",
                String::from_utf8_lossy(&del.stderr).trim()
            );
        }
    }
    Ok(ms(elapsed))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn median(v: &[f64]) -> f64 {
    stats::median(v).unwrap_or(0.0)
}

fn p90(v: &[f64]) -> f64 {
    stats::percentile(v, 90).unwrap_or(0.0)
}

fn max_child_rss_kib() -> i64 {
    // SAFETY: getrusage writes into a zeroed struct.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) };
    ru.ru_maxrss
}

fn devnull() -> Result<OwnedFd> {
    Ok(fs::OpenOptions::new().write(true).open("/dev/null")?.into())
}

fn config(rootfs: &Path, id: &str) -> ContainerConfig {
    ContainerConfig {
        id: id.into(),
        ..ContainerConfig::new(
            "bench",
            rootfs,
            &["/bin/true"],
            format!("{CGROUP_PARENT}/bench"),
        )
    }
}
