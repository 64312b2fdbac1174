//! Wire types of engine extensions (`GET /v1/extensions`, `keelctl extensions`).

use serde::{Deserialize, Serialize};

/// `GET /v1/extensions`: what the node runs for its OS version, and what config asks for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExtensionsView {
    /// The running OS version (os-release `VERSION_ID`), whose set is active.
    pub os_version: String,
    /// `[extensions] enabled` of the effective config.
    pub enabled: Vec<String>,
    pub extensions: Vec<ExtensionStatus>,
    /// The last failure of a download or activation, with its reason.
    pub last_error: Option<String>,
}

/// One extension of the running version's set, or one that config enables and the node does
/// not have yet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExtensionStatus {
    pub name: String,
    /// Its own version (empty while pending).
    pub version: String,
    /// `active` (mounted and merged), `refused` (see `error`), `pending` (enabled, not yet
    /// downloaded), `disabled` (active until the next activation, no longer enabled).
    pub state: String,
    /// Its dm-verity root hash (hex).
    pub roothash: String,
    /// The OS version its extension-release names.
    pub built_for: String,
    /// The repository target it came from.
    pub source: String,
    pub error: Option<String>,
}
