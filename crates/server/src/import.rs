//! Moving users and mail from an existing system (sendmail/Postfix with
//! Dovecot or ipop3d): a users file with crypt(3) hashes, mbox files and
//! Maildir++ trees.
//!
//! Users: `address secret` lines ([`parse_user_line`]); hashes are kept
//! as they are (see [`hamail_store::password::HashScheme`]) so users keep
//! their passwords, clear passwords are hashed with argon2 on both workers.
//! A whole batch is one directory write ([`Directory::apply_batch`]: one
//! commit, one log entry in a cluster), so a thousand users cost one
//! replicated write, not a thousand.
//!
//! Mail: each message goes through [`MailStore::accept`], the commit of a
//! local delivery (replicated in a cluster, crash-safe), with its line ends
//! made CRLF as SMTP stores them ([`MessageBody`]). A leading
//! `Return-Path: <...>` line becomes the entry's envelope sender, since POP3
//! writes that line in front of every message: the message then comes back
//! exactly as it was. The stable key of a message is the store's own body
//! name, the SHA-256 of the message as stored (its `Message-ID:` included):
//! a message whose body is already in the maildrop is not imported again
//! ([`ImportSession`]), so running the same import twice adds nothing.
//!
//! The mbox reader ([`MboxReader`]) reads a line at a time with a bounded
//! buffer; one message is held at most up to the size limit, a larger one
//! is skipped without being held.

use std::collections::{HashMap, HashSet};
use std::io::{self, BufRead};
use std::path::{Path, PathBuf};

use hamail_store::password::{validate_hash, HashScheme, Passwords};
use hamail_store::{
    Address, Body, BodyHash, Committed, Directory, DirectoryChange, Domain, Incoming, MailStore, Spool, StoreError,
    StoreResult,
};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// What a users file gives for one user.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Secret {
    /// A clear password, hashed here with argon2.
    Password(String),
    /// A crypt(3) or PHC hash, stored as it is.
    Hash(String),
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never in a log.
        f.write_str(match self {
            Secret::Password(_) => "Password(..)",
            Secret::Hash(_) => "Hash(..)",
        })
    }
}

/// One user of an import.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImportedUser {
    pub user: String,
    pub secret: Secret,
}

/// Dovecot's scheme prefixes (`{SHA512-CRYPT}$6$...`, `{PLAIN}secret`), as
/// passwd-files carry them: which say a clear password follows.
const CLEAR_SCHEMES: [&str; 3] = ["PLAIN", "CLEAR", "CLEARTEXT"];
/// Those that say a crypt(3) or PHC hash follows.
const HASH_SCHEMES: [&str; 7] =
    ["CRYPT", "SHA512-CRYPT", "SHA256-CRYPT", "BLF-CRYPT", "ARGON2I", "ARGON2ID", "YESCRYPT"];

/// One line of a users file: `address secret`, whitespace separated, the
/// secret running to the end of the line (a clear password may contain
/// spaces). Blank lines and `#` comments give `Ok(None)`. The secret is a
/// hash when it starts with a supported crypt(3) prefix ([`HashScheme`]) or
/// a Dovecot hash scheme (`{SHA512-CRYPT}`...), a clear password otherwise
/// or after `{PLAIN}`. A `$id$` prefix of an unsupported scheme, or a
/// locked shadow entry (`!`, `*`), is an error: taking it as a clear
/// password would lock the user out silently.
pub fn parse_user_line(line: &str) -> Result<Option<ImportedUser>, String> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return Ok(None);
    }
    let (user, secret) = match line.split_once(char::is_whitespace) {
        Some((u, s)) => (u, s.trim()),
        None => return Err(format!("'{line}': no password after the address")),
    };
    Address::parse(user).map_err(|e| format!("'{user}': {e}"))?;
    let secret = classify_secret(secret)?;
    Ok(Some(ImportedUser { user: user.to_string(), secret }))
}

fn classify_secret(secret: &str) -> Result<Secret, String> {
    if let Some(rest) = secret.strip_prefix('{') {
        if let Some((scheme, value)) = rest.split_once('}') {
            let upper = scheme.to_ascii_uppercase();
            if CLEAR_SCHEMES.contains(&upper.as_str()) {
                return clear(value);
            }
            if HASH_SCHEMES.contains(&upper.as_str()) {
                return hash(value);
            }
            return Err(format!("'{{{scheme}}}': unsupported password scheme"));
        }
    }
    if secret == "!" || secret == "*" || secret.starts_with("!$") || secret.starts_with("*$") || secret == "!!" {
        return Err(format!("'{secret}': a locked account (no usable password)"));
    }
    if HashScheme::of(secret).is_some() || looks_like_crypt(secret) {
        return hash(secret);
    }
    clear(secret)
}

