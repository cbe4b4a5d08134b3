//! The node's cluster membership at run time: `cluster init`, `cluster
//! join`, resuming membership at start, serving the cluster listener, and
//! answering joins.
//!
//! Why here and not in `hamail-cluster`: this is wiring. It decides which
//! files a node keeps (`<data_dir>/cluster/`), which address it advertises,
//! and swaps the server's directory from the local one to the replicated
//! one; the consensus itself is `hamail_cluster::ClusterNode`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use hamail_cluster::network::LinkStatus;
use hamail_cluster::pki::{self, ClusterCa, JoinToken, NodeCredentials};
use hamail_cluster::rpc::{Handler, JoinError, JoinRequest, JoinResponse, Request, Response};
use hamail_cluster::state_machine::ConsensusState;
use hamail_cluster::tcp::{self, TlsTransport, TransportConfig};
use hamail_cluster::{
    groups::{EventKind, GroupSpec, GroupStatus},
    mailstore::{RepairReport, ReplicatedStore, Replication},
    BanChange, ClusterNode, ClusterSecrets, Command, CommandResult, NodeId, NodeInfo, ReplicatedDirectory, Role,
    Timing,
};
use hamail_store::{LocalStore, StoreError};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;

use crate::config::{ClusterRole, Config};
use crate::limits::{later, BanTarget, Logins};
use crate::{Context, ServerError};

/// Who this node is in its cluster, saved as `<cluster_dir>/node.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Identity {
    id: NodeId,
    info: NodeInfo,
}

/// The cluster side of a running server.
pub struct ClusterRuntime {
    dir: PathBuf,
    role: Role,
    name: String,
    timing: Timing,
    replication: Replication,
    /// The replicated mail store of a data node.
    mail: std::sync::RwLock<Option<Arc<ReplicatedStore>>>,
    /// Bound at start when `[cluster] listen` is set; taken when the node
    /// starts serving (at start if it is a member, else at init/join).
    listener: tokio::sync::Mutex<Option<TcpListener>>,
    advertise: Option<String>,
    node: std::sync::RwLock<Option<Arc<ClusterNode>>>,
    transport: std::sync::RwLock<Option<Arc<TlsTransport>>>,
    tasks: std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>,
    /// Serialises init/join.
    changing: tokio::sync::Mutex<()>,
}

impl ClusterRuntime {
    /// Binds the cluster listener if one is configured.
    pub(crate) fn bind(config: &Config) -> Result<ClusterRuntime, ServerError> {
        let c = &config.cluster;
        let (listener, advertise) = match c.listen {
            Some(addr) => {
                let std = std::net::TcpListener::bind(addr)
                    .map_err(|e| ServerError::io(format!("binding the cluster listener {addr}"), e))?;
                std.set_nonblocking(true).map_err(|e| ServerError::io("cluster listener setup", e))?;
                let bound: SocketAddr = std.local_addr().map_err(|e| ServerError::io("cluster listener address", e))?;
                let l = TcpListener::from_std(std).map_err(|e| ServerError::io("cluster listener setup", e))?;
                (Some(l), Some(c.advertise.clone().unwrap_or_else(|| bound.to_string())))
            }
            None => (None, None),
        };
        Ok(ClusterRuntime {
            dir: config.cluster_dir(),
            role: match c.role {
                ClusterRole::Data => Role::Data,
                ClusterRole::Witness => Role::Witness,
            },
            name: config.server.hostname.clone(),
            timing: Timing {
                heartbeat_ms: c.heartbeat_ms,
                election_min_ms: c.election_timeout_min_ms,
                election_max_ms: c.election_timeout_max_ms,
                write_timeout_ms: c.commit_timeout_ms,
                groups: hamail_cluster::failover::GroupTiming {
                    lease_ms: c.group_lease_ms,
                    stop_timeout_ms: c.group_stop_timeout_ms,
                    fast_stop_timeout_ms: c.group_fast_stop_timeout_ms,
                    ..Default::default()
                },
                ..Timing::default()
            },
            replication: Replication { required_copies: c.required_copies, ..Replication::default() },
            mail: std::sync::RwLock::new(None),
            listener: tokio::sync::Mutex::new(listener),
            advertise,
            node: std::sync::RwLock::new(None),
            transport: std::sync::RwLock::new(None),
            tasks: std::sync::Mutex::new(Vec::new()),
            changing: tokio::sync::Mutex::new(()),
        })
    }

