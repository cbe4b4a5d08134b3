//! The production [`Transport`]: requests over TCP + TLS 1.3, and the
//! listener that serves them.
//!
//! Wire format: each message is one frame, a u32 big-endian length then a
//! postcard body ([`Request`] from the client, [`Response`] from the
//! server). One request at a time per connection, answered in order, so no
//! request ids. Frames are capped at [`MAX_FRAME_LEN`] (64 MiB: openraft
//! snapshot chunks are far smaller), and at [`MAX_UNAUTHENTICATED_FRAME_LEN`]
//! (64 KiB) for a peer without a certificate, so a stranger cannot make us
//! allocate much; a length over the cap closes the connection before the
//! body is read (the peer misbehaved, or speaks another protocol).
//!
//! Authentication lives here, not only in the handler: a peer without a
//! client certificate may send `Join` and nothing else (anything else is
//! answered `Refused("not authenticated")` and the connection closed), and
//! it gets one answer per connection. An authenticated peer's [`NodeId`] is
//! read from its verified certificate and handed to the handler.
//!
//! The client keeps a few idle connections per target (reused, dropped when
//! stale) so Raft heartbeats don't pay a handshake each, and so a large
//! snapshot chunk does not hold up a heartbeat (concurrent calls use
//! separate connections). A request that failed on a *reused* connection is
//! retried once on a fresh one, except `Write` and `Join`, which are not
//! idempotent: their failure is reported, the outcome being unknown.
//!
//! Timeouts: TCP connect 1 s, TLS handshake 2 s, request 5 s (a dead peer
//! must not hang Raft), all in [`TransportConfig`].
//!
//! What it does not do: reload certificates, multiplex requests, limit the
//! rate of joins (the handler checks the secret; a wrong guess costs the
//! guesser a handshake), or check that an authenticated node is still a
//! member (the handler's business: certificates are not revoked).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ServerConfig};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio::time::timeout;
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::pki::{JoinToken, NodeCredentials};
use crate::rpc::{Handler, JoinError, JoinRequest, JoinResponse, Request, Response, Transport, TransportError};
use crate::tls::{self, TransportSetupError};
use crate::types::{NodeId, NodeInfo};

/// The largest frame a member may send or receive (64 MiB).
pub const MAX_FRAME_LEN: usize = 64 * 1024 * 1024;
/// The largest frame accepted from a peer without a certificate (a
/// `JoinRequest` is a few hundred bytes).
pub const MAX_UNAUTHENTICATED_FRAME_LEN: usize = 64 * 1024;
/// How long [`join`] waits for its answer: the member must allocate an id
/// through the Raft log and sign a certificate, possibly during an election.
pub const JOIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Timeouts and limits of the transport and the listener.
#[derive(Debug, Clone)]
pub struct TransportConfig {
    /// TCP connect (including name resolution).
    pub connect_timeout: Duration,
    /// TLS handshake, on both sides.
    pub handshake_timeout: Duration,
    /// One request: sending it and receiving the whole answer (client); a
    /// request body, once its length arrived (server).
    pub request_timeout: Duration,
    /// The listener closes an authenticated connection idle this long.
    pub idle_timeout: Duration,
    /// The client does not reuse a connection idle longer than this (kept
    /// below `idle_timeout`, so it never sends on one the server is closing).
    pub pool_idle_max: Duration,
    /// Idle connections kept per target.
    pub max_idle_per_target: usize,
    /// See [`MAX_FRAME_LEN`].
    pub max_frame_len: usize,
    /// Connections the listener serves at once; more are closed at once.
    pub max_connections: usize,
}

impl Default for TransportConfig {
    fn default() -> Self {
        TransportConfig {
            connect_timeout: Duration::from_secs(1),
            handshake_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(120),
            pool_idle_max: Duration::from_secs(60),
            // Every concurrent SMTP session may replicate a body at once:
            // a small pool made each one pay a TLS handshake (measured).
            max_idle_per_target: 64,
            max_frame_len: MAX_FRAME_LEN,
            max_connections: 256,
        }
    }
}

