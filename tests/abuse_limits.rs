//! The running binary under abuse: per-address connection limits, the
//! separate slot pools of port 25 and of the users' ports, the TLS
//! handshake timeout, login bans (and `hamail ban`, and in a cluster), the
//! failed-login delay of clients that hang up (or half-close: no answer), file modes of the data
//! directory, and the config errors. Clients come from several loopback addresses (127/8):
//! each is a different client address to the server.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use base64::Engine;
use common::*;

/// A server whose `[server]` and `[smtp]` sections get `server_extra` and
/// `smtp_extra`; no address is exempt from the per-address limits.
fn start_with(server_extra: &str, smtp_extra: &str) -> (tempfile::TempDir, Server) {
    let tmp = tempfile::tempdir().expect("tempdir");
    write_test_config(tmp.path(), server_extra, smtp_extra);
    let s = start_in(tmp.path(), "");
    (tmp, s)
}

fn write_test_config(dir: &Path, server_extra: &str, smtp_extra: &str) {
    let text = format!(
        "[server]\nhostname = \"mx.test\"\ndata_dir = \"{}\"\nlimits_exempt = []\n{}{server_extra}\n\n\
         [smtp]\nlisten = [\"127.0.0.1:0\"]\nsubmission = [\"127.0.0.1:0\"]\nsubmissions = [\"127.0.0.1:0\"]\n{smtp_extra}\n\n\
         [pop3]\nlisten = [\"127.0.0.1:0\"]\npop3s = [\"127.0.0.1:0\"]\n\n\
         [relay]\nenabled = false\n",
        dir.join("data").display(),
        if server_extra.contains("auth_failure_delay_ms") { "" } else { "auth_failure_delay_ms = 200\n" },
    );
    std::fs::write(dir.join("hamail.toml"), text).expect("write config");
}

/// A line client whose connection comes from `from` (a 127/8 address).
struct Client {
    stream: TcpStream,
    reader: BufReader<TcpStream>,
}

impl Client {
    fn connect_from(from: &str, to: SocketAddr) -> Client {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        let stream = runtime.block_on(async {
            let socket = tokio::net::TcpSocket::new_v4().expect("socket");
            socket.bind(SocketAddr::new(from.parse().expect("from"), 0)).expect("bind the client address");
            socket.connect(to).await.expect("connect")
        });
        let stream = stream.into_std().expect("std stream");
        stream.set_nonblocking(false).expect("blocking");
        stream.set_read_timeout(Some(Duration::from_secs(20))).expect("timeout");
        let reader = BufReader::new(stream.try_clone().expect("clone"));
        Client { stream, reader }
    }

    fn send(&mut self, data: &str) {
        self.stream.write_all(data.as_bytes()).expect("send");
    }

    fn line(&mut self) -> String {
        let mut s = String::new();
        let _ = self.reader.read_line(&mut s);
        s.trim_end_matches(['\r', '\n']).to_string()
    }

    /// The last line of a (multi-line) SMTP reply.
    fn reply(&mut self) -> String {
        loop {
            let l = self.line();
            if l.len() < 4 || l.as_bytes()[3] != b'-' {
                return l;
            }
        }
    }

    /// EHLO, then AUTH PLAIN: the reply.
    fn smtp_auth(&mut self, user: &str, password: &str) -> String {
        self.send("EHLO client.test\r\n");
        let ehlo = self.reply();
        assert!(ehlo.starts_with("250"), "{ehlo}");
        self.send(&format!("AUTH PLAIN {}\r\n", plain(user, password)));
        self.reply()
    }

    /// USER and PASS: the reply to PASS.
    fn pop3_login(&mut self, user: &str, password: &str) -> String {
        self.send(&format!("USER {user}\r\nPASS {password}\r\n"));
        let to_user = self.line();
        assert!(to_user.starts_with("+OK"), "{to_user}");
        self.line()
    }

    /// Whether the server closes the connection before `within` (EOF or
    /// reset), reading and discarding whatever it sends meanwhile.
    fn closed_within(&mut self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        let mut buf = [0u8; 4096];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            self.stream.set_read_timeout(Some(left)).expect("timeout");
            match self.reader.read(&mut buf) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
                Err(_) => return false,
            }
        }
    }
}

