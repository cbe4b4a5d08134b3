//! The store as a cluster's state machine: replicated accepts (idempotent,
//! body possibly absent), deletes, dequeues, snapshots, commit proofs, and
//! body verification.

use std::sync::Arc;

use hamail_store::*;

fn addr(s: &str) -> Address {
    Address::parse(s).unwrap()
}

async fn store_with_users(dir: &std::path::Path) -> Arc<LocalStore> {
    let s = LocalStore::open(dir, StoreOptions { node_prefix: 3, ..StoreOptions::default() }).unwrap();
    s.add_domain(&Domain::parse("a.test").unwrap()).await.unwrap();
    s.add_user(&addr("u@a.test"), "pw").await.unwrap();
    s.add_user(&addr("v@a.test"), "pw").await.unwrap();
    s
}

fn accept(qid: u64, body: &[u8]) -> StateChange {
    StateChange::Mail(MailChange::Accept {
        queue_id: QueueId(qid),
        return_path: Some("x@b.test".into()),
        local: vec![addr("u@a.test"), addr("v@a.test")],
        remote: vec!["far@c.test".into()],
        body: BodyHash::of(body),
        size: body.len() as u64,
        at: 1_700_000_000,
        resend: None,
    })
}

#[tokio::test]
async fn replicated_accept_is_idempotent_and_tolerates_a_missing_body() {
    let dir = tempfile::tempdir().unwrap();
    let s = store_with_users(dir.path()).await;
    let body = b"Subject: r\r\n\r\nreplicated\r\n".to_vec();
    let hash = BodyHash::of(&body);
    // The metadata arrives before the body (the body is fetched later).
    let r = s.apply_state(vec![accept(7, &body), accept(7, &body)], Some(b"s1".to_vec())).await.unwrap();
    assert!(r.iter().all(|x| x.is_ok()));
    assert_eq!(s.mailbox(&addr("u@a.test")).await.unwrap().len(), 1, "applied twice, delivered once");
    assert_eq!(s.body_refs(&hash).await.unwrap(), 3, "two maildrops and the queue");
    assert_eq!(s.missing_bodies().await.unwrap(), vec![hash]);
    let proof = s.committed(QueueId(7)).await.unwrap().expect("committed");
    assert_eq!((proof.queue_id(), proof.body(), proof.size()), (QueueId(7), hash, body.len() as u64));
    assert!(s.committed(QueueId(8)).await.unwrap().is_none());
    assert_eq!(s.put_body(Arc::new(body.clone())).await.unwrap(), hash);
    assert!(s.missing_bodies().await.unwrap().is_empty());
    assert_eq!(s.body(&hash).await.unwrap().as_slice(), body.as_slice());
}

#[tokio::test]
async fn delete_and_dequeue_free_the_body_and_snapshots_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let s = store_with_users(dir.path()).await;
    let body = b"Subject: d\r\n\r\nto delete\r\n".to_vec();
    let hash = s.put_body(Arc::new(body.clone())).await.unwrap();
    s.apply_state(vec![accept(9, &body)], None).await.unwrap();
    let snap = s.export_state().await.unwrap();
    let u = s.mailbox(&addr("u@a.test")).await.unwrap();
    let v = s.mailbox(&addr("v@a.test")).await.unwrap();

    // Another node imports the snapshot: same entries, same ids.
    let dir2 = tempfile::tempdir().unwrap();
    let t = LocalStore::open(dir2.path(), StoreOptions::default()).unwrap();
    t.import_state(snap.clone(), b"c".to_vec()).await.unwrap();
    assert_eq!(t.export_state().await.unwrap(), snap);
    assert_eq!(t.mailbox(&addr("u@a.test")).await.unwrap(), u);
    assert_eq!(t.missing_bodies().await.unwrap(), vec![hash], "the body is still to be fetched there");
    assert!(t.verify_password(&addr("u@a.test"), "pw").await.unwrap());

    let r = s
        .apply_state(
            vec![
                StateChange::Mail(MailChange::Delete { user: addr("u@a.test"), ids: vec![u[0].id] }),
                StateChange::Mail(MailChange::Delete { user: addr("v@a.test"), ids: vec![v[0].id] }),
            ],
            None,
        )
        .await
        .unwrap();
    assert!(r.iter().all(|x| x.is_ok()));
    assert!(s.has_body(&hash).await.unwrap(), "the queue still holds it");
    s.apply_state(vec![StateChange::Mail(MailChange::Dequeue { queue_id: QueueId(9) })], None).await.unwrap();
    assert!(!s.has_body(&hash).await.unwrap(), "last reference gone: body freed");
    assert!(s.queue().await.unwrap().is_empty());
}

