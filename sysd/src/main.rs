//! `sysd`: Keelson's system daemon, started and supervised by init (PID 1).
//!
//! It runs every service as an OCI container from the declarative config (system services
//! from the image, user services from /var), supervises them, and serves the local API that
//! keelctl talks to. The same binary, re-executed as `sysd runtime ...`, is the short-lived
//! single-threaded helper that creates containers, so the tokio daemon itself never forks.
//!
//! Boot handshake: once the API socket is up and every service task is launched, sysd sends
//! READY=1 to init (services become ready on their own, in dependency order). None of that
//! waits for the root's kernel modules init loads beside sysd's start: what needs one waits
//! for them where it needs it ([`keelson_runtime::RootModules`]: container starts, bonds and
//! VLANs, the container bridge, the extension merge, the update agent's ESP). On SIGTERM it
//! stops services, dependents first, and exits 0. Killed (a crash), it leaves the containers
//! running: init keeps their log pipes, and the next sysd adopts them (`notify`,
//! `keelson_supervisor::adopt`).
//!
//! This binary only wires the `keelson-*` crates together ([`run`]): it makes the event bus,
//! runs first boot ([`firstboot`]), starts the host network, hands both to the supervisor,
//! connects the update agent to what the supervisor publishes, forwards what the components
//! report into the event stream, and serves the API's concerns ([`adapters`] for those the
//! supervisor does not implement) on the unix socket and, with `[api.remote]`, over mutual TLS
//! ([`remote`]).

mod adapters;
mod extensions;
mod firstboot;
mod notify;
mod observe;
mod remote;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use keelson_common::notice::Notice;
use keelson_runtime::RootModules;
use keelson_spec::{Source, Sources};
use keelson_supervisor::{EventBus, HostNet, Supervisor};
use keelson_update::{Agent, Channels, Report};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;

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

#[derive(clap::Args, Debug, Clone, PartialEq)]
struct DaemonArgs {
    /// System services baked into the image.
    #[arg(long, default_value = keelson_spec::SYSTEM_DIR)]
    system_dir: PathBuf,
    /// The config layer written at first boot from user data.
    #[arg(long, default_value = keelson_spec::USERDATA_FILE)]
    userdata_config: PathBuf,
    /// The user's service config (replaced by `keelctl apply`).
    #[arg(long, default_value = keelson_spec::USER_FILE)]
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
    /// init's record of this boot's lines (`GET /v1/boot`; absent: no init timeline).
    #[arg(long, default_value = keelson_common::api::boot::INIT_LOG)]
    init_log: PathBuf,
    /// The hardware watchdog init armed (written by init; absent: none).
    #[arg(long, default_value = "/run/keelson/watchdog.json")]
    watchdog_status: PathBuf,
    /// Where the hostname in force is written.
    #[arg(long, default_value = "/etc/hostname")]
    hostname_file: PathBuf,
    /// The machine ID (the default hostname derives from it).
    #[arg(long, default_value = "/etc/machine-id")]
    machine_id: PathBuf,
    /// Activate engine extensions (merged over /usr) and follow `[extensions]` (init passes
    /// it on a node; host tests leave /usr alone).
    #[arg(long)]
    extensions: bool,
    /// The log forwarder's buffer (`[logging.forward]`), on /var.
    #[arg(long, default_value = "/var/lib/keelson/forward")]
    forward_dir: PathBuf,
    /// `nft` for container networks: the binary, or an image root with Debian's nftables.
    #[arg(long, default_value = "/usr/lib/keelson/images/nft")]
    nft: PathBuf,
}

/// init's command line for sysd (init/src/supervise.rs).
const NODE_ARGS: [&str; 2] = ["--host-network", "--extensions"];

