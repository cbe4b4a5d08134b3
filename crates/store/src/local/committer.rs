//! Group commit: one thread owns the metadata write path.
//!
//! Why: a durable redb commit costs one or more fsyncs, and the body
//! directories need an fsync too. Doing that per message caps throughput at
//! a few hundred messages per second; doing it once for every message that
//! arrived while the previous commit was running lets the cost be shared.
//! Callers write their own bodies in parallel, hand a small request to this
//! thread, fdatasync their body and wait for the answer; the thread drains
//! all pending requests, fsyncs the body directory once (while the callers'
//! fdatasyncs run), waits for those, applies the batch in one transaction,
//! commits once and answers everyone. Nothing is answered before the commit
//! returned, and nothing is committed before its body is durable.

use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;

use tokio::sync::oneshot;

use super::bodies::StagedBody;
use super::state::{MailTables, NewMessage, Recorded};
use super::Inner;
use crate::tables::{db_err, duplicate_error, unix_now};
use crate::{Address, Committed, QueueId, ResendKey, StoreError, StoreResult};

/// Upper bound of messages per transaction, so one commit stays short and
/// the callers at the head of the batch are not kept waiting too long.
const MAX_BATCH: usize = 512;

/// One accepted message whose body is already durable.
pub(crate) struct AcceptJob {
    pub queue_id: QueueId,
    pub return_path: Option<String>,
    pub local: Vec<Address>,
    pub remote: Vec<String>,
    pub resend: Option<ResendKey>,
    pub body: StagedBody,
    /// The caller's fdatasync of the body, running while this thread
    /// fsyncs the directory; the commit waits for it.
    pub data_synced: mpsc::Receiver<std::io::Result<()>>,
    pub reply: oneshot::Sender<StoreResult<Committed>>,
}

pub(crate) struct Committer {
    tx: Option<mpsc::Sender<AcceptJob>>,
    thread: Option<JoinHandle<()>>,
}

impl Committer {
    pub(crate) fn start(inner: Arc<Inner>) -> StoreResult<Self> {
        let (tx, rx) = mpsc::channel::<AcceptJob>();
        let thread = std::thread::Builder::new()
            .name("hamail-committer".into())
            .spawn(move || run(&inner, rx))
            .map_err(|e| StoreError::io("starting the committer thread", e))?;
        Ok(Committer { tx: Some(tx), thread: Some(thread) })
    }

    pub(crate) fn submit(&self, job: AcceptJob) -> StoreResult<()> {
        let tx = self.tx.as_ref().ok_or_else(|| StoreError::Unavailable("store is closing".into()))?;
        tx.send(job).map_err(|_| StoreError::Unavailable("the committer has stopped".into()))
    }
}

impl Drop for Committer {
    fn drop(&mut self) {
        // Closing the channel ends the thread after its current batch;
        // joining makes sure the database is closed when the store is gone,
        // so that it can be reopened at once.
        self.tx.take();
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                tracing::error!("the committer thread panicked");
            }
        }
    }
}

fn run(inner: &Inner, rx: mpsc::Receiver<AcceptJob>) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        // Directory entries first (one fsync for the batch), then the
        // bodies' own fdatasyncs, which ran meanwhile in the callers.
        if let Err(e) = inner.sync_bodies_dir() {
            tracing::error!(error = %e, messages = batch.len(), "fsync of bodies/ failed: batch refused");
            for job in batch {
                let _ = job.reply.send(Err(duplicate_error(&e)));
            }
            continue;
        }
        let mut durable = Vec::with_capacity(batch.len());
        for job in batch {
            match job.data_synced.recv() {
                Ok(Ok(())) => durable.push(job),
                Ok(Err(e)) => {
                    let e = StoreError::io(format!("fdatasync of body {}", job.body.hash), e);
                    tracing::error!(error = %e, "message refused: its body is not durable");
                    let _ = job.reply.send(Err(e));
                }
                Err(_) => {
                    let _ = job.reply.send(Err(StoreError::Internal("body sync was abandoned".into())));
                }
            }
        }
        let batch = durable;
        if batch.is_empty() {
            continue;
        }
        match commit_batch(inner, &batch) {
            Ok(results) => {
                // A recognised resend's own body is referenced by nothing.
                let mut freed = Vec::new();
                for (job, result) in batch.into_iter().zip(results) {
                    if let Ok(c) = &result {
                        if c.body() != job.body.hash {
                            freed.push(job.body.hash);
                        }
                    }
                    // A caller that went away does not care; the message is
                    // committed anyway (a duplicate at worst, never a loss).
                    let _ = job.reply.send(result);
                    // `job` (its in-flight registration) goes here, before
                    // the unlink below, which skips bodies still in flight.
                }
                inner.unlink_freed(&freed);
            }
            Err(e) => {
                tracing::error!(error = %e, messages = batch.len(), "group commit failed");
                for job in batch {
                    let _ = job.reply.send(Err(duplicate_error(&e)));
                }
            }
        }
    }
}

/// Applies a batch in one transaction; per-message rejections are returned
/// in the vector, a failure of the transaction itself as the outer error.
fn commit_batch(inner: &Inner, batch: &[AcceptJob]) -> StoreResult<Vec<StoreResult<Committed>>> {
    let now = unix_now();
    let txn = inner.begin_write()?;
    let mut results = Vec::with_capacity(batch.len());
    {
        let mut tables = MailTables::open(&txn)?;
        for job in batch {
            let recorded = tables.insert_message(&NewMessage {
                queue_id: job.queue_id,
                return_path: &job.return_path,
                local: &job.local,
                remote: &job.remote,
                body: job.body.hash,
                size: job.body.size,
                at: now,
                resend: job.resend,
            })?;
            results.push(match recorded {
                Recorded::New => Ok(Committed::new(job.queue_id, job.body.hash, job.body.size)),
                Recorded::ResendOf { original, body, size } => {
                    Ok(Committed::resend(job.queue_id, body, size, original))
                }
                Recorded::Again => Err(StoreError::Permanent(format!("queue id {} already used", job.queue_id))),
            });
        }
        tables.finish()?;
    }
    txn.commit().map_err(|e| db_err("committing accepted messages", e))?;
    Ok(results)
}
