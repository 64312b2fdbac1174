//! The update repository's manifest (`manifest.json`, a TUF target): which versions exist, their
//! payload targets and rollout waves. Written by `image-build update add`, read by sysd's update
//! agent. Versioned wire data: lenient on unknown fields, validated explicitly by the reader.

use std::cmp::Ordering;

use serde::{Deserialize, Serialize};

/// The manifest's TUF target name.
pub const MANIFEST_TARGET: &str = "manifest.json";

/// `manifest.json`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Newest first.
    #[serde(default)]
    pub updates: Vec<Payload>,
}

impl Manifest {
    /// Checks what the node puts into file names: every version (ESP entries are
    /// `keelson_VERSION+TRIES.efi`) and every extension's name and version.
    pub fn check(&self) -> Result<(), String> {
        for p in &self.updates {
            check_version(&p.version).map_err(|e| format!("version {:?}: {e}", p.version))?;
            for x in &p.extensions {
                check_version(&x.name)
                    .and_then(|()| check_version(&x.version))
                    .map_err(|e| {
                        format!(
                            "version {}: extension {:?} {:?}: {e}",
                            p.version, x.name, x.version
                        )
                    })?;
            }
            for x in &p.extensions {
                for q in &x.patches {
                    let what = format!(
                        "version {}: extension {} patch {:?}",
                        p.version, x.name, q.target
                    );
                    for (field, hex) in [("from_roothash", &q.from_roothash), ("sha256", &q.sha256)]
                    {
                        if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                            return Err(format!("{what}: {field} {hex:?} is not 64 hex digits"));
                        }
                    }
                    if q.from_size == 0 || q.size == 0 {
                        return Err(format!("{what}: an image size is 0"));
                    }
                }
            }
            for r in &p.root_patches {
                let what = format!("version {}: root patch {:?}", p.version, r.target);
                check_version(&r.from_version).map_err(|e| format!("{what}: from version: {e}"))?;
                if r.from_roothash.len() != 64
                    || !r.from_roothash.bytes().all(|b| b.is_ascii_hexdigit())
                {
                    return Err(format!(
                        "{what}: {:?} is no dm-verity root hash (64 hex digits)",
                        r.from_roothash
                    ));
                }
                if r.from_size == 0 || r.from_size % 4096 != 0 {
                    return Err(format!(
                        "{what}: from size {} is not a positive multiple of 4096",
                        r.from_size
                    ));
                }
            }
            for u in &p.uki_patches {
                if u.slot != "a" && u.slot != "b" {
                    return Err(format!(
                        "version {}: UKI patch {:?} is for slot {:?} (a or b)",
                        p.version, u.target, u.slot
                    ));
                }
                check_version(&u.from_version).map_err(|e| {
                    format!(
                        "version {}: UKI patch {:?}: from version: {e}",
                        p.version, u.target
                    )
                })?;
                if u.from_sha256.len() != 64
                    || !u.from_sha256.bytes().all(|b| b.is_ascii_hexdigit())
                {
                    return Err(format!(
                        "version {}: UKI patch {:?}: {:?} is no sha256",
                        p.version, u.target, u.from_sha256
                    ));
                }
            }
        }
        Ok(())
    }

    /// Sorts the versions newest first.
    pub fn sort(&mut self) {
        self.updates
            .sort_by(|a, b| compare_versions(&b.version, &a.version));
    }
}

/// Whether `v` may be a version (or an extension's name): 1 to 64 characters of `0-9 A-Z a-z
/// . _ ~ ^ -`, the first a letter or digit. It becomes part of file names on the ESP and in
/// the stores, so no `/`, no `..` climbing, and no `+` (the boot counter's separator in
/// `keelson_VERSION+3-0.efi`).
pub fn check_version(v: &str) -> Result<(), String> {
    let ok_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '~' | '^' | '-');
    if v.is_empty() || v.len() > 64 {
        return Err("must be 1 to 64 characters".into());
    }
    if !v.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        return Err("must start with a letter or digit".into());
    }
    if let Some(c) = v.chars().find(|&c| !ok_char(c)) {
        return Err(format!(
            "{c:?} is not allowed (letters, digits and . _ ~ ^ - are)"
        ));
    }
    Ok(())
}

