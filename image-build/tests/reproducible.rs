//! Reproducibility: two builds of the same config and lock, in different directories, at
//! different times, with different umask and TZ, give bit-identical outputs, Secure Boot
//! signatures included (both builds sign with one key); a third build without the key differs
//! from them only by the signatures.
//!
//! Both builds take the image binaries from the same `target/image` build (the binaries' own
//! reproducibility comes from the remapped paths and fixed flags in `binaries.rs`); everything
//! from the packages to the GPT is rebuilt from scratch each time.

use std::path::Path;

mod common;

fn build(out: &Path, cwd: &Path, umask: libc::mode_t, tz: &str, keys: Option<&Path>) {
    common::build_with("build", "configs/vm.toml", out, cwd, umask, tz, keys);
}

/// A PE image with its Authenticode signature taken off: the certificate table cut, the
/// security directory and the checksum zeroed (an unsigned image gets its checksum zeroed too).
fn strip(mut pe: Vec<u8>) -> Vec<u8> {
    let u32_at = |b: &[u8], o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap()) as usize;
    let opt = u32_at(&pe, 0x3c) + 24;
    assert_eq!(&pe[opt..opt + 2], &0x20bu16.to_le_bytes(), "a PE32+ image");
    let secdir = opt + 112 + 8 * 4;
    let (at, len) = (u32_at(&pe, secdir), u32_at(&pe, secdir + 4));
    if len != 0 {
        pe.truncate(at);
    }
    pe[secdir..secdir + 8].fill(0);
    pe[opt + 64..opt + 68].fill(0);
    pe
}

#[test]
fn two_builds_are_bit_identical() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    let keys = a.path().join("keys");
    common::secure_boot_keys(&keys);
    build(
        &a.path().join("one/vm"),
        a.path(),
        0o022,
        "UTC",
        Some(&keys),
    );
    std::thread::sleep(std::time::Duration::from_secs(2));
    build(
        &b.path().join("two/elsewhere/vm"),
        b.path(),
        0o077,
        "Pacific/Kiritimati",
        Some(&keys),
    );
    for f in [
        "disk.raw",
        "initramfs.img",
        "root.erofs",
        "root.verity",
        "keelson_0.1.0+3.efi",
        "cmdline",
        // The service images' OCI layouts: index.json names the manifest by digest, which
        // covers the config and the layer.
        "oci/base/index.json",
        "oci/admin/index.json",
    ] {
        let x = std::fs::read(a.path().join("one/vm").join(f)).unwrap();
        let y = std::fs::read(b.path().join("two/elsewhere/vm").join(f)).unwrap();
        assert!(x == y, "{f} differs between the two builds");
    }

    // Without the key: the UKIs are the signed ones minus their signatures (and the 8-byte
    // alignment the signature table needs), and the root is the same.
    let unsigned = b.path().join("unsigned/vm");
    build(&unsigned, b.path(), 0o022, "UTC", None);
    for f in ["keelson_0.1.0+3.efi", "uki-slot-b.efi"] {
        let signed = strip(std::fs::read(a.path().join("one/vm").join(f)).unwrap());
        let mut plain = strip(std::fs::read(unsigned.join(f)).unwrap());
        plain.resize(plain.len().next_multiple_of(8), 0);
        assert!(
            signed == plain,
            "{f}: more than the signature depends on the key"
        );
    }
    for f in ["root.erofs", "root.verity", "initramfs.img", "cmdline"] {
        let x = std::fs::read(a.path().join("one/vm").join(f)).unwrap();
        let y = std::fs::read(unsigned.join(f)).unwrap();
        assert!(x == y, "{f} depends on the Secure Boot key");
    }
}
