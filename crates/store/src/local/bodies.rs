//! Body files: content-addressed, written with "fsync then rename".
//!
//! Why this shape: a body is written once to `tmp/`, then renamed to
//! `bodies/<sha256>`, so a reader never sees a partial body under its final
//! name; it is made durable (fdatasync of the file, fsync of the directory)
//! before the metadata commit that references it. Identical bodies (one message to many
//! recipients, or resent mail) share one file, counted in the `bodies`
//! table. Freeing a body happens after the metadata commit that dropped its
//! last reference, and must not race with an accept of the same content
//! that is still on its way to the committer: the in-flight set below
//! closes that window.
//!
//! A cluster replica keeps unreferenced files at start (see `recovery`);
//! those that are certainly garbage go later, through the same unlink
//! path, by [`Inner::collect_garbage`]: it needs to know when a file was
//! last written, so a body written again (same content: the file is
//! shared, not rewritten) has its modification time set anew.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, Write};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::SystemTime;

use redb::ReadableTable;

use super::Inner;
use crate::tables::{db_err, BODIES};
use crate::{BodyFile, BodyHash, Spool, StagedFile, StoreError, StoreResult};

/// A body renamed into `bodies/`, not yet durable: the caller fdatasyncs it
/// and the committer fsyncs its directory, both before the metadata commit
/// that references it. Protected from being freed until dropped.
pub(crate) struct StagedBody {
    pub hash: BodyHash,
    pub size: u64,
    /// The body file itself, fdatasynced by the caller before the commit.
    pub path: PathBuf,
    /// The file as written (open), for the fdatasync: no second open.
    /// `None` when the body was already there.
    pub file: Option<File>,
    pub _guard: InFlight,
}

/// Marks a body hash as "an accept may be about to reference this": while
/// any guard for a hash lives, a concurrent delete that freed the same hash
/// must not unlink the file (the accept already counted on it existing).
pub(crate) struct InFlight {
    inner: Arc<Inner>,
    hash: BodyHash,
}

/// Keeps a body file from being unlinked by a deletion that frees the
/// same content, for as long as it lives (see [`crate::LocalStore::pin_body`]).
pub struct BodyPin {
    _guard: InFlight,
}

impl InFlight {
    fn register(inner: &Arc<Inner>, hash: BodyHash) -> Self {
        *lock_map(&inner.in_flight).entry(hash).or_insert(0) += 1;
        InFlight { inner: inner.clone(), hash }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut map = lock_map(&self.inner.in_flight);
        if let Some(n) = map.get_mut(&self.hash) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.hash);
            }
        }
    }
}

