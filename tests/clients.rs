//! The running binary against real clients nobody here wrote: Python's
//! smtplib and poplib, curl (SMTP and POP3) and swaks. Each message sent is
//! read back and compared byte for byte (after our `Return-Path:` and
//! `Received:` lines).

mod common;

use common::*;
use serde_json::Value;

fn fetch(s: &Server, user: &str, pass: &str, extra: &[&str]) -> Value {
    let port = s.pop3.port().to_string();
    let mut args = vec!["127.0.0.1", port.as_str(), user, pass];
    args.extend_from_slice(extra);
    py("pop3_fetch.py", &args)
}

fn messages(v: &Value) -> Vec<Vec<u8>> {
    v["messages"].as_array().expect("messages").iter().map(|m| hex::decode(m.as_str().unwrap()).unwrap()).collect()
}

/// The message as delivered: our trace lines, then exactly what was sent.
fn assert_delivered(got: &[u8], sent: &[u8], return_path: &str) {
    let rp = format!("Return-Path: <{return_path}>\r\n");
    assert!(
        got.starts_with(rp.as_bytes()),
        "no Return-Path first: {}",
        String::from_utf8_lossy(&got[..got.len().min(200)])
    );
    assert!(got.windows(9).any(|w| w == b"Received:"), "no Received header");
    assert!(
        got.ends_with(sent),
        "body differs:\n--- got\n{}\n--- sent\n{}",
        String::from_utf8_lossy(got),
        String::from_utf8_lossy(sent)
    );
}

fn setup() -> Server {
    let s = start("");
    s.add_domain("example.org");
    s.add_user("alice@example.org", "alice-pw");
    s.add_user("bob@example.org", "bob-pw");
    s
}

fn write_tmp(s: &Server, name: &str, data: &[u8]) -> String {
    let p = s.dir.join(name);
    std::fs::write(&p, data).unwrap();
    p.to_str().unwrap().to_string()
}

#[test]
fn smtplib_to_poplib_is_byte_identical() {
    let s = setup();
    // Leading dots, an empty line, 8-bit text, a long line.
    let sent = format!(
        "From: carol@elsewhere.test\r\nTo: alice@example.org\r\nSubject: t\r\n\r\n.leading dot\r\n..two dots\r\n\r\nh\u{e9}llo\r\n{}\r\n.\r\nend\r\n",
        "x".repeat(900)
    );
    let file = write_tmp(&s, "m1.eml", sent.as_bytes());
    let port = s.smtp.port().to_string();
    let r =
        py("smtp_send.py", &["127.0.0.1", &port, "carol@elsewhere.test", "alice@example.org,bob@example.org", &file]);
    assert_eq!(r["ok"], true, "{r}");
    for (user, pass) in [("alice@example.org", "alice-pw"), ("bob@example.org", "bob-pw")] {
        let v = fetch(&s, user, pass, &[]);
        assert_eq!(v["ok"], true, "{v}");
        let m = messages(&v);
        assert_eq!(m.len(), 1);
        assert_delivered(&m[0], sent.as_bytes(), "carol@elsewhere.test");
        // LIST sizes are the exact octet counts RETR sends (RFC 1939 LIST).
        assert_eq!(v["sizes"][0].as_u64().unwrap() as usize, m[0].len());
    }
    assert!(s.log().contains("result=250 queued"), "no maillog line:\n{}", s.log());
}

#[test]
fn poplib_dele_applies_at_quit_and_uidl_is_stable() {
    let s = setup();
    let port = s.smtp.port().to_string();
    for i in 0..3 {
        let file = write_tmp(&s, &format!("m{i}.eml"), format!("Subject: {i}\r\n\r\nbody {i}\r\n").as_bytes());
        let r = py("smtp_send.py", &["127.0.0.1", &port, "x@elsewhere.test", "alice@example.org", &file]);
        assert_eq!(r["ok"], true, "{r}");
    }
    let first = fetch(&s, "alice@example.org", "alice-pw", &[]);
    let again = fetch(&s, "alice@example.org", "alice-pw", &[]);
    assert_eq!(first["uidl"], again["uidl"], "UIDL must be stable");
    let uids: Vec<&str> = first["uidl"].as_array().unwrap().iter().map(|u| u.as_str().unwrap()).collect();
    assert_eq!(uids.len(), 3);
    assert!(uids[0] != uids[1] && uids[1] != uids[2]);
    let deleted = fetch(&s, "alice@example.org", "alice-pw", &["--dele"]);
    assert_eq!(deleted["ok"], true);
    let after = fetch(&s, "alice@example.org", "alice-pw", &[]);
    assert_eq!(after["messages"].as_array().unwrap().len(), 0, "DELE + QUIT must remove them");
}

