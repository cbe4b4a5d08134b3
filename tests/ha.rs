//! The seed's verification, automated (needs root; skipped otherwise): a
//! cluster in network namespaces, one message with a large attachment to
//! every user in one SMTP transaction, a stream of smaller messages from
//! concurrent clients and POP3 clients retrieving and deleting, all
//! through the group's floating address only — while the owner node loses
//! its power (cable out + SIGKILL), comes back, and the group is moved by
//! command; then the same with the other data node. At the end every
//! maildrop is read by POP3 and checked against what the clients recorded.
//!
//! Run it with `tests/ha/run.sh` (README: "Verifying failover"); the
//! environment variables below set the size. Without them it is the
//! reduced run that CI does (100 users, 100 KiB), twice: with 2 data nodes
//! and a witness (`ha_power_cut_and_switchover_under_load`), then in
//! shared-disk mode (`ha_shared_disk_under_load`; about 40 s for both on a
//! busy 2-core machine). When `HAMAIL_HA_TOPOLOGY` is set, only the first
//! runs, with that topology.
//!
//! | variable | default | meaning |
//! |---|---|---|
//! | `HAMAIL_HA_USERS` | 100 | users, all recipients of the large message |
//! | `HAMAIL_HA_SIZE` | 100K | attachment size (bytes, K or M suffix: KiB, MiB) |
//! | `HAMAIL_HA_SENDERS` | 4 | concurrent clients sending small messages |
//! | `HAMAIL_HA_POP3` | 2 | concurrent POP3 clients retrieving and deleting |
//! | `HAMAIL_HA_TOPOLOGY` | `2+witness` | or `3` (three data nodes), or `disk` (shared-disk mode, below) |
//! | `HAMAIL_HA_REPORT` | — | also write the report to this file |
//!
//! Clients behave as MTAs do: a 4xx reply, a broken connection or a
//! timeout means "send the same message again later" (RFC 5321 4.5.4.1).
//! A message whose `250` was lost in a failover is thus sent again with the
//! same Message-ID, envelope and content, and hamail recognises it
//! (RFC 1047): `250 ... already delivered as ...`; the report counts these
//! apart from duplicates, which fail the run like losses and damage do.
//!
//! Topology `disk`: 2 data nodes and a witness as in `2+witness`, and the
//! group keeps its mail on a shared disk (an ext4 filesystem on a loop
//! device, sized from users and attachment) instead of the replicated
//! store: floating address, disk, mail service. A sampler reads, every
//! [`MOUNT_SAMPLE`], which hamail processes have the disk mounted (each
//! runs in its own mount namespace) and fails the run if two ever do.
//! After a power cut of the disk's owner the survivor first waits until
//! the dead holder's disk heartbeat is stale (3.5 heartbeats), so that
//! takeover takes several seconds longer than with replication.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use common::disk::{mounted_in, LoopDisk};
use common::netns::*;
use common::*;
use sha2::{Digest, Sha256};

const VIP: &str = "198.18.0.100";
/// Generous: a takeover takes lease + stop budget + margin (0.8 s by
/// default; 2.7 s with the shared disk, which also waits for the dead
/// holder's disk heartbeat to go stale) plus the commit and the start, on
/// a machine busy with the load.
const RECOVERY: Duration = Duration::from_secs(60);
/// How long a client waits for a reply before it takes the connection for
/// lost (an MTA waits minutes; the harness would only get slower).
const REPLY_TIMEOUT: Duration = Duration::from_secs(15);
const BOUNDARY: &str = "HA-BOUNDARY-7f3a";

fn vip(port: u16) -> SocketAddr {
    SocketAddr::new(VIP.parse().unwrap(), port)
}

fn user(u: usize) -> String {
    format!("u{u}@example.org")
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Topology {
    TwoPlusWitness,
    Three,
    /// 2 data nodes + witness, the group's mail on a shared disk.
    Disk,
}

impl Topology {
    fn describe(self) -> &'static str {
        match self {
            Topology::TwoPlusWitness => "2 data nodes + witness",
            Topology::Three => "3 data nodes",
            Topology::Disk => "2 data nodes + witness, shared disk (ext4 on a loop device)",
        }
    }
}

struct Params {
    users: usize,
    size: usize,
    senders: usize,
    pop3_clients: usize,
    topology: Topology,
}

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).ok().filter(|v| !v.is_empty()).unwrap_or_else(|| default.to_string())
}

fn parse_size(s: &str) -> usize {
    let s = s.trim();
    let (num, mult) = match s.chars().last() {
        Some('K' | 'k') => (&s[..s.len() - 1], 1024),
        Some('M' | 'm') => (&s[..s.len() - 1], 1024 * 1024),
        _ => (s, 1),
    };
    num.parse::<usize>().unwrap_or_else(|_| panic!("HAMAIL_HA_SIZE: '{s}' is not a size (e.g. 100K, 1M)")) * mult
}

impl Params {
    fn from_env() -> Params {
        let int = |name: &str, default: &str| -> usize {
            let v = env_or(name, default);
            v.parse().unwrap_or_else(|_| panic!("{name}: '{v}' is not a number"))
        };
        let topology = match env_or("HAMAIL_HA_TOPOLOGY", "2+witness").as_str() {
            "2+witness" => Topology::TwoPlusWitness,
            "3" => Topology::Three,
            "disk" => Topology::Disk,
            other => panic!("HAMAIL_HA_TOPOLOGY: '{other}' is not one of 2+witness, 3, disk"),
        };
        let p = Params {
            users: int("HAMAIL_HA_USERS", "100"),
            size: parse_size(&env_or("HAMAIL_HA_SIZE", "100K")),
            senders: int("HAMAIL_HA_SENDERS", "4"),
            pop3_clients: int("HAMAIL_HA_POP3", "2"),
            topology,
        };
        assert!(
            (1..=1000).contains(&p.users),
            "HAMAIL_HA_USERS must be 1..=1000 (one transaction, [smtp] max_recipients)"
        );
        assert!(p.pop3_clients >= 1 && p.senders >= 1);
        p
    }

    /// The shared disk's size in MiB: the large message once (stored once,
    /// base64 adds a third), small messages and metadata per user, and
    /// headroom; at least 64 MiB.
    fn disk_mib(&self) -> u32 {
        let bytes = 4 * self.size + self.users * 64 * 1024;
        u32::try_from(bytes.div_ceil(1 << 20).max(64)).expect("disk size")
    }
}

// ---------------------------------------------------------------- records

