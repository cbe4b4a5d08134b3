//! Failover groups end to end in Linux network namespaces (needs root;
//! skipped otherwise): three `hamail` nodes and a client, each in its own
//! namespace on one bridge (198.18.0.0/24, no route out; see
//! `common/netns.rs`). Groups hold floating addresses in 198.18.0.0/24 on
//! `eth0`, the mail listeners on them and, in the last test, the seed's
//! start/stop scripts.
//!
//! - `group_move_under_load`: a client keeps sending mail through the
//!   floating address while the group is moved twice by command; every
//!   acknowledged message is there exactly once.
//! - `active_active_two_groups`: two groups with their homes on different
//!   nodes serve one replicated store at once; a power cut of one node
//!   moves its group to the other, and is one NodeLost event and one
//!   `unreachable` line on the new leader, with no openraft error lines.
//! - `a_leader_power_cut_leaves_the_other_groups_up`: the leader (owner of
//!   one group) loses power; the other node's group keeps running through
//!   the election (its lease is renewed by the voters' vouches): a prober
//!   sees no failure, an SMTP session opened before the cut completes a
//!   transaction after it, and the dead leader's group fails over.
//! - `killed_owner_leaves_no_address_behind`: the owner's process is
//!   SIGKILLed with its link up; its reaper removes the floating address at
//!   once (no restart), before another node takes it; a SIGSTOPped owner's
//!   address expires with its kernel lifetime.
//! - `seed_scripts_run_with_the_seed_variables`: the seed HOWTO's start.sh
//!   and stop.sh (sendmail/inetd replaced by a marker file, the stop's
//!   `sleep 30` kept) run as an `exec` resource of a group with its shared
//!   disk, calling hamail's own `armlog`, with the seed's variables: start
//!   at home, failover after a power cut, a move; their `armlog` lines reach
//!   the cluster log.
//! - `shared_disk_follows_the_group`: shared-disk mode, an ext4 disk on a
//!   loop device: the group's mail lives on the disk, which follows the
//!   group on a move and on a power cut, and is never mounted twice.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::netns::*;
use common::*;
use serde_json::Value;

const USER: &str = "alice@example.org";
const VIP1: &str = "198.18.0.100";
const VIP2: &str = "198.18.0.101";
/// Generous: a takeover normally takes lease + stop budget + margin (0.8 s
/// by default for an address and mail group, 2.7 s with scripts or a disk,
/// which also waits for the dead holder's disk heartbeat to go stale), plus
/// the commit and the start.
const RECOVERY: Duration = Duration::from_secs(30);

fn at(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse().unwrap(), port)
}

type Cluster = NsCluster;

impl NsCluster {
    /// The bed and three nodes formed into a cluster with one user; no
    /// groups yet.
    fn new() -> Cluster {
        NsCluster::form(USER, RECOVERY)
    }

    fn greeting_from_client(&self, ip: &'static str) -> Option<String> {
        self.bed.run_in("cl", move || greeting(at(ip, 2525)))
    }

    fn send_from_client(&self, ip: &'static str, token: &str) -> std::io::Result<Result<String, String>> {
        let token = token.to_string();
        self.bed.run_in("cl", move || smtp_send(at(ip, 2525), USER, &token))
    }

    /// The X-Token of every message in the maildrop, read by POP3 from the
    /// client through `ip`; None when that does not work (yet).
    fn tokens_from_client(&self, ip: &str) -> Option<Vec<String>> {
        let addr = at(ip, 2110);
        self.bed.run_in("cl", move || pop3_tokens(addr, USER).ok())
    }

    /// (owner, state) of group `name`, as node `via` sees it.
    fn owner(&self, via: usize, name: &str) -> Option<(u64, String)> {
        let (ok, out) = self.nodes[via].cli(&["group", "status", "--json"], "");
        if !ok {
            return None;
        }
        let v: Value = serde_json::from_str(&out).ok()?;
        let g = v.as_array()?.iter().find(|g| g["spec"]["name"] == name)?.clone();
        Some((g["placement"]["owner"].as_u64()?, g["placement"]["state"].as_str()?.to_string()))
    }

    fn group_status(&self, via: usize) -> String {
        self.nodes[via].cli(&["group", "status"], "").1
    }
}

/// Every message's X-Token through POP3 at `addr` (short timeouts; no
/// panics, for polling).
fn pop3_tokens(addr: SocketAddr, user: &str) -> std::io::Result<Vec<String>> {
    let bad = |what: String| std::io::Error::other(what);
    let s = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(500))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut w = s.try_clone()?;
    let mut r = BufReader::new(s);
    let mut line = || -> std::io::Result<String> {
        let mut l = Vec::new();
        r.read_until(b'\n', &mut l)?;
        if l.is_empty() {
            return Err(bad("connection closed".into()));
        }
        Ok(String::from_utf8_lossy(&l).to_string())
    };
    let g = line()?;
    if !g.starts_with("+OK") {
        return Err(bad(g));
    }
    w.write_all(format!("USER {user}\r\nPASS pw\r\nSTAT\r\n").as_bytes())?;
    line()?;
    let pass = line()?;
    if !pass.starts_with("+OK") {
        return Err(bad(pass));
    }
    let stat = line()?;
    let n: usize = stat.split_whitespace().nth(1).and_then(|n| n.parse().ok()).ok_or_else(|| bad(stat.clone()))?;
    let mut tokens = Vec::new();
    for i in 1..=n {
        w.write_all(format!("RETR {i}\r\n").as_bytes())?;
        let first = line()?;
        if !first.starts_with("+OK") {
            return Err(bad(first));
        }
        let mut token = None;
        loop {
            let l = line()?;
            if l == ".\r\n" {
                break;
            }
            if let Some(t) = l.strip_prefix("X-Token: ") {
                token.get_or_insert_with(|| t.trim_end().to_string());
            }
        }
        tokens.push(token.unwrap_or_else(|| format!("<message {i} without a token>")));
    }
    w.write_all(b"QUIT\r\n")?;
    let mut rest = Vec::new();
    let _ = r.read_to_end(&mut rest);
    Ok(tokens)
}

