//! POP3 clients that try to make the real server hold memory or a session
//! forever: a pipelined RETR flood of a large message that is never read, a
//! client trickling bytes, a client that stops reading; and the exact bytes
//! of RETR and TOP for bodies SMTP would never store (bare LFs, bare CRs).
//!
//! Memory is read from /proc/<pid>/status of the running `hamail`.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;

const USER: &str = "alice@example.org";
const PASSWORD: &str = "alice-pw";
const MB: u64 = 1024 * 1024;
/// The server's resident memory must stay under this whatever the client
/// does: the idle server is ~26 MB, the SMTP receipt of a 20 MB message
/// may leave some of its buffers to the allocator, and a RETR in flight
/// holds its chunk buffers (~200 KiB).
const RSS_LIMIT: u64 = 100 * MB;

/// Writes a config whose `[server]` and `[pop3]` sections have these
/// extra lines, in `dir`.
fn write_pop3_config(dir: &Path, server_extra: &str, pop3_extra: &str) {
    let text = format!(
        "[server]\nhostname = \"mx.test\"\ndata_dir = \"{}\"\nauth_failure_delay_ms = 200\n{server_extra}\n\n\
         [smtp]\nlisten = [\"127.0.0.1:0\"]\nsubmission = []\n\n\
         [pop3]\nlisten = [\"127.0.0.1:0\"]\n{pop3_extra}\n\n\
         [relay]\nenabled = false\n",
        dir.join("data").display(),
    );
    std::fs::write(dir.join("hamail.toml"), text).expect("write config");
}

/// A server with `pop3_extra` in its `[pop3]` section and the user alice.
fn start_pop3(pop3_extra: &str) -> (Server, tempfile::TempDir) {
    let tmp = tempfile::tempdir().expect("tempdir");
    write_pop3_config(tmp.path(), "", pop3_extra);
    let s = start_in(tmp.path(), "");
    s.add_domain("example.org");
    s.add_user(USER, PASSWORD);
    (s, tmp)
}

