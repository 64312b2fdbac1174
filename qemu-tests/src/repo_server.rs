//! A static-file HTTP server for update repositories that can stop at a chosen byte of a chosen
//! file, so a scenario cuts a node's power at an exact point of an update instead of after a
//! guessed delay.
//!
//! It serves a directory like busybox httpd does (GET, `Range: bytes=N-`, one request per
//! connection), from a listener bound inside a guest's namespace (`127.0.0.1:PORT` there is
//! `10.0.2.2:PORT` for the guest). Two kinds of marks, set and cleared while it runs:
//!
//! - [`RepoServer::stall`]: once `after` bytes of a file whose name ends with `suffix` have been
//!   sent, the server says so on [`RepoServer::wait`]'s channel and sends nothing more on that
//!   connection (it holds it open until the server is dropped). The client is then in the middle
//!   of that download, with everything before it done.
//! - [`RepoServer::notify_sent`]: the last byte of such a file has been written to the socket.
//!
//! Written here rather than taken from a crate: the stall-at-byte hook is the whole point, and no
//! small static server has one; the protocol part is the 40 lines below.

use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::Guest;

/// What a mark reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reached {
    /// A stall mark: the file and how many bytes of it were sent.
    Stalled { file: String, sent: u64 },
    /// A notify mark: the whole file was sent.
    Sent { file: String },
}

#[derive(Debug)]
struct Mark {
    suffix: String,
    /// `Some(n)`: stall after n bytes; `None`: tell when the whole file is sent.
    stall_after: Option<u64>,
}

struct Shared {
    root: PathBuf,
    marks: Mutex<Vec<Mark>>,
    events: Mutex<Sender<Reached>>,
    stop: AtomicBool,
}

/// The server; stops (and releases stalled connections) when dropped.
pub struct RepoServer {
    shared: Arc<Shared>,
    events: Receiver<Reached>,
    addr: SocketAddr,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RepoServer {
    /// Serves `dir` on `127.0.0.1:port` inside `g`'s namespace.
    pub fn serve(g: &Guest, port: u16, dir: &Path) -> Result<RepoServer> {
        let listener = g
            .run_in_netns(|| TcpListener::bind(("127.0.0.1", port)))
            .with_context(|| format!("binding 127.0.0.1:{port} in the guest's namespace"))?;
        let addr = listener.local_addr()?;
        listener.set_nonblocking(true)?;
        let (tx, rx) = channel();
        let shared = Arc::new(Shared {
            root: dir.to_path_buf(),
            marks: Mutex::new(Vec::new()),
            events: Mutex::new(tx),
            stop: AtomicBool::new(false),
        });
        let s = shared.clone();
        let thread = std::thread::spawn(move || accept_loop(listener, s));
        Ok(RepoServer {
            shared,
            events: rx,
            addr,
            thread: Some(thread),
        })
    }

    /// The listening address (in the guest's namespace).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stall the next download of a file ending with `suffix` after `after` bytes (once).
    pub fn stall(&self, suffix: &str, after: u64) {
        self.shared.marks.lock().unwrap().push(Mark {
            suffix: suffix.to_string(),
            stall_after: Some(after),
        });
    }

    /// Report when a file ending with `suffix` has been sent whole (once).
    pub fn notify_sent(&self, suffix: &str) {
        self.shared.marks.lock().unwrap().push(Mark {
            suffix: suffix.to_string(),
            stall_after: None,
        });
    }

    /// The next mark reached, within `timeout`.
    pub fn wait(&self, timeout: Duration) -> Result<Reached> {
        match self.events.recv_timeout(timeout) {
            Ok(r) => Ok(r),
            Err(RecvTimeoutError::Timeout) => bail!(
                "no mark reached within {}s (marks left: {:?})",
                timeout.as_secs(),
                self.shared.marks.lock().unwrap()
            ),
            Err(RecvTimeoutError::Disconnected) => bail!("the repository server stopped"),
        }
    }
}

impl Drop for RepoServer {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    let mut workers = Vec::new();
    while !shared.stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, _)) => {
                let s = shared.clone();
                workers.push(std::thread::spawn(move || {
                    if let Err(e) = answer(stream, &s) {
                        eprintln!("repo server: {e:#}");
                    }
                }));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => {
                eprintln!("repo server: accept: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
    for w in workers {
        let _ = w.join();
    }
}

/// The first mark matching `file`, removed from the list.
fn take_mark(shared: &Shared, file: &str) -> Option<Mark> {
    let mut marks = shared.marks.lock().unwrap();
    let i = marks.iter().position(|m| file.ends_with(&m.suffix))?;
    Some(marks.remove(i))
}

fn answer(stream: TcpStream, shared: &Shared) -> Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request = String::new();
    reader.read_line(&mut request)?;
    let mut from = 0u64;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line.trim().is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            if name.trim().eq_ignore_ascii_case("range") {
                let v = value.trim();
                from = v
                    .strip_prefix("bytes=")
                    .and_then(|r| r.strip_suffix('-'))
                    .and_then(|n| n.parse().ok())
                    .with_context(|| format!("unsupported range {v:?}"))?;
            }
        }
    }
    let mut out = stream;
    let mut parts = request.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    let file = match resolve(&shared.root, path) {
        Some(f) if method == "GET" && f.is_file() => f,
        _ => {
            write!(
                out,
                "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            )?;
            return Ok(());
        }
    };
    let name = path.rsplit('/').next().unwrap_or("").to_string();
    let mut f = std::fs::File::open(&file)?;
    let len = f.metadata()?.len();
    let from = from.min(len);
    if from > 0 {
        f.seek(SeekFrom::Start(from))?;
        write!(
            out,
            "HTTP/1.1 206 Partial Content\r\nContent-Range: bytes {from}-{}/{len}\r\n",
            len.saturating_sub(1)
        )?;
    } else {
        write!(out, "HTTP/1.1 200 OK\r\n")?;
    }
    write!(
        out,
        "Content-Length: {}\r\nConnection: close\r\n\r\n",
        len - from
    )?;
    let mark = take_mark(shared, &name);
    let stall_at = mark.as_ref().and_then(|m| m.stall_after);
    let mut sent = from;
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let mut want = buf.len() as u64;
        if let Some(at) = stall_at {
            if sent >= at {
                let _ = out.flush();
                let _ = shared.events.lock().unwrap().send(Reached::Stalled {
                    file: name.clone(),
                    sent,
                });
                // Hold the connection, sending nothing, until the server goes.
                while !shared.stop.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(50));
                }
                return Ok(());
            }
            want = want.min(at - sent);
        }
        let n = f.read(&mut buf[..want as usize])?;
        if n == 0 {
            break;
        }
        out.write_all(&buf[..n])?;
        sent += n as u64;
    }
    out.flush()?;
    if matches!(
        mark,
        Some(Mark {
            stall_after: None,
            ..
        })
    ) {
        let _ = shared
            .events
            .lock()
            .unwrap()
            .send(Reached::Sent { file: name });
    }
    Ok(())
}

/// `path` under `root`, refusing anything that is not a plain relative path.
fn resolve(root: &Path, path: &str) -> Option<PathBuf> {
    let rel = Path::new(path.trim_start_matches('/'));
    if rel.components().all(|c| matches!(c, Component::Normal(_))) {
        Some(root.join(rel))
    } else {
        None
    }
}
