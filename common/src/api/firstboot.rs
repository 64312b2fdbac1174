//! First-boot configuration (`GET /v1/firstboot`): what the datasources found at this boot and
//! what became of it.

use serde::{Deserialize, Serialize};

/// The outcome of this boot's first-boot step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    /// No datasource had user data; the image defaults (and any config from the API) apply.
    NoUserData,
    /// User data of a new instance was validated and applied at this boot.
    Applied,
    /// The instance was configured at an earlier boot; its persisted config is used.
    AlreadyApplied,
    /// User data was found but refused (see `error`); the node runs the last good config.
    Rejected,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::NoUserData => "no-user-data",
            Outcome::Applied => "applied",
            Outcome::AlreadyApplied => "already-applied",
            Outcome::Rejected => "rejected",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FirstBoot {
    pub outcome: Outcome,
    /// The datasource that had user data (`fw_cfg`, `nocloud:/dev/vdb`, ...).
    pub source: Option<String>,
    pub instance_id: Option<String>,
    /// `cloud-config`, `toml` or `empty`.
    pub format: Option<String>,
    /// Why the user data was refused, with file, line and key where known.
    pub error: Option<String>,
    /// Things applied with a caveat, and keys that were present but not supported.
    pub warnings: Vec<String>,
    /// One line per datasource tried.
    pub probe_log: Vec<String>,
    /// How long probing and applying took.
    pub duration_ms: u64,
    /// When the current instance was first applied (Unix ms), if it was.
    pub applied_at_ms: Option<u64>,
}
