//! The one error type of the store, classified by what the caller should do.

/// What went wrong in the store, and whose problem it is.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A transient condition (disk full, lock contention): the client should
    /// retry later. SMTP maps it to `451 4.3.0`, POP3 to `-ERR [SYS/TEMP]`.
    #[error("temporary store failure: {0}")]
    Temporary(String),
    /// The request can never succeed as given (unknown user, name already
    /// taken, invalid name). SMTP maps it to 5xx, the CLI prints it.
    #[error("{0}")]
    Permanent(String),
    /// The store cannot serve right now (shutting down, not the owner, no
    /// quorum in a cluster): retry, possibly elsewhere.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// This node is at a resource limit (the memory it may hold for
    /// clients is spent): retry later. SMTP maps it to `451 4.3.1`.
    #[error("insufficient resources: {0}")]
    Busy(String),
    /// A bug or a damaged store: an operator must look.
    #[error("internal store error: {0}")]
    Internal(String),
    /// An I/O error, with what we were doing.
    #[error("I/O error while {context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

impl StoreError {
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        StoreError::Io { context: context.into(), source }
    }
    /// True when retrying later may succeed (the 4xx class).
    pub fn is_temporary(&self) -> bool {
        matches!(
            self,
            StoreError::Temporary(_) | StoreError::Unavailable(_) | StoreError::Busy(_) | StoreError::Io { .. }
        )
    }
}

pub type StoreResult<T> = Result<T, StoreError>;
