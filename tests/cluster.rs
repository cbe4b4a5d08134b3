//! Real `hamail` processes forming a cluster on loopback: one user database
//! for every node, leader failover by SIGKILL, catch-up after a restart, a
//! witness, refusal of a peer without the cluster secret, a dead peer logged
//! once per change, and the loss of the leader in the cluster event log.

mod common;

use std::time::Duration;

use common::cluster::*;
use common::*;
use serde_json::Value;

#[test]
fn three_nodes_one_user_database_and_leader_failover() {
    let root = tempfile::tempdir().unwrap();
    let mut nodes = form(root.path(), &["data", "data", "data"]);

    // The user node 1 had before the cluster existed reached node 3 (by the
    // snapshot taken at init); a user added on node 3 logs in on node 1 at
    // once (logins are linearizable reads).
    assert!(pop3_login(nodes[2].s(), "alice@example.org", "alice-pw"));
    let (ok, out) = nodes[2].cli(&["user", "add", "bob@example.org"], "bob-pw\n");
    assert!(ok, "{out}");
    assert!(
        pop3_login(nodes[0].s(), "bob@example.org", "bob-pw"),
        "a user added on node 3 must log in on node 1 at once"
    );
    let (ok, out) = nodes[1].cli(&["user", "passwd", "bob@example.org"], "bob-pw2\n");
    assert!(ok, "{out}");
    assert!(pop3_login(nodes[2].s(), "bob@example.org", "bob-pw2"));
    assert!(!pop3_login(nodes[2].s(), "bob@example.org", "bob-pw"), "the old password is gone everywhere");

    // SIGKILL the leader: another is elected and writes continue.
    let leader = nodes[0].leader().expect("a leader") as usize;
    nodes[leader - 1].kill9();
    let survivor = if leader == 1 { 1 } else { 0 };
    let new_leader = eventually(Duration::from_secs(20), "a new leader", || {
        nodes[survivor].leader().filter(|l| *l as usize != leader)
    });
    assert_ne!(new_leader as usize, leader);
    let (ok, out) = nodes[survivor].cli(&["user", "add", "carol@example.org"], "carol-pw\n");
    assert!(ok, "writes continue after the leader died: {out}");

    // The old leader comes back and catches up.
    nodes[leader - 1].restart();
    eventually(Duration::from_secs(30), "the restarted node caught up", || {
        let (ok, out) = nodes[leader - 1].cli(&["user", "list"], "");
        (ok && out.contains("carol@example.org")).then_some(())
    });
    assert!(pop3_login(nodes[leader - 1].s(), "carol@example.org", "carol-pw"));
}

#[test]
fn two_data_nodes_and_a_witness_survive_the_loss_of_either_data_node() {
    let root = tempfile::tempdir().unwrap();
    let mut nodes = form(root.path(), &["data", "data", "witness"]);
    assert_eq!(nodes[2].s().smtp, UNBOUND, "a witness runs no mail service");
    for lost in [0usize, 1] {
        let other = 1 - lost;
        nodes[lost].kill9();
        let user = format!("after-loss-of-{}@example.org", lost + 1);
        eventually(Duration::from_secs(20), "a write with one data node down", || {
            nodes[other].cli(&["user", "add", &user], "pw\n").0.then_some(())
        });
        assert!(pop3_login(nodes[other].s(), &user, "pw"));
        nodes[lost].restart();
        eventually(Duration::from_secs(30), "the data node caught up", || {
            let (ok, out) = nodes[lost].cli(&["user", "list"], "");
            (ok && out.contains(&user)).then_some(())
        });
    }
}

#[test]
fn a_node_without_the_secret_is_refused() {
    let root = tempfile::tempdir().unwrap();
    let nodes = form(root.path(), &["data"]);
    let (_, out) = nodes[0].cli(&["cluster", "status", "--json"], "");
    assert!(out.contains("leader"), "{out}");
    // Forge a token: right address and CA, wrong secret.
    let intruder = Node::new(root.path(), "intruder", "data");
    let init = std::fs::read_to_string(nodes[0].dir.join("data/cluster/node.json")).unwrap();
    let addr = serde_json::from_str::<Value>(&init).unwrap()["info"]["addr"].as_str().unwrap().to_string();
    let (ok, out) = intruder.cli(&["cluster", "join", "hamail1-AAAA"], "");
    assert!(!ok && out.contains("token"), "a malformed token is a clear error: {out}");
    let ca = std::fs::read_to_string(nodes[0].dir.join("data/cluster/ca.crt")).unwrap();
    let der = rustls_pemfile_first(&ca);
    let token = forge_token(&addr, &hex::encode(sha2::Sha256::digest_bytes(&der)), "not-the-secret");
    let (ok, out) = intruder.cli(&["cluster", "join", &token], "");
    assert!(!ok, "{out}");
    assert!(out.contains("wrong cluster secret"), "{out}");
    let st = nodes[0].status().unwrap();
    assert_eq!(st.len(), 1, "the intruder is no member");
    assert!(nodes[0].s().log().contains("wrong cluster secret"), "the refusal is logged");
}

/// The leader's link to member `id` in its `cluster status --json`:
/// (link, failed Raft calls, state changes).
fn link_seen_by(leader: &Node, id: usize) -> Option<(String, u64, u64)> {
    let st = leader.status()?;
    let m = st.iter().find(|m| m["id"].as_u64() == Some(id as u64))?;
    Some((m["link"].as_str()?.to_string(), m["rpc_failures"].as_u64()?, m["link_changes"].as_u64()?))
}

