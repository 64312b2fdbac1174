//! The notify channel between init (PID 1) and sysd: a `SOCK_SEQPACKET` socketpair whose sysd
//! end is fd 3 (`KEELSON_NOTIFY_FD`). One datagram is one message of `KEY=VALUE` lines in
//! sd_notify's vocabulary; a stored descriptor travels beside its message as `SCM_RIGHTS`.
//!
//! sysd → init: `READY=1`, `WATCHDOG=1`, `FDSTORE=1` + `FDNAME=<service>/<stream>` (one fd: init
//! keeps it, replacing one of the same name), `FDSTOREREMOVE=1` + `FDNAME=…`.
//! init → sysd, after each start of sysd: every stored fd (`FDSTORE=1`, as sysd sent it), the
//! exits of orphans init reaped (`EXIT=<pid>` + `STATUS=exited:N|signal:N` + `AT=<µs of
//! CLOCK_BOOTTIME>`), then `FDSTORE-END=1`; later exits follow as they happen.
//!
//! Both ends share this module so the words, their parsing and the bounds agree; the
//! bookkeeping init does with them ([`FdStore`], [`ExitLog`]) is here too, unit-tested without
//! a PID 1.

use std::collections::{BTreeMap, VecDeque};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

/// The fd sysd finds its end of the channel at.
pub const FD: RawFd = 3;
/// Environment variable carrying [`FD`].
pub const FD_ENV: &str = "KEELSON_NOTIFY_FD";
/// The most descriptors init stores (a hard cap: PID 1's fd table stays bounded).
pub const MAX_STORED: usize = 1024;
/// The most orphan exits init remembers for the next sysd (the oldest are dropped).
pub const MAX_EXITS: usize = 1024;
/// In the run directory (`/run/keelson`): init loads the root's modules beside sysd's start
/// and writes the loader's pid here; sysd starts nothing that may need a module (overlay
/// mounts, bridges, extensions, VLANs) before [`ROOT_MODULES_LOADED`] is there or that
/// process is gone. Neither file (an older init, a sysd run outside init): nothing to wait for.
pub const ROOT_MODULES_LOADING: &str = "root-modules.loading";
/// In the run directory: the loader's summary line, written once the list is through.
pub const ROOT_MODULES_LOADED: &str = "root-modules.loaded";
/// The largest message either end sends or accepts.
pub const MAX_MESSAGE: usize = 512;
/// The longest descriptor name.
pub const MAX_NAME: usize = 200;

/// How a reaped process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Exited(i32),
    Signaled(i32),
}

/// An orphan init reaped while (or after) sysd was gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit {
    pub pid: i32,
    pub status: Status,
    /// When it was reaped, in µs of CLOCK_BOOTTIME (comparable with a process's start time).
    pub at_us: u64,
}

/// One message on the channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Ready,
    Watchdog,
    /// Keep (or hand back) the descriptor sent with this message.
    FdStore {
        name: String,
    },
    /// Close the stored descriptor of that name.
    FdStoreRemove {
        name: String,
    },
    /// Everything stored (and every remembered exit) has been handed to this sysd.
    FdStoreEnd,
    Exit(Exit),
}

/// A message that cannot be parsed, with what was wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("notify message {text:?}: {why}")]
pub struct BadMessage {
    pub text: String,
    pub why: String,
}

impl Message {
    /// The message's bytes on the wire.
    pub fn encode(&self) -> String {
        match self {
            Message::Ready => "READY=1\n".into(),
            Message::Watchdog => "WATCHDOG=1\n".into(),
            Message::FdStore { name } => format!("FDSTORE=1\nFDNAME={name}\n"),
            Message::FdStoreRemove { name } => format!("FDSTOREREMOVE=1\nFDNAME={name}\n"),
            Message::FdStoreEnd => "FDSTORE-END=1\n".into(),
            Message::Exit(e) => {
                let status = match e.status {
                    Status::Exited(c) => format!("exited:{c}"),
                    Status::Signaled(s) => format!("signal:{s}"),
                };
                format!("EXIT={}\nSTATUS={status}\nAT={}\n", e.pid, e.at_us)
            }
        }
    }

