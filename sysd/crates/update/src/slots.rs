//! Where the slots are: the running slot and root hash (kernel command line), the partitions of
//! the boot disk (found by GPT type and label, as stage 1 finds them), the ESP and its UKIs
//! (`EFI/Linux/keelson_<version>[+LEFT[-DONE]].efi`, each naming its slot and root hash on its
//! `.cmdline`).

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use keelson_common::cmdline::{self, Cmdline};
use keelson_common::gpt::Gpt;
use keelson_common::partitions::{self, Slot};

/// Block devices (or, in host tests, plain files) of one slot.
#[derive(Debug, Clone)]
pub struct SlotDevices {
    pub root: PathBuf,
    pub root_size: u64,
    pub verity: PathBuf,
    pub verity_size: u64,
}

/// The node's boot layout.
#[derive(Debug, Clone)]
pub struct Layout {
    pub running: Slot,
    /// Root hash on the running kernel's command line.
    pub roothash: String,
    /// The other slot's devices.
    pub target: SlotDevices,
    /// The running slot's root as dm-verity serves it (every block read is checked against
    /// the root hash the node booted with): what delta updates copy chunks from. None when it
    /// cannot be found (then updates download the full root).
    pub running_root: Option<PathBuf>,
    /// The mounted ESP.
    pub esp: PathBuf,
    /// Where the UEFI variables are (efivarfs), None without UEFI.
    pub efivars: Option<PathBuf>,
}

/// Where to look for things (the real node, or a test's files).
#[derive(Debug, Clone)]
pub enum Discovery {
    /// /proc/cmdline, /sys/block and /dev, the ESP mounted at `esp_mount` (by us if need be).
    Node { esp_mount: PathBuf },
    /// Fixed paths (host tests).
    #[cfg_attr(not(test), allow(dead_code))]
    Files {
        cmdline: String,
        target: SlotDevices,
        /// The running slot's root, as [`Layout::running_root`].
        running_root: Option<PathBuf>,
        esp: PathBuf,
        /// A directory of UEFI variables as efivarfs shows them (None: no UEFI).
        efivars: Option<PathBuf>,
    },
}

impl Discovery {
    /// The running slot and root hash from the kernel command line.
    pub fn running(&self) -> Result<(Slot, String)> {
        let text = match self {
            Discovery::Node { .. } => {
                std::fs::read_to_string("/proc/cmdline").context("reading /proc/cmdline")?
            }
            Discovery::Files { cmdline, .. } => cmdline.clone(),
        };
        let c = Cmdline::parse(&text);
        let slot = c
            .get(cmdline::SLOT)
            .and_then(Slot::parse)
            .with_context(|| format!("no {}= on the kernel command line", cmdline::SLOT))?;
        let hash = c.get(cmdline::ROOTHASH).unwrap_or("").to_string();
        Ok((slot, hash))
    }

    /// The whole layout; mounts the ESP on a node.
    pub fn layout(&self) -> Result<Layout> {
        let (running, roothash) = self.running()?;
        match self {
            Discovery::Files {
                target,
                running_root,
                esp,
                efivars,
                ..
            } => Ok(Layout {
                running,
                roothash,
                target: target.clone(),
                running_root: running_root.clone(),
                esp: esp.clone(),
                efivars: efivars.clone(),
            }),
            Discovery::Node { esp_mount } => {
                let disk = boot_disk(running)?;
                let gpt = Gpt::read(&mut File::open(&disk.dev)?)
                    .with_context(|| format!("reading the GPT of {}", disk.dev.display()))?;
                let other = running.other();
                let part = |ty, label: &str| -> Result<(PathBuf, u64)> {
                    let (n, p) = gpt
                        .find(ty, label)
                        .with_context(|| format!("no partition `{label}` on {}", disk.name))?;
                    Ok((partition_dev(&disk.name, n)?, p.size_bytes()))
                };
                let (root, root_size) = part(partitions::ROOT_X86_64_TYPE, &other.root_label())?;
                let (verity, verity_size) =
                    part(partitions::ROOT_X86_64_VERITY_TYPE, &other.verity_label())?;
                let (esp_dev, _) = part(partitions::ESP_TYPE, partitions::ESP_LABEL)?;
                mount_esp(&esp_dev, esp_mount)?;
                Ok(Layout {
                    running,
                    roothash,
                    target: SlotDevices {
                        root,
                        root_size,
                        verity,
                        verity_size,
                    },
                    running_root: self.running_root(),
                    esp: esp_mount.clone(),
                    efivars: crate::secure_boot::node_efivars()?,
                })
            }
        }
    }

