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
//! It also records, per peer, when it last answered an AppendEntries (the
//! heartbeat), for `hamail cluster status` (openraft 0.9 has no per-peer
//! contact time in its metrics).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use openraft::error::{InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest,
    VoteResponse,
};
use openraft::AnyError;

use crate::rpc::{Request, Response, Transport, TransportError};
use crate::types::{NodeId, NodeInfo, TypeConfig};

/// When each peer last answered a Raft RPC.
#[derive(Clone)]
pub struct PeerContacts(Arc<Mutex<HashMap<NodeId, Instant>>>, Instant);

impl Default for PeerContacts {
    fn default() -> Self {
        PeerContacts(Arc::default(), Instant::now())
    }
}

impl PeerContacts {
    fn touch(&self, id: NodeId) {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).insert(id, Instant::now());
    }

    /// Milliseconds since `id` last answered, if it ever did.
    pub fn millis_since(&self, id: NodeId) -> Option<u64> {
        let map = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        map.get(&id).map(|t| u64::try_from(t.elapsed().as_millis()).unwrap_or(u64::MAX))
    }

    /// Milliseconds since `id` last answered, or since this node started if
    /// it never did (a leader calls every peer at once: one that never
    /// answered is down).
    pub fn silent_ms(&self, id: NodeId) -> u64 {
        self.millis_since(id).unwrap_or_else(|| u64::try_from(self.1.elapsed().as_millis()).unwrap_or(u64::MAX))
    }
}

/// Makes one [`Connection`] per peer for openraft.
#[derive(Clone)]
pub struct Network {
    transport: Arc<dyn Transport>,
    contacts: PeerContacts,
}

impl Network {
    pub fn new(transport: Arc<dyn Transport>) -> Self {
        Network { transport, contacts: PeerContacts::default() }
    }

    /// The per-peer contact times this network records.
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
    /// One exchange; the transport's failures as openraft errors.
    async fn call<E: std::error::Error>(&self, request: Request) -> Result<Response, RpcErr<E>> {
        match self.transport.call(self.target, &self.node, request).await {
            Ok(Response::Refused(why)) => Err(RPCError::Network(NetworkError::from(AnyError::error(format!(
                "node {} refused the request: {why}",
                self.target
            ))))),
            Ok(resp) => {
                self.contacts.touch(self.target);
                Ok(resp)
            }
            Err(e @ TransportError::Unreachable { .. }) => Err(RPCError::Unreachable(Unreachable::new(&e))),
            Err(e @ TransportError::Failed { .. }) => Err(RPCError::Network(NetworkError::new(&e))),
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
        _option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RpcErr> {
        match self.call(Request::AppendEntries(rpc)).await? {
            Response::AppendEntries(Ok(r)) => Ok(r),
            Response::AppendEntries(Err(e)) => Err(self.remote(e)),
            _ => Err(self.unexpected("AppendEntries")),
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<InstallSnapshotResponse<NodeId>, RpcErr<InstallSnapshotError>> {
        match self.call(Request::InstallSnapshot(rpc)).await? {
            Response::InstallSnapshot(Ok(r)) => Ok(r),
            Response::InstallSnapshot(Err(e)) => Err(self.remote(e)),
            _ => Err(self.unexpected("InstallSnapshot")),
        }
    }

    async fn vote(&mut self, rpc: VoteRequest<NodeId>, _option: RPCOption) -> Result<VoteResponse<NodeId>, RpcErr> {
        match self.call(Request::Vote(rpc)).await? {
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
