//! The boot timeline (`GET /v1/boot`, `keelctl analyze`): init's steps from its own stamped
//! lines and the services' start-up from sysd's events, all on one clock (CLOCK_BOOTTIME, time
//! since the kernel started), and what is made of them: `blame` (every step by its cost),
//! `critical-chain` (what the last service waited for, back to the kernel) and an SVG plot.
//!
//! init writes each console line it prints to [`INIT_LOG`] as well (stage 1's lines are on
//! /run, which it moves into the real root), so the record is the boot log's contract
//! (ARCHITECTURE.md, *Boot log*); [`parse_init_log`] reads it and [`Boot::from_console`] reads a
//! whole serial console (init's lines and sysd's stamped event lines), which is what
//! `bench-boot` has.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use super::State;

/// Where init records its console lines for this boot (tmpfs: gone at the next boot).
pub const INIT_LOG: &str = "/run/keelson/init.log";

/// The prefix of init's lines after the stamp.
const INIT_TAG: &str = "keelson-init: ";

/// The event kind sysd reports once every service it started at boot is ready.
pub const BOOT_READY: &str = "boot-ready";

/// `GET /v1/boot`: this boot's timeline. Times are microseconds since the kernel started.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Boot {
    /// init's lines, in the order it printed them (stage 1's first).
    pub init: Vec<Mark>,
    /// Each service sysd ran this boot, by name.
    pub services: Vec<ServiceBoot>,
    /// When every service started at boot had settled: ready, or failed for good (`null`
    /// while one is still starting, waiting or in backoff).
    pub all_ready_us: Option<u64>,
    /// The clock when this answer was made.
    pub now_us: u64,
}

/// One line init printed, and when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mark {
    pub at_us: u64,
    pub message: String,
}

/// One service's start this boot: the first time each milestone was reached.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceBoot {
    pub name: String,
    /// What it waited for (`after`, `requires`, a `service:NAME` network), sorted.
    pub after: Vec<String>,
    /// sysd began to start it (its dependencies were ready).
    pub starting_us: Option<u64>,
    /// Its container ran (or a previous sysd's container was adopted).
    pub started_us: Option<u64>,
    /// It became ready (a oneshot: it completed).
    pub ready_us: Option<u64>,
    /// Its state when this answer was made (`null`: no longer configured).
    pub state: Option<State>,
}

/// A piece of the timeline: an init step (named by the line that ends it), a step init ran in
/// the background, or a service's start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub name: String,
    pub start_us: u64,
    pub end_us: u64,
    pub kind: StepKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepKind {
    /// The kernel, until init's first line.
    Kernel,
    /// init in the initramfs.
    Stage1,
    /// init in the real root.
    Stage2,
    /// Work init does beside its main line (the root's modules, the random seed).
    Background,
    /// A service from starting to ready; `started_us` splits container start from readiness.
    Service { started_us: Option<u64> },
}

impl Step {
    pub fn duration_us(&self) -> u64 {
        self.end_us.saturating_sub(self.start_us)
    }
}

/// A line of [`INIT_LOG`] (or of the console) that does not read as a stamped line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {why}: {text:?}")]
pub struct ParseError {
    pub line: usize,
    pub why: &'static str,
    pub text: String,
}

/// `[    1.234567] rest` → (1234567, rest).
fn stamped(line: &str) -> Result<(u64, &str), &'static str> {
    let rest = line
        .trim_start()
        .strip_prefix('[')
        .ok_or("no [seconds] stamp")?;
    let (stamp, rest) = rest.split_once(']').ok_or("no ] after the stamp")?;
    let (secs, frac) = stamp
        .trim()
        .split_once('.')
        .ok_or("the stamp is not seconds.micros")?;
    let secs: u64 = secs
        .parse()
        .map_err(|_| "the stamp's seconds are no number")?;
    if frac.is_empty() || frac.len() > 9 || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return Err("the stamp's fraction is not 1 to 9 digits");
    }
    let mut micros: u64 = frac.parse().map_err(|_| "bad fraction")?;
    for _ in frac.len()..6 {
        micros *= 10;
    }
    for _ in 6..frac.len() {
        micros /= 10;
    }
    let at = secs
        .checked_mul(1_000_000)
        .and_then(|s| s.checked_add(micros))
        .ok_or("the stamp is out of range")?;
    Ok((at, rest.strip_prefix(' ').unwrap_or(rest)))
}

