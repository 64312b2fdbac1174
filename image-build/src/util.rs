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

/// Where a build writes its outputs: a directory beside the output directory, whose entries
/// [`publish`](Staging::publish) moves into it once everything is written, each by a rename.
/// Whoever reads the output directory meanwhile (a test booting the last image while
/// `./dev run` builds the next) finds each file whole, old or new, never missing or half
/// written; a build that fails leaves the previous image as it was (the staging directory is
/// removed on drop). What else the output directory holds (`./dev test` keeps its logs in
/// out/test) stays.
pub struct Staging {
    pub path: PathBuf,
}

impl Staging {
    pub fn new(out: &Path) -> Result<Staging> {
        remove_abandoned(out)?;
        let path = sibling(out, "building")?;
        if path.exists() {
            std::fs::remove_dir_all(&path)
                .with_context(|| format!("removing the old {}", path.display()))?;
        }
        std::fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Staging { path })
    }

    /// Moves every entry of the staging directory into `out`: a file replaces its old self
    /// in one rename; a directory (an OCI layout) replaces the old one by two (old aside, new
    /// in), then the old is removed.
    pub fn publish(self, out: &Path) -> Result<()> {
        std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
        let mut entries = std::fs::read_dir(&self.path)
            .with_context(|| format!("reading {}", self.path.display()))?
            .collect::<std::io::Result<Vec<_>>>()?;
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let (from, to) = (e.path(), out.join(e.file_name()));
            let old = if e.file_type()?.is_dir() && to.symlink_metadata().is_ok() {
                let old = sibling(&to, "old")?;
                if old.symlink_metadata().is_ok() {
                    remove(&old)?;
                }
                std::fs::rename(&to, &old)
                    .with_context(|| format!("moving {} aside", to.display()))?;
                Some(old)
            } else {
                None
            };
            std::fs::rename(&from, &to)
                .with_context(|| format!("renaming {} to {}", from.display(), to.display()))?;
            if let Some(old) = old {
                remove(&old)?;
            }
        }
        Ok(())
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

fn remove(path: &Path) -> Result<()> {
    let r = if path.is_dir() {
        std::fs::remove_dir_all(path)
    } else {
        std::fs::remove_file(path)
    };
    r.with_context(|| format!("removing {}", path.display()))
}

/// Removes what builds of `out` that no longer run left beside it (`.NAME.building-PID`,
/// `.NAME.old-PID` of a build killed before it could clean up; an image's worth each).
fn remove_abandoned(out: &Path) -> Result<()> {
    let (Some(name), Some(dir)) = (out.file_name(), out.parent()) else {
        return Ok(());
    };
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(());
    };
    let name = name.to_string_lossy();
    for e in entries.flatten() {
        let file = e.file_name();
        let Some(rest) = file
            .to_str()
            .and_then(|f| f.strip_prefix(&format!(".{name}.")))
        else {
            continue;
        };
        let pid = ["building-", "old-"]
            .iter()
            .find_map(|p| rest.strip_prefix(p))
            .and_then(|p| p.parse::<u32>().ok());
        if let Some(pid) = pid {
            if !Path::new("/proc").join(pid.to_string()).exists() {
                remove(&e.path())?;
            }
        }
    }
    Ok(())
}

/// `DIR/.NAME.WHAT-PID` for `out` = `DIR/NAME`.
fn sibling(out: &Path, what: &str) -> Result<PathBuf> {
    let name = out
        .file_name()
        .with_context(|| format!("output directory {} has no name", out.display()))?;
    let dir = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir.join(format!(
        ".{}.{what}-{}",
        name.to_string_lossy(),
        std::process::id()
    )))
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
    fn staging_publishes_each_output_whole_and_keeps_what_else_is_there() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("vm");
        std::fs::create_dir_all(out.join("oci/base")).unwrap();
        std::fs::write(out.join("disk.raw"), "old disk").unwrap();
        std::fs::write(out.join("oci/base/stale"), "old layout").unwrap();
        std::fs::write(out.join("tier.log"), "a log of ./dev test").unwrap();

        let s = Staging::new(&out).unwrap();
        std::fs::create_dir_all(s.path.join("oci/base")).unwrap();
        std::fs::write(s.path.join("disk.raw"), "new disk").unwrap();
        std::fs::write(s.path.join("oci/base/index.json"), "{}").unwrap();
        // Until published, the old image is whole.
        assert_eq!(
            std::fs::read_to_string(out.join("disk.raw")).unwrap(),
            "old disk"
        );
        let staged = s.path.clone();
        s.publish(&out).unwrap();

        assert_eq!(
            std::fs::read_to_string(out.join("disk.raw")).unwrap(),
            "new disk"
        );
        assert!(out.join("oci/base/index.json").is_file());
        assert!(
            !out.join("oci/base/stale").exists(),
            "a layout is replaced whole"
        );
        assert!(out.join("tier.log").is_file());
        assert!(!staged.exists());
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["vm"], "nothing left beside the output");

        // What a killed build left (its pid no longer runs) is removed by the next one.
        let abandoned = dir.path().join(".vm.building-4194304999");
        std::fs::create_dir_all(abandoned.join("oci")).unwrap();
        let s = Staging::new(&out).unwrap();
        assert!(!abandoned.exists());
        drop(s);

        // A build that fails (its staging dropped unpublished) leaves the image as it was.
        let s = Staging::new(&out).unwrap();
        std::fs::write(s.path.join("disk.raw"), "half").unwrap();
        drop(s);
        assert_eq!(
            std::fs::read_to_string(out.join("disk.raw")).unwrap(),
            "new disk"
        );
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

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