fn plain(user: &str, password: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(format!("\0{user}\0{password}"))
}

fn greeting(from: &str, to: SocketAddr) -> (Client, String) {
    let mut c = Client::connect_from(from, to);
    let g = c.line();
    (c, g)
}

#[test]
fn one_address_gets_20_connections_and_other_addresses_are_not_held_back() {
    let (_tmp, s) = start_with("", "");
    let mut open = Vec::new();
    for i in 0..20 {
        let (c, g) = greeting("127.0.0.1", s.smtp);
        assert!(g.starts_with("220 "), "connection {}: {g}", i + 1);
        open.push(c);
    }
    for i in 20..25 {
        let (mut c, g) = greeting("127.0.0.1", s.smtp);
        assert_eq!(
            g,
            "421 4.7.0 mx.test Error: too many connections from your address, try again later",
            "connection {}",
            i + 1
        );
        assert!(c.closed_within(Duration::from_secs(5)));
    }
    // Every mail port counts together: POP3 from the same address too.
    let (_, g) = greeting("127.0.0.1", s.pop3);
    assert_eq!(g, "-ERR [SYS/TEMP] too many connections from your address, try again later");
    // Another address is served, on port 25 and elsewhere.
    let (_, g) = greeting("127.0.0.2", s.smtp);
    assert!(g.starts_with("220 "), "{g}");
    let (_, g) = greeting("127.0.0.2", s.submission);
    assert!(g.starts_with("220 "), "{g}");
    // The refusals are logged, but not one line each (at most one a second).
    let logged = s.log().matches("connection refused: too many connections open from this address").count();
    assert!((1..6).contains(&logged), "6 refusals, {logged} log lines:\n{}", s.log());
    // Slots come back when connections close.
    open.truncate(10);
    eventually(Duration::from_secs(10), "a connection from 127.0.0.1 again", || {
        greeting("127.0.0.1", s.smtp).1.starts_with("220 ").then_some(())
    });
}

#[test]
fn new_connections_per_address_and_minute_are_limited() {
    let (_tmp, s) = start_with("connections_per_address_per_minute = 5", "");
    for i in 0..5 {
        let (_, g) = greeting("127.0.0.3", s.smtp);
        assert!(g.starts_with("220 "), "connection {}: {g}", i + 1);
    }
    let (_, g) = greeting("127.0.0.3", s.submission);
    assert_eq!(g, "421 4.7.0 mx.test Error: too many connections from your address, try again later");
    let (_, g) = greeting("127.0.0.4", s.smtp);
    assert!(g.starts_with("220 "), "{g}");
    assert!(s.log().contains("too many new connections from this address in the last minute"), "{}", s.log());
}

#[test]
fn a_full_port_25_does_not_lock_out_submission_and_pop3() {
    let (_tmp, s) = start_with("", "max_connections = 3");
    let mut held = Vec::new();
    for from in ["127.0.0.1", "127.0.0.2", "127.0.0.3"] {
        let (c, g) = greeting(from, s.smtp);
        assert!(g.starts_with("220 "), "{g}");
        held.push(c);
    }
    let (_, g) = greeting("127.0.0.4", s.smtp);
    assert_eq!(g, "421 4.7.0 mx.test Error: too many connections, try again later");
    let (_, g) = greeting("127.0.0.1", s.submission);
    assert!(g.starts_with("220 "), "submission while port 25 is full: {g}");
    let (_, g) = greeting("127.0.0.1", s.pop3);
    assert!(g.starts_with("+OK"), "POP3 while port 25 is full: {g}");
}

