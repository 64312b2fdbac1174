//! The host network, from the `[network]` and `[host]` tables, in-process over rtnetlink (no
//! external daemon): links up with their MTU, static addresses and routes, a DHCPv4 client per
//! DHCP link (`dhcp`), /etc/resolv.conf (`resolv`), the hostname, link events (carrier lost and
//! regained), and the `network-online` state services can depend on.
//!
//! Without interfaces in the config the default rule applies: DHCP on the first hardware link
//! with carrier. `apply` is a try: the new config is put in place, checked (every link it names
//! exists, static gateways answer a ping, DHCP links get a lease) and rolled back to the last
//! good one when the check fails, so a bad apply never cuts the node off.

//!
//! Also [`loopback`]: `lo` up, for the host tests and nodes where sysd leaves the network
//! alone. This crate knows the config types (`keelson-spec`) and the runtime's bridge plug
//! (`keelson-runtime::netplug`), nothing of services or the API: it reports through the
//! channel of [`Notice`]s it is given and the `watch` of its online state it publishes
//! ([`Net::online_changes`]).

pub mod bridge;
pub mod dhcp;
pub mod links;
pub mod loopback;
mod probe;
mod resolv;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use keelson_common::api::network::{
    EndpointStatus, LeaseStatus, LinkStatus, NetworkStatus, RouteStatus,
};
use keelson_common::error::{Classify, Kind};
use keelson_common::notice::Notice;
use keelson_runtime::RootModules;
use rtnetlink::packet_route::route::RouteProtocol;
use rtnetlink::packet_route::RouteNetlinkMessage;
use tokio::sync::{mpsc, watch};

use dhcp::{Lease, Report};
use keelson_spec::network::{Cidr, InterfaceSpec, NetConfig, NetworkSpec};
use links::{Link, Netlink};

/// Default `online_timeout`.
const ONLINE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the default rule waits for a link with carrier before taking the first link.
const CARRIER_WAIT: Duration = Duration::from_secs(5);
/// How long after a look that finds the default route or DNS gone the next look confirms it
/// before an online node is reported offline.
const OFFLINE_CONFIRM: Duration = Duration::from_secs(1);
/// How long `apply` waits for the checks of a new config before rolling back.
const TRY_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a stopping DHCP client may take to release its lease.
const CLIENT_STOP: Duration = Duration::from_secs(3);

/// Where networking keeps and writes things (overridable for tests).
#[derive(Debug, Clone)]
pub struct Paths {
    /// Leases (`lease-IFNAME.json`), kept across reboots.
    pub state_dir: PathBuf,
    /// The resolver file /etc/resolv.conf points to.
    pub resolv_conf: PathBuf,
    /// Written with the hostname in force (init renders the first one).
    pub hostname_file: PathBuf,
    /// The machine ID, for the default hostname.
    pub machine_id: PathBuf,
    /// `nft`: the binary, or the root of an image holding Debian's nftables.
    pub nft: PathBuf,
}

/// Whether services waiting for `network-online` may start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Online {
    Pending,
    /// A default route and a DNS server are present.
    Reached,
    /// The timeout passed; dependents started anyway. The reason says what was missing.
    TimedOut(String),
    /// No link can carry traffic (there is none besides loopback, or none of the configured
    /// links has carrier): dependents start at once instead of after the timeout, and it
    /// becomes `Reached` if a link comes. The reason says which.
    Unreachable(String),
}

/// Why the network manager could not do what it was asked. The texts name the link, key or
/// address and what went wrong, as `keelctl apply` and the event stream show them.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The config asks for what this node does not have (a link that does not exist, a name
    /// taken by another kind of link, a member another entry configures): refused before
    /// anything changed.
    #[error("{0}")]
    Refused(String),
    /// A netlink request failed.
    #[error("{}", chain(.0))]
    Netlink(links::Error),
    /// A netlink request for one link or step (named first) failed.
    #[error("{step}: {}", chain(.err))]
    Step { step: String, err: links::Error },
    /// The try's check failed: a gateway that does not answer, a link without a lease.
    #[error("{0}")]
    Check(String),
    /// Container networking: the bridge, its addresses, files or nftables rules.
    #[error(transparent)]
    Bridge(#[from] bridge::Error),
    /// The new config failed to be put in place or its check; the previous one is back.
    #[error("{0}; rolled back to the previous network config")]
    RolledBack(Box<Error>),
}

impl Classify for Error {
    fn kind(&self) -> Kind {
        match self {
            Error::Refused(_) | Error::Check(_) | Error::RolledBack(_) => Kind::Invalid,
            Error::Netlink(_) | Error::Step { .. } => Kind::Internal,
            Error::Bridge(e) => e.kind(),
        }
    }
}

impl From<links::Error> for Error {
    fn from(e: links::Error) -> Self {
        Error::Netlink(e)
    }
}

/// What [`Net::apply`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// The config's network and host tables are the ones in force.
    Unchanged,
    /// Only `[host]` changed: the hostname was updated, no link touched.
    Hostname,
    /// The new network config is in place and passed its check.
    Network,
}

/// One link sysd configures, and what it put there.
#[derive(Debug, Default)]
struct Managed {
    spec: InterfaceSpec,
    addresses: Vec<Cidr>,
    routes: Vec<(Cidr, Option<IpAddr>)>,
}

struct ClientHandle {
    stop: watch::Sender<bool>,
    carrier: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Default)]
struct State {
    config: NetConfig,
    /// By link name.
    managed: BTreeMap<String, Managed>,
    leases: BTreeMap<String, Lease>,
    dns: Vec<IpAddr>,
    search: Vec<String>,
    hostname: (String, &'static str),
    /// Published ports by service (bridge services that have started).
    ports: BTreeMap<String, (Ipv4Addr, Vec<keelson_spec::network::PortSpec>)>,
    bridge_up: bool,
}

/// The network manager.
pub struct Net {
    nl: Netlink,
    paths: Paths,
    /// Events for sysd's event stream.
    events: mpsc::UnboundedSender<Notice>,
    state: Mutex<State>,
    clients: Mutex<BTreeMap<String, ClientHandle>>,
    reports: mpsc::UnboundedSender<Report>,
    online: watch::Sender<Online>,
    apply_lock: tokio::sync::Mutex<()>,
    /// Bumped on every lease change (apply's try waits on it).
    lease_epoch: watch::Sender<u64>,
    /// One bridge attachment at a time (allocation, hosts file, ruleset).
    bridge_lock: tokio::sync::Mutex<()>,
    /// The root's kernel modules init loads beside sysd's start: bonds (bonding), VLANs
    /// (8021q) and the container bridge (bridge, nf_tables) wait for them; plain links,
    /// DHCP and the hostname do not.
    modules: RootModules,
}

impl Net {
    /// Starts the manager with the boot config: links, addresses, routes, DHCP, link events.
    /// What happens is reported on `events`; the online state is [`Net::online_changes`].
    /// What needs a kernel module (a bond, a VLAN, the container bridge) waits for `modules`.
    pub fn start(
        paths: Paths,
        config: NetConfig,
        events: mpsc::UnboundedSender<Notice>,
        modules: RootModules,
    ) -> Result<Arc<Net>, links::Error> {
        let nl = Netlink::open()?;
        let (reports, reports_rx) = mpsc::unbounded_channel();
        let net = Arc::new(Net {
            nl,
            paths,
            events,
            state: Mutex::new(State::default()),
            clients: Mutex::new(BTreeMap::new()),
            reports,
            online: watch::channel(Online::Pending).0,
            apply_lock: tokio::sync::Mutex::new(()),
            lease_epoch: watch::channel(0).0,
            bridge_lock: tokio::sync::Mutex::new(()),
            modules,
        });
        let timeout = config
            .network
            .online_timeout
            .map(|s| s.0)
            .unwrap_or(ONLINE_TIMEOUT);
        // Known at once (bridge services may attach before the first reconcile is done).
        net.state.lock().unwrap_or_else(|p| p.into_inner()).config = config.clone();
        tokio::spawn(Arc::clone(&net).handle_reports(reports_rx));
        tokio::spawn(Arc::clone(&net).watch_links());
        {
            let net = Arc::clone(&net);
            tokio::spawn(async move {
                let started = tokio::time::Instant::now();
                {
                    let _guard = net.apply_lock.lock().await;
                    if let Err(e) = net.reconcile(config).await {
                        net.emit("network-error", format!("boot network config: {e}"));
                    }
                }
                net.settle_without_links(started + CARRIER_WAIT).await;
            });
        }
        {
            let net = Arc::clone(&net);
            tokio::spawn(async move {
                tokio::time::sleep(timeout).await;
                if *net.online.borrow() == Online::Pending {
                    net.refresh().await;
                }
                if *net.online.borrow() == Online::Pending {
                    let reason = net.missing().await;
                    net.emit(
                        "network-online-timeout",
                        format!(
                            "not online after {}s ({reason}); starting the services that wait for network-online anyway",
                            timeout.as_secs()
                        ),
                    );
                    net.online.send_replace(Online::TimedOut(reason));
                }
            });
        }
        Ok(net)
    }

