//! Per-node protections against abuse: the POP3 maildrop lock (RFC 1939 4:
//! one session per maildrop), connection admission (slot pools, per-address
//! concurrency and rate), and failed-login accounting with bans.
//!
//! Every table here is keyed by something a client chooses (its address,
//! the account it names), so every table has a fixed bound: past it the
//! oldest or least useful entries are forgotten, never the bound raised.
//! Time is passed in (`now`), so the rules are tested without sleeping.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::hash::Hash;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::os::fd::RawFd;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use hamail_store::Address;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

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
        let mut held = lock(&self.held);
        if held.insert(user.clone()) {
            Some(MaildropGuard { held: self.held.clone(), user: user.clone() })
        } else {
            None
        }
    }
}

impl Drop for MaildropGuard {
    fn drop(&mut self) {
        lock(&self.held).remove(&self.user);
    }
}

/// An IP network in CIDR notation (`127.0.0.0/8`, `::1/128`; a bare
/// address is the network of that one address).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Network {
    base: IpAddr,
    prefix: u8,
}

impl Network {
    pub const LOOPBACK_V4: Network = Network { base: IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 0)), prefix: 8 };
    pub const LOOPBACK_V6: Network = Network { base: IpAddr::V6(Ipv6Addr::LOCALHOST), prefix: 128 };

    pub fn parse(s: &str) -> Result<Network, String> {
        let (ip, prefix) = match s.split_once('/') {
            Some((ip, p)) => (ip, Some(p)),
            None => (s, None),
        };
        let base: IpAddr = ip
            .trim()
            .parse()
            .map_err(|_| format!("`{s}` is not an IP address or network (a.b.c.d/len, x:y::z/len)"))?;
        let max = if base.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("`{s}`: the prefix length must be 0 to {max}"))?,
        };
        Ok(Network { base, prefix })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.base, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => same_prefix(u32::from(n).into(), u32::from(a).into(), 32, self.prefix),
            (IpAddr::V6(n), IpAddr::V6(a)) => same_prefix(u128::from(n), u128::from(a), 128, self.prefix),
            // An IPv4 client seen on a dual-stack socket (::ffff:a.b.c.d).
            (IpAddr::V4(_), IpAddr::V6(a)) => a.to_ipv4_mapped().is_some_and(|a| self.contains(IpAddr::V4(a))),
            (IpAddr::V6(_), IpAddr::V4(_)) => false,
        }
    }
}

impl fmt::Display for Network {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.base, self.prefix)
    }
}

/// Whether `bits`-bit numbers `a` and `b` share their first `prefix` bits.
fn same_prefix(a: u128, b: u128, bits: u32, prefix: u8) -> bool {
    let shift = bits - u32::from(prefix);
    shift >= 128 || a >> shift == b >> shift
}

/// Whom per-address rules count: an IPv4 address, or the /64 of an IPv6
/// one (a single subscriber's usual allocation: counting IPv6 addresses
/// one by one would give one host 2^64 fresh budgets).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClientKey(IpAddr);

impl ClientKey {
    pub fn of(ip: IpAddr) -> ClientKey {
        match ip {
            IpAddr::V4(_) => ClientKey(ip),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => ClientKey(IpAddr::V4(v4)),
                None => ClientKey(IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !(u64::MAX as u128)))),
            },
        }
    }

    /// An address as an operator types it (`192.0.2.7`, `2001:db8::1`,
    /// `2001:db8::/64`).
    pub fn parse(s: &str) -> Option<ClientKey> {
        let ip = s.strip_suffix("/64").unwrap_or(s);
        ip.parse().ok().map(ClientKey::of)
    }
}

impl fmt::Display for ClientKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            IpAddr::V4(a) => write!(f, "{a}"),
            IpAddr::V6(a) => write!(f, "{a}/64"),
        }
    }
}

/// Makes room for one more entry in a table bounded to `cap` entries:
/// first forgets the entries `stale` says are no longer useful, then, if
/// that was not enough, the oldest eighth of the table by `age` (entries
/// `age` gives no time are in use and never forgotten). Forgetting a batch
/// at once keeps the cost amortised: a full scan runs at most once per
/// `cap / 8` new entries, not for each. False when there is still no room
/// (every entry is in use and may not be forgotten).
fn make_room<K: Clone + Eq + Hash, V>(
    map: &mut HashMap<K, V>,
    cap: usize,
    stale: impl Fn(&V) -> bool,
    age: impl Fn(&V) -> Option<Instant>,
) -> bool {
    if map.len() < cap {
        return true;
    }
    map.retain(|_, v| !stale(v));
    // Room for a batch, or the next inserts would scan the table again.
    if map.len() < cap - cap / 8 {
        return true;
    }
    let mut by_age: Vec<(Instant, K)> = map.iter().filter_map(|(k, v)| age(v).map(|t| (t, k.clone()))).collect();
    let batch = (cap / 8).max((map.len() + 1).saturating_sub(cap)).min(by_age.len());
    if batch == 0 {
        return false;
    }
    if batch < by_age.len() {
        by_age.select_nth_unstable_by_key(batch - 1, |(t, _)| *t);
    }
    for (_, k) in by_age.drain(..batch) {
        map.remove(&k);
    }
    map.len() < cap
}