/// Why a frame could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The peer closed the connection between frames.
    #[error("connection closed")]
    Closed,
    #[error("frame of {len} bytes exceeds the {max}-byte limit")]
    TooLarge { len: usize, max: usize },
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Reads a frame's length; `Ok(None)` on a clean close before it.
async fn read_frame_len<R: AsyncRead + Unpin>(r: &mut R) -> Result<Option<usize>, FrameError> {
    let mut header = [0u8; 4];
    // The first byte alone, to tell a clean close between frames (normal)
    // from a connection cut in the middle of one (an error).
    if r.read(&mut header[..1]).await? == 0 {
        return Ok(None);
    }
    r.read_exact(&mut header[1..]).await?;
    Ok(Some(u32::from_be_bytes(header) as usize))
}

/// Reads a frame body of `len` bytes. The buffer grows with what actually
/// arrives, so a lying length cannot make us allocate it up front.
async fn read_frame_body<R: AsyncRead + Unpin>(r: &mut R, len: usize) -> Result<Vec<u8>, FrameError> {
    let mut body = Vec::with_capacity(len.min(64 * 1024));
    (&mut *r).take(len as u64).read_to_end(&mut body).await?;
    if body.len() != len {
        return Err(FrameError::Io(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            format!("connection closed after {} of {len} bytes of a frame", body.len()),
        )));
    }
    Ok(body)
}

/// Reads one frame of at most `max` bytes.
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R, max: usize) -> Result<Vec<u8>, FrameError> {
    let len = read_frame_len(r).await?.ok_or(FrameError::Closed)?;
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    read_frame_body(r, len).await
}

/// Frames up to this size are written with their length in one write
/// (larger ones are not copied for it).
const SMALL_FRAME: usize = 64 * 1024;

/// Writes one frame (and flushes it: TLS buffers otherwise).
pub async fn write_frame<W: AsyncWrite + Unpin>(w: &mut W, body: &[u8], max: usize) -> Result<(), FrameError> {
    if body.len() > max {
        return Err(FrameError::TooLarge { len: body.len(), max });
    }
    let len = u32::try_from(body.len()).map_err(|_| FrameError::TooLarge { len: body.len(), max })?;
    if body.len() <= SMALL_FRAME {
        // One write, so one TLS record and one segment: the peer wakes
        // once for the frame, not once for its length and again for it.
        let mut frame = Vec::with_capacity(4 + body.len());
        frame.extend_from_slice(&len.to_be_bytes());
        frame.extend_from_slice(body);
        w.write_all(&frame).await?;
    } else {
        w.write_all(&len.to_be_bytes()).await?;
        w.write_all(body).await?;
    }
    w.flush().await?;
    Ok(())
}

type ClientStream = tokio_rustls::client::TlsStream<TcpStream>;
type ServerStream = tokio_rustls::server::TlsStream<TcpStream>;

enum DialError {
    Connect(String),
    Handshake(String),
}

impl std::fmt::Display for DialError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DialError::Connect(e) => write!(f, "connect: {e}"),
            DialError::Handshake(e) => write!(f, "TLS handshake: {e}"),
        }
    }
}

async fn dial(
    addr: &str,
    client: &Arc<ClientConfig>,
    name: ServerName<'static>,
    config: &TransportConfig,
) -> Result<ClientStream, DialError> {
    let tcp = timeout(config.connect_timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| DialError::Connect(format!("timed out after {:?}", config.connect_timeout)))?
        .map_err(|e| DialError::Connect(e.to_string()))?;
    // Requests are small and latency-bound (heartbeats): no Nagle delay.
    let _ = tcp.set_nodelay(true);
    timeout(config.handshake_timeout, TlsConnector::from(client.clone()).connect(name, tcp))
        .await
        .map_err(|_| DialError::Handshake(format!("timed out after {:?}", config.handshake_timeout)))?
        .map_err(|e| DialError::Handshake(e.to_string()))
}

/// Sends one request frame and reads the answer frame.
async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    body: &[u8],
    max: usize,
) -> Result<Vec<u8>, FrameError> {
    write_frame(stream, body, max).await?;
    read_frame(stream, max).await
}

