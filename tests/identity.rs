//! Who may send as whom, against the running binary: submission binds the
//! envelope sender to the login (Python's smtplib as the client), an
//! AUTH PLAIN authorization identity needs the server's leave, port 25
//! refuses our own domains from clients that did not log in, and the
//! recipient rules around them (postmaster of a domain without one,
//! address literals of this host), each with its exact reply.

mod common;

use base64::Engine;
use common::*;
use serde_json::Value;

fn setup(extra: &str) -> Server {
    let s = start(extra);
    s.add_domain("example.org");
    s.add_domain("other.test");
    s.add_user("alice@example.org", "pw");
    s.add_user("bob@example.org", "pw");
    let (ok, out) = s.cli(&["alias", "add", "sales@example.org", "alice@example.org", "bob@example.org"], "");
    assert!(ok, "{out}");
    s
}

/// Python's smtplib: submission as `user`, envelope sender `from`.
fn submit(s: &Server, user: &str, password: &str, from: &str) -> Value {
    let file = s.dir.join("identity.eml");
    std::fs::write(&file, b"Subject: identity\r\n\r\nwho am I\r\n").unwrap();
    let port = s.submission.port().to_string();
    let file = file.to_str().unwrap();
    let args =
        ["127.0.0.1", &port, from, "bob@example.org", file, "--starttls", "--user", user, "--password", password];
    py("smtp_send.py", &args)
}

#[test]
fn submission_sender_must_belong_to_the_login() {
    let s = setup("[smtp.allowed_senders]\n\"bob@example.org\" = [\"*@other.test\"]\n");
    // Their own address and an alias that reaches them: accepted.
    assert_eq!(submit(&s, "alice@example.org", "pw", "alice@example.org")["code"], 250);
    assert_eq!(submit(&s, "alice@example.org", "pw", "sales@example.org")["code"], 250);
    // Another user's address, a foreign one: refused with 553 5.7.1.
    for forged in ["bob@example.org", "ceo@elsewhere.test", "anyone@other.test"] {
        let v = submit(&s, "alice@example.org", "pw", forged);
        assert_eq!(v["ok"], false, "{forged}: {v}");
        assert_eq!(v["code"], 553, "{forged}: {v}");
        assert!(v["error"].as_str().unwrap().contains("not owned by user alice@example.org"), "{v}");
    }
    // What smtp.allowed_senders gives bob.
    assert_eq!(submit(&s, "bob@example.org", "pw", "news@other.test")["code"], 250);
    assert!(s
        .log()
        .contains("NOQUEUE: reject: MAIL from [127.0.0.1]: NotOwned; from=<bob@example.org> auth=alice@example.org"));

    // The null sender after AUTH, exactly.
    let mut c = greeted(s.submission);
    let token = base64::engine::general_purpose::STANDARD.encode("\0alice@example.org\0pw");
    c.send(&format!("AUTH PLAIN {token}\r\n"));
    assert!(c.reply().starts_with("235 "));
    c.send("MAIL FROM:<>\r\n");
    assert_eq!(c.reply(), "553 5.7.1 <>: Sender address rejected: the null sender is not allowed after authentication");
    c.send("MAIL FROM:<bob@example.org>\r\n");
    assert_eq!(c.reply(), "553 5.7.1 <bob@example.org>: Sender address rejected: not owned by user alice@example.org");
}

#[test]
fn authzid_other_than_the_login_needs_leave() {
    let s = setup("[smtp.may_act_for]\n\"bob@example.org\" = [\"alice@example.org\"]\n");
    let plain = |authzid: &str, user: &str, pw: &str| {
        base64::engine::general_purpose::STANDARD.encode(format!("{authzid}\0{user}\0{pw}"))
    };
    let mut c = greeted(s.submission);
    c.send(&format!("AUTH PLAIN {}\r\n", plain("bob@example.org", "alice@example.org", "pw")));
    assert_eq!(c.reply(), "535 5.7.8 Authentication credentials invalid");
    // The authzid equal to the login is plain RFC 4616.
    c.send(&format!("AUTH PLAIN {}\r\n", plain("alice@example.org", "alice@example.org", "pw")));
    assert!(c.reply().starts_with("235 "));
    // bob may act for alice: then he is alice, and sends as alice only.
    let mut c = greeted(s.submission);
    c.send(&format!("AUTH PLAIN {}\r\n", plain("alice@example.org", "bob@example.org", "pw")));
    assert!(c.reply().starts_with("235 "));
    c.send("MAIL FROM:<bob@example.org>\r\n");
    assert_eq!(c.reply(), "553 5.7.1 <bob@example.org>: Sender address rejected: not owned by user alice@example.org");
    c.send("MAIL FROM:<alice@example.org>\r\n");
    assert_eq!(c.reply(), "250 2.1.0 Ok");
}

