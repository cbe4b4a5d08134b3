//! [`LocalStore`]: the single-node store on a local file system.
//!
//! Why this design: bodies are files (large, write-once, shared by all
//! recipients), metadata is redb (small, transactional, MVCC so that POP3
//! readers never wait for SMTP writers). The durability protocol is
//! Postfix's: a body is fsynced and renamed before the metadata commit that
//! references it, and only that commit produces a [`Committed`]. Accepts go
//! through a group committer ([`committer`]) for throughput; every other
//! write is rare and uses its own transaction.

mod bodies;
mod committer;
mod directory;
mod group_sync;
mod recovery;
mod state;
pub use state::{StateSnapshot, StateView, VerifyReport, MESSAGE_RETENTION_SECS};

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use redb::{Database, Durability, ReadableTable, WriteTransaction};

pub use bodies::{BodyPin, GarbageReport};
pub use recovery::RecoveryReport;

use crate::tables::{
    db_err, decode, ALIASES, BODIES, DOMAINS, MAILBOX, MESSAGES, MESSAGE_AGES, META, QUEUE, QUEUE_ID_HIGH_WATER,
    QUEUE_STATE, RESENDS, RESEND_AGES, RESEND_FINGERPRINTS, SCHEMA_VERSION, SCHEMA_VERSION_KEY, USERS,
};
use crate::types::dedup;
use crate::{
    Address, Body, BodyFile, BodyHash, Committed, Domain, EntryId, Incoming, MailChange, MailStore, MailboxEntry,
    QueueEntry, QueueId, QueueItem, QueueOp, QueueState, Spool, StagedFile, StoreError, StoreResult,
};
use committer::{AcceptJob, Committer};

/// Queue ids reserved per metadata commit: `next_queue_id` is called once
/// per SMTP transaction, so a commit per id would double the commit rate.
/// Ids of a block left unused at a restart are skipped, never reused.
const QUEUE_ID_BLOCK: u64 = 1000;

/// redb's page cache for `meta.redb`. redb's default is 1 GiB per
/// database, which a store with much mail would fill: the process's memory
/// would grow with the mail kept. Pages beyond this are read from the file
/// (the kernel's page cache has the hot ones).
const STORE_CACHE_BYTES: usize = 32 * 1024 * 1024;

/// How a [`LocalStore`] is opened.
#[derive(Clone, Debug)]
pub struct StoreOptions {
    /// The node's own host names: local like the seed's sendmail `Cw` class.
    /// `x@hostname` is looked up as `x@d` in each configured domain.
    pub hostnames: Vec<Domain>,
    /// Whether to fsync bodies, directories and commits. Only turn this off
    /// for tests or benchmarks: without it an acknowledged message can be
    /// lost on power failure.
    pub fsync: bool,
    /// Put in the top 16 bits of every queue id this store hands out: in a
    /// cluster, the node id, so that ids are unique cluster-wide.
    pub node_prefix: u16,
    /// Who gets `postmaster@d` for a domain `d` that has no postmaster user
    /// or alias of its own (RFC 5321 4.5.1 asks every domain to accept
    /// postmaster): a user or alias of ours. `None`: such mail is refused
    /// as an unknown user, never handed to another domain's postmaster
    /// (domains on one server may belong to different organisations).
    pub postmaster: Option<Address>,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions { hostnames: Vec::new(), fsync: true, node_prefix: 0, postmaster: None }
    }
}

/// The state shared by the async front, the blocking tasks and the
/// committer thread.
pub(crate) struct Inner {
    pub(crate) db: Database,
    pub(crate) bodies_dir: PathBuf,
    /// `bodies_dir`, open for its fsyncs: one per body copied from a peer
    /// (see `dir_sync`), so not an open and a close each time.
    pub(crate) bodies_dir_handle: fs::File,
    pub(crate) tmp_dir: PathBuf,
    pub(crate) options: StoreOptions,
    /// Body hashes an accept may be about to reference (see `bodies`).
    pub(crate) in_flight: Mutex<HashMap<BodyHash, usize>>,
    /// Makes temp file names unique within this process.
    pub(crate) tmp_seq: AtomicU64,
    /// Top 16 bits of queue ids (the node id in a cluster); starts as
    /// `options.node_prefix`, set when the node joins a cluster.
    pub(crate) node_prefix: std::sync::atomic::AtomicU16,
    /// Shared fsyncs of `bodies/` for bodies written outside the committer.
    pub(crate) dir_sync: group_sync::GroupSync,
    /// When replicated state changes were last committed durably (see
    /// `apply_state`).
    pub(crate) state_synced_at: Mutex<std::time::Instant>,
    /// `std::process::id()`, for temporary file names (a system call each
    /// time otherwise).
    pub(crate) process_id: u32,
}