impl DaemonArgs {
    /// The arguments of init's invocation, `sysd --host-network --extensions`, without clap;
    /// `None` for any other command line (clap parses it).
    fn node(argv: &[String]) -> Option<DaemonArgs> {
        if argv.len() != NODE_ARGS.len() + 1 || argv[1..] != NODE_ARGS {
            return None;
        }
        Some(DaemonArgs {
            system_dir: keelson_spec::SYSTEM_DIR.into(),
            userdata_config: keelson_spec::USERDATA_FILE.into(),
            user_config: keelson_spec::USER_FILE.into(),
            run_dir: "/run/keelson".into(),
            socket: keelson_common::api::SOCKET_PATH.into(),
            volumes: "/var/lib/keelson/volumes".into(),
            log_dir: "/var/log/keelson".into(),
            no_firstboot: false,
            cgroup_parent: "/keelson".into(),
            host_network: true,
            network_state: "/var/lib/keelson/network".into(),
            resolv_conf: "/run/keelson/resolv.conf".into(),
            init_log: keelson_common::api::boot::INIT_LOG.into(),
            watchdog_status: "/run/keelson/watchdog.json".into(),
            hostname_file: "/etc/hostname".into(),
            machine_id: "/etc/machine-id".into(),
            extensions: true,
            forward_dir: "/var/lib/keelson/forward".into(),
            nft: "/usr/lib/keelson/images/nft".into(),
        })
    }
}

/// The container helper and the in-container init clone children (libcontainer) that run on
/// a copy of this stack: a panic there must not unwind into frames that are the parent's, so
/// these modes abort, as every mode did before the release profile unwound (the daemon
/// unwinds: a panic on a client's or a datasource's bytes ends a task, not sysd).
fn abort_on_panic() {
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        report(info);
        std::process::abort();
    }));
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("runtime") => {
            abort_on_panic();
            return keelson_runtime::helper::helper_main(&args[2..]);
        }
        Some("init") => {
            abort_on_panic();
            return keelson_runtime::init::init_main(&args[2..]);
        }
        _ => {}
    }
    // init's own invocation skips clap: under QEMU TCG, parsing runs clap's code for the first
    // time (70-110 ms of a boot whose userspace budget is 0.5 s); the result is the same
    // (`node_invocation_is_what_clap_parses`).
    let cli = match DaemonArgs::node(&args) {
        Some(daemon) => Cli {
            command: None,
            daemon,
        },
        None => Cli::parse(),
    };
    let fmt = tracing_subscriber::fmt()
        .with_target(false)
        .with_ansi(false)
        .with_writer(std::io::stderr);
    match cli.command {
        Some(Command::Check { files, system }) => {
            fmt.without_time().init();
            check(&files, system)
        }
        None => {
            // Stamped like init's lines, on init's clock: the console reads as one timeline
            // (`bench-boot` takes the services' start-up from it).
            fmt.with_timer(BootClock).init();
            daemon(cli.daemon)
        }
    }
}

/// `[    2.100000]`: CLOCK_BOOTTIME, as the kernel and init stamp their lines.
struct BootClock;

impl tracing_subscriber::fmt::time::FormatTime for BootClock {
    fn format_time(&self, w: &mut tracing_subscriber::fmt::format::Writer<'_>) -> std::fmt::Result {
        let us = keelson_common::api::boot::boottime_us();
        write!(w, "[{:>5}.{:06}]", us / 1_000_000, us % 1_000_000)
    }
}