/// `$id$...` with a short alphanumeric id: the shape of a crypt(3) string.
fn looks_like_crypt(s: &str) -> bool {
    let Some(rest) = s.strip_prefix('$') else { return false };
    match rest.split_once('$') {
        Some((id, _)) => !id.is_empty() && id.len() <= 8 && id.bytes().all(|b| b.is_ascii_alphanumeric()),
        None => false,
    }
}

fn clear(p: &str) -> Result<Secret, String> {
    check_password(p)?;
    Ok(Secret::Password(p.to_string()))
}

fn hash(h: &str) -> Result<Secret, String> {
    validate_hash(h).map_err(|e| format!("'{h}': {e}"))?;
    Ok(Secret::Hash(h.to_string()))
}

/// The rules of `hamail user add` for a clear password.
fn check_password(p: &str) -> Result<(), String> {
    crate::admin::check_password(p).map_err(|e| e.to_string())
}

/// What became of one user of an import.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    Imported,
    Updated,
    Skipped,
    Failed,
}

impl Outcome {
    fn name(self) -> &'static str {
        match self {
            Outcome::Imported => "imported",
            Outcome::Updated => "updated",
            Outcome::Skipped => "skipped",
            Outcome::Failed => "failed",
        }
    }
}

/// Imports `users` in one directory write. Existing users are skipped, or
/// get the new password with `update`; a user whose domain does not exist
/// fails unless `create_domains` (the domain is then added in the same
/// write). The answer has one `{status, error}` per user, in order, and
/// the domains created.
pub async fn import_users(
    dir: &dyn Directory,
    users: Vec<ImportedUser>,
    update: bool,
    create_domains: bool,
) -> StoreResult<Value> {
    let existing: HashSet<String> = dir.users().await?.into_iter().map(|u| u.address.to_string()).collect();
    let domains: HashSet<String> = dir.domains().await?.into_iter().map(|d| d.to_string()).collect();
    let mut results: Vec<(Outcome, Option<String>)> = Vec::with_capacity(users.len());
    let mut new_domains: Vec<Domain> = Vec::new();
    let mut seen = HashSet::new();
    // (position in `users`, address, secret, whether it exists)
    let mut planned = Vec::new();
    for (i, u) in users.into_iter().enumerate() {
        let checked = Address::parse(&u.user).and_then(|a| {
            match &u.secret {
                Secret::Password(p) => check_password(p).map_err(StoreError::Permanent)?,
                Secret::Hash(h) => {
                    validate_hash(h)?;
                }
            }
            Ok(a)
        });
        let address = match checked {
            Ok(a) => a,
            Err(e) => {
                results.push((Outcome::Failed, Some(e.to_string())));
                continue;
            }
        };
        if !seen.insert(address.to_string()) {
            results.push((Outcome::Failed, Some(format!("{address} is listed twice"))));
            continue;
        }
        let exists = existing.contains(address.as_str());
        if exists && !update {
            results.push((Outcome::Skipped, Some(format!("user {address} already exists"))));
            continue;
        }
        if !exists && !domains.contains(address.domain()) {
            if !create_domains {
                results.push((
                    Outcome::Failed,
                    Some(format!(
                        "domain {} does not exist (add it with `hamail domain add`, or import with --create-domains)",
                        address.domain()
                    )),
                ));
                continue;
            }
            let domain = Domain::parse(address.domain())?;
            if !new_domains.contains(&domain) {
                new_domains.push(domain);
            }
        }
        results.push((if exists { Outcome::Updated } else { Outcome::Imported }, None));
        planned.push((i, address, u.secret, exists));
    }
    let hashes = hash_clear_passwords(planned.iter().map(|(_, _, s, _)| s.clone()).collect()).await;
    let now = crate::unix_now();
    let mut changes: Vec<DirectoryChange> =
        new_domains.iter().map(|d| DirectoryChange::AddDomain { domain: d.clone() }).collect();
    let mut positions = Vec::new();
    for ((i, user, _, exists), hash) in planned.into_iter().zip(hashes) {
        let password_hash = match hash {
            Ok(h) => h,
            Err(e) => {
                results[i] = (Outcome::Failed, Some(e.to_string()));
                continue;
            }
        };
        positions.push(i);
        changes.push(if exists {
            DirectoryChange::SetPassword { user, password_hash }
        } else {
            DirectoryChange::AddUser { user, password_hash, created_at: now }
        });
    }
    let domain_count = new_domains.len();
    let mut created = Vec::new();
    if !changes.is_empty() {
        let applied = dir.apply_batch(changes).await?;
        for (j, r) in applied.into_iter().enumerate() {
            match j.checked_sub(domain_count) {
                // A domain refused was added in the meantime: still there.
                None => {
                    if r.is_ok() {
                        created.push(new_domains[j].to_string());
                    }
                }
                Some(k) => {
                    if let (Err(e), Some(&i)) = (r, positions.get(k)) {
                        results[i] = (Outcome::Failed, Some(e.to_string()));
                    }
                }
            }
        }
    }
    Ok(json!({
        "results": results.iter().map(|(o, e)| json!({"status": o.name(), "error": e})).collect::<Vec<_>>(),
        "domains_created": created,
    }))
}

