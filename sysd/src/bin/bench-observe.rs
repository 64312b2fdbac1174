//! Watching a node from off it, measured (issue 18): `/metrics` scrape latency and size with 10
//! and 100 services; sysd's resident memory with the exporter and log forwarding on vs off (10
//! services writing 20 lines/s each, scraped every second); and forwarding throughput to a real
//! rsyslog (Debian's, plain TCP) with the CPU time sysd and rsyslog spent on it.
//!
//! Each run is a real sysd (the `sysd` next to this binary, or `$KEELSON_SYSD`) in a private
//! mount namespace, everything in a private network namespace. Needs root, /bin/busybox and
//! rsyslog. Prints a table; asserts nothing about time (the machines are shared).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use keelson_testkit::daemon::Daemon;
use keelson_testkit::peers::{http_get, Here, Rsyslog};
use keelson_testkit::stats::{median, percentile};

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench-observe: {e:#}");
            ExitCode::FAILURE
        }
    }
}

const METRICS: &str = "127.0.0.1:9100";
const RSYSLOG_PORT: u16 = 1601;

fn run() -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("needs root");
    }
    keelson_testkit::registry::private_netns().context("a private network namespace")?;
    let sysd = match std::env::var_os("KEELSON_SYSD") {
        Some(p) => PathBuf::from(p),
        None => std::env::current_exe()?.with_file_name("sysd"),
    };
    println!("sysd: {}", sysd.display());

    println!("\n/metrics scrapes (50 after 3 warm-up, one at a time)");
    println!(
        "{:>9} {:>12} {:>12} {:>12} {:>9}",
        "services", "p50 (ms)", "p95 (ms)", "size (KiB)", "series"
    );
    for n in [10, 100] {
        let (p50, p95, size, series) =
            scrapes(&sysd, n).with_context(|| format!("{n} services"))?;
        println!(
            "{n:>9} {p50:>12.2} {p95:>12.2} {:>12.1} {series:>9}",
            size as f64 / 1024.0
        );
    }

    println!("\nsysd RSS, 10 services writing 20 lines/s each, after 20 s");
    println!("{:<34} {:>10}", "configuration", "RSS (MiB)");
    for on in [false, true] {
        let rss = rss(&sysd, on).with_context(|| format!("rss, observe {on}"))?;
        let label = if on {
            "metrics (scraped 1/s) + forwarding"
        } else {
            "both off"
        };
        println!("{label:<34} {:>10.1}", rss as f64 / 1024.0);
    }

    println!("\nforwarding to rsyslog over TCP");
    let t = throughput(&sysd, 100_000).context("throughput")?;
    println!(
        "{:>8} lines in {:>6.2} s = {:>8.0} lines/s; CPU: sysd {:.2} s ({:.1} µs/line), rsyslogd {:.2} s",
        t.lines,
        t.secs,
        t.lines as f64 / t.secs,
        t.sysd_cpu,
        t.sysd_cpu * 1e6 / t.lines as f64,
        t.rsyslog_cpu
    );
    Ok(())
}

fn daemon(sysd: &Path, dir: &Path, config: &str) -> Result<Daemon> {
    let rootfs = dir.join("rootfs");
    keelson_testkit::busybox::rootfs(&rootfs)?;
    std::fs::create_dir_all(dir.join("system"))?;
    std::fs::write(
        dir.join("system/10-bench.toml"),
        config.replace("ROOTFS", &rootfs.display().to_string()),
    )?;
    let d = dir.display().to_string();
    let mut daemon = Daemon::new(sysd, dir, Daemon::cgroup_parent_for("bo", dir)).args([
        "--userdata-config".to_string(),
        format!("{d}/var/user-data.toml"),
        "--forward-dir".to_string(),
        format!("{d}/var/forward"),
        "--no-firstboot".to_string(),
    ]);
    daemon.start(Duration::from_secs(60));
    Ok(daemon)
}

