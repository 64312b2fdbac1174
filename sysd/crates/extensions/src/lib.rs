//! Engine extensions on the node (docs/extensions.md): the role of systemd-sysext.
//!
//! An extension is a UAPI Discoverable Disk Image (a GPT with an EROFS root partition and its
//! dm-verity hash partition) whose `/usr` carries an engine's service images and service files.
//! The node keeps the images it was given in a [`Store`] on /var, one *set* per OS version (so a
//! rollback to the other slot finds the extensions that went with it), and [`activate`]s the
//! set of the running version at boot: each image is mapped read-only under dm-verity with the
//! root hash the signed update repository listed, mounted under `/run/keelson/extensions/NAME`,
//! checked against the OS (`extension-release` vs `os-release`), and the `/usr` trees of all
//! that pass are merged over the OS's own `/usr` with a read-only overlay, so their service
//! files appear in `/usr/lib/keelson/services.d` and their images under
//! `/usr/lib/keelson/images` exactly like the OS's system services.
//!
//! Downloading is not here: the update agent (which owns the TUF repository) streams an image
//! into [`Store::staging`] and hands it to [`Store::commit`]. This crate knows nothing of
//! services, the supervisor or the API.

pub mod ddi;
pub mod kernel;
pub mod loopdev;
pub mod release;
mod store;

use std::path::{Path, PathBuf};

use keelson_common::error::{Classify, Kind};
use serde::{Deserialize, Serialize};

pub use store::Store;

/// Where the store lives on the node.
pub const STORE_DIR: &str = "/var/lib/keelson/extensions";
/// Where each active extension's file system is mounted.
pub const RUN_DIR: &str = "/run/keelson/extensions";

/// An extension image the store holds, as the signed repository listed it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub name: String,
    /// The extension's own version.
    pub version: String,
    /// The dm-verity root hash (hex): the image's identity.
    pub roothash: String,
    /// The OS version its extension-release names.
    pub built_for: String,
    /// Where it came from (repository URL and target name), for `keelctl extensions`.
    pub source: String,
    /// Other OS versions the signed repository lists it for (it fits them too).
    #[serde(default)]
    pub listed_for: Vec<String>,
}

/// What [`activate`] did with one extension.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    pub entry: Entry,
    /// The OS version whose set it belongs to.
    pub os_version: String,
    /// `None` when active; the reason it was refused otherwise.
    pub error: Option<String>,
    /// Its mount point when active.
    pub mount: Option<PathBuf>,
}

/// Errors of the extension store and activation.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("extension image {path}: {why}")]
    BadImage { path: PathBuf, why: String },
    #[error("extension {name} does not fit this OS: {why}")]
    Incompatible { name: String, why: String },
    #[error("extension {name}: {why}")]
    Activate { name: String, why: String },
    #[error(
        "extension name {0:?} is not valid (lowercase letters, digits, '-' and '_', at most 64)"
    )]
    BadName(String),
    #[error("{0}")]
    State(String),
}

impl Error {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Error {
        Error::Io {
            path: path.to_owned(),
            source,
        }
    }
}

impl Classify for Error {
    fn kind(&self) -> Kind {
        match self {
            Error::BadImage { .. } | Error::Incompatible { .. } | Error::BadName(_) => {
                Kind::Invalid
            }
            Error::Io { .. } | Error::Activate { .. } | Error::State(_) => Kind::Internal,
        }
    }
}

/// A valid extension name: it becomes a file name, a device-mapper name and a mount point.
pub fn check_name(name: &str) -> Result<(), Error> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        && !name.starts_with(['-', '_']);
    if ok {
        Ok(())
    } else {
        Err(Error::BadName(name.to_owned()))
    }
}

mod activate;
pub use activate::{activate, deactivate, Paths};
