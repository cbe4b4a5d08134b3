//! The store as the state machine of a cluster: mail changes decided by
//! consensus (accept, delete, dequeue) applied in log order, snapshots of
//! the whole state, bodies written for replication, the proof of a commit,
//! and verification of every body file.
//!
//! Why the message table: a replicated accept may be proposed again when
//! its first proposal's outcome was lost with a leader; keyed by queue id,
//! the second application finds the first and does nothing, so no
//! recipient ever gets a message twice. The same table proves a commit after
//! the fact (`committed`), so only the store creates `Committed` values.
//! Both are needed for seconds after an accept, not forever: a row is kept
//! for [`MESSAGE_RETENTION_SECS`] and then pruned, like the resend
//! fingerprints, by the time carried in the accepts being applied (never
//! the local clock: every node of a cluster must prune at the same entry),
//! through an index by age, a few rows per accept.

use std::collections::HashSet;
use std::sync::Arc;

use redb::{ReadableTable, WriteTransaction};
use serde::{Deserialize, Serialize};

use super::{blocking, release_body, Inner, LocalStore};
use crate::tables::{
    db_err, decode, encode, BODIES, CLUSTER_LOG, CONSENSUS, CONSENSUS_APPLIED, LAST_STATE_SYNC, MAILBOX, MESSAGES,
    MESSAGE_AGES, META, NEXT_ENTRY_ID, QUEUE, QUEUE_STATE, RESENDS, RESEND_AGES, RESEND_FINGERPRINTS,
};
use crate::{
    Address, BodyHash, Committed, DirectorySnapshot, EntryId, Fingerprint, MailChange, MailboxEntry, QueueEntry,
    QueueId, QueueOp, QueueState, RcptOutcome, RecipientStatus, ResendKey, StateChange, StoreError, StoreResult,
};

/// How long the record of a committed message (queue id → body, size) is
/// kept, in seconds of the accepts' own times (`at`).
///
/// Why a day: the record is read by an accept re-proposed after its first
/// outcome was lost (it must find the first and do nothing) and by
/// `committed`, the proof asked for right after the commit. A re-proposal
/// comes within seconds (the accepting node retries for at most twice the
/// write timeout; an entry left by a dead leader is committed or dropped by
/// the next election). A day is far beyond that, and beyond any clock
/// difference between two proposing nodes (the horizon is one proposer's
/// `at`, the rows carry others'). A resend window longer than this only
/// costs the freeing of a late resend's own body copy (see `resend_of`).
pub const MESSAGE_RETENTION_SECS: u64 = 24 * 3600;

/// At most this many rows of an age index are pruned per accept, so one
/// apply stays short after a long quiet time or an upgrade; an accept adds
/// one row, so the tables still shrink to their window.
const PRUNE_STEP: usize = 64;

/// A message to record: the fields of an accept.
pub(crate) struct NewMessage<'a> {
    pub queue_id: QueueId,
    pub return_path: &'a Option<String>,
    pub local: &'a [Address],
    pub remote: &'a [String],
    pub body: BodyHash,
    pub size: u64,
    pub at: u64,
    pub resend: Option<ResendKey>,
}

/// What recording a message did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Recorded {
    /// Delivered into its maildrops (and queue).
    New,
    /// This queue id was already recorded: nothing done.
    Again,
    /// A resend of this earlier transaction, within the window: recorded
    /// (so that it can be proven) but nothing delivered. `body` and `size`
    /// are the original's: the resend's own body (another `Received:` line)
    /// is referenced by nothing, and freed.
    ResendOf { original: QueueId, body: BodyHash, size: u64 },
}

/// The mail tables of one write transaction, opened once for a batch.
pub(crate) struct MailTables<'t> {
    txn: &'t WriteTransaction,
    meta: redb::Table<'t, &'static str, u64>,
    mailbox: redb::Table<'t, (&'static str, u64), &'static [u8]>,
    bodies: redb::Table<'t, &'static [u8; 32], u64>,
    queue: redb::Table<'t, u64, &'static [u8]>,
    queue_state: redb::Table<'t, u64, &'static [u8]>,
    messages: redb::Table<'t, u64, &'static [u8]>,
    message_ages: redb::Table<'t, (u64, u64), ()>,
    next_id: u64,
}

impl<'t> MailTables<'t> {
    pub(crate) fn open(txn: &'t WriteTransaction) -> StoreResult<Self> {
        let meta = txn.open_table(META).map_err(|e| db_err("opening meta", e))?;
        let next_id =
            meta.get(NEXT_ENTRY_ID).map_err(|e| db_err("reading entry counter", e))?.map(|g| g.value()).unwrap_or(1);
        Ok(MailTables {
            txn,
            meta,
            mailbox: txn.open_table(MAILBOX).map_err(|e| db_err("opening mailbox", e))?,
            bodies: txn.open_table(BODIES).map_err(|e| db_err("opening bodies", e))?,
            queue: txn.open_table(QUEUE).map_err(|e| db_err("opening queue", e))?,
            queue_state: txn.open_table(QUEUE_STATE).map_err(|e| db_err("opening queue state", e))?,
            messages: txn.open_table(MESSAGES).map_err(|e| db_err("opening messages", e))?,
            message_ages: txn.open_table(MESSAGE_AGES).map_err(|e| db_err("opening message ages", e))?,
            next_id,
        })
    }

