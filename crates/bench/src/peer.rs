//! The peer servers measured side by side with hamail: Postfix (SMTP) and
//! Dovecot (POP3) as installed by `../shared/peers/install.sh`. This module
//! only knows where their master pid files, queue and maildirs are; the load
//! itself comes from the same clients as for hamail (smtp.rs, pop3.rs).

use std::net::SocketAddr;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};

use crate::procfs;

/// Where the peers are and how to reach their users.
#[derive(Debug, Clone)]
pub struct Peers {
    pub smtp: Option<SocketAddr>,
    pub pop3: Option<SocketAddr>,
    /// user0000@domain .. : the SMTP recipients and POP3 logins.
    pub users: Vec<String>,
    pub password: String,
    /// `<root>/userNNNN/Maildir/{new,cur,tmp}`.
    pub maildir_root: Option<PathBuf>,
    pub postfix_pidfile: PathBuf,
    pub postfix_queue: PathBuf,
    pub dovecot_pidfile: PathBuf,
    pub dovecot_conf: PathBuf,
    /// Reload the daemon before each cell so that idle children of the
    /// previous cell exit (bench.py does the same).
    pub reload: bool,
}

/// A pid file's pid (postfix pads it with spaces).
pub fn read_pid(path: &Path) -> Result<u32> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let pid: u32 = text.trim().parse().with_context(|| format!("bad pid in {}", path.display()))?;
    if !Path::new(&format!("/proc/{pid}")).exists() {
        bail!("{} names pid {pid}, which is not running", path.display());
    }
    Ok(pid)
}

/// Messages in a postfix queue directory (maildrop, incoming, active,
/// deferred, hold).
pub fn postfix_queue_count(queue: &Path) -> usize {
    postfix_queues_count(queue, &["maildrop", "incoming", "active", "deferred", "hold"])
}

/// Messages in these queues of a postfix queue directory.
pub fn postfix_queues_count(queue: &Path, names: &[&str]) -> usize {
    fn walk(dir: &Path) -> usize {
        let Ok(rd) = std::fs::read_dir(dir) else { return 0 };
        rd.flatten()
            .map(|e| match e.file_type() {
                Ok(t) if t.is_dir() => walk(&e.path()),
                Ok(_) => 1,
                Err(_) => 0,
            })
            .sum()
    }
    names.iter().map(|q| walk(&queue.join(q))).sum()
}

impl Peers {
    pub fn postfix_pid(&self) -> Result<u32> {
        read_pid(&self.postfix_pidfile)
            .context("finding the postfix master (is postfix running? ../shared/peers/services.sh status)")
    }

    pub fn dovecot_pid(&self) -> Result<u32> {
        read_pid(&self.dovecot_pidfile)
            .context("finding the dovecot master (is dovecot running? ../shared/peers/services.sh status)")
    }

    /// Messages in the postfix queue (maildrop, incoming, active, deferred, hold).
    pub fn queue_count(&self) -> usize {
        postfix_queue_count(&self.postfix_queue)
    }

