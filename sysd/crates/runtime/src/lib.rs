//! The container runtime: an OCI runtime-spec bundle per service, created and started by a
//! short-lived single-threaded helper (`sysd runtime create`, the sysd binary re-executed)
//! through youki's `libcontainer`, so the tokio daemon never forks.
//!
//! The supervisor hands a [`ContainerConfig`] (everything already resolved: paths, ids,
//! sizes) and gets back the pid of the container's init, which is reparented to sysd (a child
//! subreaper) when the helper exits.
//!
//! Layout under the state root: `containers/<id>/` is libcontainer's state (state.json, its
//! copy of the config, the start socket), `bundles/<id>/config.json` the spec we generated.
//! Both must stay until the container is removed (`exec` reads the bundle). cgroups live at
//! `ContainerConfig::cgroup_path` under the cgroup2 root; the parent (`/keelson` by default)
//! must hold only service containers, and no ancestor other than the root may hold processes
//! (cgroup v2's no-internal-processes rule would keep controllers from being enabled).
//!
//! Rules for the caller, all about who reaps whom. sysd must be a child subreaper
//! ([`become_subreaper`]) and reap each container init through its pidfd ([`wait_exit`]),
//! never with `waitpid(-1)` (that would steal the helpers' and tokio's children). A `start`
//! future should run to completion: dropped midway, the helper still finishes and the init
//! is then a child nobody waits for. The helper reaps everything else it forks (including
//! the process an `exec` runs, which sits in the container's pid namespace: unreaped, it
//! would keep that namespace's init from ever finishing its exit), which is why `exec` never
//! kills its helper and relies on the helper's own timeout.

pub mod adopt;
pub mod bundle;
mod cgroup;
pub mod helper;
pub mod init;
pub mod modules;
pub mod netplug;
pub mod seccomp;

pub use cgroup::Stats;
pub use modules::RootModules;

use std::collections::BTreeMap;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncReadExt, Interest};

/// Everything the runtime needs to create one container. Produced by the supervisor from a
/// validated service spec; no TOML concepts leak past this point.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerConfig {
    /// Container id: unique per running instance (service name + generation), `[a-z0-9_.-]`.
    pub id: String,
    /// Service name (hostname inside the container, cgroup leaf name).
    pub service: String,
    /// Root file system directory (already unpacked). Mounted read-only unless `writable_root`.
    pub rootfs: PathBuf,
    /// The image's layer directories, top first, stacked as the container overlay's lower
    /// directories; empty when `rootfs` itself is the (only) lower directory.
    pub lowers: Vec<PathBuf>,
    pub writable_root: bool,
    /// Full argv (entrypoint + command resolved); argv[0] is looked up in the container's PATH.
    pub args: Vec<String>,
    /// Environment, `KEY=VALUE` (PATH defaulted by the caller).
    pub env: Vec<String>,
    pub cwd: String,
    pub uid: u32,
    pub gid: u32,
    pub additional_gids: Vec<u32>,
    pub mounts: Vec<Mount>,
    pub network: NetworkMode,
    /// Run `args` under sysd's minimal init (`sysd init --`), which forwards signals and
    /// reaps zombies (Docker's `--init`).
    pub init: bool,
    /// Share the host's pid namespace (see every process of the node: the admin container).
    pub host_pid: bool,
    /// The node agent contract's `delegate`: the cgroup at `cgroup_path` is the service's to
    /// manage: cgroupfs is mounted writable in its cgroup namespace, so it may create child
    /// cgroups and enable controllers in them (docs/node-agent.md).
    pub delegate: bool,
    /// Capabilities to add to / drop from Docker's default set, `CAP_` prefixed, upper case;
    /// `ALL` allowed in either.
    pub cap_add: Vec<String>,
    pub cap_drop: Vec<String>,
    /// All capabilities, no seccomp, no masked/read-only paths, host devices: for system
    /// services that manage the host. Namespaces are still used (except as `network` says).
    pub privileged: bool,
    /// Run in a new user namespace, container root mapped to `uid_map_base` (65536 ids).
    pub user_namespace: Option<u32>,
    pub resources: Resources,
    /// cgroup v2 path relative to the cgroup root, e.g. `/keelson/web`.
    pub cgroup_path: String,
    /// Extra annotations recorded in the bundle (service name, spec hash).
    pub annotations: BTreeMap<String, String>,
}

