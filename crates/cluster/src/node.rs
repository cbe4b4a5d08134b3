//! A cluster node: the openraft [`Raft`] of this process, with its log, its
//! state machine (the mail store's directory) and its network.
//!
//! Role: the one entry point the server uses for the replicated state —
//! propose a change from any node ([`ClusterNode::write`], forwarded to the
//! leader as Raft requires, paper §8 "Client interaction"), make a read
//! linearizable ([`ClusterNode::linearizable`]), change the membership, report
//! status, and serve the requests other nodes send ([`Handler`]): Raft's,
//! forwarded writes and read indexes, and the mail bodies that travel
//! beside the log (`PutBody`, `GetBody`, `Verify`: see
//! [`crate::mailstore`]; a witness refuses them, it holds no mail).
//!
//! Writes and retries: a write proposed while there is no leader, or to a
//! node that turns out not to be the leader, is retried until
//! [`Timing::write_timeout_ms`] — only when it is known *not* to have been
//! appended to a leader's log (openraft answers `ForwardToLeader` both before
//! appending and when it truncates an uncommitted entry, and a committed entry
//! is never truncated, paper §5.4). Once a write may have been appended, a
//! failure is reported as [`WriteError::Unknown`], never retried: retrying
//! could apply it twice.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hamail_store::LocalStore;
use openraft::error::{CheckIsLeaderError, ClientWriteError, InitializeError, RaftError};
use openraft::raft::AppendEntriesResponse;
use openraft::{ChangeMembers, Config, ServerState, SnapshotPolicy};

use crate::election::{node_agent, ElectionTiming, NodeAgent, PreVote, PreVoteAnswer};
use crate::error::ClusterError;
use crate::log_store::LogStore;
use crate::mailstore::{verify_and_repair, MailEvents, Replication};
use crate::network::{Network, PeerContacts};
use crate::rpc::{
    Handler, JoinError, NodeStatus, PeerProgress, Request, Response, Transport, TransportError, WriteError, Written,
};
use crate::state_machine::StateMachine;
use crate::types::{Command, CommandResult, NodeId, NodeInfo, Raft, Role};

/// How long a new member may take to catch up (receive the snapshot and
/// the log) before it is made a voter.
const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(60);

/// The Raft timings and log-compaction policy of a node.
///
/// Raft needs `heartbeat << election timeout << mean time between
/// failures` (paper §5.6); the election timeout is randomised in
/// `[election_min_ms, election_max_ms)` so that split votes are rare (§5.2).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Timing {
    /// How often the leader sends heartbeats (AppendEntries).
    pub heartbeat_ms: u64,
    /// A voter that hears no leader for the leader lease (`election_max_ms`)
    /// plus a random time in `[election_min_ms, election_max_ms)` asks the
    /// others for a pre-vote, and starts an election if a quorum grants it
    /// (see [`crate::election`]).
    pub election_min_ms: u64,
    pub election_max_ms: u64,
    /// How long `write` and `linearizable` keep trying (waiting for a leader,
    /// for a commit) before giving up; also the bound of a client's whole
    /// change or read through the cluster ([`ClusterNode::bounded`]).
    pub write_timeout_ms: u64,
    /// Failover groups: lease, fencing and monitor timings.
    pub groups: crate::failover::GroupTiming,
    /// A snapshot is built after this many log entries since the last one
    /// (plus a per-node offset: [`Timing::snapshot_threshold`]).
    pub snapshot_every: u64,
    /// Log entries kept behind the last snapshot (a follower that lags by
    /// less catches up from the log; by more, it gets the snapshot).
    pub logs_kept_after_snapshot: u64,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            heartbeat_ms: 50,
            election_min_ms: 150,
            election_max_ms: 300,
            write_timeout_ms: 5000,
            // A snapshot exports the whole state (every mailbox and message
            // record) and fsyncs the store: at 1,000 a node under load built
            // one every few seconds, each larger than the last. The log
            // entries themselves are small (a few hundred bytes): 20,000 of
            // them are a few MB, and a node that was away for a burst of
            // that size catches up from the log, not from a snapshot.
            snapshot_every: 10_000,
            logs_kept_after_snapshot: 10_000,
            groups: crate::failover::GroupTiming::default(),
        }
    }
}

impl Timing {
    pub fn write_timeout(&self) -> Duration {
        Duration::from_millis(self.write_timeout_ms)
    }

    /// The snapshot threshold of node `id`: `snapshot_every`, plus a tenth
    /// of it for each step of the id modulo 5. The nodes of a cluster commit
    /// the same entries at nearly the same moment: with one threshold they
    /// would all build their snapshot (export, encode, fsync) at once, and
    /// at the same moment as whatever the leader was busy committing.
    pub fn snapshot_threshold(&self, id: NodeId) -> u64 {
        self.snapshot_every.saturating_add(self.snapshot_every / 10 * (id.0 % 5))
    }

    fn raft_config(&self, id: NodeId) -> Result<Config, ClusterError> {
        let config = Config {
            cluster_name: "hamail".into(),
            heartbeat_interval: self.heartbeat_ms,
            election_timeout_min: self.election_min_ms,
            election_timeout_max: self.election_max_ms,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(self.snapshot_threshold(id)),
            max_in_snapshot_log_to_keep: self.logs_kept_after_snapshot,
            // Elections are started by the node's pre-vote agent
            // (crate::election), never by openraft's own timer.
            enable_elect: false,
            ..Config::default()
        };
        config.validate().map_err(|e| ClusterError::Config(e.to_string()))
    }

