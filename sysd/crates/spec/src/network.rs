//! The host network and host identity tables of the config: `[network]` (interfaces, DNS, the
//! network-online timeout) and `[host]` (hostname). Documented in `docs/network.md`.
//!
//! Values that end up in the kernel (addresses, prefixes, gateways) are parsed here, so a typo
//! is a config error with the key path, never a half-applied network. What can only be checked
//! on the node (does `eth1` exist?) is checked when the config is applied (`network::apply`).

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use serde::{Deserialize, Serialize};

use super::units::Span;
use crate::Invalid;

/// The pseudo-service services can depend on (`after`/`requires`): a default route and a DNS
/// server are present, or the online timeout has passed.
pub const NETWORK_ONLINE: &str = "network-online";

/// `[network]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkSpec {
    /// Interfaces by a label of the user's choice; the label is also the link name matched
    /// when `match` is absent. Empty: the default rule (DHCPv4 on the first link with carrier).
    #[serde(default)]
    pub interfaces: BTreeMap<String, InterfaceSpec>,
    /// DNS servers, before any a DHCP server offers.
    #[serde(default)]
    pub dns: Vec<IpAddr>,
    /// Search domains, before any a DHCP server offers.
    #[serde(default)]
    pub search: Vec<String>,
    /// How long `network-online` waits before letting its dependents start anyway (default 30s).
    pub online_timeout: Option<Span>,
    /// The container bridge (`network = "bridge"` services).
    pub bridge: Option<BridgeSpec>,
}

/// `[network.bridge]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BridgeSpec {
    /// IPv4 subnet of the bridge (default 10.88.0.0/16); its first address is the bridge's.
    pub subnet: Option<String>,
}

impl NetworkSpec {
    /// The bridge subnet (default 10.88.0.0/16, podman's), validated by `check`.
    pub fn bridge_subnet(&self) -> Cidr {
        self.bridge
            .as_ref()
            .and_then(|b| b.subnet.as_deref())
            .and_then(|s| Cidr::parse(s).ok())
            .unwrap_or(Cidr {
                addr: IpAddr::V4(Ipv4Addr::new(10, 88, 0, 0)),
                prefix: 16,
            })
    }
}

/// A published port, `HOST:CONTAINER[/tcp|/udp]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortSpec {
    pub host: u16,
    pub container: u16,
    pub proto: &'static str,
}

impl PortSpec {
    pub fn parse(s: &str) -> Result<PortSpec, Invalid> {
        let (ports, proto) = match s.split_once('/') {
            Some((p, "tcp")) => (p, "tcp"),
            Some((p, "udp")) => (p, "udp"),
            Some((_, other)) => {
                return Err(Invalid::from(format!(
                    "{s:?}: protocol {other:?} is not tcp or udp"
                )))
            }
            None => (s, "tcp"),
        };
        let (h, c) = ports.split_once(':').ok_or_else(|| {
            format!("{s:?} is not HOST:CONTAINER[/tcp|/udp] (like \"8080:80/tcp\")")
        })?;
        let port = |x: &str| {
            x.parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| format!("{s:?}: {x:?} is not a port (1-65535)"))
        };
        Ok(PortSpec {
            host: port(h)?,
            container: port(c)?,
            proto,
        })
    }
}

/// Which link an interface entry configures: every given key must match.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinkMatch {
    /// Link name; a trailing `*` matches a prefix (`enp*`).
    pub name: Option<String>,
    /// MAC address, `52:54:00:12:34:56` (any case).
    pub mac: Option<String>,
    /// Kernel driver (`virtio_net`, `e1000e`), as in /sys/class/net/IF/device/driver.
    pub driver: Option<String>,
}

