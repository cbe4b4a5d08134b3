//! Exact replies of the running server to hostile or wrong input: relay
//! denial, unknown user, size limit, SMTP smuggling, STARTTLS command
//! injection, POP3 maildrop lock and bad passwords.

mod common;

use common::*;

fn setup(smtp_extra: &str) -> Server {
    let s = start(smtp_extra);
    s.add_domain("example.org");
    s.add_user("alice@example.org", "alice-pw");
    s
}

fn maildrop_len(s: &Server) -> usize {
    let mut p = Line::connect(s.pop3);
    assert!(p.line().starts_with("+OK"));
    p.send("USER alice@example.org\r\nPASS alice-pw\r\n");
    assert!(p.line().starts_with("+OK"));
    let pass = p.line();
    assert!(pass.starts_with("+OK"), "{pass}");
    p.send("STAT\r\n");
    let stat = p.line();
    p.send("QUIT\r\n");
    p.line();
    stat.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn exact_replies_for_rcpt_outcomes() {
    let s = setup("");
    let mut c = greeted(s.smtp);
    c.send("MAIL FROM:<x@elsewhere.test>\r\n");
    assert!(c.reply().starts_with("250 2.1.0"));
    c.send("RCPT TO:<nobody@example.org>\r\n");
    assert!(c.reply().starts_with("550 5.1.1"));
    c.send("RCPT TO:<someone@elsewhere.test>\r\n");
    assert!(c.reply().starts_with("554 5.7.1"));
    c.send("DATA\r\n");
    assert!(c.reply().starts_with("554"), "DATA with no recipients");
    c.send("RCPT TO:<alice@example.org>\r\n");
    assert!(c.reply().starts_with("250 2.1.5"));
    c.send("VRFY alice\r\n");
    assert!(c.reply().starts_with("252"));
    c.send("QUIT\r\n");
    assert!(c.reply().starts_with("221"));
}

#[test]
fn size_limit_is_552_and_nothing_is_stored() {
    let s = setup("max_message_size = 4096");
    let mut c = greeted(s.smtp);
    c.send("MAIL FROM:<x@elsewhere.test> SIZE=100000\r\n");
    assert!(c.reply().starts_with("552 5.3.4"));
    c.send("MAIL FROM:<x@elsewhere.test>\r\nRCPT TO:<alice@example.org>\r\nDATA\r\n");
    assert!(c.reply().starts_with("250"));
    assert!(c.reply().starts_with("250"));
    assert!(c.reply().starts_with("354"));
    for _ in 0..100 {
        c.send(&format!("{}\r\n", "y".repeat(98)));
    }
    c.send(".\r\n");
    assert!(c.reply().starts_with("552 5.3.4"));
    // The session goes on.
    c.send("NOOP\r\n");
    assert!(c.reply().starts_with("250"));
    assert_eq!(maildrop_len(&s), 0);
}

#[test]
fn smuggling_inputs_never_make_a_second_message() {
    let s = setup("");
    for ending in ["\n.\n", "\n.\r\n", "\r.\r\n", "\r\n.\n", "\r\n.\r"] {
        let mut c = greeted(s.smtp);
        c.send("MAIL FROM:<x@elsewhere.test>\r\nRCPT TO:<alice@example.org>\r\nDATA\r\n");
        c.reply();
        c.reply();
        assert!(c.reply().starts_with("354"));
        // A smuggled second transaction after a non-standard "end".
        c.send(&format!(
            "Subject: first\r\n\r\nhello{ending}MAIL FROM:<evil@elsewhere.test>\r\nRCPT TO:<alice@example.org>\r\nDATA\r\nSubject: smuggled\r\n\r\nsmuggled\r\n.\r\n"
        ));
        let r = c.reply();
        assert!(r.starts_with("5"), "ending {ending:?}: bare CR/LF must be rejected, got {r}");
        c.send("QUIT\r\n");
        let _ = c.reply();
    }
    assert_eq!(maildrop_len(&s), 0, "nothing of a smuggling attempt may be delivered");
}

#[test]
fn starttls_discards_pipelined_plaintext() {
    let s = setup("");
    let mut c = Line::connect(s.smtp);
    c.reply();
    c.send("EHLO client.test\r\n");
    c.reply();
    // The injected commands would be executed inside TLS by a vulnerable server.
    c.send("STARTTLS\r\nMAIL FROM:<evil@elsewhere.test>\r\nRCPT TO:<alice@example.org>\r\n");
    let r = c.reply();
    assert!(r.starts_with("220"), "{r}");
    // Finish the handshake with a real TLS client (python ssl) and check the
    // server did not answer the injected commands inside TLS.
    let script = r#"
import socket, ssl, sys
# Reuse the already-connected socket: its fd is passed as argv[1].
s = socket.socket(fileno=int(sys.argv[1]))
ctx = ssl.create_default_context(); ctx.check_hostname = False; ctx.verify_mode = ssl.CERT_NONE
t = ctx.wrap_socket(s, server_hostname="mx.test")
t.settimeout(2)
try:
    data = t.recv(4096)
    print("UNEXPECTED:" + data.decode("latin-1"))
except socket.timeout:
    pass
t.sendall(b"NOOP\r\n")
print("NOOP:" + t.recv(4096).decode("latin-1").strip())
t.sendall(b"MAIL FROM:<x@elsewhere.test>\r\n")
print("MAIL:" + t.recv(4096).decode("latin-1").strip())
"#;
    use std::os::fd::AsRawFd;
    let fd = c.stream.as_raw_fd();
    // Let the child inherit the socket.
    let out = std::process::Command::new("python3").arg("-c").arg(script).arg(fd.to_string()).output_with_fd(fd);
    assert!(!out.contains("UNEXPECTED"), "injected commands were answered: {out}");
    assert!(out.contains("NOOP:250"), "{out}");
    // After STARTTLS the client must EHLO again (RFC 3207 4.2).
    assert!(out.contains("MAIL:503"), "{out}");
}

trait OutputWithFd {
    fn output_with_fd(&mut self, fd: i32) -> String;
}

impl OutputWithFd for std::process::Command {
    fn output_with_fd(&mut self, fd: i32) -> String {
        use std::os::unix::process::CommandExt;
        unsafe {
            self.pre_exec(move || {
                // Clear FD_CLOEXEC so that python inherits the socket.
                let flags = fcntl(fd, 1 /* F_GETFD */);
                fcntl(fd, 2 /* F_SETFD */, flags & !1);
                Ok(())
            });
        }
        let out = self.output().expect("python3");
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
    }
}

extern "C" {
    fn fcntl(fd: i32, cmd: i32, ...) -> i32;
}

#[test]
fn line_too_long_and_unknown_command() {
    let s = setup("");
    let mut c = greeted(s.smtp);
    c.send(&format!("NOOP {}\r\n", "a".repeat(2000)));
    assert!(c.reply().starts_with("500"), "line too long");
    c.send("FROBNICATE\r\n");
    assert!(c.reply().starts_with("500 5.5.1"));
    c.send("RCPT TO:<alice@example.org>\r\n");
    assert!(c.reply().starts_with("503"), "RCPT before MAIL");
    c.send("NOOP\r\n");
    assert!(c.reply().starts_with("250"));
}

#[test]
fn thousand_recipients_one_body() {
    let s = setup("max_recipients = 1200");
    let mut users = Vec::new();
    // Users via the admin socket, a few in parallel (argon2 is slow on purpose).
    std::thread::scope(|scope| {
        for chunk in 0..4 {
            let s = &s;
            scope.spawn(move || {
                for i in (chunk..1000).step_by(4) {
                    s.add_user(&format!("u{i:04}@example.org"), "pw");
                }
            });
        }
    });
    for i in 0..1000 {
        users.push(format!("u{i:04}@example.org"));
    }
    let mut c = greeted(s.smtp);
    let mut cmds = String::from("MAIL FROM:<bulk@elsewhere.test>\r\n");
    for u in &users {
        cmds.push_str(&format!("RCPT TO:<{u}>\r\n"));
    }
    cmds.push_str("DATA\r\n");
    c.send(&cmds);
    for _ in 0..1001 {
        let r = c.reply();
        assert!(r.starts_with("250"), "{r}");
    }
    assert!(c.reply().starts_with("354"));
    let line = format!("{}\r\n", "z".repeat(76));
    let mut body = String::from("Subject: bulk\r\n\r\n");
    while body.len() < 1024 * 1024 {
        body.push_str(&line);
    }
    c.send(&body);
    c.send(".\r\n");
    let r = c.reply();
    assert!(r.starts_with("250 2.0.0"), "{r}");
    // Stored once: exactly one body file of about 1 MB.
    let bodies = count_files(&s.dir.join("data/store/bodies"));
    assert_eq!(bodies, 1, "one message to 1000 users must be stored once");
    let (ok, out) = s.cli(&["user", "list"], "");
    assert!(ok);
    assert_eq!(out.lines().filter(|l| l.contains(" 1 msgs")).count(), 1000, "{out}");
}

fn count_files(dir: &std::path::Path) -> usize {
    let mut n = 0;
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            n += count_files(&p);
        } else {
            n += 1;
        }
    }
    n
}