/// Reads init's record ([`INIT_LOG`]): every line `[ secs.micros] keelson-init: message`.
/// A line cut short by a crash or a full /run (the last one, without its newline) is left out;
/// any other line that does not read is an error naming it.
pub fn parse_init_log(text: &str) -> Result<Vec<Mark>, ParseError> {
    let mut marks = Vec::new();
    let complete = text.ends_with('\n');
    let count = text.lines().count();
    for (i, line) in text.lines().enumerate() {
        if line.is_empty() || (!complete && i + 1 == count) {
            continue;
        }
        let err = |why| ParseError {
            line: i + 1,
            why,
            text: line.to_string(),
        };
        let (at_us, rest) = stamped(line).map_err(err)?;
        let message = rest
            .strip_prefix(INIT_TAG)
            .ok_or_else(|| err("not a keelson-init line"))?;
        marks.push(Mark {
            at_us,
            message: message.to_string(),
        });
    }
    Ok(marks)
}

/// A sysd line on the console: `[ secs.micros]  INFO sysd: SERVICE: KIND: message` (or
/// `sysd: KIND: message` for a node event) → (at, service, kind).
fn sysd_event(line: &str) -> Option<(u64, Option<&str>, &str)> {
    let (at, rest) = stamped(line).ok()?;
    let rest = rest.trim_start();
    let rest = ["INFO", "WARN", "ERROR", "DEBUG", "TRACE"]
        .iter()
        .find_map(|l| rest.strip_prefix(l))
        .unwrap_or(rest)
        .trim_start()
        .strip_prefix("sysd: ")?;
    let (first, after) = rest.split_once(": ")?;
    if first == BOOT_READY {
        return Some((at, None, BOOT_READY));
    }
    let kind = after.split(':').next()?;
    is_milestone(kind).then_some((at, Some(first), kind))
}

/// Whether an event of this kind is a boot milestone of its service.
pub fn is_milestone(kind: &str) -> bool {
    matches!(
        kind,
        "starting" | "started" | "adopted" | "ready" | "completed"
    )
}

/// What a service's event means for its boot record; the first of each milestone counts.
pub fn note_event(record: &mut ServiceBoot, kind: &str, at_us: u64) {
    let slot = match kind {
        "starting" => &mut record.starting_us,
        "started" | "adopted" => &mut record.started_us,
        "ready" | "completed" => &mut record.ready_us,
        _ => return,
    };
    slot.get_or_insert(at_us);
    // An adopted container was started by a sysd that is gone: it began no later than this.
    if kind == "adopted" {
        record.starting_us.get_or_insert(at_us);
    }
}

impl ServiceBoot {
    pub fn new(name: &str) -> Self {
        ServiceBoot {
            name: name.to_string(),
            after: Vec::new(),
            starting_us: None,
            started_us: None,
            ready_us: None,
            state: None,
        }
    }
}

impl Boot {
    /// The timeline a serial console shows: init's lines and sysd's event lines (which sysd
    /// stamps with the same clock). Other lines (the kernel's, the services' own) are skipped.
    /// Dependencies are not on the console, so the services' `after` is empty.
    pub fn from_console(text: &str) -> Boot {
        let mut boot = Boot::default();
        let mut services: BTreeMap<String, ServiceBoot> = BTreeMap::new();
        for line in text.lines() {
            if let Ok((at_us, rest)) = stamped(line) {
                boot.now_us = boot.now_us.max(at_us);
                if let Some(message) = rest.strip_prefix(INIT_TAG) {
                    boot.init.push(Mark {
                        at_us,
                        message: message.to_string(),
                    });
                    continue;
                }
            }
            match sysd_event(line) {
                Some((at, None, _)) => {
                    boot.all_ready_us.get_or_insert(at);
                }
                Some((at, Some(name), kind)) => {
                    let record = services
                        .entry(name.to_string())
                        .or_insert_with(|| ServiceBoot::new(name));
                    note_event(record, kind, at);
                }
                None => {}
            }
        }
        boot.services = services.into_values().collect();
        boot
    }

    /// The first init line that starts with `prefix`.
    pub fn mark(&self, prefix: &str) -> Option<&Mark> {
        self.init.iter().find(|m| m.message.starts_with(prefix))
    }

    /// init's `boot complete` (sysd said READY=1).
    pub fn boot_complete_us(&self) -> Option<u64> {
        self.mark("boot complete").map(|m| m.at_us)
    }

