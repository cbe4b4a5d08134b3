//! SMTP under abuse, against the real binary: many large messages at once
//! (memory stays bounded: message data streams to the store's spool), a
//! command line trickled in byte by byte (cut at the idle timeout), a DATA
//! phase that never ends (cut at `data_timeout_secs`), a client that
//! pipelines commands and never reads the replies (cut once a reply waits
//! `idle_timeout_secs` for it), and messages refused after their data
//! (logged, counted, no file left in the store's `tmp/`).

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

fn tmp_dir(s: &Server) -> PathBuf {
    s.dir.join("data/store/tmp")
}

fn tmp_files(s: &Server) -> usize {
    std::fs::read_dir(tmp_dir(s)).map(|d| d.count()).unwrap_or(0)
}

fn server(extra: &str) -> Server {
    let s = start(extra);
    s.add_domain("example.org");
    s.add_user("u@example.org", "pw");
    s
}

/// An SMTP client of whole replies.
struct Client {
    w: TcpStream,
    r: BufReader<TcpStream>,
}

impl Client {
    fn connect(addr: SocketAddr) -> Client {
        let w = TcpStream::connect(addr).expect("connect");
        w.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
        let r = BufReader::new(w.try_clone().unwrap());
        let mut c = Client { w, r };
        assert!(c.reply().starts_with("220"));
        c
    }
    /// The last line of the next reply ("" at end of stream).
    fn reply(&mut self) -> String {
        loop {
            let mut l = String::new();
            if self.r.read_line(&mut l).unwrap_or(0) == 0 {
                return String::new();
            }
            if l.len() < 4 || l.as_bytes()[3] != b'-' {
                return l.trim_end().to_string();
            }
        }
    }
    fn command(&mut self, line: &str) -> String {
        self.w.write_all(format!("{line}\r\n").as_bytes()).expect("send");
        self.reply()
    }
    /// EHLO, MAIL, RCPT and DATA, each answered as expected.
    fn start_data(&mut self) {
        assert!(self.command("EHLO client.test").starts_with("250"));
        assert!(self.command("MAIL FROM:<sender@elsewhere.test>").starts_with("250"));
        assert!(self.command("RCPT TO:<u@example.org>").starts_with("250"));
        let r = self.command("DATA");
        assert!(r.starts_with("354"), "{r}");
    }
}