/// A message as its sender recorded it (before the first attempt).
struct Sent {
    recipients: Vec<usize>,
    /// SHA-256 of what the client sent as DATA (un-stuffed).
    content: [u8; 32],
    /// SHA-256 of the decoded attachment, for the large message.
    attachment: Option<[u8; 32]>,
    attempts: u32,
    acked: bool,
    /// A `250` that said "already delivered": the server recognised a
    /// resend of a transaction whose first `250` the client never got.
    recognised_resend: bool,
    /// Why attempts failed (4xx reply or connection error), by kind.
    failures: BTreeMap<String, u32>,
}

/// One message as a POP3 client found it.
#[derive(Clone, Debug)]
struct Found {
    token: Option<String>,
    /// SHA-256 from the client's first header on (our trace lines and
    /// Return-Path before it are not what the client sent).
    content: Option<[u8; 32]>,
    attachment: Option<[u8; 32]>,
}

#[derive(Default)]
struct Journal {
    sent: Mutex<HashMap<String, Sent>>,
    smtp_ok: Mutex<Vec<Instant>>,
    pop3_ok: Mutex<Vec<Instant>>,
    /// Retrieved, and the deletion confirmed by `+OK` to QUIT.
    taken: Mutex<Vec<(usize, Found)>>,
    /// Retrieved, but QUIT got no answer: deleted or not, unknown.
    maybe_taken: Mutex<Vec<(usize, Found)>>,
    problems: Mutex<Vec<String>>,
}

impl Journal {
    fn problem(&self, p: String) {
        eprintln!("ha: {p}");
        self.problems.lock().unwrap().push(p);
    }
}

// ---------------------------------------------------------------- messages

/// A deterministic pseudo-random byte string (xorshift64*).
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len);
    out
}

fn headers(token: &str, subject: &str) -> String {
    format!(
        "X-HA-Token: {token}\r\nMessage-ID: <{token}.{}@client.ha.test>\r\nFrom: <sender@client.ha.test>\r\n\
         To: <undisclosed-recipients:;>\r\nSubject: {subject}\r\nDate: Thu, 01 Jan 2026 00:00:00 +0000\r\n",
        std::process::id()
    )
}

/// The large message: text and a base64 attachment (RFC 2045 lines of 76).
fn big_message(size: usize) -> (Vec<u8>, [u8; 32]) {
    let blob = noise(size, 0x5eed);
    let sum: [u8; 32] = Sha256::digest(&blob).into();
    let b64 = base64::engine::general_purpose::STANDARD.encode(&blob);
    let mut m = headers("big", &format!("attachment of {size} bytes"));
    m.push_str(&format!(
        "MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"{BOUNDARY}\"\r\n\r\n\
         --{BOUNDARY}\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\nThe attachment's SHA-256 is {}.\r\n\
         --{BOUNDARY}\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\
         Content-Disposition: attachment; filename=\"blob.bin\"\r\n\r\n",
        hex::encode(sum)
    ));
    for line in b64.as_bytes().chunks(76) {
        m.push_str(std::str::from_utf8(line).unwrap());
        m.push_str("\r\n");
    }
    m.push_str(&format!("--{BOUNDARY}--\r\n"));
    (m.into_bytes(), sum)
}

fn small_message(token: &str, len: usize) -> Vec<u8> {
    let mut m = headers(token, &format!("small {token}")).into_bytes();
    m.extend_from_slice(b"\r\n");
    let mut i = 0;
    while m.len() < len {
        // A leading dot on some lines: the transparency (RFC 5321 4.5.2)
        // is part of what must come back byte-identical.
        m.extend_from_slice(
            format!("{}{token} line {i} {}\r\n", if i % 7 == 0 { "." } else { "" }, "x".repeat(i % 50)).as_bytes(),
        );
        i += 1;
    }
    m
}

fn dot_stuff(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + 64);
    let mut at_line_start = true;
    for &b in data {
        if at_line_start && b == b'.' {
            out.push(b'.');
        }
        out.push(b);
        at_line_start = b == b'\n';
    }
    out
}

/// What a retrieved message is, against what was sent.
fn analyse(msg: &[u8]) -> Found {
    let Some(start) = msg.windows(12).position(|w| w == b"X-HA-Token: ") else {
        return Found { token: None, content: None, attachment: None };
    };
    let content = &msg[start..];
    let token = content[12..].split(|&b| b == b'\r').next().map(|t| String::from_utf8_lossy(t).to_string());
    let attachment = attachment_of(content);
    Found { token, content: Some(Sha256::digest(content).into()), attachment }
}

fn attachment_of(content: &[u8]) -> Option<[u8; 32]> {
    let text = std::str::from_utf8(content).ok()?;
    let part = text.find("Content-Transfer-Encoding: base64")?;
    let body_start = part + text[part..].find("\r\n\r\n")? + 4;
    let end = body_start + text[body_start..].find(&format!("--{BOUNDARY}--"))?;
    let b64: String = text[body_start..end].chars().filter(|c| !c.is_ascii_whitespace()).collect();
    let blob = base64::engine::general_purpose::STANDARD.decode(b64).ok()?;
    Some(Sha256::digest(&blob).into())
}

// ---------------------------------------------------------------- SMTP client

enum Outcome {
    /// The `250` line.
    Accepted(String),
    /// 4xx, a broken connection or a timeout: send again later.
    Again(String),
    Refused(String),
}

fn classify(line: String) -> Outcome {
    if line.starts_with('5') {
        Outcome::Refused(line.trim_end().to_string())
    } else {
        Outcome::Again(line.trim_end().to_string())
    }
}

/// One SMTP transaction through the floating address; `sent` is called
/// once the whole message is written, before the final reply is read.
fn smtp_transaction(rcpts: &[usize], data: &[u8], sent: &mut dyn FnMut()) -> Outcome {
    match try_smtp(rcpts, data, sent) {
        Ok(o) => o,
        Err(e) => Outcome::Again(format!("connection: {e}")),
    }
}