/// The resident and peak memory of the server, in bytes.
fn memory(s: &Server) -> (u64, u64) {
    let pid = s.child.as_ref().expect("running").id();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    let field = |name: &str| -> u64 {
        let line = status.lines().find(|l| l.starts_with(name)).unwrap_or_else(|| panic!("{name} in status"));
        let kb: u64 = line.split_whitespace().nth(1).expect("value").parse().expect("number");
        kb * 1024
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// The highest resident memory seen while sampling for `period`.
fn peak_rss_over(s: &Server, period: Duration) -> u64 {
    let until = Instant::now() + period;
    let mut peak = 0;
    while Instant::now() < until {
        peak = peak.max(memory(s).0);
        std::thread::sleep(Duration::from_millis(25));
    }
    peak
}

/// Message content of about `size` octets with CRLF lines, every seventh
/// of which starts with a dot.
fn content(size: usize) -> Vec<u8> {
    let mut out = b"From: flood@elsewhere.test\r\nSubject: large\r\n\r\n".to_vec();
    let mut i = 0u64;
    while out.len() < size {
        let dot = if i.is_multiple_of(7) { "." } else { "" };
        out.extend_from_slice(format!("{dot}line {i:08} {}\r\n", "x".repeat(60)).as_bytes());
        i += 1;
    }
    out
}

/// Delivers `content` to alice over SMTP (port 25: no login needed).
fn deliver(s: &Server, content: &[u8]) {
    let mut c = Line::connect(s.smtp);
    assert!(c.reply().starts_with("220"));
    for (command, code) in [
        ("EHLO client.test\r\n", "250"),
        ("MAIL FROM:<flood@elsewhere.test>\r\n", "250"),
        (&format!("RCPT TO:<{USER}>\r\n"), "250"),
        ("DATA\r\n", "354"),
    ] {
        c.send(command);
        let reply = c.reply();
        assert!(reply.starts_with(code), "{command:?}: {reply}");
    }
    // SMTP dot-stuffing (RFC 5321 4.5.2) of the CRLF lines.
    let mut data = Vec::with_capacity(content.len() + content.len() / 32);
    for line in content.split_inclusive(|&b| b == b'\n') {
        if line.starts_with(b".") {
            data.push(b'.');
        }
        data.extend_from_slice(line);
    }
    data.extend_from_slice(b".\r\n");
    c.send_bytes(&data);
    let reply = c.reply();
    assert!(reply.starts_with("250"), "end of DATA: {reply}");
    c.send("QUIT\r\n");
}

/// A POP3 client that reads replies as bytes.
struct Pop3 {
    stream: TcpStream,
    reader: BufReader<TcpStream>,
}

impl Pop3 {
    fn connect(s: &Server) -> Pop3 {
        let stream = TcpStream::connect(s.pop3).expect("connect");
        stream.set_read_timeout(Some(Duration::from_secs(30))).expect("timeout");
        let reader = BufReader::new(stream.try_clone().expect("clone"));
        Pop3 { stream, reader }
    }
    fn send(&mut self, data: &str) {
        self.stream.write_all(data.as_bytes()).expect("send");
    }
    /// One reply line, without its CRLF.
    fn line(&mut self) -> String {
        let mut l = String::new();
        self.reader.read_line(&mut l).expect("read");
        l.trim_end_matches(['\r', '\n']).to_string()
    }
}

/// A POP3 connection logged in as alice; `Err` with the answer to PASS if
/// it was not `+OK`.
fn login(s: &Server) -> Result<Pop3, String> {
    let mut p = Pop3::connect(s);
    assert!(p.line().starts_with("+OK"));
    p.send(&format!("USER {USER}\r\nPASS {PASSWORD}\r\n"));
    assert_eq!(p.line(), "+OK send PASS");
    let pass = p.line();
    if pass.starts_with("+OK") {
        Ok(p)
    } else {
        Err(pass)
    }
}

/// Reads one multi-line answer: its first line, and its payload as sent
/// (stuffed, with its CRLFs) without the terminator.
fn multi_line(p: &mut Pop3) -> (String, Vec<u8>) {
    let first = p.line();
    let mut payload = Vec::new();
    if !first.starts_with("+OK") {
        return (first, payload);
    }
    loop {
        let start = payload.len();
        let n = p.reader.read_until(b'\n', &mut payload).expect("read");
        assert!(n > 0, "connection closed inside a multi-line answer");
        if &payload[start..] == b".\r\n" {
            payload.truncate(start);
            return (first, payload);
        }
    }
}

/// The payload of a multi-line answer without its byte-stuffing.
fn unstuffed(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len());
    for line in payload.split_inclusive(|&b| b == b'\n') {
        out.extend_from_slice(if line.starts_with(b"..") { &line[1..] } else { line });
    }
    out
}

#[test]
fn pipelined_retr_flood_of_a_large_message_stays_bounded() {
    let (s, _tmp) = start_pop3("idle_timeout_secs = 60");
    let message = content(20 * MB as usize);
    deliver(&s, &message);
    let (after_smtp, hwm_smtp) = memory(&s);

    // A hundred RETRs of 20 MB in one write, never read.
    let mut flood = login(&s).expect("login");
    flood.send(&"RETR 1\r\n".repeat(100));
    let during = peak_rss_over(&s, Duration::from_secs(4));
    drop(flood);
    let after_close = peak_rss_over(&s, Duration::from_secs(2));
    eprintln!(
        "VmRSS: {} MB after SMTP (VmHWM {} MB), peak {} MB during the flood, peak {} MB after close",
        after_smtp / MB,
        hwm_smtp / MB,
        during / MB,
        after_close / MB
    );
    assert!(during < RSS_LIMIT, "{} MB during the flood", during / MB);
    assert!(after_close < RSS_LIMIT, "{} MB after the client closed", after_close / MB);

    // The flooding session has ended: its maildrop lock is free again.
    let mut reader = eventually(Duration::from_secs(10), "the flood session to end", || login(&s).ok());

    // A client that reads gets every copy, whole and identical.
    let copies = 10;
    reader.send(&"RETR 1\r\n".repeat(copies));
    let return_path = b"Return-Path: <flood@elsewhere.test>\r\n";
    let mut first: Option<Vec<u8>> = None;
    for i in 0..copies {
        let (ok, payload) = multi_line(&mut reader);
        let message_out = unstuffed(&payload);
        assert_eq!(ok, format!("+OK {} octets", message_out.len()), "copy {i}");
        assert!(message_out.starts_with(return_path), "copy {i}");
        // After the Return-Path and the server's Received: line, the
        // content as sent.
        assert!(message_out.ends_with(&message), "copy {i} differs from what was sent");
        match &first {
            None => first = Some(payload),
            Some(f) => assert!(*f == payload, "copy {i} differs from copy 0"),
        }
    }
    reader.send("QUIT\r\n");
    assert!(reader.line().starts_with("+OK"));
    let (rss, _) = memory(&s);
    eprintln!("VmRSS: {} MB after {copies} copies read", rss / MB);
    assert!(rss < RSS_LIMIT, "{} MB after the copies", rss / MB);
}

/// Reads lines of `stream` on a thread, each with when it came; `None` at
/// the end of the connection.
fn lines_with_time(stream: &TcpStream) -> mpsc::Receiver<(Instant, Option<String>)> {
    let (tx, rx) = mpsc::channel();
    let mut reader = BufReader::new(stream.try_clone().expect("clone"));
    std::thread::spawn(move || loop {
        let mut line = String::new();
        let got = match reader.read_line(&mut line) {
            Ok(0) | Err(_) => None,
            Ok(_) => Some(line.trim_end().to_string()),
        };
        let end = got.is_none();
        if tx.send((Instant::now(), got)).is_err() || end {
            return;
        }
    });
    rx
}

#[test]
fn slowloris_is_logged_out_from_its_last_complete_command() {
    let (s, _tmp) = start_pop3("idle_timeout_secs = 2");
    let mut c = login(&s).expect("login");
    let lines = lines_with_time(&c.stream);
    // Complete commands keep the session alive past the timeout...
    let mut last_command = Instant::now();
    for _ in 0..6 {
        std::thread::sleep(Duration::from_millis(500));
        c.send("NOOP\r\n");
        let (at, line) = lines.recv_timeout(Duration::from_secs(5)).expect("an answer");
        assert_eq!(line.as_deref(), Some("+OK"));
        last_command = at;
    }
    // ... bytes that never complete one do not.
    let mut stream = c.stream.try_clone().expect("clone");
    let trickle = std::thread::spawn(move || {
        for byte in b"NOOP and more and more and more and more and more".iter().cycle().take(60) {
            if stream.write_all(&[*byte]).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    });
    let (at, line) = lines.recv_timeout(Duration::from_secs(10)).expect("logged out");
    assert_eq!(line.as_deref(), Some("-ERR autologout; idle for too long"));
    let (_, end) = lines.recv_timeout(Duration::from_secs(5)).expect("closed");
    assert_eq!(end, None, "the connection ends");
    let idle = at - last_command;
    eprintln!("logged out {} ms after the last complete command", idle.as_millis());
    assert!(idle >= Duration::from_millis(1900) && idle < Duration::from_secs(5), "{idle:?}");
    trickle.join().unwrap();
}

#[test]
fn client_that_stops_reading_is_cut_at_the_idle_timeout() {
    let (s, _tmp) = start_pop3("idle_timeout_secs = 2");
    // More than the loopback socket buffers can take.
    let message = content(16 * MB as usize);
    deliver(&s, &message);
    let mut stuck = login(&s).expect("login");
    let started = Instant::now();
    stuck.send("RETR 1\r\n");
    // The session ends without the client reading: the lock is free again.
    eventually(Duration::from_secs(15), "the stuck session to be cut", || login(&s).ok());
    let cut_after = started.elapsed();
    eprintln!("a client not reading was cut after {} ms", cut_after.as_millis());
    assert!(cut_after >= Duration::from_millis(1500), "{cut_after:?}");
    // What it gets is a part of the answer and no terminator.
    let mut rest = Vec::new();
    let _ = stuck.reader.read_to_end(&mut rest);
    assert!(rest.len() < message.len(), "{} octets", rest.len());
    assert!(!rest.ends_with(b"\r\n.\r\n"));
}

/// A server whose maildrop of alice holds `body`, put straight into the
/// store before it starts: SMTP refuses bare CRs and LFs, but a store may
/// hold them (mail from older versions, or other tools), and POP3 must
/// still send proper lines.
fn seeded(body: &[u8], server_extra: &str) -> (Server, tempfile::TempDir) {
    use hamail_store::{Address, Directory, Domain, Incoming, LocalStore, MailStore, StoreOptions};
    let tmp = tempfile::tempdir().expect("tempdir");
    write_pop3_config(tmp.path(), server_extra, "");
    let text = std::fs::read_to_string(tmp.path().join("hamail.toml")).unwrap();
    let config = hamail_server::Config::parse(&text, "hamail.toml").expect("config");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let store = LocalStore::open(&config.store_dir(), StoreOptions::default()).expect("store");
        store.add_domain(&Domain::parse("example.org").unwrap()).await.unwrap();
        let user = Address::parse(USER).unwrap();
        store.add_user(&user, PASSWORD).await.unwrap();
        let incoming = Incoming {
            return_path: Some("sender@elsewhere.test".into()),
            local: vec![user],
            remote: Vec::new(),
            body: body.to_vec().into(),
            queue_id: store.next_queue_id().await.unwrap(),
            resend: None,
        };
        store.accept(incoming).await.expect("accept");
    });
    drop(runtime);
    let s = start_in(tmp.path(), "");
    (s, tmp)
}

