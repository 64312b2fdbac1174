//! What a sysd component reports for the event log: the network manager, the update agent and
//! image pulls send [`Notice`]s on a channel, and the `sysd` binary enters them in the event
//! stream (which adds the sequence number and time). A component never holds the log itself.

/// One event line to be: its kind (`dhcp-lease`, `update-staged`, `image-pulled`...) and a
/// message for a person.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notice {
    pub kind: &'static str,
    pub message: String,
}

impl Notice {
    pub fn new(kind: &'static str, message: impl Into<String>) -> Self {
        Notice {
            kind,
            message: message.into(),
        }
    }
}
