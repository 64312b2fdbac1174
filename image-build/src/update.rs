//! `image-build update ...`: signing keys, the trusted root metadata, and the update repository
//! (TUF metadata by `tough`, static files any HTTP server can serve).
//!
//! Repository layout (consistent snapshots, as `tuftool` writes them):
//! `metadata/{N.root.json, N.targets.json, N.snapshot.json, timestamp.json}` and
//! `targets/<sha256>.<name>`. Targets per version: `<variant>-<version>-root.erofs.gz` (the EROFS
//! root, gzip), `<variant>-<version>-root.verity` (its dm-verity hash device),
//! `<variant>-<version>-uki-a.efi` and `...-uki-b.efi` (one UKI per target slot: the slot is on
//! the UKI's command line), `<variant>-<version>-root.chunks.json` (the root cut into
//! content-defined chunks for delta updates; each chunk is stored once, zstd-compressed, as
//! `targets/chunks/<sha256 of the chunk>`, named by that hash in the signed list, and
//! garbage-collected when no listed version uses it), `<variant>-<version>-root.from-<older>.zst`
//! and `<variant>-<version>-uki-<slot>.from-<older>.zst` (the root and UKIs as zstd
//! `--patch-from` patches against an older version's, for the nodes that run it), `ext-<name>-<version>-for-<os version>.raw.gz` (a system extension
//! image, gzip; docs/extensions.md), and `manifest.json`, which lists the versions with their
//! payloads, rollout waves and the extensions that fit each. Release keys live outside the
//! repository; tests generate their own.

use std::collections::HashMap;
use std::io::Write;
use std::num::NonZeroU64;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use aws_lc_rs::rand::SystemRandom;
use keelson_common::update::{
    chunking, compare_versions, extension_target, ChunkEntry, ChunkList, ChunksRef, ExtensionPatch,
    ExtensionPayload, Manifest, Payload, RootPatch, UkiPatch, Wave, CHUNKER, CHUNK_COMPRESSION,
    CHUNK_DIR, MANIFEST_TARGET, ROOT_PATCH_WINDOW_LOG_MAX, UKI_PATCH_WINDOW_LOG_MAX,
};
use tough::editor::signed::{PathExists, SignedRole};
use tough::editor::RepositoryEditor;
use tough::key_source::{KeySource, LocalKeySource};
use tough::schema::{KeyHolder, RoleKeys, RoleType, Root, Signed};
use tough::sign::Sign;
use tough::{ExpirationEnforcement, IntoVec, RepositoryLoader, TargetName};

use crate::manifest::{self, UKI_SLOT_B};
use crate::util::sha256_file;

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting an async runtime for tough")
}

/// Writes a new Ed25519 signing key (PKCS#8 DER, the form `tough` reads Ed25519 keys in;
/// mode 0600). Refuses to overwrite a key.
pub fn keygen(out: &Path) -> Result<()> {
    use aws_lc_rs::signature::Ed25519KeyPair;
    let pkcs8 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new())
        .map_err(|_| anyhow::anyhow!("generating an Ed25519 key failed"))?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode_0600()
        .open(out)
        .with_context(|| format!("creating key file {}", out.display()))?;
    f.write_all(pkcs8.as_ref())?;
    f.sync_all()?;
    Ok(())
}

trait Mode0600 {
    fn mode_0600(&mut self) -> &mut Self;
}

impl Mode0600 for std::fs::OpenOptions {
    fn mode_0600(&mut self) -> &mut Self {
        use std::os::unix::fs::OpenOptionsExt;
        self.mode(0o600)
    }
}

fn key_sources(keys: &[PathBuf]) -> Result<Vec<Box<dyn KeySource>>> {
    if keys.is_empty() {
        bail!("no signing key given (--key KEY.pem)");
    }
    let mut out: Vec<Box<dyn KeySource>> = Vec::new();
    for k in keys {
        let pem = std::fs::read(k).with_context(|| format!("reading key {}", k.display()))?;
        tough::sign::parse_keypair(&pem).map_err(|e| {
            anyhow::anyhow!(
                "{}: not a usable signing key (PKCS#8 DER Ed25519 or ECDSA P-256, or PEM RSA): {e}",
                k.display()
            )
        })?;
        out.push(Box::new(LocalKeySource { path: k.clone() }));
    }
    Ok(out)
}

