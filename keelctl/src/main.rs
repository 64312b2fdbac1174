//! `keelctl`: the command line for Keelson's system daemon.
//!
//! It talks to sysd's HTTP API on the root-only unix socket (`/run/keelson/sysd.sock`, see
//! `docs/api.md`) or, with `--node`/`--nodes` or a KEELCONFIG context, to nodes' remote API
//! over mutual TLS ([`remote`]), and shows the answers as tables or, with `-o json`, as the raw
//! JSON (NDJSON for streams). It is deliberately synchronous and small — no async runtime, no
//! HTTP library (see [`http`]) — because it runs on the host and in the admin container, one
//! request at a time (several nodes: one thread each). `keelctl pki` ([`pki`]) is the
//! operator's PKI for the remote API.

mod analyze;
mod config;
mod extensions;
mod http;
mod images;
mod multi;
mod net;
mod pki;
mod remote;
mod render;
mod update;

use std::io::{self, Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use clap::{CommandFactory, Parser, Subcommand, ValueEnum};
use keelson_common::api::{
    ApplyPlan, Event, LogLine, ServiceStatus, State, Stats, Version, API_PREFIX, SOCKET_PATH,
};
use serde::de::DeserializeOwned;

use crate::http::{encode_segment, Client};

/// How many of its last output lines `keelctl status NAME` shows for a failed service.
const LAST_OUTPUT_LINES: usize = 5;

/// Control Keelson's system daemon (sysd): services, logs, events, resource usage and config.
#[derive(Debug, Parser)]
#[command(name = "keelctl", version)]
struct Cli {
    /// sysd's API socket (default /run/keelson/sysd.sock).
    #[arg(long, global = true, env = "KEELSON_SOCKET")]
    socket: Option<PathBuf>,
    /// A node's remote API (mutual TLS; port 50000 unless given).
    #[arg(
        long,
        global = true,
        value_name = "HOST[:PORT]",
        conflicts_with = "nodes"
    )]
    node: Option<String>,
    /// Several nodes at once (`ps`, `stats`, `version`: one table with a NODE column).
    #[arg(
        long,
        global = true,
        value_name = "HOST[:PORT],...",
        value_delimiter = ','
    )]
    nodes: Vec<String>,
    /// The CA that signed the nodes' certificates (PEM).
    #[arg(long, global = true, value_name = "FILE")]
    ca: Option<PathBuf>,
    /// keelctl's client certificate (PEM; its role is in it).
    #[arg(long, global = true, value_name = "FILE")]
    cert: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(long, global = true, value_name = "FILE")]
    key: Option<PathBuf>,
    /// A context of the KEELCONFIG file (default: the file's `context`).
    #[arg(long, global = true)]
    context: Option<String>,
    /// Output format: tables for people, or the API's JSON (NDJSON for streams).
    #[arg(short, long, global = true, value_enum, default_value_t = Output::Text)]
    output: Output,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// List services: state, health, pid, restarts, uptime, image.
    Ps,
    /// Show one service in detail, including its last exit and why it is not running; without
    /// a service, the node: sysd's version and uptime, the hardware watchdog and its resets.
    Status { service: Option<String> },
    /// Print a service's captured output.
    Logs {
        /// Keep printing new lines as they come.
        #[arg(short, long)]
        follow: bool,
        /// Only the last N lines (default: all that sysd keeps).
        #[arg(short = 'n', long, value_name = "N")]
        tail: Option<usize>,
        service: String,
    },
    /// Start a stopped or failed service.
    Start { service: String },
    /// Stop a service (it stays stopped until started or the config is applied again).
    Stop { service: String },
    /// Restart a service.
    Restart { service: String },
    /// Send a signal to a service's main process (what follows is up to its restart policy).
    Kill {
        /// Name (`TERM`, `SIGHUP`) or number.
        #[arg(short, long, default_value = "KILL")]
        signal: String,
        service: String,
    },
    /// Apply a service config: show what will change, then do it.
    Apply {
        /// Only show what would change.
        #[arg(long)]
        dry_run: bool,
        /// The config (TOML); `-` reads standard input.
        file: PathBuf,
    },
    /// Resource usage of every service (CPU, memory, pids, I/O, OOM kills).
    Stats,
    /// Follow sysd's events (starts, exits, health changes, applies).
    Events {
        /// Start after this sequence number (older events that sysd still keeps come first).
        #[arg(long, value_name = "SEQ")]
        since: Option<u64>,
    },
    /// Show the host network: links, addresses, routes, DNS, DHCP leases, network-online.
    Net,
    /// Pull an image from its registry into the store on /var, showing progress.
    Pull { image: String },
    /// List the images in the store; `rm` and `prune` remove them.
    Images {
        #[command(subcommand)]
        command: Option<images::ImagesCommand>,
    },
    /// Where this boot's time went (init's steps, the services' start-up): a summary, or
    /// `blame`, `critical-chain`, `timeline`, `plot > boot.svg`.
    Analyze {
        #[command(subcommand)]
        command: Option<analyze::AnalyzeCommand>,
    },
    /// Engine extensions of the running OS version: name, version, state, root hash, source.
    Extensions,
    /// Over-the-air updates: check, apply, status, rollback, cancel.
    #[command(subcommand)]
    Update(update::UpdateCommand),
    /// The node's config: `show` prints the effective config and where each part came from.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// What first boot found in the datasources and did with it at this boot.
    Firstboot,
    /// Show keelctl's and sysd's versions.
    Version,
    /// Print a shell completion script (e.g. `keelctl completions bash > /etc/bash_completion.d/keelctl`).
    Completions { shell: clap_complete::Shell },
    /// The operator's PKI for the remote API: a CA, client certificates with a role, node
    /// certificates (files in a directory on this machine).
    #[command(subcommand)]
    Pki(pki::PkiCommand),
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// The merged config (image < user data < API) as TOML, each table annotated with its
    /// layer and file position.
    Show,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let stdout = io::stdout();
    let mut out = stdout.lock();
    match run(&cli, &mut out).and_then(|()| out.flush().map_err(Into::into)) {
        Ok(()) => ExitCode::SUCCESS,
        // `keelctl logs -f | head`: the reader left, which is not an error.
        Err(err) if is_broken_pipe(&err) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("keelctl: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|cause| {
        cause
            .downcast_ref::<io::Error>()
            .is_some_and(|e| e.kind() == io::ErrorKind::BrokenPipe)
    })
}

