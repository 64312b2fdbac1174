//! Fleet coordination for Keelson nodes (docs/updates.md, "Rolling updates"): an etcd v3 client
//! ([`etcd`]) and the reboot semaphore rolling updates take slots in ([`lock`]). Knows nothing
//! of the update agent, services or the API: the agent decides when to ask.

pub mod etcd;
pub mod lock;

pub use etcd::{Client, Error};
pub use lock::{Acquire, Halt, Holder, Lock, State};

impl keelson_common::error::Classify for Error {
    fn kind(&self) -> keelson_common::error::Kind {
        use keelson_common::error::Kind;
        match self {
            Error::BadEndpoint(_) => Kind::Invalid,
            Error::Unreachable(_) => Kind::Unavailable,
            Error::Refused { .. } | Error::Answer { .. } => Kind::Upstream,
        }
    }
}