    /// The running slot's root as dm-verity serves it ([`Layout::running_root`]).
    pub fn running_root(&self) -> Option<PathBuf> {
        match self {
            Discovery::Files { running_root, .. } => running_root.clone(),
            Discovery::Node { .. } => verity_root(),
        }
    }

    /// Just the ESP (for the boot assessment), or None without one (direct kernel boot).
    pub fn esp(&self) -> Option<PathBuf> {
        match self {
            Discovery::Files { esp, .. } => Some(esp.clone()),
            Discovery::Node { esp_mount } => {
                // Booted without UEFI (direct kernel boot): no boot entries to assess.
                if !Path::new("/sys/firmware/efi").exists() {
                    return None;
                }
                let (running, _) = self.running().ok()?;
                let disk = boot_disk(running).ok()?;
                let gpt = Gpt::read(&mut File::open(&disk.dev).ok()?).ok()?;
                let (n, _) = gpt.find(partitions::ESP_TYPE, partitions::ESP_LABEL)?;
                let dev = partition_dev(&disk.name, n).ok()?;
                match mount_esp(&dev, esp_mount) {
                    Ok(()) => Some(esp_mount.clone()),
                    Err(err) => {
                        // ENODEV: vfat is not loaded yet (init loads it in the background).
                        if err.downcast_ref::<nix::errno::Errno>()
                            == Some(&nix::errno::Errno::ENODEV)
                        {
                            tracing::debug!("update: cannot mount the ESP yet: {err:#}");
                        } else {
                            tracing::warn!("update: cannot mount the ESP: {err:#}");
                        }
                        None
                    }
                }
            }
        }
    }
}

/// The device `/` is mounted from, if it is the dm-verity mapping stage 1 made (named `root`):
/// `/dev/dm-<minor>`.
fn verity_root() -> Option<PathBuf> {
    let st = nix::sys::stat::stat("/").ok()?;
    let (major, minor) = (libc::major(st.st_dev), libc::minor(st.st_dev));
    let name = std::fs::read_to_string(format!("/sys/dev/block/{major}:{minor}/dm/name")).ok()?;
    if name.trim() != "root" {
        tracing::info!("update: / is on {major}:{minor}, not the dm-verity root; no delta updates");
        return None;
    }
    let dev = PathBuf::from(format!("/dev/dm-{minor}"));
    dev.exists().then_some(dev)
}

struct Disk {
    name: String,
    dev: PathBuf,
}

/// The disk the running root is on: the device behind `/` (the dm-verity mapping init made),
/// through its underlying partition, to that partition's disk, whose GPT must then hold the
/// running slot's root partition. Never a guess by partition label: another disk carrying a
/// `root-a` (a USB stick, a second Keelson disk) must not become the update's target.
fn boot_disk(running: Slot) -> Result<Disk> {
    let st = nix::sys::stat::stat("/").context("stat /")?;
    let (major, minor) = (libc::major(st.st_dev), libc::minor(st.st_dev));
    let name = disk_behind(Path::new("/sys"), major, minor)
        .with_context(|| format!("finding the disk behind / (device {major}:{minor})"))?;
    let dev = Path::new("/dev").join(&name);
    let gpt =
        Gpt::read(&mut File::open(&dev).with_context(|| format!("opening {}", dev.display()))?)
            .with_context(|| format!("reading the GPT of {}", dev.display()))?;
    if gpt
        .find(partitions::ROOT_X86_64_TYPE, &running.root_label())
        .is_none()
    {
        bail!(
            "{} holds the running root but has no `{}` partition",
            dev.display(),
            running.root_label()
        );
    }
    Ok(Disk { name, dev })
}