    /// Waits until the postfix queue is empty; false after `timeout`.
    pub async fn wait_queue_empty(&self, timeout: Duration) -> bool {
        let end = Instant::now() + timeout;
        loop {
            let this = self.clone();
            let n = tokio::task::spawn_blocking(move || this.queue_count()).await.unwrap_or(1);
            if n == 0 {
                return true;
            }
            if Instant::now() >= end {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The maildirs of every `user*` under the root.
    fn maildirs(&self) -> Result<Vec<PathBuf>> {
        let root = self.maildir_root.as_ref().context("--peer-maildir-root is needed")?;
        let mut out: Vec<PathBuf> = std::fs::read_dir(root)
            .with_context(|| format!("reading {}", root.display()))?
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("user"))
            .map(|e| e.path().join("Maildir"))
            .collect();
        out.sort();
        Ok(out)
    }

    /// Deletes every message of every maildir; `full` also deletes
    /// Dovecot's index and uidlist files (as bench.py populate does).
    pub fn wipe(&self, full: bool) -> Result<u64> {
        let mut n = 0;
        for md in self.maildirs()? {
            for sub in ["new", "cur", "tmp"] {
                if let Ok(rd) = std::fs::read_dir(md.join(sub)) {
                    for e in rd.flatten() {
                        if std::fs::remove_file(e.path()).is_ok() {
                            n += 1;
                        }
                    }
                }
            }
            if full {
                if let Ok(rd) = std::fs::read_dir(&md) {
                    for e in rd.flatten() {
                        if e.file_name().to_string_lossy().starts_with("dovecot")
                            && e.file_type().is_ok_and(|t| t.is_file())
                        {
                            let _ = std::fs::remove_file(e.path());
                        }
                    }
                }
            }
        }
        Ok(n)
    }

    /// (messages, bytes) in new/ and cur/ of every maildir.
    pub fn count(&self) -> Result<(u64, u64)> {
        let (mut n, mut bytes) = (0, 0);
        for md in self.maildirs()? {
            for sub in ["new", "cur"] {
                if let Ok(rd) = std::fs::read_dir(md.join(sub)) {
                    for e in rd.flatten() {
                        n += 1;
                        bytes += e.metadata().map(|m| m.len()).unwrap_or(0);
                    }
                }
            }
        }
        Ok((n, bytes))
    }

    /// Writes `per_user` messages with a `size`-byte body straight into
    /// Maildir/new of each peer user (owned like the maildir), as bench.py
    /// populate does; used when no --peer-smtp is given.
    pub fn populate_files(&self, per_user: usize, size: usize) -> Result<()> {
        use std::io::Write as _;
        let root =
            self.maildir_root.as_ref().context("--peer-maildir-root is needed to populate the POP3 mailboxes")?;
        let body = crate::smtp::payload(size);
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        let mut q = 0u64;
        for user in &self.users {
            let local = user.split('@').next().unwrap_or(user);
            let md = root.join(local).join("Maildir");
            let meta = std::fs::metadata(&md).with_context(|| format!("{} (is {user} a peer user?)", md.display()))?;
            for j in 0..per_user {
                q += 1;
                let head = format!(
                    "Return-Path: <{}>\r\nDelivered-To: {user}\r\n{}",
                    crate::smtp::SENDER,
                    String::from_utf8_lossy(&crate::smtp::header(user, &format!("pop3.{q}"), size))
                );
                let path = md.join("new").join(format!("{now}.M{j:06}P{}Q{q}.hamail-bench", std::process::id()));
                let mut f = std::fs::OpenOptions::new().write(true).create_new(true).open(&path)?;
                // Maildir files hold LF line ends.
                let text: Vec<u8> = [head.as_bytes(), &body].concat().into_iter().filter(|&b| b != b'\r').collect();
                f.write_all(&text)?;
                std::os::unix::fs::chown(&path, Some(meta.uid()), Some(meta.gid()))?;
            }
        }
        // bench.py: os.sync()
        let _ = std::process::Command::new("sync").status();
        Ok(())
    }

    /// `postfix reload` / `dovecot reload`, then waits (at most 10 s) until
    /// the idle children of the previous cell have exited.
    pub async fn reload(&self, which: Daemon) -> Result<()> {
        if !self.reload {
            return Ok(());
        }
        let (status, root, base) = match which {
            Daemon::Postfix => {
                let st = tokio::process::Command::new("postfix").arg("reload").output().await;
                // master qmgr pickup postlogd (+ anvil/tlsmgr)
                (st, self.postfix_pid()?, 6)
            }
            Daemon::Dovecot => {
                let st = tokio::process::Command::new("dovecot")
                    .arg("-c")
                    .arg(&self.dovecot_conf)
                    .arg("reload")
                    .output()
                    .await;
                // master anvil log config stats auth (+ login/pop3 ending)
                (st, self.dovecot_pid()?, 8)
            }
        };
        match status {
            Ok(o) if o.status.success() => {}
            Ok(o) => crate::log(format!("{which:?} reload failed: {}", String::from_utf8_lossy(&o.stderr).trim())),
            Err(e) => crate::log(format!("{which:?} reload: {e}")),
        }
        let end = Instant::now() + Duration::from_secs(10);
        while Instant::now() < end {
            tokio::time::sleep(Duration::from_millis(500)).await;
            if procfs::tree_size(root) <= base {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        Ok(())
    }
}

#[derive(Debug, Clone, Copy)]
pub enum Daemon {
    Postfix,
    Dovecot,
}
