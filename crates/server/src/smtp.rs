//! The tokio driver of the SMTP session: reads bytes, feeds the sans-IO
//! `hamail_smtp::Session`, and answers its requests (recipient lookup,
//! authentication, starting and committing a message, TLS upgrade). The
//! message data goes from the session to the store's spool as it arrives:
//! a small message stays in memory (reserved from the node's memory
//! budget), a larger one is written to a file in the store's `tmp/`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hamail_smtp::{
    AuthResult, Credentials, DataProblem, DataStart, Next, Output, PeerInfo, RcptVerdict, SenderCheck, SenderVerdict,
    Session, SmtpConfig, Transaction,
};
use hamail_store::{Body, Fingerprint, Incoming, MailStore, MemoryGate, ResendKey, Resolution, Spool, StoreError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::budget::{MemoryBudget, Reservation};
use crate::conn::Conn;
use crate::{bump, Context, SmtpRole};

/// Octets of a message kept in memory before it goes to its spool file:
/// 1 KiB mail costs no file system calls beyond the body's own, and a large
/// message is written in pieces of this size.
const IN_MEMORY: usize = 128 * 1024;

/// The node's memory budget as the store sees it (a cluster's body copies
/// for the other data nodes reserve from it).
pub(crate) struct BodyMemory(pub(crate) Arc<MemoryBudget>);

impl MemoryGate for BodyMemory {
    fn reserve(&self, bytes: usize) -> Option<Box<dyn Send + Sync>> {
        self.0.try_reserve(bytes).map(|r| Box::new(r) as Box<dyn Send + Sync>)
    }
}

/// The message being received, from `354` to its end.
struct Message {
    /// `None` once writing failed (the spool and its file are gone).
    spool: Option<Spool>,
    /// Why the spool was abandoned: the message is answered with it.
    failed: Option<StoreError>,
    /// The spool's memory, from the node's budget (none: it was spent, so
    /// the spool writes everything to its file).
    memory: Option<Reservation>,
    started: Instant,
    /// The end of the whole DATA phase (`smtp.data_timeout_secs`): a local
    /// policy against clients holding a slot by trickling data, on top of
    /// the per-read timeout of RFC 5321 4.5.3.2.5.
    deadline: Instant,
}

impl Message {
    /// Appends message data to the spool; a write (a piece that does not
    /// fit in memory) runs on a blocking thread. A failed write abandons
    /// the message (its file is removed) but the data is read to its end.
    async fn append(&mut self, data: Vec<u8>) {
        let Some(mut spool) = self.spool.take() else { return };
        let result = if spool.append_writes(data.len()) {
            let written = blocking(move || {
                let result = spool.append(&data);
                (spool, result)
            });
            match written.await {
                Ok((back, result)) => {
                    spool = back;
                    result
                }
                Err(e) => {
                    self.failed = Some(e);
                    return;
                }
            }
        } else {
            spool.append(&data)
        };
        match result {
            Ok(()) => self.spool = Some(spool),
            Err(e) => self.failed = Some(e),
        }
    }

    /// The body, whole (the rest of a spooled one written on a blocking
    /// thread), with the memory reservation that covers it while it is in
    /// memory, to be held until the store is done with it.
    async fn finish(self) -> Result<(Body, Option<Reservation>), StoreError> {
        if let Some(e) = self.failed {
            return Err(e);
        }
        let spool = self.spool.ok_or_else(|| StoreError::Internal("message without a spool".into()))?;
        if !spool.spilled() {
            return Ok((spool.finish()?, self.memory));
        }
        let body = blocking(move || spool.finish()).await??;
        Ok((body, None))
    }
}

/// Runs spool file I/O on a blocking thread; a task that panicked or was
/// cancelled is an internal error of the message.
async fn blocking<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(work).await.map_err(|e| StoreError::Internal(format!("spool task failed: {e}")))
}

