//! The DHCPv4 client (RFC 2131), one task per link: INIT → SELECTING → REQUESTING → BOUND →
//! RENEWING (unicast at T1) → REBINDING (broadcast at T2) → expiry; INIT-REBOOT with the lease
//! kept on /var after a reboot or a carrier change; RELEASE on shutdown. Messages are encoded
//! with `dhcproto`; the state machine, timers and socket are here.
//!
//! The socket is a UDP socket on port 68 bound to the link (SO_BINDTODEVICE) with the broadcast
//! flag set in every request, so a server's answers reach it before the link has an address
//! (no packet socket needed). The lease's address is added with the lease's lifetime, so the
//! kernel itself drops it if sysd is gone when it runs out.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use dhcproto::v4::{
    DhcpOption, Flags, Message, MessageType, Opcode, OptionCode, CLIENT_PORT, SERVER_PORT,
};
use dhcproto::{Decodable, Decoder, Encodable};
use rtnetlink::packet_route::route::RouteProtocol;
use serde::{Deserialize, Serialize};
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use super::links::Netlink;
use keelson_spec::network::Cidr;

/// Metric of routes learnt from DHCP (below static routes' 0, as networkd's 1024).
pub(crate) const DHCP_METRIC: u32 = 1024;

/// What a server gave us, as kept on /var (`lease-IFNAME.json`) and shown by `keelctl net`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub address: Ipv4Addr,
    pub prefix: u8,
    pub server: Ipv4Addr,
    #[serde(default)]
    pub routers: Vec<Ipv4Addr>,
    #[serde(default)]
    pub dns: Vec<Ipv4Addr>,
    pub domain: Option<String>,
    pub hostname: Option<String>,
    pub mtu: Option<u16>,
    /// Option 121 (RFC 3442): `(destination, gateway)`; when present the router option is
    /// ignored, as the RFC requires.
    #[serde(default)]
    pub classless_routes: Vec<(String, Ipv4Addr)>,
    pub lease_secs: u32,
    pub t1_secs: u32,
    pub t2_secs: u32,
    /// When the lease was acknowledged (seconds since the epoch).
    pub acquired_unix: u64,
}

impl Lease {
    fn cidr(&self) -> Cidr {
        Cidr {
            addr: IpAddr::V4(self.address),
            prefix: self.prefix,
        }
    }

    /// Seconds left (0 once expired).
    pub fn remaining_secs(&self) -> u64 {
        let now = unix_now();
        (self.acquired_unix + u64::from(self.lease_secs)).saturating_sub(now)
    }