/// The clients the command line names: the local socket, one node, or several.
fn clients(cli: &Cli) -> Result<Vec<Client>> {
    let mut nodes = cli.nodes.clone();
    nodes.extend(cli.node.clone());
    let flags = remote::Flags {
        nodes,
        ca: cli.ca.clone(),
        cert: cli.cert.clone(),
        key: cli.key.clone(),
        context: cli.context.clone(),
        keelconfig: remote::default_keelconfig(),
        socket_given: cli.socket.is_some(),
    };
    let remote = remote::resolve(&flags)?;
    if remote.nodes.is_empty() {
        let socket = cli
            .socket
            .clone()
            .unwrap_or_else(|| PathBuf::from(SOCKET_PATH));
        return Ok(vec![Client::new(socket)]);
    }
    Ok(remote.nodes.into_iter().map(Client::remote).collect())
}

fn run(cli: &Cli, out: &mut impl Write) -> Result<()> {
    match &cli.command {
        Command::Pki(cmd) => return pki::run(cmd, out),
        Command::Completions { shell } => {
            clap_complete::generate(*shell, &mut Cli::command(), "keelctl", out);
            return Ok(());
        }
        _ => {}
    }
    let clients = clients(cli)?;
    let json = cli.output == Output::Json;
    match clients.as_slice() {
        [client] => run_one(cli, client, json, out),
        several => multi::run(&cli.command, several, json, out),
    }
}

