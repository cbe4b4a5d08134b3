//! POP3 load client, the same exchange as pop3load.py: USER/PASS, LIST,
//! RETR every message, QUIT; no DELE, so runs are repeatable.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use tokio::io::{AsyncBufReadExt, AsyncReadExt as _, AsyncWriteExt, BufReader};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::task::JoinSet;

const IO_TIMEOUT: Duration = Duration::from_secs(120);
const MAX_LINE: u64 = 64 * 1024;

pub struct Client {
    rd: BufReader<OwnedReadHalf>,
    wr: OwnedWriteHalf,
    line: Vec<u8>,
}

impl Client {
    /// Connects and logs in with USER/PASS.
    pub async fn login(addr: SocketAddr, user: &str, password: &str) -> Result<Client> {
        let stream =
            tokio::time::timeout(IO_TIMEOUT, TcpStream::connect(addr)).await.context("connect timed out")??;
        stream.set_nodelay(true)?;
        let (rd, wr) = stream.into_split();
        let mut c = Client { rd: BufReader::with_capacity(64 * 1024, rd), wr, line: Vec::new() };
        c.status("greeting").await?;
        c.command(&format!("USER {user}")).await?;
        c.wr.write_all(format!("PASS {password}\r\n").as_bytes()).await?;
        c.status("PASS").await.with_context(|| format!("login as {user}"))?;
        Ok(c)
    }

    async fn read_line(&mut self) -> Result<()> {
        self.line.clear();
        let n = tokio::time::timeout(IO_TIMEOUT, (&mut self.rd).take(MAX_LINE).read_until(b'\n', &mut self.line))
            .await
            .context("read timed out")??;
        if n == 0 {
            bail!("connection closed");
        }
        Ok(())
    }

    /// Reads a status line; Ok(text after "+OK") or an error with the -ERR.
    async fn status(&mut self, what: &str) -> Result<String> {
        self.read_line().await?;
        let text = String::from_utf8_lossy(&self.line);
        match text.strip_prefix("+OK") {
            Some(rest) => Ok(rest.trim().to_string()),
            None => bail!("{what}: {}", text.trim_end()),
        }
    }

    async fn command(&mut self, cmd: &str) -> Result<String> {
        self.wr.write_all(format!("{cmd}\r\n").as_bytes()).await?;
        self.status(cmd).await
    }

    /// Reads a multi-line body up to the "." line; calls `each` with every
    /// dot-unstuffed line (CRLF included).
    async fn multiline(&mut self, mut each: impl FnMut(&[u8])) -> Result<()> {
        loop {
            self.read_line().await?;
            let line = self.line.as_slice();
            if line == b".\r\n" || line == b".\n" {
                return Ok(());
            }
            each(line.strip_prefix(b".").unwrap_or(line));
        }
    }

    /// LIST: the message numbers.
    pub async fn list(&mut self) -> Result<Vec<u64>> {
        self.command("LIST").await?;
        let mut numbers = Vec::new();
        let mut bad = None;
        self.multiline(|line| {
            match std::str::from_utf8(line).ok().and_then(|l| l.split_whitespace().next()?.parse().ok()) {
                Some(n) => numbers.push(n),
                None => bad = Some(String::from_utf8_lossy(line).into_owned()),
            }
        })
        .await?;
        if let Some(line) = bad {
            bail!("bad LIST line: {}", line.trim_end());
        }
        Ok(numbers)
    }

    /// RETR: the size of the message as received (CRLF form, unstuffed).
    pub async fn retr(&mut self, n: u64) -> Result<u64> {
        self.command(&format!("RETR {n}")).await?;
        let mut octets = 0u64;
        self.multiline(|line| octets += line.len() as u64).await?;
        Ok(octets)
    }

    /// STAT: the number of messages.
    pub async fn stat(&mut self) -> Result<u64> {
        let reply = self.command("STAT").await?;
        reply.split_whitespace().next().and_then(|n| n.parse().ok()).with_context(|| format!("bad STAT reply: {reply}"))
    }

    pub async fn dele(&mut self, n: u64) -> Result<()> {
        self.command(&format!("DELE {n}")).await.map(|_| ())
    }

    pub async fn quit(mut self) -> Result<()> {
        self.command("QUIT").await.map(|_| ())
    }
}

