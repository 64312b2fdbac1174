//! The benchmark history. Each benchmark records its figures (min and median of its repeat
//! runs) with [`record`] into the file `$KEELSON_BENCH_FIGURES` names (`./dev bench` sets it to
//! `out/bench/figures.jsonl`), one JSON object per line; [`compare`] puts them beside the last
//! figures committed in the repo ([`COMMITTED`]) and marks each row worse, better or within the
//! noise its runs measured; `bench-compare` prints that table.
//!
//! The noise of a figure is the spread its runs showed (median − min): a row is worse only when
//! its median moved the wrong way by more than the larger spread of the two sets of runs. A
//! figure measured once (a size) has no spread: any change shows.

use std::fmt::Write as _;
use std::io::Write as _;

use serde_json::{json, Value};

/// The environment variable naming the file [`record`] appends to.
pub const ENV: &str = "KEELSON_BENCH_FIGURES";

/// The committed figures, relative to the workspace root.
pub const COMMITTED: &str = "docs/bench/figures.jsonl";

/// One figure of one benchmark run.
#[derive(Debug, Clone, PartialEq)]
pub struct Figure {
    /// The benchmark binary (`bench-boot`).
    pub bench: String,
    /// The row, as its table names it.
    pub name: String,
    /// `s`, `ms`, `MiB`, `x` (a ratio to a peer in the same run), …
    pub unit: String,
    /// Whether a smaller number is the better one (times, sizes) or a larger one (throughput).
    pub lower_is_better: bool,
    pub runs: usize,
    pub min: f64,
    pub median: f64,
}

impl Figure {
    /// A figure from its runs' samples; `None` without samples or with one that is no number.
    pub fn from_samples(
        bench: &str,
        name: &str,
        unit: &str,
        lower_is_better: bool,
        samples: &[f64],
    ) -> Option<Figure> {
        if samples.iter().any(|s| !s.is_finite()) {
            return None;
        }
        Some(Figure {
            bench: bench.into(),
            name: name.into(),
            unit: unit.into(),
            lower_is_better,
            runs: samples.len(),
            min: samples.iter().copied().reduce(f64::min)?,
            median: crate::stats::median(samples)?,
        })
    }

    /// What identifies the row across runs.
    pub fn key(&self) -> String {
        format!("{}: {}", self.bench, self.name)
    }

    /// The spread its runs showed.
    pub fn noise(&self) -> f64 {
        (self.median - self.min).abs()
    }

    pub fn to_json(&self) -> Value {
        json!({
            "bench": self.bench,
            "name": self.name,
            "unit": self.unit,
            "better": if self.lower_is_better { "lower" } else { "higher" },
            "runs": self.runs,
            "min": self.min,
            "median": self.median,
        })
    }

    fn from_json(v: &Value) -> Result<Figure, String> {
        let text = |k: &str| {
            v.get(k)
                .and_then(Value::as_str)
                .map(str::to_string)
                .ok_or_else(|| format!("no text field {k:?}"))
        };
        let number = |k: &str| {
            v.get(k)
                .and_then(Value::as_f64)
                .ok_or_else(|| format!("no number field {k:?}"))
        };
        let lower_is_better = match text("better")?.as_str() {
            "lower" => true,
            "higher" => false,
            other => {
                return Err(format!(
                    "\"better\" is {other:?}, not \"lower\" or \"higher\""
                ))
            }
        };
        let runs = v
            .get("runs")
            .and_then(Value::as_u64)
            .ok_or("no whole number field \"runs\"")?;
        Ok(Figure {
            bench: text("bench")?,
            name: text("name")?,
            unit: text("unit")?,
            lower_is_better,
            runs: usize::try_from(runs).map_err(|_| "\"runs\" is too large")?,
            min: number("min")?,
            median: number("median")?,
        })
    }
}

/// Appends `figure` to the file `$KEELSON_BENCH_FIGURES` names; without it, nothing (a
/// benchmark run by hand only prints its tables).
pub fn record(figure: Option<Figure>) -> std::io::Result<()> {
    let (Some(path), Some(figure)) = (std::env::var_os(ENV), figure) else {
        return Ok(());
    };
    let path = std::path::PathBuf::from(path);
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)?;
    // One write per line: benchmarks may record concurrently.
    file.write_all(format!("{}\n", figure.to_json()).as_bytes())
}

