//! Elections only when one is needed: pre-vote (Ongaro's thesis §9.6).
//!
//! openraft 0.9 campaigns as soon as its election timer fires: it raises
//! its term, then asks for votes. A node cut off from the others does that
//! again and again, its term climbing with every round, and once the
//! partition heals that term deposes a healthy leader (the leader sees the
//! higher term in an answer and steps down, Raft paper §5.1).
//!
//! So openraft's own timer is off ([`openraft::Config::enable_elect`]) and
//! every node runs an [`ElectionAgent`] instead (the decisions here, fed
//! with events and the time; the I/O in [`campaign`]):
//!
//! - **Timer.** A voter that has heard no current leader (an AppendEntries
//!   or InstallSnapshot whose vote it accepts, counted when it arrives, as
//!   openraft counts it) for the leader lease plus a random time
//!   in `[election_min, election_max)` (paper §5.2: random, so that split
//!   votes are rare) asks every voter for a pre-vote: "would you vote for me
//!   at your next term, with this last log id?". Its term does not change.
//! - **Grant.** A voter grants it only if it has itself heard no leader
//!   within the lease, is not a leader that a quorum acknowledged within the
//!   lease, and the candidate's log is at least as up to date as its own
//!   (the vote's own rule, paper §5.4.1). Terms are not compared: a node
//!   with a lower term but the longer log must be able to win, and its real
//!   vote request teaches it the higher term if it loses.
//! - **Election.** With grants from a majority (of each configuration
//!   during a joint membership change, paper §6; its own grant counted),
//!   the node triggers openraft's election, which raises the term and asks
//!   for the real votes; if no leader comes of it, it tries again after a
//!   full timeout. Without a quorum, it tries again after another random
//!   timeout — at the same term.
//! - **Why the lease.** openraft's voters refuse a real vote while the
//!   lease of the leader they follow runs (`election_timeout_max` since they
//!   last accepted its vote, openraft `Engine::handle_vote_req`); a pre-vote
//!   granted inside that window would be followed by a refused vote and a
//!   raised term, the very thing avoided. So the lease is the pre-vote's
//!   window too, and the timer counts from its end, as openraft's own timer
//!   did (lease + random timeout: about 0.5 s with the default timings).
//! - A node that grants its real vote to a candidate waits a full timeout
//!   before campaigning itself (paper §5.2), and drops a round in progress:
//!   under load an election takes a while, and cutting it short with
//!   another one only raises the term.
//! - A node that has just started counts its start as its last contact: it
//!   cannot know yet whether a leader is alive. The sole voter of a cluster
//!   elects itself at once (there is nobody to ask); a learner, or a node
//!   outside the membership, never campaigns.

use std::collections::BTreeSet;
use std::sync::{Arc, PoisonError, Weak};
use std::time::{Duration, Instant};

use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::node::ClusterNode;
use crate::rpc::{Request, Response};
use crate::types::{LogId, NodeId};

/// The timings of the agent, from the node's Raft timings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ElectionTiming {
    /// openraft's leader lease (`election_timeout_max`): how long a voter
    /// that accepted a leader refuses votes to anyone else.
    pub lease: Duration,
    /// The random part of the election timeout: `[min, max)`.
    pub min: Duration,
    pub max: Duration,
}

impl ElectionTiming {
    /// A random election timeout in `[min, max)` (`min` if the range is
    /// empty).
    fn random(&self, rng: &mut impl Rng) -> Duration {
        if self.max <= self.min {
            return self.min;
        }
        rng.gen_range(self.min..self.max)
    }
}

/// A pre-vote request: would the receiver vote for the sender at `term`
/// (the sender's current term + 1), given the sender's last log id?
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreVote {
    pub term: u64,
    pub last_log_id: Option<LogId>,
}

/// The answer to a [`PreVote`], with the receiver's current term (for the
/// sender's log).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreVoteAnswer {
    pub granted: bool,
    pub term: u64,
}

