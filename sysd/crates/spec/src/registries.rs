//! `[registries."HOST[:PORT]"]`: how sysd talks to one OCI registry (plain HTTP for local
//! ones, mirrors, credentials, size limits), in the user's config (`docs/config.md`). A
//! registry without a table is reached anonymously over HTTPS with the default limits.
//!
//! Credentials are kept out of `Debug` output and never logged or returned by the API.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::units::Size;
use super::ConfigError;
use crate::Invalid;

/// Manifests and indexes are small JSON documents (Docker Hub caps them at 4 MiB).
pub const DEFAULT_MAX_MANIFEST: u64 = 4 << 20;
/// A layer above this is refused before any byte of it is fetched.
pub const DEFAULT_MAX_BLOB: u64 = 4 << 30;
/// Blobs of one pull fetched at the same time.
pub const DEFAULT_PARALLEL: u32 = 3;

/// Every configured registry, by `host[:port]` as written in image references.
pub type Registries = BTreeMap<String, Registry>;

#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Registry {
    /// Plain HTTP instead of HTTPS (a local registry, tests).
    #[serde(default)]
    pub insecure: bool,
    /// `host[:port]` of pull-through mirrors, tried in order before the registry itself
    /// (containerd's `?ns=` convention). A mirror's own table gives its settings.
    #[serde(default)]
    pub mirrors: Vec<String>,
    /// Basic credentials; a registry that answers with a bearer challenge gets them exchanged
    /// for a token.
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub password: Option<String>,
    /// A Docker/Podman credentials file (`{"auths": {"HOST": {"auth": base64(user:pass)}}}`),
    /// read at each pull; instead of `username`/`password`.
    #[serde(default)]
    pub auth_file: Option<PathBuf>,
    /// Extra PEM certificate(s) to trust for this registry (a private CA).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Largest manifest or index accepted (default 4M).
    #[serde(default)]
    pub max_manifest_size: Option<Size>,
    /// Largest config or layer blob accepted (default 4G).
    #[serde(default)]
    pub max_blob_size: Option<Size>,
    /// Blobs fetched in parallel (default 3).
    #[serde(default)]
    pub parallel_downloads: Option<u32>,
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registry")
            .field("insecure", &self.insecure)
            .field("mirrors", &self.mirrors)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("auth_file", &self.auth_file)
            .field("ca_file", &self.ca_file)
            .field("max_manifest_size", &self.max_manifest_size)
            .field("max_blob_size", &self.max_blob_size)
            .field("parallel_downloads", &self.parallel_downloads)
            .finish()
    }
}

impl Registry {
    pub fn max_manifest(&self) -> u64 {
        self.max_manifest_size.map_or(DEFAULT_MAX_MANIFEST, |s| s.0)
    }
    pub fn max_blob(&self) -> u64 {
        self.max_blob_size.map_or(DEFAULT_MAX_BLOB, |s| s.0)
    }
    pub fn parallel(&self) -> usize {
        self.parallel_downloads.unwrap_or(DEFAULT_PARALLEL) as usize
    }
}

/// `host`, `host:port`, `[v6]:port`: what image references name a registry by.
pub fn valid_host(host: &str) -> bool {
    let (name, port) = match host.rsplit_once(':') {
        Some((n, p)) if !n.ends_with(']') || n.starts_with('[') => (n, Some(p)),
        _ => (host, None),
    };
    let name_ok = !name.is_empty()
        && name.len() <= 253
        && (name
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'.' || c == b'-')
            || (name.starts_with('[') && name.ends_with(']')));
    let port_ok = port.is_none_or(|p| p.parse::<u16>().is_ok_and(|p| p > 0));
    name_ok && port_ok && !host.contains('/')
}

