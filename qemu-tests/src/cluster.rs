//! N guests on one L2 network: the multi-node harness.
//!
//! A [`Cluster`] creates one network namespace and, inside it, a Linux bridge with the host side
//! address [`HOST_ADDR`] (`10.77.0.1/24`), one tap device per guest on that bridge, and dnsmasq
//! on the bridge as the LAN's DHCP (and DNS) server, with a static reservation per node: node `i`
//! (0-based) has the MAC `52:54:00:4b:00:XX` and the address `10.77.0.(11 + i)`, and DHCP gives
//! it its name as host name (option 12). Everything the test starts in the namespace (servers,
//! clients, [`Cluster::run_in`], [`Cluster::command`]) reaches every guest at its address, and
//! guests reach each other and `10.77.0.1`; nothing reaches the internet.
//!
//! Each node is a clone of one template [`GuestBuilder`] (the image, boot mode, memory) with its
//! own disk (an overlay or copy of the template's disk, in the cluster's directory, so it
//! outlives a restart; no disk if the template has none), its own tap and MAC, and its own first-boot user data through fw_cfg
//! (`opt/keelson/user-data`, `opt/keelson/meta-data`, see `docs/first-boot.md`). All guests are
//! spawned before any is waited on, so they boot in parallel.
//!
//! Operations on node `i`: [`kill`](Cluster::kill) (SIGKILL to QEMU: a power cut),
//! [`restart`](Cluster::restart) (a new QEMU on the same disk, tap and MAC, hence the same
//! address), [`cut`](Cluster::cut) and [`heal`](Cluster::heal) (QEMU's `set_link n0 off|on`: the
//! guest's NIC loses its carrier and QEMU drops every frame in both directions, as with a pulled
//! cable).
//!
//! Failures explain themselves: each guest is labelled with its node name, so a test that panics
//! while the cluster is alive prints every node's serial tail under its name (and dnsmasq's log).
//! Drop kills every QEMU and dnsmasq, deletes the taps, the bridge and the namespace, and the
//! directory (kept with `KEELSON_KEEP=1`).

use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::guest::{copy_disk, create_overlay, DiskMode, TEST_SHELL_PORT};
use crate::{DiskFormat, Guest, GuestBuilder, NetNs};

/// The bridge's address in the namespace: the LAN's gateway, DHCP and DNS server.
pub const HOST_ADDR: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
/// The LAN's prefix length.
pub const PREFIX_LEN: u8 = 24;
/// Node `i` has the address `10.77.0.(FIRST_NODE_HOST + i)`.
const FIRST_NODE_HOST: u8 = 11;
/// More would leave the /24.
const MAX_NODES: usize = 200;
const BRIDGE: &str = "kbr0";
/// How long dnsmasq may take to bind its sockets.
const DNSMASQ_START: Duration = Duration::from_secs(10);
/// Lines of dnsmasq's log printed when a test fails.
const DNSMASQ_TAIL_LINES: usize = 30;

/// One node of a cluster: its name (also its DHCP host name) and first-boot user data.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    name: String,
    user_data: Option<String>,
    meta_data: Option<String>,
    qemu_args: Vec<String>,
}

impl NodeConfig {
    /// A node called `name` (letters, digits and `-`: it becomes the guest's host name).
    pub fn new(name: &str) -> Self {
        NodeConfig {
            name: name.to_string(),
            user_data: None,
            meta_data: None,
            qemu_args: Vec::new(),
        }
    }

    /// More QEMU arguments for this node only (e.g. `-rtc base=…` for a clock that is off).
    pub fn qemu_args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.qemu_args.extend(args.into_iter().map(Into::into));
        self
    }

    /// First-boot user data, given to the guest as fw_cfg `opt/keelson/user-data`.
    pub fn user_data(mut self, text: &str) -> Self {
        self.user_data = Some(text.to_string());
        self
    }

    /// Meta data, as fw_cfg `opt/keelson/meta-data` (`instance-id: …`; a `local-hostname` here
    /// overrides the DHCP host name).
    pub fn meta_data(mut self, text: &str) -> Self {
        self.meta_data = Some(text.to_string());
        self
    }
}

/// Describes a [`Cluster`]: a template guest and its nodes.
#[derive(Debug, Clone)]
pub struct ClusterBuilder {
    template: GuestBuilder,
    nodes: Vec<NodeConfig>,
}