/// The stored hash of each secret: hashes as given, clear passwords
/// hashed with argon2, all at once so that both workers are busy.
async fn hash_clear_passwords(secrets: Vec<Secret>) -> Vec<StoreResult<String>> {
    let mut jobs = tokio::task::JoinSet::new();
    let mut out: Vec<Option<StoreResult<String>>> = Vec::with_capacity(secrets.len());
    for (i, s) in secrets.into_iter().enumerate() {
        match s {
            Secret::Hash(h) => out.push(Some(Ok(h))),
            Secret::Password(p) => {
                out.push(None);
                jobs.spawn(async move { (i, Passwords::global().hash(&p).await) });
            }
        }
    }
    while let Some(done) = jobs.join_next().await {
        if let Ok((i, r)) = done {
            out[i] = Some(r);
        }
    }
    out.into_iter().map(|r| r.unwrap_or_else(|| Err(StoreError::Internal("a hashing task died".into())))).collect()
}

/// The address of a `Return-Path:` line: `None` for `<>`.
pub type ReturnPath = Option<String>;

/// Longest first line looked at for a `Return-Path:` header.
const RETURN_PATH_LINE_MAX: usize = 1000;

/// A message on its way into the store: line ends made CRLF (a bare LF
/// gets its CR; CRLF and lone CRs stay), a CRLF added after a last line
/// without one, and a first line `Return-Path: <address>` taken off as the
/// envelope sender. Resumable: bytes may come in pieces of any size.
pub struct MessageBody {
    spool: Spool,
    /// The start of the message until its first line is complete (or too
    /// long to be a `Return-Path:` line).
    head: Option<Vec<u8>>,
    return_path: Option<ReturnPath>,
    /// The last byte appended was a CR.
    after_cr: bool,
    /// Octets appended to the spool.
    size: u64,
    /// Scratch for the CRLF conversion of one piece.
    converted: Vec<u8>,
}

impl MessageBody {
    pub fn new(spool: Spool) -> Self {
        MessageBody {
            spool,
            head: Some(Vec::new()),
            return_path: None,
            after_cr: false,
            size: 0,
            converted: Vec::new(),
        }
    }

    /// Octets of the message as it will be stored, so far.
    pub fn size(&self) -> u64 {
        self.size + self.head.as_ref().map_or(0, |h| h.len() as u64)
    }

    /// Whether appending `more` octets may write to the spool's file.
    pub fn append_writes(&self, more: usize) -> bool {
        self.spool.append_writes(more.saturating_mul(2).saturating_add(RETURN_PATH_LINE_MAX))
    }

    pub fn append(&mut self, mut bytes: &[u8]) -> StoreResult<()> {
        if let Some(head) = &mut self.head {
            let room = RETURN_PATH_LINE_MAX - head.len();
            let take = match bytes[..bytes.len().min(room)].iter().position(|&b| b == b'\n') {
                Some(lf) => lf + 1,
                None => bytes.len().min(room),
            };
            head.extend_from_slice(&bytes[..take]);
            bytes = &bytes[take..];
            if head.ends_with(b"\n") || head.len() >= RETURN_PATH_LINE_MAX {
                self.close_head()?;
            }
        }
        self.push(bytes)
    }

    /// Ends the first line: a `Return-Path:` line is kept aside, anything
    /// else goes to the spool.
    fn close_head(&mut self) -> StoreResult<()> {
        let Some(head) = self.head.take() else { return Ok(()) };
        match return_path_of(&head) {
            Some(rp) if head.ends_with(b"\n") => {
                self.return_path = Some(rp);
                Ok(())
            }
            _ => self.push(&head),
        }
    }

