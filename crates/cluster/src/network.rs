//! openraft's network ([`RaftNetworkFactory`]) on a [`Transport`].
//!
//! Role: carry the three Raft RPCs (AppendEntries, RequestVote,
//! InstallSnapshot — Raft paper §5 and §7) as [`Request`]s over the same
//! authenticated channel as everything else between nodes, and translate
//! failures into openraft's error classes, which drive its retry policy
//! (openraft docs, `RPCError`): `Unreachable` makes the replication task back
//! off before retrying, `NetworkError` retries at once, `RemoteError` is the
//! peer's own Raft answer.
//!
//! It also keeps, per peer, the state of the link as these RPCs see it
//! ([`PeerContacts`]): when the peer last answered (openraft 0.9 has no
//! per-peer contact time in its metrics), how many calls failed, and whether
//! it is unreachable. A leader calls a dead follower twenty times a second
//! and openraft logs every failure; this log says it once per change
//! instead: one WARN `node N unreachable: <reason>` when the calls have
//! failed for long enough, one INFO `node N reachable again after <time>,
//! <k> failed calls` at the first answer after that. (openraft's own
//! per-call lines are left out of the default log filter, see the binary.)
//! The cluster event log's `NodeLost` / `NodeBack` come from the leader's
//! lease book instead ([`crate::failover`]): they say what the cluster
//! decided, this what one node's calls found.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use openraft::error::{InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest,
    VoteResponse,
};
use openraft::AnyError;
use serde::{Deserialize, Serialize};

use crate::rpc::{Request, Response, Transport, TransportError};
use crate::types::{NodeId, NodeInfo, TypeConfig};

/// The fewest failed calls in a row that make a peer unreachable, however
/// long they took (see [`PeerContacts::new`] for the time it also takes).
const FAILED_CALLS_BEFORE_UNREACHABLE: u64 = 3;

/// One peer's link, as this node's calls to it found it. Pure: the caller
/// gives the time, so that the transitions are tested with a made-up clock.
#[derive(Debug, Default)]
struct Link {
    /// When it last answered.
    last_answer: Option<Instant>,
    /// The calls that failed since it last answered: when the first of them
    /// was made, and how many.
    failing: Option<(Instant, u64)>,
    /// Declared unreachable (logged) and not answered since.
    unreachable: bool,
    /// Every failed call, since this node started.
    failed_calls: u64,
    /// Every change between reachable and unreachable, since this node
    /// started.
    state_changes: u64,
}

/// A change of a link's state: what is logged, once.
#[derive(Debug, Clone, PartialEq, Eq)]
enum LinkChange {
    Unreachable,
    /// Answered again, `after` the first failed call of the outage and
    /// `failed_calls` calls.
    Reachable {
        after: Duration,
        failed_calls: u64,
    },
}

impl Link {
    /// The peer answered a call, at `now`.
    fn answered(&mut self, now: Instant) -> Option<LinkChange> {
        self.last_answer = Some(now);
        let failing = self.failing.take();
        if !std::mem::take(&mut self.unreachable) {
            return None;
        }
        self.state_changes += 1;
        let (since, failed_calls) = failing.unwrap_or((now, 0));
        Some(LinkChange::Reachable { after: now.saturating_duration_since(since), failed_calls })
    }

    /// A call made at `started` failed at `now`. The peer becomes
    /// unreachable once at least [`FAILED_CALLS_BEFORE_UNREACHABLE`] calls in
    /// a row failed over at least `patience`.
    fn failed(&mut self, started: Instant, now: Instant, patience: Duration) -> Option<LinkChange> {
        self.failed_calls += 1;
        let (since, calls) = self.failing.get_or_insert((started, 0));
        *since = (*since).min(started);
        *calls += 1;
        if self.unreachable
            || *calls < FAILED_CALLS_BEFORE_UNREACHABLE
            || now.saturating_duration_since(*since) < patience
        {
            return None;
        }
        self.unreachable = true;
        self.state_changes += 1;
        Some(LinkChange::Unreachable)
    }

