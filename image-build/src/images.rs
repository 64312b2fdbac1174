//! Service images: root file systems made of pinned Debian packages, for sysd to run services
//! from, at `/usr/lib/keelson/images/<name>/` in the verified root.
//!
//! Each package's data archive is streamed out of `dpkg-deb --fsys-tarfile` and written by our
//! own tar reader, so every mode is the one in the package (never the builder's umask) and the
//! merged-/usr layout is applied on the way: `bin`, `sbin`, `lib` and `lib64` are symlinks into
//! `usr/` (created first, as on a bookworm system) and entries under them land in `usr/`.
//! Documentation, manual pages and translations are left out. No maintainer script runs; what
//! they would do and a container needs is done here, deterministically: busybox's applet links
//! (from the pinned binary's own `--list-full`), `/etc/passwd`, `/etc/group`, `/etc/shells`,
//! `/etc/nsswitch.conf`, and empty `/etc/hosts`, `/etc/resolv.conf`, `/etc/hostname` for sysd or
//! a service to bind-mount over.

use std::collections::BTreeMap;
use std::io::{BufReader, Read};
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

use crate::config::User;

/// Where images live in the root.
pub const IMAGES_DIR: &str = "usr/lib/keelson/images";

/// Merged-/usr links every image starts with.
const USRMERGE: &[(&str, &str)] = &[
    ("bin", "usr/bin"),
    ("lib", "usr/lib"),
    ("lib64", "usr/lib64"),
    ("sbin", "usr/sbin"),
];

/// Directories every image has (mount points for the container runtime and sysd's tmpfs,
/// root's home), with their modes; created if no package made them.
const SKELETON: &[(&str, u32)] = &[
    ("dev", 0o755),
    ("etc", 0o755),
    ("home", 0o755),
    ("proc", 0o555),
    ("root", 0o700),
    ("run", 0o755),
    ("sys", 0o555),
    ("tmp", 0o1777),
    ("usr", 0o755),
    ("usr/bin", 0o755),
    ("usr/lib", 0o755),
    ("usr/lib64", 0o755),
    ("usr/sbin", 0o755),
    ("var", 0o755),
    ("var/tmp", 0o1777),
];

/// Package content an image does not need: documentation, manual pages, translations, lintian
/// overrides, initramfs hooks, and glibc's iconv converter modules (gconv: 8 MiB, loaded only by
/// iconv_open for charsets beyond UTF-8/ASCII, which no service image here uses). Matched as
/// path prefixes (whole components) after the merged-/usr mapping.
const DROPPED: &[&str] = &[
    "usr/lib/x86_64-linux-gnu/gconv",
    "usr/share/doc",
    "usr/share/doc-base",
    "usr/share/gtk-doc",
    "usr/share/info",
    "usr/share/initramfs-tools",
    "usr/share/lintian",
    "usr/share/man",
    "usr/share/bug",
];

/// Whether a (mapped, relative) path of a package is left out of images.
pub fn dropped(path: &str) -> bool {
    let under = |prefix: &str| path == prefix || path.starts_with(&format!("{prefix}/"));
    if DROPPED.iter().any(|p| under(p)) {
        return true;
    }
    // Translations: keep only the C locale.
    if let Some(rest) = path.strip_prefix("usr/share/locale/") {
        let lang = rest.split('/').next().unwrap_or("");
        return !(lang == "C" || lang.starts_with("C."));
    }
    false
}

/// Applies the merged-/usr layout to a path from a package (`bin/sh` → `usr/bin/sh`).
pub fn usrmerge(path: &str) -> String {
    let first = path.split('/').next().unwrap_or("");
    if USRMERGE.iter().any(|(link, _)| *link == first) {
        format!("usr/{path}")
    } else {
        path.to_owned()
    }
}

/// One entry of a tar archive.
#[derive(Debug, PartialEq, Eq)]
pub enum TarKind {
    File(Vec<u8>),
    Dir,
    Symlink(String),
    Hardlink(String),
}

#[derive(Debug, PartialEq, Eq)]
pub struct TarEntry {
    /// Relative path without `./` or a trailing slash.
    pub path: String,
    /// Permission bits (with setuid/setgid/sticky).
    pub mode: u32,
    pub kind: TarKind,
}

