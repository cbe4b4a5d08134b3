//! The failover-group engine: who runs each group, and never two nodes at
//! once.
//!
//! # Pieces
//!
//! - The replicated state ([`crate::groups::GroupTable`], in the consensus
//!   state and so in every snapshot): each group's [`GroupSpec`] and its
//!   [`Placement`] (owner, state, epoch, operator target). It changes only
//!   through the log: the operator's commands (`PutGroup`, `RemoveGroup`,
//!   `SetGroupTarget`), the leader's decisions (`AssignGroup`, applied only
//!   at the epoch it was decided at, so a stale decision is refused) and
//!   the owner's reports (`GroupReport`, applied only from the current
//!   owner at the current epoch).
//! - The **manager** (a task on every node, acting only while the node
//!   leads): assigns offline groups to the first live node of their
//!   priority list (or the operator's target), asks owners to stop (move,
//!   stop, automatic failback), moves failed groups on, and takes a group
//!   away from an owner it has not heard from — only after the fencing
//!   delay below.
//! - The **agent** (one worker task per group on every node): starts the
//!   group's resources in order through the [`ResourceDriver`] when this
//!   node owns it and holds its quorum lease, monitors them every
//!   `monitor_interval_ms` (a failure: stop, restart locally up to
//!   `max_restarts` times with event RECOVER, then report `Failed` and the
//!   manager moves the group), and stops them in reverse order when the
//!   node is no longer the owner or loses its lease.
//! - The **cluster event log** (`hamail log`): `Command::LogEvent`, kept in
//!   a store table (the last [`crate::groups::EVENTS_KEPT`]), readable on
//!   every node. The manager writes there `NodeLost` when a member stops
//!   renewing its lease and `NodeBack` when it renews again, naming that
//!   member as the event's node: once per loss across leader changes (a new
//!   leader reads which members the log shows lost), the dead leader's own
//!   loss included (its successor reports it).
//!
//! # Fencing: at no instant do two nodes run one group
//!
//! A node may run a group only while it holds a *quorum lease*. Every node
//! renews its lease every `renew_ms`: it notes the time `t0`, then asks the
//! leader to confirm its leadership with a heartbeat round to a quorum
//! started after the request arrived (a [`crate::rpc::Request::ReadIndex`];
//! on the leader itself, `Raft::is_leader`). If confirmed, the lease runs
//! until `t0 + lease_ms` on the node's own monotonic clock. When the lease
//! runs out the agent stops every group at once, and each stop must finish
//! within `stop_timeout_ms` (a driver contract: stop scripts must be
//! bounded by it). So a node that renewed last at `t0` runs nothing after
//! `t0 + lease + stop_timeout`.
//!
//! The leader records, for each node, when its last lease request *arrived*
//! (`r >= t0`: the arrival follows the sending, whatever the network
//! delay). It takes a group away from a silent owner only once
//! `lease + stop budget + margin` have passed since `max(r, older)`, where
//! `older` bounds the renewals that leaders of earlier terms confirmed:
//! at first `leader_since` (when it noticed it became leader: such a
//! renewal needed a quorum to acknowledge the old leader after `t0`; any
//! node of that quorum acknowledged it before voting for the new leader,
//! after which it rejects the old term), then — as soon as a majority has
//! answered [`crate::rpc::Request::Testimony`] — the latest instant at which
//! any of them acknowledged, or stopped leading, an older term
//! ([`crate::testimony`]: that majority meets every confirming quorum).
//! The testimony is what spares a dead leader-and-owner's group the
//! election time: its followers last acknowledged it when it died, before
//! the election. Why a stale leader's renewal cannot fool this: it cannot
//! be confirmed (no quorum). Neither rule needs bounded message delays;
//! they need clocks that run at nearly the same rate (the `margin` absorbs
//! drift over the delay and the agents' polling, `tick_ms`).
//!
//! ## Renewal without a leader: vouches
//!
//! A leader's death would otherwise cost every other node its groups: the
//! election (about 0.5 s) plus the first renewal with the new leader can
//! outlast a lease. So a renewal that gets no confirmation from a leader
//! (none known, or no answer within half the lease; renewals start every
//! `renew_ms` without waiting for a stuck one) asks every voter to *vouch*
//! ([`crate::rpc::Request::LeaseVouch`]). A voter vouches, labelled with its
//! current term `τ`, only if it does not lead `τ` and has not heard from
//! `τ`'s leader (an AppendEntries of `τ` arriving, or `τ`'s leader asking
//! its testimony) for `silence` = `election_max_ms`; it records the instant
//! per requester and tells it in every later testimony. The lease runs from
//! `t0` (the sending) if a majority of every voter configuration, the node
//! itself included, vouched with one label, each answer arriving by
//! `t0 + window` (`window` = `silence` / 3).
//!
//! Why a leader `L` of term `T` still never fences a node `X` before `X`'s
//! lease and stop budget ended. `L` counts the fencing delay from the
//! latest of: `X`'s last request to it, `older`, the latest vouch for `X`
//! that its testimony majority `M` told (an upper bound on `L`'s clock),
//! and the latest *unfresh* instant from `since + silence - window` on,
//! where an instant `t` is fresh if a quorum had by `t` acknowledged a
//! heartbeat of `L` sent after `t - fresh` (`fresh` = `silence - window`;
//! `L` knows it from its own renewals, each confirmed by a heartbeat round
//! to a quorum sent after its `t0`). Take a vouched renewal of `X` with
//! label `τ` by majority `V` (vouches at `a_v` in `[t0, t0 + window]`) that
//! `L` did not count, and `L`'s decision taken at `d` and committed by a
//! quorum `Q` of term `T`:
//!
//! - `τ < T`: the member of `V ∩ M` vouched before it reached `T`, so
//!   before it testified: told. Impossible.
//! - `τ > T`: the member `q` of `V ∩ Q` acknowledged the decision in term
//!   `T` before it reached `τ` and vouched: `a_q > d`. Such a renewal is
//!   the first of `X`'s after `d`; its predecessors were counted, so `X`'s
//!   lease had lapsed for more than the stop budget and the margin when it
//!   arrived: the agent had stopped the groups, and restarting one needs a
//!   linearizable read, which shows `L`'s decision (the same argument as
//!   for a confirmation through a leader that arrives late).
//! - `τ = T` and `t0` before `since + silence - window`: the member `w` of
//!   `V ∩ M` vouched before it testified (told), or after: then `w` had not
//!   heard from `L` for `silence` since its testimony, which came after
//!   `since`, so `t0 ≥ a_w - window ≥ since + silence - window`. Impossible.
//! - `τ = T`, `t0` later and fresh: a quorum acknowledged by `t0` a
//!   heartbeat sent after `t0 - fresh`; its member `v` in `V` heard from `L`
//!   within `[a_v - silence, a_v]` and refused (if `v` is `L`, it vouched
//!   before it led, so before it testified to itself: told). Impossible.
//! - `τ = T`, `t0` unfresh: counted, as `unseen`.
//!
//! Liveness: a healthy leader's quorum acknowledgements are a renewal
//! period old at most, so nothing is unfresh and a dead owner is still
//! replaced `fence_delay` after its last renewal; the leader's own death
//! leaves its followers silent, and they vouch from `silence` after its
//! last heartbeat until they know the next leader, well within the lease.
//! No owner is fenced before a majority testified (only the testimony tells
//! the vouches); it answers within a round trip of the election.
//! Measured in namespaces (`tests/netns_groups.rs`,
//! `a_leader_power_cut_leaves_the_other_groups_up`): a power cut of the
//! leader, which owned one group; the group of another node failed none of
//! a prober's connections (every 20 ms) and kept an SMTP session open
//! across the election, where it was stopped and restarted before (a 0.52 s
//! gap, the session cut with 421); the dead leader's group was served
//! elsewhere 1.06-1.16 s after the cut, as before (1.08-1.10 s).
//!
//! A group is only *started* after a linearizable read (so the node has
//! applied every decision committed before it) showing that it still owns
//! it: a node whose lease lapsed and came back cannot restart a group from
//! a stale placement that was meanwhile given to another node.
//!
//! A stop that fails (or exceeds `stop_timeout_ms`) is reported as
//! `StopFailed`: the group is then started nowhere else (it may still run
//! there) while the agent keeps trying to stop it; once it succeeds the
//! group goes offline and can start elsewhere. A node that cannot stop a
//! resource *and* is cut from the cluster breaks the assumption above
//! (nothing short of power fencing helps then); `stop_timeout_ms` must be
//! chosen above the slowest resource's stop.
//!
//! # Failover time
//!
//! The stop budget is the group's `stop_timeout_ms` if set; otherwise, for
//! a group whose resources all stop in milliseconds (addresses and mail
//! listeners, [`ResourceSpec::stops_fast`]) and whose node lost its lease,
//! `fast_stop_timeout_ms` (100 ms); for any other group, or a voluntary
//! stop (a move: mail sessions get time to end at a safe point),
//! `stop_timeout_ms` (2 s: unmounting a disk) plus the scripts' own
//! `timeout_secs` ([`GroupTiming::stop_budget`]). With the
//! defaults (lease 600 ms = 2 × election max, so that followers keep their
//! groups through an election; margin 100 ms) a dead owner of an address +
//! mail group is replaced 0.8 s after its last renewal (every 100 ms), plus
//! the commit of the decision and the start — whether or not it was also
//! the leader, thanks to the testimony. Measured in namespaces
//! (`tests/netns.rs`, `outage_benchmark`): about 0.9 s from the power cut
//! to the first `250` through the floating address. A group with scripts
//! or a disk takes lease + scripts' timeouts + 2 s + margin (and a disk also waits for the dead
//! holder's disk heartbeat to go stale). A shorter lease would fail over
//! sooner but stop every follower's groups during an election.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use crate::error::ClusterError;
use crate::groups::{
    ClusterEvent, EventKind, GroupReport, GroupSpec, GroupState, GroupStatus, GroupTarget, Placement, ResourceDriver,
    ResourceError, ResourceSpec, StartContext, StartEvent,
};
use crate::node::{write_error, ClusterNode};
use crate::rpc::{Request, Response, TestimonyAnswer};
use crate::testimony::Testified;
use crate::types::{Command, CommandResult, NodeId, Role};