    fn push(&mut self, bytes: &[u8]) -> StoreResult<()> {
        if bytes.is_empty() {
            return Ok(());
        }
        self.converted.clear();
        for &b in bytes {
            if b == b'\n' && !self.after_cr {
                self.converted.push(b'\r');
            }
            self.converted.push(b);
            self.after_cr = b == b'\r';
        }
        self.size += self.converted.len() as u64;
        self.spool.append(&self.converted)
    }

    /// The body to commit and the `Return-Path:` address its first line
    /// gave: `Some(None)` for `<>`, `None` when it had none.
    pub fn finish(mut self) -> StoreResult<(Body, Option<ReturnPath>)> {
        self.close_head()?;
        if self.size > 0 && !self.after_cr_lf() {
            let end: &[u8] = if self.after_cr { b"\n" } else { b"\r\n" };
            self.size += end.len() as u64;
            self.spool.append(end)?;
        }
        Ok((self.spool.finish()?, self.return_path))
    }

    fn after_cr_lf(&self) -> bool {
        // The last byte pushed was LF, and every LF pushed has its CR.
        self.converted.last() == Some(&b'\n')
    }
}

/// The address of a `Return-Path: <address>` line (any case, spaces
/// around the brackets), `Some(None)` for `<>`.
fn return_path_of(line: &[u8]) -> Option<ReturnPath> {
    let text = std::str::from_utf8(line).ok()?;
    let text = text.strip_suffix('\n')?;
    let text = text.strip_suffix('\r').unwrap_or(text);
    let (name, value) = text.split_once(':')?;
    if !name.eq_ignore_ascii_case("Return-Path") {
        return None;
    }
    let inner = value.trim().strip_prefix('<')?.strip_suffix('>')?;
    if inner.contains(['<', '>', ' ', '\t', '\r', '\n']) {
        return None;
    }
    Some((!inner.is_empty()).then(|| inner.to_string()))
}

/// What became of one imported message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admission {
    /// Not in the maildrop yet: deliver it.
    New,
    /// The same message (same stored bytes) is already in the maildrop.
    Duplicate,
}

/// The state of one run of a mail import: the body names in each
/// maildrop, read once, and those imported since.
#[derive(Default)]
pub struct ImportSession {
    maildrops: HashMap<Address, HashSet<BodyHash>>,
}

impl ImportSession {
    /// Whether `body` is new in the maildrop of `user` (an existing user:
    /// an import never creates one); it counts as there from now on.
    pub async fn admit(
        &mut self,
        store: &dyn MailStore,
        dir: &dyn Directory,
        user: &Address,
        body: &Body,
    ) -> StoreResult<Admission> {
        if !self.maildrops.contains_key(user) {
            if !dir.users().await?.iter().any(|u| &u.address == user) {
                return Err(StoreError::Permanent(format!("no user {user}: add it first")));
            }
            let present = store.mailbox(user).await?.into_iter().map(|e| e.body).collect();
            self.maildrops.insert(user.clone(), present);
        }
        let hash = body_hash(body);
        let maildrop = self.maildrops.entry(user.clone()).or_default();
        Ok(if maildrop.insert(hash) { Admission::New } else { Admission::Duplicate })
    }
}

/// The name of a body, as [`ImportSession::admit`] records it.
pub fn body_hash(body: &Body) -> BodyHash {
    match body {
        Body::Bytes(b) => BodyHash::of(b),
        Body::Staged(f) => f.hash(),
    }
}

/// Commits one imported message into the maildrop of `user`, as a local
/// delivery does.
pub async fn deliver(
    store: &dyn MailStore,
    user: &Address,
    return_path: Option<String>,
    body: Body,
) -> StoreResult<Committed> {
    let queue_id = store.next_queue_id().await?;
    let incoming =
        Incoming { return_path, local: vec![user.clone()], remote: Vec::new(), body, queue_id, resend: None };
    store.accept(incoming).await
}

/// What a message being received may hold in memory before it goes to
/// its file (as for SMTP).
const IN_MEMORY: usize = 128 * 1024;

