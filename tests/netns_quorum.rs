//! A node cut off from the others (a partition, not a power cut: its
//! clients still reach it) refuses in bounded time instead of hanging its
//! clients (needs root; skipped otherwise). Three data nodes and a client in
//! network namespaces; the partition is made with blackhole routes between
//! the nodes, so the client still reaches every node. The owner of the
//! floating address is cut off in the middle of SMTP transactions and of a
//! POP3 login: each gets a temporary error within the cluster's commit
//! timeout, the client sends the same messages again through the floating
//! address (now on a node of the majority), and after the heal every
//! acknowledged message is in the maildrop once, on every node.

mod common;

use std::io::{BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::mail::{maildrop, reply};
use common::netns::*;
use common::*;

const VIP: &str = "198.18.0.100";
const USER: &str = "alice@example.org";
const RECOVERY: Duration = Duration::from_secs(30);
/// The nodes' `[cluster] commit_timeout_ms` (the default).
const COMMIT_TIMEOUT: Duration = Duration::from_secs(5);
/// What a refusal may take beyond the commit timeout (scheduling, the
/// copies' own timeout running first).
const MARGIN: Duration = Duration::from_secs(3);

/// Cuts (or heals) every path between `host` and the other nodes, both ways.
fn partition(c: &NsCluster, host: &str, cut: bool) {
    let verb = if cut { "add" } else { "del" };
    let mine = c.bed.host(host).ip.to_string();
    for other in NS_NODES.iter().filter(|h| **h != host) {
        let theirs = c.bed.host(other).ip.to_string();
        ip(&["-n", c.bed.ns(host), "route", verb, "blackhole", &format!("{theirs}/32")]);
        ip(&["-n", c.bed.ns(other), "route", verb, "blackhole", &format!("{mine}/32")]);
    }
}

/// An SMTP transaction left open just before the end of its data.
struct Open {
    w: TcpStream,
    r: BufReader<TcpStream>,
    token: String,
}

fn message(token: &str) -> String {
    format!(
        "Message-ID: <{token}@client.test>\r\nSubject: {token}\r\nX-Token: {token}\r\n\r\nsent during a partition\r\n"
    )
}

/// From the client host: connects to `addr`, sends the envelope and the
/// data of message `token`, all but the final dot.
fn open_transaction(c: &NsCluster, addr: SocketAddr, token: &str) -> Open {
    let token = token.to_string();
    c.bed.run_in("cl", move || open_transaction_here(addr, &token)).expect("transaction opened from the client")
}

/// Sends the same transaction through `addr` until it gets `250`.
fn resend_until_accepted(c: &NsCluster, addr: SocketAddr, token: &str, within: Duration) -> String {
    let token = token.to_string();
    let deadline = Instant::now() + within;
    loop {
        let t = token.clone();
        let answer = c.bed.run_in("cl", move || -> std::io::Result<String> {
            let mut o = open_transaction_here(addr, &t)?;
            o.w.write_all(b".\r\n")?;
            let l = reply(&mut o.r)?;
            let _ = o.w.write_all(b"QUIT\r\n");
            Ok(l)
        });
        let last = match answer {
            Ok(l) if l.starts_with("250") => return l,
            Ok(l) => l,
            Err(e) => e.to_string(),
        };
        assert!(Instant::now() < deadline, "{token} never accepted through {addr}; last: {last}\n{}", c.logs());
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// [`open_transaction`] on the calling thread (already in the client's
/// namespace), with I/O errors returned (a takeover may be under way).
fn open_transaction_here(addr: SocketAddr, token: &str) -> std::io::Result<Open> {
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut w = s.try_clone()?;
    let mut r = BufReader::new(s);
    let greeting = reply(&mut r)?;
    if !greeting.starts_with("220 ") {
        return Err(std::io::Error::other(greeting));
    }
    w.write_all(
        format!("EHLO client.test\r\nMAIL FROM:<sender@client.test>\r\nRCPT TO:<{USER}>\r\nDATA\r\n").as_bytes(),
    )?;
    for expect in ["250", "250", "250", "354"] {
        let l = reply(&mut r)?;
        if !l.starts_with(expect) {
            return Err(std::io::Error::other(l));
        }
    }
    w.write_all(message(token).as_bytes())?;
    Ok(Open { w, r, token: token.to_string() })
}

#[test]
fn a_node_without_quorum_refuses_in_bounded_time_and_resends_are_delivered_once() {
    if !root_or_skip("a_node_without_quorum_refuses_in_bounded_time_and_resends_are_delivered_once") {
        return;
    }
    let c = NsCluster::form(USER, RECOVERY);
    c.apply(0, &address_and_mail_group(VIP));
    let vip: SocketAddr = SocketAddr::new(VIP.parse().unwrap(), 2525);
    let vip_up = poll(RECOVERY, || c.bed.run_in("cl", move || greeting(vip)).filter(|h| h == "node1"));
    assert!(vip_up.is_some(), "the group is not online on node 1\n{}", c.logs());
    let before = resend_until_accepted(&c, vip, "before", RECOVERY);
    assert!(before.starts_with("250"));

    // Node 1 (the leader since `cluster init`, and the owner) is cut off
    // with two transactions waiting for their final dot: one to its own
    // address, one through the floating address (the group is still there
    // until its lease runs out).
    let own = SocketAddr::new(c.bed.host("n1").ip, 2525);
    let pop3 = SocketAddr::new(c.bed.host("n1").ip, 2110);
    let mut open = vec![open_transaction(&c, own, "own-address"), open_transaction(&c, own, "own-address-2")];
    partition(&c, "n1", true);
    let cut = Instant::now();

    // Each gets a temporary refusal within the bound, not silence.
    let mut refusals = Vec::new();
    for o in &mut open {
        let began = Instant::now();
        o.w.write_all(b".\r\n").expect("final dot");
        let answer = reply(&mut o.r).unwrap_or_else(|e| panic!("{}: no reply: {e}\n{}", o.token, c.logs()));
        let took = began.elapsed();
        assert!(answer.starts_with("451 4.3.0"), "{}: {answer}", o.token);
        assert!(took <= COMMIT_TIMEOUT + MARGIN, "{}: refused only after {took:?}", o.token);
        refusals.push(took);
    }
    eprintln!("minority node: end of data refused with 451 after {refusals:?}");

    // A POP3 login there needs a linearizable read of the maildrop: also a
    // temporary error within the bound.
    let (pop3_answer, pop3_took) = c.bed.run_in("cl", move || {
        let s = TcpStream::connect_timeout(&pop3, Duration::from_secs(2)).expect("pop3 connect");
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let mut w = s.try_clone().unwrap();
        let mut r = BufReader::new(s);
        assert!(reply(&mut r).unwrap().starts_with("+OK"));
        w.write_all(format!("USER {USER}\r\n").as_bytes()).unwrap();
        assert!(reply(&mut r).unwrap().starts_with("+OK"));
        let began = Instant::now();
        w.write_all(b"PASS pw\r\n").unwrap();
        let answer = reply(&mut r).unwrap_or_else(|e| format!("no reply: {e}"));
        (answer, began.elapsed())
    });
    eprintln!("minority node: POP3 login answered after {pop3_took:?}: {}", pop3_answer.trim_end());
    assert!(pop3_answer.starts_with("-ERR [SYS/TEMP]"), "POP3 login on the cut-off node: {pop3_answer}");
    assert!(pop3_took <= COMMIT_TIMEOUT + MARGIN, "POP3 login refused only after {pop3_took:?}");

    // The client sends both again, through the floating address, which a
    // node of the majority holds by now.
    for o in &open {
        let l = resend_until_accepted(&c, vip, &o.token, RECOVERY);
        eprintln!("{} resent through {VIP} after {:?}: {l}", o.token, cut.elapsed());
    }
    assert!(!c.bed.has_addr("n1", VIP), "the cut-off node still holds {VIP}");

    // The cut-off node counted its refusals.
    let (ok, out) = c.nodes[0].cli(&["cluster", "status", "--json"], "");
    assert!(ok, "{out}");
    let status: serde_json::Value = serde_json::from_str(&out).expect("status json");
    let here = status.as_array().and_then(|a| a.iter().find(|m| m["name"] == "node1")).cloned().expect("node1");
    assert!(here["refused_unavailable"].as_u64().unwrap_or(0) >= 3, "refusals not counted: {here}");

    // Heal; once every node caught up, every acknowledged message is in
    // the maildrop once, read through every node.
    partition(&c, "n1", false);
    if poll(RECOVERY, || c.all_healthy(1).then_some(())).is_none() {
        panic!("the cluster did not heal: {:?}\n{}", c.nodes[1].status(), c.logs());
    }
    for (i, host) in NS_NODES.iter().enumerate() {
        let pop3 = SocketAddr::new(c.bed.host(host).ip, 2110);
        let tokens = eventually(RECOVERY, &format!("maildrop read through node {}", i + 1), || {
            let drop = c.bed.run_in("cl", move || std::panic::catch_unwind(|| maildrop(pop3, USER)).ok())?;
            let mut tokens: Vec<String> = drop.iter().map(|m| common::mail::token_of(m)).collect();
            tokens.sort();
            Some(tokens)
        });
        assert_eq!(tokens, vec!["before", "own-address", "own-address-2"], "maildrop through node {}", i + 1);
    }
}