#[test]
fn retr_and_top_of_bare_line_ends_and_dot_lines_are_exact() {
    let body = b"Subject: dots\nX-A: 1\r\n\r\n.\n..two\r. x\rmiddle\r\n.\r\nlast";
    let (s, _tmp) = seeded(body, "");
    // On the wire: every line end CRLF, every leading dot doubled, a CRLF
    // after the last line.
    let wire: &[u8] = b"Return-Path: <sender@elsewhere.test>\r\nSubject: dots\r\nX-A: 1\r\n\r\n..\r\n...two\r\n.. x\r\nmiddle\r\n..\r\nlast\r\n";
    let mut p = login(&s).expect("login");
    p.send("RETR 1\r\n");
    let (ok, payload) = multi_line(&mut p);
    assert!(ok.starts_with("+OK"), "{ok}");
    assert_eq!(String::from_utf8_lossy(&payload), String::from_utf8_lossy(wire));
    // RFC 1939 7: any non-negative number of lines; more than the message
    // has is all of it.
    p.send("TOP 1 99999999999999999999\r\n");
    let (ok, top_all) = multi_line(&mut p);
    assert_eq!(ok, "+OK top of message follows");
    assert_eq!(top_all, wire);
    p.send("TOP 1 0\r\nTOP 1 2\r\nTOP 1 -1\r\nTOP 1 x\r\n");
    let (_, top0) = multi_line(&mut p);
    assert_eq!(top0, b"Return-Path: <sender@elsewhere.test>\r\nSubject: dots\r\nX-A: 1\r\n\r\n");
    let (_, top2) = multi_line(&mut p);
    assert_eq!(top2, b"Return-Path: <sender@elsewhere.test>\r\nSubject: dots\r\nX-A: 1\r\n\r\n..\r\n...two\r\n");
    assert_eq!(p.line(), "-ERR syntax error");
    assert_eq!(p.line(), "-ERR syntax error");
    p.send("QUIT\r\n");
    assert!(p.line().starts_with("+OK"));

    // Python's poplib reads the same message, un-stuffed.
    let port = s.pop3.port().to_string();
    let v = py("pop3_fetch.py", &["127.0.0.1", &port, USER, PASSWORD]);
    assert_eq!(v["ok"], true, "{v}");
    let got = hex::decode(v["messages"][0].as_str().unwrap()).unwrap();
    assert_eq!(String::from_utf8_lossy(&got), String::from_utf8_lossy(&unstuffed(wire)));
}

