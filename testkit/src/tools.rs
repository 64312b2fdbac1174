//! The host tools the suite calls, read from `host-tools.txt` (compiled in).
//!
//! A line is `PROGRAM-OR-PATH PACKAGE [what calls it]`; `#` starts a comment. PACKAGE `rustup`
//! marks the toolchain, which does not come from apt.

use std::fmt;
use std::path::{Path, PathBuf};

/// The list's text, as `./dev deps` reads it.
pub const LIST: &str = include_str!("../host-tools.txt");

/// The path of the list in the source tree (for messages).
pub const LIST_PATH: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/host-tools.txt");

/// One entry of the list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tool {
    /// A program looked up in `$PATH`, or an absolute path to a file.
    pub name: &'static str,
    /// The Debian package that provides it (`rustup` for the toolchain).
    pub package: &'static str,
    /// What calls it.
    pub purpose: &'static str,
}

impl Tool {
    /// Whether this entry comes from apt (everything but the Rust toolchain).
    pub fn from_apt(&self) -> bool {
        self.package != "rustup"
    }
}

/// Every entry, in file order.
pub fn all() -> Vec<Tool> {
    LIST.lines()
        .filter_map(|line| {
            let line = line.split('#').next().unwrap_or("").trim();
            let mut words = line.split_whitespace();
            let name = words.next()?;
            let package = words.next()?;
            let rest = line[line.find(package).map_or(line.len(), |i| i + package.len())..].trim();
            Some(Tool {
                name,
                package,
                purpose: rest,
            })
        })
        .collect()
}

/// The entry for `name`, if listed.
pub fn find(name: &str) -> Option<Tool> {
    all().into_iter().find(|t| t.name == name)
}

/// Why a tool could not be resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Missing {
    /// Listed, but absent from this machine.
    NotInstalled { name: String, package: String },
    /// Not in `host-tools.txt` at all: a test calls something the list does not know.
    NotListed { name: String },
}

impl fmt::Display for Missing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Missing::NotInstalled { name, package } if package == "rustup" => write!(
                f,
                "`{name}` not found in PATH: install Rust with rustup (https://rustup.rs)"
            ),
            Missing::NotInstalled { name, package } => write!(
                f,
                "`{name}` not found: install the Debian package `{package}` (`./dev deps` installs every tool the suite needs)"
            ),
            Missing::NotListed { name } => write!(
                f,
                "`{name}` is not in {LIST_PATH}: add it with the Debian package that provides it"
            ),
        }
    }
}

impl std::error::Error for Missing {}

/// Resolves a listed tool: a program through `$PATH`, an absolute path as itself.
pub fn resolve(name: &str) -> Result<PathBuf, Missing> {
    let tool = find(name).ok_or_else(|| Missing::NotListed {
        name: name.to_string(),
    })?;
    locate(tool.name).ok_or_else(|| Missing::NotInstalled {
        name: tool.name.to_string(),
        package: tool.package.to_string(),
    })
}

/// [`resolve`], panicking with the message: for tests, where a missing tool is a failure.
pub fn path(name: &str) -> PathBuf {
    resolve(name).unwrap_or_else(|e| panic!("{e}"))
}

/// A `std::process::Command` for a listed program, failing the test if it is missing.
pub fn command(name: &str) -> std::process::Command {
    std::process::Command::new(path(name))
}

/// `bash -c script` in a private mount namespace (`unshare --mount --propagation private`)
/// with `root` prepared for `chroot`: `$R` names it, and its /proc, /sys and /dev are mounted
/// first. The mounts vanish with the namespace, whatever the script does.
pub fn chroot_shell(root: &Path, script: &str) -> std::process::Command {
    let script = format!(
        "set -eu\nR='{}'\nmount -t proc proc \"$R/proc\"\nmount --rbind /sys \"$R/sys\"\nmount --rbind /dev \"$R/dev\"\n{script}",
        root.display()
    );
    let mut c = command("unshare");
    c.args([
        "--mount",
        "--propagation",
        "private",
        "--",
        "/bin/bash",
        "-c",
    ])
    .arg(script);
    c
}

fn locate(name: &str) -> Option<PathBuf> {
    if name.starts_with('/') {
        return Path::new(name).exists().then(|| PathBuf::from(name));
    }
    let dirs = std::env::var_os("PATH").unwrap_or_default();
    // Root's PATH always holds the sbin directories; a user's may not (nft, mkfs.*, dhclient).
    let extra = ["/usr/sbin", "/sbin"].map(PathBuf::from);
    std::env::split_paths(&dirs)
        .chain(extra)
        .map(|d| d.join(name))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    p.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_list_parses_and_names_a_package_for_every_entry() {
        let all = all();
        assert!(all.len() > 30, "{all:?}");
        for t in &all {
            assert!(!t.package.is_empty() && !t.purpose.is_empty(), "{t:?}");
        }
        let qemu = find("qemu-system-x86_64").unwrap();
        assert_eq!(qemu.package, "qemu-system-x86");
        assert!(!find("cargo").unwrap().from_apt());
    }

    #[test]
    fn errors_name_the_tool_and_the_package() {
        let err = Missing::NotInstalled {
            name: "dnsmasq".into(),
            package: "dnsmasq-base".into(),
        };
        assert!(err.to_string().contains("`dnsmasq-base`"), "{err}");
        let err = resolve("no-such-tool-keelson").unwrap_err();
        assert!(err.to_string().contains("host-tools.txt"), "{err}");
    }

    /// Every program that a source file of the workspace starts by a literal name is in the
    /// list, so the list cannot fall behind the code.
    #[test]
    fn every_program_the_sources_run_is_listed() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        let mut unlisted = Vec::new();
        for dir in [
            "sysd",
            "init",
            "keelctl",
            "image-build",
            "qemu-tests",
            "common",
            "testkit",
        ] {
            walk(&root.join(dir), &mut |file, text| {
                for program in started_programs(text) {
                    if find(&program).is_none() {
                        unlisted.push(format!("{}: {program}", file.display()));
                    }
                }
            });
        }
        assert!(
            unlisted.is_empty(),
            "programs run by the sources but missing from {LIST_PATH}:\n{}",
            unlisted.join("\n")
        );
    }

    /// Literal program names in `Command::new("x")` and in the `run(&["x", ...])` /
    /// `tools::command("x")` idioms of the tests.
    fn started_programs(text: &str) -> Vec<String> {
        let mut out = Vec::new();
        let code = text.lines().filter(|l| !l.trim_start().starts_with("//"));
        for line in code {
            for pat in ["Command::new(\"", "tools::command(\"", "tools::path(\""] {
                for (i, _) in line.match_indices(pat) {
                    let rest = &line[i + pat.len()..];
                    if let Some(end) = rest.find('"') {
                        out.push(rest[..end].to_string());
                    }
                }
            }
        }
        out
    }

    fn walk(dir: &Path, f: &mut dyn FnMut(&Path, &str)) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() && p.file_name().is_some_and(|n| n != "target") {
                walk(&p, f);
            } else if p.extension().is_some_and(|x| x == "rs") {
                if let Ok(text) = std::fs::read_to_string(&p) {
                    f(&p, &text);
                }
            }
        }
    }
}
