//! The pull side of the OCI distribution spec: manifests and blobs by HTTP GET, with the
//! registry token flow (`WWW-Authenticate: Bearer realm=…`) and HTTP Basic. Every response
//! body the node reads whole is bounded before it is read: a manifest by the registry's
//! `max_manifest_size`, a token by [`TOKEN_MAX`], an error body by [`ERROR_BODY_MAX`]; blobs
//! are streamed to disk by the caller, which holds them to their descriptors' sizes.
//!
//! Written here rather than kept on `oci-client` (which pulls did use): that crate reads every
//! manifest, token and error body whole into memory before any limit can be applied (an
//! endless body is an out-of-memory of sysd), and it sends the user's credentials to whatever
//! token realm a registry names. The protocol a pull needs is the few requests below, over
//! `reqwest` (the HTTP/TLS stack oci-client used too).
//!
//! Credentials go only where they belong: to the registry itself, and to a token realm on
//! the registry's own host or site (the last two labels of its name: `registry-1.docker.io`
//! exchanges them at `auth.docker.io`), never over plain HTTP when the registry is HTTPS.
//! A registry naming any other realm gets an error saying so, and nothing is sent there.
//! A redirect (blob storage on a CDN) is followed without the `Authorization` header when it
//! leaves the registry's origin (reqwest's rule).

use std::time::Duration;

use futures_util::StreamExt;
use reqwest::header::{HeaderMap, ACCEPT, CONTENT_LENGTH, CONTENT_TYPE, RANGE};
use reqwest::{StatusCode, Url};

/// The largest token response accepted (real ones are a few KiB of JWT).
pub const TOKEN_MAX: u64 = 1 << 20;
/// How much of an error response is read for its message.
pub const ERROR_BODY_MAX: u64 = 16 << 10;

/// A failed request: whether trying again may help, and what happened (never credentials).
#[derive(Debug)]
pub struct Error {
    pub transient: bool,
    pub message: String,
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {}

impl Error {
    fn refused(message: impl Into<String>) -> Error {
        Error {
            transient: false,
            message: message.into(),
        }
    }

    /// A transport error: its causes in the text; TLS and redirect loops are not transient.
    fn transport(url: &Url, e: reqwest::Error) -> Error {
        let mut text = format!("{}: {e}", strip(url));
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            let t = s.to_string();
            if !text.contains(&t) {
                text.push_str(": ");
                text.push_str(&t);
            }
            source = s.source();
        }
        let lower = text.to_ascii_lowercase();
        let fatal = e.is_redirect()
            || e.is_builder()
            || ["certificate", "tls", "handshake"]
                .iter()
                .any(|w| lower.contains(w));
        Error {
            transient: !fatal,
            message: text,
        }
    }
}

/// A URL as shown in messages: no query (a token request's scope is noise, and a realm's
/// query could carry anything).
fn strip(url: &Url) -> String {
    let mut u = url.clone();
    u.set_query(None);
    u.to_string()
}

#[derive(Clone)]
enum Auth {
    None,
    Basic,
    Bearer(String),
}

/// One registry (or mirror) endpoint.
pub struct Client {
    http: reqwest::Client,
    base: Url,
    credentials: Option<(String, String)>,
    namespace: Option<String>,
    auth: tokio::sync::Mutex<Auth>,
}

/// What the client needs to know of a registry's settings.
pub struct Options {
    /// Plain HTTP.
    pub insecure: bool,
    /// Trust anchors (DER), replacing any system store (the node has none: `pull` passes
    /// Mozilla's roots, compiled in).
    pub roots_der: Vec<Vec<u8>>,
    /// Extra trust anchors (PEM).
    pub extra_pem: Option<Vec<u8>>,
    pub credentials: Option<(String, String)>,
    /// When this endpoint is a mirror: the registry it mirrors, sent as `?ns=` (containerd's
    /// convention, which pull-through caches use to pick the upstream).
    pub namespace: Option<String>,
}

