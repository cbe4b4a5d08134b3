//! Drives `Session` through its public API only, with a fake driver, as the
//! tokio driver will. (A `Committed` can only come from the store, so this
//! fake answers deliveries with a temporary store error; the `250` path is
//! covered by the crate's unit tests.)

use std::sync::Arc;

use base64::Engine;
use hamail_smtp::*;
use hamail_store::{Address, QueueId, StoreError};

struct Harness {
    s: Session,
    replies: String,
    txns: Vec<Transaction>,
    /// The message data of each transaction (refused ones too), as the
    /// driver's spool gets it.
    bodies: Vec<Vec<u8>>,
    spool: Vec<u8>,
    creds: Vec<Credentials>,
    closed: bool,
    starttls: usize,
}

fn verdict(a: &Address) -> RcptVerdict {
    match (a.local_part(), a.domain()) {
        ("nobody", "local.example") => RcptVerdict::UnknownUser,
        (_, "local.example") => RcptVerdict::Local(vec![a.clone()]),
        _ => RcptVerdict::Remote,
    }
}

/// Users own their own address; `local.example` is ours.
fn sender_verdict(c: &SenderCheck) -> SenderVerdict {
    match &c.authenticated {
        Some(user) if user.eq_ignore_ascii_case(c.sender.as_str()) => SenderVerdict::Allowed,
        Some(_) => SenderVerdict::NotOwned,
        None if c.sender.domain() == "local.example" => SenderVerdict::LocalNeedsAuthentication,
        None => SenderVerdict::Allowed,
    }
}

impl Harness {
    fn new(config: SmtpConfig) -> Self {
        Self::with_tls(config, false)
    }
    fn with_tls(config: SmtpConfig, tls: bool) -> Self {
        let peer = PeerInfo { addr: "192.0.2.7:5000".parse().unwrap(), tls };
        let s = Session::new(Arc::new(config), peer);
        let replies = String::from_utf8(s.greeting()).unwrap();
        Harness { s, replies, txns: vec![], bodies: vec![], spool: vec![], creds: vec![], closed: false, starttls: 0 }
    }
    fn feed(&mut self, input: &[u8]) {
        let mut out = self.s.handle(input);
        loop {
            self.spool.extend_from_slice(&self.s.take_message_data());
            self.replies.push_str(&String::from_utf8(out.reply).unwrap());
            out = match out.next {
                Next::NeedInput => return,
                Next::Close => {
                    self.closed = true;
                    return;
                }
                Next::CheckRecipient(a) => self.s.recipient_checked(verdict(&a)),
                Next::CheckSender(c) => self.s.sender_checked(sender_verdict(&c)),
                Next::Authenticate(c) => {
                    let ok = c.username == "user@local.example" && c.password == "secret";
                    self.creds.push(c);
                    self.s.authenticated(if ok { AuthResult::Success } else { AuthResult::Failure })
                }
                Next::StartData => self
                    .s
                    .data_started(Ok(DataStart { queue_id: QueueId(self.bodies.len() as u64 + 1), date: "D".into() })),
                Next::Deliver(t) => {
                    self.txns.push(t);
                    self.bodies.push(std::mem::take(&mut self.spool));
                    self.s.delivered(Err(StoreError::Temporary("test".into())))
                }
                Next::Refused { .. } => {
                    self.bodies.push(std::mem::take(&mut self.spool));
                    self.s.handle(&[])
                }
                Next::StartTls => {
                    self.starttls += 1;
                    self.s.tls_established()
                }
            };
        }
    }
    fn lines(&self) -> Vec<&str> {
        self.replies.split("\r\n").filter(|l| !l.is_empty()).collect()
    }
    fn last(&self) -> &str {
        self.lines().last().copied().unwrap_or("")
    }
    /// The 3-digit codes of all replies (last line of multi-line ones).
    fn codes(&self) -> Vec<&str> {
        self.lines().into_iter().filter(|l| l.as_bytes().get(3) == Some(&b' ')).map(|l| &l[..3]).collect()
    }
}

