//! Checking the repository and installing a version into the inactive slot.
//!
//! Order (each step durable before the next, so a crash or power cut anywhere leaves the
//! running slot's entry untouched and no entry pointing at a half-written slot):
//! 1. refresh TUF metadata (signatures, expiry, rollback and freeze protection are tough's),
//!    read the signed manifest, pick the version;
//! 2. check sizes (slot partitions, ESP free space) before touching anything; download the UKI
//!    (as a patch against the running one when the repository has one for it: `uki`) and, on
//!    a node booted with Secure Boot on, refuse it unless the firmware's db trusts its
//!    signature (`secure_boot`);
//! 3. delete every boot entry of the target slot (fsync the directory): from here on the slot
//!    is not bootable;
//! 4. write the root into the slot: as patched from the running root (`root_patch`: the patch
//!    downloaded and applied in step 2, before the slot is touched), by delta (`delta`: the
//!    running slot's chunks copied, the missing ones downloaded and checked; decided in step 2),
//!    or by streaming the compressed root (sha256 and length checked against the signed targets
//!    metadata as it streams; ranged re-requests resume a dropped download), which is also what
//!    a delta that fails falls back to; then the verity hash device; fsync both;
//! 5. read the slot back and recompute the dm-verity tree: its root hash must be the signed
//!    one;
//! 6. write the slot's UKI (downloaded in step 2) under a temporary name, check its command line
//!    (slot, root hash) and `.osrel` version, fsync, rename it to `keelson_<version>+<tries>.efi`,
//!    fsync the directory.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use keelson_common::api::update::{OfferedVersion, Phase};
use keelson_common::update::{compare_versions, Manifest, Payload, MANIFEST_TARGET};
use keelson_common::verity;
use sha2::{Digest, Sha256};
use tough::{IntoVec, RepositoryLoader, TargetName};
use url::Url;

use super::delta;
use super::http;
use super::root_patch;
use super::secure_boot;
use super::slots::{self, Layout};
use super::uki;
use super::Agent;
use keelson_spec::update::UpdateSpec;

/// The loaded, verified repository.
pub struct Repo {
    pub repo: tough::Repository,
    pub targets: Url,
}

/// Refreshes the TUF metadata from the repository (persisting what it trusts in `datastore`).
pub async fn load_repo(spec: &UpdateSpec, trusted_root: &Path, datastore: &Path) -> Result<Repo> {
    let Some(base) = &spec.repository else {
        bail!("no update repository configured (set [update] repository in the config)");
    };
    let base = if base.ends_with('/') {
        base.clone()
    } else {
        format!("{base}/")
    };
    let base = Url::parse(&base).with_context(|| format!("update.repository {base:?}"))?;
    let metadata = base.join("metadata/")?;
    let targets = base.join("targets/")?;
    let root = std::fs::read(trusted_root).with_context(|| {
        format!(
            "reading the trusted root metadata {} (was the image built with [update] trusted_root?)",
            trusted_root.display()
        )
    })?;
    std::fs::create_dir_all(datastore)?;
    let repo = RepositoryLoader::new(&root, metadata.clone(), targets.clone())
        .transport(http::AgentTransport)
        .datastore(datastore)
        .load()
        .await
        .map_err(|e| anyhow::anyhow!("repository {base} rejected: {}", chain(&e)))?;
    Ok(Repo { repo, targets })
}

pub(crate) fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    s
}

/// The signed manifest.
pub async fn read_manifest(repo: &Repo) -> Result<Manifest> {
    let name = TargetName::new(MANIFEST_TARGET)?;
    let stream = repo
        .repo
        .read_target(&name)
        .await
        .map_err(|e| anyhow::anyhow!("manifest.json: {}", chain(&e)))?
        .context("the repository has no manifest.json target")?;
    let bytes = stream
        .into_vec()
        .await
        .map_err(|e| anyhow::anyhow!("manifest.json: {}", chain(&e)))?;
    parse_manifest(&bytes)
}

