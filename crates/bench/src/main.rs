//! `hamail-bench`: throughput and memory benchmark of a `hamail` server,
//! measured the same way as the Postfix / Dovecot baseline in
//! `../shared/peers` (bench.py, smtp-source, pop3load.py) so that the
//! ratios it prints are fair.
//!
//! It starts its own server (`hamail serve`) with a fresh data directory on
//! the disk under the current directory (fsync cost matters, so not tmpfs),
//! creates the domain `bench.test` and `--users` users, then measures:
//!
//! * **SMTP acceptance**: for every message size (`--sizes`, payload bytes
//!   like smtp-source `-l`) and concurrency (`--concurrency`), that many
//!   sessions send for `--seconds`: greeting, EHLO, MAIL, RCPT (one
//!   recipient, round-robin over the users), DATA, payload, QUIT; one
//!   connection per message like smtp-source, or many with RSET with
//!   `--reuse` (smtp-source `-d`). Lock-step, no pipelining. Only messages
//!   answered 250 (i.e. fsynced by the server) count. The mailboxes are
//!   emptied (POP3 DELE) between cells, as bench.py empties the maildirs.
//! * **POP3 retrieval**: `--users` mailboxes with `--pop3-msgs` 1 KiB
//!   messages each; after one unmeasured warm-up pass, C clients
//!   (`--pop3-concurrency`) each own distinct users and loop USER/PASS,
//!   LIST, RETR every message, QUIT (no DELE) for `--seconds`.
//! * **Server memory and CPU** per cell: VmRSS sampled from /proc every
//!   `--sample-ms` (and VmHWM, reset at the start of each cell), PSS, and
//!   the server's CPU time.
//!
//! Each cell prints one `key=value` line (msgs_per_s, mb_per_s with MB =
//! 10^6 bytes, peak_rss_mb, errors, and the reference figure and ratio where
//! the peers have one), and a table follows at the end.
//!
//! With `--peer-smtp` / `--peer-pop3` (the Postfix / Dovecot of
//! `../shared/peers`), every cell also runs against the peer with the same
//! client, back to back, in alternating order; Postfix cells wait for its
//! queue to drain and count the maildir files (delivered msgs/s, landed=N),
//! and the peers' memory is the PSS summed over their process trees. See
//! README.md and `peer.rs`.
//!
//! `hamail-bench cluster` (module `cluster`) instead forms a local cluster
//! of `hamail` processes and measures the election time after a SIGKILL of
//! the leader and the commit latency / throughput of control-plane writes.
//!
//! `hamail-bench replicated` (module `replicated`) measures SMTP acceptance
//! of a single node and of a cluster of data nodes in the same run, cell by
//! cell, and prints the ratio.
//!
//! Run it from the workspace root:
//!
//! ```sh
//! cargo build --release -p hamail -p hamail-bench
//! cargo run --release -p hamail-bench -- --seconds 10
//! cargo run --release -p hamail-bench -- --sizes 1k --concurrency 10 --reuse --no-pop3
//! ```

mod cgroup;
mod cluster;
mod peer;
mod pop3;
mod procfs;
mod relay;
mod replicated;
mod report;
mod server;
mod smtp;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _, Result};
use clap::Parser;

use peer::{Daemon, Peers};
use report::{Cell, Compare, Pair};
use server::{Admin, Server};

const DOMAIN: &str = "bench.test";
const PASSWORD: &str = "benchpass";

