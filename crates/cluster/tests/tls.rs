//! The TLS channel between nodes, over loopback: who may talk to whom, what
//! a stranger may ask, what the listener survives.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hamail_cluster::pki::{
    generate_secret, secret_hash, secret_matches, ClusterCa, JoinToken, NodeCredentials, TokenError,
};
use hamail_cluster::rpc::{
    Handler, JoinError, JoinRequest, JoinResponse, NodeStatus, Request, Response, Transport, TransportError,
};
use hamail_cluster::tcp::{
    call_as_joiner, join, read_frame, serve_with, write_frame, FrameError, JoinCallError, TlsTransport,
    TransportConfig, MAX_FRAME_LEN,
};
use hamail_cluster::{tls, Command, NodeId, NodeInfo, Role};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Answers `Status` with its own id and, in `state`, who asked; `Join`
/// with fresh credentials when the secret is right. Counts what it served.
struct FakeNode {
    id: NodeId,
    ca: ClusterCa,
    secret_hash: String,
    served: AtomicUsize,
}

#[async_trait::async_trait]
impl Handler for FakeNode {
    async fn handle(&self, from: Option<NodeId>, request: Request) -> Response {
        self.served.fetch_add(1, Ordering::SeqCst);
        match request {
            Request::Status => {
                Response::Status(NodeStatus { id: self.id, state: format!("from={from:?}"), ..NodeStatus::default() })
            }
            Request::Join(join) => {
                if !secret_matches(&join.secret, &self.secret_hash) {
                    return Response::Join(Err(JoinError::WrongSecret));
                }
                let creds = match self.ca.issue_node_cert(NodeId(99), &join.name) {
                    Ok(creds) => creds,
                    Err(e) => return Response::Join(Err(JoinError::Failed(e.to_string()))),
                };
                Response::Join(Ok(JoinResponse {
                    node_id: NodeId(99),
                    cert_pem: creds.cert_pem,
                    key_pem: creds.key_pem,
                    ca_pem: creds.ca_pem,
                    members: vec![],
                }))
            }
            other => Response::Refused(format!("fake node does not serve {other:?}")),
        }
    }
}

fn test_config() -> TransportConfig {
    TransportConfig {
        handshake_timeout: Duration::from_millis(1500),
        request_timeout: Duration::from_secs(5),
        ..TransportConfig::default()
    }
}

