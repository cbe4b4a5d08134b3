//! Behaviour of the mail side of `LocalStore`: accept, mailbox, delete,
//! queue, ids and recovery, observed through the public API and the files.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;

use hamail_store::*;

fn addr(s: &str) -> Address {
    Address::parse(s).unwrap()
}

fn open(dir: &Path) -> Arc<LocalStore> {
    LocalStore::open(dir, StoreOptions::default()).unwrap()
}

/// The body files on disk, by hash.
fn body_files(dir: &Path) -> BTreeSet<BodyHash> {
    let mut out = BTreeSet::new();
    for f in std::fs::read_dir(dir.join("bodies")).unwrap() {
        let name = f.unwrap().file_name().into_string().unwrap();
        out.insert(BodyHash::from_hex(&name).expect("only hashes in bodies/"));
    }
    out
}

async fn incoming(store: &LocalStore, local: &[&str], remote: &[&str], body: &[u8]) -> Incoming {
    Incoming {
        return_path: Some("sender@example.org".into()),
        local: local.iter().map(|s| addr(s)).collect(),
        remote: remote.iter().map(|s| s.to_string()).collect(),
        body: body.to_vec().into(),
        queue_id: store.next_queue_id().await.unwrap(),
        resend: None,
    }
}

#[tokio::test]
async fn open_body_reads_what_body_reads_and_refuses_damage() {
    use std::io::Read;
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    // Larger than the 64 KiB buffer the check reads through.
    let body: Vec<u8> = (0..300_000u32).map(|i| b"abc.\r\n"[(i % 6) as usize]).collect();
    let h = store.accept(incoming(&store, &["a@x.test"], &[], &body).await).await.unwrap().body();
    let mut opened = store.open_body(&h).await.unwrap();
    assert_eq!(opened.len, body.len() as u64);
    let mut read = Vec::new();
    opened.file.read_to_end(&mut read).unwrap();
    assert_eq!(read, body, "from the start, whole");

    let gone = BodyHash::of(b"never stored");
    assert!(matches!(store.open_body(&gone).await, Err(StoreError::Permanent(_))));
    std::fs::write(dir.path().join("bodies").join(h.to_hex()), &body[1..]).unwrap();
    assert!(matches!(store.open_body(&h).await, Err(StoreError::Internal(_))), "a damaged body is never served");
}

#[tokio::test]
async fn one_body_for_three_recipients_and_exact_sizes() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let body = b"Subject: hi\r\n\r\nhello\r\n";
    let msg = incoming(&store, &["a@x.test", "b@x.test", "c@x.test"], &[], body).await;
    let qid = msg.queue_id;
    let c = store.accept(msg).await.unwrap();
    assert_eq!(c.queue_id(), qid);
    assert_eq!(c.body(), BodyHash::of(body));
    assert_eq!(c.size(), body.len() as u64);

    assert_eq!(body_files(dir.path()), BTreeSet::from([c.body()]));
    assert_eq!(store.body_refs(&c.body()).await.unwrap(), 3);

    for u in ["a@x.test", "b@x.test", "c@x.test"] {
        let mb = store.mailbox(&addr(u)).await.unwrap();
        assert_eq!(mb.len(), 1);
        let e = &mb[0];
        assert_eq!(e.body, c.body());
        assert_eq!(e.queue_id, qid);
        assert_eq!(e.return_path_line(), "Return-Path: <sender@example.org>\r\n");
        assert_eq!(e.size, ("Return-Path: <sender@example.org>\r\n".len() + body.len()) as u64);
    }
    assert_eq!(*store.body(&c.body()).await.unwrap(), body.to_vec());
    // Three different entries, never the same id.
    let ids: BTreeSet<EntryId> = [
        store.mailbox(&addr("a@x.test")).await.unwrap()[0].id,
        store.mailbox(&addr("b@x.test")).await.unwrap()[0].id,
        store.mailbox(&addr("c@x.test")).await.unwrap()[0].id,
    ]
    .into();
    assert_eq!(ids.len(), 3);
}

