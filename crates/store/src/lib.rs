//! hamail-store: the crash-safe mail store, the outbound queue and the user
//! directory of one node.
//!
//! Role: keep every message that was acknowledged with `250` (SMTP) whole and
//! exactly once in each of its recipients' maildrops, and keep the users,
//! domains and aliases. Bodies are content-addressed files (SHA-256), written
//! to `tmp/` as they arrive (a [`Spool`]: never a large message whole in
//! memory), fsynced and renamed into `bodies/` (Postfix's "commit = fsync
//! then rename"), and read back as files ([`MailStore::open_body`]); the metadata (mailbox entries, queue entries, reference
//! counts, users) lives in redb and is committed after the body is durable.
//! Only a successful metadata commit produces a [`Committed`] value, and only
//! a `Committed` lets the SMTP session answer `250` to DATA.
//!
//! What it does not do: speak any protocol, replicate anything (a replicated
//! backend implements the same [`MailStore`] and [`Directory`] traits in a
//! higher crate), or deliver mail to other hosts (it only keeps the queue).

mod error;
mod local;
pub mod password;
mod spool;
mod tables;
mod types;

pub use error::{StoreError, StoreResult};
pub use local::{BodyPin, GarbageReport, LocalStore, RecoveryReport, StoreOptions};
pub use local::{StateSnapshot, StateView, VerifyReport, MESSAGE_RETENTION_SECS};
pub use spool::{Body, Spool, StagedFile};
pub use types::*;
