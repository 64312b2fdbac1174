//! The sysd API's wire types: HTTP/JSON over the root-only unix socket [`SOCKET_PATH`].
//! Shared by sysd (server) and keelctl (client) so the two cannot drift. The endpoints are
//! documented in `docs/api.md`.
//!
//! Streams (`logs?follow=1`, `events`) are newline-delimited JSON (one object per line) in a
//! chunked HTTP response, readable with nothing more than a line reader.

pub mod images;

use serde::{Deserialize, Serialize};

pub mod boot;
pub mod config;
pub mod extensions;
pub mod firstboot;
pub mod network;
pub mod update;

/// Where sysd listens (mode 0600, owned by root).
pub const SOCKET_PATH: &str = "/run/keelson/sysd.sock";
/// Prefix of every endpoint.
pub const API_PREFIX: &str = "/v1";

/// Lifecycle of a service as the supervisor sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum State {
    /// Waiting for its dependencies to become ready.
    Waiting,
    /// Container started, readiness not yet reached.
    Starting,
    /// Ready (its readiness check passed, or it has none and its process runs).
    Running,
    /// A one-shot task that ran to completion with status 0.
    Completed,
    /// Stop requested: stop signal sent, waiting for exit (then SIGKILL of the cgroup).
    Stopping,
    /// Not running because it was stopped (by a user, or its policy says not to restart).
    Stopped,
    /// Exited or failed to start; a restart is scheduled (`next_restart_ms`).
    Backoff,
    /// Exited or failed to start and will not be restarted (policy or retry limit);
    /// `reason` says why.
    Failed,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Waiting => "waiting",
            State::Starting => "starting",
            State::Running => "running",
            State::Completed => "completed",
            State::Stopping => "stopping",
            State::Stopped => "stopped",
            State::Backoff => "backoff",
            State::Failed => "failed",
        }
    }
}

/// Result of the periodic health check, when the service has one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Health {
    Starting,
    Healthy,
    Unhealthy,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    Service,
    Oneshot,
}

/// How a container's main process ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitInfo {
    /// Exit status, when it exited.
    pub code: Option<i32>,
    /// Signal number, when it was killed by one.
    pub signal: Option<i32>,
    /// The kernel's OOM killer ran in the service's cgroup.
    pub oom_killed: bool,
    /// Wall clock, milliseconds since the Unix epoch.
    pub at_ms: u64,
}

/// One service, as `GET /v1/services[/NAME]` returns it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceStatus {
    pub name: String,
    pub kind: Kind,
    pub state: State,
    pub health: Option<Health>,
    pub critical: bool,
    /// Where the service comes from: `system` (baked into the image) or `user` (applied).
    pub source: String,
    pub image: String,
    /// Host pid of the container's init, while it runs.
    pub pid: Option<i32>,
    /// Milliseconds since the Unix epoch when the current instance started.
    pub started_at_ms: Option<u64>,
    /// Restarts since sysd started (or since the spec last changed).
    pub restarts: u32,
    pub last_exit: Option<ExitInfo>,
    /// Why the service is failed, in backoff or waiting (human text).
    pub reason: Option<String>,
    /// When the next restart attempt happens (Unix ms), in backoff.
    pub next_restart_ms: Option<u64>,
    /// Short hash of the effective spec (changes exactly when `apply` would restart it).
    pub spec_hash: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stream {
    Stdout,
    Stderr,
}

/// One captured log line of a service (`GET /v1/services/NAME/logs`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogLine {
    /// Wall clock, milliseconds since the Unix epoch, taken when sysd read the line.
    pub time_ms: u64,
    pub stream: Stream,
    pub line: String,
}

/// Something that happened (`GET /v1/events`, a stream).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Monotonic sequence number (per sysd instance), for `?since=`.
    pub seq: u64,
    pub time_ms: u64,
    /// The service concerned, if any.
    pub service: Option<String>,
    /// Machine-readable kind: `starting`, `started`, `ready`, `exited`, `oom-killed`,
    /// `healthy`, `unhealthy`, `restarting`, `stopping`, `stopped`, `failed`, `completed`,
    /// `applied`, `start-failed`.
    pub kind: String,
    /// Human text.
    pub message: String,
}

/// Resource usage of one service's cgroup (`GET /v1/stats`). Counters the kernel does not
/// expose (controller not enabled) are `None`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    pub service: String,
    pub cpu_usage_usec: Option<u64>,
    pub memory_current: Option<u64>,
    pub memory_peak: Option<u64>,
    pub memory_max: Option<u64>,
    pub pids_current: Option<u64>,
    pub io_read_bytes: Option<u64>,
    pub io_write_bytes: Option<u64>,
    pub oom_kills: Option<u64>,
}

/// What `POST /v1/apply` did (or, with `?dry_run=1`, would do).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApplyPlan {
    /// New services that will be started.
    pub start: Vec<String>,
    /// Services whose spec changed: they restart.
    pub restart: Vec<String>,
    /// Services no longer in the config: they stop and are removed.
    pub stop: Vec<String>,
    /// Services left as they are.
    pub unchanged: Vec<String>,
    /// True when nothing was changed because this was a dry run.
    pub dry_run: bool,
}

/// Body of every non-2xx response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiError {
    pub error: String,
}

/// `GET /v1/version`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Version {
    pub version: String,
    /// Seconds since sysd started.
    pub uptime_s: u64,
    /// The hardware watchdog init armed at this boot (absent: none, or off).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub watchdog: Option<Watchdog>,
}

/// The hardware watchdog as init armed it (`/run/keelson/watchdog.json`, written by init).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Watchdog {
    /// The driver's identity (`i6300ESB timer`, `Software Watchdog`).
    pub device: String,
    /// The longest time from a hang of sysd or init to the reset.
    pub timeout_s: u64,
    /// Resets the watchdog caused, across boots.
    pub resets: u64,
    /// The previous boot ended in a watchdog reset, and why.
    #[serde(default)]
    pub previous_boot_reset: Option<String>,
}

/// Formats Unix milliseconds as RFC 3339 UTC with milliseconds (`2026-11-22T00:12:41.123Z`),
/// the timestamp of log files and keelctl output.
pub fn format_time_ms(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        ms % 1000
    )
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    #[test]
    fn rfc3339() {
        assert_eq!(super::format_time_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            super::format_time_ms(1_763_683_200_123),
            "2025-11-21T00:00:00.123Z"
        );
        assert_eq!(
            super::format_time_ms(951_782_400_000),
            "2000-02-29T00:00:00.000Z"
        );
    }
}
