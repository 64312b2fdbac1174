//! Log forwarding (docs/observability.md): every service's stdout and stderr and sysd's
//! events, as RFC 5424 syslog messages in octet-counted frames (RFC 6587) over TCP, or over
//! TLS (RFC 5425), to the receiver `[logging.forward]` names.
//!
//! The path of a line: [`Intake::line`] (called wherever sysd records a line, right after the
//! line went to its log file; it formats the frame and appends it to the [`spool`] on /var,
//! which is bounded: a full spool drops the line and counts it; the receiver is never waited
//! for) → the sender, which sends the spool in order
//! and commits what the receiver's TCP stack has acknowledged; after a broken connection it
//! sends again from the last acknowledged message, so every line arrives, in order (once, or
//! twice when a connection broke with it in flight). A receiver that accepts and never reads
//! costs a write timeout and a reconnect, never a blocked service or sysd.
//!
//! [`syslog`] formats, [`conn`] connects. The counters ([`Counters`]) are what the exporter
//! shows; this crate knows nothing of the exporter, the supervisor or the API.

pub mod conn;
pub mod spool;
pub mod syslog;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keelson_common::api::{Event, LogLine, Stream};
use keelson_spec::observe::{ForwardSpec, Transport};
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use conn::{Conn, Dialer};
use spool::{Position, Spool};
use syslog::{frame, Facility, Message, Severity};

/// A write the receiver does not take within this long ends the connection.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const BACKOFF_START: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Largest write.
const BATCH: usize = 64 << 10;
/// How often acknowledgements are looked at while nothing new is sent.
const ACK_POLL: Duration = Duration::from_millis(100);

/// What the forwarder has done, for the exporter.
#[derive(Debug, Default)]
pub struct Counters {
    /// Messages the receiver's TCP stack acknowledged.
    pub forwarded: AtomicU64,
    /// Messages dropped because the spool was full.
    pub dropped_buffer_full: AtomicU64,
    /// sysd's events missed by a subscription that fell behind.
    pub dropped_lagged: AtomicU64,
    /// Messages dropped because /var refused the write.
    pub dropped_write_error: AtomicU64,
    /// Bytes held in the spool.
    pub buffer_bytes: AtomicU64,
    pub connected: AtomicBool,
    /// Connections opened, and those that failed or broke.
    pub connects: AtomicU64,
    pub connection_errors: AtomicU64,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("logging.forward: {0}")]
    Spec(String),
    #[error(transparent)]
    Tls(#[from] conn::TlsSetupError),
    #[error("logging.forward buffer: {0}")]
    Spool(#[from] spool::Error),
}

/// Where lines enter. Cheap to clone; never waits for the receiver (only for the append to
/// /var, as the service's own log file does).
#[derive(Clone, Debug)]
pub struct Intake {
    spool: Arc<Mutex<Spool>>,
    more: Arc<Notify>,
    write_error_reported: Arc<AtomicBool>,
    counters: Arc<Counters>,
    exclude: Arc<BTreeSet<String>>,
    events: bool,
}

fn hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_default()
}