    /// Records a message: maildrop entries, queue entry, references —
    /// unless the queue id is already recorded or the message is a resend
    /// within its window (see [`Recorded`]). Prunes message records older
    /// than [`MESSAGE_RETENTION_SECS`] before `m.at` on the way.
    pub(crate) fn insert_message(&mut self, m: &NewMessage<'_>) -> StoreResult<Recorded> {
        self.prune_messages(m.at)?;
        if self.messages.get(m.queue_id.0).map_err(|e| db_err("reading messages", e))?.is_some() {
            return Ok(Recorded::Again);
        }
        let resend = m.resend.filter(|k| k.window_secs > 0);
        if let Some(key) = &resend {
            if let Some(recorded) = self.resend_of(m, key)? {
                return Ok(recorded);
            }
        }
        let mut refs = 0u64;
        for user in m.local {
            let mut entry = MailboxEntry {
                id: EntryId(self.next_id),
                body: m.body,
                return_path: m.return_path.clone(),
                size: 0,
                received_at: m.at,
                queue_id: m.queue_id,
            };
            entry.size = entry.return_path_line().len() as u64 + m.size;
            self.mailbox
                .insert((user.as_str(), self.next_id), encode("mailbox entry", &entry)?.as_slice())
                .map_err(|e| db_err("inserting mailbox entry", e))?;
            self.next_id += 1;
            refs += 1;
        }
        if !m.remote.is_empty() {
            let entry = QueueEntry {
                queue_id: m.queue_id,
                body: m.body,
                return_path: m.return_path.clone(),
                recipients: m.remote.to_vec(),
                size: m.size,
                queued_at: m.at,
            };
            self.queue
                .insert(m.queue_id.0, encode("queue entry", &entry)?.as_slice())
                .map_err(|e| db_err("inserting queue entry", e))?;
            refs += 1;
        }
        let old =
            self.bodies.get(&m.body.0).map_err(|e| db_err("reading refcount", e))?.map(|g| g.value()).unwrap_or(0);
        self.bodies.insert(&m.body.0, old + refs).map_err(|e| db_err("writing refcount", e))?;
        self.record_message(m.queue_id, m.body, m.size, m.at)?;
        if let Some(key) = &resend {
            let mut fingerprints =
                self.txn.open_table(RESEND_FINGERPRINTS).map_err(|e| db_err("opening fingerprints", e))?;
            let mut ages = self.txn.open_table(RESEND_AGES).map_err(|e| db_err("opening fingerprints", e))?;
            fingerprints
                .insert(&key.fingerprint.0, encode("fingerprint", &(m.queue_id, m.at))?.as_slice())
                .map_err(|e| db_err("recording fingerprint", e))?;
            ages.insert((m.at, &key.fingerprint.0), ()).map_err(|e| db_err("recording fingerprint", e))?;
        }
        Ok(Recorded::New)
    }

    /// If `m` is a resend of a transaction accepted within the window: the
    /// original's queue id, after recording `m` as its resend. Prunes the
    /// fingerprints that fell out of the window (as of `m.at`, the accept's
    /// own time: deterministic on every node) on the way.
    fn resend_of(&mut self, m: &NewMessage<'_>, key: &ResendKey) -> StoreResult<Option<Recorded>> {
        self.prune_resends(m.at, key.window_secs)?;
        let fingerprints = self.txn.open_table(RESEND_FINGERPRINTS).map_err(|e| db_err("opening fingerprints", e))?;
        let found = fingerprints.get(&key.fingerprint.0).map_err(|e| db_err("reading fingerprints", e))?;
        let Some(found) = found else { return Ok(None) };
        let (original, at): (QueueId, u64) = decode("fingerprint", found.value())?;
        drop(found);
        // A clock that went back between two proposers counts as "within".
        if m.at.saturating_sub(at) > key.window_secs {
            return Ok(None);
        }
        // The proof answers with the original's body and size: the resend's
        // own body (another `Received:` line) is referenced by nothing. An
        // original whose record was pruned (a resend window longer than
        // MESSAGE_RETENTION_SECS) is answered with the resend's own: then
        // that copy is not freed here, only by a later cleanup.
        let (body, size) = match self.messages.get(original.0).map_err(|e| db_err("reading messages", e))? {
            Some(v) => decode::<(BodyHash, u64)>("message", v.value())?,
            None => (m.body, m.size),
        };
        self.record_message(m.queue_id, body, size, m.at)?;
        let mut resends = self.txn.open_table(RESENDS).map_err(|e| db_err("opening resends", e))?;
        resends
            .insert(m.queue_id.0, encode("resend", &(original, m.at))?.as_slice())
            .map_err(|e| db_err("recording resend", e))?;
        Ok(Some(Recorded::ResendOf { original, body, size }))
    }

    /// Records a committed message (`committed`'s proof) with its age.
    fn record_message(&mut self, queue_id: QueueId, body: BodyHash, size: u64, at: u64) -> StoreResult<()> {
        self.messages
            .insert(queue_id.0, encode("message", &(body, size))?.as_slice())
            .map_err(|e| db_err("recording message", e))?;
        self.message_ages.insert((at, queue_id.0), ()).map_err(|e| db_err("recording message age", e))?;
        Ok(())
    }

    /// Forgets message records older than [`MESSAGE_RETENTION_SECS`] before
    /// `now` (at most [`PRUNE_STEP`] of them).
    fn prune_messages(&mut self, now: u64) -> StoreResult<()> {
        let messages = &mut self.messages;
        prune_aged(&mut self.message_ages, now.saturating_sub(MESSAGE_RETENTION_SECS), |_, queue_id| {
            messages.remove(queue_id).map_err(|e| db_err("pruning messages", e))?;
            Ok(())
        })?;
        Ok(())
    }

    /// Forgets fingerprints (and resend records) older than `window` secs
    /// before `now`, so the tables hold one window's worth of mail.
    fn prune_resends(&mut self, now: u64, window: u64) -> StoreResult<()> {
        let horizon = now.saturating_sub(window);
        let mut ages = self.txn.open_table(RESEND_AGES).map_err(|e| db_err("opening fingerprints", e))?;
        let mut fingerprints =
            self.txn.open_table(RESEND_FINGERPRINTS).map_err(|e| db_err("opening fingerprints", e))?;
        let pruned = prune_aged(&mut ages, horizon, |at, fp| {
            // The fingerprint may have been recorded again later (a new
            // transaction after the window): only the row of this age goes.
            let current =
                fingerprints.get(fp).map_err(|e| db_err("reading fingerprints", e))?.map(|v| v.value().to_vec());
            if let Some(v) = current {
                let (_, recorded_at): (QueueId, u64) = decode("fingerprint", &v)?;
                if recorded_at == at {
                    fingerprints.remove(fp).map_err(|e| db_err("pruning fingerprints", e))?;
                }
            }
            Ok(())
        })?;
        if pruned > 0 {
            let mut resends = self.txn.open_table(RESENDS).map_err(|e| db_err("opening resends", e))?;
            resends
                .retain(|_, v| decode::<(QueueId, u64)>("resend", v).map(|(_, at)| at >= horizon).unwrap_or(false))
                .map_err(|e| db_err("pruning resends", e))?;
        }
        Ok(())
    }

