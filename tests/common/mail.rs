//! A load client and a checker shared by the crash tests: messages with a
//! unique token, recorded before they are sent and marked when they get
//! `250`, and a POP3 reader of whole maildrops.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Mutex;
use std::time::Duration;

use sha2::{Digest, Sha256};

pub const USERS: usize = 5;

pub fn user(i: usize) -> String {
    format!("user{i}@example.org")
}

#[derive(Clone)]
pub struct Sent {
    pub recipients: Vec<usize>,
    pub hash: [u8; 32],
    pub acked: bool,
}

pub fn reply(r: &mut BufReader<TcpStream>) -> std::io::Result<String> {
    loop {
        let mut l = String::new();
        if r.read_line(&mut l)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        if l.len() < 4 || l.as_bytes()[3] != b'-' {
            return Ok(l);
        }
    }
}

/// Sends one message; Ok(true) when it got 250. Records the attempt first.
pub fn send_one(
    addr: SocketAddr,
    token: &str,
    recipients: &[usize],
    size: usize,
    log: &Mutex<HashMap<String, Sent>>,
) -> std::io::Result<bool> {
    let mut content = format!("Subject: {token}\r\nX-Token: {token}\r\n\r\n").into_bytes();
    let mut i = 0u64;
    while content.len() < size {
        content.extend_from_slice(format!("{token} line {i} {}\r\n", "p".repeat((i % 60) as usize)).as_bytes());
        i += 1;
    }
    let hash: [u8; 32] = Sha256::digest(&content).into();
    log.lock().unwrap().insert(token.to_string(), Sent { recipients: recipients.to_vec(), hash, acked: false });
    let s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(20)))?;
    let mut w = s.try_clone()?;
    let mut r = BufReader::new(s);
    reply(&mut r)?;
    let mut cmds = String::from("EHLO load.test\r\nMAIL FROM:<load@elsewhere.test>\r\n");
    for &u in recipients {
        cmds.push_str(&format!("RCPT TO:<{}>\r\n", user(u)));
    }
    cmds.push_str("DATA\r\n");
    w.write_all(cmds.as_bytes())?;
    for _ in 0..(recipients.len() + 2) {
        let l = reply(&mut r)?;
        if !l.starts_with('2') {
            return Ok(false);
        }
    }
    if !reply(&mut r)?.starts_with("354") {
        return Ok(false);
    }
    w.write_all(&content)?;
    w.write_all(b".\r\n")?;
    let ok = reply(&mut r)?.starts_with("250");
    if ok {
        log.lock().unwrap().get_mut(token).expect("recorded").acked = true;
    }
    let _ = w.write_all(b"QUIT\r\n");
    Ok(ok)
}

/// Every message in a maildrop, via POP3 (RETR, un-byte-stuffed).
pub fn maildrop(addr: SocketAddr, u: &str) -> Vec<Vec<u8>> {
    let s = TcpStream::connect(addr).expect("pop3");
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut w = s.try_clone().unwrap();
    let mut r = BufReader::new(s);
    let mut line = || {
        let mut l = Vec::new();
        r.read_until(b'\n', &mut l).expect("read");
        l
    };
    assert!(line().starts_with(b"+OK"));
    w.write_all(format!("USER {u}\r\nPASS pw\r\nSTAT\r\n").as_bytes()).unwrap();
    line();
    let pass = line();
    assert!(pass.starts_with(b"+OK"), "{}", String::from_utf8_lossy(&pass));
    let stat = String::from_utf8(line()).unwrap();
    let n: usize = stat.split_whitespace().nth(1).unwrap().parse().unwrap();
    let mut out = Vec::new();
    for i in 1..=n {
        w.write_all(format!("RETR {i}\r\n").as_bytes()).unwrap();
        let answer = line();
        assert!(answer.starts_with(b"+OK"), "RETR {i} of {u}: {}", String::from_utf8_lossy(&answer));
        let mut msg = Vec::new();
        loop {
            let l = line();
            if l == b".\r\n" {
                break;
            }
            msg.extend_from_slice(if l.starts_with(b"..") { &l[1..] } else { &l });
        }
        out.push(msg);
    }
    w.write_all(b"QUIT\r\n").unwrap();
    let mut rest = Vec::new();
    let _ = r.read_to_end(&mut rest);
    out
}

pub fn token_of(msg: &[u8]) -> String {
    let text = String::from_utf8_lossy(msg);
    let start = text.find("X-Token: ").expect("token header") + 9;
    text[start..].split("\r\n").next().unwrap().to_string()
}

pub fn content_hash(msg: &[u8]) -> [u8; 32] {
    // Our trace lines end where the sent content starts: at "Subject: ".
    let pos = msg.windows(9).position(|w| w == b"Subject: ").expect("subject");
    Sha256::digest(&msg[pos..]).into()
}