impl Client {
    pub fn new(host: &str, options: Options) -> Result<Client, Error> {
        let scheme = if options.insecure { "http" } else { "https" };
        let base = Url::parse(&format!("{scheme}://{host}/"))
            .map_err(|e| Error::refused(format!("registry {host:?}: not a host[:port]: {e}")))?;
        let mut certs = Vec::new();
        for der in &options.roots_der {
            certs.push(reqwest::Certificate::from_der(der).map_err(|e| {
                Error::refused(format!("registry {host}: a built-in root certificate: {e}"))
            })?);
        }
        if let Some(pem) = &options.extra_pem {
            let extra = reqwest::Certificate::from_pem_bundle(pem)
                .map_err(|e| Error::refused(format!("registry {host}: ca_file: {e}")))?;
            certs.extend(extra);
        }
        let http = reqwest::Client::builder()
            .tls_certs_only(certs)
            .connect_timeout(Duration::from_secs(10))
            .read_timeout(Duration::from_secs(60))
            .redirect(reqwest::redirect::Policy::limited(10))
            .user_agent(concat!("keelson/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| Error::refused(format!("registry {host}: the HTTP client: {e}")))?;
        Ok(Client {
            http,
            base,
            credentials: options.credentials,
            namespace: options.namespace,
            auth: tokio::sync::Mutex::new(Auth::None),
        })
    }

    /// A manifest (or index) by tag or digest: its bytes and media type, refused past `max`
    /// bytes without reading further.
    pub async fn manifest(
        &self,
        repository: &str,
        reference: &str,
        accept: &[&str],
        max: u64,
    ) -> Result<(Vec<u8>, Option<String>), Error> {
        let url = self.url(&format!("v2/{repository}/manifests/{reference}"))?;
        let mut headers = HeaderMap::new();
        headers.insert(
            ACCEPT,
            accept
                .join(", ")
                .parse()
                .expect("media types are header values"),
        );
        let resp = self.get(&url, repository, headers).await?;
        let media_type = resp
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|v| v.split(';').next().unwrap_or(v).trim().to_string());
        let body = read_bounded(resp, max, &url, "max_manifest_size").await?;
        Ok((body, media_type))
    }

    /// A blob from byte `from` on: the response (stream its body) and the offset it really
    /// starts at (0 when the registry ignored the range).
    pub async fn blob(
        &self,
        repository: &str,
        digest: &str,
        from: u64,
    ) -> Result<(reqwest::Response, u64), Error> {
        let url = self.url(&format!("v2/{repository}/blobs/{digest}"))?;
        let mut headers = HeaderMap::new();
        if from > 0 {
            headers.insert(
                RANGE,
                format!("bytes={from}-")
                    .parse()
                    .expect("a range is a header value"),
            );
        }
        let resp = self.get(&url, repository, headers).await?;
        let start = if resp.status() == StatusCode::PARTIAL_CONTENT {
            from
        } else {
            0
        };
        Ok((resp, start))
    }

    fn url(&self, path: &str) -> Result<Url, Error> {
        let mut url = self
            .base
            .join(path)
            .map_err(|e| Error::refused(format!("{}{path}: {e}", self.base)))?;
        if let Some(ns) = &self.namespace {
            url.query_pairs_mut().append_pair("ns", ns);
        }
        Ok(url)
    }

    /// GET with the current authorization; a 401 is answered once (token or Basic), then the
    /// request is made again. Non-success statuses become errors carrying the registry's
    /// message (read up to [`ERROR_BODY_MAX`]).
    async fn get(
        &self,
        url: &Url,
        repository: &str,
        headers: HeaderMap,
    ) -> Result<reqwest::Response, Error> {
        let mut answered = false;
        loop {
            let auth = self.auth.lock().await.clone();
            let mut req = self.http.get(url.clone()).headers(headers.clone());
            req = match &auth {
                Auth::None => req,
                Auth::Basic => {
                    let (u, p) = self
                        .credentials
                        .as_ref()
                        .expect("Basic only with credentials");
                    req.basic_auth(u, Some(p))
                }
                Auth::Bearer(t) => req.bearer_auth(t),
            };
            let resp = req.send().await.map_err(|e| Error::transport(url, e))?;
            let status = resp.status();
            if status.is_success() {
                return Ok(resp);
            }
            if status == StatusCode::UNAUTHORIZED && !answered {
                answered = true;
                let challenge = resp
                    .headers()
                    .get(reqwest::header::WWW_AUTHENTICATE)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string);
                drop(resp);
                let Some(challenge) = challenge else {
                    return Err(Error::refused(format!(
                        "{}: HTTP 401 Unauthorized without a WWW-Authenticate challenge",
                        strip(url)
                    )));
                };
                let next = self.answer(&challenge, repository).await?;
                *self.auth.lock().await = next;
                continue;
            }
            let message = error_message(resp).await;
            let transient = status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS;
            let hint = if status == StatusCode::UNAUTHORIZED && self.credentials.is_none() {
                " (the registry wants credentials: username/password or auth_file)"
            } else {
                ""
            };
            return Err(Error {
                transient,
                message: format!("{}: HTTP {status}{message}{hint}", strip(url)),
            });
        }
    }

