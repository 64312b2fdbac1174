//! The update repository's manifest (`manifest.json`, a TUF target): which versions exist, their
//! payload targets and rollout waves. Written by `image-build update add`, read by sysd's update
//! agent. Versioned wire data: lenient on unknown fields, validated explicitly by the reader.

use std::cmp::Ordering;

use serde::{Deserialize, Serialize};

/// The manifest's TUF target name.
pub const MANIFEST_TARGET: &str = "manifest.json";

/// `manifest.json`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Newest first.
    #[serde(default)]
    pub updates: Vec<Payload>,
}

impl Manifest {
    /// Checks what the node puts into file names: every version (ESP entries are
    /// `keelson_VERSION+TRIES.efi`) and every extension's name and version.
    pub fn check(&self) -> Result<(), String> {
        for p in &self.updates {
            check_version(&p.version).map_err(|e| format!("version {:?}: {e}", p.version))?;
            for x in &p.extensions {
                check_version(&x.name)
                    .and_then(|()| check_version(&x.version))
                    .map_err(|e| {
                        format!(
                            "version {}: extension {:?} {:?}: {e}",
                            p.version, x.name, x.version
                        )
                    })?;
            }
        }
        Ok(())
    }

    /// Sorts the versions newest first.
    pub fn sort(&mut self) {
        self.updates
            .sort_by(|a, b| compare_versions(&b.version, &a.version));
    }
}

/// Whether `v` may be a version (or an extension's name): 1 to 64 characters of `0-9 A-Z a-z
/// . _ ~ ^ -`, the first a letter or digit. It becomes part of file names on the ESP and in
/// the stores, so no `/`, no `..` climbing, and no `+` (the boot counter's separator in
/// `keelson_VERSION+3-0.efi`).
pub fn check_version(v: &str) -> Result<(), String> {
    let ok_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '~' | '^' | '-');
    if v.is_empty() || v.len() > 64 {
        return Err("must be 1 to 64 characters".into());
    }
    if !v.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        return Err("must start with a letter or digit".into());
    }
    if let Some(c) = v.chars().find(|&c| !ok_char(c)) {
        return Err(format!(
            "{c:?} is not allowed (letters, digits and . _ ~ ^ - are)"
        ));
    }
    Ok(())
}

/// One version: the payload targets and where it may go.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Payload {
    pub version: String,
    /// The image config's name (`vm`, `metal`, `test`): a node installs only its own variant.
    pub variant: String,
    /// dm-verity root hash of the root image (also on both UKIs' command lines).
    pub roothash: String,
    /// Target: the EROFS root, gzip-compressed.
    pub root: String,
    /// Uncompressed size of the root image.
    pub root_size: u64,
    /// Target: the dm-verity hash device.
    pub verity: String,
    pub verity_size: u64,
    /// Target: the UKI booting slot A (`keelson.slot=a`).
    pub uki_a: String,
    /// Target: the UKI booting slot B.
    pub uki_b: String,
    /// RFC 3339 release time.
    pub released: String,
    /// Rollout: from `start`, nodes whose seed is below `percent` may install. Empty: everyone.
    #[serde(default)]
    pub waves: Vec<Wave>,
    /// The system extensions that fit this version (at most one version per name): built for
    /// it, or listed under it by `image-build update extension` (the repository says it fits).
    #[serde(default)]
    pub extensions: Vec<ExtensionPayload>,
}

/// A system extension image listed under an OS version (docs/extensions.md).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExtensionPayload {
    /// `SYSEXT_ID`: the extension's name (`etcd`).
    pub name: String,
    /// `SYSEXT_VERSION_ID`: the extension's own version.
    pub version: String,
    /// dm-verity root hash of the extension's file system (hex); the image's partition UUIDs
    /// are its first and last 128 bits.
    pub roothash: String,
    /// Target: the Discoverable Disk Image, gzip-compressed
    /// (`ext-<name>-<version>-for-<os version>.raw.gz`).
    pub target: String,
    /// Size of the compressed target in bytes.
    pub size: u64,
    /// Hex sha256 of the compressed target (TUF checks it too; this names it in the manifest).
    pub sha256: String,
    /// The OS `VERSION_ID` in the extension's extension-release (the version it was built for).
    pub built_for: String,
}

/// The TUF target name of an extension image built for `os_version`.
pub fn extension_target(name: &str, version: &str, os_version: &str) -> String {
    format!("ext-{name}-{version}-for-{os_version}.raw.gz")
}

impl Payload {
    /// The UKI target for a slot letter (`a`/`b`).
    pub fn uki_for(&self, slot: &str) -> &str {
        if slot == "a" {
            &self.uki_a
        } else {
            &self.uki_b
        }
    }
}

/// A rollout wave.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Wave {
    /// RFC 3339 time the wave opens.
    pub start: String,
    /// Share of the fleet (by per-node seed, 0..100) allowed once it opens.
    pub percent: u8,
}