#[tokio::test]
async fn null_sender_size_and_duplicate_recipients() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let mut msg = incoming(&store, &["a@x.test", "a@x.test"], &[], b"bounce\r\n").await;
    msg.return_path = None;
    let c = store.accept(msg).await.unwrap();
    let mb = store.mailbox(&addr("a@x.test")).await.unwrap();
    assert_eq!(mb.len(), 1, "duplicate recipients are delivered once");
    assert_eq!(mb[0].size, ("Return-Path: <>\r\n".len() + 8) as u64);
    assert_eq!(store.body_refs(&c.body()).await.unwrap(), 1);
}

#[tokio::test]
async fn no_recipients_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let msg = incoming(&store, &[], &[], b"x").await;
    assert!(matches!(store.accept(msg).await, Err(StoreError::Permanent(_))));
}

#[tokio::test]
async fn mailbox_is_oldest_first() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let mut hashes = Vec::new();
    for i in 0..20 {
        let msg = incoming(&store, &["a@x.test"], &[], format!("message {i}\r\n").as_bytes()).await;
        hashes.push(store.accept(msg).await.unwrap().body());
    }
    let mb = store.mailbox(&addr("a@x.test")).await.unwrap();
    assert_eq!(mb.iter().map(|e| e.body).collect::<Vec<_>>(), hashes);
    assert!(mb.windows(2).all(|w| w[0].id < w[1].id));
}

#[tokio::test]
async fn delete_frees_body_only_at_last_reference() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let body = b"shared body\r\n";
    let c = store.accept(incoming(&store, &["a@x.test", "b@x.test"], &["r@remote.test"], body).await).await.unwrap();
    let h = c.body();
    assert_eq!(store.body_refs(&h).await.unwrap(), 3);

    let a = addr("a@x.test");
    let ida = store.mailbox(&a).await.unwrap()[0].id;
    store.delete(&a, &[ida]).await.unwrap();
    assert!(store.mailbox(&a).await.unwrap().is_empty());
    assert_eq!(store.body_refs(&h).await.unwrap(), 2);
    assert!(body_files(dir.path()).contains(&h));

    // Deleting again (id already gone) is ignored and changes nothing.
    store.delete(&a, &[ida]).await.unwrap();
    assert_eq!(store.body_refs(&h).await.unwrap(), 2);
    // Another user's id given for the wrong user is not found either.
    let b = addr("b@x.test");
    let idb = store.mailbox(&b).await.unwrap()[0].id;
    store.delete(&a, &[idb]).await.unwrap();
    assert_eq!(store.mailbox(&b).await.unwrap().len(), 1);

    store.delete(&b, &[idb]).await.unwrap();
    assert_eq!(store.body_refs(&h).await.unwrap(), 1);
    assert!(body_files(dir.path()).contains(&h));

    // The queue entry holds the last reference.
    let q = store.queue().await.unwrap();
    assert_eq!(q.len(), 1);
    assert_eq!(q[0].recipients, vec!["r@remote.test".to_string()]);
    assert_eq!(q[0].body, h);
    assert!(store.dequeue(c.queue_id()).await.unwrap());
    assert!(!store.dequeue(c.queue_id()).await.unwrap());
    assert_eq!(store.body_refs(&h).await.unwrap(), 0);
    assert!(body_files(dir.path()).is_empty());
    assert!(matches!(store.body(&h).await, Err(StoreError::Permanent(_))));
}

#[tokio::test]
async fn same_body_accepted_again_after_free_is_stored_again() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let a = addr("a@x.test");
    let body = b"again\r\n";
    store.accept(incoming(&store, &["a@x.test"], &[], body).await).await.unwrap();
    let id = store.mailbox(&a).await.unwrap()[0].id;
    store.delete(&a, &[id]).await.unwrap();
    assert!(body_files(dir.path()).is_empty());
    let c = store.accept(incoming(&store, &["a@x.test"], &[], body).await).await.unwrap();
    assert_eq!(*store.body(&c.body()).await.unwrap(), body.to_vec());
    assert_eq!(store.body_refs(&c.body()).await.unwrap(), 1);
}