#[test]
fn retr_without_memory_for_its_buffers_is_a_temporary_refusal() {
    // No budget at all: not even one RETR's buffers.
    let (s, _tmp) = seeded(b"Subject: x\r\n\r\nbody\r\n", "memory_budget_mb = 0");
    let mut p = login(&s).expect("login");
    p.send("RETR 1\r\nTOP 1 0\r\nLIST 1\r\n");
    assert_eq!(p.line(), "-ERR [SYS/TEMP] server busy, try again");
    assert_eq!(p.line(), "-ERR [SYS/TEMP] server busy, try again");
    assert!(p.line().starts_with("+OK 1 "), "the session goes on");
    p.send("QUIT\r\n");
    assert!(p.line().starts_with("+OK"));
}

#[test]
fn body_file_cut_short_mid_answer_closes_the_connection() {
    // Larger than the socket buffers, so that most of it is still to be
    // read from the file when the file is cut.
    let body = content(16 * MB as usize);
    let (s, _tmp) = seeded(&body, "");
    let mut p = login(&s).expect("login");
    p.send("RETR 1\r\nNOOP\r\n");
    assert!(p.line().starts_with("+OK"));
    let bodies = s.dir.join("data").join("store").join("bodies");
    let file = std::fs::read_dir(&bodies).expect("bodies/").next().expect("one body").expect("entry").path();
    std::fs::OpenOptions::new().write(true).open(&file).expect("open body").set_len(1000).expect("truncate");
    // A multi-line answer cannot be taken back: the client gets a part of
    // it, no terminator and no answer to NOOP, and the connection ends.
    let mut rest = Vec::new();
    let _ = p.reader.read_to_end(&mut rest);
    assert!(rest.len() < body.len(), "{} octets", rest.len());
    assert!(!rest.ends_with(b"\r\n.\r\n") && !rest.ends_with(b"+OK\r\n"));
    eventually(Duration::from_secs(10), "the session to end", || login(&s).ok());
}