    /// Removes a queue entry; returns the body if that freed it.
    fn dequeue(&mut self, queue_id: QueueId) -> StoreResult<Option<BodyHash>> {
        let removed = self.queue.remove(queue_id.0).map_err(|e| db_err("removing queue entry", e))?;
        let Some(removed) = removed else { return Ok(None) };
        let entry: QueueEntry = decode("queue entry", removed.value())?;
        drop(removed);
        self.queue_state.remove(queue_id.0).map_err(|e| db_err("removing queue state", e))?;
        Ok(release_body(&mut self.bodies, &entry.body)?.then_some(entry.body))
    }

    /// Applies a queue operation; returns the body if the entry went and
    /// that freed it. An absent entry is ignored (it was delivered,
    /// deleted, or the change was proposed twice).
    fn queue_op(&mut self, queue_id: QueueId, op: &QueueOp) -> StoreResult<Option<BodyHash>> {
        if matches!(op, QueueOp::Delete) {
            return self.dequeue(queue_id);
        }
        // The state row goes with the entry (see `dequeue`): the entry itself
        // is decoded only to make the first state, not at every result.
        let mut state = match self.queue_state.get(queue_id.0).map_err(|e| db_err("reading queue state", e))? {
            Some(v) => decode::<QueueState>("queue state", v.value())?,
            None => match self.queue.get(queue_id.0).map_err(|e| db_err("reading queue", e))? {
                Some(v) => QueueState::initial(&decode::<QueueEntry>("queue entry", v.value())?),
                None => return Ok(None),
            },
        };
        apply_queue_op(&mut state, op);
        if state.finished() {
            return self.dequeue(queue_id);
        }
        self.queue_state
            .insert(queue_id.0, encode("queue state", &state)?.as_slice())
            .map_err(|e| db_err("writing queue state", e))?;
        Ok(None)
    }

    pub(crate) fn finish(mut self) -> StoreResult<()> {
        self.meta.insert(NEXT_ENTRY_ID, self.next_id).map_err(|e| db_err("writing entry counter", e))?;
        Ok(())
    }
}

/// Removes the rows of an age index (`(at, key)`, oldest first) older than
/// `horizon`, at most [`PRUNE_STEP`] of them, handing each to `pruned` (which
/// removes what it indexes). Returns how many went.
fn prune_aged<K: redb::Key + 'static>(
    ages: &mut redb::Table<'_, (u64, K), ()>,
    horizon: u64,
    mut pruned: impl FnMut(u64, K::SelfType<'_>) -> StoreResult<()>,
) -> StoreResult<usize> {
    let mut n = 0;
    while n < PRUNE_STEP {
        let old =
            ages.first().map_err(|e| db_err("reading an age index", e))?.is_some_and(|(k, _)| k.value().0 < horizon);
        if !old {
            break;
        }
        let Some((row, _)) = ages.pop_first().map_err(|e| db_err("pruning an age index", e))? else { break };
        let (at, key) = row.value();
        pruned(at, key)?;
        n += 1;
    }
    Ok(n)
}

/// Indexes by age every MESSAGES row of a store made before the index
/// existed, as of `now` (the local clock, once, at the upgrade): their real
/// times are unknown, and counting from the upgrade keeps each at least its
/// full retention, which is what makes pruning safe. (Each node of a cluster
/// prunes these at its own time: only rows long past any use.)
pub(crate) fn index_message_ages(txn: &WriteTransaction, now: u64) -> StoreResult<usize> {
    let messages = txn.open_table(MESSAGES).map_err(|e| db_err("opening messages", e))?;
    let mut ages = txn.open_table(MESSAGE_AGES).map_err(|e| db_err("opening message ages", e))?;
    let mut n = 0;
    for row in messages.iter().map_err(|e| db_err("reading messages", e))? {
        let (k, _) = row.map_err(|e| db_err("reading messages", e))?;
        ages.insert((now, k.value()), ()).map_err(|e| db_err("indexing message ages", e))?;
        n += 1;
    }
    Ok(n)
}

/// The pure part of a queue operation (the same on every node).
pub(crate) fn apply_queue_op(state: &mut QueueState, op: &QueueOp) {
    match op {
        QueueOp::Results { at, results } => {
            for (index, outcome) in results {
                let Some(r) = state.recipients.get_mut(*index as usize) else { continue };
                if r.status == RecipientStatus::Delivered {
                    continue;
                }
                match outcome {
                    RcptOutcome::Delivered => {
                        r.status = RecipientStatus::Delivered;
                        r.attempts = r.attempts.saturating_add(1);
                        r.last_attempt = *at;
                    }
                    RcptOutcome::Deferred { next_attempt, error } => {
                        if r.status == RecipientStatus::Pending {
                            r.attempts = r.attempts.saturating_add(1);
                            r.next_attempt = *next_attempt;
                            r.last_attempt = *at;
                            r.last_error = Some(error.clone());
                        }
                    }
                    // A late result (from an owner that was replaced) never
                    // reopens a failure already reported: one bounce.
                    RcptOutcome::Failed { error, reported } => {
                        if r.status == RecipientStatus::Pending {
                            r.attempts = r.attempts.saturating_add(1);
                            r.last_attempt = *at;
                            r.last_error = Some(error.clone());
                            r.status = RecipientStatus::Failed { reported: *reported };
                        }
                    }
                    RcptOutcome::Waiting { until, reason } => {
                        if r.status == RecipientStatus::Pending {
                            r.next_attempt = r.next_attempt.max(*until);
                            r.last_error = Some(reason.clone());
                        }
                    }
                    RcptOutcome::Reported => {
                        if matches!(r.status, RecipientStatus::Failed { .. }) {
                            r.status = RecipientStatus::Failed { reported: true };
                        }
                    }
                }
            }
        }
        QueueOp::Hold => state.hold = true,
        QueueOp::Release => state.hold = false,
        QueueOp::Flush => {
            for r in state.recipients.iter_mut().filter(|r| r.status == RecipientStatus::Pending) {
                r.next_attempt = 0;
            }
        }
        QueueOp::Bounce { reason } => {
            for r in state.recipients.iter_mut().filter(|r| r.status == RecipientStatus::Pending) {
                r.status = RecipientStatus::Failed { reported: false };
                r.last_error = Some(reason.clone());
            }
        }
        QueueOp::Warned => state.warned = true,
        QueueOp::Delete => {}
    }
}

