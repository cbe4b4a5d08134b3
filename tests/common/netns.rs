//! A test bed of Linux network namespaces (needs root): a "switch"
//! namespace holding a bridge, and one namespace per host, each joined to
//! the bridge by a veth pair whose host end is called `eth0`. Addresses come
//! from 198.18.0.0/15 (RFC 2544 benchmarking) only; there is no default
//! route, so nothing can leave the bed. Every namespace (and with it every
//! veth and the bridge) is deleted when the `Bed` is dropped — also when a
//! test panics — after killing the processes still running in them (all of
//! them ours: the namespaces are created here, with the test's pid in
//! their names).
//!
//! Nothing is created in the root namespace: the bridge and the bridge-side
//! veth ends live in the switch namespace.

use std::io::BufReader;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::Value;

use super::*;

/// Every namespace of ours starts with this, then the creating pid.
const PREFIX: &str = "hmt";

/// The name of the interface inside each host namespace.
pub const IFACE: &str = "eth0";

static SEQ: AtomicUsize = AtomicUsize::new(0);

/// True when running as root; otherwise prints why the test is skipped.
pub fn root_or_skip(test: &str) -> bool {
    let uid = Command::new("id").arg("-u").output().map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    if uid.ok().as_deref() != Some("0") {
        eprintln!("{test}: skipped: needs root for network namespaces");
        return false;
    }
    // Root without CAP_SYS_ADMIN (an unprivileged container) cannot either.
    let probe = format!("{PREFIX}{}xprobe{}", std::process::id(), SEQ.fetch_add(1, Ordering::SeqCst));
    let out = Command::new("ip").args(["netns", "add", &probe]).output().expect("cannot run `ip` (install iproute2)");
    if !out.status.success() {
        eprintln!(
            "{test}: skipped: needs root for network namespaces (root here, but `ip netns add` failed: {})",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        return false;
    }
    ip_quiet(&["netns", "del", &probe]);
    true
}

/// Runs `ip ARGS`; panics with its stderr on failure.
pub fn ip(args: &[&str]) -> String {
    let out = Command::new("ip").args(args).output().expect("cannot run `ip` (install iproute2)");
    assert!(out.status.success(), "ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// Runs `ip ARGS`, ignoring failure (cleanup).
fn ip_quiet(args: &[&str]) -> Option<String> {
    let out = Command::new("ip").args(args).stderr(Stdio::null()).output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).to_string())
}

fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Deletes namespaces left by earlier test processes that died without
/// cleaning up (SIGKILLed): ours by prefix, and their creator is gone.
fn sweep_stale() {
    let Some(list) = ip_quiet(&["netns", "list"]) else { return };
    for line in list.lines() {
        let Some(name) = line.split_whitespace().next() else { continue };
        let Some(rest) = name.strip_prefix(PREFIX) else { continue };
        let Some(pid) = rest.split('x').next().and_then(|p| p.parse::<u32>().ok()) else { continue };
        if pid != std::process::id() && !pid_alive(pid) {
            kill_all_in(name);
            ip_quiet(&["netns", "del", name]);
        }
    }
}

/// SIGKILLs the processes running in namespace `ns` (only ever one of ours).
fn kill_all_in(ns: &str) {
    if let Some(pids) = ip_quiet(&["netns", "pids", ns]) {
        for pid in pids.split_whitespace() {
            let _ = Command::new("kill").arg("-KILL").arg(pid).stderr(Stdio::null()).status();
        }
    }
}

pub struct Host {
    /// Short name: "n1", "cl".
    pub name: String,
    /// Its namespace.
    pub ns: String,
    pub ip: IpAddr,
}

pub struct Bed {
    pub switch: String,
    pub hosts: Vec<Host>,
}

impl Bed {
    /// `hosts`: (short name, address in 198.18.0.0/15), all on one /24.
    pub fn new(hosts: &[(&str, &str)]) -> Bed {
        sweep_stale();
        let tag = format!("{PREFIX}{}x{}", std::process::id(), SEQ.fetch_add(1, Ordering::SeqCst));
        let switch = format!("{tag}-sw");
        // Constructed first: whatever is created below is deleted on panic.
        let mut bed = Bed { switch: switch.clone(), hosts: Vec::new() };
        ip(&["netns", "add", &switch]);
        ip(&["-n", &switch, "link", "set", "lo", "up"]);
        ip(&["-n", &switch, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &switch, "link", "set", "br0", "up"]);
        for (name, addr) in hosts {
            let parsed: IpAddr = addr.parse().expect("address");
            match parsed {
                IpAddr::V4(v4) => assert!(
                    v4.octets()[0] == 198 && (v4.octets()[1] & 0xfe) == 18,
                    "test addresses must be in 198.18.0.0/15, not {addr}"
                ),
                IpAddr::V6(_) => panic!("IPv4 only"),
            }
            let ns = format!("{tag}-{name}");
            ip(&["netns", "add", &ns]);
            bed.hosts.push(Host { name: name.to_string(), ns: ns.clone(), ip: parsed });
            let port = format!("p-{name}");
            ip(&["-n", &switch, "link", "add", &port, "type", "veth", "peer", "name", IFACE, "netns", &ns]);
            ip(&["-n", &switch, "link", "set", &port, "master", "br0", "up"]);
            ip(&["-n", &ns, "link", "set", "lo", "up"]);
            ip(&["-n", &ns, "addr", "add", &format!("{addr}/24"), "dev", IFACE]);
            ip(&["-n", &ns, "link", "set", IFACE, "up"]);
        }
        bed
    }

    pub fn host(&self, name: &str) -> &Host {
        self.hosts.iter().find(|h| h.name == name).unwrap_or_else(|| panic!("no host {name}"))
    }

    pub fn ns(&self, name: &str) -> &str {
        &self.host(name).ns
    }

    /// Pulls (false) or plugs back (true) the cable of `host`: its port on
    /// the bridge goes down, and `eth0` inside loses its carrier.
    pub fn set_link(&self, host: &str, up: bool) {
        ip(&["-n", &self.switch, "link", "set", &format!("p-{host}"), if up { "up" } else { "down" }]);
    }

    /// The Ethernet address of `host`'s `eth0`.
    pub fn mac(&self, host: &str) -> String {
        let out = ip(&["-n", self.ns(host), "-j", "link", "show", "dev", IFACE]);
        let v: Value = serde_json::from_str(&out).expect("ip -j link");
        v[0]["address"].as_str().expect("mac").to_string()
    }

    /// Whether `addr` is configured on `host` (any interface).
    pub fn has_addr(&self, host: &str, addr: &str) -> bool {
        let out = ip(&["-n", self.ns(host), "-j", "addr", "show"]);
        let v: Value = serde_json::from_str(&out).expect("ip -j addr");
        v.as_array()
            .into_iter()
            .flatten()
            .flat_map(|link| link["addr_info"].as_array().cloned().unwrap_or_default())
            .any(|a| a["local"] == addr)
    }

    /// The hosts among `among` that have `addr`.
    pub fn holders(&self, among: &[&str], addr: &str) -> Vec<String> {
        among.iter().filter(|h| self.has_addr(h, addr)).map(|h| h.to_string()).collect()
    }

    /// `host`'s neighbour entry for `addr`: (MAC, state), if it has one.
    pub fn neighbour(&self, host: &str, addr: &str) -> Option<(String, String)> {
        let out = ip(&["-n", self.ns(host), "-j", "neigh", "show", "to", addr, "dev", IFACE]);
        let v: Value = serde_json::from_str(&out).ok()?;
        let e = v.as_array()?.first()?.clone();
        let mac = e["lladdr"].as_str()?.to_string();
        let state = e["state"]
            .as_array()
            .map(|s| s.iter().filter_map(|x| x.as_str()).collect::<Vec<_>>().join(","))
            .unwrap_or_default();
        Some((mac, state))
    }

    /// The file naming `host`'s namespace, for [`enter_netns`] on a
    /// long-lived thread.
    pub fn netns_path(&self, host: &str) -> PathBuf {
        PathBuf::from("/run/netns").join(self.ns(host))
    }

    /// Runs `f` on a thread that has entered `host`'s network namespace:
    /// every socket it opens is in that namespace.
    pub fn run_in<T: Send + 'static>(&self, host: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = self.netns_path(host);
        std::thread::spawn(move || {
            enter_netns(&path);
            f()
        })
        .join()
        .unwrap_or_else(|e| std::panic::resume_unwind(e))
    }
}

