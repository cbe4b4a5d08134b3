//! hamail-cluster: nodes, membership, leadership and the replicated
//! control-plane state (domains, users and password hashes, aliases), by
//! Raft consensus (openraft 0.9).
//!
//! The mail itself is replicated too ([`mailstore`]): message metadata
//! through the log, bodies beside it, copied to every data node before a
//! message is acknowledged.
//!
//! What it does not do: speak SMTP/POP3, or start mail services (the
//! server does).

pub mod directory;
pub mod election;
pub mod error;
pub mod failover;
pub mod groups;
pub mod log_store;
pub mod mailstore;
pub mod network;
pub mod node;
pub mod pki;
pub mod rpc;
pub mod state_machine;
pub mod tcp;
pub mod testimony;
pub mod tls;
pub mod types;

pub use directory::ReplicatedDirectory;
pub use error::ClusterError;
pub use failover::GroupTiming;
pub use mailstore::{RepairReport, ReplicatedStore, Replication, GC_INTERVAL, GC_MIN_AGE};
pub use node::{ClusterNode, Timing};
pub use types::*;
