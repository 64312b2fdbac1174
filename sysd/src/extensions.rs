//! Engine extensions on the node (docs/extensions.md): the running version's set is activated
//! before the system services are read, and a task keeps the store in line with
//! `[extensions]`: once the network is up it has the update agent download what the
//! repository lists for this version, activates the new set and has the supervisor re-read
//! the system services (an extension's services are system services).
//!
//! Merging needs the root's kernel modules (loop for the images, overlay for the merge), which
//! init loads beside sysd's start: a node with a set to activate waits for them
//! ([`keelson_runtime::RootModules`]) before its system services are read; a node without
//! one does not wait.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keelson_common::api::extensions::{ExtensionStatus, ExtensionsView};
use keelson_extensions::{Paths, Status, Store};
use keelson_runtime::RootModules;
use keelson_spec::extensions::ExtensionsSpec;
use keelson_spec::ConfigError;
use keelson_supervisor::{EventBus, Supervisor};
use keelson_update::Agent;
use tokio::sync::watch;

/// How long a failed download waits before the next try (a config change retries at once).
const RETRY: Duration = Duration::from_secs(30);

#[derive(Default)]
struct View {
    os_version: String,
    statuses: Vec<Status>,
    last_error: Option<String>,
}

/// The extensions of this node.
pub struct Extensions {
    paths: Paths,
    spec: watch::Receiver<Result<ExtensionsSpec, ConfigError>>,
    events: Arc<EventBus>,
    view: Mutex<View>,
    modules: RootModules,
}

impl Extensions {
    pub fn new(
        spec: watch::Receiver<Result<ExtensionsSpec, ConfigError>>,
        events: Arc<EventBus>,
        modules: RootModules,
    ) -> Self {
        Extensions {
            paths: Paths::default(),
            spec,
            events,
            view: Mutex::new(View::default()),
            modules,
        }
    }

    /// At boot, before the system services are read: activates the running version's set,
    /// once the root's modules are in if there is a set to merge (an empty one only takes
    /// down what a previous sysd merged, which needs no module).
    pub async fn activate_at_boot(&self) {
        if self.has_set() && !self.modules.is_ready() {
            tracing::info!("sysd: extensions to merge: {}", self.modules.reason());
            self.modules.wait().await;
        }
        self.activate();
    }

    /// Whether the store records extensions for the running version (an unreadable store
    /// counts: `activate` reports it, after the same wait).
    fn has_set(&self) -> bool {
        let text = std::fs::read_to_string(&self.paths.os_release).unwrap_or_default();
        let release = keelson_extensions::release::Release::parse(&text);
        let version = release.get("VERSION_ID").unwrap_or_default();
        Store::new(&self.paths.store)
            .set(version)
            .map_or(true, |set| !set.is_empty())
    }

    fn view_mut(&self) -> std::sync::MutexGuard<'_, View> {
        self.view.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Activates the running version's set (blocking: device-mapper, mounts). An extension
    /// that fails is reported and left out; the OS and the others are unaffected.
    pub fn activate(&self) {
        match keelson_extensions::activate(&self.paths) {
            Ok(statuses) => {
                for s in &statuses {
                    match &s.error {
                        None => self.events.emit(
                            None,
                            "extension-active",
                            format!(
                                "{} {} (root hash {}) merged into /usr",
                                s.entry.name, s.entry.version, s.entry.roothash
                            ),
                        ),
                        Some(e) => self.events.emit(None, "extension-refused", e.clone()),
                    }
                }
                let mut v = self.view_mut();
                v.os_version = statuses
                    .first()
                    .map(|s| s.os_version.clone())
                    .unwrap_or_else(os_version);
                v.statuses = statuses;
            }
            Err(e) => {
                self.events.emit(
                    None,
                    "extension-refused",
                    format!("extensions not activated: {e}"),
                );
                let mut v = self.view_mut();
                v.os_version = os_version();
                v.last_error = Some(e.to_string());
            }
        }
    }

    fn enabled(&self) -> Vec<String> {
        self.spec
            .borrow()
            .as_ref()
            .map(|x| x.enabled.clone())
            .unwrap_or_default()
    }

