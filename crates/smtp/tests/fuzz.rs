//! A bounded random fuzz driver of the SMTP session and its DATA decoder
//! (stable Rust: `rand` with a fixed seed). Inputs are mutations and
//! splices of a corpus of real sessions (smuggling variants, pipelined
//! commands, AUTH, DATA with dots, over-long lines), fed whole and in random
//! pieces to a deterministic fake driver. Asserted for every input: no
//! panic; every reply line is three digits, a space or a dash, and ends in
//! CRLF; the memory the session holds stays bounded; the message data of a
//! message stays within the size limit plus our headers; and the same input
//! in any pieces gives the same replies and message data.
//!
//! Runs about 10 s; longer with `HAMAIL_FUZZ_SECS=600 cargo test -p
//! hamail-smtp --test fuzz --release` (and another seed with
//! `HAMAIL_FUZZ_SEED`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use hamail_smtp::*;
use hamail_store::{Address, QueueId, StoreError};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn b64(s: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

/// Real sessions, as a client sends them.
fn corpus() -> Vec<Vec<u8>> {
    let plain = format!("AUTH PLAIN {}\r\n", b64("\0user@local.example\0secret"));
    let login = format!("AUTH LOGIN\r\n{}\r\n{}\r\n", b64("user@local.example"), b64("secret"));
    let mut c: Vec<Vec<u8>> = [
        "EHLO client.example\r\nMAIL FROM:<a@remote.example>\r\nRCPT TO:<u@local.example>\r\nDATA\r\nSubject: hi\r\n\r\nhello\r\n.\r\nQUIT\r\n",
        "HELO old.example\r\nMAIL FROM:<>\r\nRCPT TO:<u@local.example>\r\nRCPT TO:<nobody@local.example>\r\nDATA\r\n..dot\r\n...dots\r\n.\r\n",
        // Pipelined (RFC 2920), DATA last, then the next transaction.
        "EHLO c\r\nMAIL FROM:<a@b.example> SIZE=100 BODY=8BITMIME\r\nRCPT TO:<u@local.example>\r\nRCPT TO:<v@local.example>\r\nDATA\r\n",
        "x\r\n.\r\nRSET\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<u@local.example>\r\nDATA\r\nMessage-ID: <m@x>\r\nDate: now\r\n\r\nbody\r\n.\r\nNOOP\r\n",
        // Smuggling variants.
        "EHLO c\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<u@local.example>\r\nDATA\r\nx\n.\nMAIL FROM:<evil@b.example>\r\nRCPT TO:<u@local.example>\r\nDATA\r\nevil\r\n.\r\n",
        "EHLO c\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<u@local.example>\r\nDATA\r\nx\r.\r\nx\n.\r\nx\r\n.\n\r\n.\r\n",
        "EHLO c\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<u@local.example>\r\nDATA\r\n\r\n.\r\r\n.\r\n",
        // Headers folded, long, missing; no headers at all.
        "EHLO c\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<u@local.example>\r\nDATA\r\nMessage-ID:\r\n <f@x>\r\nX  : y\r\nnot a header\r\n.\r\n",
        "STARTTLS\r\nEHLO c\r\nVRFY x\r\nHELP\r\nEXPN y\r\nBDAT 10 LAST\r\nFOO\r\n\r\n",
        "EHLO c\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<far@remote.example>\r\nRCPT TO:<>\r\nRCPT TO:<Postmaster>\r\nDATA\r\n.\r\n",
        // Senders judged by the driver; address literals; 8-bit paths.
        "EHLO c\r\nMAIL FROM:<ceo@local.example>\r\nMAIL FROM:<tempfail@x.example>\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<u@[192.0.2.25]>\r\nRCPT TO:<u@[IPv6:::1]>\r\nRCPT TO:<u@[300.1.1.1]>\r\n",
        "EHLO c\r\nSTARTTLS now\r\nMAIL FROM:<j\u{f6}rg@b.example>\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<\u{fc}@local.example>\r\n",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect();
    c.push(
        format!(
            "EHLO c\r\n{plain}MAIL FROM:<user@local.example>\r\nRCPT TO:<far@remote.example>\r\nDATA\r\nhi\r\n.\r\n"
        )
        .into_bytes(),
    );
    c.push(
        format!(
            "EHLO c\r\n{plain}MAIL FROM:<forged@local.example>\r\nMAIL FROM:<>\r\nMAIL FROM:<user@local.example>\r\n"
        )
        .into_bytes(),
    );
    c.push(format!("EHLO c\r\n{login}MAIL FROM:<user@local.example>\r\nRCPT TO:<u@local.example>\r\nDATA\r\nSubject: s\r\n\r\n.\r\n").into_bytes());
    c.push(b"EHLO c\r\nAUTH PLAIN\r\n*\r\nAUTH LOGIN\r\n=\r\n!!!\r\nAUTH CRAM-MD5\r\n".to_vec());
    c.push(
        [
            b"EHLO c\r\nMAIL FROM:<a@b.example>\r\n".to_vec(),
            vec![b'A'; 3000],
            b"\r\nRCPT TO:<u@local.example>\r\nDATA\r\n".to_vec(),
            vec![b'z'; 5000],
            b"\r\n.\r\n".to_vec(),
        ]
        .concat(),
    );
    c
}

/// Pieces that make interesting mutations.
const TOKENS: &[&[u8]] = &[
    b"\r\n",
    b"\r",
    b"\n",
    b".",
    b"\r\n.\r\n",
    b"\n.\n",
    b"..",
    b"DATA\r\n",
    b"RSET\r\n",
    b"QUIT\r\n",
    b"MAIL FROM:<x@y.example>\r\n",
    b"RCPT TO:<u@local.example>\r\n",
    b"AUTH PLAIN ",
    b"STARTTLS\r\n",
    b"Message-ID: <a@b>\r\n",
    b": ",
    b" ",
    b"\t",
    b"\0",
    b"\xff",
];

fn mutate(rng: &mut StdRng, corpus: &[Vec<u8>]) -> Vec<u8> {
    let mut input = corpus[rng.gen_range(0..corpus.len())].clone();
    for _ in 0..rng.gen_range(0..8) {
        let at = rng.gen_range(0..=input.len());
        match rng.gen_range(0..7) {
            0 if !input.is_empty() => {
                let i = rng.gen_range(0..input.len());
                input[i] ^= 1 << rng.gen_range(0..8);
            }
            1 => {
                let token = TOKENS[rng.gen_range(0..TOKENS.len())];
                input.splice(at..at, token.iter().copied());
            }
            2 => {
                let end = rng.gen_range(at..=input.len());
                input.drain(at..end.min(at + 64));
            }
            3 => {
                // Another session spliced in.
                let other = &corpus[rng.gen_range(0..corpus.len())];
                let from = rng.gen_range(0..other.len());
                input.splice(at..at, other[from..].iter().copied());
            }
            4 => {
                // A long run (over-long lines, big messages).
                let byte = *b"x.\r\n ".get(rng.gen_range(0..5)).unwrap_or(&b'x');
                input.splice(at..at, std::iter::repeat_n(byte, rng.gen_range(1..20_000)));
            }
            5 => input.truncate(at),
            _ => {
                let noise: Vec<u8> = (0..rng.gen_range(1..16)).map(|_| rng.gen()).collect();
                input.splice(at..at, noise);
            }
        }
    }
    input
}

/// The limits a session runs with: small ones, so that inputs reach them.
fn config(rng: &mut StdRng) -> SmtpConfig {
    SmtpConfig {
        hostname: "mx.example".into(),
        max_message_size: rng.gen_range(1..4096),
        max_recipients: rng.gen_range(1..4),
        max_data_line: rng.gen_range(1..2048),
        submission: rng.gen_bool(0.5),
        tls_available: rng.gen_bool(0.5),
        plaintext_auth_allowed: rng.gen_bool(0.5),
        max_errors: rng.gen_range(1..30),
        check_unauthenticated_sender: rng.gen_bool(0.5),
        local_addresses: vec!["192.0.2.25".parse().unwrap()],
        ..SmtpConfig::default()
    }
}

/// What a session did with one input: every reply, every message's data.
#[derive(PartialEq, Eq, Default)]
struct Run {
    replies: Vec<u8>,
    messages: Vec<Vec<u8>>,
}

impl std::fmt::Debug for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "replies:\n{}", String::from_utf8_lossy(&self.replies))?;
        for m in &self.messages {
            writeln!(f, "message:\n{}", String::from_utf8_lossy(m))?;
        }
        Ok(())
    }
}