/// Sends `pieces` one every 200 ms (the attack's own pace) on `c`'s
/// connection, until they run out or the server closes it.
fn trickle(c: &Client, pieces: impl Iterator<Item = Vec<u8>> + Send + 'static) -> std::thread::JoinHandle<()> {
    let mut w = c.w.try_clone().unwrap();
    std::thread::spawn(move || {
        for piece in pieces {
            if w.write_all(&piece).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    })
}

/// `size` octets of CRLF lines (no line starts with a dot).
fn payload(size: usize) -> Vec<u8> {
    let line = format!("{}\r\n", "abcdefghij".repeat(7));
    line.as_bytes().iter().copied().cycle().take(size / line.len() * line.len()).collect()
}

#[test]
fn a_hundred_concurrent_20_mb_messages_in_bounded_memory_delivered_whole() {
    const CLIENTS: usize = 100;
    const SIZE: usize = 20_000_000;
    let s = server("max_connections = 200\nmax_message_size = 26214400");
    let pid = s.child.as_ref().expect("running").id();
    let body = Arc::new(payload(SIZE));
    let threads: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let body = body.clone();
            let addr = s.smtp;
            std::thread::spawn(move || {
                let mut c = Client::connect(addr);
                c.start_data();
                c.w.write_all(format!("Subject: big {i:03}\r\n\r\n").as_bytes()).unwrap();
                c.w.write_all(&body).unwrap();
                c.w.write_all(b".\r\n").unwrap();
                let r = c.reply();
                let _ = c.w.write_all(b"QUIT\r\n");
                r
            })
        })
        .collect();
    for t in threads {
        let r = t.join().expect("client thread");
        assert!(r.starts_with("250"), "{r}");
    }
    let hwm_mb = proc_kib(pid, "VmHWM") / 1024;
    let rss_mb = proc_kib(pid, "VmRSS") / 1024;
    eprintln!("{CLIENTS} x {SIZE} octets: server VmHWM {hwm_mb} MB, VmRSS {rss_mb} MB");
    assert!(hwm_mb < 200, "peak RSS {hwm_mb} MB with {CLIENTS} concurrent {SIZE}-octet messages");
    assert_eq!(tmp_files(&s), 0, "every spool file became a body");

    // Every message in the maildrop, whole: the sizes by LIST, two of
    // them byte for byte by RETR.
    let mut pop = BufReader::new(TcpStream::connect(s.pop3).unwrap());
    let mut w = pop.get_ref().try_clone().unwrap();
    let line = |pop: &mut BufReader<TcpStream>| {
        let mut l = String::new();
        pop.read_line(&mut l).unwrap();
        l
    };
    assert!(line(&mut pop).starts_with("+OK"));
    w.write_all(b"USER u@example.org\r\nPASS pw\r\nLIST\r\n").unwrap();
    line(&mut pop);
    assert!(line(&mut pop).starts_with("+OK"));
    assert!(line(&mut pop).starts_with("+OK"));
    let mut sizes = Vec::new();
    loop {
        let l = line(&mut pop);
        if l == ".\r\n" {
            break;
        }
        sizes.push(l.split_whitespace().nth(1).unwrap().parse::<usize>().unwrap());
    }
    assert_eq!(sizes.len(), CLIENTS);
    let expected = sizes[0];
    assert!(sizes.iter().all(|&n| n == expected) && expected > SIZE, "{sizes:?}");
    for n in [1, CLIENTS] {
        w.write_all(format!("RETR {n}\r\n").as_bytes()).unwrap();
        let first = line(&mut pop);
        assert!(first.starts_with("+OK"), "{first}");
        let mut msg = Vec::with_capacity(expected);
        loop {
            let mut l = Vec::new();
            pop.read_until(b'\n', &mut l).unwrap();
            if l == b".\r\n" {
                break;
            }
            msg.extend_from_slice(if l.starts_with(b"..") { &l[1..] } else { &l });
        }
        let text_end = msg.windows(14).position(|w| w == b"Subject: big 0").expect("the client's header");
        assert!(
            msg.starts_with(b"Return-Path: <sender@elsewhere.test>\r\nReceived: from client.test ([127.0.0.1])\r\n")
        );
        assert_eq!(&msg[text_end + 16..text_end + 20], b"\r\n\r\n");
        assert!(msg[text_end + 20..] == body[..], "message {n} differs from what was sent");
    }
    w.write_all(b"QUIT\r\n").unwrap();
}

#[test]
fn a_command_line_trickled_byte_by_byte_is_cut_at_the_idle_timeout() {
    let s = server("idle_timeout_secs = 2");
    let mut c = Client::connect(s.smtp);
    assert!(c.command("EHLO client.test").starts_with("250"));
    let last_command = Instant::now();
    // One byte every 200 ms, never a whole line.
    let trickle = trickle(&c, b"MAIL FROM:<someone@elsewhere.test> ".iter().cycle().take(100).map(|b| vec![*b]));
    let r = c.reply();
    let after = last_command.elapsed();
    assert!(r.starts_with("421 4.4.2") && r.contains("timeout"), "{r:?}");
    assert!(after >= Duration::from_secs(2) && after < Duration::from_secs(4), "cut after {after:?}");
    assert_eq!(c.reply(), "", "closed after the 421");
    trickle.join().unwrap();
}