    /// Whether the active set is exactly what config enables.
    fn in_line(&self) -> bool {
        let enabled: BTreeSet<String> = self.enabled().into_iter().collect();
        let v = self.view_mut();
        let active: BTreeSet<String> = v
            .statuses
            .iter()
            .filter(|s| s.error.is_none())
            .map(|s| s.entry.name.clone())
            .collect();
        let refused = v.statuses.iter().any(|s| s.error.is_some());
        enabled == active && !refused
    }

    /// Keeps the store and the active set in line with `[extensions]` (see the module docs).
    pub fn follow(
        self: Arc<Self>,
        agent: Arc<Agent>,
        sup: Arc<Supervisor>,
        online: Option<watch::Receiver<bool>>,
    ) {
        tokio::spawn(async move {
            // Online, or given up waiting for it (as services waiting for network-online are).
            if let Some(mut online) = online {
                let _ = online.wait_for(|started| *started).await;
            }
            let mut spec = self.spec.clone();
            loop {
                let mut retry = false;
                if !self.in_line() {
                    match agent.sync_running_extensions().await {
                        Ok(_) => {
                            self.view_mut().last_error = None;
                            // loop and overlay (long in by now: the network came first).
                            self.modules.wait().await;
                            let me = Arc::clone(&self);
                            let _ = tokio::task::spawn_blocking(move || me.activate()).await;
                            match sup.reload_system().await {
                                Ok(plan) => self.events.emit(
                                    None,
                                    "extensions-applied",
                                    format!(
                                        "system services re-read: {} started, {} restarted, {} stopped",
                                        plan.start.len(),
                                        plan.restart.len(),
                                        plan.stop.len()
                                    ),
                                ),
                                Err(f) => self.events.emit(None, "config-error", f.message),
                            }
                        }
                        Err(e) => {
                            // Said once per reason, not at every retry (every 30 s).
                            let again = self.view_mut().last_error.as_deref() == Some(&e.message);
                            if !again {
                                self.events.emit(
                                    None,
                                    "extensions-sync-failed",
                                    format!(
                                        "{}; the node keeps the extensions it has (retrying every 30 s)",
                                        e.message
                                    ),
                                );
                            }
                            self.view_mut().last_error = Some(e.message);
                            retry = true;
                        }
                    }
                }
                if retry {
                    tokio::select! {
                        _ = spec.changed() => {}
                        _ = tokio::time::sleep(RETRY) => {}
                    }
                } else if spec.changed().await.is_err() {
                    return;
                }
            }
        });
    }
}

fn os_version() -> String {
    let text = std::fs::read_to_string("/usr/lib/os-release").unwrap_or_default();
    keelson_extensions::release::Release::parse(&text)
        .get("VERSION_ID")
        .unwrap_or_default()
        .to_owned()
}

impl keelson_api::Extensions for Extensions {
    fn view(&self) -> ExtensionsView {
        let enabled = self.enabled();
        let v = self.view_mut();
        let mut extensions: Vec<ExtensionStatus> = v
            .statuses
            .iter()
            .map(|s| ExtensionStatus {
                name: s.entry.name.clone(),
                version: s.entry.version.clone(),
                state: match (&s.error, enabled.contains(&s.entry.name)) {
                    (Some(_), _) => "refused",
                    (None, true) => "active",
                    (None, false) => "disabled",
                }
                .into(),
                roothash: s.entry.roothash.clone(),
                built_for: s.entry.built_for.clone(),
                source: s.entry.source.clone(),
                error: s.error.clone(),
            })
            .collect();
        for name in &enabled {
            if !v.statuses.iter().any(|s| &s.entry.name == name) {
                extensions.push(ExtensionStatus {
                    name: name.clone(),
                    version: String::new(),
                    state: "pending".into(),
                    roothash: String::new(),
                    built_for: String::new(),
                    source: String::new(),
                    error: None,
                });
            }
        }
        ExtensionsView {
            os_version: v.os_version.clone(),
            enabled,
            extensions,
            last_error: v.last_error.clone(),
        }
    }
}
