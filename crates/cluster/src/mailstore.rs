//! The replicated mail store: [`MailStore`] for a data node of a cluster.
//!
//! Role: accept a message so that no single node's death loses it or
//! delivers it twice, without a shared disk. A message is two things:
//!
//! - its **body**, a content-addressed file (SHA-256). Bodies travel
//!   *beside* the Raft log ([`Request::PutBody`]), once per data node:
//!   putting megabytes into the log would multiply its size and the cost of
//!   every snapshot, and the witness would have to store them.
//! - its **metadata** ([`MailChange::Accept`]: recipients, queue id, body
//!   hash), committed through the Raft log ([`Command::Mail`]), so every
//!   node applies the same accepts, deletions and dequeues in the same
//!   order and allocates the same maildrop entry ids.
//!
//! The order is what makes it safe. `accept` first makes the body durable
//! here and on the other data nodes (each answers `PutBody` after its
//! fsync), waits until at least [`Replication::required_copies`] hold it,
//! and only then proposes the metadata; only the committed metadata yields
//! the [`Committed`] that lets SMTP answer `250`. So an acknowledged message
//! has its body on at least that many nodes and its metadata on a majority:
//! whichever node takes over serves it. A proposal whose outcome is unknown
//! (the leader died mid-way) is checked after a linearizable barrier and,
//! if absent, proposed again: an `Accept` is idempotent by queue id, so a
//! retry can never deliver twice.
//!
//! A data node that was down or cut off gets the metadata from the log (or
//! a snapshot) when it comes back; the bodies it missed are then fetched
//! from the other data nodes ([`Request::GetBody`]) by a repair task,
//! woken when an applied `Accept` names a body that is not here and every
//! [`Replication::repair_interval`]. `verify` re-hashes every body and
//! fetches the damaged and missing ones the same way.
//!
//! Garbage: copies of accepts that failed or never committed are
//! referenced by nothing. A replica cannot tell them at start from copies
//! whose accept is committed in its log but not applied yet (its applies
//! are not fsynced), so recovery keeps them; the repair task removes them
//! every [`Replication::gc_interval`], once certainly garbage: the node
//! first passes a linearizable barrier, so it has applied every entry
//! committed before the pass began, and only files last written more than
//! [`GC_MIN_AGE`] before that are removed, far longer than an accept may
//! take between copying a body and its commit; the store checks each one
//! under the lock that adds references ([`LocalStore::collect_garbage`]).
//!
//! [`LocalStore::collect_garbage`]: hamail_store::LocalStore::collect_garbage
//!
//! Reads: `mailbox` and `queue` first pass a linearizable barrier
//! ([`ClusterNode::linearizable`]), so a node that just took over serves
//! exactly what was committed; a body is read locally, or fetched from a
//! peer if this node lacks it (yet).

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, Instant, SystemTime};

use hamail_store::Address;
use hamail_store::{
    Body, BodyFile, BodyHash, Committed, EntryId, GarbageReport, Incoming, MailChange, MailStore, MailboxEntry,
    MemoryGate, QueueEntry, QueueId, QueueItem, QueueOp, Spool, StoreError, StoreResult,
};
use serde::{Deserialize, Serialize};
use tokio::task::JoinSet;

use crate::error::ClusterError;
use crate::node::{store_error, ClusterNode};
use crate::rpc::{MailHealth, Request, Response, WriteError, Written};
use crate::types::{Command, CommandResult, NodeId, Role};

/// Applied-accept notices kept for the repair task before it falls back
/// to a full scan (bounds the memory of a node whose task is slow).
const MAX_PENDING_NOTICES: usize = 100_000;

/// How long a data node that did not take a body copy is skipped.
const PEER_RETRY_AFTER: Duration = Duration::from_secs(2);

/// Bodies up to this size are hashed on the async thread.
const INLINE_HASH_MAX: usize = 64 * 1024;

/// How long the repair task lets applied-accept notices gather.
const NOTICE_GATHER: Duration = Duration::from_millis(20);

/// Bodies fetched at the same time by the repair task.
const PARALLEL_FETCHES: usize = 8;

/// How often a data node removes the body files nothing references. Rare:
/// they only cost disk space, and a pass lists every body file.
pub const GC_INTERVAL: Duration = Duration::from_secs(3600);