#[derive(Parser, Debug)]
#[command(
    name = "hamail-bench",
    about = "SMTP acceptance and POP3 retrieval benchmark of a hamail server",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    /// `cluster`: election time and control-plane writes of a local cluster
    /// (see `hamail-bench cluster --help`). Without it: the SMTP / POP3 load.
    #[command(subcommand)]
    command: Option<Sub>,
    /// The hamail binary [default: `hamail` next to this executable].
    #[arg(long)]
    hamail: Option<PathBuf>,
    /// Directory in which the temporary server directory is made (keep it on
    /// a real disk: fsync cost is part of the measurement) [default: .].
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Keep the server's directory (config, data, log) at the end.
    #[arg(long)]
    keep: bool,
    /// SMTP message payload sizes in bytes; k / m suffixes mean KiB / MiB.
    #[arg(long, value_delimiter = ',', value_parser = parse_size, default_value = "1k,100k,1m")]
    sizes: Vec<usize>,
    /// SMTP concurrent sessions.
    #[arg(long, value_delimiter = ',', default_value = "1,10,50")]
    concurrency: Vec<usize>,
    /// Duration of each cell, seconds.
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// Send many messages per SMTP connection (RSET between them), like
    /// smtp-source -d.
    #[arg(long)]
    reuse: bool,
    /// Users to create: the SMTP recipients and the POP3 mailboxes.
    #[arg(long, default_value_t = 100)]
    users: usize,
    /// POP3 concurrent clients.
    #[arg(long, value_delimiter = ',', default_value = "1,10")]
    pop3_concurrency: Vec<usize>,
    /// Messages per POP3 mailbox (the Dovecot figure used 20).
    #[arg(long, default_value_t = 20)]
    pop3_msgs: usize,
    /// Size of the POP3 test messages (payload bytes).
    #[arg(long, value_parser = parse_size, default_value = "1k")]
    pop3_size: usize,
    /// Skip the SMTP matrix.
    #[arg(long)]
    no_smtp: bool,
    /// Skip the POP3 test.
    #[arg(long)]
    no_pop3: bool,
    /// Do not empty the mailboxes between SMTP cells.
    #[arg(long)]
    no_purge: bool,
    /// Memory sampling interval, milliseconds.
    #[arg(long, default_value_t = 100)]
    sample_ms: u64,
    /// `hamail user add` run in parallel while creating users.
    #[arg(long, default_value_t = 4)]
    admin_parallel: usize,
    /// Peer SMTP server (Postfix, ../shared/peers) measured in the same run
    /// with the same client, e.g. 127.0.0.1:2625.
    #[arg(long)]
    peer_smtp: Option<SocketAddr>,
    /// Peer POP3 server (Dovecot), e.g. 127.0.0.1:1110.
    #[arg(long)]
    peer_pop3: Option<SocketAddr>,
    /// Domain of the peers' users user0000@DOMAIN ...
    #[arg(long, default_value = DOMAIN)]
    peer_domain: String,
    /// POP3 password of the peers' users.
    #[arg(long, default_value = PASSWORD)]
    peer_pass: String,
    /// Peer users to use [default: --users].
    #[arg(long)]
    peer_users: Option<usize>,
    /// Root of the peers' maildirs (<root>/userNNNN/Maildir): emptied between
    /// cells and counted after each Postfix cell [default: /var/mail/vhosts/DOMAIN].
    #[arg(long)]
    peer_maildir_root: Option<PathBuf>,
    /// Postfix master pid file (its process tree is measured).
    #[arg(long, default_value = "/var/spool/postfix/pid/master.pid")]
    peer_postfix_pidfile: PathBuf,
    /// Postfix queue directory (watched until it is empty).
    #[arg(long, default_value = "/var/spool/postfix")]
    peer_postfix_queue: PathBuf,
    /// Dovecot master pid file (its process tree is measured).
    #[arg(long, default_value = "/run/dovecot-bench/master.pid")]
    peer_dovecot_pidfile: PathBuf,
    /// Dovecot config of the bench instance (for `dovecot -c CONF reload`).
    #[arg(long, default_value = "/etc/dovecot/bench-pop3.conf")]
    peer_dovecot_conf: PathBuf,
    /// Do not reload the peer daemons before each cell (by default they are
    /// reloaded so that idle children of the previous cell exit, as bench.py does).
    #[arg(long)]
    peer_no_reload: bool,
}

#[derive(clap::Subcommand, Debug)]
enum Sub {
    /// Forms a cluster of real hamail processes on loopback and measures the
    /// election time after a SIGKILL of the leader, and the commit latency
    /// and throughput of small control-plane writes (domain_add).
    Cluster(cluster::ClusterArgs),
    /// SMTP acceptance of a single node and of a cluster of data nodes
    /// (bodies replicated and fsynced on every data node, metadata through
    /// Raft), cell by cell in one run, as a ratio.
    Replicated(replicated::ReplicatedArgs),
    /// Outbound relay throughput to a local smtp-sink (and, with
    /// --peer-smtp, Postfix relaying to the same sink).
    Relay(relay::RelayArgs),
}

