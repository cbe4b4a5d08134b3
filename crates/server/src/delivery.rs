//! The delivery worker: works the outbound queue.
//!
//! Every scan (each `scan_interval_ms`, or at once when woken) it reads
//! the queue with its per-recipient state, and:
//! - reports failures: builds an RFC 3464 DSN (hamail-relay) for each entry
//!   with failed, unreported recipients and accepts it through the normal
//!   store path to the envelope sender (a failed bounce goes to the
//!   postmaster, a failed double bounce is dropped), then records them as
//!   reported;
//! - expires recipients older than the lifetime and sends one delay
//!   warning per entry;
//! - groups the due recipients by destination (MX domain, transport map
//!   entry or smarthost) and starts one SMTP session per destination (up
//!   to `max_per_destination` sessions each, `max_connections` in all),
//!   each carrying every message for that destination.
//!
//! The results of a transaction are recorded (`MailStore::queue_change`,
//! one fsynced commit or one Raft commit) the moment the reply to the final
//! dot is parsed, before the next command: a crash can then resend a
//! message only if it came in that window (RFC 1047). A destination that
//! fails as a whole (no address answers, greeting or TLS failure) is backed
//! off as a whole, so new mail for it waits too.
//!
//! What it does not do: decide which node works the queue — the caller
//! runs it where it should run (always on a single node; in a cluster, on
//! the owner of the `delivery` resource) and aborts it on stop; an aborted
//! session's unrecorded recipients are simply still pending.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use hamail_relay::client::{Action, Client, ClientOptions, Envelope, RcptStatus, TlsPolicy};
use hamail_relay::dsn::{remote_refusal, reply_code, split_remote_refusal, Dsn, DsnKind, DsnRecipient};
use hamail_relay::route::{DestinationKey, Hop, Router};
use hamail_relay::schedule::{Clock, Schedule};
use hamail_relay::{domain_of, RelayError};
use hamail_store::{
    Address, Incoming, MailStore, QueueId, QueueItem, QueueOp, RcptOutcome, RecipientStatus, Resolution, StoreResult,
};
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::config::{RelaySection, TlsMode};
use crate::Context;

/// One recipient to try: its entry and index.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct RcptRef {
    queue_id: QueueId,
    index: u32,
}

/// One message of a session: the entry and the recipients to try now.
struct Job {
    item: QueueItem,
    rcpts: Vec<u32>,
}

/// Recipients being delivered, and those whose session ended since the
/// current scan read the queue: the scan's copy of their state may predate
/// their record, so they are not picked again until the next scan (which
/// reads the record) — else a message delivered meanwhile would be sent
/// twice.
#[derive(Default)]
struct Flight {
    active: HashSet<RcptRef>,
    finished: HashSet<RcptRef>,
}

/// What the scans share with the sessions they start.
struct Shared {
    /// Recipients being delivered now (never picked twice).
    in_flight: Mutex<Flight>,
    /// Sessions open per destination.
    sessions: Mutex<HashMap<DestinationKey, usize>>,
    /// Destinations backed off as a whole: until (Unix seconds), the
    /// failures in a row, the last error.
    backoff: Mutex<HashMap<DestinationKey, Backoff>>,
    total: Arc<tokio::sync::Semaphore>,
    wake: tokio::sync::Notify,
    /// The sessions' tasks, aborted with the worker.
    tasks: Mutex<Vec<tokio::task::AbortHandle>>,
}

/// A destination backed off after a temporary failure of a session to it.
struct Backoff {
    until: u64,
    failures: u32,
    error: String,
}

