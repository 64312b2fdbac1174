//! First-boot configuration, cloud-init style: find user data, decode it, map it onto Keelson's
//! config, apply it once per instance.
//!
//! - [`datasource`]: the kernel command line, QEMU fw_cfg and NoCloud seeds, in that order.
//! - [`imds`]: the EC2-style metadata service, after the network is up, when the platform has one.
//! - [`seedfs`]: NoCloud seed volumes (ISO 9660, FAT) read in process, without mounting.
//! - [`userdata`]: bytes → format (limits, gzip, encodings, `#cloud-config` / TOML / refused).
//! - [`cloudconfig`]: the `#cloud-config` subset, strictly typed, unsupported keys listed.
//! - [`netconfig`]: cloud-init network-config (v1, v2) onto `[network]`.
//!
//! Semantics (cloud-init's): user data is applied on the first boot of each instance id; later
//! boots of the same instance use what was persisted, whatever the datasource says. Applying
//! means: everything is validated first (the resulting config layer against the image's system
//! services, every write_files entry decoded), then written — files, then the user-data config
//! layer (`/var/lib/keelson/user-data.toml`, between the image and the API's `services.toml`;
//! it carries the host name as `[host]`, network-config as `[network]`, keys as `[admin]`) —
//! and the instance id is recorded last, so a crash half-way re-applies at the next
//! boot. User data that fails validation changes nothing: it is reported (console, event, `GET
//! /v1/firstboot`) and the node boots with its last good config, reachable to be fixed.
//!
//! This crate knows the config schema (`keelson-spec`) and nothing of services, the network
//! manager or the API: sysd runs it before anything starts, reads its [`Outcome`] and enters
//! its [`notices`] in the event stream.

pub mod cloudconfig;
pub mod datasource;
pub mod imds;
pub mod netconfig;
pub mod seedfs;
pub mod userdata;

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::time::Instant;

use keelson_common::api::firstboot::{FirstBoot, Outcome};
use keelson_common::api::now_ms;
use keelson_common::error::{Classify, Kind};
use keelson_common::notice::Notice;

use cloudconfig::{CloudConfig, WriteFile, DEFAULT_USER};
use datasource::Found;
#[cfg(test)]
use datasource::Probe;
use keelson_common::durable;
use userdata::UserData;

/// Why user data was not applied. The text names where (datasource, file, line, key) and
/// what is wrong: it is the report's `error` and the console's line, word for word.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// A datasource has user data that cannot be read whole (I/O, a size limit, a NoCloud
    /// seed without one of its files, a `keelson.config=` naming no volume).
    #[error("{0}")]
    Unreadable(String),
    /// The user data, its meta-data or network-config is not valid.
    #[error("{0}")]
    Invalid(String),
    /// The config layer it makes is not valid over the image's system services.
    #[error(transparent)]
    Config(#[from] keelson_spec::ConfigError),
    /// The metadata service answered wrongly, or not in time.
    #[error("{0}")]
    Upstream(String),
    /// Writing what the user data asks for failed.
    #[error("{0}")]
    Write(String),
}

impl Classify for Error {
    fn kind(&self) -> Kind {
        match self {
            Error::Unreadable(_) => Kind::Unavailable,
            Error::Invalid(_) | Error::Config(_) => Kind::Invalid,
            Error::Upstream(_) => Kind::Upstream,
            Error::Write(_) => Kind::Internal,
        }
    }
}

impl From<userdata::UserDataError> for Error {
    fn from(e: userdata::UserDataError) -> Self {
        Error::Invalid(e.0)
    }
}

/// Paths under which first boot reads and writes (all on /var but the host name's runtime
/// copy; tests point them into a temporary directory).
#[derive(Debug, Clone)]
pub struct Paths {
    /// `/var/lib/keelson/firstboot`: the applied instance id, its raw user data, the report.
    pub state_dir: PathBuf,
    /// The user-data config layer (`spec::USERDATA_FILE`).
    pub config_file: PathBuf,
    /// Where `/` is: write_files paths resolve under it.
    pub root: PathBuf,
}

