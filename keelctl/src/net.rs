//! `keelctl net`: the host network as sysd manages it (`GET /v1/network`): links with their
//! addresses, routes, DNS, DHCP leases, hostname and the network-online state. Link and lease
//! changes are events (`keelctl events`: kinds `link`, `dhcp-lease`, `dhcp-unbound`, ...).

use std::fmt::Write as _;
use std::io::Write;

use anyhow::Result;
use keelson_common::api::network::NetworkStatus;

use crate::http::Client;
use crate::render::{duration, table};

pub fn run(client: &Client, json: bool, out: &mut impl Write) -> Result<()> {
    let body = client.get(&crate::api("/network"))?;
    if json {
        return crate::print_raw(out, &body);
    }
    let status: NetworkStatus = crate::parse(&body)?;
    write!(out, "{}", render(&status))?;
    Ok(())
}

fn dash(v: &[String]) -> String {
    if v.is_empty() {
        "-".into()
    } else {
        v.join(", ")
    }
}

pub fn render(s: &NetworkStatus) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "online:   {}{}",
        s.online,
        s.online_reason
            .as_ref()
            .map(|r| format!(" ({r})"))
            .unwrap_or_default()
    );
    let _ = writeln!(out, "hostname: {} (from {})", s.hostname, s.hostname_source);
    let _ = writeln!(out, "config:   {}", s.config_origin);
    let _ = writeln!(out, "dns:      {}", dash(&s.dns));
    let _ = writeln!(out, "search:   {}\n", dash(&s.search));
    let links: Vec<Vec<String>> = s
        .links
        .iter()
        .map(|l| {
            vec![
                l.name.clone(),
                match (l.up, l.carrier) {
                    (true, true) => "up".into(),
                    (true, false) => "no-carrier".into(),
                    _ => "down".into(),
                },
                l.mtu.to_string(),
                l.mac.clone().unwrap_or_else(|| "-".into()),
                l.kind.clone().unwrap_or_else(|| "-".into()),
                l.managed.clone().unwrap_or_else(|| "-".into()),
                dash(&l.addresses),
            ]
        })
        .collect();
    out.push_str(&table(
        &[
            "LINK",
            "STATE",
            "MTU",
            "MAC",
            "KIND",
            "MANAGED",
            "ADDRESSES",
        ],
        &links,
    ));
    out.push('\n');
    let routes: Vec<Vec<String>> = s
        .routes
        .iter()
        .map(|r| {
            vec![
                r.destination.clone(),
                r.gateway.clone().unwrap_or_else(|| "-".into()),
                r.device.clone().unwrap_or_else(|| "-".into()),
                r.protocol.clone(),
                r.metric.to_string(),
            ]
        })
        .collect();
    out.push_str(&table(&["ROUTE", "VIA", "DEV", "PROTO", "METRIC"], &routes));
    if !s.leases.is_empty() {
        out.push('\n');
        let leases: Vec<Vec<String>> = s
            .leases
            .iter()
            .map(|l| {
                vec![
                    l.link.clone(),
                    l.address.clone(),
                    l.server.clone(),
                    dash(&l.routers),
                    dash(&l.dns),
                    duration(l.remaining_secs),
                    format!("{}s/{}s/{}s", l.t1_secs, l.t2_secs, l.lease_secs),
                ]
            })
            .collect();
        out.push_str(&table(
            &[
                "LEASE",
                "ADDRESS",
                "SERVER",
                "ROUTERS",
                "DNS",
                "LEFT",
                "T1/T2/TIME",
            ],
            &leases,
        ));
    }
    if !s.endpoints.is_empty() {
        out.push('\n');
        let eps: Vec<Vec<String>> = s
            .endpoints
            .iter()
            .map(|e| {
                vec![
                    e.service.clone(),
                    e.address.clone(),
                    e.bridge.clone(),
                    dash(&e.ports),
                ]
            })
            .collect();
        out.push_str(&table(&["ENDPOINT", "ADDRESS", "BRIDGE", "PORTS"], &eps));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use keelson_common::api::network::{LeaseStatus, LinkStatus, RouteStatus};

    #[test]
    fn shows_links_routes_and_leases() {
        let s = NetworkStatus {
            online: "online".into(),
            hostname: "keelson-01234567".into(),
            hostname_source: "machine-id".into(),
            dns: vec!["10.0.2.3".into()],
            links: vec![LinkStatus {
                index: 2,
                name: "eth0".into(),
                mac: Some("52:54:00:12:34:56".into()),
                up: true,
                carrier: true,
                mtu: 1500,
                addresses: vec!["10.0.2.15/24".into()],
                managed: Some("dhcp".into()),
                ..LinkStatus::default()
            }],
            routes: vec![RouteStatus {
                destination: "default".into(),
                gateway: Some("10.0.2.2".into()),
                device: Some("eth0".into()),
                protocol: "dhcp".into(),
                metric: 1024,
            }],
            leases: vec![LeaseStatus {
                link: "eth0".into(),
                address: "10.0.2.15/24".into(),
                server: "10.0.2.2".into(),
                lease_secs: 86400,
                remaining_secs: 86000,
                t1_secs: 43200,
                t2_secs: 75600,
                ..LeaseStatus::default()
            }],
            endpoints: vec![keelson_common::api::network::EndpointStatus {
                service: "web".into(),
                address: "10.88.0.2/16".into(),
                bridge: "keel0".into(),
                ports: vec!["8080:80/tcp".into()],
            }],
            ..NetworkStatus::default()
        };
        let text = render(&s);
        assert!(text.contains("online:   online\n"), "{text}");
        assert!(text.contains("eth0"), "{text}");
        assert!(text.contains("10.0.2.15/24"), "{text}");
        assert!(text.contains("default"), "{text}");
        assert!(text.contains("43200s/75600s/86400s"), "{text}");
        assert!(text.contains("10.88.0.2/16"), "{text}");
        assert!(text.contains("8080:80/tcp"), "{text}");
    }
}