extern "C" {
    fn setns(fd: std::os::raw::c_int, nstype: std::os::raw::c_int) -> std::os::raw::c_int;
}
const CLONE_NEWNET: std::os::raw::c_int = 0x4000_0000;

/// Moves the calling thread (only it) into the network namespace at `path`.
pub fn enter_netns(path: &Path) {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    // SAFETY: a plain syscall on a valid descriptor; it changes only this
    // thread's network namespace.
    let r = unsafe { setns(f.as_raw_fd(), CLONE_NEWNET) };
    assert_eq!(r, 0, "setns {}: {}", path.display(), std::io::Error::last_os_error());
}

impl Drop for Bed {
    fn drop(&mut self) {
        for h in &self.hosts {
            kill_all_in(&h.ns);
        }
        for h in &self.hosts {
            ip_quiet(&["netns", "del", &h.ns]);
        }
        kill_all_in(&self.switch);
        ip_quiet(&["netns", "del", &self.switch]);
    }
}

/// Writes the config of a cluster node listening on `ip` (smtp 2525, pop3
/// 2110, cluster 7400) in `dir`. The test clients (one address, sending
/// without pause) are exempt from the per-address connection limits.
pub fn write_ns_node_config(dir: &Path, name: &str, ip: IpAddr) -> PathBuf {
    std::fs::create_dir_all(dir).expect("node dir");
    let text = format!(
        "[server]\nhostname = \"{name}\"\ndata_dir = \"{}\"\nauth_failure_delay_ms = 200\n\
         limits_exempt = [\"198.18.0.0/15\"]\n\n\
         [smtp]\nlisten = [\"{ip}:2525\"]\nsubmission = []\n\n\
         [pop3]\nlisten = [\"{ip}:2110\"]\nplaintext_auth = \"always\"\n\n\
         [cluster]\nlisten = \"{ip}:7400\"\n{}\n",
        dir.join("data").display(),
        // Extra `[cluster]` lines for a measurement with other timings,
        // e.g. HAMAIL_TEST_CLUSTER_EXTRA="group_stop_timeout_ms = 300".
        std::env::var("HAMAIL_TEST_CLUSTER_EXTRA").unwrap_or_default().replace("\\n", "\n"),
    );
    let config = dir.join("hamail.toml");
    std::fs::write(&config, text).expect("write config");
    config
}

