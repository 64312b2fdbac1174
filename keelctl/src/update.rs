//! `keelctl update check|apply|status|rollback|cancel`: the update agent's API
//! (`/v1/update/*`, docs/api.md).

use std::io::Write;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use clap::Subcommand;
use keelson_common::api::update::{Phase, UpdateCheck, UpdateStatus};

use crate::http::{encode_segment, Client};
use crate::render;

#[derive(Debug, Subcommand)]
pub enum UpdateCommand {
    /// Refresh the signed repository metadata and show the versions offered to this node.
    Check,
    /// Install the newest eligible version (or --version) into the inactive slot.
    Apply {
        /// A specific version.
        #[arg(long)]
        version: Option<String>,
        /// Allow a downgrade (and ignore rollout waves and max_version).
        #[arg(long)]
        force: bool,
        /// Reboot into the new slot once it is verified and installed.
        #[arg(long)]
        reboot: bool,
        /// Return at once instead of following the install to its end.
        #[arg(long)]
        no_wait: bool,
    },
    /// The running version and slot, the boot assessment, an update in progress or staged.
    Status,
    /// Boot the other slot (the previous version) on purpose.
    Rollback {
        /// Reboot now.
        #[arg(long)]
        reboot: bool,
    },
    /// Stop an install in progress, or discard a staged version.
    Cancel,
}

pub fn run(client: &Client, cmd: &UpdateCommand, json: bool, out: &mut impl Write) -> Result<()> {
    match cmd {
        UpdateCommand::Check => {
            let body = client.send("POST", "/v1/update/check", None)?.text()?;
            if json {
                return crate::print_raw(out, &body);
            }
            let c: UpdateCheck = crate::parse(&body)?;
            write!(out, "{}", show_check(&c))?;
        }
        UpdateCommand::Apply {
            version,
            force,
            reboot,
            no_wait,
        } => {
            let mut query = Vec::new();
            if let Some(v) = version {
                query.push(format!("version={}", encode_segment(v)));
            }
            if *force {
                query.push("force=1".into());
            }
            if *reboot {
                query.push("reboot=1".into());
            }
            let path = if query.is_empty() {
                "/v1/update/apply".to_string()
            } else {
                format!("/v1/update/apply?{}", query.join("&"))
            };
            let body = client.send("POST", &path, None)?.text()?;
            if *no_wait {
                return if json {
                    crate::print_raw(out, &body)
                } else {
                    let s: UpdateStatus = crate::parse(&body)?;
                    write!(out, "{}", show(&s))?;
                    Ok(())
                };
            }
            follow(client, json, *reboot, out)?;
        }
        UpdateCommand::Status => {
            let body = client.get("/v1/update/status")?;
            if json {
                return crate::print_raw(out, &body);
            }
            let s: UpdateStatus = crate::parse(&body)?;
            write!(out, "{}", show(&s))?;
        }
        UpdateCommand::Rollback { reboot } => {
            let path = if *reboot {
                "/v1/update/rollback?reboot=1"
            } else {
                "/v1/update/rollback"
            };
            let body = client.send("POST", path, None)?.text()?;
            if json {
                return crate::print_raw(out, &body);
            }
            let s: UpdateStatus = crate::parse(&body)?;
            write!(out, "{}", show(&s))?;
            if !reboot {
                writeln!(out, "the other slot boots next (reboot to switch)")?;
            }
        }
        UpdateCommand::Cancel => {
            let body = client.send("POST", "/v1/update/cancel", None)?.text()?;
            if json {
                return crate::print_raw(out, &body);
            }
            let s: UpdateStatus = crate::parse(&body)?;
            write!(out, "{}", show(&s))?;
        }
    }
    Ok(())
}