/// `manifest.json`'s bytes as a checked manifest, newest version first.
pub fn parse_manifest(bytes: &[u8]) -> Result<Manifest> {
    let mut m: Manifest = serde_json::from_slice(bytes).context("manifest.json is not valid")?;
    // Signed, but what goes into file names is checked all the same.
    m.check()
        .map_err(|e| anyhow::anyhow!("manifest.json is refused: {e}"))?;
    m.sort();
    Ok(m)
}

/// What the node is, for choosing a version.
pub struct Node {
    pub version: String,
    pub variant: String,
    /// 0..100, from the machine id: the node's place in rollout waves.
    pub seed: u8,
    pub target_slot: String,
}

/// Why [`select`] chose no version to install.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NoPick {
    /// The requested version is offered but not eligible (the verdict says why).
    #[error("version {version} refused: {verdict}")]
    Refused { version: String, verdict: String },
    /// The requested version is not offered for this node's variant.
    #[error("version {version} is not in the repository for variant {variant}")]
    NotOffered { version: String, variant: String },
    /// Nothing eligible is newer than what runs.
    #[error("no update available (running {running})")]
    NoneAvailable { running: String },
}

/// The verdict on each offered version and the one to install.
pub fn select(
    m: &Manifest,
    node: &Node,
    spec: &UpdateSpec,
    requested: Option<&str>,
    force: bool,
    now: jiff::Timestamp,
) -> (Vec<OfferedVersion>, Result<Payload, NoPick>) {
    let mut offered = Vec::new();
    let mut chosen: Option<Payload> = None;
    let mut refusal: Option<NoPick> = None;
    for p in m.updates.iter().filter(|p| p.variant == node.variant) {
        let newer = compare_versions(&p.version, &node.version);
        let verdict = if newer == std::cmp::Ordering::Equal {
            "running".to_string()
        } else if newer == std::cmp::Ordering::Less && !force {
            "older (a downgrade needs --force)".to_string()
        } else if let Some(max) = spec
            .max_version
            .as_ref()
            .filter(|max| compare_versions(&p.version, max).is_gt() && !force)
        {
            format!("above max_version {max}")
        } else if let Some(w) = wave_verdict(p, node.seed, now).filter(|_| !force) {
            w
        } else {
            "eligible".to_string()
        };
        let wanted = requested.is_none_or(|r| r == p.version);
        if wanted && chosen.is_none() && refusal.is_none() {
            if verdict == "eligible" {
                chosen = Some(p.clone());
            } else if requested.is_some() {
                refusal = Some(NoPick::Refused {
                    version: p.version.clone(),
                    verdict: verdict.clone(),
                });
            }
        }
        offered.push(OfferedVersion {
            version: p.version.clone(),
            download_size: 0,
            delta_size: None,
            delta_note: None,
            verdict,
        });
    }
    let result = match (chosen, refusal, requested) {
        (Some(p), _, _) => Ok(p),
        (None, Some(r), _) => Err(r),
        (None, None, Some(r)) => Err(NoPick::NotOffered {
            version: r.to_string(),
            variant: node.variant.clone(),
        }),
        (None, None, None) => Err(NoPick::NoneAvailable {
            running: node.version.clone(),
        }),
    };
    (offered, result)
}

fn wave_verdict(p: &Payload, seed: u8, now: jiff::Timestamp) -> Option<String> {
    if p.waves.is_empty() {
        return None;
    }
    let mut next: Option<String> = None;
    for w in &p.waves {
        let Ok(start) = w.start.parse::<jiff::Timestamp>() else {
            return Some(format!("wave start {:?} unreadable", w.start));
        };
        if seed < w.percent {
            if start <= now {
                return None;
            }
            next.get_or_insert(w.start.clone());
        }
    }
    Some(match next {
        Some(t) => format!("waiting for its wave (this node from {t})"),
        None => "not rolled out to this node".into(),
    })
}

/// The signed length and sha256 of a target, and its URL.
pub(crate) fn target_info(repo: &Repo, name: &str) -> Result<(u64, Vec<u8>, Url)> {
    let tn = TargetName::new(name)?;
    let t = repo
        .repo
        .targets()
        .signed
        .targets
        .get(&tn)
        .with_context(|| format!("target {name} is not in the signed targets metadata"))?;
    let sha: Vec<u8> = t.hashes.sha256.to_vec();
    let file = if repo.repo.root().signed.consistent_snapshot {
        format!("{}.{name}", hex::encode(&sha))
    } else {
        name.to_string()
    };
    Ok((t.length, sha, repo.targets.join(&file)?))
}