/// A deterministic fake driver (the same answers whatever the pieces).
struct Driver {
    s: Session,
    run: Run,
    data: Vec<u8>,
    started: u64,
    bound: usize,
    max_message: usize,
}

fn verdict(a: &Address) -> RcptVerdict {
    match (a.local_part(), a.domain()) {
        ("nobody", _) => RcptVerdict::UnknownUser,
        ("tempfail", _) => RcptVerdict::TemporaryFailure("db\r\ndown".into()),
        ("fwd", _) => RcptVerdict::Forward { local: vec![a.clone()], remote: vec!["far@remote.example".into()] },
        (_, "local.example") => RcptVerdict::Local(vec![a.clone()]),
        _ => RcptVerdict::Remote,
    }
}

impl Driver {
    fn new(config: SmtpConfig) -> Driver {
        let max_message = config.max_message_size;
        let peer = PeerInfo { addr: "192.0.2.9:5000".parse().unwrap(), tls: false };
        let s = Session::new(Arc::new(config), peer);
        let replies = s.greeting();
        Driver { s, run: Run { replies, messages: Vec::new() }, data: Vec::new(), started: 0, bound: 0, max_message }
    }

    fn feed(&mut self, input: &[u8]) {
        // What the session may hold: the kept header section, a command or
        // SASL line, and the replies and data of this input.
        self.bound = 2 * HEADER_KEPT + 16 * 1024 + 64 * input.len();
        let mut out = self.s.handle(input);
        loop {
            assert!(self.s.buffered() <= self.bound, "the session holds {} octets", self.s.buffered());
            self.data.extend_from_slice(&self.s.take_message_data());
            // Our Received: and submission fields come on top of the data.
            assert!(self.data.len() <= self.max_message + 2048, "message data {} octets", self.data.len());
            self.run.replies.extend_from_slice(&out.reply);
            out = match out.next {
                Next::NeedInput | Next::Close => return,
                Next::CheckRecipient(a) => self.s.recipient_checked(verdict(&a)),
                // A function of the question only, so that every split of
                // the input gets the same answers.
                Next::CheckSender(c) => self.s.sender_checked(match (c.sender.local_part(), &c.authenticated) {
                    ("tempfail", _) => SenderVerdict::TemporaryFailure("directory\r\ndown".into()),
                    ("forged", Some(_)) => SenderVerdict::NotOwned,
                    (_, None) if c.sender.domain() == "local.example" => SenderVerdict::LocalNeedsAuthentication,
                    _ => SenderVerdict::Allowed,
                }),
                Next::Authenticate(c) => self.s.authenticated(match c.password.as_str() {
                    "secret" => AuthResult::Success,
                    "" => AuthResult::TemporaryFailure("directory\r\ndown".into()),
                    _ => AuthResult::Failure,
                }),
                Next::StartData => {
                    assert!(self.data.is_empty(), "message data before DATA");
                    self.started += 1;
                    self.s.data_started(match self.started % 5 {
                        0 => Err(StoreError::Busy("full".into())),
                        _ => Ok(DataStart { queue_id: QueueId(self.started), date: "DATE".into() }),
                    })
                }
                Next::Deliver(_) => {
                    self.run.messages.push(std::mem::take(&mut self.data));
                    // A Committed comes only from a store: the failures.
                    self.s.delivered(Err(if self.started.is_multiple_of(2) {
                        StoreError::Temporary("t".into())
                    } else {
                        StoreError::Permanent("p".into())
                    }))
                }
                Next::Refused { .. } => {
                    self.run.messages.push(std::mem::take(&mut self.data));
                    self.s.handle(&[])
                }
                Next::StartTls => self.s.tls_established(),
            };
        }
    }

