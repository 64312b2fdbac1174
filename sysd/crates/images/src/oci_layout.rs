//! OCI image layout directories (image-spec: `oci-layout`, `index.json`, `blobs/sha256/…`) as
//! service images: `image = "/path/layout"` or `image = "/path/layout:TAG"`.
//!
//! A layout is turned into a root file system directory the rest of sysd already knows how to
//! run, with three properties:
//!
//! - **Unpacked once.** The layers are applied into `STORE/<manifest digest hex>/rootfs`, built
//!   in a temporary directory inside the store and renamed into place only when complete. A
//!   second service using the same image, or a restart, finds the directory and only re-reads
//!   the small manifest and config. A crash mid-unpack leaves a `.tmp-*` directory that the next
//!   unpack of that image removes, never a half-built root.
//! - **Verified.** Every blob read (nested indexes, the manifest, the config, each layer) is
//!   checked against its descriptor's sha256 digest and size. Layers are hashed as they are
//!   streamed into the temporary directory; the rename happens only after every digest matched.
//! - **Contained.** Layer contents are untrusted: entries with `..` are refused, absolute paths
//!   are taken relative to the root, hard link targets must lie inside the root, and no entry is
//!   ever written through a symlink already in the root (each parent component is checked with
//!   `symlink_metadata`, and an existing final component is removed, not opened). So a layer
//!   with `etc -> /` followed by one with `etc/passwd` is refused instead of writing the host's
//!   /etc/passwd.
//!
//! Whiteouts follow the image spec: `.wh.NAME` removes NAME from the lower layers,
//! `.wh..wh..opq` removes everything the lower layers put in its directory. Device nodes are
//! skipped (the container's /dev is a tmpfs); owners and modes (setuid included) are kept as
//! stored when sysd runs as root.

use std::collections::HashSet;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context, Result};
use oci_spec::image::{
    Arch, Descriptor, DigestAlgorithm, ImageConfiguration, ImageIndex, ImageManifest, MediaType,
    OciLayout, Os,
};
use sha2::{Digest as _, Sha256};

use crate::{snapshot, Image, ImageDefaults};

/// The annotation naming a manifest in `index.json` (its tag).
pub(crate) const REF_NAME: &str = "org.opencontainers.image.ref.name";
/// The tag used when the layout lists several manifests and the reference names none.
const DEFAULT_TAG: &str = "latest";
/// Manifests, indexes and configs are small; refuse anything absurd before reading it.
const MAX_JSON_BLOB: u64 = 16 << 20;
/// Entries one image may unpack, over all its layers (the largest common images have some
/// 100,000 files; a layer of a million empty files is an attack on the store's inodes and on
/// the memory that tracks what a layer created).
pub const MAX_ENTRIES: u64 = 500_000;
/// Room an unpack leaves on the store's file system (leases, update state, volumes, logs).
const STORE_RESERVE: u64 = 64 << 20;
/// Docker media types still found in layouts written by older tools.
const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
const DOCKER_LAYER_GZIP: &[&str] = &[
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
];
const DOCKER_LAYER_TAR: &str = "application/vnd.docker.image.rootfs.diff.tar";

/// Whether `dir` is an OCI image layout (has an `oci-layout` file).
pub fn is_layout(dir: &Path) -> bool {
    dir.join("oci-layout").is_file()
}

/// The image `tag` of the layout at `layout` (or its only manifest, or the one tagged `latest`),
/// unpacked (once) into `store/<manifest digest hex>/rootfs`, with its config's defaults.
pub fn unpack(layout: &Path, tag: Option<&str>, store: &Path) -> Result<Image> {
    unpack_inner(layout, tag, store)
        .with_context(|| format!("OCI image layout {}", layout.display()))
}

fn unpack_inner(layout: &Path, tag: Option<&str>, store: &Path) -> Result<Image> {
    let version = OciLayout::from_file(layout.join("oci-layout")).context("reading oci-layout")?;
    if version.image_layout_version() != "1.0.0" {
        bail!(
            "oci-layout: imageLayoutVersion {:?} is not supported (1.0.0 is)",
            version.image_layout_version()
        );
    }
    let index = ImageIndex::from_file(layout.join("index.json")).context("reading index.json")?;
    let selected = select(&index, tag)?;
    unpack_descriptor(layout, selected, store)
}

/// The image named by `selected` (a manifest, or an index resolved to this platform) of the
/// layout at `layout`, unpacked (once) into `store/<manifest digest hex>/rootfs`. The image
/// store calls this with its own layout, where `layout` and `store` are the same directory.
pub fn unpack_descriptor(layout: &Path, selected: &Descriptor, store: &Path) -> Result<Image> {
    let (manifest_desc, manifest) = resolve_manifest(layout, selected)?;

    let config_desc = manifest.config();
    let config_bytes = read_json_blob(layout, config_desc)?;
    let config = image_config(&manifest_desc, config_desc, &config_bytes)?;
    let defaults = defaults(&config);

    let hex = sha256_hex(&manifest_desc)?;
    // Unpacked by an older sysd as one merged copy: used as it is.
    let legacy = store.join(hex).join("rootfs");
    if is_real_dir(&legacy) {
        return Ok(Image {
            rootfs: legacy,
            layers: Vec::new(),
            defaults,
        });
    }
    let applied = unpack_layers(layout, &manifest, &config, store, |_| Ok(None))?;
    let (rootfs, layers) = snapshot::image_view(store, hex, &applied.chains)?;
    Ok(Image {
        rootfs,
        layers,
        defaults,
    })
}

/// An image's layers, present in the store and held against garbage collection until the
/// image lists them (drop this after [`snapshot::image_view`]).
pub struct Layers {
    pub chains: Vec<String>,
    _busy: snapshot::Busy,
}

/// Applies the layers of `manifest` (blobs in `layout`, config `config`) that the store lacks,
/// bottom first, each verified and contained as it streams. `arrived` is called before a
/// layer's blob is read and may wait for it (a pull applies each layer as soon as it and the
/// ones below it are downloaded); it may hand over the blob already open (a download verified
/// but not yet moved into `layout`), which is then read instead of the layout's file, and
/// verified all the same. A refused layer leaves none of the layers this call applied.
pub fn unpack_layers(
    layout: &Path,
    manifest: &ImageManifest,
    config: &ImageConfiguration,
    store: &Path,
    mut arrived: impl FnMut(&Descriptor) -> Result<Option<File>>,
) -> Result<Layers> {
    let diff_ids = config.rootfs().diff_ids();
    let ids = layer_ids(manifest, diff_ids)?;
    let chains = snapshot::chain_ids(&ids);
    let busy = snapshot::Busy::hold(&chains);
    let mut budget = None;
    let mut pending = snapshot::Pending::default();
    let mut apply = |pending: &mut snapshot::Pending| -> Result<()> {
        for (n, layer) in manifest.layers().iter().enumerate() {
            let expected = diff_ids.get(n).filter(|_| diff_ids.len() == ids.len());
            snapshot::ensure_layer(store, &chains[..=n], pending, |root| {
                let open = arrived(layer)?;
                let budget = match &mut budget {
                    Some(b) => b,
                    None => budget.insert(Budget::for_store(store)?),
                };
                let blob = match open {
                    Some(file) => Verified::new(file, layer),
                    None => open_blob(layout, layer)?,
                };
                apply_layer(blob, layer, root, budget, expected.map(String::as_str))
            })
            .with_context(|| format!("layer {} ({})", n + 1, layer.digest()))?;
        }
        pending.commit(store)
    };
    if let Err(e) = apply(&mut pending) {
        // The pending layers' temporary directories go first, so that discard finds the
        // layers directory empty if nothing else is in it.
        let made = std::mem::take(&mut pending.made);
        drop(pending);
        snapshot::discard(store, &made);
        return Err(e);
    }
    Ok(Layers {
        chains,
        _busy: busy,
    })
}

/// The image config of `manifest` (from `layout`), checked to be for this machine.
pub fn read_config(
    layout: &Path,
    manifest_desc: &Descriptor,
    manifest: &ImageManifest,
) -> Result<ImageConfiguration> {
    let bytes = read_json_blob(layout, manifest.config())?;
    image_config(manifest_desc, manifest.config(), &bytes)
}

/// What names each layer of `manifest` in its chain: the config's diff_ids (the digests of
/// the uncompressed layers, which [`apply_layer`] checks), or, for a config that lists none,
/// the layers' own digests (for an uncompressed layer the same thing).
fn layer_ids(manifest: &ImageManifest, diff_ids: &[String]) -> Result<Vec<String>> {
    let layers = manifest.layers();
    if diff_ids.len() == layers.len() {
        for id in diff_ids {
            match id.strip_prefix("sha256:") {
                Some(h)
                    if h.len() == 64
                        && h.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) => {}
                _ => bail!("image config: diff_id {id:?} is not a sha256 digest"),
            }
        }
        return Ok(diff_ids.to_vec());
    }
    if !diff_ids.is_empty() {
        bail!(
            "image config lists {} diff_ids for the manifest's {} layers",
            diff_ids.len(),
            layers.len()
        );
    }
    Ok(layers.iter().map(|l| l.digest().to_string()).collect())
}

