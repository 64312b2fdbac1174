//! Supervision of sysd, init's only child: spawning it with its end of the notify channel
//! (`keelson_common::notify`: a `SOCK_SEQPACKET` socketpair on fd 3), reading `READY=1` and
//! `WATCHDOG=1` from it, keeping the descriptors sysd stores there (its containers' log pipes,
//! so they outlive a crashed sysd), reaping every process that ends up as init's child and
//! telling sysd how the orphans among them ended, and restarting sysd with exponential backoff
//! when it dies. A restarted sysd gets every stored descriptor and the remembered exits back,
//! then `FDSTORE-END=1`: what it needs to adopt the containers still running.
//!
//! init never blocks on the channel: what sysd has not read yet waits in an outbox, sent when
//! the socket is writable again.

use std::collections::VecDeque;
use std::ffi::{CString, OsStr};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::time::{Duration, Instant};

use keelson_common::notify::{self, Exit, ExitLog, FdStore, Message, Status};
use nix::errno::Errno;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{fork, ForkResult, Pid};

use crate::say;

/// The service manager init supervises.
pub const SYSD: &str = "/usr/bin/sysd";
/// The fd number sysd finds its end of the notify channel at (also in `KEELSON_NOTIFY_FD`).
pub const NOTIFY_FD: RawFd = notify::FD;

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
pub struct Exec {
    path: CString,
    argv: Vec<CString>,
    envp: Vec<CString>,
    /// Keep init's stdin/stdout/stderr (the host mode) instead of /dev/null and the console.
    inherit_stdio: bool,
}

impl Exec {
    fn sysd() -> Self {
        // sysd owns the host network and the extensions on a node (the flags keep host tests
        // off the host's links and /usr).
        // sysd reads exactly this command line without clap (`NODE_ARGS` in sysd's main).
        Self::new(SYSD, &[SYSD, "--host-network", "--extensions"])
    }

    /// `path` with `args` (argv[0] included) and init's environment, `PATH` kept (the host
    /// mode: `keelson-init supervise`).
    pub fn keeping_path(path: &str, args: &[&str]) -> Self {
        let mut exec = Self::new(path, args);
        if let Some(p) = std::env::var_os("PATH") {
            let mut kv = b"PATH=".to_vec();
            kv.extend_from_slice(p.as_bytes());
            exec.envp.retain(|e| !e.as_bytes().starts_with(b"PATH="));
            exec.envp.extend(CString::new(kv).ok());
        }
        exec.inherit_stdio = true;
        exec
    }