    /// The cluster address other nodes use for this one.
    pub fn advertised(&self) -> Option<&str> {
        self.advertise.as_deref()
    }

    pub fn node(&self) -> Option<Arc<ClusterNode>> {
        self.node.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    pub(crate) fn stop(&self) {
        for t in self.tasks.lock().unwrap_or_else(std::sync::PoisonError::into_inner).drain(..) {
            t.abort();
        }
    }

    fn identity_path(&self) -> PathBuf {
        self.dir.join("node.json")
    }

    fn load_identity(&self) -> Result<Option<Identity>, ServerError> {
        let path = self.identity_path();
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| ServerError::Config {
                file: path.display().to_string(),
                line: None,
                message: format!("damaged cluster identity: {e}"),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(ServerError::io(format!("reading {}", path.display()), e)),
        }
    }

    fn save_identity(&self, identity: &Identity) -> Result<(), ServerError> {
        std::fs::create_dir_all(&self.dir)
            .map_err(|e| ServerError::io(format!("creating {}", self.dir.display()), e))?;
        let path = self.identity_path();
        let tmp = path.with_extension("json.tmp");
        let text = serde_json::to_vec_pretty(identity)
            .map_err(|e| ServerError::Store(StoreError::Internal(format!("encoding the node identity: {e}"))))?;
        std::fs::write(&tmp, text)
            .and_then(|()| std::fs::File::open(&tmp)?.sync_all())
            .and_then(|()| std::fs::rename(&tmp, &path))
            .map_err(|e| ServerError::io(format!("writing {}", path.display()), e))
    }
}

fn cluster_err(e: impl std::fmt::Display) -> ServerError {
    ServerError::Store(StoreError::Unavailable(e.to_string()))
}

/// A cluster error as the server's, its class kept: retry later
/// (unavailable, not the leader, network), refused as asked (a group or
/// membership request the state refuses, invalid settings), or for an
/// operator (storage, internal).
impl From<hamail_cluster::ClusterError> for ServerError {
    fn from(e: hamail_cluster::ClusterError) -> Self {
        use hamail_cluster::ClusterError as C;
        let text = e.to_string();
        ServerError::Store(match e {
            C::Unavailable(_) | C::NotLeader { .. } | C::Network(_) => StoreError::Unavailable(text),
            C::Config(_) => StoreError::Permanent(text),
            C::Storage(_) | C::Internal(_) => StoreError::Internal(text),
        })
    }
}

/// At start: a node that is a member resumes its membership.
pub(crate) async fn resume(ctx: &Arc<Context>, store: &Arc<LocalStore>) -> Result<(), ServerError> {
    let rt = &ctx.cluster;
    let Some(identity) = rt.load_identity()? else { return Ok(()) };
    let creds = NodeCredentials::load(&rt.dir).map_err(cluster_err)?;
    start_node(ctx, store, identity, creds).await?;
    tracing::info!("cluster membership resumed");
    Ok(())
}

async fn start_node(
    ctx: &Arc<Context>,
    store: &Arc<LocalStore>,
    identity: Identity,
    creds: NodeCredentials,
) -> Result<Arc<ClusterNode>, ServerError> {
    let rt = &ctx.cluster;
    let listener = rt.listener.lock().await.take().ok_or_else(|| {
        cluster_err("no [cluster] listen address is configured (or it is already in use by this node)")
    })?;
    let transport = Arc::new(TlsTransport::new(&creds, TransportConfig::default()).map_err(cluster_err)?);
    let id = identity.id;
    let node =
        ClusterNode::start(id, identity.info.clone(), &rt.dir, store.clone(), transport.clone(), rt.timing.clone())
            .await
            .map_err(cluster_err)?;
    let server_config = hamail_cluster::tls::server_config(&creds).map_err(cluster_err)?;
    *rt.transport.write().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(transport.clone());
    let handler = Arc::new(MemberHandler { node: node.clone(), transport });
    let task = tcp::serve(listener, server_config, handler);
    rt.tasks.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(task);
    *rt.node.write().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(node.clone());
    ctx.set_directory(Arc::new(ReplicatedDirectory::new(node.clone())));
    // Queue ids carry the node id: unique across the cluster.
    store.set_node_prefix(u16::try_from(identity.id.0).map_err(|_| cluster_err("node id above 65535"))?);
    // The group agent: runs this node's share of the failover groups.
    // Script output goes to the cluster log (written in the background: a
    // log line must never hold up a resource).
    let log_node = Arc::downgrade(&node);
    let sink: crate::resources::LogSink = Arc::new(move |resource: String, line: String| {
        if let Some(node) = log_node.upgrade() {
            tokio::spawn(async move {
                let _ = node.log_event(EventKind::Script, None, Some(&resource), line).await;
            });
        }
    });
    node.start_agent(Arc::new(crate::resources::Driver::new(ctx, sink)));
    let bans = follow_bans(ctx, &node);
    rt.tasks.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(bans);
    if rt.role == Role::Data {
        let mail = Arc::new(
            ReplicatedStore::new(node.clone(), rt.replication.clone())
                .map_err(cluster_err)?
                .with_memory_gate(Arc::new(crate::smtp::BodyMemory(ctx.memory.clone()))),
        );
        *rt.mail.write().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(mail.clone());
        ctx.set_store(mail);
    }
    Ok(node)
}

/// Holds on this node the login bans set or lifted on any node: each node
/// counts the failed logins it sees, and a ban, once set, holds on every
/// node (bans live in memory: a node that starts later has the ones set
/// after it started).
fn follow_bans(ctx: &Arc<Context>, node: &ClusterNode) -> tokio::task::JoinHandle<()> {
    use tokio::sync::broadcast::error::RecvError;
    let mut changes = node.ban_changes();
    let ctx = Arc::downgrade(ctx);
    tokio::spawn(async move {
        loop {
            let change = match changes.recv().await {
                Ok(change) => change,
                Err(RecvError::Lagged(missed)) => {
                    tracing::warn!(missed, "login ban changes from the cluster missed (this node was too busy)");
                    continue;
                }
                Err(RecvError::Closed) => return,
            };
            let Some(ctx) = ctx.upgrade() else { return };
            hold_ban(&ctx.logins, change, crate::unix_now(), std::time::Instant::now());
        }
    })
}

fn hold_ban(logins: &Logins, change: BanChange, now_unix: u64, now: std::time::Instant) {
    match change {
        BanChange::Set { target, until, failures } => {
            let Some(t) = BanTarget::parse(&target) else { return };
            let left = std::time::Duration::from_secs(until.saturating_sub(now_unix));
            if !left.is_zero() && logins.impose(t.clone(), later(now, left), failures, now) {
                tracing::info!(target: "hamail::mail", "login ban from the cluster: {t} banned for {} s", left.as_secs());
            }
        }
        BanChange::Lift { target } => {
            if let Some(t) = BanTarget::parse(&target).filter(|t| logins.lift(t)) {
                tracing::info!(target: "hamail::mail", "login ban lifted from the cluster: {t}");
            }
        }
    }
}

/// Tells every node of a ban set or lifted here. False when this node is
/// in no cluster, or the cluster could not take it (logged).
pub(crate) async fn share_ban(node: Option<Arc<ClusterNode>>, change: BanChange) -> bool {
    let Some(node) = node else { return false };
    match node.write(Command::Ban(change)).await {
        Ok(_) => true,
        Err(e) => {
            tracing::warn!(error = %e, "a login ban could not be told to the other nodes");
            false
        }
    }
}

/// `hamail cluster init`: this node becomes a one-node cluster whose
/// directory is the node's current one. Returns the join token.
pub(crate) async fn init(ctx: &Arc<Context>, store: &Arc<LocalStore>) -> Result<String, ServerError> {
    let rt = &ctx.cluster;
    let _one_at_a_time = rt.changing.lock().await;
    if rt.node().is_some() || rt.load_identity()?.is_some() {
        return Err(cluster_err("this node is already a cluster member"));
    }
    let addr = rt.advertised().ok_or_else(|| cluster_err("set [cluster] listen in the config file first"))?.to_string();
    let ca = ClusterCa::generate(&rt.name).map_err(cluster_err)?;
    let id = NodeId(1);
    let creds = ca.issue_node_cert(id, &rt.name).map_err(cluster_err)?;
    creds.save(&rt.dir).map_err(cluster_err)?;
    ca.save(&rt.dir).map_err(cluster_err)?;
    let identity = Identity { id, info: NodeInfo { addr: addr.clone(), role: rt.role, name: rt.name.clone() } };
    let node = start_node(ctx, store, identity.clone(), creds).await?;
    node.initialize().await.map_err(ServerError::from)?;
    let secret = pki::generate_secret();
    let secrets = ClusterSecrets {
        ca_cert_pem: ca.cert_pem().to_string(),
        ca_key_pem: ca.key_pem().to_string(),
        secret_hash: pki::secret_hash(&secret),
    };
    match node.write(Command::ConfigureCluster { secrets }).await {
        Ok(CommandResult::Done) => {}
        other => return Err(cluster_err(format!("storing the cluster secrets: {other:?}"))),
    }
    // The node's existing users and domains are not in the log: a snapshot
    // taken now carries them to every node that joins later.
    node.compact().await.map_err(ServerError::from)?;
    // Saved last: a crash before this point leaves a node that is no member.
    rt.save_identity(&identity)?;
    let token = JoinToken { addr, ca_fingerprint: ca.fingerprint(), secret }.encode();
    tracing::info!("cluster initialised: this node is node 1");
    Ok(token)
}

/// `hamail cluster join TOKEN`: becomes a member of the cluster the token
/// names. This node's own directory is replaced by the cluster's.
pub(crate) async fn join(ctx: &Arc<Context>, store: &Arc<LocalStore>, token: &str) -> Result<NodeId, ServerError> {
    let rt = &ctx.cluster;
    let _one_at_a_time = rt.changing.lock().await;
    if rt.node().is_some() || rt.load_identity()?.is_some() {
        return Err(cluster_err("this node is already a cluster member"));
    }
    let addr = rt.advertised().ok_or_else(|| cluster_err("set [cluster] listen in the config file first"))?.to_string();
    let token = JoinToken::decode(token).map_err(|e| cluster_err(format!("bad join token: {e}")))?;
    let request =
        JoinRequest { secret: token.secret.clone(), addr: addr.clone(), role: rt.role, name: rt.name.clone() };
    let response = tcp::join(&token, request).await.map_err(cluster_err)?;
    let creds = NodeCredentials::from(&response);
    creds.save(&rt.dir).map_err(cluster_err)?;
    let identity = Identity { id: response.node_id, info: NodeInfo { addr, role: rt.role, name: rt.name.clone() } };
    rt.save_identity(&identity)?;
    start_node(ctx, store, identity, creds).await?;
    tracing::info!(id = %response.node_id, "joined the cluster");
    Ok(response.node_id)
}

/// Serves a member's requests, and joins: a join needs the cluster secrets
/// from the replicated state, so any leader can answer it.
struct MemberHandler {
    node: Arc<ClusterNode>,
    transport: Arc<TlsTransport>,
}

#[async_trait::async_trait]
impl Handler for MemberHandler {
    async fn handle(&self, from: Option<NodeId>, request: Request) -> Response {
        match request {
            Request::Join(join) => Response::Join(self.join(join).await),
            other => {
                // A removed node's certificate stays valid (no revocation):
                // only current members are served.
                // A node that has not received any membership yet (it has
                // just joined) cannot tell; it accepts its first leader.
                if let Some(peer) = from {
                    if self.node.knows_membership() && !self.node.is_member(peer) {
                        tracing::warn!(%peer, "request from a node that is no member refused");
                        return Response::Refused(format!("node {peer} is not a member of this cluster"));
                    }
                }
                self.node.handle(from, other).await
            }
        }
    }
}

impl MemberHandler {
    async fn join(&self, request: JoinRequest) -> Result<JoinResponse, JoinError> {
        let state = consensus_state(self.node.store()).await?;
        let Some(secrets) = state.cluster else { return Err(JoinError::NotInitialised) };
        if !pki::secret_matches(&request.secret, &secrets.secret_hash) {
            tracing::warn!(addr = %request.addr, "join refused: wrong cluster secret");
            return Err(JoinError::WrongSecret);
        }
        if !self.node.is_leader() {
            // Forward to the leader (it adds the member).
            let (leader, info) = self.node.leader().ok_or(JoinError::NoLeader)?;
            return match hamail_cluster::rpc::Transport::call(&*self.transport, leader, &info, Request::Join(request))
                .await
            {
                Ok(Response::Join(r)) => r,
                Ok(other) => Err(JoinError::Failed(format!("unexpected answer from the leader: {other:?}"))),
                Err(e) => Err(JoinError::Failed(e.to_string())),
            };
        }
        let ca = ClusterCa::from_pem(&secrets.ca_cert_pem, &secrets.ca_key_pem)
            .map_err(|e| JoinError::Failed(e.to_string()))?;
        let id = self.node.allocate_node_id().await.map_err(|e| JoinError::Failed(e.to_string()))?;
        let creds = ca.issue_node_cert(id, &request.name).map_err(|e| JoinError::Failed(e.to_string()))?;
        let info = NodeInfo { addr: request.addr.clone(), role: request.role, name: request.name.clone() };
        let members = self.node.status().members;
        // The new node starts only when it has our answer, so its catch-up
        // (and promotion to voter) happens after we reply.
        let node = self.node.clone();
        tokio::spawn(async move {
            if let Err(e) = node.add_member_with_id(id, info).await {
                tracing::error!(%id, error = %e, "adding the joined node failed");
            }
        });
        tracing::info!(%id, addr = %request.addr, role = %request.role, "node joined");
        Ok(JoinResponse {
            node_id: id,
            cert_pem: creds.cert_pem,
            key_pem: creds.key_pem,
            ca_pem: creds.ca_pem,
            members,
        })
    }
}

async fn consensus_state(store: &Arc<LocalStore>) -> Result<ConsensusState, JoinError> {
    let bytes = store.consensus_state().await.map_err(|e| JoinError::Failed(e.to_string()))?;
    match bytes {
        None => Ok(ConsensusState::default()),
        Some(b) => postcard::from_bytes(&b).map_err(|e| JoinError::Failed(format!("consensus state: {e}"))),
    }
}

/// One line of `hamail cluster status`: a member as it sees itself, and
/// as the leader sees it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MemberReport {
    pub id: NodeId,
    pub name: String,
    pub addr: String,
    pub role: Role,
    /// Its own answer, or why there is none.
    pub state: String,
    pub term: Option<u64>,
    pub leader: Option<NodeId>,
    pub last_log_index: Option<u64>,
    pub last_applied: Option<u64>,
    /// From the leader: entries behind, and ms since its last answer.
    pub lag: Option<u64>,
    pub last_contact_ms: Option<u64>,
    /// From the leader: whether its Raft calls reach it ("up", "down"),
    /// how many of them failed and how often that state changed, since
    /// the leader started (see `hamail_cluster::network`).
    pub link: Option<String>,
    pub rpc_failures: Option<u64>,
    pub link_changes: Option<u64>,
    /// Its own links to the others, as its Raft calls found them.
    pub links: Vec<LinkStatus>,
    pub healthy: bool,
    /// Mail: bodies this node still has to fetch, and messages it accepted
    /// with fewer copies than there are data nodes (a data node was down).
    pub bodies_missing: Option<u64>,
    pub degraded_accepts: Option<u64>,
    /// Client requests refused with a temporary error for want of a quorum.
    pub refused_unavailable: Option<u64>,
    /// Bodies it fetched from another data node, and unreferenced body
    /// files its garbage collection removed, since it started.
    pub bodies_fetched: Option<u64>,
    pub bodies_collected: Option<u64>,
}