#[test]
fn silent_tls_clients_are_closed_after_the_handshake_timeout() {
    let (_tmp, s) = start_with("tls_handshake_timeout_secs = 1", "idle_timeout_secs = 300");
    let within = Duration::from_secs(6);
    // Implicit TLS (465, 995): connected, nothing sent.
    for port in [s.submissions.expect("465"), s.pop3s.expect("995")] {
        let mut c = Client::connect_from("127.0.0.1", port);
        assert!(c.closed_within(within), "silent client on {port} still open after {within:?}");
    }
    // STARTTLS accepted, then nothing.
    let (mut c, g) = greeting("127.0.0.1", s.submission);
    assert!(g.starts_with("220 "), "{g}");
    c.send("EHLO client.test\r\n");
    assert!(c.reply().starts_with("250"));
    c.send("STARTTLS\r\n");
    let r = c.reply();
    assert!(r.starts_with("220 "), "{r}");
    assert!(c.closed_within(within), "silent client after STARTTLS still open after {within:?}");
    // STLS accepted, then nothing.
    let (mut c, g) = greeting("127.0.0.1", s.pop3);
    assert!(g.starts_with("+OK"), "{g}");
    c.send("STLS\r\n");
    let r = c.line();
    assert!(r.starts_with("+OK"), "{r}");
    assert!(c.closed_within(within), "silent client after STLS still open after {within:?}");
    assert!(s.log().contains("TLS handshake not done within 1 s"), "{}", s.log());
}

fn ban_list(s: &Server) -> String {
    let (ok, out) = s.cli(&["ban", "list"], "");
    assert!(ok, "ban list: {out}");
    out
}

#[test]
fn after_failed_logins_the_address_is_banned_even_with_the_right_password() {
    let (_tmp, s) = start_with("login_failures_per_address = 3\nlogin_failures_per_account = 4", "");
    s.add_domain("example.org");
    s.add_user("alice@example.org", "alice-pw");
    s.add_user("bob@example.org", "bob-pw");
    let (mut c, _) = greeting("127.0.0.1", s.submission);
    assert_eq!(c.smtp_auth("alice@example.org", "guess-1"), "535 5.7.8 Authentication credentials invalid");
    for guess in ["guess-2", "guess-3"] {
        c.send(&format!("AUTH PLAIN {}\r\n", plain("alice@example.org", guess)));
        assert_eq!(c.reply(), "535 5.7.8 Authentication credentials invalid");
    }
    // Banned: the right password is refused too, on SMTP and POP3.
    c.send(&format!("AUTH PLAIN {}\r\n", plain("alice@example.org", "alice-pw")));
    let banned_smtp = "454 4.7.0 Temporary authentication failure: too many failed logins, try again later";
    assert_eq!(c.reply(), banned_smtp);
    // However fast a banned client tries, the log gets at most a line a second.
    for _ in 0..30 {
        c.send(&format!("AUTH PLAIN {}\r\n", plain("alice@example.org", "alice-pw")));
        assert_eq!(c.reply(), banned_smtp);
    }
    let logged = s.log().matches("is banned (").count();
    assert!((1..31).contains(&logged), "31 refusals, {logged} log lines");
    let (mut p, _) = greeting("127.0.0.1", s.pop3);
    let banned_pop3 = "-ERR [SYS/TEMP] too many failed logins, try again later";
    assert_eq!(p.pop3_login("alice@example.org", "alice-pw"), banned_pop3);
    assert!(s.log().contains("login ban: address 127.0.0.1 banned for 900 s"), "{}", s.log());
    let list = ban_list(&s);
    assert!(list.contains("address") && list.contains("127.0.0.1") && list.contains("(3 failed logins)"), "{list}");
    // The ban is the address's: another address logs in.
    let (mut other, _) = greeting("127.0.0.2", s.submission);
    assert_eq!(other.smtp_auth("alice@example.org", "alice-pw"), "235 2.7.0 Authentication successful");
    let (ok, out) = s.cli(&["ban", "del", "127.0.0.1"], "");
    assert!(ok && out.contains("ban on address 127.0.0.1 lifted"), "{out}");
    assert!(ban_list(&s).contains("no bans"));
    let (mut c, _) = greeting("127.0.0.1", s.submission);
    assert_eq!(c.smtp_auth("alice@example.org", "alice-pw"), "235 2.7.0 Authentication successful");
    let (mut p, _) = greeting("127.0.0.1", s.pop3);
    assert!(p.pop3_login("alice@example.org", "alice-pw").starts_with("+OK"));
    let (ok, out) = s.cli(&["ban", "del", "127.0.0.1"], "");
    assert!(!ok && out.contains("no ban on address 127.0.0.1"), "{out}");

    // A guess spread over addresses: the account is banned, from anywhere.
    for from in ["127.0.0.5", "127.0.0.5", "127.0.0.6", "127.0.0.6"] {
        let (mut p, _) = greeting(from, s.pop3);
        assert_eq!(p.pop3_login("bob@example.org", "guess"), "-ERR [AUTH] Invalid credentials");
    }
    let (mut p, _) = greeting("127.0.0.7", s.pop3);
    assert_eq!(p.pop3_login("bob@example.org", "bob-pw"), banned_pop3);
    let (mut c, _) = greeting("127.0.0.7", s.submission);
    assert_eq!(c.smtp_auth("bob@example.org", "bob-pw"), banned_smtp);
    assert!(ban_list(&s).contains("bob@example.org"));
    let (ok, json) = s.cli(&["ban", "list", "--json"], "");
    let v: serde_json::Value = serde_json::from_str(&json).unwrap_or_else(|e| panic!("{e}: {json} ({ok})"));
    assert_eq!(v[0]["kind"], "account");
    assert_eq!(v[0]["target"], "bob@example.org");
    assert_eq!(v[0]["failures"], 4);
    let (ok, out) = s.cli(&["ban", "del", "bob@example.org"], "");
    assert!(ok, "{out}");
    let (mut p, _) = greeting("127.0.0.7", s.pop3);
    assert!(p.pop3_login("bob@example.org", "bob-pw").starts_with("+OK"));
}

