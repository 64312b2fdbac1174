//! First-boot configuration, cloud-init style: find user data, decode it, map it onto Keelson's
//! config, apply it once per instance.
//!
//! - [`datasource`]: the kernel command line, QEMU fw_cfg and NoCloud seeds, in that order.
//! - [`userdata`]: bytes → format (limits, gzip, encodings, `#cloud-config` / TOML / refused).
//! - [`seedfs`]: NoCloud seed volumes (ISO 9660, FAT) read in process, without mounting.
//! - [`cloudconfig`]: the `#cloud-config` subset, strictly typed, unsupported keys listed.

pub mod cloudconfig;
pub mod datasource;
pub mod seedfs;
pub mod userdata;
