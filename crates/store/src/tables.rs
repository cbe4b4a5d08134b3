//! The layout of `meta.redb` and the (de)serialisation of its records.
//!
//! Why a separate module: every reader and writer of the metadata (the
//! committer, recovery, the directory) must agree on table names, key
//! shapes and record encodings; keeping them in one place makes a schema
//! change one edit, and keeps redb error mapping uniform.

use redb::TableDefinition;
use serde::{de::DeserializeOwned, Deserialize, Serialize};

use crate::StoreError;

/// Counters and the schema version.
pub(crate) const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// `(user, entry id)` → postcard [`crate::MailboxEntry`]. Entry ids grow
/// monotonically, so key order within one user is arrival order.
pub(crate) const MAILBOX: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("mailbox");
/// body hash → number of references (mailbox entries + queue entries).
pub(crate) const BODIES: TableDefinition<&[u8; 32], u64> = TableDefinition::new("bodies");
/// queue id → postcard [`crate::QueueEntry`].
pub(crate) const QUEUE: TableDefinition<u64, &[u8]> = TableDefinition::new("queue");
/// queue id → postcard [`crate::QueueState`]: per-recipient delivery
/// state of a queue entry. Absent until the first change (an entry just
/// accepted is all pending, due at once: [`crate::QueueState::initial`]).
/// Removed with the entry.
pub(crate) const QUEUE_STATE: TableDefinition<u64, &[u8]> = TableDefinition::new("queue_state");
/// The configured mail domains (value unused).
pub(crate) const DOMAINS: TableDefinition<&str, ()> = TableDefinition::new("domains");
/// address → postcard [`UserRecord`].
pub(crate) const USERS: TableDefinition<&str, &[u8]> = TableDefinition::new("users");
/// address → postcard `Vec<Address>` (the alias targets).
pub(crate) const ALIASES: TableDefinition<&str, &[u8]> = TableDefinition::new("aliases");

/// Opaque consensus state saved with the changes it describes (the
/// cluster's last applied log id and membership), under [`CONSENSUS_APPLIED`].
pub(crate) const CONSENSUS: TableDefinition<&str, &[u8]> = TableDefinition::new("consensus");
pub(crate) const CONSENSUS_APPLIED: &str = "applied";

/// queue id → postcard (body hash, size): every message committed within
/// [`crate::MESSAGE_RETENTION_SECS`] (as of the accepts' own times), so that
/// a replicated accept applied twice delivers once, and so that a commit can
/// be proven after the fact.
pub(crate) const MESSAGES: TableDefinition<u64, &[u8]> = TableDefinition::new("messages");
/// (accepted at, queue id): the MESSAGES rows in age order, one each, for
/// pruning them without a scan of MESSAGES.
pub(crate) const MESSAGE_AGES: TableDefinition<(u64, u64), ()> = TableDefinition::new("message_ages");

/// Resend recognition (RFC 1047, see [`crate::ResendKey`]): fingerprint →
/// postcard (queue id, accepted at) of the first accept with it, kept for
/// the window only.
pub(crate) const RESEND_FINGERPRINTS: TableDefinition<&[u8; 32], &[u8]> = TableDefinition::new("resend_fingerprints");
/// (accepted at, fingerprint): the same rows in age order, for pruning.
pub(crate) const RESEND_AGES: TableDefinition<(u64, &[u8; 32]), ()> = TableDefinition::new("resend_ages");
/// queue id of a recognised resend → postcard (original queue id, at): the
/// proof (`committed`) that the resend is answered `250`.
pub(crate) const RESENDS: TableDefinition<u64, &[u8]> = TableDefinition::new("resends");

/// sequence number → an opaque cluster event record (the cluster's event
/// log, `hamail log`): written by the state machine, only the last few
/// thousand kept. Apart from the consensus blob so that applying an event
/// costs one small insert, not a rewrite of the whole log.
pub(crate) const CLUSTER_LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("cluster_log");

/// META key: when state changes were last made durable (`sync_state`).
pub(crate) const LAST_STATE_SYNC: &str = "last_state_sync";