fn check(files: &[PathBuf], all_system: bool) -> ExitCode {
    let mut services = Vec::new();
    for (i, path) in files.iter().enumerate() {
        let source = if all_system || i + 1 < files.len() {
            Source::System
        } else {
            Source::User
        };
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("{}: {e}", path.display());
                return ExitCode::FAILURE;
            }
        };
        match keelson_spec::parse_file(path, &text, source) {
            Ok(s) => services.extend(s),
            Err(e) => {
                eprintln!("{e}");
                return ExitCode::FAILURE;
            }
        }
        if source == Source::User {
            if let Err(e) = keelson_spec::parse_registries(path, &text) {
                eprintln!("{e}");
                return ExitCode::FAILURE;
            }
        }
    }
    match keelson_spec::Config::from_services(services) {
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

fn daemon(args: DaemonArgs) -> ExitCode {
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

/// A channel whose notices become events (not about one service).
fn notices_to(events: &Arc<EventBus>) -> mpsc::UnboundedSender<Notice> {
    let (tx, mut rx) = mpsc::unbounded_channel::<Notice>();
    let events = Arc::clone(events);
    tokio::spawn(async move {
        while let Some(n) = rx.recv().await {
            events.emit(None, n.kind, n.message);
        }
    });
    tx
}

/// The host network manager, started with the boot config (`--host-network`).
fn start_network(
    args: &DaemonArgs,
    sources: &Sources,
    events: &Arc<EventBus>,
    modules: &RootModules,
) -> Option<Arc<adapters::HostNetwork>> {
    let paths = keelson_net::Paths {
        state_dir: args.network_state.clone(),
        resolv_conf: args.resolv_conf.clone(),
        hostname_file: args.hostname_file.clone(),
        machine_id: args.machine_id.clone(),
        nft: args.nft.clone(),
    };
    let config = keelson_supervisor::boot_network_config(sources);
    match keelson_net::Net::start(paths, config, notices_to(events), modules.clone()) {
        Ok(net) => Some(Arc::new(adapters::HostNetwork::new(net))),
        Err(err) => {
            tracing::error!("sysd: host networking not started: {err}");
            None
        }
    }
}

/// The hardware watchdog init armed: reported with the version, and as events (the previous
/// boot's reset first, so `keelctl events` shows why the node rebooted).
fn report_watchdog(path: &std::path::Path, sup: &Supervisor, events: &Arc<EventBus>) {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
        Err(e) => {
            tracing::warn!("watchdog: cannot read {}: {e}", path.display());
            return;
        }
    };
    let w: keelson_common::api::Watchdog = match serde_json::from_str(&text) {
        Ok(w) => w,
        Err(e) => {
            tracing::warn!("watchdog: {} is not init's status ({e})", path.display());
            return;
        }
    };
    if let Some(why) = &w.previous_boot_reset {
        events.emit(
            None,
            "watchdog-reset",
            format!(
                "the previous boot was reset by the watchdog ({why}); {} reset(s) so far",
                w.resets
            ),
        );
    }
    events.emit(
        None,
        "watchdog",
        format!(
            "{} armed: a hung sysd or init is reset within {} s",
            w.device, w.timeout_s
        ),
    );
    sup.set_watchdog(w);
}

/// The update agent, reading the effective `[update]` table and the services' statuses the
/// supervisor publishes; its events go to the event stream, its reboot requests to init.
fn update_agent(sup: &Supervisor, events: &Arc<EventBus>) -> Arc<Agent> {
    let (reports, mut rx) = mpsc::unbounded_channel();
    let agent = Agent::new(
        keelson_update::Paths::default(),
        keelson_update::slots::Discovery::Node {
            esp_mount: PathBuf::from("/run/keelson/esp"),
        },
        Channels {
            spec: sup.update_spec(),
            services: sup.statuses(),
            extensions: sup.extensions_spec(),
            reports,
        },
    );
    let events = Arc::clone(events);
    tokio::spawn(async move {
        while let Some(report) = rx.recv().await {
            match report {
                Report::Event(n) => events.emit(None, n.kind, n.message),
                Report::Reboot => {
                    // init reboots on SIGTERM (busybox init's convention, init/src/shutdown.rs).
                    if let Err(e) = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(1),
                        nix::sys::signal::Signal::SIGTERM,
                    ) {
                        tracing::error!("update: cannot ask init to reboot: {e}");
                    }
                }
            }
        }
    });
    agent
}

/// The FD store name of the API's listening socket.
const API_FD: &str = "sysd/api";

/// The API socket: the previous sysd's, when init kept it and it is still the one at `path`
/// (containers that bind-mount the socket file keep reaching sysd), else a new one.
fn api_listener(
    path: &std::path::Path,
    kept: Option<std::os::fd::OwnedFd>,
) -> Result<tokio::net::UnixListener> {
    if let Some(fd) = kept {
        match keelson_api::server::adopt(fd, path) {
            Ok(l) => {
                tracing::info!("sysd: serving the API socket the previous sysd left");
                return Ok(l);
            }
            Err(e) => {
                tracing::warn!("sysd: not taking over the API socket: {e:#}");
                // What answers at `path` may be that kept socket (init holds it): replace it.
                return keelson_api::server::bind_over(path);
            }
        }
    }
    keelson_api::server::bind(path)
}

