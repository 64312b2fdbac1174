//! Image definitions (`configs/*.toml`): what goes into an image, as data.
//!
//! Unknown keys are errors, reported with the file, line and column (serde's
//! `deny_unknown_fields` plus the span `toml` gives us).

use std::collections::BTreeMap;
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
    /// System service files (paths relative to this config), installed in order into
    /// `/usr/lib/keelson/services.d/NN-<name>.toml` and checked with the image's own sysd.
    #[serde(default)]
    pub services: Vec<PathBuf>,
    pub kernel: Kernel,
    pub bootloader: Bootloader,
    pub disk: Disk,
    /// Root file systems for services, built from Debian packages, at
    /// `/usr/lib/keelson/images/<name>/`.
    #[serde(default)]
    pub images: BTreeMap<String, Image>,
    /// Over-the-air updates: the repository's trusted root metadata baked into the image.
    #[serde(default)]
    pub update: Option<Update>,
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

/// A service root file system made of Debian packages and their dependency closure.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Image {
    /// Free text describing the image.
    #[serde(default)]
    pub description: String,
    /// Debian packages; `lock` pins them with their Depends/Pre-Depends closure.
    pub packages: Vec<String>,
    /// Dependencies left out of that closure, with what only they pull in: packages that only
    /// maintainer scripts use (`adduser`, `init-system-helpers`), which image-build never runs.
    #[serde(default)]
    pub exclude: Vec<String>,
    /// Accounts besides root and nobody in the image's /etc/passwd and /etc/group.
    #[serde(default)]
    pub users: Vec<User>,
}

/// An account in an image's /etc/passwd (and its group of the same name in /etc/group).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct User {
    pub name: String,
    pub uid: u32,
    /// Primary group id (default: the uid); a group named like the user is created with it.
    pub gid: Option<u32>,
    #[serde(default = "default_home")]
    pub home: String,
    #[serde(default = "default_shell")]
    pub shell: String,
}

fn default_home() -> String {
    "/nonexistent".into()
}

fn default_shell() -> String {
    "/usr/sbin/nologin".into()
}

/// Valid image and account names: they become directory names and /etc/passwd fields.
pub fn valid_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 32
        && (b[0].is_ascii_lowercase() || b[0] == b'_')
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'-' | b'_'))
}

/// `[update]`: what the image trusts for updates.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Update {
    /// TUF `root.json` of the update repository (relative to the config), installed as
    /// `/usr/share/keelson/update/root.json`. Release keys stay outside the repository
    /// (`image-build update root` writes this file from them).
    pub trusted_root: PathBuf,
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
    /// How the root's EROFS stores file data (`"none"` if absent).
    #[serde(default)]
    pub root_compression: Compression,
}

/// EROFS data compression, as the kernel reads it (Debian's kernel has `EROFS_FS_ZIP` with LZ4
/// only, not LZMA). dm-verity hashes the compressed blocks: fewer bytes to read and verify at
/// boot, some CPU to decompress them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// File data stored as is.
    #[default]
    None,
    /// LZ4 at its high-compression level 12, in physical clusters of up to 64 KiB
    /// (`mkfs.erofs -zlz4hc,12 -C65536`): the decompressor is LZ4's either way.
    Lz4hc,
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

impl ConfigError {
    /// The error for an invalid value in the definition at `path`, from its message.
    fn invalid(path: &Path) -> impl Fn(String) -> ConfigError + Copy + '_ {
        move |message| ConfigError::Invalid {
            path: path.display().to_string(),
            message,
        }
    }
}

/// Reads and parses the definition file at `path`.
fn read<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.display().to_string(),
        source,
    })?;
    parse_toml(path, &text)
}

/// `rel`, a path named in the definition file at `config`, resolved against its directory.
fn beside(config: &Path, rel: &Path) -> PathBuf {
    config.parent().unwrap_or(Path::new("")).join(rel)
}

