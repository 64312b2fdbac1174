//! The concerns that live outside the supervisor, adapted to the traits of those who use them:
//! the image store, the update agent, the host network and first boot's report for
//! `keelson-api`, and the host network for the supervisor ([`keelson_supervisor::Network`]).
//! Those crates know nothing of the API or the supervisor; here their errors become
//! [`Failure`]s by their kind ([`keelson_api::failure`]), and what they report becomes events.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use keelson_api::{failure, Failure};
use keelson_common::api::firstboot::FirstBoot;
use keelson_common::api::images::{ImageInfo, ImagesRemoved, PullProgress};
use keelson_common::api::network::NetworkStatus;
use keelson_common::api::update::{ApplyRequest, UpdateCheck, UpdateStatus};
use keelson_common::api::ServiceStatus;
use keelson_images::manager::{self, Users};
use keelson_net::{Net, Online};
use keelson_runtime::netplug::Endpoint;
use keelson_runtime::RootModules;
use keelson_spec::network::{NetConfig, PortSpec};
use keelson_supervisor::EventBus;
use tokio::sync::{mpsc, watch};

/// The image store and registry pulls (`/v1/images*`). Which images are in use comes from the
/// services' statuses the supervisor publishes. A pull unpacks layers over overlay mounts:
/// early in boot it waits for the root's modules first.
pub struct Images {
    images: Arc<manager::Images>,
    services: watch::Receiver<Vec<ServiceStatus>>,
    events: Arc<EventBus>,
    modules: RootModules,
}

impl Images {
    pub fn new(
        images: Arc<manager::Images>,
        services: watch::Receiver<Vec<ServiceStatus>>,
        events: Arc<EventBus>,
        modules: RootModules,
    ) -> Self {
        Images {
            images,
            services,
            events,
            modules,
        }
    }

    /// Service names by the normalized reference of their registry `image`.
    fn users(&self) -> Users {
        let services = self.services.borrow();
        manager::users(services.iter().map(|s| (s.name.as_str(), s.image.as_str())))
    }
}

/// A pull's milestone as an event.
fn tell(events: &EventBus, item: &PullProgress) {
    if let Some(n) = manager::milestone(item) {
        events.emit(None, n.kind, n.message);
    }
}

#[async_trait]
impl keelson_api::Images for Images {
    fn list(&self) -> Result<Vec<ImageInfo>, Failure> {
        self.images.list(&self.users()).map_err(failure)
    }

    fn pull(&self, reference: &str) -> Result<mpsc::UnboundedReceiver<PullProgress>, Failure> {
        keelson_spec::reference::parse(reference)
            .map_err(|e| Failure::bad_request(format!("image {reference:?}: {e}")))?;
        let (tx, rx) = mpsc::unbounded_channel();
        let (images, events) = (Arc::clone(&self.images), Arc::clone(&self.events));
        let (reference, modules) = (reference.to_string(), self.modules.clone());
        tokio::spawn(async move {
            modules.wait().await;
            let (progress, mut items) = mpsc::unbounded_channel();
            let pull = async {
                let pulled = images.pull(&reference, &progress).await;
                drop(progress);
                pulled
            };
            let forward = async {
                while let Some(item) = items.recv().await {
                    tell(&events, &item);
                    let _ = tx.send(item);
                }
            };
            if let (Err(e), ()) = tokio::join!(pull, forward) {
                let item = PullProgress::Error {
                    message: format!("{e:#}"),
                };
                tell(&events, &item);
                let _ = tx.send(item);
            }
        });
        Ok(rx)
    }

    async fn remove(&self, reference: &str) -> Result<ImagesRemoved, Failure> {
        // Deleting unpacked trees can take a while: off the runtime's thread.
        let (images, users, reference) = (
            Arc::clone(&self.images),
            self.users(),
            reference.to_string(),
        );
        let report = tokio::task::spawn_blocking(move || images.remove(&reference, &users))
            .await
            .map_err(|e| Failure::internal(format!("removing the image: {e}")))?
            .map_err(failure)?;
        self.events.emit(
            None,
            "image-removed",
            format!(
                "{}: {} blobs, {} bytes freed",
                report.removed.join(", "),
                report.blobs,
                report.freed_bytes
            ),
        );
        Ok(report)
    }

