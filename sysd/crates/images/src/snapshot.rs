//! Layers stored once, stacked with overlayfs (the containerd overlayfs snapshotter model).
//!
//! ```text
//! STORE/layers/<chain id hex>/          one layer applied once: what it adds, changes and
//!                                       removes over the layers below it (overlayfs whiteouts
//!                                       and opaque directories)
//! STORE/layers/.tmp-<hex>-<pid>-<n>/    a layer being applied (removed by the next apply)
//! STORE/<manifest hex>/layers.json      the image's chain ids, bottom first
//! STORE/<manifest hex>/merged           a read-only overlay of them (images of two or more
//!                                       layers), which sysd reads (users, argv[0])
//! ```
//!
//! A layer is named by its chain id (image-spec config.md: the digest of the layers below it
//! and its own diff_id), so images built on the same base share its directories, and a pull
//! of an image whose layers are present unpacks nothing. The bottom layer is applied into an
//! empty directory; each next one onto an overlay mount of the layers below with an empty
//! upper directory, so the kernel itself records what the layer removed (whiteouts) and hard
//! links to files below work (copy-up): the upper directory is the layer. The same checks
//! apply as before (see [`crate::oci_layout`]): the tar applier is the same code, every layer
//! still streams through its digest check, and the layer is renamed into place only after it
//! matched. Containers mount the layer directories themselves as the overlay's lower
//! directories (no overlay over an overlay).
//!
//! An image unpacked by an older sysd (`STORE/<manifest hex>/rootfs`, one merged copy) is used
//! as it is; an older sysd (after a rollback) finds no `rootfs` in a new image's directory and
//! unpacks it its own way.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::{bail, Context, Result};
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use sha2::{Digest as _, Sha256};

use crate::oci_layout::{is_real_dir, remove_any, TempDir};

/// Where layers live, under the store.
pub const LAYERS: &str = "layers";
/// An image's chain ids (bottom first), in `STORE/<manifest hex>/`.
pub const LIST: &str = "layers.json";
/// An image's read-only view, in `STORE/<manifest hex>/`.
pub const VIEW: &str = "merged";
/// The kernel takes mount options of at most a page (legacy `mount(2)` data).
const MAX_OPTIONS: usize = 4095;

/// The chain ids (`sha256:<hex>`) of layers whose diff_ids are `ids` (bottom first):
/// ChainID(L0) = DiffID(L0), ChainID(L0..Ln) = sha256(ChainID(L0..Ln-1) + " " + DiffID(Ln)).
pub fn chain_ids(ids: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(ids.len());
    for id in ids {
        let next = match out.last() {
            None => id.clone(),
            Some(below) => format!(
                "sha256:{}",
                hex::encode(Sha256::digest(format!("{below} {id}")))
            ),
        };
        out.push(next);
    }
    out
}

fn hex_of(chain: &str) -> &str {
    chain.strip_prefix("sha256:").unwrap_or(chain)
}

pub fn layer_dir(store: &Path, chain: &str) -> PathBuf {
    store.join(LAYERS).join(hex_of(chain))
}

/// Layers an unpack in this process is making or about to list: garbage collection keeps
/// them (a layer is renamed into place before the image that uses it lists it).
static BUSY: Mutex<Option<HashMap<String, usize>>> = Mutex::new(None);
/// One image directory and view mount change at a time (two unpacks of one image must not
/// replace its directory or mount its view twice).
static VIEWS: Mutex<()> = Mutex::new(());

/// Holds layers against garbage collection while an unpack runs; released on drop.
pub struct Busy(Vec<String>);

impl Busy {
    pub fn hold(chains: &[String]) -> Busy {
        let mut busy = BUSY.lock().unwrap_or_else(|p| p.into_inner());
        let map = busy.get_or_insert_with(HashMap::new);
        for c in chains {
            *map.entry(hex_of(c).to_string()).or_default() += 1;
        }
        Busy(chains.iter().map(|c| hex_of(c).to_string()).collect())
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        let mut busy = BUSY.lock().unwrap_or_else(|p| p.into_inner());
        let Some(map) = busy.as_mut() else { return };
        for h in &self.0 {
            if let Some(n) = map.get_mut(h) {
                *n -= 1;
                if *n == 0 {
                    map.remove(h);
                }
            }
        }
    }
}

