//! Service images as OCI image layouts (image-spec 1.0: `oci-layout`, `index.json`,
//! `blobs/sha256/`), made from the same staged root file system that goes into the verified
//! root, with reproducible digests: one layer, a tar of the tree in sorted order with every
//! owner 0:0 (as `mkfs.erofs --all-root` stores it), modes as staged, mtimes set to the lock's
//! `source_date_epoch`, hard links as link entries; gzip with mtime 0 and a fixed level; JSON
//! with sorted keys. Same inputs, same bytes, same digests — on any machine, in any directory.
//!
//! The layouts are build outputs (`out/<config>/oci/<name>/`, digests in `manifest.json`):
//! what a registry serves (`skopeo copy oci:out/vm/oci/base:base docker://…`). The root itself
//! keeps the images unpacked (see ARCHITECTURE.md: "System images stay unpacked in the root").

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::util::civil_from_unix;

/// What was written, for the SBOM.
#[derive(Debug, Serialize)]
pub struct Layout {
    pub name: String,
    pub path: String,
    /// The image manifest's digest: what `image = "…@sha256:…"` pins.
    pub manifest: String,
    pub config: String,
    pub layer: String,
    /// Compressed layer size.
    pub layer_size: u64,
    /// Uncompressed tar size.
    pub tar_size: u64,
}

/// Writes the layout of `rootfs` (tagged `name`) at `dest` (replaced).
pub fn write(rootfs: &Path, name: &str, epoch: u64, dest: &Path, rel: &str) -> Result<Layout> {
    if dest.exists() {
        std::fs::remove_dir_all(dest).with_context(|| format!("removing {}", dest.display()))?;
    }
    let blobs = dest.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).with_context(|| format!("creating {}", blobs.display()))?;
    let tar = layer_tar(rootfs, epoch).with_context(|| format!("image {name}: layer"))?;
    let diff_id = hex::encode(Sha256::digest(&tar));
    let mut gz = flate2::GzBuilder::new()
        .mtime(0)
        .write(Vec::new(), flate2::Compression::new(6));
    gz.write_all(&tar)?;
    let layer = gz.finish()?;
    let put = |data: &[u8]| -> Result<(String, u64)> {
        let hex = hex::encode(Sha256::digest(data));
        std::fs::write(blobs.join(&hex), data)?;
        Ok((format!("sha256:{hex}"), data.len() as u64))
    };
    let (layer_digest, layer_size) = put(&layer)?;
    let (y, mo, d, h, mi, s) = civil_from_unix(epoch);
    let created = format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}Z");
    // serde_json's map keeps keys sorted: the JSON bytes are stable.
    let config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "created": created,
        "config": {
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "Labels": { "org.opencontainers.image.title": name },
        },
        "rootfs": { "type": "layers", "diff_ids": [format!("sha256:{diff_id}")] },
        "history": [{ "created": created, "created_by": format!("image-build [images.{name}]") }],
    });
    let (config_digest, config_size) = put(&serde_json::to_vec(&config)?)?;
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config_digest, "size": config_size,
        },
        "layers": [{
            "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
            "digest": layer_digest, "size": layer_size,
        }],
        "annotations": { "org.opencontainers.image.created": created },
    });
    let (manifest_digest, manifest_size) = put(&serde_json::to_vec(&manifest)?)?;
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_digest, "size": manifest_size,
            "platform": { "architecture": "amd64", "os": "linux" },
            "annotations": { "org.opencontainers.image.ref.name": name },
        }],
    });
    std::fs::write(dest.join("index.json"), serde_json::to_vec(&index)?)?;
    std::fs::write(
        dest.join("oci-layout"),
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    )?;
    Ok(Layout {
        name: name.to_string(),
        path: rel.to_string(),
        manifest: manifest_digest,
        config: config_digest,
        layer: layer_digest,
        layer_size,
        tar_size: tar.len() as u64,
    })
}