impl Paths {
    pub fn system() -> Paths {
        Paths {
            state_dir: PathBuf::from("/var/lib/keelson/firstboot"),
            config_file: PathBuf::from(keelson_spec::USERDATA_FILE),
            root: PathBuf::from("/"),
        }
    }
}

/// Config paths that a `#cloud-config` write_files entry may target to hand Keelson TOML to
/// the user-data layer (validated like any config, merged with the keys the document gives).
pub const CONFIG_PATHS: &[&str] = &["/etc/keelson/config.toml", keelson_spec::USERDATA_FILE];

/// What will be written, fully validated.
#[derive(Debug, Default)]
struct Plan {
    format: &'static str,
    /// The user-data config layer (`None`: the instance has none; a previous one is removed).
    config: Option<String>,
    files: Vec<WriteFile>,
    warnings: Vec<String>,
}

/// What the user data contributes to the config layer, before it is composed and validated.
#[derive(Debug, Default)]
struct Parts {
    /// Keelson TOML as the user wrote it (the user data itself, or a write_files config).
    base: Option<String>,
    /// `[host] hostname`, and whether it overrides one in `base` (cloud-config's `hostname`
    /// does; meta-data's `local-hostname` only fills a gap).
    hostname: Option<(String, bool)>,
    /// `[network]` from cloud-init network-config (only where `base` has none).
    network: Option<toml::Table>,
    /// `[admin] ssh_authorized_keys` to add.
    keys: Vec<String>,
}

/// How a first boot's report reads in the event stream: one line for what happened (kind
/// `firstboot`, or `firstboot-error` when the user data was rejected), then one per warning.
pub fn notices(status: &FirstBoot) -> Vec<Notice> {
    let what = match status.outcome {
        Outcome::NoUserData => "no user data".to_string(),
        Outcome::Applied => format!(
            "applied {} user data of instance {} from {}",
            status.format.as_deref().unwrap_or("?"),
            status.instance_id.as_deref().unwrap_or("?"),
            status.source.as_deref().unwrap_or("?"),
        ),
        Outcome::AlreadyApplied => format!(
            "instance {} already configured; using the persisted config",
            status.instance_id.as_deref().unwrap_or("?")
        ),
        Outcome::Rejected => format!(
            "user data rejected, nothing applied (the last good config runs): {}",
            status.error.as_deref().unwrap_or("?")
        ),
    };
    let kind = if status.outcome == Outcome::Rejected {
        "firstboot-error"
    } else {
        "firstboot"
    };
    std::iter::once(Notice::new(
        kind,
        format!("{what} ({} ms)", status.duration_ms),
    ))
    .chain(
        status
            .warnings
            .iter()
            .map(|w| Notice::new("firstboot-warning", w.clone())),
    )
    .collect()
}

/// Checks a config layer's TOML (`text`, from `origin`) against the rest of the config (the
/// image's system services); errors name `origin`, line and key.
pub type Validate<'a> = dyn Fn(&str, &str) -> Result<(), keelson_spec::ConfigError> + 'a;

/// Runs first boot: probe, then apply if this instance is new. (sysd itself splits this
/// around the network start: `first_boot_local` in main.rs.)
#[cfg(test)]
pub fn run(probe: &Probe, paths: &Paths, validate: &Validate) -> FirstBoot {
    let start = Instant::now();
    let mut log = Vec::new();
    let found = probe.find(&mut log);
    process(found, log, paths, validate, start)
}

