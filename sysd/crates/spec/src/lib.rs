//! The declarative service config: TOML files with a versioned schema (`version = 1`),
//! documented in `docs/config.md`.
//!
//! Two sources make the effective config: system services baked into the image
//! (`/usr/lib/keelson/services.d/*.toml`, protected by dm-verity) and the user's config
//! (`/var/lib/keelson/services.toml`, replaced whole by `keelctl apply`). A name may appear only
//! once across both. Everything is checked before anything is used: unknown keys and bad values
//! are reported by the parser with file:line:col and the key path; cross-service problems
//! (unknown dependency, dependency cycle) name the services involved. A config that fails
//! validation is never partially applied.
//!
//! Modules: [`units`] (durations, sizes, signals, capabilities, host names), [`network`] (the
//! `[network]`/`[host]` tables), [`registries`] (`registries.toml`), [`update`] (the `[update]`
//! table), [`api`] (`[api.remote]`), [`admin`] (`[admin]` keys), [`reference`] (what a service's `image` names: a path to
//! a root file system or OCI image layout, or a registry reference).
//!
//! This crate knows nothing of containers, images on disk, the network or the API: it turns
//! text into checked values.

pub mod admin;
pub mod api;
pub mod extensions;
pub mod network;
pub mod observe;
pub mod reference;
pub mod registries;
mod table;
pub mod units;
pub mod update;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};

use keelson_common::error::{self, Classify};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub use admin::Admin;
pub use units::{Capability, CpuQuota, SignalName, Size, Span};

/// The schema version this sysd writes (`keelctl config show`); it reads 1 and 2.
///
/// Version 2 differs in one default: a service without `network` is on the bridge (`keel0`),
/// as Docker's containers are, instead of the host's network (version 1's default, kept for
/// the configs written for it: an OS update must not move a running service off the host's
/// ports). Issue 20's review: on the host network any service could sniff or spoof the
/// node's traffic and reach the metadata service.
pub const SCHEMA_VERSION: u32 = 2;
/// The oldest schema version still read.
pub const OLDEST_SCHEMA_VERSION: u32 = 1;

/// One config file as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    version: u32,
    #[serde(default)]
    services: BTreeMap<String, toml::Spanned<ServiceSpec>>,
    network: Option<network::NetworkSpec>,
    host: Option<network::HostSpec>,
    #[serde(default)]
    registries: BTreeMap<String, toml::Spanned<registries::Registry>>,
    /// The update agent's policy (`spec::update`).
    update: Option<update::UpdateSpec>,
    /// The engine extensions the node runs (`spec::extensions`).
    extensions: Option<extensions::ExtensionsSpec>,
    /// sysd's API on the network (`spec::api`).
    api: Option<api::ApiSpec>,
    /// The Prometheus exporter (`spec::observe`; parsed here so a bad table is refused with
    /// the file's other errors, and layered by `observe::load`).
    #[allow(dead_code)]
    metrics: Option<observe::MetricsSpec>,
    /// Log forwarding (`spec::observe`).
    logging: Option<observe::LoggingSpec>,
    /// Changes to system services (`[overrides.NAME]`).
    /// (Not `Spanned`: toml cannot span a table defined only through its sub-tables, as
    /// `[overrides.etcd.env]` alone does; the position is found in the text instead.)
    #[serde(default)]
    overrides: BTreeMap<String, Override>,
    admin: Option<toml::Spanned<Admin>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    #[default]
    Service,
    /// Runs to completion before its dependents start (LinuxKit's `onboot`).
    Oneshot,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RestartPolicy {
    Always,
    OnFailure,
    Never,
}

