//! The Prometheus text exposition format, version 0.0.4
//! (<https://prometheus.io/docs/instrumenting/exposition_formats/>): one `# HELP` and one
//! `# TYPE` line per family, then its samples, all together; label values escape `\`, `"` and
//! newline, help texts `\` and newline; values are Go-style floats (`+Inf`, `-Inf`, `NaN`).

use std::fmt::Write;

/// The content type of what [`Writer`] produces.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// A metric family's type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Type {
    Counter,
    Gauge,
}

/// Builds one scrape's text. Families must not repeat (a name is written once, with all its
/// samples); [`Writer::family`] checks that in debug builds.
#[derive(Debug, Default)]
pub struct Writer {
    out: String,
    #[cfg(debug_assertions)]
    seen: std::collections::BTreeSet<String>,
}

/// One family being written: its samples follow its header.
#[derive(Debug)]
pub struct Family<'w> {
    out: &'w mut String,
    name: &'static str,
}

impl Writer {
    pub fn new() -> Writer {
        Writer::default()
    }

    /// Starts the family `name` (a valid metric name: `[a-zA-Z_:][a-zA-Z0-9_:]*`).
    pub fn family(&mut self, name: &'static str, kind: Type, help: &str) -> Family<'_> {
        debug_assert!(valid_name(name), "{name} is not a metric name");
        #[cfg(debug_assertions)]
        debug_assert!(self.seen.insert(name.to_string()), "{name} written twice");
        let kind = match kind {
            Type::Counter => "counter",
            Type::Gauge => "gauge",
        };
        let _ = writeln!(self.out, "# HELP {name} {}", escape_help(help));
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
        Family {
            out: &mut self.out,
            name,
        }
    }

    pub fn finish(self) -> String {
        self.out
    }
}

impl Family<'_> {
    /// One sample; label names must be valid (`[a-zA-Z_][a-zA-Z0-9_]*`), values are escaped.
    pub fn sample(&mut self, labels: &[(&str, &str)], value: f64) -> &mut Self {
        self.out.push_str(self.name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                debug_assert!(valid_label(k), "{k} is not a label name");
                if i > 0 {
                    self.out.push(',');
                }
                self.out.push_str(k);
                self.out.push_str("=\"");
                escape_value(self.out, v);
                self.out.push('"');
            }
            self.out.push('}');
        }
        self.out.push(' ');
        format_value(self.out, value);
        self.out.push('\n');
        self
    }
}

fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn valid_label(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !name.starts_with("__")
}

fn escape_help(help: &str) -> String {
    help.replace('\\', "\\\\").replace('\n', "\\n")
}

fn escape_value(out: &mut String, v: &str) {
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

fn format_value(out: &mut String, v: f64) {
    if v.is_nan() {
        out.push_str("NaN");
    } else if v.is_infinite() {
        out.push_str(if v > 0.0 { "+Inf" } else { "-Inf" });
    } else if v.fract() == 0.0 && v.abs() < 1e15 {
        // Integers (most counters and byte counts) without a trailing ".0" or an exponent.
        let _ = write!(out, "{}", v as i64);
    } else {
        let _ = write!(out, "{v}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_samples_and_escaping() {
        let mut w = Writer::new();
        w.family("node_time_seconds", Type::Gauge, "Clock \\ time\nnow.")
            .sample(&[], 1_700_000_000.25);
        w.family("container_processes", Type::Gauge, "Processes.")
            .sample(&[("name", "we\"b\\\n")], 3.0)
            .sample(&[("name", "db"), ("id", "/keelson/db")], 0.0);
        w.family("x_total", Type::Counter, "X.")
            .sample(&[], f64::INFINITY)
            .sample(&[("a", "b")], f64::NAN)
            .sample(&[("a", "c")], -2.5e20);
        assert_eq!(
            w.finish(),
            "# HELP node_time_seconds Clock \\\\ time\\nnow.\n\
             # TYPE node_time_seconds gauge\n\
             node_time_seconds 1700000000.25\n\
             # HELP container_processes Processes.\n\
             # TYPE container_processes gauge\n\
             container_processes{name=\"we\\\"b\\\\\\n\"} 3\n\
             container_processes{name=\"db\",id=\"/keelson/db\"} 0\n\
             # HELP x_total X.\n\
             # TYPE x_total counter\n\
             x_total +Inf\n\
             x_total{a=\"b\"} NaN\n\
             x_total{a=\"c\"} -250000000000000000000\n"
        );
    }

    #[test]
    fn names() {
        assert!(valid_name("node_cpu_seconds_total") && valid_name("a:b"));
        assert!(!valid_name("9x") && !valid_name("a-b") && !valid_name(""));
        assert!(valid_label("name") && !valid_label("__name__") && !valid_label("a:b"));
    }
}