#[test]
fn a_client_that_pipelines_commands_and_never_reads_is_cut_and_its_slot_freed() {
    // One slot: a second client gets its 220 only once the first is gone.
    let s = server("idle_timeout_secs = 2\nmax_connections = 1");
    let c = Client::connect(s.smtp);
    let started = Instant::now();
    // NOOPs without end, never a reply read: the replies fill both sides'
    // socket buffers, then the server's write waits for a reader that never
    // comes, and the server stops reading, so this write blocks in turn.
    // The server closing the connection ends it with an error.
    let mut w = c.w.try_clone().unwrap();
    w.set_write_timeout(Some(Duration::from_secs(20))).unwrap();
    let writer = std::thread::spawn(move || {
        let noops = b"NOOP\r\n".repeat(10_000);
        let mut sent = 0usize;
        loop {
            match w.write_all(&noops) {
                Ok(()) => sent += noops.len(),
                Err(e) => return (sent, e.kind()),
            }
        }
    });
    let (sent, error) = writer.join().unwrap();
    let cut_after = started.elapsed();
    assert!(error != std::io::ErrorKind::WouldBlock && error != std::io::ErrorKind::TimedOut, "never cut: {error:?}");
    // What the server sent back, then the end of the stream (or a reset:
    // the server closed with NOOPs unread).
    let mut r = c.r;
    r.get_ref().set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut replies = Vec::new();
    let end = r.read_to_end(&mut replies);
    assert!(!matches!(&end, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock), "no end of stream after the cut");
    eprintln!("cut after {cut_after:?}, {sent} octets of NOOPs taken, {} octets of replies", replies.len());
    assert!(cut_after < Duration::from_secs(10), "cut after {cut_after:?}");
    assert!(sent > 100_000, "the server read only {sent} octets before the cut");
    eventually(Duration::from_secs(10), "the cut logged", || {
        s.log().contains("SMTP client does not read its replies").then_some(())
    });
    // The slot is free again.
    eventually(Duration::from_secs(10), "a 220 for a new client", || {
        let mut l = Line::connect(s.smtp);
        l.reply().starts_with("220").then_some(())
    });
}

#[test]
fn a_data_phase_past_data_timeout_is_cut_and_its_spool_removed() {
    let s = server("idle_timeout_secs = 2\ndata_timeout_secs = 3");
    let mut c = Client::connect(s.smtp);
    c.start_data();
    let started = Instant::now();
    // More than is kept in memory: the spool has a file.
    c.w.write_all(b"Subject: slow\r\n\r\n").unwrap();
    c.w.write_all(&payload(400_000)).unwrap();
    eventually(Duration::from_secs(10), "a spool file", || (tmp_files(&s) == 1).then_some(()));
    // A line every 200 ms: never idle, never done.
    let trickle = trickle(&c, std::iter::repeat_n(b"more\r\n".to_vec(), 100));
    let r = c.reply();
    let after = started.elapsed();
    assert!(r.starts_with("421 4.4.2") && r.contains("timeout"), "{r:?}");
    assert!(after >= Duration::from_secs(3) && after < Duration::from_secs(6), "cut after {after:?}");
    eventually(Duration::from_secs(10), "the spool file removed", || (tmp_files(&s) == 0).then_some(()));
    trickle.join().unwrap();
    assert!(s.log().contains("SMTP DATA timeout"), "{}", s.log());
}

