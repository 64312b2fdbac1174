//! Stage 1, PID 1 in the initramfs: API mounts, modules, the boot disk (grown on first boot),
//! the dm-verity root of the booted slot at /sysroot, the data partition at /sysroot/var, and the
//! switch into the real root.

use std::fs::File;
use std::io::Read;
use std::path::Path;
use std::time::{Duration, Instant};

use keelson_common::cmdline::Cmdline;
use keelson_common::dm;
use keelson_common::partitions::{DATA_LABEL, ROOT_X86_64_TYPE, ROOT_X86_64_VERITY_TYPE, VAR_TYPE};
use keelson_common::verity;
use nix::errno::Errno;
use nix::mount::MsFlags;

use crate::disk::{self, BootDisk, PartDev};
use crate::fatal::{self, fatal};
use crate::mounts::{self, Kernel};
use crate::switch_root::{self, NEW_ROOT};
use crate::{bootargs, ext4, say};

/// Runs stage 1; ends in exec of the real init or in [`fatal`].
pub fn run() -> ! {
    let api = mounts::mount_all(&mut Kernel, &mounts::STAGE1);
    crate::log::ensure_stdio();
    crate::log::open_console();
    crate::log::open_record(crate::log::RECORD_PATH);
    say!("stage1: start");
    if let Err(e) = api {
        fatal(&e.to_string());
    }

    let cmdline = Cmdline::parse(&std::fs::read_to_string("/proc/cmdline").unwrap_or_default());
    let (action, warning) = bootargs::fatal_action(&cmdline);
    fatal::set_action(action);
    if let Some(w) = warning {
        say!("{w}");
    }
    let args = match bootargs::parse(&cmdline) {
        Ok(a) => a,
        Err(e) => fatal(&e.to_string()),
    };
    for w in &args.warnings {
        say!("{w}");
    }
    let slot = args.slot;

    // Drivers of the hardware present (the boot disk) and the always-loaded list, together.
    let mut modules = crate::modules::Loader::open();
    modules.load_boot();
    say!(
        "stage1: modules loaded ({} modules in {} ms)",
        modules.count,
        modules.millis()
    );

    // Slow buses (AHCI, USB) report disks after their driver loaded: keep matching new devices
    // while waiting.
    let mut disk = match disk::wait_for_boot_disk(slot, args.disk_timeout, &mut || {
        modules.coldplug();
    }) {
        Ok(d) => d,
        Err(seen) => fatal(&format!(
            "no disk with partition {} after {} s; saw: {seen}",
            slot.root_label(),
            args.disk_timeout.as_secs()
        )),
    };
    say!("stage1: boot disk /dev/{}", disk.name);

    let grown = match disk::grow_if_needed(&mut disk) {
        Ok(Some(g)) => {
            say!(
                "stage1: grew partition table to the disk's {} MiB; partition {} ({}) now {} MiB (was {} MiB)",
                disk::mib(disk.sectors),
                g.number,
                g.label,
                disk::mib(g.new_sectors),
                disk::mib(g.old_sectors)
            );
            Some(g)
        }
        Ok(None) => None,
        Err(e) => {
            say!("stage1: cannot grow the partition table: {e}; keeping the current size");
            None
        }
    };

    let parts = find_partitions(&disk, slot);
    let root_dev = setup_verity(&parts, &args.roothash, slot);
    mount_root(&root_dev, slot);
    say!("stage1: root verified by dm-verity");
    preload(&format!("{NEW_ROOT}{}", switch_root::NEXT_INIT));

    let data_grew = grown.is_some_and(|g| g.number == parts.data_number);
    mount_data(&parts.data, data_grew);

    say!("stage1: switching root");
    match switch_root::switch_root() {
        Ok(never) => match never {},
        Err(e) => fatal(&e.to_string()),
    }
}

struct Partitions {
    root: PartDev,
    verity: PartDev,
    data: PartDev,
    data_number: usize,
}

fn find_partitions(disk: &BootDisk, slot: keelson_common::partitions::Slot) -> Partitions {
    let wanted = [
        (ROOT_X86_64_TYPE, slot.root_label()),
        (ROOT_X86_64_VERITY_TYPE, slot.verity_label()),
        (VAR_TYPE, DATA_LABEL.to_owned()),
    ];
    let numbers: Vec<Option<usize>> = wanted
        .iter()
        .map(|(ty, label)| disk.gpt.find(*ty, label).map(|(n, _)| n))
        .collect();
    let missing: Vec<&str> = wanted
        .iter()
        .zip(&numbers)
        .filter(|(_, n)| n.is_none())
        .map(|((_, label), _)| label.as_str())
        .collect();
    let [Some(root), Some(verity), Some(data)] = numbers[..] else {
        let have: Vec<String> = disk
            .gpt
            .partitions()
            .map(|(n, p)| format!("{n}: {} ({})", p.name, p.type_guid))
            .collect();
        fatal(&format!(
            "/dev/{} has no partition {} of the expected type; it has: {}",
            disk.name,
            missing.join(", "),
            have.join(", ")
        ));
    };
    let dev = |n: usize| match disk::wait_partition(&disk.name, n, None, Duration::from_secs(5)) {
        Some(p) => p,
        None => fatal(&format!(
            "partition {n} of /dev/{} has no block device after 5 s",
            disk.name
        )),
    };
    Partitions {
        root: dev(root),
        verity: dev(verity),
        data: dev(data),
        data_number: data,
    }
}

