//! CPU quotas per server process (`--cpu-per-node`): each process in a CPU
//! cgroup of its own with a CFS quota, as if each ran on a machine of that
//! size. Linux, as root, cgroup v2 (`cpu.max`) or v1 (`cpu` controller,
//! `cpu.cfs_quota_us`).
//!
//! Why: on one machine, a cluster of N nodes shares the cores that a single
//! node has to itself, so "replicated / single" measures N copies of the
//! work on one machine's CPU. With an equal quota for every process, each
//! node gets what one machine of that size would give it, and the ratio
//! shows the cost of replication per machine instead. The disk is still
//! shared (the kernel's I/O work is not in these cgroups).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _, Result};

/// The CFS period the quotas are expressed in (the kernel's default).
const PERIOD_US: u64 = 100_000;

/// A process's CPU cgroup; the process goes back to the root cgroup and the
/// cgroup is removed when this is dropped.
pub struct CpuLimit {
    dir: PathBuf,
    root: PathBuf,
    pid: u32,
}

impl CpuLimit {
    /// Puts `pid` (all its threads) in a new cgroup `name` limited to
    /// `pct` % of one core.
    pub fn apply(name: &str, pid: u32, pct: u32) -> Result<CpuLimit> {
        if pct == 0 {
            bail!("--cpu-per-node must be above 0");
        }
        let quota = u64::from(pct) * PERIOD_US / 100;
        let v2 = Path::new("/sys/fs/cgroup/cgroup.controllers");
        let (root, dir) = if v2.exists() {
            let root = PathBuf::from("/sys/fs/cgroup");
            let dir = root.join(name);
            // The cpu controller must be enabled for the children of the root.
            std::fs::write(root.join("cgroup.subtree_control"), "+cpu")
                .context("enabling the cpu controller in /sys/fs/cgroup/cgroup.subtree_control (root needed)")?;
            std::fs::create_dir(&dir).with_context(|| format!("creating {} (root needed)", dir.display()))?;
            std::fs::write(dir.join("cpu.max"), format!("{quota} {PERIOD_US}"))
                .with_context(|| format!("writing {}/cpu.max", dir.display()))?;
            (root, dir)
        } else {
            let root = PathBuf::from("/sys/fs/cgroup/cpu");
            if !root.join("cpu.cfs_quota_us").exists() {
                bail!("no cgroup cpu controller found (neither cgroup v2 nor v1's /sys/fs/cgroup/cpu)");
            }
            let dir = root.join(name);
            std::fs::create_dir(&dir).with_context(|| format!("creating {} (root needed)", dir.display()))?;
            std::fs::write(dir.join("cpu.cfs_period_us"), PERIOD_US.to_string())
                .with_context(|| format!("writing {}/cpu.cfs_period_us", dir.display()))?;
            std::fs::write(dir.join("cpu.cfs_quota_us"), quota.to_string())
                .with_context(|| format!("writing {}/cpu.cfs_quota_us", dir.display()))?;
            (root, dir)
        };
        let limit = CpuLimit { dir, root, pid };
        std::fs::write(limit.dir.join("cgroup.procs"), pid.to_string())
            .with_context(|| format!("moving pid {pid} into {}", limit.dir.display()))?;
        Ok(limit)
    }
}

/// How often the quota stopped a process: CFS periods elapsed, and those in
/// which it ran out of quota and was held until the next one.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Throttling {
    pub periods: u64,
    pub throttled: u64,
}

impl Throttling {
    /// What happened between `self` (earlier) and `later`.
    pub fn until(self, later: Throttling) -> Throttling {
        Throttling {
            periods: later.periods.saturating_sub(self.periods),
            throttled: later.throttled.saturating_sub(self.throttled),
        }
    }
}

impl std::fmt::Display for Throttling {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.throttled, self.periods)
    }
}

/// Reads `nr_periods` and `nr_throttled` from a `cpu.stat` (the same keys
/// in cgroup v1 and v2).
fn parse_cpu_stat(text: &str) -> Option<Throttling> {
    let value = |key: &str| {
        text.lines().find_map(|l| l.strip_prefix(key).and_then(|rest| rest.strip_prefix(' '))?.trim().parse().ok())
    };
    Some(Throttling { periods: value("nr_periods")?, throttled: value("nr_throttled")? })
}

impl CpuLimit {
    /// The process's throttling so far (which node ran out of CPU: the one
    /// throttled in most periods limits the cluster).
    pub fn throttling(&self) -> Result<Throttling> {
        let path = self.dir.join("cpu.stat");
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        parse_cpu_stat(&text).with_context(|| format!("no nr_periods / nr_throttled in {}", path.display()))
    }
}

impl Drop for CpuLimit {
    fn drop(&mut self) {
        // The process may be gone already: then only the removal matters.
        let _ = std::fs::write(self.root.join("cgroup.procs"), self.pid.to_string());
        if let Err(e) = std::fs::remove_dir(&self.dir) {
            crate::log(format!("could not remove the cgroup {}: {e}", self.dir.display()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_stat_gives_periods_and_throttled_periods() {
        // cgroup v1 (cpu controller) and v2 (usage first, no throttled_time).
        let v1 = "nr_periods 412\nnr_throttled 398\nthrottled_time 29912737409\n";
        let v2 = "usage_usec 100\nuser_usec 60\nsystem_usec 40\nnr_periods 40\nnr_throttled 2\nthrottled_usec 16000\n";
        assert_eq!(parse_cpu_stat(v1), Some(Throttling { periods: 412, throttled: 398 }));
        assert_eq!(parse_cpu_stat(v2), Some(Throttling { periods: 40, throttled: 2 }));
        // A key that only starts like another is not it; a missing key is None.
        assert_eq!(
            parse_cpu_stat("nr_periods_x 5\nnr_periods 7\nnr_throttled 1\n"),
            Some(Throttling { periods: 7, throttled: 1 })
        );
        assert_eq!(parse_cpu_stat("nr_periods 7\n"), None);
        let before = Throttling { periods: 100, throttled: 90 };
        assert_eq!(before.until(Throttling { periods: 140, throttled: 129 }).to_string(), "39/40");
    }
}