    /// The routes this lease installs: classless routes if given, else a default route per
    /// router (the first one only; the kernel would ignore the rest at the same metric).
    pub fn routes(&self) -> Vec<(Cidr, Ipv4Addr)> {
        if !self.classless_routes.is_empty() {
            return self
                .classless_routes
                .iter()
                .filter_map(|(d, g)| Cidr::parse(d).ok().map(|c| (c, *g)))
                .collect();
        }
        self.routers
            .first()
            .map(|r| {
                vec![(
                    Cidr {
                        addr: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                        prefix: 0,
                    },
                    *r,
                )]
            })
            .unwrap_or_default()
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// What the client tells the network manager.
#[derive(Debug, Clone)]
pub enum Report {
    /// A lease was acquired, renewed or rebound (the address and routes are in place).
    Bound {
        link: String,
        lease: Lease,
        how: &'static str,
    },
    /// No lease any more (expired, NAK, released).
    Unbound { link: String, why: String },
    /// Something worth an event line (NAK, no answer, retries).
    Note {
        link: String,
        kind: &'static str,
        message: String,
    },
}

/// The inputs of a client task.
pub struct Client {
    pub nl: Netlink,
    pub index: u32,
    pub name: String,
    pub mac: [u8; 6],
    /// Where the lease is kept across reboots.
    pub lease_file: PathBuf,
    /// Hostname to send (option 12), if any.
    pub hostname: Option<String>,
    pub carrier: watch::Receiver<bool>,
    pub stop: watch::Receiver<bool>,
    pub reports: mpsc::UnboundedSender<Report>,
    /// How the lease about to be reported was obtained (`offered`, `renewed`...).
    pub how: &'static str,
    /// An ACK not yet reported.
    pub fresh: bool,
}

enum State {
    Init { hint: Option<Ipv4Addr> },
    InitReboot(Lease),
    Bound(Lease),
    Renewing(Lease),
    Rebinding(Lease),
}

enum Wait {
    Reply(Message),
    Timeout,
    /// Stop requested or carrier lost.
    Interrupted,
}

impl Client {
    /// Runs until stopped; then releases the lease (if any) and removes what it installed.
    pub async fn run(mut self) {
        let mut sock = None;
        let mut state = match load_lease(&self.lease_file) {
            Some(l) => State::InitReboot(l),
            None => State::Init { hint: None },
        };
        let mut applied: Option<Lease> = None;
        loop {
            if *self.stop.borrow() {
                break;
            }
            if !*self.carrier.borrow() {
                // Wait for the carrier; the lease is verified again when it comes back.
                tokio::select! {
                    _ = self.carrier.wait_for(|c| *c) => {}
                    _ = self.stop.wait_for(|s| *s) => break,
                }
                state = match state {
                    State::Bound(l) | State::Renewing(l) | State::Rebinding(l) => {
                        self.note("carrier", format!("carrier back; confirming {}", l.address));
                        State::InitReboot(l)
                    }
                    other => other,
                };
            }
            if sock.is_none() {
                match bind_socket(&self.name) {
                    Ok(s) => sock = Some(s),
                    Err(e) => {
                        self.note("dhcp-error", format!("cannot open the DHCP socket: {e}"));
                        tokio::select! {
                            _ = tokio::time::sleep(Duration::from_secs(2)) => continue,
                            _ = self.stop.wait_for(|s| *s) => break,
                        }
                    }
                }
            }
            let Some(s) = sock.as_ref() else { continue };
            state = match state {
                State::Init { hint } => self.init(s, hint).await,
                State::InitReboot(l) => self.init_reboot(s, l).await,
                State::Bound(l) => {
                    // (Re)installed on every ACK too: replaces are idempotent, and routes may
                    // have gone with the carrier.
                    if applied.as_ref() != Some(&l) || self.fresh {
                        if let Err(e) = self.install(&l, applied.as_ref()).await {
                            self.note(
                                "dhcp-error",
                                format!("installing {}: {}", l.address, super::chain(&e)),
                            );
                        }
                        applied = Some(l.clone());
                    }
                    // Every ACK is reported (a confirmation within the second of the lease
                    // it confirms changes nothing to install but is still news).
                    if std::mem::take(&mut self.fresh) {
                        let _ = self.reports.send(Report::Bound {
                            link: self.name.clone(),
                            lease: l.clone(),
                            how: self.how,
                        });
                    }
                    self.bound(l).await
                }
                State::Renewing(l) => self.renewing(s, l).await,
                State::Rebinding(l) => self.rebinding(s, l).await,
            };
            if let State::Init { .. } = state {
                if let Some(old) = applied.take() {
                    self.uninstall(&old).await;
                }
            }
        }
        // Shutdown: give the address back (RFC 2131 4.4.6) but keep the lease file, so the
        // next boot asks for the same address.
        if let (Some(l), Some(s)) = (applied.as_ref(), sock.as_ref()) {
            let mut m = self.message(MessageType::Release, l.address);
            m.opts_mut().insert(DhcpOption::ServerIdentifier(l.server));
            let _ = send(s, &m, l.server).await;
            self.uninstall(l).await;
            let _ = self.reports.send(Report::Unbound {
                link: self.name.clone(),
                why: format!("released {} to {}", l.address, l.server),
            });
        }
    }

    fn note(&self, kind: &'static str, message: String) {
        let _ = self.reports.send(Report::Note {
            link: self.name.clone(),
            kind,
            message,
        });
    }

    /// A request skeleton: our MAC, the broadcast flag, a fresh xid, client id, hostname and
    /// the options we want.
    fn message(&self, kind: MessageType, ciaddr: Ipv4Addr) -> Message {
        let mut m = Message::new(
            ciaddr,
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
            &self.mac,
        );
        if ciaddr.is_unspecified() {
            m.set_flags(Flags::default().set_broadcast());
        }
        let opts = m.opts_mut();
        opts.insert(DhcpOption::MessageType(kind));
        let mut id = vec![1u8];
        id.extend_from_slice(&self.mac);
        opts.insert(DhcpOption::ClientIdentifier(id));
        if kind != MessageType::Release {
            opts.insert(DhcpOption::ParameterRequestList(vec![
                OptionCode::SubnetMask,
                OptionCode::Router,
                OptionCode::DomainNameServer,
                OptionCode::DomainName,
                OptionCode::Hostname,
                OptionCode::InterfaceMtu,
                OptionCode::ClasslessStaticRoute,
                OptionCode::Renewal,
                OptionCode::Rebinding,
            ]));
            opts.insert(DhcpOption::MaxMessageSize(1500));
            if let Some(h) = &self.hostname {
                opts.insert(DhcpOption::Hostname(h.clone()));
            }
        }
        m
    }

    async fn init(&mut self, sock: &UdpSocket, hint: Option<Ipv4Addr>) -> State {
        // SELECTING: discover until an offer arrives (1, 2, 4 ... 32 s between tries).
        let mut delay = Duration::from_secs(1);
        let mut tries = 0u32;
        let offer = loop {
            let mut d = self.message(MessageType::Discover, Ipv4Addr::UNSPECIFIED);
            if let Some(ip) = hint {
                d.opts_mut().insert(DhcpOption::RequestedIpAddress(ip));
            }
            let xid = d.xid();
            if let Err(e) = send(sock, &d, Ipv4Addr::BROADCAST).await {
                self.note("dhcp-error", format!("sending DISCOVER: {e}"));
            }
            match self
                .wait(
                    sock,
                    xid,
                    &[MessageType::Offer],
                    Instant::now() + jitter(delay),
                )
                .await
            {
                Wait::Reply(m) => break m,
                Wait::Interrupted => return State::Init { hint },
                Wait::Timeout => {
                    tries += 1;
                    if tries == 4 {
                        self.note(
                            "dhcp-waiting",
                            "no DHCP offer after 4 tries; still trying".into(),
                        );
                    }
                    delay = (delay * 2).min(Duration::from_secs(32));
                }
            }
        };
        let Some(server) = server_of(&offer) else {
            return State::Init { hint };
        };
        // REQUESTING.
        let mut r = self.message(MessageType::Request, Ipv4Addr::UNSPECIFIED);
        r.set_xid(offer.xid());
        r.opts_mut()
            .insert(DhcpOption::RequestedIpAddress(offer.yiaddr()));
        r.opts_mut().insert(DhcpOption::ServerIdentifier(server));
        self.request(sock, r, Ipv4Addr::BROADCAST, 3, "offered")
            .await
            .unwrap_or(State::Init { hint })
    }

    async fn init_reboot(&mut self, sock: &UdpSocket, lease: Lease) -> State {
        self.note(
            "dhcp-reboot",
            format!("requesting the previous lease {}", lease.address),
        );
        let mut r = self.message(MessageType::Request, Ipv4Addr::UNSPECIFIED);
        r.opts_mut()
            .insert(DhcpOption::RequestedIpAddress(lease.address));
        match self
            .request(sock, r, Ipv4Addr::BROADCAST, 3, "confirmed")
            .await
        {
            Some(s) => s,
            // Carrier lost again (or stopping): keep the lease and try again later.
            None if !*self.carrier.borrow() || *self.stop.borrow() => State::InitReboot(lease),
            None => State::Init {
                hint: Some(lease.address),
            },
        }
    }

    /// Sends a REQUEST (retransmitted `tries` times: 1, 2, 4 s) and turns the answer into the
    /// next state. None: no answer.
    async fn request(
        &mut self,
        sock: &UdpSocket,
        req: Message,
        to: Ipv4Addr,
        tries: u32,
        how: &'static str,
    ) -> Option<State> {
        let mut delay = Duration::from_secs(1);
        for _ in 0..tries {
            if let Err(e) = send(sock, &req, to).await {
                self.note("dhcp-error", format!("sending REQUEST: {e}"));
            }
            match self
                .wait(
                    sock,
                    req.xid(),
                    &[MessageType::Ack, MessageType::Nak],
                    Instant::now() + jitter(delay),
                )
                .await
            {
                Wait::Reply(m) => return Some(self.answer(m, how)),
                Wait::Interrupted => return None,
                Wait::Timeout => delay *= 2,
            }
        }
        None
    }

    /// ACK → BOUND (lease stored); NAK → INIT.
    fn answer(&mut self, m: Message, how: &'static str) -> State {
        if m.opts().msg_type() == Some(MessageType::Nak) {
            let why = match m.opts().get(OptionCode::Message) {
                Some(DhcpOption::Message(s)) => format!(" ({s})"),
                _ => String::new(),
            };
            self.note(
                "dhcp-nak",
                format!(
                    "server {} refused the request{why}; starting over",
                    server_of(&m).map(|s| s.to_string()).unwrap_or_default()
                ),
            );
            let _ = std::fs::remove_file(&self.lease_file);
            let _ = self.reports.send(Report::Unbound {
                link: self.name.clone(),
                why: "NAK".into(),
            });
            return State::Init { hint: None };
        }
        match lease_of(&m) {
            Some(lease) => {
                if let Err(e) = store_lease(&self.lease_file, &lease) {
                    self.note(
                        "dhcp-error",
                        format!("keeping the lease in {}: {e}", self.lease_file.display()),
                    );
                }
                // Reported once the address and routes are in place (see `run`).
                self.how = how;
                self.fresh = true;
                State::Bound(lease)
            }
            None => State::Init { hint: None },
        }
    }

    /// BOUND: sleep until T1 (or a stop, or carrier loss).
    async fn bound(&mut self, lease: Lease) -> State {
        let t1 = at(&lease, lease.t1_secs);
        let lost = tokio::select! {
            _ = tokio::time::sleep_until(t1) => return State::Renewing(lease),
            _ = self.stop.wait_for(|s| *s) => false,
            _ = self.carrier.wait_for(|c| !*c) => true,
        };
        if lost {
            self.note(
                "carrier",
                "carrier lost; keeping the lease until it returns".into(),
            );
            // However short the loss, the lease is confirmed once the carrier is back (the
            // link may now be on another network).
            return State::InitReboot(lease);
        }
        State::Bound(lease)
    }

    async fn renewing(&mut self, sock: &UdpSocket, lease: Lease) -> State {
        self.extend(sock, lease, false).await
    }

    async fn rebinding(&mut self, sock: &UdpSocket, lease: Lease) -> State {
        self.extend(sock, lease, true).await
    }

    /// RENEWING (unicast to the server until T2) or REBINDING (broadcast until expiry):
    /// retransmit at half the time left, at least every 2 s... at most 60 s (RFC 2131 4.4.5).
    async fn extend(&mut self, sock: &UdpSocket, lease: Lease, rebinding: bool) -> State {
        let until = if rebinding {
            at(&lease, lease.lease_secs)
        } else {
            at(&lease, lease.t2_secs)
        };
        loop {
            let now = Instant::now();
            if now >= until {
                if rebinding {
                    self.note(
                        "dhcp-expired",
                        format!("lease {} expired without an answer", lease.address),
                    );
                    let _ = self.reports.send(Report::Unbound {
                        link: self.name.clone(),
                        why: "lease expired".into(),
                    });
                    return State::Init {
                        hint: Some(lease.address),
                    };
                }
                self.note(
                    "dhcp-rebinding",
                    format!("no answer from {} by T2; rebinding", lease.server),
                );
                return State::Rebinding(lease);
            }
            let mut r = self.message(MessageType::Request, lease.address);
            r.set_flags(Flags::default());
            let to = if rebinding {
                Ipv4Addr::BROADCAST
            } else {
                lease.server
            };
            if let Err(e) = send(sock, &r, to).await {
                self.note("dhcp-error", format!("sending REQUEST to {to}: {e}"));
            }
            let wait = ((until - now) / 2).clamp(Duration::from_secs(2), Duration::from_secs(60));
            let deadline = (now + wait).min(until);
            match self
                .wait(
                    sock,
                    r.xid(),
                    &[MessageType::Ack, MessageType::Nak],
                    deadline,
                )
                .await
            {
                Wait::Reply(m) => {
                    return self.answer(m, if rebinding { "rebound" } else { "renewed" })
                }
                Wait::Interrupted if *self.stop.borrow() => return State::Bound(lease),
                Wait::Interrupted => return State::InitReboot(lease),
                Wait::Timeout => {}
            }
        }
    }

    /// Waits for a reply of one of `kinds` to `xid` until `deadline`.
    async fn wait(
        &mut self,
        sock: &UdpSocket,
        xid: u32,
        kinds: &[MessageType],
        deadline: Instant,
    ) -> Wait {
        let mut buf = vec![0u8; 1500];
        loop {
            tokio::select! {
                r = sock.recv_from(&mut buf) => {
                    let Ok((n, _)) = r else { continue };
                    if let Some(m) = reply(&buf[..n], xid, &self.mac, kinds) {
                        return Wait::Reply(m);
                    }
                }
                _ = tokio::time::sleep_until(deadline) => return Wait::Timeout,
                _ = self.stop.wait_for(|s| *s) => return Wait::Interrupted,
                _ = self.carrier.wait_for(|c| !*c) => return Wait::Interrupted,
            }
        }
    }

    /// Puts the lease's address, routes and MTU on the link (replacing a previous lease's).
    async fn install(
        &self,
        lease: &Lease,
        previous: Option<&Lease>,
    ) -> Result<(), super::links::Error> {
        if let Some(p) = previous {
            if p.address != lease.address || p.prefix != lease.prefix {
                self.uninstall(p).await;
            }
        }
        if let Some(mtu) = lease.mtu.filter(|m| *m >= 576) {
            self.nl.set_up(self.index, Some(u32::from(mtu))).await?;
        }
        let remaining = u32::try_from(lease.remaining_secs()).unwrap_or(u32::MAX);
        let lifetime = (lease.lease_secs != u32::MAX).then_some(remaining.max(1));
        self.nl
            .replace_address(self.index, lease.cidr(), lifetime)
            .await?;
        for (dst, gw) in lease.routes() {
            let gw = (!gw.is_unspecified()).then_some(IpAddr::V4(gw));
            self.nl
                .replace_route(
                    dst,
                    gw,
                    self.index,
                    Some(IpAddr::V4(lease.address)),
                    RouteProtocol::Dhcp,
                    DHCP_METRIC,
                )
                .await?;
        }
        Ok(())
    }

    async fn uninstall(&self, lease: &Lease) {
        for (dst, gw) in lease.routes() {
            let gw = (!gw.is_unspecified()).then_some(IpAddr::V4(gw));
            let _ = self.nl.delete_route(dst, gw, self.index, DHCP_METRIC).await;
        }
        let _ = self.nl.delete_address(self.index, lease.cidr()).await;
    }
}

/// The instant `secs` after the lease was acquired (monotonic, from the wall clock's view of
/// how much is left).
fn at(lease: &Lease, secs: u32) -> Instant {
    let target = lease.acquired_unix + u64::from(secs);
    let left = target.saturating_sub(unix_now());
    Instant::now() + Duration::from_secs(left)
}

/// ±0.5 s of randomness on a retransmission delay (RFC 2131 4.1), so clients that lost power
/// together do not retry together.
fn jitter(d: Duration) -> Duration {
    let mut b = [0u8; 2];
    // SAFETY: getrandom writes at most `b.len()` bytes into `b`.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    let r = if n == 2 { u16::from_le_bytes(b) } else { 0 };
    let ms = u64::from(r % 1000);
    (d + Duration::from_millis(ms)).saturating_sub(Duration::from_millis(500))
}

fn server_of(m: &Message) -> Option<Ipv4Addr> {
    match m.opts().get(OptionCode::ServerIdentifier) {
        Some(DhcpOption::ServerIdentifier(ip)) => Some(*ip),
        _ => None,
    }
}

/// The reply in a received datagram: a BOOTREPLY to `xid` for `mac`, of one of `kinds`.
/// `None` for anything else (not DHCP, malformed, another client's or another exchange's).
pub fn reply(datagram: &[u8], xid: u32, mac: &[u8; 6], kinds: &[MessageType]) -> Option<Message> {
    // Anyone on the link can send one: a panic in the decoder (a bug) drops this datagram,
    // not the link's client (the release profile unwinds; ARCHITECTURE.md, Decisions).
    let m = std::panic::catch_unwind(|| Message::decode(&mut Decoder::new(datagram)))
        .ok()?
        .ok()?;
    // `chaddr()` slices the 16-byte field by the datagram's own `hlen`, which dhcproto does not
    // bound: one byte over 16 from anyone on the link panicked sysd (found by `dhcp_reply`).
    if m.opcode() != Opcode::BootReply
        || m.xid() != xid
        || !(6..=16).contains(&m.hlen())
        || m.chaddr()[..6] != mac[..]
    {
        return None;
    }
    m.opts()
        .msg_type()
        .is_some_and(|k| kinds.contains(&k))
        .then_some(m)
}

/// The lease in an ACK (`None` without a server identifier).
pub fn lease_of(m: &Message) -> Option<Lease> {
    let o = m.opts();
    let server = server_of(m)?;
    let mask = match o.get(OptionCode::SubnetMask) {
        Some(DhcpOption::SubnetMask(mask)) => *mask,
        _ => Ipv4Addr::new(255, 255, 255, 0),
    };
    let lease_secs = match o.get(OptionCode::AddressLeaseTime) {
        Some(DhcpOption::AddressLeaseTime(t)) => *t,
        _ => 3600,
    };
    let t1_secs = match o.get(OptionCode::Renewal) {
        Some(DhcpOption::Renewal(t)) if *t < lease_secs => *t,
        _ => lease_secs / 2,
    };
    let t2_secs = match o.get(OptionCode::Rebinding) {
        Some(DhcpOption::Rebinding(t)) if *t < lease_secs && *t >= t1_secs => *t,
        _ => (u64::from(lease_secs) * 7 / 8) as u32,
    };
    Some(Lease {
        address: m.yiaddr(),
        prefix: u32::from(mask).count_ones() as u8,
        server,
        routers: match o.get(OptionCode::Router) {
            Some(DhcpOption::Router(r)) => r.clone(),
            _ => Vec::new(),
        },
        dns: match o.get(OptionCode::DomainNameServer) {
            Some(DhcpOption::DomainNameServer(d)) => d.clone(),
            _ => Vec::new(),
        },
        domain: match o.get(OptionCode::DomainName) {
            Some(DhcpOption::DomainName(d)) => Some(d.clone()),
            _ => None,
        },
        hostname: match o.get(OptionCode::Hostname) {
            Some(DhcpOption::Hostname(h)) => Some(h.clone()),
            _ => None,
        },
        mtu: match o.get(OptionCode::InterfaceMtu) {
            Some(DhcpOption::InterfaceMtu(m)) => Some(*m),
            _ => None,
        },
        classless_routes: match o.get(OptionCode::ClasslessStaticRoute) {
            Some(DhcpOption::ClasslessStaticRoute(routes)) => routes
                .iter()
                .map(|(net, gw)| (net.to_string(), *gw))
                .collect(),
            _ => Vec::new(),
        },
        lease_secs,
        t1_secs,
        t2_secs,
        acquired_unix: unix_now(),
    })
}

async fn send(sock: &UdpSocket, m: &Message, to: Ipv4Addr) -> std::io::Result<()> {
    let bytes = m
        .to_vec()
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()))?;
    sock.send_to(&bytes, SocketAddr::V4(SocketAddrV4::new(to, SERVER_PORT)))
        .await
        .map(|_| ())
}

