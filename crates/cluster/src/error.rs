//! The crate's one error type.
//!
//! Classified by what the caller should do about it: retry later
//! ([`ClusterError::Unavailable`], [`ClusterError::NotLeader`]), tell an
//! operator (storage, configuration), or report a bug (internal).

use crate::types::NodeId;

/// What went wrong in the cluster layer.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// No leader or no quorum right now (election in progress, partition):
    /// retry later, possibly on another node.
    #[error("cluster unavailable: {0}")]
    Unavailable(String),
    /// The operation must run on the leader and this node is not it.
    #[error("not the leader (leader: {leader:?})")]
    NotLeader { leader: Option<NodeId> },
    /// The Raft log, the state machine or the snapshot could not be read or
    /// written: the node's disk or data needs an operator.
    #[error("cluster storage error: {0}")]
    Storage(String),
    /// A node could not be reached or answered wrongly.
    #[error("cluster network error: {0}")]
    Network(String),
    /// Invalid settings (timings, addresses).
    #[error("cluster configuration error: {0}")]
    Config(String),
    /// A bug or an unexpected state (openraft fatal error, node shut down).
    #[error("internal cluster error: {0}")]
    Internal(String),
}

impl ClusterError {
    /// Whether retrying later may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, ClusterError::Unavailable(_) | ClusterError::NotLeader { .. } | ClusterError::Network(_))
    }
}

impl From<crate::types::StorageError> for ClusterError {
    fn from(e: crate::types::StorageError) -> Self {
        ClusterError::Storage(e.to_string())
    }
}

/// The store's error, its class kept: what may succeed later stays
/// retryable, a refusal stays a refusal.
impl From<hamail_store::StoreError> for ClusterError {
    fn from(e: hamail_store::StoreError) -> Self {
        use hamail_store::StoreError as S;
        let text = e.to_string();
        match e {
            S::Temporary(_) | S::Unavailable(_) | S::Busy(_) => ClusterError::Unavailable(text),
            S::Permanent(_) => ClusterError::Config(text),
            S::Io { .. } => ClusterError::Storage(text),
            S::Internal(_) => ClusterError::Internal(text),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hamail_store::StoreError;

    #[test]
    fn store_errors_keep_their_class() {
        assert!(ClusterError::from(StoreError::Unavailable("no quorum".into())).is_retryable());
        assert!(ClusterError::from(StoreError::Busy("full".into())).is_retryable());
        assert!(ClusterError::from(StoreError::Temporary("x".into())).is_retryable());
        assert!(matches!(ClusterError::from(StoreError::Permanent("no such user".into())), ClusterError::Config(_)));
        assert!(matches!(ClusterError::from(StoreError::Internal("bug".into())), ClusterError::Internal(_)));
    }
}