/// The timings of the failover groups. See the module documentation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupTiming {
    /// How long a confirmed lease renewal lets a node run its groups.
    pub lease_ms: u64,
    /// How often a node renews its lease.
    pub renew_ms: u64,
    /// The longest a group's stop may take (a bound the resources must
    /// respect), unless the group sets its own.
    pub stop_timeout_ms: u64,
    /// The stop budget of a group whose resources all stop fast
    /// ([`ResourceSpec::stops_fast`]) when its node loses its lease; a
    /// voluntary stop (move, `group stop`) still gets `stop_timeout_ms`, so
    /// that mail sessions can end at a safe point.
    pub fast_stop_timeout_ms: u64,
    /// Added to the fencing delay for clock drift and polling.
    pub margin_ms: u64,
    /// How often running resources are checked.
    pub monitor_interval_ms: u64,
    /// How often the agent and the manager look at the state.
    pub tick_ms: u64,
}

impl Default for GroupTiming {
    fn default() -> Self {
        GroupTiming {
            lease_ms: 600,
            renew_ms: 100,
            stop_timeout_ms: 2000,
            fast_stop_timeout_ms: 100,
            margin_ms: 100,
            monitor_interval_ms: 1000,
            tick_ms: 20,
        }
    }
}

impl GroupTiming {
    pub fn lease(&self) -> Duration {
        Duration::from_millis(self.lease_ms)
    }

    /// The time `spec`'s stop may take: when its node loses the lease
    /// (`fenced`), or when it stops by decision (move, stop, failure). The
    /// group's `stop_timeout_ms` if set; else the fast budget for a group
    /// that stops in milliseconds and lost its lease; else the cluster's
    /// `stop_timeout_ms`, or, when longer, what the group's resources are
    /// given: their stop times ([`ResourceSpec::stop_time`], the scripts'
    /// `timeout_secs`) one after the other (a stop runs them in reverse
    /// order), plus the cluster's budget for the rest.
    pub fn stop_budget(&self, spec: &GroupSpec, fenced: bool) -> Duration {
        match spec.stop_timeout_ms {
            Some(ms) => Duration::from_millis(ms),
            None if fenced && spec.resources.iter().all(ResourceSpec::stops_fast) => {
                Duration::from_millis(self.fast_stop_timeout_ms)
            }
            None => {
                let own: Duration = spec.resources.iter().filter_map(ResourceSpec::stop_time).sum();
                let base = Duration::from_millis(self.stop_timeout_ms);
                if own.is_zero() {
                    base
                } else {
                    own + base
                }
            }
        }
    }

    /// How long the leader waits, after it last heard from an owner, before
    /// giving the owner's group `spec` to another node.
    pub fn fence_delay(&self, spec: &GroupSpec) -> Duration {
        self.lease() + self.stop_budget(spec, true) + Duration::from_millis(self.margin_ms)
    }

    fn tick(&self) -> Duration {
        Duration::from_millis(self.tick_ms.max(1))
    }
}

/// This node's quorum lease and the lease requests it received (as leader).
#[derive(Default)]
pub(crate) struct LeaseBook {
    inner: Mutex<LeaseInner>,
}

#[derive(Default)]
struct LeaseInner {
    /// `t0` of the last confirmed renewal.
    renewed_at: Option<Instant>,
    /// When each peer's last lease request (read index) arrived here.
    requests: HashMap<NodeId, Instant>,
    /// How recently a quorum acknowledged this node as leader.
    freshness: Freshness,
    /// The last renewal was by vouches (not through a leader).
    by_vouch: bool,
}

/// A leader's record of how recently a quorum acknowledged it, from its own
/// lease renewals (each confirmed by a heartbeat round to a quorum started
/// after its `t0`): at an instant `t`, the latest confirmed `t0` is a lower
/// bound of the sending of a heartbeat that a quorum had acknowledged by
/// `t`. An instant where that bound is more than `limit` old is *unfresh*:
/// a majority of voters may have been silent from the leader long enough to
/// vouch (see the module documentation).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Freshness {
    /// The term and `t0` of the last renewal confirmed as its leader.
    confirmed: Option<(u64, Instant)>,
    /// The term and the latest unfresh instant known in it.
    unfresh: Option<(u64, Instant)>,
}

impl Freshness {
    /// A renewal sent at `t0` was confirmed at `now` by this node's
    /// leadership of `term`. The instants since the previous confirmation
    /// of `term` (since the start of `term` if none) that were more than
    /// `limit` after it were unfresh: the latest of them is `now`.
    fn confirmed(&mut self, term: u64, t0: Instant, now: Instant, limit: Duration) {
        let fresh = self.confirmed.is_some_and(|(t, at)| t == term && now.saturating_duration_since(at) <= limit);
        if !fresh {
            self.unfresh = Some((term, now));
        }
        if self.confirmed.is_none_or(|(t, at)| t < term || (t == term && at < t0)) {
            self.confirmed = Some((term, t0));
        }
    }

    /// The latest unfresh instant of `term` up to `now` (`now` itself if it
    /// is unfresh).
    fn last_unfresh(&self, term: u64, now: Instant, limit: Duration) -> Option<Instant> {
        match self.confirmed {
            Some((t, at)) if t == term && now.saturating_duration_since(at) <= limit => {
                self.unfresh.filter(|(t, _)| *t == term).map(|(_, at)| at)
            }
            _ => Some(now),
        }
    }
}

impl LeaseBook {
    fn lock(&self) -> std::sync::MutexGuard<'_, LeaseInner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn request_from(&self, peer: NodeId) {
        self.lock().requests.insert(peer, Instant::now());
    }

    pub(crate) fn renewed(&self, t0: Instant) {
        let mut l = self.lock();
        l.by_vouch = false;
        if l.renewed_at.is_none_or(|r| r < t0) {
            l.renewed_at = Some(t0);
        }
    }

    /// A renewal sent at `t0` was confirmed by vouches; whether the one
    /// before was not (the node just lost its leader).
    fn renewed_by_vouch(&self, t0: Instant) -> bool {
        self.renewed(t0);
        let mut l = self.lock();
        !std::mem::replace(&mut l.by_vouch, true)
    }

    /// A renewal sent at `t0` was confirmed by this node's own leadership
    /// of `term` (a heartbeat round to a quorum).
    fn confirmed_as_leader(&self, term: u64, t0: Instant, limit: Duration) {
        self.lock().freshness.confirmed(term, t0, Instant::now(), limit);
    }

    fn last_unfresh(&self, term: u64, limit: Duration) -> Option<Instant> {
        self.lock().freshness.last_unfresh(term, Instant::now(), limit)
    }

    fn holds(&self, lease: Duration) -> bool {
        self.lock().renewed_at.is_some_and(|t| t.elapsed() < lease)
    }

    fn last_request(&self, peer: NodeId) -> Option<Instant> {
        self.lock().requests.get(&peer).copied()
    }

    /// Forgets the lease (the node is shutting down).
    fn drop_lease(&self) {
        self.lock().renewed_at = None;
    }
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

fn refused_err(r: CommandResult) -> Result<(), ClusterError> {
    match r {
        CommandResult::Done | CommandResult::NodeId(_) | CommandResult::Each(_) => Ok(()),
        CommandResult::Refused(m) => Err(ClusterError::Config(m)),
    }
}

/// The failover-group API of a node (`hamail group ...`, `hamail log`).
impl ClusterNode {
    /// Adds or replaces a group's configuration. A new group starts at once
    /// (its target is `Auto`) if an agent runs.
    pub async fn put_group(&self, spec: GroupSpec) -> Result<(), ClusterError> {
        refused_err(self.write(Command::PutGroup { spec }).await.map_err(write_error)?)
    }

    /// Removes a group; it must be offline (`stop_group` first).
    pub async fn remove_group(&self, name: &str) -> Result<(), ClusterError> {
        refused_err(self.write(Command::RemoveGroup { name: name.into() }).await.map_err(write_error)?)
    }

    /// `group start`: run it on the best live node (and forget where it
    /// failed).
    pub async fn start_group(&self, name: &str) -> Result<(), ClusterError> {
        self.set_group_target(name, GroupTarget::Auto).await
    }

    /// `group stop`: stop it wherever it runs.
    pub async fn stop_group(&self, name: &str) -> Result<(), ClusterError> {
        self.set_group_target(name, GroupTarget::Stopped).await
    }

    pub async fn set_group_target(&self, name: &str, target: GroupTarget) -> Result<(), ClusterError> {
        refused_err(self.write(Command::SetGroupTarget { group: name.into(), target }).await.map_err(write_error)?)
    }

    /// `group clear`: the operator checked that a group whose stop failed
    /// is down on its owner (scripts' processes gone, disk unmounted): it
    /// becomes offline and may start again (as `clpgrp`/`pcs resource
    /// cleanup` clear a failed stop).
    pub async fn clear_group(&self, name: &str) -> Result<(), ClusterError> {
        refused_err(self.write(Command::ClearGroup { group: name.into() }).await.map_err(write_error)?)
    }

    /// `group move GROUP [NODE]`: a switchover to `node`, or without one to
    /// the next node of the group's list after its current owner. Returns
    /// the destination. The move completes asynchronously (watch
    /// [`Self::groups_status`]).
    pub async fn move_group(&self, name: &str, node: Option<NodeId>) -> Result<NodeId, ClusterError> {
        self.linearizable().await.map_err(write_error)?;
        let table = self.group_table.borrow().clone();
        let spec = table.groups.get(name).ok_or_else(|| ClusterError::Config(format!("no group {name}")))?;
        let dest = match node {
            Some(n) => n,
            None => {
                let current = table.placement.get(name).and_then(|p| p.owner);
                next_after(&spec.nodes, current)
                    .ok_or_else(|| ClusterError::Config(format!("group {name} has no other node to move to")))?
            }
        };
        self.set_group_target(name, GroupTarget::Node(dest)).await?;
        self.log_event(EventKind::GroupMove, Some(name), None, format!("move to node {dest} requested")).await?;
        Ok(dest)
    }

    /// `node stop`: moves every group owned by (or targeted at) `node` to
    /// the next node of its list; a group with no other node is stopped.
    /// Returns (group, destination or `None` if stopped).
    pub async fn drain_node(&self, node: NodeId) -> Result<Vec<(String, Option<NodeId>)>, ClusterError> {
        self.linearizable().await.map_err(write_error)?;
        let table = self.group_table.borrow().clone();
        let mut out = Vec::new();
        for (name, p) in &table.placement {
            let Some(spec) = table.groups.get(name) else { continue };
            let affected = p.owner == Some(node) || p.target == GroupTarget::Node(node);
            if !affected || p.target == GroupTarget::Stopped {
                continue;
            }
            let dest = next_after(&spec.nodes, Some(node));
            let target = dest.map(GroupTarget::Node).unwrap_or(GroupTarget::Stopped);
            self.set_group_target(name, target).await?;
            out.push((name.clone(), dest));
        }
        self.log_event(EventKind::Note, None, None, format!("node {node} drained: {out:?}")).await?;
        Ok(out)
    }