    pub fn online(&self) -> Online {
        self.online.borrow().clone()
    }

    /// The online state, to wait on its changes (services that depend on `network-online`).
    pub fn online_changes(&self) -> watch::Receiver<Online> {
        self.online.subscribe()
    }

    fn emit(&self, kind: &'static str, message: String) {
        // The receiver goes only when sysd is ending: nothing left to tell.
        let _ = self.events.send(Notice::new(kind, message));
    }

    /// Applies a new config as a try: on a failed check the previous one is restored and the
    /// error says what failed and that it was rolled back.
    pub async fn apply(&self, new: NetConfig) -> Result<Applied, Error> {
        let _guard = self.apply_lock.lock().await;
        let old = self
            .state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .config
            .clone();
        if old.network == new.network && old.host == new.host {
            self.state.lock().unwrap_or_else(|p| p.into_inner()).config = new;
            return Ok(Applied::Unchanged);
        }
        if old.network == new.network {
            // Only `[host]` changed: a new hostname needs no links touched and no try.
            self.state.lock().unwrap_or_else(|p| p.into_inner()).config = new;
            self.refresh().await;
            return Ok(Applied::Hostname);
        }
        let links = self.nl.links().await?;
        // Unknown interfaces are refused before anything changes.
        virtual_plan(&new.network, &old.network, &links)?;
        plan(&new.network, &links)?;
        if let Err(e) = self.reconcile(new.clone()).await {
            self.rollback(old).await;
            return Err(Error::RolledBack(Box::new(e)));
        }
        if let Err(e) = self.check(&new).await {
            self.rollback(old).await;
            self.emit(
                "network-rollback",
                format!("new network config failed its check ({e}); previous config restored"),
            );
            return Err(Error::RolledBack(Box::new(e)));
        }
        self.emit(
            "network-applied",
            "network config applied and checked".into(),
        );
        Ok(Applied::Network)
    }

    async fn rollback(&self, old: NetConfig) {
        if let Err(e) = self.reconcile(old).await {
            self.emit(
                "network-error",
                format!("restoring the previous config: {e}"),
            );
        }
    }

    /// The try's check: static gateways answer, DHCP links hold a lease.
    async fn check(&self, cfg: &NetConfig) -> Result<(), Error> {
        let deadline = tokio::time::Instant::now() + TRY_TIMEOUT;
        for (label, ifc) in &cfg.network.interfaces {
            let gateways = ifc
                .gateway
                .map(IpAddr::V4)
                .into_iter()
                .chain(ifc.routes.iter().map(|r| r.via))
                .filter(IpAddr::is_ipv4);
            for gw in gateways {
                let IpAddr::V4(v4) = gw else { continue };
                if !probe::ping(v4, Duration::from_secs(3)).await {
                    return Err(Error::Check(format!(
                        "network.interfaces.{label}: gateway {gw} does not answer"
                    )));
                }
            }
        }
        let dhcp_links: Vec<String> = {
            let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
            st.managed
                .iter()
                .filter(|(_, m)| m.spec.dhcp)
                .map(|(n, _)| n.clone())
                .collect()
        };
        let mut rx = self.lease_epoch.subscribe();
        for link in dhcp_links {
            loop {
                let has = self
                    .state
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .leases
                    .contains_key(&link);
                if has {
                    break;
                }
                tokio::select! {
                    r = rx.changed() => if r.is_err() { break },
                    _ = tokio::time::sleep_until(deadline) => {
                        return Err(Error::Check(format!("{link}: no DHCP lease within {}s", TRY_TIMEOUT.as_secs())));
                    }
                }
            }
        }
        Ok(())
    }

    /// Makes the kernel match `cfg`; idempotent.
    async fn reconcile(&self, cfg: NetConfig) -> Result<(), Error> {
        let prev = self
            .state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .config
            .network
            .clone();
        let links = self.nl.links().await?;
        let steps = virtual_plan(&cfg.network, &prev, &links)?;
        if steps.iter().any(VirtualStep::needs_module) {
            self.modules.wait().await;
        }
        if !steps.is_empty() {
            self.run_virtual(steps).await?;
        }
        let links = self.nl.links().await?;
        let planned = if cfg.network.interfaces.is_empty() {
            self.default_rule(&links).await
        } else {
            plan(&cfg.network, &links)?
        };
        let planned_names: BTreeSet<String> = planned.iter().map(|(l, _)| l.name.clone()).collect();
        // Links no longer configured: take back what was put there.
        let gone: Vec<(String, Managed)> = {
            let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
            let names: Vec<String> = st
                .managed
                .keys()
                .filter(|n| !planned_names.contains(*n))
                .cloned()
                .collect();
            names
                .into_iter()
                .filter_map(|n| st.managed.remove(&n).map(|m| (n, m)))
                .collect()
        };
        for (name, m) in gone {
            self.stop_client(&name).await;
            if let Some(link) = links.iter().find(|l| l.name == name) {
                self.remove_statics(link.index, &m.addresses, &m.routes)
                    .await;
            }
        }
        for (link, spec) in planned {
            self.configure(&link, spec).await?;
        }
        {
            let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
            st.config = cfg;
        }
        self.refresh().await;
        Ok(())
    }

