//! Password hashing and checking: argon2id, on a small fixed pool of
//! threads that each own one reusable argon2 memory block, plus a cache of
//! recent successful logins.
//!
//! New passwords are always hashed with argon2id. Stored hashes may also be
//! in the crypt(3) formats of the systems users are imported from
//! (`/etc/shadow`, Dovecot passwd-files), kept as they are so that users keep
//! their passwords: SHA-512-crypt `$6$` and SHA-256-crypt `$5$` (Drepper's
//! "Unix crypt using SHA-256 and SHA-512"), bcrypt `$2a$`/`$2b$`/`$2x$`/`$2y$`
//! and yescrypt `$y$` (the default of current Debian and Fedora shadow
//! files). See [`HashScheme`]. They are checked on the same worker threads,
//! with the same cache, so a slow one never blocks the async runtime.
//!
//! Why a pool: argon2 is slow and big on purpose (19 MiB per check with the
//! default parameters). Run on tokio's blocking threads, every concurrent
//! login allocated its own 19 MiB and the allocator kept them: the server
//! grew to gigabytes under a POP3 load. Two workers with one buffer each
//! bound that memory to about 40 MiB and the CPU to the two cores; an idle
//! worker frees its buffer after a few seconds.
//!
//! Why a cache: POP3 clients log in every few minutes with the same
//! password, and a mail server that spends 20 ms of CPU per login cannot
//! serve thousands of sessions a second (Dovecot has `auth_cache` for the
//! same reason). After a successful argon2 check we remember
//! SHA-256(process key, stored hash, password): the next login with the same
//! password against the same stored hash is a table lookup. A password change
//! changes the stored hash, so old entries never match again. Failures are
//! never cached, so guessing stays at argon2 speed. The key is random per
//! process and never written anywhere.

use std::collections::HashMap;
use std::sync::{mpsc, Arc, Mutex, OnceLock, PoisonError};

use argon2::password_hash::{rand_core::OsRng, PasswordHash, SaltString};
use argon2::{Algorithm, Argon2, Block, Params, Version};
use sha2::{Digest, Sha256};

use crate::{StoreError, StoreResult};

/// Highest `rounds=` of an imported SHA-crypt hash (the default is 5000;
/// glibc allows up to 999,999,999, which is minutes of CPU per login).
const MAX_SHA_CRYPT_ROUNDS: u64 = 1_000_000;
/// Highest bcrypt cost (log2 of the rounds): 14 is about a second.
const MAX_BCRYPT_COST: u32 = 14;
/// Largest memory an imported argon2 or yescrypt hash may ask for per
/// check (each of the two workers may hold this much).
const MAX_HASH_MEMORY: u64 = 128 * 1024 * 1024;

/// The formats of stored password hashes this store verifies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HashScheme {
    /// `$argon2id$`, `$argon2i$`, `$argon2d$` (PHC string format): what
    /// hamail writes.
    Argon2,
    /// `$6$`: SHA-512-crypt.
    Sha512Crypt,
    /// `$5$`: SHA-256-crypt.
    Sha256Crypt,
    /// `$2a$`, `$2b$`, `$2x$`, `$2y$`: bcrypt (OpenBSD, PHP, htpasswd -B).
    Bcrypt,
    /// `$y$`: yescrypt.
    Yescrypt,
}

impl HashScheme {
    /// The scheme `stored` claims by its prefix (not whether it is
    /// well-formed: see [`validate_hash`]).
    pub fn of(stored: &str) -> Option<HashScheme> {
        let scheme = if stored.starts_with("$argon2") {
            HashScheme::Argon2
        } else if stored.starts_with("$6$") {
            HashScheme::Sha512Crypt
        } else if stored.starts_with("$5$") {
            HashScheme::Sha256Crypt
        } else if ["$2a$", "$2b$", "$2x$", "$2y$"].iter().any(|p| stored.starts_with(p)) {
            HashScheme::Bcrypt
        } else if stored.starts_with("$y$") {
            HashScheme::Yescrypt
        } else {
            return None;
        };
        Some(scheme)
    }

