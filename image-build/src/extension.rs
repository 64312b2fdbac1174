//! `image-build extension`: a system extension from its definition
//! (`configs/extensions/<name>.toml`) to `out/ext/<name>/`.
//!
//! The image is a UAPI Discoverable Disk Image, what systemd-sysext takes: a GPT with the
//! EROFS file system in a root-x86-64 partition and its dm-verity hash tree (veritysetup
//! format) in a root-x86-64-verity partition, the partitions' UUIDs being the first and the
//! last 128 bits of the root hash, as the Discoverable Partitions Specification has it. The
//! tree holds `/usr` only: `usr/lib/extension-release.d/extension-release.<name>` (naming the OS
//! `ID` and `VERSION_ID` it fits), the service images under `usr/lib/keelson/images/` and the
//! service files under `usr/lib/keelson/services.d/`, so that the extension's /usr merged over
//! the OS's gives sysd the same absolute paths as the OS's own system services. See
//! docs/extensions.md.
//!
//! Reproducible like the OS build: timestamps from the extension's lock, the file system UUID,
//! the verity salt and UUID and the disk GUID from its seed, partition UUIDs from the root hash.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use keelson_common::gpt::Guid;
use keelson_common::partitions::{ROOT_X86_64_TYPE, ROOT_X86_64_VERITY_TYPE};
use keelson_common::verity;

use crate::build::{partition_info, tool_version};
use crate::config::{Compression, ExtensionConfig, ImageConfig};
use crate::disk::{self, Part};
use crate::fetch;
use crate::images::IMAGES_DIR;
use crate::kmod::ModuleTree;
use crate::lock::Lock;
use crate::manifest::{
    self, ExtensionKernelManifest, ExtensionManifest, ExtensionSizes, Input, Output, ROOTHASH,
};
use crate::pipeline::{self, VerifiedFs};
use crate::rootfs;
use crate::services::{self, ServiceFile, SERVICES_DIR};
use crate::util::{self, mib, sha256_file, Progress};

/// Where extension-release files live in an extension's tree.
pub const EXTENSION_RELEASE_DIR: &str = "usr/lib/extension-release.d";
/// Where an extension's kernel modules and sysctls live in its tree:
/// `<dir>/<name>/modules/<release>/` (`modules.dep`, `modules.load`, `kernel/…`) and
/// `<dir>/<name>/sysctl.conf`. The node (`keelson_extensions::kernel`) reads the same paths.
pub const KERNEL_DIR: &str = "usr/lib/keelson/kernel";

/// Options of one extension build.
pub struct Options {
    pub common: pipeline::Options,
    /// Overrides the OS config's `version` (building the extension for another OS version).
    pub os_version: Option<String>,
}

/// `usr/lib/extension-release.d/extension-release.<name>`: the OS it fits (`ID`,
/// `VERSION_ID`, as systemd-sysext matches them against os-release) and what it is.
pub fn extension_release(name: &str, version: &str, os_version: &str) -> String {
    format!(
        "ID=keelson\nVERSION_ID={os_version}\nSYSEXT_ID={name}\nSYSEXT_VERSION_ID={version}\nSYSEXT_SCOPE=system\nARCHITECTURE=x86-64\n"
    )
}

/// Where a service file of extension `ext` goes in its tree: `<ext>.toml` for the file named
/// like the extension, `<ext>-<stem>.toml` for others, so extensions never collide with each
/// other or with the OS's `NN-<stem>.toml`.
pub fn service_dest(ext: &str, stem: &str) -> String {
    if stem == ext {
        format!("{SERVICES_DIR}/{ext}.toml")
    } else {
        format!("{SERVICES_DIR}/{ext}-{stem}.toml")
    }
}