impl RestartPolicy {
    /// As written in the config.
    pub fn as_str(self) -> &'static str {
        match self {
            RestartPolicy::Always => "always",
            RestartPolicy::OnFailure => "on-failure",
            RestartPolicy::Never => "never",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Network {
    /// The host's network namespace (the default of `version = 1` files; `version = 2`
    /// defaults to [`Network::Bridge`], see [`SCHEMA_VERSION`]).
    #[default]
    Host,
    /// A private network namespace with only loopback.
    None,
    /// A private network namespace on Keelson's bridge (`keel0`): an address from
    /// `[network.bridge]`, kept across restarts; outbound traffic masqueraded; `ports`
    /// published; the other bridge services by name in /etc/hosts (`docs/network.md`).
    Bridge,
    /// `service:NAME`: the network namespace of service NAME's running container (a pod);
    /// an implicit `requires` on NAME.
    Service(String),
}

impl Network {
    /// The service whose network namespace this one joins (`service:NAME`).
    pub fn joined(&self) -> Option<&str> {
        match self {
            Network::Service(name) => Some(name),
            _ => None,
        }
    }
}

impl TryFrom<String> for Network {
    type Error = Invalid;

    fn try_from(s: String) -> Result<Self, Invalid> {
        match s.as_str() {
            "host" => Ok(Network::Host),
            "none" => Ok(Network::None),
            "bridge" => Ok(Network::Bridge),
            _ => match s.strip_prefix("service:") {
                Some(name) if !name.is_empty() => Ok(Network::Service(name.to_string())),
                _ => Err(Invalid::from(format!(
                    "unknown network {s:?}, expected \"host\", \"none\", \"bridge\" or \"service:NAME\""
                ))),
            },
        }
    }
}

impl From<Network> for String {
    fn from(n: Network) -> String {
        match n {
            Network::Host => "host".into(),
            Network::None => "none".into(),
            Network::Bridge => "bridge".into(),
            Network::Service(name) => format!("service:{name}"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PidMode {
    /// Its own pid namespace: the service's main process is pid 1 there.
    #[default]
    Private,
    /// The host's pid namespace (sees every process of the node).
    Host,
}

/// A mount into the container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case", deny_unknown_fields)]
pub enum MountSpec {
    /// A named volume: a directory under `/var/lib/keelson/volumes/NAME`, created on first use,
    /// kept across restarts, updates and reboots.
    Volume {
        source: String,
        target: String,
        #[serde(default)]
        readonly: bool,
    },
    /// A host path.
    Bind {
        source: String,
        target: String,
        #[serde(default)]
        readonly: bool,
    },
    Tmpfs {
        target: String,
        size: Option<Size>,
        /// Octal permission bits as a string, e.g. "1777".
        mode: Option<String>,
    },
}

impl MountSpec {
    pub fn target(&self) -> &str {
        match self {
            MountSpec::Volume { target, .. }
            | MountSpec::Bind { target, .. }
            | MountSpec::Tmpfs { target, .. } => target,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    pub memory_max: Option<Size>,
    pub cpu_weight: Option<u64>,
    pub cpu_quota: Option<CpuQuota>,
    pub pids_max: Option<u64>,
    pub io_weight: Option<u64>,
}

/// A readiness or health check: exactly one of `exec`, `tcp`, `http`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Check {
    /// A command run inside the container; exit status 0 passes.
    pub exec: Option<Vec<String>>,
    /// `HOST:PORT` to connect to, from the service's network namespace.
    pub tcp: Option<String>,
    /// `http://HOST:PORT/PATH`, from the service's network namespace; a 2xx or 3xx passes.
    pub http: Option<String>,
    #[serde(default = "default_interval")]
    pub interval: Span,
    #[serde(default = "default_timeout")]
    pub timeout: Span,
    /// Consecutive failures that count as failed.
    #[serde(default = "default_retries")]
    pub retries: u32,
    /// Failures during this time after start do not count.
    #[serde(default = "default_start_period")]
    pub start_period: Span,
}

fn default_interval() -> Span {
    Span(std::time::Duration::from_secs(2))
}
fn default_timeout() -> Span {
    Span(std::time::Duration::from_secs(1))
}
fn default_retries() -> u32 {
    3
}
fn default_start_period() -> Span {
    Span(std::time::Duration::ZERO)
}
fn default_stop_timeout() -> Span {
    Span(std::time::Duration::from_secs(10))
}
fn default_stop_signal() -> SignalName {
    SignalName(nix::sys::signal::Signal::SIGTERM)
}

/// The probe a [`Check`] runs, once validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    Exec(Vec<String>),
    Tcp {
        host: String,
        port: u16,
    },
    Http {
        host: String,
        port: u16,
        path: String,
    },
}

impl Check {
    pub fn probe(&self) -> Result<Probe, Invalid> {
        match (&self.exec, &self.tcp, &self.http) {
            (Some(argv), None, None) => {
                if argv.is_empty() || argv[0].is_empty() {
                    return Err(Invalid::from("exec: the command is empty"));
                }
                Ok(Probe::Exec(argv.clone()))
            }
            (None, Some(addr), None) => {
                let (host, port) = split_host_port(addr).map_err(|e| format!("tcp: {e}"))?;
                Ok(Probe::Tcp { host, port })
            }
            (None, None, Some(url)) => {
                let rest = url.strip_prefix("http://").ok_or_else(|| {
                    format!("http: {url:?} must start with http:// (https is not supported)")
                })?;
                let (authority, path) = match rest.find('/') {
                    Some(i) => (&rest[..i], rest[i..].to_string()),
                    None => (rest, "/".to_string()),
                };
                let (host, port) = if authority.contains(':') {
                    split_host_port(authority).map_err(|e| format!("http: {e}"))?
                } else {
                    (authority.to_string(), 80)
                };
                Ok(Probe::Http { host, port, path })
            }
            _ => Err(Invalid::from("set exactly one of `exec`, `tcp`, `http`")),
        }
    }
}

fn split_host_port(s: &str) -> Result<(String, u16), Invalid> {
    let (host, port) = s
        .rsplit_once(':')
        .ok_or_else(|| format!("{s:?} is not HOST:PORT"))?;
    let port: u16 = port
        .parse()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("{s:?}: invalid port"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(Invalid::from(format!("{s:?}: empty host")));
    }
    Ok((host.to_string(), port))
}

/// One service as written in the config.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceSpec {
    /// A root file system directory or an OCI image layout directory (absolute path), or a
    /// registry reference (`busybox:1.36`, `host:5000/app@sha256:…`) pulled into the image
    /// store on demand.
    pub image: String,
    #[serde(default)]
    pub kind: Kind,
    /// Replaces the image's entrypoint.
    pub entrypoint: Option<Vec<String>>,
    /// Replaces the image's command (the arguments after the entrypoint).
    pub command: Option<Vec<String>>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    pub workdir: Option<String>,
    /// `NAME`, `UID`, `NAME:GROUP` or `UID:GID`, resolved in the image's /etc/passwd and
    /// /etc/group.
    pub user: Option<String>,
    #[serde(default)]
    pub groups: Vec<String>,
    #[serde(default)]
    pub mounts: Vec<MountSpec>,
    #[serde(default)]
    pub network: Network,
    /// Published ports, `HOST:CONTAINER[/tcp|/udp]` (bridge network only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<String>,
    #[serde(default)]
    pub pid: PidMode,
    /// Run the command under a minimal init that forwards signals and reaps zombies
    /// (Docker's `--init`): for programs that do not expect to be pid 1.
    #[serde(default)]
    pub init: bool,
    #[serde(default)]
    pub cap_add: Vec<Capability>,
    #[serde(default)]
    pub cap_drop: Vec<Capability>,
    #[serde(default)]
    pub privileged: bool,
    #[serde(default)]
    pub user_namespace: bool,
    /// The node agent contract (docs/node-agent.md), named after systemd's `Delegate=`: the
    /// service's cgroup is its own to manage. It gets its cgroup namespace with a writable
    /// cgroupfs at /sys/fs/cgroup, may create child cgroups there and enable controllers in
    /// them: for a system service that is itself a container engine (dockerd, containerd).
    /// Only system and extension services may set it.
    #[serde(default, skip_serializing_if = "is_false")]
    pub delegate: bool,
    #[serde(default)]
    pub resources: Resources,
    /// Default: `always` for services, `never` for one-shot tasks.
    pub restart: Option<RestartPolicy>,
    /// With `restart = "on-failure"`: give up after this many consecutive failed runs.
    pub max_retries: Option<u32>,
    /// Start after these are ready (or have given up); ordering only.
    #[serde(default)]
    pub after: Vec<String>,
    /// Start only once these are ready; stop when they are stopped or have failed for good.
    #[serde(default)]
    pub requires: Vec<String>,
    /// Until it passes, the service is `starting`; dependents wait for it.
    pub ready: Option<Check>,
    /// Run after ready; `retries` consecutive failures mark it unhealthy and restart it.
    pub health: Option<Check>,
    #[serde(default = "default_stop_signal")]
    pub stop_signal: SignalName,
    #[serde(default = "default_stop_timeout")]
    pub stop_timeout: Span,
    /// The update health gate waits for every critical service to be running.
    #[serde(default)]
    pub critical: bool,
    /// Disabled services are validated but not started until `keelctl start`.
    #[serde(default = "yes")]
    pub enabled: bool,
}

fn yes() -> bool {
    true
}

fn is_false(b: &bool) -> bool {
    !*b
}

impl ServiceSpec {
    pub fn restart_policy(&self) -> RestartPolicy {
        self.restart.unwrap_or(match self.kind {
            Kind::Service => RestartPolicy::Always,
            Kind::Oneshot => RestartPolicy::Never,
        })
    }

    /// Both kinds of dependency, without duplicates.
    pub fn dependencies(&self) -> BTreeSet<&str> {
        self.after
            .iter()
            .map(String::as_str)
            .chain(self.requirements())
            .collect()
    }

    /// `requires`, plus the service whose network namespace this one joins (`service:NAME`).
    pub fn requirements(&self) -> impl Iterator<Item = &str> {
        let joined = self
            .network
            .joined()
            .filter(|n| !self.requires.iter().any(|r| r == n));
        self.requires.iter().map(String::as_str).chain(joined)
    }

    /// Short content hash: equal exactly when the service would run the same way.
    pub fn hash(&self) -> String {
        let json = serde_json::to_vec(self).unwrap_or_default();
        let digest = Sha256::digest(&json);
        hex::encode(&digest[..6])
    }
}

/// Where a service's definition comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// Baked into the image.
    System,
    /// From first-boot user data.
    UserData,
    /// From `keelctl apply` (the API).
    User,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::System => "system",
            Source::UserData => "user-data",
            Source::User => "user",
        }
    }
}

/// A validated service with where it was defined.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    pub name: String,
    pub spec: ServiceSpec,
    pub source: Source,
    /// `file:line:col` of its table, for messages.
    pub origin: String,
}

/// The effective, validated config: every service by name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Config {
    pub services: BTreeMap<String, Service>,
    /// `[network]` and `[host]` (the user's file wins over the image's, table by table).
    pub net: network::NetConfig,
    /// `[registries."HOST"]` of the user's config (see [`registries`]).
    pub registries: registries::Registries,
    /// The effective `[admin]` table and where it was written (`None`: nowhere).
    pub admin: Admin,
    pub admin_origin: Option<String>,
}

