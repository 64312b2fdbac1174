//! `[api.remote]`: sysd's API on a TCP port over mutual TLS (docs/api.md, *Remote API*). Like
//! `[update]`, a layer's `[api]` table replaces the lower ones whole (user file, then user
//! data, then system files). Off when no layer has it.
//!
//! The trust material (`ca`, `cert`, `key`) is given inline as PEM or as an absolute path to a
//! PEM file on the node; this crate checks its shape, the API crate decides whether it is a
//! usable CA, certificate and key.

use std::net::SocketAddr;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::{table, ConfigError, Sources};
use crate::Invalid;

/// The port the remote API listens on when `listen` names only an address.
pub const DEFAULT_PORT: u16 = 50000;
/// Connections served at once when `max_connections` is not given.
pub const DEFAULT_MAX_CONNECTIONS: u32 = 64;

/// The `[api]` table.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiSpec {
    /// The API on the network; absent: only the local socket.
    pub remote: Option<RemoteSpec>,
}

/// `[api.remote]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemoteSpec {
    /// `ADDRESS:PORT` or `ADDRESS` (port 50000); `0.0.0.0` or `[::]` for every address.
    pub listen: String,
    /// The CA that signs client certificates (only its clients get in).
    pub ca: Pem,
    /// The node's certificate chain (signed by the CA the operator's keelctl trusts).
    pub cert: Pem,
    /// The node certificate's private key.
    pub key: Pem,
    /// Connections served at once; more are closed as they arrive.
    #[serde(default = "default_max_connections")]
    pub max_connections: u32,
}

fn default_max_connections() -> u32 {
    DEFAULT_MAX_CONNECTIONS
}

/// PEM text given inline, or the absolute path of a file holding it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Pem {
    Inline(String),
    File(std::path::PathBuf),
}

impl TryFrom<String> for Pem {
    type Error = String;
    fn try_from(text: String) -> Result<Self, String> {
        let trimmed = text.trim_start();
        if trimmed.starts_with("-----BEGIN ") {
            Ok(Pem::Inline(text))
        } else if text.starts_with('/') && !text.contains('\n') {
            Ok(Pem::File(text.into()))
        } else {
            Err(
                "expected PEM text (\"-----BEGIN ...\") or the absolute path of a PEM file"
                    .to_string(),
            )
        }
    }
}

impl From<Pem> for String {
    fn from(pem: Pem) -> String {
        match pem {
            Pem::Inline(text) => text,
            Pem::File(path) => path.display().to_string(),
        }
    }
}

impl Pem {
    /// The PEM text: as given, or read from its file.
    pub fn read(&self) -> std::io::Result<String> {
        match self {
            Pem::Inline(text) => Ok(text.clone()),
            Pem::File(path) => std::fs::read_to_string(path),
        }
    }

    /// Where it comes from, for messages (`inline PEM` or the path).
    pub fn describe(&self) -> String {
        match self {
            Pem::Inline(_) => "inline PEM".to_string(),
            Pem::File(path) => path.display().to_string(),
        }
    }
}

impl RemoteSpec {
    /// The address to bind.
    pub fn address(&self) -> Result<SocketAddr, Invalid> {
        parse_listen(&self.listen).map_err(|e| Invalid::from(format!("api.remote.listen: {e}")))
    }

    pub fn check(&self) -> Result<(), Invalid> {
        self.address()?;
        if self.max_connections == 0 || self.max_connections > 4096 {
            return Err(Invalid::from(format!(
                "api.remote.max_connections: {} is out of range (1 to 4096)",
                self.max_connections
            )));
        }
        Ok(())
    }
}

/// `ADDRESS:PORT`, `[V6]:PORT`, or an address alone (port [`DEFAULT_PORT`]).
fn parse_listen(text: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return Ok(addr);
    }
    let bare = text.trim_start_matches('[').trim_end_matches(']');
    bare.parse::<std::net::IpAddr>()
        .map(|ip| SocketAddr::new(ip, DEFAULT_PORT))
        .map_err(|_| format!("{text:?} is not ADDRESS:PORT or an IP address"))
}

impl ApiSpec {
    pub fn check(&self) -> Result<(), Invalid> {
        match &self.remote {
            Some(remote) => remote.check(),
            None => Ok(()),
        }
    }
}

