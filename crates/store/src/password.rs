//! Password hashing and checking: argon2id, on a small fixed pool of
//! threads that each own one reusable argon2 memory block, plus a cache of
//! recent successful logins.
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

fn check_with(memory: &mut Vec<Block>, phc: &str, password: &str) -> StoreResult<bool> {
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
    // Constant time: no early exit on the first differing byte.
    let diff = out.iter().zip(expected.as_bytes()).fold(0u8, |acc, (a, b)| acc | (a ^ b));
    Ok(diff == 0 && out.len() == expected.len())
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
}
