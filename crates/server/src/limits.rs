//! Per-node protections: the POP3 maildrop lock (RFC 1939 4: one session
//! per maildrop) and the growing delay after failed logins.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use hamail_store::Address;

/// Maildrops with a POP3 session in TRANSACTION state on this node.
#[derive(Default)]
pub struct MaildropLocks {
    held: Arc<Mutex<HashSet<Address>>>,
}

/// Releases the maildrop when dropped, however the session ends.
pub struct MaildropGuard {
    held: Arc<Mutex<HashSet<Address>>>,
    user: Address,
}

impl MaildropLocks {
    /// `None` when another session holds it ([IN-USE], RFC 2449 8.1.1).
    pub fn try_lock(&self, user: &Address) -> Option<MaildropGuard> {
        let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        if held.insert(user.clone()) {
            Some(MaildropGuard { held: self.held.clone(), user: user.clone() })
        } else {
            None
        }
    }
}

impl Drop for MaildropGuard {
    fn drop(&mut self) {
        self.held.lock().unwrap_or_else(PoisonError::into_inner).remove(&self.user);
    }
}

/// Failed logins per client address, to slow password guessing: the first
/// failure costs `base`, each further one doubles it, up to 30 s; forgotten
/// after 15 minutes without a failure, reset by a success.
#[derive(Default)]
pub struct AuthFailures {
    by_ip: Mutex<HashMap<IpAddr, (u32, Instant)>>,
}

const MAX_DELAY: Duration = Duration::from_secs(30);
const FORGET_AFTER: Duration = Duration::from_secs(15 * 60);

impl AuthFailures {
    /// Records a failure and returns how long to wait before answering.
    pub fn failed(&self, ip: IpAddr, base: Duration) -> Duration {
        let mut map = self.by_ip.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        if map.len() > 10_000 {
            map.retain(|_, (_, last)| now.duration_since(*last) < FORGET_AFTER);
        }
        let entry = map.entry(ip).or_insert((0, now));
        if now.duration_since(entry.1) >= FORGET_AFTER {
            entry.0 = 0;
        }
        entry.0 = entry.0.saturating_add(1);
        entry.1 = now;
        let factor = 1u32 << (entry.0 - 1).min(16);
        base.saturating_mul(factor).min(MAX_DELAY)
    }

    pub fn succeeded(&self, ip: IpAddr) {
        self.by_ip.lock().unwrap_or_else(PoisonError::into_inner).remove(&ip);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maildrop_lock_is_exclusive_and_released_on_drop() {
        let locks = MaildropLocks::default();
        let a = Address::parse("a@example.org").unwrap();
        let g = locks.try_lock(&a).unwrap();
        assert!(locks.try_lock(&a).is_none());
        assert!(locks.try_lock(&Address::parse("b@example.org").unwrap()).is_some());
        drop(g);
        assert!(locks.try_lock(&a).is_some());
    }

    #[test]
    fn delay_doubles_and_caps_and_resets() {
        let f = AuthFailures::default();
        let ip: IpAddr = "198.18.0.9".parse().unwrap();
        let base = Duration::from_millis(100);
        assert_eq!(f.failed(ip, base), base);
        assert_eq!(f.failed(ip, base), base * 2);
        assert_eq!(f.failed(ip, base), base * 4);
        for _ in 0..20 {
            f.failed(ip, base);
        }
        assert_eq!(f.failed(ip, base), MAX_DELAY);
        f.succeeded(ip);
        assert_eq!(f.failed(ip, base), base);
    }
}
