//! The replicated mail store, end to end with real processes: concurrent
//! SMTP load to every data node while one node at a time is SIGKILLed and
//! restarted. At the end every message that got `250` is in each of its
//! recipients' maildrops exactly once, byte-identical, on every data node;
//! a message without `250` is everywhere whole or nowhere.

mod common;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use common::cluster::*;
use common::mail::*;
use common::*;

fn wait_healthy(nodes: &[Node]) {
    let n = nodes.len();
    eventually(Duration::from_secs(60), "every member healthy and caught up", || {
        let st = nodes.iter().find(|x| x.server.is_some())?.status()?;
        (st.len() == n && st.iter().all(|m| m["healthy"] == true && m["lag"] == 0)).then_some(())
    });
}

fn run(roles: &[&str], rounds: usize) {
    let root = tempfile::tempdir().unwrap();
    let mut nodes = form(root.path(), roles);
    for u in 0..USERS {
        let (ok, out) = nodes[0].cli(&["user", "add", &user(u)], "pw\n");
        assert!(ok, "{out}");
    }
    let data: Vec<usize> = roles.iter().enumerate().filter(|(_, r)| **r == "data").map(|(i, _)| i).collect();
    let log: Arc<Mutex<HashMap<String, Sent>>> = Arc::default();
    // Where each data node's SMTP listener is now (it moves on restart).
    let smtp: Arc<RwLock<Vec<Option<SocketAddr>>>> =
        Arc::new(RwLock::new(nodes.iter().map(|n| n.server.as_ref().map(|s| s.smtp)).collect()));
    for round in 0..rounds {
        let victim = data[round % data.len()];
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for t in 0..4usize {
            let (log, stop, smtp, data) = (log.clone(), stop.clone(), smtp.clone(), data.clone());
            threads.push(std::thread::spawn(move || {
                let mut n = 0u64;
                let mut target = t;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let token = format!("r{round}t{t}m{n}");
                    let recipients: Vec<usize> = (0..USERS).filter(|u| !(n as usize + u).is_multiple_of(3)).collect();
                    let size = [400, 6_000, 60_000][(n % 3) as usize];
                    let addr = smtp.read().unwrap()[data[target % data.len()]];
                    let sent = addr.map(|a| send_one(a, &token, &recipients, size, &log));
                    if !matches!(sent, Some(Ok(_))) {
                        // That node is down: a real MTA tries the next MX.
                        target += 1;
                        std::thread::sleep(Duration::from_millis(20));
                    }
                }
            }));
        }
        let acked = |log: &Mutex<HashMap<String, Sent>>| log.lock().unwrap().values().filter(|m| m.acked).count();
        let before = acked(&log);
        eventually(Duration::from_secs(60), "mail flowing", || (acked(&log) >= before + 40).then_some(()));
        nodes[victim].kill9();
        smtp.write().unwrap()[victim] = None;
        let mid = acked(&log);
        eventually(Duration::from_secs(60), "mail flowing with a node down", || {
            (acked(&log) >= mid + 40).then_some(())
        });
        stop.store(true, Ordering::Relaxed);
        for t in threads {
            t.join().unwrap();
        }
        nodes[victim].restart();
        smtp.write().unwrap()[victim] = Some(nodes[victim].s().smtp);
        wait_healthy(&nodes);
    }
    check(&nodes, &data, &log.lock().unwrap());
    // Mail accepted while a data node was down is reported as degraded.
    let st = nodes[data[0]].status().expect("status");
    let degraded: u64 = st.iter().filter_map(|m| m["degraded_accepts"].as_u64()).sum();
    assert!(degraded > 0, "degraded accepts must show in cluster status: {st:?}");
    // Every data node holds every body, and all are intact.
    let (ok, out) = nodes[data[0]].cli(&["store", "verify"], "");
    assert!(ok, "store verify: {out}");
    assert_eq!(out.matches(" 0 unrepaired").count(), data.len(), "{out}");
    drop(root);
}