impl ContainerConfig {
    /// `args` as root in `rootfs` (id = service name), PATH=/bin, no network, the default
    /// capabilities and no limits: the base the tests and the benchmark fill in (the
    /// supervisor sets every field itself, so the daemon does not use it).
    #[allow(dead_code)]
    pub fn new(
        service: &str,
        rootfs: impl Into<PathBuf>,
        args: &[&str],
        cgroup_path: String,
    ) -> Self {
        ContainerConfig {
            id: service.into(),
            service: service.into(),
            rootfs: rootfs.into(),
            lowers: vec![],
            writable_root: false,
            args: args.iter().map(|a| a.to_string()).collect(),
            env: vec!["PATH=/bin".into()],
            cwd: "/".into(),
            uid: 0,
            gid: 0,
            additional_gids: vec![],
            mounts: vec![],
            network: NetworkMode::None,
            host_pid: false,
            delegate: false,
            init: false,
            cap_add: vec![],
            cap_drop: vec![],
            privileged: false,
            user_namespace: None,
            resources: Resources::default(),
            cgroup_path,
            annotations: BTreeMap::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mount {
    /// Bind mount of a host path (named volumes are resolved to a host dir by the caller).
    Bind {
        source: PathBuf,
        target: String,
        readonly: bool,
    },
    Tmpfs {
        target: String,
        size_bytes: Option<u64>,
        mode: Option<u32>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetworkMode {
    /// Share the host's network namespace.
    Host,
    /// A fresh network namespace with only loopback (brought up).
    None,
    /// Join an existing network namespace (`/proc/PID/ns/net` of another container).
    Join(std::path::PathBuf),
}

/// cgroup v2 limits; `None` leaves the kernel default.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Resources {
    /// memory.max in bytes.
    pub memory_max: Option<u64>,
    /// cpu.weight, 1..=10000.
    pub cpu_weight: Option<u64>,
    /// cpu.max quota in microseconds per `cpu_period_us` (default period 100000).
    pub cpu_quota_us: Option<u64>,
    pub cpu_period_us: Option<u64>,
    /// pids.max.
    pub pids_max: Option<u64>,
    /// io.weight, 1..=10000.
    pub io_weight: Option<u64>,
}

/// Environment variable overriding the helper executable (default `/proc/self/exe`).
pub const EXE_ENV: &str = "KEELSON_RUNTIME_EXE";

/// Where the init (sysd's own binary) is mounted in a container with `init`.
pub const INIT_PATH: &str = "/.keelson-init";

/// Bytes of `exec` output kept.
pub const EXEC_OUTPUT_LIMIT: usize = 4096;

/// The container runtime, as the daemon sees it.
#[derive(Debug, Clone)]
pub struct Runtime {
    state_root: PathBuf,
    exe: PathBuf,
    cgroup_root: PathBuf,
    cgroup_parent: String,
    programs: bundle::Programs,
}

/// A started container: its init's pid and a pidfd on it (for [`wait_exit`] and signals
/// that cannot hit a recycled pid).
#[derive(Debug)]
pub struct Started {
    pub pid: i32,
    pub pidfd: OwnedFd,
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitInfo {
    Exited(i32),
    Signaled(i32),
}

/// The result of [`Runtime::exec`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOutcome {
    /// Exit code of the command (128 + N for signal N; 124 when timed out; 125 when the
    /// command could not be started, with the reason in `output`).
    pub code: i32,
    pub timed_out: bool,
    /// stdout and stderr interleaved, the first [`EXEC_OUTPUT_LIMIT`] bytes, lossy UTF-8.
    pub output: String,
}

/// Something found by [`Runtime::leftovers`]: libcontainer state and/or a cgroup of a
/// container from an earlier sysd run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leftover {
    /// Service name (its `org.keelson.service` annotation in the bundle, else the id or cgroup
    /// leaf).
    pub service: String,
    /// Container id, when its state dir or bundle is there.
    pub id: Option<String>,
    /// Init pid recorded in the state (it may have exited, or even been reused).
    pub pid: Option<i32>,
    /// cgroup path relative to the cgroup root, when the cgroup still exists.
    pub cgroup_path: Option<String>,
    /// Whether the cgroup still has processes.
    pub populated: bool,
    /// Its adoption record (`adopt.json` in the bundle), or why it cannot be read (`None`: no
    /// record), for [`adopt::decide`].
    pub record: Option<Result<adopt::Record, adopt::Refused>>,
    /// The hash of its bundle's `config.json` as it is now.
    pub bundle_hash: String,
    /// Its bridge endpoint, as the bundle's annotation has it (bridge services), unparsed.
    pub endpoint: Option<String>,
}

impl Leftover {
    /// One line for logs: what was found.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if let Some(id) = &self.id {
            parts.push(format!("container {id}"));
        }
        if let Some(pid) = self.pid {
            parts.push(format!("pid {pid}"));
        }
        if let Some(cg) = &self.cgroup_path {
            let state = if self.populated {
                "with processes"
            } else {
                "empty"
            };
            parts.push(format!("cgroup {cg} {state}"));
        }
        let mut line = parts.join(", ");
        if let Some(Err(why)) = &self.record {
            line.push_str(&format!("; {why}"));
        }
        line
    }
}

impl Runtime {
    /// A runtime keeping its state under `state_root` (e.g. `/run/keelson/runtime`); the
    /// helper is this executable (or `$KEELSON_RUNTIME_EXE`), container cgroups under
    /// `/keelson` of `/sys/fs/cgroup`.
    pub fn new(state_root: impl Into<PathBuf>) -> Self {
        let exe = std::env::var_os(EXE_ENV).map_or_else(|| "/proc/self/exe".into(), PathBuf::from);
        Runtime {
            state_root: state_root.into(),
            exe,
            cgroup_root: "/sys/fs/cgroup".into(),
            cgroup_parent: "/keelson".into(),
            programs: bundle::Programs::default(),
        }
    }

