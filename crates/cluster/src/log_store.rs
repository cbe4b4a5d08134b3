//! The Raft log of one node, on disk: openraft's [`RaftLogStorage`].
//!
//! Role: keep the log entries, the vote, the committed log id and the last
//! purged log id of this node across crashes. Raft's safety rests on it: a
//! node must never forget a vote it cast nor an entry it acknowledged
//! (Raft paper §5.1 and Figure 2, "Persistent state on all servers"), so
//! every write here is a redb commit with `Durability::Immediate` (fsync)
//! before openraft is told about it (the [`LogFlushed`] callback, the return
//! of `save_vote`).
//!
//! Why a separate redb file (`raft-log.redb`) from the mail store: the log
//! is append-and-purge traffic with its own lifetime; the replicated state
//! itself (what the log *means*) lives in the mail store, applied by the
//! [`crate::state_machine::StateMachine`].
//!
//! Layout: table `entries` (index → postcard [`Entry`]), table `meta`
//! (`vote`, `committed`, `purged` → postcard values).
//!
//! Appends are written by a thread of their own, the rest of the redb work
//! on blocking threads: an fsync never stalls the async runtime. openraft
//! 0.9 waits for each append's flush before its core takes the next
//! message (`RaftCore::append_to_log` awaits the [`LogFlushed`] callback),
//! so the writer only ever has one append to write: there is nothing to
//! batch. (Writing on the core's own thread saved two thread switches per
//! append, ~5 % of the CPU per message with two runtime workers, but on a
//! one-worker runtime — what tokio starts on a one-CPU machine — every
//! fsync stalled every task: 1 KiB at 10 sessions, 10-15 % slower.)

