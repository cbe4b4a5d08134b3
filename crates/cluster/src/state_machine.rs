//! The replicated state machine: openraft's [`RaftStateMachine`] over the
//! node's mail store.
//!
//! Role: turn committed log entries into changes of the node's
//! [`LocalStore`] — the directory (domains, users, aliases) and the mail
//! metadata (accepted messages, deletions, the outbound queue) — in log
//! order, identically on every node (Raft paper §5.3, "State Machine
//! Safety"). Message bodies are not in the log: they are copied beside it
//! before their `Accept` is proposed ([`crate::mailstore`]); an `Accept`
//! whose body is not here is recorded anyway and its body fetched from a
//! peer afterwards (the state machine tells the node's repair task).
//!
//! Why it is safe across crashes: the Raft bookkeeping of the state machine
//! (last applied log id, last membership, the node-id counter: a
//! [`ConsensusState`]) is saved by `LocalStore::apply_state` in the
//! *same* redb commit as the directory and mail changes of the entries it
//! covers (so a crash can never apply an `Accept` twice or lose one). So
//! after a crash the store is exactly "the state after entry
//! `last_applied`", and openraft re-applies from there (openraft docs,
//! `docs::components::state_machine`: a persistent state machine persists
//! before `apply()` returns, then snapshots need not be persisted — we still
//! keep the last snapshot on disk so that it can be sent to a lagging
//! follower after a restart without rebuilding it).
//!
//! A snapshot is `postcard((StateSnapshot, ConsensusState))` followed by
//! `postcard(Vec<(seq, event record)>)`, the cluster event log (absent in
//! snapshots made before it existed), then `postcard(Vec<(queue id,
//! QueueState)>)`, the outbound queue's delivery state (absent in
//! snapshots made before outbound delivery existed), then
//! `postcard(Vec<(queue id, accepted at)>)`, the ages of the message
//! records, by which every node prunes them alike (absent in snapshots
//! made before they were pruned); it is also written to
//! `<dir>/snapshot.bin` (tmp file, fsync, rename, fsync dir). Each segment
//! after the first is optional, so that an older snapshot still installs.
//!
//! The failover groups and their placements are in the `ConsensusState`
//! (small); the cluster event log is a store table written by
//! [`StateChange::ClusterLog`] in the same commit (one insert per event,
//! the oldest beyond [`EVENTS_KEPT`] dropped).

// openraft's StorageError is large, and the traits impose it.
#![allow(clippy::result_large_err)]

use std::io::{Cursor, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use hamail_store::{BodyHash, DirectoryChange, LocalStore, MailChange, StateChange, StateSnapshot, StoreError};
use openraft::storage::RaftStateMachine;
use openraft::{AnyError, EntryPayload, ErrorSubject, ErrorVerb, OptionalSend, RaftSnapshotBuilder, StorageIOError};
use serde::{Deserialize, Serialize};

use crate::groups::{GroupReport, GroupState, GroupTable, GroupTarget, ResourceSpec, EVENTS_KEPT};
use crate::mailstore::MailEvents;
use crate::types::{
    BanChange, ClusterSecrets, Command, CommandResult, Entry, LogId, NodeId, Snapshot, SnapshotMeta, StorageError,
    StoredMembership, TypeConfig,
};

/// The first id `AllocateNodeId` hands out (node 1 is the initializer).
pub const FIRST_ALLOCATED_NODE_ID: u64 = 2;

const SNAPSHOT_FILE: &str = "snapshot.bin";

pub use crate::types::ClusterSecrets as Secrets;

/// The Raft bookkeeping saved with the directory, in the same commit.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsensusState {
    pub last_applied: Option<LogId>,
    pub membership: StoredMembership,
    /// The id the next `AllocateNodeId` returns.
    pub next_node_id: u64,
    /// Set by `ConfigureCluster` at `cluster init`.
    pub cluster: Option<ClusterSecrets>,
    /// The failover groups and where they run (small: rewritten with every
    /// apply, like the rest of this state; the event log is not here, it
    /// is a store table).
    pub groups: GroupTable,
}

/// [`ConsensusState`] as saved before failover groups existed.
#[derive(Deserialize)]
struct LegacyConsensusState {
    last_applied: Option<LogId>,
    membership: StoredMembership,
    next_node_id: u64,
    cluster: Option<ClusterSecrets>,
}

