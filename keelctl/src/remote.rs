//! Reaching a node's remote API (`--node`, `--nodes`, a KEELCONFIG context): mutual TLS with
//! the operator's CA (`keelctl pki`), the node's certificate checked against it and against
//! the name keelctl dialled, keelctl's client certificate presented.
//!
//! The context file (`$KEELCONFIG`, else `~/.config/keelson/keelconfig`) is TOML:
//!
//! ```toml
//! context = "lab"                       # the one used without --context
//! [contexts.lab]
//! nodes = ["10.77.0.11", "n2:50000"]     # used when neither --node nor --nodes is given
//! ca = "pki/ca.crt"                      # paths relative to this file, or inline PEM
//! cert = "pki/clients/me.crt"
//! key = "pki/clients/me.key"
//! ```

use std::collections::BTreeMap;
use std::io;
use std::net::{TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{AlertDescription, CertificateError, ClientConfig, ClientConnection, RootCertStore};
use serde::Deserialize;

/// The port of the remote API when a node is named without one.
pub const DEFAULT_PORT: u16 = 50000;
/// How long keelctl waits for a node to accept the connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The context file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeelConfig {
    context: Option<String>,
    #[serde(default)]
    contexts: BTreeMap<String, ContextEntry>,
}

#[derive(Debug, Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
struct ContextEntry {
    #[serde(default)]
    nodes: Vec<String>,
    ca: Option<String>,
    cert: Option<String>,
    key: Option<String>,
}

/// What the command line says about remote access.
#[derive(Debug, Default, Clone)]
pub struct Flags {
    pub nodes: Vec<String>,
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub context: Option<String>,
    /// `$KEELCONFIG`, else `~/.config/keelson/keelconfig`.
    pub keelconfig: Option<PathBuf>,
    /// `--socket` or `KEELSON_SOCKET` was given: local, whatever the context says.
    pub socket_given: bool,
}

/// PEM text and where it came from (for messages).
#[derive(Debug, Clone)]
struct Pem {
    text: String,
    from: String,
}

/// The nodes to talk to and how (empty: the local socket).
#[derive(Debug)]
pub struct Remote {
    pub nodes: Vec<Node>,
}

/// One node's address and the TLS settings to reach it.
#[derive(Debug, Clone)]
pub struct Node {
    /// As the operator named it (`10.77.0.11`, `n2:50000`).
    pub name: String,
    host: String,
    port: u16,
    config: Arc<ClientConfig>,
    ca_from: String,
}

/// The nodes `flags` (and the context file) name; none when keelctl should use the socket.
pub fn resolve(flags: &Flags) -> Result<Remote> {
    let file = match &flags.keelconfig {
        Some(path) if path.exists() || flags.context.is_some() => {
            Some((path.clone(), read_config(path)?))
        }
        _ => None,
    };
    let context = match (&file, &flags.context) {
        (Some((path, cfg)), Some(name)) => {
            Some(cfg.contexts.get(name).cloned().with_context(|| {
                format!(
                    "{}: no context {name:?} (contexts: {})",
                    path.display(),
                    cfg.contexts.keys().cloned().collect::<Vec<_>>().join(", ")
                )
            })?)
        }
        (Some((path, cfg)), None) => match &cfg.context {
            Some(name) => Some(cfg.contexts.get(name).cloned().with_context(|| {
                format!(
                    "{}: context = {name:?} names no [contexts.{name}]",
                    path.display()
                )
            })?),
            None => None,
        },
        (None, _) => None,
    };
    let base = file
        .as_ref()
        .and_then(|(p, _)| p.parent())
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let mut nodes = flags.nodes.clone();
    if nodes.is_empty() && !flags.socket_given {
        nodes = context
            .as_ref()
            .map(|c| c.nodes.clone())
            .unwrap_or_default();
    }
    if nodes.is_empty() {
        if flags.ca.is_some() || flags.cert.is_some() || flags.key.is_some() {
            bail!("--ca, --cert and --key are for a remote node: name it with --node HOST[:PORT]");
        }
        return Ok(Remote { nodes: Vec::new() });
    }
    let ctx = context.unwrap_or_default();
    let pick = |flag: &Option<PathBuf>, from_ctx: &Option<String>, what: &str| -> Result<Pem> {
        if let Some(path) = flag {
            return read_pem(path);
        }
        match from_ctx {
            Some(value) if value.trim_start().starts_with("-----BEGIN ") => Ok(Pem {
                text: value.clone(),
                from: format!("the context's inline {what}"),
            }),
            Some(value) => read_pem(&base.join(value)),
            None => bail!(
                "reaching a node needs --ca, --cert and --key, or a context in {} that has them: {what} is missing",
                flags
                    .keelconfig
                    .as_ref()
                    .map_or("KEELCONFIG".into(), |p| p.display().to_string())
            ),
        }
    };
    let ca = pick(&flags.ca, &ctx.ca, "ca")?;
    let cert = pick(&flags.cert, &ctx.cert, "cert")?;
    let key = pick(&flags.key, &ctx.key, "key")?;
    let config = Arc::new(client_config(&ca, &cert, &key)?);
    let nodes = nodes
        .iter()
        .map(|n| {
            let (host, port) = split_host_port(n)?;
            Ok(Node {
                name: n.clone(),
                host,
                port,
                config: Arc::clone(&config),
                ca_from: ca.from.clone(),
            })
        })
        .collect::<Result<_>>()?;
    Ok(Remote { nodes })
}

