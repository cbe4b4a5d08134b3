//! The `hamail` binary: the server (`hamail serve`) and the admin commands.
//!
//! Admin commands talk to a running server through its admin socket; when no
//! server runs they open the store themselves, so a fresh install can be set
//! up before the first start.

use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context as _, Result};
use clap::{Parser, Subcommand};
use hamail_server::admin::{Request, Response};
use hamail_server::Config;
use hamail_store::LocalStore;
use serde_json::Value;

#[derive(Parser)]
#[command(name = "hamail", version, about = "A highly available mail server: SMTP, POP3 and a crash-safe store")]
struct Cli {
    /// Configuration file (TOML). Without one, built-in defaults: data in
    /// ./hamail-data, SMTP 127.0.0.1:2525, submission :2587, POP3 :2110.
    #[arg(short, long, global = true, env = "HAMAIL_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the mail server in the foreground.
    Serve,
    /// Started by `serve`: removes its floating addresses when it dies.
    #[command(hide = true)]
    Reaper,
    /// Mail domains this server is the destination for.
    #[command(subcommand)]
    Domain(DomainCmd),
    /// Users (virtual mailboxes; no system accounts).
    #[command(subcommand)]
    User(UserCmd),
    /// Aliases: an address delivered to other addresses.
    #[command(subcommand)]
    Alias(AliasCmd),
    /// The outbound queue.
    #[command(subcommand)]
    Queue(QueueCmd),
    /// The mail store: verify (and repair) every body file.
    #[command(subcommand)]
    Store(StoreCmd),
    /// Failover groups: apply a file, status, start, stop, move, clear, del.
    #[command(subcommand)]
    Group(GroupCmd),
    /// This node in the cluster: `node stop` moves its groups away.
    #[command(subcommand)]
    Node(NodeCmd),
    /// The cluster log (events of every node); `log write TEXT` appends.
    Log {
        #[command(subcommand)]
        write: Option<LogCmd>,
        /// How many of the last events to show.
        #[arg(short = 'n', long, default_value_t = 50)]
        lines: usize,
    },
    /// The cluster: init, join, status, remove.
    #[command(subcommand)]
    Cluster(ClusterCmd),
    /// Login bans on this node (set by failed logins): list, del.
    #[command(subcommand)]
    Ban(BanCmd),
    /// Mail from an existing system: a mbox file or a Maildir++ tree into
    /// a user's maildrop (through the running server when there is one).
    #[command(subcommand)]
    Import(ImportCmd),
    /// Counters and state of the server.
    Status {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum BanCmd {
    /// Every ban in force: the address or account, time left, failures.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Lifts the ban on a client address (an IPv6 address stands for its
    /// /64) or an account.
    Del { target: String },
}

#[derive(Subcommand)]
enum DomainCmd {
    Add { domain: String },
    Del { domain: String },
    List,
}

#[derive(Subcommand)]
enum UserCmd {
    /// Add a user; the password is asked for (twice) on a terminal, or read
    /// as one line from standard input. Never on the command line.
    Add {
        user: String,
    },
    /// Change a user's password (same input rules as `add`).
    Passwd {
        user: String,
    },
    /// Remove a user and its maildrop.
    Del {
        user: String,
    },
    List,
    /// Add users from FILE (`-`: standard input): one `address secret` per
    /// line, the secret a clear password or a crypt(3) hash kept as it is
    /// ($6$, $5$, $2y$/$2b$/$2a$, $y$, $argon2id$...; Dovecot's {SCHEME}
    /// prefixes too). Blank lines and # comments are skipped.
    Import {
        file: PathBuf,
        /// Set the password of users that exist (else they are skipped).
        #[arg(long)]
        update: bool,
        /// Add the domains of the file that do not exist yet (else their
        /// users fail).
        #[arg(long)]
        create_domains: bool,
    },
}

#[derive(Subcommand)]
enum ImportCmd {
    /// Every message of a mbox file (/var/spool/mail/USER) into USER's
    /// maildrop. Messages already there are not imported again.
    Mbox {
        path: PathBuf,
        user: String,
        /// mboxrd: one `>` is taken off `>From `, `>>From `... lines (what
        /// current tools write); mboxo: lines are kept as they are.
        #[arg(long, value_enum, default_value_t = MboxFlavour::Mboxrd)]
        format: MboxFlavour,
    },
    /// Every message of a Maildir++ tree's INBOX (cur/ and new/) into
    /// USER's maildrop. Messages already there are not imported again.
    Maildir {
        path: PathBuf,
        user: String,
        /// Import the sub-folders (.Sent/, .Archive/...) into the maildrop
        /// too (POP3 has one mailbox); without, they are listed and left.
        #[arg(long)]
        all_folders: bool,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum MboxFlavour {
    Mboxrd,
    Mboxo,
}

#[derive(Subcommand)]
enum AliasCmd {
    Add {
        alias: String,
        #[arg(required = true)]
        targets: Vec<String>,
    },
    Del {
        alias: String,
    },
    List,
}

#[derive(Subcommand)]
enum GroupCmd {
    /// Adds or replaces the groups of a TOML file (`[[group]]` tables, see
    /// the README).
    Apply { file: PathBuf },
    /// Every group: owner, state, target, epoch.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Runs the group on its best live node.
    Start { name: String },
    /// Stops the group wherever it runs.
    Stop { name: String },
    /// Switchover: to NODE, or to the next node of its list.
    Move { name: String, node: Option<u64> },
    /// Removes a stopped group.
    Del { name: String },
    /// After a failed stop (state StopFailed), once you checked that its
    /// resources are down on its owner: marks it offline, so that it can
    /// start again.
    Clear { name: String },
}

#[derive(Subcommand)]
enum NodeCmd {
    /// Moves every group away from NODE (default: this node).
    Stop { node: Option<u64> },
}

#[derive(Subcommand)]
enum LogCmd {
    /// Appends a line to the cluster log (the seed's `armlog`).
    Write {
        #[arg(required = true)]
        text: Vec<String>,
    },
}

#[derive(Subcommand)]
enum StoreCmd {
    /// Re-hash every body on every data node; damaged or missing ones are
    /// fetched again from a node that has a good copy. Needs the running
    /// server.
    Verify,
}

#[derive(Subcommand)]
enum ClusterCmd {
    /// Make this (running) node a one-node cluster; prints the join token.
    /// Needs `[cluster] listen` in the config.
    Init,
    /// Join the cluster of TOKEN (from `cluster init` on a member). This
    /// node's users and domains are replaced by the cluster's.
    Join { token: String },
    /// Every member: role, state, leader, term, log, lag, last contact,
    /// and the leader's link to it (up or down, failed Raft calls, changes).
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Remove node NODE (its id, from `cluster status`) from the cluster.
    Remove { node: u64 },
}

#[derive(Subcommand)]
enum QueueCmd {
    /// Every queued message: size, sender, each recipient's state and next attempt (like mailq).
    List {
        #[arg(long)]
        json: bool,
    },
    /// One message: its state and its content (like postcat -q).
    Show {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// Try these messages now (all when none is given), like postqueue -f / -i.
    Flush { ids: Vec<String> },
    /// Keep these messages (or ALL) from delivery until released, like postsuper -h.
    Hold {
        #[arg(required = true)]
        ids: Vec<String>,
    },
    /// Release held messages (or ALL), like postsuper -H.
    Release {
        #[arg(required = true)]
        ids: Vec<String>,
    },
    /// Remove messages (or ALL) without notice, like postsuper -d.
    Delete {
        #[arg(required = true)]
        ids: Vec<String>,
    },
    /// Return messages (or ALL) to their senders with a bounce, like postsuper -r / Exim's -Mg.
    Bounce {
        #[arg(required = true)]
        ids: Vec<String>,
    },
}

fn main() {
    // Large buffers (message bodies, argon2 memory) are mmapped and given
    // back to the system when freed. Without a fixed threshold glibc raises
    // it after the first large free, and such buffers then stay in the heap
    // for good: measured, a server that had spiked kept the peak as RSS.
    // SAFETY: called before any other thread exists; mallopt only sets a
    // malloc parameter.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 * 1024);
    }
    // Everything hamail creates (store, bodies, password hashes, keys, the
    // admin socket) is for its own user only, whatever umask it was
    // started with.
    // SAFETY: umask(2) only sets the process's file mode mask.
    unsafe {
        libc::umask(0o077);
    }
    let cli = Cli::parse_from(arguments());
    if !matches!(cli.command, Command::Serve) {
        // A command's output piped into `head` and the like ends quietly
        // when the reader has gone, as with other Unix tools: the default
        // SIGPIPE disposition (Rust ignores SIGPIPE, and `println!` then
        // panics on EPIPE). Not for `serve`: a peer closing its socket must
        // stay an error on that socket, never the end of the server.
        // SAFETY: called before any other thread exists; signal(2) only sets
        // this process's disposition of SIGPIPE.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    {
        use tracing_subscriber::layer::SubscriberExt as _;
        use tracing_subscriber::util::SubscriberInitExt as _;
        let layer =
            tracing_subscriber::fmt::layer().with_ansi(std::io::stderr().is_terminal()).with_writer(std::io::stderr);
        tracing_subscriber::registry().with(log_filter(std::env::var("HAMAIL_LOG").ok().as_deref(), layer)).init();
    }
    if matches!(cli.command, Command::Reaper) {
        hamail_server::resources::reaper::run(std::io::stdin().lock());
        return;
    }
    if matches!(cli.command, Command::Serve) {
        own_mount_namespace();
        scripts_environment(cli.config.as_deref());
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("hamail: cannot start the runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = runtime.block_on(run(cli)) {
        eprintln!("hamail: {}", describe(&e));
        std::process::exit(1);
    }
}

/// The command line; called as `armlog` (the link `serve` gives the group
/// scripts, as the original ARMS/CLUSTERPRO scripts call it): `armlog TEXT`
/// is `hamail log write TEXT`, with the server's configuration from
/// `HAMAIL_CONFIG`.
fn arguments() -> Vec<std::ffi::OsString> {
    let mut args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let called = args.first().and_then(|a| Path::new(a).file_name()).map(|n| n.to_os_string());
    if called.as_deref() == Some(std::ffi::OsStr::new(hamail_server::resources::ARMLOG)) {
        args.splice(0..1, ["hamail", "log", "write", "--"].map(std::ffi::OsString::from));
    }
    args
}

/// What `serve` passes on to the group scripts it runs: `HAMAIL_CONFIG`
/// (its configuration, absolute, so that `hamail` and `armlog` in a script
/// reach this server) and `HAMAIL` (this binary). Set before any other
/// thread exists.
fn scripts_environment(config: Option<&Path>) {
    if let Some(config) = config {
        let absolute = std::path::absolute(config).unwrap_or_else(|_| config.to_path_buf());
        std::env::set_var("HAMAIL_CONFIG", absolute);
    }
    if let Ok(exe) = std::env::current_exe() {
        std::env::set_var("HAMAIL", exe);
    }
}

/// Makes the mounts of `serve` (a failover group's shared disk) its own: in
/// a mount namespace of its own, they end with the process however it ends
/// (SIGKILL, OOM kill, panic), so a dead hamail never leaves a disk mounted
/// on its node while another node mounts it (two mounts of one ext4
/// filesystem destroy it). The host's mounts still show here (slave
/// propagation, mount_namespaces(7)); ours do not show on the host
/// (`nsenter -t PID -m findmnt` shows them). The group's scripts run in this
/// namespace and see the disk. Without CAP_SYS_ADMIN (not root) hamail
/// could not mount anyway: nothing to do. Must run before any other thread
/// exists: unshare(2) moves only the calling thread.
fn own_mount_namespace() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return;
    }
    // SAFETY: unshare(2) with CLONE_NEWNS only changes this (single)
    // thread's mount namespace.
    if unsafe { libc::unshare(libc::CLONE_NEWNS) } != 0 {
        let e = std::io::Error::last_os_error();
        tracing::warn!(error = %e, "no mount namespace of our own: a shared disk would stay mounted if hamail died");
        return;
    }
    // SAFETY: valid NUL-terminated path; null source, type and data are
    // allowed for a propagation change.
    let slave = unsafe {
        libc::mount(std::ptr::null(), c"/".as_ptr(), std::ptr::null(), libc::MS_REC | libc::MS_SLAVE, std::ptr::null())
    };
    if slave != 0 {
        let e = std::io::Error::last_os_error();
        tracing::warn!(error = %e, "cannot make our mounts private: a shared disk would show on the host too");
    }
}

/// The log filter when `HAMAIL_LOG` is not set: INFO, without openraft's
/// lines about single failed calls to a peer (a leader retries a dead
/// follower twenty times a second, and checks its leadership with every peer
/// at each linearizable read, and openraft logs each failure). The cluster's
/// Raft network logs a peer's failures once per change instead: `node N
/// unreachable: ...`, `node N reachable again after ...`
/// (`hamail_cluster::network`). Left out: the replication task's per-call
/// errors (`openraft::replication`; a storage error there is also reported,
/// as fatal, by openraft's core), the leader's per-call progress warnings
/// (`replication_handler`) and a snapshot send's per-chunk warnings; what
/// an operator needs from openraft stays (elections and leadership changes,
/// membership, storage and fatal errors).
const DEFAULT_LOG_FILTER: &str = "info,openraft::replication=off,\
     openraft::engine::handler::replication_handler=error,openraft::network::snapshot_transport=error";

/// openraft's core logs at ERROR a failed call to one peer (a vote request,
/// the leadership check of a read), naming it in a `target` field; its
/// other ERRORs (fatal ones) name no peer.
fn openraft_call_failure(meta: &tracing::Metadata<'_>) -> bool {
    meta.target() == "openraft::core::raft_core"
        && *meta.level() == tracing::Level::ERROR
        && meta.fields().field("target").is_some()
}

/// `layer` behind the log filter: `configured` (`HAMAIL_LOG`, taken as it
/// is: `HAMAIL_LOG=info` shows openraft's per-call lines again) or, without
/// one (or an invalid one), [`DEFAULT_LOG_FILTER`] and without
/// [`openraft_call_failure`] lines.
fn log_filter<S, L>(configured: Option<&str>, layer: L) -> impl tracing_subscriber::Layer<S>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    L: tracing_subscriber::Layer<S>,
{
    use tracing_subscriber::filter::{filter_fn, FilterExt as _};
    let configured = configured.and_then(|c| {
        tracing_subscriber::EnvFilter::try_new(c).map_err(|e| eprintln!("hamail: HAMAIL_LOG={c:?} ignored: {e}")).ok()
    });
    let quiet = configured.is_none();
    let filter = configured.unwrap_or_else(|| tracing_subscriber::EnvFilter::new(DEFAULT_LOG_FILTER));
    layer.with_filter(filter.and(filter_fn(move |meta| !(quiet && openraft_call_failure(meta)))))
}

/// The error and its causes, each said once: an error whose text already
/// includes its source (`binding ... : Address already in use`) does not
/// get the source repeated after it.
fn describe(e: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in e.chain() {
        let said = cause.to_string();
        if text.contains(&said) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&said);
    }
    text
}

/// "queued 5m ago" style age of a Unix time.
fn ago(now: u64, t: Option<u64>) -> String {
    let Some(t) = t else { return "?".into() };
    let secs = now.saturating_sub(t);
    match secs {
        0..=119 => format!("{secs}s ago"),
        120..=7199 => format!("{}m ago", secs / 60),
        7200..=172_799 => format!("{}h ago", secs / 3600),
        _ => format!("{}d ago", secs / 86400),
    }
}

fn load_config(path: Option<&Path>) -> Result<Config> {
    Ok(match path {
        Some(p) => Config::load(p)?,
        None => Config::default(),
    })
}

async fn run(cli: Cli) -> Result<()> {
    let config = load_config(cli.config.as_deref())?;
    let request = match cli.command {
        Command::Serve => return serve(config).await,
        // Handled in `main`, before any runtime exists.
        Command::Reaper => bail!("`hamail reaper` is started by `hamail serve` only"),
        Command::Domain(DomainCmd::Add { domain }) => Request::DomainAdd { domain },
        Command::Domain(DomainCmd::Del { domain }) => Request::DomainDel { domain },
        Command::Domain(DomainCmd::List) => Request::DomainList,
        Command::User(UserCmd::Add { user }) => Request::UserAdd { password: read_password(&user)?, user },
        Command::User(UserCmd::Passwd { user }) => Request::UserPasswd { password: read_password(&user)?, user },
        Command::User(UserCmd::Del { user }) => Request::UserDel { user },
        Command::User(UserCmd::List) => Request::UserList,
        Command::User(UserCmd::Import { file, update, create_domains }) => {
            return import_users(&config, &file, update, create_domains).await
        }
        Command::Import(cmd) => return import_mail(&config, cmd).await,
        Command::Alias(AliasCmd::Add { alias, targets }) => Request::AliasAdd { alias, targets },
        Command::Alias(AliasCmd::Del { alias }) => Request::AliasDel { alias },
        Command::Alias(AliasCmd::List) => Request::AliasList,
        Command::Queue(QueueCmd::List { json }) => {
            let response = admin(&config, Request::QueueList).await?;
            return print_response(&Request::QueueList, response, json);
        }
        Command::Queue(QueueCmd::Show { id, json }) => {
            let request = Request::QueueShow { id };
            let response = admin(&config, request.clone()).await?;
            return print_response(&request, response, json);
        }
        Command::Queue(QueueCmd::Flush { ids }) => Request::Queue { command: "flush".into(), ids },
        Command::Queue(QueueCmd::Hold { ids }) => Request::Queue { command: "hold".into(), ids },
        Command::Queue(QueueCmd::Release { ids }) => Request::Queue { command: "release".into(), ids },
        Command::Queue(QueueCmd::Delete { ids }) => Request::Queue { command: "delete".into(), ids },
        Command::Queue(QueueCmd::Bounce { ids }) => Request::Queue { command: "bounce".into(), ids },
        Command::Store(StoreCmd::Verify) => Request::StoreVerify,
        Command::Group(GroupCmd::Apply { file }) => Request::GroupApply { groups: read_groups(&file)? },
        Command::Group(GroupCmd::Status { json }) => {
            let response = admin(&config, Request::GroupStatus).await?;
            return print_response(&Request::GroupStatus, response, json);
        }
        Command::Group(GroupCmd::Start { name }) => Request::Group { command: "start".into(), name, node: None },
        Command::Group(GroupCmd::Stop { name }) => Request::Group { command: "stop".into(), name, node: None },
        Command::Group(GroupCmd::Move { name, node }) => Request::Group { command: "move".into(), name, node },
        Command::Group(GroupCmd::Del { name }) => Request::Group { command: "del".into(), name, node: None },
        Command::Group(GroupCmd::Clear { name }) => Request::Group { command: "clear".into(), name, node: None },
        Command::Node(NodeCmd::Stop { node }) => Request::NodeStop { node },
        Command::Log { write: Some(LogCmd::Write { text }), .. } => Request::LogWrite { text: text.join(" ") },
        Command::Log { write: None, lines } => Request::LogShow { limit: lines },
        Command::Cluster(ClusterCmd::Init) => Request::ClusterInit,
        Command::Cluster(ClusterCmd::Join { token }) => Request::ClusterJoin { token },
        Command::Cluster(ClusterCmd::Remove { node }) => Request::ClusterRemove { node },
        Command::Cluster(ClusterCmd::Status { json }) => {
            let response = admin(&config, Request::ClusterStatus).await?;
            return print_response(&Request::ClusterStatus, response, json);
        }
        Command::Status { json } => {
            let response = admin(&config, Request::Status).await?;
            return print_response(&Request::Status, response, json);
        }
        Command::Ban(BanCmd::List { json }) => {
            let response = admin(&config, Request::BanList).await?;
            return print_response(&Request::BanList, response, json);
        }
        Command::Ban(BanCmd::Del { target }) => Request::BanDel { target },
    };
    let response = admin(&config, request.clone()).await?;
    print_response(&request, response, false)
}

async fn serve(config: Config) -> Result<()> {
    hamail_server::secure_data_dir(&config.server.data_dir)?;
    let store_dir = config.store_dir();
    let store = LocalStore::open(&store_dir, config.store_options()?)
        .with_context(|| format!("opening the store in {}", store_dir.display()))?;
    if let Ok(exe) = std::env::current_exe() {
        if let Err(e) = hamail_server::resources::link_script_tools(&config.server.data_dir, &exe) {
            tracing::warn!(error = %e, "no `armlog` for the group scripts");
        }
    }
    let running = hamail_server::start(config.clone(), store.clone()).await?;
    let show = |v: &[std::net::SocketAddr]| v.iter().map(|a| a.to_string()).collect::<Vec<_>>().join(" ");
    // Machine-readable lines first (tests and scripts read them), then help.
    // Only the listeners this node has: a witness serves no mail.
    let listeners = [
        ("smtp", &running.smtp),
        ("submission", &running.submission),
        ("submissions", &running.submissions),
        ("pop3", &running.pop3),
        ("pop3s", &running.pop3s),
    ];
    for (kind, addresses) in listeners.into_iter().filter(|(_, a)| !a.is_empty()) {
        println!("hamail: {kind} listening on {}", show(addresses));
    }
    if let Some(addr) = running.cluster_address() {
        println!("hamail: cluster listening on {addr}");
    }
    println!("hamail: admin socket {}", running.admin_socket.display());
    println!("hamail: store in {}", store_dir.display());
    let cfg = if let Ok(p) = std::env::var("HAMAIL_CONFIG") { format!(" --config {p}") } else { String::new() };
    println!("hamail: ready. In another terminal:");
    println!("    hamail{cfg} domain add example.org");
    println!("    hamail{cfg} user add alice@example.org      # asks for the password");
    if let Some(smtp) = running.smtp.first() {
        println!("    swaks --server {smtp} --to alice@example.org");
    }
    let _ = std::io::stdout().flush();

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    // In a cluster, this node's groups go to the other nodes first (their
    // stop runs here: scripts, unmount, addresses removed), so that the
    // others take them at once rather than after a power cut's delay.
    // A second signal stops at once.
    tokio::select! {
        handed = hamail_server::cluster::hand_over(&running.context, HAND_OVER_WITHIN) => {
            if !handed.is_empty() {
                tracing::info!(groups = ?handed, "groups handed over");
            }
        }
        _ = tokio::signal::ctrl_c() => tracing::warn!("second signal: not waiting for the groups' hand-over"),
        _ = term.recv() => tracing::warn!("second signal: not waiting for the groups' hand-over"),
    }
    tracing::info!("shutting down: no new connections");
    running.stop();
    let _ = std::fs::remove_file(&running.admin_socket);
    Ok(())
}

/// The longest a service stop waits for this node's groups to be stopped
/// and handed over (a service manager's stop timeout is usually 90 s).
const HAND_OVER_WITHIN: std::time::Duration = std::time::Duration::from_secs(60);

/// Sends a request to the running server, or runs it in-process when no
/// server is running.
async fn admin(config: &Config, request: Request) -> Result<Response> {
    let socket = config.admin_socket();
    match tokio::net::UnixStream::connect(&socket).await {
        Ok(stream) => {
            use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
            let (r, mut w) = stream.into_split();
            let mut line = serde_json::to_string(&request)?;
            line.push('\n');
            w.write_all(line.as_bytes()).await?;
            let mut reply = String::new();
            BufReader::new(r).read_line(&mut reply).await?;
            if reply.is_empty() {
                bail!(
                    "the server closed the admin socket {} without answering (are you root or the server's user?)",
                    socket.display()
                );
            }
            Ok(serde_json::from_str(&reply).context("malformed answer from the server")?)
        }
        Err(e) if matches!(e.kind(), std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused) => {
            if request.needs_server() {
                bail!(
                    "no hamail server answers on {} and this command needs one (start `hamail serve`, or name the \
                     server's configuration with --config or HAMAIL_CONFIG)",
                    socket.display()
                );
            }
            hamail_server::secure_data_dir(&config.server.data_dir)?;
            let dir = config.store_dir();
            let store = LocalStore::open(&dir, config.store_options()?).with_context(|| {
                format!("no server answers on {} and the store in {} cannot be opened", socket.display(), dir.display())
            })?;
            let store: Arc<LocalStore> = store;
            Ok(hamail_server::admin::execute(store.as_ref(), store.as_ref(), None, request).await)
        }
        Err(e) => Err(e).with_context(|| format!("connecting to the admin socket {}", socket.display())),
    }
}

/// Users sent per request: one directory write each.
const USERS_PER_BATCH: usize = 500;

/// `hamail user import`: errors name FILE:LINE; the summary counts every
/// line; the exit status is 1 when any line failed.
async fn import_users(config: &Config, file: &Path, update: bool, create_domains: bool) -> Result<()> {
    use hamail_server::import::{parse_user_line, ImportedUser};
    let name = file.display().to_string();
    let input: Box<dyn BufRead> = if name == "-" {
        Box::new(std::io::stdin().lock())
    } else {
        Box::new(std::io::BufReader::new(std::fs::File::open(file).with_context(|| format!("opening {name}"))?))
    };
    let (mut imported, mut updated, mut skipped, mut failed) = (0u64, 0u64, 0u64, 0u64);
    let mut users: Vec<(usize, ImportedUser)> = Vec::new();
    for (i, line) in input.split(b'\n').enumerate() {
        let line = line.with_context(|| format!("reading {name}"))?;
        let parsed = String::from_utf8(line)
            .map_err(|_| "not UTF-8".to_string())
            .and_then(|l| parse_user_line(l.trim_end_matches('\r')));
        match parsed {
            Ok(Some(u)) => users.push((i + 1, u)),
            Ok(None) => {}
            Err(e) => {
                eprintln!("{name}:{}: {e}", i + 1);
                failed += 1;
            }
        }
    }
    for batch in users.chunks(USERS_PER_BATCH) {
        let request =
            Request::UserImport { users: batch.iter().map(|(_, u)| u.clone()).collect(), update, create_domains };
        let response = admin(config, request).await?;
        if !response.ok {
            bail!("{}", response.error.unwrap_or_else(|| "the import failed".into()));
        }
        for d in response.data["domains_created"].as_array().into_iter().flatten() {
            println!("domain {} added", d.as_str().unwrap_or_default());
        }
        let results = response.data["results"].as_array().cloned().unwrap_or_default();
        if results.len() != batch.len() {
            bail!("the server answered {} results for {} users", results.len(), batch.len());
        }
        for ((line, u), r) in batch.iter().zip(results) {
            let error = r["error"].as_str().unwrap_or_default();
            match r["status"].as_str() {
                Some("imported") => imported += 1,
                Some("updated") => updated += 1,
                Some("skipped") => {
                    skipped += 1;
                    eprintln!("{name}:{line}: {error}: skipped (--update changes the password)");
                }
                _ => {
                    failed += 1;
                    eprintln!("{name}:{line}: {}: {error}", u.user);
                }
            }
        }
    }
    let updated = if update { format!(", updated {updated}") } else { String::new() };
    println!("imported {imported}{updated}, skipped {skipped}, failed {failed}");
    if failed > 0 {
        bail!("{failed} line(s) of {name} failed");
    }
    Ok(())
}

/// Where imported messages go: the running server's admin socket (several
/// in flight, answers in order), or the store opened here.
enum MailSink {
    Server {
        write: tokio::net::unix::OwnedWriteHalf,
        read: tokio::io::BufReader<tokio::net::unix::OwnedReadHalf>,
        /// Labels of the messages sent and not answered yet.
        in_flight: std::collections::VecDeque<String>,
    },
    Local {
        store: Arc<LocalStore>,
        session: hamail_server::import::ImportSession,
    },
}

/// Messages sent ahead of the answers: the next ones travel while one commits.
const MAIL_WINDOW: usize = 16;

#[derive(Default)]
struct MailTally {
    imported: u64,
    duplicates: u64,
    oversized: u64,
    failed: u64,
}

impl MailTally {
    fn seen(&self) -> u64 {
        self.imported + self.duplicates + self.oversized + self.failed
    }

    fn count(&mut self, label: &str, outcome: Result<&str, String>) {
        match outcome {
            Ok("duplicate") => self.duplicates += 1,
            Ok(_) => self.imported += 1,
            Err(e) => {
                self.failed += 1;
                eprintln!("{label}: {e}");
            }
        }
        if self.seen().is_multiple_of(1000) {
            eprintln!("... {} messages: {} imported, {} already there", self.seen(), self.imported, self.duplicates);
        }
    }
}

impl MailSink {
    async fn open(config: &Config, user: &str) -> Result<MailSink> {
        let known = admin(config, Request::UserList).await?;
        if !known.data.as_array().into_iter().flatten().any(|u| u["user"].as_str() == Some(user)) {
            bail!("no user {user}: add it first (hamail user add or hamail user import)");
        }
        let socket = config.admin_socket();
        match tokio::net::UnixStream::connect(&socket).await {
            Ok(stream) => {
                let (r, w) = stream.into_split();
                Ok(MailSink::Server {
                    write: w,
                    read: tokio::io::BufReader::new(r),
                    in_flight: std::collections::VecDeque::new(),
                })
            }
            Err(_) => {
                let store = LocalStore::open(&config.store_dir(), config.store_options()?)
                    .with_context(|| format!("opening the store in {}", config.store_dir().display()))?;
                Ok(MailSink::Local { store, session: Default::default() })
            }
        }
    }

    async fn send(
        &mut self,
        user: &str,
        label: String,
        return_path: Option<String>,
        message: &[u8],
        tally: &mut MailTally,
    ) -> Result<()> {
        match self {
            MailSink::Server { write, in_flight, .. } => {
                use tokio::io::AsyncWriteExt;
                let request = Request::MailImport { user: user.to_string(), return_path, size: message.len() as u64 };
                let mut line = serde_json::to_string(&request)?;
                line.push('\n');
                write.write_all(line.as_bytes()).await?;
                write.write_all(message).await?;
                in_flight.push_back(label);
                if in_flight.len() >= MAIL_WINDOW {
                    self.answer(tally).await?;
                }
            }
            MailSink::Local { store, session } => {
                let outcome = import_here(store, session, user, return_path, message).await;
                tally.count(&label, outcome.as_deref().map_err(|e| e.to_string()));
            }
        }
        Ok(())
    }

    /// Reads the answer to the oldest message in flight.
    async fn answer(&mut self, tally: &mut MailTally) -> Result<()> {
        let MailSink::Server { read, in_flight, .. } = self else { return Ok(()) };
        let Some(label) = in_flight.pop_front() else { return Ok(()) };
        use tokio::io::AsyncBufReadExt;
        let mut line = String::new();
        read.read_line(&mut line).await?;
        if line.is_empty() {
            bail!("the server closed the admin socket during the import");
        }
        let response: Response = serde_json::from_str(&line).context("malformed answer from the server")?;
        let status = response.data["status"].as_str().unwrap_or_default().to_string();
        if response.ok {
            tally.count(&label, Ok(&status));
        } else {
            tally.count(&label, Err(response.error.unwrap_or_else(|| "failed".into())));
        }
        Ok(())
    }

    async fn finish(&mut self, tally: &mut MailTally) -> Result<()> {
        while matches!(self, MailSink::Server { in_flight, .. } if !in_flight.is_empty()) {
            self.answer(tally).await?;
        }
        Ok(())
    }
}

/// One message into the store opened by this process (no server runs):
/// the same steps as the server's.
async fn import_here(
    store: &Arc<LocalStore>,
    session: &mut hamail_server::import::ImportSession,
    user: &str,
    return_path: Option<String>,
    message: &[u8],
) -> Result<&'static str, hamail_store::StoreError> {
    use hamail_server::import::{deliver, Admission, MessageBody};
    use hamail_store::{Address, MailStore};
    let user = Address::parse(user)?;
    let mut body = MessageBody::new(store.spool(128 * 1024));
    body.append(message)?;
    let (body, own) = body.finish()?;
    let return_path = own.unwrap_or(return_path);
    match session.admit(store.as_ref(), store.as_ref(), &user, &body).await? {
        Admission::Duplicate => Ok("duplicate"),
        Admission::New => deliver(store.as_ref(), &user, return_path, body).await.map(|_| "imported"),
    }
}

/// `hamail import mbox|maildir`: progress on standard error every 1000
/// messages, a summary at the end, exit status 1 if a message failed.
async fn import_mail(config: &Config, cmd: ImportCmd) -> Result<()> {
    use hamail_server::import::{maildir_listing, MboxFormat, MboxItem, MboxReader};
    let max = config.smtp.max_message_size;
    let mut tally = MailTally::default();
    let oversized = |tally: &mut MailTally, label: &str, size: u64| {
        tally.oversized += 1;
        eprintln!("{label}: {size} bytes, over the size limit of {max} ([smtp] max_message_size): skipped");
    };
    let started = std::time::Instant::now();
    let mut folders_left = Vec::new();
    let user = match &cmd {
        ImportCmd::Mbox { user, .. } | ImportCmd::Maildir { user, .. } => user.clone(),
    };
    let mut sink = MailSink::open(config, &user).await?;
    match cmd {
        ImportCmd::Mbox { path, format, .. } => {
            let file = std::fs::File::open(&path).with_context(|| format!("opening {}", path.display()))?;
            let format = match format {
                MboxFlavour::Mboxrd => MboxFormat::Mboxrd,
                MboxFlavour::Mboxo => MboxFormat::Mboxo,
            };
            let mut reader = MboxReader::new(std::io::BufReader::with_capacity(64 * 1024, file), format);
            let mut n = 0u64;
            while let Some(item) = reader.next_message(max).with_context(|| format!("reading {}", path.display()))? {
                n += 1;
                let label = format!("{}: message {n}", path.display());
                match item {
                    MboxItem::Message { sender, bytes } => sink.send(&user, label, sender, &bytes, &mut tally).await?,
                    MboxItem::Oversized { size, .. } => oversized(&mut tally, &label, size),
                }
            }
        }
        ImportCmd::Maildir { path, all_folders, .. } => {
            let listing = maildir_listing(&path, all_folders).with_context(|| format!("reading {}", path.display()))?;
            for file in &listing.files {
                let label = file.display().to_string();
                let size = std::fs::metadata(file).with_context(|| format!("reading {label}"))?.len();
                if size > max as u64 {
                    oversized(&mut tally, &label, size);
                    continue;
                }
                let bytes = std::fs::read(file).with_context(|| format!("reading {label}"))?;
                sink.send(&user, label, None, &bytes, &mut tally).await?;
            }
            folders_left = listing.skipped_folders;
        }
    }
    sink.finish(&mut tally).await?;
    let secs = started.elapsed().as_secs_f64();
    println!(
        "imported {}, already there {}, skipped {} (over the size limit), failed {} in {secs:.1} s",
        tally.imported, tally.duplicates, tally.oversized, tally.failed
    );
    for (name, count) in &folders_left {
        println!("folder {name} ({count} messages) not imported: --all-folders imports every folder into the maildrop");
    }
    if tally.failed > 0 {
        bail!("{} message(s) failed", tally.failed);
    }
    Ok(())
}

/// The `[[group]]` tables of a groups file; errors name the file and line.
fn read_groups(path: &Path) -> Result<Vec<hamail_cluster::groups::GroupSpec>> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct GroupsFile {
        #[serde(default)]
        group: Vec<hamail_cluster::groups::GroupSpec>,
    }
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let parsed: GroupsFile = toml::from_str(&text).map_err(|e| {
        let line = e.span().map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1);
        anyhow::anyhow!("{}{}: {}", path.display(), line.map(|l| format!(":{l}")).unwrap_or_default(), e.message())
    })?;
    if parsed.group.is_empty() {
        bail!("{}: no [[group]] table", path.display());
    }
    for g in &parsed.group {
        use hamail_cluster::groups::ResourceSpec;
        let first = |f: fn(&ResourceSpec) -> bool| g.resources.iter().position(f);
        if let (Some(ip), Some(disk)) =
            (first(|r| matches!(r, ResourceSpec::FloatingIp { .. })), first(|r| matches!(r, ResourceSpec::Disk { .. })))
        {
            if ip < disk {
                eprintln!(
                    "hamail: warning: {}: group `{}` starts its floating address before its disk: clients reach \
                     the address (and are refused) while the disk is checked and mounted; list the disk first",
                    path.display(),
                    g.name
                );
            }
        }
        let scripts: std::time::Duration =
            g.resources.iter().filter_map(hamail_cluster::groups::ResourceSpec::stop_time).sum();
        if let Some(ms) = g.stop_timeout_ms.filter(|ms| u128::from(*ms) < scripts.as_millis()) {
            eprintln!(
                "hamail: warning: {}: group `{}` has stop_timeout_ms = {ms}, less than its scripts' timeout_secs \
                 ({} s in all): a stop script may be killed before its own timeout",
                path.display(),
                g.name,
                scripts.as_secs()
            );
        }
    }
    Ok(parsed.group)
}