struct Running {
    addr: String,
    handler: Arc<FakeNode>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn start(ca: &ClusterCa, creds: &NodeCredentials, secret: &str) -> Running {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind loopback");
    let addr = listener.local_addr().expect("local addr").to_string();
    let handler = Arc::new(FakeNode {
        id: creds.node_id().expect("node id"),
        ca: ca.clone(),
        secret_hash: secret_hash(secret),
        served: AtomicUsize::new(0),
    });
    let config = tls::server_config(creds).expect("server config");
    let task = serve_with(listener, config, handler.clone(), test_config());
    Running { addr, handler, task }
}

fn info(addr: &str) -> NodeInfo {
    NodeInfo { addr: addr.to_string(), role: Role::Data, name: "test".into() }
}

fn status_of(response: Response) -> NodeStatus {
    match response {
        Response::Status(status) => status,
        other => panic!("expected a status, got {other:?}"),
    }
}

fn join_request(secret: &str) -> JoinRequest {
    JoinRequest { secret: secret.to_string(), addr: "127.0.0.1:1".into(), role: Role::Data, name: "newbie".into() }
}

#[tokio::test]
async fn members_exchange_status_and_see_each_others_ids() {
    let ca = ClusterCa::generate("test").expect("CA");
    let one = ca.issue_node_cert(NodeId(1), "one").expect("cert 1");
    let two = ca.issue_node_cert(NodeId(2), "two").expect("cert 2");
    assert_eq!(one.node_id().expect("id"), NodeId(1));
    let node_one = start(&ca, &one, "s").await;
    let node_two = start(&ca, &two, "s").await;

    let from_one = TlsTransport::new(&one, test_config()).expect("transport 1");
    let from_two = TlsTransport::new(&two, test_config()).expect("transport 2");

    let status = status_of(from_one.call(NodeId(2), &info(&node_two.addr), Request::Status).await.expect("1 -> 2"));
    assert_eq!(status.id, NodeId(2));
    assert_eq!(status.state, "from=Some(NodeId(1))");

    let status = status_of(from_two.call(NodeId(1), &info(&node_one.addr), Request::Status).await.expect("2 -> 1"));
    assert_eq!(status.id, NodeId(1));
    assert_eq!(status.state, "from=Some(NodeId(2))");

    // Again, on the pooled connection.
    for _ in 0..3 {
        let status =
            status_of(from_one.call(NodeId(2), &info(&node_two.addr), Request::Status).await.expect("1 -> 2 again"));
        assert_eq!(status.id, NodeId(2));
    }
}

#[tokio::test]
async fn pooled_connection_survives_a_server_restart() {
    let ca = ClusterCa::generate("test").expect("CA");
    let one = ca.issue_node_cert(NodeId(1), "one").expect("cert 1");
    let two = ca.issue_node_cert(NodeId(2), "two").expect("cert 2");
    let node_two = start(&ca, &two, "s").await;
    let addr = node_two.addr.clone();
    let transport = TlsTransport::new(&one, test_config()).expect("transport");
    status_of(transport.call(NodeId(2), &info(&addr), Request::Status).await.expect("first call"));

    // Restart node 2 on the same port: the pooled connection is dead.
    drop(node_two);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let listener = TcpListener::bind(&addr).await.expect("rebind");
    let handler = Arc::new(FakeNode {
        id: NodeId(2),
        ca: ca.clone(),
        secret_hash: secret_hash("s"),
        served: AtomicUsize::new(0),
    });
    let task = serve_with(listener, tls::server_config(&two).expect("config"), handler.clone(), test_config());
    tokio::time::sleep(Duration::from_millis(100)).await;

    // Even a non-idempotent Write (never retried) goes out on a fresh
    // connection: the stale one is noticed before use.
    let response = transport.call(NodeId(2), &info(&addr), Request::Write(Command::AllocateNodeId)).await;
    assert!(matches!(response, Ok(Response::Refused(_))), "{response:?}");
    assert_eq!(handler.served.load(Ordering::SeqCst), 1, "the restarted node served the write");
    status_of(transport.call(NodeId(2), &info(&addr), Request::Status).await.expect("after restart"));
    task.abort();
}

#[tokio::test]
async fn the_server_must_be_the_node_dialled() {
    let ca = ClusterCa::generate("test").expect("CA");
    let one = ca.issue_node_cert(NodeId(1), "one").expect("cert 1");
    let two = ca.issue_node_cert(NodeId(2), "two").expect("cert 2");
    let node_two = start(&ca, &two, "s").await;
    let transport = TlsTransport::new(&one, test_config()).expect("transport");
    // Node 3 is believed to be at node 2's address: node 2's certificate
    // does not name node 3, so the handshake fails.
    let result = transport.call(NodeId(3), &info(&node_two.addr), Request::Status).await;
    assert!(matches!(result, Err(TransportError::Unreachable { .. })), "{result:?}");
    assert_eq!(node_two.handler.served.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn a_node_of_another_cluster_is_refused() {
    let ca = ClusterCa::generate("test").expect("CA");
    let other_ca = ClusterCa::generate("other").expect("other CA");
    let one = ca.issue_node_cert(NodeId(1), "one").expect("cert 1");
    // Same id, wrong CA.
    let intruder = other_ca.issue_node_cert(NodeId(2), "intruder").expect("intruder cert");
    let node_one = start(&ca, &one, "s").await;
    let node_intruder = start(&other_ca, &intruder, "s").await;

    // The intruder dials a member: our server refuses its certificate.
    let from_intruder = TlsTransport::new(&intruder, test_config()).expect("transport");
    let result = from_intruder.call(NodeId(1), &info(&node_one.addr), Request::Status).await;
    assert!(result.is_err(), "a node of another cluster was served: {result:?}");
    assert_eq!(node_one.handler.served.load(Ordering::SeqCst), 0);

    // Even one that trusts our CA (its certificate is no secret): the
    // server checks the client's certificate, and refuses it.
    let forger = NodeCredentials { ca_pem: ca.cert_pem().to_string(), ..intruder.clone() };
    let from_forger = TlsTransport::new(&forger, test_config()).expect("transport");
    let result = from_forger.call(NodeId(1), &info(&node_one.addr), Request::Status).await;
    match result {
        Err(TransportError::Unreachable { reason, .. }) => {
            assert!(reason.contains("refused our TLS credentials"), "{reason}")
        }
        other => panic!("a certificate of another CA was served: {other:?}"),
    }
    assert_eq!(node_one.handler.served.load(Ordering::SeqCst), 0);

    // A member dials the intruder: our client refuses its certificate.
    let from_one = TlsTransport::new(&one, test_config()).expect("transport");
    let result = from_one.call(NodeId(2), &info(&node_intruder.addr), Request::Status).await;
    assert!(matches!(result, Err(TransportError::Unreachable { .. })), "{result:?}");
    assert_eq!(node_intruder.handler.served.load(Ordering::SeqCst), 0);

    // And the member listener still serves its own.
    let two = ca.issue_node_cert(NodeId(2), "two").expect("cert 2");
    let from_two = TlsTransport::new(&two, test_config()).expect("transport");
    status_of(from_two.call(NodeId(1), &info(&node_one.addr), Request::Status).await.expect("member still served"));
}

#[tokio::test]
async fn a_client_without_certificate_may_only_join() {
    let ca = ClusterCa::generate("test").expect("CA");
    let one = ca.issue_node_cert(NodeId(1), "one").expect("cert 1");
    let secret = generate_secret();
    let node = start(&ca, &one, &secret).await;
    let fingerprint = ca.fingerprint();
    let config = test_config();

    let vote = openraft::Vote::new(1, NodeId(1));
    let forbidden = vec![
        Request::Status,
        Request::Write(Command::AllocateNodeId),
        Request::AppendEntries(openraft::raft::AppendEntriesRequest {
            vote,
            prev_log_id: None,
            entries: vec![],
            leader_commit: None,
        }),
        Request::Vote(openraft::raft::VoteRequest { vote, last_log_id: None }),
    ];
    for request in forbidden {
        let response = call_as_joiner(&node.addr, &fingerprint, request, &config).await.expect("answered");
        match response {
            Response::Refused(reason) => assert_eq!(reason, "not authenticated"),
            other => panic!("unauthenticated request served: {other:?}"),
        }
    }
    // The transport refused them: the handler never saw them.
    assert_eq!(node.handler.served.load(Ordering::SeqCst), 0);

    // Join is served, through the token.
    let token = JoinToken { addr: node.addr.clone(), ca_fingerprint: fingerprint.clone(), secret: secret.clone() };
    let token = JoinToken::decode(&token.encode()).expect("round trip");
    let response = join(&token, join_request(&secret)).await.expect("joined");
    assert_eq!(response.node_id, NodeId(99));
    let creds = NodeCredentials::from(&response);
    assert_eq!(creds.node_id().expect("id"), NodeId(99));

    // A wrong secret reaches the handler, which says no.
    let result = join(&token, join_request("not the secret")).await;
    assert!(matches!(result, Err(JoinCallError::Rejected(JoinError::WrongSecret))), "{result:?}");

    // The new member's credentials work.
    let transport = TlsTransport::new(&creds, test_config()).expect("transport");
    let status = status_of(transport.call(NodeId(1), &info(&node.addr), Request::Status).await.expect("member call"));
    assert_eq!(status.state, "from=Some(NodeId(99))");
}

#[tokio::test]
async fn a_joiner_with_a_wrong_fingerprint_does_not_connect() {
    let ca = ClusterCa::generate("test").expect("CA");
    let other_ca = ClusterCa::generate("other").expect("other CA");
    let one = ca.issue_node_cert(NodeId(1), "one").expect("cert 1");
    let secret = generate_secret();
    let node = start(&ca, &one, &secret).await;

    let token = JoinToken { addr: node.addr.clone(), ca_fingerprint: other_ca.fingerprint(), secret: secret.clone() };
    let result = join(&token, join_request(&secret)).await;
    assert!(matches!(result, Err(JoinCallError::Handshake { .. })), "{result:?}");
    // The fingerprint of the node certificate (not a CA) is no better.
    let der = rustls_pemfile::certs(&mut one.cert_pem.as_bytes()).next().expect("pem").expect("cert");
    let token = JoinToken {
        addr: node.addr.clone(),
        ca_fingerprint: hamail_cluster::pki::cert_fingerprint(der.as_ref()),
        secret: secret.clone(),
    };
    let result = join(&token, join_request(&secret)).await;
    assert!(matches!(result, Err(JoinCallError::Handshake { .. })), "{result:?}");
    assert_eq!(node.handler.served.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn garbage_clients_do_not_take_the_listener_down() {
    let ca = ClusterCa::generate("test").expect("CA");
    let one = ca.issue_node_cert(NodeId(1), "one").expect("cert 1");
    let two = ca.issue_node_cert(NodeId(2), "two").expect("cert 2");
    let node = start(&ca, &one, "s").await;

    // Plain text instead of TLS.
    let mut plain = TcpStream::connect(&node.addr).await.expect("connect");
    plain.write_all(b"EHLO garbage\r\n\x00\x01\x02\xff\xff\xff\xff").await.expect("write");
    let mut sink = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), plain.read_to_end(&mut sink)).await;
    assert!(read.is_ok(), "the listener kept a non-TLS connection open");

    // A client that connects and says nothing (closed after the handshake
    // timeout), and one that hangs up at once.
    let _silent = TcpStream::connect(&node.addr).await.expect("connect");
    drop(TcpStream::connect(&node.addr).await.expect("connect"));

    let transport = TlsTransport::new(&two, test_config()).expect("transport");
    status_of(transport.call(NodeId(1), &info(&node.addr), Request::Status).await.expect("still serving"));
}

#[tokio::test]
async fn oversized_frames_are_refused() {
    // The framing itself.
    let (mut a, mut b) = tokio::io::duplex(1024);
    a.write_all(&((MAX_FRAME_LEN as u32) + 1).to_be_bytes()).await.expect("write header");
    let result = read_frame(&mut b, MAX_FRAME_LEN).await;
    assert!(matches!(result, Err(FrameError::TooLarge { .. })), "{result:?}");
    let result = write_frame(&mut a, &[0u8; 100], 10).await;
    assert!(matches!(result, Err(FrameError::TooLarge { len: 100, max: 10 })), "{result:?}");
    let (mut a, mut b) = tokio::io::duplex(1024);
    write_frame(&mut a, b"hello", 10).await.expect("write");
    assert_eq!(read_frame(&mut b, 10).await.expect("read"), b"hello");
    drop(a);
    assert!(matches!(read_frame(&mut b, 10).await, Err(FrameError::Closed)));

    // The listener closes a member's connection that announces a frame
    // over 64 MiB, without reading it.
    let ca = ClusterCa::generate("test").expect("CA");
    let one = ca.issue_node_cert(NodeId(1), "one").expect("cert 1");
    let two = ca.issue_node_cert(NodeId(2), "two").expect("cert 2");
    let node = start(&ca, &one, "s").await;
    let connector = tokio_rustls::TlsConnector::from(tls::member_client_config(&two).expect("client config"));
    let tcp = TcpStream::connect(&node.addr).await.expect("connect");
    let mut stream =
        connector.connect(tls::member_server_name(NodeId(1)).expect("name"), tcp).await.expect("handshake");
    stream.write_all(&((MAX_FRAME_LEN as u32) + 1).to_be_bytes()).await.expect("write header");
    stream.flush().await.expect("flush");
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut buf)).await;
    assert!(read.is_ok(), "connection not closed");
    assert!(buf.is_empty(), "got an answer to an oversized frame");
    assert_eq!(node.handler.served.load(Ordering::SeqCst), 0);

    // A stranger's limit is much lower (a Join is small).
    let joiner = tokio_rustls::TlsConnector::from(tls::joiner_client_config(&ca.fingerprint()).expect("config"));
    let tcp = TcpStream::connect(&node.addr).await.expect("connect");
    let mut stream = joiner.connect(tls::joiner_server_name().expect("name"), tcp).await.expect("handshake");
    stream.write_all(&(1_000_000u32).to_be_bytes()).await.expect("write header");
    stream.flush().await.expect("flush");
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut buf)).await;
    assert!(read.is_ok(), "connection not closed");
    assert!(buf.is_empty());

    // And the listener still serves.
    let transport = TlsTransport::new(&two, test_config()).expect("transport");
    status_of(transport.call(NodeId(1), &info(&node.addr), Request::Status).await.expect("still serving"));
}

