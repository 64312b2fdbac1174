//! GUID Partition Table (UEFI 2.10, chapter 5): read, write and grow.
//!
//! The image pipeline writes a table from scratch; PID 1 reads it to find a slot's partitions and,
//! on first boot, grows it to the size of the disk (backup header moved to the last sector, the
//! last partition extended). Sectors are 512 bytes; the table has 128 entries of 128 bytes.

use std::io::{Read, Seek, SeekFrom, Write};

/// Bytes per logical sector.
pub const SECTOR: u64 = 512;
/// Number of partition entry slots.
pub const ENTRIES: usize = 128;
/// Size of one partition entry.
pub const ENTRY_SIZE: usize = 128;
/// Sectors taken by the entry array (128 * 128 / 512).
pub const ENTRY_SECTORS: u64 = (ENTRIES * ENTRY_SIZE) as u64 / SECTOR;
const SIGNATURE: &[u8; 8] = b"EFI PART";
const REVISION: u32 = 0x0001_0000;
const HEADER_SIZE: u32 = 92;

/// Errors reading or writing a partition table.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("i/o on the partition table")]
    Io(#[from] std::io::Error),
    #[error("no GPT signature at sector 1")]
    NoSignature,
    #[error("GPT header checksum mismatch")]
    HeaderCrc,
    #[error("GPT partition entry array checksum mismatch")]
    EntriesCrc,
    #[error("unsupported GPT layout: {0}")]
    Unsupported(&'static str),
    #[error("partition {index} ({name}) lies outside the usable area {first}..={last}")]
    OutOfBounds {
        index: usize,
        name: String,
        first: u64,
        last: u64,
    },
    #[error("disk of {0} sectors is too small for a GPT")]
    DiskTooSmall(u64),
}

/// A GUID, held in its textual byte order (`00112233-4455-6677-8899-aabbccddeeff` is
/// `[0x00, 0x11, ...]`). On disk GPT stores the first three fields little-endian.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Guid(pub [u8; 16]);

impl Guid {
    /// The all-zero GUID, which marks an unused entry.
    pub const NIL: Guid = Guid([0; 16]);

    /// Parses a GUID at compile time; panics (a compile error in const context) if malformed.
    pub const fn from_str_const(s: &str) -> Guid {
        match Self::parse_bytes(s.as_bytes()) {
            Some(g) => g,
            None => panic!("malformed GUID literal"),
        }
    }

    /// Parses `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx` (either case).
    pub fn parse(s: &str) -> Option<Guid> {
        Self::parse_bytes(s.as_bytes())
    }

    const fn parse_bytes(s: &[u8]) -> Option<Guid> {
        if s.len() != 36 {
            return None;
        }
        let mut out = [0u8; 16];
        let mut i = 0;
        let mut o = 0;
        while i < 36 {
            if i == 8 || i == 13 || i == 18 || i == 23 {
                if s[i] != b'-' {
                    return None;
                }
                i += 1;
                continue;
            }
            let (Some(hi), Some(lo)) = (hex_val(s[i]), hex_val(s[i + 1])) else {
                return None;
            };
            out[o] = hi << 4 | lo;
            o += 1;
            i += 2;
        }
        Some(Guid(out))
    }

    /// Builds a GUID from 16 bytes of (hashed) material, marked as an RFC 4122 version 4 UUID so
    /// tools treat it as a random one.
    pub fn from_bytes_v4(mut b: [u8; 16]) -> Guid {
        b[6] = (b[6] & 0x0f) | 0x40;
        b[8] = (b[8] & 0x3f) | 0x80;
        Guid(b)
    }

    /// The mixed-endian on-disk encoding.
    pub fn to_disk(self) -> [u8; 16] {
        let b = self.0;
        [
            b[3], b[2], b[1], b[0], b[5], b[4], b[7], b[6], b[8], b[9], b[10], b[11], b[12], b[13],
            b[14], b[15],
        ]
    }

    /// Decodes the on-disk encoding.
    pub fn from_disk(d: &[u8]) -> Guid {
        Guid([
            d[3], d[2], d[1], d[0], d[5], d[4], d[7], d[6], d[8], d[9], d[10], d[11], d[12], d[13],
            d[14], d[15],
        ])
    }

    /// Whether this is the nil GUID.
    pub fn is_nil(self) -> bool {
        self == Guid::NIL
    }
}

const fn hex_val(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

impl std::fmt::Display for Guid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let b = &self.0;
        write!(
            f,
            "{:02x}{:02x}{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}{:02x}{:02x}{:02x}{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7], b[8], b[9], b[10], b[11], b[12], b[13],
            b[14], b[15]
        )
    }
}

