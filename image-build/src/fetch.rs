//! Fetching pinned Debian packages with `apt-get download` into a cache, verified by SHA-256.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::lock::{Lock, Pin};
use crate::util::sha256_file;

/// Returns the path of the verified `.deb` for `pin`, downloading it into `cache` if needed.
pub fn fetch(pin: &Pin, cache: &Path, lock_file: &Path, config: &Path) -> Result<PathBuf> {
    std::fs::create_dir_all(cache).with_context(|| format!("creating {}", cache.display()))?;
    // apt-get names files with the epoch's ':' escaped as %3a.
    let file = cache.join(format!(
        "{}_{}_amd64.deb",
        pin.name,
        pin.version.replace(':', "%3a")
    ));
    if file.exists() && sha256_file(&file)? == pin.sha256 {
        return Ok(file);
    }
    // Download into a directory of this process and move the verified file into place, so a
    // failed or concurrent fetch never removes or half-writes a file another build is using.
    let tmp = cache.join(format!(".download-{}-{}", std::process::id(), pin.name));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let result = download(pin, &tmp, lock_file, config).and_then(|downloaded| {
        std::fs::rename(&downloaded, &file)
            .with_context(|| format!("moving {} into the cache", downloaded.display()))
    });
    let _ = std::fs::remove_dir_all(&tmp);
    result?;
    Ok(file)
}

/// `apt-get download` of `pin` into `dir`; returns the file once its sha256 matches the pin.
fn download(pin: &Pin, dir: &Path, lock_file: &Path, config: &Path) -> Result<PathBuf> {
    let file = dir.join(format!(
        "{}_{}_amd64.deb",
        pin.name,
        pin.version.replace(':', "%3a")
    ));
    let out = Command::new("apt-get")
        .args(["download", "-q", "-o", "APT::Sandbox::User=root"])
        .arg(format!("{}={}", pin.name, pin.version))
        .current_dir(dir)
        .output()
        .context("running apt-get (package apt)")?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        if err.contains("not found") || err.contains("Unable to locate") {
            bail!(
                "{} {} (pinned in {}) is not on the apt mirror any more: run `apt-get update`, then `image-build lock {}` to pin the current version",
                pin.name,
                pin.version,
                lock_file.display(),
                config.display()
            );
        }
        bail!(
            "apt-get download {}={} failed: {}",
            pin.name,
            pin.version,
            err.trim()
        );
    }
    let actual = sha256_file(&file)
        .with_context(|| format!("apt-get did not produce {}", file.display()))?;
    if actual != pin.sha256 {
        bail!(
            "{} {}: sha256 {actual} does not match the pin {} in {}; if the archive really changed, review it and run `image-build lock {}`",
            pin.name,
            pin.version,
            pin.sha256,
            lock_file.display(),
            config.display()
        );
    }
    Ok(file)
}

/// Fetches every pinned package of a lock, returning `(pin, path)` pairs in lock order.
pub fn fetch_all<'a>(
    lock: &'a Lock,
    cache: &Path,
    lock_file: &Path,
    config: &Path,
) -> Result<Vec<(&'a Pin, PathBuf)>> {
    lock.packages
        .iter()
        .map(|p| Ok((p, fetch(p, cache, lock_file, config)?)))
        .collect()
}
