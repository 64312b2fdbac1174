//! `sysd init -- ARGV...`: a minimal init for a container's pid namespace, what Docker's
//! `--init` (tini) does. Without it a service's main process is pid 1 of its namespace, and
//! the kernel drops every signal pid 1 has no handler for: a program that never installed a
//! SIGTERM handler ignores `stop` until the SIGKILL of the stop timeout, and orphaned
//! grandchildren are never reaped. With `init = true` sysd bind-mounts its own static binary
//! into the container and runs this first: it forwards signals to the service's process,
//! reaps every zombie, and exits with the service's status (128 + N when signal N ended it).

use std::ffi::CString;
use std::process::ExitCode;

use nix::sys::signal::{kill, sigprocmask, SigSet, SigmaskHow, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{execvp, fork, ForkResult, Pid};

/// Signals that report a fault of this process itself: never blocked.
const SYNCHRONOUS: &[Signal] = &[
    Signal::SIGFPE,
    Signal::SIGILL,
    Signal::SIGSEGV,
    Signal::SIGBUS,
    Signal::SIGABRT,
    Signal::SIGTRAP,
    Signal::SIGSYS,
];

pub fn init_main(args: &[String]) -> ExitCode {
    let argv = match args.first().map(String::as_str) {
        Some("--") => &args[1..],
        _ => args,
    };
    if argv.is_empty() {
        eprintln!("usage: sysd init -- PROGRAM [ARG...]");
        return ExitCode::from(2);
    }
    let argv: Vec<CString> = match argv.iter().map(|a| CString::new(a.as_bytes())).collect() {
        Ok(v) => v,
        Err(_) => {
            eprintln!("sysd init: an argument contains NUL");
            return ExitCode::from(2);
        }
    };
    let mut forwarded = SigSet::all();
    for sig in SYNCHRONOUS {
        forwarded.remove(*sig);
    }
    let mut previous = SigSet::empty();
    if let Err(e) = sigprocmask(
        SigmaskHow::SIG_SETMASK,
        Some(&forwarded),
        Some(&mut previous),
    ) {
        eprintln!("sysd init: blocking signals: {e}");
        return ExitCode::from(1);
    }
    // SAFETY: this process is single-threaded (a fresh exec of sysd in `init` mode), so the
    // child may run any code after fork.
    match unsafe { fork() } {
        Err(e) => {
            eprintln!("sysd init: fork: {e}");
            ExitCode::from(1)
        }
        Ok(ForkResult::Child) => {
            let _ = sigprocmask(SigmaskHow::SIG_SETMASK, Some(&previous), None);
            let err = execvp(&argv[0], &argv).unwrap_err();
            eprintln!("sysd init: cannot run {}: {err}", argv[0].to_string_lossy());
            // 127: not found, 126: found but not runnable (the shell's convention).
            let code = if err == nix::errno::Errno::ENOENT {
                127
            } else {
                126
            };
            std::process::exit(code)
        }
        Ok(ForkResult::Parent { child }) => supervise(child, &forwarded),
    }
}

/// Forwards signals to `child` and reaps everything until `child` ends.
fn supervise(child: Pid, signals: &SigSet) -> ExitCode {
    loop {
        let sig = match signals.wait() {
            Ok(s) => s,
            Err(_) => continue,
        };
        if sig != Signal::SIGCHLD {
            let _ = kill(child, sig);
            continue;
        }
        loop {
            match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) if pid == child => {
                    return ExitCode::from(code as u8);
                }
                Ok(WaitStatus::Signaled(pid, sig, _)) if pid == child => {
                    return ExitCode::from(128u8.wrapping_add(sig as u8));
                }
                Ok(WaitStatus::StillAlive) | Err(_) => break,
                Ok(_) => {}
            }
        }
    }
}
