//! The event stream: what happened to which service, in order. Kept in a bounded ring (for
//! `?since=` and late readers) and broadcast to live readers; every event is also one line on
//! sysd's stderr, which init connects to the console, so the boot log tells the same story.

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};

use keelson_common::api::boot::{self, ServiceBoot};
use keelson_common::api::{now_ms, Event};
use tokio::sync::broadcast;

const KEEP: usize = 2000;

/// The event stream. The `sysd` binary makes one and shares it (`Arc`) with the supervisor
/// and whatever else reports events.
pub struct EventBus {
    ring: Mutex<(u64, VecDeque<Event>)>,
    tx: broadcast::Sender<Event>,
    /// Each service's boot milestones (first `starting`, `started`/`adopted`,
    /// `ready`/`completed`), on init's clock (CLOCK_BOOTTIME): `GET /v1/boot`.
    boot: Mutex<BTreeMap<String, ServiceBoot>>,
    /// When every service started at boot was ready (set once).
    all_ready_us: OnceLock<u64>,
    /// Where the boot record is kept for a sysd that follows this one in the same boot
    /// (`/run/keelson/boot.json`); none: in memory only.
    boot_file: Option<PathBuf>,
}

impl Default for EventBus {
    fn default() -> Self {
        Self::new()
    }
}

/// `{"services": {NAME: ServiceBoot}, "all_ready_us": N|null}`, as [`EventBus::keep`] writes it.
fn read_kept(bytes: &[u8]) -> Result<(BTreeMap<String, ServiceBoot>, Option<u64>), String> {
    let mut v: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    let services = serde_json::from_value(v["services"].take()).map_err(|e| e.to_string())?;
    let all_ready_us = match &v["all_ready_us"] {
        serde_json::Value::Null => None,
        n => Some(n.as_u64().ok_or("all_ready_us is not a whole number")?),
    };
    Ok((services, all_ready_us))
}

impl EventBus {
    pub fn new() -> Self {
        EventBus {
            ring: Mutex::new((0, VecDeque::new())),
            tx: broadcast::channel(1024).0,
            boot: Mutex::new(BTreeMap::new()),
            all_ready_us: OnceLock::new(),
            boot_file: None,
        }
    }

    /// Keeps the boot record in `path` and starts from what a previous sysd of this boot kept
    /// there, so a restarted sysd still tells when each service first started and got ready
    /// (its own `adopted` events change nothing already recorded). A record that does not read
    /// is reported and replaced.
    pub fn with_boot_record(mut self, path: PathBuf) -> Self {
        match std::fs::read(&path) {
            Ok(bytes) => match read_kept(&bytes) {
                Ok((services, all_ready_us)) => {
                    *self.boot.lock().unwrap_or_else(|p| p.into_inner()) = services;
                    if let Some(at) = all_ready_us {
                        let _ = self.all_ready_us.set(at);
                    }
                }
                Err(e) => tracing::warn!(
                    "sysd: {}: not a boot record ({e}); starting a new one",
                    path.display()
                ),
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!("sysd: cannot read {}: {e}", path.display()),
        }
        self.boot_file = Some(path);
        self
    }

    /// Writes the boot record to its file, if it has one (a failure is logged: the record in
    /// memory still answers).
    fn keep(&self, services: &BTreeMap<String, ServiceBoot>) {
        let Some(path) = &self.boot_file else { return };
        let kept = serde_json::json!({
            "services": services,
            "all_ready_us": self.all_ready_us.get(),
        });
        let written = serde_json::to_vec(&kept)
            .map_err(|e| e.to_string())
            .and_then(|json| {
                keelson_common::durable::replace(path, &json).map_err(|e| e.to_string())
            });
        if let Err(e) = written {
            tracing::warn!(
                "sysd: cannot keep the boot record in {}: {e}",
                path.display()
            );
        }
    }

    /// The services' boot milestones so far, by name.
    pub fn boot_times(&self) -> BTreeMap<String, ServiceBoot> {
        self.boot.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// When every service started at boot was ready, once it was.
    pub fn all_ready_us(&self) -> Option<u64> {
        self.all_ready_us.get().copied()
    }

    /// Records that every service started at boot has settled (`ready` of them ready, `failed`
    /// failed for good), with a `boot-ready` event (once).
    pub fn boot_ready(&self, ready: usize, failed: &[&str]) {
        let at = boot::boottime_us();
        if self.all_ready_us.set(at).is_ok() {
            self.keep(&self.boot_times());
            let mut message = format!(
                "all {ready} service(s) ready {:.3} s after the kernel started",
                at as f64 / 1e6
            );
            if !failed.is_empty() {
                message.push_str(&format!("; failed: {}", failed.join(", ")));
            }
            self.emit(None, boot::BOOT_READY, message);
        }
    }

    pub fn emit(&self, service: Option<&str>, kind: &str, message: impl Into<String>) {
        let message = message.into();
        if let Some(name) = service.filter(|_| boot::is_milestone(kind)) {
            let mut times = self.boot.lock().unwrap_or_else(|p| p.into_inner());
            let record = times
                .entry(name.to_string())
                .or_insert_with(|| ServiceBoot::new(name));
            let before = record.clone();
            boot::note_event(record, kind, boot::boottime_us());
            if *record != before {
                self.keep(&times);
            }
        }
        match service {
            Some(s) => tracing::info!("sysd: {s}: {kind}: {message}"),
            None => tracing::info!("sysd: {kind}: {message}"),
        }
        let mut guard = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        guard.0 += 1;
        let event = Event {
            seq: guard.0,
            time_ms: now_ms(),
            service: service.map(str::to_string),
            kind: kind.to_string(),
            message,
        };
        if guard.1.len() == KEEP {
            guard.1.pop_front();
        }
        guard.1.push_back(event.clone());
        // Sent under the lock so a reader that subscribed under it sees no gap or repeat.
        let _ = self.tx.send(event);
    }

    /// Kept events after `since`, and a receiver for the ones after those.
    pub fn subscribe(&self, since: Option<u64>) -> (Vec<Event>, broadcast::Receiver<Event>) {
        let guard = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        let since = since.unwrap_or(0);
        let backlog = guard.1.iter().filter(|e| e.seq > since).cloned().collect();
        (backlog, self.tx.subscribe())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_following_sysd_keeps_the_first_times() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("boot.json");
        let first = EventBus::new().with_boot_record(path.clone());
        first.emit(Some("db"), "starting", "creating its container");
        first.emit(Some("db"), "started", "pid 1");
        first.emit(Some("db"), "ready", "running");
        first.emit(Some("db"), "exited", "not a milestone");
        first.boot_ready(1, &[]);
        let kept = first.boot_times();
        let at = first.all_ready_us().unwrap();
        drop(first);
        // The next sysd adopts the running container: nothing recorded changes.
        let next = EventBus::new().with_boot_record(path.clone());
        next.emit(Some("db"), "adopted", "pid 1");
        next.boot_ready(1, &[]);
        assert_eq!(next.boot_times(), kept);
        assert_eq!(next.all_ready_us(), Some(at));
        let db = &kept["db"];
        assert!(db.starting_us <= db.started_us && db.started_us <= db.ready_us);
        // A record that does not read starts a new one.
        std::fs::write(&path, b"{").unwrap();
        let fresh = EventBus::new().with_boot_record(path);
        assert!(fresh.boot_times().is_empty() && fresh.all_ready_us().is_none());
    }
}