/// The map only holds counters; a panic while it was locked cannot leave it
/// in a state worse than a missed decrement, so poisoning is ignored.
fn lock_map(m: &std::sync::Mutex<HashMap<BodyHash, usize>>) -> std::sync::MutexGuard<'_, HashMap<BodyHash, usize>> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Inner {
    pub(crate) fn pin_body(self: &Arc<Self>, hash: BodyHash) -> BodyPin {
        BodyPin { _guard: InFlight::register(self, hash) }
    }

    /// One flat directory for every body. Measured: with 256 hash-prefix
    /// directories, each group commit fsynced several cold directories and
    /// one SMTP session reached ~550 msgs/s; with one directory, which stays
    /// hot and is fsynced once per batch, ~1,000 msgs/s (ext4; its hashed
    /// directory index keeps lookups fast with millions of entries).
    pub(crate) fn body_path(&self, hash: &BodyHash) -> PathBuf {
        self.bodies_dir.join(hash.to_hex())
    }

    /// Writes `body` durably under its hash (step 1 of an accept). Runs in
    /// the caller's blocking task so that many bodies are written and
    /// fsynced in parallel.
    pub(crate) fn stage_body(self: &Arc<Self>, body: &[u8]) -> StoreResult<StagedBody> {
        self.stage_hashed_body(BodyHash::of(body), body, false)
    }

    /// [`Self::stage_body`] for a caller that has just computed the hash
    /// (hashing a large body costs milliseconds: do it once). With
    /// `replace_damaged` (a copy from a peer, a repair), a file already
    /// under the name is read and replaced if its content differs.
    pub(crate) fn stage_hashed_body(
        self: &Arc<Self>,
        hash: BodyHash,
        body: &[u8],
        replace_damaged: bool,
    ) -> StoreResult<StagedBody> {
        // Register before looking at the file, so that a delete that frees
        // this hash from now on leaves the file alone.
        let guard = InFlight::register(self, hash);
        let path = self.body_path(&hash);
        let size = body.len() as u64;

        // Already there (same content, as names are hashes): share it. A
        // file of the wrong length can only be damage; replace it.
        let mut exists = matches!(fs::metadata(&path), Ok(m) if m.len() == size);
        if exists && replace_damaged && fs::read(&path).is_ok_and(|existing| existing != body) {
            tracing::warn!(path = %path.display(), "damaged body file replaced by a good copy");
            fs::remove_file(&path).map_err(|e| StoreError::io(format!("removing damaged {}", path.display()), e))?;
            exists = false;
        }
        let file = if exists {
            // A caller is about to count on this copy: it must look as
            // recently written as a new one to the garbage collection.
            touch(&path).map_err(|e| StoreError::io(format!("refreshing body {hash}"), e))?;
            None
        } else {
            let seq = self.tmp_seq.fetch_add(1, Ordering::Relaxed);
            let tmp = self.tmp_dir.join(format!("{}.{}.{}", self.process_id, seq, &hash.to_hex()[..16]));
            let file = match write_new(&tmp, body) {
                Ok(file) => file,
                Err(e) => {
                    let _ = fs::remove_file(&tmp);
                    return Err(StoreError::io(format!("writing body {hash} to {}", tmp.display()), e));
                }
            };
            if let Err(e) = fs::rename(&tmp, &path) {
                let _ = fs::remove_file(&tmp);
                return Err(StoreError::io(format!("renaming body {hash} into place"), e));
            }
            Some(file)
        };
        Ok(StagedBody { hash, size, path, file, _guard: guard })
    }

    /// Takes a body the SMTP driver spooled into `tmp/` (already hashed as
    /// it was written): renamed under its hash, no second copy; if that
    /// content is already there, the spooled file is removed and the
    /// existing one shared.
    pub(crate) fn stage_spooled_body(self: &Arc<Self>, spooled: StagedFile) -> StoreResult<StagedBody> {
        let (hash, size) = (spooled.hash(), spooled.size());
        let guard = InFlight::register(self, hash);
        let path = self.body_path(&hash);
        if matches!(fs::metadata(&path), Ok(m) if m.len() == size) {
            touch(&path).map_err(|e| StoreError::io(format!("refreshing body {hash}"), e))?;
            // Dropping the spooled file removes it.
            return Ok(StagedBody { hash, size, path, file: None, _guard: guard });
        }
        let (tmp, file) = spooled.take()?;
        if let Err(e) = fs::rename(&tmp, &path) {
            let _ = fs::remove_file(&tmp);
            return Err(StoreError::io(format!("renaming body {hash} into place"), e));
        }
        Ok(StagedBody { hash, size, path, file: Some(file), _guard: guard })
    }

    /// A spool for a message being received, its file (if it needs one)
    /// in `tmp/` under a name unique in this process.
    pub(crate) fn spool(&self, in_memory: usize) -> Spool {
        let seq = self.tmp_seq.fetch_add(1, Ordering::Relaxed);
        Spool::new(self.tmp_dir.join(format!("{}.{}.spool", self.process_id, seq)), in_memory)
    }

    /// Makes a staged body's data durable (fdatasync). Runs in the caller's
    /// blocking task while the committer fsyncs the directory: the two are
    /// independent, and the metadata commit waits for both, so a
    /// single session pays two sequential syncs per message instead of
    /// three. Also done for a body that was already there: its writer may
    /// not have synced it yet.
    pub(crate) fn sync_body(&self, file: Option<File>, staged_path: &std::path::Path) -> io::Result<()> {
        if !self.options.fsync {
            return Ok(());
        }
        match file {
            Some(file) => file.sync_data(),
            None => File::open(staged_path)?.sync_data(),
        }
    }

    /// Makes a body staged outside the committer durable: its data, then
    /// (shared with concurrent callers) the directory entry.
    pub(crate) fn make_durable(&self, mut staged: StagedBody) -> StoreResult<BodyHash> {
        self.sync_body(staged.file.take(), &staged.path)
            .map_err(|e| StoreError::io(format!("fdatasync of body {}", staged.hash), e))?;
        if self.options.fsync {
            self.dir_sync.sync(|| self.sync_bodies_dir())?;
        }
        Ok(staged.hash)
    }

    /// Makes the directory entries of renamed bodies durable (fsync of
    /// `bodies/`, the one directory every body is in, through its open
    /// handle). Called by the committer once per batch and, through
    /// `dir_sync`, for bodies written outside it, before the metadata
    /// commit that references them.
    pub(crate) fn sync_bodies_dir(&self) -> StoreResult<()> {
        if !self.options.fsync {
            return Ok(());
        }
        self.bodies_dir_handle
            .sync_all()
            .map_err(|e| StoreError::io(format!("fsyncing directory {}", self.bodies_dir.display()), e))
    }

    /// Those of `hashes` that have no file here.
    pub(crate) fn absent(&self, hashes: impl IntoIterator<Item = BodyHash>) -> Vec<BodyHash> {
        hashes.into_iter().filter(|h| !self.body_path(h).exists()).collect()
    }

    /// Reads a body, checking it against its name (bit rot or a bug would
    /// otherwise go out to a client silently).
    pub(crate) fn read_body(&self, hash: &BodyHash) -> StoreResult<Vec<u8>> {
        let path = self.body_path(hash);
        let bytes = fs::read(&path).map_err(|e| unreadable(hash, &path, e))?;
        if BodyHash::of(&bytes) != *hash {
            return Err(damaged(hash, &path));
        }
        Ok(bytes)
    }

    /// Opens a body for reading in pieces, after the same check as
    /// [`Self::read_body`], made through a 64 KiB buffer: a large body is
    /// never held in memory. The check reads the file once more than the
    /// sending will (from the page cache, as a rule), so that a damaged
    /// body is refused before any of it goes out.
    pub(crate) fn open_body(&self, hash: &BodyHash) -> StoreResult<BodyFile> {
        use sha2::Digest;
        let path = self.body_path(hash);
        let mut file = File::open(&path).map_err(|e| unreadable(hash, &path, e))?;
        let mut digest = sha2::Sha256::new();
        let mut buf = vec![0u8; 64 * 1024];
        let mut len = 0u64;
        loop {
            let n = match file.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(unreadable(hash, &path, e)),
            };
            digest.update(&buf[..n]);
            len += n as u64;
        }
        if BodyHash(digest.finalize().into()) != *hash {
            return Err(damaged(hash, &path));
        }
        file.seek(io::SeekFrom::Start(0)).map_err(|e| unreadable(hash, &path, e))?;
        Ok(BodyFile { file, len })
    }

    /// Unlinks bodies whose last reference was removed by a commit that has
    /// already returned. Skips any that an accept in flight may reference or
    /// that a later commit referenced again. Failures are only logged: an
    /// unreferenced file left behind is removed by the next recovery (or,
    /// in a cluster replica, by the garbage collection).
    pub(crate) fn unlink_freed(&self, freed: &[BodyHash]) {
        if freed.is_empty() {
            return;
        }
        let still_referenced = |hash: &BodyHash| -> StoreResult<bool> {
            let txn = self.db.begin_read().map_err(|e| db_err("beginning read", e))?;
            let table = txn.open_table(BODIES).map_err(|e| db_err("opening bodies", e))?;
            let hit = table.get(&hash.0).map_err(|e| db_err("reading bodies", e))?.is_some();
            Ok(hit)
        };
        self.unlink_unreferenced(freed, still_referenced, |_| true);
    }

    /// Unlinks those of `hashes` that `referenced` says nothing references,
    /// that no accept has in flight, and whose file `removable` accepts.
    /// Returns how many went. Failures are only logged (the file stays).
    fn unlink_unreferenced(
        &self,
        hashes: &[BodyHash],
        referenced: impl Fn(&BodyHash) -> StoreResult<bool>,
        mut removable: impl FnMut(&std::path::Path) -> bool,
    ) -> usize {
        // Holding the in-flight lock across the check and the unlink keeps a
        // new accept of the same content from registering in between.
        let in_flight = lock_map(&self.in_flight);
        let mut removed = 0;
        for hash in hashes {
            if in_flight.contains_key(hash) {
                continue;
            }
            match referenced(hash) {
                Ok(false) => {}
                Ok(true) => continue,
                Err(e) => {
                    tracing::warn!(%hash, error = %e, "cannot check body before unlinking; left in place");
                    continue;
                }
            }
            let path = self.body_path(hash);
            if !removable(&path) {
                continue;
            }
            match fs::remove_file(&path) {
                Ok(()) => removed += 1,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => tracing::warn!(%hash, error = %e, "cannot unlink unreferenced body; left in place"),
            }
        }
        removed
    }

    /// See [`crate::LocalStore::collect_garbage`].
    pub(crate) fn collect_garbage(&self, written_before: SystemTime) -> StoreResult<GarbageReport> {
        let mut report = GarbageReport::default();
        let old = |path: &std::path::Path| -> StoreResult<Option<bool>> {
            match fs::symlink_metadata(path) {
                Ok(m) if m.is_file() => {
                    let written = m
                        .modified()
                        .map_err(|e| StoreError::io(format!("reading the age of {}", path.display()), e))?;
                    Ok(Some(written < written_before))
                }
                Ok(_) => Ok(None),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(StoreError::io(format!("reading the age of {}", path.display()), e)),
            }
        };
        // Candidates, without holding anything: listing every body file
        // takes a while. Each is checked again below, under the locks.
        let mut candidates = Vec::new();
        {
            let txn = self.db.begin_read().map_err(|e| db_err("beginning read", e))?;
            let bodies = txn.open_table(BODIES).map_err(|e| db_err("opening bodies", e))?;
            for file in fs::read_dir(&self.bodies_dir).map_err(|e| StoreError::io("listing bodies/", e))? {
                let file = file.map_err(|e| StoreError::io("listing bodies/", e))?;
                // Anything not named like a body is not ours to remove.
                let Some(hash) = file.file_name().to_str().and_then(BodyHash::from_hex) else { continue };
                if bodies.get(&hash.0).map_err(|e| db_err("reading bodies", e))?.is_some() {
                    continue;
                }
                match old(&file.path())? {
                    Some(true) => candidates.push(hash),
                    Some(false) => report.young += 1,
                    None => {}
                }
            }
        }
        for batch in candidates.chunks(GC_BATCH) {
            // A write transaction, never committed: it holds the lock every
            // change of the references takes, so no apply or accept can
            // reference a file between the check and its unlink.
            let txn = self.db.begin_write().map_err(|e| db_err("beginning write", e))?;
            {
                let bodies = txn.open_table(BODIES).map_err(|e| db_err("opening bodies", e))?;
                let referenced = |hash: &BodyHash| -> StoreResult<bool> {
                    Ok(bodies.get(&hash.0).map_err(|e| db_err("reading bodies", e))?.is_some())
                };
                // Again under the in-flight lock: a put of the same content
                // since the listing made the file young.
                let mut young = 0;
                report.removed += self.unlink_unreferenced(batch, referenced, |path| match old(path) {
                    Ok(Some(true)) => true,
                    Ok(Some(false)) => {
                        young += 1;
                        false
                    }
                    Ok(None) => false,
                    Err(e) => {
                        tracing::warn!(error = %e, "unreferenced body left in place");
                        false
                    }
                });
                report.young += young;
            }
            txn.abort().map_err(|e| db_err("ending the garbage collection's transaction", e))?;
        }
        Ok(report)
    }
}

