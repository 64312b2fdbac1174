//! What kind of failure a domain error is, independent of any transport: each library's
//! error type says its kind, and only the API server turns a kind into an HTTP status.

/// The kind of a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The request or the input is wrong (fix it and retry).
    Invalid,
    /// What was named does not exist.
    NotFound,
    /// The request contradicts the current state (e.g. removing what is in use).
    Conflict,
    /// The capability is absent or not ready.
    Unavailable,
    /// Something this node depends on (a registry, a metadata service) failed.
    Upstream,
    /// A bug or an unexpected local failure.
    Internal,
}

/// An error that knows its [`Kind`].
pub trait Classify {
    fn kind(&self) -> Kind;
}
