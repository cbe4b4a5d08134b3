//! The tokio driver of the POP3 session: feeds the sans-IO
//! `hamail_pop3::Session`, and answers its requests (login with a growing
//! delay after failures, the maildrop lock, bodies, the atomic UPDATE).
//!
//! What a client can make one connection hold is bounded, whatever it
//! sends or fails to read:
//! - input is read only when the session needs more (never while a reply
//!   is being written), [`READ_BUF`] octets at a time;
//! - the replies of pipelined commands are written out once they reach
//!   [`PENDING_FLUSH`] octets (the session itself stops at its
//!   `reply_flush`), and always before or with the start of a body;
//! - a message body is never in memory: it goes from its file through a
//!   [`Stuffer`] in [`CHUNK`] pieces, each written with `write_all`, so
//!   TCP back-pressure paces the reading of the file. Those two buffers
//!   are reserved from the node-wide [`MemoryBudget`] before the `+OK`,
//!   and a RETR or TOP that cannot have them gets `-ERR [SYS/TEMP]`.
//!
//! And in time: the autologout timer (RFC 1939 section 3) runs from the
//! last complete command, so a client trickling bytes is logged out all
//! the same, and a client that does not read what it asked for is cut
//! after the same timeout.
//!
//! [`MemoryBudget`]: crate::budget::MemoryBudget