fn session_config(ctx: &Context, role: SmtpRole, peer: &SocketAddr, local: Option<SocketAddr>) -> SmtpConfig {
    let c = &ctx.config.smtp;
    SmtpConfig {
        check_unauthenticated_sender: role == SmtpRole::Mta && c.local_sender_requires_auth,
        local_addresses: local.map(|a| a.ip()).into_iter().collect(),
        hostname: ctx.config.server.hostname.clone(),
        max_message_size: c.max_message_size,
        max_recipients: c.max_recipients,
        submission: role != SmtpRole::Mta,
        tls_available: true,
        plaintext_auth_allowed: c.plaintext_auth.allows(peer),
        ..SmtpConfig::default()
    }
}

/// Appends the replies of a resumed step after the ones not yet written.
fn chain(mut pending: Vec<u8>, out: Output) -> Output {
    pending.extend_from_slice(&out.reply);
    Output { reply: pending, next: out.next }
}

/// Serves one SMTP connection; accepted mail goes to `store` (the node's,
/// or a group's store on its shared disk).
pub(crate) async fn serve(
    ctx: Arc<Context>,
    store: Arc<dyn MailStore>,
    tcp: TcpStream,
    peer: SocketAddr,
    role: SmtpRole,
    mut drain: Option<crate::Drain>,
) -> std::io::Result<()> {
    bump(&ctx.stats.smtp_connections);
    let ctx = &*ctx;
    let local = tcp.local_addr().ok();
    let mut conn = Conn::Plain(tcp);
    if role == SmtpRole::Submissions {
        conn.upgrade(&ctx.tls, ctx.config.tls_handshake_timeout()).await?;
    }
    let config = Arc::new(session_config(ctx, role, &peer, local));
    let mut session = Session::new(config, PeerInfo { addr: peer, tls: conn.is_tls() });
    let idle = Duration::from_secs(ctx.config.smtp.idle_timeout_secs);
    let data_timeout = Duration::from_secs(ctx.config.smtp.data_timeout_secs);
    let mut out = Output { reply: session.greeting(), next: Next::NeedInput };
    let mut buf = vec![0u8; 64 * 1024];
    // The message being received; dropped (its spool file removed) when
    // the session ends mid-DATA, whatever the reason.
    let mut message: Option<Message> = None;
    // Outside DATA the idle time counts from the last complete command,
    // not from the last byte: a client trickling a command line byte by
    // byte is cut all the same (RFC 5321 4.5.3.2.7).
    let mut command_deadline = Instant::now() + idle;
    loop {
        let data = session.take_message_data();
        if !data.is_empty() {
            if let Some(m) = &mut message {
                m.append(data).await;
            }
        }
        out = match out.next {
            Next::NeedInput => {
                let now = if out.reply.is_empty() {
                    // Mid-DATA reads answer nothing: no write, no timer.
                    Instant::now()
                } else {
                    if let Err(e) = conn.write_within(&out.reply, idle).await {
                        if e.kind() == std::io::ErrorKind::TimedOut {
                            tracing::info!(client = %peer, "SMTP client does not read its replies: connection closed");
                        }
                        return Err(e);
                    }
                    let now = Instant::now();
                    command_deadline = now + idle;
                    now
                };
                // In DATA: the idle time between reads (RFC 5321
                // 4.5.3.2.5), within the bound of the whole phase.
                let deadline = match &message {
                    Some(m) => (now + idle).min(m.deadline),
                    None => command_deadline,
                };
                let read = tokio::select! {
                    r = tokio::time::timeout_at(deadline.into(), conn.read(&mut buf)) => r,
                    () = crate::drained(&mut drain) => {
                        // RFC 5321 3.8: the service is going away; the
                        // client retries (at the group's new owner).
                        let bye = format!("421 4.3.2 {} Service moving, try again\r\n", ctx.config.server.hostname);
                        let _ = conn.write_within(bye.as_bytes(), idle).await;
                        break;
                    }
                };
                let n = match read {
                    Ok(read) => read?,
                    Err(_) => {
                        let _ = conn.write_within(&session.timeout(), idle).await;
                        match &message {
                            Some(m) if Instant::now() >= m.deadline => {
                                tracing::info!(client = %peer, "SMTP DATA timeout (data_timeout_secs)")
                            }
                            Some(_) => tracing::info!(client = %peer, "SMTP idle timeout in DATA"),
                            None => tracing::info!(client = %peer, "SMTP idle timeout"),
                        }
                        break;
                    }
                };
                if n == 0 {
                    break;
                }
                session.handle(&buf[..n])
            }
            Next::StartData => match start_message(ctx, store.as_ref(), data_timeout).await {
                Ok((start, started)) => {
                    message = Some(started);
                    chain(out.reply, session.data_started(Ok(start)))
                }
                Err(e) => {
                    tracing::warn!(client = %peer, error = %e, "cannot start a message");
                    chain(out.reply, session.data_started(Err(e)))
                }
            },
            Next::Refused { txn, problem } => {
                let started = message.take().map(|m| m.started);
                refused(ctx, &txn, problem, started);
                chain(out.reply, session.handle(&[]))
            }
            Next::CheckRecipient(rcpt) => {
                let verdict = match ctx.directory().resolve(&rcpt).await {
                    Ok(Resolution::Local(users)) => RcptVerdict::Local(users),
                    Ok(Resolution::Remote) => RcptVerdict::Remote,
                    Ok(Resolution::Mixed { local, remote }) => {
                        RcptVerdict::Forward { local, remote: remote.iter().map(|a| a.to_string()).collect() }
                    }
                    Ok(Resolution::UnknownUser) => RcptVerdict::UnknownUser,
                    Err(e) if e.is_temporary() => {
                        tracing::warn!(client = %peer, rcpt = %rcpt, error = %e, "recipient lookup failed");
                        RcptVerdict::TemporaryFailure(e.to_string())
                    }
                    // A permanent error (an alias that only loops) will not
                    // heal by retrying: 550, not days of 451.
                    Err(e) => {
                        tracing::warn!(client = %peer, rcpt = %rcpt, error = %e, "recipient cannot be delivered");
                        RcptVerdict::UnknownUser
                    }
                };
                // Postfix's "NOQUEUE: reject" lines: refused recipients
                // never reach a transaction log line, so log them here.
                let refused = match &verdict {
                    RcptVerdict::UnknownUser => Some("550 5.1.1 user unknown"),
                    RcptVerdict::Remote if session.authenticated_user().is_none() => {
                        Some("554 5.7.1 relay access denied")
                    }
                    _ => None,
                };
                if let Some(why) = refused {
                    tracing::info!(target: "hamail::mail", "NOQUEUE: reject: RCPT from [{}]: {why}; to=<{rcpt}>", peer.ip());
                }
                chain(out.reply, session.recipient_checked(verdict))
            }
            Next::CheckSender(check) => {
                let verdict = judge_sender(ctx, &check).await;
                if verdict != SenderVerdict::Allowed {
                    tracing::info!(target: "hamail::mail", "NOQUEUE: reject: MAIL from [{}]: {verdict:?}; from=<{}> auth={}",
                        peer.ip(), check.sender, check.authenticated.as_deref().unwrap_or("-"));
                }
                chain(out.reply, session.sender_checked(verdict))
            }
            Next::Authenticate(creds) => {
                // A client gone mid-login is closed on, unanswered.
                let Some(result) = authenticate(ctx, &peer, &creds).await else { break };
                chain(out.reply, session.authenticated(result))
            }
            Next::Deliver(txn) => {
                let result = deliver(ctx, store.as_ref(), &txn, message.take()).await;
                chain(out.reply, session.delivered(result))
            }
            Next::StartTls => {
                conn.write_within(&out.reply, idle).await?;
                conn.upgrade(&ctx.tls, ctx.config.tls_handshake_timeout()).await?;
                session.tls_established()
            }
            Next::Close => {
                conn.write_within(&out.reply, idle).await?;
                break;
            }
        };
    }
    let _ = conn.shutdown().await;
    Ok(())
}