/// An image config (`config_bytes`, named by `config_desc` in the manifest `manifest_desc`)
/// checked to be for this machine, as the defaults a service starts from.
pub fn parse_config(
    manifest_desc: &Descriptor,
    config_desc: &Descriptor,
    config_bytes: &[u8],
) -> Result<ImageDefaults> {
    image_config(manifest_desc, config_desc, config_bytes).map(|c| defaults(&c))
}

fn image_config(
    manifest_desc: &Descriptor,
    config_desc: &Descriptor,
    config_bytes: &[u8],
) -> Result<ImageConfiguration> {
    let config = ImageConfiguration::from_reader(config_bytes)
        .with_context(|| format!("parsing image config {}", config_desc.digest()))?;
    if *config.os() != Os::Linux || *config.architecture() != Arch::default() {
        bail!(
            "image {} is for {}/{}, this machine runs {}/{}",
            manifest_desc.digest(),
            config.os(),
            config.architecture(),
            Os::Linux,
            Arch::default()
        );
    }
    Ok(config)
}

/// The `index.json` entry named by `tag`; without a tag, the only entry or the one tagged
/// `latest`.
pub fn select<'a>(index: &'a ImageIndex, tag: Option<&str>) -> Result<&'a Descriptor> {
    let manifests = index.manifests();
    fn ref_name(d: &Descriptor) -> Option<&str> {
        d.annotations()
            .as_ref()
            .and_then(|a| a.get(REF_NAME))
            .map(String::as_str)
    }
    let wanted = match tag {
        Some(t) => t,
        None => match manifests.as_slice() {
            [] => bail!("index.json lists no manifest"),
            [only] => return Ok(only),
            _ => DEFAULT_TAG,
        },
    };
    let found: Vec<&Descriptor> = manifests
        .iter()
        .filter(|d| ref_name(d) == Some(wanted))
        .collect();
    match found.as_slice() {
        [d] => Ok(d),
        // Untagged per-platform manifests listed directly in index.json.
        [] if tag.is_none() && manifests.iter().all(|d| d.platform().is_some()) => {
            pick_platform(manifests)
        }
        [] => {
            let tags: Vec<String> = manifests
                .iter()
                .filter_map(ref_name)
                .map(|t| format!("{t:?}"))
                .collect();
            let tags = if tags.is_empty() {
                "it has no tagged manifest".to_string()
            } else {
                format!("tags: {}", tags.join(", "))
            };
            match tag {
                Some(_) => bail!("no manifest tagged {wanted:?} in index.json ({tags})"),
                None => bail!(
                    "index.json lists {} manifests and none is tagged {wanted:?}: add `:TAG` to the image ({tags})",
                    manifests.len()
                ),
            }
        }
        // One tag over several platforms.
        several => pick_platform(several.iter().copied())
            .with_context(|| format!("index.json: manifests tagged {wanted:?}")),
    }
}

/// Follows (nested) image indexes down to an image manifest for this platform.
pub(crate) fn resolve_manifest(
    layout: &Path,
    desc: &Descriptor,
) -> Result<(Descriptor, ImageManifest)> {
    let mut desc = desc.clone();
    for _ in 0..4 {
        let bytes = read_json_blob(layout, &desc)?;
        match parse_document(&desc, &bytes)? {
            Document::Index(next) => desc = next,
            Document::Manifest(manifest) => return Ok((desc, manifest)),
        }
    }
    bail!("image indexes nested too deeply at {}", desc.digest())
}

/// What a manifest-or-index document leads to.
// One value per document read, taken apart at once: boxing either variant buys nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Document {
    /// An image index: its entry for this platform, to read next.
    Index(Descriptor),
    /// An image manifest.
    Manifest(ImageManifest),
}

/// Parses the document `desc` names (`bytes`, already verified against it): an index is
/// resolved to its entry for this platform, anything else must be an image manifest whose
/// layers this unpacker can read.
pub fn parse_document(desc: &Descriptor, bytes: &[u8]) -> Result<Document> {
    if is_index(desc, bytes) {
        let index = ImageIndex::from_reader(bytes)
            .with_context(|| format!("parsing image index {}", desc.digest()))?;
        let next = pick_platform(index.manifests())
            .with_context(|| format!("image index {}", desc.digest()))?;
        sha256_hex(next).with_context(|| format!("image index {}", desc.digest()))?;
        return Ok(Document::Index(next.clone()));
    }
    let manifest = ImageManifest::from_reader(bytes)
        .with_context(|| format!("parsing image manifest {}", desc.digest()))?;
    Ok(Document::Manifest(manifest))
}

pub(crate) fn is_index(desc: &Descriptor, bytes: &[u8]) -> bool {
    match desc.media_type() {
        MediaType::ImageIndex => true,
        MediaType::ImageManifest => false,
        MediaType::Other(t) if t == DOCKER_MANIFEST_LIST => true,
        // Untyped or unknown: an index is the document with a `manifests` list.
        _ => serde_json::from_slice::<serde_json::Value>(bytes)
            .is_ok_and(|v| v.get("manifests").is_some_and(|m| m.is_array())),
    }
}

/// The linux manifest for this machine's architecture (linux/amd64 on Keelson).
pub(crate) fn pick_platform<'a, I>(manifests: I) -> Result<&'a Descriptor>
where
    I: IntoIterator<Item = &'a Descriptor>,
    I::IntoIter: Clone,
{
    let (os, arch) = (Os::Linux, Arch::default());
    let manifests = manifests.into_iter();
    if let Some(d) = manifests.clone().find(|d| {
        d.platform()
            .as_ref()
            .is_some_and(|p| *p.os() == os && *p.architecture() == arch)
    }) {
        return Ok(d);
    }
    let available: Vec<String> = manifests
        .filter_map(|d| d.platform().as_ref())
        .map(|p| format!("{}/{}", p.os(), p.architecture()))
        .collect();
    bail!(
        "no {os}/{arch} manifest (platforms: {})",
        if available.is_empty() {
            "none given".to_string()
        } else {
            available.join(", ")
        }
    )
}

fn defaults(config: &ImageConfiguration) -> ImageDefaults {
    let Some(c) = config.config() else {
        return ImageDefaults::default();
    };
    let non_empty = |s: &Option<String>| s.clone().filter(|s| !s.is_empty());
    ImageDefaults {
        entrypoint: c.entrypoint().clone().unwrap_or_default(),
        cmd: c.cmd().clone().unwrap_or_default(),
        env: c.env().clone().unwrap_or_default(),
        workdir: non_empty(c.working_dir()),
        user: non_empty(c.user()),
    }
}

/// The hex part of a sha256 descriptor digest (validated as 64 lowercase hex digits by
/// oci-spec, so safe as a file name).
pub fn sha256_hex(desc: &Descriptor) -> Result<&str> {
    let digest = desc.digest();
    if *digest.algorithm() != DigestAlgorithm::Sha256 {
        bail!(
            "blob {digest}: only sha256 digests are supported, not {}",
            digest.algorithm()
        );
    }
    Ok(digest.digest())
}

fn blob_path(layout: &Path, desc: &Descriptor) -> Result<PathBuf> {
    Ok(layout.join("blobs/sha256").join(sha256_hex(desc)?))
}

fn open_blob(layout: &Path, desc: &Descriptor) -> Result<Verified<File>> {
    let path = blob_path(layout, desc)?;
    let file = File::open(&path)
        .with_context(|| format!("blob {}: opening {}", desc.digest(), path.display()))?;
    Ok(Verified::new(file, desc))
}

pub(crate) fn read_json_blob(layout: &Path, desc: &Descriptor) -> Result<Vec<u8>> {
    if desc.size() > MAX_JSON_BLOB {
        bail!(
            "blob {}: {} bytes is too large for a manifest or config",
            desc.digest(),
            desc.size()
        );
    }
    let mut blob = open_blob(layout, desc)?;
    let mut bytes = Vec::with_capacity(usize::try_from(desc.size()).unwrap_or(0));
    let read = blob.read_to_end(&mut bytes);
    // A digest mismatch explains a read error (e.g. too long); report it first.
    blob.finish()?;
    read.with_context(|| format!("blob {}: reading", desc.digest()))?;
    Ok(bytes)
}

/// A blob reader that hashes and counts what passes through, refuses to read past the
/// descriptor's size, and checks size and digest at [`Verified::finish`].
struct Verified<R> {
    inner: R,
    hasher: Sha256,
    read: u64,
    size: u64,
    digest: String,
    expected_hex: String,
}

impl<R: Read> Verified<R> {
    fn new(inner: R, desc: &Descriptor) -> Self {
        Verified {
            inner,
            hasher: Sha256::new(),
            read: 0,
            size: desc.size(),
            digest: desc.digest().to_string(),
            expected_hex: desc.digest().digest().to_string(),
        }
    }

