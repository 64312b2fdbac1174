//! A minimal, synchronous HTTP/1.1 client for sysd's unix socket, and for a node's remote API
//! over mutual TLS (the connection comes from [`crate::remote`]).
//!
//! Why not a client library: keelctl sends one request per connection (`Connection: close`) to
//! one known server, and reads either a JSON body or an NDJSON stream line by line. That needs
//! a request writer, a status-line and header parser, and `Content-Length`, chunked and
//! read-to-close bodies — a couple hundred lines with no async runtime, which keeps keelctl
//! small enough to ship in the admin container. The parser works on any [`BufRead`], so it is
//! tested on byte strings.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use keelson_common::api::ApiError;

use crate::remote::{Node, TlsStream};

/// Longest status line, header line or chunk-size line accepted.
const MAX_LINE: u64 = 16 * 1024;
/// Most header lines accepted in one response.
const MAX_HEADERS: usize = 100;

/// Talks to one sysd: on its socket, or on a node's remote API.
#[derive(Debug, Clone)]
pub struct Client {
    target: Target,
}

#[derive(Debug, Clone)]
enum Target {
    Socket(PathBuf),
    Node(Box<Node>),
}

/// A connection to sysd, either transport.
#[derive(Debug)]
pub enum Conn {
    Unix(UnixStream),
    Tls(Box<TlsStream>),
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Conn::Unix(s) => s.read(buf),
            Conn::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Conn::Unix(s) => s.write(buf),
            Conn::Tls(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Conn::Unix(s) => s.flush(),
            Conn::Tls(s) => s.flush(),
        }
    }
}

impl Client {
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        Client {
            target: Target::Socket(socket.into()),
        }
    }

    /// A client of a node's remote API.
    pub fn remote(node: Node) -> Self {
        Client {
            target: Target::Node(Box::new(node)),
        }
    }

    /// The node's name as the operator gave it; None for the local socket.
    pub fn node(&self) -> Option<&str> {
        match &self.target {
            Target::Node(node) => Some(&node.name),
            Target::Socket(_) => None,
        }
    }

    /// Sends one request and returns the response once its head has arrived. A non-2xx status
    /// becomes an error carrying the server's message.
    pub fn send(
        &self,
        method: &str,
        path: &str,
        body: Option<(&str, &[u8])>,
    ) -> Result<Response<BufReader<Conn>>> {
        let mut stream = self.connect()?;
        if let Err(err) = write_request(&mut stream, method, path, body) {
            return Err(self.io_error(&err, &format!("sending {method} {path} to sysd")));
        }
        let response = match read_response(BufReader::new(stream)) {
            Ok(response) => response,
            // TLS 1.3: a refused client certificate shows as an alert on the first read.
            Err(err) => {
                return Err(match err.downcast_ref::<io::Error>() {
                    Some(io) => {
                        self.io_error(io, &format!("reading sysd's answer to {method} {path}"))
                    }
                    None => err.context(format!("reading sysd's answer to {method} {path}")),
                })
            }
        };
        match (response.error_for_status(), self.node()) {
            (Err(err), Some(node)) => Err(anyhow::anyhow!("node {node}: {err:#}")),
            (result, _) => result,
        }
    }

    /// An I/O error on the connection: a TLS refusal in words, or `what: error`.
    fn io_error(&self, err: &io::Error, what: &str) -> anyhow::Error {
        match &self.target {
            Target::Node(node) => node.explain(err),
            Target::Socket(_) => anyhow::anyhow!("{what}: {err}"),
        }
    }

    /// `GET path`, the whole body as text.
    pub fn get(&self, path: &str) -> Result<String> {
        self.send("GET", path, None)?.text()
    }

    fn connect(&self) -> Result<Conn> {
        match &self.target {
            Target::Socket(socket) => UnixStream::connect(socket)
                .map(Conn::Unix)
                .map_err(|err| connect_error(socket, &err)),
            Target::Node(node) => node.connect().map(|s| Conn::Tls(Box::new(s))),
        }
    }
}

/// "cannot reach sysd at PATH: REASON (WHAT TO DO)".
fn connect_error(socket: &Path, err: &io::Error) -> anyhow::Error {
    let hint = match err.kind() {
        io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => {
            " (is sysd running? keelctl must run on the host or in the admin container with \
             the socket mounted)"
        }
        io::ErrorKind::PermissionDenied => " (the socket is root-only: run keelctl as root)",
        _ => "",
    };
    anyhow::anyhow!(
        "cannot reach sysd at {}: {}{hint}",
        socket.display(),
        os_error_text(err)
    )
}

