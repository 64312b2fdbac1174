//! Host networking: time from a DHCP client's start until the link has its lease installed
//! (address, default route, DNS known), for sysd (`--host-network`, from process start to its
//! `network-online` event) side by side with `busybox udhcpc` and ISC `dhclient` against the
//! same dnsmasq in the same run; the resident memory networking adds to sysd (sysd with
//! and without `--host-network`, no services); and the time from `apply` of a config with a
//! new HTTP service until it answers from outside the node, on the bridge with a published
//! port side by side with the same service on the host network.
//!
//! Everything runs in two network namespaces this benchmark creates (client and server joined
//! by a veth pair); dnsmasq runs with `--no-ping` so its address probe does not dominate.
//! Each client gets a fresh start every run (no kept lease, address flushed). Needs root,
//! iproute2, dnsmasq, busybox; dhclient is skipped with a note when missing. Prints a table;
//! asserts nothing about time.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;

use anyhow::{bail, Context, Result};
use keelson_testkit::stats;

// The busybox root file system for the apply benchmark's service.

const RUNS: usize = 5;
const SERVER: &str = "kbench-srv";
const CLIENT: &str = "kbench-cli";

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench-network: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn sh(args: &[&str]) -> Result<()> {
    let st = Command::new(args[0])
        .args(&args[1..])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .with_context(|| format!("{args:?}"))?;
    if !st.success() {
        bail!("{args:?} failed");
    }
    Ok(())
}

struct Lab {
    dir: Scratch,
    dnsmasq: Child,
}

/// A scratch directory removed on drop.
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

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = self.dnsmasq.kill();
        let _ = self.dnsmasq.wait();
        let _ = sh(&["ip", "netns", "del", SERVER]);
        let _ = sh(&["ip", "netns", "del", CLIENT]);
    }
}

fn lab() -> Result<Lab> {
    let _ = sh(&["ip", "netns", "del", SERVER]);
    let _ = sh(&["ip", "netns", "del", CLIENT]);
    sh(&["ip", "netns", "add", SERVER])?;
    sh(&["ip", "netns", "add", CLIENT])?;
    sh(&[
        "ip", "-n", SERVER, "link", "add", "vs", "type", "veth", "peer", "name", "ve0", "netns",
        CLIENT,
    ])?;
    sh(&[
        "ip",
        "-n",
        SERVER,
        "addr",
        "add",
        "10.66.0.1/24",
        "dev",
        "vs",
    ])?;
    sh(&["ip", "-n", SERVER, "link", "set", "vs", "up"])?;
    sh(&["ip", "-n", CLIENT, "link", "set", "lo", "up"])?;
    let dir = Scratch(std::env::temp_dir().join(format!("kbench-net-{}", std::process::id())));
    std::fs::create_dir_all(dir.path())?;
    let leases = format!("--dhcp-leasefile={}", dir.path().join("leases").display());
    let dnsmasq = Command::new("ip")
        .args([
            "netns",
            "exec",
            SERVER,
            "dnsmasq",
            "--no-daemon",
            "--conf-file=/dev/null",
        ])
        .args([
            "--interface=vs",
            "--bind-interfaces",
            "--port=0",
            "--no-ping",
        ])
        .args(["--dhcp-range=10.66.0.100,10.66.0.200,255.255.255.0,1h"])
        .args(["--dhcp-option=option:router,10.66.0.1"])
        .args(["--dhcp-option=option:dns-server,10.66.0.1", &leases])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("dnsmasq (apt-get install dnsmasq-base)")?;
    std::thread::sleep(Duration::from_millis(500));
    Ok(Lab { dir, dnsmasq })
}

/// Back to an unconfigured link.
fn reset() -> Result<()> {
    let _ = sh(&["ip", "-n", CLIENT, "addr", "flush", "dev", "ve0"]);
    let _ = sh(&["ip", "-n", CLIENT, "route", "flush", "table", "main"]);
    sh(&["ip", "-n", CLIENT, "link", "set", "ve0", "up"])?;
    // Carrier on a fresh veth comes at once; give it a moment to settle identically.
    std::thread::sleep(Duration::from_millis(200));
    Ok(())
}

fn has_default_route() -> bool {
    Command::new("ip")
        .args(["-n", CLIENT, "-4", "route", "show", "default"])
        .output()
        .map(|o| !o.stdout.is_empty())
        .unwrap_or(false)
}

