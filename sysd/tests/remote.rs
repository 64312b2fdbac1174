//! Host integration tests of the remote API (`[api.remote]`, mutual TLS): a real sysd (the
//! built binary) in its own network namespace (`unshare -n`; sysd brings its loopback up)
//! listening on 127.0.0.1:50000 there, driven by the real keelctl (`nsenter --net`) with
//! certificates from `keelctl pki`, and by raw clients (rustls, plain TCP) on threads that
//! joined that namespace. Certificates keelctl's PKI would never make (expired, an unknown
//! role) are made with rcgen from the same CA.
//!
//! keelctl is the binary next to sysd in the target directory (`cargo test --workspace`, as
//! `./dev test` runs, builds both).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use keelson_testkit::busybox;
use keelson_testkit::daemon::Daemon;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

const SYSD: &str = env!("CARGO_BIN_EXE_sysd");
const ENDPOINT: &str = "127.0.0.1:50000";

fn keelctl_exe() -> PathBuf {
    let exe = Path::new(SYSD).with_file_name("keelctl");
    assert!(
        exe.exists(),
        "{} missing: build it first (cargo build -p keelctl; ./dev test builds the workspace)",
        exe.display()
    );
    exe
}

struct Node {
    daemon: Daemon,
    dir: tempfile::TempDir,
}

impl Node {
    /// A sysd with one system service (`web`) and `[api.remote]` on 127.0.0.1:50000 in its
    /// own network namespace, trusting the CA in `pki/` (made here).
    fn start() -> Node {
        // SAFETY: geteuid has no preconditions.
        assert_eq!(unsafe { libc::geteuid() }, 0, "these tests need root");
        assert!(
            Path::new("/bin/busybox").exists(),
            "/bin/busybox missing: apt-get install busybox-static (./dev deps)"
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let rootfs = dir.path().join("rootfs");
        busybox::rootfs(&rootfs).expect("busybox rootfs");
        let pki = dir.path().join("pki");
        let p = pki.display().to_string();
        for args in [
            vec!["pki", "init", "--dir", &p],
            vec![
                "pki", "issue", "--dir", &p, "--role", "admin", "--name", "adm",
            ],
            vec![
                "pki", "issue", "--dir", &p, "--role", "reader", "--name", "rd",
            ],
            vec![
                "pki",
                "issue",
                "--dir",
                &p,
                "--node",
                "node",
                "--ip",
                "127.0.0.1",
            ],
        ] {
            let out = Command::new(keelctl_exe())
                .args(&args)
                .output()
                .expect("keelctl");
            assert!(out.status.success(), "keelctl {args:?}: {}", text(&out));
        }
        std::fs::create_dir_all(dir.path().join("system")).expect("system dir");
        std::fs::write(
            dir.path().join("system/10-test.toml"),
            format!(
                "version = 1\n[services.web]\nimage = \"{}\"\ncommand = [\"sh\", \"-c\", \"echo web up; exec sleep 1000\"]\n",
                rootfs.display()
            ),
        )
        .expect("system config");
        std::fs::create_dir_all(dir.path().join("var")).expect("var");
        std::fs::write(
            dir.path().join("var/services.toml"),
            format!(
                "version = 1\n[api.remote]\nlisten = \"{ENDPOINT}\"\nca = \"{p}/ca.crt\"\ncert = \"{p}/nodes/node.crt\"\nkey = \"{p}/nodes/node.key\"\n"
            ),
        )
        .expect("user config");
        let d = dir.path().display().to_string();
        let mut daemon = Daemon::new(
            SYSD,
            dir.path(),
            Daemon::cgroup_parent_for("remote", dir.path()),
        )
        .unshare(["-n"])
        .args([
            "--userdata-config".to_string(),
            format!("{d}/var/user-data.toml"),
            "--no-firstboot".to_string(),
        ]);
        daemon.start(Duration::from_secs(60));
        let node = Node { daemon, dir };
        node.daemon
            .wait_until("the remote API", Duration::from_secs(30), |d| {
                d.events().iter().any(|e| {
                    e["kind"] == "api-remote"
                        && e["message"]
                            .as_str()
                            .is_some_and(|m| m.contains("remote API on"))
                })
            });
        node
    }

    fn pki(&self, rel: &str) -> String {
        self.dir.path().join("pki").join(rel).display().to_string()
    }

    fn netns(&self) -> String {
        format!("/proc/{}/ns/net", self.daemon.pid().expect("running"))
    }

    /// keelctl inside the node's network namespace with these arguments.
    fn keelctl(&self, args: &[&str]) -> Output {
        Command::new("nsenter")
            .arg(format!("--net={}", self.netns()))
            .arg(keelctl_exe())
            .args(args)
            .env_remove("KEELCONFIG")
            .env("HOME", self.dir.path())
            .stdin(Stdio::null())
            .output()
            .expect("nsenter keelctl")
    }

    /// keelctl --node 127.0.0.1 with the CA and the client `name` of `pki/`.
    fn as_client(&self, name: &str, args: &[&str]) -> Output {
        let (ca, crt, key) = (
            self.pki("ca.crt"),
            self.pki(&format!("clients/{name}.crt")),
            self.pki(&format!("clients/{name}.key")),
        );
        let mut all = vec![
            "--node",
            "127.0.0.1",
            "--ca",
            &ca,
            "--cert",
            &crt,
            "--key",
            &key,
        ];
        all.extend_from_slice(args);
        self.keelctl(&all)
    }

    /// Runs `f` on a thread inside the node's network namespace.
    fn inside<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let netns = self.netns();
        std::thread::scope(|scope| {
            scope
                .spawn(move || {
                    let ns = std::fs::File::open(&netns).expect("netns");
                    // SAFETY: setns(2) on a valid namespace fd; it changes only this thread.
                    let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
                    assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
                    f()
                })
                .join()
                .expect("thread")
        })
    }
}

