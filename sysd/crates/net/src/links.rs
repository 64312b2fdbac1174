//! Links, addresses and routes over rtnetlink: the only way sysd changes the host network.
//! Every change is a replace or an idempotent delete, so applying the same config twice leaves
//! the kernel as it was after the first time.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use futures_util::TryStreamExt;
use rtnetlink::packet_route::address::{AddressAttribute, AddressMessage, CacheInfo};
use rtnetlink::packet_route::link::{InfoKind, LinkAttribute, LinkFlags, LinkInfo, LinkMessage};
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteScope,
};
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};

use keelson_spec::network::Cidr;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("netlink: {what}")]
    Netlink {
        what: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("cannot open a netlink socket")]
    Socket(#[source] std::io::Error),
}

type Result<T> = std::result::Result<T, Error>;

fn nl(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> Error {
    let what = what.into();
    move |source| Error::Netlink { what, source }
}

/// A link as sysd sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub mac: Option<String>,
    pub up: bool,
    pub carrier: bool,
    pub mtu: u32,
    /// `veth`, `bridge`, `vlan`... for virtual links; None for hardware (and loopback).
    pub kind: Option<String>,
    pub loopback: bool,
    /// The index of the bond (or bridge) this link is enslaved to.
    pub controller: Option<u32>,
}

impl Link {
    fn from_message(m: &LinkMessage) -> Link {
        let mut link = Link {
            index: m.header.index,
            name: String::new(),
            mac: None,
            up: m.header.flags.contains(LinkFlags::Up),
            carrier: m.header.flags.contains(LinkFlags::LowerUp),
            mtu: 0,
            kind: None,
            loopback: m.header.flags.contains(LinkFlags::Loopback),
            controller: None,
        };
        for attr in &m.attributes {
            match attr {
                LinkAttribute::IfName(n) => link.name = n.clone(),
                LinkAttribute::Address(a) if a.len() == 6 => {
                    link.mac = Some(
                        a.iter()
                            .map(|b| format!("{b:02x}"))
                            .collect::<Vec<_>>()
                            .join(":"),
                    )
                }
                LinkAttribute::Mtu(mtu) => link.mtu = *mtu,
                LinkAttribute::Controller(c) => link.controller = Some(*c),
                LinkAttribute::LinkInfo(infos) => {
                    for i in infos {
                        if let LinkInfo::Kind(k) = i {
                            link.kind = Some(match k {
                                InfoKind::Other(s) => s.clone(),
                                other => other.to_string(),
                            });
                        }
                    }
                }
                _ => {}
            }
        }
        link
    }

    /// The kernel driver behind the link (`virtio_net`), from sysfs.
    pub fn driver(&self) -> Option<String> {
        let target =
            std::fs::read_link(format!("/sys/class/net/{}/device/driver", self.name)).ok()?;
        Some(target.file_name()?.to_string_lossy().into_owned())
    }
}

/// An address on a link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Address {
    pub index: u32,
    pub cidr: Cidr,
    /// Seconds left, None = forever.
    pub valid_lft: Option<u32>,
}

/// A main-table route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub dst: Cidr,
    pub gateway: Option<IpAddr>,
    pub oif: Option<u32>,
    pub protocol: String,
    pub metric: u32,
}

/// A connection to the kernel's routing netlink family.
#[derive(Clone)]
pub struct Netlink {
    handle: Handle,
    /// Held for the length of a dump. The kernel runs one dump at a time per netlink socket and
    /// answers a second one with EBUSY (`netlink_dump_start`); sysd's tasks share this
    /// connection (the DHCP client, the online check and the links' watcher list routes, links
    /// and addresses around the same moments at boot), so their dumps take turns.
    dumping: Arc<tokio::sync::Mutex<()>>,
}

impl Netlink {
    /// Opens a connection; its I/O task runs on the current tokio runtime.
    pub fn open() -> Result<Netlink> {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(Error::Socket)?;
        tokio::spawn(conn);
        Ok(Netlink {
            handle,
            dumping: Arc::default(),
        })
    }

    /// A whole dump, requested and collected while no other dump runs on this connection
    /// (`request` sends it: rtnetlink queues the message when the request is executed).
    async fn dump<T, S>(&self, what: &str, request: impl FnOnce() -> S) -> Result<Vec<T>>
    where
        S: futures_util::Stream<Item = std::result::Result<T, rtnetlink::Error>>,
    {
        let _turn = self.dumping.lock().await;
        request().try_collect().await.map_err(nl(what))
    }

    pub async fn links(&self) -> Result<Vec<Link>> {
        let msgs = self
            .dump("listing links", || self.handle.link().get().execute())
            .await?;
        Ok(msgs.iter().map(Link::from_message).collect())
    }

    pub async fn add_bridge(&self, name: &str) -> Result<()> {
        self.handle
            .link()
            .add(rtnetlink::LinkBridge::new(name).build())
            .execute()
            .await
            .map_err(nl(format!("creating bridge {name}")))
    }