/// One interface.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InterfaceSpec {
    #[serde(rename = "match")]
    pub matches: Option<LinkMatch>,
    /// DHCPv4 client on this link.
    #[serde(default)]
    pub dhcp: bool,
    /// Static addresses, `10.0.0.5/24` or `fd00::5/64`.
    #[serde(default)]
    pub addresses: Vec<String>,
    /// IPv4 default gateway; must be inside one of `addresses` (or `dhcp` must be on).
    pub gateway: Option<Ipv4Addr>,
    /// IPv6 default gateway.
    pub gateway6: Option<Ipv6Addr>,
    #[serde(default)]
    pub routes: Vec<RouteSpec>,
    pub mtu: Option<u32>,
    /// An 802.1Q VLAN link named by the label, created on `parent`.
    pub vlan: Option<VlanSpec>,
    /// A bond named by the label, with `members` enslaved.
    pub bond: Option<BondSpec>,
}

/// `vlan = { parent = "eth0", id = 10 }`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VlanSpec {
    /// The link the VLAN rides on (a link name).
    pub parent: String,
    /// VLAN id, 1-4094.
    pub id: u16,
}

/// `bond = { mode = "active-backup", members = ["eth1", "eth2"] }`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BondSpec {
    #[serde(default)]
    pub mode: BondMode,
    /// Member links by name; each must exist when the config is applied.
    pub members: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BondMode {
    /// One member carries the traffic; another takes over when its carrier goes.
    #[default]
    ActiveBackup,
}

/// A static route.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteSpec {
    /// Destination prefix, `192.168.50.0/24`.
    pub to: String,
    /// Next hop, reachable through one of the interface's addresses.
    pub via: IpAddr,
}

/// `[host]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostSpec {
    /// Wins over a DHCP-supplied name and the machine-id default.
    pub hostname: Option<String>,
}

/// The network and host tables of the effective config, with where they came from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NetConfig {
    pub network: NetworkSpec,
    pub host: HostSpec,
    /// `file` the tables came from (the user's file wins over the image's), for messages.
    pub origin: Option<String>,
}

/// An address with its prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl Cidr {
    pub fn parse(s: &str) -> Result<Cidr, Invalid> {
        let (a, p) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?} needs a prefix length (like 10.0.0.5/24)"))?;
        let addr: IpAddr = a
            .parse()
            .map_err(|_| format!("{s:?}: {a:?} is not an IP address"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix: u8 = p
            .parse()
            .ok()
            .filter(|p| *p <= max)
            .ok_or_else(|| format!("{s:?}: prefix length must be 0-{max}"))?;
        Ok(Cidr { addr, prefix })
    }

    /// Whether `ip` is inside this prefix.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(n), IpAddr::V4(i)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(n) & mask == u32::from(i) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(i)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(n) & mask == u128::from(i) & mask
            }
            _ => false,
        }
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// Valid hostname: 1-63 bytes of letters, digits and `-` per label, labels joined by `.`.
pub fn valid_hostname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-')
        })
}

fn valid_mac(s: &str) -> bool {
    let parts: Vec<&str> = s.split(':').collect();
    parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.bytes().all(|c| c.is_ascii_hexdigit()))
}