/// Everything the cluster's state machine owns, for a snapshot.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateSnapshot {
    pub directory: DirectorySnapshot,
    /// (user, entry)
    pub mailbox: Vec<(Address, MailboxEntry)>,
    pub queue: Vec<QueueEntry>,
    /// (queue id, body, size) of every committed message (within
    /// [`MESSAGE_RETENTION_SECS`]).
    pub messages: Vec<(QueueId, BodyHash, u64)>,
    pub next_entry_id: u64,
    /// Resend recognition: (fingerprint, first queue id, accepted at).
    pub resend_fingerprints: Vec<(Fingerprint, QueueId, u64)>,
    /// Recognised resends: (queue id, original queue id, at).
    pub resends: Vec<(QueueId, QueueId, u64)>,
    /// Delivery state of queue entries that have one. Not in this struct's
    /// serialised form, so snapshots made before it existed still decode:
    /// the cluster writes it as a segment of its own after the others.
    #[serde(skip)]
    pub queue_state: Vec<(QueueId, QueueState)>,
    /// (queue id, accepted at) of every message in `messages`, oldest
    /// first: when its record is pruned. Outside the serialised form like
    /// `queue_state` (a segment of its own); a message absent here (an
    /// older snapshot) is aged from its import.
    #[serde(skip)]
    pub message_ages: Vec<(QueueId, u64)>,
}

/// What `verify` found.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifyReport {
    /// Body files read and hashed.
    pub checked: usize,
    /// Files whose content did not match their name: removed.
    pub damaged: Vec<BodyHash>,
    /// Referenced bodies with no (good) file here.
    pub missing: Vec<BodyHash>,
}

/// A table that older stores may not have yet (`None` then).
fn open_optional<K: redb::Key + 'static, V: redb::Value + 'static>(
    txn: &redb::ReadTransaction,
    table: redb::TableDefinition<'_, K, V>,
    what: &str,
) -> StoreResult<Option<redb::ReadOnlyTable<K, V>>> {
    match txn.open_table(table) {
        Ok(t) => Ok(Some(t)),
        Err(redb::TableError::TableDoesNotExist(_)) => Ok(None),
        Err(e) => Err(db_err(&format!("opening {what}"), e)),
    }
}

/// See [`StateChange::ClusterLog`].
fn append_cluster_log(txn: &WriteTransaction, seq: u64, record: &[u8], keep: u64) -> StoreResult<()> {
    let mut t = txn.open_table(CLUSTER_LOG).map_err(|e| db_err("opening cluster log", e))?;
    t.insert(seq, record).map_err(|e| db_err("writing cluster log", e))?;
    let oldest_kept = seq.saturating_add(1).saturating_sub(keep.max(1));
    loop {
        let first = t.first().map_err(|e| db_err("reading cluster log", e))?.map(|(k, _)| k.value());
        match first {
            Some(k) if k < oldest_kept => {
                t.remove(k).map_err(|e| db_err("trimming cluster log", e))?;
            }
            _ => return Ok(()),
        }
    }
}

impl Inner {
    fn cluster_log(&self, limit: usize) -> StoreResult<Vec<(u64, Vec<u8>)>> {
        let txn = self.db.begin_read().map_err(|e| db_err("beginning read", e))?;
        Self::cluster_log_in(&txn, limit)
    }

