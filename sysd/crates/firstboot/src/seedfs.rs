//! Reading a NoCloud / config-drive seed volume without mounting it.
//!
//! Seeds are tiny ISO 9660 (`cloud-localds`, `genisoimage -J -R`) or FAT (`cloud-localds -f
//! vfat`) volumes. Reading them in process, rather than mounting them, means no kernel module
//! has to be loaded first (isofs and vfat are loaded in the background by init, possibly after
//! sysd starts), nothing is left mounted if sysd dies half-way, every read is bounded, and the
//! whole path is testable on a host whose kernel has neither file system.
//!
//! ISO 9660 names come from Joliet (UCS-2, preferred) or Rock Ridge `NM` entries; a volume with
//! neither has only 8.3 upper-case names and is refused with a hint. FAT goes through the
//! `fatfs` crate over a handle that refuses writes.

use std::io::{self, Read, Seek, SeekFrom, Write};

/// What kind of seed file system a volume holds, and its label.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Volume {
    Iso9660 { label: String },
    Fat { label: String },
}

impl Volume {
    pub fn label(&self) -> &str {
        match self {
            Volume::Iso9660 { label } | Volume::Fat { label } => label,
        }
    }
}

const SECTOR: u64 = 2048;
/// Directory extents larger than this are not a seed (and not read).
const MAX_DIR: u32 = 256 * 1024;
/// Root directory entries of a FAT seed read at most (a seed has a handful).
const MAX_FAT_ROOT_ENTRIES: usize = 4096;

/// Identifies an ISO 9660 or FAT volume from its first sectors; `None` for anything else.
pub fn identify<R: Read + Seek>(dev: &mut R) -> io::Result<Option<Volume>> {
    let mut boot = [0u8; 512];
    if read_at(dev, 0, &mut boot)? {
        if let Some(label) = fat_label(&boot) {
            return Ok(Some(Volume::Fat { label }));
        }
    }
    let mut pvd = [0u8; SECTOR as usize];
    if read_at(dev, 16 * SECTOR, &mut pvd)? && pvd[0] == 1 && &pvd[1..6] == b"CD001" {
        let label = String::from_utf8_lossy(&pvd[40..72]).trim_end().to_owned();
        return Ok(Some(Volume::Iso9660 { label }));
    }
    Ok(None)
}

/// The volume label of a FAT12/16/32 boot sector (the extended BPB's), if it is one.
fn fat_label(b: &[u8; 512]) -> Option<String> {
    if b[510..512] != [0x55, 0xaa] || !(b[0] == 0xeb || b[0] == 0xe9) {
        return None;
    }
    // FAT32's extended BPB starts at 0x40, FAT12/16's at 0x24; both have the signature 0x29
    // two bytes in, then a serial (4), the label (11) and the type ("FAT32   ").
    let at = if &b[0x52..0x57] == b"FAT32" {
        0x40
    } else if &b[0x36..0x39] == b"FAT" {
        0x24
    } else {
        return None;
    };
    if b[at + 2] != 0x29 {
        return Some(String::new());
    }
    let label = &b[at + 7..at + 18];
    Some(String::from_utf8_lossy(label).trim_end().to_owned())
}

/// Reads the named files of the volume's root directory, each at most `limit` bytes (a larger
/// file is an error naming it). Missing files are `None`. A volume that cannot be read as its
/// file system is `InvalidData`, the text saying what is wrong.
pub fn read_root_files<R: Read + Seek>(
    dev: &mut R,
    volume: &Volume,
    names: &[&str],
    limit: u64,
) -> io::Result<Vec<Option<Vec<u8>>>> {
    match volume {
        Volume::Iso9660 { .. } => iso_read(dev, names, limit),
        Volume::Fat { .. } => fat_read(dev, names, limit),
    }
    .map_err(|why| io::Error::new(io::ErrorKind::InvalidData, why))
}