    /// Reads what is left and checks size and digest.
    fn finish(mut self) -> Result<()> {
        io::copy(&mut self, &mut io::sink()).with_context(|| format!("blob {}", self.digest))?;
        if self.read != self.size {
            bail!(
                "blob {}: {} bytes, its descriptor says {}",
                self.digest,
                self.read,
                self.size
            );
        }
        let actual = hex::encode(self.hasher.finalize_reset());
        if actual != self.expected_hex {
            bail!(
                "blob {}: content does not match its digest (it hashes to sha256:{actual}); refusing it",
                self.digest
            );
        }
        Ok(())
    }
}

impl<R: Read> Read for Verified<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read += n as u64;
        if self.read > self.size {
            return Err(io::Error::other(format!(
                "longer than its descriptor's {} bytes",
                self.size
            )));
        }
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

enum Compression {
    None,
    Gzip,
    Zstd,
}

/// A zstd stream of one or more frames (the image spec allows concatenated frames).
struct ZstdFrames<R: Read> {
    decoder: Option<
        ruzstd::decoding::StreamingDecoder<io::BufReader<R>, ruzstd::decoding::FrameDecoder>,
    >,
}

impl<R: Read> ZstdFrames<R> {
    fn new(inner: R) -> io::Result<Self> {
        let decoder = ruzstd::decoding::StreamingDecoder::new(io::BufReader::new(inner))
            .map_err(|e| io::Error::other(format!("zstd: {e}")))?;
        Ok(ZstdFrames {
            decoder: Some(decoder),
        })
    }
}

impl<R: Read> Read for ZstdFrames<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        use std::io::BufRead;
        loop {
            let Some(decoder) = self.decoder.as_mut() else {
                return Ok(0);
            };
            let n = decoder.read(buf)?;
            if n > 0 || buf.is_empty() {
                return Ok(n);
            }
            // This frame is done: another one follows, or the stream ends.
            let Some(decoder) = self.decoder.take() else {
                return Ok(0);
            };
            let mut inner = decoder.into_inner();
            if inner.fill_buf()?.is_empty() {
                return Ok(0);
            }
            self.decoder = Some(
                ruzstd::decoding::StreamingDecoder::new(inner)
                    .map_err(|e| io::Error::other(format!("zstd: {e}")))?,
            );
        }
    }
}

fn compression(media_type: &MediaType) -> Result<Compression> {
    Ok(match media_type {
        MediaType::ImageLayer | MediaType::ImageLayerNonDistributable => Compression::None,
        MediaType::ImageLayerGzip | MediaType::ImageLayerNonDistributableGzip => Compression::Gzip,
        MediaType::ImageLayerZstd | MediaType::ImageLayerNonDistributableZstd => Compression::Zstd,
        MediaType::Other(t) if DOCKER_LAYER_GZIP.contains(&t.as_str()) => Compression::Gzip,
        MediaType::Other(t) if t == DOCKER_LAYER_TAR => Compression::None,
        other => bail!("unsupported layer media type {other}"),
    })
}

/// What one image may still put on disk, over all its layers: entries, and bytes of file
/// content (what compression or sparse entries expand to, not what the blob says).
struct Budget {
    entries: u64,
    entries_limit: u64,
    bytes: u64,
    /// The byte limit, and what set it, for the error.
    bytes_limit: u64,
    bytes_why: &'static str,
}

impl Budget {
    /// The store's free space less [`STORE_RESERVE`], and [`MAX_ENTRIES`].
    fn for_store(store: &Path) -> Result<Budget> {
        let vfs = nix::sys::statvfs::statvfs(store)
            .with_context(|| format!("statvfs {}", store.display()))?;
        let free = vfs.blocks_available() * vfs.fragment_size();
        Ok(Budget::new(
            max_entries(),
            free.saturating_sub(STORE_RESERVE),
            "the image store's free space less 64 MiB kept for the node's state",
        ))
    }

    fn new(entries: u64, bytes: u64, bytes_why: &'static str) -> Budget {
        Budget {
            entries,
            entries_limit: entries,
            bytes,
            bytes_limit: bytes,
            bytes_why,
        }
    }

    fn entry(&mut self) -> Result<()> {
        if self.entries == 0 {
            bail!(
                "the image has more than {} entries: refused",
                self.entries_limit
            );
        }
        self.entries -= 1;
        Ok(())
    }
}

#[cfg(not(test))]
fn max_entries() -> u64 {
    MAX_ENTRIES
}

#[cfg(test)]
thread_local! {
    /// A test's smaller [`MAX_ENTRIES`] (half a million entries take a while to write).
    static MAX_ENTRIES_FOR_TEST: std::cell::Cell<u64> = const { std::cell::Cell::new(MAX_ENTRIES) };
}

#[cfg(test)]
fn max_entries() -> u64 {
    MAX_ENTRIES_FOR_TEST.with(|m| m.get())
}

/// Copies an entry's content into `file`, within `budget`.
fn copy_within(from: &mut impl Read, file: &mut File, budget: &mut Budget) -> Result<()> {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e).context("reading the entry"),
        };
        if n as u64 > budget.bytes {
            bail!(
                "the image unpacks to more than {} MiB ({}): refused",
                budget.bytes_limit >> 20,
                budget.bytes_why
            );
        }
        budget.bytes -= n as u64;
        file.write_all(&buf[..n]).context("writing file")?;
    }
}

/// Applies one layer blob onto `root`, verifying it as it streams: the blob against its
/// descriptor, and what it decompresses to against `diff_id` (the config's) where given.
fn apply_layer(
    mut blob: Verified<File>,
    desc: &Descriptor,
    root: &Path,
    budget: &mut Budget,
    diff_id: Option<&str>,
) -> Result<()> {
    let compression = compression(desc.media_type())?;
    let applied = apply_stream(&mut blob, compression, root, budget);
    // A digest mismatch explains any parse error and wins over it.
    blob.finish()?;
    // An uncompressed layer's diff_id is its blob's digest, just checked (one hash, not two).
    let actual = format!(
        "sha256:{}",
        applied?.unwrap_or_else(|| desc.digest().digest().to_string())
    );
    match diff_id {
        Some(expected) if expected != actual => bail!(
            "uncompressed, it hashes to {actual}, where the image config's diff_id says {expected}; refusing it"
        ),
        _ => Ok(()),
    }
}

/// Applies one layer of `media_type` read from `blob` onto the directory `root`, as an unpack
/// applies each layer of an image, within `max_entries` entries and `max_bytes` bytes of file
/// content. (The unpacker's own path also verifies the blob's digest; this one is for a layer
/// already at hand, and is what the fuzz target `tar_layer` drives.)
pub fn unpack_layer(
    blob: &mut dyn Read,
    media_type: &MediaType,
    root: &Path,
    max_entries: u64,
    max_bytes: u64,
) -> Result<()> {
    let mut budget = Budget::new(max_entries, max_bytes, "the caller's limit");
    apply_stream(blob, compression(media_type)?, root, &mut budget).map(drop)
}

/// Applies the layer; returns the sha256 (hex) of its uncompressed tar stream, its diff_id,
/// for a compressed layer (an uncompressed one's is the blob's digest, which the caller
/// checks: it is not hashed twice).
fn apply_stream(
    blob: &mut dyn Read,
    compression: Compression,
    root: &Path,
    budget: &mut Budget,
) -> Result<Option<String>> {
    let (reader, hasher): (Box<dyn Read + '_>, _) = match compression {
        Compression::None => (Box::new(blob), None),
        Compression::Gzip => (
            Box::new(flate2::read::MultiGzDecoder::new(blob)),
            Some(Sha256::new()),
        ),
        Compression::Zstd => (
            Box::new(ZstdFrames::new(blob).context("reading the layer")?),
            Some(Sha256::new()),
        ),
    };
    let mut archive = tar::Archive::new(Hashing {
        inner: reader,
        hasher,
    });
    let mut layer = Layer {
        root,
        seen: HashSet::new(),
        chown: nix::unistd::geteuid().is_root(),
        budget,
    };
    for entry in archive.entries().context("reading the layer")? {
        let mut entry = entry.context("reading the layer")?;
        layer.apply(&mut entry)?;
    }
    // The rest of the stream: tar padding, the gzip trailer (checks its CRC).
    let mut rest = archive.into_inner();
    io::copy(&mut rest, &mut io::sink()).context("reading the layer")?;
    Ok(rest.hasher.map(|h| hex::encode(h.finalize())))
}

/// Hashes what is read through it (when it has a hasher).
struct Hashing<R> {
    inner: R,
    hasher: Option<Sha256>,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if let Some(h) = &mut self.hasher {
            h.update(&buf[..n]);
        }
        Ok(n)
    }
}

/// The state of applying one layer.
struct Layer<'a> {
    root: &'a Path,
    /// Paths this layer created (and their parents): an opaque whiteout keeps them.
    seen: HashSet<PathBuf>,
    chown: bool,
    budget: &'a mut Budget,
}

