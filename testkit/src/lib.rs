//! What Keelson's tests, benchmarks and harnesses share.
//!
//! [`tools`] is the one list of host programs and files the suite calls (`host-tools.txt`
//! beside this crate's manifest): `./dev deps` installs their packages, the fresh-root test
//! checks them on a new Debian root, and tests resolve programs through [`tools::path`] so
//! that a missing one fails with the package to install, never a silent skip.

pub mod tools;