/// One version: the payload targets and where it may go.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Payload {
    pub version: String,
    /// The image config's name (`vm`, `metal`, `test`): a node installs only its own variant.
    pub variant: String,
    /// dm-verity root hash of the root image (also on both UKIs' command lines).
    pub roothash: String,
    /// Target: the EROFS root, gzip-compressed.
    pub root: String,
    /// Uncompressed size of the root image.
    pub root_size: u64,
    /// Target: the dm-verity hash device.
    pub verity: String,
    pub verity_size: u64,
    /// Target: the UKI booting slot A (`keelson.slot=a`).
    pub uki_a: String,
    /// Target: the UKI booting slot B.
    pub uki_b: String,
    /// RFC 3339 release time.
    pub released: String,
    /// Rollout: from `start`, nodes whose seed is below `percent` may install. Empty: everyone.
    #[serde(default)]
    pub waves: Vec<Wave>,
    /// The system extensions that fit this version (at most one version per name): built for
    /// it, or listed under it by `image-build update extension` (the repository says it fits).
    #[serde(default)]
    pub extensions: Vec<ExtensionPayload>,
    /// The root image as content-defined chunks, for delta updates (absent in repositories
    /// written before deltas, and then the node downloads the full root).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chunks: Option<ChunksRef>,
    /// This version's UKIs as zstd `--patch-from` patches against the previous listed
    /// version's (absent when there was none): a node running that version patches the UKI it
    /// booted instead of downloading the whole one.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub uki_patches: Vec<UkiPatch>,
    /// This version's root image as zstd `--patch-from` patches against earlier versions'
    /// roots (the previous listed one's by default): a node running one of them patches its
    /// own root, read through dm-verity, instead of fetching chunks or the whole root.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub root_patches: Vec<RootPatch>,
}

/// A version's root image as a patch against the root of a version nodes already run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RootPatch {
    /// The version whose root the patch applies to.
    pub from_version: String,
    /// That root's dm-verity root hash: a node patches only the root it booted with this hash
    /// (every byte it reads from it is checked by dm-verity against it).
    pub from_roothash: String,
    /// That root image's size: the reference is its first `from_size` bytes.
    pub from_size: u64,
    /// Target: the patch (one zstd frame, the old root its reference prefix, the new root's
    /// size in its header), `<variant>-<version>-root.from-<from_version>.zst`.
    pub target: String,
}

/// One UKI of a version as a patch against a UKI nodes already have.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UkiPatch {
    /// The slot whose UKI the patch builds (`a` or `b`): a node running the other slot
    /// installs it.
    pub slot: String,
    /// The version whose UKI (for the other slot) the patch applies to.
    pub from_version: String,
    /// That UKI's sha256 (hex): the node patches only a running UKI with this hash.
    pub from_sha256: String,
    /// Target: the patch (a zstd frame, the old UKI its reference prefix),
    /// `<variant>-<version>-uki-<slot>.from-<from_version>.zst`.
    pub target: String,
}

/// The largest zstd window (log2) a UKI patch may need: the reference UKI and the new one
/// together, up to 64 MiB. image-build publishes no patch above it; the agent refuses to
/// decode one (bounded memory whatever a patch declares).
pub const UKI_PATCH_WINDOW_LOG_MAX: u32 = 26;

/// The largest zstd window (log2) a root patch is made with: zstd's own maximum, 2 GiB for the
/// reference and the new root together. Nodes decode a root patch in one pass into a buffer of
/// the signed root size (no window buffer), so this bounds nothing on the node.
pub const ROOT_PATCH_WINDOW_LOG_MAX: u32 = 31;