impl ConsensusState {
    /// Decodes a saved state (current or pre-groups format), with the bytes
    /// that follow it.
    fn decode_prefix(bytes: &[u8]) -> Result<(ConsensusState, &[u8]), postcard::Error> {
        match postcard::take_from_bytes::<ConsensusState>(bytes) {
            Ok(v) => Ok(v),
            Err(e) => match postcard::take_from_bytes::<LegacyConsensusState>(bytes) {
                Ok((l, rest)) => Ok((
                    ConsensusState {
                        last_applied: l.last_applied,
                        membership: l.membership,
                        next_node_id: l.next_node_id,
                        cluster: l.cluster,
                        groups: GroupTable::default(),
                    },
                    rest,
                )),
                Err(_) => Err(e),
            },
        }
    }
}

impl Default for ConsensusState {
    fn default() -> Self {
        ConsensusState {
            last_applied: None,
            membership: StoredMembership::default(),
            next_node_id: FIRST_ALLOCATED_NODE_ID,
            cluster: None,
            groups: GroupTable::default(),
        }
    }
}

/// The last snapshot built or installed, with its bytes.
#[derive(Clone, Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta,
    data: Vec<u8>,
}

/// The next segment of a snapshot, `None` when the snapshot ends before it
/// (made by a version that did not write it).
fn optional_segment<T: serde::de::DeserializeOwned>(rest: &mut &[u8]) -> Result<Option<T>, postcard::Error> {
    if rest.is_empty() {
        return Ok(None);
    }
    let (value, after) = postcard::take_from_bytes(rest)?;
    *rest = after;
    Ok(Some(value))
}

fn sm_err(verb: ErrorVerb, e: impl std::fmt::Display) -> StorageError {
    StorageError::IO { source: StorageIOError::new(ErrorSubject::StateMachine, verb, AnyError::error(e.to_string())) }
}

fn snap_err(meta: Option<&SnapshotMeta>, verb: ErrorVerb, e: impl std::fmt::Display) -> StorageError {
    StorageError::IO {
        source: StorageIOError::new(
            ErrorSubject::Snapshot(meta.map(|m| m.signature())),
            verb,
            AnyError::error(e.to_string()),
        ),
    }
}

/// Shared between the state machine and its snapshot builders.
struct Shared {
    store: Arc<LocalStore>,
    dir: PathBuf,
    /// The applied state. Held (async lock) while a batch is applied or a
    /// snapshot is exported or installed, so that a snapshot's directory
    /// export and its `ConsensusState` always describe the same point of
    /// the log (the builder runs concurrently with `apply`).
    state: tokio::sync::Mutex<ConsensusState>,
    /// Shared, so that taking it under the lock copies no bytes.
    current: std::sync::Mutex<Option<Arc<StoredSnapshot>>>,
    /// Tells the node's body repair task about applied accepts.
    events: Arc<MailEvents>,
    /// The applied group table, for the node's group agent and manager.
    groups: tokio::sync::watch::Sender<GroupTable>,
    /// Applied ban changes, for the running server.
    bans: tokio::sync::broadcast::Sender<BanChange>,
}

impl Shared {
    fn current(&self) -> Option<Arc<StoredSnapshot>> {
        self.current.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    fn set_current(&self, s: Arc<StoredSnapshot>) {
        *self.current.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(s);
    }
}

/// Runs `f` on a blocking thread. The snapshot's heavy work — encoding or
/// decoding the whole state (every mailbox and message record), copying its
/// bytes, writing and fsyncing its file — must not hold a tokio worker:
/// openraft's core and replication tasks, which send and answer the
/// heartbeats, run on the same few workers (two on a two-core machine).
async fn off_the_workers<T: Send + 'static>(
    meta: Option<&SnapshotMeta>,
    f: impl FnOnce() -> Result<T, StorageError> + Send + 'static,
) -> Result<T, StorageError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| snap_err(meta, ErrorVerb::Write, e))?
}