#[tokio::test]
async fn ids_are_never_reused_after_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let a = addr("a@x.test");
    let mut queue_ids = BTreeSet::new();
    let mut entry_ids = BTreeSet::new();
    for round in 0..3 {
        let store = open(dir.path());
        for i in 0..5 {
            let msg = incoming(&store, &["a@x.test"], &[], format!("r{round} m{i}").as_bytes()).await;
            assert!(queue_ids.insert(msg.queue_id), "queue id reused");
            store.accept(msg).await.unwrap();
        }
        // Delete everything: the highest ids are gone, and must still not
        // come back.
        let mb = store.mailbox(&a).await.unwrap();
        for e in &mb {
            assert!(entry_ids.insert(e.id), "entry id reused");
        }
        let ids: Vec<EntryId> = mb.iter().map(|e| e.id).collect();
        store.delete(&a, &ids).await.unwrap();
        drop(store);
    }
    assert_eq!(entry_ids.len(), 15);
}

#[tokio::test]
async fn a_thousand_local_recipients_in_one_accept() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let users: Vec<String> = (0..1000).map(|i| format!("user{i}@x.test")).collect();
    let refs: Vec<&str> = users.iter().map(|s| s.as_str()).collect();
    let c = store.accept(incoming(&store, &refs, &["far@away.test"], b"to everyone\r\n").await).await.unwrap();
    assert_eq!(store.body_refs(&c.body()).await.unwrap(), 1001);
    for u in [&users[0], &users[500], &users[999]] {
        let mb = store.mailbox(&addr(u)).await.unwrap();
        assert_eq!(mb.len(), 1);
        assert_eq!(mb[0].body, c.body());
    }
    assert_eq!(body_files(dir.path()).len(), 1);
}

#[tokio::test]
async fn concurrent_accepts_all_land() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let mut tasks = Vec::new();
    for t in 0..8 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            for i in 0..25 {
                // Every fifth message shares its body with other tasks.
                let body = if i % 5 == 0 { "shared".to_string() } else { format!("t{t} i{i}") };
                let msg = incoming(&store, &["a@x.test", "b@x.test"], &[], body.as_bytes()).await;
                out.push(store.accept(msg).await.unwrap());
            }
            out
        }));
    }
    let mut committed = Vec::new();
    for t in tasks {
        committed.extend(t.await.unwrap());
    }
    assert_eq!(committed.len(), 200);
    let mb = store.mailbox(&addr("a@x.test")).await.unwrap();
    assert_eq!(mb.len(), 200);
    let shared = BodyHash::of(b"shared");
    assert_eq!(store.body_refs(&shared).await.unwrap(), 8 * 5 * 2);
    let hashes: BTreeSet<BodyHash> = committed.iter().map(|c| c.body()).collect();
    assert_eq!(body_files(dir.path()), hashes);
}

#[tokio::test]
async fn concurrent_delete_and_accept_of_same_body_never_lose_it() {
    // A delete freeing a body while an accept of the same content is on its
    // way must not unlink the file under the accept.
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let a = addr("a@x.test");
    let b = addr("b@x.test");
    let body = b"ping-pong body\r\n";
    let h = BodyHash::of(body);
    for _ in 0..100 {
        store.accept(incoming(&store, &["a@x.test"], &[], body).await).await.unwrap();
        let ids: Vec<EntryId> = store.mailbox(&a).await.unwrap().iter().map(|e| e.id).collect();
        let (s1, s2) = (store.clone(), store.clone());
        let a2 = a.clone();
        let del = tokio::spawn(async move { s1.delete(&a2, &ids).await.unwrap() });
        let msg = incoming(&store, &["b@x.test"], &[], body).await;
        let acc = tokio::spawn(async move { s2.accept(msg).await.unwrap() });
        del.await.unwrap();
        acc.await.unwrap();
        assert_eq!(store.body_refs(&h).await.unwrap(), 1);
        assert_eq!(*store.body(&h).await.unwrap(), body.to_vec(), "body lost");
        let idb: Vec<EntryId> = store.mailbox(&b).await.unwrap().iter().map(|e| e.id).collect();
        store.delete(&b, &idb).await.unwrap();
    }
}

