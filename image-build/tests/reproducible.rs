//! Reproducibility: two builds of the same config and lock, in different directories, at
//! different times, with different umask and TZ, give bit-identical outputs.
//!
//! Both builds take the image binaries from the same `target/image` build (the binaries' own
//! reproducibility comes from the remapped paths and fixed flags in `binaries.rs`); everything
//! from the packages to the GPT is rebuilt from scratch each time.

use std::path::Path;

mod common;

fn build(out: &Path, cwd: &Path, umask: libc::mode_t, tz: &str) {
    common::build("build", "configs/vm.toml", out, cwd, umask, tz);
}

#[test]
fn two_builds_are_bit_identical() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    build(&a.path().join("one/vm"), a.path(), 0o022, "UTC");
    std::thread::sleep(std::time::Duration::from_secs(2));
    build(
        &b.path().join("two/elsewhere/vm"),
        b.path(),
        0o077,
        "Pacific/Kiritimati",
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
}
