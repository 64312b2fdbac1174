//! Supervision of sysd, init's only child: spawning it with its readiness pipe, reading `READY=1`
//! from that pipe, reaping every process that ends up as init's child, and restarting sysd with
//! exponential backoff when it dies.

use std::ffi::{CString, OsStr};
use std::fs::File;
use std::io::Read;
use std::os::fd::{AsFd, BorrowedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{fork, pipe2, ForkResult, Pid};

use crate::say;

/// The service manager init supervises.
pub const SYSD: &str = "/usr/bin/sysd";
/// The fd number sysd finds its readiness pipe at (also announced in `KEELSON_NOTIFY_FD`).
pub const NOTIFY_FD: RawFd = 3;

/// Restart delays: 200 ms doubling to 30 s, back to 200 ms after a run of at least 60 s.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    next: Duration,
}

impl Backoff {
    pub const MIN: Duration = Duration::from_millis(200);
    pub const MAX: Duration = Duration::from_secs(30);
    /// A run this long counts as healthy and resets the delay.
    pub const STABLE: Duration = Duration::from_secs(60);

    pub fn new() -> Self {
        Self { next: Self::MIN }
    }

    /// The delay before restarting a process that ran for `ran_for`.
    pub fn after_exit(&mut self, ran_for: Duration) -> Duration {
        if ran_for >= Self::STABLE {
            self.next = Self::MIN;
        }
        let delay = self.next;
        self.next = self.next.saturating_mul(2).min(Self::MAX);
        delay
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new()
    }
}

/// Splits complete lines off the front of `buf`, leaving a partial last line in place.
pub fn take_lines(buf: &mut Vec<u8>) -> Vec<String> {
    let Some(last_nl) = buf.iter().rposition(|&b| b == b'\n') else {
        return Vec::new();
    };
    let rest = buf.split_off(last_nl + 1);
    let complete = std::mem::replace(buf, rest);
    complete
        .split(|&b| b == b'\n')
        .map(|l| String::from_utf8_lossy(l).trim().to_owned())
        .filter(|l| !l.is_empty())
        .collect()
}

/// The log line for a child's end, or `None` for non-terminal statuses.
pub fn describe_exit(name: &str, status: &WaitStatus) -> Option<String> {
    match status {
        WaitStatus::Exited(_, code) => Some(format!("{name} exited with status {code}")),
        WaitStatus::Signaled(_, sig, _) => Some(format!("{name} killed by signal {sig}")),
        _ => None,
    }
}

/// `VmRSS` in KiB from the text of /proc/self/status.
pub fn parse_vmrss_kib(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

/// Reaps every exited child without blocking. The flag says whether init has no children left.
pub fn reap_all() -> (Vec<(Pid, WaitStatus)>, bool) {
    let mut reaped = Vec::new();
    loop {
        match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) => return (reaped, false),
            Err(Errno::ECHILD) => return (reaped, true),
            Ok(status) => {
                if let Some(pid) = status.pid() {
                    reaped.push((pid, status));
                }
            }
            Err(Errno::EINTR) => {}
            Err(_) => return (reaped, false),
        }
    }
}

/// Program, arguments and environment, built before fork so the child only makes system calls.
struct Exec {
    path: CString,
    argv: Vec<CString>,
    envp: Vec<CString>,
}

impl Exec {
    fn sysd() -> Self {
        // sysd owns the host network and the extensions on a node (the flags keep host tests
        // off the host's links and /usr).
        Self::new(SYSD, &[SYSD, "--host-network", "--extensions"])
    }

    fn new(path: &str, args: &[&str]) -> Self {
        let mut envp: Vec<CString> = std::env::vars_os()
            .filter(|(k, _)| k != "PATH" && k != "KEELSON_NOTIFY_FD")
            .filter_map(|(k, v)| {
                let mut kv = k.as_bytes().to_vec();
                kv.push(b'=');
                kv.extend_from_slice(v.as_bytes());
                CString::new(kv).ok()
            })
            .collect();
        envp.extend(
            [
                "PATH=/usr/sbin:/usr/bin".to_owned(),
                format!("KEELSON_NOTIFY_FD={NOTIFY_FD}"),
            ]
            .into_iter()
            .filter_map(|s| CString::new(s).ok()),
        );
        Self {
            path: CString::new(OsStr::new(path).as_bytes()).unwrap_or_default(),
            argv: args
                .iter()
                .filter_map(|a| CString::new(a.as_bytes()).ok())
                .collect(),
            envp,
        }
    }
}

