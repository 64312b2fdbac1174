//! `image-build build`: the whole pipeline for one config, from pinned packages to `out/<name>/`.
//!
//! Every step is a function of the config, the lock, the workspace sources and the host tools'
//! versions: timestamps come from the lock's `source_date_epoch`, identifiers from the config's
//! seed, file modes are set explicitly, and every list is sorted.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use keelson_common::cmdline;
use keelson_common::gpt::Gpt;
use keelson_common::partitions::Slot;

use crate::config::ImageConfig;
use crate::disk;
use crate::esp;
use crate::fetch;
use crate::images::IMAGES_DIR;
use crate::initramfs;
use crate::kmod::ModuleTree;
use crate::lock::Lock;
use crate::manifest::{
    self, ImageInfo, Input, Manifest, Output, PartitionInfo, ToolVersion, MANIFEST, TRUSTED_ROOT,
    UKI_SLOT_B,
};
use crate::pipeline::{self, VerifiedFs};
use crate::rootfs;
use crate::secure_boot;
use crate::services::{self, ServiceFile};
use crate::uki;
use crate::util::{self, derive, derive_guid, mib, run, sha256_file, Progress};

/// Options of one OS build.
pub struct Options {
    pub common: pipeline::Options,
    /// Overrides the config's `[update] trusted_root`.
    pub trusted_root: Option<PathBuf>,
    /// System service files added after the config's own (variants of one config).
    pub extra_services: Vec<PathBuf>,
    /// Kernel command line arguments added after the config's own.
    pub kernel_args: Vec<String>,
    /// Sign systemd-boot and the UKIs with this Secure Boot key directory, and put its keys on
    /// the ESP for enrollment (see `secure_boot`).
    pub secure_boot_keys: Option<PathBuf>,
}

/// The os-release of an image; also the UKI's `.osrel`, which systemd-boot sorts entries by.
pub fn os_release(cfg: &ImageConfig) -> String {
    format!(
        "NAME=\"Keelson\"\nID=keelson\nPRETTY_NAME=\"Keelson {v} ({n})\"\nVERSION=\"{v}\"\nVERSION_ID={v}\nIMAGE_ID=keelson\nIMAGE_VERSION={v}\nVARIANT_ID={n}\nANSI_COLOR=\"0;36\"\n",
        v = cfg.version,
        n = cfg.name
    )
}

/// The UKI file name for a version with a fresh boot-assessment counter.
pub fn uki_name(version: &str, tries: u32) -> String {
    format!("keelson_{version}+{tries}.efi")
}

pub fn tool_version(name: &'static str, arg: &str) -> ToolVersion {
    let version = Command::new(name)
        .arg(arg)
        .output()
        .map(|o| {
            let text = if o.stdout.is_empty() {
                o.stderr
            } else {
                o.stdout
            };
            String::from_utf8_lossy(&text)
                .lines()
                .next()
                .unwrap_or("")
                .trim()
                .to_owned()
        })
        .unwrap_or_default();
    ToolVersion { name, version }
}

