//! The supervisor: one task per service drives it through its lifecycle (wait for
//! dependencies, start the container, readiness, health, restart with backoff, stop), and a
//! shared table answers the API. Tasks talk to each other only through published status: a
//! service waiting on its dependencies watches a global "something changed" counter and reads
//! their states, so starts run in parallel wherever the dependency graph allows.
//!
//! `apply` validates the whole new config first; only then is it stored and reconciled:
//! services whose spec hash changed restart, removed ones stop, new ones start, others are not
//! touched.
//!
//! What it is given, it owns or shares explicitly: the runtime, the event bus, the image
//! manager, the host network manager ([`HostNet`], through the [`Network`] it needs) and the
//! gate of the root's kernel modules (a service's last wait before its container,
//! [`keelson_runtime::RootModules`]) come in through [`Supervisor::new`];
//! each service task holds an `Arc` of the state tasks share ([`Shared`]), never a reference
//! back to the [`Supervisor`]. What others need from it, it publishes: every service's status
//! ([`Supervisor::statuses`]) and the effective `[update]` table ([`Supervisor::update_spec`])
//! as `watch`es. It implements the API's [`keelson_api::Services`] and
//! [`keelson_api::Config`]; it knows nothing of updates, first boot or the API's transport.

mod admin;
pub mod adopt;
mod checks;
pub mod events;
pub mod logs;
pub mod resolve;

use std::collections::BTreeMap;
use std::future::Future;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use keelson_common::api::{
    self, now_ms, ApplyPlan, ExitInfo, Health, ServiceStatus, State, Stream,
};
use keelson_images::manager::Images;
use nix::sys::signal::Signal;
use tokio::sync::{mpsc, oneshot, watch};

pub use adopt::{Exits, FdKeeper, Inheritance};
pub use events::EventBus;
use keelson_api::{EventFeed, Failure, LogFeed};
use keelson_runtime::netplug::{Endpoint, ANNOTATION};
use keelson_runtime::{RootModules, Runtime};
use keelson_spec::api::ApiSpec;
use keelson_spec::extensions::ExtensionsSpec;
use keelson_spec::network::{NetConfig, PortSpec};
use keelson_spec::observe::ObserveSpec;
use keelson_spec::update::UpdateSpec;
use keelson_spec::{Config, ConfigError, Kind, RestartPolicy, Service, Sources};
use logs::LogHub;

/// First restart delay; doubles per consecutive failure up to [`BACKOFF_MAX`].
const BACKOFF_START: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// A run at least this long resets the failure count and the backoff.
const RESET_AFTER: Duration = Duration::from_secs(10);

/// Host paths and names the supervisor uses.
#[derive(Debug, Clone)]
pub struct Paths {
    pub sources: Sources,
    pub layout: resolve::Layout,
    pub log_dir: PathBuf,
    /// init's record of this boot's lines (`GET /v1/boot`).
    pub init_log: PathBuf,
}

/// What the supervisor needs from the host network manager. The `sysd` binary adapts
/// `keelson-net`'s; the supervisor does not depend on that crate.
#[async_trait]
pub trait Network: Send + Sync {
    /// Whether `network-online` lets its dependents start (reached, or given up on), as it
    /// changes.
    fn online(&self) -> watch::Receiver<bool>;
    /// Puts `config`'s `[network]` and `[host]` in place as a try; after an error the previous
    /// config is back, and the error says what failed.
    async fn apply(&self, config: NetConfig) -> anyhow::Result<()>;
    /// A bridge service's place on the bridge: its address and published ports (the runtime
    /// helper plugs the container in with the endpoint).
    async fn attach(&self, service: &str, ports: &[PortSpec]) -> anyhow::Result<Endpoint>;
    /// An adopted bridge container's place back as it has it (`kept`, from its bundle), or
    /// why the bridge cannot take it back.
    async fn reattach(&self, kept: &Endpoint, ports: &[PortSpec]) -> anyhow::Result<()>;
    /// The hosts file bridge containers get as /etc/hosts.
    fn hosts_file(&self) -> PathBuf;
}

/// The host network, as the binary hands it over.
pub enum HostNet {
    /// sysd leaves the host network alone (started without `--host-network`): `network-online`
    /// never holds a service back, and bridge services cannot start.
    Unmanaged,
    /// Managed, but its manager failed to start: services waiting for `network-online` wait.
    Failed,
    Managed(Arc<dyn Network>),
}

enum Cmd {
    Start,
    Stop(oneshot::Sender<()>),
    Restart,
    Replace(Arc<Service>),
    Remove(oneshot::Sender<()>),
    Kill(Signal),
}

struct Handle {
    service: Arc<Service>,
    status: watch::Receiver<ServiceStatus>,
    cmds: mpsc::UnboundedSender<Cmd>,
}

/// What the service tasks share with the supervisor: the service table and the means to run
/// a service. Each task holds an `Arc` of it.
pub struct Shared {
    runtime: Runtime,
    paths: Paths,
    events: Arc<EventBus>,
    logs: Arc<LogHub>,
    handles: Mutex<BTreeMap<String, Handle>>,
    /// Bumped on every status change: dependency waits and stop ordering watch it.
    epoch: watch::Sender<u64>,
    /// Every service's status, republished on every change (the update agent's health gate,
    /// which images are in use).
    statuses: watch::Sender<Vec<ServiceStatus>>,
    /// The image store on /var and registry pulls.
    images: Arc<Images>,
    network: HostNet,
    /// Where the output pipes of started containers are kept beyond sysd (init's FD store).
    keeper: Mutex<Option<Arc<dyn FdKeeper>>>,
    /// The exits init reports: how adopted containers end.
    exits: Mutex<Arc<Exits>>,
    /// The root's kernel modules init loads beside sysd's start: every container start waits
    /// for them (overlay for its root and image layers, bridge, veth and nf_tables).
    modules: RootModules,
}

/// How much a service may write while no sysd reads its output (each pipe's buffer).
const PIPE_SIZE: usize = 1 << 20;

pub struct Supervisor {
    shared: Arc<Shared>,
    system: Mutex<Vec<Service>>,
    apply_lock: tokio::sync::Mutex<()>,
    /// The effective config, as last loaded or applied (`GET /v1/config`).
    effective: Mutex<Option<Config>>,
    /// The effective `[update]` table, as last loaded or applied.
    update_spec: watch::Sender<Result<UpdateSpec, ConfigError>>,
    /// The effective `[extensions]` table, as last loaded or applied.
    extensions_spec: watch::Sender<Result<ExtensionsSpec, ConfigError>>,
    /// The effective `[api]` table (the remote API), as last loaded or applied.
    api_spec: watch::Sender<Result<ApiSpec, ConfigError>>,
    /// The effective `[metrics]` and `[logging]` tables, as last loaded or applied.
    observe_spec: watch::Sender<Result<ObserveSpec, ConfigError>>,
    started: Instant,
    /// The hardware watchdog init armed, as `GET /v1/version` reports it.
    watchdog: std::sync::OnceLock<api::Watchdog>,
    /// What init handed over, until boot adopts from it.
    inheritance: Mutex<Option<Inheritance>>,
}

/// The effective `[network]`/`[host]` config as boot loads it (a bad user file falls back to
/// the image's, like the services): what the host network manager starts with.
pub fn boot_network_config(sources: &Sources) -> keelson_spec::network::NetConfig {
    let system = sources.read_system().unwrap_or_default();
    let userdata = sources.read_userdata_text().ok().flatten();
    let user = sources.read_user_text().ok().flatten();
    // The same fallbacks as `boot`: everything, without the API's file, the image alone.
    sources
        .combine(system.clone(), userdata.as_deref(), user.as_deref())
        .or_else(|_| sources.combine(system.clone(), userdata.as_deref(), None))
        .or_else(|_| sources.combine(system, None, None))
        .map(|c| c.net)
        .unwrap_or_default()
}

/// Kills and removes one container a previous sysd left (not adopted): nothing runs twice.
async fn report_cleanup(runtime: &Runtime, events: &EventBus, left: &keelson_runtime::Leftover) {
    match runtime.clean(left).await {
        Ok(()) => events.emit(
            left.id.as_deref(),
            "cleanup",
            format!("removed what a previous sysd left: {}", left.describe()),
        ),
        Err(e) => events.emit(None, "cleanup-failed", format!("{e:#}")),
    }
}