    /// Runs `virtual_plan`'s steps, looking names up as the links appear.
    async fn run_virtual(&self, steps: Vec<VirtualStep>) -> Result<(), Error> {
        for step in steps {
            let links = self.nl.links().await?;
            let index = |n: &str| {
                links
                    .iter()
                    .find(|l| l.name == n)
                    .map(|l| l.index)
                    .ok_or_else(|| Error::Refused(format!("no link {n}")))
            };
            let done = match &step {
                VirtualStep::Delete { index, .. } => self.nl.delete_link(*index).await,
                VirtualStep::Release { index, .. } => self.nl.release(*index).await,
                VirtualStep::AddBond { name } => self.nl.add_bond(name).await,
                VirtualStep::Enslave { member, bond } => {
                    self.nl.enslave(index(member)?, index(bond)?).await
                }
                VirtualStep::AddVlan { name, parent, id } => {
                    self.nl.add_vlan(name, index(parent)?, *id).await
                }
            };
            done.map_err(|err| Error::Step {
                step: step.to_string(),
                err,
            })?;
            self.emit("network-link", step.to_string());
        }
        Ok(())
    }

    /// The default rule: bring hardware links up, then DHCP on the first with carrier (or on
    /// the first one when none has carrier yet: its client waits for it).
    async fn default_rule(&self, links: &[Link]) -> Vec<(Link, InterfaceSpec)> {
        let candidates: Vec<&Link> = links
            .iter()
            .filter(|l| !l.loopback && l.kind.is_none() && l.mac.is_some())
            .collect();
        for l in &candidates {
            let _ = self.nl.set_up(l.index, None).await;
        }
        let deadline = tokio::time::Instant::now() + CARRIER_WAIT;
        // Without a candidate there is no carrier to wait for.
        let chosen = loop {
            if candidates.is_empty() {
                break None;
            }
            let now = self.nl.links().await.unwrap_or_default();
            let with_carrier = now
                .iter()
                .filter(|l| candidates.iter().any(|c| c.index == l.index) && l.carrier)
                .min_by_key(|l| l.index)
                .cloned();
            if let Some(l) = with_carrier {
                break Some(l);
            }
            if tokio::time::Instant::now() >= deadline {
                break candidates.first().map(|l| (*l).clone());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        match chosen {
            Some(l) => {
                // The default rule keeps the link it chose while it still exists.
                let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
                let keep = st
                    .managed
                    .keys()
                    .find(|n| candidates.iter().any(|c| &c.name == *n))
                    .and_then(|n| candidates.iter().find(|c| &c.name == n))
                    .map(|c| (*c).clone());
                let link = keep.unwrap_or(l);
                vec![(
                    link,
                    InterfaceSpec {
                        dhcp: true,
                        ..InterfaceSpec::default()
                    },
                )]
            }
            None => {
                self.emit(
                    "network-error",
                    "default rule: no network link found (only loopback)".into(),
                );
                Vec::new()
            }
        }
    }

    /// Configures one link: up + MTU, static addresses and routes (removing the ones a
    /// previous config put there), the DHCP client on or off.
    async fn configure(&self, link: &Link, spec: InterfaceSpec) -> Result<(), Error> {
        self.nl
            .set_up(link.index, spec.mtu)
            .await
            .map_err(|err| Error::Step {
                step: link.name.clone(),
                err,
            })?;
        let addresses: Vec<Cidr> = spec
            .addresses
            .iter()
            .filter_map(|a| Cidr::parse(a).ok())
            .collect();
        let mut routes: Vec<(Cidr, Option<IpAddr>)> = Vec::new();
        if let Some(gw) = spec.gateway {
            routes.push((
                Cidr {
                    addr: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                    prefix: 0,
                },
                Some(IpAddr::V4(gw)),
            ));
        }
        if let Some(gw) = spec.gateway6 {
            routes.push((
                Cidr {
                    addr: IpAddr::V6(Ipv6Addr::UNSPECIFIED),
                    prefix: 0,
                },
                Some(IpAddr::V6(gw)),
            ));
        }
        for r in &spec.routes {
            if let Ok(dst) = Cidr::parse(&r.to) {
                routes.push((dst, Some(r.via)));
            }
        }
        let (old_addrs, old_routes) = {
            let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
            st.managed
                .get(&link.name)
                .map(|m| (m.addresses.clone(), m.routes.clone()))
                .unwrap_or_default()
        };
        let stale_routes: Vec<_> = old_routes
            .iter()
            .filter(|r| !routes.contains(r))
            .cloned()
            .collect();
        let stale_addrs: Vec<_> = old_addrs
            .iter()
            .filter(|a| !addresses.contains(a))
            .cloned()
            .collect();
        self.remove_statics(link.index, &stale_addrs, &stale_routes)
            .await;
        // DHCP off: its client goes first (releasing its lease removes its address, which
        // may be the very address the static config is about to put there).
        let running = self
            .clients
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(&link.name);
        if !spec.dhcp && running {
            self.stop_client(&link.name).await;
        }

        for a in &addresses {
            self.nl
                .replace_address(link.index, *a, None)
                .await
                .map_err(|err| Error::Step {
                    step: link.name.clone(),
                    err,
                })?;
        }
        for (dst, via) in &routes {
            self.nl
                .replace_route(*dst, *via, link.index, None, RouteProtocol::Static, 0)
                .await
                .map_err(|err| Error::Step {
                    step: link.name.clone(),
                    err,
                })?;
        }
        let dhcp_on = spec.dhcp;
        {
            let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
            st.managed.insert(
                link.name.clone(),
                Managed {
                    spec,
                    addresses,
                    routes,
                },
            );
        }
        if dhcp_on && !running {
            self.start_client(link);
        }
        Ok(())
    }

    async fn remove_statics(&self, index: u32, addrs: &[Cidr], routes: &[(Cidr, Option<IpAddr>)]) {
        for (dst, via) in routes {
            let _ = self.nl.delete_route(*dst, *via, index, 0).await;
        }
        for a in addrs {
            let _ = self.nl.delete_address(index, *a).await;
        }
    }

    fn start_client(&self, link: &Link) {
        let Some(mac) = link.mac.as_deref().and_then(parse_mac) else {
            self.emit(
                "network-error",
                format!("{}: no MAC address, cannot run DHCP on it", link.name),
            );
            return;
        };
        let (stop, stop_rx) = watch::channel(false);
        let (carrier, carrier_rx) = watch::channel(link.carrier);
        let hostname = self.hostname_to_send();
        let client = dhcp::Client {
            nl: self.nl.clone(),
            index: link.index,
            name: link.name.clone(),
            mac,
            lease_file: self
                .paths
                .state_dir
                .join(format!("lease-{}.json", link.name)),
            hostname,
            carrier: carrier_rx,
            stop: stop_rx,
            reports: self.reports.clone(),
            how: "offered",
            fresh: false,
        };
        let task = tokio::spawn(client.run());
        self.emit(
            "dhcp-start",
            format!("{}: DHCPv4 client started", link.name),
        );
        self.clients
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                link.name.clone(),
                ClientHandle {
                    stop,
                    carrier,
                    task,
                },
            );
    }

    async fn stop_client(&self, name: &str) {
        let handle = self
            .clients
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name);
        if let Some(h) = handle {
            h.stop.send_replace(true);
            let mut task = h.task;
            if tokio::time::timeout(CLIENT_STOP, &mut task).await.is_err() {
                // Still releasing (a loaded machine, a server that does not answer): stop it
                // here. Left running, its late release would remove what the config being
                // applied puts in place, the very same address as often as not (and with it
                // every route through it). Its routes go now; its address is the new
                // config's business.
                task.abort();
                let _ = task.await;
                let index = self
                    .nl
                    .links()
                    .await
                    .ok()
                    .and_then(|links| links.iter().find(|l| l.name == name).map(|l| l.index));
                if let (Some(index), Ok(routes)) = (index, self.nl.routes().await) {
                    for r in routes
                        .iter()
                        .filter(|r| r.oif == Some(index) && r.metric == dhcp::DHCP_METRIC)
                    {
                        let _ = self
                            .nl
                            .delete_route(r.dst, r.gateway, index, dhcp::DHCP_METRIC)
                            .await;
                    }
                }
                self.emit(
                    "dhcp-stopped",
                    format!(
                        "{name}: the DHCP client did not release within {} s; stopped, its routes removed",
                        CLIENT_STOP.as_secs()
                    ),
                );
            }
        }
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .leases
            .remove(name);
    }

