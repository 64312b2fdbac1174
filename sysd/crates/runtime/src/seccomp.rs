//! The default seccomp profile: an allowlist in the spirit of Docker's default profile.
//!
//! Everything not listed fails with EPERM. The unconditional list is the set of syscalls an
//! ordinary program needs; the rest is gated on the capabilities the container ends up with
//! (a syscall whose only use needs CAP_X is allowed only when CAP_X is in the set), so adding
//! a capability also opens the syscalls it is meant for, as with Docker. Two conditional rules
//! matter in practice: `clone` is allowed only without namespace flags unless CAP_SYS_ADMIN
//! (a container must not make new namespaces), and `clone3`, whose flags live in memory that
//! seccomp cannot inspect, fails with ENOSYS so that libc falls back to `clone`.
//!
//! A profile is compiled to a BPF program once, by sysd ([`compile`]), and the container's
//! process loads that program where libcontainer loaded its own ([`load`]), instead of
//! libcontainer building the same filter with libseccomp in every container it starts (about
//! 9 ms of each start, more than crun's whole start). Masked-equal arguments follow the
//! runtime spec, runc and crun (and Docker's JSON profiles): `value` is the mask, `valueTwo`
//! the datum, so the profile in a bundle means the same under every runtime.

use std::collections::BTreeSet;

use std::io::{Read, Seek};
use std::os::fd::FromRawFd;

use anyhow::{bail, Context, Result};
use libseccomp::{ScmpAction, ScmpArch};
use oci_spec::runtime::{
    Arch, LinuxSeccomp, LinuxSeccompAction, LinuxSeccompArg, LinuxSeccompArgBuilder,
    LinuxSeccompOperator, LinuxSyscall,
};