enum State {
    Running {
        pid: Pid,
        started: Instant,
    },
    RestartAt(Instant),
    /// Shutting down: no restarts.
    Stopped,
}

/// sysd's lifecycle.
pub struct Supervisor {
    exec: Exec,
    state: State,
    backoff: Backoff,
    notify: Option<File>,
    notify_buf: Vec<u8>,
    ready_seen: bool,
    /// sysd's last sign of life: its start, then any line on the notify pipe (`WATCHDOG=1`).
    last_seen: Instant,
}

impl Default for Supervisor {
    fn default() -> Self {
        Self::new()
    }
}

impl Supervisor {
    /// A supervisor of sysd whose first start is due now.
    pub fn new() -> Self {
        Self::with_exec(Exec::sysd())
    }

    fn with_exec(exec: Exec) -> Self {
        Self {
            exec,
            state: State::RestartAt(Instant::now()),
            backoff: Backoff::new(),
            notify: None,
            notify_buf: Vec::new(),
            ready_seen: false,
            last_seen: Instant::now(),
        }
    }

    /// sysd's pid while it runs.
    pub fn pid(&self) -> Option<Pid> {
        match self.state {
            State::Running { pid, .. } => Some(pid),
            _ => None,
        }
    }

    /// When the running sysd last showed a sign of life (`None`: not running).
    pub fn sysd_last_seen(&self) -> Option<Instant> {
        match self.state {
            State::Running { .. } => Some(self.last_seen),
            _ => None,
        }
    }

    /// The readiness pipe, while open.
    pub fn notify_fd(&self) -> Option<BorrowedFd<'_>> {
        self.notify.as_ref().map(|f| f.as_fd())
    }

    /// How long until a pending restart is due (`None`: nothing pending).
    pub fn timeout(&self, now: Instant) -> Option<Duration> {
        match self.state {
            State::RestartAt(at) => Some(at.saturating_duration_since(now)),
            _ => None,
        }
    }

    /// Starts sysd if a (re)start is due.
    pub fn tick(&mut self, now: Instant) {
        let State::RestartAt(at) = self.state else {
            return;
        };
        if now < at {
            return;
        }
        match self.spawn() {
            Ok((pid, notify)) => {
                say!("stage2: sysd started (pid {pid})");
                self.state = State::Running {
                    pid,
                    started: Instant::now(),
                };
                self.notify = Some(notify);
                self.notify_buf.clear();
                self.last_seen = Instant::now();
            }
            Err(e) => {
                let delay = self.backoff.after_exit(Duration::ZERO);
                say!(
                    "cannot start {SYSD}: {e}; retrying in {} ms",
                    delay.as_millis()
                );
                self.state = State::RestartAt(Instant::now() + delay);
            }
        }
    }

    /// Reads the readiness pipe; logs the boot-complete line on the first `READY=1` of the boot.
    pub fn on_notify(&mut self) {
        let Some(file) = self.notify.as_mut() else {
            return;
        };
        let mut chunk = [0u8; 512];
        let mut closed = false;
        loop {
            match file.read(&mut chunk) {
                Ok(0) => {
                    closed = true;
                    break;
                }
                Ok(n) => self
                    .notify_buf
                    .extend_from_slice(chunk.get(..n).unwrap_or(&[])),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(_) => {
                    closed = true;
                    break;
                }
            }
            // A misbehaving writer must not grow init's memory without bound.
            if self.notify_buf.len() > 4096 {
                self.notify_buf.clear();
            }
        }
        for line in take_lines(&mut self.notify_buf) {
            // Any line is a sign of life; `WATCHDOG=1` says nothing else.
            self.last_seen = Instant::now();
            if line == "READY=1" {
                self.on_ready();
            }
        }
        if closed {
            // sysd closed its end (or died): stop polling a pipe that would report HUP forever.
            self.notify = None;
        }
    }

    fn on_ready(&mut self) {
        if self.ready_seen {
            say!("stage2: sysd ready again");
            return;
        }
        self.ready_seen = true;
        let t = crate::log::boottime();
        let rss = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| parse_vmrss_kib(&s))
            .unwrap_or(0);
        say!(
            "boot complete in {}.{:03} s since kernel start (init rss {rss} KiB)",
            t.as_secs(),
            t.subsec_millis()
        );
    }

    /// Accounts for a reaped child; schedules a restart if it was sysd (unless stopped).
    /// Returns whether it was sysd.
    pub fn on_reaped(&mut self, pid: Pid, status: &WaitStatus) -> bool {
        let State::Running { pid: sysd, started } = self.state else {
            return false;
        };
        if pid != sysd {
            return false;
        }
        if let Some(line) = describe_exit("sysd", status) {
            say!("{line}");
        }
        // Whatever sysd wrote before dying still counts.
        self.on_notify();
        self.notify = None;
        let delay = self.backoff.after_exit(started.elapsed());
        say!("sysd: restarting in {} ms", delay.as_millis());
        self.state = State::RestartAt(Instant::now() + delay);
        true
    }

    /// No more restarts (shutdown); a running sysd stays running until it is reaped.
    pub fn stop_restarting(&mut self) {
        if !matches!(self.state, State::Running { .. }) {
            self.state = State::Stopped;
        }
        self.backoff = Backoff::new();
    }

    /// Marks sysd gone during shutdown without scheduling a restart.
    pub fn mark_stopped(&mut self) {
        self.state = State::Stopped;
        self.notify = None;
    }

    fn spawn(&mut self) -> Result<(Pid, File), Errno> {
        let (read_end, write_end) = pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK)?;
        // sysd's end blocks; only init's end must not.
        clear_flag(
            raw(&write_end),
            libc::F_GETFL,
            libc::F_SETFL,
            libc::O_NONBLOCK,
        );
        let mut argv: Vec<*const libc::c_char> =
            self.exec.argv.iter().map(|a| a.as_ptr()).collect();
        argv.push(std::ptr::null());
        let mut envp: Vec<*const libc::c_char> =
            self.exec.envp.iter().map(|e| e.as_ptr()).collect();
        envp.push(std::ptr::null());
        // SAFETY: init is single-threaded, so the child is a full copy with no lock held by
        // another thread; it only makes raw system calls before exec or _exit.
        match unsafe { fork() }? {
            ForkResult::Child => {
                child(&self.exec.path, &argv, &envp, raw(&write_end));
            }
            ForkResult::Parent { child } => {
                drop(write_end);
                Ok((child, File::from(read_end)))
            }
        }
    }
}

