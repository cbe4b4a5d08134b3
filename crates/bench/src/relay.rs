//! `hamail-bench relay`: outbound relay throughput to a local sink.
//!
//! Starts Postfix's `smtp-sink` on loopback (it answers 250 to everything
//! and keeps nothing), a `hamail serve` with fsync on whose `[relay]`
//! transport map sends `sink.test` there, and for each message size
//! submits `--messages` messages (one recipient each, `--concurrency`
//! authenticated submission sessions reusing their connection) and waits
//! until the queue is empty. Relay throughput is messages / (time from the
//! first submission to the empty queue): acceptance (body and metadata
//! fsynced), the worker's scan, the SMTP session to the sink and the
//! fsynced record of each result are all inside it.
//!
//! With `--peer-smtp ADDR`, the same load goes to a Postfix that relays
//! `sink.test` to the same sink (`postconf -e
//! 'transport_maps = inline:{sink.test=smtp:[127.0.0.1]:PORT}'`; see
//! README.md), timed until its queue directory is empty, in the same run.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use tokio::net::TcpStream;

use crate::server::{Admin, Server};
use crate::smtp::SENDER;

#[derive(clap::Args, Debug)]
pub struct RelayArgs {
    /// The hamail binary [default: next to this one].
    #[arg(long)]
    hamail: Option<PathBuf>,
    /// Postfix's smtp-sink.
    #[arg(long, default_value = "/usr/sbin/smtp-sink")]
    smtp_sink: PathBuf,
    /// The sink's port on 127.0.0.1 (a Postfix peer's transport map names it).
    #[arg(long, default_value_t = 2526)]
    sink_port: u16,
    /// Message sizes (payload bytes).
    #[arg(long, value_delimiter = ',', value_parser = crate::parse_size, default_value = "1k,100k")]
    sizes: Vec<usize>,
    /// Messages per cell.
    #[arg(long, default_value_t = 2000)]
    messages: usize,
    /// Submitting sessions.
    #[arg(long, default_value_t = 4)]
    concurrency: usize,
    /// Sessions from hamail to the sink ([relay] max_per_destination;
    /// Postfix's default destination concurrency is 20).
    #[arg(long, default_value_t = 10)]
    relay_sessions: usize,
    /// A Postfix that relays sink.test to the sink (e.g. 127.0.0.1:2625).
    #[arg(long)]
    peer_smtp: Option<SocketAddr>,
    /// Postfix's queue directory (watched until it is empty).
    #[arg(long, default_value = "/var/spool/postfix")]
    peer_postfix_queue: PathBuf,
    /// Also measure each server draining a full queue: the messages are
    /// queued with delivery off (hamail: `[relay] enabled = false`, then a
    /// restart with it on; Postfix: `defer_transports = smtp`, then
    /// `postqueue -f`), and only the delivery is timed.
    #[arg(long)]
    drain: bool,
    /// Where hamail's data directory goes (a disk, not tmpfs: fsync counts).
    #[arg(long, default_value = "hamail-bench-relay")]
    dir: PathBuf,
}

const PASSWORD: &str = "benchpass";

