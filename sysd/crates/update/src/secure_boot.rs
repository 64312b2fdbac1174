//! What the firmware will boot: on a node booted with UEFI Secure Boot on, a UKI the firmware's
//! `db` does not trust (unsigned, tampered, signed by another key, or listed in `dbx`) would
//! not boot, so the agent refuses it before it touches the ESP.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use keelson_common::authenticode::{self, SignatureDb};

/// Where the kernel shows UEFI variables (efivarfs).
pub const EFIVARS: &str = "/sys/firmware/efi/efivars";
/// `EFI_GLOBAL_VARIABLE`: SecureBoot.
const GLOBAL: &str = "8be4df61-93ca-11d2-aa0d-00e098032b8c";
/// `EFI_IMAGE_SECURITY_DATABASE_GUID`: db and dbx.
const IMAGE_SECURITY: &str = "d719b2cb-3d3a-4596-a3bc-dad00e67656f";

/// The signature databases of a firmware that enforces Secure Boot.
#[derive(Debug)]
pub struct Enforcing {
    pub db: SignatureDb,
    pub dbx: SignatureDb,
}

/// A variable's data (efivarfs puts its 4 attribute bytes first), or None if it does not exist.
fn read_var(dir: &Path, name: &str, guid: &str) -> Result<Option<Vec<u8>>> {
    let path = dir.join(format!("{name}-{guid}"));
    match std::fs::read(&path) {
        Ok(mut v) if v.len() >= 4 => Ok(Some(v.split_off(4))),
        Ok(_) => bail!("{}: shorter than its attributes", path.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// The firmware's databases if it enforces Secure Boot (`SecureBoot` is 1), else None.
pub fn enforcing(efivars: &Path) -> Result<Option<Enforcing>> {
    match read_var(efivars, "SecureBoot", GLOBAL)? {
        Some(v) if v.first() == Some(&1) => {}
        _ => return Ok(None),
    }
    let db = read_var(efivars, "db", IMAGE_SECURITY)?.with_context(|| {
        format!(
            "Secure Boot is on but {} has no db variable",
            efivars.display()
        )
    })?;
    let db = SignatureDb::parse(&db).context("the firmware's db variable")?;
    let dbx = match read_var(efivars, "dbx", IMAGE_SECURITY)? {
        Some(v) => SignatureDb::parse(&v).context("the firmware's dbx variable")?,
        None => SignatureDb::default(),
    };
    Ok(Some(Enforcing { db, dbx }))
}

/// The efivarfs directory of a node, mounted (read-only) if UEFI is there and nothing is
/// mounted yet; None without UEFI (a direct kernel boot).
pub fn node_efivars() -> Result<Option<PathBuf>> {
    let dir = Path::new(EFIVARS);
    if !Path::new("/sys/firmware/efi").exists() {
        return Ok(None);
    }
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    if !mounts.lines().any(|l| l.split(' ').nth(1) == Some(EFIVARS)) {
        use nix::mount::MsFlags;
        nix::mount::mount(
            Some("efivarfs"),
            dir,
            Some("efivarfs"),
            MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            None::<&str>,
        )
        .with_context(|| format!("mounting efivarfs on {EFIVARS}"))?;
    }
    Ok(Some(dir.to_owned()))
}

/// Refuses a UKI the enforcing firmware would not boot, saying why.
pub fn check(uki: &[u8], what: &str, fw: &Enforcing) -> Result<String> {
    authenticode::verify(uki, &fw.db, &fw.dbx)
        .map(|v| v.signer)
        .map_err(|e| {
            anyhow::anyhow!(
                "{what} would not boot under Secure Boot: {e} (refused before touching the ESP)"
            )
        })
}
