//! Shared building blocks of Keelson: the formats that both the image pipeline (which writes them)
//! and PID 1 (which reads them at boot) must agree on byte for byte.
//!
//! - [`gpt`]: GUID partition tables (read, write, grow to fill a disk).
//! - [`partitions`]: the partition roles of a Keelson disk and their Discoverable Partitions
//!   Specification type GUIDs.
//! - [`verity`]: the dm-verity superblock and (with the `verity-build` feature) the hash tree.
//! - [`cmdline`]: the kernel command line keys Keelson uses.
//! - [`cpio`]: a deterministic `newc` archive writer (initramfs).
//! - [`caps`]: Linux capability names in bit order (service schema and runtime).
//! - [`error`]: the transport-neutral kind of a failure (the API maps it to HTTP).
//! - [`notice`]: what a sysd component reports for the event log.
//! - [`durable`]: the one way a file is replaced on /var, /run and the ESP (crash-safe).
//! - [`authenticode`] (feature `authenticode`): UEFI Secure Boot signatures on PE images.
//! - [`notify`]: the channel between init and sysd (readiness, watchdog, the FD store, orphan
//!   exits).
//! - [`api`] (feature `api`): the wire types of sysd's HTTP API, shared with keelctl.

#[cfg(feature = "api")]
pub mod api;
#[cfg(feature = "authenticode")]
pub mod authenticode;
pub mod caps;
pub mod cmdline;
pub mod cpio;
#[cfg(feature = "dm")]
pub mod dm;
pub mod durable;
pub mod error;
pub mod gpt;
pub mod notice;
pub mod notify;
pub mod partitions;
#[cfg(feature = "update")]
pub mod update;
pub mod verity;
