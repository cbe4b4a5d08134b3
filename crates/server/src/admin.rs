//! The admin API: JSON requests on a local Unix socket, so that
//! `hamail domain|user|alias|queue|status` work while the server runs.
//!
//! Authentication is the socket itself: it is created mode 0600 in the data
//! directory, and every connection's peer credentials (SO_PEERCRED) must be
//! root or the server's own user; anyone else is refused and logged. The same
//! [`execute`] also runs in-process when the server is not running (the CLI
//! then opens the store itself), so both paths behave identically.
//!
//! Wire format: one JSON [`Request`] per line, one JSON [`Response`] per line.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use hamail_store::{Address, Directory, Domain, MailStore, QueueId, QueueItem, QueueOp, RecipientStatus, StoreError};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixListener;

use crate::limits::BanTarget;
use crate::{Context, ServerError};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    DomainAdd {
        domain: String,
    },
    DomainDel {
        domain: String,
    },
    DomainList,
    UserAdd {
        user: String,
        password: String,
    },
    UserPasswd {
        user: String,
        password: String,
    },
    UserDel {
        user: String,
    },
    UserList,
    /// Adds (or with `update` changes the password of) these users in one
    /// directory write; see [`crate::import::import_users`].
    UserImport {
        users: Vec<crate::import::ImportedUser>,
        #[serde(default)]
        update: bool,
        #[serde(default)]
        create_domains: bool,
    },
    /// Delivers one message into the maildrop of `user`: the request line
    /// is followed by exactly `size` octets, the message as it was (see
    /// [`crate::import::MessageBody`]). `return_path` is the envelope
    /// sender to record when the message has no `Return-Path:` line. The
    /// answer's `status` is `imported` or `duplicate`. Several may be sent
    /// before reading the answers (they come in order).
    MailImport {
        user: String,
        #[serde(default)]
        return_path: Option<String>,
        size: u64,
    },
    AliasAdd {
        alias: String,
        targets: Vec<String>,
    },
    AliasDel {
        alias: String,
    },
    AliasList,
    QueueList,
    /// One entry, its state and the message.
    QueueShow {
        id: String,
    },
    /// `flush`, `hold`, `release`, `delete` or `bounce` these entries
    /// (queue ids, or `ALL`).
    Queue {
        command: String,
        ids: Vec<String>,
    },
    Status,
    ClusterInit,
    ClusterJoin {
        token: String,
    },
    ClusterStatus,
    ClusterRemove {
        node: u64,
    },
    StoreVerify,
    /// Adds or replaces failover groups (parsed from a file by the CLI).
    GroupApply {
        groups: Vec<hamail_cluster::groups::GroupSpec>,
    },
    /// `del`, `start`, `stop` or `move` (with an optional destination).
    Group {
        command: String,
        name: String,
        node: Option<u64>,
    },
    GroupStatus,
    NodeStop {
        node: Option<u64>,
    },
    LogShow {
        limit: usize,
    },
    LogWrite {
        text: String,
    },
    /// The login bans in force on this node.
    BanList,
    /// Lifts the ban on a client address or an account.
    BanDel {
        target: String,
    },
}

/// The pattern of the cluster requests: the one list of them, for
/// [`Request::is_cluster`] and for the arm of `run` that turns them away
/// (which keeps that match exhaustive).
macro_rules! cluster_request {
    () => {
        Request::ClusterInit
            | Request::ClusterJoin { .. }
            | Request::ClusterStatus
            | Request::ClusterRemove { .. }
            | Request::StoreVerify
            | Request::GroupApply { .. }
            | Request::Group { .. }
            | Request::GroupStatus
            | Request::NodeStop { .. }
            | Request::LogShow { .. }
            | Request::LogWrite { .. }
    };
}

impl Request {
    /// Cluster requests need the running server.
    fn is_cluster(&self) -> bool {
        matches!(self, cluster_request!())
    }