#[tokio::test]
async fn verify_finds_damaged_and_missing_bodies() {
    let dir = tempfile::tempdir().unwrap();
    let s = store_with_users(dir.path()).await;
    let (a, b) = (b"Subject: a\r\n\r\na\r\n".to_vec(), b"Subject: b\r\n\r\nb\r\n".to_vec());
    let ha = s.put_body(Arc::new(a.clone())).await.unwrap();
    let hb = s.put_body(Arc::new(b.clone())).await.unwrap();
    s.apply_state(vec![accept(1, &a), accept(2, &b)], None).await.unwrap();
    std::fs::write(dir.path().join("bodies").join(ha.to_hex()), b"bit rot").unwrap();
    std::fs::remove_file(dir.path().join("bodies").join(hb.to_hex())).unwrap();
    let report = s.verify().await.unwrap();
    assert_eq!(report.checked, 1);
    assert_eq!(report.damaged, vec![ha]);
    let mut missing = report.missing.clone();
    missing.sort();
    let mut want = vec![ha, hb];
    want.sort();
    assert_eq!(missing, want);
    assert!(s.body(&ha).await.is_err(), "a damaged body is never served");
}

#[tokio::test]
async fn queue_ids_carry_the_node_prefix() {
    let dir = tempfile::tempdir().unwrap();
    let s = store_with_users(dir.path()).await;
    let q = s.next_queue_id().await.unwrap();
    assert_eq!(q.0 >> 48, 3);
}

#[tokio::test]
async fn put_body_replaces_a_damaged_file_of_the_same_length() {
    let dir = tempfile::tempdir().unwrap();
    let s = store_with_users(dir.path()).await;
    let body = b"Subject: same length\r\n\r\nabc\r\n".to_vec();
    let hash = s.put_body(Arc::new(body.clone())).await.unwrap();
    let path = dir.path().join("bodies").join(hash.to_hex());
    let mut rot = body.clone();
    rot[0] ^= 0x20;
    std::fs::write(&path, &rot).unwrap();
    s.put_body(Arc::new(body.clone())).await.unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), body);
}

#[tokio::test]
async fn cluster_log_keeps_the_last_records_in_order_and_imports() {
    let dir = tempfile::tempdir().unwrap();
    let s = LocalStore::open(dir.path(), StoreOptions::default()).unwrap();
    assert!(s.cluster_log(10).await.unwrap().is_empty());
    let changes: Vec<StateChange> =
        (1..=7u64).map(|i| StateChange::ClusterLog { seq: i, record: vec![i as u8], keep: 5 }).collect();
    let r = s.apply_state(changes, Some(b"c".to_vec())).await.unwrap();
    assert!(r.iter().all(|r| r.is_ok()));
    let log = s.cluster_log(100).await.unwrap();
    assert_eq!(log.iter().map(|(k, _)| *k).collect::<Vec<_>>(), vec![3, 4, 5, 6, 7]);
    assert_eq!(log[0].1, vec![3u8]);
    let last2 = s.cluster_log(2).await.unwrap();
    assert_eq!(last2, vec![(6, vec![6u8]), (7, vec![7u8])]);
    s.import_cluster_log(vec![(40, vec![1]), (41, vec![2])]).await.unwrap();
    assert_eq!(s.cluster_log(10).await.unwrap(), vec![(40, vec![1u8]), (41, vec![2u8])]);
}

/// An accept at `at`, to one user, with its own body.
fn accept_at(qid: u64, at: u64) -> StateChange {
    let body = format!("Subject: {qid}\r\n\r\naged\r\n");
    StateChange::Mail(MailChange::Accept {
        queue_id: QueueId(qid),
        return_path: None,
        local: vec![addr("u@a.test")],
        remote: vec![],
        body: BodyHash::of(body.as_bytes()),
        size: body.len() as u64,
        at,
        resend: None,
    })
}

const T0: u64 = 1_700_000_000;

/// The queue ids whose commit record is still kept.
async fn recorded(s: &LocalStore) -> Vec<u64> {
    let mut q: Vec<u64> = s.export_state().await.unwrap().messages.iter().map(|(q, _, _)| q.0).collect();
    q.sort();
    q
}