fn tar_number(field: &[u8]) -> Result<u64> {
    if field.first().is_some_and(|b| b & 0x80 != 0) {
        // GNU base-256 for large values.
        let mut v: u64 = u64::from(field[0] & 0x7f);
        for b in &field[1..] {
            v = v.checked_shl(8).context("tar number too large")? | u64::from(*b);
        }
        return Ok(v);
    }
    let text: String = field
        .iter()
        .take_while(|b| **b != 0)
        .map(|b| *b as char)
        .collect();
    let text = text.trim();
    if text.is_empty() {
        return Ok(0);
    }
    u64::from_str_radix(text, 8).with_context(|| format!("bad tar number {text:?}"))
}

fn tar_string(field: &[u8]) -> Result<String> {
    let end = field.iter().position(|b| *b == 0).unwrap_or(field.len());
    String::from_utf8(field[..end].to_vec()).context("tar name is not UTF-8")
}

fn clean_path(raw: &str) -> Result<String> {
    let mut parts = Vec::new();
    for c in Path::new(raw).components() {
        match c {
            Component::Normal(p) => parts.push(p.to_str().context("path is not UTF-8")?),
            Component::CurDir | Component::RootDir => {}
            Component::ParentDir | Component::Prefix(_) => bail!("unsafe path {raw:?} in archive"),
        }
    }
    Ok(parts.join("/"))
}

/// Reads a tar stream (ustar, GNU long names, pax path/linkpath), calling `f` for each entry.
pub fn read_tar(mut r: impl Read, mut f: impl FnMut(TarEntry) -> Result<()>) -> Result<()> {
    let mut long_name: Option<String> = None;
    let mut long_link: Option<String> = None;
    let mut header = [0u8; 512];
    loop {
        if let Err(e) = r.read_exact(&mut header) {
            bail!("truncated tar archive: {e}");
        }
        if header.iter().all(|b| *b == 0) {
            return Ok(());
        }
        let stored = tar_number(&header[148..156])?;
        let sum: u64 = header
            .iter()
            .enumerate()
            .map(|(i, b)| {
                if (148..156).contains(&i) {
                    32
                } else {
                    u64::from(*b)
                }
            })
            .sum();
        if stored != sum {
            bail!("tar header checksum mismatch");
        }
        let size = tar_number(&header[124..136])?;
        let mut data = vec![0u8; usize::try_from(size)?];
        r.read_exact(&mut data).context("truncated tar entry")?;
        let pad = (512 - (size % 512)) % 512;
        std::io::copy(&mut (&mut r).take(pad), &mut std::io::sink())?;
        let flag = header[156];
        match flag {
            b'L' => {
                long_name = Some(tar_string(&data)?);
                continue;
            }
            b'K' => {
                long_link = Some(tar_string(&data)?);
                continue;
            }
            b'x' => {
                for (key, value) in pax_records(&data)? {
                    match key.as_str() {
                        "path" => long_name = Some(value),
                        "linkpath" => long_link = Some(value),
                        _ => {}
                    }
                }
                continue;
            }
            b'g' => continue,
            _ => {}
        }
        let name = match long_name.take() {
            Some(n) => n,
            None => {
                let name = tar_string(&header[0..100])?;
                let prefix = if &header[257..263] == b"ustar\0" {
                    tar_string(&header[345..500])?
                } else {
                    String::new()
                };
                if prefix.is_empty() {
                    name
                } else {
                    format!("{prefix}/{name}")
                }
            }
        };
        let link = match long_link.take() {
            Some(l) => l,
            None => tar_string(&header[157..257])?,
        };
        let path = clean_path(&name)?;
        let mode = u32::try_from(tar_number(&header[100..108])? & 0o7777)?;
        let kind = match flag {
            b'0' | 0 | b'7' => TarKind::File(data),
            b'5' => TarKind::Dir,
            b'2' => TarKind::Symlink(link),
            b'1' => TarKind::Hardlink(clean_path(&link)?),
            other => bail!(
                "{path}: unsupported tar entry type {:?} (devices and fifos do not belong in a package)",
                other as char
            ),
        };
        if path.is_empty() {
            continue;
        }
        f(TarEntry { path, mode, kind })?;
    }
}