fn fat_read<R: Read + Seek>(
    dev: &mut R,
    names: &[&str],
    limit: u64,
) -> Result<Vec<Option<Vec<u8>>>, String> {
    let mut boot = [0u8; 512];
    if !read_at(dev, 0, &mut boot).map_err(|e| format!("reading the FAT volume: {e}"))? {
        return Err("the FAT volume ends inside its boot sector".into());
    }
    check_root_chain(dev, &boot)?;
    dev.seek(SeekFrom::Start(0))
        .map_err(|e| format!("reading the FAT volume: {e}"))?;
    let fs = fatfs::FileSystem::new(ReadOnly(dev), fatfs::FsOptions::new())
        .map_err(|e| format!("not a readable FAT file system: {e}"))?;
    let root = fs.root_dir();
    let mut out = Vec::new();
    for name in names {
        // FAT32's root directory is a cluster chain, and fatfs follows a chain that loops
        // back for ever: stop after more entries than a seed has.
        let mut entry = None;
        for (n, e) in root.iter().filter_map(Result::ok).enumerate() {
            if n >= MAX_FAT_ROOT_ENTRIES {
                return Err(format!(
                    "the root directory has more than {MAX_FAT_ROOT_ENTRIES} entries (its cluster chain loops?): not a seed"
                ));
            }
            if e.file_name().eq_ignore_ascii_case(name) && e.is_file() {
                entry = Some(e);
                break;
            }
        }
        let Some(entry) = entry else {
            out.push(None);
            continue;
        };
        if entry.len() > limit {
            return Err(format!(
                "{name} is {} bytes, more than the {limit}-byte limit",
                entry.len()
            ));
        }
        let mut data = Vec::new();
        entry
            .to_file()
            .take(limit)
            .read_to_end(&mut data)
            .map_err(|e| format!("reading {name}: {e}"))?;
        out.push(Some(data));
    }
    Ok(out)
}

/// FAT32 keeps its root directory in a cluster chain, which fatfs follows for as long as it
/// goes: a chain that loops back over clusters of deleted entries (which the directory
/// iterator skips without yielding anything) would never end. A chain longer than the
/// volume's cluster count must loop, so the root's chain is walked first and refused if it is.
/// (FAT12/16 roots are a fixed region; files are read only up to their size.)
fn check_root_chain<R: Read + Seek>(dev: &mut R, boot: &[u8; 512]) -> Result<(), String> {
    let u16_at = |o: usize| u64::from(u16::from_le_bytes([boot[o], boot[o + 1]]));
    let u32_at = |o: usize| u32::from_le_bytes([boot[o], boot[o + 1], boot[o + 2], boot[o + 3]]);
    if u16_at(0x16) != 0 {
        return Ok(()); // sectors per FAT in the FAT12/16 field: not FAT32 (fatfs's test too)
    }
    let bytes_per_sector = u16_at(0x0b);
    let sectors_per_cluster = u64::from(boot[0x0d]);
    let reserved = u16_at(0x0e);
    let fats = u64::from(boot[0x10]);
    let total = match u16_at(0x13) {
        0 => u64::from(u32_at(0x20)),
        n => n,
    };
    let fat_sectors = u64::from(u32_at(0x24));
    if bytes_per_sector < 512 || sectors_per_cluster == 0 {
        return Err(format!(
            "not a readable FAT file system: {bytes_per_sector} bytes per sector, \
             {sectors_per_cluster} sectors per cluster"
        ));
    }
    let data_start = reserved + fats * fat_sectors;
    let clusters = total.saturating_sub(data_start) / sectors_per_cluster;
    // Entries past the FAT's own size cannot be read (fatfs refuses them too).
    let fat_entries = (fat_sectors * bytes_per_sector / 4).min(clusters + 2);
    let fat_offset = reserved * bytes_per_sector;
    let mut cluster = u64::from(u32_at(0x2c) & 0x0fff_ffff);
    let mut walked = 0u64;
    let mut sector = [0u8; 512];
    let mut cached = None;
    // Clusters 0 and 1 are reserved, >= 0x0ffffff7 are bad or the end of the chain.
    while (2..0x0fff_fff7).contains(&cluster) && cluster < fat_entries {
        walked += 1;
        if walked > clusters {
            return Err(format!(
                "the root directory's cluster chain is longer than the volume's {clusters} \
                 clusters (it loops): not a seed"
            ));
        }
        let at = fat_offset + cluster * 4;
        if cached != Some(at / 512) {
            if !read_at(dev, at / 512 * 512, &mut sector)
                .map_err(|e| format!("reading the FAT: {e}"))?
            {
                return Err("the FAT extends past the end of the volume".into());
            }
            cached = Some(at / 512);
        }
        let i = (at % 512) as usize;
        let next = u32::from_le_bytes([sector[i], sector[i + 1], sector[i + 2], sector[i + 3]]);
        cluster = u64::from(next & 0x0fff_ffff);
    }
    Ok(())
}