/// Writes a version-1 `root.json` trusting `keys` for all four top-level roles (threshold 1),
/// signed by them.
pub fn root(keys: &[PathBuf], out: &Path, expires: jiff::Timestamp) -> Result<()> {
    let sources = key_sources(keys)?;
    let mut tuf_keys = HashMap::new();
    let mut ids = Vec::new();
    for k in keys {
        let pem = std::fs::read(k)?;
        let pair = tough::sign::parse_keypair(&pem)
            .map_err(|e| anyhow::anyhow!("{}: {e}", k.display()))?;
        let key = pair.tuf_key();
        let id = key
            .key_id()
            .map_err(|e| anyhow::anyhow!("key id of {}: {e}", k.display()))?;
        ids.push(id.clone());
        tuf_keys.insert(id, key);
    }
    let one = NonZeroU64::new(1).context("nonzero")?;
    let roles = [
        RoleType::Root,
        RoleType::Snapshot,
        RoleType::Targets,
        RoleType::Timestamp,
    ]
    .into_iter()
    .map(|r| {
        (
            r,
            RoleKeys {
                keyids: ids.clone(),
                threshold: one,
                _extra: HashMap::new(),
            },
        )
    })
    .collect();
    let root = Root {
        spec_version: "1.0.0".into(),
        consistent_snapshot: true,
        version: one,
        expires,
        keys: tuf_keys,
        roles,
        _extra: HashMap::new(),
    };
    let signed = runtime()?.block_on(SignedRole::new(
        root.clone(),
        &KeyHolder::Root(root),
        &sources,
        &SystemRandom::new(),
    ))?;
    std::fs::write(out, signed.buffer()).with_context(|| format!("writing {}", out.display()))?;
    Ok(())
}

/// Checks that `path` is TUF root metadata (before it is baked into an image).
pub fn check_root(path: &Path) -> Result<()> {
    let text = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_slice::<Signed<Root>>(&text)
        .with_context(|| format!("{}: not TUF root metadata", path.display()))?;
    Ok(())
}

/// The repository a command signs into.
pub struct RepoOptions {
    /// Repository directory (`metadata/`, `targets/`).
    pub repo: PathBuf,
    /// Its trusted `root.json`.
    pub root: PathBuf,
    pub keys: Vec<PathBuf>,
    /// Lifetime of the targets, snapshot and timestamp metadata.
    pub expires_in: jiff::SignedDuration,
}

/// Options of `image-build update add`.
pub struct AddOptions {
    pub repo: RepoOptions,
    pub image: PathBuf,
    /// `(hours after release, percent of the fleet)`, increasing.
    pub waves: Vec<(u64, u8)>,
    pub release: jiff::Timestamp,
    /// Extension builds (`out/ext/<name>/`) built for this version, listed under it.
    pub extensions: Vec<PathBuf>,
    /// Root patches to publish: against each of the `root_patches` newest listed versions of
    /// the variant older than this one (0: none).
    pub root_patches: usize,
    /// The zstd level root patches are made at ([`ROOT_PATCH_LEVEL`] unless a caller trades
    /// patch size for time, as the tests do).
    pub patch_level: i32,
}

/// Options of `image-build update extension`.
pub struct ExtensionOptions {
    pub repo: RepoOptions,
    /// The OS version (already in the repository) to list the extension under.
    pub os_version: String,
    /// The extension build (`out/ext/<name>/`).
    pub extension: PathBuf,
}

/// A repository opened for a change: its current metadata (if it has any) and manifest.
struct Open {
    rt: tokio::runtime::Runtime,
    existing: Option<tough::Repository>,
    manifest: Manifest,
    sources: Vec<Box<dyn KeySource>>,
}

impl Open {
    fn new(opts: &RepoOptions) -> Result<Open> {
        let sources = key_sources(&opts.keys)?;
        check_root(&opts.root)?;
        let metadata = opts.repo.join("metadata");
        let targets_dir = opts.repo.join("targets");
        std::fs::create_dir_all(&metadata)?;
        std::fs::create_dir_all(&targets_dir)?;
        let rt = runtime()?;
        // The current repository, if any (expired metadata may be re-signed, so not enforced).
        let existing = if metadata.join("timestamp.json").exists() {
            let root_bytes = std::fs::read(&opts.root)?;
            let meta_url = dir_url(&metadata)?;
            let targets_url = dir_url(&targets_dir)?;
            let repo = rt
                .block_on(
                    RepositoryLoader::new(&root_bytes, meta_url, targets_url)
                        .expiration_enforcement(ExpirationEnforcement::Unsafe)
                        .load(),
                )
                .with_context(|| format!("loading the repository in {}", opts.repo.display()))?;
            Some(repo)
        } else {
            None
        };
        let manifest = match &existing {
            Some(repo) => {
                let name = TargetName::new(MANIFEST_TARGET)?;
                let bytes = rt.block_on(async {
                    match repo.read_target(&name).await? {
                        Some(stream) => stream.into_vec().await.map(Some),
                        None => Ok(None),
                    }
                });
                match bytes {
                    Ok(Some(b)) => serde_json::from_slice::<Manifest>(&b)
                        .context("the repository's manifest.json")?,
                    Ok(None) => Manifest::default(),
                    Err(e) => return Err(e).context("reading the repository's manifest.json"),
                }
            }
            None => Manifest::default(),
        };
        Ok(Open {
            rt,
            existing,
            manifest,
            sources,
        })
    }