/// META key: the next mailbox entry id to hand out.
pub(crate) const NEXT_ENTRY_ID: &str = "next_entry_id";
/// META key: the first queue id not covered by any block reserved so far.
/// Ids below it may have been handed out before a restart, so they are
/// never handed out again.
pub(crate) const QUEUE_ID_HIGH_WATER: &str = "queue_id_high_water";
/// META key: the on-disk format version, checked at open.
pub(crate) const SCHEMA_VERSION_KEY: &str = "schema_version";
pub(crate) const SCHEMA_VERSION: u64 = 1;

/// One user of the directory as stored.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub(crate) struct UserRecord {
    /// The argon2 PHC string (algorithm, parameters, salt, hash).
    pub password_hash: String,
    pub created_at: u64,
}

pub(crate) fn encode<T: Serialize>(what: &str, value: &T) -> Result<Vec<u8>, StoreError> {
    postcard::to_allocvec(value).map_err(|e| StoreError::Internal(format!("encoding {what}: {e}")))
}

pub(crate) fn decode<T: DeserializeOwned>(what: &str, bytes: &[u8]) -> Result<T, StoreError> {
    // A record that does not decode means a damaged store or a format bug:
    // an operator must look, retrying will not help.
    postcard::from_bytes(bytes).map_err(|e| StoreError::Internal(format!("decoding {what}: {e}")))
}

/// Maps any redb error into a [`StoreError`], with what we were doing.
pub(crate) fn db_err(context: &str, e: impl Into<redb::Error>) -> StoreError {
    match e.into() {
        redb::Error::Io(source) => StoreError::io(context, source),
        // The database is locked by another process (or another open in
        // this one): someone else serves it right now.
        redb::Error::DatabaseAlreadyOpen => {
            StoreError::Unavailable(format!("{context}: database already open elsewhere"))
        }
        // After an I/O error redb refuses further writes until reopened; a
        // restart (or an operator) clears it, so it is transient for callers.
        redb::Error::PreviousIo => {
            StoreError::Temporary(format!("{context}: database needs reopening after an I/O error"))
        }
        redb::Error::ValueTooLarge(n) => StoreError::Permanent(format!("{context}: value of {n} bytes too large")),
        other => StoreError::Internal(format!("{context}: {other}")),
    }
}

/// Seconds since the Unix epoch (0 if the clock is before 1970).
pub(crate) fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// A copy of an error for fanning one batch failure out to every caller of
/// the batch (`StoreError` is not `Clone` because `io::Error` is not).
pub(crate) fn duplicate_error(e: &StoreError) -> StoreError {
    match e {
        StoreError::Temporary(s) => StoreError::Temporary(s.clone()),
        StoreError::Permanent(s) => StoreError::Permanent(s.clone()),
        StoreError::Unavailable(s) => StoreError::Unavailable(s.clone()),
        StoreError::Busy(s) => StoreError::Busy(s.clone()),
        StoreError::Internal(s) => StoreError::Internal(s.clone()),
        StoreError::Io { context, source } => {
            StoreError::io(context.clone(), std::io::Error::new(source.kind(), source.to_string()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_garbage_is_internal() {
        let rec = UserRecord { password_hash: "$argon2id$x".into(), created_at: 42 };
        let bytes = encode("user", &rec).unwrap();
        let back: UserRecord = decode("user", &bytes).unwrap();
        assert_eq!(back.created_at, 42);
        assert_eq!(back.password_hash, rec.password_hash);
        assert!(matches!(decode::<UserRecord>("user", &[0xff, 0xff, 0xff]), Err(StoreError::Internal(_))));
    }

    #[test]
    fn redb_errors_are_classified() {
        let io = std::io::Error::other("disk on fire");
        assert!(matches!(db_err("x", redb::Error::Io(io)), StoreError::Io { .. }));
        assert!(matches!(db_err("x", redb::Error::DatabaseAlreadyOpen), StoreError::Unavailable(_)));
        assert!(matches!(db_err("x", redb::Error::PreviousIo), StoreError::Temporary(_)));
        assert!(matches!(db_err("x", redb::Error::Corrupted("bad".into())), StoreError::Internal(_)));
    }

    #[test]
    fn duplicated_errors_keep_class_and_text() {
        let e = StoreError::io("fsyncing", std::io::Error::new(std::io::ErrorKind::StorageFull, "full"));
        let d = duplicate_error(&e);
        assert!(d.is_temporary());
        assert_eq!(d.to_string(), e.to_string());
        assert!(matches!(duplicate_error(&StoreError::Permanent("p".into())), StoreError::Permanent(p) if p == "p"));
    }
}