/// UDP port 68 on `ifname` only, broadcast allowed.
fn bind_socket(ifname: &str) -> std::io::Result<UdpSocket> {
    let err = std::io::Error::last_os_error;
    // SAFETY: plain socket(2); the fd is owned right away.
    let raw = unsafe {
        libc::socket(
            libc::AF_INET,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            0,
        )
    };
    if raw < 0 {
        return Err(err());
    }
    // SAFETY: `raw` is a fresh fd nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let one: libc::c_int = 1;
    for opt in [libc::SO_REUSEADDR, libc::SO_BROADCAST] {
        // SAFETY: setsockopt with an int option value of the right size.
        let r = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                (&one as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if r < 0 {
            return Err(err());
        }
    }
    // SAFETY: SO_BINDTODEVICE takes the interface name bytes and their length.
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_BINDTODEVICE,
            ifname.as_ptr().cast(),
            ifname.len() as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(err());
    }
    // SAFETY: sockaddr_in is plain old data; all-zero is INADDR_ANY.
    let mut sa: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    sa.sin_family = libc::AF_INET as libc::sa_family_t;
    sa.sin_port = CLIENT_PORT.to_be();
    // SAFETY: bind with a sockaddr_in of the size given.
    let r = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&sa as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(err());
    }
    UdpSocket::from_std(std::net::UdpSocket::from(fd))
}