fn run_one(cli: &Cli, client: &Client, json: bool, out: &mut impl Write) -> Result<()> {
    let client = client.clone();
    match &cli.command {
        Command::Ps => {
            let body = client.get(&api("/services"))?;
            if json {
                return print_raw(out, &body);
            }
            let services: Vec<ServiceStatus> = parse(&body)?;
            write!(out, "{}", render::ps(&services, now_ms()))?;
        }
        Command::Status { service: None } => {
            let body = client.get(&api("/version"))?;
            if json {
                return print_raw(out, &body);
            }
            let version: Version = parse(&body)?;
            write!(out, "{}", render::node(&version))?;
        }
        Command::Status {
            service: Some(service),
        } => {
            let body = client.get(&service_path(service, ""))?;
            if json {
                return print_raw(out, &body);
            }
            let status: ServiceStatus = parse(&body)?;
            write!(out, "{}", render::status(&status, now_ms()))?;
            // A service that ended badly: its own last words, as `systemctl status` shows the
            // journal's tail (a oneshot's error is usually its last line).
            if matches!(status.state, State::Failed | State::Backoff) {
                let logs = client.get(&format!(
                    "{}?tail={LAST_OUTPUT_LINES}",
                    service_path(service, "/logs")
                ))?;
                let lines = logs
                    .lines()
                    .filter(|l| !l.trim().is_empty())
                    .map(parse::<LogLine>)
                    .collect::<Result<Vec<_>>>()?;
                write!(out, "{}", render::last_output(&lines))?;
            }
        }
        Command::Logs {
            follow,
            tail,
            service,
        } => {
            let mut query = Vec::new();
            if let Some(n) = tail {
                query.push(format!("tail={n}"));
            }
            if *follow {
                query.push("follow=1".to_string());
            }
            let mut path = service_path(service, "/logs");
            if !query.is_empty() {
                path = format!("{path}?{}", query.join("&"));
            }
            stream::<LogLine>(&client, &path, json, out, render::log_line)?;
        }
        Command::Start { service } => action(&client, service_path(service, "/start"), json, out)?,
        Command::Stop { service } => action(&client, service_path(service, "/stop"), json, out)?,
        Command::Restart { service } => {
            action(&client, service_path(service, "/restart"), json, out)?
        }
        Command::Kill { signal, service } => {
            let path = service_path(service, &format!("/kill?signal={}", encode_segment(signal)));
            action(&client, path, json, out)?
        }
        Command::Apply { dry_run, file } => apply(&client, file, *dry_run, json, out)?,
        Command::Stats => {
            let body = client.get(&api("/stats"))?;
            if json {
                return print_raw(out, &body);
            }
            let stats: Vec<Stats> = parse(&body)?;
            write!(out, "{}", render::stats(&stats))?;
        }
        Command::Events { since } => {
            let path = match since {
                Some(seq) => api(&format!("/events?since={seq}")),
                None => api("/events"),
            };
            stream::<Event>(&client, &path, json, out, render::event)?;
        }
        Command::Net => net::run(&client, json, out)?,
        Command::Pull { image } => images::pull(&client, image, json, out)?,
        Command::Images { command } => images::images(&client, command, json, out)?,
        Command::Config {
            command: ConfigCommand::Show,
        } => {
            let body = client.get(&api("/config"))?;
            if json {
                return print_raw(out, &body);
            }
            write!(out, "{}", config::show(&parse(&body)?))?;
        }
        Command::Firstboot => {
            let body = client.get(&api("/firstboot"))?;
            if json {
                return print_raw(out, &body);
            }
            write!(out, "{}", config::firstboot(&parse(&body)?))?;
        }
        Command::Version => {
            let body = client.get(&api("/version"))?;
            if json {
                return print_raw(out, &body);
            }
            let version: Version = parse(&body)?;
            writeln!(out, "keelctl {}", env!("CARGO_PKG_VERSION"))?;
            writeln!(
                out,
                "sysd    {} (up {})",
                version.version,
                render::duration(version.uptime_s)
            )?;
        }
        Command::Update(cmd) => update::run(&client, cmd, json, out)?,
        Command::Extensions => extensions::run(&client, json, out)?,
        Command::Analyze { command } => analyze::run(&client, command, json, out)?,
        Command::Completions { .. } | Command::Pki(_) => {
            unreachable!("answered before a client is made")
        }
    }
    Ok(())
}

fn api(path: &str) -> String {
    format!("{API_PREFIX}{path}")
}

