//! `[metrics]` and `[logging]`: how the node is watched from off the node (docs/observability.md).
//! Like `[update]`, a layer's table replaces the lower ones whole (user file, then user data,
//! then system files); the two tables are layered independently.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::units::Size;
use super::{table, ConfigError, Sources};
use crate::Invalid;

/// The `[metrics]` table: Prometheus's `/metrics`, off unless `listen` is given.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsSpec {
    /// `ADDRESS:PORT` the exporter binds (`0.0.0.0:9100`); absent: no exporter.
    pub listen: Option<SocketAddr>,
    /// `[metrics.tls]`: serve `/metrics` over HTTPS instead of plain HTTP.
    pub tls: Option<MetricsTls>,
}

/// `[metrics.tls]`: the exporter's certificate, and optionally the CA whose client certificates
/// alone may scrape (Prometheus's `tls_config` `cert_file`/`key_file`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsTls {
    /// The node's certificate chain (inline PEM or an absolute path).
    pub cert: crate::api::Pem,
    /// Its private key.
    pub key: crate::api::Pem,
    /// When given, only clients with a certificate signed by this CA are answered.
    pub client_ca: Option<crate::api::Pem>,
}

/// The `[logging]` table.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoggingSpec {
    /// `[logging.forward]`: a syslog receiver every line is sent to; absent: nothing leaves.
    pub forward: Option<ForwardSpec>,
}

/// How forwarded lines travel.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Transport {
    /// RFC 6587 octet-counted frames over plain TCP.
    #[default]
    Tcp,
    /// RFC 5425: the same frames inside TLS.
    Tls,
}

/// The default on-disk buffer while the receiver is away.
pub const DEFAULT_BUFFER: Size = Size(64 << 20);

/// `[logging.forward]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForwardSpec {
    /// The receiver: `HOST:PORT` (a name or an address).
    pub target: String,
    #[serde(default)]
    pub transport: Transport,
    /// PEM CA certificate(s) the receiver's certificate must chain to (`tls`, required).
    pub ca_file: Option<PathBuf>,
    /// The name checked in the receiver's certificate (`tls`; default: the target's host).
    pub server_name: Option<String>,
    /// Largest on-disk buffer (on /var) kept while the receiver is away or slow; lines that
    /// do not fit are dropped and counted.
    #[serde(default = "default_buffer")]
    pub buffer_size: Size,
    /// Forward sysd's events (app-name `sysd`).
    #[serde(default = "yes")]
    pub events: bool,
    /// Services whose output is not forwarded.
    #[serde(default)]
    pub exclude: Vec<String>,
}

fn default_buffer() -> Size {
    DEFAULT_BUFFER
}

fn yes() -> bool {
    true
}

impl ForwardSpec {
    /// The target's host and port.
    pub fn host_port(&self) -> Result<(&str, u16), Invalid> {
        let bad = || {
            Invalid::from(format!(
                "logging.forward.target: {:?} is not HOST:PORT",
                self.target
            ))
        };
        let (host, port) = self.target.rsplit_once(':').ok_or_else(bad)?;
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        let port: u16 = port.parse().map_err(|_| bad())?;
        if host.is_empty() || port == 0 {
            return Err(bad());
        }
        Ok((host, port))
    }

    pub fn check(&self) -> Result<(), Invalid> {
        self.host_port()?;
        match self.transport {
            Transport::Tls if self.ca_file.is_none() => {
                return Err(Invalid::from(
                    "logging.forward: transport = \"tls\" needs ca_file (the receiver's CA)"
                        .to_string(),
                ))
            }
            Transport::Tcp if self.ca_file.is_some() || self.server_name.is_some() => {
                return Err(Invalid::from(
                    "logging.forward: ca_file and server_name are for transport = \"tls\""
                        .to_string(),
                ))
            }
            _ => {}
        }
        if let Some(ca) = &self.ca_file {
            if !ca.is_absolute() {
                return Err(Invalid::from(format!(
                    "logging.forward.ca_file: {} is not an absolute path",
                    ca.display()
                )));
            }
        }
        if self.buffer_size.0 < (1 << 20) {
            return Err(Invalid::from(format!(
                "logging.forward.buffer_size: {} is below the smallest buffer, 1M",
                self.buffer_size
            )));
        }
        for (i, name) in self.exclude.iter().enumerate() {
            if name.is_empty() || self.exclude[..i].contains(name) {
                return Err(Invalid::from(format!(
                    "logging.forward.exclude[{i}]: {name:?} is empty or listed twice"
                )));
            }
        }
        Ok(())
    }
}

