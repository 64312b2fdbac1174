//! The runtime helper's half of bridge networking (`network::bridge` is sysd's): between a
//! container's create and start, a veth pair with the host end on the bridge and the other
//! end as the container's `eth0`, with its address and default route, so the process starts
//! with its network in place. The [`Endpoint`] comes from sysd in a bundle annotation.

use std::net::{IpAddr, Ipv4Addr};

use serde::{Deserialize, Serialize};

/// Bundle annotation carrying the [`Endpoint`] to the runtime helper.
pub const ANNOTATION: &str = "org.keelson.network.bridge";

/// One container's place on the bridge.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    pub service: String,
    pub address: Ipv4Addr,
    pub prefix: u8,
    pub gateway: Ipv4Addr,
    pub bridge: String,
    /// The host end of the veth pair.
    pub host_if: String,
}

/// In the runtime helper, between create and start: plugs the container `pid` into the
/// bridge. Leaves the calling thread in the container's network namespace (with lo up).
pub fn plug(pid: i32, ep: &Endpoint) -> anyhow::Result<()> {
    use anyhow::Context;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("runtime for netlink")?;
    rt.block_on(plug_async(pid, ep))
}

async fn plug_async(pid: i32, ep: &Endpoint) -> anyhow::Result<()> {
    use anyhow::{anyhow, Context};
    use futures_util::TryStreamExt;
    use rtnetlink::{LinkUnspec, LinkVeth, RouteMessageBuilder};
    use std::os::fd::AsRawFd;

    let peer = format!("{}p", &ep.host_if[..ep.host_if.len().min(14)]);
    {
        let (conn, handle, _) = rtnetlink::new_connection().context("netlink")?;
        let task = tokio::spawn(conn);
        let index_of = |name: String| {
            let handle = handle.clone();
            async move {
                let mut links = handle.link().get().match_name(name.clone()).execute();
                match links.try_next().await {
                    Ok(Some(m)) => Some(m.header.index),
                    _ => None,
                }
            }
        };
        // A leftover from an instance that died with its namespace still held elsewhere.
        for name in [ep.host_if.clone(), peer.clone()] {
            if let Some(i) = index_of(name).await {
                let _ = handle.link().del(i).execute().await;
            }
        }
        let bridge = index_of(ep.bridge.clone())
            .await
            .ok_or_else(|| anyhow!("bridge {} does not exist", ep.bridge))?;
        handle
            .link()
            .add(LinkVeth::new(&ep.host_if, &peer).build())
            .execute()
            .await
            .with_context(|| format!("creating veth {}", ep.host_if))?;
        let host = index_of(ep.host_if.clone())
            .await
            .ok_or_else(|| anyhow!("veth {} vanished", ep.host_if))?;
        let peer_index = index_of(peer.clone())
            .await
            .ok_or_else(|| anyhow!("veth {peer} vanished"))?;
        handle
            .link()
            .set(
                LinkUnspec::new_with_index(host)
                    .controller(bridge)
                    .up()
                    .build(),
            )
            .execute()
            .await
            .context("attaching the veth to the bridge")?;
        handle
            .link()
            .set(
                LinkUnspec::new_with_index(peer_index)
                    .setns_by_pid(pid as u32)
                    .build(),
            )
            .execute()
            .await
            .context("moving the veth into the container")?;
        task.abort();
    }
    let theirs = format!("/proc/{pid}/ns/net");
    let ns = std::fs::File::open(&theirs).with_context(|| format!("opening {theirs}"))?;
    // SAFETY: setns on an fd we own; the helper is single-threaded (this runtime is
    // current-thread) and exits soon, so switching its namespace affects nothing else.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error()).context("setns");
    }
    let (conn, handle, _) = rtnetlink::new_connection().context("netlink in the container")?;
    let task = tokio::spawn(conn);
    let mut links = handle.link().get().match_name(peer.clone()).execute();
    let index = links
        .try_next()
        .await
        .context("finding the veth in the container")?
        .ok_or_else(|| anyhow!("veth {peer} not in the container"))?
        .header
        .index;
    handle
        .link()
        .set(LinkUnspec::new_with_index(index).name("eth0").build())
        .execute()
        .await
        .context("naming eth0")?;
    handle
        .link()
        .set(LinkUnspec::new_with_index(index).up().build())
        .execute()
        .await
        .context("eth0 up")?;
    handle
        .address()
        .add(index, IpAddr::V4(ep.address), ep.prefix)
        .execute()
        .await
        .context("eth0 address")?;
    let mut lo = handle.link().get().match_name("lo").execute();
    if let Ok(Some(m)) = lo.try_next().await {
        let _ = handle
            .link()
            .set(LinkUnspec::new_with_index(m.header.index).up().build())
            .execute()
            .await;
    }
    handle
        .route()
        .add(
            RouteMessageBuilder::<Ipv4Addr>::new()
                .gateway(ep.gateway)
                .output_interface(index)
                .build(),
        )
        .execute()
        .await
        .context("default route")?;
    task.abort();
    // Announce ourselves: a datagram to the gateway makes the container ARP for it, and the
    // host learns the container's MAC from that request. Without it, traffic that reached the
    // host for this address before the container existed (a published port being polled)
    // waits for the host's next ARP retry, up to a second later.
    if let Ok(sock) = std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)) {
        let _ = sock.send_to(&[0], (ep.gateway, 9));
    }
    Ok(())
}