    async fn prune(&self) -> Result<ImagesRemoved, Failure> {
        let (images, users) = (Arc::clone(&self.images), self.users());
        let report = tokio::task::spawn_blocking(move || images.prune(&users))
            .await
            .map_err(|e| Failure::internal(format!("pruning images: {e}")))?
            .map_err(failure)?;
        self.events.emit(
            None,
            "images-pruned",
            format!(
                "{} images, {} blobs, {} bytes freed",
                report.removed.len(),
                report.blobs,
                report.freed_bytes
            ),
        );
        Ok(report)
    }
}

/// The update agent (`/v1/update/*`). What may read or write the ESP (vfat) or the UEFI
/// variables (efivarfs) waits for the root's modules first (only early in boot).
pub struct Updates {
    pub agent: Arc<keelson_update::Agent>,
    pub modules: RootModules,
}

#[async_trait]
impl keelson_api::Updates for Updates {
    fn status(&self) -> UpdateStatus {
        self.agent.status()
    }

    async fn check(&self) -> Result<UpdateCheck, Failure> {
        self.modules.wait().await;
        self.agent.check().await.map_err(failure)
    }

    async fn apply(&self, req: ApplyRequest) -> Result<UpdateStatus, Failure> {
        self.modules.wait().await;
        self.agent.apply(req).await.map_err(failure)
    }

    async fn cancel(&self) -> Result<UpdateStatus, Failure> {
        self.modules.wait().await;
        self.agent.cancel().await.map_err(failure)
    }

    async fn rollback(&self, reboot: bool) -> Result<UpdateStatus, Failure> {
        self.modules.wait().await;
        self.agent.rollback(reboot).await.map_err(failure)
    }
}

/// The host network manager, when sysd manages the host network: for the API
/// (`GET /v1/network`) and for the supervisor (network-online, apply's try, bridge services).
pub struct HostNetwork {
    net: Arc<Net>,
    online: watch::Receiver<bool>,
}

impl HostNetwork {
    /// Follows the manager's online state (inside the tokio runtime).
    pub fn new(net: Arc<Net>) -> Self {
        let lets_start = |online: &Online| !matches!(online, Online::Pending);
        let mut changes = net.online_changes();
        let (tx, online) = watch::channel(lets_start(&changes.borrow_and_update()));
        tokio::spawn(async move {
            while changes.changed().await.is_ok() {
                let now = lets_start(&changes.borrow_and_update());
                tx.send_if_modified(|was| std::mem::replace(was, now) != now);
            }
        });
        HostNetwork { net, online }
    }

    /// Stops the DHCP clients (each releases its lease).
    pub async fn shutdown(&self) {
        self.net.shutdown().await;
    }
}

#[async_trait]
impl keelson_api::HostNetwork for HostNetwork {
    async fn status(&self) -> NetworkStatus {
        self.net.status().await
    }
}

#[async_trait]
impl keelson_supervisor::Network for HostNetwork {
    fn online(&self) -> watch::Receiver<bool> {
        self.online.clone()
    }

    async fn apply(&self, config: NetConfig) -> anyhow::Result<()> {
        self.net.apply(config).await?;
        Ok(())
    }

    async fn attach(&self, service: &str, ports: &[PortSpec]) -> anyhow::Result<Endpoint> {
        Ok(self.net.attach(service, ports).await?)
    }

    async fn reattach(&self, kept: &Endpoint, ports: &[PortSpec]) -> anyhow::Result<()> {
        Ok(self.net.reattach(kept, ports).await?)
    }

    fn hosts_file(&self) -> PathBuf {
        self.net.hosts_file()
    }
}

/// This boot's first-boot report (`GET /v1/firstboot`): empty until first boot has run (and
/// for good with `--no-firstboot`).
#[derive(Default)]
pub struct FirstBootRecord(Mutex<Option<FirstBoot>>);

impl FirstBootRecord {
    /// Keeps `status` and says what happened, on the console and as events.
    pub fn record(&self, status: FirstBoot, events: &EventBus) {
        for n in keelson_firstboot::notices(&status) {
            events.emit(None, n.kind, n.message);
        }
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(status);
    }
}

impl keelson_api::FirstBootReport for FirstBootRecord {
    fn report(&self) -> Option<FirstBoot> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}