    /// Whether only a running server can answer (cluster requests, bans):
    /// without one, the CLI says so rather than opening a store.
    pub fn needs_server(&self) -> bool {
        self.is_cluster() || matches!(self, Request::BanList | Request::BanDel { .. })
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    /// On failure: "temporary", "permanent", "unavailable", "internal", "io".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_kind: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default)]
    pub data: Value,
}

impl Response {
    pub(crate) fn ok(data: Value) -> Self {
        Response { ok: true, error_kind: None, error: None, data }
    }
    pub(crate) fn err(e: StoreError) -> Self {
        let kind = match &e {
            StoreError::Temporary(_) => "temporary",
            StoreError::Busy(_) => "temporary",
            StoreError::Permanent(_) => "permanent",
            StoreError::Unavailable(_) => "unavailable",
            StoreError::Internal(_) => "internal",
            StoreError::Io { .. } => "io",
        };
        Response { ok: false, error_kind: Some(kind.into()), error: Some(e.to_string()), data: Value::Null }
    }
    pub fn bad_request(message: String) -> Self {
        Response { ok: false, error_kind: Some("permanent".into()), error: Some(message), data: Value::Null }
    }
}

/// Runs one admin request against a store and a directory. `status` is the
/// running server's counters, when there is a running server.
pub async fn execute(
    store: &dyn MailStore,
    directory: &dyn Directory,
    status: Option<&Context>,
    request: Request,
) -> Response {
    if request.is_cluster() {
        return Response::bad_request("cluster commands need the running server: start `hamail serve` first".into());
    }
    match run(store, directory, status, request).await {
        Ok(v) => Response::ok(v),
        Err(e) => Response::err(e),
    }
}

/// Cluster requests, on the running server.
async fn execute_cluster(ctx: &Arc<Context>, request: Request) -> Response {
    let result: Result<Value, ServerError> = match request {
        Request::ClusterInit => crate::cluster::init(ctx, &ctx.local).await.map(|token| json!({ "token": token })),
        Request::ClusterJoin { token } => {
            crate::cluster::join(ctx, &ctx.local, &token).await.map(|id| json!({ "node_id": id.0 }))
        }
        Request::ClusterStatus => crate::cluster::status(ctx).await.map(|r| json!(r)),
        Request::ClusterRemove { node } => {
            crate::cluster::remove(ctx, hamail_cluster::NodeId(node)).await.map(|()| Value::Null)
        }
        Request::GroupApply { groups } => {
            let n = groups.len();
            crate::cluster::put_groups(ctx, groups).await.map(|()| json!({ "groups": n }))
        }
        Request::Group { command, name, node } => {
            crate::cluster::group_command(ctx, &command, &name, node).await.map(|msg| json!({ "message": msg }))
        }
        Request::GroupStatus => crate::cluster::groups_status(ctx).await.map(|groups| {
            let node = ctx.cluster.node();
            let silent = |owner: Option<hamail_cluster::NodeId>| {
                owner.is_some_and(|o| node.as_ref().is_some_and(|n| o != n.id() && n.peer_silent(o)))
            };
            json!(groups
                .iter()
                .map(|g| {
                    let mut v = json!(g);
                    // The placement changes only when the leader gives the
                    // group away (after the owner's fencing delay); the
                    // owner's silence shows before.
                    v["owner_silent"] = json!(silent(g.placement.owner));
                    v
                })
                .collect::<Vec<_>>())
        }),
        Request::NodeStop { node } => crate::cluster::drain(ctx, node).await.map(|moves| {
            json!(moves.into_iter().map(|(g, to)| json!({"group": g, "to": to.map(|n| n.0)})).collect::<Vec<_>>())
        }),
        Request::LogShow { limit } => crate::cluster::log_show(ctx, limit).await.map(|e| json!(e)),
        Request::LogWrite { text } => crate::cluster::log_write(ctx, text).await.map(|()| Value::Null),
        Request::StoreVerify => crate::cluster::verify(ctx).await.map(|reports| {
            json!(reports
                .into_iter()
                .map(|(node, r)| match r {
                    Ok(r) => json!({"node": node.0, "checked": r.checked, "damaged": r.damaged.len(),
                        "missing": r.missing.len(), "repaired": r.repaired.len(), "unrepaired": r.unrepaired.len()}),
                    Err(e) => json!({"node": node.0, "error": e}),
                })
                .collect::<Vec<_>>())
        }),
        _ => return Response::bad_request("not a cluster request".into()),
    };
    match result {
        Ok(v) => Response::ok(v),
        Err(ServerError::Store(e)) => Response::err(e),
        Err(e) => Response::bad_request(e.to_string()),
    }
}

async fn run(
    store: &dyn MailStore,
    dir: &dyn Directory,
    ctx: Option<&Context>,
    request: Request,
) -> Result<Value, StoreError> {
    Ok(match request {
        Request::DomainAdd { domain } => {
            dir.add_domain(&Domain::parse(&domain)?).await?;
            Value::Null
        }
        Request::DomainDel { domain } => {
            dir.remove_domain(&Domain::parse(&domain)?).await?;
            Value::Null
        }
        Request::DomainList => json!(dir.domains().await?.iter().map(|d| d.to_string()).collect::<Vec<_>>()),
        Request::UserAdd { user, password } => {
            check_password(&password)?;
            dir.add_user(&Address::parse(&user)?, &password).await?;
            Value::Null
        }
        Request::UserPasswd { user, password } => {
            check_password(&password)?;
            dir.set_password(&Address::parse(&user)?, &password).await?;
            Value::Null
        }
        Request::UserDel { user } => {
            dir.remove_user(&Address::parse(&user)?).await?;
            Value::Null
        }
        Request::UserImport { users, update, create_domains } => {
            crate::import::import_users(dir, users, update, create_domains).await?
        }
        Request::MailImport { .. } => {
            return Err(StoreError::Permanent("a mail import sends its message on the admin socket only".into()))
        }
        Request::UserList => json!(dir
            .users()
            .await?
            .iter()
            .map(|u| json!({"user": u.address.to_string(), "messages": u.messages, "bytes": u.bytes, "created_at": u.created_at}))
            .collect::<Vec<_>>()),
        Request::AliasAdd { alias, targets } => {
            let targets = targets.iter().map(|t| Address::parse(t)).collect::<Result<Vec<_>, _>>()?;
            if targets.is_empty() {
                return Err(StoreError::Permanent("an alias needs at least one target".into()));
            }
            dir.add_alias(&Address::parse(&alias)?, &targets).await?;
            Value::Null
        }
        Request::AliasDel { alias } => {
            dir.remove_alias(&Address::parse(&alias)?).await?;
            Value::Null
        }
        Request::AliasList => json!(dir
            .aliases()
            .await?
            .iter()
            .map(|(a, t)| json!({"alias": a.to_string(), "targets": t.iter().map(|x| x.to_string()).collect::<Vec<_>>()}))
            .collect::<Vec<_>>()),
        Request::QueueList => json!(store.queue_items().await?.iter().map(queue_json).collect::<Vec<_>>()),
        Request::QueueShow { id } => {
            let qid = parse_queue_id(&id)?;
            let items = store.queue_items().await?;
            let item = items
                .iter()
                .find(|i| i.entry.queue_id == qid)
                .ok_or_else(|| StoreError::Permanent(format!("no message {id} in the queue")))?;
            let body = store.body(&item.entry.body).await?;
            let mut v = queue_json(item);
            v["message"] = json!(String::from_utf8_lossy(&body));
            v
        }
        Request::Queue { command, ids } => {
            let op = match command.as_str() {
                "flush" => QueueOp::Flush,
                "hold" => QueueOp::Hold,
                "release" => QueueOp::Release,
                "delete" => QueueOp::Delete,
                "bounce" => QueueOp::Bounce { reason: "5.0.0 returned to the sender by the mail administrator".into() },
                other => return Err(StoreError::Permanent(format!("unknown queue command '{other}'"))),
            };
            let all = ids.is_empty() || ids.iter().any(|i| i.eq_ignore_ascii_case("ALL"));
            let items = store.queue_items().await?;
            let present: Vec<QueueId> = items.iter().map(|i| i.entry.queue_id).collect();
            let targets: Vec<QueueId> = if all {
                present
            } else {
                let mut t = Vec::new();
                for id in &ids {
                    let qid = parse_queue_id(id)?;
                    if !present.contains(&qid) {
                        return Err(StoreError::Permanent(format!("no message {id} in the queue")));
                    }
                    t.push(qid);
                }
                t
            };
            for qid in &targets {
                store.queue_change(*qid, op.clone()).await?;
                // A bounce by the operator fails its pending recipients:
                // counted with the other failures.
                if let (QueueOp::Bounce { .. }, Some(ctx)) = (&op, ctx) {
                    let pending = items
                        .iter()
                        .filter(|i| i.entry.queue_id == *qid)
                        .flat_map(|i| &i.state.recipients)
                        .filter(|r| r.status == hamail_store::RecipientStatus::Pending)
                        .count() as u64;
                    ctx.stats.relay_failed.fetch_add(pending, Ordering::Relaxed);
                }
            }
            if let Some(ctx) = ctx {
                ctx.delivery.wake();
            }
            json!({ "changed": targets.len() })
        }
        cluster_request!() => return Err(StoreError::Permanent("cluster commands need the running server".into())),
        Request::BanList => {
            let now = std::time::Instant::now();
            json!(running(ctx)?
                .logins
                .list(now)
                .iter()
                .map(|b| json!({"kind": b.target.kind(), "target": b.target.name(),
                    "remaining_secs": b.remaining.as_secs(), "failures": b.failures}))
                .collect::<Vec<_>>())
        }
        Request::BanDel { target } => {
            let parsed = BanTarget::parse(&target)
                .ok_or_else(|| StoreError::Permanent(format!("'{target}' is neither a client address nor an account")))?;
            let ctx = running(ctx)?;
            let lifted = ctx.logins.lift(&parsed);
            // In a cluster every node holds the ban: lift it everywhere.
            let told = crate::cluster::share_ban(ctx.cluster.node(), hamail_cluster::BanChange::Lift { target: parsed.name() }).await;
            if !lifted && !told {
                return Err(StoreError::Permanent(format!("no ban on {parsed}")));
            }
            json!({ "lifted": parsed.to_string() })
        }
        Request::Status => {
            let domains = dir.domains().await?.len();
            let users = dir.users().await?.len();
            let queue = store.queue().await?.len();
            let mut v = json!({
                "running": ctx.is_some(),
                "domains": domains,
                "users": users,
                "queue": queue,
            });
            if let Some(ctx) = ctx {
                let s = &ctx.stats;
                v["hostname"] = json!(ctx.config.server.hostname);
                v["uptime_secs"] = json!(ctx.started.elapsed().as_secs());
                v["smtp_connections"] = json!(s.smtp_connections.load(Ordering::Relaxed));
                v["pop3_connections"] = json!(s.pop3_connections.load(Ordering::Relaxed));
                v["messages_accepted"] = json!(s.messages_accepted.load(Ordering::Relaxed));
                v["messages_rejected"] = json!(s.messages_rejected.load(Ordering::Relaxed));
                v["messages_resent"] = json!(s.messages_resent.load(Ordering::Relaxed));
                v["pop3_logins"] = json!(s.pop3_logins.load(Ordering::Relaxed));
                v["relay_sent"] = json!(s.relay_sent.load(Ordering::Relaxed));
                v["relay_deferred"] = json!(s.relay_deferred.load(Ordering::Relaxed));
                v["relay_failed"] = json!(s.relay_failed.load(Ordering::Relaxed));
                v["relay_reports"] = json!(s.relay_reports.load(Ordering::Relaxed));
                v["relay_running"] = json!(ctx.delivery.running());
            }
            v
        }
    })
}

/// Bans live in the running server's memory.
fn running(ctx: Option<&Context>) -> Result<&Context, StoreError> {
    ctx.ok_or_else(|| StoreError::Permanent("bans are kept by the running server: none without it".into()))
}

fn parse_queue_id(id: &str) -> Result<QueueId, StoreError> {
    QueueId::parse(id.trim())
        .ok_or_else(|| StoreError::Permanent(format!("'{id}' is not a queue id (12 hexadecimal digits)")))
}

fn queue_json(item: &QueueItem) -> Value {
    let e = &item.entry;
    json!({
        "queue_id": e.queue_id.to_string(),
        "from": e.return_path.clone().unwrap_or_default(),
        "size": e.size,
        "queued_at": e.queued_at,
        "hold": item.state.hold,
        "warned": item.state.warned,
        "recipients": e.recipients.iter().zip(&item.state.recipients).map(|(a, r)| json!({
            "address": a,
            "status": match r.status {
                RecipientStatus::Pending => "pending",
                RecipientStatus::Delivered => "delivered",
                RecipientStatus::Failed { reported: false } => "failed",
                RecipientStatus::Failed { reported: true } => "bounced",
            },
            "attempts": r.attempts,
            "next_attempt": r.next_attempt,
            "last_error": r.last_error,
        })).collect::<Vec<_>>(),
    })
}

pub(crate) fn check_password(p: &str) -> Result<(), StoreError> {
    if p.is_empty() {
        return Err(StoreError::Permanent("the password must not be empty".into()));
    }
    if p.contains(['\r', '\n', '\0']) {
        return Err(StoreError::Permanent("the password must not contain CR, LF or NUL".into()));
    }
    Ok(())
}

/// Binds the socket (replacing a stale one) and serves it.
pub(crate) fn serve(ctx: Arc<Context>, path: &Path) -> Result<tokio::task::JoinHandle<()>, ServerError> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|e| ServerError::io(format!("creating {}", parent.display()), e))?;
    }
    if path.exists() {
        // A live server would hold the store lock, which we already have:
        // this socket file is a leftover of a crash.
        std::fs::remove_file(path).map_err(|e| ServerError::io(format!("removing stale {}", path.display()), e))?;
    }
    let listener =
        UnixListener::bind(path).map_err(|e| ServerError::io(format!("binding admin socket {}", path.display()), e))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| ServerError::io(format!("protecting {}", path.display()), e))?;
    let own_uid = std::fs::metadata("/proc/self").map(|m| m.uid()).unwrap_or(0);
    Ok(tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            };
            let allowed = matches!(stream.peer_cred(), Ok(c) if c.uid() == 0 || c.uid() == own_uid);
            if !allowed {
                tracing::warn!(peer = ?stream.peer_cred().ok(), "admin connection refused: not root nor the server's user");
                continue;
            }
            tokio::spawn(connection(ctx.clone(), stream));
        }
    }))
}