/// Reads one message of `size` octets from an admin connection into a
/// spool of the store, and commits it unless it is a duplicate or
/// refused. An `Err` means the connection cannot go on (its data could not
/// be read whole).
pub(crate) async fn receive<R: tokio::io::AsyncRead + Unpin>(
    ctx: &std::sync::Arc<crate::Context>,
    input: &mut R,
    session: &mut ImportSession,
    user: &str,
    return_path: Option<String>,
    size: u64,
) -> io::Result<crate::admin::Response> {
    use crate::admin::Response;
    use tokio::io::AsyncReadExt;
    let max = ctx.config.smtp.max_message_size as u64;
    let user = match Address::parse(user) {
        Ok(u) if size <= max => u,
        refused => {
            discard(input, size).await?;
            let e = refused.err().unwrap_or_else(|| {
                StoreError::Permanent(format!("a message of {size} octets is over the size limit of {max}"))
            });
            return Ok(Response::err(e));
        }
    };
    let store = ctx.store();
    let reservation = ctx.memory.try_reserve(IN_MEMORY);
    let mut body = MessageBody::new(store.spool(if reservation.is_some() { IN_MEMORY } else { 0 }));
    let mut failed = None;
    let mut buf = vec![0u8; 64 * 1024];
    let mut remaining = size;
    while remaining > 0 {
        let want = buf.len().min(usize::try_from(remaining).unwrap_or(usize::MAX));
        let n = input.read(&mut buf[..want]).await?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        remaining -= n as u64;
        if failed.is_some() {
            continue;
        }
        if body.append_writes(n) {
            let piece = buf[..n].to_vec();
            let (back, result) = tokio::task::spawn_blocking(move || {
                let result = body.append(&piece);
                (body, result)
            })
            .await
            .map_err(io::Error::other)?;
            body = back;
            failed = result.err();
        } else {
            failed = body.append(&buf[..n]).err();
        }
    }
    if let Some(e) = failed {
        return Ok(Response::err(e));
    }
    let (body, own_return_path) = match tokio::task::spawn_blocking(move || body.finish()).await {
        Ok(Ok(done)) => done,
        Ok(Err(e)) => return Ok(Response::err(e)),
        Err(e) => return Err(io::Error::other(e)),
    };
    let return_path =
        own_return_path.unwrap_or_else(|| return_path.and_then(|r| Address::parse(&r).ok()).map(|a| a.to_string()));
    let dir = ctx.directory();
    Ok(match session.admit(store.as_ref(), dir.as_ref(), &user, &body).await {
        Err(e) => Response::err(e),
        Ok(Admission::Duplicate) => Response::ok(json!({ "status": "duplicate" })),
        // One at a time: concurrent commits would share the store's group
        // commit (measured 4x faster) but could land in another order, and
        // the maildrop must keep the order of the source.
        Ok(Admission::New) => {
            let result = deliver(store.as_ref(), &user, return_path, body).await;
            drop(reservation);
            match result {
                Ok(c) => Response::ok(json!({ "status": "imported", "queue_id": c.queue_id().to_string() })),
                Err(e) => Response::err(e),
            }
        }
    })
}

