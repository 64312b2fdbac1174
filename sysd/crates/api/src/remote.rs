//! The API on a TCP port over mutual TLS (`[api.remote]`, docs/api.md *Remote API*): the same
//! routes as the unix socket ([`crate::server`]), for operators' keelctl.
//!
//! Trust is the operator's own CA, handed to the node in user data or `apply` (no trust on
//! first use): rustls requires every client to present a certificate that chains to it and is
//! valid now, and the node presents its own certificate, signed by the same CA, which keelctl
//! checks. What a client may do is its certificate's role, in the subject's organization as
//! Talos puts it (`O=keelson:admin`, `O=keelson:reader`); [`crate::server`]'s `authorize`
//! decides per request.
//!
//! Bounded for the network: at most `max_connections` at once (more are closed as they
//! arrive), a TLS handshake and each request head must arrive within [`HANDSHAKE_TIMEOUT`] /
//! [`HEADER_TIMEOUT`] (slow-loris), request heads are capped at [`MAX_HEAD`], and `apply`
//! bodies at 1 MiB within 30 s (as on the socket).
//!
//! Rotation: the serving loop follows a `watch` of [`RemoteTls`]; a new value (new CA, node
//! certificate or key from `apply`) takes effect for the next connection, a new `listen`
//! rebinds, `None` closes the port. Connections already open keep the trust they were made with.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use keelson_common::notice::Notice;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;

use crate::server::{connection, Access, Limits};
use crate::Concerns;

/// A TLS handshake must be done within this time.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// A request's head (request line and headers) must arrive within this time.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest request head buffered (larger: 431).
pub const MAX_HEAD: usize = 16 * 1024;
/// How long open connections get to finish once the server stops.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);
/// After answering, how long (and how many bytes) what the client still sends is read and
/// dropped before the socket closes: see [`lingering_close`].
const LINGER_TIME: Duration = Duration::from_secs(2);
const LINGER_BYTES: usize = 1024 * 1024;
/// The organization prefix that marks a Keelson role in a client certificate.
pub const ROLE_PREFIX: &str = "keelson:";

/// What a client certificate lets its holder do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Anything.
    Admin,
    /// Reads: lists, status, logs, events, stats (every GET but the config).
    Reader,
}

impl Role {
    /// `admin`, `reader`.
    pub fn parse(name: &str) -> Option<Role> {
        match name {
            "admin" => Some(Role::Admin),
            "reader" => Some(Role::Reader),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Reader => "reader",
        }
    }
}

/// A remote client as its (verified) certificate names it.
#[derive(Debug, Clone)]
pub struct Peer {
    /// The subject's common name (or the whole subject when it has none).
    pub name: String,
    /// Its role, or why it has none this server knows (the message a 403 carries).
    pub role: Result<Role, String>,
}

impl Peer {
    /// Reads the name and role from a DER client certificate (already verified by rustls).
    pub fn from_certificate(der: &[u8]) -> Peer {
        let cert = match x509_parser::parse_x509_certificate(der) {
            Ok((_, cert)) => cert,
            Err(err) => {
                return Peer {
                    name: "?".into(),
                    role: Err(format!("the client certificate cannot be read: {err}")),
                }
            }
        };
        let subject = cert.subject();
        let name = subject
            .iter_common_name()
            .find_map(|cn| cn.as_str().ok())
            .map_or_else(|| subject.to_string(), str::to_string);
        let organizations: Vec<String> = subject
            .iter_organization()
            .filter_map(|o| o.as_str().ok().map(str::to_string))
            .collect();
        let roles: Vec<&str> = organizations
            .iter()
            .filter_map(|o| o.strip_prefix(ROLE_PREFIX))
            .collect();
        let known: Vec<Role> = roles.iter().filter_map(|r| Role::parse(r)).collect();
        let role = if known.contains(&Role::Admin) {
            Ok(Role::Admin)
        } else if known.contains(&Role::Reader) {
            Ok(Role::Reader)
        } else if roles.is_empty() {
            Err(format!(
                "client {name:?} has no role: its certificate's organization ({}) names none of \
                 {ROLE_PREFIX}admin, {ROLE_PREFIX}reader",
                shown(&organizations)
            ))
        } else {
            Err(format!(
                "client {name:?} has role {}, which this node does not know (roles: admin may \
                 do anything, reader may read)",
                roles.join(", ")
            ))
        };
        Peer { name, role }
    }
}

fn shown(values: &[String]) -> String {
    if values.is_empty() {
        "none".to_string()
    } else {
        values.join(", ")
    }
}