    /// `ip link add NAME link PARENT type vlan id ID`.
    pub async fn add_vlan(&self, name: &str, parent: u32, id: u16) -> Result<()> {
        self.handle
            .link()
            .add(rtnetlink::LinkVlan::new(name, parent, id).build())
            .execute()
            .await
            .map_err(nl(format!("creating vlan {name} (id {id})")))
    }

    /// `ip link add NAME type bond mode active-backup miimon 100`.
    pub async fn add_bond(&self, name: &str) -> Result<()> {
        use rtnetlink::packet_route::link::BondMode;
        self.handle
            .link()
            .add(
                rtnetlink::LinkBond::new(name)
                    .mode(BondMode::ActiveBackup)
                    .miimon(100)
                    .build(),
            )
            .execute()
            .await
            .map_err(nl(format!("creating bond {name}")))
    }

    /// Enslaves a link to a bond: down, controller set, up (the kernel refuses an up link).
    pub async fn enslave(&self, index: u32, controller: u32) -> Result<()> {
        for msg in [
            LinkUnspec::new_with_index(index).down().build(),
            LinkUnspec::new_with_index(index)
                .controller(controller)
                .build(),
            LinkUnspec::new_with_index(index).up().build(),
        ] {
            self.handle
                .link()
                .set(msg)
                .execute()
                .await
                .map_err(nl(format!("enslaving link {index} to {controller}")))?;
        }
        Ok(())
    }

    /// Takes a link out of its bond.
    pub async fn release(&self, index: u32) -> Result<()> {
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(index).nocontroller().build())
            .execute()
            .await
            .map_err(nl(format!("releasing link {index} from its bond")))
    }

    pub async fn delete_link(&self, index: u32) -> Result<()> {
        self.handle
            .link()
            .del(index)
            .execute()
            .await
            .map_err(nl(format!("deleting link {index}")))
    }

    pub async fn set_up(&self, index: u32, mtu: Option<u32>) -> Result<()> {
        let mut b = LinkUnspec::new_with_index(index).up();
        if let Some(mtu) = mtu {
            b = b.mtu(mtu);
        }
        self.handle
            .link()
            .set(b.build())
            .execute()
            .await
            .map_err(nl(format!("setting link {index} up")))
    }

    pub async fn addresses(&self) -> Result<Vec<Address>> {
        let msgs: Vec<AddressMessage> = self
            .dump("listing addresses", || {
                self.handle.address().get().execute()
            })
            .await?;
        let mut out = Vec::new();
        for m in msgs {
            let mut addr = None;
            let mut local = None;
            let mut valid = None;
            for a in &m.attributes {
                match a {
                    AddressAttribute::Address(ip) => addr = Some(*ip),
                    AddressAttribute::Local(ip) => local = Some(*ip),
                    AddressAttribute::CacheInfo(ci) if ci.ifa_valid != u32::MAX => {
                        valid = Some(ci.ifa_valid)
                    }
                    _ => {}
                }
            }
            if let Some(ip) = local.or(addr) {
                out.push(Address {
                    index: m.header.index,
                    cidr: Cidr {
                        addr: ip,
                        prefix: m.header.prefix_len,
                    },
                    valid_lft: valid,
                });
            }
        }
        Ok(out)
    }

    /// Adds or refreshes an address; `lifetime` in seconds (the kernel removes it when it runs
    /// out, as with `ip addr ... valid_lft`), None = forever.
    pub async fn replace_address(
        &self,
        index: u32,
        cidr: Cidr,
        lifetime: Option<u32>,
    ) -> Result<()> {
        let mut req = self
            .handle
            .address()
            .add(index, cidr.addr, cidr.prefix)
            .replace();
        if let Some(secs) = lifetime {
            let mut ci = CacheInfo::default();
            ci.ifa_preferred = secs;
            ci.ifa_valid = secs;
            req.message_mut()
                .attributes
                .push(AddressAttribute::CacheInfo(ci));
        }
        req.execute()
            .await
            .map_err(nl(format!("adding {cidr} to link {index}")))
    }

    /// Removes an address; an address that is already gone is not an error.
    pub async fn delete_address(&self, index: u32, cidr: Cidr) -> Result<()> {
        let current = self.addresses().await?;
        for a in current {
            if a.index == index && a.cidr == cidr {
                let mut msg = AddressMessage::default();
                msg.header.index = index;
                msg.header.prefix_len = cidr.prefix;
                msg.header.family = if cidr.addr.is_ipv4() {
                    AddressFamily::Inet
                } else {
                    AddressFamily::Inet6
                };
                msg.attributes.push(AddressAttribute::Local(cidr.addr));
                msg.attributes.push(AddressAttribute::Address(cidr.addr));
                return self
                    .handle
                    .address()
                    .del(msg)
                    .execute()
                    .await
                    .map_err(nl(format!("removing {cidr} from link {index}")));
            }
        }
        Ok(())
    }

    pub async fn routes(&self) -> Result<Vec<Route>> {
        let mut out = Vec::new();
        for msg in [
            RouteMessageBuilder::<Ipv4Addr>::new().build(),
            RouteMessageBuilder::<std::net::Ipv6Addr>::new().build(),
        ] {
            let msgs: Vec<RouteMessage> = self
                .dump("listing routes", || self.handle.route().get(msg).execute())
                .await?;
            for m in msgs {
                if let Some(r) = route_of(&m) {
                    out.push(r);
                }
            }
        }
        Ok(out)
    }

    /// Adds or replaces a route in the main table. `gateway` None: on-link (scope link).
    pub async fn replace_route(
        &self,
        dst: Cidr,
        gateway: Option<IpAddr>,
        oif: u32,
        src: Option<IpAddr>,
        protocol: RouteProtocol,
        metric: u32,
    ) -> Result<()> {
        let msg = route_message(dst, gateway, oif, src, protocol, metric);
        self.handle
            .route()
            .add(msg)
            .replace()
            .execute()
            .await
            .map_err(nl(format!("adding route {dst}")))
    }

    /// Deletes a route; one that is already gone is not an error.
    pub async fn delete_route(
        &self,
        dst: Cidr,
        gateway: Option<IpAddr>,
        oif: u32,
        metric: u32,
    ) -> Result<()> {
        let exists = self.routes().await?.iter().any(|r| {
            r.dst == dst && r.gateway == gateway && r.oif == Some(oif) && r.metric == metric
        });
        if !exists {
            return Ok(());
        }
        let msg = route_message(dst, gateway, oif, None, RouteProtocol::Unspec, metric);
        self.handle
            .route()
            .del(msg)
            .execute()
            .await
            .map_err(nl(format!("removing route {dst}")))
    }
}

