//! The new UKI built from the running one: a zstd `--patch-from` patch against the UKI the node
//! booted (the repository publishes one per slot against the previous listed version's UKIs).
//!
//! A version bump leaves a UKI's kernel and initramfs as they were; only `.osrel`, `.cmdline`
//! (root hash) and the signature change. The manifest names, per patch, the sha256 of the UKI
//! it applies to: the agent patches only a running UKI with that hash (read from the ESP),
//! downloads the patch as a signed target (its length and sha256 checked as it streams),
//! decodes it with the running UKI as zstd's reference prefix under a window limit
//! ([`WINDOW_LOG_MAX`]: bounded memory whatever the patch declares) and an output limit (the
//! signed UKI's length), and keeps the result only if its sha256 is the signed UKI target's.
//! Anything else is a reason to download the whole UKI, reported as an event. The Secure Boot
//! check and the UKI's own checks run on the assembled bytes exactly as on a downloaded UKI.

use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use keelson_common::update::{Payload, UkiPatch, UKI_PATCH_WINDOW_LOG_MAX};
use sha2::{Digest, Sha256};

use super::install::{self, Repo};
use super::slots::{self, Layout};
use super::Agent;

/// The largest zstd window a patch may use (log2): what it needs is the running UKI (the
/// reference prefix) plus the new one; 64 MiB covers UKIs up to 32 MiB each.
pub const WINDOW_LOG_MAX: u32 = UKI_PATCH_WINDOW_LOG_MAX;

/// A patch the node can apply: the patch, its signed length, and the running UKI it applies to.
pub struct Plan {
    pub patch: UkiPatch,
    pub patch_len: u64,
    pub running: PathBuf,
}

/// The running slot's UKI on the ESP (its entry names the running slot and root hash).
fn running_uki(layout: &Layout) -> Result<PathBuf> {
    let entries = slots::entries(&layout.esp)?;
    let e = entries
        .iter()
        .find(|e| {
            e.slot == Some(layout.running)
                && e.roothash.as_deref() == Some(layout.roothash.as_str())
        })
        .with_context(|| {
            format!(
                "no boot entry on the ESP for the running slot {} with its root hash",
                layout.running
            )
        })?;
    Ok(slots::uki_dir(&layout.esp).join(&e.file))
}

fn sha256_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h).with_context(|| format!("reading {}", path.display()))?;
    Ok(hex::encode(h.finalize()))
}

/// Whether `p`'s UKI for slot `letter` can come as a patch against the running UKI, or why not.
/// `uki_len` is the whole UKI target's signed length.
pub fn plan(
    repo: &Repo,
    layout: &Layout,
    p: &Payload,
    letter: &str,
    uki_len: u64,
) -> Result<Plan, String> {
    let Some(patch) = p.uki_patches.iter().find(|x| x.slot == letter) else {
        return Err(format!(
            "the repository has no UKI patch for version {} slot {letter}",
            p.version
        ));
    };
    let running = running_uki(layout).map_err(|e| format!("{e:#}"))?;
    let have = sha256_file(&running).map_err(|e| format!("{e:#}"))?;
    if have != patch.from_sha256 {
        return Err(format!(
            "the patch {} applies to {}'s UKI (sha256 {}); the running UKI {} is {have}",
            patch.target,
            patch.from_version,
            patch.from_sha256,
            running.display()
        ));
    }
    let (patch_len, _, _) =
        install::target_info(repo, &patch.target).map_err(|e| format!("{e:#}"))?;
    if patch_len >= uki_len {
        return Err(format!(
            "{} is {patch_len} bytes signed, not smaller than the {uki_len}-byte UKI (refused unread)",
            patch.target
        ));
    }
    Ok(Plan {
        patch: patch.clone(),
        patch_len,
        running,
    })
}