impl std::fmt::Debug for Guid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Guid({self})")
    }
}

/// One partition entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partition {
    /// What the partition holds.
    pub type_guid: Guid,
    /// This partition's own GUID (PARTUUID).
    pub unique_guid: Guid,
    /// First sector, inclusive.
    pub first_lba: u64,
    /// Last sector, inclusive.
    pub last_lba: u64,
    /// Attribute bits (bit 0 required, bit 60 read-only, ...).
    pub attributes: u64,
    /// The label (PARTLABEL), at most 36 UTF-16 code units.
    pub name: String,
}

impl Partition {
    /// Size in bytes.
    pub fn size_bytes(&self) -> u64 {
        (self.last_lba + 1 - self.first_lba) * SECTOR
    }

    fn encode(&self, out: &mut [u8]) {
        out[0..16].copy_from_slice(&self.type_guid.to_disk());
        out[16..32].copy_from_slice(&self.unique_guid.to_disk());
        out[32..40].copy_from_slice(&self.first_lba.to_le_bytes());
        out[40..48].copy_from_slice(&self.last_lba.to_le_bytes());
        out[48..56].copy_from_slice(&self.attributes.to_le_bytes());
        for (i, unit) in self.name.encode_utf16().take(36).enumerate() {
            out[56 + 2 * i..58 + 2 * i].copy_from_slice(&unit.to_le_bytes());
        }
    }

    fn decode(raw: &[u8]) -> Option<Partition> {
        let type_guid = Guid::from_disk(&raw[0..16]);
        if type_guid.is_nil() {
            return None;
        }
        let units: Vec<u16> = raw[56..128]
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .take_while(|&u| u != 0)
            .collect();
        Some(Partition {
            type_guid,
            unique_guid: Guid::from_disk(&raw[16..32]),
            first_lba: le64(&raw[32..40]),
            last_lba: le64(&raw[40..48]),
            attributes: le64(&raw[48..56]),
            name: String::from_utf16_lossy(&units),
        })
    }
}

fn le64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

fn le32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    u32::from_le_bytes(a)
}

/// A partition table: the disk GUID, the usable area and the 128 entry slots (`None` = unused).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gpt {
    /// The disk's GUID.
    pub disk_guid: Guid,
    /// First sector partitions may use.
    pub first_usable: u64,
    /// Last sector partitions may use.
    pub last_usable: u64,
    /// Where the backup header is (the disk's last sector when the table fits the disk).
    pub backup_lba: u64,
    /// The entry slots, in order; the index is the partition number minus one.
    pub entries: Vec<Option<Partition>>,
}

impl Gpt {
    /// A new empty table for a disk of `disk_sectors` sectors.
    pub fn new(disk_guid: Guid, disk_sectors: u64) -> Result<Gpt, Error> {
        if disk_sectors < 2 * (ENTRY_SECTORS + 2) + 1 {
            return Err(Error::DiskTooSmall(disk_sectors));
        }
        Ok(Gpt {
            disk_guid,
            first_usable: 2 + ENTRY_SECTORS,
            last_usable: disk_sectors - 2 - ENTRY_SECTORS,
            backup_lba: disk_sectors - 1,
            entries: vec![None; ENTRIES],
        })
    }

    /// The used entries with their 1-based partition numbers.
    pub fn partitions(&self) -> impl Iterator<Item = (usize, &Partition)> {
        self.entries
            .iter()
            .enumerate()
            .filter_map(|(i, p)| p.as_ref().map(|p| (i + 1, p)))
    }