/// Whether an error is the peer's TLS alert (in TLS 1.3 the client's side
/// of the handshake ends before the server has checked the client's
/// certificate, RFC 8446 §4.4.2, so a refused certificate shows up as an
/// alert on the first read).
fn tls_alert(e: &FrameError) -> Option<String> {
    let FrameError::Io(io) = e else { return None };
    match io.get_ref()?.downcast_ref::<rustls::Error>()? {
        rustls::Error::AlertReceived(alert) => Some(format!("{alert:?}")),
        _ => None,
    }
}

/// Whether a pooled connection can be reused: the socket has nothing to
/// read (an idle server sends nothing, since tickets are off), so EOF, an
/// error, or any byte (a close_notify) means the server closed it.
async fn still_open(stream: &ClientStream) -> bool {
    let (tcp, _) = stream.get_ref();
    let mut byte = [0u8; 1];
    let mut buf = tokio::io::ReadBuf::new(&mut byte);
    // One poll of the peek, without a timer: pending = open and quiet.
    // (`timeout(Duration::ZERO, peek)` did the same but waited for the next
    // tick of tokio's millisecond timer wheel: measured 1.08 ms per call,
    // on every request over a pooled connection — most of a heartbeat's
    // round trip.)
    std::future::poll_fn(|cx| std::task::Poll::Ready(tcp.poll_peek(cx, &mut buf).is_pending())).await
}

struct Idle {
    stream: ClientStream,
    since: Instant,
}

/// The mutual-TLS [`Transport`] of a member node.
pub struct TlsTransport {
    config: TransportConfig,
    client: Arc<ClientConfig>,
    /// Idle connections per (target, address): a node that moved gets new
    /// connections, never the old address's.
    pool: Mutex<HashMap<(NodeId, String), Vec<Idle>>>,
}

impl std::fmt::Debug for TlsTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsTransport").field("config", &self.config).finish()
    }
}

impl TlsTransport {
    /// A transport presenting `creds` and trusting only their CA.
    pub fn new(creds: &NodeCredentials, config: TransportConfig) -> Result<TlsTransport, TransportSetupError> {
        Ok(TlsTransport { config, client: tls::member_client_config(creds)?, pool: Mutex::new(HashMap::new()) })
    }

    fn pool(&self) -> std::sync::MutexGuard<'_, HashMap<(NodeId, String), Vec<Idle>>> {
        // The map stays consistent even if a holder panicked.
        self.pool.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn take_idle(&self, key: &(NodeId, String)) -> Option<ClientStream> {
        loop {
            let idle = self.pool().get_mut(key)?.pop()?;
            if idle.since.elapsed() <= self.config.pool_idle_max && still_open(&idle.stream).await {
                return Some(idle.stream);
            }
        }
    }

    fn put_idle(&self, key: (NodeId, String), stream: ClientStream) {
        let mut pool = self.pool();
        let idle = pool.entry(key).or_default();
        if idle.len() < self.config.max_idle_per_target {
            idle.push(Idle { stream, since: Instant::now() });
        }
    }

    async fn connect(&self, target: NodeId, addr: &str) -> Result<ClientStream, TransportError> {
        let unreachable = |reason: String| TransportError::Unreachable { node: format!("{target} ({addr})"), reason };
        // The server must prove it is node `target`: its certificate must
        // carry `node-<target>.hamail.cluster` (checked by rustls/webpki).
        let name = tls::member_server_name(target).map_err(|e| unreachable(e.to_string()))?;
        let stream = dial(addr, &self.client, name, &self.config).await.map_err(|e| unreachable(e.to_string()))?;
        // Belt and braces: the verified certificate names exactly `target`
        // (and no other node).
        match tls::peer_node_id(stream.get_ref().1.peer_certificates()) {
            Ok(Some(id)) if id == target => Ok(stream),
            Ok(Some(id)) => Err(unreachable(format!("answered by node {id}, not node {target}"))),
            Ok(None) => Err(unreachable("server presented no certificate".into())),
            Err(e) => Err(unreachable(format!("server certificate: {e}"))),
        }
    }
}