    pub fn name(self) -> &'static str {
        match self {
            HashScheme::Argon2 => "argon2",
            HashScheme::Sha512Crypt => "SHA-512-crypt",
            HashScheme::Sha256Crypt => "SHA-256-crypt",
            HashScheme::Bcrypt => "bcrypt",
            HashScheme::Yescrypt => "yescrypt",
        }
    }
}

/// Whether `stored` is a hash this store can verify: a known scheme,
/// well-formed, and with a cost that keeps one check within about a second
/// and [`MAX_HASH_MEMORY`] (a hash is checked at every login, and an
/// unbounded one would let a single account stall the workers). A
/// `Permanent` error says what is wrong; nothing is computed.
pub fn validate_hash(stored: &str) -> StoreResult<HashScheme> {
    let bad = |why: String| StoreError::Permanent(format!("not a usable password hash: {why}"));
    let Some(scheme) = HashScheme::of(stored) else {
        let prefix: String = stored.chars().take(4).collect();
        return Err(bad(if stored.starts_with('$') {
            format!(
                "unsupported scheme '{prefix}...' (supported: $argon2id$, $argon2i$, $6$, $5$, $2y$/$2b$/$2a$, $y$)"
            )
        } else {
            "no crypt(3) scheme prefix".into()
        }));
    };
    match scheme {
        HashScheme::Argon2 => {
            let parsed = PasswordHash::new(stored).map_err(|e| bad(format!("argon2: {e}")))?;
            Algorithm::try_from(parsed.algorithm).map_err(|e| bad(format!("argon2: {e}")))?;
            let params = Params::try_from(&parsed).map_err(|e| bad(format!("argon2 parameters: {e}")))?;
            if parsed.salt.is_none() || parsed.hash.is_none() {
                return Err(bad("argon2: no salt or no hash".into()));
            }
            if u64::from(params.m_cost()) * 1024 > MAX_HASH_MEMORY || params.t_cost() > 64 {
                return Err(bad(format!("argon2 cost too high (m={} KiB, t={})", params.m_cost(), params.t_cost())));
            }
        }
        HashScheme::Sha512Crypt | HashScheme::Sha256Crypt => {
            ShaCrypt::parse(&stored[3..], sha_crypt_len(scheme)).map_err(bad)?;
        }
        HashScheme::Bcrypt => {
            let rest = &stored[4..];
            let (cost, digest) = rest.split_once('$').ok_or_else(|| bad("bcrypt: no cost".into()))?;
            let cost: u32 = match cost.len() {
                2 => cost.parse().map_err(|_| bad(format!("bcrypt: cost '{cost}'")))?,
                _ => return Err(bad(format!("bcrypt: cost '{cost}'"))),
            };
            if !(4..=MAX_BCRYPT_COST).contains(&cost) {
                return Err(bad(format!("bcrypt cost {cost} outside 4..={MAX_BCRYPT_COST}")));
            }
            if digest.len() != 53 || !digest.bytes().all(is_crypt_base64) {
                return Err(bad("bcrypt: salt and hash must be 53 characters of ./A-Za-z0-9".into()));
            }
        }
        HashScheme::Yescrypt => {
            let parsed = yescrypt::PasswordHashRef::new(stored).map_err(|e| bad(format!("yescrypt: {e}")))?;
            let mut fields = parsed.fields();
            let params: yescrypt::Params = fields
                .next()
                .ok_or_else(|| bad("yescrypt: no parameters".into()))?
                .as_str()
                .parse()
                .map_err(|e| bad(format!("yescrypt parameters: {e}")))?;
            if fields.count() != 2 {
                return Err(bad("yescrypt: expected $y$params$salt$hash".into()));
            }
            let memory = 128u64.saturating_mul(params.n()).saturating_mul(u64::from(params.r()));
            if memory.saturating_mul(u64::from(params.p().max(1))) > MAX_HASH_MEMORY {
                return Err(bad(format!("yescrypt needs {} MiB per check", memory >> 20)));
            }
        }
    }
    Ok(scheme)
}

