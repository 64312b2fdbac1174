//! sysd's Prometheus exporter (docs/observability.md): `GET /metrics` in the text exposition
//! format on its own TCP listener (`[metrics] listen`), off unless configured.
//!
//! [`exposition`] writes the format; [`node`] reads the node's figures under node_exporter's
//! names; [`collect`] adds every service's cgroup figures under cAdvisor's names, their
//! supervision, the OS and its updates, and sysd's own; [`server`] answers scrapes, bounded
//! (connections, header timeout, whole-exchange timeout). It reads the supervisor only through
//! the API's [`keelson_api::Services`] and [`keelson_api::Updates`] traits (the same figures
//! `keelctl stats` shows) and knows nothing of how they are produced.

pub mod collect;
pub mod exposition;
pub mod node;
pub mod server;

pub use collect::{Collector, Contributor};
