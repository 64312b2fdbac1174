//! Finding a service's image on disk: a root file system directory, or an OCI image layout
//! directory unpacked once into the store (the images baked into the verified root are such
//! layouts).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::oci_layout;

/// What an image says about how to run it (from an OCI image config; empty for a plain root
/// file system directory).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageDefaults {
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub env: Vec<String>,
    pub workdir: Option<String>,
    pub user: Option<String>,
}

/// An image ready to run: its root directory and defaults.
#[derive(Debug, Clone)]
pub struct Image {
    /// The root to read (users, argv[0]): a plain directory, or the read-only view of the
    /// image's layers (see [`crate::snapshot`]).
    pub rootfs: PathBuf,
    /// The layer directories, top first, that a container stacks as its overlay's lower
    /// directories; empty when `rootfs` is a plain directory (then it is the lower one).
    pub layers: Vec<PathBuf>,
    pub defaults: ImageDefaults,
}

/// Finds the image: a root file system directory, or an OCI image layout directory
/// (`/path/layout`, or `/path/layout:TAG` to pick a tagged manifest) unpacked once into
/// `store` (see [`oci_layout`]).
pub fn lookup(reference: &str, store: &Path) -> Result<Image> {
    let path = Path::new(reference);
    if !oci_layout::is_layout(path) {
        if let Some((dir, tag)) = reference.rsplit_once(':') {
            if !tag.is_empty() && !tag.contains('/') && oci_layout::is_layout(Path::new(dir)) {
                return oci_layout::unpack(Path::new(dir), Some(tag), store);
            }
        }
    }
    let meta = std::fs::metadata(path).with_context(|| format!("image {reference}"))?;
    if !meta.is_dir() {
        bail!("image {reference}: not a directory");
    }
    if oci_layout::is_layout(path) {
        return oci_layout::unpack(path, None, store);
    }
    Ok(Image {
        rootfs: path.to_path_buf(),
        layers: Vec::new(),
        defaults: ImageDefaults::default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_directory_or_layout() {
        use crate::oci_layout::tests::{image as layout_image, tagged, tar, write_index, E, TAR};
        let t = tempfile::tempdir().unwrap();
        let store = t.path().join("images");
        let plain = t.path().join("rootfs");
        std::fs::create_dir(&plain).unwrap();
        let img = lookup(plain.to_str().unwrap(), &store).unwrap();
        assert_eq!(
            (img.rootfs, img.defaults),
            (plain, ImageDefaults::default())
        );

        let oci = t.path().join("oci");
        let v1 = layout_image(
            &oci,
            &[(TAR, tar(&[E::File("v", b"1", 0o644)]))],
            serde_json::json!({ "Cmd": ["/v1"] }),
        );
        let v2 = layout_image(
            &oci,
            &[(TAR, tar(&[E::File("v", b"2", 0o644)]))],
            serde_json::json!({ "Cmd": ["/v2"] }),
        );
        write_index(&oci, vec![tagged(v1, "v1"), tagged(v2, "latest")]);
        let oci = oci.to_str().unwrap();
        let img = lookup(oci, &store).unwrap();
        assert!(img.rootfs.starts_with(&store), "{}", img.rootfs.display());
        assert_eq!(std::fs::read_to_string(img.rootfs.join("v")).unwrap(), "2");
        assert_eq!(img.defaults.cmd, ["/v2"]);
        let img = lookup(&format!("{oci}:v1"), &store).unwrap();
        assert_eq!(std::fs::read_to_string(img.rootfs.join("v")).unwrap(), "1");
        assert_eq!(img.defaults.cmd, ["/v1"]);

        let e = format!("{:#}", lookup(&format!("{oci}:v9"), &store).unwrap_err());
        assert!(e.contains("no manifest tagged \"v9\""), "{e}");
        let missing = t.path().join("missing:v1");
        let e = format!(
            "{:#}",
            lookup(missing.to_str().unwrap(), &store).unwrap_err()
        );
        assert!(
            e.starts_with(&format!("image {}:", missing.display())),
            "{e}"
        );
    }
}
