//! `[update]`: the update agent's policy, in the same files as the services (a system file baked
//! into the image, or the user's `services.toml`; the user's table, when present, wins whole).
//! Documented in `docs/config.md`.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::units::Span;
use super::{table, ConfigError, Sources};
use crate::Invalid;

/// When updates are applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Policy {
    /// Only `keelctl update apply` installs (checks are still allowed).
    #[default]
    Manual,
    /// The agent checks every `interval` and, inside `window`, installs and reboots.
    Automatic,
}

impl Policy {
    pub fn as_str(self) -> &'static str {
        match self {
            Policy::Manual => "manual",
            Policy::Automatic => "automatic",
        }
    }
}

/// The `[update]` table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateSpec {
    /// Base URL of the repository (`metadata/` and `targets/` below it), `http://` or `file://`.
    pub repository: Option<String>,
    #[serde(default)]
    pub policy: Policy,
    /// Maintenance window for automatic updates, UTC, `HH:MM-HH:MM` (may wrap midnight).
    pub window: Option<String>,
    /// How often the automatic policy checks.
    #[serde(default = "default_interval")]
    pub interval: Span,
    /// How long a freshly booted version has for every critical service to become healthy
    /// before the boot counts as failed.
    #[serde(default = "default_health_timeout")]
    pub health_timeout: Span,
    /// Boot tries a new version gets (`keelson_<version>+<tries>.efi`) before systemd-boot
    /// falls back to the previous one.
    #[serde(default = "default_tries")]
    pub boot_tries: u32,
    /// Never install a version above this one (pinning).
    pub max_version: Option<String>,
    /// How nodes of a fleet take turns rebooting (`[update.coordination]`; absent: none).
    pub coordination: Option<Coordination>,
    /// Delta updates: build the new root from the running slot's chunks and download only the
    /// missing ones, unless they add up to more than this percentage of the full root
    /// download (then the full payload). 0 turns deltas off.
    #[serde(default = "default_delta_max_percent")]
    pub delta_max_percent: u8,
}

fn default_delta_max_percent() -> u8 {
    70
}

/// Reboot coordination strategies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Strategy {
    /// Reboot when the policy says so, whatever other nodes do.
    None,
    /// Take a slot of the group's semaphore in etcd before rebooting; give it back once the
    /// health gate blessed the new slot (or after a rollback). Flatcar locksmith's `etcd-lock`.
    EtcdLock,
}

/// `[update.coordination]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Coordination {
    pub strategy: Strategy,
    /// etcd client URLs, tried in order (`http://10.0.0.11:2379`).
    #[serde(default = "default_endpoints")]
    pub endpoints: Vec<String>,
    /// Nodes of one group share a semaphore.
    #[serde(default = "default_group")]
    pub group: String,
    /// How many nodes of the group may reboot at once.
    #[serde(default = "default_holders")]
    pub holders: u32,
    /// The lease a held slot hangs on: a node that dies holding the slot frees it after this
    /// long. Longer than a reboot plus the health gate.
    #[serde(default = "default_lease")]
    pub lease: Span,
}

fn default_endpoints() -> Vec<String> {
    vec!["http://127.0.0.1:2379".into()]
}

fn default_group() -> String {
    "default".into()
}

fn default_holders() -> u32 {
    1
}

fn default_lease() -> Span {
    Span(std::time::Duration::from_secs(900))
}

impl Coordination {
    fn check(&self, health_timeout: Span) -> Result<(), Invalid> {
        if self.strategy == Strategy::None {
            return Ok(());
        }
        if self.endpoints.is_empty() {
            return Err(Invalid::from(
                "update.coordination.endpoints: at least one etcd client URL",
            ));
        }
        for (i, e) in self.endpoints.iter().enumerate() {
            let rest = e.strip_prefix("http://").unwrap_or("");
            if rest.is_empty() || rest.contains(['/', ' ']) && !rest.ends_with('/') {
                return Err(Invalid::from(format!(
                    "update.coordination.endpoints[{i}]: {e:?} is not an http://HOST:PORT URL"
                )));
            }
        }
        let group_ok = !self.group.is_empty()
            && self.group.len() <= 64
            && self
                .group
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !group_ok {
            return Err(Invalid::from(format!(
                "update.coordination.group: {:?} must be 1-64 letters, digits, '-' or '_'",
                self.group
            )));
        }
        if self.holders == 0 {
            return Err(Invalid::from(
                "update.coordination.holders: must be at least 1",
            ));
        }
        if self.lease.0 <= health_timeout.0 {
            return Err(Invalid::from(format!(
                "update.coordination.lease: {}s must be longer than update.health_timeout ({}s): the slot must outlive the reboot and the health gate",
                self.lease.0.as_secs(),
                health_timeout.0.as_secs()
            )));
        }
        Ok(())
    }
}

fn default_interval() -> Span {
    Span(std::time::Duration::from_secs(3600))
}

fn default_health_timeout() -> Span {
    Span(std::time::Duration::from_secs(300))
}

fn default_tries() -> u32 {
    3
}

impl Default for UpdateSpec {
    fn default() -> Self {
        UpdateSpec {
            repository: None,
            policy: Policy::Manual,
            window: None,
            interval: default_interval(),
            health_timeout: default_health_timeout(),
            boot_tries: default_tries(),
            max_version: None,
            coordination: None,
            delta_max_percent: default_delta_max_percent(),
        }
    }
}