/// Whether the operator flushed this pending recipient since it was last
/// deferred (`queue flush` sets its next attempt to 0; a deferral or a wait
/// for its destination always sets a later one, and leaves an error): it
/// is tried now, its destination's backoff notwithstanding (as Postfix's
/// `postqueue -f` clears its dead-destination cache).
fn flushed(r: &hamail_store::RecipientState) -> bool {
    r.next_attempt == 0 && (r.attempts > 0 || r.last_error.is_some())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A running delivery worker; dropping it stops it (sessions in flight are
/// aborted: their unrecorded recipients stay pending).
pub struct Worker {
    task: tokio::task::JoinHandle<()>,
    shared: Arc<Shared>,
    mode: Mode,
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.task.abort();
        for t in lock(&self.shared.tasks).drain(..) {
            t.abort();
        }
    }
}

impl Worker {
    /// Starts working the queue of `ctx` with `clock`.
    pub fn start(ctx: &Arc<Context>, clock: Arc<dyn Clock>, mode: Mode) -> Result<Worker, RelayError> {
        let cfg = &ctx.config.relay;
        let router = Router::new(cfg.route_config())?;
        let shared = Arc::new(Shared {
            in_flight: Mutex::new(Flight::default()),
            sessions: Mutex::new(HashMap::new()),
            backoff: Mutex::new(HashMap::new()),
            total: Arc::new(tokio::sync::Semaphore::new(cfg.max_connections.max(1))),
            wake: tokio::sync::Notify::new(),
            tasks: Mutex::new(Vec::new()),
        });
        let env = Arc::new(Env {
            ctx: Arc::downgrade(ctx),
            router,
            schedule: cfg.schedule(),
            clock,
            tls: tls_connectors(cfg)?,
            cfg: cfg.clone(),
            hostname: ctx.config.server.hostname.clone(),
            shared: shared.clone(),
            mode,
        });
        let task = tokio::spawn(scan_loop(env));
        Ok(Worker { task, shared, mode })
    }

    /// Scan now (new mail, `queue flush`).
    pub fn wake(&self) {
        self.shared.wake.notify_one();
    }
}

/// Whether this node works the queue, and the worker when it does.
pub struct Control {
    clock: Arc<dyn Clock>,
    worker: Mutex<Option<Worker>>,
}

/// Why a worker runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// A node of its own: it pauses by itself the moment the node is in a
    /// cluster (before the supervisor stops it), so two nodes never
    /// deliver the same queue.
    Single,
    /// The owner of a `delivery` resource in a cluster.
    Resource,
}

impl Control {
    pub fn new(clock: Arc<dyn Clock>) -> Self {
        Control { clock, worker: Mutex::new(None) }
    }

    /// Starts the worker if it is not running in this mode.
    pub fn run(&self, ctx: &Arc<Context>, mode: Mode) -> Result<(), RelayError> {
        let mut w = lock(&self.worker);
        if w.as_ref().map(|w| w.mode) != Some(mode) {
            *w = None;
            *w = Some(Worker::start(ctx, self.clock.clone(), mode)?);
            tracing::info!(?mode, "outbound delivery started on this node");
        }
        Ok(())
    }

    /// Stops the worker (sessions in flight are aborted at once; what they
    /// had not recorded is still pending and will be sent again).
    pub fn stop(&self) {
        if lock(&self.worker).take().is_some() {
            tracing::info!("outbound delivery stopped on this node");
        }
    }

    /// Stops the worker if it runs in `mode`.
    fn stop_mode(&self, mode: Mode) {
        let mut w = lock(&self.worker);
        if w.as_ref().map(|w| w.mode) == Some(mode) {
            *w = None;
            tracing::info!("outbound delivery stopped on this node");
        }
    }

    pub fn running(&self) -> bool {
        lock(&self.worker).is_some()
    }

    /// Scan now.
    pub fn wake(&self) {
        if let Some(w) = lock(&self.worker).as_ref() {
            w.wake();
        }
    }

    /// The clock the worker uses.
    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
    }
}

/// The `delivery` resource of a failover group starts here.
pub(crate) fn resource_start(ctx: &Arc<Context>) -> Result<(), String> {
    if !ctx.config.relay.enabled {
        tracing::warn!("the delivery resource started, but [relay] enabled = false on this node: mail stays queued");
        return Ok(());
    }
    ctx.delivery.run(ctx, Mode::Resource).map_err(|e| e.to_string())
}