fn pax_records(data: &[u8]) -> Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    let mut rest = data;
    while !rest.is_empty() {
        let sp = rest
            .iter()
            .position(|b| *b == b' ')
            .context("bad pax record")?;
        let len: usize = std::str::from_utf8(&rest[..sp])?.parse()?;
        if len <= sp + 1 || len > rest.len() {
            bail!("bad pax record length");
        }
        let record = std::str::from_utf8(&rest[sp + 1..len - 1])?;
        if let Some((k, v)) = record.split_once('=') {
            out.push((k.to_owned(), v.to_owned()));
        }
        rest = &rest[len..];
    }
    Ok(out)
}

fn set_mode(path: &Path, mode: u32) -> Result<()> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {}", path.display()))
}

/// Creates the missing parents of `rel` under `root` as real directories (0755); a parent that
/// is a symlink or a file is refused, so nothing is ever written outside `root`.
fn make_parents(root: &Path, rel: &str) -> Result<()> {
    let mut acc = root.to_owned();
    let parts: Vec<&str> = rel.split('/').collect();
    for part in &parts[..parts.len().saturating_sub(1)] {
        acc.push(part);
        match std::fs::symlink_metadata(&acc) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => bail!(
                "{rel}: its parent {} is not a directory in the image",
                acc.strip_prefix(root).unwrap_or(&acc).display()
            ),
            Err(_) => {
                std::fs::create_dir(&acc)?;
                set_mode(&acc, 0o755)?;
            }
        }
    }
    Ok(())
}

/// An image's staging directory while it is being assembled.
pub struct Stage {
    pub root: PathBuf,
    /// Which package wrote each non-directory path, to name conflicts.
    owners: BTreeMap<String, String>,
}

impl Stage {
    /// Creates `root` with the merged-/usr links.
    pub fn new(root: &Path) -> Result<Stage> {
        std::fs::create_dir_all(root)?;
        set_mode(root, 0o755)?;
        for (link, target) in USRMERGE {
            make_parents(root, target)?;
            let t = root.join(target);
            std::fs::create_dir(&t)?;
            set_mode(&t, 0o755)?;
            symlink(target, root.join(link))?;
        }
        Ok(Stage {
            root: root.to_owned(),
            owners: BTreeMap::new(),
        })
    }

    /// Writes one archive entry of `package`.
    pub fn add(&mut self, package: &str, e: TarEntry) -> Result<()> {
        let rel = usrmerge(&e.path);
        if dropped(&rel) {
            return Ok(());
        }
        make_parents(&self.root, &rel)?;
        let dst = self.root.join(&rel);
        let existing = std::fs::symlink_metadata(&dst).ok();
        if let TarKind::Dir = e.kind {
            match existing {
                Some(m) if m.is_dir() => {}
                Some(_) => {
                    bail!("{package}: /{rel} is a directory, but another package made it a file")
                }
                None => std::fs::create_dir(&dst)?,
            }
            return set_mode(&dst, e.mode);
        }
        if existing.is_some() {
            let other = self
                .owners
                .get(&rel)
                .map_or("the image skeleton", String::as_str);
            bail!("/{rel} is shipped by both {other} and {package}");
        }
        match e.kind {
            TarKind::File(data) => {
                std::fs::write(&dst, data)?;
                set_mode(&dst, e.mode)?;
            }
            TarKind::Symlink(target) => symlink(&target, &dst)?,
            TarKind::Hardlink(target) => {
                let src = self.root.join(usrmerge(&target));
                std::fs::hard_link(&src, &dst)
                    .with_context(|| format!("{package}: hard link /{rel} to /{target}"))?;
            }
            TarKind::Dir => unreachable!(),
        }
        self.owners.insert(rel, package.to_owned());
        Ok(())
    }