    /// init's steps: the kernel until init's first line, then one step per line, from the
    /// previous line of init's main line to this one and named by it (a line says what was
    /// just done: `stage1: modules loaded …`, `stage1: boot disk /dev/vda`). Lines init's
    /// background work prints (`modules: … in N ms` from the root's module loader,
    /// `random-seed: stored …`) are steps of their own, N ms long, off the main line.
    pub fn init_steps(&self) -> Vec<Step> {
        let mut steps = Vec::new();
        let mut prev = 0u64;
        let mut stage2 = false;
        for (i, mark) in self.init.iter().enumerate() {
            if is_background(&mark.message) {
                let took = reported_ms(&mark.message).unwrap_or(0) * 1000;
                steps.push(Step {
                    name: mark.message.clone(),
                    start_us: mark.at_us.saturating_sub(took),
                    end_us: mark.at_us,
                    kind: StepKind::Background,
                });
                continue;
            }
            stage2 |= mark.message.starts_with("stage2: start");
            let kind = if i == 0 {
                StepKind::Kernel
            } else if stage2 {
                StepKind::Stage2
            } else {
                StepKind::Stage1
            };
            let name = if i == 0 {
                format!("kernel (until {})", mark.message)
            } else {
                mark.message.clone()
            };
            steps.push(Step {
                name,
                start_us: prev.min(mark.at_us),
                end_us: mark.at_us,
                kind,
            });
            prev = mark.at_us;
        }
        steps
    }

    /// The services' starts, in the order they began.
    pub fn service_steps(&self) -> Vec<Step> {
        let mut steps: Vec<Step> = self
            .services
            .iter()
            .filter_map(|s| {
                let start = s.starting_us.or(s.started_us)?;
                Some(Step {
                    name: s.name.clone(),
                    start_us: start,
                    end_us: s.ready_us.unwrap_or(self.now_us).max(start),
                    kind: StepKind::Service {
                        started_us: s.started_us,
                    },
                })
            })
            .collect();
        steps.sort_by(|a, b| (a.start_us, &a.name).cmp(&(b.start_us, &b.name)));
        steps
    }
}

/// Lines init's background work prints (ARCHITECTURE.md, *Boot log*).
fn is_background(message: &str) -> bool {
    message.starts_with("modules: ") || message.starts_with("random-seed: stored")
}

/// The `N` of `… in N ms …`.
fn reported_ms(message: &str) -> Option<u64> {
    let words: Vec<&str> = message.split_whitespace().collect();
    words
        .windows(3)
        .find(|w| w[0] == "in" && w[2].trim_end_matches([')', ',', ';']) == "ms")
        .and_then(|w| w[1].parse().ok())
}

/// `1.234s`, `56ms`, `789us`, as systemd-analyze writes them.
pub fn human(us: u64) -> String {
    if us >= 1_000_000 {
        format!("{:.3}s", us as f64 / 1e6)
    } else if us >= 1000 {
        format!("{}ms", us / 1000)
    } else {
        format!("{us}us")
    }
}

/// `keelctl analyze` (no subcommand): the headline, as `systemd-analyze time` says it.
pub fn summary(boot: &Boot) -> String {
    let mut out = String::new();
    let start = boot.init.first().map(|m| m.at_us);
    let switch = boot.mark("stage1: switching root").map(|m| m.at_us);
    match (start, switch, boot.boot_complete_us()) {
        (Some(s), Some(sw), Some(done)) => {
            let _ = writeln!(
                out,
                "Boot complete after {} (kernel) + {} (initramfs) + {} (userspace) = {}",
                human(s),
                human(sw.saturating_sub(s)),
                human(done.saturating_sub(sw)),
                human(done)
            );
        }
        (Some(s), _, None) => {
            let _ = writeln!(
                out,
                "Boot not complete yet (init started after {})",
                human(s)
            );
        }
        _ => {
            let _ = writeln!(out, "No init record for this boot ({INIT_LOG} is empty)");
        }
    }
    match (boot.all_ready_us, waiting(boot)) {
        (Some(at), _) => {
            let failed: Vec<&str> = boot
                .services
                .iter()
                .filter(|s| s.state == Some(State::Failed))
                .map(|s| s.name.as_str())
                .collect();
            let _ = write!(out, "All services ready after {}", human(at));
            if !failed.is_empty() {
                let _ = write!(out, " (failed: {})", failed.join(", "));
            }
            out.push('\n');
        }
        (None, w) if !w.is_empty() => {
            let _ = writeln!(
                out,
                "Not all services ready yet: waiting for {}",
                w.join(", ")
            );
        }
        (None, _) => {}
    }
    out
}