/// Allowed for every container.
const ALWAYS: &[&str] = &[
    "accept",
    "accept4",
    "access",
    "adjtimex",
    "alarm",
    "bind",
    "brk",
    "capget",
    "capset",
    "chdir",
    "chmod",
    "chown",
    "chown32",
    "clock_adjtime",
    "clock_adjtime64",
    "clock_getres",
    "clock_getres_time64",
    "clock_gettime",
    "clock_gettime64",
    "clock_nanosleep",
    "clock_nanosleep_time64",
    "close",
    "close_range",
    "connect",
    "copy_file_range",
    "creat",
    "dup",
    "dup2",
    "dup3",
    "epoll_create",
    "epoll_create1",
    "epoll_ctl",
    "epoll_ctl_old",
    "epoll_pwait",
    "epoll_pwait2",
    "epoll_wait",
    "epoll_wait_old",
    "eventfd",
    "eventfd2",
    "execve",
    "execveat",
    "exit",
    "exit_group",
    "faccessat",
    "faccessat2",
    "fadvise64",
    "fadvise64_64",
    "fallocate",
    "fanotify_mark",
    "fchdir",
    "fchmod",
    "fchmodat",
    "fchmodat2",
    "fchown",
    "fchown32",
    "fchownat",
    "fcntl",
    "fcntl64",
    "fdatasync",
    "fgetxattr",
    "flistxattr",
    "flock",
    "fork",
    "fremovexattr",
    "fsetxattr",
    "fstat",
    "fstat64",
    "fstatat64",
    "fstatfs",
    "fstatfs64",
    "fsync",
    "ftruncate",
    "ftruncate64",
    "futex",
    "futex_time64",
    "futex_waitv",
    "futimesat",
    "getcpu",
    "getcwd",
    "getdents",
    "getdents64",
    "getegid",
    "getegid32",
    "geteuid",
    "geteuid32",
    "getgid",
    "getgid32",
    "getgroups",
    "getgroups32",
    "getitimer",
    "getpeername",
    "getpgid",
    "getpgrp",
    "getpid",
    "getppid",
    "getpriority",
    "getrandom",
    "getresgid",
    "getresgid32",
    "getresuid",
    "getresuid32",
    "getrlimit",
    "get_robust_list",
    "getrusage",
    "getsid",
    "getsockname",
    "getsockopt",
    "get_thread_area",
    "gettid",
    "gettimeofday",
    "getuid",
    "getuid32",
    "getxattr",
    "inotify_add_watch",
    "inotify_init",
    "inotify_init1",
    "inotify_rm_watch",
    "io_cancel",
    "ioctl",
    "io_destroy",
    "io_getevents",
    "io_pgetevents",
    "io_pgetevents_time64",
    "ioprio_get",
    "ioprio_set",
    "io_setup",
    "io_submit",
    "io_uring_enter",
    "io_uring_register",
    "io_uring_setup",
    "ipc",
    "kill",
    "landlock_add_rule",
    "landlock_create_ruleset",
    "landlock_restrict_self",
    "lchown",
    "lchown32",
    "lgetxattr",
    "link",
    "linkat",
    "listen",
    "listxattr",
    "llistxattr",
    "_llseek",
    "lremovexattr",
    "lseek",
    "lsetxattr",
    "lstat",
    "lstat64",
    "madvise",
    "map_shadow_stack",
    "membarrier",
    "memfd_create",
    "memfd_secret",
    "mincore",
    "mkdir",
    "mkdirat",
    "mknod",
    "mknodat",
    "mlock",
    "mlock2",
    "mlockall",
    "mmap",
    "mmap2",
    "mprotect",
    "mq_getsetattr",
    "mq_notify",
    "mq_open",
    "mq_timedreceive",
    "mq_timedreceive_time64",
    "mq_timedsend",
    "mq_timedsend_time64",
    "mq_unlink",
    "mremap",
    "msgctl",
    "msgget",
    "msgrcv",
    "msgsnd",
    "msync",
    "munlock",
    "munlockall",
    "munmap",
    "name_to_handle_at",
    "nanosleep",
    "newfstatat",
    "_newselect",
    "open",
    "openat",
    "openat2",
    "pause",
    "pidfd_open",
    "pidfd_send_signal",
    "pipe",
    "pipe2",
    "pkey_alloc",
    "pkey_free",
    "pkey_mprotect",
    "poll",
    "ppoll",
    "ppoll_time64",
    "prctl",
    "pread64",
    "preadv",
    "preadv2",
    "prlimit64",
    "process_mrelease",
    "process_vm_readv",
    "process_vm_writev",
    "pselect6",
    "pselect6_time64",
    "ptrace",
    "pwrite64",
    "pwritev",
    "pwritev2",
    "read",
    "readahead",
    "readlink",
    "readlinkat",
    "readv",
    "recv",
    "recvfrom",
    "recvmmsg",
    "recvmmsg_time64",
    "recvmsg",
    "remap_file_pages",
    "removexattr",
    "rename",
    "renameat",
    "renameat2",
    "restart_syscall",
    "rmdir",
    "rseq",
    "rt_sigaction",
    "rt_sigpending",
    "rt_sigprocmask",
    "rt_sigqueueinfo",
    "rt_sigreturn",
    "rt_sigsuspend",
    "rt_sigtimedwait",
    "rt_sigtimedwait_time64",
    "rt_tgsigqueueinfo",
    "sched_getaffinity",
    "sched_getattr",
    "sched_getparam",
    "sched_get_priority_max",
    "sched_get_priority_min",
    "sched_getscheduler",
    "sched_rr_get_interval",
    "sched_rr_get_interval_time64",
    "sched_setaffinity",
    "sched_setattr",
    "sched_setparam",
    "sched_setscheduler",
    "sched_yield",
    "seccomp",
    "select",
    "semctl",
    "semget",
    "semop",
    "semtimedop",
    "semtimedop_time64",
    "send",
    "sendfile",
    "sendfile64",
    "sendmmsg",
    "sendmsg",
    "sendto",
    "setfsgid",
    "setfsgid32",
    "setfsuid",
    "setfsuid32",
    "setgid",
    "setgid32",
    "setgroups",
    "setgroups32",
    "setitimer",
    "setpgid",
    "setpriority",
    "setregid",
    "setregid32",
    "setresgid",
    "setresgid32",
    "setresuid",
    "setresuid32",
    "setreuid",
    "setreuid32",
    "setrlimit",
    "set_robust_list",
    "setsid",
    "setsockopt",
    "set_thread_area",
    "set_tid_address",
    "setuid",
    "setuid32",
    "setxattr",
    "shmat",
    "shmctl",
    "shmdt",
    "shmget",
    "shutdown",
    "sigaltstack",
    "signalfd",
    "signalfd4",
    "sigprocmask",
    "sigreturn",
    "socketcall",
    "socketpair",
    "splice",
    "stat",
    "stat64",
    "statfs",
    "statfs64",
    "statx",
    "symlink",
    "symlinkat",
    "sync",
    "sync_file_range",
    "syncfs",
    "sysinfo",
    "tee",
    "tgkill",
    "time",
    "timer_create",
    "timer_delete",
    "timer_getoverrun",
    "timer_gettime",
    "timer_gettime64",
    "timer_settime",
    "timer_settime64",
    "timerfd_create",
    "timerfd_gettime",
    "timerfd_gettime64",
    "timerfd_settime",
    "timerfd_settime64",
    "times",
    "tkill",
    "truncate",
    "truncate64",
    "ugetrlimit",
    "umask",
    "uname",
    "unlink",
    "unlinkat",
    "utime",
    "utimensat",
    "utimensat_time64",
    "utimes",
    "vfork",
    "vmsplice",
    "wait4",
    "waitid",
    "waitpid",
    "write",
    "writev",
];

