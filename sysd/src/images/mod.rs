//! The image store on /var and registry pulls.
//!
//! - [`store`]: `/var/lib/keelson/images`, itself an OCI image layout (content-addressed blobs
//!   shared between images, `index.json` naming each pulled reference), with each image's root
//!   file system unpacked once beside it (`<manifest hex>/rootfs`), reference counts, removal
//!   and garbage collection.
//! - [`pull`]: the OCI distribution client (oci-client): tags, digests, multi-arch indexes,
//!   basic and bearer auth, mirrors, limits, parallel resumable downloads with retries, every
//!   blob verified; an image enters the index only once complete and unpacked.

pub mod manager;
pub mod pull;
pub mod store;
pub mod trust;