fn busy() -> HashSet<String> {
    let busy = BUSY.lock().unwrap_or_else(|p| p.into_inner());
    busy.as_ref()
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default()
}

/// Layers one unpack applied that are neither durable nor in place yet: each in its temporary
/// directory, applied on top of the layers below it (in place, or pending here).
/// [`commit`](Pending::commit) makes them all durable with one `syncfs` and renames them into
/// place bottom first; dropped without a commit, they are removed. One flush for the image
/// instead of one per layer: a `syncfs` writes back the whole file system, blobs still
/// downloading included, and the next layer waited for it.
#[derive(Default)]
pub struct Pending {
    layers: Vec<(String, TempDir, PathBuf)>,
    /// The chain ids this unpack renamed into place (what [`discard`] removes if it fails).
    pub made: Vec<String>,
}

impl Pending {
    /// Where layer `chain` is while pending.
    fn dir(&self, chain: &str) -> Option<&Path> {
        self.layers
            .iter()
            .find(|(c, ..)| c == chain)
            .map(|(_, _, upper)| upper.as_path())
    }

    /// Makes the pending layers durable (one `syncfs` of the store's file system), then
    /// renames each into place, bottom first, adding its chain id to [`made`](Self::made), and
    /// fsyncs the layers directory. A crash before the renames leaves only temporary
    /// directories (removed by the next apply); one between them leaves whole, durable lower
    /// layers in place.
    pub fn commit(&mut self, store: &Path) -> Result<()> {
        let Some((_, first, _)) = self.layers.first() else {
            return Ok(());
        };
        let dir = fs::File::open(&first.path)
            .with_context(|| format!("opening {}", first.path.display()))?;
        nix::unistd::syncfs(std::os::fd::AsRawFd::as_raw_fd(&dir))
            .with_context(|| format!("syncfs {}", store.display()))?;
        drop(dir);
        for (chain, _tmp, upper) in self.layers.drain(..) {
            let target = layer_dir(store, &chain);
            match fs::rename(&upper, &target) {
                Ok(()) => self.made.push(chain),
                // Another unpack applied the same layer meanwhile: keep theirs.
                Err(_) if is_real_dir(&target) => {}
                Err(e) => {
                    return Err(e).with_context(|| {
                        format!("renaming {} to {}", upper.display(), target.display())
                    })
                }
            }
        }
        let layers = store.join(LAYERS);
        fs::File::open(&layers)
            .and_then(|d| d.sync_all())
            .with_context(|| format!("fsync {}", layers.display()))
    }
}