/// The API's exit info of a status init reported.
fn exit_info(status: keelson_common::notify::Status) -> ExitInfo {
    use keelson_common::notify::Status;
    let (code, signal) = match status {
        Status::Exited(c) => (Some(c), None),
        Status::Signaled(s) => (None, Some(s)),
    };
    ExitInfo {
        code,
        signal,
        oom_killed: false,
        at_ms: now_ms(),
    }
}

impl Supervisor {
    /// A supervisor with no services yet ([`Supervisor::boot`] loads them). Inside the tokio
    /// runtime: it starts following the host network's online state.
    pub fn new(
        runtime: Runtime,
        paths: Paths,
        events: Arc<EventBus>,
        images: Arc<Images>,
        network: HostNet,
        modules: RootModules,
    ) -> Self {
        let epoch = watch::channel(0).0;
        if let HostNet::Managed(net) = &network {
            // Dependency waits look again whenever network-online changes.
            let (mut online, epoch) = (net.online(), epoch.clone());
            tokio::spawn(async move {
                while online.changed().await.is_ok() {
                    epoch.send_modify(|n| *n += 1);
                }
            });
        }
        let update_spec = watch::channel(keelson_spec::update::load(&paths.sources)).0;
        let extensions_spec = watch::channel(keelson_spec::extensions::load(&paths.sources)).0;
        let api_spec = watch::channel(keelson_spec::api::load(&paths.sources)).0;
        let observe_spec = watch::channel(keelson_spec::observe::load(&paths.sources)).0;
        Supervisor {
            shared: Arc::new(Shared {
                logs: Arc::new(LogHub::new(
                    paths.log_dir.clone(),
                    logs::Rotation::default(),
                )),
                runtime,
                paths,
                events,
                handles: Mutex::new(BTreeMap::new()),
                epoch,
                statuses: watch::channel(Vec::new()).0,
                images,
                network,
                keeper: Mutex::new(None),
                exits: Mutex::new(Arc::new(Exits::default())),
                modules,
            }),
            system: Mutex::new(Vec::new()),
            apply_lock: tokio::sync::Mutex::new(()),
            effective: Mutex::new(None),
            update_spec,
            extensions_spec,
            api_spec,
            observe_spec,
            started: Instant::now(),
            watchdog: std::sync::OnceLock::new(),
            inheritance: Mutex::new(None),
        }
    }

    /// What init handed over (kept descriptors, orphan exits, where to keep new ones); before
    /// [`Supervisor::boot`], which adopts from it.
    pub fn inherit(&self, inheritance: Inheritance) {
        *self.inheritance.lock().unwrap_or_else(|p| p.into_inner()) = Some(inheritance);
    }

    /// Decides, for every container a previous sysd left, whether its service adopts it
    /// (module `adopt`); removes those no service claims.
    fn plan_adoption(&self, config: &Config) -> BTreeMap<String, adopt::Resume> {
        use keelson_runtime::adopt::Verdict;
        let inh = self
            .inheritance
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .unwrap_or_default();
        *self.shared.keeper.lock().unwrap_or_else(|p| p.into_inner()) = inh.keeper.clone();
        *self.shared.exits.lock().unwrap_or_else(|p| p.into_inner()) = Arc::clone(&inh.exits);
        let mut fds = inh.fds;
        let exits = inh.exits.all();
        let events = &self.shared.events;
        let mut unclaimed = Vec::new();
        let mut verdicts = Vec::new();
        // Without a record (a cgroup alone, a bundle of an older sysd) it is removed before
        // its service starts, as before adoption existed.
        let mut plan: BTreeMap<String, adopt::Resume> = BTreeMap::new();
        for left in self.shared.runtime.leftovers() {
            let svc = config
                .services
                .get(&left.service)
                .filter(|s| s.spec.enabled);
            match svc {
                Some(svc)
                    if left.record.is_some() && left.id.as_deref() == Some(svc.name.as_str()) =>
                {
                    let bridge = svc.spec.network == keelson_spec::Network::Bridge;
                    let (v, ep) = adopt::verdict(&left, &svc.spec.hash(), bridge, &fds, &exits);
                    verdicts.push((left, v, ep));
                }
                Some(svc) if !plan.contains_key(&svc.name) => {
                    plan.insert(svc.name.clone(), adopt::Resume::Clean(Box::new(left)));
                }
                _ => unclaimed.push(left),
            }
        }
        let adopted_pids: BTreeMap<String, i32> = verdicts
            .iter()
            .filter_map(|(l, v, _)| match v {
                Verdict::Adopt(r) => Some((l.service.clone(), r.pid)),
                _ => None,
            })
            .collect();
        for (left, v, endpoint) in verdicts {
            let name = left.service.clone();
            let resume = match v {
                Verdict::Adopt(record) => {
                    // Checked again once the pidfd is open: a pid reused in between is not it.
                    let pidfd = keelson_runtime::open_pidfd(record.pid).ok().filter(|_| {
                        record
                            .check(std::path::Path::new("/proc"), &left.bundle_hash)
                            .is_ok()
                    });
                    let out = fds.remove(&adopt::fd_name(&name, Stream::Stdout));
                    let err = fds.remove(&adopt::fd_name(&name, Stream::Stderr));
                    match (pidfd, out, err) {
                        (Some(pidfd), Some(stdout), Some(stderr)) => {
                            // Its `adopted` event comes from its task, once a bridge
                            // container has its place back.
                            let joined_pid = config.services[&name]
                                .spec
                                .network
                                .joined()
                                .and_then(|o| adopted_pids.get(o).copied());
                            adopt::Resume::Adopt(Box::new(adopt::Adopted {
                                record,
                                pidfd,
                                stdout,
                                stderr,
                                joined_pid,
                                endpoint,
                                left: Box::new(left),
                            }))
                        }
                        _ => {
                            events.emit(
                                Some(&name),
                                "adopt-refused",
                                format!(
                                    "pid {} ended while being adopted; its cgroup is killed and it starts fresh",
                                    record.pid
                                ),
                            );
                            adopt::Resume::Clean(Box::new(left))
                        }
                    }
                }
                Verdict::Exited(record, exit) => {
                    events.emit(
                        Some(&name),
                        "exited-unsupervised",
                        format!(
                            "pid {} ended while no sysd ran ({}); its restart policy decides",
                            record.pid,
                            describe_exit(Some(&exit_info(exit.status)))
                        ),
                    );
                    adopt::Resume::Exited(Box::new(left), exit, record.restarts)
                }
                Verdict::Refused(why) => {
                    events.emit(
                        Some(&name),
                        "adopt-refused",
                        format!("{why}; its cgroup is killed and it starts fresh"),
                    );
                    adopt::Resume::Clean(Box::new(left))
                }
            };
            if let Some(adopt::Resume::Clean(other)) = plan.insert(name, resume) {
                unclaimed.push(*other);
            }
        }
        // Kept descriptors nothing adopted: init closes them.
        if let Some(keeper) = &inh.keeper {
            for name in fds.keys() {
                keeper.forget(name);
            }
        }
        if !unclaimed.is_empty() {
            let runtime = self.shared.runtime.clone();
            let events = Arc::clone(events);
            tokio::spawn(async move {
                for left in unclaimed {
                    report_cleanup(&runtime, &events, &left).await;
                }
            });
        }
        plan
    }

    /// Records the hardware watchdog init armed (reported with the version).
    pub fn set_watchdog(&self, w: api::Watchdog) {
        let _ = self.watchdog.set(w);
    }

    /// Every service's status, as it changes.
    pub fn statuses(&self) -> watch::Receiver<Vec<ServiceStatus>> {
        self.shared.statuses.subscribe()
    }

    /// The effective `[update]` table (or why it is invalid), as boot and every apply leave it.
    pub fn update_spec(&self) -> watch::Receiver<Result<UpdateSpec, ConfigError>> {
        self.update_spec.subscribe()
    }

    /// The effective `[extensions]` table (or why it is invalid), as boot and every apply
    /// leave it.
    pub fn extensions_spec(&self) -> watch::Receiver<Result<ExtensionsSpec, ConfigError>> {
        self.extensions_spec.subscribe()
    }

