//! First boot in sysd's start: the local datasources before the network starts, the metadata
//! service (when the platform has one) in the background once it is starting. User data is
//! validated as the user-data layer over the image's system services; the report goes to the
//! API's record and the event stream.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use keelson_common::api::firstboot::{FirstBoot, Outcome};
use keelson_firstboot::datasource::{Found, Probe};
use keelson_firstboot::imds;
use keelson_spec::{ConfigError, Source, Sources};
use keelson_supervisor::{EventBus, Supervisor};

use crate::adapters::FirstBootRecord;

/// Applies what a datasource found, validating it as the user-data layer over the image's
/// system services; log lines from `printed` on go to the console.
fn process(
    sources: &Sources,
    found: Result<Option<Found>, keelson_firstboot::Error>,
    log: Vec<String>,
    start: Instant,
    printed: usize,
) -> FirstBoot {
    // The system services are read only to validate user data, not on a boot without any
    // (most boots): the network's boot config and the supervisor read them again anyway.
    let system = std::cell::OnceCell::new();
    let validate = |text: &str, origin: &str| -> Result<(), ConfigError> {
        let doc = keelson_spec::parse_document(Path::new(origin), text, Source::UserData)?;
        let system = system.get_or_init(|| sources.read_system().unwrap_or_default());
        keelson_spec::Config::from_layers(system.clone(), vec![doc]).map(drop)
    };
    // A panic in a parser of user data, meta-data or network-config (a bug) is a rejected
    // first boot that says so, not a sysd that dies at every start before any service runs.
    let processed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        keelson_firstboot::process(
            found,
            log.clone(),
            &keelson_firstboot::Paths::system(),
            &validate,
            start,
        )
    }));
    let status = processed.unwrap_or_else(|panic| {
        let why = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "no message".into());
        FirstBoot {
            outcome: Outcome::Rejected,
            source: None,
            instance_id: None,
            format: None,
            error: Some(format!(
                "reading the user data panicked ({why}): a bug, please report it; nothing was \
                 applied and the node boots with its last good config"
            )),
            warnings: Vec::new(),
            probe_log: log,
            duration_ms: start.elapsed().as_millis() as u64,
            applied_at_ms: None,
        }
    });
    for line in status.probe_log.iter().skip(printed) {
        tracing::info!("sysd: datasource: {line}");
    }
    status
}

/// The local datasources, before the network starts. `Err`: nothing local, and this platform
/// has a metadata service to ask once the network is up (the log so far comes with it).
pub fn local(sources: &Sources) -> Result<FirstBoot, Vec<String>> {
    let start = Instant::now();
    let probe = Probe::system();
    let mut log = Vec::new();
    let found = probe.find(&mut log);
    if matches!(found, Ok(None)) && imds::enabled(&probe.sys, &probe.cmdline) {
        for line in &log {
            tracing::info!("sysd: datasource: {line}");
        }
        tracing::info!("sysd: datasource: imds: asked once the network is up");
        return Err(log);
    }
    Ok(process(sources, found, log, start, 0))
}

/// The metadata service, in the background once the network is starting: its user data is
/// applied like a local datasource's, then the running config is reconciled with it.
pub fn from_imds(
    sup: Arc<Supervisor>,
    record: Arc<FirstBootRecord>,
    events: Arc<EventBus>,
    sources: Sources,
    mut log: Vec<String>,
) {
    tokio::spawn(async move {
        let start = Instant::now();
        let from = log.len();
        let found = imds::fetch(imds::ADDRESS, imds::DEADLINE, &mut log).await;
        let status = process(&sources, found, log, start, from);
        let applied = status.outcome == Outcome::Applied;
        record.record(status, &events);
        if applied {
            if let Err(e) = sup.reload().await {
                events.emit(
                    None,
                    "firstboot-error",
                    format!("user data from the metadata service: {}", e.message),
                );
            }
        }
    });
}
