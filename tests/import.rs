//! Moving from an existing system, against the real binary: `hamail user
//! import` with crypt(3) hashes made by the system's own crypt (Python's
//! `crypt` module over libxcrypt), then logins with Python's poplib; `hamail
//! import mbox|maildir` of files built here, fetched back with poplib.

mod common;

use std::path::Path;

use common::{proc_kib, py, run_tool, start, Server};

/// A crypt(3) hash of `password` with the settings `salt` (`$6$...$`,
/// `$2b$05$...`, `$y$j9T$...$`), by the C library through Python.
fn crypt(password: &str, salt: &str) -> String {
    let script = "import sys, warnings\nwarnings.simplefilter('ignore')\nimport crypt\n\
                  print(crypt.crypt(sys.argv[1], sys.argv[2]))";
    let (ok, out, err) = run_tool("python3", &["-c", script, password, salt], None);
    let hash = String::from_utf8(out).expect("utf-8").trim().to_string();
    assert!(ok && hash.starts_with(&salt[..3]), "crypt({salt}): {hash} {err}");
    hash
}

fn pop3_login(s: &Server, user: &str, password: &str) -> serde_json::Value {
    py("pop3_fetch.py", &["127.0.0.1", &s.pop3.port().to_string(), user, password])
}

fn logs_in(s: &Server, user: &str, password: &str) -> bool {
    pop3_login(s, user, password)["ok"] == true
}

/// Every message of a maildrop as poplib retrieved it (lines joined with
/// CRLF, a CRLF after the last).
fn fetch(s: &Server, user: &str, password: &str) -> Vec<Vec<u8>> {
    let v = pop3_login(s, user, password);
    assert_eq!(v["ok"], true, "{v}");
    v["messages"].as_array().unwrap().iter().map(|m| hex::decode(m.as_str().unwrap()).unwrap()).collect()
}

