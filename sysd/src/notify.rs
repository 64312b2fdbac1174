//! sysd's end of the notify channel to init (`keelson_common::notify`: a `SOCK_SEQPACKET`
//! socket on the fd named by `KEELSON_NOTIFY_FD`). sysd says `READY=1` once, `WATCHDOG=1` at a
//! quarter of the silence init allows (`KEELSON_WATCHDOG_USEC`) while init pets the hardware
//! watchdog, and `FDSTORE=1`/`FDSTOREREMOVE=1` as containers start and go (their log pipes,
//! so a next sysd reads on). At its start it receives what init kept for it: the stored
//! descriptors and the exits of orphans, up to `FDSTORE-END=1`; later exits arrive live.
//!
//! One writer task sends everything in order and waits for the socket when init's queue is
//! full; one reader task receives. The heartbeat is a task on sysd's current-thread runtime,
//! so it stops whenever that runtime stops turning (a blocked task, a deadlock, SIGSTOP):
//! exactly what should end in a reset.

use std::collections::BTreeMap;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use keelson_common::notify::{self, Message};
use keelson_supervisor::{Exits, FdKeeper, Inheritance};
use tokio::io::unix::AsyncFd;
use tokio::sync::{mpsc, oneshot};

/// Environment variable carrying how long sysd may be silent before init stops petting.
pub const WATCHDOG_ENV: &str = "KEELSON_WATCHDOG_USEC";
/// How long sysd waits for init's `FDSTORE-END=1` (init sends it right after the start).
const HANDOVER_WAIT: Duration = Duration::from_secs(5);

type Outgoing = (Message, Option<OwnedFd>);

/// The channel to init (inert for a sysd run by hand).
#[derive(Debug)]
pub struct Notifier {
    out: Option<mpsc::UnboundedSender<Outgoing>>,
    handover: Option<oneshot::Receiver<BTreeMap<String, OwnedFd>>>,
    exits: Arc<Exits>,
}

/// Keeps descriptors in init's FD store.
struct Keeper(mpsc::UnboundedSender<Outgoing>);

impl FdKeeper for Keeper {
    fn keep(&self, name: &str, fd: OwnedFd) {
        let _ = self
            .0
            .send((Message::FdStore { name: name.into() }, Some(fd)));
    }

    fn forget(&self, name: &str) {
        let _ = self
            .0
            .send((Message::FdStoreRemove { name: name.into() }, None));
    }
}

impl Notifier {
    /// Takes the channel init gave (once: the variable is removed). Inside the runtime.
    pub fn from_env() -> Notifier {
        let exits = Arc::new(Exits::default());
        let fd = std::env::var(notify::FD_ENV)
            .ok()
            .and_then(|v| v.parse::<i32>().ok());
        std::env::remove_var(notify::FD_ENV);
        let inert = |exits| Notifier {
            out: None,
            handover: None,
            exits,
        };
        let Some(fd) = fd.filter(|&fd| fd >= 3) else {
            return inert(exits);
        };
        // SAFETY: init opened this fd for us and nothing else in sysd knows or closes it; we
        // take ownership once (the variable is removed above).
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        if !notify::is_seqpacket(owned.as_fd()) {
            tracing::warn!(
                "notify: fd {fd} is not init's notify socket; not telling init anything"
            );
            return inert(exits);
        }
        // SAFETY: fcntl on an fd we own; only its status flags change.
        unsafe {
            let flags = libc::fcntl(owned.as_raw_fd(), libc::F_GETFL);
            if flags >= 0 {
                libc::fcntl(owned.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK);
            }
        }
        let interest = tokio::io::Interest::READABLE | tokio::io::Interest::WRITABLE;
        // SAFETY: `owned` is moved into the AsyncFd, which owns it for its whole lifetime.
        let sock = match unsafe { AsyncFd::register_with_interest(owned, interest) } {
            Ok(s) => Arc::new(s),
            Err(e) => {
                tracing::warn!("notify: cannot watch init's socket: {e}");
                return inert(exits);
            }
        };
        let (out, rx) = mpsc::unbounded_channel();
        tokio::spawn(write(Arc::clone(&sock), rx));
        let (done, handover) = oneshot::channel();
        tokio::spawn(read(sock, Arc::clone(&exits), done));
        Notifier {
            out: Some(out),
            handover: Some(handover),
            exits,
        }
    }

