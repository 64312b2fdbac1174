//! Mapping, checking and merging the extension set of the running OS version.

use std::path::{Path, PathBuf};

use keelson_common::dm;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use tracing::{info, warn};

use crate::kernel::{self, Kernel};
use crate::release::{self, Release};
use crate::{ddi, loopdev, Entry, Error, Status, Store, RUN_DIR, STORE_DIR};

/// The overlay's source name, how a merged /usr is recognised in /proc/self/mountinfo.
const OVERLAY_SOURCE: &str = "keelson-extensions";
/// Device-mapper names of extensions start with this.
const DM_PREFIX: &str = "keelson-ext-";

/// Where things are (tests point them into a temporary directory).
#[derive(Debug, Clone)]
pub struct Paths {
    pub store: PathBuf,
    pub run: PathBuf,
    /// The tree the extensions' `/usr` trees are merged over.
    pub usr: PathBuf,
    pub os_release: PathBuf,
    /// Where an extension's modules are loaded and its sysctls set.
    pub kernel: Kernel,
}

impl Default for Paths {
    fn default() -> Self {
        Paths {
            store: STORE_DIR.into(),
            run: RUN_DIR.into(),
            usr: "/usr".into(),
            os_release: "/usr/lib/os-release".into(),
            kernel: Kernel::default(),
        }
    }
}

/// Activates the extension set of the running OS version (its `VERSION_ID`): whatever was
/// merged before is taken down first, then each extension is mapped, mounted and checked, and
/// the ones that pass are merged over /usr. An extension that fails is reported in its
/// [`Status`] and left out; the others and the OS are unaffected.
pub fn activate(paths: &Paths) -> Result<Vec<Status>, Error> {
    let os_text =
        std::fs::read_to_string(&paths.os_release).map_err(|e| Error::io(&paths.os_release, e))?;
    let os = Release::parse(&os_text);
    let os_version = os.get("VERSION_ID").unwrap_or_default().to_owned();
    let store = Store::new(&paths.store);
    let set = store.set(&os_version)?;
    deactivate(paths);
    let mut statuses = Vec::new();
    let mut roots = Vec::new();
    for entry in set {
        let result = mount_one(&store, paths, &os, &os_version, &entry);
        let mut status = Status {
            entry: entry.clone(),
            os_version: os_version.clone(),
            error: None,
            mount: None,
        };
        match result {
            Ok(root) => {
                info!(extension = %entry.name, version = %entry.version, roothash = %entry.roothash, "extension mounted");
                status.mount = Some(root.clone());
                roots.push((entry.name.clone(), root));
            }
            Err(e) => {
                warn!(extension = %entry.name, "extension refused: {e}");
                status.error = Some(e.to_string());
                unmount_one(paths, &entry);
            }
        }
        statuses.push(status);
    }
    if let Err(e) = check_services(&paths.usr, &roots).and_then(|()| merge(&paths.usr, &roots)) {
        for (_, root) in &roots {
            let _ = umount2(root.as_path(), MntFlags::MNT_DETACH);
        }
        for s in &mut statuses {
            if s.error.is_none() {
                s.error = Some(e.to_string());
                s.mount = None;
            }
        }
    }
    Ok(statuses)
}

/// Takes every extension down: the /usr overlay, the mounts, the device-mapper devices.
/// Lazy: a service still running from an extension keeps its files until it exits.
pub fn deactivate(paths: &Paths) {
    while is_merged(&paths.usr) {
        if let Err(e) = umount2(paths.usr.as_path(), MntFlags::MNT_DETACH) {
            warn!("unmerging {}: {e}", paths.usr.display());
            break;
        }
    }
    if let Ok(dirs) = std::fs::read_dir(&paths.run) {
        for d in dirs.flatten() {
            let _ = umount2(d.path().as_path(), MntFlags::MNT_DETACH);
            let _ = std::fs::remove_dir(d.path());
        }
    }
    for (name, _) in dm_devices() {
        if name.starts_with(DM_PREFIX) {
            // Busy (still held by a lazily unmounted tree): it goes when its user does not.
            let _ = dm::remove(&name);
        }
    }
}

