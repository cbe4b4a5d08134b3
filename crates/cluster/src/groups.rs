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
    #[serde(default)]
    pub failback: Failback,
    /// Started in this order, stopped in reverse.
    pub resources: Vec<ResourceSpec>,
    /// Local restarts of a failed resource before the group fails over
    /// (default 1).
    #[serde(default = "one_restart")]
    pub max_restarts: u32,
    /// The longest its stop may take, in milliseconds (every stop script
    /// must finish within it). Unset: the cluster's `group_stop_timeout_ms`,
    /// or for a group whose resources all stop in milliseconds (addresses
    /// and mail listeners) the much shorter fast budget, which is what lets
    /// such a group fail over in under a second. See
    /// [`crate::failover::GroupTiming::stop_budget`].
    #[serde(default)]
    pub stop_timeout_ms: Option<u64>,
}

fn one_restart() -> u32 {
    1
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
///
/// Serialized with a `type` tag in human-readable formats (configuration
/// files, JSON), externally tagged in compact ones (postcard: the Raft log
/// and snapshots), which cannot read internally tagged enums.
#[derive(Clone, Debug, PartialEq, Eq)]
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
    /// Outbound delivery: the owner of this resource works the relay queue
    /// (exactly one node at a time, lease-fenced like the rest of the group).
    Delivery { name: String },
}

#[derive(Serialize, Deserialize)]
#[serde(remote = "ResourceSpec", tag = "type", rename_all = "snake_case")]
enum TaggedResource {
    FloatingIp { name: String, address: String, interface: String },
    LoopbackIp { name: String, address: String },
    MailService { name: String },
    Exec { name: String, start: String, stop: String, timeout_secs: u64 },
    Disk { name: String, device: String, mount_point: String, fs_type: String },
    Delivery { name: String },
}

#[derive(Serialize, Deserialize)]
#[serde(remote = "ResourceSpec")]
enum CompactResource {
    FloatingIp { name: String, address: String, interface: String },
    LoopbackIp { name: String, address: String },
    MailService { name: String },
    Exec { name: String, start: String, stop: String, timeout_secs: u64 },
    Disk { name: String, device: String, mount_point: String, fs_type: String },
    Delivery { name: String },
}

impl Serialize for ResourceSpec {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            TaggedResource::serialize(self, s)
        } else {
            CompactResource::serialize(self, s)
        }
    }
}

impl<'de> Deserialize<'de> for ResourceSpec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        if d.is_human_readable() {
            TaggedResource::deserialize(d)
        } else {
            CompactResource::deserialize(d)
        }
    }
}

impl ResourceSpec {
    /// Whether stopping it takes milliseconds whatever happens (no script,
    /// no filesystem): removing an address, closing listeners, aborting
    /// the outbound sessions.
    pub fn stops_fast(&self) -> bool {
        matches!(
            self,
            ResourceSpec::FloatingIp { .. }
                | ResourceSpec::LoopbackIp { .. }
                | ResourceSpec::MailService { .. }
                | ResourceSpec::Delivery { .. }
        )
    }

    /// The longest its stop may take by its own configuration: an exec
    /// resource's `timeout_secs` (0: none given). `None`: no figure of its
    /// own (the cluster's stop timeout covers it).
    pub fn stop_time(&self) -> Option<std::time::Duration> {
        match self {
            ResourceSpec::Exec { timeout_secs, .. } if *timeout_secs > 0 => {
                Some(std::time::Duration::from_secs(*timeout_secs))
            }
            _ => None,
        }
    }

    pub fn name(&self) -> &str {
        match self {
            ResourceSpec::FloatingIp { name, .. }
            | ResourceSpec::LoopbackIp { name, .. }
            | ResourceSpec::MailService { name }
            | ResourceSpec::Delivery { name }
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
    async fn start(
        &self,
        group: &GroupSpec,
        resource: &ResourceSpec,
        context: &StartContext,
    ) -> Result<(), ResourceError>;
    /// Must succeed or report: a resource that cannot be stopped keeps the
    /// group from moving (it must never run in two places). `budget` is
    /// the time left for this stop and those of the resources started
    /// before it (a stop that drains, like the mail listeners', keeps
    /// within part of it; the caller gives up at its end).
    async fn stop(
        &self,
        group: &GroupSpec,
        resource: &ResourceSpec,
        budget: std::time::Duration,
    ) -> Result<(), ResourceError>;
    async fn monitor(&self, group: &GroupSpec, resource: &ResourceSpec) -> Result<(), ResourceError>;
    /// A node that was cut off is back: announce the resource again if it
    /// is something neighbours cache (a floating address: gratuitous ARP),
    /// so that hosts that followed the old owner while the cluster was
    /// split come back to this one. Best effort; most resources have
    /// nothing to say.
    async fn reannounce(&self, _group: &GroupSpec, _resource: &ResourceSpec) {}
    /// This node returned while the group runs on another node: tell the
    /// resource (`context.event` is RECOVER) if it has something to say —
    /// a script resource runs its start script, which must only take note
    /// (the group runs elsewhere). Best effort; most resources do nothing.
    async fn recover(&self, _group: &GroupSpec, _resource: &ResourceSpec, _context: &StartContext) {}
}

/// Where the operator wants a group (`group start|stop|move`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum GroupTarget {
    /// Run it on the best live node of its list (`group start`).
    #[default]
    Auto,
    /// Do not run it anywhere (`group stop`).
    Stopped,
    /// Run it on this node while it is live (`group move GROUP NODE`);
    /// elsewhere, by priority, while it is not.
    Node(NodeId),
}

/// Where a group is in its life cycle (replicated).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum GroupState {
    /// Runs nowhere (certainly: its last owner stopped it or was fenced).
    #[default]
    Offline,
    /// Assigned to `owner`, which is starting it.
    Starting,
    /// Running on `owner`.
    Online,
    /// `owner` was asked to stop it (move, stop, failback).
    Stopping,
    /// A resource failed on `owner` beyond its restarts; `owner` stopped
    /// the rest. The leader moves it on.
    Failed,
    /// `owner` could not stop a resource: the group may still run there,
    /// so it is started nowhere else until an operator acts.
    StopFailed,
}

