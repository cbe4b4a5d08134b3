//! Failover groups on real nodes in one process: placement, fencing,
//! switchover, monitors, failback, drain and the cluster log.
//!
//! The resources are simulated: every start and stop goes to a shared
//! "world" that flags any start of a resource another node still holds
//! (two nodes running one group). Every test ends by checking that no such
//! double ownership happened.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{eventually, TestCluster};
use hamail_cluster::groups::{
    EventKind, Failback, GroupSpec, GroupState, ResourceDriver, ResourceError, ResourceSpec, StartContext, StartEvent,
};
use hamail_cluster::{ClusterNode, Command, GroupTiming, NodeId, Role, Timing};
use hamail_store::Domain;

const LONG: Duration = Duration::from_secs(20);

fn timing() -> Timing {
    Timing {
        write_timeout_ms: 3000,
        groups: GroupTiming {
            lease_ms: 400,
            renew_ms: 50,
            stop_timeout_ms: 300,
            fast_stop_timeout_ms: 100,
            margin_ms: 100,
            monitor_interval_ms: 100,
            tick_ms: 10,
        },
        ..Timing::default()
    }
}

#[derive(Clone, Debug)]
struct Start {
    node: NodeId,
    group: String,
    resource: String,
    event: StartEvent,
    home: bool,
    at: Instant,
}

/// What runs where, as the resources see it.
#[derive(Default)]
struct World {
    /// (group, resource) → the node holding it.
    holders: Mutex<HashMap<(String, String), NodeId>>,
    starts: Mutex<Vec<Start>>,
    /// (node, group, resource, when) of each stop.
    stops: Mutex<Vec<(NodeId, String, String, Instant)>>,
    /// Double ownership seen by a start.
    violations: Mutex<Vec<String>>,
    /// (node, group) → monitor failures still to report.
    failures: Mutex<HashMap<(NodeId, String), u32>>,
}

impl World {
    fn holder(&self, group: &str) -> Option<NodeId> {
        let h = self.holders.lock().unwrap();
        h.iter().find(|((g, _), _)| g == group).map(|(_, n)| *n)
    }

    /// Every resource of `group` held by `node` (and by no one else).
    fn runs_on(&self, group: &str, resources: usize, node: NodeId) -> bool {
        let h = self.holders.lock().unwrap();
        let mine = h.iter().filter(|((g, _), n)| g == group && **n == node).count();
        let all = h.iter().filter(|((g, _), _)| g == group).count();
        mine == resources && all == resources
    }

    fn stopped_everywhere(&self, group: &str) -> bool {
        self.holder(group).is_none()
    }

    /// A power cut: the node's resources vanish with it.
    fn crash(&self, node: NodeId) {
        self.holders.lock().unwrap().retain(|_, n| *n != node);
    }

    fn last_start(&self, group: &str) -> Option<Start> {
        self.starts.lock().unwrap().iter().rev().find(|s| s.group == group).cloned()
    }

    fn check(&self) {
        let v = self.violations.lock().unwrap();
        assert!(v.is_empty(), "a group ran on two nodes at once: {v:?}");
    }
}

struct SimDriver {
    node: NodeId,
    world: Arc<World>,
}

#[async_trait::async_trait]
impl ResourceDriver for SimDriver {
    async fn start(&self, group: &GroupSpec, resource: &ResourceSpec, ctx: &StartContext) -> Result<(), ResourceError> {
        tokio::time::sleep(Duration::from_millis(5)).await;
        let key = (group.name.clone(), resource.name().to_string());
        {
            let mut h = self.world.holders.lock().unwrap();
            if let Some(other) = h.get(&key) {
                if *other != self.node {
                    self.world
                        .violations
                        .lock()
                        .unwrap()
                        .push(format!("node {} starts {key:?} while node {other} holds it", self.node));
                }
            }
            h.insert(key.clone(), self.node);
        }
        self.world.starts.lock().unwrap().push(Start {
            node: self.node,
            group: key.0,
            resource: key.1,
            event: ctx.event,
            home: ctx.home,
            at: Instant::now(),
        });
        Ok(())
    }

