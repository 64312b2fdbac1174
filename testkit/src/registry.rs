//! Harness for the image store's host tests, the pull benchmark and the VM registry scenario:
//! a private network namespace, the reference `distribution`
//! registry (Debian's `docker-registry`) on its loopback, OCI image layouts built here and
//! pushed with `skopeo`, and a TCP proxy that can make the registry go away mid-transfer.

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

/// Moves the calling thread (and every process it spawns) into a new network namespace with
/// its loopback up: registries listen there, nothing reaches the outside.
pub fn private_netns() -> io::Result<()> {
    // SAFETY: unshare only changes this thread's namespaces.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let ok = Command::new("ip")
        .args(["link", "set", "lo", "up"])
        .status()?
        .success();
    if !ok {
        return Err(io::Error::other("ip link set lo up failed"));
    }
    Ok(())
}

/// Waits until something accepts connections on `addr`.
pub fn wait_port(addr: &str, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if TcpStream::connect(addr).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("{what} did not start listening on {addr}");
}

/// A `docker-registry` process, killed on drop.
pub struct Registry {
    pub addr: String,
    pub storage: PathBuf,
    child: Child,
}

#[derive(Default)]
pub struct RegistryOptions<'a> {
    /// `(user, password)`: htpasswd (bcrypt) basic auth.
    pub basic: Option<(&'a str, &'a str)>,
    /// `(cert.pem, key.pem)`: serve HTTPS.
    pub tls: Option<(&'a Path, &'a Path)>,
    /// Bearer tokens from a token server (see [`TokenServer`]).
    pub token: Option<&'a TokenServer>,
    /// The address to listen on; 127.0.0.1 if `None`. A multi-node scenario gives its
    /// namespace's bridge address so that guests on the LAN can pull.
    pub host: Option<Ipv4Addr>,
}

