//! The update agent: A/B over-the-air updates from a TUF repository, and the boot health gate.
//!
//! - `check`/`apply` (API, `keelctl update`, or the automatic policy in its maintenance
//!   window) refresh the signed metadata and install the chosen version into the inactive slot
//!   ([`install`]); the running slot is never written and its boot entry never touched.
//! - A freshly installed version boots with a try counter (`keelson_<v>+3.efi`); systemd-boot
//!   counts the tries down. After such a boot, [`Agent::boot`] waits for every `critical`
//!   service to be healthy within `[update] health_timeout`, then blesses the entry (renames it
//!   without the counter) and records the version as good on /var; if the gate fails it asks
//!   for a reboot ([`Report::Reboot`], which the binary passes on to init). With no tries left
//!   systemd-boot boots the previous slot, which notices the staged version it did not boot
//!   and reports "rolled back from X".
//! - Each install runs on its own thread with its own current-thread runtime, so the block I/O
//!   and hashing never stall sysd's event loop.
//! - It knows the rest of sysd only through [`Channels`]: the `[update]` table and the
//!   services' statuses as `watch`es, events and reboot requests out as [`Report`]s.
//!
//! State on /var (`/var/lib/keelson/update/`): `state.json` (staged, last good, rollback),
//! `tuf/` (tough's datastore: the newest trusted metadata, so rollback protection survives
//! reboots).

mod coordinate;
pub mod delta;
pub mod extensions;
pub mod http;
pub mod install;
pub mod root_patch;
pub mod secure_boot;
pub mod slots;
#[cfg(test)]
mod tests;
pub mod uki;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use keelson_common::api::update::{ApplyRequest, Phase, Progress, UpdateCheck, UpdateStatus};
use keelson_common::api::{ServiceStatus, State};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use keelson_common::error::{Classify, Kind};
use keelson_common::notice::Notice;
use keelson_spec::extensions::ExtensionsSpec;
use keelson_spec::update::{in_window, parse_window, Policy, UpdateSpec};
use keelson_spec::ConfigError;
use slots::Discovery;
use tokio::sync::{mpsc, watch};

/// Why an agent call failed: its kind (the API maps it to a status) and the text a person
/// reads.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Error {
    pub kind: Kind,
    pub message: String,
}

impl Error {
    fn new(kind: Kind, message: impl Into<String>) -> Self {
        Error {
            kind,
            message: message.into(),
        }
    }
    /// The `[update]` config is wrong.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(Kind::Invalid, message)
    }
    /// The request contradicts the agent's state (an apply running, nothing to roll back to).
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(Kind::Conflict, message)
    }
    /// The update repository failed.
    pub fn upstream(message: impl Into<String>) -> Self {
        Self::new(Kind::Upstream, message)
    }
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(Kind::Internal, message)
    }
}

impl Classify for Error {
    fn kind(&self) -> Kind {
        self.kind
    }
}

/// Where the agent keeps and finds things.
#[derive(Debug, Clone)]
pub struct Paths {
    /// `/var/lib/keelson/update`.
    pub state_dir: PathBuf,
    /// The trusted TUF root baked into the image.
    pub trusted_root: PathBuf,
    /// The running image's os-release.
    pub os_release: PathBuf,
    pub machine_id: PathBuf,
    /// The engine extension store (`keelson_extensions::STORE_DIR`).
    pub extensions: PathBuf,
}

impl Default for Paths {
    fn default() -> Self {
        Paths {
            state_dir: "/var/lib/keelson/update".into(),
            trusted_root: "/usr/share/keelson/update/root.json".into(),
            os_release: "/usr/lib/os-release".into(),
            machine_id: "/var/lib/keelson/machine-id".into(),
            extensions: keelson_extensions::STORE_DIR.into(),
        }
    }
}

/// How the agent and the rest of sysd talk: values come in through `watch`es, what the agent
/// has to say goes out, in order, on `reports`.
pub struct Channels {
    /// The effective `[update]` table (or why it is invalid), republished on every config
    /// change, so `keelctl apply` takes effect.
    pub spec: watch::Receiver<Result<UpdateSpec, ConfigError>>,
    /// Every service's status; the health gate reads the critical ones.
    pub services: watch::Receiver<Vec<ServiceStatus>>,
    /// The effective `[extensions]` table: an update brings the listed versions of these.
    pub extensions: watch::Receiver<Result<ExtensionsSpec, ConfigError>>,
    pub reports: mpsc::UnboundedSender<Report>,
}