/// Every member's view (asked over the cluster channel, in parallel).
pub(crate) async fn status(ctx: &Arc<Context>) -> Result<Vec<MemberReport>, ServerError> {
    let rt = &ctx.cluster;
    let node = rt.node().ok_or_else(|| cluster_err("this node is not in a cluster (hamail cluster init / join)"))?;
    let transport = rt.transport.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
    let here = node.status();
    // The leader's replication view (lag, last contact).
    let leader_view = if here.current_leader == Some(here.id) {
        Some(here.clone())
    } else if let (Some((lid, linfo)), Some(t)) = (node.leader(), &transport) {
        match tokio::time::timeout(
            std::time::Duration::from_secs(2),
            hamail_cluster::rpc::Transport::call(&**t, lid, &linfo, Request::Status),
        )
        .await
        {
            Ok(Ok(Response::Status(s))) => Some(s),
            _ => None,
        }
    } else {
        None
    };
    let mut reports = Vec::new();
    let mut asks = Vec::new();
    for (id, info) in here.members.clone() {
        let t = transport.clone();
        let here = here.clone();
        asks.push(tokio::spawn(async move {
            if id == here.id {
                return (id, info, Ok(here));
            }
            let Some(t) = t else { return (id, info, Err("no transport".to_string())) };
            let answer = tokio::time::timeout(
                std::time::Duration::from_secs(2),
                hamail_cluster::rpc::Transport::call(&*t, id, &info, Request::Status),
            )
            .await;
            let r = match answer {
                Ok(Ok(Response::Status(s))) => Ok(s),
                Ok(Ok(other)) => Err(format!("unexpected answer {other:?}")),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err("no answer within 2 s".to_string()),
            };
            (id, info, r)
        }));
    }
    for ask in asks {
        let Ok((id, info, answer)) = ask.await else { continue };
        let progress = leader_view.as_ref().and_then(|l| l.replication.iter().find(|p| p.id == id).cloned());
        let link = leader_view.as_ref().and_then(|l| l.links.iter().find(|p| p.id == id).cloned());
        let mut r = MemberReport {
            id,
            name: info.name.clone(),
            addr: info.addr.clone(),
            role: info.role,
            state: String::new(),
            term: None,
            leader: None,
            last_log_index: None,
            last_applied: None,
            lag: progress.as_ref().and_then(|p| p.lag),
            last_contact_ms: progress.as_ref().and_then(|p| p.last_contact_ms),
            link: link.as_ref().map(|l| if l.reachable { "up" } else { "down" }.to_string()),
            rpc_failures: link.as_ref().map(|l| l.failed_calls),
            link_changes: link.as_ref().map(|l| l.state_changes),
            links: Vec::new(),
            healthy: false,
            bodies_missing: None,
            degraded_accepts: None,
            refused_unavailable: None,
            bodies_fetched: None,
            bodies_collected: None,
        };
        match answer {
            Ok(s) => {
                r.state = s.state.clone();
                r.term = Some(s.current_term);
                r.leader = s.current_leader;
                r.last_log_index = s.last_log_index;
                r.last_applied = s.last_applied;
                r.links = s.links.clone();
                r.healthy = s.current_leader.is_some() && s.state != "shutdown";
                if info.role == Role::Data {
                    r.bodies_missing = Some(s.mail.bodies_missing);
                    r.degraded_accepts = Some(s.mail.degraded_accepts);
                    r.refused_unavailable = Some(s.mail.refused_unavailable);
                    r.bodies_fetched = Some(s.mail.bodies_fetched);
                    r.bodies_collected = Some(s.mail.bodies_collected);
                }
                if s.current_leader == Some(id) {
                    r.lag = Some(0);
                }
            }
            Err(e) => r.state = format!("unreachable: {e}"),
        }
        reports.push(r);
    }
    reports.sort_by_key(|r| r.id);
    Ok(reports)
}

