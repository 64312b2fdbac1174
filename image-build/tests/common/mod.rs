//! What the integration tests that build real images share.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The workspace (configs/ is below it).
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

/// Runs `image-build -q <command> <workspace>/<config> --out <out>` in `cwd`, with `umask` and
/// `TZ` set for the child only (reproducibility tests vary them), and fails the test when the
/// build fails.
#[allow(dead_code)] // not every test binary that includes this module builds unsigned
pub fn build(command: &str, config: &str, out: &Path, cwd: &Path, umask: libc::mode_t, tz: &str) {
    build_with(command, config, out, cwd, umask, tz, None);
}

/// [`build`], signing for Secure Boot with the key directory `keys` if given.
pub fn build_with(
    command: &str,
    config: &str,
    out: &Path,
    cwd: &Path,
    umask: libc::mode_t,
    tz: &str,
    keys: Option<&Path>,
) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_image-build"));
    cmd.env_remove("KEELSON_SECURE_BOOT_KEYS");
    if let Some(k) = keys {
        cmd.env("KEELSON_SECURE_BOOT_KEYS", k);
    }
    cmd.arg("-q")
        .arg(command)
        .arg(workspace().join(config))
        .arg("--out")
        .arg(out)
        .current_dir(cwd)
        .env("TZ", tz);
    // SAFETY: umask is async-signal-safe and touches only the child's own state.
    unsafe {
        cmd.pre_exec(move || {
            libc::umask(umask);
            Ok(())
        });
    }
    let status = cmd.status().unwrap();
    assert!(
        status.success(),
        "image-build {command} {config} failed: {status}"
    );
}

/// A Secure Boot key directory (PK, KEK, db), made with openssl as docs/secure-boot.md says.
#[allow(dead_code)] // not every test binary that includes this module signs
pub fn secure_boot_keys(dir: &Path) {
    keelson_testkit::secure_boot::key_dir(dir);
}