/// Services that have not settled (ready, completed, failed for good or stopped).
fn waiting(boot: &Boot) -> Vec<String> {
    boot.services
        .iter()
        .filter(|s| {
            s.state.is_some_and(|st| {
                matches!(
                    st,
                    State::Waiting | State::Starting | State::Backoff | State::Stopping
                )
            })
        })
        .map(|s| match s.state {
            Some(st) => format!("{} ({})", s.name, state_word(st)),
            None => s.name.clone(),
        })
        .collect()
}

fn state_word(s: State) -> &'static str {
    match s {
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

/// `keelctl analyze blame`: every step, the slowest first, with what it was.
pub fn blame(boot: &Boot) -> String {
    let mut rows: Vec<(u64, String)> = Vec::new();
    for s in boot.init_steps() {
        let what = match s.kind {
            StepKind::Background => format!("{} [init, background]", s.name),
            StepKind::Kernel => s.name.clone(),
            StepKind::Stage1 => format!("{} [init stage 1]", s.name),
            _ => format!("{} [init stage 2]", s.name),
        };
        rows.push((s.duration_us(), what));
    }
    for s in boot.service_steps() {
        let record = boot.services.iter().find(|r| r.name == s.name);
        let mut what = format!("{} [service]", s.name);
        if let (
            StepKind::Service {
                started_us: Some(st),
            },
            Some(r),
        ) = (s.kind, record)
        {
            if r.ready_us.is_some() {
                let _ = write!(
                    what,
                    " (container {}, then ready after {})",
                    human(st.saturating_sub(s.start_us)),
                    human(s.end_us.saturating_sub(st))
                );
            }
        }
        if record.is_some_and(|r| r.ready_us.is_none()) {
            what.push_str(" (not ready yet)");
        }
        rows.push((s.duration_us(), what));
    }
    rows.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    let width = rows.iter().map(|r| human(r.0).len()).max().unwrap_or(0);
    let mut out = String::new();
    for (us, what) in rows {
        let _ = writeln!(out, "{:>width$} {what}", human(us));
    }
    out
}

/// `keelctl analyze critical-chain`: from the last service to become ready, the dependency
/// that became ready last before it started, back to sysd's start, then init's main line back
/// to the kernel. `@` is when a step ended (the service was ready), `+` how long it took.
pub fn critical_chain(boot: &Boot) -> String {
    let mut lines: Vec<String> = Vec::new();
    let by_name: BTreeMap<&str, &ServiceBoot> =
        boot.services.iter().map(|s| (s.name.as_str(), s)).collect();
    let last = boot
        .services
        .iter()
        .filter(|s| boot.all_ready_us.is_none_or(|all| s.ready_us <= Some(all)))
        .filter_map(|s| Some((s.ready_us?, s)))
        .max_by_key(|(at, s)| (*at, std::cmp::Reverse(s.name.as_str())));
    match (boot.all_ready_us, last) {
        (Some(at), _) => lines.push(format!("all services ready @{}", human(at))),
        (None, _) => lines.push(format!(
            "not all services ready (now @{}); the chain of the last one ready so far",
            human(boot.now_us)
        )),
    }
    let mut current = last.map(|(_, s)| s);
    let mut seen = std::collections::BTreeSet::new();
    while let Some(s) = current {
        if !seen.insert(s.name.as_str()) {
            break;
        }
        let start = s.starting_us.or(s.started_us).unwrap_or(0);
        let ready = s.ready_us.unwrap_or(start);
        lines.push(format!(
            "{} @{} +{}",
            s.name,
            human(ready),
            human(ready.saturating_sub(start))
        ));
        current = s
            .after
            .iter()
            .filter_map(|d| by_name.get(d.as_str()).copied())
            .filter(|d| d.ready_us.is_some_and(|r| r <= start))
            .max_by_key(|d| d.ready_us);
    }
    let steps = boot.init_steps();
    let main_line: Vec<&Step> = steps
        .iter()
        .filter(|s| s.kind != StepKind::Background)
        .collect();
    // Services begin once sysd runs: init's main line up to `sysd started`, or all of it.
    let upto = main_line
        .iter()
        .position(|s| s.name.starts_with("stage2: sysd started"))
        .filter(|_| lines.len() > 1)
        .unwrap_or(main_line.len().saturating_sub(1));
    for s in main_line.iter().take(upto + 1).rev() {
        lines.push(format!(
            "{} @{} +{}",
            s.name,
            human(s.end_us),
            human(s.duration_us())
        ));
    }
    let mut out = String::from(
        "The time when a step ended (a service was ready) is after \"@\", how long it took after \"+\".\n\n",
    );
    for (i, line) in lines.iter().enumerate() {
        if i == 0 {
            let _ = writeln!(out, "{line}");
        } else {
            let _ = writeln!(out, "{}└─{line}", " ".repeat(2 * (i - 1).min(12)));
        }
    }
    out
}

/// `keelctl analyze timeline` (and `bench-boot`): every step in the order it began.
pub fn timeline(boot: &Boot) -> String {
    let mut steps = boot.init_steps();
    steps.extend(boot.service_steps());
    steps.sort_by_key(|s| (s.start_us, s.end_us));
    let mut out = String::new();
    for s in &steps {
        let tag = match s.kind {
            StepKind::Kernel => "kernel",
            StepKind::Stage1 => "init 1",
            StepKind::Stage2 => "init 2",
            StepKind::Background => "init bg",
            StepKind::Service { .. } => "service",
        };
        let _ = writeln!(
            out,
            "{:>9} {:>9}  {tag:<7}  {}",
            format!("@{}", human(s.start_us)),
            format!("+{}", human(s.duration_us())),
            s.name
        );
    }
    if let Some(at) = boot.boot_complete_us() {
        let _ = writeln!(
            out,
            "{:>9} {:>9}  {:<7}  boot complete",
            format!("@{}", human(at)),
            "",
            "init"
        );
    }
    if let Some(at) = boot.all_ready_us {
        let _ = writeln!(
            out,
            "{:>9} {:>9}  {:<7}  all services ready",
            format!("@{}", human(at)),
            "",
            "sysd"
        );
    }
    out
}

fn xml_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c if c.is_control() => out.push(' '),
            c => out.push(c),
        }
    }
    out
}