/// The GPT partition UUIDs of a verity-protected partition pair: the first 128 bits of the
/// root hash for the data partition, the last 128 bits for the hash partition (UAPI
/// Discoverable Partitions Specification; systemd-dissect matches them to a given root hash).
pub fn partition_uuids(root_hash: &[u8; 32]) -> (Guid, Guid) {
    let mut first = [0u8; 16];
    let mut last = [0u8; 16];
    first.copy_from_slice(&root_hash[..16]);
    last.copy_from_slice(&root_hash[16..]);
    (Guid(first), Guid(last))
}

/// Rounds up to whole 4 KiB blocks.
fn blocks(len: u64) -> u64 {
    len.div_ceil(verity::BLOCK) * verity::BLOCK
}

/// Builds the extension; returns its output directory.
pub fn build(opts: &Options) -> Result<PathBuf> {
    let common = &opts.common;
    let mut ext = ExtensionConfig::load(&common.config)?;
    if let Some(v) = &common.version {
        ext.set_version(v)?;
    }
    let mut os = ImageConfig::load(&ext.os_config())
        .with_context(|| format!("the OS config of {}", ext.path.display()))?;
    if let Some(v) = &opts.os_version {
        os.set_version(v)?;
    }
    util::check_tools(util::EXTENSION_TOOLS)?;
    let lock = Lock::load(&ext)?;
    let epoch = lock.source_date_epoch;
    let os_services = services::load(&os)?;
    let mut files = Vec::new();
    for path in ext.service_files() {
        let dest = service_dest(&ext.name, services::stem(&path)?);
        if files.iter().any(|(_, d)| *d == dest) {
            bail!(
                "{}: two service files would be installed as /{dest}: rename one",
                ext.path.display()
            );
        }
        files.push((path, dest));
    }
    let known: Vec<&str> = ext.images.keys().map(String::as_str).collect();
    // Only the extension's own images: an extension may be listed under other OS versions,
    // whose images are not the ones it was checked against.
    let ext_services = services::load_files(files, &known, "this extension", &ext.path)?;
    let out = common
        .out
        .clone()
        .unwrap_or_else(|| Path::new("out/ext").join(&ext.name));
    let work = util::work_dir(&out)?;
    let mut p = Progress::new(common.quiet, 6);

    p.step(&format!("fetching {} pinned packages", lock.packages.len()));
    let debs = fetch::fetch_all(&lock, &common.cache, &ext)?;
    let mut inputs = debs.inputs();
    p.done(&format!("{} verified", inputs.len()));

    p.step("kernel modules and sysctls");
    let stage = work.join("tree");
    stage_tree(&stage)?;
    let kernel = kernel_files(&stage, &ext, &os, &common.cache, &work, &mut inputs)?;
    p.done(&match &kernel {
        None => "none".to_owned(),
        Some(k) => format!(
            "{} modules for kernel {} ({} files with their dependencies, {} built in), {} sysctls",
            k.modules.len(),
            k.release,
            k.files,
            k.builtin.len(),
            k.sysctls.len()
        ),
    });

    p.step("checking the service files with the OS's sysd");
    let sysd = match &common.bins {
        Some(b) => b.join("sysd"),
        None => {
            // The OS's binaries, built as the OS build builds them (same epoch, same cache).
            let os_epoch = Lock::load(&os)?.source_date_epoch;
            crate::binaries::build(&common.workspace, os_epoch, common.quiet)?.join("sysd")
        }
    };
    let sysd_sha = sha256_file(&sysd).with_context(|| {
        format!(
            "the OS's sysd (to check the services) at {}",
            sysd.display()
        )
    })?;
    inputs.push(Input {
        kind: "checked-by",
        name: "sysd".into(),
        version: Some(os.version.clone()),
        sha256: sysd_sha,
    });
    inputs.push(Input::file("config", &ext.path)?);
    inputs.push(Input::file("os-config", &os.path)?);
    for f in &ext_services {
        inputs.push(Input::file("services", &f.source)?);
    }
    // The OS's system services and the extension's, loaded together as the node loads them.
    services::check(&sysd, os_services.iter().chain(&ext_services))?;
    p.done(&format!(
        "{} services in {} files, with the {} of {} {}",
        ext_services.iter().map(|f| f.services.len()).sum::<usize>(),
        ext_services.len(),
        os_services.iter().map(|f| f.services.len()).sum::<usize>(),
        os.name,
        os.version
    ));

    p.step("service images, service files, extension-release");
    let image_info = ext
        .images
        .iter()
        .map(|(name, spec)| {
            pipeline::service_image(&stage, name, spec, &lock, &debs, &ext_services)
        })
        .collect::<Result<Vec<_>>>()?;
    services::install(&stage, &ext_services)?;
    let release = extension_release(&ext.name, &ext.version, &os.version);
    let release_path = stage
        .join(EXTENSION_RELEASE_DIR)
        .join(format!("extension-release.{}", ext.name));
    std::fs::write(&release_path, &release)?;
    rootfs::set_mode(&release_path, 0o644)?;
    let service_info = ext_services
        .iter()
        .map(ServiceFile::manifest)
        .collect::<Result<Vec<_>>>()?;
    let tree_files = rootfs::list(&stage)?;
    outside_usr(&tree_files)?;
    let tree_size: u64 = tree_files.iter().filter_map(|f| f.size).sum();
    p.done(&format!(
        "{}; {} files, {}",
        image_info
            .iter()
            .map(|i| format!("{} ({} packages)", i.name, i.packages.len()))
            .collect::<Vec<_>>()
            .join(", "),
        tree_files.len(),
        mib(tree_size)
    ));

    p.step("file system (EROFS) and dm-verity tree");
    let erofs = work.join("root.erofs");
    let verity_path = work.join("root.verity");
    let VerifiedFs {
        len: erofs_len,
        tree,
        roothash,
    } = pipeline::erofs_with_verity(
        &stage,
        &erofs,
        &verity_path,
        epoch,
        &ext.seed,
        "extension",
        // Uncompressed: the next version ships as a zstd patch against these bytes
        // (docs/extensions.md); compressed extension images are not measured yet.
        Compression::None,
    )?;
    p.done(&format!(
        "file system {}, verity {}, root hash {}",
        mib(erofs_len),
        mib(tree.hash_device.len() as u64),
        &roothash[..16]
    ));

    p.step("Discoverable Disk Image and manifest");
    std::fs::create_dir_all(&out)?;
    let (root_uuid, verity_uuid) = partition_uuids(&tree.root_hash);
    let label = format!("{}_{}", ext.name, ext.version);
    let parts = [
        Part {
            label: label.clone(),
            type_guid: ROOT_X86_64_TYPE,
            size: blocks(erofs_len),
            attributes: 0,
            content: Some(&erofs),
            uuid: Some(root_uuid),
        },
        Part {
            label: format!("{label}_verity"),
            type_guid: ROOT_X86_64_VERITY_TYPE,
            size: blocks(tree.hash_device.len() as u64),
            attributes: 0,
            content: Some(&verity_path),
            uuid: Some(verity_uuid),
        },
    ];
    let raw_name = format!("{}.raw", ext.name);
    let raw = out.join(&raw_name);
    let gpt = disk::assemble(&raw, &ext.seed, &parts, disk::MIN_TAIL)?;
    std::fs::write(out.join(ROOTHASH), format!("{roothash}\n"))?;
    let raw_len = std::fs::metadata(&raw)?.len();
    let manifest = ExtensionManifest {
        name: ext.name.clone(),
        version: ext.version.clone(),
        description: ext.description.clone(),
        os_version: os.version.clone(),
        roothash: roothash.clone(),
        raw: Output {
            path: raw_name.clone(),
            size: raw_len,
            sha256: sha256_file(&raw)?,
        },
        sizes: ExtensionSizes {
            raw: raw_len,
            erofs: erofs_len,
            verity: tree.hash_device.len() as u64,
            tree: tree_size,
        },
        config: ext.path.display().to_string(),
        os_config: os.path.display().to_string(),
        source_date_epoch: epoch,
        extension_release: release,
        inputs,
        tools: vec![tool_version("mkfs.erofs", "--version")],
        partitions: partition_info(&gpt),
        images: image_info,
        services: service_info,
        kernel,
        files: tree_files,
    };
    manifest::write(&out, &manifest)?;
    std::fs::remove_dir_all(&work)?;
    p.done(&format!("{raw_name} {}", mib(raw_len)));
    p.finish(&format!(
        "{} {} for {} {} -> {}",
        ext.name,
        ext.version,
        os.name,
        os.version,
        out.display()
    ));
    Ok(out)
}