fn text(out: &Output) -> String {
    format!(
        "exit {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).trim().to_string()
}

/// A client certificate signed by `pki/ca.*` with any subject and validity (rcgen).
fn client_cert(
    node: &Node,
    name: &str,
    organization: &str,
    not_after: time::OffsetDateTime,
) -> (String, String) {
    let ca_key =
        rcgen::KeyPair::from_pem(&std::fs::read_to_string(node.pki("ca.key")).unwrap()).unwrap();
    let ca = rcgen::Issuer::from_ca_cert_pem(
        &std::fs::read_to_string(node.pki("ca.crt")).unwrap(),
        ca_key,
    )
    .unwrap();
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    params
        .distinguished_name
        .push(rcgen::DnType::OrganizationName, organization);
    params.not_before = not_after - time::Duration::days(30);
    params.not_after = not_after;
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &ca).unwrap();
    let (crt_path, key_path) = (
        node.pki(&format!("clients/{name}.crt")),
        node.pki(&format!("clients/{name}.key")),
    );
    std::fs::write(&crt_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    (crt_path, key_path)
}

/// A rustls client config trusting `pki/ca.crt`, with the client `name`'s certificate or none.
fn tls_config(node: &Node, client: Option<&str>) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_file(node.pki("ca.crt")).unwrap())
        .unwrap();
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    Arc::new(match client {
        Some(name) => builder
            .with_client_auth_cert(
                vec![
                    CertificateDer::from_pem_file(node.pki(&format!("clients/{name}.crt")))
                        .unwrap(),
                ],
                PrivateKeyDer::from_pem_file(node.pki(&format!("clients/{name}.key"))).unwrap(),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    })
}

type Tls = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

fn tls_connect(config: Arc<rustls::ClientConfig>) -> Tls {
    let tcp = TcpStream::connect(ENDPOINT).expect("connect");
    tcp.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let conn =
        rustls::ClientConnection::new(config, ServerName::try_from("127.0.0.1").unwrap()).unwrap();
    rustls::StreamOwned::new(conn, tcp)
}

/// Everything the server sends until it closes (or an error ends the read).
fn read_all(stream: &mut impl Read) -> (String, Option<std::io::Error>) {
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return (String::from_utf8_lossy(&raw).into(), None),
            Ok(n) => raw.extend_from_slice(&buf[..n]),
            Err(e) => return (String::from_utf8_lossy(&raw).into(), Some(e)),
        }
    }
}

