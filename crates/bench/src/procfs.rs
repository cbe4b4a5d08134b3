//! Memory and CPU of the server process (hamail: one process) or of a
//! server's whole process tree (Postfix / Dovecot: master + children), read
//! from /proc while a cell runs.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;

/// Clock ticks per second of /proc/<pid>/stat (USER_HZ; 100 on Linux).
const TICKS_PER_S: f64 = 100.0;

/// A `kB` field of /proc/<pid>/status or smaps_rollup ("VmRSS:  1234 kB").
pub fn kb_field(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let rest = line.strip_prefix(key)?.strip_prefix(':')?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

fn read_kb(path: &str, key: &str) -> Option<u64> {
    kb_field(&std::fs::read_to_string(path).ok()?, key)
}

/// utime + stime of a process, in ticks.
pub(crate) fn cpu_ticks(pid: &str) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: fields start after the last ')'.
    let fields: Vec<&str> = stat.get(stat.rfind(')')? + 2..)?.split_whitespace().collect();
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

/// utime + stime + cutime + cstime: the process and its reaped children.
fn cpu_ticks_with_children(stat: &str) -> Option<u64> {
    let fields: Vec<&str> = stat.get(stat.rfind(')')? + 2..)?.split_whitespace().collect();
    (11..15).map(|i| fields.get(i)?.parse::<u64>().ok()).sum()
}

/// The parent pid of a /proc/<pid>/stat line.
fn ppid_of(stat: &str) -> Option<u32> {
    stat.get(stat.rfind(')')? + 2..)?.split_whitespace().nth(1)?.parse().ok()
}

/// Every process: pid -> (ppid, stat line).
fn proc_table() -> Vec<(u32, u32, String)> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else { return out };
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
        if let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            if let Some(ppid) = ppid_of(&stat) {
                out.push((pid, ppid, stat));
            }
        }
    }
    out
}

/// The process tree under `root` (empty if root is gone): (pid, stat line).
fn tree_of(root: u32) -> Vec<(u32, String)> {
    let table = proc_table();
    if !table.iter().any(|(pid, _, _)| *pid == root) {
        return Vec::new();
    }
    let mut members = std::collections::HashSet::from([root]);
    let mut todo = vec![root];
    while let Some(parent) = todo.pop() {
        for (pid, ppid, _) in &table {
            if *ppid == parent && *pid != root && members.insert(*pid) {
                todo.push(*pid);
            }
        }
    }
    table.into_iter().filter(|(pid, _, _)| members.contains(pid)).map(|(pid, _, stat)| (pid, stat)).collect()
}

/// CPU ticks of a process tree, children that exited during the window
/// included (through their parents' cutime / cstime), like bench.py.
fn tree_ticks(root: u32) -> Option<u64> {
    let tree = tree_of(root);
    if tree.is_empty() {
        return None;
    }
    Some(tree.iter().filter_map(|(_, stat)| cpu_ticks_with_children(stat)).sum())
}

/// (total, busy) ticks of the whole machine.
pub(crate) fn machine_ticks() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let v: Vec<u64> = stat.lines().next()?.split_whitespace().skip(1).take(8).filter_map(|x| x.parse().ok()).collect();
    if v.len() < 5 {
        return None;
    }
    let total: u64 = v.iter().sum();
    Some((total, total - v[3] - v[4]))
}

fn cpus() -> f64 {
    std::thread::available_parallelism().map(|n| n.get() as f64).unwrap_or(1.0)
}

#[derive(Debug, Default, Clone, Copy)]
struct Peaks {
    rss_kb: u64,
    anon_kb: u64,
    file_kb: u64,
    pss_kb: u64,
    procs: u64,
}

impl Peaks {
    fn add_status(&mut self, status: &str) {
        self.rss_kb = self.rss_kb.max(kb_field(status, "VmRSS").unwrap_or(0));
        self.anon_kb = self.anon_kb.max(kb_field(status, "RssAnon").unwrap_or(0));
        self.file_kb = self.file_kb.max(kb_field(status, "RssFile").unwrap_or(0));
    }
}

