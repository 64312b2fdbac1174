//! Wire types of the host network (`GET /v1/network`, `keelctl net`).

use serde::{Deserialize, Serialize};

/// Everything `keelctl net` shows.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkStatus {
    /// `pending`, `online` (a default route and a DNS server), `timed-out` or `unreachable`
    /// (no link to configure, or none with carrier).
    pub online: String,
    /// Why it is not online (what is missing), when it is not.
    pub online_reason: Option<String>,
    pub hostname: String,
    /// `config`, `dhcp` or `machine-id`.
    pub hostname_source: String,
    pub links: Vec<LinkStatus>,
    pub routes: Vec<RouteStatus>,
    pub dns: Vec<String>,
    pub search: Vec<String>,
    pub leases: Vec<LeaseStatus>,
    /// The config in force: `default` (DHCP on the first link with carrier) or the file it
    /// came from.
    pub config_origin: String,
    /// Bridge services attached since sysd started.
    #[serde(default)]
    pub endpoints: Vec<EndpointStatus>,
}

/// A service on the container bridge.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointStatus {
    pub service: String,
    /// `ADDR/PREFIX` on the bridge.
    pub address: String,
    pub bridge: String,
    /// Published ports, `HOST:CONTAINER/PROTO`.
    pub ports: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkStatus {
    pub index: u32,
    pub name: String,
    pub mac: Option<String>,
    pub up: bool,
    pub carrier: bool,
    pub mtu: u32,
    /// `veth`, `bridge`... for virtual links.
    pub kind: Option<String>,
    /// `CIDR` strings.
    pub addresses: Vec<String>,
    /// Whether sysd manages it (static config or DHCP), and how.
    pub managed: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteStatus {
    pub destination: String,
    pub gateway: Option<String>,
    pub device: Option<String>,
    pub protocol: String,
    pub metric: u32,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseStatus {
    pub link: String,
    pub address: String,
    pub server: String,
    pub routers: Vec<String>,
    pub dns: Vec<String>,
    pub domain: Option<String>,
    pub lease_secs: u32,
    pub remaining_secs: u64,
    pub t1_secs: u32,
    pub t2_secs: u32,
}
