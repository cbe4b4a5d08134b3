//! The cluster's user directory: [`Directory`] through Raft.
//!
//! Role: give SMTP, POP3 and the CLI the same `Directory` they use on a
//! single node, but with one replicated user database. Changes become
//! [`Command`]s proposed through [`ClusterNode::write`]; the password is
//! hashed (argon2) by the proposing node, so that every node applies the
//! same hash (the log must be deterministic). Administrative reads and
//! logins first make the local copy linearizable
//! ([`ClusterNode::linearizable`]): a password changed a moment ago is the
//! one checked. Recipient resolution reads the local copy directly: it is
//! at most a few heartbeats stale, and it runs for every RCPT TO.

use std::sync::Arc;

use hamail_store::password::Passwords;
use hamail_store::{Address, Directory, DirectoryChange, Domain, Resolution, StoreError, StoreResult, UserInfo};

use crate::node::{store_error, ClusterNode};
use crate::types::{Command, CommandResult};

/// [`Directory`] of a cluster node. See the module documentation.
#[derive(Clone)]
pub struct ReplicatedDirectory {
    node: Arc<ClusterNode>,
}

impl ReplicatedDirectory {
    pub fn new(node: Arc<ClusterNode>) -> Self {
        ReplicatedDirectory { node }
    }

    async fn propose(&self, cmd: Command) -> StoreResult<()> {
        match self.node.write(cmd).await {
            Ok(CommandResult::Done) | Ok(CommandResult::NodeId(_)) | Ok(CommandResult::Each(_)) => Ok(()),
            Ok(CommandResult::Refused(msg)) => Err(StoreError::Permanent(msg)),
            Err(e) => Err(store_error(e)),
        }
    }

    async fn read_barrier(&self) -> StoreResult<()> {
        self.node.linearizable().await.map_err(store_error)
    }
}

fn check_new_password(password: &str) -> StoreResult<()> {
    if password.is_empty() {
        return Err(StoreError::Permanent("the password must not be empty".into()));
    }
    Ok(())
}

fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

#[async_trait::async_trait]
impl Directory for ReplicatedDirectory {
    async fn add_domain(&self, domain: &Domain) -> StoreResult<()> {
        self.propose(Command::AddDomain { domain: domain.clone() }).await
    }

    async fn remove_domain(&self, domain: &Domain) -> StoreResult<()> {
        self.propose(Command::RemoveDomain { domain: domain.clone() }).await
    }

    async fn domains(&self) -> StoreResult<Vec<Domain>> {
        self.read_barrier().await?;
        self.node.store().domains().await
    }

    async fn add_user(&self, user: &Address, password: &str) -> StoreResult<()> {
        check_new_password(password)?;
        let password_hash = Passwords::global().hash(password).await?;
        self.propose(Command::AddUser { user: user.clone(), password_hash, at: unix_now() }).await
    }

    async fn set_password(&self, user: &Address, password: &str) -> StoreResult<()> {
        check_new_password(password)?;
        let password_hash = Passwords::global().hash(password).await?;
        self.propose(Command::SetPassword { user: user.clone(), password_hash }).await
    }

    async fn remove_user(&self, user: &Address) -> StoreResult<()> {
        self.propose(Command::RemoveUser { user: user.clone() }).await
    }

    async fn users(&self) -> StoreResult<Vec<UserInfo>> {
        self.read_barrier().await?;
        self.node.store().users().await
    }

    async fn apply_batch(&self, changes: Vec<DirectoryChange>) -> StoreResult<Vec<StoreResult<()>>> {
        let n = changes.len();
        match self.node.write(Command::Directory { changes }).await {
            Ok(CommandResult::Each(each)) if each.len() == n => {
                Ok(each.into_iter().map(|r| r.map_or(Ok(()), |msg| Err(StoreError::Permanent(msg)))).collect())
            }
            Ok(CommandResult::Refused(msg)) => Err(StoreError::Permanent(msg)),
            Ok(other) => Err(StoreError::Internal(format!("a directory batch of {n} was answered {other:?}"))),
            Err(e) => Err(store_error(e)),
        }
    }

    async fn verify_password(&self, user: &Address, password: &str) -> StoreResult<bool> {
        self.node.bounded(&format!("the login of {user}"), self.read_barrier()).await?;
        self.node.store().verify_password(user, password).await
    }

    async fn add_alias(&self, alias: &Address, targets: &[Address]) -> StoreResult<()> {
        self.propose(Command::AddAlias { alias: alias.clone(), targets: targets.to_vec() }).await
    }

    async fn remove_alias(&self, alias: &Address) -> StoreResult<()> {
        self.propose(Command::RemoveAlias { alias: alias.clone() }).await
    }

    async fn aliases(&self) -> StoreResult<Vec<(Address, Vec<Address>)>> {
        self.read_barrier().await?;
        self.node.store().aliases().await
    }

    async fn resolve(&self, rcpt: &Address) -> StoreResult<Resolution> {
        self.node.store().resolve(rcpt).await
    }
}