    /// The hex sha256 of a target the repository already signs, if it has it.
    fn target_sha256(&self, name: &str) -> Result<Option<String>> {
        let Some(repo) = &self.existing else {
            return Ok(None);
        };
        let tn = TargetName::new(name)?;
        Ok(repo
            .targets()
            .signed
            .targets
            .get(&tn)
            .map(|t| hex::encode(&t.hashes.sha256)))
    }

    /// A target's bytes as the repository signs them (length and sha256 checked).
    fn read_target(&self, name: &str) -> Result<Vec<u8>> {
        let repo = self
            .existing
            .as_ref()
            .context("the repository has no metadata yet")?;
        let tn = TargetName::new(name)?;
        self.rt
            .block_on(async {
                match repo.read_target(&tn).await? {
                    Some(stream) => stream.into_vec().await.map(Some),
                    None => Ok(None),
                }
            })
            .with_context(|| format!("reading {name}"))?
            .with_context(|| format!("{name} is not a target"))
    }

    /// The chunks the listed versions' chunk lists name (but `skip`'s), read from the
    /// repository's targets; an unreadable list stops the run, so no chunk a version needs
    /// is ever collected.
    fn used_chunks(&self, skip: &str) -> Result<std::collections::HashSet<String>> {
        let mut used = std::collections::HashSet::new();
        let Some(repo) = &self.existing else {
            return Ok(used);
        };
        for p in &self.manifest.updates {
            let Some(c) = p.chunks.as_ref().filter(|c| c.target != skip) else {
                continue;
            };
            let name = TargetName::new(&c.target)?;
            let bytes = self
                .rt
                .block_on(async {
                    match repo.read_target(&name).await? {
                        Some(stream) => stream.into_vec().await.map(Some),
                        None => Ok(None),
                    }
                })
                .with_context(|| format!("reading {}", c.target))?
                .with_context(|| {
                    format!(
                        "version {} lists {}, which is not a target",
                        p.version, c.target
                    )
                })?;
            let list: ChunkList = serde_json::from_slice(&bytes)
                .with_context(|| format!("{}: not a chunk list", c.target))?;
            used.extend(list.chunks.into_iter().map(|c| c.sha256));
        }
        Ok(used)
    }

    /// Writes the manifest into `staging`, adds it and the files `new_targets` (in `staging`)
    /// as targets, signs targets, snapshot and timestamp with versions one up, and copies the
    /// new targets into the repository.
    fn publish(self, opts: &RepoOptions, staging: &Path, new_targets: &[String]) -> Result<()> {
        let Open {
            rt,
            existing,
            mut manifest,
            sources,
        } = self;
        // What nodes refuse is never signed.
        manifest
            .check()
            .map_err(|e| anyhow::anyhow!("not publishing manifest.json: {e}"))?;
        manifest.sort();
        std::fs::write(
            staging.join(MANIFEST_TARGET),
            serde_json::to_vec_pretty(&manifest)?,
        )?;
        let expires = jiff::Timestamp::now()
            .checked_add(opts.expires_in)
            .map_err(|e| anyhow::anyhow!("expiry: {e}"))?;
        let metadata = opts.repo.join("metadata");
        let targets_dir = opts.repo.join("targets");
        rt.block_on(async {
            let (mut editor, next) = match existing {
                Some(repo) => {
                    let next = |v: NonZeroU64| v.checked_add(1).unwrap_or(v);
                    let t = next(repo.targets().signed.version);
                    let s = next(repo.snapshot().signed.version);
                    let ts = next(repo.timestamp().signed.version);
                    let mut e = RepositoryEditor::from_repo(&opts.root, repo).await?;
                    e.remove_target(&TargetName::new(MANIFEST_TARGET)?)?;
                    (e, (t, s, ts))
                }
                None => {
                    let one = NonZeroU64::MIN;
                    (RepositoryEditor::new(&opts.root).await?, (one, one, one))
                }
            };
            for name in new_targets
                .iter()
                .map(String::as_str)
                .chain([MANIFEST_TARGET])
            {
                let (tn, target) = RepositoryEditor::build_target(staging.join(name)).await?;
                editor.add_target(tn, target)?;
            }
            editor
                .targets_version(next.0)?
                .targets_expires(expires)?
                .snapshot_version(next.1)
                .snapshot_expires(expires)
                .timestamp_version(next.2)
                .timestamp_expires(expires);
            let signed = editor.sign(&sources).await?;
            signed
                .copy_targets(staging, &targets_dir, PathExists::Skip)
                .await?;
            signed.write(&metadata).await?;
            anyhow::Ok(())
        })
        .with_context(|| format!("signing the repository in {}", opts.repo.display()))?;
        // Clients start from root.json next to the numbered copies (tuftool's layout).
        if !metadata.join("1.root.json").exists() {
            std::fs::copy(&opts.root, metadata.join("1.root.json"))?;
        }
        Ok(())
    }