/// Why a pre-vote is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// This node leads and a quorum acknowledged it within the lease.
    LeaderAlive,
    /// This node heard its leader within the lease.
    HeardLeader,
    /// The candidate's log is behind this node's.
    LogBehind,
}

/// The voters of the effective membership: one set, or two during a joint
/// change (paper §6: a decision needs a majority of each).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Voters(Vec<BTreeSet<NodeId>>);

impl Voters {
    pub fn new(configs: Vec<BTreeSet<NodeId>>) -> Self {
        Voters(configs)
    }

    pub fn contains(&self, id: NodeId) -> bool {
        self.0.iter().any(|c| c.contains(&id))
    }

    /// Whether `id` is the only voter (of every configuration).
    pub fn only(&self, id: NodeId) -> bool {
        !self.0.is_empty() && self.0.iter().all(|c| c.len() == 1 && c.contains(&id))
    }

    /// Every voter, once.
    pub fn all(&self) -> BTreeSet<NodeId> {
        self.0.iter().flatten().copied().collect()
    }

    /// Whether `granted` holds a majority of every configuration.
    pub fn quorum(&self, granted: &BTreeSet<NodeId>) -> bool {
        !self.0.is_empty() && self.0.iter().all(|c| c.intersection(granted).count() * 2 > c.len())
    }
}

/// What the node is, as the agent needs it at a poll.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct View {
    pub voters: Voters,
    /// This node is the leader.
    pub leading: bool,
    /// This node is a candidate: its election is in progress.
    pub campaigning: bool,
}

/// What to do next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Nothing before this instant (or the next event).
    Wait(Instant),
    /// Ask these voters (all but this node) for a pre-vote; feed their
    /// answers to [`ElectionAgent::answer`] and end with
    /// [`ElectionAgent::end_round`] at [`Step::Wait`]'s instant at the
    /// latest.
    PreVote { ask: BTreeSet<NodeId>, until: Instant },
    /// Trigger openraft's election now.
    Elect,
}

/// A pre-vote round in progress.
#[derive(Debug)]
struct Round {
    voters: Voters,
    granted: BTreeSet<NodeId>,
    ends: Instant,
}

/// The decisions of one node's elections. See the module documentation.
#[derive(Debug)]
pub struct ElectionAgent<R> {
    me: NodeId,
    timing: ElectionTiming,
    rng: R,
    /// When this node last accepted an AppendEntries or InstallSnapshot of
    /// a current leader (its start, until then).
    last_contact: Instant,
    /// When the next pre-vote round starts (with several voters).
    next_round: Instant,
    /// When the sole voter tries its election (again).
    next_solo: Instant,
    round: Option<Round>,
}

impl<R: Rng> ElectionAgent<R> {
    pub fn new(me: NodeId, timing: ElectionTiming, now: Instant, mut rng: R) -> Self {
        let next_round = now + timing.lease + timing.random(&mut rng);
        ElectionAgent { me, timing, rng, last_contact: now, next_round, next_solo: now, round: None }
    }

    /// This node accepted an AppendEntries or InstallSnapshot of a current
    /// leader at `now`: the timer starts again, a round in progress is
    /// dropped (there is a leader).
    pub fn leader_contact(&mut self, now: Instant) {
        self.last_contact = self.last_contact.max(now);
        self.round = None;
        self.next_round = now + self.timing.lease + self.timing.random(&mut self.rng);
    }

    /// This node granted its real vote to a candidate at `now`: it does not
    /// campaign for a full timeout (granting a vote restarts the election
    /// timer, paper §5.2 and Figure 2), and a round in progress is dropped,
    /// so that it does not cut short the election it voted in. Not a
    /// contact: a candidate is not a leader, pre-votes are still granted.
    pub fn vote_granted(&mut self, now: Instant) {
        self.round = None;
        self.next_round = self.next_round.max(now + self.timing.lease + self.timing.random(&mut self.rng));
    }