/// The remote API's settings as they take effect: where to listen, how many connections, and
/// the TLS configuration built from the CA, certificate and key.
#[derive(Clone)]
pub struct RemoteTls {
    pub listen: SocketAddr,
    pub max_connections: usize,
    config: Arc<ServerConfig>,
    /// One line for the event stream: the CA and the node certificate in force.
    pub summary: String,
    /// The DER of every certificate in force, to tell a rotation from a repeat.
    fingerprint: Vec<Vec<u8>>,
}

impl std::fmt::Debug for RemoteTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteTls")
            .field("listen", &self.listen)
            .field("max_connections", &self.max_connections)
            .field("summary", &self.summary)
            .finish_non_exhaustive()
    }
}

impl RemoteTls {
    /// Checks and combines the PEM texts: `ca` (one or more CA certificates that sign clients),
    /// `cert` (the node's certificate, then any intermediates), `key` (its private key). The
    /// error names which of them is wrong and why.
    pub fn new(
        listen: SocketAddr,
        max_connections: usize,
        ca: &str,
        cert: &str,
        key: &str,
    ) -> Result<RemoteTls, String> {
        let cas = certificates("ca", ca)?;
        let chain = certificates("cert", cert)?;
        let key = PrivateKeyDer::from_pem_slice(key.as_bytes())
            .map_err(|err| format!("key: not a PEM private key ({err})"))?;
        let mut roots = RootCertStore::empty();
        for (i, ca) in cas.iter().enumerate() {
            roots
                .add(ca.clone())
                .map_err(|err| format!("ca: certificate {} is not a usable CA: {err}", i + 1))?;
        }
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .build()
                .map_err(|err| format!("ca: {err}"))?;
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|err| format!("TLS: {err}"))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain.clone(), key)
            .map_err(|err| format!("cert/key: {err}"))?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let summary = format!(
            "clients of CA {}, node certificate {}",
            describe(&cas[0]),
            describe(&chain[0])
        );
        let fingerprint = cas.iter().chain(&chain).map(|c| c.to_vec()).collect();
        Ok(RemoteTls {
            listen,
            max_connections,
            config: Arc::new(config),
            summary,
            fingerprint,
        })
    }
}

/// Every certificate in a PEM text; at least one.
fn certificates(what: &str, pem: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| format!("{what}: not PEM certificates ({err})"))?;
    if certs.is_empty() {
        return Err(format!("{what}: no certificate in the PEM text"));
    }
    for (i, der) in certs.iter().enumerate() {
        x509_parser::parse_x509_certificate(der)
            .map_err(|err| format!("{what}: certificate {} cannot be read: {err}", i + 1))?;
    }
    Ok(certs)
}

/// `"CN" (valid until YYYY-MM-DD)` for messages.
fn describe(der: &CertificateDer<'_>) -> String {
    match x509_parser::parse_x509_certificate(der) {
        Ok((_, cert)) => {
            let subject = cert.subject();
            let name = subject
                .iter_common_name()
                .find_map(|cn| cn.as_str().ok())
                .map_or_else(|| subject.to_string(), str::to_string);
            let until = cert.validity().not_after.to_datetime().date();
            format!("{name:?} (valid until {until})")
        }
        Err(_) => "?".to_string(),
    }
}

