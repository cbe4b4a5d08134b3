//! Test support: an in-process, fault-injecting network (the
//! [`Switchboard`]) and a cluster of real nodes (each with its own mail
//! store, Raft log and snapshot in a temporary directory) on it.
//!
//! Faults, all changeable while the cluster runs: partitions (every link
//! between two sets of nodes cut), message loss (a lost request is
//! "unreachable", a lost answer is "failed": the request did run), and
//! random delays in a range (which also reorders messages). Requests and
//! answers go through postcard like on the wire.

#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hamail_cluster::rpc::{Handler, Request, Response, Transport, TransportError};
use hamail_cluster::{ClusterNode, NodeId, NodeInfo, Role, Timing};
use hamail_store::{DirectorySnapshot, LocalStore, StoreOptions};
use openraft::ServerState;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

#[derive(Default)]
struct Faults {
    /// Directed links that are cut.
    cut: HashSet<(NodeId, NodeId)>,
    /// Probability that a request, or independently its answer, is lost.
    loss: f64,
    /// Added one-way delay, milliseconds, uniform in the range.
    delay_ms: Option<(u64, u64)>,
}

/// The in-process network. See the module documentation.
pub struct Switchboard {
    nodes: Mutex<HashMap<NodeId, Arc<dyn Handler>>>,
    faults: Mutex<Faults>,
    rng: Mutex<StdRng>,
}

impl Switchboard {
    pub fn new(seed: u64) -> Arc<Self> {
        Arc::new(Switchboard {
            nodes: Mutex::new(HashMap::new()),
            faults: Mutex::new(Faults::default()),
            rng: Mutex::new(StdRng::seed_from_u64(seed)),
        })
    }

    /// The transport node `from` uses.
    pub fn endpoint(self: &Arc<Self>, from: NodeId) -> Arc<dyn Transport> {
        Arc::new(Endpoint { from, board: self.clone() })
    }

    pub fn register(&self, id: NodeId, handler: Arc<dyn Handler>) {
        self.nodes.lock().unwrap().insert(id, handler);
    }

    pub fn unregister(&self, id: NodeId) {
        self.nodes.lock().unwrap().remove(&id);
    }

    /// Cuts every link between `a` and `b` (both directions).
    pub fn partition(&self, a: &[NodeId], b: &[NodeId]) {
        let mut f = self.faults.lock().unwrap();
        for x in a {
            for y in b {
                f.cut.insert((*x, *y));
                f.cut.insert((*y, *x));
            }
        }
    }

    /// Cuts `id` from everyone in `all`.
    pub fn isolate(&self, id: NodeId, all: &[NodeId]) {
        let others: Vec<NodeId> = all.iter().copied().filter(|n| *n != id).collect();
        self.partition(&[id], &others);
    }

    /// Restores every link (loss and delay stay).
    pub fn heal(&self) {
        self.faults.lock().unwrap().cut.clear();
    }

    pub fn set_loss(&self, p: f64) {
        self.faults.lock().unwrap().loss = p;
    }

    pub fn set_delay(&self, range_ms: Option<(u64, u64)>) {
        self.faults.lock().unwrap().delay_ms = range_ms;
    }

    fn is_cut(&self, from: NodeId, to: NodeId) -> bool {
        self.faults.lock().unwrap().cut.contains(&(from, to))
    }

    /// Whether this message is lost, and its delay.
    fn roll(&self) -> (bool, Duration) {
        let (loss, delay) = {
            let f = self.faults.lock().unwrap();
            (f.loss, f.delay_ms)
        };
        let mut rng = self.rng.lock().unwrap();
        let lost = loss > 0.0 && rng.gen_bool(loss.min(1.0));
        let d = match delay {
            Some((lo, hi)) if hi > lo => rng.gen_range(lo..hi),
            Some((lo, _)) => lo,
            None => 0,
        };
        (lost, Duration::from_millis(d))
    }
}

struct Endpoint {
    from: NodeId,
    board: Arc<Switchboard>,
}

fn wire<T: serde::Serialize + serde::de::DeserializeOwned>(v: &T) -> T {
    let bytes = postcard::to_allocvec(v).expect("encode");
    postcard::from_bytes(&bytes).expect("decode")
}