/// Applies what a datasource found (the local ones through [`run`], the metadata service
/// through [`imds::fetch`] once the network is up), once per instance.
pub fn process(
    found: Result<Option<Found>, Error>,
    probe_log: Vec<String>,
    paths: &Paths,
    validate: &Validate,
    start: Instant,
) -> FirstBoot {
    let mut status = FirstBoot {
        outcome: Outcome::NoUserData,
        source: None,
        instance_id: None,
        format: None,
        error: None,
        warnings: Vec::new(),
        probe_log,
        duration_ms: 0,
        applied_at_ms: None,
    };
    match found {
        Err(e) => {
            status.outcome = Outcome::Rejected;
            status.error = Some(e.to_string());
        }
        Ok(None) => {}
        Ok(Some(found)) => {
            status.source = Some(found.source.clone());
            status.instance_id = Some(found.meta.instance_id.clone());
            let applied = std::fs::read_to_string(paths.state_dir.join("instance-id")).ok();
            if applied.as_deref().map(str::trim) == Some(found.meta.instance_id.as_str()) {
                status.outcome = Outcome::AlreadyApplied;
                status.applied_at_ms = previous(paths).and_then(|p| p.applied_at_ms);
            } else {
                match plan(&found, validate).and_then(|plan| {
                    status.format = Some(plan.format.into());
                    status.warnings = plan.warnings.clone();
                    apply(&plan, &found, paths)
                }) {
                    Ok(()) => {
                        status.outcome = Outcome::Applied;
                        status.applied_at_ms = Some(now_ms());
                    }
                    Err(e) => {
                        status.outcome = Outcome::Rejected;
                        status.error = Some(e.to_string());
                    }
                }
            }
        }
    }
    status.duration_ms = start.elapsed().as_millis() as u64;
    if status.outcome == Outcome::Applied {
        // The report of the applying boot, kept for later boots of the instance.
        let json = serde_json::to_vec_pretty(&status).unwrap_or_default();
        let _ = durable::replace(&paths.state_dir.join("status.json"), &json);
        let _ = durable::replace(
            &paths.state_dir.join("instance-id"),
            format!("{}\n", found_id(&status)).as_bytes(),
        );
    }
    status
}

fn found_id(status: &FirstBoot) -> &str {
    status.instance_id.as_deref().unwrap_or_default()
}

fn previous(paths: &Paths) -> Option<FirstBoot> {
    let data = std::fs::read(paths.state_dir.join("status.json")).ok()?;
    serde_json::from_slice(&data).ok()
}

/// Decodes and validates everything; writes nothing.
fn plan(found: &Found, validate: &Validate) -> Result<Plan, Error> {
    let origin = format!("{}: user-data", found.source);
    let mut plan = Plan::default();
    let mut parts = Parts {
        hostname: found.meta.local_hostname.clone().map(|h| (h, false)),
        ..Parts::default()
    };
    match UserData::decode(&found.user_data, &origin)? {
        UserData::Empty => plan.format = "empty",
        UserData::Toml(text) => {
            plan.format = "toml";
            validate(&text, &origin)?;
            parts.base = Some(text);
        }
        UserData::CloudConfig(text) => {
            plan.format = "cloud-config";
            let cc = cloudconfig::parse(&text, &origin)?;
            from_cloud_config(cc, &origin, validate, &mut plan, &mut parts)?;
        }
    }
    if let Some(nc) = &found.network_config {
        let nc_origin = format!("{}: network-config", found.source);
        let (table, warnings) = netconfig::to_keelson(nc, &nc_origin)?;
        plan.warnings.extend(warnings);
        parts.network = Some(table);
    }
    plan.config = compose(parts, &origin, validate, &mut plan.warnings)?;
    Ok(plan)
}

