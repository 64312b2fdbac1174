//! sysd's API: HTTP/1.1 + JSON on a root-only unix socket (`/run/keelson/sysd.sock`) and, with
//! `[api.remote]`, the same routes on a TCP port over mutual TLS ([`remote`]), where the client
//! certificate's role decides what may be asked.
//! The wire types live in `keelson_common::api` (shared with keelctl); the endpoints are
//! documented in `docs/api.md`. The server only translates HTTP to calls on one trait per
//! concern ([`Services`], [`Config`], [`Images`], [`Updates`], [`HostNetwork`],
//! [`FirstBootReport`]), gathered in [`Concerns`]: the supervisor implements services and
//! config, the `sysd` binary adapts the other crates, and routing stays testable without
//! containers. A concern this sysd does not have answers 501.
//!
//! This crate is the transport edge: it alone turns a failure's
//! [`Kind`](keelson_common::error::Kind) into an HTTP status ([`Failure::of`], [`failure`]).
//! It knows the wire types and nothing of the crates that implement the concerns.

use std::sync::Arc;

use async_trait::async_trait;
use keelson_common::api::boot::Boot;
use keelson_common::api::config::ConfigView;
use keelson_common::api::extensions::ExtensionsView;
use keelson_common::api::firstboot::FirstBoot;
use keelson_common::api::images::{ImageInfo, ImagesRemoved, PullProgress};
use keelson_common::api::network::NetworkStatus;
use keelson_common::api::update::{ApplyRequest, UpdateCheck, UpdateStatus};
use keelson_common::api::{ApplyPlan, Event, LogLine, ServiceStatus, Stats, Version};
use keelson_common::error::{Classify, Kind};
use tokio::sync::{broadcast, mpsc};