    /// The first partition with this type and label, with its 1-based number.
    pub fn find(&self, type_guid: Guid, label: &str) -> Option<(usize, &Partition)> {
        self.partitions()
            .find(|(_, p)| p.type_guid == type_guid && p.name == label)
    }

    /// Reads and validates the primary table.
    pub fn read<R: Read + Seek>(r: &mut R) -> Result<Gpt, Error> {
        let mut header = [0u8; SECTOR as usize];
        r.seek(SeekFrom::Start(SECTOR))?;
        r.read_exact(&mut header)?;
        if &header[0..8] != SIGNATURE {
            return Err(Error::NoSignature);
        }
        let header_size = le32(&header[12..16]) as usize;
        if !(HEADER_SIZE as usize..=SECTOR as usize).contains(&header_size) {
            return Err(Error::Unsupported("header size"));
        }
        let stored_crc = le32(&header[16..20]);
        let mut check = header[..header_size].to_vec();
        check[16..20].fill(0);
        if crc32fast::hash(&check) != stored_crc {
            return Err(Error::HeaderCrc);
        }
        let entry_lba = le64(&header[72..80]);
        let count = le32(&header[80..84]) as usize;
        let entry_size = le32(&header[84..88]) as usize;
        if count != ENTRIES || entry_size != ENTRY_SIZE {
            return Err(Error::Unsupported("entry array other than 128 x 128 bytes"));
        }
        let mut raw = vec![0u8; ENTRIES * ENTRY_SIZE];
        // From the disk: an LBA whose byte offset does not fit in 64 bits wrapped to another
        // place (found by the `gpt` fuzz target).
        let entries_at = entry_lba.checked_mul(SECTOR).ok_or(Error::Unsupported(
            "partition entry array beyond 2^64 bytes",
        ))?;
        r.seek(SeekFrom::Start(entries_at))?;
        r.read_exact(&mut raw)?;
        if crc32fast::hash(&raw) != le32(&header[88..92]) {
            return Err(Error::EntriesCrc);
        }
        Ok(Gpt {
            disk_guid: Guid::from_disk(&header[56..72]),
            first_usable: le64(&header[40..48]),
            last_usable: le64(&header[48..56]),
            backup_lba: le64(&header[32..40]),
            entries: raw
                .chunks_exact(ENTRY_SIZE)
                .map(Partition::decode)
                .collect(),
        })
    }

    /// Checks every partition lies inside the usable area.
    pub fn validate(&self) -> Result<(), Error> {
        for (index, p) in self.partitions() {
            if p.first_lba < self.first_usable
                || p.last_lba > self.last_usable
                || p.first_lba > p.last_lba
            {
                return Err(Error::OutOfBounds {
                    index,
                    name: p.name.clone(),
                    first: self.first_usable,
                    last: self.last_usable,
                });
            }
        }
        Ok(())
    }

    fn entry_array(&self) -> Vec<u8> {
        let mut raw = vec![0u8; ENTRIES * ENTRY_SIZE];
        for (slot, chunk) in self.entries.iter().zip(raw.chunks_exact_mut(ENTRY_SIZE)) {
            if let Some(p) = slot {
                p.encode(chunk);
            }
        }
        raw
    }

    fn header(
        &self,
        my_lba: u64,
        alternate_lba: u64,
        entry_lba: u64,
        entries_crc: u32,
    ) -> [u8; SECTOR as usize] {
        let mut h = [0u8; SECTOR as usize];
        h[0..8].copy_from_slice(SIGNATURE);
        h[8..12].copy_from_slice(&REVISION.to_le_bytes());
        h[12..16].copy_from_slice(&HEADER_SIZE.to_le_bytes());
        h[24..32].copy_from_slice(&my_lba.to_le_bytes());
        h[32..40].copy_from_slice(&alternate_lba.to_le_bytes());
        h[40..48].copy_from_slice(&self.first_usable.to_le_bytes());
        h[48..56].copy_from_slice(&self.last_usable.to_le_bytes());
        h[56..72].copy_from_slice(&self.disk_guid.to_disk());
        h[72..80].copy_from_slice(&entry_lba.to_le_bytes());
        h[80..84].copy_from_slice(&(ENTRIES as u32).to_le_bytes());
        h[84..88].copy_from_slice(&(ENTRY_SIZE as u32).to_le_bytes());
        h[88..92].copy_from_slice(&entries_crc.to_le_bytes());
        let crc = crc32fast::hash(&h[..HEADER_SIZE as usize]);
        h[16..20].copy_from_slice(&crc.to_le_bytes());
        h
    }