#[test]
fn clients_that_hang_up_during_the_failure_delay_do_not_keep_slots() {
    // Each failure waits 5 s (the longest delay); no ban gets in the way.
    let (_tmp, s) =
        start_with("auth_failure_delay_ms = 10000\nlogin_failures_per_address = 1000\nmax_user_connections = 4", "");
    s.add_domain("example.org");
    s.add_user("alice@example.org", "alice-pw");
    // A slot freed a moment ago may still be in use by a session that is
    // ending: connect until greeted.
    let served = |within: Duration| {
        poll(within, || {
            let (c, g) = greeting("127.0.0.1", s.submission);
            g.starts_with("220 ").then_some(c)
        })
    };
    for round in 0..3 {
        let mut guessers: Vec<Client> = (0..4)
            .map(|_| {
                let mut c = served(Duration::from_secs(10)).unwrap_or_else(|| panic!("round {round}: no slot"));
                c.send("EHLO client.test\r\n");
                assert!(c.reply().starts_with("250"));
                c.send(&format!("AUTH PLAIN {}\r\n", plain("alice@example.org", "wrong")));
                c
            })
            .collect();
        // Every slot of the users' pool is taken by a waiting guess.
        let (_, g) = greeting("127.0.0.9", s.pop3);
        assert!(g.starts_with("-ERR [SYS/TEMP] too many connections"), "round {round}: {g}");
        guessers.clear();
        let hung_up = Instant::now();
        // Far less than the 5 s delay: the slots are given back when the
        // clients go, not when their delay ends.
        let all_four: Option<Vec<Client>> = (0..4).map(|_| served(Duration::from_millis(2500))).collect();
        assert!(
            all_four.is_some(),
            "round {round}: the 4 slots not back {:?} after the guessers hung up",
            hung_up.elapsed()
        );
    }
    assert!(s.log().matches("result=auth failed").count() >= 12, "{}", s.log());
}

/// Sends `data`, shuts down the sending side (FIN, the read side stays
/// open), and returns all the server sends until it closes.
fn send_and_half_close(c: &mut Client, data: &str) -> String {
    c.send(data);
    c.stream.shutdown(std::net::Shutdown::Write).expect("shutdown");
    let mut rest = Vec::new();
    let _ = c.reader.read_to_end(&mut rest);
    String::from_utf8_lossy(&rest).into_owned()
}

