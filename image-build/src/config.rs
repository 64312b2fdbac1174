//! Image definitions (`configs/*.toml`): what goes into an image, as data.
//!
//! Unknown keys are errors, reported with the file, line and column (serde's
//! `deny_unknown_fields` plus the span `toml` gives us).

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// The schema version this build understands.
pub const SCHEMA: u32 = 1;

/// One image definition.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageConfig {
    /// Schema version of this file.
    pub schema: u32,
    /// Release version; goes into os-release (`IMAGE_VERSION`) and the UKI file name.
    pub version: String,
    /// Free text describing the image.
    #[serde(default)]
    pub description: String,
    /// Seed for every UUID, salt and serial number in the image, so builds are reproducible.
    pub seed: String,
    pub kernel: Kernel,
    pub bootloader: Bootloader,
    pub disk: Disk,
    #[serde(skip)]
    pub name: String,
    #[serde(skip)]
    pub path: PathBuf,
}

/// The kernel, its command line and the modules the initramfs carries.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Kernel {
    /// Debian package (a metapackage such as `linux-image-cloud-amd64` is resolved by `lock`).
    pub package: String,
    /// Extra kernel command line arguments (Keelson adds slot and root hash).
    #[serde(default)]
    pub cmdline: Vec<String>,
    /// Modules stage 1 always loads, in order; their dependency closure is added automatically.
    pub modules: Vec<String>,
    /// Hardware drivers: in the initramfs, loaded only when a present device matches one of
    /// their aliases (as udev's coldplug would), so a server image carries many NIC and storage
    /// drivers without paying for them at boot.
    #[serde(default)]
    pub drivers: Vec<String>,
    /// Modules the boot does not need (container networking, overlay, the ESP's file system):
    /// they live in the verified root under /usr/lib/modules and init loads them in the
    /// background once sysd is starting, keeping them off the boot's critical path.
    #[serde(default)]
    pub root_modules: Vec<String>,
}

/// systemd-boot.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Bootloader {
    /// Debian package with `systemd-bootx64.efi` and `linuxx64.efi.stub`.
    pub package: String,
    /// Boot-assessment tries given to a fresh UKI (`keelson_<version>+<tries>.efi`).
    #[serde(default = "default_tries")]
    pub tries: u32,
    /// systemd-boot menu timeout in seconds (0 boots the default entry at once).
    #[serde(default)]
    pub timeout: u32,
}

fn default_tries() -> u32 {
    3
}

/// Partition sizes in MiB.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Disk {
    pub esp_mib: u64,
    pub root_mib: u64,
    pub verity_mib: u64,
    /// Initial size of the data partition; init grows it to fill the disk on first boot.
    pub data_mib: u64,
}

/// A config that could not be read or is invalid.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}:{line}:{col}: {message}")]
    Parse {
        path: String,
        line: usize,
        col: usize,
        message: String,
    },
    #[error("{path}: {message}")]
    Invalid { path: String, message: String },
}

/// 1-based line and column of byte `offset` in `text`.
pub fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}

/// Parses TOML text into `T`, mapping errors to `path:line:col: message`.
pub fn parse_toml<T: serde::de::DeserializeOwned>(
    path: &Path,
    text: &str,
) -> Result<T, ConfigError> {
    toml::from_str(text).map_err(|e| {
        let (line, col) = e.span().map_or((1, 1), |s| line_col(text, s.start));
        ConfigError::Parse {
            path: path.display().to_string(),
            line,
            col,
            message: e.message().to_owned(),
        }
    })
}

impl ImageConfig {
    /// Reads and validates `path`; the image name is the file stem (`configs/vm.toml` → `vm`).
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let mut cfg: ImageConfig = parse_toml(path, &text)?;
        cfg.name = path
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("image")
            .to_owned();
        cfg.path = path.to_owned();
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |message: String| ConfigError::Invalid {
            path: self.path.display().to_string(),
            message,
        };
        if self.schema != SCHEMA {
            return Err(invalid(format!(
                "schema = {} is not supported by this image-build (it reads schema {SCHEMA})",
                self.schema
            )));
        }
        let version_ok = !self.version.is_empty()
            && self
                .version
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '~'));
        if !version_ok {
            return Err(invalid(format!(
                "version = {:?}: use letters, digits, '.', '-' and '~' only (it becomes part of a file name)",
                self.version
            )));
        }
        if !(1..=9).contains(&self.bootloader.tries) {
            return Err(invalid(format!(
                "bootloader.tries = {}: must be 1 to 9",
                self.bootloader.tries
            )));
        }
        let d = &self.disk;
        for (key, v, min) in [
            ("disk.esp_mib", d.esp_mib, 34),
            ("disk.root_mib", d.root_mib, 8),
            ("disk.verity_mib", d.verity_mib, 1),
            ("disk.data_mib", d.data_mib, 16),
        ] {
            if v < min {
                return Err(invalid(format!("{key} = {v}: must be at least {min}")));
            }
        }
        if self.kernel.modules.is_empty() {
            return Err(invalid(
                "kernel.modules is empty: stage 1 needs at least the disk and dm-verity drivers"
                    .into(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
schema = 1
version = "1.0.0"
seed = "s"
[kernel]
package = "linux-image-cloud-amd64"
modules = ["virtio_blk"]
[bootloader]
package = "systemd-boot-efi"
[disk]
esp_mib = 64
root_mib = 64
verity_mib = 8
data_mib = 32
"#;

    fn load_text(text: &str) -> Result<ImageConfig, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.toml");
        std::fs::write(&p, text).unwrap();
        ImageConfig::load(&p)
    }

    #[test]
    fn good_config_loads_with_name_from_file() {
        let c = load_text(GOOD).unwrap();
        assert_eq!(c.name, "t");
        assert_eq!(c.bootloader.tries, 3);
    }

    #[test]
    fn unknown_key_names_file_line_and_column() {
        let text = GOOD.replace("seed = \"s\"", "seed = \"s\"\n  kernal = 1");
        let err = load_text(&text).unwrap_err().to_string();
        assert!(err.contains("t.toml:5:3: unknown field `kernal`"), "{err}");
    }

    #[test]
    fn wrong_type_is_located() {
        let err = load_text(&GOOD.replace("esp_mib = 64", "esp_mib = \"big\""))
            .unwrap_err()
            .to_string();
        assert!(err.contains("t.toml:11:11:"), "{err}");
    }

    #[test]
    fn invalid_values_are_named() {
        let err = load_text(&GOOD.replace("esp_mib = 64", "esp_mib = 2"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("disk.esp_mib = 2"), "{err}");
        let err = load_text(&GOOD.replace("1.0.0", "1/0"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("version"), "{err}");
    }
}