fn b64(s: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

const SCRIPT: &[u8] = b"EHLO client.example\r\n\
MAIL FROM:<sender@remote.example> BODY=8BITMIME SIZE=100\r\n\
RCPT TO:<a@local.example>\r\n\
RCPT TO:<nobody@local.example>\r\n\
RCPT TO:<b@local.example>\r\n\
DATA\r\n\
Subject: test\r\n\
\r\n\
..leading dot\r\n\
...two dots\r\n\
.\r\n\
NOOP\r\n\
QUIT\r\n";

#[test]
fn resumable_at_every_chunk_size() {
    let mut whole = Harness::new(SmtpConfig::default());
    whole.feed(SCRIPT);
    assert!(whole.closed);
    assert_eq!(whole.codes(), ["220", "250", "250", "250", "550", "250", "354", "451", "250", "221"]);
    assert_eq!(whole.txns.len(), 1);
    let body = String::from_utf8(whole.bodies[0].clone()).unwrap();
    assert_eq!(
        body,
        "Received: from client.example ([192.0.2.7])\r\n\tby localhost (hamail) with ESMTP id 000000000001;\r\n\tD\r\n\
         Subject: test\r\n\r\n.leading dot\r\n..two dots\r\n"
    );
    assert_eq!(whole.txns[0].recipients, ["a@local.example", "b@local.example"]);

    for size in 1..=SCRIPT.len() {
        let mut h = Harness::new(SmtpConfig::default());
        for chunk in SCRIPT.chunks(size) {
            h.feed(chunk);
        }
        assert_eq!(h.replies, whole.replies, "chunk size {size}");
        assert_eq!(h.txns.len(), 1, "chunk size {size}");
        assert_eq!(h.bodies, whole.bodies, "chunk size {size}");
        assert!(h.closed);
    }
}

#[test]
fn smuggling_is_rejected_and_never_splits_a_message() {
    for end in ["\n.\n", "\n.\r\n", "\r.\r\n", "\r\n.\n", "\r\n.\r\r\n", "\r"] {
        let mut h = Harness::new(SmtpConfig::default());
        let input = format!(
            "EHLO c.example\r\nMAIL FROM:<s@remote.example>\r\nRCPT TO:<a@local.example>\r\nDATA\r\n\
             hello{end}MAIL FROM:<evil@remote.example>\r\nRCPT TO:<victim@local.example>\r\nDATA\r\n\
             smuggled\r\n.\r\nNOOP\r\n"
        );
        h.feed(input.as_bytes());
        assert!(h.txns.is_empty(), "{end:?}: a transaction was produced");
        assert_eq!(h.codes(), ["220", "250", "250", "250", "354", "554", "250"], "{end:?}: {}", h.replies);
        assert!(h.replies.contains("554 5.6.0"), "{end:?}");
        // Same byte by byte.
        let mut h2 = Harness::new(SmtpConfig::default());
        for b in input.as_bytes() {
            h2.feed(std::slice::from_ref(b));
        }
        assert_eq!(h2.replies, h.replies);
        assert!(h2.txns.is_empty());
    }
}

#[test]
fn bare_cr_in_the_middle_rejects() {
    let mut h = Harness::new(SmtpConfig::default());
    h.feed(b"EHLO c\r\nMAIL FROM:<>\r\nRCPT TO:<a@local.example>\r\nDATA\r\na\rb\r\n.\r\n");
    assert!(h.txns.is_empty());
    assert!(h.last().starts_with("554 5.6.0"));
}

#[test]
fn starttls_discards_pipelined_input() {
    let config = SmtpConfig { tls_available: true, ..SmtpConfig::default() };
    let mut h = Harness::new(config);
    h.feed(b"EHLO c.example\r\n");
    assert!(h.replies.contains("250-STARTTLS\r\n"));
    h.replies.clear();
    h.feed(b"STARTTLS\r\nMAIL FROM:<evil@remote.example>\r\nRCPT TO:<a@local.example>\r\nDATA\r\n");
    assert_eq!(h.starttls, 1);
    assert_eq!(h.replies, "220 2.0.0 Ready to start TLS\r\n", "junk after STARTTLS was executed");
    // Back to "not greeted": the EHLO before TLS is forgotten (RFC 3207 4.2).
    h.feed(b"MAIL FROM:<a@remote.example>\r\n");
    assert!(h.last().starts_with("503 5.5.1"));
    h.replies.clear();
    h.feed(b"EHLO c.example\r\n");
    assert!(!h.replies.contains("STARTTLS"));
    h.feed(b"STARTTLS\r\n");
    assert!(h.last().starts_with("503 5.5.1"));
    assert_eq!(h.starttls, 1);
    h.feed(b"MAIL FROM:<a@remote.example>\r\nRCPT TO:<a@local.example>\r\nDATA\r\nx\r\n.\r\n");
    assert!(h.txns[0].tls);
}

fn submission() -> SmtpConfig {
    SmtpConfig { submission: true, plaintext_auth_allowed: true, ..SmtpConfig::default() }
}

#[test]
fn auth_plain_with_initial_response_and_relay() {
    let mut h = Harness::new(submission());
    h.feed(b"EHLO c.example\r\n");
    assert!(h.replies.contains("250-AUTH PLAIN LOGIN\r\n"));
    h.feed(b"MAIL FROM:<user@local.example>\r\n");
    assert!(h.last().starts_with("530 5.7.0"));
    h.feed(format!("AUTH PLAIN {}\r\n", b64("\0user@local.example\0secret")).as_bytes());
    assert!(h.last().starts_with("235 2.7.0"), "{}", h.replies);
    assert_eq!(h.s.authenticated_user(), Some("user@local.example"));
    assert_eq!(h.creds[0].authzid, None);
    h.feed(format!("AUTH PLAIN {}\r\n", b64("\0user@local.example\0secret")).as_bytes());
    assert!(h.last().starts_with("503 5.5.1"));
    h.feed(b"MAIL FROM:<user@local.example>\r\nRCPT TO:<Far@Remote.example>\r\nRCPT TO:<a@local.example>\r\nDATA\r\nx\r\n.\r\n");
    assert_eq!(h.txns.len(), 1);
    assert_eq!(h.txns[0].remote, ["Far@Remote.example"]);
    assert_eq!(h.txns[0].authenticated.as_deref(), Some("user@local.example"));
    let text = String::from_utf8(h.bodies[0].clone()).unwrap();
    assert!(
        text.starts_with("Received: from c.example ([192.0.2.7])\r\n\t(Authenticated sender: user@local.example)\r\n\tby localhost (hamail) with ESMTPA id 000000000001;\r\n\tD\r\n"),
        "{text}"
    );
    // Not a header field: our fields, the empty line, then the body.
    assert!(text.contains(";\r\n\tD\r\nMessage-ID: <000000000001."), "{text}");
    assert!(text.ends_with("@localhost>\r\nDate: D\r\n\r\nx\r\n"), "{text}");
}

#[test]
fn auth_plain_continuation_login_cancel_and_errors() {
    let mut h = Harness::new(submission());
    h.feed(b"EHLO c.example\r\nAUTH PLAIN\r\n");
    assert_eq!(h.last(), "334 ");
    h.feed(format!("{}\r\n", b64("admin\0user@local.example\0wrong")).as_bytes());
    assert!(h.last().starts_with("535 5.7.8"));
    assert_eq!(h.creds[0].authzid.as_deref(), Some("admin"));
    h.feed(b"AUTH PLAIN =\r\n");
    assert!(h.last().starts_with("501"), "{}", h.last());
    h.feed(b"AUTH PLAIN !!!notbase64\r\n");
    assert!(h.last().starts_with("501 5.5.2"));
    h.feed(b"AUTH PLAIN\r\n*\r\n");
    assert!(h.last().starts_with("501"));
    h.feed(b"AUTH LOGIN\r\n");
    assert_eq!(h.last(), "334 VXNlcm5hbWU6");
    h.feed(b"*\r\n");
    assert!(h.last().starts_with("501"));
    h.feed(b"AUTH LOGIN\r\n");
    h.feed(format!("{}\r\n", b64("user@local.example")).as_bytes());
    assert_eq!(h.last(), "334 UGFzc3dvcmQ6");
    h.feed(b"%%%\r\n");
    assert!(h.last().starts_with("501 5.5.2"));
    h.feed(b"AUTH CRAM-MD5\r\n");
    assert!(h.last().starts_with("504 5.5.4"));
    // LOGIN with the user name as initial response.
    h.feed(format!("AUTH LOGIN {}\r\n", b64("user@local.example")).as_bytes());
    assert_eq!(h.last(), "334 UGFzc3dvcmQ6");
    h.feed(format!("{}\r\n", b64("secret")).as_bytes());
    assert!(h.last().starts_with("235 2.7.0"));
    assert!(!h.closed);
}

#[test]
fn auth_requires_tls_unless_allowed() {
    let config = SmtpConfig { submission: true, tls_available: true, ..SmtpConfig::default() };
    let mut h = Harness::new(config.clone());
    h.feed(b"EHLO c.example\r\n");
    assert!(!h.replies.contains("AUTH"));
    h.feed(format!("AUTH PLAIN {}\r\n", b64("\0user@local.example\0secret")).as_bytes());
    assert!(h.last().starts_with("538 5.7.11"));
    assert!(h.creds.is_empty());
    let mut h = Harness::with_tls(config, true);
    h.feed(b"EHLO c.example\r\n");
    assert!(h.replies.contains("250-AUTH PLAIN LOGIN\r\n") && !h.replies.contains("STARTTLS"));
    h.feed(format!("AUTH PLAIN {}\r\n", b64("\0user@local.example\0secret")).as_bytes());
    assert!(h.last().starts_with("235"));
    // Not offered at all on the MTA port.
    let mut h = Harness::new(SmtpConfig { plaintext_auth_allowed: true, ..SmtpConfig::default() });
    h.feed(b"EHLO c.example\r\n");
    assert!(!h.replies.contains("AUTH"));
}

#[test]
fn a_thousand_recipients_and_one_more() {
    let mut h = Harness::new(SmtpConfig::default());
    let mut input = String::from("EHLO c.example\r\nMAIL FROM:<s@remote.example>\r\n");
    for i in 0..1001 {
        input.push_str(&format!("RCPT TO:<user{i}@local.example>\r\n"));
    }
    input.push_str("DATA\r\nhi\r\n.\r\n");
    h.feed(input.as_bytes());
    let codes = h.codes();
    assert_eq!(codes.iter().filter(|c| **c == "250").count(), 1 + 1 + 1000);
    assert_eq!(codes.iter().filter(|c| **c == "452").count(), 1);
    assert!(h.replies.contains("452 4.5.3"));
    assert_eq!(h.txns[0].local.len(), 1000);
    assert_eq!(h.txns[0].recipients.len(), 1000);
}

#[test]
fn size_limits() {
    let config = SmtpConfig { max_message_size: 100, ..SmtpConfig::default() };
    let mut h = Harness::new(config);
    h.feed(b"EHLO c.example\r\n");
    assert!(h.replies.contains("250-SIZE 100\r\n"));
    h.feed(b"MAIL FROM:<s@remote.example> SIZE=101\r\n");
    assert!(h.last().starts_with("552 5.3.4"));
    h.feed(b"MAIL FROM:<s@remote.example> SIZE=100\r\nRCPT TO:<a@local.example>\r\nDATA\r\n");
    let line = "x".repeat(78) + "\r\n";
    for _ in 0..10 {
        h.feed(line.as_bytes());
    }
    h.feed(b".\r\nNOOP\r\n");
    assert!(h.txns.is_empty());
    let n = h.lines().len();
    assert!(h.lines()[n - 2].starts_with("552 5.3.4"), "{}", h.replies);
    assert_eq!(h.last(), "250 2.0.0 Ok");
}

#[test]
fn long_lines() {
    let config = SmtpConfig { max_data_line: 50, ..SmtpConfig::default() };
    let mut h = Harness::new(config);
    // A 600-octet command, fed in pieces so the buffer overflows before LF.
    h.feed(b"EHLO c.example\r\n");
    h.feed(&[b'N'; 300]);
    h.feed(&[b'N'; 300]);
    h.feed(b"\r\nNOOP\r\n");
    let n = h.lines().len();
    assert!(h.lines()[n - 2].starts_with("500 5.5.2"), "{}", h.replies);
    assert_eq!(h.last(), "250 2.0.0 Ok");
    // One of exactly 512 octets with CRLF is fine (RFC 5321 4.5.3.1.4).
    let ok = format!("NOOP {}\r\n", "a".repeat(512 - 7));
    h.feed(ok.as_bytes());
    assert_eq!(h.last(), "250 2.0.0 Ok");
    let bad = format!("NOOP {}\r\n", "a".repeat(513 - 7));
    h.feed(bad.as_bytes());
    assert!(h.last().starts_with("500 5.5.2"));
    // A data line over max_data_line.
    h.feed(b"MAIL FROM:<>\r\nRCPT TO:<a@local.example>\r\nDATA\r\n");
    h.feed(format!("{}\r\n.\r\n", "y".repeat(51)).as_bytes());
    assert!(h.last().starts_with("554 5.6.0"));
    assert!(h.txns.is_empty());
    assert!(!h.closed);
}

#[test]
fn too_many_errors_close() {
    let mut h = Harness::new(SmtpConfig::default());
    for _ in 0..19 {
        h.feed(b"BOGUS\r\n");
    }
    assert!(!h.closed);
    h.feed(b"BOGUS\r\nNOOP\r\n");
    assert!(h.closed);
    assert!(h.last().starts_with("421 4.7.0"));
    assert_eq!(h.lines().iter().filter(|l| l.starts_with("500 5.5.1")).count(), 20);
    // Nothing after close.
    let out = h.s.handle(b"NOOP\r\n");
    assert!(out.reply.is_empty() && matches!(out.next, Next::Close));
}

#[test]
fn timeout_and_greeting() {
    let mut h = Harness::new(SmtpConfig { hostname: "mx.example".into(), ..SmtpConfig::default() });
    assert_eq!(h.replies, "220 mx.example ESMTP hamail\r\n");
    assert!(h.s.timeout().starts_with(b"421 4.4.2 mx.example"));
    let out = h.s.handle(b"NOOP\r\n");
    assert!(matches!(out.next, Next::Close));
}

#[test]
fn garbage_never_panics() {
    // Pseudo-random bytes with many protocol characters in every state.
    let mut x: u64 = 0x9e3779b97f4a7c15;
    let alphabet = b"\r\n.:<>@ =\0\xffEHLOMAILRCPTDATAQUITAUTHPLAINSTARTTLS";
    for round in 0..200 {
        let mut h = Harness::new(SmtpConfig {
            submission: round % 2 == 0,
            plaintext_auth_allowed: true,
            tls_available: true,
            max_errors: 1000,
            ..SmtpConfig::default()
        });
        h.feed(b"EHLO c\r\nMAIL FROM:<>\r\nRCPT TO:<a@local.example>\r\n");
        for _ in 0..50 {
            let mut chunk = Vec::new();
            for _ in 0..(x % 64) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                chunk.push(alphabet[(x % alphabet.len() as u64) as usize]);
            }
            h.feed(&chunk);
            if h.closed {
                break;
            }
        }
    }
}