/// The layer `chains.last()` (on top of the others), applied by `apply` into `pending` if it
/// is not in the store yet (then the answer is `true`). `apply` gets the directory to apply
/// the layer's tar onto: an empty directory for the bottom layer, else an overlay of the layers
/// below (in the store, or in `pending`) whose upper directory becomes the layer.
pub fn ensure_layer(
    store: &Path,
    chains: &[String],
    pending: &mut Pending,
    apply: impl FnOnce(&Path) -> Result<()>,
) -> Result<bool> {
    let Some((top, below)) = chains.split_last() else {
        bail!("no layer to apply");
    };
    let target = layer_dir(store, top);
    if is_real_dir(&target) {
        return Ok(false);
    }
    let layers = store.join(LAYERS);
    fs::create_dir_all(&layers).with_context(|| format!("creating {}", layers.display()))?;
    let hex = hex_of(top);
    crate::oci_layout::remove_stale(&layers, hex);
    let tmp = TempDir::new(&layers, hex)?;
    let upper = tmp.path.join("fs");
    fs::create_dir(&upper).with_context(|| format!("creating {}", upper.display()))?;
    fs::set_permissions(&upper, fs::Permissions::from_mode(0o755))
        .with_context(|| format!("chmod {}", upper.display()))?;
    if below.is_empty() {
        apply(&upper)?;
    } else {
        let (work, merged) = (tmp.path.join("work"), tmp.path.join("mnt"));
        for d in [&work, &merged] {
            fs::create_dir(d).with_context(|| format!("creating {}", d.display()))?;
        }
        let lowers = |pending: &Pending| -> Vec<PathBuf> {
            below
                .iter()
                .rev()
                .map(|c| {
                    pending
                        .dir(c)
                        .map_or_else(|| layer_dir(store, c), Path::to_path_buf)
                })
                .collect()
        };
        // redirect_dir and metacopy off: the upper directory must hold whole files and plain
        // directories, so it means the same under any later stack of the same layers.
        let options = |pending: &Pending| {
            overlay_options(
                &lowers(pending),
                Some((&upper, &work)),
                ",redirect_dir=off,metacopy=off",
            )
        };
        let options = match options(pending) {
            Ok(o) => o,
            // A pending layer's temporary path is longer than its place in the store: with
            // many layers, put those below in place first (as one more commit) and retry.
            Err(_) if !pending.layers.is_empty() => {
                pending.commit(store)?;
                options(pending)?
            }
            Err(e) => return Err(e),
        };
        mount(
            Some("overlay"),
            &merged,
            Some("overlay"),
            MsFlags::MS_NODEV,
            Some(options.as_str()),
        )
        .with_context(|| {
            format!(
                "mounting the {} layers below {} to apply it (needs root and overlayfs)",
                below.len(),
                top
            )
        })?;
        let applied = apply(&merged);
        let unmounted = umount2(&merged, MntFlags::empty())
            .with_context(|| format!("unmounting {}", merged.display()));
        applied?;
        unmounted?;
        remove_any(&work)?;
    }
    pending.layers.push((top.clone(), tmp, upper));
    Ok(true)
}

/// After an unpack failed: removes the layers it applied (`made`) that no other unpack holds
/// (no image lists a layer that was not there before), so a refused image leaves nothing.
pub fn discard(store: &Path, made: &[String]) {
    let busy = BUSY.lock().unwrap_or_else(|p| p.into_inner());
    for chain in made {
        let others = busy
            .as_ref()
            .and_then(|m| m.get(hex_of(chain)))
            .is_some_and(|n| *n > 1);
        if !others {
            let _ = remove_any(&layer_dir(store, chain));
        }
    }
    // Only if empty.
    let _ = fs::remove_dir(store.join(LAYERS));
}

/// `lowerdir=` (top first), optional `upperdir=`/`workdir=`, then `extra`: refused if a path
/// holds overlayfs's separators or the whole does not fit the kernel's page of options.
pub fn overlay_options(
    lowers: &[PathBuf],
    upper: Option<(&Path, &Path)>,
    extra: &str,
) -> Result<String> {
    let show = |p: &Path| -> Result<String> {
        let s = p.display().to_string();
        if s.contains([',', ':', '\\']) {
            bail!("path {s} cannot contain ',', ':' or '\\' (overlayfs option syntax)");
        }
        Ok(s)
    };
    let lower: Vec<String> = lowers.iter().map(|p| show(p)).collect::<Result<_>>()?;
    let mut options = format!("lowerdir={}", lower.join(":"));
    if let Some((upper, work)) = upper {
        options += &format!(",upperdir={},workdir={}", show(upper)?, show(work)?);
    }
    options += extra;
    if options.len() > MAX_OPTIONS {
        bail!(
            "an image of {} layers: their directories do not fit one overlay mount's options ({} bytes, the kernel takes {MAX_OPTIONS})",
            lowers.len(),
            options.len()
        );
    }
    Ok(options)
}

