//! Adoption: what a restarted sysd does with the containers the previous one left. init kept
//! their log pipes (the FD store) and saw how orphans ended; the binary hands both over as an
//! [`Inheritance`]. At boot each leftover is decided by evidence (`keelson_runtime::adopt`):
//! adopted (its task resumes it in `running`), ended while no sysd ran (its task hands that
//! exit to the restart policy), or refused (an `adopt-refused` event, its cgroup killed, a
//! fresh start). Leftovers no service claims are removed as before.

use std::collections::{BTreeMap, VecDeque};
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keelson_common::notify::Exit;
use keelson_runtime::adopt::{self, Record, Refused, Verdict};
use keelson_runtime::netplug::{Endpoint, ANNOTATION};
use keelson_runtime::Leftover;
use tokio::sync::watch;

/// Keeps descriptors outside sysd (init's FD store), so they outlive it.
pub trait FdKeeper: Send + Sync {
    /// Keeps `fd` as `name` (replacing one of that name).
    fn keep(&self, name: &str, fd: OwnedFd);
    /// Closes the kept descriptor `name`.
    fn forget(&self, name: &str);
}

/// The name a service's output pipe is kept under.
pub fn fd_name(service: &str, stream: keelson_common::api::Stream) -> String {
    let stream = match stream {
        keelson_common::api::Stream::Stdout => "stdout",
        keelson_common::api::Stream::Stderr => "stderr",
    };
    format!("{service}/{stream}")
}

/// The exits of orphans init reported (from before this sysd, and live): how an adopted
/// container ended, since it is not sysd's child.
#[derive(Debug)]
pub struct Exits {
    seen: Mutex<VecDeque<Exit>>,
    changed: watch::Sender<u64>,
}

impl Default for Exits {
    fn default() -> Self {
        Exits {
            seen: Mutex::new(VecDeque::new()),
            changed: watch::channel(0).0,
        }
    }
}

impl Exits {
    pub fn push(&self, exit: Exit) {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        if seen.len() == keelson_common::notify::MAX_EXITS {
            seen.pop_front();
        }
        seen.push_back(exit);
        drop(seen);
        self.changed.send_modify(|n| *n += 1);
    }

    pub fn all(&self) -> Vec<Exit> {
        let seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        seen.iter().copied().collect()
    }

    fn find(&self, pid: i32, after_us: u64) -> Option<Exit> {
        let seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        seen.iter()
            .rev()
            .find(|e| e.pid == pid && e.at_us >= after_us)
            .copied()
    }

    /// Waits (at most `timeout`) for init's report of `pid` reaped after `after_us`.
    pub async fn wait_for(&self, pid: i32, after_us: u64, timeout: Duration) -> Option<Exit> {
        let mut changed = self.changed.subscribe();
        let wait = async {
            loop {
                if let Some(e) = self.find(pid, after_us) {
                    return e;
                }
                if changed.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
        };
        tokio::time::timeout(timeout, wait).await.ok()
    }
}

/// What a restarted sysd got from init: the descriptors it kept, by name, and the exits it saw.
pub struct Inheritance {
    pub fds: BTreeMap<String, OwnedFd>,
    pub exits: Arc<Exits>,
    /// Where to keep the output pipes of what this sysd starts (`None`: nowhere, as when sysd
    /// runs without init; nothing can be adopted after it).
    pub keeper: Option<Arc<dyn FdKeeper>>,
}

impl Default for Inheritance {
    fn default() -> Self {
        Inheritance {
            fds: BTreeMap::new(),
            exits: Arc::new(Exits::default()),
            keeper: None,
        }
    }
}

/// A container to supervise again.
pub(crate) struct Adopted {
    pub record: Record,
    pub pidfd: OwnedFd,
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
    /// The pid of the container whose network namespace it joined (`network = "service:X"`).
    pub joined_pid: Option<i32>,
    /// Where it is on the bridge (`network = "bridge"`): taken back before it is supervised.
    pub endpoint: Option<Endpoint>,
    /// What it is, should the bridge refuse it back (then it is removed and started fresh).
    pub left: Box<Leftover>,
}

/// How a service's task begins.
pub(crate) enum Resume {
    Adopt(Box<Adopted>),
    /// Ended while no sysd ran: remove what is left, then treat the exit as seen.
    Exited(Box<Leftover>, Exit, u32),
    /// Remove what is left (kill its cgroup), then start fresh.
    Clean(Box<Leftover>),
}

/// One service's verdict, before the pidfd is taken, with a bridge service's endpoint (its
/// bundle's annotation: where its container is on the bridge).
pub(crate) fn verdict(
    left: &Leftover,
    spec_hash: &str,
    bridge: bool,
    fds: &BTreeMap<String, OwnedFd>,
    exits: &[Exit],
) -> (Verdict, Option<Endpoint>) {
    use keelson_common::api::Stream;
    let Some(record) = left.record.clone() else {
        let why = Refused::Corrupt {
            path: format!("{} (bundle)", left.id.as_deref().unwrap_or(&left.service)).into(),
            why: "no adopt.json".into(),
        };
        return (Verdict::Refused(why), None);
    };
    let logs_back = [Stream::Stdout, Stream::Stderr]
        .iter()
        .all(|s| fds.contains_key(&fd_name(&left.service, *s)));
    let verdict = adopt::decide(
        record,
        std::path::Path::new("/proc"),
        &left.bundle_hash,
        spec_hash,
        logs_back,
        exits,
    );
    if !bridge || !matches!(verdict, Verdict::Adopt(_)) {
        return (verdict, None);
    }
    match endpoint(left) {
        Ok(ep) => (verdict, Some(ep)),
        Err(why) => (Verdict::Refused(Refused::NoEndpoint(why)), None),
    }
}

/// A bridge leftover's endpoint, as its bundle's annotation says.
fn endpoint(left: &Leftover) -> Result<Endpoint, String> {
    let text = left
        .endpoint
        .as_deref()
        .ok_or_else(|| format!("no {ANNOTATION} annotation"))?;
    let ep: Endpoint = serde_json::from_str(text).map_err(|e| format!("{ANNOTATION}: {e}"))?;
    if ep.service != left.service {
        return Err(format!(
            "{ANNOTATION} names service `{}`, not `{}`",
            ep.service, left.service
        ));
    }
    Ok(ep)
}