/// The config layer: the user's TOML as written when nothing is added to it, else the merged
/// table (with a comment saying where it came from), validated either way.
fn compose(
    parts: Parts,
    origin: &str,
    validate: &Validate,
    warnings: &mut Vec<String>,
) -> Result<Option<String>, Error> {
    let nothing_to_add =
        parts.hostname.is_none() && parts.network.is_none() && parts.keys.is_empty();
    if nothing_to_add {
        return Ok(parts.base);
    }
    let mut table: toml::Table = match &parts.base {
        Some(text) => text
            .parse()
            .map_err(|e| Error::Invalid(format!("{origin}: {e}")))?,
        None => toml::Table::from_iter([("version".to_string(), toml::Value::Integer(1))]),
    };
    let mut added = false;
    if let Some((name, overrides)) = parts.hostname {
        let host = subtable(&mut table, "host", origin)?;
        if overrides || !host.contains_key("hostname") {
            host.insert("hostname".into(), name.into());
            added = true;
        }
    }
    if let Some(network) = parts.network {
        if table.contains_key("network") {
            warnings.push(format!(
                "{origin}: has its own [network]; the network-config file was not used"
            ));
        } else {
            table.insert("network".into(), network.into());
            added = true;
        }
    }
    if !parts.keys.is_empty() {
        let admin = subtable(&mut table, "admin", origin)?;
        let list = admin
            .entry("ssh_authorized_keys")
            .or_insert_with(|| toml::Value::Array(Vec::new()));
        if let Some(list) = list.as_array_mut() {
            for k in parts.keys {
                if !list.iter().any(|v| v.as_str() == Some(k.as_str())) {
                    list.push(toml::Value::String(k));
                    added = true;
                }
            }
        }
    }
    if !added {
        return Ok(parts.base);
    }
    let text = format!(
        "# Written at first boot from {origin} (and its meta-data and network-config).\n{}",
        toml::to_string(&table).map_err(|e| Error::Invalid(format!("{origin}: {e}")))?
    );
    validate(&text, &format!("{origin} (as the composed Keelson TOML)"))?;
    Ok(Some(text))
}

fn subtable<'a>(
    table: &'a mut toml::Table,
    key: &str,
    origin: &str,
) -> Result<&'a mut toml::Table, Error> {
    table
        .entry(key)
        .or_insert_with(|| toml::Value::Table(toml::Table::new()))
        .as_table_mut()
        .ok_or_else(|| Error::Invalid(format!("{origin}: `{key}` is not a table")))
}

fn from_cloud_config(
    cc: CloudConfig,
    origin: &str,
    validate: &Validate,
    plan: &mut Plan,
    parts: &mut Parts,
) -> Result<(), Error> {
    if let Some(h) = cc.hostname {
        parts.hostname = Some((h, true));
    }
    if !cc.unsupported.is_empty() {
        plan.warnings.push(format!(
            "{origin}: not supported, ignored: {}",
            cc.unsupported.join(", ")
        ));
    }
    for (i, f) in cc.write_files.into_iter().enumerate() {
        let shown = f.path.display().to_string();
        if CONFIG_PATHS.contains(&shown.as_str()) {
            let text = String::from_utf8(f.content).map_err(|_| {
                Error::Invalid(format!("{origin}: write_files[{i}] ({shown}): not UTF-8"))
            })?;
            validate(&text, &format!("{origin}: write_files[{i}] ({shown})"))?;
            parts.base = Some(text);
            continue;
        }
        if let Err(why) = writable(&f.path) {
            plan.warnings.push(format!(
                "{origin}: write_files[{i}]: not written: {shown} ({why})"
            ));
            continue;
        }
        plan.files.push(f);
    }
    for user in &cc.users {
        if user.name != DEFAULT_USER {
            plan.warnings.push(format!(
                "{origin}: users: `{}` logs in as {DEFAULT_USER} (the admin container has one \
                 account); its keys were added to {DEFAULT_USER}'s",
                user.name
            ));
        }
        for k in &user.ssh_authorized_keys {
            if !parts.keys.contains(k) {
                parts.keys.push(k.clone());
            }
        }
    }
    if cc.ntp_disabled || !cc.ntp_servers.is_empty() {
        plan.warnings.push(format!(
            "{origin}: ntp: not applied by this version (timesync uses the image's servers)"
        ));
    }
    if let Some(tz) = &cc.timezone {
        plan.warnings.push(format!(
            "{origin}: timezone `{tz}`: Keelson hosts run in UTC; set TZ in a service's env"
        ));
    }
    Ok(())
}