/// `hamail cluster remove NODE`, run on the leader (forwarded if needed by
/// the caller's retry on the leader's admin socket is not possible, so we
/// refuse with the leader's name instead).
pub(crate) async fn remove(ctx: &Arc<Context>, id: NodeId) -> Result<(), ServerError> {
    let node = ctx.cluster.node().ok_or_else(|| cluster_err("this node is not in a cluster"))?;
    if !node.is_member(id) {
        return Err(cluster_err(format!("node {id} is not a member")));
    }
    match node.remove_member(id).await {
        Ok(()) => Ok(()),
        Err(hamail_cluster::ClusterError::NotLeader { leader }) => {
            let at =
                node.leader().map(|(l, i)| format!("node {l} ({})", i.name)).or(leader.map(|l| format!("node {l}")));
            Err(cluster_err(format!(
                "membership changes run on the leader: run this on {}",
                at.unwrap_or_else(|| "the leader (none right now)".into())
            )))
        }
        Err(e) => Err(cluster_err(e)),
    }
}

/// `hamail store verify`: every data node re-hashes its bodies and fetches
/// good copies of damaged or missing ones from a peer.
pub(crate) async fn verify(ctx: &Arc<Context>) -> Result<Vec<(NodeId, Result<RepairReport, String>)>, ServerError> {
    let mail = ctx.cluster.mail.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
    match mail {
        Some(m) => Ok(m.verify_everywhere().await),
        None => {
            // A single node (or a witness): its own bodies only, no repair source.
            let r = ctx.local.verify().await?;
            Ok(vec![(
                ctx.cluster.node().map(|n| n.id()).unwrap_or(NodeId(0)),
                Ok(RepairReport {
                    node: NodeId(0),
                    checked: r.checked,
                    damaged: r.damaged,
                    unrepaired: r.missing.clone(),
                    missing: r.missing,
                    repaired: Vec::new(),
                }),
            )])
        }
    }
}