/// One session: log in, LIST, RETR every message, QUIT. Returns (messages, octets).
async fn session(addr: SocketAddr, user: &str, password: &str) -> Result<(u64, u64)> {
    let mut c = Client::login(addr, user, password).await?;
    let (mut msgs, mut octets) = (0, 0);
    for n in c.list().await? {
        octets += c.retr(n).await?;
        msgs += 1;
    }
    c.quit().await?;
    Ok((msgs, octets))
}

#[derive(Debug, Default, Clone)]
pub struct Pop3Result {
    pub sessions: u64,
    pub msgs: u64,
    pub octets: u64,
    pub errors: u64,
    pub secs: f64,
    /// Session durations, ms, sorted.
    pub session_ms: Vec<f64>,
}

impl Pop3Result {
    pub fn session_pct_ms(&self, q: f64) -> f64 {
        if self.session_ms.is_empty() {
            return 0.0;
        }
        let k = ((q * (self.session_ms.len() - 1) as f64).round() as usize).min(self.session_ms.len() - 1);
        self.session_ms[k]
    }
}

/// `conc` clients; client i owns users i, i+conc, ... and runs sessions over
/// them in turn until `duration` has passed (`duration` None: one pass).
pub async fn run(
    addr: SocketAddr,
    users: &[String],
    password: &str,
    conc: usize,
    duration: Option<Duration>,
) -> Result<Pop3Result> {
    if users.len() < conc {
        bail!("POP3 needs at least as many users ({}) as clients ({conc})", users.len());
    }
    let password: Arc<str> = Arc::from(password);
    let t0 = Instant::now();
    let deadline = duration.map(|d| t0 + d);
    let mut set = JoinSet::new();
    for w in 0..conc {
        let mine: Vec<String> = users.iter().skip(w).step_by(conc).cloned().collect();
        let password = password.clone();
        set.spawn(async move {
            let mut r = Pop3Result::default();
            'outer: loop {
                for user in &mine {
                    if deadline.is_some_and(|d| Instant::now() >= d) {
                        break 'outer;
                    }
                    let s0 = Instant::now();
                    match session(addr, user, &password).await {
                        Ok((m, o)) => {
                            r.sessions += 1;
                            r.msgs += m;
                            r.octets += o;
                            r.session_ms.push(s0.elapsed().as_secs_f64() * 1000.0);
                        }
                        Err(e) => {
                            r.errors += 1;
                            if r.errors <= 3 {
                                eprintln!("hamail-bench: pop3 client {w} ({user}): {e:#}");
                            }
                            if r.errors > 100 {
                                break 'outer;
                            }
                        }
                    }
                }
                if deadline.is_none() {
                    break;
                }
            }
            r
        });
    }
    let mut total = Pop3Result::default();
    while let Some(r) = set.join_next().await {
        let r = r?;
        total.sessions += r.sessions;
        total.msgs += r.msgs;
        total.octets += r.octets;
        total.errors += r.errors;
        total.session_ms.extend(r.session_ms);
    }
    total.secs = t0.elapsed().as_secs_f64();
    total.session_ms.sort_by(|a, b| a.total_cmp(b));
    Ok(total)
}

/// Empties the mailboxes of `users` (DELE everything, QUIT), `conc` at a
/// time. Returns the number of messages deleted.
pub async fn purge(addr: SocketAddr, users: &[String], password: &str, conc: usize) -> Result<u64> {
    let conc = conc.clamp(1, users.len().max(1));
    let mut set = JoinSet::new();
    for w in 0..conc {
        let mine: Vec<String> = users.iter().skip(w).step_by(conc).cloned().collect();
        let password = password.to_string();
        set.spawn(async move {
            let mut deleted = 0u64;
            for user in &mine {
                let mut c = Client::login(addr, user, &password).await?;
                let n = c.stat().await?;
                for i in 1..=n {
                    c.dele(i).await.with_context(|| format!("purging {user}"))?;
                }
                c.quit().await.with_context(|| format!("purging {user}"))?;
                deleted += n;
            }
            Ok::<u64, anyhow::Error>(deleted)
        });
    }
    let mut deleted = 0;
    while let Some(r) = set.join_next().await {
        deleted += r??;
    }
    Ok(deleted)
}
