//! Evidence that a container a previous sysd started is still that container: the first brick
//! of restarts that adopt running services (ARCHITECTURE.md, "sysd restarts without restarting
//! services"). Nothing adopts yet; this decides, from a record and `/proc`, whether a process
//! may be adopted, and says why not, so a reused pid, a vanished cgroup or a corrupt record
//! never leads to adopting (or killing) the wrong process.

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

/// Records the container `pid` of `service` started from `bundle` (its `config.json`).
pub fn record(bundle: &Path, service: &str, pid: i32) -> anyhow::Result<()> {
    use anyhow::Context;
    let proc = Path::new("/proc");
    let config = std::fs::read(bundle.join("config.json")).context("reading config.json")?;
    let r = Record {
        service: service.to_owned(),
        pid,
        start_ticks: start_ticks(proc, pid).context("its start time")?,
        cgroup: cgroup_of(proc, pid).context("its cgroup")?,
        config_hash: config_hash(&config),
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
    /// The resolved container config it was started with (changed config: restart, not adopt).
    pub config_hash: String,
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
    #[error("its config changed since it started")]
    ConfigChanged,
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
        }
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
        };
        assert_eq!(r.check(proc, "h"), Ok(()));
        child.kill().unwrap();
        child.wait().unwrap();
        assert_eq!(r.check(proc, "h"), Err(Refused::Gone { pid }));
    }
}