/// Architecture-specific syscalls allowed for every container.
#[cfg(target_arch = "x86_64")]
const ARCH_ALWAYS: &[&str] = &["arch_prctl", "modify_ldt"];
#[cfg(target_arch = "aarch64")]
const ARCH_ALWAYS: &[&str] = &[
    "arm_fadvise64_64",
    "arm_sync_file_range",
    "sync_file_range2",
    "breakpoint",
    "cacheflush",
    "set_tls",
];
#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
const ARCH_ALWAYS: &[&str] = &[];

/// Syscalls allowed only when the container holds the capability.
const BY_CAPABILITY: &[(&str, &[&str])] = &[
    ("CAP_DAC_READ_SEARCH", &["open_by_handle_at"]),
    (
        "CAP_SYS_ADMIN",
        &[
            "bpf",
            "clone",
            "clone3",
            "fanotify_init",
            "fsconfig",
            "fsmount",
            "fsopen",
            "fspick",
            "lookup_dcookie",
            "mount",
            "mount_setattr",
            "move_mount",
            "open_tree",
            "perf_event_open",
            "quotactl",
            "quotactl_fd",
            "setdomainname",
            "sethostname",
            "setns",
            "syslog",
            "umount",
            "umount2",
            "unshare",
        ],
    ),
    ("CAP_SYS_BOOT", &["reboot"]),
    ("CAP_SYS_CHROOT", &["chroot"]),
    (
        "CAP_SYS_MODULE",
        &["delete_module", "init_module", "finit_module"],
    ),
    ("CAP_SYS_PACCT", &["acct"]),
    (
        "CAP_SYS_PTRACE",
        &["kcmp", "pidfd_getfd", "process_madvise"],
    ),
    ("CAP_SYS_RAWIO", &["iopl", "ioperm"]),
    (
        "CAP_SYS_TIME",
        &["settimeofday", "stime", "clock_settime", "clock_settime64"],
    ),
    ("CAP_SYS_TTY_CONFIG", &["vhangup"]),
    (
        "CAP_SYS_NICE",
        &[
            "get_mempolicy",
            "mbind",
            "set_mempolicy",
            "set_mempolicy_home_node",
        ],
    ),
    ("CAP_SYSLOG", &["syslog"]),
    ("CAP_BPF", &["bpf"]),
    ("CAP_PERFMON", &["perf_event_open"]),
];

/// `personality(2)` values allowed: PER_LINUX, UNAME26, PER_LINUX32, PER_LINUX32|UNAME26 and
/// the query value 0xffffffff.
const PERSONALITIES: &[u64] = &[0x0, 0x0008, 0x20000, 0x20008, 0xffff_ffff];

/// Namespace flags `clone` must not carry without CAP_SYS_ADMIN.
pub const CLONE_NAMESPACE_FLAGS: u64 = (libc::CLONE_NEWNS
    | libc::CLONE_NEWUTS
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWUSER
    | libc::CLONE_NEWPID
    | libc::CLONE_NEWNET
    | libc::CLONE_NEWCGROUP) as u64;

