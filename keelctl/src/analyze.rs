//! `keelctl analyze`: where this boot's time went, from `GET /v1/boot` (init's stamped steps
//! and the services' start-up from sysd's events), as `systemd-analyze` shows it: the summary,
//! `blame`, `critical-chain`, `timeline` and `plot` (an SVG picture on standard output).

use std::io::Write;

use anyhow::Result;
use clap::Subcommand;
use keelson_common::api::boot::{self, Boot};

use crate::http::Client;

#[derive(Subcommand, Debug, Clone)]
pub enum AnalyzeCommand {
    /// Every step and service start, the slowest first.
    Blame,
    /// What the last service to become ready waited for, back to the kernel.
    CriticalChain,
    /// Every step in the order it began, with when and how long.
    Timeline,
    /// The timeline as an SVG picture: `keelctl analyze plot > boot.svg`.
    Plot,
}

pub fn run(
    client: &Client,
    cmd: &Option<AnalyzeCommand>,
    json: bool,
    out: &mut impl Write,
) -> Result<()> {
    let body = client.get("/v1/boot")?;
    if json {
        return crate::print_raw(out, &body);
    }
    let b: Boot = crate::parse(&body)?;
    let text = match cmd {
        None => boot::summary(&b),
        Some(AnalyzeCommand::Blame) => boot::blame(&b),
        Some(AnalyzeCommand::CriticalChain) => boot::critical_chain(&b),
        Some(AnalyzeCommand::Timeline) => boot::timeline(&b),
        Some(AnalyzeCommand::Plot) => boot::svg(&b),
    };
    out.write_all(text.as_bytes())?;
    Ok(())
}
