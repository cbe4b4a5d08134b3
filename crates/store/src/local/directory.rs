//! The [`Directory`] of a [`LocalStore`]: domains, users, aliases.
//!
//! Why here: the directory lives in the same redb file as the mail, so that
//! removing a user and its maildrop is one atomic commit. Password hashing
//! is argon2 (slow on purpose) and runs on blocking threads; verification of
//! an unknown user still spends the time of one verification, so that the
//! answer time does not tell whether an account exists.

use crate::password::Passwords;
use redb::{ReadOnlyTable, ReadableTable, WriteTransaction};

use super::{blocking, Inner, LocalStore};
use crate::tables::{
    db_err, decode, encode, unix_now, UserRecord, ALIASES, CONSENSUS, CONSENSUS_APPLIED, DOMAINS, MAILBOX, USERS,
};
use crate::{
    Address, BodyHash, Directory, DirectoryChange, DirectorySnapshot, Domain, MailboxEntry, Resolution, StoreError,
    StoreResult, UserInfo,
};

/// How many aliases deep an expansion may go before it is cut off.
const MAX_ALIAS_DEPTH: usize = 8;

fn check_new_password(password: &str) -> StoreResult<()> {
    if password.is_empty() {
        return Err(StoreError::Permanent("the password must not be empty".into()));
    }
    Ok(())
}

/// The directory tables of one read transaction, with the resolution rules.
struct Resolver<'a> {
    domains: ReadOnlyTable<&'static str, ()>,
    users: ReadOnlyTable<&'static str, &'static [u8]>,
    aliases: ReadOnlyTable<&'static str, &'static [u8]>,
    hostnames: &'a [Domain],
    postmaster: Option<&'a Address>,
}

/// What one address found in the directory is.
enum Found {
    User(Address),
    Alias(Address, Vec<Address>),
}

#[derive(Default)]
struct Expansion {
    local: Vec<Address>,
    remote: Vec<Address>,
    /// An alias was reached again through itself, or the chain too deep.
    cut: bool,
}

fn push_unique(v: &mut Vec<Address>, a: Address) {
    if !v.contains(&a) {
        v.push(a);
    }
}

impl<'a> Resolver<'a> {
    fn new(inner: &'a Inner, txn: &redb::ReadTransaction) -> StoreResult<Self> {
        Ok(Resolver {
            domains: txn.open_table(DOMAINS).map_err(|e| db_err("opening domains", e))?,
            users: txn.open_table(USERS).map_err(|e| db_err("opening users", e))?,
            aliases: txn.open_table(ALIASES).map_err(|e| db_err("opening aliases", e))?,
            hostnames: &inner.options.hostnames,
            postmaster: inner.options.postmaster.as_ref(),
        })
    }

    fn is_domain(&self, d: &str) -> StoreResult<bool> {
        Ok(self.domains.get(d).map_err(|e| db_err("reading domains", e))?.is_some())
    }

    fn is_hostname(&self, d: &str) -> bool {
        self.hostnames.iter().any(|h| h.as_str() == d)
    }

    fn is_local(&self, d: &str) -> StoreResult<bool> {
        Ok(self.is_hostname(d) || self.is_domain(d)?)
    }

    /// Configured domains in name order (redb keeps keys sorted).
    fn domain_list(&self) -> StoreResult<Vec<String>> {
        let mut out = Vec::new();
        for row in self.domains.iter().map_err(|e| db_err("reading domains", e))? {
            let (k, _) = row.map_err(|e| db_err("reading domains", e))?;
            out.push(k.value().to_string());
        }
        Ok(out)
    }

    /// Exactly this address as a user or an alias.
    fn exact(&self, addr: &str) -> StoreResult<Option<Found>> {
        let a = || Address::parse(addr);
        if self.users.get(addr).map_err(|e| db_err("reading users", e))?.is_some() {
            return Ok(Some(Found::User(a()?)));
        }
        if let Some(v) = self.aliases.get(addr).map_err(|e| db_err("reading aliases", e))? {
            let targets: Vec<Address> = decode("alias targets", v.value())?;
            return Ok(Some(Found::Alias(a()?, targets)));
        }
        Ok(None)
    }

