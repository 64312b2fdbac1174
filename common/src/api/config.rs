//! The effective config (`GET /v1/config`): the layers it is made of and the merged result.

use serde::{Deserialize, Serialize};

/// One source of config, lowest first: `image`, `user-data`, `api`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layer {
    pub name: String,
    /// A file, or for the image the directory of its system service files.
    pub path: String,
    pub present: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigView {
    pub layers: Vec<Layer>,
    /// The merged config as TOML, every table preceded by a comment naming the layer and the
    /// `file:line:col` it came from.
    pub toml: String,
}
