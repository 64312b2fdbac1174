//! Rolling updates that keep quorum (`[update.coordination] strategy = "etcd-lock"`): a node
//! that has staged a version takes a slot of its group's reboot semaphore in etcd before it
//! reboots, and gives it back only once the health gate has blessed the new slot, or after a
//! rollback, in which case it also halts the rollout of that version for the whole group.
//!
//! The slot hangs on a lease whose ID is kept in `state.json`, so the node finds it again
//! after its reboot and keeps it alive through the health gate; a node that dies holding it
//! frees it when the lease runs out. A node never reboots for an update without a slot: with
//! etcd unreachable it waits, and says so.

use std::time::Duration;

use keelson_common::api::update::{Coordination, Phase};
use keelson_fleet::{Acquire, Client, Halt, Lock};
use keelson_spec::update::{Strategy, UpdateSpec};

use super::Agent;

/// How often a waiting node asks again.
const RETRY: Duration = Duration::from_secs(5);

/// What [`Agent::take_reboot_slot`] decided.
pub(crate) enum Gate {
    /// Reboot (a slot is held, or no coordination is configured).
    Go,
    /// The group halted the rollout of this version.
    Halted(Halt),
    /// The install was cancelled while waiting.
    Cancelled,
}

/// This node's name in its group: its hostname.
fn node_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "keelson".into())
}

fn now() -> String {
    jiff::Timestamp::now().to_string()
}

/// The group's lock, when the spec asks for coordination, for this node under its host name.
fn lock_of(spec: &UpdateSpec) -> Option<Result<(Lock, Duration), keelson_fleet::Error>> {
    lock_as(spec, &node_name())
}

/// The group's lock for this node under `node`.
fn lock_as(
    spec: &UpdateSpec,
    node: &str,
) -> Option<Result<(Lock, Duration), keelson_fleet::Error>> {
    let c = spec.coordination.as_ref()?;
    if c.strategy != Strategy::EtcdLock {
        return None;
    }
    Some(
        Client::new(&c.endpoints)
            .map(|client| (Lock::new(client, &c.group, c.holders, node), c.lease.0)),
    )
}

impl Agent {
    /// The lease this node's slot hangs on: the persisted one while etcd still knows it, else
    /// a fresh one (persisted before it is used, so a reboot finds it).
    async fn lease(&self, lock: &Lock, ttl: Duration) -> Result<i64, keelson_fleet::Error> {
        let persisted = self.live().state.lock_lease;
        if let Some(id) = persisted {
            if lock.client().keepalive(id).await? {
                return Ok(id);
            }
        }
        let id = lock.client().grant(ttl).await?;
        self.save(|s| s.lock_lease = Some(id));
        Ok(id)
    }

    /// Before rebooting into `version`: waits for a slot of the group's semaphore.
    pub(crate) async fn take_reboot_slot(&self, spec: &UpdateSpec, version: &str) -> Gate {
        let Some(lock) = lock_of(spec) else {
            return Gate::Go;
        };
        let (lock, ttl) = match lock {
            Ok(l) => l,
            Err(e) => {
                // The spec check accepts only usable endpoints; say it anyway, never reboot.
                self.emit("update-coordination-failed", format!("{e}; not rebooting"));
                return Gate::Cancelled;
            }
        };
        let mut said = String::new();
        loop {
            if self.check_cancel().is_err() {
                self.leave_queue(&lock).await;
                return Gate::Cancelled;
            }
            let attempt = async {
                let lease = self.lease(&lock, ttl).await?;
                let got = lock.try_acquire(lease, version, &now()).await?;
                if matches!(got, Acquire::Busy { .. }) {
                    lock.wait(lease).await?;
                }
                Ok::<_, keelson_fleet::Error>(got)
            }
            .await;
            self.refresh_coordination(spec).await;
            let (say, kind) = match attempt {
                Ok(Acquire::Held { slot }) => {
                    let node = lock.node().to_owned();
                    self.save(|s| s.lock_node = Some(node));
                    self.emit(
                        "update-slot-taken",
                        format!(
                            "took reboot slot {slot} of group {:?} for {version}",
                            lock_group(spec)
                        ),
                    );
                    return Gate::Go;
                }
                Ok(Acquire::Halted(h)) => {
                    self.leave_queue(&lock).await;
                    return Gate::Halted(h);
                }
                Ok(Acquire::Busy { holders }) => {
                    let who: Vec<String> = holders
                        .iter()
                        .map(|h| format!("{} ({})", h.node, h.version))
                        .collect();
                    (
                        format!(
                            "{version} is staged; waiting for a reboot slot (held by {})",
                            who.join(", ")
                        ),
                        "update-waiting-for-slot",
                    )
                }
                Err(e) => (
                    format!("{version} is staged; not rebooting without a slot: {e}"),
                    "update-waiting-for-etcd",
                ),
            };
            self.set_phase(Phase::WaitingForSlot);
            if say != said {
                self.emit(kind, say.clone());
                said = say;
            }
            tokio::time::sleep(RETRY).await;
        }
    }

