//! `hamail-bench cluster`: a cluster of real `hamail` processes on loopback.
//!
//! It measures:
//!
//! * **election time** after SIGKILL of the leader: the time until a
//!   survivor reports a new leader (its `cluster_status`, polled every
//!   `--poll-ms`), and the time until the first write (`domain_add`) on that
//!   survivor succeeds (the write outage). The killed node is then
//!   restarted and caught up before the next run;
//! * **commit latency and throughput** of small control-plane writes
//!   (`domain_add`: one Raft entry each), sent to the leader's admin socket
//!   and to a follower's (which forwards them), at each `--concurrency`, with
//!   the machine idle and then with one core kept busy by a spinning thread.
//!
//! Every request goes straight to the nodes' admin sockets (one JSON line
//! each way), so no process start-up is measured.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _, Result};
use clap::Args;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;
use tokio::process::{Child, Command};

use crate::server::Banner;
use crate::{find_hamail, log, procfs, toml_str};

#[derive(Args, Debug, Clone)]
pub struct ClusterArgs {
    /// The hamail binary [default: `hamail` next to this executable].
    #[arg(long)]
    pub hamail: Option<PathBuf>,
    /// Directory in which the temporary cluster directory is made (keep it
    /// on a real disk: every write fsyncs the Raft log) [default: .].
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Keep the cluster's directory (configs, data, logs) at the end.
    #[arg(long)]
    pub keep: bool,
    /// Members of the cluster (at least 3).
    #[arg(long, default_value_t = 3)]
    pub nodes: usize,
    /// The last member is a witness (votes, holds the log, no mail data):
    /// with --nodes 3, two data nodes and a witness.
    #[arg(long)]
    pub witness: bool,
    /// Leader kills (election measurements); 0 skips them.
    #[arg(long, default_value_t = 10)]
    pub runs: usize,
    /// Writes (domain_add) per write cell; 0 skips the write cells.
    #[arg(long, default_value_t = 500)]
    pub writes: usize,
    /// Concurrent writers (one admin connection each) of the write cells.
    #[arg(long, value_delimiter = ',', default_value = "1,10")]
    pub concurrency: Vec<usize>,
    /// Skip the write cells with the other core busy.
    #[arg(long)]
    pub no_busy: bool,
    /// [cluster] heartbeat_ms of every node.
    #[arg(long, default_value_t = 50)]
    pub heartbeat_ms: u64,
    /// [cluster] election_timeout_min_ms of every node.
    #[arg(long, default_value_t = 150)]
    pub election_min_ms: u64,
    /// [cluster] election_timeout_max_ms of every node.
    #[arg(long, default_value_t = 300)]
    pub election_max_ms: u64,
    /// Polling interval of the survivor's status after a kill, ms.
    #[arg(long, default_value_t = 5)]
    pub poll_ms: u64,
}

/// One admin-socket connection: one JSON request line, one JSON answer line.
pub(crate) struct AdminConn {
    lines: Lines<BufReader<OwnedReadHalf>>,
    writer: OwnedWriteHalf,
}

impl AdminConn {
    pub(crate) async fn connect(path: &Path) -> Result<AdminConn> {
        let stream = UnixStream::connect(path).await.with_context(|| format!("connecting to {}", path.display()))?;
        let (r, w) = stream.into_split();
        Ok(AdminConn { lines: BufReader::new(r).lines(), writer: w })
    }

    /// Sends one request; returns the whole answer ({"ok":..., "data":...}).
    pub(crate) async fn call(&mut self, request: &Value, within: Duration) -> Result<Value> {
        let mut line = request.to_string();
        line.push('\n');
        let exchange = async {
            self.writer.write_all(line.as_bytes()).await?;
            let answer = self.lines.next_line().await?.ok_or_else(|| anyhow!("the admin socket closed"))?;
            let v: Value = serde_json::from_str(&answer).with_context(|| format!("bad answer {answer:?}"))?;
            Ok::<Value, anyhow::Error>(v)
        };
        tokio::time::timeout(within, exchange).await.map_err(|_| anyhow!("no answer within {within:?}"))?
    }

    /// A request that must succeed: its `data`.
    pub(crate) async fn ok(&mut self, request: &Value, within: Duration) -> Result<Value> {
        let v = self.call(request, within).await?;
        if v["ok"] != true {
            bail!("{} failed: {}", request["op"], v["error"]);
        }
        Ok(v["data"].clone())
    }
}

