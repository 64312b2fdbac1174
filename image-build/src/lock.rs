//! The lock file (`configs/<name>.lock`): every Debian package an image is built from, pinned by
//! exact version and SHA-256, plus the `source_date_epoch` every timestamp in the image uses.
//!
//! `image-build lock CONFIG` resolves the config's packages against the apt index
//! (`apt-cache show`), following a kernel metapackage to the real image package, and each service
//! image's packages to their dependency closure (Pre-Depends and Depends; virtual packages through
//! `apt-cache showpkg`), and rewrites the lock. `build` never resolves: it takes exactly what the
//! lock says.

use std::cmp::Ordering;
use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::config::{parse_toml, ExtensionConfig, Image, ImageConfig};

/// A lock file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Lock {
    /// Seconds since the epoch used for every timestamp in the image (SOURCE_DATE_EPOCH).
    pub source_date_epoch: u64,
    /// The pinned packages: kernel and bootloader first, then the images' packages by name.
    #[serde(rename = "package")]
    pub packages: Vec<Pin>,
}

/// One pinned package.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pin {
    /// What asked for it: the config's name (e.g. `linux-image-cloud-amd64`), or for a
    /// dependency of an image package the name in the Depends field that pulled it in.
    pub requested: String,
    /// The package actually used (e.g. `linux-image-6.1.0-56-cloud-amd64`).
    pub name: String,
    pub version: String,
    pub sha256: String,
    /// The service images (`[images.NAME]`) this package is unpacked into; empty for the
    /// kernel and the bootloader.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub images: Vec<String>,
}

/// A definition whose packages a lock pins: an OS config (boot packages and service images) or
/// an extension definition (service images only).
pub trait Pinned {
    /// The definition file.
    fn path(&self) -> &Path;
    /// The packages that are not part of a service image (kernel, bootloader), in a stable order.
    fn boot_packages(&self) -> Vec<String>;
    /// The service images, each resolved with its dependency closure.
    fn images(&self) -> &BTreeMap<String, Image>;
}

impl Pinned for ImageConfig {
    fn path(&self) -> &Path {
        &self.path
    }
    fn boot_packages(&self) -> Vec<String> {
        vec![self.kernel.package.clone(), self.bootloader.package.clone()]
    }
    fn images(&self) -> &BTreeMap<String, Image> {
        &self.images
    }
}

impl Pinned for ExtensionConfig {
    fn path(&self) -> &Path {
        &self.path
    }
    fn boot_packages(&self) -> Vec<String> {
        Vec::new()
    }
    fn images(&self) -> &BTreeMap<String, Image> {
        &self.images
    }
}

/// Where the lock file of a definition lives: beside it, `vm.toml` → `vm.lock`.
pub fn lock_path(cfg: &dyn Pinned) -> PathBuf {
    cfg.path().with_extension("lock")
}