    /// Unpacks a `.deb`'s data archive.
    pub fn unpack_deb(&mut self, package: &str, deb: &Path) -> Result<()> {
        let mut child = Command::new("dpkg-deb")
            .arg("--fsys-tarfile")
            .arg(deb)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("running dpkg-deb (package dpkg)")?;
        let stdout = child.stdout.take().context("dpkg-deb stdout")?;
        let result = read_tar(BufReader::new(stdout), |e| self.add(package, e));
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!(
                "dpkg-deb --fsys-tarfile {} failed: {}",
                deb.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        result.with_context(|| format!("unpacking {package} ({})", deb.display()))
    }

    /// Creates what every image has and packages did not: skeleton directories, busybox applet
    /// links, and the /etc files. Returns the number of applet links made.
    pub fn finish(&mut self, users: &[User]) -> Result<usize> {
        for (dir, mode) in SKELETON {
            let p = self.root.join(dir);
            if std::fs::symlink_metadata(&p).is_err() {
                make_parents(&self.root, dir)?;
                std::fs::create_dir(&p)?;
                set_mode(&p, *mode)?;
            }
        }
        // Debian's base-files link; programs write pid files to /var/run.
        let var_run = self.root.join("var/run");
        if std::fs::symlink_metadata(&var_run).is_err() {
            symlink("../run", &var_run)?;
        }
        let links = self.busybox_links()?;
        let has_sh = self.root.join("usr/bin/sh").exists();
        let (passwd, group) = passwd_group(users);
        let mut etc = vec![
            ("passwd", passwd),
            ("group", group),
            ("nsswitch.conf", NSSWITCH.to_owned()),
            ("hosts", String::new()),
            ("resolv.conf", String::new()),
            ("hostname", String::new()),
        ];
        if has_sh {
            etc.push(("shells", "/bin/sh\n".to_owned()));
        }
        for (name, text) in etc {
            let p = self.root.join("etc").join(name);
            if std::fs::symlink_metadata(&p).is_ok() {
                std::fs::remove_file(&p)?;
            }
            std::fs::write(&p, text)?;
            set_mode(&p, 0o644)?;
        }
        Ok(links)
    }

    /// If the image has busybox, links its applets (`busybox --list-full` of the pinned
    /// binary) to it, where no package put a real program.
    fn busybox_links(&mut self) -> Result<usize> {
        let busybox = self.root.join("usr/bin/busybox");
        if !busybox.is_file() {
            return Ok(0);
        }
        let out = crate::util::run(Command::new(&busybox).arg("--list-full"))
            .context("listing busybox applets")?;
        let links = applet_links(&String::from_utf8_lossy(&out.stdout));
        let mut made = 0;
        for (path, target) in links {
            let dst = self.root.join(&path);
            if std::fs::symlink_metadata(&dst).is_ok() {
                continue;
            }
            make_parents(&self.root, &path)?;
            symlink(&target, &dst)?;
            self.owners.insert(path, "busybox applets".into());
            made += 1;
        }
        Ok(made)
    }
}

/// Applet links from `busybox --list-full` output (`bin/sh`, `usr/sbin/ntpd`, ...): merged
/// /usr applied, each a relative symlink to `usr/bin/busybox`; sorted, without duplicates.
pub fn applet_links(list_full: &str) -> Vec<(String, String)> {
    let mut out: BTreeMap<String, String> = BTreeMap::new();
    for line in list_full.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let Ok(path) = clean_path(line) else {
            continue;
        };
        let path = usrmerge(&path);
        // `linuxrc` (busybox as an initrd's init) has no use in a container.
        if path == "usr/bin/busybox" || !path.contains('/') {
            continue;
        }
        out.insert(path.clone(), relative_target(&path, "usr/bin/busybox"));
    }
    out.into_iter().collect()
}

/// The relative symlink target from `link` to `target` (both relative to the image root).
fn relative_target(link: &str, target: &str) -> String {
    let from: Vec<&str> = link.split('/').collect();
    let from = &from[..from.len() - 1];
    let to: Vec<&str> = target.split('/').collect();
    let common = from.iter().zip(&to).take_while(|(a, b)| a == b).count();
    let mut parts = vec![".."; from.len() - common];
    parts.extend(&to[common..]);
    parts.join("/")
}

