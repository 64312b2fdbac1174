//! Small helpers: hashing, seed-derived identifiers, host tools, the scratch directory,
//! progress output.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use keelson_common::gpt::Guid;
use sha2::{Digest, Sha256};

/// Hex SHA-256 of a file, streamed.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

/// Hex SHA-256 of bytes.
pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// 32 bytes derived from the image seed for one purpose (`"disk"`, `"esp"`, `"root-a salt"`...):
/// the same config always yields the same identifiers, different purposes never collide.
pub fn derive(seed: &str, purpose: &str) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"keelson-image-build\0");
    h.update(seed.as_bytes());
    h.update([0]);
    h.update(purpose.as_bytes());
    h.finalize().into()
}

/// `out/.work`, a build's scratch directory, empty (whatever an interrupted build left there is
/// removed). The build removes it when it succeeds.
pub fn work_dir(out: &Path) -> Result<PathBuf> {
    let work = out.join(".work");
    if work.exists() {
        std::fs::remove_dir_all(&work)
            .with_context(|| format!("removing the old {}", work.display()))?;
    }
    std::fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
    Ok(work)
}

/// A version-4-shaped GUID derived from the seed.
pub fn derive_guid(seed: &str, purpose: &str) -> Guid {
    let d = derive(seed, purpose);
    let mut b = [0u8; 16];
    b.copy_from_slice(&d[..16]);
    Guid::from_bytes_v4(b)
}

/// A host tool the pipeline runs, and the Debian package that ships it.
pub struct Tool {
    pub name: &'static str,
    pub package: &'static str,
}

impl Tool {
    pub const fn new(name: &'static str, package: &'static str) -> Tool {
        Tool { name, package }
    }
}

const APT_GET: Tool = Tool::new("apt-get", "apt");
const APT_CACHE: Tool = Tool::new("apt-cache", "apt");
const DPKG_DEB: Tool = Tool::new("dpkg-deb", "dpkg");
const MKFS_EROFS: Tool = Tool::new("mkfs.erofs", "erofs-utils");
const MKFS_EXT4: Tool = Tool::new("mkfs.ext4", "e2fsprogs");
const OBJCOPY: Tool = Tool::new("objcopy", "binutils");
const QEMU_IMG: Tool = Tool::new("qemu-img", "qemu-utils");

/// Every host tool `build` needs.
pub const TOOLS: &[Tool] = &[
    APT_GET, APT_CACHE, DPKG_DEB, MKFS_EROFS, MKFS_EXT4, OBJCOPY, QEMU_IMG,
];

/// Every host tool `extension` needs.
pub const EXTENSION_TOOLS: &[Tool] = &[APT_GET, DPKG_DEB, MKFS_EROFS];

/// Fails with the apt package to install for the first missing tool.
pub fn check_tools(tools: &[Tool]) -> Result<()> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut missing = Vec::new();
    for t in tools {
        let found = std::env::split_paths(&path)
            .chain(["/usr/sbin".into(), "/sbin".into()])
            .any(|d| d.join(t.name).is_file());
        if !found {
            missing.push(format!("{} (apt-get install {})", t.name, t.package));
        }
    }
    if !missing.is_empty() {
        bail!("missing host tools: {}", missing.join(", "));
    }
    Ok(())
}

/// Runs a command, failing with its stderr and the command line.
pub fn run(cmd: &mut Command) -> Result<std::process::Output> {
    let out = cmd.output().with_context(|| format!("starting {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out)
}

/// Step-by-step progress on stderr, silent with `-q`.
pub struct Progress {
    quiet: bool,
    start: Instant,
    step: Instant,
    total: usize,
    done: usize,
}

impl Progress {
    pub fn new(quiet: bool, total: usize) -> Self {
        let now = Instant::now();
        Progress {
            quiet,
            start: now,
            step: now,
            total,
            done: 0,
        }
    }

    /// Announces the next step.
    pub fn step(&mut self, what: &str) {
        self.done += 1;
        self.step = Instant::now();
        if !self.quiet {
            eprintln!("[{}/{}] {what}", self.done, self.total);
        }
    }

    /// Reports the result of the current step with its duration.
    pub fn done(&self, detail: &str) {
        if !self.quiet {
            eprintln!(
                "      {detail} ({:.1} s)",
                self.step.elapsed().as_secs_f64()
            );
        }
    }

    /// Reports the end of the whole build.
    pub fn finish(&self, detail: &str) {
        if !self.quiet {
            eprintln!(
                "done: {detail} in {:.1} s",
                self.start.elapsed().as_secs_f64()
            );
        }
    }
}

/// Human size: `12.3 MiB`.
pub fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

/// Proleptic Gregorian date (UTC) of a Unix time: (year, month, day, hour, minute, second).
pub fn civil_from_unix(t: u64) -> (i64, u32, u32, u32, u32, u32) {
    let days = (t / 86_400) as i64;
    let secs = t % 86_400;
    // Howard Hinnant's days_from_civil inverse.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = if m <= 2 { y + 1 } else { y };
    (
        year,
        m,
        d,
        (secs / 3600) as u32,
        (secs / 60 % 60) as u32,
        (secs % 60) as u32,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_unix(0), (1970, 1, 1, 0, 0, 0));
        assert_eq!(civil_from_unix(1_700_000_000), (2023, 11, 14, 22, 13, 20));
        assert_eq!(civil_from_unix(951_782_400), (2000, 2, 29, 0, 0, 0));
    }

    #[test]
    fn derived_ids_are_stable_and_distinct() {
        assert_eq!(derive_guid("s", "disk"), derive_guid("s", "disk"));
        assert_ne!(derive_guid("s", "disk"), derive_guid("s", "esp"));
        assert_ne!(derive_guid("s", "disk"), derive_guid("t", "disk"));
    }
}