/// `[overrides.NAME]`: what a user layer may change of a system service (an extension's
/// included), like a systemd drop-in: turn it on or off, and set environment variables (merged
/// over the service's own, key by key). Everything else stays the image's.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Override {
    pub enabled: Option<bool>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
}

/// One parsed file: its services and its other tables.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Document {
    pub services: Vec<Service>,
    /// `[overrides.NAME]`, each with its `file:line:col`.
    pub overrides: Vec<(String, Override, String)>,
    /// `[admin]`, with its `file:line:col`.
    pub admin: Option<(Admin, String)>,
    /// `[network]`/`[host]`, if the file has either.
    pub net: Option<network::NetConfig>,
}

/// A value that fails its check, phrased for a person: what is wrong and what is expected
/// (the callers add where).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Invalid(pub String);

impl From<String> for Invalid {
    fn from(message: String) -> Self {
        Invalid(message)
    }
}

impl From<&str> for Invalid {
    fn from(message: &str) -> Self {
        Invalid(message.to_string())
    }
}

/// For the callers that fold the text into a message of their own.
impl From<Invalid> for String {
    fn from(e: Invalid) -> Self {
        e.0
    }
}

impl Classify for Invalid {
    fn kind(&self) -> error::Kind {
        error::Kind::Invalid
    }
}

impl Classify for ConfigError {
    fn kind(&self) -> error::Kind {
        error::Kind::Invalid
    }
}

/// A config problem, already phrased for a person: where, what, and what is expected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError(pub String);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

/// The system services directory in the image.
pub const SYSTEM_DIR: &str = "/usr/lib/keelson/services.d";
/// The layer first boot writes from user data (see `firstboot`).
pub const USERDATA_FILE: &str = "/var/lib/keelson/user-data.toml";
/// The user's config, replaced by `apply`.
pub const USER_FILE: &str = "/var/lib/keelson/services.toml";

/// Parses one file's text into services (no cross-file checks yet).
pub fn parse_file(path: &Path, text: &str, source: Source) -> Result<Vec<Service>, ConfigError> {
    parse_document(path, text, source).map(|d| d.services)
}

/// The `[network]` and `[host]` tables of one file, checked, if it has either.
pub fn parse_net(path: &Path, text: &str) -> Result<Option<network::NetConfig>, ConfigError> {
    parse_document(path, text, Source::User).map(|d| d.net)
}

/// Parses one file's text into its services and tables (no cross-file checks yet).
pub fn parse_document(path: &Path, text: &str, source: Source) -> Result<Document, ConfigError> {
    let shown = path.display();
    // serde_path_to_error names the key (`services.web.resources.memory_max`) that toml's own
    // error only points at.
    let file: File =
        serde_path_to_error::deserialize(toml::Deserializer::new(text)).map_err(|e| {
            // Spanned's private wrapper key is not part of what the user wrote.
            let key = e
                .path()
                .to_string()
                .split('.')
                .filter(|k| !k.starts_with("$__"))
                .collect::<Vec<_>>()
                .join(".");
            let e = e.into_inner();
            let (line, col) = e.span().map(|s| line_col(text, s.start)).unwrap_or((1, 1));
            let key = if key.is_empty() || key == "." {
                String::new()
            } else {
                format!("{key}: ")
            };
            ConfigError(format!("{shown}:{line}:{col}: {key}{}", e.message()))
        })?;
    if !(OLDEST_SCHEMA_VERSION..=SCHEMA_VERSION).contains(&file.version) {
        return Err(ConfigError(format!(
            "{shown}: version = {} is not supported (this sysd reads version = {OLDEST_SCHEMA_VERSION} to {SCHEMA_VERSION})",
            file.version
        )));
    }
    let mut file = file;
    if file.version >= 2 {
        // Which services left `network` out (the parsed spec cannot tell: it has a default).
        let raw: toml::Table =
            toml::from_str(text).map_err(|e| ConfigError(format!("{shown}: {}", e.message())))?;
        let services = raw.get("services").and_then(|s| s.as_table());
        for (name, spanned) in file.services.iter_mut() {
            let written = services
                .and_then(|t| t.get(name))
                .and_then(|s| s.as_table())
                .is_some_and(|t| t.contains_key("network"));
            if !written {
                spanned.get_mut().network = Network::Bridge;
            }
        }
    }
    let net = if file.network.is_some() || file.host.is_some() {
        // Where the tables start (a Spanned wrapper does not survive serde_path_to_error's
        // option handling), for the message.
        let at = ["[network", "network", "[host", "host"]
            .iter()
            .find_map(|k| text.find(k))
            .unwrap_or(0);
        let (line, col) = line_col(text, at);
        let net = network::NetConfig {
            network: file.network.unwrap_or_default(),
            host: file.host.unwrap_or_default(),
            origin: Some(shown.to_string()),
        };
        network::check(&net.network, &net.host)
            .map_err(|e| ConfigError(format!("{shown}:{line}:{col}: {e}")))?;
        Some(net)
    } else {
        None
    };
    if source == Source::System && !file.registries.is_empty() {
        return Err(ConfigError(format!(
            "{shown}: [registries] belongs in the user's config ({USER_FILE}), not in system service files"
        )));
    }
    if let Some(u) = &file.update {
        u.check()
            .map_err(|e| ConfigError(format!("{shown}: {e}")))?;
    }
    if let Some(x) = &file.extensions {
        x.check()
            .map_err(|e| ConfigError(format!("{shown}: {e}")))?;
    }
    if let Some(a) = &file.api {
        a.check()
            .map_err(|e| ConfigError(format!("{shown}: {e}")))?;
    }
    if let Some(l) = &file.logging {
        l.check()
            .map_err(|e| ConfigError(format!("{shown}: {e}")))?;
    }
    let mut out = Vec::new();
    for (name, spanned) in file.services {
        let (line, col) = line_col(text, spanned.span().start);
        let origin = format!("{shown}:{line}:{col}");
        let spec = spanned.into_inner();
        check_service(&name, &spec)
            .map_err(|e| ConfigError(format!("{origin}: service `{name}`: {e}")))?;
        if spec.delegate && source != Source::System {
            return Err(ConfigError(format!(
                "{origin}: service `{name}`: delegate: only system and extension services may manage their own cgroup subtree (this one comes from {}); ship the engine as an extension (docs/node-agent.md)",
                source.as_str()
            )));
        }
        out.push(Service {
            name,
            spec,
            source,
            origin,
        });
    }
    if source == Source::System && !file.overrides.is_empty() {
        return Err(ConfigError(format!(
            "{shown}: [overrides] belongs in user data or the user's config, not in system service files"
        )));
    }
    let mut overrides = Vec::new();
    for (name, o) in file.overrides {
        let at = [format!("[overrides.{name}"), format!("overrides.{name}")]
            .iter()
            .find_map(|k| text.find(k.as_str()))
            .unwrap_or(0);
        let (line, col) = line_col(text, at);
        let origin = format!("{shown}:{line}:{col}");
        for key in o.env.keys() {
            if key.is_empty() || key.contains('=') || key.contains('\0') {
                return Err(ConfigError(format!(
                    "{origin}: overrides.{name}.env: invalid variable name {key:?}"
                )));
            }
        }
        overrides.push((name, o, origin));
    }
    let admin = match file.admin {
        Some(spanned) => {
            let (line, col) = line_col(text, spanned.span().start);
            let origin = format!("{shown}:{line}:{col}");
            let admin = spanned.into_inner();
            admin
                .check()
                .map_err(|e| ConfigError(format!("{origin}: admin.{e}")))?;
            Some((admin, origin))
        }
        None => None,
    };
    Ok(Document {
        services: out,
        overrides,
        admin,
        net,
    })
}