/// glibc's name services from files only (and DNS for hosts); musl and busybox ignore it.
const NSSWITCH: &str = "passwd: files\ngroup: files\nshadow: files\nhosts: files dns\nnetworks: files\nprotocols: files\nservices: files\n";

/// An image's /etc/passwd and /etc/group: root, the config's users (by uid), nobody.
pub fn passwd_group(users: &[User]) -> (String, String) {
    let mut passwd = String::from("root:x:0:0:root:/root:/bin/sh\n");
    let mut group = String::from("root:x:0:\n");
    let mut sorted: Vec<&User> = users.iter().collect();
    sorted.sort_by_key(|u| u.uid);
    for u in sorted {
        let gid = u.gid.unwrap_or(u.uid);
        passwd.push_str(&format!(
            "{n}:x:{uid}:{gid}:{n}:{home}:{shell}\n",
            n = u.name,
            uid = u.uid,
            home = u.home,
            shell = u.shell
        ));
        group.push_str(&format!("{}:x:{gid}:\n", u.name));
    }
    passwd.push_str("nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n");
    group.push_str("nogroup:x:65534:\n");
    (passwd, group)
}

/// Resolves `path` (absolute, inside the image) to where it is in `root`, following the
/// image's own symlinks as the container would (absolute ones from the image root); components
/// that do not exist are appended as they are. `None` on a symlink loop.
pub fn resolve_in(root: &Path, path: &str) -> Option<PathBuf> {
    let mut todo: Vec<String> = path
        .split('/')
        .filter(|c| !c.is_empty())
        .rev()
        .map(str::to_owned)
        .collect();
    let mut done: Vec<String> = Vec::new();
    let mut hops = 0;
    while let Some(c) = todo.pop() {
        match c.as_str() {
            "." => continue,
            ".." => {
                done.pop();
                continue;
            }
            _ => {}
        }
        let here = root.join(done.join("/")).join(&c);
        match std::fs::read_link(&here) {
            Ok(target) => {
                hops += 1;
                if hops > 40 {
                    return None;
                }
                let t = target.to_string_lossy().into_owned();
                if t.starts_with('/') {
                    done.clear();
                }
                todo.extend(
                    t.split('/')
                        .filter(|c| !c.is_empty())
                        .rev()
                        .map(str::to_owned),
                );
            }
            Err(_) => done.push(c),
        }
    }
    Some(root.join(done.join("/")))
}

