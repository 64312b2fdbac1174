//! What a build leaves in `out/<name>/`: the file names that later steps (`update add`, the
//! tests) read, and the types of `manifest.json`, the image's SBOM. `build` writes them and
//! `update` reads them; neither knows the other.

use std::path::Path;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::lock::Pin;
use crate::rootfs::FileEntry;
use crate::util::sha256_file;

/// The SBOM of a build, in the image directory.
pub const MANIFEST: &str = "manifest.json";
/// Where the trusted TUF root metadata is installed in the image's root.
pub const TRUSTED_ROOT: &str = "usr/share/keelson/update/root.json";
/// The slot-B UKI of a build (same kernel, initramfs and root hash; `keelson.slot=b`).
pub const UKI_SLOT_B: &str = "uki-slot-b.efi";

/// Writes `dir/manifest.json` (an OS build's [`Manifest`] or an [`ExtensionManifest`]).
pub fn write(dir: &Path, manifest: &impl Serialize) -> Result<()> {
    let path = dir.join(MANIFEST);
    std::fs::write(&path, serde_json::to_string_pretty(manifest)? + "\n")
        .with_context(|| format!("writing {}", path.display()))
}

/// The part of [`ImageInfo`] that `update add` publishes, read back from `manifest.json`.
#[derive(Debug, Deserialize)]
pub struct ImageId {
    pub name: String,
    pub version: String,
    pub roothash_a: String,
    pub uki: String,
}

/// Reads the `image` table of `dir/manifest.json`.
pub fn read_image_id(dir: &Path) -> Result<ImageId> {
    #[derive(Deserialize)]
    struct Head {
        image: ImageId,
    }
    let path = dir.join(MANIFEST);
    let text = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
    let head: Head =
        serde_json::from_slice(&text).with_context(|| format!("{}", path.display()))?;
    Ok(head.image)
}

/// `manifest.json`: every input, tool, output, partition and file of the build.
#[derive(Serialize)]
pub struct Manifest {
    pub image: ImageInfo,
    pub inputs: Vec<Input>,
    pub tools: Vec<ToolVersion>,
    pub outputs: Vec<Output>,
    pub partitions: Vec<PartitionInfo>,
    pub images: Vec<ImageManifest>,
    /// The service images as OCI image layouts (`oci/<name>/`).
    pub oci_images: Vec<crate::oci::Layout>,
    pub services: Vec<ServiceManifest>,
    pub kernel_modules: Vec<String>,
    pub rootfs: Vec<FileEntry>,
    pub initramfs: Vec<FileEntry>,
}

/// What the image is: its name and version, and what identifies slot A's boot.
#[derive(Serialize)]
pub struct ImageInfo {
    pub name: String,
    pub version: String,
    pub description: String,
    pub config: String,
    pub source_date_epoch: u64,
    pub kernel_release: String,
    pub roothash_a: String,
    pub cmdline: String,
    pub uki: String,
}

#[derive(Serialize)]
pub struct Input {
    pub kind: &'static str,
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    pub sha256: String,
}

impl Input {
    /// A pinned Debian package.
    pub fn deb(pin: &Pin) -> Input {
        Input {
            kind: "deb",
            name: pin.name.clone(),
            version: Some(pin.version.clone()),
            sha256: pin.sha256.clone(),
        }
    }

    /// A file the build read (a config, a service file, a trusted root), named by its path.
    pub fn file(kind: &'static str, path: &Path) -> Result<Input> {
        Ok(Input {
            kind,
            name: path.display().to_string(),
            version: None,
            sha256: sha256_file(path)?,
        })
    }
}

/// A service image in the root: what it is made of.
#[derive(Serialize)]
pub struct ImageManifest {
    pub name: String,
    pub description: String,
    pub path: String,
    pub packages: Vec<Input>,
    pub applet_links: usize,
    pub mount_points: Vec<String>,
    pub files: usize,
    pub size: u64,
}

/// A system service file in the root.
#[derive(Serialize)]
pub struct ServiceManifest {
    pub path: String,
    pub source: String,
    pub sha256: String,
    pub services: Vec<String>,
}

#[derive(Serialize)]
pub struct ToolVersion {
    pub name: &'static str,
    pub version: String,
}

#[derive(Serialize)]
pub struct Output {
    pub path: String,
    pub size: u64,
    pub sha256: String,
}

#[derive(Serialize)]
pub struct PartitionInfo {
    pub number: usize,
    pub label: String,
    pub type_guid: String,
    pub uuid: String,
    pub first_lba: u64,
    pub last_lba: u64,
    pub attributes: u64,
}

/// The root hash of an extension build, hex on one line, beside its image.
pub const ROOTHASH: &str = "roothash";

/// An extension's `manifest.json` (in `out/ext/<name>/`): what it is, what it was built for,
/// its sizes and every input, partition and file.
#[derive(Serialize)]
pub struct ExtensionManifest {
    /// `SYSEXT_ID`.
    pub name: String,
    /// `SYSEXT_VERSION_ID`.
    pub version: String,
    pub description: String,
    /// The OS `VERSION_ID` it is built for.
    pub os_version: String,
    /// dm-verity root hash of its file system (hex).
    pub roothash: String,
    /// The Discoverable Disk Image.
    pub raw: Output,
    pub sizes: ExtensionSizes,
    pub config: String,
    pub os_config: String,
    pub source_date_epoch: u64,
    /// `usr/lib/extension-release.d/extension-release.<name>`, as installed.
    pub extension_release: String,
    pub inputs: Vec<Input>,
    pub tools: Vec<ToolVersion>,
    pub partitions: Vec<PartitionInfo>,
    pub images: Vec<ImageManifest>,
    pub services: Vec<ServiceManifest>,
    /// `[kernel]`: the modules and sysctls the node loads and sets on activation.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kernel: Option<ExtensionKernelManifest>,
    pub files: Vec<FileEntry>,
}

/// What an extension carries for the kernel.
#[derive(Serialize)]
pub struct ExtensionKernelManifest {
    /// The kernel release its modules are for (empty without modules).
    pub release: String,
    /// The OS's kernel package they come from (`name version`).
    pub package: String,
    /// The requested modules the node loads, in order.
    pub modules: Vec<String>,
    /// Requested modules built into that kernel (nothing to load).
    pub builtin: Vec<String>,
    /// Module files shipped (the requested ones and their dependencies).
    pub files: usize,
    pub sysctls: std::collections::BTreeMap<String, String>,
}

/// Sizes of an extension build, in bytes.
#[derive(Serialize)]
pub struct ExtensionSizes {
    /// The whole image file.
    pub raw: u64,
    /// The EROFS file system (partition 1's content).
    pub erofs: u64,
    /// The dm-verity hash device (partition 2's content).
    pub verity: u64,
    /// The files of the tree before packing (images, services, extension-release).
    pub tree: u64,
}

/// What `update add --extension` and `update extension` publish, read back from an
/// extension's `manifest.json`.
#[derive(Debug, Deserialize)]
pub struct ExtensionId {
    pub name: String,
    pub version: String,
    pub os_version: String,
    pub roothash: String,
    pub raw: OutputId,
}

/// An output as read back.
#[derive(Debug, Deserialize)]
pub struct OutputId {
    pub path: String,
    pub size: u64,
    pub sha256: String,
}

/// Reads `dir/manifest.json` of an extension build.
pub fn read_extension_id(dir: &Path) -> Result<ExtensionId> {
    let path = dir.join(MANIFEST);
    let text = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_slice(&text).with_context(|| {
        format!(
            "{}: not the manifest of an extension build (image-build extension writes it)",
            path.display()
        )
    })
}