/// Checks a definition's `schema`.
fn validate_schema(schema: u32) -> Result<(), String> {
    if schema != SCHEMA {
        return Err(format!(
            "schema = {schema} is not supported by this image-build (it reads schema {SCHEMA})"
        ));
    }
    Ok(())
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
        let mut cfg: ImageConfig = read(path)?;
        cfg.name = path
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("image")
            .to_owned();
        cfg.path = path.to_owned();
        cfg.validate()?;
        Ok(cfg)
    }

    /// Replaces the version (checked like the config's own).
    pub fn set_version(&mut self, version: &str) -> Result<(), ConfigError> {
        self.version = version.to_owned();
        self.validate()
    }

    /// `[update] trusted_root`, resolved against the config's directory.
    pub fn trusted_root(&self) -> Option<PathBuf> {
        self.update
            .as_ref()
            .map(|u| beside(&self.path, &u.trusted_root))
    }

    /// The service files, resolved against the config's directory, in config order.
    pub fn service_files(&self) -> Vec<PathBuf> {
        self.services
            .iter()
            .map(|s| beside(&self.path, s))
            .collect()
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = ConfigError::invalid(&self.path);
        validate_schema(self.schema).map_err(invalid)?;
        validate_version("version", &self.version).map_err(invalid)?;
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
        validate_images(&self.images).map_err(invalid)?;
        validate_services(&self.services, &self.service_files()).map_err(invalid)?;
        Ok(())
    }
}

/// An extension definition (`configs/extensions/<name>.toml`): service images and the system
/// services that run from them, built into a system extension image (docs/extensions.md) for
/// one OS config.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExtensionConfig {
    /// Schema version of this file.
    pub schema: u32,
    /// The extension's name (`SYSEXT_ID`, the image file `<name>.raw`); the file stem.
    pub name: String,
    /// The extension's own version (`SYSEXT_VERSION_ID`).
    pub version: String,
    /// Free text describing the extension.
    #[serde(default)]
    pub description: String,
    /// Seed for the file system UUID and the dm-verity salt and UUID.
    pub seed: String,
    /// The OS config the extension is built for (relative to this file): its `version` goes
    /// into extension-release, and its system services are checked with the extension's.
    pub os: PathBuf,
    /// Service files (relative to this file), installed under
    /// `/usr/lib/keelson/services.d/` and checked by the OS's sysd with the OS's own.
    #[serde(default)]
    pub services: Vec<PathBuf>,
    /// Service root file systems at `/usr/lib/keelson/images/<name>/`, as in an OS config.
    #[serde(default)]
    pub images: BTreeMap<String, Image>,
    /// Kernel modules and sysctls its engines need (docs/node-agent.md).
    #[serde(default)]
    pub kernel: ExtensionKernel,
    #[serde(skip)]
    pub path: PathBuf,
}

/// `[kernel]` of an extension definition: what the node loads and sets when it activates the
/// extension, before any of its services starts. The modules (with their dependency closure,
/// for the OS config's kernel) ship inside the extension image, so the OS pays nothing for
/// them.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExtensionKernel {
    /// Module names (`br_netfilter`, `ip_vs`); built-in ones are recorded, not shipped.
    #[serde(default)]
    pub modules: Vec<String>,
    /// `key = "value"` as in sysctl.conf (`"net.bridge.bridge-nf-call-iptables" = "1"`),
    /// written to /proc/sys after the modules are loaded.
    #[serde(default)]
    pub sysctls: BTreeMap<String, String>,
}

/// A sysctl key as sysctl.conf spells it: dot-separated words of letters, digits, `_` and `-`
/// (no `/`, no `..`: it becomes a path under /proc/sys).
pub fn valid_sysctl_key(key: &str) -> bool {
    !key.is_empty()
        && key.split('.').all(|w| {
            !w.is_empty()
                && w.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        })
}

/// GPT partition labels hold 36 UTF-16 code units; `<name>_<version>_verity` must fit.
const GPT_LABEL_MAX: usize = 36;

