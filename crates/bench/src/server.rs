//! Starting, administering and stopping the `hamail` server under test.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

/// What the server announced on stdout before `hamail: ready.`.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Banner {
    pub smtp: Option<SocketAddr>,
    pub submission: Option<SocketAddr>,
    pub pop3: Option<SocketAddr>,
    pub admin_socket: Option<PathBuf>,
    pub ready: bool,
}

impl Banner {
    /// Takes one stdout line into account; returns true once the server
    /// said it is ready. Unknown lines are ignored.
    pub fn feed(&mut self, line: &str) -> bool {
        if let Some(rest) = line.trim_end().strip_prefix("hamail: ") {
            if let Some(v) = rest.strip_prefix("smtp listening on ") {
                self.smtp = first_addr(v);
            } else if let Some(v) = rest.strip_prefix("submission listening on ") {
                self.submission = first_addr(v);
            } else if let Some(v) = rest.strip_prefix("pop3 listening on ") {
                self.pop3 = first_addr(v);
            } else if let Some(v) = rest.strip_prefix("admin socket ") {
                self.admin_socket = Some(PathBuf::from(v.trim()));
            } else if rest.starts_with("ready") {
                self.ready = true;
            }
        }
        self.ready
    }
}

/// The first socket address of a space- or comma-separated list.
fn first_addr(list: &str) -> Option<SocketAddr> {
    list.split(|c: char| c.is_whitespace() || c == ',').filter(|s| !s.is_empty()).find_map(|s| s.parse().ok())
}

/// Runs `hamail --config FILE <admin command>`; works with the server
/// running (through its admin socket) or not.
#[derive(Clone, Debug)]
pub struct Admin {
    pub hamail: PathBuf,
    pub config: PathBuf,
}

impl Admin {
    pub async fn run(&self, args: &[&str], stdin: Option<&str>) -> Result<()> {
        let mut child = Command::new(&self.hamail)
            .arg("--config")
            .arg(&self.config)
            .args(args)
            .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("running {}", self.hamail.display()))?;
        if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
            pipe.write_all(text.as_bytes()).await?;
            drop(pipe);
        }
        let out = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
            .await
            .with_context(|| format!("hamail {} timed out", args.join(" ")))??;
        if !out.status.success() {
            bail!(
                "hamail {} failed ({}): {}{}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim(),
                String::from_utf8_lossy(&out.stdout).trim()
            );
        }
        Ok(())
    }

    /// Creates `users` with one password, `parallel` `user add` at a time
    /// (each one hashes the password with argon2, ~50 ms of CPU).
    pub async fn add_users(&self, users: &[String], password: &str, parallel: usize) -> Result<()> {
        let sem = Arc::new(Semaphore::new(parallel.max(1)));
        let mut set = JoinSet::new();
        for user in users {
            let (admin, user, sem) = (self.clone(), user.clone(), sem.clone());
            let line = format!("{password}\n");
            set.spawn(async move {
                let _permit = sem.acquire_owned().await?;
                admin.run(&["user", "add", &user], Some(&line)).await
            });
        }
        while let Some(done) = set.join_next().await {
            done??;
        }
        Ok(())
    }
}

/// The running server process.
pub struct Server {
    child: Child,
    pub pid: u32,
    pub smtp: SocketAddr,
    pub submission: Option<SocketAddr>,
    pub pop3: SocketAddr,
}

impl Server {
    /// Starts `hamail serve` and waits for its `ready` line. Its stderr (the
    /// log) goes to `log`.
    pub async fn start(admin: &Admin, log: &Path) -> Result<Server> {
        let log_file = std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let mut child = Command::new(&admin.hamail)
            .arg("--config")
            .arg(&admin.config)
            .arg("serve")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log_file))
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", admin.hamail.display()))?;
        let pid = child.id().context("the server exited at once")?;
        let stdout = child.stdout.take().context("no stdout pipe")?;
        let mut lines = BufReader::new(stdout).lines();
        let mut banner = Banner::default();
        let wait = async {
            while let Some(line) = lines.next_line().await? {
                if banner.feed(&line) {
                    return Ok(true);
                }
            }
            Ok::<bool, std::io::Error>(false)
        };
        let ready = tokio::time::timeout(Duration::from_secs(120), wait).await;
        match ready {
            Ok(Ok(true)) => {}
            Ok(Ok(false)) => bail!("the server exited before it was ready; see {}", log.display()),
            Ok(Err(e)) => bail!("reading the server's stdout: {e}"),
            Err(_) => bail!("the server was not ready after 120 s; see {}", log.display()),
        }
        // Keep draining stdout so that the server never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let smtp = banner.smtp.context("the server did not print its smtp address")?;
        let pop3 = banner.pop3.context("the server did not print its pop3 address")?;
        Ok(Server { child, pid, smtp, submission: banner.submission, pop3 })
    }

    /// SIGTERM, then SIGKILL if it has not exited after 15 s.
    pub async fn stop(mut self) -> Result<()> {
        if let Ok(Some(status)) = self.child.try_wait() {
            bail!("the server had already exited ({status})");
        }
        let _ = Command::new("kill").arg("-TERM").arg(self.pid.to_string()).status().await;
        match tokio::time::timeout(Duration::from_secs(15), self.child.wait()).await {
            Ok(status) => {
                let status = status?;
                if !status.success() {
                    eprintln!("hamail-bench: the server exited with {status}");
                }
            }
            Err(_) => {
                eprintln!("hamail-bench: the server ignored SIGTERM for 15 s; killing it");
                self.child.kill().await?;
            }
        }
        Ok(())
    }

    /// Whether the server process is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_startup_banner() {
        let out = "hamail: smtp listening on 127.0.0.1:41234\n\
                   hamail: submission listening on 127.0.0.1:41235 127.0.0.1:41236\n\
                   hamail: pop3s listening on 127.0.0.1:9995\n\
                   hamail: pop3 listening on 127.0.0.1:41237\n\
                   hamail: admin socket /tmp/x/data/admin.sock\n\
                   hamail: store in /tmp/x/data/store\n\
                   hamail: ready. In another terminal:\n";
        let mut b = Banner::default();
        let mut ready_at = None;
        for (i, line) in out.lines().enumerate() {
            if b.feed(line) && ready_at.is_none() {
                ready_at = Some(i);
            }
        }
        assert_eq!(ready_at, Some(6));
        assert_eq!(b.smtp, Some("127.0.0.1:41234".parse().unwrap()));
        assert_eq!(b.submission, Some("127.0.0.1:41235".parse().unwrap()));
        assert_eq!(b.pop3, Some("127.0.0.1:41237".parse().unwrap()));
        assert_eq!(b.admin_socket, Some(PathBuf::from("/tmp/x/data/admin.sock")));
    }

    #[test]
    fn banner_ignores_noise_and_bad_addresses() {
        let mut b = Banner::default();
        assert!(!b.feed("2026-01-01T00:00:00 INFO something"));
        assert!(!b.feed("hamail: smtp listening on nowhere"));
        assert_eq!(b.smtp, None);
        assert!(!b.feed("hamail: smtp listening on [::1]:25, 127.0.0.1:26\r"));
        assert_eq!(b.smtp, Some("[::1]:25".parse().unwrap()));
        assert!(b.feed("hamail: ready."));
    }
}
