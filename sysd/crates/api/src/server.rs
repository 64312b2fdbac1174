//! The HTTP/1.1 side of sysd's API: accepts connections on the root-only unix socket, routes
//! `/v1/...` requests to the [`Concerns`] that answer them and writes JSON (or NDJSON streams)
//! back.
//!
//! Why hand-rolled routing on hyper rather than a web framework: there are nine endpoints, the
//! daemon ships as a static binary in a small image, and a `match` on method and path segments
//! reads in one screen. Streams (`logs?follow=1`, `events`) are fed by a small task per request
//! that turns a broadcast receiver into chunks of newline-delimited JSON; it ends when the
//! client goes away (the response body, and with it the channel, is dropped), when the source
//! closes the broadcast, or when the server shuts down.
//!
//! Access control is the socket itself (mode 0600, owned by root, see [`bind`]) plus a peer
//! credential check on every connection, so a socket whose mode was loosened by hand still
//! serves no other user. The same routes are served over mutual TLS by [`crate::remote`]; there
//! a connection carries the client certificate's role ([`Access`]), checked in one place
//! ([`authorize`]) before anything is dispatched.

use std::convert::Infallible;
use std::fmt::Write as _;
use std::future::Future;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use futures_util::FutureExt as _;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use hyper::body::{Bytes, Frame, Incoming, SizeHint};
use hyper::header::{self, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use keelson_common::api::{ApiError, Event, LogLine, Stream, API_PREFIX};
use serde::Serialize;
use tokio::net::UnixListener;
use tokio::sync::{broadcast, mpsc, watch};
use tokio::task::JoinSet;

use super::{Concerns, Failure, Services};
use crate::remote::{Peer, Role};

/// Largest accepted `POST /v1/apply` body.
pub const MAX_APPLY_BODY: usize = 1024 * 1024;
/// How long open connections (streams included) get to finish once shutdown is requested.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);
/// Backlog lines are sent in chunks of about this size rather than one chunk per line.
const CHUNK_TARGET: usize = 32 * 1024;
/// Chunks a stream may have queued for a slow client before its feeding task waits.
const STREAM_QUEUE: usize = 64;
/// A 404 for an unknown service lists the known ones when there are at most this many.
const LIST_KNOWN_UP_TO: usize = 12;
/// How long a request body (`apply`) may take to arrive, whatever the transport.
const BODY_TIMEOUT: Duration = Duration::from_secs(30);

/// Who is asking: root on the local socket (everything), or a remote client with the role its
/// certificate names.
#[derive(Debug, Clone)]
pub(crate) enum Access {
    Local,
    Remote(Peer),
}

/// How a connection's HTTP/1.1 is bounded. The local socket keeps hyper's defaults (its only
/// clients are root); a remote connection gets a header timeout and a smaller buffer.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    /// The request head must arrive within this time (slow-loris); None: hyper's default.
    pub header_read_timeout: Option<Duration>,
    /// Largest buffered request head; None: hyper's default (~400 KiB).
    pub max_buf_size: Option<usize>,
}

impl Limits {
    pub(crate) const LOCAL: Limits = Limits {
        header_read_timeout: None,
        max_buf_size: None,
    };
}

/// Creates the API socket at `path`: the parent directory (0755) if missing, a stale socket
/// replaced, mode 0600. Fails if another process still answers on `path` or if `path` is
/// something other than a socket. Must be called inside the tokio runtime.
///
/// The socket is bound inside a private (0700) directory, given mode 0600 and only then renamed
/// into place, so there is no moment at which another user could connect to it.
pub fn bind(path: &Path) -> Result<UnixListener> {
    bind_checked(path, true)
}

/// [`bind`] without refusing a socket that answers: for a sysd that holds (and refused to take
/// over) the previous sysd's listener, which still answers through init's FD store.
pub fn bind_over(path: &Path) -> Result<UnixListener> {
    bind_checked(path, false)
}

fn bind_checked(path: &Path, refuse_in_use: bool) -> Result<UnixListener> {
    let parent = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let file_name = path
        .file_name()
        .with_context(|| format!("socket path {} has no file name", path.display()))?;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(parent)
        .with_context(|| format!("creating {}", parent.display()))?;
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if refuse_in_use && std::os::unix::net::UnixStream::connect(path).is_ok() {
                bail!("{} is in use: another sysd is serving it", path.display());
            }
        }
        Ok(_) => bail!(
            "{} exists and is not a socket; not replacing it",
            path.display()
        ),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
        Err(err) => return Err(err).with_context(|| format!("inspecting {}", path.display())),
    }

    let mut private_name = std::ffi::OsString::from(".");
    private_name.push(file_name);
    private_name.push(format!(".{}.tmp", std::process::id()));
    let private_dir = parent.join(private_name);
    // A leftover from a crash between mkdir and the cleanup below.
    let _ = std::fs::remove_dir_all(&private_dir);
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&private_dir)
        .with_context(|| format!("creating {}", private_dir.display()))?;
    let bound = bind_private(&private_dir.join("sock"), path);
    let _ = std::fs::remove_dir_all(&private_dir);
    let listener = bound?;
    listener
        .set_nonblocking(true)
        .context("making the API socket non-blocking")?;
    UnixListener::from_std(listener).context("registering the API socket with the runtime")
}

/// The API's listening socket a previous sysd left in init's FD store, taken over if it is
/// still the one bound at `path` (clients that bind-mount the socket file, as a container does,
/// keep reaching sysd: a new bind would be a new file). Connections made while no sysd ran
/// wait in its backlog.
pub fn adopt(fd: std::os::fd::OwnedFd, path: &Path) -> Result<UnixListener> {
    let listener = std::os::unix::net::UnixListener::from(fd);
    let addr = listener
        .local_addr()
        .context("reading the kept API socket's address")?;
    // `bind` binds in a private directory beside `path` and renames the socket into place, so
    // the address the kernel reports is that first name: `<dir>/.<name>.<pid>.tmp/sock`.
    let renamed_from_beside = |bound: &Path| {
        let private = bound.parent();
        let prefix = format!(
            ".{}.",
            path.file_name().unwrap_or_default().to_string_lossy()
        );
        bound.file_name() == Some(std::ffi::OsStr::new("sock"))
            && private.and_then(Path::parent) == path.parent()
            && private
                .and_then(Path::file_name)
                .is_some_and(|n| n.to_string_lossy().starts_with(&prefix))
    };
    if !addr
        .as_pathname()
        .is_some_and(|bound| bound == path || renamed_from_beside(bound))
    {
        bail!(
            "the kept API socket is bound to {:?}, not {}",
            addr.as_pathname(),
            path.display()
        );
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {}
        _ => bail!("{} is gone: the kept socket is unreachable", path.display()),
    }
    listener
        .set_nonblocking(true)
        .context("making the API socket non-blocking")?;
    UnixListener::from_std(listener).context("registering the API socket with the runtime")
}