impl Lock {
    /// Reads the lock of `cfg`, with a clear error when it is missing or lacks a package the
    /// config asks for.
    pub fn load(cfg: &dyn Pinned) -> Result<Lock> {
        let path = lock_path(cfg);
        let config = cfg.path().display();
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!(
                "no lock file {}: run `image-build lock {config}` to pin the packages",
                path.display(),
            )
        })?;
        let lock: Lock = parse_toml(&path, &text)?;
        let missing = |what: &str, user: String| {
            anyhow!(
                "{}: {what} is used by {user} but not pinned: run `image-build lock {config}`",
                path.display(),
            )
        };
        for req in cfg.boot_packages() {
            if lock.pin(&req).is_err() {
                return Err(missing(&req, config.to_string()));
            }
        }
        for (image, spec) in cfg.images() {
            if let Some(pin) = lock
                .image_packages(image)
                .find(|p| spec.exclude.contains(&p.name) || spec.exclude.contains(&p.requested))
            {
                bail!(
                    "{}: {} is pinned for images.{image} but {config} excludes it: run `image-build lock {config}`",
                    path.display(),
                    pin.name
                );
            }
            for pkg in &spec.packages {
                if !lock
                    .image_packages(image)
                    .any(|p| p.requested == *pkg || p.name == *pkg)
                {
                    return Err(missing(pkg, format!("images.{image} of {config}")));
                }
            }
        }
        Ok(lock)
    }

    /// The pin for a boot package (kernel, bootloader) the config requested.
    pub fn pin(&self, requested: &str) -> Result<&Pin> {
        self.packages
            .iter()
            .find(|p| p.images.is_empty() && p.requested == requested)
            .with_context(|| format!("{requested} is not in the lock file"))
    }

    /// The packages unpacked into one service image, in lock (name) order.
    pub fn image_packages<'a>(&'a self, image: &'a str) -> impl Iterator<Item = &'a Pin> + 'a {
        self.packages
            .iter()
            .filter(move |p| p.images.iter().any(|i| i == image))
    }

    /// Writes the lock with a header saying how to refresh it.
    pub fn save(&self, path: &Path, config: &Path) -> Result<()> {
        let body = toml::to_string_pretty(self)?;
        let text = format!(
            "# Pinned inputs of {}. Generated by `image-build lock {}`; do not edit by hand.\n{body}",
            config.display(),
            config.display()
        );
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
    }
}

/// A version relation in a dependency: `(>= 2.34)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rel {
    Lt,
    Le,
    Eq,
    Ge,
    Gt,
}

/// One alternative of a dependency: a package name with an optional version constraint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dep {
    pub name: String,
    pub constraint: Option<(Rel, String)>,
}

impl std::fmt::Display for Dep {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name)?;
        if let Some((rel, v)) = &self.constraint {
            let op = match rel {
                Rel::Lt => "<<",
                Rel::Le => "<=",
                Rel::Eq => "=",
                Rel::Ge => ">=",
                Rel::Gt => ">>",
            };
            write!(f, " ({op} {v})")?;
        }
        Ok(())
    }
}

/// A dependency: alternatives (`a | b`), the first satisfiable one is used.
pub type DepGroup = Vec<Dep>;

/// Parses a Depends-style field: `libc6 (>= 2.34), libfoo1 | libbar1, python3:any`.
pub fn parse_depends(value: &str) -> Result<Vec<DepGroup>> {
    let mut groups = Vec::new();
    for group in value.split(',').map(str::trim).filter(|g| !g.is_empty()) {
        let mut alts = Vec::new();
        for alt in group.split('|').map(str::trim) {
            let (name_part, constraint) = match alt.split_once('(') {
                Some((n, rest)) => {
                    let inner = rest
                        .split_once(')')
                        .map(|(i, _)| i.trim())
                        .with_context(|| format!("unbalanced parenthesis in {alt:?}"))?;
                    let op_len = inner
                        .find(|c: char| !matches!(c, '<' | '>' | '='))
                        .unwrap_or(inner.len());
                    let rel = match &inner[..op_len] {
                        "<<" => Rel::Lt,
                        "<=" | "<" => Rel::Le,
                        "=" => Rel::Eq,
                        ">=" | ">" => Rel::Ge,
                        ">>" => Rel::Gt,
                        op => bail!("unknown version relation {op:?} in {alt:?}"),
                    };
                    (n, Some((rel, inner[op_len..].trim().to_owned())))
                }
                None => (alt, None),
            };
            // Architecture qualifiers (`python3:any`) do not matter for one architecture.
            let name = name_part.trim().split(':').next().unwrap_or("").to_owned();
            if name.is_empty() {
                bail!("empty package name in {group:?}");
            }
            alts.push(Dep { name, constraint });
        }
        groups.push(alts);
    }
    Ok(groups)
}

/// The fields of an `apt-cache show` stanza that locking needs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stanza {
    pub package: String,
    pub version: String,
    pub sha256: String,
    pub depends: Vec<DepGroup>,
    pub pre_depends: Vec<DepGroup>,
    /// Virtual packages it provides, with the version of a versioned provide.
    pub provides: Vec<(String, Option<String>)>,
}