    /// Every group with its placement, as applied on this node (call
    /// [`Self::linearizable`] first for an up-to-date view).
    pub fn groups_status(&self) -> Vec<GroupStatus> {
        let table = self.group_table.borrow().clone();
        table
            .groups
            .into_iter()
            .map(|(name, spec)| {
                let placement = table.placement.get(&name).cloned().unwrap_or_default();
                GroupStatus { spec, placement }
            })
            .collect()
    }

    /// Appends an event to the cluster log (`hamail log write` uses kind
    /// `Note`). Returns once it is committed.
    pub async fn log_event(
        &self,
        kind: EventKind,
        group: Option<&str>,
        resource: Option<&str>,
        text: impl Into<String>,
    ) -> Result<(), ClusterError> {
        let event = ClusterEvent {
            seq: 0,
            at_ms: unix_ms(),
            node: self.id(),
            group: group.map(str::to_string),
            resource: resource.map(str::to_string),
            kind,
            text: text.into(),
        };
        refused_err(self.write(Command::LogEvent { event }).await.map_err(write_error)?)
    }

    /// The last `limit` events of the cluster log as applied here, oldest
    /// first.
    pub async fn events(&self, limit: usize) -> Result<Vec<ClusterEvent>, ClusterError> {
        let rows = self.store().cluster_log(limit).await.map_err(|e| ClusterError::Storage(e.to_string()))?;
        rows.into_iter()
            .map(|(_, bytes)| postcard::from_bytes(&bytes).map_err(|e| ClusterError::Internal(format!("event: {e}"))))
            .collect()
    }

    /// Whether this node currently holds its quorum lease (may run groups).
    pub fn holds_lease(&self) -> bool {
        self.leases.holds(self.timing().groups.lease())
    }

    /// Starts this node's group agent (and its lease renewal and, while it
    /// leads, the group manager) with `driver` running the resources. Call
    /// once; [`Self::shutdown`] stops it (without stopping resources: a
    /// crash does not either).
    pub fn start_agent(self: &Arc<Self>, driver: Arc<dyn ResourceDriver>) {
        let mut tasks = self.group_tasks.lock().unwrap_or_else(PoisonError::into_inner);
        if !tasks.is_empty() {
            return;
        }
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        tasks.push(tokio::spawn(renew_loop(Arc::downgrade(self))));
        tasks.push(tokio::spawn(event_writer(Arc::downgrade(self), events_rx)));
        tasks.push(tokio::spawn(manager_loop(Arc::downgrade(self), events_tx.clone())));
        tasks.push(tokio::spawn(agent_loop(Arc::downgrade(self), driver, events_tx)));
    }

    pub(crate) fn stop_group_tasks(&self) {
        let tasks: Vec<_> = self.group_tasks.lock().unwrap_or_else(PoisonError::into_inner).drain(..).collect();
        for t in tasks {
            t.abort();
        }
        self.leases.drop_lease();
    }
}

/// The next node after `current` in `nodes` (cyclically), not `current`.
fn next_after(nodes: &[NodeId], current: Option<NodeId>) -> Option<NodeId> {
    next_after_where(nodes, current, |_| true)
}

/// The first node of `nodes` after `current` (cyclically; from the start
/// without one), other than `current`, for which `ok` holds.
pub fn next_after_where(nodes: &[NodeId], current: Option<NodeId>, ok: impl Fn(NodeId) -> bool) -> Option<NodeId> {
    let start = current.and_then(|c| nodes.iter().position(|n| *n == c)).map(|i| i + 1).unwrap_or(0);
    (0..nodes.len()).map(|k| nodes[(start + k) % nodes.len()]).find(|n| Some(*n) != current && ok(*n))
}

/// An event to write to the cluster log, from a task that must not wait.
type EventTx = mpsc::UnboundedSender<ClusterEvent>;

fn event(node: NodeId, kind: EventKind, group: Option<&str>, resource: Option<&str>, text: String) -> ClusterEvent {
    tracing::info!(%node, %kind, group, resource, "{text}");
    ClusterEvent {
        seq: 0,
        at_ms: unix_ms(),
        node,
        group: group.map(str::to_string),
        resource: resource.map(str::to_string),
        kind,
        text,
    }
}

/// Writes queued events in order; drops one that cannot be written for a
/// while (no quorum): the log is best effort, the decisions are not.
async fn event_writer(node: Weak<ClusterNode>, mut rx: mpsc::UnboundedReceiver<ClusterEvent>) {
    while let Some(ev) = rx.recv().await {
        let Some(n) = node.upgrade() else { return };
        for _ in 0..3 {
            match n.write(Command::LogEvent { event: ev.clone() }).await {
                Ok(_) => break,
                Err(e) => tracing::debug!("cluster log write failed: {e}"),
            }
        }
    }
}

/// Starts a renewal of this node's lease every `renew_ms`. A renewal may
/// take longer than that (a leader that died does not answer): the next one
/// does not wait for it; each ends within the lease (a later confirmation
/// would be worth nothing), so at most `lease / renew_ms + 1` run at once.
async fn renew_loop(node: Weak<ClusterNode>) {
    let mut rounds = tokio::task::JoinSet::new();
    loop {
        let Some(n) = node.upgrade() else { return };
        let t = n.timing().groups.clone();
        drop(n);
        while rounds.try_join_next().is_some() {}
        let period = Duration::from_millis(t.renew_ms.max(1));
        let most = (t.lease_ms / t.renew_ms.max(1)) as usize + 1;
        if rounds.len() < most {
            rounds.spawn(renew_round(node.clone()));
        }
        tokio::time::sleep(period).await;
    }
}

/// One renewal: through the leader (half the lease at most: a dead leader
/// is not waited for longer), else by the voters' vouches. On the leader, a
/// confirmed renewal also tells how recently a quorum acknowledged it.
async fn renew_round(node: Weak<ClusterNode>) {
    let Some(n) = node.upgrade() else { return };
    let lease = n.timing().groups.lease();
    let t0 = Instant::now();
    let m = n.raft().metrics().borrow().clone();
    if m.current_leader == Some(n.id()) && m.state == openraft::ServerState::Leader {
        if matches!(tokio::time::timeout(lease / 2, n.raft().get_read_log_id()).await, Ok(Ok(_))) {
            n.leases.renewed(t0);
            n.leases.confirmed_as_leader(m.current_term, t0, n.vouching().fresh);
            return;
        }
    } else if n.renew_lease(lease / 2).await {
        return;
    }
    n.renew_by_vouch().await;
}

/// The timings of vouching (see the module documentation).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Vouching {
    /// How long a voter must not have heard from its term's leader before
    /// it vouches: `election_max_ms`, beyond any healthy gap between
    /// heartbeats.
    pub(crate) silence: Duration,
    /// A vouch counts only if it arrives within this time of the request's
    /// sending: a third of the silence.
    pub(crate) window: Duration,
    /// The oldest a leader's quorum acknowledgement may be for it to know
    /// that no majority is silent: the silence minus the window.
    pub(crate) fresh: Duration,
}

impl Vouching {
    fn new(election_max_ms: u64) -> Vouching {
        let silence = Duration::from_millis(election_max_ms.max(3));
        let window = silence / 3;
        Vouching { silence, window, fresh: silence - window }
    }
}

impl ClusterNode {
    pub(crate) fn vouching(&self) -> Vouching {
        Vouching::new(self.timing().election_max_ms)
    }

    /// Renews the lease without a leader: asks every voter (itself
    /// included) to vouch for it; the lease runs from `t0`, the instant the
    /// requests were sent, once a majority of every voter configuration
    /// vouched in one term ([`vouched_by_majority`]), each vouch arriving
    /// within [`Vouching::window`] of `t0`. See the module documentation
    /// for why this keeps the fencing.
    pub(crate) async fn renew_by_vouch(&self) -> bool {
        let t0 = Instant::now();
        let vouching = self.vouching();
        let deadline = t0 + vouching.window;
        let m = self.raft().metrics().borrow().clone();
        let configs = m.membership_config.membership().get_joint_config().clone();
        let nodes: BTreeMap<NodeId, crate::types::NodeInfo> =
            m.membership_config.nodes().map(|(id, info)| (*id, info.clone())).collect();
        let voters: BTreeSet<NodeId> = configs.iter().flatten().copied().collect();
        let mut grants = BTreeMap::new();
        let mut asks = tokio::task::JoinSet::new();
        for id in voters {
            if id == self.id() {
                if let Some(term) = self.testimony.vouch(id, vouching.silence) {
                    grants.insert(id, term);
                }
                continue;
            }
            let Some(info) = nodes.get(&id).cloned() else { continue };
            let transport = self.transport().clone();
            asks.spawn(async move {
                let call = transport.call(id, &info, Request::LeaseVouch);
                (id, tokio::time::timeout_at(deadline.into(), call).await)
            });
        }
        while !vouched_by_majority(&configs, &grants) {
            let Some(joined) = asks.join_next().await else { return false };
            if let Ok((id, Ok(Ok(Response::LeaseVouch(Some(term)))))) = joined {
                if Instant::now() <= deadline {
                    grants.insert(id, term);
                }
            }
        }
        if self.leases.renewed_by_vouch(t0) {
            let voters: Vec<String> = grants.keys().map(|id| id.to_string()).collect();
            tracing::info!(term = ?grants.values().next(), "no leader to renew the group lease with: renewed by the vouches of nodes {}", voters.join(", "));
        }
        true
    }
}

/// Whether `grants` (voter → the term it vouched in) hold a majority of
/// every configuration in `configs` (two during a membership change, as
/// for Raft's own quorums, §6), all vouching in one term.
fn vouched_by_majority(configs: &[BTreeSet<NodeId>], grants: &BTreeMap<NodeId, u64>) -> bool {
    let terms: BTreeSet<u64> = grants.values().copied().collect();
    !configs.is_empty()
        && terms.iter().any(|term| {
            configs.iter().all(|voters| {
                let granted = voters.iter().filter(|id| grants.get(id) == Some(term)).count();
                granted > voters.len() / 2
            })
        })
}

/// Microseconds from `at` to `now` (zero if `at` is later).
fn micros_since(at: Instant, now: Instant) -> u64 {
    u64::try_from(now.saturating_duration_since(at).as_micros()).unwrap_or(u64::MAX)
}