    fn finish(mut self) -> Run {
        // Data of a message cut short (the client went away).
        if !self.data.is_empty() {
            self.run.messages.push(self.data);
        }
        for m in &mut self.run.messages {
            mask_message_id(m);
        }
        let _ = self.s.timeout();
        well_formed(&self.run.replies);
        self.run
    }
}

/// Blanks the random part of the Message-IDs we generate
/// (`<QUEUEID.RANDOM@host>`), which differs from run to run.
fn mask_message_id(message: &mut [u8]) {
    const FIELD: &[u8] = b"Message-ID: <";
    let mut at = 0;
    while let Some(p) = message[at..].windows(FIELD.len()).position(|w| w == FIELD) {
        let random = at + p + FIELD.len() + 13;
        if let Some(r) = message.get_mut(random..random + 16) {
            if r.iter().all(u8::is_ascii_hexdigit) {
                r.fill(b'0');
            }
        }
        at += p + FIELD.len();
    }
}

/// Every reply line: three digits, a space or a dash, text, CRLF.
fn well_formed(replies: &[u8]) {
    assert!(replies.is_empty() || replies.ends_with(b"\r\n"), "replies end mid-line");
    for line in replies.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
        let text = String::from_utf8_lossy(line);
        assert!(line.ends_with(b"\r"), "a line without CRLF: {text:?}");
        let line = &line[..line.len() - 1];
        assert!(!line.contains(&b'\r'), "a bare CR: {text:?}");
        assert!(line.len() >= 4, "a short line: {text:?}");
        assert!(
            line[..3].iter().all(u8::is_ascii_digit) && matches!(line[3], b' ' | b'-'),
            "not a reply line: {text:?}"
        );
    }
}