fn read_password(user: &str) -> Result<String> {
    if std::io::stdin().is_terminal() {
        let first = rpassword::prompt_password(format!("Password for {user}: "))?;
        let second = rpassword::prompt_password("Again: ")?;
        if first != second {
            bail!("the two passwords differ");
        }
        Ok(first)
    } else {
        let mut line = String::new();
        std::io::stdin().lock().read_line(&mut line)?;
        let p = line.trim_end_matches(['\r', '\n']).to_string();
        if p.is_empty() {
            bail!("no password on standard input (one line expected)");
        }
        Ok(p)
    }
}

fn print_response(request: &Request, response: Response, json: bool) -> Result<()> {
    if !response.ok {
        bail!("{}", response.error.unwrap_or_else(|| "failed".into()));
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&response.data)?);
        return Ok(());
    }
    let d = &response.data;
    let s = |v: &Value| v.as_str().unwrap_or_default().to_string();
    match request {
        Request::DomainList => {
            for x in d.as_array().into_iter().flatten() {
                println!("{}", s(x));
            }
        }
        Request::UserList => {
            for x in d.as_array().into_iter().flatten() {
                println!("{:<40} {:>6} msgs {:>12} bytes", s(&x["user"]), x["messages"], x["bytes"]);
            }
        }
        Request::AliasList => {
            for x in d.as_array().into_iter().flatten() {
                let t: Vec<String> = x["targets"].as_array().into_iter().flatten().map(s).collect();
                println!("{} -> {}", s(&x["alias"]), t.join(", "));
            }
        }
        Request::QueueList => {
            let items = d.as_array().cloned().unwrap_or_default();
            if items.is_empty() {
                println!("Mail queue is empty");
            }
            let now =
                std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
            let mut bytes = 0u64;
            for x in &items {
                bytes += x["size"].as_u64().unwrap_or(0);
                let hold = if x["hold"].as_bool() == Some(true) { "!" } else { " " };
                println!(
                    "{}{hold} {:>9}  {}  <{}>",
                    s(&x["queue_id"]),
                    x["size"],
                    ago(now, x["queued_at"].as_u64()),
                    s(&x["from"])
                );
                for r in x["recipients"].as_array().into_iter().flatten() {
                    let status = s(&r["status"]);
                    let next = match (status.as_str(), r["next_attempt"].as_u64()) {
                        ("pending", Some(t)) if t > now => format!(" next attempt in {}s", t - now),
                        ("pending", _) => " due now".to_string(),
                        _ => String::new(),
                    };
                    println!("        {:<40} {status} attempts={}{next}", s(&r["address"]), r["attempts"]);
                    if let Some(e) = r["last_error"].as_str() {
                        println!("            ({e})");
                    }
                }
            }
            if !items.is_empty() {
                println!("-- {} Kbytes in {} message(s) ('!': held)", bytes.div_ceil(1024), items.len());
            }
        }
        Request::QueueShow { .. } => {
            println!(
                "queue id: {}  from: <{}>  size: {}  hold: {}",
                s(&d["queue_id"]),
                s(&d["from"]),
                d["size"],
                d["hold"]
            );
            for r in d["recipients"].as_array().into_iter().flatten() {
                println!(
                    "recipient: {} {} attempts={} next_attempt={} {}",
                    s(&r["address"]),
                    s(&r["status"]),
                    r["attempts"],
                    r["next_attempt"],
                    r["last_error"].as_str().unwrap_or("")
                );
            }
            println!();
            print!("{}", s(&d["message"]));
        }
        Request::Queue { command, .. } => println!("{command}: {} message(s)", d["changed"]),
        Request::Status => {
            if let Some(map) = d.as_object() {
                for (k, v) in map {
                    println!("{k:<20} {v}");
                }
            }
        }
        Request::ClusterInit => {
            println!("this node is now node 1 of a new cluster. To add a node, run on it:");
            println!("    hamail cluster join {}", s(&d["token"]));
            println!("(the token contains the cluster secret: keep it like a password)");
        }
        Request::ClusterJoin { .. } => println!("joined the cluster as node {}", d["node_id"]),
        Request::ClusterRemove { node } => println!("node {node} removed from the cluster"),
        Request::GroupApply { groups } => println!("{} group(s) applied", groups.len()),
        Request::Group { .. } => println!("{}", s(&d["message"])),
        Request::NodeStop { .. } => {
            for m in d.as_array().into_iter().flatten() {
                match m["to"].as_u64() {
                    Some(n) => println!("group {} moves to node {n}", s(&m["group"])),
                    None => println!("group {} stopped (no other node)", s(&m["group"])),
                }
            }
        }
        Request::GroupStatus => {
            println!("{:<16} {:>6} {:<10} {:<12} {:>6}  nodes", "group", "owner", "state", "target", "epoch");
            let mut lost_owner = false;
            for g in d.as_array().into_iter().flatten() {
                let p = &g["placement"];
                let nodes: Vec<String> =
                    g["spec"]["nodes"].as_array().into_iter().flatten().map(|n| n.to_string()).collect();
                let opt =
                    |v: &Value| if v.is_null() { "-".to_string() } else { v.to_string().trim_matches('"').to_string() };
                // An owner the cluster has lost: its group is only as
                // online as the owner was when last heard from.
                let state = if g["owner_silent"] == true { format!("{}?", opt(&p["state"])) } else { opt(&p["state"]) };
                println!(
                    "{:<16} {:>6} {:<10} {:<12} {:>6}  {}",
                    s(&g["spec"]["name"]),
                    opt(&p["owner"]),
                    state,
                    opt(&p["target"]),
                    opt(&p["epoch"]),
                    nodes.join(",")
                );
                lost_owner |= g["owner_silent"] == true;
            }
            if lost_owner {
                println!("?: its owner does not answer the cluster; the group moves once its stop budget has passed");
            }
        }
        Request::LogShow { .. } => {
            for e in d.as_array().into_iter().flatten() {
                let secs = e["at_ms"].as_u64().unwrap_or(0) / 1000;
                let what = [e["group"].as_str(), e["resource"].as_str()]
                    .iter()
                    .flatten()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join("/");
                println!("{secs} node{} {:?} {} {}", e["node"], e["kind"].as_str().unwrap_or(""), what, s(&e["text"]));
            }
        }
        Request::LogWrite { .. } => {}
        Request::StoreVerify => {
            let mut bad = false;
            for r in d.as_array().into_iter().flatten() {
                if let Some(e) = r["error"].as_str() {
                    bad = true;
                    println!("node {}: verify failed: {e}", r["node"]);
                    continue;
                }
                let unrepaired = r["unrepaired"].as_u64().unwrap_or(0);
                bad |= unrepaired > 0;
                println!(
                    "node {}: {} bodies checked, {} damaged, {} missing, {} repaired, {} unrepaired",
                    r["node"], r["checked"], r["damaged"], r["missing"], r["repaired"], unrepaired
                );
            }
            if bad {
                bail!("some bodies could not be verified or repaired");
            }
        }
        Request::ClusterStatus => {
            println!(
                "{:>4}  {:<16} {:<22} {:<8} {:<10} {:>6} {:>6} {:>8} {:>8} {:>6} {:>9} {:>4} {:>8} {:>7} {:>8} {:>8} {:>8} {:>8} {:>9}  health",
                "id",
                "name",
                "address",
                "role",
                "state",
                "term",
                "leader",
                "last_log",
                "applied",
                "lag",
                "contact",
                "link",
                "rpc_fail",
                "changes",
                "missing",
                "degraded",
                "refused",
                "fetched",
                "collected"
            );
            let opt = |v: &Value| if v.is_null() { "-".to_string() } else { v.to_string() };
            for m in d.as_array().into_iter().flatten() {
                let healthy = m["healthy"].as_bool().unwrap_or(false);
                let contact =
                    if m["last_contact_ms"].is_null() { "-".into() } else { format!("{}ms", m["last_contact_ms"]) };
                println!(
                    "{:>4}  {:<16} {:<22} {:<8} {:<10} {:>6} {:>6} {:>8} {:>8} {:>6} {:>9} {:>4} {:>8} {:>7} {:>8} {:>8} {:>8} {:>8} {:>9}  {}",
                    opt(&m["id"]),
                    s(&m["name"]),
                    s(&m["addr"]),
                    s(&m["role"]),
                    s(&m["state"]).chars().take(10).collect::<String>(),
                    opt(&m["term"]),
                    opt(&m["leader"]),
                    opt(&m["last_log_index"]),
                    opt(&m["last_applied"]),
                    opt(&m["lag"]),
                    contact,
                    m["link"].as_str().unwrap_or("-"),
                    opt(&m["rpc_failures"]),
                    opt(&m["link_changes"]),
                    opt(&m["bodies_missing"]),
                    opt(&m["degraded_accepts"]),
                    opt(&m["refused_unavailable"]),
                    opt(&m["bodies_fetched"]),
                    opt(&m["bodies_collected"]),
                    if healthy { "ok".to_string() } else { s(&m["state"]) }
                );
            }
        }
        Request::DomainAdd { domain } => println!("domain {domain} added"),
        Request::DomainDel { domain } => println!("domain {domain} removed"),
        Request::UserAdd { user, .. } => println!("user {user} added"),
        Request::UserPasswd { user, .. } => println!("password of {user} changed"),
        Request::UserDel { user } => println!("user {user} removed"),
        Request::UserImport { .. } | Request::MailImport { .. } => {}
        Request::AliasAdd { alias, .. } => println!("alias {alias} added"),
        Request::AliasDel { alias } => println!("alias {alias} removed"),
        Request::BanList => {
            let bans = d.as_array().cloned().unwrap_or_default();
            if bans.is_empty() {
                println!("no bans");
            }
            for b in &bans {
                let left = b["remaining_secs"].as_u64().unwrap_or(0);
                println!(
                    "{:<8} {:<40} {:>4}m{:02}s left  ({} failed logins)",
                    s(&b["kind"]),
                    s(&b["target"]),
                    left / 60,
                    left % 60,
                    b["failures"]
                );
            }
        }
        Request::BanDel { .. } => println!("ban on {} lifted", s(&d["lifted"])),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use tracing_subscriber::layer::SubscriberExt as _;

    use super::log_filter;

    /// What the log shows of openraft's per-call lines, one of its fatal
    /// errors and a line of ours, with `configured` as `HAMAIL_LOG`.
    fn logged(configured: Option<&str>) -> String {
        let out = Arc::new(Mutex::new(Vec::<u8>::new()));
        let sink = out.clone();
        let writer = move || Sink(sink.clone());
        let layer = tracing_subscriber::fmt::layer().with_ansi(false).with_writer(writer);
        let subscriber = tracing_subscriber::registry().with(log_filter(configured, layer));
        tracing::subscriber::with_default(subscriber, || {
            tracing::error!(target: "openraft::replication", err = "timeout after 50ms", "RPCError");
            tracing::warn!(target: "openraft::replication", error = "timeout", "error replication to target=3");
            tracing::warn!(target: "openraft::engine::handler::replication_handler", "heartbeat error: x");
            tracing::error!(target: "openraft::core::raft_core", { target = 3, error = "timeout" }, "while requesting vote");
            tracing::error!(target: "openraft::core::raft_core", error = "storage", "quit RaftCore::main on error");
            tracing::info!(target: "openraft::core::raft_core", "do trigger election");
            tracing::warn!(target: "hamail_cluster::network", "node 3 unreachable: connect: refused");
        });
        let text = String::from_utf8(out.lock().unwrap().clone()).unwrap();
        text
    }

    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn the_default_filter_drops_openraft_per_call_lines_only() {
        let log = logged(None);
        for gone in ["RPCError", "error replication", "heartbeat error", "while requesting vote"] {
            assert!(!log.contains(gone), "`{gone}` logged:\n{log}");
        }
        for kept in ["quit RaftCore::main on error", "do trigger election", "node 3 unreachable"] {
            assert!(log.contains(kept), "`{kept}` not logged:\n{log}");
        }
    }

    #[test]
    fn a_configured_filter_shows_them_again() {
        let log = logged(Some("info"));
        for line in ["RPCError", "error replication", "heartbeat error", "while requesting vote", "quit RaftCore"] {
            assert!(log.contains(line), "`{line}` not logged:\n{log}");
        }
        let log = logged(Some("warn,openraft::replication=off"));
        assert!(!log.contains("RPCError") && log.contains("while requesting vote"), "{log}");
        assert!(!log.contains("do trigger election"), "{log}");
    }
}