    /// The user or alias `addr` (in a local domain or a host name) means.
    fn lookup(&self, addr: &Address) -> StoreResult<Option<Found>> {
        let local = addr.local_part();
        if self.is_domain(addr.domain())? {
            if let Some(f) = self.exact(addr.as_str())? {
                return Ok(Some(f));
            }
        } else if self.is_hostname(addr.domain()) {
            // The hostname rule: x@hostname is x@d for the first configured
            // domain d (in name order) that has an x.
            for d in self.domain_list()? {
                if let Some(f) = self.exact(&format!("{local}@{d}"))? {
                    return Ok(Some(f));
                }
            }
        } else {
            return Ok(None);
        }
        // RFC 5321 4.5.1: every domain we accept mail for must accept
        // postmaster. When this domain has none, the configured server
        // postmaster stands in, if there is one. Only for postmaster: there
        // is no catch-all for any other local part.
        match self.postmaster {
            Some(pm) if local.eq_ignore_ascii_case("postmaster") => self.exact(pm.as_str()),
            _ => Ok(None),
        }
    }

    fn expand(&self, addr: &Address, depth: usize, path: &mut Vec<Address>, out: &mut Expansion) -> StoreResult<bool> {
        match self.lookup(addr)? {
            None => Ok(false),
            Some(Found::User(u)) => {
                push_unique(&mut out.local, u);
                Ok(true)
            }
            Some(Found::Alias(a, targets)) => {
                if path.contains(&a) {
                    tracing::warn!(alias = %a, "alias loop detected; that branch is ignored");
                    out.cut = true;
                    return Ok(false);
                }
                if depth >= MAX_ALIAS_DEPTH {
                    tracing::warn!(alias = %a, "aliases nested too deep; that branch is ignored");
                    out.cut = true;
                    return Ok(false);
                }
                path.push(a.clone());
                for t in targets {
                    if self.is_local(t.domain())? {
                        if !self.expand(&t, depth + 1, path, out)? {
                            tracing::warn!(alias = %a, target = %t, "alias target is not a user or alias; skipped");
                        }
                    } else {
                        push_unique(&mut out.remote, t);
                    }
                }
                path.pop();
                Ok(true)
            }
        }
    }

    fn resolve(&self, rcpt: &Address) -> StoreResult<Resolution> {
        if !self.is_local(rcpt.domain())? {
            return Ok(Resolution::Remote);
        }
        let mut out = Expansion::default();
        if !self.expand(rcpt, 0, &mut Vec::new(), &mut out)? {
            return Ok(Resolution::UnknownUser);
        }
        match (out.local.is_empty(), out.remote.is_empty()) {
            (true, true) if out.cut => {
                Err(StoreError::Permanent(format!("{rcpt}: alias loop or aliases nested too deep")))
            }
            (true, true) => Ok(Resolution::UnknownUser),
            (_, true) => Ok(Resolution::Local(out.local)),
            _ => Ok(Resolution::Mixed { local: out.local, remote: out.remote }),
        }
    }
}

impl Inner {
    /// Applies one change inside `txn`. A refusal (`Permanent`) is
    /// decided before anything is written, so the transaction stays usable
    /// for the other changes of a batch. Returns bodies freed by it.
    pub(crate) fn apply_change(&self, txn: &WriteTransaction, change: &DirectoryChange) -> StoreResult<Vec<BodyHash>> {
        match change {
            DirectoryChange::AddDomain { domain } => self.add_domain(txn, domain).map(|()| Vec::new()),
            DirectoryChange::RemoveDomain { domain } => self.remove_domain(txn, domain).map(|()| Vec::new()),
            DirectoryChange::AddUser { user, password_hash, created_at } => {
                self.put_user(txn, user, password_hash.clone(), Some(*created_at)).map(|()| Vec::new())
            }
            DirectoryChange::SetPassword { user, password_hash } => {
                self.put_user(txn, user, password_hash.clone(), None).map(|()| Vec::new())
            }
            DirectoryChange::RemoveUser { user } => self.remove_user(txn, user),
            DirectoryChange::AddAlias { alias, targets } => self.add_alias(txn, alias, targets).map(|()| Vec::new()),
            DirectoryChange::RemoveAlias { alias } => self.remove_alias(txn, alias).map(|()| Vec::new()),
        }
    }