/// A directory entry of an ISO 9660 directory.
#[derive(Debug)]
struct IsoEntry {
    name: String,
    extent: u32,
    size: u32,
    dir: bool,
    /// The name came from a Rock Ridge `NM` entry.
    rock_ridge: bool,
}

fn iso_read<R: Read + Seek>(
    dev: &mut R,
    names: &[&str],
    limit: u64,
) -> Result<Vec<Option<Vec<u8>>>, String> {
    let io = |e: io::Error| format!("reading the ISO 9660 volume: {e}");
    // Volume descriptors from sector 16 to the terminator: the primary, and a Joliet
    // supplementary one if present.
    let mut primary = None;
    let mut joliet = None;
    for sector in 16..64 {
        let mut vd = [0u8; SECTOR as usize];
        if !read_at(dev, sector * SECTOR, &mut vd).map_err(io)? || &vd[1..6] != b"CD001" {
            break;
        }
        match vd[0] {
            1 => primary = Some(vd),
            2 if matches!(&vd[88..91], b"%/@" | b"%/C" | b"%/E") => joliet = Some(vd),
            255 => break,
            _ => {}
        }
    }
    let (vd, is_joliet) = match (joliet, primary) {
        (Some(j), _) => (j, true),
        (None, Some(p)) => (p, false),
        (None, None) => return Err("no ISO 9660 primary volume descriptor".into()),
    };
    let block = u16::from_le_bytes([vd[128], vd[129]]) as u64;
    if block != SECTOR {
        return Err(format!("unsupported ISO 9660 logical block size {block}"));
    }
    let root = parse_record(&vd[156..190], is_joliet)
        .ok_or("the ISO 9660 root directory record is malformed")?;
    let entries = iso_dir(dev, &root, is_joliet).map_err(io)?;
    if !is_joliet && entries.iter().any(|e| !e.dir && !e.rock_ridge) {
        // Without Rock Ridge names only 8.3 upper-case identifiers exist (USER_DAT.;1).
        return Err(
            "the ISO 9660 volume has neither Joliet nor Rock Ridge file names; make it \
                    with `cloud-localds` or `genisoimage -J -R`"
                .into(),
        );
    }
    let mut out = Vec::new();
    for name in names {
        let Some(e) = entries.iter().find(|e| !e.dir && e.name == *name) else {
            out.push(None);
            continue;
        };
        if u64::from(e.size) > limit {
            return Err(format!(
                "{name} is {} bytes, more than the {limit}-byte limit",
                e.size
            ));
        }
        let mut data = vec![0u8; e.size as usize];
        if !read_at(dev, u64::from(e.extent) * SECTOR, &mut data).map_err(io)? {
            return Err(format!("{name} extends past the end of the volume"));
        }
        out.push(Some(data));
    }
    Ok(out)
}

fn iso_dir<R: Read + Seek>(dev: &mut R, dir: &IsoEntry, joliet: bool) -> io::Result<Vec<IsoEntry>> {
    if dir.size > MAX_DIR {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "root directory of {} bytes is too large for a seed",
                dir.size
            ),
        ));
    }
    let mut data = vec![0u8; dir.size as usize];
    if !read_at(dev, u64::from(dir.extent) * SECTOR, &mut data)? {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "root directory extends past the end of the volume",
        ));
    }
    let mut out = Vec::new();
    let mut pos = 0usize;
    while pos < data.len() {
        let len = data[pos] as usize;
        if len == 0 {
            // Records never cross a sector boundary: the rest of this sector is padding.
            pos = (pos / SECTOR as usize + 1) * SECTOR as usize;
            continue;
        }
        let Some(record) = data.get(pos..pos + len) else {
            break;
        };
        if let Some(e) = parse_record(record, joliet) {
            out.push(e);
        }
        pos += len;
    }
    Ok(out)
}

