//! The forwarder against a receiver in this process: order, a receiver that goes away and
//! comes back, and one that accepts and never reads.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use keelson_common::api::{LogLine, Stream};
use keelson_forward::{syslog::frame_len, Forwarder};
use keelson_spec::observe::{ForwardSpec, Transport};
use keelson_spec::Size;
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};

fn spec(port: u16, buffer: u64) -> ForwardSpec {
    ForwardSpec {
        target: format!("127.0.0.1:{port}"),
        transport: Transport::Tcp,
        ca_file: None,
        server_name: None,
        buffer_size: Size(buffer),
        events: true,
        exclude: vec!["quiet".into()],
    }
}

fn line(text: String) -> LogLine {
    LogLine {
        time_ms: 1_795_306_361_123,
        stream: Stream::Stdout,
        line: text,
    }
}

/// Reads frames until `want` messages arrived; returns their MSG parts.
async fn receive(stream: &mut TcpStream, buf: &mut Vec<u8>, want: usize) -> Vec<String> {
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while out.len() < want {
        while let Ok(Some(n)) = frame_len(buf) {
            let f: Vec<u8> = buf.drain(..n).collect();
            let text = String::from_utf8(f).unwrap();
            out.push(text.rsplit("] ").next().unwrap().to_string());
        }
        if out.len() >= want {
            break;
        }
        let mut chunk = [0u8; 65536];
        let n = tokio::time::timeout_at(deadline.into(), stream.read(&mut chunk))
            .await
            .unwrap_or_else(|_| panic!("only {} of {want} messages arrived", out.len()))
            .unwrap();
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    out
}

#[tokio::test]
async fn every_line_arrives_in_order_across_a_receiver_restart() {
    let dir = tempfile::tempdir().unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let fwd = Forwarder::start(&spec(port, 4 << 20), dir.path()).unwrap();
    let intake = fwd.intake();
    let (mut s, _) = listener.accept().await.unwrap();
    let mut buf = Vec::new();
    for i in 0..100 {
        intake.line("web", &line(format!("first {i}")));
        intake.line("quiet", &line(format!("never {i}")));
    }
    let got = receive(&mut s, &mut buf, 100).await;
    assert_eq!(
        got,
        (0..100).map(|i| format!("first {i}")).collect::<Vec<_>>()
    );
    // The receiver goes away; lines keep coming.
    drop(s);
    drop(listener);
    tokio::time::sleep(Duration::from_millis(300)).await;
    for i in 0..500 {
        intake.line("web", &line(format!("while away {i}")));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!fwd.counters().connected.load(Ordering::Relaxed));
    assert!(fwd.counters().buffer_bytes.load(Ordering::Relaxed) > 0);
    let listener = TcpListener::bind(("127.0.0.1", port)).await.unwrap();
    let (mut s, _) = listener.accept().await.unwrap();
    let mut buf = Vec::new();
    let got = receive(&mut s, &mut buf, 500).await;
    assert_eq!(
        got,
        (0..500)
            .map(|i| format!("while away {i}"))
            .collect::<Vec<_>>(),
        "every line, in order, none twice"
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while fwd.counters().forwarded.load(Ordering::Relaxed) < 600 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(fwd.counters().forwarded.load(Ordering::Relaxed), 600);
    assert_eq!(
        fwd.counters().dropped_buffer_full.load(Ordering::Relaxed),
        0
    );
}

#[tokio::test]
async fn a_burst_is_kept_whole_while_the_buffer_has_room() {
    let dir = tempfile::tempdir().unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let fwd = Forwarder::start(&spec(port, 16 << 20), dir.path()).unwrap();
    let intake = fwd.intake();
    // 20000 lines without yielding once, as a service's pipe drained in one go would give.
    for i in 0..20_000 {
        intake.line("web", &line(format!("burst {i}")));
    }
    let (mut s, _) = listener.accept().await.unwrap();
    let mut buf = Vec::new();
    let got = receive(&mut s, &mut buf, 20_000).await;
    assert_eq!(
        got,
        (0..20_000)
            .map(|i| format!("burst {i}"))
            .collect::<Vec<_>>()
    );
    assert_eq!(
        fwd.counters().dropped_buffer_full.load(Ordering::Relaxed),
        0
    );
}

#[tokio::test]
async fn a_receiver_that_never_reads_blocks_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let fwd = Forwarder::start(&spec(port, 1 << 20), dir.path()).unwrap();
    let intake = fwd.intake();
    let (_never_read, _) = listener.accept().await.unwrap();
    let text = "y".repeat(1000);
    let started = Instant::now();
    for i in 0..5000 {
        intake.line("web", &line(format!("{i} {text}")));
        if i % 500 == 0 {
            tokio::task::yield_now().await;
        }
    }
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "offering lines never waits for the receiver ({:?})",
        started.elapsed()
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let c = fwd.counters();
    let used = c.buffer_bytes.load(Ordering::Relaxed);
    let dropped = c.dropped_buffer_full.load(Ordering::Relaxed);
    assert!(
        used <= 1 << 20,
        "the buffer stays within its bound ({used})"
    );
    assert!(
        dropped > 3000,
        "what does not fit is dropped and counted ({dropped})"
    );
    let on_disk: u64 = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum();
    assert!(on_disk <= (1 << 20) + 4096, "{on_disk} bytes on disk");
}