/// Whether this client may use this envelope sender. A user owns their
/// own address, every alias that reaches them (`sales@` -> alice, bob) and
/// what `smtp.allowed_senders` gives them; a client that did not log in may
/// not claim one of our domains (when this is asked at all).
async fn judge_sender(ctx: &Context, check: &SenderCheck) -> SenderVerdict {
    let sender = check.sender.as_str();
    if let Some(user) = &check.authenticated {
        if sender.eq_ignore_ascii_case(user)
            || crate::config::pattern_allows(&ctx.config.smtp.allowed_senders, user, sender)
        {
            return SenderVerdict::Allowed;
        }
    }
    let reaches = match ctx.directory().resolve(&check.sender).await {
        Ok(Resolution::Remote) => None,
        Ok(Resolution::Local(users)) | Ok(Resolution::Mixed { local: users, .. }) => Some(users),
        Ok(Resolution::UnknownUser) => Some(Vec::new()),
        Err(e) if e.is_temporary() => return SenderVerdict::TemporaryFailure(e.to_string()),
        // An alias that only loops is still an address of ours.
        Err(_) => Some(Vec::new()),
    };
    match (&check.authenticated, reaches) {
        (Some(user), Some(users)) if users.iter().any(|u| u.as_str().eq_ignore_ascii_case(user)) => {
            SenderVerdict::Allowed
        }
        (Some(_), _) => SenderVerdict::NotOwned,
        (None, None) => SenderVerdict::Allowed,
        (None, Some(_)) => SenderVerdict::LocalNeedsAuthentication,
    }
}

