//! One scrape: the node ([`crate::node`]), every service (its cgroup, as cAdvisor names the
//! figures, and its supervision: state, health, restarts), the OS and its updates, and sysd
//! itself (process figures as Prometheus' client libraries name them, API answers by code).
//! Whatever else reports figures (the log forwarder) adds a [`Contributor`].

use std::path::PathBuf;
use std::sync::Arc;

use keelson_api::{RequestCounts, Services, Updates};
use keelson_common::api::{Health, State};

use crate::exposition::{Type, Writer};
use crate::node::{self, NodeSources};

/// Families another component writes into each scrape (each name once).
pub trait Contributor: Send + Sync {
    fn write(&self, w: &mut Writer);
}

/// Everything a scrape reads.
pub struct Collector {
    pub node: NodeSources,
    /// os-release (`ID`, `VERSION_ID`) and the kernel command line (`keelson.slot=`).
    pub os_release: PathBuf,
    pub cmdline: PathBuf,
    /// The cgroup parent of the services (`/keelson`), the `id` label's prefix.
    pub cgroup_parent: String,
    pub services: Arc<dyn Services>,
    pub updates: Option<Arc<dyn Updates>>,
    pub requests: Arc<RequestCounts>,
    pub contributors: Vec<Arc<dyn Contributor>>,
}

const STATES: [State; 8] = [
    State::Waiting,
    State::Starting,
    State::Running,
    State::Completed,
    State::Stopping,
    State::Stopped,
    State::Backoff,
    State::Failed,
];

impl Collector {
    /// The whole scrape, as text.
    pub fn scrape(&self) -> String {
        let mut w = Writer::new();
        node::write(&mut w, &self.node);
        self.os(&mut w);
        self.services(&mut w);
        self.sysd(&mut w);
        for c in &self.contributors {
            c.write(&mut w);
        }
        w.finish()
    }

    fn os(&self, w: &mut Writer) {
        let release = std::fs::read_to_string(&self.os_release).unwrap_or_default();
        let field = |key: &str| {
            release
                .lines()
                .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
                .map(|v| v.trim().trim_matches('"').to_string())
                .unwrap_or_default()
        };
        let cmdline = std::fs::read_to_string(&self.cmdline).unwrap_or_default();
        let slot = keelson_common::cmdline::Cmdline::parse(&cmdline)
            .get(keelson_common::cmdline::SLOT)
            .unwrap_or("")
            .to_string();
        let kernel = nix::sys::utsname::uname()
            .map(|u| u.release().to_string_lossy().into_owned())
            .unwrap_or_default();
        w.family(
            "keelson_os_info",
            Type::Gauge,
            "The running OS: version, A/B slot and kernel (always 1).",
        )
        .sample(
            &[
                ("id", &field("ID")),
                ("version", &field("VERSION_ID")),
                ("image_version", &field("IMAGE_VERSION")),
                ("slot", &slot),
                ("kernel", &kernel),
            ],
            1.0,
        );
        let Some(updates) = &self.updates else {
            return;
        };
        let status = updates.status();
        let mut f = w.family(
            "keelson_update_phase",
            Type::Gauge,
            "What the update agent is doing (1 for the current phase).",
        );
        use keelson_common::api::update::Phase;
        for phase in [
            Phase::Idle,
            Phase::Checking,
            Phase::Downloading,
            Phase::Verifying,
            Phase::Installing,
            Phase::Staged,
            Phase::Assessing,
            Phase::WaitingForSlot,
            Phase::Rebooting,
        ] {
            f.sample(
                &[("phase", phase.as_str())],
                f64::from(u8::from(status.phase == phase)),
            );
        }
        w.family(
            "keelson_update_info",
            Type::Gauge,
            "The update agent's view: boot assessment, staged version, rollback (always 1).",
        )
        .sample(
            &[
                ("assessment", &status.assessment),
                ("staged", status.staged.as_deref().unwrap_or("")),
                (
                    "rolled_back_from",
                    status.rolled_back_from.as_deref().unwrap_or(""),
                ),
            ],
            1.0,
        );
    }

