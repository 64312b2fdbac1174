//! `sysd`: Keelson's system daemon, started and supervised by init (PID 1).
//!
//! It runs every service as an OCI container from the declarative config (system services
//! from the image, user services from /var), supervises them, and serves the local API that
//! keelctl talks to. The same binary, re-executed as `sysd runtime ...`, is the short-lived
//! single-threaded helper that creates containers, so the tokio daemon itself never forks.
//!
//! Boot handshake: once the API socket is up and every service task is launched, sysd writes
//! READY=1 to init (services become ready on their own, in dependency order). On SIGTERM it
//! stops services, dependents first, and exits 0.

mod notify;

use keelson_api as api;
use keelson_firstboot as firstboot;
use keelson_images as images;
use keelson_net as network;
use keelson_net::loopback as net;
use keelson_runtime as runtime;
use keelson_spec as spec;
use keelson_supervisor as supervisor;
use keelson_update as update;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use tokio::signal::unix::{signal, SignalKind};

#[derive(Parser, Debug)]
#[command(name = "sysd", version, about = "Keelson's service supervisor")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    daemon: DaemonArgs,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Validate service config files as sysd would load them (system files first, the last
    /// one as the user's file).
    Check {
        /// Files to check together; with --system, all are system files.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        #[arg(long)]
        system: bool,
    },
}

#[derive(clap::Args, Debug, Clone)]
struct DaemonArgs {
    /// System services baked into the image.
    #[arg(long, default_value = spec::SYSTEM_DIR)]
    system_dir: PathBuf,
    /// The config layer written at first boot from user data.
    #[arg(long, default_value = spec::USERDATA_FILE)]
    userdata_config: PathBuf,
    /// The user's service config (replaced by `keelctl apply`).
    #[arg(long, default_value = spec::USER_FILE)]
    user_config: PathBuf,
    /// Runtime state (container state, bundles).
    #[arg(long, default_value = "/run/keelson")]
    run_dir: PathBuf,
    /// API socket.
    #[arg(long, default_value = keelson_common::api::SOCKET_PATH)]
    socket: PathBuf,
    /// Named volumes.
    #[arg(long, default_value = "/var/lib/keelson/volumes")]
    volumes: PathBuf,
    /// Service log files.
    #[arg(long, default_value = "/var/log/keelson")]
    log_dir: PathBuf,
    /// Skip first-boot user data (host tests and benchmarks: the host is not a Keelson node).
    #[arg(long)]
    no_firstboot: bool,
    /// cgroup (v2) under which every service gets its leaf.
    #[arg(long, default_value = "/keelson")]
    cgroup_parent: String,
    /// Manage the host network from `[network]`/`[host]` (init passes it; without it sysd
    /// leaves links, addresses and routes alone, as the host tests need).
    #[arg(long)]
    host_network: bool,
    /// DHCP leases kept across reboots.
    #[arg(long, default_value = "/var/lib/keelson/network")]
    network_state: PathBuf,
    /// The resolver file (/etc/resolv.conf links to it).
    #[arg(long, default_value = "/run/keelson/resolv.conf")]
    resolv_conf: PathBuf,
    /// Where the hostname in force is written.
    #[arg(long, default_value = "/etc/hostname")]
    hostname_file: PathBuf,
    /// The machine ID (the default hostname derives from it).
    #[arg(long, default_value = "/etc/machine-id")]
    machine_id: PathBuf,
    /// `nft` for container networks: the binary, or an image root with Debian's nftables.
    #[arg(long, default_value = "/usr/lib/keelson/images/nft")]
    nft: PathBuf,
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("runtime") => return runtime::helper::helper_main(&args[2..]),
        Some("init") => return runtime::init::init_main(&args[2..]),
        _ => {}
    }
    tracing_subscriber::fmt()
        .with_target(false)
        .without_time()
        .with_ansi(false)
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Check { files, system }) => check(&files, system),
        None => daemon(cli.daemon),
    }
}

