//! The image store: `/var/lib/keelson/images` is an OCI image layout (image-spec), so its
//! content is addressed and shared the way registries and tools (`skopeo`, `umoci`) expect:
//!
//! ```text
//! images/oci-layout                  {"imageLayoutVersion":"1.0.0"}
//! images/index.json                  one descriptor per pulled reference (annotations below)
//! images/blobs/sha256/<hex>          manifests, indexes, configs, layers: each stored once
//! images/layers/<chain id hex>       each layer unpacked once (see snapshot)
//! images/<manifest hex>/layers.json  an image's layers; `merged` is their read-only view
//! images/.downloads/<hex>            a blob being downloaded (kept across failures: resumed)
//! ```
//!
//! An `index.json` entry is the descriptor of what the reference named (an image manifest or a
//! multi-arch index) with `org.opencontainers.image.ref.name` = the normalized reference,
//! `io.keelson.image.manifest` = the linux/amd64 manifest that runs and
//! `io.keelson.image.pulled` = when (ms). An entry is written last, after every blob it needs
//! is verified and the root file system is unpacked, so a half-pulled image is never listed and
//! never runs. Reference counts are computed from the index (a blob lives while an entry
//! reaches it); [`Store::gc`] deletes what none reaches, and the unpacked root of a manifest
//! that goes.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::{Context, Result};
use keelson_common::api::images::{ImageInfo, ImagesRemoved};
use oci_spec::image::{Descriptor, ImageIndex, ImageIndexBuilder, ImageManifest, MediaType};

use crate::oci_layout::{self, REF_NAME};
use crate::snapshot;
use crate::Image;

const MANIFEST_ANNOTATION: &str = "io.keelson.image.manifest";
const PULLED_ANNOTATION: &str = "io.keelson.image.pulled";

/// One pulled reference.
#[derive(Debug, Clone)]
pub struct Entry {
    pub reference: String,
    /// What the reference named (manifest or index).
    pub desc: Descriptor,
    /// The platform image manifest's digest (`sha256:…`).
    pub manifest: String,
    pub pulled_ms: u64,
}

pub struct Store {
    root: PathBuf,
    /// Serializes index.json updates and garbage collection.
    lock: Mutex<()>,
    /// Blobs (hex) that pulls in progress have written or are writing, not yet in the index:
    /// garbage collection keeps them.
    active: Mutex<HashMap<String, usize>>,
    /// One download per blob at a time, across pulls of different images sharing it.
    blob_locks: Mutex<HashMap<String, std::sync::Arc<tokio::sync::Mutex<()>>>>,
}

/// Blobs a pull in progress holds against garbage collection; released on drop.
pub struct Hold<'a> {
    store: &'a Store,
    hexes: Vec<String>,
}

impl Hold<'_> {
    pub fn add(&mut self, hex: &str) {
        *self
            .store
            .active
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(hex.to_string())
            .or_default() += 1;
        self.hexes.push(hex.to_string());
    }
}

impl Drop for Hold<'_> {
    fn drop(&mut self) {
        let mut active = self.store.active.lock().unwrap_or_else(|p| p.into_inner());
        for h in &self.hexes {
            if let Some(n) = active.get_mut(h) {
                *n -= 1;
                if *n == 0 {
                    active.remove(h);
                }
            }
        }
    }
}

impl Store {
    pub fn new(root: impl Into<PathBuf>) -> Store {
        Store {
            root: root.into(),
            lock: Mutex::new(()),
            active: Mutex::new(HashMap::new()),
            blob_locks: Mutex::new(HashMap::new()),
        }
    }