/// Checks what the types cannot: returns the message, starting with the key path.
pub fn check(network: &NetworkSpec, host: &HostSpec) -> Result<(), Invalid> {
    if let Some(name) = &host.hostname {
        if !valid_hostname(name) {
            return Err(Invalid::from(format!(
                "host.hostname: {name:?} is not a valid hostname (letters, digits and '-', labels of at most 63 joined by '.')"
            )));
        }
    }
    for (i, d) in network.search.iter().enumerate() {
        if !valid_hostname(d) {
            return Err(Invalid::from(format!(
                "network.search[{i}]: {d:?} is not a valid domain name"
            )));
        }
    }
    if network.online_timeout.is_some_and(|t| t.0.is_zero()) {
        return Err(Invalid::from("network.online_timeout: must be above 0"));
    }
    if let Some(b) = &network.bridge {
        if let Some(subnet) = &b.subnet {
            let c = Cidr::parse(subnet).map_err(|e| format!("network.bridge.subnet: {e}"))?;
            if !c.addr.is_ipv4() || !(8..=28).contains(&c.prefix) {
                return Err(Invalid::from(format!(
                    "network.bridge.subnet: {subnet:?} must be an IPv4 subnet with a prefix of 8 to 28"
                )));
            }
        }
    }
    check_virtual(network)?;
    let mut any_address = network.interfaces.is_empty();
    for (label, ifc) in &network.interfaces {
        let at = format!("network.interfaces.{label}");
        if let Some(m) = &ifc.matches {
            if m.name.is_none() && m.mac.is_none() && m.driver.is_none() {
                return Err(Invalid::from(format!(
                    "{at}.match: give at least one of `name`, `mac`, `driver`"
                )));
            }
            if let Some(mac) = &m.mac {
                if !valid_mac(mac) {
                    return Err(Invalid::from(format!(
                        "{at}.match.mac: {mac:?} is not a MAC address like 52:54:00:12:34:56"
                    )));
                }
            }
        } else if label.len() > 15 || label.contains(['/', ' ', ':']) {
            return Err(Invalid::from(format!(
                "{at}: {label:?} is not a link name (at most 15 characters); add `match` to select the link another way"
            )));
        }
        let mut nets = Vec::new();
        for (j, a) in ifc.addresses.iter().enumerate() {
            let cidr = Cidr::parse(a).map_err(|e| format!("{at}.addresses[{j}]: {e}"))?;
            let bad = match cidr.addr {
                IpAddr::V4(v4) => {
                    v4.is_unspecified()
                        || v4.is_multicast()
                        || v4.is_broadcast()
                        || v4.is_loopback()
                }
                IpAddr::V6(v6) => v6.is_unspecified() || v6.is_multicast() || v6.is_loopback(),
            };
            if bad || cidr.prefix == 0 {
                return Err(Invalid::from(format!(
                    "{at}.addresses[{j}]: {a:?} cannot be a host address"
                )));
            }
            nets.push(cidr);
        }
        any_address |= ifc.dhcp || !nets.is_empty();
        let reachable = |ip: IpAddr| ifc.dhcp || nets.iter().any(|n| n.contains(ip));
        if let Some(gw) = ifc.gateway {
            if !reachable(IpAddr::V4(gw)) {
                return Err(Invalid::from(format!(
                    "{at}.gateway: {gw} is not inside any of this interface's addresses ({}), so it cannot be reached",
                    list(&ifc.addresses)
                )));
            }
        }
        if let Some(gw) = ifc.gateway6 {
            // Link-local routers (fe80::/10) are always on-link.
            let ll = gw.segments()[0] & 0xffc0 == 0xfe80;
            if !ll && !nets.iter().any(|n| n.contains(IpAddr::V6(gw))) {
                return Err(Invalid::from(format!(
                    "{at}.gateway6: {gw} is not inside any of this interface's addresses ({}) nor link-local",
                    list(&ifc.addresses)
                )));
            }
        }
        for (j, r) in ifc.routes.iter().enumerate() {
            Cidr::parse(&r.to).map_err(|e| format!("{at}.routes[{j}].to: {e}"))?;
            if !reachable(r.via) {
                return Err(Invalid::from(format!(
                    "{at}.routes[{j}].via: {} is not inside any of this interface's addresses ({}), so it cannot be reached",
                    r.via,
                    list(&ifc.addresses)
                )));
            }
        }
        if let Some(mtu) = ifc.mtu {
            if !(576..=65535).contains(&mtu) {
                return Err(Invalid::from(format!(
                    "{at}.mtu: {mtu} must be between 576 and 65535"
                )));
            }
        }
    }
    if !any_address {
        return Err(Invalid::from("network: no interface has `dhcp = true` or an address; this config would leave the node without an address"));
    }
    Ok(())
}

