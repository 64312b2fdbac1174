//! Image references: `docker.io/library/busybox:1.36`, `busybox` (Docker Hub's short form,
//! normalized as Docker does), `host:5000/team/app:v2`, `app@sha256:…` (a pin: exactly that
//! manifest or index, never what a tag points to now).

use crate::Invalid;
use oci_spec::distribution::Reference;

/// Parses a registry reference; the error says what is wrong with it.
pub fn parse(text: &str) -> Result<Reference, Invalid> {
    if text.starts_with('/') {
        return Err(Invalid::from("a path, not a registry reference"));
    }
    text.parse::<Reference>()
        .map_err(|e| Invalid(e.to_string()))
}

/// The normalized text of a reference, as stored in the image store's index
/// (`busybox` → `docker.io/library/busybox:latest`).
pub fn canonical(r: &Reference) -> String {
    r.whole()
}

/// Whether a service's `image` is a registry reference (else it is a path).
pub fn is_registry(image: &str) -> bool {
    !image.starts_with('/')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalized() {
        let c = |s: &str| canonical(&parse(s).unwrap());
        assert_eq!(c("busybox"), "docker.io/library/busybox:latest");
        assert_eq!(c("127.0.0.1:5000/app:v1"), "127.0.0.1:5000/app:v1");
        let pin = format!("reg:5000/a/b@sha256:{}", "ab".repeat(32));
        assert_eq!(c(&pin), pin);
        assert!(parse("Not Valid").is_err());
        assert!(parse("x@sha256:abc").is_err());
    }
}