fn read_config(path: &Path) -> Result<KeelConfig> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {}", path.display(), e.message()))
}

fn read_pem(path: &Path) -> Result<Pem> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(Pem {
        text,
        from: path.display().to_string(),
    })
}

/// `host`, `host:port`, `[v6]:port`, `v6`.
fn split_host_port(text: &str) -> Result<(String, u16)> {
    if let Some(rest) = text.strip_prefix('[') {
        let (host, after) = rest
            .split_once(']')
            .with_context(|| format!("node {text:?}: no ']' after an IPv6 address"))?;
        let port = match after.strip_prefix(':') {
            Some(p) => parse_port(text, p)?,
            None if after.is_empty() => DEFAULT_PORT,
            None => bail!("node {text:?}: expected ':PORT' after ']'"),
        };
        return Ok((host.to_string(), port));
    }
    if text.parse::<std::net::Ipv6Addr>().is_ok() {
        return Ok((text.to_string(), DEFAULT_PORT));
    }
    match text.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() => Ok((host.to_string(), parse_port(text, port)?)),
        Some(_) => bail!("node {text:?}: no host"),
        None if text.is_empty() => bail!("an empty node name"),
        None => Ok((text.to_string(), DEFAULT_PORT)),
    }
}

fn parse_port(node: &str, port: &str) -> Result<u16> {
    port.parse()
        .ok()
        .filter(|p| *p != 0)
        .with_context(|| format!("node {node:?}: {port:?} is not a port"))
}

fn client_config(ca: &Pem, cert: &Pem, key: &Pem) -> Result<ClientConfig> {
    let certs = |pem: &Pem| -> Result<Vec<CertificateDer<'static>>> {
        let certs = CertificateDer::pem_slice_iter(pem.text.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| anyhow::anyhow!("{}: not PEM certificates ({e})", pem.from))?;
        if certs.is_empty() {
            bail!("{}: no certificate in it", pem.from);
        }
        Ok(certs)
    };
    let mut roots = RootCertStore::empty();
    for ca_cert in certs(ca)? {
        roots
            .add(ca_cert)
            .map_err(|e| anyhow::anyhow!("{}: not a usable CA certificate ({e})", ca.from))?;
    }
    let chain = certs(cert)?;
    let private = PrivateKeyDer::from_pem_slice(key.text.as_bytes())
        .map_err(|e| anyhow::anyhow!("{}: not a PEM private key ({e})", key.from))?;
    // ring, not aws-lc: see the workspace Cargo.toml (per-process DRBG seeding cost).
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS versions")?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, private)
        .map_err(|e| {
            anyhow::anyhow!(
                "{} and {} do not make a client identity: {e}",
                cert.from,
                key.from
            )
        })?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// A TLS connection to a node, handshake done (the node's certificate checked).
pub type TlsStream = rustls::StreamOwned<ClientConnection, TcpStream>;

impl Node {
    /// Connects and completes the TLS handshake; errors name the node and say why.
    pub fn connect(&self) -> Result<TlsStream> {
        let addrs: Vec<_> = (self.host.as_str(), self.port)
            .to_socket_addrs()
            .with_context(|| format!("node {}: cannot resolve {}", self.name, self.host))?
            .collect();
        let mut last = None;
        let mut tcp = None;
        for addr in &addrs {
            match TcpStream::connect_timeout(addr, CONNECT_TIMEOUT) {
                Ok(s) => {
                    tcp = Some(s);
                    break;
                }
                Err(e) => last = Some(e),
            }
        }
        let tcp = tcp.ok_or_else(|| {
            let why = last.map_or("no address".to_string(), |e| e.to_string());
            anyhow::anyhow!(
                "cannot reach node {} at {}:{}: {why} (is [api.remote] enabled on it?)",
                self.name,
                self.host,
                self.port
            )
        })?;
        let _ = tcp.set_nodelay(true);
        let server_name = ServerName::try_from(self.host.clone()).map_err(|_| {
            anyhow::anyhow!("node {}: {:?} is not a host name", self.name, self.host)
        })?;
        let conn = ClientConnection::new(Arc::clone(&self.config), server_name)
            .with_context(|| format!("node {}: TLS setup", self.name))?;
        let mut stream = rustls::StreamOwned::new(conn, tcp);
        while stream.conn.is_handshaking() {
            stream
                .conn
                .complete_io(&mut stream.sock)
                .map_err(|e| self.explain(&e))?;
        }
        Ok(stream)
    }

