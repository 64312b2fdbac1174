//! The supervisor: one task per service drives it through its lifecycle (wait for
//! dependencies, start the container, readiness, health, restart with backoff, stop), and a
//! shared table answers the API. Tasks talk to each other only through published status: a
//! service waiting on its dependencies watches a global "something changed" counter and reads
//! their states, so starts run in parallel wherever the dependency graph allows.
//!
//! `apply` validates the whole new config first; only then is it stored and reconciled:
//! services whose spec hash changed restart, removed ones stop, new ones start, others are not
//! touched.

mod admin;
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

use keelson_common::api::{
    self, now_ms, ApplyPlan, ExitInfo, Health, ServiceStatus, State, Stream,
};
use nix::sys::signal::Signal;
use tokio::sync::{mpsc, oneshot, watch};

use keelson_api::{Backend, EventFeed, Failure, LogFeed};
use keelson_runtime::Runtime;
use keelson_spec::{Config, Kind, RestartPolicy, Service, Sources};
use events::EventBus;
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

pub struct Supervisor {
    /// Itself, for `apply` to spawn tasks from a `&self` API call.
    me: std::sync::Weak<Supervisor>,
    runtime: Runtime,
    paths: Paths,
    events: EventBus,
    logs: Arc<LogHub>,
    handles: Mutex<BTreeMap<String, Handle>>,
    system: Mutex<Vec<Service>>,
    /// Bumped on every status change: dependency waits and stop ordering watch it.
    epoch: watch::Sender<u64>,
    apply_lock: tokio::sync::Mutex<()>,
    /// The effective config, as last loaded or applied (`GET /v1/config`).
    effective: Mutex<Option<Config>>,
    /// This boot's first-boot report (`GET /v1/firstboot`).
    firstboot: Mutex<Option<api::firstboot::FirstBoot>>,
    started: Instant,
    /// The host network manager, when sysd manages the host network (`--host-network`).
    net: NetworkSlot,
    /// The image store on /var and registry pulls.
    images: keelson_images::manager::Images,
    /// The update agent, behind the API's `/v1/update/*` (set once at start).
    update: std::sync::OnceLock<Arc<keelson_update::Agent>>,
}

/// Set once at boot: whether the host network is managed and, once started, its manager.
#[derive(Default)]
struct NetworkSlot {
    managed: std::sync::atomic::AtomicBool,
    net: std::sync::OnceLock<Arc<keelson_net::Net>>,
}

impl Supervisor {
    pub fn new(runtime: Runtime, paths: Paths) -> Arc<Self> {
        Arc::new_cyclic(|me| Supervisor {
            me: me.clone(),
            logs: Arc::new(LogHub::new(
                paths.log_dir.clone(),
                logs::Rotation::default(),
            )),
            runtime,
            images: keelson_images::manager::Images::new(paths.layout.images.clone()),
            paths,
            events: EventBus::new(),
            handles: Mutex::new(BTreeMap::new()),
            system: Mutex::new(Vec::new()),
            epoch: watch::channel(0).0,
            apply_lock: tokio::sync::Mutex::new(()),
            firstboot: Mutex::new(None),
            effective: Mutex::new(None),
            started: Instant::now(),
            net: NetworkSlot::default(),
            update: std::sync::OnceLock::new(),
        })
    }