impl ClusterBuilder {
    /// Adds a node (node `i` is the `i`-th added).
    pub fn node(mut self, node: NodeConfig) -> Self {
        self.nodes.push(node);
        self
    }

    /// Creates the LAN, starts dnsmasq and spawns every guest (without waiting for any).
    pub fn spawn(self) -> Result<Cluster> {
        let template = self.template;
        template.check_cluster_template()?;
        check_nodes(&self.nodes)?;

        let dir = tempfile::Builder::new()
            .prefix("keelson-cluster-")
            .tempdir()
            .context("creating the cluster's temporary directory")?;
        let netns = Arc::new(NetNs::new()?);
        // From here on Drop cleans up whatever exists, whichever step fails.
        let mut cluster = Cluster {
            nodes: Vec::new(),
            dnsmasq: None,
            links: Vec::new(),
            spawned_at: Instant::now(),
            netns,
            dir_path: dir.path().to_path_buf(),
            dir: Some(dir),
        };
        cluster.create_lan(self.nodes.len())?;
        cluster.start_dnsmasq(&self.nodes)?;

        let mut builders = Vec::new();
        for (i, node) in self.nodes.iter().enumerate() {
            builders.push(cluster.node_builder(&template, i, node)?);
        }
        cluster.spawned_at = Instant::now();
        for (i, (node, builder)) in self.nodes.into_iter().zip(builders).enumerate() {
            let guest = builder
                .clone()
                .spawn()
                .with_context(|| format!("spawning {}", node.name))?;
            cluster.nodes.push(Node {
                addr: node_addr(i),
                mac: node_mac(i),
                name: node.name,
                builder,
                guest,
            });
        }
        Ok(cluster)
    }
}

/// One running node.
struct Node {
    name: String,
    addr: Ipv4Addr,
    mac: String,
    /// Spawns this node again: same disk, tap, MAC and user data.
    builder: GuestBuilder,
    guest: Guest,
}

/// Guests on one LAN in one namespace; see the module documentation.
pub struct Cluster {
    // Dropped first (in `Drop::drop`): every QEMU is reaped before the LAN goes.
    nodes: Vec<Node>,
    dnsmasq: Option<Child>,
    /// The bridge and taps created so far, deleted on drop.
    links: Vec<String>,
    spawned_at: Instant,
    netns: Arc<NetNs>,
    dir_path: PathBuf,
    dir: Option<tempfile::TempDir>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("netns", &self.netns.name())
            .field(
                "nodes",
                &self.nodes.iter().map(|n| &n.name).collect::<Vec<_>>(),
            )
            .field("dir", &self.dir_path)
            .finish_non_exhaustive()
    }
}

impl Cluster {
    /// A cluster whose nodes are clones of `template` (which names the image and its disk; the
    /// cluster sets each node's disk, network and user data itself).
    pub fn builder(template: GuestBuilder) -> ClusterBuilder {
        ClusterBuilder {
            template,
            nodes: Vec::new(),
        }
    }

    /// How many nodes.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether the cluster has no node.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Node `i`'s guest (its current incarnation: [`restart`](Self::restart) replaces it).
    pub fn guest(&self, i: usize) -> &Guest {
        &self.node(i).guest
    }

    /// Every node's guest, in order.
    pub fn guests(&self) -> impl Iterator<Item = &Guest> {
        self.nodes.iter().map(|n| &n.guest)
    }

    /// Node `i`'s name (its host name).
    pub fn name(&self, i: usize) -> &str {
        &self.node(i).name
    }

    /// Node `i`'s reserved address.
    pub fn addr(&self, i: usize) -> Ipv4Addr {
        self.node(i).addr
    }

    /// Node `i`'s MAC address.
    pub fn mac(&self, i: usize) -> &str {
        &self.node(i).mac
    }

    /// When the first guest was spawned (the guests follow within milliseconds).
    pub fn spawned_at(&self) -> Instant {
        self.spawned_at
    }