/// The least time since a body file was last written (or put again) before
/// the garbage collection may remove it. An accept counts on the copies it
/// made for at most one write timeout (the accept as a whole, copies and
/// commit retries, is bounded by it: `ClusterNode::bounded`): seconds. An hour
/// is far beyond that, and leftovers are rare, so waiting costs little.
/// (Longer if those timeouts are set so long that it would not be: see
/// `gc_min_age`.)
pub const GC_MIN_AGE: Duration = Duration::from_secs(3600);

/// How many copies make a message safe, and the patience for them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Replication {
    /// Durable copies of a body (this node's included) needed before a
    /// message is accepted. `None` (the default): every live data node, and
    /// at least one — a cluster keeps taking mail while a data node is down,
    /// and reports it (degraded). Every data node that answers within
    /// [`Self::put_timeout`] gets a copy anyway; fewer copies than data
    /// nodes is counted as a degraded accept ([`MailHealth`]). Fewer than
    /// this refuses the message with a temporary error (SMTP 451): the
    /// client retries, nothing is lost.
    pub required_copies: Option<usize>,
    /// How long `accept` waits for the other data nodes to store a body.
    pub put_timeout: Duration,
    /// How long fetching a body from one peer may take.
    pub fetch_timeout: Duration,
    /// How often the repair task checks for missing bodies (it is also
    /// woken at once when an applied accept names a body not here).
    pub repair_interval: Duration,
    /// How often it removes unreferenced body files ([`GC_INTERVAL`]); the
    /// first pass comes one interval after the start.
    pub gc_interval: Duration,
}

impl Default for Replication {
    fn default() -> Self {
        Replication {
            required_copies: None,
            put_timeout: Duration::from_secs(2),
            fetch_timeout: Duration::from_secs(10),
            // A full scan of the referenced bodies: not too often. Applied
            // accepts whose body is absent wake the task at once anyway.
            repair_interval: Duration::from_secs(10),
            gc_interval: GC_INTERVAL,
        }
    }
}

impl Replication {
    /// The copies needed before a message is accepted.
    pub fn min_copies(&self) -> usize {
        self.required_copies.unwrap_or(1).max(1)
    }
}

/// The data nodes a body's copies are for (see
/// [`ReplicatedStore::copy_targets`]).
struct CopyTargets {
    /// Data nodes in the cluster, this one counted.
    data_nodes: usize,
    /// The peers to send a copy to now.
    contact: Vec<(NodeId, crate::types::NodeInfo)>,
}

/// What a verification of one node's bodies found and repaired.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RepairReport {
    pub node: NodeId,
    /// Bodies re-hashed.
    pub checked: usize,
    /// Bodies whose file did not match its hash (removed, then fetched).
    pub damaged: Vec<BodyHash>,
    /// Referenced bodies that were not here.
    pub missing: Vec<BodyHash>,
    /// Damaged or missing bodies fetched again from a peer.
    pub repaired: Vec<BodyHash>,
    /// Damaged or missing bodies no peer could provide (yet).
    pub unrepaired: Vec<BodyHash>,
}

/// What the state machine tells the repair task, and the node's mail
/// counters (shown in [`crate::rpc::NodeStatus::mail`]).
#[derive(Default)]
pub(crate) struct MailEvents {
    /// Whether a [`ReplicatedStore`] runs on this node (a witness, or a
    /// data node not serving mail, keeps no notices).
    watching: AtomicBool,
    /// Bodies of accepts applied since the repair task last looked.
    applied: Mutex<Vec<BodyHash>>,
    /// Look at every referenced body (a snapshot was installed, or the
    /// notices overflowed).
    rescan: AtomicBool,
    wake: tokio::sync::Notify,
    degraded_accepts: AtomicU64,
    pub(crate) refused_unavailable: AtomicU64,
    bodies_missing: AtomicU64,
    bodies_fetched: AtomicU64,
    bodies_collected: AtomicU64,
}

impl MailEvents {
    /// Accepts naming these bodies were applied.
    pub(crate) fn applied(&self, bodies: Vec<BodyHash>) {
        if bodies.is_empty() || !self.watching.load(Ordering::Relaxed) {
            return;
        }
        {
            let mut pending = self.applied.lock().unwrap_or_else(PoisonError::into_inner);
            if pending.len() + bodies.len() > MAX_PENDING_NOTICES {
                pending.clear();
                self.rescan.store(true, Ordering::Relaxed);
            } else {
                pending.extend(bodies);
            }
        }
        self.wake.notify_one();
    }

    /// The mail was replaced wholesale (snapshot installed).
    pub(crate) fn rescan(&self) {
        self.rescan.store(true, Ordering::Relaxed);
        self.wake.notify_one();
    }

