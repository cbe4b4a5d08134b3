//! The tokio driver of the POP3 session: feeds the sans-IO
//! `hamail_pop3::Session`, and answers its requests (login with a growing
//! delay after failures, the maildrop lock, bodies, the atomic UPDATE).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hamail_pop3::{AuthResult, MaildropResult, Next, Output, PeerInfo, Pop3Config, Session};
use hamail_store::{Address, MailStore};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::conn::Conn;
use crate::limits::MaildropGuard;
use crate::{bump, Context};

fn chain(mut pending: Vec<u8>, out: Output) -> Output {
    pending.extend_from_slice(&out.reply);
    Output { reply: pending, next: out.next }
}

/// What the session did, for its one log line.
#[derive(Default)]
struct Tally {
    user: Option<Address>,
    retrieved: usize,
    retrieved_bytes: usize,
    deleted: usize,
    result: &'static str,
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
    let mut buf = vec![0u8; 16 * 1024];
    // Held from a successful login to the end of the connection.
    let mut lock: Option<MaildropGuard> = None;
    let mut tally = Tally { result: "disconnected", ..Tally::default() };
    let outcome: std::io::Result<()> = async {
        loop {
            out = match out.next {
                Next::NeedInput => {
                    conn.write_all(&out.reply).await?;
                    let read = tokio::select! {
                        r = tokio::time::timeout(idle, conn.read(&mut buf)) => r,
                        () = crate::drained(&mut drain) => {
                            // Nothing is deleted: UPDATE happens only at QUIT.
                            let _ = conn.write_all(b"-ERR [SYS/TEMP] service moving, try again\r\n").await;
                            tally.result = "service moving";
                            break;
                        }
                    };
                    let n = match read {
                        Ok(read) => read?,
                        Err(_) => {
                            let _ = conn.write_all(&session.timeout()).await;
                            tally.result = "idle timeout";
                            break;
                        }
                    };
                    if n == 0 {
                        break;
                    }
                    session.handle(&buf[..n])
                }
                Next::Authenticate(creds) => {
                    let result = login(ctx, &peer, &creds.username, &creds.password).await;
                    chain(out.reply, session.authenticated(result))
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
                    chain(out.reply, session.maildrop_opened(result))
                }
                Next::Fetch(hash) => {
                    let result = store.body(&hash).await;
                    if let Ok(b) = &result {
                        tally.retrieved += 1;
                        tally.retrieved_bytes += b.len();
                    }
                    chain(out.reply, session.fetched(result))
                }
                Next::Update { user, delete } => {
                    let result = store.delete(&user, &delete).await;
                    tally.deleted = if result.is_ok() { delete.len() } else { 0 };
                    tally.result = if result.is_ok() { "quit" } else { "update failed" };
                    if let Err(e) = &result {
                        tracing::error!(user = %user, error = %e, "POP3 UPDATE failed: nothing deleted");
                    }
                    chain(out.reply, session.updated(result))
                }
                Next::StartTls => {
                    conn.write_all(&out.reply).await?;
                    conn.flush().await?;
                    conn.upgrade(&ctx.tls, ctx.config.tls_handshake_timeout()).await?;
                    session.tls_established()
                }
                Next::Close => {
                    conn.write_all(&out.reply).await?;
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

async fn login(ctx: &Context, peer: &SocketAddr, username: &str, password: &str) -> AuthResult {
    match crate::check_login(ctx, "pop3", peer, username, password).await {
        Ok(user) => AuthResult::Success(user),
        Err(crate::LoginFailure::Refused) => AuthResult::Failure,
        Err(crate::LoginFailure::Temporary(e)) => AuthResult::TemporaryFailure(e),
    }
}
