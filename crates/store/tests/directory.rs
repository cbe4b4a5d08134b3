//! Behaviour of the `Directory` side of `LocalStore`: domains, users,
//! passwords, aliases and recipient resolution.

use std::sync::Arc;

use hamail_store::*;

fn addr(s: &str) -> Address {
    Address::parse(s).unwrap()
}
fn dom(s: &str) -> Domain {
    Domain::parse(s).unwrap()
}

fn open(dir: &std::path::Path) -> Arc<LocalStore> {
    let options = StoreOptions { hostnames: vec![dom("mx1.example.net")], ..StoreOptions::default() };
    LocalStore::open(dir, options).unwrap()
}

fn local(v: &[&str]) -> Resolution {
    Resolution::Local(v.iter().map(|s| addr(s)).collect())
}

#[tokio::test]
async fn domains_add_list_remove() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    s.add_domain(&dom("b.test")).await.unwrap();
    s.add_domain(&dom("A.test.")).await.unwrap();
    assert!(matches!(s.add_domain(&dom("a.test")).await, Err(StoreError::Permanent(_))));
    assert_eq!(s.domains().await.unwrap(), vec![dom("a.test"), dom("b.test")]);

    s.add_alias(&addr("postmaster@a.test"), &[addr("someone@far.test")]).await.unwrap();
    let err = s.remove_domain(&dom("a.test")).await.unwrap_err();
    assert!(matches!(err, StoreError::Permanent(ref m) if m.contains("alias")), "{err}");
    s.remove_alias(&addr("postmaster@a.test")).await.unwrap();
    s.remove_domain(&dom("a.test")).await.unwrap();
    assert!(matches!(s.remove_domain(&dom("a.test")).await, Err(StoreError::Permanent(_))));
    assert_eq!(s.domains().await.unwrap(), vec![dom("b.test")]);
}

#[tokio::test]
async fn users_passwords_and_maildrop_removal() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    let u = addr("Alice@X.test");
    assert!(matches!(s.add_user(&u, "pw").await, Err(StoreError::Permanent(_))), "domain not configured");
    s.add_domain(&dom("x.test")).await.unwrap();
    s.add_user(&u, "correct horse").await.unwrap();
    assert!(matches!(s.add_user(&u, "again").await, Err(StoreError::Permanent(_))), "exists");
    assert!(matches!(s.add_user(&addr("e@x.test"), "").await, Err(StoreError::Permanent(_))), "empty password");

    assert!(s.verify_password(&addr("alice@x.test"), "correct horse").await.unwrap());
    assert!(!s.verify_password(&u, "wrong").await.unwrap());
    assert!(!s.verify_password(&addr("nobody@x.test"), "correct horse").await.unwrap());

    s.set_password(&u, "battery staple").await.unwrap();
    assert!(!s.verify_password(&u, "correct horse").await.unwrap());
    assert!(s.verify_password(&u, "battery staple").await.unwrap());
    assert!(matches!(s.set_password(&addr("nobody@x.test"), "p").await, Err(StoreError::Permanent(_))));

    // Mail for the user, shared with someone else.
    let body = Arc::new(b"hello alice\r\n".to_vec());
    let msg = Incoming {
        return_path: None,
        local: vec![u.clone(), addr("other@x.test")],
        remote: vec![],
        body: body.clone().into(),
        queue_id: s.next_queue_id().await.unwrap(),
        resend: None,
    };
    let c = s.accept(msg).await.unwrap();
    let info = s.users().await.unwrap();
    assert_eq!(info.len(), 1);
    assert_eq!(info[0].address, u);
    assert_eq!(info[0].messages, 1);
    assert_eq!(info[0].bytes, ("Return-Path: <>\r\n".len() + body.len()) as u64);
    assert!(info[0].created_at > 0);

    let err = s.remove_domain(&dom("x.test")).await.unwrap_err();
    assert!(matches!(err, StoreError::Permanent(ref m) if m.contains("user")), "{err}");

    s.remove_user(&u).await.unwrap();
    assert!(s.mailbox(&u).await.unwrap().is_empty());
    assert_eq!(s.body_refs(&c.body()).await.unwrap(), 1, "the other recipient keeps it");
    assert!(!s.verify_password(&u, "battery staple").await.unwrap());
    assert!(matches!(s.remove_user(&u).await, Err(StoreError::Permanent(_))));
    // Re-creating the name does not bring old mail back.
    s.add_user(&u, "new").await.unwrap();
    assert!(s.mailbox(&u).await.unwrap().is_empty());
    s.remove_user(&u).await.unwrap();
    s.remove_domain(&dom("x.test")).await.unwrap();
}