fn bind_private(temp: &Path, path: &Path) -> Result<std::os::unix::net::UnixListener> {
    let listener = std::os::unix::net::UnixListener::bind(temp)
        .with_context(|| format!("binding {}", temp.display()))?;
    std::fs::set_permissions(temp, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("chmod 0600 {}", temp.display()))?;
    // rename(2) replaces a stale socket atomically.
    std::fs::rename(temp, path)
        .with_context(|| format!("moving the API socket to {}", path.display()))?;
    Ok(listener)
}

/// Serves the API on `listener` until `shutdown` completes. Then it stops accepting, ends open
/// streams, gives connections [`SHUTDOWN_GRACE`] to finish and drops the rest.
pub async fn serve(listener: UnixListener, concerns: Concerns, shutdown: impl Future<Output = ()>) {
    let concerns = Arc::new(concerns);
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut connections = JoinSet::new();
    let own_uid = nix::unistd::Uid::effective().as_raw();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => {
                while connections.try_join_next().is_some() {}
                match accepted {
                    Ok((stream, _)) => match stream.peer_cred() {
                        Ok(cred) if cred.uid() == own_uid => {
                            connections.spawn(connection(
                                TokioIo::new(stream),
                                Arc::clone(&concerns),
                                stop_rx.clone(),
                                Arc::new(Access::Local),
                                Limits::LOCAL,
                            ));
                        }
                        Ok(cred) => tracing::warn!(uid = cred.uid(), "api: refused a connection from another user"),
                        Err(err) => tracing::warn!(%err, "api: cannot read the peer's credentials"),
                    },
                    Err(err) => {
                        // EMFILE and the like: do not spin on them.
                        tracing::warn!(%err, "api: accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        }
    }
    let _ = stop_tx.send(true);
    let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            open = connections.len(),
            "api: closing connections still open at shutdown"
        );
        connections.shutdown().await;
    }
}

/// Serves HTTP/1.1 on one connection (either transport) until it ends or the server stops.
pub(crate) async fn connection<I>(
    io: I,
    concerns: Arc<Concerns>,
    mut stop: watch::Receiver<bool>,
    access: Arc<Access>,
    limits: Limits,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let stop_for_requests = stop.clone();
    let service = service_fn(move |req| {
        let concerns = Arc::clone(&concerns);
        let stop = stop_for_requests.clone();
        let access = Arc::clone(&access);
        async move {
            // A panic while answering (a parser's bug on what a client sent) is this request's
            // 500, not the end of sysd: the release profile unwinds (ARCHITECTURE.md, Decisions).
            let answered = AssertUnwindSafe(handle(req, &concerns, stop, &access))
                .catch_unwind()
                .await;
            let response = answered.unwrap_or_else(|panic| {
                let why = panic_text(panic.as_ref());
                tracing::error!("api: answering a request panicked: {why}");
                error_response(&Failure::internal(format!(
                    "sysd panicked answering this request ({why}); nothing else was affected, \
                     but it is a bug: please report it"
                )))
            });
            concerns.requests.count(response.status().as_u16());
            Ok::<_, Infallible>(response)
        }
    });
    let mut builder = http1::Builder::new();
    if let Some(timeout) = limits.header_read_timeout {
        builder
            .timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(timeout);
    }
    if let Some(size) = limits.max_buf_size {
        builder.max_buf_size(size);
    }
    let conn = builder.serve_connection(io, service);
    tokio::pin!(conn);
    let result = tokio::select! {
        result = conn.as_mut() => result,
        () = stopping(&mut stop) => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(err) = result {
        // Usually a client that went away mid-response; nothing to act on.
        tracing::debug!(%err, "api: connection ended with an error");
    }
}

/// What a panic said (its message, when it has one).
fn panic_text(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "no message".into())
}

/// Resolves once the server is shutting down (or gone).
async fn stopping(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|stopping| *stopping).await;
}

