//! SMTP load client: message generation and the sending sessions.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use rand::{rngs::StdRng, Rng as _, SeedableRng as _};
use tokio::io::{AsyncBufReadExt, AsyncReadExt as _, AsyncWriteExt, BufReader};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::task::JoinSet;

/// Longest wait for one reply (the server fsyncs before its 250).
const IO_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest reply line accepted from the server.
const MAX_LINE: usize = 64 * 1024;
/// The benchmark's user: the sender of authenticated (submission) runs.
pub const SENDER: &str = "bench@bench.test";
/// The sender of mail from outside (port 25), where a client that did not
/// log in may not claim one of the server's domains.
pub const OUTSIDE_SENDER: &str = "bench@outside.test";

/// A body of exactly `size` bytes (`size` >= 2): CRLF-terminated lines of at
/// most 78 bytes of pseudo-random base64 characters, the same for a given
/// size. Like smtp-source's `-l`, `size` counts the body only, line ends
/// included, headers excluded.
pub fn payload(size: usize) -> Vec<u8> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut rng = StdRng::seed_from_u64(size as u64);
    let mut out = Vec::with_capacity(size);
    let mut remaining = size;
    while remaining >= 2 {
        let mut line = remaining.min(78);
        if remaining - line == 1 {
            // never leave a single byte: it could not end with CRLF
            line -= 1;
        }
        out.extend((0..line - 2).map(|_| ALPHABET[rng.gen_range(0..ALPHABET.len())]));
        out.extend_from_slice(b"\r\n");
        remaining -= line;
    }
    out
}

/// Encodes a message for the DATA phase: bare LF and bare CR become CRLF,
/// lines starting with '.' get another '.', the text ends with CRLF, and the
/// terminating ".\r\n" is appended.
pub fn data_encode(message: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(message.len() + message.len() / 64 + 8);
    let mut line_start = true;
    let mut i = 0;
    while i < message.len() {
        let b = message[i];
        if line_start && b == b'.' {
            out.push(b'.');
        }
        match b {
            b'\r' | b'\n' => {
                out.extend_from_slice(b"\r\n");
                // a CRLF pair is one line end
                if b == b'\r' && message.get(i + 1) == Some(&b'\n') {
                    i += 1;
                }
                line_start = true;
            }
            _ => {
                out.push(b);
                line_start = false;
            }
        }
        i += 1;
    }
    if !line_start {
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b".\r\n");
    out
}

/// The header block of one message (not counted in the payload size).
pub fn header(rcpt: &str, id: &str, size: usize) -> Vec<u8> {
    format!(
        "From: <{SENDER}>\r\nTo: <{rcpt}>\r\nSubject: hamail-bench {size} bytes\r\nMessage-ID: <{id}@bench.test>\r\n\r\n"
    )
    .into_bytes()
}

/// One SMTP connection, lock-step (no pipelining, like smtp-source).
pub struct Client {
    rd: BufReader<OwnedReadHalf>,
    wr: OwnedWriteHalf,
    line: Vec<u8>,
    /// The envelope sender: [`OUTSIDE_SENDER`] until [`Client::auth_plain`].
    sender: String,
}

impl Client {
    /// Connects, reads the greeting and says EHLO.
    pub async fn connect(addr: SocketAddr) -> Result<Client> {
        let stream =
            tokio::time::timeout(IO_TIMEOUT, TcpStream::connect(addr)).await.context("connect timed out")??;
        stream.set_nodelay(true)?;
        let (rd, wr) = stream.into_split();
        let mut c =
            Client { rd: BufReader::with_capacity(16 * 1024, rd), wr, line: Vec::new(), sender: OUTSIDE_SENDER.into() };
        c.expect(220, "greeting").await?;
        c.command("EHLO client.bench.test", 250).await?;
        Ok(c)
    }

