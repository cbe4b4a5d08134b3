//! Crash safety of the real binary: concurrent SMTP load while the server is
//! SIGKILLed several times. After the last restart every message that got
//! `250` is in each of its recipients' maildrops exactly once and
//! byte-identical; a message whose `250` was lost in the crash is either in
//! all its maildrops, whole, or in none; nothing else is there.

mod common;

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use sha2::{Digest, Sha256};

const USERS: usize = 5;

fn user(i: usize) -> String {
    format!("user{i}@example.org")
}

#[derive(Clone)]
struct Sent {
    recipients: Vec<usize>,
    hash: [u8; 32],
    acked: bool,
}

fn reply(r: &mut BufReader<TcpStream>) -> std::io::Result<String> {
    loop {
        let mut l = String::new();
        if r.read_line(&mut l)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        if l.len() < 4 || l.as_bytes()[3] != b'-' {
            return Ok(l);
        }
    }
}

/// Sends one message; Ok(true) when it got 250. Records the attempt first.
fn send_one(addr: SocketAddr, token: &str, recipients: &[usize], size: usize, log: &Mutex<HashMap<String, Sent>>) -> std::io::Result<bool> {
    let mut content = format!("Subject: {token}\r\nX-Token: {token}\r\n\r\n").into_bytes();
    let mut i = 0u64;
    while content.len() < size {
        content.extend_from_slice(format!("{token} line {i} {}\r\n", "p".repeat((i % 60) as usize)).as_bytes());
        i += 1;
    }
    let hash: [u8; 32] = Sha256::digest(&content).into();
    log.lock().unwrap().insert(token.to_string(), Sent { recipients: recipients.to_vec(), hash, acked: false });
    let s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(20)))?;
    let mut w = s.try_clone()?;
    let mut r = BufReader::new(s);
    reply(&mut r)?;
    let mut cmds = String::from("EHLO load.test\r\nMAIL FROM:<load@elsewhere.test>\r\n");
    for &u in recipients {
        cmds.push_str(&format!("RCPT TO:<{}>\r\n", user(u)));
    }
    cmds.push_str("DATA\r\n");
    w.write_all(cmds.as_bytes())?;
    for _ in 0..(recipients.len() + 2) {
        let l = reply(&mut r)?;
        if !l.starts_with('2') {
            return Ok(false);
        }
    }
    if !reply(&mut r)?.starts_with("354") {
        return Ok(false);
    }
    w.write_all(&content)?;
    w.write_all(b".\r\n")?;
    let ok = reply(&mut r)?.starts_with("250");
    if ok {
        log.lock().unwrap().get_mut(token).expect("recorded").acked = true;
    }
    let _ = w.write_all(b"QUIT\r\n");
    Ok(ok)
}

/// Every message in a maildrop, via POP3 (RETR, un-byte-stuffed).
fn maildrop(addr: SocketAddr, u: &str) -> Vec<Vec<u8>> {
    let s = TcpStream::connect(addr).expect("pop3");
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut w = s.try_clone().unwrap();
    let mut r = BufReader::new(s);
    let mut line = || {
        let mut l = Vec::new();
        r.read_until(b'\n', &mut l).expect("read");
        l
    };
    assert!(line().starts_with(b"+OK"));
    w.write_all(format!("USER {u}\r\nPASS pw\r\nSTAT\r\n").as_bytes()).unwrap();
    line();
    let pass = line();
    assert!(pass.starts_with(b"+OK"), "{}", String::from_utf8_lossy(&pass));
    let stat = String::from_utf8(line()).unwrap();
    let n: usize = stat.split_whitespace().nth(1).unwrap().parse().unwrap();
    let mut out = Vec::new();
    for i in 1..=n {
        w.write_all(format!("RETR {i}\r\n").as_bytes()).unwrap();
        assert!(line().starts_with(b"+OK"));
        let mut msg = Vec::new();
        loop {
            let l = line();
            if l == b".\r\n" {
                break;
            }
            msg.extend_from_slice(if l.starts_with(b"..") { &l[1..] } else { &l });
        }
        out.push(msg);
    }
    w.write_all(b"QUIT\r\n").unwrap();
    let mut rest = Vec::new();
    let _ = r.read_to_end(&mut rest);
    out
}