#[test]
fn auth_plain_with_a_long_initial_response() {
    let mut h = Harness::new(submission());
    let password = "p".repeat(600);
    h.feed(
        format!("EHLO c.example\r\nAUTH PLAIN {}\r\n", b64(&format!("\0user@local.example\0{password}"))).as_bytes(),
    );
    assert!(h.last().starts_with("535 5.7.8"), "{}", h.replies);
    assert_eq!(h.creds[0].password, password);
    // A SASL line over 12288 octets: 500 5.5.6, session kept.
    h.feed(b"AUTH LOGIN\r\n");
    h.feed(&vec![b'A'; 13000]);
    h.feed(b"\r\nNOOP\r\n");
    let n = h.lines().len();
    assert!(h.lines()[n - 2].starts_with("500 5.5.6"), "{}", h.replies);
    assert_eq!(h.last(), "250 2.0.0 Ok");
}

#[test]
fn credentials_debug_hides_the_password() {
    let c = Credentials { authzid: None, username: "u".into(), password: "hunter2".into() };
    assert!(!format!("{c:?}").contains("hunter2"));
}

/// In the middle of an AUTH exchange every line is a SASL response, never a
/// command (RFC 4954 4): none of these may run.
#[test]
fn commands_inside_a_sasl_exchange_are_responses() {
    for cmd in ["QUIT", "NOOP", "RSET", "EHLO c.example", "MAIL FROM:<a@b.example>", "DATA", "STARTTLS", "HELP"] {
        let mut h = Harness::new(SmtpConfig { tls_available: true, ..submission() });
        h.feed(format!("EHLO c.example\r\nAUTH PLAIN\r\n{cmd}\r\n").as_bytes());
        assert!(h.last().starts_with("501 5.5.2"), "{cmd}: {}", h.replies);
        assert!(!h.closed && h.starttls == 0 && h.creds.is_empty(), "{cmd}");
        // Back to Greeted: AUTH can start again.
        h.feed(format!("AUTH PLAIN {}\r\n", b64("\0user@local.example\0secret")).as_bytes());
        assert!(h.last().starts_with("235"), "{cmd}");
    }
}