    fn new(path: &str, args: &[&str]) -> Self {
        let mut envp: Vec<CString> = std::env::vars_os()
            .filter(|(k, _)| k != "PATH" && k != notify::FD_ENV)
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
                format!("{}={NOTIFY_FD}", notify::FD_ENV),
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
            inherit_stdio: false,
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

/// init's end of the notify channel to the running sysd, with what waits to be sent on it.
struct Channel {
    sock: OwnedFd,
    /// Messages sysd has not taken yet (its queue was full), each with its descriptor.
    outbox: VecDeque<(Message, Option<OwnedFd>)>,
}

/// Bound of the outbox: stored descriptors, remembered exits and the end marker fit, with room
/// for live exits; beyond it a sysd that reads nothing loses the oldest live exits.
const OUTBOX_MAX: usize = notify::MAX_STORED + notify::MAX_EXITS + 1024;

impl Channel {
    fn queue(&mut self, msg: Message, fd: Option<OwnedFd>) {
        if self.outbox.len() >= OUTBOX_MAX {
            self.outbox.pop_front();
        }
        self.outbox.push_back((msg, fd));
    }

    /// Sends what it can without blocking. A peer that is gone gets nothing more (what it sent
    /// before is still read, until the end of the stream).
    fn flush(&mut self) {
        while let Some((msg, fd)) = self.outbox.front() {
            match notify::send(self.sock.as_fd(), msg, fd.as_ref().map(|f| f.as_fd())) {
                Ok(()) => {
                    self.outbox.pop_front();
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(_) => {
                    self.outbox.clear();
                    return;
                }
            }
        }
    }
}

/// sysd's lifecycle.
pub struct Supervisor {
    exec: Exec,
    state: State,
    backoff: Backoff,
    channel: Option<Channel>,
    /// Descriptors sysd asked init to keep (its containers' log pipes), by name.
    store: FdStore,
    /// How the last orphans init reaped ended, for the next sysd.
    exits: ExitLog,
    ready_seen: bool,
    /// sysd's last sign of life: its start, then any message on the channel (`WATCHDOG=1`).
    last_seen: Instant,
    /// Whether bad messages are said on the console (once per sysd run: a broken sysd must
    /// not flood it).
    complained: bool,
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
            channel: None,
            store: FdStore::new(notify::MAX_STORED),
            exits: ExitLog::default(),
            ready_seen: false,
            last_seen: Instant::now(),
            complained: false,
        }
    }

    /// A supervisor of `exec` (the host mode) whose first start is due now.
    pub fn of(exec: Exec) -> Self {
        Self::with_exec(exec)
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

    /// The notify channel while sysd runs, and whether init waits to write on it (its outbox
    /// is not empty) besides reading.
    pub fn notify_fd(&self) -> Option<(BorrowedFd<'_>, bool)> {
        self.channel
            .as_ref()
            .map(|c| (c.sock.as_fd(), !c.outbox.is_empty()))
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
            Ok((pid, sock)) => {
                say!("stage2: sysd started (pid {pid})");
                self.state = State::Running {
                    pid,
                    started: Instant::now(),
                };
                self.channel = Some(self.handover(sock));
                self.complained = false;
                self.last_seen = Instant::now();
                self.flush();
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

    /// What a newly started sysd gets first: every stored descriptor, the remembered exits,
    /// then `FDSTORE-END=1`.
    fn handover(&self, sock: OwnedFd) -> Channel {
        let mut channel = Channel {
            sock,
            outbox: VecDeque::new(),
        };
        let stored = self.store.len();
        for (name, fd) in self.store.iter() {
            match fd.try_clone_to_owned() {
                Ok(fd) => channel.queue(Message::FdStore { name: name.into() }, Some(fd)),
                Err(e) => say!("fd store: cannot pass {name} on: {e}"),
            }
        }
        for exit in self.exits.iter() {
            channel.queue(Message::Exit(*exit), None);
        }
        channel.queue(Message::FdStoreEnd, None);
        if stored > 0 {
            say!(
                "fd store: handing {stored} descriptor(s) and {} exit(s) to sysd",
                self.exits.len()
            );
        }
        channel
    }

    fn flush(&mut self) {
        if let Some(c) = self.channel.as_mut() {
            c.flush();
        }
    }

    /// Reads every queued message, then sends what waits in the outbox; logs the boot-complete
    /// line on the first `READY=1` of the boot.
    pub fn on_notify(&mut self) {
        let mut closed = false;
        let mut received = Vec::new();
        if let Some(c) = self.channel.as_ref() {
            // Bounded per wake-up, so a flooding sysd cannot starve signals and reaping.
            for _ in 0..1024 {
                match notify::recv(c.sock.as_fd()) {
                    Ok(Some(r)) => received.push(r),
                    Ok(None) => {
                        closed = true;
                        break;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    // Reported once when sysd closed its end with messages of init's unread;
                    // what sysd sent before is still queued.
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::Interrupted | std::io::ErrorKind::ConnectionReset
                        ) => {}
                    Err(_) => {
                        closed = true;
                        break;
                    }
                }
            }
        }
        for r in received {
            // Any message is a sign of life; `WATCHDOG=1` says nothing else.
            self.last_seen = Instant::now();
            self.on_message(&r.bytes, r.fds);
        }
        if closed {
            // sysd closed its end (or died): stop polling a socket that would report HUP
            // forever.
            self.channel = None;
        } else {
            self.flush();
        }
    }

    fn on_message(&mut self, bytes: &[u8], fds: Vec<OwnedFd>) {
        let complain = |this: &mut Self, what: String| {
            if !this.complained {
                say!("notify: {what} (further bad messages of this sysd are not logged)");
                this.complained = true;
            }
        };
        match Message::parse(bytes) {
            Ok(Message::Ready) => self.on_ready(),
            Ok(Message::Watchdog) => {}
            Ok(Message::FdStore { name }) => {
                if let Err(e) = self.store.store(&name, fds) {
                    complain(self, e.to_string());
                }
            }
            Ok(Message::FdStoreRemove { name }) => {
                self.store.remove(&name);
            }
            Ok(m @ (Message::FdStoreEnd | Message::Exit(_))) => {
                complain(self, format!("{m:?} is init's to send"));
            }
            Err(e) => complain(self, e.to_string()),
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

    /// Accounts for a reaped child; schedules a restart if it was sysd (unless stopped), else
    /// remembers how the orphan ended and tells sysd. Returns whether it was sysd.
    pub fn on_reaped(&mut self, pid: Pid, status: &WaitStatus) -> bool {
        let sysd = match self.state {
            State::Running { pid: sysd, started } if pid == sysd => Some(started),
            _ => None,
        };
        let Some(started) = sysd else {
            if let Some(exit) = orphan_exit(pid, status, crate::log::boottime()) {
                self.exits.push(exit);
                if let Some(c) = self.channel.as_mut() {
                    c.queue(Message::Exit(exit), None);
                }
                self.flush();
            }
            return false;
        };
        if let Some(line) = describe_exit("sysd", status) {
            say!("{line}");
        }
        // Whatever sysd sent before dying still counts (stored descriptors included).
        self.on_notify();
        self.channel = None;
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
        self.channel = None;
    }

    fn spawn(&mut self) -> Result<(Pid, OwnedFd), Errno> {
        let (init_end, sysd_end) = notify::socketpair().map_err(errno_of)?;
        // sysd's end blocks (sysd sets what it wants); only init's end must not.
        clear_flag(
            raw(&sysd_end),
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
                child(
                    &self.exec.path,
                    &argv,
                    &envp,
                    raw(&sysd_end),
                    self.exec.inherit_stdio,
                );
            }
            ForkResult::Parent { child } => {
                drop(sysd_end);
                Ok((child, init_end))
            }
        }
    }
}

/// Raises init's soft limit of open files to its hard one: the FD store holds up to
/// [`notify::MAX_STORED`] descriptors besides init's own. Children inherit the raised limit.
pub fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write the struct, which outlives both calls.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                say!("cannot raise the open files limit: {}", Errno::last());
            }
        }
    }
}

/// `keelson-init supervise [--] PROGRAM ARGS...`: init's supervision of sysd without the rest
/// of PID 1 (host tests and benchmarks run a sysd under it to exercise the real FD store and
/// exit forwarding). It becomes a child subreaper, so orphans reach it as they reach PID 1 on
/// a node, restarts PROGRAM when it dies, and on SIGTERM or SIGINT stops it (SIGTERM, as
/// shutdown does) and exits.
pub fn host_main(args: &[String]) -> ! {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use nix::sys::signal::{kill, SigSet, SigmaskHow, Signal};
    use nix::sys::signalfd::{SfdFlags, SignalFd};

    crate::log::use_stderr();
    // Where to record init's lines, as PID 1 does in /run/keelson/init.log (`GET /v1/boot`).
    if let Ok(path) = std::env::var("KEELSON_INIT_LOG") {
        crate::log::open_record(&path);
    }
    let args: Vec<&str> = args
        .iter()
        .map(String::as_str)
        .skip_while(|a| *a == "--")
        .collect();
    let Some(program) = args.first() else {
        eprintln!("usage: keelson-init supervise [--] PROGRAM ARGS...");
        std::process::exit(2);
    };
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } != 0 {
        eprintln!(
            "keelson-init supervise: cannot become a subreaper: {}",
            Errno::last()
        );
        std::process::exit(1);
    }
    let mut set = SigSet::empty();
    for s in [Signal::SIGCHLD, Signal::SIGTERM, Signal::SIGINT] {
        set.add(s);
    }
    let sfd = nix::sys::signal::sigprocmask(SigmaskHow::SIG_BLOCK, Some(&set), None)
        .and_then(|()| SignalFd::with_flags(&set, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC));
    let sfd = match sfd {
        Ok(s) => s,
        Err(e) => {
            eprintln!("keelson-init supervise: signalfd: {e}");
            std::process::exit(1);
        }
    };
    raise_fd_limit();
    let mut sup = Supervisor::of(Exec::keeping_path(program, &args));
    let mut stopping = false;
    loop {
        if !stopping {
            sup.tick(Instant::now());
        }
        let timeout = sup.timeout(Instant::now()).map_or(PollTimeout::NONE, |d| {
            PollTimeout::from(u16::try_from(d.as_millis() + 1).unwrap_or(u16::MAX))
        });
        let notify_ready = {
            let mut fds = vec![PollFd::new(sfd.as_fd(), PollFlags::POLLIN)];
            let notify = sup.notify_fd();
            if let Some((fd, wants_write)) = notify {
                let mut events = PollFlags::POLLIN;
                events.set(PollFlags::POLLOUT, wants_write);
                fds.push(PollFd::new(fd, events));
            }
            let _ = poll(&mut fds, timeout);
            notify.is_some()
                && fds
                    .get(1)
                    .and_then(|f| f.revents())
                    .is_some_and(|r| !r.is_empty())
        };
        while let Ok(Some(info)) = sfd.read_signal() {
            let sig = i32::try_from(info.ssi_signo).unwrap_or(0);
            if (sig == libc::SIGTERM || sig == libc::SIGINT) && !stopping {
                stopping = true;
                sup.stop_restarting();
                match sup.pid() {
                    Some(pid) => {
                        let _ = kill(pid, Signal::SIGTERM);
                    }
                    None => std::process::exit(0),
                }
            }
        }
        let (reaped, _) = reap_all();
        for (pid, status) in &reaped {
            if sup.on_reaped(*pid, status) && stopping {
                std::process::exit(0);
            }
        }
        if notify_ready {
            sup.on_notify();
        }
    }
}