fn member(ctx: &Arc<Context>) -> Result<Arc<ClusterNode>, ServerError> {
    ctx.cluster.node().ok_or_else(|| cluster_err("this node is not in a cluster (hamail cluster init / join)"))
}

/// `hamail group apply FILE`: adds or replaces groups.
pub(crate) async fn put_groups(ctx: &Arc<Context>, specs: Vec<GroupSpec>) -> Result<(), ServerError> {
    let node = member(ctx)?;
    for spec in specs {
        node.put_group(spec).await.map_err(ServerError::from)?;
    }
    Ok(())
}

pub(crate) async fn group_command(
    ctx: &Arc<Context>,
    op: &str,
    name: &str,
    to: Option<u64>,
) -> Result<String, ServerError> {
    let node = member(ctx)?;
    match op {
        "del" => node.remove_group(name).await.map(|()| format!("group {name} removed")),
        "start" => node.start_group(name).await.map(|()| format!("group {name} starting")),
        "stop" => node.stop_group(name).await.map(|()| format!("group {name} stopping")),
        "clear" => node.clear_group(name).await.map(|()| format!("group {name} cleared: offline")),
        "move" => node.move_group(name, to.map(NodeId)).await.map(|dest| format!("group {name} moving to node {dest}")),
        other => return Err(cluster_err(format!("unknown group command {other}"))),
    }
    .map_err(ServerError::from)
}

