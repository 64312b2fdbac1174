//! The `#cloud-config` subset Keelson understands, parsed strictly.
//!
//! Supported keys (cloud-init's meaning): `hostname`, `fqdn`, `prefer_fqdn_over_hostname`,
//! `users` (`default` or `{name, ssh_authorized_keys}`), `ssh_authorized_keys`, `write_files`
//! (`path`, `content`, `encoding`, `permissions`, `owner`, `append`, `defer`), `ntp`
//! (`enabled`, `servers`, `pools`), `timezone`. Keys that only make sense on a general-purpose
//! distribution (`packages`, `runcmd`, `bootcmd`, `apt`, ...) and sub-keys Keelson cannot honour
//! (`users[0].sudo`) are collected into [`CloudConfig::unsupported`], which the caller reports in
//! one warning: nothing is dropped silently. A key of the wrong type is an error with its line,
//! column and key path, and fails the whole document (nothing is partially applied).
//!
//! YAML aliases are expanded by serde_yaml under its repetition limit, so a "billion laughs"
//! document is an error rather than a gigabyte of memory.

use std::collections::BTreeMap;
use std::path::{Component, PathBuf};

use base64::Engine as _;
use serde::Deserialize;
use serde_yaml::Value;

use keelson_spec::admin::check_ssh_key;

use super::Error;
pub use keelson_spec::units::check_hostname;

/// A parsed, validated `#cloud-config` document.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CloudConfig {
    /// The host name to use: `fqdn` when `prefer_fqdn_over_hostname` (or no `hostname`), else
    /// `hostname`.
    pub hostname: Option<String>,
    /// Login users and their keys (`default` is the admin container's `root`).
    pub users: Vec<User>,
    pub write_files: Vec<WriteFile>,
    /// NTP servers and pools, in the order given (`ntp.enabled: false` leaves this empty and
    /// sets [`CloudConfig::ntp_disabled`]).
    pub ntp_servers: Vec<String>,
    pub ntp_disabled: bool,
    pub timezone: Option<String>,
    /// Dotted paths of keys present but not supported, in document order.
    pub unsupported: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub name: String,
    pub ssh_authorized_keys: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteFile {
    pub path: PathBuf,
    /// Decoded content (after base64/gzip).
    pub content: Vec<u8>,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub append: bool,
}

/// The user every top-level `ssh_authorized_keys` and the `default` user map to.
pub const DEFAULT_USER: &str = "root";

const KNOWN: &[&str] = &[
    "hostname",
    "fqdn",
    "prefer_fqdn_over_hostname",
    "users",
    "ssh_authorized_keys",
    "write_files",
    "ntp",
    "timezone",
];
const USER_KEYS: &[&str] = &["name", "ssh_authorized_keys", "ssh-authorized-keys"];
const FILE_KEYS: &[&str] = &[
    "path",
    "content",
    "encoding",
    "permissions",
    "owner",
    "append",
    "defer",
];
const NTP_KEYS: &[&str] = &["enabled", "servers", "pools"];

