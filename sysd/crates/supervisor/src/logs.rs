//! Service output capture. Each container's stdout and stderr are pipes whose read ends sysd
//! drains continuously, so a service never blocks on its output however slow the disk is:
//! lines go to an in-memory tail (for `keelctl logs`), to live followers, and to
//! `/var/log/keelson/SERVICE.log`, rotated by size. When the disk write fails the line is still
//! kept in memory and the pipe keeps draining.

use std::collections::{BTreeMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use keelson_common::api::{format_time_ms, now_ms, LogLine, Stream};
use tokio::io::AsyncReadExt;
use tokio::sync::broadcast;

/// Lines kept in memory per service.
const TAIL: usize = 1000;
/// A line longer than this is split (a service printing without newlines cannot grow memory).
const MAX_LINE: usize = 16 * 1024;

/// Rotation policy of the log files.
#[derive(Debug, Clone)]
pub struct Rotation {
    pub max_bytes: u64,
    /// Rotated files kept (`.1` newest).
    pub keep: u32,
}

impl Default for Rotation {
    fn default() -> Self {
        Rotation {
            max_bytes: 1 << 20,
            keep: 3,
        }
    }
}

struct Store {
    tail: VecDeque<LogLine>,
    tx: broadcast::Sender<LogLine>,
    file: Option<File>,
    written: u64,
    path: PathBuf,
    file_error_reported: bool,
}

/// Where else every line goes (log forwarding); must not block.
pub trait LogTap: Send + Sync {
    fn line(&self, service: &str, line: &LogLine);
}

/// Every service's log.
pub struct LogHub {
    dir: PathBuf,
    rotation: Rotation,
    stores: Mutex<BTreeMap<String, Arc<Mutex<Store>>>>,
    tap: Mutex<Option<Arc<dyn LogTap>>>,
}

impl LogHub {
    pub fn new(dir: PathBuf, rotation: Rotation) -> Self {
        LogHub {
            dir,
            rotation,
            stores: Mutex::new(BTreeMap::new()),
            tap: Mutex::new(None),
        }
    }

    pub fn set_tap(&self, tap: Option<Arc<dyn LogTap>>) {
        *self.tap.lock().unwrap_or_else(|p| p.into_inner()) = tap;
    }

    fn store(&self, service: &str) -> Arc<Mutex<Store>> {
        let mut stores = self.stores.lock().unwrap_or_else(|p| p.into_inner());
        stores
            .entry(service.to_string())
            .or_insert_with(|| {
                let path = self.dir.join(format!("{service}.log"));
                Arc::new(Mutex::new(Store {
                    tail: VecDeque::new(),
                    tx: broadcast::channel(1024).0,
                    written: std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0),
                    file: None,
                    path,
                    file_error_reported: false,
                }))
            })
            .clone()
    }

    /// Forgets a removed service (its files stay on disk).
    pub fn forget(&self, service: &str) {
        self.stores
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(service);
    }

    /// Kept lines (the last `tail`, or all) and, when following, a live receiver.
    pub fn read(
        &self,
        service: &str,
        tail: Option<usize>,
        follow: bool,
    ) -> (Vec<LogLine>, Option<broadcast::Receiver<LogLine>>) {
        let store = self.store(service);
        let guard = store.lock().unwrap_or_else(|p| p.into_inner());
        let skip = tail.map_or(0, |n| guard.tail.len().saturating_sub(n));
        let lines = guard.tail.iter().skip(skip).cloned().collect();
        (lines, follow.then(|| guard.tx.subscribe()))
    }

    /// Records one line (also used by sysd for its own notes about a service).
    pub fn push(&self, service: &str, stream: Stream, line: String) {
        let store = self.store(service);
        let mut s = store.lock().unwrap_or_else(|p| p.into_inner());
        let entry = LogLine {
            time_ms: now_ms(),
            stream,
            line,
        };
        s.write_file(&self.dir, &self.rotation, &entry);
        let tap = self.tap.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if let Some(tap) = tap {
            tap.line(service, &entry);
        }
        if s.tail.len() == TAIL {
            s.tail.pop_front();
        }
        s.tail.push_back(entry.clone());
        let _ = s.tx.send(entry);
    }

    /// Drains a pipe until its write end is closed everywhere (the container is gone).
    pub fn capture(self: &Arc<Self>, service: &str, stream: Stream, pipe: OwnedFd) {
        let hub = Arc::clone(self);
        let service = service.to_string();
        tokio::spawn(async move {
            let mut rx = match tokio::net::unix::pipe::Receiver::from_owned_fd(pipe) {
                Ok(rx) => rx,
                Err(err) => {
                    tracing::warn!("sysd: {service}: cannot read its output: {err}");
                    return;
                }
            };
            let mut buf = Vec::with_capacity(4096);
            let mut chunk = [0u8; 8192];
            loop {
                let n = match rx.read(&mut chunk).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                buf.extend_from_slice(&chunk[..n]);
                while let Some(i) = buf.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = buf.drain(..=i).collect();
                    hub.push(&service, stream, text(&line[..line.len() - 1]));
                }
                while buf.len() >= MAX_LINE {
                    let part: Vec<u8> = buf.drain(..MAX_LINE).collect();
                    hub.push(&service, stream, text(&part));
                }
            }
            if !buf.is_empty() {
                hub.push(&service, stream, text(&buf));
            }
        });
    }
}