/// `None` when the client went away during the login (no answer is due).
async fn authenticate(ctx: &Context, peer: &SocketAddr, creds: &Credentials) -> Option<AuthResult> {
    // RFC 4616 2: acting for another identity needs the server's leave;
    // refused before the password is checked, so it tells nothing of it.
    if let Some(authzid) = &creds.authzid {
        if !authzid.eq_ignore_ascii_case(&creds.username)
            && !crate::config::pattern_allows(&ctx.config.smtp.may_act_for, &creds.username, authzid)
        {
            tracing::info!(target: "hamail::mail", "smtp client=[{}] user={} authzid={} result=authzid refused",
                peer.ip(), creds.username, authzid);
            return Some(AuthResult::Failure);
        }
    }
    Some(match crate::check_login(ctx, "smtp", peer, &creds.username, &creds.password).await {
        Ok(_) => AuthResult::Success,
        Err(crate::LoginFailure::Refused) => AuthResult::Failure,
        Err(crate::LoginFailure::Temporary(e)) => AuthResult::TemporaryFailure(e),
        Err(crate::LoginFailure::ClientGone) => return None,
    })
}

/// What [`Next::StartData`] asks: the queue id and date of the message,
/// and its spool with as much memory as the node's budget gives (up to
/// [`IN_MEMORY`]; none: straight to the file).
async fn start_message(
    ctx: &Context,
    store: &dyn MailStore,
    data_timeout: Duration,
) -> Result<(DataStart, Message), StoreError> {
    let queue_id = store.next_queue_id().await?;
    let date = hamail_smtp::rfc5322_date(crate::unix_now() as i64);
    let memory = ctx.memory.try_reserve(IN_MEMORY);
    let spool = store.spool(if memory.is_some() { IN_MEMORY } else { 0 });
    let started = Instant::now();
    let message = Message { spool: Some(spool), failed: None, memory, started, deadline: started + data_timeout };
    Ok((DataStart { queue_id, date }, message))
}

/// The log line of a transaction (Postfix's style: one line per message).
struct MailLine<'a> {
    txn: &'a Transaction,
    size: u64,
    started: Option<Instant>,
}