    /// Reads a (possibly multi-line) reply and checks its code.
    async fn expect(&mut self, code: u16, what: &str) -> Result<()> {
        loop {
            self.line.clear();
            let n = tokio::time::timeout(
                IO_TIMEOUT,
                (&mut self.rd).take(MAX_LINE as u64).read_until(b'\n', &mut self.line),
            )
            .await
            .with_context(|| format!("no reply to {what}"))??;
            if n == 0 {
                bail!("connection closed (waiting for the reply to {what})");
            }
            let text = String::from_utf8_lossy(&self.line);
            let got: Option<u16> = text.get(..3).and_then(|c| c.parse().ok());
            match got {
                Some(c) if c == code => {
                    if self.line.get(3) != Some(&b'-') {
                        return Ok(());
                    }
                }
                _ => bail!("{what}: {}", text.trim_end()),
            }
        }
    }

    async fn command(&mut self, cmd: &str, code: u16) -> Result<()> {
        self.wr.write_all(format!("{cmd}\r\n").as_bytes()).await?;
        self.expect(code, cmd.split(':').next().unwrap_or(cmd)).await
    }

    /// One transaction; Ok once the server answered 250 to the data.
    pub async fn send(&mut self, rcpt: &str, header: &[u8], encoded_body: &[u8]) -> Result<()> {
        let mail = format!("MAIL FROM:<{}>", self.sender);
        self.command(&mail, 250).await?;
        self.command(&format!("RCPT TO:<{rcpt}>"), 250).await?;
        self.command("DATA", 354).await?;
        if encoded_body.len() <= 16 * 1024 {
            // one write, one segment
            let mut buf = Vec::with_capacity(header.len() + encoded_body.len());
            buf.extend_from_slice(header);
            buf.extend_from_slice(encoded_body);
            self.wr.write_all(&buf).await?;
        } else {
            self.wr.write_all(header).await?;
            self.wr.write_all(encoded_body).await?;
        }
        self.expect(250, "end of data").await
    }

    /// AUTH PLAIN (RFC 4616) as `user`.
    pub async fn auth_plain(&mut self, user: &str, password: &str) -> Result<()> {
        use base64::Engine as _;
        let token = base64::engine::general_purpose::STANDARD.encode(format!("\0{user}\0{password}"));
        self.wr.write_all(format!("AUTH PLAIN {token}\r\n").as_bytes()).await?;
        self.expect(235, "AUTH").await?;
        self.sender = user.to_string();
        Ok(())
    }

    pub async fn rset(&mut self) -> Result<()> {
        self.command("RSET", 250).await
    }

    /// QUIT; errors do not matter any more at this point.
    pub async fn quit(mut self) {
        let _ = self.command("QUIT", 221).await;
    }
}

/// What one SMTP cell did.
#[derive(Debug, Default, Clone)]
pub struct SmtpResult {
    pub msgs: u64,
    pub errors: u64,
    pub secs: f64,
}

/// Settings of one cell.
#[derive(Clone)]
pub struct Load {
    /// Session `w` connects to `addrs[w % addrs.len()]`.
    pub addrs: Arc<Vec<SocketAddr>>,
    pub recipients: Arc<Vec<String>>,
    pub size: usize,
    pub conc: usize,
    pub reuse: bool,
    pub duration: Duration,
}

/// `conc` sessions send `size`-byte messages until `duration` has passed,
/// each message to the next recipient (round-robin). Only messages the
/// server answered 250 to are counted.
pub async fn run(load: Load) -> Result<SmtpResult> {
    if load.addrs.is_empty() {
        bail!("no SMTP address to send to");
    }
    let body: Arc<Vec<u8>> = Arc::new(data_encode(&payload(load.size)));
    let next = Arc::new(AtomicUsize::new(0));
    let t0 = Instant::now();
    let deadline = t0 + load.duration;
    let mut set = JoinSet::new();
    for w in 0..load.conc {
        let (load, body, next) = (load.clone(), body.clone(), next.clone());
        set.spawn(async move { worker(w, &load, &body, &next, deadline).await });
    }
    let mut total = SmtpResult::default();
    while let Some(r) = set.join_next().await {
        let r = r?;
        total.msgs += r.msgs;
        total.errors += r.errors;
    }
    total.secs = t0.elapsed().as_secs_f64();
    Ok(total)
}