    /// The effective `[api]` table (or why it is invalid), as boot and every apply leave it.
    /// Every apply wakes its receivers, changed or not: a PEM file named by path may have been
    /// replaced (rotation), which only reading it again can tell.
    pub fn api_spec(&self) -> watch::Receiver<Result<ApiSpec, ConfigError>> {
        self.api_spec.subscribe()
    }

    /// The effective `[metrics]` and `[logging]` tables (or why they are invalid), as boot and
    /// every apply leave them.
    pub fn observe_spec(&self) -> watch::Receiver<Result<ObserveSpec, ConfigError>> {
        self.observe_spec.subscribe()
    }

    /// Every line a service writes (and sysd's notes about it) also goes to `tap` (log
    /// forwarding); `None` stops that.
    pub fn set_log_tap(&self, tap: Option<Arc<dyn logs::LogTap>>) {
        self.shared.logs.set_tap(tap);
    }

    /// Re-reads the whole-table settings (`[update]`, `[extensions]`, `[api]`, `[metrics]`,
    /// `[logging]`) after the config files changed. A receiver is woken only when its table
    /// really changed (`[api]`: always, see [`Supervisor::api_spec`]).
    fn publish_update_spec(&self) {
        let sources = &self.shared.paths.sources;
        let load = keelson_spec::update::load(sources);
        self.update_spec.send_if_modified(|spec| {
            let changed = *spec != load;
            *spec = load;
            changed
        });
        let load = keelson_spec::extensions::load(sources);
        self.extensions_spec.send_if_modified(|spec| {
            let changed = *spec != load;
            *spec = load;
            changed
        });
        let _previous = self.api_spec.send_replace(keelson_spec::api::load(sources));
        let load = keelson_spec::observe::load(sources);
        self.observe_spec.send_if_modified(|spec| {
            let changed = *spec != load;
            *spec = load;
            changed
        });
    }

    /// Re-reads the system services (the extensions merged over /usr changed) and reconciles
    /// with the config layers as they are.
    pub async fn reload_system(&self) -> Result<ApplyPlan, Failure> {
        let system = self
            .shared
            .paths
            .sources
            .read_system()
            .map_err(|e| Failure::bad_request(format!("system services: {e}")))?;
        *self.system.lock().unwrap_or_else(|p| p.into_inner()) = system;
        self.reload().await
    }

    /// Loads the config and starts everything. A bad user config is reported and skipped (the
    /// system services still run, so the node stays manageable); a bad system config is the
    /// image's fault and is reported the same way.
    pub fn boot(&self) {
        let events = &self.shared.events;
        let sources = &self.shared.paths.sources;
        let system = sources.read_system().unwrap_or_else(|e| {
            events.emit(
                None,
                "config-error",
                format!("system services not loaded: {e}"),
            );
            Vec::new()
        });
        *self.system.lock().unwrap_or_else(|p| p.into_inner()) = system.clone();
        let userdata = sources.read_userdata_text().unwrap_or_else(|e| {
            events.emit(
                None,
                "config-error",
                format!("user-data config not loaded: {e}"),
            );
            None
        });
        let user = sources.read_user_text().unwrap_or_else(|e| {
            events.emit(
                None,
                "config-error",
                format!("user services not loaded: {e}"),
            );
            None
        });
        // The last good of: everything; without the API's file; the image alone.
        let config = match sources.combine(system.clone(), userdata.as_deref(), user.as_deref()) {
            Ok(c) => c,
            Err(e) => {
                events.emit(
                    None,
                    "config-error",
                    format!("user services not loaded: {e}"),
                );
                sources
                    .combine(system.clone(), userdata.as_deref(), None)
                    .or_else(|e| {
                        events.emit(
                            None,
                            "config-error",
                            format!("user-data config not loaded: {e}"),
                        );
                        sources.combine(system, None, None)
                    })
                    .unwrap_or_default()
            }
        };
        self.shared.images.set_registries(config.registries.clone());
        self.sync_admin_keys(&config);
        self.publish_update_spec();
        *self.effective.lock().unwrap_or_else(|p| p.into_inner()) = Some(config.clone());
        let mut plan = self.plan_adoption(&config);
        for svc in config.services.into_values() {
            let resume = plan.remove(&svc.name);
            self.shared.spawn_with(Arc::new(svc), resume);
        }
        self.watch_boot_ready();
    }

    /// Reports `boot-ready` once every service this boot started has settled: ready (running,
    /// or a oneshot completed) or failed for good (it will not get ready on its own; the event
    /// names it); a disabled or stopped service does not count. Until then the boot's
    /// `all_ready_us` stays unset, so a service still starting or in backoff shows.
    fn watch_boot_ready(&self) {
        let shared = Arc::clone(&self.shared);
        let mut changes = shared.statuses.subscribe();
        tokio::spawn(async move {
            loop {
                changes.borrow_and_update();
                let statuses = shared.list();
                let counted: Vec<&ServiceStatus> = statuses
                    .iter()
                    .filter(|s| s.state != State::Stopped)
                    .collect();
                if counted
                    .iter()
                    .all(|s| matches!(s.state, State::Running | State::Completed | State::Failed))
                {
                    let failed: Vec<&str> = counted
                        .iter()
                        .filter(|s| s.state == State::Failed)
                        .map(|s| s.name.as_str())
                        .collect();
                    shared
                        .events
                        .boot_ready(counted.len() - failed.len(), &failed);
                    return;
                }
                if changes.changed().await.is_err() {
                    return;
                }
            }
        });
    }

    /// Installs `[admin]` keys before the admin service (re)starts; a failure is an event, the
    /// rest of the config still runs.
    fn sync_admin_keys(&self, config: &Config) {
        match admin::sync_keys(config, &self.shared.paths.layout.volumes) {
            Ok(Some(path)) => tracing::info!(
                "sysd: admin: {} ssh key(s) installed in {}",
                config.admin.ssh_authorized_keys.len(),
                path.display()
            ),
            Ok(None) => {}
            Err(e) => {
                self.shared
                    .events
                    .emit(Some("admin"), "config-error", format!("admin keys: {e:#}"))
            }
        }
    }

    /// Stops every service, dependents before what they depend on, in parallel otherwise.
    pub async fn shutdown(&self) {
        let events = &self.shared.events;
        events.emit(None, "shutdown", "stopping all services");
        let services: Vec<Arc<Service>> = {
            let handles = self
                .shared
                .handles
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            handles.values().map(|h| Arc::clone(&h.service)).collect()
        };
        let mut waits = Vec::new();
        for svc in &services {
            let dependents: Vec<String> = services
                .iter()
                .filter(|o| o.spec.dependencies().contains(svc.name.as_str()))
                .map(|o| o.name.clone())
                .collect();
            let shared = Arc::clone(&self.shared);
            let name = svc.name.clone();
            waits.push(tokio::spawn(async move {
                let mut epoch = shared.epoch.subscribe();
                while dependents
                    .iter()
                    .any(|d| shared.state_of(d).is_some_and(is_active))
                {
                    if epoch.changed().await.is_err() {
                        break;
                    }
                }
                let (tx, rx) = oneshot::channel();
                if shared.send(&name, Cmd::Stop(tx)).is_ok() {
                    let _ = rx.await;
                }
            }));
        }
        for w in waits {
            let _ = w.await;
        }
        events.emit(None, "shutdown", "all services stopped");
    }
}

impl Shared {
    /// The host network manager, when sysd manages the host network and it started.
    fn network(&self) -> Option<&Arc<dyn Network>> {
        match &self.network {
            HostNet::Managed(net) => Some(net),
            HostNet::Unmanaged | HostNet::Failed => None,
        }
    }

    /// Why `network-online` does not allow a start yet, if it does not.
    fn network_blocks(&self) -> Option<String> {
        let waiting = || {
            Some(format!(
                "waiting for {}",
                keelson_spec::network::NETWORK_ONLINE
            ))
        };
        match &self.network {
            HostNet::Unmanaged => None,
            HostNet::Failed => waiting(),
            HostNet::Managed(net) if *net.online().borrow() => None,
            HostNet::Managed(_) => waiting(),
        }
    }

    fn spawn(self: &Arc<Self>, svc: Arc<Service>) {
        self.spawn_with(svc, None);
    }

