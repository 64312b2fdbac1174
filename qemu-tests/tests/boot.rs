//! Boot scenarios of the bootable-image issue: real images from `out/` (built by `./dev test`
//! before the suite runs), booted under QEMU TCG, each guest in its own network namespace.
//!
//! Assertions read init's console lines (documented in ARCHITECTURE.md, "Boot log"), which are
//! the machine-readable record of what each boot step found.

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use keelson_common::gpt::{Gpt, SECTOR};
use keelson_common::partitions::ROOT_X86_64_TYPE;
use qemu_tests::{copy_disk, create_overlay, image, DiskFormat, GuestBuilder, NicModel};

/// Generous: TCG on a loaded 2-core machine.
const BOOT: Duration = Duration::from_secs(180);
const STOP: Duration = Duration::from_secs(90);

fn vm() -> PathBuf {
    image("vm").expect("the vm image")
}

/// Byte offset and length of `root-a` in a raw disk.
fn root_a(disk: &Path) -> (u64, u64) {
    let mut f = std::fs::File::open(disk).unwrap();
    let gpt = Gpt::read(&mut f).unwrap();
    let (_, p) = gpt
        .find(ROOT_X86_64_TYPE, "root-a")
        .expect("root-a partition");
    (p.first_lba * SECTOR, p.size_bytes())
}

/// The physical offset of the first extent of /usr/bin/sysd in an EROFS image, from
/// `dump.erofs -e` (erofs-utils), compressed or not.
fn sysd_first_extent(img: &Path) -> u64 {
    let out = std::process::Command::new("dump.erofs")
        .args(["--path=/usr/bin/sysd", "-e"])
        .arg(img)
        .output()
        .expect("dump.erofs (apt-get install erofs-utils)");
    let text = String::from_utf8_lossy(&out.stdout);
    // `   0:        0..  235460 |  235460 :    2162688..   2228224 |   65536`
    text.lines()
        .find_map(|l| {
            let rest = l.trim_start().strip_prefix("0:")?;
            let physical = rest.split('|').nth(1)?.split(':').nth(1)?;
            physical.split("..").next()?.trim().parse().ok()
        })
        .unwrap_or_else(|| {
            panic!("no first extent of /usr/bin/sysd in dump.erofs's answer:\n{text}")
        })
}

fn flip_byte(disk: &Path, offset: u64) {
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(disk)
        .unwrap();
    let mut b = [0u8; 1];
    f.seek(SeekFrom::Start(offset)).unwrap();
    f.read_exact(&mut b).unwrap();
    f.seek(SeekFrom::Start(offset)).unwrap();
    f.write_all(&[b[0] ^ 0x5a]).unwrap();
    f.sync_all().unwrap();
}

#[test]
fn uefi_boot_of_disk_raw_reaches_boot_complete_and_powers_off() {
    let g = GuestBuilder::uefi_from_image_dir(&vm())
        .unwrap()
        .nic(NicModel::None)
        .spawn()
        .unwrap();
    g.wait_for("keelson-init: stage1: start", BOOT).unwrap();
    g.wait_for("stage1: root verified by dm-verity", BOOT)
        .unwrap();
    let done = g.wait_for("boot complete in", BOOT).unwrap();
    assert!(done.contains("since kernel start"), "{done}");
    g.powerdown().unwrap();
    g.wait_for("shutdown: /var unmounted cleanly", STOP)
        .unwrap();
    g.wait_for("shutdown: powering off", STOP).unwrap();
    g.wait_exit(STOP).unwrap();
}

