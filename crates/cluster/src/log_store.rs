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
//! (`vote`, `committed`, `purged` → postcard values). All redb work runs on
//! blocking threads so that an fsync never stalls the async runtime.

// openraft's StorageError is large, and the traits impose it.
#![allow(clippy::result_large_err)]

use std::fmt::Debug;
use std::ops::RangeBounds;
use std::path::Path;
use std::sync::Arc;

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{AnyError, ErrorSubject, ErrorVerb, OptionalSend, RaftLogReader, StorageIOError};
use redb::{Database, Durability, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::types::{Entry, LogId, StorageError, TypeConfig, Vote};

const ENTRIES: TableDefinition<u64, &[u8]> = TableDefinition::new("entries");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");

const VOTE: &str = "vote";
const COMMITTED: &str = "committed";
const PURGED: &str = "purged";

/// The persistent Raft log. Cheap to clone (one shared database); a clone
/// is also its log reader (for the replication tasks).
#[derive(Clone)]
pub struct LogStore {
    db: Arc<Database>,
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
        let db = Database::create(path).map_err(|e| logs_err(ErrorVerb::Read, format!("opening {}: {e}", path.display())))?;
        // Create the tables so that readers never meet a missing one.
        let mut txn = db.begin_write().map_err(|e| logs_err(ErrorVerb::Write, e))?;
        txn.set_durability(Durability::Immediate);
        txn.open_table(ENTRIES).map_err(|e| logs_err(ErrorVerb::Write, e))?;
        txn.open_table(META).map_err(|e| logs_err(ErrorVerb::Write, e))?;
        txn.commit().map_err(|e| logs_err(ErrorVerb::Write, e))?;
        Ok(LogStore { db: Arc::new(db) })
    }

    fn read_meta<T: DeserializeOwned>(db: &Database, key: &str) -> Result<Option<T>, StorageError> {
        let txn = db.begin_read().map_err(|e| logs_err(ErrorVerb::Read, e))?;
        let t = txn.open_table(META).map_err(|e| logs_err(ErrorVerb::Read, e))?;
        match t.get(key).map_err(|e| logs_err(ErrorVerb::Read, e))? {
            None => Ok(None),
            Some(v) => decode(v.value()).map(Some).map_err(|e| logs_err(ErrorVerb::Read, format!("decoding {key}: {e}"))),
        }
    }

    /// Writes one meta value durably.
    async fn write_meta<T: Serialize>(&self, key: &'static str, value: &T, subject: ErrorSubject<crate::types::NodeId>) -> Result<(), StorageError> {
        let bytes = encode(value).map_err(|e| io_err(subject.clone(), ErrorVerb::Write, e))?;
        let db = self.db.clone();
        blocking(move || {
            let mut txn = db.begin_write().map_err(|e| io_err(subject.clone(), ErrorVerb::Write, e))?;
            txn.set_durability(Durability::Immediate);
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
        let db = self.db.clone();
        blocking(move || {
            let txn = db.begin_read().map_err(|e| logs_err(ErrorVerb::Read, e))?;
            let t = txn.open_table(ENTRIES).map_err(|e| logs_err(ErrorVerb::Read, e))?;
            let mut out = Vec::new();
            for row in t.range::<u64>((start, end)).map_err(|e| logs_err(ErrorVerb::Read, e))? {
                let (k, v) = row.map_err(|e| logs_err(ErrorVerb::Read, e))?;
                let entry: Entry = decode(v.value())
                    .map_err(|e| io_err(ErrorSubject::LogIndex(k.value()), ErrorVerb::Read, e))?;
                out.push(entry);
            }
            Ok(out)
        })
        .await
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
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
            Ok(LogState { last_purged_log_id: purged, last_log_id: last })
        })
        .await
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), StorageError> {
        self.write_meta(VOTE, vote, ErrorSubject::Vote).await
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, StorageError> {
        let db = self.db.clone();
        blocking(move || Self::read_meta(&db, VOTE)).await
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        self.write_meta(COMMITTED, &committed, ErrorSubject::Store).await
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        let db = self.db.clone();
        Ok(blocking(move || Self::read_meta::<Option<LogId>>(&db, COMMITTED)).await?.flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut rows = Vec::new();
        for entry in entries {
            let bytes = encode(&entry).map_err(|e| io_err(ErrorSubject::Log(entry.log_id), ErrorVerb::Write, e))?;
            rows.push((entry.log_id.index, bytes));
        }
        let db = self.db.clone();
        // One durable commit for the whole batch; the entries are readable
        // and on disk when it returns, so the callback can be called now.
        let res = blocking(move || {
            let mut txn = db.begin_write().map_err(|e| logs_err(ErrorVerb::Write, e))?;
            txn.set_durability(Durability::Immediate);
            {
                let mut t = txn.open_table(ENTRIES).map_err(|e| logs_err(ErrorVerb::Write, e))?;
                for (index, bytes) in &rows {
                    t.insert(*index, bytes.as_slice()).map_err(|e| logs_err(ErrorVerb::Write, e))?;
                }
            }
            txn.commit().map_err(|e| logs_err(ErrorVerb::Write, e))
        })
        .await;
        match res {
            Ok(()) => {
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                callback.log_io_completed(Err(std::io::Error::other(e.to_string())));
                Err(e)
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        tracing::debug!(%log_id, "truncating the raft log");
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