pub mod remote;
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
    pub fn forbidden(message: impl Into<String>) -> Self {
        Failure {
            status: 403,
            message: message.into(),
        }
    }
    pub fn internal(message: impl Into<String>) -> Self {
        Failure {
            status: 500,
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

/// The services and the daemon itself (the supervisor). Actions return once the supervisor
/// has taken the request (not when the service is ready); the returned status reflects that
/// moment.
#[async_trait]
pub trait Services: Send + Sync {
    fn version(&self) -> Version;
    fn list(&self) -> Vec<ServiceStatus>;
    fn status(&self, name: &str) -> Result<ServiceStatus, Failure>;
    async fn start(&self, name: &str) -> Result<ServiceStatus, Failure>;
    async fn stop(&self, name: &str) -> Result<ServiceStatus, Failure>;
    async fn restart(&self, name: &str) -> Result<ServiceStatus, Failure>;
    /// Sends a signal to the service's main process (`keelctl kill`).
    async fn kill(&self, name: &str, signal: i32) -> Result<ServiceStatus, Failure>;
    /// `tail`: how many past lines (None = all kept in memory); `follow`: also stream new ones.
    fn logs(&self, name: &str, tail: Option<usize>, follow: bool) -> Result<LogFeed, Failure>;
    /// Events with `seq > since` still in memory, then live ones.
    fn events(&self, since: Option<u64>) -> EventFeed;
    fn stats(&self) -> Vec<Stats>;
    /// This boot's timeline: init's record and the services' start-up (`GET /v1/boot`).
    fn boot(&self) -> Result<Boot, Failure> {
        Err(Failure {
            status: 501,
            message: "this sysd keeps no boot timeline".into(),
        })
    }
}

/// The service config: its layers and `apply`.
#[async_trait]
pub trait Config: Send + Sync {
    /// `config` is the TOML text of the user's service config (the whole of it). Invalid
    /// config: a 400 whose message names the file position, service and field; nothing changes.
    async fn apply(&self, config: String, dry_run: bool) -> Result<ApplyPlan, Failure>;
    /// The effective config and its layers (`None`: not loaded yet).
    fn view(&self) -> Option<ConfigView>;
}

/// The image store and registry pulls.
#[async_trait]
pub trait Images: Send + Sync {
    /// The store's images (`keelctl images`).
    fn list(&self) -> Result<Vec<ImageInfo>, Failure>;
    /// Starts pulling `reference`; its progress, ending with `done` or `error`. A bad
    /// reference is a 400 before anything starts. The pull goes on if the reader leaves.
    fn pull(&self, reference: &str) -> Result<mpsc::UnboundedReceiver<PullProgress>, Failure>;
    /// Removes one reference (409 while a configured service uses it) and collects garbage.
    async fn remove(&self, reference: &str) -> Result<ImagesRemoved, Failure>;
    /// Removes every image no configured service uses, then collects garbage.
    async fn prune(&self) -> Result<ImagesRemoved, Failure>;
}

/// The update agent (`/v1/update/*`).
#[async_trait]
pub trait Updates: Send + Sync {
    fn status(&self) -> UpdateStatus;
    /// Refresh the signed metadata, say what is offered.
    async fn check(&self) -> Result<UpdateCheck, Failure>;
    /// Returns once the version is chosen; the install continues.
    async fn apply(&self, req: ApplyRequest) -> Result<UpdateStatus, Failure>;
    /// Stop an install, or discard a staged version.
    async fn cancel(&self) -> Result<UpdateStatus, Failure>;
    /// Make the other slot boot.
    async fn rollback(&self, reboot: bool) -> Result<UpdateStatus, Failure>;
}

/// The host network (`GET /v1/network`).
#[async_trait]
pub trait HostNetwork: Send + Sync {
    /// Links, addresses, routes, DNS, leases.
    async fn status(&self) -> NetworkStatus;
}

/// Engine extensions (`GET /v1/extensions`).
pub trait Extensions: Send + Sync {
    /// What the running version's set looks like and what config enables.
    fn view(&self) -> ExtensionsView;
}

/// What first boot found and did at this boot.
pub trait FirstBootReport: Send + Sync {
    /// `None` until first boot has run.
    fn report(&self) -> Option<FirstBoot>;
}

/// What this sysd serves, concern by concern. An absent concern (`None`) answers 501, in one
/// place ([`Concerns`]' accessors); a test or a smaller daemon serves only what it has.
#[derive(Clone, Default)]
pub struct Concerns {
    pub services: Option<Arc<dyn Services>>,
    pub config: Option<Arc<dyn Config>>,
    pub images: Option<Arc<dyn Images>>,
    pub updates: Option<Arc<dyn Updates>>,
    pub network: Option<Arc<dyn HostNetwork>>,
    pub firstboot: Option<Arc<dyn FirstBootReport>>,
    pub extensions: Option<Arc<dyn Extensions>>,
    /// Answers given, counted by status code (the exporter's `keelson_api_requests_total`).
    pub requests: Arc<RequestCounts>,
}

/// How many requests the API answered with each status code, since sysd started.
#[derive(Debug, Default)]
pub struct RequestCounts(std::sync::Mutex<std::collections::BTreeMap<u16, u64>>);

impl RequestCounts {
    pub fn count(&self, status: u16) {
        *self
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(status)
            .or_default() += 1;
    }

    /// (status code, answers), by code.
    pub fn snapshot(&self) -> Vec<(u16, u64)> {
        let counts = self.0.lock().unwrap_or_else(|p| p.into_inner());
        counts.iter().map(|(k, v)| (*k, *v)).collect()
    }
}

impl Concerns {
    pub(crate) fn services(&self) -> Result<&dyn Services, Failure> {
        present(&self.services, "this sysd runs no services")
    }
    pub(crate) fn config(&self) -> Result<&dyn Config, Failure> {
        present(&self.config, "this sysd has no service config")
    }
    pub(crate) fn images(&self) -> Result<&dyn Images, Failure> {
        present(&self.images, "images are not supported here")
    }
    pub(crate) fn updates(&self) -> Result<&dyn Updates, Failure> {
        present(&self.updates, "updates are not supported here")
    }
    pub(crate) fn network(&self) -> Result<&dyn HostNetwork, Failure> {
        present(
            &self.network,
            "this sysd does not manage the host network (started without --host-network)",
        )
    }
    pub(crate) fn firstboot(&self) -> Result<&dyn FirstBootReport, Failure> {
        present(&self.firstboot, "first boot is not supported here")
    }
    pub(crate) fn extensions(&self) -> Result<&dyn Extensions, Failure> {
        present(
            &self.extensions,
            "extensions are not supported here (a node's sysd runs them)",
        )
    }
}

/// The one place an absent concern becomes an answer: 501 Not Implemented.
fn present<'c, T: ?Sized>(concern: &'c Option<Arc<T>>, absent: &str) -> Result<&'c T, Failure> {
    concern.as_deref().ok_or_else(|| Failure {
        status: 501,
        message: absent.to_string(),
    })
}
