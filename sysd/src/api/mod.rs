//! sysd's local API: HTTP/1.1 + JSON on a root-only unix socket (`/run/keelson/sysd.sock`).
//! The wire types live in `keelson_common::api` (shared with keelctl); the endpoints are
//! documented in `docs/api.md`. The server only translates HTTP to calls on a [`Backend`] (the
//! supervisor implements it), which keeps routing testable without containers.

use std::future::Future;

use keelson_common::api::config::ConfigView;
use keelson_common::api::firstboot::FirstBoot;
use keelson_common::api::{ApplyPlan, Event, LogLine, ServiceStatus, Stats, Version};
use tokio::sync::broadcast;

pub mod server;

/// An API call that did not succeed: the HTTP status and a message for a person.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub status: u16,
    pub message: String,
}

impl Failure {
    pub fn bad_request(message: impl Into<String>) -> Self {
        Failure {
            status: 400,
            message: message.into(),
        }
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        Failure {
            status: 404,
            message: message.into(),
        }
    }
    pub fn conflict(message: impl Into<String>) -> Self {
        Failure {
            status: 409,
            message: message.into(),
        }
    }
    pub fn internal(message: impl Into<String>) -> Self {
        Failure {
            status: 500,
            message: message.into(),
        }
    }
}

/// Past lines plus, when following, the live ones.
pub struct LogFeed {
    pub backlog: Vec<LogLine>,
    pub live: Option<broadcast::Receiver<LogLine>>,
}

/// Past events (from `since`) plus the live stream.
pub struct EventFeed {
    pub backlog: Vec<Event>,
    pub live: broadcast::Receiver<Event>,
}

/// What the API needs from the supervisor. Actions return once the supervisor has taken the
/// request (not when the service is ready); the returned status reflects that moment.
pub trait Backend: Send + Sync + 'static {
    fn version(&self) -> Version;
    fn list(&self) -> Vec<ServiceStatus>;
    fn status(&self, name: &str) -> Result<ServiceStatus, Failure>;
    fn start(&self, name: &str) -> impl Future<Output = Result<ServiceStatus, Failure>> + Send;
    fn stop(&self, name: &str) -> impl Future<Output = Result<ServiceStatus, Failure>> + Send;
    fn restart(&self, name: &str) -> impl Future<Output = Result<ServiceStatus, Failure>> + Send;
    /// Sends a signal to the service's main process (`keelctl kill`).
    fn kill(
        &self,
        name: &str,
        signal: i32,
    ) -> impl Future<Output = Result<ServiceStatus, Failure>> + Send {
        let _ = (name, signal);
        async {
            Err(Failure {
                status: 501,
                message: "kill is not supported".into(),
            })
        }
    }
    /// `tail`: how many past lines (None = all kept in memory); `follow`: also stream new ones.
    fn logs(&self, name: &str, tail: Option<usize>, follow: bool) -> Result<LogFeed, Failure>;
    /// Events with `seq > since` still in memory, then live ones.
    fn events(&self, since: Option<u64>) -> EventFeed;
    fn stats(&self) -> Vec<Stats>;
    /// `config` is the TOML text of the user's service config (the whole of it). Invalid
    /// config: a 400 whose message names the file position, service and field; nothing changes.
    fn apply(
        &self,
        config: String,
        dry_run: bool,
    ) -> impl Future<Output = Result<ApplyPlan, Failure>> + Send;
    /// What first boot found and did at this boot (`None` until it has run).
    fn firstboot(&self) -> Option<FirstBoot> {
        None
    }
    /// The effective config and its layers (`None`: not loaded yet).
    fn config(&self) -> Option<ConfigView> {
        None
    }
}