fn dm_name(entry: &Entry) -> String {
    format!(
        "{DM_PREFIX}{}-{}",
        entry.name,
        &entry.roothash[..16.min(entry.roothash.len())]
    )
}

fn mount_one(
    store: &Store,
    paths: &Paths,
    os: &Release,
    os_version: &str,
    entry: &Entry,
) -> Result<PathBuf, Error> {
    let fail = |why: String| Error::Activate {
        name: entry.name.clone(),
        why,
    };
    crate::check_name(&entry.name)?;
    let image = store.image(entry);
    if !image.is_file() {
        return Err(fail(format!(
            "{} is missing from the store",
            image.display()
        )));
    }
    let layout = ddi::read(&image, &entry.roothash)?;
    let name = dm_name(entry);
    let minor = match dm_devices().into_iter().find(|(n, _)| *n == name) {
        // Left by an earlier sysd (the same root hash, so the same verified content).
        Some((_, minor)) => minor,
        None => {
            let data = loopdev::attach(&image, layout.data.0, layout.data.1).map_err(|e| {
                fail(format!(
                    "attaching a loop device to {}: {e}",
                    image.display()
                ))
            })?;
            let hash = loopdev::attach(&image, layout.hash.0, layout.hash.1).map_err(|e| {
                fail(format!(
                    "attaching a loop device to {}: {e}",
                    image.display()
                ))
            })?;
            let (sectors, params) = layout.superblock.dm_table(
                &format!("{}:{}", data.major, data.minor),
                &format!("{}:{}", hash.major, hash.minor),
                &entry.roothash,
            );
            let (_, minor) = dm::create_readonly(
                &name,
                dm::Target {
                    sectors,
                    target_type: "verity".into(),
                    params,
                },
            )
            .map_err(|e| fail(format!("mapping {} under dm-verity: {e}", image.display())))?;
            // The loop devices autoclear once dm-verity, their only user now, lets go.
            drop((data, hash));
            minor
        }
    };
    let dev = PathBuf::from(format!("/dev/dm-{minor}"));
    let root = paths.run.join(&entry.name);
    std::fs::create_dir_all(&root).map_err(|e| Error::io(&root, e))?;
    mount(
        Some(dev.as_path()),
        root.as_path(),
        Some("erofs"),
        MsFlags::MS_RDONLY | MsFlags::MS_NODEV | MsFlags::MS_NOSUID,
        None::<&str>,
    )
    .map_err(|e| {
        fail(match e {
            // dm-verity answers EIO for a block whose hash is not in the tree of the root hash.
            nix::errno::Errno::EIO => format!(
                "its content does not match root hash {} (dm-verity refused a block while mounting {}: the image is not the one the repository listed)",
                entry.roothash,
                dev.display()
            ),
            e => format!(
                "mounting {} (EROFS, verified against root hash {}): {e}",
                dev.display(),
                entry.roothash
            ),
        })
    })?;
    check_tree(&root, os, os_version, entry)?;
    // Its modules and sysctls before any of its services can start (they are read only once
    // the set is merged).
    let k = kernel::prepare(&root, &entry.name, &paths.kernel, &mut kernel::finit)?;
    if !k.loaded.is_empty() || !k.sysctls.is_empty() {
        info!(extension = %entry.name, loaded = %k.loaded.join(" "), already = %k.present.join(" "), sysctls = %k.sysctls.join(", "), "extension kernel modules and sysctls");
    }
    Ok(root)
}