#[tokio::test]
async fn resolution_rules() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    for d in ["b.test", "a.test"] {
        s.add_domain(&dom(d)).await.unwrap();
    }
    for u in ["joe@a.test", "joe@b.test", "ann@b.test"] {
        s.add_user(&addr(u), "pw").await.unwrap();
    }
    // Users, unknown, remote.
    assert_eq!(s.resolve(&addr("JOE@a.test")).await.unwrap(), local(&["joe@a.test"]));
    assert_eq!(s.resolve(&addr("nobody@a.test")).await.unwrap(), Resolution::UnknownUser);
    assert_eq!(s.resolve(&addr("joe@far.test")).await.unwrap(), Resolution::Remote);
    // Hostname rule: domains in name order, first match wins.
    assert_eq!(s.resolve(&addr("joe@mx1.example.net")).await.unwrap(), local(&["joe@a.test"]));
    assert_eq!(s.resolve(&addr("ann@mx1.example.net")).await.unwrap(), local(&["ann@b.test"]));
    assert_eq!(s.resolve(&addr("zed@mx1.example.net")).await.unwrap(), Resolution::UnknownUser);

    // Alias to users, nested aliases, deduplicated.
    s.add_alias(&addr("team@a.test"), &[addr("joe@a.test"), addr("staff@b.test")]).await.unwrap();
    s.add_alias(&addr("staff@b.test"), &[addr("ann@b.test"), addr("joe@a.test")]).await.unwrap();
    assert_eq!(s.resolve(&addr("team@a.test")).await.unwrap(), local(&["joe@a.test", "ann@b.test"]));
    assert!(matches!(s.add_alias(&addr("joe@a.test"), &[addr("ann@b.test")]).await, Err(StoreError::Permanent(_))));
    assert!(matches!(s.add_user(&addr("team@a.test"), "pw").await, Err(StoreError::Permanent(_))));
    assert!(matches!(s.add_alias(&addr("x@nowhere.test"), &[addr("ann@b.test")]).await, Err(StoreError::Permanent(_))));
    assert!(matches!(s.add_alias(&addr("team@a.test"), &[addr("ann@b.test")]).await, Err(StoreError::Permanent(_))));

    // Remote targets make a mixed resolution.
    s.add_alias(&addr("fwd@a.test"), &[addr("ann@b.test"), addr("ann@gmail.test")]).await.unwrap();
    assert_eq!(
        s.resolve(&addr("fwd@a.test")).await.unwrap(),
        Resolution::Mixed { local: vec![addr("ann@b.test")], remote: vec![addr("ann@gmail.test")] }
    );

    // Loops: a loop that also reaches a user delivers to the user; a pure
    // loop is refused.
    s.add_alias(&addr("l1@a.test"), &[addr("l2@a.test"), addr("joe@b.test")]).await.unwrap();
    s.add_alias(&addr("l2@a.test"), &[addr("l1@a.test")]).await.unwrap();
    assert_eq!(s.resolve(&addr("l1@a.test")).await.unwrap(), local(&["joe@b.test"]));
    s.add_alias(&addr("p1@a.test"), &[addr("p2@a.test")]).await.unwrap();
    s.add_alias(&addr("p2@a.test"), &[addr("p1@a.test")]).await.unwrap();
    assert!(matches!(s.resolve(&addr("p1@a.test")).await, Err(StoreError::Permanent(_))));

    // Depth limit: a chain of 8 aliases resolves, 9 does not.
    for i in 0..9 {
        let target = if i == 8 { addr("ann@b.test") } else { addr(&format!("c{}@a.test", i + 1)) };
        s.add_alias(&addr(&format!("c{i}@a.test")), &[target]).await.unwrap();
    }
    assert_eq!(s.resolve(&addr("c1@a.test")).await.unwrap(), local(&["ann@b.test"]));
    assert!(matches!(s.resolve(&addr("c0@a.test")).await, Err(StoreError::Permanent(_))));

    // An alias whose only target does not exist is an unknown user.
    s.add_alias(&addr("dead@a.test"), &[addr("ghost@a.test")]).await.unwrap();
    assert_eq!(s.resolve(&addr("dead@a.test")).await.unwrap(), Resolution::UnknownUser);

    let aliases = s.aliases().await.unwrap();
    assert!(aliases.iter().any(|(a, t)| a == &addr("team@a.test") && t.len() == 2));
}

#[tokio::test]
async fn postmaster_needs_an_alias_and_no_catch_all() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    s.add_domain(&dom("a.test")).await.unwrap();
    s.add_domain(&dom("b.test")).await.unwrap();
    s.add_user(&addr("admin@b.test"), "pw").await.unwrap();
    assert_eq!(s.resolve(&addr("postmaster@a.test")).await.unwrap(), Resolution::UnknownUser);
    s.add_alias(&addr("postmaster@b.test"), &[addr("admin@b.test")]).await.unwrap();
    // b.test's postmaster; the host name's follows the host name rule.
    for d in ["b.test", "mx1.example.net"] {
        assert_eq!(
            s.resolve(&addr(&format!("postmaster@{d}"))).await.unwrap(),
            local(&["admin@b.test"]),
            "postmaster@{d}"
        );
    }
    // a.test's postmaster mail never goes to another domain's postmaster
    // (the domains may belong to different organisations).
    assert_eq!(s.resolve(&addr("postmaster@a.test")).await.unwrap(), Resolution::UnknownUser);
    // No catch-all for anything else.
    assert_eq!(s.resolve(&addr("webmaster@a.test")).await.unwrap(), Resolution::UnknownUser);
}