/// Compares versions the way systemd-boot orders `IMAGE_VERSION`s for dotted numbers: runs of
/// digits numerically, other runs byte-wise, separators ignored.
pub fn compare_versions(a: &str, b: &str) -> Ordering {
    fn parts(s: &str) -> Vec<(bool, &str)> {
        let mut out = Vec::new();
        let bytes = s.as_bytes();
        let mut i = 0;
        while i < bytes.len() {
            let c = bytes[i];
            if !c.is_ascii_alphanumeric() {
                i += 1;
                continue;
            }
            let digit = c.is_ascii_digit();
            let start = i;
            while i < bytes.len()
                && bytes[i].is_ascii_alphanumeric()
                && bytes[i].is_ascii_digit() == digit
            {
                i += 1;
            }
            out.push((digit, &s[start..i]));
        }
        out
    }
    let (pa, pb) = (parts(a), parts(b));
    for (x, y) in pa.iter().zip(pb.iter()) {
        let ord = match (x.0, y.0) {
            (true, true) => {
                let (xs, ys) = (x.1.trim_start_matches('0'), y.1.trim_start_matches('0'));
                xs.len().cmp(&ys.len()).then_with(|| xs.cmp(ys))
            }
            (true, false) => Ordering::Greater,
            (false, true) => Ordering::Less,
            (false, false) => x.1.cmp(y.1),
        };
        if ord != Ordering::Equal {
            return ord;
        }
    }
    pa.len().cmp(&pb.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_that_would_make_bad_file_names_are_refused() {
        for ok in [
            "0.2.0",
            "1.0~rc1",
            "2026.12.06-1",
            "3.4.23-1",
            "etcd",
            "v1_0^git",
        ] {
            assert_eq!(check_version(ok), Ok(()), "{ok}");
        }
        for (bad, why) in [
            ("", "must be 1 to 64 characters"),
            (
                "../../EFI/BOOT/BOOTX64",
                "must start with a letter or digit",
            ),
            ("0.2/../../x", "'/' is not allowed"),
            ("0.2.0+9", "'+' is not allowed"),
            ("0.2 0", "' ' is not allowed"),
            (".hidden", "must start with a letter or digit"),
        ] {
            assert_eq!(
                check_version(bad).unwrap_err(),
                if why.starts_with('\'') {
                    format!("{why} (letters, digits and . _ ~ ^ - are)")
                } else {
                    why.to_owned()
                },
                "{bad}"
            );
        }
        assert!(check_version(&"1".repeat(65)).is_err());
        let m: Manifest = serde_json::from_str(
            r#"{"updates": [{"version": "0.2.0+9", "variant": "t", "roothash": "", "root": "",
               "root_size": 0, "verity": "", "verity_size": 0, "uki_a": "", "uki_b": "",
               "released": ""}]}"#,
        )
        .unwrap();
        assert_eq!(
            m.check().unwrap_err(),
            "version \"0.2.0+9\": '+' is not allowed (letters, digits and . _ ~ ^ - are)"
        );
    }

    #[test]
    fn versions_compare_numerically() {
        assert_eq!(compare_versions("0.10.0", "0.9.9"), Ordering::Greater);
        assert_eq!(compare_versions("1.0", "1.0.0"), Ordering::Less);
        assert_eq!(compare_versions("0.2.0", "0.2.0"), Ordering::Equal);
        assert_eq!(compare_versions("0.1.0", "0.2.0"), Ordering::Less);
    }

    #[test]
    fn manifest_sorts_newest_first_and_ignores_unknown_fields() {
        let p = |v: &str| Payload {
            version: v.into(),
            variant: "t".into(),
            roothash: String::new(),
            root: String::new(),
            root_size: 0,
            verity: String::new(),
            verity_size: 0,
            uki_a: String::new(),
            uki_b: String::new(),
            released: String::new(),
            waves: vec![],
            extensions: vec![],
        };
        let mut m = Manifest {
            updates: vec![p("0.2.0"), p("0.10.0"), p("0.3.1")],
        };
        m.sort();
        let v: Vec<_> = m.updates.iter().map(|u| u.version.as_str()).collect();
        assert_eq!(v, ["0.10.0", "0.3.1", "0.2.0"]);
        let json = r#"{"updates": [], "future": 1}"#;
        assert!(serde_json::from_str::<Manifest>(json).is_ok());
    }

    /// A manifest written before extensions existed still parses (no extensions), and one
    /// with extensions round-trips.
    #[test]
    fn extensions_are_optional_and_round_trip() {
        let old = r#"{"updates": [{"version": "0.1.0", "variant": "test", "roothash": "ab",
            "root": "test-0.1.0-root.erofs.gz", "root_size": 8192,
            "verity": "test-0.1.0-root.verity", "verity_size": 4096,
            "uki_a": "a.efi", "uki_b": "b.efi", "released": "2025-01-01T00:00:00Z"}]}"#;
        let mut m: Manifest = serde_json::from_str(old).unwrap();
        assert_eq!(m.updates[0].version, "0.1.0");
        assert!(m.updates[0].extensions.is_empty());
        assert!(m.updates[0].waves.is_empty());
        let etcd = ExtensionPayload {
            name: "etcd".into(),
            version: "3.4.23-1".into(),
            roothash: "cd".repeat(32),
            target: extension_target("etcd", "3.4.23-1", "0.1.0"),
            size: 1234,
            sha256: "ef".repeat(32),
            built_for: "0.1.0".into(),
        };
        assert_eq!(etcd.target, "ext-etcd-3.4.23-1-for-0.1.0.raw.gz");
        m.updates[0].extensions.push(etcd.clone());
        let json = serde_json::to_string(&m).unwrap();
        let back: Manifest = serde_json::from_str(&json).unwrap();
        assert_eq!(back, m);
        assert_eq!(back.updates[0].extensions, [etcd]);
    }
}