#[test]
fn a_guess_sent_with_a_half_close_gets_no_answer() {
    // A client that sends its guess and then its FIN would otherwise be
    // answered at once, the failure delay skipped: one guess a connection.
    let (_tmp, s) = start_with("auth_failure_delay_ms = 500\nlogin_failures_per_address = 1000", "");
    s.add_domain("example.org");
    s.add_user("alice@example.org", "alice-pw");
    for password in ["wrong", "alice-pw"] {
        let (mut c, _) = greeting("127.0.0.1", s.submission);
        c.send("EHLO client.test\r\n");
        assert!(c.reply().starts_with("250"));
        let got = send_and_half_close(&mut c, &format!("AUTH PLAIN {}\r\n", plain("alice@example.org", password)));
        assert_eq!(got, "", "SMTP, password {password}: closed unanswered");
        let (mut p, _) = greeting("127.0.0.1", s.pop3);
        p.send("USER alice@example.org\r\n");
        assert!(p.line().starts_with("+OK"));
        let got = send_and_half_close(&mut p, &format!("PASS {password}\r\n"));
        assert_eq!(got, "", "POP3, password {password}: closed unanswered");
    }
    // The wrong guesses still count towards a ban.
    assert_eq!(s.log().matches("result=auth failed").count(), 2, "{}", s.log());
    // A client that keeps its side open is answered as ever.
    let (mut c, _) = greeting("127.0.0.1", s.submission);
    assert_eq!(c.smtp_auth("alice@example.org", "alice-pw"), "235 2.7.0 Authentication successful");
    let (mut c, _) = greeting("127.0.0.1", s.submission);
    assert_eq!(c.smtp_auth("alice@example.org", "wrong"), "535 5.7.8 Authentication credentials invalid");
}

/// Every directory under `dir` is 0700 and every file 0600.
fn assert_private(dir: &Path) {
    let mode = std::fs::metadata(dir).expect("stat").permissions().mode() & 0o777;
    assert_eq!(mode, 0o700, "{} is {mode:o}", dir.display());
    for entry in std::fs::read_dir(dir).expect("read_dir") {
        let path = entry.expect("entry").path();
        let meta = std::fs::symlink_metadata(&path).expect("stat");
        if meta.is_dir() {
            assert_private(&path);
        } else if meta.file_type().is_symlink() {
            // A link's own mode means nothing (always 777); it is reached
            // only through its private directory: `bin/armlog`.
            assert_eq!(path.file_name().and_then(|n| n.to_str()), Some("armlog"), "{}", path.display());
        } else {
            let mode = meta.permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{} is {mode:o}", path.display());
        }
    }
}

#[test]
fn files_under_the_data_directory_are_private_whatever_the_umask() {
    let tmp = tempfile::tempdir().expect("tempdir");
    write_test_config(tmp.path(), "", "");
    let data = tmp.path().join("data");
    // A directory left readable by others is made private at start.
    std::fs::create_dir(&data).expect("mkdir");
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let config = tmp.path().join("hamail.toml");
    let mut cmd = Command::new("sh");
    cmd.arg("-c").arg("umask 022 && exec \"$0\" --config \"$1\" serve").arg(BIN).arg(&config);
    let s = spawn_server(cmd, tmp.path(), config, "hamail under umask 022");
    s.add_domain("example.org");
    s.add_user("alice@example.org", "alice-pw");
    let (mut c, _) = greeting("127.0.0.1", s.smtp);
    for (line, expect) in [
        ("HELO client.test\r\n", "250"),
        ("MAIL FROM:<carol@elsewhere.test>\r\n", "250"),
        ("RCPT TO:<alice@example.org>\r\n", "250"),
        ("DATA\r\n", "354"),
        ("Subject: modes\r\n\r\nkept private\r\n.\r\n", "250"),
    ] {
        c.send(line);
        let r = c.reply();
        assert!(r.starts_with(expect), "{line:?}: {r}");
    }
    let (mut p, _) = greeting("127.0.0.1", s.pop3);
    assert!(p.pop3_login("alice@example.org", "alice-pw").starts_with("+OK"));
    p.send("RETR 1\r\n");
    assert!(p.line().starts_with("+OK"));
    assert!(data.join("tls/key.pem").exists() && data.join("store").is_dir(), "the store and the key are there");
    assert_private(&data);
}

