//! The new root built from the running one: a zstd `--patch-from` patch against the root the
//! node booted, the first way a version's root can come (then chunks, then the whole root).
//!
//! `image-build update add` publishes, per version, patches against the roots of the newest
//! older versions, each naming the dm-verity root hash and size of the root it applies to. The
//! agent takes the one for the root hash it booted with; it reads that root through its
//! dm-verity device (every block checked against the hash, so the reference is the signed
//! root or an I/O error), downloads the patch as a signed target (length and sha256 checked as
//! it streams), and decodes it in one pass into a buffer of the signed root size: zstd needs no
//! window buffer then, so memory is the reference plus the new root (about twice the root)
//! whatever the patch declares, and a patch that decodes to more or fewer bytes is refused.
//! All of it happens before the target slot is touched. The install's read-back dm-verity check
//! stays the final word on what was written.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use keelson_common::update::{Payload, RootPatch};
use zstd::zstd_safe::{self, DCtx};

use super::install::{self, Repo};
use super::Agent;

/// A root patch the node can apply.
pub struct Plan {
    pub patch: RootPatch,
    /// The patch target's signed length: what the root costs to download this way.
    pub patch_len: u64,
    /// The running root's dm-verity device.
    pub running: PathBuf,
}

/// Whether `p`'s root can come as a patch against the running root (`running_root`, booted
/// with `roothash`), within `max_percent` of the full root target's `root_len`; or why not.
pub fn plan(
    repo: &Repo,
    running_root: Option<&Path>,
    roothash: &str,
    p: &Payload,
    root_len: u64,
    max_percent: u8,
) -> Result<Plan, String> {
    if max_percent == 0 {
        return Err("deltas are off (update.delta_max_percent = 0)".into());
    }
    let Some(patch) = p
        .root_patches
        .iter()
        .find(|r| !roothash.is_empty() && r.from_roothash.eq_ignore_ascii_case(roothash))
    else {
        return Err(format!(
            "the repository has no patch of {}'s root against the running root ({})",
            p.version,
            if p.root_patches.is_empty() {
                "none at all".to_string()
            } else {
                let from: Vec<_> = p
                    .root_patches
                    .iter()
                    .map(|r| r.from_version.as_str())
                    .collect();
                format!("only against {}", from.join(", "))
            }
        ));
    };
    let Some(dev) = running_root else {
        return Err("the running slot's dm-verity root device was not found".into());
    };
    let have = File::open(dev)
        .and_then(|mut f| f.seek(SeekFrom::End(0)))
        .map_err(|e| format!("the running root {}: {e}", dev.display()))?;
    if have < patch.from_size {
        return Err(format!(
            "{} applies to a {}-byte root; the running root {} has {have} bytes",
            patch.target,
            patch.from_size,
            dev.display()
        ));
    }
    fits_in_memory(
        patch.from_size.saturating_add(p.root_size),
        "the running root and the new one",
    )?;
    let (patch_len, _, _) =
        install::target_info(repo, &patch.target).map_err(|e| format!("{e:#}"))?;
    if patch_len.saturating_mul(100) > root_len.saturating_mul(u64::from(max_percent)) {
        return Err(format!(
            "{} is {patch_len} bytes, more than update.delta_max_percent ({max_percent}%) of the {root_len}-byte root",
            patch.target
        ));
    }
    Ok(Plan {
        patch: patch.clone(),
        patch_len,
        running: dev.to_owned(),
    })
}

/// Whether `need` bytes (`what`) fit in half of the memory the kernel says is available: a
/// patch holds its reference and its result in memory, and a node short of memory takes the
/// other ways (chunks, the whole image) instead of risking the OOM killer.
pub fn fits_in_memory(need: u64, what: &str) -> Result<(), String> {
    let available = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemAvailable:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map(|kib| kib << 10)
        .ok_or("/proc/meminfo has no MemAvailable")?;
    if need > available / 2 {
        return Err(format!(
            "{what} ({} MiB) would not fit in half of the {} MiB of memory available",
            need >> 20,
            available >> 20
        ));
    }
    Ok(())
}

/// Downloads the patch (a signed target, checked as it streams) and applies it to the running
/// root: the new root image, `p.root_size` bytes, or why not.
pub async fn assemble(agent: &Agent, repo: &Repo, plan: &Plan, p: &Payload) -> Result<Vec<u8>> {
    let mut patch = Vec::with_capacity(plan.patch_len as usize);
    install::stream_target(agent, repo, &plan.patch.target, &mut |b| {
        patch.extend_from_slice(b);
        Ok(())
    })
    .await?;
    agent.check_cancel()?;
    let mut reference = Vec::with_capacity(plan.patch.from_size as usize);
    File::open(&plan.running)
        .and_then(|f| {
            f.take(plan.patch.from_size)
                .read_to_end(&mut reference)
                .map(drop)
        })
        .with_context(|| format!("reading the running root {}", plan.running.display()))?;
    if reference.len() as u64 != plan.patch.from_size {
        bail!(
            "the running root {} ended after {} of {} bytes",
            plan.running.display(),
            reference.len(),
            plan.patch.from_size
        );
    }
    agent.check_cancel()?;
    apply(&reference, &patch, p.root_size)
        .with_context(|| format!("applying {}", plan.patch.target))
}

