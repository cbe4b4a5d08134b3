//! What a node can testify about older Raft terms, for the fencing of
//! failover groups (see [`crate::failover`]).
//!
//! A group owner's lease renewal at `t0` is confirmed by a leader only
//! after a quorum acknowledged a heartbeat that the leader sent after `t0`
//! (or, for the leader itself, while it still led). So when a node becomes
//! leader of term `T` and finds an owner silent, every renewal that a
//! leader of an older term can have confirmed is bounded by the answers of
//! any majority to one question: *when did you last acknowledge, or stop
//! leading, a term below `T`?* Any confirming quorum meets that majority
//! (quorum intersection), and the node they share saw the heartbeat after
//! `t0`. The new leader can then fence a dead owner from that instant —
//! usually the moment it died — instead of from its own election, which
//! comes an election timeout later.
//!
//! The same books hold this node's *vouches*: a node that cannot renew its
//! lease through a leader asks the voters directly
//! ([`crate::rpc::Request::LeaseVouch`]), and a voter vouches only when it
//! has not heard from a leader of its current term for a while
//! ([`Testimony::vouch`]): an AppendEntries of that term, or the leader's
//! request for this testimony, is hearing from it. A vouch is labelled with
//! that term, recorded per requester, and told in every testimony. Why that
//! is enough for the fencing is argued in [`crate::failover`].
//!
//! What it does not do: decide anything. It records instants on this node's
//! monotonic clock; the leader converts an answer to its own clock
//! conservatively (arrival of the answer minus the elapsed time it states).

use std::collections::BTreeMap;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::types::NodeId;

/// Terms kept in the books (older ones are folded into `floor`).
const TERMS_KEPT: usize = 16;

/// This node's record of older terms. See the module documentation.
pub(crate) struct Testimony {
    inner: Mutex<Books>,
}

struct Books {
    /// Nothing before this instant is recorded: the process start (an
    /// acknowledgement made before a restart happened before it), raised to
    /// the latest instant of the terms dropped from the maps.
    floor: Instant,
    /// Per leader term, the latest arrival of an AppendEntries of that term
    /// that was (or may still be) acknowledged.
    acked: BTreeMap<u64, Instant>,
    /// Terms this node led, and when it first saw a higher term (`None`
    /// while it leads).
    led: BTreeMap<u64, Option<Instant>>,
    /// The highest term this node has observed.
    current: u64,
    /// Per term, when this node last told its testimony to its leader.
    told: BTreeMap<u64, Instant>,
    /// Per requester, when this node last vouched for its lease.
    vouches: BTreeMap<NodeId, Instant>,
}

/// What a node testifies to the new leader of a term (see
/// [`Testimony::testify`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Testified {
    /// The latest instant at which this node may have helped a leader of
    /// an older term confirm its leadership.
    pub(crate) older: Instant,
    /// Per requester, the last time this node vouched for its lease.
    pub(crate) vouches: Vec<(NodeId, Instant)>,
}

/// An AppendEntries being handled: [`Testimony::settle`] it with the
/// outcome.
pub(crate) struct Arrival {
    term: u64,
    at: Instant,
    previous: Option<Instant>,
}

impl Testimony {
    pub(crate) fn new() -> Self {
        Testimony {
            inner: Mutex::new(Books {
                floor: Instant::now(),
                acked: BTreeMap::new(),
                led: BTreeMap::new(),
                current: 0,
                told: BTreeMap::new(),
                vouches: BTreeMap::new(),
            }),
        }
    }

    fn books(&self) -> std::sync::MutexGuard<'_, Books> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// An AppendEntries of leader term `term` arrived: recorded *before*
    /// Raft handles it, so that no acknowledgement can leave this node
    /// without being in the books (an answer given meanwhile over-states,
    /// which only delays a failover).
    pub(crate) fn arrive(&self, term: u64) -> Arrival {
        let at = Instant::now();
        let mut b = self.books();
        let previous = b.acked.insert(term, at);
        b.trim();
        Arrival { term, at, previous }
    }