/// The error's text without Rust's " (os error N)" suffix.
fn os_error_text(err: &io::Error) -> String {
    let text = err.to_string();
    match (err.raw_os_error(), text.rfind(" (os error ")) {
        (Some(_), Some(at)) => text[..at].to_string(),
        _ => text,
    }
}

/// Percent-encodes one path segment (a service name), so any name makes a valid request line.
pub fn encode_segment(segment: &str) -> String {
    let mut out = String::with_capacity(segment.len());
    for byte in segment.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

pub fn write_request(
    out: &mut impl Write,
    method: &str,
    path: &str,
    body: Option<(&str, &[u8])>,
) -> io::Result<()> {
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: keelson\r\nConnection: close\r\n\
         User-Agent: keelctl/{}\r\nAccept: application/json, application/x-ndjson\r\n",
        env!("CARGO_PKG_VERSION")
    );
    let payload = match body {
        Some((content_type, bytes)) => {
            head.push_str(&format!(
                "Content-Type: {content_type}\r\nContent-Length: {}\r\n",
                bytes.len()
            ));
            bytes
        }
        None => &[][..],
    };
    head.push_str("\r\n");
    out.write_all(head.as_bytes())?;
    out.write_all(payload)?;
    out.flush()
}

/// A response whose head has been read; the body is read on demand.
#[derive(Debug)]
pub struct Response<R> {
    pub status: u16,
    pub reason: String,
    headers: Vec<(String, String)>,
    body: Body<R>,
}

impl<R: BufRead> Response<R> {
    /// The value of header `name` (case-insensitive), the last one if repeated.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .rev()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The whole body as text.
    pub fn text(mut self) -> Result<String> {
        let mut bytes = Vec::new();
        self.body
            .read_to_end(&mut bytes)
            .context("reading sysd's response body")?;
        String::from_utf8(bytes).context("sysd's response is not UTF-8")
    }

    /// The body's lines, as they arrive (for NDJSON streams).
    pub fn lines(self) -> io::Lines<BufReader<Body<R>>> {
        BufReader::new(self.body).lines()
    }

    /// Itself for a 2xx status, otherwise an error with the server's message (its `ApiError`,
    /// or the status and body when it is not one).
    pub fn error_for_status(self) -> Result<Self> {
        if (200..300).contains(&self.status) {
            return Ok(self);
        }
        let status = self.status;
        let reason = self.reason.clone();
        let body = self.text().unwrap_or_default();
        match serde_json::from_str::<ApiError>(&body) {
            Ok(ApiError { error }) => bail!("{error}"),
            Err(_) if body.trim().is_empty() => bail!("sysd answered {status} {reason}"),
            Err(_) => bail!("sysd answered {status} {reason}: {}", body.trim()),
        }
    }
}

/// Reads a status line and headers from `input`; the body is left to read.
pub fn read_response<R: BufRead>(mut input: R) -> Result<Response<R>> {
    let status_line = read_line(&mut input)?.context("the connection closed before an answer")?;
    let mut parts = status_line.splitn(3, ' ');
    let (version, code) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    if !version.starts_with("HTTP/1.") {
        bail!("not an HTTP/1 response: {status_line:?}");
    }
    let status: u16 = code
        .parse()
        .ok()
        .filter(|c| (100..600).contains(c))
        .with_context(|| format!("bad status line {status_line:?}"))?;
    let reason = parts.next().unwrap_or("").to_string();

    let mut headers = Vec::new();
    loop {
        let line = read_line(&mut input)?.context("the connection closed inside the headers")?;
        if line.is_empty() {
            break;
        }
        if headers.len() == MAX_HEADERS {
            bail!("more than {MAX_HEADERS} headers");
        }
        let (name, value) = line
            .split_once(':')
            .with_context(|| format!("bad header line {line:?}"))?;
        headers.push((name.trim().to_string(), value.trim().to_string()));
    }

    let mut response = Response {
        status,
        reason,
        headers,
        body: Body::Empty,
    };
    let chunked = response
        .header("transfer-encoding")
        .is_some_and(|te| te.to_ascii_lowercase().contains("chunked"));
    response.body = if chunked {
        Body::Chunked(Chunked::new(input))
    } else if let Some(length) = response.header("content-length") {
        let length: u64 = length
            .parse()
            .with_context(|| format!("bad Content-Length {length:?}"))?;
        Body::Length(input.take(length))
    } else if status == 204 || status == 304 || status < 200 {
        Body::Empty
    } else {
        Body::UntilClose(input)
    };
    Ok(response)
}

