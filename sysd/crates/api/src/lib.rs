//! sysd's local API: HTTP/1.1 + JSON on a root-only unix socket (`/run/keelson/sysd.sock`).
//! The wire types live in `keelson_common::api` (shared with keelctl); the endpoints are
//! documented in `docs/api.md`. The server only translates HTTP to calls on a [`Backend`] (the
//! supervisor implements it), which keeps routing testable without containers.
//!
//! This crate is the transport edge: it alone turns a failure's
//! [`Kind`](keelson_common::error::Kind) into an HTTP status ([`Failure::of`], [`failure`]).
//! It knows the wire types and nothing of the crates that implement the backend.

use std::future::Future;

use keelson_common::api::config::ConfigView;
use keelson_common::api::firstboot::FirstBoot;
use keelson_common::api::images::{ImageInfo, ImagesRemoved, PullProgress};
use keelson_common::api::network::NetworkStatus;
use keelson_common::api::update::{ApplyRequest, UpdateCheck, UpdateStatus};
use keelson_common::api::{ApplyPlan, Event, LogLine, ServiceStatus, Stats, Version};
use keelson_common::error::{Classify, Kind};
use tokio::sync::{broadcast, mpsc};

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

    /// The concern behind the call is absent from this sysd (the one place that answers 501).
    pub fn absent(message: impl Into<String>) -> Self {
        Failure {
            status: 501,
            message: message.into(),
        }
    }

    /// A failure of `kind`: the one place a domain error's kind becomes an HTTP status.
    pub fn of(kind: Kind, message: impl Into<String>) -> Self {
        let status = match kind {
            Kind::Invalid => 400,
            Kind::NotFound => 404,
            Kind::Conflict => 409,
            Kind::Unavailable => 503,
            Kind::Upstream => 502,
            Kind::Internal => 500,
        };
        Failure {
            status,
            message: message.into(),
        }
    }
}

/// A library's error as the API answers it: the status of its kind, its text.
pub fn failure<E: Classify + std::fmt::Display>(e: E) -> Failure {
    Failure::of(e.kind(), e.to_string())
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
        async { Err(Failure::absent("kill is not supported")) }
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
    /// The host network (`GET /v1/network`): links, addresses, routes, DNS, leases.
    fn network(&self) -> impl Future<Output = Result<NetworkStatus, Failure>> + Send {
        async {
            Err(Failure::absent(
                "this sysd does not manage the host network",
            ))
        }
    }

    /// The image store's images (`keelctl images`).
    fn images(&self) -> Result<Vec<ImageInfo>, Failure> {
        Err(not_supported("images"))
    }
    /// Starts pulling `reference`; its progress, ending with `done` or `error`. A bad
    /// reference is a 400 before anything starts. The pull goes on if the reader leaves.
    fn pull_image(
        &self,
        reference: &str,
    ) -> Result<mpsc::UnboundedReceiver<PullProgress>, Failure> {
        let _ = reference;
        Err(not_supported("pull"))
    }
    /// Removes one reference (409 while a configured service uses it) and collects garbage.
    fn remove_image(
        &self,
        reference: &str,
    ) -> impl Future<Output = Result<ImagesRemoved, Failure>> + Send {
        let _ = reference;
        async { Err(not_supported("images rm")) }
    }
    /// Removes every image no configured service uses, then collects garbage.
    fn prune_images(&self) -> impl Future<Output = Result<ImagesRemoved, Failure>> + Send {
        async { Err(not_supported("images prune")) }
    }

    /// `GET /v1/update/status`.
    fn update_status(&self) -> Result<UpdateStatus, Failure> {
        Err(no_updates())
    }
    /// `POST /v1/update/check`: refresh the signed metadata, say what is offered.
    fn update_check(&self) -> impl Future<Output = Result<UpdateCheck, Failure>> + Send {
        async { Err(no_updates()) }
    }
    /// `POST /v1/update/apply`: returns once the version is chosen; the install continues.
    fn update_apply(
        &self,
        req: ApplyRequest,
    ) -> impl Future<Output = Result<UpdateStatus, Failure>> + Send {
        let _ = req;
        async { Err(no_updates()) }
    }
    /// `POST /v1/update/cancel`: stop an install, or discard a staged version.
    fn update_cancel(&self) -> impl Future<Output = Result<UpdateStatus, Failure>> + Send {
        async { Err(no_updates()) }
    }
    /// `POST /v1/update/rollback`: make the other slot boot.
    fn update_rollback(
        &self,
        reboot: bool,
    ) -> impl Future<Output = Result<UpdateStatus, Failure>> + Send {
        let _ = reboot;
        async { Err(no_updates()) }
    }
    /// What first boot found and did at this boot (`None` until it has run).
    fn firstboot(&self) -> Option<FirstBoot> {
        None
    }
    /// The effective config and its layers (`None`: not loaded yet).
    fn config(&self) -> Option<ConfigView> {
        None
    }
}

fn not_supported(what: &str) -> Failure {
    Failure::absent(format!("{what} is not supported"))
}

fn no_updates() -> Failure {
    Failure::absent("updates are not supported here")
}
