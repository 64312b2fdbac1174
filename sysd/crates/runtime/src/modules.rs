//! The gate for the root's kernel modules: init loads them (overlay, bridge, veth, nf_tables,
//! loop, 8021q, bonding, vfat, ...) in a child beside sysd's start and records the loader's
//! pid, then its summary, in the run directory ([`ROOT_MODULES_LOADING`],
//! [`ROOT_MODULES_LOADED`]). sysd's start (its API, READY, first boot, the host network on
//! plain links) does not wait for them; what needs one awaits [`RootModules::wait`] right
//! before: a container start (overlay for its root and its image's layers, bridge, veth and
//! nf_tables for a bridge service), a VLAN or bond, the extension merge (loop, overlay), the
//! update agent's ESP (vfat).
//!
//! One task follows the loader for every waiter: the loader's exit through a pidfd (so a pid
//! reused while it is followed is not taken for it), its mark by a slow poll beside it. The
//! gate opens once the mark is there or the loader is gone: a loader that died without its
//! mark is said once, and everything goes on as if it had finished (a module that is missing
//! then fails where it is used, naming it). Neither file (an older init, sysd outside init):
//! nothing to wait for.

use std::io;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use keelson_common::notify::{ROOT_MODULES_LOADED, ROOT_MODULES_LOADING};
use tokio::sync::watch;

/// How often the loader's mark is looked for while the loader runs. Its exit (a pidfd, at
/// once) is what ends the wait in practice: the loader writes its mark and exits.
const MARK_POLL: Duration = Duration::from_millis(50);
/// A wait at least this long is said when it ends (a slow loader is a slow boot).
const SAY_AFTER: Duration = Duration::from_secs(1);

/// Whether the root's modules are in; cloned to every path that needs one.
#[derive(Debug, Clone)]
pub struct RootModules {
    through: watch::Receiver<bool>,
    /// The loader followed, for the reasons waiters show.
    loader: Option<i32>,
}

impl RootModules {
    /// Nothing to wait for (host tests and benchmarks, sysd started outside init).
    pub fn ready() -> Self {
        RootModules {
            through: watch::channel(true).1,
            loader: None,
        }
    }

    /// Follows the loader init recorded in `run_dir`. Inside a tokio runtime (the loader is
    /// followed by a task of its own).
    pub fn follow(run_dir: &Path) -> Self {
        let loaded = run_dir.join(ROOT_MODULES_LOADED);
        let loading = run_dir.join(ROOT_MODULES_LOADING);
        // The mark first: init writes the pid after forking the loader, which may be through
        // by then (and a restarted sysd finds both).
        if loaded.exists() {
            return Self::ready();
        }
        let text = match std::fs::read_to_string(&loading) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Self::ready(),
            Err(e) => {
                tracing::warn!(
                    "sysd: cannot read {}: {e}; not waiting for the root's modules",
                    loading.display()
                );
                return Self::ready();
            }
        };
        let pid = match text.trim().parse::<i32>() {
            Ok(pid) if pid > 1 && pid != std::process::id() as i32 => pid,
            _ => {
                tracing::warn!(
                    "sysd: {} holds no loader's pid ({:?}); not waiting for the root's modules",
                    loading.display(),
                    text.trim()
                );
                return Self::ready();
            }
        };
        let pidfd = match crate::open_pidfd(pid) {
            Ok(fd) => Some(fd),
            // Gone already: through, or died without its mark (said below).
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {
                say_outcome(pid, &loaded, None);
                return Self::ready();
            }
            Err(e) => {
                tracing::debug!("sysd: no pidfd for the module loader (pid {pid}): {e}");
                None
            }
        };
        let (tx, through) = watch::channel(false);
        tokio::spawn(async move {
            let started = Instant::now();
            follow_loader(pid, pidfd, &loaded).await;
            say_outcome(pid, &loaded, Some(started.elapsed()));
            tx.send_replace(true);
        });
        RootModules {
            through,
            loader: Some(pid),
        }
    }

    /// Whether the modules are in (or there is nothing to wait for).
    pub fn is_ready(&self) -> bool {
        *self.through.borrow()
    }

    /// Resolves once the loader is through (at once if it is, or if there is none).
    pub async fn wait(&self) {
        let mut through = self.through.clone();
        // An error is the follower gone without a word (it cannot panic short of a bug): go
        // on, as for a loader gone without its mark.
        let _ = through.wait_for(|t| *t).await;
    }

    /// Why something waits, as a service's status shows it.
    pub fn reason(&self) -> String {
        match self.loader {
            Some(pid) => {
                format!("waiting for the root's kernel modules (init's loader, pid {pid})")
            }
            None => "waiting for the root's kernel modules".into(),
        }
    }
}

/// Until `loaded` exists or the loader has exited.
async fn follow_loader(pid: i32, pidfd: Option<OwnedFd>, loaded: &Path) {
    let exited = async {
        match &pidfd {
            Some(fd) => {
                if crate::wait_pidfd(fd).await.is_ok() {
                    return;
                }
                while proc_alive(pid) {
                    tokio::time::sleep(MARK_POLL).await;
                }
            }
            None => {
                while proc_alive(pid) {
                    tokio::time::sleep(MARK_POLL).await;
                }
            }
        }
    };
    let marked = async {
        while !loaded.exists() {
            tokio::time::sleep(MARK_POLL).await;
        }
    };
    tokio::select! {
        () = exited => {}
        () = marked => {}
    }
}

fn proc_alive(pid: i32) -> bool {
    PathBuf::from(format!("/proc/{pid}")).exists()
}