/// Runs the worker on a node that is not in a cluster, and stops it when
/// the node joins one (there, the `delivery` resource of a failover group
/// decides; see `resources`).
pub(crate) fn supervise(ctx: &Arc<Context>) -> tokio::task::JoinHandle<()> {
    let weak = Arc::downgrade(ctx);
    tokio::spawn(async move {
        let mut was_single = None;
        loop {
            let Some(ctx) = weak.upgrade() else { return };
            let single = ctx.cluster.node().is_none();
            if was_single != Some(single) {
                if single && ctx.config.relay.enabled {
                    if let Err(e) = ctx.delivery.run(&ctx, Mode::Single) {
                        tracing::error!(error = %e, "outbound delivery cannot start");
                    }
                } else if !single {
                    ctx.delivery.stop_mode(Mode::Single);
                }
                was_single = Some(single);
            }
            drop(ctx);
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    })
}

/// Everything a scan and a session need.
struct Env {
    ctx: Weak<Context>,
    router: Router,
    schedule: Schedule,
    clock: Arc<dyn Clock>,
    tls: TlsConnectors,
    cfg: RelaySection,
    hostname: String,
    shared: Arc<Shared>,
    mode: Mode,
}

async fn scan_loop(env: Arc<Env>) {
    let interval = Duration::from_millis(env.cfg.scan_interval_ms.max(10));
    loop {
        let Some(ctx) = env.ctx.upgrade() else { return };
        let store = ctx.store();
        // Joined a cluster: from now on only a resource owner delivers.
        let paused = env.mode == Mode::Single && ctx.cluster.node().is_some();
        drop(ctx);
        if !paused {
            if let Err(e) = scan(&env, store.as_ref()).await {
                tracing::warn!(error = %e, "delivery scan failed; trying again");
            }
        }
        tokio::select! {
            _ = env.shared.wake.notified() => {}
            _ = tokio::time::sleep(interval) => {}
        }
    }
}

async fn scan(env: &Arc<Env>, store: &dyn MailStore) -> StoreResult<()> {
    // Sessions that end from here on may have recorded after the read.
    lock(&env.shared.in_flight).finished.clear();
    let items = store.queue_items().await?;
    let now = env.clock.now();
    let mut due: HashMap<DestinationKey, Vec<Job>> = HashMap::new();
    for item in items {
        let qid = item.entry.queue_id;
        let busy = {
            let flight = lock(&env.shared.in_flight);
            (0..item.state.recipients.len() as u32).any(|i| {
                let r = RcptRef { queue_id: qid, index: i };
                flight.active.contains(&r) || flight.finished.contains(&r)
            })
        };
        if busy {
            continue;
        }
        if item.state.recipients.iter().any(|r| r.status == RecipientStatus::Failed { reported: false }) {
            // One entry's trouble (a sender the directory cannot resolve
            // now...) must not stop the rest of the queue.
            if let Err(e) = report_failures(env, store, &item, now).await {
                tracing::warn!(queue_id = %qid, error = %e, "bounce not sent yet; retried at the next scan");
            }
            continue;
        }
        if item.state.hold {
            continue;
        }
        if env.schedule.expired(item.entry.queued_at, now) {
            let results = pending(&item)
                .map(|i| {
                    let last = item.state.recipients[i as usize].last_error.clone().unwrap_or_default();
                    (
                        i,
                        RcptOutcome::Failed {
                            error: format!("4.4.7 message expired in the queue; last error: {last}"),
                            reported: false,
                        },
                    )
                })
                .collect::<Vec<_>>();
            if let Err(e) = store.queue_change(qid, QueueOp::Results { at: now, results }).await {
                tracing::warn!(queue_id = %qid, error = %e, "recording the expiry failed; retried at the next scan");
            }
            continue;
        }
        if !item.state.warned && env.schedule.warning_due(item.entry.queued_at, now) {
            if let Err(e) = send_delay_warning(env, store, &item, now).await {
                tracing::warn!(queue_id = %qid, error = %e, "delay warning not sent yet; retried at the next scan");
            }
        }
        let mut by_dest: HashMap<DestinationKey, Vec<u32>> = HashMap::new();
        let mut waiting = Vec::new();
        for i in pending(&item) {
            let r = &item.state.recipients[i as usize];
            if r.next_attempt > now {
                continue;
            }
            let domain = domain_of(&item.entry.recipients[i as usize]);
            let key = env.router.destination(&domain);
            // One session has one TLS policy (that of its first recipient's
            // domain): domains with a policy of their own that share a next
            // hop with others (a transport entry) get sessions of their own.
            // Not through the smarthost, whose own policy applies to all.
            let key = match env.cfg.domain_tls(&domain) {
                Some(mode) if !env.router.via_smarthost(&domain) => DestinationKey(format!("{key} (tls {mode})")),
                _ => key,
            };
            {
                let mut backoff = lock(&env.shared.backoff);
                if let Some(b) = backoff.get(&key).filter(|b| b.until > now) {
                    if !flushed(r) {
                        // Recorded once per wait, so that the queue shows
                        // when it will be tried rather than "due now".
                        if r.next_attempt < b.until {
                            let reason = format!("not tried: {key} is backing off after: {}", b.error);
                            waiting.push((i, RcptOutcome::Waiting { until: b.until, reason }));
                        }
                        continue;
                    }
                    tracing::info!(destination = %key, queue_id = %qid, "flushed: the destination's backoff cleared");
                    backoff.remove(&key);
                }
            }
            by_dest.entry(key).or_default().push(i);
        }
        if !waiting.is_empty() {
            let op = QueueOp::Results { at: now, results: waiting };
            if let Err(e) = store.queue_change(qid, op).await {
                tracing::warn!(queue_id = %qid, error = %e, "recording a wait for the destination failed");
            }
        }
        for (key, rcpts) in by_dest {
            due.entry(key).or_default().push(Job { item: item.clone(), rcpts });
        }
    }
    for (key, mut jobs) in due {
        let open = lock(&env.shared.sessions).get(&key).copied().unwrap_or(0);
        let slots = env.cfg.max_per_destination.max(1).saturating_sub(open);
        if slots == 0 {
            continue;
        }
        // Spread the messages over the free slots, at most
        // `messages_per_session` each; the rest waits for the next scan.
        let per = jobs.len().div_ceil(slots).clamp(1, env.cfg.messages_per_session.max(1));
        while !jobs.is_empty() {
            let Ok(permit) = env.shared.total.clone().try_acquire_owned() else { return Ok(()) };
            let batch: Vec<Job> = jobs.drain(..per.min(jobs.len())).collect();
            {
                let mut in_flight = lock(&env.shared.in_flight);
                for j in &batch {
                    for i in &j.rcpts {
                        in_flight.active.insert(RcptRef { queue_id: j.item.entry.queue_id, index: *i });
                    }
                }
                *lock(&env.shared.sessions).entry(key.clone()).or_default() += 1;
            }
            let (env2, key2) = (env.clone(), key.clone());
            let task = tokio::spawn(async move {
                let (env, key) = (env2, key2);
                let refs: Vec<RcptRef> = batch
                    .iter()
                    .flat_map(|j| j.rcpts.iter().map(|i| RcptRef { queue_id: j.item.entry.queue_id, index: *i }))
                    .collect();
                deliver(&env, &key, batch).await;
                {
                    let mut in_flight = lock(&env.shared.in_flight);
                    for r in refs {
                        in_flight.active.remove(&r);
                        in_flight.finished.insert(r);
                    }
                    let mut sessions = lock(&env.shared.sessions);
                    if let Some(n) = sessions.get_mut(&key) {
                        *n = n.saturating_sub(1);
                        if *n == 0 {
                            sessions.remove(&key);
                        }
                    }
                }
                drop(permit);
                env.shared.wake.notify_one();
            });
            {
                let mut tasks = lock(&env.shared.tasks);
                tasks.retain(|t| !t.is_finished());
                tasks.push(task.abort_handle());
            }
            if lock(&env.shared.sessions).get(&key).copied().unwrap_or(0) >= env.cfg.max_per_destination.max(1) {
                break;
            }
        }
    }
    Ok(())
}

fn pending(item: &QueueItem) -> impl Iterator<Item = u32> + '_ {
    item.state
        .recipients
        .iter()
        .enumerate()
        .filter(|(_, r)| r.status == RecipientStatus::Pending)
        .map(|(i, _)| i as u32)
}