#[test]
fn fuzz_sessions() {
    let secs = std::env::var("HAMAIL_FUZZ_SECS").ok().and_then(|v| v.parse().ok()).unwrap_or(10);
    let seed = std::env::var("HAMAIL_FUZZ_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or(0x5eed_2026_u64);
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut rng = StdRng::seed_from_u64(seed);
    let corpus = corpus();
    let mut runs = 0u64;
    while runs < 50 || Instant::now() < deadline {
        let input = mutate(&mut rng, &corpus);
        let config = config(&mut rng);
        let mut whole = Driver::new(config.clone());
        whole.feed(&input);
        let whole = whole.finish();
        let mut pieces = Driver::new(config);
        let mut rest = &input[..];
        while !rest.is_empty() {
            let most = if rng.gen_bool(0.5) { 8 } else { 4096 };
            let n = rng.gen_range(1..=rest.len().min(most));
            pieces.feed(&rest[..n]);
            rest = &rest[n..];
        }
        let pieces = pieces.finish();
        // STARTTLS forgets what followed it in the same read (RFC 3207,
        // CVE-2011-0411): there the pieces matter, on purpose.
        let tls = |run: &Run| run.replies.windows(9).any(|w| w == b"220 2.0.0");
        if !tls(&whole) && !tls(&pieces) {
            assert_eq!(pieces, whole, "seed {seed}, run {runs}, input {:?}", String::from_utf8_lossy(&input));
        }
        runs += 1;
    }
    eprintln!("{runs} fuzzed sessions in {secs} s (seed {seed})");
}