#[test]
fn submission_with_starttls_and_auth_relays_into_the_queue() {
    let s = setup();
    let file = write_tmp(&s, "r.eml", b"Subject: out\r\n\r\nto the world\r\n");
    let port = s.submission.port().to_string();
    let r = py(
        "smtp_send.py",
        &[
            "127.0.0.1",
            &port,
            "alice@example.org",
            "someone@elsewhere.test",
            &file,
            "--starttls",
            "--user",
            "alice@example.org",
            "--password",
            "alice-pw",
        ],
    );
    assert_eq!(r["ok"], true, "{r}");
    let (ok, out) = s.cli(&["queue", "list"], "");
    assert!(ok, "{out}");
    assert!(out.contains("someone@elsewhere.test"), "queue list: {out}");
    assert!(out.contains("alice@example.org"), "queue list: {out}");
}

#[test]
fn wrong_password_is_535_and_no_relay_without_auth() {
    let s = setup();
    let file = write_tmp(&s, "r.eml", b"Subject: out\r\n\r\nx\r\n");
    let sub = s.submission.port().to_string();
    let r = py(
        "smtp_send.py",
        &[
            "127.0.0.1",
            &sub,
            "alice@example.org",
            "someone@elsewhere.test",
            &file,
            "--starttls",
            "--user",
            "alice@example.org",
            "--password",
            "wrong",
        ],
    );
    assert_eq!(r["code"], 535, "{r}");
    let mta = s.smtp.port().to_string();
    let r = py("smtp_send.py", &["127.0.0.1", &mta, "x@elsewhere.test", "someone@elsewhere.test", &file]);
    assert_eq!(r["code"], 554, "relay must be denied: {r}");
    let r = py("smtp_send.py", &["127.0.0.1", &mta, "x@elsewhere.test", "nobody@example.org", &file]);
    assert_eq!(r["code"], 550, "unknown user: {r}");
    let (_, out) = s.cli(&["queue", "list"], "");
    assert!(out.contains("empty"), "nothing may be queued: {out}");
}

#[test]
fn pop3_wrong_password_gets_auth_code() {
    let s = setup();
    let v = fetch(&s, "alice@example.org", "nope", &[]);
    assert_eq!(v["ok"], false);
    assert!(v["error"].as_str().unwrap().starts_with("-ERR [AUTH]"), "{v}");
}

#[test]
fn pop3_stls_then_login() {
    let s = setup();
    let v = fetch(&s, "alice@example.org", "alice-pw", &["--stls"]);
    assert_eq!(v["ok"], true, "{v}");
}

#[test]
fn curl_smtp_and_curl_pop3() {
    let s = setup();
    let sent = b"From: dave@elsewhere.test\r\nSubject: via curl\r\n\r\nhello from curl\r\n.dot line\r\n";
    let file = write_tmp(&s, "c.eml", sent);
    let url = format!("smtp://{}", s.smtp);
    let (ok, _, err) = run_tool(
        "curl",
        &[
            "-sS",
            &url,
            "--mail-from",
            "dave@elsewhere.test",
            "--mail-rcpt",
            "alice@example.org",
            "--upload-file",
            &file,
        ],
        None,
    );
    assert!(ok, "curl smtp: {err}");
    let list_url = format!("pop3://{}/", s.pop3);
    let (ok, out, err) = run_tool("curl", &["-sS", &list_url, "-u", "alice@example.org:alice-pw"], None);
    assert!(ok, "curl pop3 list: {err}");
    assert!(String::from_utf8_lossy(&out).starts_with("1 "), "LIST: {}", String::from_utf8_lossy(&out));
    let msg_url = format!("pop3://{}/1", s.pop3);
    let (ok, out, err) = run_tool("curl", &["-sS", &msg_url, "-u", "alice@example.org:alice-pw"], None);
    assert!(ok, "curl pop3 retr: {err}");
    assert_delivered(&out, sent, "dave@elsewhere.test");
}

