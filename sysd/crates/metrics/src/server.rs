//! The `/metrics` listener: HTTP/1.1 on TCP, `GET /metrics` only.
//!
//! Bounded by construction: at most [`MAX_CONNECTIONS`] at once (more are closed as soon as
//! they are accepted), request headers within [`HEADER_TIMEOUT`], and a connection lives at
//! most [`CONNECTION_LIFETIME`] (a scraper that stops reading its answer is dropped then; a
//! keep-alive scraper simply reconnects). A scrape is collected on the blocking pool, so
//! reading /proc and the cgroups never stalls sysd's event loop.
//!
//! TLS (issue 18, part 1's helper): the accepted `TcpStream` is handed to [`connection`] as
//! any `AsyncRead + AsyncWrite`; a TLS listener wraps it in a `tokio_rustls::TlsAcceptor`
//! first (`serve` takes the acceptor as an option) and nothing else changes.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{header, Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::task::JoinSet;

use crate::exposition::CONTENT_TYPE;
use crate::Collector;

pub const MAX_CONNECTIONS: usize = 8;
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);

/// The listener's bounds (the constants above; tests shorten them).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_connections: usize,
    pub header_timeout: Duration,
    pub lifetime: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: MAX_CONNECTIONS,
            header_timeout: HEADER_TIMEOUT,
            lifetime: CONNECTION_LIFETIME,
        }
    }
}

/// Binds the exporter's listener; the error names the address.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await.map_err(|e| {
        std::io::Error::new(e.kind(), format!("metrics: cannot listen on {addr}: {e}"))
    })
}

pub use tokio_rustls::TlsAcceptor;