/// What a cell cost on the server side.
#[derive(Debug, Default, Clone, Copy)]
pub struct Usage {
    /// Peak of the sampled VmRSS, MB (10^6 bytes).
    pub peak_rss_mb: f64,
    /// Peaks of the sampled RssAnon (heap) and RssFile (mapped files), MB.
    pub peak_anon_mb: f64,
    pub peak_file_mb: f64,
    /// VmHWM at the end (reset at the start when the kernel allows), MB.
    pub hwm_mb: f64,
    /// Peak of the sampled PSS (smaps_rollup), MB.
    pub peak_pss_mb: f64,
    /// Server CPU over the cell, % of one core (200 % = 2 cores).
    pub srv_cpu_pct: f64,
    pub srv_cpu_s: f64,
    /// CPU of this load generator, % of one core.
    pub cli_cpu_pct: f64,
    /// Whole machine busy, % of one core.
    pub sys_busy_pct: f64,
    /// Busy minus server minus client: other load on the machine.
    pub other_cpu_pct: f64,
    /// Process-tree mode (peers): the memory figures are sums over the
    /// tree, and this is the largest number of processes seen. 0: one process.
    pub procs_peak: u64,
}

/// What a monitor measures.
enum Target {
    /// One process.
    One,
    /// The process tree under root (no VmHWM).
    Tree(u32),
    /// A fixed set of processes (a cluster's nodes): memory figures are
    /// sums, VmHWM is the sum of the per-process peaks.
    Set(Vec<u32>),
}

/// Samples the server's memory every `interval` until `finish`.
pub struct Monitor {
    pid: String,
    target: Target,
    stop: Arc<AtomicBool>,
    task: JoinHandle<Peaks>,
    hwm_reset: bool,
    t0: Instant,
    srv0: Option<u64>,
    cli0: Option<u64>,
    sys0: Option<(u64, u64)>,
}

impl Monitor {
    pub fn start(pid: u32, interval: Duration) -> Monitor {
        let pid = pid.to_string();
        // "5" resets VmHWM (peak RSS) to the current RSS: peak per cell.
        let hwm_reset = std::fs::write(format!("/proc/{pid}/clear_refs"), "5").is_ok();
        let stop = Arc::new(AtomicBool::new(false));
        let task = {
            let (pid, stop) = (pid.clone(), stop.clone());
            tokio::spawn(async move {
                let status = format!("/proc/{pid}/status");
                let rollup = format!("/proc/{pid}/smaps_rollup");
                let mut peaks = Peaks::default();
                let mut n = 0u64;
                loop {
                    peaks.add_status(&std::fs::read_to_string(&status).unwrap_or_default());
                    // PSS walks every mapping: sample it less often.
                    if n.is_multiple_of(5) {
                        peaks.pss_kb = peaks.pss_kb.max(read_kb(&rollup, "Pss").unwrap_or(0));
                    }
                    n += 1;
                    if stop.load(Ordering::Relaxed) {
                        return peaks;
                    }
                    tokio::time::sleep(interval).await;
                }
            })
        };
        Monitor {
            srv0: cpu_ticks(&pid),
            cli0: cpu_ticks("self"),
            sys0: machine_ticks(),
            pid,
            target: Target::One,
            stop,
            task,
            hwm_reset,
            t0: Instant::now(),
        }
    }

    /// Samples the whole process tree under `root` (a daemon's master):
    /// memory figures are sums over the tree (RSS counts shared pages once
    /// per process; PSS divides them among the sharers), CPU includes the
    /// children that exited during the cell. The sampling runs on a blocking
    /// thread: walking /proc takes a few ms. PSS every second sample.
    pub fn start_tree(root: u32, interval: Duration) -> Monitor {
        let stop = Arc::new(AtomicBool::new(false));
        let task = {
            let stop = stop.clone();
            tokio::task::spawn_blocking(move || {
                let mut peaks = Peaks::default();
                let mut n = 0u64;
                loop {
                    sample_tree(root, n.is_multiple_of(2), &mut peaks);
                    n += 1;
                    if stop.load(Ordering::Relaxed) {
                        return peaks;
                    }
                    std::thread::sleep(interval);
                }
            })
        };
        Monitor {
            srv0: tree_ticks(root),
            cli0: cpu_ticks("self"),
            sys0: machine_ticks(),
            pid: root.to_string(),
            target: Target::Tree(root),
            stop,
            task,
            hwm_reset: false,
            t0: Instant::now(),
        }
    }

