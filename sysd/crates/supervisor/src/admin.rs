//! `[admin]` keys into the admin container: `authorized_keys` in the volume mounted at the
//! admin service's `/root`, written whenever the config lists keys (the config is then the
//! source of truth; with no keys configured, a file edited from inside the container is left
//! alone).

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use keelson_common::durable;
use keelson_spec::admin::ADMIN_SERVICE;
use keelson_spec::{Config, MountSpec};

/// The home directory whose volume receives the keys.
const HOME: &str = "/root";

/// Where the admin service's `authorized_keys` lives on the host, if it has a volume at /root.
pub fn keys_path(config: &Config, volumes: &Path) -> Option<PathBuf> {
    let svc = config.services.get(ADMIN_SERVICE)?;
    svc.spec.mounts.iter().find_map(|m| match m {
        MountSpec::Volume { source, target, .. } if target.trim_end_matches('/') == HOME => {
            Some(volumes.join(source).join(".ssh/authorized_keys"))
        }
        _ => None,
    })
}

/// Writes the configured keys (mode 0600 in a 0700 `.ssh`, as sshd and dropbear require).
pub fn sync_keys(config: &Config, volumes: &Path) -> Result<Option<PathBuf>> {
    if config.admin.ssh_authorized_keys.is_empty() {
        return Ok(None);
    }
    let path = keys_path(config, volumes).with_context(|| {
        format!("the `{ADMIN_SERVICE}` service has no volume mounted at {HOME} to hold its keys")
    })?;
    let ssh = path.parent().unwrap_or(Path::new("/"));
    std::fs::create_dir_all(ssh).with_context(|| format!("creating {}", ssh.display()))?;
    std::fs::set_permissions(ssh, std::fs::Permissions::from_mode(0o700))?;
    let mut text = config.admin.ssh_authorized_keys.join("\n");
    text.push('\n');
    durable::replace_with(&path, &durable::Options::mode(0o600), |f| {
        f.write_all(text.as_bytes())
    })?;
    Ok(Some(path))
}
