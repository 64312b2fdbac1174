//! `keelctl --nodes a,b,c CMD`: one request per node, in parallel (a thread each), answers
//! shown together — one table with a NODE column, or JSON grouped per node:
//! `[{"node": "a", "services": [...]}, {"node": "b", "error": "..."}]`. A node that fails is
//! reported (on stderr, or as its `error` in JSON) without hiding the others; the exit code
//! is 1 if any failed.

use std::io::Write;

use anyhow::{bail, Result};
use keelson_common::api::{ServiceStatus, Stats, Version};
use serde_json::{json, Value};

use crate::http::Client;
use crate::{api, now_ms, parse, render, Command};

pub fn run(command: &Command, clients: &[Client], json: bool, out: &mut impl Write) -> Result<()> {
    let (path, key) = match command {
        Command::Ps => ("/services", "services"),
        Command::Stats => ("/stats", "stats"),
        Command::Version => ("/version", "version"),
        _ => bail!(
            "several nodes take ps, stats and version; name one node (--node) for this command"
        ),
    };
    let answers = fetch_all(clients, &api(path));
    let mut failed = Vec::new();
    if json {
        let mut grouped = Vec::new();
        for (node, answer) in &answers {
            let value = answer
                .as_ref()
                .map_err(|e| format!("{e:#}"))
                .and_then(|body| {
                    serde_json::from_str::<Value>(body).map_err(|e| format!("not JSON: {e}"))
                });
            grouped.push(match value {
                Ok(value) => json!({"node": node, key: value}),
                Err(error) => {
                    failed.push(node.clone());
                    json!({"node": node, "error": error})
                }
            });
        }
        writeln!(out, "{}", Value::Array(grouped))?;
    } else {
        let now = now_ms();
        let mut tables = Vec::new();
        let mut versions = Vec::new();
        for (node, answer) in &answers {
            let rows = answer
                .as_ref()
                .map_err(|e| format!("{e:#}"))
                .and_then(|body| {
                    let parsed = match command {
                        Command::Ps => {
                            parse::<Vec<ServiceStatus>>(body).map(|s| render::ps_rows(&s, now))
                        }
                        Command::Stats => parse::<Vec<Stats>>(body).map(|s| render::stats_rows(&s)),
                        _ => parse::<Version>(body).map(|v| {
                            versions.push(vec![
                                node.clone(),
                                v.version.clone(),
                                render::duration(v.uptime_s),
                            ]);
                            (Vec::new(), Vec::new())
                        }),
                    };
                    parsed.map_err(|e| format!("node {node}: {e:#}"))
                });
            match rows {
                Ok(rows) => tables.push((node.clone(), rows)),
                Err(error) => {
                    eprintln!("keelctl: {error}");
                    failed.push(node.clone());
                }
            }
        }
        match command {
            Command::Version => {
                writeln!(out, "keelctl {}", env!("CARGO_PKG_VERSION"))?;
                write!(out, "{}", render::table(&["NODE", "SYSD", "UP"], &versions))?;
            }
            _ => write!(out, "{}", render::with_node_column(&tables))?,
        }
    }
    if !failed.is_empty() {
        bail!(
            "{} of {} nodes did not answer: {}",
            failed.len(),
            answers.len(),
            failed.join(", ")
        );
    }
    Ok(())
}

/// `GET path` on every node at once; answers in the order of `clients`.
fn fetch_all(clients: &[Client], path: &str) -> Vec<(String, Result<String>)> {
    std::thread::scope(|scope| {
        let handles: Vec<_> = clients
            .iter()
            .map(|client| {
                let node = client.node().unwrap_or("local").to_string();
                (node, scope.spawn(move || client.get(path)))
            })
            .collect();
        handles
            .into_iter()
            .map(|(node, handle)| {
                let answer = handle
                    .join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("node {node}: the request panicked")));
                (node, answer)
            })
            .collect()
    })
}
