//! Evidence that a container a previous sysd started is still that container (ARCHITECTURE.md,
//! "sysd restarts without restarting services"). Each start records it; a restarted sysd
//! [`decide`]s, from the record, `/proc`, the service's config now, whether init handed the
//! log pipes back and the exits init saw, whether the process is adopted, ended while no sysd
//! ran (and how), or is refused (and why), so a reused pid, a vanished cgroup or a corrupt
//! record never leads to adopting (or killing) the wrong process.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The record's file name in a container's bundle directory.
pub const RECORD: &str = "adopt.json";

/// The hash a record carries of the bundle's `config.json`.
pub fn config_hash(config_json: &[u8]) -> String {
    use sha2::Digest;
    hex(&sha2::Sha256::digest(config_json))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The bundle annotation carrying the service's spec hash (the supervisor sets it).
pub const SPEC_HASH: &str = "org.keelson.spec-hash";
/// The bundle annotation carrying how often the service was restarted before this start.
pub const RESTARTS: &str = "org.keelson.restarts";

/// Records the container `pid` of `service` started from `bundle` (its `config.json`).
pub fn record(bundle: &Path, service: &str, pid: i32) -> anyhow::Result<()> {
    use anyhow::Context;
    let proc = Path::new("/proc");
    let config = std::fs::read(bundle.join("config.json")).context("reading config.json")?;
    let v: serde_json::Value = serde_json::from_slice(&config).context("parsing config.json")?;
    let annotation = |k: &str| v["annotations"][k].as_str().unwrap_or_default().to_owned();
    let r = Record {
        service: service.to_owned(),
        pid,
        start_ticks: start_ticks(proc, pid).context("its start time")?,
        cgroup: cgroup_of(proc, pid).context("its cgroup")?,
        config_hash: config_hash(&config),
        spec_hash: annotation(SPEC_HASH),
        restarts: annotation(RESTARTS).parse().unwrap_or(0),
    };
    r.store(&bundle.join(RECORD))
        .context("writing adopt.json")?;
    Ok(())
}

/// What sysd records about a running container (`<bundle>/adopt.json`, on /run).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Record {
    pub service: String,
    /// The container's init, in sysd's pid namespace.
    pub pid: i32,
    /// Its start time in clock ticks since boot (`/proc/<pid>/stat` field 22): with the pid,
    /// what tells the process apart from a later one that reuses the pid.
    pub start_ticks: u64,
    /// Its cgroup v2 path (`/keelson/<service>`).
    pub cgroup: String,
    /// The hash of the bundle's `config.json` it was started with (a bundle changed since is
    /// not what runs).
    pub config_hash: String,
    /// The service's spec hash when it started (a changed spec: restart, not adopt).
    #[serde(default)]
    pub spec_hash: String,
    /// Restarts of the service before this start (its counter survives sysd).
    #[serde(default)]
    pub restarts: u32,
}

/// Why a record is not adopted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("{path}: not an adoption record ({why})")]
    Corrupt { path: PathBuf, why: String },
    #[error("pid {pid} is gone")]
    Gone { pid: i32 },
    #[error("pid {pid} was reused (started at tick {found}, the container at {expected})")]
    PidReused { pid: i32, expected: u64, found: u64 },
    #[error("pid {pid} is in cgroup {found:?}, not {expected:?}")]
    WrongCgroup {
        pid: i32,
        expected: String,
        found: String,
    },
    #[error("its bundle's config.json changed since it started")]
    ConfigChanged,
    #[error("its service's config changed since it started")]
    SpecChanged,
    #[error("its log pipes did not come back from init (no FD store)")]
    LogsLost,
    /// A bridge service's container whose bundle does not say where it is on the bridge.
    #[error("its bundle has no readable bridge endpoint ({0})")]
    NoEndpoint(String),
}

/// What a restarted sysd does with a container it finds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Still the recorded process, config unchanged, logs back: supervise it again.
    Adopt(Record),
    /// The recorded process ended while no sysd ran; init reaped it this way.
    Exited(Record, keelson_common::notify::Exit),
    /// Not adopted, for this reason: its cgroup is killed and the service started fresh.
    Refused(Refused),
}

/// Decides about one recorded container: `record` as loaded ([`Record::load`], then checked
/// against its bundle's `config.json` hash), the service's current `spec_hash`, whether both
/// its log pipes came back from init, and the exits init reported.
pub fn decide(
    record: Result<Record, Refused>,
    proc: &Path,
    config_hash: &str,
    spec_hash: &str,
    logs_back: bool,
    exits: &[keelson_common::notify::Exit],
) -> Verdict {
    let r = match record {
        Ok(r) => r,
        Err(why) => return Verdict::Refused(why),
    };
    match r.check(proc, config_hash) {
        Ok(()) => {}
        Err(Refused::Gone { pid }) => {
            // Reaped by init after it started: the last such exit of that pid is how it ended.
            let started_us = ticks_to_us(r.start_ticks);
            return match exits
                .iter()
                .rev()
                .find(|e| e.pid == pid && e.at_us >= started_us)
            {
                Some(e) => Verdict::Exited(r, *e),
                None => Verdict::Refused(Refused::Gone { pid }),
            };
        }
        Err(why) => return Verdict::Refused(why),
    }
    if r.spec_hash != spec_hash {
        return Verdict::Refused(Refused::SpecChanged);
    }
    if !logs_back {
        return Verdict::Refused(Refused::LogsLost);
    }
    Verdict::Adopt(r)
}