/// Reads and drops `size` octets.
async fn discard<R: tokio::io::AsyncRead + Unpin>(input: &mut R, size: u64) -> io::Result<()> {
    let copied = tokio::io::copy(&mut tokio::io::AsyncReadExt::take(input, size), &mut tokio::io::sink()).await?;
    if copied < size {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

/// How a mbox file quotes `From ` lines in bodies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MboxFormat {
    /// Every `>*From ` line of a body was quoted with one more `>`: one is
    /// removed on reading (`>From ` → `From `, `>>From ` → `>From `).
    Mboxrd,
    /// Only `From ` lines were quoted (as `>From `), so a quoted line
    /// cannot be told from an original `>From `: nothing is unquoted.
    Mboxo,
}

/// One message of a mbox file.
#[derive(Debug, PartialEq, Eq)]
pub enum MboxItem {
    /// The message (without its `From ` line, unquoted), and the envelope
    /// sender its `From ` line names (an address, else `None`).
    Message { sender: Option<String>, bytes: Vec<u8> },
    /// Larger than the limit: not kept; its size in the file.
    Oversized { sender: Option<String>, size: u64 },
}

/// Pieces read at most at once (a line longer than this is read in
/// pieces): what bounds the reader's memory besides the one message.
const MBOX_PIECE: u64 = 64 * 1024;

/// Reads the messages of a mbox file one at a time. A message starts at a
/// line beginning with `From ` at the start of the file or after an empty
/// line; that line is dropped, and so is the empty line before the next
/// one (the separator the writer added). Bytes are kept exactly otherwise.
pub struct MboxReader<R> {
    input: R,
    format: MboxFormat,
    /// The `From ` line that starts the next message, once read.
    next_from: Option<Vec<u8>>,
    started: bool,
    piece: Vec<u8>,
}

impl<R: BufRead> MboxReader<R> {
    pub fn new(input: R, format: MboxFormat) -> Self {
        MboxReader { input, format, next_from: None, started: false, piece: Vec::new() }
    }

    /// Reads up to and including the next LF, at most [`MBOX_PIECE`]
    /// octets; empty at the end of the input.
    fn read_piece(&mut self) -> io::Result<()> {
        self.piece.clear();
        io::Read::take(self.input.by_ref(), MBOX_PIECE).read_until(b'\n', &mut self.piece)?;
        Ok(())
    }

    /// The next message, `None` at the end. A message over `max` octets is
    /// read through without being kept. Text before the first `From `
    /// line is an error: it is not a mbox file.
    pub fn next_message(&mut self, max: usize) -> io::Result<Option<MboxItem>> {
        if !self.started {
            self.started = true;
            self.read_piece()?;
            if self.piece.is_empty() {
                return Ok(None);
            }
            if !self.piece.starts_with(b"From ") {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "not a mbox file: it does not start with 'From '",
                ));
            }
            self.next_from = Some(self.whole_line()?);
        }
        let Some(from_line) = self.next_from.take() else { return Ok(None) };
        let sender = sender_of(&from_line);
        let mut bytes = Vec::new();
        let mut size: u64 = 0;
        let mut oversized = false;
        // An empty line is held back until the next line shows whether it
        // separates messages.
        let mut held_blank: Option<Vec<u8>> = None;
        // Whether the piece read starts a line.
        let mut at_line_start = true;
        loop {
            self.read_piece()?;
            if self.piece.is_empty() {
                break;
            }
            let starts_line = at_line_start;
            at_line_start = self.piece.ends_with(b"\n");
            if starts_line && held_blank.is_some() && self.piece.starts_with(b"From ") {
                self.next_from = Some(self.whole_line()?);
                break;
            }
            if let Some(blank) = held_blank.take() {
                keep(&mut bytes, &mut size, &mut oversized, max, &blank);
            }
            if starts_line && (self.piece == b"\n" || self.piece == b"\r\n") {
                held_blank = Some(std::mem::take(&mut self.piece));
                continue;
            }
            let mut line: &[u8] = &self.piece;
            if starts_line && self.format == MboxFormat::Mboxrd && is_quoted_from(line) {
                line = &line[1..];
            }
            let line = line.to_vec();
            keep(&mut bytes, &mut size, &mut oversized, max, &line);
        }
        // A blank line at the very end is the writer's separator too.
        Ok(Some(if oversized { MboxItem::Oversized { sender, size } } else { MboxItem::Message { sender, bytes } }))
    }

    /// The rest of the line whose first piece is in `piece`, whole (a
    /// `From ` line is kept to read its sender; longer than a piece, the
    /// rest is dropped).
    fn whole_line(&mut self) -> io::Result<Vec<u8>> {
        let line = std::mem::take(&mut self.piece);
        let mut ended = line.ends_with(b"\n");
        while !ended {
            self.read_piece()?;
            if self.piece.is_empty() {
                break;
            }
            ended = self.piece.ends_with(b"\n");
        }
        Ok(line)
    }
}

/// Appends a line to the message, or only counts it once the message is
/// over `max`.
fn keep(bytes: &mut Vec<u8>, size: &mut u64, oversized: &mut bool, max: usize, line: &[u8]) {
    *size += line.len() as u64;
    if *size > max as u64 {
        *oversized = true;
        *bytes = Vec::new();
    }
    if !*oversized {
        bytes.extend_from_slice(line);
    }
}

/// `>From `, `>>From `...: a body line quoted by a mboxrd writer.
fn is_quoted_from(line: &[u8]) -> bool {
    let quotes = line.iter().take_while(|&&b| b == b'>').count();
    quotes > 0 && line[quotes..].starts_with(b"From ")
}

/// The envelope sender of a `From sender date` line, if it is an address
/// (`MAILER-DAEMON` and bare local names are not).
fn sender_of(from_line: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(from_line.strip_prefix(b"From ")?);
    let word = text.split_whitespace().next()?;
    Address::parse(word).ok().map(|a| a.to_string())
}

/// The messages of a Maildir++ tree to import, and the folders left out.
#[derive(Debug, Default)]
pub struct MaildirListing {
    /// Files of `new/` and `cur/` (and of the folders, when they are
    /// imported), each folder in the order of the file names (Maildir
    /// names start with the delivery time).
    pub files: Vec<PathBuf>,
    /// Sub-folders (`.Name/`) not imported, with their message counts.
    pub skipped_folders: Vec<(String, usize)>,
}