/// What systemd-sysext checks of a mounted extension, plus Keelson's own: an extension
/// carries only `/usr`, never an `os-release` of its own, and an `extension-release` that fits.
fn check_tree(root: &Path, os: &Release, os_version: &str, entry: &Entry) -> Result<(), Error> {
    let fail = |why: String| Error::Activate {
        name: entry.name.clone(),
        why,
    };
    let rel_path = root
        .join("usr/lib/extension-release.d")
        .join(format!("extension-release.{}", entry.name));
    let text = std::fs::read_to_string(&rel_path).map_err(|e| {
        fail(format!(
            "no usr/lib/extension-release.d/extension-release.{} in the image ({e})",
            entry.name
        ))
    })?;
    let ext = Release::parse(&text);
    // The image must be what the repository listed: built for the version it said.
    if let Some(v) = ext.get("VERSION_ID") {
        if v != entry.built_for {
            return Err(fail(format!(
                "its extension-release says VERSION_ID={v}, the repository listed it as built for {}",
                entry.built_for
            )));
        }
    }
    // A set is recorded from the signed listing of its OS version, so an image built for
    // another version is here only because the repository says it fits this one.
    let listed = entry.built_for == os_version || entry.listed_for.iter().any(|v| v == os_version);
    release::check(os, &ext, &entry.name, listed)?;
    if root.join("usr/lib/os-release").exists() {
        return Err(fail(
            "it carries usr/lib/os-release (an extension may not replace the OS's identity)".into(),
        ));
    }
    if let Ok(top) = std::fs::read_dir(root) {
        for t in top.flatten() {
            let n = t.file_name();
            if n != "usr" && n != "lost+found" {
                return Err(fail(format!(
                    "it carries /{} (extensions carry /usr only)",
                    n.to_string_lossy()
                )));
            }
        }
    }
    Ok(())
}

/// The system service files of the extensions must not shadow the OS's or each other's (a
/// shadowed file would silently replace services the OS relies on).
fn check_services(usr: &Path, roots: &[(String, PathBuf)]) -> Result<(), Error> {
    let rel = "lib/keelson/services.d";
    let mut seen: Vec<(String, String)> = list(&usr.join(rel))
        .into_iter()
        .map(|f| (f, "the OS".to_owned()))
        .collect();
    for (name, root) in roots {
        for f in list(&root.join("usr").join(rel)) {
            if let Some((_, owner)) = seen.iter().find(|(g, _)| *g == f) {
                return Err(Error::Activate {
                    name: name.clone(),
                    why: format!("its /usr/{rel}/{f} would hide the one of {owner}"),
                });
            }
            seen.push((f, format!("extension {name}")));
        }
    }
    Ok(())
}

