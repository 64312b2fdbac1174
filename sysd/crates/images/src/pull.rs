//! Pulling an image from an OCI registry into the [`Store`] (OCI distribution spec, through
//! [`crate::distribution`] on rustls: every body read whole is bounded).
//!
//! 1. The reference is normalized (`busybox` → `docker.io/library/busybox:latest`) and its
//!    registry's `[registries."HOST"]` settings looked up. Mirrors are tried first, in order,
//!    then the registry itself; the first that yields the manifest serves the whole pull.
//! 2. The manifest is fetched (size limit, digest checked against a `@sha256:` pin); an index
//!    is resolved to its linux/amd64 manifest, whose digest must match the index entry.
//! 3. Config and layers not yet in the store are downloaded in parallel into
//!    `.downloads/<hex>`, hashed as they arrive (across retries of this pull; a partial file an
//!    earlier pull left is read back once complete). A transfer error is retried with backoff
//!    (0.5 s doubling, 6 attempts), resuming with an HTTP range request where it stopped; the
//!    partial file also survives a failed pull (or a sysd restart) and the next pull resumes it.
//!    A blob whose size or digest does not match its descriptor is deleted and the pull fails.
//! 4. Each layer is unpacked as soon as it and the ones below it are verified (read through the
//!    downloaded file, verified again and checked for escapes, while the blob is fsynced and
//!    moved into `blobs/`); the layers are made durable by one syncfs, the blobs' directories
//!    by one fsync each, and the image is entered in the store's index once every blob is in
//!    the store: only a complete image is ever listed or run.
//!
//! Credentials come from the config (or an auth file read at each pull) and are never logged:
//! errors name the registry and the HTTP status, never the `Authorization` header.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use base64::Engine as _;
use futures_util::StreamExt;
use keelson_common::api::images::PullProgress;
use keelson_common::api::now_ms;
use oci_spec::distribution::Reference;
use oci_spec::image::{Descriptor, ImageIndex, ImageManifest, MediaType};
use sha2::{Digest as _, Sha256};
use tokio::io::AsyncWriteExt;

use super::store::{Entry, Store};
use crate::distribution::{self, Client};
use crate::oci_layout;
use keelson_spec::reference;
use keelson_spec::registries::{Registries, Registry};

/// Media types asked for when fetching a manifest.
const ACCEPT: &[&str] = &[
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.docker.distribution.manifest.v2+json",
];
const ATTEMPTS: u32 = 6;
const BACKOFF_START: Duration = Duration::from_millis(500);
/// Progress lines per blob: at most one per this many bytes (and always the last).
const PROGRESS_STEP: u64 = 1 << 20;

/// Where a pull's progress goes (the caller turns it into the API stream and events). A
/// receiver that went away (a client that left) does not stop the pull.
pub type Progress = tokio::sync::mpsc::UnboundedSender<PullProgress>;

/// One endpoint a pull can use: the registry itself or one of its mirrors.
struct Endpoint {
    host: String,
    reference: Reference,
    client: Client,
    settings: Registry,
}