/// The instant `us` microseconds before `arrived`, an answer's arrival:
/// an upper bound of the instant the answer speaks of (the answer was made
/// before it arrived). An age beyond this clock's range gives `arrived`
/// itself, still an upper bound.
fn before_arrival(arrived: Instant, us: u64) -> Instant {
    arrived.checked_sub(Duration::from_micros(us)).unwrap_or(arrived)
}

/// `told` as sent at `now` (ages, clocks are not compared).
pub(crate) fn testimony_answer(told: &Testified, now: Instant) -> TestimonyAnswer {
    TestimonyAnswer {
        older_us: micros_since(told.older, now),
        vouches_us: told.vouches.iter().map(|(id, at)| (*id, micros_since(*at, now))).collect(),
    }
}

/// An answer that arrived at `arrived`, on this node's clock (upper bounds,
/// see [`before_arrival`]).
fn testified_by(answer: &TestimonyAnswer, arrived: Instant) -> Testified {
    Testified {
        older: before_arrival(arrived, answer.older_us),
        vouches: answer.vouches_us.iter().map(|(id, us)| (*id, before_arrival(arrived, *us))).collect(),
    }
}

// ---------------------------------------------------------------------------
// The manager (leader only)

struct Manager {
    /// The term we noticed we lead, and when.
    leading: Option<(u64, Instant)>,
    /// For the term we lead, once a majority has testified (see
    /// [`crate::testimony`]): the latest instant at which a leader of an
    /// older term can have confirmed a lease renewal, and the vouches;
    /// filled by a task.
    testified: Arc<Mutex<Option<Testimonies>>>,
    /// For the term we lead: the members the cluster event log says are
    /// lost, once read (filled by a task, see [`lost_in_event_log`]).
    logged_lost: LostInTerm,
    /// The members lost now (NodeLost reported, NodeBack not yet), from
    /// the event log on; `None` until it was read.
    lost: Option<BTreeSet<NodeId>>,
    /// When this leader first saw each member (a node that just joined has
    /// not asked for its lease yet: it is not dead, only new).
    first_seen: std::collections::BTreeMap<NodeId, Instant>,
}

async fn manager_loop(node: Weak<ClusterNode>, events: EventTx) {
    let mut m = Manager {
        leading: None,
        testified: Arc::new(Mutex::new(None)),
        logged_lost: Arc::new(Mutex::new(None)),
        lost: None,
        first_seen: Default::default(),
    };
    loop {
        let Some(n) = node.upgrade() else { return };
        let tick = n.timing().groups.tick();
        m.step(&n, &events).await;
        drop(n);
        tokio::time::sleep(tick).await;
    }
}

impl Manager {
    async fn step(&mut self, n: &Arc<ClusterNode>, events: &EventTx) {
        let metrics = n.raft().metrics().borrow().clone();
        if metrics.current_leader != Some(n.id()) || metrics.state != openraft::ServerState::Leader {
            self.leading = None;
            self.lost = None;
            return;
        }
        let term = metrics.current_term;
        let since = match self.leading {
            Some((t, since)) if t == term => since,
            _ => {
                let now = Instant::now();
                self.leading = Some((term, now));
                let voters: Vec<NodeId> = metrics.membership_config.membership().voter_ids().collect();
                tokio::spawn(gather_testimony(Arc::downgrade(n), term, voters, self.testified.clone()));
                // A renewal at once (a heartbeat round, bounded by half the
                // lease): its confirmation is the first evidence of a
                // quorum's acknowledgements in this term (see [`Freshness`]).
                renew_round(Arc::downgrade(n)).await;
                self.lost = None;
                tokio::spawn(lost_in_event_log(Arc::downgrade(n), term, self.logged_lost.clone()));
                now
            }
        };
        // Renewals confirmed by older leaders end by `since` (see the module
        // documentation) or, once a majority testified, by an earlier
        // instant. No owner is fenced before that testimony: only it tells
        // the vouches.
        let testified =
            self.testified.lock().unwrap_or_else(PoisonError::into_inner).clone().filter(|t| t.term == term);
        // The latest instant at which a vouch this leader cannot know of may
        // have been asked for (see the module documentation).
        let vouching = n.vouching();
        let unseen = unseen_vouch(n.leases.last_unfresh(term, vouching.fresh), since, vouching);
        let timing = n.timing().groups.clone();
        let me = n.id();
        let data: BTreeSet<NodeId> =
            metrics.membership_config.nodes().filter(|(_, i)| i.role == Role::Data).map(|(id, _)| *id).collect();
        let members: BTreeSet<NodeId> = metrics.membership_config.nodes().map(|(id, _)| *id).collect();
        // Live: renewing its lease with us (or us).
        let live: BTreeSet<NodeId> = members
            .iter()
            .copied()
            .filter(|id| *id == me || n.leases.last_request(*id).is_some_and(|r| r.elapsed() < timing.lease()))
            .collect();
        let now = Instant::now();
        self.first_seen.retain(|id, _| members.contains(id));
        for id in &members {
            self.first_seen.entry(*id).or_insert(now);
        }
        // Not live yet but too new to be called dead: a group whose home is
        // such a node waits for it instead of starting on the next node
        // (and staying there under manual failback).
        let warm_up = timing.lease() * 2;
        let pending: BTreeSet<NodeId> = members
            .iter()
            .copied()
            .filter(|id| !live.contains(id))
            .filter(|id| since.elapsed() < warm_up || self.first_seen.get(id).is_some_and(|t| t.elapsed() < warm_up))
            .collect();
        // NodeLost / NodeBack (see [`node_changes`]), from the lost members
        // the event log shows on: a loss the previous leader reported is not
        // reported again, a return is reported only after a loss, and the
        // previous leader itself, if it died, is reported lost by its
        // successor once it is no longer pending.
        if self.lost.is_none() {
            let mut logged = self.logged_lost.lock().unwrap_or_else(PoisonError::into_inner);
            if logged.as_ref().is_some_and(|(t, _)| *t == term) {
                self.lost = logged.take().map(|(_, lost)| lost);
            }
        }
        if let Some(lost) = self.lost.as_mut() {
            for (id, kind) in node_changes(lost, &members, &live, &pending) {
                let text = match kind {
                    EventKind::NodeLost => {
                        format!("node {id} lost: no lease renewal with leader {me} for {:?}", timing.lease())
                    }
                    _ => format!("node {id} is back: renewing its lease with leader {me}"),
                };
                let _ = events.send(event(id, kind, None, None, text));
            }
        }
        let table = n.group_table.borrow().clone();
        for (name, p) in &table.placement {
            let Some(spec) = table.groups.get(name) else { continue };
            // Silent: possibly running, but certainly stopped by now.
            let fenced = |id: NodeId| -> bool {
                let Some(t) = testified.as_ref().filter(|_| id != me) else { return false };
                t.last_renewal(id, n.leases.last_request(id), since, unseen).elapsed() > timing.fence_delay(spec)
            };
            let eligible = |id: &NodeId| data.contains(id) && live.contains(id);
            let is_pending = |id: &NodeId| data.contains(id) && pending.contains(id);
            let Some((cmd, ev)) = decide(spec, p, &eligible, &fenced, &is_pending) else { continue };
            match n.write(cmd).await {
                Ok(CommandResult::Done) => {
                    if let Some((kind, text)) = ev {
                        let _ = events.send(event(me, kind, Some(name), None, text));
                    }
                }
                Ok(other) => tracing::debug!(group = %name, "decision not applied: {other:?}"),
                Err(e) => {
                    tracing::debug!(group = %name, "decision not written: {e}");
                    return;
                }
            }
        }
    }
}

/// The members a term's leader read as lost from the event log, with the
/// term.
type LostInTerm = Arc<Mutex<Option<(u64, BTreeSet<NodeId>)>>>;

/// The members whose last NodeLost / NodeBack event in `events` (oldest
/// first) is a NodeLost. Such an event names the lost node as the node it
/// happened on.
fn lost_in(events: &[ClusterEvent]) -> BTreeSet<NodeId> {
    let mut lost = BTreeSet::new();
    for e in events {
        match e.kind {
            EventKind::NodeLost => lost.insert(e.node),
            EventKind::NodeBack => lost.remove(&e.node),
            _ => continue,
        };
    }
    lost
}

/// Reads, for the leader of `term`, which members the cluster event log
/// says are lost (after a linearizable read: every event the previous
/// leaders committed is applied here), retrying every heartbeat while the
/// node leads `term`.
async fn lost_in_event_log(node: Weak<ClusterNode>, term: u64, out: LostInTerm) {
    loop {
        let Some(n) = node.upgrade() else { return };
        let m = n.raft().metrics().borrow().clone();
        if m.current_term != term || m.current_leader != Some(n.id()) {
            return;
        }
        let read = match n.linearizable().await {
            Ok(()) => n.events(crate::groups::EVENTS_KEPT as usize).await,
            Err(e) => Err(write_error(e)),
        };
        match read {
            Ok(events) => {
                // A task of an older term that ends late leaves a newer
                // term's answer alone.
                let mut slot = out.lock().unwrap_or_else(PoisonError::into_inner);
                if slot.as_ref().is_none_or(|(t, _)| *t <= term) {
                    *slot = Some((term, lost_in(&events)));
                }
                return;
            }
            Err(e) => tracing::debug!(term, "reading the lost nodes from the cluster log: {e}"),
        }
        let heartbeat = Duration::from_millis(n.timing().heartbeat_ms.max(1));
        drop(n);
        tokio::time::sleep(heartbeat).await;
    }
}

/// The NodeLost / NodeBack events of one look, updating `lost`: a member is
/// lost while it is neither live (renewing its lease with this leader) nor
/// pending (just joined, or this leader is too new to tell); it is back
/// once live again. A member is reported lost once, and back only after
/// that; one that left the membership is forgotten.
fn node_changes(
    lost: &mut BTreeSet<NodeId>,
    members: &BTreeSet<NodeId>,
    live: &BTreeSet<NodeId>,
    pending: &BTreeSet<NodeId>,
) -> Vec<(NodeId, EventKind)> {
    lost.retain(|id| members.contains(id));
    let mut changes = Vec::new();
    for id in members {
        if live.contains(id) {
            if lost.remove(id) {
                changes.push((*id, EventKind::NodeBack));
            }
        } else if !pending.contains(id) && lost.insert(*id) {
            changes.push((*id, EventKind::NodeLost));
        }
    }
    changes
}

/// What a majority testified to the leader of `term`, on its clock.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Testimonies {
    term: u64,
    /// The latest instant at which a leader of an older term can have
    /// confirmed a lease renewal.
    older: Instant,
    /// Per requester, the latest vouch any of them made.
    vouched: BTreeMap<NodeId, Instant>,
}