fn write(path: &Path, bytes: &[u8]) {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).unwrap();
    }
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn user_import_keeps_crypt_hashes_and_every_format_logs_in_over_pop3() {
    let s = start("");
    s.add_domain("example.org");
    s.add_user("exists@example.org", "old-pw");
    let sha512 = crypt("sha512-pw", "$6$saltsaltsalt$");
    let sha256 = crypt("sha256-pw", "$5$rounds=6000$saltsalt$");
    let bcrypt = crypt("bcrypt-pw", "$2b$05$abcdefghijklmnopqrstuu");
    // PHP and htpasswd -B write $2y$: the same algorithm under another name.
    let bcrypt_2y = crypt("bcrypt-2y-pw", "$2b$05$ABCDEFGHIJKLMNOPQRSTUu").replacen("$2b$", "$2y$", 1);
    let yescrypt = crypt("yescrypt-pw", "$y$j9T$F5Jx5fExrKuPp53xLKQ..1$");
    let argon2 = tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(hamail_store::password::Passwords::global().hash("argon2-pw"))
        .unwrap();
    let file = s.dir.join("users.txt");
    let text = format!(
        "# users of the old server\n\
         \n\
         clear@example.org   clear pw with spaces\n\
         sha512@example.org\t{sha512}\n\
         sha256@example.org {sha256}\n\
         bcrypt@example.org {bcrypt}\n\
         bcrypt2y@example.org {bcrypt_2y}\n\
         yescrypt@example.org {yescrypt}\n\
         argon2@example.org {argon2}\n\
         dovecot@example.org {{SHA512-CRYPT}}{sha512}\n\
         broken@example.org $6$saltsalt$tooshort\n\
         stranger@other.test pw\n\
         exists@example.org new-pw\n\
         md5@example.org $1$saltsalt$0123456789abcdefghijkl\n"
    );
    write(&file, text.as_bytes());
    let name = file.display().to_string();
    let (ok, out) = s.cli(&["user", "import", &name], "");
    assert!(!ok, "failed lines make the exit status non-zero: {out}");
    assert!(out.contains("imported 8, skipped 1, failed 3"), "{out}");
    assert!(out.contains(&format!("{name}:11: '$6$saltsalt$tooshort': ")), "{out}");
    assert!(out.contains(&format!("{name}:12: stranger@other.test: domain other.test does not exist")), "{out}");
    assert!(out.contains(&format!("{name}:13: user exists@example.org already exists: skipped")), "{out}");
    assert!(out.contains(&format!("{name}:14: '$1$saltsalt$0123456789abcdefghijkl': ")), "{out}");
    assert!(out.contains("unsupported scheme '$1$s...'"), "{out}");

    for (user, password) in [
        ("clear@example.org", "clear pw with spaces"),
        ("sha512@example.org", "sha512-pw"),
        ("sha256@example.org", "sha256-pw"),
        ("bcrypt@example.org", "bcrypt-pw"),
        ("bcrypt2y@example.org", "bcrypt-2y-pw"),
        ("yescrypt@example.org", "yescrypt-pw"),
        ("argon2@example.org", "argon2-pw"),
        ("dovecot@example.org", "sha512-pw"),
    ] {
        assert!(logs_in(&s, user, password), "{user} with its old password");
        assert!(!logs_in(&s, user, &format!("{password}x")), "{user} with a wrong password");
    }
    // SMTP AUTH goes through the same check.
    let message = s.dir.join("msg.eml");
    write(&message, b"Subject: hi\r\n\r\nhello\r\n");
    let smtp = |user: &str, password: &str| {
        let args = [
            "127.0.0.1",
            &s.submission.port().to_string(),
            user,
            "clear@example.org",
            message.to_str().unwrap(),
            "--starttls",
            "--user",
            user,
            "--password",
            password,
        ]
        .map(str::to_string);
        py("smtp_send.py", &args.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let sent = smtp("bcrypt@example.org", "bcrypt-pw");
    assert_eq!(sent["ok"], true, "{sent}");
    assert_eq!(smtp("sha512@example.org", "wrong")["code"], 535);
    assert!(!logs_in(&s, "broken@example.org", "x"), "a failed line adds no user");
    assert!(logs_in(&s, "exists@example.org", "old-pw"), "skipped: the password is unchanged");

    // Again with --update and --create-domains: the same file from stdin.
    let (ok, out) = s.cli(
        &["user", "import", "-", "--update", "--create-domains"],
        "exists@example.org new-pw\nstranger@other.test stranger-pw\n",
    );
    assert!(ok, "{out}");
    assert!(out.contains("domain other.test added"), "{out}");
    assert!(out.contains("imported 1, updated 1, skipped 0, failed 0"), "{out}");
    assert!(logs_in(&s, "exists@example.org", "new-pw"));
    assert!(!logs_in(&s, "exists@example.org", "old-pw"));
    assert!(logs_in(&s, "stranger@other.test", "stranger-pw"));
}

/// A message as POP3 hands it back: CRLF line ends, a CRLF after the last
/// line, and the `Return-Path:` line of the delivery on top unless the
/// message starts with one.
fn as_retrieved(original: &[u8], return_path: &str) -> Vec<u8> {
    let mut out = Vec::new();
    if !original.starts_with(b"Return-Path:") {
        out.extend_from_slice(format!("Return-Path: <{return_path}>\r\n").as_bytes());
    }
    let mut previous = 0u8;
    for &b in original {
        if b == b'\n' && previous != b'\r' {
            out.push(b'\r');
        }
        out.push(b);
        previous = b;
    }
    if !out.ends_with(b"\r\n") {
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// mboxrd quoting: one more `>` before every `>*From ` line.
fn mboxrd_quote(message: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    for line in message.split_inclusive(|&b| b == b'\n') {
        let quotes = line.iter().take_while(|&&b| b == b'>').count();
        if line[quotes..].starts_with(b"From ") {
            out.push(b'>');
        }
        out.extend_from_slice(line);
    }
    out
}

#[test]
fn mbox_import_comes_back_byte_identical_over_pop3_and_a_rerun_adds_nothing() {
    let s = start("max_message_size = 65536");
    s.add_domain("example.org");
    s.add_user("carol@example.org", "pw");
    let first: &[u8] = b"Return-Path: <alice@example.net>\n\
Message-ID: <1@example.net>\n\
Subject: quoted lines\n\
\n\
From the start of a line\n\
>From already quoted\n\
.a line with a dot\n\
\n";
    let crlf: &[u8] = b"Message-ID: <2@example.net>\r\n\
Subject: CRLF and 8 bits\r\n\
Content-Type: text/plain; charset=iso-8859-1\r\n\
\r\n\
caf\xe9 \xff\xfe\r\n";
    let big = [b"Subject: too big\n\n".as_slice(), &vec![b'x'; 100_000], b"\n"].concat();
    let last: &[u8] = b"Message-ID: <3@example.net>\nSubject: no newline at the end\n\nlast line";
    let mut mbox = Vec::new();
    for (sender, message) in
        [("alice@example.net", first), ("bob@example.net", crlf), ("MAILER-DAEMON", &big), ("dave@example.net", last)]
    {
        mbox.extend_from_slice(format!("From {sender} Mon Dec  7 10:00:00 2026\n").as_bytes());
        mbox.extend_from_slice(&mboxrd_quote(message));
        if !std::ptr::eq(message, last) {
            mbox.extend_from_slice(if message.ends_with(b"\n") { b"\n" } else { b"\n\n" });
        }
    }
    let path = s.dir.join("carol.mbox");
    write(&path, &mbox);
    let mbox_path = path.to_str().unwrap();

    let (ok, out) = s.cli(&["import", "mbox", mbox_path, "carol@example.org"], "");
    assert!(ok, "{out}");
    assert!(out.contains("imported 3, already there 0, skipped 1 (over the size limit), failed 0"), "{out}");
    assert!(out.contains(&format!("{mbox_path}: message 3: 100019 bytes, over the size limit of 65536")), "{out}");
    let want =
        vec![as_retrieved(first, ""), as_retrieved(crlf, "bob@example.net"), as_retrieved(last, "dave@example.net")];
    assert_eq!(want[0], as_retrieved(first, "unused"), "the first keeps its own Return-Path line");
    let got = fetch(&s, "carol@example.org", "pw");
    assert_eq!(got.len(), 3);
    for (g, w) in got.iter().zip(&want) {
        assert_eq!(String::from_utf8_lossy(g), String::from_utf8_lossy(w));
        assert_eq!(g, w);
    }

    let (ok, out) = s.cli(&["import", "mbox", mbox_path, "carol@example.org"], "");
    assert!(ok, "{out}");
    assert!(out.contains("imported 0, already there 3, skipped 1"), "{out}");
    assert_eq!(fetch(&s, "carol@example.org", "pw"), got, "nothing added by the second run");

    let (ok, out) = s.cli(&["import", "mbox", mbox_path, "nobody@example.org"], "");
    assert!(!ok && out.contains("no user nobody@example.org"), "{out}");
}

#[test]
fn maildir_import_takes_the_inbox_folders_on_request_and_never_tmp() {
    let s = start("");
    s.add_domain("example.org");
    s.add_user("erin@example.org", "pw");
    let root = s.dir.join("Maildir");
    let seen: &[u8] = b"Return-Path: <x@example.net>\nMessage-ID: <a@x>\nSubject: seen\n\nread already\n";
    let fresh: &[u8] = b"Message-ID: <b@x>\r\nSubject: new\r\n\r\nunread \xc3\xa9\r\n";
    let sent: &[u8] = b"Message-ID: <c@x>\nSubject: sent\n\nI wrote this\n";
    write(&root.join("cur/1700000000.M1P1.host,S=80:2,S"), seen);
    write(&root.join("new/1700000001.M2P1.host"), fresh);
    write(&root.join("tmp/1700000002.M3P1.host"), b"Subject: half written\n");
    write(&root.join(".Sent/cur/1700000003.M4P1.host:2,S"), sent);
    std::fs::create_dir_all(root.join(".Sent/new")).unwrap();
    let root_path = root.to_str().unwrap();

    let (ok, out) = s.cli(&["import", "maildir", root_path, "erin@example.org"], "");
    assert!(ok, "{out}");
    assert!(out.contains("imported 2, already there 0, skipped 0 (over the size limit), failed 0"), "{out}");
    assert!(out.contains("folder .Sent (1 messages) not imported"), "{out}");
    assert_eq!(fetch(&s, "erin@example.org", "pw"), vec![as_retrieved(seen, ""), as_retrieved(fresh, "")]);

    let (ok, out) = s.cli(&["import", "maildir", root_path, "erin@example.org", "--all-folders"], "");
    assert!(ok, "{out}");
    assert!(out.contains("imported 1, already there 2"), "{out}");
    assert_eq!(
        fetch(&s, "erin@example.org", "pw"),
        vec![as_retrieved(seen, ""), as_retrieved(fresh, ""), as_retrieved(sent, "")]
    );
}

/// Without a running server the CLI opens the store itself: the same
/// imports, found by the server started afterwards.
#[test]
fn mail_import_without_a_running_server_goes_into_the_store() {
    let mut s = start("");
    s.add_domain("example.org");
    s.add_user("frank@example.org", "pw");
    s.terminate();
    let path = s.dir.join("frank.mbox");
    write(&path, b"From a@example.net Mon Dec  7 10:00:00 2026\nSubject: offline\n\nbody\n");
    let (ok, out) = s.cli(&["import", "mbox", path.to_str().unwrap(), "frank@example.org"], "");
    assert!(ok, "{out}");
    assert!(out.contains("imported 1, already there 0"), "{out}");
    let (ok, out) = s.cli(&["user", "import", "-"], &format!("henk@example.org {}\n", crypt("henk-pw", "$6$henk$")));
    assert!(ok && out.contains("imported 1, skipped 0, failed 0"), "{out}");
    let s = common::start_in(&s.dir.clone(), "");
    assert!(logs_in(&s, "henk@example.org", "henk-pw"));
    assert_eq!(
        fetch(&s, "frank@example.org", "pw"),
        vec![b"Return-Path: <a@example.net>\r\nSubject: offline\r\n\r\nbody\r\n".to_vec()]
    );
}

/// The maildrop keeps the order of the file, and a large message goes
/// through the server without being held: its peak memory grows by far
/// less than the message.
#[test]
fn mbox_import_keeps_the_order_and_streams_a_large_message() {
    const SMALL: usize = 300;
    const LARGE: usize = 20 * 1024 * 1024;
    let s = start("");
    s.add_domain("example.org");
    s.add_user("gina@example.org", "pw");
    let pid = s.child.as_ref().expect("server").id();
    let mut mbox = Vec::new();
    for i in 0..SMALL {
        mbox.extend_from_slice(format!("From a@example.net x\nMessage-ID: <{i}@x>\n\nbody {i}\n\n").as_bytes());
    }
    mbox.extend_from_slice(b"From a@example.net x\nMessage-ID: <large@x>\n\n");
    let line = [vec![b'y'; 999], b"\n".to_vec()].concat();
    for _ in 0..LARGE / line.len() {
        mbox.extend_from_slice(&line);
    }
    let path = s.dir.join("gina.mbox");
    write(&path, &mbox);
    let before = proc_kib(pid, "VmHWM");
    let (ok, out) = s.cli(&["import", "mbox", path.to_str().unwrap(), "gina@example.org"], "");
    assert!(ok, "{out}");
    assert!(out.contains(&format!("imported {}, already there 0", SMALL + 1)), "{out}");
    let grown_mb = proc_kib(pid, "VmHWM").saturating_sub(before) / 1024;
    eprintln!("server VmHWM grew by {grown_mb} MB for a {} MB message", LARGE >> 20);
    assert!(grown_mb < 8, "the server's peak memory grew by {grown_mb} MB");
    let got = common::mail::maildrop(s.pop3, "gina@example.org");
    assert_eq!(got.len(), SMALL + 1);
    for (i, m) in got[..SMALL].iter().enumerate() {
        let want = format!("Return-Path: <a@example.net>\r\nMessage-ID: <{i}@x>\r\n\r\nbody {i}\r\n");
        assert_eq!(String::from_utf8_lossy(m), want, "message {i} in its place");
    }
    assert_eq!(
        got[SMALL].len(),
        "Return-Path: <a@example.net>\r\nMessage-ID: <large@x>\r\n\r\n".len() + LARGE / line.len() * 1001
    );
}