#[test]
fn messages_refused_after_their_data_are_logged_counted_and_leave_no_file() {
    let s = server("max_message_size = 1048576");
    let mut c = Client::connect(s.smtp);
    // Too big (RFC 1870 6.1: read to the end, then 552).
    c.start_data();
    c.w.write_all(&payload(2_000_000)).unwrap();
    let r = c.command(".");
    assert_eq!(r, "552 5.3.4 Message size exceeds fixed maximum message size");
    // A bare LF after the spool went to its file.
    c.start_data();
    c.w.write_all(&payload(500_000)).unwrap();
    c.w.write_all(b"smuggled\n.\nMAIL FROM:<x@y.test>\r\n").unwrap();
    let r = c.command(".");
    assert_eq!(r, "554 5.6.0 Message rejected: bare CR or LF in message data (RFC 5321 2.3.8)");
    // A line over the limit (64 KiB).
    c.start_data();
    c.w.write_all(&vec![b'x'; 70_000]).unwrap();
    let r = c.command("\r\n.");
    assert_eq!(r, "554 5.6.0 Message rejected: line too long (RFC 5321 4.5.3.1.6)");
    // The session goes on: a good message still lands.
    c.start_data();
    let r = c.command("Subject: fine\r\n\r\nfine\r\n.");
    assert!(r.starts_with("250"), "{r}");
    assert!(c.command("QUIT").starts_with("221"));

    // Logged as answered.
    let log = s.log();
    for want in [
        "result=552 5.3.4 Message size exceeds fixed maximum message size",
        "result=554 5.6.0 Message rejected: bare CR or LF in message data (RFC 5321 2.3.8)",
        "result=554 5.6.0 Message rejected: line too long (RFC 5321 4.5.3.1.6)",
    ] {
        let line =
            log.lines().find(|l| l.contains(want)).unwrap_or_else(|| panic!("no log line with {want:?}:\n{log}"));
        assert!(
            line.contains("hamail::mail") && line.contains("client=[127.0.0.1]") && line.contains("to=<u@example.org>"),
            "{line}"
        );
    }
    let (ok, status) = s.cli(&["status"], "");
    assert!(ok, "{status}");
    let rejected = status.lines().find(|l| l.starts_with("messages_rejected")).expect("messages_rejected");
    assert_eq!(rejected.split_whitespace().nth(1), Some("3"), "{status}");
    assert_eq!(tmp_files(&s), 0, "no spool file left behind");

    // A client gone mid-DATA: its spool file goes too.
    let mut c = Client::connect(s.smtp);
    c.start_data();
    c.w.write_all(&payload(400_000)).unwrap();
    eventually(Duration::from_secs(10), "a spool file", || (tmp_files(&s) == 1).then_some(()));
    drop(c);
    eventually(Duration::from_secs(10), "the spool file removed", || (tmp_files(&s) == 0).then_some(()));
}

#[test]
fn five_hundred_abusive_connections_stay_within_64_mb_and_1_mb_each() {
    const CONNECTIONS: usize = 500;
    let s = server("max_connections = 600");
    let pid = s.child.as_ref().expect("running").id();
    let mut held = Vec::new();
    for i in 0..CONNECTIONS {
        let mut c = Client::connect(s.smtp);
        match i % 4 {
            // A message larger than what is kept in memory, never ended.
            0 => {
                c.start_data();
                c.w.write_all(&payload(300_000)).unwrap();
            }
            // One that fits in memory, never ended.
            1 => {
                c.start_data();
                c.w.write_all(&payload(100_000)).unwrap();
            }
            // A command line that never ends.
            2 => c.w.write_all(&vec![b'M'; 100_000]).unwrap(),
            // A header section as long as is kept, then a field name that
            // never ends.
            _ => {
                c.start_data();
                c.w.write_all(&b"X-Filler: 0123456789012345678901234567890123456789\r\n".repeat(1200)).unwrap();
                c.w.write_all(&vec![b'N'; 50_000]).unwrap();
            }
        }
        held.push(c);
    }
    let spilled = CONNECTIONS / 4;
    eventually(Duration::from_secs(60), "every large message spooled to a file", || {
        (tmp_files(&s) == spilled).then_some(())
    });
    let hwm_mb = proc_kib(pid, "VmHWM") / 1024;
    eprintln!("{CONNECTIONS} abusive connections: server VmHWM {hwm_mb} MB");
    assert!(hwm_mb <= 64 + CONNECTIONS as u64, "peak RSS {hwm_mb} MB with {CONNECTIONS} connections");
    drop(held);
    eventually(Duration::from_secs(30), "the spool files removed", || (tmp_files(&s) == 0).then_some(()));
}