impl Cli {
    fn peers(&self) -> Option<Peers> {
        if self.peer_smtp.is_none() && self.peer_pop3.is_none() {
            return None;
        }
        let n = self.peer_users.unwrap_or(self.users);
        Some(Peers {
            smtp: self.peer_smtp,
            pop3: self.peer_pop3,
            users: (0..n).map(|i| format!("user{i:04}@{}", self.peer_domain)).collect(),
            password: self.peer_pass.clone(),
            maildir_root: Some(
                self.peer_maildir_root
                    .clone()
                    .unwrap_or_else(|| PathBuf::from(format!("/var/mail/vhosts/{}", self.peer_domain))),
            ),
            postfix_pidfile: self.peer_postfix_pidfile.clone(),
            postfix_queue: self.peer_postfix_queue.clone(),
            dovecot_pidfile: self.peer_dovecot_pidfile.clone(),
            dovecot_conf: self.peer_dovecot_conf.clone(),
            reload: !self.peer_no_reload,
        })
    }
}

/// "1024", "1k", "100K", "1m", "1MiB".
fn parse_size(s: &str) -> Result<usize, String> {
    let t = s.trim().to_ascii_lowercase();
    let t = t.strip_suffix("ib").or_else(|| t.strip_suffix('b')).unwrap_or(&t);
    let (num, mult) = match t.char_indices().last() {
        Some((i, 'k')) => (&t[..i], 1024),
        Some((i, 'm')) => (&t[..i], 1024 * 1024),
        _ => (t, 1),
    };
    let n: usize = num.trim().parse().map_err(|_| format!("not a size: {s}"))?;
    let size = n.checked_mul(mult).ok_or_else(|| format!("too large: {s}"))?;
    if size < 16 {
        return Err(format!("sizes below 16 bytes are not supported: {s}"));
    }
    Ok(size)
}

fn main() {
    let mut cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("hamail-bench: cannot start the runtime: {e}");
            std::process::exit(2);
        }
    };
    let result = match cli.command.take() {
        Some(Sub::Cluster(args)) => runtime.block_on(cluster::run(args)),
        Some(Sub::Replicated(args)) => runtime.block_on(replicated::run(args)),
        Some(Sub::Relay(args)) => runtime.block_on(relay::run(args)),
        None => runtime.block_on(run(cli)),
    };
    if let Err(e) = result {
        eprintln!("hamail-bench: {e:#}");
        std::process::exit(1);
    }
}

pub(crate) fn log(msg: impl std::fmt::Display) {
    eprintln!("hamail-bench: {msg}");
}

fn find_hamail(given: Option<PathBuf>) -> Result<PathBuf> {
    let path = match given {
        Some(p) => p,
        None => std::env::current_exe()
            .context("locating this executable")?
            .parent()
            .context("this executable has no directory")?
            .join("hamail"),
    };
    if !path.is_file() {
        bail!("{} not found: build it with `cargo build --release -p hamail` or pass --hamail", path.display());
    }
    Ok(path)
}