/// Direct-kernel boot, twice on the same (grown) disk: the root is read-only, /var persists
/// across the reboot, and the power-off through the ACPI button left ext4 clean.
#[test]
fn direct_boot_read_only_root_persistent_var_and_clean_poweroff() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.qcow2");
    create_overlay(&vm().join("disk.raw"), &disk, Some(2 << 30)).unwrap();
    // A VM with a firmware UUID: it becomes the machine ID.
    const UUID: &str = "6c3f8a2e-1b4d-4e5f-9a0b-1c2d3e4f5a6b";
    let boot = || {
        GuestBuilder::from_image_dir(&vm())
            .unwrap()
            .disk_no_copy(&disk, DiskFormat::Qcow2)
            .args(["-uuid", UUID])
            .spawn()
            .unwrap()
    };

    let g = boot();
    let grown = g.wait_for("grew", BOOT).unwrap();
    assert!(grown.contains("data"), "{grown}");
    g.wait_for("data: clean", BOOT).unwrap();
    g.wait_for("random-seed: none yet", BOOT).unwrap();
    let id_line = g.wait_for("machine-id: generated ", BOOT).unwrap();
    assert!(
        id_line.ends_with(&format!(
            "machine-id: generated {} (the VM's SMBIOS UUID)",
            UUID.replace('-', "")
        )),
        "{id_line}"
    );
    let id = UUID.replace('-', "");
    g.wait_for("boot #1", BOOT).unwrap();
    // Written by a thread of its own as soon as the pool is ready: any time in this boot.
    g.wait_for_from_start("random-seed: stored for the next boot", BOOT)
        .unwrap();
    g.wait_for("root: read-only (write refused: EROFS)", BOOT)
        .unwrap();
    g.wait_for("boot complete in", BOOT).unwrap();
    g.powerdown().unwrap();
    // The seed is written again from the pool, with /var still mounted.
    g.wait_for("random-seed: refreshed for the next boot", STOP)
        .unwrap();
    g.wait_for("shutdown: /var unmounted cleanly", STOP)
        .unwrap();
    g.wait_exit(STOP).unwrap();
    drop(g);

    let g = boot();
    // Clean: no journal to replay after the graceful power-off.
    let state = g
        .wait_for_any(&["data: clean", "data: needs journal recovery"], BOOT)
        .unwrap();
    assert_eq!(state.0, 0, "{}", state.1);
    g.wait_for("random-seed: 512 bytes credited, a new one stored", BOOT)
        .unwrap();
    g.wait_for(&format!("machine-id: {id} (kept on /var)"), BOOT)
        .unwrap();
    g.wait_for("boot #2", BOOT).unwrap();
    g.wait_for("boot complete in", BOOT).unwrap();
    assert!(
        !g.serial_log().contains("grew"),
        "the data partition grew twice"
    );
}

/// A crash (QEMU killed, no shutdown) leaves the journal to replay: init says so, and boots.
#[test]
fn crash_is_reported_as_unclean_and_recovered() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.qcow2");
    create_overlay(&vm().join("disk.raw"), &disk, None).unwrap();
    let boot = || {
        GuestBuilder::from_image_dir(&vm())
            .unwrap()
            .disk_no_copy(&disk, DiskFormat::Qcow2)
            .spawn()
            .unwrap()
    };
    let g = boot();
    g.wait_for("boot complete in", BOOT).unwrap();
    g.kill().unwrap();
    drop(g);
    let g = boot();
    g.wait_for("data: needs journal recovery", BOOT).unwrap();
    g.wait_for("boot #2", BOOT).unwrap();
    g.wait_for("boot complete in", BOOT).unwrap();
}

/// One flipped byte in root-a's EROFS superblock: dm-verity refuses the block, init stops the
/// boot with a message, and nothing runs on the corrupted root.
#[test]
fn corrupted_root_superblock_stops_the_boot() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.raw");
    copy_disk(&vm().join("disk.raw"), &disk).unwrap();
    let (start, _) = root_a(&disk);
    flip_byte(&disk, start + 1024 + 8);
    let g = GuestBuilder::from_image_dir(&vm())
        .unwrap()
        .disk_raw_no_copy(&disk)
        // The image reboots on FATAL (for boot counting); halt here to read one clean stop.
        .append_cmdline("keelson.fatal=halt")
        .nic(NicModel::None)
        .spawn()
        .unwrap();
    let fatal = g.wait_for("FATAL:", BOOT).unwrap();
    assert!(fatal.contains("dm-verity"), "{fatal}");
    let log = g.serial_log();
    assert!(
        log.contains("verity") && log.contains("is corrupted"),
        "no kernel verity message:\n{log}"
    );
    assert!(
        !log.contains("stage2: start"),
        "booted a corrupted root:\n{log}"
    );
}