/// Delivers a batch for one destination and records every result.
async fn deliver(env: &Arc<Env>, key: &DestinationKey, jobs: Vec<Job>) {
    let Some(ctx) = env.ctx.upgrade() else { return };
    let store = ctx.store();
    drop(ctx);
    let domain = domain_of(&jobs[0].item.entry.recipients[jobs[0].rcpts[0] as usize]);
    let outcome = match env.router.hops(&domain).await {
        Ok(hops) => session_over_hops(env, store.as_ref(), &hops, &jobs, &domain).await,
        Err(e) => Err(e),
    };
    let now = env.clock.now();
    let (unanswered, error) = match &outcome {
        Ok(0) => {
            lock(&env.shared.backoff).remove(key);
            return;
        }
        Ok(left) => (
            &jobs[jobs.len() - left..],
            RelayError::Temporary("the session ended before these messages were sent".into()),
        ),
        Err(e) => (&jobs[..], e.clone()),
    };
    // Whatever was not answered gets the destination's error.
    let status = RcptStatus::refused(error.is_temporary(), error.to_string());
    for job in unanswered {
        let results = job.rcpts.iter().map(|i| (*i, outcome_of(env, &job.item, *i, &status, now))).collect();
        if let Err(e) = store.queue_change(job.item.entry.queue_id, QueueOp::Results { at: now, results }).await {
            tracing::error!(queue_id = %job.item.entry.queue_id, error = %e, "recording a deferral failed");
        }
    }
    if outcome.is_err() && error.is_temporary() {
        let mut backoff = lock(&env.shared.backoff);
        let failures = backoff.get(key).map(|b| b.failures + 1).unwrap_or(1);
        let until = now + env.schedule.backoff(failures);
        backoff.insert(key.clone(), Backoff { until, failures, error: error.to_string() });
        tracing::info!(destination = %key, error = %error, "destination backed off");
    }
}

