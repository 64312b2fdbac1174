//! What the OS build (`build`) and the extension build (`extension`) share: their common options,
//! a service image staged from its pinned packages, with the mount points of the system services that run
//! from it; and a staged tree packed into EROFS with its dm-verity hash tree.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use keelson_common::verity;

use crate::config::{Compression, Image};
use crate::fetch::Debs;
use crate::images::{self, IMAGES_DIR};
use crate::lock::Lock;
use crate::manifest::{ImageManifest, Input};
use crate::rootfs;
use crate::services::{self, ServiceFile};
use crate::util::{derive, derive_guid};

/// The options of a build of either kind.
pub struct Options {
    /// The OS config or extension definition.
    pub config: PathBuf,
    /// Output directory (default `out/<name>` for an OS, `out/ext/<name>` for an extension).
    pub out: Option<PathBuf>,
    /// The `.deb` cache.
    pub cache: PathBuf,
    /// The Keelson workspace the image binaries are built from.
    pub workspace: PathBuf,
    /// Take the prebuilt image binaries from here instead of building them (an extension
    /// takes only the OS's sysd, for `sysd check`).
    pub bins: Option<PathBuf>,
    pub quiet: bool,
    /// Overrides the definition's `version` (release pipelines and the update tests build N
    /// and N+1 from one config; for an extension, its own version).
    pub version: Option<String>,
}

/// Stages service image `name` at `root`/usr/lib/keelson/images/`name` from its pinned
/// packages (in name order), then makes the mount points the services of `services` running
/// from it need (`root` is where their bind mounts' sources are looked up).
pub fn service_image(
    root: &Path,
    name: &str,
    spec: &Image,
    lock: &Lock,
    debs: &Debs,
    services: &[ServiceFile],
) -> Result<ImageManifest> {
    let dir = root.join(IMAGES_DIR).join(name);
    let mut img = images::Stage::new(&dir)?;
    let mut pins: Vec<_> = lock.image_packages(name).collect();
    pins.sort_by(|a, b| a.name.cmp(&b.name));
    let mut packages = Vec::new();
    for pin in pins {
        let deb = debs
            .path(&pin.name)
            .with_context(|| format!("{} deb", pin.name))?;
        img.unpack_deb(&pin.name, deb)
            .with_context(|| format!("building image {name}"))?;
        packages.push(Input::deb(pin));
    }
    let applet_links = img.finish(&spec.users)?;
    let mount_points = services::prepare_image(services, name, &dir, root)?;
    let files = rootfs::list(&dir)?;
    Ok(ImageManifest {
        name: name.to_owned(),
        description: spec.description.clone(),
        path: format!("/{IMAGES_DIR}/{name}"),
        packages,
        applet_links,
        mount_points,
        files: files.len(),
        size: files.iter().filter_map(|f| f.size).sum(),
    })
}

/// An EROFS image and its dm-verity hash tree.
pub struct VerifiedFs {
    /// The EROFS image's size in bytes.
    pub len: u64,
    pub tree: verity::Tree,
    /// The root hash in hex.
    pub roothash: String,
}

/// Packs `stage` into EROFS at `erofs` and writes its dm-verity hash device to `hash_device`.
/// The file system UUID, the verity salt and the verity UUID come from `seed`, for
/// `"<purpose> fs"`, `"<purpose> verity salt"` and `"<purpose> verity"`.
pub fn erofs_with_verity(
    stage: &Path,
    erofs: &Path,
    hash_device: &Path,
    epoch: u64,
    seed: &str,
    purpose: &str,
    compression: Compression,
) -> Result<VerifiedFs> {
    rootfs::mkfs_erofs(
        stage,
        erofs,
        epoch,
        derive_guid(seed, &format!("{purpose} fs")),
        compression,
    )?;
    let len = std::fs::metadata(erofs)?.len();
    let tree = verity::build(
        &mut std::fs::File::open(erofs)?,
        len,
        &derive(seed, &format!("{purpose} verity salt")),
        derive_guid(seed, &format!("{purpose} verity")).0,
    )?;
    std::fs::write(hash_device, &tree.hash_device)
        .with_context(|| format!("writing {}", hash_device.display()))?;
    let roothash = verity::to_hex(&tree.root_hash);
    Ok(VerifiedFs {
        len,
        tree,
        roothash,
    })
}
