//! `keelctl config show` and `keelctl firstboot`: the effective config with where each part
//! came from, and what first boot did.

use std::fmt::Write as _;

use keelson_common::api::config::ConfigView;
use keelson_common::api::firstboot::{FirstBoot, Outcome};
use keelson_common::api::format_time_ms;

/// The layers, lowest first, then the merged TOML (which carries its own provenance comments).
pub fn show(view: &ConfigView) -> String {
    let mut out =
        String::from("# Layers, lowest first (a later one replaces what it redefines):\n");
    for l in &view.layers {
        let _ = writeln!(
            out,
            "#   {:<10} {}{}",
            l.name,
            l.path,
            if l.present { "" } else { " (none)" }
        );
    }
    out.push_str(&view.toml);
    out
}

pub fn firstboot(fb: &FirstBoot) -> String {
    let mut out = String::new();
    let what = match fb.outcome {
        Outcome::NoUserData => "no user data found",
        Outcome::Applied => "user data applied at this boot",
        Outcome::AlreadyApplied => "instance already configured at an earlier boot",
        Outcome::Rejected => "user data REJECTED: nothing applied, the last good config runs",
    };
    let _ = writeln!(out, "outcome:     {what} ({} ms)", fb.duration_ms);
    let field = |out: &mut String, name: &str, v: &Option<String>| {
        if let Some(v) = v {
            let _ = writeln!(out, "{name:<12} {v}");
        }
    };
    field(&mut out, "source:", &fb.source);
    field(&mut out, "instance:", &fb.instance_id);
    field(&mut out, "format:", &fb.format);
    field(&mut out, "applied:", &fb.applied_at_ms.map(format_time_ms));
    field(&mut out, "error:", &fb.error);
    for w in &fb.warnings {
        let _ = writeln!(out, "warning:     {w}");
    }
    out.push_str("datasources:\n");
    for line in &fb.probe_log {
        let _ = writeln!(out, "  {line}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejected_report_leads_with_the_error() {
        let fb = FirstBoot {
            outcome: Outcome::Rejected,
            source: Some("fw_cfg".into()),
            instance_id: Some("i-1".into()),
            format: None,
            error: Some("fw_cfg: user-data:3:1: hostname: ...".into()),
            warnings: vec!["w".into()],
            probe_log: vec!["fw_cfg: opt/keelson/user-data (10 bytes)".into()],
            duration_ms: 4,
            applied_at_ms: None,
        };
        let text = firstboot(&fb);
        assert!(
            text.starts_with("outcome:     user data REJECTED"),
            "{text}"
        );
        assert!(
            text.contains("error:       fw_cfg: user-data:3:1"),
            "{text}"
        );
        assert!(text.contains("warning:     w\n"), "{text}");
        assert!(text.ends_with("datasources:\n  fw_cfg: opt/keelson/user-data (10 bytes)\n"));
    }
}