/// Runs the pipeline.
pub fn build(opts: &Options) -> Result<PathBuf> {
    let common = &opts.common;
    let mut cfg = ImageConfig::load(&common.config)?;
    if let Some(v) = &common.version {
        cfg.set_version(v)?;
    }
    cfg.kernel.cmdline.extend(opts.kernel_args.iter().cloned());
    for f in &opts.extra_services {
        cfg.services.push(std::path::absolute(f)?);
    }
    let trusted_root = match &opts.trusted_root {
        Some(p) => Some(p.clone()),
        None => cfg.trusted_root(),
    };
    if let Some(p) = &trusted_root {
        crate::update::check_root(p)?;
    }
    util::check_tools(util::TOOLS)?;
    let sb_keys = match &opts.secure_boot_keys {
        Some(dir) => {
            util::check_tools(&[secure_boot::CERT_TO_ESL, secure_boot::SIGN_ESL])?;
            Some(secure_boot::Keys::load(dir)?)
        }
        None => None,
    };
    let lock = Lock::load(&cfg)?;
    let service_files = services::load(&cfg)?;
    let epoch = lock.source_date_epoch;
    let published = common
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from("out").join(&cfg.name));
    let staging = util::Staging::new(&published)?;
    let out = staging.path.clone();
    let work = util::work_dir(&out)?;
    let mut p = Progress::new(common.quiet, 11);

    p.step(&format!("fetching {} pinned packages", lock.packages.len()));
    let debs = fetch::fetch_all(&lock, &common.cache, &cfg)?;
    let mut inputs = debs.inputs();
    p.done(&format!("{} verified", inputs.len()));

    p.step("unpacking kernel and bootloader");
    let kernel_pin = lock.pin(&cfg.kernel.package)?;
    let boot_pin = lock.pin(&cfg.bootloader.package)?;
    let kdir = work.join("kernel");
    initramfs::unpack_deb(debs.path(&kernel_pin.name).context("kernel deb")?, &kdir)?;
    let bdir = work.join("bootloader");
    initramfs::unpack_deb(debs.path(&boot_pin.name).context("bootloader deb")?, &bdir)?;
    let release = single_dir_name(&kdir.join("lib/modules"))?;
    let vmlinuz = kdir.join(format!("boot/vmlinuz-{release}"));
    let stub = bdir.join("usr/lib/systemd/boot/efi/linuxx64.efi.stub");
    let sdboot = bdir.join("usr/lib/systemd/boot/efi/systemd-bootx64.efi");
    for f in [&vmlinuz, &stub, &sdboot] {
        if !f.is_file() {
            bail!("{} is missing from the unpacked packages", f.display());
        }
    }
    p.done(&format!(
        "kernel {release}, vmlinuz {}",
        mib(std::fs::metadata(&vmlinuz)?.len())
    ));

    p.step("building the image binaries (static, reproducible)");
    let bins = match &common.bins {
        Some(b) => b.clone(),
        None => crate::binaries::build(&common.workspace, epoch, common.quiet)?,
    };
    let init_bin = bins.join("keelson-init");
    let sysd_bin = bins.join("sysd");
    let keelctl_bin = bins.join("keelctl");
    for (name, path) in [
        ("keelson-init", &init_bin),
        ("sysd", &sysd_bin),
        ("keelctl", &keelctl_bin),
    ] {
        let sha256 = sha256_file(path)
            .with_context(|| format!("image binary {name} not found in {}", bins.display()))?;
        inputs.push(Input {
            kind: "binary",
            name: name.to_owned(),
            version: Some(cfg.version.clone()),
            sha256,
        });
    }
    inputs.push(Input::file("config", &cfg.path)?);
    for f in &service_files {
        inputs.push(Input::file("services", &f.source)?);
    }
    // The image's own sysd is the authority on its service files.
    services::check(&sysd_bin, &service_files)?;
    p.done(&format!(
        "init {}, sysd {}, keelctl {}; {} service files checked",
        mib(std::fs::metadata(&init_bin)?.len()),
        mib(std::fs::metadata(&sysd_bin)?.len()),
        mib(std::fs::metadata(&keelctl_bin)?.len()),
        service_files.len()
    ));

    p.step("resolving kernel modules");
    let tree = ModuleTree::open(&kdir.join("lib/modules").join(&release))?;
    let closure = tree.closure("kernel.modules", &cfg.kernel.modules, &cfg.kernel.drivers)?;
    let root_closure = tree.closure("kernel.root_modules", &cfg.kernel.root_modules, &[])?;
    p.done(&format!(
        "{} modules, {} drivers, {} root modules requested; {} built in, {} files for the initramfs",
        cfg.kernel.modules.len(),
        cfg.kernel.drivers.len(),
        cfg.kernel.root_modules.len(),
        closure.builtin.len(),
        closure.deps.len()
    ));

    let osrel = os_release(&cfg);
    p.step("service images and system services");
    let stage = work.join("rootfs");
    rootfs::stage(
        &stage,
        &osrel,
        &[
            ("usr/sbin/init".into(), init_bin.clone(), 0o755),
            ("usr/bin/sysd".into(), sysd_bin.clone(), 0o755),
            ("usr/bin/keelctl".into(), keelctl_bin.clone(), 0o755),
        ],
    )?;
    if let Some(root_json) = &trusted_root {
        // The update agent's trust anchor: TUF root metadata, verified with the image.
        let dst = stage.join(TRUSTED_ROOT);
        std::fs::create_dir_all(dst.parent().context("trusted root path")?)?;
        std::fs::copy(root_json, &dst)
            .with_context(|| format!("installing {} as /{TRUSTED_ROOT}", root_json.display()))?;
        rootfs::set_mode(&dst, 0o644)?;
        inputs.push(Input::file("update-root", root_json)?);
    }
    let mut image_info = Vec::new();
    let mut oci_layouts = Vec::new();
    for (name, spec) in &cfg.images {
        image_info.push(pipeline::service_image(
            &stage,
            name,
            spec,
            &lock,
            &debs,
            &service_files,
        )?);
        let rel = format!("oci/{name}");
        oci_layouts.push(
            crate::oci::write(
                &stage.join(IMAGES_DIR).join(name),
                name,
                epoch,
                &out.join(&rel),
                &rel,
            )
            .with_context(|| format!("OCI layout of image {name}"))?,
        );
    }
    services::install(&stage, &service_files)?;
    let service_info = service_files
        .iter()
        .map(ServiceFile::manifest)
        .collect::<Result<Vec<_>>>()?;
    let images_text = if image_info.is_empty() {
        "no images".to_owned()
    } else {
        image_info
            .iter()
            .map(|i| {
                format!(
                    "{} ({} packages, {})",
                    i.name,
                    i.packages.len(),
                    mib(i.size)
                )
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    p.done(&format!(
        "{images_text}; {} services in {} files",
        service_info.iter().map(|s| s.services.len()).sum::<usize>(),
        service_info.len()
    ));

    p.step("root file system (EROFS) and dm-verity tree");
    rootfs::add_modules(&stage, &tree, &root_closure, &release)?;
    let (linked, saved) = rootfs::link_duplicates(&stage)?;
    let root_img = out.join("root.erofs");
    std::fs::create_dir_all(&out)?;
    let verity_img = out.join("root.verity");
    let VerifiedFs {
        len: root_len,
        tree: tree_v,
        roothash,
    } = pipeline::erofs_with_verity(
        &stage,
        &root_img,
        &verity_img,
        epoch,
        &cfg.seed,
        "root-a",
        cfg.disk.root_compression,
    )?;
    p.done(&format!(
        "root {} ({linked} duplicate files stored once, {} saved; compression {:?}), verity {}, root hash {}",
        mib(root_len),
        mib(saved),
        cfg.disk.root_compression,
        mib(tree_v.hash_device.len() as u64),
        &roothash[..16]
    ));

    p.step("initramfs");
    let (initrd, initrd_files) = initramfs::build(
        &std::fs::read(&init_bin)?,
        &osrel,
        &tree,
        &closure,
        &release,
        epoch,
    )?;
    let initrd_path = out.join("initramfs.img");
    std::fs::write(&initrd_path, &initrd)?;
    p.done(&mib(initrd.len() as u64));

    p.step("unified kernel image");
    let mut args: Vec<String> = cfg.kernel.cmdline.clone();
    args.push(format!("{}={}", cmdline::SLOT, Slot::A));
    args.push(format!("{}={roothash}", cmdline::ROOTHASH));
    let cmdline_text = args.join(" ");
    let cmdline_path = out.join("cmdline");
    std::fs::write(&cmdline_path, format!("{cmdline_text}\n"))?;
    let osrel_path = work.join("os-release");
    std::fs::write(&osrel_path, &osrel)?;
    let cmdline_sec = work.join("cmdline");
    std::fs::write(&cmdline_sec, &cmdline_text)?;
    std::fs::copy(&vmlinuz, out.join("vmlinuz"))?;
    let uki_file = uki_name(&cfg.version, cfg.bootloader.tries);
    let uki_path = out.join(&uki_file);
    uki::build(
        &stub,
        &osrel_path,
        &cmdline_sec,
        &vmlinuz,
        &initrd_path,
        &uki_path,
        epoch,
    )?;
    // The same kernel, initramfs and root for slot B: an update payload carries one UKI per
    // slot because the command line (which names the slot) is part of the signed UKI.
    let mut args_b: Vec<String> = cfg.kernel.cmdline.clone();
    args_b.push(format!("{}={}", cmdline::SLOT, Slot::B));
    args_b.push(format!("{}={roothash}", cmdline::ROOTHASH));
    let cmdline_b = work.join("cmdline-b");
    std::fs::write(&cmdline_b, args_b.join(" "))?;
    uki::build(
        &stub,
        &osrel_path,
        &cmdline_b,
        &vmlinuz,
        &initrd_path,
        &out.join(UKI_SLOT_B),
        epoch,
    )?;
    let signed = match &sb_keys {
        Some(keys) => {
            // The signature is the last thing added: everything before it is key-independent.
            keys.sign_file(&uki_path)?;
            keys.sign_file(&out.join(UKI_SLOT_B))?;
            format!(", signed by {:?}", keys.db.subject())
        }
        None => String::new(),
    };
    p.done(&format!(
        "{uki_file} {} (and {UKI_SLOT_B}){signed}",
        mib(std::fs::metadata(&uki_path)?.len())
    ));

    p.step("EFI system partition (FAT32)");
    let mut loader_conf = format!(
        "timeout {}\neditor no\nauto-entries no\nauto-firmware no\nconsole-mode keep\n",
        cfg.bootloader.timeout
    );
    let mut bootloader = std::fs::read(&sdboot)?;
    let mut key_files = Vec::new();
    if let Some(keys) = &sb_keys {
        bootloader = keys
            .db
            .sign(&bootloader)
            .with_context(|| format!("signing {}", sdboot.display()))?;
        key_files = keys.enrollment(&work.join("secure-boot"), &cfg.seed, epoch)?;
        // Enroll the ESP's keys when the firmware is in setup mode (systemd-boot 252).
        loader_conf.push_str("secure-boot-enroll force\n");
    }
    let mut esp_files = vec![
        ("EFI/BOOT/BOOTX64.EFI".to_owned(), bootloader),
        (format!("EFI/Linux/{uki_file}"), std::fs::read(&uki_path)?),
        ("loader/loader.conf".to_owned(), loader_conf.into_bytes()),
    ];
    esp_files.extend(key_files);
    let serial = derive(&cfg.seed, "esp serial");
    let esp_img = esp::build(
        cfg.disk.esp_mib << 20,
        u32::from_le_bytes([serial[0], serial[1], serial[2], serial[3]]),
        epoch,
        &esp_files,
    )?;
    let esp_path = work.join("esp.img");
    std::fs::write(&esp_path, &esp_img)?;
    p.done(&format!(
        "{}{}",
        mib(esp_img.len() as u64),
        if sb_keys.is_some() {
            format!(", Secure Boot keys in {}", secure_boot::ESP_KEYS)
        } else {
            String::new()
        }
    ));

    p.step("data file system (ext4) and GPT disk");
    let data_path = work.join("data.ext4");
    rootfs::mkfs_data(
        &data_path,
        &work,
        cfg.disk.data_mib << 20,
        epoch,
        derive_guid(&cfg.seed, "data fs"),
    )?;
    let disk_raw = out.join("disk.raw");
    let parts = disk::layout(&cfg.disk, &esp_path, &root_img, &verity_img, &data_path);
    let gpt = disk::assemble(&disk_raw, &cfg.seed, &parts, disk::OS_TAIL)?;
    let disk_qcow2 = out.join("disk.qcow2");
    let _ = std::fs::remove_file(&disk_qcow2);
    run(Command::new("qemu-img")
        .args(["convert", "-q", "-f", "raw", "-O", "qcow2"])
        .arg(&disk_raw)
        .arg(&disk_qcow2))
    .context("qemu-img (package qemu-utils)")?;
    p.done(&format!(
        "disk {} (sparse), qcow2 {}",
        mib(std::fs::metadata(&disk_raw)?.len()),
        mib(std::fs::metadata(&disk_qcow2)?.len())
    ));

    p.step("manifest (SBOM)");
    let mut outputs = Vec::new();
    for name in [
        "disk.raw",
        "disk.qcow2",
        "vmlinuz",
        "initramfs.img",
        "cmdline",
        "root.erofs",
        "root.verity",
        uki_file.as_str(),
        UKI_SLOT_B,
    ] {
        let path = out.join(name);
        outputs.push(Output {
            path: name.to_owned(),
            size: std::fs::metadata(&path)?.len(),
            sha256: sha256_file(&path)?,
        });
    }
    let manifest = Manifest {
        image: ImageInfo {
            name: cfg.name.clone(),
            version: cfg.version.clone(),
            description: cfg.description.clone(),
            config: cfg.path.display().to_string(),
            source_date_epoch: epoch,
            kernel_release: release.clone(),
            roothash_a: roothash.clone(),
            cmdline: cmdline_text.clone(),
            uki: uki_file.clone(),
        },
        inputs,
        tools: vec![
            tool_version("mkfs.erofs", "--version"),
            tool_version("mkfs.ext4", "-V"),
            tool_version("objcopy", "--version"),
            tool_version("qemu-img", "--version"),
        ],
        outputs,
        partitions: partition_info(&gpt),
        images: image_info,
        oci_images: oci_layouts,
        services: service_info,
        kernel_modules: closure
            .deps
            .keys()
            .chain(root_closure.deps.keys())
            .cloned()
            .collect(),
        rootfs: rootfs::list(&stage)?,
        initramfs: initrd_files,
    };
    manifest::write(&out, &manifest)?;
    std::fs::remove_dir_all(&work)?;
    staging.publish(&published)?;
    p.done(MANIFEST);
    p.finish(&format!(
        "{} -> {}",
        cfg.path.display(),
        published.display()
    ));
    Ok(published)
}

pub fn partition_info(gpt: &Gpt) -> Vec<PartitionInfo> {
    gpt.partitions()
        .map(|(number, p)| PartitionInfo {
            number,
            label: p.name.clone(),
            type_guid: p.type_guid.to_string(),
            uuid: p.unique_guid.to_string(),
            first_lba: p.first_lba,
            last_lba: p.last_lba,
            attributes: p.attributes,
        })
        .collect()
}

pub(crate) fn single_dir_name(dir: &Path) -> Result<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    match names.as_slice() {
        [one] => Ok(one.clone()),
        _ => bail!(
            "expected one kernel release in {}, found {names:?}",
            dir.display()
        ),
    }
}
