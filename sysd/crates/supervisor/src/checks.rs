//! Readiness and health probes. `exec` runs in the container through the runtime helper;
//! `tcp` and `http` connect from the service's own network namespace (a short-lived thread
//! enters it with setns, so the tokio thread never changes namespace).

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use keelson_runtime::Runtime;
use keelson_spec::Probe;

/// Where the probe runs.
pub struct Target<'a> {
    pub runtime: &'a Runtime,
    pub container_id: &'a str,
    /// Container init pid when the service has its own network namespace.
    pub netns_pid: Option<i32>,
}

/// Runs the probe once; `Ok` means it passed, `Err` says why not.
pub async fn run(probe: &Probe, target: &Target<'_>, timeout: Duration) -> Result<()> {
    match probe {
        Probe::Exec(argv) => {
            let out = target
                .runtime
                .exec(target.container_id, argv, timeout)
                .await?;
            if out.timed_out {
                bail!("{} did not finish within {timeout:?}", argv[0]);
            }
            if out.code != 0 {
                let detail: String = out.output.trim().chars().take(200).collect();
                let detail = if detail.is_empty() {
                    String::new()
                } else {
                    format!(": {detail}")
                };
                bail!("{} exited {}{detail}", argv[0], out.code);
            }
            Ok(())
        }
        Probe::Tcp { host, port } => {
            let (host, port) = (host.clone(), *port);
            in_netns(target.netns_pid, timeout, move || {
                connect(&host, port, timeout).map(drop)
            })
            .await
        }
        Probe::Http { host, port, path } => {
            let (host, port, path) = (host.clone(), *port, path.clone());
            in_netns(target.netns_pid, timeout, move || {
                http_get(&host, port, &path, timeout)
            })
            .await
        }
    }
}

fn connect(host: &str, port: u16, timeout: Duration) -> Result<TcpStream> {
    let addr = (host, port)
        .to_socket_addrs()
        .with_context(|| format!("resolving {host}"))?
        .next()
        .with_context(|| format!("{host} has no address"))?;
    let stream = TcpStream::connect_timeout(&addr, timeout)
        .with_context(|| format!("connecting to {addr}"))?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    Ok(stream)
}

fn http_get(host: &str, port: u16, path: &str, timeout: Duration) -> Result<()> {
    let mut stream = connect(host, port, timeout)?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {host}\r\nUser-Agent: keelson-sysd\r\nConnection: close\r\n\r\n")?;
    let mut head = [0u8; 64];
    let mut n = 0;
    while n < 12 {
        let r = stream
            .read(&mut head[n..])
            .context("reading the response")?;
        if r == 0 {
            break;
        }
        n += r;
    }
    let line = String::from_utf8_lossy(&head[..n]);
    let code: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| {
            format!(
                "not an HTTP response: {:?}",
                line.lines().next().unwrap_or("")
            )
        })?;
    if (200..400).contains(&code) {
        Ok(())
    } else {
        bail!("GET {path} answered {code}")
    }
}

/// Runs a blocking probe on its own thread, inside the network namespace of `pid` if given.
async fn in_netns<F>(pid: Option<i32>, timeout: Duration, probe: F) -> Result<()>
where
    F: FnOnce() -> Result<()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("probe".into())
        .spawn(move || {
            let result = enter_netns(pid).and_then(|()| probe());
            let _ = tx.send(result);
        })
        .context("starting a probe thread")?;
    match tokio::time::timeout(timeout + Duration::from_millis(500), rx).await {
        Ok(Ok(result)) => result,
        Ok(Err(_)) => bail!("probe thread ended without an answer"),
        Err(_) => bail!("no answer within {timeout:?}"),
    }
}

fn enter_netns(pid: Option<i32>) -> Result<()> {
    let Some(pid) = pid else { return Ok(()) };
    let path = format!("/proc/{pid}/ns/net");
    let ns = std::fs::File::open(&path).with_context(|| format!("opening {path}"))?;
    // Only this probe thread changes namespace; it ends right after the probe.
    nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET)
        .with_context(|| format!("entering {path}"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_probe_reads_the_status() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = std::thread::spawn(move || {
            for answer in [
                "HTTP/1.1 204 No Content\r\n\r\n",
                "HTTP/1.0 503 Busy\r\n\r\n",
            ] {
                let (mut s, _) = listener.accept().unwrap();
                // Read the whole request: closing with unread data would reset the connection.
                let mut request = Vec::new();
                let mut buf = [0u8; 512];
                while !request.ends_with(b"\r\n\r\n") {
                    let n = s.read(&mut buf).unwrap();
                    assert!(n > 0, "request cut short");
                    request.extend_from_slice(&buf[..n]);
                }
                s.write_all(answer.as_bytes()).unwrap();
            }
        });
        let t = Duration::from_secs(2);
        http_get("127.0.0.1", port, "/healthz", t).unwrap();
        let e = http_get("127.0.0.1", port, "/healthz", t).unwrap_err();
        assert_eq!(e.to_string(), "GET /healthz answered 503");
        server.join().unwrap();
        assert!(connect("127.0.0.1", port, t).is_err());
    }
}