/// What a request path names.
#[derive(Debug, PartialEq, Eq)]
enum Endpoint {
    Version,
    Services,
    Service(String),
    Action(String, Action),
    Kill(String),
    Logs(String),
    Events,
    Stats,
    Apply,
    Network,
    Images,
    ImagesPull,
    ImagesRemove,
    ImagesPrune,
    Update(UpdateAction),
    FirstBoot,
    Config,
    Extensions,
    Boot,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum UpdateAction {
    Status,
    Check,
    Apply,
    Cancel,
    Rollback,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    Start,
    Stop,
    Restart,
}

impl Endpoint {
    /// The endpoint at `path` and the one method it answers, or None when there is none.
    fn resolve(path: &str) -> Option<(Endpoint, Method)> {
        let rest = path.strip_prefix(API_PREFIX)?.strip_prefix('/')?;
        let segments: Vec<String> = rest.split('/').map(percent_decode).collect::<Option<_>>()?;
        let segments: Vec<&str> = segments.iter().map(String::as_str).collect();
        let get = Method::GET;
        let post = Method::POST;
        Some(match segments.as_slice() {
            ["version"] => (Endpoint::Version, get),
            ["services"] => (Endpoint::Services, get),
            ["services", name] if !name.is_empty() => (Endpoint::Service(name.to_string()), get),
            ["services", name, "logs"] if !name.is_empty() => {
                (Endpoint::Logs(name.to_string()), get)
            }
            ["services", name, "kill"] if !name.is_empty() => {
                (Endpoint::Kill(name.to_string()), post)
            }
            ["services", name, action] if !name.is_empty() => {
                let action = match *action {
                    "start" => Action::Start,
                    "stop" => Action::Stop,
                    "restart" => Action::Restart,
                    _ => return None,
                };
                (Endpoint::Action(name.to_string(), action), post)
            }
            ["events"] => (Endpoint::Events, get),
            ["boot"] => (Endpoint::Boot, get),
            ["stats"] => (Endpoint::Stats, get),
            ["apply"] => (Endpoint::Apply, post),
            ["network"] => (Endpoint::Network, get),
            ["images"] => (Endpoint::Images, get),
            ["images", "pull"] => (Endpoint::ImagesPull, post),
            ["images", "remove"] => (Endpoint::ImagesRemove, post),
            ["images", "prune"] => (Endpoint::ImagesPrune, post),
            ["update", "status"] => (Endpoint::Update(UpdateAction::Status), get),
            ["update", action] => {
                let action = match *action {
                    "check" => UpdateAction::Check,
                    "apply" => UpdateAction::Apply,
                    "cancel" => UpdateAction::Cancel,
                    "rollback" => UpdateAction::Rollback,
                    _ => return None,
                };
                (Endpoint::Update(action), post)
            }
            ["firstboot"] => (Endpoint::FirstBoot, get),
            ["config"] => (Endpoint::Config, get),
            ["extensions"] => (Endpoint::Extensions, get),
            _ => return None,
        })
    }
}

async fn handle(
    req: Request<Incoming>,
    concerns: &Concerns,
    stop: watch::Receiver<bool>,
    access: &Access,
) -> Response<Body> {
    let path = req.uri().path().to_string();
    let Some((endpoint, method)) = Endpoint::resolve(&path) else {
        return error_response(&Failure::not_found(format!("no such endpoint: {path}")));
    };
    if req.method() != method {
        let failure = Failure {
            status: 405,
            message: format!("{} {path} is not supported (use {method})", req.method()),
        };
        let mut response = error_response(&failure);
        if let Ok(allow) = HeaderValue::from_str(method.as_str()) {
            response.headers_mut().insert(header::ALLOW, allow);
        }
        return response;
    }
    if let Err(failure) = authorize(access, &method, &endpoint, &path) {
        return error_response(&failure);
    }
    match dispatch(endpoint, req, concerns, stop).await {
        Ok(response) => response,
        Err(failure) => error_response(&failure),
    }
}

/// The one place a remote client's role is checked: `admin` may do anything; `reader` may
/// read (every GET but the config, which can hold registry credentials); a certificate without
/// a known role gets nothing. The local socket is root's and may do anything.
fn authorize(
    access: &Access,
    method: &Method,
    endpoint: &Endpoint,
    path: &str,
) -> Result<(), Failure> {
    let Access::Remote(peer) = access else {
        return Ok(());
    };
    let role = peer
        .role
        .as_ref()
        .map_err(|why| Failure::forbidden(why.clone()))?;
    match role {
        Role::Admin => Ok(()),
        Role::Reader if *endpoint == Endpoint::Config => Err(Failure::forbidden(format!(
            "client {:?} has role reader, which may not read the config (it can hold registry \
             credentials); GET {path} needs role admin",
            peer.name
        ))),
        Role::Reader if *method == Method::GET => Ok(()),
        Role::Reader => Err(Failure::forbidden(format!(
            "client {:?} has role reader, which may only read (GET: services, status, logs, \
             events, stats, network, images, updates, extensions, first boot, boot timeline); {method} {path} \
             needs role admin",
            peer.name
        ))),
    }
}

async fn dispatch(
    endpoint: Endpoint,
    req: Request<Incoming>,
    concerns: &Concerns,
    stop: watch::Receiver<bool>,
) -> Result<Response<Body>, Failure> {
    let query = Query::parse(req.uri().query())?;
    match endpoint {
        Endpoint::Version => {
            query.allow(&[])?;
            Ok(json(&concerns.services()?.version()))
        }
        Endpoint::FirstBoot => {
            query.allow(&[])?;
            let status = concerns
                .firstboot()?
                .report()
                .ok_or_else(|| Failure::not_found("first boot has not run in this sysd"))?;
            Ok(json(&status))
        }
        Endpoint::Boot => {
            query.allow(&[])?;
            Ok(json(&concerns.services()?.boot()?))
        }
        Endpoint::Extensions => {
            query.allow(&[])?;
            Ok(json(&concerns.extensions()?.view()))
        }
        Endpoint::Config => {
            query.allow(&[])?;
            let view = concerns
                .config()?
                .view()
                .ok_or_else(|| Failure::not_found("the config is not loaded yet"))?;
            Ok(json(&view))
        }
        Endpoint::Services => {
            query.allow(&[])?;
            Ok(json(&concerns.services()?.list()))
        }
        Endpoint::Service(name) => {
            query.allow(&[])?;
            let services = concerns.services()?;
            let status = services.status(&name);
            Ok(json(
                &status.map_err(|f| explain_unknown(services, &name, f))?,
            ))
        }
        Endpoint::Kill(name) => {
            query.allow(&["signal"])?;
            let signal = parse_signal(query.get("signal").unwrap_or("SIGKILL"))?;
            let services = concerns.services()?;
            let status = services.kill(&name, signal).await;
            Ok(json(
                &status.map_err(|f| explain_unknown(services, &name, f))?,
            ))
        }
        Endpoint::Action(name, action) => {
            query.allow(&[])?;
            let services = concerns.services()?;
            let status = match action {
                Action::Start => services.start(&name).await,
                Action::Stop => services.stop(&name).await,
                Action::Restart => services.restart(&name).await,
            };
            Ok(json(
                &status.map_err(|f| explain_unknown(services, &name, f))?,
            ))
        }
        Endpoint::Logs(name) => {
            query.allow(&["tail", "follow"])?;
            let tail = query.number::<usize>("tail")?;
            let follow = query.flag("follow")?;
            let services = concerns.services()?;
            let feed = services
                .logs(&name, tail, follow)
                .map_err(|f| explain_unknown(services, &name, f))?;
            Ok(ndjson_stream(feed.backlog, feed.live, stop))
        }
        Endpoint::Events => {
            query.allow(&["since"])?;
            let since = query.number::<u64>("since")?;
            let feed = concerns.services()?.events(since);
            Ok(ndjson_stream(feed.backlog, Some(feed.live), stop))
        }
        Endpoint::Stats => {
            query.allow(&[])?;
            Ok(json(&concerns.services()?.stats()))
        }
        Endpoint::Apply => {
            query.allow(&["dry_run"])?;
            let dry_run = query.flag("dry_run")?;
            let config = concerns.config()?;
            let text = read_config(req).await?;
            Ok(json(&config.apply(text, dry_run).await?))
        }
        Endpoint::Network => {
            query.allow(&[])?;
            Ok(json(&concerns.network()?.status().await))
        }
        Endpoint::Images => {
            query.allow(&[])?;
            Ok(json(&concerns.images()?.list()?))
        }
        Endpoint::ImagesPull => {
            query.allow(&["reference"])?;
            let reference = required(&query, "reference")?;
            let progress = concerns.images()?.pull(reference)?;
            Ok(progress_stream(progress))
        }
        Endpoint::ImagesRemove => {
            query.allow(&["reference"])?;
            let reference = required(&query, "reference")?;
            Ok(json(&concerns.images()?.remove(reference).await?))
        }
        Endpoint::ImagesPrune => {
            query.allow(&[])?;
            Ok(json(&concerns.images()?.prune().await?))
        }
        Endpoint::Update(action) => match action {
            UpdateAction::Status => {
                query.allow(&[])?;
                Ok(json(&concerns.updates()?.status()))
            }
            UpdateAction::Check => {
                query.allow(&[])?;
                Ok(json(&concerns.updates()?.check().await?))
            }
            UpdateAction::Apply => {
                query.allow(&["version", "force", "reboot"])?;
                let req = keelson_common::api::update::ApplyRequest {
                    version: query.get("version").map(str::to_string),
                    force: query.flag("force")?,
                    reboot: query.flag("reboot")?,
                };
                Ok(json(&concerns.updates()?.apply(req).await?))
            }
            UpdateAction::Cancel => {
                query.allow(&[])?;
                Ok(json(&concerns.updates()?.cancel().await?))
            }
            UpdateAction::Rollback => {
                query.allow(&["reboot"])?;
                let reboot = query.flag("reboot")?;
                Ok(json(&concerns.updates()?.rollback(reboot).await?))
            }
        },
    }
}

fn required<'q>(query: &'q Query, key: &str) -> Result<&'q str, Failure> {
    query
        .get(key)
        .filter(|v| !v.is_empty())
        .ok_or_else(|| Failure::bad_request(format!("missing query parameter `{key}`")))
}

