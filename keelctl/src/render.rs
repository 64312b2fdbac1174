//! Turning API values into text for people: tables, sizes, durations, timestamps and the
//! apply diff. Pure functions of their inputs (the current time is a parameter) so the output
//! is tested exactly.

use std::fmt::Write as _;

use keelson_common::api::{
    ApplyPlan, Event, ExitInfo, Health, Kind, LogLine, ServiceStatus, State, Stats, Stream, Version,
};

/// `keelctl status` without a service: sysd and the hardware watchdog.
pub fn node(v: &Version) -> String {
    let mut out = format!("sysd:      {} (up {})\n", v.version, duration(v.uptime_s));
    match &v.watchdog {
        None => out.push_str("watchdog:  none\n"),
        Some(w) => {
            let _ = writeln!(
                out,
                "watchdog:  {}, resets a hung node within {}s",
                w.device, w.timeout_s
            );
            let _ = writeln!(out, "resets:    {}", w.resets);
            if let Some(why) = &w.previous_boot_reset {
                let _ = writeln!(out, "last boot: reset by the watchdog ({why})");
            }
        }
    }
    out
}

/// Left-aligned columns, two spaces apart, no trailing blanks.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let header_row: Vec<String> = headers.iter().map(|h| h.to_string()).collect();
    for row in std::iter::once(&header_row).chain(rows) {
        let mut line = String::new();
        for (i, (cell, width)) in row.iter().zip(&widths).enumerate() {
            if i > 0 {
                line.push_str("  ");
            }
            let _ = write!(line, "{cell:<width$}");
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// Bytes with a binary unit: `512B`, `1.5K`, `12.3M`, `256M`, `2G`.
pub fn size(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["K", "M", "G", "T", "P", "E"];
    if bytes < 1024 {
        return format!("{bytes}B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    let number = if value >= 100.0 {
        format!("{value:.0}")
    } else {
        let text = format!("{value:.1}");
        text.strip_suffix(".0").map(str::to_string).unwrap_or(text)
    };
    format!("{number}{}", UNITS[unit])
}

/// A duration in its two largest units: `45s`, `3m12s`, `2h5m`, `3d4h`.
pub fn duration(secs: u64) -> String {
    let (days, hours, minutes, seconds) =
        (secs / 86_400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    match (days, hours, minutes) {
        (0, 0, 0) => format!("{seconds}s"),
        (0, 0, _) => format!("{minutes}m{seconds}s"),
        (0, _, _) => format!("{hours}h{minutes}m"),
        _ => format!("{days}d{hours}h"),
    }
}

/// Milliseconds since the Unix epoch as UTC, RFC 3339: `2026-11-22T00:12:41.123Z`.
pub use keelson_common::api::format_time_ms as timestamp;

fn health(health: Option<Health>) -> &'static str {
    match health {
        None => "-",
        Some(Health::Starting) => "starting",
        Some(Health::Healthy) => "healthy",
        Some(Health::Unhealthy) => "unhealthy",
    }
}

fn or_dash<T: ToString>(value: Option<T>) -> String {
    value.map_or_else(|| "-".to_string(), |v| v.to_string())
}

/// How long the current instance has run, for states in which it runs.
fn uptime(service: &ServiceStatus, now_ms: u64) -> Option<u64> {
    let running = matches!(
        service.state,
        State::Starting | State::Running | State::Stopping
    );
    let started = service.started_at_ms.filter(|_| running)?;
    Some(now_ms.saturating_sub(started) / 1000)
}

/// `keelctl ps`: one row per service, sorted by name; REASON only when a service has one.
pub fn ps(services: &[ServiceStatus], now_ms: u64) -> String {
    let (headers, rows) = ps_rows(services, now_ms);
    table(&headers, &rows)
}

/// A table before it is laid out: its headers and rows.
pub type Rows = (Vec<&'static str>, Vec<Vec<String>>);

/// `ps`'s headers and rows (several nodes put a NODE column in front).
pub fn ps_rows(services: &[ServiceStatus], now_ms: u64) -> Rows {
    let mut services: Vec<&ServiceStatus> = services.iter().collect();
    services.sort_by(|a, b| a.name.cmp(&b.name));
    let with_reason = services.iter().any(|s| s.reason.is_some());
    let mut headers = vec![
        "NAME", "STATE", "HEALTH", "PID", "RESTARTS", "UPTIME", "IMAGE",
    ];
    if with_reason {
        headers.push("REASON");
    }
    let rows: Vec<Vec<String>> = services
        .iter()
        .map(|s| {
            let mut row = vec![
                s.name.clone(),
                s.state.as_str().to_string(),
                health(s.health).to_string(),
                or_dash(s.pid),
                s.restarts.to_string(),
                or_dash(uptime(s, now_ms).map(duration)),
                s.image.clone(),
            ];
            if with_reason {
                row.push(s.reason.clone().unwrap_or_default());
            }
            row
        })
        .collect();
    (headers, rows)
}

/// One table of several nodes' rows, a NODE column first; nodes in the order given. A node
/// whose rows have fewer columns (no REASON) gets empty cells.
pub fn with_node_column(per_node: &[(String, Rows)]) -> String {
    let widest = per_node
        .iter()
        .map(|(_, (headers, _))| headers)
        .max_by_key(|headers| headers.len())
        .cloned()
        .unwrap_or_default();
    let mut headers = vec!["NODE"];
    headers.extend(widest.iter().copied());
    let mut rows = Vec::new();
    for (node, (_, node_rows)) in per_node {
        for row in node_rows {
            let mut full = vec![node.clone()];
            full.extend(row.iter().cloned());
            full.resize(headers.len(), String::new());
            rows.push(full);
        }
    }
    table(&headers, &rows)
}

/// `code 1`, `signal 9 (SIGKILL)`, plus `, OOM-killed`.
pub fn exit(exit: &ExitInfo) -> String {
    let mut text = match (exit.code, exit.signal) {
        (_, Some(signal)) => match signal_name(signal) {
            Some(name) => format!("signal {signal} ({name})"),
            None => format!("signal {signal}"),
        },
        (Some(code), None) => format!("code {code}"),
        (None, None) => "unknown status".to_string(),
    };
    if exit.oom_killed {
        text.push_str(", OOM-killed");
    }
    text
}

fn signal_name(signal: i32) -> Option<&'static str> {
    Some(match signal {
        1 => "SIGHUP",
        2 => "SIGINT",
        3 => "SIGQUIT",
        4 => "SIGILL",
        6 => "SIGABRT",
        7 => "SIGBUS",
        8 => "SIGFPE",
        9 => "SIGKILL",
        10 => "SIGUSR1",
        11 => "SIGSEGV",
        12 => "SIGUSR2",
        13 => "SIGPIPE",
        14 => "SIGALRM",
        15 => "SIGTERM",
        _ => return None,
    })
}

/// `2026-11-22T00:12:41.123Z (3m12s ago)`.
fn when(ms: u64, now_ms: u64) -> String {
    if ms > now_ms {
        format!(
            "{} (in {})",
            timestamp(ms),
            duration((ms - now_ms).div_ceil(1000))
        )
    } else {
        format!("{} ({} ago)", timestamp(ms), duration((now_ms - ms) / 1000))
    }
}

/// `keelctl status SVC`: a `key: value` block.
pub fn status(s: &ServiceStatus, now_ms: u64) -> String {
    let kind = match s.kind {
        Kind::Service => "service",
        Kind::Oneshot => "oneshot",
    };
    let last_exit = s.last_exit.as_ref().map(|e| {
        let at = when(e.at_ms, now_ms);
        format!("{} at {at}", exit(e))
    });
    let started = s.started_at_ms.map(|ms| {
        let mut text = when(ms, now_ms);
        if let Some(up) = uptime(s, now_ms) {
            let _ = write!(text, ", up {}", duration(up));
        }
        text
    });
    let fields = [
        ("name", s.name.clone()),
        ("kind", kind.to_string()),
        ("state", s.state.as_str().to_string()),
        ("health", health(s.health).to_string()),
        (
            "critical",
            if s.critical { "yes" } else { "no" }.to_string(),
        ),
        ("source", s.source.clone()),
        ("image", s.image.clone()),
        ("pid", or_dash(s.pid)),
        ("started", or_dash(started)),
        ("restarts", s.restarts.to_string()),
        ("last exit", or_dash(last_exit)),
        ("reason", or_dash(s.reason.clone())),
        (
            "next restart",
            or_dash(s.next_restart_ms.map(|ms| when(ms, now_ms))),
        ),
        ("spec", s.spec_hash.clone()),
    ];
    let width = fields.iter().map(|(k, _)| k.len()).max().unwrap_or(0) + 1;
    fields
        .iter()
        .map(|(key, value)| format!("{:<width$} {value}\n", format!("{key}:")))
        .collect()
}

/// `keelctl stats`: one row per service, sorted by name.
pub fn stats(stats: &[Stats]) -> String {
    let (headers, rows) = stats_rows(stats);
    table(&headers, &rows)
}

/// `stats`' headers and rows.
pub fn stats_rows(stats: &[Stats]) -> Rows {
    let mut stats: Vec<&Stats> = stats.iter().collect();
    stats.sort_by(|a, b| a.service.cmp(&b.service));
    let opt_size = |v: Option<u64>| v.map_or_else(|| "-".to_string(), size);
    let rows: Vec<Vec<String>> = stats
        .iter()
        .map(|s| {
            let max = match s.memory_max {
                Some(u64::MAX) => "max".to_string(),
                other => opt_size(other),
            };
            vec![
                s.service.clone(),
                or_dash(s.cpu_usage_usec.map(|us| format!("{:.2}", us as f64 / 1e6))),
                opt_size(s.memory_current),
                format!("{max}/{}", opt_size(s.memory_peak)),
                or_dash(s.pids_current),
                opt_size(s.io_read_bytes),
                opt_size(s.io_write_bytes),
                or_dash(s.oom_kills),
            ]
        })
        .collect();
    let headers = vec![
        "NAME",
        "CPU(s)",
        "MEM",
        "MEM-MAX/PEAK",
        "PIDS",
        "IO-R",
        "IO-W",
        "OOM",
    ];
    (headers, rows)
}

/// `TIME line`, or `TIME [stderr] line`.
pub fn log_line(line: &LogLine) -> String {
    match line.stream {
        Stream::Stdout => format!("{} {}", timestamp(line.time_ms), line.line),
        Stream::Stderr => format!("{} [stderr] {}", timestamp(line.time_ms), line.line),
    }
}

/// `keelctl status NAME`'s tail for a service that ended badly: its last output lines (as
/// `keelctl logs` shows them), indented under a heading; nothing when it printed nothing.
pub fn last_output(lines: &[LogLine]) -> String {
    if lines.is_empty() {
        return String::new();
    }
    let mut text = String::from("last output:\n");
    for l in lines {
        let _ = writeln!(text, "  {}", log_line(l));
    }
    text
}

/// `TIME SERVICE KIND MESSAGE` (`-` when the event concerns no service).
pub fn event(event: &Event) -> String {
    format!(
        "{} {} {} {}",
        timestamp(event.time_ms),
        event.service.as_deref().unwrap_or("-"),
        event.kind,
        event.message
    )
}

/// What `apply` does (or would do), one service a line, then the count of unchanged ones.
pub fn plan_diff(plan: &ApplyPlan) -> String {
    let mut out = String::new();
    for name in &plan.start {
        let _ = writeln!(out, "+ {name} (start)");
    }
    for name in &plan.restart {
        let _ = writeln!(out, "~ {name} (restart: spec changed)");
    }
    for name in &plan.stop {
        let _ = writeln!(out, "- {name} (stop)");
    }
    if !plan.unchanged.is_empty() {
        let _ = writeln!(out, "= {} unchanged", plan.unchanged.len());
    }
    if out.is_empty() {
        out.push_str("= no services\n");
    }
    out
}

/// `applied: 1 started, 1 restarted, 0 stopped, 2 unchanged`.
pub fn plan_summary(plan: &ApplyPlan) -> String {
    format!(
        "applied: {} started, {} restarted, {} stopped, {} unchanged\n",
        plan.start.len(),
        plan.restart.len(),
        plan.stop.len(),
        plan.unchanged.len()
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn node_status_with_and_without_a_watchdog() {
        use keelson_common::api::{Version, Watchdog};
        let mut v = Version {
            version: "0.1.0".into(),
            uptime_s: 75,
            watchdog: None,
        };
        assert_eq!(
            super::node(&v),
            "sysd:      0.1.0 (up 1m15s)\nwatchdog:  none\n"
        );
        v.watchdog = Some(Watchdog {
            device: "i6300ESB timer".into(),
            timeout_s: 20,
            resets: 1,
            previous_boot_reset: Some("sysd silent for 11 s".into()),
        });
        assert_eq!(
            super::node(&v),
            "sysd:      0.1.0 (up 1m15s)\nwatchdog:  i6300ESB timer, resets a hung node within 20s\nresets:    1\nlast boot: reset by the watchdog (sysd silent for 11 s)\n"
        );
    }

    use super::*;

    const NOW: u64 = 1_795_306_361_123; // 2026-11-22T00:12:41.123Z

    fn service(name: &str, state: State) -> ServiceStatus {
        ServiceStatus {
            name: name.into(),
            kind: Kind::Service,
            state,
            health: None,
            critical: false,
            source: "user".into(),
            image: format!("{name}:1"),
            pid: None,
            started_at_ms: None,
            restarts: 0,
            last_exit: None,
            reason: None,
            next_restart_ms: None,
            spec_hash: "abc123".into(),
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(size(0), "0B");
        assert_eq!(size(1023), "1023B");
        assert_eq!(size(1024), "1K");
        assert_eq!(size(1536), "1.5K");
        assert_eq!(size(12_900_000), "12.3M");
        assert_eq!(size(256 << 20), "256M");
        assert_eq!(size(2 << 30), "2G");
        assert_eq!(size(u64::MAX), "16E");
    }

    #[test]
    fn durations() {
        assert_eq!(duration(0), "0s");
        assert_eq!(duration(45), "45s");
        assert_eq!(duration(192), "3m12s");
        assert_eq!(duration(2 * 3600 + 5 * 60 + 9), "2h5m");
        assert_eq!(duration(3 * 86_400 + 4 * 3600 + 59), "3d4h");
    }

    #[test]
    fn timestamps() {
        assert_eq!(timestamp(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(timestamp(NOW), "2026-11-22T00:12:41.123Z");
        assert_eq!(timestamp(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(timestamp(4_107_542_399_999), "2100-02-28T23:59:59.999Z");
    }

    #[test]
    fn tables_align_columns_without_trailing_blanks() {
        let rows = vec![
            vec!["web".to_string(), "running".to_string(), "x".to_string()],
            vec!["database".to_string(), "-".to_string(), String::new()],
        ];
        assert_eq!(
            table(&["NAME", "STATE", "EXTRA"], &rows),
            "NAME      STATE    EXTRA\n\
             web       running  x\n\
             database  -\n"
        );
    }

    #[test]
    fn ps_sorts_by_name_and_adds_reason_only_when_needed() {
        let mut web = service("web", State::Running);
        web.pid = Some(4242);
        web.started_at_ms = Some(NOW - 192_000);
        web.health = Some(Health::Healthy);
        web.restarts = 2;
        let db = service("db", State::Stopped);
        assert_eq!(
            ps(&[web.clone(), db.clone()], NOW),
            "NAME  STATE    HEALTH   PID   RESTARTS  UPTIME  IMAGE\n\
             db    stopped  -        -     0         -       db:1\n\
             web   running  healthy  4242  2         3m12s   web:1\n"
        );
        let mut failed = service("cache", State::Failed);
        failed.reason = Some("exited with code 1, 5 times in a row".into());
        assert_eq!(
            ps(&[web, failed], NOW),
            "NAME   STATE    HEALTH   PID   RESTARTS  UPTIME  IMAGE    REASON\n\
             cache  failed   -        -     0         -       cache:1  exited with code 1, 5 times in a row\n\
             web    running  healthy  4242  2         3m12s   web:1\n"
        );
    }

    #[test]
    fn status_block() {
        let mut s = service("web", State::Backoff);
        s.restarts = 3;
        s.last_exit = Some(ExitInfo {
            code: None,
            signal: Some(9),
            oom_killed: true,
            at_ms: NOW - 5_000,
        });
        s.reason = Some("killed by the OOM killer".into());
        s.next_restart_ms = Some(NOW + 2_500);
        assert_eq!(
            status(&s, NOW),
            "name:         web\n\
             kind:         service\n\
             state:        backoff\n\
             health:       -\n\
             critical:     no\n\
             source:       user\n\
             image:        web:1\n\
             pid:          -\n\
             started:      -\n\
             restarts:     3\n\
             last exit:    signal 9 (SIGKILL), OOM-killed at 2026-11-22T00:12:36.123Z (5s ago)\n\
             reason:       killed by the OOM killer\n\
             next restart: 2026-11-22T00:12:43.623Z (in 3s)\n\
             spec:         abc123\n"
        );
    }

    #[test]
    fn last_output_block() {
        assert_eq!(last_output(&[]), "");
        let lines = [
            LogLine {
                time_ms: NOW - 2_000,
                stream: Stream::Stdout,
                line: "joining 10.77.0.11:2377".into(),
            },
            LogLine {
                time_ms: NOW - 1_000,
                stream: Stream::Stderr,
                line: "Error response from daemon: invalid join token".into(),
            },
        ];
        assert_eq!(
            last_output(&lines),
            "last output:\n  \
             2026-11-22T00:12:39.123Z joining 10.77.0.11:2377\n  \
             2026-11-22T00:12:40.123Z [stderr] Error response from daemon: invalid join token\n"
        );
    }

    #[test]
    fn stats_table() {
        let full = Stats {
            service: "web".into(),
            cpu_usage_usec: Some(12_345_678),
            memory_current: Some(12_900_000),
            memory_peak: Some(40 << 20),
            memory_max: Some(256 << 20),
            pids_current: Some(7),
            io_read_bytes: Some(1536),
            io_write_bytes: Some(0),
            oom_kills: Some(0),
        };
        let bare = Stats {
            service: "db".into(),
            memory_max: Some(u64::MAX),
            ..Stats::default()
        };
        assert_eq!(
            stats(&[full, bare]),
            "NAME  CPU(s)  MEM    MEM-MAX/PEAK  PIDS  IO-R  IO-W  OOM\n\
             db    -       -      max/-         -     -     -     -\n\
             web   12.35   12.3M  256M/40M      7     1.5K  0B    0\n"
        );
    }

    #[test]
    fn log_and_event_lines() {
        let out = LogLine {
            time_ms: NOW,
            stream: Stream::Stdout,
            line: "listening on :80".into(),
        };
        assert_eq!(log_line(&out), "2026-11-22T00:12:41.123Z listening on :80");
        let err = LogLine {
            stream: Stream::Stderr,
            ..out
        };
        assert_eq!(
            log_line(&err),
            "2026-11-22T00:12:41.123Z [stderr] listening on :80"
        );
        let e = Event {
            seq: 4,
            time_ms: NOW,
            service: Some("web".into()),
            kind: "exited".into(),
            message: "exited with code 1".into(),
        };
        assert_eq!(
            event(&e),
            "2026-11-22T00:12:41.123Z web exited exited with code 1"
        );
        let e = Event {
            service: None,
            kind: "applied".into(),
            ..e
        };
        assert!(event(&e).contains(" - applied "));
    }

    #[test]
    fn diffs() {
        let plan = ApplyPlan {
            start: vec!["web".into()],
            restart: vec!["db".into()],
            stop: vec!["old".into()],
            unchanged: vec!["a".into(), "b".into()],
            dry_run: true,
        };
        assert_eq!(
            plan_diff(&plan),
            "+ web (start)\n~ db (restart: spec changed)\n- old (stop)\n= 2 unchanged\n"
        );
        assert_eq!(
            plan_summary(&plan),
            "applied: 1 started, 1 restarted, 1 stopped, 2 unchanged\n"
        );
        assert_eq!(plan_diff(&ApplyPlan::default()), "= no services\n");
    }
}
