//! Bad input to the pipeline gets an error that names what is wrong, where, and the fix.

use std::path::{Path, PathBuf};
use std::process::Command;

fn ws() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

/// Copies configs/vm.toml and its lock into a temp dir, with `edit` applied to the lock.
fn config_with_lock(dir: &Path, edit: impl Fn(String) -> String) -> PathBuf {
    let cfg = dir.join("vm.toml");
    std::fs::copy(ws().join("configs/vm.toml"), &cfg).unwrap();
    let lock = std::fs::read_to_string(ws().join("configs/vm.lock")).unwrap();
    std::fs::write(dir.join("vm.lock"), edit(lock)).unwrap();
    cfg
}

fn build_err(cfg: &Path, out: &Path) -> String {
    let o = Command::new(env!("CARGO_BIN_EXE_image-build"))
        .args(["-q", "build"])
        .arg(cfg)
        .arg("--out")
        .arg(out)
        .output()
        .unwrap();
    assert!(!o.status.success(), "build succeeded on bad input");
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn sha256_mismatch_names_the_package_and_the_fix() {
    let d = tempfile::tempdir().unwrap();
    let cfg = config_with_lock(d.path(), |l| {
        let good = l
            .lines()
            .rev()
            .find(|x| x.starts_with("sha256"))
            .unwrap()
            .to_owned();
        l.replace(&good, &format!("sha256 = \"{}\"", "0".repeat(64)))
    });
    let err = build_err(&cfg, &d.path().join("out"));
    assert!(
        err.contains("systemd-boot-efi") && err.contains("does not match the pin"),
        "{err}"
    );
    assert!(err.contains("image-build lock"), "{err}");
}

#[test]
fn a_version_the_mirror_no_longer_has_names_the_fix() {
    let d = tempfile::tempdir().unwrap();
    let cfg = config_with_lock(d.path(), |l| {
        let v = l
            .lines()
            .rev()
            .find(|x| x.starts_with("version"))
            .unwrap()
            .to_owned();
        l.replace(&v, "version = \"0.0.1-keelson-gone\"")
    });
    let err = build_err(&cfg, &d.path().join("out"));
    assert!(
        err.contains("not on the apt mirror any more") && err.contains("image-build lock"),
        "{err}"
    );
}

#[test]
fn unknown_config_key_is_located() {
    let d = tempfile::tempdir().unwrap();
    let cfg = config_with_lock(d.path(), |l| l);
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("[disk]\n", "[disk]\nesp_size = 3\n");
    std::fs::write(&cfg, &text).unwrap();
    let line = text
        .lines()
        .position(|l| l.starts_with("esp_size"))
        .unwrap()
        + 1;
    let err = build_err(&cfg, &d.path().join("out"));
    assert!(
        err.contains(&format!("vm.toml:{line}:1: unknown field `esp_size`")),
        "{err}"
    );
}