/// Every group and where it runs (a linearizable view).
pub(crate) async fn groups_status(ctx: &Arc<Context>) -> Result<Vec<GroupStatus>, ServerError> {
    let node = member(ctx)?;
    node.linearizable().await.map_err(cluster_err)?;
    Ok(node.groups_status())
}

/// `hamail node stop [NODE]`: moves its groups away.
pub(crate) async fn drain(
    ctx: &Arc<Context>,
    which: Option<u64>,
) -> Result<Vec<(String, Option<NodeId>)>, ServerError> {
    let node = member(ctx)?;
    let target = which.map(NodeId).unwrap_or_else(|| node.id());
    node.drain_node(target).await.map_err(ServerError::from)
}

/// A service stop (SIGTERM, Ctrl-C) in a cluster: every group this node
/// runs goes to the next node of its list that is a live member, and this
/// waits (at most `within`) until they have all been stopped here — the
/// other node starts each one after its stop, as on a `group move`, not
/// after the delay of a power cut. A group with no live node to go to stays
/// where the cluster has it (it is not marked stopped: it starts again with
/// this node, or on another node if this one stays away). Returns the
/// groups handed over and to whom.
pub async fn hand_over(ctx: &Arc<Context>, within: std::time::Duration) -> Vec<(String, NodeId)> {
    let Some(node) = ctx.cluster.node() else { return Vec::new() };
    let me = node.id();
    if node.linearizable().await.is_err() {
        tracing::warn!("service stop: no quorum to hand the groups over; they fail over when this node is missed");
        return Vec::new();
    }
    let live = |id: NodeId| node.is_member(id) && !node.peer_silent(id);
    let mut moved = Vec::new();
    for g in node.groups_status() {
        let p = &g.placement;
        if p.owner != Some(me) || p.target == hamail_cluster::groups::GroupTarget::Stopped {
            continue;
        }
        let Some(dest) = hamail_cluster::failover::next_after_where(&g.spec.nodes, Some(me), live) else {
            tracing::warn!(group = %g.spec.name, "service stop: no live node to take the group over");
            continue;
        };
        match node.set_group_target(&g.spec.name, hamail_cluster::groups::GroupTarget::Node(dest)).await {
            Ok(()) => {
                tracing::info!(group = %g.spec.name, to = %dest, "service stop: handing the group over");
                moved.push((g.spec.name.clone(), dest));
            }
            Err(e) => tracing::warn!(group = %g.spec.name, error = %e, "service stop: the group not handed over"),
        }
    }
    let deadline = std::time::Instant::now() + within;
    loop {
        let still: Vec<String> = node
            .groups_status()
            .into_iter()
            .filter(|g| moved.iter().any(|(name, _)| *name == g.spec.name) && g.placement.owner == Some(me))
            .map(|g| g.spec.name)
            .collect();
        if still.is_empty() {
            break;
        }
        if std::time::Instant::now() >= deadline {
            tracing::warn!(groups = ?still, "service stop: still stopping here after {within:?}; stopping anyway");
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    moved
}

pub(crate) async fn log_show(
    ctx: &Arc<Context>,
    limit: usize,
) -> Result<Vec<hamail_cluster::groups::ClusterEvent>, ServerError> {
    let node = member(ctx)?;
    node.linearizable().await.map_err(cluster_err)?;
    node.events(limit).await.map_err(ServerError::from)
}

pub(crate) async fn log_write(ctx: &Arc<Context>, text: String) -> Result<(), ServerError> {
    let node = member(ctx)?;
    node.log_event(EventKind::Note, None, None, text).await.map_err(ServerError::from)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::{LoginPolicy, Network};
    use std::time::{Duration, Instant};

    #[test]
    fn bans_from_the_cluster_are_held_until_their_end_and_lifted() {
        let logins = Logins::new(LoginPolicy {
            per_address: 10,
            per_account: 30,
            window: Duration::from_secs(900),
            ban: Duration::from_secs(900),
            base_delay: Duration::from_millis(100),
            exempt: vec![Network::LOOPBACK_V4],
        });
        let (now_unix, now) = (1_000_000, Instant::now());
        let set = |target: &str, until| BanChange::Set { target: target.into(), until, failures: 10 };
        hold_ban(&logins, set("192.0.2.1", now_unix + 60), now_unix, now);
        hold_ban(&logins, set("bob@example.org", now_unix + 120), now_unix, now);
        // Already over, or not a target: nothing.
        hold_ban(&logins, set("192.0.2.2", now_unix), now_unix, now);
        hold_ban(&logins, set("not a target", now_unix + 60), now_unix, now);
        let held: Vec<(String, u64)> =
            logins.list(now).iter().map(|b| (b.target.name(), b.remaining.as_secs())).collect();
        assert_eq!(held, vec![("192.0.2.1".to_string(), 60), ("bob@example.org".to_string(), 120)]);
        hold_ban(&logins, BanChange::Lift { target: "192.0.2.1".into() }, now_unix, now);
        assert_eq!(logins.list(now).len(), 1);
        // An end past what the clock holds (a bad or hostile entry) does not
        // panic: the ban is held for the longest a config may set.
        hold_ban(&logins, set("192.0.2.3", u64::MAX), now_unix, now);
        let far = logins.list(now).into_iter().find(|b| b.target.name() == "192.0.2.3").map(|b| b.remaining);
        assert_eq!(far, Some(Duration::from_secs(crate::limits::MAX_CONFIG_SECS)));
    }
}
