//! Failover groups: what a group is (its resources and nodes), and the
//! interface through which the cluster starts, stops and checks resources.
//!
//! The cluster (Raft) decides which node owns each group; the owner starts
//! the group's resources in order and stops them in reverse. This module
//! holds the vocabulary shared by the decision side (this crate) and the
//! resource implementations (floating address, mail listeners, scripts,
//! shared disk), which live with the server.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::types::NodeId;

/// A failover group, as configured (replicated cluster configuration).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupSpec {
    pub name: String,
    /// Nodes allowed to run it, by priority: the first is its home.
    pub nodes: Vec<NodeId>,
    pub failback: Failback,
    /// Started in this order, stopped in reverse.
    pub resources: Vec<ResourceSpec>,
    /// Local restarts of a failed resource before the group fails over.
    pub max_restarts: u32,
}

/// What happens when the home node comes back after a failover.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Failback {
    /// The group stays where it is until moved (CLUSTERPRO's default).
    #[default]
    Manual,
    /// The group moves back to the highest-priority live node.
    Auto,
}

/// One resource of a group.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ResourceSpec {
    /// An address/prefix on an interface, added with netlink and announced
    /// with gratuitous ARP (IPv4) or unsolicited neighbour advertisements
    /// (IPv6).
    FloatingIp { name: String, address: String, interface: String },
    /// An address in 127.0.0.0/8 that only the owner's services bind (for
    /// tests and demos without root).
    LoopbackIp { name: String, address: String },
    /// The mail listeners (SMTP, submission, POP3, ...) bound to the
    /// group's address (its first floating or loopback IP).
    MailService { name: String },
    /// Start and stop scripts run with the seed's environment (`CLP_*` and
    /// `ARMS_*`), with a timeout.
    Exec { name: String, start: String, stop: String, timeout_secs: u64 },
    /// A shared block device checked, mounted and used as the mail store
    /// (shared-disk mode), released on stop.
    Disk { name: String, device: String, mount_point: String, fs_type: String },
}

impl ResourceSpec {
    pub fn name(&self) -> &str {
        match self {
            ResourceSpec::FloatingIp { name, .. }
            | ResourceSpec::LoopbackIp { name, .. }
            | ResourceSpec::MailService { name }
            | ResourceSpec::Exec { name, .. }
            | ResourceSpec::Disk { name, .. } => name,
        }
    }
}

/// Why a group is being started here (the seed's `ARMS_EVENT`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum StartEvent {
    /// A normal start (cluster start, `group start`, switchover).
    Start,
    /// Taken over after the previous owner failed.
    Failover,
    /// Restarted here after a resource failure (local recovery).
    Recover,
}

impl fmt::Display for StartEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            StartEvent::Start => "START",
            StartEvent::Failover => "FAILOVER",
            StartEvent::Recover => "RECOVER",
        })
    }
}

/// What a resource is told when it starts.
#[derive(Clone, Debug)]
pub struct StartContext {
    pub event: StartEvent,
    /// Whether this node is the group's home (first in its node list).
    pub home: bool,
    /// Whether the group's disk (if any) was taken over successfully.
    pub disk_ok: bool,
}

/// A resource failed; `permanent` ones are not retried locally.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{resource}: {message}")]
pub struct ResourceError {
    pub resource: String,
    pub message: String,
    pub permanent: bool,
}

/// Starts, stops and checks resources on this node. Implemented by the
/// server (real resources) and by tests (simulated ones).
#[async_trait::async_trait]
pub trait ResourceDriver: Send + Sync + 'static {
    async fn start(&self, group: &GroupSpec, resource: &ResourceSpec, context: &StartContext) -> Result<(), ResourceError>;
    /// Must succeed or report: a resource that cannot be stopped keeps the
    /// group from moving (it must never run in two places).
    async fn stop(&self, group: &GroupSpec, resource: &ResourceSpec) -> Result<(), ResourceError>;
    async fn monitor(&self, group: &GroupSpec, resource: &ResourceSpec) -> Result<(), ResourceError>;
}