    fn cluster_log_in(txn: &redb::ReadTransaction, limit: usize) -> StoreResult<Vec<(u64, Vec<u8>)>> {
        let t = match txn.open_table(CLUSTER_LOG) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(db_err("opening cluster log", e)),
        };
        let mut out = Vec::new();
        for row in t.iter().map_err(|e| db_err("reading cluster log", e))?.rev().take(limit) {
            let (k, v) = row.map_err(|e| db_err("reading cluster log", e))?;
            out.push((k.value(), v.value().to_vec()));
        }
        out.reverse();
        Ok(out)
    }

    fn import_cluster_log(&self, records: &[(u64, Vec<u8>)]) -> StoreResult<()> {
        let txn = self.begin_write()?;
        {
            let mut t = txn.open_table(CLUSTER_LOG).map_err(|e| db_err("opening cluster log", e))?;
            t.retain(|_, _| false).map_err(|e| db_err("clearing cluster log", e))?;
            for (seq, record) in records {
                t.insert(*seq, record.as_slice()).map_err(|e| db_err("writing cluster log", e))?;
            }
        }
        txn.commit().map_err(|e| db_err("committing cluster log", e))
    }

    /// Applies state changes in one commit (see `LocalStore::apply_state`).
    fn apply_state(
        &self,
        changes: &[StateChange],
        consensus_state: Option<&[u8]>,
    ) -> StoreResult<Vec<StoreResult<()>>> {
        // Not fsynced: these changes come from the Raft log, which is
        // already durable on a majority. After a crash the store is back
        // at an earlier applied point (redb loses only a suffix of
        // non-durable commits; the applied log id is in the same commits),
        // and the log is applied again from there, which gives the same
        // state. `sync_state` makes it durable before a snapshot lets the
        // log be purged. Not `Durability::Eventual`: redb 2 fsyncs those
        // too on Linux (measured 1.6 ms per apply, in the path of every
        // replicated message). `None` commits cannot free pages, so the
        // file would grow until a durable commit: one apply in
        // STATE_SYNC_INTERVAL is durable, which bounds both the growth and
        // the log replayed after a crash.
        let mut txn = self.db.begin_write().map_err(|e| db_err("beginning write", e))?;
        let durable = {
            let mut at = self.state_synced_at.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let due = at.elapsed() >= STATE_SYNC_INTERVAL;
            if due {
                *at = std::time::Instant::now();
            }
            due
        };
        txn.set_durability(if durable { redb::Durability::Immediate } else { redb::Durability::None });
        let mut results = Vec::with_capacity(changes.len());
        let mut freed = Vec::new();
        for change in changes {
            let r = match change {
                StateChange::Directory(d) => self.apply_change(&txn, d).map(|f| freed.extend(f)),
                StateChange::Mail(m) => self.apply_mail(&txn, m).map(|f| freed.extend(f)),
                StateChange::ClusterLog { seq, record, keep } => append_cluster_log(&txn, *seq, record, *keep),
            };
            match r {
                Ok(()) => results.push(Ok(())),
                Err(e @ StoreError::Permanent(_)) => results.push(Err(e)),
                Err(e) => return Err(e),
            }
        }
        if let Some(state) = consensus_state {
            let mut t = txn.open_table(CONSENSUS).map_err(|e| db_err("opening consensus", e))?;
            t.insert(CONSENSUS_APPLIED, state).map_err(|e| db_err("writing consensus state", e))?;
        }
        txn.commit().map_err(|e| db_err("committing state changes", e))?;
        self.unlink_freed(&freed);
        Ok(results)
    }

    pub(crate) fn apply_mail(&self, txn: &WriteTransaction, change: &MailChange) -> StoreResult<Vec<BodyHash>> {
        match change {
            MailChange::Accept { queue_id, return_path, local, remote, body, size, at, resend } => {
                if local.is_empty() && remote.is_empty() {
                    return Err(StoreError::Permanent(format!("message {queue_id} has no recipients")));
                }
                let mut t = MailTables::open(txn)?;
                let recorded = t.insert_message(&NewMessage {
                    queue_id: *queue_id,
                    return_path,
                    local,
                    remote,
                    body: *body,
                    size: *size,
                    at: *at,
                    resend: *resend,
                })?;
                t.finish()?;
                // A recognised resend's own copy (put on every data node
                // before the commit) is referenced by nothing: freed.
                Ok(match recorded {
                    Recorded::ResendOf { body: original, .. } if original != *body => vec![*body],
                    _ => Vec::new(),
                })
            }
            MailChange::Delete { user, ids } => self.remove_entries(txn, user, Some(ids)),
            MailChange::Dequeue { queue_id } => {
                let mut t = MailTables::open(txn)?;
                let freed = t.dequeue(*queue_id)?;
                t.finish()?;
                Ok(freed.into_iter().collect())
            }
            MailChange::Queue { queue_id, op } => {
                let mut t = MailTables::open(txn)?;
                let freed = t.queue_op(*queue_id, op)?;
                t.finish()?;
                Ok(freed.into_iter().collect())
            }
        }
    }

    /// The whole replicated state as `txn` sees it.
    fn export_state_in(txn: &redb::ReadTransaction) -> StoreResult<StateSnapshot> {
        let directory = Self::export_directory_in(txn)?;
        let mut snap = StateSnapshot { directory, ..StateSnapshot::default() };
        let mailbox = txn.open_table(MAILBOX).map_err(|e| db_err("opening mailbox", e))?;
        for row in mailbox.iter().map_err(|e| db_err("reading mailbox", e))? {
            let (k, v) = row.map_err(|e| db_err("reading mailbox", e))?;
            snap.mailbox.push((Address::parse(k.value().0)?, decode("mailbox entry", v.value())?));
        }
        let queue = txn.open_table(QUEUE).map_err(|e| db_err("opening queue", e))?;
        for row in queue.iter().map_err(|e| db_err("reading queue", e))? {
            let (_, v) = row.map_err(|e| db_err("reading queue", e))?;
            snap.queue.push(decode("queue entry", v.value())?);
        }
        let states = txn.open_table(QUEUE_STATE).map_err(|e| db_err("opening queue state", e))?;
        for row in states.iter().map_err(|e| db_err("reading queue state", e))? {
            let (k, v) = row.map_err(|e| db_err("reading queue state", e))?;
            snap.queue_state.push((QueueId(k.value()), decode("queue state", v.value())?));
        }
        let messages = match txn.open_table(MESSAGES) {
            Ok(t) => Some(t),
            Err(redb::TableError::TableDoesNotExist(_)) => None,
            Err(e) => return Err(db_err("opening messages", e)),
        };
        if let Some(messages) = messages {
            for row in messages.iter().map_err(|e| db_err("reading messages", e))? {
                let (k, v) = row.map_err(|e| db_err("reading messages", e))?;
                let (body, size): (BodyHash, u64) = decode("message", v.value())?;
                snap.messages.push((QueueId(k.value()), body, size));
            }
        }
        if let Some(t) = open_optional(txn, MESSAGE_AGES, "message ages")? {
            for row in t.iter().map_err(|e| db_err("reading message ages", e))? {
                let (at, qid) = row.map_err(|e| db_err("reading message ages", e))?.0.value();
                snap.message_ages.push((QueueId(qid), at));
            }
        }
        if let Some(t) = open_optional(txn, RESEND_FINGERPRINTS, "fingerprints")? {
            for row in t.iter().map_err(|e| db_err("reading fingerprints", e))? {
                let (k, v) = row.map_err(|e| db_err("reading fingerprints", e))?;
                let (qid, at): (QueueId, u64) = decode("fingerprint", v.value())?;
                snap.resend_fingerprints.push((Fingerprint(*k.value()), qid, at));
            }
        }
        if let Some(t) = open_optional(txn, RESENDS, "resends")? {
            for row in t.iter().map_err(|e| db_err("reading resends", e))? {
                let (k, v) = row.map_err(|e| db_err("reading resends", e))?;
                let (original, at): (QueueId, u64) = decode("resend", v.value())?;
                snap.resends.push((QueueId(k.value()), original, at));
            }
        }
        let meta = txn.open_table(META).map_err(|e| db_err("opening meta", e))?;
        snap.next_entry_id =
            meta.get(NEXT_ENTRY_ID).map_err(|e| db_err("reading entry counter", e))?.map(|g| g.value()).unwrap_or(1);
        Ok(snap)
    }

    /// Replaces the whole state with a snapshot. Reference counts are
    /// recomputed from the snapshot's entries; body files no longer
    /// referenced are removed, referenced ones that are absent here show up
    /// in `missing_bodies`.
    fn import_state(&self, snap: &StateSnapshot, consensus_state: &[u8]) -> StoreResult<()> {
        self.import_directory(&snap.directory, consensus_state)?;
        let txn = self.begin_write()?;
        let old_bodies: Vec<BodyHash>;
        {
            let mut bodies = txn.open_table(BODIES).map_err(|e| db_err("opening bodies", e))?;
            let mut old = Vec::new();
            for row in bodies.iter().map_err(|e| db_err("reading bodies", e))? {
                old.push(BodyHash(*row.map_err(|e| db_err("reading bodies", e))?.0.value()));
            }
            old_bodies = old;
            bodies.retain(|_, _| false).map_err(|e| db_err("clearing bodies", e))?;
            let mut mailbox = txn.open_table(MAILBOX).map_err(|e| db_err("opening mailbox", e))?;
            mailbox.retain(|_, _| false).map_err(|e| db_err("clearing mailbox", e))?;
            let mut queue = txn.open_table(QUEUE).map_err(|e| db_err("opening queue", e))?;
            queue.retain(|_, _| false).map_err(|e| db_err("clearing queue", e))?;
            let mut messages = txn.open_table(MESSAGES).map_err(|e| db_err("opening messages", e))?;
            messages.retain(|_, _| false).map_err(|e| db_err("clearing messages", e))?;
            let mut states = txn.open_table(QUEUE_STATE).map_err(|e| db_err("opening queue state", e))?;
            states.retain(|_, _| false).map_err(|e| db_err("clearing queue state", e))?;
            for (qid, state) in &snap.queue_state {
                states
                    .insert(qid.0, encode("queue state", state)?.as_slice())
                    .map_err(|e| db_err("writing queue state", e))?;
            }
            drop(states);
            let mut refs: std::collections::HashMap<BodyHash, u64> = std::collections::HashMap::new();
            for (user, entry) in &snap.mailbox {
                mailbox
                    .insert((user.as_str(), entry.id.0), encode("mailbox entry", entry)?.as_slice())
                    .map_err(|e| db_err("writing mailbox", e))?;
                *refs.entry(entry.body).or_default() += 1;
            }
            for q in &snap.queue {
                queue
                    .insert(q.queue_id.0, encode("queue entry", q)?.as_slice())
                    .map_err(|e| db_err("writing queue", e))?;
                *refs.entry(q.body).or_default() += 1;
            }
            let mut ages = txn.open_table(MESSAGE_AGES).map_err(|e| db_err("opening message ages", e))?;
            ages.retain(|_, _| false).map_err(|e| db_err("clearing message ages", e))?;
            let aged: std::collections::HashMap<QueueId, u64> = snap.message_ages.iter().copied().collect();
            let now = crate::tables::unix_now();
            for (qid, body, size) in &snap.messages {
                messages
                    .insert(qid.0, encode("message", &(*body, *size))?.as_slice())
                    .map_err(|e| db_err("writing messages", e))?;
                // An older snapshot has no ages: as for a store upgraded in
                // place (`index_message_ages`), counted from now.
                let at = aged.get(qid).copied().unwrap_or(now);
                ages.insert((at, qid.0), ()).map_err(|e| db_err("writing message ages", e))?;
            }
            drop(ages);
            for (hash, n) in &refs {
                bodies.insert(&hash.0, *n).map_err(|e| db_err("writing bodies", e))?;
            }
            let mut fingerprints =
                txn.open_table(RESEND_FINGERPRINTS).map_err(|e| db_err("opening fingerprints", e))?;
            fingerprints.retain(|_, _| false).map_err(|e| db_err("clearing fingerprints", e))?;
            let mut ages = txn.open_table(RESEND_AGES).map_err(|e| db_err("opening fingerprints", e))?;
            ages.retain(|_, _| false).map_err(|e| db_err("clearing fingerprints", e))?;
            for (fp, qid, at) in &snap.resend_fingerprints {
                fingerprints
                    .insert(&fp.0, encode("fingerprint", &(*qid, *at))?.as_slice())
                    .map_err(|e| db_err("writing fingerprints", e))?;
                ages.insert((*at, &fp.0), ()).map_err(|e| db_err("writing fingerprints", e))?;
            }
            let mut resends = txn.open_table(RESENDS).map_err(|e| db_err("opening resends", e))?;
            resends.retain(|_, _| false).map_err(|e| db_err("clearing resends", e))?;
            for (qid, original, at) in &snap.resends {
                resends
                    .insert(qid.0, encode("resend", &(*original, *at))?.as_slice())
                    .map_err(|e| db_err("writing resends", e))?;
            }
            drop((fingerprints, ages, resends));
            let mut meta = txn.open_table(META).map_err(|e| db_err("opening meta", e))?;
            meta.insert(NEXT_ENTRY_ID, snap.next_entry_id).map_err(|e| db_err("writing entry counter", e))?;
            let mut t = txn.open_table(CONSENSUS).map_err(|e| db_err("opening consensus", e))?;
            t.insert(CONSENSUS_APPLIED, consensus_state).map_err(|e| db_err("writing consensus state", e))?;
            let keep: HashSet<BodyHash> = refs.keys().copied().collect();
            let freed: Vec<BodyHash> = old_bodies.into_iter().filter(|h| !keep.contains(h)).collect();
            drop((bodies, mailbox, queue, messages, meta, t));
            txn.commit().map_err(|e| db_err("committing snapshot", e))?;
            self.unlink_freed(&freed);
        }
        Ok(())
    }

    fn referenced_bodies(&self) -> StoreResult<Vec<BodyHash>> {
        let txn = self.db.begin_read().map_err(|e| db_err("beginning read", e))?;
        let bodies = txn.open_table(BODIES).map_err(|e| db_err("opening bodies", e))?;
        let mut out = Vec::new();
        for row in bodies.iter().map_err(|e| db_err("reading bodies", e))? {
            out.push(BodyHash(*row.map_err(|e| db_err("reading bodies", e))?.0.value()));
        }
        Ok(out)
    }

    fn committed(&self, queue_id: QueueId) -> StoreResult<Option<Committed>> {
        let txn = self.db.begin_read().map_err(|e| db_err("beginning read", e))?;
        let messages = match txn.open_table(MESSAGES) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(db_err("opening messages", e)),
        };
        let found = messages.get(queue_id.0).map_err(|e| db_err("reading messages", e))?;
        let Some(v) = found else { return Ok(None) };
        let (body, size): (BodyHash, u64) = decode("message", v.value())?;
        let original = match open_optional(&txn, RESENDS, "resends")? {
            Some(t) => match t.get(queue_id.0).map_err(|e| db_err("reading resends", e))? {
                Some(r) => Some(decode::<(QueueId, u64)>("resend", r.value())?.0),
                None => None,
            },
            None => None,
        };
        Ok(Some(match original {
            Some(original) => Committed::resend(queue_id, body, size, original),
            None => Committed::new(queue_id, body, size),
        }))
    }
}