fn mail_group(name: &str, nodes: &str, vip: &str, extra: &str) -> String {
    format!(
        "[[group]]\nname = \"{name}\"\nnodes = {nodes}\nfailback = \"manual\"\nmax_restarts = 1\n\n\
         [[group.resources]]\ntype = \"floating_ip\"\nname = \"vip\"\naddress = \"{vip}/24\"\ninterface = \"{IFACE}\"\n\n\
         {extra}\
         [[group.resources]]\ntype = \"mail_service\"\nname = \"mail\"\n\n"
    )
}

#[test]
fn group_move_under_load() {
    if !root_or_skip("group_move_under_load") {
        return;
    }
    let c = Cluster::new();
    c.apply(1, &mail_group("mail", "[1, 2, 3]", VIP1, ""));
    if poll(RECOVERY, || c.greeting_from_client(VIP1).filter(|h| h == "node1")).is_none() {
        panic!("the group is not online at home (node 1):\n{}\n{}", c.group_status(1), c.logs());
    }

    // The sender: message i is retried (as an MTA would, after 4xx or a
    // broken connection) until it gets 250. Each attempt carries its own
    // token "m{i}-a{j}", so that a message stored without its 250 reaching
    // the client (which SMTP cannot rule out) is told apart from a
    // duplicate of an acknowledged one.
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    let cl = c.bed.netns_path("cl");
    let sender = std::thread::spawn(move || {
        enter_netns(&cl);
        let mut acked: Vec<(String, String)> = Vec::new(); // (token, greeting host)
        let mut attempts = 0usize;
        let mut failures: Vec<String> = Vec::new();
        let mut i = 0usize;
        let mut longest_gap = Duration::ZERO;
        let mut last_ack = Instant::now();
        while !stop2.load(Ordering::Relaxed) {
            let mut j = 0usize;
            loop {
                let token = format!("m{i}-a{j}");
                attempts += 1;
                match smtp_send(at(VIP1, 2525), USER, &token) {
                    Ok(Ok(host)) => {
                        acked.push((token, host));
                        longest_gap = longest_gap.max(last_ack.elapsed());
                        last_ack = Instant::now();
                        break;
                    }
                    Ok(Err(reply)) if reply.starts_with('4') => failures.push(format!("{token}: {}", reply.trim_end())),
                    Ok(Err(reply)) => panic!("{token}: permanent failure: {reply}"),
                    Err(e) => failures.push(format!("{token}: {e}")),
                }
                j += 1;
                assert!(last_ack.elapsed() < RECOVERY, "no 250 for {RECOVERY:?}; failures: {failures:?}");
                std::thread::sleep(Duration::from_millis(50));
            }
            i += 1;
        }
        (acked, attempts, failures, longest_gap)
    });

    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs(1));
    for (target, host) in [("2", "node2"), ("3", "node3")] {
        let t = Instant::now();
        let (ok, out) = c.nodes[0].cli(&["group", "move", "mail", target], "");
        assert!(ok, "group move mail {target}: {out}");
        if poll(RECOVERY, || c.greeting_from_client(VIP1).filter(|h| h == host)).is_none() {
            stop.store(true, Ordering::Relaxed);
            panic!("the group did not move to node {target}:\n{}\n{}", c.group_status(0), c.logs());
        }
        eprintln!("group_move_under_load: move to node {target}: greeting from {host} after {:?}", t.elapsed());
        std::thread::sleep(Duration::from_secs(1));
    }
    stop.store(true, Ordering::Relaxed);
    let (acked, attempts, failures, longest_gap) = sender.join().unwrap_or_else(|e| std::panic::resume_unwind(e));
    let by_host = acked.iter().fold(HashMap::<&str, usize>::new(), |mut m, (_, h)| {
        *m.entry(h.as_str()).or_default() += 1;
        m
    });
    eprintln!(
        "group_move_under_load: {} messages acknowledged in {:?} ({attempts} attempts, {} failed: {:?}); \
         by node: {by_host:?}; longest wait between two 250s: {longest_gap:?}",
        acked.len(),
        t0.elapsed(),
        failures.len(),
        failures.iter().take(10).collect::<Vec<_>>()
    );
    for h in ["node1", "node2", "node3"] {
        assert!(by_host.contains_key(h), "no message acknowledged by {h}: {by_host:?}");
    }

    assert_eq!(c.bed.holders(&NS_NODES, VIP1), vec!["n3".to_string()], "{VIP1} on exactly one node");
    assert_eq!(c.owner(1, "mail"), Some((3, "Online".to_string())));

    // Every acknowledged message is in the maildrop exactly once (read
    // through the address, from node 3).
    let tokens = c.tokens_from_client(VIP1).expect("POP3 through the floating address");
    let mut count: HashMap<&str, usize> = HashMap::new();
    for t in &tokens {
        *count.entry(t.as_str()).or_default() += 1;
    }
    for (t, _) in &acked {
        assert_eq!(
            count.get(t.as_str()).copied().unwrap_or(0),
            1,
            "acknowledged {t} in the maildrop once; maildrop: {tokens:?}"
        );
    }
    for (t, n) in &count {
        assert_eq!(*n, 1, "{t} stored {n} times");
    }
    // A switchover drains sessions at a safe point: no message is stored
    // without its 250 reaching the client (its retry would be a duplicate).
    let unacked: Vec<&&str> = count.keys().filter(|t| !acked.iter().any(|(a, _)| a == **t)).collect();
    eprintln!("group_move_under_load: maildrop has {} messages, {} without a 250", tokens.len(), unacked.len());
    assert!(unacked.is_empty(), "stored although the client got no 250 (a duplicate after its retry): {unacked:?}");
}