#[test]
fn swaks_plain_and_submission_with_tls_auth() {
    let s = setup();
    let (ok, out, err) = run_tool(
        "swaks",
        &[
            "--server",
            &s.smtp.to_string(),
            "--from",
            "eve@elsewhere.test",
            "--to",
            "bob@example.org",
            "--header",
            "Subject: swaks",
            "--body",
            "swaks body",
        ],
        None,
    );
    assert!(ok, "swaks: {}{err}", String::from_utf8_lossy(&out));
    let (ok, out, err) = run_tool(
        "swaks",
        &[
            "--server",
            &s.submission.to_string(),
            "--tls",
            "-au",
            "alice@example.org",
            "-ap",
            "alice-pw",
            "--from",
            "alice@example.org",
            "--to",
            "bob@example.org",
            "--body",
            "authenticated",
        ],
        None,
    );
    assert!(ok, "swaks submission: {}{err}", String::from_utf8_lossy(&out));
    let v = fetch(&s, "bob@example.org", "bob-pw", &[]);
    let m = messages(&v);
    assert_eq!(m.len(), 2, "{v}");
    let second = String::from_utf8_lossy(&m[1]);
    assert!(second.contains("with ESMTPSA"), "submission must be marked ESMTPSA (RFC 3848):\n{second}");
    assert!(
        second.contains("Message-I") || second.contains("Message-Id"),
        "swaks sends a Message-Id; it is kept:\n{second}"
    );
}

#[test]
fn alias_postmaster_delivers_to_user() {
    let s = setup();
    let (ok, out) = s.cli(&["alias", "add", "postmaster@example.org", "alice@example.org"], "");
    assert!(ok, "{out}");
    let file = write_tmp(&s, "p.eml", b"Subject: pm\r\n\r\nfor the postmaster\r\n");
    let port = s.smtp.port().to_string();
    let r = py("smtp_send.py", &["127.0.0.1", &port, "x@elsewhere.test", "Postmaster@EXAMPLE.org", &file]);
    assert_eq!(r["ok"], true, "{r}");
    let m = messages(&fetch(&s, "alice@example.org", "alice-pw", &[]));
    assert_eq!(m.len(), 1);
}

#[test]
fn cli_lists_and_refuses_bad_input() {
    let s = setup();
    let (ok, out) = s.cli(&["user", "list"], "");
    assert!(ok && out.contains("alice@example.org") && out.contains("bob@example.org"), "{out}");
    let (ok, out) = s.cli(&["user", "add", "carol@nowhere.test"], "pw\n");
    assert!(!ok, "a user in an unknown domain must be refused: {out}");
    let (ok, out) = s.cli(&["user", "add", "alice@example.org"], "pw\n");
    assert!(!ok && out.to_lowercase().contains("exist"), "{out}");
    let (ok, out) = s.cli(&["user", "add", "dave@example.org"], "");
    assert!(!ok && out.contains("password"), "{out}");
    let (ok, out) = s.cli(&["domain", "del", "example.org"], "");
    assert!(!ok, "a domain with users must not be removed: {out}");
    let (ok, out) = s.cli(&["status"], "");
    assert!(ok && out.contains("running") && out.contains("true"), "{out}");
    // Password change applies at once.
    let (ok, out) = s.cli(&["user", "passwd", "bob@example.org"], "new-pw\n");
    assert!(ok, "{out}");
    assert_eq!(fetch(&s, "bob@example.org", "new-pw", &[])["ok"], true);
    assert_eq!(fetch(&s, "bob@example.org", "bob-pw", &[])["ok"], false);
}