/// One member as a node reports it.
#[derive(Debug, Clone)]
pub(crate) struct Member {
    id: u64,
    name: String,
    state: String,
    term: Option<u64>,
    leader: Option<u64>,
    lag: Option<u64>,
    healthy: bool,
}

fn members(data: &Value) -> Result<Vec<Member>> {
    let list = data.as_array().ok_or_else(|| anyhow!("cluster_status: not a list: {data}"))?;
    list.iter()
        .map(|m| {
            Ok(Member {
                id: m["id"].as_u64().ok_or_else(|| anyhow!("member without id: {m}"))?,
                name: m["name"].as_str().unwrap_or_default().to_string(),
                state: m["state"].as_str().unwrap_or_default().to_string(),
                term: m["term"].as_u64(),
                leader: m["leader"].as_u64(),
                lag: m["lag"].as_u64(),
                healthy: m["healthy"] == true,
            })
        })
        .collect()
}

fn status_req() -> Value {
    json!({"op": "cluster_status"})
}

fn domain_req(domain: &str) -> Value {
    json!({"op": "domain_add", "domain": domain})
}

pub(crate) const CALL: Duration = Duration::from_secs(10);

/// A cluster member's process and files.
pub(crate) struct Node {
    pub(crate) name: String,
    pub(crate) role: &'static str,
    config: PathBuf,
    pub(crate) log: PathBuf,
    pub(crate) socket: PathBuf,
    /// Raft id (from the status, by name) once it is in the cluster.
    id: u64,
    child: Option<Child>,
    pub(crate) pid: u32,
    /// The SMTP / POP3 listeners it announced on stdout.
    pub(crate) smtp: Option<SocketAddr>,
    pub(crate) pop3: Option<SocketAddr>,
}

/// What goes into every node's config besides its name, role and port.
#[derive(Debug, Clone, Copy)]
pub(crate) struct NodeSettings {
    pub(crate) heartbeat_ms: u64,
    pub(crate) election_min_ms: u64,
    pub(crate) election_max_ms: u64,
    /// [smtp] / [pop3] max_connections (None: hamail's default).
    pub(crate) max_connections: Option<usize>,
}

impl From<&ClusterArgs> for NodeSettings {
    fn from(a: &ClusterArgs) -> Self {
        NodeSettings {
            heartbeat_ms: a.heartbeat_ms,
            election_min_ms: a.election_min_ms,
            election_max_ms: a.election_max_ms,
            max_connections: None,
        }
    }
}

impl Node {
    pub(crate) fn new(
        root: &Path,
        name: &str,
        role: &'static str,
        cluster_port: u16,
        settings: NodeSettings,
    ) -> Result<Node> {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let data = dir.join("data");
        let mut socket = data.join("admin.sock");
        // Unix socket paths are limited to ~108 bytes.
        let admin = if socket.as_os_str().len() > 100 {
            socket = std::env::temp_dir().join(format!("hamail-bench-{}-{name}.sock", std::process::id()));
            format!("\n[admin]\nsocket = {}\n", toml_str(&socket.to_string_lossy()))
        } else {
            String::new()
        };
        let limit = settings.max_connections.map(|n| format!("max_connections = {n}\n")).unwrap_or_default();
        let text = format!(
            "[server]\nhostname = {}\ndata_dir = {}\n\n\
             [smtp]\nlisten = [\"127.0.0.1:0\"]\nsubmission = [\"127.0.0.1:0\"]\n{limit}\n\
             [pop3]\nlisten = [\"127.0.0.1:0\"]\n{limit}\n\
             [cluster]\nlisten = \"127.0.0.1:{cluster_port}\"\nrole = \"{role}\"\n\
             heartbeat_ms = {}\nelection_timeout_min_ms = {}\nelection_timeout_max_ms = {}\n{admin}",
            toml_str(name),
            toml_str(&data.to_string_lossy()),
            settings.heartbeat_ms,
            settings.election_min_ms,
            settings.election_max_ms,
        );
        let config = dir.join("hamail.toml");
        std::fs::write(&config, text).with_context(|| format!("writing {}", config.display()))?;
        Ok(Node {
            name: name.to_string(),
            role,
            config,
            log: dir.join("server.log"),
            socket,
            id: 0,
            child: None,
            pid: 0,
            smtp: None,
            pop3: None,
        })
    }