/// The store's outcome for a session's status of recipient `i`.
fn outcome_of(env: &Env, item: &QueueItem, i: u32, status: &RcptStatus, now: u64) -> RcptOutcome {
    match status {
        RcptStatus::Delivered(_) => RcptOutcome::Delivered,
        RcptStatus::Failed(e) => RcptOutcome::Failed { error: e.clone(), reported: false },
        RcptStatus::Deferred(e) => {
            let attempts = item.state.recipients.get(i as usize).map(|r| r.attempts).unwrap_or(0) + 1;
            if env.schedule.expired(item.entry.queued_at, now) {
                RcptOutcome::Failed {
                    error: format!("4.4.7 message expired in the queue; last error: {e}"),
                    reported: false,
                }
            } else {
                RcptOutcome::Deferred {
                    next_attempt: env.schedule.next_attempt(item.entry.queued_at, attempts, now),
                    error: e.clone(),
                }
            }
        }
    }
}

/// Tries the hops in order until one takes a session; returns how many
/// jobs were left unanswered (0: all recorded), or the last error when no
/// host could be used at all.
async fn session_over_hops(
    env: &Arc<Env>,
    store: &dyn MailStore,
    hops: &[Hop],
    jobs: &[Job],
    domain: &str,
) -> Result<usize, RelayError> {
    let mut last = RelayError::Temporary(format!("no address to try for {domain}"));
    let connect_timeout = Duration::from_secs(env.cfg.connect_timeout_secs.max(1));
    for hop in hops {
        for addr in &hop.addrs {
            let tcp = match tokio::time::timeout(connect_timeout, TcpStream::connect(addr)).await {
                Ok(Ok(t)) => t,
                Ok(Err(e)) => {
                    last = RelayError::Temporary(format!("connecting to {} [{addr}]: {e}", hop.name));
                    continue;
                }
                Err(_) => {
                    last = RelayError::Temporary(format!("connecting to {} [{addr}]: timed out", hop.name));
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            match run_session(env, store, hop, *addr, tcp, jobs, domain).await {
                Ok(left) => return Ok(left),
                // Nothing was sent yet: the next host may do better
                // (RFC 5321 5.1).
                Err(e) => last = e,
            }
        }
    }
    Err(last)
}

/// Either side of STARTTLS.
enum Conn {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
    Broken,
}

impl Conn {
    async fn write_all(&mut self, b: &[u8]) -> std::io::Result<()> {
        match self {
            Conn::Plain(s) => write_flush(s, b).await,
            Conn::Tls(s) => write_flush(s.as_mut(), b).await,
            Conn::Broken => Err(std::io::ErrorKind::NotConnected.into()),
        }
    }
    async fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Conn::Plain(s) => s.read(buf).await,
            Conn::Tls(s) => s.read(buf).await,
            Conn::Broken => Err(std::io::ErrorKind::NotConnected.into()),
        }
    }
}

async fn write_flush<S: AsyncWrite + Unpin>(s: &mut S, b: &[u8]) -> std::io::Result<()> {
    s.write_all(b).await?;
    s.flush().await
}

