//! What Keelson's tests, benchmarks and harnesses share.
//!
//! - [`tools`] is the one list of host programs and files the suite calls (`host-tools.txt`
//!   beside this crate's manifest): `./dev deps` installs their packages, the fresh-root test
//!   checks them on a new Debian root, and tests resolve programs through [`tools::path`] so
//!   that a missing one fails with the package to install, never a silent skip.
//! - [`daemon`]: a sysd started in a private mount namespace with its own cgroup parent,
//!   talked to over its socket ([`http`]), cleaned up on drop.
//! - [`busybox`]: a busybox root file system for containers; [`cgroup`]: cgroup2 on hybrid
//!   hosts and cleanup.
//! - [`oci`]: OCI layers built in memory (tar entries, directories, gzip).
//! - [`registry`]: a private network namespace, a `docker-registry`, OCI layouts pushed to it,
//!   a failing proxy, a token server, a private CA.
//! - [`etcd`]: a real etcd member (Debian's `etcd-server`) on a private loopback.
//! - [`peers`]: Debian's Prometheus and rsyslog as real peers of the exporter and the log
//!   forwarder, in the test's namespace or a guest's.
//! - [`stats`]: medians and percentiles for the benchmarks.

pub mod busybox;
pub mod cgroup;
pub mod daemon;
pub mod etcd;
pub mod history;
pub mod http;
pub mod oci;
pub mod peers;
pub mod registry;
pub mod secure_boot;
pub mod stats;
pub mod tools;