fn check(files: &[PathBuf], all_system: bool) -> ExitCode {
    let mut services = Vec::new();
    for (i, path) in files.iter().enumerate() {
        let source = if all_system || i + 1 < files.len() {
            spec::Source::System
        } else {
            spec::Source::User
        };
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("{}: {e}", path.display());
                return ExitCode::FAILURE;
            }
        };
        match spec::parse_file(path, &text, source) {
            Ok(s) => services.extend(s),
            Err(e) => {
                eprintln!("{e}");
                return ExitCode::FAILURE;
            }
        }
        if source == spec::Source::User {
            if let Err(e) = spec::parse_registries(path, &text) {
                eprintln!("{e}");
                return ExitCode::FAILURE;
            }
        }
    }
    match spec::Config::from_services(services) {
        Ok(cfg) => {
            println!("ok: {} services", cfg.services.len());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    }
}

/// The update agent with its hooks into the supervisor; boot assessment starts now.
fn start_update_agent(sup: &Arc<supervisor::Supervisor>) {
    use api::Backend;
    let sources = sup.sources().clone();
    let (events, services) = (Arc::downgrade(sup), Arc::downgrade(sup));
    let agent = update::Agent::new(
        update::Paths::default(),
        update::slots::Discovery::Node {
            esp_mount: PathBuf::from("/run/keelson/esp"),
        },
        update::Hooks {
            emit: Box::new(move |kind, message| {
                if let Some(s) = events.upgrade() {
                    s.emit_event(kind, message);
                }
            }),
            services: Box::new(move || services.upgrade().map(|s| s.list()).unwrap_or_default()),
            reboot: Box::new(|| {
                // init reboots on SIGTERM (busybox init's convention, init/src/shutdown.rs).
                if let Err(e) = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(1),
                    nix::sys::signal::Signal::SIGTERM,
                ) {
                    tracing::error!("update: cannot ask init to reboot: {e}");
                }
            }),
            spec: Box::new(move || spec::update::load(&sources).map_err(|e| e.0)),
        },
    );
    sup.set_update_agent(Arc::clone(&agent));
    agent.boot();
}

