//! Plain HTTP/1.1 GETs for the update agent: a `tough` transport for the (small) metadata, and
//! ranged streaming reads for payloads so a dropped connection resumes where it stopped.
//! Repositories are static files on any web server; TLS is left to the network (the repository
//! is authenticated by TUF signatures, not by the transport).

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper::header::{CONTENT_LENGTH, CONTENT_RANGE, HOST, RANGE};
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use tough::{Transport, TransportError, TransportErrorKind, TransportStream};
use url::Url;

/// Connect and per-read timeout: a stalled server counts as a dropped connection.
pub const IO_TIMEOUT: Duration = Duration::from_secs(20);
/// No metadata file or manifest is allowed to be bigger (endless-data protection in the
/// transport; tough applies the signed lengths on top).
const METADATA_MAX: u64 = 32 << 20;

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("{url}: only http:// URLs are supported here")]
    Scheme { url: String },
    #[error("{url}: cannot connect")]
    Connect {
        url: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{url}: HTTP exchange failed")]
    Exchange {
        url: String,
        #[source]
        source: hyper::Error,
    },
    #[error("{url}: no response within {}s", IO_TIMEOUT.as_secs())]
    Timeout { url: String },
    #[error("{url}: HTTP {status}")]
    Status { url: String, status: u16 },
    #[error("{url}: more than {max} bytes")]
    TooLong { url: String, max: u64 },
}

impl HttpError {
    /// Worth retrying (the network or the server hiccuped), as opposed to a definite answer.
    pub fn transient(&self) -> bool {
        match self {
            HttpError::Connect { .. } | HttpError::Exchange { .. } | HttpError::Timeout { .. } => {
                true
            }
            HttpError::Status { status, .. } => *status >= 500,
            _ => false,
        }
    }
}

/// An open response body.
pub struct Body {
    url: String,
    body: Incoming,
}

impl Body {
    /// The next chunk, None at the end.
    pub async fn chunk(&mut self) -> Result<Option<Bytes>, HttpError> {
        loop {
            let frame = tokio::time::timeout(IO_TIMEOUT, self.body.frame())
                .await
                .map_err(|_| HttpError::Timeout {
                    url: self.url.clone(),
                })?;
            match frame {
                None => return Ok(None),
                Some(Err(source)) => {
                    return Err(HttpError::Exchange {
                        url: self.url.clone(),
                        source,
                    })
                }
                Some(Ok(f)) => {
                    if let Ok(data) = f.into_data() {
                        if !data.is_empty() {
                            return Ok(Some(data));
                        }
                    }
                }
            }
        }
    }
}

/// GET `url` from byte `from` on. Returns the body, the offset it really starts at (0 when the
/// server ignored the range) and the announced length of what follows.
pub async fn get(url: &Url, from: u64) -> Result<(Body, u64, Option<u64>), HttpError> {
    let shown = url.to_string();
    if url.scheme() != "http" {
        return Err(HttpError::Scheme { url: shown });
    }
    let host = url.host_str().unwrap_or("").to_string();
    let port = url.port_or_known_default().unwrap_or(80);
    let connect = tokio::net::TcpStream::connect((host.as_str(), port));
    let stream = tokio::time::timeout(IO_TIMEOUT, connect)
        .await
        .map_err(|_| HttpError::Timeout { url: shown.clone() })?
        .map_err(|source| HttpError::Connect {
            url: shown.clone(),
            source,
        })?;
    let exchange = |source| HttpError::Exchange {
        url: shown.clone(),
        source,
    };
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(exchange)?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let path = match url.query() {
        Some(q) => format!("{}?{q}", url.path()),
        None => url.path().to_string(),
    };
    let mut req = Request::get(path).header(HOST, format!("{host}:{port}"));
    if from > 0 {
        req = req.header(RANGE, format!("bytes={from}-"));
    }
    let req = req
        .body(Empty::<Bytes>::new())
        .map_err(|_| HttpError::Scheme { url: shown.clone() })?;
    let resp = tokio::time::timeout(IO_TIMEOUT, sender.send_request(req))
        .await
        .map_err(|_| HttpError::Timeout { url: shown.clone() })?
        .map_err(exchange)?;
    let status = resp.status();
    let start = match status {
        StatusCode::OK => 0,
        StatusCode::PARTIAL_CONTENT => resp
            .headers()
            .get(CONTENT_RANGE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("bytes "))
            .and_then(|v| v.split('-').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0),
        s => {
            return Err(HttpError::Status {
                url: shown,
                status: s.as_u16(),
            })
        }
    };
    let len = resp
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    Ok((
        Body {
            url: shown,
            body: resp.into_body(),
        },
        start,
        len,
    ))
}

/// The whole body of a small file, refusing more than `max` bytes.
pub async fn get_small(url: &Url, max: u64) -> Result<Vec<u8>, HttpError> {
    let (mut body, _, len) = get(url, 0).await?;
    let too_long = || HttpError::TooLong {
        url: url.to_string(),
        max,
    };
    if len.is_some_and(|l| l > max) {
        return Err(too_long());
    }
    let mut out = Vec::new();
    while let Some(chunk) = body.chunk().await? {
        out.extend_from_slice(&chunk);
        if out.len() as u64 > max {
            return Err(too_long());
        }
    }
    Ok(out)
}

/// tough's transport: `http://` through [`get_small`], `file://` through tough's own.
#[derive(Debug, Clone, Copy, Default)]
pub struct AgentTransport;

#[tough::async_trait]
impl Transport for AgentTransport {
    async fn fetch(&self, url: Url) -> Result<TransportStream, TransportError> {
        match url.scheme() {
            "file" => tough::FilesystemTransport.fetch(url).await,
            "http" => match get_small(&url, METADATA_MAX).await {
                Ok(bytes) => {
                    let items: Vec<Result<Bytes, TransportError>> = vec![Ok(Bytes::from(bytes))];
                    Ok(Box::pin(futures_util::stream::iter(items)))
                }
                Err(HttpError::Status { status: 404, .. })
                | Err(HttpError::Status { status: 403, .. }) => {
                    Err(TransportError::new(TransportErrorKind::FileNotFound, url))
                }
                Err(e) => Err(TransportError::new_with_cause(
                    TransportErrorKind::Other,
                    url,
                    e,
                )),
            },
            _ => Err(TransportError::new(
                TransportErrorKind::UnsupportedUrlScheme,
                url,
            )),
        }
    }
}