impl ExtensionConfig {
    /// Reads and validates `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let mut cfg: ExtensionConfig = read(path)?;
        cfg.path = path.to_owned();
        cfg.validate()?;
        Ok(cfg)
    }

    /// Replaces the extension's version (checked like the file's own).
    pub fn set_version(&mut self, version: &str) -> Result<(), ConfigError> {
        self.version = version.to_owned();
        self.validate()
    }

    /// The OS config, resolved against this file's directory.
    pub fn os_config(&self) -> PathBuf {
        beside(&self.path, &self.os)
    }

    /// The service files, resolved against this file's directory, in order.
    pub fn service_files(&self) -> Vec<PathBuf> {
        self.services
            .iter()
            .map(|s| beside(&self.path, s))
            .collect()
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = ConfigError::invalid(&self.path);
        validate_schema(self.schema).map_err(invalid)?;
        if !valid_name(&self.name) {
            return Err(invalid(format!(
                "name = {:?}: use 1-32 characters of a-z, 0-9, '-' and '_', starting with a letter",
                self.name
            )));
        }
        let stem = self.path.file_stem().and_then(|s| s.to_str());
        if stem != Some(self.name.as_str()) {
            return Err(invalid(format!(
                "name = {:?} but the file is {}: name the file {}.toml (its lock file and the image file follow the name)",
                self.name,
                self.path.display(),
                self.name
            )));
        }
        validate_version("version", &self.version).map_err(invalid)?;
        let label = format!("{}_{}_verity", self.name, self.version);
        if label.len() > GPT_LABEL_MAX {
            return Err(invalid(format!(
                "name and version are too long together: the partition label {label:?} has {} characters, GPT allows {GPT_LABEL_MAX}",
                label.len()
            )));
        }
        if self.seed.is_empty() {
            return Err(invalid("seed is empty".into()));
        }
        let os = self.os_config();
        if !os.is_file() {
            return Err(invalid(format!(
                "os = {:?}: {} is not a file (the OS config this extension is built for, relative to this file)",
                self.os.display(),
                os.display()
            )));
        }
        if self.images.is_empty() && self.services.is_empty() {
            return Err(invalid(
                "neither images nor services: an extension carries at least one".into(),
            ));
        }
        for (i, m) in self.kernel.modules.iter().enumerate() {
            let ok = !m.is_empty()
                && m.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
            if !ok {
                return Err(invalid(format!(
                    "kernel.modules[{i}] = {m:?}: a module name is letters, digits, '_' and '-'"
                )));
            }
        }
        for (k, v) in &self.kernel.sysctls {
            if !valid_sysctl_key(k) {
                return Err(invalid(format!(
                    "kernel.sysctls.{k:?}: a sysctl key is dot-separated words of letters, digits, '_' and '-' (net.ipv4.ip_forward)"
                )));
            }
            if v.trim().is_empty() || v.contains(['\n', '\0']) {
                return Err(invalid(format!(
                    "kernel.sysctls.{k:?} = {v:?}: the value must be one non-empty line"
                )));
            }
        }
        validate_images(&self.images).map_err(invalid)?;
        validate_services(&self.services, &self.service_files()).map_err(invalid)?;
        Ok(())
    }
}

/// What a definition file describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// An OS image (`configs/vm.toml`).
    Os,
    /// A system extension (`configs/extensions/etcd.toml`): it names the OS it is built for.
    Extension,
}

/// Tells an OS config from an extension definition: only an extension has `os`.
pub fn kind_of(path: &Path) -> Result<Kind, ConfigError> {
    let table: toml::Table = read(path)?;
    Ok(if table.contains_key("os") {
        Kind::Extension
    } else {
        Kind::Os
    })
}

/// Checks version strings: they become parts of file names (UKIs, TUF targets, GPT labels).
fn validate_version(key: &str, version: &str) -> Result<(), String> {
    let ok = !version.is_empty()
        && version
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '~'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{key} = {version:?}: use letters, digits, '.', '-' and '~' only (it becomes part of a file name)"
        ))
    }
}