    /// Parses one datagram.
    pub fn parse(bytes: &[u8]) -> Result<Message, BadMessage> {
        let text = String::from_utf8_lossy(bytes);
        let bad = |why: &str| BadMessage {
            text: text.chars().take(80).collect(),
            why: why.into(),
        };
        let mut fields: BTreeMap<&str, &str> = BTreeMap::new();
        for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
            let (k, v) = line
                .split_once('=')
                .ok_or_else(|| bad("a line without '='"))?;
            if fields.insert(k, v).is_some() {
                return Err(bad(&format!("{k} given twice")));
            }
        }
        let name = |fields: &BTreeMap<&str, &str>| -> Result<String, BadMessage> {
            let n = fields.get("FDNAME").ok_or_else(|| bad("FDNAME missing"))?;
            check_name(n).map_err(|why| bad(&why))?;
            Ok((*n).to_owned())
        };
        let only = |keys: &[&str]| fields.keys().all(|k| keys.contains(k));
        if fields.get("READY") == Some(&"1") && only(&["READY"]) {
            return Ok(Message::Ready);
        }
        if fields.get("WATCHDOG") == Some(&"1") && only(&["WATCHDOG"]) {
            return Ok(Message::Watchdog);
        }
        if fields.get("FDSTORE") == Some(&"1") && only(&["FDSTORE", "FDNAME"]) {
            return Ok(Message::FdStore {
                name: name(&fields)?,
            });
        }
        if fields.get("FDSTOREREMOVE") == Some(&"1") && only(&["FDSTOREREMOVE", "FDNAME"]) {
            return Ok(Message::FdStoreRemove {
                name: name(&fields)?,
            });
        }
        if fields.get("FDSTORE-END") == Some(&"1") && only(&["FDSTORE-END"]) {
            return Ok(Message::FdStoreEnd);
        }
        if let Some(pid) = fields.get("EXIT") {
            if !only(&["EXIT", "STATUS", "AT"]) {
                return Err(bad("EXIT with other fields than STATUS and AT"));
            }
            let pid: i32 = pid
                .parse()
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(|| bad("EXIT is not a pid"))?;
            let status = fields.get("STATUS").ok_or_else(|| bad("STATUS missing"))?;
            let status = match status.split_once(':') {
                Some(("exited", c)) => c.parse().ok().map(Status::Exited),
                Some(("signal", s)) => s.parse().ok().map(Status::Signaled),
                _ => None,
            }
            .ok_or_else(|| bad("STATUS is not exited:N or signal:N"))?;
            let at_us = fields
                .get("AT")
                .and_then(|a| a.parse().ok())
                .ok_or_else(|| bad("AT is not a number of µs"))?;
            return Ok(Message::Exit(Exit { pid, status, at_us }));
        }
        Err(bad("not a message of the notify channel"))
    }
}

/// A stored descriptor's name: `<service>/<stream>`-like, printable, without `=` or spaces.
pub fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_NAME {
        return Err(format!("FDNAME must be 1 to {MAX_NAME} bytes"));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"/_.-".contains(&b))
    {
        return Err("FDNAME may hold only letters, digits and / _ . -".into());
    }
    Ok(())
}

/// The descriptors init keeps for sysd, by name.
#[derive(Debug)]
pub struct FdStore {
    fds: BTreeMap<String, OwnedFd>,
    cap: usize,
}

/// Why a descriptor was not stored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    #[error("FDSTORE {name}: no descriptor came with it")]
    NoFd { name: String },
    #[error("FDSTORE {name}: the store is full ({cap} descriptors)")]
    Full { name: String, cap: usize },
}

impl FdStore {
    pub fn new(cap: usize) -> FdStore {
        FdStore {
            fds: BTreeMap::new(),
            cap,
        }
    }

    /// Keeps `fds` (exactly one is expected) under `name`, closing one it replaces. Extra
    /// descriptors are closed; a store at its cap refuses new names (a replacement still works).
    pub fn store(&mut self, name: &str, fds: Vec<OwnedFd>) -> Result<(), StoreError> {
        let Some(fd) = fds.into_iter().next() else {
            return Err(StoreError::NoFd { name: name.into() });
        };
        if !self.fds.contains_key(name) && self.fds.len() >= self.cap {
            return Err(StoreError::Full {
                name: name.into(),
                cap: self.cap,
            });
        }
        self.fds.insert(name.to_owned(), fd);
        Ok(())
    }

    /// Closes the descriptor stored as `name`; says whether there was one.
    pub fn remove(&mut self, name: &str) -> bool {
        self.fds.remove(name).is_some()
    }

    pub fn len(&self) -> usize {
        self.fds.len()
    }

    pub fn is_empty(&self) -> bool {
        self.fds.is_empty()
    }

    /// Every stored descriptor, by name.
    pub fn iter(&self) -> impl Iterator<Item = (&str, BorrowedFd<'_>)> {
        use std::os::fd::AsFd;
        self.fds.iter().map(|(n, f)| (n.as_str(), f.as_fd()))
    }
}

/// The last [`MAX_EXITS`] orphan exits.
#[derive(Debug, Default)]
pub struct ExitLog {
    exits: VecDeque<Exit>,
}

impl ExitLog {
    pub fn push(&mut self, exit: Exit) {
        if self.exits.len() == MAX_EXITS {
            self.exits.pop_front();
        }
        self.exits.push_back(exit);
    }

    pub fn iter(&self) -> impl Iterator<Item = &Exit> {
        self.exits.iter()
    }