/// `keelctl analyze plot`: the timeline as an SVG picture, one row per step (init's, then the
/// services'), time running right, with `boot complete` and `all services ready` marked.
/// Services that began after all services were ready (applied later) are left out.
pub fn svg(boot: &Boot) -> String {
    const ROW: u64 = 18;
    const LEFT: u64 = 10;
    const TOP: u64 = 60;
    let mut steps = boot.init_steps();
    let mut services = boot.service_steps();
    if let Some(all) = boot.all_ready_us {
        services.retain(|s| s.start_us <= all);
    }
    steps.extend(services);
    let end_us = steps
        .iter()
        .map(|s| s.end_us)
        .chain(boot.all_ready_us)
        .max()
        .unwrap_or(0)
        .max(100_000);
    // 1000 px a second for a boot of up to 10 s; a longer one (a network timeout) is squeezed
    // into about 10000 px, with a grid line a second instead of every 100 ms.
    let secs = end_us as f64 / 1e6;
    let (px_per_s, tick_us, label_every) = if secs <= 10.0 {
        (1000.0, 100_000u64, if secs > 2.0 { 10 } else { 1 })
    } else {
        (
            (10_000.0 / secs).max(20.0),
            1_000_000u64,
            if secs > 60.0 { 10 } else { 1 },
        )
    };
    let x = |us: u64| LEFT as f64 + us as f64 / 1e6 * px_per_s;
    let plot_w = x(end_us) - LEFT as f64;
    // Room for the labels written right of the last bars.
    let width = (x(end_us) + 420.0).ceil() as u64;
    let height = TOP + ROW * steps.len() as u64 + 40;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" viewBox=\"0 0 {width} {height}\" font-family=\"monospace\" font-size=\"11\">"
    );
    let _ = writeln!(
        out,
        "<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n<text x=\"{LEFT}\" y=\"18\" font-size=\"14\">{}</text>",
        xml_escape(summary(boot).lines().next().unwrap_or(""))
    );
    if let Some(line) = summary(boot).lines().nth(1) {
        let _ = writeln!(
            out,
            "<text x=\"{LEFT}\" y=\"34\">{}</text>",
            xml_escape(line)
        );
    }
    // The time axis: grid lines, every tenth one strong, labelled as chosen above.
    let rows_bottom = TOP + ROW * steps.len() as u64;
    let mut t = 0;
    let mut i = 0u64;
    while t <= end_us {
        let strong = i % 10 == 0;
        let _ = writeln!(
            out,
            "<line x1=\"{0:.1}\" y1=\"{1}\" x2=\"{0:.1}\" y2=\"{rows_bottom}\" stroke=\"{2}\" stroke-width=\"1\"/>",
            x(t),
            TOP - 6,
            if strong { "#bbbbbb" } else { "#eeeeee" }
        );
        if i % label_every == 0 {
            let _ = writeln!(
                out,
                "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\" fill=\"#555555\">{:.1}s</text>",
                x(t),
                TOP - 10,
                t as f64 / 1e6
            );
        }
        t += tick_us;
        i += 1;
    }
    for (row, s) in steps.iter().enumerate() {
        let y = TOP + ROW * row as u64;
        let fill = match s.kind {
            StepKind::Kernel => "#c8c8c8",
            StepKind::Stage1 => "#7aa6d8",
            StepKind::Stage2 => "#4a78b8",
            StepKind::Background => "#b9b1d8",
            StepKind::Service { .. } => "#8fcf8f",
        };
        let (x0, x1) = (x(s.start_us), x(s.end_us).max(x(s.start_us) + 1.0));
        let _ = writeln!(
            out,
            "<rect x=\"{x0:.1}\" y=\"{}\" width=\"{:.1}\" height=\"{}\" fill=\"{fill}\"><title>{}</title></rect>",
            y + 2,
            x1 - x0,
            ROW - 4,
            xml_escape(&format!("{} @{} +{}", s.name, human(s.start_us), human(s.duration_us())))
        );
        // The container's start (creating → running) in a darker shade.
        if let StepKind::Service {
            started_us: Some(st),
        } = s.kind
        {
            let _ = writeln!(
                out,
                "<rect x=\"{x0:.1}\" y=\"{}\" width=\"{:.1}\" height=\"{}\" fill=\"#e0a040\"/>",
                y + 2,
                (x(st.min(s.end_us)) - x0).max(0.0),
                ROW - 4
            );
        }
        let _ = writeln!(
            out,
            "<text x=\"{:.1}\" y=\"{}\">{} ({})</text>",
            x1 + 4.0,
            y + ROW - 5,
            xml_escape(&s.name),
            human(s.duration_us())
        );
    }
    for (at, what, colour) in [
        (boot.boot_complete_us(), "boot complete", "#cc3333"),
        (boot.all_ready_us, "all services ready", "#228822"),
    ] {
        if let Some(at) = at {
            let _ = writeln!(
                out,
                "<line x1=\"{0:.1}\" y1=\"{1}\" x2=\"{0:.1}\" y2=\"{2}\" stroke=\"{colour}\" stroke-width=\"2\"/>\n<text x=\"{0:.1}\" y=\"{3}\" fill=\"{colour}\" text-anchor=\"middle\">{what} @{4}</text>",
                x(at),
                TOP - 4,
                rows_bottom + 4,
                rows_bottom + 18,
                human(at)
            );
        }
    }
    let _ = writeln!(
        out,
        "<text x=\"{LEFT}\" y=\"{}\" fill=\"#555555\">kernel · init stage 1 · init stage 2 · init background · service: container start (orange), then until ready (green); {:.0} px = 1 s</text>",
        rows_bottom + 34,
        plot_w / (end_us as f64 / 1e6)
    );
    out.push_str("</svg>\n");
    out
}