    /// What init kept for this sysd (waits for `FDSTORE-END=1`, at most a few seconds), and
    /// where to keep the pipes of what it starts.
    pub async fn inheritance(&mut self) -> Inheritance {
        let fds = match self.handover.take() {
            Some(rx) => match tokio::time::timeout(HANDOVER_WAIT, rx).await {
                Ok(Ok(fds)) => fds,
                _ => {
                    tracing::warn!(
                        "notify: init handed nothing over within {} s; nothing is adopted",
                        HANDOVER_WAIT.as_secs()
                    );
                    BTreeMap::new()
                }
            },
            None => BTreeMap::new(),
        };
        Inheritance {
            fds,
            exits: Arc::clone(&self.exits),
            keeper: self
                .out
                .clone()
                .map(|tx| Arc::new(Keeper(tx)) as Arc<dyn FdKeeper>),
        }
    }

    /// Starts the `WATCHDOG=1` heartbeat when init asked for one (`KEELSON_WATCHDOG_USEC`).
    pub fn heartbeat(&self) -> Option<Duration> {
        let silence = std::env::var(WATCHDOG_ENV)
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .map(Duration::from_micros)
            .filter(|d| !d.is_zero())?;
        let out = self.out.clone()?;
        let every = silence / 4;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                if out.send((Message::Watchdog, None)).is_err() {
                    tracing::warn!("watchdog: the channel to init is closed; heartbeat stopped");
                    return;
                }
            }
        });
        Some(every)
    }

    /// Sends `READY=1`.
    pub fn ready(&mut self) {
        if let Some(out) = &self.out {
            let _ = out.send((Message::Ready, None));
        }
    }
}

/// Sends every message in order, waiting while init's queue is full.
async fn write(sock: Arc<AsyncFd<OwnedFd>>, mut rx: mpsc::UnboundedReceiver<Outgoing>) {
    while let Some((msg, fd)) = rx.recv().await {
        loop {
            let sent = notify::send(sock.get_ref().as_fd(), &msg, fd.as_ref().map(|f| f.as_fd()));
            match sent {
                Ok(()) => break,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => match sock.writable().await
                {
                    Ok(mut guard) => guard.clear_ready(),
                    Err(e) => {
                        tracing::warn!("notify: {e}; no longer telling init anything");
                        return;
                    }
                },
                Err(e) => {
                    tracing::warn!(
                        "notify: cannot tell init {msg:?}: {e}; no longer telling init anything"
                    );
                    return;
                }
            }
        }
    }
}

/// Receives what init sends: the handover up to `FDSTORE-END=1`, then live exits.
async fn read(
    sock: Arc<AsyncFd<OwnedFd>>,
    exits: Arc<Exits>,
    done: oneshot::Sender<BTreeMap<String, OwnedFd>>,
) {
    let mut fds = BTreeMap::new();
    let mut done = Some(done);
    loop {
        let mut guard = match sock.readable().await {
            Ok(g) => g,
            Err(e) => {
                tracing::warn!("notify: {e}");
                return;
            }
        };
        loop {
            match notify::recv(sock.get_ref().as_fd()) {
                Ok(Some(r)) => match Message::parse(&r.bytes) {
                    Ok(Message::FdStore { name }) if done.is_some() => {
                        if let Some(fd) = r.fds.into_iter().next() {
                            fds.insert(name, fd);
                        }
                    }
                    Ok(Message::FdStoreEnd) => {
                        if let Some(d) = done.take() {
                            let _ = d.send(std::mem::take(&mut fds));
                        }
                    }
                    Ok(Message::Exit(e)) => exits.push(e),
                    Ok(other) => tracing::warn!("notify: unexpected from init: {other:?}"),
                    Err(e) => tracing::warn!("notify: {e}"),
                },
                Ok(None) => {
                    tracing::warn!("notify: init closed the channel");
                    return;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    guard.clear_ready();
                    break;
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::warn!("notify: {e}");
                    return;
                }
            }
        }
    }
}
