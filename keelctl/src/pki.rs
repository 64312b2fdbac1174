//! `keelctl pki`: the operator's small PKI for the remote API, kept in one directory on the
//! operator's machine (docs/api.md, *PKI*).
//!
//! - `ca.crt`, `ca.key`: an ECDSA P-256 CA (10 years by default). Nodes trust the clients it
//!   signs; keelctl trusts the nodes it signs.
//! - `clients/NAME.crt|key`: a client certificate; its role is the subject's organization, as
//!   Talos puts it (`O=keelson:admin`, `O=keelson:reader`), its name the common name.
//! - `nodes/NAME.crt|key`: a node's server certificate, valid for the addresses and DNS names
//!   keelctl will use to reach it.
//!
//! Keys are written 0600, certificates 0644, and nothing is ever overwritten: a file that
//! exists is an error naming it. Everything is made with rcgen; nothing leaves the directory
//! unless the operator copies it (`keelctl pki node-config` prints a node's `[api.remote]`).

use std::fs::OpenOptions;
use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, PKCS_ECDSA_P256_SHA256,
};
use time::{Duration, OffsetDateTime};

/// The organization prefix of a role (the node reads it back, `keelson_api::remote`).
pub const ROLE_PREFIX: &str = "keelson:";

#[derive(Debug, Subcommand)]
pub enum PkiCommand {
    /// Make a new CA in DIR (ca.crt, ca.key).
    Init {
        /// The PKI directory (created if missing).
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// The CA's common name.
        #[arg(long, default_value = "keelson-ca")]
        name: String,
        /// Validity in days.
        #[arg(long, default_value_t = 3650)]
        days: u32,
    },
    /// Issue a client certificate (--role, --name) or a node certificate (--node, --ip, --dns).
    Issue {
        /// The PKI directory (from `pki init`).
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// A client's role: admin (anything) or reader (lists, status, logs, events, stats).
        #[arg(long, value_parser = ["admin", "reader"], requires = "name", conflicts_with = "node")]
        role: Option<String>,
        /// The client's name (the certificate's common name; files clients/NAME.crt|key).
        #[arg(long, requires = "role")]
        name: Option<String>,
        /// A node's name (files nodes/NAME.crt|key).
        #[arg(long, required_unless_present = "role")]
        node: Option<String>,
        /// An address the node is reached at (repeatable).
        #[arg(long, requires = "node")]
        ip: Vec<IpAddr>,
        /// A DNS name the node is reached at (repeatable; the node's name is always included).
        #[arg(long, requires = "node")]
        dns: Vec<String>,
        /// Validity in days.
        #[arg(long, default_value_t = 365)]
        days: u32,
    },
    /// Print a node's `[api.remote]` table with its CA, certificate and key inline, for its
    /// user data or `keelctl apply`.
    NodeConfig {
        /// The PKI directory (from `pki init`).
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// The node (nodes/NAME.crt|key, from `pki issue --node NAME`).
        #[arg(long)]
        node: String,
        /// Where the node listens.
        #[arg(long, default_value = "0.0.0.0:50000")]
        listen: String,
    },
}

pub fn run(cmd: &PkiCommand, out: &mut impl Write) -> Result<()> {
    match cmd {
        PkiCommand::Init { dir, name, days } => {
            init(dir, name, *days)?;
            writeln!(
                out,
                "CA {name:?} in {}: ca.crt, ca.key (keep ca.key private)\nnext: keelctl pki issue --dir {} --role admin --name NAME",
                dir.display(),
                dir.display()
            )?;
        }
        PkiCommand::Issue {
            dir,
            role,
            name,
            node,
            ip,
            dns,
            days,
        } => match (role, name, node) {
            (Some(role), Some(name), None) => {
                let (crt, key) = issue_client(dir, role, name, *days)?;
                writeln!(
                    out,
                    "client {name:?} (role {role}): {}, {}",
                    crt.display(),
                    key.display()
                )?;
            }
            (None, None, Some(node)) => {
                let (crt, key) = issue_node(dir, node, ip, dns, *days)?;
                writeln!(out, "node {node:?}: {}, {}", crt.display(), key.display())?;
            }
            _ => bail!("give --role and --name for a client, or --node for a node"),
        },
        PkiCommand::NodeConfig { dir, node, listen } => {
            write!(out, "{}", node_config(dir, node, listen)?)?;
        }
    }
    Ok(())
}