impl Intake {
    fn offer(&self, frame: Vec<u8>) {
        let used = {
            let mut s = self.spool.lock().unwrap_or_else(|p| p.into_inner());
            match s.push(&frame) {
                Ok(true) => self.write_error_reported.store(false, Ordering::Relaxed),
                Ok(false) => {
                    self.counters
                        .dropped_buffer_full
                        .fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => {
                    self.counters
                        .dropped_write_error
                        .fetch_add(1, Ordering::Relaxed);
                    if !self.write_error_reported.swap(true, Ordering::Relaxed) {
                        tracing::warn!("forward: cannot buffer a message: {e}");
                    }
                }
            }
            s.used()
        };
        self.counters.buffer_bytes.store(used, Ordering::Relaxed);
        self.more.notify_one();
    }

    /// Events lost before they reached the intake (a lagging event subscription).
    pub fn dropped(&self, n: u64) {
        self.counters.dropped_lagged.fetch_add(n, Ordering::Relaxed);
    }

    /// A service's line (unless the service is excluded).
    pub fn line(&self, service: &str, line: &LogLine) {
        if self.exclude.contains(service) {
            return;
        }
        let stream = match line.stream {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        };
        self.offer(frame(&Message {
            facility: Facility::User,
            severity: match line.stream {
                Stream::Stdout => Severity::Info,
                Stream::Stderr => Severity::Notice,
            },
            time_ms: line.time_ms,
            hostname: &hostname(),
            app_name: service,
            msg_id: stream,
            params: &[("service", service), ("stream", stream)],
            msg: &line.line,
        }));
    }

    /// One of sysd's events (when `events` is on).
    pub fn event(&self, e: &Event) {
        if !self.events {
            return;
        }
        let seq = e.seq.to_string();
        let mut params = vec![("kind", e.kind.as_str()), ("seq", seq.as_str())];
        if let Some(s) = &e.service {
            params.push(("service", s));
        }
        let severity = match e.kind.as_str() {
            "failed" | "start-failed" | "oom-killed" | "unhealthy" | "config-error"
            | "firstboot-error" | "network-error" | "network-rollback" => Severity::Warning,
            _ => Severity::Notice,
        };
        self.offer(frame(&Message {
            facility: Facility::Daemon,
            severity,
            time_ms: e.time_ms,
            hostname: &hostname(),
            app_name: "sysd",
            msg_id: &e.kind,
            params: &params,
            msg: &e.message,
        }));
    }
}

/// A running forwarder; dropping it stops its tasks (the spool stays for the next one).
#[derive(Debug)]
pub struct Forwarder {
    intake: Intake,
    counters: Arc<Counters>,
    tasks: Vec<JoinHandle<()>>,
    target: String,
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Forwarder {
    /// Opens the spool in `dir` and starts sending to `spec.target` (inside the tokio
    /// runtime). Errors name the setting at fault.
    pub fn start(spec: &ForwardSpec, dir: &Path) -> Result<Forwarder, Error> {
        spec.check().map_err(|e| Error::Spec(e.to_string()))?;
        let (host, port) = spec.host_port().map_err(|e| Error::Spec(e.to_string()))?;
        let tls = match (spec.transport, &spec.ca_file) {
            (Transport::Tls, Some(ca)) => Some(conn::tls_connector(
                ca,
                spec.server_name.as_deref().unwrap_or(host),
            )?),
            _ => None,
        };
        let dialer = Dialer {
            host: host.to_string(),
            port,
            tls,
            connect_timeout: CONNECT_TIMEOUT,
        };
        let spool = Arc::new(Mutex::new(Spool::open(dir, spec.buffer_size.0)?));
        let counters = Arc::new(Counters::default());
        let used = spool.lock().unwrap_or_else(|p| p.into_inner()).used();
        counters.buffer_bytes.store(used, Ordering::Relaxed);
        let more = Arc::new(Notify::new());
        let tasks = vec![tokio::spawn(send(
            dialer,
            Arc::clone(&spool),
            Arc::clone(&counters),
            Arc::clone(&more),
        ))];
        Ok(Forwarder {
            intake: Intake {
                spool,
                more,
                write_error_reported: Arc::new(AtomicBool::new(false)),
                counters: Arc::clone(&counters),
                exclude: Arc::new(spec.exclude.iter().cloned().collect()),
                events: spec.events,
            },
            counters,
            tasks,
            target: spec.target.clone(),
        })
    }

    pub fn intake(&self) -> Intake {
        self.intake.clone()
    }

    pub fn counters(&self) -> Arc<Counters> {
        Arc::clone(&self.counters)
    }

    pub fn target(&self) -> &str {
        &self.target
    }
}

/// The spool's directory on a node.
pub fn default_dir() -> PathBuf {
    PathBuf::from("/var/lib/keelson/forward")
}

/// Spool → receiver, forever: connect, send from the last acknowledged message, commit what
/// is acknowledged; on any failure, back off and start again.
async fn send(
    dialer: Dialer,
    spool: Arc<Mutex<Spool>>,
    counters: Arc<Counters>,
    more: Arc<Notify>,
) {
    let mut backoff = BACKOFF_START;
    let mut last_error = String::new();
    loop {
        let mut conn = match dialer.connect().await {
            Ok(c) => c,
            Err(e) => {
                counters.connection_errors.fetch_add(1, Ordering::Relaxed);
                let text = e.to_string();
                if text != last_error {
                    tracing::warn!("forward: cannot reach {dialer:?}: {text}");
                    last_error = text;
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
                continue;
            }
        };
        tracing::info!("forward: connected to {dialer:?}");
        last_error.clear();
        counters.connects.fetch_add(1, Ordering::Relaxed);
        counters.connected.store(true, Ordering::Relaxed);
        spool.lock().unwrap_or_else(|p| p.into_inner()).rewind();
        let result = session(&mut conn, &spool, &counters, &more).await;
        counters.connected.store(false, Ordering::Relaxed);
        counters.connection_errors.fetch_add(1, Ordering::Relaxed);
        tracing::warn!("forward: connection to {dialer:?} ended: {result}");
        // A connection that worked for a while starts the backoff over.
        backoff = BACKOFF_START;
        tokio::time::sleep(backoff).await;
    }
}

/// One connection's life; returns why it ended.
async fn session(
    conn: &mut Conn,
    spool: &Mutex<Spool>,
    counters: &Counters,
    more: &Notify,
) -> String {
    // (end position, socket bytes written up to it, messages) of what is not acknowledged.
    let mut inflight: std::collections::VecDeque<(Position, u64, u64)> = Default::default();
    loop {
        if !inflight.is_empty() {
            match conn.unacknowledged() {
                Ok(unacked) => {
                    let acked = conn.written().saturating_sub(unacked);
                    let mut last = None;
                    while inflight
                        .front()
                        .is_some_and(|(_, bytes, _)| *bytes <= acked)
                    {
                        if let Some((pos, _, n)) = inflight.pop_front() {
                            counters.forwarded.fetch_add(n, Ordering::Relaxed);
                            last = Some(pos);
                        }
                    }
                    if let Some(pos) = last {
                        let mut s = spool.lock().unwrap_or_else(|p| p.into_inner());
                        if let Err(e) = s.commit(pos) {
                            tracing::warn!("forward: {e}");
                        }
                        counters.buffer_bytes.store(s.used(), Ordering::Relaxed);
                    }
                }
                Err(e) => return format!("reading the socket's queue: {e}"),
            }
        }
        if conn.closed().await {
            return "closed by the receiver".into();
        }
        let batch = spool
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .read_batch(BATCH);
        let (bytes, pos, n) = match batch {
            Ok(Some(b)) => b,
            Ok(None) => {
                let _ = tokio::time::timeout(ACK_POLL, more.notified()).await;
                continue;
            }
            Err(e) => {
                tracing::warn!("forward: reading the buffer: {e}");
                tokio::time::sleep(ACK_POLL).await;
                continue;
            }
        };
        match tokio::time::timeout(WRITE_TIMEOUT, conn.send(&bytes)).await {
            Ok(Ok(())) => inflight.push_back((pos, conn.written(), n)),
            Ok(Err(e)) => return format!("write failed: {e}"),
            Err(_) => return format!("the receiver took nothing for {}s", WRITE_TIMEOUT.as_secs()),
        }
    }
}
