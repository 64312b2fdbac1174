//! Container networks: services with `network = "bridge"` on Keelson's bridge `keel0`.
//!
//! sysd (the manager) owns the bridge, the address allocations (`ipam.json` on /var, so a
//! restarted service keeps its address), the shared hosts file every bridge container gets
//! as /etc/hosts (their names resolve to each other), and the nftables table `ip keelson`
//! (masquerade of the subnet to the outside, DNAT of published ports). The runtime helper
//! plugs each container in between create and start (`runtime::netplug`): a veth pair, the host end on
//! the bridge, the other end as `eth0` in the container with its address and default route
//! through the bridge, so the service's process starts with its network in place.
//!
//! nftables is driven with the `nft` binary from Debian's nftables (an image in the root,
//! run through that image's own dynamic loader): one atomic ruleset load per change.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use keelson_common::error::{Classify, Kind};
use serde::{Deserialize, Serialize};

pub use keelson_runtime::netplug::{Endpoint, ANNOTATION};
use keelson_spec::network::{Cidr, PortSpec};

/// Why a bridge service could not get its place on the bridge.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the bridge subnet must be IPv4")]
    NotIpv4,
    #[error("no free address left in {0}")]
    Full(Cidr),
    #[error("keeping {}: {err}", path.display())]
    Keep { path: PathBuf, err: std::io::Error },
    #[error("writing {}: {err}", path.display())]
    Hosts { path: PathBuf, err: std::io::Error },
    #[error("the bridge vanished after its creation")]
    Vanished,
    #[error("enabling IPv4 forwarding: {0}")]
    Forwarding(std::io::Error),
    #[error("running nft ({}): {err}", nft.display())]
    NftStart { nft: PathBuf, err: std::io::Error },
    #[error("waiting for nft: {0}")]
    NftWait(std::io::Error),
    #[error("nft refused the ruleset: {0}")]
    NftRefused(String),
    /// The task that ran `nft` ended without an answer.
    #[error("{0}")]
    Task(String),
    /// A running container's endpoint (kept across a sysd restart) that the bridge as it is
    /// now cannot take back.
    #[error("its container's endpoint {address}/{prefix} on {bridge} {why}")]
    NotKept {
        address: Ipv4Addr,
        prefix: u8,
        bridge: String,
        why: String,
    },
}

impl Classify for Error {
    fn kind(&self) -> Kind {
        match self {
            Error::NotIpv4 => Kind::Invalid,
            Error::Full(_) => Kind::Unavailable,
            Error::NotKept { .. } => Kind::Conflict,
            Error::Keep { .. }
            | Error::Hosts { .. }
            | Error::Vanished
            | Error::Forwarding(_)
            | Error::NftStart { .. }
            | Error::NftWait(_)
            | Error::NftRefused(_)
            | Error::Task(_) => Kind::Internal,
        }
    }
}

/// The bridge's name.
pub const BRIDGE: &str = "keel0";
/// The veth host end's name: `vk` + 8 hex of the service name's hash (15 bytes max).
pub fn host_if_name(service: &str) -> String {
    use sha2::{Digest, Sha256};
    let d = Sha256::digest(service.as_bytes());
    format!("vk{}", hex::encode(&d[..4]))
}

/// Address allocations by service, persisted.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Ipam {
    pub subnet: String,
    pub leases: BTreeMap<String, Ipv4Addr>,
}

impl Ipam {
    pub fn load(path: &Path, subnet: Cidr) -> Ipam {
        let ipam: Option<Ipam> = std::fs::read_to_string(path)
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok());
        match ipam {
            // Allocations from another subnet are void.
            Some(i) if i.subnet == subnet.to_string() => i,
            _ => Ipam {
                subnet: subnet.to_string(),
                leases: BTreeMap::new(),
            },
        }
    }

    pub fn store(&self, path: &Path) -> std::io::Result<()> {
        let json = serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?;
        Ok(keelson_common::durable::replace(path, &json)?)
    }

    /// The service's address: the one it had, else the lowest free one (after the gateway).
    pub fn allocate(&mut self, service: &str, subnet: Cidr) -> Result<Ipv4Addr, Error> {
        if let Some(a) = self.leases.get(service) {
            return Ok(*a);
        }
        let IpAddr::V4(net) = subnet.addr else {
            return Err(Error::NotIpv4);
        };
        let size = 1u32 << (32 - u32::from(subnet.prefix));
        let base = u32::from(net) & !(size - 1);
        let used: Vec<Ipv4Addr> = self.leases.values().copied().collect();
        for off in 2..size - 1 {
            let ip = Ipv4Addr::from(base + off);
            if !used.contains(&ip) {
                self.leases.insert(service.to_string(), ip);
                return Ok(ip);
            }
        }
        Err(Error::Full(subnet))
    }
}

