//! The mail listeners of a group, bound to the group's address.
//!
//! The node's own listeners (`[smtp] listen`, `submission`, `submissions`,
//! `[pop3] listen`, `pop3s`) give the ports; the group binds the same ports
//! on its floating (or loopback) address, so clients that use the group's
//! address follow the group wherever it runs. Sessions are served exactly
//! as on the node's own listeners (same `Context`, `accept_loop`,
//! `smtp::serve`, `pop3::serve`) and count against the node's connection
//! slots and per-address limits.
//!
//! Shared-disk mode: when the group also holds a `disk` resource (started
//! before this one), the group's sessions use a mail store on that disk
//! (`<mount_point>/hamail-store`) instead of the node's (replicated) one:
//! the maildrops and queue follow the disk from node to node, as the seed's
//! spool did. Users and domains stay the cluster's. On stop the store is
//! closed — every session that could hold it ended — before the disk is
//! unmounted; a store that cannot be closed fails the stop, so the disk is
//! never released while this node could still write it.
//!
//! Port 0 in the config means "any port" here too; `MailAddresses` tells
//! which ones were chosen.
//!
//! Note: a node listener on the wildcard address (`0.0.0.0:25`) already
//! owns port 25 on every address, and binding the group's address then
//! fails with "address in use": list the node's own addresses explicitly.
//!
//! On stop the accept loops end and the listeners close; then sessions are
//! drained: each ends at its next safe point (a session waiting for a
//! command gets `421 4.3.2` and closes; one committing a message finishes
//! and sends its `250` first). Cutting a session between its commit and its
//! `250` would make the client send the message again (a duplicate, the
//! seed's caveat 1: seen in the switchover-under-load test). Sessions still
//! running after a grace period are cut: waiting longer could hold a
//! failover up for the length of the idle timeout.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hamail_cluster::groups::ResourceError;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use hamail_store::{LocalStore, MailStore};

use super::{config_error, env_error, run_error};
use crate::{accept_loop, config::ClusterRole, pop3, smtp, Context, SmtpRole};

/// The addresses a group's mail listeners are bound to.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MailAddresses {
    pub smtp: Vec<SocketAddr>,
    pub submission: Vec<SocketAddr>,
    pub submissions: Vec<SocketAddr>,
    pub pop3: Vec<SocketAddr>,
    pub pop3s: Vec<SocketAddr>,
}

/// A running mail service: its accept loops, and the switches that drain
/// and then cut its sessions.
pub(crate) struct MailRunning {
    pub addresses: MailAddresses,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    drain: tokio::sync::watch::Sender<bool>,
    stop: tokio::sync::watch::Sender<bool>,
    active: Arc<std::sync::atomic::AtomicUsize>,
    /// The group's store on its shared disk (shared-disk mode).
    disk_store: Option<Arc<LocalStore>>,
}

/// Counts a session while it lives.
struct Active(Arc<std::sync::atomic::AtomicUsize>);