impl std::fmt::Display for MailLine<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let txn = self.txn;
        write!(
            f,
            "{}: smtp client=[{}] helo={} auth={} from=<{}> to={} nrcpt={} size={} delay_ms={}",
            txn.queue_id,
            txn.peer.ip(),
            txn.helo,
            txn.authenticated.as_deref().unwrap_or("-"),
            txn.return_path.as_deref().unwrap_or(""),
            summarize_recipients(&txn.recipients),
            txn.recipients.len(),
            self.size,
            self.started.map(|s| s.elapsed().as_millis()).unwrap_or(0)
        )
    }
}

/// A message refused after its end (its spool is already gone): logged
/// and counted.
fn refused(ctx: &Context, txn: &Transaction, problem: DataProblem, started: Option<Instant>) {
    bump(&ctx.stats.messages_rejected);
    tracing::info!(target: "hamail::mail", "{} result={}", MailLine { txn, size: txn.data_size, started }, problem.reply());
}

async fn deliver(
    ctx: &Context,
    store: &dyn MailStore,
    txn: &Transaction,
    message: Option<Message>,
) -> Result<hamail_store::Committed, StoreError> {
    let started = message.as_ref().map(|m| m.started);
    let body = match message {
        Some(m) => m.finish().await,
        None => Err(StoreError::Internal("end of data without a message".into())),
    };
    let (result, size) = match body {
        Ok((body, _memory)) => {
            let size = body.len();
            let incoming = Incoming {
                return_path: txn.return_path.clone(),
                local: txn.local.clone(),
                remote: txn.remote.clone(),
                body,
                queue_id: txn.queue_id,
                resend: resend_key(ctx.config.smtp.resend_window_secs, txn),
            };
            (store.accept(incoming).await, size)
        }
        Err(e) => (Err(e), txn.data_size),
    };
    let line = MailLine { txn, size, started };
    match &result {
        Ok(c) if c.resend_of().is_some() => {
            bump(&ctx.stats.messages_resent);
            tracing::info!(target: "hamail::mail",
                "{line} result=250 already delivered as {} (resend)", c.resend_of().map(|q| q.to_string()).unwrap_or_default())
        }
        Ok(_) => {
            bump(&ctx.stats.messages_accepted);
            if !txn.remote.is_empty() {
                // Relayed mail: no need to wait for the next scan.
                ctx.delivery.wake();
            }
            tracing::info!(target: "hamail::mail", "{line} result=250 queued")
        }
        Err(e) => {
            bump(&ctx.stats.messages_rejected);
            tracing::warn!(target: "hamail::mail",
                "{line} result={} error={e}", if e.is_temporary() { 451 } else { 554 })
        }
    }
    result
}

/// What recognises this transaction if the client sends it again (RFC
/// 1047): over what the client sent, since the stored body carries our
/// `Received:` line with a new queue id each time. Mail without a
/// Message-ID is never taken for a resend (identical mail may be sent
/// twice on purpose).
fn resend_key(window_secs: u64, txn: &Transaction) -> Option<ResendKey> {
    if window_secs == 0 {
        return None;
    }
    let id = txn.message_id()?;
    let fingerprint = Fingerprint::of_digest(&id, txn.return_path.as_deref(), &txn.recipients, &txn.body_sha256);
    Some(ResendKey { fingerprint, window_secs })
}

/// `<a>,<b>,<c>` for the log line; long lists are cut (1000 recipients are
/// counted in `nrcpt`, not spelled out).
fn summarize_recipients(rcpts: &[String]) -> String {
    const SHOWN: usize = 5;
    let mut s: Vec<String> = rcpts.iter().take(SHOWN).map(|r| format!("<{r}>")).collect();
    if rcpts.len() > SHOWN {
        s.push(format!("(+{} more)", rcpts.len() - SHOWN));
    }
    s.join(",")
}
