//! UEFI Secure Boot: signing the boot chain and the keys a machine enrolls.
//!
//! The user keeps a key directory outside the repository (`--secure-boot-keys DIR` or
//! `KEELSON_SECURE_BOOT_KEYS`), laid out as `PK.key PK.crt KEK.key KEK.crt db.key db.crt`
//! (PEM; RSA, as UEFI firmware requires). `db` signs systemd-boot and every UKI with
//! `keelson_common::authenticode` (Rust: sbsign stamps a PKCS#7 `signingTime`, which would make two
//! builds with one key differ). The ESP carries `loader/keys/auto/{PK,KEK,db}.auth`, made with
//! efitools (`cert-to-efi-sig-list`, `sign-efi-sig-list`) with the owner GUID from the config's
//! seed and the timestamp from SOURCE_DATE_EPOCH, so they are reproducible too; loader.conf says
//! `secure-boot-enroll force`, so systemd-boot enrolls them when the firmware is in setup mode
//! (db signed by KEK, KEK by PK, PK by itself) and resets into Secure Boot.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result};
use keelson_common::authenticode::Signer;

use crate::util::{civil_from_unix, derive_guid, run, Tool};

pub const CERT_TO_ESL: Tool = Tool::new("cert-to-efi-sig-list", "efitools");
pub const SIGN_ESL: Tool = Tool::new("sign-efi-sig-list", "efitools");

/// Where systemd-boot looks for the key set it enrolls by itself (`secure-boot-enroll force`).
pub const ESP_KEYS: &str = "loader/keys/auto";

/// The six files of a key directory, in the order they are checked.
const FILES: [&str; 6] = ["PK.key", "PK.crt", "KEK.key", "KEK.crt", "db.key", "db.crt"];

/// A checked key directory: the `db` signer loaded, the others present and matching.
#[derive(Debug)]
pub struct Keys {
    dir: PathBuf,
    pub db: Signer,
}

impl Keys {
    pub fn load(dir: &Path) -> Result<Keys> {
        for f in FILES {
            let p = dir.join(f);
            if !p.is_file() {
                anyhow::bail!(
                    "Secure Boot key directory {}: {f} is missing (it needs {}; docs/secure-boot.md shows how to make them)",
                    dir.display(),
                    FILES.join(" ")
                );
            }
        }
        let signer = |name: &str| -> Result<Signer> {
            let read = |f: String| {
                std::fs::read(dir.join(&f))
                    .with_context(|| format!("reading {}", dir.join(&f).display()))
            };
            Signer::new(&read(format!("{name}.key"))?, &read(format!("{name}.crt"))?)
                .with_context(|| format!("Secure Boot key {name} in {}", dir.display()))
        };
        signer("PK")?;
        signer("KEK")?;
        Ok(Keys {
            db: signer("db")?,
            dir: dir.to_owned(),
        })
    }

    /// Signs the PE image at `path` in place.
    pub fn sign_file(&self, path: &Path) -> Result<()> {
        let pe = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let signed = self
            .db
            .sign(&pe)
            .with_context(|| format!("signing {}", path.display()))?;
        std::fs::write(path, signed).with_context(|| format!("writing {}", path.display()))
    }

    /// `PK.auth`, `KEK.auth`, `db.auth` as ESP paths and contents, built in `work`.
    pub fn enrollment(
        &self,
        work: &Path,
        seed: &str,
        epoch: u64,
    ) -> Result<Vec<(String, Vec<u8>)>> {
        let owner = derive_guid(seed, "secure boot owner").to_string();
        let (y, mo, d, h, mi, s) = civil_from_unix(epoch);
        let timestamp = format!("{y:04}-{mo:02}-{d:02} {h:02}:{mi:02}:{s:02}");
        std::fs::create_dir_all(work)?;
        let mut out = Vec::new();
        for (var, signed_by) in [("PK", "PK"), ("KEK", "PK"), ("db", "KEK")] {
            let esl = work.join(format!("{var}.esl"));
            let auth = work.join(format!("{var}.auth"));
            run(Command::new(CERT_TO_ESL.name)
                .arg("-g")
                .arg(&owner)
                .arg(self.dir.join(format!("{var}.crt")))
                .arg(&esl))
            .context("cert-to-efi-sig-list (package efitools)")?;
            run(Command::new(SIGN_ESL.name)
                .arg("-g")
                .arg(&owner)
                .arg("-t")
                .arg(&timestamp)
                .arg("-k")
                .arg(self.dir.join(format!("{signed_by}.key")))
                .arg("-c")
                .arg(self.dir.join(format!("{signed_by}.crt")))
                .arg(var)
                .arg(&esl)
                .arg(&auth))
            .context("sign-efi-sig-list (package efitools)")?;
            out.push((format!("{ESP_KEYS}/{var}.auth"), std::fs::read(&auth)?));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_sign_and_enroll_reproducibly() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("keys");
        keelson_testkit::secure_boot::key_dir(&dir);
        let keys = Keys::load(&dir).unwrap();
        let a = keys
            .enrollment(&tmp.path().join("a"), "seed", 1_700_000_000)
            .unwrap();
        let b = keys
            .enrollment(&tmp.path().join("b"), "seed", 1_700_000_000)
            .unwrap();
        assert_eq!(a, b, "two enrollments with one key differ");
        let names: Vec<_> = a.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "loader/keys/auto/PK.auth",
                "loader/keys/auto/KEK.auth",
                "loader/keys/auto/db.auth"
            ]
        );
        // sbverify (sbsigntool) agrees with our signature.
        let pe = tmp.path().join("a.efi");
        std::fs::write(&pe, keelson_common::authenticode::sample_image(b"quiet")).unwrap();
        keys.sign_file(&pe).unwrap();
        let first = std::fs::read(&pe).unwrap();
        let out = Command::new("sbverify")
            .arg("--cert")
            .arg(dir.join("db.crt"))
            .arg(&pe)
            .output()
            .expect("sbverify (package sbsigntool)");
        assert!(
            out.status.success(),
            "sbverify refused our signature: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let err = keys.sign_file(&pe).unwrap_err();
        assert!(format!("{err:#}").contains("already signed"), "{err:#}");
        assert_eq!(std::fs::read(&pe).unwrap(), first);
    }

    #[test]
    fn a_missing_key_file_is_named() {
        let tmp = tempfile::tempdir().unwrap();
        keelson_testkit::secure_boot::key_dir(tmp.path());
        std::fs::remove_file(tmp.path().join("KEK.crt")).unwrap();
        let err = Keys::load(tmp.path()).unwrap_err().to_string();
        assert!(err.contains("KEK.crt is missing"), "{err}");
    }
}