    fn take(&self) -> (Vec<BodyHash>, bool) {
        let pending = std::mem::take(&mut *self.applied.lock().unwrap_or_else(PoisonError::into_inner));
        (pending, self.rescan.swap(false, Ordering::Relaxed))
    }

    pub(crate) fn health(&self) -> MailHealth {
        MailHealth {
            bodies_missing: self.bodies_missing.load(Ordering::Relaxed),
            degraded_accepts: self.degraded_accepts.load(Ordering::Relaxed),
            refused_unavailable: self.refused_unavailable.load(Ordering::Relaxed),
            bodies_fetched: self.bodies_fetched.load(Ordering::Relaxed),
            bodies_collected: self.bodies_collected.load(Ordering::Relaxed),
        }
    }
}

/// [`MailStore`] of a data node. See the module documentation.
pub struct ReplicatedStore {
    node: Arc<ClusterNode>,
    replication: Replication,
    /// The body repair task (stopped when the store is dropped).
    repair: tokio::task::JoinHandle<()>,
    /// Data nodes that failed to take a copy, skipped until then.
    unreachable: std::sync::Mutex<std::collections::HashMap<NodeId, Instant>>,
    /// What a body spooled to a file may take in memory while it is read
    /// for the other data nodes; `None`: no limit.
    memory: Option<Arc<dyn MemoryGate>>,
}

impl Drop for ReplicatedStore {
    fn drop(&mut self) {
        self.repair.abort();
    }
}

impl ReplicatedStore {
    /// The mail store of `node`, which must be a data node, and starts its
    /// body repair task (must be called within a Tokio runtime). The task
    /// holds no strong reference on the node: it ends with the store, or
    /// once the node is dropped.
    pub fn new(node: Arc<ClusterNode>, replication: Replication) -> Result<ReplicatedStore, ClusterError> {
        if node.info().role != Role::Data {
            return Err(ClusterError::Config(format!(
                "node {} is a {}: only data nodes hold mail",
                node.id(),
                node.info().role
            )));
        }
        let events = node.mail_events();
        events.watching.store(true, Ordering::Relaxed);
        // Bodies may be missing from before this start (a crash, a restore).
        events.rescan.store(true, Ordering::Relaxed);
        let repair = tokio::spawn(repair_loop(Arc::downgrade(&node), events, replication.clone()));
        Ok(ReplicatedStore { node, replication, repair, unreachable: Default::default(), memory: None })
    }

    /// Reads of spooled bodies for the other data nodes reserve their
    /// memory from `gate`; when it is spent the accept fails with
    /// [`StoreError::Busy`] (the client retries) instead of the node
    /// growing without bound.
    pub fn with_memory_gate(mut self, gate: Arc<dyn MemoryGate>) -> Self {
        self.memory = Some(gate);
        self
    }

    pub fn node(&self) -> &Arc<ClusterNode> {
        &self.node
    }

    pub fn replication(&self) -> &Replication {
        &self.replication
    }

    /// Removes a queue entry once it was delivered or bounced (on every
    /// node). Not an error if it was not queued.
    pub async fn dequeue(&self, queue_id: QueueId) -> StoreResult<()> {
        self.propose(MailChange::Dequeue { queue_id }).await
    }

    /// Re-hashes every body of this node (damaged files are removed), then
    /// fetches each damaged or missing body from another data node.
    pub async fn verify_cluster(&self) -> StoreResult<RepairReport> {
        verify_and_repair(&self.node, self.replication.fetch_timeout).await
    }

    /// [`Self::verify_cluster`] on every data node (this one included, each
    /// asked by a [`Request::Verify`]), in node id order.
    pub async fn verify_everywhere(&self) -> Vec<(NodeId, Result<RepairReport, String>)> {
        let mut out = vec![(self.node.id(), self.verify_cluster().await.map_err(|e| e.to_string()))];
        for (id, info) in self.node.data_peers() {
            let answer = self.node.transport().call(id, &info, Request::Verify).await;
            out.push((
                id,
                match answer {
                    Ok(Response::Verify(r)) => r,
                    Ok(other) => Err(format!("node {id} answered {other:?}")),
                    Err(e) => Err(e.to_string()),
                },
            ));
        }
        out.sort_by_key(|(id, _)| *id);
        out
    }

    /// One pass of the repair task now: fetches every body referenced here
    /// but missing. Returns how many are still missing.
    pub async fn repair_now(&self) -> StoreResult<usize> {
        repair_missing(&self.node, &self.replication).await
    }