/// Download sizes of a version for a slot.
pub fn download_size(repo: &Repo, p: &Payload, slot: &str) -> u64 {
    [p.root.as_str(), p.verity.as_str(), p.uki_for(slot)]
        .iter()
        .filter_map(|n| target_info(repo, n).ok().map(|(len, _, _)| len))
        .sum()
}

/// Streams a target into `sink`, checking length and sha256 against the signed metadata, and
/// resuming with range requests after a dropped connection.
pub(crate) async fn stream_target(
    agent: &Agent,
    repo: &Repo,
    name: &str,
    sink: &mut dyn FnMut(&[u8]) -> Result<()>,
) -> Result<u64> {
    let (len, sha, url) = target_info(repo, name)?;
    let mut hasher = Sha256::new();
    let mut got = 0u64;
    let mut failures = 0u32;
    let mut feed = |chunk: &[u8], got: &mut u64, hasher: &mut Sha256| -> Result<()> {
        if *got + chunk.len() as u64 > len {
            bail!("{name}: the repository sent more than the {len} bytes its signed metadata allow (refused)");
        }
        hasher.update(chunk);
        sink(chunk)?;
        *got += chunk.len() as u64;
        agent.add_downloaded(chunk.len() as u64);
        agent.check_cancel()?;
        Ok(())
    };
    if url.scheme() == "file" {
        let path = url
            .to_file_path()
            .map_err(|()| anyhow::anyhow!("bad file URL {url}"))?;
        let mut f = File::open(&path).with_context(|| format!("{name}: {}", path.display()))?;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = f.read(&mut buf)?;
            if n == 0 {
                break;
            }
            feed(&buf[..n], &mut got, &mut hasher)?;
        }
    } else {
        while got < len {
            let before = got;
            let result: Result<(), http::HttpError> = async {
                let (mut body, start, _) = http::get(&url, got).await?;
                let mut skip = got.saturating_sub(start);
                while let Some(chunk) = body.chunk().await? {
                    let mut c = &chunk[..];
                    if skip > 0 {
                        let s = skip.min(c.len() as u64) as usize;
                        c = &c[s..];
                        skip -= s as u64;
                    }
                    if !c.is_empty() {
                        feed(c, &mut got, &mut hasher).map_err(|e| http::HttpError::Status {
                            url: format!("{e:#}"),
                            status: 0,
                        })?;
                    }
                }
                Ok(())
            }
            .await;
            match result {
                Ok(()) if got >= len => break,
                Ok(()) => {
                    // The connection ended early: resume from `got`.
                    failures += 1;
                    agent.emit(
                        "update-retry",
                        format!("{name}: connection closed at {got} of {len} bytes; resuming"),
                    );
                }
                Err(http::HttpError::Status { url, status: 0 }) => bail!("{url}"),
                Err(e) if e.transient() => {
                    failures += 1;
                    agent.emit(
                        "update-retry",
                        format!("{name}: {e} at {got} of {len} bytes; resuming"),
                    );
                }
                Err(e) => return Err(e).with_context(|| format!("downloading {name}")),
            }
            if got > before {
                failures = failures.min(1);
            }
            if failures > 5 {
                bail!("{name}: download failed 5 times in a row at {got} of {len} bytes; the slot stays unbootable, apply again to retry");
            }
            agent.check_cancel()?;
            tokio::time::sleep(Duration::from_millis(500 * u64::from(failures))).await;
        }
    }
    if got != len {
        bail!(
            "{name}: truncated: {got} of the {len} signed bytes (refused; nothing marked bootable)"
        );
    }
    let digest = hasher.finalize();
    if digest.as_slice() != sha.as_slice() {
        bail!(
            "{name}: sha256 {} does not match the signed {} (tampered or corrupted payload refused; nothing marked bootable)",
            hex::encode(digest),
            hex::encode(&sha)
        );
    }
    Ok(got)
}