/// The whole disk under block device `major:minor` (as sysfs at `sys` shows it): a partition's
/// disk, or, for a device-mapper device, the one disk all its underlying partitions are on.
fn disk_behind(sys: &Path, major: u32, minor: u32) -> Result<String> {
    let node = std::fs::canonicalize(sys.join(format!("dev/block/{major}:{minor}")))
        .with_context(|| format!("{}/dev/block/{major}:{minor}", sys.display()))?;
    // A partition is a directory inside its disk's (`…/block/vda/vda2`).
    let disk_of = |part: &Path| -> Result<String> {
        if !part.join("partition").exists() {
            bail!("{} is not a partition", part.display());
        }
        part.parent()
            .and_then(|d| d.file_name())
            .and_then(|n| n.to_str())
            .map(str::to_owned)
            .with_context(|| format!("no disk above {}", part.display()))
    };
    if node.join("partition").exists() {
        return disk_of(&node);
    }
    // dm-verity: its `slaves` are the data and hash partitions, on one disk.
    let mut slaves: Vec<PathBuf> = std::fs::read_dir(node.join("slaves"))
        .with_context(|| {
            format!(
                "{} is neither a partition nor a mapped device",
                node.display()
            )
        })?
        .filter_map(|e| e.ok())
        .filter_map(|e| std::fs::canonicalize(e.path()).ok())
        .collect();
    slaves.sort();
    let disks: Vec<String> = slaves.iter().map(|p| disk_of(p)).collect::<Result<_>>()?;
    match disks.first() {
        Some(d) if disks.iter().all(|x| x == d) => Ok(d.clone()),
        Some(_) => bail!("{} sits on more than one disk: {disks:?}", node.display()),
        None => bail!("{} has no underlying device", node.display()),
    }
}

/// The /dev node of partition `number` of `disk` (`vda3`, `nvme0n1p3`).
fn partition_dev(disk: &str, number: usize) -> Result<PathBuf> {
    let dir = Path::new("/sys/block").join(disk);
    for entry in std::fs::read_dir(&dir)?.filter_map(|e| e.ok()) {
        let n = std::fs::read_to_string(entry.path().join("partition")).unwrap_or_default();
        if n.trim() == number.to_string() {
            return Ok(Path::new("/dev").join(entry.file_name()));
        }
    }
    bail!("partition {number} of {disk} has no device")
}

fn mount_esp(dev: &Path, at: &Path) -> Result<()> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let at_str = at.to_string_lossy();
    if mounts
        .lines()
        .any(|l| l.split(' ').nth(1) == Some(at_str.as_ref()))
    {
        return Ok(());
    }
    std::fs::create_dir_all(at)?;
    nix::mount::mount(
        Some(dev),
        at,
        Some("vfat"),
        nix::mount::MsFlags::MS_NOSUID
            | nix::mount::MsFlags::MS_NODEV
            | nix::mount::MsFlags::MS_NOEXEC,
        // The kernel's default iocharset (ascii) is a module the image does not carry;
        // cp437 and iso8859-1 are in the root's modules for exactly this.
        Some("umask=0077,shortname=mixed,codepage=437,iocharset=iso8859-1"),
    )
    .with_context(|| format!("mounting the ESP {} on {}", dev.display(), at.display()))?;
    Ok(())
}

/// One UKI on the ESP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub file: String,
    pub version: String,
    /// Boot-assessment counter: tries left, tries done (None once blessed).
    pub tries_left: Option<u32>,
    pub tries_done: Option<u32>,
    pub slot: Option<Slot>,
    pub roothash: Option<String>,
}