/// Characters of the encoded hash of a SHA-crypt string.
fn sha_crypt_len(scheme: HashScheme) -> usize {
    if scheme == HashScheme::Sha512Crypt {
        86
    } else {
        43
    }
}

/// The crypt(3) base64 alphabet.
fn is_crypt_base64(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'.' || b == b'/'
}

/// The parts of a SHA-crypt string (Drepper, "Unix crypt using SHA-256
/// and SHA-512"): `$6$[rounds=N$]salt$hash`.
struct ShaCrypt<'a> {
    rounds: usize,
    salt: &'a str,
    hash: &'a str,
}

impl<'a> ShaCrypt<'a> {
    /// `rest` is what follows `$6$` or `$5$`; `hash_len` the length of the
    /// encoded hash (86 for SHA-512, 43 for SHA-256).
    fn parse(rest: &'a str, hash_len: usize) -> Result<ShaCrypt<'a>, String> {
        let (rounds, rest) = match rest.strip_prefix("rounds=") {
            Some(r) => {
                let (n, after) = r.split_once('$').ok_or("SHA-crypt: rounds= without a salt")?;
                let n: u64 = n.parse().map_err(|_| format!("SHA-crypt: rounds={n}"))?;
                if n > MAX_SHA_CRYPT_ROUNDS {
                    return Err(format!("SHA-crypt rounds={n} above {MAX_SHA_CRYPT_ROUNDS}"));
                }
                // Below the minimum, crypt(3) uses the minimum.
                (n.max(sha_crypt::ROUNDS_MIN as u64) as usize, after)
            }
            None => (sha_crypt::ROUNDS_DEFAULT, rest),
        };
        let (salt, hash) = rest.split_once('$').ok_or("SHA-crypt: no hash after the salt")?;
        // crypt(3) writes at most 16 characters of salt, never '$' or ':'.
        if salt.len() > 16 || salt.contains([':', '\n']) {
            return Err("SHA-crypt: salt longer than 16 characters or with ':'".into());
        }
        if hash.len() != hash_len || !hash.bytes().all(is_crypt_base64) {
            return Err(format!("SHA-crypt: the hash must be {hash_len} characters of ./A-Za-z0-9"));
        }
        Ok(ShaCrypt { rounds, salt, hash })
    }

    fn check(&self, password: &str, scheme: HashScheme) -> StoreResult<bool> {
        let failed = |e: sha_crypt::CryptError| StoreError::Internal(format!("SHA-crypt: {e:?}"));
        let computed = if scheme == HashScheme::Sha512Crypt {
            let params = sha_crypt::Sha512Params::new(self.rounds).map_err(failed)?;
            sha_crypt::sha512_crypt_b64(password.as_bytes(), self.salt.as_bytes(), &params).map_err(failed)?
        } else {
            let params = sha_crypt::Sha256Params::new(self.rounds).map_err(failed)?;
            sha_crypt::sha256_crypt_b64(password.as_bytes(), self.salt.as_bytes(), &params).map_err(failed)?
        };
        Ok(constant_time_eq(computed.as_bytes(), self.hash.as_bytes()))
    }
}

/// Equal contents, without an early exit on the first differing byte.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Threads doing argon2 work (one per core of the machines we aim at).
const WORKERS: usize = 2;
/// A worker idle this long frees its argon2 memory.
const IDLE_RELEASE: std::time::Duration = std::time::Duration::from_secs(5);
/// Entries in the login cache before it is cleared.
const CACHE_CAPACITY: usize = 100_000;

enum Job {
    Hash { password: String, reply: tokio::sync::oneshot::Sender<StoreResult<String>> },
    Check { phc: String, password: String, reply: tokio::sync::oneshot::Sender<StoreResult<bool>> },
}

/// The process-wide argon2 pool and login cache.
pub struct Passwords {
    jobs: Mutex<mpsc::Sender<Job>>,
    cache: Mutex<HashMap<[u8; 32], ()>>,
    key: [u8; 32],
}

impl Passwords {
    /// The shared instance (started on first use).
    pub fn global() -> &'static Passwords {
        static POOL: OnceLock<Passwords> = OnceLock::new();
        POOL.get_or_init(Passwords::start)
    }

