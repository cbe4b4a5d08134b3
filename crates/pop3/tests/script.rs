//! Whole POP3 conversations against a fake driver, fed in chunks of every
//! size: the session must not care how TCP cut the input.

use std::collections::HashMap;
use std::sync::Arc;

use hamail_pop3::{AuthResult, BodyOpened, MaildropResult, Next, PeerInfo, Pop3Config, Session, Stuffer};
use hamail_store::{Address, BodyHash, EntryId, MailboxEntry, QueueId};

/// Plays the tokio driver: answers every `Next` from fake data.
struct FakeDriver {
    user: Address,
    password: String,
    entries: Vec<MailboxEntry>,
    bodies: HashMap<BodyHash, Arc<Vec<u8>>>,
}

impl FakeDriver {
    fn new() -> Self {
        let bodies: Vec<(u64, Option<&str>, &[u8])> = vec![
            // Bare LF, a leading dot and no final newline: the session must
            // send proper CRLF lines, stuffed.
            (7, Some("bob@example.net"), b"Subject: first\nX: y\n\nline one\n.line two\nlast"),
            (9, None, b"Subject: second\r\n\r\nbody\r\n"),
        ];
        let mut entries = Vec::new();
        let mut map = HashMap::new();
        for (id, return_path, body) in bodies {
            let mut entry = MailboxEntry {
                id: EntryId(id),
                body: BodyHash::of(body),
                return_path: return_path.map(str::to_string),
                size: 0,
                received_at: 1_700_000_000,
                queue_id: QueueId(id),
            };
            entry.size = (entry.return_path_line().len() + body.len()) as u64;
            map.insert(entry.body, Arc::new(body.to_vec()));
            entries.push(entry);
        }
        FakeDriver {
            user: Address::parse("alice@example.org").unwrap(),
            password: "secret".to_string(),
            entries,
            bodies: map,
        }
    }

    /// Feeds `chunks` one by one, answering every request of the session
    /// like the real driver would (a body goes out through the stuffer in
    /// pieces of 5 octets). Returns everything written and every `Next`
    /// except `NeedInput` and `Flush` (whose number depends on the
    /// chunking).
    fn run(&self, session: &mut Session, chunks: impl IntoIterator<Item = Vec<u8>>) -> (Vec<u8>, Vec<Next>) {
        let mut written = session.greeting();
        let mut steps = Vec::new();
        let mut opened: Option<Arc<Vec<u8>>> = None;
        for chunk in chunks {
            let mut out = session.handle(&chunk);
            loop {
                written.extend_from_slice(&out.reply);
                if !matches!(out.next, Next::NeedInput | Next::Flush) {
                    steps.push(out.next.clone());
                }
                out = match out.next {
                    Next::NeedInput => break,
                    Next::Flush => session.handle(b""),
                    Next::Close => return (written, steps),
                    Next::Authenticate(c) => {
                        let ok =
                            Address::parse(&c.username).ok() == Some(self.user.clone()) && c.password == self.password;
                        session.authenticated(if ok {
                            AuthResult::Success(self.user.clone())
                        } else {
                            AuthResult::Failure
                        })
                    }
                    Next::OpenMaildrop(user) => {
                        assert_eq!(user, self.user);
                        session.maildrop_opened(MaildropResult::Opened(self.entries.clone()))
                    }
                    Next::OpenBody(hash) => {
                        opened = self.bodies.get(&hash).cloned();
                        session.body_opened(match opened {
                            Some(_) => BodyOpened::Ready,
                            None => BodyOpened::Failed(hamail_store::StoreError::Permanent("no body".into())),
                        })
                    }
                    Next::SendBody { top } => {
                        let body = opened.take().expect("SendBody only after a body was opened");
                        let mut stuffer = Stuffer::new(top);
                        for piece in body.chunks(5) {
                            stuffer.feed(piece, &mut written);
                        }
                        stuffer.finish(&mut written);
                        written.extend_from_slice(b".\r\n");
                        session.body_sent(Ok(()))
                    }
                    Next::Update { user, .. } => {
                        assert_eq!(user, self.user);
                        session.updated(Ok(()))
                    }
                    Next::StartTls => session.tls_established(),
                };
            }
        }
        (written, steps)
    }
}