#[test]
fn port_25_refuses_our_domains_from_clients_that_did_not_log_in() {
    let s = setup("");
    let mut c = greeted(s.smtp);
    for local in ["alice@example.org", "nobody@other.test"] {
        c.send(&format!("MAIL FROM:<{local}>\r\n"));
        assert_eq!(
            c.reply(),
            format!("550 5.7.1 <{local}>: Sender address rejected: mail from a local domain must be sent with authentication")
        );
    }
    c.send("MAIL FROM:<friend@elsewhere.test>\r\n");
    assert_eq!(c.reply(), "250 2.1.0 Ok");
    c.send("QUIT\r\n");
    // Configurable: off, a local sender is taken.
    let open = setup("local_sender_requires_auth = false\n");
    let mut c = greeted(open.smtp);
    c.send("MAIL FROM:<alice@example.org>\r\n");
    assert_eq!(c.reply(), "250 2.1.0 Ok");
}

#[test]
fn recipient_rules_postmaster_literals_and_syntax() {
    let s = setup("");
    let (ok, out) = s.cli(&["alias", "add", "postmaster@example.org", "alice@example.org"], "");
    assert!(ok, "{out}");
    let mut c = greeted(s.smtp);
    c.send("STARTTLS now\r\n");
    assert_eq!(c.reply(), "501 5.5.4 Syntax error (no parameters allowed)");
    c.send_bytes("MAIL FROM:<jos\u{e9}@elsewhere.test>\r\n".as_bytes());
    assert_eq!(c.reply(), "553 5.6.7 Non-ASCII address: this server does not offer SMTPUTF8 (RFC 6531)");
    c.send("MAIL FROM:<friend@elsewhere.test>\r\n");
    assert_eq!(c.reply(), "250 2.1.0 Ok");
    // other.test has no postmaster: never example.org's.
    c.send("RCPT TO:<postmaster@other.test>\r\n");
    assert_eq!(c.reply(), "550 5.1.1 Recipient address rejected: user unknown");
    c.send("RCPT TO:<postmaster@example.org>\r\n");
    assert_eq!(c.reply(), "250 2.1.5 Ok");
    // An address literal of this host is this host (RFC 5321 4.1.3).
    c.send("RCPT TO:<bob@[127.0.0.1]>\r\n");
    assert_eq!(c.reply(), "250 2.1.5 Ok");
    c.send("RCPT TO:<bob@[192.0.2.1]>\r\n");
    assert_eq!(c.reply(), "550 5.1.2 Recipient address rejected: that address literal is not this host");
    c.send("DATA\r\n");
    assert!(c.reply().starts_with("354"));
    c.send("Subject: literal\r\n\r\nto a literal\r\n.\r\n");
    assert!(c.reply().starts_with("250 2.0.0"));
    let got = common::mail::maildrop(s.pop3, "bob@example.org");
    assert_eq!(got.len(), 1, "bob@[127.0.0.1] reached bob");
    let got = common::mail::maildrop(s.pop3, "alice@example.org");
    assert_eq!(got.len(), 1, "postmaster@example.org reached alice");

    // A configured server postmaster stands in for domains without one.
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, text.replace("[server]\n", "[server]\npostmaster = \"alice@example.org\"\n")).unwrap();
    let s = start_in(dir.path(), "");
    s.add_domain("example.org");
    s.add_domain("other.test");
    s.add_user("alice@example.org", "pw");
    let mut c = greeted(s.smtp);
    c.send("MAIL FROM:<friend@elsewhere.test>\r\nRCPT TO:<postmaster@other.test>\r\n");
    assert_eq!(c.reply(), "250 2.1.0 Ok");
    assert_eq!(c.reply(), "250 2.1.5 Ok");
}