/// `[kernel]` of the definition into the tree: the modules' closure for the OS config's kernel
/// under `KERNEL_DIR/<name>/modules/<release>/`, the sysctls as `KERNEL_DIR/<name>/sysctl.conf`.
/// A module the kernel has neither as a file nor built in is refused, naming it.
fn kernel_files(
    stage: &Path,
    ext: &ExtensionConfig,
    os: &ImageConfig,
    cache: &Path,
    work: &Path,
    inputs: &mut Vec<Input>,
) -> Result<Option<ExtensionKernelManifest>> {
    let k = &ext.kernel;
    if k.modules.is_empty() && k.sysctls.is_empty() {
        return Ok(None);
    }
    let dir = stage.join(KERNEL_DIR).join(&ext.name);
    mkdirs(stage, &dir)?;
    let mut manifest = ExtensionKernelManifest {
        release: String::new(),
        package: String::new(),
        modules: Vec::new(),
        builtin: Vec::new(),
        files: 0,
        sysctls: k.sysctls.clone(),
    };
    if !k.modules.is_empty() {
        let os_lock = Lock::load(os)?;
        let pin = os_lock.pin(&os.kernel.package)?;
        let deb = fetch::fetch(pin, cache, &crate::lock::lock_path(os), &os.path)?;
        inputs.push(Input::deb(pin));
        let kdir = work.join("kernel");
        crate::initramfs::unpack_deb(&deb, &kdir)?;
        let release = crate::build::single_dir_name(&kdir.join("lib/modules"))?;
        let tree = ModuleTree::open(&kdir.join("lib/modules").join(&release))?;
        let closure = tree
            .closure("kernel.modules", &k.modules, &[])
            .with_context(|| {
                format!(
                    "{}: the OS's kernel {release} ({} {})",
                    ext.path.display(),
                    pin.name,
                    pin.version
                )
            })?;
        let base = Path::new(KERNEL_DIR)
            .join(&ext.name)
            .join("modules")
            .join(&release);
        mkdirs(stage, &stage.join(&base))?;
        rootfs::add_modules_at(stage, &base, &tree, &closure)?;
        manifest.files = closure.deps.len();
        manifest.modules = closure.load;
        manifest.builtin = closure.builtin;
        manifest.package = format!("{} {}", pin.name, pin.version);
        manifest.release = release;
        std::fs::remove_dir_all(&kdir)?;
    }
    if !k.sysctls.is_empty() {
        let path = dir.join("sysctl.conf");
        std::fs::write(&path, sysctl_conf(&k.sysctls))?;
        rootfs::set_mode(&path, 0o644)?;
    }
    Ok(Some(manifest))
}