/// Where a version's chunk list is, and what it adds up to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunksRef {
    /// Target: the chunk list ([`ChunkList`], JSON), `<variant>-<version>-root.chunks.json`.
    pub target: String,
    /// Number of chunks (entries) in the list.
    pub count: u64,
}

/// The chunker every chunk list of this format is cut with: FastCDC 2020 (the `fastcdc`
/// crate's `v2020`, normalization level 1, its default gear table) with 16 KiB minimum,
/// 32 KiB average and 64 KiB maximum chunks, on the uncompressed root image.
pub const CHUNKER: &str = "fastcdc-v2020/16384/32768/65536";
/// Chunk size bounds of [`CHUNKER`].
pub const CHUNK_MIN: u64 = 16 << 10;
pub const CHUNK_AVG: u64 = 32 << 10;
pub const CHUNK_MAX: u64 = 64 << 10;
/// How chunk files are compressed.
pub const CHUNK_COMPRESSION: &str = "zstd";
/// Chunk files live under the repository's `targets/` as `chunks/<sha256 of the chunk>`.
pub const CHUNK_DIR: &str = "chunks";

/// The most a stored (compressed) chunk may take: zstd's worst case (`ZSTD_compressBound`) for
/// a chunk of `length` bytes, rounded up.
pub fn chunk_stored_max(length: u64) -> u64 {
    length + length / 128 + 1024
}

/// The most bytes a valid chunk list for a root of `root_size` bytes can take: every chunk of
/// the minimum size, each entry at its longest. A signed list longer than this is refused
/// before it is downloaded.
pub fn chunk_list_max_bytes(root_size: u64) -> u64 {
    (root_size / CHUNK_MIN + 1) * 160 + 4096
}

/// A version's chunk list (a signed target): the root image, in order, as chunks. Each chunk is
/// stored once in the repository (`targets/chunks/<sha256>`, zstd), named by the sha256 of its
/// uncompressed bytes, which the node checks on arrival. Signed by being in a signed target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkList {
    /// [`CHUNKER`]: how the image was cut (a node indexes its running slot the same way).
    pub chunker: String,
    /// [`CHUNK_COMPRESSION`].
    pub compression: String,
    /// The uncompressed root image's size: the chunks cover exactly `0..size`.
    pub size: u64,
    pub chunks: Vec<ChunkEntry>,
}

/// One chunk of a [`ChunkList`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkEntry {
    /// Hex sha256 of the uncompressed chunk (its name in the repository).
    pub sha256: String,
    /// Where it starts in the root image.
    pub offset: u64,
    /// Uncompressed length.
    pub length: u64,
    /// Length of its stored (compressed) file.
    pub stored: u64,
}

impl ChunkList {
    /// Checks everything a node acts on: the chunker, the size (`root_size` is the signed
    /// manifest's), chunks that tile `0..size` in order without gaps or overlaps, each within
    /// the chunker's bounds, with a well-formed name. The error names the first bad entry.
    pub fn check(&self, root_size: u64) -> Result<(), String> {
        if self.chunker != CHUNKER {
            return Err(format!(
                "chunker {:?} is not the one this node cuts its slot with ({CHUNKER})",
                self.chunker
            ));
        }
        if self.compression != CHUNK_COMPRESSION {
            return Err(format!(
                "chunk compression {:?} is not supported (only {CHUNK_COMPRESSION})",
                self.compression
            ));
        }
        if self.size != root_size {
            return Err(format!(
                "the list covers {} bytes but the root image is {root_size}",
                self.size
            ));
        }
        let most = root_size / CHUNK_MIN + 1;
        if self.chunks.len() as u64 > most {
            return Err(format!(
                "{} chunks for {root_size} bytes: at least {CHUNK_MIN} bytes each allows at most {most}",
                self.chunks.len()
            ));
        }
        let mut at = 0u64;
        let last = self.chunks.len().saturating_sub(1);
        for (i, c) in self.chunks.iter().enumerate() {
            let is_hex = |s: &str| {
                s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
            };
            if !is_hex(&c.sha256) {
                return Err(format!(
                    "chunk {i}: {:?} is not a lowercase hex sha256",
                    c.sha256
                ));
            }
            if c.offset != at {
                return Err(format!(
                    "chunk {i} starts at byte {} but the previous one ends at {at} ({})",
                    c.offset,
                    if c.offset < at { "overlap" } else { "gap" }
                ));
            }
            if c.length == 0 || c.length > CHUNK_MAX || (c.length < CHUNK_MIN && i != last) {
                return Err(format!(
                    "chunk {i} is {} bytes long: chunks are {CHUNK_MIN} to {CHUNK_MAX} bytes (only the last may be shorter)",
                    c.length
                ));
            }
            let end = c.offset + c.length;
            if end > root_size {
                return Err(format!(
                    "chunk {i} ends at byte {end}, past the root image's end ({root_size})"
                ));
            }
            if c.stored == 0 || c.stored > chunk_stored_max(c.length) {
                return Err(format!(
                    "chunk {i} is stored in {} bytes, impossible for {} compressed bytes",
                    c.stored, c.length
                ));
            }
            at = end;
        }
        if at != root_size {
            return Err(format!(
                "the chunks end at byte {at}, short of the root image's {root_size}"
            ));
        }
        Ok(())
    }
}