#[derive(Deserialize)]
struct ApiOnly {
    api: Option<ApiSpec>,
}

fn parse(path: &Path, text: &str) -> Result<Option<ApiSpec>, ConfigError> {
    let doc: ApiOnly = toml::from_str(text).map_err(|e| table::located(path, text, &e))?;
    if let Some(api) = &doc.api {
        api.check()
            .map_err(|e| ConfigError(format!("{}: {e}", path.display())))?;
    }
    Ok(doc.api)
}

/// The effective `[api]` (no remote API when no layer has the table).
pub fn load(sources: &Sources) -> Result<ApiSpec, ConfigError> {
    Ok(table::load(sources, parse)?.unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    const CA: &str = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";

    fn remote(listen: &str, extra: &str) -> String {
        format!(
            "version = 1\n[api.remote]\nlisten = \"{listen}\"\nca = '''\n{CA}'''\ncert = \"/var/lib/keelson/pki/node.crt\"\nkey = \"/var/lib/keelson/pki/node.key\"\n{extra}"
        )
    }

    #[test]
    fn a_remote_table_parses_with_inline_and_file_pem() {
        let api = parse(Path::new("u.toml"), &remote("0.0.0.0:50000", ""))
            .unwrap()
            .unwrap();
        let r = api.remote.unwrap();
        assert_eq!(r.address().unwrap(), "0.0.0.0:50000".parse().unwrap());
        assert!(matches!(r.ca, Pem::Inline(ref t) if t.starts_with("-----BEGIN CERTIFICATE")));
        assert_eq!(r.cert, Pem::File("/var/lib/keelson/pki/node.crt".into()));
        assert_eq!(r.max_connections, DEFAULT_MAX_CONNECTIONS);
        let bare = parse(Path::new("u.toml"), &remote("10.0.0.2", ""))
            .unwrap()
            .unwrap();
        assert_eq!(
            bare.remote.unwrap().address().unwrap(),
            "10.0.0.2:50000".parse().unwrap()
        );
        let v6 = parse(Path::new("u.toml"), &remote("[::]", ""))
            .unwrap()
            .unwrap();
        assert_eq!(
            v6.remote.unwrap().address().unwrap(),
            "[::]:50000".parse().unwrap()
        );
    }

    #[test]
    fn bad_values_name_the_key() {
        let e = parse(Path::new("u.toml"), &remote("nowhere", ""))
            .unwrap_err()
            .0;
        assert_eq!(
            e,
            "u.toml: api.remote.listen: \"nowhere\" is not ADDRESS:PORT or an IP address"
        );
        let e = parse(
            Path::new("u.toml"),
            &remote("0.0.0.0", "max_connections = 0\n"),
        )
        .unwrap_err()
        .0;
        assert!(
            e.contains("api.remote.max_connections: 0 is out of range"),
            "{e}"
        );
        let relative = "version = 1\n[api.remote]\nlisten = \"0.0.0.0\"\nca = \"ca.crt\"\ncert = \"/c\"\nkey = \"/k\"\n";
        let e = parse(Path::new("u.toml"), relative).unwrap_err().0;
        assert!(
            e.starts_with("u.toml:4:") && e.contains("absolute path of a PEM file"),
            "{e}"
        );
        let missing = "version = 1\n[api.remote]\nlisten = \"0.0.0.0\"\n";
        let e = parse(Path::new("u.toml"), missing).unwrap_err().0;
        assert!(e.contains("missing field `ca`"), "{e}");
    }

    #[test]
    fn the_user_layer_wins_whole() {
        let dir = tempfile::tempdir().unwrap();
        let sources = Sources {
            system_dir: dir.path().join("system"),
            userdata_file: dir.path().join("userdata.toml"),
            user_file: dir.path().join("services.toml"),
        };
        assert_eq!(load(&sources).unwrap(), ApiSpec::default());
        std::fs::write(&sources.userdata_file, remote("0.0.0.0", "")).unwrap();
        assert!(load(&sources).unwrap().remote.is_some());
        std::fs::write(&sources.user_file, "version = 1\n[api]\n").unwrap();
        assert_eq!(load(&sources).unwrap().remote, None);
    }
}
