//! The EC2-style instance metadata service (IMDSv2) at 169.254.169.254, the one network
//! datasource.
//!
//! It is tried only when the machine says it is on such a platform — DMI `sys_vendor` or
//! `bios_vendor` "Amazon EC2", `product_name` "OpenStack Nova" — or the kernel command line asks
//! with `keelson.datasource=imds`, so a node elsewhere never waits on a network timeout. It runs
//! after the host network is started, retrying while the network comes up (connection refused,
//! unreachable, timeouts) until [`DEADLINE`]:
//!
//! 1. `PUT /latest/api/token` with `X-aws-ec2-metadata-token-ttl-seconds` → a session token
//!    (a 403/404/405 answer means an IMDSv1-only service: the requests go without a token);
//! 2. `GET /latest/meta-data/instance-id` (required) and `.../local-hostname` (optional);
//! 3. `GET /latest/user-data` (404: the instance has none).
//!
//! Plain HTTP/1.1 over a TCP stream, by hand: the service is link-local and answers small
//! bodies; every body is capped.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::datasource::{Found, MetaData};
use super::userdata::MAX_RAW;
use super::Error;

/// The metadata service's address.
pub const ADDRESS: &str = "169.254.169.254:80";
/// How long the network may take to let the first answer through.
pub const DEADLINE: Duration = Duration::from_secs(90);
/// One request's limit.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
const TOKEN_TTL: &str = "21600";

/// Whether this machine should look for an IMDS (DMI under `sys`, or the command line).
pub fn enabled(sys: &std::path::Path, cmdline: &str) -> bool {
    if cmdline
        .split_whitespace()
        .any(|w| w == "keelson.datasource=imds" || w == "keelson.datasource=ec2")
    {
        return true;
    }
    let dmi = |f: &str| {
        std::fs::read_to_string(sys.join("class/dmi/id").join(f))
            .map(|s| s.trim().to_string())
            .unwrap_or_default()
    };
    dmi("sys_vendor") == "Amazon EC2"
        || dmi("bios_vendor") == "Amazon EC2"
        || dmi("product_name") == "OpenStack Nova"
}

/// A response: status and body.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
}

async fn request(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    limit: usize,
) -> std::io::Result<Response> {
    tokio::time::timeout(REQUEST_TIMEOUT, async {
        let mut stream = TcpStream::connect(addr).await?;
        let mut req = format!(
            "{method} {path} HTTP/1.1\r\nHost: 169.254.169.254\r\nConnection: close\r\nContent-Length: 0\r\n"
        );
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("\r\n");
        stream.write_all(req.as_bytes()).await?;
        let mut raw = Vec::new();
        stream
            .take((limit + 16 * 1024) as u64)
            .read_to_end(&mut raw)
            .await?;
        parse(&raw, limit)
    })
    .await
    .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer within 5 s"))?
}

/// The metadata service's whole answer (`raw`, read until the server closed) as a status and
/// a body of at most `limit` bytes.
pub fn parse(raw: &[u8], limit: usize) -> std::io::Result<Response> {
    let bad = |m: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, m.to_string());
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| bad("no end of the response head"))?;
    let head = std::str::from_utf8(&raw[..end]).map_err(|_| bad("response head is not text"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| bad("no status in the response"))?;
    let mut body = raw[end + 4..].to_vec();
    for line in head.lines().skip(1) {
        if let Some((k, v)) = line.split_once(':') {
            let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
            if k == "content-length" {
                let n: usize = v.parse().map_err(|_| bad("bad Content-Length"))?;
                if n > limit {
                    return Err(bad(&format!("{n} bytes, more than the {limit}-byte limit")));
                }
                if body.len() < n {
                    return Err(bad("truncated body"));
                }
                body.truncate(n);
            }
            if k == "transfer-encoding" && v.eq_ignore_ascii_case("chunked") {
                return Err(bad("chunked responses are not supported"));
            }
        }
    }
    if body.len() > limit {
        return Err(bad(&format!("more than the {limit}-byte limit")));
    }
    Ok(Response { status, body })
}