/// Parses the first stanza of `apt-cache show` output.
pub fn parse_stanza(text: &str) -> Result<Stanza> {
    let mut s = Stanza::default();
    for line in text.lines() {
        if line.is_empty() && !s.package.is_empty() {
            break;
        }
        let Some((key, value)) = line.split_once(": ") else {
            continue;
        };
        match key {
            "Package" => s.package = value.to_owned(),
            "Version" => s.version = value.to_owned(),
            "SHA256" => s.sha256 = value.to_owned(),
            "Depends" => s.depends = parse_depends(value)?,
            "Pre-Depends" => s.pre_depends = parse_depends(value)?,
            "Provides" => {
                s.provides = parse_depends(value)?
                    .into_iter()
                    .flatten()
                    .map(|d| (d.name, d.constraint.map(|(_, v)| v)))
                    .collect()
            }
            _ => {}
        }
    }
    Ok(s)
}

/// The real packages `apt-cache showpkg` lists under "Reverse Provides:".
pub fn parse_reverse_provides(text: &str) -> Vec<String> {
    let mut out: Vec<String> = text
        .lines()
        .skip_while(|l| !l.starts_with("Reverse Provides:"))
        .skip(1)
        .take_while(|l| !l.trim().is_empty() && !l.contains(": "))
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect();
    out.sort();
    out.dedup();
    out
}

/// Compares two Debian versions (`[epoch:]upstream[-revision]`) as dpkg does.
pub fn cmp_version(a: &str, b: &str) -> Ordering {
    fn split(v: &str) -> (u64, &str, &str) {
        let (epoch, rest) = match v.split_once(':') {
            Some((e, r)) if !e.is_empty() && e.bytes().all(|c| c.is_ascii_digit()) => {
                (e.parse().unwrap_or(0), r)
            }
            _ => (0, v),
        };
        match rest.rsplit_once('-') {
            Some((u, r)) => (epoch, u, r),
            None => (epoch, rest, ""),
        }
    }
    fn order(c: Option<u8>) -> i32 {
        match c {
            None => 0,
            Some(c) if c.is_ascii_digit() => 0,
            Some(c) if c.is_ascii_alphabetic() => i32::from(c),
            Some(b'~') => -1,
            Some(c) => i32::from(c) + 256,
        }
    }
    fn verrevcmp(a: &[u8], b: &[u8]) -> Ordering {
        let (mut i, mut j) = (0, 0);
        let digit = |s: &[u8], k: usize| s.get(k).is_some_and(u8::is_ascii_digit);
        while i < a.len() || j < b.len() {
            while (i < a.len() && !digit(a, i)) || (j < b.len() && !digit(b, j)) {
                let (ac, bc) = (order(a.get(i).copied()), order(b.get(j).copied()));
                if ac != bc {
                    return ac.cmp(&bc);
                }
                i += 1;
                j += 1;
            }
            while a.get(i) == Some(&b'0') {
                i += 1;
            }
            while b.get(j) == Some(&b'0') {
                j += 1;
            }
            let mut first_diff = Ordering::Equal;
            while digit(a, i) && digit(b, j) {
                if first_diff == Ordering::Equal {
                    first_diff = a[i].cmp(&b[j]);
                }
                i += 1;
                j += 1;
            }
            if digit(a, i) {
                return Ordering::Greater;
            }
            if digit(b, j) {
                return Ordering::Less;
            }
            if first_diff != Ordering::Equal {
                return first_diff;
            }
        }
        Ordering::Equal
    }
    let (ea, ua, ra) = split(a);
    let (eb, ub, rb) = split(b);
    ea.cmp(&eb)
        .then_with(|| verrevcmp(ua.as_bytes(), ub.as_bytes()))
        .then_with(|| verrevcmp(ra.as_bytes(), rb.as_bytes()))
}