/// Serves the API over mutual TLS as `settings` says (None: not at all), until `shutdown`.
/// What happens to the port (listening, closed, cannot bind) goes to `notices` as
/// `api-remote` / `api-remote-error` events.
pub async fn serve(
    mut settings: watch::Receiver<Option<Arc<RemoteTls>>>,
    concerns: Concerns,
    notices: mpsc::UnboundedSender<Notice>,
    shutdown: impl Future<Output = ()>,
) {
    let concerns = Arc::new(concerns);
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut connections = JoinSet::new();
    let mut listener: Option<(SocketAddr, TcpListener)> = None;
    let mut current: Option<Arc<RemoteTls>> = None;
    let mut slots = Arc::new(Semaphore::new(0));
    let mut changed = true;
    let mut following = true;
    let (mut refused, mut last_refusal_log) = (0u64, None::<std::time::Instant>);
    tokio::pin!(shutdown);
    loop {
        if changed {
            changed = false;
            let next = settings.borrow_and_update().clone();
            apply_settings(&mut listener, &mut current, &mut slots, next, &notices).await;
        }
        tokio::select! {
            () = &mut shutdown => break,
            result = settings.changed(), if following => {
                // Err: the settings' owner is gone; keep serving what is in force.
                following = result.is_ok();
                changed = following;
            }
            accepted = accept(listener.as_ref()) => {
                while connections.try_join_next().is_some() {}
                let (stream, addr) = match accepted {
                    Ok(accepted) => accepted,
                    Err(err) => {
                        tracing::warn!(%err, "api: remote accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let Some(tls) = current.clone() else { continue };
                let Ok(permit) = Arc::clone(&slots).try_acquire_owned() else {
                    // At most one line a second however many arrive (the console is the log).
                    refused += 1;
                    if last_refusal_log.is_none_or(|at| at.elapsed() >= Duration::from_secs(1)) {
                        tracing::warn!(%addr, limit = tls.max_connections, refused, "api: remote connections refused: too many open");
                        last_refusal_log = Some(std::time::Instant::now());
                        refused = 0;
                    }
                    continue;
                };
                connections.spawn(remote_connection(stream, addr, tls, permit, Arc::clone(&concerns), stop_rx.clone()));
            }
        }
    }
    let _ = stop_tx.send(true);
    drop(listener);
    if tokio::time::timeout(SHUTDOWN_GRACE, async {
        while connections.join_next().await.is_some() {}
    })
    .await
    .is_err()
    {
        connections.shutdown().await;
    }
}

async fn accept(
    listener: Option<&(SocketAddr, TcpListener)>,
) -> std::io::Result<(TcpStream, SocketAddr)> {
    match listener {
        Some((_, listener)) => listener.accept().await,
        None => std::future::pending().await,
    }
}

/// Puts `next` in force: rebinds when the address changed, closes the port for None.
async fn apply_settings(
    listener: &mut Option<(SocketAddr, TcpListener)>,
    current: &mut Option<Arc<RemoteTls>>,
    slots: &mut Arc<Semaphore>,
    next: Option<Arc<RemoteTls>>,
    notices: &mpsc::UnboundedSender<Notice>,
) {
    let Some(tls) = next else {
        if listener.take().is_some() {
            let _ = notices.send(Notice::new("api-remote", "remote API off"));
        }
        *current = None;
        return;
    };
    let same_port = listener
        .as_ref()
        .is_some_and(|(addr, _)| *addr == tls.listen);
    if !same_port {
        *listener = None;
        match TcpListener::bind(tls.listen).await {
            Ok(bound) => *listener = Some((tls.listen, bound)),
            Err(err) => {
                let _ = notices.send(Notice::new(
                    "api-remote-error",
                    format!(
                        "remote API: cannot listen on {}: {err}; it is off",
                        tls.listen
                    ),
                ));
                *current = None;
                return;
            }
        }
    }
    if current
        .as_ref()
        .is_none_or(|c| c.max_connections != tls.max_connections)
    {
        *slots = Arc::new(Semaphore::new(tls.max_connections));
    }
    // The same settings again (every apply republishes `[api]`) are put in force quietly.
    let same = same_port
        && current.as_ref().is_some_and(|c| {
            (c.max_connections, &c.summary, &c.fingerprint)
                == (tls.max_connections, &tls.summary, &tls.fingerprint)
        });
    if !same {
        let _ = notices.send(Notice::new(
            "api-remote",
            format!(
                "remote API on {} over mutual TLS ({}; at most {} connections)",
                tls.listen, tls.summary, tls.max_connections
            ),
        ));
    }
    *current = Some(tls);
}

async fn remote_connection(
    stream: TcpStream,
    addr: SocketAddr,
    tls: Arc<RemoteTls>,
    _permit: OwnedSemaphorePermit,
    concerns: Arc<Concerns>,
    stop: watch::Receiver<bool>,
) {
    let _ = stream.set_nodelay(true);
    // A second handle on the socket, so that it outlives the TLS stream hyper drops.
    let (stream, linger) = match stream.into_std().and_then(|s| {
        let dup = s.try_clone()?;
        Ok((TcpStream::from_std(s)?, dup))
    }) {
        Ok(pair) => pair,
        Err(err) => {
            tracing::debug!(%addr, %err, "api: remote client dropped: cannot hold its socket");
            return;
        }
    };
    let acceptor = TlsAcceptor::from(Arc::clone(&tls.config));
    let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(err)) => {
            // No certificate, another CA's, an expired one: rustls told the client why in its
            // alert; not logged above debug, so a scanner cannot flood the console.
            tracing::debug!(%addr, %err, "api: remote client refused");
            return;
        }
        Err(_) => {
            tracing::debug!(%addr, "api: remote client refused: no TLS handshake within {} s", HANDSHAKE_TIMEOUT.as_secs());
            return;
        }
    };
    let peer = match stream.get_ref().1.peer_certificates() {
        Some([leaf, ..]) => Peer::from_certificate(leaf),
        // Client auth is required: rustls does not complete a handshake without one.
        _ => return,
    };
    tracing::debug!(%addr, client = %peer.name, "api: remote client");
    serve_authenticated(stream, peer, concerns, stop).await;
    lingering_close(linger).await;
}

/// Closes a connection whose client may still be sending (an oversized head answered 431
/// while the rest of it is in flight): a socket closed with unread input sends a reset, and a
/// reset makes the client's kernel drop the answer it has not read yet. So the write side is
/// shut first (the client reads the answer, then end of stream) and what still arrives is read
/// and dropped for a bounded time and size: the "lingering close" of Apache and nginx.
async fn lingering_close(socket: std::net::TcpStream) {
    use tokio::io::AsyncReadExt;
    let _ = socket.shutdown(std::net::Shutdown::Write);
    let Ok(mut socket) = TcpStream::from_std(socket) else {
        return;
    };
    let mut buf = vec![0u8; 16 * 1024];
    let mut left = LINGER_BYTES;
    let _ = tokio::time::timeout(LINGER_TIME, async {
        while let Ok(n @ 1..) = socket.read(&mut buf).await {
            left = left.saturating_sub(n);
            if left == 0 {
                break;
            }
        }
    })
    .await;
}

/// Serves the API's HTTP/1.1 on `io`, a remote connection whose TLS handshake is done and
/// whose client certificate names `peer`, with the remote limits, until it ends or `stop`
/// turns true. (Everything a remote client sends after the handshake goes through here: the
/// fuzz target `api_request` drives it with arbitrary bytes.)
pub async fn serve_authenticated<I>(
    io: I,
    peer: Peer,
    concerns: Arc<Concerns>,
    stop: watch::Receiver<bool>,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let limits = Limits {
        header_read_timeout: Some(HEADER_TIMEOUT),
        max_buf_size: Some(MAX_HEAD),
    };
    connection(
        TokioIo::new(io),
        concerns,
        stop,
        Arc::new(Access::Remote(peer)),
        limits,
    )
    .await;
}

#[cfg(test)]
mod tests {
    use rcgen::{
        BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    };

    use super::*;

    fn ca() -> (String, Issuer<'static, KeyPair>) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, "test-ca");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let cert = params.self_signed(&key).unwrap();
        (cert.pem(), Issuer::new(params, key))
    }

    fn leaf(ca: &Issuer<'_, KeyPair>, cn: &str, orgs: &[&str]) -> (String, String, Vec<u8>) {
        let mut params = CertificateParams::new(vec!["node".to_string()]).unwrap();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, cn);
        for o in orgs {
            params.distinguished_name.push(DnType::OrganizationName, *o);
        }
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, ca).unwrap();
        (cert.pem(), key.serialize_pem(), cert.der().to_vec())
    }

    #[test]
    fn the_role_is_the_keelson_organization() {
        let (_, ca) = ca();
        let role = |orgs: &[&str]| Peer::from_certificate(&leaf(&ca, "me", orgs).2).role;
        assert_eq!(role(&["keelson:admin"]), Ok(Role::Admin));
        assert_eq!(role(&["acme", "keelson:reader"]), Ok(Role::Reader));
        assert_eq!(role(&["keelson:reader", "keelson:admin"]), Ok(Role::Admin));
        assert_eq!(
            role(&["keelson:operator"]),
            Err("client \"me\" has role operator, which this node does not know (roles: admin may do anything, reader may read)".into())
        );
        assert_eq!(
            role(&["admin"]),
            Err("client \"me\" has no role: its certificate's organization (admin) names none of keelson:admin, keelson:reader".into())
        );
        assert_eq!(Peer::from_certificate(&leaf(&ca, "me", &[]).2).name, "me");
    }

    #[test]
    fn bad_trust_material_names_what_is_wrong() {
        let (ca_pem, ca) = ca();
        let (cert, key, _) = leaf(&ca, "node", &[]);
        let (_, other_key, _) = leaf(&ca, "other", &[]);
        let listen = "127.0.0.1:50000".parse().unwrap();
        let ok = RemoteTls::new(listen, 8, &ca_pem, &cert, &key).unwrap();
        assert!(
            ok.summary
                .starts_with("clients of CA \"test-ca\" (valid until "),
            "{}",
            ok.summary
        );
        let e = RemoteTls::new(listen, 8, "not pem", &cert, &key).unwrap_err();
        assert_eq!(e, "ca: no certificate in the PEM text");
        let e = RemoteTls::new(listen, 8, &ca_pem, &cert, "junk").unwrap_err();
        assert!(e.starts_with("key: not a PEM private key"), "{e}");
        let e = RemoteTls::new(listen, 8, &ca_pem, &cert, &other_key).unwrap_err();
        assert!(e.starts_with("cert/key: "), "{e}");
    }
}