    /// What to do now, given what the node is.
    pub fn poll(&mut self, now: Instant, view: &View) -> Step {
        if view.leading {
            // A leader does not campaign; if it steps down, the timer
            // starts from then.
            self.round = None;
            self.next_round = now + self.timing.lease + self.timing.random(&mut self.rng);
            return Step::Wait(now + self.timing.min);
        }
        if !view.voters.contains(self.me) {
            self.round = None;
            return Step::Wait(now + self.timing.min);
        }
        if view.voters.only(self.me) {
            // Its own vote, saved, makes it leader: an election in progress
            // is not started again (that would only raise the term).
            if view.campaigning {
                return Step::Wait(now + self.timing.min);
            }
            if now < self.next_solo {
                return Step::Wait(self.next_solo);
            }
            self.next_solo = now + self.timing.min;
            return Step::Elect;
        }
        if let Some(round) = &self.round {
            if now < round.ends {
                return Step::Wait(round.ends);
            }
            self.end_round(now);
        }
        if now < self.next_round {
            return Step::Wait(self.next_round);
        }
        let until = now + self.timing.max;
        let ask = view.voters.all().into_iter().filter(|id| *id != self.me).collect();
        self.round = Some(Round { voters: view.voters.clone(), granted: BTreeSet::from([self.me]), ends: until });
        Step::PreVote { ask, until }
    }

    /// Voter `from` answered the round in progress. [`Step::Elect`] once a
    /// quorum granted (the round is then over).
    pub fn answer(&mut self, now: Instant, from: NodeId, granted: bool) -> Step {
        let Some(round) = self.round.as_mut() else { return Step::Wait(self.next_round) };
        if now >= round.ends {
            self.end_round(now);
            return Step::Wait(self.next_round);
        }
        if granted && round.voters.contains(from) {
            round.granted.insert(from);
        }
        if round.voters.quorum(&round.granted) {
            self.round = None;
            // If the election fails (a split vote), the next try comes
            // after a full timeout: an election whose vote requests are
            // slow (each voter saves its vote durably: an fsync, long on a
            // loaded disk) must not be cut short by the next one, which
            // would raise the term again and again without electing anyone.
            self.next_round = now + self.timing.lease + self.timing.random(&mut self.rng);
            return Step::Elect;
        }
        Step::Wait(round.ends)
    }

    /// The round in progress ends without a quorum: the next one after a
    /// random timeout.
    pub fn end_round(&mut self, now: Instant) {
        if self.round.take().is_some() {
            self.next_round = now + self.timing.random(&mut self.rng);
        }
    }

    /// Whether this node grants a pre-vote to a candidate whose last log id
    /// is `candidate_log`. `own_log` is this node's last log id;
    /// `leading_with_quorum`: it leads and a quorum acknowledged it within
    /// the lease.
    pub fn judge(
        &self,
        now: Instant,
        candidate_log: Option<&LogId>,
        own_log: Option<&LogId>,
        leading_with_quorum: bool,
    ) -> Result<(), Refusal> {
        if leading_with_quorum {
            return Err(Refusal::LeaderAlive);
        }
        if now.saturating_duration_since(self.last_contact) < self.timing.lease {
            return Err(Refusal::HeardLeader);
        }
        if candidate_log < own_log {
            return Err(Refusal::LogBehind);
        }
        Ok(())
    }
}

/// The agent of a running node, and its randomness.
pub(crate) type NodeAgent = std::sync::Mutex<ElectionAgent<rand::rngs::StdRng>>;

/// The agent of node `me`, starting now.
pub(crate) fn node_agent(me: NodeId, timing: ElectionTiming) -> NodeAgent {
    use rand::SeedableRng;
    std::sync::Mutex::new(ElectionAgent::new(me, timing, Instant::now(), rand::rngs::StdRng::from_entropy()))
}