/// Cutting images into chunks with [`CHUNKER`].
#[cfg(feature = "chunking")]
pub mod chunking {
    use std::io::Read;

    use sha2::{Digest, Sha256};

    /// One chunk as cut from a stream.
    #[derive(Debug)]
    pub struct Cut {
        pub offset: u64,
        pub sha256: [u8; 32],
        pub data: Vec<u8>,
    }

    /// Cuts `source` into chunks with [`super::CHUNKER`] (memory: one maximum chunk).
    pub fn cut(source: impl Read) -> impl Iterator<Item = std::io::Result<Cut>> {
        fastcdc::v2020::StreamCDC::new(
            source,
            super::CHUNK_MIN as usize,
            super::CHUNK_AVG as usize,
            super::CHUNK_MAX as usize,
        )
        .map(|r| {
            let c = r.map_err(|e| match e {
                fastcdc::v2020::Error::IoError(io) => io,
                other => std::io::Error::other(other.to_string()),
            })?;
            Ok(Cut {
                offset: c.offset,
                sha256: Sha256::digest(&c.data).into(),
                data: c.data,
            })
        })
    }
}

/// A system extension image listed under an OS version (docs/extensions.md).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExtensionPayload {
    /// `SYSEXT_ID`: the extension's name (`etcd`).
    pub name: String,
    /// `SYSEXT_VERSION_ID`: the extension's own version.
    pub version: String,
    /// dm-verity root hash of the extension's file system (hex); the image's partition UUIDs
    /// are its first and last 128 bits.
    pub roothash: String,
    /// Target: the Discoverable Disk Image, gzip-compressed
    /// (`ext-<name>-<version>-for-<os version>.raw.gz`).
    pub target: String,
    /// Size of the compressed target in bytes.
    pub size: u64,
    /// Hex sha256 of the compressed target (TUF checks it too; this names it in the manifest).
    pub sha256: String,
    /// The OS `VERSION_ID` in the extension's extension-release (the version it was built for).
    pub built_for: String,
    /// The image as zstd `--patch-from` patches against the same extension's images listed
    /// under the previous OS version: a node that has one in its store builds this one from
    /// it instead of downloading the whole image.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub patches: Vec<ExtensionPatch>,
}

/// An extension image as a patch against another image of the same extension.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExtensionPatch {
    /// The root hash of the image it applies to (the store's name for it).
    pub from_roothash: String,
    /// That image's size in bytes.
    pub from_size: u64,
    /// The image it builds: its size and hex sha256 (uncompressed), checked by the node
    /// before the image enters the store.
    pub size: u64,
    pub sha256: String,
    /// Target: the patch, `ext-<name>-<version>-for-<os version>.from-<first 16 hex digits
    /// of from_roothash>.zst`.
    pub target: String,
}