#[test]
fn active_active_two_groups() {
    if !root_or_skip("active_active_two_groups") {
        return;
    }
    let mut c = Cluster::new();
    c.apply(2, &format!("{}{}", mail_group("mail1", "[1, 2]", VIP1, ""), mail_group("mail2", "[2, 1]", VIP2, "")));

    // Both at home at once: different nodes answer.
    if poll(RECOVERY, || {
        (c.greeting_from_client(VIP1).as_deref() == Some("node1")
            && c.greeting_from_client(VIP2).as_deref() == Some("node2"))
        .then_some(())
    })
    .is_none()
    {
        panic!("the two groups are not both online at home:\n{}\n{}", c.group_status(2), c.logs());
    }
    assert_eq!(c.bed.holders(&NS_NODES, VIP1), vec!["n1".to_string()]);
    assert_eq!(c.bed.holders(&NS_NODES, VIP2), vec!["n2".to_string()]);

    // One store: what is sent through each address is read through the
    // other.
    for (ip, token, host) in [(VIP1, "via-100", "node1"), (VIP2, "via-101", "node2")] {
        match c.send_from_client(ip, token) {
            Ok(Ok(h)) => assert_eq!(h, host),
            other => panic!("sending through {ip}: {other:?}\n{}", c.logs()),
        }
    }
    let both = vec!["via-100".to_string(), "via-101".to_string()];
    for ip in [VIP1, VIP2] {
        let mut last = None;
        if poll(Duration::from_secs(10), || {
            last = c.tokens_from_client(ip);
            last.as_ref().filter(|t| **t == both).map(|_| ())
        })
        .is_none()
        {
            panic!("POP3 through {ip}: {last:?}, not {both:?}\n{}", c.logs());
        }
    }

    // Power cut of node 1: both addresses end up on node 2.
    let marks: Vec<usize> = [1, 2].iter().map(|i| c.nodes[*i].s().log().len()).collect();
    let cut = Instant::now();
    c.power_cut(0);
    let mut last = None;
    let host = poll(RECOVERY, || {
        last = Some(c.send_from_client(VIP1, "after-the-cut"));
        match last.as_ref().unwrap() {
            Ok(Ok(h)) => Some(h.clone()),
            _ => None,
        }
    })
    .unwrap_or_else(|| panic!("no 250 through {VIP1} after the cut; last: {last:?}\n{}", c.logs()));
    eprintln!("active_active_two_groups: {VIP1} served by {host} {:?} after the power cut of node 1", cut.elapsed());
    assert_eq!(host, "node2");
    assert_eq!(c.greeting_from_client(VIP2).as_deref(), Some("node2"));
    let survivors = ["n2", "n3"];
    assert_eq!(c.bed.holders(&survivors, VIP1), vec!["n2".to_string()]);
    assert_eq!(c.bed.holders(&survivors, VIP2), vec!["n2".to_string()]);
    assert_eq!(c.owner(2, "mail1"), Some((2, "Online".to_string())));
    assert_eq!(c.owner(2, "mail2"), Some((2, "Online".to_string())));
    let all = vec!["via-100".to_string(), "via-101".to_string(), "after-the-cut".to_string()];
    for ip in [VIP1, VIP2] {
        assert_eq!(c.tokens_from_client(ip).as_ref(), Some(&all), "POP3 through {ip} after the cut");
    }

    // Node 1 owned a group and (having formed the cluster) most likely led
    // it: its loss is one NodeLost event, and one line in the new leader's
    // log, none of openraft's per-call errors.
    let lost = poll(RECOVERY, || {
        let events = c.nodes[1].cli(&["log", "-n", "500"], "").1;
        let lost: Vec<String> =
            events.lines().filter(|l| l.contains("node1 \"NodeLost\"")).map(str::to_string).collect();
        (!lost.is_empty()).then_some(lost)
    });
    let Some(lost) = lost else { panic!("no NodeLost event for node 1:\n{}", c.logs()) };
    assert_eq!(lost.len(), 1, "{lost:?}");
    let leader = c.nodes[1].leader().expect("a leader") as usize;
    for (i, mark) in [1, 2].into_iter().zip(marks) {
        let log = c.nodes[i].s().log()[mark..].to_string();
        let said =
            log.lines().filter(|l| l.contains("hamail_cluster::network") && l.contains("node 1 unreachable")).count();
        let expected = if i + 1 == leader { 1..=1 } else { 0..=1 };
        assert!(expected.contains(&said), "node {}: {said} lines `node 1 unreachable`:\n{log}", i + 1);
        let openraft: Vec<&str> = log.lines().filter(|l| l.contains(" openraft") && l.contains("ERROR")).collect();
        assert!(openraft.is_empty(), "node {}: openraft errors in the default log:\n{}", i + 1, openraft.join("\n"));
    }
}

/// The outcome of a probe: when, and the failure if any.
type Probe = (Instant, Result<(), String>);

/// From the client: a new SMTP connection to `addr` every 20 ms, until
/// `stop`; each must greet as `host`.
fn probe_greetings(bed: &Bed, addr: SocketAddr, host: &'static str, stop: Arc<AtomicBool>) -> JoinHandle<Vec<Probe>> {
    let path = bed.netns_path("cl");
    std::thread::spawn(move || {
        enter_netns(&path);
        let mut probes = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            let at = Instant::now();
            let outcome = match greeting(addr) {
                Some(h) if h == host => Ok(()),
                other => Err(format!("greeting {other:?}")),
            };
            probes.push((at, outcome));
            std::thread::sleep(Duration::from_millis(20).saturating_sub(at.elapsed()));
        }
        probes
    })
}

