//! The image store against its peer, in one run, on one registry: Debian's `docker-registry`
//! on the loopback of a private network namespace, serving a multi-layer image built here
//! (busybox plus three 8 MiB incompressible layers) and ten images sharing that base.
//!
//! 1. Pull time and bytes: a real sysd (`$KEELSON_SYSD` or the `sysd` beside this binary)
//!    pulling through its API into an empty store (download, verify, unpack) against
//!    `skopeo copy docker://… dir:…` (download and verify, no unpack), five runs each,
//!    alternating.
//! 2. From "image present" to "service running": a service applied with a pulled registry
//!    image against the same service from a plain root file system directory.
//! 3. Disk used by ten services on ten images sharing the base: the store's blobs and
//!    unpacked layers against ten unshared copies (what one `dir:` copy per image would take).
//!
//! The pull and disk ratios are recorded for the benchmark history (`testkit::history`).
//!
//! Needs root, busybox-static, docker-registry and skopeo. Prints tables; asserts nothing
//! about time.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use keelson_testkit::busybox;
use keelson_testkit::daemon::Daemon;
use keelson_testkit::history;
use keelson_testkit::http::encode;
use keelson_testkit::registry::{self, Layout, Registry, RegistryOptions, E, TAR, TGZ};
use keelson_testkit::stats::median;

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench-images: {e:#}");
            ExitCode::FAILURE
        }
    }
}

struct Sysd(Daemon);