impl Registry {
    pub fn start(dir: &Path, port: u16, opts: RegistryOptions) -> Registry {
        assert!(
            Path::new("/usr/bin/docker-registry").exists(),
            "docker-registry missing: apt-get install docker-registry (./dev deps)"
        );
        let storage = dir.join("storage");
        std::fs::create_dir_all(&storage).unwrap();
        let host = opts.host.unwrap_or(Ipv4Addr::LOCALHOST);
        let addr = format!("{host}:{port}");
        let mut config = format!(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {addr}\n",
            storage.display()
        );
        if let Some((cert, key)) = opts.tls {
            config.push_str(&format!(
                "  tls:\n    certificate: {}\n    key: {}\n",
                cert.display(),
                key.display()
            ));
        }
        if let Some((user, password)) = opts.basic {
            let out = Command::new("htpasswd")
                .args(["-Bbn", user, password])
                .output()
                .expect("htpasswd (apt-get install apache2-utils)");
            assert!(out.status.success());
            let file = dir.join("htpasswd");
            std::fs::write(&file, &out.stdout).unwrap();
            config.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: keelson-test\n    path: {}\n",
                file.display()
            ));
        }
        if let Some(t) = opts.token {
            config.push_str(&format!(
                "auth:\n  token:\n    realm: {}\n    service: {}\n    issuer: {}\n    rootcertbundle: {}\n",
                t.realm,
                TOKEN_SERVICE,
                TOKEN_ISSUER,
                t.cert.display()
            ));
        }
        let config_file = dir.join("config.yml");
        std::fs::write(&config_file, config).unwrap();
        let log = std::fs::File::create(dir.join("registry.log")).unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config_file)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawning docker-registry");
        wait_port(&addr, "docker-registry");
        Registry {
            addr,
            storage,
            child,
        }
    }

    /// The stored file of a blob (the registry's filesystem driver layout).
    pub fn blob_file(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
        self.storage
            .join("docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub use crate::oci::{gzip, tar, tar_dir, E, TAR, TGZ};

/// An OCI image layout under construction.
pub struct Layout {
    pub dir: PathBuf,
    index: Vec<serde_json::Value>,
}

impl Layout {
    pub fn new(dir: &Path) -> Layout {
        std::fs::create_dir_all(dir.join("blobs/sha256")).unwrap();
        Layout {
            dir: dir.to_path_buf(),
            index: Vec::new(),
        }
    }

    /// Stores a blob; returns its descriptor.
    pub fn blob(&self, media_type: &str, data: &[u8]) -> serde_json::Value {
        let hex = hex::encode(Sha256::digest(data));
        std::fs::write(self.dir.join("blobs/sha256").join(&hex), data).unwrap();
        serde_json::json!({ "mediaType": media_type, "digest": format!("sha256:{hex}"), "size": data.len() })
    }

    /// An image manifest of `layers` (media type, blob) for `arch`; returns its descriptor.
    /// The config lists the layers' diff_ids as real images do, where every layer is a plain
    /// or gzip tar of at most 256 MiB (else none, as some old tools wrote).
    pub fn image(&self, arch: &str, layers: &[(&str, Vec<u8>)], cmd: &[&str]) -> serde_json::Value {
        let diff_ids: Option<Vec<String>> = layers.iter().map(|(t, d)| diff_id(t, d)).collect();
        let config = serde_json::json!({
            "architecture": arch, "os": "linux",
            "config": { "Cmd": cmd, "Env": ["PATH=/bin"] },
            "rootfs": { "type": "layers", "diff_ids": diff_ids.unwrap_or_default() },
        });
        let config = self.blob(
            "application/vnd.oci.image.config.v1+json",
            config.to_string().as_bytes(),
        );
        let layers: Vec<_> = layers.iter().map(|(t, d)| self.blob(t, d)).collect();
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": config, "layers": layers,
        });
        self.blob(
            "application/vnd.oci.image.manifest.v1+json",
            manifest.to_string().as_bytes(),
        )
    }

    /// A multi-arch index of `(descriptor, arch)`; returns its descriptor.
    pub fn index(&self, manifests: &[(serde_json::Value, &str)]) -> serde_json::Value {
        let manifests: Vec<_> = manifests
            .iter()
            .map(|(d, arch)| {
                let mut d = d.clone();
                d["platform"] = serde_json::json!({ "os": "linux", "architecture": arch });
                d
            })
            .collect();
        let index = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": manifests,
        });
        self.blob(
            "application/vnd.oci.image.index.v1+json",
            index.to_string().as_bytes(),
        )
    }

    /// Names `desc` `tag` in index.json (written at once).
    pub fn tag(&mut self, desc: &serde_json::Value, tag: &str) {
        let mut d = desc.clone();
        d["annotations"] = serde_json::json!({ "org.opencontainers.image.ref.name": tag });
        self.index.push(d);
        std::fs::write(
            self.dir.join("oci-layout"),
            r#"{"imageLayoutVersion":"1.0.0"}"#,
        )
        .unwrap();
        let index = serde_json::json!({ "schemaVersion": 2, "manifests": self.index });
        std::fs::write(self.dir.join("index.json"), index.to_string()).unwrap();
    }

    /// `skopeo copy --all oci:DIR:TAG docker://ADDR/NAME:TAG` over plain HTTP.
    pub fn push(&self, tag: &str, dest: &str, creds: Option<(&str, &str)>) {
        let mut cmd = Command::new("skopeo");
        cmd.args([
            "copy",
            "--quiet",
            "--all",
            "--preserve-digests",
            "--dest-tls-verify=false",
        ]);
        if let Some((u, p)) = creds {
            cmd.arg(format!("--dest-creds={u}:{p}"));
        }
        let out = cmd
            .arg(format!("oci:{}:{tag}", self.dir.display()))
            .arg(format!("docker://{dest}"))
            .output()
            .expect("skopeo (apt-get install skopeo)");
        assert!(
            out.status.success(),
            "skopeo copy to {dest}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Deterministic incompressible bytes.
pub fn noise(len: usize, seed: u8) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 32);
    let mut block = Sha256::digest([seed]).to_vec();
    while out.len() < len {
        block = Sha256::digest(&block).to_vec();
        out.extend_from_slice(&block);
    }
    out.truncate(len);
    out
}

/// A TCP proxy to `upstream` that, once `cut_after` bytes have gone to clients, drops every
/// connection and refuses service for `outage` (the registry "goes away"), then forwards
/// again.
pub struct Proxy {
    pub addr: String,
    pub cuts: Arc<AtomicU64>,
}

