//! Wire types of the update agent (`/v1/update/...`, `keelctl update`): what the node runs,
//! what the repository offers, and where an update in progress is.

use serde::{Deserialize, Serialize};

/// `GET /v1/update/status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpdateStatus {
    /// The running version (os-release `IMAGE_VERSION`).
    pub version: String,
    /// The running slot (`a` or `b`).
    pub slot: String,
    /// The running boot entry on the ESP (`keelson_0.2.0+2-1.efi`), when known.
    pub boot_entry: Option<String>,
    /// `pending` while the running slot still has a boot counter (the health gate has not
    /// blessed it yet), `good` once blessed, `unknown` without an ESP (direct kernel boot).
    pub assessment: String,
    /// What the agent is doing now.
    pub phase: Phase,
    /// Bytes written of the current payload, and its total (uncompressed root + verity + UKI).
    pub progress: Option<Progress>,
    /// The version installed in the other slot and waiting for a reboot, if any.
    pub staged: Option<String>,
    /// The last version known good on this node (recorded on /var by the health gate).
    pub last_good: Option<String>,
    /// Set after an automatic rollback: the version whose boot failed.
    pub rolled_back_from: Option<String>,
    /// The last failure of check/apply, with its reason.
    pub last_error: Option<String>,
    /// The configured policy (`manual` or `automatic`).
    pub policy: String,
    /// The repository URL, when configured.
    pub repository: Option<String>,
    /// The fleet's reboot semaphore as this node last saw it (`[update.coordination]`).
    #[serde(default)]
    pub coordination: Option<Coordination>,
}

/// The reboot semaphore of a node's group (`keelctl update status`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Coordination {
    /// `etcd-lock`.
    pub strategy: String,
    pub group: String,
    /// How many may reboot at once.
    pub holders: u32,
    /// This node's name in the group.
    pub node: String,
    /// Who holds a slot, with the version it reboots into: `node2 (0.2.0, since ...)`.
    pub held_by: Vec<String>,
    /// Who waits for one.
    pub waiting: Vec<String>,
    /// Set when a node rolled back from a version: `0.2.0 by node1: <reason>`.
    pub halted: Option<String>,
    /// Why etcd could not be asked, the last time it was.
    pub error: Option<String>,
    /// When this view was taken (RFC 3339).
    pub seen_at: String,
}

/// The agent's state machine, as shown by `keelctl update status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    Idle,
    Checking,
    Downloading,
    Verifying,
    Installing,
    /// The other slot holds a verified update with a fresh boot counter; a reboot boots it.
    Staged,
    /// Waiting for every critical service to become healthy before blessing this boot.
    Assessing,
    /// Staged, waiting for a slot of the fleet's reboot semaphore (`[update.coordination]`).
    WaitingForSlot,
    Rebooting,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Idle => "idle",
            Phase::Checking => "checking",
            Phase::Downloading => "downloading",
            Phase::Verifying => "verifying",
            Phase::Installing => "installing",
            Phase::Staged => "staged",
            Phase::Assessing => "assessing",
            Phase::WaitingForSlot => "waiting-for-slot",
            Phase::Rebooting => "rebooting",
        }
    }
}

/// Progress of an apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    /// Bytes downloaded (compressed, as on the wire).
    pub downloaded: u64,
    /// Bytes of the payload to download.
    pub download_total: u64,
    /// Bytes written to the inactive slot.
    pub written: u64,
}

/// `POST /v1/update/check`: what the repository offers this node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpdateCheck {
    pub current: String,
    /// The version an apply would install (newest allowed by waves and `max_version`).
    pub available: Option<String>,
    /// Every version in the repository's manifest, newest first, with why it is or is not
    /// eligible.
    pub versions: Vec<OfferedVersion>,
}

/// One version of the manifest as seen by this node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OfferedVersion {
    pub version: String,
    /// Compressed download size (root + verity + this slot's UKI).
    pub download_size: u64,
    /// What a delta update would download instead (the root as a patch against this node's
    /// root, or the chunk list and the root's chunks this node lacks; verity; the UKI or its
    /// patch); None when this version would come whole, `delta_note` says why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delta_size: Option<u64>,
    /// Why there is no delta (no chunk list, slot not indexable, over the limit), if none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delta_note: Option<String>,
    /// `eligible`, or why not (`not newer`, `wave: from <time>`, `above max_version 0.3`).
    pub verdict: String,
}

/// `POST /v1/update/apply` body.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApplyRequest {
    /// A specific version instead of the newest eligible one.
    #[serde(default)]
    pub version: Option<String>,
    /// Allow a version older than the running one (and ignore waves).
    #[serde(default)]
    pub force: bool,
    /// Reboot into the new slot once it is staged.
    #[serde(default)]
    pub reboot: bool,
}