impl Sysd {
    fn start(exe: &Path, dir: &Path) -> Result<Sysd> {
        let mut daemon = Daemon::new(
            exe,
            dir,
            format!("/keelson-bench-images-{}", std::process::id()),
        );
        daemon.spawn().context("spawning sysd")?;
        let s = Sysd(daemon);
        let deadline = Instant::now() + Duration::from_secs(30);
        while UnixStream::connect(s.0.socket()).is_err() {
            if Instant::now() > deadline {
                bail!("sysd did not start");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(s)
    }

    fn request(&self, method: &str, path: &str, body: &str) -> Result<(u16, String)> {
        Ok(self.0.try_request(method, path, body)?)
    }

    /// Pulls; returns (seconds, bytes downloaded).
    fn pull(&self, image: &str) -> Result<(f64, u64)> {
        let start = Instant::now();
        let (status, body) = self.request(
            "POST",
            &format!("/v1/images/pull?reference={}", encode(image)),
            "",
        )?;
        let secs = start.elapsed().as_secs_f64();
        if status != 200 || !body.contains("\"type\":\"done\"") {
            bail!("pull {image}: {status} {body}");
        }
        let done = body
            .lines()
            .filter_map(|l| l.find('{').map(|i| &l[i..]))
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|v| v["type"] == "done")
            .context("no done line")?;
        Ok((secs, done["downloaded_bytes"].as_u64().unwrap_or(0)))
    }

    fn apply(&self, config: &str) -> Result<()> {
        let (status, body) = self.request("POST", "/v1/apply", config)?;
        if status != 200 {
            bail!("apply: {body}");
        }
        Ok(())
    }

    fn running(&self, name: &str) -> bool {
        self.request("GET", &format!("/v1/services/{name}"), "")
            .is_ok_and(|(_, b)| b.contains("\"state\":\"running\""))
    }

    fn wait_running(&self, names: &[String]) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(120);
        for n in names {
            while !self.running(n) {
                if Instant::now() > deadline {
                    bail!("{n} not running");
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        Ok(())
    }
}

impl Drop for Sysd {
    fn drop(&mut self) {
        self.0.terminate();
    }
}

/// A scratch directory removed on drop.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn du(path: &Path) -> u64 {
    let out = Command::new("du").arg("-sb").arg(path).output();
    out.ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

fn mib(b: u64) -> String {
    format!("{:.1}", b as f64 / (1 << 20) as f64)
}

fn run() -> Result<()> {
    let exe = match std::env::var_os("KEELSON_SYSD") {
        Some(p) => PathBuf::from(p),
        None => std::env::current_exe()?.with_file_name("sysd"),
    };
    registry::private_netns().context("a private network namespace (run as root)")?;
    let tmp =
        Scratch(std::env::temp_dir().join(format!("keelson-bench-images-{}", std::process::id())));
    std::fs::create_dir_all(&tmp.0)?;
    let t = tmp.0.as_path();
    let reg = Registry::start(&t.join("reg"), 5000, RegistryOptions::default());

    // The images: base (busybox) + 3 x 8 MiB layers; ten more sharing the base.
    let rootfs = t.join("rootfs");
    busybox::rootfs(&rootfs)?;
    let base = registry::gzip(&registry::tar_dir(&rootfs));
    let mut layout = Layout::new(&t.join("layout"));
    let mut layers = vec![(TGZ, base.clone())];
    for i in 0..3u8 {
        let data = registry::noise(8 << 20, i);
        let name = format!("data{i}");
        layers.push((TAR, registry::tar(&[E::File(&name, &data, 0o644)])));
    }
    let cmd = ["sleep", "100000"];
    let big = layout.image("amd64", &layers, &cmd);
    layout.tag(&big, "big");
    let mut small = Vec::new();
    for i in 0..10 {
        let body = format!("service {i}\n");
        let m = layout.image(
            "amd64",
            &[
                (TGZ, base.clone()),
                (
                    TAR,
                    registry::tar(&[E::File("srv/id", body.as_bytes(), 0o644)]),
                ),
            ],
            &cmd,
        );
        let tag = format!("s{i}");
        layout.tag(&m, &tag);
        small.push(tag);
    }
    layout.push("big", &format!("{}/bench:big", reg.addr), None);
    for tag in &small {
        layout.push(tag, &format!("{}/bench:{tag}", reg.addr), None);
    }
    let insecure = format!(
        "version = 1\n[registries.\"{}\"]\ninsecure = true\n",
        reg.addr
    );
    let big_ref = format!("{}/bench:big", reg.addr);

    // 1. Pulls.
    const PULLS: usize = 5;
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    let (mut our_bytes, mut their_bytes, mut our_disk) = (0, 0, 0);
    for run in 0..PULLS {
        let dir = t.join(format!("pull{run}"));
        let sysd = Sysd::start(&exe, &dir)?;
        sysd.apply(&insecure)?;
        let (secs, bytes) = sysd.pull(&big_ref)?;
        ours.push(secs);
        our_bytes = bytes;
        our_disk = du(&dir.join("var/images"));
        drop(sysd);
        let dest = t.join(format!("skopeo{run}"));
        let start = Instant::now();
        let ok = Command::new("skopeo")
            .args(["copy", "--quiet", "--src-tls-verify=false"])
            .arg(format!("docker://{big_ref}"))
            .arg(format!("dir:{}", dest.display()))
            .status()
            .context("skopeo")?
            .success();
        if !ok {
            bail!("skopeo copy failed");
        }
        theirs.push(start.elapsed().as_secs_f64());
        their_bytes = du(&dest);
    }
    let (o, s) = (median(&ours).unwrap_or(0.0), median(&theirs).unwrap_or(0.0));
    println!(
        "Pull of a 4-layer image ({} MiB compressed), median of {PULLS}, same registry, same run",
        mib(our_bytes)
    );
    println!("| client | time (s) | downloaded (MiB) | on disk (MiB) | time vs skopeo |");
    println!("|---|---|---|---|---|");
    println!(
        "| sysd pull (download, verify, unpack) | {o:.2} | {} | {} | {:.2}x |",
        mib(our_bytes),
        mib(our_disk),
        o / s
    );
    let ratios: Vec<f64> = ours.iter().zip(&theirs).map(|(o, t)| o / t).collect();
    history::record(history::Figure::from_samples(
        "bench-images",
        "pull of a 4-layer image from a local registry, vs skopeo copy",
        "ratio",
        true,
        &ratios,
    ))?;
    println!(
        "| skopeo copy to dir: (download, verify) | {s:.2} | {} | {} | 1.00x |",
        mib(their_bytes),
        mib(their_bytes)
    );
    println!();

    // 2. Image present -> running, against a plain root file system directory.
    let dir = t.join("start");
    let sysd = Sysd::start(&exe, &dir)?;
    sysd.apply(&insecure)?;
    sysd.pull(&big_ref)?;
    let mut rows = Vec::new();
    // Each apply adds one service; the ones before are unchanged and keep running.
    let mut config = insecure.clone();
    for (label, image) in [
        ("registry image (in the store)", big_ref.clone()),
        ("root file system directory", rootfs.display().to_string()),
    ] {
        let mut times = Vec::new();
        for i in 0..3 {
            let name = format!("svc{i}-{}", rows.len());
            config.push_str(&format!("\n[services.{name}]\nimage = \"{image}\"\ncommand = [\"sleep\", \"100000\"]\ninit = true\n"));
            let start = Instant::now();
            sysd.apply(&config)?;
            sysd.wait_running(std::slice::from_ref(&name))?;
            times.push(start.elapsed().as_secs_f64() * 1000.0);
        }
        rows.push((label, median(&times).unwrap_or(0.0)));
    }
    sysd.apply(&insecure)?;
    drop(sysd);
    println!("From \"image present\" to \"service running\" (apply -> running), median of 3");
    println!("| image | ms | vs rootfs dir |");
    println!("|---|---|---|");
    for (label, ms) in &rows {
        println!("| {label} | {ms:.0} | {:.2}x |", ms / rows[1].1);
    }
    println!();

    // 3. Ten services on ten images sharing the base.
    let dir = t.join("ten");
    let sysd = Sysd::start(&exe, &dir)?;
    let mut config = insecure.clone();
    let mut names = Vec::new();
    for (i, tag) in small.iter().enumerate() {
        config.push_str(&format!(
            "\n[services.s{i}]\nimage = \"{}/bench:{tag}\"\n",
            reg.addr
        ));
        names.push(format!("s{i}"));
    }
    sysd.apply(&config)?;
    sysd.wait_running(&names)?;
    let store = dir.join("var/images");
    let blobs = du(&store.join("blobs"));
    let total = du(&store);
    let unpacked = total - blobs;
    let one = t.join("one");
    let ok = Command::new("skopeo")
        .args(["copy", "--quiet", "--src-tls-verify=false"])
        .arg(format!("docker://{}/bench:s0", reg.addr))
        .arg(format!("dir:{}", one.display()))
        .status()?
        .success();
    if !ok {
        bail!("skopeo copy failed");
    }
    let single = du(&one) + du(&rootfs);
    drop(sysd);
    println!("Disk used by ten services on ten images sharing one base (busybox) layer");
    println!("| layout | blobs (MiB) | unpacked (MiB) | total (MiB) | vs unshared |");
    println!("|---|---|---|---|---|");
    println!(
        "| Keelson store (blobs once, each layer unpacked once) | {} | {} | {} | {:.2}x |",
        mib(blobs),
        mib(unpacked),
        mib(total),
        total as f64 / (10 * single) as f64
    );
    println!(
        "| unshared: 10 x (skopeo dir: copy + unpacked root) | {} | {} | {} | 1.00x |",
        mib(10 * du(&one)),
        mib(10 * du(&rootfs)),
        mib(10 * single)
    );
    // The floor for this design, for comparison: the blobs, the base unpacked once, and ten
    // one-file layers of a 4 KiB block each.
    let per_layer = blobs + du(&rootfs) + 10 * 4096;
    println!(
        "| floor: blobs + each distinct layer's files (computed) | {} | {} | {} | {:.2}x |",
        mib(blobs),
        mib(per_layer - blobs),
        mib(per_layer),
        per_layer as f64 / (10 * single) as f64
    );
    history::record(history::Figure::from_samples(
        "bench-images",
        "disk used by ten images sharing a base, vs each stored on its own",
        "ratio",
        true,
        &[total as f64 / (10 * single) as f64],
    ))?;
    Ok(())
}