impl Entry {
    /// The name with the counter removed (what blessing renames it to).
    pub fn blessed_name(&self) -> String {
        format!("keelson_{}.efi", self.version)
    }
}

/// `EFI/Linux` below an ESP mount.
pub fn uki_dir(esp: &Path) -> PathBuf {
    esp.join("EFI/Linux")
}

/// Parses `keelson_<version>[+LEFT[-DONE]].efi`.
pub fn parse_name(file: &str) -> Option<(String, Option<u32>, Option<u32>)> {
    let stem = file.strip_prefix("keelson_")?.strip_suffix(".efi")?;
    match stem.rsplit_once('+') {
        None => Some((stem.to_string(), None, None)),
        Some((v, counter)) => {
            let (left, done) = match counter.split_once('-') {
                Some((l, d)) => (l.parse().ok()?, Some(d.parse().ok()?)),
                None => (counter.parse().ok()?, None),
            };
            Some((v.to_string(), Some(left), done))
        }
    }
}

/// Every Keelson UKI on the ESP, with the slot and root hash from its command line.
pub fn entries(esp: &Path) -> Result<Vec<Entry>> {
    let dir = uki_dir(esp);
    let mut out = Vec::new();
    let rd = match std::fs::read_dir(&dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e).with_context(|| format!("reading {}", dir.display())),
    };
    for e in rd.filter_map(|e| e.ok()) {
        let file = e.file_name().to_string_lossy().into_owned();
        let Some((version, tries_left, tries_done)) = parse_name(&file) else {
            continue;
        };
        let cmd = pe_section(&e.path(), ".cmdline").ok().flatten();
        let c = cmd
            .as_deref()
            .map(|b| Cmdline::parse(&String::from_utf8_lossy(b)));
        out.push(Entry {
            file,
            version,
            tries_left,
            tries_done,
            slot: c
                .as_ref()
                .and_then(|c| c.get(cmdline::SLOT))
                .and_then(Slot::parse),
            roothash: c
                .as_ref()
                .and_then(|c| c.get(cmdline::ROOTHASH))
                .map(str::to_string),
        });
    }
    out.sort_by(|a, b| a.file.cmp(&b.file));
    Ok(out)
}

/// The contents of a PE section (`.cmdline`, `.osrel`) of a UKI, trailing NULs removed.
pub fn pe_section(path: &Path, name: &str) -> Result<Option<Vec<u8>>> {
    let mut f = File::open(path)?;
    let mut head = vec![0u8; 4096];
    let n = f.read(&mut head)?;
    head.truncate(n);
    let u16_at =
        |o: usize| -> Option<u16> { Some(u16::from_le_bytes([*head.get(o)?, *head.get(o + 1)?])) };
    let u32_at = |o: usize| -> Option<u32> {
        Some(u32::from_le_bytes([
            *head.get(o)?,
            *head.get(o + 1)?,
            *head.get(o + 2)?,
            *head.get(o + 3)?,
        ]))
    };
    if head.get(0..2) != Some(b"MZ") {
        bail!("{}: not a PE image", path.display());
    }
    let pe = u32_at(0x3c).context("short PE header")? as usize;
    if head.get(pe..pe + 4) != Some(b"PE\0\0") {
        bail!("{}: no PE signature", path.display());
    }
    let sections = u16_at(pe + 6).context("short COFF header")? as usize;
    let opt = u16_at(pe + 20).context("short COFF header")? as usize;
    let table = pe + 24 + opt;
    for i in 0..sections.min(96) {
        let s = table + i * 40;
        let Some(raw_name) = head.get(s..s + 8) else {
            break;
        };
        let sname = String::from_utf8_lossy(raw_name);
        if sname.trim_end_matches('\0') != name {
            continue;
        }
        let vsize = u32_at(s + 8).context("section header")? as usize;
        let rsize = u32_at(s + 16).context("section header")? as usize;
        let ptr = u32_at(s + 20).context("section header")? as u64;
        let len = vsize.min(rsize).min(1 << 20);
        let mut buf = vec![0u8; len];
        f.seek(SeekFrom::Start(ptr))?;
        f.read_exact(&mut buf)?;
        while buf.last() == Some(&0) {
            buf.pop();
        }
        return Ok(Some(buf));
    }
    Ok(None)
}