    /// An I/O error on this node's connection, in words: what TLS refused and what to check.
    pub fn explain(&self, err: &io::Error) -> anyhow::Error {
        let node = &self.name;
        let tls = err
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>());
        let Some(tls) = tls else {
            return anyhow::anyhow!("node {node}: {err}");
        };
        let text = match tls {
            rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer) => format!(
                "node {node}: its certificate is not signed by the CA keelctl trusts ({}): wrong CA, or not a node of this PKI",
                self.ca_from
            ),
            rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            ) => format!(
                "node {node}: its certificate is not valid for {:?} (issue it with --ip/--dns for the name you dial)",
                self.host
            ),
            rustls::Error::InvalidCertificate(
                CertificateError::Expired | CertificateError::ExpiredContext { .. },
            ) => format!("node {node}: its certificate has expired"),
            rustls::Error::InvalidCertificate(other) => {
                format!("node {node}: its certificate is refused: {other:?}")
            }
            rustls::Error::AlertReceived(AlertDescription::CertificateRequired) => format!(
                "node {node} refused keelctl: it requires a client certificate"
            ),
            rustls::Error::AlertReceived(
                alert @ (AlertDescription::BadCertificate
                | AlertDescription::UnknownCA
                | AlertDescription::CertificateExpired
                | AlertDescription::CertificateUnknown
                | AlertDescription::DecryptError),
            ) => format!(
                "node {node} refused keelctl's client certificate ({alert:?}): is it signed by the node's CA and still valid?"
            ),
            other => format!("node {node}: TLS: {other}"),
        };
        anyhow::anyhow!(text)
    }
}

/// `$KEELCONFIG`, else `$HOME/.config/keelson/keelconfig`.
pub fn default_keelconfig() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("KEELCONFIG").filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(path));
    }
    std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".config/keelson/keelconfig"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_and_port() {
        assert_eq!(
            split_host_port("10.0.0.1").unwrap(),
            ("10.0.0.1".into(), 50000)
        );
        assert_eq!(split_host_port("n1:4443").unwrap(), ("n1".into(), 4443));
        assert_eq!(split_host_port("[::1]:7").unwrap(), ("::1".into(), 7));
        assert_eq!(
            split_host_port("fe80::1").unwrap(),
            ("fe80::1".into(), 50000)
        );
        assert_eq!(
            split_host_port("n1:x").unwrap_err().to_string(),
            "node \"n1:x\": \"x\" is not a port"
        );
    }

    #[test]
    fn without_nodes_keelctl_stays_local_and_flags_alone_are_an_error() {
        let none = resolve(&Flags::default()).unwrap();
        assert!(none.nodes.is_empty());
        let flags = Flags {
            ca: Some("/ca.crt".into()),
            ..Flags::default()
        };
        assert!(resolve(&flags)
            .unwrap_err()
            .to_string()
            .contains("--node HOST[:PORT]"));
        let flags = Flags {
            nodes: vec!["n1".into()],
            keelconfig: Some("/nonexistent/keelconfig".into()),
            ..Flags::default()
        };
        assert_eq!(
            resolve(&flags).unwrap_err().to_string(),
            "reaching a node needs --ca, --cert and --key, or a context in /nonexistent/keelconfig that has them: ca is missing"
        );
    }

    #[test]
    fn a_context_names_nodes_and_credentials_relative_to_its_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("keelconfig");
        std::fs::write(
            &file,
            "context = \"lab\"\n[contexts.lab]\nnodes = [\"n1\", \"n2:7\"]\nca = \"pki/ca.crt\"\ncert = \"pki/me.crt\"\nkey = \"pki/me.key\"\n",
        )
        .unwrap();
        let flags = Flags {
            keelconfig: Some(file.clone()),
            ..Flags::default()
        };
        let e = format!("{:#}", resolve(&flags).unwrap_err());
        assert_eq!(
            e,
            format!(
                "reading {}: No such file or directory (os error 2)",
                dir.path().join("pki/ca.crt").display()
            )
        );
        let local = Flags {
            keelconfig: Some(file.clone()),
            socket_given: true,
            ..Flags::default()
        };
        assert!(resolve(&local).unwrap().nodes.is_empty());
        let unknown = Flags {
            keelconfig: Some(file),
            context: Some("prod".into()),
            ..Flags::default()
        };
        assert!(resolve(&unknown)
            .unwrap_err()
            .to_string()
            .ends_with("no context \"prod\" (contexts: lab)"));
    }
}