fn new_session() -> Session {
    let config = Pop3Config { plaintext_auth_allowed: true, tls_available: true, ..Pop3Config::default() };
    Session::new(Arc::new(config), PeerInfo { addr: "127.0.0.1:50000".parse().unwrap(), tls: false })
}

/// Runs `script` whole, then cut into chunks of every size from 1 octet to
/// its whole length, and checks that the written bytes and the driver
/// steps never change. Returns the result of the whole run.
fn same_for_every_chunking(script: &[u8]) -> (String, Vec<Next>) {
    let driver = FakeDriver::new();
    let (whole, whole_steps) = driver.run(&mut new_session(), [script.to_vec()]);
    for size in 1..=script.len() {
        let chunks = script.chunks(size).map(<[u8]>::to_vec);
        let (written, steps) = driver.run(&mut new_session(), chunks);
        assert_eq!(String::from_utf8_lossy(&written), String::from_utf8_lossy(&whole), "chunk size {size}");
        assert_eq!(steps, whole_steps, "chunk size {size}");
    }
    (String::from_utf8(whole).unwrap(), whole_steps)
}

const SCRIPT: &[u8] =
    b"CAPA\r\nUSER alice@example.org\r\nPASS secret\r\nSTAT\r\nLIST\r\nUIDL\r\nRETR 1\r\nTOP 1 0\r\nDELE 1\r\nQUIT\r\n";

const EXPECTED: &str = concat!(
    "+OK localhost hamail POP3 ready\r\n",
    "+OK Capability list follows\r\nTOP\r\nUIDL\r\nRESP-CODES\r\nAUTH-RESP-CODE\r\nPIPELINING\r\n",
    "USER\r\nSASL PLAIN\r\nSTLS\r\nIMPLEMENTATION hamail\r\n.\r\n",
    "+OK send PASS\r\n",
    "+OK maildrop has 2 messages (118 octets)\r\n",
    "+OK 2 118\r\n",
    "+OK 2 messages (118 octets)\r\n1 76\r\n2 42\r\n.\r\n",
    "+OK\r\n1 0000000000000007\r\n2 0000000000000009\r\n.\r\n",
    "+OK 76 octets\r\nReturn-Path: <bob@example.net>\r\n",
    "Subject: first\r\nX: y\r\n\r\nline one\r\n..line two\r\nlast\r\n.\r\n",
    "+OK top of message follows\r\nReturn-Path: <bob@example.net>\r\n",
    "Subject: first\r\nX: y\r\n\r\n.\r\n",
    "+OK message 1 deleted\r\n",
    "+OK hamail signing off (1 messages left)\r\n",
);

#[test]
fn full_script_in_every_chunking() {
    let (written, steps) = same_for_every_chunking(SCRIPT);
    assert_eq!(written, EXPECTED);
    let driver = FakeDriver::new();
    let first = BodyHash::of(&driver.bodies.values().find(|b| b.starts_with(b"Subject: first")).unwrap()[..]);
    assert_eq!(
        steps,
        vec![
            Next::Authenticate(hamail_pop3::Credentials {
                username: "alice@example.org".into(),
                password: "secret".into()
            }),
            Next::OpenMaildrop(driver.user.clone()),
            Next::OpenBody(first),
            Next::SendBody { top: None },
            Next::OpenBody(first),
            Next::SendBody { top: Some(0) },
            Next::Update { user: driver.user.clone(), delete: vec![EntryId(7)] },
            Next::Close,
        ]
    );
}

