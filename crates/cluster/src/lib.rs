//! hamail-cluster: nodes, membership, leadership and the replicated
//! control-plane state (domains, users and password hashes, aliases), by
//! Raft consensus (openraft 0.9).
//!
//! What it does not do: carry message bodies (they travel beside the log,
//! issue 4), speak SMTP/POP3, or start mail services (the server does).

pub mod rpc;
pub mod types;

pub use types::*;
