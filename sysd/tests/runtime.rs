//! Host integration tests of the container runtime: real containers from a busybox rootfs,
//! through the `sysd runtime` helper CLI and through the daemon-side API.
//!
//! They need root, and libcontainer needs cgroup v2 at /sys/fs/cgroup; on a hybrid host
//! (v1 controllers, cgroup2 only at /sys/fs/cgroup/unified) each test first moves its thread
//! into a private mount namespace with cgroup2 mounted at /sys/fs/cgroup, which the helper
//! processes it spawns inherit. The test process is a child subreaper, as sysd is, so the
//! container inits become its children when the helper exits.
//!
//! They drive the `keelson-runtime` crate, the same code the daemon links, and the helper
//! through the built `sysd` binary.

use std::fs::{self, File};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use keelson_runtime as runtime;
use runtime::{ContainerConfig, ExitInfo, Mount, NetworkMode, Runtime};

const SYSD: &str = env!("CARGO_BIN_EXE_sysd");

/// The default capability set (Docker's without CAP_MKNOD and CAP_NET_RAW) as a CapEff mask.
const DOCKER_CAPS: u64 = 0x0000_0000_a004_05fb;

static SEQ: AtomicU32 = AtomicU32::new(0);

struct Fixture {
    _dir: tempfile::TempDir,
    base: PathBuf,
    rootfs: PathBuf,
    state: PathBuf,
    cgroup_parent: String,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        // Best effort: nothing of a failed test may stay behind in the cgroup tree.
        let dir = Path::new("/sys/fs/cgroup").join(self.cgroup_parent.trim_start_matches('/'));
        if let Ok(entries) = fs::read_dir(&dir) {
            for e in entries
                .flatten()
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            {
                let _ = fs::write(e.path().join("cgroup.kill"), "1");
                for _ in 0..100 {
                    if fs::remove_dir(e.path()).is_ok() {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        }
        let _ = fs::remove_dir(&dir);
    }
}

/// A busybox rootfs, a state dir and a private cgroup parent. Fails (never skips) without root
/// or busybox: `./dev test` runs as root and installs busybox-static, so a missing one is a
/// broken setup, not a reason to pass.
fn fixture() -> Option<Fixture> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        panic!("these tests need root (./dev test runs them as root)");
    }
    let busybox = Path::new("/bin/busybox");
    if !busybox.exists() {
        panic!("/bin/busybox missing: apt-get install busybox-static (./dev deps)");
    }
    if let Err(e) = keelson_testkit::cgroup::private_cgroup2() {
        panic!("cannot set up cgroup2 in a private mount namespace: {e}");
    }
    runtime::become_subreaper().expect("PR_SET_CHILD_SUBREAPER");
    let dir = tempfile::tempdir().expect("tempdir");
    let base = dir.path().to_path_buf();
    // A user-namespaced container's root (an unprivileged host uid) must be able to reach
    // the rootfs.
    fs::set_permissions(&base, std::os::unix::fs::PermissionsExt::from_mode(0o755)).expect("chmod");
    let rootfs = base.join("rootfs");
    keelson_testkit::busybox::rootfs(&rootfs).expect("busybox rootfs");
    fs::create_dir_all(rootfs.join("scratch")).expect("mkdir");
    let n = SEQ.fetch_add(1, Ordering::SeqCst);
    Some(Fixture {
        _dir: dir,
        state: base.join("state"),
        base,
        rootfs,
        cgroup_parent: format!("/keelson-test-{}-{n}", std::process::id()),
    })
}

impl Fixture {
    fn config(&self, name: &str, args: &[&str]) -> ContainerConfig {
        ContainerConfig::new(
            name,
            self.rootfs.clone(),
            args,
            format!("{}/{name}", self.cgroup_parent),
        )
    }

    fn runtime(&self) -> Runtime {
        Runtime::new(&self.state)
            .with_exe(SYSD)
            .with_cgroup_parent(&self.cgroup_parent)
    }

