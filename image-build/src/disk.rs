//! The GPT disk: partition layout (1 MiB aligned, data last so init can grow it), partition
//! contents written at their offsets into a sparse file, then the table.

use std::fs::File;
use std::io::{Seek, SeekFrom, Write};
use std::path::Path;

use anyhow::{bail, Context, Result};
use keelson_common::gpt::{Gpt, Guid, Partition, ENTRY_SECTORS, SECTOR};
use keelson_common::partitions::{
    Slot, DATA_LABEL, ESP_LABEL, ESP_TYPE, ROOT_X86_64_TYPE, ROOT_X86_64_VERITY_TYPE, VAR_TYPE,
};

use crate::config::Disk;
use crate::util::derive_guid;

const MIB: u64 = 1 << 20;
/// GPT attribute: the partition must not be mounted automatically (an empty slot).
pub const ATTR_NO_AUTO: u64 = 1 << 63;
/// GPT attribute: grow the file system to the partition (the data partition; init does it).
pub const ATTR_GROWFS: u64 = 1 << 59;

/// A partition to place, with the bytes that go at its start (the rest is left sparse/zero).
pub struct Part<'a> {
    pub label: String,
    pub type_guid: Guid,
    pub size: u64,
    pub attributes: u64,
    pub content: Option<&'a Path>,
    /// The partition's own GUID; `None` derives it from the seed and the label.
    pub uuid: Option<Guid>,
}

/// Space after the last partition of an OS disk (init grows the data partition into the disk).
pub const OS_TAIL: u64 = MIB;
/// The least space after the last partition: the backup GPT (entries and header, 33 sectors),
/// rounded up to 4 KiB.
pub const MIN_TAIL: u64 =
    (ENTRY_SECTORS + 1) * SECTOR + (4096 - (ENTRY_SECTORS + 1) * SECTOR % 4096) % 4096;

/// The partitions of a Keelson disk, in table order.
pub fn layout<'a>(
    d: &Disk,
    esp: &'a Path,
    root_a: &'a Path,
    verity_a: &'a Path,
    data: &'a Path,
) -> Vec<Part<'a>> {
    let mut parts = vec![Part {
        label: ESP_LABEL.into(),
        type_guid: ESP_TYPE,
        size: d.esp_mib * MIB,
        attributes: 0,
        content: Some(esp),
        uuid: None,
    }];
    for slot in Slot::ALL {
        let (root, verity, attributes) = match slot {
            Slot::A => (Some(root_a), Some(verity_a), 0),
            Slot::B => (None, None, ATTR_NO_AUTO),
        };
        parts.push(Part {
            label: slot.root_label(),
            type_guid: ROOT_X86_64_TYPE,
            size: d.root_mib * MIB,
            attributes,
            content: root,
            uuid: None,
        });
        parts.push(Part {
            label: slot.verity_label(),
            type_guid: ROOT_X86_64_VERITY_TYPE,
            size: d.verity_mib * MIB,
            attributes,
            content: verity,
            uuid: None,
        });
    }
    parts.push(Part {
        label: DATA_LABEL.into(),
        type_guid: VAR_TYPE,
        size: d.data_mib * MIB,
        attributes: ATTR_GROWFS,
        content: Some(data),
        uuid: None,
    });
    parts
}

/// Writes `out` as a sparse raw disk holding `parts` from 1 MiB on, with `tail` bytes after
/// them (at least [`MIN_TAIL`]); returns the table written.
pub fn assemble(out: &Path, seed: &str, parts: &[Part<'_>], tail: u64) -> Result<Gpt> {
    if tail < MIN_TAIL || tail % SECTOR != 0 {
        bail!("a disk needs at least {MIN_TAIL} bytes (whole sectors) after its last partition for the backup GPT, not {tail}");
    }
    if let Some(p) = parts.iter().find(|p| p.size == 0 || p.size % SECTOR != 0) {
        bail!(
            "partition {} has {} bytes, not a positive number of sectors",
            p.label,
            p.size
        );
    }
    let total = MIB + parts.iter().map(|p| p.size).sum::<u64>() + tail;
    let _ = std::fs::remove_file(out);
    let mut f = File::create(out).with_context(|| format!("creating {}", out.display()))?;
    f.set_len(total)?;
    let mut gpt = Gpt::new(derive_guid(seed, "disk"), total / SECTOR)?;
    let mut offset = MIB;
    for (i, p) in parts.iter().enumerate() {
        if let Some(content) = p.content {
            let len = std::fs::metadata(content)?.len();
            if len > p.size {
                bail!(
                    "{} is {} bytes but partition {} holds {} (raise its size in the [disk] table)",
                    content.display(),
                    len,
                    p.label,
                    p.size
                );
            }
            let mut src = File::open(content)?;
            f.seek(SeekFrom::Start(offset))?;
            copy_sparse(&mut src, &mut f)?;
        }
        gpt.entries[i] = Some(Partition {
            type_guid: p.type_guid,
            unique_guid: p
                .uuid
                .unwrap_or_else(|| derive_guid(seed, &format!("partition {}", p.label))),
            first_lba: offset / SECTOR,
            last_lba: (offset + p.size) / SECTOR - 1,
            attributes: p.attributes,
            name: p.label.clone(),
        });
        offset += p.size;
    }
    gpt.write(&mut f)?;
    f.sync_all()?;
    Ok(gpt)
}

/// Copies `src` to the current position of `dst`, seeking over all-zero blocks so the disk
/// stays sparse.
fn copy_sparse(src: &mut File, dst: &mut File) -> Result<()> {
    use std::io::Read;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = src.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        if buf[..n].iter().all(|&b| b == 0) {
            dst.seek(SeekFrom::Current(n as i64))?;
        } else {
            dst.write_all(&buf[..n])?;
        }
    }
}