/// The lines of `log` from the peer-link tracker about node `id` that
/// contain `what`.
fn link_lines(log: &str, id: usize, what: &str) -> usize {
    let needle = format!("node {id} {what}");
    log.lines().filter(|l| l.contains("hamail_cluster::network") && l.contains(&needle)).count()
}

#[test]
fn a_dead_follower_is_logged_once_when_lost_and_once_when_back() {
    let root = tempfile::tempdir().unwrap();
    let mut nodes = form(root.path(), &["data", "data", "data"]);
    let leader = nodes[0].leader().expect("a leader") as usize;
    let follower = if leader == 3 { 2 } else { 3 };
    // Joining, it may have been unreachable for a moment already.
    let (link, _, changes0) = link_seen_by(&nodes[leader - 1], follower).expect("the leader's status");
    assert_eq!(link, "up");
    let mark = nodes[leader - 1].s().log().len();
    nodes[follower - 1].kill9();
    // The leader keeps calling it (heartbeats, and the leadership check of
    // every lease renewal): wait until it has failed many times, seconds'
    // worth.
    let (link, failed, changes) = eventually(Duration::from_secs(30), "60 failed calls to the dead follower", || {
        link_seen_by(&nodes[leader - 1], follower).filter(|(_, failed, _)| *failed >= 60)
    });
    assert_eq!((link.as_str(), changes), ("down", changes0 + 1), "{failed} failed calls");
    let log = nodes[leader - 1].s().log()[mark..].to_string();
    assert_eq!(link_lines(&log, follower, "unreachable"), 1, "one line for {failed} failed calls:\n{log}");
    let openraft: Vec<&str> =
        log.lines().filter(|l| l.contains(" openraft") && (l.contains("ERROR") || l.contains("WARN"))).collect();
    assert!(openraft.is_empty(), "openraft's per-call lines in the default log:\n{}", openraft.join("\n"));

    nodes[follower - 1].restart();
    eventually(Duration::from_secs(30), "the follower reachable again", || {
        link_seen_by(&nodes[leader - 1], follower).filter(|(link, _, _)| link == "up")
    });
    let log = nodes[leader - 1].s().log()[mark..].to_string();
    assert_eq!(link_lines(&log, follower, "reachable again"), 1, "{log}");
    assert_eq!(link_lines(&log, follower, "unreachable"), 1, "{log}");
    let (_, failed_after, changes) = link_seen_by(&nodes[leader - 1], follower).expect("the leader's status");
    assert!(failed_after >= failed && changes == changes0 + 2, "{failed_after} failed calls, {changes} changes");
}

/// The events of the cluster log, read through `node`, of `kind` about
/// node `id` (`hamail log` lines: `<secs> node<N> "<kind>" ...`, N the node
/// the event is about).
fn events_about(node: &Node, id: usize, kind: &str) -> Option<Vec<String>> {
    let (ok, out) = node.cli(&["log", "-n", "1000"], "");
    let tag = format!("node{id} \"{kind}\"");
    ok.then(|| out.lines().filter(|l| l.contains(&tag)).map(str::to_string).collect())
}

#[test]
fn the_loss_of_the_leader_is_a_node_lost_event_and_its_return_a_node_back() {
    let root = tempfile::tempdir().unwrap();
    let mut nodes = form(root.path(), &["data", "data", "data"]);
    let leader = nodes[0].leader().expect("a leader") as usize;
    let survivor = if leader == 1 { 1 } else { 0 };
    nodes[leader - 1].kill9();
    let lost = eventually(Duration::from_secs(30), "a NodeLost event for the dead leader", || {
        events_about(&nodes[survivor], leader, "NodeLost").filter(|l| !l.is_empty())
    });
    assert_eq!(lost.len(), 1, "{lost:?}");
    assert_eq!(
        events_about(&nodes[survivor], leader, "NodeBack").unwrap_or_default(),
        Vec::<String>::new(),
        "no NodeBack before its return"
    );

    nodes[leader - 1].restart();
    let back = eventually(Duration::from_secs(30), "a NodeBack event for the old leader", || {
        events_about(&nodes[survivor], leader, "NodeBack").filter(|l| !l.is_empty())
    });
    assert_eq!(back.len(), 1, "{back:?}");
    assert_eq!(
        events_about(&nodes[survivor], leader, "NodeLost").map(|l| l.len()),
        Some(1),
        "the loss is reported once"
    );
}

trait DigestBytes {
    fn digest_bytes(data: &[u8]) -> Vec<u8>;
}
impl DigestBytes for sha2::Sha256 {
    fn digest_bytes(data: &[u8]) -> Vec<u8> {
        use sha2::Digest;
        sha2::Sha256::digest(data).to_vec()
    }
}

fn rustls_pemfile_first(pem: &str) -> Vec<u8> {
    use base64::Engine;
    let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    base64::engine::general_purpose::STANDARD.decode(body).expect("pem")
}

fn forge_token(addr: &str, fingerprint: &str, secret: &str) -> String {
    hamail_cluster::pki::JoinToken { addr: addr.into(), ca_fingerprint: fingerprint.into(), secret: secret.into() }
        .encode()
}