#[test]
fn script_with_bare_lf_line_ends() {
    let script: Vec<u8> = SCRIPT.iter().copied().filter(|&b| b != b'\r').collect();
    let (written, _) = same_for_every_chunking(&script);
    assert_eq!(written, EXPECTED);
}

#[test]
fn failed_login_then_sasl_plain_with_continuation() {
    use base64::Engine as _;
    let response = base64::engine::general_purpose::STANDARD.encode(b"\0alice@example.org\0secret");
    let script =
        format!("USER alice@example.org\r\nPASS wrong\r\nAUTH PLAIN\r\n{response}\r\nSTAT\r\nRSET\r\nQUIT\r\n");
    let (written, steps) = same_for_every_chunking(script.as_bytes());
    assert_eq!(
        written,
        concat!(
            "+OK localhost hamail POP3 ready\r\n",
            "+OK send PASS\r\n",
            "-ERR [AUTH] Invalid credentials\r\n",
            "+ \r\n",
            "+OK maildrop has 2 messages (118 octets)\r\n",
            "+OK 2 118\r\n",
            "+OK maildrop has 2 messages (118 octets)\r\n",
            "+OK hamail signing off (2 messages left)\r\n",
        )
    );
    assert_eq!(steps.len(), 5, "{steps:?}");
    assert_eq!(steps[3], Next::Update { user: FakeDriver::new().user, delete: vec![] });
}

#[test]
fn stls_then_login_over_tls() {
    // The junk after STLS is in the same chunk, so it must be dropped; the
    // rest arrives after the handshake.
    let driver = FakeDriver::new();
    let mut session = new_session();
    let (written, steps) = driver.run(
        &mut session,
        [b"STLS\r\nUSER mallory\r\n".to_vec(), b"CAPA\r\nUSER alice@example.org\r\nPASS secret\r\nQUIT\r\n".to_vec()],
    );
    let written = String::from_utf8(written).unwrap();
    assert!(written.starts_with("+OK localhost hamail POP3 ready\r\n+OK Begin TLS negotiation\r\n+OK Capability"));
    assert!(!written.contains("STLS\r\nIMPLEMENTATION"), "STLS is not offered over TLS");
    assert!(written.ends_with(
        "+OK send PASS\r\n+OK maildrop has 2 messages (118 octets)\r\n+OK hamail signing off (2 messages left)\r\n"
    ));
    assert_eq!(steps[0], Next::StartTls);
    assert_eq!(steps.last(), Some(&Next::Close));
}

#[test]
fn garbage_never_panics() {
    // A small deterministic generator (xorshift): no dependency needed.
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let words: [&[u8]; 22] = [
        b"USER alice@example.org",
        b"PASS secret",
        b"PASS",
        b"AUTH PLAIN",
        b"AUTH",
        b"*",
        b"AGFsaWNlAHB3",
        b"STAT",
        b"LIST",
        b"LIST 1",
        b"UIDL 2",
        b"RETR 1",
        b"RETR 0",
        b"TOP 2 3",
        b"TOP 1 99999999999",
        b"DELE 1",
        b"RSET",
        b"NOOP",
        b"CAPA",
        b"STLS",
        b"\xff\x00.",
        b"QUIT",
    ];
    let driver = FakeDriver::new();
    for _ in 0..300 {
        let mut input = Vec::new();
        for _ in 0..(next() % 40) {
            match next() % 10 {
                0 => input.extend((0..next() % 700).map(|_| next() as u8)),
                1 => input.push(b'\n'),
                _ => {
                    input.extend_from_slice(words[(next() % words.len() as u64) as usize]);
                    input.extend_from_slice(if next() % 2 == 0 { b"\r\n" } else { b"\n" });
                }
            }
        }
        let size = 1 + (next() % 64) as usize;
        let (written, _) = driver.run(&mut new_session(), input.chunks(size).map(<[u8]>::to_vec));
        assert!(written.ends_with(b"\r\n"));
    }
}