    /// The authorization that answers `challenge`.
    async fn answer(&self, challenge: &str, repository: &str) -> Result<Auth, Error> {
        let (scheme, params) = parse_challenge(challenge).ok_or_else(|| {
            Error::refused(format!(
                "registry {}: unreadable WWW-Authenticate challenge {challenge:?}",
                self.base
            ))
        })?;
        if scheme.eq_ignore_ascii_case("basic") {
            return match self.credentials {
                Some(_) => Ok(Auth::Basic),
                None => Err(Error::refused(format!(
                    "registry {}: HTTP 401 Unauthorized (Basic authentication: set username/password or auth_file)",
                    self.base
                ))),
            };
        }
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err(Error::refused(format!(
                "registry {}: unsupported authentication scheme {scheme:?}",
                self.base
            )));
        }
        let param = |name: &str| {
            params
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_str())
        };
        let realm = param("realm").ok_or_else(|| {
            Error::refused(format!(
                "registry {}: a Bearer challenge without a realm",
                self.base
            ))
        })?;
        let mut url = Url::parse(realm).map_err(|e| {
            Error::refused(format!(
                "registry {}: token realm {realm:?} is not a URL: {e}",
                self.base
            ))
        })?;
        check_realm(&self.base, &url, self.credentials.is_some()).map_err(Error::refused)?;
        let scope = param("scope")
            .map(str::to_string)
            .unwrap_or_else(|| format!("repository:{repository}:pull"));
        {
            let mut q = url.query_pairs_mut();
            if let Some(service) = param("service") {
                q.append_pair("service", service);
            }
            q.append_pair("scope", &scope);
        }
        let mut req = self.http.get(url.clone());
        if let Some((u, p)) = &self.credentials {
            req = req.basic_auth(u, Some(p));
        }
        let resp = req.send().await.map_err(|e| Error::transport(&url, e))?;
        let status = resp.status();
        if !status.is_success() {
            let message = error_message(resp).await;
            return Err(Error {
                transient: status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS,
                message: format!("token request to {}: HTTP {status}{message}", strip(&url)),
            });
        }
        let body = read_bounded(resp, TOKEN_MAX, &url, "the token size limit").await?;
        let doc: serde_json::Value = serde_json::from_slice(&body).map_err(|e| {
            Error::refused(format!("token response of {}: not JSON: {e}", strip(&url)))
        })?;
        let token = ["token", "access_token"]
            .iter()
            .find_map(|k| doc.get(*k).and_then(|v| v.as_str()))
            .filter(|t| !t.is_empty())
            .ok_or_else(|| {
                Error::refused(format!(
                    "token response of {}: no \"token\" or \"access_token\"",
                    strip(&url)
                ))
            })?;
        Ok(Auth::Bearer(token.to_string()))
    }
}

/// Reads a whole body, refusing it as soon as it is known to exceed `max` (announced length
/// first, then while reading).
async fn read_bounded(
    resp: reqwest::Response,
    max: u64,
    url: &Url,
    limit: &str,
) -> Result<Vec<u8>, Error> {
    let too_big = |n: u64| {
        Error::refused(format!(
            "{}: the response is {n} bytes or more, over the limit of {max} ({limit})",
            strip(url)
        ))
    };
    if let Some(n) = resp
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
    {
        if n > max {
            return Err(too_big(n));
        }
    }
    let mut out = Vec::new();
    let mut stream = resp.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| Error::transport(url, e))?;
        if (out.len() + chunk.len()) as u64 > max {
            return Err(too_big((out.len() + chunk.len()) as u64));
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

/// ": <the registry's message>" from an error response (its first [`ERROR_BODY_MAX`] bytes;
/// the distribution spec's `{"errors": [{"code", "message"}]}` when it is that), or "".
async fn error_message(resp: reqwest::Response) -> String {
    let mut body = Vec::new();
    let mut stream = resp.bytes_stream();
    while let Some(Ok(chunk)) = stream.next().await {
        let room = ERROR_BODY_MAX as usize - body.len();
        body.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if body.len() >= ERROR_BODY_MAX as usize {
            break;
        }
    }
    if let Ok(doc) = serde_json::from_slice::<serde_json::Value>(&body) {
        if let Some(errors) = doc.get("errors").and_then(|e| e.as_array()) {
            let parts: Vec<String> = errors
                .iter()
                .map(|e| {
                    let code = e.get("code").and_then(|c| c.as_str()).unwrap_or("");
                    let msg = e.get("message").and_then(|c| c.as_str()).unwrap_or("");
                    format!("{code} {msg}").trim().to_string()
                })
                .filter(|s| !s.is_empty())
                .collect();
            if !parts.is_empty() {
                return format!(": {}", parts.join("; "));
            }
        }
    }
    let text = String::from_utf8_lossy(&body);
    let line = text.lines().next().unwrap_or("").trim();
    if line.is_empty() || line.starts_with('<') {
        String::new()
    } else {
        format!(": {}", line.chars().take(200).collect::<String>())
    }
}

/// `Scheme k="v", k2=v2` → (scheme, params).
fn parse_challenge(text: &str) -> Option<(String, Vec<(String, String)>)> {
    let text = text.trim();
    let (scheme, rest) = text.split_once(' ').unwrap_or((text, ""));
    if scheme.is_empty() {
        return None;
    }
    let mut params = Vec::new();
    let mut chars = rest.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| *c == ',' || c.is_whitespace()) {
            chars.next();
        }
        let mut key = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' {
                break;
            }
            key.push(c);
            chars.next();
        }
        if key.is_empty() {
            break;
        }
        chars.next()?; // '='
        let mut value = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            loop {
                match chars.next()? {
                    '"' => break,
                    '\\' => value.push(chars.next()?),
                    c => value.push(c),
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c == ',' {
                    break;
                }
                value.push(c);
                chars.next();
            }
        }
        params.push((key.trim().to_string(), value.trim().to_string()));
    }
    Some((scheme.to_string(), params))
}