    fn status(&self, id: NodeId, now: Instant) -> LinkStatus {
        LinkStatus {
            id,
            reachable: !self.unreachable,
            failed_calls: self.failed_calls,
            state_changes: self.state_changes,
            last_answer_ms: self.last_answer.map(|t| millis(now.saturating_duration_since(t))),
        }
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// One peer's link as `hamail cluster status` shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkStatus {
    pub id: NodeId,
    /// `false` from the WARN `node N unreachable` to its next answer.
    pub reachable: bool,
    /// Raft calls to it that failed (no answer, refused, timed out), since
    /// this node started.
    pub failed_calls: u64,
    /// Changes between reachable and unreachable, since this node started.
    pub state_changes: u64,
    /// Milliseconds since it last answered, if it ever did.
    pub last_answer_ms: Option<u64>,
}

/// The links to every peer this node's Raft calls (see the module
/// documentation).
#[derive(Clone)]
pub struct PeerContacts {
    links: Arc<Mutex<HashMap<NodeId, Link>>>,
    started: Instant,
    patience: Duration,
}

impl PeerContacts {
    /// `patience`: how long calls to a peer must keep failing (and at least
    /// [`FAILED_CALLS_BEFORE_UNREACHABLE`] of them) before it is called
    /// unreachable. The node gives two election timeouts: a follower that
    /// hears nothing for one election timeout starts an election, so a peer
    /// silent for two is out of the cluster whatever the cause (the rule of
    /// [`crate::ClusterNode::peer_silent`] too). A peer that is only slow is
    /// not: openraft gives an AppendEntries one heartbeat interval (50 ms)
    /// before it counts a timeout, and a follower busy with a slow fsync
    /// (a burst of writes) misses a few of those, then answers.
    pub fn new(patience: Duration) -> Self {
        PeerContacts { links: Arc::default(), started: Instant::now(), patience }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<NodeId, Link>> {
        self.links.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn answered(&self, id: NodeId) {
        let change = self.lock().entry(id).or_default().answered(Instant::now());
        if let Some(change) = change {
            log_change(id, &change, "");
        }
    }

    fn failed(&self, id: NodeId, started: Instant, reason: &str) {
        let change = self.lock().entry(id).or_default().failed(started, Instant::now(), self.patience);
        if let Some(change) = change {
            log_change(id, &change, reason);
        }
    }

    /// Milliseconds since `id` last answered, if it ever did.
    pub fn millis_since(&self, id: NodeId) -> Option<u64> {
        let now = Instant::now();
        self.lock().get(&id).and_then(|l| l.last_answer).map(|t| millis(now.saturating_duration_since(t)))
    }

    /// Milliseconds since `id` last answered, or since this node started if
    /// it never did (a leader calls every peer at once: one that never
    /// answered is down).
    pub fn silent_ms(&self, id: NodeId) -> u64 {
        self.millis_since(id).unwrap_or_else(|| millis(self.started.elapsed()))
    }

    /// Every peer called so far, by id.
    pub fn links(&self) -> Vec<LinkStatus> {
        let now = Instant::now();
        let mut out: Vec<LinkStatus> = self.lock().iter().map(|(id, l)| l.status(*id, now)).collect();
        out.sort_by_key(|l| l.id);
        out
    }
}

fn log_change(id: NodeId, change: &LinkChange, reason: &str) {
    match change {
        LinkChange::Unreachable => tracing::warn!(peer = %id, "node {id} unreachable: {reason}"),
        LinkChange::Reachable { after, failed_calls } => {
            tracing::info!(peer = %id, "node {id} reachable again after {after:.1?}, {failed_calls} failed calls")
        }
    }
}

/// One call in flight. openraft drops the call's future when its own
/// timeout expires (one heartbeat interval for an AppendEntries): a call
/// dropped before it ended counts as failed.
struct Attempt {
    contacts: PeerContacts,
    target: NodeId,
    started: Instant,
    ttl: Duration,
    ended: bool,
}

impl Attempt {
    fn answered(mut self) {
        self.ended = true;
        self.contacts.answered(self.target);
    }

    fn failed(mut self, reason: &str) {
        self.ended = true;
        self.contacts.failed(self.target, self.started, reason);
    }
}

impl Drop for Attempt {
    fn drop(&mut self) {
        if !self.ended {
            self.contacts.failed(self.target, self.started, &format!("no answer within {:?}", self.ttl));
        }
    }
}

/// Makes one [`Connection`] per peer for openraft.
#[derive(Clone)]
pub struct Network {
    transport: Arc<dyn Transport>,
    contacts: PeerContacts,
}

impl Network {
    /// `patience`: see [`PeerContacts::new`].
    pub fn new(transport: Arc<dyn Transport>, patience: Duration) -> Self {
        Network { transport, contacts: PeerContacts::new(patience) }
    }

    /// The per-peer links this network records.
    pub fn contacts(&self) -> PeerContacts {
        self.contacts.clone()
    }
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Connection;

    async fn new_client(&mut self, target: NodeId, node: &NodeInfo) -> Connection {
        Connection { transport: self.transport.clone(), target, node: node.clone(), contacts: self.contacts.clone() }
    }
}

/// openraft's view of one peer. Stateless: the transport owns connections.
pub struct Connection {
    transport: Arc<dyn Transport>,
    target: NodeId,
    node: NodeInfo,
    contacts: PeerContacts,
}

type RpcErr<E = openraft::error::Infallible> = RPCError<NodeId, NodeInfo, RaftError<NodeId, E>>;

impl Connection {
    /// One exchange, recorded in the peer's link; the transport's failures
    /// as openraft errors.
    async fn call<E: std::error::Error>(&self, request: Request, option: &RPCOption) -> Result<Response, RpcErr<E>> {
        let attempt = Attempt {
            contacts: self.contacts.clone(),
            target: self.target,
            started: Instant::now(),
            ttl: option.hard_ttl(),
            ended: false,
        };
        match self.transport.call(self.target, &self.node, request).await {
            Ok(Response::Refused(why)) => {
                let why = format!("node {} refused the request: {why}", self.target);
                attempt.failed(&why);
                Err(RPCError::Network(NetworkError::from(AnyError::error(why))))
            }
            Ok(resp) => {
                attempt.answered();
                Ok(resp)
            }
            Err(e) => {
                let (TransportError::Unreachable { reason, .. } | TransportError::Failed { reason, .. }) = &e;
                attempt.failed(reason);
                match e {
                    TransportError::Unreachable { .. } => Err(RPCError::Unreachable(Unreachable::new(&e))),
                    TransportError::Failed { .. } => Err(RPCError::Network(NetworkError::new(&e))),
                }
            }
        }
    }

    fn unexpected<E: std::error::Error>(&self, what: &str) -> RpcErr<E> {
        RPCError::Network(NetworkError::from(AnyError::error(format!(
            "node {} answered {what} with another kind of response",
            self.target
        ))))
    }

    fn remote<E: std::error::Error>(&self, e: RaftError<NodeId, E>) -> RpcErr<E> {
        RPCError::RemoteError(RemoteError::new_with_node(self.target, self.node.clone(), e))
    }
}

impl RaftNetwork<TypeConfig> for Connection {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RpcErr> {
        match self.call(Request::AppendEntries(rpc), &option).await? {
            Response::AppendEntries(Ok(r)) => Ok(r),
            Response::AppendEntries(Err(e)) => Err(self.remote(e)),
            _ => Err(self.unexpected("AppendEntries")),
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<InstallSnapshotResponse<NodeId>, RpcErr<InstallSnapshotError>> {
        match self.call(Request::InstallSnapshot(rpc), &option).await? {
            Response::InstallSnapshot(Ok(r)) => Ok(r),
            Response::InstallSnapshot(Err(e)) => Err(self.remote(e)),
            _ => Err(self.unexpected("InstallSnapshot")),
        }
    }

    async fn vote(&mut self, rpc: VoteRequest<NodeId>, option: RPCOption) -> Result<VoteResponse<NodeId>, RpcErr> {
        match self.call(Request::Vote(rpc), &option).await? {
            Response::Vote(Ok(r)) => Ok(r),
            Response::Vote(Err(e)) => Err(self.remote(e)),
            _ => Err(self.unexpected("Vote")),
        }
    }

    /// How long the leader waits before trying an unreachable node again.
    /// openraft's default is 500 ms, longer than a follower's election
    /// timeout: a node that restarts meanwhile hears nothing, starts an
    /// election with a higher term and (openraft 0.9 has no pre-vote)
    /// deposes a healthy leader. Measured with `hamail-bench cluster`: two
    /// spurious leader changes in four runs. Retrying at the heartbeat
    /// pace reaches it before its timeout fires.
    fn backoff(&self) -> openraft::network::Backoff {
        openraft::network::Backoff::new(std::iter::repeat(UNREACHABLE_RETRY))
    }
}

/// See [`Connection::backoff`]: one default heartbeat interval.
const UNREACHABLE_RETRY: std::time::Duration = std::time::Duration::from_millis(50);

#[cfg(test)]
mod tests {
    use super::*;

    const PATIENCE: Duration = Duration::from_millis(600);

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// A call that failed at once, at `t`.
    fn fail_at(link: &mut Link, t: Instant) -> Option<LinkChange> {
        link.failed(t, t, PATIENCE)
    }

    #[test]
    fn a_dead_peer_is_declared_unreachable_once_then_reachable_once() {
        let t0 = Instant::now();
        let mut link = Link::default();
        assert_eq!(link.answered(t0), None);
        // Every 50 ms, as the leader retries: nothing until the patience
        // has run out.
        for k in 0..12 {
            assert_eq!(fail_at(&mut link, t0 + ms(50 * k)), None, "failure {k}");
        }
        assert_eq!(fail_at(&mut link, t0 + ms(600)), Some(LinkChange::Unreachable));
        for k in 13..200 {
            assert_eq!(fail_at(&mut link, t0 + ms(50 * k)), None, "failure {k}: said once");
        }
        assert!(link.unreachable);
        assert_eq!(
            link.answered(t0 + ms(10_000)),
            Some(LinkChange::Reachable { after: ms(10_000), failed_calls: 200 })
        );
        assert_eq!(link.answered(t0 + ms(10_050)), None, "said once");
        assert_eq!((link.failed_calls, link.state_changes), (200, 2));
        let st = link.status(NodeId(3), t0 + ms(10_100));
        assert_eq!(
            st,
            LinkStatus {
                id: NodeId(3),
                reachable: true,
                failed_calls: 200,
                state_changes: 2,
                last_answer_ms: Some(50)
            }
        );
        // A second outage counts from its own first failure.
        for k in 0..13 {
            let change = fail_at(&mut link, t0 + ms(20_000 + 50 * k));
            assert_eq!(change, (k == 12).then_some(LinkChange::Unreachable), "failure {k} of the second outage");
        }
        assert!(!link.status(NodeId(3), t0 + ms(21_000)).reachable);
        assert_eq!(link.state_changes, 3);
    }

    #[test]
    fn timeouts_in_a_burst_of_slow_answers_are_no_outage() {
        // A follower whose fsync stalls misses openraft's 50 ms for a few
        // hundred ms, then answers; again and again under load.
        let t0 = Instant::now();
        let mut link = Link::default();
        let mut t = t0;
        for _ in 0..50 {
            for _ in 0..10 {
                t += ms(50);
                assert_eq!(fail_at(&mut link, t), None);
            }
            t += ms(50);
            assert_eq!(link.answered(t), None);
        }
        assert_eq!((link.failed_calls, link.state_changes), (500, 0));
        assert!(!link.unreachable);
    }

    #[test]
    fn a_few_slow_failures_are_not_enough_nor_is_one_long_one() {
        let t0 = Instant::now();
        let mut link = Link::default();
        // Two calls that each took seconds to fail (a connect timeout).
        assert_eq!(link.failed(t0, t0 + ms(5_000), PATIENCE), None);
        assert_eq!(link.failed(t0 + ms(5_000), t0 + ms(10_000), PATIENCE), None);
        // The third: the run began with the first call, 15 s ago.
        assert_eq!(link.failed(t0 + ms(10_000), t0 + ms(15_000), PATIENCE), Some(LinkChange::Unreachable));
        assert_eq!(link.answered(t0 + ms(16_000)), Some(LinkChange::Reachable { after: ms(16_000), failed_calls: 3 }));
    }

    #[test]
    fn the_outage_counts_from_the_earliest_call_that_failed() {
        let t0 = Instant::now();
        let mut link = Link::default();
        // Calls overlap: one started at t0 fails after two that started
        // later.
        assert_eq!(link.failed(t0 + ms(400), t0 + ms(450), PATIENCE), None);
        assert_eq!(link.failed(t0 + ms(500), t0 + ms(550), PATIENCE), None);
        assert_eq!(link.failed(t0, t0 + ms(600), PATIENCE), Some(LinkChange::Unreachable));
    }

    #[test]
    fn contacts_count_dropped_calls_as_failed_and_list_every_peer() {
        let contacts = PeerContacts::new(Duration::ZERO);
        let attempt = |id: u64| Attempt {
            contacts: contacts.clone(),
            target: NodeId(id),
            started: Instant::now(),
            ttl: ms(50),
            ended: false,
        };
        // openraft's timeout drops the call's future.
        for _ in 0..3 {
            drop(attempt(2));
        }
        attempt(1).answered();
        attempt(1).failed("connect: refused");
        let links = contacts.links();
        assert_eq!(links.iter().map(|l| l.id).collect::<Vec<_>>(), [NodeId(1), NodeId(2)]);
        assert!(links[0].reachable, "one failure is not an outage: {links:?}");
        assert_eq!((links[0].failed_calls, links[0].state_changes), (1, 0));
        assert!(!links[1].reachable, "{links:?}");
        assert_eq!((links[1].failed_calls, links[1].state_changes, links[1].last_answer_ms), (3, 1, None));
        assert!(contacts.millis_since(NodeId(1)).is_some());
        assert_eq!(contacts.millis_since(NodeId(2)), None);
        attempt(2).answered();
        let links = contacts.links();
        assert!(links[1].reachable);
        assert_eq!(links[1].state_changes, 2);
    }
}
