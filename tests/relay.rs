//! Outbound delivery end to end: the real `hamail` binary relays
//! submitted mail to a fake next hop on loopback (a static transport map
//! entry), which answers 2xx, 4xx or 5xx per recipient, hangs before its
//! final reply, or drops the connection mid-DATA. Bounces are read back by
//! POP3 and parsed with mail-parser; a SIGKILL in the middle of a delivery
//! loses nothing and resends nothing that had been recorded as delivered.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use common::Server;
use mail_parser::MimeHeaders;

/// What the sink saw and how it behaves.
#[derive(Default)]
struct SinkState {
    /// Transactions answered 250 after the dot: (recipients, message).
    delivered: Vec<(Vec<String>, Vec<u8>)>,
    /// RCPT commands seen (answered 2xx, 4xx or 5xx), by recipient.
    rcpt_seen: HashMap<String, usize>,
    /// Messages whose DATA was completed (answered or not), by recipient.
    data_seen: HashMap<String, usize>,
    /// `tmp*` recipients: how many more RCPTs get 451.
    temp_left: HashMap<String, u32>,
    /// `hang*` recipients: how many more final dots get no reply.
    hang_left: u32,
    /// Set while a session waits, unanswered, after a final dot.
    hanging: bool,
    /// `drop*` recipients: how many more DATA phases are cut mid-way.
    drop_left: u32,
    sessions: usize,
    /// Sessions that have ended (the client quit or went away).
    ended: usize,
    /// When each session began (Unix seconds of the system clock, as the
    /// queue's times are).
    connected_at: Vec<u64>,
    /// How many more sessions are refused as a whole (`421` greeting).
    refuse_left: u32,
    /// Transactions (MAIL to the reply after the dot) in progress now, and
    /// the most at once: a lower bound of the client's sessions at once
    /// (counting sessions here would include the sink's own teardown).
    open: usize,
    max_open: usize,
    /// Wait this long before answering a final dot (a slow next hop).
    slow_ms: u64,
}

struct Sink {
    addr: SocketAddr,
    state: Arc<Mutex<SinkState>>,
}

impl Sink {
    fn start() -> Sink {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind sink");
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(SinkState::default()));
        let st = state.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let st = st.clone();
                std::thread::spawn(move || {
                    let _ = sink_session(conn, &st);
                    st.lock().unwrap().ended += 1;
                });
            }
        });
        Sink { addr, state }
    }

    fn count(&self, rcpt: &str) -> usize {
        self.state.lock().unwrap().delivered.iter().filter(|(r, _)| r.iter().any(|x| x == rcpt)).count()
    }
}