fn try_smtp(rcpts: &[usize], data: &[u8], sent: &mut dyn FnMut()) -> std::io::Result<Outcome> {
    let s = TcpStream::connect_timeout(&vip(2525), Duration::from_secs(1))?;
    s.set_read_timeout(Some(REPLY_TIMEOUT))?;
    s.set_write_timeout(Some(REPLY_TIMEOUT))?;
    let mut w = s.try_clone()?;
    let mut r = BufReader::new(s);
    let greeting = mail::reply(&mut r)?;
    if !greeting.starts_with("220") {
        return Ok(classify(greeting));
    }
    // PIPELINING (RFC 2920): the whole envelope in one write.
    let mut cmds = String::from("EHLO client.ha.test\r\nMAIL FROM:<sender@client.ha.test>\r\n");
    for &u in rcpts {
        cmds.push_str(&format!("RCPT TO:<{}>\r\n", user(u)));
    }
    cmds.push_str("DATA\r\n");
    w.write_all(cmds.as_bytes())?;
    let mut first_failure = None;
    for _ in 0..rcpts.len() + 2 {
        let l = mail::reply(&mut r)?;
        if !l.starts_with('2') && first_failure.is_none() {
            first_failure = Some(l);
        }
    }
    let data_reply = mail::reply(&mut r)?;
    if let Some(f) = first_failure {
        // Dropping the connection abandons the transaction (no DATA sent).
        return Ok(classify(f));
    }
    if !data_reply.starts_with("354") {
        return Ok(classify(data_reply));
    }
    w.write_all(&dot_stuff(data))?;
    w.write_all(b".\r\n")?;
    sent();
    let l = mail::reply(&mut r)?;
    if l.starts_with("250") {
        let _ = w.write_all(b"QUIT\r\n");
        Ok(Outcome::Accepted(l.trim_end().to_string()))
    } else {
        Ok(classify(l))
    }
}

/// Sends `data` to `rcpts` until it gets `250` (or a 5xx), as an MTA does.
/// Gives up (a problem in the report) after `RECOVERY` without success.
fn send_until_accepted(
    j: &Journal,
    token: &str,
    rcpts: &[usize],
    data: &[u8],
    attachment: Option<[u8; 32]>,
    mut sent: impl FnMut(),
) {
    j.sent.lock().unwrap().insert(
        token.to_string(),
        Sent {
            recipients: rcpts.to_vec(),
            content: Sha256::digest(data).into(),
            attachment,
            attempts: 0,
            acked: false,
            recognised_resend: false,
            failures: BTreeMap::new(),
        },
    );
    let started = Instant::now();
    let mut last: String;
    loop {
        j.sent.lock().unwrap().get_mut(token).unwrap().attempts += 1;
        match smtp_transaction(rcpts, data, &mut sent) {
            Outcome::Accepted(line) => {
                j.smtp_ok.lock().unwrap().push(Instant::now());
                let mut sent = j.sent.lock().unwrap();
                let rec = sent.get_mut(token).unwrap();
                rec.acked = true;
                rec.recognised_resend = line.contains("already delivered");
                return;
            }
            Outcome::Refused(line) => {
                j.problem(format!("{token}: refused: {line}"));
                return;
            }
            Outcome::Again(why) => {
                // The kind: the reply code, or the error without details.
                let kind: String =
                    why.split([':', '(']).take(2).collect::<Vec<_>>().join(":").chars().take(60).collect();
                *j.sent.lock().unwrap().get_mut(token).unwrap().failures.entry(kind).or_default() += 1;
                last = why;
            }
        }
        if started.elapsed() > RECOVERY {
            j.problem(format!("{token}: no 250 within {RECOVERY:?} (last: {last})"));
            return;
        }
        // An MTA's retry interval, shortened.
        std::thread::sleep(Duration::from_millis(100));
    }
}

// ---------------------------------------------------------------- POP3 client

fn pop3_line(r: &mut BufReader<TcpStream>) -> std::io::Result<Vec<u8>> {
    let mut l = Vec::new();
    r.read_until(b'\n', &mut l)?;
    if l.is_empty() {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    Ok(l)
}

fn pop3_ok(r: &mut BufReader<TcpStream>, what: &str) -> std::io::Result<()> {
    let l = pop3_line(r)?;
    if l.starts_with(b"+OK") {
        Ok(())
    } else {
        Err(std::io::Error::other(format!("{what}: {}", String::from_utf8_lossy(&l).trim_end())))
    }
}

/// The end of a POP3 session that retrieved messages.
enum Quit {
    /// `+OK`: the deletions are committed (RFC 1939 6).
    Done,
    /// No answer: committed or not, unknown.
    Unknown,
}

/// One POP3 session for `u`: every message retrieved (and marked deleted
/// when `delete`), then QUIT. `Err` before QUIT: nothing was deleted.
fn pop3_session(j: Option<&Journal>, u: usize, delete: bool) -> std::io::Result<(Vec<Found>, Quit)> {
    let s = TcpStream::connect_timeout(&vip(2110), Duration::from_secs(1))?;
    s.set_read_timeout(Some(REPLY_TIMEOUT))?;
    s.set_write_timeout(Some(REPLY_TIMEOUT))?;
    let mut w = s.try_clone()?;
    let mut r = BufReader::new(s);
    pop3_ok(&mut r, "greeting")?;
    w.write_all(format!("USER {}\r\nPASS pw\r\nSTAT\r\n", user(u)).as_bytes())?;
    pop3_ok(&mut r, "USER")?;
    pop3_ok(&mut r, "PASS")?;
    if let Some(j) = j {
        j.pop3_ok.lock().unwrap().push(Instant::now());
    }
    let stat = pop3_line(&mut r)?;
    let n: usize = String::from_utf8_lossy(&stat)
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("STAT: {}", String::from_utf8_lossy(&stat).trim_end())))?;
    let mut found = Vec::with_capacity(n);
    for i in 1..=n {
        w.write_all(format!("RETR {i}\r\n").as_bytes())?;
        pop3_ok(&mut r, "RETR")?;
        let mut msg = Vec::new();
        loop {
            let l = pop3_line(&mut r)?;
            if l == b".\r\n" {
                break;
            }
            msg.extend_from_slice(if l.starts_with(b"..") { &l[1..] } else { &l });
        }
        found.push(analyse(&msg));
        if delete {
            w.write_all(format!("DELE {i}\r\n").as_bytes())?;
            pop3_ok(&mut r, "DELE")?;
        }
    }
    w.write_all(b"QUIT\r\n")?;
    let quit = match pop3_line(&mut r) {
        Ok(l) if l.starts_with(b"+OK") => Quit::Done,
        Ok(l) => return Err(std::io::Error::other(format!("QUIT: {}", String::from_utf8_lossy(&l).trim_end()))),
        Err(_) => Quit::Unknown,
    };
    if let (Some(j), Quit::Done) = (j, &quit) {
        j.pop3_ok.lock().unwrap().push(Instant::now());
    }
    let mut rest = Vec::new();
    let _ = r.read_to_end(&mut rest);
    Ok((found, quit))
}

// ---------------------------------------------------------------- the bed

type Ha = NsCluster;