/// From the client: an SMTP session to `addr` opened (greeting and EHLO)
/// now; once `go` fires, NOOP and one transaction on it. Returns the
/// greeting's host, or the first unexpected answer.
fn session_across(
    bed: &Bed,
    addr: SocketAddr,
    to: &'static str,
    go: std::sync::mpsc::Receiver<()>,
) -> JoinHandle<Result<String, String>> {
    let path = bed.netns_path("cl");
    let (opened_tx, opened) = std::sync::mpsc::channel();
    let session = std::thread::spawn(move || {
        enter_netns(&path);
        let run = || -> std::io::Result<Result<String, String>> {
            let s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            let mut w = s.try_clone()?;
            let mut r = BufReader::new(s);
            let greeting = mail::reply(&mut r)?;
            let host = greeting.split_whitespace().nth(1).unwrap_or("").to_string();
            w.write_all(b"EHLO client.test\r\n")?;
            let ehlo = mail::reply(&mut r)?;
            let _ = opened_tx.send(());
            if !greeting.starts_with("220 ") || !ehlo.starts_with("250") {
                return Ok(Err(format!("{greeting}{ehlo}")));
            }
            let _ = go.recv();
            let steps: [(String, &str); 5] = [
                ("NOOP\r\n".into(), "250"),
                ("MAIL FROM:<held@client.test>\r\n".into(), "250"),
                (format!("RCPT TO:<{to}>\r\n"), "250"),
                ("DATA\r\n".into(), "354"),
                ("X-Token: held-across\r\n\r\nopened before the power cut\r\n.\r\n".into(), "250"),
            ];
            for (send, expect) in steps {
                w.write_all(send.as_bytes())?;
                let l = mail::reply(&mut r)?;
                if !l.starts_with(expect) {
                    return Ok(Err(format!("{} -> {l}", send.trim_end())));
                }
            }
            let _ = w.write_all(b"QUIT\r\n");
            Ok(Ok(host))
        };
        run().unwrap_or_else(|e| Err(format!("session: {e}")))
    });
    // Opened (or failed) before the caller goes on.
    let _ = opened.recv_timeout(Duration::from_secs(10));
    session
}

/// The longest time between two successful probes around the failures
/// (zero without failures).
fn longest_outage(probes: &[Probe]) -> Duration {
    let mut last_ok: Option<Instant> = None;
    let mut worst = Duration::ZERO;
    let mut failing = false;
    for (at, outcome) in probes {
        match outcome {
            Ok(()) => {
                if let (true, Some(ok)) = (failing, last_ok) {
                    worst = worst.max(at.duration_since(ok));
                }
                last_ok = Some(*at);
                failing = false;
            }
            Err(_) => failing = true,
        }
    }
    worst
}

#[test]
fn a_leader_power_cut_leaves_the_other_groups_up() {
    if !root_or_skip("a_leader_power_cut_leaves_the_other_groups_up") {
        return;
    }
    let mut c = Cluster::new();
    c.apply(
        1,
        &format!("{}{}", mail_group("mail1", "[1, 2, 3]", VIP1, ""), mail_group("mail2", "[2, 1, 3]", VIP2, "")),
    );
    if poll(RECOVERY, || {
        (c.greeting_from_client(VIP1).as_deref() == Some("node1")
            && c.greeting_from_client(VIP2).as_deref() == Some("node2"))
        .then_some(())
    })
    .is_none()
    {
        panic!("the two groups are not both online at home:\n{}\n{}", c.group_status(1), c.logs());
    }
    // Node 1 formed the cluster: it leads.
    assert_eq!(poll(RECOVERY, || c.nodes[1].leader()), Some(1), "{}", c.logs());

    let stop = Arc::new(AtomicBool::new(false));
    let prober = probe_greetings(&c.bed, at(VIP2, 2525), "node2", stop.clone());
    let (go, go_rx) = std::sync::mpsc::channel();
    let session = session_across(&c.bed, at(VIP2, 2525), USER, go_rx);
    let mark = c.nodes[1].s().log().len();

    let cut = Instant::now();
    c.power_cut(0);
    let mut last = None;
    let host = poll(RECOVERY, || {
        last = Some(c.send_from_client(VIP1, "mail1-after-the-cut"));
        match last.as_ref().unwrap() {
            Ok(Ok(h)) => Some(h.clone()),
            _ => None,
        }
    })
    .unwrap_or_else(|| panic!("no 250 through {VIP1} after the cut; last: {last:?}\n{}", c.logs()));
    let failover = cut.elapsed();
    // A new leader, and a while of normal operation under it.
    let leader = poll(RECOVERY, || c.nodes[1].leader().filter(|l| *l != 1));
    std::thread::sleep(Duration::from_secs(1));
    let _ = go.send(());
    let held = session.join().expect("session thread");
    stop.store(true, Ordering::Relaxed);
    let probes = prober.join().expect("prober thread");
    let failures: Vec<&Probe> = probes.iter().filter(|(_, o)| o.is_err()).collect();
    eprintln!(
        "a_leader_power_cut_leaves_the_other_groups_up: {VIP1} (mail1, owner node 1) served by {host} {failover:?} \
         after the power cut; {VIP2} (mail2, node 2): {} of {} probes failed, longest outage {:?}; new leader {leader:?}; \
         session opened before the cut: {held:?}",
        failures.len(),
        probes.len(),
        longest_outage(&probes),
    );
    let log2 = c.nodes[1].s().log()[mark..].to_string();
    assert!(!log2.contains("quorum lease lost"), "node 2 lost its lease:\n{log2}");
    assert!(log2.contains("renewed by the vouches of nodes"), "node 2 renewed no lease by vouches:\n{log2}");
    let shown: Vec<String> = failures
        .iter()
        .take(5)
        .map(|(at, o)| format!("{:?} after the cut: {o:?}", at.saturating_duration_since(cut)))
        .collect();
    assert!(failures.is_empty(), "{VIP2} failed {} probes: {shown:?}\n{}", failures.len(), c.logs());
    assert!(probes.iter().any(|(at, _)| *at > cut + failover), "the prober ran past the failover");
    assert_eq!(held, Ok("node2".to_string()), "the session opened before the cut\n{}", c.logs());
    assert!(host == "node2" || host == "node3", "{host}");
    assert!(failover < Duration::from_secs(5), "mail1 failed over after {failover:?}");
    assert_eq!(c.bed.holders(&["n2", "n3"], VIP2), vec!["n2".to_string()]);
    assert_eq!(c.owner(1, "mail2"), Some((2, "Online".to_string())));
    // Both messages are there, read through the address that never moved.
    let mut tokens = None;
    let both = vec!["held-across".to_string(), "mail1-after-the-cut".to_string()];
    if poll(Duration::from_secs(10), || {
        tokens = c.tokens_from_client(VIP2).map(|mut t| {
            t.sort();
            t
        });
        tokens.as_ref().filter(|t| **t == both).map(|_| ())
    })
    .is_none()
    {
        panic!("POP3 through {VIP2}: {tokens:?}, not {both:?}\n{}", c.logs());
    }
}