impl LoggingSpec {
    pub fn check(&self) -> Result<(), Invalid> {
        self.forward.as_ref().map_or(Ok(()), ForwardSpec::check)
    }
}

#[derive(Deserialize)]
struct MetricsOnly {
    metrics: Option<MetricsSpec>,
}

#[derive(Deserialize)]
struct LoggingOnly {
    logging: Option<LoggingSpec>,
}

fn parse_metrics(path: &Path, text: &str) -> Result<Option<MetricsSpec>, ConfigError> {
    let doc: MetricsOnly = toml::from_str(text).map_err(|e| table::located(path, text, &e))?;
    Ok(doc.metrics)
}

fn parse_logging(path: &Path, text: &str) -> Result<Option<LoggingSpec>, ConfigError> {
    let doc: LoggingOnly = toml::from_str(text).map_err(|e| table::located(path, text, &e))?;
    if let Some(l) = &doc.logging {
        l.check()
            .map_err(|e| ConfigError(format!("{}: {e}", path.display())))?;
    }
    Ok(doc.logging)
}

/// What watching the node takes: both tables, each from the highest layer that has it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ObserveSpec {
    pub metrics: MetricsSpec,
    pub logging: LoggingSpec,
}

/// The effective `[metrics]` and `[logging]` (both off when no layer has them).
pub fn load(sources: &Sources) -> Result<ObserveSpec, ConfigError> {
    Ok(ObserveSpec {
        metrics: table::load(sources, parse_metrics)?.unwrap_or_default(),
        logging: table::load(sources, parse_logging)?.unwrap_or_default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logging(text: &str) -> Result<Option<LoggingSpec>, ConfigError> {
        parse_logging(Path::new("u.toml"), &format!("version = 1\n{text}"))
    }

    #[test]
    fn forward_tables_are_checked() {
        let f = logging("[logging.forward]\ntarget = \"10.0.2.2:6514\"\nexclude = [\"noisy\"]\n")
            .unwrap()
            .unwrap()
            .forward
            .unwrap();
        assert_eq!(f.host_port().unwrap(), ("10.0.2.2", 6514));
        assert_eq!(
            (f.transport, f.buffer_size, f.events),
            (Transport::Tcp, DEFAULT_BUFFER, true)
        );
        let e = logging("[logging.forward]\ntarget = \"logs\"\n")
            .unwrap_err()
            .0;
        assert_eq!(
            e,
            "u.toml: logging.forward.target: \"logs\" is not HOST:PORT"
        );
        let e = logging("[logging.forward]\ntarget = \"logs:6514\"\ntransport = \"tls\"\n")
            .unwrap_err()
            .0;
        assert!(e.contains("needs ca_file"), "{e}");
        let e = logging("[logging.forward]\ntarget = \"[::1]:6514\"\nbuffer_size = \"4K\"\n")
            .unwrap_err()
            .0;
        assert!(e.contains("buffer_size: 4096 is below"), "{e}");
        let e = logging("[logging.forward]\ntarget = \"a:1\"\ntransport = \"udp\"\n")
            .unwrap_err()
            .0;
        assert!(e.starts_with("u.toml:4:") && e.contains("udp"), "{e}");
    }

    #[test]
    fn the_tables_are_layered_independently() {
        let dir = tempfile::tempdir().unwrap();
        let sources = Sources {
            system_dir: dir.path().join("system"),
            userdata_file: dir.path().join("userdata.toml"),
            user_file: dir.path().join("services.toml"),
        };
        assert_eq!(load(&sources).unwrap(), ObserveSpec::default());
        std::fs::write(
            &sources.userdata_file,
            "version = 1\n[metrics]\nlisten = \"0.0.0.0:9100\"\n",
        )
        .unwrap();
        std::fs::write(
            &sources.user_file,
            "version = 1\n[logging.forward]\ntarget = \"logs:601\"\n",
        )
        .unwrap();
        let spec = load(&sources).unwrap();
        assert_eq!(spec.metrics.listen.unwrap().port(), 9100);
        assert_eq!(spec.logging.forward.unwrap().target, "logs:601");
        std::fs::write(
            &sources.user_file,
            "version = 1\n[metrics]\nlisten = \"nowhere\"\n",
        )
        .unwrap();
        assert!(load(&sources)
            .unwrap_err()
            .0
            .starts_with(&format!("{}:3:", sources.user_file.display())));
    }
}