    /// The pre-vote agent's timings: openraft's leader lease is
    /// `election_timeout_max` (openraft `EngineConfig`).
    fn election(&self) -> ElectionTiming {
        ElectionTiming {
            lease: Duration::from_millis(self.election_max_ms),
            min: Duration::from_millis(self.election_min_ms),
            max: Duration::from_millis(self.election_max_ms),
        }
    }
}

/// The result of sending a request to the leader.
enum Forwarded {
    /// It answered.
    Answer(Response),
    /// It certainly did not get the request (unreachable): safe to retry.
    NotDelivered,
    /// It may have got it, the answer was lost.
    Lost(String),
}

/// One member of the cluster. See the module documentation.
pub struct ClusterNode {
    id: NodeId,
    info: NodeInfo,
    raft: Raft,
    store: Arc<LocalStore>,
    transport: Arc<dyn Transport>,
    timing: Timing,
    contacts: PeerContacts,
    /// Our handle on the log, to know when openraft's tasks released theirs.
    log: LogStore,
    /// Serialises membership changes made through this node.
    membership_changes: tokio::sync::Mutex<()>,
    /// Applied accepts and mail counters, shared with the state machine
    /// and the node's [`crate::mailstore::ReplicatedStore`].
    mail: Arc<MailEvents>,
    /// The applied failover groups (from the state machine).
    pub(crate) group_table: tokio::sync::watch::Receiver<crate::groups::GroupTable>,
    /// Applied ban changes (from the state machine).
    bans: tokio::sync::broadcast::Sender<crate::types::BanChange>,
    /// This node's quorum lease, and the lease requests it received.
    pub(crate) leases: crate::failover::LeaseBook,
    /// The group agent and manager tasks, once started.
    pub(crate) group_tasks: std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>,
    /// What this node can tell a new leader about older terms.
    pub(crate) testimony: Arc<crate::testimony::Testimony>,
    /// The data nodes the leader found silent at our last lease renewal,
    /// and when we heard it.
    silent_peers: std::sync::Mutex<Option<(Instant, Vec<NodeId>)>>,
    /// The pre-vote agent: when to campaign, whom to grant a pre-vote.
    pub(crate) elections: NodeAgent,
    /// The task that runs it.
    election_task: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl ClusterNode {
    /// Starts the node: opens `<dir>/raft-log.redb` and the state machine
    /// (over `store`, snapshot file `<dir>/snapshot.bin`) and starts Raft.
    /// A node that was never initialised nor added to a cluster waits (as a
    /// learner without a leader) until one of those happens.
    pub async fn start(
        id: NodeId,
        info: NodeInfo,
        dir: &Path,
        store: Arc<LocalStore>,
        transport: Arc<dyn Transport>,
        timing: Timing,
    ) -> Result<Arc<ClusterNode>, ClusterError> {
        let config = Arc::new(timing.raft_config(id)?);
        let mut log_store = LogStore::open(&dir.join("raft-log.redb"))?;
        forget_leadership(id, &mut log_store).await?;
        let state_machine = StateMachine::open(store.clone(), dir).await?;
        let mail = state_machine.mail_events();
        let group_table = state_machine.group_watch();
        let bans = state_machine.ban_changes();
        let network = Network::new(transport.clone(), Duration::from_millis(2 * timing.election_max_ms));
        let contacts = network.contacts();
        let log = log_store.clone();
        let raft = Raft::new(id, config, network, log_store, state_machine)
            .await
            .map_err(|e| ClusterError::Internal(format!("starting raft: {e}")))?;
        tracing::info!(%id, node = %info, "cluster node started");
        let testimony = Arc::new(crate::testimony::Testimony::new());
        tokio::spawn(watch_terms(id, raft.metrics(), Arc::downgrade(&testimony)));
        let elections = node_agent(id, timing.election());
        let node = Arc::new(ClusterNode {
            id,
            info,
            raft,
            store,
            transport,
            timing,
            contacts,
            log,
            membership_changes: tokio::sync::Mutex::new(()),
            mail,
            group_table,
            bans,
            leases: crate::failover::LeaseBook::default(),
            group_tasks: std::sync::Mutex::new(Vec::new()),
            testimony,
            silent_peers: std::sync::Mutex::new(None),
            elections,
            election_task: std::sync::Mutex::new(None),
        });
        let tick = Duration::from_millis(node.timing.heartbeat_ms.max(1));
        let task = tokio::spawn(crate::election::campaign(Arc::downgrade(&node), tick));
        *node.election_task.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(task);
        Ok(node)
    }

    pub fn id(&self) -> NodeId {
        self.id
    }

    /// Login bans set or lifted anywhere in the cluster, as this node
    /// applies them (from now on).
    pub fn ban_changes(&self) -> tokio::sync::broadcast::Receiver<crate::types::BanChange> {
        self.bans.subscribe()
    }

    pub fn info(&self) -> &NodeInfo {
        &self.info
    }

    /// The openraft handle (metrics, waits).
    pub fn raft(&self) -> &Raft {
        &self.raft
    }

    /// The local store the replicated state is applied to.
    pub fn store(&self) -> &Arc<LocalStore> {
        &self.store
    }

    pub fn timing(&self) -> &Timing {
        &self.timing
    }

    /// The transport this node talks to the others with.
    pub fn transport(&self) -> &Arc<dyn Transport> {
        &self.transport
    }

    pub(crate) fn mail_events(&self) -> Arc<MailEvents> {
        self.mail.clone()
    }

    /// The other data members (they hold mail bodies), by id.
    pub fn data_peers(&self) -> Vec<(NodeId, NodeInfo)> {
        let m = self.raft.metrics().borrow().membership_config.clone();
        m.nodes().filter(|(id, n)| **id != self.id && n.role == Role::Data).map(|(id, n)| (*id, n.clone())).collect()
    }

    /// Makes this node a one-member cluster (`hamail cluster init`).
    /// Does nothing if it is already part of a cluster.
    pub async fn initialize(&self) -> Result<(), ClusterError> {
        let initialized = self.raft.is_initialized().await.map_err(|e| ClusterError::Internal(e.to_string()))?;
        if initialized {
            return Ok(());
        }
        let members = BTreeMap::from([(self.id, self.info.clone())]);
        match self.raft.initialize(members).await {
            Ok(()) => Ok(()),
            // Raced with a log arriving from a leader: already in a cluster.
            Err(RaftError::APIError(InitializeError::NotAllowed(_))) => Ok(()),
            Err(RaftError::APIError(e)) => Err(ClusterError::Config(e.to_string())),
            Err(RaftError::Fatal(e)) => Err(ClusterError::Internal(e.to_string())),
        }
    }

    /// Proposes `cmd` and waits until it is committed and applied here (if
    /// this node leads) or on the leader (forwarded). See the module
    /// documentation for what is retried.
    pub async fn write(&self, cmd: Command) -> Result<CommandResult, WriteError> {
        self.write_logged(cmd).await.map(|w| w.result)
    }

    /// [`Self::write`], with the log index of the committed entry.
    pub async fn write_logged(&self, cmd: Command) -> Result<Written, WriteError> {
        let deadline = Instant::now() + self.timing.write_timeout();
        let mut metrics = self.raft.metrics();
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(WriteError::NoLeader);
            }
            match tokio::time::timeout(remaining, self.raft.client_write(cmd.clone())).await {
                Err(_) => {
                    return Err(WriteError::Unknown(format!(
                        "proposed but not committed within {} ms",
                        self.timing.write_timeout_ms
                    )))
                }
                Ok(Ok(resp)) => return Ok(Written::from(resp)),
                Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f)))) => {
                    if let (Some(leader), Some(node)) = (f.leader_id, f.leader_node) {
                        if leader != self.id {
                            match self.forward(leader, &node, Request::Write(cmd.clone()), remaining).await {
                                Forwarded::Answer(Response::Write(Ok(r))) => return Ok(r),
                                Forwarded::Answer(Response::Write(Err(WriteError::NoLeader)))
                                | Forwarded::NotDelivered => {}
                                Forwarded::Answer(Response::Write(Err(e))) => return Err(e),
                                Forwarded::Answer(other) => {
                                    return Err(WriteError::Other(format!("leader {leader} answered {other:?}")))
                                }
                                Forwarded::Lost(why) => return Err(WriteError::Unknown(why)),
                            }
                        }
                    }
                }
                Ok(Err(RaftError::APIError(e))) => return Err(WriteError::Other(e.to_string())),
                Ok(Err(RaftError::Fatal(e))) => return Err(WriteError::Other(e.to_string())),
            }
            self.wait_change(&mut metrics, deadline).await?;
        }
    }

    /// A write forwarded by another node: proposed here, never forwarded
    /// again (no loops); `NoLeader` tells the proposer to look again.
    async fn write_here(&self, cmd: Command) -> Result<Written, WriteError> {
        match tokio::time::timeout(self.timing.write_timeout(), self.raft.client_write(cmd)).await {
            Err(_) => Err(WriteError::Unknown(format!(
                "proposed but not committed within {} ms",
                self.timing.write_timeout_ms
            ))),
            Ok(Ok(resp)) => Ok(Written::from(resp)),
            Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_)))) => Err(WriteError::NoLeader),
            Ok(Err(RaftError::APIError(e))) => Err(WriteError::Other(e.to_string())),
            Ok(Err(RaftError::Fatal(e))) => Err(WriteError::Other(e.to_string())),
        }
    }

    /// Waits until this node's state machine reflects every write committed
    /// before the call: then a local read is linearizable.
    ///
    /// On the leader: openraft's read index (`get_read_log_id`: a heartbeat
    /// round confirms that no newer leader exists, openraft docs
    /// `docs::protocol::read`), then waits to have applied up to it. On a
    /// follower: asks the leader for that read index ([`Request::ReadIndex`];
    /// the leader confirms its leadership before answering), then waits to
    /// have applied up to it locally. Any entry at or below the index is
    /// committed and identical on every node, so the local state then
    /// includes every write acknowledged before the call.
    pub async fn linearizable(&self) -> Result<(), WriteError> {
        let deadline = Instant::now() + self.timing.write_timeout();
        let mut metrics = self.raft.metrics();
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(WriteError::NoLeader);
            }
            match tokio::time::timeout(remaining, self.raft.get_read_log_id()).await {
                Err(_) => return Err(WriteError::NoLeader),
                Ok(Ok((read, _))) => return self.wait_applied(read.map(|l| l.index), deadline).await,
                Ok(Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f)))) => {
                    if let (Some(leader), Some(node)) = (f.leader_id, f.leader_node) {
                        if leader != self.id {
                            match self.forward(leader, &node, Request::ReadIndex, remaining).await {
                                Forwarded::Answer(Response::ReadIndex(Ok(index))) => {
                                    return self.wait_applied(index, deadline).await
                                }
                                Forwarded::Answer(Response::ReadIndex(Err(WriteError::NoLeader)))
                                | Forwarded::NotDelivered
                                | Forwarded::Lost(_) => {} // a read can always be retried
                                Forwarded::Answer(Response::ReadIndex(Err(e))) => return Err(e),
                                Forwarded::Answer(other) => {
                                    return Err(WriteError::Other(format!("leader {leader} answered {other:?}")))
                                }
                            }
                        }
                    }
                }
                Ok(Err(RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(_)))) => {}
                Ok(Err(RaftError::Fatal(e))) => return Err(WriteError::Other(e.to_string())),
            }
            self.wait_change(&mut metrics, deadline).await?;
        }
    }

    /// `work` (a client's change or read through the cluster: a message's
    /// acceptance, a login, a maildrop's deletions) given up after the write
    /// timeout with [`hamail_store::StoreError::Unavailable`], so that a
    /// node cut off from a quorum answers its clients with a temporary
    /// error (SMTP `451 4.3.0`, POP3 `-ERR [SYS/TEMP]`) instead of holding
    /// them until the quorum comes back. A proposal made meanwhile may
    /// still commit after the answer: the client's resend of the same
    /// message is recognised (RFC 1047 resend window) and delivered once.
    /// Refusals for want of the cluster are counted
    /// ([`crate::rpc::MailHealth::refused_unavailable`]).
    pub(crate) async fn bounded<T>(
        &self,
        what: &str,
        work: impl std::future::Future<Output = hamail_store::StoreResult<T>>,
    ) -> hamail_store::StoreResult<T> {
        use hamail_store::StoreError;
        let limit = self.timing.write_timeout();
        let result = match tokio::time::timeout(limit, work).await {
            Ok(result) => result,
            Err(_) => Err(StoreError::Unavailable(format!(
                "{what}: the cluster did not answer within {} ms (no quorum reachable from this node?)",
                limit.as_millis()
            ))),
        };
        if let Err(e @ StoreError::Unavailable(_)) = &result {
            self.mail.refused_unavailable.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::warn!(error = %e, "refused: the cluster is unavailable");
        }
        result
    }

    /// Renews this node's quorum lease (see [`crate::failover`]): confirms,
    /// by a heartbeat round to a quorum started after `t0`, that the leader
    /// this node follows (or this node) still leads; then the lease runs
    /// from `t0`. Returns whether it was renewed.
    pub(crate) async fn renew_lease(&self, within: Duration) -> bool {
        let t0 = Instant::now();
        let m = self.raft.metrics().borrow().clone();
        let ok = match m.current_leader {
            Some(l) if l == self.id => {
                matches!(tokio::time::timeout(within, self.raft.get_read_log_id()).await, Ok(Ok(_)))
            }
            Some(l) => match m.membership_config.nodes().find(|(id, _)| **id == l).map(|(_, n)| n.clone()) {
                Some(node) => match self.forward(l, &node, Request::RenewLease, within).await {
                    Forwarded::Answer(Response::RenewLease(Ok(silent))) => {
                        *self.silent_peers.lock().unwrap_or_else(std::sync::PoisonError::into_inner) =
                            Some((Instant::now(), silent));
                        true
                    }
                    _ => false,
                },
                None => false,
            },
            None => false,
        };
        if ok {
            self.leases.renewed(t0);
        }
        ok
    }

    /// The leader's side of [`Request::RenewLease`].
    async fn renew_lease_here(&self) -> Result<Vec<NodeId>, WriteError> {
        self.read_index_here().await?;
        let members: Vec<NodeId> = self.raft.metrics().borrow().membership_config.nodes().map(|(id, _)| *id).collect();
        Ok(members.into_iter().filter(|id| *id != self.id && self.peer_silent(*id)).collect())
    }

    /// This node's answer to [`Request::Testimony`].
    fn testimony_here(&self, term: u64) -> Option<crate::rpc::TestimonyAnswer> {
        self.testimony.testify(term).map(|told| crate::failover::testimony_answer(&told, Instant::now()))
    }

    /// The leader's side of [`Request::ReadIndex`].
    async fn read_index_here(&self) -> Result<Option<u64>, WriteError> {
        match tokio::time::timeout(self.timing.write_timeout(), self.raft.get_read_log_id()).await {
            Err(_) => Err(WriteError::NoLeader),
            Ok(Ok((read, _))) => Ok(read.map(|l| l.index)),
            Ok(Err(RaftError::APIError(_))) => Err(WriteError::NoLeader),
            Ok(Err(RaftError::Fatal(e))) => Err(WriteError::Other(e.to_string())),
        }
    }

    async fn wait_applied(&self, index: Option<u64>, deadline: Instant) -> Result<(), WriteError> {
        let Some(index) = index else { return Ok(()) };
        let remaining = deadline.saturating_duration_since(Instant::now());
        self.raft
            .wait(Some(remaining))
            .applied_index_at_least(Some(index), "linearizable read")
            .await
            .map(|_| ())
            .map_err(|e| WriteError::Other(format!("not caught up with the leader: {e}")))
    }

    /// Waits for news (a metrics change: new term, leader, commit) or a
    /// heartbeat-scaled step, whichever first; not past `deadline`.
    async fn wait_change(
        &self,
        metrics: &mut tokio::sync::watch::Receiver<openraft::RaftMetrics<NodeId, NodeInfo>>,
        deadline: Instant,
    ) -> Result<(), WriteError> {
        let step = Duration::from_millis(self.timing.heartbeat_ms.max(1) * 2);
        let wait = step.min(deadline.saturating_duration_since(Instant::now()));
        match tokio::time::timeout(wait, metrics.changed()).await {
            Ok(Err(_)) => Err(WriteError::Other("the node is shutting down".into())),
            _ => Ok(()),
        }
    }

    async fn forward(&self, leader: NodeId, node: &NodeInfo, request: Request, within: Duration) -> Forwarded {
        match tokio::time::timeout(within, self.transport.call(leader, node, request)).await {
            Err(_) => Forwarded::Lost(format!("no answer from leader {leader} within {} ms", within.as_millis())),
            Ok(Ok(resp)) => Forwarded::Answer(resp),
            Ok(Err(TransportError::Unreachable { .. })) => Forwarded::NotDelivered,
            Ok(Err(e @ TransportError::Failed { .. })) => Forwarded::Lost(e.to_string()),
        }
    }

    /// Allocates a node id (a replicated counter: never reused).
    pub async fn allocate_node_id(&self) -> Result<NodeId, ClusterError> {
        match self.write(Command::AllocateNodeId).await {
            Ok(CommandResult::NodeId(id)) => Ok(id),
            Ok(other) => Err(ClusterError::Internal(format!("AllocateNodeId answered {other:?}"))),
            Err(e) => Err(write_error(e)),
        }
    }

    /// Allocates an id and adds the node with it as a voting member (data
    /// and witness nodes both vote); returns the id. Must run on the
    /// leader, and the node must already be running with the id this
    /// returns (it is the next one of the replicated counter). A join, where
    /// the node learns its id from the answer, uses
    /// [`Self::allocate_node_id`], starts the node, then
    /// [`Self::add_member_with_id`].
    pub async fn add_member(&self, info: NodeInfo) -> Result<NodeId, ClusterError> {
        let id = self.allocate_node_id().await?;
        self.add_member_with_id(id, info).await?;
        Ok(id)
    }

    /// Adds node `id` as a learner, waits until it has caught up with the
    /// log, then makes it a voter (openraft's two-step, joint-consensus
    /// membership change, paper §6). Must run on the leader.
    pub async fn add_member_with_id(&self, id: NodeId, info: NodeInfo) -> Result<(), ClusterError> {
        tracing::info!(%id, node = %info, "adding a cluster member");
        // One membership change at a time (Raft §6 allows one joint
        // configuration in flight); joins that arrive together wait here,
        // and a change still committing is waited for, not failed.
        let _one_at_a_time = self.membership_changes.lock().await;
        let deadline = std::time::Instant::now() + CATCH_UP_TIMEOUT;
        loop {
            let r = self.raft.add_learner(id, info.clone(), true).await;
            match r {
                Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(
                    openraft::error::ChangeMembershipError::InProgress(_),
                ))) if std::time::Instant::now() < deadline => {
                    tokio::time::sleep(std::time::Duration::from_millis(self.timing.heartbeat_ms)).await;
                }
                other => {
                    other.map_err(membership_error)?;
                    break;
                }
            }
        }
        loop {
            let r = self.raft.change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([id])), false).await;
            match r {
                Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(
                    openraft::error::ChangeMembershipError::InProgress(_),
                ))) if std::time::Instant::now() < deadline => {
                    tokio::time::sleep(std::time::Duration::from_millis(self.timing.heartbeat_ms)).await;
                }
                other => {
                    other.map_err(membership_error)?;
                    return Ok(());
                }
            }
        }
    }

    /// Removes node `id` from the voters and from the cluster. Must run on
    /// the leader.
    pub async fn remove_member(&self, id: NodeId) -> Result<(), ClusterError> {
        tracing::info!(%id, "removing a cluster member");
        self.raft
            .change_membership(ChangeMembers::RemoveVoters(BTreeSet::from([id])), false)
            .await
            .map_err(membership_error)?;
        Ok(())
    }

    /// Whether `id` is in the current membership (voter or learner).
    pub fn is_member(&self, id: NodeId) -> bool {
        self.raft.metrics().borrow().membership_config.nodes().any(|(n, _)| *n == id)
    }

    /// Whether member `id` is down or cut off: bodies are not copied to it
    /// (a copy would only wait for its timeout), and its return makes group
    /// owners announce their addresses again. On the
    /// leader: it has not answered a Raft RPC for longer than two election
    /// timeouts. On a follower: the leader said so at our last lease
    /// renewal (a heartbeat or two ago).
    pub fn peer_silent(&self, id: NodeId) -> bool {
        if self.is_leader() {
            return self.contacts.silent_ms(id) > 2 * self.timing.election_max_ms;
        }
        let heard = self.silent_peers.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        heard.as_ref().is_some_and(|(at, silent)| {
            at.elapsed() < Duration::from_millis(2 * self.timing.election_max_ms) && silent.contains(&id)
        })
    }

    /// Whether this node has received a membership (a new node has not).
    pub fn knows_membership(&self) -> bool {
        self.raft.metrics().borrow().membership_config.nodes().next().is_some()
    }

    pub fn is_leader(&self) -> bool {
        self.raft.metrics().borrow().current_leader == Some(self.id)
    }

    /// The current leader and where it is, if known.
    pub fn leader(&self) -> Option<(NodeId, NodeInfo)> {
        let m = self.raft.metrics().borrow().clone();
        let leader = m.current_leader?;
        let info = m.membership_config.nodes().find(|(id, _)| **id == leader).map(|(_, n)| n.clone())?;
        Some((leader, info))
    }

    /// Builds a snapshot now and drops the log behind it, so that nodes
    /// that join later get the state from the snapshot. Used at `init`:
    /// the directory a node had before it became a cluster is in no log
    /// entry, only in the state (and so in snapshots).
    pub async fn compact(&self) -> Result<(), ClusterError> {
        let before = self.raft.metrics().borrow().snapshot.map(|l| l.index);
        self.raft.trigger().snapshot().await.map_err(|e| ClusterError::Internal(format!("snapshot: {e}")))?;
        let deadline = std::time::Duration::from_millis(self.timing.write_timeout_ms);
        let snap = self
            .raft
            .wait(Some(deadline))
            .metrics(|m| m.snapshot.map(|l| l.index) != before && m.snapshot.is_some(), "snapshot built")
            .await
            .map_err(|e| ClusterError::Internal(format!("waiting for the snapshot: {e}")))?
            .snapshot;
        if let Some(log_id) = snap {
            self.raft
                .trigger()
                .purge_log(log_id.index)
                .await
                .map_err(|e| ClusterError::Internal(format!("purge: {e}")))?;
        }
        Ok(())
    }

    /// This node's view of the cluster.
    pub fn status(&self) -> NodeStatus {
        let m = self.raft.metrics().borrow().clone();
        let state = match m.state {
            ServerState::Leader => "leader",
            ServerState::Follower => "follower",
            ServerState::Candidate => "candidate",
            ServerState::Learner => "learner",
            ServerState::Shutdown => "shutdown",
        };
        let members = m.membership_config.nodes().map(|(id, n)| (*id, n.clone())).collect();
        let mut replication = Vec::new();
        if let Some(rep) = &m.replication {
            for (peer, matched) in rep.iter() {
                if *peer == self.id {
                    continue;
                }
                let matched = matched.map(|l| l.index);
                let lag = m.last_log_index.map(|last| last.saturating_sub(matched.unwrap_or(0)));
                replication.push(PeerProgress {
                    id: *peer,
                    matched,
                    lag,
                    last_contact_ms: self.contacts.millis_since(*peer),
                });
            }
        }
        NodeStatus {
            id: self.id,
            role: self.info.role,
            state: state.into(),
            current_term: m.current_term,
            current_leader: m.current_leader,
            last_log_index: m.last_log_index,
            last_applied: m.last_applied.map(|l| l.index),
            members,
            replication,
            links: self.contacts.links(),
            mail: self.mail.health(),
        }
    }

    /// Stops Raft, and waits (up to 5 s) until openraft's background tasks
    /// have released the log: once the `ClusterNode` is dropped too, the log
    /// file is closed and the node can be started again in this process.
    /// (The state machine's handle on the store is released the same way.)
    pub async fn shutdown(&self) -> Result<(), ClusterError> {
        self.stop_group_tasks();
        if let Some(task) = self.election_task.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take() {
            task.abort();
        }
        self.raft.shutdown().await.map_err(|e| ClusterError::Internal(format!("shutting raft down: {e}")))?;
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.log.handles() > 1 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(())
    }
}