/// VLAN and bond entries: one kind per entry, named by their label, sane ids, and each bond
/// member used once (not configured by another entry, not in another bond, not a VLAN parent).
fn check_virtual(network: &NetworkSpec) -> Result<(), Invalid> {
    let mut members: BTreeMap<&str, &str> = BTreeMap::new();
    for (label, ifc) in &network.interfaces {
        let at = format!("network.interfaces.{label}");
        if ifc.vlan.is_some() && ifc.bond.is_some() {
            return Err(Invalid::from(format!(
                "{at}: give `vlan` or `bond`, not both"
            )));
        }
        if (ifc.vlan.is_some() || ifc.bond.is_some()) && ifc.matches.is_some() {
            return Err(Invalid::from(format!(
                "{at}.match: a vlan or bond link is created with the label as its name; remove `match`"
            )));
        }
        if let Some(v) = &ifc.vlan {
            if !(1..=4094).contains(&v.id) {
                return Err(Invalid::from(format!(
                    "{at}.vlan.id: {} must be between 1 and 4094",
                    v.id
                )));
            }
            if v.parent.is_empty() || v.parent == *label {
                return Err(Invalid::from(format!(
                    "{at}.vlan.parent: {:?} is not another link",
                    v.parent
                )));
            }
        }
        if let Some(b) = &ifc.bond {
            if b.members.is_empty() {
                return Err(Invalid::from(format!(
                    "{at}.bond.members: give at least one member link"
                )));
            }
            for (j, m) in b.members.iter().enumerate() {
                if m == label || m.is_empty() {
                    return Err(Invalid::from(format!(
                        "{at}.bond.members[{j}]: {m:?} is not another link"
                    )));
                }
                if let Some(other) = members.insert(m, label) {
                    return Err(Invalid::from(format!(
                        "{at}.bond.members[{j}]: {m} is already a member of bond {other}"
                    )));
                }
            }
        }
    }
    for (label, ifc) in &network.interfaces {
        if let Some(bond) = members.get(label.as_str()) {
            return Err(Invalid::from(format!(
                "network.interfaces.{label}: {label} is a member of bond {bond}; configure addresses on the bond"
            )));
        }
        if let Some(v) = &ifc.vlan {
            if let Some(bond) = members.get(v.parent.as_str()) {
                return Err(Invalid::from(format!(
                    "network.interfaces.{label}.vlan.parent: {} is a member of bond {bond}; put the VLAN on {bond}",
                    v.parent
                )));
            }
        }
    }
    Ok(())
}