/// The TUF target name of an extension image built for `os_version`.
pub fn extension_target(name: &str, version: &str, os_version: &str) -> String {
    format!("ext-{name}-{version}-for-{os_version}.raw.gz")
}

impl Payload {
    /// The UKI target for a slot letter (`a`/`b`).
    pub fn uki_for(&self, slot: &str) -> &str {
        if slot == "a" {
            &self.uki_a
        } else {
            &self.uki_b
        }
    }
}

/// A rollout wave.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Wave {
    /// RFC 3339 time the wave opens.
    pub start: String,
    /// Share of the fleet (by per-node seed, 0..100) allowed once it opens.
    pub percent: u8,
}

/// Compares versions the way systemd-boot orders `IMAGE_VERSION`s for dotted numbers: runs of
/// digits numerically, other runs byte-wise, separators ignored.
pub fn compare_versions(a: &str, b: &str) -> Ordering {
    fn parts(s: &str) -> Vec<(bool, &str)> {
        let mut out = Vec::new();
        let bytes = s.as_bytes();
        let mut i = 0;
        while i < bytes.len() {
            let c = bytes[i];
            if !c.is_ascii_alphanumeric() {
                i += 1;
                continue;
            }
            let digit = c.is_ascii_digit();
            let start = i;
            while i < bytes.len()
                && bytes[i].is_ascii_alphanumeric()
                && bytes[i].is_ascii_digit() == digit
            {
                i += 1;
            }
            out.push((digit, &s[start..i]));
        }
        out
    }
    let (pa, pb) = (parts(a), parts(b));
    for (x, y) in pa.iter().zip(pb.iter()) {
        let ord = match (x.0, y.0) {
            (true, true) => {
                let (xs, ys) = (x.1.trim_start_matches('0'), y.1.trim_start_matches('0'));
                xs.len().cmp(&ys.len()).then_with(|| xs.cmp(ys))
            }
            (true, false) => Ordering::Greater,
            (false, true) => Ordering::Less,
            (false, false) => x.1.cmp(y.1),
        };
        if ord != Ordering::Equal {
            return ord;
        }
    }
    pa.len().cmp(&pb.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_that_would_make_bad_file_names_are_refused() {
        for ok in [
            "0.2.0",
            "1.0~rc1",
            "2026.12.06-1",
            "3.4.23-1",
            "etcd",
            "v1_0^git",
        ] {
            assert_eq!(check_version(ok), Ok(()), "{ok}");
        }
        for (bad, why) in [
            ("", "must be 1 to 64 characters"),
            (
                "../../EFI/BOOT/BOOTX64",
                "must start with a letter or digit",
            ),
            ("0.2/../../x", "'/' is not allowed"),
            ("0.2.0+9", "'+' is not allowed"),
            ("0.2 0", "' ' is not allowed"),
            (".hidden", "must start with a letter or digit"),
        ] {
            assert_eq!(
                check_version(bad).unwrap_err(),
                if why.starts_with('\'') {
                    format!("{why} (letters, digits and . _ ~ ^ - are)")
                } else {
                    why.to_owned()
                },
                "{bad}"
            );
        }
        assert!(check_version(&"1".repeat(65)).is_err());
        let m: Manifest = serde_json::from_str(
            r#"{"updates": [{"version": "0.2.0+9", "variant": "t", "roothash": "", "root": "",
               "root_size": 0, "verity": "", "verity_size": 0, "uki_a": "", "uki_b": "",
               "released": ""}]}"#,
        )
        .unwrap();
        assert_eq!(
            m.check().unwrap_err(),
            "version \"0.2.0+9\": '+' is not allowed (letters, digits and . _ ~ ^ - are)"
        );
    }

    #[test]
    fn versions_compare_numerically() {
        assert_eq!(compare_versions("0.10.0", "0.9.9"), Ordering::Greater);
        assert_eq!(compare_versions("1.0", "1.0.0"), Ordering::Less);
        assert_eq!(compare_versions("0.2.0", "0.2.0"), Ordering::Equal);
        assert_eq!(compare_versions("0.1.0", "0.2.0"), Ordering::Less);
    }

    #[test]
    fn manifest_sorts_newest_first_and_ignores_unknown_fields() {
        let p = |v: &str| Payload {
            version: v.into(),
            variant: "t".into(),
            roothash: String::new(),
            root: String::new(),
            root_size: 0,
            verity: String::new(),
            verity_size: 0,
            uki_a: String::new(),
            uki_b: String::new(),
            released: String::new(),
            waves: vec![],
            extensions: vec![],
            chunks: None,
            uki_patches: vec![],
            root_patches: vec![],
        };
        let mut m = Manifest {
            updates: vec![p("0.2.0"), p("0.10.0"), p("0.3.1")],
        };
        m.sort();
        let v: Vec<_> = m.updates.iter().map(|u| u.version.as_str()).collect();
        assert_eq!(v, ["0.10.0", "0.3.1", "0.2.0"]);
        let json = r#"{"updates": [], "future": 1}"#;
        assert!(serde_json::from_str::<Manifest>(json).is_ok());
    }

    /// UKI patches are optional, and what a node acts on in one is checked.
    #[test]
    fn uki_patches_are_optional_and_checked() {
        let json = |slot: &str, from: &str, sha: &str| {
            format!(
                r#"{{"updates": [{{"version": "0.2.0", "variant": "test", "roothash": "ab",
                "root": "r", "root_size": 8192, "verity": "v", "verity_size": 4096,
                "uki_a": "a.efi", "uki_b": "b.efi", "released": "2025-01-01T00:00:00Z",
                "uki_patches": [{{"slot": "{slot}", "from_version": "{from}",
                "from_sha256": "{sha}", "target": "test-0.2.0-uki-{slot}.from-0.1.0.zst"}}]}}]}}"#
            )
        };
        let sha = "ab".repeat(32);
        let m: Manifest = serde_json::from_str(&json("b", "0.1.0", &sha)).unwrap();
        assert!(m.check().is_ok());
        assert_eq!(m.updates[0].uki_patches[0].from_version, "0.1.0");
        let e = serde_json::from_str::<Manifest>(&json("c", "0.1.0", &sha))
            .unwrap()
            .check();
        assert!(e.unwrap_err().contains("for slot \"c\" (a or b)"));
        let e = serde_json::from_str::<Manifest>(&json("a", "../x", &sha))
            .unwrap()
            .check();
        assert!(e.unwrap_err().contains("from version"));
        let e = serde_json::from_str::<Manifest>(&json("a", "0.1.0", "xyz"))
            .unwrap()
            .check();
        assert!(e.unwrap_err().contains("is no sha256"));
    }

    /// Root patches are optional, and what a node acts on in one is checked.
    #[test]
    fn root_patches_are_optional_and_checked() {
        let json = |from: &str, hash: &str, size: u64| {
            format!(
                r#"{{"updates": [{{"version": "0.2.0", "variant": "test", "roothash": "ab",
                "root": "r", "root_size": 8192, "verity": "v", "verity_size": 4096,
                "uki_a": "a.efi", "uki_b": "b.efi", "released": "2025-01-01T00:00:00Z",
                "root_patches": [{{"from_version": "{from}", "from_roothash": "{hash}",
                "from_size": {size}, "target": "test-0.2.0-root.from-0.1.0.zst"}}]}}]}}"#
            )
        };
        let hash = "cd".repeat(32);
        let check = |j: String| serde_json::from_str::<Manifest>(&j).unwrap().check();
        assert!(check(json("0.1.0", &hash, 8192)).is_ok());
        let m: Manifest = serde_json::from_str(&json("0.1.0", &hash, 8192)).unwrap();
        assert_eq!(m.updates[0].root_patches[0].from_size, 8192);
        let e = check(json("../x", &hash, 8192)).unwrap_err();
        assert!(
            e.contains("root patch") && e.contains("from version"),
            "{e}"
        );
        let e = check(json("0.1.0", "abc", 8192)).unwrap_err();
        assert!(e.contains("no dm-verity root hash"), "{e}");
        let e = check(json("0.1.0", &hash, 4097)).unwrap_err();
        assert!(e.contains("not a positive multiple of 4096"), "{e}");
        let e = check(json("0.1.0", &hash, 0)).unwrap_err();
        assert!(e.contains("not a positive multiple of 4096"), "{e}");
    }

    /// A manifest written before extensions existed still parses (no extensions), and one
    /// with extensions round-trips.
    #[test]
    fn extensions_are_optional_and_round_trip() {
        let old = r#"{"updates": [{"version": "0.1.0", "variant": "test", "roothash": "ab",
            "root": "test-0.1.0-root.erofs.gz", "root_size": 8192,
            "verity": "test-0.1.0-root.verity", "verity_size": 4096,
            "uki_a": "a.efi", "uki_b": "b.efi", "released": "2025-01-01T00:00:00Z"}]}"#;
        let mut m: Manifest = serde_json::from_str(old).unwrap();
        assert_eq!(m.updates[0].version, "0.1.0");
        assert!(m.updates[0].extensions.is_empty());
        assert!(m.updates[0].waves.is_empty());
        let etcd = ExtensionPayload {
            name: "etcd".into(),
            version: "3.4.23-1".into(),
            roothash: "cd".repeat(32),
            target: extension_target("etcd", "3.4.23-1", "0.1.0"),
            size: 1234,
            sha256: "ef".repeat(32),
            built_for: "0.1.0".into(),
            patches: vec![],
        };
        assert_eq!(etcd.target, "ext-etcd-3.4.23-1-for-0.1.0.raw.gz");
        m.updates[0].extensions.push(etcd.clone());
        let json = serde_json::to_string(&m).unwrap();
        assert!(!json.contains("patches"), "{json}");
        let back: Manifest = serde_json::from_str(&json).unwrap();
        assert_eq!(back, m);
        assert_eq!(back.updates[0].extensions, std::slice::from_ref(&etcd));

        // With a patch: round-trips, and what a node acts on is checked.
        let patch = ExtensionPatch {
            from_roothash: "12".repeat(32),
            from_size: 8192,
            size: 8192,
            sha256: "34".repeat(32),
            target: "ext-etcd-3.4.23-1-for-0.1.0.from-1212121212121212.zst".into(),
        };
        m.updates[0].extensions[0].patches.push(patch.clone());
        let back: Manifest = serde_json::from_str(&serde_json::to_string(&m).unwrap()).unwrap();
        assert_eq!(back, m);
        assert!(m.check().is_ok());
        m.updates[0].extensions[0].patches[0].sha256 = "xyz".into();
        let e = m.check().unwrap_err();
        assert!(
            e.contains("extension etcd patch") && e.contains("sha256"),
            "{e}"
        );
        m.updates[0].extensions[0].patches[0] = ExtensionPatch { size: 0, ..patch };
        assert!(m.check().unwrap_err().contains("an image size is 0"));
    }

    fn entry(i: u64, offset: u64, length: u64) -> ChunkEntry {
        ChunkEntry {
            sha256: format!("{i:064x}"),
            offset,
            length,
            stored: length / 2 + 1,
        }
    }

    fn list(size: u64, chunks: Vec<ChunkEntry>) -> ChunkList {
        ChunkList {
            chunker: CHUNKER.into(),
            compression: CHUNK_COMPRESSION.into(),
            size,
            chunks,
        }
    }

    /// What a node would act on wrongly is refused, naming the entry: past the end, overlaps,
    /// gaps, a chunk of 1 GiB, more entries than the size allows, another chunker.
    #[test]
    fn chunk_lists_that_do_not_tile_the_image_are_refused() {
        let k = CHUNK_MIN;
        let good = list(
            3 * k + 100,
            vec![entry(0, 0, k), entry(1, k, 2 * k), entry(2, 3 * k, 100)],
        );
        assert_eq!(good.check(3 * k + 100), Ok(()));
        let err = |l: &ChunkList, size| l.check(size).unwrap_err();
        assert_eq!(
            err(&good, 3 * k),
            format!(
                "the list covers {} bytes but the root image is {}",
                3 * k + 100,
                3 * k
            )
        );
        let past = list(2 * k, vec![entry(0, 0, k), entry(1, k, 2 * k)]);
        assert_eq!(
            err(&past, 2 * k),
            format!(
                "chunk 1 ends at byte {}, past the root image's end ({})",
                3 * k,
                2 * k
            )
        );
        let overlap = list(3 * k, vec![entry(0, 0, 2 * k), entry(1, k, 2 * k)]);
        assert_eq!(
            err(&overlap, 3 * k),
            format!(
                "chunk 1 starts at byte {k} but the previous one ends at {} (overlap)",
                2 * k
            )
        );
        let gap = list(3 * k, vec![entry(0, 0, k), entry(1, 2 * k, k)]);
        assert!(err(&gap, 3 * k).ends_with("(gap)"));
        let huge = list(1 << 30, vec![entry(0, 0, 1 << 30)]);
        assert_eq!(
            err(&huge, 1 << 30),
            "chunk 0 is 1073741824 bytes long: chunks are 16384 to 65536 bytes (only the last may be shorter)"
        );
        let short = list(2 * k, vec![entry(0, 0, k)]);
        assert_eq!(
            err(&short, 2 * k),
            format!(
                "the chunks end at byte {k}, short of the root image's {}",
                2 * k
            )
        );
        let many = list(
            64 * k,
            (0..1_000_000).map(|i| entry(i, i * 64, 64)).collect(),
        );
        assert_eq!(
            err(&many, 64 * k),
            "1000000 chunks for 1048576 bytes: at least 16384 bytes each allows at most 65"
        );
        let mut other = good.clone();
        other.chunker = "fastcdc-v2016/2048/8192/65536".into();
        assert!(err(&other, 3 * k + 100).starts_with("chunker \"fastcdc-v2016"));
        let mut bomb = good.clone();
        bomb.chunks[0].stored = 1 << 30;
        assert_eq!(
            err(&bomb, 3 * k + 100),
            "chunk 0 is stored in 1073741824 bytes, impossible for 16384 compressed bytes"
        );
        let mut name = good.clone();
        name.chunks[2].sha256 = "../../etc/passwd".into();
        assert_eq!(
            err(&name, 3 * k + 100),
            "chunk 2: \"../../etc/passwd\" is not a lowercase hex sha256"
        );
        // A manifest entry without chunks still parses (repositories from before deltas).
        assert!(chunk_list_max_bytes(1 << 20) < 16 << 10);
    }

    /// The chunker is deterministic and content-defined: an insertion shifts offsets but
    /// leaves the chunks after it the same.
    #[cfg(feature = "chunking")]
    #[test]
    fn chunks_recur_after_an_insertion() {
        let mut x: u32 = 1;
        let data: Vec<u8> = (0..1 << 20)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            })
            .collect();
        let shas =
            |d: &[u8]| -> Vec<[u8; 32]> { chunking::cut(d).map(|c| c.unwrap().sha256).collect() };
        let a = shas(&data);
        let mut moved = data.clone();
        moved.splice(100_000..100_000, [7u8; 5000]);
        let b = shas(&moved);
        let common = b.iter().filter(|s| a.contains(s)).count();
        assert!(a.len() >= 16 && a.len() <= 64, "{} chunks", a.len());
        assert!(
            common + 3 >= b.len(),
            "{common} of {} chunks recur",
            b.len()
        );
        let total: usize = chunking::cut(&data[..])
            .map(|c| c.unwrap().data.len())
            .sum();
        assert_eq!(total, data.len());
    }
}
