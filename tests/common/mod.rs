//! Test harness: runs the real `hamail` binary on loopback with port 0
//! listeners in a temporary data directory, and the admin CLI against it.

#![allow(dead_code)]

pub mod cluster;
pub mod disk;
pub mod mail;
pub mod netns;

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_hamail");

/// Stands for a listener a node does not have (a witness has no mail ports).
pub const UNBOUND: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), 0);

pub struct Server {
    pub dir: PathBuf,
    pub config: PathBuf,
    pub child: Option<Child>,
    pub smtp: SocketAddr,
    pub submission: SocketAddr,
    pub submissions: Option<SocketAddr>,
    pub pop3: SocketAddr,
    pub pop3s: Option<SocketAddr>,
    _tmp: Option<tempfile::TempDir>,
    stderr_log: PathBuf,
}

/// `smtp_extra`: TOML lines added to the `[smtp]` section (e.g. limits).
pub fn start(extra: &str) -> Server {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().to_path_buf();
    let mut s = start_in(&dir, extra);
    s._tmp = Some(tmp);
    s
}

pub fn write_config(dir: &Path, extra: &str) -> PathBuf {
    let config = dir.join("hamail.toml");
    if !config.exists() {
        let text = format!(
            "[server]\nhostname = \"mx.test\"\ndata_dir = \"{}\"\nauth_failure_delay_ms = 200\n\n\
             [smtp]\nlisten = [\"127.0.0.1:0\"]\nsubmission = [\"127.0.0.1:0\"]\nsubmissions = [\"127.0.0.1:0\"]\n{}\n\n\
             [pop3]\nlisten = [\"127.0.0.1:0\"]\npop3s = [\"127.0.0.1:0\"]\n{}",
            dir.join("data").display(),
            extra,
            // Tests never send mail off this machine: outbound delivery is
            // off unless a test configures it (with loopback next hops).
            if extra.contains("[relay]") { "" } else { "\n[relay]\nenabled = false\n" }
        );
        std::fs::write(&config, text).expect("write config");
    }
    config
}

/// A free TCP port on 127.0.0.1 (bound and released: a cluster node's
/// address must stay the same across restarts, so port 0 will not do).
/// Below the kernel's ephemeral range (32768 up by default), so that no
/// port-0 bind of another server or client in the meantime can take it.
pub fn free_port() -> u16 {
    use std::hash::{BuildHasher, Hasher};
    for _ in 0..200 {
        let random = std::collections::hash_map::RandomState::new().build_hasher().finish();
        let port = 10_000 + (random % 20_000) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

/// Writes the config of cluster node `name` (data or witness) whose cluster
/// listener is on `cluster_port`, in `dir`.
pub fn write_node_config(dir: &Path, name: &str, cluster_port: u16, role: &str) {
    std::fs::create_dir_all(dir).expect("node dir");
    let text = format!(
        "[server]\nhostname = \"{name}\"\ndata_dir = \"{}\"\nauth_failure_delay_ms = 200\n\n\
         [smtp]\nlisten = [\"127.0.0.1:0\"]\nsubmission = [\"127.0.0.1:0\"]\n\n\
         [pop3]\nlisten = [\"127.0.0.1:0\"]\n\n\
         [cluster]\nlisten = \"127.0.0.1:{cluster_port}\"\nrole = \"{role}\"\n\n\
         [relay]\nenabled = false\n",
        dir.join("data").display(),
    );
    std::fs::write(dir.join("hamail.toml"), text).expect("write config");
}

/// Starts (or restarts) a server whose data lives in `dir`.
pub fn start_in(dir: &Path, extra: &str) -> Server {
    let config = write_config(dir, extra);
    let mut cmd = Command::new(BIN);
    cmd.arg("--config").arg(&config).arg("serve");
    spawn_server(cmd, dir, config, "hamail")
}

/// Runs `cmd` (a `hamail serve`, possibly wrapped), reads the addresses it
/// prints until `hamail: ready`, and keeps draining its stdout. `what`
/// names it in the panic if it exits before it is ready.
pub fn spawn_server(mut cmd: Command, dir: &Path, config: PathBuf, what: &str) -> Server {
    let stderr_log = dir.join(format!("stderr-{}.log", rand_u64()));
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::from(std::fs::File::create(&stderr_log).expect("log file")))
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {what}: {e}"));
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    let mut addrs = std::collections::HashMap::new();
    loop {
        let line = match lines.next() {
            Some(Ok(l)) => l,
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                let log = std::fs::read_to_string(&stderr_log).unwrap_or_default();
                panic!("{what} exited before it was ready; stderr:\n{log}");
            }
        };
        if let Some(rest) = line.strip_prefix("hamail: ") {
            if rest.starts_with("ready") {
                break;
            }
            if let Some((kind, addr)) = rest.split_once(" listening on ") {
                if let Some(Ok(first)) = addr.split_whitespace().next().map(str::parse::<SocketAddr>) {
                    addrs.insert(kind.to_string(), first);
                }
            }
        }
    }
    // Keep draining stdout so the server never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    Server {
        dir: dir.to_path_buf(),
        config,
        child: Some(child),
        smtp: addrs.get("smtp").copied().unwrap_or(UNBOUND),
        submission: addrs.get("submission").copied().unwrap_or(UNBOUND),
        submissions: addrs.get("submissions").copied(),
        pop3: addrs.get("pop3").copied().unwrap_or(UNBOUND),
        pop3s: addrs.get("pop3s").copied(),
        _tmp: None,
        stderr_log,
    }
}

