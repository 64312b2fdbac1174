//! What the supervisor and the API use: the store, the registry settings of the current
//! config, and one pull at a time per reference (a second caller waits and then finds the
//! image present); which services use which image ([`users`]) and which pull progress is
//! worth an event ([`milestone`]).

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use keelson_common::api::images::{ImageInfo, ImagesRemoved, PullProgress};

use super::pull::{self, Progress};
use super::store::{Entry, Store};
use crate::Image;
use keelson_common::error::{Classify, Kind};
use keelson_common::notice::Notice;
use keelson_spec::reference;
use keelson_spec::registries::Registries;

/// Why a store operation of the API failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("image {image:?}: {reason}")]
    BadReference {
        image: String,
        reason: keelson_spec::Invalid,
    },
    #[error("image {name} is used by {}: change or remove {} first", .services.join(", "), if .services.len() == 1 { "that service" } else { "those services" })]
    InUse { name: String, services: Vec<String> },
    #[error("no image {0} in the store")]
    NotFound(String),
    /// The store could not be read or changed (the cause's chain in the text, as the API
    /// has always shown it).
    #[error("{0:#}")]
    Store(anyhow::Error),
}

impl Classify for Error {
    fn kind(&self) -> Kind {
        match self {
            Error::BadReference { .. } => Kind::Invalid,
            Error::InUse { .. } => Kind::Conflict,
            Error::NotFound(_) => Kind::NotFound,
            Error::Store(_) => Kind::Internal,
        }
    }
}

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

    pub fn list(&self, users: &Users) -> Result<Vec<ImageInfo>, Error> {
        self.store.list(users).map_err(Error::Store)
    }

    pub fn remove(&self, image: &str, users: &Users) -> Result<ImagesRemoved, Error> {
        let name = reference::canonical(&reference::parse(image).map_err(|reason| {
            Error::BadReference {
                image: image.to_string(),
                reason,
            }
        })?);
        if let Some(services) = users.get(&name).filter(|s| !s.is_empty()) {
            return Err(Error::InUse {
                name,
                services: services.clone(),
            });
        }
        if !self.store.remove(&name).map_err(Error::Store)? {
            return Err(Error::NotFound(name));
        }
        let mut report = self.store.gc().map_err(Error::Store)?;
        report.removed.push(name);
        Ok(report)
    }

    pub fn prune(&self, users: &Users) -> Result<ImagesRemoved, Error> {
        let internal = Error::Store;
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

/// Which services use which images: each service's `image` (as written) by service name;
/// paths are not references and use nothing in the store.
pub fn users<'a>(images: impl IntoIterator<Item = (&'a str, &'a str)>) -> Users {
    let mut users = Users::new();
    for (service, image) in images {
        if let Ok(r) = reference::parse(image) {
            users
                .entry(reference::canonical(&r))
                .or_default()
                .push(service.to_string());
        }
    }
    users
}

/// The milestones of a pull worth an event (not every byte), as the event stream shows them.
pub fn milestone(p: &PullProgress) -> Option<Notice> {
    let (kind, message) = match p {
        PullProgress::Resolved {
            reference,
            manifest,
            layers,
            total_bytes,
        } => (
            "image-pull",
            format!("{reference}: manifest {manifest}, {layers} layers, {total_bytes} bytes"),
        ),
        PullProgress::Retrying {
            digest,
            attempt,
            reason,
        } => (
            "image-pull",
            format!("blob {digest}: attempt {attempt} failed ({reason}); retrying"),
        ),
        PullProgress::Verified { digest, size } => (
            "image-pull",
            format!("blob {digest}: {size} bytes verified"),
        ),
        PullProgress::Done {
            reference,
            downloaded_bytes,
            elapsed_ms,
            ..
        } => (
            "image-pulled",
            format!("{reference}: pulled ({downloaded_bytes} bytes downloaded in {elapsed_ms} ms)"),
        ),
        PullProgress::Error { message } => ("image-pull-failed", message.clone()),
        _ => return None,
    };
    Some(Notice::new(kind, message))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_are_by_normalized_reference_and_paths_use_nothing() {
        let users = users([
            ("web", "nginx"),
            ("api", "docker.io/library/nginx:latest"),
            ("db", "registry.example/db:1"),
            ("local", "/usr/lib/keelson/images/base"),
        ]);
        assert_eq!(
            users,
            Users::from([
                (
                    "docker.io/library/nginx:latest".to_string(),
                    vec!["web".to_string(), "api".to_string()]
                ),
                ("registry.example/db:1".to_string(), vec!["db".to_string()]),
            ])
        );
    }

    #[test]
    fn milestones_are_events_bytes_are_not() {
        let done = PullProgress::Done {
            reference: "docker.io/library/nginx:latest".into(),
            manifest: "sha256:ab".into(),
            downloaded_bytes: 10,
            elapsed_ms: 5,
        };
        assert_eq!(
            milestone(&done),
            Some(Notice::new(
                "image-pulled",
                "docker.io/library/nginx:latest: pulled (10 bytes downloaded in 5 ms)"
            ))
        );
        let failed = PullProgress::Error {
            message: "pulling x: refused".into(),
        };
        assert_eq!(
            milestone(&failed).map(|n| n.kind),
            Some("image-pull-failed")
        );
        let bytes = PullProgress::Downloading {
            digest: "sha256:cd".into(),
            done: 1,
            size: 2,
            resumed_at: 0,
        };
        assert_eq!(milestone(&bytes), None);
    }

    /// The API's texts for these failures are what `keelctl` prints: they stay as they were.
    #[test]
    fn remove_errors_keep_their_texts_and_say_their_kind() {
        let t = tempfile::tempdir().unwrap();
        let images = Images::new(t.path().join("images"));
        let users = Users::from([(
            "docker.io/library/busybox:latest".to_string(),
            vec!["a".to_string(), "b".to_string()],
        )]);
        let e = images.remove("busybox", &users).unwrap_err();
        assert_eq!(
            (e.kind(), e.to_string()),
            (
                Kind::Conflict,
                "image docker.io/library/busybox:latest is used by a, b: change or remove those services first".to_string()
            )
        );
        let one = Users::from([("docker.io/library/web:1".to_string(), vec!["w".to_string()])]);
        let e = images.remove("web:1", &one).unwrap_err();
        assert!(
            e.to_string()
                .ends_with("change or remove that service first"),
            "{e}"
        );
        let e = images.remove("/abs/path", &users).unwrap_err();
        assert_eq!(
            (e.kind(), e.to_string()),
            (
                Kind::Invalid,
                "image \"/abs/path\": a path, not a registry reference".to_string()
            )
        );
        let e = images.remove("nothing:here", &users).unwrap_err();
        assert_eq!(
            (e.kind(), e.to_string()),
            (
                Kind::NotFound,
                "no image docker.io/library/nothing:here in the store".to_string()
            )
        );
    }
}
