//! Unified Kernel Images: systemd-boot's EFI stub with the os-release, command line, kernel and
//! initramfs added as PE sections by `objcopy` (Debian 12 has no `ukify`). The section addresses
//! are the ones this stub expects; the kernel must stay under 16 MiB to fit below `.initrd`.

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Result};

use crate::util::run;

const KERNEL_MAX: u64 = 0x300_0000 - 0x200_0000;

/// Writes `out` from the stub and the parts (all given as files).
pub fn build(
    stub: &Path,
    osrel: &Path,
    cmdline: &Path,
    kernel: &Path,
    initrd: &Path,
    out: &Path,
    epoch: u64,
) -> Result<()> {
    let kernel_len = std::fs::metadata(kernel)?.len();
    if kernel_len > KERNEL_MAX {
        bail!(
            "kernel {} is {kernel_len} bytes; the UKI layout holds at most {KERNEL_MAX} (16 MiB) before .initrd",
            kernel.display()
        );
    }
    let mut cmd = Command::new("objcopy");
    for (name, file, vma) in [
        (".osrel", osrel, "0x20000"),
        (".cmdline", cmdline, "0x30000"),
        (".linux", kernel, "0x2000000"),
        (".initrd", initrd, "0x3000000"),
    ] {
        cmd.arg("--add-section")
            .arg(format!("{name}={}", file.display()))
            .arg("--change-section-vma")
            .arg(format!("{name}={vma}"));
    }
    cmd.arg(stub).arg(out);
    run(&mut cmd)?;
    // objcopy (binutils 2.40) stamps the PE header with the current time whatever
    // SOURCE_DATE_EPOCH says: set it ourselves and recompute the checksum over the result.
    let mut pe = std::fs::read(out)?;
    set_pe_timestamp(&mut pe, u32::try_from(epoch).unwrap_or(u32::MAX))?;
    std::fs::write(out, pe)?;
    Ok(())
}

/// Sets the COFF `TimeDateStamp` of a PE image and recomputes the optional header's `CheckSum`.
pub fn set_pe_timestamp(pe: &mut [u8], timestamp: u32) -> Result<()> {
    if pe.len() < 0x40 || &pe[0..2] != b"MZ" {
        bail!("not a PE image (no MZ header)");
    }
    let off = u32::from_le_bytes([pe[0x3c], pe[0x3d], pe[0x3e], pe[0x3f]]) as usize;
    if pe.len() < off + 24 + 68 || &pe[off..off + 4] != b"PE\0\0" {
        bail!("not a PE image (no PE signature)");
    }
    pe[off + 8..off + 12].copy_from_slice(&timestamp.to_le_bytes());
    let checksum_at = off + 24 + 64;
    pe[checksum_at..checksum_at + 4].fill(0);
    let mut sum: u64 = 0;
    for (i, word) in pe.chunks(2).enumerate() {
        if i * 2 == checksum_at || i * 2 == checksum_at + 2 {
            continue;
        }
        let w = u16::from_le_bytes([word[0], *word.get(1).unwrap_or(&0)]);
        sum += u64::from(w);
        sum = (sum & 0xffff) + (sum >> 16);
    }
    let checksum = (sum as u32).wrapping_add(pe.len() as u32);
    pe[checksum_at..checksum_at + 4].copy_from_slice(&checksum.to_le_bytes());
    Ok(())
}