    /// Applies a batch of changes in one commit, with the consensus state
    /// (opaque to the store: the cluster's last applied log id) saved in the
    /// same commit, so the two can never disagree after a crash.
    pub(crate) fn apply_changes(
        &self,
        changes: &[DirectoryChange],
        consensus_state: Option<&[u8]>,
    ) -> StoreResult<Vec<StoreResult<()>>> {
        let txn = self.begin_write()?;
        let mut results = Vec::with_capacity(changes.len());
        let mut freed = Vec::new();
        for change in changes {
            match self.apply_change(&txn, change) {
                Ok(f) => {
                    freed.extend(f);
                    results.push(Ok(()));
                }
                Err(e @ StoreError::Permanent(_)) => results.push(Err(e)),
                Err(e) => return Err(e),
            }
        }
        if let Some(state) = consensus_state {
            let mut t = txn.open_table(CONSENSUS).map_err(|e| db_err("opening consensus", e))?;
            t.insert(CONSENSUS_APPLIED, state).map_err(|e| db_err("writing consensus state", e))?;
        }
        txn.commit().map_err(|e| db_err("committing directory changes", e))?;
        self.unlink_freed(&freed);
        Ok(results)
    }

    pub(crate) fn consensus_state(&self) -> StoreResult<Option<Vec<u8>>> {
        let txn = self.db.begin_read().map_err(|e| db_err("beginning read", e))?;
        let t = match txn.open_table(CONSENSUS) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(db_err("opening consensus", e)),
        };
        let v = t.get(CONSENSUS_APPLIED).map_err(|e| db_err("reading consensus state", e))?.map(|g| g.value().to_vec());
        Ok(v)
    }

    /// The whole directory, for a consensus snapshot.
    pub(crate) fn export_directory(&self) -> StoreResult<DirectorySnapshot> {
        let txn = self.db.begin_read().map_err(|e| db_err("beginning read", e))?;
        Self::export_directory_in(&txn)
    }

    /// [`Self::export_directory`] as `txn` sees it.
    pub(crate) fn export_directory_in(txn: &redb::ReadTransaction) -> StoreResult<DirectorySnapshot> {
        let mut snap = DirectorySnapshot::default();
        {
            let t = txn.open_table(DOMAINS).map_err(|e| db_err("opening domains", e))?;
            for row in t.iter().map_err(|e| db_err("reading domains", e))? {
                let (k, _) = row.map_err(|e| db_err("reading domains", e))?;
                snap.domains.push(Domain::parse(k.value())?);
            }
        }
        {
            let t = txn.open_table(USERS).map_err(|e| db_err("opening users", e))?;
            for row in t.iter().map_err(|e| db_err("reading users", e))? {
                let (k, v) = row.map_err(|e| db_err("reading users", e))?;
                let rec: UserRecord = decode("user record", v.value())?;
                snap.users.push((Address::parse(k.value())?, rec.password_hash, rec.created_at));
            }
        }
        snap.aliases = Self::aliases_in(txn)?;
        Ok(snap)
    }

    /// Replaces the directory with a snapshot (a node catching up). Users
    /// that the snapshot no longer has lose their maildrop, as if their
    /// removal had been applied.
    pub(crate) fn import_directory(&self, snap: &DirectorySnapshot, consensus_state: &[u8]) -> StoreResult<()> {
        let txn = self.begin_write()?;
        let mut freed = Vec::new();
        {
            let keep: std::collections::HashSet<&str> = snap.users.iter().map(|(u, _, _)| u.as_str()).collect();
            let old_users: Vec<String> = {
                let t = txn.open_table(USERS).map_err(|e| db_err("opening users", e))?;
                let mut v = Vec::new();
                for row in t.iter().map_err(|e| db_err("reading users", e))? {
                    v.push(row.map_err(|e| db_err("reading users", e))?.0.value().to_string());
                }
                v
            };
            for old in old_users.iter().filter(|u| !keep.contains(u.as_str())) {
                freed.extend(self.remove_entries(&txn, &Address::parse(old)?, None)?);
            }
            let mut domains = txn.open_table(DOMAINS).map_err(|e| db_err("opening domains", e))?;
            domains.retain(|_, _| false).map_err(|e| db_err("clearing domains", e))?;
            for d in &snap.domains {
                domains.insert(d.as_str(), ()).map_err(|e| db_err("writing domains", e))?;
            }
            let mut users = txn.open_table(USERS).map_err(|e| db_err("opening users", e))?;
            users.retain(|_, _| false).map_err(|e| db_err("clearing users", e))?;
            for (u, hash, created_at) in &snap.users {
                let rec = UserRecord { password_hash: hash.clone(), created_at: *created_at };
                users
                    .insert(u.as_str(), encode("user record", &rec)?.as_slice())
                    .map_err(|e| db_err("writing users", e))?;
            }
            let mut aliases = txn.open_table(ALIASES).map_err(|e| db_err("opening aliases", e))?;
            aliases.retain(|_, _| false).map_err(|e| db_err("clearing aliases", e))?;
            for (a, targets) in &snap.aliases {
                aliases
                    .insert(a.as_str(), encode("alias targets", targets)?.as_slice())
                    .map_err(|e| db_err("writing aliases", e))?;
            }
            let mut t = txn.open_table(CONSENSUS).map_err(|e| db_err("opening consensus", e))?;
            t.insert(CONSENSUS_APPLIED, consensus_state).map_err(|e| db_err("writing consensus state", e))?;
        }
        txn.commit().map_err(|e| db_err("committing snapshot", e))?;
        self.unlink_freed(&freed);
        Ok(())
    }

    fn add_domain(&self, txn: &WriteTransaction, domain: &Domain) -> StoreResult<()> {
        let mut t = txn.open_table(DOMAINS).map_err(|e| db_err("opening domains", e))?;
        if t.get(domain.as_str()).map_err(|e| db_err("reading domains", e))?.is_some() {
            return Err(StoreError::Permanent(format!("domain {domain} already exists")));
        }
        t.insert(domain.as_str(), ()).map_err(|e| db_err("writing domains", e))?;
        Ok(())
    }

    fn remove_domain(&self, txn: &WriteTransaction, domain: &Domain) -> StoreResult<()> {
        let suffix = format!("@{}", domain.as_str());
        {
            let users = txn.open_table(USERS).map_err(|e| db_err("opening users", e))?;
            let aliases = txn.open_table(ALIASES).map_err(|e| db_err("opening aliases", e))?;
            let count = |t: &redb::Table<&'static str, &'static [u8]>| -> StoreResult<usize> {
                let mut n = 0;
                for row in t.iter().map_err(|e| db_err("reading directory", e))? {
                    let (k, _) = row.map_err(|e| db_err("reading directory", e))?;
                    n += usize::from(k.value().ends_with(&suffix));
                }
                Ok(n)
            };
            let (u, a) = (count(&users)?, count(&aliases)?);
            if u + a > 0 {
                return Err(StoreError::Permanent(format!(
                    "domain {domain} still has {u} user(s) and {a} alias(es); remove them first"
                )));
            }
            let mut t = txn.open_table(DOMAINS).map_err(|e| db_err("opening domains", e))?;
            if t.remove(domain.as_str()).map_err(|e| db_err("writing domains", e))?.is_none() {
                return Err(StoreError::Permanent(format!("no domain {domain}")));
            }
        }
        Ok(())
    }

    fn domains(&self) -> StoreResult<Vec<Domain>> {
        let txn = self.db.begin_read().map_err(|e| db_err("beginning read", e))?;
        let t = txn.open_table(DOMAINS).map_err(|e| db_err("opening domains", e))?;
        let mut out = Vec::new();
        for row in t.iter().map_err(|e| db_err("reading domains", e))? {
            let (k, _) = row.map_err(|e| db_err("reading domains", e))?;
            out.push(Domain::parse(k.value())?);
        }
        Ok(out)
    }

    /// Inserts (`created_at` given) or replaces (`None`) a user record.
    fn put_user(
        &self,
        txn: &WriteTransaction,
        user: &Address,
        password_hash: String,
        created_at: Option<u64>,
    ) -> StoreResult<()> {
        let new = created_at.is_some();
        {
            let domains = txn.open_table(DOMAINS).map_err(|e| db_err("opening domains", e))?;
            let aliases = txn.open_table(ALIASES).map_err(|e| db_err("opening aliases", e))?;
            let mut users = txn.open_table(USERS).map_err(|e| db_err("opening users", e))?;
            let existing: Option<UserRecord> = match users.get(user.as_str()).map_err(|e| db_err("reading users", e))? {
                Some(v) => Some(decode("user record", v.value())?),
                None => None,
            };
            let created_at = match (new, existing) {
                (true, Some(_)) => return Err(StoreError::Permanent(format!("user {user} already exists"))),
                (false, None) => return Err(StoreError::Permanent(format!("no user {user}"))),
                (false, Some(rec)) => rec.created_at,
                (true, None) => {
                    if domains.get(user.domain()).map_err(|e| db_err("reading domains", e))?.is_none() {
                        return Err(StoreError::Permanent(format!(
                            "{} is not a configured domain; add it first",
                            user.domain()
                        )));
                    }
                    if aliases.get(user.as_str()).map_err(|e| db_err("reading aliases", e))?.is_some() {
                        return Err(StoreError::Permanent(format!("{user} is already an alias")));
                    }
                    created_at.unwrap_or_default()
                }
            };
            let rec = UserRecord { password_hash, created_at };
            users
                .insert(user.as_str(), encode("user record", &rec)?.as_slice())
                .map_err(|e| db_err("writing users", e))?;
        }
        Ok(())
    }

    fn user_record(&self, user: &Address) -> StoreResult<Option<UserRecord>> {
        let txn = self.db.begin_read().map_err(|e| db_err("beginning read", e))?;
        let users = txn.open_table(USERS).map_err(|e| db_err("opening users", e))?;
        let rec = match users.get(user.as_str()).map_err(|e| db_err("reading users", e))? {
            Some(v) => Some(decode("user record", v.value())?),
            None => None,
        };
        Ok(rec)
    }

    fn remove_user(&self, txn: &WriteTransaction, user: &Address) -> StoreResult<Vec<BodyHash>> {
        {
            let mut users = txn.open_table(USERS).map_err(|e| db_err("opening users", e))?;
            if users.remove(user.as_str()).map_err(|e| db_err("writing users", e))?.is_none() {
                return Err(StoreError::Permanent(format!("no user {user}")));
            }
        }
        // The maildrop goes in the same commit: no mail of a removed user
        // can show up for a later user of the same name.
        self.remove_entries(txn, user, None)
    }

    fn users(&self) -> StoreResult<Vec<UserInfo>> {
        let txn = self.db.begin_read().map_err(|e| db_err("beginning read", e))?;
        let users = txn.open_table(USERS).map_err(|e| db_err("opening users", e))?;
        let mailbox = txn.open_table(MAILBOX).map_err(|e| db_err("opening mailbox", e))?;
        let mut out = Vec::new();
        for row in users.iter().map_err(|e| db_err("reading users", e))? {
            let (k, v) = row.map_err(|e| db_err("reading users", e))?;
            let rec: UserRecord = decode("user record", v.value())?;
            let name = k.value();
            let (mut messages, mut bytes) = (0u64, 0u64);
            for row in mailbox.range((name, 0u64)..=(name, u64::MAX)).map_err(|e| db_err("reading mailbox", e))? {
                let (_, v) = row.map_err(|e| db_err("reading mailbox", e))?;
                let entry: MailboxEntry = decode("mailbox entry", v.value())?;
                messages += 1;
                bytes += entry.size;
            }
            out.push(UserInfo { address: Address::parse(name)?, created_at: rec.created_at, messages, bytes });
        }
        Ok(out)
    }

    fn add_alias(&self, txn: &WriteTransaction, alias: &Address, targets: &[Address]) -> StoreResult<()> {
        if targets.is_empty() {
            return Err(StoreError::Permanent(format!("alias {alias} needs at least one target")));
        }
        if targets.contains(alias) {
            return Err(StoreError::Permanent(format!("alias {alias} cannot point to itself")));
        }
        {
            let domains = txn.open_table(DOMAINS).map_err(|e| db_err("opening domains", e))?;
            let users = txn.open_table(USERS).map_err(|e| db_err("opening users", e))?;
            let mut aliases = txn.open_table(ALIASES).map_err(|e| db_err("opening aliases", e))?;
            if domains.get(alias.domain()).map_err(|e| db_err("reading domains", e))?.is_none() {
                return Err(StoreError::Permanent(format!(
                    "{} is not a configured domain; add it first",
                    alias.domain()
                )));
            }
            if users.get(alias.as_str()).map_err(|e| db_err("reading users", e))?.is_some() {
                return Err(StoreError::Permanent(format!("{alias} is already a user")));
            }
            if aliases.get(alias.as_str()).map_err(|e| db_err("reading aliases", e))?.is_some() {
                return Err(StoreError::Permanent(format!("alias {alias} already exists")));
            }
            let targets = super::dedup(targets.to_vec());
            aliases
                .insert(alias.as_str(), encode("alias targets", &targets)?.as_slice())
                .map_err(|e| db_err("writing aliases", e))?;
        }
        Ok(())
    }

    fn remove_alias(&self, txn: &WriteTransaction, alias: &Address) -> StoreResult<()> {
        let mut aliases = txn.open_table(ALIASES).map_err(|e| db_err("opening aliases", e))?;
        if aliases.get(alias.as_str()).map_err(|e| db_err("reading aliases", e))?.is_none() {
            return Err(StoreError::Permanent(format!("no alias {alias}")));
        }
        aliases.remove(alias.as_str()).map_err(|e| db_err("writing aliases", e))?;
        Ok(())
    }

    fn aliases(&self) -> StoreResult<Vec<(Address, Vec<Address>)>> {
        let txn = self.db.begin_read().map_err(|e| db_err("beginning read", e))?;
        Self::aliases_in(&txn)
    }

    fn aliases_in(txn: &redb::ReadTransaction) -> StoreResult<Vec<(Address, Vec<Address>)>> {
        let t = txn.open_table(ALIASES).map_err(|e| db_err("opening aliases", e))?;
        let mut out = Vec::new();
        for row in t.iter().map_err(|e| db_err("reading aliases", e))? {
            let (k, v) = row.map_err(|e| db_err("reading aliases", e))?;
            out.push((Address::parse(k.value())?, decode("alias targets", v.value())?));
        }
        Ok(out)
    }

    fn resolve(&self, rcpt: &Address) -> StoreResult<Resolution> {
        let txn = self.db.begin_read().map_err(|e| db_err("beginning read", e))?;
        Resolver::new(self, &txn)?.resolve(rcpt)
    }
}