/// Whether the linked libseccomp knows `name` on the native architecture. libcontainer skips
/// (with a warning per name) what it cannot resolve, and 32-bit-only names such as `chown32`
/// never resolve on x86_64; leaving them out keeps every container start free of warnings
/// without changing the filter.
fn known(name: &str) -> bool {
    libseccomp::ScmpSyscall::from_name(name).is_ok()
}

fn allow<'a>(names: impl IntoIterator<Item = &'a str>) -> LinuxSyscall {
    let mut rule = LinuxSyscall::default();
    rule.set_names(
        names
            .into_iter()
            .filter(|n| known(n))
            .map(str::to_owned)
            .collect(),
    );
    rule.set_action(LinuxSeccompAction::ScmpActAllow);
    rule
}

fn allow_if(name: &str, arg: LinuxSeccompArg) -> LinuxSyscall {
    let mut rule = allow([name]);
    rule.set_args(Some(vec![arg]));
    rule
}

fn arg(
    index: usize,
    op: LinuxSeccompOperator,
    value: u64,
    value_two: Option<u64>,
) -> LinuxSeccompArg {
    let mut b = LinuxSeccompArgBuilder::default()
        .index(index)
        .op(op)
        .value(value);
    if let Some(v) = value_two {
        b = b.value_two(v);
    }
    // Every field has a value, so the builder cannot fail; fall back to the default anyway
    // rather than panic.
    b.build().unwrap_or_default()
}

/// The default profile for a container holding `caps` (names like `CAP_SYS_ADMIN`).
pub fn default_profile(caps: &BTreeSet<String>) -> LinuxSeccomp {
    let has = |cap: &str| caps.contains(cap);
    let mut rules = vec![allow(ALWAYS.iter().chain(ARCH_ALWAYS).copied())];

    rules.push(allow_if(
        "socket",
        arg(
            0,
            LinuxSeccompOperator::ScmpCmpNe,
            libc::AF_VSOCK as u64,
            None,
        ),
    ));
    for &p in PERSONALITIES {
        rules.push(allow_if(
            "personality",
            arg(0, LinuxSeccompOperator::ScmpCmpEq, p, None),
        ));
    }

    let mut gated = BTreeSet::new();
    for (cap, names) in BY_CAPABILITY {
        if has(cap) {
            gated.extend(names.iter().copied());
        }
    }
    if !gated.is_empty() {
        rules.push(allow(gated));
    }

    if !has("CAP_SYS_ADMIN") {
        // clone(flags, ...): allowed when (flags & CLONE_NAMESPACE_FLAGS) == 0 (mask in
        // `value`, datum in `valueTwo`: see the module docs).
        rules.push(allow_if(
            "clone",
            arg(
                0,
                LinuxSeccompOperator::ScmpCmpMaskedEq,
                CLONE_NAMESPACE_FLAGS,
                Some(0),
            ),
        ));
        let mut clone3 = LinuxSyscall::default();
        clone3.set_names(vec!["clone3".into()]);
        clone3.set_action(LinuxSeccompAction::ScmpActErrno);
        clone3.set_errno_ret(Some(libc::ENOSYS as u32));
        rules.push(clone3);
    }

    let mut profile = LinuxSeccomp::default();
    profile.set_default_action(LinuxSeccompAction::ScmpActErrno);
    profile.set_default_errno_ret(Some(libc::EPERM as u32));
    profile.set_architectures(Some(architectures()));
    profile.set_syscalls(Some(rules));
    profile
}

fn architectures() -> Vec<Arch> {
    if cfg!(target_arch = "x86_64") {
        vec![Arch::ScmpArchX86_64, Arch::ScmpArchX86, Arch::ScmpArchX32]
    } else if cfg!(target_arch = "aarch64") {
        vec![Arch::ScmpArchAarch64, Arch::ScmpArchArm]
    } else {
        Vec::new()
    }
}

