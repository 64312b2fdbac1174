//! Throwaway UEFI Secure Boot keys for tests and benchmarks, made with openssl the way
//! docs/secure-boot.md tells users to make theirs.

use std::path::{Path, PathBuf};
use std::process::Command;

/// An RSA-2048 key and a self-signed certificate for `cn`, as `DIR/NAME.key` and
/// `DIR/NAME.crt` (PEM). Returns both paths.
pub fn keypair(dir: &Path, name: &str, cn: &str) -> (PathBuf, PathBuf) {
    std::fs::create_dir_all(dir).expect("key directory");
    let (key, crt) = (
        dir.join(format!("{name}.key")),
        dir.join(format!("{name}.crt")),
    );
    let out = Command::new("openssl")
        .args([
            "req", "-new", "-x509", "-newkey", "rsa:2048", "-nodes", "-sha256",
        ])
        .args(["-days", "3650", "-subj"])
        .arg(format!("/CN={cn}/"))
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&crt)
        .output()
        .expect("openssl (package openssl)");
    assert!(
        out.status.success(),
        "openssl req: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (key, crt)
}

/// A key directory as `image-build --secure-boot-keys` takes it: `PK`, `KEK` and `db`.
pub fn key_dir(dir: &Path) {
    for name in ["PK", "KEK", "db"] {
        keypair(dir, name, &format!("Keelson test {name}"));
    }
}