    /// Stages the extension build in `dir` as a target (unless the repository has it already,
    /// byte for byte) and returns its manifest entry; `new_targets` gets its name if staged.
    fn stage_extension(
        &self,
        dir: &Path,
        staging: &Path,
        new_targets: &mut Vec<String>,
    ) -> Result<ExtensionPayload> {
        let ext = manifest::read_extension_id(dir)?;
        let raw = dir.join(&ext.raw.path);
        let len = std::fs::metadata(&raw)
            .with_context(|| format!("the extension image {}", raw.display()))?
            .len();
        if len != ext.raw.size {
            bail!(
                "{}: {len} bytes, not the {} its manifest.json records (rebuild the extension)",
                raw.display(),
                ext.raw.size
            );
        }
        let sha = sha256_file(&raw)?;
        if sha != ext.raw.sha256 {
            bail!(
                "{}: its sha256 is {sha}, not the {} its manifest.json records (rebuild the extension)",
                raw.display(),
                ext.raw.sha256
            );
        }
        let target = extension_target(&ext.name, &ext.version, &ext.os_version);
        let staged = staging.join(&target);
        {
            let mut enc = flate2::write::GzEncoder::new(
                std::fs::File::create(&staged)?,
                flate2::Compression::best(),
            );
            std::io::copy(&mut std::fs::File::open(&raw)?, &mut enc)?;
            enc.finish()?.sync_all()?;
        }
        let gz_sha = sha256_file(&staged)?;
        match self.target_sha256(&target)? {
            Some(have) if have == gz_sha => {}
            Some(have) => bail!(
                "target {target} is already in the repository with sha256 {have}, and {} compresses to {gz_sha}: extensions are immutable, build a new version",
                raw.display()
            ),
            None => new_targets.push(target.clone()),
        }
        Ok(ExtensionPayload {
            name: ext.name,
            version: ext.version,
            roothash: ext.roothash,
            size: std::fs::metadata(&staged)?.len(),
            sha256: gz_sha,
            target,
            built_for: ext.os_version,
            patches: Vec::new(),
        })
    }
}

