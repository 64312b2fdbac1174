//! A disk's GUID partition table as PID 1 reads every disk while looking for its boot disk:
//! header and entries (bounds, labels), the slot's partitions, and the first-boot growth of a
//! table to a bigger disk. The input's CRCs are recomputed first (a mutated table would
//! otherwise stop at the checksum almost every time); a wrong CRC is a unit test's business.
#![no_main]

use std::io::Cursor;

use keelson_common::gpt::Gpt;
use keelson_common::partitions::Slot;
use libfuzzer_sys::fuzz_target;

/// Recomputes the entry array's and the header's CRC32 where the header says they are.
fn fix_crcs(disk: &mut [u8]) {
    if disk.len() < 1024 {
        return;
    }
    let le32 = |b: &[u8]| u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    let entry_lba = u64::from_le_bytes(disk[512 + 72..512 + 80].try_into().unwrap());
    let entries = entry_lba
        .checked_mul(512)
        .and_then(|start| usize::try_from(start).ok())
        .and_then(|start| disk.get(start..start.checked_add(128 * 128)?));
    if let Some(entries) = entries {
        let crc = crc32(entries);
        disk[512 + 88..512 + 92].copy_from_slice(&crc.to_le_bytes());
    }
    let size = le32(&disk[512 + 12..512 + 16]) as usize;
    if (92..=512).contains(&size) {
        disk[512 + 16..512 + 20].fill(0);
        let crc = crc32(&disk[512..512 + size]);
        disk[512 + 16..512 + 20].copy_from_slice(&crc.to_le_bytes());
    }
}

fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

fuzz_target!(|data: &[u8]| {
    let mut disk = data.to_vec();
    fix_crcs(&mut disk);
    let Ok(gpt) = Gpt::read(&mut Cursor::new(&disk)) else {
        return;
    };
    for slot in [Slot::A, Slot::B] {
        let _ = keelson_init::disk::holds_slot(&gpt, slot);
    }
    if gpt.validate().is_ok() {
        for (_, p) in gpt.partitions() {
            let _ = p.size_bytes();
        }
    }
    // The disk it was found on may be larger than the table says: stage 1 grows the table of
    // the disk holding its slot before anything validates it (`write` validates the result).
    let extra = u64::from(data.first().copied().unwrap_or(0)) * 2048;
    let disk_sectors = gpt.backup_lba.saturating_add(1 + extra);
    if keelson_init::disk::needs_growth(&gpt, disk_sectors) {
        let mut grown = gpt.clone();
        if grown.grow_to(disk_sectors, 2048).is_ok() {
            let _ = grown.validate();
        }
    }
});
