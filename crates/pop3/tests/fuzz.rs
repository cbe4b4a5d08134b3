//! A bounded random fuzzer of the POP3 session: mutations of real sessions
//! (USER/PASS, AUTH PLAIN, pipelined RETR/TOP/DELE/UIDL/LIST, long lines,
//! STLS), fed in random chunks to a driver that answers every step with a
//! random outcome. It asserts that the session never panics, that every
//! reply is well formed (`+OK`, `-ERR` or `+ ` first, CRLF lines only), that
//! a body never carries a line that reads as the terminator, and that the
//! heap the session makes grow stays bounded whatever the input.
//!
//! Runs ~10 s; longer with `HAMAIL_FUZZ_SECS=600 cargo test -p hamail-pop3
//! --test fuzz --release`. `HAMAIL_FUZZ_SEED` picks another sequence; a
//! failure names the seed of its case.

use std::alloc::{GlobalAlloc, Layout, System};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use hamail_pop3::{AuthResult, BodyOpened, MaildropResult, Next, PeerInfo, Pop3Config, Session, Stuffer};
use hamail_store::{Address, BodyHash, EntryId, MailboxEntry, QueueId, StoreError};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Counts the heap in use, and its peak since the last [`reset_peak`].
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc(layout);
        if !p.is_null() {
            let now = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, layout: Layout) {
        System.dealloc(p, layout);
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn reset_peak() -> usize {
    let live = LIVE.load(Ordering::Relaxed);
    PEAK.store(live, Ordering::Relaxed);
    live
}

/// What one session may add to the heap, replies included: the input the
/// driver gives at once (at most [`MAX_CHUNK`]), the replies up to
/// `reply_flush` plus one answer, the maildrop. A session that kept every
/// reply of a pipeline, or every input line, would pass it by far.
const SESSION_HEAP_LIMIT: usize = 512 * 1024;
/// The real driver reads 16 KiB at a time.
const MAX_CHUNK: usize = 16 * 1024;
const MESSAGES: usize = 60;

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Real sessions, one command a line, as clients send them.
fn corpus() -> Vec<Vec<u8>> {
    let plain = b64(b"\0alice@example.org\0secret");
    let mut retr_pipeline = String::from("USER alice@example.org\r\nPASS secret\r\n");
    for i in 1..=20 {
        retr_pipeline.push_str(&format!("RETR {i}\r\nTOP {i} 3\r\nDELE {i}\r\n"));
    }
    retr_pipeline.push_str("QUIT\r\n");
    let scripts = [
        "CAPA\r\nUSER alice@example.org\r\nPASS secret\r\nSTAT\r\nLIST\r\nUIDL\r\nRETR 1\r\nTOP 1 0\r\nDELE 1\r\nQUIT\r\n".to_string(),
        format!("AUTH PLAIN {plain}\r\nSTAT\r\nLIST 2\r\nUIDL 3\r\nRETR 2\r\nRSET\r\nNOOP\r\nQUIT\r\n"),
        format!("AUTH PLAIN\r\n{plain}\r\nLIST\r\nTOP 2 99999999999999999999\r\nQUIT\r\n"),
        "AUTH\r\nAUTH PLAIN\r\n*\r\nUSER alice@example.org\r\nPASS wrong\r\nUSER alice@example.org\r\nPASS secret\r\nUIDL\r\nQUIT\r\n".to_string(),
        "STLS\r\nUSER evil\r\nPASS evil\r\nCAPA\r\nUSER alice@example.org\r\nPASS secret\r\nSTAT\r\nQUIT\r\n".to_string(),
        format!("USER {}\r\nUSER alice@example.org\r\nPASS {}\r\nNOOP\r\n", "a".repeat(600), "p".repeat(2000)),
        "user alice@example.org\npass secret\nlist\nretr 3\ntop 3 1\ndele 3\nrset\nquit\n".to_string(),
        retr_pipeline,
        format!("USER alice@example.org\r\nPASS secret\r\n{}QUIT\r\n", "LIST\r\n".repeat(2000)),
    ];
    scripts.into_iter().map(String::into_bytes).collect()
}

/// Words a mutation may put in a line.
const WORDS: &[&str] = &[
    "USER",
    "PASS",
    "AUTH",
    "PLAIN",
    "STLS",
    "CAPA",
    "STAT",
    "LIST",
    "UIDL",
    "RETR",
    "TOP",
    "DELE",
    "RSET",
    "NOOP",
    "QUIT",
    "APOP",
    "1",
    "0",
    "-1",
    "99999999999999999999",
    "=",
    "*",
    "x",
    "",
    "alice@example.org",
    "secret",
];

/// A mutated copy of one corpus entry.
fn mutate(rng: &mut StdRng, seed: &[u8]) -> Vec<u8> {
    let mut lines: Vec<Vec<u8>> = seed.split_inclusive(|&b| b == b'\n').map(<[u8]>::to_vec).collect();
    for _ in 0..rng.gen_range(0..8) {
        if lines.is_empty() {
            lines.push(b"NOOP\r\n".to_vec());
        }
        let i = rng.gen_range(0..lines.len());
        match rng.gen_range(0..10) {
            0 => {
                let line = lines[i].clone();
                let times = if rng.gen_bool(0.1) { rng.gen_range(100..2000) } else { rng.gen_range(1..4) };
                for _ in 0..times {
                    lines.insert(i, line.clone());
                }
            }
            1 => {
                lines.remove(i);
            }
            2 => {
                let j = rng.gen_range(0..lines.len());
                lines.swap(i, j);
            }
            3 => {
                let words: Vec<&str> = (0..rng.gen_range(1..4)).map(|_| WORDS[rng.gen_range(0..WORDS.len())]).collect();
                lines.insert(i, format!("{}\r\n", words.join(" ")).into_bytes());
            }
            4 => {
                let at = rng.gen_range(0..lines[i].len().max(1));
                if let Some(b) = lines[i].get_mut(at) {
                    *b = rng.gen();
                }
            }
            5 => {
                let random: Vec<u8> = (0..rng.gen_range(0..64)).map(|_| rng.gen()).collect();
                lines.insert(i, random);
            }
            6 => {
                let long = vec![b'A' + rng.gen_range(0..26); rng.gen_range(400..3000)];
                lines.insert(i, long);
            }
            7 => {
                // A line end cut off or made bare.
                let line = &mut lines[i];
                if line.ends_with(b"\r\n") {
                    line.remove(line.len() - if rng.gen() { 1 } else { 2 });
                }
            }
            8 => {
                let count = rng.gen_range(0..10).to_string();
                lines.insert(i, format!("TOP {} {count}\r\n", rng.gen_range(0..MESSAGES + 2)).into_bytes());
            }
            _ => {
                let n = rng.gen_range(0..MESSAGES + 2);
                let verb = ["RETR", "DELE", "LIST", "UIDL"][rng.gen_range(0..4)];
                lines.insert(i, format!("{verb} {n}\r\n").into_bytes());
            }
        }
    }
    let mut input: Vec<u8> = lines.concat();
    input.truncate(256 * 1024);
    input
}

/// Bodies with everything a store may hold: bare CRs and LFs, dot lines,
/// no final line end.
fn bodies(rng: &mut StdRng) -> Vec<Vec<u8>> {
    let alphabet = b"\r\n.\r\n.abcdef: ";
    (0..MESSAGES)
        .map(|_| (0..rng.gen_range(0..400)).map(|_| alphabet[rng.gen_range(0..alphabet.len())]).collect())
        .collect()
}

fn entries(bodies: &[Vec<u8>]) -> Vec<MailboxEntry> {
    bodies
        .iter()
        .enumerate()
        .map(|(i, body)| {
            let mut e = MailboxEntry {
                id: EntryId(i as u64 * 3 + 1),
                body: BodyHash::of(body),
                return_path: (i % 2 == 0).then(|| "bob@example.net".to_string()),
                size: 0,
                received_at: 1_700_000_000,
                queue_id: QueueId(i as u64),
            };
            e.size = (e.return_path_line().len() + body.len()) as u64;
            e
        })
        .collect()
}

/// A reply of the session: empty, or `+OK`/`-ERR`/`+ ` first, and lines
/// that all end with CRLF (no CR or LF of their own).
fn check_reply(reply: &[u8]) {
    if reply.is_empty() {
        return;
    }
    assert!(
        reply.starts_with(b"+OK") || reply.starts_with(b"-ERR") || reply.starts_with(b"+ "),
        "reply starts with {:?}",
        String::from_utf8_lossy(&reply[..reply.len().min(40)])
    );
    check_crlf_lines(reply);
}

fn check_crlf_lines(bytes: &[u8]) {
    assert!(bytes.is_empty() || bytes.ends_with(b"\r\n"), "not CRLF-terminated");
    for (i, &b) in bytes.iter().enumerate() {
        match b {
            b'\r' => assert_eq!(bytes.get(i + 1), Some(&b'\n'), "bare CR at {i}"),
            b'\n' => assert!(i > 0 && bytes[i - 1] == b'\r', "bare LF at {i}"),
            _ => {}
        }
    }
}

/// One session: `input` in random chunks, every step answered at random.
/// Returns the most the heap grew meanwhile.
fn run_case(rng: &mut StdRng, input: &[u8], bodies: &[Vec<u8>]) -> usize {
    let entries = entries(bodies);
    let user = Address::parse("alice@example.org").unwrap();
    let config = Pop3Config {
        plaintext_auth_allowed: rng.gen_bool(0.8),
        tls_available: rng.gen_bool(0.8),
        ..Pop3Config::default()
    };
    let peer = PeerInfo { addr: "127.0.0.1:50000".parse().unwrap(), tls: rng.gen_bool(0.2) };
    let baseline = reset_peak();
    let mut session = Session::new(Arc::new(config), peer);
    let mut opened: Option<usize> = None;
    let mut rest = input;
    let mut closed = false;
    let mut most = 0;
    while !rest.is_empty() && !closed {
        let size = rng.gen_range(1..=rest.len().min(MAX_CHUNK));
        let (chunk, tail) = rest.split_at(size);
        rest = tail;
        let mut out = session.handle(chunk);
        loop {
            check_reply(&out.reply);
            out = match out.next {
                Next::NeedInput => break,
                Next::Close => {
                    assert_eq!(session.handle(b"NOOP\r\n").next, Next::Close);
                    closed = true;
                    break;
                }
                Next::Flush => session.handle(b""),
                Next::Authenticate(_) => session.authenticated(match rng.gen_range(0..4) {
                    0 => AuthResult::Failure,
                    1 => AuthResult::TemporaryFailure("directory\r\ndown".into()),
                    _ => AuthResult::Success(user.clone()),
                }),
                Next::OpenMaildrop(_) => session.maildrop_opened(match rng.gen_range(0..6) {
                    0 => MaildropResult::InUse,
                    1 => MaildropResult::Failed(StoreError::Temporary("disk".into())),
                    _ => MaildropResult::Opened(entries.clone()),
                }),
                Next::OpenBody(hash) => {
                    let index = entries.iter().position(|e| e.body == hash).expect("a body of the maildrop");
                    let result = match rng.gen_range(0..8) {
                        0 => BodyOpened::Busy,
                        1 => BodyOpened::Failed(StoreError::Permanent("gone".into())),
                        _ => BodyOpened::Ready,
                    };
                    if matches!(result, BodyOpened::Ready) {
                        opened = Some(index);
                    }
                    session.body_opened(result)
                }
                Next::SendBody { top } => {
                    let index = opened.take().expect("SendBody after a body was opened");
                    send_body(rng, &bodies[index], top);
                    if rng.gen_ratio(1, 50) {
                        let out = session.body_sent(Err(StoreError::Internal("truncated".into())));
                        assert_eq!((out.reply.len(), &out.next), (0, &Next::Close));
                        out
                    } else {
                        session.body_sent(Ok(()))
                    }
                }
                Next::Update { .. } => session.updated(if rng.gen_ratio(1, 5) {
                    Err(StoreError::Temporary("disk".into()))
                } else {
                    Ok(())
                }),
                Next::StartTls => session.tls_established(),
            };
        }
        let grown = PEAK.load(Ordering::Relaxed).saturating_sub(baseline);
        assert!(grown < SESSION_HEAP_LIMIT, "the session made the heap grow by {grown} octets");
        most = most.max(grown);
    }
    most
}

/// Stuffs `body` in random pieces as the driver does; the payload must be
/// CRLF lines, none of them a lone `.` (which would end the answer early).
fn send_body(rng: &mut StdRng, body: &[u8], top: Option<usize>) {
    let mut stuffer = Stuffer::new(top);
    let mut payload = Vec::new();
    let mut rest = body;
    while !rest.is_empty() && !stuffer.is_done() {
        let (piece, tail) = rest.split_at(rng.gen_range(1..=rest.len()));
        stuffer.feed(piece, &mut payload);
        rest = tail;
    }
    stuffer.finish(&mut payload);
    check_crlf_lines(&payload);
    assert!(
        !payload.starts_with(b".\r\n") && !payload.windows(5).any(|w| w == b"\r\n.\r\n"),
        "a terminator inside a body"
    );
}

#[test]
fn random_sessions_never_panic_and_stay_bounded() {
    let secs: u64 = std::env::var("HAMAIL_FUZZ_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(10);
    let base: u64 = std::env::var("HAMAIL_FUZZ_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(1939);
    let corpus = corpus();
    let until = Instant::now() + Duration::from_secs(secs);
    let mut cases = 0u64;
    let mut most_grown = 0;
    while Instant::now() < until {
        let seed = base.wrapping_add(cases);
        let mut rng = StdRng::seed_from_u64(seed);
        let pick = rng.gen_range(0..corpus.len());
        let input = mutate(&mut rng, &corpus[pick]);
        let bodies = bodies(&mut rng);
        let result = std::panic::catch_unwind(AssertUnwindSafe(|| run_case(&mut rng, &input, &bodies)));
        let panic = match result {
            Ok(grown) => {
                most_grown = most_grown.max(grown);
                None
            }
            Err(panic) => Some(panic),
        };
        if let Some(panic) = panic {
            let why = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            panic!(
                "case with HAMAIL_FUZZ_SEED={seed} failed: {why}\ninput: {:?}",
                String::from_utf8_lossy(&input[..input.len().min(2000)])
            );
        }
        cases += 1;
    }
    eprintln!("{cases} random sessions in {secs} s; the heap grew by {most_grown} octets at most");
    assert!(cases > 0);
}