/// A TOML basic string.
fn toml_str(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn config_text(data_dir: &Path, admin_socket: Option<&Path>, max_connections: usize) -> String {
    let mut cfg = format!(
        "[server]\nhostname = \"mx.bench.test\"\ndata_dir = {}\nauth_failure_delay_ms = 1000\n\n\
         [smtp]\nlisten = [\"127.0.0.1:0\"]\nsubmission = [\"127.0.0.1:0\"]\nmax_recipients = 1000\nmax_connections = {max_connections}\n\n\
         [pop3]\nlisten = [\"127.0.0.1:0\"]\nmax_connections = {max_connections}\n",
        toml_str(&data_dir.to_string_lossy())
    );
    if let Some(sock) = admin_socket {
        cfg.push_str(&format!("\n[admin]\nsocket = {}\n", toml_str(&sock.to_string_lossy())));
    }
    cfg
}

async fn run(cli: Cli) -> Result<()> {
    if cli.seconds <= 0.0 || !cli.seconds.is_finite() {
        bail!("--seconds must be positive");
    }
    if cli.users == 0 || cli.concurrency.contains(&0) || cli.pop3_concurrency.contains(&0) {
        bail!("--users and the concurrencies must be at least 1");
    }
    if !cli.no_pop3 {
        if let Some(&c) = cli.pop3_concurrency.iter().max().filter(|&&c| c > cli.users) {
            bail!("--pop3-concurrency {c} needs at least as many --users");
        }
    }
    let peers = cli.peers();
    if let Some(p) = &peers {
        if p.users.is_empty() {
            bail!("--peer-users must be at least 1");
        }
        if p.pop3.is_some() && !cli.no_pop3 {
            if let Some(&c) = cli.pop3_concurrency.iter().max().filter(|&&c| c > p.users.len()) {
                bail!("--pop3-concurrency {c} needs at least as many --peer-users");
            }
        }
        // Fail early, before the long setup, when a peer is not there.
        if p.smtp.is_some() && !cli.no_smtp {
            p.postfix_pid()?;
        }
        if p.pop3.is_some() && !cli.no_pop3 {
            p.dovecot_pid()?;
        }
        log(format!(
            "peers: smtp {} pop3 {}, {} users, maildirs {}",
            p.smtp.map_or("-".to_string(), |a| a.to_string()),
            p.pop3.map_or("-".to_string(), |a| a.to_string()),
            p.users.len(),
            p.maildir_root.as_ref().map_or("-".to_string(), |d| d.display().to_string())
        ));
    }
    let hamail = find_hamail(cli.hamail.clone())?;
    if hamail.components().any(|c| c.as_os_str() == "debug") {
        log(format!("warning: {} looks like a debug build", hamail.display()));
    }

    // The server's directory: config, data, log.
    let base = match &cli.data_dir {
        Some(d) => d.clone(),
        None => std::env::current_dir()?,
    };
    std::fs::create_dir_all(&base).with_context(|| format!("creating {}", base.display()))?;
    let base = base.canonicalize()?;
    let stamp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let dir = base.join(format!("hamail-bench-{}-{stamp}", std::process::id()));
    std::fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let data = dir.join("data");
    // Unix socket paths are limited to ~108 bytes.
    let admin_socket = (data.join("admin.sock").as_os_str().len() > 100)
        .then(|| std::env::temp_dir().join(format!("hamail-bench-{}.sock", std::process::id())));
    let max_conn = 500.max(2 * cli.concurrency.iter().chain(&cli.pop3_concurrency).copied().max().unwrap_or(1));
    let config = dir.join("hamail.toml");
    std::fs::write(&config, config_text(&data, admin_socket.as_deref(), max_conn))?;
    let log_path = dir.join("server.log");
    log(format!("server directory {} (binary {})", dir.display(), hamail.display()));

    let admin = Admin { hamail, config };
    let outcome = match Server::start(&admin, &log_path).await {
        Ok(mut server) => {
            let result = tokio::select! {
                r = bench(&cli, peers.as_ref(), &admin, &mut server) => r,
                _ = tokio::signal::ctrl_c() => Err(anyhow!("interrupted")),
            };
            let stopped = server.stop().await;
            result.and_then(|cells| stopped.map(|()| cells))
        }
        Err(e) => Err(e),
    };
    if outcome.is_err() {
        print_log_tail(&log_path);
    }
    if cli.keep {
        log(format!("kept {}", dir.display()));
    } else {
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            log(format!("could not remove {}: {e}", dir.display()));
        }
        if let Some(sock) = &admin_socket {
            let _ = std::fs::remove_file(sock);
        }
    }
    let pairs = outcome?;
    println!();
    if peers.is_some() {
        print!("{}", report::pair_table(&pairs));
    } else {
        let cells: Vec<Cell> = pairs.into_iter().map(|p| p.hamail).collect();
        print!("{}", report::table(&cells));
    }
    Ok(())
}

fn print_log_tail(log_path: &Path) {
    if let Ok(text) = std::fs::read_to_string(log_path) {
        let lines: Vec<&str> = text.lines().collect();
        if !lines.is_empty() {
            log(format!("last lines of {}:", log_path.display()));
            for line in &lines[lines.len().saturating_sub(20)..] {
                eprintln!("    {line}");
            }
        }
    }
}