/// The image `hex` made of `chains` (bottom first, every layer present): records them in its
/// directory and returns its root to read (the layer itself for one layer, else a read-only
/// overlay mounted at `merged`) and the layer directories, top first, for a container's mount.
pub fn image_view(store: &Path, hex: &str, chains: &[String]) -> Result<(PathBuf, Vec<PathBuf>)> {
    let lowers: Vec<PathBuf> = chains.iter().rev().map(|c| layer_dir(store, c)).collect();
    let dir = store.join(hex);
    let list = serde_json::to_vec(chains).context("encoding the layer list")?;
    // One at a time in this process: two services starting on one image must not replace
    // the directory, or mount its view twice, under each other.
    let _one = VIEWS.lock().unwrap_or_else(|p| p.into_inner());
    if fs::read(dir.join(LIST)).ok().as_deref() != Some(list.as_slice()) {
        record(store, hex, &list)?;
    }
    let Some(only) = lowers.first().filter(|_| lowers.len() == 1) else {
        let view = dir.join(VIEW);
        mount_view(&dir, &view, &lowers)?;
        return Ok((view, lowers));
    };
    Ok((only.clone(), lowers))
}

/// Records the image's layer list in `STORE/<hex>/` (replaced durably: the list is what
/// garbage collection keeps layers by) with an empty view directory beside it; a view mounted
/// over other layers goes first. Under [`VIEWS`].
fn record(store: &Path, hex: &str, list: &[u8]) -> Result<()> {
    let dir = store.join(hex);
    unmount_locked(&dir)?;
    let view = dir.join(VIEW);
    fs::create_dir_all(&view).with_context(|| format!("creating {}", view.display()))?;
    keelson_common::durable::replace(&dir.join(LIST), list)
        .with_context(|| format!("writing {}", dir.join(LIST).display()))
}

fn mounted(dir: &Path, view: &Path) -> Result<bool> {
    let d = fs::metadata(dir).with_context(|| format!("inspecting {}", dir.display()))?;
    let v = fs::metadata(view).with_context(|| format!("inspecting {}", view.display()))?;
    Ok(d.dev() != v.dev())
}

/// Under [`VIEWS`].
fn mount_view(dir: &Path, view: &Path, lowers: &[PathBuf]) -> Result<()> {
    if mounted(dir, view)? {
        return Ok(());
    }
    let options = overlay_options(lowers, None, "")?;
    mount(
        Some("overlay"),
        view,
        Some("overlay"),
        MsFlags::MS_RDONLY | MsFlags::MS_NODEV | MsFlags::MS_NOSUID,
        Some(options.as_str()),
    )
    .with_context(|| {
        format!(
            "mounting the image's {} layers at {}",
            lowers.len(),
            view.display()
        )
    })
}

/// Unmounts `DIR/merged` if it is mounted (before `DIR` is removed).
pub fn unmount_view(dir: &Path) -> Result<()> {
    let _one = VIEWS.lock().unwrap_or_else(|p| p.into_inner());
    unmount_locked(dir)
}

/// [`unmount_view`] under [`VIEWS`].
fn unmount_locked(dir: &Path) -> Result<()> {
    let view = dir.join(VIEW);
    if !is_real_dir(&view) {
        return Ok(());
    }
    while mounted(dir, &view)? {
        umount2(&view, MntFlags::MNT_DETACH)
            .with_context(|| format!("unmounting {}", view.display()))?;
    }
    Ok(())
}

/// What [`gc`] removed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Removed {
    pub layers: usize,
    pub bytes: u64,
}