    /// Starts `hamail serve` (stderr appended to server.log) and waits for
    /// its `ready` line.
    async fn start(&mut self, hamail: &Path) -> Result<()> {
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("opening {}", self.log.display()))?;
        let mut child = Command::new(hamail)
            .arg("--config")
            .arg(&self.config)
            .arg("serve")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log_file))
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", hamail.display()))?;
        let pid = child.id().context("the node exited at once")?;
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
        match tokio::time::timeout(Duration::from_secs(120), wait).await {
            Ok(Ok(true)) => {}
            Ok(Ok(false)) => bail!("{} exited before it was ready; see {}", self.name, self.log.display()),
            Ok(Err(e)) => bail!("reading {}'s stdout: {e}", self.name),
            Err(_) => bail!("{} was not ready after 120 s; see {}", self.name, self.log.display()),
        }
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        if let Some(s) = banner.admin_socket {
            self.socket = s;
        }
        self.smtp = banner.smtp;
        self.pop3 = banner.pop3;
        self.child = Some(child);
        self.pid = pid;
        Ok(())
    }

    /// SIGKILL; returns once the kill is sent (the instant measured from).
    fn kill(&mut self) -> Result<Option<Child>> {
        match self.child.take() {
            Some(mut c) => {
                c.start_kill().with_context(|| format!("killing {}", self.name))?;
                Ok(Some(c))
            }
            None => Ok(None),
        }
    }

    async fn kill_and_wait(&mut self) {
        if let Ok(Some(mut c)) = self.kill() {
            let _ = tokio::time::timeout(Duration::from_secs(10), c.wait()).await;
        }
    }

    /// True if the node was started and its process has exited since.
    pub(crate) fn exited(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| !matches!(c.try_wait(), Ok(None)))
    }

    pub(crate) fn running(&self) -> bool {
        self.child.is_some()
    }

    pub(crate) async fn conn(&self) -> Result<AdminConn> {
        AdminConn::connect(&self.socket).await.with_context(|| format!("admin socket of {}", self.name))
    }

    async fn status(&self) -> Result<Vec<Member>> {
        let mut c = self.conn().await?;
        members(&c.ok(&status_req(), CALL).await?)
    }
}

pub(crate) struct Cluster {
    pub(crate) nodes: Vec<Node>,
    pub(crate) hamail: PathBuf,
}

impl Cluster {
    fn by_id(&self, id: u64) -> Option<usize> {
        self.nodes.iter().position(|n| n.id == id)
    }