/// One SMTP session: every job in turn. `Err` only when the session
/// failed before its first transaction (the caller tries the next host).
async fn run_session(
    env: &Arc<Env>,
    store: &dyn MailStore,
    hop: &Hop,
    addr: SocketAddr,
    tcp: TcpStream,
    jobs: &[Job],
    domain: &str,
) -> Result<usize, RelayError> {
    let policy = env.cfg.tls_for(domain, hop.smarthost);
    let options = ClientOptions {
        helo_name: env.hostname.clone(),
        tls: match policy {
            TlsMode::Never => TlsPolicy::Never,
            TlsMode::Opportunistic => TlsPolicy::Opportunistic,
            TlsMode::Require | TlsMode::Verify => TlsPolicy::Require,
        },
        auth: if hop.smarthost { env.cfg.smarthost_auth() } else { None },
        tls_active: false,
    };
    let mut client = Client::new(options);
    let mut conn = Conn::Plain(tcp);
    let command_timeout = Duration::from_secs(env.cfg.command_timeout_secs.max(1));
    let mut next_job = 0usize;
    let mut started = false;
    let mut buf = vec![0u8; 16 * 1024];
    let mut actions: std::collections::VecDeque<Action> = Default::default();
    loop {
        let Some(action) = actions.pop_front() else {
            let n = match tokio::time::timeout(command_timeout, conn.read(&mut buf)).await {
                Ok(Ok(0)) => None,
                Ok(Ok(n)) => Some(n),
                Ok(Err(_)) | Err(_) => None,
            };
            match n {
                Some(n) => actions.extend(client.feed(&buf[..n])),
                None => actions.extend(client.connection_lost(&format!("connection to {} [{addr}] lost", hop.name))),
            }
            continue;
        };
        match action {
            Action::Send(bytes) => {
                let written = tokio::time::timeout(command_timeout, conn.write_all(&bytes)).await;
                if !matches!(written, Ok(Ok(()))) {
                    actions.clear();
                    actions.extend(client.connection_lost(&format!("writing to {} [{addr}] failed", hop.name)));
                }
            }
            Action::StartTls => {
                let Conn::Plain(tcp) = std::mem::replace(&mut conn, Conn::Broken) else {
                    return Err(RelayError::Internal("STARTTLS on a TLS connection".into()));
                };
                let connector = if policy == TlsMode::Verify { &env.tls.verify } else { &env.tls.any };
                let name = rustls::pki_types::ServerName::try_from(hop.name.clone())
                    .unwrap_or_else(|_| rustls::pki_types::ServerName::IpAddress(addr.ip().into()));
                match tokio::time::timeout(command_timeout, connector.connect(name, tcp)).await {
                    Ok(Ok(tls)) => {
                        conn = Conn::Tls(Box::new(tls));
                        actions.extend(client.tls_started());
                    }
                    Ok(Err(e)) => return Err(RelayError::Temporary(format!("TLS with {} [{addr}]: {e}", hop.name))),
                    Err(_) => return Err(RelayError::Temporary(format!("TLS with {} [{addr}]: timed out", hop.name))),
                }
            }
            Action::Ready => {
                started = true;
                actions.extend(start_next(store, &mut client, jobs, &mut next_job).await);
            }
            Action::Finished(statuses) => {
                let job = &jobs[next_job - 1];
                let now = env.clock.now();
                let results: Vec<(u32, RcptOutcome)> = job
                    .rcpts
                    .iter()
                    .zip(&statuses)
                    .map(|(i, s)| (*i, outcome_of(env, &job.item, *i, &attributed(s, &hop.name), now)))
                    .collect();
                if let Some(ctx) = env.ctx.upgrade() {
                    for s in &statuses {
                        crate::bump(match s {
                            RcptStatus::Delivered(_) => &ctx.stats.relay_sent,
                            RcptStatus::Deferred(_) => &ctx.stats.relay_deferred,
                            RcptStatus::Failed(_) => &ctx.stats.relay_failed,
                        });
                    }
                }
                for (i, s) in job.rcpts.iter().zip(&statuses) {
                    tracing::info!(target: "hamail::mail", "relay queue_id={} to=<{}> relay={} [{addr}] status={}",
                        job.item.entry.queue_id, job.item.entry.recipients[*i as usize], hop.name, status_word(s));
                }
                // The durable record, before anything else is sent.
                if let Err(e) = store.queue_change(job.item.entry.queue_id, QueueOp::Results { at: now, results }).await
                {
                    // Not recorded: the message stays pending and will be
                    // sent again (at least once). Stop here, and never
                    // try another host with what this one already took.
                    tracing::error!(queue_id = %job.item.entry.queue_id, error = %e, "recording delivery results failed; session ended");
                    return Ok(jobs.len() - next_job);
                }
                actions.extend(start_next(store, &mut client, jobs, &mut next_job).await);
            }
            Action::Closed(error) => {
                let left = jobs.len() - next_job;
                return match error {
                    Some(e) if !started => Err(e),
                    _ => Ok(left),
                };
            }
        }
    }
}

/// A refusal in the server's own words (a reply: its code first) is
/// recorded with the server's name, for the DSN's Remote-MTA
/// ([`hamail_relay::dsn::remote_refusal`]); the driver's own reasons
/// (connection lost, body unreadable) are not the server's.
fn attributed(s: &RcptStatus, mta: &str) -> RcptStatus {
    match s {
        RcptStatus::Failed(e) if reply_code(e).is_some() => RcptStatus::Failed(remote_refusal(mta, e)),
        RcptStatus::Deferred(e) if reply_code(e).is_some() => RcptStatus::Deferred(remote_refusal(mta, e)),
        other => other.clone(),
    }
}

fn status_word(s: &RcptStatus) -> String {
    match s {
        RcptStatus::Delivered(r) => format!("sent ({r})"),
        RcptStatus::Deferred(e) => format!("deferred ({e})"),
        RcptStatus::Failed(e) => format!("bounced ({e})"),
    }
}