/// CLOCK_BOOTTIME in microseconds: the clock init's stamps use.
pub fn boottime_us() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid timespec to write; the clock id is a constant.
    if unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) } != 0 {
        return 0;
    }
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000
        + u64::try_from(ts.tv_nsec).unwrap_or(0) / 1000
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A real direct boot's init lines (main, QEMU TCG), trimmed.
    const LOG: &str = "\
[    1.383000] keelson-init: stage1: start
[    1.770000] keelson-init: stage1: modules loaded (18 modules in 387 ms)
[    1.790000] keelson-init: stage1: boot disk /dev/vda
[    1.850000] keelson-init: stage1: root verified by dm-verity
[    1.855000] keelson-init: data: clean
[    1.863000] keelson-init: stage1: switching root
[    1.940000] keelson-init: stage2: start
[    1.990000] keelson-init: boot #2
[    2.002000] keelson-init: stage2: sysd started (pid 120)
[    2.388000] keelson-init: modules: 24 from the root loaded in 382 ms
[    2.405000] keelson-init: boot complete in 2.405 s since kernel start (init rss 1200 KiB)
";

    fn boot() -> Boot {
        let mut b = Boot {
            init: parse_init_log(LOG).unwrap(),
            now_us: 3_000_000,
            all_ready_us: Some(2_600_000),
            ..Boot::default()
        };
        let svc = |name: &str, after: &[&str], s: u64, st: u64, r: u64| ServiceBoot {
            name: name.into(),
            after: after.iter().map(|a| a.to_string()).collect(),
            starting_us: Some(s),
            started_us: Some(st),
            ready_us: Some(r),
            state: Some(State::Running),
        };
        b.services = vec![
            svc("db", &[], 2_010_000, 2_100_000, 2_300_000),
            svc("web", &["db", "cache"], 2_310_000, 2_400_000, 2_600_000),
            svc("cache", &[], 2_010_000, 2_050_000, 2_060_000),
        ];
        b
    }

    #[test]
    fn parses_stamps_and_refuses_what_is_not_init() {
        let marks = parse_init_log(LOG).unwrap();
        assert_eq!(marks.len(), 11);
        assert_eq!(marks[0].at_us, 1_383_000);
        assert_eq!(marks[0].message, "stage1: start");
        // Fractions of other lengths scale to micros.
        let m = parse_init_log("[5.5] keelson-init: x\n[ 7.123456789] keelson-init: y\n").unwrap();
        assert_eq!((m[0].at_us, m[1].at_us), (5_500_000, 7_123_456));
        let e = parse_init_log("[    1.0] keelson-init: a\n[ 2.0] sysd: b\n").unwrap_err();
        assert_eq!(e.line, 2);
        assert!(e.to_string().contains("not a keelson-init line"), "{e}");
        let e = parse_init_log("garbage\n").unwrap_err();
        assert!(
            e.to_string().starts_with("line 1: no [seconds] stamp"),
            "{e}"
        );
        assert!(parse_init_log("[x.1] keelson-init: a\n").is_err());
        // A last line cut short (no newline) is left out, not an error.
        let m = parse_init_log("[1.000000] keelson-init: a\n[2.00").unwrap();
        assert_eq!(m.len(), 1);
        assert_eq!(parse_init_log("").unwrap(), vec![]);
    }

    #[test]
    fn init_steps_follow_the_main_line_and_keep_background_work_aside() {
        let steps = boot().init_steps();
        assert_eq!(steps[0].kind, StepKind::Kernel);
        assert_eq!((steps[0].start_us, steps[0].end_us), (0, 1_383_000));
        assert_eq!(
            steps[1].name,
            "stage1: modules loaded (18 modules in 387 ms)"
        );
        assert_eq!(
            (steps[1].duration_us(), steps[1].kind),
            (387_000, StepKind::Stage1)
        );
        let s2 = steps.iter().find(|s| s.name == "stage2: start").unwrap();
        assert_eq!((s2.start_us, s2.kind), (1_863_000, StepKind::Stage2));
        let bg = steps
            .iter()
            .find(|s| s.kind == StepKind::Background)
            .unwrap();
        assert_eq!((bg.start_us, bg.end_us), (2_006_000, 2_388_000));
        // boot complete waits from sysd's start, not from the background line.
        let done = steps.last().unwrap();
        assert!(done.name.starts_with("boot complete"));
        assert_eq!(done.start_us, 2_002_000);
        // Every main-line step begins where the previous one ended.
        let main: Vec<&Step> = steps
            .iter()
            .filter(|s| s.kind != StepKind::Background)
            .collect();
        for w in main.windows(2) {
            assert_eq!(w[0].end_us, w[1].start_us, "{} → {}", w[0].name, w[1].name);
        }
    }

    #[test]
    fn blame_orders_by_cost() {
        let text = blame(&boot());
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].contains("kernel (until stage1: start)"), "{text}");
        assert!(lines[0].trim_start().starts_with("1.383s"), "{text}");
        let pos = |what: &str| lines.iter().position(|l| l.contains(what)).unwrap();
        assert!(pos("stage1: modules loaded") < pos("db [service]"));
        assert!(
            text.contains("web [service] (container 90ms, then ready after 200ms)"),
            "{text}"
        );
        assert!(text.contains("[init, background]"));
        assert_eq!(lines.len(), 11 + 3);
    }

    #[test]
    fn critical_chain_follows_the_dependency_ready_last() {
        let text = critical_chain(&boot());
        let lines: Vec<&str> = text.lines().skip(2).collect();
        assert_eq!(lines[0], "all services ready @2.600s");
        assert_eq!(lines[1], "└─web @2.600s +290ms");
        // db was ready after cache: web waited for db.
        assert_eq!(lines[2], "  └─db @2.300s +290ms");
        assert!(
            lines[3].contains("stage2: sysd started (pid 120) @2.002s +12ms"),
            "{text}"
        );
        assert!(lines
            .last()
            .unwrap()
            .contains("kernel (until stage1: start) @1.383s +1.383s"));
        assert!(
            !text.contains("modules: 24"),
            "background work is not on the chain"
        );
        assert!(!text.contains("cache"));
    }

    #[test]
    fn summary_and_waiting_services() {
        let mut b = boot();
        let s = summary(&b);
        assert!(s.starts_with("Boot complete after 1.383s (kernel) + 480ms (initramfs) + 542ms (userspace) = 2.405s"), "{s}");
        assert!(s.contains("All services ready after 2.600s"));
        b.services[2].ready_us = None;
        b.services[2].state = Some(State::Failed);
        assert!(summary(&b).contains("All services ready after 2.600s (failed: cache)\n"));
        b.all_ready_us = None;
        b.services[1].ready_us = None;
        b.services[1].state = Some(State::Backoff);
        let s = summary(&b);
        assert!(s.contains("waiting for web (backoff)"), "{s}");
        assert!(blame(&b).contains("web [service] (not ready yet)"));
    }

    #[test]
    fn svg_has_a_bar_per_step_and_escapes_names() {
        let mut b = boot();
        b.services[0].name = "a<b&c".into();
        let pic = svg(&b);
        assert!(pic.starts_with("<?xml"));
        assert!(pic.trim_end().ends_with("</svg>"));
        // The background, 11 init steps, 3 services and their 3 container starts.
        assert_eq!(pic.matches("<rect").count(), 1 + 11 + 3 + 3);
        assert!(pic.contains("a&lt;b&amp;c"));
        assert!(!pic.contains("a<b"));
        assert!(pic.contains("boot complete @2.405s"));
        assert!(pic.contains("all services ready @2.600s"));
        // A service applied long after boot does not stretch the picture.
        b.services.push(ServiceBoot {
            starting_us: Some(3_600_000_000),
            ready_us: Some(3_600_100_000),
            ..ServiceBoot::new("late")
        });
        let pic2 = svg(&b);
        assert!(!pic2.contains(">late ("));
        assert!(pic2.len() < pic.len() + 100);
        // A long boot (a network timeout) stays a picture of bounded width.
        b.all_ready_us = Some(95_000_000);
        let long = svg(&b);
        let width: u64 = long
            .split("width=\"")
            .nth(1)
            .unwrap()
            .split('"')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        assert!(width < 11_000, "{width}");
        assert!(long.contains(">90.0s</text>") && !long.contains(">91.0s</text>"));
    }

    #[test]
    fn console_gives_init_and_service_times() {
        let console = format!(
            "{LOG}[    2.010000]  INFO sysd: db: starting: image /usr/lib/keelson/images/base\n\
             Some kernel line\n\
             [    2.100000]  INFO sysd: db: started: pid 200\n\
             [    2.300000]  INFO sysd: db: ready: running\n\
             [    2.350000]  INFO sysd: db: ready: running\n\
             [    2.400000]  INFO sysd: admin: 1 ssh key(s) installed in /var\n\
             [    2.600000]  INFO sysd: boot-ready: all 1 services ready\n"
        );
        let b = Boot::from_console(&console);
        assert_eq!(b.init.len(), 11);
        assert_eq!(b.services.len(), 1);
        let db = &b.services[0];
        assert_eq!(
            (db.starting_us, db.started_us, db.ready_us),
            (Some(2_010_000), Some(2_100_000), Some(2_300_000))
        );
        assert_eq!(b.all_ready_us, Some(2_600_000));
        let t = timeline(&b);
        assert!(t.contains("service  db"), "{t}");
        assert!(t.contains("all services ready"));
    }

    #[test]
    fn reported_ms_reads_the_number() {
        assert_eq!(
            reported_ms("modules: 24 from the root loaded in 382 ms"),
            Some(382)
        );
        assert_eq!(
            reported_ms("stage1: modules loaded (18 modules in 387 ms)"),
            Some(387)
        );
        assert_eq!(reported_ms("random-seed: stored for the next boot"), None);
    }

    #[test]
    fn boottime_is_since_kernel_start() {
        let a = boottime_us();
        assert!(a > 0 && boottime_us() >= a);
    }
}