/// The tree as a tar stream: sorted, owners 0:0, mtimes `epoch`, hard links as links.
fn layer_tar(root: &Path, epoch: u64) -> Result<Vec<u8>> {
    let mut entries = BTreeMap::new();
    collect(root, Path::new(""), &mut entries)?;
    let mut b = tar::Builder::new(Vec::new());
    let mut inodes: HashMap<(u64, u64), PathBuf> = HashMap::new();
    for (rel, path) in entries {
        let meta = std::fs::symlink_metadata(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let mut h = tar::Header::new_ustar();
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(epoch);
        h.set_mode(meta.mode() & 0o7777);
        let ft = meta.file_type();
        if ft.is_dir() {
            h.set_entry_type(tar::EntryType::Directory);
            h.set_size(0);
            b.append_data(&mut h, dir_name(&rel), std::io::empty())?;
        } else if ft.is_symlink() {
            let target = std::fs::read_link(&path)?;
            h.set_entry_type(tar::EntryType::Symlink);
            h.set_size(0);
            b.append_link(&mut h, &rel, &target)?;
        } else if ft.is_file() {
            if meta.nlink() > 1 {
                if let Some(first) = inodes.get(&(meta.dev(), meta.ino())) {
                    h.set_entry_type(tar::EntryType::Link);
                    h.set_size(0);
                    b.append_link(&mut h, &rel, first)?;
                    continue;
                }
                inodes.insert((meta.dev(), meta.ino()), rel.clone());
            }
            h.set_entry_type(tar::EntryType::Regular);
            h.set_size(meta.len());
            let f = std::fs::File::open(&path)?;
            b.append_data(&mut h, &rel, f)?;
        } else {
            bail!("{}: not a file, directory or symlink", path.display());
        }
    }
    Ok(b.into_inner()?)
}

fn dir_name(rel: &Path) -> PathBuf {
    let mut s = rel.as_os_str().to_os_string();
    s.push("/");
    PathBuf::from(s)
}

fn collect(root: &Path, rel: &Path, out: &mut BTreeMap<PathBuf, PathBuf>) -> Result<()> {
    let dir = root.join(rel);
    for e in std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
        let e = e?;
        let child = rel.join(e.file_name());
        let is_dir = e.file_type()?.is_dir();
        out.insert(child.clone(), e.path());
        if is_dir {
            collect(root, &child, out)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{symlink, PermissionsExt};

    fn tree(root: &Path, order: &[&str]) {
        for name in order {
            match *name {
                "bin" => {
                    std::fs::create_dir_all(root.join("usr/bin")).unwrap();
                    std::fs::write(root.join("usr/bin/busybox"), b"\x7fELF...").unwrap();
                    std::fs::set_permissions(
                        root.join("usr/bin/busybox"),
                        std::fs::Permissions::from_mode(0o4755),
                    )
                    .unwrap();
                    std::fs::hard_link(root.join("usr/bin/busybox"), root.join("usr/bin/sh"))
                        .unwrap();
                }
                "links" => symlink("usr/bin", root.join("bin")).unwrap(),
                _ => {
                    std::fs::create_dir_all(root.join("etc")).unwrap();
                    std::fs::write(root.join("etc/passwd"), b"root:x:0:0::/root:/bin/sh\n")
                        .unwrap();
                }
            }
        }
    }

    #[test]
    fn reproducible_whatever_the_creation_order_and_times() {
        let t = tempfile::tempdir().unwrap();
        let (a, b) = (t.path().join("a"), t.path().join("b"));
        tree(&a, &["bin", "links", "etc"]);
        std::thread::sleep(std::time::Duration::from_millis(1100));
        tree(&b, &["etc", "links", "bin"]);
        let la = write(&a, "base", 1_700_000_000, &t.path().join("oa"), "oa").unwrap();
        let lb = write(&b, "base", 1_700_000_000, &t.path().join("ob"), "ob").unwrap();
        assert_eq!(la.manifest, lb.manifest);
        assert_eq!(la.layer, lb.layer);
        let lc = write(&a, "base", 1_700_000_001, &t.path().join("oc"), "oc").unwrap();
        assert_ne!(la.manifest, lc.manifest, "the epoch is an input");

        // The layer holds the tree: a hard link, the setuid bit, owners 0:0, fixed mtimes.
        let hex = la.layer.strip_prefix("sha256:").unwrap();
        let gz = std::fs::read(t.path().join("oa/blobs/sha256").join(hex)).unwrap();
        let mut ar = tar::Archive::new(flate2::read::GzDecoder::new(&gz[..]));
        let mut seen = Vec::new();
        for e in ar.entries().unwrap() {
            let e = e.unwrap();
            let h = e.header();
            assert_eq!((h.uid().unwrap(), h.gid().unwrap()), (0, 0));
            assert_eq!(h.mtime().unwrap(), 1_700_000_000);
            let p = e.path().unwrap().display().to_string();
            if p == "usr/bin/busybox" {
                assert_eq!(h.mode().unwrap(), 0o4755);
            }
            if p == "usr/bin/sh" {
                assert_eq!(h.entry_type(), tar::EntryType::Link);
            }
            seen.push(p);
        }
        let mut sorted = seen.clone();
        sorted.sort();
        assert_eq!(seen, sorted);
        assert!(seen.contains(&"bin".to_string()));
        let index = std::fs::read_to_string(t.path().join("oa/index.json")).unwrap();
        assert!(index.contains(&la.manifest) && index.contains("\"base\""));
    }
}