    /// Samples a fixed set of processes (e.g. a cluster's nodes): VmRSS,
    /// RssAnon, RssFile and PSS summed over the set at each sample (PSS
    /// every fifth); CPU summed; VmHWM reset in each process at the start,
    /// and `hwm_mb` is the sum of the per-process peaks at the end (an upper
    /// bound of the summed peak, as the peaks need not coincide).
    pub fn start_set(pids: Vec<u32>, interval: Duration) -> Monitor {
        let hwm_reset = pids.iter().all(|p| std::fs::write(format!("/proc/{p}/clear_refs"), "5").is_ok());
        let stop = Arc::new(AtomicBool::new(false));
        let task = {
            let (pids, stop) = (pids.clone(), stop.clone());
            tokio::spawn(async move {
                let mut peaks = Peaks::default();
                let mut n = 0u64;
                loop {
                    sample_set(&pids, n.is_multiple_of(5), &mut peaks);
                    n += 1;
                    if stop.load(Ordering::Relaxed) {
                        return peaks;
                    }
                    tokio::time::sleep(interval).await;
                }
            })
        };
        Monitor {
            srv0: set_ticks(&pids),
            cli0: cpu_ticks("self"),
            sys0: machine_ticks(),
            pid: pids.iter().map(|p| p.to_string()).collect::<Vec<_>>().join(","),
            target: Target::Set(pids),
            stop,
            task,
            hwm_reset,
            t0: Instant::now(),
        }
    }

    pub async fn finish(self) -> Usage {
        let wall = self.t0.elapsed().as_secs_f64().max(1e-6);
        let srv1 = match &self.target {
            Target::Tree(root) => tree_ticks(*root),
            Target::Set(pids) => set_ticks(pids),
            Target::One => cpu_ticks(&self.pid),
        };
        let (cli1, sys1) = (cpu_ticks("self"), machine_ticks());
        self.stop.store(true, Ordering::Relaxed);
        let mut peaks = self.task.await.unwrap_or_default();
        let hwm_kb = match &self.target {
            Target::Tree(root) => {
                sample_tree(*root, true, &mut peaks);
                0
            }
            Target::Set(pids) => {
                sample_set(pids, true, &mut peaks);
                pids.iter()
                    .map(|p| {
                        let status = std::fs::read_to_string(format!("/proc/{p}/status")).unwrap_or_default();
                        kb_field(&status, "VmHWM").unwrap_or(0)
                    })
                    .sum()
            }
            Target::One => {
                let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid)).unwrap_or_default();
                peaks.add_status(&status);
                kb_field(&status, "VmHWM").unwrap_or(0)
            }
        };
        if self.hwm_reset && matches!(self.target, Target::One) {
            // VmHWM sees the spikes between samples.
            peaks.rss_kb = peaks.rss_kb.max(hwm_kb);
        }
        let pct = |a: Option<u64>, b: Option<u64>| match (a, b) {
            (Some(a), Some(b)) => 100.0 * b.saturating_sub(a) as f64 / TICKS_PER_S / wall,
            _ => 0.0,
        };
        let srv_cpu_pct = pct(self.srv0, srv1);
        let cli_cpu_pct = pct(self.cli0, cli1);
        let sys_busy_pct = match (self.sys0, sys1) {
            (Some((t0, b0)), Some((t1, b1))) if t1 > t0 => 100.0 * cpus() * (b1 - b0) as f64 / (t1 - t0) as f64,
            _ => 0.0,
        };
        let mb = |kb: u64| kb as f64 * 1024.0 / 1e6;
        Usage {
            peak_rss_mb: mb(peaks.rss_kb),
            hwm_mb: mb(hwm_kb),
            peak_anon_mb: mb(peaks.anon_kb),
            peak_file_mb: mb(peaks.file_kb),
            peak_pss_mb: mb(peaks.pss_kb),
            srv_cpu_pct,
            srv_cpu_s: srv_cpu_pct / 100.0 * wall,
            cli_cpu_pct,
            sys_busy_pct,
            other_cpu_pct: (sys_busy_pct - srv_cpu_pct - cli_cpu_pct).max(0.0),
            procs_peak: peaks.procs,
        }
    }
}

