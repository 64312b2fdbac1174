//! Watching the node from off it (docs/observability.md): the Prometheus exporter
//! (`keelson-metrics`) and log forwarding (`keelson-forward`), started, moved and stopped as
//! the effective `[metrics]` and `[logging.forward]` tables change (boot, apply). Both report
//! what they do as events (`metrics`, `metrics-error`, `forward`, `forward-error`).

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use keelson_api::{RequestCounts, Services, Updates};
use keelson_common::api::LogLine;
use keelson_forward::{Counters, Forwarder, Intake};
use keelson_metrics::exposition::{Type, Writer};
use keelson_metrics::{Collector, Contributor};
use keelson_spec::observe::{ForwardSpec, ObserveSpec};
use keelson_supervisor::logs::LogTap;
use keelson_supervisor::{EventBus, Supervisor};
use tokio::sync::{broadcast, oneshot};

/// What the exporter reads, besides the forwarder's figures.
pub struct Sources {
    pub services: Arc<dyn Services>,
    pub updates: Option<Arc<dyn Updates>>,
    pub requests: Arc<RequestCounts>,
    pub cgroup_parent: String,
    /// The forwarder's spool directory (on /var).
    pub forward_dir: PathBuf,
}

/// The running forwarder, shared by the log tap, the event pump and the exporter.
#[derive(Default)]
struct Current(Mutex<Option<(Intake, Arc<Counters>)>>);

impl Current {
    fn intake(&self) -> Option<Intake> {
        let guard = self.0.lock().unwrap_or_else(|p| p.into_inner());
        guard.as_ref().map(|(i, _)| i.clone())
    }
}

impl LogTap for Current {
    fn line(&self, service: &str, line: &LogLine) {
        if let Some(intake) = self.intake() {
            intake.line(service, line);
        }
    }
}

impl Contributor for Current {
    fn write(&self, w: &mut Writer) {
        let counters = {
            let guard = self.0.lock().unwrap_or_else(|p| p.into_inner());
            match guard.as_ref() {
                Some((_, c)) => Arc::clone(c),
                None => return,
            }
        };
        let get = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed) as f64;
        w.family(
            "keelson_log_forward_messages_total",
            Type::Counter,
            "Messages the syslog receiver acknowledged.",
        )
        .sample(&[], get(&counters.forwarded));
        w.family(
            "keelson_log_forward_dropped_total",
            Type::Counter,
            "Messages dropped: the buffer on /var was full, /var refused the write, or the event subscription fell behind.",
        )
        .sample(&[("reason", "buffer_full")], get(&counters.dropped_buffer_full))
        .sample(&[("reason", "lagged")], get(&counters.dropped_lagged))
        .sample(&[("reason", "write_error")], get(&counters.dropped_write_error));
        w.family(
            "keelson_log_forward_buffer_bytes",
            Type::Gauge,
            "Bytes the buffer takes on /var (at most logging.forward.buffer_size).",
        )
        .sample(&[], get(&counters.buffer_bytes));
        w.family(
            "keelson_log_forward_connected",
            Type::Gauge,
            "1 while a connection to the receiver is open.",
        )
        .sample(
            &[],
            f64::from(u8::from(counters.connected.load(Ordering::Relaxed))),
        );
        w.family(
            "keelson_log_forward_connection_errors_total",
            Type::Counter,
            "Connections to the receiver that failed or broke.",
        )
        .sample(&[], get(&counters.connection_errors));
    }
}