/// The checked `[registries]` tables of one (user) config file.
pub fn parse_registries(path: &Path, text: &str) -> Result<registries::Registries, ConfigError> {
    let file: File = toml::from_str(text)
        .map_err(|e| ConfigError(format!("{}: {}", path.display(), e.message())))?;
    registries::check_all(path, text, file.registries)
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.len() - before.rfind('\n').map(|i| i + 1).unwrap_or(0) + 1;
    (line, col)
}

/// Valid service, volume and container names: they become directory, cgroup and host names.
pub fn valid_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b[0].is_ascii_lowercase() | b[0].is_ascii_digit()
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-' || *c == b'_')
}

fn clean_absolute(path: &str) -> bool {
    path.starts_with('/') && !path.split('/').any(|c| c == "..")
}

/// Per-service checks that the types alone cannot express. The error names the field.
fn check_service(name: &str, s: &ServiceSpec) -> Result<(), Invalid> {
    if !valid_name(name) {
        return Err(Invalid::from("invalid name: use 1-63 characters of a-z, 0-9, '-' and '_', starting with a letter or digit"));
    }
    if s.image.starts_with('/') {
        if !clean_absolute(&s.image) {
            return Err(Invalid::from(format!(
                "image: {:?} must be a clean absolute path (no `..`)",
                s.image
            )));
        }
    } else if let Err(e) = crate::reference::parse(&s.image) {
        return Err(Invalid::from(format!(
            "image: {:?} is neither an absolute path (a root file system or OCI image layout directory) nor a registry reference: {e}",
            s.image
        )));
    }
    for (field, argv) in [("entrypoint", &s.entrypoint), ("command", &s.command)] {
        if argv
            .as_ref()
            .is_some_and(|a| a.iter().any(|x| x.contains('\0')))
        {
            return Err(Invalid::from(format!(
                "{field}: arguments cannot contain NUL"
            )));
        }
    }
    if s.entrypoint
        .as_ref()
        .is_some_and(|a| a.first().is_some_and(String::is_empty))
    {
        return Err(Invalid::from("entrypoint: the program name is empty"));
    }
    for key in s.env.keys() {
        if key.is_empty() || key.contains('=') || key.contains('\0') {
            return Err(Invalid::from(format!("env: invalid variable name {key:?}")));
        }
    }
    if let Some(dir) = &s.workdir {
        if !clean_absolute(dir) {
            return Err(Invalid::from(format!(
                "workdir: {dir:?} must be an absolute path without '..'"
            )));
        }
    }
    if let Some(user) = &s.user {
        if user.is_empty() || user.split(':').count() > 2 || user.split(':').any(str::is_empty) {
            return Err(Invalid::from(format!(
                "user: {user:?} must be NAME, UID, NAME:GROUP or UID:GID"
            )));
        }
    }
    let mut targets = BTreeSet::new();
    for (i, m) in s.mounts.iter().enumerate() {
        let at = format!("mounts[{i}]");
        let target = m.target();
        if !clean_absolute(target) || target == "/" {
            return Err(Invalid::from(format!(
                "{at}.target: {target:?} must be an absolute path without '..' (and not /)"
            )));
        }
        if !targets.insert(target.trim_end_matches('/')) {
            return Err(Invalid::from(format!(
                "{at}.target: {target:?} is mounted twice"
            )));
        }
        match m {
            MountSpec::Volume { source, .. } if !valid_name(source) => {
                return Err(Invalid::from(format!("{at}.source: volume name {source:?} must be 1-63 characters of a-z, 0-9, '-' and '_'")));
            }
            MountSpec::Bind { source, .. } if !clean_absolute(source) => {
                return Err(Invalid::from(format!(
                    "{at}.source: {source:?} must be an absolute host path without '..'"
                )));
            }
            MountSpec::Tmpfs {
                mode: Some(mode), ..
            } if u32::from_str_radix(mode, 8).map_or(true, |m| m > 0o7777) => {
                return Err(Invalid::from(format!(
                    "{at}.mode: {mode:?} is not an octal mode like \"1777\""
                )));
            }
            _ => {}
        }
    }
    let r = &s.resources;
    for (field, v) in [("cpu_weight", r.cpu_weight), ("io_weight", r.io_weight)] {
        if v.is_some_and(|w| !(1..=10_000).contains(&w)) {
            return Err(Invalid::from(format!(
                "resources.{field}: must be between 1 and 10000"
            )));
        }
    }
    if r.pids_max == Some(0) {
        return Err(Invalid::from("resources.pids_max: must be at least 1"));
    }
    if r.memory_max.is_some_and(|m| m.0 < (1 << 20)) {
        return Err(Invalid::from(
            "resources.memory_max: must be at least 1M (a smaller limit cannot start a process)",
        ));
    }
    if s.max_retries.is_some() && s.restart_policy() != RestartPolicy::OnFailure {
        return Err(Invalid::from(
            "max_retries: only meaningful with restart = \"on-failure\"",
        ));
    }
    if s.kind == Kind::Oneshot {
        if s.restart_policy() == RestartPolicy::Always {
            return Err(Invalid::from("restart: a oneshot task cannot restart \"always\" (use \"on-failure\" or \"never\")"));
        }
        if s.health.is_some() || s.ready.is_some() {
            return Err(Invalid::from(
                "a oneshot task is ready when it exits 0; remove `ready`/`health`",
            ));
        }
    }
    for (field, check) in [("ready", &s.ready), ("health", &s.health)] {
        if let Some(c) = check {
            c.probe().map_err(|e| format!("{field}.{e}"))?;
            if c.interval.0.is_zero() || c.timeout.0.is_zero() {
                return Err(Invalid::from(format!(
                    "{field}: interval and timeout must be above 0"
                )));
            }
            if c.retries == 0 {
                return Err(Invalid::from(format!(
                    "{field}.retries: must be at least 1"
                )));
            }
        }
    }
    for dep in s.dependencies() {
        if dep == name {
            return Err(Invalid::from(
                "depends on itself (in `after` or `requires`)",
            ));
        }
    }
    for (i, p) in s.ports.iter().enumerate() {
        network::PortSpec::parse(p).map_err(|e| format!("ports[{i}]: {e}"))?;
        if let Some(owner) = s.network.joined() {
            return Err(Invalid::from(format!(
                "ports[{i}]: this service shares the network namespace of `{owner}`; publish its ports on `{owner}`"
            )));
        }
        if s.network != Network::Bridge {
            return Err(Invalid::from(format!(
                "ports[{i}]: publishing ports needs network = \"bridge\" (with the host network the service's own ports are already the host's)"
            )));
        }
    }
    if s.privileged && s.user_namespace {
        return Err(Invalid::from(
            "privileged and user_namespace cannot be combined",
        ));
    }
    if s.delegate {
        if s.user_namespace {
            return Err(Invalid::from(
                "delegate and user_namespace cannot be combined: the delegated cgroup's files belong to the host's root, which a user-namespaced root cannot write",
            ));
        }
        if s.kind == Kind::Oneshot {
            return Err(Invalid::from(
                "delegate needs kind = \"service\": a delegated cgroup is for a long-running engine that manages its own children, not a one-shot task",
            ));
        }
    }
    Ok(())
}