/// `patch` decoded in one pass with `reference` as zstd's prefix: exactly `len` bytes (a root
/// or an extension image). A frame that declares another size is refused before anything is
/// decoded; one that decodes to more stops at the buffer's end (an error, never more memory).
pub fn apply(reference: &[u8], patch: &[u8], len: u64) -> Result<Vec<u8>> {
    match zstd_safe::get_frame_content_size(patch) {
        Ok(Some(n)) if n == len => {}
        Ok(Some(n)) => bail!("the patch builds {n} bytes, the signed image has {len}"),
        Ok(None) => bail!("the patch does not declare its size (refused)"),
        Err(_) => bail!("not a zstd frame"),
    }
    let zerr = |code: usize| zstd_safe::get_error_name(code).to_string();
    let mut d = DCtx::create();
    d.ref_prefix(reference)
        .map_err(|c| anyhow::anyhow!("zstd reference: {}", zerr(c)))?;
    let mut out = Vec::with_capacity(usize::try_from(len)?);
    d.decompress(&mut out, patch).map_err(|c| {
        anyhow::anyhow!(
            "{} (a corrupt patch, or one made against another image)",
            zerr(c)
        )
    })?;
    if out.len() as u64 != len {
        bail!(
            "it decodes to {} bytes, the signed image has {len}",
            out.len()
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use zstd::zstd_safe::{CCtx, CParameter};

    use crate::tests::random_bytes as bytes;

    /// A root and the next version's: 4 MiB alike but for one changed 64 KiB "binary".
    fn roots() -> (Vec<u8>, Vec<u8>) {
        let old = bytes(7, 4 << 20);
        let mut new = old.clone();
        new[1 << 20..(1 << 20) + (64 << 10)].copy_from_slice(&bytes(8, 64 << 10));
        (old, new)
    }

    fn patch(reference: &[u8], new: &[u8], checksum: bool, size: bool) -> Vec<u8> {
        let mut c = CCtx::create();
        c.set_parameter(CParameter::CompressionLevel(3)).unwrap();
        c.set_parameter(CParameter::WindowLog(24)).unwrap();
        c.set_parameter(CParameter::EnableLongDistanceMatching(true))
            .unwrap();
        c.set_parameter(CParameter::ChecksumFlag(checksum)).unwrap();
        c.set_parameter(CParameter::ContentSizeFlag(size)).unwrap();
        c.ref_prefix(reference).unwrap();
        let mut out = Vec::with_capacity(zstd_safe::compress_bound(new.len()));
        c.compress2(&mut out, new).unwrap();
        out
    }

    #[test]
    fn a_patch_rebuilds_the_new_root_from_the_old_one() {
        let (old, new) = roots();
        let p = patch(&old, &new, true, true);
        assert!(
            p.len() < 80 << 10,
            "a 64 KiB change patched in {} bytes",
            p.len()
        );
        assert!(apply(&old, &p, new.len() as u64).unwrap() == new);
    }

    #[test]
    fn a_patch_of_another_size_another_root_or_garbage_is_refused() {
        let (old, new) = roots();
        let p = patch(&old, &new, true, true);
        let len = new.len() as u64;
        // The declared size must be the signed one: refused before decoding.
        let e = format!("{:#}", apply(&old, &p, len - 4096).unwrap_err());
        assert!(e.contains("the signed image has"), "{e}");
        let e = format!("{:#}", apply(&old, &p, len + 4096).unwrap_err());
        assert!(e.contains("the signed image has"), "{e}");
        // A frame without its size is refused (nothing bounds it but the buffer).
        let e = format!(
            "{:#}",
            apply(&old, &patch(&old, &new, true, false), len).unwrap_err()
        );
        assert!(e.contains("does not declare its size"), "{e}");
        // Against another reference: the checksum refuses what it decodes to.
        let other = bytes(9, old.len());
        let e = format!("{:#}", apply(&other, &p, len).unwrap_err());
        assert!(e.contains("another image"), "{e}");
        // A flipped byte in the middle of the frame.
        let mut bad = p.clone();
        let mid = bad.len() / 2;
        bad[mid] ^= 0x40;
        assert!(apply(&old, &bad, len).is_err());
        // Not zstd at all.
        let e = format!("{:#}", apply(&old, b"not a zstd frame", len).unwrap_err());
        assert!(e.contains("not a zstd frame"), "{e}");
    }
}