impl fmt::Display for GroupState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            GroupState::Offline => "offline",
            GroupState::Starting => "starting",
            GroupState::Online => "online",
            GroupState::Stopping => "stopping",
            GroupState::Failed => "failed",
            GroupState::StopFailed => "stop-failed",
        })
    }
}

/// Who runs a group, as decided through the log.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    pub owner: Option<NodeId>,
    pub target: GroupTarget,
    pub state: GroupState,
    /// Bumped by every leader decision ([`crate::Command::AssignGroup`]);
    /// reports of older epochs are ignored.
    pub epoch: u64,
    /// Why the owner starts it (for the current or the next start).
    pub event: Option<StartEvent>,
    /// Nodes where it failed since the operator last started or moved it
    /// (not chosen again by failover).
    pub failed_on: Vec<NodeId>,
}

/// What an agent reports about the group it owns.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum GroupReport {
    Online,
    /// Stopped after a `Stopping` request.
    Offline,
    Failed,
    StopFailed,
}

/// A group's configuration with its placement (`group status`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupStatus {
    pub spec: GroupSpec,
    pub placement: Placement,
}

/// What an event is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum EventKind {
    NodeLost,
    NodeBack,
    GroupStart,
    GroupStop,
    GroupMove,
    GroupFailover,
    GroupFailed,
    ResourceStart,
    ResourceStop,
    ResourceFailure,
    /// Output of a start or stop script.
    Script,
    /// Written by an operator or a script (`hamail log write`, `armlog`).
    Note,
}

impl fmt::Display for EventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            EventKind::NodeLost => "node-lost",
            EventKind::NodeBack => "node-back",
            EventKind::GroupStart => "group-start",
            EventKind::GroupStop => "group-stop",
            EventKind::GroupMove => "group-move",
            EventKind::GroupFailover => "group-failover",
            EventKind::GroupFailed => "group-failed",
            EventKind::ResourceStart => "resource-start",
            EventKind::ResourceStop => "resource-stop",
            EventKind::ResourceFailure => "resource-failure",
            EventKind::Script => "script",
            EventKind::Note => "note",
        })
    }
}

/// One entry of the cluster event log (`hamail log`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterEvent {
    /// Position in the log (given when applied; 0 in a proposal).
    pub seq: u64,
    /// Unix time in milliseconds, from the proposer's clock.
    pub at_ms: u64,
    /// The node it happened on.
    pub node: NodeId,
    pub group: Option<String>,
    pub resource: Option<String>,
    pub kind: EventKind,
    pub text: String,
}

impl fmt::Display for ClusterEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{} {} node {} {}", self.seq, self.at_ms, self.node, self.kind)?;
        if let Some(g) = &self.group {
            write!(f, " group={g}")?;
        }
        if let Some(r) = &self.resource {
            write!(f, " resource={r}")?;
        }
        write!(f, ": {}", self.text)
    }
}

/// The replicated group configuration and placements (in the consensus
/// state, so in every snapshot).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupTable {
    pub groups: std::collections::BTreeMap<String, GroupSpec>,
    pub placement: std::collections::BTreeMap<String, Placement>,
    /// The sequence number of the next event of the cluster log.
    pub next_event_seq: u64,
}

/// Events kept in the cluster log.
pub const EVENTS_KEPT: u64 = 10_000;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resources_are_tagged_for_humans_and_compact_for_the_log() {
        let spec = GroupSpec {
            name: "mail".into(),
            nodes: vec![NodeId(1), NodeId(2)],
            failback: Failback::Manual,
            resources: vec![
                ResourceSpec::FloatingIp { name: "ip".into(), address: "10.0.0.9/24".into(), interface: "eth0".into() },
                ResourceSpec::MailService { name: "mail".into() },
            ],
            max_restarts: 2,
            stop_timeout_ms: Some(1500),
        };
        let bytes = postcard::to_allocvec(&spec).unwrap();
        assert_eq!(postcard::from_bytes::<GroupSpec>(&bytes).unwrap(), spec);
        let json = serde_json::to_value(&spec.resources[0]).unwrap();
        assert_eq!(json["type"], "floating_ip");
        assert_eq!(serde_json::from_value::<ResourceSpec>(json).unwrap(), spec.resources[0]);
    }
}