/// Writes into a slot partition, refusing to go past `limit`.
struct Bounded {
    f: File,
    written: u64,
    limit: u64,
    what: String,
}

impl Write for Bounded {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.written + buf.len() as u64 > self.limit {
            return Err(std::io::Error::other(format!(
                "{} would exceed its declared {} bytes",
                self.what, self.limit
            )));
        }
        self.f.write_all(buf)?;
        self.written += buf.len() as u64;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.f.flush()
    }
}

fn open_dev(path: &Path) -> Result<File> {
    std::fs::OpenOptions::new()
        .write(true)
        .read(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))
}

/// Drops the page cache of a device so a read-back sees the disk.
fn drop_cache(f: &File) {
    use std::os::fd::AsRawFd;
    // SAFETY: fadvise on an open descriptor only affects the page cache.
    unsafe {
        libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED);
    }
}

/// What an install produced.
pub struct Installed {
    pub entry: String,
    pub version: String,
}

/// Installs `p` into the other slot of `layout` (see the module docs for the order).
pub async fn install(
    agent: &Agent,
    repo: &Repo,
    layout: &Layout,
    p: &Payload,
    tries: u32,
    delta_max_percent: u8,
) -> Result<Installed> {
    let slot = layout.running.other();
    let letter = slot.letter();
    let t = &layout.target;
    // 2. Sizes first.
    if p.root_size > t.root_size {
        bail!(
            "version {}'s root is {} bytes but slot {letter}'s partition holds {} (full disk: nothing written)",
            p.version, p.root_size, t.root_size
        );
    }
    if p.verity_size > t.verity_size {
        bail!(
            "version {}'s verity tree is {} bytes but slot {letter}'s verity partition holds {} (nothing written)",
            p.version, p.verity_size, t.verity_size
        );
    }
    if p.root_size == 0 || p.root_size % verity::BLOCK != 0 {
        bail!(
            "version {}'s root size {} is not a positive multiple of 4096 (bad manifest)",
            p.version,
            p.root_size
        );
    }
    let (uki_len, _, _) = target_info(repo, p.uki_for(letter))?;
    let (root_len, _, _) = target_info(repo, &p.root)?;
    let (verity_len, _, _) = target_info(repo, &p.verity)?;
    if verity_len != p.verity_size {
        bail!(
            "manifest and targets disagree on {}'s size (refused)",
            p.verity
        );
    }
    // The root as a patch against the running one, when the repository has one for it:
    // downloaded and applied in memory before anything is written.
    let (patched_root, patch_spent) = match root_patch::plan(
        repo,
        layout.running_root.as_deref(),
        &layout.roothash,
        p,
        root_len,
        delta_max_percent,
    ) {
        Ok(plan) => {
            agent.emit(
                "update-delta",
                format!(
                    "{} by root patch: downloading {} KiB ({}) instead of the {} KiB root, applying it to the running root ({}'s) in slot {}",
                    p.version,
                    plan.patch_len >> 10,
                    plan.patch.target,
                    root_len >> 10,
                    plan.patch.from_version,
                    layout.running.letter()
                ),
            );
            // Progress while the patch downloads; the whole install's total follows below.
            agent.set_progress_total(plan.patch_len);
            match root_patch::assemble(agent, repo, &plan, p).await {
                Ok(root) => {
                    agent.emit(
                        "update-root-patch",
                        format!(
                            "{}'s root built from the running one ({}'s): downloaded {} KiB instead of {} KiB",
                            p.version,
                            plan.patch.from_version,
                            plan.patch_len >> 10,
                            root_len >> 10
                        ),
                    );
                    (Some(root), plan.patch_len)
                }
                Err(e) => {
                    agent.check_cancel()?;
                    agent.emit(
                        "update-delta-fallback",
                        format!(
                            "{}'s root patch {}: {e:#}; trying its chunks",
                            p.version, plan.patch.target
                        ),
                    );
                    (None, plan.patch_len)
                }
            }
        }
        Err(why) => {
            tracing::info!("update: {why}");
            (None, 0)
        }
    };
    // Else a delta from the running slot's chunks, or the full root (and why), decided before
    // anything is written.
    let decision = if patched_root.is_some() {
        delta::Decision {
            planned: None,
            whole: None,
        }
    } else {
        delta::decide(
            agent,
            repo,
            layout.running_root.as_deref(),
            &layout.roothash,
            p,
            root_len,
            delta_max_percent,
        )
        .await
    };
    agent.check_cancel()?;
    // The chunk list was downloaded to decide: it counts, as does a root patch.
    let list_len = decision
        .planned
        .as_ref()
        .map_or(0, |(plan, _)| plan.list_len)
        + patch_spent;
    let delta = match decision {
        _ if patched_root.is_some() => None,
        delta::Decision {
            planned: Some((plan, index)),
            whole: None,
        } => {
            agent.emit(
                "update-delta",
                format!(
                    "{} by delta: downloading {} KiB of chunks instead of the {} KiB root ({} of {} chunks), copying {} KiB from slot {}",
                    p.version,
                    plan.download >> 10,
                    root_len >> 10,
                    plan.missing.len(),
                    plan.list.chunks.len(),
                    plan.copied >> 10,
                    layout.running.letter()
                ),
            );
            Some((plan, index))
        }
        delta::Decision { whole, .. } => {
            agent.emit(
                "update-delta-fallback",
                format!(
                    "{} comes whole ({} KiB root): {}",
                    p.version,
                    root_len >> 10,
                    whole.unwrap_or_default()
                ),
            );
            None
        }
    };
    let root_download = match (&patched_root, &delta) {
        (Some(_), _) => patch_spent,
        (None, Some((plan, _))) => plan.download + patch_spent,
        (None, None) => root_len + list_len,
    };
    // The UKI as a patch against the running one, when the repository has one for it.
    let uki_name = p.uki_for(letter);
    let uki_plan = match if delta_max_percent == 0 {
        Err("deltas are off (update.delta_max_percent = 0)".to_string())
    } else {
        uki::plan(repo, layout, p, letter, uki_len)
    } {
        Ok(plan) => Some(plan),
        Err(why) => {
            agent.emit(
                "update-delta-fallback",
                format!(
                    "{}'s UKI for slot {letter} comes whole ({} KiB): {why}",
                    p.version,
                    uki_len >> 10
                ),
            );
            None
        }
    };
    let uki_download = uki_plan.as_ref().map_or(uki_len, |u| u.patch_len);
    agent.set_progress_total(root_download + verity_len + uki_download);
    agent.add_downloaded(list_len);
    let old: Vec<_> = slots::entries(&layout.esp)?
        .into_iter()
        .filter(|e| e.slot == Some(slot))
        .collect();
    let freed: u64 = old
        .iter()
        .filter_map(|e| std::fs::metadata(slots::uki_dir(&layout.esp).join(&e.file)).ok())
        .map(|m| m.len())
        .sum();
    let vfs = nix::sys::statvfs::statvfs(&layout.esp).context("statvfs on the ESP")?;
    let free = vfs.blocks_available() * vfs.fragment_size();
    if free + freed < uki_len + (1 << 20) {
        bail!(
            "the ESP has {} KiB free (counting slot {letter}'s old entry), the UKI needs {} KiB (full disk: nothing written)",
            (free + freed) >> 10,
            uki_len >> 10
        );
    }

    // The UKI before anything is written: on a Secure Boot node, one the firmware would not
    // boot (unsigned, tampered, signed by a key not in db, or in dbx) is refused here.
    let patched = match &uki_plan {
        Some(plan) => match uki::assemble(agent, repo, plan, uki_name).await {
            Ok(uki) => {
                agent.emit(
                    "update-uki-patch",
                    format!(
                        "{}'s UKI for slot {letter} built from the running one ({}'s): downloaded {} KiB instead of {} KiB",
                        p.version,
                        plan.patch.from_version,
                        plan.patch_len >> 10,
                        uki_len >> 10
                    ),
                );
                Some(uki)
            }
            Err(e) => {
                agent.check_cancel()?;
                agent.emit(
                    "update-delta-fallback",
                    format!(
                        "{}'s UKI for slot {letter}: {e:#}; downloading the whole UKI ({} KiB) instead",
                        p.version,
                        uki_len >> 10
                    ),
                );
                agent.add_progress_total(uki_len);
                None
            }
        },
        None => None,
    };
    let uki = match patched {
        Some(uki) => uki,
        None => {
            let mut uki = Vec::with_capacity(uki_len as usize);
            stream_target(agent, repo, uki_name, &mut |chunk| {
                uki.extend_from_slice(chunk);
                Ok(())
            })
            .await?;
            uki
        }
    };
    let uki_what = format!(
        "{}'s UKI for slot {letter} ({})",
        p.version,
        p.uki_for(letter)
    );
    match &layout.efivars {
        Some(efivars) => match secure_boot::enforcing(efivars)? {
            Some(fw) => {
                let signer = secure_boot::check(&uki, &uki_what, &fw)?;
                agent.emit(
                    "update-uki-verified",
                    format!("{uki_what} is signed by {signer:?}, trusted by the firmware's db"),
                );
            }
            None => {
                tracing::debug!("update: Secure Boot is off; the UKI's signature is not checked")
            }
        },
        None => tracing::debug!("update: no UEFI; the UKI's signature is not checked"),
    }

    // 3. The target slot stops being bootable.
    for e in &old {
        slots::remove(&layout.esp, &e.file)?;
        agent.emit(
            "update-slot-invalidated",
            format!("removed {} (slot {letter} is being rewritten)", e.file),
        );
    }

    // 4. Root, then verity.
    agent.set_phase(Phase::Downloading);
    if let Some(root) = &patched_root {
        write_root(agent, root, &t.root, letter)?;
    } else if let Some((plan, index)) = &delta {
        let running = layout.running_root.as_deref().context("no running root")?;
        match delta::assemble(agent, repo, plan, index, running, &t.root, letter).await {
            Ok(()) => {}
            Err(e) => {
                agent.check_cancel()?;
                agent.emit(
                    "update-delta-fallback",
                    format!(
                        "assembling {} from chunks failed: {e:#}; downloading the full root ({} KiB) instead",
                        p.version,
                        root_len >> 10
                    ),
                );
                agent.add_progress_total(root_len);
                write_full_root(agent, repo, p, &t.root, letter).await?;
            }
        }
    } else {
        write_full_root(agent, repo, p, &t.root, letter).await?;
    }
    let mut verity_bytes = Vec::with_capacity(p.verity_size as usize);
    stream_target(agent, repo, &p.verity, &mut |chunk| {
        verity_bytes.extend_from_slice(chunk);
        Ok(())
    })
    .await?;
    let mut vdev = open_dev(&t.verity)?;
    vdev.write_all(&verity_bytes)
        .with_context(|| format!("writing {} into slot {letter}", p.verity))?;
    vdev.sync_all().context("syncing the verity partition")?;

    // 5. Read back and verify.
    agent.set_phase(Phase::Verifying);
    let sb = verity::Superblock::decode(&verity_bytes)
        .map_err(|e| anyhow::anyhow!("{}: not a verity hash device: {e}", p.verity))?;
    let mut rdev = File::open(&t.root)?;
    drop_cache(&rdev);
    let tree = verity::build(
        &mut (&mut rdev).take(p.root_size),
        p.root_size,
        &sb.salt,
        sb.uuid,
    )
    .context("reading slot back")?;
    let computed = verity::to_hex(&tree.root_hash);
    if computed != p.roothash {
        bail!(
            "slot {letter} failed verification after writing: its dm-verity root hash is {computed}, the signed manifest says {} (not made bootable)",
            p.roothash
        );
    }
    let mut vback = vec![0u8; tree.hash_device.len()];
    let mut vr = File::open(&t.verity)?;
    drop_cache(&vr);
    vr.read_exact(&mut vback)?;
    if vback != tree.hash_device {
        bail!("slot {letter}'s verity partition does not read back as written (not made bootable)");
    }

    // 6. The boot entry, last.
    agent.set_phase(Phase::Installing);
    let dir = slots::uki_dir(&layout.esp);
    let part = dir.join(part_name(&p.version));
    let result = async {
        // The ESP's rules (`keelson_common::durable::vfat`): a fixed temporary name whose
        // leftover from a cut attempt is removed first, fsync, then a rename made durable.
        let mut f = keelson_common::durable::vfat::create(&dir, &part_name(&p.version))?;
        f.write_all(&uki).context("writing the UKI to the ESP")?;
        f.sync_all().context("syncing the UKI")?;
        check_uki(&part, p, letter)?;
        let entry = format!("keelson_{}+{tries}.efi", p.version);
        let part_name = part_name(&p.version);
        slots::rename(&layout.esp, &part_name, &entry)?;
        Ok::<_, anyhow::Error>(entry)
    }
    .await;
    match result {
        Ok(entry) => Ok(Installed {
            entry,
            version: p.version.clone(),
        }),
        Err(e) => {
            let _ = keelson_common::durable::vfat::remove(&dir, &part_name(&p.version));
            Err(e)
        }
    }
}

