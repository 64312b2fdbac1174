//! /etc/resolv.conf (a link to /run/keelson/resolv.conf that init makes): the configured DNS
//! servers and search domains first, then those of the DHCP leases. Rewritten in place (services
//! bind-mount it), never left empty for a resolver reading it.

use std::net::IpAddr;
use std::path::Path;

/// glibc and musl read at most three nameservers.
const MAX_NAMESERVERS: usize = 3;

pub fn render(dns: &[IpAddr], search: &[String]) -> String {
    let mut out = String::from("# Written by sysd from [network] and DHCP leases.\n");
    for d in dns.iter().take(MAX_NAMESERVERS) {
        out.push_str(&format!("nameserver {d}\n"));
    }
    if !search.is_empty() {
        out.push_str(&format!("search {}\n", search.join(" ")));
    }
    out
}

///
/// Services bind-mount the file, so it keeps its inode: it is rewritten in place, new content
/// first and then cut to length, so a resolver reading it never finds it empty
/// (`keelson_common::durable::rewrite_in_place`; /run dies with the boot, nothing to fsync).
pub fn write(path: &Path, dns: &[IpAddr], search: &[String]) -> std::io::Result<()> {
    Ok(keelson_common::durable::rewrite_in_place(
        path,
        render(dns, search).as_bytes(),
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn three_nameservers_then_search() {
        let dns: Vec<IpAddr> = ["10.0.0.1", "10.0.0.2", "fd00::1", "10.0.0.4"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        let text = render(&dns, &["example.org".into(), "lan".into()]);
        assert_eq!(
            text,
            "# Written by sysd from [network] and DHCP leases.\nnameserver 10.0.0.1\nnameserver 10.0.0.2\nnameserver fd00::1\nsearch example.org lan\n"
        );
    }
}