/// Says how the loader ended: a warning (once: one follower) when it left no mark, the wait
/// when it was long.
fn say_outcome(pid: i32, loaded: &Path, waited: Option<Duration>) {
    match std::fs::read_to_string(loaded) {
        Ok(summary) => {
            if let Some(w) = waited.filter(|w| *w >= SAY_AFTER) {
                tracing::info!(
                    "sysd: the root's modules are in after {} ms ({})",
                    w.as_millis(),
                    summary.trim()
                );
            }
        }
        Err(_) => tracing::warn!(
            "sysd: init's module loader (pid {pid}) ended without its mark {}; going on without waiting for it",
            loaded.display()
        ),
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use keelson_common::notify::{ROOT_MODULES_LOADED, ROOT_MODULES_LOADING};

    use super::RootModules;

    /// A process standing in for the loader, killed and reaped when dropped.
    struct Loader(std::process::Child);

    impl Loader {
        fn running() -> Self {
            Loader(
                std::process::Command::new("sleep")
                    .arg("30")
                    .spawn()
                    .unwrap(),
            )
        }
        fn pid(&self) -> u32 {
            self.0.id()
        }
    }

    impl Drop for Loader {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    fn record(dir: &std::path::Path, pid: u32) {
        std::fs::write(dir.join(ROOT_MODULES_LOADING), format!("{pid}\n")).unwrap();
    }

    async fn opens_within(gate: &RootModules, limit: Duration) -> bool {
        tokio::time::timeout(limit, gate.wait()).await.is_ok()
    }

    #[tokio::test]
    async fn no_loader_recorded_is_no_wait() {
        let d = tempfile::tempdir().unwrap();
        let gate = RootModules::follow(d.path());
        assert!(gate.is_ready());
        assert!(opens_within(&gate, Duration::from_millis(100)).await);
        assert!(RootModules::ready().is_ready());
    }

    #[tokio::test]
    async fn a_mark_already_there_is_no_wait() {
        let d = tempfile::tempdir().unwrap();
        let loader = Loader::running();
        record(d.path(), loader.pid());
        std::fs::write(d.path().join(ROOT_MODULES_LOADED), "modules: 3\n").unwrap();
        assert!(RootModules::follow(d.path()).is_ready());
    }

    #[tokio::test]
    async fn a_record_without_a_pid_is_no_wait() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join(ROOT_MODULES_LOADING), "loading\n").unwrap();
        assert!(RootModules::follow(d.path()).is_ready());
        // Its own pid is not a loader either (a restarted sysd given the loader's old pid).
        record(d.path(), std::process::id());
        assert!(RootModules::follow(d.path()).is_ready());
    }

    #[tokio::test]
    async fn a_loader_gone_without_its_mark_ends_the_wait() {
        let d = tempfile::tempdir().unwrap();
        let mut child = std::process::Command::new("sleep")
            .arg("0")
            .spawn()
            .unwrap();
        let pid = child.id();
        child.wait().unwrap();
        record(d.path(), pid);
        let gate = RootModules::follow(d.path());
        assert!(opens_within(&gate, Duration::from_secs(1)).await);
    }

    #[tokio::test]
    async fn a_loader_that_dies_while_followed_ends_the_wait() {
        let d = tempfile::tempdir().unwrap();
        let mut loader = Loader::running();
        record(d.path(), loader.pid());
        let gate = RootModules::follow(d.path());
        assert!(!gate.is_ready());
        assert!(!opens_within(&gate, Duration::from_millis(200)).await);
        // Killed but not reaped yet (a zombie until init reaps it): exited all the same.
        loader.0.kill().unwrap();
        let t = Instant::now();
        assert!(opens_within(&gate, Duration::from_secs(2)).await);
        assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
        assert!(!d.path().join(ROOT_MODULES_LOADED).exists());
    }

    #[tokio::test]
    async fn a_running_loader_is_waited_for_until_its_mark() {
        let d = tempfile::tempdir().unwrap();
        let loader = Loader::running();
        record(d.path(), loader.pid());
        let gate = RootModules::follow(d.path());
        assert!(!gate.is_ready());
        assert!(gate.reason().contains(&format!("pid {}", loader.pid())));
        let loaded = d.path().join(ROOT_MODULES_LOADED);
        let t = Instant::now();
        let writer = {
            let loaded = loaded.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(300)).await;
                std::fs::write(loaded, "modules: 3 from the root loaded in 300 ms\n").unwrap();
            })
        };
        gate.wait().await;
        assert!(loaded.exists(), "opened before the mark");
        assert!(t.elapsed() >= Duration::from_millis(300));
        assert!(gate.is_ready());
        writer.await.unwrap();
        // The loader still runs: the mark alone opened the gate.
        assert!(super::proc_alive(loader.pid() as i32));
    }

    #[tokio::test]
    async fn every_waiter_is_let_through_by_one_loader() {
        let d = tempfile::tempdir().unwrap();
        let mut loader = Loader::running();
        record(d.path(), loader.pid());
        let gate = RootModules::follow(d.path());
        let waiters: Vec<_> = (0..5)
            .map(|_| {
                let gate = gate.clone();
                tokio::spawn(async move {
                    gate.wait().await;
                    Instant::now()
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(waiters.iter().all(|w| !w.is_finished()));
        let marked = Instant::now();
        std::fs::write(d.path().join(ROOT_MODULES_LOADED), "modules: 3\n").unwrap();
        loader.0.kill().unwrap();
        for w in waiters {
            let opened = tokio::time::timeout(Duration::from_secs(2), w)
                .await
                .expect("a waiter was left waiting")
                .unwrap();
            assert!(opened >= marked);
        }
        // A waiter that comes later passes at once.
        assert!(opens_within(&gate, Duration::from_millis(10)).await);
    }
}