/// The BPF program `profile` compiles to (libseccomp's, as `seccomp_export_bpf(3)` writes
/// it), for [`load`]. Only what [`default_profile`] writes is accepted (allow and errno
/// actions, argument comparisons, no filter flags); anything else is an error naming it.
pub fn compile(profile: &LinuxSeccomp) -> Result<Vec<u8>> {
    use libseccomp::{ScmpArgCompare, ScmpCompareOp, ScmpFilterContext, ScmpSyscall};
    if profile.flags().as_ref().is_some_and(|f| !f.is_empty()) {
        bail!("seccomp flags {:?} are not supported", profile.flags());
    }
    let action = |a: LinuxSeccompAction, errno: Option<u32>| -> Result<ScmpAction> {
        Ok(match a {
            LinuxSeccompAction::ScmpActAllow => ScmpAction::Allow,
            LinuxSeccompAction::ScmpActErrno => {
                ScmpAction::Errno(errno.map_or(libc::EPERM, |e| e as i32))
            }
            other => bail!("seccomp action {other:?} is not supported"),
        })
    };
    let default = action(profile.default_action(), profile.default_errno_ret())?;
    let mut ctx = ScmpFilterContext::new(default).context("seccomp_init")?;
    // The container's no_new_privs is the spec's to set (libcontainer does, before this
    // filter is loaded); the program itself carries no such request.
    ctx.set_ctl_nnp(false).context("SCMP_FLTATR_CTL_NNP")?;
    for &arch in profile.architectures().iter().flatten() {
        let a = match arch {
            Arch::ScmpArchX86_64 => ScmpArch::X8664,
            Arch::ScmpArchX86 => ScmpArch::X86,
            Arch::ScmpArchX32 => ScmpArch::X32,
            Arch::ScmpArchAarch64 => ScmpArch::Aarch64,
            Arch::ScmpArchArm => ScmpArch::Arm,
            other => bail!("seccomp architecture {other:?} is not supported"),
        };
        ctx.add_arch(a)
            .with_context(|| format!("seccomp architecture {arch:?}"))?;
    }
    for rule in profile.syscalls().iter().flatten() {
        let act = action(rule.action(), rule.errno_ret())?;
        if act == default {
            continue;
        }
        let mut cmps = Vec::new();
        for a in rule.args().iter().flatten() {
            let op = match a.op() {
                LinuxSeccompOperator::ScmpCmpNe => ScmpCompareOp::NotEqual,
                LinuxSeccompOperator::ScmpCmpLt => ScmpCompareOp::Less,
                LinuxSeccompOperator::ScmpCmpLe => ScmpCompareOp::LessOrEqual,
                LinuxSeccompOperator::ScmpCmpEq => ScmpCompareOp::Equal,
                LinuxSeccompOperator::ScmpCmpGe => ScmpCompareOp::GreaterEqual,
                LinuxSeccompOperator::ScmpCmpGt => ScmpCompareOp::Greater,
                LinuxSeccompOperator::ScmpCmpMaskedEq => ScmpCompareOp::MaskedEqual(a.value()),
            };
            let datum = match a.op() {
                LinuxSeccompOperator::ScmpCmpMaskedEq => a.value_two().unwrap_or(0),
                _ => a.value(),
            };
            cmps.push(ScmpArgCompare::new(a.index() as u32, op, datum));
        }
        for name in rule.names() {
            let sc = ScmpSyscall::from_name(name)
                .with_context(|| format!("seccomp: unknown system call {name:?}"))?;
            ctx.add_rule_conditional(act, sc, &cmps)
                .with_context(|| format!("seccomp rule for {name}"))?;
        }
    }
    // SAFETY: memfd_create with a valid C string; the result is checked and owned below.
    let fd = unsafe { libc::memfd_create(c"seccomp-bpf".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("memfd for the seccomp program");
    }
    // SAFETY: a fresh descriptor that nothing else owns.
    let mut out = std::fs::File::from(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) });
    ctx.export_bpf(&out).context("seccomp_export_bpf")?;
    out.rewind()?;
    let mut bpf = Vec::new();
    out.read_to_end(&mut bpf)
        .context("reading the seccomp program back")?;
    decode(&bpf)?;
    Ok(bpf)
}

/// `bpf` (what [`compile`] returned) as the kernel's instructions, checked for shape.
pub fn decode(bpf: &[u8]) -> Result<Vec<libc::sock_filter>> {
    const INSN: usize = std::mem::size_of::<libc::sock_filter>();
    if bpf.is_empty() || bpf.len() % INSN != 0 || bpf.len() / INSN > usize::from(u16::MAX) {
        bail!(
            "a seccomp program of {} bytes is not a whole number of 1..=65535 {INSN}-byte instructions",
            bpf.len()
        );
    }
    Ok(bpf
        .chunks_exact(INSN)
        .map(|i| libc::sock_filter {
            code: u16::from_ne_bytes([i[0], i[1]]),
            jt: i[2],
            jf: i[3],
            k: u32::from_ne_bytes([i[4], i[5], i[6], i[7]]),
        })
        .collect())
}