    fn protective_mbr(&self) -> [u8; SECTOR as usize] {
        let mut m = [0u8; SECTOR as usize];
        let size = u32::try_from(self.backup_lba).unwrap_or(u32::MAX);
        let e = &mut m[446..462];
        e[1..4].copy_from_slice(&[0x00, 0x02, 0x00]); // CHS of LBA 1
        e[4] = 0xEE;
        e[5..8].copy_from_slice(&[0xff, 0xff, 0xff]);
        e[8..12].copy_from_slice(&1u32.to_le_bytes());
        e[12..16].copy_from_slice(&size.to_le_bytes());
        m[510] = 0x55;
        m[511] = 0xAA;
        m
    }

    /// Writes the protective MBR, the backup table (first, so a crash mid-write leaves the old
    /// primary intact) and then the primary table.
    pub fn write<W: Write + Seek>(&self, w: &mut W) -> Result<(), Error> {
        self.validate()?;
        let entries = self.entry_array();
        let crc = crc32fast::hash(&entries);
        let backup_entries_lba = self.backup_lba - ENTRY_SECTORS;
        w.seek(SeekFrom::Start(backup_entries_lba * SECTOR))?;
        w.write_all(&entries)?;
        w.write_all(&self.header(self.backup_lba, 1, backup_entries_lba, crc))?;
        w.seek(SeekFrom::Start(0))?;
        w.write_all(&self.protective_mbr())?;
        w.write_all(&self.header(1, self.backup_lba, 2, crc))?;
        w.write_all(&entries)?;
        w.flush()?;
        Ok(())
    }