impl Inner {
    /// A write transaction with the durability the options ask for.
    pub(crate) fn begin_write(&self) -> StoreResult<WriteTransaction> {
        let mut txn = self.db.begin_write().map_err(|e| db_err("beginning write", e))?;
        txn.set_durability(if self.options.fsync { Durability::Immediate } else { Durability::Eventual });
        Ok(txn)
    }

    fn reserve_queue_ids(&self) -> StoreResult<(u64, u64)> {
        let txn = self.begin_write()?;
        let range = {
            let mut meta = txn.open_table(META).map_err(|e| db_err("opening meta", e))?;
            let start = meta
                .get(QUEUE_ID_HIGH_WATER)
                .map_err(|e| db_err("reading queue id counter", e))?
                .map(|g| g.value())
                .unwrap_or(1);
            let end =
                start.checked_add(QUEUE_ID_BLOCK).ok_or_else(|| StoreError::Internal("queue ids exhausted".into()))?;
            meta.insert(QUEUE_ID_HIGH_WATER, end).map_err(|e| db_err("writing queue id counter", e))?;
            (start, end)
        };
        txn.commit().map_err(|e| db_err("committing queue id block", e))?;
        Ok(range)
    }

    fn mailbox(&self, user: &Address) -> StoreResult<Vec<MailboxEntry>> {
        let txn = self.db.begin_read().map_err(|e| db_err("beginning read", e))?;
        let table = txn.open_table(MAILBOX).map_err(|e| db_err("opening mailbox", e))?;
        let mut out = Vec::new();
        let range =
            table.range((user.as_str(), 0u64)..=(user.as_str(), u64::MAX)).map_err(|e| db_err("reading mailbox", e))?;
        for row in range {
            let (_, v) = row.map_err(|e| db_err("reading mailbox", e))?;
            out.push(decode::<MailboxEntry>("mailbox entry", v.value())?);
        }
        Ok(out)
    }

    /// Removes mailbox entries of `user` (all of them for `None`) in `txn`,
    /// adjusting reference counts. Returns the bodies that lost their last
    /// reference, to be unlinked after the commit.
    fn remove_entries(
        &self,
        txn: &WriteTransaction,
        user: &Address,
        ids: Option<&[EntryId]>,
    ) -> StoreResult<Vec<BodyHash>> {
        let mut mailbox = txn.open_table(MAILBOX).map_err(|e| db_err("opening mailbox", e))?;
        let mut bodies = txn.open_table(BODIES).map_err(|e| db_err("opening bodies", e))?;
        let keys: Vec<u64> = match ids {
            Some(ids) => ids.iter().map(|i| i.0).collect(),
            None => {
                let mut keys = Vec::new();
                let range = mailbox
                    .range((user.as_str(), 0u64)..=(user.as_str(), u64::MAX))
                    .map_err(|e| db_err("reading mailbox", e))?;
                for row in range {
                    let (k, _) = row.map_err(|e| db_err("reading mailbox", e))?;
                    keys.push(k.value().1);
                }
                keys
            }
        };
        let mut freed = Vec::new();
        for id in keys {
            let removed = mailbox.remove((user.as_str(), id)).map_err(|e| db_err("removing mailbox entry", e))?;
            // Ids already gone (or listed twice) are ignored, as promised.
            let Some(removed) = removed else { continue };
            let entry: MailboxEntry = decode("mailbox entry", removed.value())?;
            drop(removed);
            if release_body(&mut bodies, &entry.body)? {
                freed.push(entry.body);
            }
        }
        Ok(freed)
    }

