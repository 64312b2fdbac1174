//! `keelctl pull IMAGE`, `keelctl images`, `keelctl images rm IMAGE…`, `keelctl images prune`:
//! the image store on /var (`/v1/images…` in docs/api.md).

use std::io::Write;

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use keelson_common::api::format_time_ms;
use keelson_common::api::images::{ImageInfo, ImagesRemoved, PullProgress};

use crate::http::{encode_segment, Client};
use crate::render;

#[derive(Debug, Subcommand)]
pub enum ImagesCommand {
    /// Remove images from the store (refused while a configured service uses one); blobs no
    /// other image shares are deleted.
    Rm {
        #[arg(required = true)]
        images: Vec<String>,
    },
    /// Remove every image no configured service uses, and their blobs.
    Prune,
}

fn api(path: &str) -> String {
    format!("{}{path}", keelson_common::api::API_PREFIX)
}

/// `keelctl pull`: streams the progress; fails if the pull fails.
pub fn pull(client: &Client, image: &str, json: bool, out: &mut impl Write) -> Result<()> {
    let path = api(&format!("/images/pull?reference={}", encode_segment(image)));
    let response = client.send("POST", &path, None)?;
    let mut failed = None;
    for line in response.lines() {
        let line = line.context("reading sysd's stream")?;
        if line.is_empty() {
            continue;
        }
        let item: PullProgress = serde_json::from_str(&line)
            .context("sysd's answer is not what keelctl expects (version mismatch?)")?;
        if json {
            writeln!(out, "{line}")?;
        } else if let Some(text) = show(&item) {
            writeln!(out, "{text}")?;
        }
        out.flush()?;
        if let PullProgress::Error { message } = item {
            failed = Some(message);
        }
    }
    if let Some(message) = failed {
        bail!("{message}");
    }
    Ok(())
}

fn short(digest: &str) -> &str {
    let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
    &hex[..hex.len().min(12)]
}

fn show(p: &PullProgress) -> Option<String> {
    Some(match p {
        PullProgress::Resolved {
            reference,
            manifest,
            layers,
            total_bytes,
        } => format!(
            "{reference}: manifest {}, {layers} layers, {}",
            short(manifest),
            render::size(*total_bytes)
        ),
        PullProgress::Exists { digest, size } => {
            format!(
                "{}: already in the store ({})",
                short(digest),
                render::size(*size)
            )
        }
        PullProgress::Downloading {
            digest,
            done,
            size,
            resumed_at,
        } => {
            let pct = if *size == 0 { 100 } else { done * 100 / size };
            let resumed = if *resumed_at > 0 {
                format!(", resumed at {}", render::size(*resumed_at))
            } else {
                String::new()
            };
            format!(
                "{}: {} / {} ({pct}%{resumed})",
                short(digest),
                render::size(*done),
                render::size(*size)
            )
        }
        PullProgress::Retrying {
            digest,
            attempt,
            reason,
        } => format!(
            "{}: attempt {attempt} failed: {reason}; retrying",
            short(digest)
        ),
        PullProgress::Verified { digest, size } => {
            format!("{}: verified ({})", short(digest), render::size(*size))
        }
        PullProgress::Done {
            reference,
            manifest,
            downloaded_bytes,
            elapsed_ms,
        } => format!(
            "{reference}: pulled {manifest} ({} downloaded in {:.1} s)",
            render::size(*downloaded_bytes),
            *elapsed_ms as f64 / 1000.0
        ),
        PullProgress::Error { .. } => return None,
    })
}

/// `keelctl images [rm|prune]`.
pub fn images(
    client: &Client,
    command: &Option<ImagesCommand>,
    json: bool,
    out: &mut impl Write,
) -> Result<()> {
    match command {
        None => {
            let body = client.get(&api("/images"))?;
            if json {
                writeln!(out, "{}", body.trim_end())?;
                return Ok(());
            }
            let images: Vec<ImageInfo> = serde_json::from_str(&body)
                .context("sysd's answer is not what keelctl expects (version mismatch?)")?;
            write!(out, "{}", table(&images))?;
        }
        Some(ImagesCommand::Rm { images }) => {
            for image in images {
                let path = api(&format!(
                    "/images/remove?reference={}",
                    encode_segment(image)
                ));
                let body = client.send("POST", &path, None)?.text()?;
                removed(&body, json, out)?;
            }
        }
        Some(ImagesCommand::Prune) => {
            let body = client.send("POST", &api("/images/prune"), None)?.text()?;
            removed(&body, json, out)?;
        }
    }
    Ok(())
}

fn removed(body: &str, json: bool, out: &mut impl Write) -> Result<()> {
    if json {
        writeln!(out, "{}", body.trim_end())?;
        return Ok(());
    }
    let r: ImagesRemoved = serde_json::from_str(body)
        .context("sysd's answer is not what keelctl expects (version mismatch?)")?;
    for name in &r.removed {
        writeln!(out, "removed {name}")?;
    }
    writeln!(
        out,
        "{} blobs, {} unpacked images and {} layers deleted, {} freed",
        r.blobs,
        r.rootfs,
        r.layers,
        render::size(r.freed_bytes)
    )?;
    Ok(())
}

fn table(images: &[ImageInfo]) -> String {
    let rows: Vec<Vec<String>> = images
        .iter()
        .map(|i| {
            vec![
                i.reference.clone(),
                short(&i.manifest).to_string(),
                i.layers.to_string(),
                render::size(i.size),
                render::size(i.unique_size),
                if i.used_by.is_empty() {
                    "-".into()
                } else {
                    i.used_by.join(",")
                },
                format_time_ms(i.pulled_ms),
            ]
        })
        .collect();
    render::table(
        &[
            "REFERENCE",
            "MANIFEST",
            "LAYERS",
            "SIZE",
            "UNIQUE",
            "USED BY",
            "PULLED",
        ],
        &rows,
    )
}
