//! cloud-init network configuration (versions 1 and 2, as NoCloud's `network-config` carries
//! them) mapped onto Keelson's `[network]` table.
//!
//! Version 2 is netplan's `ethernets` (match by name, MAC or driver; `dhcp4`; `addresses`;
//! `gateway4`/`gateway6` or default `routes`; `routes`; `nameservers`; `mtu`). Version 1 is the
//! list of `physical` interfaces with `subnets` (`dhcp`/`dhcp4`, `static`/`static6` with
//! `address` + optional `netmask`, `gateway`, `dns_nameservers`, `dns_search`, `routes`) and
//! `nameserver` entries. What Keelson's network config cannot express (bonds, VLANs, bridges,
//! DHCPv6, `set-name`, ...) is listed in the warnings, never dropped silently. The result is
//! validated with the rest of the user-data layer, so an invalid address is an error there.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use serde::Deserialize;
use serde_yaml::Value;
use toml::Table;

use super::Error;

/// The `[network]` table and the warnings.
pub type Mapped = (Table, Vec<String>);

/// Parses `text` (v1 or v2, with or without a top-level `network:` key).
pub fn to_keelson(text: &[u8], origin: &str) -> Result<Mapped, Error> {
    let text = std::str::from_utf8(text)
        .map_err(|e| Error::Invalid(format!("{origin}: not UTF-8: {e}")))?;
    let doc: Value = serde_yaml::from_str(text).map_err(|e| yaml_error(origin, "", &e))?;
    let doc = match doc.get("network") {
        Some(inner) if inner.is_mapping() => inner.clone(),
        _ => doc,
    };
    let version = doc.get("version").and_then(Value::as_u64).ok_or_else(|| {
        Error::Invalid(format!(
            "{origin}: `version: 1` or `version: 2` is required"
        ))
    })?;
    let mut warnings = Vec::new();
    let mut net = Net::default();
    match version {
        2 => {
            unsupported(&doc, V2_KEYS, "", origin, &mut warnings);
            let v2: V2 = typed(doc.clone(), origin)?;
            for (id, eth) in &v2.ethernets {
                if let Some(v) = doc["ethernets"].get(id.as_str()) {
                    unsupported(
                        v,
                        ETH_KEYS,
                        &format!("ethernets.{id}."),
                        origin,
                        &mut warnings,
                    );
                }
                net.v2_ethernet(id, eth, origin, &mut warnings)?;
            }
        }
        1 => {
            unsupported(&doc, &["version", "config"], "", origin, &mut warnings);
            let v1: V1 = typed(doc.clone(), origin)?;
            for (i, item) in v1.config.iter().enumerate() {
                net.v1_item(i, item, &doc["config"][i], origin, &mut warnings)?;
            }
        }
        n => {
            return Err(Error::Invalid(format!(
                "{origin}: network config version {n} is not supported (1 or 2)"
            )))
        }
    }
    Ok((net.into_table(), warnings))
}

const V2_KEYS: &[&str] = &["version", "ethernets", "renderer"];
const ETH_KEYS: &[&str] = &[
    "match",
    "dhcp4",
    "dhcp6",
    "addresses",
    "gateway4",
    "gateway6",
    "routes",
    "nameservers",
    "mtu",
];

