//! Block devices: finding the boot disk in sysfs (the whole disk whose GPT holds this slot's root
//! partition), naming its partitions, and growing its partition table to the disk's size on first
//! boot.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use keelson_common::gpt::{self, Gpt};
use keelson_common::partitions::{Slot, ROOT_X86_64_TYPE};
use nix::errno::Errno;

const SYS_BLOCK: &str = "/sys/class/block";
/// How often sysfs is rescanned while waiting for devices.
pub const POLL: Duration = Duration::from_millis(20);
/// `_IO(0x12, 95)`: re-read the partition table.
const BLKRRPART: libc::c_ulong = 0x125f;
/// Partition ends are aligned to 1 MiB when growing.
const GROW_ALIGN: u64 = 2048;

/// Errors growing the partition table.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot open /dev/{0} for writing: {1}")]
    Open(String, std::io::Error),
    #[error("cannot grow the partition table: {0}")]
    Gpt(#[from] gpt::Error),
    #[error("cannot flush the partition table to /dev/{0}: {1}")]
    Sync(String, std::io::Error),
    #[error("BLKRRPART on /dev/{0}: {1}")]
    Reread(String, Errno),
    #[error(
        "partition {number} of /dev/{disk} did not reappear with {sectors} sectors within 5 s"
    )]
    NotReappeared {
        disk: String,
        number: usize,
        sectors: u64,
    },
}

/// Size of a sysfs block device in 512-byte sectors.
pub fn sectors(name: &str) -> Option<u64> {
    read_trimmed(&Path::new(SYS_BLOCK).join(name).join("size"))?
        .parse()
        .ok()
}

fn read_trimmed(path: &Path) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_owned())
}

/// Devices that can never be the boot disk: loop and RAM disks, device-mapper, optical drives.
pub fn is_skipped(name: &str) -> bool {
    ["loop", "ram", "dm-", "sr"]
        .iter()
        .any(|p| name.starts_with(p))
}