/// Writes a root assembled in memory (from a root patch) into the slot's root partition
/// `dev_path` and syncs it.
fn write_root(agent: &Agent, root: &[u8], dev_path: &Path, letter: &str) -> Result<()> {
    let mut dev = open_dev(dev_path)?;
    let mut written = 0;
    for piece in root.chunks(4 << 20) {
        dev.write_all(piece)
            .with_context(|| format!("writing the root into slot {letter}"))?;
        written += piece.len() as u64;
        agent.set_written(written);
        agent.check_cancel()?;
    }
    dev.sync_all().context("syncing the root partition")?;
    Ok(())
}

/// Streams the full (gzip) root into the slot's root partition `dev_path` and syncs it.
async fn write_full_root(
    agent: &Agent,
    repo: &Repo,
    p: &Payload,
    dev_path: &Path,
    letter: &str,
) -> Result<()> {
    let mut dev = open_dev(dev_path)?;
    dev.seek(SeekFrom::Start(0))?;
    let mut gz = flate2::write::GzDecoder::new(Bounded {
        f: dev,
        written: 0,
        limit: p.root_size,
        what: format!("{} (uncompressed)", p.root),
    });
    stream_target(agent, repo, &p.root, &mut |chunk| {
        gz.write_all(chunk)
            .with_context(|| format!("writing {} into slot {letter}", p.root))?;
        agent.set_written(gz.get_ref().written);
        Ok(())
    })
    .await?;
    gz.try_finish()
        .with_context(|| format!("{}: gzip stream incomplete", p.root))?;
    let bounded = gz
        .finish()
        .with_context(|| format!("{}: gzip stream incomplete", p.root))?;
    if bounded.written != p.root_size {
        bail!(
            "{}: decompressed to {} bytes, the manifest says {} (refused)",
            p.root,
            bounded.written,
            p.root_size
        );
    }
    bounded.f.sync_all().context("syncing the root partition")?;
    Ok(())
}

