//! Identifiers, records and the two traits a store backend implements.

use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::StoreResult;

/// The SHA-256 of a message body: its name in `bodies/`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct BodyHash(pub [u8; 32]);

impl BodyHash {
    pub fn of(bytes: &[u8]) -> Self {
        use sha2::Digest;
        BodyHash(sha2::Sha256::digest(bytes).into())
    }
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
    pub fn from_hex(s: &str) -> Option<Self> {
        let v = hex::decode(s).ok()?;
        Some(BodyHash(v.try_into().ok()?))
    }
}
impl fmt::Debug for BodyHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BodyHash({})", &self.to_hex()[..16])
    }
}
impl fmt::Display for BodyHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// A body opened for reading in pieces (POP3 RETR sends it through a small
/// buffer, whatever its size): its file, positioned at the start, and its
/// length in octets. The content was checked against its hash when it was
/// opened; a reader that gets fewer octets than `len` has met a truncated
/// or failing file.
#[derive(Debug)]
pub struct BodyFile {
    pub file: std::fs::File,
    pub len: u64,
}

/// The id of one accepted SMTP transaction (one message, many recipients),
/// as Postfix's queue id: it appears in the `Received:` header and in the
/// log line of the transaction. Allocated by the store, unique, never reused.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, Debug)]
pub struct QueueId(pub u64);
impl fmt::Display for QueueId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:012X}", self.0)
    }
}
impl QueueId {
    pub fn parse(s: &str) -> Option<Self> {
        u64::from_str_radix(s, 16).ok().map(QueueId)
    }
}

/// The id of one entry in one maildrop: stable and unique for the life of the
/// store (POP3 UIDL, later IMAP UID). Never reused, even after deletion.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, Debug)]
pub struct EntryId(pub u64);
impl fmt::Display for EntryId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// A mailbox address `local@domain`, normalised: the domain is lower-cased,
/// and (a choice of this server, as most do) so is the local part.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, Debug)]
pub struct Address(String);

impl Address {
    /// Parses and normalises `local@domain`. Rejects empty parts, spaces,
    /// control characters and more than one unquoted `@`.
    pub fn parse(s: &str) -> Result<Self, crate::StoreError> {
        let s = s.trim();
        let (local, domain) = s
            .rsplit_once('@')
            .ok_or_else(|| crate::StoreError::Permanent(format!("'{s}' is not an address: no '@'")))?;
        if local.is_empty() || domain.is_empty() {
            return Err(crate::StoreError::Permanent(format!("'{s}' is not an address: empty part")));
        }
        if s.len() > 254 || local.len() > 64 {
            return Err(crate::StoreError::Permanent(format!("'{s}' is too long (RFC 5321 4.5.3.1)")));
        }
        if s.chars().any(|c| c.is_control() || c.is_whitespace() || c == '<' || c == '>') {
            return Err(crate::StoreError::Permanent(format!("'{s}' has a forbidden character")));
        }
        let domain = Domain::parse(domain)?;
        Ok(Address(format!("{}@{}", local.to_lowercase(), domain.as_str())))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
    pub fn local_part(&self) -> &str {
        self.0.rsplit_once('@').map(|(l, _)| l).unwrap_or(&self.0)
    }
    pub fn domain(&self) -> &str {
        self.0.rsplit_once('@').map(|(_, d)| d).unwrap_or("")
    }
}
impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A mail domain, lower-cased, without a trailing dot.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, Debug)]
pub struct Domain(String);
impl Domain {
    pub fn parse(s: &str) -> Result<Self, crate::StoreError> {
        let d = s.trim().trim_end_matches('.').to_ascii_lowercase();
        let ok = !d.is_empty()
            && d.len() <= 253
            && d.split('.').all(|label| {
                !label.is_empty() && label.len() <= 63 && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
            });
        // Address literals such as [127.0.0.1] are accepted as domains too.
        let literal = d.starts_with('[') && d.ends_with(']') && d.len() > 2;
        if ok || literal {
            Ok(Domain(d))
        } else {
            Err(crate::StoreError::Permanent(format!("'{s}' is not a valid domain name")))
        }
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}
impl fmt::Display for Domain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A message to be committed: the envelope as the SMTP session collected
/// it, already resolved to local maildrops and remote (queued) recipients,
/// and the complete body (with our `Received:` header on top, dot-unstuffed,
/// CRLF line ends).
#[derive(Debug)]
pub struct Incoming {
    /// The envelope sender, `None` for the null reverse-path `<>`.
    pub return_path: Option<String>,
    /// Local maildrops (users, after alias expansion, deduplicated).
    pub local: Vec<Address>,
    /// Recipients in other domains, for the outbound queue.
    pub remote: Vec<String>,
    /// The body, whole: in memory or staged in the store's `tmp/`.
    pub body: crate::Body,
    /// The queue id the session already used in the `Received:` header,
    /// obtained from [`MailStore::next_queue_id`].
    pub queue_id: QueueId,
    /// How to recognise this transaction if the client sends it again
    /// (RFC 1047); `None`: never treated as a resend.
    pub resend: Option<ResendKey>,
}

impl Incoming {
    /// Each recipient once, in first-seen order (a client may repeat a
    /// `RCPT TO`, aliases may meet): what every store accepts.
    pub fn dedup_recipients(&mut self) {
        self.local = dedup(std::mem::take(&mut self.local));
        self.remote = dedup(std::mem::take(&mut self.remote));
    }
}

/// Keeps the first occurrence of each element, in order.
pub(crate) fn dedup<T: PartialEq>(items: Vec<T>) -> Vec<T> {
    let mut out: Vec<T> = Vec::with_capacity(items.len());
    for i in items {
        if !out.contains(&i) {
            out.push(i);
        }
    }
    out
}

/// What identifies one SMTP transaction as the client sent it: the
/// `Message-ID:` header, the envelope (MAIL FROM and the sorted RCPT TO
/// list) and the SHA-256 of the DATA the client sent (before our
/// `Received:` header, which differs at every attempt).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Fingerprint(pub [u8; 32]);

impl Fingerprint {
    /// Each part is length-prefixed, so no two different transactions give
    /// the same input to the hash. Recipients are compared case-insensitively
    /// and as a set (order and repetitions do not make another transaction).
    pub fn of(message_id: &str, return_path: Option<&str>, recipients: &[String], data: &[u8]) -> Fingerprint {
        use sha2::Digest;
        Self::of_digest(message_id, return_path, recipients, &sha2::Sha256::digest(data).into())
    }