impl NsCluster {
    /// The cluster (node 3 a witness or a data node), the users, and the
    /// group online at node 1; with `disk` (topology `disk`) the group
    /// mounts it on [`Self::spool`] and keeps its mail there.
    fn start(p: &Params, disk: Option<&LoopDisk>) -> Ha {
        let t = Instant::now();
        let roles = match p.topology {
            Topology::TwoPlusWitness | Topology::Disk => ["data", "data", "witness"],
            Topology::Three => ["data"; 3],
        };
        let users: Vec<String> = (0..p.users).map(user).collect();
        let ha = NsCluster::form_with(roles, &users, RECOVERY);
        eprintln!("ha: cluster formed with {} users in {:.1} s", p.users, t.elapsed().as_secs_f64());
        let members = if p.topology == Topology::Three { "[1, 2, 3]" } else { "[1, 2]" };
        // Before mail_service: the mail service opens its store on the disk.
        let disk_resource = disk.map_or(String::new(), |d| {
            format!(
                "[[group.resources]]\ntype = \"disk\"\nname = \"spool\"\ndevice = \"{}\"\nmount_point = \"{}\"\nfs_type = \"ext4\"\n\n",
                d.device,
                ha.spool().display()
            )
        });
        ha.apply(
            0,
            &format!(
                "[[group]]\nname = \"mail\"\nnodes = {members}\nfailback = \"manual\"\nmax_restarts = 1\n\n\
                 [[group.resources]]\ntype = \"floating_ip\"\nname = \"vip\"\naddress = \"{VIP}/24\"\ninterface = \"{IFACE}\"\n\n\
                 {disk_resource}\
                 [[group.resources]]\ntype = \"mail_service\"\nname = \"mail\"\n"
            ),
        );
        if poll(RECOVERY, || ha.greeting().filter(|h| h == "node1")).is_none() {
            panic!(
                "the group is not online at node 1:\n{}\n{}",
                ha.nodes[0].cli(&["group", "status"], "").1,
                ha.logs()
            );
        }
        ha
    }

    fn greeting(&self) -> Option<String> {
        self.bed.run_in("cl", || greeting(vip(2525)))
    }

    /// The node (0-based) the operator last moved the group to, if that
    /// is its target, as node `via` sees it.
    fn target(&self, via: usize) -> Option<usize> {
        let (ok, out) = self.nodes[via].cli(&["group", "status", "--json"], "");
        let v: serde_json::Value = serde_json::from_str(&out).ok().filter(|_| ok)?;
        let g = v.as_array()?.iter().find(|g| g["spec"]["name"] == "mail")?;
        g["placement"]["target"]["Node"].as_u64().map(|n| n as usize - 1)
    }

    /// The node (0-based) whose greeting answers at the floating address.
    fn owner(&self) -> Option<usize> {
        self.greeting().and_then(|h| h.strip_prefix("node")?.parse::<usize>().ok()).map(|n| n - 1)
    }

    /// The shared disk's mount point (in each node's own mount namespace).
    fn spool(&self) -> PathBuf {
        self.root.path().join("spool")
    }

    /// The pid of each node's running hamail process.
    fn pids(&self) -> [Option<u32>; 3] {
        std::array::from_fn(|i| self.nodes[i].server.as_ref().and_then(|s| s.child.as_ref()).map(|c| c.id()))
    }

    /// Power back: cable in, process restarted; waits until it caught up.
    fn power_back(&mut self, v: usize, via: usize) {
        self.power_on(v);
        if poll(RECOVERY, || self.all_healthy(via).then_some(())).is_none() {
            panic!("node{} did not catch up after its restart: {:?}\n{}", v + 1, self.nodes[via].status(), self.logs());
        }
    }

    fn switchover(&self, to: usize, via: usize) {
        let (ok, out) = self.nodes[via].cli(&["group", "move", "mail", &(to + 1).to_string()], "");
        assert!(ok, "group move mail {}: {out}", to + 1);
    }

    fn wait_owner(&self, v: usize, what: &str) -> Duration {
        let t = Instant::now();
        let host = format!("node{}", v + 1);
        if poll(RECOVERY, || self.greeting().filter(|h| *h == host)).is_none() {
            let via = if v == 0 { 1 } else { 0 };
            panic!(
                "{what}: the group did not come online at {host}:\n{}\n{}",
                self.nodes[via].cli(&["group", "status"], "").1,
                self.logs()
            );
        }
        t.elapsed()
    }
}

// ---------------------------------------------------------------- the shared disk

/// How often the mount sampler looks: a takeover of the disk takes
/// seconds (its stop, then the next node's heartbeat check), so two
/// mounts at once would last far longer than this.
const MOUNT_SAMPLE: Duration = Duration::from_millis(20);

/// Whether `cmdline` (/proc/PID/cmdline: arguments ending in NUL) is
/// `hamail --config CONFIG serve`, or the `ip netns exec ...` about to
/// become it.
fn serves_with(cmdline: &[u8], config: &Path) -> bool {
    let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).filter(|a| !a.is_empty()).collect();
    let config = config.as_os_str().as_encoded_bytes();
    args.last() == Some(&&b"serve"[..]) && args.windows(2).any(|w| w[0] == b"--config" && w[1] == config)
}

/// The processes serving each node's config, found in /proc at every
/// sample: a node restarted after a power cut is seen from its first
/// instant (no pid to hand over, no moment unwatched).
fn node_processes(configs: &[PathBuf; 3]) -> [Vec<u32>; 3] {
    let mut found: [Vec<u32>; 3] = Default::default();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
        // Gone meanwhile: nothing to see.
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else { continue };
        for (i, config) in configs.iter().enumerate() {
            if serves_with(&cmdline, config) {
                found[i].push(pid);
            }
        }
    }
    found
}

/// Which nodes have the disk mounted at `mount_point` in one of their
/// processes (each `ip netns exec` has its own mount namespace).
fn mounted_by(procs: &[Vec<u32>; 3], mount_point: &Path) -> Vec<usize> {
    (0..3).filter(|&i| procs[i].iter().any(|&pid| mounted_in(pid, mount_point))).collect()
}

fn node_list(nodes: &[usize]) -> String {
    if nodes.is_empty() {
        return "none".into();
    }
    nodes.iter().map(|n| format!("node{}", n + 1)).collect::<Vec<_>>().join("+")
}

/// A thread sampling, every [`MOUNT_SAMPLE`], which nodes have the shared
/// disk mounted, for the whole run.
struct MountWatch {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<MountLog>,
}

#[derive(Default)]
struct MountLog {
    samples: usize,
    /// Samples with more than one node holding the mount: (seconds since
    /// the load started, nodes).
    twice: Vec<(f64, Vec<usize>)>,
    /// Who had it mounted, at each change.
    holders: Vec<(f64, Vec<usize>)>,
}