/// Makes a mount point at `path` in the image rooted at `root` if nothing is there: a
/// directory, or an empty file when `file`. Returns whether it created one.
pub fn mount_point(root: &Path, path: &str, file: bool) -> Result<bool> {
    let host = resolve_in(root, path).with_context(|| format!("{path}: symlink loop"))?;
    if std::fs::symlink_metadata(&host).is_ok() {
        return Ok(false);
    }
    let rel = host
        .strip_prefix(root)
        .context("mount point outside the image")?
        .to_str()
        .context("path is not UTF-8")?
        .to_owned();
    make_parents(root, &rel)?;
    if file {
        std::fs::write(&host, b"")?;
        set_mode(&host, 0o644)?;
    } else {
        std::fs::create_dir(&host)?;
        set_mode(&host, 0o755)?;
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(name: &str, flag: u8, mode: u32, size: usize, link: &str) -> [u8; 512] {
        let mut h = [0u8; 512];
        h[..name.len()].copy_from_slice(name.as_bytes());
        h[100..107].copy_from_slice(format!("{mode:07o}").as_bytes());
        h[124..135].copy_from_slice(format!("{size:011o}").as_bytes());
        h[156] = flag;
        h[157..157 + link.len()].copy_from_slice(link.as_bytes());
        h[257..265].copy_from_slice(b"ustar  \0");
        h[148..156].copy_from_slice(b"        ");
        let sum: u32 = h.iter().map(|b| u32::from(*b)).sum();
        h[148..155].copy_from_slice(format!("{sum:06o}\0").as_bytes());
        h
    }

    fn entry(out: &mut Vec<u8>, name: &str, flag: u8, mode: u32, data: &[u8], link: &str) {
        out.extend_from_slice(&header(name, flag, mode, data.len(), link));
        out.extend_from_slice(data);
        out.resize(out.len().div_ceil(512) * 512, 0);
    }

    /// A small archive like a Debian data.tar: `./`, directories, a long GNU name, links.
    fn archive() -> Vec<u8> {
        let long = format!("./usr/share/{}/x", "d".repeat(120));
        let mut t = Vec::new();
        entry(&mut t, "./", b'5', 0o755, b"", "");
        entry(&mut t, "./bin/", b'5', 0o755, b"", "");
        entry(&mut t, "./bin/busybox", b'0', 0o4755, b"ELF", "");
        entry(&mut t, "./usr/", b'5', 0o755, b"", "");
        entry(
            &mut t,
            "./usr/share/doc/busybox/copyright",
            b'0',
            0o644,
            b"c",
            "",
        );
        entry(
            &mut t,
            "./usr/share/locale/de/LC_MESSAGES/x.mo",
            b'0',
            0o644,
            b"m",
            "",
        );
        entry(
            &mut t,
            "./usr/share/locale/C.UTF-8/x",
            b'0',
            0o644,
            b"k",
            "",
        );
        entry(
            &mut t,
            "././@LongLink",
            b'L',
            0o644,
            format!("{long}\0").as_bytes(),
            "",
        );
        entry(&mut t, "./usr/share/ddd", b'0', 0o600, b"long", "");
        entry(
            &mut t,
            "./lib64/ld.so",
            b'2',
            0o777,
            b"",
            "/lib/x86_64-linux-gnu/ld.so",
        );
        entry(&mut t, "./usr/bin/bb2", b'1', 0o4755, b"", "./bin/busybox");
        t.extend_from_slice(&[0u8; 1024]);
        t
    }

    #[test]
    fn reads_tar_entries() {
        let mut seen = Vec::new();
        read_tar(&archive()[..], |e| {
            seen.push(e);
            Ok(())
        })
        .unwrap();
        assert_eq!(seen[0].path, "bin");
        assert_eq!(
            seen[1],
            TarEntry {
                path: "bin/busybox".into(),
                mode: 0o4755,
                kind: TarKind::File(b"ELF".to_vec())
            }
        );
        let long = seen
            .iter()
            .find(|e| e.path.ends_with("/x") && e.mode == 0o600);
        assert!(long.is_some_and(|e| e.path.len() > 100));
        assert!(seen
            .iter()
            .any(|e| e.kind == TarKind::Hardlink("bin/busybox".into())));
        let mut bad = archive();
        bad[600] ^= 1;
        assert!(read_tar(&bad[..], |_| Ok(())).is_err());
        assert!(read_tar(&archive()[..700], |_| Ok(())).is_err());
    }

    #[test]
    fn unpacks_with_merged_usr_and_without_docs() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("img");
        let mut stage = Stage::new(&root).unwrap();
        read_tar(&archive()[..], |e| stage.add("busybox-static", e)).unwrap();
        let meta = std::fs::symlink_metadata(root.join("usr/bin/busybox")).unwrap();
        assert_eq!(meta.permissions().mode() & 0o7777, 0o4755);
        assert_eq!(
            std::fs::read_link(root.join("bin")).unwrap(),
            Path::new("usr/bin")
        );
        assert_eq!(
            std::fs::read_link(root.join("usr/lib64/ld.so")).unwrap(),
            Path::new("/lib/x86_64-linux-gnu/ld.so")
        );
        assert!(!root.join("usr/share/doc").exists());
        assert!(!root.join("usr/share/locale/de").exists());
        assert!(root.join("usr/share/locale/C.UTF-8/x").exists());
        assert_eq!(std::fs::read(root.join("usr/bin/bb2")).unwrap(), b"ELF");
        // A second package shipping the same file is a conflict that names both.
        let err = read_tar(&archive()[..], |e| stage.add("other", e))
            .unwrap_err()
            .to_string();
        assert!(err.contains("both busybox-static and other"), "{err}");
    }

    #[test]
    fn refuses_to_write_through_symlinks() {
        let d = tempfile::tempdir().unwrap();
        let mut stage = Stage::new(&d.path().join("img")).unwrap();
        stage
            .add(
                "evil",
                TarEntry {
                    path: "usr/x".into(),
                    mode: 0o777,
                    kind: TarKind::Symlink("/tmp".into()),
                },
            )
            .unwrap();
        let e = TarEntry {
            path: "usr/x/y".into(),
            mode: 0o644,
            kind: TarKind::File(vec![]),
        };
        assert!(stage.add("evil", e).is_err());
        assert!(read_tar(&header("../x", b'0', 0o644, 0, "")[..], |_| Ok(())).is_err());
    }

    #[test]
    fn busybox_applet_links() {
        let links = applet_links(
            "bin/sh\nbin/busybox\nusr/bin/awk\nsbin/ifconfig\nusr/sbin/ntpd\nbin/sh\n\nlinuxrc\n",
        );
        assert_eq!(
            links,
            [
                ("usr/bin/awk".to_owned(), "busybox".to_owned()),
                ("usr/bin/sh".to_owned(), "busybox".to_owned()),
                ("usr/sbin/ifconfig".to_owned(), "../bin/busybox".to_owned()),
                ("usr/sbin/ntpd".to_owned(), "../bin/busybox".to_owned()),
            ]
        );
    }

    #[test]
    fn relative_targets() {
        assert_eq!(
            relative_target("usr/local/bin/x", "usr/bin/busybox"),
            "../../bin/busybox"
        );
        assert_eq!(relative_target("x", "usr/bin/busybox"), "usr/bin/busybox");
        assert_eq!(
            relative_target("etc/x", "usr/bin/busybox"),
            "../usr/bin/busybox"
        );
    }

    #[test]
    fn passwd_and_group() {
        let (p, g) = passwd_group(&[]);
        assert_eq!(
            p,
            "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
        );
        assert_eq!(g, "root:x:0:\nnogroup:x:65534:\n");
        let users = [
            User {
                name: "www".into(),
                uid: 33,
                gid: None,
                home: "/var/www".into(),
                shell: "/usr/sbin/nologin".into(),
            },
            User {
                name: "ntp".into(),
                uid: 20,
                gid: Some(21),
                home: "/nonexistent".into(),
                shell: "/bin/sh".into(),
            },
        ];
        let (p, g) = passwd_group(&users);
        let lines: Vec<&str> = p.lines().collect();
        assert_eq!(lines[1], "ntp:x:20:21:ntp:/nonexistent:/bin/sh");
        assert_eq!(lines[2], "www:x:33:33:www:/var/www:/usr/sbin/nologin");
        assert_eq!(g, "root:x:0:\nntp:x:21:\nwww:x:33:\nnogroup:x:65534:\n");
    }

    #[test]
    fn finish_makes_skeleton_etc_and_mount_points() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("img");
        let mut stage = Stage::new(&root).unwrap();
        assert_eq!(stage.finish(&[]).unwrap(), 0);
        let mode = |p: &str| {
            std::fs::metadata(root.join(p))
                .unwrap()
                .permissions()
                .mode()
                & 0o7777
        };
        assert_eq!(mode("tmp"), 0o1777);
        assert_eq!(mode("root"), 0o700);
        assert_eq!(mode("etc/passwd"), 0o644);
        assert!(root.join("etc/resolv.conf").is_file());
        assert!(!root.join("etc/shells").exists());
        assert_eq!(
            std::fs::read_link(root.join("var/run")).unwrap(),
            Path::new("../run")
        );
        // Mount points resolve through the image's own links.
        assert!(mount_point(&root, "/bin/keelctl", true).unwrap());
        assert!(root.join("usr/bin/keelctl").is_file());
        assert!(!mount_point(&root, "/usr/bin/keelctl", true).unwrap());
        assert!(mount_point(&root, "/srv/www", false).unwrap());
        assert!(root.join("srv/www").is_dir());
        assert_eq!(
            resolve_in(&root, "/lib/../bin/x"),
            Some(root.join("usr/bin/x"))
        );
    }
}