/// A pull's progress as NDJSON, one line per item, until the pull ends.
fn progress_stream(
    mut progress: mpsc::UnboundedReceiver<keelson_common::api::images::PullProgress>,
) -> Response<Body> {
    let (tx, rx) = mpsc::channel(STREAM_QUEUE);
    tokio::spawn(async move {
        while let Some(item) = progress.recv().await {
            let mut line = Vec::new();
            push_line(&mut line, &item);
            if tx.send(line.into()).await.is_err() {
                return;
            }
        }
    });
    response(StatusCode::OK, "application/x-ndjson", Body::Stream(rx))
}

/// `9`, `KILL`, `SIGKILL` or `sigkill` as a signal number.
fn parse_signal(text: &str) -> Result<i32, Failure> {
    let signal = match text.parse::<i32>() {
        Ok(number) => nix::sys::signal::Signal::try_from(number).ok(),
        Err(_) => {
            let upper = text.to_ascii_uppercase();
            let name = if upper.starts_with("SIG") {
                upper
            } else {
                format!("SIG{upper}")
            };
            name.parse::<nix::sys::signal::Signal>().ok()
        }
    };
    signal.map(|s| s as i32).ok_or_else(|| {
        Failure::bad_request(format!(
            "signal={text}: not a signal (e.g. TERM, KILL, HUP, 15)"
        ))
    })
}

/// A 404 for a named service becomes one message naming it and, when there are few,
/// the services that do exist.
fn explain_unknown(services: &dyn Services, name: &str, failure: Failure) -> Failure {
    if failure.status != 404 {
        return failure;
    }
    let mut known: Vec<String> = services.list().into_iter().map(|s| s.name).collect();
    known.sort();
    let mut message = format!("no service named {name:?}");
    match known.len() {
        0 => message.push_str(" (no services are configured)"),
        n if n <= LIST_KNOWN_UP_TO => {
            let _ = write!(message, " (known: {})", known.join(", "));
        }
        n => {
            let _ = write!(message, " ({n} services exist; `keelctl ps` lists them)");
        }
    }
    Failure::not_found(message)
}

/// The body of `POST /v1/apply`: TOML text, at most [`MAX_APPLY_BODY`] bytes.
async fn read_config(req: Request<Incoming>) -> Result<String, Failure> {
    if let Some(content_type) = req.headers().get(header::CONTENT_TYPE) {
        let essence = content_type
            .to_str()
            .unwrap_or("")
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        if essence != "text/plain" && essence != "application/toml" {
            return Err(Failure {
                status: 415,
                message: format!(
                    "the apply body is TOML: send it as application/toml or text/plain, not {essence:?}"
                ),
            });
        }
    }
    let too_large = || Failure {
        status: 413,
        message: format!("the config is larger than {MAX_APPLY_BODY} bytes"),
    };
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > MAX_APPLY_BODY as u64) {
        return Err(too_large());
    }
    let collected = tokio::time::timeout(
        BODY_TIMEOUT,
        Limited::new(req.into_body(), MAX_APPLY_BODY).collect(),
    )
    .await
    .map_err(|_| Failure {
        status: 408,
        message: format!(
            "the config did not arrive within {} s",
            BODY_TIMEOUT.as_secs()
        ),
    })?;
    let body = match collected {
        Ok(collected) => collected.to_bytes(),
        Err(err) if err.is::<LengthLimitError>() => return Err(too_large()),
        Err(err) => {
            return Err(Failure::bad_request(format!(
                "reading the request body: {err}"
            )))
        }
    };
    String::from_utf8(body.to_vec())
        .map_err(|err| Failure::bad_request(format!("the config is not UTF-8: {err}")))
}

/// A parsed query string. Unknown parameters are refused so that a typo (`?folow=1`) is an
/// error rather than silently ignored.
struct Query(Vec<(String, String)>);

impl Query {
    fn parse(query: Option<&str>) -> Result<Self, Failure> {
        let mut pairs = Vec::new();
        for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            match (percent_decode(key), percent_decode(value)) {
                (Some(key), Some(value)) => pairs.push((key, value)),
                _ => {
                    return Err(Failure::bad_request(format!(
                        "bad query parameter {pair:?}"
                    )))
                }
            }
        }
        Ok(Query(pairs))
    }

    fn allow(&self, known: &[&str]) -> Result<(), Failure> {
        match self
            .0
            .iter()
            .find(|(key, _)| !known.contains(&key.as_str()))
        {
            None => Ok(()),
            Some((key, _)) if known.is_empty() => Err(Failure::bad_request(format!(
                "unknown query parameter {key:?} (this endpoint takes none)"
            ))),
            Some((key, _)) => Err(Failure::bad_request(format!(
                "unknown query parameter {key:?} (known: {})",
                known.join(", ")
            ))),
        }
    }

    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// `key`, `key=1`, `key=true` are true; absent, `key=0`, `key=false` are false.
    fn flag(&self, key: &str) -> Result<bool, Failure> {
        match self.get(key) {
            None | Some("0" | "false") => Ok(false),
            Some("" | "1" | "true") => Ok(true),
            Some(other) => Err(Failure::bad_request(format!(
                "{key}={other}: expected 1, true, 0 or false"
            ))),
        }
    }

    fn number<T: std::str::FromStr>(&self, key: &str) -> Result<Option<T>, Failure> {
        self.get(key)
            .map(|v| {
                v.parse().map_err(|_| {
                    Failure::bad_request(format!("{key}={v}: expected a non-negative integer"))
                })
            })
            .transpose()
    }
}

/// Decodes `%XX` escapes; None for a malformed escape or a result that is not UTF-8.
fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

fn json<T: Serialize>(value: &T) -> Response<Body> {
    match serde_json::to_vec(value) {
        Ok(body) => response(StatusCode::OK, "application/json", Body::full(body)),
        Err(err) => error_response(&Failure::internal(format!("encoding the response: {err}"))),
    }
}

fn error_response(failure: &Failure) -> Response<Body> {
    let status = StatusCode::from_u16(failure.status)
        .ok()
        .filter(|s| s.is_client_error() || s.is_server_error())
        .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let error = ApiError {
        error: failure.message.clone(),
    };
    // Serializing a struct of one string cannot fail; fall back to an empty object regardless.
    let body = serde_json::to_vec(&error).unwrap_or_else(|_| b"{}".to_vec());
    response(status, "application/json", Body::full(body))
}

fn response(status: StatusCode, content_type: &'static str, body: Body) -> Response<Body> {
    let mut response = Response::new(body);
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

/// Something a stream carries, one JSON object per line.
trait StreamItem: Serialize + Clone + Send + Sync + 'static {
    /// What to send in place of `n` items the reader fell too far behind to receive, if anything.
    fn dropped(n: u64) -> Option<Self>;
    /// A sequence number, to skip live items the backlog already had.
    fn seq(&self) -> Option<u64> {
        None
    }
}

impl StreamItem for LogLine {
    fn dropped(n: u64) -> Option<Self> {
        let time_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        Some(LogLine {
            time_ms,
            stream: Stream::Stderr,
            line: format!("[sysd: {n} lines dropped (reader too slow)]"),
        })
    }
}