impl MountWatch {
    /// `configs`: each node's config file, by which its server process is
    /// found.
    fn start(origin: Instant, mount_point: PathBuf, configs: [PathBuf; 3]) -> MountWatch {
        let stop = Arc::new(AtomicBool::new(false));
        let st = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut log = MountLog::default();
            while !st.load(Ordering::Relaxed) {
                let m = mounted_by(&node_processes(&configs), &mount_point);
                let at = origin.elapsed().as_secs_f64();
                log.samples += 1;
                if m.len() > 1 {
                    eprintln!("ha: the shared disk is mounted by {} at once ({at:.2} s)", node_list(&m));
                    log.twice.push((at, m.clone()));
                }
                if log.holders.last().map(|(_, h)| h) != Some(&m) {
                    log.holders.push((at, m));
                }
                std::thread::sleep(MOUNT_SAMPLE);
            }
            log
        });
        MountWatch { stop, thread }
    }

    fn finish(self) -> MountLog {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap_or_else(|e| std::panic::resume_unwind(e))
    }
}

impl MountLog {
    fn text(&self) -> String {
        let turns: Vec<String> = self.holders.iter().map(|(t, h)| format!("{} at {t:.1} s", node_list(h))).collect();
        let twice = match self.twice.first() {
            None => "never by two nodes at once".to_string(),
            Some((t, m)) => format!(
                "MOUNTED BY TWO NODES AT ONCE in {} samples, first {} at {t:.2} s",
                self.twice.len(),
                node_list(m)
            ),
        };
        format!(
            "shared disk: mounts sampled {} times (every {} ms): {twice}; mounted by: {}\n",
            self.samples,
            MOUNT_SAMPLE.as_millis(),
            turns.join(", ")
        )
    }
}