/// Saves `snap` as `<dir>/snapshot.bin`: tmp file, fsync, rename, fsync of
/// the directory (so that a crash leaves the old or the new one). Blocking.
fn persist(dir: &Path, snap: &StoredSnapshot) -> Result<(), StorageError> {
    let failed = |e: &dyn std::fmt::Display| snap_err(Some(&snap.meta), ErrorVerb::Write, e);
    let bytes = postcard::to_allocvec(snap).map_err(|e| failed(&e))?;
    let write = || -> std::io::Result<()> {
        let tmp = dir.join(format!("{SNAPSHOT_FILE}.tmp"));
        {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&bytes)?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, dir.join(SNAPSHOT_FILE))?;
        std::fs::File::open(dir)?.sync_all()
    };
    write().map_err(|e| failed(&e))
}

/// A snapshot's bytes: see the module documentation. Blocking (it encodes
/// the whole state).
fn encode_snapshot(
    state_snap: &StateSnapshot,
    state: &ConsensusState,
    events: &[(u64, Vec<u8>)],
) -> Result<Vec<u8>, postcard::Error> {
    let mut data = postcard::to_allocvec(&(state_snap, state))?;
    data.extend(postcard::to_allocvec(&events)?);
    data.extend(postcard::to_allocvec(&state_snap.queue_state)?);
    data.extend(postcard::to_allocvec(&state_snap.message_ages)?);
    Ok(data)
}

/// The state, consensus state and event log (if present) of a snapshot's
/// bytes. Blocking (it decodes the whole state).
type Decoded = (StateSnapshot, ConsensusState, Option<Vec<(u64, Vec<u8>)>>);

fn decode_snapshot(data: &[u8]) -> Result<Decoded, postcard::Error> {
    let (mut state_snap, rest): (StateSnapshot, &[u8]) = postcard::take_from_bytes(data)?;
    let (state, mut rest) = ConsensusState::decode_prefix(rest)?;
    let events = optional_segment(&mut rest)?;
    state_snap.queue_state = optional_segment(&mut rest)?.unwrap_or_default();
    state_snap.message_ages = optional_segment(&mut rest)?.unwrap_or_default();
    Ok((state_snap, state, events))
}

/// The state machine of one node. See the module documentation.
pub struct StateMachine {
    shared: Arc<Shared>,
}

/// Builds a snapshot of the state machine (runs beside `apply`).
pub struct SnapshotBuilder {
    shared: Arc<Shared>,
}

impl StateMachine {
    /// Opens the state machine of `store`, with its snapshot file in `dir`.
    /// The applied state comes from the store (saved with the directory).
    pub async fn open(store: Arc<LocalStore>, dir: &Path) -> Result<Self, StorageError> {
        std::fs::create_dir_all(dir).map_err(|e| sm_err(ErrorVerb::Write, e))?;
        let state = match store.consensus_state().await.map_err(|e| sm_err(ErrorVerb::Read, e))? {
            Some(bytes) => {
                ConsensusState::decode_prefix(&bytes)
                    .map_err(|e| sm_err(ErrorVerb::Read, format!("consensus state: {e}")))?
                    .0
            }
            None => ConsensusState::default(),
        };
        let path = dir.join(SNAPSHOT_FILE);
        let current = match std::fs::read(&path) {
            Ok(bytes) => Some(
                postcard::from_bytes::<StoredSnapshot>(&bytes)
                    .map_err(|e| snap_err(None, ErrorVerb::Read, format!("{}: {e}", path.display())))?,
            ),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(snap_err(None, ErrorVerb::Read, format!("{}: {e}", path.display()))),
        }
        .map(Arc::new);
        let (groups, _) = tokio::sync::watch::channel(state.groups.clone());
        // A server that falls this far behind loses ban changes, not memory.
        let (bans, _) = tokio::sync::broadcast::channel(1024);
        Ok(StateMachine {
            shared: Arc::new(Shared {
                groups,
                bans,
                store,
                dir: dir.to_path_buf(),
                state: tokio::sync::Mutex::new(state),
                current: std::sync::Mutex::new(current),
                events: Arc::new(MailEvents::default()),
            }),
        })
    }

    /// The events of this state machine's mail (applied accepts, installed
    /// snapshots) for the node's body repair task.
    pub(crate) fn mail_events(&self) -> Arc<MailEvents> {
        self.shared.events.clone()
    }

    /// The applied group table, updated after every apply.
    pub(crate) fn group_watch(&self) -> tokio::sync::watch::Receiver<GroupTable> {
        self.shared.groups.subscribe()
    }

    /// Ban changes as they are applied.
    pub(crate) fn ban_changes(&self) -> tokio::sync::broadcast::Sender<BanChange> {
        self.shared.bans.clone()
    }