/// sysctl.conf text: a comment, then `key = value` lines in key order.
pub fn sysctl_conf(sysctls: &std::collections::BTreeMap<String, String>) -> String {
    let mut out = String::from(
        "# Set by the node when it activates this extension, before its services start.\n",
    );
    for (k, v) in sysctls {
        out.push_str(&format!("{k} = {}\n", v.trim()));
    }
    out
}

/// Creates `dir` and its missing parents below `stage`, each 0755 (the umask must not reach
/// the image).
fn mkdirs(stage: &Path, dir: &Path) -> Result<()> {
    let rel = dir
        .strip_prefix(stage)
        .context("a directory outside the tree")?;
    let mut acc = stage.to_owned();
    for part in rel.components() {
        acc.push(part);
        if !acc.exists() {
            std::fs::create_dir(&acc).with_context(|| format!("creating {}", acc.display()))?;
            rootfs::set_mode(&acc, 0o755)?;
        }
    }
    Ok(())
}

/// The skeleton of an extension's tree: `/usr` and the directories Keelson reads in it, each
/// with an explicit mode (the umask must not reach the image).
fn stage_tree(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    rootfs::set_mode(dir, 0o755)?;
    for d in [
        "usr",
        "usr/lib",
        EXTENSION_RELEASE_DIR,
        "usr/lib/keelson",
        IMAGES_DIR,
        SERVICES_DIR,
    ] {
        let p = dir.join(d);
        std::fs::create_dir(&p).with_context(|| format!("creating {}", p.display()))?;
        rootfs::set_mode(&p, 0o755)?;
    }
    Ok(())
}