/// One CRLF- (or LF-) terminated line without its terminator; None at a clean end of input.
fn read_line(input: &mut impl BufRead) -> io::Result<Option<String>> {
    let mut line = Vec::new();
    input.take(MAX_LINE).read_until(b'\n', &mut line)?;
    if line.is_empty() {
        return Ok(None);
    }
    if line.pop() != Some(b'\n') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "line too long or cut short",
        ));
    }
    if line.last() == Some(&b'\r') {
        line.pop();
    }
    String::from_utf8(line)
        .map(Some)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "line is not UTF-8"))
}

/// A response body, decoded.
#[derive(Debug)]
pub enum Body<R> {
    Empty,
    Length(io::Take<R>),
    Chunked(Chunked<R>),
    UntilClose(R),
}

impl<R: BufRead> Read for Body<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Body::Empty => Ok(0),
            Body::Length(inner) => {
                let wanted = inner.limit();
                let n = inner.read(buf)?;
                if n == 0 && wanted > 0 && !buf.is_empty() {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("the body ended {wanted} bytes short"),
                    ));
                }
                Ok(n)
            }
            Body::Chunked(inner) => inner.read(buf),
            Body::UntilClose(inner) => inner.read(buf),
        }
    }
}

/// Decodes `Transfer-Encoding: chunked`, returning data as soon as each chunk arrives.
#[derive(Debug)]
pub struct Chunked<R> {
    inner: R,
    /// Bytes left in the current chunk.
    remaining: u64,
    /// The CRLF after a chunk's data is still to be read.
    after_data: bool,
    done: bool,
}

impl<R: BufRead> Chunked<R> {
    fn new(inner: R) -> Self {
        Chunked {
            inner,
            remaining: 0,
            after_data: false,
            done: false,
        }
    }

    fn next_line(&mut self) -> io::Result<String> {
        read_line(&mut self.inner)?.ok_or_else(|| {
            io::Error::new(io::ErrorKind::UnexpectedEof, "the stream ended mid-chunk")
        })
    }
}