#[async_trait::async_trait]
impl Transport for Endpoint {
    async fn call(&self, target: NodeId, _node: &NodeInfo, request: Request) -> Result<Response, TransportError> {
        let unreachable = |why: &str| TransportError::Unreachable { node: target.to_string(), reason: why.into() };
        let (lost, delay) = self.board.roll();
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        if self.board.is_cut(self.from, target) {
            return Err(unreachable("partitioned"));
        }
        if lost {
            // A flaky link, not a dead node: the request timed out.
            return Err(TransportError::Failed { node: target.to_string(), reason: "request lost".into() });
        }
        let handler = self.board.nodes.lock().unwrap().get(&target).cloned();
        let Some(handler) = handler else { return Err(unreachable("not running")) };
        let response = handler.handle(Some(self.from), wire(&request)).await;
        let (lost, delay) = self.board.roll();
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let failed = |why: &str| TransportError::Failed { node: target.to_string(), reason: why.into() };
        if self.board.is_cut(target, self.from) {
            return Err(failed("partitioned before the answer"));
        }
        if lost {
            return Err(failed("answer lost"));
        }
        Ok(wire(&response))
    }
}

/// Polls `f` until it returns `Some`, or panics after `timeout`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

pub struct TestNode {
    pub id: NodeId,
    pub info: NodeInfo,
    pub dir: PathBuf,
    /// `None` while stopped.
    pub node: Option<Arc<ClusterNode>>,
}

/// (term → nodes seen leading it), from every node's metrics.
type LeaderLog = Arc<Mutex<BTreeMap<u64, BTreeSet<NodeId>>>>;

pub struct TestCluster {
    pub board: Arc<Switchboard>,
    pub nodes: BTreeMap<NodeId, TestNode>,
    pub timing: Timing,
    leaders: LeaderLog,
    _root: tempfile::TempDir,
}

/// The node's store; queue ids carry the node id (unique cluster-wide).
fn open_store(dir: &std::path::Path, id: NodeId) -> Result<Arc<LocalStore>, hamail_store::StoreError> {
    let node_prefix = u16::try_from(id.0).unwrap_or(u16::MAX);
    LocalStore::open(&dir.join("store"), StoreOptions { fsync: false, node_prefix, ..StoreOptions::default() })
}

impl TestCluster {
    /// A cluster of `n` voters: node 1 initialises, the others are added by
    /// the leader with ids allocated through the log (2, 3, ...).
    pub async fn start(n: u64, timing: Timing, seed: u64) -> TestCluster {
        let roles: Vec<Role> = (1..=n).map(|i| if i == 3 && n == 3 { Role::Witness } else { Role::Data }).collect();
        Self::start_with_roles(&roles, timing, seed).await
    }

    /// A cluster of voters with these roles (node `i + 1` has `roles[i]`).
    pub async fn start_with_roles(roles: &[Role], timing: Timing, seed: u64) -> TestCluster {
        // RUST_LOG=hamail_cluster=debug shows the nodes' logs (with
        // --nocapture) when a test needs explaining.
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        let n = roles.len() as u64;
        let root = tempfile::tempdir().unwrap();
        let mut c = TestCluster {
            board: Switchboard::new(seed),
            nodes: BTreeMap::new(),
            timing,
            leaders: Arc::new(Mutex::new(BTreeMap::new())),
            _root: root,
        };
        for i in 1..=n {
            let id = NodeId(i);
            let info = NodeInfo {
                addr: format!("node{i}.test:7000"),
                role: roles[(i - 1) as usize],
                name: format!("node{i}"),
            };
            let dir = c._root.path().join(format!("node{i}"));
            c.nodes.insert(id, TestNode { id, info, dir, node: None });
            c.boot(id).await;
        }
        c.node(NodeId(1)).initialize().await.unwrap();
        c.wait_leader(Duration::from_secs(10)).await;
        for i in 2..=n {
            let leader = c.leader().await;
            let info = c.nodes[&NodeId(i)].info.clone();
            let id = leader.add_member(info).await.unwrap();
            assert_eq!(id, NodeId(i), "node ids are allocated in order");
        }
        let all = c.ids();
        eventually("every node to see the full membership", Duration::from_secs(10), || {
            let c = &c;
            let all = all.clone();
            async move {
                let ok = c.running().iter().all(|n| {
                    let m = n.raft().metrics().borrow().clone();
                    let voters: Vec<NodeId> = m.membership_config.membership().voter_ids().collect();
                    voters == all
                });
                ok.then_some(())
            }
        })
        .await;
        c
    }

    /// Starts (or restarts) node `id` on its directory.
    pub async fn boot(&mut self, id: NodeId) {
        let t = self.nodes.get(&id).unwrap();
        let (info, dir) = (t.info.clone(), t.dir.clone());
        // After a stop, the store's redb file may still be held by tasks
        // that are winding down: try again for a while.
        let store = eventually("the store to reopen", Duration::from_secs(10), || {
            let dir = dir.clone();
            async move { open_store(&dir, id).ok() }
        })
        .await;
        let node =
            ClusterNode::start(id, info, &dir, store, self.board.endpoint(id), self.timing.clone()).await.unwrap();
        self.board.register(id, node.clone());
        spawn_leader_watch(&node, self.leaders.clone());
        self.nodes.get_mut(&id).unwrap().node = Some(node);
    }