/// An extension may only carry `/usr` (systemd-sysext merges nothing else, and neither does
/// the node).
fn outside_usr(files: &[rootfs::FileEntry]) -> Result<()> {
    if let Some(f) = files
        .iter()
        .find(|f| f.path != "/usr" && !f.path.starts_with("/usr/"))
    {
        bail!("{} is outside /usr: an extension carries /usr only", f.path);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extension_release_names_the_os_and_the_extension() {
        let text = extension_release("etcd", "3.4.23-1", "0.1.0");
        let fields: Vec<&str> = text.lines().collect();
        assert_eq!(
            fields,
            [
                "ID=keelson",
                "VERSION_ID=0.1.0",
                "SYSEXT_ID=etcd",
                "SYSEXT_VERSION_ID=3.4.23-1",
                "SYSEXT_SCOPE=system",
                "ARCHITECTURE=x86-64"
            ]
        );
    }

    #[test]
    fn service_files_are_named_after_the_extension() {
        assert_eq!(
            service_dest("etcd", "etcd"),
            "usr/lib/keelson/services.d/etcd.toml"
        );
        assert_eq!(
            service_dest("etcd", "backup"),
            "usr/lib/keelson/services.d/etcd-backup.toml"
        );
    }

    #[test]
    fn partition_uuids_are_the_halves_of_the_root_hash() {
        let mut hash = [0u8; 32];
        for (i, b) in hash.iter_mut().enumerate() {
            *b = i as u8;
        }
        let (root, verity) = partition_uuids(&hash);
        assert_eq!(root.to_string(), "00010203-0405-0607-0809-0a0b0c0d0e0f");
        assert_eq!(verity.to_string(), "10111213-1415-1617-1819-1a1b1c1d1e1f");
    }

    #[test]
    fn sysctls_are_written_in_key_order() {
        let mut m = std::collections::BTreeMap::new();
        m.insert("net.ipv4.ip_forward".to_owned(), " 1 ".to_owned());
        m.insert(
            "net.bridge.bridge-nf-call-iptables".to_owned(),
            "1".to_owned(),
        );
        let text = sysctl_conf(&m);
        let lines: Vec<&str> = text.lines().skip(1).collect();
        assert_eq!(
            lines,
            [
                "net.bridge.bridge-nf-call-iptables = 1",
                "net.ipv4.ip_forward = 1"
            ]
        );
    }

    #[test]
    fn only_usr_is_allowed() {
        let entry = |path: &str| rootfs::FileEntry {
            path: path.into(),
            mode: "40755".into(),
            size: None,
            sha256: None,
            target: None,
        };
        assert!(outside_usr(&[entry("/usr"), entry("/usr/lib")]).is_ok());
        let err = outside_usr(&[entry("/usr"), entry("/etc")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("/etc is outside /usr"), "{err}");
        assert!(outside_usr(&[entry("/usrx")]).is_err());
    }
}