impl Testimonies {
    /// Combines the answers of a majority: the latest of each.
    fn of(term: u64, answers: &BTreeMap<NodeId, Testified>) -> Option<Testimonies> {
        let older = answers.values().map(|t| t.older).max()?;
        let mut vouched: BTreeMap<NodeId, Instant> = BTreeMap::new();
        for (id, at) in answers.values().flat_map(|t| t.vouches.iter()) {
            let slot = vouched.entry(*id).or_insert(*at);
            *slot = (*slot).max(*at);
        }
        Some(Testimonies { term, older, vouched })
    }

    /// The latest instant from which `owner`'s lease can run, for this
    /// term's leader that noticed it leads at `since`, last received
    /// `owner`'s lease request at `request`, and cannot rule out a vouch it
    /// does not know of at `unseen` ([`unseen_vouch`]): the fencing delay
    /// counts from there (see the module documentation).
    fn last_renewal(
        &self,
        owner: NodeId,
        request: Option<Instant>,
        since: Instant,
        unseen: Option<Instant>,
    ) -> Instant {
        let mut last = self.older.min(since);
        for at in [request, self.vouched.get(&owner).copied(), unseen].into_iter().flatten() {
            last = last.max(at);
        }
        last
    }
}

/// The latest instant at which a lease renewal by vouches may have been
/// sent that this leader (since `since`) can neither learn from the
/// testimony nor rule out by its quorum's acknowledgements: an unfresh
/// instant, from `since + silence - window` on (earlier requests are
/// either told in the testimony or refused; see the module documentation).
fn unseen_vouch(unfresh: Option<Instant>, since: Instant, vouching: Vouching) -> Option<Instant> {
    let from = since + vouching.silence - vouching.window;
    unfresh.filter(|at| *at >= from)
}

/// Asks every voter of `term`'s membership when it last acknowledged, or
/// stopped leading, an older term, and whose lease it vouched for when,
/// until a majority (this node included) has answered; then records the
/// latest of those instants (converted to this node's clock: the arrival of
/// the answer minus the time it states, which can only make it later).
/// Gives up when the node no longer leads `term`.
async fn gather_testimony(
    node: Weak<ClusterNode>,
    term: u64,
    voters: Vec<NodeId>,
    out: Arc<Mutex<Option<Testimonies>>>,
) {
    let majority = voters.len() / 2 + 1;
    let mut heard: BTreeMap<NodeId, Testified> = BTreeMap::new();
    loop {
        let Some(n) = node.upgrade() else { return };
        let m = n.raft().metrics().borrow().clone();
        if m.current_term != term || m.current_leader != Some(n.id()) {
            return;
        }
        let mut asks = tokio::task::JoinSet::new();
        let unheard: Vec<NodeId> = voters.iter().copied().filter(|id| !heard.contains_key(id)).collect();
        for id in unheard {
            if id == n.id() {
                if let Some(told) = n.testimony.testify(term) {
                    heard.insert(id, told);
                }
                continue;
            }
            let Some(info) = m.membership_config.nodes().find(|(x, _)| **x == id).map(|(_, i)| i.clone()) else {
                continue;
            };
            let transport = n.transport().clone();
            let within = Duration::from_millis(n.timing().election_max_ms.max(50));
            asks.spawn(async move {
                let answer = tokio::time::timeout(within, transport.call(id, &info, Request::Testimony { term })).await;
                (id, answer, Instant::now())
            });
        }
        let heartbeat = Duration::from_millis(n.timing().heartbeat_ms.max(1));
        drop(n);
        while let Some(Ok((id, answer, arrived))) = asks.join_next().await {
            if let Ok(Ok(Response::Testimony(Some(answer)))) = answer {
                heard.insert(id, testified_by(&answer, arrived));
            }
        }
        if heard.len() >= majority {
            if let Some(t) = Testimonies::of(term, &heard) {
                tracing::debug!(
                    term,
                    vouched = ?t.vouched.keys().collect::<Vec<_>>(),
                    "older terms testified: last confirmation {:?} ago",
                    t.older.elapsed()
                );
                *out.lock().unwrap_or_else(PoisonError::into_inner) = Some(t);
            }
            return;
        }
        tokio::time::sleep(heartbeat).await;
    }
}

/// The best node for a group: its target if eligible, else the first
/// eligible node of its list; never one in `excluded` or where it failed.
fn pick(spec: &GroupSpec, p: &Placement, eligible: &dyn Fn(&NodeId) -> bool, excluded: &[NodeId]) -> Option<NodeId> {
    let ok = |id: &NodeId| eligible(id) && !excluded.contains(id) && !p.failed_on.contains(id);
    if let GroupTarget::Node(t) = p.target {
        if spec.nodes.contains(&t) && ok(&t) {
            return Some(t);
        }
    }
    spec.nodes.iter().copied().find(|id| ok(id))
}

/// Whether the node [`pick`] would choose, if the nodes that have not yet
/// renewed their lease with this leader counted, is one of those: then the
/// decision waits for it rather than start the group elsewhere.
fn waits_for_a_late_node(
    spec: &GroupSpec,
    p: &Placement,
    eligible: &dyn Fn(&NodeId) -> bool,
    pending: &dyn Fn(&NodeId) -> bool,
    excluded: &[NodeId],
) -> bool {
    pick(spec, p, &|id| eligible(id) || pending(id), excluded).is_some_and(|id| pending(&id))
}

type Decision = (Command, Option<(EventKind, String)>);

/// The leader's decision for one group, if any.
fn decide(
    spec: &GroupSpec,
    p: &Placement,
    eligible: &dyn Fn(&NodeId) -> bool,
    fenced: &dyn Fn(NodeId) -> bool,
    pending: &dyn Fn(&NodeId) -> bool,
) -> Option<Decision> {
    let assign = |owner: Option<NodeId>, state: GroupState, event: Option<StartEvent>, failed: Option<NodeId>| {
        Command::AssignGroup { group: spec.name.clone(), epoch: p.epoch, owner, state, event, failed }
    };
    let start_on = |n: Option<NodeId>, event: StartEvent, failed: Option<NodeId>| match n {
        Some(n) => assign(Some(n), GroupState::Starting, Some(event), failed),
        None => assign(None, GroupState::Offline, Some(event), failed),
    };
    match (p.state, p.owner) {
        (GroupState::Offline, _) => {
            if p.target == GroupTarget::Stopped {
                return None;
            }
            // The node it should start on may be one that has not asked
            // for its lease yet (just joined, or we just became leader):
            // wait for it rather than start elsewhere.
            if waits_for_a_late_node(spec, p, eligible, pending, &[]) {
                return None;
            }
            let n = pick(spec, p, eligible, &[])?;
            let event = p.event.unwrap_or(StartEvent::Start);
            Some((
                start_on(Some(n), event, None),
                Some((EventKind::GroupStart, format!("starting on node {n} ({event})"))),
            ))
        }
        (GroupState::Starting | GroupState::Online | GroupState::Stopping, Some(o)) if fenced(o) => {
            // A new leader may fence a dead owner before the other nodes
            // have renewed their leases with it: wait for a better-placed
            // node that is only late, rather than pass it over.
            if waits_for_a_late_node(spec, p, eligible, pending, &[o]) {
                return None;
            }
            let n = pick(spec, p, eligible, &[o]);
            let text = match n {
                Some(n) => format!("node {o} silent beyond the fencing delay: failing over to node {n}"),
                None => format!("node {o} silent beyond the fencing delay: no node to fail over to"),
            };
            Some((start_on(n, StartEvent::Failover, None), Some((EventKind::GroupFailover, text))))
        }
        (GroupState::Starting | GroupState::Online, Some(o)) => {
            if p.target == GroupTarget::Stopped {
                return Some((
                    assign(Some(o), GroupState::Stopping, Some(StartEvent::Start), None),
                    Some((EventKind::GroupStop, format!("stopping on node {o}"))),
                ));
            }
            if let GroupTarget::Node(t) = p.target {
                if t != o && eligible(&t) && !p.failed_on.contains(&t) {
                    return Some((
                        assign(Some(o), GroupState::Stopping, Some(StartEvent::Start), None),
                        Some((EventKind::GroupMove, format!("moving from node {o} to node {t}"))),
                    ));
                }
                return None;
            }
            if spec.failback == crate::groups::Failback::Auto {
                let best = pick(spec, p, eligible, &[])?;
                let rank = |id: NodeId| spec.nodes.iter().position(|x| *x == id).unwrap_or(usize::MAX);
                if rank(best) < rank(o) {
                    return Some((
                        assign(Some(o), GroupState::Stopping, Some(StartEvent::Start), None),
                        Some((EventKind::GroupMove, format!("failback from node {o} to node {best}"))),
                    ));
                }
            }
            None
        }
        (GroupState::Failed, Some(o)) => match pick(spec, p, eligible, &[o]) {
            Some(n) => Some((
                start_on(Some(n), StartEvent::Failover, Some(o)),
                Some((EventKind::GroupFailover, format!("failed on node {o}: failing over to node {n}"))),
            )),
            // Failed wherever it may run: it stays Failed (with no owner)
            // for the operator to see, until `group start` clears the
            // failures.
            None => Some((
                assign(None, GroupState::Failed, Some(StartEvent::Failover), Some(o)),
                Some((EventKind::GroupFailed, format!("failed on node {o}: no node to fail over to"))),
            )),
        },
        // Failed everywhere: waits for the operator (`group start` forgets
        // the failures, then it starts again).
        (GroupState::Failed, None) if !p.failed_on.is_empty() => None,
        // Inconsistent (no owner): offline.
        (GroupState::Starting | GroupState::Online | GroupState::Stopping | GroupState::Failed, None) => {
            Some((assign(None, GroupState::Offline, p.event, None), None))
        }
        // Stopping with a live owner: wait for its report. StopFailed:
        // wait for the owner to manage the stop (see the module docs).
        _ => None,
    }
}

// ---------------------------------------------------------------------------
// The agent (every node)