pub async fn run(args: RelayArgs) -> Result<()> {
    if args.messages == 0 || args.concurrency == 0 {
        bail!("--messages and --concurrency must be at least 1");
    }
    let hamail = crate::find_hamail(args.hamail.clone())?;
    let sink_addr: SocketAddr = ([127, 0, 0, 1], args.sink_port).into();
    let mut sink = tokio::process::Command::new(&args.smtp_sink);
    // As root, smtp-sink wants a user to switch to after binding.
    if std::os::unix::fs::MetadataExt::uid(&std::fs::metadata("/proc/self")?) == 0 {
        sink.args(["-u", "postfix"]);
    }
    let mut sink = sink
        .arg(sink_addr.to_string())
        .arg("1000")
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {} (apt-get install postfix)", args.smtp_sink.display()))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(sink_addr).await.is_err() {
        if Instant::now() > deadline {
            bail!("smtp-sink is not listening on {sink_addr}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let _ = std::fs::remove_dir_all(&args.dir);
    std::fs::create_dir_all(&args.dir)?;
    let dir = std::fs::canonicalize(&args.dir)?;
    let config = dir.join("hamail.toml");
    let write_config = |enabled: bool| {
        std::fs::write(
            &config,
            format!(
                "[server]\nhostname = \"mx.bench.test\"\ndata_dir = {}\n\n\
                 [smtp]\nlisten = [\"127.0.0.1:0\"]\nsubmission = [\"127.0.0.1:0\"]\n\n[pop3]\nlisten = [\"127.0.0.1:0\"]\n\n\
                 [relay]\nenabled = {enabled}\ntransport = {{ \"sink.test\" = \"{sink_addr}\" }}\ntls = \"never\"\nscan_interval_ms = 200\n\
                 max_per_destination = {}\nmax_connections = {}\n",
                crate::toml_str(&dir.join("data").to_string_lossy()),
                args.relay_sessions,
                args.relay_sessions
            ),
        )
    };
    write_config(true)?;
    let admin = Admin { hamail, config: config.clone() };
    let mut server = Server::start(&admin, &dir.join("hamail.log")).await?;
    admin.run(&["domain", "add", "bench.test"], None).await?;
    admin.run(&["user", "add", SENDER], Some(&format!("{PASSWORD}\n"))).await?;
    let mut submission = server.submission.context("the server did not print its submission address")?;

    let mut rows = Vec::new();
    for &size in &args.sizes {
        let t0 = Instant::now();
        let accepted = load(submission, true, size, args.messages, args.concurrency).await?;
        let accept_s = t0.elapsed().as_secs_f64();
        wait_hamail_queue_empty(&admin, Duration::from_secs(600)).await?;
        let total = t0.elapsed().as_secs_f64();
        let h = accepted as f64 / total;
        crate::log(format!(
            "relay hamail size={size} messages={accepted} accept_s={accept_s:.2} total_s={total:.2} relayed_msgs_per_s={h:.0}"
        ));
        let mut row = format!("| relay {} | {h:.0}", human(size));
        if let Some(peer) = args.peer_smtp {
            let t0 = Instant::now();
            let accepted = load(peer, false, size, args.messages, args.concurrency).await?;
            let accept_s = t0.elapsed().as_secs_f64();
            wait_postfix_queue_empty(&args.peer_postfix_queue, Duration::from_secs(600)).await?;
            let total = t0.elapsed().as_secs_f64();
            let p = accepted as f64 / total;
            crate::log(format!(
                "relay postfix size={size} messages={accepted} accept_s={accept_s:.2} total_s={total:.2} relayed_msgs_per_s={p:.0}"
            ));
            row.push_str(&format!(" | {p:.0} | {:.2}", h / p));
        } else {
            row.push_str(" | - | -");
        }
        rows.push(row + " |");
        if !args.drain {
            continue;
        }
        // Drain: queue with delivery off, then time delivery alone.
        server.stop().await?;
        write_config(false)?;
        server = Server::start(&admin, &dir.join("hamail.log")).await?;
        submission = server.submission.context("no submission address")?;
        let queued = load(submission, true, size, args.messages, args.concurrency).await?;
        server.stop().await?;
        write_config(true)?;
        server = Server::start(&admin, &dir.join("hamail.log")).await?;
        submission = server.submission.context("no submission address")?;
        let t0 = Instant::now();
        wait_hamail_queue_empty(&admin, Duration::from_secs(600)).await?;
        let drain_s = t0.elapsed().as_secs_f64();
        let h = queued as f64 / drain_s;
        crate::log(format!("drain hamail size={size} messages={queued} drain_s={drain_s:.2} msgs_per_s={h:.0}"));
        let mut row = format!("| drain {} | {h:.0}", human(size));
        if let Some(peer) = args.peer_smtp {
            postconf("defer_transports=smtp").await?;
            let queued = load(peer, false, size, args.messages, args.concurrency).await;
            let ready = async {
                let queued = queued?;
                let end = Instant::now() + Duration::from_secs(600);
                while crate::peer::postfix_queues_count(&args.peer_postfix_queue, &["deferred"]) < queued {
                    if Instant::now() > end {
                        bail!("Postfix did not defer every message");
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Ok(queued)
            }
            .await;
            postconf("defer_transports=").await?;
            let queued = ready?;
            let t0 = Instant::now();
            let flush = tokio::process::Command::new("postqueue").arg("-f").status().await?;
            if !flush.success() {
                bail!("postqueue -f failed");
            }
            wait_postfix_queue_empty(&args.peer_postfix_queue, Duration::from_secs(600)).await?;
            let drain_s = t0.elapsed().as_secs_f64();
            let p = queued as f64 / drain_s;
            crate::log(format!("drain postfix size={size} messages={queued} drain_s={drain_s:.2} msgs_per_s={p:.0}"));
            row.push_str(&format!(" | {p:.0} | {:.2}", h / p));
        } else {
            row.push_str(" | - | -");
        }
        rows.push(row + " |");
    }
    println!("| cell | hamail msgs/s | Postfix msgs/s | ratio |");
    println!("|---|---|---|---|");
    for r in rows {
        println!("{r}");
    }
    server.stop().await?;
    let _ = sink.kill().await;
    Ok(())
}

/// `postconf -e SETTING` and `postfix reload`.
async fn postconf(setting: &str) -> Result<()> {
    let st = tokio::process::Command::new("postconf").args(["-e", setting]).status().await?;
    let reload = tokio::process::Command::new("postfix").arg("reload").output().await?;
    if !st.success() || !reload.status.success() {
        bail!("postconf -e {setting} / postfix reload failed");
    }
    // The reload is asynchronous; give the master a moment to re-read.
    tokio::time::sleep(Duration::from_millis(500)).await;
    Ok(())
}

fn human(size: usize) -> String {
    if size.is_multiple_of(1024) {
        format!("{} KiB", size / 1024)
    } else {
        format!("{size} B")
    }
}

/// Sends `messages` of `size` to `rcptN@sink.test` over `conc` sessions
/// (each reusing its connection), with the plain bench's SMTP client.
async fn load(addr: SocketAddr, auth: bool, size: usize, messages: usize, conc: usize) -> Result<usize> {
    let body = std::sync::Arc::new(crate::smtp::data_encode(&crate::smtp::payload(size)));
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..conc {
        let (body, next) = (body.clone(), next.clone());
        set.spawn(async move {
            let mut client = crate::smtp::Client::connect(addr).await?;
            if auth {
                client.auth_plain(SENDER, PASSWORD).await?;
            }
            let mut sent = 0usize;
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= messages {
                    break;
                }
                let rcpt = format!("rcpt{}@sink.test", i % 1000);
                client.send(&rcpt, &crate::smtp::header(&rcpt, &format!("relay-{i}"), size), &body).await?;
                sent += 1;
            }
            client.quit().await;
            Ok::<usize, anyhow::Error>(sent)
        });
    }
    let mut total = 0;
    while let Some(done) = set.join_next().await {
        total += done??;
    }
    Ok(total)
}

async fn wait_hamail_queue_empty(admin: &Admin, within: Duration) -> Result<()> {
    let end = Instant::now() + within;
    loop {
        let out = tokio::process::Command::new(&admin.hamail)
            .arg("--config")
            .arg(&admin.config)
            .args(["queue", "list", "--json"])
            .output()
            .await?;
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("queue list --json")?;
        if v.as_array().is_some_and(|a| a.is_empty()) {
            return Ok(());
        }
        if Instant::now() > end {
            bail!("hamail's queue did not empty");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn wait_postfix_queue_empty(queue: &std::path::Path, within: Duration) -> Result<()> {
    let end = Instant::now() + within;
    loop {
        let n = crate::peer::postfix_queue_count(queue);
        if n == 0 {
            return Ok(());
        }
        if Instant::now() > end {
            bail!("Postfix's queue did not empty ({n} left): is sink.test routed to the sink?");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