    /// Stops every DHCP client (each releases its lease). For sysd's shutdown.
    pub async fn shutdown(&self) {
        let names: Vec<String> = self
            .clients
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .cloned()
            .collect();
        for n in names {
            self.stop_client(&n).await;
        }
    }

    fn hostname_to_send(&self) -> Option<String> {
        let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.config.host.hostname.clone()
    }

    async fn handle_reports(self: Arc<Self>, mut rx: mpsc::UnboundedReceiver<Report>) {
        while let Some(r) = rx.recv().await {
            match r {
                Report::Bound { link, lease, how } => {
                    self.emit(
                        "dhcp-lease",
                        format!(
                            "{link}: {} {}/{} from {} for {}s (routers {}, dns {})",
                            how,
                            lease.address,
                            lease.prefix,
                            lease.server,
                            lease.lease_secs,
                            join(&lease.routers),
                            join(&lease.dns),
                        ),
                    );
                    self.state
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .leases
                        .insert(link, lease);
                }
                Report::Unbound { link, why } => {
                    self.emit("dhcp-unbound", format!("{link}: no lease ({why})"));
                    self.state
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .leases
                        .remove(&link);
                }
                Report::Note {
                    link,
                    kind,
                    message,
                } => {
                    self.emit(kind, format!("{link}: {message}"));
                    continue;
                }
            }
            self.lease_epoch.send_modify(|n| *n += 1);
            self.refresh().await;
        }
    }

    /// Link events: carrier changes go to the DHCP client of the link and become events;
    /// route events re-evaluate network-online.
    async fn watch_links(self: Arc<Self>) {
        let Ok((conn, _handle, mut messages)) = rtnetlink::new_multicast_connection(&[
            rtnetlink::MulticastGroup::Link,
            rtnetlink::MulticastGroup::Ipv4Route,
            rtnetlink::MulticastGroup::Ipv6Route,
        ]) else {
            self.emit("network-error", "cannot subscribe to link events".into());
            return;
        };
        tokio::spawn(conn);
        let mut carriers: BTreeMap<u32, bool> = BTreeMap::new();
        while let Some((msg, _)) = messages.next().await {
            let rtnetlink::packet_core::NetlinkPayload::InnerMessage(inner) = msg.payload else {
                continue;
            };
            let m = match inner {
                RouteNetlinkMessage::NewLink(m) => m,
                // A default route came or went (ours or anyone's): online may have changed.
                RouteNetlinkMessage::NewRoute(_) | RouteNetlinkMessage::DelRoute(_) => {
                    self.refresh().await;
                    continue;
                }
                _ => continue,
            };
            let links = match self.nl.links().await {
                Ok(l) => l,
                Err(_) => continue,
            };
            let Some(link) = links.iter().find(|l| l.index == m.header.index) else {
                continue;
            };
            let before = carriers.insert(link.index, link.carrier);
            if before.is_some() && before != Some(link.carrier) || before.is_none() && !link.carrier
            {
                let managed = self
                    .state
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .managed
                    .contains_key(&link.name);
                if managed && before.is_some() {
                    self.emit(
                        "link",
                        format!(
                            "{}: carrier {}",
                            link.name,
                            if link.carrier { "up" } else { "down" }
                        ),
                    );
                }
            }
            if let Some(c) = self
                .clients
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&link.name)
            {
                c.carrier.send_if_modified(|v| {
                    let changed = *v != link.carrier;
                    *v = link.carrier;
                    changed
                });
            }
            self.refresh().await;
        }
    }

    /// Re-derives resolv.conf, the hostname and the online state.
    async fn refresh(&self) {
        let (dns, search, hostname) = {
            let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
            let mut dns: Vec<IpAddr> = st.config.network.dns.clone();
            let mut search: Vec<String> = st.config.network.search.clone();
            for l in st.leases.values() {
                dns.extend(l.dns.iter().map(|d| IpAddr::V4(*d)));
                search.extend(l.domain.iter().cloned());
            }
            dedup(&mut dns);
            dedup(&mut search);
            let hostname = if let Some(h) = &st.config.host.hostname {
                (h.clone(), "config")
            } else if let Some(h) = st
                .leases
                .values()
                .find_map(|l| l.hostname.clone())
                .filter(|h| keelson_spec::network::valid_hostname(h))
            {
                (h, "dhcp")
            } else {
                (default_hostname(&self.paths.machine_id), "machine-id")
            };
            let changed_dns = st.dns != dns || st.search != search;
            st.dns = dns.clone();
            st.search = search.clone();
            let changed_host = st.hostname.0 != hostname.0;
            st.hostname = hostname.clone();
            (
                changed_dns.then_some(dns),
                search,
                changed_host.then_some(hostname),
            )
        };
        if let Some(dns) = dns {
            match resolv::write(&self.paths.resolv_conf, &dns, &search) {
                Ok(()) => self.emit(
                    "dns",
                    format!(
                        "resolv.conf: nameservers {}; search {}",
                        join(&dns),
                        if search.is_empty() {
                            "-".into()
                        } else {
                            search.join(" ")
                        }
                    ),
                ),
                Err(e) => self.emit(
                    "network-error",
                    format!("writing {}: {e}", self.paths.resolv_conf.display()),
                ),
            }
        }
        if let Some((name, source)) = hostname {
            let current = nix::unistd::gethostname()
                .ok()
                .and_then(|h| h.into_string().ok());
            if current.as_deref() != Some(&name) {
                if let Err(e) = nix::unistd::sethostname(&name) {
                    self.emit("network-error", format!("setting the hostname: {e}"));
                }
            }
            if let Err(e) = keelson_common::durable::replace(
                &self.paths.hostname_file,
                format!("{name}\n").as_bytes(),
            ) {
                self.emit("network-error", e.to_string());
            }
            self.emit("hostname", format!("{name} (from {source})"));
        }
        let Some(missing) = self.missing_checked().await else {
            return;
        };
        if missing.is_empty() {
            if *self.online.borrow() != Online::Reached {
                self.emit(
                    "network-online",
                    "default route and DNS server present".into(),
                );
                self.online.send_replace(Online::Reached);
            }
        } else if *self.online.borrow() == Online::Reached {
            // A node that was online goes offline only on a second look: a route table read
            // while links and routes change around it (a bridge, a veth, a module's new link)
            // is not a lost default route, and nothing would look again until the next event.
            tokio::time::sleep(OFFLINE_CONFIRM).await;
            let Some(missing) = self.missing_checked().await else {
                return;
            };
            if !missing.is_empty() && *self.online.borrow() == Online::Reached {
                // Lost it (lease expired, link gone): dependents already started stay up.
                self.emit("network-offline", missing.clone());
                self.online.send_replace(Online::Pending);
            }
        }
    }