impl ClusterNode {
    /// Whether a request carrying `vote` comes from a leader this node
    /// accepts: a committed vote at least its own. Such a request counts as
    /// contact when it arrives, as openraft's own leader lease counts it
    /// (`VoteHandler::update_vote`), not only once its log write is done:
    /// on a loaded disk that write can take longer than the election
    /// timeout, and the node would campaign while its leader is alive.
    fn accepts_leader_vote(&self, vote: &crate::types::Vote) -> bool {
        vote.is_committed() && *vote >= self.raft.metrics().borrow().vote
    }

    /// A current leader's AppendEntries or InstallSnapshot arrived or was
    /// accepted.
    fn leader_contact(&self) {
        self.elections.lock().unwrap_or_else(std::sync::PoisonError::into_inner).leader_contact(Instant::now());
    }

    /// [`Request::PreVote`]: granted by the rules of [`crate::election`].
    fn pre_vote_here(&self, peer: NodeId, req: PreVote) -> PreVoteAnswer {
        let (term, leading_with_quorum) = {
            let m = self.raft.metrics();
            let m = m.borrow();
            let lease = self.timing.election_max_ms;
            (m.current_term, m.state == ServerState::Leader && m.millis_since_quorum_ack.is_some_and(|ms| ms < lease))
        };
        let own = self.raft.data_metrics().borrow().last_log;
        let verdict = self.elections.lock().unwrap_or_else(std::sync::PoisonError::into_inner).judge(
            Instant::now(),
            req.last_log_id.as_ref(),
            own.as_ref(),
            leading_with_quorum,
        );
        match verdict {
            Ok(()) => tracing::info!(%peer, candidate_term = req.term, term, "pre-vote granted"),
            Err(reason) => tracing::debug!(%peer, candidate_term = req.term, term, ?reason, "pre-vote refused"),
        }
        PreVoteAnswer { granted: verdict.is_ok(), term }
    }