    /// The outcome of the AppendEntries: if it was refused for an older
    /// term (this node has voted for a newer one), it acknowledged nothing
    /// and is struck from the books — otherwise a deposed leader that keeps
    /// calling would hold its groups' failover up forever.
    pub(crate) fn settle(&self, arrival: Arrival, acknowledged: bool) {
        if acknowledged {
            return;
        }
        let mut b = self.books();
        if b.acked.get(&arrival.term) == Some(&arrival.at) {
            match arrival.previous {
                Some(p) => b.acked.insert(arrival.term, p),
                None => b.acked.remove(&arrival.term),
            };
        }
    }

    /// Raft's view changed: now in `term`, leading it or not.
    pub(crate) fn observe(&self, term: u64, leading: bool) {
        let now = Instant::now();
        let mut b = self.books();
        if term > b.current {
            for end in b.led.values_mut() {
                end.get_or_insert(now);
            }
            b.current = term;
        }
        if leading && term == b.current {
            b.led.entry(term).or_insert(None);
        }
        b.trim();
    }

    /// The testimony for the new leader of `term`: the latest instant at
    /// which this node may have helped a leader of a term below `term`
    /// confirm its leadership, and every vouch it made; `None` while this
    /// node has not reached `term` itself (it could still acknowledge an
    /// older leader). Telling it is hearing from the leader of `term`.
    pub(crate) fn testify(&self, term: u64) -> Option<Testified> {
        let mut b = self.books();
        if b.current < term {
            return None;
        }
        let mut latest = b.floor;
        for at in b.acked.range(..term).map(|(_, at)| *at) {
            latest = latest.max(at);
        }
        for end in b.led.range(..term).map(|(_, end)| *end) {
            latest = latest.max(end?);
        }
        b.told.insert(term, Instant::now());
        b.trim();
        Some(Testified { older: latest, vouches: b.vouches.iter().map(|(id, at)| (*id, *at)).collect() })
    }

    /// `requester` asks this node to vouch for its lease: granted, with the
    /// term it is made in, only if this node does not lead that term and has
    /// not heard from its leader for `silence` (with a leader, the requester
    /// must renew through it); the vouch is recorded for the testimonies to
    /// come.
    pub(crate) fn vouch(&self, requester: NodeId, silence: Duration) -> Option<u64> {
        let now = Instant::now();
        let mut b = self.books();
        let term = b.current;
        if term == 0 || b.led.contains_key(&term) {
            return None;
        }
        let heard = b.acked.get(&term).copied().max(b.told.get(&term).copied());
        if heard.is_some_and(|at| now.saturating_duration_since(at) < silence) {
            return None;
        }
        b.vouches.insert(requester, now);
        Some(term)
    }
}