/// The kernel lifetime of a floating address with the default group lease
/// (600 ms: renewed every 0.6 s, valid for 2 s).
const ADDRESS_LIFETIME: Duration = Duration::from_secs(2);

/// `addr`'s line of `ip -o addr show` in `host`'s namespace, if it is there.
fn addr_line(c: &Cluster, host: &str, addr: &str) -> Option<String> {
    let out = ip(&["-n", c.bed.ns(host), "-o", "addr", "show"]);
    out.lines().find(|l| l.contains(&format!(" {addr}/"))).map(str::to_string)
}

#[test]
fn killed_owner_leaves_no_address_behind() {
    if !root_or_skip("killed_owner_leaves_no_address_behind") {
        return;
    }
    let mut c = Cluster::new();
    c.apply(1, &mail_group("mail", "[1, 2, 3]", VIP1, ""));
    if poll(RECOVERY, || c.greeting_from_client(VIP1).filter(|h| h == "node1")).is_none() {
        panic!("the group is not online at home (node 1):\n{}\n{}", c.group_status(1), c.logs());
    }

    // While hamail runs, the address has a finite lifetime that is renewed:
    // it stays for well over two lifetimes.
    let watch = Instant::now();
    while watch.elapsed() < 2 * ADDRESS_LIFETIME + Duration::from_secs(1) {
        let line = addr_line(&c, "n1", VIP1).unwrap_or_else(|| {
            panic!("{VIP1} left node 1 after {:?} although hamail runs:\n{}", watch.elapsed(), c.logs())
        });
        let valid: u64 = line
            .split("valid_lft ")
            .nth(1)
            .and_then(|v| v.split("sec").next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no finite valid_lft on node 1's {VIP1}: {line}"));
        assert!(valid <= ADDRESS_LIFETIME.as_secs(), "{line}");
        std::thread::sleep(Duration::from_millis(20));
    }

    // SIGKILL of node 1's process, its link up, and no restart: its reaper
    // removes the address at once, before node 2 takes it over.
    let kill = Instant::now();
    c.nodes[0].kill9();
    let (gone, taken) = watch_handover(&c, "n1", &["n2"], kill, Duration::from_secs(2));
    eprintln!(
        "killed_owner_leaves_no_address_behind: after the SIGKILL, {VIP1} stayed on node 1 for {gone:?}; \
         on node 2 from {taken:?}"
    );
    assert!(gone <= taken, "{VIP1} on nodes 1 and 2 at once, from {taken:?} to {gone:?} after the SIGKILL");
    assert_eq!(c.bed.holders(&NS_NODES, VIP1), vec!["n2".to_string()], "{VIP1} on exactly one node");
    assert_eq!(c.greeting_from_client(VIP1).as_deref(), Some("node2"));

    // A hung process (SIGSTOP) stops renewing: its address expires with its
    // lifetime, and another node takes over (node 1 back for a quorum).
    c.power_on(0);
    if poll(RECOVERY, || c.all_healthy(1).then_some(())).is_none() {
        panic!("node 1 did not come back: {:?}\n{}", c.nodes[1].status(), c.logs());
    }
    let pid = c.nodes[1].server.as_ref().and_then(|s| s.child.as_ref()).map(|ch| ch.id()).expect("node 2's pid");
    let stop = Instant::now();
    // SAFETY: kill(2) on the pid of our own child.
    assert_eq!(unsafe { libc::kill(pid as libc::pid_t, libc::SIGSTOP) }, 0);
    let (gone, taken) = watch_handover(&c, "n2", &["n1", "n3"], stop, ADDRESS_LIFETIME + Duration::from_secs(2));
    eprintln!(
        "killed_owner_leaves_no_address_behind: after a SIGSTOP, {VIP1} stayed on node 2 for {gone:?}; \
         on another node from {taken:?}"
    );
    assert_eq!(c.bed.holders(&NS_NODES, VIP1).len(), 1, "{VIP1} on exactly one node");
    // SAFETY: as above.
    unsafe { libc::kill(pid as libc::pid_t, libc::SIGCONT) };
}

/// A service stop (SIGTERM) of the owner hands its group over: the address
/// leaves it before another node adds it, in about the time of a `group
/// move`, not after a power cut's delay; the process then exits.
#[test]
fn sigterm_hands_the_groups_over() {
    if !root_or_skip("sigterm_hands_the_groups_over") {
        return;
    }
    let mut c = Cluster::new();
    c.apply(1, &mail_group("mail", "[1, 2, 3]", VIP1, ""));
    if poll(RECOVERY, || c.greeting_from_client(VIP1).filter(|h| h == "node1")).is_none() {
        panic!("the group is not online at home (node 1):\n{}\n{}", c.group_status(1), c.logs());
    }
    let pid = c.nodes[0].server.as_ref().and_then(|s| s.child.as_ref()).map(|ch| ch.id()).expect("node 1's pid");
    let term = Instant::now();
    // SAFETY: kill(2) on the pid of our own child.
    assert_eq!(unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) }, 0);
    let (gone, taken) = watch_handover(&c, "n1", &["n2", "n3"], term, RECOVERY);
    eprintln!("sigterm_hands_the_groups_over: {VIP1} left node 1 after {gone:?}, on another node from {taken:?}");
    assert!(gone <= taken, "{VIP1} on two nodes at once, from {taken:?} to {gone:?} after the SIGTERM");
    assert!(c.greeting_from_client(VIP1).is_some_and(|h| h != "node1"));
    let exited = poll(RECOVERY, || {
        let child = c.nodes[0].server.as_mut().and_then(|s| s.child.as_mut())?;
        child.try_wait().ok().flatten()
    });
    assert!(exited.is_some(), "node 1's process did not exit after the hand-over:\n{}", c.logs());
    let log = c.nodes[0].server.as_ref().map(|s| s.log()).unwrap_or_default();
    assert!(log.contains("groups handed over"), "{log}");
}