/// The typed view (only known keys; unknown ones are listed from the untyped pass).
#[derive(Deserialize, Default)]
struct Raw {
    hostname: Option<String>,
    fqdn: Option<String>,
    prefer_fqdn_over_hostname: Option<bool>,
    #[serde(default)]
    users: Vec<RawUser>,
    #[serde(default)]
    ssh_authorized_keys: Vec<String>,
    #[serde(default)]
    write_files: Vec<RawFile>,
    ntp: Option<RawNtp>,
    timezone: Option<String>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawUser {
    Default(String),
    Full {
        name: String,
        #[serde(default, alias = "ssh-authorized-keys")]
        ssh_authorized_keys: Vec<String>,
    },
}

#[derive(Deserialize)]
struct RawFile {
    path: String,
    #[serde(default)]
    content: String,
    #[serde(default)]
    encoding: Option<String>,
    #[serde(default)]
    permissions: Option<Permissions>,
    #[serde(default)]
    owner: Option<String>,
    #[serde(default)]
    append: bool,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Permissions {
    Text(String),
    /// YAML reads an unquoted `0644` as the octal-looking integer 644 (YAML 1.2) or 420 (1.1):
    /// cloud-init's documentation quotes it; an integer is taken as written in octal digits.
    Int(u64),
}

#[derive(Deserialize)]
struct RawNtp {
    #[serde(default = "yes")]
    enabled: bool,
    #[serde(default)]
    servers: Vec<String>,
    #[serde(default)]
    pools: Vec<String>,
}

fn yes() -> bool {
    true
}

/// Parses `text` (the whole user data, `#cloud-config` line included) from `origin`.
pub fn parse(text: &str, origin: &str) -> Result<CloudConfig, Error> {
    let untyped: Value = serde_yaml::from_str(text).map_err(|e| yaml_error(origin, "", &e))?;
    let map = match untyped {
        Value::Null => return Ok(CloudConfig::default()),
        Value::Mapping(m) => m,
        other => {
            return Err(Error::Invalid(format!(
                "{origin}: #cloud-config must be a mapping of keys, found {}",
                kind(&other)
            )))
        }
    };
    let mut unsupported = Vec::new();
    for (key, value) in &map {
        let Some(key) = key.as_str() else {
            return Err(Error::Invalid(format!(
                "{origin}: #cloud-config keys must be strings, found {key:?}"
            )));
        };
        if !KNOWN.contains(&key) {
            unsupported.push(key.to_owned());
            continue;
        }
        let sub = match key {
            "users" => Some(USER_KEYS),
            "write_files" => Some(FILE_KEYS),
            _ => None,
        };
        if let (Some(allowed), Value::Sequence(items)) = (sub, value) {
            for (i, item) in items.iter().enumerate() {
                if let Value::Mapping(m) = item {
                    extra_keys(m, allowed, &format!("{key}[{i}]"), &mut unsupported);
                }
            }
        }
        if let ("ntp", Value::Mapping(m)) = (key, value) {
            extra_keys(m, NTP_KEYS, "ntp", &mut unsupported);
        }
    }

    let raw: Raw = serde_path_to_error::deserialize(serde_yaml::Deserializer::from_str(text))
        .map_err(|e| {
            let path = e.path().to_string();
            yaml_error(origin, &path, e.inner())
        })?;
    build(raw, origin, unsupported)
}

fn build(raw: Raw, origin: &str, unsupported: Vec<String>) -> Result<CloudConfig, Error> {
    let mut out = CloudConfig {
        unsupported,
        ..CloudConfig::default()
    };
    let prefer_fqdn = raw.prefer_fqdn_over_hostname.unwrap_or(false);
    if let Some(h) = &raw.hostname {
        check_hostname(h).map_err(|e| Error::Invalid(format!("{origin}: hostname: {e}")))?;
    }
    if let Some(f) = &raw.fqdn {
        check_hostname(f).map_err(|e| Error::Invalid(format!("{origin}: fqdn: {e}")))?;
    }
    out.hostname = match (raw.hostname, raw.fqdn) {
        (Some(h), Some(f)) => Some(if prefer_fqdn { f } else { h }),
        (h, f) => h.or(f),
    };

    let mut users: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut order = Vec::new();
    let mut add = |name: String, keys: Vec<String>| {
        if !users.contains_key(&name) {
            order.push(name.clone());
        }
        let entry = users.entry(name).or_default();
        for k in keys {
            if !entry.contains(&k) {
                entry.push(k);
            }
        }
    };
    for (i, key) in raw.ssh_authorized_keys.iter().enumerate() {
        check_ssh_key(key)
            .map_err(|e| Error::Invalid(format!("{origin}: ssh_authorized_keys[{i}]: {e}")))?;
    }
    add(DEFAULT_USER.to_owned(), raw.ssh_authorized_keys);
    for (i, user) in raw.users.into_iter().enumerate() {
        match user {
            RawUser::Default(s) if s == "default" => add(DEFAULT_USER.to_owned(), Vec::new()),
            RawUser::Default(s) => {
                return Err(Error::Invalid(format!(
                    "{origin}: users[{i}]: `{s}` is not a user; write `default` or \
                     {{name: ..., ssh_authorized_keys: [...]}}"
                )))
            }
            RawUser::Full {
                name,
                ssh_authorized_keys,
            } => {
                if !valid_user_name(&name) {
                    return Err(Error::Invalid(format!(
                        "{origin}: users[{i}].name: `{name}` is not a valid user name \
                         (lowercase letters, digits, `_` and `-`, at most 32, not starting \
                         with a digit or `-`)"
                    )));
                }
                for (j, key) in ssh_authorized_keys.iter().enumerate() {
                    check_ssh_key(key).map_err(|e| {
                        Error::Invalid(format!(
                            "{origin}: users[{i}].ssh_authorized_keys[{j}]: {e}"
                        ))
                    })?;
                }
                add(name, ssh_authorized_keys);
            }
        }
    }
    out.users = order
        .into_iter()
        .filter_map(|name| {
            let keys = users.remove(&name)?;
            // `root` with no keys (no key given anywhere) is not a user worth creating.
            (!(name == DEFAULT_USER && keys.is_empty())).then_some(User {
                name,
                ssh_authorized_keys: keys,
            })
        })
        .collect();

    for (i, f) in raw.write_files.into_iter().enumerate() {
        let at = format!("{origin}: write_files[{i}]");
        out.write_files
            .push(write_file(f).map_err(|e| Error::Invalid(format!("{at}: {e}")))?);
    }

    if let Some(ntp) = raw.ntp {
        if ntp.enabled {
            for (i, s) in ntp.servers.iter().chain(&ntp.pools).enumerate() {
                if check_hostname(s).is_err() && s.parse::<std::net::IpAddr>().is_err() {
                    return Err(Error::Invalid(format!(
                        "{origin}: ntp: `{s}` (entry {i}) is neither a host name nor an address"
                    )));
                }
            }
            out.ntp_servers = ntp.servers.into_iter().chain(ntp.pools).collect();
        } else {
            out.ntp_disabled = true;
        }
    }
    if let Some(tz) = raw.timezone {
        let ok = !tz.is_empty()
            && tz.split('/').all(|part| {
                !part.is_empty()
                    && part != ".."
                    && part
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || "_+-".contains(c))
            });
        if !ok {
            return Err(Error::Invalid(format!(
                "{origin}: timezone: `{tz}` is not a time zone name (like `UTC` or `Europe/Paris`)"
            )));
        }
        out.timezone = Some(tz);
    }
    Ok(out)
}

fn write_file(f: RawFile) -> Result<WriteFile, Error> {
    let path = PathBuf::from(&f.path);
    if !path.is_absolute()
        || path
            .components()
            .any(|c| matches!(c, Component::ParentDir | Component::CurDir))
    {
        return Err(Error::Invalid(format!(
            "path `{}` must be absolute, without `.` or `..`",
            f.path
        )));
    }
    let encoding = f.encoding.as_deref().unwrap_or("text/plain");
    let content = match encoding {
        "text/plain" => f.content.into_bytes(),
        "b64" | "base64" => base64(&f.content)?,
        "gz" | "gzip" => {
            return Err(Error::Invalid(format!(
            "encoding `{encoding}` needs binary content, which YAML text cannot carry; use `gz+b64`"
        )))
        }
        "gz+b64" | "gzip+base64" | "gz+base64" | "gzip+b64" => gunzip(&base64(&f.content)?)?,
        other => {
            return Err(Error::Invalid(format!(
                "unknown encoding `{other}` (text/plain, b64, gz+b64)"
            )))
        }
    };
    let mode = match f.permissions {
        None => 0o644,
        Some(Permissions::Text(s)) => {
            let digits = s.trim_start_matches("0o");
            u32::from_str_radix(digits, 8)
                .ok()
                .filter(|m| *m <= 0o7777)
                .ok_or_else(|| {
                    Error::Invalid(format!(
                        "permissions `{s}` is not an octal mode like '0644'"
                    ))
                })?
        }
        Some(Permissions::Int(n)) => u32::from_str_radix(&n.to_string(), 8)
            .ok()
            .filter(|m| *m <= 0o7777)
            .ok_or_else(|| {
                Error::Invalid(format!(
                    "permissions {n} is not an octal mode; quote it: '0{n}'"
                ))
            })?,
    };
    let (uid, gid) = match f.owner.as_deref() {
        None => (0, 0),
        Some(owner) => owner_ids(owner)?,
    };
    Ok(WriteFile {
        path,
        content,
        mode,
        uid,
        gid,
        append: f.append,
    })
}

/// `root`, `root:root` or numeric `uid[:gid]`: the host has no other users.
fn owner_ids(owner: &str) -> Result<(u32, u32), Error> {
    let id = |s: &str| match s {
        "root" => Some(0),
        n => n.parse::<u32>().ok(),
    };
    let (u, g) = owner.split_once(':').unwrap_or((owner, owner));
    match (id(u), id(g)) {
        (Some(u), Some(g)) => Ok((u, g)),
        _ => Err(Error::Invalid(format!(
            "owner `{owner}`: the host has only `root`; give numeric ids (`1000:1000`) for \
             files a container reads"
        ))),
    }
}

fn base64(s: &str) -> Result<Vec<u8>, Error> {
    let compact: String = s.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    base64::engine::general_purpose::STANDARD
        .decode(compact)
        .map_err(|e| Error::Invalid(format!("content is not valid base64: {e}")))
}

fn gunzip(data: &[u8]) -> Result<Vec<u8>, Error> {
    use std::io::Read;
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(data)
        .take(super::userdata::MAX_INFLATED as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|e| Error::Invalid(format!("content does not gunzip: {e}")))?;
    if out.len() > super::userdata::MAX_INFLATED {
        return Err(Error::Invalid(
            "content inflates beyond the user data limit".into(),
        ));
    }
    Ok(out)
}

fn extra_keys(m: &serde_yaml::Mapping, allowed: &[&str], at: &str, out: &mut Vec<String>) {
    for k in m.keys() {
        match k.as_str() {
            Some(k) if allowed.contains(&k) => {}
            Some(k) => out.push(format!("{at}.{k}")),
            None => out.push(format!("{at}.{k:?}")),
        }
    }
}

fn yaml_error(origin: &str, path: &str, e: &serde_yaml::Error) -> Error {
    let at = e
        .location()
        .map(|l| format!(":{}:{}", l.line(), l.column()))
        .unwrap_or_default();
    let key = if path.is_empty() || path == "." {
        String::new()
    } else {
        format!("{path}: ")
    };
    Error::Invalid(format!("{origin}{at}: {key}{e}"))
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "nothing",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Sequence(_) => "a list",
        Value::Mapping(_) => "a mapping",
        Value::Tagged(_) => "a tagged value",
    }
}