impl LocalStore {
    /// Makes every state change applied so far durable (one fsynced
    /// commit). A cluster calls it before a snapshot allows purging the log
    /// that could otherwise replay them.
    pub async fn sync_state(&self) -> StoreResult<()> {
        let inner = self.inner().clone();
        blocking(move || {
            let txn = inner.begin_write()?;
            {
                let mut meta = txn.open_table(META).map_err(|e| db_err("opening meta", e))?;
                meta.insert(LAST_STATE_SYNC, crate::tables::unix_now()).map_err(|e| db_err("writing meta", e))?;
            }
            txn.commit().map_err(|e| db_err("committing state sync", e))?;
            *inner.state_synced_at.lock().unwrap_or_else(std::sync::PoisonError::into_inner) =
                std::time::Instant::now();
            Ok(())
        })
        .await
    }

    /// Applies changes decided by consensus, in order, in one commit, with
    /// `consensus_state` (opaque here) saved in the same commit. Each change
    /// gets its own result: a refusal (`Permanent`) does not stop the others.
    pub async fn apply_state(
        &self,
        changes: Vec<StateChange>,
        consensus_state: Option<Vec<u8>>,
    ) -> StoreResult<Vec<StoreResult<()>>> {
        let inner = self.inner().clone();
        blocking(move || inner.apply_state(&changes, consensus_state.as_deref())).await
    }