/// Fetches user data and meta-data from `addr`, retrying transport errors until `deadline`.
/// `log` receives what happened. `Ok(None)`: the instance has no user data.
pub async fn fetch(
    addr: &str,
    deadline: Duration,
    log: &mut Vec<String>,
) -> Result<Option<Found>, Error> {
    let start = Instant::now();
    let mut wait = Duration::from_millis(250);
    let mut attempts = 0u32;
    loop {
        attempts += 1;
        match fetch_once(addr).await {
            Ok(found) => {
                log.push(format!(
                    "imds: http://{addr}: {} after {attempts} attempt(s) in {} ms",
                    match &found {
                        Some(f) => format!("{} bytes of user data", f.user_data.len()),
                        None => "no user data".into(),
                    },
                    start.elapsed().as_millis()
                ));
                return Ok(found);
            }
            Err(Failure::Answer(e)) => {
                return Err(Error::Upstream(format!("imds: http://{addr}: {e}")))
            }
            Err(Failure::Transport(e)) if start.elapsed() + wait > deadline => {
                log.push(format!(
                    "imds: http://{addr}: gave up after {attempts} attempts: {e}"
                ));
                return Err(Error::Upstream(format!(
                    "imds: http://{addr} did not answer within {} s ({e})",
                    deadline.as_secs()
                )));
            }
            Err(Failure::Transport(_)) => {
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(5));
            }
        }
    }
}

enum Failure {
    /// Worth retrying: the network is not there yet.
    Transport(String),
    /// The service answered something wrong: final.
    Answer(String),
}