    fn start() -> Passwords {
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..WORKERS {
            let rx = rx.clone();
            let spawned = std::thread::Builder::new().name(format!("argon2-{i}")).spawn(move || worker(rx));
            if let Err(e) = spawned {
                tracing::error!(error = %e, "cannot start an argon2 worker thread");
            }
        }
        let mut key = [0u8; 32];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut key);
        Passwords { jobs: Mutex::new(tx), cache: Mutex::new(HashMap::new()), key }
    }

    fn submit(&self, job: Job) -> StoreResult<()> {
        self.jobs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .send(job)
            .map_err(|_| StoreError::Internal("the argon2 workers are gone".into()))
    }

    /// A new argon2id PHC string for `password`, with a random salt.
    pub async fn hash(&self, password: &str) -> StoreResult<String> {
        let (reply, rx) = tokio::sync::oneshot::channel();
        self.submit(Job::Hash { password: password.to_string(), reply })?;
        rx.await.map_err(|_| StoreError::Internal("argon2 worker dropped a job".into()))?
    }

    /// Whether `password` matches the stored PHC string `phc`.
    pub async fn check(&self, phc: &str, password: &str) -> StoreResult<bool> {
        let digest = self.cache_key(phc, password);
        if self.cache.lock().unwrap_or_else(PoisonError::into_inner).contains_key(&digest) {
            return Ok(true);
        }
        let (reply, rx) = tokio::sync::oneshot::channel();
        self.submit(Job::Check { phc: phc.to_string(), password: password.to_string(), reply })?;
        let ok = rx.await.map_err(|_| StoreError::Internal("argon2 worker dropped a job".into()))??;
        if ok {
            let mut cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
            if cache.len() >= CACHE_CAPACITY {
                cache.clear();
            }
            cache.insert(digest, ());
        }
        Ok(ok)
    }

    /// Runs an argon2 check without consulting the cache (for unknown
    /// users: same cost as a real check, so timing tells nothing).
    pub async fn check_uncached(&self, phc: &str, password: &str) -> StoreResult<bool> {
        let (reply, rx) = tokio::sync::oneshot::channel();
        self.submit(Job::Check { phc: phc.to_string(), password: password.to_string(), reply })?;
        rx.await.map_err(|_| StoreError::Internal("argon2 worker dropped a job".into()))?
    }

    fn cache_key(&self, phc: &str, password: &str) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(self.key);
        h.update((phc.len() as u64).to_le_bytes());
        h.update(phc.as_bytes());
        h.update(password.as_bytes());
        h.finalize().into()
    }

    /// A hash of a random password, for checks against unknown users.
    pub async fn dummy_hash(&self) -> StoreResult<&'static str> {
        static DUMMY: OnceLock<String> = OnceLock::new();
        if let Some(h) = DUMMY.get() {
            return Ok(h);
        }
        let random = SaltString::generate(&mut OsRng);
        let h = self.hash(random.as_str()).await?;
        Ok(DUMMY.get_or_init(|| h))
    }
}

