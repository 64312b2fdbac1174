//! Bad input to the pipeline gets an error that names what is wrong, where, and the fix.

use std::path::{Path, PathBuf};
use std::process::Command;

fn ws() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

/// Copies configs/vm.toml, its lock and its service files into a temp dir, with `edit` applied
/// to the lock.
fn config_with_lock(dir: &Path, edit: impl Fn(String) -> String) -> PathBuf {
    let cfg = dir.join("vm.toml");
    std::fs::copy(ws().join("configs/vm.toml"), &cfg).unwrap();
    let lock = std::fs::read_to_string(ws().join("configs/vm.lock")).unwrap();
    std::fs::write(dir.join("vm.lock"), edit(lock)).unwrap();
    std::fs::create_dir_all(dir.join("services")).unwrap();
    for f in std::fs::read_dir(ws().join("configs/services")).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, dir.join("services").join(f.file_name().unwrap())).unwrap();
    }
    cfg
}

/// The line `key = ...` of package `name` in a lock.
fn pin_line(lock: &str, name: &str, key: &str) -> String {
    lock.split("[[package]]")
        .find(|block| block.contains(&format!("name = \"{name}\"")))
        .unwrap()
        .lines()
        .find(|l| l.starts_with(&format!("{key} =")))
        .unwrap()
        .to_owned()
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
        let good = pin_line(&l, "systemd-boot-efi", "sha256");
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
        let v = pin_line(&l, "systemd-boot-efi", "version");
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

#[test]
fn an_unknown_root_compression_is_located_with_the_choices() {
    let d = tempfile::tempdir().unwrap();
    let cfg = config_with_lock(d.path(), |l| l);
    let text = std::fs::read_to_string(&cfg).unwrap().replace(
        "root_compression = \"lz4hc\"",
        "root_compression = \"lzma\"",
    );
    std::fs::write(&cfg, &text).unwrap();
    let line = text
        .lines()
        .position(|l| l.starts_with("root_compression"))
        .unwrap()
        + 1;
    let err = build_err(&cfg, &d.path().join("out"));
    assert!(
        err.contains(&format!(
            "vm.toml:{line}:20: unknown variant `lzma`, expected `none` or `lz4hc`"
        )),
        "{err}"
    );
}

#[test]
fn an_image_package_missing_from_the_lock_names_the_fix() {
    let d = tempfile::tempdir().unwrap();
    let cfg = config_with_lock(d.path(), |l| l);
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("\"dropbear-bin\"]", "\"dropbear-bin\", \"hello\"]");
    std::fs::write(&cfg, text).unwrap();
    let err = build_err(&cfg, &d.path().join("out"));
    assert!(
        err.contains("hello is used by images.admin") && err.contains("image-build lock"),
        "{err}"
    );
}

/// Replaces `from` in the copied services/system.toml; returns its path and the 1-based line
/// of the first line containing `marker` after the edit.
fn edit_services(dir: &Path, from: &str, to: &str, marker: &str) -> (PathBuf, usize) {
    let path = dir.join("services/system.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.contains(from));
    let text = text.replacen(from, to, 1);
    std::fs::write(&path, &text).unwrap();
    let line = text.lines().position(|l| l.contains(marker)).unwrap() + 1;
    (path, line)
}

#[test]
fn a_service_of_the_wrong_type_is_located_before_anything_is_fetched() {
    let d = tempfile::tempdir().unwrap();
    let cfg = config_with_lock(d.path(), |l| l);
    let (_, line) = edit_services(
        d.path(),
        "image = \"/usr/lib/keelson/images/base\"",
        "image = 5",
        "image = 5",
    );
    let err = build_err(&cfg, &d.path().join("out"));
    assert!(
        err.contains(&format!("system.toml:{line}:9:")) && err.contains("invalid type"),
        "{err}"
    );
}

#[test]
fn a_service_of_an_image_that_is_not_built_is_located() {
    let d = tempfile::tempdir().unwrap();
    let cfg = config_with_lock(d.path(), |l| l);
    let (_, line) = edit_services(
        d.path(),
        "[services.admin]\nimage = \"/usr/lib/keelson/images/admin\"",
        "[services.admin]\nimage = \"/usr/lib/keelson/images/nope\"",
        "[services.admin]",
    );
    let err = build_err(&cfg, &d.path().join("out"));
    assert!(
        err.contains(&format!("system.toml:{line}:1: service `admin`: image /usr/lib/keelson/images/nope is not built into this image")),
        "{err}"
    );
}

/// The image's own sysd checks the service files: its file:line:col message fails the build.
#[test]
fn a_service_file_sysd_rejects_fails_the_build_with_its_location() {
    let d = tempfile::tempdir().unwrap();
    let cfg = config_with_lock(d.path(), |l| l);
    let (_, line) = edit_services(
        d.path(),
        "critical = true\n",
        "critical = true\nrestart_policy = \"always\"\n",
        "restart_policy",
    );
    let err = build_err(&cfg, &d.path().join("out"));
    assert!(
        err.contains(&format!(
            "system.toml:{line}:1: services.timesync.restart_policy: unknown field `restart_policy`"
        )),
        "{err}"
    );
    assert!(err.contains("sysd check"), "{err}");
}

/// Copies configs/extensions/etcd.toml (with its lock and service file) and the OS config it
/// names (configs/test.toml, its lock and services) into `dir`, keeping their relative layout,
/// with `edit` applied to the extension's service file; returns the extension definition.
fn extension_setup(dir: &Path, edit: impl Fn(String) -> String) -> PathBuf {
    extension_setup_with(dir, |d| d, edit)
}

/// [`extension_setup`] with `edit_def` applied to the extension definition too.
fn extension_setup_with(
    dir: &Path,
    edit_def: impl Fn(String) -> String,
    edit: impl Fn(String) -> String,
) -> PathBuf {
    let ext = dir.join("extensions");
    std::fs::create_dir_all(ext.join("services")).unwrap();
    std::fs::create_dir_all(dir.join("services")).unwrap();
    for f in ["test.toml", "test.lock"] {
        std::fs::copy(ws().join("configs").join(f), dir.join(f)).unwrap();
    }
    for f in std::fs::read_dir(ws().join("configs/services")).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, dir.join("services").join(f.file_name().unwrap())).unwrap();
    }
    std::fs::copy(
        ws().join("configs/extensions/etcd.lock"),
        ext.join("etcd.lock"),
    )
    .unwrap();
    let def = std::fs::read_to_string(ws().join("configs/extensions/etcd.toml")).unwrap();
    std::fs::write(ext.join("etcd.toml"), edit_def(def)).unwrap();
    let svc = std::fs::read_to_string(ws().join("configs/extensions/services/etcd.toml")).unwrap();
    std::fs::write(ext.join("services/etcd.toml"), edit(svc)).unwrap();
    ext.join("etcd.toml")
}

