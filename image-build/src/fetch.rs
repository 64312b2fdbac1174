//! Fetching pinned Debian packages with `apt-get download` into a cache, verified by SHA-256.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::lock::{lock_path, Lock, Pin, Pinned};
use crate::manifest::Input;
use crate::util::sha256_file;

/// The architectures of the packages an image may hold: the machine's, and
/// architecture-independent ones (scripts, data, certificates).
const ARCHES: [&str; 2] = ["amd64", "all"];

/// The file names `apt-get download` may give `pin`'s package, one per architecture (it escapes
/// the epoch's ':' as %3a).
fn deb_names(pin: &Pin) -> impl Iterator<Item = String> + '_ {
    ARCHES.iter().map(move |arch| {
        format!(
            "{}_{}_{arch}.deb",
            pin.name,
            pin.version.replace(':', "%3a")
        )
    })
}

/// Returns the path of the verified `.deb` for `pin`, downloading it into `cache` if needed.
pub fn fetch(pin: &Pin, cache: &Path, lock_file: &Path, config: &Path) -> Result<PathBuf> {
    std::fs::create_dir_all(cache).with_context(|| format!("creating {}", cache.display()))?;
    for name in deb_names(pin) {
        let file = cache.join(name);
        if file.exists() && sha256_file(&file)? == pin.sha256 {
            return Ok(file);
        }
    }
    // Download into a directory of this process and move the verified file into place, so a
    // failed or concurrent fetch never removes or half-writes a file another build is using.
    let tmp = cache.join(format!(".download-{}-{}", std::process::id(), pin.name));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let result = download(pin, &tmp, lock_file, config).and_then(|downloaded| {
        let file = cache.join(downloaded.file_name().context("downloaded file name")?);
        std::fs::rename(&downloaded, &file)
            .with_context(|| format!("moving {} into the cache", downloaded.display()))?;
        Ok(file)
    });
    let _ = std::fs::remove_dir_all(&tmp);
    result
}

/// `apt-get download` of `pin` into `dir`; returns the file once its sha256 matches the pin.
fn download(pin: &Pin, dir: &Path, lock_file: &Path, config: &Path) -> Result<PathBuf> {
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
    let Some(file) = deb_names(pin).map(|n| dir.join(n)).find(|f| f.is_file()) else {
        bail!(
            "apt-get download {}={} produced none of {} in {}",
            pin.name,
            pin.version,
            deb_names(pin).collect::<Vec<_>>().join(", "),
            dir.display()
        );
    };
    let actual = sha256_file(&file)?;
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

/// The verified `.deb` files of a lock's packages.
pub struct Debs<'a> {
    /// `(pin, path)` in lock order.
    files: Vec<(&'a Pin, PathBuf)>,
}

impl Debs<'_> {
    /// The packages as manifest inputs, in lock order.
    pub fn inputs(&self) -> Vec<Input> {
        self.files.iter().map(|(pin, _)| Input::deb(pin)).collect()
    }

    /// The `.deb` of package `name`.
    pub fn path(&self, name: &str) -> Option<&Path> {
        self.files
            .iter()
            .find(|(pin, _)| pin.name == name)
            .map(|(_, file)| file.as_path())
    }
}

/// Fetches every package pinned in `lock`, the lock of `cfg`.
pub fn fetch_all<'a>(lock: &'a Lock, cache: &Path, cfg: &dyn Pinned) -> Result<Debs<'a>> {
    let lock_file = lock_path(cfg);
    let files = lock
        .packages
        .iter()
        .map(|p| Ok((p, fetch(p, cache, &lock_file, cfg.path())?)))
        .collect::<Result<_>>()?;
    Ok(Debs { files })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn architecture_independent_packages_are_found_too() {
        let pin = Pin {
            requested: "adduser".into(),
            name: "adduser".into(),
            version: "1:3.134".into(),
            sha256: String::new(),
            images: vec![],
        };
        let names: Vec<String> = deb_names(&pin).collect();
        assert_eq!(
            names,
            ["adduser_1%3a3.134_amd64.deb", "adduser_1%3a3.134_all.deb"]
        );
    }
}