/// Sets the server up and runs every cell; prints each cell's line(s) as
/// it ends. With peers, each cell runs against hamail and against the peer
/// back to back, the order alternating from one cell to the next.
async fn bench(cli: &Cli, peers: Option<&Peers>, admin: &Admin, server: &mut Server) -> Result<Vec<Pair>> {
    log(format!("server pid {} smtp {} pop3 {}", server.pid, server.smtp, server.pop3));
    admin.run(&["domain", "add", DOMAIN], None).await?;
    let users: Vec<String> = (0..cli.users).map(|i| format!("user{i:04}@{DOMAIN}")).collect();
    let t = Instant::now();
    admin.add_users(&users, PASSWORD, cli.admin_parallel).await?;
    log(format!("created {} users in {:.1} s", users.len(), t.elapsed().as_secs_f64()));

    let duration = Duration::from_secs_f64(cli.seconds);
    let interval = Duration::from_millis(cli.sample_ms.max(10));
    // Walking a process tree costs more than reading one process.
    let tree_interval = interval.max(Duration::from_millis(200));
    let mut pairs = Vec::new();
    let mut k = 0usize; // cell number: even = hamail first
    let pop3_peer = peers.filter(|p| p.pop3.is_some());
    let smtp_peer = peers.filter(|p| p.smtp.is_some());

    if !cli.no_pop3 {
        let t = Instant::now();
        smtp::populate(server.smtp, &users, cli.pop3_msgs, cli.pop3_size, 4).await?;
        log(format!(
            "populated {} mailboxes x {} msgs of {} bytes in {:.1} s",
            users.len(),
            cli.pop3_msgs,
            cli.pop3_size,
            t.elapsed().as_secs_f64()
        ));
        let warm = pop3::run(server.pop3, &users, PASSWORD, 4.min(users.len()), None).await?;
        if warm.errors > 0 || warm.msgs != (users.len() * cli.pop3_msgs) as u64 {
            bail!(
                "POP3 warm-up pass: {} messages read, {} expected, {} errors",
                warm.msgs,
                users.len() * cli.pop3_msgs,
                warm.errors
            );
        }
        if let Some(p) = pop3_peer {
            populate_peer(cli, p).await?;
        }
        for &conc in &cli.pop3_concurrency {
            let hamail_first = k.is_multiple_of(2);
            k += 1;
            let mut hamail_cell = None;
            let mut peer_cell = None;
            for turn in 0..2 {
                if (turn == 0) == hamail_first {
                    let mon = procfs::Monitor::start(server.pid, interval);
                    let r = pop3::run(server.pop3, &users, PASSWORD, conc, Some(duration)).await?;
                    hamail_cell = Some(pop3_cell("hamail", cli, users.len(), conc, r, mon.finish().await));
                    ensure_alive(server)?;
                } else if let Some(p) = pop3_peer {
                    p.reload(Daemon::Dovecot).await?;
                    let mon = procfs::Monitor::start_tree(p.dovecot_pid()?, tree_interval);
                    let addr = p.pop3.context("no peer pop3")?;
                    let r = pop3::run(addr, &p.users, &p.password, conc, Some(duration)).await?;
                    let mut c = pop3_cell("dovecot", cli, p.users.len(), conc, r, mon.finish().await);
                    c.compare = Compare::Nothing;
                    peer_cell = Some(c);
                }
            }
            let mut h = hamail_cell.context("no hamail cell")?;
            if let Some(pc) = &mut peer_cell {
                h.compare = Compare::Peer(pc.server, pc.msgs_per_s());
                mark_order(&mut h, pc, hamail_first);
            }
            println!("{}", h.line());
            if let Some(pc) = &peer_cell {
                println!("{}", pc.line());
            }
            pairs.push(Pair { hamail: h, peer: peer_cell, delivered_per_s: None, landed: None });
        }
    }

    if !cli.no_smtp {
        let recipients = Arc::new(users.clone());
        let mut dirty = !cli.no_pop3;
        for &size in &cli.sizes {
            for &conc in &cli.concurrency {
                if dirty && !cli.no_purge {
                    let t = Instant::now();
                    let n = pop3::purge(server.pop3, &users, PASSWORD, 4).await.context("emptying the mailboxes")?;
                    log(format!("emptied the mailboxes ({n} messages) in {:.1} s", t.elapsed().as_secs_f64()));
                }
                dirty = true;
                let load = |addr: SocketAddr, recipients: Arc<Vec<String>>| smtp::Load {
                    addrs: Arc::new(vec![addr]),
                    recipients,
                    size,
                    conc,
                    reuse: cli.reuse,
                    duration,
                };
                let hamail_first = k.is_multiple_of(2);
                k += 1;
                let mut hamail_cell = None;
                let mut peer = None;
                for turn in 0..2 {
                    if (turn == 0) == hamail_first {
                        let mon = procfs::Monitor::start(server.pid, interval);
                        let r = smtp::run(load(server.smtp, recipients.clone())).await?;
                        hamail_cell = Some(smtp_cell("hamail", cli, size, conc, &r, mon.finish().await));
                        ensure_alive(server)?;
                    } else if let Some(p) = smtp_peer {
                        let addr = p.smtp.context("no peer smtp")?;
                        peer = Some(postfix_cell(cli, p, load(addr, Arc::new(p.users.clone())), tree_interval).await?);
                    }
                }
                let mut h = hamail_cell.context("no hamail cell")?;
                if let Some((pc, _, _)) = &mut peer {
                    h.compare = Compare::Peer(pc.server, pc.msgs_per_s());
                    mark_order(&mut h, pc, hamail_first);
                }
                println!("{}", h.line());
                if let Some((pc, _, _)) = &peer {
                    println!("{}", pc.line());
                }
                pairs.push(match peer {
                    Some((pc, delivered, landed)) => {
                        Pair { hamail: h, peer: Some(pc), delivered_per_s: Some(delivered), landed: Some(landed) }
                    }
                    None => Pair { hamail: h, peer: None, delivered_per_s: None, landed: None },
                });
            }
        }
    }
    if let Some(p) = peers {
        // Leave the peers' maildirs empty, as bench.py does after a cell.
        if p.smtp.is_some() && !p.wait_queue_empty(Duration::from_secs(600)).await {
            log("the postfix queue did not drain");
        }
        match p.wipe(true) {
            Ok(n) => log(format!("emptied the peers' maildirs ({n} files)")),
            Err(e) => log(format!("could not empty the peers' maildirs: {e:#}")),
        }
    }
    Ok(pairs)
}