    /// [`Request::PutBody`]: checks the hash, writes the body durably,
    /// answers after the fsync. A witness holds no mail.
    async fn put_body_here(&self, hash: hamail_store::BodyHash, data: Vec<u8>) -> Result<(), String> {
        if self.info.role != Role::Data {
            return Err(format!("node {} is a witness: it holds no mail", self.id));
        }
        // `put_body` hashes the body (once, off the async threads) and stores
        // it under that name: a body that does not match the claimed hash is
        // refused, and its file, referenced by nothing, goes at the next start.
        match self.store.put_body(Arc::new(data)).await {
            Ok(stored) if stored == hash => Ok(()),
            Ok(stored) => Err(format!("the body does not match its hash {hash} (it is {stored})")),
            Err(e) => Err(e.to_string()),
        }
    }

    /// [`Request::GetBody`]: the body if it is here and sound.
    async fn get_body_here(&self, hash: hamail_store::BodyHash) -> Result<Vec<u8>, String> {
        if self.info.role != Role::Data {
            return Err(format!("node {} is a witness: it holds no mail", self.id));
        }
        // One read: a body that is not here is the read's own error.
        let body = hamail_store::MailStore::body(self.store.as_ref(), &hash)
            .await
            .map_err(|e| format!("node {}: {e}", self.id))?;
        Ok(Arc::try_unwrap(body).unwrap_or_else(|shared| shared.as_ref().clone()))
    }
}