/// The filesystem's and the store's usage as the owner (`pid`) sees it, and whether the
/// group's store is there: `(used KiB, size KiB, store KiB)`.
fn disk_usage(pid: u32, mount_point: &Path) -> Result<(u64, u64, u64), String> {
    // The owner's view: its mount namespace, through /proc/PID/root.
    let at = Path::new(&format!("/proc/{pid}/root")).join(mount_point.strip_prefix("/").unwrap_or(mount_point));
    let run = |args: &[&str], path: &Path| -> Result<String, String> {
        let out = std::process::Command::new(args[0])
            .args(&args[1..])
            .arg(path)
            .output()
            .map_err(|e| format!("{}: {e}", args[0]))?;
        if !out.status.success() {
            return Err(format!(
                "{} {}: {}",
                args.join(" "),
                path.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(String::from_utf8_lossy(&out.stdout).to_string())
    };
    // statfs(2) of the path itself (df would look the path up in its own
    // mount table): block size, blocks, free blocks.
    let st = run(&["stat", "-f", "-c", "%S %b %f"], &at)?;
    let nums: Vec<u64> = st.split_whitespace().filter_map(|n| n.parse().ok()).collect();
    let [bsize, blocks, free] = nums[..] else { return Err(format!("stat -f: {st}")) };
    let (used, size) = ((blocks - free) * bsize / 1024, blocks * bsize / 1024);
    let store = at.join("hamail-store");
    if !store.is_dir() {
        return Err(format!("no store on the disk ({} is not a directory)", store.display()));
    }
    let du = run(&["du", "-sk"], &store)?;
    let kib = du.split_whitespace().next().and_then(|n| n.parse().ok()).ok_or_else(|| format!("du: {du}"))?;
    Ok((used, size, kib))
}

// ---------------------------------------------------------------- events

struct Event {
    what: String,
    t0: Instant,
    /// Until the client got the new owner's greeting.
    takeover: Duration,
    /// The end of the window for its outage; `None`: the next event's
    /// start (or the end of the load).
    end: Option<Instant>,
}

/// The longest time without a success in [t0, end]: from t0 to the first
/// success, or between two successes. `(outage, whether a success came)`.
fn outage(successes: &[Instant], t0: Instant, end: Instant) -> (Duration, bool) {
    let mut prev = t0;
    let mut worst = Duration::ZERO;
    let mut any = false;
    for &s in successes.iter().filter(|s| **s > t0 && **s <= end) {
        worst = worst.max(s - prev);
        prev = s;
        any = true;
    }
    if !any {
        return (end - t0, false);
    }
    (worst, true)
}

fn fmt_outage((d, any): (Duration, bool)) -> String {
    if any {
        format!("{:.2} s", d.as_secs_f64())
    } else {
        format!(">= {:.2} s (no success before the next event)", d.as_secs_f64())
    }
}

/// Waits until both protocols succeeded a few times since `since`: the
/// load runs between events.
fn steady(j: &Journal, since: Instant) {
    let ok = poll(RECOVERY, || {
        let smtp = j.smtp_ok.lock().unwrap().iter().filter(|t| **t > since).count();
        let pop3 = j.pop3_ok.lock().unwrap().iter().filter(|t| **t > since).count();
        (smtp >= 10 && pop3 >= 2).then_some(())
    });
    if ok.is_none() {
        j.problem("the load made no progress after an event".into());
    }
}

// ---------------------------------------------------------------- the test

/// The run the environment asks for (by default the reduced run with 2
/// data nodes and a witness).
#[test]
fn ha_power_cut_and_switchover_under_load() {
    if !root_or_skip("ha_power_cut_and_switchover_under_load") {
        return;
    }
    let p = Params::from_env();
    // Asked for by name: no loop device is a failure, not a skip.
    let disk = (p.topology == Topology::Disk).then(|| {
        LoopDisk::new(p.disk_mib())
            .unwrap_or_else(|| panic!("topology disk: no loop-device disk on this machine (see above)"))
    });
    run(p, disk);
}

/// The same in shared-disk mode (what CI runs besides the one above: the
/// reduced sizes unless the environment sets others). Left to the test
/// above when `HAMAIL_HA_TOPOLOGY` chooses a topology (`tests/ha/run.sh`
/// always does).
#[test]
fn ha_shared_disk_under_load() {
    if !root_or_skip("ha_shared_disk_under_load") {
        return;
    }
    if std::env::var("HAMAIL_HA_TOPOLOGY").is_ok_and(|t| !t.is_empty()) {
        eprintln!("ha_shared_disk_under_load: skipped: HAMAIL_HA_TOPOLOGY is set, ha_power_cut_and_switchover_under_load runs that topology");
        return;
    }
    let p = Params { topology: Topology::Disk, ..Params::from_env() };
    // LoopDisk::new says why it is skipped.
    let Some(disk) = LoopDisk::new(p.disk_mib()) else { return };
    run(p, Some(disk));
}

/// One run: cluster, load, events, audit, report; panics on any fault.
/// `disk`: the shared disk of topology `disk`.
fn run(p: Params, disk: Option<LoopDisk>) {
    // One run at a time: two would share the 2 cores and distort each
    // other's timings.
    static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let topo = match p.topology {
        Topology::Disk => format!("{} of {} MiB", p.topology.describe(), p.disk_mib()),
        t => t.describe().to_string(),
    };
    eprintln!(
        "ha: {topo}, {} users, attachment {} bytes, {} senders, {} POP3 clients",
        p.users, p.size, p.senders, p.pop3_clients
    );
    let started = Instant::now();
    // `disk`, a parameter, is dropped after `ha`: detached after the
    // cluster's processes are gone.
    let mut ha = Ha::start(&p, disk.as_ref());
    eprintln!("ha: group online at node1 after {:.1} s", started.elapsed().as_secs_f64());
    // Times in the report count from here (the events' and the mounts').
    let origin = Instant::now();
    let mounts =
        disk.as_ref().map(|_| MountWatch::start(origin, ha.spool(), std::array::from_fn(|i| ha.nodes[i].config())));

    let j = Arc::new(Journal::default());
    let stop = Arc::new(AtomicBool::new(false));
    let big_sent = Arc::new(AtomicBool::new(false));
    let cl = ha.bed.netns_path("cl");
    let (big, big_sum) = big_message(p.size);
    let mut threads = Vec::new();

    // The large message, to every user in one transaction.
    {
        let (j, cl, big_sent) = (j.clone(), cl.clone(), big_sent.clone());
        let rcpts: Vec<usize> = (0..p.users).collect();
        threads.push(std::thread::spawn(move || {
            enter_netns(&cl);
            send_until_accepted(&j, "big", &rcpts, &big, Some(big_sum), || big_sent.store(true, Ordering::SeqCst));
        }));
    }
    // Small messages, each with its own token, to one to three users.
    for k in 0..p.senders {
        let (j, cl, stop) = (j.clone(), cl.clone(), stop.clone());
        let users = p.users;
        threads.push(std::thread::spawn(move || {
            enter_netns(&cl);
            let mut i = 0usize;
            while !stop.load(Ordering::Relaxed) {
                let token = format!("s{k}-{i}");
                let first = (k * 7919 + i * 104_729) % users;
                let n = 1 + (i % 3).min(users - 1);
                let rcpts: Vec<usize> =
                    (0..n).map(|d| (first + d * 31) % users).collect::<HashSet<_>>().into_iter().collect();
                let data = small_message(&token, 1024 + (i % 4) * 1024);
                send_until_accepted(&j, &token, &rcpts, &data, None, || {});
                i += 1;
            }
        }));
    }
    // POP3 clients, each for its own share of the users (one session per
    // maildrop at a time: RFC 1939 lets a server lock it).
    for c in 0..p.pop3_clients {
        let (j, cl, stop) = (j.clone(), cl.clone(), stop.clone());
        let (users, clients) = (p.users, p.pop3_clients);
        threads.push(std::thread::spawn(move || {
            enter_netns(&cl);
            let mine: Vec<usize> = (0..users).filter(|u| u % clients == c).collect();
            let mut i = 0usize;
            while !stop.load(Ordering::Relaxed) && !mine.is_empty() {
                let u = mine[(i * 13) % mine.len()];
                i += 1;
                match pop3_session(Some(&j), u, true) {
                    Ok((found, Quit::Done)) => j.taken.lock().unwrap().extend(found.into_iter().map(|f| (u, f))),
                    Ok((found, Quit::Unknown)) => {
                        j.maybe_taken.lock().unwrap().extend(found.into_iter().map(|f| (u, f)))
                    }
                    // Nothing deleted: those messages are read again later.
                    Err(_) => std::thread::sleep(Duration::from_millis(100)),
                }
            }
        }));
    }

    // The scenario. The first power cut comes while the large message
    // waits for its 250 (or right after it got it, on a fast machine).
    let mut events: Vec<Event> = Vec::new();
    // Watched closely (not `poll`'s 20 ms): its commit may take only a few.
    let deadline = Instant::now() + RECOVERY;
    while !big_sent.load(Ordering::SeqCst) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_micros(200));
    }
    if !big_sent.load(Ordering::SeqCst) {
        j.problem("the large message was not sent".into());
    }
    for victim in [0usize, 1] {
        let owner = ha.owner().unwrap_or_else(|| panic!("no owner answers at {VIP}\n{}", ha.logs()));
        if owner != victim {
            let t0 = Instant::now();
            ha.switchover(victim, victim);
            let takeover = ha.wait_owner(victim, "switchover");
            events.push(Event {
                what: format!("switchover node{} -> node{}", owner + 1, victim + 1),
                t0,
                takeover,
                end: None,
            });
            steady(&j, Instant::now());
        }
        let survivor = 1 - victim;
        let t0 = Instant::now();
        ha.power_cut(victim);
        let takeover = ha.wait_owner(survivor, "power cut");
        events.push(Event {
            what: format!("power cut of node{} (owner), takeover by node{}", victim + 1, survivor + 1),
            t0,
            takeover,
            end: None,
        });
        let back = Instant::now();
        ha.power_back(victim, survivor);
        steady(&j, Instant::now());
        // The cut's outage window runs until the load is steady again with
        // the power back (clients hanging on a connection to the dead node
        // fail fast only once its cable is in again).
        events.last_mut().unwrap().end = Some(Instant::now());
        if ha.target(survivor) == Some(victim) {
            // Still the group's target from the move before the cut: the
            // cluster moves it back by itself once the node is live again
            // (GroupTarget::Node: "on this node while it is live"),
            // usually while it restarts.
            ha.wait_owner(victim, "return to the target");
            events.push(Event {
                what: format!(
                    "power back at node{v}: the group returns to node{v} with no command (its target since the last move; failback manual)",
                    v = victim + 1
                ),
                t0: back,
                takeover: back.elapsed(),
                end: None,
            });
        } else {
            let t0 = Instant::now();
            ha.switchover(victim, survivor);
            let takeover = ha.wait_owner(victim, "switchover");
            events.push(Event {
                what: format!("switchover node{} -> node{}", survivor + 1, victim + 1),
                t0,
                takeover,
                end: None,
            });
        }
        steady(&j, Instant::now());
    }
    stop.store(true, Ordering::Relaxed);
    let load_end = Instant::now();
    for t in threads {
        t.join().unwrap_or_else(|e| std::panic::resume_unwind(e));
    }
    let ends: Vec<Instant> = (0..events.len())
        .map(|i| events[i].end.unwrap_or_else(|| events.get(i + 1).map(|e| e.t0).unwrap_or(load_end)))
        .collect();

    // The audit: every maildrop through the floating address.
    let audit_t = Instant::now();
    let finals: Mutex<Vec<(usize, Found)>> = Mutex::new(Vec::new());
    let next = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| {
                enter_netns(&cl);
                loop {
                    let u = next.fetch_add(1, Ordering::Relaxed);
                    if u >= p.users {
                        return;
                    }
                    let mut last = None;
                    let found = poll(RECOVERY, || match pop3_session(None, u, false) {
                        Ok((found, Quit::Done)) => Some(found),
                        Ok((_, Quit::Unknown)) => None,
                        Err(e) => {
                            last = Some(e.to_string());
                            None
                        }
                    });
                    match found {
                        Some(f) => finals.lock().unwrap().extend(f.into_iter().map(|f| (u, f))),
                        None => j.problem(format!("audit: maildrop of {} not readable: {last:?}", user(u))),
                    }
                }
            });
        }
    });
    let finals = finals.into_inner().unwrap();
    eprintln!("ha: audit of {} maildrops took {:.1} s", p.users, audit_t.elapsed().as_secs_f64());
    let mount_log = mounts.map(MountWatch::finish);
    let mut disk_text = String::new();
    if let Some(log) = &mount_log {
        disk_text.push_str(&log.text());
        if !log.twice.is_empty() {
            j.problem(format!("the shared disk was mounted by two nodes at once: {}", log.text().trim_end()));
        }
        match ha.owner().and_then(|o| ha.pids()[o].map(|pid| (o, pid))) {
            Some((o, pid)) => match disk_usage(pid, &ha.spool()) {
                Ok((used, size, store)) => disk_text.push_str(&format!(
                    "shared disk at the end (node{}): {:.1} MiB used of {:.1} MiB, the group's store on it {:.1} MiB\n",
                    o + 1,
                    used as f64 / 1024.0,
                    size as f64 / 1024.0,
                    store as f64 / 1024.0
                )),
                Err(e) => j.problem(format!("shared disk at node{}: {e}", o + 1)),
            },
            None => j.problem("shared disk: no owner answers at the end".into()),
        }
    }

    let report = Report::build(&j, &finals);
    let mut text = format!(
        "hamail HA verification: {topo}, {} users, attachment {} bytes, {} small-message senders, {} POP3 clients\n",
        p.users, p.size, p.senders, p.pop3_clients
    );
    text.push_str(&report.text());
    text.push_str(&disk_text);
    if let Some(b) = j.sent.lock().unwrap().get("big") {
        text.push_str(&format!(
            "large message: {} recipients in one transaction, {} attempt(s), {}{}; failed attempts: {:?}\n",
            b.recipients.len(),
            b.attempts,
            if b.acked { "acknowledged" } else { "NOT acknowledged" },
            if b.recognised_resend { " (the last attempt recognised as a resend: delivered once)" } else { "" },
            b.failures
        ));
    }
    let smtp_ok = j.smtp_ok.lock().unwrap().clone();
    let pop3_ok = j.pop3_ok.lock().unwrap().clone();
    for (i, (e, &end)) in events.iter().zip(&ends).enumerate() {
        let at = (e.t0 - origin).as_secs_f64();
        text.push_str(&format!(
            "event {} (at {at:.1} s): {}: group online at the new owner after {:.2} s; client-observed outage SMTP {}, POP3 {}\n",
            i + 1,
            e.what,
            e.takeover.as_secs_f64(),
            fmt_outage(outage(&smtp_ok, e.t0, end)),
            fmt_outage(outage(&pop3_ok, e.t0, end)),
        ));
    }
    let problems = j.problems.lock().unwrap().clone();
    for pr in &problems {
        text.push_str(&format!("problem: {pr}\n"));
    }
    text.push_str(&format!("total time {:.1} s\n", started.elapsed().as_secs_f64()));
    eprintln!("\n{text}");
    if let Ok(path) = std::env::var("HAMAIL_HA_REPORT") {
        std::fs::write(&path, &text).unwrap_or_else(|e| panic!("writing {path}: {e}"));
    }
    assert!(report.clean() && problems.is_empty(), "the HA verification found faults:\n{text}\n{}", ha.logs());
}