    fn services(&self, w: &mut Writer) {
        let statuses = self.services.list();
        let stats = self.services.stats();
        let id = |name: &str| format!("{}/{name}", self.cgroup_parent);
        type Get = fn(&keelson_common::api::Stats) -> Option<f64>;
        let cgroup: [(&'static str, Type, &str, Get); 7] = [
            (
                "container_cpu_usage_seconds_total",
                Type::Counter,
                "Cumulative cpu time consumed in seconds.",
                |s| s.cpu_usage_usec.map(|u| u as f64 / 1e6),
            ),
            (
                "container_memory_usage_bytes",
                Type::Gauge,
                "Current memory usage in bytes, including all memory regardless of when it was accessed.",
                |s| s.memory_current.map(|v| v as f64),
            ),
            (
                "container_memory_max_usage_bytes",
                Type::Gauge,
                "Maximum memory usage recorded in bytes.",
                |s| s.memory_peak.map(|v| v as f64),
            ),
            (
                "container_spec_memory_limit_bytes",
                Type::Gauge,
                "Memory limit for the container.",
                |s| s.memory_max.map(|v| v as f64),
            ),
            (
                "container_fs_reads_bytes_total",
                Type::Counter,
                "Cumulative count of bytes read.",
                |s| s.io_read_bytes.map(|v| v as f64),
            ),
            (
                "container_fs_writes_bytes_total",
                Type::Counter,
                "Cumulative count of bytes written.",
                |s| s.io_write_bytes.map(|v| v as f64),
            ),
            (
                "container_processes",
                Type::Gauge,
                "Number of processes running inside the container.",
                |s| s.pids_current.map(|v| v as f64),
            ),
        ];
        for (name, kind, help, get) in cgroup {
            let mut f = w.family(name, kind, help);
            for s in &stats {
                if let Some(v) = get(s) {
                    f.sample(&[("name", &s.service), ("id", &id(&s.service))], v);
                }
            }
        }
        let mut f = w.family(
            "container_oom_events_total",
            Type::Counter,
            "Count of out of memory events observed for the container.",
        );
        for s in &stats {
            if let Some(v) = s.oom_kills {
                f.sample(&[("name", &s.service), ("id", &id(&s.service))], v as f64);
            }
        }
        let mut f = w.family(
            "keelson_service_restarts_total",
            Type::Counter,
            "Restarts of the service since sysd started or its spec last changed.",
        );
        for s in &statuses {
            f.sample(&[("name", &s.name)], s.restarts as f64);
        }
        let mut f = w.family(
            "keelson_service_state",
            Type::Gauge,
            "The service's state (1 for the current state).",
        );
        for s in &statuses {
            for state in STATES {
                f.sample(
                    &[("name", &s.name), ("state", state.as_str())],
                    f64::from(u8::from(s.state == state)),
                );
            }
        }
        let mut f = w.family(
            "keelson_service_healthy",
            Type::Gauge,
            "1 when the service's health check passes, 0 otherwise (services with a check).",
        );
        for s in &statuses {
            if let Some(h) = s.health {
                f.sample(
                    &[("name", &s.name)],
                    f64::from(u8::from(h == Health::Healthy)),
                );
            }
        }
        let mut f = w.family(
            "keelson_service_start_time_seconds",
            Type::Gauge,
            "When the service's current instance started, in unixtime.",
        );
        for s in &statuses {
            if let Some(ms) = s.started_at_ms {
                f.sample(&[("name", &s.name)], ms as f64 / 1000.0);
            }
        }
    }

    fn sysd(&self, w: &mut Writer) {
        let me = process_figures(&self.node.proc_dir.join("self"));
        if let Some(rss) = me.rss_bytes {
            w.family(
                "process_resident_memory_bytes",
                Type::Gauge,
                "Resident memory size of sysd in bytes.",
            )
            .sample(&[], rss);
        }
        if let Some(cpu) = me.cpu_seconds {
            w.family(
                "process_cpu_seconds_total",
                Type::Counter,
                "Total user and system CPU time sysd spent in seconds.",
            )
            .sample(&[], cpu);
        }
        if let Some(fds) = me.open_fds {
            w.family(
                "process_open_fds",
                Type::Gauge,
                "Number of open file descriptors of sysd.",
            )
            .sample(&[], fds);
        }
        let mut f = w.family(
            "keelson_api_requests_total",
            Type::Counter,
            "Requests sysd's API answered, by HTTP status code.",
        );
        for (code, n) in self.requests.snapshot() {
            f.sample(&[("code", &code.to_string())], n as f64);
        }
    }
}

/// A process's RSS, CPU time and open descriptors, from `/proc/PID`.
#[derive(Debug, Default)]
pub struct ProcessFigures {
    pub rss_bytes: Option<f64>,
    pub cpu_seconds: Option<f64>,
    pub open_fds: Option<f64>,
}

pub fn process_figures(dir: &std::path::Path) -> ProcessFigures {
    let status = std::fs::read_to_string(dir.join("status")).unwrap_or_default();
    let rss_bytes = status.lines().find_map(|l| {
        let kb: f64 = l
            .strip_prefix("VmRSS:")?
            .trim()
            .strip_suffix("kB")?
            .trim()
            .parse()
            .ok()?;
        Some(kb * 1024.0)
    });
    // /proc/PID/stat: fields after the command's closing parenthesis; utime and stime are the
    // 14th and 15th fields of the whole line.
    let cpu_seconds = std::fs::read_to_string(dir.join("stat"))
        .ok()
        .and_then(|s| {
            let rest = &s[s.rfind(')')? + 2..];
            let f: Vec<&str> = rest.split_whitespace().collect();
            let ticks = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
            // SAFETY: sysconf with a valid name only reads a constant.
            let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
            Some(ticks / hz)
        });
    let open_fds = std::fs::read_dir(dir.join("fd"))
        .ok()
        .map(|d| d.count() as f64);
    ProcessFigures {
        rss_bytes,
        cpu_seconds,
        open_fds,
    }
}