impl Active {
    fn new(n: &Arc<std::sync::atomic::AtomicUsize>) -> Active {
        n.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Active(n.clone())
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// How long stopping waits for sessions to reach a safe point.
pub(crate) const DRAIN_GRACE: Duration = Duration::from_millis(1500);

impl MailRunning {
    /// Whether every accept loop still runs.
    pub fn alive(&self) -> bool {
        self.tasks.iter().all(|t| !t.is_finished())
    }

    /// Closes the listeners and cuts the sessions at once (the entry was
    /// replaced or forgotten; no one waits).
    pub fn shutdown(self) {
        for t in &self.tasks {
            t.abort();
        }
        let _ = self.drain.send(true);
        let _ = self.stop.send(true);
    }

    /// Closes the listeners, lets sessions end at a safe point (up to
    /// `grace`), then cuts the rest; then closes the shared-disk store, if
    /// any — an error if it is still in use after `grace` more.
    pub async fn stop(self, grace: Duration) -> Result<(), String> {
        for t in &self.tasks {
            t.abort();
        }
        let _ = self.drain.send(true);
        let deadline = tokio::time::Instant::now() + grace;
        while self.active.load(std::sync::atomic::Ordering::SeqCst) > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let left = self.active.load(std::sync::atomic::Ordering::SeqCst);
        if left > 0 {
            tracing::warn!(sessions = left, "mail sessions still running after the drain grace: cut");
        }
        let _ = self.stop.send(true);
        let Some(store) = self.disk_store else { return Ok(()) };
        // The cut sessions drop their handles as their tasks end.
        let deadline = tokio::time::Instant::now() + grace.max(Duration::from_millis(100));
        while Arc::strong_count(&store) > 1 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        match Arc::try_unwrap(store) {
            Ok(store) => {
                // Closing joins the store's committer thread: off the runtime.
                tokio::task::spawn_blocking(move || drop(store)).await.map_err(|e| format!("closing the store: {e}"))
            }
            Err(_) => Err("the shared-disk store is still in use: not released".into()),
        }
    }
}

/// The configured ports, each once, in order.
fn ports(addrs: &[SocketAddr]) -> Vec<u16> {
    let mut out = Vec::new();
    for a in addrs {
        if !out.contains(&a.port()) {
            out.push(a.port());
        }
    }
    out
}

fn bind(
    resource: &str,
    ip: IpAddr,
    ports: &[u16],
    what: &str,
) -> Result<Vec<(TcpListener, SocketAddr)>, ResourceError> {
    ports
        .iter()
        .map(|&port| {
            let at = SocketAddr::new(ip, port);
            let fail = |e: std::io::Error| {
                let hint = match e.kind() {
                    std::io::ErrorKind::AddrInUse => {
                        " (in use: another group, another program, or a node listener on the wildcard address with this port)"
                    }
                    std::io::ErrorKind::AddrNotAvailable => " (the group's address is not on this node: start its address resource first)",
                    std::io::ErrorKind::PermissionDenied => " (ports below 1024 need root/CAP_NET_BIND_SERVICE)",
                    _ => "",
                };
                run_error(resource, format!("binding the {what} listener {at}: {e}{hint}"))
            };
            let std = std::net::TcpListener::bind(at).map_err(fail)?;
            std.set_nonblocking(true).map_err(fail)?;
            let local = std.local_addr().map_err(fail)?;
            Ok((TcpListener::from_std(std).map_err(fail)?, local))
        })
        .collect()
}

/// Opens a group's store on its shared disk (mounted at `mount_point`).
pub(crate) async fn open_disk_store(
    ctx: &Context,
    resource: &str,
    mount_point: &str,
) -> Result<Arc<LocalStore>, ResourceError> {
    let options = ctx.config.store_options().map_err(|e| config_error(resource, e.to_string()))?;
    let dir = std::path::Path::new(mount_point).join("hamail-store");
    tokio::task::spawn_blocking(move || LocalStore::open(&dir, options))
        .await
        .map_err(|e| run_error(resource, format!("opening the store on the shared disk: {e}")))?
        .map_err(|e| run_error(resource, format!("opening the store on the shared disk ({mount_point}): {e}")))
}

/// The store a group session uses: the group's on its shared disk, else
/// the one in force (looked up per connection: it changes when the node
/// joins a cluster).
fn session_store(ctx: &Context, disk_store: &Option<Arc<LocalStore>>) -> Arc<dyn MailStore> {
    match disk_store {
        Some(s) => s.clone(),
        None => ctx.store(),
    }
}

/// Binds every listener on `ip` (all or none) and starts serving; the
/// sessions use `disk_store` if the group has one.
pub(crate) async fn start(
    ctx: &Arc<Context>,
    resource: &str,
    ip: IpAddr,
    disk_store: Option<Arc<LocalStore>>,
) -> Result<MailRunning, ResourceError> {
    let c = &ctx.config;
    if c.cluster.role == ClusterRole::Witness {
        return Err(env_error(
            resource,
            "this node is a witness: it serves no mail (remove it from the group's nodes)",
        ));
    }
    // Any bind failure drops the listeners bound so far: all or nothing.
    let smtp_l = bind(resource, ip, &ports(&c.smtp.listen), "SMTP")?;
    let sub_l = bind(resource, ip, &ports(&c.smtp.submission), "submission")?;
    let subs_l = bind(resource, ip, &ports(&c.smtp.submissions), "submissions")?;
    let pop3_l = bind(resource, ip, &ports(&c.pop3.listen), "POP3")?;
    let pop3s_l = bind(resource, ip, &ports(&c.pop3.pop3s), "POP3S")?;
    let addrs = |v: &Vec<(TcpListener, SocketAddr)>| v.iter().map(|(_, a)| *a).collect::<Vec<_>>();
    let addresses = MailAddresses {
        smtp: addrs(&smtp_l),
        submission: addrs(&sub_l),
        submissions: addrs(&subs_l),
        pop3: addrs(&pop3_l),
        pop3s: addrs(&pop3s_l),
    };
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let (drain, draining) = tokio::sync::watch::channel(false);
    let active = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for (role, listeners) in [(SmtpRole::Mta, smtp_l), (SmtpRole::Submission, sub_l), (SmtpRole::Submissions, subs_l)] {
        for (l, _) in listeners {
            let ctx = ctx.clone();
            let disk_store = disk_store.clone();
            let (stopped, draining, active) = (stopped.clone(), draining.clone(), active.clone());
            tasks.push(tokio::spawn(accept_loop(ctx.clone(), l, role.pool(), move |tcp, peer| {
                let counted = Active::new(&active);
                let store = session_store(&ctx, &disk_store);
                let session = smtp::serve(ctx.clone(), store, tcp, peer, role, Some(draining.clone()));
                let stopped = stopped.clone();
                async move {
                    let r = until_stopped(stopped, session).await;
                    drop(counted);
                    r
                }
            })));
        }
    }
    for (implicit_tls, listeners) in [(false, pop3_l), (true, pop3s_l)] {
        for (l, _) in listeners {
            let ctx = ctx.clone();
            let disk_store = disk_store.clone();
            let (stopped, draining, active) = (stopped.clone(), draining.clone(), active.clone());
            tasks.push(tokio::spawn(accept_loop(ctx.clone(), l, crate::Pool::Pop3, move |tcp, peer| {
                let counted = Active::new(&active);
                let store = session_store(&ctx, &disk_store);
                let session = pop3::serve(ctx.clone(), store, tcp, peer, implicit_tls, Some(draining.clone()));
                let stopped = stopped.clone();
                async move {
                    let r = until_stopped(stopped, session).await;
                    drop(counted);
                    r
                }
            })));
        }
    }
    tracing::info!(resource, %ip, ?addresses, "group mail listeners started");
    Ok(MailRunning { addresses, tasks, drain, stop, active, disk_store })
}

/// Runs a session until it ends or the service stops (then the session's
/// future is dropped, which closes its connection).
async fn until_stopped<F>(mut stopped: tokio::sync::watch::Receiver<bool>, session: F) -> std::io::Result<()>
where
    F: std::future::Future<Output = std::io::Result<()>>,
{
    tokio::select! {
        r = session => r,
        // Err: the sender is gone, i.e. the service was dropped: stop too.
        _ = stopped.wait_for(|s| *s) => Ok(()),
    }
}

const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Connects to the first SMTP (else submission, else POP3) listener and
/// expects its greeting (`220` / `+OK`) within 2 s. Implicit-TLS ports are
/// not probed (the accept loops' liveness covers them).
pub(crate) async fn probe(resource: &str, addresses: &MailAddresses) -> Result<(), ResourceError> {
    let (at, expect, quit): (SocketAddr, &[u8], &[u8]) =
        match (addresses.smtp.first(), addresses.submission.first(), addresses.pop3.first()) {
            (Some(a), _, _) | (None, Some(a), _) => (*a, b"220", b"QUIT\r\n"),
            (None, None, Some(a)) => (*a, b"+OK", b"QUIT\r\n"),
            (None, None, None) => return Ok(()),
        };
    let attempt = async {
        let mut tcp = tokio::net::TcpStream::connect(at).await.map_err(|e| format!("cannot connect to {at}: {e}"))?;
        let mut greeting = Vec::new();
        let mut buf = [0u8; 512];
        while !greeting.contains(&b'\n') {
            let n = tcp.read(&mut buf).await.map_err(|e| format!("reading the greeting from {at}: {e}"))?;
            if n == 0 {
                return Err(format!("{at} closed the connection before its greeting"));
            }
            greeting.extend_from_slice(&buf[..n]);
        }
        if !greeting.starts_with(expect) {
            let line = String::from_utf8_lossy(&greeting);
            return Err(format!("{at} greeted with `{}`", line.trim_end()));
        }
        let _ = tcp.write_all(quit).await;
        Ok(())
    };
    match tokio::time::timeout(PROBE_TIMEOUT, attempt).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(message)) => Err(run_error(resource, message)),
        Err(_) => Err(run_error(resource, format!("no greeting from {at} within {} s", PROBE_TIMEOUT.as_secs()))),
    }
}
