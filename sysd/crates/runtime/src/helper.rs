//! `sysd runtime …`: the short-lived, single-threaded process that drives libcontainer.
//!
//! libcontainer forks and clones (and calls `unshare`, `setns`), which is only sound in a
//! single-threaded process, and it blocks; so the tokio daemon re-executes its own binary as
//! this helper for every create/exec/delete instead of calling libcontainer in-process.
//!
//! ```text
//! sysd runtime create --root R --id ID --bundle DIR   # container stdout = fd 3, stderr = fd 4
//! sysd runtime exec   --root R --id ID [--timeout-ms N] -- ARGV...
//! sysd runtime delete --root R --id ID
//! ```
//!
//! `create` builds and starts the container detached and prints the pid of its init as one
//! line. The init is a child of this helper (libcontainer clones it with `CLONE_PARENT` from
//! an intermediate process), so when the helper exits it is reparented to the nearest child
//! subreaper: sysd. `exec` runs a process in the running container and exits with its status
//! (128+N for signal N, 124 on timeout, 125 when it could not be started). Errors are one line
//! on stderr (the whole cause chain) and exit status 1 (125 for exec); libcontainer's own
//! `tracing` output goes to stderr at WARN and above.

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use libcontainer::container::builder::ContainerBuilder;
use libcontainer::container::Container;
use libcontainer::syscall::syscall::SyscallType;
use libcontainer::workload::default::DefaultExecutor;
use libcontainer::workload::{
    Executor, ExecutorError, ExecutorSetEnvsError, ExecutorValidationError,
};

/// Exit status of `exec` when the command ran past `--timeout-ms` (as timeout(1)).
pub const EXIT_TIMEOUT: u8 = 124;
/// Exit status of `exec` when the command could not be started.
pub const EXIT_EXEC_FAILED: u8 = 125;

/// Entry point for `sysd runtime ARGS...`; `args` are the words after `runtime`.
pub fn helper_main(args: &[String]) -> ExitCode {
    // libcontainer reports through `tracing`; keep WARN and above (or the level named by
    // $KEELSON_RUNTIME_LOG, for debugging), on our stderr, unadorned.
    let level = std::env::var("KEELSON_RUNTIME_LOG")
        .ok()
        .and_then(|l| l.parse::<tracing::Level>().ok())
        .unwrap_or(tracing::Level::WARN);
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_max_level(level)
        .with_target(false)
        .without_time()
        .with_ansi(false)
        .try_init();
    let Some((cmd, rest)) = args.split_first() else {
        eprintln!("usage: sysd runtime create|exec|delete --root DIR --id ID ...");
        return ExitCode::from(2);
    };
    match cmd.as_str() {
        "create" => match Args::parse(rest).and_then(|a| create(&a)) {
            Ok(pid) => {
                println!("{pid}");
                ExitCode::SUCCESS
            }
            Err(err) => {
                kill_and_reap_children();
                eprintln!("create: {err:#}");
                ExitCode::FAILURE
            }
        },
        "exec" => {
            let result = Args::parse(rest).and_then(|a| exec(&a));
            // Whatever happened, no process of ours may outlive the helper: it would be
            // reparented to sysd, which does not know it, and as an unreaped zombie in the
            // container's pid namespace it would keep that namespace's init from exiting.
            kill_and_reap_children();
            match result {
                Ok(code) => ExitCode::from(code),
                Err(err) => {
                    eprintln!("exec: {err:#}");
                    ExitCode::from(EXIT_EXEC_FAILED)
                }
            }
        }
        "delete" => match Args::parse(rest).and_then(|a| delete(&a)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                eprintln!("delete: {err:#}");
                ExitCode::FAILURE
            }
        },
        other => {
            eprintln!("sysd runtime: unknown command {other:?} (create, exec, delete)");
            ExitCode::from(2)
        }
    }
}

#[derive(Debug, Default)]
struct Args {
    root: Option<PathBuf>,
    id: Option<String>,
    bundle: Option<PathBuf>,
    timeout: Option<Duration>,
    argv: Vec<String>,
}

impl Args {
    fn parse(args: &[String]) -> Result<Self> {
        let mut out = Args::default();
        let mut it = args.iter();
        while let Some(arg) = it.next() {
            let mut value = || {
                it.next()
                    .cloned()
                    .ok_or_else(|| anyhow!("{arg} needs a value"))
            };
            match arg.as_str() {
                "--root" => out.root = Some(value()?.into()),
                "--id" => out.id = Some(value()?),
                "--bundle" => out.bundle = Some(value()?.into()),
                "--timeout-ms" => {
                    let v = value()?;
                    let ms: u64 = v.parse().with_context(|| format!("--timeout-ms {v:?}"))?;
                    out.timeout = Some(Duration::from_millis(ms));
                }
                "--" => {
                    out.argv = it.cloned().collect();
                    break;
                }
                other => bail!("unknown argument {other:?}"),
            }
        }
        Ok(out)
    }