// openraft's StorageError is large, and the traits impose it.
#![allow(clippy::result_large_err)]

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::ops::RangeBounds;
use std::path::Path;
use std::sync::{Arc, Mutex};

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{AnyError, ErrorSubject, ErrorVerb, OptionalSend, RaftLogReader, StorageIOError};
use redb::{Database, Durability, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::types::{Entry, LogId, StorageError, TypeConfig, Vote};

const ENTRIES: TableDefinition<u64, &[u8]> = TableDefinition::new("entries");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");

/// redb's page cache for the log (its default, 1 GiB, would let the
/// process grow with the log; the fresh entries are in [`Recent`]).
const LOG_CACHE_BYTES: usize = 8 * 1024 * 1024;

/// Written entries kept in memory for the replication reads (a follower
/// that lags by more is read from the database): at most this many, and
/// at most [`RECENT_BYTES`] of them (an accept for a thousand recipients
/// is tens of kB).
const RECENT_KEPT: usize = 1024;
const RECENT_BYTES: usize = 4 * 1024 * 1024;

/// The newest entries of the log, contiguous: `entries` holds indexes
/// `first..=last` with no hole (appends extend it at the end, truncation
/// cuts its end, purging and trimming its start), so a range that starts
/// at or after its first index is wholly here.
#[derive(Default)]
struct Recent {
    /// Each entry with the size of its encoding.
    entries: BTreeMap<u64, (Entry, usize)>,
    /// The sum of those sizes.
    bytes: usize,
    /// Every entry up to this index is in the database too.
    written: Option<u64>,
}

impl Recent {
    fn insert(&mut self, entry: Entry, size: usize) {
        if let Some((_, old)) = self.entries.insert(entry.log_id.index, (entry, size)) {
            self.bytes -= old;
        }
        self.bytes += size;
    }

    /// Keeps only the entries whose index `keep` accepts.
    fn retain(&mut self, keep: impl Fn(u64) -> bool) {
        let mut bytes = 0;
        self.entries.retain(|&i, (_, size)| {
            let kept = keep(i);
            if kept {
                bytes += *size;
            }
            kept
        });
        self.bytes = bytes;
    }

    /// Drops the oldest written entries beyond [`RECENT_KEPT`] entries or
    /// [`RECENT_BYTES`].
    fn trim(&mut self) {
        while self.entries.len() > RECENT_KEPT || self.bytes > RECENT_BYTES {
            match (self.entries.first_key_value(), self.written) {
                (Some((&first, _)), Some(written)) if first <= written => {
                    if let Some((_, size)) = self.entries.remove(&first) {
                        self.bytes -= size;
                    }
                }
                _ => break,
            }
        }
    }

    /// Whether `start..` can be read from here alone.
    fn covers(&self, start: std::ops::Bound<u64>) -> bool {
        let Some((&first, _)) = self.entries.first_key_value() else { return false };
        match start {
            std::ops::Bound::Included(i) => i >= first,
            std::ops::Bound::Excluded(i) => i.saturating_add(1) >= first,
            std::ops::Bound::Unbounded => false,
        }
    }
}

const VOTE: &str = "vote";
const COMMITTED: &str = "committed";
const PURGED: &str = "purged";

/// The persistent Raft log. Cheap to clone (one shared database); a clone
/// is also its log reader (for the replication tasks).
#[derive(Clone)]
pub struct LogStore {
    db: Arc<Database>,
    /// The newest entries: the last [`RECENT_KEPT`] written (and any
    /// being written), so that replication reads fresh entries without a
    /// trip to a blocking thread and the database.
    recent: Arc<Mutex<Recent>>,
    /// The committed-index hint (encoded) not yet written: it goes with
    /// the next append (see `save_committed`).
    committed_hint: Arc<Mutex<Option<Vec<u8>>>>,
    writer: Arc<std::sync::mpsc::Sender<Append>>,
}

/// Work for the writer thread: entries (index, encoding) and the hint to
/// commit together, then `callback`.
struct Append {
    rows: Vec<(u64, Vec<u8>)>,
    hint: Option<Vec<u8>>,
    callback: LogFlushed<TypeConfig>,
}

fn io_err(subject: ErrorSubject<crate::types::NodeId>, verb: ErrorVerb, e: impl std::fmt::Display) -> StorageError {
    StorageError::IO { source: StorageIOError::new(subject, verb, AnyError::error(e.to_string())) }
}

fn logs_err(verb: ErrorVerb, e: impl std::fmt::Display) -> StorageError {
    io_err(ErrorSubject::Logs, verb, e)
}

fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>, postcard::Error> {
    postcard::to_allocvec(v)
}

fn decode<T: DeserializeOwned>(b: &[u8]) -> Result<T, postcard::Error> {
    postcard::from_bytes(b)
}

/// Runs redb work on a blocking thread.
async fn blocking<T, F>(f: F) -> Result<T, StorageError>
where
    F: FnOnce() -> Result<T, StorageError> + Send + 'static,
    T: Send + 'static,
{
    tokio::task::spawn_blocking(f).await.map_err(|e| logs_err(ErrorVerb::Read, format!("log task failed: {e}")))?
}

impl LogStore {
    /// Opens (or creates) the log at `path` (conventionally
    /// `<dir>/raft-log.redb`).
    pub fn open(path: &Path) -> Result<Self, StorageError> {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| logs_err(ErrorVerb::Write, e))?;
        }
        let db = redb::Builder::new()
            .set_cache_size(LOG_CACHE_BYTES)
            .create(path)
            .map_err(|e| logs_err(ErrorVerb::Read, format!("opening {}: {e}", path.display())))?;
        // Create the tables so that readers never meet a missing one.
        let mut txn = db.begin_write().map_err(|e| logs_err(ErrorVerb::Write, e))?;
        txn.set_durability(Durability::Immediate);
        txn.open_table(ENTRIES).map_err(|e| logs_err(ErrorVerb::Write, e))?;
        txn.open_table(META).map_err(|e| logs_err(ErrorVerb::Write, e))?;
        txn.commit().map_err(|e| logs_err(ErrorVerb::Write, e))?;
        let (tx, rx) = std::sync::mpsc::channel();
        let log =
            LogStore { db: Arc::new(db), recent: Arc::default(), committed_hint: Arc::default(), writer: Arc::new(tx) };
        let (db, recent, hint) = (Arc::downgrade(&log.db), log.recent.clone(), log.committed_hint.clone());
        std::thread::Builder::new()
            .name("raft-log-writer".into())
            .spawn(move || write_loop(&db, &recent, &hint, &rx))
            .map_err(|e| logs_err(ErrorVerb::Write, format!("starting the log writer: {e}")))?;
        Ok(log)
    }

    fn read_meta<T: DeserializeOwned>(db: &Database, key: &str) -> Result<Option<T>, StorageError> {
        let txn = db.begin_read().map_err(|e| logs_err(ErrorVerb::Read, e))?;
        let t = txn.open_table(META).map_err(|e| logs_err(ErrorVerb::Read, e))?;
        match t.get(key).map_err(|e| logs_err(ErrorVerb::Read, e))? {
            None => Ok(None),
            Some(v) => {
                decode(v.value()).map(Some).map_err(|e| logs_err(ErrorVerb::Read, format!("decoding {key}: {e}")))
            }
        }
    }

    /// Writes one meta value (fsynced if `durability` says so).
    async fn write_meta<T: Serialize>(
        &self,
        key: &'static str,
        value: &T,
        subject: ErrorSubject<crate::types::NodeId>,
        durability: Durability,
    ) -> Result<(), StorageError> {
        let bytes = encode(value).map_err(|e| io_err(subject.clone(), ErrorVerb::Write, e))?;
        let db = self.db.clone();
        blocking(move || {
            let mut txn = db.begin_write().map_err(|e| io_err(subject.clone(), ErrorVerb::Write, e))?;
            txn.set_durability(durability);
            {
                let mut t = txn.open_table(META).map_err(|e| io_err(subject.clone(), ErrorVerb::Write, e))?;
                t.insert(key, bytes.as_slice()).map_err(|e| io_err(subject.clone(), ErrorVerb::Write, e))?;
            }
            txn.commit().map_err(|e| io_err(subject, ErrorVerb::Write, e))
        })
        .await
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        let start = range.start_bound().cloned();
        let end = range.end_bound().cloned();
        // The recent entries first: one is trimmed only after it is in the
        // database, so each entry is here, there, or in both (the same
        // entry). A range that starts among them is read from memory.
        let in_memory: BTreeMap<u64, Entry> = {
            let recent = lock(&self.recent);
            let found: BTreeMap<u64, Entry> =
                recent.entries.range((start, end)).map(|(k, (e, _))| (*k, e.clone())).collect();
            if recent.covers(start) {
                return Ok(found.into_values().collect());
            }
            found
        };
        let db = self.db.clone();
        blocking(move || {
            let txn = db.begin_read().map_err(|e| logs_err(ErrorVerb::Read, e))?;
            let t = txn.open_table(ENTRIES).map_err(|e| logs_err(ErrorVerb::Read, e))?;
            let mut out = BTreeMap::new();
            for row in t.range::<u64>((start, end)).map_err(|e| logs_err(ErrorVerb::Read, e))? {
                let (k, v) = row.map_err(|e| logs_err(ErrorVerb::Read, e))?;
                let entry: Entry =
                    decode(v.value()).map_err(|e| io_err(ErrorSubject::LogIndex(k.value()), ErrorVerb::Read, e))?;
                out.insert(k.value(), entry);
            }
            out.extend(in_memory);
            Ok(out.into_values().collect())
        })
        .await
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        // Appended entries count, committed or not (they are readable).
        let last_recent = lock(&self.recent).entries.last_key_value().map(|(_, (e, _))| e.log_id);
        let db = self.db.clone();
        blocking(move || {
            let purged: Option<LogId> = Self::read_meta(&db, PURGED)?;
            let txn = db.begin_read().map_err(|e| logs_err(ErrorVerb::Read, e))?;
            let t = txn.open_table(ENTRIES).map_err(|e| logs_err(ErrorVerb::Read, e))?;
            let last = match t.last().map_err(|e| logs_err(ErrorVerb::Read, e))? {
                Some((_, v)) => {
                    let e: Entry = decode(v.value()).map_err(|e| logs_err(ErrorVerb::Read, e))?;
                    Some(e.log_id)
                }
                None => purged,
            };
            Ok(LogState { last_purged_log_id: purged, last_log_id: last_recent.or(last) })
        })
        .await
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), StorageError> {
        self.write_meta(VOTE, vote, ErrorSubject::Vote, Durability::Immediate).await
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, StorageError> {
        let db = self.db.clone();
        blocking(move || Self::read_meta(&db, VOTE)).await
    }

    /// Not written now: it is a hint that lets a restarted node apply what
    /// it knows was committed before it hears from a leader, and it goes
    /// with the next append's commit (so a saved hint never names an entry
    /// the saved log lacks). Lost (a crash, or no append since), it only
    /// makes the node wait for the leader (or, alone, for the blank entry
    /// of its new term) to commit those entries again; Raft's safety does
    /// not depend on it. A commit of its own per hint cost the leader a
    /// second log transaction per entry.
    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        let bytes = encode(&committed).map_err(|e| io_err(ErrorSubject::Store, ErrorVerb::Write, e))?;
        *lock(&self.committed_hint) = Some(bytes);
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        if let Some(bytes) = lock(&self.committed_hint).clone() {
            return decode(&bytes).map_err(|e| logs_err(ErrorVerb::Read, format!("decoding {COMMITTED}: {e}")));
        }
        let db = self.db.clone();
        Ok(blocking(move || Self::read_meta::<Option<LogId>>(&db, COMMITTED)).await?.flatten())
    }

    /// Hands the entries to the writer thread, which commits them (fsynced)
    /// and then calls `callback`: openraft counts an entry as stored, for a
    /// vote or a commit, only from the callback. Readable meanwhile (in
    /// `recent`).
    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut rows = Vec::new();
        {
            let mut recent = lock(&self.recent);
            for entry in entries {
                let bytes = encode(&entry).map_err(|e| io_err(ErrorSubject::Log(entry.log_id), ErrorVerb::Write, e))?;
                let size = bytes.len();
                rows.push((entry.log_id.index, bytes));
                recent.insert(entry, size);
            }
        }
        let hint = lock(&self.committed_hint).take();
        self.writer
            .send(Append { rows, hint, callback })
            .map_err(|_| logs_err(ErrorVerb::Write, "the log writer stopped"))
    }

    /// No append is in flight here (nor in `purge`): openraft 0.9's core
    /// calls both itself, after the callback of its last append (see the
    /// module documentation). An openraft that pipelines appends would
    /// need these to wait for the writer first.
    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        tracing::debug!(%log_id, "truncating the raft log");
        {
            let mut recent = lock(&self.recent);
            recent.retain(|i| i < log_id.index);
            recent.written = recent.written.map(|w| w.min(log_id.index.saturating_sub(1)));
        }
        let db = self.db.clone();
        blocking(move || {
            let mut txn = db.begin_write().map_err(|e| logs_err(ErrorVerb::Delete, e))?;
            txn.set_durability(Durability::Immediate);
            {
                let mut t = txn.open_table(ENTRIES).map_err(|e| logs_err(ErrorVerb::Delete, e))?;
                t.retain_in(log_id.index.., |_, _| false).map_err(|e| logs_err(ErrorVerb::Delete, e))?;
            }
            txn.commit().map_err(|e| logs_err(ErrorVerb::Delete, e))
        })
        .await
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        tracing::debug!(%log_id, "purging the raft log");
        lock(&self.recent).retain(|i| i > log_id.index);
        let bytes = encode(&log_id).map_err(|e| logs_err(ErrorVerb::Delete, e))?;
        let db = self.db.clone();
        // The purged id is written in the same commit as the deletion, so
        // that `get_log_state` never sees a hole.
        blocking(move || {
            let mut txn = db.begin_write().map_err(|e| logs_err(ErrorVerb::Delete, e))?;
            txn.set_durability(Durability::Immediate);
            {
                let mut m = txn.open_table(META).map_err(|e| logs_err(ErrorVerb::Delete, e))?;
                m.insert(PURGED, bytes.as_slice()).map_err(|e| logs_err(ErrorVerb::Delete, e))?;
                let mut t = txn.open_table(ENTRIES).map_err(|e| logs_err(ErrorVerb::Delete, e))?;
                t.retain_in(..=log_id.index, |_, _| false).map_err(|e| logs_err(ErrorVerb::Delete, e))?;
            }
            txn.commit().map_err(|e| logs_err(ErrorVerb::Delete, e))
        })
        .await
    }
}