/// Whether `version` satisfies a dependency's constraint.
pub fn satisfies(version: &str, constraint: &Option<(Rel, String)>) -> bool {
    let Some((rel, want)) = constraint else {
        return true;
    };
    let o = cmp_version(version, want);
    match rel {
        Rel::Lt => o == Ordering::Less,
        Rel::Le => o != Ordering::Greater,
        Rel::Eq => o == Ordering::Equal,
        Rel::Ge => o != Ordering::Less,
        Rel::Gt => o == Ordering::Greater,
    }
}

/// What dependency resolution asks of the package index (apt's, or a fixture in tests).
pub trait Index {
    /// The candidate version of a real package, or `None` when no real package has the name.
    fn show(&mut self, name: &str) -> Result<Option<Stanza>>;
    /// Real packages that provide `name`.
    fn providers(&mut self, name: &str) -> Result<Vec<String>>;
}

/// The host's apt index through `apt-cache`, memoised.
#[derive(Default)]
pub struct AptCache {
    shown: BTreeMap<String, Option<Stanza>>,
}

impl Index for AptCache {
    fn show(&mut self, name: &str) -> Result<Option<Stanza>> {
        if let Some(s) = self.shown.get(name) {
            return Ok(s.clone());
        }
        let out = Command::new("apt-cache")
            .args(["show", "--no-all-versions", name])
            .output()
            .context("running apt-cache (package apt)")?;
        // A purely virtual package prints nothing; an unknown one fails.
        let stanza = parse_stanza(&String::from_utf8_lossy(&out.stdout))
            .with_context(|| format!("apt-cache show {name}"))?;
        let found = (out.status.success() && !stanza.package.is_empty()).then_some(stanza);
        self.shown.insert(name.to_owned(), found.clone());
        Ok(found)
    }

    fn providers(&mut self, name: &str) -> Result<Vec<String>> {
        let out = Command::new("apt-cache")
            .args(["showpkg", name])
            .output()
            .context("running apt-cache (package apt)")?;
        Ok(parse_reverse_provides(&String::from_utf8_lossy(
            &out.stdout,
        )))
    }
}

fn apt_show(index: &mut dyn Index, spec: &str) -> Result<Stanza> {
    index.show(spec)?.with_context(|| {
        format!("apt-cache knows no package {spec}; run `apt-get update` and check the name")
    })
}

/// Resolves one requested boot package to a pin; a `linux-image-*` metapackage is followed to
/// the versioned image package it depends on.
pub fn resolve(index: &mut dyn Index, requested: &str) -> Result<Pin> {
    let mut stanza = apt_show(index, requested)?;
    if requested.starts_with("linux-image-") {
        if let Some(real) = stanza
            .depends
            .iter()
            .filter_map(|g| g.first())
            .find(|d| d.name.starts_with("linux-image-"))
            .map(|d| d.name.clone())
        {
            stanza = apt_show(index, &real)?;
        }
    }
    pin_of(requested, stanza, Vec::new())
}

fn pin_of(requested: &str, stanza: Stanza, images: Vec<String>) -> Result<Pin> {
    if stanza.sha256.len() != 64 {
        bail!("apt index has no SHA256 for {}", stanza.package);
    }
    Ok(Pin {
        requested: requested.to_owned(),
        name: stanza.package,
        version: stanza.version,
        sha256: stanza.sha256,
        images,
    })
}

