//! The tokio driver of the SMTP session: reads bytes, feeds the sans-IO
//! `hamail_smtp::Session`, and answers its requests (recipient lookup,
//! authentication, commit, TLS upgrade).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hamail_smtp::{
    AuthResult, Credentials, Next, Output, PeerInfo, RcptVerdict, SenderCheck, SenderVerdict, Session, SmtpConfig,
    Transaction,
};
use hamail_store::{Fingerprint, Incoming, MailStore, Resolution, ResendKey, StoreError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::conn::Conn;
use crate::{bump, Context, SmtpRole};

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
    let mut out = Output { reply: session.greeting(), next: Next::NeedInput };
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        out = match out.next {
            Next::NeedInput => {
                conn.write_all(&out.reply).await?;
                let read = tokio::select! {
                    r = tokio::time::timeout(idle, conn.read(&mut buf)) => r,
                    () = crate::drained(&mut drain) => {
                        // RFC 5321 3.8: the service is going away; the
                        // client retries (at the group's new owner).
                        let bye = format!("421 4.3.2 {} Service moving, try again\r\n", ctx.config.server.hostname);
                        let _ = conn.write_all(bye.as_bytes()).await;
                        break;
                    }
                };
                let n = match read {
                    Ok(read) => read?,
                    Err(_) => {
                        let _ = conn.write_all(&session.timeout()).await;
                        tracing::info!(client = %peer, "SMTP idle timeout");
                        break;
                    }
                };
                if n == 0 {
                    break;
                }
                session.handle(&buf[..n])
            }
            Next::CheckRecipient(rcpt) => {
                let verdict = match ctx.directory().resolve(&rcpt).await {
                    Ok(Resolution::Local(users)) => RcptVerdict::Local(users),
                    Ok(Resolution::Remote) => RcptVerdict::Remote,
                    Ok(Resolution::Mixed { local, remote }) => RcptVerdict::Forward {
                        local,
                        remote: remote.iter().map(|a| a.to_string()).collect(),
                    },
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
                    RcptVerdict::Remote if session.authenticated_user().is_none() => Some("554 5.7.1 relay access denied"),
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
                let result = authenticate(ctx, &peer, &creds).await;
                chain(out.reply, session.authenticated(result))
            }
            Next::Deliver(txn) => {
                let result = deliver(ctx, store.as_ref(), &txn).await;
                chain(out.reply, session.delivered(result))
            }
            Next::StartTls => {
                conn.write_all(&out.reply).await?;
                conn.flush().await?;
                conn.upgrade(&ctx.tls, ctx.config.tls_handshake_timeout()).await?;
                session.tls_established()
            }
            Next::Close => {
                conn.write_all(&out.reply).await?;
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
        let patterns = crate::config::patterns_of(&ctx.config.smtp.allowed_senders, user);
        if sender.eq_ignore_ascii_case(user) || patterns.iter().any(|p| crate::config::address_pattern_matches(p, sender)) {
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
        (Some(user), Some(users)) if users.iter().any(|u| u.as_str().eq_ignore_ascii_case(user)) => SenderVerdict::Allowed,
        (Some(_), _) => SenderVerdict::NotOwned,
        (None, None) => SenderVerdict::Allowed,
        (None, Some(_)) => SenderVerdict::LocalNeedsAuthentication,
    }
}

async fn authenticate(ctx: &Context, peer: &SocketAddr, creds: &Credentials) -> AuthResult {
    // RFC 4616 2: acting for another identity needs the server's leave;
    // refused before the password is checked, so it tells nothing of it.
    if let Some(authzid) = &creds.authzid {
        let may = crate::config::patterns_of(&ctx.config.smtp.may_act_for, &creds.username);
        if !authzid.eq_ignore_ascii_case(&creds.username)
            && !may.iter().any(|p| crate::config::address_pattern_matches(p, authzid))
        {
            tracing::info!(target: "hamail::mail", "smtp client=[{}] user={} authzid={} result=authzid refused",
                peer.ip(), creds.username, authzid);
            return AuthResult::Failure;
        }
    }
    match crate::check_login(ctx, "smtp", peer, &creds.username, &creds.password).await {
        Ok(_) => AuthResult::Success,
        Err(crate::LoginFailure::Refused) => AuthResult::Failure,
        Err(crate::LoginFailure::Temporary(e)) => AuthResult::TemporaryFailure(e),
    }
}

async fn deliver(ctx: &Context, store: &dyn MailStore, txn: &Transaction) -> Result<hamail_store::Committed, StoreError> {
    let started = std::time::Instant::now();
    let queue_id = store.next_queue_id().await?;
    let hostname = &ctx.config.server.hostname;
    let date = hamail_smtp::rfc5322_date(crate::unix_now() as i64);
    let body = hamail_smtp::stamp_message(txn, queue_id, hostname, &date, hostname);
    let size = body.len();
    let incoming = Incoming {
        return_path: txn.return_path.clone(),
        local: txn.local.clone(),
        remote: txn.remote.clone(),
        body: Arc::new(body),
        queue_id,
        resend: resend_key(ctx.config.smtp.resend_window_secs, txn),
    };
    let result = store.accept(incoming).await;
    let to = summarize_recipients(&txn.recipients);
    let from = txn.return_path.as_deref().unwrap_or("");
    let auth = txn.authenticated.as_deref().unwrap_or("-");
    let ms = started.elapsed().as_millis();
    match &result {
        Ok(c) if c.resend_of().is_some() => {
            bump(&ctx.stats.messages_resent);
            tracing::info!(target: "hamail::mail",
                "{queue_id}: smtp client=[{}] helo={} auth={auth} from=<{from}> to={to} nrcpt={} size={size} delay_ms={ms} result=250 already delivered as {} (resend)",
                txn.peer.ip(), txn.helo, txn.recipients.len(), c.resend_of().map(|q| q.to_string()).unwrap_or_default())
        }
        Ok(_) => {
            bump(&ctx.stats.messages_accepted);
            if !txn.remote.is_empty() {
                // Relayed mail: no need to wait for the next scan.
                ctx.delivery.wake();
            }
            tracing::info!(target: "hamail::mail",
                "{queue_id}: smtp client=[{}] helo={} auth={auth} from=<{from}> to={to} nrcpt={} size={size} delay_ms={ms} result=250 queued",
                txn.peer.ip(), txn.helo, txn.recipients.len())
        }
        Err(e) => {
            bump(&ctx.stats.messages_rejected);
            tracing::warn!(target: "hamail::mail",
                "{queue_id}: smtp client=[{}] helo={} auth={auth} from=<{from}> to={to} nrcpt={} size={size} delay_ms={ms} result={} error={e}",
                txn.peer.ip(), txn.helo, txn.recipients.len(), if e.is_temporary() { 451 } else { 554 })
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