/// One directory record; `None` for `.`/`..` or a malformed record.
fn parse_record(r: &[u8], joliet: bool) -> Option<IsoEntry> {
    if r.len() < 34 || (r[0] as usize) > r.len() || (r[0] as usize) < 34 {
        return None;
    }
    let r = &r[..r[0] as usize];
    let extent = u32::from_le_bytes(r[2..6].try_into().ok()?);
    let size = u32::from_le_bytes(r[10..14].try_into().ok()?);
    let dir = r[25] & 0x02 != 0;
    let id_len = r[32] as usize;
    let id = r.get(33..33 + id_len)?;
    let mut name = if id_len == 1 && (id[0] == 0 || id[0] == 1) {
        // `.` and `..` (the root's own record is parsed as `.`).
        String::from(".")
    } else if joliet {
        let units: Vec<u16> = id
            .chunks_exact(2)
            .map(|c| u16::from_be_bytes([c[0], c[1]]))
            .collect();
        String::from_utf16_lossy(&units)
    } else {
        String::from_utf8_lossy(id).into_owned()
    };
    let mut rock_ridge = false;
    if !joliet {
        // Rock Ridge: SUSP entries after the identifier (padded to an even offset).
        let mut at = 33 + id_len + (1 - id_len % 2);
        while at + 4 <= r.len() {
            let (sig, len) = (&r[at..at + 2], r[at + 2] as usize);
            if len < 4 || at + len > r.len() {
                break;
            }
            if sig == b"NM" && len > 5 {
                name = String::from_utf8_lossy(&r[at + 5..at + len]).into_owned();
                rock_ridge = true;
                break;
            }
            at += len;
        }
    }
    if let Some(stripped) = name.strip_suffix(";1") {
        name = stripped.trim_end_matches('.').to_owned();
    }
    Some(IsoEntry {
        name,
        extent,
        size,
        dir,
        rock_ridge,
    })
}

/// Fills `buf` from `offset`; `false` if the device ends first.
fn read_at<R: Read + Seek>(dev: &mut R, offset: u64, buf: &mut [u8]) -> io::Result<bool> {
    dev.seek(SeekFrom::Start(offset))?;
    match dev.read_exact(buf) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(e),
    }
}

/// A block device handle that cannot be written through (fatfs wants `Write`).
struct ReadOnly<R>(R);

impl<R: Read> Read for ReadOnly<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf)
    }
}

impl<R: Seek> Seek for ReadOnly<R> {
    fn seek(&mut self, pos: SeekFrom) -> io::Result<u64> {
        self.0.seek(pos)
    }
}