async fn fetch_once(addr: &str) -> Result<Option<Found>, Failure> {
    let transport = |e: std::io::Error| match e.kind() {
        std::io::ErrorKind::InvalidData => Failure::Answer(e.to_string()),
        _ => Failure::Transport(e.to_string()),
    };
    let token = request(
        addr,
        "PUT",
        "/latest/api/token",
        &[("X-aws-ec2-metadata-token-ttl-seconds", TOKEN_TTL)],
        4096,
    )
    .await
    .map_err(transport)?;
    let token = match token.status {
        200 => Some(
            String::from_utf8(token.body)
                .map_err(|_| Failure::Answer("the session token is not text".into()))?
                .trim()
                .to_string(),
        ),
        403..=405 => None,
        s => return Err(Failure::Answer(format!("PUT /latest/api/token: HTTP {s}"))),
    };
    let headers: Vec<(&str, &str)> = token
        .as_deref()
        .map(|t| vec![("X-aws-ec2-metadata-token", t)])
        .unwrap_or_default();
    let get = |path: &'static str, limit: usize| {
        let headers = headers.clone();
        async move {
            request(addr, "GET", path, &headers, limit)
                .await
                .map_err(transport)
        }
    };
    let id = get("/latest/meta-data/instance-id", 1024).await?;
    if id.status != 200 {
        return Err(Failure::Answer(format!(
            "GET /latest/meta-data/instance-id: HTTP {}",
            id.status
        )));
    }
    let instance_id = String::from_utf8_lossy(&id.body).trim().to_string();
    if instance_id.is_empty() || instance_id.contains(['/', '\n']) {
        return Err(Failure::Answer(format!(
            "instance-id {instance_id:?} is empty or has `/` or line breaks"
        )));
    }
    let host = get("/latest/meta-data/local-hostname", 1024).await?;
    let local_hostname = (host.status == 200)
        .then(|| String::from_utf8_lossy(&host.body).trim().to_string())
        // EC2 names (ip-10-0-0-1.ec2.internal) are FQDNs; the first label is the host name.
        .map(|h| h.split('.').next().unwrap_or_default().to_string())
        .filter(|h| keelson_spec::units::check_hostname(h).is_ok());
    let ud = get("/latest/user-data", MAX_RAW).await?;
    let user_data = match ud.status {
        200 => ud.body,
        404 => return Ok(None),
        s => return Err(Failure::Answer(format!("GET /latest/user-data: HTTP {s}"))),
    };
    Ok(Some(Found {
        source: format!("imds:http://{addr}"),
        user_data,
        meta: MetaData {
            instance_id,
            local_hostname,
        },
        network_config: None,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::TcpListener;
    use std::sync::{Arc, Mutex};

    /// A small IMDSv2 on loopback: token required, like EC2 with `HttpTokens=required`.
    fn server(user_data: Option<&'static str>, seen: Arc<Mutex<Vec<String>>>) -> String {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        std::thread::spawn(move || {
            for s in l.incoming() {
                let mut s = s.unwrap();
                let mut buf = [0u8; 4096];
                let n = s.read(&mut buf).unwrap_or(0);
                let req = String::from_utf8_lossy(&buf[..n]).to_string();
                let line = req.lines().next().unwrap_or("").to_string();
                seen.lock().unwrap().push(line.clone());
                let has_token = req.contains("X-aws-ec2-metadata-token: tok-1");
                let (status, body) = if line.starts_with("PUT /latest/api/token") {
                    (200, "tok-1")
                } else if !has_token {
                    (401, "")
                } else if line.starts_with("GET /latest/meta-data/instance-id") {
                    (200, "i-0123456789")
                } else if line.starts_with("GET /latest/meta-data/local-hostname") {
                    (200, "ip-10-0-2-15.ec2.internal")
                } else if line.starts_with("GET /latest/user-data") {
                    match user_data {
                        Some(u) => (200, u),
                        None => (404, ""),
                    }
                } else {
                    (404, "")
                };
                let _ = write!(
                    s,
                    "HTTP/1.1 {status} X\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        addr
    }

    #[tokio::test(flavor = "current_thread")]
    async fn token_then_metadata_then_user_data() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let addr = server(
            Some("#cloud-config\nhostname: from-imds\n"),
            Arc::clone(&seen),
        );
        let mut log = Vec::new();
        let f = fetch(&addr, Duration::from_secs(5), &mut log)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(f.meta.instance_id, "i-0123456789");
        assert_eq!(f.meta.local_hostname.as_deref(), Some("ip-10-0-2-15"));
        assert_eq!(f.user_data, b"#cloud-config\nhostname: from-imds\n");
        assert!(seen.lock().unwrap()[0].starts_with("PUT /latest/api/token"));
        assert!(log[0].contains("after 1 attempt(s)"), "{log:?}");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn no_user_data_and_late_network() {
        let addr = server(None, Arc::default());
        let mut log = Vec::new();
        assert_eq!(
            fetch(&addr, Duration::from_secs(5), &mut log)
                .await
                .unwrap(),
            None
        );
        // Nothing listening: retried, then a clear error naming the address and the wait.
        let dead = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .to_string();
        let mut log = Vec::new();
        let e = fetch(&dead, Duration::from_millis(1200), &mut log)
            .await
            .unwrap_err();
        assert!(matches!(e, Error::Upstream(_)), "{e:?}");
        assert!(e.to_string().contains("did not answer within 1 s"), "{e}");
        assert!(log[0].contains("gave up after"), "{log:?}");
    }

    #[test]
    fn responses_are_bounded() {
        let r = parse(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabcdef", 10).unwrap();
        assert_eq!((r.status, r.body.as_slice()), (200, &b"abc"[..]));
        assert!(parse(b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\nabc", 10).is_err());
        assert!(parse(b"HTTP/1.1 200 OK\r\n\r\n0123456789ab", 10).is_err());
        assert!(parse(b"garbage", 10).is_err());
    }

    #[test]
    fn enabled_by_dmi_or_command_line() {
        let d = tempfile::tempdir().unwrap();
        assert!(!enabled(d.path(), "quiet"));
        assert!(enabled(d.path(), "quiet keelson.datasource=imds"));
        std::fs::create_dir_all(d.path().join("class/dmi/id")).unwrap();
        std::fs::write(d.path().join("class/dmi/id/sys_vendor"), "Amazon EC2\n").unwrap();
        assert!(enabled(d.path(), ""));
    }
}