/// A failed write as the store's error (what a mail session tells its
/// client: no leader or an unknown outcome is worth retrying).
pub(crate) fn store_error(e: WriteError) -> hamail_store::StoreError {
    use hamail_store::StoreError;
    match e {
        WriteError::NoLeader => StoreError::Unavailable(e.to_string()),
        WriteError::Unknown(_) => StoreError::Temporary(e.to_string()),
        WriteError::Other(_) => StoreError::Unavailable(e.to_string()),
    }
}

/// A failed write as the crate's error.
pub fn write_error(e: WriteError) -> ClusterError {
    match e {
        WriteError::NoLeader => ClusterError::Unavailable(e.to_string()),
        WriteError::Unknown(_) => ClusterError::Unavailable(e.to_string()),
        WriteError::Other(m) => ClusterError::Internal(m),
    }
}

fn membership_error(e: RaftError<NodeId, ClientWriteError<NodeId, NodeInfo>>) -> ClusterError {
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => ClusterError::NotLeader { leader: f.leader_id },
        RaftError::APIError(ClientWriteError::ChangeMembershipError(e)) => match e {
            openraft::error::ChangeMembershipError::InProgress(_) => ClusterError::Unavailable(e.to_string()),
            _ => ClusterError::Config(e.to_string()),
        },
        RaftError::Fatal(e) => ClusterError::Internal(e.to_string()),
    }
}