/// Runs the agent of `node` until the node is gone or stops: polls it at
/// least every `tick` and at every change of role, vote or membership
/// (openraft's server metrics: not at every commit), runs the pre-vote
/// rounds it asks for, and triggers openraft's elections.
pub(crate) async fn campaign(node: Weak<ClusterNode>, tick: Duration) {
    let mut metrics = match node.upgrade() {
        Some(n) => n.raft().server_metrics(),
        None => return,
    };
    loop {
        let Some(n) = node.upgrade() else { return };
        let (view, term, state) = {
            let m = metrics.borrow_and_update();
            let view = View {
                voters: Voters::new(m.membership_config.membership().get_joint_config().clone()),
                leading: m.state == openraft::ServerState::Leader,
                campaigning: m.state == openraft::ServerState::Candidate,
            };
            (view, m.vote.leader_id().get_term(), m.state)
        };
        if state == openraft::ServerState::Shutdown {
            return;
        }
        let now = Instant::now();
        let step = n.elections.lock().unwrap_or_else(PoisonError::into_inner).poll(now, &view);
        let wait = match step {
            Step::Wait(at) => at,
            Step::Elect => {
                elect(&n, term).await;
                now + tick
            }
            Step::PreVote { ask, until } => {
                pre_vote_round(&n, ask, until, term).await;
                now
            }
        };
        drop(n);
        let sleep = wait.saturating_duration_since(Instant::now()).min(tick);
        // A change of role or membership is looked at at once.
        if let Ok(Err(_)) = tokio::time::timeout(sleep, metrics.changed()).await {
            return;
        }
    }
}

async fn elect(n: &ClusterNode, term: u64) {
    tracing::info!(node = %n.id(), term = term + 1, "starting an election");
    if let Err(e) = n.raft().trigger().elect().await {
        tracing::warn!(node = %n.id(), "could not start an election: {e}");
    }
}