/// One sample of a process tree: sums of VmRSS / RssAnon / RssFile (and
/// PSS when `pss`) over the tree, kept if larger than the peaks so far.
fn sample_tree(root: u32, pss: bool, peaks: &mut Peaks) {
    let tree = tree_of(root);
    let (mut rss, mut anon, mut file, mut pss_sum) = (0, 0, 0, 0);
    for (pid, _) in &tree {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        rss += kb_field(&status, "VmRSS").unwrap_or(0);
        anon += kb_field(&status, "RssAnon").unwrap_or(0);
        file += kb_field(&status, "RssFile").unwrap_or(0);
        if pss {
            pss_sum += read_kb(&format!("/proc/{pid}/smaps_rollup"), "Pss").unwrap_or(0);
        }
    }
    peaks.rss_kb = peaks.rss_kb.max(rss);
    peaks.anon_kb = peaks.anon_kb.max(anon);
    peaks.file_kb = peaks.file_kb.max(file);
    peaks.pss_kb = peaks.pss_kb.max(pss_sum);
    peaks.procs = peaks.procs.max(tree.len() as u64);
}

/// CPU ticks summed over a set of processes (None if none is readable).
fn set_ticks(pids: &[u32]) -> Option<u64> {
    let v: Vec<u64> = pids.iter().filter_map(|p| cpu_ticks(&p.to_string())).collect();
    (!v.is_empty()).then(|| v.iter().sum())
}

/// One sample of a set of processes: sums over the set, kept if larger
/// than the peaks so far.
fn sample_set(pids: &[u32], pss: bool, peaks: &mut Peaks) {
    let (mut rss, mut anon, mut file, mut pss_sum, mut alive) = (0, 0, 0, 0, 0u64);
    for pid in pids {
        let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else { continue };
        alive += 1;
        rss += kb_field(&status, "VmRSS").unwrap_or(0);
        anon += kb_field(&status, "RssAnon").unwrap_or(0);
        file += kb_field(&status, "RssFile").unwrap_or(0);
        if pss {
            pss_sum += read_kb(&format!("/proc/{pid}/smaps_rollup"), "Pss").unwrap_or(0);
        }
    }
    peaks.rss_kb = peaks.rss_kb.max(rss);
    peaks.anon_kb = peaks.anon_kb.max(anon);
    peaks.file_kb = peaks.file_kb.max(file);
    peaks.pss_kb = peaks.pss_kb.max(pss_sum);
    peaks.procs = peaks.procs.max(alive);
}

/// Number of processes in the tree under `root` (0 if root is gone).
pub fn tree_size(root: u32) -> usize {
    tree_of(root).len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_kb_fields() {
        let status = "Name:\thamail\nVmHWM:\t   20480 kB\nVmRSS:\t   10240 kB\n";
        assert_eq!(kb_field(status, "VmRSS"), Some(10240));
        assert_eq!(kb_field(status, "VmHWM"), Some(20480));
        assert_eq!(kb_field(status, "VmSwap"), None);
        assert_eq!(kb_field("Pss:   77 kB\nPss_Anon:  5 kB\n", "Pss"), Some(77));
    }

    #[test]
    fn own_process_is_readable() {
        assert!(cpu_ticks("self").is_some());
        assert!(machine_ticks().is_some());
        let me = std::process::id();
        assert!(tree_ticks(me).is_some());
        assert!(tree_of(me).iter().any(|(p, _)| *p == me));
        assert!(tree_of(1).len() >= tree_of(me).len());
    }

    #[test]
    fn stat_fields_after_the_command_name() {
        let stat = "42 (a) b (c)) S 7 42 42 0 -1 4194560 1 2 3 4 10 20 30 40 20 0 1 0";
        assert_eq!(ppid_of(stat), Some(7));
        assert_eq!(cpu_ticks_with_children(stat), Some(100));
    }
}