/// A note compiled in by whoever built this sysd (`KEELSON_BUILD_NOTE` in the build's
/// environment: a CI job, a vendor's patch level), shown in the ready line. `bench-update` builds
/// a version with one to measure an update in which only sysd changed.
const BUILD_NOTE: Option<&str> = option_env!("KEELSON_BUILD_NOTE");

async fn run(args: DaemonArgs) -> Result<()> {
    // First: from here on a runtime that stops turning stops the heartbeat init watches.
    let mut notifier = notify::Notifier::from_env();
    if let Some(every) = notifier.heartbeat() {
        tracing::info!(
            "watchdog: telling init WATCHDOG=1 every {} ms",
            every.as_millis()
        );
    }
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    if let Err(err) = keelson_net::loopback::loopback_up() {
        tracing::warn!("sysd: cannot bring up the loopback interface: {err}");
    }
    keelson_runtime::become_subreaper().context("becoming the child subreaper of containers")?;
    std::fs::create_dir_all(&args.run_dir)
        .with_context(|| format!("creating {}", args.run_dir.display()))?;
    // init's loader of the root's modules, followed from here; only what needs a module waits.
    let modules = RootModules::follow(&args.run_dir);

    let events = Arc::new(EventBus::new().with_boot_record(args.run_dir.join("boot.json")));
    let runtime = keelson_runtime::Runtime::new(args.run_dir.join("runtime"))
        .with_cgroup_parent(&args.cgroup_parent);
    // What init kept of a previous sysd: the containers it left are adopted or removed at
    // `sup.boot`, before anything starts.
    let mut inheritance = notifier.inheritance().await;
    let kept_api = inheritance.fds.remove(API_FD);
    let keeper = inheritance.keeper.clone();
    let sources = Sources {
        system_dir: args.system_dir.clone(),
        userdata_file: args.userdata_config.clone(),
        user_file: args.user_config.clone(),
    };
    // User data first: its `[network]` and `[host]` shape the network brought up next.
    let firstboot = Arc::new(adapters::FirstBootRecord::default());
    let mut imds_log = None;
    if !args.no_firstboot {
        match firstboot::local(&sources) {
            Ok(status) => firstboot.record(status, &events),
            Err(log) => imds_log = Some(log),
        }
    }
    let net = args
        .host_network
        .then(|| start_network(&args, &sources, &events, &modules))
        .flatten();
    let network = match (&net, args.host_network) {
        (Some(net), _) => HostNet::Managed(net.clone()),
        (None, true) => HostNet::Failed,
        (None, false) => HostNet::Unmanaged,
    };
    let images = Arc::new(keelson_images::manager::Images::new(
        args.volumes.with_file_name("images"),
    ));
    let paths = keelson_supervisor::Paths {
        sources: sources.clone(),
        layout: keelson_supervisor::resolve::Layout {
            images: args.volumes.with_file_name("images"),
            volumes: args.volumes.clone(),
            cgroup_parent: args.cgroup_parent.clone(),
        },
        log_dir: args.log_dir.clone(),
        init_log: args.init_log.clone(),
    };
    let sup = Arc::new(Supervisor::new(
        runtime,
        paths,
        Arc::clone(&events),
        Arc::clone(&images),
        network,
        modules.clone(),
    ));
    sup.inherit(inheritance);
    report_watchdog(&args.watchdog_status, &sup, &events);
    let agent = update_agent(&sup, &events);
    // Extensions before the supervisor reads the system services (`sup.boot`): theirs are
    // among them. The only wait for the root's modules before READY, and only on a node
    // with extensions to merge (loop, overlay).
    let extensions = if args.extensions {
        let x = Arc::new(extensions::Extensions::new(
            sup.extensions_spec(),
            Arc::clone(&events),
            modules.clone(),
        ));
        x.activate_at_boot().await;
        Some(x)
    } else {
        None
    };

    let requests = Arc::new(keelson_api::RequestCounts::default());
    let updates = Arc::new(adapters::Updates {
        agent: Arc::clone(&agent),
        modules: modules.clone(),
    });
    observe::follow(
        &sup,
        &events,
        observe::Sources {
            services: sup.clone(),
            updates: Some(updates.clone()),
            requests: Arc::clone(&requests),
            cgroup_parent: args.cgroup_parent.clone(),
            forward_dir: args.forward_dir.clone(),
        },
    );
    let concerns = keelson_api::Concerns {
        services: Some(sup.clone()),
        config: Some(sup.clone()),
        images: Some(Arc::new(adapters::Images::new(
            images,
            sup.statuses(),
            Arc::clone(&events),
            modules.clone(),
        ))),
        updates: Some(updates),
        network: net
            .clone()
            .map(|net| net as Arc<dyn keelson_api::HostNetwork>),
        firstboot: Some(firstboot.clone()),
        extensions: extensions
            .clone()
            .map(|x| x as Arc<dyn keelson_api::Extensions>),
        requests,
    };
    let listener = api_listener(&args.socket, kept_api)?;
    if let Some(k) = &keeper {
        // Kept by init, so a next sysd serves the same socket (see `api_listener`).
        k.keep(
            API_FD,
            std::os::fd::AsFd::as_fd(&listener).try_clone_to_owned()?,
        );
    }
    let (stop_api, api_stopped) = tokio::sync::watch::channel(false);
    let mut remote_stopped = api_stopped.clone();
    let remote_server = tokio::spawn(keelson_api::remote::serve(
        remote::follow(sup.api_spec(), notices_to(&events)),
        concerns.clone(),
        notices_to(&events),
        async move {
            let _ = remote_stopped.wait_for(|stop| *stop).await;
        },
    ));
    let mut api_stopped = api_stopped;
    let server = tokio::spawn(keelson_api::server::serve(listener, concerns, async move {
        let _ = api_stopped.wait_for(|stop| *stop).await;
    }));

    sup.boot();
    if let Some(log) = imds_log {
        firstboot::from_imds(
            Arc::clone(&sup),
            firstboot,
            Arc::clone(&events),
            sources,
            log,
        );
    }
    // Boot assessment starts once the ESP can be mounted (vfat is among the root's modules).
    {
        let (agent, modules) = (Arc::clone(&agent), modules.clone());
        tokio::spawn(async move {
            modules.wait().await;
            agent.boot();
        });
    }
    if let Some(x) = extensions {
        x.follow(
            Arc::clone(&agent),
            Arc::clone(&sup),
            net.as_ref()
                .map(|n| keelson_supervisor::Network::online(n.as_ref())),
        );
    }
    match BUILD_NOTE {
        Some(note) => tracing::info!(
            version = env!("CARGO_PKG_VERSION"),
            build = note,
            "sysd: ready"
        ),
        None => tracing::info!(version = env!("CARGO_PKG_VERSION"), "sysd: ready"),
    }
    notifier.ready();

    tokio::select! {
        _ = term.recv() => tracing::info!("sysd: SIGTERM, stopping"),
        _ = int.recv() => tracing::info!("sysd: SIGINT, stopping"),
    }
    sup.shutdown().await;
    if let Some(net) = net {
        net.shutdown().await;
    }
    let _ = stop_api.send(true);
    let _ = server.await;
    let _ = remote_server.await;
    tracing::info!("sysd: stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_invocation_is_what_clap_parses() {
        let argv: Vec<String> = std::iter::once("sysd")
            .chain(NODE_ARGS)
            .map(str::to_owned)
            .collect();
        let parsed = Cli::parse_from(&argv);
        assert!(parsed.command.is_none());
        assert_eq!(DaemonArgs::node(&argv), Some(parsed.daemon));
    }

    #[test]
    fn any_other_command_line_goes_to_clap() {
        for argv in [
            vec!["sysd"],
            vec!["sysd", "--host-network"],
            vec!["sysd", "--extensions", "--host-network"],
            vec!["sysd", "--host-network", "--extensions", "--no-firstboot"],
            vec!["sysd", "check", "x.toml"],
        ] {
            let argv: Vec<String> = argv.into_iter().map(str::to_owned).collect();
            assert_eq!(DaemonArgs::node(&argv), None, "{argv:?}");
        }
    }
}