/// write_files may write under /var (the rest is the verified image or rendered at boot), except
/// sysd's and init's own state in /var/lib/keelson (services' volumes there are fine) and the
/// logs sysd writes.
fn writable(path: &Path) -> Result<(), &'static str> {
    if !path.starts_with("/var") || path == Path::new("/var") {
        return Err(
            "only paths under /var are writable on Keelson; the rest of the file \
                    system is the verified image or generated at boot",
        );
    }
    if path.starts_with("/var/lib/keelson/volumes") {
        return Ok(());
    }
    if path.starts_with("/var/lib/keelson") || path.starts_with("/var/log/keelson") {
        return Err("Keelson's own state; configure it with Keelson TOML instead");
    }
    Ok(())
}

/// Writes the plan, in an order that makes a crash half-way harmless (the instance id, which
/// says "done", is recorded by the caller after this returns).
fn apply(plan: &Plan, found: &Found, paths: &Paths) -> Result<(), Error> {
    for f in &plan.files {
        write_file(f, &paths.root)
            .map_err(|e| Error::Write(format!("write_files {}: {e}", f.path.display())))?;
    }
    match &plan.config {
        Some(text) => durable::replace(&paths.config_file, text.as_bytes())
            .map_err(|e| Error::Write(format!("{}: {e}", paths.config_file.display())))?,
        None => match std::fs::remove_file(&paths.config_file) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(Error::Write(format!(
                    "{}: {e}",
                    paths.config_file.display()
                )))
            }
        },
    }
    // User data can hold secrets (passwords, keys): root only.
    durable::replace_with(
        &paths.state_dir.join("user-data"),
        &durable::Options::mode(0o600),
        |f| f.write_all(&found.user_data),
    )
    .map_err(|e| Error::Write(format!("{}: {e}", paths.state_dir.display())))?;
    if let Some(nc) = &found.network_config {
        durable::replace(&paths.state_dir.join("network-config"), nc)
            .map_err(|e| Error::Write(format!("{}: {e}", paths.state_dir.display())))?;
    }
    Ok(())
}