fn list(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Mounts a read-only overlay of every extension's `usr/` over `usr` (first extension on top,
/// the OS's own tree at the bottom). Nothing is mounted when there is nothing to merge.
pub(crate) fn merge(usr: &Path, roots: &[(String, PathBuf)]) -> Result<(), Error> {
    if roots.is_empty() {
        return Ok(());
    }
    let mut lower = String::new();
    for (_, root) in roots {
        let dir = root.join("usr");
        let s = dir.to_string_lossy();
        if s.contains([':', ',', '\\']) {
            return Err(Error::State(format!("{s}: unusable in overlay options")));
        }
        lower.push_str(&s);
        lower.push(':');
    }
    lower.push_str(&usr.to_string_lossy());
    mount(
        Some(OVERLAY_SOURCE),
        usr,
        Some("overlay"),
        MsFlags::MS_RDONLY | MsFlags::MS_NODEV,
        Some(format!("lowerdir={lower}").as_str()),
    )
    .map_err(|e| Error::State(format!("merging extensions over {}: {e}", usr.display())))
}

fn is_merged(usr: &Path) -> bool {
    let Ok(text) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let target = usr.to_string_lossy();
    text.lines().any(|l| {
        let f: Vec<&str> = l.split(' ').collect();
        let dash = f.iter().position(|x| *x == "-");
        matches!(dash, Some(d) if f.get(4) == Some(&target.as_ref())
            && f.get(d + 1) == Some(&"overlay")
            && f.get(d + 2) == Some(&OVERLAY_SOURCE))
    })
}

/// Device-mapper devices by name, with their minor numbers (from sysfs; no udev needed).
fn dm_devices() -> Vec<(String, u32)> {
    let mut out = Vec::new();
    let Ok(blocks) = std::fs::read_dir("/sys/block") else {
        return out;
    };
    for b in blocks.flatten() {
        let f = b.file_name();
        let Some(minor) = f.to_str().and_then(|s| s.strip_prefix("dm-")) else {
            continue;
        };
        let (Ok(minor), Ok(name)) = (
            minor.parse::<u32>(),
            std::fs::read_to_string(b.path().join("dm/name")),
        ) else {
            continue;
        };
        out.push((name.trim().to_owned(), minor));
    }
    out
}

fn unmount_one(paths: &Paths, entry: &Entry) {
    let root = paths.run.join(&entry.name);
    let _ = umount2(root.as_path(), MntFlags::MNT_DETACH);
    let _ = std::fs::remove_dir(&root);
    let _ = dm::remove(&dm_name(entry));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_overlays_extension_usr_trees_read_only() {
        if !nix::unistd::Uid::effective().is_root() {
            eprintln!("skipped: needs root for mounts");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let usr = dir.path().join("usr");
        std::fs::create_dir_all(usr.join("lib/keelson/services.d")).unwrap();
        std::fs::write(usr.join("lib/keelson/services.d/system.toml"), "os").unwrap();
        let ext = dir.path().join("etcd");
        std::fs::create_dir_all(ext.join("usr/lib/keelson/services.d")).unwrap();
        std::fs::write(ext.join("usr/lib/keelson/services.d/etcd.toml"), "ext").unwrap();
        let roots = vec![("etcd".to_owned(), ext.clone())];
        check_services(&usr, &roots).unwrap();
        merge(&usr, &roots).unwrap();
        let both = list(&usr.join("lib/keelson/services.d"));
        let merged = is_merged(&usr);
        let write = std::fs::write(usr.join("x"), "y");
        umount2(usr.as_path(), MntFlags::MNT_DETACH).unwrap();
        assert!(merged);
        assert!(
            both.contains(&"etcd.toml".to_owned()) && both.contains(&"system.toml".to_owned()),
            "{both:?}"
        );
        assert!(write.is_err(), "the merged /usr must be read-only");
        assert!(!is_merged(&usr));
    }

    #[test]
    fn an_extension_may_not_hide_os_services() {
        let dir = tempfile::tempdir().unwrap();
        let usr = dir.path().join("usr");
        std::fs::create_dir_all(usr.join("lib/keelson/services.d")).unwrap();
        std::fs::write(usr.join("lib/keelson/services.d/system.toml"), "os").unwrap();
        let ext = dir.path().join("evil");
        std::fs::create_dir_all(ext.join("usr/lib/keelson/services.d")).unwrap();
        std::fs::write(ext.join("usr/lib/keelson/services.d/system.toml"), "x").unwrap();
        let e = check_services(&usr, &[("evil".into(), ext)])
            .unwrap_err()
            .to_string();
        assert_eq!(e, "extension evil: its /usr/lib/keelson/services.d/system.toml would hide the one of the OS");
    }

    #[test]
    fn tree_checks() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let os = Release::parse("ID=keelson\nVERSION_ID=0.2.0\n");
        let entry = Entry {
            name: "etcd".into(),
            version: "1".into(),
            roothash: "ab".repeat(32),
            built_for: "0.2.0".into(),
            source: "t".into(),
            listed_for: vec![],
        };
        let e = check_tree(root, &os, "0.2.0", &entry)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("no usr/lib/extension-release.d/extension-release.etcd"),
            "{e}"
        );
        std::fs::create_dir_all(root.join("usr/lib/extension-release.d")).unwrap();
        std::fs::write(
            root.join("usr/lib/extension-release.d/extension-release.etcd"),
            "ID=keelson\nVERSION_ID=0.2.0\n",
        )
        .unwrap();
        check_tree(root, &os, "0.2.0", &entry).unwrap();
        std::fs::create_dir_all(root.join("etc")).unwrap();
        let e = check_tree(root, &os, "0.2.0", &entry)
            .unwrap_err()
            .to_string();
        assert!(e.contains("it carries /etc"), "{e}");
    }
}