async fn agent_loop(node: Weak<ClusterNode>, driver: Arc<dyn ResourceDriver>, events: EventTx) {
    let mut workers: BTreeMap<String, tokio::task::JoinHandle<()>> = BTreeMap::new();
    let mut rx = match node.upgrade() {
        Some(n) => n.group_table.clone(),
        None => return,
    };
    loop {
        let names: Vec<String> = rx.borrow_and_update().groups.keys().cloned().collect();
        workers.retain(|_, h| !h.is_finished());
        for name in names {
            if let std::collections::btree_map::Entry::Vacant(slot) = workers.entry(name) {
                let w = Worker::new(node.clone(), driver.clone(), events.clone(), slot.key().clone());
                slot.insert(tokio::spawn(w.run()));
            }
        }
        // A worker exits by itself once its group is gone and stopped.
        let tick = node.upgrade().map(|n| n.timing().groups.tick()).unwrap_or(Duration::from_millis(20));
        let _ = tokio::time::timeout(tick * 10, rx.changed()).await;
        if node.strong_count() == 0 {
            for (_, h) in workers {
                h.abort();
            }
            return;
        }
    }
}

/// One group's worker: starts, monitors and stops it on this node.
struct Worker {
    node: Weak<ClusterNode>,
    driver: Arc<dyn ResourceDriver>,
    events: EventTx,
    name: String,
    /// Resources started here and not stopped, in start order.
    held: Vec<ResourceSpec>,
    /// The spec the held resources were started with.
    held_spec: Option<GroupSpec>,
    /// Local restarts in `restarts_epoch`.
    restarts: u32,
    restarts_epoch: u64,
    /// The next start is a local recovery.
    recovering: bool,
    /// This node held its lease at the last look (a node that gains it —
    /// at its start, or back after a cut — has returned).
    had_lease: bool,
    /// The epoch this node gave up on (reported Failed).
    failed_epoch: Option<u64>,
    /// The last report written (epoch, report), and the last attempt.
    reported: Option<(u64, GroupReport)>,
    last_attempt: Option<Instant>,
    next_monitor: Instant,
    /// The members found silent at the last look while running the group.
    silent: BTreeSet<NodeId>,
}

enum StartOutcome {
    Started,
    /// A resource failed (name, error).
    Failed(ResourceError),
    /// The lease ran out, or ownership changed, during the start.
    Interrupted,
}

impl Worker {
    fn new(node: Weak<ClusterNode>, driver: Arc<dyn ResourceDriver>, events: EventTx, name: String) -> Self {
        Worker {
            node,
            driver,
            events,
            name,
            held: Vec::new(),
            held_spec: None,
            restarts: 0,
            restarts_epoch: u64::MAX,
            recovering: false,
            had_lease: false,
            failed_epoch: None,
            reported: None,
            last_attempt: None,
            next_monitor: Instant::now(),
            silent: BTreeSet::new(),
        }
    }

    fn log(&self, me: NodeId, kind: EventKind, resource: Option<&str>, text: String) {
        let _ = self.events.send(event(me, kind, Some(&self.name), resource, text));
    }

    async fn run(mut self) {
        self.clear_leftovers().await;
        loop {
            let Some(n) = self.node.upgrade() else { return };
            let tick = n.timing().groups.tick();
            let done = self.step(&n).await;
            drop(n);
            if done {
                return;
            }
            tokio::time::sleep(tick).await;
        }
    }

    /// This node has returned (its process started, or it is back after
    /// a cut) while the group, which may run here, runs on another node:
    /// its scripts are told so, as the original product told them
    /// (`ARMS_EVENT=RECOVER` to the start script on the returning node; the
    /// seed's start script only logs it). Nothing is started or held; a
    /// script's failure is logged.
    fn recover_notice(&self, n: &Arc<ClusterNode>, spec: &GroupSpec, p: &Placement) {
        let me = n.id();
        let elsewhere = p.owner.is_some_and(|o| o != me) && p.state == GroupState::Online;
        if !elsewhere || !spec.nodes.contains(&me) {
            return;
        }
        let context =
            StartContext { event: StartEvent::Recover, home: spec.nodes.first() == Some(&me), disk_ok: false };
        let (driver, spec) = (self.driver.clone(), spec.clone());
        tokio::spawn(async move {
            for r in &spec.resources {
                driver.recover(&spec, r, &context).await;
            }
        });
    }

    /// A process that died (crash, SIGKILL) leaves its floating addresses
    /// on the interface, and it would answer ARP for an address that
    /// another node now holds: before anything else, this node removes the
    /// group's addresses (and whatever else stops fast and idempotently).
    /// If it still owns the group, the start below adds them again.
    async fn clear_leftovers(&self) {
        let Some(n) = self.node.upgrade() else { return };
        let (Some(spec), _) = self.current(&n) else { return };
        let budget = n.timing().groups.stop_budget(&spec, true);
        for r in spec.resources.iter().rev().filter(|r| r.stops_fast()) {
            match tokio::time::timeout(budget, self.driver.stop(&spec, r, budget)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!(group = %self.name, resource = r.name(), "clearing a leftover: {e}"),
                Err(_) => tracing::warn!(group = %self.name, resource = r.name(), "clearing a leftover timed out"),
            }
        }
    }

    fn current(&self, n: &ClusterNode) -> (Option<GroupSpec>, Placement) {
        let t = n.group_table.borrow();
        (t.groups.get(&self.name).cloned(), t.placement.get(&self.name).cloned().unwrap_or_default())
    }

    fn wants(&self, n: &ClusterNode, p: &Placement) -> bool {
        p.owner == Some(n.id())
            && matches!(p.state, GroupState::Starting | GroupState::Online)
            && self.failed_epoch != Some(p.epoch)
            && n.holds_lease()
    }

    /// One look at the group; `true` when the worker can exit.
    async fn step(&mut self, n: &Arc<ClusterNode>) -> bool {
        let me = n.id();
        let (spec, p) = self.current(n);
        let lease = n.holds_lease();
        if lease && !self.had_lease {
            if let Some(spec) = &spec {
                self.recover_notice(n, spec, &p);
            }
        }
        self.had_lease = lease;
        let want = spec.is_some() && self.wants(n, &p);
        if !want && !self.held.is_empty() {
            let why = if p.owner != Some(me) {
                "no longer the owner".to_string()
            } else if !n.holds_lease() {
                "quorum lease lost".to_string()
            } else {
                format!("group {}", p.state)
            };
            if self.stop_all(n, &why, !n.holds_lease()).await {
                if p.owner == Some(me) && matches!(p.state, GroupState::Stopping | GroupState::StopFailed) {
                    self.report(n, &p, GroupReport::Offline).await;
                }
            } else if p.owner == Some(me) {
                self.report(n, &p, GroupReport::StopFailed).await;
            }
            return false;
        }
        let Some(spec) = spec else { return self.held.is_empty() };
        if p.owner == Some(me) && matches!(p.state, GroupState::Stopping | GroupState::StopFailed) {
            self.report(n, &p, GroupReport::Offline).await;
            return false;
        }
        if !want {
            return false;
        }
        if self.restarts_epoch != p.epoch {
            self.restarts_epoch = p.epoch;
            self.restarts = 0;
            self.recovering = false;
        }
        if self.held.is_empty() {
            // Make sure no later decision took the group away (see the
            // module documentation), then start.
            if n.linearizable().await.is_err() {
                return false;
            }
            let (spec2, p2) = self.current(n);
            if spec2.as_ref() != Some(&spec) || p2.epoch != p.epoch || !self.wants(n, &p2) {
                return false;
            }
            // A local restart after a failure starts the group as it was
            // started (its scripts must start the service again): RECOVER
            // is the notice to a node that returns (see `recover_notice`).
            let event = p.event.unwrap_or(StartEvent::Start);
            match self.start_all(n, &spec, &p, event).await {
                StartOutcome::Started => {
                    self.recovering = false;
                    self.next_monitor = Instant::now() + Duration::from_millis(n.timing().groups.monitor_interval_ms);
                    self.report(n, &p, GroupReport::Online).await;
                }
                StartOutcome::Interrupted => {}
                StartOutcome::Failed(e) => self.resource_failed(n, &spec, &p, e).await,
            }
            return false;
        }
        if p.state == GroupState::Starting || self.reported != Some((p.epoch, GroupReport::Online)) {
            self.report(n, &p, GroupReport::Online).await;
        }
        // A node that was cut off is back (a partition healed): hosts that
        // followed it meanwhile learn again where the group's address is.
        let members: Vec<NodeId> = n.raft().metrics().borrow().membership_config.nodes().map(|(id, _)| *id).collect();
        let silent: BTreeSet<NodeId> = members.into_iter().filter(|id| *id != me && n.peer_silent(*id)).collect();
        if let Some(back) = self.silent.iter().find(|id| !silent.contains(id)) {
            self.log(me, EventKind::Note, None, format!("node {back} is back: announcing the group's addresses again"));
            for r in self.held.clone() {
                self.driver.reannounce(&spec, &r).await;
            }
        }
        self.silent = silent;
        if Instant::now() >= self.next_monitor {
            self.next_monitor = Instant::now() + Duration::from_millis(n.timing().groups.monitor_interval_ms);
            for r in self.held.clone() {
                if let Err(e) = self.driver.monitor(&spec, &r).await {
                    self.resource_failed(n, &spec, &p, e).await;
                    break;
                }
            }
        }
        false
    }

    /// A resource failed to start or its monitor failed: stop the group
    /// here, then restart it locally or give it up.
    async fn resource_failed(&mut self, n: &Arc<ClusterNode>, spec: &GroupSpec, p: &Placement, e: ResourceError) {
        let me = n.id();
        self.log(me, EventKind::ResourceFailure, Some(&e.resource), e.message.clone());
        if !self.stop_all(n, "resource failure", !n.holds_lease()).await {
            self.report(n, p, GroupReport::StopFailed).await;
            return;
        }
        if !e.permanent && self.restarts < spec.max_restarts {
            self.restarts += 1;
            self.recovering = true;
            self.log(
                me,
                EventKind::GroupStart,
                None,
                format!("restarting locally ({} of {})", self.restarts, spec.max_restarts),
            );
        } else {
            self.failed_epoch = Some(p.epoch);
            self.log(me, EventKind::GroupFailed, None, format!("failed on node {me}: {e}"));
            self.report(n, p, GroupReport::Failed).await;
        }
    }