/// HTTPS for the exporter (`[metrics.tls]`): the node's certificate chain and key, and, when
/// given, the CA whose client certificates alone may scrape. The error names the part that is
/// wrong.
pub fn tls_acceptor(
    cert: &str,
    key: &str,
    client_ca: Option<&str>,
) -> Result<tokio_rustls::TlsAcceptor, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs = |what: &str, pem: &str| -> Result<Vec<CertificateDer<'static>>, String> {
        let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("metrics.tls.{what}: not PEM certificates ({e})"))?;
        if certs.is_empty() {
            return Err(format!(
                "metrics.tls.{what}: no certificate in the PEM text"
            ));
        }
        Ok(certs)
    };
    let chain = certs("cert", cert)?;
    let key = PrivateKeyDer::from_pem_slice(key.as_bytes())
        .map_err(|e| format!("metrics.tls.key: not a PEM private key ({e})"))?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("metrics.tls: {e}"))?;
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for (i, c) in certs("client_ca", ca)?.into_iter().enumerate() {
                roots.add(c).map_err(|e| {
                    format!(
                        "metrics.tls.client_ca: certificate {} is not a usable CA: {e}",
                        i + 1
                    )
                })?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .map_err(|e| format!("metrics.tls.client_ca: {e}"))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder
        .with_single_cert(chain, key)
        .map_err(|e| format!("metrics.tls.cert/key: {e}"))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// Answers scrapes on `listener` until `shutdown` completes: plain HTTP, or HTTPS through `tls`
/// (the handshake bounded by the header timeout).
pub async fn serve(
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    collector: Arc<Collector>,
    limits: Limits,
    shutdown: impl Future<Output = ()>,
) {
    let mut connections = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => {
                while connections.try_join_next().is_some() {}
                match accepted {
                    Ok((stream, peer)) if connections.len() >= limits.max_connections => {
                        tracing::debug!(%peer, "metrics: too many connections, closing this one");
                        drop(stream);
                    }
                    Ok((stream, peer)) => {
                        let _ = stream.set_nodelay(true);
                        let collector = Arc::clone(&collector);
                        let tls = tls.clone();
                        connections.spawn(async move {
                            let Some(tls) = tls else {
                                let _ = tokio::time::timeout(
                                    limits.lifetime,
                                    connection(stream, collector, limits.header_timeout),
                                )
                                .await;
                                return;
                            };
                            match tokio::time::timeout(limits.header_timeout, tls.accept(stream)).await {
                                Ok(Ok(stream)) => {
                                    let _ = tokio::time::timeout(
                                        limits.lifetime,
                                        connection(stream, collector, limits.header_timeout),
                                    )
                                    .await;
                                }
                                Ok(Err(err)) => {
                                    tracing::debug!(%peer, %err, "metrics: TLS handshake refused");
                                }
                                Err(_) => tracing::debug!(%peer, "metrics: TLS handshake timed out"),
                            }
                        });
                    }
                    Err(err) => {
                        tracing::warn!(%err, "metrics: accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        }
    }
    connections.shutdown().await;
}

/// One client connection (a TCP stream, or a TLS stream over one).
pub async fn connection<S>(stream: S, collector: Arc<Collector>, header_timeout: Duration)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = service_fn(move |req| {
        let collector = Arc::clone(&collector);
        async move { Ok::<_, Infallible>(answer(req, collector).await) }
    });
    let result = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .max_buf_size(16 * 1024)
        .serve_connection(TokioIo::new(stream), service)
        .await;
    if let Err(err) = result {
        tracing::debug!(%err, "metrics: connection ended with an error");
    }
}

async fn answer(req: Request<Incoming>, collector: Arc<Collector>) -> Response<Full<Bytes>> {
    let text = |status: StatusCode, body: String| {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = status;
        r
    };
    if req.uri().path() != "/metrics" {
        return text(
            StatusCode::NOT_FOUND,
            format!("no such path: {} (try /metrics)\n", req.uri().path()),
        );
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = text(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("{} /metrics is not supported (use GET)\n", req.method()),
        );
        r.headers_mut()
            .insert(header::ALLOW, header::HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    match tokio::task::spawn_blocking(move || collector.scrape()).await {
        Ok(body) => {
            let mut r = text(StatusCode::OK, body);
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static(CONTENT_TYPE),
            );
            r
        }
        Err(err) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("metrics: the scrape failed: {err}\n"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use async_trait::async_trait;
    use keelson_api::{EventFeed, Failure, LogFeed, RequestCounts, Services};
    use keelson_common::api::{Health, Kind, ServiceStatus, State, Stats, Version};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    struct Fake;

    #[async_trait]
    impl Services for Fake {
        fn version(&self) -> Version {
            Version {
                version: "0".into(),
                uptime_s: 0,
                watchdog: None,
            }
        }
        fn list(&self) -> Vec<ServiceStatus> {
            vec![ServiceStatus {
                name: "web".into(),
                kind: Kind::Service,
                state: State::Running,
                health: Some(Health::Healthy),
                critical: false,
                source: "user".into(),
                image: "/img".into(),
                pid: Some(7),
                started_at_ms: Some(1_000),
                restarts: 2,
                last_exit: None,
                reason: None,
                next_restart_ms: None,
                spec_hash: "x".into(),
            }]
        }
        fn status(&self, _: &str) -> Result<ServiceStatus, Failure> {
            Err(Failure::not_found("no"))
        }
        async fn start(&self, _: &str) -> Result<ServiceStatus, Failure> {
            Err(Failure::not_found("no"))
        }
        async fn stop(&self, _: &str) -> Result<ServiceStatus, Failure> {
            Err(Failure::not_found("no"))
        }
        async fn restart(&self, _: &str) -> Result<ServiceStatus, Failure> {
            Err(Failure::not_found("no"))
        }
        async fn kill(&self, _: &str, _: i32) -> Result<ServiceStatus, Failure> {
            Err(Failure::not_found("no"))
        }
        fn logs(&self, _: &str, _: Option<usize>, _: bool) -> Result<LogFeed, Failure> {
            Err(Failure::not_found("no"))
        }
        fn events(&self, _: Option<u64>) -> EventFeed {
            unreachable!("the exporter reads no events")
        }
        fn stats(&self) -> Vec<Stats> {
            vec![Stats {
                service: "web".into(),
                cpu_usage_usec: Some(2_500_000),
                memory_current: Some(40 << 20),
                memory_peak: Some(41 << 20),
                memory_max: None,
                pids_current: Some(3),
                io_read_bytes: Some(10),
                io_write_bytes: Some(20),
                oom_kills: Some(0),
            }]
        }
    }

    async fn exporter(limits: Limits) -> (SocketAddr, Arc<RequestCounts>) {
        exporter_with(limits, None).await
    }

    async fn exporter_with(
        limits: Limits,
        tls: Option<tokio_rustls::TlsAcceptor>,
    ) -> (SocketAddr, Arc<RequestCounts>) {
        let requests = Arc::new(RequestCounts::default());
        requests.count(200);
        requests.count(404);
        let collector = Arc::new(Collector {
            node: crate::node::NodeSources::default(),
            os_release: "/nonexistent".into(),
            cmdline: "/proc/cmdline".into(),
            cgroup_parent: "/keelson".into(),
            services: Arc::new(Fake),
            updates: None,
            requests: Arc::clone(&requests),
            contributors: Vec::new(),
        });
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(serve(
            listener,
            tls,
            collector,
            limits,
            std::future::pending(),
        ));
        (addr, requests)
    }

    /// A CA: its PEM, and the issuer that signs with it.
    fn ca(name: &str) -> (String, rcgen::Issuer<'static, rcgen::KeyPair>) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let cert = params.self_signed(&key).unwrap();
        (cert.pem(), rcgen::Issuer::new(params, key))
    }

    /// A certificate `ca` signs for `name` (an IP address for a server): (PEM, key PEM).
    fn issue(
        ca: &(String, rcgen::Issuer<'static, rcgen::KeyPair>),
        name: &str,
    ) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let params = rcgen::CertificateParams::new(vec![name.to_owned()]).unwrap();
        let cert = params.signed_by(&key, &ca.1).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    /// A scrape over HTTPS, trusting `ca`, presenting `client` if given.
    async fn get_tls(
        addr: SocketAddr,
        ca: &str,
        client: Option<(String, String)>,
    ) -> std::io::Result<String> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(ca.as_bytes()).unwrap())
            .unwrap();
        let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
        let config = match client {
            None => builder.with_no_client_auth(),
            Some((cert, key)) => builder
                .with_client_auth_cert(
                    vec![CertificateDer::from_pem_slice(cert.as_bytes()).unwrap()],
                    PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
                )
                .unwrap(),
        };
        let tcp = tokio::net::TcpStream::connect(addr).await?;
        let mut s = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(ServerName::try_from("127.0.0.1").unwrap(), tcp)
            .await?;
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await?;
        let mut out = String::new();
        s.read_to_string(&mut out).await?;
        Ok(out)
    }

    /// `[metrics.tls]`: HTTPS with the node's certificate; with `client_ca`, only clients that
    /// CA signed get an answer; plain HTTP to the HTTPS port gets none.
    #[tokio::test]
    async fn https_and_client_certificates() {
        let server_ca = ca("metrics test CA");
        let (cert, key) = issue(&server_ca, "127.0.0.1");
        let server_ca_pem = server_ca.0.clone();

        let acceptor = tls_acceptor(&cert, &key, None).unwrap();
        let (addr, _) = exporter_with(Limits::default(), Some(acceptor)).await;
        let out = get_tls(addr, &server_ca_pem, None).await.unwrap();
        assert!(out.starts_with("HTTP/1.1 200"), "{out}");
        assert!(out.contains("keelson_service_restarts_total"), "{out}");
        let plain = get(addr, "/metrics").await;
        assert!(!plain.contains("HTTP/1.1 200"), "{plain}");

        let client_ca = ca("scrapers");
        let acceptor = tls_acceptor(&cert, &key, Some(&client_ca.0)).unwrap();
        let (addr, _) = exporter_with(Limits::default(), Some(acceptor)).await;
        let scraper = issue(&client_ca, "prometheus");
        let out = get_tls(addr, &server_ca_pem, Some(scraper)).await.unwrap();
        assert!(out.starts_with("HTTP/1.1 200"), "{out}");
        // No certificate, or one another CA signed: no answer.
        let refused = get_tls(addr, &server_ca_pem, None).await;
        assert!(
            refused.as_ref().map_or(true, |o| o.is_empty()),
            "{refused:?}"
        );
        let stranger = issue(&ca("another CA"), "prometheus");
        let refused = get_tls(addr, &server_ca_pem, Some(stranger)).await;
        assert!(
            refused.as_ref().map_or(true, |o| o.is_empty()),
            "{refused:?}"
        );

        // Bad material is named.
        let e = tls_acceptor("not pem", &key, None).err().unwrap();
        assert!(e.starts_with("metrics.tls.cert: "), "{e}");
        let e = tls_acceptor(&cert, "", None).err().unwrap();
        assert!(e.starts_with("metrics.tls.key: "), "{e}");
        let e = tls_acceptor(&cert, &key, Some("")).err().unwrap();
        assert_eq!(e, "metrics.tls.client_ca: no certificate in the PEM text");
    }

    async fn get(addr: SocketAddr, path: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn scrape_has_every_kind_of_figure() {
        let (addr, _) = exporter(Limits::default()).await;
        let answer = get(addr, "/metrics").await;
        assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");
        assert!(
            answer.contains("content-type: text/plain; version=0.0.4"),
            "{answer}"
        );
        for needle in [
            "\nnode_cpu_seconds_total{cpu=\"0\",mode=\"user\"} ",
            "\ncontainer_memory_usage_bytes{name=\"web\",id=\"/keelson/web\"} 41943040\n",
            "\ncontainer_memory_max_usage_bytes{name=\"web\",id=\"/keelson/web\"} 42991616\n",
            "\ncontainer_cpu_usage_seconds_total{name=\"web\",id=\"/keelson/web\"} 2.5\n",
            "\ncontainer_processes{name=\"web\",id=\"/keelson/web\"} 3\n",
            "\nkeelson_service_restarts_total{name=\"web\"} 2\n",
            "\nkeelson_service_state{name=\"web\",state=\"running\"} 1\n",
            "\nkeelson_service_state{name=\"web\",state=\"failed\"} 0\n",
            "\nkeelson_service_healthy{name=\"web\"} 1\n",
            "\nkeelson_api_requests_total{code=\"404\"} 1\n",
            "\nprocess_resident_memory_bytes ",
            "\nkeelson_os_info{",
        ] {
            assert!(answer.contains(needle), "{needle} missing in\n{answer}");
        }
        let missing = get(addr, "/other").await;
        assert!(
            missing.starts_with("HTTP/1.1 404") && missing.contains("try /metrics"),
            "{missing}"
        );
    }

    #[tokio::test]
    async fn silent_and_surplus_clients_are_bounded() {
        let limits = Limits {
            max_connections: 2,
            header_timeout: Duration::from_millis(300),
            lifetime: Duration::from_secs(5),
        };
        let (addr, _) = exporter(limits).await;
        // Two clients that connect and say nothing hold both slots...
        let mut idle1 = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut idle2 = tokio::net::TcpStream::connect(addr).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        // ...so a third is closed at once,
        let mut surplus = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut buf = [0u8; 64];
        let n = tokio::time::timeout(Duration::from_secs(2), surplus.read(&mut buf))
            .await
            .expect("the surplus connection is closed, not left hanging");
        assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
        // and the silent ones are dropped after the header timeout, freeing the slots.
        for idle in [&mut idle1, &mut idle2] {
            let n = tokio::time::timeout(Duration::from_secs(2), idle.read(&mut buf))
                .await
                .expect("a silent client is dropped after the header timeout");
            let _ = n;
        }
        assert!(get(addr, "/metrics").await.starts_with("HTTP/1.1 200 OK"));
    }
}
