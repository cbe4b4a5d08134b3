//! A shared disk (shared-disk mode): checked, mounted while the group runs
//! here, released on stop.
//!
//! Start: `fsck -p` the device (exit 0 "clean" or 1 "errors corrected" go
//! on; anything else stops the start, with fsck's output in the log), then
//! mount(2) it on the mount point (created if missing).
//!
//! Stop: every process using the filesystem — an open file, its working or
//! root directory, its executable or a mapped file on it, like `fuser -km`
//! — is killed with SIGKILL, then the filesystem is unmounted. A disk that
//! cannot be unmounted is an error, not a lazy unmount: a group whose disk
//! is still in use here must not start on another node (two mounts of one
//! ext4 filesystem destroy it). This process itself is never killed; if it
//! holds files there (a store not yet closed) the unmount fails and says
//! so.
//!
//! Monitor: the mount point is mounted, from the configured device, and
//! the disk heartbeat lease is held and renewed.
//!
//! Disk heartbeat lease (`disk_lease`): besides the cluster's quorum, the
//! owner keeps a lease on the disk itself, in the device's LAST 1 MiB,
//! outside the filesystem — so the filesystem must be created 1 MiB smaller
//! than the device, e.g. `mkfs.ext4 /dev/drbd0 $(( $(blockdev --getsize64
//! /dev/drbd0) / 1024 - 1024 ))k`. Start checks the superblock (ext2/3/4,
//! XFS) and refuses, permanently, a filesystem that reaches into that area;
//! then it acquires the lease (waiting out another node's stale lease,
//! refusing while another node's heartbeat is alive) before fsck and mount.
//! Stop releases the lease after the unmount.

use std::collections::BTreeSet;
use std::ffi::CString;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hamail_cluster::groups::ResourceError;

use super::disk_lease::{self, AcquireError, Lease};
use super::{config_error, env_error, run_error, LogSink};

/// How long stop keeps killing users and retrying the unmount.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(10);

fn cstring(resource: &str, what: &str, s: &str) -> Result<CString, ResourceError> {
    CString::new(s).map_err(|_| config_error(resource, format!("{what} `{s}` contains a NUL byte")))
}