/// Polls the status until the install ends; progress lines on the way.
fn follow(client: &Client, json: bool, reboot: bool, out: &mut impl Write) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(3600);
    let mut last = String::new();
    loop {
        let body = match client.get("/v1/update/status") {
            Ok(b) => b,
            // The node is going down for the reboot we asked for.
            Err(_) if reboot => {
                writeln!(out, "rebooting")?;
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        let s: UpdateStatus = crate::parse(&body)?;
        let line = match s.progress {
            Some(p)
                if matches!(
                    s.phase,
                    Phase::Downloading | Phase::Verifying | Phase::Installing
                ) =>
            {
                format!(
                    "{}: {} of {} downloaded, {} written",
                    s.phase.as_str(),
                    render::size(p.downloaded),
                    render::size(p.download_total),
                    render::size(p.written)
                )
            }
            _ => s.phase.as_str().to_string(),
        };
        if line != last && !json {
            writeln!(out, "{line}")?;
            out.flush()?;
            last = line;
        }
        match s.phase {
            Phase::Staged | Phase::Rebooting => {
                if json {
                    return crate::print_raw(out, &body);
                }
                writeln!(
                    out,
                    "staged {} in slot {}",
                    s.staged.as_deref().unwrap_or("?"),
                    other(&s.slot)
                )?;
                return Ok(());
            }
            Phase::Idle => {
                if json {
                    crate::print_raw(out, &body)?;
                }
                match s.last_error {
                    Some(e) => bail!("update failed: {e}"),
                    None => return Ok(()),
                }
            }
            _ => {}
        }
        if Instant::now() > deadline {
            bail!(
                "the update did not finish within an hour (still {})",
                s.phase.as_str()
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn other(slot: &str) -> &'static str {
    if slot == "a" {
        "b"
    } else {
        "a"
    }
}

fn show(s: &UpdateStatus) -> String {
    let mut t = String::new();
    let mut line = |k: &str, v: String| t.push_str(&format!("{k:<18}{v}\n"));
    line("version:", s.version.clone());
    line("slot:", s.slot.clone());
    line(
        "boot entry:",
        format!(
            "{} ({})",
            s.boot_entry.as_deref().unwrap_or("-"),
            s.assessment
        ),
    );
    line("phase:", s.phase.as_str().to_string());
    if let Some(p) = s.progress {
        line(
            "progress:",
            format!(
                "{} of {} downloaded, {} written",
                render::size(p.downloaded),
                render::size(p.download_total),
                render::size(p.written)
            ),
        );
    }
    if let Some(v) = &s.staged {
        line(
            "staged:",
            format!("{v} (slot {}, boots next)", other(&s.slot)),
        );
    }
    if let Some(v) = &s.last_good {
        line("last good:", v.clone());
    }
    if let Some(v) = &s.rolled_back_from {
        line("rolled back from:", v.clone());
    }
    if let Some(e) = &s.last_error {
        line("last error:", e.clone());
    }
    line(
        "policy:",
        format!(
            "{} ({})",
            s.policy,
            s.repository
                .as_deref()
                .unwrap_or("no repository configured")
        ),
    );
    if let Some(c) = &s.coordination {
        line(
            "reboot slots:",
            format!(
                "{} of group {:?}, {} at a time (this node: {})",
                c.strategy, c.group, c.holders, c.node
            ),
        );
        let none = || "nobody".to_string();
        line(
            "  held by:",
            if c.held_by.is_empty() {
                none()
            } else {
                c.held_by.join(", ")
            },
        );
        line(
            "  waiting:",
            if c.waiting.is_empty() {
                none()
            } else {
                c.waiting.join(", ")
            },
        );
        if let Some(h) = &c.halted {
            line("  halted:", format!("rollout of {h}"));
        }
        if let Some(e) = &c.error {
            line("  etcd:", format!("{e} (as of {})", c.seen_at));
        }
    }
    t
}

/// `keelctl update check`: every version with its full and delta download sizes and verdict,
/// then why a version would come whole when it would.
fn show_check(c: &UpdateCheck) -> String {
    let mut t = format!("running {}\n", c.current);
    let rows: Vec<Vec<String>> = c
        .versions
        .iter()
        .map(|v| {
            let delta = match (&v.delta_size, &v.delta_note) {
                (Some(d), None) => render::size(*d),
                (Some(d), Some(_)) => format!("({}: not used)", render::size(*d)),
                (None, _) => "-".into(),
            };
            vec![
                v.version.clone(),
                render::size(v.download_size),
                delta,
                v.verdict.clone(),
            ]
        })
        .collect();
    if !rows.is_empty() {
        t.push_str(&render::table(
            &["VERSION", "DOWNLOAD", "DELTA", "VERDICT"],
            &rows,
        ));
    }
    for v in &c.versions {
        if let Some(n) = &v.delta_note {
            t.push_str(&format!("{}: no delta: {n}\n", v.version));
        }
    }
    match &c.available {
        Some(v) => t.push_str(&format!("available: {v} (keelctl update apply)\n")),
        None => t.push_str("no update available\n"),
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;
    use keelson_common::api::update::Coordination;

    #[test]
    fn status_shows_the_reboot_semaphore() {
        let s = UpdateStatus {
            version: "0.1.0".into(),
            slot: "a".into(),
            boot_entry: None,
            assessment: "good".into(),
            phase: Phase::WaitingForSlot,
            progress: None,
            staged: Some("0.2.0".into()),
            last_good: None,
            rolled_back_from: None,
            last_error: None,
            policy: "automatic".into(),
            repository: Some("http://r/".into()),
            coordination: Some(Coordination {
                strategy: "etcd-lock".into(),
                group: "default".into(),
                holders: 1,
                node: "node2".into(),
                held_by: vec!["node1 (0.2.0, since 2026-12-06T04:00:00Z)".into()],
                waiting: vec!["node2".into(), "node3".into()],
                halted: Some("0.2.0 by node1: it did not come up healthy".into()),
                error: None,
                seen_at: "2026-12-06T04:01:00Z".into(),
            }),
        };
        let t = show(&s);
        assert!(t.contains("phase:            waiting-for-slot\n"), "{t}");
        assert!(
            t.contains("  held by:        node1 (0.2.0, since 2026-12-06T04:00:00Z)\n"),
            "{t}"
        );
        assert!(t.contains("  waiting:        node2, node3\n"), "{t}");
        assert!(
            t.contains("  halted:         rollout of 0.2.0 by node1: it did not come up healthy\n"),
            "{t}"
        );
    }

    #[test]
    fn check_shows_full_and_delta_sizes() {
        let v = |version: &str, delta: Option<u64>, note: Option<&str>, verdict: &str| {
            keelson_common::api::update::OfferedVersion {
                version: version.into(),
                download_size: 13 << 20,
                delta_size: delta,
                delta_note: note.map(str::to_owned),
                verdict: verdict.into(),
            }
        };
        let c = UpdateCheck {
            current: "0.1.0".into(),
            available: Some("0.3.0".into()),
            versions: vec![
                v("0.3.0", Some(900 << 10), None, "eligible"),
                v(
                    "0.2.0",
                    Some(12 << 20),
                    Some("above update.delta_max_percent (70%)"),
                    "eligible",
                ),
                v("0.1.0", None, None, "running"),
            ],
        };
        let t = show_check(&c);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines[0], "running 0.1.0");
        assert!(
            lines[1].starts_with("VERSION") && lines[1].contains("DELTA"),
            "{t}"
        );
        let row = |v: &str| {
            lines
                .iter()
                .find(|l| l.starts_with(v))
                .unwrap()
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ")
        };
        assert_eq!(row("0.3.0 "), "0.3.0 13M 900K eligible");
        assert_eq!(row("0.2.0 "), "0.2.0 13M (12M: not used) eligible");
        assert_eq!(row("0.1.0 "), "0.1.0 13M - running");
        assert!(
            t.contains("0.2.0: no delta: above update.delta_max_percent (70%)\n"),
            "{t}"
        );
        assert!(
            t.ends_with("available: 0.3.0 (keelctl update apply)\n"),
            "{t}"
        );
    }
}
