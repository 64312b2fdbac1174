//! `[admin]`: the way into a node. The host has no shell and no login; the image's `admin`
//! system service (an SSH server in a privileged container) is it, like Bottlerocket's admin
//! container. It stays off until this table asks for it: giving keys turns it on.
//!
//! ```toml
//! [admin]
//! ssh_authorized_keys = ["ssh-ed25519 AAAA... alice@laptop"]
//! # enabled = false   # keep the keys, but do not run the SSH server
//! ```

use crate::Invalid;
use base64::Engine as _;
use serde::{Deserialize, Serialize};

/// The system service `[admin]` controls.
pub const ADMIN_SERVICE: &str = "admin";

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Admin {
    /// Run the admin service. Default: when keys are given.
    pub enabled: Option<bool>,
    /// authorized_keys lines for the admin container's `root`; sysd writes them to the
    /// `admin` volume's `.ssh/authorized_keys` (replacing it) whenever they are set.
    #[serde(default)]
    pub ssh_authorized_keys: Vec<String>,
}

impl Admin {
    pub fn wants_service(&self) -> bool {
        self.enabled.unwrap_or(!self.ssh_authorized_keys.is_empty())
    }

    pub fn check(&self) -> Result<(), Invalid> {
        for (i, key) in self.ssh_authorized_keys.iter().enumerate() {
            check_ssh_key(key).map_err(|e| format!("ssh_authorized_keys[{i}]: {e}"))?;
        }
        Ok(())
    }
}

const KEY_TYPES: &[&str] = &[
    "ssh-ed25519",
    "ssh-rsa",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
    "ssh-dss",
];

/// An authorized_keys line: `[options] type base64 [comment]`, the blob's embedded type
/// matching the named one.
pub fn check_ssh_key(line: &str) -> Result<(), Invalid> {
    if line.contains('\n') {
        return Err(Invalid::from("an ssh key must be one line"));
    }
    let words: Vec<&str> = line.split_whitespace().collect();
    let Some(i) = words.iter().position(|w| KEY_TYPES.contains(w)) else {
        return Err(Invalid::from(format!(
            "`{}` is not an ssh public key (expected a type such as ssh-ed25519 followed by \
             the base64 key)",
            truncate(line)
        )));
    };
    let blob = words
        .get(i + 1)
        .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
        .ok_or_else(|| format!("the {} key's base64 data is missing or invalid", words[i]))?;
    // The blob starts with the key type as an SSH string (u32 length, bytes).
    let named = blob
        .get(4..)
        .zip(blob.get(..4))
        .and_then(|(rest, len)| {
            let len = u32::from_be_bytes(len.try_into().ok()?) as usize;
            rest.get(..len)
        })
        .and_then(|t| std::str::from_utf8(t).ok());
    if named != Some(words[i]) {
        return Err(Invalid::from(format!(
            "the key data does not hold a {} key (a truncated or mixed-up key?)",
            words[i]
        )));
    }
    Ok(())
}

fn truncate(s: &str) -> String {
    let mut t: String = s.chars().take(40).collect();
    if t.len() < s.len() {
        t.push('…');
    }
    t
}