    async fn stop(&self, group: &GroupSpec, resource: &ResourceSpec, _budget: Duration) -> Result<(), ResourceError> {
        tokio::time::sleep(Duration::from_millis(5)).await;
        let key = (group.name.clone(), resource.name().to_string());
        let mut h = self.world.holders.lock().unwrap();
        if h.get(&key) == Some(&self.node) {
            h.remove(&key);
        }
        self.world.stops.lock().unwrap().push((self.node, key.0, key.1, Instant::now()));
        Ok(())
    }

    async fn monitor(&self, group: &GroupSpec, resource: &ResourceSpec) -> Result<(), ResourceError> {
        let mut f = self.world.failures.lock().unwrap();
        if let Some(left) = f.get_mut(&(self.node, group.name.clone())) {
            if *left > 0 {
                *left -= 1;
                return Err(ResourceError {
                    resource: resource.name().into(),
                    message: "simulated failure".into(),
                    permanent: false,
                });
            }
        }
        Ok(())
    }
}

fn group(name: &str, nodes: &[u64], failback: Failback, max_restarts: u32) -> GroupSpec {
    GroupSpec {
        name: name.into(),
        nodes: nodes.iter().map(|n| NodeId(*n)).collect(),
        failback,
        resources: vec![
            ResourceSpec::LoopbackIp { name: format!("{name}-ip"), address: "127.0.0.9/8".into() },
            ResourceSpec::MailService { name: format!("{name}-mail") },
        ],
        max_restarts,
        stop_timeout_ms: None,
    }
}

async fn cluster(seed: u64) -> (TestCluster, Arc<World>) {
    let c = TestCluster::start_with_roles(&[Role::Data, Role::Data, Role::Data], timing(), seed).await;
    let world = Arc::new(World::default());
    for n in c.running() {
        start_agent(&n, &world);
    }
    (c, world)
}

fn start_agent(n: &Arc<ClusterNode>, world: &Arc<World>) {
    n.start_agent(Arc::new(SimDriver { node: n.id(), world: world.clone() }));
}

async fn wait_runs(world: &Arc<World>, g: &str, node: u64) -> Instant {
    let w = world.clone();
    eventually(&format!("group {g} to run on node {node}"), LONG, || {
        let w = w.clone();
        let g = g.to_string();
        async move { w.runs_on(&g, 2, NodeId(node)).then(Instant::now) }
    })
    .await
}