/// A cluster replica's applies lag its Raft log after a crash: a body a
/// peer sent it may belong to an accept committed in the log and not yet
/// applied here. Recovery must keep it (it was counted as a durable copy
/// before the `250`).
#[tokio::test]
async fn a_cluster_replica_keeps_bodies_its_log_may_still_reference() {
    let dir = tempfile::tempdir().unwrap();
    let copy = {
        let store = open(dir.path());
        store.apply_state(Vec::new(), Some(b"consensus state".to_vec())).await.unwrap();
        store.put_body(Arc::new(b"a copy sent by the leader\r\n".to_vec())).await.unwrap()
    };
    std::fs::write(dir.path().join("tmp/9.9.cafe"), b"half").unwrap();
    let store = open(dir.path());
    let r = store.recovery_report();
    assert_eq!((r.orphans_kept, r.orphans_removed, r.tmp_removed), (1, 0, 1));
    assert!(store.has_body(&copy).await.unwrap(), "the copy survives the restart");
}

/// Sets a file's modification time `secs` seconds back.
fn age(path: &Path, secs: u64) {
    let f = std::fs::File::options().write(true).open(path).unwrap();
    f.set_modified(std::time::SystemTime::now() - std::time::Duration::from_secs(secs)).unwrap();
}

/// The leftovers a replica keeps at start go later, by a garbage
/// collection: only files nothing references, last written before the
/// cutoff. A copy put again (an accept counts on it anew) is young.
#[tokio::test]
async fn garbage_collection_removes_only_old_unreferenced_bodies() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let referenced = store.accept(incoming(&store, &["a@x.test"], &[], b"referenced\r\n").await).await.unwrap().body();
    let garbage = store.put_body(Arc::new(b"a copy for an accept that never committed\r\n".to_vec())).await.unwrap();
    let young = store.put_body(Arc::new(b"a copy whose accept may still commit\r\n".to_vec())).await.unwrap();
    let again = Arc::new(b"an old copy an accept counts on again\r\n".to_vec());
    let again_hash = store.put_body(again.clone()).await.unwrap();
    let not_ours = dir.path().join("bodies/not-a-hash");
    std::fs::write(&not_ours, b"junk").unwrap();
    for path in
        [store.body_path(&referenced), store.body_path(&garbage), store.body_path(&again_hash), not_ours.clone()]
    {
        age(&path, 2 * 3600);
    }
    store.put_body(again).await.unwrap();

    let cutoff = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
    let report = store.collect_garbage(cutoff).await.unwrap();
    assert_eq!(report, GarbageReport { removed: 1, young: 2 });
    assert!(!store.has_body(&garbage).await.unwrap(), "old and unreferenced: removed");
    for kept in [referenced, young, again_hash] {
        assert!(store.has_body(&kept).await.unwrap(), "{kept} kept");
    }
    assert!(not_ours.exists(), "a file not named like a body is not ours to remove");
    assert_eq!(*store.body(&referenced).await.unwrap(), b"referenced\r\n".to_vec());
}

#[tokio::test]
async fn recovery_removes_leftovers_and_keeps_committed() {
    let dir = tempfile::tempdir().unwrap();
    let kept = {
        let store = open(dir.path());
        store.accept(incoming(&store, &["a@x.test"], &[], b"committed\r\n").await).await.unwrap().body()
    };
    // What a crash can leave: a half-written temp file, and a renamed body
    // whose metadata commit never happened.
    std::fs::write(dir.path().join("tmp/123.4.deadbeef"), b"half a bo").unwrap();
    let orphan = BodyHash::of(b"orphan");
    let orphan_path = dir.path().join("bodies").join(orphan.to_hex());
    std::fs::write(&orphan_path, b"orphan").unwrap();
    std::fs::write(dir.path().join("bodies/not-a-hash"), b"junk").unwrap();

    let store = open(dir.path());
    let r = store.recovery_report();
    assert_eq!(r.tmp_removed, 1);
    assert_eq!(r.orphans_removed, 2);
    assert_eq!(r.missing_bodies, 0);
    assert_eq!(r.refcounts_repaired, 0);
    assert_eq!(std::fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
    assert_eq!(body_files(dir.path()), BTreeSet::from([kept]));
    assert_eq!(*store.body(&kept).await.unwrap(), b"committed\r\n".to_vec());
    assert_eq!(store.mailbox(&addr("a@x.test")).await.unwrap().len(), 1);
}

#[tokio::test]
async fn recovery_reports_a_missing_body() {
    let dir = tempfile::tempdir().unwrap();
    let h = {
        let store = open(dir.path());
        store.accept(incoming(&store, &["a@x.test"], &[], b"will vanish").await).await.unwrap().body()
    };
    std::fs::remove_file(dir.path().join("bodies").join(h.to_hex())).unwrap();
    let store = open(dir.path());
    assert_eq!(store.recovery_report().missing_bodies, 1);
}

#[tokio::test]
async fn damaged_body_is_not_served() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let c = store.accept(incoming(&store, &["a@x.test"], &[], b"pristine").await).await.unwrap();
    std::fs::write(store.body_path(&c.body()), b"pristinf").unwrap();
    assert!(matches!(store.body(&c.body()).await, Err(StoreError::Internal(_))));
}