fn list(items: &[String]) -> String {
    if items.is_empty() {
        "none".into()
    } else {
        items.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<(), String> {
        #[derive(Deserialize)]
        struct Doc {
            #[serde(default)]
            network: NetworkSpec,
            #[serde(default)]
            host: HostSpec,
        }
        let doc: Doc = toml::from_str(text).map_err(|e| e.to_string())?;
        check(&doc.network, &doc.host).map_err(String::from)
    }

    #[test]
    fn good_static_and_dhcp() {
        parse(
            r#"
[host]
hostname = "node-1.example"
[network]
dns = ["10.0.0.1"]
search = ["example"]
[network.interfaces.eth0]
addresses = ["10.0.0.5/24", "fd00::5/64"]
gateway = "10.0.0.1"
gateway6 = "fe80::1"
routes = [{ to = "192.168.5.0/24", via = "10.0.0.254" }]
mtu = 1400
[network.interfaces.uplink]
match = { mac = "52:54:00:AB:cd:01" }
dhcp = true
"#,
        )
        .unwrap();
        parse("").unwrap();
    }

    #[test]
    fn bad_values_name_the_key() {
        let e = parse("[network.interfaces.eth0]\naddresses = [\"10.0.0.300/24\"]\n").unwrap_err();
        assert!(e.contains("network.interfaces.eth0.addresses[0]"), "{e}");
        assert!(e.contains("not an IP address"), "{e}");
        let e = parse("[network.interfaces.eth0]\naddresses = [\"10.0.0.3\"]\n").unwrap_err();
        assert!(e.contains("needs a prefix length"), "{e}");
        let e = parse(
            "[network.interfaces.eth0]\naddresses = [\"10.0.0.3/24\"]\ngateway = \"10.1.0.1\"\n",
        )
        .unwrap_err();
        assert!(
            e.contains("network.interfaces.eth0.gateway: 10.1.0.1 is not inside"),
            "{e}"
        );
        let e = parse("[network.interfaces.eth0]\naddresses = [\"10.0.0.3/24\"]\nroutes = [{ to = \"1.2.3.0/24\", via = \"10.9.0.1\" }]\n")
            .unwrap_err();
        assert!(e.contains("routes[0].via"), "{e}");
        let e = parse("[network.interfaces.eth0]\nmtu = 1400\n").unwrap_err();
        assert!(e.contains("without an address"), "{e}");
        let e = parse("[host]\nhostname = \"bad_name\"\n").unwrap_err();
        assert!(e.contains("host.hostname"), "{e}");
        let e =
            parse("[network.interfaces.x]\nmatch = { mac = \"zz\" }\ndhcp = true\n").unwrap_err();
        assert!(e.contains("match.mac"), "{e}");
    }

    #[test]
    fn vlan_and_bond_entries() {
        parse(
            r#"
[network.interfaces.v10]
vlan = { parent = "bond0", id = 10 }
addresses = ["10.10.0.5/24"]
[network.interfaces.bond0]
bond = { mode = "active-backup", members = ["eth1", "eth2"] }
dhcp = true
"#,
        )
        .unwrap();
        let bad = |text: &str, want: &str| {
            let e = parse(&format!("{text}\ndhcp = true\n")).unwrap_err();
            assert!(e.contains(want), "{e}");
        };
        bad(
            "[network.interfaces.v0]\nvlan = { parent = \"eth0\", id = 0 }",
            "network.interfaces.v0.vlan.id: 0 must be between 1 and 4094",
        );
        bad(
            "[network.interfaces.v0]\nvlan = { parent = \"eth0\", id = 4095 }",
            "must be between 1 and 4094",
        );
        bad(
            "[network.interfaces.v0]\nvlan = { parent = \"v0\", id = 5 }",
            "vlan.parent",
        );
        bad(
            "[network.interfaces.b]\nbond = { members = [] }",
            "network.interfaces.b.bond.members: give at least one",
        );
        bad(
            "[network.interfaces.b]\nbond = { mode = \"802.3ad\", members = [\"eth1\"] }",
            "unknown variant",
        );
        bad(
            "[network.interfaces.b]\nbond = { members = [\"eth1\"] }\nvlan = { parent = \"eth0\", id = 5 }",
            "not both",
        );
        bad(
            "[network.interfaces.b]\nmatch = { name = \"x\" }\nbond = { members = [\"eth1\"] }",
            "remove `match`",
        );
        bad(
            "[network.interfaces.b]\nbond = { members = [\"eth1\"] }\n[network.interfaces.c]\nbond = { members = [\"eth1\"] }",
            "network.interfaces.c.bond.members[0]: eth1 is already a member of bond b",
        );
        bad(
            "[network.interfaces.b]\nbond = { members = [\"eth1\"] }\n[network.interfaces.eth1]",
            "network.interfaces.eth1: eth1 is a member of bond b",
        );
        bad(
            "[network.interfaces.b]\nbond = { members = [\"eth1\"] }\n[network.interfaces.v]\nvlan = { parent = \"eth1\", id = 3 }",
            "put the VLAN on b",
        );
    }

    #[test]
    fn cidr_contains() {
        let c = Cidr::parse("10.0.2.15/24").unwrap();
        assert!(c.contains("10.0.2.2".parse().unwrap()));
        assert!(!c.contains("10.0.3.2".parse().unwrap()));
        let c = Cidr::parse("fd00::1/64").unwrap();
        assert!(c.contains("fd00::99".parse().unwrap()));
    }
}