    pub fn len(&self) -> usize {
        self.exits.len()
    }

    pub fn is_empty(&self) -> bool {
        self.exits.is_empty()
    }
}

/// A `SOCK_SEQPACKET` socketpair, both ends close-on-exec and non-blocking.
pub fn socketpair() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: socketpair writes two descriptors into the array, which outlives the call.
    let r = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            0,
            fds.as_mut_ptr(),
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both are fresh descriptors owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Whether `fd` is a `SOCK_SEQPACKET` socket (the channel), rather than the pipe of an older
/// init or something else.
pub fn is_seqpacket(fd: BorrowedFd<'_>) -> bool {
    let mut ty: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `ty`, which outlives the call.
    let r = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_TYPE,
            (&mut ty as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    r == 0 && ty == libc::SOCK_SEQPACKET
}

/// Sends `msg` (with `fd` as `SCM_RIGHTS`) without blocking; `WouldBlock` when the peer's
/// queue is full.
pub fn send(sock: BorrowedFd<'_>, msg: &Message, fd: Option<BorrowedFd<'_>>) -> io::Result<()> {
    let bytes = msg.encode();
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr() as *mut libc::c_void,
        iov_len: bytes.len(),
    };
    // Room for one descriptor, aligned as a cmsghdr must be.
    let mut control = [0u64; 4];
    // SAFETY: msghdr is plain data; all-zero is a valid empty header.
    let mut hdr: libc::msghdr = unsafe { std::mem::zeroed() };
    hdr.msg_iov = &mut iov;
    hdr.msg_iovlen = 1;
    if let Some(fd) = fd {
        // SAFETY: CMSG_SPACE is a pure size computation.
        let space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<RawFd>() as u32) } as usize;
        hdr.msg_control = control.as_mut_ptr().cast();
        hdr.msg_controllen = space;
        // SAFETY: the control buffer (32 bytes) holds CMSG_SPACE(4) = 24 bytes; CMSG_FIRSTHDR
        // points into it and CMSG_DATA at its payload, inside the same buffer.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&hdr);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<RawFd>() as u32) as usize;
            std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<RawFd>(), fd.as_raw_fd());
        }
    }
    loop {
        // SAFETY: hdr points at iov, bytes and control, all alive for the call.
        let n = unsafe {
            libc::sendmsg(
                sock.as_raw_fd(),
                &hdr,
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
        if n >= 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// One received datagram and the descriptors that came with it.
#[derive(Debug)]
pub struct Received {
    pub bytes: Vec<u8>,
    pub fds: Vec<OwnedFd>,
}

/// Receives one datagram without blocking: `Ok(None)` when the peer closed its end,
/// `WouldBlock` when nothing is queued. Descriptors arrive close-on-exec.
pub fn recv(sock: BorrowedFd<'_>) -> io::Result<Option<Received>> {
    let mut buf = vec![0u8; MAX_MESSAGE];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // Room for a few descriptors (only one is expected; extras are received, then closed).
    let mut control = [0u64; 16];
    // SAFETY: msghdr is plain data; all-zero is a valid empty header.
    let mut hdr: libc::msghdr = unsafe { std::mem::zeroed() };
    hdr.msg_iov = &mut iov;
    hdr.msg_iovlen = 1;
    hdr.msg_control = control.as_mut_ptr().cast();
    hdr.msg_controllen = std::mem::size_of_val(&control);
    let n = loop {
        // SAFETY: hdr points at buf and control, both alive and writable for the call.
        let n = unsafe {
            libc::recvmsg(
                sock.as_raw_fd(),
                &mut hdr,
                libc::MSG_DONTWAIT | libc::MSG_CMSG_CLOEXEC,
            )
        };
        if n >= 0 {
            break n as usize;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    };
    let mut fds = Vec::new();
    // SAFETY: after recvmsg the control buffer holds msg_controllen bytes of cmsghdrs, which
    // the CMSG_* macros walk without leaving it; each SCM_RIGHTS payload is an array of fds
    // now owned by this process.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&hdr);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg);
                let payload = (*cmsg).cmsg_len as usize - (data as usize - cmsg as usize);
                for i in 0..payload / std::mem::size_of::<RawFd>() {
                    let fd = std::ptr::read_unaligned(data.cast::<RawFd>().add(i));
                    fds.push(OwnedFd::from_raw_fd(fd));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&hdr, cmsg);
        }
    }
    if n == 0 && fds.is_empty() {
        return Ok(None);
    }
    buf.truncate(n);
    Ok(Some(Received { bytes: buf, fds }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::fd::AsFd;

    fn exit(pid: i32) -> Exit {
        Exit {
            pid,
            status: Status::Exited(3),
            at_us: 7,
        }
    }

    #[test]
    fn every_message_round_trips() {
        for m in [
            Message::Ready,
            Message::Watchdog,
            Message::FdStore {
                name: "web/stdout".into(),
            },
            Message::FdStoreRemove {
                name: "web/stderr".into(),
            },
            Message::FdStoreEnd,
            Message::Exit(exit(42)),
            Message::Exit(Exit {
                pid: 9,
                status: Status::Signaled(9),
                at_us: 123_456_789,
            }),
        ] {
            assert_eq!(
                Message::parse(m.encode().as_bytes()),
                Ok(m.clone()),
                "{m:?}"
            );
        }
    }

    #[test]
    fn bad_messages_say_what_is_wrong() {
        let why = |s: &str| Message::parse(s.as_bytes()).unwrap_err().why;
        assert_eq!(why("FDSTORE=1\n"), "FDNAME missing");
        assert!(why("FDSTORE=1\nFDNAME=a b\n").contains("only letters"));
        assert!(why(&format!("FDSTORE=1\nFDNAME={}\n", "a".repeat(201))).contains("1 to 200"));
        assert_eq!(why("EXIT=x\nSTATUS=exited:1\nAT=1\n"), "EXIT is not a pid");
        assert_eq!(
            why("EXIT=5\nSTATUS=died\nAT=1\n"),
            "STATUS is not exited:N or signal:N"
        );
        assert_eq!(why("READY=1\nREADY=1\n"), "READY given twice");
        assert_eq!(why("READY\n"), "a line without '='");
        assert_eq!(why("HELLO=1\n"), "not a message of the notify channel");
        // Extra keys are not silently accepted.
        assert_eq!(
            why("READY=1\nFDNAME=x\n"),
            "not a message of the notify channel"
        );
    }

    #[test]
    fn the_store_replaces_by_name_removes_and_keeps_its_cap() {
        let mut store = FdStore::new(2);
        let pipe = || {
            let (r, w) = std::io::pipe().unwrap();
            (OwnedFd::from(r), w)
        };
        let (a, _wa) = pipe();
        let (b, _wb) = pipe();
        let (c, _wc) = pipe();
        let (a2, mut wa2) = pipe();
        assert_eq!(
            store.store("x/stdout", vec![]),
            Err(StoreError::NoFd {
                name: "x/stdout".into()
            })
        );
        store.store("a/stdout", vec![a]).unwrap();
        store.store("b/stdout", vec![b]).unwrap();
        assert_eq!(
            store.store("c/stdout", vec![c]),
            Err(StoreError::Full {
                name: "c/stdout".into(),
                cap: 2
            })
        );
        // A replacement is not a new name: allowed at the cap, and the stored fd is the new one.
        store.store("a/stdout", vec![a2]).unwrap();
        assert_eq!(store.len(), 2);
        wa2.write_all(b"hi").unwrap();
        let stored = store.iter().find(|(n, _)| *n == "a/stdout").unwrap().1;
        let mut f = std::fs::File::from(stored.try_clone_to_owned().unwrap());
        let mut got = [0u8; 2];
        f.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"hi");
        assert!(store.remove("a/stdout"));
        assert!(!store.remove("a/stdout"));
        assert_eq!(store.len(), 1);
    }

    #[test]
    fn the_exit_log_keeps_the_newest() {
        let mut log = ExitLog::default();
        for pid in 1..=(MAX_EXITS as i32 + 5) {
            log.push(exit(pid));
        }
        assert_eq!(log.len(), MAX_EXITS);
        assert_eq!(log.iter().next().unwrap().pid, 6);
    }

    #[test]
    fn descriptors_travel_with_their_message() {
        let (a, b) = socketpair().unwrap();
        assert!(is_seqpacket(a.as_fd()));
        let (r, mut w) = std::io::pipe().unwrap();
        assert!(!is_seqpacket(r.as_fd()));
        let msg = Message::FdStore {
            name: "web/stdout".into(),
        };
        send(a.as_fd(), &msg, Some(r.as_fd())).unwrap();
        drop(r);
        send(a.as_fd(), &Message::Ready, None).unwrap();
        let got = recv(b.as_fd()).unwrap().unwrap();
        assert_eq!(Message::parse(&got.bytes), Ok(msg));
        assert_eq!(got.fds.len(), 1);
        w.write_all(b"line\n").unwrap();
        let mut f = std::fs::File::from(got.fds.into_iter().next().unwrap());
        let mut line = [0u8; 5];
        f.read_exact(&mut line).unwrap();
        assert_eq!(&line, b"line\n");
        let got = recv(b.as_fd()).unwrap().unwrap();
        assert_eq!(Message::parse(&got.bytes), Ok(Message::Ready));
        assert!(got.fds.is_empty());
        assert_eq!(
            recv(b.as_fd()).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
        drop(a);
        assert!(recv(b.as_fd()).unwrap().is_none());
    }
}
