//! The connection to the receiver: plain TCP or TLS (rustls, trusting only the CA from
//! config), with every byte that reaches the socket counted, so that the kernel's count of
//! unacknowledged bytes (SIOCOUTQ) tells which messages the receiver's TCP stack has.

use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

/// How to reach the receiver.
#[derive(Clone)]
pub struct Dialer {
    pub host: String,
    pub port: u16,
    pub tls: Option<(TlsConnector, ServerName<'static>)>,
    pub connect_timeout: Duration,
}

impl std::fmt::Debug for Dialer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}://{}:{}",
            if self.tls.is_some() { "tls" } else { "tcp" },
            self.host,
            self.port
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    #[error("logging.forward.ca_file {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("logging.forward.ca_file {path}: no usable PEM certificate in it")]
    NoCertificate { path: String },
    #[error("logging.forward.server_name {0:?} is not a DNS name or an IP address")]
    BadName(String),
    #[error("TLS setup: {0}")]
    Rustls(#[from] rustls::Error),
}

/// A TLS connector that trusts exactly the certificates in `ca_file`, for `server_name`.
pub fn tls_connector(
    ca_file: &Path,
    server_name: &str,
) -> Result<(TlsConnector, ServerName<'static>), TlsSetupError> {
    let shown = ca_file.display().to_string();
    let pem = std::fs::read(ca_file).map_err(|source| TlsSetupError::Read {
        path: shown.clone(),
        source,
    })?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem).flatten() {
        let _ = roots.add(cert);
    }
    if roots.is_empty() {
        return Err(TlsSetupError::NoCertificate { path: shown });
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = ServerName::try_from(server_name.to_string())
        .map_err(|_| TlsSetupError::BadName(server_name.to_string()))?;
    Ok((TlsConnector::from(Arc::new(config)), name))
}

/// A TCP stream that counts the bytes written to it.
#[derive(Debug)]
pub struct Counted {
    inner: TcpStream,
    pub written: u64,
}

impl AsyncRead for Counted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            self.written += n as u64;
        }
        r
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// An open connection.
pub enum Conn {
    Plain(Counted),
    Tls(Box<TlsStream<Counted>>),
}

impl Dialer {
    pub async fn connect(&self) -> io::Result<Conn> {
        let tcp = tokio::time::timeout(
            self.connect_timeout,
            TcpStream::connect((self.host.as_str(), self.port)),
        )
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
        tcp.set_nodelay(true)?;
        let counted = Counted {
            inner: tcp,
            written: 0,
        };
        match &self.tls {
            None => Ok(Conn::Plain(counted)),
            Some((connector, name)) => {
                let tls = tokio::time::timeout(
                    self.connect_timeout,
                    connector.connect(name.clone(), counted),
                )
                .await
                .map_err(|_| {
                    io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out")
                })??;
                Ok(Conn::Tls(Box::new(tls)))
            }
        }
    }
}

impl Conn {
    fn tcp(&self) -> &Counted {
        match self {
            Conn::Plain(c) => c,
            Conn::Tls(t) => t.get_ref().0,
        }
    }

    /// Bytes handed to the socket since it was opened.
    pub fn written(&self) -> u64 {
        self.tcp().written
    }

    /// Bytes the socket holds that the peer has not acknowledged yet.
    pub fn unacknowledged(&self) -> io::Result<u64> {
        let mut outq: libc::c_int = 0;
        // SAFETY: SIOCOUTQ (TIOCOUTQ) on a TCP socket writes one int to the pointer given.
        let rc = unsafe {
            libc::ioctl(
                self.tcp().inner.as_raw_fd(),
                libc::TIOCOUTQ,
                &mut outq as *mut libc::c_int,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(u64::try_from(outq).unwrap_or(0))
    }

    /// Whether the receiver has closed the connection (a syslog receiver never sends, so
    /// anything readable is its end, or TLS records we consume here).
    pub async fn closed(&mut self) -> bool {
        let mut buf = [0u8; 512];
        loop {
            let read = match self {
                Conn::Plain(c) => {
                    tokio::time::timeout(Duration::ZERO, c.inner.read(&mut buf)).await
                }
                Conn::Tls(t) => tokio::time::timeout(Duration::ZERO, t.read(&mut buf)).await,
            };
            match read {
                Err(_) => return false,
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(_)) => continue,
            }
        }
    }

    pub async fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        match self {
            Conn::Plain(c) => {
                c.write_all(bytes).await?;
                c.flush().await
            }
            Conn::Tls(t) => {
                t.write_all(bytes).await?;
                t.flush().await
            }
        }
    }
}