    fn delete(&self, user: &Address, ids: Option<&[EntryId]>) -> StoreResult<()> {
        let txn = self.begin_write()?;
        let freed = self.remove_entries(&txn, user, ids)?;
        txn.commit().map_err(|e| db_err("committing delete", e))?;
        self.unlink_freed(&freed);
        Ok(())
    }

    fn dequeue(&self, queue_id: QueueId) -> StoreResult<bool> {
        let txn = self.begin_write()?;
        let freed = {
            let mut queue = txn.open_table(QUEUE).map_err(|e| db_err("opening queue", e))?;
            let mut bodies = txn.open_table(BODIES).map_err(|e| db_err("opening bodies", e))?;
            let removed = queue.remove(queue_id.0).map_err(|e| db_err("removing queue entry", e))?;
            let Some(removed) = removed else { return Ok(false) };
            let entry: QueueEntry = decode("queue entry", removed.value())?;
            drop(removed);
            let mut states = txn.open_table(QUEUE_STATE).map_err(|e| db_err("opening queue state", e))?;
            states.remove(queue_id.0).map_err(|e| db_err("removing queue state", e))?;
            release_body(&mut bodies, &entry.body)?.then_some(entry.body)
        };
        txn.commit().map_err(|e| db_err("committing dequeue", e))?;
        self.unlink_freed(freed.as_slice());
        Ok(true)
    }

    fn queue(&self) -> StoreResult<Vec<QueueEntry>> {
        let txn = self.db.begin_read().map_err(|e| db_err("beginning read", e))?;
        let table = txn.open_table(QUEUE).map_err(|e| db_err("opening queue", e))?;
        let mut out = Vec::new();
        for row in table.iter().map_err(|e| db_err("reading queue", e))? {
            let (_, v) = row.map_err(|e| db_err("reading queue", e))?;
            out.push(decode::<QueueEntry>("queue entry", v.value())?);
        }
        Ok(out)
    }

    fn queue_items(&self) -> StoreResult<Vec<QueueItem>> {
        let txn = self.db.begin_read().map_err(|e| db_err("beginning read", e))?;
        let table = txn.open_table(QUEUE).map_err(|e| db_err("opening queue", e))?;
        let states = txn.open_table(QUEUE_STATE).map_err(|e| db_err("opening queue state", e))?;
        let mut out = Vec::new();
        for row in table.iter().map_err(|e| db_err("reading queue", e))? {
            let (k, v) = row.map_err(|e| db_err("reading queue", e))?;
            let entry = decode::<QueueEntry>("queue entry", v.value())?;
            let state = match states.get(k.value()).map_err(|e| db_err("reading queue state", e))? {
                Some(s) => decode::<QueueState>("queue state", s.value())?,
                None => QueueState::initial(&entry),
            };
            out.push(QueueItem { entry, state });
        }
        Ok(out)
    }

    fn body_refs(&self, hash: &BodyHash) -> StoreResult<u64> {
        let txn = self.db.begin_read().map_err(|e| db_err("beginning read", e))?;
        let table = txn.open_table(BODIES).map_err(|e| db_err("opening bodies", e))?;
        let n = table.get(&hash.0).map_err(|e| db_err("reading bodies", e))?.map(|g| g.value()).unwrap_or(0);
        Ok(n)
    }
}

/// Drops one reference to `hash`; true when it was the last one (the row
/// is then gone and the file may be unlinked after the commit).
fn release_body(bodies: &mut redb::Table<'_, &'static [u8; 32], u64>, hash: &BodyHash) -> StoreResult<bool> {
    let count = bodies.get(&hash.0).map_err(|e| db_err("reading refcount", e))?.map(|g| g.value());
    match count {
        Some(n) if n > 1 => {
            bodies.insert(&hash.0, n - 1).map_err(|e| db_err("writing refcount", e))?;
            Ok(false)
        }
        Some(_) => {
            bodies.remove(&hash.0).map_err(|e| db_err("removing refcount", e))?;
            Ok(true)
        }
        None => {
            // Recovery recomputes the counts, so this is a bug, not damage
            // to propagate: the entry is removed anyway.
            tracing::error!(%hash, "released a body that had no reference count");
            Ok(false)
        }
    }
}