    fn root(&self) -> Result<&Path> {
        self.root
            .as_deref()
            .ok_or_else(|| anyhow!("--root is required"))
    }

    fn id(&self) -> Result<&str> {
        self.id
            .as_deref()
            .ok_or_else(|| anyhow!("--id is required"))
    }
}

/// Takes ownership of an inherited descriptor, checking that it is open.
fn inherited_fd(fd: RawFd, what: &str) -> Result<OwnedFd> {
    // SAFETY: F_GETFD only queries the descriptor flags; an invalid fd yields -1/EBADF.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        bail!("fd {fd} ({what}) is not open");
    }
    // SAFETY: the fd is open (checked above), was inherited for this purpose and nothing else
    // in this process owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn create(args: &Args) -> Result<i32> {
    let root = args.root()?;
    let id = args.id()?;
    let bundle = args
        .bundle
        .as_deref()
        .ok_or_else(|| anyhow!("--bundle is required"))?;
    let stdout = inherited_fd(3, "container stdout")?;
    let stderr = inherited_fd(4, "container stderr")?;
    let stdin = File::open("/dev/null").context("opening /dev/null")?;

    let path = bundle.join("config.json");
    let spec = oci_spec::runtime::Spec::load(&path)
        .with_context(|| format!("reading {}", path.display()))?;
    let mut container = ContainerBuilder::new(id.to_owned(), SyscallType::default())
        .with_executor(Confined::for_bundle(bundle, &spec)?)
        .with_root_path(root)
        .with_context(|| format!("state root {}", root.display()))?
        .validate_id()
        .with_context(|| format!("container id {id:?}"))?
        .with_stdin(stdin)
        .with_stdout(stdout)
        .with_stderr(stderr)
        .as_init(bundle)
        .with_systemd(false)
        .with_detach(true)
        .build()
        .with_context(|| format!("creating container {id} from {}", bundle.display()))?;
    let pid = container
        .pid()
        .ok_or_else(|| anyhow!("container {id} has no init pid after create"))?
        .as_raw();

    // A bridge service: plugged into the bridge before its process starts (this also
    // brings lo up and leaves us in its namespace, so loopback_up finds nothing to do).
    let plugged = match bridge_endpoint(&spec) {
        Ok(Some(ep)) => super::netplug::plug(pid, &ep)
            .with_context(|| format!("plugging container {id} into bridge {}", ep.bridge)),
        Ok(None) => Ok(()),
        Err(e) => Err(e),
    };
    let started = plugged
        .and_then(|()| loopback_up(pid))
        .context("bringing up lo in the container's network namespace")
        .and_then(|()| {
            container
                .start()
                .with_context(|| format!("starting container {id}"))
        });
    if let Err(err) = started {
        // Leave nothing half-made behind: the init waits in its namespaces for the start
        // signal that will not come.
        if let Err(del) = container.delete(true) {
            eprintln!("create: cleaning up container {id} after a failed start: {del}");
        }
        return Err(err);
    }
    Ok(pid)
}

/// The container's command run as libcontainer's default executor runs it, under the seccomp
/// program sysd compiled for the bundle ([`bundle::write_compiled`](super::bundle::write_compiled)),
/// loaded where libcontainer would have loaded the profile it compiled itself (see
/// `setup_envs`). Also what `exec` runs, so a process exec'd into the container is filtered the
/// same way.
#[derive(Clone)]
struct Confined {
    program: Option<std::sync::Arc<Vec<libc::sock_filter>>>,
}

impl Confined {
    fn for_bundle(bundle: &Path, spec: &oci_spec::runtime::Spec) -> Result<Confined> {
        if spec.linux().as_ref().is_some_and(|l| l.seccomp().is_some()) {
            bail!(
                "{}: config.json carries a seccomp profile; this runtime takes it compiled \
                 (annotation {}, written by sysd), and libcontainer here cannot compile one",
                bundle.display(),
                super::bundle::SECCOMP_ANNOTATION
            );
        }
        let program = super::bundle::compiled_program(bundle, spec)
            .context("the container's seccomp program")?;
        Ok(Confined {
            program: program.map(std::sync::Arc::new),
        })
    }
}

impl Executor for Confined {
    fn exec(&self, spec: &oci_spec::runtime::Spec) -> Result<(), ExecutorError> {
        DefaultExecutor {}.exec(spec)
    }

    fn validate(&self, spec: &oci_spec::runtime::Spec) -> Result<(), ExecutorValidationError> {
        DefaultExecutor {}.validate(spec)
    }