fn token_of(msg: &[u8]) -> String {
    let text = String::from_utf8_lossy(msg);
    let start = text.find("X-Token: ").expect("token header") + 9;
    text[start..].split("\r\n").next().unwrap().to_string()
}

fn content_hash(msg: &[u8]) -> [u8; 32] {
    // Our trace lines end where the sent content starts: at "Subject: ".
    let pos = msg.windows(9).position(|w| w == b"Subject: ").expect("subject");
    Sha256::digest(&msg[pos..]).into()
}

#[test]
fn sigkill_under_load_loses_and_doubles_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let log: Arc<Mutex<HashMap<String, Sent>>> = Arc::default();
    {
        let s = start_in(dir, "");
        s.add_domain("example.org");
        for i in 0..USERS {
            s.add_user(&user(i), "pw");
        }
    }
    let rounds = 5;
    let mut seq = 0u64;
    for round in 0..rounds {
        let mut s = start_in(dir, "");
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for t in 0..6 {
            let addr = s.smtp;
            let log = log.clone();
            let stop = stop.clone();
            let base = seq + (t as u64) * 1_000_000;
            threads.push(std::thread::spawn(move || {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let id = base + n;
                    n += 1;
                    let token = format!("r{round}t{t}m{id}");
                    let recipients: Vec<usize> = (0..USERS).filter(|u| !(id as usize + u).is_multiple_of(3)).collect();
                    let size = [300, 5_000, 70_000][(id % 3) as usize];
                    if send_one(addr, &token, &recipients, size, &log).is_err() {
                        // The server died: stop like a client whose MTA went away.
                        break;
                    }
                }
            }));
        }
        seq += 10_000_000;
        // Let some mail through, then cut the power at a moment that varies.
        let acked_before = log.lock().unwrap().values().filter(|m| m.acked).count();
        eventually(Duration::from_secs(60), "some acknowledged messages", || {
            (log.lock().unwrap().values().filter(|m| m.acked).count() >= acked_before + 20 + round * 7).then_some(())
        });
        s.kill9();
        stop.store(true, Ordering::Relaxed);
        for t in threads {
            t.join().unwrap();
        }
    }
    let s = start_in(dir, "");
    let log = log.lock().unwrap().clone();
    let acked = log.values().filter(|m| m.acked).count();
    assert!(acked >= 100, "the load must have got messages through: {acked}");
    let mut seen_in: HashMap<String, HashSet<usize>> = HashMap::new();
    for u in 0..USERS {
        let mut here = HashSet::new();
        for msg in maildrop(s.pop3, &user(u)) {
            let token = token_of(&msg);
            let sent = log.get(&token).unwrap_or_else(|| panic!("{token}: a message nobody sent"));
            assert!(here.insert(token.clone()), "{token} is twice in {}", user(u));
            assert_eq!(content_hash(&msg), sent.hash, "{token} is damaged in {}", user(u));
            assert!(sent.recipients.contains(&u), "{token} delivered to a non-recipient");
            seen_in.entry(token).or_default().insert(u);
        }
    }
    for (token, sent) in &log {
        let got = seen_in.get(token).cloned().unwrap_or_default();
        let want: HashSet<usize> = sent.recipients.iter().copied().collect();
        if sent.acked {
            assert_eq!(got, want, "{token} got 250 but is not in every recipient's maildrop");
        } else {
            assert!(got.is_empty() || got == want, "{token} (no 250) is in some maildrops only: {got:?}");
        }
    }
    // No leftovers: every body file is referenced by something we read.
    let orphans: Vec<_> = std::fs::read_dir(dir.join("data/store/tmp")).into_iter().flatten().flatten().collect();
    assert!(orphans.is_empty(), "tmp/ must be cleaned at start: {orphans:?}");
    eprintln!("crash test: {} sent, {acked} acknowledged, {} delivered", log.len(), seen_in.len());
}
