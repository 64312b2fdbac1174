//! System services: the config's service files, checked and installed into the root at
//! `/usr/lib/keelson/services.d/NN-<name>.toml` (NN keeps the config's order).
//!
//! sysd owns the schema, so the authority is the image's own sysd: `sysd check --system
//! FILE...` runs on the freshly built binary and its `file:line:col` message fails the build.
//! Before that, image-build reads the few fields it needs itself (leniently, with its own
//! `file:line:col` errors): which image each service runs from, to check the image is built
//! into this root, that a named `user` exists in that image's /etc/passwd, and to make the
//! mount points its mounts need (the image is read-only at run time, so they cannot be created
//! then).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use serde::Deserialize;

use crate::config::{line_col, parse_toml, ImageConfig};
use crate::images::{self, IMAGES_DIR};
use crate::manifest::ServiceManifest;
use crate::util::sha256_file;

/// Where service files go in the root.
pub const SERVICES_DIR: &str = "usr/lib/keelson/services.d";

/// Set to 1 to build with a sysd that cannot check service files (a warning, not an error).
pub const SKIP_CHECK_ENV: &str = "KEELSON_SKIP_SERVICE_CHECK";

/// The container paths sysd mounts a tmpfs on: mount points below them are made at run time.
const RUNTIME_TMPFS: &[&str] = &["/tmp", "/run", "/var/tmp"];

#[derive(Deserialize)]
struct File {
    #[serde(default)]
    services: BTreeMap<String, toml::Spanned<Spec>>,
}

#[derive(Deserialize)]
struct Spec {
    image: String,
    user: Option<String>,
    #[serde(default)]
    mounts: Vec<Mount>,
}

#[derive(Deserialize)]
struct Mount {
    #[serde(rename = "type")]
    kind: String,
    source: Option<String>,
    target: String,
}

/// One service as image-build sees it.
pub struct Service {
    pub name: String,
    /// `file:line:col` of its table.
    pub origin: String,
    pub image: String,
    pub user: Option<String>,
    /// (kind, source, target)
    mounts: Vec<(String, Option<String>, String)>,
}

/// One service file of the config.
pub struct ServiceFile {
    /// As the config names it, resolved against the config's directory.
    pub source: PathBuf,
    /// Its path in the root, e.g. `usr/lib/keelson/services.d/10-system.toml`.
    pub dest: String,
    pub services: Vec<Service>,
}

impl ServiceFile {
    /// What the manifest says of the file.
    pub fn manifest(&self) -> Result<ServiceManifest> {
        Ok(ServiceManifest {
            path: format!("/{}", self.dest),
            source: self.source.display().to_string(),
            sha256: sha256_file(&self.source)?,
            services: self.services.iter().map(|s| s.name.clone()).collect(),
        })
    }
}

/// Reads the config's service files and checks what image-build can check on its own: every
/// image under /usr/lib/keelson/images names an image of this config.
pub fn load(cfg: &ImageConfig) -> Result<Vec<ServiceFile>> {
    let mut files = Vec::new();
    for (i, path) in cfg.service_files().into_iter().enumerate() {
        let dest = format!("{SERVICES_DIR}/{:02}-{}.toml", (i + 1) * 10, stem(&path)?);
        files.push((path, dest));
    }
    let known: Vec<&str> = cfg.images.keys().map(String::as_str).collect();
    load_files(files, &known, "this image", &cfg.path)
}

/// The file name of a service file without `.toml`.
pub fn stem(path: &Path) -> Result<&str> {
    path.file_stem()
        .and_then(|s| s.to_str())
        .with_context(|| format!("service file name {}", path.display()))
}

/// Reads service files `(source, path in the root)` and checks that every image under
/// /usr/lib/keelson/images is one of `images` (the images built into `built_into`, whose
/// definition is `config`).
pub fn load_files(
    files: Vec<(PathBuf, String)>,
    images: &[&str],
    built_into: &str,
    config: &Path,
) -> Result<Vec<ServiceFile>> {
    let mut out = Vec::new();
    for (path, dest) in files {
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading service file {}", path.display()))?;
        let file: File = parse_toml(&path, &text)?;
        let mut services = Vec::new();
        for (name, spanned) in file.services {
            let (line, col) = line_col(&text, spanned.span().start);
            let origin = format!("{}:{line}:{col}", path.display());
            let spec = spanned.into_inner();
            if let Some(image) = image_name(&spec.image) {
                if !images.contains(&image) {
                    bail!(
                        "{origin}: service `{name}`: image {} is not built into {built_into} (add [images.{image}] to {}; it has: {})",
                        spec.image,
                        config.display(),
                        if images.is_empty() { "none".to_owned() } else { images.join(", ") }
                    );
                }
            }
            services.push(Service {
                name,
                origin,
                image: spec.image,
                user: spec.user,
                mounts: spec
                    .mounts
                    .into_iter()
                    .map(|m| (m.kind, m.source, m.target))
                    .collect(),
            });
        }
        out.push(ServiceFile {
            dest,
            source: path,
            services,
        });
    }
    Ok(out)
}