    /// [`Self::of`] with the SHA-256 of the DATA already computed (the SMTP
    /// session hashes it as it arrives, instead of hashing up to the size
    /// limit again at the end, on a server thread).
    pub fn of_digest(
        message_id: &str,
        return_path: Option<&str>,
        recipients: &[String],
        data_sha256: &[u8; 32],
    ) -> Fingerprint {
        use sha2::Digest;
        let mut h = sha2::Sha256::new();
        let mut part = |bytes: &[u8]| {
            h.update((bytes.len() as u64).to_be_bytes());
            h.update(bytes);
        };
        part(b"hamail-resend-1");
        part(message_id.trim().as_bytes());
        match return_path {
            Some(p) => part(p.as_bytes()),
            None => part(b"<>"),
        }
        let mut rcpts: Vec<String> = recipients.iter().map(|r| r.to_lowercase()).collect();
        rcpts.sort();
        rcpts.dedup();
        part(&(rcpts.len() as u64).to_be_bytes());
        for r in &rcpts {
            part(r.as_bytes());
        }
        part(data_sha256);
        Fingerprint(h.finalize().into())
    }
}
impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({})", &hex::encode(self.0)[..16])
    }
}

/// Resend recognition (RFC 1047) for one accept: a client that lost our
/// `250` (the connection broke, the node failed over) sends the same
/// transaction again. If an accept with the same fingerprint was applied
/// at most `window_secs` earlier (by the accepts' own timestamps, so every
/// node of a cluster decides the same), the new one is answered `250` but
/// delivers nothing: the message is already in every maildrop.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResendKey {
    pub fingerprint: Fingerprint,
    /// Carried in the accept (not read from each node's configuration) so
    /// that every node applying it decides alike.
    pub window_secs: u64,
}