#[test]
fn join_tokens_round_trip_and_malformed_ones_say_why() {
    let token = JoinToken { addr: "10.0.0.1:7400".into(), ca_fingerprint: "ab".repeat(32), secret: generate_secret() };
    let encoded = token.encode();
    assert!(encoded.starts_with("hamail1-"), "{encoded}");
    assert!(!encoded.contains(char::is_whitespace));
    assert_eq!(JoinToken::decode(&encoded).expect("decode"), token);
    assert_eq!(JoinToken::decode(&format!("  {encoded}\n")).expect("decode padded"), token);
    // The secret never shows in Debug.
    assert!(!format!("{token:?}").contains(&token.secret));

    assert_eq!(JoinToken::decode("hamail2-abc"), Err(TokenError::BadPrefix));
    assert_eq!(JoinToken::decode(""), Err(TokenError::BadPrefix));
    assert_eq!(JoinToken::decode("hamail1-not base64!"), Err(TokenError::BadBase64));
    // Cut on a base64 quantum boundary: decodes, but the content is short.
    assert_eq!(JoinToken::decode(&encoded[..encoded.len() - 12]), Err(TokenError::BadContent));
    assert_eq!(JoinToken::decode("hamail1-AAAA"), Err(TokenError::Invalid("bad member address")));
    let bad_fingerprint = JoinToken { ca_fingerprint: "xyz".into(), ..token.clone() }.encode();
    assert!(matches!(JoinToken::decode(&bad_fingerprint), Err(TokenError::Invalid(_))));
    let message = JoinToken::decode("hamail1-!!!").unwrap_err().to_string();
    assert!(message.contains("malformed join token"), "{message}");
}

