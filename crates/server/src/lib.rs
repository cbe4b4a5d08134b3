//! hamail-server: the network side of one hamail node.
//!
//! Role: bind the listeners, run a thin tokio driver around each sans-IO
//! protocol session (`hamail-smtp`, `hamail-pop3`), answer the session's
//! requests from the store and the directory, do TLS, enforce connection
//! limits and idle timeouts, and serve the admin API on a local socket.
//!
//! What it does not do: parse or decide anything about SMTP or POP3 (the
//! sessions do), or keep data (the store does). It never answers `250` to
//! DATA itself: it hands the store's `Committed` proof to the session.

pub mod admin;
pub mod budget;
pub mod cluster;
pub mod config;
mod conn;
pub mod delivery;
pub mod import;
pub mod limits;
mod pop3;
pub mod resources;
mod smtp;
pub mod tls;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use hamail_store::{Directory, Domain, LocalStore, MailStore};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

pub use config::Config;

/// The one error type of this crate.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The operator's configuration is wrong: names the file and line.
    #[error("{file}{}: {message}", line.map(|l| format!(":{l}")).unwrap_or_default())]
    Config { file: String, line: Option<usize>, message: String },
    #[error("TLS: {0}")]
    Tls(String),
    #[error("I/O error while {context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] hamail_store::StoreError),
    /// A file or directory others could tamper with: refused, not used.
    #[error("{path} is mode {mode:04o}: group or others can write it; `chmod 700 {path}` and start again")]
    UnsafeMode { path: String, mode: u32 },
}

impl ServerError {
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        ServerError::Io { context: context.into(), source }
    }
}

/// Makes the data directory (store, password hashes, keys, the admin
/// socket) its user's only: created 0700, and set to 0700 at each start.
/// One that group or others can write is refused (whoever can write it
/// could replace what is in it), not repaired.
pub fn secure_data_dir(dir: &Path) -> Result<(), ServerError> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let shown = dir.display().to_string();
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| ServerError::io(format!("creating the data directory {shown}"), e))?;
    let mode = std::fs::metadata(dir).map_err(|e| ServerError::io(format!("reading {shown}"), e))?.permissions().mode()
        & 0o7777;
    if mode & 0o022 != 0 {
        return Err(ServerError::UnsafeMode { path: shown, mode });
    }
    if mode & 0o077 != 0 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| ServerError::io(format!("setting {shown} to mode 0700"), e))?;
        tracing::info!(data_dir = %shown, "data directory was mode {mode:04o}: set to 0700");
    }
    Ok(())
}

/// Counters shown by `hamail status`.
#[derive(Default)]
pub struct Stats {
    pub smtp_connections: AtomicU64,
    pub pop3_connections: AtomicU64,
    pub messages_accepted: AtomicU64,
    pub messages_rejected: AtomicU64,
    /// Resends recognised (RFC 1047): answered 250, not delivered again.
    pub messages_resent: AtomicU64,
    pub pop3_logins: AtomicU64,
    /// Outbound delivery, per recipient and attempt.
    pub relay_sent: AtomicU64,
    pub relay_deferred: AtomicU64,
    pub relay_failed: AtomicU64,
    /// Delivery status notifications generated (bounces, delay warnings).
    pub relay_reports: AtomicU64,
}

/// What every connection handler shares.
pub struct Context {
    pub config: Config,
    /// Swapped from the local store to the replicated one when a data node
    /// initialises or joins a cluster.
    store: std::sync::RwLock<Arc<dyn MailStore>>,
    /// The local store, as the cluster's state machine needs it.
    pub local: Arc<LocalStore>,
    pub cluster: cluster::ClusterRuntime,
    /// Swapped from the local directory to the replicated one when the
    /// node initialises or joins a cluster while running.
    directory: std::sync::RwLock<Arc<dyn Directory>>,
    pub tls: TlsAcceptor,
    pub stats: Stats,
    pub started: Instant,
    pub(crate) maildrop_locks: limits::MaildropLocks,
    /// Connection slots and per-address limits, node-wide.
    pub(crate) admission: limits::Admission,
    /// Failed logins and the bans they lead to.
    pub logins: limits::Logins,
    /// Outbound delivery on this node.
    pub delivery: delivery::Control,
    /// Buffers a client can make this node hold, in all.
    pub memory: Arc<budget::MemoryBudget>,
}