/// Whole-disk names in sysfs, sorted (partitions have a `partition` attribute).
pub fn whole_disks() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(SYS_BLOCK)
        .map(|rd| {
            rd.filter_map(Result::ok)
                .filter(|e| !e.path().join("partition").exists())
                .filter_map(|e| e.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// What a scan found on one whole disk, for the boot-disk search and its failure message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskReport {
    pub name: String,
    pub sectors: u64,
    pub table: Table,
}

/// The partition table of a disk, as far as init looked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Table {
    /// Not a candidate (see [`is_skipped`]) or empty.
    NotRead,
    /// No readable GPT.
    NoGpt(String),
    /// A GPT with these labels, in entry order.
    Gpt(Vec<String>),
}

/// Formats a sector count as MiB (rounded down).
pub fn mib(sectors: u64) -> u64 {
    sectors / 2048
}

/// Renders every disk seen: `vda (1024 MiB: esp, root-a), sr0 (0 MiB: not read)`.
pub fn describe(reports: &[DiskReport]) -> String {
    if reports.is_empty() {
        return "no block devices at all".to_owned();
    }
    reports
        .iter()
        .map(|r| {
            let table = match &r.table {
                Table::NotRead => "not a candidate".to_owned(),
                Table::NoGpt(why) => format!("no GPT: {why}"),
                Table::Gpt(labels) if labels.is_empty() => "GPT without partitions".to_owned(),
                Table::Gpt(labels) => labels.join(", "),
            };
            format!("{} ({} MiB: {table})", r.name, mib(r.sectors))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The disk init boots from.
#[derive(Debug, Clone)]
pub struct BootDisk {
    pub name: String,
    pub sectors: u64,
    pub gpt: Gpt,
}

/// Whether a table holds `slot`'s root partition.
pub fn holds_slot(gpt: &Gpt, slot: Slot) -> bool {
    gpt.find(ROOT_X86_64_TYPE, &slot.root_label()).is_some()
}

fn scan(slot: Slot) -> (Option<BootDisk>, Vec<DiskReport>) {
    let mut reports = Vec::new();
    for name in whole_disks() {
        let sectors = sectors(&name).unwrap_or(0);
        if is_skipped(&name) || sectors == 0 {
            reports.push(DiskReport {
                name,
                sectors,
                table: Table::NotRead,
            });
            continue;
        }
        let read = File::open(Path::new("/dev").join(&name))
            .map_err(|e| e.to_string())
            .and_then(|mut f| Gpt::read(&mut f).map_err(|e| e.to_string()));
        match read {
            Ok(gpt) if holds_slot(&gpt, slot) => {
                return (Some(BootDisk { name, sectors, gpt }), reports);
            }
            Ok(gpt) => reports.push(DiskReport {
                name,
                sectors,
                table: Table::Gpt(gpt.partitions().map(|(_, p)| p.name.clone()).collect()),
            }),
            Err(why) => reports.push(DiskReport {
                name,
                sectors,
                table: Table::NoGpt(why),
            }),
        }
    }
    (None, reports)
}

/// Polls sysfs until a disk holding `slot`'s root partition shows up, or returns the description
/// of everything seen at the deadline.
pub fn wait_for_boot_disk(
    slot: Slot,
    timeout: Duration,
    between_polls: &mut dyn FnMut(),
) -> Result<BootDisk, String> {
    let deadline = Instant::now() + timeout;
    loop {
        between_polls();
        let (found, reports) = scan(slot);
        if let Some(disk) = found {
            return Ok(disk);
        }
        if Instant::now() >= deadline {
            return Err(describe(&reports));
        }
        std::thread::sleep(POLL);
    }
}

/// A partition's block device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartDev {
    /// Kernel name (`vda3`, `nvme0n1p3`).
    pub name: String,
    /// `major:minor`, as device-mapper tables want it.
    pub dev: String,
    pub sectors: u64,
}

impl PartDev {
    /// The /dev node.
    pub fn path(&self) -> PathBuf {
        Path::new("/dev").join(&self.name)
    }
}

/// Finds partition `number` of `disk` by the `partition` attribute of the disk's children, which
/// works for both `vda3` and `nvme0n1p3` naming.
pub fn partition(disk: &str, number: usize) -> Option<PartDev> {
    let dir = Path::new(SYS_BLOCK).join(disk);
    let want = number.to_string();
    for entry in std::fs::read_dir(&dir).ok()?.filter_map(Result::ok) {
        let child = entry.path();
        if read_trimmed(&child.join("partition")).as_deref() != Some(want.as_str()) {
            continue;
        }
        let name = entry.file_name().into_string().ok()?;
        return Some(PartDev {
            dev: read_trimmed(&child.join("dev"))?,
            sectors: read_trimmed(&child.join("size"))?.parse().ok()?,
            name,
        });
    }
    None
}

/// Waits until partition `number` of `disk` exists (with its /dev node) and, if given, has
/// `sectors` sectors.
pub fn wait_partition(
    disk: &str,
    number: usize,
    sectors: Option<u64>,
    timeout: Duration,
) -> Option<PartDev> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(p) = partition(disk, number) {
            if sectors.is_none_or(|s| s == p.sectors) && p.path().exists() {
                return Some(p);
            }
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(POLL);
    }
}

/// A partition grown by [`grow_if_needed`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grown {
    pub number: usize,
    /// The grown partition's label.
    pub label: String,
    pub old_sectors: u64,
    pub new_sectors: u64,
}

/// Whether the table ends before the disk does (the image was written to a bigger disk).
pub fn needs_growth(gpt: &Gpt, disk_sectors: u64) -> bool {
    gpt.backup_lba < disk_sectors.saturating_sub(1)
}

/// On a disk bigger than its table, moves the backup table to the end and extends the last
/// partition, then has the kernel re-read the table and waits for the new size to show.
pub fn grow_if_needed(disk: &mut BootDisk) -> Result<Option<Grown>, Error> {
    if !needs_growth(&disk.gpt, disk.sectors) {
        return Ok(None);
    }
    let mut grown = disk.gpt.clone();
    let number = grown.grow_to(disk.sectors, GROW_ALIGN)?;
    let sizes = |g: &Gpt, n: usize| {
        g.partitions()
            .find(|(i, _)| *i == n)
            .map(|(_, p)| (p.last_lba + 1).saturating_sub(p.first_lba))
            .unwrap_or(0)
    };
    let path = Path::new("/dev").join(&disk.name);
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .map_err(|e| Error::Open(disk.name.clone(), e))?;
    grown.write(&mut f)?;
    f.sync_all()
        .map_err(|e| Error::Sync(disk.name.clone(), e))?;
    // SAFETY: BLKRRPART takes no argument; the fd is an open block device.
    let rc = unsafe { libc::ioctl(f.as_raw_fd(), BLKRRPART, 0) };
    if rc < 0 {
        return Err(Error::Reread(disk.name.clone(), Errno::last()));
    }
    drop(f);
    let old_gpt = std::mem::replace(&mut disk.gpt, grown);
    let Some(number) = number else {
        // Only the backup header moved (the last partition was already at the aligned end).
        return Ok(None);
    };
    let old_sectors = sizes(&old_gpt, number);
    let new_sectors = sizes(&disk.gpt, number);
    wait_partition(
        &disk.name,
        number,
        Some(new_sectors),
        Duration::from_secs(5),
    )
    .ok_or_else(|| Error::NotReappeared {
        disk: disk.name.clone(),
        number,
        sectors: new_sectors,
    })?;
    let label = disk
        .gpt
        .partitions()
        .find(|(i, _)| *i == number)
        .map(|(_, p)| p.name.clone())
        .unwrap_or_default();
    Ok(Some(Grown {
        number,
        label,
        old_sectors,
        new_sectors,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use keelson_common::gpt::{Guid, Partition};

    #[test]
    fn skips_non_disks() {
        for n in ["loop0", "ram15", "dm-0", "sr0"] {
            assert!(is_skipped(n), "{n}");
        }
        for n in ["vda", "sda", "nvme0n1", "mmcblk0", "xvda"] {
            assert!(!is_skipped(n), "{n}");
        }
    }

    #[test]
    fn describes_what_was_seen() {
        let r = vec![
            DiskReport {
                name: "sr0".into(),
                sectors: 0,
                table: Table::NotRead,
            },
            DiskReport {
                name: "vda".into(),
                sectors: 2 * 1024 * 1024,
                table: Table::Gpt(vec!["esp".into(), "root-b".into()]),
            },
            DiskReport {
                name: "vdb".into(),
                sectors: 2048,
                table: Table::NoGpt("no GPT signature at sector 1".into()),
            },
        ];
        assert_eq!(
            describe(&r),
            "sr0 (0 MiB: not a candidate), vda (1024 MiB: esp, root-b), \
             vdb (1 MiB: no GPT: no GPT signature at sector 1)"
        );
        assert_eq!(describe(&[]), "no block devices at all");
    }

    #[test]
    fn slot_and_growth_checks() {
        let mut g = Gpt::new(Guid::NIL, 65536).unwrap();
        g.entries[0] = Some(Partition {
            type_guid: ROOT_X86_64_TYPE,
            unique_guid: Guid::from_bytes_v4([1; 16]),
            first_lba: 2048,
            last_lba: 4095,
            attributes: 0,
            name: "root-a".into(),
        });
        assert!(holds_slot(&g, Slot::A));
        assert!(!holds_slot(&g, Slot::B));
        assert!(!needs_growth(&g, 65536));
        assert!(needs_growth(&g, 65537));
    }
}
