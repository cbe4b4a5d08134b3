//! A shared disk for shared-disk tests (needs root): an image file on a
//! loop device, with an ext4 filesystem 1 MiB smaller than the device (the
//! last MiB holds hamail's disk heartbeat lease). Detached when dropped.

use std::path::Path;
use std::process::Command;

pub struct LoopDisk {
    pub device: String,
    _dir: tempfile::TempDir,
}

fn sh(args: &[&str]) -> Result<String, String> {
    let out = Command::new(args[0]).args(&args[1..]).output().map_err(|e| format!("{}: {e}", args[0]))?;
    if !out.status.success() {
        return Err(format!("{}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()));
    }
    Ok(String::from_utf8_lossy(&out.stdout).to_string())
}

impl LoopDisk {
    /// A device of `mib` MiB; `None` (with the reason on stderr) when this
    /// machine has no loop devices or no mkfs.ext4.
    pub fn new(mib: u32) -> Option<LoopDisk> {
        let dir = tempfile::tempdir().expect("tempdir");
        let image = dir.path().join("disk.img").display().to_string();
        let made = sh(&["truncate", "-s", &format!("{mib}M"), &image])
            .and_then(|_| sh(&["mkfs.ext4", "-q", "-F", &image, &format!("{}M", mib - 1)]))
            .and_then(|_| sh(&["losetup", "--find", "--show", &image]));
        match made {
            Ok(out) => Some(LoopDisk { device: out.trim().to_string(), _dir: dir }),
            Err(e) => {
                eprintln!("SKIPPED shared-disk test: cannot make a loop-device disk here: {e}");
                None
            }
        }
    }
}

impl Drop for LoopDisk {
    fn drop(&mut self) {
        let _ = sh(&["losetup", "-d", &self.device]);
    }
}

/// Whether process `pid` sees a filesystem mounted at `mount_point` (each
/// `ip netns exec` process has its own mount namespace).
pub fn mounted_in(pid: u32, mount_point: &Path) -> bool {
    let Ok(info) = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")) else { return false };
    let want = mount_point.display().to_string();
    info.lines().any(|l| l.split_whitespace().nth(4) == Some(want.as_str()))
}
