//! Reachability checks for `apply`'s try mode: an ICMP echo to a gateway over a raw socket
//! (sysd runs as root).

use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

/// Whether `to` answers an ICMP echo within `timeout` (one request per second).
pub async fn ping(to: Ipv4Addr, timeout: Duration) -> bool {
    tokio::task::spawn_blocking(move || ping_blocking(to, timeout).unwrap_or(false))
        .await
        .unwrap_or(false)
}

fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for chunk in data.chunks(2) {
        let word = u16::from_be_bytes([chunk[0], *chunk.get(1).unwrap_or(&0)]);
        sum += u32::from(word);
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn ping_blocking(to: Ipv4Addr, timeout: Duration) -> std::io::Result<bool> {
    // SAFETY: plain socket(2); the fd is owned right away.
    let raw = unsafe {
        libc::socket(
            libc::AF_INET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::IPPROTO_ICMP,
        )
    };
    if raw < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `raw` is a fresh fd nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let sock = std::net::UdpSocket::from(fd);
    sock.set_read_timeout(Some(Duration::from_millis(1000)))?;
    let id = (std::process::id() & 0xffff) as u16;
    let deadline = Instant::now() + timeout;
    let mut seq: u16 = 0;
    while Instant::now() < deadline {
        seq = seq.wrapping_add(1);
        let mut pkt = vec![8u8, 0, 0, 0];
        pkt.extend_from_slice(&id.to_be_bytes());
        pkt.extend_from_slice(&seq.to_be_bytes());
        pkt.extend_from_slice(b"keelson-try");
        let c = checksum(&pkt);
        pkt[2..4].copy_from_slice(&c.to_be_bytes());
        sock.send_to(&pkt, (to, 0))?;
        let until = (Instant::now() + Duration::from_secs(1)).min(deadline);
        let mut buf = [0u8; 1500];
        while Instant::now() < until {
            let Ok((n, from)) = sock.recv_from(&mut buf) else {
                break;
            };
            // Raw IPv4 sockets deliver the IP header too.
            let ihl = usize::from(buf[0] & 0x0f) * 4;
            if n < ihl + 8 || from.ip() != to {
                continue;
            }
            let icmp = &buf[ihl..n];
            if icmp[0] == 0 && icmp[4..6] == id.to_be_bytes() {
                return Ok(true);
            }
        }
        let _ = sock.as_raw_fd();
    }
    Ok(false)
}