/// The dependency closure (Pre-Depends and Depends) of `roots`: for each dependency the first
/// alternative that is already chosen or that the index can satisfy (a real package whose
/// candidate meets the version constraint, else the first provider of a virtual package by
/// name). A dependency with an alternative named in `exclude` counts as satisfied and is not
/// followed (packages only maintainer scripts need, which image-build never runs); every name
/// in `exclude` must be met this way. Returns `(requested as, stanza)` in discovery order:
/// roots first, then breadth-first.
pub fn closure(
    index: &mut dyn Index,
    roots: &[String],
    exclude: &[String],
) -> Result<Vec<(String, Stanza)>> {
    let mut excluded_seen = std::collections::BTreeSet::new();
    let mut chosen: Vec<(String, Stanza)> = Vec::new();
    let mut queue = VecDeque::new();
    let find = |chosen: &[(String, Stanza)], name: &str| {
        chosen.iter().position(|(_, s)| s.package == name)
    };
    for root in roots {
        let stanza = apt_show(index, root)?;
        if find(&chosen, &stanza.package).is_none() {
            queue.push_back(chosen.len());
            chosen.push((root.clone(), stanza));
        }
    }
    while let Some(i) = queue.pop_front() {
        let parent = chosen[i].1.clone();
        for group in parent.pre_depends.iter().chain(&parent.depends) {
            let satisfied = group.iter().any(|dep| {
                chosen.iter().any(|(_, s)| {
                    (s.package == dep.name && satisfies(&s.version, &dep.constraint))
                        || s.provides.iter().any(|(p, v)| {
                            p == &dep.name
                                && (dep.constraint.is_none()
                                    || v.as_ref().is_some_and(|v| satisfies(v, &dep.constraint)))
                        })
                })
            });
            if satisfied {
                continue;
            }
            if let Some(dep) = group.iter().find(|d| exclude.contains(&d.name)) {
                excluded_seen.insert(dep.name.clone());
                continue;
            }
            let mut picked = None;
            'alts: for dep in group {
                if let Some(s) = index.show(&dep.name)? {
                    if satisfies(&s.version, &dep.constraint) {
                        picked = Some((dep.name.clone(), s));
                        break;
                    }
                }
                for provider in index.providers(&dep.name)? {
                    if let Some(s) = index.show(&provider)? {
                        let provides = s.provides.iter().any(|(p, v)| {
                            p == &dep.name
                                && (dep.constraint.is_none()
                                    || v.as_ref().is_some_and(|v| satisfies(v, &dep.constraint)))
                        });
                        if provides {
                            picked = Some((dep.name.clone(), s));
                            break 'alts;
                        }
                    }
                }
            }
            let Some((requested, stanza)) = picked else {
                let text: Vec<String> = group.iter().map(ToString::to_string).collect();
                bail!(
                    "{} {} depends on {}, which no package in the apt index satisfies; run `apt-get update`",
                    parent.package,
                    parent.version,
                    text.join(" | ")
                );
            };
            if find(&chosen, &stanza.package).is_none() {
                queue.push_back(chosen.len());
                chosen.push((requested, stanza));
            }
        }
    }
    if let Some(unused) = exclude.iter().find(|e| !excluded_seen.contains(*e)) {
        bail!(
            "exclude: {unused} is not a dependency of the packages (or something else pulls it in as well): remove it from exclude"
        );
    }
    Ok(chosen)
}