    /// The leader and its term, as the first running node that knows sees it.
    pub(crate) async fn leader(&self) -> Result<(usize, u64)> {
        let mut last = anyhow!("no running node");
        for n in self.nodes.iter().filter(|n| n.running()) {
            match n.status().await {
                Ok(st) => {
                    let me = st.iter().find(|m| m.name == n.name);
                    if let Some(l) = me.and_then(|m| m.leader) {
                        let term =
                            st.iter().find(|m| m.id == l).and_then(|m| m.term).or(me.and_then(|m| m.term)).unwrap_or(0);
                        if let Some(i) = self.by_id(l) {
                            return Ok((i, term));
                        }
                    }
                    last = anyhow!("{} knows no leader", n.name);
                }
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// Waits until every member is healthy with lag 0 (as the leader sees
    /// it); returns the status.
    pub(crate) async fn wait_healthy(&self, within: Duration) -> Result<Vec<Member>> {
        let t = Instant::now();
        let mut last = String::from("no status yet");
        while t.elapsed() < within {
            for n in self.nodes.iter().filter(|n| n.running()) {
                match n.status().await {
                    Ok(st) => {
                        if st.len() == self.nodes.len() && st.iter().all(|m| m.healthy && m.lag == Some(0)) {
                            return Ok(st);
                        }
                        last = st
                            .iter()
                            .map(|m| {
                                format!(
                                    "{}: {} leader={:?} lag={:?} healthy={}",
                                    m.name, m.state, m.leader, m.lag, m.healthy
                                )
                            })
                            .collect::<Vec<_>>()
                            .join("; ");
                        break;
                    }
                    Err(e) => last = format!("{e:#}"),
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        bail!("the cluster was not healthy with lag 0 within {within:?}; last status: {last}")
    }

    pub(crate) async fn stop_all(&mut self) {
        for n in &mut self.nodes {
            n.kill_and_wait().await;
        }
    }

    /// Starts every node, runs `cluster_init` on the first and
    /// `cluster_join` on the others, and waits until every member is healthy
    /// with lag 0.
    pub(crate) async fn form(&mut self) -> Result<()> {
        let t = Instant::now();
        let hamail = self.hamail.clone();
        for n in &mut self.nodes {
            n.start(&hamail).await?;
        }
        let token = {
            let mut c = self.nodes[0].conn().await?;
            let d = c.ok(&json!({"op": "cluster_init"}), Duration::from_secs(60)).await?;
            d["token"]
                .as_str()
                .filter(|t| t.starts_with("hamail1-"))
                .ok_or_else(|| anyhow!("cluster_init: no token in {d}"))?
                .to_string()
        };
        for n in &self.nodes[1..] {
            let mut c = n.conn().await?;
            c.ok(&json!({"op": "cluster_join", "token": token}), Duration::from_secs(60))
                .await
                .with_context(|| format!("{} joining", n.name))?;
        }
        let st = self.wait_healthy(Duration::from_secs(60)).await?;
        for n in &mut self.nodes {
            n.id = st
                .iter()
                .find(|m| m.name == n.name)
                .map(|m| m.id)
                .ok_or_else(|| anyhow!("{} is not in the status", n.name))?;
        }
        log(format!(
            "formed a cluster of {} in {:.1} s: {}",
            self.nodes.len(),
            t.elapsed().as_secs_f64(),
            self.nodes
                .iter()
                .map(|n| format!("{}=id{}/{}/pid{}", n.name, n.id, n.role, n.pid))
                .collect::<Vec<_>>()
                .join(" ")
        ));
        Ok(())
    }
}

/// CPU over a window: the nodes, this process, the whole machine.
struct CpuWindow {
    t0: Instant,
    nodes0: u64,
    self0: u64,
    sys0: Option<(u64, u64)>,
    pids: Vec<u32>,
}

#[derive(Debug, Clone, Copy, Default)]
struct CpuUse {
    nodes_pct: f64,
    self_pct: f64,
    other_pct: f64,
}

const TICKS_PER_S: f64 = 100.0;

impl CpuWindow {
    fn start(cluster: &Cluster) -> CpuWindow {
        let pids: Vec<u32> = cluster.nodes.iter().filter(|n| n.running()).map(|n| n.pid).collect();
        CpuWindow {
            t0: Instant::now(),
            nodes0: pids.iter().filter_map(|p| procfs::cpu_ticks(&p.to_string())).sum(),
            self0: procfs::cpu_ticks("self").unwrap_or(0),
            sys0: procfs::machine_ticks(),
            pids,
        }
    }

    fn finish(self) -> CpuUse {
        let wall = self.t0.elapsed().as_secs_f64().max(1e-6);
        let nodes1: u64 = self.pids.iter().filter_map(|p| procfs::cpu_ticks(&p.to_string())).sum();
        let self1 = procfs::cpu_ticks("self").unwrap_or(0);
        let pct = |ticks: u64| ticks as f64 / TICKS_PER_S / wall * 100.0;
        let nodes_pct = pct(nodes1.saturating_sub(self.nodes0));
        let self_pct = pct(self1.saturating_sub(self.self0));
        let busy_pct = match (self.sys0, procfs::machine_ticks()) {
            (Some((t0, b0)), Some((t1, b1))) if t1 > t0 => {
                let cpus = std::thread::available_parallelism().map(|n| n.get() as f64).unwrap_or(1.0);
                (b1 - b0) as f64 / (t1 - t0) as f64 * cpus * 100.0
            }
            _ => 0.0,
        };
        CpuUse { nodes_pct, self_pct, other_pct: (busy_pct - nodes_pct - self_pct).max(0.0) }
    }
}

/// A thread spinning on one core until dropped.
struct Burner {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<u64>>,
}

impl Burner {
    fn start() -> Result<Burner> {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::Builder::new()
            .name("cpu-burner".into())
            .spawn(move || {
                let mut x = 0u64;
                while !s.load(Ordering::Relaxed) {
                    x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
                }
                x
            })
            .context("starting the CPU burner thread")?;
        Ok(Burner { stop, thread: Some(thread) })
    }
}

impl Drop for Burner {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A port for a node's cluster listener, which must be known before the
/// node starts (its peers are configured with it). Taken below the kernel's
/// ephemeral range: a port the kernel hands out for a bind to port 0 (the
/// nodes' SMTP and POP3 listeners, the single node's) could otherwise be
/// given to another process between this check and the node's own bind —
/// seen as a node failing with "Address already in use" at start.
pub(crate) fn free_port() -> Result<u16> {
    use std::hash::{BuildHasher, Hasher};
    let ephemeral_start = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|p| p.parse::<u16>().ok()))
        .unwrap_or(32768);
    const LOW: u16 = 10_000;
    if ephemeral_start > LOW + 1000 {
        for _ in 0..200 {
            let random = std::collections::hash_map::RandomState::new().build_hasher().finish();
            let port = LOW + (random % u64::from(ephemeral_start - LOW)) as u16;
            if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
                return Ok(port);
            }
        }
    }
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(l.local_addr()?.port())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// (median, min, max) of a list.
pub(crate) fn summary(v: &[f64]) -> Option<(f64, f64, f64)> {
    if v.is_empty() {
        return None;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    let median = if n % 2 == 1 { s[n / 2] } else { (s[n / 2 - 1] + s[n / 2]) / 2.0 };
    Some((median, s[0], s[n - 1]))
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (q * sorted.len() as f64).ceil().max(1.0) as usize;
    sorted[rank.min(sorted.len()) - 1]
}

pub async fn run(args: ClusterArgs) -> Result<()> {
    if args.nodes < 3 {
        bail!("--nodes must be at least 3 (a majority has to survive the leader's death)");
    }
    if args.concurrency.contains(&0) {
        bail!("--concurrency must be at least 1");
    }
    if args.heartbeat_ms == 0
        || args.election_min_ms <= 2 * args.heartbeat_ms
        || args.election_max_ms <= args.election_min_ms
    {
        bail!("the timers need heartbeat_ms > 0, election_min_ms > 2 x heartbeat_ms and election_max_ms > election_min_ms");
    }
    let hamail = find_hamail(args.hamail.clone())?;
    if hamail.components().any(|c| c.as_os_str() == "debug") {
        log(format!("warning: {} looks like a debug build", hamail.display()));
    }
    // The machine's load before anything starts.
    let idle = {
        let s0 = procfs::machine_ticks();
        tokio::time::sleep(Duration::from_secs(1)).await;
        match (s0, procfs::machine_ticks()) {
            (Some((t0, b0)), Some((t1, b1))) if t1 > t0 => {
                let cpus = std::thread::available_parallelism().map(|n| n.get() as f64).unwrap_or(1.0);
                (b1 - b0) as f64 / (t1 - t0) as f64 * cpus * 100.0
            }
            _ => 0.0,
        }
    };
    let base = match &args.data_dir {
        Some(d) => d.clone(),
        None => std::env::current_dir()?,
    };
    std::fs::create_dir_all(&base).with_context(|| format!("creating {}", base.display()))?;
    let base = base.canonicalize()?;
    let stamp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let dir = base.join(format!("hamail-bench-cluster-{}-{stamp}", std::process::id()));
    std::fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
    log(format!("cluster directory {} (binary {})", dir.display(), hamail.display()));

    let roles: Vec<&'static str> =
        (0..args.nodes).map(|i| if args.witness && i + 1 == args.nodes { "witness" } else { "data" }).collect();
    let timers = format!(
        "timers heartbeat_ms={} election_timeout_min_ms={} election_timeout_max_ms={} nodes={} roles={} cpus={} machine_busy_before_pct={idle:.0}",
        args.heartbeat_ms,
        args.election_min_ms,
        args.election_max_ms,
        args.nodes,
        roles.join(","),
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
    );
    println!("{timers}");

    let mut cluster = Cluster { nodes: Vec::new(), hamail };
    let outcome = async {
        for (i, role) in roles.iter().enumerate() {
            let node = Node::new(&dir, &format!("node{}", i + 1), role, free_port()?, NodeSettings::from(&args))?;
            cluster.nodes.push(node);
        }
        tokio::select! {
            r = bench(&args, &mut cluster) => r,
            _ = tokio::signal::ctrl_c() => Err(anyhow!("interrupted")),
        }
    }
    .await;
    cluster.stop_all().await;
    if outcome.is_err() {
        for n in &cluster.nodes {
            print_log_tail(&n.log, &n.name);
        }
    }
    if args.keep {
        log(format!("kept {}", dir.display()));
    } else {
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            log(format!("could not remove {}: {e}", dir.display()));
        }
        for n in &cluster.nodes {
            if !n.socket.starts_with(&dir) {
                let _ = std::fs::remove_file(&n.socket);
            }
        }
    }
    let report = outcome?;
    println!();
    println!("{timers}");
    print!("{report}");
    Ok(())
}

pub(crate) fn print_log_tail(path: &Path, name: &str) {
    if let Ok(text) = std::fs::read_to_string(path) {
        let lines: Vec<&str> = text.lines().collect();
        if !lines.is_empty() {
            log(format!("last lines of {name}'s log {}:", path.display()));
            for line in &lines[lines.len().saturating_sub(15)..] {
                eprintln!("    {line}");
            }
        }
    }
}

/// Forms the cluster, then the elections and the write cells. Returns the
/// final summary text.
async fn bench(args: &ClusterArgs, cluster: &mut Cluster) -> Result<String> {
    cluster.form().await?;

    let mut out = String::new();
    let mut spurious_total = 0u64;
    if args.runs > 0 {
        let (text, spurious) = elections(args, cluster).await?;
        out.push_str(&text);
        spurious_total += spurious;
    }
    if args.writes > 0 {
        let (text, spurious) = write_cells(args, cluster).await?;
        out.push_str(&text);
        spurious_total += spurious;
    }
    out.push_str(&format!("unexpected_leader_changes={spurious_total} (terms that moved without a kill)\n"));
    Ok(out)
}

/// Result of one leader kill.
struct Kill {
    elect: Duration,
    outage: Duration,
}

async fn elections(args: &ClusterArgs, cluster: &mut Cluster) -> Result<(String, u64)> {
    let poll = Duration::from_millis(args.poll_ms.max(1));
    let mut kills = Vec::new();
    let mut spurious = 0u64;
    let mut last_term: Option<u64> = None;
    for run in 1..=args.runs {
        cluster.wait_healthy(Duration::from_secs(60)).await?;
        // A quiet second: the term must not move.
        let (_, t_a) = cluster.leader().await?;
        if let Some(t) = last_term.filter(|&t| t != t_a) {
            log(format!(
                "run {run}: the term moved from {t} to {t_a} while the cluster was quiet (restart / catch-up)"
            ));
            spurious += t_a - t;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let (li, term0) = cluster.leader().await?;
        if term0 != t_a {
            log(format!("run {run}: the term moved from {t_a} to {term0} in a quiet 0.5 s"));
            spurious += term0 - t_a;
        }
        let killed = li;
        let killed_id = cluster.nodes[killed].id;
        // The survivor polled and written to: the first data node still up.
        let si = (0..cluster.nodes.len())
            .find(|&i| i != killed && cluster.nodes[i].role == "data")
            .ok_or_else(|| anyhow!("no surviving data node"))?;
        let survivor_name = cluster.nodes[si].name.clone();
        let mut status_conn = cluster.nodes[si].conn().await?;
        let mut write_conn = cluster.nodes[si].conn().await?;

        let t0 = Instant::now();
        let dead = cluster.nodes[killed].kill()?;
        // New leader, seen by the survivor.
        let watch = async {
            loop {
                if let Ok(v) = status_conn.call(&status_req(), CALL).await {
                    if v["ok"] == true {
                        if let Ok(st) = members(&v["data"]) {
                            let me = st.iter().find(|m| m.name == survivor_name);
                            if let Some(l) = me.and_then(|m| m.leader).filter(|&l| l != killed_id) {
                                let term = me.and_then(|m| m.term).unwrap_or(0);
                                return Ok::<_, anyhow::Error>((t0.elapsed(), l, term));
                            }
                        }
                    }
                }
                if t0.elapsed() > Duration::from_secs(60) {
                    bail!("no new leader 60 s after the kill");
                }
                tokio::time::sleep(poll).await;
            }
        };
        // First successful write on the survivor.
        let write = async {
            let mut attempts = 0u32;
            loop {
                attempts += 1;
                let domain = format!("kill{run}-{attempts}.bench.test");
                match write_conn.call(&domain_req(&domain), CALL).await {
                    Ok(v) if v["ok"] == true => return Ok::<_, anyhow::Error>((t0.elapsed(), attempts)),
                    _ => {}
                }
                if t0.elapsed() > Duration::from_secs(60) {
                    bail!("no successful write 60 s after the kill");
                }
                tokio::time::sleep(poll).await;
            }
        };
        let ((elect, new_id, term1), (outage, attempts)) = tokio::try_join!(watch, write)?;
        if let Some(mut c) = dead {
            let _ = tokio::time::timeout(Duration::from_secs(10), c.wait()).await;
        }
        let new_name =
            cluster.by_id(new_id).map(|i| cluster.nodes[i].name.clone()).unwrap_or_else(|| format!("id{new_id}"));
        // Restart the killed node and wait until it has caught up.
        let tr = Instant::now();
        let hamail = cluster.hamail.clone();
        cluster.nodes[killed].start(&hamail).await?;
        cluster.wait_healthy(Duration::from_secs(60)).await?;
        let rejoin = tr.elapsed();
        let (_, term2) = cluster.leader().await?;
        if term2 != term1 {
            log(format!(
                "run {run}: the term moved from {term1} to {term2} while {} rejoined",
                cluster.nodes[killed].name
            ));
            spurious += term2.saturating_sub(term1);
        }
        last_term = Some(term2);
        println!(
            "test=election run={run} killed={} survivor={survivor_name} new_leader={new_name} term_before={term0} term_after={term1} \
             elect_ms={:.1} write_outage_ms={:.1} write_attempts={attempts} restart_catchup_ms={:.0}",
            cluster.nodes[killed].name,
            ms(elect),
            ms(outage),
            ms(rejoin)
        );
        kills.push(Kill { elect, outage });
    }
    let e: Vec<f64> = kills.iter().map(|k| ms(k.elect)).collect();
    let o: Vec<f64> = kills.iter().map(|k| ms(k.outage)).collect();
    let mut text = String::new();
    if let (Some((em, emin, emax)), Some((om, omin, omax))) = (summary(&e), summary(&o)) {
        let line = format!(
            "test=election_summary runs={} elect_ms_median={em:.1} elect_ms_min={emin:.1} elect_ms_max={emax:.1} \
             write_outage_ms_median={om:.1} write_outage_ms_min={omin:.1} write_outage_ms_max={omax:.1} spurious_term_changes={spurious}",
            kills.len()
        );
        println!("{line}");
        text.push_str(&format!(
            "\nleader kill (SIGKILL), {} runs     median      min      max  (ms)\n\
             new leader seen by a survivor  {em:>8.1} {emin:>8.1} {emax:>8.1}\n\
             first write ok on a survivor   {om:>8.1} {omin:>8.1} {omax:>8.1}\n",
            kills.len()
        ));
    }
    Ok((text, spurious))
}

/// One write cell's figures.
struct WriteCell {
    load: &'static str,
    target: &'static str,
    conc: usize,
    ok: usize,
    errors: usize,
    secs: f64,
    p50: f64,
    p99: f64,
    max: f64,
    term_moves: u64,
    cpu: CpuUse,
}

async fn write_cells(args: &ClusterArgs, cluster: &Cluster) -> Result<(String, u64)> {
    cluster.wait_healthy(Duration::from_secs(60)).await?;
    let mut cells = Vec::new();
    let mut k = 0usize;
    let loads: &[&'static str] = if args.no_busy { &["idle"] } else { &["idle", "busy"] };
    for &load in loads {
        let burner = if load == "busy" { Some(Burner::start()?) } else { None };
        if burner.is_some() {
            // Let the scheduler settle with the spinning thread.
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        for target in ["leader", "follower"] {
            for &conc in &args.concurrency {
                k += 1;
                let (li, term0) = cluster.leader().await?;
                let ti = if target == "leader" {
                    li
                } else {
                    (0..cluster.nodes.len())
                        .find(|&i| i != li && cluster.nodes[i].role == "data")
                        .ok_or_else(|| anyhow!("no data follower"))?
                };
                let socket = cluster.nodes[ti].socket.clone();
                let cpu = CpuWindow::start(cluster);
                let (lat, errors, secs) = write_load(&socket, k, args.writes, conc).await?;
                let cpu = cpu.finish();
                let (_, term1) = cluster.leader().await?;
                let term_moves = term1.saturating_sub(term0);
                let mut sorted = lat;
                sorted.sort_by(f64::total_cmp);
                let cell = WriteCell {
                    load,
                    target,
                    conc,
                    ok: sorted.len(),
                    errors,
                    secs,
                    p50: percentile(&sorted, 0.5),
                    p99: percentile(&sorted, 0.99),
                    max: sorted.last().copied().unwrap_or(0.0),
                    term_moves,
                    cpu,
                };
                println!(
                    "test=writes load={load} target={target} node={} conc={conc} writes={} ok={} errors={errors} secs={secs:.3} \
                     writes_per_s={:.1} p50_ms={:.2} p99_ms={:.2} max_ms={:.2} term_moves={term_moves} nodes_cpu_pct={:.0} \
                     bench_cpu_pct={:.0} other_cpu_pct={:.0}",
                    cluster.nodes[ti].name,
                    args.writes,
                    cell.ok,
                    cell.ok as f64 / secs.max(1e-9),
                    cell.p50,
                    cell.p99,
                    cell.max,
                    cpu.nodes_pct,
                    cpu.self_pct,
                    cpu.other_pct,
                );
                if term_moves > 0 {
                    log(format!("the term moved by {term_moves} during the {load}/{target}/c{conc} cell: an election without a kill"));
                }
                cells.push(cell);
            }
        }
        drop(burner);
    }
    let spurious = cells.iter().map(|c| c.term_moves).sum();
    let mut t = String::from(
        "\nwrites (domain_add)  target    conc     ok  err   writes/s   p50 ms   p99 ms   max ms  terms  nodes%  bench%  other%\n",
    );
    for c in &cells {
        t.push_str(&format!(
            "{:<20} {:<8} {:>5} {:>6} {:>4} {:>10.1} {:>8.2} {:>8.2} {:>8.2} {:>6} {:>7.0} {:>7.0} {:>7.0}\n",
            if c.load == "busy" { "other core busy" } else { "idle" },
            c.target,
            c.conc,
            c.ok,
            c.errors,
            c.ok as f64 / c.secs.max(1e-9),
            c.p50,
            c.p99,
            c.max,
            c.term_moves,
            c.cpu.nodes_pct,
            c.cpu.self_pct,
            c.cpu.other_pct,
        ));
    }
    Ok((t, spurious))
}

/// `writes` domain_add requests over `conc` connections to one admin
/// socket. Returns the latencies (ms) of the successful ones, the error
/// count and the wall time.
async fn write_load(socket: &Path, cell: usize, writes: usize, conc: usize) -> Result<(Vec<f64>, usize, f64)> {
    let next = Arc::new(AtomicUsize::new(0));
    let mut conns = Vec::new();
    for _ in 0..conc {
        conns.push(AdminConn::connect(socket).await?);
    }
    let t0 = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for mut c in conns {
        let (next, socket) = (next.clone(), socket.to_path_buf());
        set.spawn(async move {
            let mut lat = Vec::new();
            let mut errors = 0usize;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= writes {
                    break;
                }
                let t = Instant::now();
                match c.call(&domain_req(&format!("c{cell}-w{i}.bench.test")), CALL).await {
                    Ok(v) if v["ok"] == true => lat.push(ms(t.elapsed())),
                    Ok(v) => {
                        errors += 1;
                        if errors <= 3 {
                            log(format!("write error: {}", v["error"]));
                        }
                    }
                    Err(e) => {
                        errors += 1;
                        if errors <= 3 {
                            log(format!("write error: {e:#}"));
                        }
                        // The connection may be out of step: open a new one.
                        c = AdminConn::connect(&socket).await?;
                    }
                }
            }
            Ok::<_, anyhow::Error>((lat, errors))
        });
    }
    let mut lat = Vec::with_capacity(writes);
    let mut errors = 0;
    while let Some(done) = set.join_next().await {
        let (l, e) = done.map_err(|e| anyhow!("writer task: {e}"))??;
        lat.extend(l);
        errors += e;
    }
    Ok((lat, errors, t0.elapsed().as_secs_f64()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summaries_and_percentiles() {
        assert_eq!(summary(&[3.0, 1.0, 2.0]), Some((2.0, 1.0, 3.0)));
        assert_eq!(summary(&[4.0, 1.0, 2.0, 3.0]), Some((2.5, 1.0, 4.0)));
        assert_eq!(summary(&[]), None);
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.5), 50.0);
        assert_eq!(percentile(&v, 0.99), 99.0);
        assert_eq!(percentile(&[7.0], 0.99), 7.0);
    }

    #[test]
    fn parses_members() {
        let v: Value = serde_json::from_str(
            r#"[{"id":1,"name":"node1","addr":"127.0.0.1:1","role":"data","state":"leader","term":3,"leader":1,
                 "last_log_index":9,"last_applied":9,"lag":0,"last_contact_ms":0,"healthy":true},
                {"id":2,"name":"node2","addr":"127.0.0.1:2","role":"data","state":"unreachable: refused","term":null,
                 "leader":null,"last_log_index":null,"last_applied":null,"lag":null,"last_contact_ms":null,"healthy":false}]"#,
        )
        .unwrap();
        let m = members(&v).unwrap();
        assert_eq!(m.len(), 2);
        assert_eq!((m[0].leader, m[0].term, m[0].lag, m[0].healthy), (Some(1), Some(3), Some(0), true));
        assert!(m[1].state.starts_with("unreachable") && !m[1].healthy && m[1].lag.is_none());
    }
}