/// The name of an image this build makes, if `reference` points at one.
pub fn image_name(reference: &str) -> Option<&str> {
    reference
        .trim_end_matches('/')
        .strip_prefix(&format!("/{IMAGES_DIR}/"))
        .filter(|n| !n.contains('/'))
}

fn under(path: &str, dir: &str) -> bool {
    let path = path.trim_end_matches('/');
    path == dir || path.starts_with(&format!("{dir}/"))
}

/// For the services running from image `name` (staged at `image_root`), checks their `user`
/// and makes the mount points their mounts need. `root` is the staged Keelson root, where a bind
/// mount's host source is looked up to tell a file from a directory. Returns the mount points
/// made.
pub fn prepare_image(
    files: &[ServiceFile],
    name: &str,
    image_root: &Path,
    root: &Path,
) -> Result<Vec<String>> {
    let passwd = std::fs::read_to_string(image_root.join("etc/passwd")).unwrap_or_default();
    let mut made = Vec::new();
    for svc in files.iter().flat_map(|f| &f.services) {
        if image_name(&svc.image) != Some(name) {
            continue;
        }
        if let Some(user) = &svc.user {
            let account = user.split(':').next().unwrap_or("");
            let numeric = account.bytes().all(|b| b.is_ascii_digit());
            if !numeric && !passwd.lines().any(|l| l.split(':').next() == Some(account)) {
                bail!(
                    "{}: service `{}`: user {account:?} is not in /etc/passwd of image {name} (add it to images.{name}.users)",
                    svc.origin,
                    svc.name
                );
            }
        }
        for (kind, source, target) in &svc.mounts {
            let scratch = RUNTIME_TMPFS
                .iter()
                .copied()
                .chain(
                    svc.mounts
                        .iter()
                        .filter(|(k, _, t)| k != "bind" && t != target)
                        .map(|(_, _, t)| t.as_str()),
                )
                .any(|dir| under(target, dir) && target.trim_end_matches('/') != dir);
            if scratch {
                // Below a writable mount: the runtime creates it.
                continue;
            }
            let file = match (kind.as_str(), source) {
                ("bind", Some(src)) => {
                    match std::fs::symlink_metadata(
                        images::resolve_in(root, src).unwrap_or_default(),
                    ) {
                        Ok(m) => !m.is_dir(),
                        Err(_) => {
                            let exists = images::resolve_in(image_root, target)
                                .is_some_and(|p| std::fs::symlink_metadata(p).is_ok());
                            if exists {
                                continue;
                            }
                            bail!(
                                "{}: service `{}`: the bind mount of {src} needs {target} to exist in image {name}, and {src} is not in the root file system to tell whether it is a file or a directory: mount it below /run, /tmp or /var/tmp, or at a path the image has",
                                svc.origin,
                                svc.name
                            );
                        }
                    }
                }
                _ => false,
            };
            if images::mount_point(image_root, target, file)? {
                made.push(target.clone());
            }
        }
    }
    made.sort();
    made.dedup();
    Ok(made)
}

/// Runs `sysd check --system` on the service files with the image's own sysd.
pub fn check<'a>(sysd: &Path, files: impl IntoIterator<Item = &'a ServiceFile>) -> Result<()> {
    let files: Vec<&ServiceFile> = files.into_iter().collect();
    if files.is_empty() {
        return Ok(());
    }
    if std::env::var(SKIP_CHECK_ENV).as_deref() == Ok("1") {
        eprintln!(
            "image-build: warning: {SKIP_CHECK_ENV}=1: the service files are NOT checked by sysd; do not ship this image"
        );
        return Ok(());
    }
    let out = Command::new(sysd)
        .args(["check", "--system"])
        .args(files.iter().map(|f| &f.source))
        .output()
        .with_context(|| format!("running {} check", sysd.display()))?;
    if !out.status.success() {
        let msg = String::from_utf8_lossy(&out.stderr);
        let msg = msg.trim();
        bail!(
            "the service files do not pass `sysd check --system`:\n{}\n(set {SKIP_CHECK_ENV}=1 only to build with a sysd that cannot check them)",
            if msg.is_empty() { "(no message)" } else { msg }
        );
    }
    Ok(())
}