/// What the agent tells the rest of sysd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Report {
    /// An event for the event stream.
    Event(Notice),
    /// Reboot the node now (into a new slot, or away from a boot that failed its health gate).
    Reboot,
}

/// Persisted on /var.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Persisted {
    /// A verified version in the other slot whose first boot has not been assessed.
    #[serde(default)]
    pub staged: Option<Staged>,
    #[serde(default)]
    pub last_good: Option<String>,
    #[serde(default)]
    pub rolled_back_from: Option<String>,
    #[serde(default)]
    pub last_error: Option<String>,
    /// The etcd lease of this node's reboot slot (`[update.coordination]`), while it holds one.
    #[serde(default)]
    pub lock_lease: Option<i64>,
    /// The name this node took its reboot slot under, to give it back (and halt a rollout)
    /// under the same name after the reboot, whatever the host name is early in that boot.
    #[serde(default)]
    pub lock_node: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Staged {
    pub version: String,
    pub slot: String,
    pub entry: String,
}

struct Live {
    phase: Phase,
    progress: Option<Progress>,
    state: Persisted,
    boot_entry: Option<String>,
    assessment: String,
    /// The group's reboot semaphore as last seen.
    coordination: Option<keelson_common::api::update::Coordination>,
}

pub struct Agent {
    paths: Paths,
    discovery: Discovery,
    channels: Channels,
    live: Mutex<Live>,
    busy: AtomicBool,
    cancel: AtomicBool,
}

/// Clears `busy` when an apply ends, however it ends.
struct BusyGuard<'a>(&'a AtomicBool);

impl Drop for BusyGuard<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::SeqCst);
    }
}

impl Agent {
    pub fn new(paths: Paths, discovery: Discovery, channels: Channels) -> Arc<Agent> {
        let state = load_state(&paths.state_dir.join("state.json"));
        Arc::new(Agent {
            paths,
            discovery,
            channels,
            live: Mutex::new(Live {
                phase: Phase::Idle,
                progress: None,
                state,
                boot_entry: None,
                assessment: "unknown".into(),
                coordination: None,
            }),
            busy: AtomicBool::new(false),
            cancel: AtomicBool::new(false),
        })
    }

    fn live(&self) -> std::sync::MutexGuard<'_, Live> {
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn emit(&self, kind: &'static str, message: String) {
        self.report(Report::Event(Notice::new(kind, message)));
    }

    fn report(&self, report: Report) {
        // The receiver goes only when sysd is ending: nothing left to tell.
        let _ = self.channels.reports.send(report);
    }

    /// The effective `[update]` table, or why it is invalid.
    fn current_spec(&self) -> Result<UpdateSpec, ConfigError> {
        self.channels.spec.borrow().clone()
    }

    pub(crate) fn set_phase(&self, phase: Phase) {
        self.live().phase = phase;
    }

    pub(crate) fn set_progress_total(&self, total: u64) {
        self.live().progress = Some(Progress {
            downloaded: 0,
            download_total: total,
            written: 0,
        });
    }

    /// Grows the download total (a delta that fell back to the full root).
    pub(crate) fn add_progress_total(&self, n: u64) {
        if let Some(p) = self.live().progress.as_mut() {
            p.download_total += n;
        }
    }

    pub(crate) fn add_downloaded(&self, n: u64) {
        if let Some(p) = self.live().progress.as_mut() {
            p.downloaded += n;
        }
    }

    pub(crate) fn set_written(&self, n: u64) {
        if let Some(p) = self.live().progress.as_mut() {
            p.written = n;
        }
    }

    pub(crate) fn check_cancel(&self) -> Result<()> {
        if self.cancel.load(Ordering::SeqCst) {
            bail!("cancelled");
        }
        Ok(())
    }

    fn save(&self, f: impl FnOnce(&mut Persisted)) {
        let snapshot = {
            let mut live = self.live();
            f(&mut live.state);
            live.state.clone()
        };
        if let Err(e) = store_state(&self.paths.state_dir, &snapshot) {
            tracing::warn!("update: cannot record the update state: {e:#}");
        }
    }

    fn spec(&self) -> Result<UpdateSpec, Error> {
        self.current_spec().map_err(|e| Error::invalid(e.0))
    }