/// Lists a Maildir++ tree: the INBOX (`cur/` and `new/` of `root`) and,
/// with `all_folders`, every sub-folder `.Name/` too (the store has one
/// maildrop per user: they all go into it); without, the folders are
/// listed as skipped. `tmp/` holds deliveries in progress: never read.
pub fn maildir_listing(root: &Path, all_folders: bool) -> io::Result<MaildirListing> {
    if !root.join("cur").is_dir() && !root.join("new").is_dir() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} is not a Maildir (no cur/ nor new/)", root.display()),
        ));
    }
    let mut listing = MaildirListing { files: folder_files(root)?, ..MaildirListing::default() };
    let mut folders = Vec::new();
    for entry in std::fs::read_dir(root)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') && name != "." && name != ".." && entry.path().join("cur").is_dir() {
            folders.push((name, entry.path()));
        }
    }
    folders.sort();
    for (name, path) in folders {
        let files = folder_files(&path)?;
        if all_folders {
            listing.files.extend(files);
        } else {
            listing.skipped_folders.push((name, files.len()));
        }
    }
    Ok(listing)
}

/// The message files of one folder's `new/` and `cur/`, by name.
fn folder_files(folder: &Path) -> io::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for sub in ["new", "cur"] {
        let dir = folder.join(sub);
        if !dir.is_dir() {
            continue;
        }
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            if entry.file_type()?.is_file() && !entry.file_name().to_string_lossy().starts_with('.') {
                files.push(entry.path());
            }
        }
    }
    files.sort_by(|a, b| a.file_name().cmp(&b.file_name()));
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;
    use hamail_store::{LocalStore, StoreOptions};

    /// A reader that hands out at most `n` octets per read, to drive the
    /// parsers through every split.
    struct Trickle<'a> {
        data: &'a [u8],
        n: usize,
    }

    impl io::Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let k = self.n.min(buf.len()).min(self.data.len());
            buf[..k].copy_from_slice(&self.data[..k]);
            self.data = &self.data[k..];
            Ok(k)
        }
    }

    fn read_all(data: &[u8], chunk: usize, format: MboxFormat, max: usize) -> Vec<MboxItem> {
        let input = io::BufReader::with_capacity(chunk, Trickle { data, n: chunk });
        let mut reader = MboxReader::new(input, format);
        let mut out = Vec::new();
        while let Some(m) = reader.next_message(max).unwrap() {
            out.push(m);
        }
        out
    }

    const MBOX: &[u8] = b"From alice@example.org Mon Dec  7 10:00:00 2026\n\
Subject: one\n\
\n\
>From the start\n\
>>From quoted twice\n\
\x20From indented\n\
\n\
\n\
From MAILER-DAEMON Mon Dec  7 10:00:01 2026\r\n\
Subject: two\r\n\
\r\n\
body\xe9\r\n\
From not after a blank line\r\n\
\r\n\
From bob Mon Dec  7 10:00:02 2026\n\
Subject: three\n\
\n\
no newline at the end";

    #[test]
    fn mbox_splits_unquotes_and_keeps_bytes_in_every_chunking() {
        let want = vec![
            MboxItem::Message {
                sender: Some("alice@example.org".into()),
                bytes: b"Subject: one\n\nFrom the start\n>From quoted twice\n From indented\n\n".to_vec(),
            },
            MboxItem::Message {
                sender: None,
                bytes: b"Subject: two\r\n\r\nbody\xe9\r\nFrom not after a blank line\r\n".to_vec(),
            },
            MboxItem::Message { sender: None, bytes: b"Subject: three\n\nno newline at the end".to_vec() },
        ];
        for chunk in 1..=MBOX.len() + 1 {
            assert_eq!(read_all(MBOX, chunk, MboxFormat::Mboxrd, 1 << 20), want, "chunk {chunk}");
        }
        // mboxo: nothing unquoted.
        let items = read_all(MBOX, 7, MboxFormat::Mboxo, 1 << 20);
        assert!(
            matches!(&items[0], MboxItem::Message { bytes, .. } if bytes.starts_with(b"Subject: one\n\n>From the start\n>>From"))
        );
    }

    #[test]
    fn mbox_oversized_message_is_skipped_and_the_next_one_read() {
        let mut data = b"From a@b.test x\nSubject: big\n\n".to_vec();
        for _ in 0..100 {
            data.extend_from_slice(&[b'x'; 99]);
            data.push(b'\n');
        }
        data.extend_from_slice(b"\nFrom c@d.test y\nSubject: small\n\nok\n");
        for chunk in [1, 5, 64, 4096] {
            let items = read_all(&data, chunk, MboxFormat::Mboxrd, 1000);
            assert_eq!(items.len(), 2, "chunk {chunk}");
            assert!(matches!(&items[0], MboxItem::Oversized { size, .. } if *size == 14 + 10_000), "{:?}", items[0]);
            assert_eq!(
                items[1],
                MboxItem::Message { sender: Some("c@d.test".into()), bytes: b"Subject: small\n\nok\n".to_vec() }
            );
        }
        // Not a mbox at all.
        let mut r = MboxReader::new(&b"Subject: x\n"[..], MboxFormat::Mboxrd);
        assert_eq!(r.next_message(100).unwrap_err().kind(), io::ErrorKind::InvalidData);
        assert_eq!(MboxReader::new(&b""[..], MboxFormat::Mboxrd).next_message(100).unwrap(), None);
    }

    fn normalised(store: &LocalStore, input: &[u8], chunk: usize) -> (Vec<u8>, Option<ReturnPath>) {
        let mut m = MessageBody::new(store.spool(16));
        for piece in input.chunks(chunk) {
            m.append(piece).unwrap();
        }
        let size = m.size();
        let (body, rp) = m.finish().unwrap();
        let bytes = match body {
            Body::Bytes(b) => b.to_vec(),
            Body::Staged(f) => std::fs::read(f.path()).unwrap(),
        };
        assert!(size <= bytes.len() as u64);
        (bytes, rp)
    }

    #[test]
    fn message_body_makes_crlf_and_takes_the_return_path_in_every_chunking() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(dir.path(), StoreOptions { fsync: false, ..StoreOptions::default() }).unwrap();
        let cases: [(&[u8], &[u8], Option<ReturnPath>); 5] = [
            (
                b"Return-Path: <a@b.test>\nSubject: x\n\nbody\n",
                b"Subject: x\r\n\r\nbody\r\n",
                Some(Some("a@b.test".into())),
            ),
            (b"return-path:<>\r\nSubject: y\r\n\r\nno end", b"Subject: y\r\n\r\nno end\r\n", Some(None)),
            (b"Subject: z\n\nmixed\r\nends\nlone\rcr\n", b"Subject: z\r\n\r\nmixed\r\nends\r\nlone\rcr\r\n", None),
            (b"Return-Path: <a@b.test> trailing\nS: 1\n", b"Return-Path: <a@b.test> trailing\r\nS: 1\r\n", None),
            (b"ends with cr\r", b"ends with cr\r\n", None),
        ];
        for (input, want, rp) in cases {
            for chunk in 1..=input.len() {
                let (got, got_rp) = normalised(&store, input, chunk);
                assert_eq!(got, want, "{:?} chunk {chunk}", String::from_utf8_lossy(input));
                assert_eq!(got_rp, rp);
            }
        }
        // A first line too long to be a Return-Path line is kept whole.
        let long = [b"X-Long: ".as_slice(), &[b'a'; 3000], b"\nb\n"].concat();
        let (got, rp) = normalised(&store, &long, 100);
        assert_eq!(got, [&long[..3008], b"\r\nb\r\n"].concat());
        assert_eq!(rp, None);
    }

    #[test]
    fn user_lines_tell_hashes_from_clear_passwords() {
        let sha = "$6$saltsalt$hRM5XZ86KXEw9UOmjigeVqFgULtFB2sgpC9lXQDfMib3Zgw7mEiUvBJI2EplzfAqxL5Vvwp2scFtv/uamSo5z0";
        let line = |l: &str| parse_user_line(l);
        assert_eq!(line("  # comment").unwrap(), None);
        assert_eq!(line("   ").unwrap(), None);
        let u = line(&format!("a@b.test\t{sha}")).unwrap().unwrap();
        assert_eq!((u.user.as_str(), u.secret), ("a@b.test", Secret::Hash(sha.into())));
        let u = line(&format!("a@b.test {{SHA512-CRYPT}}{sha}")).unwrap().unwrap();
        assert_eq!(u.secret, Secret::Hash(sha.into()));
        assert_eq!(line("a@b.test  two words ").unwrap().unwrap().secret, Secret::Password("two words".into()));
        assert_eq!(line("a@b.test {PLAIN}$1$x").unwrap().unwrap().secret, Secret::Password("$1$x".into()));
        assert!(line("a@b.test $1$saltsalt$abcdefghijklmnopqrstuv").unwrap_err().contains("unsupported scheme"));
        assert!(line("a@b.test $6$saltsalt$short").unwrap_err().contains("86 characters"));
        assert!(line("a@b.test !$6$x$y").unwrap_err().contains("locked"));
        assert!(line("a@b.test *").unwrap_err().contains("locked"));
        assert!(line("a@b.test").unwrap_err().contains("no password"));
        assert!(line("not-an-address pw").unwrap_err().contains("not-an-address"));
        assert!(line("a@b.test {MD5}x").unwrap_err().contains("unsupported password scheme"));
    }
}