async fn wait_state(n: &Arc<ClusterNode>, g: &str, owner: Option<u64>, state: GroupState) {
    let n = n.clone();
    eventually(&format!("group {g} {state} on {owner:?}"), LONG, || {
        let n = n.clone();
        let g = g.to_string();
        async move {
            n.groups_status()
                .into_iter()
                .any(|s| s.spec.name == g && s.placement.owner == owner.map(NodeId) && s.placement.state == state)
                .then_some(())
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn partitioned_or_dead_owner_is_fenced_then_replaced_never_twice() {
    let (mut c, world) = cluster(11).await;
    let all = c.ids();
    let leader = c.leader().await;
    leader.put_group(group("g", &[1, 2, 3], Failback::Manual, 1)).await.unwrap();
    wait_runs(&world, "g", 1).await;
    let s = world.last_start("g").unwrap();
    assert_eq!((s.event, s.home), (StartEvent::Start, true));
    wait_state(&leader, "g", Some(1), GroupState::Online).await;

    // Cut node 1 off: it stops by itself (its lease runs out), and only
    // then does node 2 start the group, as a failover.
    let cut = Instant::now();
    c.board.isolate(NodeId(1), &all);
    let w = world.clone();
    let stopped = eventually("node 1 to stop its group", LONG, || {
        let w = w.clone();
        async move { w.stopped_everywhere("g").then(Instant::now) }
    })
    .await;
    let started = wait_runs(&world, "g", 2).await;
    let s = world.last_start("g").unwrap();
    assert_eq!((s.node, s.event, s.home), (NodeId(2), StartEvent::Failover, false));
    let first_start_on_2 = world
        .starts
        .lock()
        .unwrap()
        .iter()
        .filter(|s| s.node == NodeId(2) && s.group == "g")
        .map(|s| s.at)
        .min()
        .unwrap();
    let last_stop_on_1 =
        world.stops.lock().unwrap().iter().filter(|s| s.0 == NodeId(1) && s.1 == "g").map(|s| s.3).max().unwrap();
    assert!(last_stop_on_1 < first_start_on_2, "the partitioned owner stopped before node 2 started");
    eprintln!(
        "partition of the owner: stopped there after {} ms, running on node 2 after {} ms",
        (stopped - cut).as_millis(),
        (started - cut).as_millis()
    );

    // Back: manual failback, the group stays on node 2; node 1 does not
    // restart it from its stale placement.
    c.board.heal();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(world.runs_on("g", 2, NodeId(2)), "manual failback: stays on node 2");

    // Power cut of node 2 (it may also be the leader).
    let cut = Instant::now();
    world.crash(NodeId(2));
    c.stop(NodeId(2)).await;
    let started = wait_runs(&world, "g", 1).await;
    let s = world.last_start("g").unwrap();
    assert_eq!((s.node, s.event), (NodeId(1), StartEvent::Failover));
    eprintln!("power cut of the owner: running on node 1 after {} ms", (started - cut).as_millis());
    c.boot(NodeId(2)).await;
    start_agent(&c.node(NodeId(2)), &world);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert!(world.runs_on("g", 2, NodeId(1)));
    world.check();
    c.check_one_leader_per_term();
    for n in c.running() {
        n.shutdown().await.unwrap();
    }
}

/// The owner is also the leader, and is cut off: the new leader fences it
/// from what a majority testifies about the old term (not from its own
/// election), so this is the case where a mistake would start the group
/// while the old owner still runs it. Several rounds, each with a
/// different leader.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_leader_owner_cut_off_stops_before_anyone_starts() {
    let (c, world) = cluster(23).await;
    let all = c.ids();
    let first = c.leader().await;
    first.put_group(group("g", &[1, 2, 3], Failback::Manual, 1)).await.unwrap();
    wait_runs(&world, "g", 1).await;
    for round in 0..3 {
        let leader = c.leader().await;
        let l = leader.id();
        leader.move_group("g", Some(l)).await.unwrap();
        wait_runs(&world, "g", l.0).await;
        wait_state(&leader, "g", Some(l.0), GroupState::Online).await;

        let cut = Instant::now();
        c.board.isolate(l, &all);
        let w = world.clone();
        let (taker, at) = eventually("the group to run on another node", LONG, || {
            let w = w.clone();
            async move { w.holder("g").filter(|h| *h != l && w.runs_on("g", 2, *h)).map(|h| (h, Instant::now())) }
        })
        .await;
        let stopped_on_l =
            world.stops.lock().unwrap().iter().filter(|s| s.0 == l && s.1 == "g" && s.3 > cut).map(|s| s.3).max();
        let started_on_taker = world
            .starts
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.node == taker && s.group == "g" && s.at > cut)
            .map(|s| s.at)
            .min();
        match (stopped_on_l, started_on_taker) {
            (Some(stop), Some(start)) => {
                assert!(stop < start, "round {round}: node {l} stopped before node {taker} started")
            }
            other => panic!("round {round}: stop/start not recorded: {other:?}"),
        }
        eprintln!("round {round}: leader-owner {l} cut off, group on node {taker} after {} ms", (at - cut).as_millis());
        c.board.heal();
        world.check();
    }
    world.check();
    c.check_one_leader_per_term();
    for n in c.running() {
        n.shutdown().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn move_under_writes_active_active_stop_start_and_drain() {
    let (c, world) = cluster(12).await;
    let leader = c.leader().await;
    let follower = c.running().into_iter().find(|n| n.id() != leader.id()).unwrap();
    follower.put_group(group("a", &[1, 2, 3], Failback::Manual, 1)).await.unwrap();
    follower.put_group(group("b", &[2, 3, 1], Failback::Manual, 1)).await.unwrap();
    wait_runs(&world, "a", 1).await;
    wait_runs(&world, "b", 2).await;

    // Switchover of a to node 3 while writes go on.
    let writer = {
        let n = leader.clone();
        tokio::spawn(async move {
            for i in 0..40 {
                n.write(Command::AddDomain { domain: Domain::parse(&format!("d{i}.example")).unwrap() }).await.unwrap();
            }
        })
    };
    let t = Instant::now();
    assert_eq!(follower.move_group("a", Some(NodeId(3))).await.unwrap(), NodeId(3));
    wait_runs(&world, "a", 3).await;
    eprintln!("switchover: {} ms", t.elapsed().as_millis());
    let s = world.last_start("a").unwrap();
    assert_eq!((s.node, s.event, s.home), (NodeId(3), StartEvent::Start, false));
    writer.await.unwrap();
    assert!(world.runs_on("b", 2, NodeId(2)), "b untouched");

    // move without a node: the next one after the owner (3 → 1).
    assert_eq!(leader.move_group("a", None).await.unwrap(), NodeId(1));
    wait_runs(&world, "a", 1).await;

    // stop / start.
    leader.stop_group("b").await.unwrap();
    wait_state(&leader, "b", None, GroupState::Offline).await;
    assert!(world.stopped_everywhere("b"));
    assert!(leader.remove_group("a").await.is_err(), "a running group cannot be removed");
    leader.start_group("b").await.unwrap();
    wait_runs(&world, "b", 2).await;

    // Drain node 2: b goes to 3; a (on 1) stays.
    let moved = leader.drain_node(NodeId(2)).await.unwrap();
    assert_eq!(moved, vec![("b".to_string(), Some(NodeId(3)))]);
    wait_runs(&world, "b", 3).await;
    assert!(world.runs_on("a", 2, NodeId(1)));

    // Remove a stopped group.
    leader.stop_group("a").await.unwrap();
    wait_state(&leader, "a", None, GroupState::Offline).await;
    leader.remove_group("a").await.unwrap();
    assert_eq!(leader.groups_status().len(), 1);
    world.check();
    for n in c.running() {
        n.shutdown().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn monitor_failures_restart_then_fail_over_then_auto_failback() {
    let (c, world) = cluster(13).await;
    let leader = c.leader().await;
    leader.put_group(group("m", &[1, 2], Failback::Auto, 2)).await.unwrap();
    wait_runs(&world, "m", 1).await;
    // Two failures: two local restarts, still on node 1, with the event
    // the group was started with (START): the first start and two more.
    world.failures.lock().unwrap().insert((NodeId(1), "m".into()), 2);
    let w = world.clone();
    eventually("two local recoveries", LONG, || {
        let w = w.clone();
        async move {
            let n = w
                .starts
                .lock()
                .unwrap()
                .iter()
                .filter(|s| s.node == NodeId(1) && s.event == StartEvent::Start && s.resource == "m-ip")
                .count();
            (n == 3 && w.runs_on("m", 2, NodeId(1))).then_some(())
        }
    })
    .await;
    // A third failure: beyond max_restarts, it fails over to node 2; no
    // automatic failback to the node it failed on.
    world.failures.lock().unwrap().insert((NodeId(1), "m".into()), 1);
    wait_runs(&world, "m", 2).await;
    let s = world.last_start("m").unwrap();
    assert_eq!((s.node, s.event), (NodeId(2), StartEvent::Failover));
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(world.runs_on("m", 2, NodeId(2)));
    // `group start` forgets the failure: auto failback to node 1.
    leader.start_group("m").await.unwrap();
    wait_runs(&world, "m", 1).await;
    assert_eq!(world.last_start("m").unwrap().event, StartEvent::Start);

    // The cluster log, from every node.
    leader.log_event(EventKind::Note, None, None, "hello from the operator").await.unwrap();
    for n in c.running() {
        n.linearizable().await.unwrap();
        let events = n.events(1000).await.unwrap();
        assert!(events.iter().any(|e| e.kind == EventKind::Note && e.text == "hello from the operator"));
        assert!(events.iter().any(|e| e.kind == EventKind::GroupFailover && e.group.as_deref() == Some("m")));
        assert!(events.iter().any(|e| e.kind == EventKind::ResourceFailure));
        assert!(events.windows(2).all(|w| w[0].seq < w[1].seq));
    }
    world.check();
    for n in c.running() {
        n.shutdown().await.unwrap();
    }
}
