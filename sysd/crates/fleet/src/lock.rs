//! The reboot semaphore (Flatcar locksmith's `etcd-lock`, with leases): at most `holders`
//! nodes of a group reboot at once.
//!
//! Keys under `/keelson/reboot/<group>/`:
//! - `slots/<i>`, `i < holders`: a held slot, created only if absent (an etcd transaction), its
//!   value the [`Holder`], attached to the holder's lease: a node that dies holding a slot
//!   frees it when its lease runs out instead of blocking the fleet forever;
//! - `waiting/<node>`: nodes waiting for a slot (short lease, for `keelctl update status`);
//! - `halted`: set by a node whose new version failed its health gate and rolled back; no
//!   node takes a slot for that version while it is there (the rollout halts).
//!
//! A node finds its own slot again after its reboot (same node name), so the slot it took
//! before rebooting is the one it gives back once the health gate has blessed the new slot.

use serde::{Deserialize, Serialize};

use crate::etcd::{Client, Error};

/// Who holds a slot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holder {
    pub node: String,
    /// The version it reboots into.
    pub version: String,
    /// RFC 3339, when it took the slot.
    pub since: String,
}

/// A halted rollout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Halt {
    pub version: String,
    pub node: String,
    pub reason: String,
    pub since: String,
}

/// What the group looks like now.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct State {
    pub holders: Vec<Holder>,
    pub waiting: Vec<String>,
    pub halted: Option<Halt>,
}

/// The outcome of [`Lock::try_acquire`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Acquire {
    /// This node holds slot `slot` (newly taken, or already its own).
    Held { slot: u32 },
    /// Every slot is taken, by these.
    Busy { holders: Vec<Holder> },
    /// The rollout of this version is halted.
    Halted(Halt),
}

/// One node's view of its group's semaphore.
#[derive(Debug, Clone)]
pub struct Lock {
    client: Client,
    prefix: String,
    holders: u32,
    node: String,
}

impl Lock {
    pub fn new(client: Client, group: &str, holders: u32, node: &str) -> Lock {
        Lock {
            client,
            prefix: format!("/keelson/reboot/{group}/"),
            holders: holders.max(1),
            node: node.to_owned(),
        }
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The name this node holds and waits under.
    pub fn node(&self) -> &str {
        &self.node
    }

    fn slot_key(&self, i: u32) -> String {
        format!("{}slots/{i}", self.prefix)
    }

    /// The group's holders, waiters and halt.
    pub async fn state(&self) -> Result<State, Error> {
        let all = self.client.range_prefix(&self.prefix).await?;
        let mut s = State::default();
        for kv in all {
            let rest = &kv.key[self.prefix.len()..];
            if rest.starts_with("slots/") {
                if let Ok(h) = serde_json::from_slice::<Holder>(&kv.value) {
                    s.holders.push(h);
                }
            } else if let Some(node) = rest.strip_prefix("waiting/") {
                s.waiting.push(node.to_owned());
            } else if rest == "halted" {
                s.halted = serde_json::from_slice(&kv.value).ok();
            }
        }
        Ok(s)
    }

    /// Takes a free slot for rebooting into `version`, attached to `lease`. Holding one
    /// already (e.g. taken before this boot) counts as success. Slots beyond this node's
    /// `holders` that other nodes hold count against the limit too (a fleet whose nodes
    /// disagree on `holders` never exceeds the smallest).
    pub async fn try_acquire(
        &self,
        lease: i64,
        version: &str,
        now: &str,
    ) -> Result<Acquire, Error> {
        let state = self.state().await?;
        if let Some(h) = &state.halted {
            if h.version == version {
                return Ok(Acquire::Halted(h.clone()));
            }
        }
        let taken = self
            .client
            .range_prefix(&format!("{}slots/", self.prefix))
            .await?;
        for kv in &taken {
            if let Ok(h) = serde_json::from_slice::<Holder>(&kv.value) {
                if h.node == self.node {
                    let slot = kv
                        .key
                        .rsplit('/')
                        .next()
                        .and_then(|s| s.parse().ok())
                        .unwrap_or(0);
                    return Ok(Acquire::Held { slot });
                }
            }
        }
        if taken.len() as u32 >= self.holders {
            return Ok(Acquire::Busy {
                holders: state.holders,
            });
        }
        let me = Holder {
            node: self.node.clone(),
            version: version.to_owned(),
            since: now.to_owned(),
        };
        let value = serde_json::to_vec(&me).unwrap_or_default();
        for i in 0..self.holders {
            if self.client.create(&self.slot_key(i), &value, lease).await? {
                let _ = self
                    .client
                    .delete(&format!("{}waiting/{}", self.prefix, self.node))
                    .await;
                return Ok(Acquire::Held { slot: i });
            }
        }
        // Someone took the last free slot between our read and our create.
        Ok(Acquire::Busy {
            holders: self.state().await?.holders,
        })
    }

    /// Gives back every slot this node holds. Returns how many it gave back.
    pub async fn release(&self) -> Result<usize, Error> {
        let taken = self
            .client
            .range_prefix(&format!("{}slots/", self.prefix))
            .await?;
        let mut n = 0;
        for kv in taken {
            let mine =
                serde_json::from_slice::<Holder>(&kv.value).is_ok_and(|h| h.node == self.node);
            if mine && self.client.delete_if(&kv.key, &kv.value).await? {
                n += 1;
            }
        }
        Ok(n)
    }

    /// Says this node waits for a slot (shown by `keelctl update status`), under `lease`.
    pub async fn wait(&self, lease: i64) -> Result<(), Error> {
        self.client
            .put(&format!("{}waiting/{}", self.prefix, self.node), b"", lease)
            .await
    }

    /// Stops the rollout of `version` (this node rolled back from it).
    pub async fn halt(&self, version: &str, reason: &str, now: &str) -> Result<(), Error> {
        let h = Halt {
            version: version.to_owned(),
            node: self.node.clone(),
            reason: reason.to_owned(),
            since: now.to_owned(),
        };
        self.client
            .put(
                &format!("{}halted", self.prefix),
                &serde_json::to_vec(&h).unwrap_or_default(),
                0,
            )
            .await
    }

    /// Lets the rollout go on (an operator's call, after fixing or superseding the version).
    pub async fn resume(&self) -> Result<(), Error> {
        self.client.delete(&format!("{}halted", self.prefix)).await
    }
}
