//! Resend recognition (RFC 1047): an accept whose fingerprint was applied
//! within its window delivers nothing and is proven as a resend of the
//! first; outside the window, or with another fingerprint, or without one,
//! it is a new message. Through the state-machine path (replicated
//! accepts, snapshots) and the single-node committer path.

use std::sync::Arc;

use hamail_store::*;

const T0: u64 = 1_700_000_000;
const HOUR: u64 = 3600;

fn addr(s: &str) -> Address {
    Address::parse(s).unwrap()
}

async fn store_with_user(dir: &std::path::Path) -> Arc<LocalStore> {
    let s = LocalStore::open(dir, StoreOptions::default()).unwrap();
    s.add_domain(&Domain::parse("a.test").unwrap()).await.unwrap();
    s.add_user(&addr("u@a.test"), "pw").await.unwrap();
    s
}

fn key(message_id: &str, data: &[u8], window_secs: u64) -> ResendKey {
    ResendKey {
        fingerprint: Fingerprint::of(message_id, Some("x@b.test"), &["u@a.test".to_string()], data),
        window_secs,
    }
}

/// An accept as a cluster's state machine applies it; `body` differs per
/// attempt (the server's `Received:` line), the key does not.
fn accept(qid: u64, at: u64, resend: Option<ResendKey>) -> StateChange {
    let body = format!("Received: id {qid}\r\nSubject: r\r\n\r\nresent\r\n");
    StateChange::Mail(MailChange::Accept {
        queue_id: QueueId(qid),
        return_path: Some("x@b.test".into()),
        local: vec![addr("u@a.test")],
        remote: vec![],
        body: BodyHash::of(body.as_bytes()),
        size: body.len() as u64,
        at,
        resend,
    })
}

async fn delivered(s: &LocalStore) -> Vec<QueueId> {
    s.mailbox(&addr("u@a.test")).await.unwrap().iter().map(|e| e.queue_id).collect()
}

#[test]
fn the_fingerprint_covers_message_id_envelope_and_data() {
    let rcpts = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let base = Fingerprint::of("<m@x>", Some("a@x"), &rcpts(&["b@x", "c@x"]), b"data");
    assert_eq!(
        base,
        Fingerprint::of(" <m@x> ", Some("a@x"), &rcpts(&["C@x", "b@x", "b@x"]), b"data"),
        "a set of recipients"
    );
    assert_ne!(base, Fingerprint::of("<n@x>", Some("a@x"), &rcpts(&["b@x", "c@x"]), b"data"));
    assert_ne!(base, Fingerprint::of("<m@x>", None, &rcpts(&["b@x", "c@x"]), b"data"));
    assert_ne!(base, Fingerprint::of("<m@x>", Some("a@x"), &rcpts(&["b@x"]), b"data"));
    assert_ne!(base, Fingerprint::of("<m@x>", Some("a@x"), &rcpts(&["b@x", "c@x"]), b"datA"));
    // Length prefixes: moving bytes between fields is another transaction.
    assert_ne!(
        Fingerprint::of("<m@x>", Some("ab@x"), &rcpts(&["c@x"]), b"d"),
        Fingerprint::of("<m@x>", Some("a"), &rcpts(&["b@xc@x"]), b"d")
    );
}

#[tokio::test]
async fn a_resend_within_the_window_is_proven_but_delivered_once() {
    let dir = tempfile::tempdir().unwrap();
    let s = store_with_user(dir.path()).await;
    let k = key("<1@b.test>", b"resent", HOUR);
    let r = s.apply_state(vec![accept(1, T0, Some(k)), accept(2, T0 + 60, Some(k))], None).await.unwrap();
    assert!(r.iter().all(|x| x.is_ok()), "{r:?}");
    assert_eq!(delivered(&s).await, vec![QueueId(1)]);
    let first = s.committed(QueueId(1)).await.unwrap().expect("first committed");
    assert_eq!(first.resend_of(), None);
    let again = s.committed(QueueId(2)).await.unwrap().expect("the resend is proven, so SMTP can say 250");
    assert_eq!(again.resend_of(), Some(QueueId(1)));
    assert_eq!(again.body(), first.body(), "the proof names the delivered body");
    // The resend's log entry applied twice is still nothing.
    s.apply_state(vec![accept(2, T0 + 60, Some(k))], None).await.unwrap();
    assert_eq!(delivered(&s).await, vec![QueueId(1)]);
}

#[tokio::test]
async fn other_data_other_envelope_or_no_message_id_are_new_messages() {
    let dir = tempfile::tempdir().unwrap();
    let s = store_with_user(dir.path()).await;
    let k = key("<1@b.test>", b"resent", HOUR);
    let other_data = key("<1@b.test>", b"other", HOUR);
    let other_envelope = ResendKey {
        fingerprint: Fingerprint::of("<1@b.test>", Some("y@b.test"), &["u@a.test".to_string()], b"resent"),
        window_secs: HOUR,
    };
    let changes = vec![
        accept(1, T0, Some(k)),
        accept(2, T0 + 1, Some(other_data)),
        accept(3, T0 + 2, Some(other_envelope)),
        accept(4, T0 + 3, None),
        accept(5, T0 + 4, None),
        // A window of 0 turns recognition off for this accept.
        accept(6, T0 + 5, Some(ResendKey { window_secs: 0, ..k })),
    ];
    s.apply_state(changes, None).await.unwrap();
    assert_eq!(delivered(&s).await, (1..=6).map(QueueId).collect::<Vec<_>>());
    for q in 1..=6 {
        assert_eq!(s.committed(QueueId(q)).await.unwrap().unwrap().resend_of(), None);
    }
}