/// One pre-vote round: asks `ask` in parallel, feeds the answers to the
/// agent, elects as soon as it says so; ends at `until` at the latest.
async fn pre_vote_round(n: &Arc<ClusterNode>, ask: BTreeSet<NodeId>, until: Instant, term: u64) {
    let last_log_id = n.raft().data_metrics().borrow().last_log;
    let request = PreVote { term: term + 1, last_log_id };
    let members: Vec<_> = {
        let m = n.raft().metrics().borrow().membership_config.clone();
        m.nodes().filter(|(id, _)| ask.contains(id)).map(|(id, info)| (*id, info.clone())).collect()
    };
    let mut calls = tokio::task::JoinSet::new();
    for (id, info) in members {
        let (transport, request) = (n.transport().clone(), Request::PreVote(request.clone()));
        calls.spawn(async move {
            let answer = match transport.call(id, &info, request).await {
                Ok(Response::PreVote(a)) => Some(a),
                _ => None,
            };
            (id, answer)
        });
    }
    let (mut granted, mut asked) = (vec![n.id()], calls.len());
    let deadline = tokio::time::Instant::from_std(until);
    loop {
        let joined = match tokio::time::timeout_at(deadline, calls.join_next()).await {
            Ok(Some(Ok(joined))) => joined,
            Ok(Some(Err(_))) => continue,
            Ok(None) | Err(_) => break,
        };
        asked -= 1;
        let (id, answer) = joined;
        let yes = answer.as_ref().is_some_and(|a| a.granted);
        if yes {
            granted.push(id);
        }
        let step = n.elections.lock().unwrap_or_else(PoisonError::into_inner).answer(Instant::now(), id, yes);
        if step == Step::Elect {
            tracing::info!(node = %n.id(), ?granted, "pre-vote granted by a quorum");
            elect(n, term).await;
            return;
        }
        if asked == 0 {
            break;
        }
    }
    calls.abort_all();
    n.elections.lock().unwrap_or_else(PoisonError::into_inner).end_round(Instant::now());
    tracing::debug!(node = %n.id(), term, ?granted, "pre-vote without a quorum: no election");
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;

    use super::*;

    const LEASE: Duration = Duration::from_millis(300);
    const MIN: Duration = Duration::from_millis(150);
    const MAX: Duration = Duration::from_millis(300);

    fn timing() -> ElectionTiming {
        ElectionTiming { lease: LEASE, min: MIN, max: MAX }
    }

    fn agent(me: u64, now: Instant, seed: u64) -> ElectionAgent<rand::rngs::StdRng> {
        ElectionAgent::new(NodeId(me), timing(), now, rand::rngs::StdRng::seed_from_u64(seed))
    }

    fn voters(ids: &[u64]) -> Voters {
        Voters::new(vec![ids.iter().map(|i| NodeId(*i)).collect()])
    }

    fn follower_of(ids: &[u64]) -> View {
        View { voters: voters(ids), ..View::default() }
    }

    fn log(term: u64, index: u64) -> LogId {
        LogId::new(openraft::CommittedLeaderId::new(term, NodeId(1)), index)
    }

    /// Polls from `from` in 1 ms steps until the agent asks for a pre-vote;
    /// the instant it does.
    fn first_round(a: &mut ElectionAgent<rand::rngs::StdRng>, from: Instant, view: &View) -> Instant {
        for ms in 0..5_000 {
            let now = from + Duration::from_millis(ms);
            match a.poll(now, view) {
                Step::PreVote { .. } => return now,
                Step::Elect => panic!("elected without a pre-vote at {ms} ms"),
                Step::Wait(at) => assert!(at > now, "waits for an instant already past"),
            }
        }
        panic!("no pre-vote within 5 s");
    }

    #[test]
    fn the_timer_fires_after_the_lease_plus_a_random_timeout_in_range() {
        let t0 = Instant::now();
        let view = follower_of(&[1, 2, 3]);
        let mut seen = BTreeSet::new();
        for seed in 0..50 {
            let mut a = agent(1, t0, seed);
            a.leader_contact(t0 + Duration::from_millis(40));
            let fired = first_round(&mut a, t0, &view) - (t0 + Duration::from_millis(40));
            assert!(fired >= LEASE + MIN && fired < LEASE + MAX + Duration::from_millis(1), "{fired:?}");
            seen.insert(fired.as_millis());
        }
        assert!(seen.len() > 10, "the timeout is randomised: {seen:?}");
    }

    #[test]
    fn a_leader_contact_restarts_the_timer_and_drops_a_round() {
        let t0 = Instant::now();
        let view = follower_of(&[1, 2, 3]);
        let mut a = agent(1, t0, 7);
        let fired = first_round(&mut a, t0, &view);
        a.leader_contact(fired + Duration::from_millis(1));
        // The late grants of the dropped round elect nobody.
        assert!(matches!(a.answer(fired + Duration::from_millis(2), NodeId(2), true), Step::Wait(_)));
        assert!(matches!(a.answer(fired + Duration::from_millis(2), NodeId(3), true), Step::Wait(_)));
        let next = first_round(&mut a, fired, &view);
        assert!(next - fired >= LEASE + MIN, "{:?}", next - fired);
    }

    #[test]
    fn granting_a_vote_restarts_the_timer_drops_the_round_and_is_no_contact() {
        let t0 = Instant::now();
        let view = follower_of(&[1, 2, 3]);
        let mut a = agent(1, t0, 8);
        let at = first_round(&mut a, t0, &view);
        a.vote_granted(at + Duration::from_millis(5));
        assert!(matches!(a.answer(at + Duration::from_millis(6), NodeId(2), true), Step::Wait(_)), "round dropped");
        let next = first_round(&mut a, at, &view);
        assert!(next - (at + Duration::from_millis(5)) >= LEASE + MIN, "{:?}", next - at);
        // It still grants pre-votes: it heard no leader.
        assert_eq!(a.judge(at + Duration::from_millis(6), None, None, false), Ok(()));
    }

    #[test]
    fn a_quorum_of_grants_elects_and_a_minority_does_not() {
        let t0 = Instant::now();
        let view = follower_of(&[1, 2, 3, 4, 5]);
        let mut a = agent(1, t0, 1);
        let at = first_round(&mut a, t0, &view);
        let ms = |n| at + Duration::from_millis(n);
        assert!(matches!(a.answer(ms(1), NodeId(2), false), Step::Wait(_)));
        assert!(matches!(a.answer(ms(2), NodeId(3), true), Step::Wait(_)), "2 of 5 is no quorum");
        // An answer from a node that is not a voter counts for nothing.
        assert!(matches!(a.answer(ms(3), NodeId(9), true), Step::Wait(_)));
        assert_eq!(a.answer(ms(4), NodeId(4), true), Step::Elect, "3 of 5 (itself counted)");
        // The round is over: a late grant elects nobody twice.
        assert!(matches!(a.answer(ms(5), NodeId(5), true), Step::Wait(_)));
        // The election gets a full timeout before the next try.
        let next = first_round(&mut a, ms(4), &view);
        assert!(next - ms(4) >= LEASE + MIN, "{:?}", next - ms(4));
    }

    #[test]
    fn a_round_without_quorum_retries_after_a_random_timeout_and_answers_after_it_end_nothing() {
        let t0 = Instant::now();
        let view = follower_of(&[1, 2, 3]);
        let mut a = agent(1, t0, 3);
        let at = first_round(&mut a, t0, &view);
        match a.poll(at + Duration::from_millis(1), &view) {
            Step::Wait(until) => assert_eq!(until, at + MAX, "the round lasts election_max"),
            other => panic!("{other:?}"),
        }
        // A grant after the round ended does not elect.
        assert!(matches!(a.answer(at + MAX, NodeId(2), true), Step::Wait(_)));
        let next = first_round(&mut a, at + MAX, &view);
        let gap = next - (at + MAX);
        assert!(gap >= MIN && gap < MAX, "{gap:?}");
    }

    #[test]
    fn a_partitioned_node_keeps_asking_and_never_elects() {
        let t0 = Instant::now();
        let view = follower_of(&[1, 2, 3]);
        let mut a = agent(2, t0, 11);
        let mut now = t0;
        let mut rounds = 0;
        while now < t0 + Duration::from_secs(20) {
            match a.poll(now, &view) {
                Step::Elect => panic!("elected without a quorum"),
                Step::PreVote { ask, until } => {
                    assert_eq!(ask, BTreeSet::from([NodeId(1), NodeId(3)]));
                    rounds += 1;
                    now = until; // nobody answers
                }
                Step::Wait(at) => now = at,
            }
        }
        assert!(rounds > 20, "it kept asking: {rounds} rounds");
    }

    #[test]
    fn a_sole_voter_elects_at_once_and_retries_at_the_minimum_pace() {
        let t0 = Instant::now();
        let mut a = agent(1, t0, 5);
        let view = follower_of(&[1]);
        assert_eq!(a.poll(t0, &view), Step::Elect);
        assert_eq!(a.poll(t0 + Duration::from_millis(1), &view), Step::Wait(t0 + MIN));
        assert_eq!(a.poll(t0 + MIN, &view), Step::Elect);
        // While its election is in progress, it is not started again.
        let campaigning = View { campaigning: true, ..follower_of(&[1]) };
        assert!(matches!(a.poll(t0 + MIN * 3, &campaigning), Step::Wait(_)));
        assert_eq!(a.poll(t0 + MIN * 3, &view), Step::Elect);
    }

    #[test]
    fn a_learner_a_stranger_and_a_leader_never_campaign() {
        let t0 = Instant::now();
        let mut a = agent(4, t0, 9);
        let learner = follower_of(&[1, 2, 3]);
        let nobody = View::default();
        let mut b = agent(1, t0, 9);
        let leader = View { voters: voters(&[1, 2, 3]), leading: true, campaigning: false };
        for s in 0..100 {
            let now = t0 + Duration::from_millis(s * 100);
            assert!(matches!(a.poll(now, &learner), Step::Wait(_)));
            assert!(matches!(a.poll(now, &nobody), Step::Wait(_)));
            assert!(matches!(b.poll(now, &leader), Step::Wait(_)));
        }
        // Once it steps down, the former leader waits a full timeout.
        let down = t0 + Duration::from_secs(10);
        let next = first_round(&mut b, down, &follower_of(&[1, 2, 3]));
        assert!(next - down >= LEASE + MIN, "{:?}", next - down);
    }

    #[test]
    fn a_joint_membership_needs_a_majority_of_each_configuration() {
        let t0 = Instant::now();
        let joint =
            Voters::new(vec![[1, 2, 3].into_iter().map(NodeId).collect(), [3, 4, 5].into_iter().map(NodeId).collect()]);
        let view = View { voters: joint, ..View::default() };
        let mut a = agent(1, t0, 2);
        let at = first_round(&mut a, t0, &view);
        match a.poll(at, &view) {
            Step::Wait(_) => {}
            other => panic!("{other:?}"),
        }
        assert!(matches!(a.answer(at, NodeId(2), true), Step::Wait(_)), "a majority of the old only");
        assert!(matches!(a.answer(at, NodeId(4), true), Step::Wait(_)), "1 of 3 of the new");
        assert_eq!(a.answer(at, NodeId(5), true), Step::Elect);
    }

    #[test]
    fn the_round_asks_every_other_voter_of_both_configurations() {
        let t0 = Instant::now();
        let joint =
            Voters::new(vec![[1, 2, 3].into_iter().map(NodeId).collect(), [1, 3, 4].into_iter().map(NodeId).collect()]);
        let mut a = agent(1, t0, 2);
        let view = View { voters: joint, ..View::default() };
        let mut now = t0;
        let ask = loop {
            match a.poll(now, &view) {
                Step::PreVote { ask, .. } => break ask,
                Step::Wait(at) => now = at,
                Step::Elect => panic!("elected without asking"),
            }
        };
        assert_eq!(ask, [2, 3, 4].into_iter().map(NodeId).collect::<BTreeSet<_>>());
    }

    #[test]
    fn judge_refuses_within_the_lease_of_a_contact_then_grants() {
        let t0 = Instant::now();
        let mut a = agent(2, t0, 4);
        let own = Some(log(3, 10));
        // Just started: its start counts as a contact.
        assert_eq!(
            a.judge(t0 + LEASE - Duration::from_millis(1), own.as_ref(), own.as_ref(), false),
            Err(Refusal::HeardLeader)
        );
        assert_eq!(a.judge(t0 + LEASE, own.as_ref(), own.as_ref(), false), Ok(()));
        let heard = t0 + Duration::from_secs(1);
        a.leader_contact(heard);
        assert_eq!(
            a.judge(heard + Duration::from_millis(100), own.as_ref(), own.as_ref(), false),
            Err(Refusal::HeardLeader)
        );
        assert_eq!(a.judge(heard + LEASE, own.as_ref(), own.as_ref(), false), Ok(()));
        // An older contact reported late does not move it back.
        a.leader_contact(t0);
        assert_eq!(a.judge(heard + LEASE, own.as_ref(), own.as_ref(), false), Ok(()));
    }

    #[test]
    fn judge_refuses_a_candidate_with_an_older_log() {
        let t0 = Instant::now();
        let a = agent(2, t0, 4);
        let now = t0 + Duration::from_secs(5);
        let own = log(3, 10);
        assert_eq!(a.judge(now, Some(&log(3, 9)), Some(&own), false), Err(Refusal::LogBehind));
        assert_eq!(a.judge(now, Some(&log(2, 50)), Some(&own), false), Err(Refusal::LogBehind), "older last term");
        assert_eq!(a.judge(now, None, Some(&own), false), Err(Refusal::LogBehind), "an empty log");
        assert_eq!(a.judge(now, Some(&log(3, 10)), Some(&own), false), Ok(()), "as up to date");
        assert_eq!(a.judge(now, Some(&log(4, 2)), Some(&own), false), Ok(()), "a later last term");
        assert_eq!(a.judge(now, None, None, false), Ok(()), "both empty");
    }

    #[test]
    fn judge_refuses_while_leading_with_a_live_quorum() {
        let t0 = Instant::now();
        let a = agent(1, t0, 4);
        let now = t0 + Duration::from_secs(5);
        assert_eq!(a.judge(now, None, None, true), Err(Refusal::LeaderAlive));
        assert_eq!(a.judge(now, None, None, false), Ok(()));
    }
}