    /// Fits the table to a disk of `disk_sectors` sectors: the backup header moves to the last
    /// sector and the partition that ends last grows to the new end of the usable area, keeping
    /// its end aligned to `align` sectors. Returns the number of the grown partition, or `None`
    /// when the table already fits.
    pub fn grow_to(&mut self, disk_sectors: u64, align: u64) -> Result<Option<usize>, Error> {
        let new_backup = disk_sectors
            .checked_sub(1)
            .ok_or(Error::DiskTooSmall(disk_sectors))?;
        if new_backup <= self.backup_lba {
            return Ok(None);
        }
        // The table comes from a disk: its partitions must lie in its usable area (a last LBA
        // of u64::MAX wrapped the end check below; found by the `gpt` fuzz target).
        self.validate()?;
        let new_last_usable = new_backup
            .checked_sub(ENTRY_SECTORS + 1)
            .ok_or(Error::DiskTooSmall(disk_sectors))?;
        self.backup_lba = new_backup;
        self.last_usable = new_last_usable;
        let last = self
            .entries
            .iter_mut()
            .enumerate()
            .filter_map(|(i, p)| p.as_mut().map(|p| (i, p)))
            .max_by_key(|(_, p)| p.last_lba);
        let Some((index, part)) = last else {
            return Ok(None);
        };
        let align = align.max(1);
        let end_exclusive = (new_last_usable + 1) / align * align;
        if end_exclusive <= part.last_lba + 1 {
            return Ok(None);
        }
        part.last_lba = end_exclusive - 1;
        Ok(Some(index + 1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    fn sample(disk_sectors: u64) -> Gpt {
        let mut g = Gpt::new(
            Guid::parse("01234567-89ab-cdef-0123-456789abcdef").unwrap(),
            disk_sectors,
        )
        .unwrap();
        g.entries[0] = Some(Partition {
            type_guid: crate::partitions::ESP_TYPE,
            unique_guid: Guid::from_bytes_v4([7; 16]),
            first_lba: 2048,
            last_lba: 4095,
            attributes: 0,
            name: "esp".into(),
        });
        g.entries[1] = Some(Partition {
            type_guid: crate::partitions::VAR_TYPE,
            unique_guid: Guid::from_bytes_v4([9; 16]),
            first_lba: 4096,
            last_lba: 8191,
            attributes: 0,
            name: "data".into(),
        });
        g
    }

    /// Found by the `gpt` fuzz target: a partition ending at LBA u64::MAX (outside the
    /// usable area) overflowed the growth's end check; such a table is refused, not grown. An
    /// entry array LBA whose byte offset overflows is refused when read.
    #[test]
    fn a_table_with_a_partition_outside_its_area_is_not_grown() {
        let mut g = sample(16384);
        g.entries[1].as_mut().unwrap().last_lba = u64::MAX;
        assert!(matches!(
            g.clone().grow_to(32768, 2048),
            Err(Error::OutOfBounds { index: 2, .. })
        ));
        let mut disk = Cursor::new(vec![0u8; 16384 * 512]);
        sample(16384).write(&mut disk).unwrap();
        let mut raw = disk.into_inner();
        raw[512 + 72..512 + 80].copy_from_slice(&(u64::MAX / 256).to_le_bytes());
        raw[512 + 16..512 + 20].fill(0);
        let crc = crc32fast::hash(&raw[512..512 + HEADER_SIZE as usize]);
        raw[512 + 16..512 + 20].copy_from_slice(&crc.to_le_bytes());
        assert!(matches!(
            Gpt::read(&mut Cursor::new(raw)),
            Err(Error::Unsupported(
                "partition entry array beyond 2^64 bytes"
            ))
        ));
        let mut tiny = sample(16384);
        tiny.backup_lba = 0;
        tiny.entries = vec![None; ENTRIES];
        assert!(matches!(tiny.grow_to(10, 1), Err(Error::DiskTooSmall(10))));
    }

    #[test]
    fn guid_text_and_disk_order() {
        let g = crate::partitions::ESP_TYPE;
        assert_eq!(g.to_string(), "c12a7328-f81f-11d2-ba4b-00a0c93ec93b");
        assert_eq!(&g.to_disk()[..4], &[0x28, 0x73, 0x2a, 0xc1]);
        assert_eq!(Guid::from_disk(&g.to_disk()), g);
        assert_eq!(Guid::parse("zz"), None);
    }

    #[test]
    fn write_then_read_round_trips() {
        let g = sample(16384);
        let mut disk = Cursor::new(vec![0u8; 16384 * 512]);
        g.write(&mut disk).unwrap();
        let back = Gpt::read(&mut disk).unwrap();
        assert_eq!(back, g);
        assert_eq!(back.find(crate::partitions::VAR_TYPE, "data").unwrap().0, 2);
        // The backup header is at the last sector and names the primary as its alternate.
        let raw = disk.into_inner();
        let backup = &raw[(16383 * 512) as usize..];
        assert_eq!(&backup[0..8], SIGNATURE);
        assert_eq!(le64(&backup[32..40]), 1);
    }

    #[test]
    fn corrupt_header_is_detected() {
        let mut disk = Cursor::new(vec![0u8; 16384 * 512]);
        sample(16384).write(&mut disk).unwrap();
        disk.get_mut()[512 + 40] ^= 1;
        assert!(matches!(Gpt::read(&mut disk), Err(Error::HeaderCrc)));
    }

    #[test]
    fn grow_moves_backup_and_extends_last_partition() {
        let mut g = sample(16384);
        assert_eq!(g.grow_to(16384, 2048).unwrap(), None);
        assert_eq!(g.grow_to(65536, 2048).unwrap(), Some(2));
        assert_eq!(g.backup_lba, 65535);
        let data = g.entries[1].as_ref().unwrap();
        assert_eq!((data.last_lba + 1) % 2048, 0);
        assert!(data.last_lba <= g.last_usable);
        let mut disk = Cursor::new(vec![0u8; 65536 * 512]);
        g.write(&mut disk).unwrap();
        assert_eq!(Gpt::read(&mut disk).unwrap(), g);
    }
}