impl Layer<'_> {
    fn apply<R: Read>(&mut self, entry: &mut tar::Entry<'_, R>) -> Result<()> {
        self.budget.entry()?;
        let raw = entry
            .path()
            .context("entry with an unreadable path")?
            .into_owned();
        self.apply_at(entry, &raw)
            .with_context(|| format!("entry {}", raw.display()))
    }

    fn apply_at<R: Read>(&mut self, entry: &mut tar::Entry<'_, R>, raw: &Path) -> Result<()> {
        let kind = entry.header().entry_type();
        if kind.is_character_special() || kind.is_block_special() {
            // Not needed: the container's /dev is a tmpfs sysd fills.
            return Ok(());
        }
        let rel = contained(raw)?;
        let Some(name) = rel.file_name() else {
            // The layer's root (`./`): the root directory keeps 0755.
            return Ok(());
        };
        let name = name.as_bytes();
        if name == b".wh..wh..opq" {
            let dir = rel.parent().unwrap_or(Path::new(""));
            if self.parents(&rel, false)? {
                self.prune(dir)?;
            }
            return Ok(());
        }
        if let Some(hidden) = name.strip_prefix(b".wh.") {
            // `.wh.` + `..` would remove the directory above (above the root, at the top).
            if matches!(hidden, b"" | b"." | b"..") {
                bail!(
                    "a whiteout must name an entry of its directory, not {:?}",
                    String::from_utf8_lossy(hidden)
                );
            }
            let hidden = rel.with_file_name(std::ffi::OsStr::from_bytes(hidden));
            if !self.seen.contains(&hidden) && self.parents(&rel, false)? {
                remove_any(&self.root.join(&hidden))?;
            }
            return Ok(());
        }

        self.parents(&rel, true)?;
        let target = self.root.join(&rel);
        let existing = fs::symlink_metadata(&target).ok();
        let header = entry.header();
        let mode = header.mode().context("bad mode")? & 0o7777;
        let owner = || -> Result<(u32, u32)> {
            Ok((
                u32::try_from(header.uid().context("bad uid")?).context("uid out of range")?,
                u32::try_from(header.gid().context("bad gid")?).context("gid out of range")?,
            ))
        };
        let (uid, gid) = owner()?;

        if kind.is_dir() {
            match existing {
                Some(m) if m.is_dir() => {}
                Some(_) => {
                    remove_any(&target)?;
                    fs::create_dir(&target).context("creating directory")?;
                }
                None => fs::create_dir(&target).context("creating directory")?,
            }
            self.own(&target, uid, gid)?;
            fs::set_permissions(&target, fs::Permissions::from_mode(mode)).context("chmod")?;
        } else if kind.is_file() || kind.is_contiguous() || kind.is_gnu_sparse() {
            let mtime = header.mtime().unwrap_or(0);
            if existing.is_some() {
                remove_any(&target)?;
            }
            let mut file = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&target)
                .context("creating file")?;
            copy_within(entry, &mut file, self.budget)?;
            // chown first: it clears setuid/setgid bits (and file capabilities).
            self.own(&target, uid, gid)?;
            xattrs(entry, &target)?;
            file.set_permissions(fs::Permissions::from_mode(mode))
                .context("chmod")?;
            file.set_modified(SystemTime::UNIX_EPOCH + Duration::from_secs(mtime))
                .context("setting mtime")?;
        } else if kind.is_symlink() {
            let link = entry
                .link_name()
                .context("bad symlink target")?
                .context("symlink without a target")?;
            if existing.is_some() {
                remove_any(&target)?;
            }
            // Stored as is: it is resolved inside the container, and never followed here.
            std::os::unix::fs::symlink(&link, &target).context("creating symlink")?;
            self.own(&target, uid, gid)?;
        } else if kind.is_hard_link() {
            let link = entry
                .link_name()
                .context("bad hard link target")?
                .context("hard link without a target")?;
            let source_rel =
                contained(&link).with_context(|| format!("hard link target {}", link.display()))?;
            if !self
                .parents(&source_rel, false)
                .with_context(|| format!("hard link target {}", link.display()))?
            {
                bail!("hard link target {} does not exist", link.display());
            }
            let source = self.root.join(&source_rel);
            match fs::symlink_metadata(&source) {
                Ok(m) if m.is_dir() => {
                    bail!("hard link target {} is a directory", link.display())
                }
                Ok(_) => {}
                Err(_) => bail!("hard link target {} does not exist", link.display()),
            }
            if source_rel == rel {
                return Ok(());
            }
            if existing.is_some() {
                remove_any(&target)?;
            }
            // linkat without AT_SYMLINK_FOLLOW: links a symlink itself, never its target.
            fs::hard_link(&source, &target).context("creating hard link")?;
        } else if kind.is_fifo() {
            if existing.is_some() {
                remove_any(&target)?;
            }
            nix::unistd::mkfifo(&target, nix::sys::stat::Mode::from_bits_truncate(0o600))
                .context("creating fifo")?;
            self.own(&target, uid, gid)?;
            fs::set_permissions(&target, fs::Permissions::from_mode(mode)).context("chmod")?;
        } else {
            // PAX global headers and other metadata-only entries.
            return Ok(());
        }
        self.saw(&rel);
        Ok(())
    }

    /// Records `rel` and its parents as this layer's.
    fn saw(&mut self, rel: &Path) {
        let mut p = Some(rel);
        while let Some(path) = p.filter(|p| !p.as_os_str().is_empty()) {
            if !self.seen.insert(path.to_path_buf()) {
                break;
            }
            p = path.parent();
        }
    }

    /// Checks that every parent of `rel` is a real directory inside the root, never a symlink.
    /// Missing ones are created (0755) when `create`, else the answer is `false`.
    fn parents(&self, rel: &Path, create: bool) -> Result<bool> {
        let Some(parent) = rel.parent() else {
            return Ok(true);
        };
        let mut dir = self.root.to_path_buf();
        let mut shown = PathBuf::new();
        for c in parent.components() {
            dir.push(c);
            shown.push(c);
            match fs::symlink_metadata(&dir) {
                Ok(m) if m.file_type().is_symlink() => bail!(
                    "its parent {} is a symlink in the image; refusing to write through it",
                    shown.display()
                ),
                Ok(m) if m.is_dir() => {}
                Ok(_) => bail!("its parent {} is not a directory", shown.display()),
                Err(e) if e.kind() == io::ErrorKind::NotFound && create => {
                    fs::create_dir(&dir)
                        .with_context(|| format!("creating directory {}", shown.display()))?;
                    fs::set_permissions(&dir, fs::Permissions::from_mode(0o755))
                        .with_context(|| format!("chmod {}", shown.display()))?;
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
                Err(e) => return Err(e).with_context(|| format!("inspecting {}", shown.display())),
            }
        }
        Ok(true)
    }

    /// An opaque directory: removes what lower layers put under `rel`, keeping this layer's.
    fn prune(&self, rel: &Path) -> Result<()> {
        let dir = self.root.join(rel);
        for e in fs::read_dir(&dir).with_context(|| format!("reading {}", rel.display()))? {
            let e = e.with_context(|| format!("reading {}", rel.display()))?;
            let child = rel.join(e.file_name());
            // DirEntry::file_type does not follow symlinks.
            let is_dir = e.file_type().map(|t| t.is_dir()).unwrap_or(false);
            if !self.seen.contains(&child) {
                remove_any(&e.path())?;
            } else if is_dir {
                self.prune(&child)?;
            }
        }
        Ok(())
    }

    fn own(&self, path: &Path, uid: u32, gid: u32) -> Result<()> {
        if self.chown {
            std::os::unix::fs::lchown(path, Some(uid), Some(gid))
                .with_context(|| format!("chown {uid}:{gid}"))?;
        }
        Ok(())
    }
}

/// Extended attributes recorded in the entry's PAX headers (`SCHILY.xattr.NAME`), where
/// allowed: `user.*` and `security.capability` (file capabilities, e.g. ping's). Others
/// (`trusted.*`, SELinux labels) are not the image's to set on the host; a file system without
/// xattr support skips them.
fn xattrs<R: Read>(entry: &mut tar::Entry<'_, R>, target: &Path) -> Result<()> {
    let Some(pax) = entry.pax_extensions().context("reading PAX headers")? else {
        return Ok(());
    };
    for ext in pax {
        let ext = ext.context("reading PAX headers")?;
        let Some(name) = ext.key_bytes().strip_prefix(b"SCHILY.xattr.") else {
            continue;
        };
        if !(name.starts_with(b"user.") || name == b"security.capability") {
            continue;
        }
        let cname = std::ffi::CString::new(name).context("xattr name with a NUL byte")?;
        let cpath = std::ffi::CString::new(target.as_os_str().as_bytes())
            .context("path with a NUL byte")?;
        let value = ext.value_bytes();
        // SAFETY: valid C strings and a buffer of the given length.
        let rc = unsafe {
            libc::lsetxattr(
                cpath.as_ptr(),
                cname.as_ptr(),
                value.as_ptr().cast(),
                value.len(),
                0,
            )
        };
        if rc != 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EOPNOTSUPP) {
                return Err(e)
                    .with_context(|| format!("setting xattr {}", String::from_utf8_lossy(name)));
            }
        }
    }
    Ok(())
}

