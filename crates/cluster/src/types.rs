//! The cluster's vocabulary: node ids and roles, the commands that go
//! through the Raft log, and the openraft type configuration.

use std::fmt;
use std::io::Cursor;

use hamail_store::{Address, Domain, MailChange};
use serde::{Deserialize, Serialize};

/// A node's id in the cluster, allocated by the leader at join (1 for the
/// node that ran `cluster init`). Never reused.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct NodeId(pub u64);

impl From<u64> for NodeId {
    fn from(id: u64) -> Self {
        NodeId(id)
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// What a node does besides voting.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Runs mail services and holds mail.
    #[default]
    Data,
    /// Votes and holds the control-plane state only: the third vote that
    /// lets two data nodes survive the loss of either (like CLUSTERPRO's
    /// witness server or Pacemaker's qdevice).
    Witness,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Data => "data",
            Role::Witness => "witness",
        })
    }
}

/// What the cluster knows of a node (openraft's `Node`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// Where its cluster (Raft) listener is, `host:port`.
    pub addr: String,
    pub role: Role,
    /// The node's host name, for humans.
    pub name: String,
}

impl fmt::Display for NodeInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({}, {})", self.name, self.addr, self.role)
    }
}

/// A change to the replicated state. Deterministic: everything a node
/// needs to apply it is in the command (the password hash is computed by
/// the node that proposes it, timestamps come from the proposer), so every
/// node's state is the same after the same log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    AddDomain {
        domain: Domain,
    },
    RemoveDomain {
        domain: Domain,
    },
    AddUser {
        user: Address,
        password_hash: String,
        at: u64,
    },
    SetPassword {
        user: Address,
        password_hash: String,
    },
    RemoveUser {
        user: Address,
    },
    AddAlias {
        alias: Address,
        targets: Vec<Address>,
    },
    RemoveAlias {
        alias: Address,
    },
    /// Allocates the next node id (for a join); the answer carries it.
    AllocateNodeId,
    /// Stores the cluster CA and the hash of the join secret (once, at
    /// `cluster init`), so that whichever node leads can admit new nodes.
    ConfigureCluster {
        secrets: ClusterSecrets,
    },
    /// A change to the mail: an accepted message (its metadata only: the
    /// body travels beside the log, [`crate::rpc::Request::PutBody`]), a
    /// POP3 deletion, a finished queue entry. Entry ids are allocated by
    /// the applying store, deterministically, so every node's maildrops are
    /// identical.
    Mail(MailChange),
    /// Adds or replaces a failover group's configuration (`Refused` if it
    /// is invalid, or changes the node list or resources of a group that
    /// is not offline).
    PutGroup {
        spec: crate::groups::GroupSpec,
    },
    /// Removes a group (`Refused` unless it is offline).
    RemoveGroup {
        name: String,
    },
    /// `group start|stop|move`: where the operator wants it. Also forgets
    /// the nodes it failed on.
    SetGroupTarget {
        group: String,
        target: crate::groups::GroupTarget,
    },
    /// The leader's decision (owner and state), applied only if the
    /// placement is still at `epoch` (else `Refused`): bumps the epoch.
    AssignGroup {
        group: String,
        epoch: u64,
        owner: Option<NodeId>,
        state: crate::groups::GroupState,
        event: Option<crate::groups::StartEvent>,
        /// Adds this node to the nodes the group failed on.
        failed: Option<NodeId>,
    },
    /// An agent's report on a group it owns at `epoch` (ignored, as
    /// `Refused`, if it no longer does).
    GroupReport {
        group: String,
        node: NodeId,
        epoch: u64,
        report: crate::groups::GroupReport,
    },
    /// Appends to the cluster event log.
    LogEvent {
        event: crate::groups::ClusterEvent,
    },
    /// A login ban set or lifted on one node, for every node to hold. Not
    /// kept in the state: applied to each running server's memory, as
    /// bans live (a node that restarts or joins later has none).
    Ban(BanChange),
    /// Directory changes applied in order in one entry (a bulk import):
    /// answered with [`CommandResult::Each`], one result per change.
    Directory {
        changes: Vec<hamail_store::DirectoryChange>,
    },
    /// `group clear`: the operator checked that a group whose stop failed
    /// is down on its owner; it becomes offline (and may start elsewhere).
    ClearGroup {
        group: String,
    },
}

/// A login ban, as the nodes tell each other. The target is an address
/// (`192.0.2.7`, `2001:db8::/64`) or an account, as `hamail ban` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum BanChange {
    /// Banned until this Unix time (seconds), after `failures` failed logins.
    Set {
        target: String,
        until: u64,
        failures: u32,
    },
    Lift {
        target: String,
    },
}

/// The cluster's CA and join secret, in the replicated state. Every member
/// can sign node certificates: members are equally trusted, and a cluster
/// must keep admitting nodes when the node that ran `init` is gone.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterSecrets {
    pub ca_cert_pem: String,
    pub ca_key_pem: String,
    /// SHA-256 (hex) of the join secret; the secret itself is only in
    /// join tokens.
    pub secret_hash: String,
}

impl fmt::Debug for ClusterSecrets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never log the CA key.
        f.write_str("ClusterSecrets { .. }")
    }
}

/// The state machine's answer to one command.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum CommandResult {
    #[default]
    Done,
    /// The command was valid Raft-wise but refused by the state (user exists,
    /// unknown domain...): every node refuses it the same way.
    Refused(String),
    NodeId(NodeId),
    /// The result of each change of a [`Command::Directory`]: `None` done,
    /// `Some(reason)` refused.
    Each(Vec<Option<String>>),
}

openraft::declare_raft_types!(
    /// openraft's type configuration for hamail.
    pub TypeConfig:
        D = Command,
        R = CommandResult,
        NodeId = NodeId,
        Node = NodeInfo,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

pub type Raft = openraft::Raft<TypeConfig>;
pub type LogId = openraft::LogId<NodeId>;
pub type Vote = openraft::Vote<NodeId>;
pub type Entry = openraft::Entry<TypeConfig>;
pub type StoredMembership = openraft::StoredMembership<NodeId, NodeInfo>;
pub type SnapshotMeta = openraft::SnapshotMeta<NodeId, NodeInfo>;
pub type Snapshot = openraft::storage::Snapshot<TypeConfig>;
pub type StorageError = openraft::StorageError<NodeId>;
