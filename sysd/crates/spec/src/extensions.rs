//! `[extensions]`: which engine extensions the node runs (docs/extensions.md). Like `[update]`,
//! a layer's table replaces the lower ones whole (user file, then user data, then system files).

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::{table, ConfigError, Sources};
use crate::Invalid;

/// The `[extensions]` table.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExtensionsSpec {
    /// Extension names, as the update repository lists them (`etcd`).
    #[serde(default)]
    pub enabled: Vec<String>,
}

impl ExtensionsSpec {
    /// Names must be usable as file and device names; no name twice.
    pub fn check(&self) -> Result<(), Invalid> {
        for (i, name) in self.enabled.iter().enumerate() {
            let ok = !name.is_empty()
                && name.len() <= 64
                && !name.starts_with(['-', '_'])
                && name.bytes().all(|b| {
                    b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_'
                });
            if !ok {
                return Err(Invalid::from(format!(
                    "extensions.enabled[{i}]: {name:?} is not an extension name (lowercase letters, digits, '-' and '_', at most 64)"
                )));
            }
            if self.enabled[..i].contains(name) {
                return Err(Invalid::from(format!(
                    "extensions.enabled[{i}]: {name:?} is listed twice"
                )));
            }
        }
        Ok(())
    }
}

#[derive(Deserialize)]
struct ExtensionsOnly {
    extensions: Option<ExtensionsSpec>,
}

fn parse(path: &Path, text: &str) -> Result<Option<ExtensionsSpec>, ConfigError> {
    let doc: ExtensionsOnly = toml::from_str(text).map_err(|e| table::located(path, text, &e))?;
    if let Some(x) = &doc.extensions {
        x.check()
            .map_err(|e| ConfigError(format!("{}: {e}", path.display())))?;
    }
    Ok(doc.extensions)
}

/// The effective `[extensions]` (none enabled when no layer has the table).
pub fn load(sources: &Sources) -> Result<ExtensionsSpec, ConfigError> {
    Ok(table::load(sources, parse)?.unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        let ok = "version = 1\n[extensions]\nenabled = [\"etcd\", \"docker\"]\n";
        let x = parse(Path::new("u.toml"), ok).unwrap().unwrap();
        assert_eq!(x.enabled, ["etcd", "docker"]);
        let bad = "version = 1\n[extensions]\nenabled = [\"../etc\"]\n";
        let e = parse(Path::new("u.toml"), bad).unwrap_err().0;
        assert_eq!(e, "u.toml: extensions.enabled[0]: \"../etc\" is not an extension name (lowercase letters, digits, '-' and '_', at most 64)");
        let twice = "version = 1\n[extensions]\nenabled = [\"etcd\", \"etcd\"]\n";
        assert!(parse(Path::new("u.toml"), twice)
            .unwrap_err()
            .0
            .contains("listed twice"));
        let unknown = "version = 1\n[extensions]\nenable = [\"etcd\"]\n";
        let e = parse(Path::new("u.toml"), unknown).unwrap_err().0;
        assert!(e.starts_with("u.toml:3:") && e.contains("enable"), "{e}");
    }

    #[test]
    fn the_user_layer_wins_whole() {
        let dir = tempfile::tempdir().unwrap();
        let sources = Sources {
            system_dir: dir.path().join("system"),
            userdata_file: dir.path().join("userdata.toml"),
            user_file: dir.path().join("services.toml"),
        };
        assert!(load(&sources).unwrap().enabled.is_empty());
        std::fs::write(
            &sources.userdata_file,
            "version = 1\n[extensions]\nenabled = [\"etcd\"]\n",
        )
        .unwrap();
        assert_eq!(load(&sources).unwrap().enabled, ["etcd"]);
        std::fs::write(
            &sources.user_file,
            "version = 1\n[extensions]\nenabled = []\n",
        )
        .unwrap();
        assert!(load(&sources).unwrap().enabled.is_empty());
    }
}