impl Books {
    fn trim(&mut self) {
        while self.acked.len() > TERMS_KEPT {
            if let Some((_, at)) = self.acked.pop_first() {
                self.floor = self.floor.max(at);
            }
        }
        while self.told.len() > TERMS_KEPT {
            self.told.pop_first();
        }
        while self.led.len() > TERMS_KEPT {
            if let Some((_, end)) = self.led.pop_first() {
                self.floor = self.floor.max(end.unwrap_or_else(Instant::now));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the node testifies about terms below `term`, vouches aside.
    fn below(t: &Testimony, term: u64) -> Option<Instant> {
        t.testify(term).map(|told| told.older)
    }

    /// An AppendEntries of `term` that this node acknowledged: its arrival.
    fn acked(t: &Testimony, term: u64) -> Instant {
        let a = t.arrive(term);
        let at = a.at;
        t.settle(a, true);
        at
    }

    #[test]
    fn nothing_is_told_before_the_term_is_reached() {
        let t = Testimony::new();
        t.observe(3, false);
        assert!(below(&t, 4).is_none());
        assert!(below(&t, 3).is_some());
    }

    #[test]
    fn acknowledgements_of_older_terms_only_count() {
        let t = Testimony::new();
        t.observe(2, false);
        let at2 = acked(&t, 2);
        t.observe(3, false);
        acked(&t, 3);
        // Asked by the leader of term 3: its own heartbeats do not count.
        assert_eq!(below(&t, 3), Some(at2));
        // Asked by a leader of term 4: both count.
        t.observe(4, false);
        assert!(below(&t, 4).unwrap() > at2);
    }

    #[test]
    fn a_refused_append_is_struck() {
        let t = Testimony::new();
        t.observe(2, false);
        let first = acked(&t, 2);
        t.observe(5, false);
        // The deposed leader of term 2 keeps calling; refused each time.
        for _ in 0..3 {
            let a = t.arrive(2);
            t.settle(a, false);
        }
        assert_eq!(below(&t, 5), Some(first));
    }

    #[test]
    fn leading_an_older_term_counts_until_a_newer_one_is_seen() {
        let t = Testimony::new();
        t.observe(7, true);
        let before = Instant::now();
        t.observe(8, false);
        assert!(below(&t, 8).unwrap() >= before, "the end of its leadership is testified");
    }

    #[test]
    fn a_restart_is_the_floor() {
        let before = Instant::now();
        let t = Testimony::new();
        t.observe(9, false);
        assert!(below(&t, 9).unwrap() >= before);
    }

    #[test]
    fn old_terms_fold_into_the_floor() {
        let t = Testimony::new();
        let mut last = Instant::now();
        for term in 1..40 {
            t.observe(term, false);
            last = acked(&t, term);
        }
        t.observe(40, false);
        assert_eq!(below(&t, 40), Some(last));
        assert!(t.books().acked.len() <= TERMS_KEPT);
    }

    const NOW: Duration = Duration::ZERO;
    const LONG: Duration = Duration::from_secs(3600);

    #[test]
    fn a_vouch_needs_silence_from_the_leader_of_the_term() {
        let t = Testimony::new();
        // Nothing observed yet: no term to vouch in.
        assert_eq!(t.vouch(NodeId(2), NOW), None);
        t.observe(3, false);
        acked(&t, 3);
        // Heard from the leader of term 3 within the silence: renew
        // through it.
        assert_eq!(t.vouch(NodeId(2), LONG), None);
        // Silent long enough (here: any time at all): vouched, in term 3.
        assert_eq!(t.vouch(NodeId(2), NOW), Some(3));
        // A new term whose leader has not been heard of: vouched at once.
        t.observe(4, false);
        assert_eq!(t.vouch(NodeId(2), LONG), Some(4));
        acked(&t, 4);
        assert_eq!(t.vouch(NodeId(2), LONG), None);
        // The leader of a term never vouches in it.
        t.observe(5, true);
        assert_eq!(t.vouch(NodeId(2), NOW), None);
    }

    #[test]
    fn a_refused_append_is_not_hearing_from_a_leader() {
        let t = Testimony::new();
        t.observe(6, false);
        let a = t.arrive(6);
        t.settle(a, false);
        assert_eq!(t.vouch(NodeId(1), LONG), Some(6));
    }

    #[test]
    fn the_testimony_tells_every_vouch_and_is_hearing_from_the_leader() {
        let t = Testimony::new();
        t.observe(4, false);
        let before = Instant::now();
        assert_eq!(t.vouch(NodeId(2), LONG), Some(4));
        assert_eq!(t.vouch(NodeId(3), LONG), Some(4));
        let after_first = Instant::now();
        assert_eq!(t.vouch(NodeId(2), LONG), Some(4));
        let told = t.testify(4).expect("term 4 reached");
        let at = |id: u64| told.vouches.iter().find(|(x, _)| *x == NodeId(id)).map(|(_, at)| *at);
        // The latest vouch per requester.
        assert!(at(2).is_some_and(|a| a >= after_first), "{told:?}");
        assert!(at(3).is_some_and(|a| a >= before && a <= after_first), "{told:?}");
        // Told to the leader of term 4: heard from it.
        assert_eq!(t.vouch(NodeId(2), LONG), None);
        assert_eq!(t.vouch(NodeId(2), NOW), Some(4));
        // A testimony asked for a term not reached yet tells nothing.
        t.observe(5, false);
        assert!(t.testify(6).is_none());
        assert_eq!(t.vouch(NodeId(2), LONG), Some(5));
    }
}
