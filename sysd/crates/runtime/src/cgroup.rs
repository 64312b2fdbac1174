//! cgroup v2 file access for the daemon side: emptiness, killing, removal and statistics.
//!
//! These work on the unified hierarchy directly (no libcontainer), so that they stay usable
//! on containers whose libcontainer state is gone (a crash) and never need a helper process.

use std::fs;
use std::io;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// Resource usage of one cgroup; `None` where the file is missing (controller not enabled).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// cpu.stat usage_usec / user_usec / system_usec.
    pub cpu_usage_usec: Option<u64>,
    pub cpu_user_usec: Option<u64>,
    pub cpu_system_usec: Option<u64>,
    /// memory.current, memory.peak (Linux 5.19+).
    pub memory_current: Option<u64>,
    pub memory_peak: Option<u64>,
    /// memory.events `oom` (times the limit was hit and reclaim failed) and `oom_kill`.
    pub memory_oom: Option<u64>,
    pub memory_oom_kill: Option<u64>,
    /// pids.current.
    pub pids_current: Option<u64>,
    /// io.stat summed over devices.
    pub io_rbytes: Option<u64>,
    pub io_wbytes: Option<u64>,
    pub io_rios: Option<u64>,
    pub io_wios: Option<u64>,
}

fn read_opt(path: &Path) -> Result<Option<String>> {
    match fs::read_to_string(path) {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

fn single(path: &Path) -> Result<Option<u64>> {
    Ok(read_opt(path)?.and_then(|s| s.trim().parse().ok()))
}

/// `key value` lines (cpu.stat, memory.events, cgroup.events).
fn keyed(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

/// Whether the cgroup (or a descendant) has processes.
pub fn populated(dir: &Path) -> Result<bool> {
    let events = dir.join("cgroup.events");
    let text =
        fs::read_to_string(&events).with_context(|| format!("reading {}", events.display()))?;
    Ok(keyed(&text, "populated") == Some(1))
}

pub fn stats(dir: &Path) -> Result<Stats> {
    if !dir.is_dir() {
        bail!("cgroup {} does not exist", dir.display());
    }
    let cpu = read_opt(&dir.join("cpu.stat"))?;
    let events = read_opt(&dir.join("memory.events"))?;
    let mut s = Stats {
        cpu_usage_usec: cpu.as_deref().and_then(|t| keyed(t, "usage_usec")),
        cpu_user_usec: cpu.as_deref().and_then(|t| keyed(t, "user_usec")),
        cpu_system_usec: cpu.as_deref().and_then(|t| keyed(t, "system_usec")),
        memory_current: single(&dir.join("memory.current"))?,
        memory_peak: single(&dir.join("memory.peak"))?,
        memory_oom: events.as_deref().and_then(|t| keyed(t, "oom")),
        memory_oom_kill: events.as_deref().and_then(|t| keyed(t, "oom_kill")),
        pids_current: single(&dir.join("pids.current"))?,
        ..Stats::default()
    };
    if let Some(io) = read_opt(&dir.join("io.stat"))? {
        let (mut rb, mut wb, mut ri, mut wi) = (0, 0, 0, 0);
        // "8:0 rbytes=1 wbytes=2 rios=3 wios=4 dbytes=0 dios=0" per device.
        for field in io.split_whitespace() {
            let Some((k, v)) = field.split_once('=') else {
                continue;
            };
            let v: u64 = v.parse().unwrap_or(0);
            match k {
                "rbytes" => rb += v,
                "wbytes" => wb += v,
                "rios" => ri += v,
                "wios" => wi += v,
                _ => {}
            }
        }
        (s.io_rbytes, s.io_wbytes, s.io_rios, s.io_wios) = (Some(rb), Some(wb), Some(ri), Some(wi));
    }
    Ok(s)
}

/// Every pid in `dir` and its descendants.
fn all_procs(dir: &Path, out: &mut Vec<i32>) {
    if let Ok(text) = fs::read_to_string(dir.join("cgroup.procs")) {
        out.extend(text.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
    }
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                all_procs(&e.path(), out);
            }
        }
    }
}

/// SIGKILLs everything in `dir` (cgroup.kill, Linux 5.14+; else pid by pid until empty) and
/// waits for `populated 0`.
pub async fn kill(dir: &Path, timeout: Duration) -> Result<()> {
    if !dir.is_dir() {
        return Ok(());
    }
    let kill_file = dir.join("cgroup.kill");
    let has_kill = match fs::write(&kill_file, "1") {
        Ok(()) => true,
        Err(e) if !dir.exists() => {
            let _ = e;
            return Ok(());
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => false,
        Err(e) => return Err(e).with_context(|| format!("writing 1 to {}", kill_file.display())),
    };
    let deadline = Instant::now() + timeout;
    loop {
        match populated(dir) {
            Ok(false) => return Ok(()),
            Ok(true) => {}
            Err(_) if !dir.exists() => return Ok(()),
            Err(e) => return Err(e),
        }
        if !has_kill {
            let mut pids = Vec::new();
            all_procs(dir, &mut pids);
            for pid in pids {
                // SAFETY: kill(2) with integer arguments.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        if Instant::now() >= deadline {
            bail!(
                "cgroup {} still has processes {timeout:?} after SIGKILL",
                dir.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// rmdir of `dir` and its descendant cgroups (deepest first); gone already is fine. Retries
/// briefly on EBUSY, which the kernel returns while exiting tasks are still being released.
pub async fn remove(dir: &Path) -> Result<()> {
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                Box::pin(remove(&e.path())).await?;
            }
        }
    }
    let mut tries = 0;
    loop {
        match fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && tries < 100 => {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(e) => return Err(e).with_context(|| format!("removing cgroup {}", dir.display())),
        }
    }
}

/// The leaf below a delegated service's cgroup that processes exec'd into it join (see
/// [`holds_no_process`]).
pub const EXEC_LEAF: &str = "keelson-exec";

/// Whether cgroup `dir` can take no process: it enables controllers for its children
/// (`cgroup.subtree_control` not empty), and cgroup v2 keeps processes out of such a cgroup
/// (the no-internal-processes rule; writing a pid to its `cgroup.procs` fails with EBUSY). A
/// delegated engine does this to its own cgroup once it has moved itself into a leaf.
pub fn holds_no_process(dir: &Path) -> bool {
    fs::read_to_string(dir.join("cgroup.subtree_control")).is_ok_and(|c| !c.trim().is_empty())
}

/// rmdir of the cgroups below `dir` (deepest first), leaving `dir` itself: what a delegated
/// service (`delegate = true`) created in its subtree, which libcontainer, removing only the
/// container's own cgroup, would trip over. Gone already is fine; EBUSY (tasks still being
/// released) is retried briefly; a child that still has processes is an error naming it.
pub fn remove_descendants(dir: &Path) -> Result<()> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Ok(());
    };
    for e in entries.flatten() {
        if !e.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let child = e.path();
        remove_descendants(&child)?;
        let mut tries = 0;
        loop {
            match fs::remove_dir(&child) {
                Ok(()) => break,
                Err(e) if e.kind() == io::ErrorKind::NotFound => break,
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) && tries < 100 => {
                    tries += 1;
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => {
                    return Err(e).with_context(|| format!("removing cgroup {}", child.display()))
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cgroup_that_enables_controllers_for_children_holds_no_process() {
        let dir = tempfile::tempdir().unwrap();
        // Not a cgroup (no file): nothing is known, join it as ever.
        assert!(!holds_no_process(dir.path()));
        fs::write(dir.path().join("cgroup.subtree_control"), "\n").unwrap();
        assert!(!holds_no_process(dir.path()));
        fs::write(dir.path().join("cgroup.subtree_control"), "memory pids\n").unwrap();
        assert!(holds_no_process(dir.path()));
    }

    #[test]
    fn remove_descendants_keeps_the_dir_itself() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        fs::create_dir_all(d.join("a/b")).unwrap();
        fs::create_dir_all(d.join("c")).unwrap();
        fs::write(d.join("cgroup.procs"), "").unwrap();
        remove_descendants(d).unwrap();
        assert!(d.exists() && d.join("cgroup.procs").exists());
        assert!(!d.join("a").exists() && !d.join("c").exists());
        // A missing dir is fine.
        remove_descendants(&d.join("gone")).unwrap();
    }

    #[test]
    fn parses_stats_and_tolerates_missing_files() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        fs::write(
            d.join("cpu.stat"),
            "usage_usec 1500\nuser_usec 1000\nsystem_usec 500\nnr_periods 0\n",
        )
        .unwrap();
        fs::write(d.join("memory.current"), "4096\n").unwrap();
        fs::write(
            d.join("memory.events"),
            "low 0\nhigh 0\nmax 3\noom 2\noom_kill 1\n",
        )
        .unwrap();
        fs::write(d.join("io.stat"), "8:0 rbytes=10 wbytes=20 rios=1 wios=2 dbytes=0 dios=0\n8:16 rbytes=5 wbytes=5 rios=1 wios=1 dbytes=0 dios=0\n").unwrap();
        let s = stats(d).unwrap();
        assert_eq!(s.cpu_usage_usec, Some(1500));
        assert_eq!(
            (s.cpu_user_usec, s.cpu_system_usec),
            (Some(1000), Some(500))
        );
        assert_eq!(s.memory_current, Some(4096));
        assert_eq!(s.memory_peak, None);
        assert_eq!((s.memory_oom, s.memory_oom_kill), (Some(2), Some(1)));
        assert_eq!(s.pids_current, None);
        assert_eq!(
            (s.io_rbytes, s.io_wbytes, s.io_rios, s.io_wios),
            (Some(15), Some(25), Some(2), Some(3))
        );
        assert!(stats(&d.join("gone")).is_err());
    }

    #[test]
    fn populated_flag() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("cgroup.events"), "populated 1\nfrozen 0\n").unwrap();
        assert!(populated(dir.path()).unwrap());
        fs::write(dir.path().join("cgroup.events"), "populated 0\nfrozen 0\n").unwrap();
        assert!(!populated(dir.path()).unwrap());
    }
}