/// The local store: mail, queue and directory of one node.
pub struct LocalStore {
    inner: Arc<Inner>,
    committer: Committer,
    /// The current block of reserved queue ids, `next..end`.
    queue_ids: tokio::sync::Mutex<(u64, u64)>,
    recovery: RecoveryReport,
}

impl std::fmt::Debug for LocalStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalStore").field("bodies", &self.inner.bodies_dir).finish_non_exhaustive()
    }
}

impl LocalStore {
    /// Sets the top 16 bits of the queue ids handed out from now on (the
    /// node id, once this node is in a cluster).
    pub fn set_node_prefix(&self, prefix: u16) {
        self.inner.node_prefix.store(prefix, Ordering::Relaxed);
    }

    /// Opens (creating if needed) the store in `dir`, runs recovery and
    /// starts the committer. Blocking: call it before serving, or from a
    /// blocking context.
    pub fn open(dir: &Path, options: StoreOptions) -> StoreResult<Arc<LocalStore>> {
        let bodies_dir = dir.join("bodies");
        let tmp_dir = dir.join("tmp");
        for d in [dir, &bodies_dir, &tmp_dir] {
            fs::create_dir_all(d).map_err(|e| StoreError::io(format!("creating {}", d.display()), e))?;
        }
        if options.fsync {
            for d in [&bodies_dir, &tmp_dir, &dir.to_path_buf()] {
                fs::File::open(d)
                    .and_then(|f| f.sync_all())
                    .map_err(|e| StoreError::io(format!("fsyncing {}", d.display()), e))?;
            }
        }

        let db = redb::Builder::new()
            .set_cache_size(STORE_CACHE_BYTES)
            .create(dir.join("meta.redb"))
            .map_err(|e| db_err("opening meta.redb", e))?;
        let options_prefix = options.node_prefix;
        let bodies_dir_handle =
            fs::File::open(&bodies_dir).map_err(|e| StoreError::io(format!("opening {}", bodies_dir.display()), e))?;
        let inner = Arc::new(Inner {
            db,
            bodies_dir,
            bodies_dir_handle,
            tmp_dir,
            options,
            in_flight: Mutex::new(HashMap::new()),
            tmp_seq: AtomicU64::new(0),
            node_prefix: std::sync::atomic::AtomicU16::new(options_prefix),
            dir_sync: group_sync::GroupSync::default(),
            state_synced_at: Mutex::new(std::time::Instant::now()),
            process_id: std::process::id(),
        });
        init_schema(&inner)?;
        let recovery = recovery::recover(&inner)?;
        tracing::info!(dir = %dir.display(), ?recovery, "store opened");
        let committer = Committer::start(inner.clone())?;
        Ok(Arc::new(LocalStore { inner, committer, queue_ids: tokio::sync::Mutex::new((0, 0)), recovery }))
    }

    /// What recovery found and did when this store was opened.
    pub fn recovery_report(&self) -> &RecoveryReport {
        &self.recovery
    }

    /// How many mailbox and queue entries reference this body (0 when the
    /// body is not stored). For diagnostics and the admin CLI.
    pub async fn body_refs(&self, hash: &BodyHash) -> StoreResult<u64> {
        let inner = self.inner.clone();
        let hash = *hash;
        blocking(move || inner.body_refs(&hash)).await
    }

    /// Removes a queue entry once it has been delivered (or bounced),
    /// freeing its body if nothing else references it. `Ok(false)` if it was
    /// not queued.
    pub async fn dequeue(&self, queue_id: QueueId) -> StoreResult<bool> {
        let inner = self.inner.clone();
        blocking(move || inner.dequeue(queue_id)).await
    }

    /// Path of the file holding a body (for zero-copy senders).
    pub fn body_path(&self, hash: &BodyHash) -> PathBuf {
        self.inner.body_path(hash)
    }

    /// Writes a body spooled into `tmp/` durably under its hash (rename,
    /// fdatasync, directory fsync) without referencing it: the accepting
    /// node's own copy in a cluster (see `put_body`).
    pub async fn put_staged_body(&self, staged: StagedFile) -> StoreResult<BodyHash> {
        let inner = self.inner.clone();
        blocking(move || inner.make_durable(inner.stage_spooled_body(staged)?)).await
    }