#[test]
fn secrets_match_by_hash() {
    let secret = generate_secret();
    assert_eq!(secret.len(), 64);
    assert_ne!(secret, generate_secret());
    let hash = secret_hash(&secret);
    assert!(secret_matches(&secret, &hash));
    assert!(!secret_matches("guess", &hash));
    assert!(!secret_matches(&secret, "not hex"));
    assert!(!secret_matches(&secret, "abcd"));
}

#[tokio::test]
async fn credentials_and_ca_survive_a_save_and_load() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = ClusterCa::generate("prod").expect("CA");
    let creds = ca.issue_node_cert(NodeId(1), "mx1.example.com").expect("cert");
    creds.save(dir.path()).expect("save creds");
    assert!(ClusterCa::load(dir.path()).expect("load CA").is_none(), "no ca.key yet");
    ca.save(dir.path()).expect("save CA");

    let loaded = NodeCredentials::load(dir.path()).expect("load creds");
    assert_eq!(loaded, creds);
    assert_eq!(loaded.node_id().expect("id"), NodeId(1));
    assert_eq!(loaded.ca_fingerprint().expect("fp"), ca.fingerprint());
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        for file in ["node.key", "ca.key"] {
            let mode = std::fs::metadata(dir.path().join(file)).expect("stat").permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "{file}");
        }
    }

    // A CA loaded from disk issues certificates that chain to the
    // original: a node certified by it talks to a node certified before.
    let loaded_ca = ClusterCa::load(dir.path()).expect("load CA").expect("has CA");
    assert_eq!(loaded_ca.fingerprint(), ca.fingerprint());
    assert_eq!(loaded_ca.cluster_name(), "prod");
    let two = loaded_ca.issue_node_cert(NodeId(2), "mx2").expect("cert 2");
    let node_one = start(&ca, &loaded, "s").await;
    let transport = TlsTransport::new(&two, test_config()).expect("transport");
    let status = status_of(transport.call(NodeId(1), &info(&node_one.addr), Request::Status).await.expect("call"));
    assert_eq!(status.state, "from=Some(NodeId(2))");

    // A key that is not the CA's is refused.
    let other = ClusterCa::generate("prod").expect("other CA");
    let result = ClusterCa::from_pem(ca.cert_pem(), other.key_pem());
    assert!(result.is_err(), "mismatched CA key accepted");
    // A node certificate is not a CA.
    assert!(ClusterCa::from_pem(&creds.cert_pem, &creds.key_pem).is_err());
    // Loading from an empty directory names the missing file.
    let empty = tempfile::tempdir().expect("tempdir");
    let message = NodeCredentials::load(empty.path()).unwrap_err().to_string();
    assert!(message.contains("node.crt"), "{message}");
}