/// Proof that a message is durable: body fsynced and renamed, metadata
/// committed. Only the store can create one (the field is private), and the
/// SMTP session needs one to answer `250` to DATA.
#[derive(Debug, Clone)]
pub struct Committed {
    queue_id: QueueId,
    body: BodyHash,
    size: u64,
    resend_of: Option<QueueId>,
}
impl Committed {
    /// Only for store backends in this crate (and the replicated one built on
    /// it through [`crate`]'s own apply functions).
    pub(crate) fn new(queue_id: QueueId, body: BodyHash, size: u64) -> Self {
        Committed { queue_id, body, size, resend_of: None }
    }
    /// A recognised resend of `original` (see [`ResendKey`]): nothing new
    /// was delivered; `body` and `size` are the original's.
    pub(crate) fn resend(queue_id: QueueId, body: BodyHash, size: u64, original: QueueId) -> Self {
        Committed { queue_id, body, size, resend_of: Some(original) }
    }
    /// The queue id of the transaction this one was a resend of, if it was.
    pub fn resend_of(&self) -> Option<QueueId> {
        self.resend_of
    }
    pub fn queue_id(&self) -> QueueId {
        self.queue_id
    }
    pub fn body(&self) -> BodyHash {
        self.body
    }
    pub fn size(&self) -> u64 {
        self.size
    }
}

/// One message in one maildrop.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct MailboxEntry {
    pub id: EntryId,
    pub body: BodyHash,
    /// The envelope sender for the `Return-Path:` line added on delivery.
    pub return_path: Option<String>,
    /// Octets of the message as POP3 sends it: the `Return-Path:` line plus
    /// the body (RFC 1939 LIST size, before byte-stuffing).
    pub size: u64,
    /// Seconds since the Unix epoch when it was committed.
    pub received_at: u64,
    pub queue_id: QueueId,
}

impl MailboxEntry {
    /// The `Return-Path:` header line (RFC 5321 4.4) this entry starts with.
    pub fn return_path_line(&self) -> String {
        format!("Return-Path: <{}>\r\n", self.return_path.as_deref().unwrap_or(""))
    }
}

/// One message waiting in the outbound queue.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct QueueEntry {
    pub queue_id: QueueId,
    pub body: BodyHash,
    pub return_path: Option<String>,
    pub recipients: Vec<String>,
    pub size: u64,
    pub queued_at: u64,
}

/// Where one recipient of a queue entry stands.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub enum RecipientStatus {
    /// Still to deliver.
    Pending,
    /// A remote server answered 2xx after the final dot.
    Delivered,
    /// Failed for good. `reported`: the sender was told (or needs not
    /// be: null sender), so nothing remains to do for it.
    Failed { reported: bool },
}

/// The delivery state of one recipient of a queue entry.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct RecipientState {
    pub status: RecipientStatus,
    /// Attempts made: those that ended without delivery, and the one that
    /// delivered.
    pub attempts: u32,
    /// Unix seconds: not before this (0: now).
    pub next_attempt: u64,
    /// Unix seconds of the last attempt (0: none yet).
    pub last_attempt: u64,
    /// The last remote reply or failure reason.
    pub last_error: Option<String>,
}

/// The delivery state of a queue entry; `recipients` follows
/// [`QueueEntry::recipients`] index for index.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct QueueState {
    pub recipients: Vec<RecipientState>,
    /// Held by the operator: not delivered until released.
    pub hold: bool,
    /// A delay warning went to the sender.
    pub warned: bool,
}

impl QueueState {
    /// The state of an entry nobody has worked on yet.
    pub fn initial(entry: &QueueEntry) -> Self {
        QueueState {
            recipients: entry
                .recipients
                .iter()
                .map(|_| RecipientState {
                    status: RecipientStatus::Pending,
                    attempts: 0,
                    next_attempt: 0,
                    last_attempt: 0,
                    last_error: None,
                })
                .collect(),
            hold: false,
            warned: false,
        }
    }

    /// True when nothing remains to do: every recipient delivered or
    /// failed and reported.
    pub fn finished(&self) -> bool {
        self.recipients
            .iter()
            .all(|r| matches!(r.status, RecipientStatus::Delivered | RecipientStatus::Failed { reported: true }))
    }
}

/// A queue entry with its delivery state (`hamail queue`, the worker).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct QueueItem {
    pub entry: QueueEntry,
    pub state: QueueState,
}

/// The result of one attempt for one recipient.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub enum RcptOutcome {
    Delivered,
    /// Try again at `next_attempt` (Unix seconds).
    Deferred {
        next_attempt: u64,
        error: String,
    },
    /// Failed for good; `reported` as in [`RecipientStatus::Failed`].
    Failed {
        error: String,
        reported: bool,
    },
    /// The failure of this (failed) recipient has been reported.
    Reported,
    /// Not tried: its destination is backing off until `until` (Unix
    /// seconds) after `reason`, a failure with another message. Not an
    /// attempt; the queue shows when it will be tried.
    Waiting {
        until: u64,
        reason: String,
    },
}