fn valid_user_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 32
        && !name.starts_with(|c: char| c.is_ascii_digit() || c == '-')
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A real ed25519 public key (generated for these tests).
    pub(crate) const KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAILLQlN97l7/l7fgXF9PlMnkcATyASDAzrU0bNgZfDbPW test@keelson";

    /// `parse`, its error as the report shows it (always of kind invalid).
    fn p(text: &str) -> Result<CloudConfig, String> {
        parse(text, "seed:user-data").map_err(|e| {
            assert!(matches!(e, Error::Invalid(_)), "{e:?}");
            e.to_string()
        })
    }

    #[test]
    fn full_subset() {
        let cc = p(&format!(
            r#"#cloud-config
hostname: node1
fqdn: node1.example.org
prefer_fqdn_over_hostname: true
ssh_authorized_keys:
  - {KEY}
users:
  - default
  - name: alice
    ssh_authorized_keys: ["{KEY}"]
    sudo: ALL=(ALL) NOPASSWD:ALL
    shell: /bin/bash
write_files:
  - path: /var/lib/app/config.ini
    content: |
      [main]
      debug = true
    permissions: '0600'
    owner: 1000:1000
  - path: /var/lib/app/blob
    encoding: b64
    content: aGVsbG8=
  - path: /etc/motd
    content: hi
ntp:
  servers: [10.0.0.1]
  pools: [pool.ntp.org]
timezone: Europe/Paris
packages: [nginx]
runcmd: [[echo, hi]]
"#
        ))
        .unwrap();
        assert_eq!(cc.hostname.as_deref(), Some("node1.example.org"));
        assert_eq!(
            cc.users,
            vec![
                User {
                    name: "root".into(),
                    ssh_authorized_keys: vec![KEY.into()]
                },
                User {
                    name: "alice".into(),
                    ssh_authorized_keys: vec![KEY.into()]
                },
            ]
        );
        assert_eq!(cc.write_files.len(), 3);
        let f = &cc.write_files[0];
        assert_eq!(f.path, std::path::Path::new("/var/lib/app/config.ini"));
        assert_eq!(f.content, b"[main]\ndebug = true\n");
        assert_eq!((f.mode, f.uid, f.gid), (0o600, 1000, 1000));
        assert_eq!(cc.write_files[1].content, b"hello");
        assert_eq!(cc.ntp_servers, ["10.0.0.1", "pool.ntp.org"]);
        assert_eq!(cc.timezone.as_deref(), Some("Europe/Paris"));
        assert_eq!(
            cc.unsupported,
            ["users[1].sudo", "users[1].shell", "packages", "runcmd"]
        );
    }

    #[test]
    fn empty_document_is_empty() {
        assert_eq!(p("#cloud-config\n").unwrap(), CloudConfig::default());
    }

    #[test]
    fn wrong_types_name_line_and_key() {
        let e =
            p("#cloud-config\nhostname: a\nwrite_files:\n  - path: /var/x\n    append: maybe\n")
                .unwrap_err();
        assert!(e.starts_with("seed:user-data:5:"), "{e}");
        assert!(e.contains("write_files[0].append"), "{e}");
        let e = p("#cloud-config\nssh_authorized_keys: ssh-ed25519 AAAA\n").unwrap_err();
        assert!(e.contains("ssh_authorized_keys"), "{e}");
        let e = p("#cloud-config\n- a\n- b\n").unwrap_err();
        assert!(e.contains("must be a mapping of keys, found a list"), "{e}");
        let e = p("#cloud-config\nhostname: [\n").unwrap_err();
        assert!(e.starts_with("seed:user-data:"), "{e}");
    }

    #[test]
    fn bad_values_are_named() {
        let cases = [
            ("hostname: bad_name!", "hostname: `bad_name!` is not a valid host name"),
            ("ssh_authorized_keys: [ssh-ed25519 notbase64!]", "ssh_authorized_keys[0]: the ssh-ed25519 key's base64"),
            ("ssh_authorized_keys: [hello world]", "ssh_authorized_keys[0]: `hello world` is not an ssh public key"),
            ("ssh_authorized_keys: ['ssh-rsa AAAAC3NzaC1lZDI1NTE5AAAAILLQlN97l7/l7fgXF9PlMnkcATyASDAzrU0bNgZfDbPW']", "does not hold a ssh-rsa key"),
            ("users: [{name: Alice}]", "users[0].name: `Alice` is not a valid user name"),
            ("users: [admin]", "users[0]: `admin` is not a user"),
            ("write_files: [{path: relative/x}]", "write_files[0]: path `relative/x` must be absolute"),
            ("write_files: [{path: /var/../etc/x}]", "must be absolute, without `.` or `..`"),
            ("write_files: [{path: /var/x, encoding: b64, content: '%%%'}]", "write_files[0]: content is not valid base64"),
            ("write_files: [{path: /var/x, encoding: rot13}]", "unknown encoding `rot13`"),
            ("write_files: [{path: /var/x, permissions: '0999'}]", "permissions `0999` is not an octal mode"),
            ("write_files: [{path: /var/x, owner: alice}]", "owner `alice`: the host has only `root`"),
            ("ntp: {servers: ['not a host']}", "ntp: `not a host` (entry 0) is neither"),
            ("timezone: ../../etc/passwd", "timezone: `../../etc/passwd` is not a time zone"),
        ];
        for (body, want) in cases {
            let e = p(&format!("#cloud-config\n{body}\n")).unwrap_err();
            assert!(e.contains(want), "{body}: {e}");
        }
    }

    #[test]
    fn gzip_base64_content_and_integer_permissions() {
        use std::io::Write;
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        enc.write_all(b"zipped\n").unwrap();
        let b64 = base64::engine::general_purpose::STANDARD.encode(enc.finish().unwrap());
        let cc = p(&format!(
            "#cloud-config\nwrite_files:\n  - path: /var/z\n    encoding: gz+b64\n    content: {b64}\n    permissions: 0755\n"
        ))
        .unwrap();
        assert_eq!(cc.write_files[0].content, b"zipped\n");
        assert_eq!(cc.write_files[0].mode, 0o755);
    }

    #[test]
    fn ntp_disabled_and_hostname_without_fqdn_preference() {
        let cc =
            p("#cloud-config\nhostname: a\nfqdn: a.b.c\nntp: {enabled: false, servers: [x]}\n")
                .unwrap();
        assert_eq!(cc.hostname.as_deref(), Some("a"));
        assert!(cc.ntp_disabled && cc.ntp_servers.is_empty());
    }

    #[test]
    fn yaml_bomb_is_refused() {
        let bomb = r#"#cloud-config
a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]
i: &i [*h,*h,*h,*h,*h,*h,*h,*h,*h]
"#;
        let e = p(bomb).unwrap_err();
        assert!(e.contains("repetition limit"), "{e}");
    }
}