/// How an orphan ended, as the next sysd is told (`None` for a stop or continue).
pub fn orphan_exit(pid: Pid, status: &WaitStatus, now: Duration) -> Option<Exit> {
    let status = match status {
        WaitStatus::Exited(_, code) => Status::Exited(*code),
        WaitStatus::Signaled(_, sig, _) => Status::Signaled(*sig as i32),
        _ => return None,
    };
    Some(Exit {
        pid: pid.as_raw(),
        status,
        at_us: u64::try_from(now.as_micros()).unwrap_or(u64::MAX),
    })
}

fn errno_of(e: std::io::Error) -> Errno {
    Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO))
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
    inherit_stdio: bool,
) -> ! {
    // Order matters: fd 3 is placed before the console and /dev/null are opened, and those are
    // opened close-on-exec so that whatever numbers they get, only their dup2 copies survive.
    install_fd(notify, NOTIFY_FD);
    // SAFETY: plain system calls on paths that are NUL-terminated literals and fds this process
    // owns; argv/envp are NULL-terminated arrays of pointers into CStrings that outlive the call
    // (the parent's memory is copied into the child).
    unsafe {
        libc::setsid();
        if !inherit_stdio {
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
    use std::io::Write;

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
            printf 'READY=1\n' >&3"#;
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

    fn read_all(sock: &OwnedFd) -> Vec<(Message, Vec<OwnedFd>)> {
        let mut got = Vec::new();
        while let Ok(Some(r)) = notify::recv(sock.as_fd()) {
            got.push((Message::parse(&r.bytes).unwrap(), r.fds));
        }
        got
    }

    /// A supervisor whose sysd "runs" as `pid` on a socketpair (no fork): the test holds
    /// sysd's end.
    fn running(sup: &mut Supervisor, pid: i32) -> OwnedFd {
        let (init_end, sysd_end) = notify::socketpair().unwrap();
        sup.state = State::Running {
            pid: Pid::from_raw(pid),
            started: Instant::now(),
        };
        sup.channel = Some(sup.handover(init_end));
        sup.flush();
        sysd_end
    }

    #[test]
    fn stored_descriptors_and_orphan_exits_reach_the_next_sysd() {
        let mut sup = Supervisor::with_exec(Exec::new("/bin/false", &["false"]));
        let sysd = running(&mut sup, 100);
        // A first sysd gets nothing but the end marker.
        let got = read_all(&sysd);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].0, Message::FdStoreEnd);

        let (r, mut w) = std::io::pipe().unwrap();
        let store = |name: &str| Message::FdStore { name: name.into() };
        notify::send(sysd.as_fd(), &store("web/stdout"), Some(r.as_fd())).unwrap();
        drop(r);
        notify::send(sysd.as_fd(), &store("gone/stdout"), Some(sysd.as_fd())).unwrap();
        notify::send(
            sysd.as_fd(),
            &Message::FdStoreRemove {
                name: "gone/stdout".into(),
            },
            None,
        )
        .unwrap();
        // Bad input is refused, not stored: no descriptor, a message only init sends.
        notify::send(sysd.as_fd(), &store("nofd/stdout"), None).unwrap();
        notify::send(sysd.as_fd(), &Message::FdStoreEnd, None).unwrap();
        sup.on_notify();
        assert_eq!(sup.store.len(), 1);
        assert!(sup.complained);

        // sysd dies; a container init it left is reaped by init meanwhile.
        assert!(sup.on_reaped(
            Pid::from_raw(100),
            &WaitStatus::Signaled(Pid::from_raw(100), nix::sys::signal::Signal::SIGKILL, false)
        ));
        assert!(sup.channel.is_none());
        assert!(!sup.on_reaped(Pid::from_raw(77), &WaitStatus::Exited(Pid::from_raw(77), 3)));
        w.write_all(b"written while no sysd ran\n").unwrap();

        // The next sysd gets the pipe (with what waited in it), the exit, then the end.
        let sysd = running(&mut sup, 101);
        let mut got = read_all(&sysd);
        assert_eq!(
            got.len(),
            3,
            "{:?}",
            got.iter().map(|g| &g.0).collect::<Vec<_>>()
        );
        assert_eq!(got[0].0, store("web/stdout"));
        assert!(matches!(
            got[1].0,
            Message::Exit(Exit {
                pid: 77,
                status: Status::Exited(3),
                ..
            })
        ));
        assert_eq!(got[2].0, Message::FdStoreEnd);
        let mut line = String::new();
        let fd = got[0].1.pop().unwrap();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(std::fs::File::from(fd)),
            &mut line,
        )
        .unwrap();
        assert_eq!(line, "written while no sysd ran\n");

        // Later orphans are told live.
        sup.on_reaped(
            Pid::from_raw(78),
            &WaitStatus::Signaled(Pid::from_raw(78), nix::sys::signal::Signal::SIGTERM, false),
        );
        let got = read_all(&sysd);
        assert!(matches!(
            got[0].0,
            Message::Exit(Exit {
                pid: 78,
                status: Status::Signaled(15),
                ..
            })
        ));
    }

    #[test]
    fn what_sysd_does_not_read_waits_in_the_outbox_in_order() {
        let mut sup = Supervisor::with_exec(Exec::new("/bin/false", &["false"]));
        // More descriptors than a unix socket queues (net.unix.max_dgram_qlen).
        let mut writers = Vec::new();
        for i in 0..300 {
            let (r, w) = std::io::pipe().unwrap();
            sup.store
                .store(&format!("s{i:03}/stdout"), vec![r.into()])
                .unwrap();
            writers.push(w);
        }
        let sysd = running(&mut sup, 100);
        let mut names = Vec::new();
        loop {
            let got = read_all(&sysd);
            if got.is_empty() {
                assert!(sup.notify_fd().is_some_and(|(_, wants_write)| wants_write));
            }
            for (m, fds) in got {
                match m {
                    Message::FdStore { name } => {
                        assert_eq!(fds.len(), 1);
                        names.push(name);
                    }
                    Message::FdStoreEnd => {
                        assert_eq!(names.len(), 300);
                        assert!(names.windows(2).all(|w| w[0] < w[1]));
                        assert!(!sup.notify_fd().unwrap().1);
                        return;
                    }
                    other => panic!("{other:?}"),
                }
            }
            // What init's poll loop does when the socket is writable again.
            sup.on_notify();
        }
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