fn route_message(
    dst: Cidr,
    gateway: Option<IpAddr>,
    oif: u32,
    src: Option<IpAddr>,
    protocol: RouteProtocol,
    metric: u32,
) -> RouteMessage {
    let mut m = RouteMessageBuilder::<IpAddr>::new()
        .destination_prefix(dst.addr, dst.prefix)
        .expect("destination matches its family")
        .output_interface(oif)
        .protocol(protocol)
        .priority(metric);
    if let Some(gw) = gateway {
        m = m.gateway(gw).unwrap_or_else(|_| {
            // A v4 route through a v6 gateway is refused by the builder; never built here
            // because the config check pairs families.
            RouteMessageBuilder::<IpAddr>::new()
        });
    } else {
        m = m.scope(RouteScope::Link);
    }
    if let Some(src) = src {
        if let Ok(b) = m.clone().pref_source(src) {
            m = b;
        }
    }
    let mut msg = m.build();
    if dst.addr.is_ipv4() {
        msg.header.address_family = AddressFamily::Inet;
    } else {
        msg.header.address_family = AddressFamily::Inet6;
    }
    msg
}

fn route_of(m: &RouteMessage) -> Option<Route> {
    if m.header.table != RouteMessage::default().header.table
        && m.header.table != 254
        && !m
            .attributes
            .iter()
            .any(|a| matches!(a, RouteAttribute::Table(254)))
    {
        return None;
    }
    if m.attributes
        .iter()
        .any(|a| matches!(a, RouteAttribute::Table(t) if *t != 254))
    {
        return None;
    }
    let v4 = m.header.address_family == AddressFamily::Inet;
    let mut dst = if v4 {
        IpAddr::V4(Ipv4Addr::UNSPECIFIED)
    } else {
        IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED)
    };
    let mut route = Route {
        dst: Cidr {
            addr: dst,
            prefix: m.header.destination_prefix_length,
        },
        gateway: None,
        oif: None,
        protocol: format!("{:?}", m.header.protocol).to_lowercase(),
        metric: 0,
    };
    for a in &m.attributes {
        match a {
            RouteAttribute::Destination(addr) => {
                if let Some(ip) = ip_of(addr) {
                    dst = ip;
                }
            }
            RouteAttribute::Gateway(addr) => route.gateway = ip_of(addr),
            RouteAttribute::Oif(i) => route.oif = Some(*i),
            RouteAttribute::Priority(p) => route.metric = *p,
            _ => {}
        }
    }
    route.dst.addr = dst;
    Some(route)
}

fn ip_of(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Tasks sharing one connection list links, addresses and routes at the same moment (as the
    /// DHCP client, the online check and the link watcher do at boot): every dump answers,
    /// none is refused with EBUSY for another one running on the socket. Reading the tables
    /// needs no privilege.
    #[tokio::test(flavor = "current_thread")]
    async fn dumps_on_one_connection_take_turns() {
        let nl = Netlink::open().expect("a netlink socket");
        let rounds = (0..8).map(|_| async {
            let (links, addresses, routes) = tokio::join!(nl.links(), nl.addresses(), nl.routes());
            links.map(|_| ())?;
            addresses.map(|_| ())?;
            routes.map(|_| ())
        });
        for r in futures_util::future::join_all(rounds).await {
            if let Err(e) = r {
                panic!("{}", crate::chain(&e));
            }
        }
    }
}