fn sink_session(conn: TcpStream, st: &Mutex<SinkState>) -> std::io::Result<()> {
    let refuse = {
        let mut s = st.lock().unwrap();
        s.sessions += 1;
        s.connected_at.push(unix_now());
        let refuse = s.refuse_left > 0;
        s.refuse_left = s.refuse_left.saturating_sub(1);
        refuse
    };
    let mut w = conn.try_clone()?;
    if refuse {
        return w.write_all(b"421 4.3.2 not now, closing\r\n");
    }
    let mut r = BufReader::new(conn);
    w.write_all(b"220 sink.test ESMTP\r\n")?;
    let mut rcpts: Vec<String> = Vec::new();
    loop {
        let mut line = String::new();
        if r.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let upper = line.to_ascii_uppercase();
        if upper.starts_with("EHLO") {
            w.write_all(b"250-sink.test\r\n250-8BITMIME\r\n250 SIZE 10000000\r\n")?;
        } else if upper.starts_with("MAIL FROM:") || upper.starts_with("RSET") {
            rcpts.clear();
            if upper.starts_with("MAIL") {
                let mut s = st.lock().unwrap();
                s.open += 1;
                s.max_open = s.max_open.max(s.open);
            }
            w.write_all(b"250 2.1.0 ok\r\n")?;
        } else if upper.starts_with("RCPT TO:") {
            let addr = line[8..].trim().trim_start_matches('<').trim_end_matches('>').to_string();
            let reply: &[u8] = {
                let mut s = st.lock().unwrap();
                *s.rcpt_seen.entry(addr.clone()).or_default() += 1;
                if addr.starts_with("bad") {
                    b"550 5.1.1 no such user here\r\n"
                } else if addr.starts_with("tmp") && s.temp_left.get(&addr).copied().unwrap_or(0) > 0 {
                    *s.temp_left.get_mut(&addr).unwrap() -= 1;
                    b"451 4.2.0 mailbox busy, try later\r\n"
                } else {
                    rcpts.push(addr.clone());
                    b"250 2.1.5 ok\r\n"
                }
            };
            w.write_all(reply)?;
        } else if upper.starts_with("DATA") {
            w.write_all(b"354 go ahead\r\n")?;
            let cut = rcpts.iter().any(|r| r.starts_with("drop")) && {
                let mut s = st.lock().unwrap();
                let cut = s.drop_left > 0;
                if cut {
                    s.drop_left -= 1;
                }
                cut
            };
            let mut msg = Vec::new();
            loop {
                let mut l = Vec::new();
                if r.read_until(b'\n', &mut l)? == 0 {
                    return Ok(());
                }
                if cut && msg.len() > 10 {
                    // Mid-DATA: the connection just goes away.
                    return Ok(());
                }
                if l == b".\r\n" {
                    break;
                }
                msg.extend_from_slice(if l.starts_with(b"..") { &l[1..] } else { &l });
            }
            let hang = rcpts.iter().any(|r| r.starts_with("hang")) && {
                let mut s = st.lock().unwrap();
                for r in &rcpts {
                    *s.data_seen.entry(r.clone()).or_default() += 1;
                }
                let hang = s.hang_left > 0;
                if hang {
                    s.hang_left -= 1;
                    s.hanging = true;
                }
                hang
            };
            if hang {
                // No reply ever: wait until the client goes away.
                let mut rest = Vec::new();
                let _ = r.read_to_end(&mut rest);
                st.lock().unwrap().hanging = false;
                return Ok(());
            }
            let slow = st.lock().unwrap().slow_ms;
            if slow > 0 {
                std::thread::sleep(Duration::from_millis(slow));
            }
            {
                let mut s = st.lock().unwrap();
                s.open = s.open.saturating_sub(1);
                if !rcpts.iter().any(|r| r.starts_with("hang")) {
                    for r in &rcpts {
                        *s.data_seen.entry(r.clone()).or_default() += 1;
                    }
                }
                s.delivered.push((rcpts.clone(), msg));
            }
            w.write_all(b"250 2.0.0 queued\r\n")?;
        } else if upper.starts_with("QUIT") {
            w.write_all(b"221 2.0.0 bye\r\n")?;
            return Ok(());
        } else {
            w.write_all(b"500 5.5.1 what?\r\n")?;
        }
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
}

fn relay_config(sink: SocketAddr) -> String {
    format!(
        "[smtp.allowed_senders]\n\"alice@example.org\" = [\"*@remote.test\"]\n\
         [relay]\ntransport = {{ \"remote.test\" = \"{sink}\" }}\ntls = \"never\"\nretry_initial_secs = 1\n\
         retry_max_secs = 1\nscan_interval_ms = 100\ncommand_timeout_secs = 30\n"
    )
}

fn setup(server: &Server) {
    server.add_domain("example.org");
    server.add_user("alice@example.org", "pw");
}

fn reply(r: &mut BufReader<TcpStream>) -> String {
    let mut all = String::new();
    loop {
        let mut l = String::new();
        r.read_line(&mut l).expect("reply");
        all.push_str(&l);
        if l.len() < 4 || l.as_bytes()[3] != b'-' {
            return all;
        }
    }
}

/// Submits a message as alice (AUTH PLAIN on loopback); returns its 250 line.
fn submit(server: &Server, to: &[&str], subject: &str) -> String {
    submit_from(server, "alice@example.org", to, subject)
}

/// The same with another envelope sender (one `smtp.allowed_senders`
/// gives alice).
fn submit_from(server: &Server, from: &str, to: &[&str], subject: &str) -> String {
    let s = TcpStream::connect(server.submission).expect("submission");
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut w = s.try_clone().unwrap();
    let mut r = BufReader::new(s);
    let mut step = |cmd: &str, want: &str| {
        if !cmd.is_empty() {
            w.write_all(cmd.as_bytes()).unwrap();
        }
        let got = reply(&mut r);
        assert!(got.starts_with(want), "{cmd:?} got {got:?}");
        got
    };
    step("", "220");
    step("EHLO client.test\r\n", "250");
    let token = base64::engine::general_purpose::STANDARD.encode("\0alice@example.org\0pw");
    step(&format!("AUTH PLAIN {token}\r\n"), "235");
    step(&format!("MAIL FROM:<{from}>\r\n"), "250");
    for t in to {
        step(&format!("RCPT TO:<{t}>\r\n"), "250");
    }
    step("DATA\r\n", "354");
    let body = format!(
        "From: alice@example.org\r\nSubject: {subject}\r\n\r\nhello {subject}\r\n..line starting with a dot\r\n.\r\n"
    );
    let done = step(&body, "250");
    step("QUIT\r\n", "221");
    done
}

fn queue_json(server: &Server) -> serde_json::Value {
    let (ok, out) = server.cli(&["queue", "list", "--json"], "");
    assert!(ok, "queue list: {out}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("queue list --json: {e}: {out}"))
}

fn wait_for(what: &str, within: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn delivers_with_per_recipient_results_retries_and_bounces() {
    let sink = Sink::start();
    sink.state.lock().unwrap().temp_left.insert("tmp1@remote.test".into(), 1);
    sink.state.lock().unwrap().drop_left = 1;
    let server = common::start(&relay_config(sink.addr));
    setup(&server);
    submit(&server, &["ok1@remote.test", "bad1@remote.test", "tmp1@remote.test"], "three");
    submit(&server, &["drop1@remote.test"], "dropped");
    wait_for("an empty queue", Duration::from_secs(60), || {
        queue_json(&server).as_array().is_some_and(|a| a.is_empty())
    });

    // Each good recipient exactly once, the refused one never.
    assert_eq!(sink.count("ok1@remote.test"), 1);
    assert_eq!(sink.count("tmp1@remote.test"), 1, "delivered on retry");
    assert_eq!(sink.count("drop1@remote.test"), 1, "delivered after the cut connection");
    assert_eq!(sink.count("bad1@remote.test"), 0);
    let state = sink.state.lock().unwrap();
    let (_, msg) = state.delivered.iter().find(|(r, _)| r.contains(&"ok1@remote.test".to_string())).unwrap();
    let text = String::from_utf8_lossy(msg);
    assert!(text.contains("Subject: three") && text.contains("\r\n.line starting with a dot\r\n"), "{text}");
    assert!(text.starts_with("Received: "), "our trace header first: {text}");
    drop(state);

    // The bounce: one DSN, for bad1 only, to alice, parsed back.
    let drop = common::mail::maildrop(server.pop3, "alice@example.org");
    assert_eq!(drop.len(), 1, "one bounce");
    let bounce = mail_parser::MessageParser::default().parse(&drop[0]).expect("bounce parses");
    let ct = bounce.content_type().expect("content type");
    assert_eq!((ct.ctype(), ct.subtype()), ("multipart", Some("report")));
    assert_eq!(ct.attribute("report-type"), Some("delivery-status"));
    let raw = String::from_utf8_lossy(&drop[0]);
    assert!(raw.contains("Return-Path: <>"), "a bounce has the null sender: {raw}");
    assert!(raw.contains("Final-Recipient: rfc822; bad1@remote.test\r\nAction: failed\r\nStatus: 5.1.1\r\n"), "{raw}");
    assert!(raw.contains("Diagnostic-Code: smtp; 550 5.1.1 no such user here"), "{raw}");
    // The server that refused, required for SMTP recipients (RFC 3464 2.3.5).
    assert!(raw.contains(&format!("Remote-MTA: dns; {}\r\n", sink.addr.ip())), "{raw}");
    assert!(!raw.contains("Final-Recipient: rfc822; ok1@remote.test"), "{raw}");
    assert!(raw.contains("Subject: three"), "the original headers: {raw}");

    // The counters of `hamail status`.
    let (ok, out) = server.cli(&["status", "--json"], "");
    assert!(ok, "{out}");
    let st: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(st["relay_sent"], 3, "{st}");
    assert_eq!(st["relay_failed"], 1, "{st}");
    assert_eq!(st["relay_reports"], 1, "{st}");
    assert!(st["relay_deferred"].as_u64().unwrap() >= 1, "{st}");
    assert_eq!(st["relay_running"], true);
}

/// Many messages, each to two destinations, submitted concurrently while
/// sessions end and scans run: each recipient is delivered exactly once (a
/// scan must never pick a recipient whose session ended after that scan
/// read the queue: the entry is still queued for the other destination, so
/// it would be sent twice).
#[test]
fn many_messages_each_delivered_exactly_once() {
    let (a, b) = (Sink::start(), Sink::start());
    let config = relay_config(a.addr).replace(
        &format!("\"remote.test\" = \"{}\"", a.addr),
        &format!("\"remote.test\" = \"{}\", \"other.test\" = \"{}\"", a.addr, b.addr),
    );
    let server = Arc::new(common::start(&config));
    setup(&server);
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let server = server.clone();
            std::thread::spawn(move || {
                for i in 0..25 {
                    let n = t * 100 + i;
                    submit(&server, &[&format!("a{n}@remote.test"), &format!("b{n}@other.test")], &format!("many {n}"));
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    wait_for("an empty queue", Duration::from_secs(60), || {
        queue_json(&server).as_array().is_some_and(|a| a.is_empty())
    });
    for t in 0..4 {
        for i in 0..25 {
            let n = t * 100 + i;
            assert_eq!(a.count(&format!("a{n}@remote.test")), 1, "a{n}");
            assert_eq!(b.count(&format!("b{n}@other.test")), 1, "b{n}");
        }
    }
    assert!(!server.log().contains("unreadable"), "{}", server.log());
}

#[test]
fn retry_schedule_and_queue_commands() {
    let sink = Sink::start();
    sink.state.lock().unwrap().temp_left.insert("tmp2@remote.test".into(), 1_000);
    sink.state.lock().unwrap().temp_left.insert("tmp3@remote.test".into(), 1_000);
    let server = common::start(&relay_config(sink.addr));
    setup(&server);
    submit(&server, &["tmp2@remote.test"], "retried");
    // Attempts go on at the configured backoff (1 s, capped at 1 s).
    wait_for("three attempts", Duration::from_secs(30), || {
        queue_json(&server)[0]["recipients"][0]["attempts"].as_u64().unwrap_or(0) >= 3
    });
    let q = queue_json(&server);
    let r = &q[0]["recipients"][0];
    assert_eq!(r["status"], "pending");
    // The server's reply, with who said it (also the DSN's Remote-MTA).
    let said = format!("{} said: 451 4.2.0", sink.addr.ip());
    assert!(r["last_error"].as_str().unwrap().starts_with(&said), "{r}");
    let id = q[0]["queue_id"].as_str().unwrap().to_string();

    let (ok, out) = server.cli(&["queue", "list"], "");
    assert!(ok && out.contains(&id) && out.contains("tmp2@remote.test") && out.contains("attempts="), "{out}");
    let (ok, out) = server.cli(&["queue", "show", &id], "");
    assert!(ok && out.contains("Subject: retried"), "{out}");

    // Bounce by the operator: the sender gets a DSN, the queue empties.
    let (ok, out) = server.cli(&["queue", "bounce", &id], "");
    assert!(ok, "{out}");
    wait_for("the bounce", Duration::from_secs(30), || queue_json(&server).as_array().is_some_and(|a| a.is_empty()));
    let drop = common::mail::maildrop(server.pop3, "alice@example.org");
    assert_eq!(drop.len(), 1);
    let raw = String::from_utf8_lossy(&drop[0]);
    assert!(raw.contains("Final-Recipient: rfc822; tmp2@remote.test"), "{raw}");
    assert!(raw.contains("administrator"), "{raw}");
    // Counted as a failure, as the next hop's refusals are.
    let (ok, out) = server.cli(&["status", "--json"], "");
    assert!(ok, "{out}");
    let st: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(st["relay_failed"], 1, "{st}");

    // Delete: gone without a bounce.
    submit(&server, &["tmp3@remote.test"], "deleted");
    let id = queue_json(&server)[0]["queue_id"].as_str().unwrap().to_string();
    let (ok, out) = server.cli(&["queue", "delete", &id], "");
    assert!(ok, "{out}");
    assert!(queue_json(&server).as_array().unwrap().is_empty());
    assert_eq!(common::mail::maildrop(server.pop3, "alice@example.org").len(), 1, "no bounce for a deletion");
    let (ok, out) = server.cli(&["queue", "hold", "00000000BEEF"], "");
    assert!(!ok && out.contains("no message"), "{out}");
    let (ok, out) = server.cli(&["queue", "hold", "nonsense"], "");
    assert!(!ok && out.contains("not a queue id"), "{out}");
}

/// `queue hold` keeps a message from delivery while a next hop that would
/// take it is there and the message is due (flushed): a message submitted
/// after it to the same next hop is delivered, the held one is not; after
/// `release` it is delivered, once.
#[test]
fn a_held_message_waits_until_released() {
    let sink = Sink::start();
    // Its first attempt gets a 451, then its own retry is 300 s away: it
    // stays queued (and the sink takes it from then on).
    sink.state.lock().unwrap().temp_left.insert("tmp-held@remote.test".into(), 1);
    // One session at a time to the sink: a session that carries the held
    // message cannot overlap the witness's, it comes before it or is it.
    let config = relay_config(sink.addr)
        .replace("retry_initial_secs = 1", "retry_initial_secs = 300")
        .replace("retry_max_secs = 1", "retry_max_secs = 300\nmax_per_destination = 1");
    let server = common::start(&config);
    setup(&server);
    submit(&server, &["tmp-held@remote.test"], "held");
    wait_for("the first attempt", Duration::from_secs(30), || {
        queue_json(&server)[0]["recipients"][0]["attempts"].as_u64() == Some(1)
    });
    let id = queue_json(&server)[0]["queue_id"].as_str().unwrap().to_string();

    let (ok, out) = server.cli(&["queue", "hold", &id], "");
    assert!(ok, "{out}");
    assert_eq!(queue_json(&server)[0]["hold"], true);
    let (_, out) = server.cli(&["queue", "list"], "");
    assert!(out.contains(&format!("{id}!")), "the list marks it: {out}");
    // Due now: without the hold, the next scan would send it.
    let (ok, out) = server.cli(&["queue", "flush", &id], "");
    assert!(ok, "{out}");

    // The witness: the worker scanned after the flush and delivered to the
    // same sink; once its session is over, any session that could have
    // carried the held message is over too.
    submit(&server, &["witness@remote.test"], "witness");
    wait_for("the witness's delivery and the end of its session", Duration::from_secs(30), || {
        let st = sink.state.lock().unwrap();
        st.delivered.iter().any(|(r, _)| r.iter().any(|x| x == "witness@remote.test")) && st.ended == st.sessions
    });
    assert_eq!(sink.count("tmp-held@remote.test"), 0, "not delivered while held");
    let q = queue_json(&server);
    assert_eq!(q.as_array().map(Vec::len), Some(1), "{q}");
    assert_eq!(q[0]["queue_id"], id.as_str());
    assert_eq!(q[0]["hold"], true);
    assert_eq!(q[0]["recipients"][0]["status"], "pending", "{q}");
    assert_eq!(q[0]["recipients"][0]["attempts"], 1, "no attempt while held: {q}");

    let (ok, out) = server.cli(&["queue", "release", &id], "");
    assert!(ok, "{out}");
    wait_for("an empty queue after the release", Duration::from_secs(30), || {
        queue_json(&server).as_array().is_some_and(|a| a.is_empty())
    });
    assert_eq!(sink.count("tmp-held@remote.test"), 1, "delivered once after the release");
    assert_eq!(sink.count("witness@remote.test"), 1);
}

#[test]
fn sigkill_mid_delivery_loses_nothing_and_resends_nothing_recorded() {
    let sink = Sink::start();
    sink.state.lock().unwrap().hang_left = 1;
    let tmp = tempfile::tempdir().unwrap();
    let config = relay_config(sink.addr);
    let mut server = common::start_in(tmp.path(), &config);
    setup(&server);
    for i in 0..5 {
        submit(&server, &[&format!("ok{i}@remote.test")], &format!("before {i}"));
    }
    wait_for("five deliveries", Duration::from_secs(30), || {
        (0..5).all(|i| sink.count(&format!("ok{i}@remote.test")) == 1)
    });
    wait_for("their records", Duration::from_secs(30), || queue_json(&server).as_array().is_some_and(|a| a.is_empty()));
    submit(&server, &["hang@remote.test", "ok9@remote.test"], "in flight");
    wait_for("the hanging delivery", Duration::from_secs(30), || sink.state.lock().unwrap().hanging);

    server.kill9();
    let server = common::start_in(tmp.path(), &config);
    wait_for("an empty queue after the restart", Duration::from_secs(60), || {
        queue_json(&server).as_array().is_some_and(|a| a.is_empty())
    });
    // At least once for the message in flight (twice here: the first
    // DATA got no reply — RFC 1047's window), never again for the others.
    assert_eq!(sink.count("hang@remote.test"), 1);
    assert_eq!(sink.count("ok9@remote.test"), 1);
    assert_eq!(sink.state.lock().unwrap().data_seen.get("hang@remote.test").copied(), Some(2));
    for i in 0..5 {
        assert_eq!(sink.count(&format!("ok{i}@remote.test")), 1, "ok{i} recorded as delivered, never sent again");
    }
    assert!(common::mail::maildrop(server.pop3, "alice@example.org").is_empty(), "no bounce");
}

/// `wait_for` for a test in the server's own runtime: the condition may
/// await (the store's queue, a mailbox).
async fn wait_async<F: std::future::Future<Output = bool>>(what: &str, within: Duration, mut f: impl FnMut() -> F) {
    let deadline = Instant::now() + within;
    while !f().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The retry schedule, the delay warning and the lifetime against a clock
/// the test moves (the server in this process, `start_with_clock`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schedule_follows_the_clock_warning_then_expiry() {
    use hamail_relay::schedule::{Clock, ManualClock, SystemClock};
    use hamail_store::{Address, Incoming, LocalStore, MailStore, StoreOptions};

    let sink = Sink::start();
    sink.state.lock().unwrap().temp_left.insert("tmp@remote.test".into(), 1_000);
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "[server]\nhostname = \"mx.test\"\ndata_dir = \"{}\"\ndomains = [\"example.org\"]\n\
         [smtp]\nlisten = []\nsubmission = []\n[pop3]\nlisten = []\n\
         [relay]\ntransport = {{ \"remote.test\" = \"{sink}\", \"other.test\" = \"{sink}\" }}\ntls = \"never\"\n\
         retry_initial_secs = 60\nretry_max_secs = 600\ndelay_warning_secs = 3600\nlifetime_secs = 7200\nscan_interval_ms = 20\n",
        dir.path().join("data").display(),
        sink = sink.addr
    );
    let config = hamail_server::Config::parse(&text, "test.toml").unwrap();
    let local =
        LocalStore::open(&config.store_dir(), StoreOptions { fsync: false, ..StoreOptions::default() }).unwrap();
    let clock = Arc::new(ManualClock::new(SystemClock.now()));
    let running = hamail_server::start_with_clock(config, local.clone(), clock.clone()).await.unwrap();
    let ctx = running.context.clone();
    ctx.directory().add_user(&Address::parse("alice@example.org").unwrap(), "pw").await.unwrap();

    let send = |to: &str, subject: &str| {
        let local = local.clone();
        let to = to.to_string();
        let body = format!("From: alice@example.org\r\nSubject: {subject}\r\n\r\nbody\r\n").into_bytes();
        async move {
            let queue_id = local.next_queue_id().await.unwrap();
            let incoming = Incoming {
                return_path: Some("alice@example.org".into()),
                local: Vec::new(),
                remote: vec![to],
                body: body.into(),
                queue_id,
                resend: None,
            };
            local.accept(incoming).await.unwrap();
        }
    };
    let attempts = |local: &Arc<LocalStore>| {
        let local = local.clone();
        async move {
            let items = local.queue_items().await.unwrap();
            items
                .iter()
                .find(|i| i.entry.recipients[0] == "tmp@remote.test")
                .map(|i| (i.state.recipients[0].attempts, i.state.recipients[0].next_attempt, i.state.warned))
        }
    };
    let t0 = clock.now();
    send("tmp@remote.test", "slow").await;
    ctx.delivery.wake();
    let within = Duration::from_secs(20);
    wait_async("the first attempt", within, || async { attempts(&local).await.map(|a| a.0) == Some(1) }).await;
    assert_eq!(attempts(&local).await.unwrap().1, t0 + 60, "first retry after retry_initial_secs");

    // A barrier: once a message to another destination is delivered, a
    // scan ran after the clock moved — and did not retry early.
    let mut barrier = 0;
    let mut sync_scan = |advance: u64| {
        clock.advance(advance);
        barrier += 1;
        let to = format!("ok{barrier}@other.test");
        let sink_state = sink.state.clone();
        let send = send(&to, "barrier");
        let ctx = ctx.clone();
        async move {
            send.await;
            ctx.delivery.wake();
            wait_async("the barrier delivery", Duration::from_secs(20), || {
                std::future::ready(sink_state.lock().unwrap().delivered.iter().any(|(r, _)| r.contains(&to)))
            })
            .await;
        }
    };
    sync_scan(59).await;
    assert_eq!(attempts(&local).await.unwrap().0, 1, "not before its time");
    sync_scan(1).await;
    wait_async("the second attempt", within, || async { attempts(&local).await.unwrap().0 == 2 }).await;
    assert_eq!(attempts(&local).await.unwrap().1, t0 + 60 + 120, "backoff doubled");

    // Past the delay warning: one warning to alice, the entry stays. (No
    // barrier message from here on: the store stamps arrival with the
    // real time, so the clock would make a new message late at once.)
    clock.advance(3600);
    ctx.delivery.wake();
    let alice = Address::parse("alice@example.org").unwrap();
    wait_async("the delay warning", within, || async { !local.mailbox(&alice).await.unwrap().is_empty() }).await;
    // The warning is accepted first, then the entry is marked as warned
    // (two commits): wait for the mark.
    wait_async("the warned mark", within, || async { attempts(&local).await.unwrap().2 }).await;
    let box1 = local.mailbox(&alice).await.unwrap();
    let warning = local.body(&box1[0].body).await.unwrap();
    let text = String::from_utf8_lossy(&warning);
    assert!(text.contains("Action: delayed") && text.contains("Final-Recipient: rfc822; tmp@remote.test"), "{text}");

    // Past the lifetime: bounced with 4.4.7.
    clock.advance(7200);
    ctx.delivery.wake();
    wait_async("the expiry bounce", within, || async {
        local.mailbox(&alice).await.unwrap().len() >= 2 && attempts(&local).await.is_none()
    })
    .await;
    let box2 = local.mailbox(&alice).await.unwrap();
    assert_eq!(box2.len(), 2, "one warning, one bounce");
    let bounce = local.body(&box2[1].body).await.unwrap();
    let parsed = mail_parser::MessageParser::default().parse(&bounce[..]).expect("parses");
    assert_eq!(parsed.subject(), Some("Undelivered Mail Returned to Sender"));
    let text = String::from_utf8_lossy(&bounce);
    assert!(text.contains("Action: failed\r\nStatus: 4.4.7"), "{text}");
    running.stop();
}

/// In a cluster, the node that owns the `delivery` resource works the
/// queue; when it is SIGKILLed mid-delivery, the node that takes the group
/// over finishes the queue: the message in flight is delivered (again),
/// none recorded as delivered is sent twice, and no other node ever
/// delivered while the owner was alive.
#[test]
fn cluster_takeover_of_the_queue_after_sigkill_of_the_owner() {
    use common::cluster::Node;
    let sink = Sink::start();
    sink.state.lock().unwrap().hang_left = 1;
    let root = tempfile::tempdir().unwrap();
    let mut nodes: Vec<Node> = (1..=3)
        .map(|i| {
            let name = format!("node{i}");
            let dir = root.path().join(&name);
            std::fs::create_dir_all(&dir).unwrap();
            let text = format!(
                "[server]\nhostname = \"{name}\"\ndata_dir = \"{}\"\nauth_failure_delay_ms = 200\n\n\
                 [smtp]\nlisten = [\"127.0.0.1:0\"]\nsubmission = [\"127.0.0.1:0\"]\n\n[pop3]\nlisten = [\"127.0.0.1:0\"]\n\n\
                 [cluster]\nlisten = \"127.0.0.1:{}\"\n\n{}",
                dir.join("data").display(),
                common::free_port(),
                relay_config(sink.addr)
            );
            std::fs::write(dir.join("hamail.toml"), text).unwrap();
            Node { server: Some(common::start_in(&dir, "")), dir }
        })
        .collect();
    setup(nodes[0].s());
    let (ok, out) = nodes[0].cli(&["cluster", "init"], "");
    assert!(ok, "{out}");
    let token = out.split_whitespace().find(|w| w.starts_with("hamail1-")).unwrap().to_string();
    for n in &nodes[1..] {
        let (ok, out) = n.cli(&["cluster", "join", &token], "");
        assert!(ok, "{out}");
    }
    let groups = root.path().join("groups.toml");
    std::fs::write(
        &groups,
        "[[group]]\nname = \"relay\"\nnodes = [1, 2, 3]\nfailback = \"manual\"\nmax_restarts = 1\n\n\
         [[group.resources]]\ntype = \"delivery\"\nname = \"queue\"\n",
    )
    .unwrap();
    let (ok, out) = nodes[1].cli(&["group", "apply", groups.to_str().unwrap()], "");
    assert!(ok, "{out}");

    // Mail submitted on node 2 is delivered by the owner, node 1.
    wait_for("a login on node 2", Duration::from_secs(30), || {
        common::cluster::pop3_login(nodes[1].s(), "alice@example.org", "pw")
    });
    for i in 0..3 {
        submit(nodes[1].s(), &[&format!("ok{i}@remote.test")], &format!("clustered {i}"));
    }
    wait_for("three deliveries", Duration::from_secs(60), || {
        (0..3).all(|i| sink.count(&format!("ok{i}@remote.test")) == 1)
    });
    wait_for("their records", Duration::from_secs(30), || {
        queue_json(nodes[2].s()).as_array().is_some_and(|a| a.is_empty())
    });
    assert!(nodes[0].s().log().contains("outbound delivery started on this node"));
    for n in &nodes[1..] {
        assert!(!n.s().log().contains("relay queue_id="), "only the owner delivers:\n{}", n.s().log());
    }

    submit(nodes[1].s(), &["hang@remote.test", "ok9@remote.test"], "in flight");
    wait_for("the hanging delivery", Duration::from_secs(30), || sink.state.lock().unwrap().hanging);
    nodes[0].kill9();
    wait_for("an empty queue after the takeover", Duration::from_secs(60), || {
        let (ok, out) = nodes[2].cli(&["queue", "list", "--json"], "");
        ok && serde_json::from_str::<serde_json::Value>(&out).ok().and_then(|v| v.as_array().map(|a| a.is_empty()))
            == Some(true)
    });
    assert_eq!(sink.count("hang@remote.test"), 1);
    assert_eq!(sink.count("ok9@remote.test"), 1);
    assert_eq!(sink.state.lock().unwrap().data_seen.get("hang@remote.test").copied(), Some(2));
    for i in 0..3 {
        assert_eq!(sink.count(&format!("ok{i}@remote.test")), 1, "ok{i} never sent again");
    }
}

/// Through the smarthost, one session carries every domain's mail: a
/// domain's own TLS policy does not split it off, as the smarthost's
/// policy is the one that applies (`smarthost_tls`).
#[test]
fn domains_with_a_tls_policy_share_the_smarthost_session() {
    let sink = Sink::start();
    let server = common::start(&format!(
        "[relay]\nsmarthost = \"{}\"\nsmarthost_tls = \"never\"\ntls_policy = {{ \"strict.test\" = \"require\" }}\n\
         resolver = \"127.0.0.1:9\"\nretry_initial_secs = 1\nretry_max_secs = 1\nscan_interval_ms = 100\n",
        sink.addr
    ));
    setup(&server);
    submit(&server, &["one@plain.test", "two@strict.test"], "both");
    wait_for("an empty queue", Duration::from_secs(30), || {
        queue_json(&server).as_array().is_some_and(|a| a.is_empty())
    });
    let st = sink.state.lock().unwrap();
    assert_eq!(st.sessions, 1, "one session to the smarthost");
    assert_eq!(st.delivered.len(), 1, "one transaction: {:?}", st.delivered.iter().map(|(r, _)| r).collect::<Vec<_>>());
    let mut rcpts = st.delivered[0].0.clone();
    rcpts.sort();
    assert_eq!(rcpts, ["one@plain.test", "two@strict.test"]);
}

/// A second hamail as the next hop: STARTTLS with its self-signed
/// certificate (`require`: any certificate), `verify` refusing that
/// certificate (deferred, never sent in clear), and the same server's
/// submission port as an authenticated smarthost.
#[test]
fn starttls_policies_and_an_authenticating_smarthost() {
    // A smarthost lets its customer's relay account send for the
    // customer's domain.
    let next = common::start("allowed_senders = { \"bob@remote.test\" = [\"*@example.org\"] }");
    next.add_domain("remote.test");
    next.add_user("bob@remote.test", "pw");

    // require: delivered over TLS.
    let server = common::start(&format!(
        "[relay]\ntransport = {{ \"remote.test\" = \"{}\" }}\ntls = \"require\"\ntls_policy = {{ \"verified.test\" = \"verify\" }}\n\
         retry_initial_secs = 1\nretry_max_secs = 1\nscan_interval_ms = 100\n",
        next.smtp
    ));
    setup(&server);
    submit(&server, &["bob@remote.test"], "over tls");
    wait_for("delivery over TLS", Duration::from_secs(30), || {
        common::mail::maildrop(next.pop3, "bob@remote.test")
            .iter()
            .any(|m| String::from_utf8_lossy(m).contains("Subject: over tls"))
    });
    let got = common::mail::maildrop(next.pop3, "bob@remote.test");
    let text = String::from_utf8_lossy(&got[0]);
    assert!(text.contains("by mx.test (hamail) with ESMTPS"), "the next hop saw TLS: {text}");
    assert!(queue_json(&server).as_array().unwrap().is_empty());

    // verify: the self-signed certificate is refused; the message waits.
    let verify = common::start(&format!(
        "[relay]\ntransport = {{ \"remote.test\" = \"{}\" }}\ntls = \"verify\"\nca_file = \"/nonexistent\"\n\
         retry_initial_secs = 1\nretry_max_secs = 1\nscan_interval_ms = 100\n",
        next.smtp
    ));
    setup(&verify);
    submit(&verify, &["bob@remote.test"], "must be verified");
    wait_for("a TLS deferral", Duration::from_secs(30), || {
        queue_json(&verify)[0]["recipients"][0]["last_error"].as_str().is_some_and(|e| e.contains("TLS"))
    });
    assert_eq!(queue_json(&verify)[0]["recipients"][0]["status"], "pending");
    assert!(!common::mail::maildrop(next.pop3, "bob@remote.test")
        .iter()
        .any(|m| String::from_utf8_lossy(m).contains("must be verified")));

    // Smarthost: the next hop's submission port, STARTTLS then AUTH.
    let smart = common::start(&format!(
        "[relay]\nsmarthost = \"{}\"\nsmarthost_user = \"bob@remote.test\"\nsmarthost_password = \"pw\"\n\
         smarthost_tls = \"require\"\nresolver = \"127.0.0.1:9\"\nretry_initial_secs = 1\nretry_max_secs = 1\nscan_interval_ms = 100\n",
        next.submission
    ));
    setup(&smart);
    submit(&smart, &["bob@remote.test"], "via smarthost");
    wait_for("delivery through the smarthost", Duration::from_secs(30), || {
        common::mail::maildrop(next.pop3, "bob@remote.test")
            .iter()
            .any(|m| String::from_utf8_lossy(m).contains("Subject: via smarthost"))
    });
    let got = common::mail::maildrop(next.pop3, "bob@remote.test");
    let m = got.iter().find(|m| String::from_utf8_lossy(m).contains("via smarthost")).unwrap();
    assert!(
        String::from_utf8_lossy(m).contains("with ESMTPSA"),
        "TLS and AUTH at the smarthost: {}",
        String::from_utf8_lossy(m)
    );
}

/// At most `max_per_destination` sessions to one destination, even with
/// many messages due and a slow next hop; a destination that fails as a
/// whole is backed off as a whole: new mail for it waits too.
#[test]
fn concurrency_limit_per_destination_and_destination_backoff() {
    let sink = Sink::start();
    sink.state.lock().unwrap().slow_ms = 300;
    let config = relay_config(sink.addr)
        .replace("scan_interval_ms = 100", "scan_interval_ms = 100\nmax_per_destination = 2\nmessages_per_session = 1");
    let server = common::start(&config);
    setup(&server);
    for i in 0..8 {
        submit(&server, &[&format!("par{i}@remote.test")], &format!("parallel {i}"));
    }
    wait_for("an empty queue", Duration::from_secs(60), || {
        queue_json(&server).as_array().is_some_and(|a| a.is_empty())
    });
    let st = sink.state.lock().unwrap();
    assert_eq!(st.delivered.len(), 8);
    assert!(st.max_open <= 2, "at most 2 sessions at once, saw {}", st.max_open);
    assert_eq!(st.max_open, 2, "the two sessions did run side by side");
    drop(st);

    // A next hop that refuses its first session as a whole (421 greeting),
    // then takes everything: the destination is backed off for 3 s.
    let sink = Sink::start();
    sink.state.lock().unwrap().refuse_left = 1;
    let config = relay_config(sink.addr)
        .replace("retry_initial_secs = 1", "retry_initial_secs = 3")
        .replace("retry_max_secs = 1", "retry_max_secs = 3\nmax_per_destination = 1");
    let server = common::start(&config);
    setup(&server);
    submit(&server, &["first@remote.test"], "refused");
    wait_for("the backoff", Duration::from_secs(30), || server.log().contains("destination backed off"));
    let q = queue_json(&server);
    let r = &q[0]["recipients"][0];
    assert!(r["last_error"].as_str().unwrap().contains("421 4.3.2"), "{r}");
    assert_eq!(r["attempts"], 1);
    // The destination's backoff began with that failure, as the first
    // message's own retry did: both end at its next attempt.
    let backoff_end = r["next_attempt"].as_u64().unwrap();

    // A second message, queued after the failure, has no backoff of its
    // own (due at once): only the destination's keeps it waiting, so the
    // next session comes when that ends and carries both messages.
    submit(&server, &["second@remote.test"], "after the failure");
    wait_for("both delivered", Duration::from_secs(30), || {
        queue_json(&server).as_array().is_some_and(|a| a.is_empty())
    });
    let st = sink.state.lock().unwrap();
    assert_eq!(st.delivered.len(), 2);
    assert!(
        st.connected_at[1] >= backoff_end,
        "the second message was tried at {} before the destination's backoff ended at {backoff_end}",
        st.connected_at[1]
    );
    assert_eq!(
        st.connected_at.len(),
        2,
        "the refused session and one after the backoff, for both: {:?}",
        st.connected_at
    );
}

/// `queue flush` after a failure: the destination's backoff (an hour here)
/// is cleared and the messages are tried at once; meanwhile the queue says
/// when each will be tried, never "due now" for one that waits for its
/// destination.
#[test]
fn a_flush_tries_a_backed_off_destination_at_once() {
    let sink = Sink::start();
    sink.state.lock().unwrap().refuse_left = 1;
    let config = relay_config(sink.addr)
        .replace("retry_initial_secs = 1", "retry_initial_secs = 3600")
        .replace("retry_max_secs = 1", "retry_max_secs = 3600");
    let server = common::start(&config);
    setup(&server);
    submit(&server, &["first@remote.test"], "refused");
    wait_for("the backoff", Duration::from_secs(30), || server.log().contains("destination backed off"));

    // Queued after the failure: it waits for the destination, and the
    // queue says until when and why.
    submit(&server, &["second@remote.test"], "after the failure");
    wait_for("the second message waiting for its destination", Duration::from_secs(30), || {
        let q = queue_json(&server);
        q.as_array().into_iter().flatten().flat_map(|m| m["recipients"].as_array().cloned().unwrap_or_default()).any(
            |r| {
                r["address"] == "second@remote.test"
                    && r["next_attempt"].as_u64().is_some_and(|t| t > unix_now() + 3000)
                    && r["last_error"].as_str().is_some_and(|e| e.contains("backing off"))
                    && r["attempts"] == 0
            },
        )
    });
    let (ok, listed) = server.cli(&["queue", "list"], "");
    assert!(ok, "{listed}");
    assert!(!listed.contains("due now"), "nothing here is tried now:\n{listed}");
    assert_eq!(sink.state.lock().unwrap().sessions, 1);

    let (ok, out) = server.cli(&["queue", "flush"], "");
    assert!(ok, "{out}");
    wait_for("both delivered after the flush", Duration::from_secs(30), || {
        queue_json(&server).as_array().is_some_and(|a| a.is_empty())
    });
    assert_eq!(sink.state.lock().unwrap().delivered.len(), 2);
}

/// Double bounces go to `[relay] double_bounce_to` when it is set, not to
/// the domain's postmaster; a recipient delivered at its first attempt
/// shows that attempt.
#[test]
fn double_bounces_go_where_configured_and_deliveries_count_their_attempt() {
    let sink = Sink::start();
    sink.state.lock().unwrap().temp_left.insert("tmp4@remote.test".into(), 1_000);
    let server = common::start(&format!("{}double_bounce_to = \"ops@example.org\"\n", relay_config(sink.addr)));
    setup(&server);
    server.add_user("ops@example.org", "pw");
    let (ok, out) = server.cli(&["alias", "add", "postmaster@example.org", "alice@example.org"], "");
    assert!(ok, "{out}");

    submit(&server, &["ok4@remote.test", "tmp4@remote.test"], "half delivered");
    wait_for("ok4 delivered, tmp4 pending", Duration::from_secs(30), || {
        queue_json(&server)[0]["recipients"]
            .as_array()
            .is_some_and(|rs| rs.iter().any(|r| r["address"] == "ok4@remote.test" && r["status"] == "delivered"))
    });
    let q = queue_json(&server);
    let ok4 = q[0]["recipients"].as_array().unwrap().iter().find(|r| r["address"] == "ok4@remote.test").unwrap();
    assert_eq!(ok4["attempts"], 1, "{ok4}");
    let id = q[0]["queue_id"].as_str().unwrap().to_string();
    let (ok, out) = server.cli(&["queue", "delete", &id], "");
    assert!(ok, "{out}");

    submit_from(&server, "bad-sender@remote.test", &["bad-rcpt@remote.test"], "doomed");
    wait_for("the double bounce", Duration::from_secs(60), || {
        !common::mail::maildrop(server.pop3, "ops@example.org").is_empty()
    });
    let drop = common::mail::maildrop(server.pop3, "ops@example.org");
    assert!(String::from_utf8_lossy(&drop[0]).contains("X-Hamail-Double-Bounce: yes"));
    assert!(common::mail::maildrop(server.pop3, "alice@example.org").is_empty(), "not to the domain's postmaster");
}

/// A real client (swaks, STARTTLS and AUTH on submission) to a remote
/// domain: the next hop receives the message with swaks's headers and body
/// intact, a leading dot included.
#[test]
fn swaks_submission_is_relayed_intact() {
    let sink = Sink::start();
    let server = common::start(&relay_config(sink.addr));
    setup(&server);
    let (ok, out, err) = common::run_tool(
        "swaks",
        &[
            "--server",
            &server.submission.to_string(),
            "--tls",
            "-au",
            "alice@example.org",
            "-ap",
            "pw",
            "--from",
            "alice@example.org",
            "--to",
            "carol@remote.test",
            "--header",
            "Subject: swaks relayed",
            "--body",
            ".starts with a dot\nsecond line",
        ],
        None,
    );
    assert!(ok, "swaks: {}{err}", String::from_utf8_lossy(&out));
    wait_for("the relayed message", Duration::from_secs(30), || sink.count("carol@remote.test") == 1);
    let st = sink.state.lock().unwrap();
    let text = String::from_utf8_lossy(&st.delivered[0].1).into_owned();
    assert!(text.contains("Subject: swaks relayed\r\n"), "{text}");
    assert!(text.contains("X-Mailer: swaks"), "{text}");
    assert!(text.contains("\r\n.starts with a dot\r\nsecond line\r\n"), "{text}");
    assert!(text.contains("with ESMTPSA"), "our trace header: {text}");
}

/// A bounce that bounces (its null-sender delivery to a remote sender is
/// refused) goes to the postmaster once, marked as a double bounce; and
/// nothing more after that. A double bounce that cannot be delivered
/// either (the postmaster is an alias to a refused remote address) is
/// dropped and logged: no loop, nothing else sent, the queue ends empty.
#[test]
fn a_failed_bounce_goes_to_the_postmaster_once() {
    let sink = Sink::start();
    let server = common::start(&relay_config(sink.addr));
    setup(&server);
    let (ok, out) = server.cli(&["alias", "add", "postmaster@example.org", "alice@example.org"], "");
    assert!(ok, "{out}");
    submit_from(&server, "bad-sender@remote.test", &["bad-rcpt@remote.test"], "doomed");
    wait_for("the double bounce", Duration::from_secs(60), || {
        !common::mail::maildrop(server.pop3, "alice@example.org").is_empty()
            && queue_json(&server).as_array().is_some_and(|a| a.is_empty())
    });
    let drop = common::mail::maildrop(server.pop3, "alice@example.org");
    assert_eq!(drop.len(), 1, "one report to the postmaster");
    let raw = String::from_utf8_lossy(&drop[0]);
    assert!(raw.contains("X-Hamail-Double-Bounce: yes"), "{raw}");
    assert!(raw.contains("Final-Recipient: rfc822; bad-sender@remote.test"), "the bounce's recipient: {raw}");
    assert!(
        raw.contains("Subject: Undelivered Mail Returned to Sender"),
        "the original headers are the bounce's: {raw}"
    );
    assert!(server.log().contains("bounce queue_id="), "{}", server.log());
    assert_eq!(sink.count("bad-rcpt@remote.test"), 0);

    // Now the postmaster is elsewhere, and refused there too.
    let (ok, out) = server.cli(&["alias", "del", "postmaster@example.org"], "");
    assert!(ok, "{out}");
    let (ok, out) = server.cli(&["alias", "add", "postmaster@example.org", "bad-postmaster@remote.test"], "");
    assert!(ok, "{out}");
    submit_from(&server, "bad-sender2@remote.test", &["bad-rcpt2@remote.test"], "doomed twice");
    // Each report is queued before the entry it reports on is marked, so
    // the queue is empty only once a report was not followed by another.
    wait_for("the double bounce dropped and an empty queue", Duration::from_secs(60), || {
        let tries = sink.state.lock().unwrap().rcpt_seen.get("bad-postmaster@remote.test").copied().unwrap_or(0);
        assert!(tries <= 1, "a failed double bounce was sent again ({tries} tries): a loop");
        server.log().contains("undeliverable double bounce dropped")
            && queue_json(&server).as_array().is_some_and(|a| a.is_empty())
    });
    assert_eq!(server.log().matches("undeliverable double bounce dropped").count(), 1, "{}", server.log());
    let st = sink.state.lock().unwrap();
    for rcpt in ["bad-rcpt2@remote.test", "bad-sender2@remote.test", "bad-postmaster@remote.test"] {
        assert_eq!(st.rcpt_seen.get(rcpt).copied(), Some(1), "{rcpt} tried once: {:?}", st.rcpt_seen);
    }
    // The two originals, their bounces and the remote double bounce:
    // nothing was sent after the drop.
    assert_eq!(st.rcpt_seen.values().sum::<usize>(), 5, "{:?}", st.rcpt_seen);
    assert!(st.delivered.is_empty());
    std::mem::drop(st);
    let (ok, out) = server.cli(&["status", "--json"], "");
    assert!(ok, "{out}");
    let status: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(status["relay_reports"], 4, "two bounces, two double bounces, no more: {status}");
    assert_eq!(
        common::mail::maildrop(server.pop3, "alice@example.org").len(),
        1,
        "nothing more for the old postmaster"
    );
}
