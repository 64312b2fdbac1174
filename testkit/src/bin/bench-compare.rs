//! `bench-compare NEW [COMMITTED]`: the figures `./dev bench` just wrote (NEW, JSON lines)
//! beside the last committed ones (default `docs/bench/figures.jsonl`): each row's median,
//! its change and whether it got worse by more than the noise its runs measured
//! (`keelson_testkit::history`). Prints a Markdown table; exits 0 either way (a report, not a
//! gate: the machines are shared and noisy), 1 only when a file cannot be read.

use std::process::ExitCode;

use keelson_testkit::history;

fn read(path: &str, missing_ok: bool) -> Result<Vec<history::Figure>, String> {
    match std::fs::read_to_string(path) {
        Ok(text) => history::parse(&text, path),
        Err(e) if missing_ok && e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(format!("cannot read {path}: {e}")),
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (new, committed) = match args.as_slice() {
        [new] => (new.as_str(), history::COMMITTED),
        [new, committed] => (new.as_str(), committed.as_str()),
        _ => {
            eprintln!(
                "usage: bench-compare NEW_FIGURES [COMMITTED_FIGURES (default {})]",
                history::COMMITTED
            );
            return ExitCode::from(2);
        }
    };
    let (now, before) = match (read(new, false), read(committed, true)) {
        (Ok(n), Ok(b)) => (n, b),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("bench-compare: {e}");
            return ExitCode::from(1);
        }
    };
    if before.is_empty() {
        println!("No committed figures in {committed} yet: every row is new. Commit these with `cp {new} {committed}`.\n");
    }
    print!("{}", history::render(&history::compare(&before, &now)));
    println!("\nTo make these the committed figures: cp {new} {committed}");
    ExitCode::SUCCESS
}
