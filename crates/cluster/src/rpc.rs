//! The messages nodes exchange, and the two traits that carry them.
//!
//! Every node-to-node exchange is one [`Request`] answered by one
//! [`Response`]. A [`Transport`] delivers a request to a node and brings
//! back the answer (over mutual TLS in production, through a fault-injecting
//! in-process switchboard in the logic tests); a [`Handler`] is what a node
//! runs for each request it receives. The Raft network of openraft is built
//! on a `Transport`, so Raft, write forwarding and joins share one channel
//! and one authentication.

use hamail_store::BodyHash;
use openraft::error::{InstallSnapshotError, RaftError};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest,
    VoteResponse,
};
use serde::{Deserialize, Serialize};

use crate::election::{PreVote, PreVoteAnswer};
use crate::mailstore::RepairReport;
use crate::types::{Command, CommandResult, NodeId, NodeInfo, Role, TypeConfig};

/// A request from one node (or a joining process) to another.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Request {
    AppendEntries(AppendEntriesRequest<TypeConfig>),
    Vote(VoteRequest<NodeId>),
    InstallSnapshot(InstallSnapshotRequest<TypeConfig>),
    /// Would you vote for me at my next term? Asked before an election,
    /// which happens only with a quorum of grants (see [`crate::election`]).
    PreVote(PreVote),
    /// A write proposed on a follower, forwarded to the leader.
    Write(Command),
    /// A process that knows the cluster secret asks to become a member.
    /// The only request accepted from a peer without a cluster certificate.
    Join(JoinRequest),
    /// A node's view of the cluster (for `hamail cluster status`).
    Status,
    /// A follower's linearizable read: the leader confirms it still leads
    /// (a heartbeat round to a quorum) and answers its commit index; the
    /// follower then waits until it has applied that far (Raft paper §8,
    /// "read-only operations"; the ReadIndex of Ongaro's thesis §6.4).
    ReadIndex,
    /// A lease renewal (see [`crate::failover`]): the leader notes when it
    /// arrived, confirms it still leads as for [`Request::ReadIndex`], and
    /// answers with the members it finds silent, so that followers, too,
    /// stop copying bodies to a node that is down and notice its return.
    RenewLease,
    /// Asked by the new leader of term `term`: when did you last
    /// acknowledge, or stop leading, an older term? (See
    /// [`crate::testimony`].)
    Testimony {
        term: u64,
    },
    /// Store this message body durably (answered after the fsync). Sent by
    /// the node accepting a message to every other data node *before* it
    /// proposes the message's metadata: bodies travel beside the log, so
    /// that the log stays small and a body is written once per node. The
    /// receiver checks `hash` against `data`. A witness refuses it.
    PutBody {
        hash: BodyHash,
        data: Vec<u8>,
    },
    /// Send me this body (one this node misses or found damaged). A
    /// witness refuses it: it holds no mail.
    GetBody(BodyHash),
    /// Re-hash every body here and fetch the missing or damaged ones from
    /// the other data nodes (`hamail store verify`, run cluster-wide).
    Verify,
    /// A lease renewal without a leader (see [`crate::failover`]): vouch
    /// for the requester's lease if you know no leader of your current
    /// term, and remember that you did.
    LeaseVouch,
}

/// The answer to a [`Request`], same variant.
#[derive(Debug, Serialize, Deserialize)]
pub enum Response {
    AppendEntries(Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>>),
    Vote(Result<VoteResponse<NodeId>, RaftError<NodeId>>),
    InstallSnapshot(Result<InstallSnapshotResponse<NodeId>, RaftError<NodeId, InstallSnapshotError>>),
    PreVote(PreVoteAnswer),
    Write(Result<Written, WriteError>),
    Join(Result<JoinResponse, JoinError>),
    Status(NodeStatus),
    /// The log index a read must wait for (`None`: nothing committed yet).
    ReadIndex(Result<Option<u64>, WriteError>),
    /// The renewal is confirmed; the members the leader finds silent.
    RenewLease(Result<Vec<NodeId>, WriteError>),
    /// `None` while the asked node has not reached the term itself.
    Testimony(Option<TestimonyAnswer>),
    /// The body is durable on the receiver.
    PutBody(Result<(), String>),
    /// The body's bytes (the caller verifies their hash again).
    GetBody(Result<Vec<u8>, String>),
    Verify(Result<RepairReport, String>),
    /// The request was refused before it was looked at (not authenticated,
    /// or a request this peer may not make).
    Refused(String),
    /// Vouched, in this term; `None`: refused (a leader of the asked
    /// node's term is known: renew through it).
    LeaseVouch(Option<u64>),
}

/// A node's testimony to a new leader (see [`crate::testimony`]), in
/// microseconds before the answer was made (clocks are not compared).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TestimonyAnswer {
    /// Since it last acknowledged, or stopped leading, an older term.
    pub older_us: u64,
    /// Per requester, since it last vouched for that node's lease.
    pub vouches_us: Vec<(NodeId, u64)>,
}