#[test]
fn helo_gives_plain_smtp_in_received() {
    let mut h = Harness::new(SmtpConfig::default());
    h.feed(b"HELO old.example\r\nMAIL FROM:<>\r\nRCPT TO:<a@local.example>\r\nDATA\r\nx\r\n.\r\n");
    let t = &h.txns[0];
    assert!(!t.esmtp);
    assert!(String::from_utf8(h.bodies[0].clone())
        .unwrap()
        .ends_with("with SMTP id 000000000001\r\n\tfor <a@local.example>;\r\n\tD\r\n\r\nx\r\n"));
}

fn submission_config() -> SmtpConfig {
    SmtpConfig { submission: true, plaintext_auth_allowed: true, ..SmtpConfig::default() }
}

fn logged_in() -> Harness {
    let mut h = Harness::new(submission_config());
    h.feed(format!("EHLO c.example\r\nAUTH PLAIN {}\r\n", b64("\0user@local.example\0secret")).as_bytes());
    assert!(h.last().starts_with("235 "), "{}", h.replies);
    h
}

#[test]
fn submission_binds_the_sender_to_the_login() {
    let mut h = logged_in();
    h.feed(b"MAIL FROM:<other@local.example>\r\n");
    assert_eq!(
        h.last(),
        "553 5.7.1 <other@local.example>: Sender address rejected: not owned by user user@local.example"
    );
    h.feed(b"MAIL FROM:<>\r\n");
    assert_eq!(h.last(), "553 5.7.1 <>: Sender address rejected: the null sender is not allowed after authentication");
    h.feed(b"MAIL FROM:<user@local.example>\r\n");
    assert_eq!(h.last(), "250 2.1.0 Ok");
}