/// Samples every 20 ms, from `since`, until the address has left `from`
/// and reached one of `to`: (when it left, when it arrived). Fails if it
/// stays on `from` longer than `bound` or never reaches `to`.
fn watch_handover(c: &Cluster, from: &str, to: &[&str], since: Instant, bound: Duration) -> (Duration, Duration) {
    let mut on_from_until = None;
    let mut on_to_from = None;
    while on_from_until.is_none() || on_to_from.is_none() {
        let t = since.elapsed();
        if on_from_until.is_none() && addr_line(c, from, VIP1).is_none() {
            on_from_until = Some(t);
        }
        if on_to_from.is_none() && to.iter().any(|h| addr_line(c, h, VIP1).is_some()) {
            on_to_from = Some(t);
        }
        assert!(on_from_until.is_some() || t < bound, "{VIP1} still on {from} {t:?} after its process died or hung");
        assert!(t < RECOVERY, "{VIP1} not on {to:?} {t:?} later:\n{}\n{}", c.group_status(2), c.logs());
        std::thread::sleep(Duration::from_millis(20));
    }
    (on_from_until.unwrap_or_default(), on_to_from.unwrap_or_default())
}

/// The seed HOWTO's start script, as published, with only what touches
/// the old system replaced: sendmail and inetd by a line in a marker file.
const START_SH: &str = r#"#!/bin/sh
#*****
#*          START.BAT          *
#*****
if [ "$ARMS_EVENT" = "START" ]
then
if [ "$ARMS_DISK" = "SUCCESS" ]
then
    armlog "NORMAL1"
    armlog "`mark sendmail start`"
    armlog "pop3 start..."
    mark pop3 enabled >/dev/null
    armlog "pop3 started."
    if [ "$ARMS_SERVER" = "HOME" ]
    then
        armlog "NORMAL2"
    else
        armlog "ON_OTHER1"
    fi
else
    armlog "ERROR_DISK from START"
fi
elif [ "$ARMS_EVENT" = "RECOVER" ]
then
    armlog "RECOVER"
elif [ "$ARMS_EVENT" = "FAILOVER" ]
then
    if [ "$ARMS_DISK" = "SUCCESS" ]
then
    armlog "FAILOVER1"
    armlog "`mark sendmail start`"
    armlog "pop3 start..."
    mark pop3 enabled >/dev/null
    armlog "pop3 started."
    if [ "$ARMS_SERVER" = "HOME" ]
    then
        armlog "FAILOVER2"
    else
        armlog "ON_OTHER2"
    fi
else
    armlog "ERROR_DISK from FAILOVER"
fi
else
    armlog "NO_ARM"
fi
armlog "EXIT"
exit 0
"#;

/// The seed's stop script pauses 30 s for stragglers: a failover waits
/// for its budget (35 s + the cluster's stop budget), a move for the pause.
const SEED_RECOVERY: Duration = Duration::from_secs(90);

/// The seed's stop script, with its `sleep 30` (waiting for stragglers);
/// sendmail, inetd and `fuser -km` on the shared disk are marker lines.
const STOP_SH: &str = r#"#!/bin/sh
#*****
#*          STOPBAT          *
#*****
if [ "$ARMS_EVENT" = "START" ]
then
    if [ "$ARMS_DISK" = "SUCCESS" ]
    then
        armlog "NORMAL1"
        armlog "pop3 stop..."
        mark pop3 disabled >/dev/null
        armlog "pop3 stopped."
        armlog "`mark sendmail stop`"
        sleep 30
        armlog "kill all procs using disk resource..."
        armlog "`mark fuser -km`"
        armlog "killed."
        if [ "$ARMS_SERVER" = "HOME" ]
        then
                armlog "NORMAL2"
        else
                armlog "ON_OTHER1"
        fi
    else
        armlog "ERROR_DISK from START"
    fi
