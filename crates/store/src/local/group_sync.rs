//! Group fsync of the `bodies/` directory for bodies written outside the
//! committer (copies received from peers, bodies of replicated accepts).
//!
//! Why: each such body needs its directory entry durable before anything
//! references it. Fifty sessions each fsyncing the same directory queue up
//! on the directory's lock and pay one journal commit each; instead, a
//! caller that finds a sync already running waits for the next one, which
//! covers every rename made before it started (the classic group commit).

use std::sync::{Condvar, Mutex, PoisonError};

#[derive(Default)]
pub(crate) struct GroupSync {
    state: Mutex<State>,
    done: Condvar,
}

#[derive(Default)]
struct State {
    /// Tickets handed out (one per caller).
    requested: u64,
    /// Every ticket up to this one is covered by a completed sync.
    completed: u64,
    running: bool,
}

impl GroupSync {
    /// Returns once a `sync` that started after this call has succeeded.
    pub(crate) fn sync<E>(&self, sync: impl Fn() -> Result<(), E>) -> Result<(), E> {
        let mut st = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        st.requested += 1;
        let ticket = st.requested;
        loop {
            if st.completed >= ticket {
                return Ok(());
            }
            if st.running {
                st = self.done.wait(st).unwrap_or_else(PoisonError::into_inner);
                continue;
            }
            // Our turn: this sync covers every ticket handed out so far
            // (their renames happened before they took a ticket).
            st.running = true;
            let covers = st.requested;
            drop(st);
            let result = sync();
            st = self.state.lock().unwrap_or_else(PoisonError::into_inner);
            st.running = false;
            if result.is_ok() {
                st.completed = st.completed.max(covers);
            }
            self.done.notify_all();
            result?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    #[test]
    fn concurrent_callers_share_syncs_and_each_is_covered() {
        let g = Arc::new(GroupSync::default());
        let syncs = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..16)
            .map(|_| {
                let (g, syncs) = (g.clone(), syncs.clone());
                std::thread::spawn(move || {
                    for _ in 0..20 {
                        g.sync(|| {
                            syncs.fetch_add(1, Ordering::SeqCst);
                            std::thread::sleep(std::time::Duration::from_millis(1));
                            Ok::<(), std::io::Error>(())
                        })
                        .unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let n = syncs.load(Ordering::SeqCst);
        assert!((20..320).contains(&n), "320 callers, {n} syncs: shared, and at least one per round of a caller");
    }

    #[test]
    fn a_failed_sync_is_reported_and_the_next_caller_syncs_again() {
        let g = GroupSync::default();
        assert!(g.sync(|| Err(std::io::Error::other("disk"))).is_err());
        let ran = std::cell::Cell::new(false);
        g.sync(|| {
            ran.set(true);
            Ok::<(), std::io::Error>(())
        })
        .unwrap();
        assert!(ran.get());
    }
}