#[tokio::test]
async fn after_the_window_it_is_a_new_message_and_old_fingerprints_are_pruned() {
    let dir = tempfile::tempdir().unwrap();
    let s = store_with_user(dir.path()).await;
    let k = key("<1@b.test>", b"resent", HOUR);
    let other = key("<2@b.test>", b"x", HOUR);
    s.apply_state(vec![accept(1, T0, Some(k)), accept(2, T0 + 10, Some(other))], None).await.unwrap();
    s.apply_state(vec![accept(3, T0 + HOUR, Some(k))], None).await.unwrap();
    assert_eq!(delivered(&s).await, vec![QueueId(1), QueueId(2)], "exactly at the window's end: still a resend");
    s.apply_state(vec![accept(4, T0 + HOUR + 1, Some(k))], None).await.unwrap();
    assert_eq!(delivered(&s).await, vec![QueueId(1), QueueId(2), QueueId(4)]);
    assert_eq!(s.committed(QueueId(4)).await.unwrap().unwrap().resend_of(), None);
    // Pruned as of the last accept's time: 1's fingerprint and the resend
    // record of 3 are gone; 2's is still within its window; 4's is new.
    let snap = s.export_state().await.unwrap();
    let mut kept: Vec<(QueueId, u64)> = snap.resend_fingerprints.iter().map(|(_, q, at)| (*q, *at)).collect();
    kept.sort();
    assert_eq!(kept, vec![(QueueId(2), T0 + 10), (QueueId(4), T0 + HOUR + 1)]);
    assert_eq!(snap.resends, vec![(QueueId(3), QueueId(1), T0 + HOUR)], "3 is at the horizon, still kept");
    s.apply_state(vec![accept(5, T0 + 3 * HOUR, None), accept(6, T0 + 3 * HOUR, Some(other))], None).await.unwrap();
    let snap = s.export_state().await.unwrap();
    assert_eq!(snap.resend_fingerprints.len(), 1, "only 6's: {:?}", snap.resend_fingerprints);
    assert!(snap.resends.is_empty());
}

#[tokio::test]
async fn snapshots_carry_the_fingerprints() {
    let dir = tempfile::tempdir().unwrap();
    let s = store_with_user(dir.path()).await;
    let k = key("<1@b.test>", b"resent", HOUR);
    s.apply_state(vec![accept(1, T0, Some(k)), accept(2, T0 + 5, Some(k))], None).await.unwrap();
    let snap = s.export_state().await.unwrap();
    assert_eq!(snap.resend_fingerprints.len(), 1);

    let dir2 = tempfile::tempdir().unwrap();
    let t = LocalStore::open(dir2.path(), StoreOptions::default()).unwrap();
    t.import_state(snap.clone(), b"c".to_vec()).await.unwrap();
    assert_eq!(t.export_state().await.unwrap(), snap);
    assert_eq!(t.committed(QueueId(2)).await.unwrap().unwrap().resend_of(), Some(QueueId(1)));
    // The node that installed the snapshot recognises the next resend too.
    t.apply_state(vec![accept(3, T0 + 10, Some(k))], None).await.unwrap();
    assert_eq!(delivered(&t).await, vec![QueueId(1)]);
    assert_eq!(t.committed(QueueId(3)).await.unwrap().unwrap().resend_of(), Some(QueueId(1)));
}

#[tokio::test]
async fn the_single_node_committer_recognises_resends() {
    let dir = tempfile::tempdir().unwrap();
    let s = store_with_user(dir.path()).await;
    let k = key("<1@b.test>", b"resent", HOUR);
    let mut proofs = Vec::new();
    for (i, resend) in [Some(k), Some(k), None].into_iter().enumerate() {
        let msg = Incoming {
            return_path: Some("x@b.test".into()),
            local: vec![addr("u@a.test")],
            remote: vec![],
            body: format!("Received: attempt {i}\r\n\r\nresent\r\n").into_bytes().into(),
            queue_id: s.next_queue_id().await.unwrap(),
            resend,
        };
        proofs.push(s.accept(msg).await.unwrap());
    }
    assert_eq!(proofs[0].resend_of(), None);
    assert_eq!(proofs[1].resend_of(), Some(proofs[0].queue_id()));
    assert_eq!(proofs[2].resend_of(), None);
    assert_eq!(delivered(&s).await, vec![proofs[0].queue_id(), proofs[2].queue_id()]);
    // The resend's proof names the delivered body; its own copy is freed.
    assert_eq!(proofs[1].body(), proofs[0].body());
    let resent_copy = BodyHash::of(b"Received: attempt 1\r\n\r\nresent\r\n");
    assert!(!s.has_body(&resent_copy).await.unwrap(), "the resend's own body file is removed");
    assert!(s.has_body(&proofs[0].body()).await.unwrap());
}

/// In a cluster every data node holds a copy of the resend's body before
/// the accept is applied; the apply that recognises the resend frees it.
#[tokio::test]
async fn the_copy_of_a_recognised_resend_is_freed_where_it_is_applied() {
    let dir = tempfile::tempdir().unwrap();
    let s = store_with_user(dir.path()).await;
    let k = key("<1@b.test>", b"resent", HOUR);
    let mut copies = Vec::new();
    for qid in [1, 2] {
        let body = format!("Received: id {qid}\r\nSubject: r\r\n\r\nresent\r\n");
        copies.push(s.put_body(Arc::new(body.into_bytes())).await.unwrap());
    }
    let r = s.apply_state(vec![accept(1, T0, Some(k)), accept(2, T0 + 60, Some(k))], None).await.unwrap();
    assert!(r.iter().all(|x| x.is_ok()), "{r:?}");
    assert!(s.has_body(&copies[0]).await.unwrap(), "the delivered body stays");
    assert!(!s.has_body(&copies[1]).await.unwrap(), "the resend's copy is freed");
}