#[test]
fn authzid_becomes_the_identity_checked_against_the_sender() {
    let mut h = Harness::new(submission_config());
    h.feed(
        format!(
            "EHLO c.example\r\nAUTH PLAIN {}\r\nMAIL FROM:<user@local.example>\r\n",
            b64("boss@local.example\0user@local.example\0secret")
        )
        .as_bytes(),
    );
    assert_eq!(h.creds[0].authzid.as_deref(), Some("boss@local.example"));
    // The fake driver accepted the password; the session now acts as the
    // authorization identity, which does not own user@.
    assert!(h.last().starts_with("553 5.7.1 "), "{}", h.replies);
    assert!(h.last().ends_with("not owned by user boss@local.example"), "{}", h.last());
}

#[test]
fn unauthenticated_local_sender_is_refused_when_checked() {
    let config = SmtpConfig { check_unauthenticated_sender: true, ..SmtpConfig::default() };
    let mut h = Harness::new(config);
    h.feed(b"EHLO c.example\r\nMAIL FROM:<ceo@local.example>\r\n");
    assert_eq!(
        h.last(),
        "550 5.7.1 <ceo@local.example>: Sender address rejected: mail from a local domain must be sent with authentication"
    );
    h.feed(b"MAIL FROM:<someone@remote.example>\r\nMAIL FROM:<x@remote.example>\r\n");
    let lines = h.lines();
    assert_eq!(lines[lines.len() - 2], "250 2.1.0 Ok");
    assert_eq!(h.last(), "503 5.5.1 Error: nested MAIL command");
    // Without the check (the default), nobody is asked.
    let mut h = Harness::new(SmtpConfig::default());
    h.feed(b"EHLO c.example\r\nMAIL FROM:<ceo@local.example>\r\n");
    assert_eq!(h.last(), "250 2.1.0 Ok");
}