#[test]
fn pop3_second_login_is_in_use_and_bad_password_is_auth() {
    let s = setup("");
    let mut a = Line::connect(s.pop3);
    a.line();
    a.send("USER alice@example.org\r\nPASS alice-pw\r\n");
    a.line();
    assert!(a.line().starts_with("+OK"));
    let mut b = Line::connect(s.pop3);
    b.line();
    b.send("USER alice@example.org\r\nPASS alice-pw\r\n");
    b.line();
    let r = b.line();
    assert!(r.starts_with("-ERR [IN-USE]"), "{r}");
    b.send("USER alice@example.org\r\nPASS wrong\r\n");
    b.line();
    let r = b.line();
    assert!(r.starts_with("-ERR [AUTH]"), "{r}");
    // A dropped connection deletes nothing and frees the lock.
    a.send("DELE 1\r\n");
    drop(a);
    eventually(std::time::Duration::from_secs(10), "lock release", || {
        let mut c = Line::connect(s.pop3);
        c.line();
        c.send("USER alice@example.org\r\nPASS alice-pw\r\n");
        c.line();
        c.line().starts_with("+OK").then_some(())
    });
}

#[test]
fn idle_timeout_is_421_and_connection_limit_is_421() {
    let s = setup("idle_timeout_secs = 1\nmax_connections = 2");
    let mut a = Line::connect(s.smtp);
    assert!(a.reply().starts_with("220"));
    let mut b = Line::connect(s.smtp);
    assert!(b.reply().starts_with("220"));
    let mut c = Line::connect(s.smtp);
    let r = c.reply();
    assert!(r.starts_with("421 4.7.0"), "third connection over the limit: {r}");
    // Idle sessions are told why they are closed (RFC 5321 4.5.3.2).
    let r = a.reply();
    assert!(r.starts_with("421 4.4.2"), "{r}");
    assert!(a.closed());
    drop(b);
    // A slot is free again once the idle ones are gone.
    eventually(std::time::Duration::from_secs(10), "a free connection slot", || {
        let mut d = Line::connect(s.smtp);
        d.reply().starts_with("220").then_some(())
    });
}