    /// The last step libcontainer's init takes before it tells the helper it is ready and
    /// waits for the start: the program is loaded here, at the place libcontainer loaded the
    /// profile it compiled (after capabilities are dropped and no_new_privs is set), so the
    /// process waits for its start, and an exec'd one sits in the container's namespaces,
    /// already filtered.
    fn setup_envs(&self, envs: HashMap<String, String>) -> Result<(), ExecutorSetEnvsError> {
        DefaultExecutor {}.setup_envs(envs)?;
        if let Some(program) = &self.program {
            super::seccomp::load(program).map_err(|e| {
                ExecutorSetEnvsError::Other(format!("loading the container's seccomp program: {e}"))
            })?;
        }
        Ok(())
    }
}

/// The bridge endpoint sysd recorded in the bundle's annotations, if any.
fn bridge_endpoint(spec: &oci_spec::runtime::Spec) -> Result<Option<super::netplug::Endpoint>> {
    let Some(text) = spec
        .annotations()
        .as_ref()
        .and_then(|a| a.get(super::netplug::ANNOTATION))
    else {
        return Ok(None);
    };
    serde_json::from_str(text)
        .map(Some)
        .with_context(|| format!("annotation {}", super::netplug::ANNOTATION))
}

/// Sets `lo` up in the network namespace of `pid` when it is not ours (runc leaves it down;
/// Docker brings it up, and services expect 127.0.0.1 to work).
fn loopback_up(pid: i32) -> Result<()> {
    let theirs = format!("/proc/{pid}/ns/net");
    let same = std::fs::read_link("/proc/self/ns/net").ok() == std::fs::read_link(&theirs).ok();
    if same {
        return Ok(());
    }
    let ns = File::open(&theirs).with_context(|| format!("opening {theirs}"))?;
    // SAFETY: setns on an fd we own; this helper is single-threaded and exits soon, so
    // switching its network namespace affects nothing else.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error()).context("setns");
    }
    // SAFETY: plain socket(2) call; the result is checked and owned below.
    let sock = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if sock < 0 {
        return Err(std::io::Error::last_os_error()).context("socket");
    }
    // SAFETY: `sock` is a fresh descriptor owned by nobody else.
    let sock = unsafe { OwnedFd::from_raw_fd(sock) };
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS reads into `req`, a properly sized ifreq naming "lo".
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) } != 0 {
        return Err(std::io::Error::last_os_error()).context("SIOCGIFFLAGS lo");
    }
    // SAFETY: the union member written by SIOCGIFFLAGS is ifru_flags.
    unsafe { req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short };
    // SAFETY: SIOCSIFFLAGS reads `req` (name + flags).
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) } != 0 {
        return Err(std::io::Error::last_os_error()).context("SIOCSIFFLAGS lo");
    }
    Ok(())
}

fn exec(args: &Args) -> Result<u8> {
    let root = args.root()?;
    let id = args.id()?;
    if args.argv.is_empty() {
        bail!("no command (usage: exec --root R --id ID [--timeout-ms N] -- ARGV...)");
    }
    let (sub_cgroup, confined) = exec_context(&root.join(id))?;
    let pid = ContainerBuilder::new(id.to_owned(), SyscallType::default())
        .with_executor(confined)
        .with_root_path(root)
        .with_context(|| format!("state root {}", root.display()))?
        .as_tenant()
        .with_sub_cgroup(sub_cgroup)
        .with_container_args(args.argv.clone())
        .with_detach(false)
        .build()
        .with_context(|| format!("running {:?} in container {id}", args.argv[0]))?
        .as_raw();
    wait_child(pid, args.timeout)
}

/// What `exec` needs of container `dir`: the cgroup its process joins ([`exec_leaf`]) and the
/// container's seccomp program.
fn exec_context(dir: &Path) -> Result<(Option<String>, Confined)> {
    let container =
        Container::load(dir.to_owned()).with_context(|| format!("loading {}", dir.display()))?;
    let bundle = container.bundle();
    let path = bundle.join("config.json");
    let spec = oci_spec::runtime::Spec::load(&path)
        .with_context(|| format!("reading {}", path.display()))?;
    Ok((exec_leaf(&container)?, Confined::for_bundle(bundle, &spec)?))
}

/// The cgroup below the container's that an exec'd process joins, if it cannot join the
/// container's own: a delegated engine (the node agent contract) that enabled controllers for
/// its children has a cgroup that, by cgroup v2's no-internal-processes rule, can hold no
/// process (joining it fails with EBUSY). Its execs then go to the leaf
/// [`cgroup::EXEC_LEAF`](super::cgroup::EXEC_LEAF), made on first use inside the engine's
/// subtree (removed with the container's other descendants), as `runc exec --cgroup` does.
fn exec_leaf(container: &Container) -> Result<Option<String>> {
    let Ok(cfg) = container.spec() else {
        return Ok(None);
    };
    let rel = cfg
        .cgroup_path
        .strip_prefix("/")
        .unwrap_or(&cfg.cgroup_path);
    let cgroup = Path::new("/sys/fs/cgroup").join(rel);
    Ok(super::cgroup::holds_no_process(&cgroup).then(|| super::cgroup::EXEC_LEAF.to_owned()))
}