fn worker(rx: Arc<Mutex<mpsc::Receiver<Job>>>) {
    // One buffer for the life of the thread, grown to the largest m_cost
    // seen (stored hashes with other parameters still verify).
    let mut memory: Vec<Block> = Vec::new();
    loop {
        let next = rx.lock().unwrap_or_else(PoisonError::into_inner).recv_timeout(IDLE_RELEASE);
        let job = match next {
            Ok(j) => j,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                // Idle: give the 19 MiB back (logins come in bursts; the
                // login cache serves the repeats).
                memory = Vec::new();
                continue;
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => return,
        };
        match job {
            Job::Hash { password, reply } => {
                let _ = reply.send(hash_with(&mut memory, &password));
            }
            Job::Check { phc, password, reply } => {
                let _ = reply.send(check_with(&mut memory, &phc, &password));
            }
        }
    }
}

fn hash_with(memory: &mut Vec<Block>, password: &str) -> StoreResult<String> {
    // OWASP's argon2id options are equivalent in cost to an attacker;
    // this one (9 MiB, 4 passes) needs half the memory of the crate's
    // default (19 MiB, 2 passes) for the same work, which matters with two
    // workers in a mail server's footprint. Stored hashes carry their own
    // parameters, so older ones still verify.
    let params =
        Params::new(9 * 1024, 4, 1, None).map_err(|e| StoreError::Internal(format!("argon2 parameters: {e}")))?;
    let salt = SaltString::generate(&mut OsRng);
    let mut salt_bytes = [0u8; 64];
    let salt_raw = salt.decode_b64(&mut salt_bytes).map_err(|e| StoreError::Internal(format!("salt: {e}")))?;
    let mut out = [0u8; 32];
    run(memory, Algorithm::Argon2id, Version::V0x13, params.clone(), password, salt_raw, &mut out)?;
    let output =
        argon2::password_hash::Output::new(&out).map_err(|e| StoreError::Internal(format!("hash output: {e}")))?;
    let phc = PasswordHash {
        algorithm: Algorithm::Argon2id.ident(),
        version: Some(Version::V0x13.into()),
        params: (&params).try_into().map_err(|e| StoreError::Internal(format!("params: {e}")))?,
        salt: Some(salt.as_salt()),
        hash: Some(output),
    };
    Ok(phc.to_string())
}

/// Checks `password` against a stored hash of any [`HashScheme`].
fn check_with(memory: &mut Vec<Block>, stored: &str, password: &str) -> StoreResult<bool> {
    let damaged = |e: &dyn std::fmt::Display| StoreError::Internal(format!("stored password hash unreadable: {e}"));
    match HashScheme::of(stored) {
        Some(HashScheme::Argon2) => check_argon2(memory, stored, password),
        Some(scheme @ (HashScheme::Sha512Crypt | HashScheme::Sha256Crypt)) => {
            ShaCrypt::parse(&stored[3..], sha_crypt_len(scheme)).map_err(|e| damaged(&e))?.check(password, scheme)
        }
        // bcrypt uses the first 72 bytes of the password, as every
        // implementation the hashes come from did.
        Some(HashScheme::Bcrypt) => bcrypt::verify(password, stored).map_err(|e| damaged(&e)),
        Some(HashScheme::Yescrypt) => {
            use yescrypt::PasswordVerifier;
            match yescrypt::Yescrypt::default().verify_password(password.as_bytes(), stored) {
                Ok(()) => Ok(true),
                Err(yescrypt::password_hash::Error::PasswordInvalid) => Ok(false),
                Err(e) => Err(damaged(&e)),
            }
        }
        None => Err(damaged(&"unknown scheme")),
    }
}