/// Writes one file under `root`, refusing to follow a symbolic link anywhere on the way (a
/// link under /var must not redirect a write to the rest of the system).
fn write_file(f: &WriteFile, root: &Path) -> std::io::Result<()> {
    let rel = f.path.strip_prefix("/").unwrap_or(&f.path);
    let mut dir = root.to_path_buf();
    let parents: Vec<Component> = rel
        .parent()
        .map(|p| p.components().collect())
        .unwrap_or_default();
    for c in parents {
        dir.push(c);
        match std::fs::symlink_metadata(&dir) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(std::io::Error::other(format!(
                    "{} is not a directory (or is a symbolic link)",
                    dir.display()
                )))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::create_dir(&dir)?;
                std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
            }
            Err(e) => return Err(e),
        }
    }
    let path = root.join(rel);
    if f.append {
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .mode(f.mode)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)?;
        file.write_all(&f.content)?;
        // Mode and owner on the descriptor: a path could have been swapped for a link since.
        file.set_permissions(std::fs::Permissions::from_mode(f.mode))?;
        std::os::unix::fs::fchown(&file, Some(f.uid), Some(f.gid))?;
        file.sync_all()?;
    } else {
        // The temporary file is never a link, and rename(2) replaces a link at the target
        // itself, never its target; mode and owner are set on the descriptor before it.
        let opts = durable::Options {
            mode: f.mode,
            owner: Some((f.uid, f.gid)),
            create_dirs: false,
        };
        durable::replace_with(&path, &opts, |file| file.write_all(&f.content))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use keelson_spec::{self as spec, Source};
    use std::os::unix::fs::MetadataExt;

    const KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAILLQlN97l7/l7fgXF9PlMnkcATyASDAzrU0bNgZfDbPW test@keelson";

    /// A node: a fake /sys with fw_cfg, a root with /var and /etc, the image's system services
    /// (with an `admin` service like the real one), and the real config validation.
    struct Node {
        dir: tempfile::TempDir,
        system: Vec<spec::Service>,
    }

    impl Node {
        fn new() -> Node {
            let dir = tempfile::tempdir().unwrap();
            for d in ["sys/class/block", "dev", "root/etc", "root/var/lib/keelson"] {
                std::fs::create_dir_all(dir.path().join(d)).unwrap();
            }
            let system = spec::parse_file(
                Path::new("/usr/lib/keelson/services.d/10-system.toml"),
                r#"
version = 1
[services.admin]
image = "/usr/lib/keelson/images/admin"
command = ["dropbear"]
enabled = false
mounts = [{ type = "volume", source = "admin", target = "/root" }]
"#,
                Source::System,
            )
            .unwrap();
            Node { dir, system }
        }
        fn path(&self, p: &str) -> PathBuf {
            self.dir.path().join(p)
        }
        fn fw_cfg(&self, name: &str, content: &str) {
            let d = self
                .path("sys/firmware/qemu_fw_cfg/by_name/opt/keelson")
                .join(name);
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("raw"), content).unwrap();
        }
        fn paths(&self) -> Paths {
            Paths {
                state_dir: self.path("root/var/lib/keelson/firstboot"),
                config_file: self.path("root/var/lib/keelson/user-data.toml"),
                root: self.path("root"),
            }
        }
        fn boot(&self) -> FirstBoot {
            let probe = Probe {
                sys: self.path("sys"),
                dev: self.path("dev"),
                cmdline: String::new(),
                provisioned: false,
            };
            let validate = |text: &str, origin: &str| -> Result<(), spec::ConfigError> {
                let doc = spec::parse_document(Path::new(origin), text, Source::UserData)?;
                spec::Config::from_layers(self.system.clone(), vec![doc]).map(drop)
            };
            run(&probe, &self.paths(), &validate)
        }
        /// The effective config after boot, as sysd would load it.
        fn config(&self) -> spec::Config {
            let sources = spec::Sources {
                system_dir: self.path("none"),
                userdata_file: self.paths().config_file,
                user_file: self.path("root/var/lib/keelson/services.toml"),
            };
            let ud = sources.read_userdata_text().unwrap();
            sources
                .combine(self.system.clone(), ud.as_deref(), None)
                .unwrap()
        }
    }

    #[test]
    fn no_user_data_changes_nothing() {
        let node = Node::new();
        let st = node.boot();
        assert_eq!(st.outcome, Outcome::NoUserData);
        assert_eq!(st.probe_log.len(), 3, "{:?}", st.probe_log);
        assert!(!node.path("root/var/lib/keelson/firstboot").exists());
    }

    #[test]
    fn cloud_config_applies_once_per_instance() {
        let node = Node::new();
        node.fw_cfg("meta-data", "instance-id: i-1\nlocal-hostname: from-meta\n");
        node.fw_cfg(
            "user-data",
            &format!(
                r#"#cloud-config
hostname: web-1
ssh_authorized_keys: ["{KEY}"]
users:
  - name: alice
    ssh_authorized_keys: ["{KEY}"]
    sudo: ALL
write_files:
  - path: /var/lib/app/app.conf
    content: "port = 80\n"
    permissions: '0640'
  - path: /etc/motd
    content: hi
  - path: /var/lib/keelson/machine-id
    content: x
runcmd: [reboot]
"#
            ),
        );
        let st = node.boot();
        assert_eq!(st.outcome, Outcome::Applied, "{:?}", st.error);
        assert_eq!(st.source.as_deref(), Some("fw_cfg"));
        assert_eq!(st.instance_id.as_deref(), Some("i-1"));
        assert_eq!(st.format.as_deref(), Some("cloud-config"));
        let w = st.warnings.join("\n");
        assert!(
            w.contains("not supported, ignored: users[0].sudo, runcmd"),
            "{w}"
        );
        assert!(w.contains("/etc/motd (only paths under /var"), "{w}");
        assert!(
            w.contains("/var/lib/keelson/machine-id (Keelson's own state"),
            "{w}"
        );
        assert!(w.contains("`alice` logs in as root"), "{w}");

        let conf = node.path("root/var/lib/app/app.conf");
        assert_eq!(std::fs::read_to_string(&conf).unwrap(), "port = 80\n");
        assert_eq!(std::fs::metadata(&conf).unwrap().mode() & 0o7777, 0o640);
        assert!(!node.path("root/etc/motd").exists());
        assert!(!node.path("root/var/lib/keelson/machine-id").exists());
        let cfg = node.config();
        assert_eq!(
            cfg.net.host.hostname.as_deref(),
            Some("web-1"),
            "cloud-config wins over meta-data"
        );
        assert_eq!(cfg.admin.ssh_authorized_keys, [KEY]);
        assert!(
            cfg.services["admin"].spec.enabled,
            "keys turn the admin service on"
        );
        assert_eq!(cfg.services["admin"].source, Source::System);

        // The next boot of the same instance does not re-apply: a file changed since stays.
        std::fs::write(&conf, "edited\n").unwrap();
        let st = node.boot();
        assert_eq!(st.outcome, Outcome::AlreadyApplied);
        assert!(st.applied_at_ms.is_some());
        assert_eq!(std::fs::read_to_string(&conf).unwrap(), "edited\n");

        // A new instance does; its empty user data removes the old instance's config layer.
        node.fw_cfg("meta-data", "instance-id: i-2\n");
        node.fw_cfg("user-data", "#cloud-config\n");
        let st = node.boot();
        assert_eq!(st.outcome, Outcome::Applied, "{:?}", st.error);
        assert!(!node.paths().config_file.exists());
        assert!(!node.config().services["admin"].spec.enabled);
    }

    #[test]
    fn keelson_toml_becomes_the_user_data_layer() {
        let node = Node::new();
        node.fw_cfg(
            "user-data",
            &format!(
                "version = 1\n[admin]\nssh_authorized_keys = [\"{KEY}\"]\n\n[services.hello]\nimage = \"/usr/lib/keelson/images/base\"\ncommand = [\"sleep\", \"1d\"]\n"
            ),
        );
        let st = node.boot();
        assert_eq!(st.outcome, Outcome::Applied, "{:?}", st.error);
        assert_eq!(st.format.as_deref(), Some("toml"));
        assert!(st.instance_id.unwrap().starts_with("fwcfg-"));
        let cfg = node.config();
        assert_eq!(cfg.services["hello"].source, Source::UserData);
        assert!(cfg.services["admin"].spec.enabled);
    }

    #[test]
    fn meta_data_hostname_and_network_config_join_the_layer() {
        let node = Node::new();
        node.fw_cfg("meta-data", "instance-id: n-1\nlocal-hostname: meta-node\n");
        node.fw_cfg(
            "network-config",
            "version: 2\nethernets:\n  eth0:\n    addresses: [10.0.2.15/24]\n    gateway4: 10.0.2.2\n    nameservers: {addresses: [10.0.2.3]}\n",
        );
        // TOML user data with its own [host]: meta-data's name only fills a gap.
        node.fw_cfg("user-data", "version = 1\n");
        let st = node.boot();
        assert_eq!(st.outcome, Outcome::Applied, "{:?}", st.error);
        let cfg = node.config();
        assert_eq!(cfg.net.host.hostname.as_deref(), Some("meta-node"));
        let eth0 = &cfg.net.network.interfaces["eth0"];
        assert_eq!(eth0.addresses, ["10.0.2.15/24"]);
        assert_eq!(
            eth0.gateway.map(|g| g.to_string()).as_deref(),
            Some("10.0.2.2")
        );
        assert!(!eth0.dhcp);

        node.fw_cfg("meta-data", "instance-id: n-2\nlocal-hostname: meta-node\n");
        node.fw_cfg(
            "user-data",
            "version = 1\n[host]\nhostname = \"mine\"\n[network]\ndns = [\"1.1.1.1\"]\n",
        );
        let st = node.boot();
        assert_eq!(st.outcome, Outcome::Applied, "{:?}", st.error);
        assert!(
            st.warnings
                .iter()
                .any(|w| w.contains("has its own [network]")),
            "{:?}",
            st.warnings
        );
        let cfg = node.config();
        assert_eq!(cfg.net.host.hostname.as_deref(), Some("mine"));
        assert!(cfg.net.network.interfaces.is_empty());

        // A network-config the schema refuses is an error like any other.
        node.fw_cfg("meta-data", "instance-id: n-3\n");
        node.fw_cfg("user-data", "#cloud-config\n");
        node.fw_cfg(
            "network-config",
            "version: 2\nethernets:\n  eth0:\n    addresses: [10.0.2.300/24]\n",
        );
        let st = node.boot();
        assert_eq!(st.outcome, Outcome::Rejected);
        assert!(
            st.error.as_deref().unwrap_or("").contains("10.0.2.300"),
            "{:?}",
            st.error
        );
    }

    #[test]
    fn keelson_toml_through_write_files_merges_with_keys() {
        let node = Node::new();
        node.fw_cfg(
            "user-data",
            &format!(
                r#"#cloud-config
ssh_authorized_keys: ["{KEY}"]
write_files:
  - path: /etc/keelson/config.toml
    content: |
      version = 1
      [services.hello]
      image = "/usr/lib/keelson/images/base"
      command = ["sleep", "1d"]
"#
            ),
        );
        let st = node.boot();
        assert_eq!(st.outcome, Outcome::Applied, "{:?}", st.error);
        let cfg = node.config();
        assert!(
            cfg.services.contains_key("hello"),
            "{}",
            std::fs::read_to_string(node.paths().config_file).unwrap()
        );
        assert_eq!(cfg.admin.ssh_authorized_keys, [KEY]);
    }

    #[test]
    fn invalid_user_data_is_reported_and_keeps_the_last_good_config() {
        let node = Node::new();
        node.fw_cfg("meta-data", "instance-id: good\n");
        node.fw_cfg(
            "user-data",
            &format!("#cloud-config\nssh_authorized_keys: [\"{KEY}\"]\n"),
        );
        assert_eq!(node.boot().outcome, Outcome::Applied);
        let before = std::fs::read_to_string(node.paths().config_file).unwrap();

        for (data, want) in [
            (
                "#cloud-config\nhostname: ok\nwrite_files:\n  - path: /var/x\n    append: maybe\n"
                    .to_string(),
                "fw_cfg: user-data:5:",
            ),
            (
                "version = 1\n[services.web]\nimage = \"/x\"\nmemory = 5\n".to_string(),
                "fw_cfg: user-data:4:1: services.web.memory: unknown field `memory`",
            ),
            (
                "version = 1\n[services.admin]\nimage = \"/x\"\n".to_string(),
                "is already defined at /usr/lib/keelson/services.d/10-system.toml",
            ),
            (
                "#!/bin/sh\nrm -rf /\n".to_string(),
                "script (#!) user data is not supported",
            ),
        ] {
            node.fw_cfg("meta-data", "instance-id: bad\n");
            node.fw_cfg("user-data", &data);
            let st = node.boot();
            assert_eq!(st.outcome, Outcome::Rejected, "{data}");
            let e = st.error.unwrap();
            assert!(e.contains(want), "{data}: {e}");
            // Nothing was written: the previous instance's layer and identity stay.
            assert_eq!(
                std::fs::read_to_string(node.paths().config_file).unwrap(),
                before
            );
            assert_eq!(
                std::fs::read_to_string(node.path("root/var/lib/keelson/firstboot/instance-id"))
                    .unwrap(),
                "good\n"
            );
            assert!(!node.path("root/var/x").exists());
            assert_eq!(node.config().net.host.hostname, None);
        }
    }

    #[test]
    fn write_files_never_follow_symbolic_links() {
        let node = Node::new();
        std::fs::create_dir_all(node.path("root/var/lib")).unwrap();
        std::os::unix::fs::symlink(node.path("root/etc"), node.path("root/var/lib/evil")).unwrap();
        node.fw_cfg(
            "user-data",
            "#cloud-config\nwrite_files:\n  - path: /var/lib/evil/passwd\n    content: x\n",
        );
        let st = node.boot();
        assert_eq!(st.outcome, Outcome::Rejected);
        assert!(st
            .error
            .unwrap()
            .contains("is not a directory (or is a symbolic link)"));
        assert!(!node.path("root/etc/passwd").exists());
    }
}