impl StreamItem for Event {
    /// Events carry sequence numbers: a gap says enough, a made-up event would not.
    fn dropped(n: u64) -> Option<Self> {
        tracing::warn!(n, "api: an events reader fell behind; events skipped");
        None
    }
    fn seq(&self) -> Option<u64> {
        Some(self.seq)
    }
}

/// A chunked NDJSON response: `backlog`, then (if any) live items until the client leaves,
/// the broadcast closes or the server stops.
fn ndjson_stream<T: StreamItem>(
    backlog: Vec<T>,
    live: Option<broadcast::Receiver<T>>,
    stop: watch::Receiver<bool>,
) -> Response<Body> {
    let (tx, rx) = mpsc::channel(STREAM_QUEUE);
    tokio::spawn(feed(backlog, live, tx, stop));
    response(StatusCode::OK, "application/x-ndjson", Body::Stream(rx))
}

async fn feed<T: StreamItem>(
    backlog: Vec<T>,
    live: Option<broadcast::Receiver<T>>,
    tx: mpsc::Sender<Bytes>,
    mut stop: watch::Receiver<bool>,
) {
    let mut last_seq = None;
    let mut chunk = Vec::new();
    for item in backlog {
        last_seq = item.seq().or(last_seq);
        push_line(&mut chunk, &item);
        if chunk.len() >= CHUNK_TARGET && tx.send(std::mem::take(&mut chunk).into()).await.is_err()
        {
            return;
        }
    }
    if !chunk.is_empty() && tx.send(chunk.into()).await.is_err() {
        return;
    }
    let Some(mut live) = live else { return };
    loop {
        let received = tokio::select! {
            received = live.recv() => received,
            () = tx.closed() => return,
            () = stopping(&mut stop) => return,
        };
        let item = match received {
            Ok(item) => item,
            Err(broadcast::error::RecvError::Lagged(n)) => match T::dropped(n) {
                Some(notice) => notice,
                None => continue,
            },
            Err(broadcast::error::RecvError::Closed) => return,
        };
        if let (Some(seq), Some(last)) = (item.seq(), last_seq) {
            if seq <= last {
                continue;
            }
        }
        last_seq = item.seq().or(last_seq);
        let mut line = Vec::new();
        push_line(&mut line, &item);
        if tx.send(line.into()).await.is_err() {
            return;
        }
    }
}

fn push_line<T: Serialize>(buf: &mut Vec<u8>, item: &T) {
    let start = buf.len();
    match serde_json::to_writer(&mut *buf, item) {
        Ok(()) => buf.push(b'\n'),
        Err(err) => {
            buf.truncate(start);
            tracing::warn!(%err, "api: cannot encode a stream item; skipped");
        }
    }
}

/// Response bodies: a complete buffer, or chunks from a feeding task (a stream).
enum Body {
    Full(Option<Bytes>),
    Stream(mpsc::Receiver<Bytes>),
}

impl Body {
    fn full(bytes: Vec<u8>) -> Self {
        Body::Full(Some(bytes.into()))
    }
}