/// Clock ticks since boot (as `/proc/<pid>/stat` counts them) in µs.
pub fn ticks_to_us(ticks: u64) -> u64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let hz = u64::try_from(hz).ok().filter(|h| *h > 0).unwrap_or(100);
    ticks.saturating_mul(1_000_000) / hz
}

impl Record {
    /// Writes the record durably beside the bundle.
    pub fn store(&self, path: &Path) -> std::io::Result<()> {
        let json = serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?;
        let opts = keelson_common::durable::Options::mode(0o600);
        Ok(keelson_common::durable::replace_with(path, &opts, |f| {
            std::io::Write::write_all(f, &json)
        })?)
    }

    /// Reads a record; anything unreadable or malformed is [`Refused::Corrupt`].
    pub fn load(path: &Path) -> Result<Record, Refused> {
        let corrupt = |why: String| Refused::Corrupt {
            path: path.to_path_buf(),
            why,
        };
        let text = std::fs::read(path).map_err(|e| corrupt(e.to_string()))?;
        let r: Record = serde_json::from_slice(&text).map_err(|e| corrupt(e.to_string()))?;
        if r.pid <= 1 {
            return Err(corrupt(format!("pid {} cannot be a container", r.pid)));
        }
        if !r.cgroup.starts_with('/') || r.cgroup.contains("..") {
            return Err(corrupt(format!(
                "cgroup {:?} is not a cgroup path",
                r.cgroup
            )));
        }
        Ok(r)
    }

    /// Whether the process is still the one recorded (under `proc`, normally `/proc`) and its
    /// config is still `config_hash`.
    pub fn check(&self, proc: &Path, config_hash: &str) -> Result<(), Refused> {
        let found = start_ticks(proc, self.pid).ok_or(Refused::Gone { pid: self.pid })?;
        if found != self.start_ticks {
            return Err(Refused::PidReused {
                pid: self.pid,
                expected: self.start_ticks,
                found,
            });
        }
        let cgroup = cgroup_of(proc, self.pid).ok_or(Refused::Gone { pid: self.pid })?;
        if cgroup != self.cgroup {
            return Err(Refused::WrongCgroup {
                pid: self.pid,
                expected: self.cgroup.clone(),
                found: cgroup,
            });
        }
        if config_hash != self.config_hash {
            return Err(Refused::ConfigChanged);
        }
        Ok(())
    }
}

/// Field 22 of `/proc/<pid>/stat` (counted after the command, which may hold spaces and `)`).
pub fn start_ticks(proc: &Path, pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(proc.join(pid.to_string()).join("stat")).ok()?;
    let after = stat.get(stat.rfind(')')? + 1..)?;
    // After the command: field 3 (state) is the first, so field 22 is the 20th.
    after.split_whitespace().nth(19)?.parse().ok()
}