    /// The applied state (for status and tests).
    pub async fn consensus_state(&self) -> ConsensusState {
        self.shared.state.lock().await.clone()
    }
}

/// The store change a command makes, `None` for commands that only touch
/// the consensus state.
fn change_of(cmd: Command) -> Option<StateChange> {
    Some(StateChange::Directory(match cmd {
        Command::AddDomain { domain } => DirectoryChange::AddDomain { domain },
        Command::RemoveDomain { domain } => DirectoryChange::RemoveDomain { domain },
        Command::AddUser { user, password_hash, at } => {
            DirectoryChange::AddUser { user, password_hash, created_at: at }
        }
        Command::SetPassword { user, password_hash } => DirectoryChange::SetPassword { user, password_hash },
        Command::RemoveUser { user } => DirectoryChange::RemoveUser { user },
        Command::AddAlias { alias, targets } => DirectoryChange::AddAlias { alias, targets },
        Command::RemoveAlias { alias } => DirectoryChange::RemoveAlias { alias },
        Command::Mail(change) => return Some(StateChange::Mail(change)),
        Command::AllocateNodeId
        | Command::ConfigureCluster { .. }
        | Command::PutGroup { .. }
        | Command::RemoveGroup { .. }
        | Command::SetGroupTarget { .. }
        | Command::AssignGroup { .. }
        | Command::GroupReport { .. }
        | Command::ClearGroup { .. }
        | Command::LogEvent { .. }
        | Command::Directory { .. }
        | Command::Ban(_) => return None,
    }))
}