/// Removes the layers no image directory of the store lists (and no unpack in this process
/// holds), and temporary directories other processes left.
pub fn gc(store: &Path) -> Result<Removed> {
    let mut keep = busy();
    let listing = match fs::read_dir(store) {
        Ok(l) => l,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Removed::default()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", store.display())),
    };
    for item in listing.flatten() {
        let list = item.path().join(LIST);
        let Ok(bytes) = fs::read(&list) else { continue };
        // An unreadable list keeps everything: removing a layer an image needs is worse than
        // keeping one it does not.
        let chains: Vec<String> = serde_json::from_slice(&bytes)
            .with_context(|| format!("{}: not a layer list; nothing removed", list.display()))?;
        keep.extend(chains.iter().map(|c| hex_of(c).to_string()));
    }
    let mut removed = Removed::default();
    let layers = store.join(LAYERS);
    let Ok(listing) = fs::read_dir(&layers) else {
        return Ok(removed);
    };
    let ours = format!("-{}-", std::process::id());
    for item in listing.flatten() {
        let name = item.file_name().to_string_lossy().into_owned();
        let gone = match name.strip_prefix(".tmp-") {
            Some(rest) => !rest.contains(&ours),
            None => !keep.contains(&name),
        };
        if gone {
            removed.bytes += crate::store::disk_usage(&item.path());
            remove_any(&item.path())?;
            removed.layers += usize::from(!name.starts_with(".tmp-"));
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_ids_follow_the_image_spec() {
        let ids = ["sha256:aa".to_string(), "sha256:bb".to_string()];
        let chains = chain_ids(&ids);
        assert_eq!(chains[0], "sha256:aa");
        assert_eq!(
            chains[1],
            format!(
                "sha256:{}",
                hex::encode(Sha256::digest("sha256:aa sha256:bb"))
            )
        );
        // Same top layer on another base: another chain.
        let other = chain_ids(&["sha256:cc".to_string(), "sha256:bb".to_string()]);
        assert_ne!(other[1], chains[1]);
    }

    #[test]
    fn gc_keeps_listed_and_busy_layers_only() {
        let t = tempfile::tempdir().unwrap();
        let store = t.path();
        let layer = |name: &str| {
            fs::create_dir_all(store.join(LAYERS).join(name).join("etc")).unwrap();
            fs::write(store.join(LAYERS).join(name).join("etc/f"), name).unwrap();
        };
        for name in ["a1", "b2", "c3", "d4", ".tmp-e5-1-0"] {
            layer(name);
        }
        let ours = format!(".tmp-f6-{}-0", std::process::id());
        layer(&ours);
        fs::create_dir_all(store.join("m1")).unwrap();
        fs::write(store.join("m1").join(LIST), r#"["sha256:a1","sha256:b2"]"#).unwrap();
        let _busy = Busy::hold(&["sha256:c3".to_string()]);
        let removed = gc(store).unwrap();
        let mut left: Vec<String> = fs::read_dir(store.join(LAYERS))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, [ours.as_str(), "a1", "b2", "c3"]);
        assert_eq!(removed.layers, 1);
        assert!(removed.bytes > 0);

        // A list it cannot read stops it before anything is removed.
        fs::write(store.join("m1").join(LIST), "not json").unwrap();
        let e = gc(store).unwrap_err();
        assert!(
            format!("{e:#}").contains("not a layer list; nothing removed"),
            "{e:#}"
        );
        assert!(store.join(LAYERS).join("a1").exists());
    }

    #[test]
    fn options_refuse_separators_and_overlong_stacks() {
        let e = overlay_options(&[PathBuf::from("/a:b")], None, "").unwrap_err();
        assert!(format!("{e}").contains("/a:b cannot contain"), "{e}");
        let many: Vec<PathBuf> = (0..100)
            .map(|n| PathBuf::from(format!("/var/lib/keelson/images/layers/{n:064}")))
            .collect();
        let e = overlay_options(&many, None, "").unwrap_err();
        assert!(format!("{e}").contains("an image of 100 layers"), "{e}");
        assert_eq!(
            overlay_options(
                &[PathBuf::from("/t"), PathBuf::from("/b")],
                Some((Path::new("/u"), Path::new("/w"))),
                ",x"
            )
            .unwrap(),
            "lowerdir=/t:/b,upperdir=/u,workdir=/w,x"
        );
    }
}
