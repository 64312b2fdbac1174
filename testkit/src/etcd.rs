//! A real etcd (Debian's `etcd-server`, 3.4) for host tests: one member on the loopback of the
//! calling thread's network namespace (see [`crate::registry::private_netns`]), data in a
//! temporary directory, killed on drop.

use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

/// A running etcd member.
pub struct Etcd {
    /// `http://127.0.0.1:<port>`.
    pub endpoint: String,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Etcd {
    /// Starts a single-member cluster with its client port on `127.0.0.1:client_port` and waits
    /// until `/health` says it is serving.
    pub fn start(client_port: u16, peer_port: u16) -> Etcd {
        let dir = tempfile::tempdir().expect("temporary directory for etcd");
        let endpoint = format!("http://127.0.0.1:{client_port}");
        let peer = format!("http://127.0.0.1:{peer_port}");
        let log = std::fs::File::create(dir.path().join("etcd.log")).expect("etcd log");
        let child = crate::tools::command("etcd")
            .arg("--name=test")
            .arg(format!("--data-dir={}", dir.path().join("data").display()))
            .arg(format!("--listen-client-urls={endpoint}"))
            .arg(format!("--advertise-client-urls={endpoint}"))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster=test={peer}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting etcd");
        let mut etcd = Etcd {
            endpoint,
            child,
            _dir: dir,
        };
        etcd.wait_healthy();
        etcd
    }

    fn wait_healthy(&mut self) {
        let addr = self.endpoint.trim_start_matches("http://").to_owned();
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("etcd exited ({status}):\n{}", self.log());
            }
            if let Ok(body) = get(&addr, "/health") {
                if body.contains("\"true\"") {
                    return;
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("etcd did not become healthy within 30 s:\n{}", self.log());
    }

    /// The member's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("etcd.log")).unwrap_or_default()
    }

    /// Its data directory.
    pub fn data_dir(&self) -> &Path {
        self._dir.path()
    }
}

/// One plain HTTP/1.0 GET (the health probe; the code under test has its own client).
fn get(addr: &str, path: &str) -> std::io::Result<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