/// Starts the next job's transaction, or QUIT when none is left. A body
/// that cannot be read defers that job (recorded by the caller's end).
async fn start_next(store: &dyn MailStore, client: &mut Client, jobs: &[Job], next: &mut usize) -> Vec<Action> {
    if let Some(job) = jobs.get(*next) {
        *next += 1;
        match store.body(&job.item.entry.body).await {
            Ok(body) => {
                let envelope = Envelope {
                    from: job.item.entry.return_path.clone(),
                    recipients: job.rcpts.iter().map(|i| job.item.entry.recipients[*i as usize].clone()).collect(),
                    body,
                };
                return client.start(envelope);
            }
            Err(e) => {
                tracing::error!(queue_id = %job.item.entry.queue_id, error = %e, "body unreadable; deferred");
                return vec![Action::Finished(
                    job.rcpts.iter().map(|_| RcptStatus::Deferred(format!("body unreadable: {e}"))).collect(),
                )];
            }
        }
    }
    client.quit()
}

/// Builds and sends the DSN for the failed, unreported recipients of
/// `item`, then records them as reported.
async fn report_failures(env: &Env, store: &dyn MailStore, item: &QueueItem, now: u64) -> StoreResult<()> {
    let failed: Vec<u32> = item
        .state
        .recipients
        .iter()
        .enumerate()
        .filter(|(_, r)| r.status == RecipientStatus::Failed { reported: false })
        .map(|(i, _)| i as u32)
        .collect();
    let recipients: Vec<DsnRecipient> = failed.iter().map(|i| dsn_recipient(item, *i, "5.0.0")).collect();
    let body = original(store, item).await;
    let to = match &item.entry.return_path {
        Some(sender) => Some(sender.clone()),
        // A bounce that bounced: the postmaster hears of it (a double
        // bounce); a double bounce that fails is only logged.
        None if !hamail_smtp::has_field(hamail_relay::dsn::header_block(&body), DOUBLE_BOUNCE_HEADER) => {
            Some(env.double_bounce_to().await)
        }
        None => None,
    };
    match to {
        Some(to) => {
            let dsn = Dsn {
                kind: DsnKind::Failure,
                reporting_mta: &env.hostname,
                to: &to,
                queue_id: &item.entry.queue_id.to_string(),
                arrival: item.entry.queued_at,
                now,
                recipients: &recipients,
                original: &body,
                will_retry_until: None,
            };
            let double = item.entry.return_path.is_none();
            send_report(env, store, &dsn, double).await?;
            tracing::info!(target: "hamail::mail", "bounce queue_id={} to=<{to}> recipients={}", item.entry.queue_id, recipients.len());
        }
        None => tracing::warn!(queue_id = %item.entry.queue_id, "undeliverable double bounce dropped"),
    }
    let results = failed.iter().map(|i| (*i, RcptOutcome::Reported)).collect();
    store.queue_change(item.entry.queue_id, QueueOp::Results { at: now, results }).await
}

async fn send_delay_warning(env: &Env, store: &dyn MailStore, item: &QueueItem, now: u64) -> StoreResult<()> {
    if let Some(to) = &item.entry.return_path {
        let recipients: Vec<DsnRecipient> = pending(item).map(|i| dsn_recipient(item, i, "4.0.0")).collect();
        let body = original(store, item).await;
        let dsn = Dsn {
            kind: DsnKind::Delay,
            reporting_mta: &env.hostname,
            to,
            queue_id: &item.entry.queue_id.to_string(),
            arrival: item.entry.queued_at,
            now,
            recipients: &recipients,
            original: &body,
            will_retry_until: Some(env.schedule.expires_at(item.entry.queued_at)),
        };
        send_report(env, store, &dsn, false).await?;
    }
    store.queue_change(item.entry.queue_id, QueueOp::Warned).await
}

/// The original message for a report; without its headers when the body
/// cannot be read (the report matters more than the copy).
async fn original(store: &dyn MailStore, item: &QueueItem) -> Arc<Vec<u8>> {
    match store.body(&item.entry.body).await {
        Ok(b) => b,
        Err(e) => {
            tracing::error!(queue_id = %item.entry.queue_id, error = %e, "original unreadable: report without its headers");
            Arc::new(Vec::new())
        }
    }
}

/// The header that marks our double bounces (never bounced again).
const DOUBLE_BOUNCE_HEADER: &str = "X-Hamail-Double-Bounce";