fn extension_err(cfg: &Path, out: &Path) -> String {
    let o = Command::new(env!("CARGO_BIN_EXE_image-build"))
        .args(["-q", "extension"])
        .arg(cfg)
        .arg("--out")
        .arg(out)
        .output()
        .unwrap();
    assert!(
        !o.status.success(),
        "extension build succeeded on bad input"
    );
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn an_extension_service_is_checked_together_with_the_os_services() {
    let d = tempfile::tempdir().unwrap();
    // The OS already has a system service named timesync.
    let cfg = extension_setup(d.path(), |s| {
        s.replace("[services.etcd", "[services.timesync")
    });
    let err = extension_err(&cfg, &d.path().join("out"));
    assert!(
        err.contains("sysd check --system")
            && err.contains("timesync")
            && err.contains("already defined"),
        "{err}"
    );
    assert!(!d.path().join("out/etcd.raw").exists());
}

#[test]
fn an_extension_service_must_run_from_the_extension_s_images() {
    let d = tempfile::tempdir().unwrap();
    let cfg = extension_setup(d.path(), |s| {
        s.replace(
            "/usr/lib/keelson/images/etcd",
            "/usr/lib/keelson/images/base",
        )
    });
    let err = extension_err(&cfg, &d.path().join("out"));
    assert!(
        err.contains("services/etcd.toml:")
            && err.contains("image /usr/lib/keelson/images/base is not built into this extension"),
        "{err}"
    );
}

#[test]
fn an_extension_module_the_kernel_lacks_is_refused_with_its_name() {
    let d = tempfile::tempdir().unwrap();
    let cfg = extension_setup_with(
        d.path(),
        |def| format!("{def}\n[kernel]\nmodules = [\"vxlan\", \"no_such_module\", \"overlay\"]\n"),
        |s| s,
    );
    let err = extension_err(&cfg, &d.path().join("out"));
    assert!(
        err.contains("kernel.modules names modules this kernel has neither as a file nor built in: no_such_module")
            && err.contains("the OS's kernel 6."),
        "{err}"
    );
    assert!(!d.path().join("out/etcd.raw").exists());
}

#[test]
fn kinds_of_definitions_are_not_mixed_up() {
    let d = tempfile::tempdir().unwrap();
    let err = extension_err(&ws().join("configs/test.toml"), &d.path().join("out"));
    assert!(
        err.contains("is an OS config, not an extension definition"),
        "{err}"
    );
    let cfg = extension_setup(d.path(), |s| s);
    let o = Command::new(env!("CARGO_BIN_EXE_image-build"))
        .args(["-q", "build", "--kernel-arg", "quiet"])
        .arg(&cfg)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("is an extension definition: --trusted-root"),
        "{err}"
    );
}

#[test]
fn an_excluded_package_still_in_the_lock_names_the_fix() {
    let d = tempfile::tempdir().unwrap();
    let cfg = extension_setup(d.path(), |s| s);
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(
        &cfg,
        text.replace(
            "exclude = [\"adduser\", \"init-system-helpers\"]",
            "exclude = [\"adduser\", \"init-system-helpers\", \"libgcc-s1\"]",
        ),
    )
    .unwrap();
    let err = extension_err(&cfg, &d.path().join("out"));
    assert!(
        err.contains("libgcc-s1 is pinned for images.etcd")
            && err.contains("excludes it: run `image-build lock"),
        "{err}"
    );
}