/// Pulls `image` (a reference as written) into `store`; returns its store entry.
pub async fn pull(
    store: &Store,
    registries: &Registries,
    image: &str,
    progress: &Progress,
) -> Result<Entry> {
    let started = Instant::now();
    let reference = reference::parse(image).map_err(|e| anyhow!("image {image:?}: {e}"))?;
    let name = reference::canonical(&reference);
    store.init()?;
    let mut hold = store.hold();

    let endpoints = endpoints(&reference, registries)?;
    let mut failures = Vec::new();
    let mut resolved = None;
    for ep in endpoints {
        match resolve(&ep, store, &mut hold).await {
            Ok(r) => {
                resolved = Some((ep, r));
                break;
            }
            Err(e) => failures.push(format!("{}: {e:#}", ep.host)),
        }
    }
    let Some((ep, (top, manifest_desc, manifest))) = resolved else {
        bail!("pulling {name}: {}", failures.join("; "));
    };
    let blobs: Vec<Descriptor> = std::iter::once(manifest.config().clone())
        .chain(manifest.layers().iter().cloned())
        .collect();
    for b in &blobs {
        if b.size() > ep.settings.max_blob() {
            bail!(
                "pulling {name}: blob {} is {} bytes, over the limit of {} (max_blob_size of registry {})",
                b.digest(),
                b.size(),
                ep.settings.max_blob(),
                ep.host
            );
        }
        oci_layout::sha256_hex(b).with_context(|| format!("pulling {name}"))?;
    }
    let _ = progress.send(PullProgress::Resolved {
        reference: name.clone(),
        manifest: manifest_desc.digest().to_string(),
        layers: manifest.layers().len(),
        total_bytes: blobs.iter().map(|b| b.size()).sum(),
    });

    // Parallel downloads, bounded.
    let ep = Arc::new(ep);
    let semaphore = Arc::new(tokio::sync::Semaphore::new(ep.settings.parallel()));
    // Each blob that is in the store, or downloaded and verified (then with the file open,
    // while it is being moved into the store), goes on this channel; the unpacker below applies
    // each layer as soon as it and the ones below it are there, while the rest download.
    let (arrived, arrivals) = std::sync::mpsc::channel::<(String, Option<std::fs::File>)>();
    let mut tasks = Vec::new();
    let config_hex = manifest.config().digest().digest().to_string();
    for b in blobs {
        let hex = b.digest().digest().to_string();
        hold.add(&hex);
        if store.has_blob(&hex, b.size()) {
            let _ = progress.send(PullProgress::Exists {
                digest: b.digest().to_string(),
                size: b.size(),
            });
            let _ = arrived.send((hex, None));
            continue;
        }
        let (ep, semaphore, progress) = (Arc::clone(&ep), Arc::clone(&semaphore), progress.clone());
        let partial = store.downloads().join(&hex);
        let dest = store.blob_path(&hex);
        let lock = store.blob_lock(&hex);
        let arrived = arrived.clone();
        let is_config = hex == config_hex;
        tasks.push(async move {
            let _permit = semaphore.acquire().await;
            let _lock = lock.lock().await;
            // Another pull may have fetched it meanwhile.
            let n = if store.has_blob(&hex, b.size()) {
                let _ = arrived.send((hex, None));
                0
            } else if is_config {
                // Read from the store by path: announced once it is there.
                let n = download(&ep, &b, &partial, &dest, &progress, None).await?;
                let _ = arrived.send((hex, None));
                n
            } else {
                download(&ep, &b, &partial, &dest, &progress, Some(&arrived)).await?
            };
            anyhow::Ok(n)
        });
    }
    drop(arrived);
    let unpacker = {
        let (root, manifest_desc, manifest) = (
            store.root().to_path_buf(),
            manifest_desc.clone(),
            manifest.clone(),
        );
        tokio::task::spawn_blocking(move || -> Result<oci_layout::Layers> {
            let mut have = std::collections::HashMap::new();
            let mut wait = |d: &Descriptor| -> Result<Option<std::fs::File>> {
                let hex = d.digest().digest();
                while !have.contains_key(hex) {
                    match arrivals.recv() {
                        Ok((h, file)) => {
                            have.insert(h, file);
                        }
                        Err(_) => bail!("blob {} was not downloaded", d.digest()),
                    }
                }
                // Each use reads the blob from its start (a layer may be listed twice).
                match have.get(hex) {
                    Some(Some(file)) => {
                        use std::io::Seek;
                        let mut file = file.try_clone().context("reopening a blob")?;
                        file.rewind().context("reopening a blob")?;
                        Ok(Some(file))
                    }
                    _ => Ok(None),
                }
            };
            wait(manifest.config())?;
            let config = oci_layout::read_config(&root, &manifest_desc, &manifest)?;
            oci_layout::unpack_layers(&root, &manifest, &config, &root, wait)
        })
    };
    let mut downloaded = 0;
    let mut first_error = None;
    for r in futures_util::future::join_all(tasks).await {
        match r {
            Ok(n) => downloaded += n,
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    let unpacked_layers = unpacker.await.context("unpacking")?;
    if let Some(e) = first_error {
        return Err(e.context(format!("pulling {name} from {}", ep.host)));
    }
    let _layers = unpacked_layers.with_context(|| format!("pulling {name}: refusing the image"))?;
    // The blobs' new names durable, once for all of them, before the image is listed; also
    // when this pull downloaded nothing: a blob it found may be one another pull has just
    // moved in.
    {
        let dirs = [store.blobs_dir(), store.downloads()];
        tokio::task::spawn_blocking(move || {
            dirs.iter()
                .filter(|d| d.is_dir())
                .try_for_each(|d| keelson_common::durable::sync_dir(d))
        })
        .await
        .context("the blob directories' fsync")?
        .with_context(|| format!("pulling {name}: making its blobs durable"))?;
    }

    let entry = Entry {
        reference: name.clone(),
        desc: top,
        manifest: manifest_desc.digest().to_string(),
        pulled_ms: now_ms(),
    };
    let unpacked = {
        let (store_root, entry) = (store.root().to_path_buf(), entry.clone());
        tokio::task::spawn_blocking(move || Store::new(store_root).unpack(&entry))
            .await
            .context("unpacking")?
    };
    unpacked.with_context(|| format!("pulling {name}: refusing the image"))?;
    store.add(&name, &entry.desc, &entry.manifest, entry.pulled_ms)?;
    drop(hold);
    let _ = progress.send(PullProgress::Done {
        reference: name,
        manifest: entry.manifest.clone(),
        downloaded_bytes: downloaded,
        elapsed_ms: started.elapsed().as_millis() as u64,
    });
    Ok(entry)
}

/// The mirrors (in order), then the registry itself.
fn endpoints(reference: &Reference, registries: &Registries) -> Result<Vec<Endpoint>> {
    let host = reference.registry().to_string();
    let settings = lookup(registries, &host);
    let mut out = Vec::new();
    for mirror in &settings.mirrors {
        let mut r = reference.clone();
        r.set_mirror_registry(mirror.clone());
        out.push(endpoint(mirror, r, lookup(registries, mirror))?);
    }
    out.push(endpoint(&host, reference.clone(), settings)?);
    Ok(out)
}

/// A registry's settings; Docker Hub answers to several names.
fn lookup(registries: &Registries, host: &str) -> Registry {
    let aliases: &[&str] = if host == "docker.io" {
        &["docker.io", "index.docker.io", "registry-1.docker.io"]
    } else {
        &[]
    };
    registries
        .get(host)
        .or_else(|| aliases.iter().find_map(|a| registries.get(*a)))
        .cloned()
        .unwrap_or_default()
}

fn endpoint(host: &str, reference: Reference, settings: Registry) -> Result<Endpoint> {
    // The trust anchors are Mozilla's (webpki-root-certs, compiled in: the node has no CA
    // bundle of its own) plus the registry's `ca_file`; nothing is read from the host's
    // certificate store, so a node and a test host verify alike.
    let extra_pem = match &settings.ca_file {
        Some(ca) => Some(
            std::fs::read(ca)
                .with_context(|| format!("registry {host}: ca_file {}", ca.display()))?,
        ),
        None => None,
    };
    // A mirror is asked for the upstream's repository, naming the upstream.
    let namespace = (reference.resolve_registry() != reference.registry())
        .then(|| reference.registry().to_string());
    let options = distribution::Options {
        insecure: settings.insecure,
        roots_der: webpki_root_certs::TLS_SERVER_ROOT_CERTS
            .iter()
            .map(|c| c.as_ref().to_vec())
            .collect(),
        extra_pem,
        credentials: auth(host, &settings)?,
        namespace,
    };
    let client = Client::new(reference.resolve_registry(), options)?;
    Ok(Endpoint {
        host: host.to_string(),
        reference,
        client,
        settings,
    })
}

/// Credentials for `host`: `username`/`password`, or its entry in `auth_file`.
fn auth(host: &str, settings: &Registry) -> Result<Option<(String, String)>> {
    if let (Some(u), Some(p)) = (&settings.username, &settings.password) {
        return Ok(Some((u.clone(), p.clone())));
    }
    let Some(file) = &settings.auth_file else {
        return Ok(None);
    };
    let shown = file.display();
    let text = std::fs::read_to_string(file)
        .with_context(|| format!("registry {host}: reading auth_file {shown}"))?;
    let doc: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("registry {host}: auth_file {shown} is not JSON"))?;
    let Some(entry) = doc.get("auths").and_then(|a| a.get(host)) else {
        bail!("registry {host}: auth_file {shown} has no \"auths\".{host:?} entry");
    };
    if let (Some(u), Some(p)) = (
        entry.get("username").and_then(|v| v.as_str()),
        entry.get("password").and_then(|v| v.as_str()),
    ) {
        return Ok(Some((u.into(), p.into())));
    }
    let encoded = entry
        .get("auth")
        .and_then(|v| v.as_str())
        .ok_or_else(|| anyhow!("registry {host}: auth_file {shown}: the entry has no \"auth\""))?;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
        .ok_or_else(|| {
            anyhow!("registry {host}: auth_file {shown}: \"auth\" is not base64 of USER:PASSWORD")
        })?;
    let (u, p) = decoded.split_once(':').ok_or_else(|| {
        anyhow!("registry {host}: auth_file {shown}: \"auth\" is not base64 of USER:PASSWORD")
    })?;
    Ok(Some((u.into(), p.into())))
}

/// Fetches the manifest (resolving an index): (what the reference named, the platform
/// manifest's descriptor, the manifest). Stores both documents.
async fn resolve(
    ep: &Endpoint,
    store: &Store,
    hold: &mut super::store::Hold<'_>,
) -> Result<(Descriptor, Descriptor, ImageManifest)> {
    let max = ep.settings.max_manifest();
    let (bytes, media_type) = fetch_manifest(ep, &ep.reference, max).await?;
    let top_hex = hex::encode(Sha256::digest(&bytes));
    if let Some(pin) = ep.reference.digest() {
        if pin != format!("sha256:{top_hex}") {
            bail!("the registry's manifest hashes to sha256:{top_hex}, not the pinned {pin}; refusing it");
        }
    }
    let top = descriptor(&media_type, &top_hex, bytes.len() as u64)?;
    hold.add(&top_hex);
    store.put_blob(&top_hex, &bytes)?;
    if !oci_layout::is_index(&top, &bytes) {
        let manifest = parse_manifest(&bytes)?;
        return Ok((top.clone(), top, manifest));
    }
    let index = ImageIndex::from_reader(&bytes[..]).context("parsing the image index")?;
    let entry = oci_layout::pick_platform(index.manifests())
        .context("the image index")?
        .clone();
    if entry.size() > max {
        bail!(
            "manifest {} is {} bytes, over the limit of {max} (max_manifest_size)",
            entry.digest(),
            entry.size()
        );
    }
    let m_hex = oci_layout::sha256_hex(&entry)?.to_string();
    let by_digest = ep.reference.clone_with_digest(entry.digest().to_string());
    let (m_bytes, _) = fetch_manifest(ep, &by_digest, max).await?;
    let actual = hex::encode(Sha256::digest(&m_bytes));
    if actual != m_hex || m_bytes.len() as u64 != entry.size() {
        bail!(
            "manifest {}: the registry sent {} bytes hashing to sha256:{actual}; refusing it",
            entry.digest(),
            m_bytes.len()
        );
    }
    let manifest = parse_manifest(&m_bytes)?;
    hold.add(&m_hex);
    store.put_blob(&m_hex, &m_bytes)?;
    Ok((top, entry, manifest))
}

fn parse_manifest(bytes: &[u8]) -> Result<ImageManifest> {
    ImageManifest::from_reader(bytes).context("parsing the image manifest")
}

fn descriptor(media_type: &str, hex: &str, size: u64) -> Result<Descriptor> {
    let digest: oci_spec::image::Digest = format!("sha256:{hex}").parse().context("digest")?;
    Ok(Descriptor::new(MediaType::from(media_type), size, digest))
}

/// One manifest document, with retries for transient errors.
async fn fetch_manifest(ep: &Endpoint, r: &Reference, max: u64) -> Result<(Vec<u8>, String)> {
    let mut delay = BACKOFF_START;
    let mut attempt = 1;
    let wanted = r.digest().or(r.tag()).unwrap_or("latest");
    loop {
        match ep
            .client
            .manifest(r.repository(), wanted, ACCEPT, max)
            .await
        {
            Ok((bytes, content_type)) => {
                let media_type = serde_json::from_slice::<serde_json::Value>(&bytes)
                    .ok()
                    .and_then(|v| v.get("mediaType")?.as_str().map(str::to_string))
                    .or(content_type.filter(|t| t.starts_with("application/vnd.")))
                    .unwrap_or_else(|| "application/vnd.oci.image.manifest.v1+json".into());
                return Ok((bytes, media_type));
            }
            Err(e) if e.transient && attempt < ATTEMPTS => {
                tracing::info!(host = %ep.host, attempt, "images: manifest fetch failed, retrying: {e}");
                tokio::time::sleep(delay).await;
                delay *= 2;
                attempt += 1;
            }
            Err(e) if e.message.contains("max_manifest_size") => {
                bail!(
                    "manifest of {}: {e} (max_manifest_size of registry {})",
                    r.whole(),
                    ep.host
                )
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Downloads one blob into the store (resuming `partial`); returns the bytes transferred.
async fn download(
    ep: &Endpoint,
    desc: &Descriptor,
    partial: &std::path::Path,
    dest: &std::path::Path,
    progress: &Progress,
    arrived: Option<&std::sync::mpsc::Sender<(String, Option<std::fs::File>)>>,
) -> Result<u64> {
    let digest = desc.digest().to_string();
    let size = desc.size();
    let mut transferred = 0;
    let mut delay = BACKOFF_START;
    let mut attempt = 1;
    let mut hashed = None;
    loop {
        match transfer(ep, desc, partial, progress, &mut transferred, &mut hashed).await {
            Ok(()) => break,
            Err(Transfer::Fatal(e)) => {
                let _ = tokio::fs::remove_file(partial).await;
                return Err(e.context(format!("blob {digest}")));
            }
            Err(Transfer::Retry(e)) if attempt < ATTEMPTS => {
                let _ = progress.send(PullProgress::Retrying {
                    digest: digest.clone(),
                    attempt,
                    reason: format!("{e:#}"),
                });
                tokio::time::sleep(delay).await;
                delay *= 2;
                attempt += 1;
            }
            Err(Transfer::Retry(e)) => {
                return Err(e.context(format!("blob {digest}: gave up after {ATTEMPTS} attempts (the {} bytes so far are kept and resumed by the next pull)", file_len(partial).await)));
            }
        }
    }
    // The digest of the whole file: hashed as it arrived when this pull wrote all of it, else
    // (resumed from an earlier pull) read back.
    let (n_total, actual) = match hashed {
        Some(h) if h.len == file_len(partial).await => (h.len, hex::encode(h.hasher.finalize())),
        _ => hash_file(partial)
            .await
            .with_context(|| format!("blob {digest}: reading {}", partial.display()))?,
    };
    if n_total != size || actual != desc.digest().digest() {
        let _ = tokio::fs::remove_file(partial).await;
        bail!(
            "blob {digest}: the registry sent {n_total} bytes hashing to sha256:{actual}, which does not match its descriptor ({size} bytes); refusing it"
        );
    }
    // Verified: the unpacker may start on it (reading it through this descriptor, verifying it
    // again) while it is made durable and moved into the store.
    if let Some(arrived) = arrived {
        let file = std::fs::File::open(partial)
            .with_context(|| format!("blob {digest}: opening {}", partial.display()))?;
        let _ = arrived.send((desc.digest().digest().to_string(), Some(file)));
    }
    // fsync the blob and rename it into blobs/; the pull fsyncs both directories once, after
    // every blob, before the image is listed (`keelson_common::durable::move_synced`).
    let (from, to) = (partial.to_path_buf(), dest.to_path_buf());
    tokio::task::spawn_blocking(move || keelson_common::durable::move_synced(&from, &to))
        .await
        .context("the blob commit task")?
        .with_context(|| format!("moving blob {digest} into the store"))?;
    let _ = progress.send(PullProgress::Verified { digest, size });
    Ok(transferred)
}

/// What a download has hashed so far: the first `len` bytes of the partial file.
struct Hashed {
    hasher: Sha256,
    len: u64,
}

/// The length and sha256 (hex) of a file, read in a blocking task.
async fn hash_file(path: &std::path::Path) -> Result<(u64, String)> {
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || -> Result<(u64, String)> {
        let mut f = std::fs::File::open(&path)?;
        let mut h = Sha256::new();
        let n = std::io::copy(&mut f, &mut h)?;
        Ok((n, hex::encode(h.finalize())))
    })
    .await
    .context("the hashing task")?
}

async fn file_len(p: &std::path::Path) -> u64 {
    tokio::fs::metadata(p).await.map(|m| m.len()).unwrap_or(0)
}

enum Transfer {
    Retry(anyhow::Error),
    Fatal(anyhow::Error),
}

/// One attempt: from the partial file's length to the end.
async fn transfer(
    ep: &Endpoint,
    desc: &Descriptor,
    partial: &std::path::Path,
    progress: &Progress,
    transferred: &mut u64,
    hashed: &mut Option<Hashed>,
) -> Result<(), Transfer> {
    let size = desc.size();
    let digest = desc.digest().to_string();
    let mut offset = file_len(partial).await;
    if offset > size {
        let _ = tokio::fs::remove_file(partial).await;
        offset = 0;
    }
    if offset == size {
        if size == 0 {
            // Nothing to fetch (a range request for it would be unsatisfiable).
            tokio::fs::File::create(partial)
                .await
                .map_err(|e| Transfer::Fatal(anyhow!("creating {}: {e}", partial.display())))?;
        }
        return Ok(());
    }
    // A registry that ignores the range answers from 0: start over.
    let (response, from) = ep
        .client
        .blob(ep.reference.repository(), digest.as_str(), offset)
        .await
        .map_err(|e| {
            if e.transient {
                Transfer::Retry(e.into())
            } else {
                Transfer::Fatal(e.into())
            }
        })?;
    let mut file = tokio::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(from == 0)
        .append(from > 0)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(partial)
        .await
        .map_err(|e| Transfer::Fatal(anyhow!("opening {}: {e}", partial.display())))?;
    // Hash what arrives, in step with the file: from its start, or continuing what this pull
    // hashed before an interruption. Otherwise (a partial file left by an earlier pull) the
    // file is read back once it is complete.
    if from == 0 {
        *hashed = Some(Hashed {
            hasher: Sha256::new(),
            len: 0,
        });
    } else if hashed.as_ref().is_some_and(|h| h.len != from) {
        *hashed = None;
    }
    let mut done = from;
    let mut shown = done;
    let _ = progress.send(PullProgress::Downloading {
        digest: digest.clone(),
        done,
        size,
        resumed_at: from,
    });
    let mut stream = response.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = match chunk {
            Ok(c) => c,
            Err(e) => {
                file.flush().await.ok();
                return Err(Transfer::Retry(anyhow!(
                    "transfer interrupted at byte {done}: {e}"
                )));
            }
        };
        done += chunk.len() as u64;
        if done > size {
            return Err(Transfer::Fatal(anyhow!(
                "the registry sent more than the descriptor's {size} bytes; refusing it"
            )));
        }
        file.write_all(&chunk)
            .await
            .map_err(|e| Transfer::Fatal(anyhow!("writing {}: {e}", partial.display())))?;
        if let Some(h) = hashed {
            h.hasher.update(&chunk);
            h.len += chunk.len() as u64;
        }
        *transferred += chunk.len() as u64;
        if done - shown >= PROGRESS_STEP || done == size {
            shown = done;
            let _ = progress.send(PullProgress::Downloading {
                digest: digest.clone(),
                done,
                size,
                resumed_at: from,
            });
        }
    }
    file.flush()
        .await
        .map_err(|e| Transfer::Fatal(anyhow!("writing {}: {e}", partial.display())))?;
    if done < size {
        return Err(Transfer::Retry(anyhow!(
            "the connection closed after {done} of {size} bytes"
        )));
    }
    Ok(())
}
