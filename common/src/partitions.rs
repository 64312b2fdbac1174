//! The partitions of a Keelson disk: their roles, GPT labels and the type GUIDs of the UAPI
//! Discoverable Partitions Specification (x86-64), so `systemd-dissect` and other tools recognise them.
//!
//! Stage 1 of init finds a slot's partitions by type GUID *and* label (`root-a`, `root-a-verity`,
//! ...): the type says what a partition holds, the label which slot it belongs to.

use crate::gpt::Guid;

/// EFI System Partition.
pub const ESP_TYPE: Guid = Guid::from_str_const("c12a7328-f81f-11d2-ba4b-00a0c93ec93b");
/// Root file system for x86-64.
pub const ROOT_X86_64_TYPE: Guid = Guid::from_str_const("4f68bce3-e8cd-4db1-96e7-fbcaf984b709");
/// dm-verity hash tree of an x86-64 root file system.
pub const ROOT_X86_64_VERITY_TYPE: Guid =
    Guid::from_str_const("2c7357ed-ebd2-46d9-aec1-23d437ec2bf5");
/// The `/var` partition.
pub const VAR_TYPE: Guid = Guid::from_str_const("4d21b016-b534-45c2-a9fb-5c16e091fd2d");

/// An A/B slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Slot {
    A,
    B,
}

impl Slot {
    /// Both slots, in order.
    pub const ALL: [Slot; 2] = [Slot::A, Slot::B];

    /// Parses `a` or `b` (as on the kernel command line).
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "a" | "A" => Some(Slot::A),
            "b" | "B" => Some(Slot::B),
            _ => None,
        }
    }

    /// The lowercase letter of the slot.
    pub fn letter(self) -> &'static str {
        match self {
            Slot::A => "a",
            Slot::B => "b",
        }
    }

    /// The other slot.
    pub fn other(self) -> Slot {
        match self {
            Slot::A => Slot::B,
            Slot::B => Slot::A,
        }
    }

    /// GPT label of this slot's root partition.
    pub fn root_label(self) -> String {
        format!("root-{}", self.letter())
    }

    /// GPT label of this slot's verity partition.
    pub fn verity_label(self) -> String {
        format!("root-{}-verity", self.letter())
    }
}

impl std::fmt::Display for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.letter())
    }
}

/// GPT label of the EFI System Partition.
pub const ESP_LABEL: &str = "esp";
/// GPT label of the data partition (mounted at /var).
pub const DATA_LABEL: &str = "data";