/// Follows the observe tables for as long as sysd runs.
pub fn follow(sup: &Arc<Supervisor>, events: &Arc<EventBus>, sources: Sources) {
    let current = Arc::new(Current::default());
    sup.set_log_tap(Some(current.clone() as Arc<dyn LogTap>));
    pump_events(events, Arc::clone(&current));
    let collector = Arc::new(Collector {
        node: keelson_metrics::node::NodeSources::default(),
        os_release: PathBuf::from("/etc/os-release"),
        cmdline: PathBuf::from("/proc/cmdline"),
        cgroup_parent: sources.cgroup_parent.clone(),
        services: sources.services,
        updates: sources.updates,
        requests: sources.requests,
        contributors: vec![current.clone() as Arc<dyn Contributor>],
    });
    let mut spec_rx = sup.observe_spec();
    let events = Arc::clone(events);
    let forward_dir = sources.forward_dir;
    tokio::spawn(async move {
        #[allow(clippy::type_complexity)]
        let mut exporter: Option<(
            (
                std::net::SocketAddr,
                Option<keelson_spec::observe::MetricsTls>,
            ),
            oneshot::Sender<()>,
        )> = None;
        let mut forwarder: Option<(ForwardSpec, Forwarder)> = None;
        loop {
            let spec: Option<ObserveSpec> = spec_rx.borrow_and_update().as_ref().ok().cloned();
            // An invalid table was refused where it was read; keep what runs.
            let Some(spec) = spec else {
                if spec_rx.changed().await.is_err() {
                    return;
                }
                continue;
            };
            let wanted = spec.metrics.listen.map(|a| (a, spec.metrics.tls.clone()));
            if exporter.as_ref().map(|(w, _)| w) != wanted.as_ref() {
                if let Some(((addr, _), stop)) = exporter.take() {
                    let _ = stop.send(());
                    events.emit(
                        None,
                        "metrics",
                        format!("stopped serving /metrics on {addr}"),
                    );
                }
                if let Some((addr, tls)) = wanted {
                    let acceptor = match &tls {
                        None => Ok(None),
                        Some(t) => metrics_tls(t).map(Some),
                    };
                    let started = match acceptor {
                        Err(e) => Err(e),
                        Ok(acceptor) => keelson_metrics::server::bind(addr)
                            .await
                            .map(|l| (l, acceptor))
                            .map_err(|e| e.to_string()),
                    };
                    match started {
                        Ok((listener, acceptor)) => {
                            let (stop, stopped) = oneshot::channel::<()>();
                            let scheme = if acceptor.is_some() { "https" } else { "http" };
                            tokio::spawn(keelson_metrics::server::serve(
                                listener,
                                acceptor,
                                Arc::clone(&collector),
                                keelson_metrics::server::Limits::default(),
                                async {
                                    let _ = stopped.await;
                                },
                            ));
                            events.emit(
                                None,
                                "metrics",
                                format!("serving /metrics on {scheme}://{addr}"),
                            );
                            exporter = Some(((addr, tls), stop));
                        }
                        Err(e) => events.emit(None, "metrics-error", e),
                    }
                }
            }
            let wanted = spec.logging.forward;
            if forwarder.as_ref().map(|(s, _)| s) != wanted.as_ref() {
                if let Some((old, _)) = forwarder.take() {
                    *current.0.lock().unwrap_or_else(|p| p.into_inner()) = None;
                    events.emit(
                        None,
                        "forward",
                        format!("stopped forwarding logs to {}", old.target),
                    );
                }
                if let Some(spec) = wanted {
                    match Forwarder::start(&spec, &forward_dir) {
                        Ok(f) => {
                            *current.0.lock().unwrap_or_else(|p| p.into_inner()) =
                                Some((f.intake(), f.counters()));
                            events.emit(
                                None,
                                "forward",
                                format!(
                                    "forwarding logs to {} over {}",
                                    spec.target,
                                    match spec.transport {
                                        keelson_spec::observe::Transport::Tcp => "tcp",
                                        keelson_spec::observe::Transport::Tls => "tls",
                                    }
                                ),
                            );
                            forwarder = Some((spec, f));
                        }
                        Err(e) => events.emit(None, "forward-error", e.to_string()),
                    }
                }
            }
            if spec_rx.changed().await.is_err() {
                return;
            }
        }
    });
}

/// Events kept while no forwarder runs (boot's, until `[logging.forward]` starts it; the
/// forwarder's own `forward` event then sends them).
const KEEP_UNSENT: usize = 2000;

/// sysd's events to the forwarder (those emitted before it started too, from the bus's ring).
fn pump_events(events: &Arc<EventBus>, current: Arc<Current>) {
    let (backlog, mut live) = events.subscribe(None);
    tokio::spawn(async move {
        let mut pending = backlog;
        loop {
            if let Some(intake) = current.intake() {
                for e in pending.drain(..) {
                    intake.event(&e);
                }
            } else if pending.len() > KEEP_UNSENT {
                // Nothing configured (yet): keep only the newest, as the bus does.
                pending.drain(..pending.len() - KEEP_UNSENT);
            }
            match live.recv().await {
                Ok(e) => pending.push(e),
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    if let Some(intake) = current.intake() {
                        intake.dropped(n);
                    }
                }
                Err(broadcast::error::RecvError::Closed) => return,
            }
        }
    });
}

/// The exporter's HTTPS settings from `[metrics.tls]` (PEM inline or read from its file).
fn metrics_tls(
    t: &keelson_spec::observe::MetricsTls,
) -> Result<keelson_metrics::server::TlsAcceptor, String> {
    let read = |what: &str, pem: &keelson_spec::api::Pem| {
        pem.read()
            .map_err(|e| format!("metrics.tls.{what}: reading {}: {e}", pem.describe()))
    };
    let cert = read("cert", &t.cert)?;
    let key = read("key", &t.key)?;
    let ca = t
        .client_ca
        .as_ref()
        .map(|c| read("client_ca", c))
        .transpose()?;
    keelson_metrics::server::tls_acceptor(&cert, &key, ca.as_deref())
}