/// Starts `hamail serve` inside `ns` (`ip netns exec` execs it: the child's
/// pid is hamail's own, so `kill9` is a real power cut of the process).
pub fn start_in_ns(ns: &str, dir: &Path) -> Server {
    let config = dir.join("hamail.toml");
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns, BIN, "--config"]).arg(&config).arg("serve");
    spawn_server(cmd, dir, config, &format!("hamail in {ns}"))
}

/// One SMTP transaction to `addr` with short timeouts (for polling during
/// an outage): Ok(greeting host name) when the message got 250.
pub fn smtp_send(addr: SocketAddr, to: &str, token: &str) -> std::io::Result<Result<String, String>> {
    use std::io::Write;
    let s = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(500))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.set_write_timeout(Some(Duration::from_secs(5)))?;
    let mut w = s.try_clone()?;
    let mut r = BufReader::new(s);
    let greeting = mail::reply(&mut r)?;
    if !greeting.starts_with("220 ") {
        return Ok(Err(greeting));
    }
    let host = greeting.split_whitespace().nth(1).unwrap_or("").to_string();
    w.write_all(format!("EHLO client.test\r\nMAIL FROM:<probe@client.test>\r\nRCPT TO:<{to}>\r\nDATA\r\n").as_bytes())?;
    for expect in ["250", "250", "250", "354"] {
        let l = mail::reply(&mut r)?;
        if !l.starts_with(expect) {
            return Ok(Err(l));
        }
    }
    w.write_all(format!("Subject: {token}\r\nX-Token: {token}\r\n\r\nfailover probe {token}\r\n.\r\n").as_bytes())?;
    let l = mail::reply(&mut r)?;
    let _ = w.write_all(b"QUIT\r\n");
    Ok(if l.starts_with("250") { Ok(host) } else { Err(l) })
}