/// A name usable as a file name and a common name.
fn check_name(what: &str, name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with(['.', '-'])
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.@".contains(&b));
    if !ok {
        bail!("{what} {name:?}: use letters, digits, '-', '_', '.', '@' (at most 64, not starting with '.' or '-')");
    }
    Ok(())
}

fn validity(params: &mut CertificateParams, days: u32) -> Result<()> {
    if days == 0 {
        bail!("--days must be at least 1");
    }
    let now = OffsetDateTime::now_utc();
    // An hour of slack for clocks a little behind.
    params.not_before = now - Duration::hours(1);
    params.not_after = now + Duration::days(i64::from(days));
    Ok(())
}

fn init(dir: &Path, name: &str, days: u32) -> Result<()> {
    check_name("CA name", name)?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let (crt, key_path) = (dir.join("ca.crt"), dir.join("ca.key"));
    refuse_existing(&[&crt, &key_path])?;
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).context("generating the CA key")?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    validity(&mut params, days)?;
    let cert = params.self_signed(&key).context("signing the CA")?;
    write_new(&key_path, &key.serialize_pem(), 0o600)?;
    write_new(&crt, &cert.pem(), 0o644)?;
    Ok(())
}

/// The CA of `dir`, ready to sign.
fn issuer(dir: &Path) -> Result<Issuer<'static, KeyPair>> {
    let (crt, key) = (dir.join("ca.crt"), dir.join("ca.key"));
    let read = |p: &Path| {
        std::fs::read_to_string(p).with_context(|| {
            format!(
                "reading {} (made by `keelctl pki init --dir {}`)",
                p.display(),
                dir.display()
            )
        })
    };
    let key = KeyPair::from_pem(&read(&key)?)
        .with_context(|| format!("{}: not a PEM private key", key.display()))?;
    Issuer::from_ca_cert_pem(&read(&crt)?, key)
        .with_context(|| format!("{}: not a PEM CA certificate", crt.display()))
}

fn issue_client(dir: &Path, role: &str, name: &str, days: u32) -> Result<(PathBuf, PathBuf)> {
    check_name("client name", name)?;
    let ca = issuer(dir)?;
    let sub = dir.join("clients");
    let (crt, key_path) = (
        sub.join(format!("{name}.crt")),
        sub.join(format!("{name}.key")),
    );
    refuse_existing(&[&crt, &key_path])?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, name);
    params
        .distinguished_name
        .push(DnType::OrganizationName, format!("{ROLE_PREFIX}{role}"));
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    validity(&mut params, days)?;
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).context("generating a key")?;
    let cert = params
        .signed_by(&key, &ca)
        .context("signing the client certificate")?;
    std::fs::create_dir_all(&sub).with_context(|| format!("creating {}", sub.display()))?;
    write_new(&key_path, &key.serialize_pem(), 0o600)?;
    write_new(&crt, &cert.pem(), 0o644)?;
    Ok((crt, key_path))
}

fn issue_node(
    dir: &Path,
    node: &str,
    ips: &[IpAddr],
    dns: &[String],
    days: u32,
) -> Result<(PathBuf, PathBuf)> {
    check_name("node name", node)?;
    let ca = issuer(dir)?;
    let sub = dir.join("nodes");
    let (crt, key_path) = (
        sub.join(format!("{node}.crt")),
        sub.join(format!("{node}.key")),
    );
    refuse_existing(&[&crt, &key_path])?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, node);
    let mut names: Vec<String> = vec![node.to_string()];
    names.extend(dns.iter().filter(|d| *d != node).cloned());
    for name in &names {
        let ia5 = name
            .as_str()
            .try_into()
            .with_context(|| format!("--dns {name:?} is not a DNS name"))?;
        params.subject_alt_names.push(SanType::DnsName(ia5));
    }
    params
        .subject_alt_names
        .extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    validity(&mut params, days)?;
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).context("generating a key")?;
    let cert = params
        .signed_by(&key, &ca)
        .context("signing the node certificate")?;
    std::fs::create_dir_all(&sub).with_context(|| format!("creating {}", sub.display()))?;
    write_new(&key_path, &key.serialize_pem(), 0o600)?;
    write_new(&crt, &cert.pem(), 0o644)?;
    Ok((crt, key_path))
}

