//! The replicated mail store under faults: real nodes (store, Raft log,
//! state machine, [`ReplicatedStore`]) in one process on the
//! fault-injecting switchboard.
//!
//! What must hold, whatever fails: an acknowledged message (a `Committed`
//! came back) is in each recipient's maildrop exactly once, with the same
//! entry id and byte-identical body on every data node once they have
//! caught up; an unacknowledged one is there at most once; a node that
//! missed bodies fetches them; a witness holds none.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{eventually, TestCluster};
use hamail_cluster::rpc::{Handler, Request, Response};
use hamail_cluster::{NodeId, ReplicatedDirectory, ReplicatedStore, Replication, Role, Timing};
use hamail_store::{Address, Body, BodyHash, Directory, Domain, Incoming, MailStore, MemoryGate, QueueId, StoreError};
use openraft::ServerState;

const LONG: Duration = Duration::from_secs(30);

fn alice() -> Address {
    Address::parse("alice@example.org").unwrap()
}

fn bob() -> Address {
    Address::parse("bob@example.org").unwrap()
}

/// A test cluster with a [`ReplicatedStore`] on every running data node.
struct MailCluster {
    c: TestCluster,
    stores: BTreeMap<NodeId, Arc<ReplicatedStore>>,
    replication: Replication,
}

impl MailCluster {
    async fn start(roles: &[Role], timing: Timing, seed: u64, replication: Replication) -> MailCluster {
        let c = TestCluster::start_with_roles(roles, timing, seed).await;
        let dir = ReplicatedDirectory::new(c.leader().await);
        dir.add_domain(&Domain::parse("example.org").unwrap()).await.unwrap();
        dir.add_user(&alice(), "pw").await.unwrap();
        dir.add_user(&bob(), "pw").await.unwrap();
        let mut m = MailCluster { c, stores: BTreeMap::new(), replication };
        for id in m.c.ids() {
            m.open_store(id);
        }
        m
    }

    fn open_store(&mut self, id: NodeId) {
        if self.c.nodes[&id].info.role == Role::Data {
            let store = ReplicatedStore::new(self.c.node(id), self.replication.clone()).unwrap();
            self.stores.insert(id, Arc::new(store));
        }
    }

    fn store(&self, id: NodeId) -> Arc<ReplicatedStore> {
        self.stores[&id].clone()
    }

    fn data_ids(&self) -> Vec<NodeId> {
        self.stores.keys().copied().collect()
    }

    /// Stops a node (its mail store first: it holds the node).
    async fn stop(&mut self, id: NodeId) {
        self.stores.remove(&id);
        self.c.stop(id).await;
    }

    async fn boot(&mut self, id: NodeId) {
        self.c.boot(id).await;
        self.open_store(id);
    }

    /// Waits until every running node applied the leader's whole log and
    /// holds the same replicated state (directory and mail metadata).
    async fn converged(&self) {
        let nodes = self.c.running();
        eventually("all nodes to apply the same mail", LONG, || {
            let nodes = nodes.clone();
            async move {
                let leader_last = nodes.iter().find_map(|n| {
                    let m = n.raft().metrics().borrow().clone();
                    (m.state == ServerState::Leader).then_some(m.last_log_index)
                })?;
                if nodes.iter().any(|n| n.raft().metrics().borrow().last_applied.map(|l| l.index) != leader_last) {
                    return None;
                }
                let mut states = Vec::new();
                for n in &nodes {
                    states.push(n.store().export_state().await.ok()?);
                }
                states.windows(2).all(|w| w[0] == w[1]).then_some(())
            }
        })
        .await;
    }

    /// Waits until no data node misses a body.
    async fn bodies_complete(&self) {
        let stores: Vec<_> = self.stores.values().cloned().collect();
        eventually("every data node to hold every body", LONG, || {
            let stores = stores.clone();
            async move {
                for s in &stores {
                    if !s.node().store().missing_bodies().await.ok()?.is_empty() {
                        return None;
                    }
                }
                Some(())
            }
        })
        .await;
    }

    async fn shutdown(mut self) {
        self.c.check_one_leader_per_term();
        self.stores.clear();
        for n in self.c.running() {
            n.shutdown().await.unwrap();
        }
    }
}