    /// Waits for `pattern` on every node's console (consuming, see [`Guest::wait_for`]) and
    /// returns, per node, when its line appeared, counted from [`spawned_at`](Self::spawned_at).
    /// Fails the test with the node's name and console tail when a node never prints it.
    pub fn expect_all(&self, pattern: &str, timeout: Duration) -> Vec<Duration> {
        let deadline = Instant::now() + timeout;
        self.nodes
            .iter()
            .map(|node| {
                let left = deadline.saturating_duration_since(Instant::now());
                let m = node
                    .guest
                    .wait_for_match(&[pattern], left)
                    .unwrap_or_else(|e| panic!("{}: {e:#}", node.name));
                node.guest
                    .spawned_at()
                    .saturating_duration_since(self.spawned_at)
                    + m.at
            })
            .collect()
    }

    /// Kills node `i`'s QEMU (SIGKILL, reaped): a power cut. Its disk stays for a restart.
    pub fn kill(&self, i: usize) -> Result<()> {
        self.node(i).guest.kill()
    }

    /// Starts node `i` again on the same disk, tap, MAC (so the same address) and user data,
    /// killing its QEMU first if it still runs. The new guest's console starts empty.
    pub fn restart(&mut self, i: usize) -> Result<()> {
        let node = self.node(i);
        node.guest.kill()?;
        let guest = node
            .builder
            .clone()
            .spawn()
            .with_context(|| format!("restarting {}", node.name))?;
        // The old guest drops here: its directory goes, the shared namespace stays.
        self.nodes[i].guest = guest;
        Ok(())
    }

    /// Cuts node `i` off the LAN: its NIC loses its carrier and QEMU drops its frames both ways.
    pub fn cut(&self, i: usize) -> Result<()> {
        self.set_link(i, false)
    }

    /// Plugs node `i` back in after [`cut`](Self::cut).
    pub fn heal(&self, i: usize) -> Result<()> {
        self.set_link(i, true)
    }

    fn set_link(&self, i: usize, up: bool) -> Result<()> {
        let node = self.node(i);
        let state = if up { "on" } else { "off" };
        let out = node.guest.monitor(&format!("set_link n0 {state}"))?;
        if !out.trim().is_empty() {
            bail!("{}: set_link n0 {state}: {out}", node.name);
        }
        Ok(())
    }

    /// The namespace holding the LAN.
    pub fn netns(&self) -> &NetNs {
        &self.netns
    }

    /// Runs `f` on a thread inside the namespace (see [`NetNs::run_in`]).
    pub fn run_in<F, T>(&self, f: F) -> T
    where
        F: FnOnce() -> T + Send,
        T: Send,
    {
        self.netns.run_in(f)
    }

    /// A [`Command`] that runs `program` inside the namespace.
    pub fn command(&self, program: &str) -> Command {
        self.netns.command(program)
    }

    /// Runs `program args…` in the namespace to completion (see [`NetNs::output`]).
    pub fn output(&self, program: &str, args: &[&str]) -> Result<Output> {
        self.netns.output(program, args)
    }

    /// The cluster's directory: node disks, user data, dnsmasq's log and leases.
    pub fn dir(&self) -> &Path {
        &self.dir_path
    }

    /// dnsmasq's log so far.
    pub fn dnsmasq_log(&self) -> String {
        std::fs::read_to_string(self.dir_path.join("dnsmasq.log")).unwrap_or_default()
    }

    fn node(&self, i: usize) -> &Node {
        self.nodes.get(i).unwrap_or_else(|| {
            panic!(
                "no node {i}: the cluster has {} (0-based)",
                self.nodes.len()
            )
        })
    }

    /// The bridge with the host address, and a tap per node on it, all up.
    fn create_lan(&mut self, nodes: usize) -> Result<()> {
        self.netns.ip(&["link", "add", BRIDGE, "type", "bridge"])?;
        self.links.push(BRIDGE.to_string());
        self.netns.ip(&[
            "addr",
            "add",
            &format!("{HOST_ADDR}/{PREFIX_LEN}"),
            "dev",
            BRIDGE,
        ])?;
        self.netns.ip(&["link", "set", BRIDGE, "up"])?;
        for i in 0..nodes {
            let tap = tap_name(i);
            self.netns
                .ip(&["tuntap", "add", "dev", &tap, "mode", "tap"])?;
            self.links.push(tap.clone());
            self.netns
                .ip(&["link", "set", &tap, "master", BRIDGE, "up"])?;
        }
        Ok(())
    }