/// What an entry answers: decided now, or by the store's result for the
/// change at this position in the batch.
enum Pending {
    Ready(CommandResult),
    Change(usize),
    /// A [`Command::Directory`]: `.1` changes from position `.0`.
    Changes(usize, usize),
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), StorageError> {
        let s = self.shared.state.lock().await;
        Ok((s.last_applied, s.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<CommandResult>, StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut guard = self.shared.state.lock().await;
        // Work on a copy: the in-memory state changes only once the commit
        // that records it has succeeded.
        let mut next = guard.clone();
        let mut changes = Vec::new();
        let mut pending = Vec::new();
        let mut accepted: Vec<BodyHash> = Vec::new();
        let mut bans = Vec::new();
        for entry in entries {
            next.last_applied = Some(entry.log_id);
            match entry.payload {
                EntryPayload::Blank => pending.push(Pending::Ready(CommandResult::Done)),
                EntryPayload::Membership(m) => {
                    next.membership = StoredMembership::new(Some(entry.log_id), m);
                    pending.push(Pending::Ready(CommandResult::Done));
                }
                EntryPayload::Normal(Command::AllocateNodeId) => {
                    let id = NodeId(next.next_node_id);
                    next.next_node_id += 1;
                    pending.push(Pending::Ready(CommandResult::NodeId(id)));
                }
                EntryPayload::Normal(Command::ConfigureCluster { secrets }) => {
                    next.cluster = Some(secrets);
                    pending.push(Pending::Ready(CommandResult::Done));
                }
                EntryPayload::Normal(Command::LogEvent { mut event }) => {
                    let seq = next.groups.next_event_seq.max(1);
                    next.groups.next_event_seq = seq + 1;
                    event.seq = seq;
                    let record = postcard::to_allocvec(&event).map_err(|e| sm_err(ErrorVerb::Write, e))?;
                    pending.push(Pending::Change(changes.len()));
                    changes.push(StateChange::ClusterLog { seq, record, keep: EVENTS_KEPT });
                }
                EntryPayload::Normal(Command::Directory { changes: batch }) => {
                    pending.push(Pending::Changes(changes.len(), batch.len()));
                    changes.extend(batch.into_iter().map(StateChange::Directory));
                }
                EntryPayload::Normal(Command::Ban(change)) => {
                    bans.push(change);
                    pending.push(Pending::Ready(CommandResult::Done));
                }
                EntryPayload::Normal(
                    cmd @ (Command::PutGroup { .. }
                    | Command::RemoveGroup { .. }
                    | Command::SetGroupTarget { .. }
                    | Command::AssignGroup { .. }
                    | Command::GroupReport { .. }
                    | Command::ClearGroup { .. }),
                ) => {
                    pending.push(Pending::Ready(apply_group_command(&mut next.groups, cmd)));
                }
                EntryPayload::Normal(cmd) => match change_of(cmd) {
                    Some(change) => {
                        if let StateChange::Mail(MailChange::Accept { body, .. }) = &change {
                            accepted.push(*body);
                        }
                        pending.push(Pending::Change(changes.len()));
                        changes.push(change);
                    }
                    None => pending.push(Pending::Ready(CommandResult::Done)),
                },
            }
        }
        if pending.is_empty() {
            return Ok(Vec::new());
        }
        let t0 = std::time::Instant::now();
        let n = pending.len();
        let state_bytes = postcard::to_allocvec(&next).map_err(|e| sm_err(ErrorVerb::Write, e))?;
        let last = next.last_applied;
        let results = self.shared.store.apply_state(changes, Some(state_bytes)).await.map_err(|e| match last {
            // Not a refusal: the store could not commit. openraft stops the
            // node (it cannot skip an entry and stay deterministic).
            Some(id) => StorageError::IO {
                source: StorageIOError::new(ErrorSubject::Apply(id), ErrorVerb::Write, AnyError::error(e.to_string())),
            },
            None => sm_err(ErrorVerb::Write, e),
        })?;
        tracing::debug!(entries = n, apply_us = t0.elapsed().as_micros() as u64, "state apply");
        let groups_changed = guard.groups != next.groups;
        *guard = next;
        if groups_changed {
            self.shared.groups.send_replace(guard.groups.clone());
        }
        drop(guard);
        self.shared.events.applied(accepted);
        for change in bans {
            // No receiver: no server listens (yet); nothing to tell.
            let _ = self.shared.bans.send(change);
        }
        // apply_state returns only Ok or Permanent per change.
        let refusal = |i: usize| match results.get(i) {
            Some(Ok(())) => Ok(None),
            Some(Err(StoreError::Permanent(msg))) => Ok(Some(msg.clone())),
            Some(Err(e)) => Ok(Some(e.to_string())),
            None => Err(sm_err(ErrorVerb::Write, "the store returned too few results")),
        };
        let mut out = Vec::with_capacity(pending.len());
        for p in pending {
            out.push(match p {
                Pending::Ready(r) => r,
                Pending::Change(i) => match refusal(i)? {
                    None => CommandResult::Done,
                    Some(msg) => CommandResult::Refused(msg),
                },
                Pending::Changes(start, n) => {
                    CommandResult::Each((start..start + n).map(refusal).collect::<Result<_, _>>()?)
                }
            });
        }
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        SnapshotBuilder { shared: self.shared.clone() }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError> {
        let data = snapshot.into_inner();
        let m = meta.clone();
        let (data, (state_snap, mut state, events)) = off_the_workers(Some(meta), move || {
            let decoded = decode_snapshot(&data).map_err(|e| snap_err(Some(&m), ErrorVerb::Read, e))?;
            Ok((data, decoded))
        })
        .await?;
        // The meta is what openraft trusts; they agree for our snapshots.
        state.last_applied = meta.last_log_id;
        state.membership = meta.last_membership.clone();
        let state_bytes = postcard::to_allocvec(&state).map_err(|e| snap_err(Some(meta), ErrorVerb::Write, e))?;
        let mut guard = self.shared.state.lock().await;
        self.shared
            .store
            .import_state(state_snap, state_bytes)
            .await
            .map_err(|e| snap_err(Some(meta), ErrorVerb::Write, e))?;
        // The event log in its own commit: a crash in between leaves an
        // older log with a newer state (only the log of events is behind).
        if let Some(events) = events {
            self.shared
                .store
                .import_cluster_log(events)
                .await
                .map_err(|e| snap_err(Some(meta), ErrorVerb::Write, e))?;
        }
        *guard = state;
        self.shared.groups.send_replace(guard.groups.clone());
        drop(guard);
        // The mail of the snapshot may reference bodies this node lacks.
        self.shared.events.rescan();
        let stored = StoredSnapshot { meta: meta.clone(), data };
        let dir = self.shared.dir.clone();
        let stored = off_the_workers(Some(meta), move || persist(&dir, &stored).map(|()| stored)).await?;
        self.shared.set_current(Arc::new(stored));
        tracing::info!(last_log_id = ?meta.last_log_id, "installed a snapshot from the leader");
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, StorageError> {
        let Some(current) = self.shared.current() else { return Ok(None) };
        // openraft reads the snapshot from its own copy of the bytes.
        let meta = current.meta.clone();
        let data = off_the_workers(Some(&meta), move || Ok(current.data.clone())).await?;
        Ok(Some(Snapshot { meta, snapshot: Box::new(Cursor::new(data)) }))
    }
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot, StorageError> {
        // The state machine is held only while the view is taken (a read
        // transaction: later applies do not change what it sees), not for
        // the export, which reads every mailbox and message record: applies
        // go on meanwhile. (Holding it throughout stalled every accept for
        // the length of an export, which grows with the mail kept.)
        let (view, state) = {
            let guard = self.shared.state.lock().await;
            let view = self.shared.store.state_view().await.map_err(|e| snap_err(None, ErrorVerb::Read, e))?;
            (view, guard.clone())
        };
        // Applies are not fsynced (the log is the durable record); the
        // snapshot lets the log be purged, so what it covers must be durable
        // first. A durable commit now covers every apply before it, those
        // in the view included.
        self.shared.store.sync_state().await.map_err(|e| snap_err(None, ErrorVerb::Write, e))?;
        let (state_snap, events) = view.export().await.map_err(|e| snap_err(None, ErrorVerb::Read, e))?;
        let snapshot_id = match state.last_applied {
            Some(id) => format!("{}-{}-{}", id.leader_id, id.index, unique_suffix()),
            None => format!("none-{}", unique_suffix()),
        };
        let meta =
            SnapshotMeta { last_log_id: state.last_applied, last_membership: state.membership.clone(), snapshot_id };
        let t0 = std::time::Instant::now();
        let dir = self.shared.dir.clone();
        let m = meta.clone();
        // Encoding, the copy handed to openraft, the file and the drop of
        // the exported state: all off the workers.
        let (stored, data) = off_the_workers(Some(&meta), move || {
            let data =
                encode_snapshot(&state_snap, &state, &events).map_err(|e| snap_err(Some(&m), ErrorVerb::Write, e))?;
            drop((state_snap, events));
            let stored = StoredSnapshot { meta: m, data };
            persist(&dir, &stored)?;
            let data = stored.data.clone();
            Ok((stored, data))
        })
        .await?;
        self.shared.set_current(Arc::new(stored));
        tracing::info!(
            last_log_id = ?meta.last_log_id,
            bytes = data.len(),
            encode_and_write_ms = t0.elapsed().as_millis() as u64,
            "built a snapshot"
        );
        Ok(Snapshot { meta, snapshot: Box::new(Cursor::new(data)) })
    }
}

/// Distinguishes two snapshots of the same log id (openraft's advice).
fn unique_suffix() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0)
}

/// A running group's stop budget may grow, never shrink: the owner stops
/// within the budget it started with, the leader fences with the current
/// one, so the leader must never wait less than the owner may take.
fn longer_or_same(old: Option<u64>, new: Option<u64>) -> bool {
    match (old, new) {
        (Some(a), Some(b)) => b >= a,
        (a, b) => a == b,
    }
}

/// The same resources, but for scripts' timeouts that grew (0, no
/// timeout, stays 0).
fn same_but_longer_timeouts(old: &[ResourceSpec], new: &[ResourceSpec]) -> bool {
    old.len() == new.len()
        && old.iter().zip(new).all(|(a, b)| match (a, b) {
            (
                ResourceSpec::Exec { name, start, stop, timeout_secs: t0 },
                ResourceSpec::Exec { name: n1, start: s1, stop: p1, timeout_secs: t1 },
            ) => name == n1 && start == s1 && stop == p1 && (*t0 == *t1 || (*t0 != 0 && *t1 >= *t0)),
            (a, b) => a == b,
        })
}

/// Applies a group command to the table: the same answer on every node.
fn apply_group_command(t: &mut GroupTable, cmd: Command) -> CommandResult {
    let refuse = |m: String| CommandResult::Refused(m);
    match cmd {
        Command::PutGroup { spec } => {
            if spec.name.is_empty() || spec.nodes.is_empty() {
                return refuse("a group needs a name and at least one node".into());
            }
            let mut names = std::collections::BTreeSet::new();
            if !spec.resources.iter().all(|r| names.insert(r.name().to_string())) {
                return refuse(format!("group {}: resource names must be unique", spec.name));
            }
            let mut nodes = std::collections::BTreeSet::new();
            if !spec.nodes.iter().all(|n| nodes.insert(*n)) {
                return refuse(format!("group {}: a node is listed twice", spec.name));
            }
            if spec.stop_timeout_ms == Some(0) {
                return refuse(format!("group {}: stop_timeout_ms must be above 0", spec.name));
            }
            let placement = t.placement.entry(spec.name.clone()).or_default();
            if let Some(old) = t.groups.get(&spec.name) {
                // The stop budget too: the owner stops within the budget it
                // started with, the leader fences with the current one.
                let structural = old.nodes != spec.nodes
                    || !same_but_longer_timeouts(&old.resources, &spec.resources)
                    || !longer_or_same(old.stop_timeout_ms, spec.stop_timeout_ms);
                if structural && placement.state != GroupState::Offline {
                    return refuse(format!(
                        "group {} is {}: stop it before changing its nodes or resources, or shortening a \
                         timeout (longer ones may change while it runs)",
                        spec.name, placement.state
                    ));
                }
            }
            if let GroupTarget::Node(n) = placement.target {
                if !spec.nodes.contains(&n) {
                    placement.target = GroupTarget::Auto;
                }
            }
            t.groups.insert(spec.name.clone(), spec);
            CommandResult::Done
        }
        Command::RemoveGroup { name } => match t.placement.get(&name) {
            None => refuse(format!("no group {name}")),
            Some(p) if p.state != GroupState::Offline => refuse(format!("group {name} is {}: stop it first", p.state)),
            Some(_) => {
                t.placement.remove(&name);
                t.groups.remove(&name);
                CommandResult::Done
            }
        },
        Command::SetGroupTarget { group, target } => {
            let Some(spec) = t.groups.get(&group) else { return refuse(format!("no group {group}")) };
            if let GroupTarget::Node(n) = target {
                if !spec.nodes.contains(&n) {
                    return refuse(format!("node {n} is not in the node list of group {group}"));
                }
            }
            let p = t.placement.entry(group).or_default();
            p.target = target;
            p.failed_on.clear();
            CommandResult::Done
        }
        Command::AssignGroup { group, epoch, owner, state, event, failed } => {
            let Some(p) = t.placement.get_mut(&group) else { return refuse(format!("no group {group}")) };
            if p.epoch != epoch {
                return refuse(format!("group {group} is at epoch {}, not {epoch}", p.epoch));
            }
            p.epoch += 1;
            p.owner = owner;
            p.state = state;
            p.event = event;
            // A failover ends an operator's move: the group now runs where
            // the cluster put it, and with manual failback it must not go
            // back to the move's destination by itself when that returns.
            if event == Some(crate::groups::StartEvent::Failover) && matches!(p.target, GroupTarget::Node(_)) {
                p.target = GroupTarget::Auto;
            }
            if let Some(n) = failed {
                if !p.failed_on.contains(&n) {
                    p.failed_on.push(n);
                }
            }
            CommandResult::Done
        }
        Command::ClearGroup { group } => {
            let Some(p) = t.placement.get_mut(&group) else { return refuse(format!("no group {group}")) };
            if p.state != GroupState::StopFailed {
                return refuse(format!("group {group} is {}: only a group whose stop failed is cleared", p.state));
            }
            // A new epoch: the old owner's late reports are refused.
            p.epoch += 1;
            p.owner = None;
            p.state = GroupState::Offline;
            CommandResult::Done
        }
        Command::GroupReport { group, node, epoch, report } => {
            let Some(p) = t.placement.get_mut(&group) else { return refuse(format!("no group {group}")) };
            if p.owner != Some(node) || p.epoch != epoch {
                return refuse(format!("stale report on group {group} from node {node}"));
            }
            let next = match (report, p.state) {
                (GroupReport::Online, GroupState::Starting | GroupState::Online) => GroupState::Online,
                (GroupReport::Offline, GroupState::Stopping | GroupState::StopFailed) => GroupState::Offline,
                (GroupReport::Failed, GroupState::Starting | GroupState::Online) => GroupState::Failed,
                (GroupReport::StopFailed, _) => GroupState::StopFailed,
                (r, s) => return refuse(format!("group {group} is {s}: report {r:?} ignored")),
            };
            p.state = next;
            if next == GroupState::Offline {
                p.owner = None;
            }
            CommandResult::Done
        }
        other => refuse(format!("not a group command: {other:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::groups::{Failback, GroupSpec, StartEvent};
    use crate::types::NodeId;

    fn table() -> GroupTable {
        let mut t = GroupTable::default();
        let spec = GroupSpec {
            name: "g".into(),
            nodes: vec![NodeId(1), NodeId(2), NodeId(3)],
            failback: Failback::Manual,
            resources: vec![],
            max_restarts: 1,
            stop_timeout_ms: None,
        };
        assert_eq!(apply_group_command(&mut t, Command::PutGroup { spec }), CommandResult::Done);
        t
    }

    fn assign(t: &mut GroupTable, owner: u64, event: StartEvent) {
        let epoch = t.placement["g"].epoch;
        let cmd = Command::AssignGroup {
            group: "g".into(),
            epoch,
            owner: Some(NodeId(owner)),
            state: GroupState::Starting,
            event: Some(event),
            failed: None,
        };
        assert_eq!(apply_group_command(t, cmd), CommandResult::Done);
    }

    /// The message records' ages reach a node that installs a snapshot (its
    /// last segment), so that it prunes them at the same entries as the
    /// others; a snapshot of an older version (no such segment) installs.
    #[tokio::test]
    async fn a_snapshot_carries_the_ages_of_message_records() {
        use hamail_store::{Address, QueueId, StoreOptions};
        let open = |dir: &Path| {
            LocalStore::open(&dir.join("store"), StoreOptions { fsync: false, ..StoreOptions::default() }).unwrap()
        };
        let (dir, dir2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let from = open(dir.path());
        let at = 1_700_000_000;
        let accept = MailChange::Accept {
            queue_id: QueueId(1),
            return_path: None,
            local: vec![Address::parse("u@a.test").unwrap()],
            remote: vec![],
            body: BodyHash::of(b"b"),
            size: 1,
            at,
            resend: None,
        };
        from.apply_state(vec![StateChange::Mail(accept)], None).await.unwrap();
        let mut sm = StateMachine::open(from.clone(), dir.path()).await.unwrap();
        let snap = sm.get_snapshot_builder().await.build_snapshot().await.unwrap();
        let data = snap.snapshot.into_inner();

        let to = open(dir2.path());
        let mut sm2 = StateMachine::open(to.clone(), dir2.path()).await.unwrap();
        sm2.install_snapshot(&snap.meta, Box::new(Cursor::new(data.clone()))).await.unwrap();
        assert_eq!(to.export_state().await.unwrap().message_ages, vec![(QueueId(1), at)]);
        assert_eq!(to.export_state().await.unwrap(), from.export_state().await.unwrap());

        // Without the last segment (an older snapshot): installs; the
        // record is then aged from the install.
        let ages_segment = postcard::to_allocvec(&vec![(QueueId(1), at)]).unwrap();
        let older = data[..data.len() - ages_segment.len()].to_vec();
        sm2.install_snapshot(&snap.meta, Box::new(Cursor::new(older))).await.unwrap();
        let ages = to.export_state().await.unwrap().message_ages;
        assert_eq!(ages.len(), 1);
        assert!(ages[0].1 > at, "{ages:?}");
    }

    #[test]
    fn a_failover_ends_the_operators_move() {
        let mut t = table();
        assign(&mut t, 1, StartEvent::Start);
        let set = Command::SetGroupTarget { group: "g".into(), target: GroupTarget::Node(NodeId(2)) };
        assert_eq!(apply_group_command(&mut t, set), CommandResult::Done);
        assign(&mut t, 2, StartEvent::Start);
        assert_eq!(t.placement["g"].target, GroupTarget::Node(NodeId(2)), "a move keeps its target");
        // Node 2 dies: failover to 1; node 2 coming back must not pull it.
        assign(&mut t, 1, StartEvent::Failover);
        assert_eq!(t.placement["g"].target, GroupTarget::Auto);
        // A stopped group stays stopped.
        let stop = Command::SetGroupTarget { group: "g".into(), target: GroupTarget::Stopped };
        assert_eq!(apply_group_command(&mut t, stop), CommandResult::Done);
        assign(&mut t, 3, StartEvent::Failover);
        assert_eq!(t.placement["g"].target, GroupTarget::Stopped);
    }
}
