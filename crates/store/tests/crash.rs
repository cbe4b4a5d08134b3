//! Crash safety: a child process accepts mail as fast as it can and prints
//! every acknowledgement; it is SIGKILLed at random moments, the store is
//! reopened, and every acknowledged message must be there exactly once per
//! recipient with the right body, and the body files must be exactly the
//! referenced ones.
//!
//! The child is this test binary itself, run with `CHILD_ENV` set and
//! filtered to the `crash_child` test.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use hamail_store::*;
use rand::Rng;

const CHILD_ENV: &str = "HAMAIL_STORE_CRASH_CHILD_DIR";
const USERS: [&str; 3] = ["a@x.test", "b@x.test", "c@x.test"];
/// Receives mail too, but its mail is deleted continuously (to exercise
/// reference counting and unlinking under crashes).
const SCRATCH: &str = "scratch@x.test";

fn addr(s: &str) -> Address {
    Address::parse(s).unwrap()
}

/// The child: runs until killed.
#[test]
fn crash_child() {
    let Ok(dir) = std::env::var(CHILD_ENV) else { return };
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(child(PathBuf::from(dir)));
}

async fn child(dir: PathBuf) {
    let store = LocalStore::open(&dir, StoreOptions::default()).unwrap();
    let mut tasks = Vec::new();
    for t in 0..8u32 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            loop {
                n += 1;
                let (body, local, remote) = {
                    let mut rng = rand::thread_rng();
                    let body: Vec<u8> = if rng.gen_bool(0.2) {
                        format!("shared body {}\r\n", rng.gen_range(0..4)).into_bytes()
                    } else {
                        let len = rng.gen_range(10..30_000);
                        let mut b = format!("task {t} message {n} pid {}\r\n", std::process::id()).into_bytes();
                        b.extend((0..len).map(|i| b'a' + (i % 26) as u8));
                        b
                    };
                    let mut local: Vec<&str> = USERS.iter().copied().filter(|_| rng.gen_bool(0.5)).collect();
                    if rng.gen_bool(0.3) {
                        local.push(SCRATCH);
                    }
                    let remote = rng.gen_bool(0.2);
                    if local.is_empty() && !remote {
                        local.push(USERS[0]);
                    }
                    (body, local, remote)
                };
                let msg = Incoming {
                    return_path: Some("s@far.test".into()),
                    local: local.iter().map(|s| addr(s)).collect(),
                    remote: if remote { vec!["r@far.test".into()] } else { vec![] },
                    body: body.into(),
                    queue_id: store.next_queue_id().await.unwrap(),
                    resend: None,
                };
                let c = store.accept(msg).await.unwrap();
                let line = format!("ACK {} {} {} {}\n", c.queue_id().0, c.body(), local.join(","), remote as u8);
                let mut out = std::io::stdout().lock();
                out.write_all(line.as_bytes()).unwrap();
                out.flush().unwrap();
            }
        }));
    }
    let scratch = addr(SCRATCH);
    loop {
        let ids: Vec<EntryId> = store.mailbox(&scratch).await.unwrap().iter().map(|e| e.id).collect();
        store.delete(&scratch, &ids).await.unwrap();
        // Dequeue now and then: pretend remote delivery happened.
        if let Some(q) = store.queue().await.unwrap().first() {
            if rand::thread_rng().gen_bool(0.1) {
                // A dequeued message's ack no longer implies a queue entry;
                // say so before it happens.
                let line = format!("DEQ {}\n", q.queue_id.0);
                let mut out = std::io::stdout().lock();
                out.write_all(line.as_bytes()).unwrap();
                out.flush().unwrap();
                store.dequeue(q.queue_id).await.unwrap();
            }
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

#[derive(Debug)]
struct Ack {
    hash: BodyHash,
    local: Vec<String>,
    remote: bool,
}

fn parse_line(line: &str, acks: &mut BTreeMap<u64, Ack>, dequeued: &mut BTreeSet<u64>) {
    // libtest prints "test crash_child ... " without a newline before the
    // child's first line, so look for the record anywhere in the line.
    let start = [line.find("ACK "), line.find("DEQ ")].into_iter().flatten().min();
    let Some(start) = start else { return };
    let f: Vec<&str> = line[start..].split(' ').collect();
    match f.as_slice() {
        ["ACK", qid, hash, local, remote] => {
            let (Ok(qid), Some(hash)) = (qid.parse::<u64>(), BodyHash::from_hex(hash)) else { return };
            let ack = Ack {
                hash,
                local: local.split(',').filter(|s| !s.is_empty()).map(String::from).collect(),
                remote: *remote == "1",
            };
            assert!(acks.insert(qid, ack).is_none(), "queue id {qid} acknowledged twice");
        }
        ["DEQ", qid] => {
            if let Ok(q) = qid.parse() {
                dequeued.insert(q);
            }
        }
        // libtest chatter, or a line cut by the kill.
        _ => {}
    }
}

fn body_files(dir: &Path) -> BTreeSet<BodyHash> {
    let mut out = BTreeSet::new();
    for f in std::fs::read_dir(dir.join("bodies")).unwrap() {
        let name = f.unwrap().file_name().into_string().unwrap();
        out.insert(BodyHash::from_hex(&name).expect("only hashes in bodies/"));
    }
    out
}

async fn verify(dir: &Path, acks: &BTreeMap<u64, Ack>, dequeued: &BTreeSet<u64>) {
    let store = LocalStore::open(dir, StoreOptions::default()).unwrap();
    let report = store.recovery_report().clone();
    assert_eq!(report.missing_bodies, 0, "{report:?}");
    assert_eq!(report.refcounts_repaired, 0, "{report:?}");
    assert_eq!(std::fs::read_dir(dir.join("tmp")).unwrap().count(), 0);

    let mut referenced = BTreeSet::new();
    for user in USERS {
        let mb = store.mailbox(&addr(user)).await.unwrap();
        let mut by_qid: BTreeMap<u64, Vec<&MailboxEntry>> = BTreeMap::new();
        for e in &mb {
            referenced.insert(e.body);
            by_qid.entry(e.queue_id.0).or_default().push(e);
        }
        for (qid, entries) in &by_qid {
            assert_eq!(entries.len(), 1, "{user}: queue id {qid} delivered {} times", entries.len());
        }
        for (qid, ack) in acks {
            if ack.local.iter().any(|u| u == user) {
                let e = by_qid.get(qid).unwrap_or_else(|| panic!("{user}: acknowledged {qid} lost"));
                assert_eq!(e[0].body, ack.hash, "{user}: {qid} has the wrong body");
            }
        }
    }
    for e in store.mailbox(&addr(SCRATCH)).await.unwrap() {
        referenced.insert(e.body);
    }
    let queue: BTreeMap<u64, QueueEntry> =
        store.queue().await.unwrap().into_iter().map(|q| (q.queue_id.0, q)).collect();
    for q in queue.values() {
        referenced.insert(q.body);
    }
    for (qid, ack) in acks {
        if ack.remote && !dequeued.contains(qid) {
            let q = queue.get(qid).unwrap_or_else(|| panic!("acknowledged queue entry {qid} lost"));
            assert_eq!(q.body, ack.hash);
        }
    }
    assert_eq!(body_files(dir), referenced, "body files differ from the referenced set");
    for h in &referenced {
        // Reads check the content against the hash.
        store.body(h).await.unwrap();
    }
}

#[test]
fn acknowledged_mail_survives_sigkill() {
    if std::env::var(CHILD_ENV).is_ok() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let mut acks = BTreeMap::new();
    let mut dequeued = BTreeSet::new();
    let exe = std::env::current_exe().unwrap();
    for round in 0..6 {
        let mut child = Command::new(&exe)
            .args(["crash_child", "--exact", "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let reader =
            std::thread::spawn(move || BufReader::new(stdout).lines().map_while(Result::ok).collect::<Vec<_>>());
        let wait = rand::thread_rng().gen_range(300..1500);
        std::thread::sleep(Duration::from_millis(wait));
        child.kill().unwrap();
        child.wait().unwrap();
        let before = acks.len();
        for line in reader.join().unwrap() {
            parse_line(&line, &mut acks, &mut dequeued);
        }
        eprintln!("round {round}: killed after {wait} ms, {} new acknowledgements", acks.len() - before);
        rt.block_on(verify(dir.path(), &acks, &dequeued));
    }
    assert!(acks.len() > 50, "the child acknowledged too little to test anything: {}", acks.len());
}
