//! Real observability peers for the metrics and log forwarding tests and benchmarks: Debian's
//! Prometheus (scraping a target, queried through its HTTP API) and rsyslog (receiving over
//! TCP or TLS, writing `%app-name% %msgid% %structured-data% %msg%` lines to a file). Both run
//! wherever a [`Place`] says: the calling thread's own network namespace ([`Here`], the host
//! tests), or a QEMU guest's (the scenarios).

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::tools;

/// A network namespace the peers run and are reached in.
pub trait Place {
    /// A command running `program` there.
    fn command(&self, program: &Path) -> Command;
    /// Runs `f` there (a connection, a request).
    fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T;
}

/// The calling thread's namespace.
#[derive(Debug, Clone, Copy)]
pub struct Here;

impl Place for Here {
    fn command(&self, program: &Path) -> Command {
        Command::new(program)
    }
    fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        f()
    }
}

/// A GET over plain HTTP/1.0 from the calling thread; (status, body).
pub fn http_get(addr: &str, path: &str) -> io::Result<(u16, String)> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    Ok((status, body.to_string()))
}

fn wait_port<P: Place>(place: &P, addr: &str, what: &str, log: &Path) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if place.run(|| TcpStream::connect(addr).is_ok()) {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!(
        "{what} did not start listening on {addr}\n--- {what} ---\n{}",
        std::fs::read_to_string(log).unwrap_or_default()
    );
}