/// The directory as a state machine: changes decided elsewhere (a Raft log)
/// are applied here in order, with the consensus state in the same commit.
impl LocalStore {
    /// Applies `changes` in one commit; each gets its own result (a refusal
    /// such as "user exists" does not stop the others). `consensus_state`,
    /// if given, is saved in the same commit.
    pub async fn apply_directory(
        &self,
        changes: Vec<DirectoryChange>,
        consensus_state: Option<Vec<u8>>,
    ) -> StoreResult<Vec<StoreResult<()>>> {
        let inner = self.inner().clone();
        blocking(move || inner.apply_changes(&changes, consensus_state.as_deref())).await
    }

    /// The consensus state saved by the last [`Self::apply_directory`] or
    /// [`Self::import_directory`].
    pub async fn consensus_state(&self) -> StoreResult<Option<Vec<u8>>> {
        let inner = self.inner().clone();
        blocking(move || inner.consensus_state()).await
    }

    pub async fn export_directory(&self) -> StoreResult<DirectorySnapshot> {
        let inner = self.inner().clone();
        blocking(move || inner.export_directory()).await
    }

    /// Replaces the whole directory (and drops the maildrops of users the
    /// snapshot does not have), saving `consensus_state` in the same commit.
    pub async fn import_directory(&self, snapshot: DirectorySnapshot, consensus_state: Vec<u8>) -> StoreResult<()> {
        let inner = self.inner().clone();
        blocking(move || inner.import_directory(&snapshot, &consensus_state)).await
    }

