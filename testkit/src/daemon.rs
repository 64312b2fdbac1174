//! A sysd daemon for host tests and benchmarks: its state in one directory (`system/`, `var/`,
//! `run/sysd.sock`, `sysd.log`), in a private mount namespace with cgroup2 at /sys/fs/cgroup,
//! its services under its own cgroup parent, which is killed and removed on drop. Optionally
//! under init's own supervision (`keelson-init supervise`, [`Daemon::under_init`]): the notify
//! channel, the FD store and orphan exits as on a node, and sysd restarted when it dies.

use std::io;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::{cgroup, http};

/// How requests wait for an answer (pulls and applies can take a while).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);

/// A sysd, started and restarted with the same command line.
pub struct Daemon {
    exe: PathBuf,
    dir: PathBuf,
    cgroup_parent: String,
    args: Vec<String>,
    env: Vec<(String, String)>,
    prefix: Vec<String>,
    unshare: Vec<String>,
    init: Option<PathBuf>,
    child: Option<Child>,
}

/// The workspace's `keelson-init`, built on first use (`$KEELSON_INIT` overrides): host tests
/// of another package cannot name its binary.
pub fn init_exe() -> PathBuf {
    static EXE: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    EXE.get_or_init(|| {
        if let Some(p) = std::env::var_os("KEELSON_INIT") {
            return PathBuf::from(p);
        }
        // The test binary is <target>/<profile>/deps/NAME; build next to it.
        let exe = std::env::current_exe().expect("current_exe");
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("a test binary under <target>/<profile>/deps");
        let target = profile_dir.parent().expect("the target directory");
        let release = profile_dir.file_name().is_some_and(|n| n == "release");
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "-q", "-p", "keelson-init", "--bin", "keelson-init"])
            .env("CARGO_TARGET_DIR", target);
        if release {
            cmd.arg("--release");
        }
        let status = cmd.status().expect("running cargo build -p keelson-init");
        assert!(status.success(), "cargo build -p keelson-init failed");
        profile_dir.join("keelson-init")
    })
    .clone()
}

impl Daemon {
    /// A daemon (not started) running `exe` with its state under `dir` and its services under
    /// `cgroup_parent`; `system/` is created.
    pub fn new(exe: impl Into<PathBuf>, dir: &Path, cgroup_parent: impl Into<String>) -> Daemon {
        let _ = std::fs::create_dir_all(dir.join("system"));
        Daemon {
            exe: exe.into(),
            dir: dir.to_path_buf(),
            cgroup_parent: cgroup_parent.into(),
            args: Vec::new(),
            env: Vec::new(),
            prefix: Vec::new(),
            unshare: Vec::new(),
            init: None,
            child: None,
        }
    }

    /// Runs sysd under `keelson-init supervise` (`init` is its binary, e.g. [`init_exe`]).
    pub fn under_init(mut self, init: impl Into<PathBuf>) -> Daemon {
        self.init = Some(init.into());
        self
    }

    /// A cgroup parent unique to this process and `dir` (`/keelson-NAME-PID-DIRNAME`).
    pub fn cgroup_parent_for(name: &str, dir: &Path) -> String {
        format!(
            "/keelson-{name}-{}-{}",
            std::process::id(),
            dir.file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .trim_start_matches('.')
        )
    }