#[tokio::test]
async fn message_records_are_pruned_by_the_accepts_own_time() {
    // T0 is long before this machine's clock: a store pruning by its own
    // clock would forget every record at once.
    let dir = tempfile::tempdir().unwrap();
    let s = store_with_users(dir.path()).await;
    s.apply_state(vec![accept_at(1, T0), accept_at(2, T0 + 10)], None).await.unwrap();
    s.apply_state(vec![accept_at(3, T0 + MESSAGE_RETENTION_SECS)], None).await.unwrap();
    assert_eq!(recorded(&s).await, vec![1, 2, 3], "at the end of the retention: still kept");
    // A re-proposal within the retention is still recognised.
    s.apply_state(vec![accept_at(1, T0)], None).await.unwrap();
    assert_eq!(s.mailbox(&addr("u@a.test")).await.unwrap().len(), 3);

    s.apply_state(vec![accept_at(4, T0 + MESSAGE_RETENTION_SECS + 1)], None).await.unwrap();
    assert_eq!(recorded(&s).await, vec![2, 3, 4]);
    assert!(s.committed(QueueId(1)).await.unwrap().is_none(), "pruned");
    assert!(s.committed(QueueId(2)).await.unwrap().is_some());
    let snap = s.export_state().await.unwrap();
    assert_eq!(
        snap.message_ages,
        vec![
            (QueueId(2), T0 + 10),
            (QueueId(3), T0 + MESSAGE_RETENTION_SECS),
            (QueueId(4), T0 + MESSAGE_RETENTION_SECS + 1)
        ],
        "one age per record, oldest first"
    );
    // The maildrops are not the records: nothing delivered is touched.
    assert_eq!(s.mailbox(&addr("u@a.test")).await.unwrap().len(), 4);
}

#[tokio::test]
async fn pruning_goes_a_few_records_per_accept() {
    let dir = tempfile::tempdir().unwrap();
    let s = store_with_users(dir.path()).await;
    s.apply_state((1..=300).map(|q| accept_at(q, T0)).collect(), None).await.unwrap();
    let late = T0 + MESSAGE_RETENTION_SECS + 1;
    s.apply_state(vec![accept_at(1000, late)], None).await.unwrap();
    let left = recorded(&s).await.len();
    assert!(left > 1 && left < 301, "one accept prunes some, not all 300: {left} left");
    // Each accept prunes more than it adds: the old ones go.
    let mut q = 1001;
    while recorded(&s).await.iter().any(|q| *q <= 300) {
        assert!(q < 1100, "pruning does not converge");
        s.apply_state(vec![accept_at(q, late)], None).await.unwrap();
        q += 1;
    }
    assert!(recorded(&s).await.iter().all(|q| *q >= 1000));
}

#[tokio::test]
async fn snapshots_carry_the_ages_of_message_records() {
    let dir = tempfile::tempdir().unwrap();
    let s = store_with_users(dir.path()).await;
    s.apply_state(vec![accept_at(1, T0), accept_at(2, T0 + 100)], None).await.unwrap();
    let snap = s.export_state().await.unwrap();
    assert_eq!(snap.message_ages, vec![(QueueId(1), T0), (QueueId(2), T0 + 100)]);

    let dir2 = tempfile::tempdir().unwrap();
    let t = LocalStore::open(dir2.path(), StoreOptions::default()).unwrap();
    t.import_state(snap.clone(), b"c".to_vec()).await.unwrap();
    assert_eq!(t.export_state().await.unwrap(), snap);
    // The node that installed it prunes at the same entry as the others.
    for store in [&s, &t] {
        store.apply_state(vec![accept_at(3, T0 + MESSAGE_RETENTION_SECS + 1)], None).await.unwrap();
        assert_eq!(recorded(store).await, vec![2, 3]);
    }

    // A snapshot without ages (made before they existed): its records are
    // kept a full retention from the import, not dropped at once.
    let mut old = snap.clone();
    old.message_ages.clear();
    let dir3 = tempfile::tempdir().unwrap();
    let u = LocalStore::open(dir3.path(), StoreOptions::default()).unwrap();
    u.import_state(old, b"c".to_vec()).await.unwrap();
    u.apply_state(vec![accept_at(3, T0 + MESSAGE_RETENTION_SECS + 1)], None).await.unwrap();
    assert_eq!(recorded(&u).await, vec![1, 2, 3]);
}