    fn os_release(&self) -> (String, String) {
        let text = std::fs::read_to_string(&self.paths.os_release).unwrap_or_default();
        let get = |k: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(k))
                .map(|v| v.trim_matches('"').to_string())
                .unwrap_or_default()
        };
        (get("IMAGE_VERSION="), get("VARIANT_ID="))
    }

    fn node(&self) -> Result<install::Node> {
        let (version, variant) = self.os_release();
        if version.is_empty() {
            bail!("{} has no IMAGE_VERSION", self.paths.os_release.display());
        }
        let (running, _) = self.discovery.running()?;
        let id = std::fs::read_to_string(&self.paths.machine_id).unwrap_or_default();
        let h = Sha256::new()
            .chain_update(id.trim())
            .chain_update(b"keelson update wave")
            .finalize();
        Ok(install::Node {
            version,
            variant,
            seed: (u16::from_be_bytes([h[0], h[1]]) % 100) as u8,
            target_slot: running.other().letter().to_string(),
        })
    }

    pub fn status(&self) -> UpdateStatus {
        let (version, _) = self.os_release();
        let slot = self
            .discovery
            .running()
            .map(|(s, _)| s.letter().to_string())
            .unwrap_or_else(|_| "?".into());
        let spec = self.current_spec().unwrap_or_default();
        let live = self.live();
        UpdateStatus {
            version,
            slot,
            boot_entry: live.boot_entry.clone(),
            assessment: live.assessment.clone(),
            phase: live.phase,
            progress: live.progress,
            staged: live.state.staged.as_ref().map(|s| s.version.clone()),
            last_good: live.state.last_good.clone(),
            rolled_back_from: live.state.rolled_back_from.clone(),
            last_error: live.state.last_error.clone(),
            policy: spec.policy.as_str().to_string(),
            repository: spec.repository.clone(),
            coordination: live.coordination.clone(),
        }
    }

    /// Runs `f` on a fresh thread with its own runtime (tough, hashing and block I/O stay off
    /// sysd's event loop).
    async fn on_thread<T: Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce(Arc<Agent>, &tokio::runtime::Runtime) -> T + Send + 'static,
    ) -> Result<T, Error> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let me = Arc::clone(self);
        std::thread::Builder::new()
            .name("update".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(_) => return,
                };
                let _ = tx.send(f(me, &rt));
            })
            .map_err(|e| Error::internal(format!("cannot start the update thread: {e}")))?;
        rx.await
            .map_err(|_| Error::internal("the update thread ended without an answer"))
    }

    /// `[extensions] enabled`, or why the table is invalid.
    fn enabled_extensions(&self) -> Result<Vec<String>> {
        self.channels
            .extensions
            .borrow()
            .clone()
            .map(|x| x.enabled)
            .map_err(|e| anyhow::anyhow!("{}", e.0))
    }

    /// Brings the extension store in line with `[extensions]` for the running version:
    /// downloads what the repository lists for it and the store lacks, and records the set
    /// (activation is the caller's). An enabled name the repository does not list for the
    /// running version is an error; the sets already recorded stay as they were.
    pub async fn sync_running_extensions(
        self: &Arc<Self>,
    ) -> Result<Vec<keelson_extensions::Entry>, Error> {
        let spec = self.spec()?;
        let enabled = self
            .enabled_extensions()
            .map_err(|e| Error::invalid(format!("{e:#}")))?;
        self.on_thread(move |agent, rt| {
            rt.block_on(async {
                let node = agent.node()?;
                let store = keelson_extensions::Store::new(&agent.paths.extensions);
                if enabled.is_empty() {
                    store.record(&node.version, Vec::new())?;
                    return Ok(Vec::new());
                }
                let repo = install::load_repo(
                    &spec,
                    &agent.paths.trusted_root,
                    &agent.paths.state_dir.join("tuf"),
                )
                .await?;
                let m = install::read_manifest(&repo).await?;
                let listed = extensions::select(&m, &node.version, &enabled)?;
                let base = spec.repository.clone().unwrap_or_default();
                agent
                    .sync_extensions(&repo, &store, &node.version, &listed, &base)
                    .await
            })
        })
        .await?
        .map_err(|e: anyhow::Error| Error::upstream(format!("{e:#}")))
    }

    pub async fn check(self: &Arc<Self>) -> Result<UpdateCheck, Error> {
        let spec = self.spec()?;
        self.on_thread(move |agent, rt| rt.block_on(agent.check_inner(&spec)))
            .await?
            .map_err(|e| {
                let msg = format!("{e:#}");
                self.save(|s| s.last_error = Some(format!("check: {msg}")));
                Error::upstream(msg)
            })
    }

    async fn check_inner(&self, spec: &UpdateSpec) -> Result<UpdateCheck> {
        let node = self.node()?;
        let repo = install::load_repo(
            spec,
            &self.paths.trusted_root,
            &self.paths.state_dir.join("tuf"),
        )
        .await?;
        let m = install::read_manifest(&repo).await?;
        let (mut versions, chosen) =
            install::select(&m, &node, spec, None, false, jiff::Timestamp::now());
        let (_, roothash) = self.discovery.running()?;
        let running_root = self.discovery.running_root();
        let layout = self.discovery.layout().ok();
        for v in &mut versions {
            if let Some(p) = m.updates.iter().find(|p| p.version == v.version) {
                v.download_size = install::download_size(&repo, p, &node.target_slot);
                if v.verdict == "running" {
                    continue;
                }
                let root_len = install::target_info(&repo, &p.root).map_or(0, |(l, _, _)| l);
                // The root as a patch against the running one, else as chunks.
                let root_download = match root_patch::plan(
                    &repo,
                    running_root.as_deref(),
                    &roothash,
                    p,
                    root_len,
                    spec.delta_max_percent,
                ) {
                    Ok(plan) => Some(plan.patch_len),
                    Err(_) => {
                        let d = delta::decide(
                            self,
                            &repo,
                            running_root.as_deref(),
                            &roothash,
                            p,
                            root_len,
                            spec.delta_max_percent,
                        )
                        .await;
                        v.delta_note = d.whole;
                        d.planned.map(|(plan, _)| plan.download)
                    }
                };
                // The UKI as a patch against the running one, where it can come so.
                let uki_len = install::target_info(&repo, p.uki_for(&node.target_slot))
                    .map_or(0, |(l, _, _)| l);
                let uki_download = layout
                    .as_ref()
                    .and_then(|l| uki::plan(&repo, l, p, &node.target_slot, uki_len).ok())
                    .map_or(uki_len, |u| u.patch_len);
                v.delta_size = root_download
                    .map(|root| v.download_size - root_len - uki_len + root + uki_download);
            }
        }
        Ok(UpdateCheck {
            current: node.version,
            available: chosen.ok().map(|p| p.version),
            versions,
        })
    }

    /// Starts an install; returns once the version is chosen (refusals come back as errors),
    /// the rest runs in the background (progress in `status`, events on the bus).
    pub async fn apply(self: &Arc<Self>, req: ApplyRequest) -> Result<UpdateStatus, Error> {
        let spec = self.spec()?;
        // Staged first: the install thread records it before it lets go of `busy`, so the
        // answer does not depend on how far that thread has got.
        let staged = self.live().state.staged.clone();
        if let Some(s) = staged {
            if req.version.as_deref().is_none_or(|v| v == s.version) && !req.force {
                return Err(Error::conflict(format!(
                    "version {} is already staged in slot {}: reboot to boot it, or `keelctl update cancel`",
                    s.version, s.slot
                )));
            }
        }
        if self.busy.swap(true, Ordering::SeqCst) {
            return Err(Error::conflict(format!(
                "an update is already in progress ({}); `keelctl update cancel` stops it",
                self.live().phase.as_str()
            )));
        }
        self.cancel.store(false, Ordering::SeqCst);
        self.set_phase(Phase::Checking);
        let (tx, rx) = tokio::sync::oneshot::channel::<Result<String, String>>();
        let me = Arc::clone(self);
        std::thread::Builder::new()
            .name("update".into())
            .spawn(move || {
                let _busy = BusyGuard(&me.busy);
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = tx.send(Err(format!("cannot start a runtime: {e}")));
                        return;
                    }
                };
                rt.block_on(me.apply_inner(spec, req, tx));
            })
            .map_err(|e| {
                self.busy.store(false, Ordering::SeqCst);
                Error::internal(format!("cannot start the update thread: {e}"))
            })?;
        match rx.await {
            Ok(Ok(_)) => Ok(self.status()),
            Ok(Err(msg)) => {
                // The thread is ending: let it release `busy` so a corrected retry is not
                // refused as concurrent.
                for _ in 0..200 {
                    if !self.busy.load(Ordering::SeqCst) {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err(Error::conflict(msg))
            }
            Err(_) => Err(Error::internal("the update thread ended without an answer")),
        }
    }

    async fn apply_inner(
        self: &Arc<Self>,
        spec: UpdateSpec,
        req: ApplyRequest,
        chosen: tokio::sync::oneshot::Sender<Result<String, String>>,
    ) {
        let mut chosen = Some(chosen);
        let result: Result<install::Installed> = async {
            let node = self.node()?;
            let repo = install::load_repo(
                &spec,
                &self.paths.trusted_root,
                &self.paths.state_dir.join("tuf"),
            )
            .await?;
            let m = install::read_manifest(&repo).await?;
            let (_, pick) = install::select(
                &m,
                &node,
                &spec,
                req.version.as_deref(),
                req.force,
                jiff::Timestamp::now(),
            );
            let p = pick?;
            if let Some(h) = self.halted(&spec, &p.version).await {
                bail!(
                    "the rollout of {} is halted: {} rolled back from it ({}); publish a newer version, or clear the halt (docs/updates.md)",
                    h.version,
                    h.node,
                    h.reason
                );
            }
            let layout = self.discovery.layout()?;
            if let Some(tx) = chosen.take() {
                let _ = tx.send(Ok(p.version.clone()));
            }
            self.save(|s| {
                s.staged = None;
                s.last_error = None;
            });
            self.emit(
                "update-started",
                format!(
                    "installing {} into slot {} (running {} from slot {})",
                    p.version,
                    layout.running.other().letter(),
                    node.version,
                    layout.running.letter()
                ),
            );
            // The new version's extensions first: a version that cannot carry the node's
            // engines is refused before its slot is touched.
            let enabled = self.enabled_extensions()?;
            let listed = extensions::select(&m, &p.version, &enabled)
                .with_context(|| format!("version {} refused", p.version))?;
            let store = keelson_extensions::Store::new(&self.paths.extensions);
            let base = spec.repository.clone().unwrap_or_default();
            self.sync_extensions(&repo, &store, &p.version, &listed, &base)
                .await?;
            let installed = install::install(
                self,
                &repo,
                &layout,
                &p,
                spec.boot_tries,
                spec.delta_max_percent,
            )
            .await?;
            // A forced downgrade sorts below the running version: demote the running entry so
            // systemd-boot prefers the new one (and still falls back to it).
            if compare_versions_lt(&p.version, &node.version) {
                self.demote_running(&layout.esp, &layout.roothash)?;
            }
            self.save(|s| {
                s.staged = Some(Staged {
                    version: p.version.clone(),
                    slot: layout.running.other().letter().to_string(),
                    entry: installed.entry.clone(),
                })
            });
            Ok(installed)
        }
        .await;
        match result {
            Ok(installed) => {
                self.set_phase(Phase::Staged);
                let downloaded = self.live().progress.as_ref().map_or(0, |p| p.downloaded);
                self.emit(
                    "update-staged",
                    format!(
                        "{} verified and installed; it boots next (downloaded {} KiB)",
                        installed.entry,
                        downloaded >> 10
                    ),
                );
                if req.reboot {
                    match self.take_reboot_slot(&spec, &installed.version).await {
                        coordinate::Gate::Go => {
                            self.set_phase(Phase::Rebooting);
                            self.emit("update-rebooting", "rebooting into the new slot".into());
                            self.report(Report::Reboot);
                        }
                        coordinate::Gate::Halted(h) => {
                            let msg = format!(
                                "the rollout of {} is halted: {} rolled back from it ({}); the staged version is discarded",
                                h.version, h.node, h.reason
                            );
                            let _ = self.discard_staged();
                            self.set_phase(Phase::Idle);
                            self.live().progress = None;
                            self.save(|s| s.last_error = Some(msg.clone()));
                            self.emit("update-halted", msg);
                        }
                        coordinate::Gate::Cancelled => {
                            let _ = self.discard_staged();
                            self.set_phase(Phase::Idle);
                            self.live().progress = None;
                        }
                    }
                }
            }
            Err(e) => {
                let msg = format!("{e:#}");
                self.set_phase(Phase::Idle);
                self.live().progress = None;
                self.save(|s| s.last_error = Some(msg.clone()));
                match chosen.take() {
                    Some(tx) => {
                        let _ = tx.send(Err(msg));
                    }
                    None => self.emit(
                        "update-failed",
                        format!("{msg}; the running slot is unchanged"),
                    ),
                }
            }
        }
    }

    fn demote_running(&self, esp: &std::path::Path, roothash: &str) -> Result<()> {
        let (running, _) = self.discovery.running()?;
        for e in slots::entries(esp)? {
            if e.slot == Some(running) && e.roothash.as_deref() == Some(roothash) {
                let to = format!("keelson_{}+0.efi", e.version);
                if e.file != to {
                    slots::rename(esp, &e.file, &to)?;
                }
            }
        }
        Ok(())
    }

    /// Stops an install in progress, or discards a staged version (its entry is removed, so the
    /// running slot stays the one that boots).
    pub async fn cancel(self: &Arc<Self>) -> Result<UpdateStatus, Error> {
        if self.busy.load(Ordering::SeqCst) {
            self.cancel.store(true, Ordering::SeqCst);
            let deadline = Instant::now() + Duration::from_secs(60);
            while self.busy.load(Ordering::SeqCst) && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            self.emit(
                "update-cancelled",
                "install cancelled; the running slot is unchanged".into(),
            );
            return Ok(self.status());
        }
        let Some(s) = self.discard_staged()? else {
            return Err(Error::conflict(
                "nothing to cancel: no update in progress or staged",
            ));
        };
        self.set_phase(Phase::Idle);
        self.emit(
            "update-cancelled",
            format!(
                "staged {} discarded; slot {} is not bootable",
                s.version, s.slot
            ),
        );
        Ok(self.status())
    }

    /// Removes the staged version's boot entry (and undoes a downgrade's demotion of the
    /// running one), so the running slot stays the one that boots. Returns what was staged.
    fn discard_staged(&self) -> Result<Option<Staged>, Error> {
        let staged = self.live().state.staged.clone();
        let Some(s) = staged else {
            return Ok(None);
        };
        let esp = self
            .discovery
            .esp()
            .ok_or_else(|| Error::internal("no ESP found"))?;
        let restore = self.discovery.running().ok().map(|(_, h)| h);
        let result = (|| -> Result<()> {
            for e in slots::entries(&esp)? {
                if e.version == s.version && e.slot.map(|x| x.letter()) == Some(s.slot.as_str()) {
                    slots::remove(&esp, &e.file)?;
                }
            }
            // Undo a downgrade's demotion of the running entry.
            if let Some(hash) = restore {
                for e in slots::entries(&esp)? {
                    if e.roothash.as_deref() == Some(hash.as_str()) && e.tries_left == Some(0) {
                        slots::rename(&esp, &e.file, &e.blessed_name())?;
                    }
                }
            }
            Ok(())
        })();
        result.map_err(|e| Error::internal(format!("{e:#}")))?;
        self.save(|st| st.staged = None);
        Ok(Some(s))
    }

    /// Boots the other slot on purpose: its entry must exist (a previous, good version).
    pub async fn rollback(self: &Arc<Self>, reboot: bool) -> Result<UpdateStatus, Error> {
        if self.busy.load(Ordering::SeqCst) {
            return Err(Error::conflict("an update is in progress; cancel it first"));
        }
        let fail = |e: anyhow::Error| Error::conflict(format!("{e:#}"));
        let esp = self.discovery.esp().ok_or_else(|| {
            Error::conflict("no ESP (direct kernel boot): nothing to roll back to")
        })?;
        let (running, hash) = self.discovery.running().map_err(fail)?;
        let entries = slots::entries(&esp).map_err(fail)?;
        let other = entries
            .iter()
            .find(|e| e.slot == Some(running.other()))
            .ok_or_else(|| {
                Error::conflict(format!(
                    "slot {} has no boot entry (never installed, or invalidated): nothing to roll back to",
                    running.other().letter()
                ))
            })?
            .clone();
        // Make the other slot's entry preferred: bless it, and demote the running one.
        if other.tries_left.is_some() {
            slots::rename(&esp, &other.file, &other.blessed_name()).map_err(fail)?;
        }
        self.demote_running(&esp, &hash).map_err(fail)?;
        let (version, _) = self.os_release();
        self.save(|s| {
            s.staged = None;
            s.rolled_back_from = Some(version.clone());
        });
        self.emit(
            "update-rollback",
            format!(
                "rolling back from {version} (slot {}) to {} (slot {})",
                running.letter(),
                other.version,
                running.other().letter()
            ),
        );
        if reboot {
            self.set_phase(Phase::Rebooting);
            self.report(Report::Reboot);
        }
        Ok(self.status())
    }

    /// At sysd start: assess this boot (bless or fail it), notice rollbacks, run the automatic
    /// policy.
    pub fn boot(self: &Arc<Self>) {
        let me = Arc::clone(self);
        tokio::spawn(async move { me.assess().await });
        let me = Arc::clone(self);
        tokio::spawn(async move {
            // The group's semaphore for `keelctl update status`, kept fresh.
            loop {
                let spec = me.current_spec().unwrap_or_default();
                me.refresh_coordination(&spec).await;
                tokio::time::sleep(Duration::from_secs(10)).await;
            }
        });
        let me = Arc::clone(self);
        tokio::spawn(async move { me.automatic().await });
    }

    async fn assess(self: Arc<Self>) {
        let Ok((running, hash)) = self.discovery.running() else {
            return;
        };
        // The ESP's file system module is loaded by init in the background: give it time.
        let mut esp = None;
        for _ in 0..30 {
            if !matches!(&self.discovery, Discovery::Files { .. })
                && !std::path::Path::new("/sys/firmware/efi").exists()
            {
                break;
            }
            esp = self.discovery.esp();
            if esp.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        let Some(esp) = esp else {
            if std::path::Path::new("/sys/firmware/efi").exists() {
                self.emit(
                    "update-no-esp",
                    "the ESP could not be mounted: this boot cannot be assessed".into(),
                );
            }
            self.live().assessment = "unknown".into();
            return;
        };
        let entries = match slots::entries(&esp) {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!("update: reading the boot entries: {e:#}");
                return;
            }
        };
        let staged = self.live().state.staged.clone();
        // Booted the old slot although a new version was staged: it failed (or was cancelled
        // by a manual rollback before booting, in which case `staged` was already cleared).
        if let Some(s) = &staged {
            if s.slot != running.letter() {
                let failed = entries.iter().find(|e| {
                    e.version == s.version && e.slot.map(|x| x.letter()) == Some(s.slot.as_str())
                });
                let tries = failed.and_then(|e| e.tries_done).unwrap_or(0);
                if let Some(e) = failed {
                    let _ = slots::remove(&esp, &e.file);
                }
                self.save(|st| {
                    st.staged = None;
                    st.rolled_back_from = Some(s.version.clone());
                });
                let reason = format!("it did not come up healthy ({tries} boot tries used)");
                self.emit(
                    "update-rolled-back",
                    format!(
                        "rolled back from {} (slot {}): {reason}; running slot {} again",
                        s.version,
                        s.slot,
                        running.letter()
                    ),
                );
                let spec = self.current_spec().unwrap_or_default();
                self.give_back_slot(&spec, Some((&s.version, &reason)))
                    .await;
            }
        }
        let mine = entries
            .into_iter()
            .find(|e| e.slot == Some(running) && e.roothash.as_deref() == Some(hash.as_str()));
        let Some(entry) = mine else {
            self.live().assessment = "unknown".into();
            return;
        };
        self.live().boot_entry = Some(entry.file.clone());
        if entry.tries_left.is_none() {
            self.live().assessment = "good".into();
            return;
        }
        self.live().assessment = "pending".into();
        self.set_phase(Phase::Assessing);
        // This boot holds the group's reboot slot until the gate says: keep its lease alive.
        let me = Arc::clone(&self);
        let keepalive = tokio::spawn(async move {
            let spec = me.current_spec().unwrap_or_default();
            me.keep_slot_alive(&spec).await
        });
        let timeout = self.current_spec().unwrap_or_default().health_timeout.0;
        self.emit(
            "update-assessing",
            format!(
                "{} booted with a try counter; waiting up to {}s for every critical service",
                entry.file,
                timeout.as_secs()
            ),
        );
        let deadline = Instant::now() + timeout;
        // A moment for the supervisor to register the services.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let verdict = loop {
            let services = self.channels.services.borrow().clone();
            let critical: Vec<&ServiceStatus> = services.iter().filter(|s| s.critical).collect();
            let unhealthy: Vec<String> = critical
                .iter()
                .filter(|s| {
                    !(s.state == State::Running || s.state == State::Completed)
                        || s.health == Some(keelson_common::api::Health::Unhealthy)
                        || s.health == Some(keelson_common::api::Health::Starting)
                })
                .map(|s| format!("{} ({})", s.name, s.state.as_str()))
                .collect();
            if unhealthy.is_empty() {
                break Ok(critical.len());
            }
            if Instant::now() >= deadline {
                break Err(unhealthy);
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        };
        match verdict {
            Ok(n) => {
                let to = entry.blessed_name();
                match slots::rename(&esp, &entry.file, &to) {
                    Ok(()) => {
                        {
                            let mut live = self.live();
                            live.boot_entry = Some(to.clone());
                            live.assessment = "good".into();
                        }
                        self.set_phase(Phase::Idle);
                        let previous = self.live().state.last_good.clone();
                        self.save(|st| {
                            st.staged = None;
                            st.last_good = Some(entry.version.clone());
                            st.last_error = None;
                        });
                        // Extension sets of this version and the one before it (the other
                        // slot, the rollback target) stay; older ones go.
                        let store = keelson_extensions::Store::new(&self.paths.extensions);
                        let mut keep = vec![entry.version.as_str()];
                        keep.extend(previous.as_deref());
                        if let Err(e) = store.gc(&keep) {
                            tracing::warn!("update: cleaning the extension store: {e}");
                        }
                        self.emit(
                            "update-blessed",
                            format!(
                                "{} is good ({n} critical services healthy); boot entry {to}",
                                entry.version
                            ),
                        );
                        keepalive.abort();
                        let spec = self.current_spec().unwrap_or_default();
                        self.give_back_slot(&spec, None).await;
                    }
                    Err(e) => self.emit("update-bless-failed", format!("{e:#}")),
                }
            }
            Err(unhealthy) => {
                self.emit(
                    "update-health-failed",
                    format!(
                        "{}: critical services not healthy after {}s: {}; rebooting ({} tries left)",
                        entry.version,
                        timeout.as_secs(),
                        unhealthy.join(", "),
                        entry.tries_left.unwrap_or(0)
                    ),
                );
                self.set_phase(Phase::Rebooting);
                self.report(Report::Reboot);
            }
        }
    }

    async fn automatic(self: Arc<Self>) {
        loop {
            let spec = self.current_spec().unwrap_or_default();
            let interval = spec.interval.0.max(Duration::from_secs(60));
            if spec.policy == Policy::Automatic {
                let minute = {
                    let now = jiff::Timestamp::now();
                    let secs = now.as_second().rem_euclid(86400);
                    (secs / 60) as u32
                };
                let open = spec
                    .window
                    .as_deref()
                    .and_then(|w| parse_window(w).ok())
                    .is_none_or(|w| in_window(w, minute));
                let assessing = self.live().phase == Phase::Assessing;
                if open && !assessing && self.live().state.staged.is_none() {
                    match self
                        .apply(ApplyRequest {
                            version: None,
                            force: false,
                            reboot: true,
                        })
                        .await
                    {
                        Ok(_) => {}
                        Err(f) if f.message.starts_with("no update available") => {}
                        Err(f) => tracing::info!("update: automatic apply: {}", f.message),
                    }
                }
            }
            tokio::time::sleep(interval).await;
        }
    }
}

fn compare_versions_lt(a: &str, b: &str) -> bool {
    keelson_common::update::compare_versions(a, b).is_lt()
}

fn load_state(path: &std::path::Path) -> Persisted {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
            tracing::warn!(
                "update: {} unreadable ({e}); starting afresh",
                path.display()
            );
            Persisted::default()
        }),
        Err(_) => Persisted::default(),
    }
}

/// Records the state, then flushes all of /var (as before the durable helper, whose ESP-style
/// sync did it): an update's steps (start, staged, reboot, bless) are when power cuts happen,
/// so what services wrote before one survives it.
fn store_state(dir: &std::path::Path, state: &Persisted) -> Result<()> {
    let json = serde_json::to_vec_pretty(state)?;
    keelson_common::durable::replace(&dir.join("state.json"), &json)?;
    Ok(keelson_common::durable::sync_file_system(dir)?)
}