/// Undoes the octal escapes (`\040` for a space) of /proc/self/mounts.
fn unescape(field: &str) -> String {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn canonical(p: &str) -> PathBuf {
    std::fs::canonicalize(p).unwrap_or_else(|_| PathBuf::from(p))
}

/// The device mounted on `mount_point` (the last mount there), if any.
fn mounted_device(mount_point: &Path) -> std::io::Result<Option<String>> {
    let mounts = std::fs::read_to_string("/proc/self/mounts")?;
    let mut found = None;
    for line in mounts.lines() {
        let mut f = line.split(' ');
        if let (Some(dev), Some(mp)) = (f.next(), f.next()) {
            if Path::new(&unescape(mp)) == mount_point {
                found = Some(unescape(dev));
            }
        }
    }
    Ok(found)
}

fn same_device(a: &str, b: &str) -> bool {
    canonical(a) == canonical(b)
}

/// Opens the device for the lease and checks that the filesystem leaves
/// the lease area free.
async fn open_lease_device(resource: &str, device: &str, fs_type: &str) -> Result<disk_lease::Device, ResourceError> {
    let path = device.to_string();
    let opened = tokio::task::spawn_blocking(move || {
        let d = disk_lease::Device::open(&path)?;
        let fs = d.filesystem_size()?;
        Ok::<_, std::io::Error>((d, fs))
    })
    .await
    .map_err(|e| run_error(resource, format!("lease check of {device}: {e}")))?;
    let (dev, fs) = opened.map_err(|e| match e.kind() {
        std::io::ErrorKind::InvalidInput => config_error(resource, e.to_string()),
        std::io::ErrorKind::PermissionDenied => {
            env_error(resource, format!("opening {device} for its disk lease: {e}: needs root"))
        }
        _ => run_error(resource, format!("reading {device} for its disk lease: {e}")),
    })?;
    let lease_kib = dev.offset / 1024;
    match fs {
        Some((_, size)) if size <= dev.offset => Ok(dev),
        Some((kind, size)) => Err(config_error(
            resource,
            format!(
                "the {kind} filesystem on {device} ({size} bytes) reaches into the disk lease area (the device's \
                 last 1 MiB, from byte {}): re-create it 1 MiB smaller than the device, e.g. \
                 `mkfs.{fs} {device} {lease_kib}k`; not mounted",
                dev.offset,
                fs = if kind == "ext" { "ext4" } else { "xfs" },
            ),
        )),
        None => Err(config_error(
            resource,
            format!(
                "no ext2/3/4 or XFS filesystem found on {device} (fs_type `{fs_type}`): its size cannot be checked \
                 against the disk lease area (the device's last 1 MiB); not mounted"
            ),
        )),
    }
}

pub(crate) async fn start(
    log: &LogSink,
    resource: &str,
    device: &str,
    mount_point: &str,
    fs_type: &str,
    holder: &str,
) -> Result<Lease, ResourceError> {
    if !Path::new(mount_point).is_absolute() {
        return Err(config_error(resource, format!("mount point `{mount_point}` must be an absolute path")));
    }
    if !Path::new(device).exists() {
        return Err(env_error(resource, format!("device {device} does not exist on this node")));
    }
    std::fs::create_dir_all(mount_point)
        .map_err(|e| env_error(resource, format!("cannot create mount point {mount_point}: {e}")))?;
    let mp = canonical(mount_point);
    let mounted = match mounted_device(&mp)
        .map_err(|e| run_error(resource, format!("reading /proc/self/mounts: {e}")))?
    {
        Some(dev) if same_device(&dev, device) => true, // already here: the lease is still needed
        Some(dev) => {
            return Err(env_error(resource, format!("{mount_point} already has {dev} mounted on it, not {device}")));
        }
        None => false,
    };
    let dev = open_lease_device(resource, device, fs_type).await?;
    let sink = log.clone();
    let name = resource.to_string();
    let lease = disk_lease::acquire(dev, holder, disk_lease::INTERVAL, move |line| sink(name.clone(), line))
        .await
        .map_err(|e| match e {
            AcquireError::Busy(m) => run_error(resource, format!("{device}: {m}; not mounted")),
            AcquireError::Io(m) => run_error(resource, format!("{m}; not mounted")),
        })?;
    tracing::info!(resource, device, holder, "disk lease acquired");
    if mounted {
        return Ok(lease);
    }
    match mount(log, resource, device, &mp, mount_point, fs_type).await {
        Ok(()) => Ok(lease),
        Err(e) => {
            if let Err(r) = lease.release().await {
                tracing::warn!(resource, device, "releasing the disk lease after a failed start: {r}");
            }
            Err(e)
        }
    }
}

async fn mount(
    log: &LogSink,
    resource: &str,
    device: &str,
    mp: &Path,
    mount_point: &str,
    fs_type: &str,
) -> Result<(), ResourceError> {
    fsck(log, resource, device, fs_type).await?;
    let source = cstring(resource, "device", device)?;
    let target = cstring(resource, "mount point", &mp.to_string_lossy())?;
    let fstype = cstring(resource, "fs_type", fs_type)?;
    // SAFETY: all pointers are valid NUL-terminated strings; no data.
    let ret = unsafe { libc::mount(source.as_ptr(), target.as_ptr(), fstype.as_ptr(), 0, std::ptr::null()) };
    if ret != 0 {
        let e = std::io::Error::last_os_error();
        let msg = format!("mounting {device} ({fs_type}) on {mount_point}: {e}");
        return Err(match e.raw_os_error() {
            Some(libc::EPERM) | Some(libc::EACCES) => env_error(resource, format!("{msg}: needs root/CAP_SYS_ADMIN")),
            Some(libc::ENODEV) => config_error(resource, format!("{msg}: unknown filesystem type")),
            Some(libc::ENOTBLK) | Some(libc::ENXIO) | Some(libc::ENOENT) => env_error(resource, msg),
            Some(libc::EBUSY) => {
                env_error(resource, format!("{msg}: the device is already mounted elsewhere on this node"))
            }
            _ => run_error(resource, msg),
        });
    }
    tracing::info!(resource, device, mount_point, "disk mounted");
    Ok(())
}

async fn fsck(log: &LogSink, resource: &str, device: &str, fs_type: &str) -> Result<(), ResourceError> {
    let mut cmd = tokio::process::Command::new("fsck");
    cmd.arg("-p");
    if !fs_type.is_empty() && fs_type != "auto" {
        cmd.arg("-t").arg(fs_type);
    }
    cmd.arg(device).stdin(std::process::Stdio::null()).kill_on_drop(true);
    let out = cmd
        .output()
        .await
        .map_err(|e| env_error(resource, format!("cannot run fsck (is util-linux installed?): {e}")))?;
    for line in String::from_utf8_lossy(&out.stdout).lines().chain(String::from_utf8_lossy(&out.stderr).lines()) {
        log(resource.to_string(), format!("fsck: {line}"));
    }
    match out.status.code() {
        Some(0) => Ok(()),
        Some(1) => {
            tracing::warn!(resource, device, "fsck corrected errors on the shared disk");
            Ok(())
        }
        Some(code) => Err(run_error(
            resource,
            format!(
                "fsck -p {device} exited with {code}: the filesystem needs attention (run fsck by hand); not mounted"
            ),
        )),
        None => Err(run_error(resource, format!("fsck -p {device} was killed"))),
    }
}

/// The processes (other than this one) using the filesystem whose device
/// number is `dev`: open files, cwd, root, executable, mapped files.
pub(crate) fn users(dev: u64) -> BTreeSet<i32> {
    let me = std::process::id() as i32;
    let mut pids = BTreeSet::new();
    let Ok(proc) = std::fs::read_dir("/proc") else {
        return pids;
    };
    let on_fs = |p: &Path| std::fs::metadata(p).map(|m| m.dev() == dev).unwrap_or(false);
    let (major, minor) = (libc::major(dev as libc::dev_t) as u64, libc::minor(dev as libc::dev_t) as u64);
    for entry in proc.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        let base = entry.path();
        let mut using = ["cwd", "root", "exe"].iter().any(|l| on_fs(&base.join(l)));
        if !using {
            if let Ok(fds) = std::fs::read_dir(base.join("fd")) {
                using = fds.flatten().any(|fd| on_fs(&fd.path()));
            }
        }
        if !using {
            // Mapped files: "addr perms offset MAJ:MIN inode path" (hex).
            if let Ok(maps) = std::fs::read_to_string(base.join("maps")) {
                using = maps.lines().any(|l| {
                    l.split_whitespace().nth(3).and_then(|d| d.split_once(':')).is_some_and(|(ma, mi)| {
                        u64::from_str_radix(ma, 16).ok() == Some(major)
                            && u64::from_str_radix(mi, 16).ok() == Some(minor)
                    })
                });
            }
        }
        if using {
            pids.insert(pid);
        }
    }
    pids
}