/// Adds the image in `opts.image` (an `out/<name>/` directory) to the repository as a new
/// version, with the extensions built for it, re-signing targets, snapshot and timestamp.
/// Returns the manifest entry.
pub fn add(opts: &AddOptions) -> Result<Payload> {
    let img = manifest::read_image_id(&opts.image)?;
    let mut last = 0;
    for (i, (_, pct)) in opts.waves.iter().enumerate() {
        if *pct == 0 || *pct > 100 || *pct <= last {
            bail!(
                "wave {}: percentages must increase, between 1 and 100",
                i + 1
            );
        }
        last = *pct;
    }
    let mut open = Open::new(&opts.repo)?;
    let repo = &opts.repo.repo;
    if open
        .manifest
        .updates
        .iter()
        .any(|u| u.version == img.version)
    {
        bail!(
            "version {} is already in the repository {} (versions are immutable: build a new one)",
            img.version,
            repo.display()
        );
    }

    let staging = tempfile::Builder::new()
        .prefix(".staging")
        .tempdir_in(repo)?;
    let stem = format!("{}-{}", img.name, img.version);
    let root_name = format!("{stem}-root.erofs.gz");
    let verity_name = format!("{stem}-root.verity");
    let uki_a = format!("{stem}-uki-a.efi");
    let uki_b = format!("{stem}-uki-b.efi");
    let root_src = opts.image.join("root.erofs");
    let root_size = std::fs::metadata(&root_src)
        .with_context(|| format!("{}", root_src.display()))?
        .len();
    {
        let mut enc = flate2::write::GzEncoder::new(
            std::fs::File::create(staging.path().join(&root_name))?,
            flate2::Compression::best(),
        );
        std::io::copy(&mut std::fs::File::open(&root_src)?, &mut enc)?;
        enc.finish()?.sync_all()?;
    }
    let verity_src = opts.image.join("root.verity");
    let verity_size = std::fs::metadata(&verity_src)?.len();
    std::fs::copy(&verity_src, staging.path().join(&verity_name))?;
    std::fs::copy(opts.image.join(&img.uki), staging.path().join(&uki_a))
        .with_context(|| format!("{}/{}", opts.image.display(), img.uki))?;
    std::fs::copy(opts.image.join(UKI_SLOT_B), staging.path().join(&uki_b)).with_context(|| {
        format!(
            "{}/{UKI_SLOT_B} (rebuild the image with this image-build)",
            opts.image.display()
        )
    })?;
    let chunks_name = format!("{stem}-root.chunks.json");
    let chunk_list = stage_chunks(&root_src, root_size, repo)?;
    std::fs::write(
        staging.path().join(&chunks_name),
        serde_json::to_vec(&chunk_list)?,
    )?;
    let mut new_targets = vec![
        root_name.clone(),
        verity_name.clone(),
        uki_a.clone(),
        uki_b.clone(),
        chunks_name.clone(),
    ];
    // The UKIs as patches against the previous listed version's: a node running it on slot
    // A installs this version's UKI for B from its own UKI for A, and the other way round.
    let mut uki_patches = Vec::new();
    let mut older: Vec<Payload> = open
        .manifest
        .updates
        .iter()
        .filter(|u| {
            u.variant == img.name
                && compare_versions(&u.version, &img.version) == std::cmp::Ordering::Less
        })
        .cloned()
        .collect();
    older.sort_by(|a, b| compare_versions(&b.version, &a.version));
    if let Some(prev) = older.first() {
        for (slot, new_uki, from_uki) in [("a", &uki_a, &prev.uki_b), ("b", &uki_b, &prev.uki_a)] {
            let reference = open.read_target(from_uki)?;
            let new = std::fs::read(staging.path().join(new_uki))?;
            let Some(patch) = uki_patch(&reference, &new)
                .with_context(|| format!("making a patch of {new_uki} from {from_uki}"))?
            else {
                continue;
            };
            let target = format!("{stem}-uki-{slot}.from-{}.zst", prev.version);
            std::fs::write(staging.path().join(&target), &patch)?;
            new_targets.push(target.clone());
            uki_patches.push(UkiPatch {
                slot: slot.into(),
                from_version: prev.version.clone(),
                from_sha256: crate::util::sha256_hex(&reference),
                target,
            });
        }
    }
    // The root as patches against the newest older versions' roots: a node running one of
    // them downloads the patch instead of chunks or the whole root.
    let mut root_patches = Vec::new();
    if !older.is_empty() && opts.root_patches > 0 {
        let new = std::fs::read(&root_src).with_context(|| format!("{}", root_src.display()))?;
        for prev in older.iter().take(opts.root_patches) {
            let reference = gunzip(&open.read_target(&prev.root)?, prev.root_size)
                .with_context(|| format!("decompressing {}", prev.root))?;
            let Some(patch) = image_patch(&reference, &new, opts.patch_level)
                .with_context(|| format!("making a patch of {stem}'s root from {}", prev.root))?
            else {
                continue;
            };
            // A node on `prev` would take the patch first: publish it only if it costs less
            // than the chunks such a node lacks (their list included), which it takes without.
            if let Some(chunks) = chunk_cost(&open, prev, &chunk_list)? {
                if patch.len() as u64 >= chunks {
                    eprintln!(
                        "image-build: no root patch from {}: {} bytes, the chunks a node on it lacks take {chunks}",
                        prev.version,
                        patch.len()
                    );
                    continue;
                }
            }
            let target = format!("{stem}-root.from-{}.zst", prev.version);
            std::fs::write(staging.path().join(&target), &patch)?;
            new_targets.push(target.clone());
            root_patches.push(RootPatch {
                from_version: prev.version.clone(),
                from_roothash: prev.roothash.clone(),
                from_size: prev.root_size,
                target,
            });
        }
    }
    let mut extensions: Vec<ExtensionPayload> = Vec::new();
    for dir in &opts.extensions {
        let id = manifest::read_extension_id(dir)?;
        if id.os_version != img.version {
            bail!(
                "extension {} {} in {} was built for OS {}, not {}: build it for this version (`image-build extension --os-version {} …`), or list it under {} afterwards with `image-build update extension` if it fits",
                id.name,
                id.version,
                dir.display(),
                id.os_version,
                img.version,
                img.version,
                img.version
            );
        }
        let ext = open.stage_extension(dir, staging.path(), &mut new_targets)?;
        if extensions.iter().any(|e| e.name == ext.name) {
            bail!(
                "two extensions named {} for version {}: give one --extension per name",
                ext.name,
                img.version
            );
        }
        extensions.push(ext);
    }
    // Each extension also as a patch against the same extension's image listed under the
    // previous version, when that is another image: a node that has it builds this one from it.
    if let Some(prev) = older.first() {
        for (x, dir) in extensions.iter_mut().zip(&opts.extensions) {
            let Some(old) = prev
                .extensions
                .iter()
                .find(|o| o.name == x.name && o.roothash != x.roothash)
            else {
                continue;
            };
            let id = manifest::read_extension_id(dir)?;
            let new = std::fs::read(dir.join(&id.raw.path))?;
            if new.len() as u64 > EXTENSION_PATCH_MAX {
                continue;
            }
            let reference = gunzip_at_most(&open.read_target(&old.target)?, EXTENSION_PATCH_MAX)
                .with_context(|| format!("decompressing {}", old.target))?;
            let target = format!(
                "{}.from-{}.zst",
                x.target.trim_end_matches(".raw.gz"),
                &old.roothash[..16]
            );
            // The same patch may be listed already (the image listed under another version).
            if open.target_sha256(&target)?.is_none() {
                let Some(patch) =
                    image_patch(&reference, &new, opts.patch_level).with_context(|| {
                        format!("making a patch of {} from {}", x.target, old.target)
                    })?
                else {
                    continue;
                };
                std::fs::write(staging.path().join(&target), &patch)?;
                new_targets.push(target.clone());
            }
            x.patches.push(ExtensionPatch {
                from_roothash: old.roothash.clone(),
                from_size: reference.len() as u64,
                size: new.len() as u64,
                sha256: crate::util::sha256_hex(&new),
                target,
            });
        }
    }
    let waves = opts
        .waves
        .iter()
        .map(|(hours, percent)| {
            let start = opts
                .release
                .checked_add(jiff::SignedDuration::from_hours(*hours as i64))
                .map_err(|e| anyhow::anyhow!("wave start: {e}"))?;
            Ok(Wave {
                start: start.to_string(),
                percent: *percent,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let payload = Payload {
        version: img.version.clone(),
        variant: img.name.clone(),
        roothash: img.roothash_a.clone(),
        root: root_name,
        root_size,
        verity: verity_name,
        verity_size,
        uki_a,
        uki_b,
        released: opts.release.to_string(),
        waves,
        extensions,
        chunks: Some(ChunksRef {
            target: chunks_name.clone(),
            count: chunk_list.chunks.len() as u64,
        }),
        uki_patches,
        root_patches,
    };
    open.manifest.updates.push(payload.clone());
    // Every listed version's chunk list, read before the repository changes: what the chunk
    // store must keep.
    let mut keep: std::collections::HashSet<String> = open.used_chunks(&chunks_name)?;
    keep.extend(chunk_list.chunks.iter().map(|c| c.sha256.clone()));
    open.publish(&opts.repo, staging.path(), &new_targets)?;
    gc_chunks(repo, &keep)?;
    Ok(payload)
}

/// The zstd level UKI patches are made at (with long distance matching the unchanged kernel and
/// initramfs cost almost nothing at any level; higher levels only slow `update add` down).
const UKI_PATCH_LEVEL: i32 = 3;

/// `new` as a zstd `--patch-from` patch against `reference` (its reference prefix): long
/// distance matching, a window covering both, the content size in the frame header. None when
/// the patch would be no smaller than `new`, or would need a window above what nodes decode
/// ([`UKI_PATCH_WINDOW_LOG_MAX`]).
fn uki_patch(reference: &[u8], new: &[u8]) -> Result<Option<Vec<u8>>> {
    use zstd::zstd_safe::CParameter;
    let total = (reference.len() + new.len()).max(2) as u64;
    let window_log = (u64::BITS - (total - 1).leading_zeros()).max(10);
    if window_log > UKI_PATCH_WINDOW_LOG_MAX {
        return Ok(None);
    }
    let mut enc =
        zstd::stream::write::Encoder::with_ref_prefix(Vec::new(), UKI_PATCH_LEVEL, reference)?;
    enc.set_parameter(CParameter::WindowLog(window_log))?;
    enc.set_parameter(CParameter::EnableLongDistanceMatching(true))?;
    enc.set_pledged_src_size(Some(new.len() as u64))?;
    enc.include_contentsize(true)?;
    enc.write_all(new)?;
    let patch = enc.finish()?;
    Ok((patch.len() < new.len()).then_some(patch))
}

/// What a node running `prev` downloads for the new root by chunks: the new chunk list
/// (`list`, as published) and the stored chunks `prev`'s list lacks. None when
/// `prev` has no chunk list (such a node downloads the whole root without a patch).
fn chunk_cost(open: &Open, prev: &Payload, list: &ChunkList) -> Result<Option<u64>> {
    let Some(prev_list) = &prev.chunks else {
        return Ok(None);
    };
    let old: ChunkList = serde_json::from_slice(&open.read_target(&prev_list.target)?)
        .with_context(|| format!("{} is not a chunk list", prev_list.target))?;
    let have: std::collections::HashSet<&str> =
        old.chunks.iter().map(|c| c.sha256.as_str()).collect();
    let mut fetched = std::collections::HashSet::new();
    let missing: u64 = list
        .chunks
        .iter()
        .filter(|c| !have.contains(c.sha256.as_str()) && fetched.insert(c.sha256.as_str()))
        .map(|c| c.stored)
        .sum();
    Ok(Some(serde_json::to_vec(list)?.len() as u64 + missing))
}

/// The zstd level root patches are made at by default: 19 makes a patch of the root with one
/// changed binary about 4x smaller than level 3 does (measured in `bench-update`), at about 20 s
/// and 300 MiB on the publisher, paid once for every node that downloads it.
pub const ROOT_PATCH_LEVEL: i32 = 19;

/// `new` (a root or extension image) as a zstd `--patch-from` patch against `reference` (the
/// image it is applied to): long distance matching and a window covering both, the content
/// size and a checksum in the frame. Nodes decode it in one pass into a buffer of the signed
/// size, so the window costs them no memory. None when the patch would be no smaller than
/// `new`, or the two do not fit zstd's largest window.
fn image_patch(reference: &[u8], new: &[u8], level: i32) -> Result<Option<Vec<u8>>> {
    use zstd::zstd_safe::{CCtx, CParameter};
    let total = (reference.len() + new.len()).max(2) as u64;
    let window_log = (u64::BITS - (total - 1).leading_zeros()).max(10);
    if window_log > ROOT_PATCH_WINDOW_LOG_MAX {
        return Ok(None);
    }
    let zerr = |what: &str, code: usize| {
        anyhow::anyhow!("zstd {what}: {}", zstd::zstd_safe::get_error_name(code))
    };
    let mut cctx = CCtx::create();
    for p in [
        CParameter::CompressionLevel(level),
        CParameter::WindowLog(window_log),
        CParameter::EnableLongDistanceMatching(true),
        CParameter::ChecksumFlag(true),
        CParameter::ContentSizeFlag(true),
    ] {
        cctx.set_parameter(p).map_err(|c| zerr("parameter", c))?;
    }
    cctx.ref_prefix(reference)
        .map_err(|c| zerr("reference", c))?;
    let mut patch = Vec::with_capacity(zstd::zstd_safe::compress_bound(new.len()));
    cctx.compress2(&mut patch, new)
        .map_err(|c| zerr("compression", c))?;
    Ok((patch.len() < new.len()).then_some(patch))
}

/// A gzip target's bytes, decompressed: exactly `size` bytes.
fn gunzip(gz: &[u8], size: u64) -> Result<Vec<u8>> {
    let out = gunzip_at_most(gz, size)?;
    if out.len() as u64 != size {
        bail!("{} bytes, the manifest says {size}", out.len());
    }
    Ok(out)
}

/// A gzip target's bytes, decompressed, if they are at most `max` bytes.
fn gunzip_at_most(gz: &[u8], max: u64) -> Result<Vec<u8>> {
    use std::io::Read;
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(gz)
        .take(max + 1)
        .read_to_end(&mut out)?;
    if out.len() as u64 > max {
        bail!("more than {max} bytes decompressed");
    }
    Ok(out)
}

/// The largest extension image `update add` makes patches against (the agent has to hold the
/// reference and the new image in memory; a larger one comes whole).
const EXTENSION_PATCH_MAX: u64 = 1 << 30;

/// Cuts the root image into chunks, stores each one the repository does not have yet
/// (zstd-compressed, written under a temporary name and renamed, so a cut-off run leaves no
/// half chunk), and returns the chunk list.
fn stage_chunks(root: &Path, root_size: u64, repo: &Path) -> Result<ChunkList> {
    let dir = repo.join("targets").join(CHUNK_DIR);
    std::fs::create_dir_all(&dir)?;
    let mut chunks = Vec::new();
    let mut stored_len: HashMap<String, u64> = HashMap::new();
    let file = std::fs::File::open(root).with_context(|| format!("{}", root.display()))?;
    for cut in chunking::cut(std::io::BufReader::new(file)) {
        let cut = cut.with_context(|| format!("cutting {} into chunks", root.display()))?;
        let sha = hex::encode(cut.sha256);
        let stored = match stored_len.get(&sha) {
            Some(n) => *n,
            None => {
                let path = dir.join(&sha);
                let n = match std::fs::metadata(&path) {
                    Ok(m) => m.len(),
                    Err(_) => {
                        let z = zstd::bulk::compress(&cut.data, 9)
                            .with_context(|| format!("compressing chunk {sha}"))?;
                        let tmp = dir.join(format!(".{sha}.tmp"));
                        std::fs::write(&tmp, &z)?;
                        std::fs::rename(&tmp, &path)?;
                        z.len() as u64
                    }
                };
                stored_len.insert(sha.clone(), n);
                n
            }
        };
        chunks.push(ChunkEntry {
            sha256: sha,
            offset: cut.offset,
            length: cut.data.len() as u64,
            stored,
        });
    }
    let list = ChunkList {
        chunker: CHUNKER.into(),
        compression: CHUNK_COMPRESSION.into(),
        size: root_size,
        chunks,
    };
    list.check(root_size)
        .map_err(|e| anyhow::anyhow!("{}: the chunk list came out wrong: {e}", root.display()))?;
    Ok(list)
}

/// Removes every stored chunk no listed version uses (and leftovers of cut-off runs).
fn gc_chunks(repo: &Path, keep: &std::collections::HashSet<String>) -> Result<u64> {
    let dir = repo.join("targets").join(CHUNK_DIR);
    let mut removed = 0;
    for e in std::fs::read_dir(&dir).with_context(|| format!("{}", dir.display()))? {
        let e = e?;
        let name = e.file_name().to_string_lossy().into_owned();
        if !keep.contains(&name) {
            std::fs::remove_file(e.path())
                .with_context(|| format!("removing unused chunk {}", e.path().display()))?;
            removed += 1;
        }
    }
    Ok(removed)
}

/// What `update extension` did.
#[derive(Debug)]
pub struct Listed {
    pub extension: ExtensionPayload,
    /// The entry of the same name it replaced under that OS version.
    pub replaced: Option<ExtensionPayload>,
}

/// Lists an extension build under an OS version already in the repository (signing its image
/// as a target if the repository does not have it yet): the repository says it fits that
/// version, whatever version it was built for.
pub fn list_extension(opts: &ExtensionOptions) -> Result<Listed> {
    let mut open = Open::new(&opts.repo)?;
    let repo = &opts.repo.repo;
    if !open
        .manifest
        .updates
        .iter()
        .any(|u| u.version == opts.os_version)
    {
        let have: Vec<&str> = open
            .manifest
            .updates
            .iter()
            .map(|u| u.version.as_str())
            .collect();
        bail!(
            "OS version {} is not in the repository {} (it has: {}); add it first with `image-build update add`",
            opts.os_version,
            repo.display(),
            if have.is_empty() { "none".to_owned() } else { have.join(", ") }
        );
    }
    let staging = tempfile::Builder::new()
        .prefix(".staging")
        .tempdir_in(repo)?;
    let mut new_targets = Vec::new();
    let ext = open.stage_extension(&opts.extension, staging.path(), &mut new_targets)?;
    let payload = open
        .manifest
        .updates
        .iter_mut()
        .find(|u| u.version == opts.os_version)
        .context("the OS version vanished")?;
    let replaced = match payload.extensions.iter().position(|e| e.name == ext.name) {
        Some(i) if payload.extensions[i] == ext => bail!(
            "extension {} {} is already listed under OS version {}",
            ext.name,
            ext.version,
            opts.os_version
        ),
        Some(i) => Some(std::mem::replace(&mut payload.extensions[i], ext.clone())),
        None => {
            payload.extensions.push(ext.clone());
            payload.extensions.sort_by(|a, b| a.name.cmp(&b.name));
            None
        }
    };
    open.publish(&opts.repo, staging.path(), &new_targets)?;
    Ok(Listed {
        extension: ext,
        replaced,
    })
}

fn dir_url(dir: &Path) -> Result<url::Url> {
    let abs = std::fs::canonicalize(dir)?;
    url::Url::from_directory_path(&abs)
        .map_err(|()| anyhow::anyhow!("{} is not an absolute directory", abs.display()))
}