#[tokio::test]
async fn the_configured_server_postmaster_stands_in_for_a_domain_without_one() {
    let dir = tempfile::tempdir().unwrap();
    let options = StoreOptions { postmaster: Some(addr("ops@b.test")), ..StoreOptions::default() };
    let s = LocalStore::open(dir.path(), options).unwrap();
    s.add_domain(&dom("a.test")).await.unwrap();
    s.add_domain(&dom("b.test")).await.unwrap();
    s.add_user(&addr("ops@b.test"), "pw").await.unwrap();
    s.add_user(&addr("boss@a.test"), "pw").await.unwrap();
    assert_eq!(s.resolve(&addr("postmaster@a.test")).await.unwrap(), local(&["ops@b.test"]));
    // A domain's own postmaster comes first.
    s.add_alias(&addr("postmaster@a.test"), &[addr("boss@a.test")]).await.unwrap();
    assert_eq!(s.resolve(&addr("postmaster@a.test")).await.unwrap(), local(&["boss@a.test"]));
    // Foreign domains are not ours to answer for.
    assert_eq!(s.resolve(&addr("postmaster@far.test")).await.unwrap(), Resolution::Remote);
}

#[tokio::test]
async fn directory_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    {
        let s = open(dir.path());
        s.add_domain(&dom("a.test")).await.unwrap();
        s.add_user(&addr("joe@a.test"), "pw").await.unwrap();
        s.add_alias(&addr("j@a.test"), &[addr("joe@a.test")]).await.unwrap();
    }
    let s = open(dir.path());
    assert!(s.verify_password(&addr("joe@a.test"), "pw").await.unwrap());
    assert_eq!(s.resolve(&addr("j@a.test")).await.unwrap(), local(&["joe@a.test"]));
}

/// The directory as a replicated state machine: batches with refusals,
/// consensus state saved in the same commit, snapshot export and import.
#[tokio::test]
async fn applied_changes_snapshots_and_consensus_state() {
    let dir_a = tempfile::tempdir().unwrap();
    let a = open(dir_a.path());
    let hash = hamail_store::password::Passwords::global().hash("pw").await.unwrap();
    let results = a
        .apply_directory(
            vec![
                DirectoryChange::AddDomain { domain: dom("a.test") },
                DirectoryChange::AddUser { user: addr("u@a.test"), password_hash: hash.clone(), created_at: 7 },
                // Refused: already there. The batch goes on.
                DirectoryChange::AddUser { user: addr("u@a.test"), password_hash: hash.clone(), created_at: 8 },
                DirectoryChange::AddAlias { alias: addr("postmaster@a.test"), targets: vec![addr("u@a.test")] },
            ],
            Some(b"log-3".to_vec()),
        )
        .await
        .unwrap();
    assert!(results[0].is_ok() && results[1].is_ok() && results[3].is_ok());
    assert!(matches!(results[2], Err(StoreError::Permanent(_))));
    assert_eq!(a.consensus_state().await.unwrap(), Some(b"log-3".to_vec()));
    assert!(a.verify_password(&addr("u@a.test"), "pw").await.unwrap());
    let snap = a.export_directory().await.unwrap();
    assert_eq!(snap.users, vec![(addr("u@a.test"), hash.clone(), 7)]);

    // A node that had another user with mail takes the snapshot: the user
    // and its maildrop go, the snapshot's state comes.
    let dir_b = tempfile::tempdir().unwrap();
    let b = open(dir_b.path());
    b.add_domain(&dom("a.test")).await.unwrap();
    b.add_user(&addr("old@a.test"), "x").await.unwrap();
    let qid = b.next_queue_id().await.unwrap();
    let body = Arc::new(b"Subject: x\r\n\r\nx\r\n".to_vec());
    let hash_b = BodyHash::of(&body);
    b.accept(Incoming {
        return_path: None,
        local: vec![addr("old@a.test")],
        remote: vec![],
        body: body.into(),
        queue_id: qid,
        resend: None,
    })
    .await
    .unwrap();
    b.import_directory(snap.clone(), b"log-9".to_vec()).await.unwrap();
    assert_eq!(b.export_directory().await.unwrap(), snap);
    assert_eq!(b.body_refs(&hash_b).await.unwrap(), 0, "the removed user's mail is freed");
    assert_eq!(b.resolve(&addr("postmaster@a.test")).await.unwrap(), local(&["u@a.test"]));
    drop(b);
    let b = open(dir_b.path());
    assert_eq!(b.consensus_state().await.unwrap(), Some(b"log-9".to_vec()), "durable across reopen");
}