#[test]
fn low_level_syntax_replies() {
    let config = SmtpConfig {
        hostname: "local.example".into(),
        tls_available: true,
        local_addresses: vec!["127.0.0.1".parse().unwrap(), "::1".parse().unwrap()],
        ..SmtpConfig::default()
    };
    let mut h = Harness::new(config);
    h.feed(b"EHLO c.example\r\nSTARTTLS now\r\n");
    assert_eq!(h.last(), "501 5.5.4 Syntax error (no parameters allowed)");
    assert_eq!(h.starttls, 0);
    h.feed("MAIL FROM:<jos\u{e9}@remote.example>\r\n".as_bytes());
    assert_eq!(h.last(), "553 5.6.7 Non-ASCII address: this server does not offer SMTPUTF8 (RFC 6531)");
    h.feed(b"MAIL FROM:<s@remote.example>\r\n");
    assert_eq!(h.last(), "250 2.1.0 Ok");
    h.feed("RCPT TO:<j\u{fc}rgen@local.example>\r\n".as_bytes());
    assert!(h.last().starts_with("553 5.6.7 "), "{}", h.last());
    // An address literal of ours is this host (RFC 5321 4.1.3): user@hostname.
    h.feed(b"RCPT TO:<alice@[127.0.0.1]>\r\n");
    assert_eq!(h.last(), "250 2.1.5 Ok");
    h.feed(b"RCPT TO:<bob@[IPv6:::1]>\r\n");
    assert_eq!(h.last(), "250 2.1.5 Ok");
    h.feed(b"RCPT TO:<carol@[192.0.2.1]>\r\n");
    assert_eq!(h.last(), "550 5.1.2 Recipient address rejected: that address literal is not this host");
    h.feed(b"RCPT TO:<dave@[not.an.ip]>\r\n");
    assert!(h.last().starts_with("501 5.1.3 "), "{}", h.last());
}