fn part_name(version: &str) -> String {
    format!(".keelson_{version}.efi.part")
}

/// The UKI must boot the slot it is written for, with the signed root hash and version.
fn check_uki(path: &Path, p: &Payload, letter: &str) -> Result<()> {
    let cmd = slots::pe_section(path, ".cmdline")?.context("the UKI has no .cmdline")?;
    let c = keelson_common::cmdline::Cmdline::parse(&String::from_utf8_lossy(&cmd));
    if c.get(keelson_common::cmdline::SLOT) != Some(letter) {
        bail!(
            "the UKI for slot {letter} boots slot {:?} (refused)",
            c.get(keelson_common::cmdline::SLOT)
        );
    }
    if c.get(keelson_common::cmdline::ROOTHASH) != Some(p.roothash.as_str()) {
        bail!("the UKI's root hash differs from the signed manifest's (refused)");
    }
    let osrel = slots::pe_section(path, ".osrel")?.context("the UKI has no .osrel")?;
    let osrel = String::from_utf8_lossy(&osrel);
    let v = osrel
        .lines()
        .find_map(|l| l.strip_prefix("IMAGE_VERSION="))
        .map(|v| v.trim_matches('"'));
    if v != Some(p.version.as_str()) {
        bail!(
            "the UKI is version {:?} but is offered as {} (refused)",
            v.unwrap_or("?"),
            p.version
        );
    }
    Ok(())
}
