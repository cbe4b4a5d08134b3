//! hamail-cluster: nodes, membership, leadership and the replicated
//! control-plane state (domains, users and password hashes, aliases), by
//! Raft consensus (openraft 0.9).
//!
//! What it does not do: carry message bodies (they travel beside the log,
//! issue 4), speak SMTP/POP3, or start mail services (the server does).

pub mod pki;
pub mod directory;
pub mod error;
pub mod log_store;
pub mod network;
pub mod node;
pub mod rpc;
pub mod state_machine;
pub mod tcp;
pub mod tls;
pub mod types;

pub use directory::ReplicatedDirectory;
pub use error::ClusterError;
pub use node::{ClusterNode, Timing};
pub use types::*;