fn refused(what: &str) -> Response {
    Response::Refused(format!("{what} requires an authenticated cluster member"))
}

#[async_trait::async_trait]
impl Handler for ClusterNode {
    async fn handle(&self, from: Option<NodeId>, request: Request) -> Response {
        match request {
            Request::AppendEntries(rpc) => match from {
                Some(_) => {
                    if self.accepts_leader_vote(&rpc.vote) {
                        self.leader_contact();
                    }
                    let arrival = self.testimony.arrive(rpc.vote.leader_id().get_term());
                    let result = self.raft.append_entries(rpc).await;
                    let acknowledged = matches!(
                        result,
                        Ok(AppendEntriesResponse::Success
                            | AppendEntriesResponse::PartialSuccess(_)
                            | AppendEntriesResponse::Conflict)
                    );
                    self.testimony.settle(arrival, acknowledged);
                    if acknowledged {
                        self.leader_contact();
                    }
                    Response::AppendEntries(result)
                }
                None => refused("AppendEntries"),
            },
            Request::Vote(rpc) => match from {
                Some(_) => {
                    let result = self.raft.vote(rpc).await;
                    if result.as_ref().is_ok_and(|r| r.vote_granted) {
                        let mut elections = self.elections.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                        elections.vote_granted(Instant::now());
                    }
                    Response::Vote(result)
                }
                None => refused("Vote"),
            },
            Request::InstallSnapshot(rpc) => match from {
                Some(_) => {
                    let vote = rpc.vote;
                    if self.accepts_leader_vote(&vote) {
                        self.leader_contact();
                    }
                    let result = self.raft.install_snapshot(rpc).await;
                    // Accepted: our vote is now the sender's (a refusal
                    // answers our own, higher one).
                    if result.as_ref().is_ok_and(|r| r.vote == vote) {
                        self.leader_contact();
                    }
                    Response::InstallSnapshot(result)
                }
                None => refused("InstallSnapshot"),
            },
            Request::PreVote(req) => match from {
                Some(peer) => Response::PreVote(self.pre_vote_here(peer, req)),
                None => refused("PreVote"),
            },
            Request::Write(cmd) => match from {
                Some(_) => Response::Write(self.write_here(cmd).await),
                None => refused("Write"),
            },
            Request::ReadIndex => match from {
                Some(_) => Response::ReadIndex(self.read_index_here().await),
                None => refused("ReadIndex"),
            },
            Request::RenewLease => match from {
                Some(peer) => {
                    // Record when it arrived, before confirming leadership
                    // (see crate::failover).
                    self.leases.request_from(peer);
                    Response::RenewLease(self.renew_lease_here().await)
                }
                None => refused("RenewLease"),
            },
            Request::Testimony { term } => match from {
                Some(_) => Response::Testimony(self.testimony_here(term)),
                None => refused("Testimony"),
            },
            Request::Status => match from {
                Some(_) => Response::Status(self.status()),
                None => refused("Status"),
            },
            Request::PutBody { hash, data } => match from {
                Some(_) => Response::PutBody(self.put_body_here(hash, data).await),
                None => refused("PutBody"),
            },
            Request::GetBody(hash) => match from {
                Some(_) => Response::GetBody(self.get_body_here(hash).await),
                None => refused("GetBody"),
            },
            Request::Verify => match from {
                Some(_) if self.info.role != Role::Data => {
                    Response::Verify(Err(format!("node {} is a witness: it holds no mail", self.id)))
                }
                Some(_) => Response::Verify(
                    verify_and_repair(self, Replication::default().fetch_timeout).await.map_err(|e| e.to_string()),
                ),
                None => refused("Verify"),
            },
            Request::Join(_) => Response::Join(Err(JoinError::Failed("not implemented here".into()))),
            Request::LeaseVouch => match from {
                Some(peer) => Response::LeaseVouch(self.testimony.vouch(peer, self.vouching().silence)),
                None => refused("LeaseVouch"),
            },
        }
    }
}