fn text(bytes: &[u8]) -> String {
    let s = String::from_utf8_lossy(bytes);
    s.strip_suffix('\r').unwrap_or(&s).to_string()
}

impl Store {
    fn write_file(&mut self, dir: &Path, rotation: &Rotation, entry: &LogLine) {
        let stream = match entry.stream {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        };
        let record = format!(
            "{} {stream} {}\n",
            format_time_ms(entry.time_ms),
            entry.line
        );
        if self.written + record.len() as u64 > rotation.max_bytes {
            self.rotate(rotation);
        }
        if self.file.is_none() {
            let opened = std::fs::create_dir_all(dir).and_then(|()| {
                OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&self.path)
            });
            match opened {
                Ok(f) => self.file = Some(f),
                Err(err) => return self.report(err),
            }
        }
        if let Some(file) = &mut self.file {
            match file.write_all(record.as_bytes()) {
                Ok(()) => {
                    self.written += record.len() as u64;
                    self.file_error_reported = false;
                }
                Err(err) => {
                    self.file = None;
                    self.report(err);
                }
            }
        }
    }

    fn rotate(&mut self, rotation: &Rotation) {
        self.file = None;
        let name = |n: u32| PathBuf::from(format!("{}.{n}", self.path.display()));
        if rotation.keep == 0 {
            let _ = std::fs::remove_file(&self.path);
        } else {
            for n in (1..rotation.keep).rev() {
                let _ = std::fs::rename(name(n), name(n + 1));
            }
            let _ = std::fs::rename(&self.path, name(1));
        }
        self.written = 0;
    }

    fn report(&mut self, err: std::io::Error) {
        if !self.file_error_reported {
            tracing::warn!(
                "sysd: cannot write {}: {err} (lines kept in memory only)",
                self.path.display()
            );
            self.file_error_reported = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_follow_and_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let hub = LogHub::new(
            dir.path().to_path_buf(),
            Rotation {
                max_bytes: 200,
                keep: 2,
            },
        );
        let (_, rx) = hub.read("web", None, true);
        let mut rx = rx.unwrap();
        for i in 0..20 {
            hub.push("web", Stream::Stdout, format!("line {i}"));
        }
        assert_eq!(rx.try_recv().unwrap().line, "line 0");
        let (last, _) = hub.read("web", Some(2), false);
        assert_eq!(
            last.iter().map(|l| l.line.as_str()).collect::<Vec<_>>(),
            ["line 18", "line 19"]
        );
        let current = std::fs::read_to_string(dir.path().join("web.log")).unwrap();
        assert!(current.ends_with(" stdout line 19\n"), "{current}");
        assert!(std::fs::metadata(dir.path().join("web.log")).unwrap().len() <= 200);
        assert!(dir.path().join("web.log.1").exists());
        assert!(dir.path().join("web.log.2").exists());
        assert!(!dir.path().join("web.log.3").exists());
    }

    #[test]
    fn the_tap_sees_every_line() {
        struct Seen(Mutex<Vec<String>>);
        impl LogTap for Seen {
            fn line(&self, service: &str, line: &LogLine) {
                self.0
                    .lock()
                    .unwrap()
                    .push(format!("{service}: {}", line.line));
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let hub = LogHub::new(dir.path().to_path_buf(), Rotation::default());
        let seen = Arc::new(Seen(Mutex::new(Vec::new())));
        hub.push("a", Stream::Stdout, "before".into());
        hub.set_tap(Some(seen.clone()));
        hub.push("a", Stream::Stdout, "one".into());
        hub.push("b", Stream::Stderr, "two".into());
        hub.set_tap(None);
        hub.push("a", Stream::Stdout, "after".into());
        assert_eq!(*seen.0.lock().unwrap(), ["a: one", "b: two"]);
    }

    #[tokio::test]
    async fn capture_splits_lines_and_flushes_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let hub = Arc::new(LogHub::new(dir.path().to_path_buf(), Rotation::default()));
        let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
        let (_, live) = hub.read("svc", None, true);
        let mut live = live.unwrap();
        hub.capture("svc", Stream::Stderr, r);
        let mut w = File::from(w);
        w.write_all(b"one\r\ntwo\npartial").unwrap();
        drop(w);
        let mut got = Vec::new();
        for _ in 0..3 {
            got.push(live.recv().await.unwrap().line);
        }
        assert_eq!(got, ["one", "two", "partial"]);
    }
}