    /// Starts the resources in order; stops at the first failure (the
    /// resources started are left in `held`). Gives up at once if the lease
    /// runs out or the placement changes meanwhile.
    async fn start_all(
        &mut self,
        n: &Arc<ClusterNode>,
        spec: &GroupSpec,
        p: &Placement,
        event: StartEvent,
    ) -> StartOutcome {
        let me = n.id();
        let home = spec.nodes.first() == Some(&me);
        // A failed resource (a disk included) fails the start, so every
        // resource that starts comes after the group's disk started.
        let disk_ok = true;
        self.held_spec = Some(spec.clone());
        for r in &spec.resources {
            if !self.still_wanted(n, p) {
                return StartOutcome::Interrupted;
            }
            let ctx = StartContext { event, home, disk_ok };
            // The resource is held from the moment its start begins: if it
            // is interrupted, it is stopped like the others.
            self.held.push(r.clone());
            let start = self.driver.start(spec, r, &ctx);
            let result = tokio::select! {
                r = start => Some(r),
                _ = self.lost(n, p) => None,
            };
            match result {
                None => return StartOutcome::Interrupted,
                Some(Ok(())) => {
                    self.log(me, EventKind::ResourceStart, Some(r.name()), format!("started ({event})"));
                }
                Some(Err(e)) => return StartOutcome::Failed(e),
            }
        }
        StartOutcome::Started
    }

    fn still_wanted(&self, n: &ClusterNode, p: &Placement) -> bool {
        let (_, now) = self.current(n);
        now.epoch == p.epoch && self.wants(n, &now)
    }

    /// Resolves when the group must stop (lease lost or placement changed).
    async fn lost(&self, n: &ClusterNode, p: &Placement) {
        let tick = n.timing().groups.tick();
        while self.still_wanted(n, p) {
            tokio::time::sleep(tick).await;
        }
    }

    /// Stops the held resources in reverse order, within the group's stop
    /// budget (the short one when `fenced`: the lease is gone, and the
    /// leader counts on that budget before it starts the group elsewhere).
    /// `false` if one could not be stopped (it stays held).
    async fn stop_all(&mut self, n: &Arc<ClusterNode>, why: &str, fenced: bool) -> bool {
        let me = n.id();
        let Some(spec) = self.held_spec.clone() else {
            self.held.clear();
            return true;
        };
        let budget = n.timing().groups.stop_budget(&spec, fenced);
        let deadline = Instant::now() + budget;
        while let Some(r) = self.held.last().cloned() {
            let remaining = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(remaining, self.driver.stop(&spec, &r, remaining)).await {
                Ok(Ok(())) => {
                    self.held.pop();
                    self.log(me, EventKind::ResourceStop, Some(r.name()), format!("stopped ({why})"));
                }
                Ok(Err(e)) => {
                    self.log(me, EventKind::ResourceFailure, Some(r.name()), format!("stop failed: {}", e.message));
                    return false;
                }
                Err(_) => {
                    let text = format!(
                        "stop timed out: the group's stop budget of {} ms ran out (the group's stop_timeout_ms, \
                         else the scripts' timeout_secs plus [cluster] group_stop_timeout_ms)",
                        budget.as_millis()
                    );
                    self.log(me, EventKind::ResourceFailure, Some(r.name()), text);
                    return false;
                }
            }
        }
        true
    }