    /// One pass of the garbage collection now (see the module
    /// documentation): fails, removing nothing, if this node cannot confirm
    /// that it has applied what the cluster committed.
    pub async fn collect_garbage_now(&self) -> StoreResult<GarbageReport> {
        collect_garbage(&self.node, &self.replication).await
    }

    /// Where a body's copies go: the number of data nodes (this one
    /// counted) and the peers to contact. A peer that just failed to
    /// answer is skipped for a while instead of costing every message a
    /// connect timeout (measured: 1 s per message with a powered-off
    /// node). It gets its copies later: its repair task fetches what its
    /// log references.
    fn copy_targets(&self) -> CopyTargets {
        let peers = self.node.data_peers();
        let data_nodes = peers.len() + 1;
        let now = Instant::now();
        let down = self.unreachable.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let skipped = |id: &NodeId| down.get(id).is_some_and(|until| *until > now);
        let contact = peers.into_iter().filter(|(id, _)| !skipped(id) && !self.node.peer_silent(*id)).collect();
        CopyTargets { data_nodes, contact }
    }

    /// Copies the body to the peers of `targets`; `Ok((copies, data
    /// nodes))` (this node's copy counted: the caller writes it meanwhile)
    /// once every peer answered or timed out, if enough of them hold it
    /// durably. `body`: `None` when it was not read for peers (there were
    /// none to contact).
    async fn replicate(
        &self,
        hash: BodyHash,
        body: Option<&Arc<Vec<u8>>>,
        targets: CopyTargets,
    ) -> StoreResult<(usize, usize)> {
        let CopyTargets { data_nodes, contact } = targets;
        let needed = self.replication.min_copies();
        let mut puts = JoinSet::new();
        for (id, info) in contact {
            let Some(body) = body else { break };
            let transport = self.node.transport().clone();
            let request = Request::PutBody { hash, data: body.to_vec() };
            let within = self.replication.put_timeout;
            puts.spawn(async move { (id, tokio::time::timeout(within, transport.call(id, &info, request)).await) });
        }
        let mut copies = 1;
        while let Some(done) = puts.join_next().await {
            let (id, answer) = match done {
                Ok(v) => v,
                Err(e) => {
                    tracing::warn!(error = %e, "a body copy task failed");
                    continue;
                }
            };
            let reached = matches!(answer, Ok(Ok(_)));
            {
                let mut down = self.unreachable.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                if reached {
                    down.remove(&id);
                } else {
                    down.insert(id, Instant::now() + PEER_RETRY_AFTER);
                }
            }
            match answer {
                Ok(Ok(Response::PutBody(Ok(())))) => copies += 1,
                Ok(Ok(Response::PutBody(Err(why)))) => tracing::warn!(peer = %id, %hash, %why, "peer refused a body"),
                Ok(Ok(other)) => tracing::warn!(peer = %id, %hash, answer = ?other, "peer answered PutBody wrongly"),
                Ok(Err(e)) => tracing::warn!(peer = %id, %hash, error = %e, "body not copied"),
                Err(_) => tracing::warn!(
                    peer = %id,
                    %hash,
                    "body not copied within {} ms",
                    self.replication.put_timeout.as_millis()
                ),
            }
        }
        if copies < needed {
            return Err(StoreError::Temporary(format!(
                "the message body is durable on {copies} of {data_nodes} data nodes, {needed} needed: try again later"
            )));
        }
        Ok((copies, data_nodes))
    }

    /// A spooled body read into memory for the `peers` data nodes that
    /// will be contacted (each copy goes as one `PutBody`), within the
    /// memory gate: its size once for the bytes and once per peer for its
    /// request. `None` without peers to contact (nothing to read).
    async fn read_for_peers(
        &self,
        file: &hamail_store::StagedFile,
        peers: usize,
    ) -> StoreResult<(Option<Arc<Vec<u8>>>, Option<Box<dyn Send + Sync>>)> {
        if peers == 0 {
            return Ok((None, None));
        }
        let size = usize::try_from(file.size()).unwrap_or(usize::MAX);
        let reserved = match &self.memory {
            Some(gate) => Some(gate.reserve(size.saturating_mul(peers + 1)).ok_or_else(|| {
                StoreError::Busy(format!("no memory left to copy a body of {size} octets to the other data nodes"))
            })?),
            None => None,
        };
        let bytes = tokio::fs::read(file.path())
            .await
            .map_err(|e| StoreError::io(format!("reading the spooled body {}", file.hash()), e))?;
        Ok((Some(Arc::new(bytes)), reserved))
    }