/// Loads `program` as this thread's seccomp filter (`SECCOMP_SET_MODE_FILTER`). Needs
/// no_new_privs or CAP_SYS_ADMIN, as seccomp(2) says; inherited by everything it executes.
pub fn load(program: &[libc::sock_filter]) -> std::io::Result<()> {
    let prog = libc::sock_fprog {
        len: program.len() as u16,
        filter: program.as_ptr().cast_mut(),
    };
    // SAFETY: `prog` points at `program`, which outlives the call; the kernel copies it.
    let r = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER,
            0,
            &prog as *const libc::sock_fprog,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allowed(profile: &LinuxSeccomp, name: &str) -> bool {
        profile.syscalls().iter().flatten().any(|r| {
            r.action() == LinuxSeccompAction::ScmpActAllow
                && r.args().is_none()
                && r.names().iter().any(|n| n == name)
        })
    }

    fn caps(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn default_action_is_eperm() {
        let p = default_profile(&caps(&[]));
        assert_eq!(p.default_action(), LinuxSeccompAction::ScmpActErrno);
        assert_eq!(p.default_errno_ret(), Some(libc::EPERM as u32));
        assert!(allowed(&p, "read") && allowed(&p, "execve") && allowed(&p, "arch_prctl"));
    }

    #[test]
    fn sys_admin_opens_mount_and_unrestricted_clone() {
        let plain = default_profile(&caps(&["CAP_CHOWN"]));
        assert!(!allowed(&plain, "mount"));
        assert!(!allowed(&plain, "unshare"));
        assert!(!allowed(&plain, "clone"));
        let clone = plain
            .syscalls()
            .iter()
            .flatten()
            .find(|r| r.names() == &["clone".to_string()])
            .expect("conditional clone rule");
        let a = clone.args().as_ref().expect("args")[0];
        assert_eq!((a.value(), a.value_two()), (CLONE_NAMESPACE_FLAGS, Some(0)));
        assert!(plain
            .syscalls()
            .iter()
            .flatten()
            .any(|r| r.names() == &["clone3".to_string()]
                && r.errno_ret() == Some(libc::ENOSYS as u32)));

        let admin = default_profile(&caps(&["CAP_SYS_ADMIN"]));
        assert!(allowed(&admin, "mount") && allowed(&admin, "clone") && allowed(&admin, "clone3"));
        assert!(!admin
            .syscalls()
            .iter()
            .flatten()
            .any(|r| r.errno_ret().is_some()));
    }

    #[test]
    fn capability_gates() {
        let p = default_profile(&caps(&["CAP_SYS_PTRACE", "CAP_SYS_TIME"]));
        assert!(allowed(&p, "kcmp") && allowed(&p, "clock_settime"));
        assert!(!allowed(&p, "reboot") && !allowed(&p, "init_module"));
    }

    #[test]
    fn default_profiles_compile_to_checked_programs() {
        for held in [&[][..], &["CAP_SYS_ADMIN", "CAP_NET_ADMIN"][..]] {
            let bpf = compile(&default_profile(&caps(held))).unwrap();
            let program = decode(&bpf).unwrap();
            // Architecture checks, one compare per allowed name, the default return.
            assert!(
                program.len() > 300,
                "{held:?}: {} instructions",
                program.len()
            );
            assert_eq!(
                compile(&default_profile(&caps(held))).unwrap(),
                bpf,
                "deterministic"
            );
        }
    }

    #[test]
    fn unsupported_profiles_and_programs_are_refused() {
        let mut p = default_profile(&caps(&[]));
        p.set_default_action(LinuxSeccompAction::ScmpActNotify);
        let e = compile(&p).unwrap_err().to_string();
        assert!(e.contains("ScmpActNotify"), "{e}");
        for bad in [&[][..], &[0u8; 12][..]] {
            let e = decode(bad).unwrap_err().to_string();
            assert!(e.contains("not a whole number"), "{e}");
        }
    }
}