#[test]
fn a_data_directory_others_can_write_is_refused() {
    for mode in [0o777, 0o770] {
        let tmp = tempfile::tempdir().expect("tempdir");
        write_test_config(tmp.path(), "", "");
        let data = tmp.path().join("data");
        std::fs::create_dir(&data).expect("mkdir");
        std::fs::set_permissions(&data, std::fs::Permissions::from_mode(mode)).expect("chmod");
        let (ok, out) = cli(&tmp.path().join("hamail.toml"), &["serve"], "");
        assert!(!ok, "started on a data directory of mode {mode:o}");
        let path = data.display();
        assert_eq!(
            out,
            format!(
                "hamail: {path} is mode {mode:04o}: group or others can write it; `chmod 700 {path}` and start again\n"
            )
        );
        assert!(!data.join("store").exists(), "nothing written in it");
    }
}

#[test]
fn config_errors_name_the_line_and_the_value() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = dir.path().join("bad.toml");
    let file = cfg.display();
    let cases = [
        (
            "[smtp]\nlisten = [\"127.0.0.1:0\"]\nmax_connections = 0\n",
            "3: [smtp] max_connections = 0: must be at least 1",
        ),
        ("[smtp]\n\nidle_timeout_secs = 0\n", "3: [smtp] idle_timeout_secs = 0: must be at least 1"),
        ("[pop3]\nidle_timeout_secs = 0\n", "2: [pop3] idle_timeout_secs = 0: must be at least 1"),
        ("[server]\nmax_user_connections = 0\n", "2: [server] max_user_connections = 0: must be at least 1"),
        (
            "[server]\nmax_connections_per_address = 0\n",
            "2: [server] max_connections_per_address = 0: must be at least 1",
        ),
        (
            "[server]\nconnections_per_address_per_minute = 0\n",
            "2: [server] connections_per_address_per_minute = 0: must be at least 1",
        ),
        (
            "[server]\nlogin_failures_per_address = 0\n",
            "2: [server] login_failures_per_address = 0: must be at least 1",
        ),
        (
            "[server]\nlogin_failures_per_account = 0\n",
            "2: [server] login_failures_per_account = 0: must be at least 1",
        ),
        ("[server]\nlogin_ban_secs = 0\n", "2: [server] login_ban_secs = 0: must be at least 1"),
        (
            "[server]\ntls_handshake_timeout_secs = 0\n",
            "2: [server] tls_handshake_timeout_secs = 0: must be at least 1",
        ),
        ("[smtp]\n\ndata_timeout_secs = 0\n", "3: [smtp] data_timeout_secs = 0: must be at least 1"),
        ("[server]\nlogin_ban_secs = 604801\n", "2: [server] login_ban_secs = 604801: must be at most 604800 (7 days)"),
        (
            "[smtp]\nidle_timeout_secs = 99999999999\n",
            "2: [smtp] idle_timeout_secs = 99999999999: must be at most 604800 (7 days)",
        ),
        (
            "[server]\nhostname = \"\"\n",
            "2: [server] hostname = \"\": must not be empty (our name in greetings and Received: lines)",
        ),
        (
            "[server]\nhostname = \"mx.test\"\ndomains = [\"example.org\", \"bad domain\"]\n",
            "3: [server] domains = \"bad domain\": `bad domain` is not a domain name",
        ),
        (
            "[server]\nhostname = \"mx_1.test\"\n",
            "2: [server] hostname = \"mx_1.test\": `mx_1.test` is not a domain name",
        ),
        ("[smtp]\nlisten = [\"127.0.0.1:99999\"]\n", "2: `127.0.0.1:99999`: port 99999 is over 65535"),
        (
            "[pop3]\n\npop3s = [\"localhost:995\"]\n",
            "3: `localhost:995` is not an address:port (IPv6 in brackets: [::1]:25)",
        ),
        ("[server]\nlimits_exempt = [\"10.0.0.0/40\"]\n", "2: `10.0.0.0/40`: the prefix length must be 0 to 32"),
    ];
    for (text, expected) in cases {
        std::fs::write(&cfg, text).expect("write");
        let (ok, out) = cli(&cfg, &["serve"], "");
        assert!(!ok, "{text}");
        assert_eq!(out, format!("hamail: {file}:{expected}\n"), "{text}");
    }
}

