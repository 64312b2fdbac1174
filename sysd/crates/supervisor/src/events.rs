//! The event stream: what happened to which service, in order. Kept in a bounded ring (for
//! `?since=` and late readers) and broadcast to live readers; every event is also one line on
//! sysd's stderr, which init connects to the console, so the boot log tells the same story.

use std::collections::VecDeque;
use std::sync::Mutex;

use keelson_common::api::{now_ms, Event};
use tokio::sync::broadcast;

const KEEP: usize = 2000;

/// The event stream. The `sysd` binary makes one and shares it (`Arc`) with the supervisor
/// and whatever else reports events.
pub struct EventBus {
    ring: Mutex<(u64, VecDeque<Event>)>,
    tx: broadcast::Sender<Event>,
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
        }
    }

    pub fn emit(&self, service: Option<&str>, kind: &str, message: impl Into<String>) {
        let message = message.into();
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