impl Proxy {
    pub fn start(port: u16, upstream: &str, cut_after: u64, outage: Duration) -> Proxy {
        let addr = format!("127.0.0.1:{port}");
        let listener = TcpListener::bind(&addr).unwrap();
        let sent = Arc::new(AtomicU64::new(0));
        let cut = Arc::new(AtomicBool::new(false));
        let cuts = Arc::new(AtomicU64::new(0));
        let down_until = Arc::new(std::sync::Mutex::new(None::<Instant>));
        let upstream = upstream.to_string();
        let c = Arc::clone(&cuts);
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let until = *down_until.lock().unwrap();
                if until.is_some_and(|u| Instant::now() < u) {
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                }
                let Ok(server) = TcpStream::connect(&upstream) else {
                    continue;
                };
                let (c1, s1) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                std::thread::spawn(move || {
                    let _ = io::copy(&mut &c1, &mut &s1);
                    let _ = s1.shutdown(Shutdown::Write);
                });
                let (sent, cut, cuts, down) = (
                    Arc::clone(&sent),
                    Arc::clone(&cut),
                    Arc::clone(&c),
                    Arc::clone(&down_until),
                );
                std::thread::spawn(move || {
                    let mut buf = [0u8; 16384];
                    let mut server = server;
                    let mut client = client;
                    loop {
                        let n = match server.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        let total = sent.fetch_add(n as u64, Ordering::SeqCst) + n as u64;
                        if total > cut_after && !cut.swap(true, Ordering::SeqCst) {
                            // Send only up to the cut, then vanish.
                            let keep = n - (total - cut_after) as usize;
                            let _ = client.write_all(&buf[..keep]);
                            *down.lock().unwrap() = Some(Instant::now() + outage);
                            cuts.fetch_add(1, Ordering::SeqCst);
                            let _ = client.shutdown(Shutdown::Both);
                            let _ = server.shutdown(Shutdown::Both);
                            return;
                        }
                        if client.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    let _ = client.shutdown(Shutdown::Write);
                });
            }
        });
        Proxy { addr, cuts }
    }
}

/// A private CA and a certificate for 127.0.0.1 it signed: `(ca.pem, cert.pem, key.pem)`.
pub fn private_ca(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let p = |n: &str| dir.join(n);
    let run = |args: &[&str]| {
        let ok = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("openssl")
            .success();
        assert!(ok, "openssl {args:?} failed");
    };
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=keelson test CA",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
    ]);
    run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=127.0.0.1",
        "-keyout",
        "key.pem",
        "-out",
        "cert.csr",
    ]);
    std::fs::write(
        p("ext.cnf"),
        "basicConstraints=CA:FALSE\nsubjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        "cert.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
        "-out",
        "cert.pem",
    ]);
    (p("ca.pem"), p("cert.pem"), p("key.pem"))
}

/// An HTTP server that answers every request with a redirect to itself.
pub fn redirect_loop(port: u16) -> String {
    let addr = format!("127.0.0.1:{port}");
    let listener = TcpListener::bind(&addr).unwrap();
    let a = addr.clone();
    std::thread::spawn(move || {
        for mut s in listener.incoming().flatten() {
            let a = a.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                let n = s.read(&mut buf).unwrap_or(0);
                let req = String::from_utf8_lossy(&buf[..n]);
                let path = req.split_whitespace().nth(1).unwrap_or("/").to_string();
                let _ = write!(
                    s,
                    "HTTP/1.1 307 Temporary Redirect\r\nLocation: http://{a}{path}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                );
            });
        }
    });
    addr
}

const TOKEN_SERVICE: &str = "keelson-test-registry";
const TOKEN_ISSUER: &str = "keelson-test-issuer";

/// A bearer token server (the distribution token protocol): `GET /token?scope=…&service=…`
/// with the right basic credentials gets a JWT (RS256, signed with openssl, the signing
/// certificate in `x5c`) granting pull and push on `repository`; anything else gets 401.
pub struct TokenServer {
    pub realm: String,
    pub cert: PathBuf,
    /// Token requests answered with a token.
    pub issued: Arc<AtomicU64>,
}