/// `order=1|2`: which of the two servers ran first in this cell.
fn mark_order(hamail: &mut Cell, peer: &mut Cell, hamail_first: bool) {
    let (h, p) = if hamail_first { ("1", "2") } else { ("2", "1") };
    hamail.extra.push(("order", h.to_string()));
    peer.extra.push(("order", p.to_string()));
}

fn pop3_cell(
    server: &'static str,
    cli: &Cli,
    users: usize,
    conc: usize,
    r: pop3::Pop3Result,
    usage: procfs::Usage,
) -> Cell {
    Cell {
        test: "pop3",
        server,
        size: cli.pop3_size,
        conc,
        reuse: false,
        msgs: r.msgs,
        bytes: r.octets,
        secs: r.secs,
        errors: r.errors,
        usage,
        extra: vec![
            ("users", users.to_string()),
            ("msgs_per_user", cli.pop3_msgs.to_string()),
            ("sessions", r.sessions.to_string()),
            ("sess_per_s", format!("{:.1}", r.sessions as f64 / r.secs.max(1e-9))),
            ("sess_p50_ms", format!("{:.1}", r.session_pct_ms(0.5))),
            ("sess_p99_ms", format!("{:.1}", r.session_pct_ms(0.99))),
        ],
        compare: Compare::Static,
    }
}

fn smtp_cell(
    server: &'static str,
    cli: &Cli,
    size: usize,
    conc: usize,
    r: &smtp::SmtpResult,
    usage: procfs::Usage,
) -> Cell {
    Cell {
        test: "smtp",
        server,
        size,
        conc,
        reuse: cli.reuse,
        msgs: r.msgs,
        bytes: r.msgs * size as u64,
        secs: r.secs,
        errors: r.errors,
        usage,
        extra: vec![],
        compare: Compare::Static,
    }
}