/// The SMTP greeting's host name at `addr`, if it answers.
pub fn greeting(addr: SocketAddr) -> Option<String> {
    let s = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    let mut r = BufReader::new(s);
    let l = mail::reply(&mut r).ok()?;
    l.starts_with("220 ").then(|| l.split_whitespace().nth(1).unwrap_or("").to_string())
}

/// A group `mail` that may run on nodes 1-3 (home: 1) with the floating
/// address `vip`/24 on the hosts' `eth0` and the mail listeners on it.
pub fn address_and_mail_group(vip: &str) -> String {
    format!(
        "[[group]]\nname = \"mail\"\nnodes = [1, 2, 3]\nfailback = \"manual\"\nmax_restarts = 1\n\n\
         [[group.resources]]\ntype = \"floating_ip\"\nname = \"vip\"\naddress = \"{vip}/24\"\ninterface = \"{IFACE}\"\n\n\
         [[group.resources]]\ntype = \"mail_service\"\nname = \"mail\"\n"
    )
}

/// The three cluster hosts of the bed.
pub const NS_NODES: [&str; 3] = ["n1", "n2", "n3"];

/// A bed with three hamail nodes (n1..n3) and a client (`cl`). Field order
/// = drop order: processes first, then the namespaces, then the data
/// directories.
pub struct NsCluster {
    pub nodes: Vec<super::cluster::Node>,
    pub bed: Bed,
    pub root: tempfile::TempDir,
}

impl NsCluster {
    /// The bed and three nodes formed into a cluster (init on n1, the others
    /// join), with the domain example.org and `user` (password "pw").
    pub fn form(user: &str, within: Duration) -> NsCluster {
        NsCluster::form_with(["data"; 3], &[user.to_string()], within)
    }