    /// The stored password hash of a user (for a proposer that checks a
    /// password against the replicated state).
    pub async fn password_hash(&self, user: &Address) -> StoreResult<Option<String>> {
        let (inner, user) = (self.inner().clone(), user.clone());
        Ok(blocking(move || inner.user_record(&user)).await?.map(|r| r.password_hash))
    }

    async fn apply_one(&self, change: DirectoryChange) -> StoreResult<()> {
        self.apply_directory(vec![change], None)
            .await?
            .pop()
            .unwrap_or_else(|| Err(StoreError::Internal("no result for a directory change".into())))
    }
}

#[async_trait::async_trait]
impl Directory for LocalStore {
    async fn add_domain(&self, domain: &Domain) -> StoreResult<()> {
        self.apply_one(DirectoryChange::AddDomain { domain: domain.clone() }).await
    }

    async fn remove_domain(&self, domain: &Domain) -> StoreResult<()> {
        self.apply_one(DirectoryChange::RemoveDomain { domain: domain.clone() }).await
    }

    async fn domains(&self) -> StoreResult<Vec<Domain>> {
        let inner = self.inner().clone();
        blocking(move || inner.domains()).await
    }

    async fn add_user(&self, user: &Address, password: &str) -> StoreResult<()> {
        check_new_password(password)?;
        let password_hash = Passwords::global().hash(password).await?;
        self.apply_one(DirectoryChange::AddUser { user: user.clone(), password_hash, created_at: unix_now() }).await
    }

