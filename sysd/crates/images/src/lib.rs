//! Service images: finding them on disk, the image store on /var and registry pulls.
//!
//! - [`lookup`]: what a service's `image` path names, a root file system directory or an OCI
//!   image layout, as an [`Image`] (its root and the config's defaults).
//! - [`oci_layout`]: OCI image layouts unpacked, digest-verified and contained, each layer
//!   once into the store.
//! - [`snapshot`]: layers stored once by chain id (`STORE/layers/<hex>`) and stacked with
//!   overlayfs, the containerd snapshotter model: images sharing a base share its layers.
//! - [`store`]: `/var/lib/keelson/images`, itself an OCI image layout (content-addressed blobs
//!   shared between images, `index.json` naming each pulled reference), with each layer
//!   unpacked once beside it, reference counts, removal and garbage collection.
//! - [`distribution`]: the distribution spec's pull requests (manifests, blobs, the token flow
//!   and Basic auth) with every body read whole bounded, and credentials sent only to the
//!   registry's own site.
//! - [`pull`]: pulling with it: tags, digests, multi-arch indexes, mirrors, limits, parallel
//!   resumable downloads with retries, every blob verified; an image enters the index only
//!   once complete and unpacked.
//! - [`manager`]: one pull per reference at a time, on-demand pulls for service starts, list,
//!   remove and prune with their typed [`manager::Error`]s.
//!
//! This crate knows the service config's image references and registry settings
//! (`keelson-spec`), and nothing of services, containers or the API: a pull's progress goes
//! out on a channel the caller gives ([`pull::Progress`]), with [`manager::milestone`] saying
//! which items are worth an event; errors say their [`Kind`](keelson_common::error::Kind).

pub mod distribution;
pub mod lookup;
pub mod manager;
pub mod oci_layout;
pub mod pull;
pub mod snapshot;
pub mod store;

pub use lookup::{lookup, Image, ImageDefaults};