/// The longest time a config value may give (`*_secs` keys): 7 days.
/// Config validation refuses more, so that every deadline computed from
/// the config fits the clock.
pub const MAX_CONFIG_SECS: u64 = 7 * 86_400;

/// `now + d`, never panicking: a `d` the clock cannot hold (it came from
/// elsewhere than the checked config, e.g. another node's Raft entry) is
/// cut to [`MAX_CONFIG_SECS`].
pub fn later(now: Instant, d: Duration) -> Instant {
    now.checked_add(d).or_else(|| now.checked_add(Duration::from_secs(MAX_CONFIG_SECS))).unwrap_or(now)
}

/// At most one log line per `every`; the lines left out are counted and
/// told with the next one, so a flood does not flood the log.
pub struct LogLimiter {
    every: Duration,
    last: Option<Instant>,
    suppressed: u64,
}

impl LogLimiter {
    pub fn new(every: Duration) -> Self {
        LogLimiter { every, last: None, suppressed: 0 }
    }

    /// `Some(lines left out since the last one)` when a line may be logged now.
    pub fn allow(&mut self, now: Instant) -> Option<u64> {
        if self.last.is_some_and(|last| now.saturating_duration_since(last) < self.every) {
            self.suppressed += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.suppressed))
    }
}

/// The connection slot pools. Port 25 takes anyone's mail and has a pool
/// of its own, so that however it is loaded it never takes the slots of
/// the users who submit and read mail (submission and POP3 share theirs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pool {
    /// Port 25.
    Mta,
    /// Ports 587 and 465.
    Submission,
    /// Ports 110 and 995: the users' pool, and POP3's own cap within it.
    Pop3,
}

/// The admission rules, from the config.
#[derive(Clone, Debug)]
pub struct AdmissionLimits {
    pub mta: usize,
    pub users: usize,
    pub pop3: usize,
    pub per_address: u32,
    pub per_address_per_minute: u32,
    /// Clients these limits do not count (local tools, webmail on the host).
    pub exempt: Vec<Network>,
}

/// Why a connection was turned away.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Its pool has no free slot.
    PoolFull,
    /// Its address already has the allowed number of connections open.
    AddressBusy,
    /// Its address opened too many connections in the last minute.
    AddressTooFast,
}

impl Refusal {
    pub fn per_address(self) -> bool {
        self != Refusal::PoolFull
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Refusal::PoolFull => "connection limit reached",
            Refusal::AddressBusy => "too many connections open from this address",
            Refusal::AddressTooFast => "too many new connections from this address in the last minute",
        })
    }
}

/// What one client address uses: its open connections, and a token bucket
/// of new connections (full at `per_address_per_minute`, refilled at that
/// rate per minute).
struct AddressUse {
    live: u32,
    tokens: f64,
    refilled: Instant,
}

impl AddressUse {
    fn refill(&mut self, now: Instant, per_minute: u32) {
        let elapsed = now.saturating_duration_since(self.refilled).as_secs_f64();
        self.tokens = (self.tokens + elapsed * f64::from(per_minute) / 60.0).min(f64::from(per_minute));
        self.refilled = now;
    }

    /// Neither open connections nor a rate to remember: as good as absent.
    fn idle(&self, now: Instant, per_minute: u32) -> bool {
        let elapsed = now.saturating_duration_since(self.refilled).as_secs_f64();
        self.live == 0 && self.tokens + elapsed * f64::from(per_minute) / 60.0 >= f64::from(per_minute)
    }
}

/// What each client address uses, shared with the slots that count in it.
type AddressTable = Arc<Mutex<HashMap<ClientKey, AddressUse>>>;

/// Client addresses remembered at most: far more than the slots (so the
/// addresses with open connections always fit), few enough to stay small.
const MAX_ADDRESSES: usize = 65_536;

/// Sockets of admitted connections, by peer: what lets a session that is
/// waiting (the failed-login delay) notice that its client has gone.
type Sockets = Mutex<HashMap<SocketAddr, RawFd>>;

/// Decides which connections are served, node-wide (the node's listeners
/// and its groups' listeners alike).
pub struct Admission {
    limits: AdmissionLimits,
    mta: Arc<Semaphore>,
    users: Arc<Semaphore>,
    pop3: Arc<Semaphore>,
    addresses: AddressTable,
    sockets: Arc<Sockets>,
    refusals_logged: Mutex<LogLimiter>,
}

/// An admitted connection's slot: given back (pool permits, the address's
/// count, the socket's entry) when dropped, however the session ends.
pub struct Slot {
    _permits: (OwnedSemaphorePermit, Option<OwnedSemaphorePermit>),
    address: Option<(AddressTable, ClientKey)>,
    socket: (Arc<Sockets>, SocketAddr, RawFd),
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some((addresses, key)) = &self.address {
            if let Some(u) = lock(addresses).get_mut(key) {
                u.live = u.live.saturating_sub(1);
            }
        }
        let (sockets, peer, fd) = &self.socket;
        let mut sockets = lock(sockets);
        // Another connection from the same peer address and port (to
        // another local address) may have replaced the entry: keep that one.
        if sockets.get(peer) == Some(fd) {
            sockets.remove(peer);
        }
    }
}

