//! Recovery at open: bring the files back in line with the metadata.
//!
//! Why: a crash can happen between any two steps of an accept or a delete.
//! The metadata commit is the single point of truth; everything else is
//! reconciled against it here, before the store serves anyone:
//! - files in `tmp/` were never renamed, so never referenced: removed;
//! - body files no committed record references are leftovers of a crash
//!   between the body rename and the metadata commit (or between a delete's
//!   commit and its unlink): removed — except in a store that is a cluster
//!   replica (it holds a consensus state): there the references may still
//!   be on their way. Its applies are not fsynced (the Raft log is the
//!   durable record), so after a crash it is behind the log, and a body a
//!   peer sent it was counted as a durable copy before the accept that
//!   references it was committed. Removing such a body could lose a
//!   message whose `250` was given (every copy removed that way). Such
//!   leftovers are removed later, once certainly garbage, by
//!   `LocalStore::collect_garbage` (the cluster runs it after the node
//!   caught up with the log).
//! - the reference counts are recomputed from the mailbox and queue tables,
//!   and repaired (loudly) if they disagree;
//! - a referenced body that is missing would be a bug: logged as an error.

use std::collections::HashMap;
use std::fs;
use std::io;

use redb::{ReadableTable, ReadableTableMetadata};

use super::Inner;
use crate::tables::{db_err, decode, BODIES, CONSENSUS, CONSENSUS_APPLIED, MAILBOX, QUEUE};
use crate::{BodyHash, MailboxEntry, QueueEntry, StoreError, StoreResult};

/// What recovery found and did (logged at open).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RecoveryReport {
    /// Files removed from `tmp/`.
    pub tmp_removed: usize,
    /// Unreferenced body files removed from `bodies/`.
    pub orphans_removed: usize,
    /// Unreferenced body files kept because this store is a cluster replica
    /// (their accepts may be committed in the Raft log, not yet applied;
    /// the cluster's garbage collection removes them once it knows).
    pub orphans_kept: usize,
    /// Reference counts that disagreed with the records and were rewritten.
    pub refcounts_repaired: usize,
    /// Referenced bodies whose file is missing (should always be 0).
    pub missing_bodies: usize,
    /// Referenced bodies in the store after recovery.
    pub bodies: usize,
}

pub(crate) fn recover(inner: &Inner) -> StoreResult<RecoveryReport> {
    let mut report = RecoveryReport::default();

    for entry in fs::read_dir(&inner.tmp_dir).map_err(|e| StoreError::io("listing tmp/", e))? {
        let entry = entry.map_err(|e| StoreError::io("listing tmp/", e))?;
        remove_path(&entry.path())?;
        report.tmp_removed += 1;
    }

    // The truth: what the records reference.
    let mut refs: HashMap<[u8; 32], u64> = HashMap::new();
    {
        let txn = inner.db.begin_read().map_err(|e| db_err("beginning recovery read", e))?;
        let mailbox = txn.open_table(MAILBOX).map_err(|e| db_err("opening mailbox", e))?;
        for row in mailbox.iter().map_err(|e| db_err("scanning mailbox", e))? {
            let (_, v) = row.map_err(|e| db_err("scanning mailbox", e))?;
            let entry: MailboxEntry = decode("mailbox entry", v.value())?;
            *refs.entry(entry.body.0).or_insert(0) += 1;
        }
        let queue = txn.open_table(QUEUE).map_err(|e| db_err("opening queue", e))?;
        for row in queue.iter().map_err(|e| db_err("scanning queue", e))? {
            let (_, v) = row.map_err(|e| db_err("scanning queue", e))?;
            let entry: QueueEntry = decode("queue entry", v.value())?;
            *refs.entry(entry.body.0).or_insert(0) += 1;
        }
    }

    // The counts must agree with the truth. They always should: both are
    // written in the same transaction.
    {
        let txn = inner.begin_write()?;
        {
            let mut bodies = txn.open_table(BODIES).map_err(|e| db_err("opening bodies", e))?;
            let mut wrong: Vec<([u8; 32], u64)> = Vec::new();
            for row in bodies.iter().map_err(|e| db_err("scanning bodies", e))? {
                let (k, v) = row.map_err(|e| db_err("scanning bodies", e))?;
                let actual = refs.get(k.value()).copied().unwrap_or(0);
                if actual != v.value() {
                    wrong.push((*k.value(), actual));
                }
            }
            for (hash, count) in &refs {
                if bodies.get(hash).map_err(|e| db_err("reading bodies", e))?.is_none() {
                    wrong.push((*hash, *count));
                }
            }
            for (hash, actual) in wrong {
                tracing::error!(hash = %BodyHash(hash), actual, "body reference count was wrong; repaired");
                report.refcounts_repaired += 1;
                if actual == 0 {
                    bodies.remove(&hash).map_err(|e| db_err("repairing bodies", e))?;
                } else {
                    bodies.insert(&hash, actual).map_err(|e| db_err("repairing bodies", e))?;
                }
            }
            report.bodies = bodies.len().map_err(|e| db_err("counting bodies", e))? as usize;
        }
        if report.refcounts_repaired > 0 {
            txn.commit().map_err(|e| db_err("committing refcount repair", e))?;
        } else {
            txn.abort().map_err(|e| db_err("ending recovery transaction", e))?;
        }
    }

    // Files versus records.
    let replica = is_replica(inner)?;
    let mut seen = 0usize;
    for file in fs::read_dir(&inner.bodies_dir).map_err(|e| StoreError::io("listing bodies/", e))? {
        let file = file.map_err(|e| StoreError::io("listing bodies/", e))?;
        if file.file_type().map_err(|e| StoreError::io("listing bodies/", e))?.is_dir() {
            // Not ours to delete: it could hold someone's mail.
            tracing::warn!(path = %file.path().display(), "unexpected directory in bodies/ left alone");
            continue;
        }
        let name = file.file_name();
        let hash = name.to_str().and_then(BodyHash::from_hex);
        match hash {
            Some(h) if refs.contains_key(&h.0) => seen += 1,
            Some(_) if replica => report.orphans_kept += 1,
            _ => {
                tracing::info!(path = %file.path().display(), "unreferenced body file removed");
                remove_path(&file.path())?;
                report.orphans_removed += 1;
            }
        }
    }
    if seen < refs.len() {
        for hash in refs.keys() {
            let h = BodyHash(*hash);
            if !inner.body_path(&h).exists() {
                tracing::debug!(hash = %h, "a referenced body file is missing");
                report.missing_bodies += 1;
            }
        }
        // One line, not one per body: on a witness every body is "missing"
        // by design, and a data node of a cluster fetches them from a peer.
        tracing::warn!(
            missing = report.missing_bodies,
            "referenced bodies are missing here: a cluster data node fetches them from a peer; on a single node those messages are damaged"
        );
    }
    Ok(report)
}

/// Whether this store is the replicated state of a cluster node (it has
/// applied a consensus state).
fn is_replica(inner: &Inner) -> StoreResult<bool> {
    let txn = inner.db.begin_read().map_err(|e| db_err("reading the consensus state", e))?;
    let t = match txn.open_table(CONSENSUS) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(false),
        Err(e) => return Err(db_err("opening consensus", e)),
    };
    Ok(t.get(CONSENSUS_APPLIED).map_err(|e| db_err("reading the consensus state", e))?.is_some())
}

fn remove_path(path: &std::path::Path) -> StoreResult<()> {
    let res = if path.is_dir() { fs::remove_dir_all(path) } else { fs::remove_file(path) };
    match res {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(StoreError::io(format!("removing {}", path.display()), e)),
    }
}