// ---------------------------------------------------------------- report

#[derive(Default)]
struct Report {
    sent: usize,
    attempts: u64,
    acked: usize,
    recognised_resends: usize,
    delivered: usize,
    delivered_without_250: usize,
    copies: usize,
    lost: Vec<String>,
    duplicated: Vec<String>,
    damaged: Vec<String>,
    partial: Vec<String>,
    stray: Vec<String>,
}

impl Report {
    fn build(j: &Journal, finals: &[(usize, Found)]) -> Report {
        let sent = j.sent.lock().unwrap();
        let mut r = Report { sent: sent.len(), ..Report::default() };
        // (user, token) -> copies found.
        let mut seen: BTreeMap<(usize, String), Vec<Found>> = BTreeMap::new();
        let taken = j.taken.lock().unwrap();
        for (u, f) in taken.iter().chain(finals.iter()) {
            match &f.token {
                Some(t) => seen.entry((*u, t.clone())).or_default().push(f.clone()),
                None => r.stray.push(format!("{}: a message without a token", user(*u))),
            }
        }
        // A copy retrieved by a session whose QUIT went unanswered counts
        // if (and only if) it is not found anywhere else: its deletion was
        // then committed.
        for (u, f) in j.maybe_taken.lock().unwrap().iter() {
            if let Some(t) = &f.token {
                seen.entry((*u, t.clone())).or_insert_with(|| vec![f.clone()]);
            }
        }
        for (token, s) in sent.iter() {
            r.attempts += u64::from(s.attempts);
            r.acked += usize::from(s.acked);
            r.recognised_resends += usize::from(s.recognised_resend);
            let mut present = 0;
            for &u in &s.recipients {
                let copies = seen.get(&(u, token.clone())).map(|v| v.as_slice()).unwrap_or(&[]);
                if !copies.is_empty() {
                    present += 1;
                }
                r.copies += copies.len();
                if copies.len() > 1 {
                    r.duplicated.push(format!("{token} to {} x{}", user(u), copies.len()));
                }
                for c in copies {
                    if c.content != Some(s.content) || c.attachment != s.attachment {
                        r.damaged.push(format!("{token} to {}", user(u)));
                    }
                }
            }
            let all = present == s.recipients.len();
            if s.acked && !all {
                r.lost.push(format!("{token}: in {present} of {} maildrops", s.recipients.len()));
            }
            if !s.acked && present > 0 && !all {
                r.partial.push(format!("{token} (no 250): in {present} of {} maildrops", s.recipients.len()));
            }
            if all {
                r.delivered += 1;
                if !s.acked {
                    r.delivered_without_250 += 1;
                }
            }
        }
        for (u, t) in seen.keys() {
            match sent.get(t) {
                Some(s) if s.recipients.contains(u) => {}
                _ => r.stray.push(format!("{t} in the maildrop of {}, not a recipient", user(*u))),
            }
        }
        r
    }

