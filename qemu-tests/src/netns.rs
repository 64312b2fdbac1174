//! A throwaway network namespace per guest (or per cluster of guests).
//!
//! Every QEMU guest of the test suite runs inside its own [`NetNs`], or in the one a
//! [`crate::cluster`] shares between its guests (held in an `Arc`, deleted with its last
//! holder). The namespace holds nothing but a loopback interface (and a cluster's bridge and
//! taps), so QEMU's user-mode networking (slirp) has no route anywhere: a guest can never reach
//! the internet, and its `hostfwd` ports live on the namespace's own `127.0.0.1`.
//! Two side effects are deliberate:
//!
//! - tests may use fixed host ports for forwards, because no two slirp guests share a namespace;
//! - to talk to a forwarded port, a test must itself enter the namespace, which
//!   [`NetNs::run_in`] does for one closure on a dedicated thread (`setns` only affects the calling
//!   thread, so the test's own thread and the rest of the process stay where they were).
//!
//! The namespace is created with `ip netns add` (so it is visible to `ip netns list` while a test
//! runs, which helps debugging) and deleted again when the [`NetNs`] is dropped.

use std::ffi::OsStr;
use std::fs::File;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{bail, Context, Result};
use nix::sched::{setns, CloneFlags};

/// Distinguishes the namespaces of one test process (the pid distinguishes test processes).
static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A named network namespace with only `lo` in it, deleted on drop.
#[derive(Debug)]
pub struct NetNs {
    name: String,
}

impl NetNs {
    /// Creates `keelson-<pid>-<counter>` and brings its loopback interface up.
    ///
    /// Needs root (`CAP_SYS_ADMIN`) and iproute2.
    pub fn new() -> Result<Self> {
        let name = format!(
            "keelson-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        if let Err(first) = ip(&["netns", "add", &name]) {
            // A namespace of that name can only be left over from an earlier test process that
            // had the same pid and was killed before its Drop ran: reclaim it once.
            if !PathBuf::from("/run/netns").join(&name).exists() {
                return Err(first).context(
                    "cannot create a network namespace (the VM tests need root and iproute2)",
                );
            }
            ip(&["netns", "delete", &name])?;
            ip(&["netns", "add", &name])?;
        }
        // From here on Drop cleans up, even if bringing `lo` up fails.
        let ns = NetNs { name };
        // Without `lo` up, slirp's hostfwd listeners on 127.0.0.1 would be unreachable.
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Runs `ip -n NAME ARGS...` (links and addresses of the namespace, e.g. a cluster's bridge
    /// and taps); an error carries ip's stderr.
    pub fn ip(&self, args: &[&str]) -> Result<()> {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        ip(&full)
    }

    /// The namespace's name, as `ip netns list` shows it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The bind-mounted namespace file that `ip netns add` created.
    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// A [`Command`] that runs `program` inside the namespace (`ip netns exec NAME program`).
    ///
    /// `ip netns exec` execs the program, so the child's pid is the program's own pid (killing the
    /// child kills the program, not a wrapper).
    pub fn command<S: AsRef<OsStr>>(&self, program: S) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd
    }

    /// Rewrites an existing [`Command`] to run inside the namespace: same program, arguments,
    /// environment changes and working directory (not the stdio settings, which `Command` does
    /// not expose).
    pub fn wrap(&self, cmd: &Command) -> Command {
        let mut wrapped = self.command(cmd.get_program());
        wrapped.args(cmd.get_args());
        for (key, value) in cmd.get_envs() {
            match value {
                Some(value) => wrapped.env(key, value),
                None => wrapped.env_remove(key),
            };
        }
        if let Some(dir) = cmd.get_current_dir() {
            wrapped.current_dir(dir);
        }
        wrapped
    }

    /// Runs `program args...` inside the namespace to completion and returns its output; fails if
    /// it exits unsuccessfully.
    pub fn output<S: AsRef<OsStr>>(&self, program: S, args: &[&str]) -> Result<Output> {
        let program = program.as_ref().to_owned();
        let output = self
            .command(&program)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running {program:?} in netns {}", self.name))?;
        if !output.status.success() {
            bail!(
                "{program:?} {args:?} in netns {} failed ({}): {}",
                self.name,
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        Ok(output)
    }

    /// Runs `f` on a new thread that has joined the namespace, and returns its result.
    ///
    /// Use it to connect to a guest's forwarded ports: inside, `127.0.0.1:HOST_PORT` is the
    /// `hostfwd` listener of the guest's QEMU. Threads that `f` spawns inherit the namespace.
    /// A panic in `f` is propagated to the caller; failing to enter the namespace panics too.
    pub fn run_in<F, T>(&self, f: F) -> T
    where
        F: FnOnce() -> T + Send,
        T: Send,
    {
        let path = self.path();
        std::thread::scope(|scope| {
            let handle = scope.spawn(move || {
                let file =
                    File::open(&path).unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
                setns(&file, CloneFlags::CLONE_NEWNET)
                    .unwrap_or_else(|e| panic!("setns into {}: {e}", path.display()));
                drop(file);
                f()
            });
            match handle.join() {
                Ok(value) => value,
                Err(payload) => std::panic::resume_unwind(payload),
            }
        })
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        // Anything still running in the namespace (a QEMU that was not reaped) keeps it alive in
        // the kernel, but the name is released either way, which is what matters for reuse.
        if let Err(e) = ip(&["netns", "delete", &self.name]) {
            eprintln!("qemu-tests: {e:#}");
        }
    }
}

/// Runs `ip ARGS...` and turns a failure into an error carrying ip's stderr.
fn ip(args: &[&str]) -> Result<()> {
    let output = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("running `ip` (install the Debian package `iproute2`)")?;
    if !output.status.success() {
        bail!(
            "`ip {}` failed ({}): {}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}