/// Maps the slot's root through dm-verity; returns the /dev path of the verified device.
fn setup_verity(
    parts: &Partitions,
    roothash: &str,
    slot: keelson_common::partitions::Slot,
) -> String {
    let mut head = vec![0u8; verity::BLOCK as usize];
    let read = File::open(parts.verity.path()).and_then(|mut f| f.read_exact(&mut head));
    if let Err(e) = read {
        fatal(&format!(
            "cannot read the verity superblock of slot {slot} from /dev/{}: {e}",
            parts.verity.name
        ));
    }
    let sb = match verity::Superblock::decode(&head) {
        Ok(sb) => sb,
        Err(e) => fatal(&format!(
            "/dev/{} ({}) holds no usable verity superblock: {e}",
            parts.verity.name,
            slot.verity_label()
        )),
    };
    let (sectors, params) = sb.dm_table(&parts.root.dev, &parts.verity.dev, roothash);
    if sectors > parts.root.sectors {
        fatal(&format!(
            "verity superblock of slot {slot} covers {sectors} sectors but /dev/{} has only {}",
            parts.root.name, parts.root.sectors
        ));
    }
    let target = dm::Target {
        sectors,
        target_type: "verity".to_owned(),
        params,
    };
    let (_major, minor) = match dm::create_readonly("root", target) {
        Ok(d) => d,
        Err(e) => fatal(&format!(
            "cannot set up dm-verity for slot {slot} (/dev/{} with hashes on /dev/{}): {e}",
            parts.root.name, parts.verity.name
        )),
    };
    let path = format!("/dev/dm-{minor}");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !Path::new(&path).exists() {
        if Instant::now() >= deadline {
            fatal(&format!("{path} did not appear within 5 s of creating it"));
        }
        std::thread::sleep(disk::POLL);
    }
    path
}

fn mount_root(dev: &str, slot: keelson_common::partitions::Slot) {
    let _ = std::fs::create_dir_all(NEW_ROOT);
    let mounted = nix::mount::mount(
        Some(dev),
        NEW_ROOT,
        Some("erofs"),
        MsFlags::MS_RDONLY,
        None::<&str>,
    );
    match mounted {
        Ok(()) => {}
        Err(e @ (Errno::EIO | Errno::EINVAL | Errno::EUCLEAN | Errno::EBADMSG)) => fatal(&format!(
            "root file system of slot {slot} failed verification (dm-verity): {e:?}; refusing to boot corrupted data"
        )),
        Err(e) => fatal(&format!(
            "cannot mount the root file system of slot {slot} ({dev}: erofs on dm-verity) on {NEW_ROOT}: {e}"
        )),
    }
}

fn mount_data(data: &PartDev, grew: bool) {
    let sb = match ext4::Superblock::read(&data.path()) {
        Ok(sb) => sb,
        Err(ext4::Error::NotExt4(found)) => fatal(&format!(
            "data partition /dev/{} has no ext4 file system; found {found}",
            data.name
        )),
        Err(e) => fatal(&format!("data partition /dev/{}: {e}", data.name)),
    };
    if sb.needs_recovery() {
        say!("data: needs journal recovery (last shutdown was not clean)");
    } else {
        say!("data: clean");
    }
    let target = format!("{NEW_ROOT}/var");
    let mounted = nix::mount::mount(
        Some(&data.path()),
        target.as_str(),
        Some("ext4"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        None::<&str>,
    );
    if let Err(e) = mounted {
        fatal(&format!(
            "cannot mount the data partition /dev/{} (ext4) on {target}: {e}",
            data.name
        ));
    }
    // Keyed on the sizes rather than on `grew` alone, so a first boot that grew the partition but
    // stopped before resizing the file system is completed on the next one.
    let part_blocks = data.sectors.saturating_mul(512) / sb.block_size.max(1);
    if part_blocks > sb.blocks {
        if !grew {
            say!("data: file system is smaller than its partition; growing it");
        }
        match ext4::resize_online(Path::new(&target), part_blocks) {
            Ok(()) => say!(
                "data: file system grown from {} MiB to {} MiB",
                sb.size_bytes() >> 20,
                part_blocks.saturating_mul(sb.block_size) >> 20
            ),
            Err(e) => say!(
                "data: cannot grow the file system from {} MiB to the partition's {} MiB: {e}",
                sb.size_bytes() >> 20,
                part_blocks.saturating_mul(sb.block_size) >> 20
            ),
        }
    }
}

/// Starts reading `path` into the page cache (posix_fadvise WILLNEED returns once the reads
/// are queued). The real root's init is read through dm-verity when stage 1 execs it; left to
/// its page faults, that is hundreds of small verified reads one after the other (a third of
/// a second under QEMU TCG), queued here it is a few large ones that overlap the data
/// partition's checks and mount.
fn preload(path: &str) {
    use std::os::fd::AsRawFd;
    if let Ok(f) = File::open(path) {
        // SAFETY: a valid open descriptor; advice only, nothing is written.
        unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_WILLNEED) };
    }
}