    fn clean(&self) -> bool {
        self.lost.is_empty()
            && self.duplicated.is_empty()
            && self.damaged.is_empty()
            && self.partial.is_empty()
            && self.stray.is_empty()
    }

    fn text(&self) -> String {
        let list = |v: &[String]| if v.is_empty() { String::new() } else { format!(" {:?}", &v[..v.len().min(10)]) };
        format!(
            "messages: sent {} ({} SMTP attempts), acknowledged {}, delivered {} ({} maildrop copies), \
             of which {} recognised re-sends (RFC 1047: 250 lost in a failover, sent again, delivered once)\n\
             lost {}{}\nduplicated {}{}\ndamaged {}{}\nhalf-delivered without 250 {}{}\nunexpected {}{}\n\
             delivered without a 250 reaching the client: {}\n",
            self.sent,
            self.attempts,
            self.acked,
            self.delivered,
            self.copies,
            self.recognised_resends,
            self.lost.len(),
            list(&self.lost),
            self.duplicated.len(),
            list(&self.duplicated),
            self.damaged.len(),
            list(&self.damaged),
            self.partial.len(),
            list(&self.partial),
            self.stray.len(),
            list(&self.stray),
            self.delivered_without_250,
        )
    }
}

#[test]
fn report_counts_losses_duplicates_damage_and_resends() {
    let j = Journal::default();
    let rec = |rcpts: Vec<usize>, content: [u8; 32], acked: bool, resend: bool| Sent {
        recipients: rcpts,
        content,
        attachment: None,
        attempts: 1,
        acked,
        recognised_resend: resend,
        failures: BTreeMap::new(),
    };
    let h = |b: u8| [b; 32];
    {
        let mut s = j.sent.lock().unwrap();
        s.insert("ok".into(), rec(vec![0, 1], h(1), true, true));
        s.insert("lost".into(), rec(vec![0, 1], h(2), true, false));
        s.insert("dup".into(), rec(vec![0], h(3), true, false));
        s.insert("bad".into(), rec(vec![1], h(4), true, false));
        s.insert("half".into(), rec(vec![0, 1], h(5), false, false));
        s.insert("never".into(), rec(vec![0], h(6), false, false));
    }
    let f = |t: &str, c: u8| Found { token: Some(t.into()), content: Some(h(c)), attachment: None };
    j.taken.lock().unwrap().push((0, f("ok", 1)));
    j.maybe_taken.lock().unwrap().push((1, f("ok", 1)));
    j.maybe_taken.lock().unwrap().push((0, f("dup", 3)));
    let finals = vec![
        (0, f("lost", 2)),
        (0, f("dup", 3)),
        (0, f("dup", 3)),
        (1, f("bad", 9)),
        (1, f("half", 5)),
        (1, f("ok", 7)),
    ];
    let r = Report::build(&j, &finals);
    assert_eq!((r.sent, r.acked, r.recognised_resends), (6, 4, 1));
    assert_eq!(r.lost, vec!["lost: in 1 of 2 maildrops".to_string()]);
    assert_eq!(
        r.duplicated,
        vec!["dup to u0@example.org x2".to_string()],
        "a maybe-copy never adds to copies found elsewhere"
    );
    let mut damaged = r.damaged.clone();
    damaged.sort();
    assert_eq!(damaged, vec!["bad to u1@example.org".to_string(), "ok to u1@example.org".to_string()]);
    assert_eq!(r.partial.len(), 1);
    assert!(!r.clean());
}

#[test]
fn messages_come_back_with_their_token_and_attachment() {
    let (big, sum) = big_message(10_000);
    let mut stored = b"Return-Path: <x>\r\nReceived: from a\r\n\tby b; date\r\n".to_vec();
    stored.extend_from_slice(&big);
    let f = analyse(&stored);
    assert_eq!(f.token.as_deref(), Some("big"));
    assert_eq!(f.content, Some(Sha256::digest(&big).into()));
    assert_eq!(f.attachment, Some(sum));
    let small = small_message("s1-2", 2000);
    assert!(small.windows(3).any(|w| w == b"\n.s"), "some lines need dot-stuffing");
    assert!(dot_stuff(&small).windows(4).any(|w| w == b"\n..s"));
    assert_eq!(analyse(&small).attachment, None);
    assert_eq!(parse_size("1M"), 1 << 20);
    assert_eq!(parse_size("100K"), 102_400);
    assert_eq!(parse_size("123"), 123);
}

#[test]
fn disk_size_and_mount_sampling() {
    let p = |users, size| Params { users, size, senders: 4, pop3_clients: 2, topology: Topology::Disk };
    assert_eq!(p(100, 100 << 10).disk_mib(), 64, "at least 64 MiB");
    assert_eq!(p(1000, 1 << 20).disk_mib(), 67, "4 x 1 MiB + 1000 x 64 KiB, rounded up");
    let me = std::process::id();
    assert_eq!(mounted_by(&[vec![], vec![me], vec![999_999_999, me]], Path::new("/")), vec![1, 2]);
    assert_eq!(mounted_by(&[vec![me], vec![], vec![]], Path::new("/no/such/mount")), Vec::<usize>::new());
    let cfg = Path::new("/tmp/x/n2/hamail.toml");
    assert!(serves_with(b"/bin/hamail\0--config\0/tmp/x/n2/hamail.toml\0serve\0", cfg));
    assert!(serves_with(b"ip\0netns\0exec\0hmt1-n2\0/bin/hamail\0--config\0/tmp/x/n2/hamail.toml\0serve\0", cfg));
    assert!(!serves_with(b"/bin/hamail\0--config\0/tmp/x/n2/hamail.toml\0group\0move\0mail\0", cfg), "the CLI");
    assert!(!serves_with(b"/bin/hamail\0--config\0/tmp/x/n1/hamail.toml\0serve\0", cfg), "another node");
    let twice =
        MountLog { samples: 3, twice: vec![(1.5, vec![0, 1])], holders: vec![(0.0, vec![0]), (1.5, vec![0, 1])] };
    assert!(
        twice.text().contains("MOUNTED BY TWO NODES AT ONCE in 1 samples, first node1+node2 at 1.50 s"),
        "{}",
        twice.text()
    );
    let once = MountLog { samples: 9, twice: vec![], holders: vec![(0.0, vec![0]), (2.0, vec![]), (9.0, vec![1])] };
    assert!(
        once.text().contains("never by two nodes at once; mounted by: node1 at 0.0 s, none at 2.0 s, node2 at 9.0 s"),
        "{}",
        once.text()
    );
}