fn services(n: usize, command: &str) -> String {
    (0..n)
        .map(|i| {
            format!(
                "[services.s{i:03}]\nimage = \"ROOTFS\"\ncommand = [\"sh\", \"-c\", \"{command}\"]\n"
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn wait_running(daemon: &Daemon, n: usize) {
    daemon.wait_until(
        &format!("{n} services running"),
        Duration::from_secs(600),
        |d| {
            let (_, body) = d.request("GET", "/v1/services", "");
            body.matches("\"state\":\"running\"").count() >= n
        },
    );
}

fn scrapes(sysd: &Path, n: usize) -> Result<(f64, f64, usize, usize)> {
    let dir = tempfile::tempdir()?;
    let config = format!(
        "version = 1\n[metrics]\nlisten = \"{METRICS}\"\n\n{}",
        services(n, "exec sleep 100000")
    );
    let mut daemon = daemon(sysd, dir.path(), &config)?;
    wait_running(&daemon, n);
    let mut times = Vec::new();
    let mut body = String::new();
    for i in 0..53 {
        let t = Instant::now();
        let (status, b) = http_get(METRICS, "/metrics")?;
        let ms = t.elapsed().as_secs_f64() * 1000.0;
        if status != 200 {
            bail!("/metrics answered {status}: {b}");
        }
        if i >= 3 {
            times.push(ms);
        }
        body = b;
    }
    daemon.terminate();
    let series = body.lines().filter(|l| !l.starts_with('#')).count();
    Ok((
        median(&times).unwrap_or(0.0),
        percentile(&times, 95).unwrap_or(0.0),
        body.len(),
        series,
    ))
}

fn rss(sysd: &Path, on: bool) -> Result<u64> {
    let dir = tempfile::tempdir()?;
    let _rsyslog =
        on.then(|| Rsyslog::start(&Here, &dir.path().join("rsyslog"), RSYSLOG_PORT, None));
    let observe = if on {
        format!("[metrics]\nlisten = \"{METRICS}\"\n\n[logging.forward]\ntarget = \"127.0.0.1:{RSYSLOG_PORT}\"\n")
    } else {
        String::new()
    };
    let config = format!(
        "version = 1\n{observe}\n{}",
        services(10, "i=0; while true; do echo line $i of some ordinary length; i=$((i+1)); sleep 0.05; done")
    );
    let mut daemon = daemon(sysd, dir.path(), &config)?;
    wait_running(&daemon, 10);
    let until = Instant::now() + Duration::from_secs(20);
    while Instant::now() < until {
        if on {
            http_get(METRICS, "/metrics")?;
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    let pid = daemon.pid().context("sysd's pid")?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib = status
        .lines()
        .find_map(|l| {
            l.strip_prefix("VmRSS:")?
                .trim()
                .strip_suffix("kB")?
                .trim()
                .parse()
                .ok()
        })
        .context("VmRSS")?;
    daemon.terminate();
    Ok(kib)
}

struct Throughput {
    lines: usize,
    secs: f64,
    sysd_cpu: f64,
    rsyslog_cpu: f64,
}

fn cpu_seconds(pid: u32) -> f64 {
    keelson_metrics::collect::process_figures(Path::new(&format!("/proc/{pid}")))
        .cpu_seconds
        .unwrap_or(0.0)
}

fn throughput(sysd: &Path, lines: usize) -> Result<Throughput> {
    let dir = tempfile::tempdir()?;
    let rsyslog = Rsyslog::start(&Here, &dir.path().join("rsyslog"), RSYSLOG_PORT, None);
    let config = format!(
        "version = 1\n[logging.forward]\ntarget = \"127.0.0.1:{RSYSLOG_PORT}\"\nevents = false\n\n[services.blast]\nimage = \"ROOTFS\"\nenabled = false\ncommand = [\"sh\", \"-c\", \"seq 1 {lines}; exec sleep 100000\"]\n"
    );
    let mut daemon = daemon(sysd, dir.path(), &config)?;
    let sysd_pid = daemon.pid().context("sysd's pid")?;
    let rs_pid = rsyslog.pid().context("rsyslogd's pid")?;
    std::thread::sleep(Duration::from_secs(1));
    let (s0, r0) = (cpu_seconds(sysd_pid), cpu_seconds(rs_pid));
    let t = Instant::now();
    let (status, body) = daemon.request("POST", "/v1/services/blast/start", "");
    if status != 200 {
        bail!("starting blast: {status} {body}");
    }
    let last = format!("] {lines}");
    rsyslog.wait_for("every line", Duration::from_secs(600), |l| {
        l.last().is_some_and(|l| l.ends_with(&last))
    });
    let secs = t.elapsed().as_secs_f64();
    let (s1, r1) = (cpu_seconds(sysd_pid), cpu_seconds(rs_pid));
    let got = rsyslog
        .lines()
        .iter()
        .filter(|l| l.starts_with("blast stdout "))
        .count();
    if got != lines {
        bail!("rsyslog has {got} of {lines} lines");
    }
    daemon.terminate();
    Ok(Throughput {
        lines,
        secs,
        sysd_cpu: s1 - s0,
        rsyslog_cpu: r1 - r0,
    })
}