impl Config {
    /// Builds the effective config from parsed services, checking what spans services:
    /// unique names, dependencies that exist, no cycles.
    pub fn from_services(services: Vec<Service>) -> Result<Config, ConfigError> {
        Self::from_layers(services, Vec::new())
    }

    /// The effective config from the system services and the layers above them, lowest first
    /// (user data, then the API's file). A layer may replace a service of a lower layer, never
    /// a system service; its `[admin]` table replaces a lower one whole.
    pub fn from_layers(system: Vec<Service>, layers: Vec<Document>) -> Result<Config, ConfigError> {
        let mut map: BTreeMap<String, Service> = BTreeMap::new();
        let mut admin = None;
        let mut net = None;
        let mut overrides = Vec::new();
        let layered = layers.into_iter().flat_map(|doc| {
            overrides.extend(doc.overrides);
            if doc.admin.is_some() {
                admin = doc.admin;
            }
            if doc.net.is_some() {
                net = doc.net;
            }
            doc.services
        });
        for svc in system.into_iter().chain(layered) {
            if let Some(prev) = map.get(&svc.name).filter(|prev| {
                // User data's services are the API's to replace.
                !(prev.source == Source::UserData && svc.source == Source::User)
            }) {
                return Err(ConfigError(format!(
                    "{}: service `{}` is already defined at {}{}",
                    svc.origin,
                    svc.name,
                    prev.origin,
                    if prev.source == Source::System {
                        " (a system service; pick another name)"
                    } else {
                        ""
                    }
                )));
            }
            map.insert(svc.name.clone(), svc);
        }
        // Lowest layer first, so the API's file has the last word.
        for (name, o, origin) in overrides {
            match map.get_mut(&name) {
                Some(svc) if svc.source == Source::System => {
                    if let Some(on) = o.enabled {
                        svc.spec.enabled = on;
                    }
                    svc.spec.env.extend(o.env);
                }
                Some(svc) => {
                    return Err(ConfigError(format!(
                        "{origin}: overrides.{name}: `{name}` is not a system service (it is defined at {}; change it there)",
                        svc.origin
                    )))
                }
                // Not (yet) here: an extension's service arrives when its extension does.
                None => {}
            }
        }
        let (admin, admin_origin) = match admin {
            Some((a, origin)) => (a, Some(origin)),
            None => (Admin::default(), None),
        };
        if let Some(origin) = &admin_origin {
            match map.get_mut(admin::ADMIN_SERVICE) {
                Some(svc) => svc.spec.enabled = admin.wants_service(),
                None if admin.wants_service() => {
                    return Err(ConfigError(format!(
                        "{origin}: admin: this image has no `{}` service to run",
                        admin::ADMIN_SERVICE
                    )))
                }
                None => {}
            }
        }
        for svc in map.values() {
            for (field, deps) in [("after", &svc.spec.after), ("requires", &svc.spec.requires)] {
                for dep in deps {
                    if !map.contains_key(dep) && dep != network::NETWORK_ONLINE {
                        return Err(ConfigError(format!(
                            "{}: service `{}`: {field}: no service named `{dep}`",
                            svc.origin, svc.name
                        )));
                    }
                }
            }
        }
        for svc in map.values() {
            let Some(owner) = svc.spec.network.joined() else {
                continue;
            };
            let why = match map.get(owner) {
                None => Some(format!("no service named `{owner}`")),
                Some(o) if o.spec.network.joined().is_some() => Some(format!(
                    "`{owner}` itself joins another service's network (`{}`); join that service directly",
                    String::from(o.spec.network.clone())
                )),
                Some(o) if o.spec.network == Network::Host => Some(format!(
                    "`{owner}` runs on the host network; use network = \"host\" instead"
                )),
                Some(o) if o.spec.kind == Kind::Oneshot => Some(format!(
                    "`{owner}` is a oneshot task; its network namespace ends with it"
                )),
                Some(_) => None,
            };
            if let Some(why) = why {
                return Err(ConfigError(format!(
                    "{}: service `{}`: network = \"service:{owner}\": {why}",
                    svc.origin, svc.name
                )));
            }
        }
        // Published ports: one service per host port and protocol.
        let mut published: BTreeMap<(u16, &str), &Service> = BTreeMap::new();
        for svc in map.values() {
            for p in &svc.spec.ports {
                let Ok(port) = network::PortSpec::parse(p) else {
                    continue;
                };
                if let Some(other) = published.insert((port.host, port.proto), svc) {
                    if other.name != svc.name {
                        return Err(ConfigError(format!(
                            "{}: service `{}`: ports: host port {}/{} is already published by service `{}` ({})",
                            svc.origin, svc.name, port.host, port.proto, other.name, other.origin
                        )));
                    }
                }
            }
        }
        let config = Config {
            services: map,
            net: net.unwrap_or_default(),
            registries: registries::Registries::new(),
            admin,
            admin_origin,
        };
        if let Some(cycle) = config.find_cycle() {
            let first = &config.services[&cycle[0]];
            return Err(ConfigError(format!(
                "{}: dependency cycle: {}",
                first.origin,
                cycle.join(" -> ")
            )));
        }
        Ok(config)
    }

    /// The merged config as TOML that reads back as the same config, each table preceded by a
    /// comment saying which layer and `file:line:col` it came from (`keelctl config show`).
    pub fn render(&self) -> String {
        #[derive(Serialize)]
        struct One<'a, T: Serialize> {
            #[serde(rename = "services")]
            table: BTreeMap<&'a str, &'a T>,
        }
        let mut out = format!("version = {SCHEMA_VERSION}\n");
        if let Some(origin) = &self.admin_origin {
            #[derive(Serialize)]
            struct AdminOnly<'a> {
                admin: &'a Admin,
            }
            let text = toml::to_string(&AdminOnly { admin: &self.admin }).unwrap_or_default();
            out.push_str(&format!("\n# from {origin}\n{text}"));
        }
        if let Some(origin) = &self.net.origin {
            #[derive(Serialize)]
            struct NetOnly<'a> {
                host: &'a network::HostSpec,
                network: &'a network::NetworkSpec,
            }
            let text = toml::to_string(&NetOnly {
                host: &self.net.host,
                network: &self.net.network,
            })
            .unwrap_or_else(|e| format!("# (cannot render: {e})\n"));
            out.push_str(&format!("\n# [host] and [network] from {origin}\n{text}"));
        }
        // `[registries]` is not shown: it can hold credentials.
        for svc in self.services.values() {
            let one = One {
                table: BTreeMap::from([(svc.name.as_str(), &svc.spec)]),
            };
            let text =
                toml::to_string(&one).unwrap_or_else(|e| format!("# (cannot render: {e})\n"));
            out.push_str(&format!(
                "\n# {} service, from {}\n{text}",
                svc.source.as_str(),
                svc.origin
            ));
        }
        out
    }

    /// A dependency cycle as a path `a -> b -> a`, if there is one.
    fn find_cycle(&self) -> Option<Vec<String>> {
        #[derive(Clone, Copy, PartialEq)]
        enum Mark {
            New,
            Active,
            Done,
        }
        fn visit<'a>(
            cfg: &'a Config,
            name: &'a str,
            marks: &mut BTreeMap<&'a str, Mark>,
            stack: &mut Vec<&'a str>,
        ) -> Option<Vec<String>> {
            match marks.get(name).copied().unwrap_or(Mark::New) {
                Mark::Done => return None,
                Mark::Active => {
                    let from = stack.iter().position(|n| *n == name).unwrap_or(0);
                    let mut cycle: Vec<String> =
                        stack[from..].iter().map(|s| s.to_string()).collect();
                    cycle.push(name.to_string());
                    return Some(cycle);
                }
                Mark::New => {}
            }
            marks.insert(name, Mark::Active);
            stack.push(name);
            for dep in cfg.services[name].spec.dependencies() {
                if !cfg.services.contains_key(dep) {
                    continue; // network-online, not a service
                }
                if let Some(c) = visit(cfg, dep, marks, stack) {
                    return Some(c);
                }
            }
            stack.pop();
            marks.insert(name, Mark::Done);
            None
        }
        let mut marks = BTreeMap::new();
        for name in self.services.keys() {
            let mut stack = Vec::new();
            if let Some(c) = visit(self, name, &mut marks, &mut stack) {
                return Some(c);
            }
        }
        None
    }
}