    /// The last `limit` records of the cluster event log, oldest first, with
    /// their sequence numbers.
    pub async fn cluster_log(&self, limit: usize) -> StoreResult<Vec<(u64, Vec<u8>)>> {
        let inner = self.inner().clone();
        blocking(move || inner.cluster_log(limit)).await
    }

    /// Replaces the cluster event log (a node installing a snapshot).
    pub async fn import_cluster_log(&self, records: Vec<(u64, Vec<u8>)>) -> StoreResult<()> {
        let inner = self.inner().clone();
        blocking(move || inner.import_cluster_log(&records)).await
    }

    /// The replicated state as of now, to be read later: a snapshot of the
    /// database that later commits do not change. Cheap to take (opens a
    /// read transaction), so a Raft snapshot builder holds the state
    /// machine only for this, not for the export.
    pub async fn state_view(&self) -> StoreResult<StateView> {
        let inner = self.inner().clone();
        let txn = blocking(move || inner.db.begin_read().map_err(|e| db_err("beginning read", e))).await?;
        Ok(StateView { txn })
    }

    /// The whole replicated state (directory and mail metadata).
    pub async fn export_state(&self) -> StoreResult<StateSnapshot> {
        Ok(self.state_view().await?.export().await?.0)
    }

    /// Replaces the whole replicated state (a node catching up).
    pub async fn import_state(&self, snapshot: StateSnapshot, consensus_state: Vec<u8>) -> StoreResult<()> {
        let inner = self.inner().clone();
        blocking(move || inner.import_state(&snapshot, &consensus_state)).await
    }

    /// Writes a body durably (file fsync, rename, directory fsync) without
    /// referencing it: a copy received from a peer before the metadata that
    /// will reference it is committed. An unreferenced body is removed at
    /// the next start of a single node, or by `collect_garbage` in a
    /// cluster replica, if nothing came to reference it. A body already
    /// here counts as written now.
    pub async fn put_body(&self, body: Arc<Vec<u8>>) -> StoreResult<BodyHash> {
        self.put_body_as(None, body).await
    }

    /// [`Self::put_body`] for bytes the caller has just hashed itself (the
    /// accepting node, a fetched copy it checked): hashed once, not twice.
    pub async fn put_hashed_body(&self, hash: BodyHash, body: Arc<Vec<u8>>) -> StoreResult<BodyHash> {
        self.put_body_as(Some(hash), body).await
    }

    async fn put_body_as(&self, hash: Option<BodyHash>, body: Arc<Vec<u8>>) -> StoreResult<BodyHash> {
        let inner = self.inner().clone();
        blocking(move || {
            // A damaged file under this name (same length, other content)
            // must be replaced: this may be a repair.
            let hash = hash.unwrap_or_else(|| BodyHash::of(&body));
            let staged = inner.stage_hashed_body(hash, &body, true)?;
            inner.make_durable(staged)
        })
        .await
    }

    /// Removes the body files nothing references that were last written
    /// (or written again, see `put_body`) before `written_before`: in a
    /// cluster replica, the leftovers of accepts that failed or never
    /// committed, which recovery keeps (see `recovery`). Each file is
    /// checked and unlinked under the lock every change of the references
    /// takes, so nothing can come to reference it meanwhile.
    ///
    /// Safe only if no accept that may still be committed counts on a copy
    /// written before `written_before`, and every accept committed so far is
    /// applied here: a cluster passes a time long before its accepts'
    /// patience, and calls this after a linearizable barrier taken after
    /// that time.
    pub async fn collect_garbage(&self, written_before: std::time::SystemTime) -> StoreResult<super::GarbageReport> {
        let inner = self.inner().clone();
        blocking(move || inner.collect_garbage(written_before)).await
    }