/// Checks `[images.NAME]` tables (shared by OS configs and extension definitions).
fn validate_images(images: &BTreeMap<String, Image>) -> Result<(), String> {
    for (name, image) in images {
        if !valid_name(name) {
            return Err(format!(
                "images.{name}: use 1-32 characters of a-z, 0-9, '-' and '_', starting with a letter (it becomes a directory name)"
            ));
        }
        if image.packages.is_empty() {
            return Err(format!("images.{name}.packages is empty"));
        }
        if let Some(p) = image.exclude.iter().find(|e| image.packages.contains(e)) {
            return Err(format!(
                "images.{name}: {p} is in both packages and exclude"
            ));
        }
        let mut seen = std::collections::BTreeSet::from([0, 65534]);
        for u in &image.users {
            if !valid_name(&u.name) || matches!(u.name.as_str(), "root" | "nobody" | "nogroup") {
                return Err(format!(
                    "images.{name}.users: {:?} is not a valid new account name (a-z, 0-9, '-', '_'; root and nobody exist already)",
                    u.name
                ));
            }
            if !seen.insert(u.uid) {
                return Err(format!(
                    "images.{name}.users: uid {} of {} is used twice (0 and 65534 are root and nobody)",
                    u.uid, u.name
                ));
            }
            for (field, v) in [("home", &u.home), ("shell", &u.shell)] {
                if !v.starts_with('/') || v.contains(':') || v.contains('\n') {
                    return Err(format!(
                        "images.{name}.users: {field} {v:?} of {} must be an absolute path without ':'",
                        u.name
                    ));
                }
            }
        }
    }
    Ok(())
}