fn raw(fd: &impl std::os::fd::AsRawFd) -> RawFd {
    fd.as_raw_fd()
}

fn clear_flag(fd: RawFd, get: libc::c_int, set: libc::c_int, flag: libc::c_int) {
    // SAFETY: fcntl get/set of fd or status flags on a valid fd touches nothing else.
    unsafe {
        let flags = libc::fcntl(fd, get);
        if flags >= 0 {
            libc::fcntl(fd, set, flags & !flag);
        }
    }
}

/// Makes `fd` available as `target` across exec (dup2 of an fd onto itself would keep its
/// close-on-exec flag, so that case clears the flag instead).
fn install_fd(fd: RawFd, target: RawFd) {
    if fd == target {
        clear_flag(fd, libc::F_GETFD, libc::F_SETFD, libc::FD_CLOEXEC);
    } else {
        // SAFETY: dup2 on valid fds; the duplicate has FD_CLOEXEC clear.
        unsafe { libc::dup2(fd, target) };
    }
}

/// The forked child: sets up sysd's session, fds and signal state, then execs it.
fn child(
    path: &CString,
    argv: &[*const libc::c_char],
    envp: &[*const libc::c_char],
    notify: RawFd,
) -> ! {
    // Order matters: fd 3 is placed before the console and /dev/null are opened, and those are
    // opened close-on-exec so that whatever numbers they get, only their dup2 copies survive.
    install_fd(notify, NOTIFY_FD);
    // SAFETY: plain system calls on paths that are NUL-terminated literals and fds this process
    // owns; argv/envp are NULL-terminated arrays of pointers into CStrings that outlive the call
    // (the parent's memory is copied into the child).
    unsafe {
        libc::setsid();
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC);
        if null >= 0 {
            install_fd(null, 0);
        }
        let console = libc::open(
            c"/dev/console".as_ptr(),
            libc::O_WRONLY | libc::O_NOCTTY | libc::O_CLOEXEC,
        );
        if console >= 0 {
            install_fd(console, 1);
            install_fd(console, 2);
        }
        // Rust's runtime set SIGPIPE to ignored and init blocks every signal; sysd must start with
        // the defaults, as exec keeps both ignored dispositions and the mask.
        for sig in 1..libc::SIGRTMIN() {
            libc::signal(sig, libc::SIG_DFL);
        }
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
        libc::execve(path.as_ptr(), argv.as_ptr(), envp.as_ptr());
    }
    // Formatting allocates, which is sound after fork only because init is single-threaded (no
    // other thread can have held the allocator's lock at fork time).
    let errno = Errno::last();
    crate::log::use_stderr();
    say!(
        "cannot exec {}: {errno}",
        String::from_utf8_lossy(path.as_bytes())
    );
    // SAFETY: _exit ends the child without running the parent's atexit handlers or flushing
    // its copies of buffers.
    unsafe { libc::_exit(127) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::signal::Signal;

    #[test]
    fn backoff_doubles_caps_and_resets() {
        let mut b = Backoff::new();
        let quick = Duration::from_secs(1);
        let delays: Vec<u128> = (0..10).map(|_| b.after_exit(quick).as_millis()).collect();
        assert_eq!(
            delays,
            [200, 400, 800, 1600, 3200, 6400, 12800, 25600, 30000, 30000]
        );
        assert_eq!(b.after_exit(Duration::from_secs(60)), Backoff::MIN);
        assert_eq!(b.after_exit(quick), Duration::from_millis(400));
        assert_eq!(
            b.after_exit(Duration::from_secs(59)),
            Duration::from_millis(800)
        );
    }

    #[test]
    fn notify_lines() {
        let mut buf = b"READY=1\nSTATUS=x".to_vec();
        assert_eq!(take_lines(&mut buf), ["READY=1"]);
        assert_eq!(buf, b"STATUS=x");
        assert!(take_lines(&mut buf).is_empty());
        buf.extend_from_slice(b" y\n\nREADY=1\r\n");
        assert_eq!(take_lines(&mut buf), ["STATUS=x y", "READY=1"]);
        assert!(buf.is_empty());
    }

    #[test]
    fn exit_descriptions() {
        let pid = Pid::from_raw(7);
        assert_eq!(
            describe_exit("sysd", &WaitStatus::Exited(pid, 3)).unwrap(),
            "sysd exited with status 3"
        );
        assert_eq!(
            describe_exit("sysd", &WaitStatus::Signaled(pid, Signal::SIGKILL, false)).unwrap(),
            "sysd killed by signal SIGKILL"
        );
        assert_eq!(describe_exit("sysd", &WaitStatus::StillAlive), None);
    }

    #[test]
    fn vmrss() {
        let status =
            "Name:\tkeelson-init\nVmPeak:\t    9999 kB\nVmRSS:\t    1234 kB\nThreads:\t1\n";
        assert_eq!(parse_vmrss_kib(status), Some(1234));
        assert_eq!(parse_vmrss_kib("Name: x\n"), None);
    }

    #[test]
    fn child_gets_notify_fd_and_clean_signal_state() {
        // Blocked in the parent, as in stage 2: the child must not inherit the mask, nor the
        // ignored SIGPIPE the Rust runtime (and the test harness) set up.
        let mut usr1 = nix::sys::signal::SigSet::empty();
        usr1.add(Signal::SIGUSR1);
        usr1.thread_block().unwrap();
        // Signal 32 is glibc-internal and may be ignored by whatever started the tests; only the
        // standard signals 1-31 are checked.
        let script = r#"
            while read -r key value; do
                case $key in
                    SigBlk:) [ $((0x$value)) -eq 0 ] || exit 1 ;;
                    SigIgn:) [ $((0x$value & 0x7fffffff)) -eq 0 ] || exit 2 ;;
                esac
            done < /proc/$$/status
            awk '{ exit ($1 != $6) }' /proc/$$/stat || exit 3
            [ "$KEELSON_NOTIFY_FD" = 3 ] || exit 4
            printf 'STATUS=starting\nREADY=1\n' >&3"#;
        let mut sup = Supervisor::with_exec(Exec::new("/bin/sh", &["sh", "-c", script]));
        sup.tick(Instant::now());
        let pid = sup.pid().unwrap();
        let status = waitpid(pid, None).unwrap();
        usr1.thread_unblock().unwrap();
        assert_eq!(status, WaitStatus::Exited(pid, 0));
        sup.on_notify();
        assert!(sup.ready_seen);
        assert!(sup.on_reaped(pid, &status));
        assert!(sup.pid().is_none());
        assert!(sup.timeout(Instant::now()).unwrap() <= Backoff::MIN);
        sup.stop_restarting();
        assert!(sup.timeout(Instant::now()).is_none());
    }

    #[test]
    fn sysd_environment() {
        let e = Exec::sysd();
        assert!(e
            .envp
            .iter()
            .any(|v| v.as_bytes() == b"KEELSON_NOTIFY_FD=3"));
        assert_eq!(
            e.argv,
            [
                CString::new(SYSD).unwrap(),
                CString::new("--host-network").unwrap(),
                CString::new("--extensions").unwrap()
            ]
        );
    }
}