#[test]
fn a_bind_error_says_once_what_failed() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("addr").port();
    let tmp = tempfile::tempdir().expect("tempdir");
    write_test_config(tmp.path(), "", "");
    let text = std::fs::read_to_string(tmp.path().join("hamail.toml")).expect("read");
    let text = text.replacen("listen = [\"127.0.0.1:0\"]", &format!("listen = [\"127.0.0.1:{port}\"]"), 1);
    std::fs::write(tmp.path().join("hamail.toml"), text).expect("write");
    let (ok, out) = cli(&tmp.path().join("hamail.toml"), &["serve"], "");
    assert!(!ok);
    assert_eq!(
        out.lines().last(),
        Some(
            format!(
                "hamail: I/O error while binding SMTP listener 127.0.0.1:{port}: Address already in use (os error 98)"
            )
            .as_str()
        ),
        "{out}"
    );
    assert_eq!(out.matches("Address already in use").count(), 1, "{out}");
}

#[test]
fn the_generated_certificate_names_the_configured_host() {
    let (tmp, _s) = start_with("", "");
    let cert = tmp.path().join("data/tls/cert.pem");
    let (ok, out, err) = run_tool("openssl", &["x509", "-in", cert.to_str().expect("path"), "-noout", "-text"], None);
    assert!(ok, "openssl: {err}");
    let text = String::from_utf8_lossy(&out);
    assert!(text.contains("Subject: CN = mx.test\n") || text.contains("Subject: CN=mx.test\n"), "{text}");
    assert!(text.contains("DNS:mx.test, DNS:localhost"), "{text}");
}

#[test]
fn a_ban_set_on_one_node_holds_on_every_node_and_is_lifted_everywhere() {
    let root = tempfile::tempdir().expect("tempdir");
    let nodes = common::cluster::form_with(
        root.path(),
        &["data", "data"],
        "limits_exempt = []\nlogin_failures_per_address = 2",
    );
    let login = |node: &common::cluster::Node, password: &str| {
        let (mut p, g) = greeting("127.0.0.1", node.s().pop3);
        assert!(g.starts_with("+OK"), "{g}");
        p.pop3_login("alice@example.org", password)
    };
    for _ in 0..2 {
        assert_eq!(login(&nodes[0], "guess"), "-ERR [AUTH] Invalid credentials");
    }
    let banned = "-ERR [SYS/TEMP] too many failed logins, try again later";
    assert_eq!(login(&nodes[0], "alice-pw"), banned);
    // Node 2 saw no failure, and refuses the address all the same.
    eventually(Duration::from_secs(10), "the ban held on node 2", || {
        (login(&nodes[1], "alice-pw") == banned).then_some(())
    });
    let (ok, list) = nodes[1].cli(&["ban", "list"], "");
    assert!(ok && list.contains("127.0.0.1"), "{list}");
    assert!(
        nodes[1].s().log().contains("login ban from the cluster: address 127.0.0.1 banned for"),
        "{}",
        nodes[1].s().log()
    );
    // Lifted on node 2: node 1 lets it in again.
    let (ok, out) = nodes[1].cli(&["ban", "del", "127.0.0.1"], "");
    assert!(ok, "{out}");
    eventually(Duration::from_secs(10), "the ban lifted on node 1", || {
        login(&nodes[0], "alice-pw").starts_with("+OK").then_some(())
    });
    let (ok, list) = nodes[0].cli(&["ban", "list"], "");
    assert!(ok && list.contains("no bans"), "{list}");
}