impl UpdateSpec {
    /// Checks what the types cannot; the message names the field.
    pub fn check(&self) -> Result<(), Invalid> {
        if let Some(url) = &self.repository {
            if !(url.starts_with("http://") || url.starts_with("file:///")) {
                return Err(Invalid::from(format!(
                    "update.repository: {url:?} must be an http:// or file:/// URL"
                )));
            }
        }
        if let Some(w) = &self.window {
            parse_window(w).map_err(|e| format!("update.window: {e}"))?;
        }
        if self.delta_max_percent > 100 {
            return Err(Invalid::from(format!(
                "update.delta_max_percent: {} is above 100",
                self.delta_max_percent
            )));
        }
        if !(1..=7).contains(&self.boot_tries) {
            return Err(Invalid::from("update.boot_tries: must be between 1 and 7"));
        }
        if self.interval.0.as_secs() < 60 {
            return Err(Invalid::from("update.interval: must be at least 1m"));
        }
        if self.health_timeout.0.is_zero() {
            return Err(Invalid::from("update.health_timeout: must be above 0"));
        }
        if let Some(c) = &self.coordination {
            c.check(self.health_timeout)?;
        }
        if self.policy == Policy::Automatic && self.repository.is_none() {
            return Err(Invalid::from(
                "update.policy: \"automatic\" needs update.repository",
            ));
        }
        Ok(())
    }
}

/// `HH:MM-HH:MM` as minutes of the day (start, end).
pub fn parse_window(text: &str) -> Result<(u32, u32), Invalid> {
    let bad = || format!("{text:?} is not a window like \"02:00-04:00\" (UTC)");
    let (a, b) = text.split_once('-').ok_or_else(bad)?;
    let minutes = |t: &str| -> Result<u32, String> {
        let (h, m) = t.trim().split_once(':').ok_or_else(bad)?;
        let (h, m): (u32, u32) = (h.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?);
        if h > 23 || m > 59 {
            return Err(bad());
        }
        Ok(h * 60 + m)
    };
    let (s, e) = (minutes(a)?, minutes(b)?);
    if s == e {
        return Err(Invalid::from(format!(
            "{text:?} is empty (start equals end)"
        )));
    }
    Ok((s, e))
}

/// Whether minute-of-day `now` is inside the window (which may wrap midnight).
pub fn in_window(window: (u32, u32), now: u32) -> bool {
    let (s, e) = window;
    if s < e {
        (s..e).contains(&now)
    } else {
        now >= s || now < e
    }
}

/// Only the `[update]` table of a file (services are the main parser's business).
#[derive(Deserialize)]
struct UpdateOnly {
    update: Option<UpdateSpec>,
}

fn parse(path: &Path, text: &str) -> Result<Option<UpdateSpec>, ConfigError> {
    let doc: UpdateOnly = toml::from_str(text).map_err(|e| table::located(path, text, &e))?;
    if let Some(u) = &doc.update {
        u.check()
            .map_err(|e| ConfigError(format!("{}: {e}", path.display())))?;
    }
    Ok(doc.update)
}

/// The effective `[update]`: the user's table if the user file has one, else user data's, else
/// the last system file's, else the defaults.
pub fn load(sources: &Sources) -> Result<UpdateSpec, ConfigError> {
    Ok(table::load(sources, parse)?.unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_parse_and_wrap() {
        let w = parse_window("22:00-02:00").unwrap();
        assert!(in_window(w, 23 * 60));
        assert!(in_window(w, 60));
        assert!(!in_window(w, 12 * 60));
        assert!(parse_window("25:00-01:00").is_err());
        assert!(parse_window("0200").is_err());
    }

    #[test]
    fn coordination_defaults_and_checks() {
        let text = "version = 1\n[update]\nrepository = \"http://r\"\n[update.coordination]\nstrategy = \"etcd-lock\"\n";
        let u = parse(Path::new("u.toml"), text).unwrap().unwrap();
        let c = u.coordination.unwrap();
        assert_eq!(c.endpoints, ["http://127.0.0.1:2379"]);
        assert_eq!(
            (c.group.as_str(), c.holders, c.lease.0.as_secs()),
            ("default", 1, 900)
        );
        let short = format!("{text}lease = \"1m\"\n");
        let e = parse(Path::new("u.toml"), &short).unwrap_err().0;
        assert!(
            e.contains(
                "update.coordination.lease: 60s must be longer than update.health_timeout (300s)"
            ),
            "{e}"
        );
        let bad = format!("{text}endpoints = [\"https://x:2379\"]\n");
        let e = parse(Path::new("u.toml"), &bad).unwrap_err().0;
        assert!(e.contains("update.coordination.endpoints[0]"), "{e}");
        let zero = format!("{text}holders = 0\n");
        assert!(parse(Path::new("u.toml"), &zero)
            .unwrap_err()
            .0
            .contains("holders"));
        let typo = format!("{text}strategy2 = 1\n");
        assert!(parse(Path::new("u.toml"), &typo).is_err());
    }

    #[test]
    fn bad_values_name_the_field() {
        let text = "version = 1\n[update]\nrepository = \"ftp://x\"\n";
        let err = parse(Path::new("u.toml"), text).unwrap_err().0;
        assert!(err.contains("update.repository"), "{err}");
        let text = "version = 1\n[update]\nbogus = 1\n";
        let err = parse(Path::new("u.toml"), text).unwrap_err().0;
        assert!(err.contains("u.toml:3") && err.contains("bogus"), "{err}");
        let text = "version = 1\n[update]\ndelta_max_percent = 101\n";
        let err = parse(Path::new("u.toml"), text).unwrap_err().0;
        assert!(
            err.contains("update.delta_max_percent: 101 is above 100"),
            "{err}"
        );
        assert_eq!(UpdateSpec::default().delta_max_percent, 70);
    }
}