/// An entry's path relative to the root: a leading `/` or `./` is dropped, `..` refused.
fn contained(path: &Path) -> Result<PathBuf> {
    let mut rel = PathBuf::new();
    for c in path.components() {
        match c {
            Component::Normal(n) => rel.push(n),
            Component::RootDir | Component::CurDir => {}
            Component::ParentDir => bail!("path {} has a `..` component", path.display()),
            Component::Prefix(_) => bail!("path {} is not a Unix path", path.display()),
        }
    }
    Ok(rel)
}

/// Removes a file, symlink (not its target) or directory tree; absent is fine.
pub(crate) fn remove_any(path: &Path) -> Result<()> {
    let result = match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    };
    result.with_context(|| format!("removing {}", path.display()))
}

pub(crate) fn is_real_dir(path: &Path) -> bool {
    fs::symlink_metadata(path).is_ok_and(|m| m.is_dir())
}

/// Distinguishes concurrent unpacks of one image in this process.
static UNPACKS: AtomicU64 = AtomicU64::new(0);

/// `STORE/.tmp-<hex>-<pid>-<n>`, removed on drop (what it built is renamed out first).
pub(crate) struct TempDir {
    pub(crate) path: PathBuf,
}

impl TempDir {
    pub(crate) fn new(store: &Path, hex: &str) -> Result<TempDir> {
        let n = UNPACKS.fetch_add(1, Ordering::Relaxed);
        let path = store.join(format!(".tmp-{hex}-{}-{n}", std::process::id()));
        remove_any(&path)?;
        fs::create_dir(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(TempDir { path })
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}

/// Leftovers of an unpack of `hex` by an earlier sysd (another pid) that did not finish.
pub(crate) fn remove_stale(store: &Path, hex: &str) {
    let prefix = format!(".tmp-{hex}-");
    let ours = format!("{}-", std::process::id());
    let Ok(entries) = fs::read_dir(store) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(&prefix)) else {
            continue;
        };
        if !rest.starts_with(&ours) {
            let _ = remove_any(&e.path());
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::os::unix::fs::{FileTypeExt, MetadataExt};

    pub(crate) use keelson_testkit::oci::{gzip, tar, E, TAR, TGZ};

    fn blob(layout: &Path, data: &[u8]) -> (String, u64) {
        let hex = hex::encode(Sha256::digest(data));
        let dir = layout.join("blobs/sha256");
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join(&hex), data).unwrap();
        (format!("sha256:{hex}"), data.len() as u64)
    }

    fn descriptor(media_type: &str, (digest, size): (String, u64)) -> serde_json::Value {
        serde_json::json!({ "mediaType": media_type, "digest": digest, "size": size })
    }

    /// Writes an image (layers as `(media type, blob)`) and returns its manifest descriptor.
    pub(crate) fn image(
        layout: &Path,
        layers: &[(&str, Vec<u8>)],
        config: serde_json::Value,
    ) -> serde_json::Value {
        let config = serde_json::json!({
            "architecture": Arch::default().to_string(), "os": "linux", "config": config,
            "rootfs": { "type": "layers", "diff_ids": [] },
        });
        let config = blob(layout, config.to_string().as_bytes());
        let layers: Vec<_> = layers
            .iter()
            .map(|(t, data)| descriptor(t, blob(layout, data)))
            .collect();
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": descriptor("application/vnd.oci.image.config.v1+json", config),
            "layers": layers,
        });
        descriptor(
            "application/vnd.oci.image.manifest.v1+json",
            blob(layout, manifest.to_string().as_bytes()),
        )
    }

    pub(crate) fn tagged(mut desc: serde_json::Value, tag: &str) -> serde_json::Value {
        desc["annotations"] = serde_json::json!({ REF_NAME: tag });
        desc
    }

    pub(crate) fn write_index(layout: &Path, manifests: Vec<serde_json::Value>) {
        fs::write(
            layout.join("oci-layout"),
            r#"{"imageLayoutVersion":"1.0.0"}"#,
        )
        .unwrap();
        let index = serde_json::json!({ "schemaVersion": 2, "manifests": manifests });
        fs::write(layout.join("index.json"), index.to_string()).unwrap();
    }

    /// A one-layer layout (plain tar) of `entries`.
    fn single(layout: &Path, entries: &[E]) {
        let m = image(layout, &[(TAR, tar(entries))], serde_json::json!({}));
        write_index(layout, vec![m]);
    }

    fn err(layout: &Path, tag: Option<&str>, store: &Path) -> String {
        format!("{:#}", unpack(layout, tag, store).unwrap_err())
    }

    #[test]
    fn layers_whiteouts_defaults_and_reuse() {
        let t = tempfile::tempdir().unwrap();
        let (layout, store) = (t.path().join("layout"), t.path().join("store"));
        let lower = tar(&[
            E::Dir("etc/"),
            E::File("etc/keep", b"keep", 0o644),
            E::File("etc/gone", b"gone", 0o644),
            E::Dir("etc/gone-dir/"),
            E::File("etc/gone-dir/x", b"x", 0o644),
            E::Dir("opaque/"),
            E::File("opaque/old", b"old", 0o644),
            E::Dir("opaque/sub/"),
            E::File("opaque/sub/old", b"old", 0o644),
            E::File("bin/su", b"su", 0o4755),
            E::Hardlink("bin/su2", "bin/su"),
            E::Symlink("bin/sh", "/bin/busybox"),
            E::Fifo("run.fifo"),
            E::Char("dev/null"),
        ]);
        let upper = tar(&[
            E::File("opaque/new", b"new", 0o600),
            E::File("./opaque/sub/new", b"new", 0o644),
            E::File("opaque/.wh..wh..opq", b"", 0o644),
            E::File("etc/.wh.gone", b"", 0o644),
            E::File("etc/.wh.gone-dir", b"", 0o644),
            E::File("etc/.wh.never-existed", b"", 0o644),
            E::File("/abs", b"inside", 0o644),
        ]);
        let lower_again = lower.clone();
        let m = image(
            &layout,
            &[(TAR, lower), (TGZ, gzip(&upper))],
            serde_json::json!({
                "Entrypoint": ["/bin/srv"], "Cmd": ["--port", "80"], "Env": ["A=1", "PATH=/bin"],
                "WorkingDir": "/srv", "User": "www:www",
            }),
        );
        write_index(&layout, vec![m.clone()]);

        let _views = Views(&store);
        let img = unpack(&layout, None, &store).unwrap();
        let hex = m["digest"]
            .as_str()
            .unwrap()
            .strip_prefix("sha256:")
            .unwrap();
        // Two layers: read through their view; a container stacks the layers themselves.
        assert_eq!(img.rootfs, store.join(hex).join("merged"));
        assert_eq!(img.layers.len(), 2);
        assert!(img
            .layers
            .iter()
            .all(|l| l.starts_with(store.join("layers"))));
        let r = &img.rootfs;
        assert_eq!(fs::read_to_string(r.join("etc/keep")).unwrap(), "keep");
        assert!(!r.join("etc/gone").exists() && !r.join("etc/gone-dir").exists());
        assert_eq!(fs::read_to_string(r.join("opaque/new")).unwrap(), "new");
        assert_eq!(fs::read_to_string(r.join("opaque/sub/new")).unwrap(), "new");
        assert!(!r.join("opaque/old").exists() && !r.join("opaque/sub/old").exists());
        assert_eq!(fs::read_to_string(r.join("abs")).unwrap(), "inside");
        let su = fs::metadata(r.join("bin/su")).unwrap();
        assert_eq!(su.mode() & 0o7777, 0o4755);
        assert_eq!(su.mtime(), keelson_testkit::oci::MTIME as i64);
        assert_eq!(su.ino(), fs::metadata(r.join("bin/su2")).unwrap().ino());
        assert_eq!(
            fs::metadata(r.join("opaque/new")).unwrap().mode() & 0o777,
            0o600
        );
        assert_eq!(
            fs::read_link(r.join("bin/sh")).unwrap(),
            Path::new("/bin/busybox")
        );
        assert!(fs::symlink_metadata(r.join("run.fifo"))
            .unwrap()
            .file_type()
            .is_fifo());
        assert!(!r.join("dev/null").exists());
        assert_eq!(
            img.defaults,
            ImageDefaults {
                entrypoint: vec!["/bin/srv".into()],
                cmd: vec!["--port".into(), "80".into()],
                env: vec!["A=1".into(), "PATH=/bin".into()],
                workdir: Some("/srv".into()),
                user: Some("www:www".into()),
            }
        );

        // The view is read-only, and the upper layer is stored as overlayfs keeps one: what it
        // removes from below (a whiteout, or an opaque directory's old entries) are 0/0
        // character devices, and it holds nothing of the layer below that it left alone.
        let e = fs::write(r.join("marker"), "").unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{e}");
        let top = &img.layers[0];
        for gone in ["etc/gone", "etc/gone-dir", "opaque/old", "opaque/sub/old"] {
            let m = fs::symlink_metadata(top.join(gone)).unwrap();
            assert!(m.file_type().is_char_device() && m.rdev() == 0, "{gone}");
        }
        assert!(!top.join("etc/keep").exists() && !top.join("bin").exists());

        // Unpacked once: a second call finds the layers (a marker in one survives) and the
        // mounted view, and leaves no temporary directory behind.
        fs::write(img.layers[1].join("layer-marker"), "").unwrap();
        let again = unpack(&layout, None, &store).unwrap();
        assert_eq!((&again.rootfs, &again.layers), (&img.rootfs, &img.layers));
        assert!(again.rootfs.join("layer-marker").exists());
        assert_eq!(again.defaults, img.defaults);
        let mut names: Vec<_> = walk(&store)
            .into_iter()
            .filter(|p| p.components().count() <= 2)
            .collect();
        names.retain(|p| !p.starts_with(hex) || p.components().count() == 2);
        let mut expected: Vec<PathBuf> = vec![
            PathBuf::from(hex).join("layers.json"),
            PathBuf::from(hex).join("merged"),
            "layers".into(),
        ];
        expected.extend(
            img.layers
                .iter()
                .map(|l| l.strip_prefix(&store).unwrap().to_path_buf()),
        );
        expected.sort();
        names.sort();
        assert_eq!(names, expected);

        // A second image on the same base layer stores only its own top layer.
        let other = image(
            &layout,
            &[
                (TAR, lower_again),
                (TAR, tar(&[E::File("other", b"o", 0o644)])),
            ],
            serde_json::json!({}),
        );
        write_index(&layout, vec![other]);
        let img2 = unpack(&layout, None, &store).unwrap();
        assert_eq!(img2.layers[1], img.layers[1]);
        assert_ne!(img2.layers[0], img.layers[0]);
        assert_eq!(
            fs::read_to_string(img2.rootfs.join("etc/gone")).unwrap(),
            "gone"
        );
        assert_eq!(fs::read_to_string(img2.rootfs.join("other")).unwrap(), "o");
        assert!(img2.rootfs.join("layer-marker").exists());
    }

    /// An image whose config lists `diff_ids` for its plain-tar `layers`.
    fn image_with_diff_ids(layout: &Path, layers: &[Vec<u8>], diff_ids: &[String]) {
        let config = serde_json::json!({
            "architecture": Arch::default().to_string(), "os": "linux",
            "rootfs": { "type": "layers", "diff_ids": diff_ids },
        });
        let config = blob(layout, config.to_string().as_bytes());
        let layers: Vec<_> = layers
            .iter()
            .map(|data| descriptor(TAR, blob(layout, data)))
            .collect();
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": descriptor("application/vnd.oci.image.config.v1+json", config),
            "layers": layers,
        });
        let m = descriptor(
            "application/vnd.oci.image.manifest.v1+json",
            blob(layout, manifest.to_string().as_bytes()),
        );
        write_index(layout, vec![m]);
    }

    /// Forty layers: their places in the store fit one overlay mount's options, the longer
    /// temporary paths they have while pending would not. The layers below are put in place
    /// early (one more commit) instead of the pull failing.
    #[test]
    fn forty_layers_unpack_though_their_pending_paths_would_not_fit_one_mount() {
        let t = tempfile::tempdir().unwrap();
        let (layout, store) = (t.path().join("layout"), t.path().join("store"));
        let _views = Views(&store);
        let names: Vec<String> = (0..40).map(|i| format!("f{i:02}")).collect();
        let layers: Vec<Vec<u8>> = names
            .iter()
            .map(|n| tar(&[E::File(n, n.as_bytes(), 0o644)]))
            .collect();
        let ids: Vec<String> = layers
            .iter()
            .map(|l| format!("sha256:{}", hex::encode(Sha256::digest(l))))
            .collect();
        image_with_diff_ids(&layout, &layers, &ids);
        let img = unpack(&layout, None, &store).unwrap();
        assert_eq!(img.layers.len(), 40);
        for n in &names {
            assert_eq!(fs::read_to_string(img.rootfs.join(n)).unwrap(), *n);
        }
        let left: Vec<_> = fs::read_dir(store.join(snapshot::LAYERS))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with('.'))
            .collect();
        assert!(left.is_empty(), "temporary layers left: {left:?}");
    }

    #[test]
    fn layers_are_named_by_chain_id_and_checked_against_their_diff_ids() {
        let t = tempfile::tempdir().unwrap();
        let (layout, store) = (t.path().join("layout"), t.path().join("store"));
        let _views = Views(&store);
        let (l1, l2) = (
            tar(&[E::File("a", b"a", 0o644)]),
            tar(&[E::File("b", b"b", 0o644)]),
        );
        let id = |l: &[u8]| format!("sha256:{}", hex::encode(Sha256::digest(l)));
        let ids = [id(&l1), id(&l2)];
        image_with_diff_ids(&layout, &[l1.clone(), l2.clone()], &ids);
        let img = unpack(&layout, None, &store).unwrap();
        let chains = snapshot::chain_ids(&ids);
        assert_eq!(
            img.layers,
            [
                snapshot::layer_dir(&store, &chains[1]),
                snapshot::layer_dir(&store, &chains[0])
            ]
        );
        assert_eq!(fs::read_to_string(img.rootfs.join("a")).unwrap(), "a");

        // A config whose diff_id does not match what the layer decompresses to.
        let fresh = t.path().join("fresh");
        let _views = Views(&fresh);
        let wrong = id(b"something else");
        image_with_diff_ids(
            &layout,
            &[l1.clone(), l2.clone()],
            &[ids[0].clone(), wrong.clone()],
        );
        let e = err(&layout, None, &fresh);
        assert!(
            e.contains("layer 2 (sha256:")
                && e.contains(&format!(
                    "the image config's diff_id says {wrong}; refusing it"
                )),
            "{e}"
        );
        assert_eq!(walk(&fresh), Vec::<PathBuf>::new());
        // Or lists another number of them.
        image_with_diff_ids(&layout, &[l1, l2], &ids[..1]);
        let e = err(&layout, None, &fresh);
        assert!(
            e.contains("image config lists 1 diff_ids for the manifest's 2 layers"),
            "{e}"
        );
    }

    #[test]
    fn services_starting_together_on_one_image_share_one_view() {
        let t = tempfile::tempdir().unwrap();
        let (layout, store) = (t.path().join("layout"), t.path().join("store"));
        let _views = Views(&store);
        let m = image(
            &layout,
            &[
                (
                    TAR,
                    tar(&[E::File("etc/passwd", b"root:x:0:0::/:/bin/sh\n", 0o644)]),
                ),
                (TAR, tar(&[E::File("srv/app", b"app", 0o755)])),
            ],
            serde_json::json!({}),
        );
        write_index(&layout, vec![m]);
        let roots: Vec<PathBuf> = std::thread::scope(|s| {
            let starts: Vec<_> = (0..6)
                .map(|_| s.spawn(|| unpack(&layout, None, &store).unwrap().rootfs))
                .collect();
            starts.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for root in &roots {
            assert_eq!(root, &roots[0]);
            assert_eq!(fs::read_to_string(root.join("srv/app")).unwrap(), "app");
            assert!(root.join("etc/passwd").is_file());
        }
        // Mounted once.
        let mounts = fs::read_to_string("/proc/self/mountinfo").unwrap();
        let point = format!(" {} ", roots[0].display());
        assert_eq!(mounts.matches(&point).count(), 1, "{mounts}");
    }

    /// Unmounts the image views under a test's store before its directory goes.
    pub(crate) struct Views<'a>(pub &'a Path);

    impl Drop for Views<'_> {
        fn drop(&mut self) {
            for e in fs::read_dir(self.0).into_iter().flatten().flatten() {
                let _ = snapshot::unmount_view(&e.path());
            }
        }
    }

    #[test]
    fn tags() {
        let t = tempfile::tempdir().unwrap();
        let (layout, store) = (t.path().join("layout"), t.path().join("store"));
        let v1 = image(
            &layout,
            &[(TAR, tar(&[E::File("v", b"1", 0o644)]))],
            serde_json::json!({}),
        );
        let v2 = image(
            &layout,
            &[(TAR, tar(&[E::File("v", b"2", 0o644)]))],
            serde_json::json!({}),
        );
        write_index(
            &layout,
            vec![tagged(v1.clone(), "v1"), tagged(v2.clone(), "latest")],
        );
        let read = |tag| {
            let img = unpack(&layout, tag, &store).unwrap();
            fs::read_to_string(img.rootfs.join("v")).unwrap()
        };
        assert_eq!(read(Some("v1")), "1");
        assert_eq!(read(Some("latest")), "2");
        assert_eq!(read(None), "2");
        let e = err(&layout, Some("v3"), &store);
        assert!(
            e.contains("no manifest tagged \"v3\" in index.json (tags: \"v1\", \"latest\")"),
            "{e}"
        );
        assert!(
            e.starts_with(&format!("OCI image layout {}", layout.display())),
            "{e}"
        );

        write_index(&layout, vec![tagged(v1, "v1"), tagged(v2, "v2")]);
        let e = err(&layout, None, &store);
        assert!(e.contains("none is tagged \"latest\": add `:TAG`"), "{e}");
    }

    #[test]
    fn multi_arch_index_picks_this_platform() {
        let t = tempfile::tempdir().unwrap();
        let (layout, store) = (t.path().join("layout"), t.path().join("store"));
        let mut arm = image(
            &layout,
            &[(TAR, tar(&[E::File("a", b"arm", 0o644)]))],
            serde_json::json!({}),
        );
        let mut ours = image(
            &layout,
            &[(TAR, tar(&[E::File("a", b"ours", 0o644)]))],
            serde_json::json!({}),
        );
        arm["platform"] = serde_json::json!({ "os": "linux", "architecture": "arm64" });
        ours["platform"] =
            serde_json::json!({ "os": "linux", "architecture": Arch::default().to_string() });
        let index = serde_json::json!({ "schemaVersion": 2, "manifests": [arm, ours] });
        let index = descriptor(
            "application/vnd.oci.image.index.v1+json",
            blob(&layout, index.to_string().as_bytes()),
        );
        write_index(&layout, vec![tagged(index, "latest")]);
        let img = unpack(&layout, None, &store).unwrap();
        assert_eq!(fs::read_to_string(img.rootfs.join("a")).unwrap(), "ours");
    }

    #[test]
    fn untagged_platform_manifests_and_foreign_arch() {
        let t = tempfile::tempdir().unwrap();
        let (layout, store) = (t.path().join("layout"), t.path().join("store"));
        let mut arm = image(&layout, &[(TAR, tar(&[]))], serde_json::json!({}));
        let mut ours = image(
            &layout,
            &[(TAR, tar(&[]))],
            serde_json::json!({"Cmd": ["ours"]}),
        );
        arm["platform"] = serde_json::json!({ "os": "linux", "architecture": "arm64" });
        ours["platform"] =
            serde_json::json!({ "os": "linux", "architecture": Arch::default().to_string() });
        write_index(&layout, vec![arm, ours]);
        assert_eq!(
            unpack(&layout, None, &store).unwrap().defaults.cmd,
            ["ours"]
        );

        // A single manifest built for another architecture.
        let config = serde_json::json!({
            "architecture": "riscv64", "os": "linux", "rootfs": { "type": "layers", "diff_ids": [] },
        });
        let config = blob(&layout, config.to_string().as_bytes());
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "config": descriptor("application/vnd.oci.image.config.v1+json", config),
            "layers": [],
        });
        let m = descriptor(
            "application/vnd.oci.image.manifest.v1+json",
            blob(&layout, manifest.to_string().as_bytes()),
        );
        write_index(&layout, vec![m]);
        let e = err(&layout, None, &store);
        assert!(
            e.contains("is for linux/riscv64, this machine runs linux/"),
            "{e}"
        );
    }

    #[test]
    fn digest_mismatch_refused() {
        let t = tempfile::tempdir().unwrap();
        let (layout, store) = (t.path().join("layout"), t.path().join("store"));
        let layer = tar(&[E::File("f", b"good", 0o644)]);
        let m = image(&layout, &[(TAR, layer.clone())], serde_json::json!({}));
        write_index(&layout, vec![m]);
        let hex = hex::encode(Sha256::digest(&layer));
        // Same size, other content: still a valid tar.
        let bad = tar(&[E::File("f", b"evil", 0o644)]);
        assert_eq!(bad.len(), layer.len());
        fs::write(layout.join("blobs/sha256").join(&hex), &bad).unwrap();
        let e = err(&layout, None, &store);
        assert!(
            e.contains(&format!(
                "blob sha256:{hex}: content does not match its digest"
            )),
            "{e}"
        );
        // Nothing became visible.
        let left: Vec<_> = fs::read_dir(&store).unwrap().collect();
        assert!(left.is_empty(), "{left:?}");

        // Longer than the descriptor says.
        let mut long = layer.clone();
        long.extend_from_slice(&[0; 512]);
        fs::write(layout.join("blobs/sha256").join(&hex), &long).unwrap();
        let e = err(&layout, None, &store);
        assert!(e.contains(&format!("blob sha256:{hex}")), "{e}");
    }

    #[test]
    fn parent_dir_entry_refused() {
        let t = tempfile::tempdir().unwrap();
        let (layout, store) = (t.path().join("layout"), t.path().join("store"));
        single(&layout, &[E::File("a/../../escape", b"x", 0o644)]);
        let e = err(&layout, None, &store);
        assert!(
            e.contains("entry a/../../escape: path a/../../escape has a `..` component"),
            "{e}"
        );
        assert!(!t.path().join("escape").exists());
    }

    #[test]
    fn symlink_parent_refused() {
        let t = tempfile::tempdir().unwrap();
        let (layout, store) = (t.path().join("layout"), t.path().join("store"));
        let outside = t.path().join("outside");
        fs::create_dir(&outside).unwrap();
        let l1 = tar(&[E::Symlink("etc", outside.to_str().unwrap())]);
        let l2 = tar(&[E::File("etc/x", b"pwned", 0o644)]);
        let m = image(&layout, &[(TAR, l1), (TAR, l2)], serde_json::json!({}));
        write_index(&layout, vec![m]);
        let e = err(&layout, None, &store);
        assert!(
            e.contains("entry etc/x: its parent etc is a symlink"),
            "{e}"
        );
        assert!(e.contains("layer 2 (sha256:"), "{e}");
        assert!(!outside.join("x").exists());

        // Whiteouts through a symlink are refused too (they would delete outside).
        fs::write(outside.join("victim"), "").unwrap();
        let l1 = tar(&[E::Symlink("etc", outside.to_str().unwrap())]);
        let l2 = tar(&[E::File("etc/.wh.victim", b"", 0o644)]);
        let m = image(&layout, &[(TAR, l1), (TAR, l2)], serde_json::json!({}));
        write_index(&layout, vec![m]);
        assert!(err(&layout, None, &store).contains("is a symlink"));
        assert!(outside.join("victim").exists());
    }

    /// A small store (tmpfs), unmounted on drop: its free space bounds what an image unpacks.
    struct SmallStore(PathBuf);

    impl SmallStore {
        fn mount(path: PathBuf, mib: u64) -> SmallStore {
            fs::create_dir_all(&path).unwrap();
            nix::mount::mount(
                Some("tmpfs"),
                &path,
                Some("tmpfs"),
                nix::mount::MsFlags::empty(),
                Some(format!("size={mib}m").as_str()),
            )
            .expect("mounting a tmpfs (run the tests as root)");
            SmallStore(path)
        }
    }

    impl Drop for SmallStore {
        fn drop(&mut self) {
            let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
        }
    }

    /// A GNU sparse file of `real` bytes that carries one 512-byte block at its end.
    fn sparse_layer(real: u64) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_path("sparse").unwrap();
        h.set_entry_type(tar::EntryType::GNUSparse);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_size(512);
        let g = h.as_gnu_mut().unwrap();
        g.set_real_size(real);
        g.sparse[0].set_offset(real - 512);
        g.sparse[0].set_length(512);
        h.set_cksum();
        b.append(&h, &[7u8; 512][..]).unwrap();
        b.into_inner().unwrap()
    }

    /// A raw entry: name bytes written as they are (the tar crate refuses absolute names).
    fn raw_entry(b: &mut tar::Builder<Vec<u8>>, name: &str, kind: tar::EntryType, data: &[u8]) {
        let mut h = tar::Header::new_ustar();
        h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
        h.set_entry_type(kind);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_size(data.len() as u64);
        if kind.is_character_special() || kind.is_block_special() {
            h.set_device_major(1).unwrap();
            h.set_device_minor(1).unwrap();
        }
        h.set_cksum();
        b.append(&h, data).unwrap();
    }

    /// Absolute names are rooted in the image (as containerd and Docker apply them), never
    /// at the host's `/`; device nodes are never made (the container's /dev is a tmpfs sysd
    /// fills), so a layer cannot hand a service `/dev/mem`.
    #[test]
    fn absolute_names_stay_inside_and_device_nodes_are_never_made() {
        let t = tempfile::tempdir().unwrap();
        let (layout, store) = (t.path().join("layout"), t.path().join("store"));
        let outside = t.path().join("abs-escape");
        let mut b = tar::Builder::new(Vec::new());
        let abs = format!("{}/x", outside.display());
        raw_entry(&mut b, &abs, tar::EntryType::Regular, b"abs");
        raw_entry(&mut b, "dev/mem", tar::EntryType::Char, b"");
        raw_entry(&mut b, "dev/sda", tar::EntryType::Block, b"");
        let layer = b.into_inner().unwrap();
        let m = image(&layout, &[(TAR, layer)], serde_json::json!({}));
        write_index(&layout, vec![m]);
        let img = unpack(&layout, None, &store).unwrap();
        assert!(
            !outside.exists(),
            "an absolute name was written at the host's path"
        );
        let inside = img.rootfs.join(abs.trim_start_matches('/'));
        assert_eq!(fs::read(&inside).unwrap(), b"abs");
        for dev in ["dev/mem", "dev/sda"] {
            assert!(
                fs::symlink_metadata(img.rootfs.join(dev)).is_err(),
                "{dev} was made"
            );
        }
    }

    /// Bombs: content that expands far beyond its blob (gzip or zstd of zeros, a sparse file of a
    /// terabyte) stops at the store's free space less its reserve, with an error saying so and
    /// the reserve intact; too many entries stop at the entry limit. Nothing stays behind.
    #[test]
    fn bombs_and_floods_stop_within_the_budget() {
        let t = tempfile::tempdir().unwrap();
        let layout = t.path().join("layout");
        let store = SmallStore::mount(t.path().join("store"), 96);
        fs::create_dir_all(&layout).unwrap();
        let free = || {
            let v = nix::sys::statvfs::statvfs(&store.0).unwrap();
            v.blocks_available() * v.fragment_size()
        };
        let zeros = vec![0u8; 64 << 20];
        let gz_bomb = gzip(&tar(&[E::File("zeros", &zeros, 0o644)]));
        assert!(gz_bomb.len() < 1 << 20, "{}", gz_bomb.len());
        let zst_bomb = ruzstd::encoding::compress_to_vec(
            &tar(&[E::File("zeros", &zeros, 0o644)])[..],
            ruzstd::encoding::CompressionLevel::Fastest,
        );
        assert!(zst_bomb.len() < 1 << 20, "{}", zst_bomb.len());
        for (what, layers) in [
            ("gzip bomb", vec![(TGZ, gz_bomb)]),
            (
                "zstd bomb",
                vec![("application/vnd.oci.image.layer.v1.tar+zstd", zst_bomb)],
            ),
            ("sparse bomb", vec![(TAR, sparse_layer(1 << 40))]),
        ] {
            let m = image(&layout, &layers, serde_json::json!({}));
            write_index(&layout, vec![m]);
            let before = free();
            let e = err(&layout, None, &store.0);
            assert!(
                e.contains("the image unpacks to more than ")
                    && e.contains(" MiB (the image store's free space less 64 MiB kept for the node's state): refused"),
                "{what}: {e}"
            );
            assert_eq!(walk(&store.0), Vec::<PathBuf>::new(), "{what}");
            assert!(free() + (1 << 20) >= before, "{what}: space not given back");
        }

        MAX_ENTRIES_FOR_TEST.with(|m| m.set(1000));
        let names: Vec<String> = (0..1001).map(|i| format!("f{i}")).collect();
        let files: Vec<E> = names.iter().map(|n| E::File(n, b"", 0o644)).collect();
        let (first, rest) = files.split_at(600);
        let m = image(
            &layout,
            &[(TAR, tar(first)), (TAR, tar(rest))],
            serde_json::json!({}),
        );
        write_index(&layout, vec![m]);
        let e = err(&layout, None, &store.0);
        assert!(
            e.contains("layer 2 (sha256:")
                && e.contains("the image has more than 1000 entries: refused"),
            "{e}"
        );
        assert_eq!(walk(&store.0), Vec::<PathBuf>::new());
        // At the limit it unpacks.
        let m = image(
            &layout,
            &[(TAR, tar(&files[..1000]))],
            serde_json::json!({}),
        );
        write_index(&layout, vec![m]);
        unpack(&layout, None, &store.0).unwrap();
        MAX_ENTRIES_FOR_TEST.with(|m| m.set(MAX_ENTRIES));
    }

    #[test]
    fn whiteouts_of_dot_and_dot_dot_refused() {
        let t = tempfile::tempdir().unwrap();
        let (layout, store) = (t.path().join("layout"), t.path().join("store"));
        // An image already in the store: nothing of it may go.
        single(&layout, &[E::File("etc/keep", b"k", 0o644)]);
        let kept = unpack(&layout, None, &store).unwrap();
        let before = walk(&store);
        for name in [".wh...", "etc/.wh...", "etc/.wh..", "etc/.wh.", ".wh."] {
            let l1 = tar(&[E::File("etc/x", b"x", 0o644)]);
            let l2 = tar(&[E::File(name, b"", 0o644)]);
            let m = image(&layout, &[(TAR, l1), (TAR, l2)], serde_json::json!({}));
            write_index(&layout, vec![m]);
            let e = err(&layout, None, &store);
            assert!(
                e.contains(&format!(
                    "entry {name}: a whiteout must name an entry of its directory"
                )),
                "{name}: {e}"
            );
            assert_eq!(walk(&store), before, "{name}");
        }
        assert_eq!(
            fs::read_to_string(kept.rootfs.join("etc/keep")).unwrap(),
            "k"
        );
    }

    /// Every path under `dir`, relative to it.
    fn walk(dir: &Path) -> Vec<PathBuf> {
        let mut out = Vec::new();
        let mut todo = vec![dir.to_path_buf()];
        while let Some(d) = todo.pop() {
            for e in fs::read_dir(&d).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() && !p.is_symlink() {
                    todo.push(p.clone());
                }
                out.push(p.strip_prefix(dir).unwrap().to_path_buf());
            }
        }
        out.sort();
        out
    }

    #[test]
    fn final_symlink_replaced_not_followed() {
        let t = tempfile::tempdir().unwrap();
        let (layout, store) = (t.path().join("layout"), t.path().join("store"));
        let _views = Views(&store);
        let outside = t.path().join("victim");
        fs::write(&outside, "host").unwrap();
        let l1 = tar(&[E::Symlink("passwd", outside.to_str().unwrap())]);
        let l2 = tar(&[E::File("passwd", b"image", 0o644)]);
        let m = image(&layout, &[(TAR, l1), (TAR, l2)], serde_json::json!({}));
        write_index(&layout, vec![m]);
        let img = unpack(&layout, None, &store).unwrap();
        assert_eq!(
            fs::read_to_string(img.rootfs.join("passwd")).unwrap(),
            "image"
        );
        assert_eq!(fs::read_to_string(&outside).unwrap(), "host");
    }

    #[test]
    fn hardlink_escape_refused() {
        let t = tempfile::tempdir().unwrap();
        let (layout, store) = (t.path().join("layout"), t.path().join("store"));
        fs::write(t.path().join("secret"), "s").unwrap();
        single(&layout, &[E::Hardlink("x", "../../../secret")]);
        let e = err(&layout, None, &store);
        assert!(
            e.contains("entry x: hard link target ../../../secret"),
            "{e}"
        );
        assert!(e.contains("`..` component"), "{e}");

        // Through a symlinked directory.
        let outside = t.path().to_str().unwrap();
        single(
            &layout,
            &[E::Symlink("d", outside), E::Hardlink("x", "d/secret")],
        );
        let e = err(&layout, None, &store);
        assert!(
            e.contains("hard link target d/secret: its parent d is a symlink"),
            "{e}"
        );
    }

    #[test]
    fn zstd_layers_of_several_frames_and_user_xattrs() {
        let t = tempfile::tempdir().unwrap();
        let (layout, store) = (t.path().join("layout"), t.path().join("store"));
        let _views = Views(&store);
        let level = ruzstd::encoding::CompressionLevel::Fastest;
        // One tar split across two zstd frames.
        let data = tar(&[E::Dir("etc/"), E::File("etc/zstd", b"from zstd", 0o644)]);
        let (a, b) = data.split_at(700);
        let mut zst = ruzstd::encoding::compress_to_vec(a, level);
        zst.extend(ruzstd::encoding::compress_to_vec(b, level));
        // A PAX xattr record: user.* is applied (where the file system allows it).
        let mut builder = tar::Builder::new(Vec::new());
        builder
            .append_pax_extensions([("SCHILY.xattr.user.keelson", b"yes".as_slice())])
            .unwrap();
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(0o644);
        h.set_size(1);
        h.set_uid(0);
        h.set_gid(0);
        builder.append_data(&mut h, "xattr", &b"x"[..]).unwrap();
        let with_xattr = builder.into_inner().unwrap();
        let m = image(
            &layout,
            &[
                ("application/vnd.oci.image.layer.v1.tar+zstd", zst),
                (TAR, with_xattr),
            ],
            serde_json::json!({}),
        );
        write_index(&layout, vec![m]);
        let img = unpack(&layout, None, &store).unwrap();
        assert_eq!(
            fs::read_to_string(img.rootfs.join("etc/zstd")).unwrap(),
            "from zstd"
        );
        let path = std::ffi::CString::new(img.rootfs.join("xattr").as_os_str().as_bytes()).unwrap();
        let mut buf = [0u8; 16];
        // SAFETY: valid C strings and buffer.
        let n = unsafe {
            libc::lgetxattr(
                path.as_ptr(),
                c"user.keelson".as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        };
        if n >= 0 {
            assert_eq!(&buf[..n as usize], b"yes");
        }
    }
}