    async fn set_password(&self, user: &Address, password: &str) -> StoreResult<()> {
        check_new_password(password)?;
        let password_hash = Passwords::global().hash(password).await?;
        self.apply_one(DirectoryChange::SetPassword { user: user.clone(), password_hash }).await
    }

    async fn remove_user(&self, user: &Address) -> StoreResult<()> {
        self.apply_one(DirectoryChange::RemoveUser { user: user.clone() }).await
    }

    async fn users(&self) -> StoreResult<Vec<UserInfo>> {
        let inner = self.inner().clone();
        blocking(move || inner.users()).await
    }

    async fn apply_batch(&self, changes: Vec<DirectoryChange>) -> StoreResult<Vec<StoreResult<()>>> {
        self.apply_directory(changes, None).await
    }

    async fn verify_password(&self, user: &Address, password: &str) -> StoreResult<bool> {
        let (inner, u) = (self.inner().clone(), user.clone());
        let passwords = Passwords::global();
        match blocking(move || inner.user_record(&u)).await? {
            Some(rec) => passwords.check(&rec.password_hash, password).await,
            None => {
                // Same work as for a real user, same answer as a wrong
                // password.
                let _ = passwords.check_uncached(passwords.dummy_hash().await?, password).await?;
                Ok(false)
            }
        }
    }

    async fn add_alias(&self, alias: &Address, targets: &[Address]) -> StoreResult<()> {
        self.apply_one(DirectoryChange::AddAlias { alias: alias.clone(), targets: targets.to_vec() }).await
    }

    async fn remove_alias(&self, alias: &Address) -> StoreResult<()> {
        self.apply_one(DirectoryChange::RemoveAlias { alias: alias.clone() }).await
    }

    async fn aliases(&self) -> StoreResult<Vec<(Address, Vec<Address>)>> {
        let inner = self.inner().clone();
        blocking(move || inner.aliases()).await
    }

    async fn resolve(&self, rcpt: &Address) -> StoreResult<Resolution> {
        let (inner, rcpt) = (self.inner().clone(), rcpt.clone());
        blocking(move || inner.resolve(&rcpt)).await
    }
}