    fn spawn_with(self: &Arc<Self>, svc: Arc<Service>, resume: Option<adopt::Resume>) {
        let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
        let (status_tx, status_rx) = watch::channel(initial_status(&svc));
        self.handles
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                svc.name.clone(),
                Handle {
                    service: Arc::clone(&svc),
                    status: status_rx,
                    cmds: cmd_tx,
                },
            );
        let task = ServiceTask {
            sup: Arc::clone(self),
            svc,
            status: status_tx,
            cmds: cmd_rx,
            resume,
        };
        tokio::spawn(task.run());
        self.bump();
    }

    /// Something changed: the statuses are republished and every waiter looks again.
    fn bump(&self) {
        let statuses = self.list();
        self.statuses.send_if_modified(|published| {
            let changed = *published != statuses;
            if changed {
                *published = statuses;
            }
            changed
        });
        self.epoch.send_modify(|n| *n += 1);
    }

    fn list(&self) -> Vec<ServiceStatus> {
        let handles = self.handles.lock().unwrap_or_else(|p| p.into_inner());
        handles
            .values()
            .map(|h| h.status.borrow().clone())
            .collect()
    }

    fn status(&self, name: &str) -> Result<ServiceStatus, Failure> {
        let handles = self.handles.lock().unwrap_or_else(|p| p.into_inner());
        handles
            .get(name)
            .map(|h| h.status.borrow().clone())
            .ok_or_else(|| unknown(name, &handles))
    }

    fn state_of(&self, name: &str) -> Option<State> {
        let handles = self.handles.lock().unwrap_or_else(|p| p.into_inner());
        handles.get(name).map(|h| h.status.borrow().state)
    }

    /// The pid of a service's running container init, if it has one.
    fn pid_of(&self, name: &str) -> Option<i32> {
        let handles = self.handles.lock().unwrap_or_else(|p| p.into_inner());
        handles.get(name).and_then(|h| h.status.borrow().pid)
    }

    fn send(&self, name: &str, cmd: Cmd) -> Result<(), Failure> {
        let handles = self.handles.lock().unwrap_or_else(|p| p.into_inner());
        let handle = handles.get(name).ok_or_else(|| unknown(name, &handles))?;
        handle
            .cmds
            .send(cmd)
            .map_err(|_| Failure::internal(format!("service {name}: its task has ended")))
    }
}

fn unknown(name: &str, handles: &BTreeMap<String, Handle>) -> Failure {
    let known: Vec<&str> = handles.keys().map(String::as_str).collect();
    Failure::not_found(format!(
        "no service named {name:?} (known: {})",
        known.join(", ")
    ))
}

/// Running or on its way: something a dependency's stop must wait for.
fn is_active(s: State) -> bool {
    matches!(s, State::Starting | State::Running | State::Stopping)
}

fn initial_status(svc: &Service) -> ServiceStatus {
    ServiceStatus {
        name: svc.name.clone(),
        kind: match svc.spec.kind {
            Kind::Service => api::Kind::Service,
            Kind::Oneshot => api::Kind::Oneshot,
        },
        state: if svc.spec.enabled {
            State::Waiting
        } else {
            State::Stopped
        },
        health: None,
        // A disabled service is not expected to run, so the health gate does not wait for it
        // (an extension's critical engine counts once the node turns it on).
        critical: svc.spec.critical && svc.spec.enabled,
        source: svc.source.as_str().into(),
        image: svc.spec.image.clone(),
        pid: None,
        started_at_ms: None,
        restarts: 0,
        last_exit: None,
        reason: if svc.spec.enabled {
            None
        } else {
            Some("disabled in the config".into())
        },
        next_restart_ms: None,
        spec_hash: svc.spec.hash(),
    }
}

/// A running container instance.
struct Instance {
    pid: i32,
    pidfd: OwnedFd,
    started: Instant,
    /// `network = "service:NAME"`: the pid of NAME's container whose namespace it joined.
    joined_pid: Option<i32>,
    /// Adopted from a previous sysd: not our child, so its end is seen through the pidfd and
    /// told by init (these exits); with its start in µs of boot time.
    adopted: Option<(Arc<Exits>, u64)>,
}

/// How long an adopted container's end waits for init's word on its status.
const EXIT_REPORT_WAIT: Duration = Duration::from_secs(2);

/// Waits for the instance's init to end: reaped through its pidfd when it is our child, else
/// (adopted) seen through its pidfd and told by init.
async fn instance_exit(inst: &Instance) -> std::io::Result<keelson_runtime::ExitInfo> {
    let Some((exits, started_us)) = &inst.adopted else {
        return keelson_runtime::wait_exit(&inst.pidfd).await;
    };
    keelson_runtime::wait_pidfd(&inst.pidfd).await?;
    match exits
        .wait_for(inst.pid, *started_us, EXIT_REPORT_WAIT)
        .await
    {
        Some(e) => Ok(match e.status {
            keelson_common::notify::Status::Exited(c) => keelson_runtime::ExitInfo::Exited(c),
            keelson_common::notify::Status::Signaled(s) => keelson_runtime::ExitInfo::Signaled(s),
        }),
        None => Err(std::io::Error::other(format!(
            "pid {} ended; init did not say how",
            inst.pid
        ))),
    }
}

/// Why a run ended.
enum Ended {
    Exited(ExitInfo),
    /// The start failed, or readiness never came, or health failed `retries` times (the
    /// instance was stopped); with the reason.
    Failed(ExitInfo, String),
    /// A required dependency stopped; the instance was stopped.
    DependencyLost(String),
    Command(Cmd),
}

struct ServiceTask {
    sup: Arc<Shared>,
    svc: Arc<Service>,
    status: watch::Sender<ServiceStatus>,
    cmds: mpsc::UnboundedReceiver<Cmd>,
    /// How the task begins (a container a previous sysd left).
    resume: Option<adopt::Resume>,
}

impl ServiceTask {
    fn name(&self) -> &str {
        &self.svc.name
    }

    fn set(&self, f: impl FnOnce(&mut ServiceStatus)) {
        self.status.send_modify(f);
        self.sup.bump();
    }

    /// Sets the status's reason, publishing only a change.
    fn set_reason(&self, reason: String) {
        if self.status.borrow().reason.as_deref() != Some(reason.as_str()) {
            self.set(|s| s.reason = Some(reason));
        }
    }

    fn event(&self, kind: &str, message: impl Into<String>) {
        self.sup.events.emit(Some(&self.svc.name), kind, message);
    }