use std::io::Read;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hamail_pop3::{AuthResult, BodyOpened, MaildropResult, Next, Output, PeerInfo, Pop3Config, Session, Stuffer};
use hamail_store::{Address, BodyFile, BodyHash, MailStore, StoreError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::budget::Reservation;
use crate::conn::Conn;
use crate::limits::MaildropGuard;
use crate::{bump, Context};

/// Octets of client input read at once.
const READ_BUF: usize = 16 * 1024;
/// Octets of a body read from its file at once.
const CHUNK: usize = 64 * 1024;
/// A chunk stuffed is at most twice as long (`.` LF becomes `..` CRLF),
/// and the last one carries the final CRLF and the terminator.
const STUFFED: usize = 2 * CHUNK + 5;
/// Replies waiting for a driver step are written once they reach this.
const PENDING_FLUSH: usize = 64 * 1024;
/// Replies up to this size go out in the same write as the start of the
/// body that follows them (a small message is one write: `+OK`, body,
/// terminator).
const PREFIX_INLINE: usize = 4 * 1024;

/// What the session did, for its one log line.
#[derive(Default)]
struct Tally {
    user: Option<Address>,
    retrieved: usize,
    retrieved_bytes: u64,
    deleted: usize,
    result: &'static str,
}

/// A body opened for RETR or TOP, with the memory to send it.
struct OpenedBody {
    body: BodyFile,
    _buffers: Reservation,
}

/// Why a body did not go out whole.
enum SendFailure {
    /// The file: shorter than it was, or failing. The client has part of
    /// the answer and no terminator.
    Body(StoreError),
    /// The connection: gone, or the client stopped reading.
    Client(std::io::Error),
}

/// Serves one POP3 connection from the maildrops of `store` (the node's,
/// or a group's store on its shared disk).
pub(crate) async fn serve(
    ctx: Arc<Context>,
    store: Arc<dyn MailStore>,
    tcp: TcpStream,
    peer: SocketAddr,
    implicit_tls: bool,
    mut drain: Option<crate::Drain>,
) -> std::io::Result<()> {
    bump(&ctx.stats.pop3_connections);
    let ctx = &*ctx;
    let mut conn = Conn::Plain(tcp);
    if implicit_tls {
        conn.upgrade(&ctx.tls, ctx.config.tls_handshake_timeout()).await?;
    }
    let config = Arc::new(Pop3Config {
        hostname: ctx.config.server.hostname.clone(),
        tls_available: true,
        plaintext_auth_allowed: ctx.config.pop3.plaintext_auth.allows(&peer),
        ..Pop3Config::default()
    });
    let mut session = Session::new(config, PeerInfo { addr: peer, tls: conn.is_tls() });
    let idle = Duration::from_secs(ctx.config.pop3.idle_timeout_secs);
    let mut out = Output { reply: session.greeting(), next: Next::NeedInput };
    let mut pending = Vec::new();
    let mut buf = vec![0u8; READ_BUF];
    // The autologout deadline, set anew each time the driver goes back to
    // reading after a command was answered.
    let mut deadline = Instant::now() + idle;
    let mut answered = true;
    let mut opened: Option<OpenedBody> = None;
    // Held from a successful login to the end of the connection.
    let mut lock: Option<MaildropGuard> = None;
    let mut tally = Tally { result: "disconnected", ..Tally::default() };
    let outcome: std::io::Result<()> = async {
        loop {
            pending.extend_from_slice(&out.reply);
            // Steps that only ask the driver for something wait with the
            // replies unwritten (a pipeline is answered in few writes), and
            // a body takes them along; every other step needs them out first.
            let waits = matches!(
                out.next,
                Next::Authenticate(_)
                    | Next::OpenMaildrop(_)
                    | Next::OpenBody(_)
                    | Next::SendBody { .. }
                    | Next::Update { .. }
            );
            if !pending.is_empty() && (!waits || pending.len() >= PENDING_FLUSH) {
                conn.write_within(&pending, idle).await?;
                pending.clear();
                if pending.capacity() > PENDING_FLUSH {
                    // One huge reply (LIST of a big maildrop) is not kept
                    // for the rest of a connection that may idle for long.
                    pending = Vec::new();
                }
            }
            out = match out.next {
                Next::NeedInput => {
                    if std::mem::take(&mut answered) {
                        deadline = Instant::now() + idle;
                    }
                    let read = tokio::select! {
                        r = tokio::time::timeout_at(deadline, conn.read(&mut buf)) => r,
                        () = crate::drained(&mut drain) => {
                            // Nothing is deleted: UPDATE happens only at QUIT.
                            let _ = conn.write_within(b"-ERR [SYS/TEMP] service moving, try again\r\n", idle).await;
                            tally.result = "service moving";
                            break;
                        }
                    };
                    let n = match read {
                        Ok(read) => read?,
                        Err(_) => {
                            let _ = conn.write_within(&session.timeout(), idle).await;
                            tally.result = "idle timeout";
                            break;
                        }
                    };
                    if n == 0 {
                        break;
                    }
                    let out = session.handle(&buf[..n]);
                    // Every complete command line gets a reply or a step;
                    // bytes that do not complete one leave the timer as is.
                    answered = !out.reply.is_empty() || out.next != Next::NeedInput;
                    out
                }
                Next::Flush => session.handle(&[]),
                Next::Authenticate(creds) => {
                    // A client gone mid-login is closed on, unanswered.
                    let Some(result) = login(ctx, &peer, &creds.username, &creds.password).await else { break };
                    session.authenticated(result)
                }
                Next::OpenMaildrop(user) => {
                    let result = match ctx.maildrop_locks.try_lock(&user) {
                        None => MaildropResult::InUse,
                        Some(guard) => match store.mailbox(&user).await {
                            Ok(entries) => {
                                lock = Some(guard);
                                bump(&ctx.stats.pop3_logins);
                                tally.user = Some(user.clone());
                                MaildropResult::Opened(entries)
                            }
                            Err(e) => MaildropResult::Failed(e),
                        },
                    };
                    session.maildrop_opened(result)
                }
                Next::OpenBody(hash) => {
                    let (result, body) = open_body(ctx, &*store, &hash).await;
                    opened = body;
                    session.body_opened(result)
                }
                Next::SendBody { top } => {
                    let Some(OpenedBody { body, _buffers }) = opened.take() else {
                        tracing::error!(peer = %peer, "POP3 session asked to send a body that is not open");
                        tally.result = "internal error";
                        break;
                    };
                    match send_body(&mut conn, &mut pending, body, top, idle).await {
                        Ok(read) => {
                            tally.retrieved += 1;
                            tally.retrieved_bytes += read;
                            session.body_sent(Ok(()))
                        }
                        Err(SendFailure::Client(e)) => return Err(e),
                        Err(SendFailure::Body(e)) => {
                            tracing::error!(peer = %peer, error = %e, "POP3 body broke off mid-way: connection closed");
                            tally.result = "body unreadable";
                            session.body_sent(Err(e))
                        }
                    }
                }
                Next::Update { user, delete } => {
                    let result = store.delete(&user, &delete).await;
                    tally.deleted = if result.is_ok() { delete.len() } else { 0 };
                    tally.result = if result.is_ok() { "quit" } else { "update failed" };
                    if let Err(e) = &result {
                        tracing::error!(user = %user, error = %e, "POP3 UPDATE failed: nothing deleted");
                    }
                    session.updated(result)
                }
                Next::StartTls => {
                    conn.upgrade(&ctx.tls, ctx.config.tls_handshake_timeout()).await?;
                    session.tls_established()
                }
                Next::Close => {
                    if tally.result == "disconnected" {
                        tally.result = "quit";
                    }
                    break;
                }
            };
        }
        Ok(())
    }
    .await;
    // The lock goes only after the UPDATE has been committed (or abandoned).
    drop(lock);
    let _ = conn.shutdown().await;
    if let Some(user) = &tally.user {
        tracing::info!(target: "hamail::mail",
            "pop3 client=[{}] user={user} tls={} retrieved={} bytes={} deleted={} result={}",
            peer.ip(), conn.is_tls(), tally.retrieved, tally.retrieved_bytes, tally.deleted, tally.result);
    }
    outcome
}

/// Takes the memory to send a body from the node's budget, then opens it.
async fn open_body(ctx: &Context, store: &dyn MailStore, hash: &BodyHash) -> (BodyOpened, Option<OpenedBody>) {
    let Some(buffers) = ctx.memory.try_reserve(CHUNK + STUFFED + PREFIX_INLINE) else {
        return (BodyOpened::Busy, None);
    };
    match store.open_body(hash).await {
        Ok(body) => (BodyOpened::Ready, Some(OpenedBody { body, _buffers: buffers })),
        Err(e) => {
            tracing::warn!(%hash, error = %e, "POP3 body could not be opened");
            (BodyOpened::Failed(e), None)
        }
    }
}

/// Sends the replies in `pending` (the `+OK` line among them), then
/// `body` through a [`Stuffer`] for `top`, then the terminator, in pieces
/// of at most [`CHUNK`] octets read and [`STUFFED`] written; TOP stops
/// reading once its lines are out. Returns the octets read.
async fn send_body(
    conn: &mut Conn,
    pending: &mut Vec<u8>,
    body: BodyFile,
    top: Option<usize>,
    within: Duration,
) -> Result<u64, SendFailure> {
    let BodyFile { mut file, len } = body;
    // Buffers no larger than the body needs: most messages are small, and
    // buffers of this size would each cost an mmap and munmap.
    let chunk_len = len.min(CHUNK as u64) as usize;
    let mut chunk = vec![0u8; chunk_len];
    let mut out = Vec::with_capacity(2 * chunk_len + 5 + PREFIX_INLINE);
    if pending.len() <= PREFIX_INLINE {
        out.append(pending);
    } else {
        conn.write_within(pending, within).await.map_err(SendFailure::Client)?;
        pending.clear();
    }
    let mut stuffer = Stuffer::new(top);
    let mut read = 0u64;
    loop {
        if read < len && !stuffer.is_done() {
            let want = (len - read).min(chunk_len as u64) as usize;
            let n;
            if len <= CHUNK as u64 {
                // The whole body, which the check in `open_body` has just
                // read: it is in the page cache, and this read is a memory
                // copy, cheaper than a trip to a blocking thread.
                n = read_some(&mut file, &mut chunk[..want]).map_err(SendFailure::Body)?;
            } else {
                (file, chunk, n) = read_chunk(file, chunk, want).await.map_err(SendFailure::Body)?;
            }
            read += n as u64;
            stuffer.feed(&chunk[..n], &mut out);
        }
        let last = read == len || stuffer.is_done();
        if last {
            stuffer.finish(&mut out);
            out.extend_from_slice(b".\r\n");
        }
        conn.write_within(&out, within).await.map_err(SendFailure::Client)?;
        if last {
            return Ok(read);
        }
        out.clear();
    }
}

/// Reads up to `want` octets of a body file into `chunk`, on a blocking
/// thread (a file read can wait on the disk).
async fn read_chunk(
    mut file: std::fs::File,
    mut chunk: Vec<u8>,
    want: usize,
) -> Result<(std::fs::File, Vec<u8>, usize), StoreError> {
    tokio::task::spawn_blocking(move || {
        let n = read_some(&mut file, &mut chunk[..want])?;
        Ok((file, chunk, n))
    })
    .await
    .map_err(|e| StoreError::Internal(format!("body read task failed: {e}")))?
}

/// Reads at least one octet into `buf`; the end of the file before the
/// length the body had when opened is a truncated body.
fn read_some(file: &mut std::fs::File, buf: &mut [u8]) -> Result<usize, StoreError> {
    loop {
        match file.read(buf) {
            Ok(0) => return Err(StoreError::Internal("body file shorter than when it was opened".into())),
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(StoreError::io("reading a body file", e)),
        }
    }
}

/// `None` when the client went away during the login (no answer is due).
async fn login(ctx: &Context, peer: &SocketAddr, username: &str, password: &str) -> Option<AuthResult> {
    Some(match crate::check_login(ctx, "pop3", peer, username, password).await {
        Ok(user) => AuthResult::Success(user),
        Err(crate::LoginFailure::Refused) => AuthResult::Failure,
        Err(crate::LoginFailure::Temporary(e)) => AuthResult::TemporaryFailure(e),
        Err(crate::LoginFailure::ClientGone) => return None,
    })
}