elif [ "$ARMS_EVENT" = "FAILOVER" ]
then
    if [ "$ARMS_DISK" = "SUCCESS" ]
    then
        armlog "FAILOVER1"
        armlog "pop3 stop..."
        mark pop3 disabled >/dev/null
        armlog "pop3 stopped."
        armlog "`mark sendmail stop`"
        sleep 30
        armlog "`mark fuser -km`"
    if [ "$ARMS_SERVER" = "HOME" ]
        then
            armlog "FAILOVER2"
        else
            armlog "ON_OTHER2"
        fi
    else
        armlog "ERROR_DISK from FAILOVER"
    fi
else
    armlog "NO_ARM"
fi
armlog "EXIT"
exit 0
"#;

fn write_exec(path: &Path, text: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

#[test]
fn seed_scripts_run_with_the_seed_variables() {
    if !root_or_skip("seed_scripts_run_with_the_seed_variables") {
        return;
    }
    // Declared before the cluster: dropped after its processes.
    let Some(disk) = common::disk::LoopDisk::new(32) else { return };
    let mut c = Cluster::new();
    let root = c.root.path().to_path_buf();
    let bin = root.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let marker = root.join("marker.txt");
    // Which node a script runs on: the host part of its namespace's name
    // (a script runs in its node's namespace).
    write_exec(&bin.join("thisnode"), "#!/bin/sh\nip netns identify $$ | sed 's/.*-//'\n");
    // The seed's `armlog` is hamail's own (first in the scripts' PATH).
    // Stands in for starting and stopping sendmail/inetd: a line in the
    // marker file (and on stdout, as the init scripts printed).
    write_exec(
        &bin.join("mark"),
        &format!(
            "#!/bin/sh\nline=\"$(thisnode) $* ARMS_EVENT=$ARMS_EVENT ARMS_SERVER=$ARMS_SERVER ARMS_DISK=$ARMS_DISK\"\n\
             echo \"$line\" >> {}\necho \"$line: ok\"\n",
            marker.display()
        ),
    );
    write_exec(&root.join("start.sh"), START_SH);
    write_exec(&root.join("stop.sh"), STOP_SH);
    // The seed's group had its shared disk (ARMS_DISK is set only for a
    // group with a disk). The stop script pauses 30 s as the seed's does;
    // its 35 s timeout is part of the stop budget another node waits out
    // after a power cut, and a move waits for the pause.
    let spool = root.join("spool");
    std::fs::create_dir_all(&spool).unwrap();
    let scripts = format!(
        "[[group.resources]]\ntype = \"disk\"\nname = \"spool\"\ndevice = \"{d}\"\nmount_point = \"{m}\"\n\
         fs_type = \"ext4\"\n\n\
         [[group.resources]]\ntype = \"exec\"\nname = \"scripts\"\n\
         start = \"PATH={b}:$PATH {r}/start.sh\"\nstop = \"PATH={b}:$PATH {r}/stop.sh\"\ntimeout_secs = 35\n\n",
        d = disk.device,
        m = spool.display(),
        b = bin.display(),
        r = root.display()
    );
    c.apply(1, &mail_group("mail", "[1, 2, 3]", VIP1, &scripts));
    if poll(RECOVERY, || c.greeting_from_client(VIP1).filter(|h| h == "node1")).is_none() {
        panic!("the group is not online at home (node 1):\n{}\n{}", c.group_status(1), c.logs());
    }
    let read_marker = || std::fs::read_to_string(&marker).unwrap_or_default();
    let m = read_marker();
    assert!(m.contains("n1 sendmail start ARMS_EVENT=START ARMS_SERVER=HOME ARMS_DISK=SUCCESS"), "{m}");
    assert!(m.contains("n1 pop3 enabled ARMS_EVENT=START ARMS_SERVER=HOME"), "{m}");

    // The log, read through another node, has the START/HOME branch.
    let l = c.nodes[2].cli(&["log", "-n", "500"], "").1;
    for line in [
        "NORMAL1",
        "n1 sendmail start ARMS_EVENT=START ARMS_SERVER=HOME ARMS_DISK=SUCCESS: ok",
        "pop3 start...",
        "pop3 started.",
        "NORMAL2",
        "EXIT",
    ] {
        assert!(l.contains(line), "`{line}` not in the log of node 3:\n{l}");
    }
    assert!(!l.contains("ON_OTHER") && !l.contains("FAILOVER1"), "{l}");

    // Power cut of node 1: node 2 starts the group as FAILOVER, not at home.
    c.power_cut(0);
    // Until the group is given away (after its stop budget), its status
    // says that its owner is silent.
    if poll(RECOVERY, || c.group_status(1).contains("Online?").then_some(())).is_none() {
        panic!("the lost owner's group not marked:\n{}", c.group_status(1));
    }
    if poll(SEED_RECOVERY, || c.greeting_from_client(VIP1).filter(|h| h == "node2")).is_none() {
        panic!("no failover to node 2:\n{}\n{}", c.group_status(1), c.logs());
    }
    let m = read_marker();
    assert!(m.contains("n2 sendmail start ARMS_EVENT=FAILOVER ARMS_SERVER=OTHER ARMS_DISK=SUCCESS"), "{m}");
    let l = c.nodes[2].cli(&["log", "-n", "500"], "").1;
    for line in ["FAILOVER1", "n2 sendmail start ARMS_EVENT=FAILOVER ARMS_SERVER=OTHER", "ON_OTHER2"] {
        assert!(l.contains(line), "`{line}` not in the log of node 3:\n{l}");
    }
    assert!(!l.contains("FAILOVER2") && !l.contains("NO_ARM") && !l.contains("ERROR_DISK"), "{l}");

    // A move runs the stop script on node 2 (with the event that started
    // it there: FAILOVER) and the start script on node 3 (START, OTHER).
    let (ok, out) = c.nodes[2].cli(&["group", "move", "mail", "3"], "");
    assert!(ok, "{out}");
    if poll(SEED_RECOVERY, || c.greeting_from_client(VIP1).filter(|h| h == "node3")).is_none() {
        panic!("no move to node 3:\n{}\n{}", c.group_status(1), c.logs());
    }
    let m = read_marker();
    assert!(m.contains("n2 pop3 disabled ARMS_EVENT=FAILOVER ARMS_SERVER=OTHER"), "{m}");
    assert!(m.contains("n2 sendmail stop ARMS_EVENT=FAILOVER"), "{m}");
    assert!(m.contains("n2 fuser -km ARMS_EVENT=FAILOVER"), "{m}");
    assert!(m.contains("n3 sendmail start ARMS_EVENT=START ARMS_SERVER=OTHER ARMS_DISK=SUCCESS"), "{m}");
    let l = c.nodes[1].cli(&["log", "-n", "500"], "").1;
    for line in [
        "pop3 stop...",
        "pop3 stopped.",
        "n2 sendmail stop ARMS_EVENT=FAILOVER",
        "ON_OTHER1",
        "n3 sendmail start ARMS_EVENT=START ARMS_SERVER=OTHER",
    ] {
        assert!(l.contains(line), "`{line}` not in the log of node 2:\n{l}");
    }
    eprintln!("seed_scripts_run_with_the_seed_variables: marker file:\n{m}");
}

#[test]
fn shared_disk_follows_the_group() {
    if !root_or_skip("shared_disk_follows_the_group") {
        return;
    }
    // Declared before the cluster: dropped after its processes.
    let Some(disk) = common::disk::LoopDisk::new(32) else { return };
    let mut c = Cluster::new();
    let spool = c.root.path().join("spool");
    std::fs::create_dir_all(&spool).unwrap();
    let disk_resource = format!(
        "[[group.resources]]\ntype = \"disk\"\nname = \"spool\"\ndevice = \"{}\"\nmount_point = \"{}\"\nfs_type = \"ext4\"\n\n",
        disk.device,
        spool.display()
    );
    c.apply(0, &mail_group("mail", "[1, 2, 3]", VIP1, &disk_resource));
    // Which running nodes have the disk mounted (each `hamail` runs in its
    // own mount namespace).
    let mounted = |c: &Cluster| -> Vec<usize> {
        (0..3)
            .filter(|i| {
                let pid = c.nodes[*i].server.as_ref().and_then(|s| s.child.as_ref()).map(|ch| ch.id());
                pid.is_some_and(|pid| common::disk::mounted_in(pid, &spool))
            })
            .collect()
    };
    // Polls `f` while checking, every round, that the disk is never
    // mounted on two nodes at once.
    let watch = |c: &Cluster, what: &str, f: &mut dyn FnMut() -> bool| {
        let deadline = Instant::now() + RECOVERY;
        loop {
            let m = mounted(c);
            assert!(m.len() <= 1, "the disk is mounted on nodes {m:?} at once");
            if f() {
                return;
            }
            if Instant::now() > deadline {
                panic!("{what}: not within {RECOVERY:?}\n{}\n{}", c.group_status(2), c.logs());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    };

    watch(&c, "online at home", &mut || c.greeting_from_client(VIP1).as_deref() == Some("node1"));
    assert_eq!(mounted(&c), vec![0], "the disk is mounted on the owner only");
    match c.send_from_client(VIP1, "on-the-disk-1") {
        Ok(Ok(host)) => assert_eq!(host, "node1"),
        other => panic!("sending through {VIP1}: {other:?}\n{}", c.logs()),
    }
    assert_eq!(c.tokens_from_client(VIP1), Some(vec!["on-the-disk-1".to_string()]));
    // The message is in the disk's store, not in the node's own.
    let node1 = c.bed.host("n1").ip.to_string();
    assert_eq!(c.tokens_from_client(&node1), Some(vec![]), "the node's own store does not have the group's mail");

    // Switchover: the disk goes with the group.
    let (ok, out) = c.nodes[0].cli(&["group", "move", "mail", "2"], "");
    assert!(ok, "group move: {out}");
    watch(&c, "moved to node 2", &mut || c.greeting_from_client(VIP1).as_deref() == Some("node2"));
    assert_eq!(mounted(&c), vec![1]);
    assert_eq!(c.tokens_from_client(VIP1), Some(vec!["on-the-disk-1".to_string()]), "node 2 serves the disk's mail");
    match c.send_from_client(VIP1, "on-the-disk-2") {
        Ok(Ok(host)) => assert_eq!(host, "node2"),
        other => panic!("sending through {VIP1} after the move: {other:?}\n{}", c.logs()),
    }

    // Power cut of node 2: another node fscks and mounts the disk once the
    // dead holder's disk heartbeat is stale.
    let cut = Instant::now();
    c.power_cut(1);
    let mut taker = None;
    watch(&c, "taken over after the power cut", &mut || {
        taker = c.greeting_from_client(VIP1).filter(|h| h != "node2");
        taker.is_some()
    });
    eprintln!("shared disk: {taker:?} serves the group {:?} after the power cut", cut.elapsed());
    let expected = vec!["on-the-disk-1".to_string(), "on-the-disk-2".to_string()];
    assert_eq!(c.tokens_from_client(VIP1), Some(expected), "every acknowledged message, from the disk");
    assert_eq!(mounted(&c).len(), 1);
    c.bed.set_link("n2", true);
}
