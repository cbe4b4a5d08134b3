//! Resend recognition (RFC 1047) over real SMTP: a client that lost our
//! `250` sends the same transaction again (same Message-ID, envelope and
//! data) and gets `250 ... already delivered as <first queue id>`; the
//! message is in the maildrop once. Anything else — other data, another
//! envelope, no Message-ID, or the window passed — is a new message. On
//! one node and across the nodes of a loopback cluster (the resend going
//! to another node, as after a failover).

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::cluster::form;
use common::mail::maildrop;
use common::*;

/// One transaction; the reply to the end of DATA.
fn send(addr: SocketAddr, from: &str, rcpts: &[&str], msg: &str) -> String {
    let mut c = Line::connect(addr);
    assert!(c.reply().starts_with("220"));
    c.send("EHLO client.test\r\n");
    assert!(c.reply().starts_with("250"));
    c.send(&format!("MAIL FROM:<{from}>\r\n"));
    assert!(c.reply().starts_with("250"));
    for r in rcpts {
        c.send(&format!("RCPT TO:<{r}>\r\n"));
        assert!(c.reply().starts_with("250"));
    }
    c.send("DATA\r\n");
    assert!(c.reply().starts_with("354"));
    c.send(msg);
    c.send(".\r\n");
    let reply = c.reply();
    c.send("QUIT\r\n");
    reply
}

fn queued_as(reply: &str) -> String {
    assert!(reply.starts_with("250 2.0.0 Ok: queued as "), "{reply}");
    reply.rsplit(' ').next().unwrap().to_string()
}

const MSG: &str = "Message-ID: <m1@client.test>\r\nSubject: once\r\n\r\nonly once, please\r\n";

#[test]
fn a_resend_is_answered_250_and_delivered_once() {
    let s = start("resend_window_secs = 5");
    s.add_domain("example.org");
    s.add_user("a@example.org", "pw");
    s.add_user("b@example.org", "pw");
    let count = |u: &str| maildrop(s.pop3, u).len();

    let first = queued_as(&send(s.smtp, "x@far.test", &["a@example.org"], MSG));
    let again = send(s.smtp, "x@far.test", &["a@example.org"], MSG);
    assert_eq!(again, format!("250 2.0.0 Ok: already delivered as {first}"));
    assert_eq!(count("a@example.org"), 1);

    // The same through Python's smtplib (a real client): 250, still once.
    let file = s.dir.join("msg.eml");
    std::fs::write(&file, MSG).unwrap();
    let (ok, out, err) = run_tool(
        "python3",
        &[
            clients_dir().join("smtp_send.py").to_str().unwrap(),
            "127.0.0.1",
            &s.smtp.port().to_string(),
            "x@far.test",
            "a@example.org",
            file.to_str().unwrap(),
        ],
        None,
    );
    assert!(ok, "{err}");
    assert!(String::from_utf8_lossy(&out).contains("\"ok\": true"), "{}", String::from_utf8_lossy(&out));
    assert_eq!(count("a@example.org"), 1);

    // Other data, another sender, other recipients: new transactions.
    queued_as(&send(s.smtp, "x@far.test", &["a@example.org"], &MSG.replace("please", "again")));
    queued_as(&send(s.smtp, "y@far.test", &["a@example.org"], MSG));
    queued_as(&send(s.smtp, "x@far.test", &["a@example.org", "b@example.org"], MSG));
    assert_eq!((count("a@example.org"), count("b@example.org")), (4, 1));

    // Without a Message-ID identical mail may be meant twice.
    let plain = "Subject: twice\r\n\r\nsame words\r\n";
    queued_as(&send(s.smtp, "x@far.test", &["a@example.org"], plain));
    queued_as(&send(s.smtp, "x@far.test", &["a@example.org"], plain));
    assert_eq!(count("a@example.org"), 6);

    // Once the window (5 s) has passed, the same transaction is new mail.
    let mut recognised = 0;
    let after = poll(Duration::from_secs(20), || {
        let r = send(s.smtp, "x@far.test", &["a@example.org"], MSG);
        if r.contains("already delivered") {
            recognised += 1;
            None
        } else {
            Some(r)
        }
    })
    .expect("a resend after the window is delivered");
    queued_as(&after);
    assert_eq!(count("a@example.org"), 7);

    let (ok, out) = s.cli(&["status", "--json"], "");
    assert!(ok, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["messages_resent"], 2 + recognised, "{out}");
    assert!(s.log().contains(&format!("already delivered as {first} (resend)")));
}

#[test]
fn a_resend_to_another_node_of_the_cluster_is_delivered_once() {
    let root = tempfile::tempdir().unwrap();
    let nodes = form(root.path(), &["data", "data", "witness"]);
    let (ok, out) = nodes[0].cli(&["user", "add", "bob@example.org"], "pw\n");
    assert!(ok, "{out}");
    let first = queued_as(&send(nodes[0].s().smtp, "x@far.test", &["bob@example.org"], MSG));
    // The client lost that 250 and its next attempt reaches the other node.
    let again = send(nodes[1].s().smtp, "x@far.test", &["bob@example.org"], MSG);
    assert_eq!(again, format!("250 2.0.0 Ok: already delivered as {first}"));
    for n in &nodes[..2] {
        let drop = maildrop(n.s().pop3, "bob@example.org");
        assert_eq!(drop.len(), 1, "on {}", n.dir.display());
        assert!(String::from_utf8_lossy(&drop[0]).contains(&format!("id {first}")));
    }
}