impl hyper::body::Body for Body {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.get_mut() {
            Body::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            Body::Stream(rx) => rx
                .poll_recv(cx)
                .map(|chunk| chunk.map(|b| Ok(Frame::data(b)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self, Body::Full(None))
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Body::Full(Some(bytes)) => SizeHint::with_exact(bytes.len() as u64),
            Body::Full(None) => SizeHint::with_exact(0),
            Body::Stream(_) => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;
    use std::path::PathBuf;
    use std::sync::Mutex;

    use http_body_util::Full;
    use keelson_common::api::{ApplyPlan, Kind, ServiceStatus, State, Stats, Version};
    use serde::de::DeserializeOwned;
    use tokio::net::UnixStream;
    use tokio::sync::oneshot;
    use tokio::task::JoinHandle;

    use super::*;
    use crate::{Config, EventFeed, LogFeed};
    use keelson_common::api::config::ConfigView;

    const WAIT: Duration = Duration::from_secs(5);

    /// An in-memory supervisor: two services, three past log lines, three past events.
    struct Fake {
        services: Mutex<Vec<ServiceStatus>>,
        logs: broadcast::Sender<LogLine>,
        events: broadcast::Sender<Event>,
        applied: Mutex<Vec<(String, bool)>>,
    }

    fn service(name: &str, state: State) -> ServiceStatus {
        ServiceStatus {
            name: name.into(),
            kind: Kind::Service,
            state,
            health: None,
            critical: false,
            source: "user".into(),
            image: format!("docker.io/library/{name}:latest"),
            pid: None,
            started_at_ms: None,
            restarts: 0,
            last_exit: None,
            reason: None,
            next_restart_ms: None,
            spec_hash: "abc123".into(),
        }
    }

    fn log_line(line: &str) -> LogLine {
        LogLine {
            time_ms: 1_700_000_000_000,
            stream: Stream::Stdout,
            line: line.into(),
        }
    }

    fn event(seq: u64) -> Event {
        Event {
            seq,
            time_ms: 1_700_000_000_000 + seq,
            service: Some("web".into()),
            kind: "started".into(),
            message: format!("event {seq}"),
        }
    }

    impl Fake {
        fn new() -> Self {
            Fake {
                services: Mutex::new(vec![
                    service("web", State::Running),
                    service("db", State::Stopped),
                ]),
                logs: broadcast::channel(4).0,
                events: broadcast::channel(16).0,
                applied: Mutex::new(Vec::new()),
            }
        }

        fn update(
            &self,
            name: &str,
            change: impl FnOnce(&mut ServiceStatus) -> Result<(), Failure>,
        ) -> Result<ServiceStatus, Failure> {
            let mut services = self
                .services
                .lock()
                .map_err(|_| Failure::internal("poisoned"))?;
            let service = services
                .iter_mut()
                .find(|s| s.name == name)
                .ok_or_else(|| Failure::not_found("unknown"))?;
            change(service)?;
            Ok(service.clone())
        }
    }

    #[async_trait::async_trait]
    impl Services for Fake {
        fn version(&self) -> Version {
            Version {
                version: "9.9.9".into(),
                uptime_s: 7,
                watchdog: None,
            }
        }
        fn list(&self) -> Vec<ServiceStatus> {
            self.services.lock().map(|s| s.clone()).unwrap_or_default()
        }
        fn status(&self, name: &str) -> Result<ServiceStatus, Failure> {
            self.update(name, |_| Ok(()))
        }
        async fn start(&self, name: &str) -> Result<ServiceStatus, Failure> {
            self.update(name, |s| match s.state {
                State::Running => Err(Failure::conflict(format!("{} is already running", s.name))),
                _ => {
                    s.state = State::Starting;
                    Ok(())
                }
            })
        }
        async fn stop(&self, name: &str) -> Result<ServiceStatus, Failure> {
            self.update(name, |s| {
                s.state = State::Stopping;
                Ok(())
            })
        }
        async fn restart(&self, name: &str) -> Result<ServiceStatus, Failure> {
            self.update(name, |s| {
                s.restarts += 1;
                Ok(())
            })
        }
        async fn kill(&self, name: &str, signal: i32) -> Result<ServiceStatus, Failure> {
            self.update(name, |s| {
                s.reason = Some(format!("got signal {signal}"));
                Ok(())
            })
        }
        fn logs(&self, name: &str, tail: Option<usize>, follow: bool) -> Result<LogFeed, Failure> {
            self.status(name)?;
            let all = ["one", "two", "three"].map(log_line).to_vec();
            let skip = all.len().saturating_sub(tail.unwrap_or(all.len()));
            Ok(LogFeed {
                backlog: all[skip..].to_vec(),
                live: follow.then(|| self.logs.subscribe()),
            })
        }
        fn events(&self, since: Option<u64>) -> EventFeed {
            EventFeed {
                backlog: (1..=3)
                    .filter(|&s| s > since.unwrap_or(0))
                    .map(event)
                    .collect(),
                live: self.events.subscribe(),
            }
        }
        fn stats(&self) -> Vec<Stats> {
            vec![Stats {
                service: "web".into(),
                memory_current: Some(12 << 20),
                ..Stats::default()
            }]
        }
    }

    #[async_trait::async_trait]
    impl Config for Fake {
        async fn apply(&self, config: String, dry_run: bool) -> Result<ApplyPlan, Failure> {
            if config.contains("parser bug") {
                // What a parser's panic on a client's bytes looks like to the server.
                panic!("index out of range in a parser");
            }
            if config.contains("imagee") {
                return Err(Failure::bad_request(
                    "services.toml:2:1: service \"web\": unknown field `imagee`",
                ));
            }
            if let Ok(mut applied) = self.applied.lock() {
                applied.push((config, dry_run));
            }
            Ok(ApplyPlan {
                start: vec!["web".into()],
                dry_run,
                ..ApplyPlan::default()
            })
        }
        fn view(&self) -> Option<ConfigView> {
            None
        }
    }

    struct Harness {
        _dir: tempfile::TempDir,
        socket: PathBuf,
        backend: Arc<Fake>,
        requests: Arc<crate::RequestCounts>,
        stop: Option<oneshot::Sender<()>>,
        server: JoinHandle<()>,
    }

    async fn start() -> Harness {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("run/keelson/sysd.sock");
        let listener = bind(&socket).expect("bind");
        let backend = Arc::new(Fake::new());
        let (stop, stopped) = oneshot::channel::<()>();
        let requests = Arc::new(crate::RequestCounts::default());
        let concerns = Concerns {
            services: Some(backend.clone()),
            config: Some(backend.clone()),
            requests: Arc::clone(&requests),
            ..Concerns::default()
        };
        let server = tokio::spawn(serve(listener, concerns, async {
            let _ = stopped.await;
        }));
        Harness {
            _dir: dir,
            socket,
            backend,
            requests,
            stop: Some(stop),
            server,
        }
    }

    /// One request on a fresh connection; the connection task is returned so a test can drop
    /// the connection (abort it) to play a client that goes away.
    async fn send(
        h: &Harness,
        method: &str,
        uri: &str,
        content_type: Option<&str>,
        body: &[u8],
    ) -> (Response<Incoming>, JoinHandle<()>) {
        let stream = UnixStream::connect(&h.socket).await.expect("connect");
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .expect("handshake");
        let conn = tokio::spawn(async move {
            let _ = conn.await;
        });
        let mut req = Request::builder()
            .method(method)
            .uri(uri)
            .header(header::HOST, "keelson");
        if let Some(content_type) = content_type {
            req = req.header(header::CONTENT_TYPE, content_type);
        }
        let req = req
            .body(Full::new(Bytes::copy_from_slice(body)))
            .expect("request");
        let response = tokio::time::timeout(WAIT, sender.send_request(req))
            .await
            .expect("response in time")
            .expect("response");
        (response, conn)
    }

    async fn get(h: &Harness, uri: &str) -> Response<Incoming> {
        send(h, "GET", uri, None, b"").await.0
    }

    async fn body_json<T: DeserializeOwned>(response: Response<Incoming>) -> T {
        let bytes = tokio::time::timeout(WAIT, response.into_body().collect())
            .await
            .expect("body in time")
            .expect("body")
            .to_bytes();
        serde_json::from_slice(&bytes).expect("JSON body")
    }

    async fn expect_error(response: Response<Incoming>, status: u16, containing: &str) {
        assert_eq!(response.status().as_u16(), status);
        assert_eq!(
            response.headers()[header::CONTENT_TYPE],
            "application/json",
            "errors are JSON"
        );
        let error: ApiError = body_json(response).await;
        assert!(
            error.error.contains(containing),
            "{:?} should contain {containing:?}",
            error.error
        );
    }

    /// Reads an NDJSON body line by line.
    struct Lines {
        body: Incoming,
        buf: Vec<u8>,
    }

    impl Lines {
        fn new(response: Response<Incoming>) -> Self {
            assert_eq!(response.status(), StatusCode::OK);
            assert_eq!(
                response.headers()[header::CONTENT_TYPE],
                "application/x-ndjson"
            );
            Lines {
                body: response.into_body(),
                buf: Vec::new(),
            }
        }

        /// The next line, or None at the end of the stream.
        async fn next<T: DeserializeOwned>(&mut self) -> Option<T> {
            loop {
                if let Some(end) = self.buf.iter().position(|&b| b == b'\n') {
                    let line: Vec<u8> = self.buf.drain(..=end).collect();
                    return Some(serde_json::from_slice(&line).expect("NDJSON line"));
                }
                let frame = tokio::time::timeout(WAIT, self.body.frame())
                    .await
                    .expect("stream item in time");
                match frame {
                    None => {
                        assert!(self.buf.is_empty(), "partial line at the end");
                        return None;
                    }
                    Some(frame) => {
                        if let Ok(data) = frame.expect("frame").into_data() {
                            self.buf.extend_from_slice(&data);
                        }
                    }
                }
            }
        }
    }

    #[tokio::test]
    async fn bind_makes_a_root_only_socket_and_replaces_only_stale_ones() {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("run/keelson/sysd.sock");
        let listener = bind(&socket).expect("bind");
        let meta = std::fs::symlink_metadata(&socket).expect("socket exists");
        assert!(meta.file_type().is_socket());
        assert_eq!(meta.mode() & 0o777, 0o600);
        let parent = std::fs::metadata(socket.parent().expect("parent")).expect("parent exists");
        assert_eq!(parent.mode() & 0o777, 0o755);
        let leftovers: Vec<_> = std::fs::read_dir(socket.parent().expect("parent"))
            .expect("read_dir")
            .collect();
        assert_eq!(leftovers.len(), 1, "only the socket remains: {leftovers:?}");

        let err = bind(&socket).expect_err("a live socket is not replaced");
        assert!(format!("{err:#}").contains("in use"), "{err:#}");

        drop(listener);
        let _again = bind(&socket).expect("a stale socket is replaced");
        assert_eq!(
            std::fs::metadata(&socket).expect("socket").mode() & 0o777,
            0o600
        );

        let file = dir.path().join("file");
        std::fs::write(&file, "keep me").expect("write");
        let err = bind(&file).expect_err("a regular file is not replaced");
        assert!(format!("{err:#}").contains("not a socket"), "{err:#}");
        assert_eq!(std::fs::read_to_string(&file).expect("read"), "keep me");
    }

    #[tokio::test]
    async fn answers_are_counted_by_status() {
        let h = start().await;
        get(&h, "/v1/version").await;
        get(&h, "/v1/services").await;
        get(&h, "/v1/nowhere").await;
        assert_eq!(h.requests.snapshot(), [(200, 2), (404, 1)]);
    }

    #[tokio::test]
    async fn reads_return_json() {
        let h = start().await;
        let version: Version = body_json(get(&h, "/v1/version").await).await;
        assert_eq!(version.version, "9.9.9");

        let list: Vec<ServiceStatus> = body_json(get(&h, "/v1/services").await).await;
        assert_eq!(list.len(), 2);

        let web: ServiceStatus = body_json(get(&h, "/v1/services/web").await).await;
        assert_eq!(web.state, State::Running);

        let stats: Vec<Stats> = body_json(get(&h, "/v1/stats").await).await;
        assert_eq!(stats[0].memory_current, Some(12 << 20));
    }

    #[tokio::test]
    async fn actions_return_the_new_status_and_failures_keep_their_status() {
        let h = start().await;
        let (response, _conn) = send(&h, "POST", "/v1/services/db/start", None, b"").await;
        let db: ServiceStatus = body_json(response).await;
        assert_eq!(db.state, State::Starting);

        let (response, _conn) = send(&h, "POST", "/v1/services/web/restart", None, b"").await;
        assert_eq!(body_json::<ServiceStatus>(response).await.restarts, 1);

        let (response, _conn) = send(&h, "POST", "/v1/services/web/start", None, b"").await;
        expect_error(response, 409, "web is already running").await;

        let (response, _conn) = send(&h, "POST", "/v1/services/web/stop", None, b"").await;
        assert_eq!(
            body_json::<ServiceStatus>(response).await.state,
            State::Stopping
        );
    }

    #[tokio::test]
    async fn kill_takes_a_signal_name_or_number() {
        let h = start().await;
        for (query, expected) in [
            ("", 9),
            ("?signal=TERM", 15),
            ("?signal=sighup", 1),
            ("?signal=10", 10),
        ] {
            let uri = format!("/v1/services/web/kill{query}");
            let (response, _conn) = send(&h, "POST", &uri, None, b"").await;
            let status: ServiceStatus = body_json(response).await;
            assert_eq!(
                status.reason,
                Some(format!("got signal {expected}")),
                "{query}"
            );
        }
        for bad in ["BOGUS", "0", "999"] {
            let uri = format!("/v1/services/web/kill?signal={bad}");
            let (response, _conn) = send(&h, "POST", &uri, None, b"").await;
            expect_error(response, 400, "not a signal").await;
        }
        let (response, _conn) = send(&h, "POST", "/v1/services/nope/kill", None, b"").await;
        expect_error(response, 404, "known: db, web").await;
    }

    #[tokio::test]
    async fn errors_have_the_right_status_and_a_json_body() {
        let h = start().await;
        expect_error(
            get(&h, "/v1/services/nope").await,
            404,
            r#"no service named "nope" (known: db, web)"#,
        )
        .await;
        let (response, _conn) = send(&h, "POST", "/v1/services/nope/stop", None, b"").await;
        expect_error(response, 404, "nope").await;
        expect_error(
            get(&h, "/v1/services/nope/logs").await,
            404,
            "known: db, web",
        )
        .await;
        expect_error(get(&h, "/v1/nothing").await, 404, "no such endpoint").await;
        expect_error(get(&h, "/v2/services").await, 404, "no such endpoint").await;
        expect_error(
            get(&h, "/v1/services/web/explode").await,
            404,
            "no such endpoint",
        )
        .await;

        let (response, _conn) = send(&h, "DELETE", "/v1/services", None, b"").await;
        assert_eq!(response.headers()[header::ALLOW], "GET");
        expect_error(response, 405, "use GET").await;
        expect_error(get(&h, "/v1/services/web/start").await, 405, "use POST").await;

        expect_error(get(&h, "/v1/services/web/logs?tail=x").await, 400, "tail=x").await;
        expect_error(get(&h, "/v1/services/web/logs?folow=1").await, 400, "folow").await;
        expect_error(get(&h, "/v1/events?since=-1").await, 400, "since").await;
        expect_error(get(&h, "/v1/version?x=1").await, 400, "takes none").await;
    }

    #[tokio::test]
    async fn update_routes_exist_with_their_methods_and_queries() {
        let h = start().await;
        // No update agent among the fake's concerns: 501.
        expect_error(get(&h, "/v1/update/status").await, 501, "not supported").await;
        let (response, _conn) = send(&h, "POST", "/v1/update/check", None, b"").await;
        expect_error(response, 501, "not supported").await;
        let (response, _conn) = send(
            &h,
            "POST",
            "/v1/update/apply?version=1.2&force=1&reboot=1",
            None,
            b"",
        )
        .await;
        expect_error(response, 501, "not supported").await;
        let (response, _conn) = send(&h, "POST", "/v1/update/apply?versoin=1", None, b"").await;
        expect_error(response, 400, "versoin").await;
        expect_error(get(&h, "/v1/update/apply").await, 405, "use POST").await;
        let (response, _conn) = send(&h, "POST", "/v1/update/explode", None, b"").await;
        expect_error(response, 404, "no such endpoint").await;
    }

    #[tokio::test]
    async fn absent_concerns_answer_501_after_the_query_is_checked() {
        let h = start().await;
        expect_error(get(&h, "/v1/network").await, 501, "--host-network").await;
        expect_error(get(&h, "/v1/images").await, 501, "images").await;
        let (response, _conn) = send(&h, "POST", "/v1/images/pull?reference=x", None, b"").await;
        expect_error(response, 501, "images").await;
        expect_error(get(&h, "/v1/firstboot").await, 501, "first boot").await;
        expect_error(get(&h, "/v1/boot").await, 501, "no boot timeline").await;
        expect_error(get(&h, "/v1/boot?x=1").await, 400, "takes none").await;
        let (response, _conn) = send(&h, "POST", "/v1/boot", None, b"").await;
        expect_error(response, 405, "use GET").await;
        expect_error(get(&h, "/v1/extensions").await, 501, "extensions").await;
        expect_error(get(&h, "/v1/network?x=1").await, 400, "takes none").await;
    }

    #[tokio::test]
    async fn percent_encoded_names_are_decoded() {
        let h = start().await;
        let web: ServiceStatus = body_json(get(&h, "/v1/services/%77eb").await).await;
        assert_eq!(web.name, "web");
        expect_error(get(&h, "/v1/services/%zz").await, 404, "no such endpoint").await;
    }

    #[tokio::test]
    async fn logs_without_follow_end_after_the_tail() {
        let h = start().await;
        let mut lines = Lines::new(get(&h, "/v1/services/web/logs?tail=2").await);
        assert_eq!(
            lines.next::<LogLine>().await.map(|l| l.line).as_deref(),
            Some("two")
        );
        assert_eq!(
            lines.next::<LogLine>().await.map(|l| l.line).as_deref(),
            Some("three")
        );
        assert!(lines.next::<LogLine>().await.is_none());
    }

    #[tokio::test]
    async fn followed_logs_deliver_backlog_then_live_lines_and_report_drops() {
        let h = start().await;
        let (response, conn) = send(
            &h,
            "GET",
            "/v1/services/web/logs?tail=1&follow=1",
            None,
            b"",
        )
        .await;
        let mut lines = Lines::new(response);
        assert_eq!(
            lines.next::<LogLine>().await.map(|l| l.line).as_deref(),
            Some("three")
        );

        h.backend.logs.send(log_line("live")).expect("a subscriber");
        assert_eq!(
            lines.next::<LogLine>().await.map(|l| l.line).as_deref(),
            Some("live")
        );

        // The fake's channel holds 4: ten lines at once overrun this reader by six.
        for i in 0..10 {
            h.backend
                .logs
                .send(log_line(&format!("burst {i}")))
                .expect("a subscriber");
        }
        let notice: LogLine = lines.next().await.expect("a notice");
        assert_eq!(notice.stream, Stream::Stderr);
        assert!(notice.line.contains("6 lines dropped"), "{}", notice.line);
        for i in 6..10 {
            let line: LogLine = lines.next().await.expect("a line");
            assert_eq!(line.line, format!("burst {i}"));
        }

        // The client goes away: the server lets go of the subscription.
        drop(lines);
        conn.abort();
        tokio::time::timeout(WAIT, async {
            while h.backend.logs.receiver_count() > 0 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("the stream's subscription is dropped once the client leaves");
    }

    #[tokio::test]
    async fn events_stream_backlog_then_live_without_duplicates() {
        let h = start().await;
        let mut events = Lines::new(get(&h, "/v1/events?since=1").await);
        assert_eq!(events.next::<Event>().await.map(|e| e.seq), Some(2));
        assert_eq!(events.next::<Event>().await.map(|e| e.seq), Some(3));
        // Overlap between backlog and live (the supervisor published while we subscribed).
        h.backend.events.send(event(3)).expect("a subscriber");
        h.backend.events.send(event(4)).expect("a subscriber");
        assert_eq!(events.next::<Event>().await.map(|e| e.seq), Some(4));
    }

    #[tokio::test]
    async fn apply_passes_the_toml_and_the_dry_run_flag() {
        let h = start().await;
        let config = "[services.web]\nimage = \"nginx\"\n";
        let (response, _conn) = send(
            &h,
            "POST",
            "/v1/apply?dry_run=1",
            Some("application/toml"),
            config.as_bytes(),
        )
        .await;
        let plan: ApplyPlan = body_json(response).await;
        assert!(plan.dry_run);
        assert_eq!(plan.start, ["web"]);

        let (response, _conn) = send(
            &h,
            "POST",
            "/v1/apply",
            Some("text/plain; charset=utf-8"),
            config.as_bytes(),
        )
        .await;
        assert!(!body_json::<ApplyPlan>(response).await.dry_run);
        let applied = h.backend.applied.lock().expect("lock").clone();
        assert_eq!(
            applied,
            [(config.to_string(), true), (config.to_string(), false)]
        );
    }

    #[tokio::test]
    async fn apply_refuses_bad_bodies() {
        let h = start().await;
        let (response, _conn) = send(
            &h,
            "POST",
            "/v1/apply",
            None,
            b"[services.web]\nimagee = 1\n",
        )
        .await;
        expect_error(
            response,
            400,
            "services.toml:2:1: service \"web\": unknown field",
        )
        .await;

        let big = vec![b'#'; MAX_APPLY_BODY + 1];
        let (response, _conn) = send(&h, "POST", "/v1/apply", Some("text/plain"), &big).await;
        expect_error(response, 413, "larger than").await;

        let (response, _conn) =
            send(&h, "POST", "/v1/apply", Some("application/json"), b"{}").await;
        expect_error(response, 415, "application/toml").await;

        let (response, _conn) =
            send(&h, "POST", "/v1/apply", Some("text/plain"), b"\xff\xfe").await;
        expect_error(response, 400, "not UTF-8").await;
        assert!(h.backend.applied.lock().expect("lock").is_empty());
    }

    /// A panic while answering (here the config concern's parser) is that request's 500; the
    /// server, its connection task and every later request go on.
    #[tokio::test]
    async fn a_panic_answering_a_request_is_a_500_and_the_server_goes_on() {
        let h = start().await;
        let (response, _conn) = send(
            &h,
            "POST",
            "/v1/apply",
            Some("application/toml"),
            b"# a parser bug\n",
        )
        .await;
        expect_error(
            response,
            500,
            "sysd panicked answering this request (index out of range in a parser)",
        )
        .await;
        let response = get(&h, "/v1/version").await;
        assert_eq!(response.status(), 200);
        let counts = h.requests.snapshot();
        assert!(
            counts.contains(&(500, 1)) && counts.contains(&(200, 1)),
            "{counts:?}"
        );
    }

    #[tokio::test]
    async fn apply_limits_chunked_bodies_too() {
        let h = start().await;
        let mut stream = UnixStream::connect(&h.socket).await.expect("connect");
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let head = "POST /v1/apply HTTP/1.1\r\nHost: keelson\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n";
        stream.write_all(head.as_bytes()).await.expect("write");
        let chunk = vec![b'#'; 64 * 1024];
        for _ in 0..17 {
            let mut framed = format!("{:x}\r\n", chunk.len()).into_bytes();
            framed.extend_from_slice(&chunk);
            framed.extend_from_slice(b"\r\n");
            if stream.write_all(&framed).await.is_err() {
                break; // the server answered and closed early
            }
        }
        let _ = stream.write_all(b"0\r\n\r\n").await;
        let mut answer = Vec::new();
        let _ = tokio::time::timeout(WAIT, stream.read_to_end(&mut answer)).await;
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    }

    #[tokio::test]
    async fn shutdown_ends_streams_and_serve_returns() {
        let mut h = start().await;
        let mut events = Lines::new(get(&h, "/v1/events").await);
        for seq in 1..=3 {
            assert_eq!(events.next::<Event>().await.map(|e| e.seq), Some(seq));
        }
        if let Some(stop) = h.stop.take() {
            let _ = stop.send(());
        }
        assert!(
            events.next::<Event>().await.is_none(),
            "the stream ends cleanly"
        );
        tokio::time::timeout(WAIT, &mut h.server)
            .await
            .expect("serve returns")
            .expect("serve did not panic");
        assert_eq!(h.backend.events.receiver_count(), 0);
    }
}
