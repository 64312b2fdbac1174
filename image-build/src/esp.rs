//! The EFI System Partition, built as a FAT32 image in memory with the `fatfs` crate: no loop
//! mounts, no root, and every timestamp, serial and label fixed, so the image is reproducible.

use std::io::{Cursor, Write};

use anyhow::{Context, Result};
use fatfs::{
    Date, DateTime, FatType, FileSystem, FormatVolumeOptions, FsOptions, Time, TimeProvider,
};

use crate::util::civil_from_unix;

/// A clock that always says SOURCE_DATE_EPOCH.
#[derive(Debug)]
struct FixedTime(DateTime);

impl TimeProvider for FixedTime {
    fn get_current_date(&self) -> Date {
        self.0.date
    }
    fn get_current_date_time(&self) -> DateTime {
        self.0
    }
}

fn fixed_time(epoch: u64) -> &'static FixedTime {
    // FAT dates start in 1980.
    let (y, mo, d, h, mi, s) = civil_from_unix(epoch.max(315_532_800));
    let dt = DateTime {
        date: Date {
            year: y as u16,
            month: mo as u16,
            day: d as u16,
        },
        time: Time {
            hour: h as u16,
            min: mi as u16,
            sec: s as u16,
            millis: 0,
        },
    };
    // fatfs wants a &'static provider; one small leak per ESP built.
    Box::leak(Box::new(FixedTime(dt)))
}

/// The largest cluster (up to 4 KiB) that still gives FAT32 its minimum of 65525 clusters.
fn cluster_size(size: u64) -> u32 {
    [4096u32, 2048, 1024]
        .into_iter()
        .find(|&c| size / u64::from(c) >= 66_000)
        .unwrap_or(512)
}

/// Builds a FAT32 image of `size` bytes holding `files` (paths with `/`, parents created).
pub fn build(
    size: u64,
    volume_id: u32,
    epoch: u64,
    files: &[(String, Vec<u8>)],
) -> Result<Vec<u8>> {
    let mut img = Cursor::new(vec![0u8; size as usize]);
    let sectors = u32::try_from(size / 512).context("ESP too large")?;
    fatfs::format_volume(
        &mut img,
        FormatVolumeOptions::new()
            .fat_type(FatType::Fat32)
            .bytes_per_cluster(cluster_size(size))
            .total_sectors(sectors)
            .volume_id(volume_id)
            .volume_label(*b"KEELSON-ESP"),
    )
    .context("formatting the ESP as FAT32")?;
    {
        let fs = FileSystem::new(&mut img, FsOptions::new().time_provider(fixed_time(epoch)))
            .context("opening the fresh ESP")?;
        for (path, data) in files {
            let root = fs.root_dir();
            let mut parts: Vec<&str> = path.split('/').collect();
            let name = parts.pop().context("empty ESP path")?;
            let mut dir = root;
            for p in parts {
                dir = match dir.open_dir(p) {
                    Ok(d) => d,
                    Err(_) => dir
                        .create_dir(p)
                        .with_context(|| format!("creating ESP directory {p}"))?,
                };
            }
            let mut f = dir
                .create_file(name)
                .with_context(|| format!("creating ESP file {path}"))?;
            f.truncate()?;
            f.write_all(data)
                .with_context(|| format!("writing ESP file {path} (is the ESP big enough?)"))?;
        }
        fs.unmount().context("closing the ESP")?;
    }
    Ok(img.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn esp_is_reproducible_and_readable() {
        let files = vec![
            ("EFI/BOOT/BOOTX64.EFI".to_owned(), vec![1u8; 5000]),
            ("loader/loader.conf".to_owned(), b"timeout 0\n".to_vec()),
        ];
        let a = build(40 << 20, 0x1234_5678, 1_700_000_000, &files).unwrap();
        let b = build(40 << 20, 0x1234_5678, 1_700_000_000, &files).unwrap();
        assert!(a == b, "two builds differ");
        let fs = FileSystem::new(Cursor::new(a), FsOptions::new()).unwrap();
        assert_eq!(fs.fat_type(), FatType::Fat32);
        let mut f = fs.root_dir().open_file("loader/loader.conf").unwrap();
        let mut s = String::new();
        std::io::Read::read_to_string(&mut f, &mut s).unwrap();
        assert_eq!(s, "timeout 0\n");
    }
}