async fn message(store: &ReplicatedStore, to: &[Address], text: &str) -> Incoming {
    let queue_id = store.next_queue_id().await.unwrap();
    Incoming {
        return_path: Some("sender@example.net".into()),
        local: to.to_vec(),
        remote: Vec::new(),
        body: format!("Subject: {text}\r\n\r\n{text}\r\n").into_bytes().into(),
        queue_id,
        resend: None,
    }
}

/// The bytes of a message built by [`message`].
fn bytes_of(msg: &Incoming) -> Arc<Vec<u8>> {
    match &msg.body {
        Body::Bytes(bytes) => bytes.clone(),
        Body::Staged(_) => panic!("a test message is in memory"),
    }
}

/// The same message again (a client's retry).
fn copy(msg: &Incoming) -> Incoming {
    Incoming {
        return_path: msg.return_path.clone(),
        local: msg.local.clone(),
        remote: msg.remote.clone(),
        body: Body::Bytes(bytes_of(msg)),
        queue_id: msg.queue_id,
        resend: msg.resend,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_data_nodes_replicate_accept_delete_and_retry() {
    let m = MailCluster::start(&[Role::Data; 3], Timing::default(), 11, Replication::default()).await;
    let leader = m.c.leader().await.id();
    let follower = m.data_ids().into_iter().find(|id| *id != leader).unwrap();

    // On the leader: when accept returns, the body is durable on every
    // data node (all are up), and every node applies the same entries.
    let on_leader = m.store(leader);
    let msg = message(&on_leader, &[alice(), bob()], "one").await;
    let body = bytes_of(&msg);
    let committed = on_leader.accept(msg).await.unwrap();
    assert_eq!(committed.body(), BodyHash::of(&body));
    assert_eq!(committed.size(), body.len() as u64);
    for id in m.data_ids() {
        assert!(m.c.node(id).store().has_body(&committed.body()).await.unwrap(), "body on node {id}");
    }
    // On a follower: forwarded, and applied there before it returns.
    let on_follower = m.store(follower);
    let msg = message(&on_follower, &[alice()], "two").await;
    let two = on_follower.accept(msg).await.unwrap();
    assert!(m.c.node(follower).store().committed(two.queue_id()).await.unwrap().is_some());
    assert_eq!(two.queue_id().0 >> 48, follower.0, "queue ids carry the node id");

    // A retried accept (same queue id) delivers once.
    let msg = message(&on_follower, &[bob()], "retried").await;
    let first = on_follower.accept(copy(&msg)).await.unwrap();
    let again = on_leader.accept(msg).await.unwrap();
    assert_eq!(first.queue_id(), again.queue_id());

    m.converged().await;
    let reference = m.c.node(leader).store().mailbox(&alice()).await.unwrap();
    assert_eq!(reference.len(), 2);
    for id in m.data_ids() {
        let local = m.c.node(id).store().clone();
        assert_eq!(local.mailbox(&alice()).await.unwrap(), reference, "same entries and ids on node {id}");
        let bobs = local.mailbox(&bob()).await.unwrap();
        assert_eq!(bobs.len(), 2, "the retried message is delivered once");
        // Through the replicated store: linearizable, bodies readable.
        let entries = m.store(id).mailbox(&alice()).await.unwrap();
        assert_eq!(entries, reference);
        assert_eq!(*m.store(id).body(&entries[0].body).await.unwrap(), *body);
    }

    // Delete on a follower: gone everywhere.
    on_follower.delete(&alice(), &[reference[0].id]).await.unwrap();
    for id in m.data_ids() {
        let left = m.store(id).mailbox(&alice()).await.unwrap();
        assert_eq!(left, reference[1..].to_vec(), "delete replicated to node {id}");
    }

    // Only members may send bodies.
    let data = b"x".to_vec();
    let put = Request::PutBody { hash: BodyHash::of(&data), data };
    assert!(matches!(m.c.node(follower).handle(None, put).await, Response::Refused(_)));
    // A body that does not match its hash is refused.
    let put = Request::PutBody { hash: BodyHash::of(b"y"), data: b"x".to_vec() };
    assert!(matches!(m.c.node(follower).handle(Some(leader), put).await, Response::PutBody(Err(_))));

    // Latency of one session, on the leader and on a follower.
    for (name, store) in [("leader", &on_leader), ("follower", &on_follower)] {
        let t = Instant::now();
        for i in 0..50 {
            let msg = message(store, &[bob()], &format!("{name} latency {i}")).await;
            store.accept(msg).await.unwrap();
        }
        eprintln!("one session on the {name}: {:.1} ms per accept", t.elapsed().as_secs_f64() * 1000.0 / 50.0);
    }

    // Throughput, in process (no fsync): 16 sessions.
    let n = 400;
    let t = Instant::now();
    let mut tasks = Vec::new();
    for s in 0..16 {
        let store = if s % 2 == 0 { on_leader.clone() } else { on_follower.clone() };
        tasks.push(tokio::spawn(async move {
            for i in 0..n / 16 {
                let msg = message(&store, &[alice()], &format!("bulk {s} {i}")).await;
                store.accept(msg).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let rate = n as f64 / t.elapsed().as_secs_f64();
    eprintln!("replicated accepts, 3 data nodes, 16 sessions: {rate:.0} msgs/s");
    m.converged().await;
    assert_eq!(m.c.node(leader).store().mailbox(&alice()).await.unwrap().len(), 1 + n);
    for id in m.data_ids() {
        assert_eq!(m.c.node(id).status().mail.degraded_accepts, 0);
    }
    m.shutdown().await;
}

/// What concurrent SMTP-like sessions saw: acknowledged messages (queue
/// id, recipients, body) and the number of temporary refusals.
/// An acknowledged message: queue id, recipients, body.
type Acked = (QueueId, Vec<Address>, Arc<Vec<u8>>);

#[derive(Clone, Default)]
struct Sessions {
    acked: Arc<Mutex<Vec<Acked>>>,
    refused: Arc<Mutex<usize>>,
    stop: Arc<AtomicBool>,
    tasks: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
}

impl Sessions {
    /// `per_node` sessions accepting in a loop on every data node.
    fn spawn(m: &MailCluster, per_node: usize) -> Sessions {
        let s = Sessions::default();
        for id in m.data_ids() {
            for session in 0..per_node {
                let store = m.store(id);
                let me = s.clone();
                let task = tokio::spawn(async move {
                    let mut i = 0;
                    while !me.stop.load(Ordering::Relaxed) {
                        let to = if i % 3 == 0 { vec![alice(), bob()] } else { vec![alice()] };
                        let msg = message(&store, &to, &format!("node {id} session {session} #{i}")).await;
                        let (qid, body) = (msg.queue_id, bytes_of(&msg));
                        match store.accept(msg).await {
                            Ok(c) => {
                                assert_eq!(c.queue_id(), qid);
                                me.acked.lock().unwrap().push((qid, to, body));
                            }
                            Err(e) => {
                                assert!(e.is_temporary(), "only temporary failures: {e}");
                                *me.refused.lock().unwrap() += 1;
                                tokio::time::sleep(Duration::from_millis(20)).await;
                            }
                        }
                        i += 1;
                    }
                });
                s.tasks.lock().unwrap().push(task);
            }
        }
        s
    }

    fn acked(&self) -> usize {
        self.acked.lock().unwrap().len()
    }

    async fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
        let tasks = std::mem::take(&mut *self.tasks.lock().unwrap());
        for t in tasks {
            t.await.unwrap();
        }
    }

    /// Once the cluster converged: every acknowledged message exactly once
    /// in each recipient's maildrop on every data node, with its body
    /// byte-identical; no message (acknowledged or not) twice; the same
    /// maildrops everywhere.
    async fn check_exactly_once(&self, m: &MailCluster) {
        m.converged().await;
        m.bodies_complete().await;
        let acked = self.acked.lock().unwrap().clone();
        let expected: BTreeMap<QueueId, (Vec<Address>, Arc<Vec<u8>>)> =
            acked.iter().map(|(q, to, b)| (*q, (to.clone(), b.clone()))).collect();
        assert_eq!(expected.len(), acked.len(), "queue ids are unique cluster-wide");
        let first = m.data_ids()[0];
        let reference = {
            let s = m.c.node(first).store().clone();
            vec![s.mailbox(&alice()).await.unwrap(), s.mailbox(&bob()).await.unwrap()]
        };
        for id in m.data_ids() {
            let store = m.c.node(id).store().clone();
            for (user, want) in [alice(), bob()].into_iter().zip(&reference) {
                let entries = store.mailbox(&user).await.unwrap();
                assert_eq!(&entries, want, "node {id} has the same maildrop of {user}");
                let mut seen = BTreeSet::new();
                for e in &entries {
                    assert!(seen.insert(e.queue_id), "message {} twice in {user}'s maildrop on node {id}", e.queue_id);
                    if let Some((_, body)) = expected.get(&e.queue_id) {
                        assert_eq!(*store.body(&e.body).await.unwrap(), **body, "body of {} on node {id}", e.queue_id);
                    }
                }
                for (q, (to, _)) in &expected {
                    if to.contains(&user) {
                        assert!(seen.contains(q), "acknowledged message {q} missing in {user}'s maildrop on node {id}");
                    }
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn accepts_survive_a_partitioned_leader_exactly_once() {
    let timing = Timing { write_timeout_ms: 3000, ..Timing::default() };
    let replication = Replication { put_timeout: Duration::from_millis(500), ..Replication::default() };
    let m = MailCluster::start(&[Role::Data; 3], timing, 12, replication).await;
    let all = m.c.ids();
    let sessions = Sessions::spawn(&m, 3);
    tokio::time::sleep(Duration::from_millis(700)).await;
    let old = m.c.leader().await.id();
    let rest: Vec<NodeId> = all.iter().copied().filter(|id| *id != old).collect();
    m.c.board.isolate(old, &all);
    let new = m.c.wait_leader_among(&rest, LONG).await;
    // The majority keeps accepting: poll for new acknowledgements (a fixed
    // window was flaky on a loaded machine: forwarded writes in flight to
    // the cut-off leader take their timeout first).
    let before = sessions.acked();
    let deadline = Instant::now() + LONG;
    while sessions.acked() < before + 5 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let during = sessions.acked() - before;
    m.c.board.heal();
    tokio::time::sleep(Duration::from_millis(700)).await;
    sessions.stop().await;
    eprintln!(
        "leader {old} cut off, {new} took over: {} acknowledged ({during} after the election), {} refused",
        sessions.acked(),
        sessions.refused.lock().unwrap()
    );
    assert!(during > 0, "the majority kept accepting mail");
    sessions.check_exactly_once(&m).await;
    m.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn accepts_on_a_lossy_network_are_delivered_at_most_once() {
    // Lost requests and lost answers: forwarded writes end "unknown" and
    // are checked and re-proposed, body copies fail now and then.
    let timing = Timing { write_timeout_ms: 3000, ..Timing::default() };
    let replication = Replication { put_timeout: Duration::from_millis(500), ..Replication::default() };
    let m = MailCluster::start(&[Role::Data; 3], timing, 16, replication).await;
    m.c.board.set_loss(0.05);
    m.c.board.set_delay(Some((0, 5)));
    let sessions = Sessions::spawn(&m, 2);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    sessions.stop().await;
    m.c.board.set_loss(0.0);
    m.c.board.set_delay(None);
    eprintln!("lossy network: {} acknowledged, {} refused", sessions.acked(), sessions.refused.lock().unwrap());
    assert!(sessions.acked() > 0);
    sessions.check_exactly_once(&m).await;
    m.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_partitioned_node_fetches_the_bodies_it_missed() {
    // Small snapshots: the cut-off node catches up by a snapshot, whose
    // mail references bodies it never received.
    let timing = Timing { snapshot_every: 10, logs_kept_after_snapshot: 2, ..Timing::default() };
    let replication = Replication { put_timeout: Duration::from_millis(300), ..Replication::default() };
    let m = MailCluster::start(&[Role::Data; 3], timing, 13, replication).await;
    let all = m.c.ids();
    let leader = m.c.leader().await.id();
    let cut = m.data_ids().into_iter().find(|id| *id != leader).unwrap();
    m.c.board.isolate(cut, &all);
    let on_leader = m.store(leader);
    let mut hashes = Vec::new();
    for i in 0..30 {
        let msg = message(&on_leader, &[alice()], &format!("while {cut} was away #{i}")).await;
        hashes.push(on_leader.accept(msg).await.unwrap().body());
    }
    assert_eq!(m.c.node(leader).status().mail.degraded_accepts, 30);
    let cut_store = m.c.node(cut).store().clone();
    for h in &hashes {
        assert!(!cut_store.has_body(h).await.unwrap());
    }
    // A read of a body this node lacks fetches it (here: nobody reachable).
    assert!(matches!(m.store(cut).body(&hashes[0]).await, Err(StoreError::Temporary(_))));
    assert!(matches!(m.store(cut).open_body(&hashes[0]).await, Err(StoreError::Temporary(_))));

    m.c.board.heal();
    m.converged().await;
    m.bodies_complete().await;
    for h in &hashes {
        assert!(cut_store.has_body(h).await.unwrap());
    }
    assert_eq!(cut_store.mailbox(&alice()).await.unwrap().len(), 30);
    // Eventually: a fetch counts itself after its file is in place, so the
    // files can all be there a moment before the last count (seen once in
    // CI, under load).
    eventually("every missed body to count as fetched", LONG, || async {
        (m.c.node(cut).status().mail.bodies_fetched >= 30).then_some(())
    })
    .await;
    eventually("the missing count to drop to 0", LONG, || async {
        (m.c.node(cut).status().mail.bodies_missing == 0).then_some(())
    })
    .await;

    // A body lost on one node is fetched when read.
    std::fs::remove_file(cut_store.body_path(&hashes[1])).unwrap();
    let b = m.store(cut).body(&hashes[1]).await.unwrap();
    assert_eq!(BodyHash::of(&b), hashes[1]);
    // And when opened to be sent in pieces: fetched, kept, then opened.
    std::fs::remove_file(cut_store.body_path(&hashes[2])).unwrap();
    let mut opened = m.store(cut).open_body(&hashes[2]).await.unwrap();
    let mut read = Vec::new();
    std::io::Read::read_to_end(&mut opened.file, &mut read).unwrap();
    assert_eq!((BodyHash::of(&read), opened.len), (hashes[2], read.len() as u64));
    assert!(cut_store.has_body(&hashes[2]).await.unwrap());
    m.shutdown().await;
}

/// A memory gate with `left` octets, taken for good by each reservation.
struct Gate(Mutex<usize>);

impl MemoryGate for Gate {
    fn reserve(&self, bytes: usize) -> Option<Box<dyn Send + Sync>> {
        let mut left = self.0.lock().unwrap();
        *left = left.checked_sub(bytes)?;
        Some(Box::new(()))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_spooled_body_is_copied_to_peers_within_the_memory_gate() {
    let m = MailCluster::start(&[Role::Data; 2], Timing::default(), 20, Replication::default()).await;
    let one = NodeId(1);
    let node = m.c.node(one);
    let local = node.store();
    let content: Vec<u8> = (0..20_000u32).flat_map(|i| format!("line {i}\r\n").into_bytes()).collect();
    let spooled = || {
        let mut spool = local.spool(1024);
        for piece in content.chunks(1000) {
            spool.append(piece).unwrap();
        }
        spool.finish().unwrap()
    };
    let tmp_files = || {
        std::fs::read_dir(local.body_path(&BodyHash::of(b"")).parent().unwrap().parent().unwrap().join("tmp"))
            .unwrap()
            .count()
    };
    // The body and one request for the peer: twice its size. One octet
    // short: refused as Busy (SMTP 451 4.3.1), and the spooled file goes.
    let tight = ReplicatedStore::new(m.c.node(one), Replication::default())
        .unwrap()
        .with_memory_gate(Arc::new(Gate(Mutex::new(2 * content.len() - 1))));
    let mut msg = message(&tight, &[alice()], "spooled").await;
    msg.body = spooled();
    assert!(matches!(msg.body, Body::Staged(_)));
    assert!(matches!(tight.accept(msg).await, Err(StoreError::Busy(_))));
    assert_eq!(tmp_files(), 0);
    drop(tight);
    let enough = ReplicatedStore::new(m.c.node(one), Replication::default())
        .unwrap()
        .with_memory_gate(Arc::new(Gate(Mutex::new(2 * content.len()))));
    let mut msg = message(&enough, &[alice()], "spooled").await;
    msg.body = spooled();
    let committed = enough.accept(msg).await.unwrap();
    assert_eq!(committed.body(), BodyHash::of(&content));
    assert_eq!(tmp_files(), 0, "renamed into bodies/");
    for id in m.data_ids() {
        assert_eq!(*m.c.node(id).store().body(&committed.body()).await.unwrap(), content, "body on node {id}");
    }
    drop(enough);
    m.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_spooled_body_reserves_memory_only_for_the_peers_it_is_copied_to() {
    let replication = Replication { put_timeout: Duration::from_millis(300), ..Replication::default() };
    let mut m = MailCluster::start(&[Role::Data; 3], Timing::default(), 21, replication.clone()).await;
    let (one, down) = (NodeId(1), NodeId(3));
    m.stop(down).await;
    let local = m.c.node(one).store().clone();
    let content: Vec<u8> = (0..20_000u32).flat_map(|i| format!("line {i}\r\n").into_bytes()).collect();
    // The body and one request for the one live peer: twice its size, not
    // three times (the stopped peer is skipped, so it costs nothing).
    let store = ReplicatedStore::new(m.c.node(one), replication)
        .unwrap()
        .with_memory_gate(Arc::new(Gate(Mutex::new(2 * content.len()))));
    // A first message (in memory, no reservation) finds the stopped peer
    // unreachable: it is skipped for a while.
    let msg = message(&store, &[alice()], "finds the peer down").await;
    store.accept(msg).await.unwrap();
    let mut msg = message(&store, &[alice()], "spooled").await;
    let mut spool = local.spool(1024);
    for piece in content.chunks(1000) {
        spool.append(piece).unwrap();
    }
    msg.body = spool.finish().unwrap();
    assert!(matches!(msg.body, Body::Staged(_)));
    let committed = store.accept(msg).await.unwrap();
    for id in m.data_ids() {
        assert_eq!(*m.c.node(id).store().body(&committed.body()).await.unwrap(), content, "body on node {id}");
    }
    drop(store);
    m.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_data_nodes_and_a_witness_survive_a_data_node() {
    // The default: every live data node, at least one.
    let replication = Replication::default();
    let mut m = MailCluster::start(&[Role::Data, Role::Data, Role::Witness], Timing::default(), 14, replication).await;
    let (one, two, witness) = (NodeId(1), NodeId(2), NodeId(3));
    let msg = message(&m.store(one), &[alice()], "both up").await;
    let mut hashes = vec![m.store(one).accept(msg).await.unwrap().body()];
    assert_eq!(m.c.node(one).status().mail.degraded_accepts, 0);

    m.stop(two).await;
    for i in 0..5 {
        let msg = message(&m.store(one), &[alice(), bob()], &format!("alone #{i}")).await;
        hashes.push(m.store(one).accept(msg).await.unwrap().body());
    }
    assert_eq!(m.c.node(one).status().mail.degraded_accepts, 5);
    // An operator who requires 2 copies gets 451 instead: no loss.
    let strict =
        ReplicatedStore::new(m.c.node(one), Replication { required_copies: Some(2), ..Replication::default() })
            .unwrap();
    let msg = message(&strict, &[alice()], "strict").await;
    assert!(matches!(strict.accept(msg).await, Err(StoreError::Temporary(_))));
    drop(strict);

    // The witness has the metadata but no body, and refuses to take one.
    let w = m.c.node(witness);
    m.converged().await;
    assert_eq!(w.store().mailbox(&alice()).await.unwrap().len(), 6);
    for h in &hashes {
        assert!(!w.store().has_body(h).await.unwrap());
    }
    let data = b"body".to_vec();
    let put = Request::PutBody { hash: BodyHash::of(&data), data };
    assert!(matches!(w.handle(Some(one), put).await, Response::PutBody(Err(_))));
    assert!(matches!(w.handle(Some(one), Request::GetBody(hashes[0])).await, Response::GetBody(Err(_))));

    // Node 2 comes back and fetches what it missed.
    m.boot(two).await;
    m.converged().await;
    m.bodies_complete().await;
    let s2 = m.c.node(two).store().clone();
    for h in &hashes {
        assert!(s2.has_body(h).await.unwrap());
    }
    assert_eq!(m.store(two).mailbox(&bob()).await.unwrap().len(), 5);
    assert!(std::fs::read_dir(w.store().body_path(&hashes[0]).parent().unwrap()).unwrap().next().is_none());
    m.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn verify_restores_deleted_and_corrupted_bodies_from_a_peer() {
    // No periodic repair: verify must find the damage itself.
    let replication = Replication { repair_interval: Duration::from_secs(3600), ..Replication::default() };
    let m = MailCluster::start(&[Role::Data; 3], Timing::default(), 15, replication).await;
    let (one, two) = (NodeId(1), NodeId(2));
    let mut bodies = Vec::new();
    for text in ["to be deleted", "to be corrupted", "left alone"] {
        let msg = message(&m.store(one), &[alice()], text).await;
        let body = bytes_of(&msg);
        bodies.push((m.store(one).accept(msg).await.unwrap().body(), body));
    }
    m.converged().await;
    let s2 = m.c.node(two).store().clone();
    let (deleted, corrupted) = (bodies[0].0, bodies[1].0);
    std::fs::remove_file(s2.body_path(&deleted)).unwrap();
    let mut bad = bodies[1].1.to_vec();
    bad[0] ^= 0xff;
    std::fs::write(s2.body_path(&corrupted), &bad).unwrap();

    let report = m.store(two).verify_cluster().await.unwrap();
    assert_eq!(report.node, two);
    assert_eq!(report.checked, 2, "{report:?}");
    assert_eq!(report.damaged, vec![corrupted]);
    assert_eq!(report.missing.iter().copied().collect::<BTreeSet<_>>(), BTreeSet::from([deleted, corrupted]));
    assert_eq!(report.repaired.iter().copied().collect::<BTreeSet<_>>(), BTreeSet::from([deleted, corrupted]));
    assert!(report.unrepaired.is_empty());
    for (h, body) in &bodies {
        assert_eq!(std::fs::read(s2.body_path(h)).unwrap(), **body);
    }

    // Cluster-wide, through Request::Verify: everything sound now.
    std::fs::remove_file(m.c.node(NodeId(3)).store().body_path(&bodies[2].0)).unwrap();
    let everywhere = m.store(one).verify_everywhere().await;
    assert_eq!(everywhere.len(), 3);
    for (id, r) in everywhere {
        let r = r.unwrap_or_else(|e| panic!("verify on node {id}: {e}"));
        assert!(r.damaged.is_empty() && r.unrepaired.is_empty(), "node {id}: {r:?}");
        if id == NodeId(3) {
            assert_eq!(r.repaired, vec![bodies[2].0]);
        }
    }
    assert!(m.c.node(NodeId(3)).store().has_body(&bodies[2].0).await.unwrap());
    m.shutdown().await;
}

/// The outbound queue's per-recipient state goes through the log, and
/// through a snapshot to a node that was cut off while it changed (the
/// snapshot's trailing queue-state segment).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn queue_state_reaches_every_node_by_log_and_by_snapshot() {
    use hamail_store::{QueueOp, RcptOutcome, RecipientStatus};
    let timing = Timing { snapshot_every: 10, logs_kept_after_snapshot: 2, ..Timing::default() };
    let replication = Replication { put_timeout: Duration::from_millis(300), ..Replication::default() };
    let m = MailCluster::start(&[Role::Data; 3], timing, 17, replication).await;
    let all = m.c.ids();
    let leader = m.c.leader().await.id();
    let cut = m.data_ids().into_iter().find(|id| *id != leader).unwrap();
    let on_leader = m.store(leader);
    let mut msg = message(&on_leader, &[], "outbound").await;
    msg.remote = vec!["r1@remote.test".into(), "r2@remote.test".into()];
    let qid = msg.queue_id;
    on_leader.accept(msg).await.unwrap();
    m.converged().await;

    m.c.board.isolate(cut, &all);
    let results = vec![
        (0, RcptOutcome::Delivered),
        (1, RcptOutcome::Deferred { next_attempt: 1234, error: "451 4.2.0 later".into() }),
    ];
    on_leader.queue_change(qid, QueueOp::Results { at: 1000, results }).await.unwrap();
    on_leader.queue_change(qid, QueueOp::Hold).await.unwrap();
    // Enough other entries for a snapshot or two while the node is away.
    for i in 0..25 {
        let msg = message(&on_leader, &[alice()], &format!("filler {i}")).await;
        on_leader.accept(msg).await.unwrap();
    }
    m.c.board.heal();
    m.converged().await;
    let items = m.store(cut).queue_items().await.unwrap();
    let item = items.iter().find(|i| i.entry.queue_id == qid).expect("queued on the cut-off node");
    assert!(item.state.hold);
    assert_eq!(item.state.recipients[0].status, RecipientStatus::Delivered);
    assert_eq!(item.state.recipients[1].status, RecipientStatus::Pending);
    assert_eq!((item.state.recipients[1].attempts, item.state.recipients[1].next_attempt), (1, 1234));

    // The last recipient delivered: the entry goes everywhere.
    let done = vec![(1, RcptOutcome::Delivered)];
    m.store(cut).queue_change(qid, QueueOp::Results { at: 2000, results: done }).await.unwrap();
    m.converged().await;
    for id in m.data_ids() {
        assert!(m.store(id).queue_items().await.unwrap().is_empty(), "node {id}");
    }
    m.shutdown().await;
}

/// Sets a body file's modification time two hours back (older than
/// [`hamail_cluster::GC_MIN_AGE`]).
fn make_old(store: &hamail_store::LocalStore, hash: &BodyHash) {
    let f = std::fs::File::options().write(true).open(store.body_path(hash)).unwrap();
    f.set_modified(std::time::SystemTime::now() - Duration::from_secs(2 * 3600)).unwrap();
}

/// A copy for an accept that never committed is referenced by nothing and
/// kept at start (a replica cannot tell it yet): a garbage collection on a
/// node that caught up removes it once old, and keeps young and referenced
/// files; the repair task runs it by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn old_unreferenced_bodies_are_collected_young_and_referenced_ones_kept() {
    let m = MailCluster::start(&[Role::Data; 3], Timing::default(), 18, Replication::default()).await;
    let leader = m.c.leader().await.id();
    let id = m.data_ids().into_iter().find(|id| *id != leader).unwrap();
    let local = m.c.node(id).store().clone();
    let msg = message(&m.store(leader), &[alice()], "referenced").await;
    let referenced = m.store(leader).accept(msg).await.unwrap().body();
    m.converged().await;
    let garbage = local.put_body(Arc::new(b"a copy for an accept that never committed\r\n".to_vec())).await.unwrap();
    let young = local.put_body(Arc::new(b"a copy whose accept may still commit\r\n".to_vec())).await.unwrap();
    make_old(&local, &referenced);
    make_old(&local, &garbage);

    let report = m.store(id).collect_garbage_now().await.unwrap();
    assert_eq!((report.removed, report.young), (1, 1), "{report:?}");
    assert!(!local.has_body(&garbage).await.unwrap());
    assert!(local.has_body(&referenced).await.unwrap());
    assert!(local.has_body(&young).await.unwrap());
    assert_eq!(m.c.node(id).status().mail.bodies_collected, 1);

    // The repair task's own passes (every gc_interval).
    let leftover = local.put_body(Arc::new(b"another leftover\r\n".to_vec())).await.unwrap();
    make_old(&local, &leftover);
    let often = Replication { gc_interval: Duration::from_millis(100), ..Replication::default() };
    let store = ReplicatedStore::new(m.c.node(id), often).unwrap();
    eventually("the repair task to remove the leftover", LONG, || async {
        (!local.has_body(&leftover).await.unwrap()).then_some(())
    })
    .await;
    assert!(local.has_body(&referenced).await.unwrap() && local.has_body(&young).await.unwrap());
    assert_eq!(m.c.node(id).status().mail.bodies_collected, 2);
    drop(store);
    m.shutdown().await;
}

/// A node behind the log must not take a body that an entry it has not
/// applied yet references for garbage: the pass waits until it applied
/// what the cluster committed, and fails (removing nothing) when it cannot
/// learn that.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_collects_garbage_only_once_it_applied_what_was_committed() {
    let timing = Timing { write_timeout_ms: 2000, ..Timing::default() };
    let replication = Replication { put_timeout: Duration::from_millis(300), ..Replication::default() };
    let m = MailCluster::start(&[Role::Data; 3], timing, 19, replication).await;
    let all = m.c.ids();
    let leader = m.c.leader().await.id();
    let cut = m.data_ids().into_iter().find(|id| *id != leader).unwrap();
    let local = m.c.node(cut).store().clone();
    m.c.board.isolate(cut, &all);
    // This node holds an old copy of a body that the others now commit a
    // message with, while it is cut off.
    let msg = message(&m.store(leader), &[alice()], "committed while cut off").await;
    let queue_id = msg.queue_id;
    let hash = local.put_body(bytes_of(&msg)).await.unwrap();
    make_old(&local, &hash);
    assert_eq!(m.store(leader).accept(msg).await.unwrap().body(), hash);

    assert!(m.store(cut).collect_garbage_now().await.is_err(), "cut off: cannot know what was committed");
    assert!(local.has_body(&hash).await.unwrap());
    assert!(local.committed(queue_id).await.unwrap().is_none(), "not applied here yet");

    m.c.board.heal();
    let report =
        eventually("a garbage collection pass", LONG, || async { m.store(cut).collect_garbage_now().await.ok() }).await;
    assert_eq!(report.removed, 0, "{report:?}");
    assert!(local.committed(queue_id).await.unwrap().is_some());
    assert!(local.has_body(&hash).await.unwrap(), "the body its log references is kept");
    m.shutdown().await;
}
