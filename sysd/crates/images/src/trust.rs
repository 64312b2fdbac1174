//! TLS trust for registry pulls. A Keelson node has no CA bundle of its own, and reqwest
//! (under oci-client) builds a default client that loads the platform's roots and aborts when
//! there are none, whatever the client's own configuration. So sysd carries Mozilla's roots
//! (webpki-root-certs, compiled in), writes them once as a PEM bundle under its run directory
//! and points `SSL_CERT_FILE` at it, before any thread exists. Each registry client then trusts
//! exactly these roots plus the registry's `ca_file` (see [`super::pull`]); no host store is
//! consulted, so a node and a test host verify alike.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use base64::Engine as _;

/// Writes `dir/ca-roots.pem` and sets `SSL_CERT_FILE` to it (and unsets `SSL_CERT_DIR`).
/// Call before the async runtime starts: changing the environment is only sound while the
/// process has one thread.
pub fn install(dir: &Path) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join("ca-roots.pem");
    super::store::write_atomic(&path, pem_bundle().as_bytes())?;
    std::env::set_var("SSL_CERT_FILE", &path);
    std::env::remove_var("SSL_CERT_DIR");
    Ok(path)
}

fn pem_bundle() -> String {
    let mut out = String::new();
    for cert in webpki_root_certs::TLS_SERVER_ROOT_CERTS {
        let b64 = base64::engine::general_purpose::STANDARD.encode(cert.as_ref());
        out.push_str("-----BEGIN CERTIFICATE-----\n");
        for line in b64.as_bytes().chunks(64) {
            let _ = writeln!(out, "{}", String::from_utf8_lossy(line));
        }
        out.push_str("-----END CERTIFICATE-----\n");
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn bundle_has_every_root() {
        let pem = super::pem_bundle();
        assert_eq!(
            pem.matches("BEGIN CERTIFICATE").count(),
            webpki_root_certs::TLS_SERVER_ROOT_CERTS.len()
        );
        assert!(pem.lines().all(|l| l.len() <= 64 || l.starts_with("-----")));
    }
}