/// Checks one table; the error names the field.
pub fn check(host: &str, r: &Registry) -> Result<(), Invalid> {
    if !valid_host(host) {
        return Err(Invalid::from(format!(
            "{host:?} is not a registry host: write HOST or HOST:PORT as in image references (no scheme, no path)"
        )));
    }
    for m in &r.mirrors {
        if !valid_host(m) {
            return Err(Invalid::from(format!(
                "mirrors: {m:?} is not a registry host: write HOST or HOST:PORT"
            )));
        }
        if m == host {
            return Err(Invalid::from(format!(
                "mirrors: {m:?} is the registry itself"
            )));
        }
    }
    match (&r.username, &r.password, &r.auth_file) {
        (Some(_), None, _) => return Err(Invalid::from("username without password")),
        (None, Some(_), _) => return Err(Invalid::from("password without username")),
        (Some(_), Some(_), Some(_)) => {
            return Err(Invalid::from(
                "set either username/password or auth_file, not both",
            ))
        }
        _ => {}
    }
    for (field, path) in [("auth_file", &r.auth_file), ("ca_file", &r.ca_file)] {
        if let Some(p) = path {
            if !p.is_absolute() {
                return Err(Invalid::from(format!(
                    "{field}: {} must be an absolute path",
                    p.display()
                )));
            }
        }
    }
    if r.max_manifest_size.is_some_and(|s| s.0 < 1024) {
        return Err(Invalid::from("max_manifest_size: at least 1K"));
    }
    if r.max_blob_size.is_some_and(|s| s.0 < 1024) {
        return Err(Invalid::from("max_blob_size: at least 1K"));
    }
    if r.parallel_downloads.is_some_and(|n| n == 0 || n > 16) {
        return Err(Invalid::from("parallel_downloads: 1 to 16"));
    }
    Ok(())
}

/// Checks the `[registries]` tables of one file (already parsed with their positions).
pub fn check_all(
    path: &Path,
    text: &str,
    tables: BTreeMap<String, toml::Spanned<Registry>>,
) -> Result<Registries, ConfigError> {
    let mut out = Registries::new();
    for (host, spanned) in tables {
        let (line, col) = super::line_col(text, spanned.span().start);
        let r = spanned.into_inner();
        check(&host, &r).map_err(|e| {
            ConfigError(format!(
                "{}:{line}:{col}: registries.{host:?}: {e}",
                path.display()
            ))
        })?;
        out.insert(host, r);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts() {
        for ok in [
            "docker.io",
            "127.0.0.1:5000",
            "my-reg.example:443",
            "[::1]:5000",
            "localhost",
        ] {
            assert!(valid_host(ok), "{ok}");
        }
        for bad in ["", "http://x", "x/y", "x:0", "x:99999", "x:port"] {
            assert!(!valid_host(bad), "{bad}");
        }
    }

    #[test]
    fn parsed_with_positions_and_refused_in_system_files() {
        let path = Path::new("/var/lib/keelson/services.toml");
        let text =
            "version = 1\n\n[registries.\"r:5000\"]\ninsecure = true\nmirrors = [\"r:5000\"]\n";
        let e = crate::parse_registries(path, text).unwrap_err().0;
        assert_eq!(
            e,
            "/var/lib/keelson/services.toml:3:1: registries.\"r:5000\": mirrors: \"r:5000\" is the registry itself"
        );
        let ok = "version = 1\n[registries.\"r:5000\"]\ninsecure = true\nmax_blob_size = \"1G\"\n";
        let r = crate::parse_registries(path, ok).unwrap();
        assert_eq!(r["r:5000"].max_blob(), 1 << 30);
        assert!(r["r:5000"].insecure);
        let e = crate::parse_file(
            Path::new("/usr/lib/keelson/services.d/10-x.toml"),
            ok,
            crate::Source::System,
        )
        .unwrap_err()
        .0;
        assert!(e.contains("belongs in the user's config"), "{e}");
    }

    #[test]
    fn password_is_not_in_debug() {
        let r = Registry {
            username: Some("u".into()),
            password: Some("hunter2".into()),
            ..Registry::default()
        };
        assert!(!format!("{r:?}").contains("hunter2"));
        assert!(check("r", &r).is_ok());
        let r = Registry {
            password: Some("p".into()),
            ..Registry::default()
        };
        assert_eq!(check("r", &r).unwrap_err().0, "password without username");
    }
}