/// Never answers: a node stuck (or partitioned after accepting).
struct Stuck;

#[async_trait::async_trait]
impl Handler for Stuck {
    async fn handle(&self, _from: Option<NodeId>, _request: Request) -> Response {
        std::future::pending().await
    }
}

#[tokio::test]
async fn a_stuck_node_does_not_hang_the_caller() {
    let ca = ClusterCa::generate("test").expect("CA");
    let one = ca.issue_node_cert(NodeId(1), "one").expect("cert 1");
    let two = ca.issue_node_cert(NodeId(2), "two").expect("cert 2");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    let task = serve_with(listener, tls::server_config(&one).expect("config"), Arc::new(Stuck), test_config());

    let config = TransportConfig { request_timeout: Duration::from_millis(300), ..test_config() };
    let transport = TlsTransport::new(&two, config).expect("transport");
    let started = std::time::Instant::now();
    let result = transport.call(NodeId(1), &info(&addr), Request::Status).await;
    assert!(matches!(result, Err(TransportError::Failed { .. })), "{result:?}");
    assert!(started.elapsed() < Duration::from_secs(3), "took {:?}", started.elapsed());

    // Nobody listening: unreachable, promptly.
    task.abort();
    let closed = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let closed_addr = closed.local_addr().expect("addr").to_string();
    drop(closed);
    let result = transport.call(NodeId(1), &info(&closed_addr), Request::Status).await;
    assert!(matches!(result, Err(TransportError::Unreachable { .. })), "{result:?}");
}