/// Copies the service files into the staged root.
pub fn install(root: &Path, files: &[ServiceFile]) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let dir = root.join(SERVICES_DIR);
    std::fs::create_dir_all(&dir)?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
    for f in files {
        let dst = root.join(&f.dest);
        std::fs::copy(&f.source, &dst)
            .with_context(|| format!("installing {} as /{}", f.source.display(), f.dest))?;
        std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(0o644))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_names() {
        assert_eq!(image_name("/usr/lib/keelson/images/base"), Some("base"));
        assert_eq!(image_name("/usr/lib/keelson/images/base/"), Some("base"));
        assert_eq!(image_name("/usr/lib/keelson/images/a/b"), None);
        assert_eq!(image_name("/var/lib/images/base"), None);
    }

    fn config(dir: &Path, services: &str) -> ImageConfig {
        std::fs::write(dir.join("s.toml"), services).unwrap();
        let p = dir.join("c.toml");
        std::fs::write(
            &p,
            "schema = 1\nversion = \"1\"\nseed = \"s\"\nservices = [\"s.toml\"]\n[kernel]\npackage = \"k\"\nmodules = [\"m\"]\n\
             [bootloader]\npackage = \"b\"\n[disk]\nesp_mib = 64\nroot_mib = 64\nverity_mib = 8\ndata_mib = 32\n\
             [images.base]\npackages = [\"busybox-static\"]\n",
        )
        .unwrap();
        ImageConfig::load(&p).unwrap()
    }

    #[test]
    fn unknown_image_and_bad_types_are_located() {
        let d = tempfile::tempdir().unwrap();
        let cfg = config(
            d.path(),
            "version = 1\n\n[services.a]\nimage = \"/usr/lib/keelson/images/nope\"\n",
        );
        let err = load(&cfg).err().unwrap().to_string();
        assert!(
            err.contains(
                "s.toml:3:1: service `a`: image /usr/lib/keelson/images/nope is not built"
            ),
            "{err}"
        );
        let cfg = config(d.path(), "version = 1\n[services.a]\nimage = 5\n");
        let err = load(&cfg).err().unwrap().to_string();
        assert!(err.contains("s.toml:3:9:"), "{err}");
    }

    #[test]
    fn mount_points_and_users() {
        let d = tempfile::tempdir().unwrap();
        let cfg = config(
            d.path(),
            r#"version = 1
[services.a]
image = "/usr/lib/keelson/images/base"
user = "nobody"
mounts = [
  { type = "volume", source = "v", target = "/data" },
  { type = "volume", source = "w", target = "/data/inner" },
  { type = "bind", source = "/usr/bin/keelctl", target = "/usr/bin/keelctl" },
  { type = "bind", source = "/run/keelson/sysd.sock", target = "/run/keelson/sysd.sock" },
  { type = "bind", source = "/run/keelson/resolv.conf", target = "/etc/resolv.conf" },
  { type = "tmpfs", target = "/cache" },
]
[services.b]
image = "/var/lib/other"
"#,
        );
        let files = load(&cfg).unwrap();
        assert_eq!(files[0].dest, "usr/lib/keelson/services.d/10-s.toml");
        let root = d.path().join("root");
        std::fs::create_dir_all(root.join("usr/bin")).unwrap();
        std::fs::write(root.join("usr/bin/keelctl"), b"x").unwrap();
        let img = root.join(IMAGES_DIR).join("base");
        crate::images::Stage::new(&img)
            .unwrap()
            .finish(&[])
            .unwrap();
        let made = prepare_image(&files, "base", &img, &root).unwrap();
        assert_eq!(made, ["/cache", "/data", "/usr/bin/keelctl"]);
        assert!(img.join("usr/bin/keelctl").is_file());
        assert!(img.join("data").is_dir());
        assert!(!img.join("data/inner").exists());
        assert!(!img.join("run/keelson").exists());

        let cfg = config(
            d.path(),
            "version = 1\n[services.a]\nimage = \"/usr/lib/keelson/images/base\"\nuser = \"www\"\n",
        );
        let err = prepare_image(&load(&cfg).unwrap(), "base", &img, &root)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("user \"www\" is not in /etc/passwd of image base"),
            "{err}"
        );

        let cfg = config(
            d.path(),
            "version = 1\n[services.a]\nimage = \"/usr/lib/keelson/images/base\"\nmounts = [{ type = \"bind\", source = \"/dev/kvm\", target = \"/kvm\" }]\n",
        );
        let err = prepare_image(&load(&cfg).unwrap(), "base", &img, &root)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("cannot tell") || err.contains("not in the root file system"),
            "{err}"
        );
    }
}