/// One admin connection: requests in, answers out in the same order.
async fn connection(ctx: Arc<Context>, stream: tokio::net::UnixStream) {
    let (r, mut w) = stream.into_split();
    let mut reader = BufReader::new(r);
    let mut imports = crate::import::ImportSession::default();
    let mut line = String::new();
    loop {
        line.clear();
        match reader.read_line(&mut line).await {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        let response = match serde_json::from_str::<Request>(&line) {
            Ok(Request::MailImport { user, return_path, size }) => {
                match crate::import::receive(&ctx, &mut reader, &mut imports, &user, return_path, size).await {
                    Ok(response) => response,
                    // The connection is out of step with its data.
                    Err(_) => break,
                }
            }
            Ok(req) => {
                let logged = match &req {
                    Request::UserAdd { user, .. } => format!("user_add {user}"),
                    Request::UserPasswd { user, .. } => format!("user_passwd {user}"),
                    Request::UserImport { users, .. } => format!("user_import of {} users", users.len()),
                    Request::ClusterJoin { .. } => "cluster_join".to_string(),
                    other => format!("{other:?}"),
                };
                tracing::info!(request = %logged, "admin request");
                if req.is_cluster() {
                    execute_cluster(&ctx, req).await
                } else {
                    execute(ctx.store().as_ref(), ctx.directory().as_ref(), Some(&ctx), req).await
                }
            }
            Err(e) => Response::bad_request(format!("malformed admin request: {e}")),
        };
        let mut text = serde_json::to_string(&response).unwrap_or_else(|_| "{\"ok\":false}".into());
        text.push('\n');
        if w.write_all(text.as_bytes()).await.is_err() {
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hamail_store::{LocalStore, StoreOptions};

    /// Without a running server, every cluster request (as the CLI sends
    /// it on the wire) gets the clear refusal, and the others are run.
    #[tokio::test]
    async fn cluster_requests_need_the_running_server() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(dir.path(), StoreOptions { fsync: false, ..StoreOptions::default() }).unwrap();
        let cluster = [
            r#"{"op":"cluster_init"}"#,
            r#"{"op":"cluster_join","token":"t"}"#,
            r#"{"op":"cluster_status"}"#,
            r#"{"op":"cluster_remove","node":2}"#,
            r#"{"op":"store_verify"}"#,
            r#"{"op":"group_apply","groups":[]}"#,
            r#"{"op":"group","command":"start","name":"g","node":null}"#,
            r#"{"op":"group_status"}"#,
            r#"{"op":"node_stop","node":null}"#,
            r#"{"op":"log_show","limit":5}"#,
            r#"{"op":"log_write","text":"x"}"#,
        ];
        for line in cluster {
            let request: Request = serde_json::from_str(line).unwrap();
            assert!(request.is_cluster(), "{line}");
            let r = execute(store.as_ref(), store.as_ref(), None, request).await;
            assert!(
                !r.ok && r.error.as_deref().is_some_and(|e| e.contains("need the running server")),
                "{line}: {r:?}"
            );
        }
        for line in
            [r#"{"op":"domain_add","domain":"example.org"}"#, r#"{"op":"domain_list"}"#, r#"{"op":"queue_list"}"#]
        {
            let request: Request = serde_json::from_str(line).unwrap();
            assert!(!request.is_cluster(), "{line}");
            let r = execute(store.as_ref(), store.as_ref(), None, request).await;
            assert!(r.ok, "{line}: {r:?}");
        }
    }
}
