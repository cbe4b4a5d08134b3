//! The shared disk's heartbeat lease (`disk` resource, shared-disk mode).
//!
//! Root only (loop devices, mount): without root each test prints why and
//! passes without doing anything. Two `Driver`s of two servers with
//! different host names stand for two nodes sharing one loop device. Every
//! loop device is detached and every mount unmounted by guards, also when
//! a test fails.

use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use hamail_cluster::groups::{Failback, GroupSpec, ResourceDriver, ResourceSpec, StartContext, StartEvent};

const MIB: u64 = 1 << 20;

fn is_root() -> bool {
    // SAFETY: geteuid(2) has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn sh(args: &[&str]) -> Result<String, String> {
    let out = Command::new(args[0]).args(&args[1..]).output().map_err(|e| format!("{args:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!("{args:?}: {}", String::from_utf8_lossy(&out.stderr)));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

mod common;
use common::*;

fn group(resources: Vec<ResourceSpec>) -> GroupSpec {
    GroupSpec {
        name: "mailgroup".into(),
        nodes: vec![1.into(), 2.into()],
        failback: Failback::Manual,
        resources,
        max_restarts: 1,
        stop_timeout_ms: None,
    }
}

const CTX: StartContext = StartContext { event: StartEvent::Start, home: true, disk_ok: true };

/// A 16 MiB loop device; its filesystem `fs_mib` MiB. Unmounted from its
/// mount points and detached on drop.
struct LoopDisk {
    device: String,
    dir: tempfile::TempDir,
}

impl Drop for LoopDisk {
    fn drop(&mut self) {
        for m in ["a", "b"] {
            let mp = self.dir.path().join(m).display().to_string();
            while sh(&["umount", &mp]).is_ok() {}
        }
        let _ = sh(&["losetup", "-d", &self.device]);
    }
}

impl LoopDisk {
    fn mount_point(&self, which: &str) -> PathBuf {
        self.dir.path().join(which)
    }

    fn resource(&self, which: &str) -> ResourceSpec {
        ResourceSpec::Disk {
            name: "disk".into(),
            device: self.device.clone(),
            mount_point: self.mount_point(which).display().to_string(),
            fs_type: "ext4".into(),
        }
    }

    /// How many mounts of this device there are (any mount point).
    fn mounts(&self) -> usize {
        let canon = std::fs::canonicalize(&self.device).unwrap();
        std::fs::read_to_string("/proc/self/mounts")
            .unwrap()
            .lines()
            .filter(|l| l.split(' ').next().and_then(|d| std::fs::canonicalize(d).ok()) == Some(canon.clone()))
            .count()
    }

    fn mounted_on(&self, which: &str) -> bool {
        let mp = format!(" {} ", self.mount_point(which).display());
        std::fs::read_to_string("/proc/self/mounts").unwrap().lines().any(|l| l.contains(&mp))
    }

    /// The lease record, decoded independently of the server's code:
    /// (holder, counter, released), or None without the magic.
    fn record(&self) -> Option<(String, u64, bool)> {
        let f = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_DIRECT).open(&self.device).unwrap();
        let size = sh(&["blockdev", "--getsize64", &self.device]).unwrap().trim().parse::<u64>().unwrap();
        // An aligned 4 KiB window of a larger buffer.
        let mut raw = vec![0u8; 8192];
        let skip = raw.as_ptr().align_offset(4096);
        let buf = &mut raw[skip..skip + 4096];
        f.read_exact_at(buf, size - MIB).unwrap();
        if &buf[0..8] != b"HAMLEASE" {
            return None;
        }
        let counter = u64::from_le_bytes(buf[16..24].try_into().unwrap());
        let released = u32::from_le_bytes(buf[12..16].try_into().unwrap()) & 1 != 0;
        let len = u16::from_le_bytes([buf[40], buf[41]]) as usize;
        Some((String::from_utf8_lossy(&buf[42..42 + len]).into_owned(), counter, released))
    }
}

/// None (with a message): not root, or no loop devices here.
fn loop_disk(fs_mib: u32) -> Option<LoopDisk> {
    if !is_root() {
        eprintln!("SKIPPED disk lease test: needs root (loop devices, mount); run the tests as root");
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img").display().to_string();
    sh(&["truncate", "-s", "16M", &image]).unwrap();
    sh(&["mkfs.ext4", "-q", "-F", &image, &format!("{fs_mib}M")]).unwrap();
    match sh(&["losetup", "--find", "--show", &image]) {
        Ok(out) => Some(LoopDisk { device: out.trim().to_string(), dir }),
        Err(e) => {
            eprintln!("SKIPPED disk lease test: no loop device here: {e}");
            None
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_holds_the_lease_and_stop_releases_it() {
    let Some(disk) = loop_disk(15) else { return };
    let n = node("node-a").await;
    let (d, _) = driver(&n);
    let r = disk.resource("a");
    let g = group(vec![r.clone()]);
    assert_eq!(disk.record(), None, "a fresh disk has no lease record");

    d.start(&g, &r, &CTX).await.expect("start");
    assert!(disk.mounted_on("a"));
    assert_eq!(disk.mounts(), 1);
    let (holder, c1, released) = disk.record().expect("lease record");
    assert_eq!((holder.as_str(), released), ("node-a", false));
    d.start(&g, &r, &CTX).await.expect("starting again is fine");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let (_, c2, _) = disk.record().unwrap();
    assert!(c2 >= c1 + 2, "the heartbeat counter grows: {c1} → {c2}");
    d.monitor(&g, &r).await.expect("monitor");

    d.stop(&g, &r, std::time::Duration::from_secs(2)).await.expect("stop");
    assert!(!disk.mounted_on("a"));
    assert_eq!(disk.mounts(), 0);
    let (holder, c3, released) = disk.record().unwrap();
    assert_eq!((holder.as_str(), released), ("node-a", true));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(disk.record().unwrap().1, c3, "no heartbeat after stop");
    let e = d.monitor(&g, &r).await.expect_err("stopped");
    assert!(e.message.contains("no longer mounted"), "{e}");
    d.stop(&g, &r, std::time::Duration::from_secs(2)).await.expect("stopping again is fine");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_node_is_refused_while_the_first_holds_the_disk() {
    let Some(disk) = loop_disk(15) else { return };
    let (na, nb) = (node("node-a").await, node("node-b").await);
    let ((a, _), (b, b_lines)) = (driver(&na), driver(&nb));
    let (ra, rb) = (disk.resource("a"), disk.resource("b"));
    let (ga, gb) = (group(vec![ra.clone()]), group(vec![rb.clone()]));

    a.start(&ga, &ra, &CTX).await.expect("A starts");
    let t = Instant::now();
    let e = b.start(&gb, &rb, &CTX).await.expect_err("B is refused");
    assert!(!e.permanent, "the group may retry: {e}");
    assert!(e.message.contains("in use by another node") && e.message.contains("node-a"), "{e}");
    assert!(t.elapsed() < Duration::from_secs(5), "refused as soon as the heartbeat moved: {:?}", t.elapsed());
    assert_eq!(disk.mounts(), 1, "mounted once only");
    assert!(disk.mounted_on("a") && !disk.mounted_on("b"));
    assert_eq!(disk.record().unwrap().0, "node-a", "B did not touch A's record");
    a.monitor(&ga, &ra).await.expect("A still healthy");
    assert!(b.monitor(&gb, &rb).await.is_err());
    assert!(b_lines.lock().unwrap().iter().any(|(_, l)| l.contains("watching it")), "{:?}", b_lines.lock().unwrap());

    a.stop(&ga, &ra, std::time::Duration::from_secs(2)).await.expect("A stops");
    let t = Instant::now();
    b.start(&gb, &rb, &CTX).await.expect("B starts after A released");
    assert!(t.elapsed() < Duration::from_secs(3), "a released lease is taken at once: {:?}", t.elapsed());
    assert_eq!(disk.mounts(), 1);
    assert!(disk.mounted_on("b"));
    let (holder, _, released) = disk.record().unwrap();
    assert_eq!((holder.as_str(), released), ("node-b", false));

    // A now finds B's live heartbeat.
    let e = a.start(&ga, &ra, &CTX).await.expect_err("A is refused now");
    assert!(e.message.contains("node-b"), "{e}");
    assert_eq!(disk.mounts(), 1);
    b.stop(&gb, &rb, std::time::Duration::from_secs(2)).await.expect("B stops");
    assert_eq!(disk.mounts(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_holder_is_taken_over_only_after_the_takeover_wait() {
    let Some(disk) = loop_disk(15) else { return };
    let (na, nb) = (node("node-a").await, node("node-b").await);
    let ((a, _), (b, b_lines)) = (driver(&na), driver(&nb));
    let (ra, rb) = (disk.resource("a"), disk.resource("b"));
    let (ga, gb) = (group(vec![ra.clone()]), group(vec![rb.clone()]));

    a.start(&ga, &ra, &CTX).await.expect("A starts");
    // A dies: its heartbeat stops (the driver is gone) without a release,
    // and its mount goes with it.
    drop(a);
    sh(&["umount", &disk.mount_point("a").display().to_string()]).expect("umount A");
    let (holder, c, released) = disk.record().unwrap();
    assert_eq!((holder.as_str(), released), ("node-a", false));

    let t = Instant::now();
    b.start(&gb, &rb, &CTX).await.expect("B takes the disk over");
    let waited = t.elapsed();
    assert!(waited >= Duration::from_millis(3500), "took over after {waited:?}, before the takeover wait");
    assert!(waited < Duration::from_secs(8), "{waited:?}");
    assert!(disk.mounted_on("b"));
    assert_eq!(disk.mounts(), 1);
    let (holder, c2, _) = disk.record().unwrap();
    assert_eq!(holder, "node-b");
    assert!(c2 > c);
    let lines = b_lines.lock().unwrap().clone();
    assert!(lines.iter().any(|(_, l)| l.contains("taking it over")), "{lines:?}");
    b.monitor(&gb, &rb).await.expect("B healthy");
    b.stop(&gb, &rb, std::time::Duration::from_secs(2)).await.expect("B stops");
    assert!(disk.record().unwrap().2, "released");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filesystem_over_the_lease_area_is_refused() {
    let Some(disk) = loop_disk(16) else { return };
    let n = node("node-a").await;
    let (d, _) = driver(&n);
    let r = disk.resource("a");
    let g = group(vec![r.clone()]);
    let e = d.start(&g, &r, &CTX).await.expect_err("refused");
    assert!(e.permanent, "{e}");
    assert!(e.message.contains("reaches into the disk lease area") && e.message.contains("mkfs.ext4"), "{e}");
    assert_eq!(disk.mounts(), 0);
    assert_eq!(disk.record(), None, "nothing written over the filesystem");
}