    /// Stops waiting for a slot (the rollout halted, the install was cancelled): revokes the
    /// lease this node's `waiting` key hangs on, so nobody sees it waiting any more. Best
    /// effort: the lease runs out anyway.
    async fn leave_queue(&self, lock: &Lock) {
        let lease = self.live().state.lock_lease;
        if let Some(id) = lease {
            if lock.client().revoke(id).await.is_ok() {
                self.save(|s| s.lock_lease = None);
            }
        }
        self.refresh_coordination(&self.current_spec().unwrap_or_default())
            .await;
    }

    /// After the health gate blessed this boot, or after a rollback (`halt`: the version and
    /// why): gives the slot back and revokes its lease. Retries while etcd is unreachable (the
    /// lease would free the slot in the end anyway).
    pub(crate) async fn give_back_slot(&self, spec: &UpdateSpec, halt: Option<(&str, &str)>) {
        let (lease, took_as) = {
            let live = self.live();
            (live.state.lock_lease, live.state.lock_node.clone())
        };
        // A slot is only ever taken with a lease, persisted first: without one this boot holds
        // nothing (e.g. the image's own first boot, blessed before etcd is even up).
        if lease.is_none() && halt.is_none() {
            return;
        }
        for attempt in 0..60 {
            // Early in a boot the host name may still be the machine-id's until DHCP names the
            // node: give back (and halt) under the name the slot was taken with.
            let node = took_as.clone().unwrap_or_else(node_name);
            let Some(Ok((lock, _))) = lock_as(spec, &node) else {
                return;
            };
            let done = async {
                if let Some((version, reason)) = halt {
                    lock.halt(version, reason, &now()).await?;
                }
                let n = lock.release().await?;
                if let Some(id) = lease {
                    lock.client().revoke(id).await?;
                }
                Ok::<_, keelson_fleet::Error>(n)
            }
            .await;
            match done {
                Ok(n) => {
                    self.save(|s| {
                        s.lock_lease = None;
                        s.lock_node = None;
                    });
                    let what = match halt {
                        Some((v, _)) => format!(
                            "halted the rollout of {v} for group {:?}; ",
                            lock_group(spec)
                        ),
                        None => String::new(),
                    };
                    self.emit(
                        "update-slot-released",
                        format!("{what}gave back {n} reboot slot(s)"),
                    );
                    self.refresh_coordination(spec).await;
                    return;
                }
                Err(e) if attempt == 0 => self.emit(
                    "update-waiting-for-etcd",
                    format!("cannot give the reboot slot back yet: {e}; retrying"),
                ),
                Err(_) => {}
            }
            tokio::time::sleep(RETRY).await;
        }
    }

    /// While this boot holds a slot (pending its health gate): keeps the lease alive.
    pub(crate) async fn keep_slot_alive(&self, spec: &UpdateSpec) {
        let Some(Ok((lock, ttl))) = lock_of(spec) else {
            return;
        };
        let every = (ttl / 3).max(Duration::from_secs(1));
        loop {
            let lease = self.live().state.lock_lease;
            let Some(id) = lease else {
                return;
            };
            if let Ok(false) = lock.client().keepalive(id).await {
                return;
            }
            tokio::time::sleep(every).await;
        }
    }

    /// Whether the group halted the rollout of `version` (etcd unreachable: not known, no).
    pub(crate) async fn halted(&self, spec: &UpdateSpec, version: &str) -> Option<Halt> {
        let Some(Ok((lock, _))) = lock_of(spec) else {
            return None;
        };
        let state = lock.state().await.ok()?;
        state.halted.filter(|h| h.version == version)
    }

    /// Re-reads the group's semaphore for `keelctl update status`.
    pub(crate) async fn refresh_coordination(&self, spec: &UpdateSpec) {
        let view = match lock_of(spec) {
            None => None,
            Some(Err(e)) => Some(Coordination {
                strategy: "etcd-lock".into(),
                error: Some(e.to_string()),
                seen_at: now(),
                ..Coordination::default()
            }),
            Some(Ok((lock, _))) => {
                let c = spec.coordination.as_ref();
                let mut view = Coordination {
                    strategy: "etcd-lock".into(),
                    group: c.map(|c| c.group.clone()).unwrap_or_default(),
                    holders: c.map(|c| c.holders).unwrap_or(1),
                    node: node_name(),
                    seen_at: now(),
                    ..Coordination::default()
                };
                match lock.state().await {
                    Ok(s) => {
                        view.held_by = s
                            .holders
                            .iter()
                            .map(|h| format!("{} ({}, since {})", h.node, h.version, h.since))
                            .collect();
                        view.waiting = s.waiting;
                        view.halted = s
                            .halted
                            .map(|h| format!("{} by {}: {}", h.version, h.node, h.reason));
                    }
                    Err(e) => view.error = Some(e.to_string()),
                }
                Some(view)
            }
        };
        self.live().coordination = view;
    }
}

fn lock_group(spec: &UpdateSpec) -> String {
    spec.coordination
        .as_ref()
        .map(|c| c.group.clone())
        .unwrap_or_default()
}