fn daemon(args: DaemonArgs) -> ExitCode {
    // While sysd has one thread: registry TLS roots (see images::trust).
    if let Err(err) = images::trust::install(&args.run_dir) {
        tracing::warn!("sysd: registry pulls over HTTPS will fail: {err:#}");
    }
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(err) => {
            tracing::error!("sysd: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!("sysd: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// Probes the datasources and applies new user data (see `firstboot`), validating it as the
/// Applies what a datasource found (see `firstboot`), validating it as the user-data layer
/// over the image's system services; log lines from `printed` on go to the console.
fn first_boot_process(
    sources: &spec::Sources,
    found: Result<Option<firstboot::datasource::Found>, String>,
    log: Vec<String>,
    start: std::time::Instant,
    printed: usize,
) -> keelson_common::api::firstboot::FirstBoot {
    let system = sources.read_system().unwrap_or_default();
    let validate = |text: &str, origin: &str| -> Result<(), String> {
        let doc = spec::parse_document(Path::new(origin), text, spec::Source::UserData)
            .map_err(|e| e.0)?;
        spec::Config::from_layers(system.clone(), vec![doc])
            .map(drop)
            .map_err(|e| e.0)
    };
    let status = firstboot::process(found, log, &firstboot::Paths::system(), &validate, start);
    for line in status.probe_log.iter().skip(printed) {
        tracing::info!("sysd: datasource: {line}");
    }
    status
}

/// The local datasources, before the network starts. `None`: nothing local, and this platform
/// has a metadata service to ask once the network is up (the log so far comes with it).
fn first_boot_local(
    sources: &spec::Sources,
) -> Result<keelson_common::api::firstboot::FirstBoot, Vec<String>> {
    let start = std::time::Instant::now();
    let probe = firstboot::datasource::Probe::system();
    let mut log = Vec::new();
    let found = probe.find(&mut log);
    if matches!(found, Ok(None)) && firstboot::imds::enabled(&probe.sys, &probe.cmdline) {
        for line in &log {
            tracing::info!("sysd: datasource: {line}");
        }
        tracing::info!("sysd: datasource: imds: asked once the network is up");
        return Err(log);
    }
    Ok(first_boot_process(sources, found, log, start, 0))
}

/// The metadata service, in the background once the network is starting: its user data is
/// applied like a local datasource's, then the running config is reconciled with it.
fn first_boot_imds(
    sup: &Arc<supervisor::Supervisor>,
    sources: spec::Sources,
    mut log: Vec<String>,
) {
    let sup = Arc::clone(sup);
    tokio::spawn(async move {
        let start = std::time::Instant::now();
        let from = log.len();
        let found = firstboot::imds::fetch(
            firstboot::imds::ADDRESS,
            firstboot::imds::DEADLINE,
            &mut log,
        )
        .await;
        let status = first_boot_process(&sources, found, log, start, from);
        let applied = status.outcome == keelson_common::api::firstboot::Outcome::Applied;
        sup.set_firstboot(status);
        if applied {
            if let Err(e) = sup.reload().await {
                sup.emit_event(
                    "firstboot-error",
                    format!("user data from the metadata service: {}", e.message),
                );
            }
        }
    });
}

async fn run(args: DaemonArgs) -> Result<()> {
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    if let Err(err) = net::loopback_up() {
        tracing::warn!("sysd: cannot bring up the loopback interface: {err}");
    }
    runtime::become_subreaper().context("becoming the child subreaper of containers")?;
    std::fs::create_dir_all(&args.run_dir)
        .with_context(|| format!("creating {}", args.run_dir.display()))?;

    let rt =
        runtime::Runtime::new(args.run_dir.join("runtime")).with_cgroup_parent(&args.cgroup_parent);
    let sources = spec::Sources {
        system_dir: args.system_dir,
        userdata_file: args.userdata_config,
        user_file: args.user_config,
    };
    let paths = supervisor::Paths {
        sources: sources.clone(),
        layout: supervisor::resolve::Layout {
            images: args.volumes.with_file_name("images"),
            volumes: args.volumes,
            cgroup_parent: args.cgroup_parent,
        },
        log_dir: args.log_dir,
    };
    let sup = supervisor::Supervisor::new(rt, paths);
    sup.clean_leftovers().await;
    // User data first: its `[network]` and `[host]` shape the network brought up next.
    let mut imds_log = None;
    if !args.no_firstboot {
        match first_boot_local(&sources) {
            Ok(status) => sup.set_firstboot(status),
            Err(log) => imds_log = Some(log),
        }
    }
    if args.host_network {
        sup.manage_network();
        let net_paths = network::Paths {
            state_dir: args.network_state.clone(),
            resolv_conf: args.resolv_conf.clone(),
            hostname_file: args.hostname_file.clone(),
            machine_id: args.machine_id.clone(),
            nft: args.nft.clone(),
        };
        let emit_to = Arc::downgrade(&sup);
        let emit: network::Emit = Arc::new(move |kind: &str, message: String| {
            if let Some(s) = emit_to.upgrade() {
                s.network_event(kind, message);
            }
        });
        let bump_to = Arc::downgrade(&sup);
        let on_online = Arc::new(move || {
            if let Some(s) = bump_to.upgrade() {
                s.network_changed();
            }
        });
        match network::Net::start(net_paths, sup.boot_network_config(), emit, on_online) {
            Ok(net) => sup.set_network(net),
            Err(err) => tracing::error!("sysd: host networking not started: {err}"),
        }
    }

    let listener = api::server::bind(&args.socket)?;
    let (stop_api, api_stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(api::server::serve(listener, Arc::clone(&sup), async {
        let _ = api_stopped.await;
    }));

    sup.boot();
    if let Some(log) = imds_log {
        first_boot_imds(&sup, sources.clone(), log);
    }
    start_update_agent(&sup);
    tracing::info!(version = env!("CARGO_PKG_VERSION"), "sysd: ready");
    notify::ready().context("telling init that sysd is ready")?;

    tokio::select! {
        _ = term.recv() => tracing::info!("sysd: SIGTERM, stopping"),
        _ = int.recv() => tracing::info!("sysd: SIGINT, stopping"),
    }
    sup.shutdown().await;
    if let Some(net) = sup.network() {
        net.shutdown().await;
    }
    let _ = stop_api.send(());
    let _ = server.await;
    tracing::info!("sysd: stopped");
    Ok(())
}