impl<R: BufRead> Read for Chunked<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.done || buf.is_empty() {
            return Ok(0);
        }
        if self.remaining == 0 {
            if self.after_data {
                if !self.next_line()?.is_empty() {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "no CRLF after a chunk",
                    ));
                }
                self.after_data = false;
            }
            let line = self.next_line()?;
            let size = line.split(';').next().unwrap_or("").trim();
            let size = u64::from_str_radix(size, 16).map_err(|_| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("bad chunk size {line:?}"),
                )
            })?;
            if size == 0 {
                // Trailers, if any, end with an empty line.
                while !self.next_line()?.is_empty() {}
                self.done = true;
                return Ok(0);
            }
            self.remaining = size;
        }
        let available = self.inner.fill_buf()?;
        if available.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the stream ended mid-chunk",
            ));
        }
        let n = available
            .len()
            .min(buf.len())
            .min(usize::try_from(self.remaining).unwrap_or(usize::MAX));
        buf[..n].copy_from_slice(&available[..n]);
        self.inner.consume(n);
        self.remaining -= n as u64;
        self.after_data = self.remaining == 0;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(raw: &[u8]) -> Response<&[u8]> {
        read_response(raw).expect("a response")
    }

    #[test]
    fn content_length_body() {
        let response = parse(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 7\r\n\r\n\
              {\"a\":1}trailing garbage",
        );
        assert_eq!(response.status, 200);
        assert_eq!(response.header("content-type"), Some("application/json"));
        assert_eq!(response.text().expect("body"), "{\"a\":1}");
    }

    #[test]
    fn short_content_length_body_is_an_error() {
        let response = parse(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc");
        assert!(response.text().is_err());
    }

    #[test]
    fn chunked_body_with_extensions_and_trailers() {
        let response = parse(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\
              4\r\nWiki\r\n6;ext=1\r\npedia \r\nE\r\nin \r\n\r\nchunks.\r\n0\r\nX-Trailer: 1\r\n\r\n",
        );
        assert_eq!(
            response.text().expect("body"),
            "Wikipedia in \r\n\r\nchunks."
        );
    }

    #[test]
    fn chunked_stream_yields_lines_across_chunk_boundaries() {
        let raw = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n\
                    5\r\n{\"a\":\r\n4\r\n1}\n{\r\n7\r\n\"a\":2}\n\r\n0\r\n\r\n";
        let lines: Vec<String> = parse(raw)
            .lines()
            .collect::<io::Result<_>>()
            .expect("lines");
        assert_eq!(lines, ["{\"a\":1}", "{\"a\":2}"]);
    }

    #[test]
    fn truncated_chunked_stream_is_an_error_not_an_end() {
        let raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab";
        assert!(parse(raw).text().is_err());
        let raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabXX1\r\n";
        assert!(parse(raw).text().is_err());
    }

    /// Lines come out as soon as their chunk is in, not when the stream ends.
    #[test]
    fn chunked_lines_are_readable_before_the_stream_ends() {
        let (mut server, client) = UnixStream::pair().expect("pair");
        server
            .write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n6\r\nfirst\n\r\n")
            .expect("write");
        let mut lines = read_response(BufReader::new(client)).expect("head").lines();
        assert_eq!(
            lines.next().transpose().expect("line").as_deref(),
            Some("first")
        );
        server
            .write_all(b"7\r\nsecond\n\r\n0\r\n\r\n")
            .expect("write");
        assert_eq!(
            lines.next().transpose().expect("line").as_deref(),
            Some("second")
        );
        assert!(lines.next().is_none());
    }

    #[test]
    fn body_until_close_and_empty_bodies() {
        let response = parse(b"HTTP/1.0 200 OK\r\n\r\nall of it");
        assert_eq!(response.text().expect("body"), "all of it");
        let response = parse(b"HTTP/1.1 204 No Content\r\n\r\n");
        assert_eq!(response.text().expect("body"), "");
    }

    #[test]
    fn errors_carry_the_servers_message() {
        let response = parse(
            b"HTTP/1.1 404 Not Found\r\nContent-Length: 42\r\n\r\n{\"error\":\"no service named \\\"x\\\" (known)\"}",
        );
        let err = response.error_for_status().expect_err("404");
        assert_eq!(err.to_string(), "no service named \"x\" (known)");

        let response = parse(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 4\r\n\r\noops");
        let err = response.error_for_status().expect_err("502");
        assert_eq!(err.to_string(), "sysd answered 502 Bad Gateway: oops");
    }

    #[test]
    fn malformed_heads_are_errors() {
        assert!(read_response(&b""[..]).is_err());
        assert!(read_response(&b"SSH-2.0-OpenSSH\r\n\r\n"[..]).is_err());
        assert!(read_response(&b"HTTP/1.1 abc OK\r\n\r\n"[..]).is_err());
        assert!(read_response(&b"HTTP/1.1 200 OK\r\nno colon\r\n\r\n"[..]).is_err());
        assert!(read_response(&b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n"[..]).is_err());
    }

    #[test]
    fn requests_are_well_formed() {
        let mut out = Vec::new();
        write_request(
            &mut out,
            "POST",
            "/v1/apply?dry_run=1",
            Some(("application/toml", b"a = 1\n")),
        )
        .expect("write");
        let text = String::from_utf8(out).expect("utf-8");
        assert!(text.starts_with("POST /v1/apply?dry_run=1 HTTP/1.1\r\nHost: keelson\r\n"));
        assert!(text.contains("Connection: close\r\n"));
        assert!(
            text.ends_with("Content-Type: application/toml\r\nContent-Length: 6\r\n\r\na = 1\n")
        );
    }

    #[test]
    fn segments_are_percent_encoded() {
        assert_eq!(encode_segment("web-1.a_b~"), "web-1.a_b~");
        assert_eq!(encode_segment("a b/c?"), "a%20b%2Fc%3F");
    }

    #[test]
    fn connect_errors_say_what_to_do() {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("sysd.sock");
        let err = Client::new(&socket)
            .get("/v1/version")
            .expect_err("no socket");
        assert_eq!(
            err.to_string(),
            format!(
                "cannot reach sysd at {}: No such file or directory (is sysd running? keelctl \
                 must run on the host or in the admin container with the socket mounted)",
                socket.display()
            )
        );
        let denied = io::Error::from_raw_os_error(13);
        assert!(connect_error(&socket, &denied)
            .to_string()
            .ends_with(": Permission denied (the socket is root-only: run keelctl as root)"));
    }
}