impl Admission {
    pub fn new(limits: AdmissionLimits) -> Self {
        Admission {
            mta: Arc::new(Semaphore::new(limits.mta)),
            users: Arc::new(Semaphore::new(limits.users)),
            pop3: Arc::new(Semaphore::new(limits.pop3)),
            limits,
            addresses: Arc::default(),
            sockets: Arc::default(),
            refusals_logged: Mutex::new(LogLimiter::new(Duration::from_secs(1))),
        }
    }

    fn exempt(&self, ip: IpAddr) -> bool {
        self.limits.exempt.iter().any(|n| n.contains(ip))
    }

    /// Admits a new connection from `peer` (its socket is `fd`) to `pool`,
    /// or says why not. Every attempt takes from the address's rate, so a
    /// client hammering a full server stays refused.
    pub fn admit(&self, pool: Pool, peer: SocketAddr, fd: RawFd, now: Instant) -> Result<Slot, Refusal> {
        let key = (!self.exempt(peer.ip())).then(|| ClientKey::of(peer.ip()));
        let mut addresses = lock(&self.addresses);
        if let Some(key) = key {
            let per_minute = self.limits.per_address_per_minute;
            if !addresses.contains_key(&key)
                && !make_room(
                    &mut addresses,
                    MAX_ADDRESSES,
                    |u| u.idle(now, per_minute),
                    |u| (u.live == 0).then_some(u.refilled),
                )
            {
                return Err(Refusal::PoolFull);
            }
            let used =
                addresses.entry(key).or_insert(AddressUse { live: 0, tokens: f64::from(per_minute), refilled: now });
            used.refill(now, per_minute);
            if used.tokens < 1.0 {
                return Err(Refusal::AddressTooFast);
            }
            used.tokens -= 1.0;
            if used.live >= self.limits.per_address {
                return Err(Refusal::AddressBusy);
            }
        }
        let permits = match pool {
            Pool::Mta => (self.mta.clone().try_acquire_owned(), None),
            Pool::Submission => (self.users.clone().try_acquire_owned(), None),
            Pool::Pop3 => (self.users.clone().try_acquire_owned(), Some(self.pop3.clone().try_acquire_owned())),
        };
        let permits = match permits {
            (Ok(p), None) => (p, None),
            (Ok(p), Some(Ok(q))) => (p, Some(q)),
            _ => return Err(Refusal::PoolFull),
        };
        if let Some(used) = key.and_then(|k| addresses.get_mut(&k)) {
            used.live += 1;
        }
        drop(addresses);
        lock(&self.sockets).insert(peer, fd);
        Ok(Slot {
            _permits: permits,
            address: key.map(|k| (self.addresses.clone(), k)),
            socket: (self.sockets.clone(), peer, fd),
        })
    }

    /// Logs a refusal, at most one line a second; the lines left out are
    /// counted in the next.
    pub fn log_refusal(&self, protocol: &str, peer: SocketAddr, why: Refusal, now: Instant) {
        if let Some(left_out) = lock(&self.refusals_logged).allow(now) {
            tracing::warn!(client = %peer, refused_not_logged = left_out, "{protocol} connection refused: {why}");
        }
    }

    /// Resolves when the client of the admitted connection from `peer` has
    /// closed its side or reset the connection (checked every 50 ms: this
    /// only runs while a session waits on purpose), never when the
    /// connection was not admitted here.
    pub async fn client_gone(&self, peer: &SocketAddr) {
        let Some(fd) = self.socket_of(peer) else {
            return std::future::pending().await;
        };
        while !hung_up(fd) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Whether the client of the admitted connection from `peer` has closed
    /// its side or reset the connection by now (false when the connection
    /// was not admitted here).
    pub fn client_gone_now(&self, peer: &SocketAddr) -> bool {
        self.socket_of(peer).is_some_and(hung_up)
    }

    fn socket_of(&self, peer: &SocketAddr) -> Option<RawFd> {
        lock(&self.sockets).get(peer).copied()
    }
}

/// Whether the peer of socket `fd` has shut down its side or reset the
/// connection. POLLRDHUP (Linux) is raised by the peer's FIN even when
/// unread data is still queued before it.
fn hung_up(fd: RawFd) -> bool {
    let mut p = libc::pollfd { fd, events: libc::POLLRDHUP, revents: 0 };
    // SAFETY: poll(2) reads and writes only `p`, an array of one entry; an
    // fd that is not open is reported as POLLNVAL, not an error of memory.
    let n = unsafe { libc::poll(&mut p, 1, 0) };
    n > 0 && p.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0
}

/// The failed-login rules, from the config.
#[derive(Clone, Debug)]
pub struct LoginPolicy {
    /// Failures from one address within `window` that ban the address.
    pub per_address: u32,
    /// Failures for one account within `window` (from anywhere) that ban
    /// the account: a guess spread over many addresses is stopped too.
    pub per_account: u32,
    pub window: Duration,
    /// How long a ban lasts.
    pub ban: Duration,
    /// The wait before a failure's reply, doubled per further failure.
    pub base_delay: Duration,
    /// Addresses not counted nor banned (their accounts still are).
    pub exempt: Vec<Network>,
}

/// The longest wait before a failure's reply: enough to slow a guesser
/// down, short because the bans do the stopping.
pub const MAX_DELAY: Duration = Duration::from_secs(5);

/// Addresses and accounts whose failures are remembered at most, and bans.
const MAX_TRACKED: usize = 65_536;

/// What a ban holds back.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum BanTarget {
    /// Every login from this client address.
    Address(ClientKey),
    /// Every login to this account, from anywhere.
    Account(Address),
}

