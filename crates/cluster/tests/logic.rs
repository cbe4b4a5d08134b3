//! The consensus logic under faults: real nodes (store, Raft log, state
//! machine) in one process on a fault-injecting network.
//!
//! Every test also checks Raft's Election Safety (paper Figure 3: at most
//! one leader per term) over everything the nodes reported during the run.
//! This needs openraft's `single-term-leader` feature: by default openraft
//! 0.9 orders leaders by (term, node id) and may elect several in one term
//! (openraft docs `docs::data::leader_id`).

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{eventually, TestCluster};
use hamail_cluster::rpc::{Handler, Request, Response, WriteError};
use hamail_cluster::{Command, CommandResult, NodeId, ReplicatedDirectory, Timing};
use hamail_store::{Address, Directory, Domain, StoreError};
use openraft::ServerState;

fn domain(s: &str) -> Domain {
    Domain::parse(s).unwrap()
}

fn add_domain(s: &str) -> Command {
    Command::AddDomain { domain: domain(s) }
}

const LONG: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_nodes_replicate_forward_and_read_linearizably() {
    let c = TestCluster::start(3, Timing::default(), 1).await;
    let leader = c.leader().await;
    let follower = c.running().into_iter().find(|n| n.id() != leader.id()).unwrap();

    // A write on the leader, one on a follower (forwarded), one refused the
    // same way everywhere.
    assert_eq!(leader.write(add_domain("example.org")).await.unwrap(), CommandResult::Done);
    assert_eq!(follower.write(add_domain("example.net")).await.unwrap(), CommandResult::Done);
    match follower.write(add_domain("example.org")).await.unwrap() {
        CommandResult::Refused(msg) => assert!(!msg.is_empty()),
        other => panic!("a duplicate domain must be refused, got {other:?}"),
    }

    // The directory through Raft: password hashed by the proposer, a
    // linearizable login on a follower right after a change on the leader.
    let on_leader = ReplicatedDirectory::new(leader.clone());
    let on_follower = ReplicatedDirectory::new(follower.clone());
    let alice = Address::parse("alice@example.org").unwrap();
    on_leader.add_user(&alice, "first").await.unwrap();
    assert!(matches!(on_follower.add_user(&alice, "again").await, Err(StoreError::Permanent(_))));
    for round in 0..5 {
        let pw = format!("secret-{round}");
        on_leader.set_password(&alice, &pw).await.unwrap();
        assert!(on_follower.verify_password(&alice, &pw).await.unwrap(), "follower read is linearizable");
    }
    // Plain linearizable barrier on a follower sees an acknowledged write.
    let t = Instant::now();
    for i in 0..20 {
        leader.write(add_domain(&format!("lin{i}.example"))).await.unwrap();
        follower.linearizable().await.unwrap();
        let domains = follower.store().domains().await.unwrap();
        assert!(domains.contains(&domain(&format!("lin{i}.example"))));
    }
    eprintln!("write on the leader + linearizable read on a follower: {} ms each", t.elapsed().as_millis() / 20);
    let users = on_follower.users().await.unwrap();
    assert_eq!(users.len(), 1);
    let alias = Address::parse("postmaster@example.org").unwrap();
    on_follower.add_alias(&alias, std::slice::from_ref(&alice)).await.unwrap();
    assert_eq!(on_leader.aliases().await.unwrap(), vec![(alias, vec![alice.clone()])]);

    // Status.
    let st = leader.status();
    assert_eq!(st.state, "leader");
    assert_eq!(st.members.len(), 3);
    assert_eq!(st.replication.len(), 2);
    assert!(st.replication.iter().all(|p| p.matched.is_some() && p.last_contact_ms.is_some()));
    let st = follower.status();
    assert_eq!(st.state, "follower");
    assert_eq!(st.current_leader, Some(leader.id()));

    // Raft requests from an unauthenticated peer are refused.
    assert!(matches!(follower.handle(None, Request::Status).await, Response::Refused(_)));

    let snap = c.converged(LONG).await;
    assert_eq!(snap.domains.len(), 22);
    c.check_one_leader_per_term();
    for n in c.running() {
        n.shutdown().await.unwrap();
    }
}