/// Where the two sources live (overridable for tests and the benchmark).
#[derive(Debug, Clone)]
pub struct Sources {
    pub system_dir: PathBuf,
    /// The layer written from first-boot user data (absent: none).
    pub userdata_file: PathBuf,
    pub user_file: PathBuf,
}

impl Sources {
    /// Reads the system services (every `*.toml` in the directory, in name order).
    pub fn read_system(&self) -> Result<Vec<Service>, ConfigError> {
        let mut files: Vec<PathBuf> = match std::fs::read_dir(&self.system_dir) {
            Ok(rd) => rd
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "toml"))
                .collect(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => {
                return Err(ConfigError(format!("{}: {e}", self.system_dir.display())));
            }
        };
        files.sort();
        let mut out = Vec::new();
        for path in files {
            let text = std::fs::read_to_string(&path)
                .map_err(|e| ConfigError(format!("{}: {e}", path.display())))?;
            out.extend(parse_file(&path, &text, Source::System)?);
        }
        Ok(out)
    }

    /// The user's config text, if there is one.
    pub fn read_user_text(&self) -> Result<Option<String>, ConfigError> {
        match std::fs::read_to_string(&self.user_file) {
            Ok(t) => Ok(Some(t)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(ConfigError(format!("{}: {e}", self.user_file.display()))),
        }
    }

    /// The user-data layer's text, if first boot wrote one.
    pub fn read_userdata_text(&self) -> Result<Option<String>, ConfigError> {
        match std::fs::read_to_string(&self.userdata_file) {
            Ok(t) => Ok(Some(t)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(ConfigError(format!(
                "{}: {e}",
                self.userdata_file.display()
            ))),
        }
    }

    /// The effective config from system services, the user-data layer and the given user
    /// text.
    pub fn combine(
        &self,
        system: Vec<Service>,
        userdata_text: Option<&str>,
        user_text: Option<&str>,
    ) -> Result<Config, ConfigError> {
        let mut layers = Vec::new();
        if let Some(text) = userdata_text {
            layers.push(parse_document(&self.userdata_file, text, Source::UserData)?);
        }
        if let Some(text) = user_text {
            layers.push(parse_document(&self.user_file, text, Source::User)?);
        }
        let mut config = Config::from_layers(system, layers)?;
        if config.net.origin.is_none() {
            config.net = self.read_system_net()?.unwrap_or_default();
        }
        // Registry settings: user data's, then the user's file's, host by host.
        for (path, text) in [
            (&self.userdata_file, userdata_text),
            (&self.user_file, user_text),
        ] {
            if let Some(text) = text {
                config.registries.extend(parse_registries(path, text)?);
            }
        }
        Ok(config)
    }

    /// The `[network]`/`[host]` tables of the system files (the last file that has them).
    pub fn read_system_net(&self) -> Result<Option<network::NetConfig>, ConfigError> {
        let mut files: Vec<PathBuf> = match std::fs::read_dir(&self.system_dir) {
            Ok(rd) => rd
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "toml"))
                .collect(),
            Err(_) => return Ok(None),
        };
        files.sort();
        let mut net = None;
        for path in files {
            let text = std::fs::read_to_string(&path)
                .map_err(|e| ConfigError(format!("{}: {e}", path.display())))?;
            // Parsed as what it is: a system file (whose services may `delegate`).
            if let Some(n) = parse_document(&path, &text, Source::System)?.net {
                net = Some(n);
            }
        }
        Ok(net)
    }

    /// Replaces the user's config file durably (`keelson_common::durable`).
    pub fn store_user_text(&self, text: &str) -> std::io::Result<()> {
        Ok(keelson_common::durable::replace(
            &self.user_file,
            text.as_bytes(),
        )?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        let services = parse_file(Path::new("svc.toml"), text, Source::User)?;
        Config::from_services(services)
    }

    const GOOD: &str = r#"
version = 1

[services.db]
image = "/usr/lib/keelson/images/base"
command = ["sleep", "infinity"]
resources = { memory_max = "64M", cpu_quota = "50%", pids_max = 64 }
ready = { tcp = "127.0.0.1:5432", interval = "500ms" }
critical = true

[services.web]
image = "/usr/lib/keelson/images/base"
entrypoint = ["/bin/httpd", "-f"]
requires = ["db"]
restart = "on-failure"
max_retries = 5
cap_drop = ["ALL"]
cap_add = ["net_bind_service"]
mounts = [
  { type = "volume", source = "www", target = "/srv" },
  { type = "tmpfs", target = "/cache", size = "16M", mode = "1777" },
]
health = { http = "http://127.0.0.1:8080/healthz", retries = 2 }
stop_signal = "SIGQUIT"
stop_timeout = "5s"
"#;

    #[test]
    fn layers_override_and_render_back() {
        let key =
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAILLQlN97l7/l7fgXF9PlMnkcATyASDAzrU0bNgZfDbPW k";
        let system = parse_file(
            Path::new("sys.toml"),
            "version = 1\n[services.admin]\nimage = \"/a\"\nenabled = false\n",
            Source::System,
        )
        .unwrap();
        let userdata = parse_document(
            Path::new("ud.toml"),
            &format!("version = 1\n[admin]\nssh_authorized_keys = [\"{key}\"]\n[services.web]\nimage = \"/w\"\n"),
            Source::UserData,
        )
        .unwrap();
        let api = parse_document(
            Path::new("api.toml"),
            "version = 1\n[services.web]\nimage = \"/w2\"\nrestart = \"never\"\n",
            Source::User,
        )
        .unwrap();
        let cfg = Config::from_layers(system.clone(), vec![userdata.clone(), api]).unwrap();
        assert_eq!(
            cfg.services["web"].spec.image, "/w2",
            "the API replaces user data's service"
        );
        assert_eq!(cfg.services["web"].source, Source::User);
        assert!(
            cfg.services["admin"].spec.enabled,
            "keys turn the admin service on"
        );
        assert_eq!(cfg.admin_origin.as_deref(), Some("ud.toml:2:1"));

        let text = cfg.render();
        assert!(text.contains("# from ud.toml:2:1\n[admin]"), "{text}");
        assert!(
            text.contains("# user service, from api.toml:2:1\n[services.web]"),
            "{text}"
        );
        let back = parse_document(Path::new("r.toml"), &text, Source::User).unwrap();
        assert_eq!(back.admin.unwrap().0, cfg.admin);
        for svc in back.services {
            assert_eq!(svc.spec, cfg.services[&svc.name].spec, "{}", svc.name);
        }

        // A layer cannot replace a system service; without it the admin table fails to find
        // a service to run.
        let bad = parse_document(
            Path::new("x.toml"),
            "version = 1\n[services.admin]\nimage = \"/b\"\n",
            Source::UserData,
        )
        .unwrap();
        let e = Config::from_layers(system, vec![bad]).unwrap_err().0;
        assert!(
            e.contains("is already defined at sys.toml:2:1 (a system service"),
            "{e}"
        );
        let e = Config::from_layers(Vec::new(), vec![userdata])
            .unwrap_err()
            .0;
        assert_eq!(
            e,
            "ud.toml:2:1: admin: this image has no `admin` service to run"
        );
    }

    #[test]
    fn overrides_turn_system_services_on_and_set_their_env() {
        let system = parse_file(
            Path::new("etcd.toml"),
            "version = 1\n[services.etcd]\nimage = \"/e\"\nenabled = false\n[services.etcd.env]\nETCD_NAME = \"default\"\nETCD_DATA_DIR = \"/var/lib/etcd/default\"\n",
            Source::System,
        )
        .unwrap();
        let userdata = parse_document(
            Path::new("ud.toml"),
            "version = 1\n[overrides.etcd]\nenabled = true\nenv = { ETCD_NAME = \"node1\" }\n[overrides.docker]\nenabled = true\n",
            Source::UserData,
        )
        .unwrap();
        let api = parse_document(
            Path::new("api.toml"),
            "version = 1\n[overrides.etcd.env]\nETCD_NAME = \"node1b\"\n",
            Source::User,
        )
        .unwrap();
        let cfg = Config::from_layers(system.clone(), vec![userdata.clone(), api]).unwrap();
        let etcd = &cfg.services["etcd"].spec;
        assert!(etcd.enabled);
        assert_eq!(
            etcd.env["ETCD_NAME"], "node1b",
            "the API's layer has the last word"
        );
        assert_eq!(
            etcd.env["ETCD_DATA_DIR"], "/var/lib/etcd/default",
            "merged, not replaced"
        );
        // `docker` is not here (its extension is not active): nothing to change, no error.
        assert!(!cfg.services.contains_key("docker"));

        let user_svc = parse_document(
            Path::new("u.toml"),
            "version = 1\n[services.web]\nimage = \"/w\"\n[overrides.web]\nenabled = false\n",
            Source::User,
        )
        .unwrap();
        let e = Config::from_layers(system.clone(), vec![user_svc])
            .unwrap_err()
            .0;
        assert_eq!(e, "u.toml:4:1: overrides.web: `web` is not a system service (it is defined at u.toml:2:1; change it there)");

        let e = parse_document(
            Path::new("s.toml"),
            "version = 1\n[overrides.etcd]\nenabled = true\n",
            Source::System,
        )
        .unwrap_err()
        .0;
        assert!(e.contains("[overrides] belongs in user data"), "{e}");
        let e = parse_document(
            Path::new("u.toml"),
            "version = 1\n[overrides.etcd]\nimage = \"/x\"\n",
            Source::User,
        )
        .unwrap_err()
        .0;
        assert!(
            e.starts_with("u.toml:3:1: overrides.etcd: unknown field `image`")
                || e.contains("image"),
            "{e}"
        );
    }

    #[test]
    fn good_config_parses() {
        let cfg = parse(GOOD).unwrap();
        let web = &cfg.services["web"].spec;
        assert_eq!(web.restart_policy(), RestartPolicy::OnFailure);
        assert_eq!(web.cap_add[0].0, "CAP_NET_BIND_SERVICE");
        assert_eq!(
            web.health.as_ref().unwrap().probe().unwrap(),
            Probe::Http {
                host: "127.0.0.1".into(),
                port: 8080,
                path: "/healthz".into()
            }
        );
        assert_eq!(
            cfg.services["db"].spec.resources.memory_max,
            Some(Size(64 << 20))
        );
        assert_eq!(cfg.services["web"].origin, "svc.toml:11:1");
        assert_ne!(
            cfg.services["web"].spec.hash(),
            cfg.services["db"].spec.hash()
        );
    }

    fn err(text: &str) -> String {
        parse(text).unwrap_err().0
    }

    #[test]
    fn a_delegating_system_service_loads_through_the_sources() {
        // Found in QEMU: the system files' [network] tables were read as a user file's, so a
        // system engine's `delegate` refused the whole config.
        let d = tempfile::tempdir().unwrap();
        let system_dir = d.path().join("services.d");
        std::fs::create_dir_all(&system_dir).unwrap();
        std::fs::write(
            system_dir.join("docker.toml"),
            "version = 1\n[services.docker]\nimage = \"/x\"\nnetwork = \"host\"\npid = \"host\"\nprivileged = true\ndelegate = true\n",
        )
        .unwrap();
        let sources = Sources {
            system_dir,
            userdata_file: d.path().join("user-data.toml"),
            user_file: d.path().join("services.toml"),
        };
        let system = sources.read_system().unwrap();
        let config = sources
            .combine(
                system,
                Some("version = 1\n[overrides.docker]\nenabled = true\n"),
                None,
            )
            .unwrap();
        assert!(config.services["docker"].spec.delegate);
    }

    #[test]
    fn delegate_is_for_system_engines_only() {
        let engine = "version = 1\n[services.dockerd]\nimage = \"/x\"\nnetwork = \"host\"\npid = \"host\"\nprivileged = true\ndelegate = true\n";
        let sys = parse_file(Path::new("ext.toml"), engine, Source::System).unwrap();
        assert!(sys[0].spec.delegate);
        assert_eq!(sys[0].spec.pid, PidMode::Host);
        // The hash of a service that does not set it is what it was before the field existed.
        let plain = parse_file(
            Path::new("a.toml"),
            "version = 1\n[services.a]\nimage = \"/x\"\n",
            Source::System,
        )
        .unwrap();
        assert!(!serde_json::to_string(&plain[0].spec)
            .unwrap()
            .contains("delegate"));
        assert_ne!(plain[0].spec.hash(), sys[0].spec.hash());

        let e = err(engine);
        assert!(
            e.contains(
                "svc.toml:2:1: service `dockerd`: delegate: only system and extension services"
            ) && e.contains("comes from user"),
            "{e}"
        );
        let e = parse_file(Path::new("ud"), engine, Source::UserData)
            .unwrap_err()
            .0;
        assert!(e.contains("comes from user-data"), "{e}");
        let e = parse_file(
            Path::new("s.toml"),
            "version = 1\n[services.d]\nimage = \"/x\"\ndelegate = true\nuser_namespace = true\n",
            Source::System,
        )
        .unwrap_err()
        .0;
        assert!(
            e.contains("service `d`: delegate and user_namespace cannot be combined"),
            "{e}"
        );
        let e = parse_file(
            Path::new("s.toml"),
            "version = 1\n[services.d]\nimage = \"/x\"\nkind = \"oneshot\"\ndelegate = true\n",
            Source::System,
        )
        .unwrap_err()
        .0;
        assert!(
            e.contains("service `d`: delegate needs kind = \"service\""),
            "{e}"
        );
    }

    #[test]
    fn network_service_joins_an_existing_namespace() {
        let cfg = parse(
            "version = 1\n[services.a]\nimage = \"/x\"\nnetwork = \"bridge\"\n[services.b]\nimage = \"/x\"\nnetwork = \"service:a\"\n",
        )
        .unwrap();
        let b = &cfg.services["b"].spec;
        assert_eq!(b.network, Network::Service("a".into()));
        assert_eq!(b.network.joined(), Some("a"));
        // An implicit `requires`, once even when also written.
        assert_eq!(b.requirements().collect::<Vec<_>>(), ["a"]);
        assert!(b.dependencies().contains("a"));
        let mut twice = b.clone();
        twice.requires = vec!["a".into()];
        assert_eq!(twice.requirements().collect::<Vec<_>>(), ["a"]);
        // Renders back as written.
        assert!(cfg.render().contains("network = \"service:a\""));
        assert_eq!(parse(&cfg.render()).unwrap().services["b"].spec, *b);
    }

    #[test]
    fn network_service_is_checked() {
        let e = err("version = 1\n[services.b]\nimage = \"/x\"\nnetwork = \"service:nope\"\n");
        assert!(
            e.contains("service `b`: network = \"service:nope\": no service named `nope`"),
            "{e}"
        );
        let e = err(
            "version = 1\n[services.a]\nimage = \"/x\"\nnetwork = \"none\"\n[services.b]\nimage = \"/x\"\nnetwork = \"service:a\"\n[services.c]\nimage = \"/x\"\nnetwork = \"service:b\"\n",
        );
        assert!(
            e.contains("service `c`: network = \"service:b\": `b` itself joins another service's network (`service:a`)"),
            "{e}"
        );
        let e = err("version = 1\n[services.a]\nimage = \"/x\"\n[services.b]\nimage = \"/x\"\nnetwork = \"service:a\"\n");
        assert!(e.contains("`a` runs on the host network"), "{e}");
        let e = err("version = 1\n[services.a]\nimage = \"/x\"\nkind = \"oneshot\"\nnetwork = \"none\"\n[services.b]\nimage = \"/x\"\nnetwork = \"service:a\"\n");
        assert!(e.contains("`a` is a oneshot task"), "{e}");
        let e = err("version = 1\n[services.a]\nimage = \"/x\"\nnetwork = \"service:a\"\n");
        assert!(e.contains("depends on itself"), "{e}");
        let e = err(
            "version = 1\n[services.a]\nimage = \"/x\"\nnetwork = \"bridge\"\n[services.b]\nimage = \"/x\"\nnetwork = \"service:a\"\nports = [\"8080:80\"]\n",
        );
        assert!(
            e.contains("ports[0]: this service shares the network namespace of `a`; publish its ports on `a`"),
            "{e}"
        );
        for bad in ["service:", "bogus"] {
            let e = err(&format!(
                "version = 1\n[services.a]\nimage = \"/x\"\nnetwork = \"{bad}\"\n"
            ));
            assert!(e.contains("unknown network"), "{e}");
        }
    }

    #[test]
    fn unknown_keys_and_bad_values_name_position_and_key() {
        let e = err("version = 1\n[services.web]\nimage = \"/x\"\nimgae = \"/y\"\n");
        assert!(
            e.starts_with("svc.toml:4:1: services.web.imgae: unknown field `imgae`"),
            "{e}"
        );
        let e = err(
            "version = 1\n[services.web]\nimage = \"/x\"\nresources = { memory_max = \"12XB\" }\n",
        );
        assert!(
            e.starts_with(
                "svc.toml:4:28: services.web.resources.memory_max: invalid size \"12XB\""
            ),
            "{e}"
        );
        let e = err("version = 1\n[services.web]\nimage = \"/x\"\nstop_signal = \"SIGFOO\"\n");
        assert!(e.contains("unknown signal"), "{e}");
        let e = err("version = 3\n");
        assert!(
            e.contains("version = 3 is not supported (this sysd reads version = 1 to 2)"),
            "{e}"
        );
    }

    /// Version 2's default network is the bridge; version 1 files keep the host's; what a
    /// file writes wins in both.
    #[test]
    fn version_2_defaults_to_the_bridge_and_version_1_keeps_the_host() {
        let v2 = parse(
            "version = 2\n[services.web]\nimage = \"/x\"\nports = [\"8080:80\"]\n[services.agent]\nimage = \"/x\"\nnetwork = \"host\"\n",
        )
        .unwrap();
        assert_eq!(v2.services["web"].spec.network, Network::Bridge);
        assert_eq!(v2.services["agent"].spec.network, Network::Host);
        let v1 = parse("version = 1\n[services.web]\nimage = \"/x\"\n").unwrap();
        assert_eq!(v1.services["web"].spec.network, Network::Host);
        // What `config show` writes reads back as the same services.
        let again = parse(&v2.render()).unwrap();
        assert_eq!(again.services["web"].spec, v2.services["web"].spec);
        assert_eq!(again.services["agent"].spec, v2.services["agent"].spec);
    }

    #[test]
    fn semantic_errors_name_service_and_field() {
        let e =
            err("version = 1\n[services.web]\nimage = \"/x\"\nresources = { cpu_weight = 0 }\n");
        assert_eq!(
            e,
            "svc.toml:2:1: service `web`: resources.cpu_weight: must be between 1 and 10000"
        );
        let e = err("version = 1\n[services.web]\nimage = \"not a/ref\"\n");
        assert!(e.contains("service `web`: image:"), "{e}");
        let e = err("version = 1\n[services.Web]\nimage = \"/x\"\n");
        assert!(e.contains("service `Web`: invalid name"), "{e}");
        let e = err("version = 1\n[services.web]\nimage = \"/x\"\nready = { tcp = \"a:1\", exec = [\"true\"] }\n");
        assert!(e.contains("ready.set exactly one of"), "{e}");
        let e = err("version = 1\n[services.web]\nimage = \"/x\"\nmax_retries = 3\n");
        assert!(e.contains("max_retries"), "{e}");
        let e = err(
            "version = 1\n[services.t]\nimage = \"/x\"\nkind = \"oneshot\"\nrestart = \"always\"\n",
        );
        assert!(e.contains("oneshot"), "{e}");
        let e = err("version = 1\n[services.web]\nimage = \"/x\"\nmounts = [{ type = \"bind\", source = \"../etc\", target = \"/e\" }]\n");
        assert!(e.contains("mounts[0].source"), "{e}");
    }

    #[test]
    fn dependencies_must_exist_and_not_cycle() {
        let e = err("version = 1\n[services.web]\nimage = \"/x\"\nrequires = [\"db\"]\n");
        assert!(
            e.contains("service `web`: requires: no service named `db`"),
            "{e}"
        );
        let e = err(
            "version = 1\n[services.a]\nimage = \"/x\"\nafter = [\"b\"]\n[services.b]\nimage = \"/x\"\nrequires = [\"c\"]\n[services.c]\nimage = \"/x\"\nafter = [\"a\"]\n",
        );
        assert!(e.ends_with("dependency cycle: a -> b -> c -> a"), "{e}");
    }

    #[test]
    fn a_name_is_defined_once_across_sources() {
        let sys = parse_file(
            Path::new("/usr/lib/keelson/services.d/base.toml"),
            "version = 1\n[services.ntp]\nimage = \"/x\"\n",
            Source::System,
        )
        .unwrap();
        let user = parse_file(
            Path::new("/var/lib/keelson/services.toml"),
            "version = 1\n\n[services.ntp]\nimage = \"/y\"\n",
            Source::User,
        )
        .unwrap();
        let e = Config::from_services(sys.into_iter().chain(user).collect())
            .unwrap_err()
            .0;
        assert_eq!(e, "/var/lib/keelson/services.toml:3:1: service `ntp` is already defined at /usr/lib/keelson/services.d/base.toml:2:1 (a system service; pick another name)");
    }
}