fn check_argon2(memory: &mut Vec<Block>, phc: &str, password: &str) -> StoreResult<bool> {
    let parsed =
        PasswordHash::new(phc).map_err(|e| StoreError::Internal(format!("stored password hash unreadable: {e}")))?;
    let algorithm =
        Algorithm::try_from(parsed.algorithm).map_err(|e| StoreError::Internal(format!("stored hash: {e}")))?;
    let version = match parsed.version {
        Some(v) => Version::try_from(v).map_err(|e| StoreError::Internal(format!("stored hash: {e}")))?,
        None => Version::V0x13,
    };
    let params = Params::try_from(&parsed).map_err(|e| StoreError::Internal(format!("stored hash parameters: {e}")))?;
    let salt = parsed.salt.ok_or_else(|| StoreError::Internal("stored hash has no salt".into()))?;
    let mut salt_buf = [0u8; 64];
    let salt_raw = salt.decode_b64(&mut salt_buf).map_err(|e| StoreError::Internal(format!("stored salt: {e}")))?;
    let expected = parsed.hash.ok_or_else(|| StoreError::Internal("stored hash has no output".into()))?;
    let mut out = vec![0u8; expected.len()];
    run(memory, algorithm, version, params, password, salt_raw, &mut out)?;
    Ok(constant_time_eq(&out, expected.as_bytes()))
}