pub fn load_lease(path: &std::path::Path) -> Option<Lease> {
    let text = std::fs::read_to_string(path).ok()?;
    serde_json::from_str(&text).ok()
}

fn store_lease(path: &std::path::Path, lease: &Lease) -> std::io::Result<()> {
    let json = serde_json::to_vec_pretty(lease).map_err(std::io::Error::other)?;
    Ok(keelson_common::durable::replace(path, &json)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];

    /// A BOOTREPLY to xid 0x12345678 for [`MAC`] with hardware address length `hlen`: an ACK
    /// from 10.0.2.2 giving 10.0.2.15/24 for a day.
    fn ack(hlen: u8) -> Vec<u8> {
        let mut p = vec![2, 1, hlen, 0, 0x12, 0x34, 0x56, 0x78, 0, 0, 0x80, 0];
        p.extend_from_slice(&[0; 4]); // ciaddr
        p.extend_from_slice(&[10, 0, 2, 15]); // yiaddr
        p.extend_from_slice(&[10, 0, 2, 2]); // siaddr
        p.extend_from_slice(&[0; 4]); // giaddr
        p.extend_from_slice(&MAC);
        p.extend_from_slice(&[0; 10 + 64 + 128]); // rest of chaddr, sname, file
        p.extend_from_slice(&[0x63, 0x82, 0x53, 0x63]);
        p.extend_from_slice(&[53, 1, 5, 54, 4, 10, 0, 2, 2, 51, 4, 0, 1, 0x51, 0x80]);
        p.extend_from_slice(&[1, 4, 255, 255, 255, 0, 255]);
        p
    }

    #[test]
    fn an_ack_for_this_exchange_is_its_lease() {
        let m = reply(&ack(6), 0x1234_5678, &MAC, &[MessageType::Ack]).expect("the ACK");
        let lease = lease_of(&m).expect("a lease");
        assert_eq!(
            (lease.address, lease.prefix, lease.lease_secs),
            (Ipv4Addr::new(10, 0, 2, 15), 24, 86400)
        );
        assert!(reply(&ack(6), 0x1234_5679, &MAC, &[MessageType::Ack]).is_none());
        assert!(reply(&ack(6), 0x1234_5678, &MAC, &[MessageType::Nak]).is_none());
    }

    /// Found by the `dhcp_reply` fuzz target: a hardware address length over 16 made
    /// dhcproto's `chaddr()` index past its 16-byte field, a panic on one datagram from anyone
    /// on the link. Such a datagram is not a reply to us.
    #[test]
    fn a_hardware_address_length_over_16_is_not_a_reply() {
        for hlen in [0, 5, 17, 0xbc, 255] {
            assert!(
                reply(&ack(hlen), 0x1234_5678, &MAC, &[MessageType::Ack]).is_none(),
                "hlen {hlen}"
            );
        }
        assert!(reply(&ack(16), 0x1234_5678, &MAC, &[MessageType::Ack]).is_some());
    }
}
