//! Engine extensions through the update repository: which images fit an OS version (the
//! signed manifest lists them per version) and their download into the node's extension store.
//! Activation (dm-verity, mounts, the /usr merge) is `keelson-extensions`' business.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use keelson_common::update::{ExtensionPatch, ExtensionPayload, Manifest};
use keelson_extensions::{Entry, Store};
use sha2::{Digest, Sha256};

use super::install::{self, Repo};
use super::root_patch;
use super::Agent;

/// Room left on /var after an extension download (logs, service state).
const VAR_RESERVE: u64 = 64 << 20;

/// The listings of the `enabled` extensions for OS `os_version`, in `enabled` order. A name the
/// repository does not list for that version is an error naming both: a node never carries an
/// extension into a version it was not released for.
pub fn select(m: &Manifest, os_version: &str, enabled: &[String]) -> Result<Vec<ExtensionPayload>> {
    let Some(p) = m.updates.iter().find(|p| p.version == os_version) else {
        if enabled.is_empty() {
            return Ok(Vec::new());
        }
        bail!("the update repository does not list version {os_version}, so it lists no extensions for it");
    };
    let mut out = Vec::new();
    for name in enabled {
        match p.extensions.iter().find(|x| &x.name == name) {
            Some(x) => out.push(x.clone()),
            None => {
                let listed: Vec<&str> = p.extensions.iter().map(|x| x.name.as_str()).collect();
                bail!(
                    "the update repository lists no extension `{name}` for version {os_version} (it lists: {})",
                    if listed.is_empty() { "none".to_owned() } else { listed.join(", ") }
                );
            }
        }
    }
    Ok(out)
}

/// The store entry for a listing under OS version `os_version` of repository `base`.
pub fn entry(x: &ExtensionPayload, os_version: &str, base: &str) -> Entry {
    Entry {
        name: x.name.clone(),
        version: x.version.clone(),
        roothash: x.roothash.clone(),
        built_for: x.built_for.clone(),
        source: format!("{}/targets/{}", base.trim_end_matches('/'), x.target),
        listed_for: if x.built_for == os_version {
            Vec::new()
        } else {
            vec![os_version.to_owned()]
        },
    }
}

/// Counts decompressed bytes and refuses to go past what /var can hold.
struct Capped {
    f: File,
    written: u64,
    limit: u64,
    what: String,
}

impl Write for Capped {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.written + buf.len() as u64 > self.limit {
            return Err(std::io::Error::new(
                std::io::ErrorKind::StorageFull,
                format!(
                    "{} does not fit on /var ({} MiB free beyond the {} MiB kept for logs and state)",
                    self.what,
                    self.limit >> 20,
                    VAR_RESERVE >> 20
                ),
            ));
        }
        self.f.write_all(buf)?;
        self.written += buf.len() as u64;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.f.flush()
    }
}

impl Agent {
    /// Downloads the listed extensions the store lacks (TUF checks length and sha256 as it
    /// streams; the store checks the image's layout against its root hash), then records them
    /// as the set of `os_version`. On any failure nothing is recorded and the partial file is
    /// removed: the node keeps the sets it had.
    pub(crate) async fn sync_extensions(
        &self,
        repo: &Repo,
        store: &Store,
        os_version: &str,
        listed: &[ExtensionPayload],
        base: &str,
    ) -> Result<Vec<Entry>> {
        let mut entries = Vec::new();
        for x in listed {
            let e = entry(x, os_version, base);
            if !store.has(&e) {
                if let Some((q, reference)) = Self::patch_source(store, x, &e) {
                    match self
                        .patch_extension(repo, store, (x, &e), q, &reference)
                        .await
                    {
                        Ok(()) => {
                            self.emit(
                                "extension-patched",
                                format!(
                                    "{} {} for version {os_version} built from the image {} the store has: downloaded {} bytes instead of {} ({}), verified against root hash {}",
                                    x.name,
                                    x.version,
                                    q.from_roothash,
                                    install::target_info(repo, &q.target).map_or(0, |t| t.0),
                                    x.size,
                                    q.target,
                                    x.roothash
                                ),
                            );
                            entries.push(e);
                            continue;
                        }
                        Err(err) => {
                            if let Ok(part) = store.staging(&e) {
                                let _ = std::fs::remove_file(part);
                            }
                            self.check_cancel()?;
                            self.emit(
                                "extension-delta-fallback",
                                format!(
                                    "{} {} for version {os_version}: {err:#}; downloading the whole image",
                                    x.name, x.version
                                ),
                            );
                        }
                    }
                }
                self.emit(
                    "extension-downloading",
                    format!(
                        "{} {} ({} bytes) for version {os_version}",
                        x.name, x.version, x.size
                    ),
                );
                if let Err(err) = self.download_extension(repo, store, x, &e).await {
                    if let Ok(part) = store.staging(&e) {
                        let _ = std::fs::remove_file(part);
                    }
                    return Err(err.context(format!("extension {} {}", x.name, x.version)));
                }
            }
            entries.push(e);
        }
        store
            .record(os_version, entries.clone())
            .map_err(anyhow::Error::new)?;
        Ok(entries)
    }