#[async_trait::async_trait]
impl Transport for TlsTransport {
    async fn call(&self, target: NodeId, node: &NodeInfo, request: Request) -> Result<Response, TransportError> {
        let who = || format!("{target} ({})", node.addr);
        let failed = |reason: String| TransportError::Failed { node: who(), reason };
        let max = self.config.max_frame_len;
        let body = postcard::to_allocvec(&request).map_err(|e| failed(format!("cannot encode our request: {e}")))?;
        if body.len() > max {
            return Err(failed(format!("our {}-byte request exceeds the {max}-byte frame limit", body.len())));
        }
        let retryable = !matches!(request, Request::Write(_) | Request::Join(_));
        let key = (target, node.addr.clone());
        loop {
            let (mut stream, reused) = match self.take_idle(&key).await {
                Some(stream) => (stream, true),
                None => (self.connect(target, &node.addr).await?, false),
            };
            match timeout(self.config.request_timeout, exchange(&mut stream, &body, max)).await {
                Ok(Ok(answer)) => {
                    let response = postcard::from_bytes(&answer)
                        .map_err(|e| failed(format!("malformed response (peer misbehaved): {e}")))?;
                    self.put_idle(key, stream);
                    return Ok(response);
                }
                Ok(Err(e)) if reused && retryable => {
                    // Most likely the server closed the pooled connection
                    // (restart) just as we used it: one fresh try.
                    tracing::debug!(
                        node = %target,
                        error = %e,
                        "pooled cluster connection failed; retrying on a new one",
                    );
                    continue;
                }
                Ok(Err(e)) => {
                    if let (false, Some(alert)) = (reused, tls_alert(&e)) {
                        // Refused at the handshake: the request was not
                        // processed.
                        return Err(TransportError::Unreachable {
                            node: who(),
                            reason: format!("peer refused our TLS credentials ({alert}): not of this cluster?"),
                        });
                    }
                    let reason = match e {
                        FrameError::TooLarge { .. } => format!("peer misbehaved: {e}"),
                        _ => e.to_string(),
                    };
                    return Err(failed(reason));
                }
                Err(_) => return Err(failed(format!("no answer within {:?}", self.config.request_timeout))),
            }
        }
    }
}