    /// dnsmasq on the bridge: static leases only (one per node, with its name), the bridge as
    /// router and DNS server; it answers DNS for the nodes' names and nothing else.
    fn start_dnsmasq(&mut self, nodes: &[NodeConfig]) -> Result<()> {
        let program = keelson_testkit::tools::resolve("dnsmasq")?;
        let log_path = self.dir_path.join("dnsmasq.log");
        let log = File::create(&log_path).context("creating dnsmasq.log")?;
        let mut cmd = self.netns.command(&program);
        cmd.args(["--no-daemon", "--conf-file=/dev/null", "--log-facility=-"])
            .args(["--interface", BRIDGE, "--bind-interfaces"])
            .args(["--no-resolv", "--no-hosts", "--no-ping", "--log-dhcp"])
            .arg(format!(
                "--dhcp-range={},static,255.255.255.0,12h",
                Ipv4Addr::from(u32::from(HOST_ADDR) & !0xff)
            ))
            .arg(format!(
                "--dhcp-leasefile={}",
                self.dir_path.join("dnsmasq.leases").display()
            ));
        for (i, node) in nodes.iter().enumerate() {
            cmd.arg(format!(
                "--dhcp-host={},{},{}",
                node_mac(i),
                node_addr(i),
                node.name
            ));
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("spawning {}", program.display()))?;
        let dnsmasq = self.dnsmasq.insert(child);
        let deadline = Instant::now() + DNSMASQ_START;
        loop {
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            if log.contains("DHCP, static leases only") {
                return Ok(());
            }
            if let Some(status) = dnsmasq.try_wait()? {
                bail!("dnsmasq exited ({status}) while starting:\n{log}");
            }
            if Instant::now() > deadline {
                bail!("dnsmasq did not start within {DNSMASQ_START:?}:\n{log}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The template, made into node `i`: its own disk (if the template has one), tap, MAC,
    /// label, shell and user data.
    fn node_builder(
        &self,
        template: &GuestBuilder,
        i: usize,
        node: &NodeConfig,
    ) -> Result<GuestBuilder> {
        let mut b = template.clone();
        if let Some(source) = &template.disk {
            let disk_path = self.dir_path.join(format!("{}.disk", node.name));
            let format = match template.disk_mode {
                DiskMode::Overlay { size } => {
                    create_overlay(source, &disk_path, size)?;
                    DiskFormat::Qcow2
                }
                DiskMode::RawCopy => {
                    copy_disk(source, &disk_path)?;
                    DiskFormat::Raw
                }
                DiskMode::AsIs(_) => unreachable!("refused by check_cluster_template"),
            };
            b = b.disk_no_copy(&disk_path, format);
        }
        b = b
            .netns(Arc::clone(&self.netns))
            .tap(&tap_name(i))
            .mac(&node_mac(i))
            .name(&node.name)
            .test_shell_at(SocketAddr::from((node_addr(i), TEST_SHELL_PORT)))
            .args(node.qemu_args.iter());
        for (file, text, key) in [
            ("user-data", &node.user_data, "opt/keelson/user-data"),
            ("meta-data", &node.meta_data, "opt/keelson/meta-data"),
        ] {
            if let Some(text) = text {
                let path = self.dir_path.join(format!("{}.{file}", node.name));
                std::fs::write(&path, text)
                    .with_context(|| format!("writing {}", path.display()))?;
                b = b.fw_cfg(key, path);
            }
        }
        Ok(b)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Each guest kills and reaps its QEMU, and prints its labelled serial tail if the test
        // is failing.
        self.nodes.clear();
        if let Some(mut dnsmasq) = self.dnsmasq.take() {
            let _ = dnsmasq.kill();
            let _ = dnsmasq.wait();
        }
        if std::thread::panicking() {
            let log = self.dnsmasq_log();
            let lines: Vec<&str> = log.lines().collect();
            eprintln!(
                "qemu-tests: dnsmasq's last {DNSMASQ_TAIL_LINES} lines:\n{}",
                lines[lines.len().saturating_sub(DNSMASQ_TAIL_LINES)..].join("\n")
            );
        }
        // Taps first, then the bridge; the namespace would take them along, but a QEMU that
        // somehow survived would keep it (and them) alive.
        for link in std::mem::take(&mut self.links).iter().rev() {
            if let Err(e) = self.netns.ip(&["link", "delete", link]) {
                eprintln!("qemu-tests: {e:#}");
            }
        }
        if std::env::var("KEELSON_KEEP").is_ok_and(|v| v == "1") {
            if let Some(dir) = self.dir.take() {
                eprintln!("qemu-tests: KEELSON_KEEP=1: kept {}", dir.keep().display());
            }
        }
        // The namespace goes with the last reference (ours, the guests' are gone), the directory
        // with its field.
    }
}

/// Node `i`'s address: `10.77.0.(11 + i)`.
fn node_addr(i: usize) -> Ipv4Addr {
    let [a, b, c, _] = HOST_ADDR.octets();
    Ipv4Addr::new(a, b, c, FIRST_NODE_HOST + i as u8)
}

/// Node `i`'s MAC: QEMU's locally administered prefix, `4b` for Keelson, the address's last
/// octet.
fn node_mac(i: usize) -> String {
    format!("52:54:00:4b:00:{:02x}", node_addr(i).octets()[3])
}

fn tap_name(i: usize) -> String {
    format!("ktap{i}")
}

/// Names must be usable host names and unique; at least one node, at most [`MAX_NODES`].
fn check_nodes(nodes: &[NodeConfig]) -> Result<()> {
    if nodes.is_empty() {
        bail!("a cluster needs at least one node");
    }
    if nodes.len() > MAX_NODES {
        bail!(
            "{} nodes: a cluster's /24 holds at most {MAX_NODES}",
            nodes.len()
        );
    }
    for (i, node) in nodes.iter().enumerate() {
        let name = &node.name;
        let valid = !name.is_empty()
            && name.len() <= 63
            && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !name.starts_with('-')
            && !name.ends_with('-');
        if !valid {
            bail!(
                "node {i}: name {name:?} is not a host name (1-63 letters, digits and `-`, not \
                 starting or ending with `-`)"
            );
        }
        if nodes[..i].iter().any(|other| &other.name == name) {
            bail!("node {i}: name {name:?} is used twice");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_and_macs_follow_the_index() {
        assert_eq!(node_addr(0), Ipv4Addr::new(10, 77, 0, 11));
        assert_eq!(node_addr(2), Ipv4Addr::new(10, 77, 0, 13));
        assert_eq!(node_mac(0), "52:54:00:4b:00:0b");
        assert_eq!(node_mac(199), "52:54:00:4b:00:d2");
        assert_eq!(tap_name(3), "ktap3");
    }

    #[test]
    fn bad_node_lists_are_refused_with_the_node() {
        let err = |nodes: &[&str]| {
            let nodes: Vec<NodeConfig> = nodes.iter().map(|n| NodeConfig::new(n)).collect();
            check_nodes(&nodes).unwrap_err().to_string()
        };
        assert!(err(&[]).contains("at least one node"));
        let dup = err(&["a", "b", "a"]);
        assert!(
            dup.contains("node 2") && dup.contains("used twice"),
            "{dup}"
        );
        let bad = err(&["ok", "no_underscore"]);
        assert!(
            bad.contains("node 1") && bad.contains("not a host name"),
            "{bad}"
        );
        assert!(err(&["-x"]).contains("not a host name"));
        let many: Vec<String> = (0..=MAX_NODES).map(|i| format!("n{i}")).collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        assert!(err(&many).contains("at most 200"));
        let ok: Vec<NodeConfig> = ["node1", "node-2"].map(NodeConfig::new).to_vec();
        check_nodes(&ok).unwrap();
    }

    #[test]
    fn template_with_its_own_network_is_refused() {
        let spawn = |b: GuestBuilder| {
            Cluster::builder(b)
                .node(NodeConfig::new("n1"))
                .spawn()
                .unwrap_err()
                .to_string()
        };
        let base = || GuestBuilder::direct("/k", "/i", "", Some("/x.raw".into()));
        assert!(spawn(base().forward(1, 2)).contains("forward"));
        assert!(spawn(base().tap("t0")).contains("tap"));
        assert!(spawn(base().mac("52:54:00:00:00:01")).contains("MAC"));
        let as_is = base().disk_no_copy("/x.qcow2", DiskFormat::Qcow2);
        assert!(spawn(as_is).contains("disk used as is"));
        assert!(spawn(base().nic(crate::NicModel::None)).contains("network card"));
    }
}