/// A committed write: the state machine's answer and the log index of its
/// entry (a node that proposed it can wait for its own apply of that
/// index instead of looking again at every change of its Raft metrics).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Written {
    pub result: CommandResult,
    pub index: u64,
}

impl From<openraft::raft::ClientWriteResponse<crate::types::TypeConfig>> for Written {
    fn from(resp: openraft::raft::ClientWriteResponse<crate::types::TypeConfig>) -> Self {
        Written { result: resp.data, index: resp.log_id.index }
    }
}

/// Why a (possibly forwarded) write did not happen.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum WriteError {
    /// No leader right now (election in progress, or no quorum): retry.
    #[error("no leader (election in progress or no quorum): try again")]
    NoLeader,
    /// The write may or may not have been committed (leader lost in the
    /// middle): the caller must check before retrying.
    #[error("outcome unknown: {0}")]
    Unknown(String),
    #[error("cluster error: {0}")]
    Other(String),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JoinRequest {
    /// The cluster secret from the join token.
    pub secret: String,
    /// The joining node's cluster address, `host:port`.
    pub addr: String,
    pub role: Role,
    pub name: String,
}

/// What a new member needs: its id, its certificate and key signed by the
/// cluster CA, the CA certificate, and the current members.
#[derive(Clone, Serialize, Deserialize)]
pub struct JoinResponse {
    pub node_id: NodeId,
    pub cert_pem: String,
    pub key_pem: String,
    pub ca_pem: String,
    pub members: Vec<(NodeId, NodeInfo)>,
}

impl std::fmt::Debug for JoinResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never log a private key.
        f.debug_struct("JoinResponse").field("node_id", &self.node_id).field("members", &self.members).finish()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum JoinError {
    #[error("wrong cluster secret")]
    WrongSecret,
    #[error("this cluster has not been initialised")]
    NotInitialised,
    #[error("no leader: try again")]
    NoLeader,
    #[error("join failed: {0}")]
    Failed(String),
}

/// One node's view, as `hamail cluster status` shows it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct NodeStatus {
    pub id: NodeId,
    pub role: Role,
    /// "leader", "follower", "candidate", "learner", "shutdown".
    pub state: String,
    pub current_term: u64,
    pub current_leader: Option<NodeId>,
    pub last_log_index: Option<u64>,
    pub last_applied: Option<u64>,
    pub members: Vec<(NodeId, NodeInfo)>,
    /// On the leader: per follower, its matched log index and the
    /// milliseconds since its last acknowledgement.
    pub replication: Vec<PeerProgress>,
    /// Its links to the peers its Raft calls: reachable or not, failed
    /// calls and state changes.
    pub links: Vec<crate::network::LinkStatus>,
    /// The replication health of the mail on this node.
    pub mail: MailHealth,
}

/// How well this node's mail is replicated (a data node running a
/// [`crate::mailstore::ReplicatedStore`]; all zero elsewhere).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MailHealth {
    /// Bodies this node's metadata references but its disk lacks, at the
    /// last check (they are being fetched from the other data nodes).
    pub bodies_missing: u64,
    /// Messages accepted through this node with fewer copies than there
    /// are data nodes (a data node was down or slow), since it started.
    pub degraded_accepts: u64,
    /// Bodies fetched from another data node since it started.
    pub bodies_fetched: u64,
    /// Unreferenced body files (copies for accepts that never committed)
    /// removed by the garbage collection since it started.
    pub bodies_collected: u64,
    /// Client changes and reads refused with a temporary error because the
    /// cluster did not answer in time (no quorum reachable), since it
    /// started.
    pub refused_unavailable: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PeerProgress {
    pub id: NodeId,
    pub matched: Option<u64>,
    /// Log entries the follower is behind the leader.
    pub lag: Option<u64>,
    pub last_contact_ms: Option<u64>,
}

/// Runs the requests a node receives. `from` is the authenticated peer's
/// node id (from its certificate), `None` for a peer without one: then only
/// `Join` may be served.
#[async_trait::async_trait]
pub trait Handler: Send + Sync + 'static {
    async fn handle(&self, from: Option<NodeId>, request: Request) -> Response;
}

/// Why a request did not get an answer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TransportError {
    /// Could not reach the node (refused, timed out, partitioned).
    #[error("node {node} unreachable: {reason}")]
    Unreachable { node: String, reason: String },
    /// Reached it, but the answer was lost or malformed.
    #[error("exchange with node {node} failed: {reason}")]
    Failed { node: String, reason: String },
}

/// Delivers requests to other nodes.
#[async_trait::async_trait]
pub trait Transport: Send + Sync + 'static {
    async fn call(&self, target: NodeId, node: &NodeInfo, request: Request) -> Result<Response, TransportError>;
}
