//! Whole-table settings (`[update]`, `[extensions]`) and their layers: the user's file wins,
//! then first-boot user data, then the last system file (in name order) that has the table.
//! A layer's table replaces the lower ones whole; it is never merged key by key.

use std::path::Path;

use crate::{ConfigError, Sources};

/// Reads one file's table (`None` when the file does not have it).
pub(crate) type Parse<T> = fn(&Path, &str) -> Result<Option<T>, ConfigError>;

/// Where a TOML error is, as `path:line: message`.
pub(crate) fn located(path: &Path, text: &str, e: &toml::de::Error) -> ConfigError {
    let line = e
        .span()
        .map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1)
        .unwrap_or(1);
    ConfigError(format!("{}:{line}: {}", path.display(), e.message()))
}

/// The effective table across the layers of `sources`.
pub(crate) fn load<T>(sources: &Sources, parse: Parse<T>) -> Result<Option<T>, ConfigError> {
    if let Some(text) = sources.read_user_text()? {
        if let Some(t) = parse(&sources.user_file, &text)? {
            return Ok(Some(t));
        }
    }
    if let Some(text) = sources.read_userdata_text()? {
        if let Some(t) = parse(&sources.userdata_file, &text)? {
            return Ok(Some(t));
        }
    }
    let mut files: Vec<_> = match std::fs::read_dir(&sources.system_dir) {
        Ok(rd) => rd
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "toml"))
            .collect(),
        Err(_) => Vec::new(),
    };
    files.sort();
    let mut found = None;
    for path in files {
        let text = std::fs::read_to_string(&path)
            .map_err(|e| ConfigError(format!("{}: {e}", path.display())))?;
        if let Some(t) = parse(&path, &text)? {
            found = Some(t);
        }
    }
    Ok(found)
}