/// Checks `services = [...]`: each a .toml file (`resolved` are the paths against the config's
/// directory).
fn validate_services(services: &[PathBuf], resolved: &[PathBuf]) -> Result<(), String> {
    for (i, (s, f)) in services.iter().zip(resolved).enumerate() {
        if s.extension().and_then(|e| e.to_str()) != Some("toml") || !f.is_file() {
            return Err(format!(
                "services[{i}]: {} is not a .toml file (paths are relative to the config's directory)",
                f.display()
            ));
        }
    }
    Ok(())
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

    #[test]
    fn images_and_services_are_checked() {
        let with = |extra: &str| load_text(&format!("{GOOD}{extra}"));
        let c = with("[images.base]\npackages = [\"busybox-static\"]\nusers = [{ name = \"www\", uid = 33 }]\n")
            .unwrap();
        let u = &c.images["base"].users[0];
        assert_eq!(
            (u.gid, u.home.as_str(), u.shell.as_str()),
            (None, "/nonexistent", "/usr/sbin/nologin")
        );
        let err = with("[images.Base]\npackages = [\"x\"]\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("images.Base"), "{err}");
        let err = with("[images.b]\npackages = []\n").unwrap_err().to_string();
        assert!(err.contains("images.b.packages is empty"), "{err}");
        let err = with("[images.b]\npackages = [\"x\"]\nusers = [{ name = \"a\", uid = 65534 }]\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("uid 65534"), "{err}");
        let err = with(
            "[images.b]\npackages = [\"x\"]\nusers = [{ name = \"a\", uid = 5, home = \"rel\" }]\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("home \"rel\""), "{err}");
        let err = load_text(&GOOD.replace(
            "seed = \"s\"",
            "seed = \"s\"\nservices = [\"missing.toml\"]",
        ))
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("services[0]") && err.contains("missing.toml"),
            "{err}"
        );
    }

    /// An extension definition beside a minimal OS config, in `dir/extensions/<file>`.
    fn load_ext(dir: &Path, file: &str, text: &str) -> Result<ExtensionConfig, ConfigError> {
        std::fs::write(dir.join("os.toml"), GOOD).unwrap();
        std::fs::create_dir_all(dir.join("extensions/services")).unwrap();
        std::fs::write(dir.join("extensions/services/e.toml"), "version = 1\n").unwrap();
        let p = dir.join("extensions").join(file);
        std::fs::write(&p, text).unwrap();
        ExtensionConfig::load(&p)
    }

    const EXT: &str = r#"
schema = 1
name = "e"
version = "1.0"
seed = "x"
os = "../os.toml"
services = ["services/e.toml"]
[images.e]
packages = ["etcd-server"]
exclude = ["adduser"]
"#;

    #[test]
    fn extension_definitions_load_and_are_told_apart() {
        let d = tempfile::tempdir().unwrap();
        let e = load_ext(d.path(), "e.toml", EXT).unwrap();
        assert_eq!(e.os_config(), d.path().join("extensions/../os.toml"));
        assert_eq!(e.images["e"].exclude, ["adduser"]);
        assert!(e.kernel.modules.is_empty() && e.kernel.sysctls.is_empty());
        let k = load_ext(
            d.path(),
            "e.toml",
            &format!("{EXT}[kernel]\nmodules = [\"vxlan\"]\nsysctls = {{ \"net.ipv4.ip_forward\" = \"1\" }}\n"),
        )
        .unwrap();
        assert_eq!(k.kernel.modules, ["vxlan"]);
        assert_eq!(k.kernel.sysctls["net.ipv4.ip_forward"], "1");
        assert_eq!(
            kind_of(&d.path().join("extensions/e.toml")).unwrap(),
            Kind::Extension
        );
        assert_eq!(kind_of(&d.path().join("os.toml")).unwrap(), Kind::Os);
    }

    #[test]
    fn bad_extension_definitions_are_named() {
        let d = tempfile::tempdir().unwrap();
        let err = |file: &str, text: &str| load_ext(d.path(), file, text).unwrap_err().to_string();
        let e = err("other.toml", EXT);
        assert!(
            e.contains("name = \"e\" but the file is") && e.contains("e.toml"),
            "{e}"
        );
        let e = err("e.toml", &EXT.replace("../os.toml", "../nope.toml"));
        assert!(
            e.contains("os = \"../nope.toml\"") && e.contains("not a file"),
            "{e}"
        );
        let e = err(
            "e.toml",
            &EXT.replace("version = \"1.0\"", "version = \"1/0\""),
        );
        assert!(e.contains("version = \"1/0\""), "{e}");
        let long = "1.0.0-with-a-very-long-suffix";
        let e = err(
            "e.toml",
            &EXT.replace("version = \"1.0\"", &format!("version = \"{long}\"")),
        );
        assert!(
            e.contains("partition label") && e.contains("GPT allows 36"),
            "{e}"
        );
        let e = err(
            "e.toml",
            &EXT.replace("exclude = [\"adduser\"]", "exclude = [\"etcd-server\"]"),
        );
        assert!(
            e.contains("etcd-server is in both packages and exclude"),
            "{e}"
        );
        let e = err(
            "e.toml",
            &EXT.replace("seed = \"x\"", "seed = \"x\"\ndrivers = 1"),
        );
        assert!(e.contains("e.toml:6:1: unknown field `drivers`"), "{e}");
        let e = err(
            "e.toml",
            &format!("{EXT}[kernel]\nmodules = [\"br_netfilter\", \"../x\"]\n"),
        );
        assert!(e.contains("kernel.modules[1] = \"../x\""), "{e}");
        let e = err(
            "e.toml",
            &format!("{EXT}[kernel.sysctls]\n\"net/ipv4\" = \"1\"\n"),
        );
        assert!(e.contains("kernel.sysctls.\"net/ipv4\""), "{e}");
        let e = err(
            "e.toml",
            &format!("{EXT}[kernel.sysctls]\n\"net.ipv4.ip_forward\" = \"\"\n"),
        );
        assert!(e.contains("the value must be one non-empty line"), "{e}");
        let e = err(
            "e.toml",
            &EXT.replace("services/e.toml", "services/none.toml"),
        );
        assert!(e.contains("services[0]") && e.contains("none.toml"), "{e}");
    }
}