    /// Stops node `id` (as a crash would: nothing is handed over).
    pub async fn stop(&mut self, id: NodeId) {
        self.board.unregister(id);
        let node = self.nodes.get_mut(&id).unwrap().node.take().unwrap();
        node.shutdown().await.unwrap();
        drop(node);
    }

    pub fn ids(&self) -> Vec<NodeId> {
        self.nodes.keys().copied().collect()
    }

    pub fn node(&self, id: NodeId) -> Arc<ClusterNode> {
        self.nodes[&id].node.clone().expect("node is running")
    }

    pub fn running(&self) -> Vec<Arc<ClusterNode>> {
        self.nodes.values().filter_map(|n| n.node.clone()).collect()
    }

    /// Waits until some running node is leader and returns its id.
    pub async fn wait_leader(&self, timeout: Duration) -> NodeId {
        self.wait_leader_among(&self.ids(), timeout).await
    }

    /// Waits until one of `among` leads, acknowledged by a majority of
    /// `among`'s running nodes (their metrics name it).
    pub async fn wait_leader_among(&self, among: &[NodeId], timeout: Duration) -> NodeId {
        let nodes: Vec<Arc<ClusterNode>> = among.iter().filter_map(|id| self.nodes[id].node.clone()).collect();
        eventually("a leader", timeout, || {
            let nodes = nodes.clone();
            async move {
                for n in &nodes {
                    let m = n.raft().metrics().borrow().clone();
                    if m.state == ServerState::Leader {
                        let voters: Vec<NodeId> = m.membership_config.voter_ids().collect();
                        let majority = voters.len() / 2 + 1;
                        let followers = nodes
                            .iter()
                            .filter(|o| {
                                let om = o.raft().metrics().borrow().clone();
                                voters.contains(&om.id)
                                    && om.current_leader == Some(m.id)
                                    && om.current_term == m.current_term
                            })
                            .count();
                        if followers >= majority {
                            return Some(m.id);
                        }
                    }
                }
                None
            }
        })
        .await
    }

    pub async fn leader(&self) -> Arc<ClusterNode> {
        let id = self.wait_leader(Duration::from_secs(10)).await;
        self.node(id)
    }

    /// Fails if any term had two leaders, as seen by any node.
    pub fn check_one_leader_per_term(&self) {
        let log = self.leaders.lock().unwrap();
        for (term, leaders) in log.iter() {
            assert!(leaders.len() <= 1, "term {term} had several leaders: {leaders:?}");
        }
    }

    pub fn terms_seen(&self) -> usize {
        self.leaders.lock().unwrap().len()
    }

    /// Waits until every running node has applied the same last index as
    /// the leader's log and holds the same directory, and returns it.
    pub async fn converged(&self, timeout: Duration) -> DirectorySnapshot {
        let nodes = self.running();
        eventually("all nodes to converge", timeout, || {
            let nodes = nodes.clone();
            async move {
                let last: Vec<Option<u64>> =
                    nodes.iter().map(|n| n.raft().metrics().borrow().last_applied.map(|l| l.index)).collect();
                let leader_last = nodes.iter().find_map(|n| {
                    let m = n.raft().metrics().borrow().clone();
                    (m.state == ServerState::Leader).then_some(m.last_log_index)
                })?;
                if last.iter().any(|l| *l != leader_last) {
                    return None;
                }
                let mut exports = Vec::new();
                for n in &nodes {
                    exports.push(n.store().export_directory().await.ok()?);
                }
                exports.windows(2).all(|w| w[0] == w[1]).then(|| exports.remove(0))
            }
        })
        .await
    }
}

/// Records (term, leader) from a node's metrics: its own leadership and
/// the leader it follows.
fn spawn_leader_watch(node: &Arc<ClusterNode>, log: LeaderLog) {
    let mut rx = node.raft().metrics();
    tokio::spawn(async move {
        loop {
            {
                let m = rx.borrow_and_update().clone();
                let mut log = log.lock().unwrap();
                if m.state == ServerState::Leader {
                    log.entry(m.current_term).or_default().insert(m.id);
                }
                if let Some(l) = m.current_leader {
                    log.entry(m.current_term).or_default().insert(l);
                }
            }
            if rx.changed().await.is_err() {
                return;
            }
        }
    });
}