impl Context {
    /// The directory in force (local, or replicated once in a cluster).
    pub fn directory(&self) -> Arc<dyn Directory> {
        self.directory.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// The mail store in force (local, or replicated once in a cluster).
    pub fn store(&self) -> Arc<dyn MailStore> {
        self.store.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    pub fn set_store(&self, store: Arc<dyn MailStore>) {
        *self.store.write().unwrap_or_else(std::sync::PoisonError::into_inner) = store;
    }

    pub fn set_directory(&self, directory: Arc<dyn Directory>) {
        *self.directory.write().unwrap_or_else(std::sync::PoisonError::into_inner) = directory;
    }
}

/// A running server: its bound addresses (useful with port 0).
pub struct Running {
    pub smtp: Vec<SocketAddr>,
    pub submission: Vec<SocketAddr>,
    pub submissions: Vec<SocketAddr>,
    pub pop3: Vec<SocketAddr>,
    pub pop3s: Vec<SocketAddr>,
    pub admin_socket: PathBuf,
    pub context: Arc<Context>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Running {
    /// Stops accepting connections (sessions in progress finish on their own).
    pub fn stop(&self) {
        for t in &self.tasks {
            t.abort();
        }
        self.context.delivery.stop();
        self.context.cluster.stop();
    }

    /// The cluster address this node advertises, when one is configured.
    pub fn cluster_address(&self) -> Option<&str> {
        self.context.cluster.advertised()
    }
}

pub(crate) use limits::Pool;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SmtpRole {
    /// Port 25: mail for local domains from anyone.
    Mta,
    /// Port 587: STARTTLS + AUTH, relay for authenticated users.
    Submission,
    /// Port 465: implicit TLS + AUTH.
    Submissions,
}

impl SmtpRole {
    /// Port 25 has its own slots; submission shares the users' with POP3.
    pub(crate) fn pool(self) -> Pool {
        if self == SmtpRole::Mta {
            Pool::Mta
        } else {
            Pool::Submission
        }
    }
}

/// Binds every listener and starts serving. Creates the configured domains
/// if missing.
pub async fn start(config: Config, local: Arc<LocalStore>) -> Result<Running, ServerError> {
    start_with_clock(config, local, Arc::new(hamail_relay::schedule::SystemClock)).await
}

/// [`start`] with the clock outbound delivery uses for its schedule.
pub async fn start_with_clock(
    config: Config,
    local: Arc<LocalStore>,
    clock: Arc<dyn hamail_relay::schedule::Clock>,
) -> Result<Running, ServerError> {
    let tls = tls::acceptor(&config)?;
    let store: Arc<dyn MailStore> = local.clone();
    let directory: Arc<dyn Directory> = local.clone();
    let cluster = cluster::ClusterRuntime::bind(&config)?;
    let context = Arc::new(Context {
        maildrop_locks: limits::MaildropLocks::default(),
        admission: limits::Admission::new(config.admission()),
        logins: limits::Logins::new(config.login_policy()),
        delivery: delivery::Control::new(clock),
        memory: budget::MemoryBudget::new(config.server.memory_budget_mb.saturating_mul(1024 * 1024)),
        config,
        store: std::sync::RwLock::new(store),
        local: local.clone(),
        cluster,
        directory: std::sync::RwLock::new(directory),
        tls,
        stats: Stats::default(),
        started: Instant::now(),
    });
    cluster::resume(&context, &local).await?;
    // After resuming: in a cluster, the config's domains go through the log.
    let directory = context.directory();
    let existing = directory.domains().await?;
    for d in &context.config.server.domains {
        let d = Domain::parse(d)?;
        if !existing.contains(&d) {
            directory.add_domain(&d).await?;
            tracing::info!(domain = %d, "domain from the config file added");
        }
    }
    let c = &context.config;
    let mut tasks = Vec::new();
    let bound = |addrs: &[SocketAddr], what: &str| -> Result<Vec<(TcpListener, SocketAddr)>, ServerError> {
        addrs
            .iter()
            .map(|a| {
                let std = std::net::TcpListener::bind(a)
                    .map_err(|e| ServerError::io(format!("binding {what} listener {a}"), e))?;
                std.set_nonblocking(true).map_err(|e| ServerError::io("listener setup", e))?;
                let local = std.local_addr().map_err(|e| ServerError::io("listener address", e))?;
                let l = TcpListener::from_std(std).map_err(|e| ServerError::io("listener setup", e))?;
                Ok((l, local))
            })
            .collect()
    };
    // A witness votes and keeps the control-plane state: no mail listeners.
    let none: &[SocketAddr] = &[];
    let mail = |a: &'_ Vec<SocketAddr>| -> Vec<SocketAddr> {
        if c.cluster.role == config::ClusterRole::Witness {
            none.to_vec()
        } else {
            a.clone()
        }
    };
    let smtp_l = bound(&mail(&c.smtp.listen), "SMTP")?;
    let sub_l = bound(&mail(&c.smtp.submission), "submission")?;
    let subs_l = bound(&mail(&c.smtp.submissions), "submissions")?;
    let pop3_l = bound(&mail(&c.pop3.listen), "POP3")?;
    let pop3s_l = bound(&mail(&c.pop3.pop3s), "POP3S")?;
    let addrs = |v: &Vec<(TcpListener, SocketAddr)>| v.iter().map(|(_, a)| *a).collect::<Vec<_>>();
    let mut running = Running {
        smtp: addrs(&smtp_l),
        submission: addrs(&sub_l),
        submissions: addrs(&subs_l),
        pop3: addrs(&pop3_l),
        pop3s: addrs(&pop3s_l),
        admin_socket: c.admin_socket(),
        context: context.clone(),
        tasks: Vec::new(),
    };
    for (role, listeners) in [(SmtpRole::Mta, smtp_l), (SmtpRole::Submission, sub_l), (SmtpRole::Submissions, subs_l)] {
        for (l, _) in listeners {
            let ctx = context.clone();
            tasks.push(tokio::spawn(accept_loop(context.clone(), l, role.pool(), move |tcp, peer| {
                smtp::serve(ctx.clone(), ctx.store(), tcp, peer, role, None)
            })));
        }
    }
    for (implicit_tls, listeners) in [(false, pop3_l), (true, pop3s_l)] {
        for (l, _) in listeners {
            let ctx = context.clone();
            tasks.push(tokio::spawn(accept_loop(context.clone(), l, Pool::Pop3, move |tcp, peer| {
                pop3::serve(ctx.clone(), ctx.store(), tcp, peer, implicit_tls, None)
            })));
        }
    }
    tasks.push(admin::serve(context.clone(), &running.admin_socket)?);
    if c.cluster.role != config::ClusterRole::Witness {
        tasks.push(delivery::supervise(&context));
    }
    running.tasks = tasks;
    Ok(running)
}

/// Accepts connections for one listener: each gets a task while
/// admission (its pool, its address's limits) lets it in; otherwise the
/// client gets a refusal (a 421 or an -ERR, so it retries later) and is
/// closed.
pub(crate) async fn accept_loop<F, Fut>(ctx: Arc<Context>, listener: TcpListener, pool: Pool, serve: F)
where
    F: Fn(tokio::net::TcpStream, SocketAddr) -> Fut,
    Fut: std::future::Future<Output = std::io::Result<()>> + Send + 'static,
{
    use std::os::fd::AsRawFd;
    use tokio::io::AsyncWriteExt;
    let protocol = if pool == Pool::Pop3 { "POP3" } else { "SMTP" };
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(error = %e, "{protocol} accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let now = Instant::now();
        match ctx.admission.admit(pool, peer, tcp.as_raw_fd(), now) {
            Ok(slot) => {
                let session = serve(tcp, peer);
                tokio::spawn(async move {
                    if let Err(e) = session.await {
                        tracing::debug!(client = %peer, error = %e, "{protocol} connection ended with an error");
                    }
                    drop(slot);
                });
            }
            Err(why) => {
                ctx.admission.log_refusal(protocol, peer, why, now);
                let refusal = refusal_text(pool, why, &ctx.config.server.hostname);
                tokio::spawn(async move {
                    let mut tcp = tcp;
                    let _ = tcp.write_all(refusal.as_bytes()).await;
                });
            }
        }
    }
}

/// What a refused client is told: a temporary refusal, so that it retries
/// later (RFC 5321 3.8: 421 when the service is not available; RFC 3206
/// 4: [SYS/TEMP]).
fn refusal_text(pool: Pool, why: limits::Refusal, hostname: &str) -> String {
    let what = if why.per_address() { "too many connections from your address" } else { "too many connections" };
    match pool {
        Pool::Pop3 => format!("-ERR [SYS/TEMP] {what}, try again later\r\n"),
        Pool::Mta | Pool::Submission => format!("421 4.7.0 {hostname} Error: {what}, try again later\r\n"),
    }
}

/// Tells sessions to end at their next safe point: a session that is
/// waiting for the client's next command answers `421` (SMTP) or `-ERR`
/// (POP3) and closes; one that is committing a message finishes, sends its
/// `250`, and closes at the next command. Never cut between a commit and
/// its reply (that would make the client send the message again).
pub(crate) type Drain = tokio::sync::watch::Receiver<bool>;

/// Resolves when `drain` says stop (never, for `None`).
pub(crate) async fn drained(drain: &mut Option<Drain>) {
    match drain {
        Some(rx) => {
            if rx.wait_for(|stop| *stop).await.is_err() {
                // The sender is gone: the service was dropped, stop too.
            }
        }
        None => std::future::pending::<()>().await,
    }
}

/// Why a login did not succeed.
pub(crate) enum LoginFailure {
    /// Wrong user or password; the growing delay has already been waited.
    Refused,
    /// The directory could not answer (no quorum...), or the client's
    /// address or the account is banned for now: try again later.
    Temporary(String),
    /// The client shut down its side before the answer: the connection is
    /// to be closed without one. A guesser that sends its guess and half-
    /// closes would otherwise get the answer without waiting the delay.
    ClientGone,
}

/// Why a banned client is refused, in the `454 4.7.0` / `-ERR [SYS/TEMP]`
/// reply (RFC 4954 6, RFC 3206 4): temporary, whatever the password.
const BANNED: &str = "too many failed logins, try again later";

/// Checks a login (SMTP AUTH, POP3) against the directory. A login from a
/// banned address or to a banned account is refused before the password is
/// looked at. A failure is counted (per address and per account: enough of
/// them set a ban) and waits the growing delay before returning, so that
/// guessing stays slow whatever the protocol; the wait ends early when the
/// client hangs up (even half: its FIN alone), so that it does not keep a
/// connection slot, and then the login gets no answer at all. A success is
/// not answered either to a client already gone, so that a half-closed
/// connection tells a right guess from a wrong one by nothing.
pub(crate) async fn check_login(
    ctx: &Context,
    protocol: &str,
    peer: &SocketAddr,
    username: &str,
    password: &str,
) -> Result<hamail_store::Address, LoginFailure> {
    let account = hamail_store::Address::parse(username).ok();
    let shown = account.as_ref().map(|a| a.to_string()).unwrap_or_else(|| "-".into());
    let now = Instant::now();
    if let Some(ban) = ctx.logins.banned(peer.ip(), account.as_ref(), now) {
        if let Some(left_out) = ctx.logins.log_refusal(now) {
            tracing::info!(target: "hamail::mail",
                "{protocol} client=[{}] user={shown} result=refused: {ban} is banned ({left_out} such refusals not logged before)", peer.ip());
        }
        return Err(LoginFailure::Temporary(BANNED.into()));
    }
    let verified = match &account {
        Some(user) => ctx.directory().verify_password(user, password).await,
        None => Ok(false),
    };
    match (verified, account) {
        (Ok(true), Some(_)) if ctx.admission.client_gone_now(peer) => Err(LoginFailure::ClientGone),
        (Ok(true), Some(user)) => Ok(user),
        (Err(e), _) => Err(LoginFailure::Temporary(e.to_string())),
        (Ok(_), account) => {
            tracing::info!(target: "hamail::mail", "{protocol} client=[{}] user={shown} result=auth failed", peer.ip());
            let penalty = ctx.logins.failed(peer.ip(), account.as_ref(), Instant::now());
            let ban_secs = ctx.config.server.login_ban_secs;
            for (ban, failures) in penalty.banned {
                tracing::warn!(target: "hamail::mail",
                    "{protocol} client=[{}] login ban: {ban} banned for {ban_secs} s after too many failed logins (lift: hamail ban del)",
                    peer.ip());
                // Every node of a cluster holds it (told in the background:
                // the reply does not wait for the cluster).
                let change = hamail_cluster::BanChange::Set {
                    target: ban.name(),
                    until: unix_now().saturating_add(ban_secs),
                    failures,
                };
                tokio::spawn(cluster::share_ban(ctx.cluster.node(), change));
            }
            tokio::select! {
                () = tokio::time::sleep(penalty.delay) => Err(LoginFailure::Refused),
                () = ctx.admission.client_gone(peer) => Err(LoginFailure::ClientGone),
            }
        }
    }
}

pub(crate) fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

pub(crate) fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}