    /// Those of `hashes` that have no file here, all looked up in one trip
    /// to a blocking thread.
    pub async fn absent_bodies(&self, hashes: Vec<BodyHash>) -> StoreResult<Vec<BodyHash>> {
        let inner = self.inner().clone();
        blocking(move || Ok(inner.absent(hashes))).await
    }

    pub async fn has_body(&self, hash: &BodyHash) -> StoreResult<bool> {
        let path = self.inner().body_path(hash);
        Ok(tokio::fs::metadata(&path).await.is_ok())
    }

    /// Bodies that metadata references but that have no file here.
    pub async fn missing_bodies(&self) -> StoreResult<Vec<BodyHash>> {
        let inner = self.inner().clone();
        blocking(move || {
            let refs = inner.referenced_bodies()?;
            Ok(inner.absent(refs))
        })
        .await
    }

    /// The proof that `queue_id` is committed in this store, if it is.
    pub async fn committed(&self, queue_id: QueueId) -> StoreResult<Option<Committed>> {
        let inner = self.inner().clone();
        blocking(move || inner.committed(queue_id)).await
    }

    /// [`Self::committed`], and whether the file of the body it names is
    /// here (the replicated accept asks both, for every message). On the
    /// caller's thread, not a blocking one: a read transaction on pages the
    /// apply just wrote (in redb's cache) and a `stat` of a file just
    /// written, microseconds, where the trip to a blocking thread and back
    /// cost two context switches per message.
    pub fn committed_with_body(&self, queue_id: QueueId) -> StoreResult<Option<(Committed, bool)>> {
        let inner = self.inner();
        Ok(inner.committed(queue_id)?.map(|c| {
            let here = inner.body_path(&c.body()).exists();
            (c, here)
        }))
    }

    /// Reads and hashes every referenced body. A file whose content does not
    /// match its name is removed (it then counts as missing, and a cluster
    /// fetches a good copy from a peer).
    pub async fn verify(&self) -> StoreResult<VerifyReport> {
        let inner = self.inner().clone();
        blocking(move || {
            let mut report = VerifyReport::default();
            for hash in inner.referenced_bodies()? {
                let path = inner.body_path(&hash);
                match std::fs::read(&path) {
                    Ok(bytes) => {
                        report.checked += 1;
                        if BodyHash::of(&bytes) != hash {
                            tracing::error!(%hash, "damaged body file removed");
                            std::fs::remove_file(&path)
                                .map_err(|e| StoreError::io(format!("removing damaged {}", path.display()), e))?;
                            report.damaged.push(hash);
                            report.missing.push(hash);
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => report.missing.push(hash),
                    Err(e) => return Err(StoreError::io(format!("reading {}", path.display()), e)),
                }
            }
            Ok(report)
        })
        .await
    }
}

/// How often an apply of replicated state is committed durably.
const STATE_SYNC_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// A fixed view of the replicated state ([`LocalStore::state_view`]).
pub struct StateView {
    txn: redb::ReadTransaction,
}

impl StateView {
    /// The whole replicated state (directory and mail metadata) and the
    /// cluster event log, as they were when the view was taken.
    pub async fn export(self) -> StoreResult<(StateSnapshot, Vec<(u64, Vec<u8>)>)> {
        blocking(move || Ok((Inner::export_state_in(&self.txn)?, Inner::cluster_log_in(&self.txn, usize::MAX)?))).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::RecipientState;

    fn one_recipient() -> QueueState {
        QueueState {
            recipients: vec![RecipientState {
                status: RecipientStatus::Pending,
                attempts: 0,
                next_attempt: 0,
                last_attempt: 0,
                last_error: None,
            }],
            hold: false,
            warned: false,
        }
    }

    fn result(outcome: RcptOutcome) -> QueueOp {
        QueueOp::Results { at: 10, results: vec![(0, outcome)] }
    }

    #[test]
    fn a_store_made_before_message_ages_ages_its_records_from_the_upgrade() {
        let dir = tempfile::tempdir().unwrap();
        let long_ago = 1_700_000_000;
        {
            let store = LocalStore::open(dir.path(), crate::StoreOptions::default()).unwrap();
            let txn = store.inner().begin_write().unwrap();
            let mut t = MailTables::open(&txn).unwrap();
            let local = vec![Address::parse("u@a.test").unwrap()];
            let m = NewMessage {
                queue_id: QueueId(1),
                return_path: &None,
                local: &local,
                remote: &[],
                body: BodyHash::of(b"old"),
                size: 3,
                at: long_ago,
                resend: None,
            };
            assert_eq!(t.insert_message(&m).unwrap(), Recorded::New);
            t.finish().unwrap();
            // What a store of the previous version has: no age index.
            assert!(txn.delete_table(MESSAGE_AGES).unwrap());
            txn.commit().unwrap();
        }
        let before = crate::tables::unix_now();
        let store = LocalStore::open(dir.path(), crate::StoreOptions::default()).unwrap();
        let ages = Inner::export_state_in(&store.inner().db.begin_read().unwrap()).unwrap().message_ages;
        assert_eq!(ages.len(), 1, "{ages:?}");
        assert_eq!(ages[0].0, QueueId(1));
        assert!(ages[0].1 >= before, "aged from the upgrade, not pruned at the next accept: {ages:?}");
        // Indexed once: a second open adds nothing.
        drop(store);
        let store = LocalStore::open(dir.path(), crate::StoreOptions::default()).unwrap();
        assert_eq!(Inner::export_state_in(&store.inner().db.begin_read().unwrap()).unwrap().message_ages, ages);
    }

    #[test]
    fn a_reported_failure_is_final() {
        let mut s = one_recipient();
        apply_queue_op(&mut s, &result(RcptOutcome::Failed { error: "550 no".into(), reported: false }));
        apply_queue_op(&mut s, &result(RcptOutcome::Reported));
        assert_eq!(s.recipients[0].status, RecipientStatus::Failed { reported: true });
        // A late failure from a replaced owner: not a second bounce.
        apply_queue_op(&mut s, &result(RcptOutcome::Failed { error: "550 again".into(), reported: false }));
        assert_eq!(s.recipients[0].status, RecipientStatus::Failed { reported: true });
        assert_eq!(s.recipients[0].attempts, 1);
    }
}