/// Fills the peer's POP3 mailboxes: through Postfix with the SMTP client
/// when --peer-smtp is given (then waits for the queue to drain), otherwise
/// by writing the Maildir files directly like bench.py populate. Then one
/// unmeasured warm-up pass, as for hamail.
async fn populate_peer(cli: &Cli, p: &Peers) -> Result<()> {
    let t = Instant::now();
    let expected = (p.users.len() * cli.pop3_msgs) as u64;
    if let Some(addr) = p.smtp {
        if !p.wait_queue_empty(Duration::from_secs(600)).await {
            bail!("the postfix queue is not empty");
        }
        p.wipe(true)?;
        smtp::populate(addr, &p.users, cli.pop3_msgs, cli.pop3_size, 4).await.context("populating through postfix")?;
        if !p.wait_queue_empty(Duration::from_secs(600)).await {
            bail!("the postfix queue did not drain after populating");
        }
    } else {
        p.wipe(true)?;
        p.populate_files(cli.pop3_msgs, cli.pop3_size)?;
    }
    let (n, _) = p.count()?;
    if n != expected {
        bail!("peer populate: {n} messages in the maildirs, {expected} expected");
    }
    log(format!(
        "populated the peer's {} mailboxes x {} msgs ({}) in {:.1} s",
        p.users.len(),
        cli.pop3_msgs,
        if p.smtp.is_some() { "through postfix" } else { "maildir files" },
        t.elapsed().as_secs_f64()
    ));
    let addr = p.pop3.context("no peer pop3")?;
    let warm = pop3::run(addr, &p.users, &p.password, 4.min(p.users.len()), None).await?;
    if warm.errors > 0 || warm.msgs != expected {
        bail!("peer POP3 warm-up pass: {} messages read, {expected} expected, {} errors", warm.msgs, warm.errors);
    }
    Ok(())
}

/// One SMTP cell against Postfix: empty queue and maildirs, reload, the
/// load, then wait until the queue is empty and count what landed. Returns
/// the cell (its resource figures cover the delivery too), the delivered
/// msgs/s and (landed, accepted).
async fn postfix_cell(cli: &Cli, p: &Peers, load: smtp::Load, interval: Duration) -> Result<(Cell, f64, (u64, u64))> {
    if !p.wait_queue_empty(Duration::from_secs(600)).await {
        log("the postfix queue did not drain before the cell");
    }
    p.wipe(false)?;
    p.reload(Daemon::Postfix).await?;
    let (size, conc) = (load.size, load.conc);
    let mon = procfs::Monitor::start_tree(p.postfix_pid()?, interval);
    let t0 = Instant::now();
    let r = smtp::run(load).await?;
    let drained = p.wait_queue_empty(Duration::from_secs(900)).await;
    let e2e = t0.elapsed().as_secs_f64();
    let usage = mon.finish().await;
    let (landed, disk) = p.count()?;
    let delivered = landed as f64 / e2e.max(1e-9);
    let mut c = smtp_cell("postfix", cli, size, conc, &r, usage);
    c.compare = Compare::Nothing;
    c.extra = vec![
        ("e2e_secs", format!("{e2e:.3}")),
        ("delivered_msgs_per_s", format!("{delivered:.1}")),
        ("landed", landed.to_string()),
        ("landed_ok", u8::from(landed == r.msgs && drained).to_string()),
        ("drained", u8::from(drained).to_string()),
        ("disk_mb", format!("{:.2}", disk as f64 / 1e6)),
    ];
    if landed != r.msgs || !drained {
        log(format!("postfix: {landed} messages landed, {} accepted, queue drained: {drained}", r.msgs));
    }
    Ok((c, delivered, (landed, r.msgs)))
}

fn ensure_alive(server: &mut Server) -> Result<()> {
    if !server.alive() {
        bail!("the server process has exited");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1024"), Ok(1024));
        assert_eq!(parse_size("1k"), Ok(1024));
        assert_eq!(parse_size("100K"), Ok(102_400));
        assert_eq!(parse_size("1m"), Ok(1_048_576));
        assert_eq!(parse_size("1MiB"), Ok(1_048_576));
        assert_eq!(parse_size("2KB"), Ok(2048));
        assert!(parse_size("8").is_err());
        assert!(parse_size("x").is_err());
    }

    #[test]
    fn config_is_valid_toml_shape() {
        let cfg = config_text(Path::new("/tmp/a \"b\"/data"), Some(Path::new("/tmp/s.sock")), 500);
        assert!(cfg.contains("data_dir = \"/tmp/a \\\"b\\\"/data\"\n"), "{cfg}");
        assert!(cfg.contains("[admin]\nsocket = \"/tmp/s.sock\"\n"));
        assert!(cfg.contains("listen = [\"127.0.0.1:0\"]"));
    }
}
