//! Keelson's VM test harness: boot a built image under QEMU and watch its serial console.
//!
//! A test builds a [`GuestBuilder`] (UEFI boot of the GPT disk through OVMF and systemd-boot, or a
//! direct `-kernel` boot of the same kernel and initramfs), spawns a [`Guest`], and asserts on what
//! the guest prints:
//!
//! ```no_run
//! use std::time::Duration;
//! use qemu_tests::{image, GuestBuilder};
//!
//! # fn main() -> anyhow::Result<()> {
//! let guest = GuestBuilder::uefi_from_image_dir(&image("vm")?)?
//!     .disk_size(2 << 30)
//!     .forward(8080, 80)
//!     .spawn()?;
//! guest.wait_for("keelson: stage 2", Duration::from_secs(120))?;
//! let reply = guest.run_in_netns(|| std::net::TcpStream::connect("127.0.0.1:8080").is_ok());
//! assert!(reply);
//! guest.powerdown()?;
//! guest.wait_exit(Duration::from_secs(60))?;
//! # Ok(())
//! # }
//! ```
//!
//! Several guests on one network are a [`Cluster`] (module [`cluster`]): one namespace, a bridge
//! with a tap per guest, dnsmasq handing each node its reserved address and name, and
//! kill/restart/cut/heal per node. What the scenarios on the test image share (a guest of it with
//! its root shell reachable through [`Guest::sh`], HTTP from the namespace, a busybox httpd
//! there) is in [`scenario`].
//!
//! The rules every guest follows (enforced here, not left to each test):
//!
//! - **A network namespace of the test's.** QEMU runs inside a fresh [`NetNs`] holding only `lo`
//!   (or a cluster's, holding only its bridge and taps): user networking has nowhere to go, so
//!   tests never reach the internet, and forwarded ports live on the namespace's `127.0.0.1`
//!   (reach them with [`Guest::run_in_netns`]).
//! - **TCG by default.** The CI machines have no usable KVM; `KEELSON_KVM=1` opts in to it.
//! - **Images are never modified.** The disk is attached through a qcow2 overlay (or a copy) in
//!   the guest's temporary directory, with a private copy of the OVMF variable store.
//! - **Killed on drop.** Dropping a [`Guest`] SIGKILLs QEMU and deletes the namespace (unless a
//!   cluster's other guests still share it) and the temporary directory (`KEELSON_KEEP=1` keeps
//!   the directory and prints its path); dropping a [`Cluster`] removes its LAN too.
//! - **Serial tail on failure.** Timeouts and early QEMU exits return errors carrying the end of
//!   the serial log (and QEMU's stderr); a test that panics with a live guest prints the last 60
//!   serial lines, labelled with the guest's name (a cluster's node).
//!
//! Environment: `KEELSON_OUT` (images directory, default `<workspace>/out`), `KEELSON_KVM=1`,
//! `KEELSON_KEEP=1`, `KEELSON_OVMF_CODE` / `KEELSON_OVMF_VARS` (firmware paths).

pub mod cluster;
pub mod guest;
pub mod netns;
pub mod paths;
pub mod repo_server;
pub mod scenario;
pub mod serial;
pub mod update;

pub use cluster::{Cluster, ClusterBuilder, NodeConfig};
pub use guest::{
    copy_disk, create_overlay, DiskController, DiskFormat, Guest, GuestBuilder, NicModel,
    TEST_SHELL_PORT,
};
pub use netns::NetNs;
pub use paths::{image, images_dir, ovmf_code, ovmf_vars, qemu_img, qemu_system, workspace_root};
pub use serial::{Cursor, Match, SerialLog};
