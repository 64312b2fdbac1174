//! /etc: a tmpfs rendered at every boot from the machine's identity and the read-only image, so
//! nothing in it can drift. Rendering is pure; [`apply`] writes the result.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// Where networking will write the real resolver configuration.
pub const RESOLV_CONF_TARGET: &str = "/run/keelson/resolv.conf";
/// The image's os-release.
pub const OS_RELEASE_SOURCE: &str = "/usr/lib/os-release";

/// One rendered entry of /etc.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    File {
        name: &'static str,
        content: String,
        mode: u32,
    },
    Symlink {
        name: &'static str,
        target: &'static str,
    },
}

/// Renders /etc. `os_release` is the image's /usr/lib/os-release, if readable.
pub fn render(machine_id: &str, hostname: &str, os_release: Option<&str>) -> Vec<Entry> {
    let mut entries = vec![
        Entry::File {
            name: "machine-id",
            content: format!("{machine_id}\n"),
            mode: 0o444,
        },
        Entry::File {
            name: "hostname",
            content: format!("{hostname}\n"),
            mode: 0o644,
        },
        Entry::File {
            name: "hosts",
            content: format!("127.0.0.1\tlocalhost\n::1\tlocalhost\n127.0.1.1\t{hostname}\n"),
            mode: 0o644,
        },
    ];
    if let Some(text) = os_release {
        entries.push(Entry::File {
            name: "os-release",
            content: text.to_owned(),
            mode: 0o644,
        });
    }
    entries.push(Entry::Symlink {
        name: "resolv.conf",
        target: RESOLV_CONF_TARGET,
    });
    entries
}

/// The placeholder resolv.conf until networking writes one.
pub const RESOLV_CONF_PLACEHOLDER: &str =
    "# Written by Keelson networking once it has DNS servers; none are known yet.\n";

/// Writes `entries` into `etc` and creates the placeholder resolver file under /run. Returns the
/// entries that failed, with why.
pub fn apply(etc: &Path, run_keelson: &Path, entries: &[Entry]) -> Vec<String> {
    let mut failed = Vec::new();
    let mut note = |what: &str, e: std::io::Error| failed.push(format!("{what}: {e}"));
    for entry in entries {
        match entry {
            Entry::File {
                name,
                content,
                mode,
            } => {
                let path = etc.join(name);
                let written = std::fs::write(&path, content).and_then(|()| {
                    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(*mode))
                });
                if let Err(e) = written {
                    note(&path.display().to_string(), e);
                }
            }
            Entry::Symlink { name, target } => {
                let path = etc.join(name);
                if let Err(e) = std::os::unix::fs::symlink(target, &path) {
                    note(&path.display().to_string(), e);
                }
            }
        }
    }
    let placeholder = std::fs::create_dir_all(run_keelson)
        .and_then(|()| std::fs::write(run_keelson.join("resolv.conf"), RESOLV_CONF_PLACEHOLDER));
    if let Err(e) = placeholder {
        note(&run_keelson.display().to_string(), e);
    }
    failed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_identity_files() {
        let id = "0123456789abcdef0123456789abcdef";
        let e = render(id, "keelson-01234567", Some("ID=keelson\n"));
        assert_eq!(
            e,
            vec![
                Entry::File {
                    name: "machine-id",
                    content: format!("{id}\n"),
                    mode: 0o444
                },
                Entry::File {
                    name: "hostname",
                    content: "keelson-01234567\n".into(),
                    mode: 0o644
                },
                Entry::File {
                    name: "hosts",
                    content: "127.0.0.1\tlocalhost\n::1\tlocalhost\n127.0.1.1\tkeelson-01234567\n"
                        .into(),
                    mode: 0o644
                },
                Entry::File {
                    name: "os-release",
                    content: "ID=keelson\n".into(),
                    mode: 0o644
                },
                Entry::Symlink {
                    name: "resolv.conf",
                    target: "/run/keelson/resolv.conf"
                },
            ]
        );
    }

    #[test]
    fn os_release_is_optional() {
        let e = render("0123456789abcdef0123456789abcdef", "h", None);
        assert_eq!(e.len(), 4);
        assert!(!e.iter().any(|x| matches!(
            x,
            Entry::File {
                name: "os-release",
                ..
            }
        )));
    }

    #[test]
    fn applies_into_a_directory() {
        let base = std::env::temp_dir().join(format!("keelson-etc-test-{}", std::process::id()));
        let etc = base.join("etc");
        let run = base.join("run/keelson");
        std::fs::create_dir_all(&etc).unwrap();
        let failed = apply(
            &etc,
            &run,
            &render("0123456789abcdef0123456789abcdef", "h", None),
        );
        assert!(failed.is_empty(), "{failed:?}");
        assert_eq!(
            std::fs::read_to_string(etc.join("hostname")).unwrap(),
            "h\n"
        );
        assert_eq!(
            std::fs::read_link(etc.join("resolv.conf")).unwrap(),
            Path::new(RESOLV_CONF_TARGET)
        );
        assert_eq!(
            std::fs::read_to_string(run.join("resolv.conf")).unwrap(),
            RESOLV_CONF_PLACEHOLDER
        );
        std::fs::remove_dir_all(&base).unwrap();
    }
}