    /// [`missing`](Self::missing), or None when the kernel's route table could not be read:
    /// that says nothing about the default route, so the online state stays as it is.
    async fn missing_checked(&self) -> Option<String> {
        match self.nl.routes().await {
            Ok(routes) => Some(self.missing_from(&routes)),
            Err(e) => {
                tracing::warn!(
                    "network: reading the route table: {}; online state kept",
                    chain(&e)
                );
                None
            }
        }
    }

    /// Settles `network-online` as unreachable when no link can bring it: none is managed
    /// (a guest without a NIC), or none of the managed links has carrier by `carrier_by`.
    /// Like `systemd-networkd-wait-online --any`, which waits only while some link could still
    /// come online: a node with no cable or no NIC would otherwise hold every service after
    /// `network-online` for the whole `online_timeout`. A link with carrier whose DHCP or
    /// route is slow keeps the timeout, and a link that comes later still makes it `Reached`.
    async fn settle_without_links(&self, carrier_by: tokio::time::Instant) {
        loop {
            if *self.online.borrow() != Online::Pending {
                return;
            }
            let managed: Vec<String> = self
                .state
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .managed
                .keys()
                .cloned()
                .collect();
            let links = self.nl.links().await.unwrap_or_default();
            let reason = no_link_reason(&managed, &links);
            let Some(reason) = reason else {
                return;
            };
            if !managed.is_empty() && tokio::time::Instant::now() < carrier_by {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            if *self.online.borrow() == Online::Pending {
                self.emit(
                    "network-unreachable",
                    format!("{reason}; starting the services that wait for network-online now"),
                );
                self.online.send_replace(Online::Unreachable(reason));
            }
            return;
        }
    }

    /// What `network-online` still lacks ("" when nothing); a route table that cannot be read
    /// counts as no default route (for the reason given when a wait times out).
    async fn missing(&self) -> String {
        let routes = self.nl.routes().await.unwrap_or_default();
        self.missing_from(&routes)
    }

    /// What `network-online` lacks, given the kernel's routes.
    fn missing_from(&self, routes: &[links::Route]) -> String {
        let has_default = routes.iter().any(|r| r.dst.prefix == 0);
        let has_dns = !self
            .state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .dns
            .is_empty();
        match (has_default, has_dns) {
            (true, true) => String::new(),
            (false, true) => "no default route".into(),
            (true, false) => "no DNS server".into(),
            (false, false) => "no default route and no DNS server".into(),
        }
    }

    /// Gives a bridge service its place: the bridge (created on first use, with forwarding
    /// on), its address (kept across restarts), the hosts file, and the nftables rules for
    /// its published ports. The runtime helper plugs the container in with the result.
    pub async fn attach(
        &self,
        service: &str,
        ports: &[keelson_spec::network::PortSpec],
    ) -> Result<bridge::Endpoint, Error> {
        self.place(service, ports, None).await
    }

    /// Gives a container a previous sysd plugged in (adopted across a sysd restart) its place
    /// back as it has it: the same address in the store (taken back if the store lost it),
    /// the hosts file, its published ports in the ruleset. Refused, saying why, when the
    /// bridge as it is now cannot take that endpoint back: another subnet or bridge, its
    /// address kept for another service or the service kept at another one, its veth gone.
    pub async fn reattach(
        &self,
        kept: &bridge::Endpoint,
        ports: &[keelson_spec::network::PortSpec],
    ) -> Result<(), Error> {
        self.place(&kept.service, ports, Some(kept)).await.map(drop)
    }

    async fn place(
        &self,
        service: &str,
        ports: &[keelson_spec::network::PortSpec],
        kept: Option<&bridge::Endpoint>,
    ) -> Result<bridge::Endpoint, Error> {
        // The bridge, veth pairs and the ruleset need bridge, veth and nf_tables (the nft_*
        // modules for masquerade and published ports).
        self.modules.wait().await;
        let _guard = self.bridge_lock.lock().await;
        let subnet = {
            let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
            st.config.network.bridge_subnet()
        };
        let gw = bridge::gateway(subnet);
        let bridge_up = self
            .state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .bridge_up;
        if !bridge_up {
            // An older init does not say when its background loader is through (no
            // `root-modules.loading`): the bridge module may still be loading, a few tries.
            let mut tries = 0;
            loop {
                match self.ensure_bridge(subnet, gw).await {
                    Ok(()) => break,
                    Err(e) if tries < 10 => {
                        tries += 1;
                        tracing::debug!("bridge not ready yet: {e}");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        let ipam_path = bridge::ipam_path(&self.paths.state_dir);
        let mut ipam = bridge::Ipam::load(&ipam_path, subnet);
        let address = match kept {
            None => ipam.allocate(service, subnet)?,
            Some(ep) => {
                let not_kept = |why: String| bridge::Error::NotKept {
                    address: ep.address,
                    prefix: ep.prefix,
                    bridge: ep.bridge.clone(),
                    why,
                };
                if ep.bridge != bridge::BRIDGE
                    || ep.prefix != subnet.prefix
                    || ep.gateway != gw
                    || ep.host_if != bridge::host_if_name(service)
                {
                    return Err(not_kept(format!(
                        "is not on the bridge as it is now ({} {subnet} via {gw})",
                        bridge::BRIDGE
                    ))
                    .into());
                }
                ipam.claim(service, ep.address, subnet).map_err(not_kept)?;
                let links = self.nl.links().await?;
                if !links.iter().any(|l| l.name == ep.host_if) {
                    return Err(not_kept(format!("has lost its veth {}", ep.host_if)).into());
                }
                ep.address
            }
        };
        ipam.store(&ipam_path).map_err(|err| bridge::Error::Keep {
            path: ipam_path.clone(),
            err,
        })?;
        bridge::write_in_place(&self.hosts_file(), &bridge::render_hosts(&ipam)).map_err(
            |err| bridge::Error::Hosts {
                path: self.hosts_file(),
                err,
            },
        )?;
        let rules = {
            let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
            st.ports
                .insert(service.to_string(), (address, ports.to_vec()));
            let all: Vec<(Ipv4Addr, keelson_spec::network::PortSpec)> = st
                .ports
                .values()
                .flat_map(|(ip, ps)| ps.iter().map(move |p| (*ip, *p)))
                .collect();
            bridge::render_ruleset(subnet, &all)
        };
        let nft = self.paths.nft.clone();
        tokio::task::spawn_blocking(move || bridge::nft_load(&nft, &rules))
            .await
            .map_err(|e| bridge::Error::Task(chain(&e)))??;
        self.emit(
            "endpoint",
            format!(
                "{service}: {address}/{} on {} via {gw}{}{}",
                subnet.prefix,
                bridge::BRIDGE,
                if kept.is_some() { " (kept)" } else { "" },
                if ports.is_empty() {
                    String::new()
                } else {
                    format!(
                        ", publishing {}",
                        ports
                            .iter()
                            .map(|p| format!("{}->{}/{}", p.host, p.container, p.proto))
                            .collect::<Vec<_>>()
                            .join(" ")
                    )
                }
            ),
        );
        Ok(bridge::Endpoint {
            service: service.to_string(),
            address,
            prefix: subnet.prefix,
            gateway: gw,
            bridge: bridge::BRIDGE.to_string(),
            host_if: bridge::host_if_name(service),
        })
    }

    /// The hosts file bridge containers get as /etc/hosts.
    pub fn hosts_file(&self) -> PathBuf {
        self.paths.resolv_conf.with_file_name("hosts")
    }

    async fn ensure_bridge(&self, subnet: Cidr, gw: Ipv4Addr) -> Result<(), Error> {
        let links = self.nl.links().await?;
        let index = match links.iter().find(|l| l.name == bridge::BRIDGE) {
            Some(l) => l.index,
            None => {
                self.nl.add_bridge(bridge::BRIDGE).await?;
                self.nl
                    .links()
                    .await?
                    .iter()
                    .find(|l| l.name == bridge::BRIDGE)
                    .map(|l| l.index)
                    .ok_or(bridge::Error::Vanished)?
            }
        };
        self.nl
            .replace_address(
                index,
                Cidr {
                    addr: IpAddr::V4(gw),
                    prefix: subnet.prefix,
                },
                None,
            )
            .await?;
        self.nl.set_up(index, None).await?;
        std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").map_err(bridge::Error::Forwarding)?;
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .bridge_up = true;
        Ok(())
    }

    /// `GET /v1/network`.
    pub async fn status(&self) -> NetworkStatus {
        let links = self.nl.links().await.unwrap_or_default();
        let addrs = self.nl.addresses().await.unwrap_or_default();
        let routes = self.nl.routes().await.unwrap_or_default();
        let name_of = |i: u32| links.iter().find(|l| l.index == i).map(|l| l.name.clone());
        let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let (online, online_reason) = match &*self.online.borrow() {
            Online::Pending => ("pending", None),
            Online::Reached => ("online", None),
            Online::TimedOut(r) => ("timed-out", Some(r.clone())),
            Online::Unreachable(r) => ("unreachable", Some(r.clone())),
        };
        NetworkStatus {
            online: online.into(),
            online_reason,
            hostname: st.hostname.0.clone(),
            hostname_source: st.hostname.1.into(),
            links: links
                .iter()
                .map(|l| LinkStatus {
                    index: l.index,
                    name: l.name.clone(),
                    mac: l.mac.clone(),
                    up: l.up,
                    carrier: l.carrier,
                    mtu: l.mtu,
                    kind: l.kind.clone(),
                    addresses: addrs
                        .iter()
                        .filter(|a| a.index == l.index)
                        .map(|a| a.cidr.to_string())
                        .collect(),
                    managed: st.managed.get(&l.name).map(|m| {
                        match (m.spec.dhcp, !m.spec.addresses.is_empty()) {
                            (true, true) => "dhcp+static",
                            (true, false) => "dhcp",
                            _ => "static",
                        }
                        .to_string()
                    }),
                })
                .collect(),
            routes: routes
                .iter()
                .filter(|r| !r.dst.addr.is_ipv6() || r.dst.prefix == 0 || r.gateway.is_some())
                .map(|r| RouteStatus {
                    destination: if r.dst.prefix == 0 {
                        "default".into()
                    } else {
                        r.dst.to_string()
                    },
                    gateway: r.gateway.map(|g| g.to_string()),
                    device: r.oif.and_then(name_of),
                    protocol: r.protocol.clone(),
                    metric: r.metric,
                })
                .collect(),
            dns: st.dns.iter().map(ToString::to_string).collect(),
            search: st.search.clone(),
            leases: st
                .leases
                .iter()
                .map(|(link, l)| LeaseStatus {
                    link: link.clone(),
                    address: format!("{}/{}", l.address, l.prefix),
                    server: l.server.to_string(),
                    routers: l.routers.iter().map(ToString::to_string).collect(),
                    dns: l.dns.iter().map(ToString::to_string).collect(),
                    domain: l.domain.clone(),
                    lease_secs: l.lease_secs,
                    remaining_secs: l.remaining_secs(),
                    t1_secs: l.t1_secs,
                    t2_secs: l.t2_secs,
                })
                .collect(),
            endpoints: st
                .ports
                .iter()
                .map(|(service, (ip, ports))| EndpointStatus {
                    service: service.clone(),
                    address: format!("{ip}/{}", st.config.network.bridge_subnet().prefix),
                    bridge: bridge::BRIDGE.into(),
                    ports: ports
                        .iter()
                        .map(|p| format!("{}:{}/{}", p.host, p.container, p.proto))
                        .collect(),
                })
                .collect(),
            config_origin: if st.config.network.interfaces.is_empty() {
                "default (DHCP on the first link with carrier)".into()
            } else {
                st.config.origin.clone().unwrap_or_default()
            },
        }
    }
}

/// Which link each configured interface is: every interface must match exactly one link
/// (several for a `name` prefix), or the config is refused naming the links there are.
fn plan(cfg: &NetworkSpec, links: &[Link]) -> Result<Vec<(Link, InterfaceSpec)>, Error> {
    let mut out = Vec::new();
    let mut taken = BTreeSet::new();
    for (label, spec) in &cfg.interfaces {
        let matched: Vec<&Link> = links.iter().filter(|l| matches(label, spec, l)).collect();
        if matched.is_empty() && (spec.vlan.is_some() || spec.bond.is_some()) {
            continue; // created by `virtual_plan`'s steps before it is configured
        }
        if matched.is_empty() {
            let names: Vec<&str> = links
                .iter()
                .filter(|l| !l.loopback)
                .map(|l| l.name.as_str())
                .collect();
            return Err(Error::Refused(format!(
                "network.interfaces.{label}: no such link on this node (links: {})",
                if names.is_empty() {
                    "none".into()
                } else {
                    names.join(", ")
                }
            )));
        }
        for l in matched {
            if !taken.insert(l.index) {
                return Err(Error::Refused(format!(
                    "network.interfaces.{label}: link {} is already configured by another entry",
                    l.name
                )));
            }
            out.push((l.clone(), spec.clone()));
        }
    }
    Ok(out)
}

/// One step towards the config's VLAN and bond links.
#[derive(Debug, Clone, PartialEq, Eq)]
enum VirtualStep {
    /// A VLAN or bond that left the config (or changed): deleted.
    Delete {
        name: String,
        index: u32,
    },
    /// A member that left its bond: released.
    Release {
        member: String,
        index: u32,
    },
    AddBond {
        name: String,
    },
    /// Enslave `member` to bond `bond` (by name: the bond may be created by this plan).
    Enslave {
        member: String,
        bond: String,
    },
    AddVlan {
        name: String,
        parent: String,
        id: u16,
    },
}

impl VirtualStep {
    /// Whether the step creates a link whose kernel module (bonding, 8021q) init loads with
    /// the root's modules; deleting, releasing and enslaving work on links that exist.
    fn needs_module(&self) -> bool {
        matches!(
            self,
            VirtualStep::AddBond { .. } | VirtualStep::AddVlan { .. }
        )
    }
}

impl std::fmt::Display for VirtualStep {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VirtualStep::Delete { name, .. } => write!(f, "deleting link {name}"),
            VirtualStep::Release { member, .. } => write!(f, "releasing {member} from its bond"),
            VirtualStep::AddBond { name } => write!(f, "creating bond {name} (active-backup)"),
            VirtualStep::Enslave { member, bond } => write!(f, "enslaving {member} to {bond}"),
            VirtualStep::AddVlan { name, parent, id } => {
                write!(f, "creating vlan {name} (id {id} on {parent})")
            }
        }
    }
}

/// The steps that make the links match the VLAN and bond entries of `cfg`, given the entries
/// of the config in force (`prev`); none when they already do. Refuses missing parents and
/// members, a name taken by another kind of link, and a member another entry configures.
fn virtual_plan(
    cfg: &NetworkSpec,
    prev: &NetworkSpec,
    links: &[Link],
) -> Result<Vec<VirtualStep>, Error> {
    let by_name = |n: &str| links.iter().find(|l| l.name == n);
    let mut steps = Vec::new();
    // Deletions first: vlans before the bonds they may ride on.
    let mut gone: Vec<(&String, &InterfaceSpec)> = prev
        .interfaces
        .iter()
        .filter(|(label, old)| {
            (old.vlan.is_some() || old.bond.is_some())
                && cfg.interfaces.get(*label).is_none_or(|new| {
                    new.vlan != old.vlan || new.bond.is_some() != old.bond.is_some()
                })
        })
        .collect();
    gone.sort_by_key(|(_, old)| old.bond.is_some());
    for (label, _) in gone {
        if let Some(l) = by_name(label) {
            if matches!(l.kind.as_deref(), Some("vlan" | "bond")) {
                steps.push(VirtualStep::Delete {
                    name: label.clone(),
                    index: l.index,
                });
            }
        }
    }
    let deleted: BTreeSet<String> = steps
        .iter()
        .filter_map(|s| match s {
            VirtualStep::Delete { name, .. } => Some(name.clone()),
            _ => None,
        })
        .collect();
    let exists = |name: &str, kind: &str| -> Result<bool, Error> {
        match by_name(name) {
            Some(_) if deleted.contains(name) => Ok(false),
            Some(l) if l.kind.as_deref() == Some(kind) => Ok(true),
            Some(l) => Err(Error::Refused(format!(
                "network.interfaces.{name}: a link named {name} already exists and is not a {kind} ({})",
                l.kind.as_deref().unwrap_or("hardware")
            ))),
            None => Ok(false),
        }
    };
    let mut members = BTreeSet::new();
    for (label, ifc) in &cfg.interfaces {
        let Some(bond) = &ifc.bond else { continue };
        let existing = if exists(label, "bond")? {
            by_name(label).map(|l| l.index)
        } else {
            steps.push(VirtualStep::AddBond {
                name: label.clone(),
            });
            None
        };
        if let Some(old) = prev.interfaces.get(label).and_then(|o| o.bond.as_ref()) {
            for m in old.members.iter().filter(|m| !bond.members.contains(m)) {
                if let Some(l) =
                    by_name(m).filter(|l| l.controller.is_some() && l.controller == existing)
                {
                    steps.push(VirtualStep::Release {
                        member: m.clone(),
                        index: l.index,
                    });
                }
            }
        }
        for (j, m) in bond.members.iter().enumerate() {
            members.insert(m.as_str());
            let Some(l) = by_name(m) else {
                return Err(Error::Refused(format!(
                    "network.interfaces.{label}.bond.members[{j}]: no link {m} on this node"
                )));
            };
            if existing.is_none() || l.controller != existing {
                steps.push(VirtualStep::Enslave {
                    member: m.clone(),
                    bond: label.clone(),
                });
            }
        }
    }
    for (label, ifc) in &cfg.interfaces {
        let Some(vlan) = &ifc.vlan else { continue };
        let parent_known = by_name(&vlan.parent).is_some()
            || cfg
                .interfaces
                .get(&vlan.parent)
                .is_some_and(|p| p.bond.is_some());
        if !parent_known {
            return Err(Error::Refused(format!(
                "network.interfaces.{label}.vlan.parent: no link {} on this node",
                vlan.parent
            )));
        }
        if !exists(label, "vlan")? {
            steps.push(VirtualStep::AddVlan {
                name: label.clone(),
                parent: vlan.parent.clone(),
                id: vlan.id,
            });
        }
    }
    // A member is the bond's alone: no other entry may match it.
    for (label, ifc) in &cfg.interfaces {
        if ifc.vlan.is_some() || ifc.bond.is_some() {
            continue;
        }
        if let Some(l) = links
            .iter()
            .find(|l| members.contains(l.name.as_str()) && matches(label, ifc, l))
        {
            return Err(Error::Refused(format!(
                "network.interfaces.{label}: link {} is a bond member; configure the bond instead",
                l.name
            )));
        }
    }
    Ok(steps)
}

fn matches(label: &str, spec: &InterfaceSpec, link: &Link) -> bool {
    if link.loopback {
        return false;
    }
    let Some(m) = &spec.matches else {
        return link.name == label;
    };
    if let Some(name) = &m.name {
        let ok = match name.strip_suffix('*') {
            Some(prefix) => link.name.starts_with(prefix),
            None => &link.name == name,
        };
        if !ok {
            return false;
        }
    }
    if let Some(mac) = &m.mac {
        if link.mac.as_deref() != Some(mac.to_ascii_lowercase().as_str()) {
            return false;
        }
    }
    if let Some(driver) = &m.driver {
        if link.driver().as_deref() != Some(driver.as_str()) {
            return false;
        }
    }
    true
}

/// An error with its causes, for messages a person reads (`netlink: listing links: ...`).
/// Why no link can bring `network-online` (see [`Net::settle_without_links`]), or None while
/// one of the `managed` links has carrier.
fn no_link_reason(managed: &[String], links: &[Link]) -> Option<String> {
    if managed.is_empty() {
        return Some("no network link to configure (only loopback)".into());
    }
    let with_carrier = links.iter().any(|l| l.carrier && managed.contains(&l.name));
    (!with_carrier).then(|| format!("no carrier on {}", managed.join(", ")))
}

pub(crate) fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cur = c.source();
    }
    out
}

fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut out = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut out {
        *b = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    Some(out)
}

/// `keelson-<first 8 hex of the machine ID>`, as init names a fresh node.
fn default_hostname(machine_id: &std::path::Path) -> String {
    let id = std::fs::read_to_string(machine_id).unwrap_or_default();
    let id = id.trim();
    if id.len() >= 8 && id.bytes().all(|c| c.is_ascii_hexdigit()) {
        format!("keelson-{}", &id[..8])
    } else {
        "keelson".into()
    }
}

fn dedup<T: PartialEq + Clone>(v: &mut Vec<T>) {
    let mut seen: Vec<T> = Vec::new();
    v.retain(|x| {
        if seen.contains(x) {
            false
        } else {
            seen.push(x.clone());
            true
        }
    });
}

fn join<T: ToString>(v: &[T]) -> String {
    if v.is_empty() {
        "-".into()
    } else {
        v.iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keelson_spec::network::LinkMatch;

    fn link(index: u32, name: &str, mac: &str) -> Link {
        Link {
            index,
            name: name.into(),
            mac: Some(mac.into()),
            up: true,
            carrier: true,
            mtu: 1500,
            kind: None,
            loopback: false,
            controller: None,
        }
    }

    fn net(text: &str) -> NetworkSpec {
        #[derive(serde::Deserialize)]
        struct Doc {
            network: NetworkSpec,
        }
        toml::from_str::<Doc>(text).unwrap().network
    }

    const VIRTUAL: &str = r#"
[network.interfaces.bond0]
bond = { mode = "active-backup", members = ["eth1", "eth2"] }
dhcp = true
[network.interfaces.v10]
vlan = { parent = "bond0", id = 10 }
addresses = ["10.10.0.5/24"]
"#;

    #[test]
    fn network_online_is_unreachable_only_without_a_link_with_carrier() {
        let mut eth0 = link(2, "eth0", "52:54:00:00:00:01");
        let eth1 = link(3, "eth1", "52:54:00:00:00:02");
        assert_eq!(
            no_link_reason(&[], &[eth0.clone()]).as_deref(),
            Some("no network link to configure (only loopback)")
        );
        let managed = ["eth0".to_owned()];
        assert_eq!(
            no_link_reason(&managed, &[eth0.clone(), eth1.clone()]),
            None
        );
        eth0.carrier = false;
        // eth1 has carrier but sysd does not manage it: it cannot bring network-online.
        assert_eq!(
            no_link_reason(&managed, &[eth0.clone(), eth1]).as_deref(),
            Some("no carrier on eth0")
        );
        assert_eq!(
            no_link_reason(&managed, &[]).as_deref(),
            Some("no carrier on eth0")
        );
    }

    #[test]
    fn virtual_plan_creates_enslaves_and_is_idempotent() {
        let cfg = net(VIRTUAL);
        let mut links = vec![
            link(2, "eth0", "52:54:00:00:00:01"),
            link(3, "eth1", "52:54:00:00:00:02"),
            link(4, "eth2", "52:54:00:00:00:03"),
        ];
        let steps = virtual_plan(&cfg, &NetworkSpec::default(), &links).unwrap();
        let s = |m: &str, b: &str| VirtualStep::Enslave {
            member: m.into(),
            bond: b.into(),
        };
        assert_eq!(
            steps,
            [
                VirtualStep::AddBond {
                    name: "bond0".into()
                },
                s("eth1", "bond0"),
                s("eth2", "bond0"),
                VirtualStep::AddVlan {
                    name: "v10".into(),
                    parent: "bond0".into(),
                    id: 10
                },
            ]
        );
        // Creating the bond and the VLAN waits for the root's modules (bonding, 8021q).
        let waits: Vec<bool> = steps.iter().map(VirtualStep::needs_module).collect();
        assert_eq!(waits, [true, false, false, true]);
        // Before they exist, plan() leaves the entries to these steps.
        assert_eq!(plan(&cfg, &links).unwrap().len(), 0);
        // Once done, nothing more to do; plan() configures the new links.
        let mut bond = link(5, "bond0", "52:54:00:00:00:02");
        bond.kind = Some("bond".into());
        let mut vlan = link(6, "v10", "52:54:00:00:00:02");
        vlan.kind = Some("vlan".into());
        links[1].controller = Some(5);
        links[2].controller = Some(5);
        links.extend([bond, vlan]);
        assert_eq!(virtual_plan(&cfg, &cfg, &links).unwrap(), []);
        let names: Vec<String> = plan(&cfg, &links)
            .unwrap()
            .into_iter()
            .map(|(l, _)| l.name)
            .collect();
        assert_eq!(names, ["bond0", "v10"]);

        // A member leaves the bond: released. Both leave the config: deleted, vlan first.
        let mut fewer = cfg.clone();
        fewer
            .interfaces
            .get_mut("bond0")
            .unwrap()
            .bond
            .as_mut()
            .unwrap()
            .members = vec!["eth1".into()];
        assert_eq!(
            virtual_plan(&fewer, &cfg, &links).unwrap(),
            [VirtualStep::Release {
                member: "eth2".into(),
                index: 4
            }]
        );
        let steps = virtual_plan(&NetworkSpec::default(), &cfg, &links).unwrap();
        assert_eq!(
            steps,
            [
                VirtualStep::Delete {
                    name: "v10".into(),
                    index: 6
                },
                VirtualStep::Delete {
                    name: "bond0".into(),
                    index: 5
                },
            ]
        );
        // Taking links down needs no module: nothing waits.
        assert!(!steps.iter().any(VirtualStep::needs_module));
    }

    #[test]
    fn virtual_plan_refuses_missing_links_and_taken_members() {
        let links = vec![
            link(2, "eth0", "52:54:00:00:00:01"),
            link(3, "eth1", "52:54:00:00:00:02"),
        ];
        let none = NetworkSpec::default();
        let e = virtual_plan(&net(VIRTUAL), &none, &links).unwrap_err();
        assert!(matches!(e, Error::Refused(_)), "{e:?}");
        assert_eq!(e.kind(), Kind::Invalid);
        assert_eq!(
            e.to_string(),
            "network.interfaces.bond0.bond.members[1]: no link eth2 on this node"
        );
        let e = virtual_plan(
            &net("[network.interfaces.v]\nvlan = { parent = \"eth9\", id = 3 }\ndhcp = true\n"),
            &none,
            &links,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("vlan.parent: no link eth9"), "{e}");
        let e = virtual_plan(
            &net("[network.interfaces.eth0]\nvlan = { parent = \"eth1\", id = 3 }\ndhcp = true\n"),
            &none,
            &links,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("already exists and is not a vlan (hardware)"),
            "{e}"
        );
        let e = virtual_plan(
            &net("[network.interfaces.b]\nbond = { members = [\"eth1\"] }\ndhcp = true\n[network.interfaces.any]\nmatch = { name = \"eth*\" }\ndhcp = true\n"),
            &none,
            &links,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("network.interfaces.any: link eth1 is a bond member"),
            "{e}"
        );
    }

    #[test]
    fn plan_matches_by_name_prefix_and_mac_and_names_unknown_links() {
        let links = vec![
            link(2, "eth0", "52:54:00:00:00:01"),
            link(3, "eth1", "52:54:00:00:00:02"),
        ];
        let mut cfg = NetworkSpec::default();
        cfg.interfaces.insert(
            "uplink".into(),
            InterfaceSpec {
                matches: Some(LinkMatch {
                    mac: Some("52:54:00:00:00:02".into()),
                    ..LinkMatch::default()
                }),
                dhcp: true,
                ..InterfaceSpec::default()
            },
        );
        cfg.interfaces.insert(
            "eth0".into(),
            InterfaceSpec {
                dhcp: true,
                ..InterfaceSpec::default()
            },
        );
        let p = plan(&cfg, &links).unwrap();
        let names: Vec<&str> = p.iter().map(|(l, _)| l.name.as_str()).collect();
        assert_eq!(names, ["eth0", "eth1"]);

        cfg.interfaces.insert(
            "eth9".into(),
            InterfaceSpec {
                dhcp: true,
                ..InterfaceSpec::default()
            },
        );
        let e = plan(&cfg, &links).unwrap_err().to_string();
        assert!(e.contains("network.interfaces.eth9: no such link"), "{e}");
        assert!(e.contains("eth0, eth1"), "{e}");
    }

    #[test]
    fn default_hostname_from_machine_id() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("machine-id");
        std::fs::write(&p, "0123456789abcdef0123456789abcdef\n").unwrap();
        assert_eq!(default_hostname(&p), "keelson-01234567");
    }
}