impl BanTarget {
    /// An address (`192.0.2.7`, `2001:db8::/64`) or an account
    /// (`user@example.org`), as an operator types it.
    pub fn parse(s: &str) -> Option<BanTarget> {
        let s = s.trim();
        ClientKey::parse(s).map(BanTarget::Address).or_else(|| Address::parse(s).ok().map(BanTarget::Account))
    }

    /// The address or account alone, as [`BanTarget::parse`] reads it.
    pub fn name(&self) -> String {
        match self {
            BanTarget::Address(a) => a.to_string(),
            BanTarget::Account(a) => a.to_string(),
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            BanTarget::Address(_) => "address",
            BanTarget::Account(_) => "account",
        }
    }
}

impl fmt::Display for BanTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BanTarget::Address(a) => write!(f, "address {a}"),
            BanTarget::Account(a) => write!(f, "account {a}"),
        }
    }
}

/// Failures counted in a window that starts at the first of them.
struct Failures {
    count: u32,
    since: Instant,
}

struct Ban {
    until: Instant,
    failures: u32,
}

/// A ban as `hamail ban list` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BanEntry {
    pub target: BanTarget,
    pub remaining: Duration,
    /// The failures that set it.
    pub failures: u32,
}

/// What a failure costs.
#[derive(Debug, PartialEq, Eq)]
pub struct Penalty {
    /// How long to wait before the failure's reply.
    pub delay: Duration,
    /// Bans this failure set (to log and tell), each with the failures
    /// that set it.
    pub banned: Vec<(BanTarget, u32)>,
}

#[derive(Default)]
struct LoginState {
    by_address: HashMap<ClientKey, Failures>,
    by_account: HashMap<Address, Failures>,
    bans: HashMap<BanTarget, Ban>,
}

/// Failed logins (SMTP AUTH, POP3) per client address and per account,
/// and the bans they lead to. Bans are this node's and last until they
/// expire, are lifted, or the process ends.
pub struct Logins {
    policy: LoginPolicy,
    state: Mutex<LoginState>,
    refusals_logged: Mutex<LogLimiter>,
}

impl Logins {
    pub fn new(policy: LoginPolicy) -> Self {
        Logins { policy, state: Mutex::default(), refusals_logged: Mutex::new(LogLimiter::new(Duration::from_secs(1))) }
    }

    /// Whether a refusal for a ban may be logged now (at most one line a
    /// second: a banned client may keep trying as fast as it likes), with
    /// the number of those not logged since the last.
    pub fn log_refusal(&self, now: Instant) -> Option<u64> {
        lock(&self.refusals_logged).allow(now)
    }

    fn address_key(&self, ip: IpAddr) -> Option<ClientKey> {
        (!self.policy.exempt.iter().any(|n| n.contains(ip))).then(|| ClientKey::of(ip))
    }

    /// The ban that refuses a login from `ip` to `account` now, if any.
    pub fn banned(&self, ip: IpAddr, account: Option<&Address>, now: Instant) -> Option<BanTarget> {
        let mut state = lock(&self.state);
        let by_address = self.address_key(ip).map(BanTarget::Address);
        let by_account = account.cloned().map(BanTarget::Account);
        for target in [by_address, by_account].into_iter().flatten() {
            match state.bans.get(&target) {
                Some(ban) if ban.until > now => return Some(target),
                Some(_) => {
                    state.bans.remove(&target);
                }
                None => {}
            }
        }
        None
    }

    /// Records a failed login from `ip` (to `account`, when the name given
    /// was an address): returns the wait before its reply, and the bans it
    /// set.
    pub fn failed(&self, ip: IpAddr, account: Option<&Address>, now: Instant) -> Penalty {
        let p = &self.policy;
        let mut state = lock(&self.state);
        let state = &mut *state;
        let mut banned = Vec::new();
        let mut worst = 0;
        if let Some(key) = self.address_key(ip) {
            let n = count(&mut state.by_address, key, p.window, now);
            worst = worst.max(n);
            if n >= p.per_address {
                state.by_address.remove(&key);
                banned.push((BanTarget::Address(key), n));
            }
        }
        if let Some(account) = account {
            let n = count(&mut state.by_account, account.clone(), p.window, now);
            worst = worst.max(n);
            if n >= p.per_account {
                state.by_account.remove(account);
                banned.push((BanTarget::Account(account.clone()), n));
            }
        }
        let until = later(now, p.ban);
        for (target, failures) in &banned {
            insert_ban(&mut state.bans, target.clone(), Ban { until, failures: *failures }, now);
        }
        let factor = 1u32 << worst.saturating_sub(1).min(16);
        Penalty { delay: p.base_delay.saturating_mul(factor).min(MAX_DELAY), banned }
    }