fn run(
    memory: &mut Vec<Block>,
    algorithm: Algorithm,
    version: Version,
    params: Params,
    password: &str,
    salt: &[u8],
    out: &mut [u8],
) -> StoreResult<()> {
    let blocks = params.block_count();
    if memory.len() < blocks {
        memory.resize(blocks, Block::default());
    }
    Argon2::new(algorithm, version, params)
        .hash_password_into_with_memory(password.as_bytes(), salt, out, &mut memory[..blocks])
        .map_err(|e| StoreError::Internal(format!("argon2: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use argon2::password_hash::PasswordHasher;
    use argon2::PasswordVerifier;

    #[tokio::test]
    async fn hash_then_check_and_interop_with_the_reference_verifier() {
        let p = Passwords::global();
        let phc = p.hash("correct horse").await.unwrap();
        assert_ne!(phc, p.hash("correct horse").await.unwrap(), "random salt");
        assert!(phc.starts_with("$argon2id$v=19$"), "{phc}");
        assert!(p.check(&phc, "correct horse").await.unwrap());
        assert!(!p.check(&phc, "wrong").await.unwrap());
        // The argon2 crate's own verifier accepts our strings...
        let parsed = PasswordHash::new(&phc).unwrap();
        assert!(Argon2::default().verify_password(b"correct horse", &parsed).is_ok());
        // ...and we accept the crate's.
        let theirs = Argon2::default().hash_password(b"pw2", &SaltString::generate(&mut OsRng)).unwrap().to_string();
        assert!(p.check_uncached(&theirs, "pw2").await.unwrap());
        assert!(!p.check_uncached(&theirs, "pw3").await.unwrap());
    }

    #[tokio::test]
    async fn cache_only_remembers_successes_for_the_same_stored_hash() {
        let p = Passwords::global();
        let old = p.hash("one").await.unwrap();
        assert!(p.check(&old, "one").await.unwrap());
        assert!(p.check(&old, "one").await.unwrap(), "cached success");
        assert!(!p.check(&old, "two").await.unwrap());
        // After a password change the stored hash differs: the old password
        // must not pass through the cache.
        let new = p.hash("two").await.unwrap();
        assert!(!p.check(&new, "one").await.unwrap());
        assert!(p.check(&new, "two").await.unwrap());
    }

    #[tokio::test]
    async fn damaged_hash_is_an_internal_error_not_a_false() {
        let p = Passwords::global();
        assert!(matches!(p.check("$argon2id$garbage", "x").await, Err(StoreError::Internal(_))));
        let dummy = p.dummy_hash().await.unwrap();
        assert!(!p.check_uncached(dummy, "").await.unwrap());
        assert_eq!(p.dummy_hash().await.unwrap(), dummy, "computed once");
    }

    /// Hashes made by glibc/libxcrypt crypt(3) (Python's `crypt` module),
    /// as in `/etc/shadow`: each checks with the right password only.
    const CRYPT_VECTORS: [(&str, HashScheme); 6] = [
        (
            "$6$saltsalt$hRM5XZ86KXEw9UOmjigeVqFgULtFB2sgpC9lXQDfMib3Zgw7mEiUvBJI2EplzfAqxL5Vvwp2scFtv/uamSo5z0",
            HashScheme::Sha512Crypt,
        ),
        (
            "$6$rounds=10000$saltsalt$EMCAJaVdD8QpgIn1w2Sq1C8/BIypyMaemdjCDgDu8NxiKn5cVOzQe8ZMNovWPPitzBG6NZOSXfpu45VIxD1OF0",
            HashScheme::Sha512Crypt,
        ),
        ("$5$saltsalt$myjXcpMpE2Ofk7fj9hqyNYSn6lmWG4Mqnjx.KIRRr4/", HashScheme::Sha256Crypt),
        ("$2b$05$abcdefghijklmnopqrstuuHNbAKRhpaujgo33bRWs.NLUTJO3lOy2", HashScheme::Bcrypt),
        // PHP and htpasswd write $2y$: the same algorithm.
        ("$2y$05$abcdefghijklmnopqrstuuHNbAKRhpaujgo33bRWs.NLUTJO3lOy2", HashScheme::Bcrypt),
        ("$y$j9T$F5Jx5fExrKuPp53xLKQ..1$zwtVrjrUCmXcyLTs6oxLTQlzifSUkF8RHJ./tK5KU79", HashScheme::Yescrypt),
    ];

    #[tokio::test]
    async fn crypt3_hashes_verify_with_their_password_only() {
        let p = Passwords::global();
        for (stored, scheme) in CRYPT_VECTORS {
            assert_eq!(validate_hash(stored).unwrap(), scheme, "{stored}");
            assert!(p.check_uncached(stored, "correct horse").await.unwrap(), "{stored}");
            assert!(!p.check_uncached(stored, "correct horsf").await.unwrap(), "{stored}");
            assert!(!p.check_uncached(stored, "").await.unwrap(), "{stored}");
        }
        let argon2 = p.hash("correct horse").await.unwrap();
        assert_eq!(validate_hash(&argon2).unwrap(), HashScheme::Argon2);
    }

    #[test]
    fn malformed_unknown_or_too_costly_hashes_are_refused_with_the_reason() {
        let refused = |s: &str| match validate_hash(s) {
            Err(StoreError::Permanent(why)) => why,
            other => panic!("{s}: {other:?}"),
        };
        assert!(refused("$1$saltsalt$abcdefghijklmnopqrstuv").contains("unsupported scheme '$1$s...'"));
        assert!(refused("plaintext").contains("no crypt(3) scheme prefix"));
        assert!(refused("$6$saltsalt$short").contains("86 characters"));
        assert!(refused("$6$rounds=5000000$salt$x").contains("rounds=5000000 above"));
        assert!(refused("$6$rounds=abc$salt$x").contains("rounds=abc"));
        assert!(
            refused("$5$saltsaltsaltsaltsalt$myjXcpMpE2Ofk7fj9hqyNYSn6lmWG4Mqnjx.KIRRr4/").contains("16 characters")
        );
        assert!(refused("$2b$31$abcdefghijklmnopqrstuuHNbAKRhpaujgo33bRWs.NLUTJO3lOy2").contains("cost 31"));
        assert!(refused("$2b$05$abcdefghijklmnopqrstuuHNbAKRhpaujgo33bRWs.NLUTJO3lOy").contains("53 characters"));
        assert!(
            refused("$argon2id$v=19$m=1048576,t=2,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA").contains("cost too high")
        );
        assert!(refused("$argon2id$garbage").contains("argon2"));
        assert!(refused("$y$jFT$F5Jx5fExrKuPp53xLKQ..1$zwtVrjrUCmXcyLTs6oxLTQlzifSUkF8RHJ./tK5KU79").contains("MiB"));
        assert!(refused("$y$j9T$F5Jx5fExrKuPp53xLKQ..1").contains("yescrypt"));
    }
}