fn urlencode(q: &str) -> String {
    q.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' | b'.' | b'-' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A child process killed (and waited for) on drop.
#[derive(Debug)]
struct Peer(Child);

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Prometheus scraping one target every second; killed on drop.
#[derive(Debug)]
pub struct Prometheus {
    _child: Peer,
    pub addr: String,
    log: PathBuf,
}

impl Prometheus {
    /// Started in `dir`, listening on `listen`, scraping `target` (job `keelson`).
    pub fn start<P: Place>(place: &P, dir: &Path, listen: &str, target: &str) -> Prometheus {
        Prometheus::start_with(place, dir, listen, target, "")
    }

    /// Scraping over HTTPS: the target's certificate checked against `ca`, and `client` (a
    /// certificate and its key, PEM files) presented when given.
    pub fn start_https<P: Place>(
        place: &P,
        dir: &Path,
        listen: &str,
        target: &str,
        ca: &Path,
        client: Option<(&Path, &Path)>,
    ) -> Prometheus {
        let mut extra = format!(
            "    scheme: https\n    tls_config:\n      ca_file: {}\n",
            ca.display()
        );
        if let Some((cert, key)) = client {
            extra.push_str(&format!(
                "      cert_file: {}\n      key_file: {}\n",
                cert.display(),
                key.display()
            ));
        }
        Prometheus::start_with(place, dir, listen, target, &extra)
    }

    fn start_with<P: Place>(
        place: &P,
        dir: &Path,
        listen: &str,
        target: &str,
        job_extra: &str,
    ) -> Prometheus {
        std::fs::create_dir_all(dir).unwrap();
        let conf = dir.join("prometheus.yml");
        std::fs::write(
            &conf,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n  - job_name: keelson\n{job_extra}    static_configs:\n      - targets: ['{target}']\n"
            ),
        )
        .unwrap();
        let log = dir.join("prometheus.log");
        let mut cmd = place.command(&tools::resolve("prometheus").expect("prometheus"));
        cmd.arg(format!("--config.file={}", conf.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("tsdb").display()
            ))
            .arg(format!("--web.listen-address={listen}"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        let child = cmd.spawn().expect("starting prometheus");
        let p = Prometheus {
            _child: Peer(child),
            addr: listen.to_string(),
            log,
        };
        wait_port(place, listen, "prometheus", &p.log);
        p
    }

    /// The value of the single series `q` selects, once Prometheus has it (a minute at most).
    pub fn value<P: Place>(&self, place: &P, q: &str) -> f64 {
        let deadline = Instant::now() + Duration::from_secs(90);
        let path = format!("/api/v1/query?query={}", urlencode(q));
        loop {
            let (status, body) = place
                .run(|| http_get(&self.addr, &path))
                .unwrap_or_default();
            if status == 200 {
                let v: Value = serde_json::from_str(&body).unwrap();
                let result = &v["data"]["result"];
                if let Some(first) = result.get(0) {
                    assert_eq!(result.as_array().map_or(0, Vec::len), 1, "{q}: {body}");
                    return first["value"][1].as_str().unwrap().parse().unwrap();
                }
            }
            assert!(
                Instant::now() < deadline,
                "Prometheus has no {q} ({status} {body})\n--- prometheus ---\n{}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

/// rsyslogd receiving on `127.0.0.1:port` (plain TCP, or TLS through rsyslog-gnutls).
#[derive(Debug)]
pub struct Rsyslog {
    dir: PathBuf,
    conf: PathBuf,
    port: u16,
    child: Option<Peer>,
}

impl Rsyslog {
    /// Started; `tls` is `(ca.pem, cert.pem, key.pem)`.
    pub fn start<P: Place>(
        place: &P,
        dir: &Path,
        port: u16,
        tls: Option<(&Path, &Path, &Path)>,
    ) -> Rsyslog {
        std::fs::create_dir_all(dir).unwrap();
        let d = dir.display();
        let (global, module) = match tls {
            None => (String::new(), "module(load=\"imtcp\")".to_string()),
            Some((ca, cert, key)) => (
                format!(
                    "global(DefaultNetstreamDriver=\"gtls\" DefaultNetstreamDriverCAFile=\"{}\" DefaultNetstreamDriverCertFile=\"{}\" DefaultNetstreamDriverKeyFile=\"{}\")\n",
                    ca.display(),
                    cert.display(),
                    key.display()
                ),
                "module(load=\"imtcp\" StreamDriver.Name=\"gtls\" StreamDriver.Mode=\"1\" StreamDriver.AuthMode=\"anon\")".to_string(),
            ),
        };
        let conf = dir.join("rsyslog.conf");
        std::fs::write(
            &conf,
            format!(
                "global(workDirectory=\"{d}\")\n{global}{module}\ninput(type=\"imtcp\" port=\"{port}\" address=\"127.0.0.1\")\ntemplate(name=\"fmt\" type=\"string\" string=\"%app-name% %msgid% %structured-data% %msg%\\n\")\naction(type=\"omfile\" file=\"{d}/out.log\" template=\"fmt\")\n"
            ),
        )
        .unwrap();
        let mut r = Rsyslog {
            dir: dir.to_path_buf(),
            conf,
            port,
            child: None,
        };
        r.restart(place);
        r
    }

    /// Starts it again after [`Rsyslog::stop`].
    pub fn restart<P: Place>(&mut self, place: &P) {
        let log = self.dir.join("rsyslogd.log");
        let mut cmd = place.command(&tools::resolve("rsyslogd").expect("rsyslogd"));
        cmd.arg("-n")
            .arg("-f")
            .arg(&self.conf)
            .arg("-i")
            .arg(self.dir.join("rsyslogd.pid"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        let child = cmd.spawn().expect("starting rsyslogd");
        self.child = Some(Peer(child));
        wait_port(place, &format!("127.0.0.1:{}", self.port), "rsyslogd", &log);
    }

    /// A clean stop (SIGTERM, then wait).
    pub fn stop(&mut self) {
        if let Some(mut peer) = self.child.take() {
            // SAFETY: kill(2) with integer arguments.
            unsafe { libc::kill(peer.0.id() as i32, libc::SIGTERM) };
            let _ = peer.0.wait();
        }
    }

    /// The pid of the running rsyslogd (for its CPU time).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|p| p.0.id())
    }

    /// What it wrote so far, line by line.
    pub fn lines(&self) -> Vec<String> {
        std::fs::read_to_string(self.dir.join("out.log"))
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// Its lines once `ok` accepts them; fails the test after `timeout` with what it has.
    pub fn wait_for(
        &self,
        what: &str,
        timeout: Duration,
        mut ok: impl FnMut(&[String]) -> bool,
    ) -> Vec<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let lines = self.lines();
            if ok(&lines) {
                return lines;
            }
            assert!(
                Instant::now() < deadline,
                "rsyslog never got {what}; it has ({} lines):\n{}\n--- rsyslogd ---\n{}",
                lines.len(),
                lines[lines.len().saturating_sub(40)..].join("\n"),
                std::fs::read_to_string(self.dir.join("rsyslogd.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}