#[tokio::test]
async fn queue_lists_remote_recipients() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let c = store.accept(incoming(&store, &[], &["x@far.test", "y@far.test"], b"out").await).await.unwrap();
    let q = store.queue().await.unwrap();
    assert_eq!(q.len(), 1);
    assert_eq!(q[0].queue_id, c.queue_id());
    assert_eq!(q[0].recipients.len(), 2);
    assert_eq!(q[0].size, 3);
    assert_eq!(q[0].return_path.as_deref(), Some("sender@example.org"));
    // The same queue id cannot be queued twice.
    let mut again = incoming(&store, &[], &["z@far.test"], b"other").await;
    again.queue_id = c.queue_id();
    assert!(matches!(store.accept(again).await, Err(StoreError::Permanent(_))));
}

#[test]
fn store_is_locked_while_open() {
    let dir = tempfile::tempdir().unwrap();
    let _store = open(dir.path());
    let second = LocalStore::open(dir.path(), StoreOptions::default());
    assert!(matches!(second, Err(StoreError::Unavailable(_))), "{second:?}");
}

/// Outbound queue state: per-recipient results, hold/flush/bounce, the
/// entry and its body go once every recipient is finished, and the state
/// survives a reopen and a snapshot round trip.
#[tokio::test]
async fn queue_state_per_recipient_until_the_entry_is_finished() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let msg = incoming(&store, &[], &["a@r.test", "b@r.test", "c@s.test"], b"Subject: q\r\n\r\nx\r\n").await;
    let qid = msg.queue_id;
    let h = store.accept(msg).await.unwrap().body();
    let items = store.queue_items().await.unwrap();
    assert_eq!(items.len(), 1);
    assert_eq!(items[0].state, QueueState::initial(&items[0].entry));
    assert!(items[0].state.recipients.iter().all(|r| r.status == RecipientStatus::Pending && r.next_attempt == 0));

    let results = vec![
        (0, RcptOutcome::Delivered),
        (1, RcptOutcome::Deferred { next_attempt: 500, error: "451 later".into() }),
        (2, RcptOutcome::Failed { error: "550 no".into(), reported: false }),
    ];
    store.queue_change(qid, QueueOp::Results { at: 100, results }).await.unwrap();
    // A late or repeated result never undoes a delivery.
    let again = vec![(0, RcptOutcome::Deferred { next_attempt: 900, error: "dup".into() })];
    store.queue_change(qid, QueueOp::Results { at: 101, results: again }).await.unwrap();
    store.queue_change(qid, QueueOp::Hold).await.unwrap();
    drop(store);

    let store = open(dir.path());
    let s = &store.queue_items().await.unwrap()[0].state;
    assert!(s.hold);
    assert_eq!(s.recipients[0].status, RecipientStatus::Delivered);
    assert_eq!(
        (s.recipients[1].status.clone(), s.recipients[1].attempts, s.recipients[1].next_attempt),
        (RecipientStatus::Pending, 1, 500)
    );
    assert_eq!(s.recipients[1].last_error.as_deref(), Some("451 later"));
    assert_eq!(s.recipients[2].status, RecipientStatus::Failed { reported: false });

    store.queue_change(qid, QueueOp::Release).await.unwrap();
    store.queue_change(qid, QueueOp::Flush).await.unwrap();
    let s = store.queue_items().await.unwrap()[0].state.clone();
    assert!(!s.hold);
    assert_eq!(s.recipients[1].next_attempt, 0);

    // The snapshot carries the state.
    let snap = store.export_state().await.unwrap();
    assert_eq!(snap.queue_state, vec![(qid, s.clone())]);
    let other_dir = tempfile::tempdir().unwrap();
    let other = open(other_dir.path());
    other.import_state(snap, Vec::new()).await.unwrap();
    assert_eq!(other.queue_items().await.unwrap()[0].state, s);

    // Bounce the rest, report both failures: the entry and its body go.
    store.queue_change(qid, QueueOp::Bounce { reason: "bounced by the administrator".into() }).await.unwrap();
    let s = store.queue_items().await.unwrap()[0].state.clone();
    assert_eq!(s.recipients[1].status, RecipientStatus::Failed { reported: false });
    let reported = vec![(1, RcptOutcome::Reported), (2, RcptOutcome::Reported)];
    store.queue_change(qid, QueueOp::Results { at: 200, results: reported }).await.unwrap();
    assert!(store.queue_items().await.unwrap().is_empty());
    assert_eq!(store.body_refs(&h).await.unwrap(), 0);
    // Changes to an entry that is gone are ignored.
    store.queue_change(qid, QueueOp::Flush).await.unwrap();
}