/// `hamail user list | head -1`: the reader leaves after one line; the
/// command ends quietly (killed by SIGPIPE, or done before it wrote more),
/// never with a panic on the closed pipe.
#[test]
fn cli_output_into_a_closed_pipe_ends_quietly() {
    use std::os::unix::process::ExitStatusExt;
    let s = setup();
    let config = s.config.to_str().expect("config path");
    // `hamail user list | head -1` as a shell runs it, with the reader
    // gone before the first line, every time: the write meets EPIPE.
    let (reader, writer) = std::io::pipe().expect("pipe");
    drop(reader);
    let out = std::process::Command::new(common::BIN)
        .args(["--config", config, "user", "list"])
        .stdout(writer)
        .stderr(std::process::Stdio::piped())
        .output()
        .expect("run hamail user list");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.signal(), Some(libc::SIGPIPE), "{:?}: {err}", out.status);
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn config_error_names_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("bad.toml");
    std::fs::write(&cfg, "[smtp]\nlisten = [\"127.0.0.1:0\"]\nmax_recipients = -3\n").unwrap();
    let (ok, out) = cli(&cfg, &["serve"], "");
    assert!(!ok);
    assert!(out.contains("bad.toml:3"), "{out}");
}

#[test]
fn implicit_tls_ports_465_and_995() {
    let s = setup();
    let file = write_tmp(&s, "t.eml", b"Subject: over tls\r\n\r\nimplicit tls\r\n");
    let port = s.submissions.expect("submissions port").port().to_string();
    let r = py(
        "smtp_send.py",
        &[
            "127.0.0.1",
            &port,
            "alice@example.org",
            "bob@example.org",
            &file,
            "--ssl",
            "--user",
            "alice@example.org",
            "--password",
            "alice-pw",
        ],
    );
    assert_eq!(r["ok"], true, "{r}");
    let pop3s = s.pop3s.expect("pop3s port").port().to_string();
    let v = py("pop3_fetch.py", &["127.0.0.1", &pop3s, "bob@example.org", "bob-pw", "--ssl"]);
    assert_eq!(v["ok"], true, "{v}");
    let m = messages(&v);
    assert_eq!(m.len(), 1);
    // A submission without Message-ID and Date gets them at the end of
    // its header section (as Postfix's cleanup puts them).
    assert_delivered(&m[0], b"\r\n\r\nimplicit tls\r\n", "alice@example.org");
    let text = String::from_utf8_lossy(&m[0]);
    assert!(text.contains(";\r\n\t") && text.contains("\r\nSubject: over tls\r\nMessage-ID: <"), "{text}");
    assert!(text.contains(">\r\nDate: ") && text.ends_with(" +0000\r\n\r\nimplicit tls\r\n"), "{text}");
}

#[test]
fn submission_without_message_id_gets_one_and_a_date() {
    let s = setup();
    let sent = b"Subject: bare\r\n\r\nno id here\r\n";
    let file = write_tmp(&s, "b.eml", sent);
    let url = format!("smtp://{}", s.submission);
    let (ok, _, err) = run_tool(
        "curl",
        &[
            "-sS",
            &url,
            "--ssl-reqd",
            "-k",
            "-u",
            "alice@example.org:alice-pw",
            "--mail-from",
            "alice@example.org",
            "--mail-rcpt",
            "bob@example.org",
            "--upload-file",
            &file,
        ],
        None,
    );
    assert!(ok, "curl submission with STARTTLS: {err}");
    let m = messages(&fetch(&s, "bob@example.org", "bob-pw", &[]));
    let text = String::from_utf8_lossy(&m[0]);
    let headers = text.split("\r\n\r\n").next().unwrap();
    assert!(headers.contains("\r\nMessage-ID: <"), "{text}");
    assert!(headers.contains("\r\nDate: "), "{text}");
    // The MTA port adds neither: it relays others' messages unchanged.
    let mta = s.smtp.port().to_string();
    let r = py("smtp_send.py", &["127.0.0.1", &mta, "x@elsewhere.test", "bob@example.org", &file]);
    assert_eq!(r["ok"], true);
    let m = messages(&fetch(&s, "bob@example.org", "bob-pw", &[]));
    assert_delivered(&m[1], sent, "x@elsewhere.test");
    assert!(!String::from_utf8_lossy(&m[1]).contains("Message-ID:"));
}