/// Candidates of the garbage collection checked and unlinked under one
/// hold of the write lock (applies wait meanwhile).
const GC_BATCH: usize = 256;

/// What a garbage collection of body files did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct GarbageReport {
    /// Unreferenced body files last written before the cutoff: removed.
    pub removed: usize,
    /// Unreferenced body files written since: kept (an accept may still
    /// come to reference them).
    pub young: usize,
}

/// Sets a file's modification time to now.
/// A body file that could not be opened or read: gone is permanent, any
/// other failure is the disk's.
fn unreadable(hash: &BodyHash, path: &std::path::Path, e: io::Error) -> StoreError {
    if e.kind() == io::ErrorKind::NotFound {
        StoreError::Permanent(format!("no body {hash}"))
    } else {
        StoreError::io(format!("reading body {}", path.display()), e)
    }
}

/// Bit rot or a bug would otherwise go out to a client silently.
fn damaged(hash: &BodyHash, path: &std::path::Path) -> StoreError {
    tracing::error!(%hash, path = %path.display(), "body file does not match its hash");
    StoreError::Internal(format!("body {hash} is damaged"))
}

fn touch(path: &std::path::Path) -> io::Result<()> {
    File::open(path)?.set_modified(SystemTime::now())
}

/// Writes a new file (never an existing one). Durability comes later, from
/// [`Inner::sync_body`]; a crash before the metadata commit leaves at most an
/// unreferenced (maybe torn) file, which recovery removes at the next open
/// before anything can reference it.
fn write_new(path: &std::path::Path, body: &[u8]) -> io::Result<File> {
    let mut f = OpenOptions::new().write(true).create_new(true).open(path)?;
    f.write_all(body)?;
    Ok(f)
}