#[tokio::test]
async fn queue_delete_removes_entry_state_and_body() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let msg = incoming(&store, &[], &["a@r.test"], b"Subject: d\r\n\r\nx\r\n").await;
    let qid = msg.queue_id;
    let h = store.accept(msg).await.unwrap().body();
    store.queue_change(qid, QueueOp::Hold).await.unwrap();
    store.queue_change(qid, QueueOp::Delete).await.unwrap();
    assert!(store.queue_items().await.unwrap().is_empty());
    assert!(store.export_state().await.unwrap().queue_state.is_empty());
    assert_eq!(store.body_refs(&h).await.unwrap(), 0);
    assert!(body_files(dir.path()).is_empty());
}

/// Files left in the store's `tmp/`.
fn tmp_files(dir: &Path) -> usize {
    std::fs::read_dir(dir.join("tmp")).unwrap().count()
}

#[tokio::test]
async fn a_spooled_body_is_renamed_into_bodies_and_shared_when_already_there() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let body: Vec<u8> = (0..200_000u32).flat_map(|i| format!("line {i}\r\n").into_bytes()).collect();
    let spooled = |store: &LocalStore| {
        let mut spool = store.spool(1024);
        for piece in body.chunks(4096) {
            spool.append(piece).unwrap();
        }
        assert!(spool.spilled());
        spool.finish().unwrap()
    };
    let staged = spooled(&store);
    assert!(matches!(staged, Body::Staged(_)));
    assert_eq!(tmp_files(dir.path()), 1);
    let mut msg = incoming(&store, &["a@x.test"], &[], b"").await;
    msg.body = staged;
    let c = store.accept(msg).await.unwrap();
    assert_eq!(c.body(), BodyHash::of(&body));
    assert_eq!(c.size(), body.len() as u64);
    assert_eq!(tmp_files(dir.path()), 0, "renamed, not copied");
    assert_eq!(body_files(dir.path()), BTreeSet::from([c.body()]));
    assert_eq!(*store.body(&c.body()).await.unwrap(), body);

    // The same content again: the existing file is shared, the spooled
    // one removed.
    let mut msg = incoming(&store, &["b@x.test"], &[], b"").await;
    msg.body = spooled(&store);
    let again = store.accept(msg).await.unwrap();
    assert_eq!(again.body(), c.body());
    assert_eq!(tmp_files(dir.path()), 0);
    assert_eq!(store.body_refs(&c.body()).await.unwrap(), 2);

    // Refused (no recipient): the spooled file goes with the message.
    let mut msg = incoming(&store, &[], &[], b"").await;
    msg.body = spooled(&store);
    assert!(store.accept(msg).await.is_err());
    assert_eq!(tmp_files(dir.path()), 0);
}