    fn containers(&self) -> PathBuf {
        self.state.join("containers")
    }

    /// `sysd runtime create` on a bundle written from `cfg`; returns the init pid, or the
    /// helper's stderr. The container's stdout/stderr go to files `<id>.out` / `<id>.err`.
    fn cli_create(&self, cfg: &ContainerConfig) -> Result<i32, String> {
        let spec = runtime::bundle::spec(cfg).map_err(|e| format!("{e:#}"))?;
        let bundle = self.bundle(&cfg.id);
        runtime::bundle::write_compiled(&bundle, spec, &runtime::bundle::Programs::default())
            .map_err(|e| format!("{e:#}"))?;
        self.cli_create_bundle(cfg)
    }

    fn bundle(&self, id: &str) -> PathBuf {
        self.state.join("bundles").join(id)
    }

    /// `sysd runtime create` on the bundle already written for `cfg`.
    fn cli_create_bundle(&self, cfg: &ContainerConfig) -> Result<i32, String> {
        let bundle = self.bundle(&cfg.id);
        let out = File::create(self.base.join(format!("{}.out", cfg.id))).expect("out file");
        let err = File::create(self.base.join(format!("{}.err", cfg.id))).expect("err file");
        let (o, e) = (out.as_raw_fd(), err.as_raw_fd());
        let mut cmd = Command::new(SYSD);
        cmd.args(["runtime", "create", "--root"])
            .arg(self.containers())
            .args(["--id", &cfg.id, "--bundle"])
            .arg(&bundle)
            .stdin(Stdio::null());
        // SAFETY: only dup2 (async-signal-safe) between fork and exec; fds 10+ avoid clashes.
        unsafe {
            cmd.pre_exec(move || {
                if libc::dup2(o, 10) < 0
                    || libc::dup2(e, 11) < 0
                    || libc::dup2(10, 3) < 0
                    || libc::dup2(11, 4) < 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let output = cmd.output().expect("running sysd runtime create");
        if !output.status.success() {
            return Err(String::from_utf8_lossy(&output.stderr).into_owned());
        }
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            stderr.trim().is_empty(),
            "create printed on stderr: {stderr}"
        );
        Ok(String::from_utf8_lossy(&output.stdout)
            .trim()
            .parse()
            .expect("pid line"))
    }

    fn output(&self, id: &str) -> (String, String) {
        let read = |ext: &str| {
            fs::read_to_string(self.base.join(format!("{id}.{ext}"))).unwrap_or_default()
        };
        (read("out"), read("err"))
    }

    fn cli_delete(&self, id: &str) {
        let st = Command::new(SYSD)
            .args(["runtime", "delete", "--root"])
            .arg(self.containers())
            .args(["--id", id])
            .status()
            .expect("sysd runtime delete");
        assert!(st.success(), "delete failed");
    }

    /// Runs `args` to completion in a container and returns (exit code, stdout, stderr).
    fn run(&self, cfg: &ContainerConfig) -> (i32, String, String) {
        let pid = self
            .cli_create(cfg)
            .unwrap_or_else(|e| panic!("create {}: {e}", cfg.id));
        let code = waitpid(pid);
        self.cli_delete(&cfg.id);
        let (out, err) = self.output(&cfg.id);
        (code, out, err)
    }
}

/// Reaps child `pid`; exit code or 128+signal. Failing here means the init is not our child.
fn waitpid(pid: i32) -> i32 {
    let mut status = 0;
    // SAFETY: waitpid with a valid out pointer.
    let r = unsafe { libc::waitpid(pid, &mut status, 0) };
    assert_eq!(
        r,
        pid,
        "waitpid({pid}): {} (init not reparented to us?)",
        std::io::Error::last_os_error()
    );
    if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        128 + libc::WTERMSIG(status)
    }
}

fn status_field(status: &str, key: &str) -> String {
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{key}:")))
        .map(|v| v.trim().to_owned())
        .unwrap_or_else(|| panic!("{key} missing in {status}"))
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio")
        .block_on(f)
}

#[test]
fn stdio_reaches_fds_and_init_is_reparented_to_the_subreaper() {
    let Some(fx) = fixture() else { return };
    let cfg = fx.config(
        "stdio",
        &["sh", "-c", "echo to-stdout; echo to-stderr >&2; exit 7"],
    );
    let (code, out, err) = fx.run(&cfg);
    assert_eq!(code, 7);
    assert_eq!(out, "to-stdout\n");
    assert_eq!(err, "to-stderr\n");
    assert!(
        !fx.containers().join("stdio").exists(),
        "delete left the state dir"
    );
}

#[test]
fn namespaces_are_private() {
    let Some(fx) = fixture() else { return };
    for (network, name) in [
        (NetworkMode::None, "ns-none"),
        (NetworkMode::Host, "ns-host"),
    ] {
        let mut cfg = fx.config(name, &["sleep", "30"]);
        cfg.network = network.clone();
        let pid = fx.cli_create(&cfg).expect("create");
        for ns in ["pid", "mnt", "uts", "ipc", "net", "cgroup"] {
            let ours = fs::read_link(format!("/proc/self/ns/{ns}")).expect("own ns");
            let theirs = fs::read_link(format!("/proc/{pid}/ns/{ns}")).expect("container ns");
            // A host-network container shares the node's network and, for its host name,
            // the node's UTS namespace.
            let shared = matches!(ns, "net" | "uts") && network == NetworkMode::Host;
            assert_eq!(
                ours == theirs,
                shared,
                "{name}: {ns} namespace {ours:?} vs {theirs:?}"
            );
        }
        let hostname = Command::new("nsenter")
            .args(["-t", &pid.to_string(), "-u", "hostname"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned());
        let ours = nix::unistd::gethostname().expect("gethostname");
        let want = if network == NetworkMode::Host {
            ours.to_string_lossy().into_owned()
        } else {
            name.to_string()
        };
        if let Ok(h) = hostname {
            assert_eq!(h, want);
        }
        fx.cli_delete(name);
        assert_eq!(waitpid(pid), 128 + libc::SIGKILL);
    }
}

#[test]
fn capabilities_seccomp_and_no_new_privs() {
    let Some(fx) = fixture() else { return };
    let cfg = fx.config("caps", &["cat", "/proc/self/status"]);
    let (code, status, _) = fx.run(&cfg);
    assert_eq!(code, 0);
    assert_eq!(
        u64::from_str_radix(&status_field(&status, "CapEff"), 16).unwrap(),
        DOCKER_CAPS
    );
    assert_eq!(
        u64::from_str_radix(&status_field(&status, "CapBnd"), 16).unwrap(),
        DOCKER_CAPS
    );
    assert_eq!(
        u64::from_str_radix(&status_field(&status, "CapInh"), 16).unwrap(),
        0
    );
    assert_eq!(status_field(&status, "Seccomp"), "2");
    assert_eq!(status_field(&status, "NoNewPrivs"), "1");

    let mut cfg = fx.config("caps-none", &["cat", "/proc/self/status"]);
    cfg.cap_drop = vec!["ALL".into()];
    let (_, status, _) = fx.run(&cfg);
    assert_eq!(status_field(&status, "CapEff"), "0000000000000000");
    assert_eq!(status_field(&status, "CapBnd"), "0000000000000000");

    // Non-root with an added capability keeps it across exec (ambient).
    let mut cfg = fx.config("caps-user", &["cat", "/proc/self/status"]);
    cfg.uid = 1000;
    cfg.gid = 1000;
    cfg.cap_add = vec!["CAP_NET_ADMIN".into()];
    let (_, status, _) = fx.run(&cfg);
    assert_eq!(
        status_field(&status, "CapEff"),
        format!("{:016x}", 1u64 << 12)
    );
}

#[test]
fn seccomp_denies_namespaces_but_allows_fork() {
    let Some(fx) = fixture() else { return };
    // fork/clone without namespace flags works (pipeline, command substitution)...
    let cfg = fx.config("fork", &["sh", "-c", "echo $(echo forked | cat)"]);
    let (code, out, err) = fx.run(&cfg);
    assert_eq!((code, out.as_str()), (0, "forked\n"), "stderr: {err}");
    // ...a new user namespace (no capability needed) is refused by the filter...
    let cfg = fx.config("unshare", &["unshare", "-U", "true"]);
    let (code, _, err) = fx.run(&cfg);
    assert_ne!(code, 0);
    assert!(err.contains("Operation not permitted"), "{err}");
    // ...and allowed without it (privileged: no seccomp).
    let mut cfg = fx.config("unshare-priv", &["unshare", "-U", "true"]);
    cfg.privileged = true;
    let (code, _, err) = fx.run(&cfg);
    assert_eq!(code, 0, "{err}");
}

/// The seccomp program is sysd's, compiled once per profile: a bundle that carries its profile
/// uncompiled in config.json, or names a program that is missing or not a BPF program, is
/// refused before anything runs; it is never run unfiltered.
#[test]
fn a_seccomp_profile_runs_compiled_or_not_at_all() {
    let Some(fx) = fixture() else { return };
    let cfg = fx.config("uncompiled", &["true"]);
    let spec = runtime::bundle::spec(&cfg).unwrap();
    runtime::bundle::write(&fx.bundle("uncompiled"), &spec).unwrap();
    let err = fx
        .cli_create_bundle(&cfg)
        .expect_err("an uncompiled profile");
    assert!(
        err.contains("config.json carries a seccomp profile"),
        "{err}"
    );
    for (id, program) in [("no-program", None), ("bad-program", Some(&[7u8; 13][..]))] {
        let cfg = fx.config(id, &["true"]);
        let bundle = fx.bundle(id);
        runtime::bundle::write_compiled(
            &bundle,
            runtime::bundle::spec(&cfg).unwrap(),
            &runtime::bundle::Programs::default(),
        )
        .unwrap();
        let path = bundle.join(runtime::bundle::SECCOMP_PROGRAM);
        match program {
            None => fs::remove_file(&path).unwrap(),
            Some(bytes) => fs::write(&path, bytes).unwrap(),
        }
        let err = fx.cli_create_bundle(&cfg).expect_err(id);
        assert!(
            err.contains("seccomp program") && err.contains(&path.display().to_string()),
            "{id}: {err}"
        );
        assert!(fx.output(id).0.is_empty(), "{id} ran");
    }
}

#[test]
fn masked_paths_readonly_root_and_tmpfs() {
    let Some(fx) = fixture() else { return };
    let script = "head -c 16 /proc/kcore | wc -c; \
                  touch /x 2>/dev/null && echo root-writable || echo root-ro; \
                  touch /scratch/y && echo tmpfs-ok; \
                  echo 1 > /proc/sys/kernel/ns_last_pid 2>/dev/null && echo procsys-rw || echo procsys-ro";
    let mut cfg = fx.config("masked", &["sh", "-c", script]);
    cfg.mounts = vec![Mount::Tmpfs {
        target: "/scratch".into(),
        size_bytes: Some(1 << 20),
        mode: Some(0o1777),
    }];
    let (code, out, err) = fx.run(&cfg);
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().map(str::trim).collect();
    assert_eq!(
        lines,
        ["0", "root-ro", "tmpfs-ok", "procsys-ro"],
        "stderr: {err}"
    );

    let mut cfg = fx.config("writable", &["sh", "-c", "touch /x && echo root-writable"]);
    cfg.writable_root = true;
    let (code, out, _) = fx.run(&cfg);
    assert_eq!((code, out.as_str()), (0, "root-writable\n"));
}

#[test]
fn network_none_has_only_loopback_up() {
    let Some(fx) = fixture() else { return };
    let cfg = fx.config(
        "net",
        &[
            "sh",
            "-c",
            "ls /sys/class/net; ip -o link show lo; cat /proc/sys/net/ipv4/ping_group_range",
        ],
    );
    let (code, out, err) = fx.run(&cfg);
    assert_eq!(code, 0, "{err}");
    let mut lines = out.lines();
    assert_eq!(lines.next(), Some("lo"), "{out}");
    let lo = lines.next().unwrap_or_default();
    assert!(lo.contains("UP"), "lo is not up: {lo}");
    // No CAP_NET_RAW, but ICMP echo sockets are open to every group (iputils' ping uses them;
    // busybox's ping opens a raw socket only).
    assert_eq!(
        lines
            .next()
            .map(|l| l.split_whitespace().collect::<Vec<_>>()),
        Some(vec!["0", "2147483647"]),
        "{out}"
    );
}

#[test]
fn cli_exec_returns_the_exit_code() {
    let Some(fx) = fixture() else { return };
    let cfg = fx.config("exec", &["sleep", "30"]);
    let pid = fx.cli_create(&cfg).expect("create");
    let exec = |args: &[&str]| {
        Command::new(SYSD)
            .args(["runtime", "exec", "--root"])
            .arg(fx.containers())
            .args(["--id", "exec", "--timeout-ms", "5000", "--"])
            .args(args)
            .output()
            .expect("sysd runtime exec")
    };
    let out = exec(&["sh", "-c", "hostname; exit 5"]);
    assert_eq!(
        out.status.code(),
        Some(5),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "exec\n");
    // An exec'd process is filtered as the container's own is.
    let out = exec(&[
        "sh",
        "-c",
        "grep Seccomp: /proc/self/status; unshare -U true 2>/dev/null || echo refused",
    ]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "Seccomp:\t2\nrefused\n",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = exec(&["/bin/nonexistent"]);
    assert_eq!(out.status.code(), Some(125));
    eprintln!(
        "exec of a missing binary: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    fx.cli_delete("exec");
    assert_eq!(waitpid(pid), 128 + libc::SIGKILL);
}

#[test]
fn api_start_exec_stats_stop_remove() {
    let Some(fx) = fixture() else { return };
    let rt = fx.runtime();
    let cfg = fx.config("api", &["sh", "-c", "echo started; exec sleep 30"]);
    let (out_r, out_w) = pipe();
    let (_err_r, err_w) = pipe();
    block_on(async {
        let started = rt.start(&cfg, out_w, err_w).await.expect("start");
        assert!(started.pid > 0);

        let out = rt
            .exec(
                "api",
                &[
                    "sh".into(),
                    "-c".into(),
                    "echo hi; echo oops >&2; exit 3".into(),
                ],
                Duration::from_secs(5),
            )
            .await
            .expect("exec");
        assert_eq!((out.code, out.timed_out), (3, false));
        assert_eq!(out.output, "hi\noops\n");
        let out = rt
            .exec(
                "api",
                &["sleep".into(), "10".into()],
                Duration::from_millis(300),
            )
            .await
            .expect("exec");
        assert!(out.timed_out, "{out:?}");
        let long = rt
            .exec(
                "api",
                &["sh".into(), "-c".into(), "yes | head -c 100000".into()],
                Duration::from_secs(5),
            )
            .await
            .expect("exec");
        assert_eq!(
            (long.code, long.output.len()),
            (0, runtime::EXEC_OUTPUT_LIMIT)
        );

        let stats = rt.stats(&cfg.cgroup_path).expect("stats");
        assert!(stats.cpu_usage_usec.is_some(), "{stats:?}");

        // A second instance while the first runs is refused.
        let (_a, b) = pipe();
        let (_c, d) = pipe();
        let mut dup = cfg.clone();
        dup.id = "api-2".into();
        let err = rt
            .start(&dup, b, d)
            .await
            .expect_err("duplicate")
            .to_string();
        assert!(err.contains("still has processes"), "{err}");

        rt.kill_cgroup(&cfg.cgroup_path).await.expect("kill");
        let exit =
            tokio::time::timeout(Duration::from_secs(10), runtime::wait_exit(&started.pidfd))
                .await
                .expect("exit in time")
                .expect("wait_exit");
        assert_eq!(exit, ExitInfo::Signaled(libc::SIGKILL));
        rt.remove("api", &cfg.cgroup_path).await.expect("remove");
        rt.remove("api", &cfg.cgroup_path)
            .await
            .expect("remove twice");
    });
    let cg = Path::new("/sys/fs/cgroup").join(cfg.cgroup_path.trim_start_matches('/'));
    assert!(!cg.exists(), "cgroup left behind");
    assert!(!fx.containers().join("api").exists() && !fx.state.join("bundles/api").exists());
    drop(_err_r);
    let mut text = String::new();
    std::io::Read::read_to_string(&mut File::from(out_r), &mut text).expect("read stdout");
    assert_eq!(text, "started\n");
}

/// An exec into a delegated engine that enabled controllers for its children (its own cgroup
/// can then hold no process: EBUSY) runs in the `keelson-exec` leaf below it; without
/// controllers to enable (a hybrid host's cgroup2 root has none) it joins the service's cgroup
/// as any exec does. Either way the exec runs and the container's removal leaves no cgroup.
#[test]
fn exec_into_a_delegated_engine_that_enabled_controllers() {
    let Some(fx) = fixture() else { return };
    let rt = fx.runtime();
    let script = "mkdir /sys/fs/cgroup/engine && echo $$ > /sys/fs/cgroup/engine/cgroup.procs \
                  && for x in $(cat /sys/fs/cgroup/cgroup.controllers); do \
                       echo +$x > /sys/fs/cgroup/cgroup.subtree_control || exit 12; done \
                  && echo engine-ready && exec sleep 30";
    let mut cfg = fx.config("engine", &["sh", "-c", script]);
    cfg.delegate = true;
    let (out_r, out_w) = pipe();
    let (_err_r, err_w) = pipe();
    let cg = Path::new("/sys/fs/cgroup").join(cfg.cgroup_path.trim_start_matches('/'));
    block_on(async {
        let started = rt.start(&cfg, out_w, err_w).await.expect("start");
        let mut out = File::from(out_r);
        let mut line = [0u8; 13];
        std::io::Read::read_exact(&mut out, &mut line).expect("the engine's ready line");
        assert_eq!(&line, b"engine-ready\n");
        let enabled = fs::read_to_string(cg.join("cgroup.subtree_control")).unwrap_or_default();
        let run = rt
            .exec(
                "engine",
                &[
                    "sh".into(),
                    "-c".into(),
                    "grep '^0::' /proc/self/cgroup".into(),
                ],
                Duration::from_secs(10),
            )
            .await
            .expect("exec");
        assert_eq!(run.code, 0, "{run:?}");
        if enabled.trim().is_empty() {
            eprintln!("no controller to enable on this host's cgroup2 root: the exec joined the service's cgroup");
            assert_eq!(run.output, "0::/\n", "{run:?}");
        } else {
            assert_eq!(
                run.output, "0::/keelson-exec\n",
                "controllers {enabled:?}: {run:?}"
            );
        }
        rt.kill_cgroup(&cfg.cgroup_path).await.expect("kill");
        tokio::time::timeout(Duration::from_secs(10), runtime::wait_exit(&started.pidfd))
            .await
            .expect("exit in time")
            .expect("wait_exit");
        rt.remove("engine", &cfg.cgroup_path).await.expect("remove");
    });
    assert!(!cg.exists(), "cgroup left behind");
}

#[test]
fn api_exit_code_via_pidfd() {
    let Some(fx) = fixture() else { return };
    let rt = fx.runtime();
    let cfg = fx.config("exit", &["sh", "-c", "exit 42"]);
    let (_o, out_w) = pipe();
    let (_e, err_w) = pipe();
    block_on(async {
        let started = rt.start(&cfg, out_w, err_w).await.expect("start");
        // Two waiters at once (the supervisor's watch and stop paths): one reaps, the
        // other learns the child is gone.
        let (a, b) = tokio::join!(
            runtime::wait_exit(&started.pidfd),
            runtime::wait_exit(&started.pidfd)
        );
        let (ok, err) = if a.is_ok() { (a, b) } else { (b, a) };
        assert_eq!(ok.expect("one waiter reaps"), ExitInfo::Exited(42));
        assert_eq!(
            err.expect_err("the other fails").raw_os_error(),
            Some(libc::ECHILD)
        );
        rt.remove("exit", &cfg.cgroup_path).await.expect("remove");
    });
}

#[test]
fn api_clear_errors() {
    let Some(fx) = fixture() else { return };
    let rt = fx.runtime();
    block_on(async {
        let cfg = fx.config("web", &["/bin/webd", "-f"]);
        let (_o, w1) = pipe();
        let (_e, w2) = pipe();
        let err = format!(
            "{:#}",
            rt.start(&cfg, w1, w2).await.expect_err("missing argv0")
        );
        assert_eq!(
            err,
            format!(
                "service web: /bin/webd not found in the image rootfs {}",
                fx.rootfs.display()
            )
        );

        // A limit whose controller is not available fails with libcontainer's reason.
        let mut cfg = fx.config("limits", &["true"]);
        cfg.resources.pids_max = Some(10);
        let controllers =
            fs::read_to_string("/sys/fs/cgroup/cgroup.subtree_control").unwrap_or_default();
        let (_o, w1) = pipe();
        let (_e, w2) = pipe();
        match rt.start(&cfg, w1, w2).await {
            Ok(started) => {
                assert!(
                    controllers.contains("pids"),
                    "pids.max applied without the pids controller?"
                );
                let _ = runtime::wait_exit(&started.pidfd).await;
            }
            Err(e) => {
                let e = format!("{e:#}");
                eprintln!("start with pids.max and controllers {controllers:?}: {e}");
                assert!(
                    e.starts_with("service limits: ") && e.contains("pids"),
                    "{e}"
                );
            }
        }
        rt.remove("limits", &cfg.cgroup_path).await.expect("remove");
    });
}

#[test]
fn leftovers_after_a_crash_are_found_and_removed() {
    let Some(fx) = fixture() else { return };
    let cfg = fx.config("left", &["sleep", "30"]);
    let (_o, w1) = pipe();
    let (_e, w2) = pipe();
    block_on(async {
        let started = fx.runtime().start(&cfg, w1, w2).await.expect("start");
        // "Restart": a fresh Runtime over the same state finds the running container.
        let rt = fx.runtime();
        let found = rt.leftovers();
        assert_eq!(found.len(), 1, "{found:?}");
        let l = &found[0];
        assert_eq!(l.id.as_deref(), Some("left"));
        assert_eq!(l.service, "left");
        assert_eq!(l.pid, Some(started.pid));
        assert_eq!(l.cgroup_path.as_deref(), Some(cfg.cgroup_path.as_str()));
        assert!(l.populated);
        rt.cleanup_leftovers().await.expect("cleanup");
        let exit = runtime::wait_exit(&started.pidfd).await.expect("wait_exit");
        assert_eq!(exit, ExitInfo::Signaled(libc::SIGKILL));
        assert!(rt.leftovers().is_empty());
    });
}

#[test]
fn user_namespace_maps_root() {
    let Some(fx) = fixture() else { return };
    let mut cfg = fx.config(
        "userns",
        &[
            "sh",
            "-c",
            "cat /proc/self/uid_map; id -u; cat /proc/sys/net/ipv4/ping_group_range",
        ],
    );
    cfg.user_namespace = Some(200_000);
    match fx.cli_create(&cfg) {
        Ok(pid) => {
            assert_eq!(waitpid(pid), 0);
            fx.cli_delete("userns");
            let (out, err) = fx.output("userns");
            let words: Vec<&str> = out.split_whitespace().collect();
            // ICMP echo sockets for every group the namespace maps.
            assert_eq!(
                words,
                ["0", "200000", "65536", "0", "0", "65535"],
                "stderr: {err}"
            );
        }
        Err(e) => panic!("user namespace container: {e}"),
    }
}

fn pipe() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two fds.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: fresh fds owned by nobody else.
    unsafe {
        (
            std::os::fd::FromRawFd::from_raw_fd(fds[0]),
            std::os::fd::FromRawFd::from_raw_fd(fds[1]),
        )
    }
}

/// The node agent contract (docs/node-agent.md): a delegated container manages its own cgroup
/// subtree. It moves itself into a leaf (cgroup v2's no-internal-processes rule), enables the
/// controllers it was given in its namespace's root and sees them in a new child; a plain one
/// cannot create a cgroup. On a hybrid host (controllers bound to v1 hierarchies, none on the
/// cgroup2 root) there is no controller to enable: the subtree part is still proven.
#[test]
fn delegated_service_manages_its_cgroup_subtree() {
    let Some(fx) = fixture() else { return };
    let host_controllers =
        fs::read_to_string("/sys/fs/cgroup/cgroup.controllers").unwrap_or_default();
    let script = "grep '^0::' /proc/self/cgroup; \
                  mkdir /sys/fs/cgroup/engine || exit 10; \
                  echo $$ > /sys/fs/cgroup/engine/cgroup.procs || exit 11; \
                  grep '^0::' /proc/self/cgroup; \
                  c=$(cat /sys/fs/cgroup/cgroup.controllers); echo \"given: $c\"; \
                  for x in $c; do echo +$x > /sys/fs/cgroup/cgroup.subtree_control || exit 12; done; \
                  mkdir /sys/fs/cgroup/workload || exit 13; \
                  echo \"child: $(cat /sys/fs/cgroup/workload/cgroup.controllers)\"";
    let mut cfg = fx.config("delegated", &["sh", "-c", script]);
    cfg.delegate = true;
    let (code, out, err) = fx.run(&cfg);
    assert_eq!(code, 0, "stdout: {out}\nstderr: {err}");
    let lines: Vec<&str> = out.lines().collect();
    // Its own cgroup namespace: it sees its cgroup as the root, then its leaf.
    assert_eq!(lines[..2], ["0::/", "0::/engine"], "{out}");
    let given = lines[2].strip_prefix("given: ").expect("given line");
    let child = lines[3].strip_prefix("child: ").expect("child line");
    assert_eq!(
        given.trim(),
        child.trim(),
        "every given controller enabled: {out}"
    );
    // The runtime enables what the host has on the way down: the engine is given it all.
    assert_eq!(
        given.split_whitespace().collect::<Vec<_>>(),
        host_controllers.split_whitespace().collect::<Vec<_>>(),
        "{out}"
    );
    eprintln!("delegated and enabled in the engine's child: {child:?}");
    if host_controllers.split_whitespace().any(|c| c == "pids") {
        assert!(
            child.split_whitespace().any(|c| c == "pids"),
            "the host has pids but the engine's child does not: {out}"
        );
    } else {
        eprintln!("no pids controller on this host's cgroup2 root ({host_controllers:?})");
    }

    let cfg = fx.config(
        "plain",
        &[
            "sh",
            "-c",
            "mkdir /sys/fs/cgroup/engine 2>/dev/null && echo created || echo refused",
        ],
    );
    let (code, out, err) = fx.run(&cfg);
    assert_eq!((code, out.as_str()), (0, "refused\n"), "stderr: {err}");
}
