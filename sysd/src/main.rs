//! `sysd`: Keelson's system daemon, started and supervised by init.
//!
//! Today it owns the boot handshake and the stop path: it tells init it is ready (the line that
//! ends the boot timeline) and, on SIGTERM from init at shutdown, stops and exits 0. Services,
//! networking, first-boot config and updates grow here.

mod notify;

use std::process::ExitCode;

use anyhow::{Context, Result};
use tokio::signal::unix::{signal, SignalKind};

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_target(false)
        .without_time()
        .with_ansi(false)
        .init();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(err) => {
            tracing::error!(%err, "cannot start the async runtime");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!("sysd: {err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> Result<()> {
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    std::fs::create_dir_all("/run/keelson").context("creating /run/keelson")?;
    tracing::info!(version = env!("CARGO_PKG_VERSION"), "sysd: ready");
    notify::ready().context("telling init that sysd is ready")?;
    tokio::select! {
        _ = term.recv() => tracing::info!("sysd: SIGTERM, stopping"),
        _ = int.recv() => tracing::info!("sysd: SIGINT, stopping"),
    }
    tracing::info!("sysd: stopped");
    Ok(())
}