#[test]
fn a_reader_reads_and_only_an_admin_changes_things() {
    let node = Node::start();
    node.daemon
        .wait_until("web running", Duration::from_secs(30), |d| {
            d.request("GET", "/v1/services/web", "")
                .1
                .contains("\"running\"")
        });

    let ps = node.as_client("rd", &["ps"]);
    assert!(ps.status.success(), "{}", text(&ps));
    assert!(
        String::from_utf8_lossy(&ps.stdout).contains("web"),
        "{}",
        text(&ps)
    );
    for read in [
        &["stats"][..],
        &["status", "web"],
        &["logs", "web"],
        &["version"],
    ] {
        let out = node.as_client("rd", read);
        assert!(out.status.success(), "reader {read:?}: {}", text(&out));
    }

    let stop = node.as_client("rd", &["stop", "web"]);
    assert_eq!(stop.status.code(), Some(1), "{}", text(&stop));
    assert_eq!(
        stderr(&stop),
        "keelctl: node 127.0.0.1: client \"rd\" has role reader, which may only read (GET: \
         services, status, logs, events, stats, network, images, updates, extensions, first \
         boot, boot timeline); POST /v1/services/web/stop needs role admin"
    );
    let dir = node.dir.path().display().to_string();
    let config = format!("{dir}/empty.toml");
    std::fs::write(&config, "version = 1\n").unwrap();
    let apply = node.as_client("rd", &["apply", &config]);
    assert!(
        stderr(&apply).contains("POST /v1/apply needs role admin"),
        "{}",
        text(&apply)
    );
    let show = node.as_client("rd", &["config", "show"]);
    assert!(
        stderr(&show).contains("may not read the config"),
        "{}",
        text(&show)
    );
    // Nothing changed: web still runs.
    assert!(node
        .daemon
        .request("GET", "/v1/services/web", "")
        .1
        .contains("\"running\""));

    let stop = node.as_client("adm", &["stop", "web"]);
    assert!(stop.status.success(), "{}", text(&stop));
    assert!(
        String::from_utf8_lossy(&stop.stdout).starts_with("web: stop"),
        "{}",
        text(&stop)
    );
    let start = node.as_client("adm", &["start", "web"]);
    assert!(start.status.success(), "{}", text(&start));

    // Streams work remotely: events from the start, logs followed as they come.
    let (ca, crt, key) = (
        node.pki("ca.crt"),
        node.pki("clients/rd.crt"),
        node.pki("clients/rd.key"),
    );
    let mut follow = Command::new("nsenter")
        .arg(format!("--net={}", node.netns()))
        .arg(keelctl_exe())
        .args([
            "--node",
            "127.0.0.1",
            "--ca",
            &ca,
            "--cert",
            &crt,
            "--key",
            &key,
            "logs",
            "-f",
            "web",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(follow.stdout.take().unwrap());
    let mut seen = String::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !seen.matches("web up").count().ge(&2) && Instant::now() < deadline {
        let mut line = String::new();
        if std::io::BufRead::read_line(&mut lines, &mut line).unwrap_or(0) == 0 {
            break;
        }
        seen.push_str(&line);
    }
    let _ = follow.kill();
    let _ = follow.wait();
    assert!(
        seen.matches("web up").count() >= 2,
        "logs -f over TLS: {seen}"
    );
    // `events` never ends on its own: read it for a while, then stop it.
    let mut events = Command::new("nsenter")
        .arg(format!("--net={}", node.netns()))
        .arg(keelctl_exe())
        .args([
            "--node",
            "127.0.0.1",
            "--ca",
            &ca,
            "--cert",
            &crt,
            "--key",
            &key,
            "events",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(3));
    let _ = events.kill();
    let events = events.wait_with_output().unwrap();
    let events = String::from_utf8_lossy(&events.stdout).to_string();
    assert!(
        events.contains("web stopping") || events.contains(" web "),
        "{events}"
    );
    assert!(events.contains("remote API on 127.0.0.1:50000"), "{events}");
}

#[test]
fn clients_without_a_good_certificate_are_refused_and_the_node_is_checked() {
    let node = Node::start();
    let p = node.dir.path().join("other").display().to_string();
    for args in [
        vec!["pki", "init", "--dir", &p, "--name", "other-ca"],
        vec![
            "pki", "issue", "--dir", &p, "--role", "admin", "--name", "adm",
        ],
    ] {
        let out = Command::new(keelctl_exe()).args(&args).output().unwrap();
        assert!(out.status.success(), "{}", text(&out));
    }
    let (ca, other_ca) = (node.pki("ca.crt"), format!("{p}/ca.crt"));
    let (other_crt, other_key) = (
        format!("{p}/clients/adm.crt"),
        format!("{p}/clients/adm.key"),
    );

    // A certificate from another CA.
    let out = node.keelctl(&[
        "--node",
        "127.0.0.1",
        "--ca",
        &ca,
        "--cert",
        &other_crt,
        "--key",
        &other_key,
        "ps",
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        stderr(&out).starts_with("keelctl: node 127.0.0.1 refused keelctl's client certificate"),
        "{}",
        text(&out)
    );

    // An expired one from the right CA.
    let (crt, key) = client_cert(
        &node,
        "old",
        "keelson:admin",
        time::OffsetDateTime::now_utc() - time::Duration::days(1),
    );
    let out = node.keelctl(&[
        "--node",
        "127.0.0.1",
        "--ca",
        &ca,
        "--cert",
        &crt,
        "--key",
        &key,
        "ps",
    ]);
    assert!(
        stderr(&out).starts_with("keelctl: node 127.0.0.1 refused keelctl's client certificate"),
        "{}",
        text(&out)
    );

    // A valid one whose role this node does not know: 403 on everything.
    let (crt, key) = client_cert(
        &node,
        "op",
        "keelson:operator",
        time::OffsetDateTime::now_utc() + time::Duration::days(1),
    );
    let out = node.keelctl(&[
        "--node",
        "127.0.0.1",
        "--ca",
        &ca,
        "--cert",
        &crt,
        "--key",
        &key,
        "ps",
    ]);
    assert_eq!(
        stderr(&out),
        "keelctl: node 127.0.0.1: client \"op\" has role operator, which this node does not know \
         (roles: admin may do anything, reader may read)"
    );

    // No certificate at all: the handshake's end is an alert, no HTTP answer.
    let config = tls_config(&node, None);
    let (answer, error) = node.inside(|| {
        let mut tls = tls_connect(config);
        let _ = tls.write_all(b"GET /v1/services HTTP/1.1\r\nHost: k\r\nConnection: close\r\n\r\n");
        read_all(&mut tls)
    });
    assert!(
        answer.is_empty(),
        "answered without a client certificate: {answer}"
    );
    let error = error.expect("an error").to_string();
    assert!(error.contains("CertificateRequired"), "{error}");

    // keelctl checks the node: the wrong CA is a clear error naming the node.
    let out = node.keelctl(&[
        "--node",
        "127.0.0.1",
        "--ca",
        &other_ca,
        "--cert",
        &node.pki("clients/adm.crt"),
        "--key",
        &node.pki("clients/adm.key"),
        "ps",
    ]);
    assert_eq!(
        stderr(&out),
        format!(
            "keelctl: node 127.0.0.1: its certificate is not signed by the CA keelctl trusts \
             ({other_ca}): wrong CA, or not a node of this PKI"
        )
    );
    // A name the node's certificate does not have.
    let out = node.keelctl(&[
        "--node",
        "localhost",
        "--ca",
        &ca,
        "--cert",
        &node.pki("clients/adm.crt"),
        "--key",
        &node.pki("clients/adm.key"),
        "ps",
    ]);
    assert!(
        stderr(&out).contains("its certificate is not valid for \"localhost\""),
        "{}",
        text(&out)
    );

    // The local socket never noticed.
    assert_eq!(node.daemon.request("GET", "/v1/services", "").0, 200);
}

#[test]
fn slow_oversized_and_too_many_clients_are_bounded() {
    let node = Node::start();
    let admin = tls_config(&node, Some("adm"));

    // Slow loris: a request head that never ends is cut off (10 s header timeout).
    let config = Arc::clone(&admin);
    let (elapsed, answer) = node.inside(|| {
        let mut tls = tls_connect(config);
        let started = Instant::now();
        tls.write_all(b"GET /v1/services HTTP/1.1\r\nHost: k\r\n")
            .unwrap();
        let mut closed = false;
        for i in 0..40 {
            std::thread::sleep(Duration::from_secs(1));
            if tls
                .write_all(format!("X-Slow-{i}: 1\r\n").as_bytes())
                .is_err()
            {
                closed = true;
                break;
            }
            let mut probe = [0u8; 1];
            tls.sock.set_nonblocking(true).unwrap();
            let r = tls.read(&mut probe);
            tls.sock.set_nonblocking(false).unwrap();
            match r {
                Ok(_) => {
                    closed = true;
                    break;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(_) => {
                    closed = true;
                    break;
                }
            }
        }
        assert!(closed, "a slow request head was never cut off");
        let (answer, _) = read_all(&mut tls);
        (started.elapsed(), answer)
    });
    assert!(
        elapsed < Duration::from_secs(20),
        "cut off after {elapsed:?}"
    );
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 408"),
        "{answer}"
    );

    // A client that completes the handshake and then says nothing is closed too.
    let config = Arc::clone(&admin);
    let silent = node.inside(|| {
        let mut tls = tls_connect(config);
        while tls.conn.is_handshaking() {
            tls.conn.complete_io(&mut tls.sock).expect("handshake");
        }
        let started = Instant::now();
        let (answer, _) = read_all(&mut tls);
        (started.elapsed(), answer)
    });
    assert!(
        silent.0 < Duration::from_secs(20),
        "a silent client kept its connection for {:?}",
        silent.0
    );
    assert!(
        silent.1.is_empty() || silent.1.starts_with("HTTP/1.1 408"),
        "{}",
        silent.1
    );

    // An oversized head (431), an oversized apply (413), a request that is not HTTP (400).
    let config = Arc::clone(&admin);
    let answers = node.inside(|| {
        let mut tls = tls_connect(Arc::clone(&config));
        let big = "a".repeat(64 * 1024);
        let _ = tls.write_all(format!("GET /v1/services HTTP/1.1\r\nHost: k\r\nX-Big: {big}\r\n\r\n").as_bytes());
        let (head, _) = read_all(&mut tls);
        let mut tls = tls_connect(Arc::clone(&config));
        let body = "#".repeat(2 * 1024 * 1024);
        let _ = tls.write_all(format!("POST /v1/apply HTTP/1.1\r\nHost: k\r\nConnection: close\r\nContent-Type: application/toml\r\nContent-Length: {}\r\n\r\n", body.len()).as_bytes());
        let (apply, _) = read_all(&mut tls);
        let mut tls = tls_connect(config);
        let _ = tls.write_all(b"\x16GARBAGE / NOT-HTTP\r\n\r\n");
        let (garbage, _) = read_all(&mut tls);
        (head, apply, garbage)
    });
    assert!(
        answers.0.starts_with("HTTP/1.1 431"),
        "oversized head: {:?}",
        answers.0.lines().next()
    );
    assert!(
        answers.1.starts_with("HTTP/1.1 413"),
        "oversized apply: {:?}",
        answers.1.lines().next()
    );

    // At most max_connections at once: the next is closed on arrival, the local socket serves.
    let p = node.pki("");
    let user = format!(
        "version = 1\n[api.remote]\nlisten = \"{ENDPOINT}\"\nca = \"{p}ca.crt\"\ncert = \"{p}nodes/node.crt\"\nkey = \"{p}nodes/node.key\"\nmax_connections = 3\n"
    );
    let (status, body) = node.daemon.request("POST", "/v1/apply", &user);
    assert_eq!(status, 200, "{body}");
    node.daemon
        .wait_until("the new limit", Duration::from_secs(10), |d| {
            d.events().iter().any(|e| {
                e["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("at most 3 connections"))
            })
        });
    let config = Arc::clone(&admin);
    let (held_refused, after) = node.inside(|| {
        let held: Vec<TcpStream> = (0..3)
            .map(|_| TcpStream::connect(ENDPOINT).unwrap())
            .collect();
        std::thread::sleep(Duration::from_millis(300));
        let mut tls = tls_connect(Arc::clone(&config));
        let refused = tls
            .write_all(b"GET /v1/version HTTP/1.1\r\nHost: k\r\nConnection: close\r\n\r\n")
            .is_err()
            || read_all(&mut tls).0.is_empty();
        drop(held);
        std::thread::sleep(Duration::from_millis(300));
        let mut tls = tls_connect(config);
        tls.write_all(b"GET /v1/version HTTP/1.1\r\nHost: k\r\nConnection: close\r\n\r\n")
            .unwrap();
        (refused, read_all(&mut tls).0)
    });
    assert!(
        held_refused,
        "a 4th connection was served with max_connections = 3"
    );
    assert!(after.starts_with("HTTP/1.1 200"), "{after}");
    assert_eq!(node.daemon.request("GET", "/v1/version", "").0, 200);
}

#[test]
fn new_trust_material_from_apply_takes_effect_without_a_restart() {
    let node = Node::start();
    let p = node.dir.path().join("next").display().to_string();
    for args in [
        vec!["pki", "init", "--dir", &p, "--name", "next-ca"],
        vec![
            "pki", "issue", "--dir", &p, "--role", "admin", "--name", "adm",
        ],
        vec![
            "pki",
            "issue",
            "--dir",
            &p,
            "--node",
            "node",
            "--ip",
            "127.0.0.1",
        ],
    ] {
        let out = Command::new(keelctl_exe()).args(&args).output().unwrap();
        assert!(out.status.success(), "{}", text(&out));
    }
    let config = Command::new(keelctl_exe())
        .args([
            "pki",
            "node-config",
            "--dir",
            &p,
            "--node",
            "node",
            "--listen",
            ENDPOINT,
        ])
        .output()
        .unwrap();
    assert!(config.status.success(), "{}", text(&config));
    let file = node.dir.path().join("rotate.toml");
    std::fs::write(
        &file,
        format!("version = 1\n{}", String::from_utf8_lossy(&config.stdout)),
    )
    .unwrap();

    // A broken rotation (a key file that is not there) keeps the old trust in force.
    let broken = node.dir.path().join("broken.toml");
    let old = node.pki("");
    std::fs::write(
        &broken,
        format!("version = 1\n[api.remote]\nlisten = \"{ENDPOINT}\"\nca = \"{old}ca.crt\"\ncert = \"{old}nodes/node.crt\"\nkey = \"/nonexistent/node.key\"\n"),
    )
    .unwrap();
    let out = node.as_client("adm", &["apply", &broken.display().to_string()]);
    assert!(out.status.success(), "{}", text(&out));
    node.daemon
        .wait_until("the refused rotation", Duration::from_secs(10), |d| {
            d.events().iter().any(|e| {
                e["kind"] == "api-remote-error"
                    && e["message"].as_str().is_some_and(|m| {
                        m.contains("api.remote.key: reading /nonexistent/node.key")
                    })
            })
        });
    let ps = node.as_client("adm", &["ps"]);
    assert!(
        ps.status.success(),
        "old trust after a broken rotation: {}",
        text(&ps)
    );

    // Rotation through the remote API itself, as an admin of the old CA.
    let out = node.as_client("adm", &["apply", &file.display().to_string()]);
    assert!(out.status.success(), "{}", text(&out));
    node.daemon
        .wait_until("the new CA", Duration::from_secs(10), |d| {
            d.events().iter().any(|e| {
                e["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("clients of CA \"next-ca\""))
            })
        });
    let old_client = node.as_client("adm", &["ps"]);
    assert!(
        stderr(&old_client).contains("its certificate is not signed by the CA keelctl trusts"),
        "{}",
        text(&old_client)
    );
    let new_client = node.keelctl(&[
        "--node",
        "127.0.0.1",
        "--ca",
        &format!("{p}/ca.crt"),
        "--cert",
        &format!("{p}/clients/adm.crt"),
        "--key",
        &format!("{p}/clients/adm.key"),
        "ps",
    ]);
    assert!(new_client.status.success(), "{}", text(&new_client));
    assert!(String::from_utf8_lossy(&new_client.stdout).contains("web"));
}

#[test]
fn a_context_file_and_several_nodes() {
    let node = Node::start();
    let keelconfig = node.dir.path().join("keelconfig");
    std::fs::write(
        &keelconfig,
        "context = \"lab\"\n[contexts.lab]\nnodes = [\"127.0.0.1\", \"127.0.0.1:50000\"]\nca = \"pki/ca.crt\"\ncert = \"pki/clients/rd.crt\"\nkey = \"pki/clients/rd.key\"\n",
    )
    .unwrap();
    let run = |args: &[&str]| {
        Command::new("nsenter")
            .arg(format!("--net={}", node.netns()))
            .arg(keelctl_exe())
            .args(args)
            .env("KEELCONFIG", &keelconfig)
            .output()
            .unwrap()
    };
    let out = run(&["ps"]);
    assert!(out.status.success(), "{}", text(&out));
    let table = String::from_utf8_lossy(&out.stdout).to_string();
    let lines: Vec<&str> = table.lines().collect();
    assert!(lines[0].starts_with("NODE             NAME"), "{table}");
    assert!(
        lines.iter().any(|l| l.starts_with("127.0.0.1        web")),
        "{table}"
    );
    assert!(
        lines.iter().any(|l| l.starts_with("127.0.0.1:50000  web")),
        "{table}"
    );
    let out = run(&["-o", "json", "ps"]);
    let grouped: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(grouped[1]["node"], "127.0.0.1:50000");
    assert_eq!(grouped[1]["services"][0]["name"], "web");
    // --node wins over the context's nodes; an unreachable one is named, the others shown.
    let out = run(&["--nodes", "127.0.0.1,127.0.0.2", "ps"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("127.0.0.1  web"),
        "{}",
        text(&out)
    );
    assert!(
        stderr(&out).contains("cannot reach node 127.0.0.2 at 127.0.0.2:50000"),
        "{}",
        text(&out)
    );
    assert!(
        stderr(&out).ends_with("keelctl: 1 of 2 nodes did not answer: 127.0.0.2"),
        "{}",
        text(&out)
    );
}
