//! Wire types of the image store endpoints (`/v1/images…`, see `docs/api.md`): the images on
//! /var, a pull's progress stream and what a removal or prune freed.

use serde::{Deserialize, Serialize};

/// One image in the store (`GET /v1/images`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageInfo {
    /// The normalized reference it was pulled as (`docker.io/library/busybox:1.36`,
    /// `host:5000/app@sha256:…`).
    pub reference: String,
    /// Digest of what the reference named (an image manifest, or a multi-arch index).
    pub digest: String,
    /// Digest of the linux/amd64 image manifest that runs.
    pub manifest: String,
    /// Compressed bytes of its config and layers (shared layers counted in every image).
    pub size: u64,
    /// Bytes of its layers no other image in the store shares.
    pub unique_size: u64,
    pub layers: usize,
    /// Whether its root file system is unpacked (it is after a successful pull).
    pub unpacked: bool,
    /// Configured services whose `image` names it.
    pub used_by: Vec<String>,
    /// When it was pulled (ms since the epoch).
    pub pulled_ms: u64,
}

/// One line of a pull's NDJSON stream (`POST /v1/images/pull`). The last line is either
/// `done` or `error`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum PullProgress {
    /// The manifest was resolved: what will be fetched.
    Resolved {
        reference: String,
        manifest: String,
        layers: usize,
        total_bytes: u64,
    },
    /// A blob already in the store (shared with another image, or from an earlier pull).
    Exists { digest: String, size: u64 },
    /// Bytes of one blob so far (`resumed_at` > 0 when an earlier attempt's bytes were kept).
    Downloading {
        digest: String,
        done: u64,
        size: u64,
        resumed_at: u64,
    },
    /// A transfer failed and is retried from where it stopped.
    Retrying {
        digest: String,
        attempt: u32,
        reason: String,
    },
    /// A blob arrived complete and matched its digest.
    Verified { digest: String, size: u64 },
    /// The image is in the store and unpacked.
    Done {
        reference: String,
        manifest: String,
        downloaded_bytes: u64,
        elapsed_ms: u64,
    },
    /// The pull failed; nothing of it is runnable.
    Error { message: String },
}

/// What `POST /v1/images/remove` and `POST /v1/images/prune` freed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImagesRemoved {
    /// References removed from the store.
    pub removed: Vec<String>,
    /// Blobs deleted (no image referenced them any more).
    pub blobs: usize,
    /// Unpacked images deleted (their views, or an older sysd's merged copies).
    pub rootfs: usize,
    /// Unpacked layers deleted (no image left in the store used them).
    #[serde(default)]
    pub layers: usize,
    /// Bytes freed on /var (blobs and unpacked files).
    pub freed_bytes: u64,
}