impl LogStore {
    /// How many entries the log holds (for status and tests of purging).
    pub fn entry_count(&self) -> Result<u64, StorageError> {
        let txn = self.db.begin_read().map_err(|e| logs_err(ErrorVerb::Read, e))?;
        let t = txn.open_table(ENTRIES).map_err(|e| logs_err(ErrorVerb::Read, e))?;
        t.len().map_err(|e| logs_err(ErrorVerb::Read, e))
    }

    /// How many handles share the database (this one included): openraft's
    /// replication tasks hold readers until they wind down.
    pub fn handles(&self) -> usize {
        Arc::strong_count(&self.db)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The writer thread: commits each append (see [`write_entries`]), then
/// calls its callback. Holds the database only while it works, so that it
/// closes when the last [`LogStore`] goes.
fn write_loop(
    db: &std::sync::Weak<Database>,
    recent: &Mutex<Recent>,
    hint_slot: &Mutex<Option<Vec<u8>>>,
    jobs: &std::sync::mpsc::Receiver<Append>,
) {
    while let Ok(Append { rows, hint, callback }) = jobs.recv() {
        let result = match db.upgrade() {
            None => Err("the log is closed".to_string()),
            Some(db) => write_entries(&db, &rows, hint.as_deref()),
        };
        match &result {
            Ok(()) => {
                // Appends come in log order, after any truncation, so the
                // highest index written covers everything below it.
                if let Some(top) = rows.iter().map(|(index, _)| *index).max() {
                    let mut recent = lock(recent);
                    recent.written = Some(recent.written.map_or(top, |w| w.max(top)));
                    recent.trim();
                }
            }
            Err(e) => {
                tracing::error!("raft log append failed: {e}");
                // Keep the hint for the next append, unless a newer one came.
                if let Some(hint) = hint {
                    lock(hint_slot).get_or_insert(hint);
                }
            }
        }
        callback.log_io_completed(result.map_err(std::io::Error::other));
    }
}

/// Commits `rows` (index, encoded entry) and the `committed` hint in one
/// transaction, fsynced (`Durability::Immediate`).
fn write_entries(db: &Database, rows: &[(u64, Vec<u8>)], committed: Option<&[u8]>) -> Result<(), String> {
    (|| -> Result<(), redb::Error> {
        let mut txn = db.begin_write()?;
        txn.set_durability(Durability::Immediate);
        if let Some(bytes) = committed {
            txn.open_table(META)?.insert(COMMITTED, bytes)?;
        }
        {
            let mut t = txn.open_table(ENTRIES)?;
            for (index, bytes) in rows {
                t.insert(*index, bytes.as_slice())?;
            }
        }
        txn.commit()?;
        Ok(())
    })()
    .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::{CommittedLeaderId, EntryPayload};

    fn entry(index: u64) -> Entry {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, crate::types::NodeId(1)), index),
            payload: EntryPayload::Blank,
        }
    }

    #[test]
    fn recent_entries_keep_the_unwritten_and_the_last_written_ones() {
        let mut recent = Recent::default();
        for i in 1..=3000 {
            recent.insert(entry(i), 10);
        }
        // Nothing written yet: nothing may go, however many.
        recent.trim();
        assert_eq!(recent.entries.len(), 3000);
        recent.written = Some(2500);
        recent.trim();
        assert_eq!(recent.entries.len(), RECENT_KEPT);
        assert_eq!(recent.entries.first_key_value().map(|(i, _)| *i), Some(3000 - RECENT_KEPT as u64 + 1));
        // Written entries go only down to the limit; unwritten ones never.
        recent.written = Some(1000);
        for i in 3001..=5000 {
            recent.insert(entry(i), 10);
        }
        recent.trim();
        assert_eq!(recent.entries.len(), 5000 - 3000 + RECENT_KEPT, "unwritten entries stay");
        let first = *recent.entries.first_key_value().map(|(i, _)| i).unwrap();
        assert!(recent.covers(std::ops::Bound::Included(first)));
        assert!(recent.covers(std::ops::Bound::Excluded(first - 1)));
        assert!(!recent.covers(std::ops::Bound::Included(first - 1)), "below the first: the database has it");
        assert!(!recent.covers(std::ops::Bound::Unbounded));
        assert!(!Recent::default().covers(std::ops::Bound::Included(1)));
    }

    #[tokio::test]
    async fn the_committed_hint_is_written_with_the_next_append() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("raft-log.redb");
        let committed = Some(entry(7).log_id);
        {
            let mut log = LogStore::open(&path).unwrap();
            log.save_committed(committed).await.unwrap();
            assert_eq!(log.read_committed().await.unwrap(), committed, "read back before any append");
        }
        // No append carried it: a hint, lost (Raft's safety does not need it).
        let mut reopened = LogStore::open(&path).unwrap();
        assert_eq!(reopened.read_committed().await.unwrap(), None);
        // An append's commit carries it, with the entries.
        reopened.save_committed(committed).await.unwrap();
        let hint = lock(&reopened.committed_hint).take().unwrap();
        write_entries(&reopened.db, &[(7, encode(&entry(7)).unwrap())], Some(&hint)).unwrap();
        drop(reopened);
        let mut again = LogStore::open(&path).unwrap();
        assert_eq!(again.read_committed().await.unwrap(), committed);
        assert_eq!(again.entry_count().unwrap(), 1);
    }

    #[test]
    fn recent_entries_are_bounded_in_bytes_too() {
        let mut recent = Recent::default();
        // Large entries (an accept for many recipients): few fit.
        let big = RECENT_BYTES / 10;
        for i in 1..=100 {
            recent.insert(entry(i), big);
        }
        recent.written = Some(100);
        recent.trim();
        assert_eq!(recent.entries.len(), 10, "kept by bytes, not by count");
        assert_eq!(recent.bytes, 10 * big);
        // Truncation and purging keep the byte count right.
        recent.retain(|i| i < 95);
        assert_eq!((recent.entries.len(), recent.bytes), (4, 4 * big));
        // An entry appended again at the same index replaces the old one.
        recent.insert(entry(94), 1);
        assert_eq!(recent.bytes, 3 * big + 1);
    }
}