/// Downloads the patch (a signed target, checked as it streams) and applies it: the UKI's
/// bytes, whose length and sha256 are the signed UKI target's, or why not.
pub async fn assemble(agent: &Agent, repo: &Repo, plan: &Plan, uki_name: &str) -> Result<Vec<u8>> {
    let (uki_len, uki_sha, _) = install::target_info(repo, uki_name)?;
    let reference = std::fs::read(&plan.running)
        .with_context(|| format!("reading the running UKI {}", plan.running.display()))?;
    if hex::encode(Sha256::digest(&reference)) != plan.patch.from_sha256 {
        bail!(
            "the running UKI {} changed since it was hashed",
            plan.running.display()
        );
    }
    let mut patch = Vec::with_capacity(plan.patch_len as usize);
    install::stream_target(agent, repo, &plan.patch.target, &mut |b| {
        patch.extend_from_slice(b);
        Ok(())
    })
    .await?;
    let uki = apply(&reference, &patch, uki_len)
        .with_context(|| format!("applying {}", plan.patch.target))?;
    let got = Sha256::digest(&uki);
    if got.as_slice() != uki_sha.as_slice() {
        bail!(
            "{} builds a UKI with sha256 {}, the signed {uki_name} is {} (refused)",
            plan.patch.target,
            hex::encode(got),
            hex::encode(&uki_sha)
        );
    }
    Ok(uki)
}

/// `patch` decoded with `reference` as zstd's prefix: at most `len` bytes (one more is an
/// error), within a window of 2^[`WINDOW_LOG_MAX`] bytes.
pub fn apply(reference: &[u8], patch: &[u8], len: u64) -> Result<Vec<u8>> {
    let mut d = zstd::stream::read::Decoder::with_ref_prefix(patch, reference)
        .context("starting the zstd decoder")?;
    d.window_log_max(WINDOW_LOG_MAX)
        .context("setting the zstd window limit")?;
    let mut out = Vec::with_capacity(len as usize);
    (&mut d).take(len + 1).read_to_end(&mut out).context(
        "corrupt patch, a patch against another UKI, or one needing more than the window limit",
    )?;
    if out.len() as u64 != len {
        bail!(
            "it decodes to {}{} bytes, the signed UKI has {len}",
            if out.len() as u64 > len {
                "more than "
            } else {
                ""
            },
            out.len().min(len as usize)
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use zstd::zstd_safe::CParameter;

    use crate::tests::random_bytes as bytes;

    /// A UKI and the next version's: the same kernel and initramfs, another command line.
    fn ukis() -> (Vec<u8>, Vec<u8>) {
        let body = bytes(3, 2 << 20);
        let mut old = b"MZ roothash=aaaa version=0.1.0 ".to_vec();
        old.extend_from_slice(&body);
        let mut new = b"MZ roothash=bbbb version=0.2.0 ".to_vec();
        new.extend_from_slice(&body);
        (old, new)
    }

    fn patch(reference: &[u8], new: &[u8], window_log: u32, pledge: bool) -> Vec<u8> {
        let mut enc =
            zstd::stream::write::Encoder::with_ref_prefix(Vec::new(), 3, reference).unwrap();
        enc.set_parameter(CParameter::WindowLog(window_log))
            .unwrap();
        enc.set_parameter(CParameter::EnableLongDistanceMatching(true))
            .unwrap();
        if pledge {
            enc.set_pledged_src_size(Some(new.len() as u64)).unwrap();
        }
        enc.write_all(new).unwrap();
        enc.finish().unwrap()
    }

    #[test]
    fn a_patch_rebuilds_the_new_uki_from_the_old_one() {
        let (old, new) = ukis();
        let p = patch(&old, &new, 23, true);
        assert!(p.len() < 4096, "a 2 MiB UKI patched in {} bytes", p.len());
        assert!(apply(&old, &p, new.len() as u64).unwrap() == new);
    }

    #[test]
    fn a_patch_is_refused_past_the_signed_length_or_the_window_limit() {
        let (old, new) = ukis();
        let p = patch(&old, &new, 23, true);
        // Decoding stops one byte past the signed length.
        let e = format!("{:#}", apply(&old, &p, new.len() as u64 - 1).unwrap_err());
        assert!(e.contains("decodes to more than"), "{e}");
        let e = format!("{:#}", apply(&old, &p, new.len() as u64 + 1).unwrap_err());
        assert!(e.contains("the signed UKI has"), "{e}");
        // A frame asking for a window above the limit is refused before it is decoded:
        // memory stays bounded whatever a patch declares.
        let big = patch(&old, &new, WINDOW_LOG_MAX + 1, false);
        let e = format!("{:#}", apply(&old, &big, new.len() as u64).unwrap_err());
        assert!(e.contains("window limit"), "{e}");
        // Against another reference it is no patch of this UKI: an error or other bytes,
        // which the agent's sha256 check refuses.
        let other = bytes(4, old.len());
        assert!(apply(&other, &p, new.len() as u64).map_or(true, |b| b != new));
        // Not zstd at all.
        assert!(apply(&old, b"not a zstd frame", 10).is_err());
    }
}
