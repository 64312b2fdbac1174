//! The event stream: what happened to which service, in order. Kept in a bounded ring (for
//! `?since=` and late readers) and broadcast to live readers; every event is also one line on
//! sysd's stderr, which init connects to the console, so the boot log tells the same story.

use std::collections::{BTreeMap, VecDeque};
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
}

impl Default for EventBus {
    fn default() -> Self {
        Self::new()
    }
}

impl EventBus {
    pub fn new() -> Self {
        EventBus {
            ring: Mutex::new((0, VecDeque::new())),
            tx: broadcast::channel(1024).0,
            boot: Mutex::new(BTreeMap::new()),
            all_ready_us: OnceLock::new(),
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
            boot::note_event(record, kind, boot::boottime_us());
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