/// sysd: process start → `network-online` on its stderr. Returns the time and sysd's RSS then.
fn sysd_once(lab: &Lab, sysd: &Path, network: bool) -> Result<(Duration, u64)> {
    let d = lab.dir.path();
    let _ = std::fs::remove_dir_all(d.join("state"));
    std::fs::create_dir_all(d.join("system"))?;
    std::fs::write(
        d.join("system/net.toml"),
        "version = 1\n[network.interfaces.ve0]\ndhcp = true\n",
    )?;
    let mut args = vec![
        format!("--system-dir={}/system", d.display()),
        format!("--user-config={}/state/services.toml", d.display()),
        format!("--run-dir={}/run", d.display()),
        format!("--socket={}/run/sysd.sock", d.display()),
        format!("--volumes={}/state/volumes", d.display()),
        format!("--log-dir={}/state/log", d.display()),
        "--cgroup-parent=/keelson-bench-net".into(),
        format!("--network-state={}/state/network", d.display()),
        format!("--resolv-conf={}/run/resolv.conf", d.display()),
        format!("--hostname-file={}/hostname", d.display()),
        format!("--machine-id={}/machine-id", d.display()),
    ];
    if network {
        args.push("--host-network".into());
    }
    let start = Instant::now();
    let mut child = Command::new("ip")
        .args([
            "netns",
            "exec",
            CLIENT,
            "unshare",
            "-m",
            "-u",
            "--propagation",
            "private",
        ])
        .arg(sysd)
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("sysd")?;
    let stderr = child.stderr.take().context("stderr")?;
    let wanted = if network {
        "sysd: network-online"
    } else {
        "sysd: ready"
    };
    let mut took = None;
    for line in BufReader::new(stderr).lines() {
        let line = line?;
        if line.contains(wanted) {
            took = Some(start.elapsed());
            break;
        }
    }
    let took = took.context("sysd ended before going online")?;
    // Settle, then its memory (the `ip netns exec` and `unshare` exec into sysd: same pid).
    std::thread::sleep(Duration::from_millis(300));
    let rss = rss_kib(child.id()).unwrap_or(0);
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let _ = child.wait();
    Ok((took, rss))
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// udhcpc: start → exit after the lease (-q), its script installs address, route, DNS.
fn udhcpc_once(lab: &Lab) -> Result<Duration> {
    let script = lab.dir.path().join("udhcpc.sh");
    std::fs::write(
        &script,
        "#!/bin/sh\ncase \"$1\" in bound|renew)\n  ip addr replace \"$ip/$mask\" dev \"$interface\"\n  for r in $router; do ip route replace default via \"$r\" dev \"$interface\"; break; done\n  for d in $dns; do echo \"nameserver $d\"; done > \"$(dirname \"$0\")/resolv.udhcpc\"\n;; esac\n",
    )?;
    sh(&["chmod", "755", &script.display().to_string()])?;
    let start = Instant::now();
    let st = Command::new("ip")
        .args([
            "netns", "exec", CLIENT, "busybox", "udhcpc", "-i", "ve0", "-f", "-q", "-n",
        ])
        .args(["-t", "10", "-T", "1", "-s"])
        .arg(&script)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()?;
    let took = start.elapsed();
    if !st.success() || !has_default_route() {
        bail!("udhcpc got no lease");
    }
    Ok(took)
}

/// dhclient: start → it has bound and forked to the background (`-1`: one try).
fn dhclient_once(lab: &Lab) -> Result<Duration> {
    let script = lab.dir.path().join("dhclient.sh");
    std::fs::write(
        &script,
        "#!/bin/sh\ncase \"$reason\" in BOUND|RENEW|REBOOT)\n  ip addr replace \"$new_ip_address/$new_subnet_mask\" dev \"$interface\"\n  for r in $new_routers; do ip route replace default via \"$r\" dev \"$interface\"; break; done\n  for d in $new_domain_name_servers; do echo \"nameserver $d\"; done > \"$(dirname \"$0\")/resolv.dhclient\"\n;; esac\n",
    )?;
    sh(&["chmod", "755", &script.display().to_string()])?;
    let lf = lab.dir.path().join("dhclient.leases");
    let pf = lab.dir.path().join("dhclient.pid");
    let _ = std::fs::remove_file(&lf);
    let start = Instant::now();
    let st = Command::new("ip")
        .args(["netns", "exec", CLIENT, "dhclient", "-1", "-4", "-sf"])
        .arg(&script)
        .arg("-lf")
        .arg(&lf)
        .arg("-pf")
        .arg(&pf)
        .arg("ve0")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()?;
    let took = start.elapsed();
    if let Ok(pid) = std::fs::read_to_string(&pf) {
        if let Ok(pid) = pid.trim().parse::<i32>() {
            // SAFETY: kill(2) on the dhclient this run started.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
    }
    if !st.success() || !has_default_route() {
        bail!("dhclient got no lease");
    }
    Ok(took)
}

/// A sysd with a static address in the client namespace, its API, and cgroup2 for services.
struct Daemon {
    child: Child,
    dir: PathBuf,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

fn daemon(lab: &Lab, sysd: &Path, run: usize) -> Result<Daemon> {
    let dir = lab.dir.path().join(format!("apply-{run}"));
    std::fs::create_dir_all(dir.join("system"))?;
    std::fs::write(
        dir.join("system/net.toml"),
        "version = 1\n[network]\ndns = [\"10.66.0.1\"]\n[network.bridge]\nsubnet = \"10.67.0.0/24\"\n[network.interfaces.ve0]\naddresses = [\"10.66.0.2/24\"]\ngateway = \"10.66.0.1\"\n",
    )?;
    let d = dir.display();
    let script = format!(
        "mount -t cgroup2 none /sys/fs/cgroup 2>/dev/null; exec {} --host-network --system-dir {d}/system --user-config {d}/services.toml --run-dir {d}/run --socket {d}/run/sysd.sock --volumes {d}/volumes --log-dir {d}/log --cgroup-parent /keelson-bench-apply-{run} --network-state {d}/network --resolv-conf {d}/run/resolv.conf --hostname-file {d}/hostname --machine-id {}/machine-id --nft {}",
        sysd.display(),
        lab.dir.path().display(),
        nft_path().display()
    );
    let child = Command::new("ip")
        .args([
            "netns",
            "exec",
            CLIENT,
            "unshare",
            "-m",
            "-u",
            "--propagation",
            "private",
        ])
        .args(["sh", "-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let d = Daemon { child, dir };
    let deadline = Instant::now() + Duration::from_secs(30);
    while UnixStream::connect(d.dir.join("run/sysd.sock")).is_err() {
        if Instant::now() > deadline {
            bail!("sysd did not come up");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(d)
}

fn nft_path() -> PathBuf {
    std::env::var_os("KEELSON_NFT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/sbin/nft"))
}

fn post_apply(d: &Daemon, body: &str) -> Result<()> {
    let mut s = UnixStream::connect(d.dir.join("run/sysd.sock"))?;
    write!(s, "POST /v1/apply HTTP/1.1\r\nHost: k\r\nConnection: close\r\nContent-Type: application/toml\r\nContent-Length: {}\r\n\r\n{body}", body.len())?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    if !out.starts_with("HTTP/1.1 200") {
        bail!("apply: {out}");
    }
    Ok(())
}

/// From the server namespace (outside the node): until `addr` answers an HTTP GET.
fn until_answers(addr: &str, deadline: Instant) -> Result<()> {
    let addr = addr.to_string();
    let ok = std::thread::scope(|scope| {
        scope
            .spawn(move || -> Result<()> {
                let ns = std::fs::File::open(format!("/var/run/netns/{SERVER}"))?;
                nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)?;
                loop {
                    // A short connect timeout: a SYN sent before the container is plugged
                    // in would otherwise wait for TCP's 1 s retransmission.
                    let sa: std::net::SocketAddr = addr.parse()?;
                    if let Ok(mut c) =
                        std::net::TcpStream::connect_timeout(&sa, Duration::from_millis(50))
                    {
                        let _ = c.set_read_timeout(Some(Duration::from_secs(2)));
                        let _ = write!(c, "GET / HTTP/1.0\r\n\r\n");
                        let mut out = String::new();
                        let _ = c.read_to_string(&mut out);
                        if out.contains("bench ok") {
                            return Ok(());
                        }
                    }
                    if Instant::now() > deadline {
                        bail!("{addr} never answered");
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
            })
            .join()
    });
    ok.map_err(|_| anyhow::anyhow!("probe thread panicked"))?
}

/// apply → the service answers from outside: on the bridge through a published port, or on
/// the host network directly.
fn apply_once(lab: &Lab, sysd: &Path, rootfs: &Path, bridge: bool, run: usize) -> Result<Duration> {
    let d = daemon(lab, sysd, run)?;
    let (network, addr) = if bridge {
        (
            "network = \"bridge\"\nports = [\"18080:80/tcp\"]\n",
            "10.66.0.2:18080",
        )
    } else {
        ("network = \"host\"\n", "10.66.0.2:80")
    };
    let config = format!(
        "version = 1\n[services.web]\nimage = \"{}\"\ncommand = [\"httpd\", \"-f\", \"-p\", \"80\", \"-h\", \"/www\"]\n{network}",
        rootfs.display()
    );
    let start = Instant::now();
    post_apply(&d, &config)?;
    until_answers(addr, start + Duration::from_secs(30))?;
    Ok(start.elapsed())
}

fn run() -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("needs root");
    }
    let sysd: PathBuf = match std::env::var_os("KEELSON_SYSD") {
        Some(p) => p.into(),
        None => std::env::current_exe()?.with_file_name("sysd"),
    };
    if !sysd.exists() {
        bail!("{} missing (cargo build -p keelson-sysd)", sysd.display());
    }
    let lab = lab()?;
    std::fs::write(
        lab.dir.path().join("machine-id"),
        "0123456789abcdef0123456789abcdef\n",
    )?;
    let has_dhclient =
        Path::new("/usr/sbin/dhclient").exists() || Path::new("/sbin/dhclient").exists();

    // Warm-up: dnsmasq learns the MAC once.
    reset()?;
    sysd_once(&lab, &sysd, true)?;

    let (mut t_sysd, mut t_udhcpc, mut t_dhclient) = (Vec::new(), Vec::new(), Vec::new());
    let (mut rss_net, mut rss_plain) = (Vec::new(), Vec::new());
    for _ in 0..RUNS {
        reset()?;
        let (t, rss) = sysd_once(&lab, &sysd, true)?;
        t_sysd.push(t);
        rss_net.push(rss);
        reset()?;
        t_udhcpc.push(udhcpc_once(&lab)?);
        if has_dhclient {
            reset()?;
            t_dhclient.push(dhclient_once(&lab)?);
        }
        reset()?;
        let (_, rss) = sysd_once(&lab, &sysd, false)?;
        rss_plain.push(rss);
    }
    let base = stats::median(&t_sysd).unwrap_or_default().as_secs_f64() * 1000.0;
    println!(
        "DHCPv4 against dnsmasq in a namespace, start → lease installed (median of {RUNS} runs)"
    );
    println!("{:<34} {:>10} {:>12}", "client", "ms", "vs sysd");
    let row = |name: &str, v: &[Duration]| {
        let ms = stats::median(v).unwrap_or_default().as_secs_f64() * 1000.0;
        println!("{name:<34} {ms:>10.1} {:>11.2}x", ms / base);
    };
    row("sysd --host-network (to online)", &t_sysd);
    row("busybox udhcpc -q", &t_udhcpc);
    if has_dhclient {
        row("dhclient -1", &t_dhclient);
    } else {
        println!("{:<34} {:>10}", "dhclient -1", "not installed");
    }

    // apply → reachable.
    let rootfs = lab.dir.path().join("rootfs");
    keelson_testkit::busybox::rootfs(&rootfs)?;
    std::fs::create_dir_all(rootfs.join("www"))?;
    std::fs::write(rootfs.join("www/index.html"), "bench ok\n")?;
    reset()?;
    let (mut t_bridge, mut t_host) = (Vec::new(), Vec::new());
    for run in 0..RUNS {
        t_bridge.push(apply_once(&lab, &sysd, &rootfs, true, run * 2)?);
        t_host.push(apply_once(&lab, &sysd, &rootfs, false, run * 2 + 1)?);
    }
    let host_ms = stats::median(&t_host).unwrap_or_default().as_secs_f64() * 1000.0;
    let bridge_ms = stats::median(&t_bridge).unwrap_or_default().as_secs_f64() * 1000.0;
    println!();
    println!("apply → a new HTTP service answers from outside the node (median of {RUNS} runs)");
    println!("{:<34} {:>10} {:>12}", "service network", "ms", "vs host");
    println!("{:<34} {host_ms:>10.1} {:>11.2}x", "host", 1.0);
    println!(
        "{:<34} {bridge_ms:>10.1} {:>11.2}x",
        "bridge + published port",
        bridge_ms / host_ms
    );

    let mid = |v: &mut Vec<u64>| {
        v.sort();
        v[v.len() / 2]
    };
    let (net, plain) = (mid(&mut rss_net), mid(&mut rss_plain));
    println!();
    println!("sysd resident memory, no services (median)");
    println!("{:<34} {:>10}", "sysd", "RSS KiB");
    println!("{:<34} {:>10}", "without --host-network", plain);
    println!("{:<34} {:>10}", "with --host-network, online", net);
    println!(
        "{:<34} {:>10} ({:+.1}%)",
        "added by networking",
        net as i64 - plain as i64,
        (net as f64 - plain as f64) * 100.0 / plain.max(1) as f64
    );
    Ok(())
}