/// A change to one queue entry, applied in log order on every node. Each
/// carries the time it uses, so every node computes the same state.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub enum QueueOp {
    /// Results of an attempt at `at`: (recipient index, outcome). A
    /// recipient already delivered keeps that status whatever comes later
    /// (a result recorded twice cannot undo a delivery).
    Results {
        at: u64,
        results: Vec<(u32, RcptOutcome)>,
    },
    Hold,
    Release,
    /// Every pending recipient is due now.
    Flush,
    /// Every pending recipient fails with `reason` (the sender is told).
    Bounce {
        reason: String,
    },
    /// A delay warning was sent.
    Warned,
    /// The entry goes, whatever its state (`hamail queue delete`).
    Delete,
}

/// What a recipient address means here.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Resolution {
    /// Delivered into these local maildrops (one for a user, several for an
    /// alias with several targets).
    Local(Vec<Address>),
    /// An alias whose expansion reaches other domains too: deliver into
    /// the `local` maildrops and queue a copy for the `remote` addresses.
    /// Never returned without at least one remote address (that is `Local`).
    Mixed { local: Vec<Address>, remote: Vec<Address> },
    /// A local domain, but no such user or alias: `550 5.1.1`.
    UnknownUser,
    /// Not one of our domains: relay (only for authenticated clients).
    Remote,
}

/// A user of the directory (never the password hash).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserInfo {
    pub address: Address,
    pub created_at: u64,
    pub messages: u64,
    pub bytes: u64,
}

/// One change to the directory, as a state machine applies it. Carries
/// everything needed (the password hash, not the password; the creation
/// time), so that every node of a cluster applying the same changes ends up
/// with the same state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DirectoryChange {
    AddDomain {
        domain: Domain,
    },
    RemoveDomain {
        domain: Domain,
    },
    AddUser {
        user: Address,
        password_hash: String,
        created_at: u64,
    },
    SetPassword {
        user: Address,
        password_hash: String,
    },
    /// Removes the user and its maildrop.
    RemoveUser {
        user: Address,
    },
    AddAlias {
        alias: Address,
        targets: Vec<Address>,
    },
    RemoveAlias {
        alias: Address,
    },
}

/// One change to the mail metadata, as a cluster's state machine applies it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MailChange {
    /// A message accepted by some node: one maildrop entry per local
    /// recipient (entry ids allocated by the applying store, the same on
    /// every node since all apply the same log), a queue entry for remote
    /// ones. Applying the same queue id twice does nothing, and an accept
    /// whose `resend` fingerprint was applied within its window delivers
    /// nothing either (see [`ResendKey`]). The body file
    /// may be absent on this node: the message is recorded anyway, and the
    /// body is listed by `missing_bodies` until it is fetched.
    Accept {
        queue_id: QueueId,
        return_path: Option<String>,
        local: Vec<Address>,
        remote: Vec<String>,
        body: BodyHash,
        size: u64,
        at: u64,
        resend: Option<ResendKey>,
    },
    /// POP3 UPDATE: these entries of this user go (ids already gone are
    /// ignored).
    Delete { user: Address, ids: Vec<EntryId> },
    /// An outbound queue entry is done.
    Dequeue { queue_id: QueueId },
    /// A change to the delivery state of a queue entry (an absent entry is
    /// ignored). An entry whose recipients are all finished is removed in
    /// the same application.
    Queue { queue_id: QueueId, op: QueueOp },
}

/// A change to anything the cluster's state machine owns.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum StateChange {
    Directory(DirectoryChange),
    Mail(MailChange),
    /// Appends `record` (opaque here) to the cluster event log under `seq`
    /// and drops the records older than the last `keep`.
    ClusterLog {
        seq: u64,
        record: Vec<u8>,
        keep: u64,
    },
}

/// The whole directory, for a consensus snapshot.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirectorySnapshot {
    pub domains: Vec<Domain>,
    /// (address, password hash: argon2 PHC or an imported crypt(3) string, created_at)
    pub users: Vec<(Address, String, u64)>,
    pub aliases: Vec<(Address, Vec<Address>)>,
}