fn service_path(service: &str, rest: &str) -> String {
    api(&format!("/services/{}{rest}", encode_segment(service)))
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn parse<T: DeserializeOwned>(body: &str) -> Result<T> {
    serde_json::from_str(body)
        .context("sysd's answer is not what keelctl expects (version mismatch?)")
}

fn print_raw(out: &mut impl Write, body: &str) -> Result<()> {
    writeln!(out, "{}", body.trim_end())?;
    Ok(())
}

/// Prints an NDJSON stream line by line as it arrives, until the server ends it.
fn stream<T: DeserializeOwned>(
    client: &Client,
    path: &str,
    json: bool,
    out: &mut impl Write,
    show: fn(&T) -> String,
) -> Result<()> {
    let response = client.send("GET", path, None)?;
    for line in response.lines() {
        let line = line.context("reading sysd's stream")?;
        if line.is_empty() {
            continue;
        }
        if json {
            writeln!(out, "{line}")?;
        } else {
            writeln!(out, "{}", show(&parse::<T>(&line)?))?;
        }
        out.flush()?;
    }
    Ok(())
}

/// POSTs to a service action and shows the service's new state.
fn action(client: &Client, path: String, json: bool, out: &mut impl Write) -> Result<()> {
    let body = client.send("POST", &path, None)?.text()?;
    if json {
        return print_raw(out, &body);
    }
    let status: ServiceStatus = parse(&body)?;
    writeln!(out, "{}: {}", status.name, status.state.as_str())?;
    Ok(())
}

/// Dry run first (and show it), then — unless `dry_run` — the real apply and its result.
fn apply(
    client: &Client,
    file: &PathBuf,
    dry_run: bool,
    json: bool,
    out: &mut impl Write,
) -> Result<()> {
    let config = if file.as_os_str() == "-" {
        let mut text = Vec::new();
        io::stdin()
            .read_to_end(&mut text)
            .context("reading the config from standard input")?;
        text
    } else {
        std::fs::read(file).with_context(|| format!("reading {}", file.display()))?
    };
    let post = |query: &str| -> Result<(String, ApplyPlan)> {
        let body = client
            .send(
                "POST",
                &api(&format!("/apply{query}")),
                Some(("application/toml", &config)),
            )?
            .text()?;
        let plan = parse(&body)?;
        Ok((body, plan))
    };

    let (body, plan) = post("?dry_run=1")?;
    if dry_run {
        if json {
            return print_raw(out, &body);
        }
        write!(out, "{}", render::plan_diff(&plan))?;
        writeln!(out, "dry run: nothing changed")?;
        return Ok(());
    }
    if !json {
        write!(out, "{}", render::plan_diff(&plan))?;
        out.flush()?;
    }
    let (body, applied) = post("")?;
    if json {
        return print_raw(out, &body);
    }
    let same = |a: &ApplyPlan, b: &ApplyPlan| {
        (&a.start, &a.restart, &a.stop, &a.unchanged)
            == (&b.start, &b.restart, &b.stop, &b.unchanged)
    };
    if !same(&plan, &applied) {
        writeln!(out, "services changed meanwhile; what was applied:")?;
        write!(out, "{}", render::plan_diff(&applied))?;
    }
    write!(out, "{}", render::plan_summary(&applied))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn flags_parse() {
        let cli = Cli::try_parse_from(["keelctl", "-o", "json", "logs", "-f", "-n", "5", "web"])
            .expect("parses");
        assert_eq!(cli.output, Output::Json);
        match cli.command {
            Command::Logs {
                follow,
                tail,
                service,
            } => {
                assert!(follow);
                assert_eq!(tail, Some(5));
                assert_eq!(service, "web");
            }
            other => panic!("parsed as {other:?}"),
        }
        assert!(Cli::try_parse_from(["keelctl", "logs"]).is_err());
        assert!(Cli::try_parse_from(["keelctl", "-o", "yaml", "ps"]).is_err());
    }

    #[test]
    fn paths() {
        assert_eq!(service_path("web", "/logs"), "/v1/services/web/logs");
        assert_eq!(service_path("a b", ""), "/v1/services/a%20b");
    }
}