    /// The executable run as `EXE runtime ...`.
    #[allow(dead_code)] // tests/runtime.rs and bench-runtime point it at the built sysd
    pub fn with_exe(mut self, exe: impl Into<PathBuf>) -> Self {
        self.exe = exe.into();
        self
    }

    /// The cgroup (relative to the cgroup root) holding every container cgroup, where
    /// [`Runtime::leftovers`] looks; it must hold nothing else.
    pub fn with_cgroup_parent(mut self, parent: &str) -> Self {
        self.cgroup_parent = normalize_cgroup(parent);
        self
    }

    /// The cgroup2 mount point.
    #[allow(dead_code)] // for tests and alternative layouts
    pub fn with_cgroup_root(mut self, root: impl Into<PathBuf>) -> Self {
        self.cgroup_root = root.into();
        self
    }

    /// libcontainer's state root (`--root` of the helper).
    pub fn containers_dir(&self) -> PathBuf {
        self.state_root.join("containers")
    }

    fn bundles_dir(&self) -> PathBuf {
        self.state_root.join("bundles")
    }

    fn cgroup_dir(&self, cgroup_path: &str) -> PathBuf {
        self.cgroup_root.join(cgroup_path.trim_start_matches('/'))
    }

    /// Creates and starts the container of `cfg`, its stdout/stderr on the given fds, and
    /// returns its init. The caller must be a child subreaper ([`become_subreaper`]) so that
    /// the init becomes its child, and must reap it with [`wait_exit`].
    pub async fn start(
        &self,
        cfg: &ContainerConfig,
        stdout: OwnedFd,
        stderr: OwnedFd,
    ) -> Result<Started> {
        let svc = &cfg.service;
        bundle::preflight(cfg)?;
        let cgroup = self.cgroup_dir(&cfg.cgroup_path);
        if cgroup::populated(&cgroup).unwrap_or(false) {
            bail!(
                "service {svc}: cgroup {} still has processes of an earlier instance; remove it first",
                cgroup.display()
            );
        }
        let state = self.containers_dir().join(&cfg.id);
        if state.exists() {
            bail!(
                "service {svc}: container {} already exists ({})",
                cfg.id,
                state.display()
            );
        }
        let bundle_dir = self.bundles_dir().join(&cfg.id);
        let lowers = match cfg.lowers.as_slice() {
            [] => std::slice::from_ref(&cfg.rootfs),
            layers => layers,
        };
        let rootfs = mount_rootfs(&bundle_dir, lowers)
            .await
            .with_context(|| format!("service {svc}: preparing its root file system"))?;
        let mut effective = ContainerConfig {
            rootfs,
            ..cfg.clone()
        };
        if cfg.init {
            // Our own static binary is the init: the image needs nothing for it.
            let exe = std::fs::canonicalize(&self.exe)
                .with_context(|| format!("resolving {}", self.exe.display()))?;
            if !is_static_elf(&exe)? {
                bail!(
                    "service {svc}: init = true needs a statically linked sysd (as in the image); {} is dynamically linked",
                    exe.display()
                );
            }
            effective.mounts.push(Mount::Bind {
                source: exe,
                target: INIT_PATH.into(),
                readonly: true,
            });
            effective.args = [INIT_PATH, "init", "--"]
                .iter()
                .map(|s| s.to_string())
                .chain(cfg.args.iter().cloned())
                .collect();
        }
        let spec = bundle::spec(&effective)?;
        // On a blocking thread: the first start of each profile compiles its seccomp program
        // (milliseconds natively, far more under emulation), which must not hold up the tasks
        // of this worker (at boot: the readiness sysd reports to init).
        let (dir, programs) = (bundle_dir.clone(), self.programs.clone());
        tokio::task::spawn_blocking(move || bundle::write_compiled(&dir, spec, &programs))
            .await
            .context("the bundle writer task")?
            .with_context(|| format!("service {svc}"))?;
        std::fs::create_dir_all(self.containers_dir())
            .with_context(|| format!("creating {}", self.containers_dir().display()))?;

        // fds 3 and 4 of the helper; moved above 4 first so the dup2s cannot clobber each other.
        let out = dup_above(&stdout, 10).context("dup of the stdout fd")?;
        let err = dup_above(&stderr, 10).context("dup of the stderr fd")?;
        drop((stdout, stderr));
        let (out_raw, err_raw) = (out.as_raw_fd(), err.as_raw_fd());
        let mut cmd = tokio::process::Command::new(&self.exe);
        cmd.arg("runtime")
            .arg("create")
            .arg("--root")
            .arg(self.containers_dir())
            .arg("--id")
            .arg(&cfg.id)
            .arg("--bundle")
            .arg(&bundle_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // SAFETY: the closure runs in the forked child before exec and only calls dup2, which
        // is async-signal-safe; the raw fds stay open in the parent until spawn returns.
        unsafe {
            cmd.pre_exec(move || {
                if libc::dup2(out_raw, 3) < 0 || libc::dup2(err_raw, 4) < 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().with_context(|| {
            format!(
                "service {svc}: running {} runtime create",
                self.exe.display()
            )
        })?;
        drop((out, err));
        let output = child
            .wait_with_output()
            .await
            .context("waiting for the runtime helper")?;
        if !output.status.success() {
            bail!(
                "service {svc}: {}",
                helper_error(&output.stderr, output.status)
            );
        }
        let stdout = String::from_utf8_lossy(&output.stdout);
        let pid: i32 = stdout
            .trim()
            .parse()
            .map_err(|_| anyhow!("service {svc}: runtime helper printed {stdout:?}, not a pid"))?;
        let pidfd = pidfd_open(pid).with_context(|| format!("service {svc}: pidfd_open({pid})"))?;
        // The helper has exited, so the init's parent is settled: it must be us.
        let ppid =
            parent_pid(pid).with_context(|| format!("service {svc}: reading /proc/{pid}/stat"))?;
        if ppid != std::process::id() as i32 {
            let _ = self.kill_cgroup(&cfg.cgroup_path).await;
            bail!(
                "service {svc}: container init {pid} was reparented to {ppid}, not to this \
                 process; call become_subreaper() at startup"
            );
        }
        // What a later sysd checks before it could adopt this container (runtime::adopt).
        if let Err(e) = adopt::record(&bundle_dir, svc, pid) {
            tracing::warn!("service {svc}: no adoption record: {e:#}");
        }
        Ok(Started { pid, pidfd })
    }

    /// Runs `argv` in the running container `id` and waits (at most `timeout`) for it.
    pub async fn exec(&self, id: &str, argv: &[String], timeout: Duration) -> Result<ExecOutcome> {
        let (read, write) = pipe().context("pipe for exec output")?;
        let write2 = write.try_clone().context("dup of the exec pipe")?;
        let mut child = tokio::process::Command::new(&self.exe)
            .arg("runtime")
            .arg("exec")
            .arg("--root")
            .arg(self.containers_dir())
            .arg("--id")
            .arg(id)
            .arg("--timeout-ms")
            .arg(timeout.as_millis().to_string())
            .arg("--")
            .args(argv)
            .stdin(Stdio::null())
            .stdout(Stdio::from(write))
            .stderr(Stdio::from(write2))
            // Never kill the helper: the process it runs in the container is its child and
            // would be orphaned to us (see helper.rs); it ends by its own timeout.
            .kill_on_drop(false)
            .spawn()
            .with_context(|| {
                format!(
                    "container {id}: running {} runtime exec",
                    self.exe.display()
                )
            })?;
        let mut reader =
            tokio::net::unix::pipe::Receiver::from_owned_fd(read).context("exec output pipe")?;
        let mut output = Vec::new();
        let mut buf = [0u8; 4096];
        // The helper enforces the timeout; this outer one only guards against a stuck helper.
        let deadline = tokio::time::sleep(timeout + Duration::from_secs(10));
        tokio::pin!(deadline);
        let mut eof = false;
        let status = loop {
            tokio::select! {
                n = reader.read(&mut buf), if !eof => match n {
                    Ok(0) | Err(_) => eof = true,
                    Ok(n) => keep(&mut output, &buf[..n]),
                },
                status = child.wait() => break Some(status.context("waiting for runtime exec")?),
                () = &mut deadline => break None,
            }
        };
        let Some(status) = status else {
            // The helper is left to finish (tokio reaps it when it exits).
            return Ok(ExecOutcome {
                code: i32::from(helper::EXIT_TIMEOUT),
                timed_out: true,
                output: String::from_utf8_lossy(&output).into_owned(),
            });
        };
        // Drain what is already written; a daemonized grandchild may keep the pipe open, so
        // do not wait for EOF beyond a short grace.
        let grace = tokio::time::sleep(Duration::from_millis(50));
        tokio::pin!(grace);
        while !eof {
            tokio::select! {
                n = reader.read(&mut buf) => match n {
                    Ok(0) | Err(_) => eof = true,
                    Ok(n) => keep(&mut output, &buf[..n]),
                },
                () = &mut grace => break,
            }
        }
        let code = status
            .code()
            .unwrap_or_else(|| 128 + status.signal().unwrap_or(0));
        Ok(ExecOutcome {
            code,
            timed_out: code == i32::from(helper::EXIT_TIMEOUT),
            output: String::from_utf8_lossy(&output).into_owned(),
        })
    }

    /// Kills every process in the cgroup (and below it) and waits until it is empty. A
    /// missing cgroup is not an error.
    pub async fn kill_cgroup(&self, cgroup_path: &str) -> Result<()> {
        cgroup::kill(&self.cgroup_dir(cgroup_path), Duration::from_secs(10)).await
    }

    /// Removes everything of container `id`: kills what is left in its cgroup, deletes the
    /// libcontainer state, the bundle and the cgroup. Parts already gone are fine.
    pub async fn remove(&self, id: &str, cgroup_path: &str) -> Result<()> {
        self.kill_cgroup(cgroup_path).await?;
        self.remove_files(id).await?;
        cgroup::remove(&self.cgroup_dir(cgroup_path)).await
    }

    /// Resource usage of a container's cgroup; counters of controllers that are not enabled
    /// are `None`.
    pub fn stats(&self, cgroup_path: &str) -> Result<Stats> {
        cgroup::stats(&self.cgroup_dir(cgroup_path))
    }

    /// Containers of an earlier run: state dirs, bundles and cgroups under the parent. After a
    /// restart the supervisor removes them all ([`Runtime::cleanup_leftovers`]) before it
    /// starts anything, so no service runs twice and nothing is orphaned.
    pub fn leftovers(&self) -> Vec<Leftover> {
        let mut found: BTreeMap<String, Leftover> = BTreeMap::new();
        let mut by_cgroup: BTreeMap<String, String> = BTreeMap::new();
        for dir in [self.containers_dir(), self.bundles_dir()] {
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.flatten() {
                let id = entry.file_name().to_string_lossy().into_owned();
                let l = found.entry(id.clone()).or_insert_with(|| Leftover {
                    service: id.clone(),
                    id: Some(id.clone()),
                    pid: None,
                    cgroup_path: None,
                    populated: false,
                    record: None,
                    bundle_hash: String::new(),
                    endpoint: None,
                });
                if let Ok(state) = std::fs::read(entry.path().join("state.json")) {
                    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&state) {
                        l.pid = v["pid"].as_i64().and_then(|p| i32::try_from(p).ok());
                    }
                }
                let bundle = self.bundles_dir().join(&id).join("config.json");
                let record = self.bundles_dir().join(&id).join(adopt::RECORD);
                if record.exists() {
                    l.bundle_hash = std::fs::read(&bundle)
                        .map(|c| adopt::config_hash(&c))
                        .unwrap_or_default();
                    l.record = Some(adopt::Record::load(&record));
                }
                if let Ok(config) = std::fs::read(&bundle) {
                    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&config) {
                        // The service's name: its annotation, else (bundles written before
                        // the annotation was read here) the container's host name.
                        if let Some(h) = v["annotations"]["org.keelson.service"]
                            .as_str()
                            .or(v["hostname"].as_str())
                        {
                            l.service = h.to_owned();
                        }
                        l.endpoint = v["annotations"][netplug::ANNOTATION]
                            .as_str()
                            .map(str::to_owned);
                        if let Some(p) = v["linux"]["cgroupsPath"].as_str() {
                            l.cgroup_path = Some(p.to_owned());
                            by_cgroup.insert(normalize_cgroup(p), id.clone());
                        }
                    }
                }
            }
        }
        // Only cgroups that exist count; a recorded path that is gone is dropped.
        for l in found.values_mut() {
            if let Some(p) = &l.cgroup_path {
                let dir = self.cgroup_dir(p);
                if dir.is_dir() {
                    l.populated = cgroup::populated(&dir).unwrap_or(false);
                } else {
                    l.cgroup_path = None;
                }
            }
        }
        let own = own_cgroup();
        let parent = normalize_cgroup(&self.cgroup_parent);
        if let Ok(entries) = std::fs::read_dir(self.cgroup_dir(&parent)) {
            for entry in entries.flatten() {
                if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                    continue;
                }
                let leaf = entry.file_name().to_string_lossy().into_owned();
                let path = format!("{parent}/{leaf}");
                if by_cgroup.contains_key(&path)
                    || own.as_deref().is_some_and(|o| o.starts_with(&path))
                {
                    continue;
                }
                let populated = cgroup::populated(&entry.path()).unwrap_or(false);
                found.insert(
                    format!("\0{path}"),
                    Leftover {
                        service: leaf,
                        id: None,
                        pid: None,
                        cgroup_path: Some(path),
                        populated,
                        record: None,
                        bundle_hash: String::new(),
                        endpoint: None,
                    },
                );
            }
        }
        found.into_values().collect()
    }

    /// Kills and removes one leftover (processes, cgroup, state, bundle).
    pub async fn clean(&self, l: &Leftover) -> Result<()> {
        let id = l.id.as_deref().unwrap_or("");
        match l.cgroup_path.as_deref() {
            Some(cgroup) => self
                .remove(id, cgroup)
                .await
                .with_context(|| format!("removing leftover {}", id_or(cgroup, id))),
            None => {
                // No cgroup: only files, but the recorded init may still run outside one (it
                // died before being moved, or the cgroup was removed by hand). Kill it only
                // if it still is our child, so a reused pid is never hit.
                if let Some(pid) = l.pid {
                    if is_container_init(pid) {
                        let _ = signal(pid, libc::SIGKILL);
                    }
                }
                self.remove_files(id).await
            }
        }
    }

    /// Kills and removes every leftover; returns what was found.
    pub async fn cleanup_leftovers(&self) -> Result<Vec<Leftover>> {
        let leftovers = self.leftovers();
        for l in &leftovers {
            self.clean(l).await?;
        }
        Ok(leftovers)
    }

    async fn remove_files(&self, id: &str) -> Result<()> {
        if id.is_empty() {
            return Ok(());
        }
        unmount_rootfs(&self.bundles_dir().join(id))?;
        for dir in [self.containers_dir().join(id), self.bundles_dir().join(id)] {
            match tokio::fs::remove_dir_all(&dir).await {
                Err(e) if e.kind() != io::ErrorKind::NotFound => {
                    return Err(e).with_context(|| format!("removing {}", dir.display()))
                }
                _ => {}
            }
        }
        Ok(())
    }
}

/// How long a start waits for the kernel's overlay file system (init loads the module in the
/// background while sysd starts).
const OVERLAY_WAIT: Duration = Duration::from_secs(10);

/// Mounts the container's root: an overlay of the (read-only) image directories (its layers,
/// top first) with an empty upper layer on /run, at `BUNDLE/rootfs`. The image itself is never
/// written, and the runtime can create mount points that the image lacks (a user's volume at
/// /data) in the upper layer before the root is made read-only. Returns the mount point.
async fn mount_rootfs(bundle: &Path, image: &[PathBuf]) -> Result<PathBuf> {
    use nix::mount::{mount, MsFlags};
    let (upper, work, merged) = (
        bundle.join("upper"),
        bundle.join("work"),
        bundle.join("rootfs"),
    );
    for dir in [&upper, &work, &merged] {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let mut dirs = Vec::with_capacity(image.len());
    for dir in image {
        let dir = dir.display().to_string();
        if dir.contains([',', ':']) || dir.contains('\\') {
            bail!("image path {dir} cannot contain ',', ':' or '\\' (overlayfs option syntax)");
        }
        dirs.push(dir);
    }
    let lower = dirs.join(":");
    let options = format!(
        "lowerdir={lower},upperdir={},workdir={}",
        upper.display(),
        work.display()
    );
    // The kernel takes a page of options (legacy mount data).
    if options.len() > 4095 {
        bail!(
            "the image's {} layers do not fit one overlay mount's options ({} bytes)",
            image.len(),
            options.len()
        );
    }
    let deadline = tokio::time::Instant::now() + OVERLAY_WAIT;
    loop {
        match mount(
            Some("overlay"),
            &merged,
            Some("overlay"),
            MsFlags::MS_NODEV,
            Some(options.as_str()),
        ) {
            Ok(()) => return Ok(merged),
            Err(nix::errno::Errno::ENODEV) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => {
                return Err(e).with_context(|| {
                    format!("mounting an overlay of {lower} on {}", merged.display())
                })
            }
        }
    }
}

/// Whether `path` is an ELF executable without a program interpreter (it runs in any root).
pub fn is_static_elf(path: &Path) -> Result<bool> {
    let data = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let u16_at = |o: usize| {
        data.get(o..o + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]) as usize)
    };
    let u64_at = |o: usize| {
        data.get(o..o + 8)
            .and_then(|b| b.try_into().ok())
            .map(|b| u64::from_le_bytes(b) as usize)
    };
    if !data.starts_with(b"\x7fELF\x02\x01") {
        bail!("{} is not a 64-bit little-endian ELF file", path.display());
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38))
    else {
        bail!("{}: truncated ELF header", path.display());
    };
    const PT_INTERP: u32 = 3;
    Ok((0..phnum).all(|i| {
        let at = phoff + i * phentsize;
        data.get(at..at + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            != Some(PT_INTERP)
    }))
}

/// Unmounts `BUNDLE/rootfs` if it is mounted (idempotent).
fn unmount_rootfs(bundle: &Path) -> Result<()> {
    let merged = bundle.join("rootfs");
    match nix::mount::umount2(&merged, nix::mount::MntFlags::MNT_DETACH) {
        Ok(()) | Err(nix::errno::Errno::EINVAL | nix::errno::Errno::ENOENT) => Ok(()),
        Err(e) => Err(e).with_context(|| format!("unmounting {}", merged.display())),
    }
}

fn id_or<'a>(cgroup: &'a str, id: &'a str) -> &'a str {
    if id.is_empty() {
        cgroup
    } else {
        id
    }
}

fn normalize_cgroup(p: &str) -> String {
    format!("/{}", p.trim_matches('/'))
}

/// This process's cgroup v2 path (`0::/path` in /proc/self/cgroup).
fn own_cgroup() -> Option<String> {
    let s = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(normalize_cgroup)
}

/// Whether `pid` looks like a container init left by us: its parent is this process.
fn is_container_init(pid: i32) -> bool {
    parent_pid(pid).is_ok_and(|p| p == std::process::id() as i32)
}

fn keep(output: &mut Vec<u8>, data: &[u8]) {
    let room = EXEC_OUTPUT_LIMIT.saturating_sub(output.len());
    output.extend_from_slice(&data[..data.len().min(room)]);
}

/// The helper's error line(s), for the caller's message.
fn helper_error(stderr: &[u8], status: std::process::ExitStatus) -> String {
    let text = String::from_utf8_lossy(stderr);
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    match lines.last() {
        // The last line is the helper's own one-line summary; earlier lines are
        // libcontainer's warnings, kept for context.
        Some(last) if lines.len() > 1 => format!(
            "{last} (runtime log: {})",
            lines[..lines.len() - 1].join(" | ")
        ),
        Some(last) => (*last).to_owned(),
        None => format!("runtime helper failed ({status}) without a message"),
    }
}

/// Marks this process as a child subreaper: orphaned descendants (container inits once the
/// helper that created them exits) are reparented to it rather than to PID 1.
pub fn become_subreaper() -> io::Result<()> {
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Waits until the process behind `pidfd` (a child of ours) exits, reaps it and returns how
/// it ended. Several waiters may exist at once (each registers its own duplicate of the
/// pidfd); the first to reap gets the status, the others then fail with ECHILD.
pub async fn wait_exit(pidfd: &OwnedFd) -> io::Result<ExitInfo> {
    // A private duplicate: epoll registrations are per (fd, file), so concurrent waiters on
    // the same pidfd do not collide (EEXIST).
    let own = pidfd.try_clone()?;
    // SAFETY: `own` is owned by the AsyncFd for its whole lifetime and never replaced.
    let fd = unsafe { AsyncFd::register_with_interest(own, Interest::READABLE) }?;
    loop {
        let mut guard = fd.readable().await?;
        if let Some(info) = waitid_pidfd(pidfd.as_raw_fd(), libc::WNOHANG)? {
            return Ok(info);
        }
        guard.clear_ready();
    }
}

/// Waits until the process behind `pidfd` has exited, without reaping it (it need not be our
/// child: an adopted container's init is init's).
pub async fn wait_pidfd(pidfd: &OwnedFd) -> io::Result<()> {
    let own = pidfd.try_clone()?;
    // SAFETY: `own` is owned by the AsyncFd for its whole lifetime and never replaced.
    let fd = unsafe { AsyncFd::register_with_interest(own, Interest::READABLE) }?;
    // A pidfd polls readable once its process has exited.
    let _guard = fd.readable().await?;
    Ok(())
}

/// Opens a pidfd on `pid` (for an adopted container: check it is still the recorded process
/// afterwards, so a pid reused in between is not taken for it).
pub fn open_pidfd(pid: i32) -> io::Result<OwnedFd> {
    pidfd_open(pid)
}

/// Raises a pipe's buffer to `bytes` (`F_SETPIPE_SZ`): what a service may write while no sysd
/// reads its output.
pub fn set_pipe_size(fd: &OwnedFd, bytes: usize) -> io::Result<()> {
    let bytes = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    // SAFETY: fcntl on a valid fd with an integer argument.
    if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETPIPE_SZ, bytes) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn waitid_pidfd(pidfd: RawFd, flags: libc::c_int) -> io::Result<Option<ExitInfo>> {
    loop {
        // SAFETY: siginfo_t is plain data; all-zero is valid and lets us detect "no child
        // changed state" (si_pid stays 0 with WNOHANG).
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: waitid writes into `info`, which outlives the call.
        let r = unsafe {
            libc::waitid(
                libc::P_PIDFD,
                pidfd as libc::id_t,
                &mut info,
                libc::WEXITED | flags,
            )
        };
        if r != 0 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return Err(err);
        }
        // SAFETY: after a successful waitid the SIGCHLD fields of siginfo are the valid ones.
        let (pid, status) = unsafe { (info.si_pid(), info.si_status()) };
        if pid == 0 {
            return Ok(None);
        }
        return Ok(Some(if info.si_code == libc::CLD_EXITED {
            ExitInfo::Exited(status)
        } else {
            ExitInfo::Signaled(status)
        }));
    }
}

/// Sends `sig` to `pid`. Prefer [`signal_pidfd`] for a container init: a pid can be reused.
pub fn signal(pid: i32, sig: i32) -> io::Result<()> {
    // SAFETY: kill(2) with integer arguments.
    if unsafe { libc::kill(pid, sig) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Sends `sig` to the process behind `pidfd`.
pub fn signal_pidfd(pidfd: &OwnedFd, sig: i32) -> io::Result<()> {
    // SAFETY: pidfd_send_signal with a valid fd, no siginfo and no flags.
    let r = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            sig,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open has no memory arguments; the result is checked.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// The parent pid of `pid`, from /proc/PID/stat (field 4, after the parenthesised comm).
fn parent_pid(pid: i32) -> io::Result<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after = stat.rsplit_once(')').map(|(_, a)| a).unwrap_or("");
    after
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "malformed /proc/PID/stat"))
}

fn dup_above(fd: &OwnedFd, min: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: F_DUPFD_CLOEXEC duplicates a valid fd; the result is checked and owned below.
    let new = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, min) };
    if new < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(new) })
}

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two fds into the array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both are fresh descriptors owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}