fn b64url(data: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..=chunk.len() {
            out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    out
}

fn b64(data: &[u8]) -> String {
    let url = b64url(data).replace('-', "+").replace('_', "/");
    let pad = (4 - url.len() % 4) % 4;
    url + &"=".repeat(pad)
}

impl TokenServer {
    pub fn start(
        dir: &Path,
        port: u16,
        user: &str,
        password: &str,
        repository: &str,
    ) -> TokenServer {
        std::fs::create_dir_all(dir).unwrap();
        let (key, cert) = (dir.join("token.key"), dir.join("token.pem"));
        let ok = Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "2",
                "-subj",
                "/CN=keelson token issuer",
            ])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .unwrap()
            .success();
        assert!(ok, "openssl req");
        let der = Command::new("openssl")
            .args(["x509", "-outform", "DER", "-in"])
            .arg(&cert)
            .output()
            .unwrap()
            .stdout;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let header = serde_json::json!({ "alg": "RS256", "typ": "JWT", "x5c": [b64(&der)] });
        let claims = serde_json::json!({
            "iss": TOKEN_ISSUER, "sub": user, "aud": TOKEN_SERVICE,
            "exp": now + 3600, "nbf": now - 60, "iat": now - 60, "jti": "keelson-test",
            "access": [{ "type": "repository", "name": repository, "actions": ["pull", "push"] }],
        });
        let signing_input = format!(
            "{}.{}",
            b64url(header.to_string().as_bytes()),
            b64url(claims.to_string().as_bytes())
        );
        let input_file = dir.join("jwt.input");
        std::fs::write(&input_file, &signing_input).unwrap();
        let sig = Command::new("openssl")
            .args(["dgst", "-sha256", "-sign"])
            .arg(&key)
            .arg(&input_file)
            .output()
            .unwrap();
        assert!(sig.status.success(), "openssl dgst");
        let jwt = format!("{signing_input}.{}", b64url(&sig.stdout));
        let expected = format!("Basic {}", b64(format!("{user}:{password}").as_bytes()));
        let addr = format!("127.0.0.1:{port}");
        let listener = TcpListener::bind(&addr).unwrap();
        let issued = Arc::new(AtomicU64::new(0));
        let counter = Arc::clone(&issued);
        std::thread::spawn(move || {
            for mut s in listener.incoming().flatten() {
                let mut buf = [0u8; 8192];
                let n = s.read(&mut buf).unwrap_or(0);
                let req = String::from_utf8_lossy(&buf[..n]).to_string();
                let authorized = req.lines().any(|l| {
                    l.to_ascii_lowercase().starts_with("authorization:")
                        && l[14..].trim() == expected
                });
                let (status, body) = if authorized {
                    counter.fetch_add(1, Ordering::SeqCst);
                    (
                        "200 OK",
                        serde_json::json!({ "token": jwt, "expires_in": 3600 }).to_string(),
                    )
                } else {
                    (
                        "401 Unauthorized",
                        r#"{"details":"bad credentials"}"#.to_string(),
                    )
                };
                let _ = write!(
                    s,
                    "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        TokenServer {
            realm: format!("http://{addr}/token"),
            cert,
            issued,
        }
    }
}

/// A registry that misbehaves on purpose, one way per repository (any tag):
///
/// - `endless/manifest`: a manifest whose chunked body never ends;
/// - `endless/error`: a 404 whose chunked body never ends;
/// - `endless/token`: a Bearer challenge whose realm (this server's `/token`) answers with a
///   body that never ends;
/// - `elsewhere/app`: a Bearer challenge whose realm is on another host
///   (`http://127.0.0.2:PORT/token`), where a listener counts what reaches it;
/// - `oversize/app`: a good manifest naming a 1 KiB layer whose blob sends 2 MiB.
///
/// It counts the bytes it sent, so a test can tell that the client stopped reading.
pub struct Hostile {
    pub addr: String,
    /// Body bytes sent, all requests together.
    pub sent: Arc<AtomicU64>,
    /// Connections the other host's listener accepted.
    pub elsewhere: Arc<AtomicU64>,
}

/// The digest of a layer's uncompressed tar, for a plain or gzip tar of at most 256 MiB.
fn diff_id(media_type: &str, data: &[u8]) -> Option<String> {
    use std::io::Read;
    let tar = match media_type {
        crate::oci::TAR => data.to_vec(),
        crate::oci::TGZ => {
            let mut out = Vec::new();
            flate2::read::MultiGzDecoder::new(data)
                .take(256 << 20)
                .read_to_end(&mut out)
                .ok()?;
            if out.len() == 256 << 20 {
                return None;
            }
            out
        }
        _ => return None,
    };
    Some(format!("sha256:{}", hex::encode(Sha256::digest(&tar))))
}

/// Layer and config of `oversize/app`, and its manifest.
fn oversize_image() -> (Vec<u8>, Vec<u8>, Vec<u8>) {
    let config =
        br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#
            .to_vec();
    let layer = vec![0u8; 1024];
    let digest = |b: &[u8]| format!("sha256:{}", hex::encode(Sha256::digest(b)));
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{}","size":{}}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{}","size":{}}}]}}"#,
        digest(&config),
        config.len(),
        digest(&layer),
        layer.len()
    );
    (config, layer, manifest.into_bytes())
}