impl Ipam {
    /// Takes back `address` for `service`, whose running container has it: refused (saying
    /// why) when the store gives the service another address or another service this one, or
    /// when it is not a host address of `subnet` after the gateway. A store that lost the
    /// lease (deleted, corrupt) gets it back.
    pub fn claim(&mut self, service: &str, address: Ipv4Addr, subnet: Cidr) -> Result<(), String> {
        let IpAddr::V4(net) = subnet.addr else {
            return Err("is not on an IPv4 bridge".into());
        };
        let size = 1u64 << (32 - u32::from(subnet.prefix));
        let base = u64::from(u32::from(net)) & !(size - 1);
        let off = u64::from(u32::from(address)).wrapping_sub(base);
        if off < 2 || off >= size - 1 {
            return Err(format!(
                "is not a service address of the bridge subnet {subnet}"
            ));
        }
        if let Some(own) = self.leases.get(service) {
            return if *own == address {
                Ok(())
            } else {
                Err(format!(
                    "differs from the address the store keeps for it, {own}"
                ))
            };
        }
        if let Some((other, _)) = self.leases.iter().find(|(_, a)| **a == address) {
            return Err(format!("is kept for service `{other}`"));
        }
        self.leases.insert(service.to_string(), address);
        Ok(())
    }
}

/// The gateway (the bridge's own address): the subnet's first host address.
pub fn gateway(subnet: Cidr) -> Ipv4Addr {
    let IpAddr::V4(net) = subnet.addr else {
        return Ipv4Addr::UNSPECIFIED;
    };
    let mask = u32::MAX << (32 - u32::from(subnet.prefix));
    Ipv4Addr::from((u32::from(net) & mask) + 1)
}

/// /etc/hosts for bridge containers: localhost and every bridge service.
pub fn render_hosts(ipam: &Ipam) -> String {
    let mut out = String::from(
        "# Written by sysd: the services on the Keelson bridge.\n127.0.0.1 localhost\n::1 localhost\n",
    );
    for (name, ip) in &ipam.leases {
        out.push_str(&format!("{ip} {name}\n"));
    }
    out
}

/// Rewrites `path` in place (containers bind-mount it; a rename would not reach them), never
/// leaving it empty for a reader (`keelson_common::durable::rewrite_in_place`).
pub fn write_in_place(path: &Path, text: &str) -> std::io::Result<()> {
    Ok(keelson_common::durable::rewrite_in_place(
        path,
        text.as_bytes(),
    )?)
}

/// The whole `ip keelson` table: masquerade of the subnet, and published ports
/// (`(service address, port)`) DNATed for traffic that does not come from the bridge itself.
pub fn render_ruleset(subnet: Cidr, ports: &[(Ipv4Addr, PortSpec)]) -> String {
    let mut dnat = String::new();
    for (ip, p) in ports {
        dnat.push_str(&format!(
            "    iifname != \"{BRIDGE}\" {} dport {} dnat to {ip}:{}\n",
            p.proto, p.host, p.container
        ));
    }
    // Declaring then deleting makes the load work whether or not the table exists; the file
    // is applied as one transaction.
    format!(
        "table ip keelson {{}}\ndelete table ip keelson\ntable ip keelson {{\n  chain prerouting {{\n    type nat hook prerouting priority -100; policy accept;\n{dnat}  }}\n  chain postrouting {{\n    type nat hook postrouting priority 100; policy accept;\n    ip saddr {subnet} oifname != \"{BRIDGE}\" masquerade\n  }}\n}}\n"
    )
}