/// Renames an entry on the ESP and makes the rename durable.
///
/// On vfat the new directory entry gets the file's size and first cluster only when the
/// *file's* inode is written back: fsyncing the directory alone persists an empty entry (a
/// power cut then leaves a 0-byte UKI). So the file is fsynced, then the whole file system.
pub fn rename(esp: &Path, from: &str, to: &str) -> Result<()> {
    keelson_common::durable::vfat::rename(&uki_dir(esp), from, to)
        .with_context(|| format!("renaming {from} to {to} on the ESP"))
}

/// Deletes an entry on the ESP durably.
pub fn remove(esp: &Path, file: &str) -> Result<()> {
    keelson_common::durable::vfat::remove(&uki_dir(esp), file)
        .with_context(|| format!("removing {file} from the ESP"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// sysfs as the kernel lays it out for `/` on dm-verity over `vdb2` + `vdb3`, with a
    /// `vda` (sorting first) that holds a `root-a` too.
    #[test]
    fn the_boot_disk_is_the_one_behind_root_not_the_first_with_the_label() {
        let t = tempfile::tempdir().unwrap();
        let sys = t.path();
        let pci = sys.join("devices/pci0000:00");
        for disk in ["vda", "vdb"] {
            for n in [2, 3] {
                let part = pci.join(format!("virtio{disk}/block/{disk}/{disk}{n}"));
                std::fs::create_dir_all(&part).unwrap();
                std::fs::write(part.join("partition"), format!("{n}\n")).unwrap();
            }
        }
        let dm = sys.join("devices/virtual/block/dm-0");
        std::fs::create_dir_all(dm.join("slaves")).unwrap();
        for n in [2, 3] {
            std::os::unix::fs::symlink(
                pci.join(format!("virtiovdb/block/vdb/vdb{n}")),
                dm.join(format!("slaves/vdb{n}")),
            )
            .unwrap();
        }
        std::fs::create_dir_all(sys.join("dev/block")).unwrap();
        std::os::unix::fs::symlink(&dm, sys.join("dev/block/253:0")).unwrap();
        std::os::unix::fs::symlink(
            pci.join("virtiovda/block/vda/vda2"),
            sys.join("dev/block/254:2"),
        )
        .unwrap();
        assert_eq!(disk_behind(sys, 253, 0).unwrap(), "vdb");
        // A plain partition (no dm-verity) is its own disk's.
        assert_eq!(disk_behind(sys, 254, 2).unwrap(), "vda");
        // Nothing there: an error, not a guess.
        let e = format!("{:#}", disk_behind(sys, 8, 0).unwrap_err());
        assert!(e.contains("dev/block/8:0"), "{e}");
        // A mapping over two disks is refused.
        std::os::unix::fs::symlink(pci.join("virtiovda/block/vda/vda3"), dm.join("slaves/vda3"))
            .unwrap();
        let e = format!("{:#}", disk_behind(sys, 253, 0).unwrap_err());
        assert!(e.contains("sits on more than one disk"), "{e}");
    }

    #[test]
    fn names_parse_with_and_without_counters() {
        assert_eq!(
            parse_name("keelson_0.2.0+3.efi"),
            Some(("0.2.0".into(), Some(3), None))
        );
        assert_eq!(
            parse_name("keelson_0.2.0+2-1.efi"),
            Some(("0.2.0".into(), Some(2), Some(1)))
        );
        assert_eq!(
            parse_name("keelson_0.1.0.efi"),
            Some(("0.1.0".into(), None, None))
        );
        assert_eq!(parse_name("other.efi"), None);
        assert_eq!(parse_name("keelson_0.1.0+x.efi"), None);
    }
}