/// Reads a figures file; `origin` names it in errors, with the line.
pub fn parse(text: &str, origin: &str) -> Result<Vec<Figure>, String> {
    let mut figures = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let value: Value =
            serde_json::from_str(line).map_err(|e| format!("{origin}:{}: {e}", i + 1))?;
        figures.push(Figure::from_json(&value).map_err(|e| format!("{origin}:{}: {e}", i + 1))?);
    }
    Ok(figures)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Moved the wrong way by more than the noise.
    Worse,
    /// Moved the right way by more than the noise.
    Better,
    /// Within the noise.
    Same,
    /// Not in the committed figures (or its unit changed).
    New,
    /// Committed, not measured this time.
    Gone,
}

/// One row of the comparison.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub key: String,
    pub committed: Option<Figure>,
    pub now: Option<Figure>,
    pub verdict: Verdict,
}

impl Row {
    /// The median's change in percent of the committed one.
    pub fn change_pct(&self) -> Option<f64> {
        let (old, new) = (self.committed.as_ref()?, self.now.as_ref()?);
        (old.median != 0.0).then(|| (new.median - old.median) / old.median.abs() * 100.0)
    }
}

/// The rows of `now` (in its order, the last of a repeated key counting) beside `committed`,
/// then the committed rows not measured now.
pub fn compare(committed: &[Figure], now: &[Figure]) -> Vec<Row> {
    let mut keys: Vec<String> = Vec::new();
    for f in now {
        if !keys.contains(&f.key()) {
            keys.push(f.key());
        }
    }
    let last = |set: &[Figure], key: &str| set.iter().rev().find(|f| f.key() == key).cloned();
    let mut rows: Vec<Row> = keys
        .iter()
        .map(|key| {
            let new = last(now, key);
            let old =
                last(committed, key).filter(|o| new.as_ref().is_some_and(|n| n.unit == o.unit));
            let verdict = match (&old, &new) {
                (Some(o), Some(n)) => {
                    let noise = o.noise().max(n.noise());
                    let worse_by = if n.lower_is_better {
                        n.median - o.median
                    } else {
                        o.median - n.median
                    };
                    if worse_by > noise {
                        Verdict::Worse
                    } else if -worse_by > noise {
                        Verdict::Better
                    } else {
                        Verdict::Same
                    }
                }
                _ => Verdict::New,
            };
            Row {
                key: key.clone(),
                committed: old,
                now: new,
                verdict,
            }
        })
        .collect();
    for f in committed {
        if !keys.contains(&f.key()) {
            keys.push(f.key());
            rows.push(Row {
                key: f.key(),
                committed: last(committed, &f.key()),
                now: None,
                verdict: Verdict::Gone,
            });
        }
    }
    rows
}

fn figure_cell(f: &Option<Figure>) -> String {
    match f {
        Some(f) => format!(
            "{:.4} {} (min {:.4}, {} runs)",
            f.median, f.unit, f.min, f.runs
        ),
        None => "-".into(),
    }
}