    /// The bans in force, soonest to end first.
    pub fn list(&self, now: Instant) -> Vec<BanEntry> {
        let mut state = lock(&self.state);
        state.bans.retain(|_, b| b.until > now);
        let mut v: Vec<BanEntry> = state
            .bans
            .iter()
            .map(|(t, b)| BanEntry { target: t.clone(), remaining: b.until - now, failures: b.failures })
            .collect();
        v.sort_by(|a, b| a.remaining.cmp(&b.remaining).then_with(|| a.target.cmp(&b.target)));
        v
    }

    /// Bans `target` until `until` (a ban another node set). True when it
    /// was not banned that long already.
    pub fn impose(&self, target: BanTarget, until: Instant, failures: u32, now: Instant) -> bool {
        let mut state = lock(&self.state);
        if state.bans.get(&target).is_some_and(|b| b.until >= until) {
            return false;
        }
        insert_ban(&mut state.bans, target, Ban { until, failures }, now);
        true
    }

    /// Lifts the ban on `target` and forgets its failures (so the next
    /// mistake does not ban it again at once). False when it had no ban.
    pub fn lift(&self, target: &BanTarget) -> bool {
        let mut state = lock(&self.state);
        match target {
            BanTarget::Address(a) => state.by_address.remove(a),
            BanTarget::Account(a) => state.by_account.remove(a),
        };
        state.bans.remove(target).is_some()
    }
}

/// Sets or replaces the ban on `target`. Room is made (expired bans, then
/// those ending soonest) only for a target not banned yet: renewing a ban
/// never costs another target its own.
fn insert_ban(bans: &mut HashMap<BanTarget, Ban>, target: BanTarget, ban: Ban, now: Instant) {
    if !bans.contains_key(&target) {
        make_room(bans, MAX_TRACKED, |b| b.until <= now, |b| Some(b.until));
    }
    bans.insert(target, ban);
}