/// Memory a store may take for a body it must hold whole (a copy for the
/// other data nodes of a cluster): the node-wide budget of what clients can
/// make the server hold.
pub trait MemoryGate: Send + Sync + 'static {
    /// A reservation of `bytes`, given back when dropped; `None` when the
    /// budget cannot give them.
    fn reserve(&self, bytes: usize) -> Option<Box<dyn Send + Sync>>;
}

/// The mail store: accepted messages, maildrops and the outbound queue.
#[async_trait::async_trait]
pub trait MailStore: Send + Sync + 'static {
    /// Where the body of a message being received goes: memory up to
    /// `in_memory` octets, then a file in this store's `tmp/` (see
    /// [`crate::Spool`]). Touches no disk until the body outgrows memory.
    fn spool(&self, in_memory: usize) -> crate::Spool;
    /// A fresh, never-used queue id (for the `Received:` header and logs).
    async fn next_queue_id(&self) -> StoreResult<QueueId>;
    /// Makes the message durable in every local maildrop and, for remote
    /// recipients, in the outbound queue, all in one atomic commit.
    async fn accept(&self, msg: Incoming) -> StoreResult<Committed>;
    /// The maildrop of `user`, oldest first.
    async fn mailbox(&self, user: &Address) -> StoreResult<Vec<MailboxEntry>>;
    /// The body bytes (without the `Return-Path:` line).
    async fn body(&self, hash: &BodyHash) -> StoreResult<Arc<Vec<u8>>>;
    /// The same body as a file to read in pieces, never held in memory
    /// whole; the same errors as [`MailStore::body`].
    async fn open_body(&self, hash: &BodyHash) -> StoreResult<BodyFile>;
    /// Removes these entries from the maildrop of `user` in one atomic
    /// commit (POP3 UPDATE state); bodies no longer referenced are freed.
    /// Ids already gone are ignored.
    async fn delete(&self, user: &Address, ids: &[EntryId]) -> StoreResult<()>;
    /// The outbound queue.
    async fn queue(&self) -> StoreResult<Vec<QueueEntry>>;
    /// The outbound queue with each entry's delivery state.
    async fn queue_items(&self) -> StoreResult<Vec<QueueItem>>;
    /// Changes one queue entry's delivery state, durably (fsynced here,
    /// committed through the log in a cluster) before returning.
    async fn queue_change(&self, queue_id: QueueId, op: QueueOp) -> StoreResult<()>;
}

/// Users, domains and aliases: the one user database of the cluster.
#[async_trait::async_trait]
pub trait Directory: Send + Sync + 'static {
    async fn add_domain(&self, domain: &Domain) -> StoreResult<()>;
    async fn remove_domain(&self, domain: &Domain) -> StoreResult<()>;
    async fn domains(&self) -> StoreResult<Vec<Domain>>;
    /// `password` is the clear text; only its argon2 hash is stored.
    async fn add_user(&self, user: &Address, password: &str) -> StoreResult<()>;
    async fn set_password(&self, user: &Address, password: &str) -> StoreResult<()>;
    /// Removes the user and its maildrop.
    async fn remove_user(&self, user: &Address) -> StoreResult<()>;
    async fn users(&self) -> StoreResult<Vec<UserInfo>>;
    /// Applies `changes` in order as one write (one commit; one log entry
    /// in a cluster), for bulk administration such as an import. Each
    /// change gets its own result: a refusal (`Permanent`: user exists,
    /// unknown domain...) does not stop the others. Password hashes in the
    /// changes are stored as given (see [`crate::password::validate_hash`]).
    async fn apply_batch(&self, changes: Vec<DirectoryChange>) -> StoreResult<Vec<StoreResult<()>>>;
    /// Checks a password; `Ok(false)` for an unknown user or a wrong password
    /// (the caller must not learn which).
    async fn verify_password(&self, user: &Address, password: &str) -> StoreResult<bool>;
    /// `alias` → `targets` (local users or remote addresses).
    async fn add_alias(&self, alias: &Address, targets: &[Address]) -> StoreResult<()>;
    async fn remove_alias(&self, alias: &Address) -> StoreResult<()>;
    async fn aliases(&self) -> StoreResult<Vec<(Address, Vec<Address>)>>;
    /// What a recipient means here: a user, an alias, unknown in a local
    /// domain, or remote. The node's own host names (the seed's `Cw` class,
    /// given when the store is opened) are local too: `x@hostname` is
    /// looked up as `x@d` in each configured domain `d`, in name order.
    async fn resolve(&self, rcpt: &Address) -> StoreResult<Resolution>;
}
