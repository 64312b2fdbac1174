//! `bench-firstboot`: what first-boot configuration costs the boot of the vm image (QEMU TCG,
//! direct kernel boot), with no user data and with each local datasource, in one run. sysd
//! reports the duration of its first-boot step (probing every datasource, then decoding,
//! validating and applying) on the console: `sysd: firstboot: ... (N ms)`. Prints a table;
//! asserts nothing (these machines are shared and noisy).
//!
//! The design goal is under 100 ms with no user data and no network datasource configured
//! (cloud-init, for comparison, is a Python program whose own start takes longer than that).
//!
//! Usage: `./dev bench`, or `cargo run --release -p qemu-tests --bin bench-firstboot -- [RUNS]`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use qemu_tests::{image, DiskFormat, GuestBuilder, NicModel};

const BOOT: Duration = Duration::from_secs(240);

const USER_DATA: &str = "#cloud-config\nhostname: bench-node\nwrite_files:\n  - path: /var/lib/bench/hello\n    content: hi\n";

#[derive(Clone, Copy)]
enum Source {
    None,
    FwCfg,
    NoCloudIso,
    NoCloudVfat,
}

impl Source {
    fn name(self) -> &'static str {
        match self {
            Source::None => "no user data",
            Source::FwCfg => "fw_cfg (#cloud-config)",
            Source::NoCloudIso => "NoCloud ISO 9660 (cloud-localds)",
            Source::NoCloudVfat => "NoCloud vfat (cloud-localds -f vfat)",
        }
    }
}

/// One boot: (first-boot step in ms, boot complete in s since kernel start).
fn boot(dir: &Path, work: &Path, source: Source) -> Result<(f64, f64)> {
    let ud = work.join("user-data");
    let md = work.join("meta-data");
    std::fs::write(&ud, USER_DATA)?;
    std::fs::write(&md, "instance-id: bench-1\n")?;
    let mut b = GuestBuilder::from_image_dir(dir)?
        .writable_copy()
        .nic(NicModel::None);
    match source {
        Source::None => {}
        Source::FwCfg => b = b.fw_cfg("opt/keelson/user-data", &ud),
        Source::NoCloudIso | Source::NoCloudVfat => {
            let seed = work.join("seed.img");
            let _ = std::fs::remove_file(&seed);
            let mut cmd = Command::new("cloud-localds");
            if matches!(source, Source::NoCloudVfat) {
                cmd.args(["-f", "vfat"]);
            }
            let ok = cmd
                .arg(&seed)
                .arg(&ud)
                .arg(&md)
                .status()
                .context("cloud-localds (Debian cloud-image-utils)")?
                .success();
            if !ok {
                bail!("cloud-localds failed");
            }
            b = b.extra_drive(seed, DiskFormat::Raw);
        }
    }
    let g = b.spawn()?;
    let expected = match source {
        Source::None => "sysd: firstboot: no user data (",
        _ => "sysd: firstboot: applied cloud-config user data",
    };
    let line = g.wait_for(expected, BOOT)?;
    let ms = line
        .rsplit_once('(')
        .and_then(|(_, r)| r.strip_suffix(" ms)"))
        .and_then(|n| n.trim().parse::<f64>().ok())
        .with_context(|| format!("no duration in {line:?}"))?;
    let done = g.wait_for_from_start("boot complete in", BOOT)?;
    let secs = done
        .split("boot complete in ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|s| s.parse::<f64>().ok())
        .with_context(|| format!("no time in {done:?}"))?;
    Ok((ms, secs))
}

fn median(v: &[f64]) -> f64 {
    keelson_testkit::stats::median(v).unwrap_or(0.0)
}

fn main() -> Result<()> {
    let runs: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(3);
    let dir: PathBuf = image("vm")?;
    let work = tempfile::tempdir()?;
    let sources = [
        Source::None,
        Source::FwCfg,
        Source::NoCloudIso,
        Source::NoCloudVfat,
    ];
    let mut rows = Vec::new();
    for source in sources {
        let mut ms = Vec::new();
        let mut secs = Vec::new();
        for _ in 0..runs {
            let (m, s) = boot(&dir, work.path(), source)?;
            ms.push(m);
            secs.push(s);
        }
        rows.push((source, median(&ms), median(&secs)));
    }
    let base = rows[0].2;
    println!(
        "\nFirst-boot configuration, vm image, QEMU TCG direct boot, median of {runs} boots\n"
    );
    println!("| datasource | first-boot step (probe + apply) | boot complete | vs no user data |");
    println!("|---|---:|---:|---:|");
    for (source, ms, secs) in rows {
        println!(
            "| {} | {ms:.0} ms | {secs:.3} s | {:.2}x |",
            source.name(),
            secs / base
        );
    }
    Ok(())
}