    /// While the pin lives, no deletion unlinks the body file `hash` (an
    /// accept that wrote it counts on it until its commit is applied).
    pub fn pin_body(&self, hash: BodyHash) -> BodyPin {
        self.inner.pin_body(hash)
    }

    pub(crate) fn inner(&self) -> &Arc<Inner> {
        &self.inner
    }
}

fn init_schema(inner: &Inner) -> StoreResult<()> {
    let txn = inner.begin_write()?;
    {
        let mut meta = txn.open_table(META).map_err(|e| db_err("creating meta", e))?;
        let version = meta.get(SCHEMA_VERSION_KEY).map_err(|e| db_err("reading schema version", e))?.map(|g| g.value());
        match version {
            None => {
                meta.insert(SCHEMA_VERSION_KEY, SCHEMA_VERSION).map_err(|e| db_err("writing schema version", e))?;
            }
            Some(SCHEMA_VERSION) => {}
            Some(v) => {
                return Err(StoreError::Internal(format!(
                    "meta.redb has schema version {v}, this build understands {SCHEMA_VERSION}"
                )))
            }
        }
        // A store made before message records were aged: index them (once).
        let aged = txn
            .list_tables()
            .map_err(|e| db_err("listing tables", e))?
            .any(|t| redb::TableHandle::name(&t) == redb::TableHandle::name(&MESSAGE_AGES));
        if !aged {
            let n = state::index_message_ages(&txn, crate::tables::unix_now())?;
            if n > 0 {
                tracing::info!(messages = n, "message records indexed by age, pruned a retention period from now");
            }
        }
        // Create every table, so that read transactions can open them.
        txn.open_table(MAILBOX).map_err(|e| db_err("creating mailbox", e))?;
        txn.open_table(BODIES).map_err(|e| db_err("creating bodies", e))?;
        txn.open_table(QUEUE).map_err(|e| db_err("creating queue", e))?;
        txn.open_table(QUEUE_STATE).map_err(|e| db_err("creating queue state", e))?;
        txn.open_table(DOMAINS).map_err(|e| db_err("creating domains", e))?;
        txn.open_table(USERS).map_err(|e| db_err("creating users", e))?;
        txn.open_table(ALIASES).map_err(|e| db_err("creating aliases", e))?;
        txn.open_table(RESEND_FINGERPRINTS).map_err(|e| db_err("creating fingerprints", e))?;
        txn.open_table(RESEND_AGES).map_err(|e| db_err("creating fingerprints", e))?;
        txn.open_table(RESENDS).map_err(|e| db_err("creating resends", e))?;
        txn.open_table(MESSAGES).map_err(|e| db_err("creating messages", e))?;
    }
    txn.commit().map_err(|e| db_err("committing schema", e))
}

/// Runs blocking store work off the async executor.
pub(crate) async fn blocking<T, F>(f: F) -> StoreResult<T>
where
    F: FnOnce() -> StoreResult<T> + Send + 'static,
    T: Send + 'static,
{
    tokio::task::spawn_blocking(f).await.map_err(|e| StoreError::Internal(format!("store task failed: {e}")))?
}

#[async_trait::async_trait]
impl MailStore for LocalStore {
    fn spool(&self, in_memory: usize) -> Spool {
        self.inner.spool(in_memory)
    }

    async fn next_queue_id(&self) -> StoreResult<QueueId> {
        let mut block = self.queue_ids.lock().await;
        if block.0 >= block.1 {
            let inner = self.inner.clone();
            *block = blocking(move || inner.reserve_queue_ids()).await?;
        }
        let id = block.0;
        block.0 += 1;
        if id >= 1 << 48 {
            return Err(StoreError::Internal("queue ids exhausted".into()));
        }
        let prefix = self.inner.node_prefix.load(Ordering::Relaxed);
        Ok(QueueId((u64::from(prefix) << 48) | id))
    }