/// Unmounts (killing the users), then releases the lease: `lease` if this
/// driver holds it (left in place when the unmount fails: the disk is
/// still here), else the record on `device` if `holder`'s.
pub(crate) async fn stop(
    log: &LogSink,
    resource: &str,
    device: &str,
    mount_point: &str,
    lease: &mut Option<Lease>,
    holder: Option<&str>,
) -> Result<(), ResourceError> {
    unmount(log, resource, mount_point).await?;
    let released = match (lease.take(), holder) {
        (Some(l), _) => l.release().await.map(|()| true),
        (None, Some(h)) if Path::new(device).exists() => {
            disk_lease::release_if_held_by(device, h).await.map_err(|e| e.to_string())
        }
        _ => Ok(false),
    };
    match released {
        Ok(true) => tracing::info!(resource, device, "disk lease released"),
        Ok(false) => {}
        // Not fatal: the disk is unmounted; another node just waits out
        // the lease instead of taking it at once.
        Err(e) => {
            tracing::warn!(resource, device, "disk lease not released: {e}");
            log(resource.to_string(), format!("disk lease not released: {e}"));
        }
    }
    Ok(())
}

async fn unmount(log: &LogSink, resource: &str, mount_point: &str) -> Result<(), ResourceError> {
    let mp = canonical(mount_point);
    if mounted_device(&mp).map_err(|e| run_error(resource, format!("reading /proc/self/mounts: {e}")))?.is_none() {
        return Ok(()); // not mounted: released already
    }
    let dev = std::fs::metadata(&mp).map_err(|e| run_error(resource, format!("cannot stat {mount_point}: {e}")))?.dev();
    let target = cstring(resource, "mount point", &mp.to_string_lossy())?;
    let deadline = Instant::now() + RELEASE_TIMEOUT;
    loop {
        let pids = users(dev);
        for &pid in &pids {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            log(resource.to_string(), format!("killing process {pid} ({}) using {mount_point}", comm.trim()));
            // SAFETY: kill(2); a pid that has gone meanwhile gives ESRCH.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
        if !pids.is_empty() {
            // Killed processes close their files as they exit.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // SAFETY: target is a valid NUL-terminated path.
        let ret = unsafe { libc::umount2(target.as_ptr(), 0) };
        if ret == 0 {
            tracing::info!(resource, mount_point, "disk unmounted");
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINVAL) => return Ok(()), // no longer a mount point
            Some(libc::EPERM) => {
                return Err(env_error(resource, format!("unmounting {mount_point}: {e}: needs root/CAP_SYS_ADMIN")))
            }
            Some(libc::EBUSY) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Some(libc::EBUSY) => {
                let who = if users(dev).is_empty() {
                    "this hamail process itself, a submount, or the kernel (swap, loop device) holds it".to_string()
                } else {
                    format!("processes {:?} still use it", users(dev))
                };
                return Err(run_error(
                    resource,
                    format!("cannot release {mount_point}: still busy after {} s ({who}); the group must not move until it is", RELEASE_TIMEOUT.as_secs()),
                ));
            }
            _ => return Err(run_error(resource, format!("unmounting {mount_point}: {e}"))),
        }
    }
}

/// `lease`: the state of this driver's lease on the disk, if it holds one.
pub(crate) fn monitor(
    resource: &str,
    device: &str,
    mount_point: &str,
    lease: Option<Result<(), String>>,
) -> Result<(), ResourceError> {
    let mp = canonical(mount_point);
    match mounted_device(&mp).map_err(|e| run_error(resource, format!("reading /proc/self/mounts: {e}")))? {
        Some(dev) if same_device(&dev, device) => match lease {
            Some(Ok(())) => Ok(()),
            Some(Err(e)) => Err(run_error(resource, format!("{device}: {e}"))),
            None => Err(run_error(resource, format!("{device} is mounted but this node holds no disk lease on it"))),
        },
        Some(dev) => Err(run_error(resource, format!("{mount_point} has {dev} mounted, not {device}"))),
        None => Err(run_error(resource, format!("{mount_point} is no longer mounted"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_fields_are_unescaped() {
        assert_eq!(unescape("/mnt/mail\\040store"), "/mnt/mail store");
        assert_eq!(unescape("/plain"), "/plain");
        assert_eq!(unescape("/end\\04"), "/end\\04");
    }
}
