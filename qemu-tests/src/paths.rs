//! Where things are: the built images, the firmware, the QEMU binaries.
//!
//! Every lookup fails with a message that says how to fix it (which command builds the image,
//! which Debian package provides the file), because the usual reason a VM test fails on a fresh
//! machine is a missing prerequisite, not a bug.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};

/// File names inside an image directory (`out/<name>/`), as written by `image-build`.
pub mod image_files {
    /// The kernel, for direct (`-kernel`) boots.
    pub const KERNEL: &str = "vmlinuz";
    /// The initramfs, for direct boots.
    pub const INITRD: &str = "initramfs.img";
    /// The kernel command line for direct boots, one line.
    pub const CMDLINE: &str = "cmdline";
    /// The raw GPT disk image.
    pub const DISK: &str = "disk.raw";
}

/// Debian's 4 MiB OVMF build without Secure Boot keys enrolled.
const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";
const OVMF_CODE_SECBOOT: &str = "/usr/share/OVMF/OVMF_CODE_4M.secboot.fd";

/// The cargo workspace root (the parent of this crate's directory).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}

/// Where `image-build` puts its images: `<workspace>/out`, or `$KEELSON_OUT`.
pub fn images_dir() -> PathBuf {
    match std::env::var_os("KEELSON_OUT") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => workspace_root().join("out"),
    }
}

/// The directory of a built image, `out/<name>/`; an error saying how to build it if absent.
pub fn image(name: &str) -> Result<PathBuf> {
    let dir = images_dir().join(name);
    if !dir.is_dir() {
        bail!(
            "image out/{name} not built ({} does not exist): run \
             `cargo run -p image-build -- build configs/{name}.toml` first",
            dir.display()
        );
    }
    Ok(dir)
}

/// A file inside an image directory, with an error naming the image if it is missing.
pub fn image_file(dir: &Path, file: &str) -> Result<PathBuf> {
    let path = dir.join(file);
    if !path.is_file() {
        let present: Vec<String> = std::fs::read_dir(dir)
            .map(|entries| {
                entries
                    .filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        bail!(
            "{} missing from image directory {} (it holds: {}); rebuild the image with image-build",
            file,
            dir.display(),
            if present.is_empty() {
                "nothing".to_string()
            } else {
                present.join(", ")
            }
        );
    }
    Ok(path)
}

/// OVMF's code volume (read-only pflash unit 0); `$KEELSON_OVMF_CODE` overrides it.
pub fn ovmf_code() -> Result<PathBuf> {
    firmware("KEELSON_OVMF_CODE", OVMF_CODE)
}

/// OVMF's Secure Boot code volume (SMM; needs `-machine q35,smm=on` and a secure pflash);
/// `$KEELSON_OVMF_CODE_SECBOOT` overrides it.
pub fn ovmf_code_secboot() -> Result<PathBuf> {
    firmware("KEELSON_OVMF_CODE_SECBOOT", OVMF_CODE_SECBOOT)
}

/// The pristine OVMF variable store template (each guest boots from a private copy of it);
/// `$KEELSON_OVMF_VARS` overrides it.
pub fn ovmf_vars() -> Result<PathBuf> {
    firmware("KEELSON_OVMF_VARS", OVMF_VARS)
}

fn firmware(var: &str, default: &str) -> Result<PathBuf> {
    let path = std::env::var_os(var)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(default));
    if !path.is_file() {
        bail!(
            "UEFI firmware {} not found: install the Debian package `ovmf` (or set {var})",
            path.display()
        );
    }
    Ok(path)
}

/// `qemu-system-x86_64` from `$PATH` (an error naming its package if it is missing).
pub fn qemu_system() -> Result<PathBuf> {
    Ok(keelson_testkit::tools::resolve("qemu-system-x86_64")?)
}

/// `qemu-img` from `$PATH`.
pub fn qemu_img() -> Result<PathBuf> {
    Ok(keelson_testkit::tools::resolve("qemu-img")?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_image_error_says_how_to_build_it() {
        // A name that cannot exist, whatever KEELSON_OUT says.
        let err = image("no-such-image-\u{1}").unwrap_err().to_string();
        assert!(
            err.contains("image out/no-such-image-\u{1} not built"),
            "{err}"
        );
        assert!(err.contains("cargo run -p image-build -- build configs/no-such-image-\u{1}.toml"));
    }

    #[test]
    fn workspace_root_holds_the_workspace_manifest() {
        assert!(workspace_root().join("Cargo.toml").is_file());
        assert!(workspace_root().join("qemu-tests").is_dir());
    }
}