    /// Writes a report unless this one was written already (retried at
    /// most every 200 ms while it does not go through).
    async fn report(&mut self, n: &Arc<ClusterNode>, p: &Placement, report: GroupReport) {
        if self.reported == Some((p.epoch, report)) && !matches!(report, GroupReport::Offline | GroupReport::StopFailed)
        {
            return;
        }
        if self.last_attempt.is_some_and(|t| t.elapsed() < Duration::from_millis(200)) {
            return;
        }
        self.last_attempt = Some(Instant::now());
        let cmd = Command::GroupReport { group: self.name.clone(), node: n.id(), epoch: p.epoch, report };
        if let Ok(r) = n.write(cmd).await {
            if r == CommandResult::Done {
                self.last_attempt = None;
            }
            self.reported = Some((p.epoch, report));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::groups::Failback;

    fn spec(nodes: &[u64], failback: Failback) -> GroupSpec {
        GroupSpec {
            name: "g".into(),
            nodes: nodes.iter().map(|n| NodeId(*n)).collect(),
            failback,
            resources: vec![],
            max_restarts: 1,
            stop_timeout_ms: None,
        }
    }

    #[test]
    fn the_stop_budget_covers_the_scripts_timeouts() {
        let t = GroupTiming::default();
        let exec =
            |secs| ResourceSpec::Exec { name: "s".into(), start: "a".into(), stop: "b".into(), timeout_secs: secs };
        let ip = ResourceSpec::LoopbackIp { name: "ip".into(), address: "127.0.0.77".into() };
        let mut g = spec(&[1, 2], Failback::Manual);
        // Addresses only: the fast budget when fenced, else the cluster's.
        g.resources = vec![ip.clone()];
        assert_eq!(t.stop_budget(&g, true), Duration::from_millis(100));
        assert_eq!(t.stop_budget(&g, false), Duration::from_millis(2000));
        // A script with 30 s of its own, and one with none: 30 s + 2 s.
        g.resources = vec![ip, exec(30), exec(0)];
        assert_eq!(t.stop_budget(&g, true), Duration::from_millis(32_000));
        assert_eq!(t.fence_delay(&g), Duration::from_millis(600 + 32_000 + 100));
        // The group's own figure wins.
        g.stop_timeout_ms = Some(5000);
        assert_eq!(t.stop_budget(&g, false), Duration::from_millis(5000));
    }

    fn ids(list: &[u64]) -> BTreeSet<NodeId> {
        list.iter().map(|n| NodeId(*n)).collect()
    }

    #[test]
    fn a_member_is_lost_once_and_back_only_after_a_loss() {
        let members = ids(&[1, 2, 3]);
        let mut lost = BTreeSet::new();
        // All live: nothing.
        assert!(node_changes(&mut lost, &members, &members, &ids(&[])).is_empty());
        // 3 stops renewing: lost, once.
        assert_eq!(node_changes(&mut lost, &members, &ids(&[1, 2]), &ids(&[])), [(NodeId(3), EventKind::NodeLost)]);
        assert!(node_changes(&mut lost, &members, &ids(&[1, 2]), &ids(&[])).is_empty());
        // Back, once.
        assert_eq!(node_changes(&mut lost, &members, &members, &ids(&[])), [(NodeId(3), EventKind::NodeBack)]);
        assert!(node_changes(&mut lost, &members, &members, &ids(&[])).is_empty());
        // A member that just joined and has not renewed yet is pending: no
        // loss, and so no return when it starts renewing.
        let members4 = ids(&[1, 2, 3, 4]);
        assert!(node_changes(&mut lost, &members4, &members, &ids(&[4])).is_empty());
        assert!(node_changes(&mut lost, &members4, &members4, &ids(&[])).is_empty());
        // A lost member removed from the membership is forgotten.
        assert_eq!(node_changes(&mut lost, &members4, &members, &ids(&[])), [(NodeId(4), EventKind::NodeLost)]);
        assert!(node_changes(&mut lost, &members, &members, &ids(&[])).is_empty());
        assert!(lost.is_empty());
    }

    #[test]
    fn a_new_leader_reports_its_dead_predecessor_and_no_loss_twice() {
        // Leader 1 reported node 5 lost, then died; node 2 leads. Every
        // node other than 2 is pending at first, then 3 and 4 renew.
        let at = |node: u64, kind: EventKind| ClusterEvent {
            seq: 0,
            at_ms: 0,
            node: NodeId(node),
            group: None,
            resource: None,
            kind,
            text: String::new(),
        };
        let log = [
            at(4, EventKind::NodeLost),
            at(4, EventKind::NodeBack),
            at(1, EventKind::GroupStart),
            at(5, EventKind::NodeLost),
        ];
        let mut lost = lost_in(&log);
        assert_eq!(lost, ids(&[5]));
        let members = ids(&[1, 2, 3, 4, 5]);
        assert!(node_changes(&mut lost, &members, &ids(&[2]), &ids(&[1, 3, 4, 5])).is_empty());
        assert!(node_changes(&mut lost, &members, &ids(&[2, 3, 4]), &ids(&[1, 5])).is_empty());
        // Past the warm-up: the old leader is lost (5 was already).
        assert_eq!(node_changes(&mut lost, &members, &ids(&[2, 3, 4]), &ids(&[])), [(NodeId(1), EventKind::NodeLost)]);
        // 5 comes back: its return follows the loss leader 1 reported.
        assert_eq!(
            node_changes(&mut lost, &members, &ids(&[2, 3, 4, 5]), &ids(&[])),
            [(NodeId(5), EventKind::NodeBack)]
        );
    }

    #[test]
    fn next_after_cycles_and_skips_the_current() {
        let nodes = [NodeId(1), NodeId(2), NodeId(3)];
        assert_eq!(next_after(&nodes, Some(NodeId(1))), Some(NodeId(2)));
        assert_eq!(next_after(&nodes, Some(NodeId(3))), Some(NodeId(1)));
        assert_eq!(next_after(&nodes, None), Some(NodeId(1)));
        assert_eq!(next_after(&[NodeId(1)], Some(NodeId(1))), None);
    }

    #[test]
    fn a_group_failed_everywhere_stays_failed_until_started_again() {
        let s = spec(&[1], Failback::Manual);
        let all = |_: &NodeId| true;
        let never = |_: NodeId| false;
        let failed = Placement { owner: Some(NodeId(1)), state: GroupState::Failed, ..Placement::default() };
        let (cmd, _) = decide(&s, &failed, &all, &never, &|_| false).unwrap();
        assert!(matches!(
            cmd,
            Command::AssignGroup { owner: None, state: GroupState::Failed, failed: Some(NodeId(1)), .. }
        ));
        // Applied: no owner, failed on node 1. Nothing more until an
        // operator's `group start` forgets the failures.
        let mut p = Placement { owner: None, state: GroupState::Failed, ..Placement::default() };
        p.failed_on.push(NodeId(1));
        assert!(decide(&s, &p, &all, &never, &|_| false).is_none());
        p.failed_on.clear();
        let (cmd, _) = decide(&s, &p, &all, &never, &|_| false).unwrap();
        assert!(matches!(cmd, Command::AssignGroup { owner: None, state: GroupState::Offline, .. }));
    }

    #[test]
    fn a_new_group_waits_for_a_home_node_that_just_joined() {
        let s = spec(&[1, 2, 3], Failback::Manual);
        let not1 = |id: &NodeId| *id != NodeId(1);
        let never = |_: NodeId| false;
        let p = Placement::default();
        // Node 1 (home) has not asked for its lease yet: no decision.
        assert!(decide(&s, &p, &not1, &never, &|id: &NodeId| *id == NodeId(1)).is_none());
        // Past its warm-up it counts as down: node 2.
        let (cmd, _) = decide(&s, &p, &not1, &never, &|_| false).unwrap();
        assert!(matches!(cmd, Command::AssignGroup { owner: Some(NodeId(2)), .. }));
        // A pending node further down the list does not hold it up.
        let all = |_: &NodeId| true;
        let (cmd, _) = decide(&s, &p, &all, &never, &|id: &NodeId| *id == NodeId(3)).unwrap();
        assert!(matches!(cmd, Command::AssignGroup { owner: Some(NodeId(1)), .. }));
    }

    #[test]
    fn decisions() {
        let s = spec(&[1, 2, 3], Failback::Manual);
        let all = |_: &NodeId| true;
        let not1 = |id: &NodeId| *id != NodeId(1);
        let never = |_: NodeId| false;
        let always = |_: NodeId| true;
        // Offline → the home node, START.
        let p = Placement::default();
        let (cmd, _) = decide(&s, &p, &all, &never, &|_| false).unwrap();
        assert!(matches!(
            cmd,
            Command::AssignGroup {
                owner: Some(NodeId(1)),
                state: GroupState::Starting,
                event: Some(StartEvent::Start),
                ..
            }
        ));
        // Online on 1, silent → node 2 with FAILOVER.
        let p = Placement { owner: Some(NodeId(1)), state: GroupState::Online, epoch: 4, ..Placement::default() };
        let (cmd, _) = decide(&s, &p, &not1, &always, &|_| false).unwrap();
        assert!(matches!(
            cmd,
            Command::AssignGroup { epoch: 4, owner: Some(NodeId(2)), event: Some(StartEvent::Failover), .. }
        ));
        // ... but not while node 2 has yet to renew with a new leader.
        let only3 = |id: &NodeId| *id == NodeId(3);
        assert!(decide(&s, &p, &only3, &always, &|id: &NodeId| *id == NodeId(2)).is_none());
        // Online on 2, node 1 back, manual failback: stays.
        let p = Placement { owner: Some(NodeId(2)), state: GroupState::Online, ..Placement::default() };
        assert!(decide(&s, &p, &all, &never, &|_| false).is_none());
        // Auto failback: stop on 2.
        let s2 = spec(&[1, 2, 3], Failback::Auto);
        let (cmd, _) = decide(&s2, &p, &all, &never, &|_| false).unwrap();
        assert!(matches!(cmd, Command::AssignGroup { owner: Some(NodeId(2)), state: GroupState::Stopping, .. }));
        // Move target.
        let p = Placement { target: GroupTarget::Node(NodeId(3)), ..p };
        let (cmd, _) = decide(&s, &p, &all, &never, &|_| false).unwrap();
        assert!(matches!(cmd, Command::AssignGroup { state: GroupState::Stopping, .. }));
        // Failed on 2 → 1 (not 2), remembered.
        let p = Placement { owner: Some(NodeId(2)), state: GroupState::Failed, ..Placement::default() };
        let (cmd, _) = decide(&s, &p, &all, &never, &|_| false).unwrap();
        assert!(matches!(cmd, Command::AssignGroup { owner: Some(NodeId(1)), failed: Some(NodeId(2)), .. }));
        // Stop-failed: nothing, even if silent.
        let p = Placement { owner: Some(NodeId(2)), state: GroupState::StopFailed, ..Placement::default() };
        assert!(decide(&s, &p, &all, &always, &|_| false).is_none());
    }

    #[test]
    fn a_failover_waits_only_for_the_node_it_would_pick() {
        let s = spec(&[1, 2, 3], Failback::Manual);
        let always = |_: NodeId| true;
        let only3 = |id: &NodeId| *id == NodeId(3);
        let late2 = |id: &NodeId| *id == NodeId(2);
        let owned_by_1 =
            Placement { owner: Some(NodeId(1)), state: GroupState::Online, epoch: 4, ..Placement::default() };
        // The operator moved it to 3, which is ready: the late node 2,
        // earlier in the list, is not waited for.
        let p = Placement { target: GroupTarget::Node(NodeId(3)), ..owned_by_1.clone() };
        let (cmd, _) = decide(&s, &p, &only3, &always, &late2).unwrap();
        assert!(matches!(cmd, Command::AssignGroup { owner: Some(NodeId(3)), .. }), "{cmd:?}");
        // The target itself late: wait for it.
        let p = Placement { target: GroupTarget::Node(NodeId(2)), ..owned_by_1 };
        assert!(decide(&s, &p, &only3, &always, &late2).is_none());
    }

    fn grants(list: &[(u64, u64)]) -> BTreeMap<NodeId, u64> {
        list.iter().map(|(id, term)| (NodeId(*id), *term)).collect()
    }

    #[test]
    fn a_vouched_lease_needs_a_majority_in_one_term() {
        let three = [ids(&[1, 2, 3])];
        // Itself and one other voter, same term: a majority of three.
        assert!(vouched_by_majority(&three, &grants(&[(2, 7), (3, 7)])));
        // Alone: not.
        assert!(!vouched_by_majority(&three, &grants(&[(2, 7)])));
        // Two voters but in different terms: not (see the module docs).
        assert!(!vouched_by_majority(&three, &grants(&[(2, 7), (3, 8)])));
        // A grant from a non-voter does not count.
        assert!(!vouched_by_majority(&three, &grants(&[(2, 7), (9, 7)])));
        // During a membership change, a majority of each configuration.
        let joint = [ids(&[1, 2, 3]), ids(&[3, 4, 5])];
        assert!(!vouched_by_majority(&joint, &grants(&[(2, 7), (3, 7)])));
        assert!(vouched_by_majority(&joint, &grants(&[(2, 7), (3, 7), (4, 7)])));
        // No configuration: never.
        assert!(!vouched_by_majority(&[], &grants(&[(2, 7)])));
    }

    #[test]
    fn an_answer_converts_to_upper_bounds_on_the_leaders_clock() {
        let now = Instant::now();
        let told = Testified {
            older: now - Duration::from_millis(300),
            vouches: vec![(NodeId(2), now - Duration::from_millis(40))],
        };
        let answer = testimony_answer(&told, now);
        assert_eq!(answer, TestimonyAnswer { older_us: 300_000, vouches_us: vec![(NodeId(2), 40_000)] });
        // It arrives 5 ms later: every instant comes out 5 ms late, never early.
        let arrived = now + Duration::from_millis(5);
        let back = testified_by(&answer, arrived);
        assert_eq!(back.older, told.older + Duration::from_millis(5));
        assert_eq!(back.vouches, vec![(NodeId(2), now - Duration::from_millis(35))]);
        // An instant in the future of the answer counts as its making.
        assert_eq!(micros_since(now + Duration::from_millis(1), now), 0);
        // Any age, however large, gives an instant (no panic).
        assert!(before_arrival(arrived, u64::MAX) <= arrived);
    }

    #[test]
    fn the_fence_counts_from_the_latest_vouch_a_majority_tells() {
        let base = Instant::now();
        let ms = |n: u64| base + Duration::from_millis(n);
        let told = |older: u64, vouches: &[(u64, u64)]| Testified {
            older: ms(older),
            vouches: vouches.iter().map(|(id, at)| (NodeId(*id), ms(*at))).collect(),
        };
        let answers: BTreeMap<NodeId, Testified> =
            [(NodeId(2), told(100, &[(2, 400), (3, 350)])), (NodeId(3), told(120, &[(2, 450)]))].into();
        let t = Testimonies::of(9, &answers).expect("answers");
        assert_eq!(t.older, ms(120));
        assert_eq!(t.vouched, [(NodeId(2), ms(450)), (NodeId(3), ms(350))].into());
        let since = ms(500);
        // Node 2 vouched for at 450: from there, not from the older terms.
        assert_eq!(t.last_renewal(NodeId(2), None, since, None), ms(450));
        // ... unless it asked this leader later.
        assert_eq!(t.last_renewal(NodeId(2), Some(ms(600)), since, None), ms(600));
        // Node 1 (the dead leader) was vouched for by no one: from the older
        // terms' last confirmation.
        assert_eq!(t.last_renewal(NodeId(1), None, since, None), ms(120));
        // The older terms never count past the leader's own start.
        let late = Testimonies { older: ms(900), ..t.clone() };
        assert_eq!(late.last_renewal(NodeId(1), None, since, None), since);
        // A vouch the leader cannot rule out counts like a renewal.
        assert_eq!(t.last_renewal(NodeId(1), None, since, Some(ms(700))), ms(700));
        // Nobody answered: nothing to combine.
        assert!(Testimonies::of(9, &BTreeMap::new()).is_none());
    }

    #[test]
    fn a_leader_is_fresh_only_between_close_confirmations_of_its_term() {
        let base = Instant::now();
        let ms = |n: u64| base + Duration::from_millis(n);
        let limit = Duration::from_millis(200);
        let mut f = Freshness::default();
        // Never confirmed in term 5: every instant is unfresh.
        assert_eq!(f.last_unfresh(5, ms(10), limit), Some(ms(10)));
        // The first confirmation of the term: unfresh until it.
        f.confirmed(5, ms(20), ms(30), limit);
        assert_eq!(f.last_unfresh(5, ms(100), limit), Some(ms(30)));
        // Confirmations less than the limit apart: nothing new.
        f.confirmed(5, ms(120), ms(125), limit);
        f.confirmed(5, ms(220), ms(224), limit);
        assert_eq!(f.last_unfresh(5, ms(400), limit), Some(ms(30)));
        // No confirmation for longer than the limit: unfresh now...
        assert_eq!(f.last_unfresh(5, ms(430), limit), Some(ms(430)));
        // ... and, once confirmed again, unfresh until that confirmation.
        f.confirmed(5, ms(500), ms(510), limit);
        assert_eq!(f.last_unfresh(5, ms(600), limit), Some(ms(510)));
        // A confirmation that ends after a later one does not go back.
        f.confirmed(5, ms(450), ms(520), limit);
        assert_eq!(f.confirmed, Some((5, ms(500))));
        // Another term starts over.
        assert_eq!(f.last_unfresh(6, ms(600), limit), Some(ms(600)));
        f.confirmed(6, ms(610), ms(615), limit);
        assert_eq!(f.last_unfresh(6, ms(700), limit), Some(ms(615)));
    }

    #[test]
    fn only_unfresh_instants_past_the_silence_after_the_election_are_unseen() {
        let since = Instant::now();
        let v = Vouching::new(300);
        assert_eq!(v, Vouching { silence: ms(300), window: ms(100), fresh: ms(200) });
        // Before since + silence - window: a vouch then was told in the
        // testimony or refused.
        assert_eq!(unseen_vouch(Some(since + ms(150)), since, v), None);
        assert_eq!(unseen_vouch(Some(since + ms(200)), since, v), Some(since + ms(200)));
        assert_eq!(unseen_vouch(None, since, v), None);
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }
}