/// Why [`join`] did not get this process into the cluster.
#[derive(Debug, thiserror::Error)]
pub enum JoinCallError {
    /// Our side: the token's fingerprint is malformed.
    #[error(transparent)]
    Setup(#[from] TransportSetupError),
    #[error("cannot reach {addr}: {reason}")]
    Unreachable { addr: String, reason: String },
    /// The server is not a member of the token's cluster (or the token is
    /// wrong or stale: the fingerprint did not match), or not hamail.
    #[error("TLS handshake with {addr} failed: {reason} (wrong token, or not a member of this cluster?)")]
    Handshake { addr: String, reason: String },
    #[error("exchange with {addr} failed: {reason}")]
    Failed { addr: String, reason: String },
    /// The cluster looked at the request and said no.
    #[error("the cluster refused the join: {0}")]
    Rejected(JoinError),
    #[error("{addr} refused the request: {reason}")]
    Refused { addr: String, reason: String },
    #[error("{addr} answered a join with an unrelated response (peer misbehaved)")]
    UnexpectedResponse { addr: String },
}

/// Asks the member in `token` to admit this process, over a TLS channel
/// authenticated by the token's CA fingerprint (the joiner has no
/// certificate yet). Waits [`JOIN_TIMEOUT`] for the answer.
pub async fn join(token: &JoinToken, request: JoinRequest) -> Result<JoinResponse, JoinCallError> {
    let config = TransportConfig { request_timeout: JOIN_TIMEOUT, ..TransportConfig::default() };
    match call_as_joiner(&token.addr, &token.ca_fingerprint, Request::Join(request), &config).await? {
        Response::Join(Ok(response)) => Ok(response),
        Response::Join(Err(e)) => Err(JoinCallError::Rejected(e)),
        Response::Refused(reason) => Err(JoinCallError::Refused { addr: token.addr.clone(), reason }),
        _ => Err(JoinCallError::UnexpectedResponse { addr: token.addr.clone() }),
    }
}

/// One request from a process without a certificate (what [`join`] does):
/// the server is authenticated by the pinned CA fingerprint, we are not,
/// so the listener serves `Join` only. Public for tests and tools.
pub async fn call_as_joiner(
    addr: &str,
    ca_fingerprint: &str,
    request: Request,
    config: &TransportConfig,
) -> Result<Response, JoinCallError> {
    let client = tls::joiner_client_config(ca_fingerprint)?;
    let name = tls::joiner_server_name()?;
    let mut stream = dial(addr, &client, name, config).await.map_err(|e| match e {
        DialError::Connect(reason) => JoinCallError::Unreachable { addr: addr.to_string(), reason },
        DialError::Handshake(reason) => JoinCallError::Handshake { addr: addr.to_string(), reason },
    })?;
    let failed = |reason: String| JoinCallError::Failed { addr: addr.to_string(), reason };
    let body = postcard::to_allocvec(&request).map_err(|e| failed(format!("cannot encode our request: {e}")))?;
    let answer = timeout(config.request_timeout, exchange(&mut stream, &body, config.max_frame_len))
        .await
        .map_err(|_| failed(format!("no answer within {:?}", config.request_timeout)))?
        .map_err(|e| failed(e.to_string()))?;
    let _ = stream.shutdown().await;
    postcard::from_bytes(&answer).map_err(|e| failed(format!("malformed response (peer misbehaved): {e}")))
}

/// Serves cluster requests on `listener` with [`TransportConfig::default`].
pub fn serve(listener: TcpListener, server_config: Arc<ServerConfig>, handler: Arc<dyn Handler>) -> JoinHandle<()> {
    serve_with(listener, server_config, handler, TransportConfig::default())
}

/// Serves cluster requests on `listener` until the returned task is
/// aborted: one task per connection, at most `config.max_connections` at
/// once. Aborting the task closes the listener *and* every connection it
/// accepted (they live in the task's `JoinSet`), so a stopped node stops
/// answering at once, also on connections peers had pooled.
pub fn serve_with(
    listener: TcpListener,
    server_config: Arc<ServerConfig>,
    handler: Arc<dyn Handler>,
    config: TransportConfig,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let acceptor = TlsAcceptor::from(server_config);
        let slots = Arc::new(Semaphore::new(config.max_connections));
        let config = Arc::new(config);
        let mut connections = tokio::task::JoinSet::new();
        loop {
            // Reap finished connection tasks (a panicking handler ends only
            // its own connection).
            while connections.try_join_next().is_some() {}
            let (tcp, peer_addr) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors and the like: back off rather
                    // than spin, and keep serving.
                    tracing::warn!(error = %e, "cluster listener: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                tracing::warn!(
                    peer = %peer_addr,
                    limit = config.max_connections,
                    "too many cluster connections: refused",
                );
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let (acceptor, handler, config) = (acceptor.clone(), handler.clone(), config.clone());
            connections.spawn(async move {
                let _slot = slot;
                serve_connection(tcp, peer_addr, acceptor, handler, &config).await;
            });
        }
    })
}

fn request_kind(request: &Request) -> &'static str {
    match request {
        Request::AppendEntries(_) => "AppendEntries",
        Request::Vote(_) => "Vote",
        Request::InstallSnapshot(_) => "InstallSnapshot",
        Request::PreVote(_) => "PreVote",
        Request::Write(_) => "Write",
        Request::Join(_) => "Join",
        Request::Status => "Status",
        Request::ReadIndex => "ReadIndex",
        Request::RenewLease => "RenewLease",
        Request::Testimony { .. } => "Testimony",
        Request::PutBody { .. } => "PutBody",
        Request::GetBody(_) => "GetBody",
        Request::Verify => "Verify",
        Request::LeaseVouch => "LeaseVouch",
    }
}