/// Counts one failure of `key` (a new window when the last has passed);
/// returns the count in the window.
fn count<K: Clone + Eq + Hash>(map: &mut HashMap<K, Failures>, key: K, window: Duration, now: Instant) -> u32 {
    if !map.contains_key(&key) {
        make_room(map, MAX_TRACKED, |f| now.saturating_duration_since(f.since) >= window, |f| Some(f.since));
    }
    let f = map.entry(key).or_insert(Failures { count: 0, since: now });
    if now.saturating_duration_since(f.since) >= window {
        *f = Failures { count: 0, since: now };
    }
    f.count = f.count.saturating_add(1);
    f.count
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

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn networks_and_client_keys() {
        let lo = Network::parse("127.0.0.0/8").unwrap();
        assert!(lo.contains(ip("127.0.0.2")) && !lo.contains(ip("128.0.0.1")));
        assert!(lo.contains(ip("::ffff:127.9.9.9")));
        assert!(Network::parse("::1").unwrap().contains(ip("::1")));
        assert!(!Network::parse("::1").unwrap().contains(ip("::2")));
        assert!(Network::parse("0.0.0.0/0").unwrap().contains(ip("198.18.0.1")));
        assert!(Network::parse("::/0").unwrap().contains(ip("2001:db8::1")));
        assert!(Network::parse("10.0.0.0/33").unwrap_err().contains("0 to 32"));
        assert!(Network::parse("example").unwrap_err().contains("`example`"));
        // One IPv6 /64 is one client; a mapped IPv4 address is the IPv4 one.
        assert_eq!(ClientKey::of(ip("2001:db8::1")), ClientKey::of(ip("2001:db8::ffff:1")));
        assert_ne!(ClientKey::of(ip("2001:db8::1")), ClientKey::of(ip("2001:db8:0:1::1")));
        assert_eq!(ClientKey::of(ip("::ffff:192.0.2.1")), ClientKey::of(ip("192.0.2.1")));
        assert_eq!(ClientKey::of(ip("2001:db8::1")).to_string(), "2001:db8::/64");
        assert_eq!(ClientKey::parse("2001:db8::/64"), Some(ClientKey::of(ip("2001:db8::5"))));
        assert_eq!(ClientKey::parse("nope"), None);
    }

    fn admission(per_address: u32, per_minute: u32, exempt: &[&str]) -> Admission {
        Admission::new(AdmissionLimits {
            mta: 3,
            users: 2,
            pop3: 1,
            per_address,
            per_address_per_minute: per_minute,
            exempt: exempt.iter().map(|n| Network::parse(n).unwrap()).collect(),
        })
    }

    fn peer(ip: &str, port: u16) -> SocketAddr {
        SocketAddr::new(ip.parse().unwrap(), port)
    }

    #[test]
    fn pools_are_separate_and_slots_come_back() {
        let a = admission(100, 1000, &[]);
        let now = Instant::now();
        let mta: Vec<Slot> = (0..3).map(|i| a.admit(Pool::Mta, peer("192.0.2.1", i), -1, now).unwrap()).collect();
        assert_eq!(a.admit(Pool::Mta, peer("192.0.2.2", 9), -1, now).err(), Some(Refusal::PoolFull));
        // Port 25 full: the users' pool is untouched.
        let sub = a.admit(Pool::Submission, peer("192.0.2.1", 10), -1, now).unwrap();
        let pop = a.admit(Pool::Pop3, peer("192.0.2.1", 11), -1, now).unwrap();
        assert_eq!(a.admit(Pool::Submission, peer("192.0.2.3", 12), -1, now).err(), Some(Refusal::PoolFull));
        drop(sub);
        // POP3 has its own cap within the users' pool.
        assert_eq!(a.admit(Pool::Pop3, peer("192.0.2.3", 13), -1, now).err(), Some(Refusal::PoolFull));
        drop(pop);
        assert!(a.admit(Pool::Pop3, peer("192.0.2.3", 14), -1, now).is_ok());
        drop(mta);
        assert!(a.admit(Pool::Mta, peer("192.0.2.2", 15), -1, now).is_ok());
    }

    #[test]
    fn per_address_concurrency_counts_every_port_together() {
        let a = admission(2, 1000, &["127.0.0.0/8"]);
        let now = Instant::now();
        let first = a.admit(Pool::Mta, peer("192.0.2.1", 1), -1, now).unwrap();
        let _second = a.admit(Pool::Submission, peer("192.0.2.1", 2), -1, now).unwrap();
        assert_eq!(a.admit(Pool::Mta, peer("192.0.2.1", 3), -1, now).err(), Some(Refusal::AddressBusy));
        assert!(Refusal::AddressBusy.per_address());
        // Another address is not held back; nor is an exempt one.
        let _other = a.admit(Pool::Mta, peer("192.0.2.2", 4), -1, now).unwrap();
        let _local = [Pool::Mta, Pool::Submission].map(|pool| a.admit(pool, peer("127.0.0.1", 10), -1, now).unwrap());
        drop(first);
        assert!(a.admit(Pool::Mta, peer("192.0.2.1", 5), -1, now).is_ok());
    }

    #[test]
    fn new_connections_per_minute_refill_over_time() {
        let a = admission(100, 6, &[]);
        let t0 = Instant::now();
        for i in 0..6 {
            drop(a.admit(Pool::Mta, peer("192.0.2.1", i), -1, t0).unwrap());
        }
        assert_eq!(a.admit(Pool::Mta, peer("192.0.2.1", 7), -1, t0).err(), Some(Refusal::AddressTooFast));
        assert!(a.admit(Pool::Mta, peer("192.0.2.9", 7), -1, t0).is_ok());
        // 6 a minute: one more every 10 s.
        let t1 = t0 + Duration::from_secs(10);
        assert!(a.admit(Pool::Mta, peer("192.0.2.1", 8), -1, t1).is_ok());
        assert_eq!(a.admit(Pool::Mta, peer("192.0.2.1", 9), -1, t1).err(), Some(Refusal::AddressTooFast));
        // Refused attempts count: hammering keeps the address out.
        let t2 = t1 + Duration::from_secs(60);
        for i in 0..6 {
            assert!(a.admit(Pool::Mta, peer("192.0.2.1", 20 + i), -1, t2).is_ok());
        }
    }

    #[test]
    fn make_room_forgets_stale_then_oldest_and_never_in_use() {
        let t0 = Instant::now();
        let at = |s| t0 + Duration::from_secs(s);
        // (in use, last seen)
        let mut map: HashMap<u32, (bool, Instant)> = (0..4).map(|i| (i, (i == 0, at(u64::from(i))))).collect();
        map.insert(4, (false, at(0)));
        let stale = |v: &(bool, Instant)| !v.0 && v.1 < at(1);
        let age = |v: &(bool, Instant)| (!v.0).then_some(v.1);
        assert!(make_room(&mut map, 5, stale, age));
        assert_eq!(map.len(), 4, "the stale entry 4 is forgotten");
        assert!(make_room(&mut map, 2, stale, age));
        let mut kept: Vec<u32> = map.keys().copied().collect();
        kept.sort_unstable();
        assert_eq!(kept, vec![0], "oldest first, never the one in use");
        assert!(!make_room(&mut map, 1, stale, age));
        assert_eq!(map.len(), 1);
    }

    #[test]
    fn make_room_forgets_a_batch_so_the_next_entries_cost_no_scan() {
        let t0 = Instant::now();
        // (in use, last use): entry 0 is the oldest but in use.
        let mut map: HashMap<u32, (bool, Instant)> =
            (0..64).map(|i| (i, (i == 0, t0 + Duration::from_secs(u64::from(i))))).collect();
        let never_stale = |_: &(bool, Instant)| false;
        let age = |v: &(bool, Instant)| (!v.0).then_some(v.1);
        assert!(make_room(&mut map, 64, never_stale, age));
        // An eighth of the table at once, the least recently used first.
        assert_eq!(map.len(), 56);
        assert!(map.contains_key(&0), "never the entry in use");
        assert!((1..=8).all(|i| !map.contains_key(&i)) && (9..64).all(|i| map.contains_key(&i)));
        // The next 8 new entries find room without forgetting anything.
        for i in 100..108 {
            assert!(make_room(&mut map, 64, never_stale, age));
            map.insert(i, (false, t0 + Duration::from_secs(1000)));
        }
        assert_eq!(map.len(), 64);
    }

    #[test]
    fn a_full_address_table_does_not_forget_a_hammering_address() {
        let a = admission(100, 6, &[]);
        let t0 = Instant::now();
        let other = |i: usize| peer(&format!("10.{}.{}.{}", i >> 16, (i >> 8) & 255, i & 255), 1);
        // One address keeps a connection open from the first instant.
        let held = a.admit(Pool::Mta, peer("192.0.2.1", 1), -1, t0).unwrap();
        // The table is filled with addresses that each used one connection.
        for i in 0..MAX_ADDRESSES - 2 {
            drop(a.admit(Pool::Mta, other(i), -1, t0));
        }
        // A client uses up its rate, and keeps trying.
        let t1 = t0 + Duration::from_secs(1);
        for i in 0..6 {
            drop(a.admit(Pool::Mta, peer("192.0.2.9", i), -1, t1).unwrap());
        }
        assert_eq!(a.admit(Pool::Mta, peer("192.0.2.9", 9), -1, t1).err(), Some(Refusal::AddressTooFast));
        assert_eq!(lock(&a.addresses).len(), MAX_ADDRESSES);
        // New addresses arrive with the table full: a batch of the least
        // recently used ones is forgotten, not the hammering client (its
        // bucket is not reset) nor the one with a connection open.
        let t2 = t0 + Duration::from_secs(2);
        for i in 0..100 {
            drop(a.admit(Pool::Mta, peer(&format!("198.18.0.{i}"), 1), -1, t2));
        }
        let table = lock(&a.addresses);
        assert_eq!(table.len(), MAX_ADDRESSES - MAX_ADDRESSES / 8 + 100, "one batch forgotten for 100 new addresses");
        assert!(table.contains_key(&ClientKey::of(ip("192.0.2.1"))));
        drop(table);
        assert_eq!(a.admit(Pool::Mta, peer("192.0.2.9", 10), -1, t2).err(), Some(Refusal::AddressTooFast));
        drop(held);
    }

    #[test]
    fn a_renewed_ban_does_not_evict_another() {
        let l = Logins::new(policy(&[]));
        let t0 = Instant::now();
        {
            let mut state = lock(&l.state);
            for i in 0..MAX_TRACKED {
                let target = BanTarget::Address(ClientKey::of(IpAddr::V4(std::net::Ipv4Addr::from(i as u32))));
                state.bans.insert(target, Ban { until: t0 + Duration::from_secs(60 + i as u64), failures: 3 });
            }
        }
        // The ban ending soonest is renewed by another node: no room needed.
        let first = BanTarget::Address(ClientKey::of(ip("0.0.0.0")));
        assert!(l.impose(first, t0 + Duration::from_secs(3600), 3, t0));
        let second = ClientKey::of(ip("0.0.0.1"));
        assert_eq!(l.banned(ip("0.0.0.1"), None, t0), Some(BanTarget::Address(second)));
        assert_eq!(lock(&l.state).bans.len(), MAX_TRACKED);
        // A banned address failing again (a login checked before its ban
        // arrived) renews its own ban: no other ban is forgotten either.
        for _ in 0..3 {
            l.failed(ip("0.0.1.0"), None, t0);
        }
        assert_eq!(lock(&l.state).bans.len(), MAX_TRACKED);
        assert!(l.banned(ip("0.0.0.1"), None, t0).is_some(), "the ban ending soonest is kept");
        // A new target does make room: the bans ending soonest go.
        assert!(l.impose(BanTarget::parse("198.18.0.1").unwrap(), t0 + Duration::from_secs(60), 3, t0));
        assert_eq!(lock(&l.state).bans.len(), MAX_TRACKED - MAX_TRACKED / 8 + 1);
        assert_eq!(l.banned(ip("0.0.0.2"), None, t0), None);
        assert!(l.banned(ip("0.0.255.255"), None, t0).is_some());
        assert!(l.banned(ip("198.18.0.1"), None, t0).is_some());
    }

    #[test]
    fn log_limiter_counts_what_it_leaves_out() {
        let mut l = LogLimiter::new(Duration::from_secs(1));
        let t0 = Instant::now();
        assert_eq!(l.allow(t0), Some(0));
        assert_eq!(l.allow(t0 + Duration::from_millis(10)), None);
        assert_eq!(l.allow(t0 + Duration::from_millis(999)), None);
        assert_eq!(l.allow(t0 + Duration::from_secs(1)), Some(2));
    }

    fn policy(exempt: &[&str]) -> LoginPolicy {
        LoginPolicy {
            per_address: 3,
            per_account: 5,
            window: Duration::from_secs(900),
            ban: Duration::from_secs(600),
            base_delay: Duration::from_millis(100),
            exempt: exempt.iter().map(|n| Network::parse(n).unwrap()).collect(),
        }
    }

    fn user(s: &str) -> Address {
        Address::parse(s).unwrap()
    }

    #[test]
    fn an_address_is_banned_after_its_failures_until_the_ban_ends() {
        let l = Logins::new(policy(&[]));
        let t0 = Instant::now();
        let (a, alice) = (ip("192.0.2.1"), user("alice@example.org"));
        assert_eq!(l.failed(a, Some(&alice), t0).delay, Duration::from_millis(100));
        assert_eq!(l.failed(a, None, t0).delay, Duration::from_millis(200));
        assert_eq!(l.banned(a, Some(&alice), t0), None);
        let third = l.failed(a, Some(&user("bob@example.org")), t0);
        assert_eq!(third.banned, vec![(BanTarget::Address(ClientKey::of(a)), 3)]);
        // Banned: every login from it, whatever the account.
        let t1 = t0 + Duration::from_secs(599);
        assert_eq!(l.banned(a, Some(&alice), t1), Some(BanTarget::Address(ClientKey::of(a))));
        assert_eq!(l.banned(a, None, t1), Some(BanTarget::Address(ClientKey::of(a))));
        assert_eq!(l.banned(ip("192.0.2.2"), Some(&alice), t1), None);
        let list = l.list(t1);
        assert_eq!(list.len(), 1);
        assert_eq!((list[0].remaining, list[0].failures), (Duration::from_secs(1), 3));
        let t2 = t0 + Duration::from_secs(600);
        assert_eq!(l.banned(a, Some(&alice), t2), None);
        assert!(l.list(t2).is_empty());
        // The ban cleared the count: a new start.
        assert_eq!(l.failed(a, None, t2).banned, vec![]);
    }

    #[test]
    fn failures_outside_the_window_do_not_add_up() {
        let l = Logins::new(policy(&[]));
        let t0 = Instant::now();
        let a = ip("192.0.2.1");
        l.failed(a, None, t0);
        l.failed(a, None, t0 + Duration::from_secs(899));
        let later = l.failed(a, None, t0 + Duration::from_secs(900));
        assert!(later.banned.is_empty());
        assert_eq!(later.delay, Duration::from_millis(100));
    }

    #[test]
    fn an_account_guessed_from_many_addresses_is_banned() {
        let l = Logins::new(policy(&["127.0.0.0/8"]));
        let t0 = Instant::now();
        let alice = user("alice@example.org");
        for i in 1..5 {
            assert!(l.failed(ip(&format!("192.0.2.{i}")), Some(&alice), t0).banned.is_empty());
        }
        let fifth = l.failed(ip("192.0.2.5"), Some(&alice), t0);
        assert_eq!(fifth.banned, vec![(BanTarget::Account(alice.clone()), 5)]);
        assert_eq!(l.banned(ip("198.18.0.1"), Some(&alice), t0), Some(BanTarget::Account(alice.clone())));
        assert_eq!(l.banned(ip("198.18.0.1"), Some(&user("bob@example.org")), t0), None);
        assert!(l.lift(&BanTarget::parse("Alice@example.org").unwrap()));
        assert!(!l.lift(&BanTarget::Account(alice.clone())));
        assert_eq!(l.banned(ip("198.18.0.1"), Some(&alice), t0), None);
    }

    #[test]
    fn exempt_addresses_are_counted_only_by_account() {
        let l = Logins::new(policy(&["127.0.0.0/8"]));
        let t0 = Instant::now();
        for _ in 0..4 {
            assert!(l.failed(ip("127.0.0.1"), None, t0).banned.is_empty());
        }
        assert_eq!(l.banned(ip("127.0.0.1"), None, t0), None);
        // The delay still grows with the account's failures.
        let bob = user("bob@example.org");
        l.failed(ip("127.0.0.1"), Some(&bob), t0);
        assert_eq!(l.failed(ip("127.0.0.1"), Some(&bob), t0).delay, Duration::from_millis(200));
    }

    #[test]
    fn the_delay_doubles_and_is_capped() {
        let mut p = policy(&[]);
        p.per_address = 1000;
        let l = Logins::new(p);
        let t0 = Instant::now();
        let delays: Vec<Duration> = (0..40).map(|_| l.failed(ip("192.0.2.1"), None, t0).delay).collect();
        assert_eq!(delays[2], Duration::from_millis(400));
        assert_eq!(delays[39], MAX_DELAY);
    }

    #[test]
    fn a_ban_from_another_node_is_held_and_never_shortened() {
        let l = Logins::new(policy(&[]));
        let t0 = Instant::now();
        let target = BanTarget::parse("192.0.2.1").unwrap();
        assert_eq!(target.name(), "192.0.2.1");
        assert!(l.impose(target.clone(), t0 + Duration::from_secs(60), 10, t0));
        assert!(!l.impose(target.clone(), t0 + Duration::from_secs(30), 10, t0), "an earlier end changes nothing");
        assert_eq!(l.banned(ip("192.0.2.1"), None, t0 + Duration::from_secs(59)), Some(target.clone()));
        assert_eq!(l.list(t0)[0].remaining, Duration::from_secs(60));
        assert!(l.impose(target.clone(), t0 + Duration::from_secs(90), 12, t0));
        assert_eq!(l.list(t0)[0].failures, 12);
        assert!(l.lift(&target));
    }

    #[test]
    fn ban_targets_parse_and_lift_an_address() {
        let l = Logins::new(policy(&[]));
        let t0 = Instant::now();
        for _ in 0..3 {
            l.failed(ip("2001:db8::7"), None, t0);
        }
        let target = BanTarget::parse("2001:db8::1").unwrap();
        assert_eq!(target.to_string(), "address 2001:db8::/64");
        assert_eq!(l.banned(ip("2001:db8::ffff"), None, t0), Some(target.clone()));
        assert!(l.lift(&target));
        assert_eq!(l.banned(ip("2001:db8::7"), None, t0), None);
        assert_eq!(BanTarget::parse("not an address"), None);
    }
}