    /// Commits an `Accept` through the log. An unknown outcome is checked
    /// after a linearizable barrier and the (idempotent) accept proposed
    /// again if it is not there.
    async fn commit_accept(&self, change: MailChange, queue_id: QueueId) -> StoreResult<Option<u64>> {
        let store = self.node.store();
        loop {
            match self.node.write_logged(Command::Mail(change.clone())).await {
                Ok(Written { result: CommandResult::Done, index }) => return Ok(Some(index)),
                Ok(Written { result: CommandResult::Refused(msg), .. }) => return Err(StoreError::Permanent(msg)),
                Ok(Written { result, .. }) => {
                    return Err(StoreError::Internal(format!("an accept answered {result:?}")))
                }
                Err(WriteError::Unknown(why)) => {
                    tracing::warn!(%queue_id, %why, "accept outcome unknown: checking");
                    if self.node.linearizable().await.is_ok() && store.committed(queue_id).await?.is_some() {
                        return Ok(None);
                    }
                    // Not committed as of the barrier: propose again (until
                    // the accept's bound, `ClusterNode::bounded`). Should
                    // the first proposal commit after all, the second one is
                    // a no-op (same queue id).
                }
                Err(e) => return Err(store_error(e)),
            }
        }
    }

    /// The proof of a committed accept, once this node applied it. A
    /// forwarded write is applied on the leader first; this node applies
    /// it as soon as it learns the new commit index (the next
    /// AppendEntries). With the entry's log `index`, that apply is watched
    /// for in the Raft metrics and the store is looked up once (looking up
    /// at every change of the metrics took ~2 trips to a blocking thread
    /// per message on a follower under load); without it (an accept found
    /// committed after an unknown outcome), at every change. Then, or if
    /// it takes longer than a few heartbeats, a linearizable barrier (a
    /// round trip to the leader and a heartbeat round there).
    /// With the proof: whether the body it names is here.
    async fn applied_here(&self, queue_id: QueueId, index: Option<u64>) -> StoreResult<(Committed, bool)> {
        let store = self.node.store();
        let mut metrics = self.node.raft().metrics();
        let deadline = Instant::now() + Duration::from_millis(self.node.timing().heartbeat_ms.max(1) * 4);
        loop {
            let applied = metrics.borrow_and_update().last_applied.map(|id| id.index);
            if index.is_none_or(|i| applied >= Some(i)) {
                if let Some(found) = store.committed_with_body(queue_id)? {
                    return Ok(found);
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            // A timeout or a closed channel: look once more, then fall back.
            let _ = tokio::time::timeout(left, metrics.changed()).await;
        }
        self.read_barrier().await?;
        store
            .committed_with_body(queue_id)?
            .ok_or_else(|| StoreError::Internal(format!("message {queue_id} was committed but is not applied here")))
    }

    async fn propose(&self, change: MailChange) -> StoreResult<()> {
        match self.node.write(Command::Mail(change)).await {
            Ok(CommandResult::Refused(msg)) => Err(StoreError::Permanent(msg)),
            Ok(_) => Ok(()),
            Err(e) => Err(store_error(e)),
        }
    }

    async fn read_barrier(&self) -> StoreResult<()> {
        self.node.linearizable().await.map_err(store_error)
    }

    async fn accept_within(&self, mut msg: Incoming) -> StoreResult<Committed> {
        msg.dedup_recipients();
        if msg.local.is_empty() && msg.remote.is_empty() {
            return Err(StoreError::Permanent("message has no recipients".into()));
        }
        let store = self.node.store();
        let queue_id = msg.queue_id;
        let size = msg.body.len();
        let targets = self.copy_targets();
        let (hash, bytes, _reserved) = match &msg.body {
            // A small body is hashed here (microseconds): a trip to a
            // blocking thread would cost more than the hash, in thread
            // switches.
            Body::Bytes(bytes) if bytes.len() <= INLINE_HASH_MAX => (BodyHash::of(bytes), Some(bytes.clone()), None),
            Body::Bytes(bytes) => {
                let body = bytes.clone();
                let hash = tokio::task::spawn_blocking(move || BodyHash::of(&body))
                    .await
                    .map_err(|e| StoreError::Internal(format!("hashing the body: {e}")))?;
                (hash, Some(bytes.clone()), None)
            }
            Body::Staged(file) => {
                let (bytes, reserved) = self.read_for_peers(file, targets.contact.len()).await?;
                (file.hash(), bytes, reserved)
            }
        };
        // Without the bytes in memory (a spooled body, no peers), no
        // deletion of an identical body may unlink this node's copy until
        // the accept is applied here: it could not be put again. (With
        // them, it is put again below if need be; a pin would also keep a
        // recognised resend's own copy until the garbage collection.)
        let _pin = bytes.is_none().then(|| store.pin_body(hash));
        // This node's copy and the others' are written at the same time:
        // the accept waits for one fsync round, not two.
        let started = Instant::now();
        let here = async {
            match msg.body {
                Body::Bytes(bytes) => store.put_hashed_body(hash, bytes).await,
                Body::Staged(file) => store.put_staged_body(file).await,
            }
        };
        let (here, there) = tokio::join!(here, self.replicate(hash, bytes.as_ref(), targets));
        let copied = started.elapsed();
        here?;
        let (copies, data_nodes) = there?;
        let change = MailChange::Accept {
            queue_id,
            return_path: msg.return_path,
            local: msg.local,
            remote: msg.remote,
            body: hash,
            size,
            at: unix_now(),
            resend: msg.resend,
        };
        let index = self.commit_accept(change, queue_id).await?;
        let committed_at = started.elapsed();
        if copies < data_nodes {
            self.node.mail_events().degraded_accepts.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%queue_id, copies, data_nodes, "message accepted with fewer copies than data nodes");
        }
        let (committed, body_here) = self.applied_here(queue_id, index).await?;
        tracing::debug!(
            %queue_id,
            copied_us = copied.as_micros() as u64,
            committed_us = committed_at.as_micros() as u64,
            applied_us = started.elapsed().as_micros() as u64,
            "accept timings"
        );
        // A deletion freeing an identical body between our put and the
        // apply could have unlinked it: the bytes are put again when we
        // have them (else the pin kept it). (Not for a recognised resend:
        // its own copy was freed on purpose.)
        if committed.resend_of().is_none() && !body_here {
            match bytes {
                Some(bytes) => {
                    store.put_hashed_body(hash, bytes).await?;
                }
                None => {
                    tracing::warn!(%queue_id, %hash, "accepted body not here after its apply; left to the repair task")
                }
            }
        }
        Ok(committed)
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

#[async_trait::async_trait]
impl MailStore for ReplicatedStore {
    fn spool(&self, in_memory: usize) -> Spool {
        self.node.store().spool(in_memory)
    }

    /// Local: queue ids carry the node id in their top bits, so they are
    /// unique in the cluster without a round trip.
    async fn next_queue_id(&self) -> StoreResult<QueueId> {
        self.node.store().next_queue_id().await
    }

    async fn accept(&self, msg: Incoming) -> StoreResult<Committed> {
        let what = format!("message {}", msg.queue_id);
        self.node.bounded(&what, self.accept_within(msg)).await
    }

    async fn mailbox(&self, user: &Address) -> StoreResult<Vec<MailboxEntry>> {
        self.node.bounded(&format!("the maildrop of {user}"), self.read_barrier()).await?;
        self.node.store().mailbox(user).await
    }

    async fn body(&self, hash: &BodyHash) -> StoreResult<Arc<Vec<u8>>> {
        match self.node.store().body(hash).await {
            Ok(body) => Ok(body),
            Err(local) => match fetch_body(&self.node, hash, self.replication.fetch_timeout).await {
                Ok(body) => Ok(body),
                Err(why) => Err(unreadable_anywhere(hash, &local, &why)),
            },
        }
    }

    /// The local file; if it is missing or damaged, a peer's copy, which
    /// [`fetch_body`] makes durable here: then that file.
    async fn open_body(&self, hash: &BodyHash) -> StoreResult<BodyFile> {
        let store = self.node.store();
        match store.open_body(hash).await {
            Ok(file) => Ok(file),
            Err(local) => match fetch_body(&self.node, hash, self.replication.fetch_timeout).await {
                Ok(_) => store.open_body(hash).await,
                Err(why) => Err(unreadable_anywhere(hash, &local, &why)),
            },
        }
    }

    async fn delete(&self, user: &Address, ids: &[EntryId]) -> StoreResult<()> {
        if ids.is_empty() {
            return Ok(());
        }
        let what = format!("deleting {} messages of {user}", ids.len());
        self.node.bounded(&what, self.propose(MailChange::Delete { user: user.clone(), ids: ids.to_vec() })).await
    }

    async fn queue(&self) -> StoreResult<Vec<QueueEntry>> {
        self.read_barrier().await?;
        self.node.store().queue().await
    }

    async fn queue_items(&self) -> StoreResult<Vec<QueueItem>> {
        self.read_barrier().await?;
        self.node.store().queue_items().await
    }

    async fn queue_change(&self, queue_id: QueueId, op: QueueOp) -> StoreResult<()> {
        // Committed through the log: every node applies it, and the node
        // that takes the queue over sees it (a recorded delivery is never
        // sent again).
        self.propose(MailChange::Queue { queue_id, op }).await
    }
}

/// A body that neither this node nor any peer could give: temporary, as a
/// peer may come back.
fn unreadable_anywhere(hash: &BodyHash, local: &StoreError, peers: &str) -> StoreError {
    StoreError::Temporary(format!("body {hash} is not readable here ({local}) and no peer sent it: {peers}"))
}

/// Fetches `hash` from the other data nodes (each in turn), checks it and
/// stores it durably here.
pub(crate) async fn fetch_body(node: &ClusterNode, hash: &BodyHash, within: Duration) -> Result<Arc<Vec<u8>>, String> {
    let mut failures = Vec::new();
    for (id, info) in node.data_peers() {
        let answer = tokio::time::timeout(within, node.transport().call(id, &info, Request::GetBody(*hash))).await;
        match answer {
            Ok(Ok(Response::GetBody(Ok(data)))) => {
                if BodyHash::of(&data) != *hash {
                    failures.push(format!("node {id} sent a damaged copy"));
                    continue;
                }
                let data = Arc::new(data);
                node.store()
                    .put_hashed_body(*hash, data.clone())
                    .await
                    .map_err(|e| format!("storing body {hash}: {e}"))?;
                node.mail_events().bodies_fetched.fetch_add(1, Ordering::Relaxed);
                tracing::info!(%hash, from = %id, "fetched a missing body");
                return Ok(data);
            }
            Ok(Ok(Response::GetBody(Err(why)))) => failures.push(format!("node {id}: {why}")),
            Ok(Ok(other)) => failures.push(format!("node {id} answered {other:?}")),
            Ok(Err(e)) => failures.push(e.to_string()),
            Err(_) => failures.push(format!("node {id}: no answer within {} ms", within.as_millis())),
        }
    }
    if failures.is_empty() {
        failures.push("no other data node".into());
    }
    Err(failures.join("; "))
}

/// Fetches every body referenced here but missing; returns how many are
/// still missing, and records it for the status.
async fn repair_missing(node: &ClusterNode, replication: &Replication) -> StoreResult<usize> {
    let missing = node.store().missing_bodies().await?;
    let left = fetch_all(node, missing, replication.fetch_timeout).await;
    node.mail_events().bodies_missing.store(left as u64, Ordering::Relaxed);
    Ok(left)
}

/// Fetches these bodies, a few at a time; returns how many failed.
async fn fetch_all(node: &ClusterNode, hashes: Vec<BodyHash>, within: Duration) -> usize {
    let mut failed = 0;
    for chunk in hashes.chunks(PARALLEL_FETCHES) {
        let results = futures_join(chunk.iter().map(|h| fetch_body(node, h, within))).await;
        for (hash, r) in chunk.iter().zip(results) {
            if let Err(why) = r {
                tracing::warn!(%hash, %why, "missing body not fetched yet");
                failed += 1;
            }
        }
    }
    failed
}

/// Runs futures concurrently (on this task) and collects their outputs in
/// order.
async fn futures_join<F: std::future::Future>(futures: impl Iterator<Item = F>) -> Vec<F::Output> {
    let mut futures: Vec<_> = futures.map(|f| Some(Box::pin(f))).collect();
    let mut outputs: Vec<Option<F::Output>> = futures.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (slot, out) in futures.iter_mut().zip(outputs.iter_mut()) {
            if let Some(f) = slot {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => {
                        *out = Some(v);
                        *slot = None;
                    }
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    outputs.into_iter().flatten().collect()
}

/// The node's side of `verify`: re-hash, then fetch what is damaged or
/// missing.
pub(crate) async fn verify_and_repair(node: &ClusterNode, within: Duration) -> StoreResult<RepairReport> {
    let verified = node.store().verify().await?;
    let todo: BTreeSet<BodyHash> = verified.damaged.iter().chain(verified.missing.iter()).copied().collect();
    let mut report = RepairReport {
        node: node.id(),
        checked: verified.checked,
        damaged: verified.damaged,
        missing: verified.missing,
        ..RepairReport::default()
    };
    for hash in todo {
        match fetch_body(node, &hash, within).await {
            Ok(_) => report.repaired.push(hash),
            Err(why) => {
                tracing::error!(%hash, %why, "damaged or missing body could not be repaired");
                report.unrepaired.push(hash);
            }
        }
    }
    node.mail_events().bodies_missing.store(report.unrepaired.len() as u64, Ordering::Relaxed);
    Ok(report)
}

/// The least age of a body file that [`collect_garbage`] removes:
/// [`GC_MIN_AGE`], or ten times an accept's patience if that is longer.
fn gc_min_age(node: &ClusterNode, replication: &Replication) -> Duration {
    let patience = replication.put_timeout + node.timing().write_timeout() * 3;
    GC_MIN_AGE.max(patience * 10)
}

/// Removes the body files nothing references that are certainly garbage
/// (see the module documentation).
async fn collect_garbage(node: &ClusterNode, replication: &Replication) -> StoreResult<GarbageReport> {
    // Before the barrier: every accept that counted on a copy written
    // before this time was committed before the barrier, or never will be.
    let written_before = SystemTime::now()
        .checked_sub(gc_min_age(node, replication))
        .ok_or_else(|| StoreError::Internal("the clock is before the garbage collection's age".into()))?;
    // Every entry committed so far is applied here: a body one of them
    // references is referenced in the store.
    node.linearizable().await.map_err(store_error)?;
    let report = node.store().collect_garbage(written_before).await?;
    node.mail_events().bodies_collected.fetch_add(report.removed as u64, Ordering::Relaxed);
    if report.removed > 0 {
        tracing::info!(removed = report.removed, kept_young = report.young, "unreferenced body files removed");
    } else {
        tracing::debug!(kept_young = report.young, "no unreferenced body file to remove");
    }
    Ok(report)
}

/// What woke the repair task.
enum Wake {
    /// The periodic full check for missing bodies.
    Tick,
    /// Applied accepts (or a snapshot) to look at.
    Notice,
    /// Time for a garbage collection.
    Gc,
}

/// The repair task: on each applied accept whose body is not here, and on
/// every tick, fetches the missing bodies from peers; now and then removes
/// unreferenced ones.
async fn repair_loop(node: Weak<ClusterNode>, events: Arc<MailEvents>, replication: Replication) {
    let mut tick = tokio::time::interval(replication.repair_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut gc =
        tokio::time::interval_at(tokio::time::Instant::now() + replication.gc_interval, replication.gc_interval);
    gc.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let wake = tokio::select! {
            _ = tick.tick() => Wake::Tick,
            _ = events.wake.notified() => Wake::Notice,
            _ = gc.tick() => Wake::Gc,
        };
        if let Wake::Notice = wake {
            // Let the notices of a burst gather: one look for many applies
            // instead of a trip to a blocking thread per apply, on every
            // node, for bodies that are nearly always here already.
            tokio::time::sleep(NOTICE_GATHER).await;
        }
        let Some(node) = node.upgrade() else { return };
        if node.raft().metrics().borrow().state == openraft::ServerState::Shutdown {
            return;
        }
        if let Wake::Gc = wake {
            // Pending notices are looked at on the next wake.
            if let Err(e) = collect_garbage(&node, &replication).await {
                tracing::warn!(error = %e, "removing unreferenced bodies failed; trying again at the next pass");
            }
            continue;
        }
        let full = matches!(wake, Wake::Tick);
        let (applied, rescan) = events.take();
        if full || rescan {
            if let Err(e) = repair_missing(&node, &replication).await {
                tracing::warn!(error = %e, "looking for missing bodies failed");
                if rescan {
                    events.rescan.store(true, Ordering::Relaxed);
                }
            }
            continue;
        }
        let applied: Vec<BodyHash> = applied.into_iter().collect::<BTreeSet<_>>().into_iter().collect();
        let missing = match node.store().absent_bodies(applied).await {
            Ok(missing) => missing,
            Err(e) => {
                tracing::warn!(error = %e, "checking applied bodies failed; the next full pass looks again");
                Vec::new()
            }
        };
        if !missing.is_empty() {
            let failed = fetch_all(&node, missing, replication.fetch_timeout).await;
            if failed > 0 {
                events.bodies_missing.fetch_add(failed as u64, Ordering::Relaxed);
            }
        }
    }
}