async fn serve_connection(
    tcp: TcpStream,
    peer_addr: SocketAddr,
    acceptor: TlsAcceptor,
    handler: Arc<dyn Handler>,
    config: &TransportConfig,
) {
    let mut stream = match timeout(config.handshake_timeout, acceptor.accept(tcp)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => {
            // Not TLS, a certificate from another CA, a wrong protocol...
            tracing::warn!(peer = %peer_addr, error = %e, "cluster TLS handshake failed: connection refused");
            return;
        }
        Err(_) => {
            tracing::warn!(peer = %peer_addr, "cluster TLS handshake timed out: connection refused");
            return;
        }
    };
    // rustls has verified the chain to our CA if a certificate was sent.
    let from = match tls::peer_node_id(stream.get_ref().1.peer_certificates()) {
        Ok(from) => from,
        Err(e) => {
            tracing::warn!(
                peer = %peer_addr,
                error = %e,
                "cluster peer's certificate names no node: connection refused",
            );
            return;
        }
    };
    let max_in =
        if from.is_some() { config.max_frame_len } else { MAX_UNAUTHENTICATED_FRAME_LEN.min(config.max_frame_len) };
    // A stranger gets a short wait; a member may keep an idle connection.
    let wait = if from.is_some() { config.idle_timeout } else { config.handshake_timeout + config.request_timeout };
    loop {
        let len = match timeout(wait, read_frame_len(&mut stream)).await {
            Ok(Ok(Some(len))) => len,
            Ok(Ok(None)) => return,
            Ok(Err(e)) => {
                tracing::debug!(peer = %peer_addr, node = ?from, error = %e, "cluster connection broken");
                return;
            }
            Err(_) => {
                tracing::debug!(peer = %peer_addr, node = ?from, "idle cluster connection closed");
                let _ = stream.shutdown().await;
                return;
            }
        };
        if len > max_in {
            tracing::warn!(
                peer = %peer_addr,
                node = ?from,
                len,
                max = max_in,
                "cluster peer sent an oversized frame: connection closed",
            );
            let _ = stream.shutdown().await;
            return;
        }
        let body = match timeout(config.request_timeout, read_frame_body(&mut stream, len)).await {
            Ok(Ok(body)) => body,
            Ok(Err(e)) => {
                tracing::warn!(peer = %peer_addr, node = ?from, error = %e, "cluster request cut short");
                return;
            }
            Err(_) => {
                tracing::warn!(
                    peer = %peer_addr,
                    node = ?from,
                    "cluster request body not received in time: connection closed",
                );
                return;
            }
        };
        let request: Request = match postcard::from_bytes(&body) {
            Ok(request) => request,
            Err(e) => {
                tracing::warn!(
                    peer = %peer_addr,
                    node = ?from,
                    error = %e,
                    "malformed cluster request (peer misbehaved): connection closed",
                );
                return;
            }
        };
        if from.is_none() && !matches!(request, Request::Join(_)) {
            tracing::warn!(
                peer = %peer_addr,
                request = request_kind(&request),
                "unauthenticated cluster peer sent a member-only request: refused",
            );
            let _ = send_response(&mut stream, &Response::Refused("not authenticated".into()), config).await;
            let _ = stream.shutdown().await;
            return;
        }
        let response = handler.handle(from, request).await;
        if let Err(e) = send_response(&mut stream, &response, config).await {
            tracing::debug!(peer = %peer_addr, node = ?from, error = %e, "cluster response not delivered");
            return;
        }
        if from.is_none() {
            // A joiner gets one answer per connection.
            let _ = stream.shutdown().await;
            return;
        }
    }
}

async fn send_response(
    stream: &mut ServerStream,
    response: &Response,
    config: &TransportConfig,
) -> Result<(), FrameError> {
    let body = match postcard::to_allocvec(response) {
        Ok(body) if body.len() <= config.max_frame_len => body,
        // Our handler's fault, not the peer's: tell it so rather than
        // leaving it to time out.
        Ok(body) => {
            tracing::error!(len = body.len(), "cluster response exceeds the frame limit: refused instead");
            postcard::to_allocvec(&Response::Refused("response too large".into())).unwrap_or_default()
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot encode cluster response: refused instead");
            postcard::to_allocvec(&Response::Refused("internal error encoding the response".into())).unwrap_or_default()
        }
    };
    match timeout(config.request_timeout, write_frame(stream, &body, config.max_frame_len)).await {
        Ok(result) => result,
        Err(_) => Err(FrameError::Io(std::io::Error::new(std::io::ErrorKind::TimedOut, "response not sent in time"))),
    }
}