/// Resolves every image's packages with their closure into pins, one per package (sorted by
/// name), each listing the images it goes into.
pub fn resolve_images(index: &mut dyn Index, cfg: &dyn Pinned) -> Result<Vec<Pin>> {
    let mut pins: BTreeMap<String, Pin> = BTreeMap::new();
    for (image, spec) in cfg.images() {
        let found = closure(index, &spec.packages, &spec.exclude)
            .with_context(|| format!("resolving the packages of images.{image}"))?;
        for (requested, stanza) in found {
            match pins.get_mut(&stanza.package) {
                Some(pin) => {
                    if !pin.images.contains(image) {
                        pin.images.push(image.clone());
                    }
                }
                None => {
                    let pin = pin_of(&requested, stanza, vec![image.clone()])?;
                    pins.insert(pin.name.clone(), pin);
                }
            }
        }
    }
    Ok(pins.into_values().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `apt-cache show` output for a few packages, as the bookworm index has them.
    const SHOW: &str = "\
Package: busybox-static
Version: 1:1.35.0-4+deb12u1+b1
Provides: busybox
SHA256: 1111111111111111111111111111111111111111111111111111111111111111

Package: dropbear-bin
Version: 2022.83-1+deb12u3
Provides: ssh-server
Depends: libc6 (>= 2.34), libcrypt1 (>= 1:4.1.0), libtomcrypt1 (>= 1.18.2), zlib1g (>= 1:1.1.4)
SHA256: 2222222222222222222222222222222222222222222222222222222222222222

Package: libc6
Version: 2.36-9+deb12u14
Depends: libgcc-s1
SHA256: 3333333333333333333333333333333333333333333333333333333333333333

Package: libgcc-s1
Version: 12.2.0-14+deb12u1
Provides: libgcc1 (= 1:12.2.0-14+deb12u1)
Depends: gcc-12-base (= 12.2.0-14+deb12u1), libc6 (>= 2.35)
SHA256: 4444444444444444444444444444444444444444444444444444444444444444

Package: gcc-12-base
Version: 12.2.0-14+deb12u1
SHA256: 5555555555555555555555555555555555555555555555555555555555555555

Package: libcrypt1
Version: 1:4.4.33-2
Pre-Depends: libc6 (>= 2.36)
SHA256: 6666666666666666666666666666666666666666666666666666666666666666

Package: libtomcrypt1
Version: 1.18.2-6
Depends: libc6 (>= 2.14), libgmp10 (>= 2:6.2.1+dfsg1) | libgmp-old, awk, libtommath1 (>= 1.1.0)
SHA256: 7777777777777777777777777777777777777777777777777777777777777777

Package: libtommath1
Version: 1.2.0-6+deb12u1
Depends: libc6 (>= 2.25)
SHA256: 8888888888888888888888888888888888888888888888888888888888888888

Package: libgmp-old
Version: 2:6.0-1
SHA256: 9999999999999999999999999999999999999999999999999999999999999999

Package: zlib1g
Version: 1:1.2.13.dfsg-1
Provides: libz1
Depends: libc6 (>= 2.14)
SHA256: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa

Package: mawk
Version: 1.3.4.20200120-3.1
Provides: awk
Depends: libc6 (>= 2.29)
SHA256: bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb

Package: gawk
Version: 1:5.2.1-2
Provides: awk
SHA256: cccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccc
";

    /// `apt-cache showpkg awk` (abridged).
    const SHOWPKG_AWK: &str = "\
Package: awk
Versions: 

Reverse Depends: 
  libtomcrypt1,awk
Dependencies: 
Provides: 
Reverse Provides: 
original-awk 2022-09-12-1 (= )
mawk 1.3.4.20200120-3.1 (= )
gawk 1:5.2.1-2 (= )
";

    struct Fixture {
        stanzas: Vec<Stanza>,
    }

    impl Fixture {
        fn new() -> Self {
            let stanzas = SHOW
                .split("\n\n")
                .map(|t| parse_stanza(t).unwrap())
                .collect();
            Fixture { stanzas }
        }
    }

    impl Index for Fixture {
        fn show(&mut self, name: &str) -> Result<Option<Stanza>> {
            Ok(self.stanzas.iter().find(|s| s.package == name).cloned())
        }
        fn providers(&mut self, name: &str) -> Result<Vec<String>> {
            Ok(match name {
                "awk" => parse_reverse_provides(SHOWPKG_AWK),
                _ => self
                    .stanzas
                    .iter()
                    .filter(|s| s.provides.iter().any(|(p, _)| p == name))
                    .map(|s| s.package.clone())
                    .collect(),
            })
        }
    }

    #[test]
    fn parses_first_stanza() {
        let s = parse_stanza(
            "Package: linux-image-cloud-amd64\nVersion: 6.1.192-2\nDepends: linux-image-6.1.0-56-cloud-amd64 (= 6.1.192-2), foo\nSHA256: abc\n\nPackage: other\n",
        )
        .unwrap();
        assert_eq!(s.package, "linux-image-cloud-amd64");
        let names: Vec<&str> = s.depends.iter().map(|g| g[0].name.as_str()).collect();
        assert_eq!(names, ["linux-image-6.1.0-56-cloud-amd64", "foo"]);
        assert_eq!(
            s.depends[0][0].constraint,
            Some((Rel::Eq, "6.1.192-2".into()))
        );
        assert_eq!(s.sha256, "abc");
    }

    #[test]
    fn parses_alternatives_qualifiers_and_provides() {
        let g = parse_depends("a (>= 1:2.0) | b, python3:any, c (<< 3~rc1)").unwrap();
        assert_eq!(g.len(), 3);
        assert_eq!(
            g[0][1],
            Dep {
                name: "b".into(),
                constraint: None
            }
        );
        assert_eq!(g[0][0].constraint, Some((Rel::Ge, "1:2.0".into())));
        assert_eq!(g[1][0].name, "python3");
        assert_eq!(g[2][0].constraint, Some((Rel::Lt, "3~rc1".into())));
        assert!(parse_depends("a (~= 1)").is_err());
        let s = Fixture::new();
        let gcc = s.stanzas.iter().find(|s| s.package == "libgcc-s1").unwrap();
        assert_eq!(
            gcc.provides,
            [("libgcc1".to_owned(), Some("1:12.2.0-14+deb12u1".to_owned()))]
        );
        assert_eq!(
            parse_reverse_provides(SHOWPKG_AWK),
            ["gawk", "mawk", "original-awk"]
        );
    }

    #[test]
    fn debian_version_order() {
        use Ordering::*;
        for (a, b, o) in [
            ("1.0", "1.0", Equal),
            ("1.0", "1.0-0", Equal),
            ("1:1.0", "2.0", Greater),
            ("2.36-9+deb12u14", "2.36", Greater),
            ("1.0~rc1", "1.0", Less),
            ("1.0~~", "1.0~", Less),
            ("1.2.13.dfsg-1", "1.2.13-1", Greater),
            ("2.34", "2.36-9", Less),
            ("1.10", "1.9", Greater),
            ("1.0a", "1.0", Greater),
            ("1.0+b1", "1.0", Greater),
            ("010", "10", Equal),
        ] {
            assert_eq!(cmp_version(a, b), o, "{a} vs {b}");
            assert_eq!(cmp_version(b, a), o.reverse(), "{b} vs {a}");
        }
        assert!(satisfies("2.36-9", &Some((Rel::Ge, "2.34".into()))));
        assert!(!satisfies("2.36-9", &Some((Rel::Lt, "2.36".into()))));
        assert!(satisfies("6.0", &None));
    }

    #[test]
    fn closure_follows_depends_alternatives_and_virtual_packages() {
        let mut idx = Fixture::new();
        let found = closure(
            &mut idx,
            &["busybox-static".into(), "dropbear-bin".into()],
            &[],
        )
        .unwrap();
        let names: Vec<(&str, &str)> = found
            .iter()
            .map(|(r, s)| (r.as_str(), s.package.as_str()))
            .collect();
        assert_eq!(
            names,
            [
                ("busybox-static", "busybox-static"),
                ("dropbear-bin", "dropbear-bin"),
                ("libc6", "libc6"),
                ("libcrypt1", "libcrypt1"),
                ("libtomcrypt1", "libtomcrypt1"),
                ("zlib1g", "zlib1g"),
                ("libgcc-s1", "libgcc-s1"),
                // libgmp10 is not in the index: the second alternative is taken.
                ("libgmp-old", "libgmp-old"),
                // awk is virtual: its providers by name, first that exists.
                ("awk", "gawk"),
                ("libtommath1", "libtommath1"),
                ("gcc-12-base", "gcc-12-base"),
            ]
        );
    }

    #[test]
    fn excluded_dependencies_are_not_followed() {
        let mut idx = Fixture::new();
        let found = closure(&mut idx, &["dropbear-bin".into()], &["libtomcrypt1".into()]).unwrap();
        let names: Vec<&str> = found.iter().map(|(_, s)| s.package.as_str()).collect();
        // libtomcrypt1 and what only it pulls in (gmp, awk, libtommath1) are left out.
        assert_eq!(
            names,
            [
                "dropbear-bin",
                "libc6",
                "libcrypt1",
                "zlib1g",
                "libgcc-s1",
                "gcc-12-base"
            ]
        );
        // An exclusion the closure never meets is a mistake worth naming.
        let err = closure(&mut idx, &["dropbear-bin".into()], &["perl-base".into()])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("exclude: perl-base is not a dependency"),
            "{err}"
        );
    }

    #[test]
    fn closure_reports_what_cannot_be_satisfied() {
        let mut idx = Fixture::new();
        idx.stanzas.retain(|s| s.package != "libcrypt1");
        let err = closure(&mut idx, &["dropbear-bin".into()], &[])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("dropbear-bin 2022.83-1+deb12u3 depends on libcrypt1 (>= 1:4.1.0)"),
            "{err}"
        );
        let err = closure(&mut idx, &["nope".into()], &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("no package nope"), "{err}");
        // A version constraint the candidate does not meet is not satisfied.
        let mut idx = Fixture::new();
        for s in &mut idx.stanzas {
            if s.package == "libc6" {
                s.version = "2.30-1".into();
            }
        }
        assert!(closure(&mut idx, &["dropbear-bin".into()], &[]).is_err());
    }

    #[test]
    fn lock_round_trips_with_image_packages() {
        let mut idx = Fixture::new();
        let dir = tempfile::tempdir().unwrap();
        let cfg_path = dir.path().join("t.toml");
        std::fs::write(
            &cfg_path,
            "schema = 1\nversion = \"1\"\nseed = \"s\"\n[kernel]\npackage = \"k\"\nmodules = [\"m\"]\n\
             [bootloader]\npackage = \"b\"\n[disk]\nesp_mib = 64\nroot_mib = 64\nverity_mib = 8\ndata_mib = 32\n\
             [images.base]\npackages = [\"busybox-static\"]\n\
             [images.admin]\npackages = [\"busybox-static\", \"dropbear-bin\"]\n",
        )
        .unwrap();
        let cfg = ImageConfig::load(&cfg_path).unwrap();
        let mut packages = vec![
            Pin {
                requested: "k".into(),
                name: "k-real".into(),
                version: "1".into(),
                sha256: "0".repeat(64),
                images: vec![],
            },
            Pin {
                requested: "b".into(),
                name: "b".into(),
                version: "1".into(),
                sha256: "0".repeat(64),
                images: vec![],
            },
        ];
        packages.extend(resolve_images(&mut idx, &cfg).unwrap());
        let lock = Lock {
            source_date_epoch: 1,
            packages,
        };
        let path = lock_path(&cfg);
        lock.save(&path, &cfg_path).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text.contains("images = [\n    \"admin\",\n    \"base\",\n]")
                || text.contains("images = [\"admin\", \"base\"]"),
            "{text}"
        );
        let back = Lock::load(&cfg).unwrap();
        assert_eq!(back, lock);
        assert_eq!(back.pin("k").unwrap().name, "k-real");
        let base: Vec<&str> = back
            .image_packages("base")
            .map(|p| p.name.as_str())
            .collect();
        assert_eq!(base, ["busybox-static"]);
        let admin: Vec<&str> = back
            .image_packages("admin")
            .map(|p| p.name.as_str())
            .collect();
        assert_eq!(admin.len(), 11);
        assert!(admin.windows(2).all(|w| w[0] < w[1]), "{admin:?}");

        // A package the config asks for that the lock lacks is named with the fix.
        std::fs::write(
            &cfg_path,
            std::fs::read_to_string(&cfg_path)
                .unwrap()
                .replace("\"dropbear-bin\"]", "\"dropbear-bin\", \"hello\"]"),
        )
        .unwrap();
        let cfg = ImageConfig::load(&cfg_path).unwrap();
        let err = Lock::load(&cfg).unwrap_err().to_string();
        assert!(err.contains("hello is used by images.admin"), "{err}");
        assert!(err.contains("image-build lock"), "{err}");
    }
}