/// The site of a host name: its last two labels (an IP address is its own site).
fn site(host: &url::Host<&str>) -> String {
    match host {
        url::Host::Domain(d) => {
            let labels: Vec<&str> = d.trim_end_matches('.').rsplitn(3, '.').collect();
            match labels.as_slice() {
                [tld, name, ..] => format!("{name}.{tld}").to_ascii_lowercase(),
                _ => d.to_ascii_lowercase(),
            }
        }
        other => other.to_string(),
    }
}

/// Whether a token realm may be asked (with the credentials, when `credentials`).
fn check_realm(registry: &Url, realm: &Url, credentials: bool) -> Result<(), String> {
    if !matches!(realm.scheme(), "http" | "https") {
        return Err(format!(
            "registry {registry}: token realm {} is not HTTP(S); refusing it",
            strip(realm)
        ));
    }
    if !credentials {
        return Ok(());
    }
    if realm.scheme() == "http" && registry.scheme() == "https" {
        return Err(format!(
            "registry {registry}: token realm {} is plain HTTP; refusing to send credentials in clear text",
            strip(realm)
        ));
    }
    let (Some(r), Some(a)) = (registry.host(), realm.host()) else {
        return Err(format!(
            "registry {registry}: token realm {} has no host",
            strip(realm)
        ));
    };
    if r.to_string().eq_ignore_ascii_case(&a.to_string()) || site(&r) == site(&a) {
        return Ok(());
    }
    Err(format!(
        "registry {registry}: token realm {} is on another site ({}); refusing to send this registry's credentials there",
        strip(realm),
        a
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges_parse() {
        let (s, p) = parse_challenge(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/busybox:pull""#,
        )
        .unwrap();
        assert_eq!(s, "Bearer");
        assert_eq!(
            p[0],
            ("realm".into(), "https://auth.docker.io/token".into())
        );
        assert_eq!(p[2].1, "repository:library/busybox:pull");
        let (s, p) = parse_challenge("Basic realm=\"x, \\\"y\\\"\" , charset=UTF-8").unwrap();
        assert_eq!(s, "Basic");
        assert_eq!(p[0].1, "x, \"y\"");
        assert_eq!(p[1], ("charset".into(), "UTF-8".into()));
        assert!(parse_challenge("").is_none());
        assert!(parse_challenge("Bearer realm=\"unterminated").is_none());
    }

    #[test]
    fn credentials_go_only_to_the_registrys_site() {
        let u = |s: &str| Url::parse(s).unwrap();
        let hub = u("https://registry-1.docker.io/");
        assert!(check_realm(&hub, &u("https://auth.docker.io/token"), true).is_ok());
        let e = check_realm(&hub, &u("https://evil.example/token"), true).unwrap_err();
        assert!(
            e.contains("another site") && e.contains("evil.example"),
            "{e}"
        );
        let e = check_realm(&hub, &u("http://auth.docker.io/token"), true).unwrap_err();
        assert!(e.contains("clear text"), "{e}");
        // Anonymous token requests carry nothing to leak.
        assert!(check_realm(&hub, &u("https://evil.example/token"), false).is_ok());
        assert!(check_realm(&hub, &u("file:///etc/passwd"), false).is_err());
        let local = u("http://127.0.0.1:5000/");
        assert!(check_realm(&local, &u("http://127.0.0.1:5001/token"), true).is_ok());
        assert!(check_realm(&local, &u("http://127.0.0.2:5001/token"), true).is_err());
        let gl = u("https://registry.gitlab.com/");
        assert!(check_realm(&gl, &u("https://gitlab.com/jwt/auth"), true).is_ok());
    }
}