    /// Loads the config and starts everything. A bad user config is reported and skipped (the
    /// system services still run, so the node stays manageable); a bad system config is the
    /// image's fault and is reported the same way.
    /// Services waiting for `network-online` wait for the manager given to `set_network`.
    pub fn manage_network(&self) {
        self.net
            .managed
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    pub fn set_network(&self, net: Arc<keelson_net::Net>) {
        let _ = self.net.net.set(net);
        self.bump();
    }

    pub fn network(&self) -> Option<&Arc<keelson_net::Net>> {
        self.net.net.get()
    }

    /// For the network manager: an event, and a new look at dependencies on network-online.
    pub fn network_event(&self, kind: &str, message: String) {
        self.events.emit(None, kind, message);
    }

    /// Dependency waits look again (the network-online state changed).
    pub fn network_changed(&self) {
        self.bump();
    }

    /// Why `network-online` does not allow a start yet, if it does not.
    fn network_blocks(&self) -> Option<String> {
        if !self.net.managed.load(std::sync::atomic::Ordering::SeqCst) {
            return None;
        }
        match self.net.net.get().map(|n| n.online()) {
            None | Some(keelson_net::Online::Pending) => Some(format!(
                "waiting for {}",
                keelson_spec::network::NETWORK_ONLINE
            )),
            Some(_) => None,
        }
    }

    /// The effective `[network]`/`[host]` config as boot loads it (a bad user file falls back
    /// to the image's, like the services).
    pub fn boot_network_config(&self) -> keelson_spec::network::NetConfig {
        let sources = &self.paths.sources;
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

    pub fn boot(self: &Arc<Self>) {
        let sources = &self.paths.sources;
        let system = sources.read_system().unwrap_or_else(|e| {
            self.events.emit(
                None,
                "config-error",
                format!("system services not loaded: {e}"),
            );
            Vec::new()
        });
        *self.system.lock().unwrap_or_else(|p| p.into_inner()) = system.clone();
        let userdata = sources.read_userdata_text().unwrap_or_else(|e| {
            self.events.emit(
                None,
                "config-error",
                format!("user-data config not loaded: {e}"),
            );
            None
        });
        let user = sources.read_user_text().unwrap_or_else(|e| {
            self.events.emit(
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
                self.events.emit(
                    None,
                    "config-error",
                    format!("user services not loaded: {e}"),
                );
                sources
                    .combine(system.clone(), userdata.as_deref(), None)
                    .or_else(|e| {
                        self.events.emit(
                            None,
                            "config-error",
                            format!("user-data config not loaded: {e}"),
                        );
                        sources.combine(system, None, None)
                    })
                    .unwrap_or_default()
            }
        };
        self.images.set_registries(config.registries.clone());
        self.sync_admin_keys(&config);
        *self.effective.lock().unwrap_or_else(|p| p.into_inner()) = Some(config.clone());
        for svc in config.services.into_values() {
            self.spawn(Arc::new(svc));
        }
    }

    /// Itself, owned, for work that outlives a `&self` API call.
    fn strong(&self) -> Result<Arc<Supervisor>, Failure> {
        self.me
            .upgrade()
            .ok_or_else(|| Failure::internal("sysd is shutting down"))
    }

    /// Service names by the normalized reference of their registry `image`.
    fn image_users(&self) -> keelson_images::manager::Users {
        let handles = self.handles.lock().unwrap_or_else(|p| p.into_inner());
        let mut users = keelson_images::manager::Users::new();
        for (name, h) in handles.iter() {
            if let Ok(r) = keelson_spec::reference::parse(&h.service.spec.image) {
                users
                    .entry(keelson_spec::reference::canonical(&r))
                    .or_default()
                    .push(name.clone());
            }
        }
        users
    }

    /// Installs `[admin]` keys before the admin service (re)starts; a failure is an event, the
    /// rest of the config still runs.
    fn sync_admin_keys(&self, config: &Config) {
        match admin::sync_keys(config, &self.paths.layout.volumes) {
            Ok(Some(path)) => tracing::info!(
                "sysd: admin: {} ssh key(s) installed in {}",
                config.admin.ssh_authorized_keys.len(),
                path.display()
            ),
            Ok(None) => {}
            Err(e) => self
                .events
                .emit(Some("admin"), "config-error", format!("admin keys: {e:#}")),
        }
    }

    fn spawn(self: &Arc<Self>, svc: Arc<Service>) {
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
        };
        tokio::spawn(task.run());
        self.bump();
    }

    fn bump(&self) {
        self.epoch.send_modify(|n| *n += 1);
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

    /// Stops every service, dependents before what they depend on, in parallel otherwise.
    pub async fn shutdown(self: &Arc<Self>) {
        self.events.emit(None, "shutdown", "stopping all services");
        let services: Vec<Arc<Service>> = {
            let handles = self.handles.lock().unwrap_or_else(|p| p.into_inner());
            handles.values().map(|h| Arc::clone(&h.service)).collect()
        };
        let mut waits = Vec::new();
        for svc in &services {
            let dependents: Vec<String> = services
                .iter()
                .filter(|o| o.spec.dependencies().contains(svc.name.as_str()))
                .map(|o| o.name.clone())
                .collect();
            let sup = Arc::clone(self);
            let name = svc.name.clone();
            waits.push(tokio::spawn(async move {
                let mut epoch = sup.epoch.subscribe();
                while dependents
                    .iter()
                    .any(|d| sup.state_of(d).is_some_and(is_active))
                {
                    if epoch.changed().await.is_err() {
                        break;
                    }
                }
                let (tx, rx) = oneshot::channel();
                if sup.send(&name, Cmd::Stop(tx)).is_ok() {
                    let _ = rx.await;
                }
            }));
        }
        for w in waits {
            let _ = w.await;
        }
        self.events.emit(None, "shutdown", "all services stopped");
    }

    /// Kills containers left by a previous sysd (after a crash): nothing runs twice.
    pub async fn clean_leftovers(&self) {
        match self.runtime.cleanup_leftovers().await {
            Ok(found) => {
                for left in found {
                    self.events.emit(
                        left.id.as_deref(),
                        "cleanup",
                        format!("removed what a previous sysd left: {}", left.describe()),
                    );
                }
            }
            Err(e) => self.events.emit(None, "cleanup-failed", format!("{e:#}")),
        }
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
        critical: svc.spec.critical,
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
    sup: Arc<Supervisor>,
    svc: Arc<Service>,
    status: watch::Sender<ServiceStatus>,
    cmds: mpsc::UnboundedReceiver<Cmd>,
}

impl ServiceTask {
    fn name(&self) -> &str {
        &self.svc.name
    }

    fn set(&self, f: impl FnOnce(&mut ServiceStatus)) {
        self.status.send_modify(f);
        self.sup.bump();
    }

    fn event(&self, kind: &str, message: impl Into<String>) {
        self.sup.events.emit(Some(&self.svc.name), kind, message);
    }

    async fn run(mut self) {
        let mut want = self.svc.spec.enabled;
        let mut failures: u32 = 0;
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

            if let Some(cmd) = self.wait_for_dependencies().await {
                match self.handle_idle(cmd, &mut want) {
                    Flow::Continue => continue,
                    Flow::Exit => return,
                }
            }

            let ended = self.run_once().await;
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

    /// Waits until every dependency allows a start; returns early with a command.
    async fn wait_for_dependencies(&mut self) -> Option<Cmd> {
        let mut epoch = self.sup.epoch.subscribe();
        loop {
            match self.blocking_dependency() {
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
        let ended = self.watch(&instance).await;
        // Whatever ended the run, nothing of the instance may stay: kill the cgroup, reap,
        // remove the container.
        let ended = match ended {
            Ended::Command(cmd) => {
                let exit = keelson_runtime::wait_exit(&instance.pidfd);
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
            // Pulled on demand (once: later starts, and boots, use the store).
            let (sup, name) = (Arc::clone(&self.sup), self.svc.name.clone());
            let progress = keelson_images::manager::with_events(
                move |kind, message| sup.events.emit(Some(&name), kind, message),
                None,
            );
            self.sup.images.ensure(&reference, &progress).await?
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
                .filter_map(|p| keelson_spec::network::PortSpec::parse(p).ok())
                .collect();
            let ep = net
                .attach(self.name(), &ports)
                .await
                .map_err(|e| anyhow::anyhow!("bridge network: {e}"))?;
            cfg.annotations.insert(
                keelson_net::bridge::ANNOTATION.into(),
                serde_json::to_string(&ep)?,
            );
            cfg.mounts.push(keelson_runtime::Mount::Bind {
                source: net.hosts_file(),
                target: "/etc/hosts".into(),
                readonly: true,
            });
        }
        let (out_r, out_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
        let (err_r, err_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
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
        })
    }

    /// From start to the end of the instance: readiness, then health, and commands.
    async fn watch(&mut self, inst: &Instance) -> Ended {
        let spec = Arc::clone(&self.svc);
        let spec = &spec.spec;
        let exit = keelson_runtime::wait_exit(&inst.pidfd);
        tokio::pin!(exit);
        let mut epoch = self.sup.epoch.subscribe();
        let netns_pid = (spec.network != keelson_spec::Network::Host).then_some(inst.pid);

        let mut ready = spec.ready.is_none();
        if ready {
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
                                self.set(|s| s.health = Some(Health::Healthy));
                            }
                        }
                        Err(err) => {
                            if inst.started.elapsed() < c.start_period.0 {
                                continue;
                            }
                            failures += 1;
                            let what = if ready { "health" } else { "readiness" };
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
    /// Connects the update agent to the API.
    pub fn set_update_agent(&self, agent: Arc<keelson_update::Agent>) {
        let _ = self.update.set(agent);
    }

    /// Where the config comes from (the update agent reads its `[update]` table there).
    pub fn sources(&self) -> &Sources {
        &self.paths.sources
    }

    /// An event not about one service (the update agent's).
    pub fn emit_event(&self, kind: &str, message: String) {
        self.events.emit(None, kind, message);
    }

    fn update_agent(&self) -> Result<Arc<keelson_update::Agent>, keelson_api::Failure> {
        self.update
            .get()
            .cloned()
            .ok_or_else(|| keelson_api::Failure::absent("the update agent is not running"))
    }

    /// Reconciles the running node with the config made of the system services, the user-data
    /// layer on disk and `user` (the API's file: stored when given). `apply` with a new user
    /// file, and first boot after user data arrived late (from a metadata service), use it.
    pub async fn reconcile(
        &self,
        user: Option<String>,
        dry_run: bool,
    ) -> Result<ApplyPlan, Failure> {
        let _guard = self.apply_lock.lock().await;
        let system = self
            .system
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let new: Config = self
            .paths
            .sources
            .combine(
                system,
                self.paths
                    .sources
                    .read_userdata_text()
                    .map_err(|e| Failure::internal(e.to_string()))?
                    .as_deref(),
                user.as_deref(),
            )
            .map_err(|e| Failure::bad_request(format!("config rejected, nothing changed: {e}")))?;
        let current: BTreeMap<String, Arc<Service>> = {
            let handles = self.handles.lock().unwrap_or_else(|p| p.into_inner());
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
        if let Some(net) = self.network() {
            net.apply(new.net.clone()).await.map_err(|e| {
                Failure::bad_request(format!("config rejected, nothing changed: {e}"))
            })?;
        }
        self.images.set_registries(new.registries.clone());
        if let Some(config) = &user {
            self.paths.sources.store_user_text(config).map_err(|e| {
                Failure::internal(format!(
                    "storing {}: {e}; nothing changed",
                    self.paths.sources.user_file.display()
                ))
            })?;
        }
        self.sync_admin_keys(&new);
        *self.effective.lock().unwrap_or_else(|p| p.into_inner()) = Some(new.clone());
        for name in &plan.stop {
            let (tx, rx) = oneshot::channel();
            if self.send(name, Cmd::Stop(tx)).is_ok() {
                let _ = rx.await;
            }
            let (tx, rx) = oneshot::channel();
            if self.send(name, Cmd::Remove(tx)).is_ok() {
                let _ = rx.await;
            }
            self.handles
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(name);
            self.logs.forget(name);
            self.bump();
        }
        if let Some(me) = self.me.upgrade() {
            for name in &plan.start {
                me.spawn(Arc::new(new.services[name].clone()));
            }
        }
        for name in &plan.restart {
            let svc = Arc::new(new.services[name].clone());
            let mut handles = self.handles.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(h) = handles.get_mut(name) {
                h.service = Arc::clone(&svc);
                let _ = h.cmds.send(Cmd::Replace(svc));
            }
        }
        self.events.emit(
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
            .paths
            .sources
            .read_user_text()
            .map_err(|e| Failure::internal(e.to_string()))?;
        self.reconcile(user, false).await
    }

    /// Records first boot's report and says what happened, on the console and as an event.
    pub fn set_firstboot(&self, status: api::firstboot::FirstBoot) {
        use api::firstboot::Outcome;
        let what = match status.outcome {
            Outcome::NoUserData => "no user data".to_string(),
            Outcome::Applied => format!(
                "applied {} user data of instance {} from {}",
                status.format.as_deref().unwrap_or("?"),
                status.instance_id.as_deref().unwrap_or("?"),
                status.source.as_deref().unwrap_or("?"),
            ),
            Outcome::AlreadyApplied => format!(
                "instance {} already configured; using the persisted config",
                status.instance_id.as_deref().unwrap_or("?")
            ),
            Outcome::Rejected => format!(
                "user data rejected, nothing applied (the last good config runs): {}",
                status.error.as_deref().unwrap_or("?")
            ),
        };
        let kind = if status.outcome == Outcome::Rejected {
            "firstboot-error"
        } else {
            "firstboot"
        };
        self.events
            .emit(None, kind, format!("{what} ({} ms)", status.duration_ms));
        for w in &status.warnings {
            self.events.emit(None, "firstboot-warning", w.clone());
        }
        *self.firstboot.lock().unwrap_or_else(|p| p.into_inner()) = Some(status);
    }
}

impl Backend for Supervisor {
    fn config(&self) -> Option<api::config::ConfigView> {
        let config = self
            .effective
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()?;
        let s = &self.paths.sources;
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

    fn firstboot(&self) -> Option<api::firstboot::FirstBoot> {
        self.firstboot
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn version(&self) -> api::Version {
        api::Version {
            version: env!("CARGO_PKG_VERSION").into(),
            uptime_s: self.started.elapsed().as_secs(),
        }
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

    async fn start(&self, name: &str) -> Result<ServiceStatus, Failure> {
        self.send(name, Cmd::Start)?;
        tokio::task::yield_now().await;
        self.status(name)
    }

    async fn stop(&self, name: &str) -> Result<ServiceStatus, Failure> {
        let (tx, rx) = oneshot::channel();
        self.send(name, Cmd::Stop(tx))?;
        let _ = rx.await;
        self.status(name)
    }

    async fn restart(&self, name: &str) -> Result<ServiceStatus, Failure> {
        self.send(name, Cmd::Restart)?;
        tokio::task::yield_now().await;
        self.status(name)
    }

    async fn kill(&self, name: &str, signal: i32) -> Result<ServiceStatus, Failure> {
        let sig = Signal::try_from(signal)
            .map_err(|_| Failure::bad_request(format!("invalid signal {signal}")))?;
        if self.status(name)?.pid.is_none() {
            return Err(Failure::conflict(format!(
                "{name} is not running: nothing to signal"
            )));
        }
        self.send(name, Cmd::Kill(sig))?;
        tokio::task::yield_now().await;
        self.status(name)
    }

    fn logs(&self, name: &str, tail: Option<usize>, follow: bool) -> Result<LogFeed, Failure> {
        self.status(name)?;
        let (backlog, live) = self.logs.read(name, tail, follow);
        Ok(LogFeed { backlog, live })
    }

    fn events(&self, since: Option<u64>) -> EventFeed {
        let (backlog, live) = self.events.subscribe(since);
        EventFeed { backlog, live }
    }

    fn stats(&self) -> Vec<api::Stats> {
        let handles = self.handles.lock().unwrap_or_else(|p| p.into_inner());
        handles
            .values()
            .filter(|h| h.status.borrow().pid.is_some())
            .map(|h| {
                let cg = format!("{}/{}", self.paths.layout.cgroup_parent, h.service.name);
                let raw = self.runtime.stats(&cg).unwrap_or_default();
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

    async fn network(&self) -> Result<keelson_common::api::network::NetworkStatus, Failure> {
        match self.network() {
            Some(net) => Ok(net.status().await),
            None => Err(Failure::absent(
                "this sysd does not manage the host network (started without --host-network)",
            )),
        }
    }

    fn images(&self) -> Result<Vec<api::images::ImageInfo>, Failure> {
        self.images
            .list(&self.image_users())
            .map_err(keelson_api::failure)
    }

    fn pull_image(
        &self,
        reference: &str,
    ) -> Result<mpsc::UnboundedReceiver<api::images::PullProgress>, Failure> {
        keelson_spec::reference::parse(reference)
            .map_err(|e| Failure::bad_request(format!("image {reference:?}: {e}")))?;
        let me = self.strong()?;
        let (tx, rx) = mpsc::unbounded_channel();
        let reference = reference.to_string();
        tokio::spawn(async move {
            let sup = Arc::clone(&me);
            let progress = keelson_images::manager::with_events(
                move |kind, message| sup.events.emit(None, kind, message),
                Some(tx.clone()),
            );
            if let Err(e) = me.images.pull(&reference, &progress).await {
                progress(api::images::PullProgress::Error {
                    message: format!("{e:#}"),
                });
            }
        });
        Ok(rx)
    }

    async fn remove_image(&self, reference: &str) -> Result<api::images::ImagesRemoved, Failure> {
        // Deleting unpacked trees can take a while: off the runtime's thread.
        let (me, users, reference) = (self.strong()?, self.image_users(), reference.to_string());
        let report = tokio::task::spawn_blocking(move || me.images.remove(&reference, &users))
            .await
            .map_err(|e| Failure::internal(format!("removing the image: {e}")))?
            .map_err(keelson_api::failure)?;
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

    async fn prune_images(&self) -> Result<api::images::ImagesRemoved, Failure> {
        let (me, users) = (self.strong()?, self.image_users());
        let report = tokio::task::spawn_blocking(move || me.images.prune(&users))
            .await
            .map_err(|e| Failure::internal(format!("pruning images: {e}")))?
            .map_err(keelson_api::failure)?;
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

    async fn apply(&self, config: String, dry_run: bool) -> Result<ApplyPlan, Failure> {
        self.reconcile(Some(config), dry_run).await
    }

    fn update_status(
        &self,
    ) -> Result<keelson_common::api::update::UpdateStatus, keelson_api::Failure> {
        Ok(self.update_agent()?.status())
    }

    async fn update_check(
        &self,
    ) -> Result<keelson_common::api::update::UpdateCheck, keelson_api::Failure> {
        self.update_agent()?
            .check()
            .await
            .map_err(keelson_api::failure)
    }

    async fn update_apply(
        &self,
        req: keelson_common::api::update::ApplyRequest,
    ) -> Result<keelson_common::api::update::UpdateStatus, keelson_api::Failure> {
        self.update_agent()?
            .apply(req)
            .await
            .map_err(keelson_api::failure)
    }

    async fn update_cancel(
        &self,
    ) -> Result<keelson_common::api::update::UpdateStatus, keelson_api::Failure> {
        self.update_agent()?
            .cancel()
            .await
            .map_err(keelson_api::failure)
    }

    async fn update_rollback(
        &self,
        reboot: bool,
    ) -> Result<keelson_common::api::update::UpdateStatus, keelson_api::Failure> {
        self.update_agent()?
            .rollback(reboot)
            .await
            .map_err(keelson_api::failure)
    }
}