/// Waits for child `pid`; on timeout kills it and returns [`EXIT_TIMEOUT`].
fn wait_child(pid: i32, timeout: Option<Duration>) -> Result<u8> {
    let deadline = timeout.map(|t| Instant::now() + t);
    // SAFETY: pidfd_open has no memory arguments; the result is checked.
    let raw = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    let pidfd = if raw >= 0 {
        // SAFETY: a fresh descriptor returned by pidfd_open, owned here only.
        Some(unsafe { OwnedFd::from_raw_fd(raw as RawFd) })
    } else {
        None
    };
    loop {
        let mut status = 0;
        // SAFETY: waitpid on our own child with a valid out pointer.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if r == pid {
            return Ok(if libc::WIFEXITED(status) {
                libc::WEXITSTATUS(status) as u8
            } else {
                (128 + libc::WTERMSIG(status)) as u8
            });
        }
        if r < 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return Err(err).context("waitpid");
        }
        let remaining = match deadline {
            Some(d) => {
                let now = Instant::now();
                if now >= d {
                    // SAFETY: signalling our own unreaped child (the pid cannot be reused).
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                    let mut status = 0;
                    // SAFETY: as above, blocking reap of our child.
                    unsafe { libc::waitpid(pid, &mut status, 0) };
                    eprintln!(
                        "exec: timed out after {} ms, killed",
                        timeout.unwrap_or_default().as_millis()
                    );
                    return Ok(EXIT_TIMEOUT);
                }
                (d - now).as_millis().min(i32::MAX as u128) as i32
            }
            None => -1,
        };
        match &pidfd {
            Some(fd) => {
                let mut pfd = libc::pollfd {
                    fd: fd.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd.
                unsafe { libc::poll(&mut pfd, 1, remaining) };
            }
            None => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

/// Our child processes, from /proc/self/task/*/children (falls back to scanning /proc).
fn children() -> Vec<i32> {
    let me = std::process::id() as i32;
    let mut kids = Vec::new();
    let mut listed = false;
    if let Ok(tasks) = std::fs::read_dir("/proc/self/task") {
        for t in tasks.flatten() {
            if let Ok(text) = std::fs::read_to_string(t.path().join("children")) {
                listed = true;
                kids.extend(
                    text.split_whitespace()
                        .filter_map(|p| p.parse::<i32>().ok()),
                );
            }
        }
    }
    if !listed {
        if let Ok(procs) = std::fs::read_dir("/proc") {
            for p in procs.flatten() {
                let Some(pid) = p.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
                    continue;
                };
                let stat = std::fs::read_to_string(p.path().join("stat")).unwrap_or_default();
                let ppid = stat
                    .rsplit_once(')')
                    .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                    .and_then(|s| s.parse::<i32>().ok());
                if ppid == Some(me) {
                    kids.push(pid);
                }
            }
        }
    }
    kids
}

/// SIGKILLs and reaps every child of the helper (libcontainer's intermediate and init
/// processes left behind by a failure, or an exec'd process).
fn kill_and_reap_children() {
    for _ in 0..100 {
        let kids = children();
        if kids.is_empty() {
            return;
        }
        for &pid in &kids {
            // SAFETY: signalling our own (unreaped, so not reusable) child.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        for &pid in &kids {
            let mut status = 0;
            // SAFETY: waitpid on our child with a valid out pointer.
            unsafe { libc::waitpid(pid, &mut status, 0) };
        }
    }
}

fn delete(args: &Args) -> Result<()> {
    let root = args.root()?;
    let id = args.id()?;
    let dir = root.join(id);
    if !dir.join("state.json").exists() {
        // Already gone (or never fully created): remove whatever is left.
        return match std::fs::remove_dir_all(&dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(e).with_context(|| format!("removing {}", dir.display()))
            }
            _ => Ok(()),
        };
    }
    let mut container =
        Container::load(dir.clone()).with_context(|| format!("loading {}", dir.display()))?;
    // A delegated service's own child cgroups: libcontainer removes only the container's.
    if let Ok(cfg) = container.spec() {
        let rel = cfg
            .cgroup_path
            .strip_prefix("/")
            .unwrap_or(&cfg.cgroup_path);
        super::cgroup::remove_descendants(&Path::new("/sys/fs/cgroup").join(rel))
            .with_context(|| format!("deleting container {id}"))?;
    }
    container
        .delete(true)
        .with_context(|| format!("deleting container {id}"))?;
    Ok(())
}
