//! `os-release` and `extension-release` files (os-release(5)): `KEY=VALUE` lines, values
//! optionally quoted, and the compatibility rule systemd-sysext applies between the two.

use std::collections::BTreeMap;

use crate::Error;

/// The fields of an os-release style file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Release(BTreeMap<String, String>);

impl Release {
    /// Parses `KEY=VALUE` lines; `#` comments and blank lines are skipped, one level of single
    /// or double quotes is removed and backslash escapes inside double quotes are honoured.
    /// Lines without `=` are ignored, as os-release(5) tells readers to.
    pub fn parse(text: &str) -> Release {
        let mut map = BTreeMap::new();
        for line in text.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let Some((key, value)) = line.split_once('=') else {
                continue;
            };
            map.insert(key.trim().to_owned(), unquote(value.trim()));
        }
        Release(map)
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.0
            .get(key)
            .map(String::as_str)
            .filter(|v| !v.is_empty())
    }
}

fn unquote(v: &str) -> String {
    let bytes = v.as_bytes();
    if bytes.len() >= 2 && bytes[0] == bytes[bytes.len() - 1] && matches!(bytes[0], b'"' | b'\'') {
        let inner = &v[1..v.len() - 1];
        if bytes[0] == b'\'' {
            return inner.to_owned();
        }
        let mut out = String::with_capacity(inner.len());
        let mut chars = inner.chars();
        while let Some(c) = chars.next() {
            if c == '\\' {
                if let Some(n) = chars.next() {
                    out.push(n);
                }
            } else {
                out.push(c);
            }
        }
        return out;
    }
    v.to_owned()
}

/// Whether extension `name` (its `extension-release`) fits the running OS (its `os-release`).
///
/// systemd-sysext's rule: `ID` must match (or be `_any`); then `SYSEXT_LEVEL` must match when
/// the extension has one, else `VERSION_ID` must. Keelson builds extensions for one OS version,
/// so an extension built for another version fits only when the signed repository lists it
/// for this one (`listed_for_os`). `ARCHITECTURE`, when present, must be `x86-64`.
pub fn check(os: &Release, ext: &Release, name: &str, listed_for_os: bool) -> Result<(), Error> {
    let bad = |why: String| Error::Incompatible {
        name: name.to_owned(),
        why,
    };
    let os_id = os.get("ID").unwrap_or("linux");
    match ext.get("ID") {
        None => return Err(bad("its extension-release has no ID".into())),
        Some("_any") => {}
        Some(id) if id == os_id => {}
        Some(id) => return Err(bad(format!("it is for ID={id}, this OS is ID={os_id}"))),
    }
    if let Some(arch) = ext.get("ARCHITECTURE") {
        if arch != "x86-64" && arch != "_any" {
            return Err(bad(format!(
                "it is for ARCHITECTURE={arch}, this node is x86-64"
            )));
        }
    }
    if let Some(level) = ext.get("SYSEXT_LEVEL") {
        return match os.get("SYSEXT_LEVEL") {
            Some(os_level) if os_level == level => Ok(()),
            Some(os_level) => Err(bad(format!(
                "it needs SYSEXT_LEVEL={level}, this OS has SYSEXT_LEVEL={os_level}"
            ))),
            None => Err(bad(format!(
                "it needs SYSEXT_LEVEL={level}, this OS declares no SYSEXT_LEVEL"
            ))),
        };
    }
    let os_version = os.get("VERSION_ID").unwrap_or("");
    match ext.get("VERSION_ID") {
        None if ext.get("ID") == Some("_any") => Ok(()),
        None => Err(bad("its extension-release has neither SYSEXT_LEVEL nor VERSION_ID".into())),
        Some(v) if v == os_version => Ok(()),
        Some(_) if listed_for_os => Ok(()),
        Some(v) => Err(bad(format!(
            "it was built for version {v}, this OS is {os_version}, and the update repository does not list it for {os_version}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os() -> Release {
        Release::parse("NAME=\"Keelson\"\nID=keelson\nVERSION_ID=\"0.2.0\"\n")
    }

    #[test]
    fn parses_quotes_comments_and_escapes() {
        let r = Release::parse(
            "# comment\n\nA=plain\nB=\"dq \\\"x\\\" \\\\\"\nC='sq $x'\nnot a pair\nD=\n",
        );
        assert_eq!(r.get("A"), Some("plain"));
        assert_eq!(r.get("B"), Some("dq \"x\" \\"));
        assert_eq!(r.get("C"), Some("sq $x"));
        assert_eq!(r.get("D"), None);
    }

    #[test]
    fn same_version_fits() {
        let ext = Release::parse("ID=keelson\nVERSION_ID=0.2.0\nARCHITECTURE=x86-64\n");
        check(&os(), &ext, "etcd", false).unwrap();
    }

    #[test]
    fn other_version_fits_only_when_listed() {
        let ext = Release::parse("ID=keelson\nVERSION_ID=0.1.0\n");
        let e = check(&os(), &ext, "etcd", false).unwrap_err().to_string();
        assert_eq!(
            e,
            "extension etcd does not fit this OS: it was built for version 0.1.0, this OS is 0.2.0, and the update repository does not list it for 0.2.0"
        );
        check(&os(), &ext, "etcd", true).unwrap();
    }

    #[test]
    fn other_id_and_arch_refused() {
        let e = check(
            &os(),
            &Release::parse("ID=fedora\nVERSION_ID=0.2.0"),
            "x",
            true,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("it is for ID=fedora, this OS is ID=keelson"),
            "{e}"
        );
        let e = check(
            &os(),
            &Release::parse("ID=keelson\nVERSION_ID=0.2.0\nARCHITECTURE=arm64"),
            "x",
            false,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("ARCHITECTURE=arm64"), "{e}");
        assert!(check(&os(), &Release::parse("VERSION_ID=0.2.0"), "x", true).is_err());
    }

    #[test]
    fn sysext_level_rules() {
        let os = Release::parse("ID=keelson\nVERSION_ID=0.2.0\nSYSEXT_LEVEL=1\n");
        check(
            &os,
            &Release::parse("ID=keelson\nSYSEXT_LEVEL=1"),
            "x",
            false,
        )
        .unwrap();
        let e = check(
            &os,
            &Release::parse("ID=keelson\nSYSEXT_LEVEL=2"),
            "x",
            true,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("SYSEXT_LEVEL=2"), "{e}");
        check(&os, &Release::parse("ID=_any"), "x", false).unwrap();
    }
}