impl<R> Write for ReadOnly<R> {
    fn write(&mut self, _: &[u8]) -> io::Result<usize> {
        Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "seed volumes are read-only",
        ))
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;
    use std::path::Path;
    use std::process::Command;

    /// Builds a seed the way users do, with `cloud-localds` (cloud-image-utils) or
    /// `genisoimage`; the tools are part of the test dependencies (./dev).
    fn seed(dir: &Path, args: &[&str], out: &str) -> File {
        let status = Command::new(args[0])
            .args(&args[1..])
            .current_dir(dir)
            .status()
            .unwrap_or_else(|e| panic!("{}: {e} (install cloud-image-utils)", args[0]));
        assert!(status.success(), "{args:?}");
        File::open(dir.join(out)).unwrap()
    }

    fn files(dir: &Path) {
        std::fs::write(dir.join("user-data"), "#cloud-config\nhostname: seeded\n").unwrap();
        std::fs::write(dir.join("meta-data"), "instance-id: iid-1\n").unwrap();
        std::fs::write(dir.join("network-config"), "version: 2\n").unwrap();
    }

    const NAMES: &[&str] = &["user-data", "meta-data", "network-config", "vendor-data"];

    fn check(got: Vec<Option<Vec<u8>>>) {
        assert_eq!(
            got[0].as_deref(),
            Some(&b"#cloud-config\nhostname: seeded\n"[..])
        );
        assert_eq!(got[1].as_deref(), Some(&b"instance-id: iid-1\n"[..]));
        assert_eq!(got[2].as_deref(), Some(&b"version: 2\n"[..]));
        assert_eq!(got[3], None);
    }

    #[test]
    fn cloud_localds_iso() {
        let dir = tempfile::tempdir().unwrap();
        files(dir.path());
        let mut dev = seed(
            dir.path(),
            &[
                "cloud-localds",
                "-N",
                "network-config",
                "seed.iso",
                "user-data",
                "meta-data",
            ],
            "seed.iso",
        );
        let vol = identify(&mut dev).unwrap().unwrap();
        assert_eq!(
            vol,
            Volume::Iso9660 {
                label: "cidata".into()
            }
        );
        check(read_root_files(&mut dev, &vol, NAMES, 4096).unwrap());
        let e = read_root_files(&mut dev, &vol, &["user-data"], 10).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        assert_eq!(
            e.to_string(),
            "user-data is 31 bytes, more than the 10-byte limit"
        );
    }

    #[test]
    fn cloud_localds_vfat() {
        let dir = tempfile::tempdir().unwrap();
        files(dir.path());
        let mut dev = seed(
            dir.path(),
            &[
                "cloud-localds",
                "-f",
                "vfat",
                "-N",
                "network-config",
                "seed.img",
                "user-data",
                "meta-data",
            ],
            "seed.img",
        );
        let vol = identify(&mut dev).unwrap().unwrap();
        assert_eq!(
            vol,
            Volume::Fat {
                label: "cidata".into()
            }
        );
        check(read_root_files(&mut dev, &vol, NAMES, 4096).unwrap());
    }

    #[test]
    fn rock_ridge_only_and_plain_iso() {
        let dir = tempfile::tempdir().unwrap();
        files(dir.path());
        std::fs::create_dir(dir.path().join("in")).unwrap();
        for f in ["user-data", "meta-data", "network-config"] {
            std::fs::rename(dir.path().join(f), dir.path().join("in").join(f)).unwrap();
        }
        let mut dev = seed(
            dir.path(),
            &[
                "genisoimage",
                "-quiet",
                "-R",
                "-V",
                "CIDATA",
                "-o",
                "rr.iso",
                "in",
            ],
            "rr.iso",
        );
        let vol = identify(&mut dev).unwrap().unwrap();
        assert_eq!(vol.label(), "CIDATA");
        check(read_root_files(&mut dev, &vol, NAMES, 4096).unwrap());

        let mut dev = seed(
            dir.path(),
            &[
                "genisoimage",
                "-quiet",
                "-V",
                "cidata",
                "-o",
                "plain.iso",
                "in",
            ],
            "plain.iso",
        );
        let vol = identify(&mut dev).unwrap().unwrap();
        let e = read_root_files(&mut dev, &vol, NAMES, 4096)
            .unwrap_err()
            .to_string();
        assert!(e.contains("neither Joliet nor Rock Ridge"), "{e}");
    }

    /// An empty 40 MiB FAT32 volume labelled `cidata`.
    fn fat32_cidata() -> io::Cursor<Vec<u8>> {
        let mut img = io::Cursor::new(vec![0u8; 40 << 20]);
        fatfs::format_volume(
            &mut img,
            fatfs::FormatVolumeOptions::new()
                .fat_type(fatfs::FatType::Fat32)
                .volume_label(*b"cidata     "),
        )
        .unwrap();
        img
    }

    /// A FAT32 seed whose root directory fills two clusters (its entries deleted when
    /// `deleted`), then has its first cluster's FAT entry point back at itself.
    fn looping_fat_root(deleted: bool) -> Vec<u8> {
        let mut img = fat32_cidata();
        {
            // Enough entries to fill the root's first cluster: no end-of-directory mark in it.
            let fs = fatfs::FileSystem::new(&mut img, fatfs::FsOptions::new()).unwrap();
            let cluster = fs.cluster_size() as usize;
            for i in 0..2 * cluster / 32 {
                fs.root_dir().create_file(&format!("F{i}")).unwrap();
            }
            if deleted {
                // Deleted entries stay in the chain: fatfs skips them without yielding.
                for i in 0..2 * cluster / 32 {
                    fs.root_dir().remove(&format!("F{i}")).unwrap();
                }
            }
        }
        let mut img = img.into_inner();
        let bytes_per_sector = u16::from_le_bytes([img[0x0b], img[0x0c]]) as usize;
        let reserved = u16::from_le_bytes([img[0x0e], img[0x0f]]) as usize;
        let root = u32::from_le_bytes(img[0x2c..0x30].try_into().unwrap()) as usize;
        let fats = img[0x10] as usize;
        let fat_size = u32::from_le_bytes(img[0x24..0x28].try_into().unwrap()) as usize;
        for f in 0..fats {
            let at = (reserved + f * fat_size) * bytes_per_sector + root * 4;
            img[at..at + 4].copy_from_slice(&(root as u32).to_le_bytes());
        }
        img
    }

    /// Reads `user-data` from `img` on a thread; the error, or a panic if it did not end.
    fn read_looping(img: Vec<u8>) -> String {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut dev = io::Cursor::new(img);
            let vol = identify(&mut dev).unwrap().unwrap();
            let _ = tx.send(read_root_files(&mut dev, &vol, &["user-data"], 4096));
        });
        let got = rx
            .recv_timeout(std::time::Duration::from_secs(60))
            .expect("reading a looping root directory did not end");
        got.unwrap_err().to_string()
    }

    /// A FAT32 volume whose root directory's cluster chain points back at itself: refused,
    /// not read for ever, whether the loop holds live entries or only deleted ones (which the
    /// directory iterator skips without yielding, so no count of entries stops it: this one
    /// hung first boot before the chain was checked).
    #[test]
    fn a_fat_root_directory_that_loops_is_refused() {
        for deleted in [true, false] {
            let e = read_looping(looping_fat_root(deleted));
            assert!(
                e.contains("the root directory's cluster chain is longer than the volume's")
                    && e.contains("clusters (it loops): not a seed"),
                "deleted entries: {deleted}: {e}"
            );
        }
    }

    /// A FAT32 root whose chain is long but ends is read (the check counts, it does not guess).
    #[test]
    fn a_long_fat_root_directory_that_ends_is_read() {
        let mut img = fat32_cidata();
        {
            let fs = fatfs::FileSystem::new(&mut img, fatfs::FsOptions::new()).unwrap();
            let cluster = fs.cluster_size() as usize;
            for i in 0..3 * cluster / 32 {
                fs.root_dir().create_file(&format!("F{i}")).unwrap();
            }
            let mut f = fs.root_dir().create_file("user-data").unwrap();
            f.write_all(b"#cloud-config\n").unwrap();
        }
        let mut dev = io::Cursor::new(img.into_inner());
        let vol = identify(&mut dev).unwrap().unwrap();
        let got = read_root_files(&mut dev, &vol, &["user-data"], 4096).unwrap();
        assert_eq!(got[0].as_deref(), Some(&b"#cloud-config\n"[..]));
    }

    #[test]
    fn other_volumes_are_not_seeds() {
        assert_eq!(
            identify(&mut io::Cursor::new(vec![0u8; 64 * 1024])).unwrap(),
            None
        );
        assert_eq!(
            identify(&mut io::Cursor::new(vec![0u8; 100])).unwrap(),
            None
        );
        // Garbage after a valid-looking ISO header must not panic.
        let mut img = vec![0u8; 40 * 2048];
        img[16 * 2048] = 1;
        img[16 * 2048 + 1..16 * 2048 + 6].copy_from_slice(b"CD001");
        img[16 * 2048 + 128] = 0; // block size 0
        let mut dev = io::Cursor::new(img.clone());
        let vol = identify(&mut dev).unwrap().unwrap();
        assert!(read_root_files(&mut dev, &vol, NAMES, 10).is_err());
        img[16 * 2048 + 129] = 8; // 2048
        img[16 * 2048 + 156] = 34;
        img[16 * 2048 + 156 + 2] = 200; // root extent past the end
        img[16 * 2048 + 156 + 10] = 0x10;
        let mut dev = io::Cursor::new(img);
        assert!(read_root_files(&mut dev, &vol, NAMES, 10).is_err());
    }
}