/// openraft restores a node whose saved vote is its own, committed one (it
/// led when it stopped) as the leader of that term at once, without asking
/// anyone (`Engine::startup`): it then logs `become leader` for a term the
/// cluster may have left long ago, and acts as leader until an answer shows
/// it a higher term. Saving the vote uncommitted instead makes it start as
/// a follower that voted for itself in that term, as after a crash in the
/// middle of a campaign: it still votes for nobody else in that term (the
/// vote is kept, Raft paper §5.2), and it leads again only after winning an
/// election.
async fn forget_leadership(id: NodeId, log: &mut LogStore) -> Result<(), ClusterError> {
    use openraft::storage::RaftLogStorage;
    let Some(vote) = log.read_vote().await? else { return Ok(()) };
    if vote.is_committed() && vote.leader_id().voted_for() == Some(id) {
        let term = vote.leader_id().get_term();
        tracing::info!(%id, term, "led term {term} before the restart: starting as a follower, not as its leader");
        log.save_vote(&crate::types::Vote::new(term, id)).await?;
    }
    Ok(())
}

/// Feeds Raft's term and role changes to the node's testimony until the
/// node is gone.
async fn watch_terms(
    id: NodeId,
    mut metrics: tokio::sync::watch::Receiver<openraft::RaftMetrics<NodeId, NodeInfo>>,
    testimony: std::sync::Weak<crate::testimony::Testimony>,
) {
    loop {
        let (term, leading) = {
            let m = metrics.borrow_and_update();
            (m.current_term, m.current_leader == Some(id) && m.state == openraft::ServerState::Leader)
        };
        match testimony.upgrade() {
            Some(t) => t.observe(term, leading),
            None => return,
        }
        if metrics.changed().await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_nodes_of_a_cluster_build_their_snapshots_at_different_points() {
        let t = Timing { snapshot_every: 10_000, ..Timing::default() };
        let thresholds: Vec<u64> = (1..=6).map(|i| t.snapshot_threshold(NodeId(i))).collect();
        assert_eq!(thresholds, [11_000, 12_000, 13_000, 14_000, 10_000, 11_000]);
        let huge = Timing { snapshot_every: u64::MAX, ..Timing::default() };
        assert_eq!(huge.snapshot_threshold(NodeId(4)), u64::MAX, "saturates");
        assert_eq!(t.raft_config(NodeId(2)).unwrap().snapshot_policy, SnapshotPolicy::LogsSinceLast(12_000));
    }

    #[test]
    fn openraft_never_starts_an_election_by_itself() {
        let config = Timing::default().raft_config(NodeId(1)).unwrap();
        assert!(!config.enable_elect, "elections are the pre-vote agent's (crate::election)");
    }
}