/// A directory batch (a bulk user import) is one log entry, proposed on a
/// follower, with a result per change; every node applies all of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_directory_batch_is_one_log_entry_with_a_result_per_change() {
    use hamail_store::DirectoryChange;
    let c = TestCluster::start(3, Timing::default(), 1).await;
    let leader = c.leader().await;
    let follower = c.running().into_iter().find(|n| n.id() != leader.id()).unwrap();
    let on_follower = ReplicatedDirectory::new(follower.clone());
    let user = |u: &str| DirectoryChange::AddUser {
        user: Address::parse(u).unwrap(),
        password_hash: "$5$saltsalt$myjXcpMpE2Ofk7fj9hqyNYSn6lmWG4Mqnjx.KIRRr4/".into(),
        created_at: 1,
    };
    let before = leader.status().last_log_index.unwrap_or(0);
    let results = on_follower
        .apply_batch(vec![
            DirectoryChange::AddDomain { domain: domain("batch.example") },
            user("a@batch.example"),
            user("a@batch.example"),
            user("b@elsewhere.example"),
            user("c@batch.example"),
        ])
        .await
        .unwrap();
    let refused: Vec<bool> = results.iter().map(|r| matches!(r, Err(StoreError::Permanent(_)))).collect();
    assert_eq!(refused, [false, false, true, true, false], "{results:?}");
    assert_eq!(leader.status().last_log_index, Some(before + 1), "one log entry");
    for node in c.running() {
        let dir = ReplicatedDirectory::new(node.clone());
        let users: Vec<String> = dir.users().await.unwrap().iter().map(|u| u.address.to_string()).collect();
        assert_eq!(users, ["a@batch.example", "c@batch.example"], "node {}", node.id());
        // The crypt(3) hash is kept and checked as such.
        assert!(dir.verify_password(&Address::parse("c@batch.example").unwrap(), "correct horse").await.unwrap());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn minority_cannot_commit_and_majority_moves_on() {
    let timing = Timing { write_timeout_ms: 2000, ..Timing::default() };
    let mut c = TestCluster::start(5, timing, 2).await;
    let all = c.ids();
    let old = c.leader().await;
    old.write(add_domain("before.example")).await.unwrap();

    // The leader and one follower on one side, three nodes on the other.
    let buddy = all.iter().copied().find(|id| *id != old.id()).unwrap();
    let minority = vec![old.id(), buddy];
    let majority: Vec<NodeId> = all.iter().copied().filter(|id| !minority.contains(id)).collect();
    let cut_at = Instant::now();
    c.board.partition(&minority, &majority);

    // The majority elects a new leader...
    let new = c.wait_leader_among(&majority, LONG).await;
    let election = cut_at.elapsed();
    eprintln!("new leader {new} elected {} ms after the partition", election.as_millis());
    assert!(majority.contains(&new));

    // ... while writes on the minority side (on the old leader, and
    // forwarded from its follower) cannot commit.
    let on_old = old.write(add_domain("minority-old-leader.example")).await;
    assert!(on_old.is_err(), "a minority leader must not commit: {on_old:?}");
    let on_buddy = c.node(buddy).write(add_domain("minority-follower.example")).await;
    assert!(on_buddy.is_err(), "a minority follower must not commit: {on_buddy:?}");
    assert!(c.node(buddy).linearizable().await.is_err(), "no linearizable read without a quorum");

    // The majority keeps committing.
    for i in 0..10 {
        let n = c.node(majority[i % majority.len()]);
        assert_eq!(n.write(add_domain(&format!("majority{i}.example"))).await.unwrap(), CommandResult::Done);
    }

    c.board.heal();
    let snap = c.converged(LONG).await;
    for d in ["minority-old-leader.example", "minority-follower.example"] {
        assert!(!snap.domains.contains(&domain(d)), "{d} was not committed yet is applied");
    }
    assert!(snap.domains.contains(&domain("before.example")));
    for i in 0..10 {
        assert!(snap.domains.contains(&domain(&format!("majority{i}.example"))));
    }
    // The old leader is a follower of a newer term now.
    let m = old.raft().metrics().borrow().clone();
    assert_ne!(m.state, ServerState::Leader);
    c.check_one_leader_per_term();
    for id in all {
        c.stop(id).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn acknowledged_writes_survive_leader_changes_loss_and_delay() {
    let timing = Timing { write_timeout_ms: 3000, ..Timing::default() };
    let c = Arc::new(TestCluster::start(5, timing, 3).await);
    let all = c.ids();
    c.board.set_loss(0.05);
    c.board.set_delay(Some((0, 15)));

    // Writers on every node, each its own names.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let acked_count = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut writers = Vec::new();
    for id in all.clone() {
        let node = c.node(id);
        let stop = stop.clone();
        let acked_count = acked_count.clone();
        writers.push(tokio::spawn(async move {
            let (mut acked, mut failed) = (Vec::new(), Vec::new());
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let name = format!("w{}-{i}.example", id.0);
                match node.write(add_domain(&name)).await {
                    Ok(CommandResult::Done) => {
                        acked_count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        acked.push(name)
                    }
                    Ok(other) => panic!("unexpected answer {other:?} for {name}"),
                    Err(e) => failed.push((name, e)),
                }
                i += 1;
            }
            (acked, failed)
        }));
    }

    // Depose the leader a few times.
    let mut elections = Vec::new();
    for _ in 0..4 {
        let leader = c.wait_leader(LONG).await;
        let t = Instant::now();
        c.board.isolate(leader, &all);
        let others: Vec<NodeId> = all.iter().copied().filter(|id| *id != leader).collect();
        let new = c.wait_leader_among(&others, LONG).await;
        elections.push(t.elapsed().as_millis());
        assert_ne!(new, leader);
        // Let it commit a little under the new leader, then heal.
        let before = c.node(new).raft().metrics().borrow().last_applied.map(|l| l.index).unwrap_or(0);
        eventually("progress under the new leader", LONG, || {
            let n = c.node(new);
            async move {
                let now = n.raft().metrics().borrow().last_applied.map(|l| l.index).unwrap_or(0);
                (now >= before + 5).then_some(())
            }
        })
        .await;
        c.board.heal();
    }
    eprintln!("elections after isolating the leader (ms, with loss and delay): {elections:?}");

    // Some more writes with loss and delay but a stable leader.
    eventually("more acknowledged writes", LONG, || {
        let acked = acked_count.clone();
        async move { (acked.load(std::sync::atomic::Ordering::Relaxed) >= 60).then_some(()) }
    })
    .await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut acked = BTreeSet::new();
    let mut unknown = 0;
    for w in writers {
        let (a, f) = w.await.unwrap();
        acked.extend(a);
        for (_, e) in f {
            assert!(matches!(e, WriteError::Unknown(_) | WriteError::NoLeader), "unexpected error {e:?}");
            unknown += 1;
        }
    }
    c.board.set_loss(0.0);
    c.board.set_delay(None);
    let snap = c.converged(LONG).await;
    let present: BTreeSet<String> = snap.domains.iter().map(|d| d.as_str().to_string()).collect();
    let lost: Vec<&String> = acked.iter().filter(|d| !present.contains(*d)).collect();
    eprintln!("{} acknowledged writes, {unknown} failed or unknown", acked.len());
    assert!(acked.len() >= 60, "the cluster kept committing");
    assert!(lost.is_empty(), "acknowledged writes lost: {lost:?}");
    c.check_one_leader_per_term();
    assert!(c.terms_seen() >= 4);
    for n in c.running() {
        n.shutdown().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stopped_node_catches_up_from_a_snapshot() {
    let timing = Timing { snapshot_every: 10, logs_kept_after_snapshot: 0, ..Timing::default() };
    let mut c = TestCluster::start(3, timing, 4).await;
    let first = c.leader().await;
    let lagger = c.ids().into_iter().find(|id| *id != first.id()).unwrap();
    first.write(add_domain("early.example")).await.unwrap();
    // Handles keep a node's store open: none may outlive its stop.
    drop(first);
    c.converged(LONG).await;
    let lag_index = c.node(lagger).raft().metrics().borrow().last_applied.map(|l| l.index).unwrap();
    c.stop(lagger).await;

    let leader = c.leader().await;
    for i in 0..40 {
        leader.write(add_domain(&format!("while-down{i}.example"))).await.unwrap();
    }
    // The leader has compacted its log past what the stopped node has.
    eventually("the leader to purge its log", LONG, || {
        let leader = leader.clone();
        async move {
            let m = leader.raft().metrics().borrow().clone();
            (m.purged.map(|p| p.index).unwrap_or(0) > lag_index && m.snapshot.is_some()).then_some(())
        }
    })
    .await;

    c.boot(lagger).await;
    let snap = c.converged(LONG).await;
    assert_eq!(snap.domains.len(), 41);
    let m = c.node(lagger).raft().metrics().borrow().clone();
    assert!(m.snapshot.map(|s| s.index).unwrap_or(0) > lag_index, "caught up by installing a snapshot: {m:?}");

    // The snapshot is persisted: after restarts the nodes still serve it
    // and keep working.
    drop(leader);
    let leader_id = c.wait_leader(LONG).await;
    c.stop(leader_id).await;
    c.boot(leader_id).await;
    c.leader().await.write(add_domain("after-restart.example")).await.unwrap();
    let snap = c.converged(LONG).await;
    assert_eq!(snap.domains.len(), 42);
    c.check_one_leader_per_term();
    for id in c.ids() {
        c.stop(id).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn node_ids_are_allocated_once_and_members_can_be_removed() {
    let c = TestCluster::start(3, Timing::default(), 5).await;
    let leader = c.leader().await;
    let follower = c.running().into_iter().find(|n| n.id() != leader.id()).unwrap();
    // Allocation through a follower is forwarded; ids never repeat.
    let a = follower.allocate_node_id().await.unwrap();
    let b = leader.allocate_node_id().await.unwrap();
    assert_eq!((a, b), (NodeId(4), NodeId(5)));
    // Membership changes run on the leader only.
    let third = c.running().into_iter().find(|n| n.id() != leader.id() && n.id() != follower.id()).unwrap();
    assert!(follower.remove_member(third.id()).await.is_err());
    leader.remove_member(third.id()).await.unwrap();
    eventually("the follower to see two members", LONG, || {
        let f = follower.clone();
        async move { (f.status().members.len() == 2).then_some(()) }
    })
    .await;
    leader.write(add_domain("two.example")).await.unwrap();
    c.check_one_leader_per_term();
    for n in c.running() {
        n.shutdown().await.unwrap();
    }
}
