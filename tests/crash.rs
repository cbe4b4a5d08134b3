//! Crash safety of the real binary: concurrent SMTP load while the server is
//! SIGKILLed several times. After the last restart every message that got
//! `250` is in each of its recipients' maildrops exactly once and
//! byte-identical; a message whose `250` was lost in the crash is either in
//! all its maildrops, whole, or in none; nothing else is there.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::mail::*;
use common::*;

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