    async fn accept(&self, mut msg: Incoming) -> StoreResult<Committed> {
        msg.dedup_recipients();
        if msg.local.is_empty() && msg.remote.is_empty() {
            return Err(StoreError::Permanent("message has no recipients".into()));
        }
        let inner = self.inner.clone();
        let body = msg.body;
        let mut staged = blocking(move || match body {
            Body::Bytes(bytes) => inner.stage_body(&bytes),
            Body::Staged(file) => inner.stage_spooled_body(file),
        })
        .await?;
        let body_path = staged.path.clone();
        let body_file = staged.file.take();
        let (reply, answer) = tokio::sync::oneshot::channel();
        let (synced, data_synced) = std::sync::mpsc::sync_channel(1);
        self.committer.submit(AcceptJob {
            queue_id: msg.queue_id,
            return_path: msg.return_path,
            local: msg.local,
            remote: msg.remote,
            resend: msg.resend,
            body: staged,
            data_synced,
            reply,
        })?;
        // The committer fsyncs the directory meanwhile and waits for this.
        let inner = self.inner.clone();
        blocking(move || {
            let _ = synced.send(inner.sync_body(body_file, &body_path));
            Ok(())
        })
        .await?;
        answer.await.map_err(|_| StoreError::Unavailable("the committer stopped before answering".into()))?
    }

    async fn mailbox(&self, user: &Address) -> StoreResult<Vec<MailboxEntry>> {
        let inner = self.inner.clone();
        let user = user.clone();
        blocking(move || inner.mailbox(&user)).await
    }

    async fn body(&self, hash: &BodyHash) -> StoreResult<Arc<Vec<u8>>> {
        let inner = self.inner.clone();
        let hash = *hash;
        blocking(move || inner.read_body(&hash).map(Arc::new)).await
    }

    async fn open_body(&self, hash: &BodyHash) -> StoreResult<BodyFile> {
        let inner = self.inner.clone();
        let hash = *hash;
        blocking(move || inner.open_body(&hash)).await
    }

    async fn delete(&self, user: &Address, ids: &[EntryId]) -> StoreResult<()> {
        if ids.is_empty() {
            return Ok(());
        }
        let inner = self.inner.clone();
        let user = user.clone();
        let ids = ids.to_vec();
        blocking(move || inner.delete(&user, Some(&ids))).await
    }

    async fn queue(&self) -> StoreResult<Vec<QueueEntry>> {
        let inner = self.inner.clone();
        blocking(move || inner.queue()).await
    }

    async fn queue_items(&self) -> StoreResult<Vec<QueueItem>> {
        let inner = self.inner.clone();
        blocking(move || inner.queue_items()).await
    }

    async fn queue_change(&self, queue_id: QueueId, op: QueueOp) -> StoreResult<()> {
        // The same application as a cluster's state machine, but in a
        // durable (fsynced) commit of its own: on a single node this commit
        // is the record that makes a delivery final.
        let inner = self.inner.clone();
        blocking(move || {
            let txn = inner.begin_write()?;
            let freed = inner.apply_mail(&txn, &MailChange::Queue { queue_id, op })?;
            txn.commit().map_err(|e| db_err("committing queue change", e))?;
            inner.unlink_freed(&freed);
            Ok(())
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dedup_keeps_first_occurrence_in_order() {
        assert_eq!(dedup(vec![3, 1, 3, 2, 1]), vec![3, 1, 2]);
    }

    #[test]
    fn queue_id_blocks_are_disjoint_and_persistent() {
        let dir = tempfile::tempdir().unwrap();
        let first = {
            let store = LocalStore::open(dir.path(), StoreOptions::default()).unwrap();
            let a = store.inner.reserve_queue_ids().unwrap();
            let b = store.inner.reserve_queue_ids().unwrap();
            assert_eq!(a.1, b.0);
            assert_eq!(b.1 - b.0, QUEUE_ID_BLOCK);
            b
        };
        let store = LocalStore::open(dir.path(), StoreOptions::default()).unwrap();
        assert_eq!(store.inner.reserve_queue_ids().unwrap().0, first.1);
    }

    #[test]
    fn newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = LocalStore::open(dir.path(), StoreOptions::default()).unwrap();
            let txn = store.inner.begin_write().unwrap();
            txn.open_table(META).unwrap().insert(SCHEMA_VERSION_KEY, SCHEMA_VERSION + 1).unwrap();
            txn.commit().unwrap();
        }
        let err = LocalStore::open(dir.path(), StoreOptions::default()).unwrap_err();
        assert!(matches!(err, StoreError::Internal(ref m) if m.contains("schema")), "{err}");
    }
}