    pub fn blob_lock(&self, hex: &str) -> std::sync::Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.blob_locks.lock().unwrap_or_else(|p| p.into_inner());
        std::sync::Arc::clone(locks.entry(hex.to_string()).or_default())
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn hold(&self) -> Hold<'_> {
        Hold {
            store: self,
            hexes: Vec::new(),
        }
    }

    /// Creates the layout skeleton (idempotent).
    pub fn init(&self) -> Result<()> {
        fs::create_dir_all(self.root.join("blobs/sha256"))
            .with_context(|| format!("creating {}", self.root.display()))?;
        fs::create_dir_all(self.downloads())?;
        let marker = self.root.join("oci-layout");
        if !marker.exists() {
            write_atomic(&marker, br#"{"imageLayoutVersion":"1.0.0"}"#)?;
        }
        if !self.root.join("index.json").exists() {
            self.write_index(&[])?;
        }
        Ok(())
    }

    pub fn blob_path(&self, hex: &str) -> PathBuf {
        self.blobs_dir().join(hex)
    }

    /// Where the blobs are (`blobs/sha256`).
    pub fn blobs_dir(&self) -> PathBuf {
        self.root.join("blobs/sha256")
    }

    pub fn downloads(&self) -> PathBuf {
        self.root.join(".downloads")
    }

    pub fn has_blob(&self, hex: &str, size: u64) -> bool {
        fs::metadata(self.blob_path(hex)).is_ok_and(|m| m.is_file() && m.len() == size)
    }

    /// Stores a small blob already verified by the caller (manifests, indexes).
    pub fn put_blob(&self, hex: &str, bytes: &[u8]) -> Result<()> {
        let path = self.blob_path(hex);
        if self.has_blob(hex, bytes.len() as u64) {
            return Ok(());
        }
        write_atomic(&path, bytes)
    }

    /// Every pulled reference, in index order.
    pub fn entries(&self) -> Result<Vec<Entry>> {
        let path = self.root.join("index.json");
        if !path.exists() {
            return Ok(Vec::new());
        }
        let index =
            ImageIndex::from_file(&path).with_context(|| format!("reading {}", path.display()))?;
        Ok(index
            .manifests()
            .iter()
            .filter_map(|d| {
                let a = d.annotations().as_ref()?;
                Some(Entry {
                    reference: a.get(REF_NAME)?.clone(),
                    manifest: a
                        .get(MANIFEST_ANNOTATION)
                        .cloned()
                        .unwrap_or_else(|| d.digest().to_string()),
                    pulled_ms: a
                        .get(PULLED_ANNOTATION)
                        .and_then(|t| t.parse().ok())
                        .unwrap_or(0),
                    desc: d.clone(),
                })
            })
            .collect())
    }

    pub fn find(&self, reference: &str) -> Result<Option<Entry>> {
        Ok(self
            .entries()?
            .into_iter()
            .find(|e| e.reference == reference))
    }

    /// Adds (or moves) `reference` to `desc`: the moment a pull becomes visible.
    pub fn add(
        &self,
        reference: &str,
        desc: &Descriptor,
        manifest: &str,
        pulled_ms: u64,
    ) -> Result<()> {
        let _guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let mut entries = self.entries()?;
        entries.retain(|e| e.reference != reference);
        entries.push(Entry {
            reference: reference.to_string(),
            desc: desc.clone(),
            manifest: manifest.to_string(),
            pulled_ms,
        });
        self.write_index(&entries)
    }

    /// Removes `reference` from the index; `false` if it was not there.
    pub fn remove(&self, reference: &str) -> Result<bool> {
        let _guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let mut entries = self.entries()?;
        let before = entries.len();
        entries.retain(|e| e.reference != reference);
        if entries.len() == before {
            return Ok(false);
        }
        self.write_index(&entries)?;
        Ok(true)
    }

    fn write_index(&self, entries: &[Entry]) -> Result<()> {
        let manifests: Vec<Descriptor> = entries
            .iter()
            .map(|e| {
                let mut d = e.desc.clone();
                let mut a = d.annotations().clone().unwrap_or_default();
                a.insert(REF_NAME.to_string(), e.reference.clone());
                a.insert(MANIFEST_ANNOTATION.to_string(), e.manifest.clone());
                a.insert(PULLED_ANNOTATION.to_string(), e.pulled_ms.to_string());
                d.set_annotations(Some(a));
                d
            })
            .collect();
        let index = ImageIndexBuilder::default()
            .schema_version(2u32)
            .media_type(MediaType::ImageIndex)
            .manifests(manifests)
            .build()
            .context("building index.json")?;
        let text = serde_json::to_vec_pretty(&index).context("encoding index.json")?;
        write_atomic(&self.root.join("index.json"), &text)
    }

    /// The entry's image, its layers unpacked if they are not yet (every layer
    /// verified and checked as it is applied).
    pub fn unpack(&self, entry: &Entry) -> Result<Image> {
        oci_layout::unpack_descriptor(&self.root, &entry.desc, &self.root)
            .with_context(|| format!("image {}", entry.reference))
    }

    /// The platform manifest of an entry (read from the store, digest-checked).
    fn manifest_of(&self, entry: &Entry) -> Result<(Descriptor, ImageManifest)> {
        oci_layout::resolve_manifest(&self.root, &entry.desc)
    }

    /// Blobs (hex) an entry reaches: what it names, the platform manifest, config, layers.
    fn reached(&self, entry: &Entry) -> Vec<String> {
        let mut out = vec![entry.desc.digest().digest().to_string()];
        if let Ok((m_desc, m)) = self.manifest_of(entry) {
            out.push(m_desc.digest().digest().to_string());
            out.push(m.config().digest().digest().to_string());
            out.extend(m.layers().iter().map(|l| l.digest().digest().to_string()));
        } else if let Some(hex) = entry.manifest.strip_prefix("sha256:") {
            out.push(hex.to_string());
        }
        out
    }

    /// `keelctl images`: every entry with sizes and the services that use it.
    pub fn list(&self, used_by: &BTreeMap<String, Vec<String>>) -> Result<Vec<ImageInfo>> {
        let entries = self.entries()?;
        let manifests: Vec<Option<ImageManifest>> = entries
            .iter()
            .map(|e| self.manifest_of(e).ok().map(|(_, m)| m))
            .collect();
        let mut refcount: HashMap<String, usize> = HashMap::new();
        for m in manifests.iter().flatten() {
            let unique: HashSet<String> =
                m.layers().iter().map(|l| l.digest().to_string()).collect();
            for d in unique {
                *refcount.entry(d).or_default() += 1;
            }
        }
        Ok(entries
            .iter()
            .zip(&manifests)
            .map(|(e, m)| {
                let (size, unique_size, layers) = match m {
                    Some(m) => (
                        m.config().size() + m.layers().iter().map(|l| l.size()).sum::<u64>(),
                        m.layers()
                            .iter()
                            .filter(|l| refcount.get(&l.digest().to_string()) == Some(&1))
                            .map(|l| l.size())
                            .sum(),
                        m.layers().len(),
                    ),
                    None => (0, 0, 0),
                };
                let hex = e.manifest.strip_prefix("sha256:").unwrap_or(&e.manifest);
                ImageInfo {
                    reference: e.reference.clone(),
                    digest: e.desc.digest().to_string(),
                    manifest: e.manifest.clone(),
                    size,
                    unique_size,
                    layers,
                    unpacked: self.root.join(hex).join(snapshot::LIST).is_file()
                        || fs::symlink_metadata(self.root.join(hex).join("rootfs"))
                            .is_ok_and(|m| m.is_dir()),
                    used_by: used_by.get(&e.reference).cloned().unwrap_or_default(),
                    pulled_ms: e.pulled_ms,
                }
            })
            .collect())
    }

    /// Deletes every blob no entry reaches (and no pull holds), the unpacked image of every
    /// manifest deleted, the layers no unpacked image lists, and downloads no pull holds.
    pub fn gc(&self) -> Result<ImagesRemoved> {
        let _guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let mut keep: HashSet<String> = self
            .active
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .cloned()
            .collect();
        for e in self.entries()? {
            keep.extend(self.reached(&e));
        }
        let mut report = ImagesRemoved::default();
        let blobs = self.root.join("blobs/sha256");
        let listing = match fs::read_dir(&blobs) {
            Ok(l) => l,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(report),
            Err(e) => return Err(e).with_context(|| format!("reading {}", blobs.display())),
        };
        for item in listing {
            let item = item.with_context(|| format!("reading {}", blobs.display()))?;
            let name = item.file_name().to_string_lossy().into_owned();
            if keep.contains(&name) {
                continue;
            }
            let size = item.metadata().map(|m| m.len()).unwrap_or(0);
            fs::remove_file(item.path())
                .with_context(|| format!("removing {}", item.path().display()))?;
            report.blobs += 1;
            report.freed_bytes += size;
            let unpacked = self.root.join(&name);
            if fs::symlink_metadata(&unpacked).is_ok_and(|m| m.is_dir()) {
                snapshot::unmount_view(&unpacked)?;
                report.freed_bytes += disk_usage(&unpacked);
                oci_layout::remove_any(&unpacked)?;
                report.rootfs += 1;
            }
        }
        // Then the layers no unpacked image lists any more.
        let layers = snapshot::gc(&self.root)?;
        report.layers = layers.layers;
        report.freed_bytes += layers.bytes;
        if let Ok(listing) = fs::read_dir(self.downloads()) {
            for item in listing.flatten() {
                let name = item.file_name().to_string_lossy().into_owned();
                if !keep.contains(&name) {
                    report.freed_bytes += item.metadata().map(|m| m.len()).unwrap_or(0);
                    let _ = fs::remove_file(item.path());
                }
            }
        }
        Ok(report)
    }
}

/// Bytes a tree occupies on disk (allocated blocks; hard links counted once).
pub fn disk_usage(path: &Path) -> u64 {
    fn walk(p: &Path, seen: &mut HashSet<(u64, u64)>) -> u64 {
        let Ok(m) = fs::symlink_metadata(p) else {
            return 0;
        };
        if !seen.insert((m.dev(), m.ino())) {
            return 0;
        }
        let mut total = m.blocks() * 512;
        if m.is_dir() {
            if let Ok(rd) = fs::read_dir(p) {
                for e in rd.flatten() {
                    total += walk(&e.path(), seen);
                }
            }
        }
        total
    }
    walk(path, &mut HashSet::new())
}

/// Replaces `path` durably (`keelson_common::durable`): readers see the old or the new content.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    Ok(keelson_common::durable::replace(path, bytes)?)
}