    async fn run(mut self) {
        let mut want = self.svc.spec.enabled;
        let mut failures: u32 = 0;
        let mut pending = None;
        match self.resume.take() {
            Some(adopt::Resume::Clean(left)) => {
                report_cleanup(&self.sup.runtime, &self.sup.events, &left).await;
            }
            Some(adopt::Resume::Exited(left, exit, restarts)) => {
                report_cleanup(&self.sup.runtime, &self.sup.events, &left).await;
                self.set(|s| s.restarts = restarts);
                pending = Some(Ended::Exited(exit_info(exit.status)));
            }
            Some(adopt::Resume::Adopt(a)) => match self.reattach(&a).await {
                Ok(()) => pending = Some(self.resume_adopted(*a).await),
                Err(why) => {
                    self.event(
                        "adopt-refused",
                        format!("{why:#}; its cgroup is killed and it starts fresh"),
                    );
                    let adopt::Adopted { left, .. } = *a;
                    report_cleanup(&self.sup.runtime, &self.sup.events, &left).await;
                }
            },
            None => {}
        }
        loop {
            if !want {
                // Parked: stopped, failed for good or completed. Wait for a command.
                let Some(cmd) = self.cmds.recv().await else {
                    return;
                };
                match cmd {
                    Cmd::Start | Cmd::Restart => {
                        want = true;
                        failures = 0;
                    }
                    Cmd::Replace(svc) => {
                        want = svc.spec.enabled;
                        self.replace(svc);
                        failures = 0;
                    }
                    Cmd::Stop(ack) => {
                        let _ = ack.send(());
                    }
                    Cmd::Remove(ack) => {
                        let _ = ack.send(());
                        return;
                    }
                    Cmd::Kill(_) => {}
                }
                continue;
            }

            let ended = match pending.take() {
                Some(ended) => ended,
                None => {
                    if let Some(cmd) = self.wait_for_dependencies().await {
                        match self.handle_idle(cmd, &mut want) {
                            Flow::Continue => continue,
                            Flow::Exit => return,
                        }
                    }
                    self.run_once().await
                }
            };
            let (exit, why) = match ended {
                Ended::Command(cmd) => {
                    match cmd {
                        Cmd::Stop(ack) => {
                            want = false;
                            self.set(|s| {
                                s.state = State::Stopped;
                                s.reason = Some("stopped on request".into());
                            });
                            let _ = ack.send(());
                        }
                        Cmd::Remove(ack) => {
                            let _ = ack.send(());
                            return;
                        }
                        Cmd::Restart => {
                            self.set(|s| s.restarts += 1);
                            failures = 0;
                        }
                        Cmd::Replace(svc) => {
                            want = svc.spec.enabled;
                            self.replace(svc);
                            failures = 0;
                        }
                        Cmd::Start | Cmd::Kill(_) => {}
                    }
                    continue;
                }
                Ended::DependencyLost(reason) => {
                    self.set(|s| {
                        s.state = State::Waiting;
                        s.reason = Some(reason);
                    });
                    continue;
                }
                Ended::Exited(exit) => (Some(exit), None),
                Ended::Failed(exit, why) => (Some(exit), Some(why)),
            };

            if let Some(exit) = &exit {
                let exit = exit.clone();
                if exit.oom_killed {
                    self.event(
                        "oom-killed",
                        "the kernel's OOM killer ended it (memory limit reached)",
                    );
                }
                self.set(|s| s.last_exit = Some(exit));
            }
            let ran = self
                .status
                .borrow()
                .started_at_ms
                .map(|t| now_ms().saturating_sub(t));
            let clean = why.is_none() && exit.as_ref().is_some_and(|e| e.code == Some(0));
            if ran.is_some_and(|ms| ms >= RESET_AFTER.as_millis() as u64) {
                failures = 0;
            }
            let spec = &self.svc.spec;
            if spec.kind == Kind::Oneshot && clean {
                self.event("completed", "ran to completion");
                self.set(|s| {
                    s.state = State::Completed;
                    s.reason = None;
                });
                want = false;
                continue;
            }
            let policy = spec.restart_policy();
            let restart = match policy {
                RestartPolicy::Always => true,
                RestartPolicy::OnFailure => !clean,
                RestartPolicy::Never => false,
            };
            let reason = why.unwrap_or_else(|| describe_exit(exit.as_ref()));
            if !restart {
                let state = if clean { State::Stopped } else { State::Failed };
                self.event(
                    if clean { "stopped" } else { "failed" },
                    format!(
                        "{reason}; restart = \"{}\", not restarting",
                        policy.as_str()
                    ),
                );
                self.set(|s| {
                    s.state = state;
                    s.reason = Some(reason);
                });
                want = false;
                continue;
            }
            failures += 1;
            if spec.max_retries.is_some_and(|max| failures > max) {
                let max = spec.max_retries.unwrap_or(0);
                self.event("failed", format!("{reason}; gave up after {max} retries"));
                self.set(|s| {
                    s.state = State::Failed;
                    s.reason = Some(format!("{reason} (gave up after {max} retries)"));
                });
                want = false;
                continue;
            }
            let delay = backoff(failures);
            self.event(
                "restarting",
                format!("{reason}; restarting in {}ms", delay.as_millis()),
            );
            self.set(|s| {
                s.state = State::Backoff;
                s.reason = Some(reason);
                s.next_restart_ms = Some(now_ms() + delay.as_millis() as u64);
            });
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                cmd = self.cmds.recv() => {
                    let Some(cmd) = cmd else { return };
                    if let Flow::Exit = self.handle_idle(cmd, &mut want) { return; }
                    if matches!(self.status.borrow().state, State::Stopped) { failures = 0; }
                }
            }
            self.set(|s| {
                s.next_restart_ms = None;
                s.restarts += 1;
            });
        }
    }

    /// A command while not running: applies it; says whether the task goes on.
    fn handle_idle(&mut self, cmd: Cmd, want: &mut bool) -> Flow {
        match cmd {
            Cmd::Start | Cmd::Restart | Cmd::Kill(_) => {}
            Cmd::Stop(ack) => {
                *want = false;
                self.set(|s| {
                    s.state = State::Stopped;
                    s.reason = Some("stopped on request".into());
                    s.next_restart_ms = None;
                });
                let _ = ack.send(());
            }
            Cmd::Replace(svc) => {
                *want = svc.spec.enabled;
                self.replace(svc);
            }
            Cmd::Remove(ack) => {
                let _ = ack.send(());
                return Flow::Exit;
            }
        }
        Flow::Continue
    }

    fn replace(&mut self, svc: Arc<Service>) {
        self.event(
            "updated",
            format!(
                "spec changed ({} -> {})",
                self.svc.spec.hash(),
                svc.spec.hash()
            ),
        );
        let fresh = initial_status(&svc);
        self.svc = svc;
        self.set(|s| {
            *s = ServiceStatus {
                last_exit: s.last_exit.clone(),
                ..fresh
            };
        });
    }

    /// Waits until every dependency allows a start, and then the root's kernel modules (a
    /// container needs them from its first mount); returns early with a command.
    async fn wait_for_dependencies(&mut self) -> Option<Cmd> {
        let mut epoch = self.sup.epoch.subscribe();
        let modules = self.sup.modules.clone();
        loop {
            let blocking = self
                .blocking_dependency()
                .or_else(|| (!modules.is_ready()).then(|| modules.reason()));
            match blocking {
                None => return None,
                Some(reason) => {
                    if self.status.borrow().reason.as_deref() != Some(&reason)
                        || self.status.borrow().state != State::Waiting
                    {
                        self.set(|s| {
                            s.state = State::Waiting;
                            s.reason = Some(reason);
                        });
                    }
                }
            }
            tokio::select! {
                r = epoch.changed() => if r.is_err() { return None },
                () = modules.wait(), if !modules.is_ready() => {}
                cmd = self.cmds.recv() => return cmd.or(Some(Cmd::Remove(oneshot::channel().0))),
            }
        }
    }

    /// The first dependency that does not allow a start yet, as a reason.
    fn blocking_dependency(&self) -> Option<String> {
        let spec = &self.svc.spec;
        if spec
            .dependencies()
            .contains(keelson_spec::network::NETWORK_ONLINE)
        {
            if let Some(reason) = self.sup.network_blocks() {
                return Some(reason);
            }
        }
        for dep in spec.requirements() {
            if dep == keelson_spec::network::NETWORK_ONLINE {
                continue;
            }
            match self.sup.state_of(dep) {
                Some(State::Running | State::Completed) => {}
                Some(state) => return Some(format!("waiting for {dep} ({})", state.as_str())),
                None => return Some(format!("waiting for {dep} (not defined)")),
            }
        }
        for dep in &spec.after {
            if let Some(State::Waiting | State::Starting | State::Backoff) = self.sup.state_of(dep)
            {
                return Some(format!("waiting for {dep} to start (after)"));
            }
        }
        None
    }

    /// Starts the container and watches it until it ends or a command interrupts it.
    async fn run_once(&mut self) -> Ended {
        self.set(|s| {
            s.state = State::Starting;
            s.reason = None;
            s.health = None;
        });
        // Its dependencies allow it: the boot timeline's start of this service.
        self.event("starting", "creating its container");
        let instance = match self.start_container().await {
            Ok(i) => i,
            Err(err) => {
                let reason = format!("start failed: {err:#}");
                self.event("start-failed", reason.clone());
                self.sup
                    .logs
                    .push(self.name(), Stream::Stderr, format!("[sysd] {reason}"));
                let info = ExitInfo {
                    code: None,
                    signal: None,
                    oom_killed: false,
                    at_ms: now_ms(),
                };
                return Ended::Failed(info, reason);
            }
        };
        self.supervise(instance).await
    }

    /// Gives an adopted bridge container its place on the bridge back (its address kept in
    /// the store, the hosts file, its published ports), before anything else of it resumes.
    async fn reattach(&self, a: &adopt::Adopted) -> anyhow::Result<()> {
        let Some(ep) = &a.endpoint else {
            return Ok(());
        };
        let net = self.sup.network().ok_or_else(|| {
            anyhow::anyhow!("network = \"bridge\" needs sysd's host networking (--host-network)")
        })?;
        let ports: Vec<_> = self
            .svc
            .spec
            .ports
            .iter()
            .filter_map(|p| PortSpec::parse(p).ok())
            .collect();
        net.reattach(ep, &ports)
            .await
            .map_err(|e| anyhow::anyhow!("bridge network: {e:#}"))
    }

    /// Resumes a container a previous sysd started: its log readers on the pipes init kept,
    /// its status as it was (running, restarts), then supervision as for one just started.
    async fn resume_adopted(&mut self, a: adopt::Adopted) -> Ended {
        self.event(
            "adopted",
            format!(
                "pid {} kept running across the sysd restart ({} restart(s) so far)",
                a.record.pid, a.record.restarts
            ),
        );
        let name = self.name().to_owned();
        self.sup.logs.capture(&name, Stream::Stdout, a.stdout);
        self.sup.logs.capture(&name, Stream::Stderr, a.stderr);
        let started_us = keelson_runtime::adopt::ticks_to_us(a.record.start_ticks);
        let uptime_us = u64::try_from(boottime().as_micros()).unwrap_or(u64::MAX);
        let ran = Duration::from_micros(uptime_us.saturating_sub(started_us));
        let has_health = self.svc.spec.health.is_some();
        let kind = self.svc.spec.kind;
        self.set(|s| {
            s.pid = Some(a.record.pid);
            s.started_at_ms = Some(now_ms().saturating_sub(ran.as_millis() as u64));
            s.restarts = a.record.restarts;
            s.reason = None;
            if kind == Kind::Service {
                s.state = State::Running;
                s.health = has_health.then_some(Health::Starting);
            } else {
                s.state = State::Starting;
            }
        });
        let exits = Arc::clone(&self.sup.exits.lock().unwrap_or_else(|p| p.into_inner()));
        let instance = Instance {
            pid: a.record.pid,
            pidfd: a.pidfd,
            started: Instant::now().checked_sub(ran).unwrap_or_else(Instant::now),
            joined_pid: a.joined_pid,
            adopted: Some((exits, started_us)),
        };
        self.supervise(instance).await
    }

    /// Watches a started (or adopted) instance until it ends, then removes what is left of it.
    async fn supervise(&mut self, instance: Instance) -> Ended {
        let ended = self.watch(&instance).await;
        // Whatever ended the run, nothing of the instance may stay: kill the cgroup, reap,
        // remove the container.
        let ended = match ended {
            Ended::Command(cmd) => {
                let exit = instance_exit(&instance);
                tokio::pin!(exit);
                self.stop_instance(&instance, exit, "stopping on request")
                    .await;
                Ended::Command(cmd)
            }
            other => other,
        };
        self.cleanup(&instance).await;
        ended
    }

    async fn start_container(&mut self) -> anyhow::Result<Instance> {
        // Off the (single-threaded) runtime: the first start of an OCI layout unpacks it.
        let (reference, layout) = (self.svc.spec.image.clone(), self.sup.paths.layout.clone());
        let image = if keelson_spec::reference::is_registry(&reference) {
            // Pulled on demand (once: later starts, and boots, use the store); the pull's
            // milestones are this service's events, all told before it goes on.
            let (progress, mut items) = mpsc::unbounded_channel();
            let pull = async {
                let image = self.sup.images.ensure(&reference, &progress).await;
                drop(progress);
                image
            };
            let tell = async {
                while let Some(item) = items.recv().await {
                    if let Some(n) = keelson_images::manager::milestone(&item) {
                        self.sup.events.emit(Some(self.name()), n.kind, n.message);
                    }
                }
            };
            tokio::join!(pull, tell).0?
        } else {
            tokio::task::spawn_blocking(move || resolve::image(&reference, &layout)).await??
        };
        let mut cfg = resolve::container(&self.svc, &image, &self.sup.paths.layout)?;
        let mut joined_pid = None;
        if let Some(owner) = self.svc.spec.network.joined() {
            // Checked again at the start: the owner may have gone since the dependency wait.
            let pid = match (self.sup.state_of(owner), self.sup.pid_of(owner)) {
                (Some(State::Running), Some(pid)) => pid,
                _ => anyhow::bail!("network = \"service:{owner}\": `{owner}` is not running"),
            };
            cfg.network = keelson_runtime::NetworkMode::Join(format!("/proc/{pid}/ns/net").into());
            joined_pid = Some(pid);
        }
        if self.svc.spec.network == keelson_spec::Network::Bridge {
            let net = self.sup.network().ok_or_else(|| {
                anyhow::anyhow!(
                    "network = \"bridge\" needs sysd's host networking (--host-network)"
                )
            })?;
            let ports: Vec<_> = self
                .svc
                .spec
                .ports
                .iter()
                .filter_map(|p| PortSpec::parse(p).ok())
                .collect();
            let ep = net
                .attach(self.name(), &ports)
                .await
                .map_err(|e| anyhow::anyhow!("bridge network: {e}"))?;
            cfg.annotations
                .insert(ANNOTATION.into(), serde_json::to_string(&ep)?);
            cfg.mounts.push(keelson_runtime::Mount::Bind {
                source: net.hosts_file(),
                target: "/etc/hosts".into(),
                readonly: true,
            });
        }
        let restarts = self.status.borrow().restarts;
        cfg.annotations.insert(
            keelson_runtime::adopt::RESTARTS.into(),
            restarts.to_string(),
        );
        let (out_r, out_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
        let (err_r, err_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
        let keeper = self
            .sup
            .keeper
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        for (stream, pipe) in [(Stream::Stdout, &out_r), (Stream::Stderr, &err_r)] {
            // Room for what the service writes while no sysd reads (a crash, a restart); a
            // smaller buffer still works, it only pauses the writer sooner.
            if let Err(e) = keelson_runtime::set_pipe_size(pipe, PIPE_SIZE) {
                tracing::warn!("sysd: {}: pipe buffer stays small: {e}", self.name());
            }
            // Kept by init too, so the pipe outlives this sysd and a next one reads on.
            if let Some(k) = &keeper {
                k.keep(&adopt::fd_name(self.name(), stream), pipe.try_clone()?);
            }
        }
        self.sup.logs.capture(self.name(), Stream::Stdout, out_r);
        self.sup.logs.capture(self.name(), Stream::Stderr, err_r);
        let started = self.sup.runtime.start(&cfg, out_w, err_w).await?;
        let pid = started.pid;
        self.event("started", format!("pid {pid}"));
        self.set(|s| {
            s.pid = Some(pid);
            s.started_at_ms = Some(now_ms());
        });
        Ok(Instance {
            pid,
            pidfd: started.pidfd,
            started: Instant::now(),
            joined_pid,
            adopted: None,
        })
    }

    /// From start to the end of the instance: readiness, then health, and commands.
    async fn watch(&mut self, inst: &Instance) -> Ended {
        let spec = Arc::clone(&self.svc);
        let spec = &spec.spec;
        let exit = instance_exit(inst);
        tokio::pin!(exit);
        let mut epoch = self.sup.epoch.subscribe();
        let netns_pid = (spec.network != keelson_spec::Network::Host).then_some(inst.pid);

        let mut ready = spec.ready.is_none() || inst.adopted.is_some();
        if ready && inst.adopted.is_none() {
            self.became_ready();
        }
        let mut failures = 0u32;
        let mut next_check = tokio::time::Instant::now();
        loop {
            let check = if ready {
                spec.health.as_ref()
            } else {
                spec.ready.as_ref()
            };
            let tick = async {
                match check {
                    Some(c) => {
                        tokio::time::sleep_until(next_check).await;
                        Some(c)
                    }
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                res = exit.as_mut() => {
                    return Ended::Exited(self.exit_info(res));
                }
                cmd = self.cmds.recv() => {
                    match cmd {
                        Some(Cmd::Start) => {}
                        Some(Cmd::Kill(sig)) => {
                            self.event("signal", format!("sending {sig} to pid {}", inst.pid));
                            let _ = keelson_runtime::signal_pidfd(&inst.pidfd, sig as i32);
                        }
                        Some(cmd) => return Ended::Command(cmd),
                        None => return Ended::Command(Cmd::Remove(oneshot::channel().0)),
                    }
                }
                r = epoch.changed() => {
                    if r.is_ok() {
                        if let Some(dep) = self.lost_requirement() {
                            self.stop_instance(inst, exit.as_mut(), &format!("required service {dep} stopped")).await;
                            return Ended::DependencyLost(format!("waiting for {dep} (required, stopped)"));
                        }
                        if let Some(owner) = self.lost_netns_owner(inst) {
                            // Its namespace went with its container: rejoin the new one.
                            self.stop_instance(inst, exit.as_mut(), &format!("network namespace owner {owner} restarted")).await;
                            return Ended::DependencyLost(format!("waiting for {owner} (network namespace owner restarted)"));
                        }
                    }
                }
                Some(c) = tick => {
                    let probe = match c.probe() { Ok(p) => p, Err(_) => continue };
                    let target = checks::Target { runtime: &self.sup.runtime, container_id: self.name(), netns_pid };
                    let result = checks::run(&probe, &target, c.timeout.0).await;
                    next_check = tokio::time::Instant::now() + c.interval.0;
                    match result {
                        Ok(()) => {
                            failures = 0;
                            if !ready {
                                ready = true;
                                self.became_ready();
                            } else if self.status.borrow().health != Some(Health::Healthy) {
                                self.event("healthy", "health check passed");
                                self.set(|s| {
                                    s.health = Some(Health::Healthy);
                                    s.reason = None;
                                });
                            } else if self.status.borrow().reason.is_some() {
                                // A failure or two below `retries`, then a pass.
                                self.set(|s| s.reason = None);
                            }
                        }
                        Err(err) => {
                            let what = if ready { "health" } else { "readiness" };
                            if inst.started.elapsed() < c.start_period.0 {
                                // Not counted yet, but said: `keelctl ps` shows why a service
                                // is still starting (an etcd member without quorum, say).
                                self.set_reason(format!("{what} check failing (start period, not counted): {err:#}"));
                                continue;
                            }
                            failures += 1;
                            if failures < c.retries {
                                self.set_reason(format!("{what} check failed {failures} of {} times: {err:#}", c.retries));
                            }
                            if failures >= c.retries {
                                let why = format!("{what} check failed {failures} times: {err:#}");
                                self.event("unhealthy", why.clone());
                                self.set(|s| s.health = Some(Health::Unhealthy));
                                let info = self.stop_instance(inst, exit.as_mut(), "unhealthy").await;
                                return Ended::Failed(info, why);
                            }
                        }
                    }
                }
            }
        }
    }

    fn became_ready(&self) {
        let has_health = self.svc.spec.health.is_some();
        if self.svc.spec.kind == Kind::Oneshot {
            return;
        }
        self.event("ready", "running");
        self.set(|s| {
            s.state = State::Running;
            s.reason = None;
            s.health = has_health.then_some(Health::Starting);
        });
    }

    /// `network = "service:NAME"` whose NAME no longer runs the container it joined.
    fn lost_netns_owner(&self, inst: &Instance) -> Option<String> {
        let owner = self.svc.spec.network.joined()?;
        let same = self.sup.state_of(owner) == Some(State::Running)
            && self.sup.pid_of(owner) == inst.joined_pid;
        (!same).then(|| owner.to_string())
    }

    /// A required dependency that is stopped or failed for good.
    fn lost_requirement(&self) -> Option<String> {
        self.svc
            .spec
            .requirements()
            .filter(|dep| *dep != keelson_spec::network::NETWORK_ONLINE)
            .find(|dep| {
                matches!(
                    self.sup.state_of(dep),
                    Some(State::Stopped | State::Failed) | None
                )
            })
            .map(str::to_string)
    }

    fn exit_info(&self, res: std::io::Result<keelson_runtime::ExitInfo>) -> ExitInfo {
        use keelson_runtime::ExitInfo as Raw;
        let oom_killed = self.oom_kills() > 0;
        let (code, signal) = match res {
            Ok(Raw::Exited(c)) => (Some(c), None),
            Ok(Raw::Signaled(s)) => (None, Some(s)),
            Err(_) => (None, None),
        };
        ExitInfo {
            code,
            signal,
            oom_killed,
            at_ms: now_ms(),
        }
    }

    fn oom_kills(&self) -> u64 {
        let path = format!("{}/{}", self.sup.paths.layout.cgroup_parent, self.svc.name);
        self.sup
            .runtime
            .stats(&path)
            .ok()
            .and_then(|s| s.memory_oom_kill)
            .unwrap_or(0)
    }

    /// Stop signal, stop timeout, then SIGKILL of the whole cgroup; returns how it ended.
    async fn stop_instance<F>(&self, inst: &Instance, mut exit: Pin<&mut F>, why: &str) -> ExitInfo
    where
        F: Future<Output = std::io::Result<keelson_runtime::ExitInfo>>,
    {
        let spec = &self.svc.spec;
        self.event(
            "stopping",
            format!(
                "{why}: sending {} (timeout {})",
                spec.stop_signal, spec.stop_timeout
            ),
        );
        self.set(|s| s.state = State::Stopping);
        let _ = keelson_runtime::signal_pidfd(&inst.pidfd, spec.stop_signal.0 as i32);
        let res = match tokio::time::timeout(spec.stop_timeout.0, exit.as_mut()).await {
            Ok(res) => res,
            Err(_) => {
                self.event(
                    "killing",
                    format!(
                        "still running after {}: SIGKILL to its cgroup",
                        spec.stop_timeout
                    ),
                );
                let cg = format!("{}/{}", self.sup.paths.layout.cgroup_parent, self.svc.name);
                if let Err(e) = self.sup.runtime.kill_cgroup(&cg).await {
                    tracing::warn!("sysd: {}: {e:#}", self.name());
                }
                exit.await
            }
        };
        if let Err(err) = &res {
            tracing::warn!("sysd: {}: waiting for pid {}: {err}", self.name(), inst.pid);
        }
        let info = self.exit_info(res);
        self.event("stopped", describe_exit(Some(&info)));
        info
    }

    async fn cleanup(&self, _inst: &Instance) {
        let keeper = self
            .sup
            .keeper
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if let Some(k) = keeper {
            for stream in [Stream::Stdout, Stream::Stderr] {
                k.forget(&adopt::fd_name(self.name(), stream));
            }
        }
        let cg = format!("{}/{}", self.sup.paths.layout.cgroup_parent, self.svc.name);
        if let Err(e) = self.sup.runtime.kill_cgroup(&cg).await {
            tracing::warn!("sysd: {}: {e:#}", self.name());
        }
        if let Err(e) = self.sup.runtime.remove(self.name(), &cg).await {
            self.event("cleanup-failed", format!("{e:#}"));
        }
        self.set(|s| {
            s.pid = None;
        });
    }
}

enum Flow {
    Continue,
    Exit,
}

/// Time since boot, suspend included (what /proc's process start times count from).
fn boottime() -> Duration {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME)
        .map(Duration::from)
        .unwrap_or_default()
}

fn backoff(failures: u32) -> Duration {
    let shift = failures.saturating_sub(1).min(16);
    BACKOFF_START.saturating_mul(1 << shift).min(BACKOFF_MAX)
}

fn describe_exit(exit: Option<&ExitInfo>) -> String {
    match exit {
        Some(e) if e.oom_killed => {
            let how = match (e.code, e.signal) {
                (Some(c), _) => format!("exited with status {c}"),
                (_, Some(s)) => format!("signal {s}"),
                _ => "ended".into(),
            };
            format!("OOM-killed at its memory limit ({how})")
        }
        Some(ExitInfo { code: Some(c), .. }) => format!("exited with status {c}"),
        Some(ExitInfo {
            signal: Some(s), ..
        }) => {
            let name = Signal::try_from(*s).map(|s| s.as_str()).unwrap_or("?");
            format!("killed by signal {s} ({name})")
        }
        _ => "ended".into(),
    }
}

impl Supervisor {
    /// Reconciles the running node with the config made of the system services, the user-data
    /// layer on disk and `user` (the API's file: stored when given). `apply` with a new user
    /// file, and first boot after user data arrived late (from a metadata service), use it.
    pub async fn reconcile(
        &self,
        user: Option<String>,
        dry_run: bool,
    ) -> Result<ApplyPlan, Failure> {
        let _guard = self.apply_lock.lock().await;
        let shared = &self.shared;
        let sources = &shared.paths.sources;
        let system = self
            .system
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let userdata = sources
            .read_userdata_text()
            .map_err(|e| Failure::internal(e.to_string()))?;
        let new: Config = sources
            .combine(system, userdata.as_deref(), user.as_deref())
            .map_err(|e| Failure::bad_request(format!("config rejected, nothing changed: {e}")))?;
        let current: BTreeMap<String, Arc<Service>> = {
            let handles = shared.handles.lock().unwrap_or_else(|p| p.into_inner());
            handles
                .iter()
                .map(|(n, h)| (n.clone(), Arc::clone(&h.service)))
                .collect()
        };
        let mut plan = ApplyPlan {
            dry_run,
            ..ApplyPlan::default()
        };
        for (name, svc) in &new.services {
            match current.get(name) {
                None => plan.start.push(name.clone()),
                Some(old) if old.spec != svc.spec => plan.restart.push(name.clone()),
                Some(_) => plan.unchanged.push(name.clone()),
            }
        }
        plan.stop = current
            .keys()
            .filter(|n| !new.services.contains_key(*n))
            .cloned()
            .collect();
        if dry_run {
            return Ok(plan);
        }
        // The network first, as a try: a config whose network fails its check is refused
        // whole (services included) and the previous network is back in place.
        if let Some(net) = shared.network() {
            net.apply(new.net.clone()).await.map_err(|e| {
                Failure::bad_request(format!("config rejected, nothing changed: {e}"))
            })?;
        }
        shared.images.set_registries(new.registries.clone());
        if let Some(config) = &user {
            sources.store_user_text(config).map_err(|e| {
                Failure::internal(format!(
                    "storing {}: {e}; nothing changed",
                    sources.user_file.display()
                ))
            })?;
        }
        self.sync_admin_keys(&new);
        self.publish_update_spec();
        *self.effective.lock().unwrap_or_else(|p| p.into_inner()) = Some(new.clone());
        for name in &plan.stop {
            let (tx, rx) = oneshot::channel();
            if shared.send(name, Cmd::Stop(tx)).is_ok() {
                let _ = rx.await;
            }
            let (tx, rx) = oneshot::channel();
            if shared.send(name, Cmd::Remove(tx)).is_ok() {
                let _ = rx.await;
            }
            shared
                .handles
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(name);
            shared.logs.forget(name);
            shared.bump();
        }
        for name in &plan.start {
            shared.spawn(Arc::new(new.services[name].clone()));
        }
        for name in &plan.restart {
            let svc = Arc::new(new.services[name].clone());
            let mut handles = shared.handles.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(h) = handles.get_mut(name) {
                h.service = Arc::clone(&svc);
                let _ = h.cmds.send(Cmd::Replace(svc));
            }
        }
        shared.events.emit(
            None,
            "applied",
            format!(
                "{} started, {} restarted, {} stopped, {} unchanged",
                plan.start.len(),
                plan.restart.len(),
                plan.stop.len(),
                plan.unchanged.len()
            ),
        );
        Ok(plan)
    }

    /// Re-reads the config layers (the user's file as it is) and reconciles.
    pub async fn reload(&self) -> Result<ApplyPlan, Failure> {
        let user = self
            .shared
            .paths
            .sources
            .read_user_text()
            .map_err(|e| Failure::internal(e.to_string()))?;
        self.reconcile(user, false).await
    }
}

#[async_trait]
impl keelson_api::Config for Supervisor {
    async fn apply(&self, config: String, dry_run: bool) -> Result<ApplyPlan, Failure> {
        self.reconcile(Some(config), dry_run).await
    }

    fn view(&self) -> Option<api::config::ConfigView> {
        let config = self
            .effective
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()?;
        let s = &self.shared.paths.sources;
        let layer = |name: &str, path: &std::path::Path| api::config::Layer {
            name: name.into(),
            path: path.display().to_string(),
            present: path.exists(),
        };
        Some(api::config::ConfigView {
            layers: vec![
                layer("image", &s.system_dir),
                layer("user-data", &s.userdata_file),
                layer("api", &s.user_file),
            ],
            toml: config.render(),
        })
    }
}

#[async_trait]
impl keelson_api::Services for Supervisor {
    fn version(&self) -> api::Version {
        api::Version {
            version: env!("CARGO_PKG_VERSION").into(),
            uptime_s: self.started.elapsed().as_secs(),
            watchdog: self.watchdog.get().cloned(),
        }
    }

    fn list(&self) -> Vec<ServiceStatus> {
        self.shared.list()
    }

    fn status(&self, name: &str) -> Result<ServiceStatus, Failure> {
        self.shared.status(name)
    }

    async fn start(&self, name: &str) -> Result<ServiceStatus, Failure> {
        self.shared.send(name, Cmd::Start)?;
        tokio::task::yield_now().await;
        self.shared.status(name)
    }

    async fn stop(&self, name: &str) -> Result<ServiceStatus, Failure> {
        let (tx, rx) = oneshot::channel();
        self.shared.send(name, Cmd::Stop(tx))?;
        let _ = rx.await;
        self.shared.status(name)
    }

    async fn restart(&self, name: &str) -> Result<ServiceStatus, Failure> {
        self.shared.send(name, Cmd::Restart)?;
        tokio::task::yield_now().await;
        self.shared.status(name)
    }

    async fn kill(&self, name: &str, signal: i32) -> Result<ServiceStatus, Failure> {
        let sig = Signal::try_from(signal)
            .map_err(|_| Failure::bad_request(format!("invalid signal {signal}")))?;
        if self.shared.status(name)?.pid.is_none() {
            return Err(Failure::conflict(format!(
                "{name} is not running: nothing to signal"
            )));
        }
        self.shared.send(name, Cmd::Kill(sig))?;
        tokio::task::yield_now().await;
        self.shared.status(name)
    }

    fn logs(&self, name: &str, tail: Option<usize>, follow: bool) -> Result<LogFeed, Failure> {
        self.shared.status(name)?;
        let (backlog, live) = self.shared.logs.read(name, tail, follow);
        Ok(LogFeed { backlog, live })
    }

    fn events(&self, since: Option<u64>) -> EventFeed {
        let (backlog, live) = self.shared.events.subscribe(since);
        EventFeed { backlog, live }
    }

    fn boot(&self) -> Result<api::boot::Boot, Failure> {
        use api::boot::{self, ServiceBoot};
        let path = &self.shared.paths.init_log;
        let init = match std::fs::read_to_string(path) {
            Ok(text) => boot::parse_init_log(&text)
                .map_err(|e| Failure::internal(format!("{}: {e}", path.display())))?,
            // A host sysd (tests, benchmarks) has no init that records.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => {
                return Err(Failure::internal(format!(
                    "cannot read {}: {e}",
                    path.display()
                )))
            }
        };
        let mut services = self.shared.events.boot_times();
        {
            let handles = self
                .shared
                .handles
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            for (name, h) in handles.iter() {
                let record = services
                    .entry(name.clone())
                    .or_insert_with(|| ServiceBoot::new(name));
                record.after = h
                    .service
                    .spec
                    .dependencies()
                    .into_iter()
                    .map(str::to_string)
                    .collect();
                record.state = Some(h.status.borrow().state);
            }
        }
        Ok(boot::Boot {
            init,
            services: services.into_values().collect(),
            all_ready_us: self.shared.events.all_ready_us(),
            now_us: boot::boottime_us(),
        })
    }

    fn stats(&self) -> Vec<api::Stats> {
        let shared = &self.shared;
        let handles = shared.handles.lock().unwrap_or_else(|p| p.into_inner());
        handles
            .values()
            .filter(|h| h.status.borrow().pid.is_some())
            .map(|h| {
                let cg = format!("{}/{}", shared.paths.layout.cgroup_parent, h.service.name);
                let raw = shared.runtime.stats(&cg).unwrap_or_default();
                api::Stats {
                    service: h.service.name.clone(),
                    cpu_usage_usec: raw.cpu_usage_usec,
                    memory_current: raw.memory_current,
                    memory_peak: raw.memory_peak,
                    memory_max: h.service.spec.resources.memory_max.map(|m| m.0),
                    pids_current: raw.pids_current,
                    io_read_bytes: raw.io_rbytes,
                    io_write_bytes: raw.io_wbytes,
                    oom_kills: raw.memory_oom_kill,
                }
            })
            .collect()
    }
}