/// Runs `nft -f -` with `rules`. `nft` is either the binary or an image root holding
/// Debian's nftables (run through the image's dynamic loader).
pub fn nft_load(nft: &Path, rules: &str) -> Result<(), Error> {
    let mut cmd = if nft.is_dir() {
        let lib = nft.join("usr/lib/x86_64-linux-gnu");
        let mut c = Command::new(lib.join("ld-linux-x86-64.so.2"));
        c.arg("--library-path")
            .arg(&lib)
            .arg(nft.join("usr/sbin/nft"));
        c
    } else {
        Command::new(nft)
    };
    cmd.args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|err| Error::NftStart {
        nft: nft.to_path_buf(),
        err,
    })?;
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(rules.as_bytes());
    }
    let out = child.wait_with_output().map_err(Error::NftWait)?;
    if !out.status.success() {
        return Err(Error::NftRefused(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ));
    }
    Ok(())
}

/// Where the bridge's state lives.
pub fn ipam_path(state_dir: &Path) -> PathBuf {
    state_dir.join("ipam.json")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_adopted_address_is_taken_back_or_refused_with_the_reason() {
        let subnet = Cidr::parse("10.88.0.0/24").unwrap();
        let ip = |d| Ipv4Addr::new(10, 88, 0, d);
        let mut ipam = Ipam::default();
        ipam.allocate("a", subnet).unwrap();
        // Its own address again, and one a store that lost it gives back.
        assert_eq!(ipam.claim("a", ip(2), subnet), Ok(()));
        assert_eq!(ipam.claim("b", ip(7), subnet), Ok(()));
        assert_eq!(ipam.leases["b"], ip(7));
        // A later allocation does not hand that address out again.
        assert_eq!(ipam.allocate("c", subnet).unwrap(), ip(3));
        let refused = |r: Result<(), String>, needle: &str| {
            let e = r.unwrap_err();
            assert!(e.contains(needle), "{e}");
        };
        refused(
            ipam.claim("a", ip(9), subnet),
            "the store keeps for it, 10.88.0.2",
        );
        refused(ipam.claim("d", ip(7), subnet), "kept for service `b`");
        for outside in [ip(0), ip(1), ip(255), Ipv4Addr::new(10, 89, 0, 5)] {
            refused(
                ipam.claim("e", outside, subnet),
                "not a service address of the bridge subnet",
            );
        }
        assert!(!ipam.leases.contains_key("d") && !ipam.leases.contains_key("e"));
    }

    #[test]
    fn allocations_are_stable_and_skip_the_gateway() {
        let subnet = Cidr::parse("10.88.0.0/16").unwrap();
        let mut ipam = Ipam::default();
        assert_eq!(
            ipam.allocate("a", subnet).unwrap(),
            Ipv4Addr::new(10, 88, 0, 2)
        );
        assert_eq!(
            ipam.allocate("b", subnet).unwrap(),
            Ipv4Addr::new(10, 88, 0, 3)
        );
        assert_eq!(
            ipam.allocate("a", subnet).unwrap(),
            Ipv4Addr::new(10, 88, 0, 2)
        );
        assert_eq!(gateway(subnet), Ipv4Addr::new(10, 88, 0, 1));
        let hosts = render_hosts(&ipam);
        assert!(hosts.contains("10.88.0.3 b\n"), "{hosts}");
        let small = Cidr::parse("10.9.0.0/30").unwrap();
        let mut ipam = Ipam::default();
        ipam.allocate("x", small).unwrap();
        assert_eq!(
            ipam.allocate("y", small).unwrap_err().to_string(),
            "no free address left in 10.9.0.0/30"
        );
    }

    #[test]
    fn ruleset_masquerades_and_publishes() {
        let subnet = Cidr::parse("10.88.0.0/16").unwrap();
        let rules = render_ruleset(
            subnet,
            &[(
                Ipv4Addr::new(10, 88, 0, 2),
                PortSpec::parse("8081:80/tcp").unwrap(),
            )],
        );
        assert!(
            rules.contains("tcp dport 8081 dnat to 10.88.0.2:80"),
            "{rules}"
        );
        assert!(
            rules.contains("ip saddr 10.88.0.0/16 oifname != \"keel0\" masquerade"),
            "{rules}"
        );
        assert_eq!(host_if_name("web").len(), 10);
    }
}