#[derive(Deserialize)]
struct V2 {
    #[serde(default)]
    ethernets: BTreeMap<String, Ethernet>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct Ethernet {
    #[serde(rename = "match")]
    matches: Option<Match>,
    dhcp4: Option<bool>,
    dhcp6: Option<bool>,
    addresses: Vec<String>,
    gateway4: Option<String>,
    gateway6: Option<String>,
    routes: Vec<V2Route>,
    nameservers: Option<Nameservers>,
    mtu: Option<u32>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct Match {
    name: Option<String>,
    macaddress: Option<String>,
    driver: Option<String>,
}

#[derive(Deserialize)]
struct V2Route {
    to: String,
    via: String,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct Nameservers {
    addresses: Vec<String>,
    search: Vec<String>,
}

#[derive(Deserialize)]
struct V1 {
    config: Vec<V1Item>,
}

#[derive(Deserialize)]
struct V1Item {
    #[serde(rename = "type")]
    kind: String,
    name: Option<String>,
    mac_address: Option<String>,
    mtu: Option<u32>,
    #[serde(default)]
    subnets: Vec<V1Subnet>,
    /// `nameserver` entries.
    #[serde(default)]
    address: AddressList,
    #[serde(default)]
    search: Vec<String>,
}

#[derive(Deserialize, Default)]
#[serde(untagged)]
enum AddressList {
    #[default]
    None,
    One(String),
    Many(Vec<String>),
}

impl AddressList {
    fn list(&self) -> Vec<String> {
        match self {
            AddressList::None => Vec::new(),
            AddressList::One(s) => vec![s.clone()],
            AddressList::Many(v) => v.clone(),
        }
    }
}

#[derive(Deserialize)]
struct V1Subnet {
    #[serde(rename = "type")]
    kind: String,
    address: Option<String>,
    netmask: Option<String>,
    gateway: Option<String>,
    #[serde(default)]
    dns_nameservers: Vec<String>,
    #[serde(default)]
    dns_search: Vec<String>,
    #[serde(default)]
    routes: Vec<V1Route>,
}

#[derive(Deserialize)]
struct V1Route {
    network: String,
    netmask: Option<String>,
    prefix: Option<u8>,
    gateway: String,
}

/// What is being built: interfaces by label, DNS.
#[derive(Default)]
struct Net {
    interfaces: BTreeMap<String, Table>,
    dns: Vec<String>,
    search: Vec<String>,
}

impl Net {
    fn v2_ethernet(
        &mut self,
        id: &str,
        eth: &Ethernet,
        origin: &str,
        warnings: &mut Vec<String>,
    ) -> Result<(), Error> {
        let mut t = Table::new();
        if let Some(m) = &eth.matches {
            let mut mt = Table::new();
            if let Some(n) = &m.name {
                mt.insert("name".into(), n.clone().into());
            }
            if let Some(mac) = &m.macaddress {
                mt.insert("mac".into(), mac.clone().into());
            }
            if let Some(d) = &m.driver {
                mt.insert("driver".into(), d.clone().into());
            }
            t.insert("match".into(), mt.into());
        }
        if eth.dhcp4 == Some(true) {
            t.insert("dhcp".into(), true.into());
        }
        if eth.dhcp6 == Some(true) {
            warnings.push(format!(
                "{origin}: ethernets.{id}.dhcp6: not supported (IPv6 comes from SLAAC)"
            ));
        }
        let mut gateway4 = eth.gateway4.clone();
        let mut gateway6 = eth.gateway6.clone();
        let mut routes = Vec::new();
        for r in &eth.routes {
            match r.to.as_str() {
                "default" | "0.0.0.0/0" => gateway4 = Some(r.via.clone()),
                "::/0" => gateway6 = Some(r.via.clone()),
                to => routes.push((to.to_string(), r.via.clone())),
            }
        }
        self.interface(id, t, &eth.addresses, gateway4, gateway6, routes, eth.mtu);
        if let Some(ns) = &eth.nameservers {
            self.dns.extend(ns.addresses.iter().cloned());
            self.search.extend(ns.search.iter().cloned());
        }
        Ok(())
    }

    fn v1_item(
        &mut self,
        i: usize,
        item: &V1Item,
        raw: &Value,
        origin: &str,
        warnings: &mut Vec<String>,
    ) -> Result<(), Error> {
        let at = format!("config[{i}]");
        match item.kind.as_str() {
            "nameserver" => {
                self.dns.extend(item.address.list());
                self.search.extend(item.search.iter().cloned());
                return Ok(());
            }
            "physical" => {}
            other => {
                warnings.push(format!(
                    "{origin}: {at}: interfaces of type `{other}` are not supported, ignored"
                ));
                return Ok(());
            }
        }
        unsupported(
            raw,
            &["type", "name", "mac_address", "mtu", "subnets"],
            &format!("{at}."),
            origin,
            warnings,
        );
        let name = item.name.clone().ok_or_else(|| {
            Error::Invalid(format!(
                "{origin}: {at}: a physical interface needs a `name`"
            ))
        })?;
        let mut t = Table::new();
        let mut mt = Table::new();
        // cloud-init renames the link to `name`; Keelson matches by MAC and keeps the
        // kernel's name, so the MAC alone decides when it is given.
        match &item.mac_address {
            Some(mac) => {
                mt.insert("mac".into(), mac.clone().into());
            }
            None => {
                mt.insert("name".into(), name.clone().into());
            }
        }
        t.insert("match".into(), mt.into());
        let mut addresses = Vec::new();
        let (mut gateway4, mut gateway6) = (None, None);
        let mut routes = Vec::new();
        for (j, s) in item.subnets.iter().enumerate() {
            let sat = format!("{at}.subnets[{j}]");
            match s.kind.as_str() {
                "dhcp" | "dhcp4" => {
                    t.insert("dhcp".into(), true.into());
                }
                "static" | "static6" => {
                    let addr = s.address.as_deref().ok_or_else(|| {
                        Error::Invalid(format!("{origin}: {sat}: a static subnet needs `address`"))
                    })?;
                    addresses.push(match (&s.netmask, addr.contains('/')) {
                        (_, true) => addr.to_string(),
                        (Some(mask), false) => format!("{addr}/{}", prefix_of(mask, origin, &sat)?),
                        (None, false) => {
                            return Err(Error::Invalid(format!(
                                "{origin}: {sat}: address {addr} needs a /prefix or a netmask"
                            )))
                        }
                    });
                    if let Some(gw) = &s.gateway {
                        if gw.contains(':') {
                            gateway6 = Some(gw.clone());
                        } else {
                            gateway4 = Some(gw.clone());
                        }
                    }
                }
                other => warnings.push(format!(
                    "{origin}: {sat}: subnet type `{other}` is not supported, ignored"
                )),
            }
            self.dns.extend(s.dns_nameservers.iter().cloned());
            self.search.extend(s.dns_search.iter().cloned());
            for r in &s.routes {
                let prefix = match (r.prefix, &r.netmask) {
                    (Some(p), _) => p,
                    (None, Some(mask)) => prefix_of(mask, origin, &sat)?,
                    (None, None) => 32,
                };
                if r.network == "0.0.0.0" && prefix == 0 {
                    gateway4 = Some(r.gateway.clone());
                } else {
                    routes.push((format!("{}/{prefix}", r.network), r.gateway.clone()));
                }
            }
        }
        self.interface(&name, t, &addresses, gateway4, gateway6, routes, item.mtu);
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn interface(
        &mut self,
        label: &str,
        mut t: Table,
        addresses: &[String],
        gateway4: Option<String>,
        gateway6: Option<String>,
        routes: Vec<(String, String)>,
        mtu: Option<u32>,
    ) {
        if !addresses.is_empty() {
            t.insert(
                "addresses".into(),
                addresses
                    .iter()
                    .cloned()
                    .map(toml::Value::from)
                    .collect::<Vec<_>>()
                    .into(),
            );
        }
        if let Some(g) = gateway4 {
            t.insert("gateway".into(), g.into());
        }
        if let Some(g) = gateway6 {
            t.insert("gateway6".into(), g.into());
        }
        if !routes.is_empty() {
            let list: Vec<toml::Value> = routes
                .into_iter()
                .map(|(to, via)| {
                    let mut r = Table::new();
                    r.insert("to".into(), to.into());
                    r.insert("via".into(), via.into());
                    r.into()
                })
                .collect();
            t.insert("routes".into(), list.into());
        }
        if let Some(m) = mtu {
            t.insert("mtu".into(), i64::from(m).into());
        }
        self.interfaces.insert(label.to_string(), t);
    }

    fn into_table(self) -> Table {
        let mut net = Table::new();
        if !self.interfaces.is_empty() {
            let ifs: Table = self
                .interfaces
                .into_iter()
                .map(|(k, v)| (k, toml::Value::Table(v)))
                .collect();
            net.insert("interfaces".into(), ifs.into());
        }
        let dedup = |v: Vec<String>| {
            let mut out: Vec<toml::Value> = Vec::new();
            for s in v {
                if !out.iter().any(|o| o.as_str() == Some(s.as_str())) {
                    out.push(s.into());
                }
            }
            out
        };
        if !self.dns.is_empty() {
            net.insert("dns".into(), dedup(self.dns).into());
        }
        if !self.search.is_empty() {
            net.insert("search".into(), dedup(self.search).into());
        }
        net
    }
}

fn typed<T: serde::de::DeserializeOwned>(doc: Value, origin: &str) -> Result<T, Error> {
    serde_path_to_error::deserialize(doc).map_err(|e| {
        let path = e.path().to_string();
        Error::Invalid(format!("{origin}: {path}: {}", e.inner()))
    })
}

/// `255.255.255.0` → 24 (contiguous masks only).
fn prefix_of(mask: &str, origin: &str, at: &str) -> Result<u8, Error> {
    let bits = mask
        .parse::<Ipv4Addr>()
        .map(u32::from)
        .ok()
        .filter(|m| m.leading_ones() + m.trailing_zeros() == 32)
        .ok_or_else(|| {
            Error::Invalid(format!(
                "{origin}: {at}: netmask `{mask}` is not a valid IPv4 netmask"
            ))
        })?;
    Ok(bits.leading_ones() as u8)
}

fn unsupported(v: &Value, allowed: &[&str], prefix: &str, origin: &str, out: &mut Vec<String>) {
    let Some(m) = v.as_mapping() else { return };
    let extra: Vec<String> = m
        .keys()
        .filter_map(|k| k.as_str())
        .filter(|k| !allowed.contains(k))
        .map(|k| format!("{prefix}{k}"))
        .collect();
    if !extra.is_empty() {
        out.push(format!(
            "{origin}: not supported, ignored: {}",
            extra.join(", ")
        ));
    }
}

fn yaml_error(origin: &str, path: &str, e: &serde_yaml::Error) -> Error {
    let at = e
        .location()
        .map(|l| format!(":{}:{}", l.line(), l.column()))
        .unwrap_or_default();
    let key = if path.is_empty() {
        String::new()
    } else {
        format!("{path}: ")
    };
    Error::Invalid(format!("{origin}{at}: {key}{e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(text: &str) -> Result<(String, Vec<String>), String> {
        to_keelson(text.as_bytes(), "seed:network-config")
            .map(|(t, w)| (toml::to_string(&t).unwrap(), w))
            .map_err(|e| {
                assert!(matches!(e, Error::Invalid(_)), "{e:?}");
                e.to_string()
            })
    }

    #[test]
    fn v2_static_and_dhcp() {
        let (toml, warnings) = map(r#"network:
  version: 2
  ethernets:
    lan:
      match: {macaddress: "52:54:00:12:34:56"}
      addresses: [192.168.1.10/24, "fd00::10/64"]
      routes:
        - {to: default, via: 192.168.1.1}
        - {to: 10.0.0.0/8, via: 192.168.1.254}
      nameservers: {addresses: [1.1.1.1, 1.1.1.1], search: [example.org]}
      mtu: 9000
    eth1:
      dhcp4: true
      dhcp6: true
  bonds:
    bond0: {interfaces: [eth2, eth3]}
"#)
        .unwrap();
        assert_eq!(
            toml,
            r#"dns = ["1.1.1.1"]
search = ["example.org"]

[interfaces.eth1]
dhcp = true

[interfaces.lan]
addresses = ["192.168.1.10/24", "fd00::10/64"]
gateway = "192.168.1.1"
mtu = 9000

[interfaces.lan.match]
mac = "52:54:00:12:34:56"

[[interfaces.lan.routes]]
to = "10.0.0.0/8"
via = "192.168.1.254"
"#
        );
        assert_eq!(warnings.len(), 2, "{warnings:?}");
        assert!(
            warnings[0].ends_with("not supported, ignored: bonds"),
            "{warnings:?}"
        );
        assert!(warnings[1].contains("ethernets.eth1.dhcp6"), "{warnings:?}");
    }

    #[test]
    fn v1_physical_with_netmask_routes_and_nameserver() {
        let (toml, warnings) = map(r#"version: 1
config:
  - type: physical
    name: eth0
    mac_address: "52:54:00:aa:bb:cc"
    subnets:
      - type: static
        address: 10.0.2.20
        netmask: 255.255.255.0
        gateway: 10.0.2.2
        routes: [{network: 172.16.0.0, netmask: 255.240.0.0, gateway: 10.0.2.1}]
  - type: nameserver
    address: 10.0.2.3
    search: [lan]
  - type: bond
    name: bond0
"#)
        .unwrap();
        assert!(
            toml.contains("addresses = [\"10.0.2.20/24\"]\ngateway = \"10.0.2.2\""),
            "{toml}"
        );
        assert!(toml.contains("mac = \"52:54:00:aa:bb:cc\""), "{toml}");
        assert!(
            toml.contains("to = \"172.16.0.0/12\"\nvia = \"10.0.2.1\""),
            "{toml}"
        );
        assert!(
            toml.starts_with("dns = [\"10.0.2.3\"]\nsearch = [\"lan\"]"),
            "{toml}"
        );
        assert_eq!(warnings.len(), 1);
        assert!(
            warnings[0].contains("config[2]: interfaces of type `bond`"),
            "{warnings:?}"
        );
    }

    #[test]
    fn bad_network_config_is_named() {
        for (text, want) in [
            ("ethernets: {}\n", "`version: 1` or `version: 2` is required"),
            ("version: 3\n", "version 3 is not supported"),
            ("version: 2\nethernets:\n  e: {dhcp4: maybe}\n", "ethernets.e.dhcp4"),
            (
                "version: 1\nconfig:\n  - {type: physical, name: e, subnets: [{type: static, address: 10.0.0.1, netmask: 255.0.255.0}]}\n",
                "netmask `255.0.255.0` is not a valid IPv4 netmask",
            ),
            (
                "version: 1\nconfig:\n  - {type: physical, name: e, subnets: [{type: static, address: 10.0.0.1}]}\n",
                "needs a /prefix or a netmask",
            ),
            ("version: [\n", "seed:network-config:"),
        ] {
            let e = map(text).unwrap_err();
            assert!(e.contains(want), "{text}: {e}");
        }
    }
}
