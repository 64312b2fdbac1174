//! What the supervisor and the API use: the store, the registry settings of the current
//! config, and one pull at a time per reference (a second caller waits and then finds the
//! image present).

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use keelson_common::api::images::{ImageInfo, ImagesRemoved, PullProgress};

use super::pull::{self, Progress};
use super::store::{Entry, Store};
use crate::api::Failure;
use crate::spec::reference;
use crate::spec::registries::Registries;
use crate::supervisor::resolve::Image;

pub struct Images {
    store: Store,
    registries: Mutex<Registries>,
    pulls: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

/// Service names by the normalized reference of their `image`.
pub type Users = BTreeMap<String, Vec<String>>;

impl Images {
    pub fn new(root: impl Into<PathBuf>) -> Images {
        Images {
            store: Store::new(root),
            registries: Mutex::new(Registries::new()),
            pulls: Mutex::new(HashMap::new()),
        }
    }

    pub fn set_registries(&self, registries: Registries) {
        *self.registries.lock().unwrap_or_else(|p| p.into_inner()) = registries;
    }

    fn registries(&self) -> Registries {
        self.registries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn pull_lock(&self, name: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut pulls = self.pulls.lock().unwrap_or_else(|p| p.into_inner());
        Arc::clone(pulls.entry(name.to_string()).or_default())
    }

    /// Pulls `image` (again: a tag may have moved), one pull per reference at a time.
    pub async fn pull(&self, image: &str, progress: &Progress) -> Result<Entry> {
        let name = reference::canonical(&reference::parse(image).map_err(anyhow::Error::msg)?);
        let lock = self.pull_lock(&name);
        let _guard = lock.lock().await;
        pull::pull(&self.store, &self.registries(), image, progress).await
    }

    /// The image of a service: from the store if it was pulled before (no registry needed,
    /// so a node restarts its services offline), else pulled now.
    pub async fn ensure(&self, image: &str, progress: &Progress) -> Result<Image> {
        let name = reference::canonical(&reference::parse(image).map_err(anyhow::Error::msg)?);
        let entry = {
            let lock = self.pull_lock(&name);
            let _guard = lock.lock().await;
            match self.store.find(&name)? {
                Some(e) => e,
                None => pull::pull(&self.store, &self.registries(), image, progress).await?,
            }
        };
        let root = self.store.root().to_path_buf();
        tokio::task::spawn_blocking(move || Store::new(root).unpack(&entry))
            .await
            .context("unpacking")?
    }

    pub fn list(&self, users: &Users) -> Result<Vec<ImageInfo>, Failure> {
        self.store
            .list(users)
            .map_err(|e| Failure::internal(format!("{e:#}")))
    }

    pub fn remove(&self, image: &str, users: &Users) -> Result<ImagesRemoved, Failure> {
        let name = reference::canonical(
            &reference::parse(image)
                .map_err(|e| Failure::bad_request(format!("image {image:?}: {e}")))?,
        );
        if let Some(services) = users.get(&name).filter(|s| !s.is_empty()) {
            return Err(Failure::conflict(format!(
                "image {name} is used by {}: change or remove {} first",
                services.join(", "),
                if services.len() == 1 {
                    "that service"
                } else {
                    "those services"
                }
            )));
        }
        let removed = self
            .store
            .remove(&name)
            .map_err(|e| Failure::internal(format!("{e:#}")))?;
        if !removed {
            return Err(Failure::not_found(format!("no image {name} in the store")));
        }
        let mut report = self
            .store
            .gc()
            .map_err(|e| Failure::internal(format!("{e:#}")))?;
        report.removed.push(name);
        Ok(report)
    }

    pub fn prune(&self, users: &Users) -> Result<ImagesRemoved, Failure> {
        let internal = |e: anyhow::Error| Failure::internal(format!("{e:#}"));
        let mut removed = Vec::new();
        for e in self.store.entries().map_err(internal)? {
            if users.get(&e.reference).is_none_or(|s| s.is_empty()) {
                self.store.remove(&e.reference).map_err(internal)?;
                removed.push(e.reference);
            }
        }
        let mut report = self.store.gc().map_err(internal)?;
        report.removed = removed;
        Ok(report)
    }
}

/// A progress sink that also tells the event stream the milestones (not every byte).
pub fn with_events(
    events: impl Fn(&str, String) + Send + Sync + 'static,
    also: Option<tokio::sync::mpsc::UnboundedSender<PullProgress>>,
) -> Progress {
    Arc::new(move |p: PullProgress| {
        let milestone = match &p {
            PullProgress::Resolved {
                reference,
                manifest,
                layers,
                total_bytes,
            } => Some(format!(
                "{reference}: manifest {manifest}, {layers} layers, {total_bytes} bytes"
            )),
            PullProgress::Retrying {
                digest,
                attempt,
                reason,
            } => Some(format!(
                "blob {digest}: attempt {attempt} failed ({reason}); retrying"
            )),
            PullProgress::Verified { digest, size } => {
                Some(format!("blob {digest}: {size} bytes verified"))
            }
            PullProgress::Done {
                reference,
                downloaded_bytes,
                elapsed_ms,
                ..
            } => Some(format!(
                "{reference}: pulled ({downloaded_bytes} bytes downloaded in {elapsed_ms} ms)"
            )),
            PullProgress::Error { message } => Some(message.clone()),
            _ => None,
        };
        if let Some(m) = milestone {
            let kind = match &p {
                PullProgress::Done { .. } => "image-pulled",
                PullProgress::Error { .. } => "image-pull-failed",
                _ => "image-pull",
            };
            events(kind, m);
        }
        if let Some(tx) = &also {
            let _ = tx.send(p);
        }
    })
}
