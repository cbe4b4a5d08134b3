//! The node-wide budget for buffers that a client can make the server hold:
//! message data kept in memory before it reaches its body file, a body read
//! to copy it to the other data nodes, a reply chunk being written. Every
//! such buffer is reserved here first; when the budget is spent the client
//! gets a temporary refusal (`451 4.3.1`, `-ERR [SYS/TEMP]`) instead of the
//! server growing without bound.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// Bytes that may be reserved at once, in all.
pub struct MemoryBudget {
    limit: usize,
    used: AtomicUsize,
}

/// Bytes taken from a [`MemoryBudget`]; given back when dropped.
#[must_use = "the bytes are given back as soon as the reservation is dropped"]
pub struct Reservation {
    budget: Arc<MemoryBudget>,
    bytes: usize,
}

impl MemoryBudget {
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(MemoryBudget { limit, used: AtomicUsize::new(0) })
    }

    /// Takes `bytes`, or `None` when that would exceed the limit.
    pub fn try_reserve(self: &Arc<Self>, bytes: usize) -> Option<Reservation> {
        let mut used = self.used.load(Ordering::Relaxed);
        loop {
            let after = used.checked_add(bytes).filter(|after| *after <= self.limit)?;
            match self.used.compare_exchange_weak(used, after, Ordering::AcqRel, Ordering::Relaxed) {
                Ok(_) => return Some(Reservation { budget: self.clone(), bytes }),
                Err(now) => used = now,
            }
        }
    }

    /// Bytes reserved now, in all.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    pub fn limit(&self) -> usize {
        self.limit
    }
}

impl Reservation {
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Grows this reservation by `more` bytes; `false` (and unchanged) when
    /// the budget cannot give them.
    pub fn grow(&mut self, more: usize) -> bool {
        match self.budget.try_reserve(more) {
            Some(extra) => {
                self.bytes += extra.bytes;
                // The extra bytes now belong to `self`.
                std::mem::forget(extra);
                true
            }
            None => false,
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.budget.used.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservations_stop_at_the_limit_and_come_back_when_dropped() {
        let budget = MemoryBudget::new(100);
        let a = budget.try_reserve(60).expect("within the limit");
        assert!(budget.try_reserve(41).is_none());
        let mut b = budget.try_reserve(40).expect("exactly the limit");
        assert_eq!(budget.used(), 100);
        assert!(!b.grow(1));
        drop(a);
        assert!(b.grow(60));
        assert_eq!(b.bytes(), 100);
        drop(b);
        assert_eq!(budget.used(), 0);
        assert!(budget.try_reserve(usize::MAX).is_none());
    }
}