fn check(nodes: &[Node], data: &[usize], log: &HashMap<String, Sent>) {
    let acked = log.values().filter(|m| m.acked).count();
    assert!(acked >= 150, "the load must have got mail through: {acked}");
    for &i in data {
        let mut seen_in: HashMap<String, HashSet<usize>> = HashMap::new();
        for u in 0..USERS {
            let mut here = HashSet::new();
            for msg in maildrop(nodes[i].s().pop3, &user(u)) {
                let token = token_of(&msg);
                let sent = log.get(&token).unwrap_or_else(|| panic!("{token}: a message nobody sent"));
                assert!(here.insert(token.clone()), "{token} is twice in {} on node {}", user(u), i + 1);
                assert_eq!(content_hash(&msg), sent.hash, "{token} damaged in {} on node {}", user(u), i + 1);
                assert!(sent.recipients.contains(&u), "{token} delivered to a non-recipient");
                seen_in.entry(token).or_default().insert(u);
            }
        }
        for (token, sent) in log {
            let got = seen_in.get(token).cloned().unwrap_or_default();
            let want: HashSet<usize> = sent.recipients.iter().copied().collect();
            if sent.acked {
                assert_eq!(got, want, "{token} got 250 but is not in every maildrop on node {}", i + 1);
            } else {
                assert!(got.is_empty() || got == want, "{token} (no 250) is in some maildrops only on node {}", i + 1);
            }
        }
        eprintln!("node {}: {} messages, {acked} acknowledged of {} sent", i + 1, seen_in.len(), log.len());
    }
}

#[test]
fn three_data_nodes_survive_a_sigkill_loop_under_load() {
    run(&["data", "data", "data"], 3);
}

#[test]
fn two_data_nodes_and_a_witness_survive_a_sigkill_loop_under_load() {
    run(&["data", "data", "witness"], 2);
}

#[test]
fn a_node_that_missed_mail_catches_up_and_verify_repairs_bodies() {
    let root = tempfile::tempdir().unwrap();
    let mut nodes = form(root.path(), &["data", "data", "data"]);
    for u in 0..USERS {
        assert!(nodes[0].cli(&["user", "add", &user(u)], "pw\n").0);
    }
    let log: Mutex<HashMap<String, Sent>> = Mutex::default();
    nodes[2].kill9();
    for i in 0..30 {
        assert!(send_one(nodes[0].s().smtp, &format!("missed{i}"), &[0, 1], 3000 + i * 100, &log).unwrap());
    }
    nodes[2].restart();
    wait_healthy(&nodes);
    let got = maildrop(nodes[2].s().pop3, &user(0));
    assert_eq!(got.len(), 30, "the restarted node serves everything it missed");
    for msg in &got {
        assert_eq!(content_hash(msg), log.lock().unwrap()[&token_of(msg)].hash);
    }
    // The bodies it missed were fetched from the others, and the cluster
    // status says so.
    let st = nodes[0].status().expect("status");
    let fetched: u64 = st.iter().filter_map(|m| m["bodies_fetched"].as_u64()).sum();
    assert!(fetched >= 30, "the 30 missed bodies must show as fetched in cluster status: {st:?}");
    // Damage node 2's copies: one body deleted, one overwritten.
    let bodies = nodes[1].dir.join("data/store/bodies");
    let mut files: Vec<_> = std::fs::read_dir(&bodies).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    let (deleted, corrupted) = (files[0].clone(), files[1].clone());
    let original = std::fs::read(&corrupted).unwrap();
    std::fs::remove_file(&deleted).unwrap();
    std::fs::write(&corrupted, b"bit rot").unwrap();
    let (ok, out) = nodes[0].cli(&["store", "verify"], "");
    assert!(ok, "{out}");
    assert!(out.contains("node 2: 29 bodies checked, 1 damaged, 2 missing, 2 repaired, 0 unrepaired"), "{out}");
    assert!(deleted.exists(), "the deleted body is back");
    assert_eq!(std::fs::read(&corrupted).unwrap(), original, "the damaged body is repaired");
}