/// `[api.remote]` for a node, its CA, certificate and key inline.
fn node_config(dir: &Path, node: &str, listen: &str) -> Result<String> {
    check_name("node name", node)?;
    let read = |p: PathBuf| {
        std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))
    };
    let ca = read(dir.join("ca.crt"))?;
    let cert = read(dir.join("nodes").join(format!("{node}.crt")))?;
    let key = read(dir.join("nodes").join(format!("{node}.key")))?;
    let mut table = toml::value::Table::new();
    table.insert("listen".into(), listen.into());
    table.insert("ca".into(), ca.into());
    table.insert("cert".into(), cert.into());
    table.insert("key".into(), key.into());
    let mut remote = toml::value::Table::new();
    remote.insert("remote".into(), table.into());
    let mut api = toml::value::Table::new();
    api.insert("api".into(), remote.into());
    let text = toml::to_string(&api).context("writing the table")?;
    Ok(format!(
        "# The remote API of node {node:?} (keelctl pki node-config); its key is inline: keep this private.\n{text}"
    ))
}

fn refuse_existing(paths: &[&Path]) -> Result<()> {
    for path in paths {
        if path.exists() {
            bail!("{} exists; not overwriting it", path.display());
        }
    }
    Ok(())
}

/// Creates `path` with `mode`; fails if it exists.
fn write_new(path: &Path, text: &str, mode: u32) -> Result<()> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    file.write_all(text.as_bytes())
        .and_then(|()| file.sync_all())
        .with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn a_ca_signs_clients_and_nodes_with_private_keys_and_never_overwrites() {
        let dir = tempfile::tempdir().unwrap();
        let pki = dir.path().join("pki");
        init(&pki, "test-ca", 30).unwrap();
        let (crt, key) = issue_client(&pki, "reader", "ops", 7).unwrap();
        assert_eq!(crt, pki.join("clients/ops.crt"));
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&pki.join("ca.key")), 0o600);
        assert_eq!(mode(&key), 0o600);
        assert_eq!(mode(&crt), 0o644);
        let pem = std::fs::read_to_string(&crt).unwrap();
        let der = rustls::pki_types::CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        let orgs: Vec<_> = cert
            .subject()
            .iter_organization()
            .map(|o| o.as_str().unwrap().to_string())
            .collect();
        assert_eq!(orgs, ["keelson:reader"]);
        assert_eq!(
            cert.issuer()
                .iter_common_name()
                .next()
                .unwrap()
                .as_str()
                .unwrap(),
            "test-ca"
        );

        let e = issue_client(&pki, "admin", "ops", 7)
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            format!(
                "{} exists; not overwriting it",
                pki.join("clients/ops.crt").display()
            )
        );
        let e = init(&pki, "again", 30).unwrap_err().to_string();
        assert!(e.ends_with("ca.crt exists; not overwriting it"), "{e}");

        issue_node(&pki, "n1", &["10.77.0.11".parse().unwrap()], &[], 7).unwrap();
        let config = node_config(&pki, "n1", "0.0.0.0:50000").unwrap();
        let parsed: toml::Value = toml::from_str(&config).unwrap();
        let remote = &parsed["api"]["remote"];
        assert_eq!(remote["listen"].as_str(), Some("0.0.0.0:50000"));
        assert!(remote["key"]
            .as_str()
            .unwrap()
            .starts_with("-----BEGIN PRIVATE KEY-----"));
        let e = issue_client(&pki, "admin", "../x", 7)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("client name \"../x\""), "{e}");
    }

    #[test]
    fn without_a_ca_the_error_says_how_to_make_one() {
        let dir = tempfile::tempdir().unwrap();
        let e = format!(
            "{:#}",
            issue_client(dir.path(), "admin", "me", 1).unwrap_err()
        );
        assert!(e.contains("made by `keelctl pki init --dir"), "{e}");
    }

    use rustls::pki_types::pem::PemObject;
}