impl Hostile {
    pub fn start(port: u16) -> Hostile {
        let addr = format!("127.0.0.1:{port}");
        let listener = TcpListener::bind(&addr).unwrap();
        let other = TcpListener::bind(format!("127.0.0.2:{}", port + 1)).unwrap();
        let sent = Arc::new(AtomicU64::new(0));
        let elsewhere = Arc::new(AtomicU64::new(0));
        let e = elsewhere.clone();
        std::thread::spawn(move || {
            for s in other.incoming().flatten() {
                e.fetch_add(1, Ordering::SeqCst);
                drop(s);
            }
        });
        let (s, a) = (sent.clone(), addr.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let (s, a) = (s.clone(), a.clone());
                std::thread::spawn(move || {
                    let _ = Hostile::answer(stream, &s, &a, port + 1);
                });
            }
        });
        Hostile {
            addr,
            sent,
            elsewhere,
        }
    }

    fn answer(mut s: TcpStream, sent: &AtomicU64, addr: &str, other: u16) -> io::Result<()> {
        let mut buf = [0u8; 8192];
        let n = s.read(&mut buf)?;
        let req = String::from_utf8_lossy(&buf[..n]).to_string();
        let path = req.split_whitespace().nth(1).unwrap_or("/").to_string();
        let authorized = req.to_ascii_lowercase().contains("authorization: bearer");
        let challenge = |realm: &str| {
            format!(
                "HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Bearer realm=\"{realm}\",service=\"hostile\"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            )
        };
        let endless = |s: &mut TcpStream, head: &str| -> io::Result<()> {
            write!(
                s,
                "{head}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
            )?;
            let chunk = vec![b' '; 64 << 10];
            // Until the client hangs up (bounded, so a client that never does fails the test
            // on the byte count instead of hanging it).
            for _ in 0..(16 << 10) {
                write!(s, "{:x}\r\n", chunk.len())?;
                s.write_all(&chunk)?;
                s.write_all(b"\r\n")?;
                sent.fetch_add(chunk.len() as u64, Ordering::SeqCst);
            }
            Ok(())
        };
        let whole = |s: &mut TcpStream, body: &[u8], media: &str| -> io::Result<()> {
            write!(
                s,
                "HTTP/1.1 200 OK\r\nContent-Type: {media}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            )?;
            s.write_all(body)?;
            sent.fetch_add(body.len() as u64, Ordering::SeqCst);
            Ok(())
        };
        let (config, layer, manifest) = oversize_image();
        let digest = |b: &[u8]| format!("sha256:{}", hex::encode(Sha256::digest(b)));
        if path == "/v2/" {
            return whole(&mut s, b"{}", "application/json");
        }
        if path.starts_with("/token") {
            return endless(&mut s, "HTTP/1.1 200 OK\r\nContent-Type: application/json");
        }
        if path.starts_with("/v2/endless/manifest/manifests/") {
            return endless(
                &mut s,
                "HTTP/1.1 200 OK\r\nContent-Type: application/vnd.oci.image.manifest.v1+json",
            );
        }
        if path.starts_with("/v2/endless/error/manifests/") {
            return endless(&mut s, "HTTP/1.1 404 Not Found\r\nContent-Type: text/plain");
        }
        if path.starts_with("/v2/endless/token/") && !authorized {
            return s.write_all(challenge(&format!("http://{addr}/token")).as_bytes());
        }
        if path.starts_with("/v2/elsewhere/") {
            return s.write_all(challenge(&format!("http://127.0.0.2:{other}/token")).as_bytes());
        }
        if path.starts_with("/v2/oversize/app/manifests/") {
            return whole(
                &mut s,
                &manifest,
                "application/vnd.oci.image.manifest.v1+json",
            );
        }
        if path == format!("/v2/oversize/app/blobs/{}", digest(&config)) {
            return whole(&mut s, &config, "application/octet-stream");
        }
        if path == format!("/v2/oversize/app/blobs/{}", digest(&layer)) {
            // Announced and sent: 2 MiB for a 1 KiB descriptor.
            return whole(&mut s, &vec![0u8; 2 << 20], "application/octet-stream");
        }
        write!(
            s,
            "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )
    }
}