/// One flipped byte in a file's data (the first block of /usr/bin/sysd): reading it fails with
/// an I/O error and a verity message; the corrupted program never runs.
#[test]
fn corrupted_file_data_reads_as_io_error() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.raw");
    copy_disk(&vm().join("disk.raw"), &disk).unwrap();
    let (start, len) = root_a(&disk);
    let mut f = std::fs::File::open(&disk).unwrap();
    f.seek(SeekFrom::Start(start)).unwrap();
    let mut root = vec![0u8; len as usize];
    f.read_exact(&mut root).unwrap();
    // Where sysd's first bytes are stored: EROFS says (on the vm image they are LZ4HC
    // clusters, so the file's bytes cannot be searched for).
    let root_img = dir.path().join("root.erofs");
    std::fs::write(&root_img, &root).unwrap();
    let at = sysd_first_extent(&root_img);
    flip_byte(&disk, start + at + 300);

    let g = GuestBuilder::from_image_dir(&vm())
        .unwrap()
        .disk_raw_no_copy(&disk)
        .nic(NicModel::None)
        .spawn()
        .unwrap();
    g.wait_for("stage2: start", BOOT).unwrap();
    g.wait_for("cannot exec /usr/bin/sysd: EIO", BOOT).unwrap();
    let log = g.serial_log();
    assert!(
        log.contains("is corrupted"),
        "no kernel verity message:\n{log}"
    );
    assert!(!log.contains("sysd: ready"), "a corrupted sysd ran:\n{log}");
}

/// The metal image (Debian's generic kernel) on the hardware a server has: NVMe, AHCI, e1000e.
#[test]
fn metal_image_boots_from_nvme_with_e1000e() {
    let metal = image("metal").unwrap();
    let g = GuestBuilder::from_image_dir(&metal)
        .unwrap()
        .nvme()
        .nic(NicModel::E1000e)
        .spawn()
        .unwrap();
    let disk = g.wait_for("stage1: boot disk", BOOT).unwrap();
    assert!(disk.contains("nvme"), "{disk}");
    let nic = g.wait_for("network interface", BOOT).unwrap();
    assert!(nic.contains("e1000e"), "{nic}");
    g.wait_for("boot complete in", BOOT).unwrap();
}

#[test]
fn metal_image_boots_through_uefi_from_ahci() {
    let metal = image("metal").unwrap();
    let g = GuestBuilder::uefi_from_image_dir(&metal)
        .unwrap()
        .ahci()
        .nic(NicModel::E1000e)
        .spawn()
        .unwrap();
    let disk = g.wait_for("stage1: boot disk", BOOT).unwrap();
    assert!(disk.contains("sd"), "{disk}");
    g.wait_for("boot complete in", BOOT).unwrap();
}

/// A disk without Keelson's partitions: init lists what it saw and halts, no panic loop.
#[test]
fn disk_without_keelson_partitions_halts_with_what_it_saw() {
    let dir = tempfile::tempdir().unwrap();
    let blank = dir.path().join("blank.raw");
    std::fs::File::create(&blank)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let g = GuestBuilder::from_image_dir(&vm())
        .unwrap()
        .disk_raw_no_copy(&blank)
        .append_cmdline("keelson.disk_timeout=3 keelson.fatal=halt")
        .nic(NicModel::None)
        .spawn()
        .unwrap();
    let fatal = g.wait_for("FATAL:", BOOT).unwrap();
    assert!(fatal.contains("root-a") && fatal.contains("vda"), "{fatal}");
    std::thread::sleep(Duration::from_secs(3));
    let log = g.serial_log();
    assert!(!log.contains("Kernel panic"), "init died:\n{log}");
    assert_eq!(log.matches("FATAL:").count(), 1, "not a clean halt:\n{log}");
}
