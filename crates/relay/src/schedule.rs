//! When to try again, when to warn, when to give up.
//!
//! Exponential backoff (RFC 5321 4.5.4.1 asks for at least 30 minutes
//! between attempts to one destination in general; the first retry comes
//! sooner here, as Postfix's `minimal_backoff_time` does), capped, with a
//! queue lifetime after which a message is bounced (default 5 days, the
//! RFC's "at least 4-5 days") and a delay warning (default 4 hours).
//! Times are Unix seconds from a [`Clock`], so tests can move time.

use std::sync::atomic::{AtomicU64, Ordering};

/// Where "now" comes from.
pub trait Clock: Send + Sync + 'static {
    /// Seconds since the Unix epoch.
    fn now(&self) -> u64;
}

/// The system clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> u64 {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
    }
}

/// A clock that moves only when told (tests, simulations).
#[derive(Debug, Default)]
pub struct ManualClock(AtomicU64);

impl ManualClock {
    pub fn new(now: u64) -> Self {
        ManualClock(AtomicU64::new(now))
    }
    pub fn advance(&self, secs: u64) {
        self.0.fetch_add(secs, Ordering::SeqCst);
    }
    pub fn set(&self, now: u64) {
        self.0.store(now, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

/// The retry policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Schedule {
    /// Delay before the first retry.
    pub initial_backoff: u64,
    /// The delay never grows beyond this.
    pub max_backoff: u64,
    /// A message still undelivered this long after it was queued bounces.
    pub lifetime: u64,
    /// A message still undelivered this long after it was queued gets one
    /// delay warning to its sender (0: never).
    pub delay_warning: u64,
}

impl Default for Schedule {
    fn default() -> Self {
        Schedule { initial_backoff: 300, max_backoff: 4 * 3600, lifetime: 5 * 86400, delay_warning: 4 * 3600 }
    }
}

impl Schedule {
    /// The delay after the `attempts`-th failed attempt (1 for the first
    /// failure): initial, doubled each time, capped.
    pub fn backoff(&self, attempts: u32) -> u64 {
        let doublings = attempts.saturating_sub(1).min(63);
        self.initial_backoff.max(1).saturating_mul(1u64 << doublings).min(self.max_backoff.max(1))
    }

    /// When to try again after the `attempts`-th failure at `now`; never
    /// later than the end of the message's lifetime, so the last attempt
    /// happens right before it expires.
    pub fn next_attempt(&self, queued_at: u64, attempts: u32, now: u64) -> u64 {
        let next = now.saturating_add(self.backoff(attempts));
        next.min(self.expires_at(queued_at).max(now + 1))
    }

    pub fn expires_at(&self, queued_at: u64) -> u64 {
        queued_at.saturating_add(self.lifetime)
    }

    /// True when a message queued at `queued_at` must bounce at `now`.
    pub fn expired(&self, queued_at: u64, now: u64) -> bool {
        now >= self.expires_at(queued_at)
    }

    /// True when a delay warning is due (and not sent yet).
    pub fn warning_due(&self, queued_at: u64, now: u64) -> bool {
        self.delay_warning > 0 && now >= queued_at.saturating_add(self.delay_warning) && !self.expired(queued_at, now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_caps() {
        let s = Schedule { initial_backoff: 60, max_backoff: 1000, lifetime: 10_000, delay_warning: 500 };
        let delays: Vec<u64> = (1..=7).map(|a| s.backoff(a)).collect();
        assert_eq!(delays, vec![60, 120, 240, 480, 960, 1000, 1000]);
        assert_eq!(s.backoff(u32::MAX), 1000);
    }

    #[test]
    fn the_last_attempt_is_at_expiry_and_warning_window() {
        let s = Schedule { initial_backoff: 60, max_backoff: 1000, lifetime: 10_000, delay_warning: 500 };
        assert_eq!(s.next_attempt(0, 1, 100), 160);
        assert_eq!(s.next_attempt(0, 10, 9_500), 10_000);
        assert!(!s.expired(0, 9_999));
        assert!(s.expired(0, 10_000));
        assert!(!s.warning_due(0, 499));
        assert!(s.warning_due(0, 500));
        assert!(!s.warning_due(0, 10_000));
        let never = Schedule { delay_warning: 0, ..s };
        assert!(!never.warning_due(0, 5000));
    }

    #[test]
    fn manual_clock_moves_only_when_told() {
        let c = ManualClock::new(10);
        assert_eq!(c.now(), 10);
        c.advance(5);
        assert_eq!(c.now(), 15);
        c.set(3);
        assert_eq!(c.now(), 3);
    }
}