    /// The staging file of `e`, created empty (never through a link planted at its name), once
    /// `need` bytes (`what`, with its size) fit on /var beside the reserve; and how much may be
    /// written.
    fn open_staging(
        &self,
        store: &Store,
        e: &Entry,
        need: u64,
        what: &str,
    ) -> Result<(PathBuf, File, u64)> {
        let part = store.staging(e)?;
        let vfs = nix::sys::statvfs::statvfs(store.dir())
            .with_context(|| format!("statvfs {}", store.dir().display()))?;
        let free = vfs.blocks_available() * vfs.fragment_size();
        let limit = free.saturating_sub(VAR_RESERVE);
        if need > limit {
            bail!(
                "{what} does not fit on /var ({} MiB free beyond the {} MiB kept for logs and state): nothing written",
                limit >> 20,
                VAR_RESERVE >> 20
            );
        }
        let f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&part)
            .with_context(|| format!("creating {}", part.display()))?;
        Ok((part, f, limit))
    }

    /// One of `x`'s patches against an image of the same extension the store has, and that
    /// image's file.
    fn patch_source<'a>(
        store: &Store,
        x: &'a ExtensionPayload,
        e: &Entry,
    ) -> Option<(&'a ExtensionPatch, PathBuf)> {
        x.patches.iter().find_map(|q| {
            let have = Entry {
                roothash: q.from_roothash.clone(),
                ..e.clone()
            };
            store.has(&have).then(|| (q, store.image(&have)))
        })
    }

    /// Builds `x`'s image from its patch `q` against the store's image `reference`: the patch
    /// (a signed target, checked as it streams) decoded in one pass into the signed image size,
    /// kept only if its sha256 is the signed one, then committed like a download (layout checked
    /// against the root hash).
    async fn patch_extension(
        &self,
        repo: &Repo,
        store: &Store,
        (x, e): (&ExtensionPayload, &Entry),
        q: &ExtensionPatch,
        reference: &Path,
    ) -> Result<()> {
        let need = q.from_size.saturating_add(q.size);
        root_patch::fits_in_memory(need, "the stored image and the new one")
            .map_err(anyhow::Error::msg)?;
        let (patch_len, _, _) = install::target_info(repo, &q.target)?;
        if patch_len >= x.size {
            bail!(
                "{} is {patch_len} bytes signed, not smaller than the {}-byte image (refused unread)",
                q.target,
                x.size
            );
        }
        let what = format!("{} ({} MiB uncompressed)", x.name, q.size >> 20);
        let (part, mut f, _) = self.open_staging(store, e, q.size, &what)?;
        let reference =
            std::fs::read(reference).with_context(|| format!("reading {}", reference.display()))?;
        if reference.len() as u64 != q.from_size {
            bail!(
                "the store's image {} has {} bytes, the patch applies to {}",
                q.from_roothash,
                reference.len(),
                q.from_size
            );
        }
        let mut patch = Vec::with_capacity(patch_len as usize);
        install::stream_target(self, repo, &q.target, &mut |b| {
            patch.extend_from_slice(b);
            Ok(())
        })
        .await?;
        let image = root_patch::apply(&reference, &patch, q.size)
            .with_context(|| format!("applying {}", q.target))?;
        let got = hex::encode(Sha256::digest(&image));
        if got != q.sha256 {
            bail!(
                "{} builds an image with sha256 {got}, the signed one is {} (refused)",
                q.target,
                q.sha256
            );
        }
        f.write_all(&image)
            .with_context(|| format!("writing {}", part.display()))?;
        drop(f);
        // `store.commit` fsyncs it before the rename.
        store.commit(e)?;
        Ok(())
    }

    async fn download_extension(
        &self,
        repo: &Repo,
        store: &Store,
        x: &ExtensionPayload,
        e: &Entry,
    ) -> Result<()> {
        let (part, f, limit) = self.open_staging(
            store,
            e,
            x.size,
            &format!("its download ({} MiB compressed)", x.size >> 20),
        )?;
        let mut gz = flate2::write::GzDecoder::new(Capped {
            f,
            written: 0,
            limit,
            what: format!("{} (uncompressed)", x.target),
        });
        install::stream_target(self, repo, &x.target, &mut |chunk| {
            gz.write_all(chunk)
                .with_context(|| format!("writing {}", part.display()))
        })
        .await?;
        let capped = gz
            .finish()
            .with_context(|| format!("{}: gzip stream incomplete", x.target))?;
        // `store.commit` fsyncs it before the rename.
        drop(capped);
        store.commit(e)?;
        self.emit(
            "extension-downloaded",
            format!(
                "{} {} verified against root hash {}",
                x.name, x.version, x.roothash
            ),
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keelson_common::update::Payload;

    fn listing(name: &str, built_for: &str) -> ExtensionPayload {
        ExtensionPayload {
            name: name.into(),
            version: "3.4.23-1".into(),
            roothash: "ab".repeat(32),
            target: format!("ext-{name}-3.4.23-1-for-{built_for}.raw.gz"),
            size: 10,
            sha256: "cd".repeat(32),
            built_for: built_for.into(),
            patches: vec![],
        }
    }

    fn manifest() -> Manifest {
        let p = |v: &str, ext: Vec<ExtensionPayload>| Payload {
            version: v.into(),
            variant: "test".into(),
            roothash: String::new(),
            root: String::new(),
            root_size: 0,
            verity: String::new(),
            verity_size: 0,
            uki_a: String::new(),
            uki_b: String::new(),
            released: String::new(),
            waves: vec![],
            extensions: ext,
            chunks: None,
            uki_patches: vec![],
            root_patches: vec![],
        };
        Manifest {
            updates: vec![
                p("0.1.0", vec![listing("etcd", "0.1.0")]),
                p("0.2.0", vec![listing("etcd", "0.1.0")]),
                p("0.3.0", vec![]),
            ],
        }
    }

    #[test]
    fn selects_per_os_version() {
        let m = manifest();
        let x = select(&m, "0.2.0", &["etcd".into()]).unwrap();
        assert_eq!(x[0].built_for, "0.1.0");
        let e = entry(&x[0], "0.2.0", "http://repo/");
        assert_eq!(e.listed_for, ["0.2.0"]);
        assert_eq!(
            e.source,
            "http://repo/targets/ext-etcd-3.4.23-1-for-0.1.0.raw.gz"
        );
        assert!(entry(&x[0], "0.1.0", "http://repo").listed_for.is_empty());
        let err = select(&m, "0.3.0", &["etcd".into()])
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "the update repository lists no extension `etcd` for version 0.3.0 (it lists: none)"
        );
        assert!(select(&m, "9.9.9", &[]).unwrap().is_empty());
        assert!(select(&m, "9.9.9", &["etcd".into()]).is_err());
    }
}