pub fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(0);
    h.finish()
}

impl Server {
    /// Runs `hamail --config .. ARGS` with `stdin`; returns (success, stdout+stderr).
    pub fn cli(&self, args: &[&str], stdin: &str) -> (bool, String) {
        cli(&self.config, args, stdin)
    }

    pub fn add_user(&self, user: &str, password: &str) {
        let (ok, out) = self.cli(&["user", "add", user], &format!("{password}\n"));
        assert!(ok, "user add {user}: {out}");
    }

    pub fn add_domain(&self, domain: &str) {
        let (ok, out) = self.cli(&["domain", "add", domain], "");
        assert!(ok, "domain add {domain}: {out}");
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr_log).unwrap_or_default()
    }

    /// SIGKILL: the power-cut of a process.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn terminate(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill").arg("-TERM").arg(c.id().to_string()).status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill9();
    }
}

pub fn cli(config: &Path, args: &[&str], stdin: &str) -> (bool, String) {
    let mut child = Command::new(BIN)
        .arg("--config")
        .arg(config)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn hamail cli");
    child.stdin.take().expect("stdin").write_all(stdin.as_bytes()).expect("write stdin");
    let out = child.wait_with_output().expect("wait cli");
    let mut text = String::from_utf8_lossy(&out.stdout).to_string();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

/// Runs an external program (python3, curl, swaks); panics with a clear
/// message if it is not installed.
pub fn run_tool(program: &str, args: &[&str], stdin: Option<&[u8]>) -> (bool, Vec<u8>, String) {
    let mut cmd = Command::new(program);
    cmd.args(args).stdout(Stdio::piped()).stderr(Stdio::piped());
    cmd.stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() });
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {program} ({e}): install it (apt-get install swaks curl python3)"));
    if let Some(input) = stdin {
        child.stdin.take().expect("stdin").write_all(input).expect("write stdin");
    }
    let out = child.wait_with_output().expect("wait");
    (out.status.success(), out.stdout, String::from_utf8_lossy(&out.stderr).to_string())
}

pub fn clients_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients")
}

/// Runs one of the Python clients of `tests/clients` (smtplib, poplib) with
/// `args`; its one line of JSON.
pub fn py(script: &str, args: &[&str]) -> serde_json::Value {
    let path = clients_dir().join(script);
    let mut all = vec![path.to_str().expect("path")];
    all.extend_from_slice(args);
    let (_, out, err) = run_tool("python3", &all, None);
    serde_json::from_slice(&out).unwrap_or_else(|e| panic!("{script} printed no JSON ({e}): {err}"))
}

/// A field of `/proc/PID/status` in KiB (VmHWM, VmRSS).
pub fn proc_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("process status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// Polls `f` until it returns `Some`, or gives `None` after `timeout`.
pub fn poll<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Polls `f` until it returns `Some`, or panics after `timeout`.
pub fn eventually<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// An SMTP connection to `addr` past its greeting and EHLO.
pub fn greeted(addr: SocketAddr) -> Line {
    let mut c = Line::connect(addr);
    assert!(c.reply().starts_with("220 "));
    c.send("EHLO client.test\r\n");
    assert!(c.reply().starts_with("250 "));
    c
}

/// A minimal line-oriented client for exact-reply assertions.
pub struct Line {
    pub stream: std::net::TcpStream,
    reader: BufReader<std::net::TcpStream>,
}

impl Line {
    pub fn connect(addr: SocketAddr) -> Line {
        let stream = std::net::TcpStream::connect(addr).expect("connect");
        stream.set_read_timeout(Some(Duration::from_secs(20))).expect("timeout");
        let reader = BufReader::new(stream.try_clone().expect("clone"));
        Line { stream, reader }
    }
    pub fn send(&mut self, data: &str) {
        self.stream.write_all(data.as_bytes()).expect("send");
    }
    pub fn send_bytes(&mut self, data: &[u8]) {
        self.stream.write_all(data).expect("send");
    }
    /// One reply line (without CRLF).
    pub fn line(&mut self) -> String {
        let mut s = String::new();
        self.reader.read_line(&mut s).expect("read");
        s.trim_end_matches(['\r', '\n']).to_string()
    }
    /// A whole SMTP reply (multi-line aware): the last line.
    pub fn reply(&mut self) -> String {
        loop {
            let l = self.line();
            if l.len() < 4 || l.as_bytes()[3] != b'-' {
                return l;
            }
        }
    }
    /// The peer closed (EOF) or errored.
    pub fn closed(&mut self) -> bool {
        let mut s = String::new();
        matches!(self.reader.read_line(&mut s), Ok(0) | Err(_))
    }
}