fn dsn_recipient(item: &QueueItem, i: u32, default_status: &str) -> DsnRecipient {
    let r = &item.state.recipients[i as usize];
    let error = r.last_error.clone().unwrap_or_default();
    // "mx said: 550 5.1.1 text" → Remote-MTA mx, status 5.1.1, diagnostic
    // the whole reply.
    let (mta, reply) = split_remote_refusal(&error);
    let code = reply_code(reply);
    // The first enhanced status code (RFC 3463) in the text: right after
    // the reply code, or quoted in our own reason ("last error: ...").
    let esc = reply.split_whitespace().find(|w| {
        w.split('.').count() == 3 && w.split('.').all(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_digit()))
    });
    DsnRecipient {
        address: item.entry.recipients[i as usize].clone(),
        status: esc.map(str::to_string).unwrap_or_else(|| match code {
            Some(c) if c.starts_with('4') => "4.0.0".into(),
            Some(_) => "5.0.0".into(),
            None => default_status.into(),
        }),
        diagnostic: code.is_some().then(|| reply.to_string()),
        reason: error.clone(),
        remote_mta: mta.map(str::to_string),
        last_attempt: (r.last_attempt > 0).then_some(r.last_attempt),
    }
}

impl Env {
    /// Who gets double bounces: `[relay] double_bounce_to`, else the
    /// server's postmaster (`[server] postmaster`), else `postmaster@` the
    /// first local domain (or our host name).
    async fn double_bounce_to(&self) -> String {
        if let Some(to) = &self.cfg.double_bounce_to {
            return to.clone();
        }
        let Some(ctx) = self.ctx.upgrade() else { return format!("postmaster@{}", self.hostname) };
        if let Some(postmaster) = &ctx.config.server.postmaster {
            return postmaster.clone();
        }
        match ctx.directory().domains().await {
            Ok(d) if !d.is_empty() => format!("postmaster@{}", d[0]),
            _ => format!("postmaster@{}", self.hostname),
        }
    }
}

/// Accepts a report (null sender) through the normal store path.
async fn send_report(env: &Env, store: &dyn MailStore, dsn: &Dsn<'_>, double: bool) -> StoreResult<()> {
    let Some(ctx) = env.ctx.upgrade() else {
        return Err(hamail_store::StoreError::Unavailable("server stopping".into()));
    };
    let mut body = hamail_relay::dsn::build(dsn).map_err(|e| hamail_store::StoreError::Internal(e.to_string()))?;
    if double {
        let mut marked = format!("{DOUBLE_BOUNCE_HEADER}: yes\r\n").into_bytes();
        marked.extend_from_slice(&body);
        body = marked;
    }
    let (local, remote) = match Address::parse(dsn.to) {
        Ok(addr) => match ctx.directory().resolve(&addr).await? {
            Resolution::Local(users) => (users, Vec::new()),
            Resolution::Mixed { local, remote } => (local, remote.iter().map(|a| a.to_string()).collect()),
            Resolution::Remote => (Vec::new(), vec![addr.to_string()]),
            Resolution::UnknownUser => {
                tracing::warn!(to = dsn.to, "report to an unknown local user dropped");
                return Ok(());
            }
        },
        Err(_) => {
            tracing::warn!(to = dsn.to, "report to an unusable address dropped");
            return Ok(());
        }
    };
    let queue_id = store.next_queue_id().await?;
    // A report is never a resend of anything.
    store.accept(Incoming { return_path: None, local, remote, body: body.into(), queue_id, resend: None }).await?;
    crate::bump(&ctx.stats.relay_reports);
    Ok(())
}

/// TLS client configurations: one that verifies the server's certificate
/// against the system's CAs (`verify` policy), one that accepts any
/// certificate (opportunistic TLS, RFC 7435: encryption against passive
/// eavesdroppers, no authentication).
struct TlsConnectors {
    verify: tokio_rustls::TlsConnector,
    any: tokio_rustls::TlsConnector,
}

fn tls_connectors(cfg: &RelaySection) -> Result<TlsConnectors, RelayError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    if let Ok(pem) = std::fs::read(&cfg.ca_file) {
        for cert in rustls_pemfile::certs(&mut pem.as_slice()).flatten() {
            let _ = roots.add(cert);
        }
    }
    let verify = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| RelayError::Internal(format!("TLS setup: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let any = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| RelayError::Internal(format!("TLS setup: {e}")))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
        .with_no_client_auth();
    Ok(TlsConnectors {
        verify: tokio_rustls::TlsConnector::from(Arc::new(verify)),
        any: tokio_rustls::TlsConnector::from(Arc::new(any)),
    })
}

/// Accepts any certificate but still checks the handshake signatures.
#[derive(Debug)]
struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