    /// [`Self::form`] with the role of each node ("data" or "witness") and
    /// any number of users (password "pw"), created before `cluster init`
    /// takes them along: local writes, two at a time (argon2 hashing).
    pub fn form_with(roles: [&str; 3], users: &[String], within: Duration) -> NsCluster {
        let bed = Bed::new(&[("n1", "198.18.0.1"), ("n2", "198.18.0.2"), ("n3", "198.18.0.3"), ("cl", "198.18.0.10")]);
        let root = tempfile::tempdir().expect("tempdir");
        let mut c = NsCluster { nodes: Vec::new(), bed, root };
        for (i, host) in NS_NODES.iter().enumerate() {
            let dir = c.root.path().join(host);
            let config = write_ns_node_config(&dir, &format!("node{}", i + 1), c.bed.host(host).ip);
            // `[cluster]` is the config's last section.
            let mut text = std::fs::read_to_string(&config).expect("config");
            text.push_str(&format!("role = \"{}\"\n", roles[i]));
            std::fs::write(&config, text).expect("config");
            let server = start_in_ns(c.bed.ns(host), &dir);
            c.nodes.push(super::cluster::Node { dir, server: Some(server) });
        }
        let n1 = &c.nodes[0];
        let (ok, out) = n1.cli(&["domain", "add", "example.org"], "");
        assert!(ok, "{out}");
        let next = AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..2 {
                s.spawn(|| loop {
                    let Some(user) = users.get(next.fetch_add(1, Ordering::Relaxed)) else { return };
                    let (ok, out) = n1.cli(&["user", "add", user], "pw\n");
                    assert!(ok, "user add {user}: {out}");
                });
            }
        });
        let (ok, out) = n1.cli(&["cluster", "init"], "");
        assert!(ok, "cluster init: {out}");
        let token = out.split_whitespace().find(|w| w.starts_with("hamail1-")).expect("token").to_string();
        for n in &c.nodes[1..] {
            let (ok, out) = n.cli(&["cluster", "join", &token], "");
            assert!(ok, "join: {out}\n{}", c.logs());
        }
        if poll(within, || c.all_healthy(0).then_some(())).is_none() {
            panic!("the cluster did not form: {:?}\n{}", c.nodes[0].status(), c.logs());
        }
        c
    }

    /// The last lines of every node's log (also of a killed node: its log
    /// files are still in its directory).
    pub fn logs(&self) -> String {
        logs_of(&self.nodes)
    }

    /// Every member healthy and caught up, as node `via` sees it.
    pub fn all_healthy(&self, via: usize) -> bool {
        self.nodes[via]
            .status()
            .is_some_and(|st| st.len() == 3 && st.iter().all(|m| m["healthy"] == true && m["lag"] == 0))
    }

    /// Applies the group definitions `text` (TOML) through node `via`.
    pub fn apply(&self, via: usize, text: &str) {
        let file = self.root.path().join("groups.toml");
        std::fs::write(&file, text).unwrap();
        let (ok, out) = self.nodes[via].cli(&["group", "apply", file.to_str().unwrap()], "");
        assert!(ok, "group apply: {out}");
    }

    /// Power cut of node `i` (0-based): its cable out and its processes
    /// SIGKILLed, at (nearly) the same instant — its helper processes (the
    /// address reaper) first: a machine that loses power runs nothing more.
    pub fn power_cut(&mut self, i: usize) {
        self.bed.set_link(NS_NODES[i], false);
        let main = self.nodes[i].server.as_ref().and_then(|s| s.child.as_ref()).map(|c| c.id());
        if let Some(pids) = ip_quiet(&["netns", "pids", self.bed.ns(NS_NODES[i])]) {
            for pid in pids.split_whitespace().filter(|p| p.parse::<u32>().ok() != main) {
                let _ = Command::new("kill").arg("-KILL").arg(pid).stderr(Stdio::null()).status();
            }
        }
        self.nodes[i].kill9();
    }

    /// Power back of node `i`: cable in, process restarted (waits for
    /// nothing; the caller polls for what it checks).
    pub fn power_on(&mut self, i: usize) {
        self.bed.set_link(NS_NODES[i], true);
        let dir = self.nodes[i].dir.clone();
        self.nodes[i].server = Some(start_in_ns(self.bed.ns(NS_NODES[i]), &dir));
    }
}

/// The last lines of each node's log (also of a killed node: its log
/// files are still in its directory).
pub fn logs_of(nodes: &[super::cluster::Node]) -> String {
    nodes
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let log = n.server.as_ref().map(|s| s.log()).unwrap_or_else(|| {
                std::fs::read_dir(&n.dir)
                    .into_iter()
                    .flatten()
                    .flatten()
                    .filter(|e| e.file_name().to_string_lossy().starts_with("stderr-"))
                    .map(|e| std::fs::read_to_string(e.path()).unwrap_or_default())
                    .collect()
            });
            let tail: Vec<&str> = log.lines().rev().take(60).collect::<Vec<_>>().into_iter().rev().collect();
            format!("===== node{} (last lines)\n{}", i + 1, tail.join("\n"))
        })
        .collect::<Vec<_>>()
        .join("\n")
}
