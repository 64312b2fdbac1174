//! Delta updates: the new root built from the running slot's chunks plus the missing ones.
//!
//! The repository lists each version's root as content-defined chunks (a signed target, see
//! `keelson_common::update::ChunkList`). The agent cuts the running slot's root, read through
//! its dm-verity device (every block checked against the root hash the node booted with), with
//! the same chunker, copies every chunk it has into the target slot (re-hashing it as it
//! copies), and downloads only the others (`targets/chunks/<sha256>`, zstd; each one's stored
//! length, decompressed length and sha256 checked on arrival, a few in parallel). The install's
//! read-back dm-verity check stays the final word: a chunking bug can never make a bad slot
//! bootable. Anything that goes wrong here ends in the full payload, reported as an event.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use futures_util::StreamExt;
use keelson_common::update::{
    chunk_list_max_bytes, chunking, ChunkEntry, ChunkList, Payload, CHUNKER, CHUNK_DIR, CHUNK_MAX,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::install::{self, Repo};
use super::{http, Agent};

/// Chunks downloaded at once.
pub const PARALLEL: usize = 4;
/// Where the running slot's index is kept between runs (in the agent's state directory).
const INDEX_FILE: &str = "delta-index.json";

/// The running slot's chunks: sha256 → (offset, length).
pub struct Index {
    chunks: HashMap<[u8; 32], (u64, u64)>,
}

/// The index as cached on /var. Only a hint: every chunk copied from the slot is hashed again,
/// so a stale or tampered cache can cost a fallback, never a bad slot.
#[derive(Serialize, Deserialize)]
struct CachedIndex {
    roothash: String,
    chunker: String,
    chunks: Vec<(String, u64, u64)>,
}

fn unhex(s: &str) -> Option<[u8; 32]> {
    let v = hex::decode(s).ok()?;
    v.try_into().ok()
}

/// Cuts the running slot's root (`dev`, booted with `roothash`) into chunks, or reads the index
/// an earlier run cached for the same root hash. Memory: one entry per chunk (a 1 GiB root has
/// about 32768), one chunk of data at a time.
pub fn index(dev: &Path, roothash: &str, state_dir: &Path) -> Result<Index> {
    let cache = state_dir.join(INDEX_FILE);
    if let Ok(bytes) = std::fs::read(&cache) {
        if let Ok(c) = serde_json::from_slice::<CachedIndex>(&bytes) {
            if c.roothash == roothash && c.chunker == CHUNKER && !roothash.is_empty() {
                let chunks = c
                    .chunks
                    .iter()
                    .filter_map(|(s, off, len)| Some((unhex(s)?, (*off, *len))))
                    .collect();
                return Ok(Index { chunks });
            }
        }
    }
    let f =
        File::open(dev).with_context(|| format!("opening the running root {}", dev.display()))?;
    let mut chunks = HashMap::new();
    let mut list = Vec::new();
    for cut in chunking::cut(BufReader::with_capacity(1 << 20, f)) {
        let cut = cut.with_context(|| format!("reading the running root {}", dev.display()))?;
        let len = cut.data.len() as u64;
        chunks.entry(cut.sha256).or_insert((cut.offset, len));
        list.push((hex::encode(cut.sha256), cut.offset, len));
    }
    if chunks.is_empty() {
        bail!("the running root {} is empty", dev.display());
    }
    let cached = CachedIndex {
        roothash: roothash.to_owned(),
        chunker: CHUNKER.to_owned(),
        chunks: list,
    };
    if let Err(e) = std::fs::create_dir_all(state_dir)
        .map_err(anyhow::Error::from)
        .and_then(|()| Ok(serde_json::to_vec(&cached)?))
        .and_then(|b| Ok(keelson_common::durable::replace(&cache, &b)?))
    {
        tracing::warn!("update: cannot cache the running slot's chunk index: {e:#}");
    }
    Ok(Index { chunks })
}

/// What a delta install of one version takes.
pub struct Plan {
    pub list: ChunkList,
    /// The signed chunk list's length (downloaded already).
    pub list_len: u64,
    /// The first entry of every chunk the running slot lacks (each downloaded once).
    pub missing: Vec<usize>,
    /// Bytes to download: the chunk list and the missing chunks as stored.
    pub download: u64,
    /// Bytes copied from the running slot.
    pub copied: u64,
}

/// Downloads and checks `p`'s chunk list: a signed target no longer than a list for its root
/// size can be, every entry within the image and the chunker's bounds (see
/// `ChunkList::check`). Errors say what is wrong and where.
pub async fn fetch_list(agent: &Agent, repo: &Repo, p: &Payload) -> Result<(ChunkList, u64)> {
    let Some(c) = &p.chunks else {
        bail!("the repository has no chunk list for version {}", p.version);
    };
    let (len, _, _) = install::target_info(repo, &c.target)?;
    let max = chunk_list_max_bytes(p.root_size);
    if len > max {
        bail!(
            "{}: {len} bytes signed, more than a chunk list of a {}-byte root can take ({max}); refused unread",
            c.target,
            p.root_size
        );
    }
    let mut bytes = Vec::with_capacity(len as usize);
    install::stream_target(agent, repo, &c.target, &mut |b| {
        bytes.extend_from_slice(b);
        Ok(())
    })
    .await?;
    let list: ChunkList = serde_json::from_slice(&bytes)
        .with_context(|| format!("{} is not a chunk list", c.target))?;
    list.check(p.root_size)
        .map_err(|e| anyhow::anyhow!("{} is refused: {e}", c.target))?;
    Ok((list, len))
}

/// What of `list` the running slot has.
pub fn plan(list: ChunkList, list_len: u64, index: &Index) -> Plan {
    let mut seen = std::collections::HashSet::new();
    let mut missing = Vec::new();
    let (mut download, mut copied) = (list_len, 0);
    for (i, c) in list.chunks.iter().enumerate() {
        let sha = unhex(&c.sha256).unwrap_or_default();
        if index.chunks.get(&sha).is_some_and(|(_, l)| *l == c.length) {
            copied += c.length;
        } else if seen.insert(sha) {
            missing.push(i);
            download += c.stored;
        }
    }
    Plan {
        list,
        list_len,
        missing,
        download,
        copied,
    }
}

/// Writes the new root into `target` (slot `slot`'s root partition): the chunks the running
/// slot (`running`) has, copied and re-hashed, then the others: kept where an earlier attempt
/// already wrote them (they hash right at their place), else downloaded [`PARALLEL`] at a time
/// and checked on arrival. Syncs the partition.
pub async fn assemble(
    agent: &Agent,
    repo: &Repo,
    plan: &Plan,
    index: &Index,
    running: &Path,
    target: &Path,
    slot: &str,
) -> Result<()> {
    let out = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(target)
        .with_context(|| format!("opening {}", target.display()))?;
    let src = File::open(running).with_context(|| format!("opening {}", running.display()))?;
    let mut buf = vec![0u8; CHUNK_MAX as usize];
    let mut written = 0u64;
    let mut places: HashMap<[u8; 32], Vec<u64>> = HashMap::new();
    for c in &plan.list.chunks {
        let sha = unhex(&c.sha256).context("checked chunk list")?;
        match index.chunks.get(&sha) {
            Some(&(off, len)) if len == c.length => {
                let b = &mut buf[..len as usize];
                src.read_exact_at(b, off).with_context(|| {
                    format!("reading bytes {off}..{} of the running root", off + len)
                })?;
                if Sha256::digest(&*b).as_slice() != sha {
                    bail!(
                        "the running root's bytes {off}..{} no longer hash to chunk {} (a stale index?)",
                        off + len,
                        c.sha256
                    );
                }
                out.write_all_at(b, c.offset).with_context(|| {
                    format!("writing at byte {} of {}", c.offset, target.display())
                })?;
                written += len;
                agent.set_written(written);
                agent.check_cancel()?;
            }
            _ => places.entry(sha).or_default().push(c.offset),
        }
    }
    // Resuming: a missing chunk an earlier, cut-off attempt already wrote into this slot (or
    // that the version the slot held had at the same place) is hashed and kept instead of
    // downloaded.
    let mut fetch = Vec::new();
    for &i in &plan.missing {
        let c = &plan.list.chunks[i];
        let b = &mut buf[..c.length as usize];
        let sha = unhex(&c.sha256).context("checked chunk list")?;
        let have = out.read_exact_at(b, c.offset).is_ok() && Sha256::digest(&*b).as_slice() == sha;
        if !have {
            fetch.push(i);
            continue;
        }
        for &at in places.get(&sha).map(Vec::as_slice).unwrap_or_default() {
            if at != c.offset {
                out.write_all_at(b, at)
                    .with_context(|| format!("writing at byte {at} of {}", target.display()))?;
            }
            written += c.length;
        }
    }
    if fetch.len() < plan.missing.len() {
        agent.emit(
            "update-delta-resumed",
            format!(
                "{} of the {} chunks to download are in slot {} already (written by an earlier attempt, or left by the version it held): kept",
                plan.missing.len() - fetch.len(),
                plan.missing.len(),
                slot
            ),
        );
        agent.set_written(written);
    }
    let mut arrivals = futures_util::stream::iter(
        fetch
            .iter()
            .map(|&i| fetch_chunk(agent, repo, &plan.list.chunks[i])),
    )
    .buffer_unordered(PARALLEL);
    while let Some(got) = arrivals.next().await {
        let (sha, data) = got?;
        for &at in places.get(&sha).map(Vec::as_slice).unwrap_or_default() {
            out.write_all_at(&data, at)
                .with_context(|| format!("writing at byte {at} of {}", target.display()))?;
            written += data.len() as u64;
        }
        agent.set_written(written);
        agent.check_cancel()?;
    }
    drop(arrivals);
    if written != plan.list.size {
        bail!(
            "assembled {written} bytes of the {} the chunk list covers",
            plan.list.size
        );
    }
    out.sync_all()
        .with_context(|| format!("syncing {}", target.display()))?;
    Ok(())
}

/// One missing chunk, checked: its stored length, its decompressed length (decompression
/// stops one byte past it) and its sha256, all from the signed chunk list.
async fn fetch_chunk(agent: &Agent, repo: &Repo, c: &ChunkEntry) -> Result<([u8; 32], Vec<u8>)> {
    let what = format!(
        "chunk {} (bytes {}..{} of the new root)",
        c.sha256,
        c.offset,
        c.offset + c.length
    );
    let url = repo.targets.join(&format!("{CHUNK_DIR}/{}", c.sha256))?;
    let mut failures = 0u32;
    let stored = loop {
        let got: Result<Vec<u8>, (bool, String)> = if url.scheme() == "file" {
            let path = url
                .to_file_path()
                .map_err(|()| anyhow::anyhow!("bad file URL {url}"))?;
            match std::fs::metadata(&path) {
                Ok(m) if m.len() > c.stored => Err((
                    false,
                    format!(
                        "{} bytes stored, more than the signed {}",
                        m.len(),
                        c.stored
                    ),
                )),
                Ok(_) => std::fs::read(&path).map_err(|e| (false, e.to_string())),
                Err(e) => Err((false, format!("{}: {e}", path.display()))),
            }
        } else {
            http::get_small(&url, c.stored)
                .await
                .map_err(|e| (e.transient(), install::chain(&e)))
        };
        match got {
            Ok(b) => break b,
            Err((true, e)) if failures < 3 => {
                failures += 1;
                agent.emit("update-retry", format!("{what}: {e}; trying again"));
                tokio::time::sleep(Duration::from_millis(500 * u64::from(failures))).await;
                agent.check_cancel()?;
            }
            Err((_, e)) => bail!("{what}: {e}"),
        }
    };
    if stored.len() as u64 != c.stored {
        bail!(
            "{what}: {} bytes arrived, the signed chunk list says {} (refused)",
            stored.len(),
            c.stored
        );
    }
    agent.add_downloaded(c.stored);
    let mut data = Vec::with_capacity(c.length as usize);
    ruzstd::decoding::StreamingDecoder::new(&stored[..])
        .map_err(|e| anyhow::anyhow!("{what}: not zstd: {e}"))?
        .take(c.length + 1)
        .read_to_end(&mut data)
        .map_err(|e| anyhow::anyhow!("{what}: corrupt zstd: {e}"))?;
    if data.len() as u64 != c.length {
        bail!(
            "{what}: decompresses to {}{} bytes, the signed chunk list says {} (refused)",
            if data.len() as u64 > c.length {
                "more than "
            } else {
                ""
            },
            data.len().min(c.length as usize),
            c.length
        );
    }
    let sha: [u8; 32] = Sha256::digest(&data).into();
    if hex::encode(sha) != c.sha256 {
        bail!(
            "{what}: its content hashes to {} (wrong content refused on arrival)",
            hex::encode(sha)
        );
    }
    Ok((sha, data))
}

/// Whether a version comes by delta, and what it would take.
pub struct Decision {
    /// The plan, when one could be made (also when it is over the limit, for its size).
    pub planned: Option<(Plan, Index)>,
    /// Why the full root is downloaded instead, if it is.
    pub whole: Option<String>,
}

/// Decides how `p`'s root comes: by delta from the running slot (`running_root`, booted with
/// `roothash`), or whole (`root_len`: the full root target's length) and why. Never fails:
/// every reason not to use a delta is a reason to download the full root.
pub async fn decide(
    agent: &Agent,
    repo: &Repo,
    running_root: Option<&Path>,
    roothash: &str,
    p: &Payload,
    root_len: u64,
    max_percent: u8,
) -> Decision {
    let whole = |why: String| Decision {
        planned: None,
        whole: Some(why),
    };
    if max_percent == 0 {
        return whole("deltas are off (update.delta_max_percent = 0)".into());
    }
    if p.chunks.is_none() {
        return whole(format!(
            "the repository has no chunk list for version {}",
            p.version
        ));
    }
    let Some(dev) = running_root else {
        return whole(
            "the running slot's dm-verity root device was not found, so it cannot be indexed"
                .into(),
        );
    };
    let (list, list_len) = match fetch_list(agent, repo, p).await {
        Ok(l) => l,
        Err(e) => return whole(format!("{e:#}")),
    };
    let index = match index(dev, roothash, &agent.paths.state_dir) {
        Ok(i) => i,
        Err(e) => return whole(format!("cannot index the running slot: {e:#}")),
    };
    let plan = plan(list, list_len, &index);
    let over = plan.download.saturating_mul(100) > root_len.saturating_mul(u64::from(max_percent));
    let why = over.then(|| {
        format!(
            "the delta would download {} bytes, {}% of the full root's {root_len}: above update.delta_max_percent ({max_percent}%)",
            plan.download,
            plan.download * 100 / root_len.max(1)
        )
    });
    Decision {
        planned: Some((plan, index)),
        whole: why,
    }
}