/// The cgroup v2 path of `pid` (the `0::` line of `/proc/<pid>/cgroup`).
pub fn cgroup_of(proc: &Path, pid: i32) -> Option<String> {
    let text = std::fs::read_to_string(proc.join(pid.to_string()).join("cgroup")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_proc(pid: i32, ticks: u64, cgroup: &str) -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join(pid.to_string());
        std::fs::create_dir_all(&p).unwrap();
        // A command with a space and a parenthesis, as `(sleep) x)` would be.
        let mut fields = vec!["S".to_string()];
        fields.extend((4..=21).map(|i| i.to_string()));
        fields.push(ticks.to_string());
        fields.extend((23..=52).map(|i| i.to_string()));
        std::fs::write(
            p.join("stat"),
            format!("{pid} (we) ird) {}\n", fields.join(" ")),
        )
        .unwrap();
        std::fs::write(p.join("cgroup"), format!("0::{cgroup}\n")).unwrap();
        d
    }

    fn record() -> Record {
        Record {
            service: "web".into(),
            pid: 4242,
            start_ticks: 9000,
            cgroup: "/keelson/web".into(),
            config_hash: "abc".into(),
            spec_hash: "spec1".into(),
            restarts: 2,
        }
    }

    fn exit(pid: i32, at_us: u64) -> keelson_common::notify::Exit {
        keelson_common::notify::Exit {
            pid,
            status: keelson_common::notify::Status::Exited(3),
            at_us,
        }
    }

    #[test]
    fn decisions() {
        let alive = fake_proc(4242, 9000, "/keelson/web");
        let decide_with = |proc: &Path, spec: &str, logs: bool, exits: &[_]| {
            decide(Ok(record()), proc, "abc", spec, logs, exits)
        };
        assert_eq!(
            decide_with(alive.path(), "spec1", true, &[]),
            Verdict::Adopt(record())
        );
        assert_eq!(
            decide_with(alive.path(), "spec2", true, &[]),
            Verdict::Refused(Refused::SpecChanged)
        );
        assert_eq!(
            decide_with(alive.path(), "spec1", false, &[]),
            Verdict::Refused(Refused::LogsLost)
        );
        // A corrupt record is refused whatever else holds.
        let corrupt = Refused::Corrupt {
            path: "/x/adopt.json".into(),
            why: "EOF".into(),
        };
        assert_eq!(
            decide(
                Err(corrupt.clone()),
                alive.path(),
                "abc",
                "spec1",
                true,
                &[]
            ),
            Verdict::Refused(corrupt)
        );
        // A pid reused by another process is never adopted, even with an exit of that pid.
        let reused = fake_proc(4242, 9500, "/keelson/web");
        assert!(matches!(
            decide_with(reused.path(), "spec1", true, &[exit(4242, u64::MAX)]),
            Verdict::Refused(Refused::PidReused { .. })
        ));
        // Gone: matched to init's record of its exit, if reaped after it started.
        let gone = tempfile::tempdir().unwrap();
        let started = ticks_to_us(9000);
        assert_eq!(
            decide_with(
                gone.path(),
                "spec1",
                true,
                &[exit(4242, started + 5), exit(7, started + 9)]
            ),
            Verdict::Exited(record(), exit(4242, started + 5))
        );
        // An exit of the same pid from before it started is another process's.
        assert_eq!(
            decide_with(gone.path(), "spec1", true, &[exit(4242, started - 1)]),
            Verdict::Refused(Refused::Gone { pid: 4242 })
        );
        // A cgroup gone (the process moved elsewhere) is refused.
        let moved = fake_proc(4242, 9000, "/");
        assert!(matches!(
            decide_with(moved.path(), "spec1", true, &[]),
            Verdict::Refused(Refused::WrongCgroup { .. })
        ));
    }

    #[test]
    fn the_recorded_process_is_adopted() {
        let proc = fake_proc(4242, 9000, "/keelson/web");
        assert_eq!(start_ticks(proc.path(), 4242), Some(9000));
        assert_eq!(record().check(proc.path(), "abc"), Ok(()));
    }

    #[test]
    fn a_reused_pid_a_moved_cgroup_a_dead_pid_or_new_config_are_refused() {
        let reused = fake_proc(4242, 9100, "/keelson/web");
        assert_eq!(
            record().check(reused.path(), "abc"),
            Err(Refused::PidReused {
                pid: 4242,
                expected: 9000,
                found: 9100
            })
        );
        let moved = fake_proc(4242, 9000, "/user.slice");
        let e = record().check(moved.path(), "abc").unwrap_err();
        assert!(matches!(e, Refused::WrongCgroup { .. }), "{e}");
        assert!(e.to_string().contains("/user.slice"), "{e}");
        let empty = tempfile::tempdir().unwrap();
        assert_eq!(
            record().check(empty.path(), "abc"),
            Err(Refused::Gone { pid: 4242 })
        );
        let same = fake_proc(4242, 9000, "/keelson/web");
        assert_eq!(
            record().check(same.path(), "def"),
            Err(Refused::ConfigChanged)
        );
    }

    #[test]
    fn records_round_trip_and_corrupt_ones_say_where_and_why() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("adopt.json");
        record().store(&p).unwrap();
        assert_eq!(Record::load(&p).unwrap(), record());
        std::fs::write(&p, "{\"service\":\"web\"").unwrap();
        let e = Record::load(&p).unwrap_err();
        assert!(
            matches!(e, Refused::Corrupt { .. }) && e.to_string().contains("adopt.json"),
            "{e}"
        );
        let mut r = record();
        r.pid = 1;
        std::fs::write(&p, serde_json::to_vec(&r).unwrap()).unwrap();
        assert!(Record::load(&p).unwrap_err().to_string().contains("pid 1"));
        let mut r = record();
        r.cgroup = "/keelson/../..".into();
        std::fs::write(&p, serde_json::to_vec(&r).unwrap()).unwrap();
        assert!(Record::load(&p)
            .unwrap_err()
            .to_string()
            .contains("not a cgroup path"));
        assert!(matches!(
            Record::load(&d.path().join("missing")),
            Err(Refused::Corrupt { .. })
        ));
    }

    #[test]
    fn a_real_process_then_its_exit() {
        let mut child = std::process::Command::new("sleep")
            .arg("60")
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        let proc = Path::new("/proc");
        let r = Record {
            service: "sleep".into(),
            pid,
            start_ticks: start_ticks(proc, pid).unwrap(),
            cgroup: cgroup_of(proc, pid).unwrap(),
            config_hash: "h".into(),
            spec_hash: String::new(),
            restarts: 0,
        };
        assert_eq!(r.check(proc, "h"), Ok(()));
        child.kill().unwrap();
        child.wait().unwrap();
        assert_eq!(r.check(proc, "h"), Err(Refused::Gone { pid }));
    }
}