    /// Adds sysd arguments (after the state directory ones).
    pub fn args<I: IntoIterator<Item = S>, S: Into<String>>(mut self, args: I) -> Daemon {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Sets an environment variable of sysd.
    pub fn env(mut self, key: &str, value: &str) -> Daemon {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Runs `unshare` under this command (e.g. `ip netns exec NS`).
    pub fn prefix<I: IntoIterator<Item = S>, S: Into<String>>(mut self, prefix: I) -> Daemon {
        self.prefix.extend(prefix.into_iter().map(Into::into));
        self
    }

    /// More namespaces for `unshare` than the mount namespace (e.g. `-u`).
    pub fn unshare<I: IntoIterator<Item = S>, S: Into<String>>(mut self, flags: I) -> Daemon {
        self.unshare.extend(flags.into_iter().map(Into::into));
        self
    }

    /// Starts sysd (its output appended to `sysd.log`); does not wait for it.
    pub fn spawn(&mut self) -> io::Result<()> {
        let d = self.dir.display();
        let script = format!(
            "mount -t cgroup2 none /sys/fs/cgroup 2>/dev/null; exec {} --system-dir {d}/system --user-config {d}/var/services.toml --run-dir {d}/run --socket {d}/run/sysd.sock --volumes {d}/var/volumes --log-dir {d}/var/log --cgroup-parent {} {}",
            self.exe.display(),
            self.cgroup_parent,
            self.args.join(" ")
        );
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.path("sysd.log"))?;
        let unshare = crate::tools::path("unshare").display().to_string();
        let mut argv: Vec<String> = self.prefix.clone();
        if let Some(init) = &self.init {
            argv.extend([init.display().to_string(), "supervise".into(), "--".into()]);
        }
        argv.push(unshare);
        let mut cmd = Command::new(&argv[0]);
        cmd.args(&argv[1..]);
        cmd.arg("-m")
            .args(&self.unshare)
            .args(["--propagation", "private", "sh", "-c", &script])
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        self.child = Some(cmd.spawn()?);
        Ok(())
    }

    /// Starts sysd and waits for its API socket; panics with the log if it never comes.
    pub fn start(&mut self, timeout: Duration) {
        self.spawn().expect("spawning sysd");
        self.wait_until("the API socket", timeout, |d| {
            UnixStream::connect(d.socket()).is_ok()
        });
    }

    /// Polls `ok` every 50 ms until it holds; panics after `timeout` with sysd's log.
    pub fn wait_until(&self, what: &str, timeout: Duration, mut ok: impl FnMut(&Daemon) -> bool) {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if ok(self) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "timed out waiting for {what}\n--- sysd log ---\n{}",
            self.log()
        );
    }

    /// A path under the state directory.
    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.join(rel)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn socket(&self) -> PathBuf {
        self.path("run/sysd.sock")
    }

    pub fn cgroup_parent(&self) -> &str {
        &self.cgroup_parent
    }

    /// sysd's output so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.path("sysd.log")).unwrap_or_default()
    }

    /// One API request; see [`http::request`].
    pub fn try_request(&self, method: &str, path: &str, body: &str) -> io::Result<(u16, String)> {
        http::request(&self.socket(), method, path, body, REQUEST_TIMEOUT)
    }

    /// One API request; panics (with the log) if sysd cannot be reached.
    pub fn request(&self, method: &str, path: &str, body: &str) -> (u16, String) {
        self.try_request(method, path, body)
            .unwrap_or_else(|e| panic!("{method} {path}: {e}\n--- sysd log ---\n{}", self.log()))
    }

    /// The events so far; see [`http::events`].
    pub fn events(&self) -> Vec<Value> {
        http::events(&self.socket()).expect("events")
    }

    /// sysd's pid: the process started (`unshare`, which execs sysd), or under init the sysd
    /// init started last.
    pub fn pid(&self) -> Option<u32> {
        if self.init.is_none() {
            return self.child.as_ref().map(Child::id);
        }
        self.child.as_ref()?;
        self.log().lines().rev().find_map(|l| {
            let rest = l.split("sysd started (pid ").nth(1)?;
            rest.split(')').next()?.parse().ok()
        })
    }

    /// Under init: SIGKILL to sysd alone (a crash); init restarts it. Returns the pid killed.
    pub fn kill_sysd(&self) -> Option<u32> {
        let pid = self.pid()?;
        // SAFETY: kill(2) with integer arguments.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        Some(pid)
    }

    /// SIGTERM, then waits for sysd to exit.
    pub fn terminate(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let _ = child.wait();
        }
    }

    /// SIGKILL, then waits (the services are left behind, as after a crash). Under init, init
    /// goes first (so it restarts nothing), then sysd.
    pub fn kill(&mut self) {
        let sysd = self.init.as_ref().and(self.pid());
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Some(pid) = sysd {
            // SAFETY: kill(2) with integer arguments; the pid was sysd's, now reparented.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
        cgroup::remove_tree(&self.cgroup_parent);
    }
}