async fn worker(w: usize, load: &Load, body: &[u8], next: &AtomicUsize, deadline: Instant) -> SmtpResult {
    let mut res = SmtpResult::default();
    let mut conn: Option<Client> = None;
    let mut seq = 0u64;
    let pid = std::process::id();
    while Instant::now() < deadline {
        let rcpt = &load.recipients[next.fetch_add(1, Ordering::Relaxed) % load.recipients.len()];
        seq += 1;
        let head = header(rcpt, &format!("{pid}.{w}.{seq}"), load.size);
        let attempt = async {
            let mut c = match conn.take() {
                Some(mut c) => {
                    c.rset().await?;
                    c
                }
                None => Client::connect(load.addrs[w % load.addrs.len()]).await?,
            };
            c.send(rcpt, &head, body).await?;
            Ok::<Client, anyhow::Error>(c)
        };
        match attempt.await {
            Ok(c) => {
                res.msgs += 1;
                if load.reuse {
                    conn = Some(c);
                } else {
                    c.quit().await;
                }
            }
            Err(e) => {
                res.errors += 1;
                if res.errors <= 3 {
                    eprintln!("hamail-bench: smtp session {w}: {e:#}");
                }
                if res.errors > 1000 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
    if let Some(c) = conn {
        c.quit().await;
    }
    res
}

/// Puts `per_user` messages of `size` bytes into each mailbox (for the POP3
/// test), `conc` connections at a time, reusing connections. Fails on the
/// first refused message.
pub async fn populate(addr: SocketAddr, users: &[String], per_user: usize, size: usize, conc: usize) -> Result<()> {
    let body = Arc::new(data_encode(&payload(size)));
    let conc = conc.clamp(1, users.len().max(1));
    let mut set = JoinSet::new();
    for w in 0..conc {
        let mine: Vec<String> = users.iter().skip(w).step_by(conc).cloned().collect();
        let body = body.clone();
        set.spawn(async move {
            let mut c = Client::connect(addr).await?;
            for (i, rcpt) in mine.iter().enumerate() {
                for j in 0..per_user {
                    if i + j > 0 {
                        c.rset().await?;
                    }
                    let head = header(rcpt, &format!("pop3.{w}.{i}.{j}.{}", std::process::id()), size);
                    c.send(rcpt, &head, &body).await.with_context(|| format!("populating {rcpt}"))?;
                }
            }
            c.quit().await;
            Ok::<(), anyhow::Error>(())
        });
    }
    while let Some(r) = set.join_next().await {
        r??;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_has_the_exact_size_and_crlf_lines() {
        for size in (2..400).chain([1024, 102_400, 1_048_576]) {
            let p = payload(size);
            assert_eq!(p.len(), size, "size {size}");
            assert!(p.ends_with(b"\r\n"), "size {size}");
            for line in p.split(|&b| b == b'\n') {
                assert!(line.len() <= 77, "size {size}: line of {} bytes", line.len());
                assert!(!line[..line.len().saturating_sub(1)].contains(&b'\r'));
            }
            // already valid DATA text: encoding only adds the terminator
            assert_eq!(data_encode(&p), [p.as_slice(), b".\r\n"].concat());
        }
        assert_eq!(payload(1024), payload(1024));
    }

    #[test]
    fn dot_stuffing_and_line_ends() {
        assert_eq!(data_encode(b""), b".\r\n");
        assert_eq!(data_encode(b"a"), b"a\r\n.\r\n");
        assert_eq!(data_encode(b".\r\n"), b"..\r\n.\r\n");
        assert_eq!(data_encode(b".hidden\r\nok\r\n..two\r\n"), b"..hidden\r\nok\r\n...two\r\n.\r\n");
        assert_eq!(data_encode(b"a.b\n.c\rd"), b"a.b\r\n..c\r\nd\r\n.\r\n");
        assert_eq!(data_encode(b"x\r\n\r\n.\r\n"), b"x\r\n\r\n..\r\n.\r\n");
    }

    #[test]
    fn header_is_crlf_and_ends_with_blank_line() {
        let h = header("user0001@bench.test", "1.2.3", 1024);
        assert!(h.ends_with(b"\r\n\r\n"));
        assert!(String::from_utf8(h).unwrap().contains("To: <user0001@bench.test>\r\n"));
    }
}