/// The comparison as a Markdown table, then a line counting the rows that got worse.
pub fn render(rows: &[Row]) -> String {
    let mut out = String::from(
        "| figure | committed median | now median | change | noise (median − min, larger of the two) | verdict |\n|---|---|---|---|---|---|\n",
    );
    for r in rows {
        let change = r
            .change_pct()
            .map(|c| format!("{c:+.1}%"))
            .unwrap_or_else(|| "-".into());
        let noise = match (&r.committed, &r.now) {
            (Some(o), Some(n)) => format!("{:.4}", o.noise().max(n.noise())),
            _ => "-".into(),
        };
        let verdict = match r.verdict {
            Verdict::Worse => "**WORSE**",
            Verdict::Better => "better",
            Verdict::Same => "within noise",
            Verdict::New => "new",
            Verdict::Gone => "not measured",
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {change} | {noise} | {verdict} |",
            r.key,
            figure_cell(&r.committed),
            figure_cell(&r.now)
        );
    }
    let worse = rows.iter().filter(|r| r.verdict == Verdict::Worse).count();
    let _ = writeln!(
        out,
        "\n{worse} of {} figures worse than the committed ones by more than their noise.",
        rows.len()
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fig(name: &str, lower: bool, samples: &[f64]) -> Figure {
        Figure::from_samples("bench-x", name, "s", lower, samples).unwrap()
    }

    #[test]
    fn min_median_and_noise() {
        let f = fig("a", true, &[1.2, 1.0, 1.1]);
        assert_eq!((f.runs, f.min, f.median), (3, 1.0, 1.1));
        assert!((f.noise() - 0.1).abs() < 1e-9);
        assert!(Figure::from_samples("b", "n", "s", true, &[]).is_none());
        assert!(Figure::from_samples("b", "n", "s", true, &[f64::NAN]).is_none());
    }

    #[test]
    fn worse_only_beyond_the_noise_either_way() {
        let committed = vec![
            fig("boot", true, &[1.0, 1.1, 1.2]), // median 1.1, noise 0.1
            fig("pull", true, &[2.0, 2.0, 2.0]), // no noise
            fig("rate", false, &[100.0, 110.0, 120.0]), // higher is better
            fig("size", true, &[40.0]),
            fig("old", true, &[1.0]),
        ];
        let now = vec![
            fig("boot", true, &[1.1, 1.15, 1.2]),       // +0.05 < 0.1: same
            fig("pull", true, &[2.3, 2.5, 2.6]),        // +0.5 > 0.2: worse
            fig("rate", false, &[130.0, 140.0, 150.0]), // +30 > 10: better
            fig("size", true, &[39.0]),                 // -1, no noise: better
            fig("new", true, &[5.0]),
        ];
        let rows = compare(&committed, &now);
        let verdict = |k: &str| {
            rows.iter()
                .find(|r| r.key == format!("bench-x: {k}"))
                .unwrap()
                .verdict
        };
        assert_eq!(verdict("boot"), Verdict::Same);
        assert_eq!(verdict("pull"), Verdict::Worse);
        assert_eq!(verdict("rate"), Verdict::Better);
        assert_eq!(verdict("size"), Verdict::Better);
        assert_eq!(verdict("new"), Verdict::New);
        assert_eq!(verdict("old"), Verdict::Gone);
        // A lower rate is worse.
        let slower = compare(&committed, &[fig("rate", false, &[90.0, 95.0, 100.0])]);
        assert_eq!(slower[0].verdict, Verdict::Worse);
        let pull = rows.iter().find(|r| r.key.ends_with("pull")).unwrap();
        assert!((pull.change_pct().unwrap() - 25.0).abs() < 1e-9);
        let table = render(&rows);
        assert!(table.contains("| bench-x: pull | 2.0000 s (min 2.0000, 3 runs) | 2.5000 s (min 2.3000, 3 runs) | +25.0% | 0.2000 | **WORSE** |"), "{table}");
        assert!(table.contains("1 of 6 figures worse"), "{table}");
    }

    #[test]
    fn a_changed_unit_is_a_new_row() {
        let mut old = fig("boot", true, &[1.0]);
        old.unit = "ms".into();
        let rows = compare(&[old], &[fig("boot", true, &[5.0])]);
        assert_eq!(rows[0].verdict, Verdict::New);
        assert_eq!(rows[0].committed, None);
    }

    #[test]
    fn file_round_trip_and_errors_name_the_line() {
        let figures = vec![fig("a", true, &[1.0, 2.0]), fig("b", false, &[3.0])];
        let text: String = figures
            .iter()
            .map(|f| format!("{}\n", f.to_json()))
            .collect();
        assert_eq!(parse(&text, "f").unwrap(), figures);
        let bad = format!("{text}\n{{\"bench\":\"x\"}}\n");
        let e = parse(&bad, "docs/bench/figures.jsonl").unwrap_err();
        assert!(
            e.starts_with("docs/bench/figures.jsonl:4: no text field"),
            "{e}"
        );
        let e = parse("{\"bench\":\"x\",\"name\":\"n\",\"unit\":\"s\",\"better\":\"up\",\"runs\":1,\"min\":1,\"median\":1}", "f").unwrap_err();
        assert!(e.contains("\"better\" is \"up\""), "{e}");
        assert!(parse("not json", "f").unwrap_err().starts_with("f:1: "));
    }

    #[test]
    fn record_appends_where_the_environment_says() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out/figures.jsonl");
        // SAFETY: no other test of this crate reads or writes this variable.
        unsafe { std::env::set_var(ENV, &path) };
        record(Some(fig("a", true, &[1.0]))).unwrap();
        record(Some(fig("b", true, &[2.0]))).unwrap();
        record(None).unwrap();
        // SAFETY: as above.
        unsafe { std::env::remove_var(ENV) };
        let got = parse(&std::fs::read_to_string(&path).unwrap(), "f").unwrap();
        assert_eq!(
            got.iter().map(|f| f.name.as_str()).collect::<Vec<_>>(),
            ["a", "b"]
        );
    }
}
