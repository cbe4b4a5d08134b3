//! The disk heartbeat lease of a shared disk (like sbd or CLUSTERPRO's disk
//! heartbeat): a second guard, on the disk itself, against two nodes
//! mounting it — besides the cluster's quorum lease.
//!
//! Where: the LAST 1 MiB of the block device ([`LEASE_AREA`]), outside the
//! filesystem. The filesystem must therefore be made 1 MiB smaller than
//! the device (`mkfs.ext4 DEV $((size_in_KiB - 1024))k`, or
//! `mkfs.xfs -d size=...`); start reads the superblock (ext2/3/4, XFS) and
//! refuses, permanently, a filesystem that reaches into the lease area
//! (the heartbeat would overwrite its data). Other filesystem types are
//! refused: their size cannot be checked.
//!
//! Format: one 4 KiB record at the start of the lease area, written with
//! O_DIRECT|O_DSYNC (straight to the device, no page cache on either node):
//! magic, version, flags (released), a counter incremented at each
//! heartbeat, the writer's wall-clock time (informative only: nodes' clocks
//! are not compared), a random incarnation number, the holder's name (the
//! node's `[server] hostname`) and an FNV-1a checksum.
//!
//! Acquire: a record that is absent (no magic), released, or our own (same
//! holder name: this node before a restart) is taken at once. A record held
//! by another node is watched for [`takeover_wait`]; if it changes at all
//! the disk is in use elsewhere and the start is refused (not permanent:
//! the group may retry); if it stays still, the holder is dead and its
//! record is overwritten. In every case the taker then waits one more
//! heartbeat interval and re-reads: a record of someone else there means
//! two nodes raced, and this one backs off.
//!
//! Heartbeat: every interval the record is re-read (it must still be ours)
//! and rewritten with the counter incremented. A failed write or someone
//! else's record makes the lease lost: logged, and reported by `monitor`
//! (then the engine stops the disk here and fails the group over). Monitor
//! also fails when the last good heartbeat is older than the takeover wait
//! (a stalled writer: another node may already have taken over).
//!
//! Release (stop, after the unmount): the record is rewritten with the
//! released flag, only if it is still ours.

use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The size of the lease area at the end of the device.
pub const LEASE_AREA: u64 = 1 << 20;
/// The size (and alignment) of the lease record.
const RECORD: usize = 4096;
const MAGIC: &[u8; 8] = b"HAMLEASE";
const VERSION: u32 = 1;
const FLAG_RELEASED: u32 = 1;
const MAX_HOLDER: usize = 255;

/// Heartbeat interval.
pub const INTERVAL: Duration = Duration::from_secs(1);

/// How long another holder's record must stay unchanged before it is
/// considered dead: three heartbeats and a margin.
pub fn takeover_wait(interval: Duration) -> Duration {
    interval * 3 + interval / 2
}

/// A buffer aligned for O_DIRECT: the record, 4 KiB aligned by its type
/// (boxed: a page does not belong on the stack of an async task).
#[repr(C, align(4096))]
struct Aligned([u8; RECORD]);

impl Aligned {
    fn new() -> Box<Aligned> {
        Box::new(Aligned([0; RECORD]))
    }
    fn bytes(&self) -> &[u8] {
        &self.0
    }
    fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.0
    }
}

fn fnv1a(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in data {
        h ^= *b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}

/// A lease record as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub holder: String,
    pub incarnation: u64,
    pub counter: u64,
    /// Unix time in milliseconds, of the writer's clock.
    pub time_ms: u64,
    pub released: bool,
}

/// What the lease area holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Slot {
    /// No lease record (never used).
    Empty,
    Valid(Record),
    /// The magic but a bad checksum (torn write, or foreign data).
    Invalid,
}

impl Record {
    fn encode(&self, buf: &mut [u8]) {
        buf.fill(0);
        buf[0..8].copy_from_slice(MAGIC);
        buf[8..12].copy_from_slice(&VERSION.to_le_bytes());
        let flags = if self.released { FLAG_RELEASED } else { 0 };
        buf[12..16].copy_from_slice(&flags.to_le_bytes());
        buf[16..24].copy_from_slice(&self.counter.to_le_bytes());
        buf[24..32].copy_from_slice(&self.time_ms.to_le_bytes());
        buf[32..40].copy_from_slice(&self.incarnation.to_le_bytes());
        let name = &self.holder.as_bytes()[..self.holder.len().min(MAX_HOLDER)];
        buf[40..42].copy_from_slice(&(name.len() as u16).to_le_bytes());
        buf[42..42 + name.len()].copy_from_slice(name);
        let sum = fnv1a(&buf[..RECORD - 8]);
        buf[RECORD - 8..].copy_from_slice(&sum.to_le_bytes());
    }

    fn decode(buf: &[u8]) -> Slot {
        if &buf[0..8] != MAGIC {
            return Slot::Empty;
        }
        let u64_at = |i: usize| u64::from_le_bytes(buf[i..i + 8].try_into().expect("8 bytes"));
        let u32_at = |i: usize| u32::from_le_bytes(buf[i..i + 4].try_into().expect("4 bytes"));
        if u64_at(RECORD - 8) != fnv1a(&buf[..RECORD - 8]) || u32_at(8) != VERSION {
            return Slot::Invalid;
        }
        let len = (u16::from_le_bytes([buf[40], buf[41]]) as usize).min(MAX_HOLDER);
        Slot::Valid(Record {
            holder: String::from_utf8_lossy(&buf[42..42 + len]).into_owned(),
            incarnation: u64_at(32),
            counter: u64_at(16),
            time_ms: u64_at(24),
            released: u32_at(12) & FLAG_RELEASED != 0,
        })
    }
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// The block device opened for direct I/O, with the lease area's offset.
pub struct Device {
    file: File,
    path: String,
    /// Offset of the lease record (device size − 1 MiB, 4 KiB aligned).
    pub offset: u64,
}

impl Device {
    pub fn open(path: &str) -> std::io::Result<Device> {
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_DIRECT | libc::O_DSYNC)
            .open(path)?;
        let size = file.seek(SeekFrom::End(0))?;
        if size < 2 * LEASE_AREA {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("{path} is {size} bytes: too small for a filesystem and a 1 MiB lease area"),
            ));
        }
        let offset = (size - LEASE_AREA) & !(RECORD as u64 - 1);
        Ok(Device { file, path: path.to_string(), offset })
    }

    fn read_block(&self, at: u64) -> std::io::Result<Box<Aligned>> {
        let mut buf = Aligned::new();
        self.file.read_exact_at(buf.bytes_mut(), at)?;
        Ok(buf)
    }

    /// The lease record as it is on the disk now.
    pub fn read(&self) -> std::io::Result<Slot> {
        self.read_raw().map(|b| Record::decode(&b))
    }

    fn read_raw(&self) -> std::io::Result<Vec<u8>> {
        Ok(self.read_block(self.offset)?.bytes().to_vec())
    }

    pub fn write(&self, record: &Record) -> std::io::Result<()> {
        let mut buf = Aligned::new();
        record.encode(buf.bytes_mut());
        self.file.write_all_at(buf.bytes(), self.offset)?;
        // O_DSYNC already; a flush of the device's cache too.
        self.file.sync_data()
    }

    /// The size in bytes of the filesystem on the device, from its
    /// superblock: `Ok(None)` for a type whose size this cannot read.
    pub fn filesystem_size(&self) -> std::io::Result<Option<(&'static str, u64)>> {
        let block = self.read_block(0)?;
        let b = block.bytes();
        // ext2/3/4: superblock at 1024.
        let sb = &b[1024..2048];
        if u16::from_le_bytes([sb[0x38], sb[0x39]]) == 0xEF53 {
            let le32 = |i: usize| u32::from_le_bytes(sb[i..i + 4].try_into().expect("4 bytes")) as u64;
            let mut blocks = le32(0x04);
            if le32(0x60) & 0x80 != 0 {
                // INCOMPAT_64BIT: s_blocks_count_hi.
                blocks |= le32(0x150) << 32;
            }
            let block_size = 1024u64 << le32(0x18).min(16);
            return Ok(Some(("ext", blocks * block_size)));
        }
        // XFS: big-endian superblock at 0: "XFSB", sb_blocksize, sb_dblocks.
        if &b[0..4] == b"XFSB" {
            let block_size = u32::from_be_bytes(b[4..8].try_into().expect("4 bytes")) as u64;
            let blocks = u64::from_be_bytes(b[8..16].try_into().expect("8 bytes"));
            return Ok(Some(("xfs", blocks * block_size)));
        }
        Ok(None)
    }
}

/// Why the lease could not be acquired.
#[derive(Debug)]
pub enum AcquireError {
    /// Another node's heartbeat is live, or it won a race: try later.
    Busy(String),
    /// Reading or writing the lease area failed.
    Io(String),
}

struct State {
    device: Arc<Device>,
    record: Record,
    /// Set by release: the heartbeat writes no more.
    stopped: bool,
}

struct Shared {
    state: Mutex<State>,
    /// Why the lease was lost, once it is.
    lost: Mutex<Option<String>>,
    last_ok: Mutex<Instant>,
    interval: Duration,
}

/// A held lease; its heartbeat runs until release or drop. Dropping it
/// without `release` stops the heartbeat and leaves the record held (as a
/// node that dies does): others take over after the takeover wait.
pub struct Lease {
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.task.abort();
        // A write in progress on a blocking thread may still land; no new
        // one starts.
        if let Ok(mut s) = self.shared.state.lock() {
            s.stopped = true;
        }
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.expect("blocking lease I/O panicked")
}

fn ours(slot: &Slot, record: &Record) -> bool {
    matches!(slot, Slot::Valid(r) if r.holder == record.holder && r.incarnation == record.incarnation)
}

fn describe(slot: &Slot) -> String {
    match slot {
        Slot::Empty => "no lease record".to_string(),
        Slot::Invalid => "an unreadable lease record (bad checksum)".to_string(),
        Slot::Valid(r) => {
            format!("{}'s lease record (counter {}{})", r.holder, r.counter, if r.released { ", released" } else { "" })
        }
    }
}

/// Acquires the lease on `device` for `holder`, watching another holder's
/// record for `takeover_wait(interval)`, and starts the heartbeat.
/// `log` receives what it sees.
pub async fn acquire(
    device: Device,
    holder: &str,
    interval: Duration,
    log: impl Fn(String),
) -> Result<Lease, AcquireError> {
    let device = Arc::new(device);
    let io = |e: std::io::Error, what: &str, d: &Device| {
        AcquireError::Io(format!("{what} the lease area of {}: {e}", d.path))
    };
    let d = device.clone();
    let first = blocking(move || d.read_raw()).await.map_err(|e| io(e, "reading", &device))?;
    let slot = Record::decode(&first);
    let free = match &slot {
        Slot::Empty => true,
        Slot::Valid(r) => r.released || r.holder == holder,
        Slot::Invalid => false,
    };
    if !free {
        let wait = takeover_wait(interval);
        log(format!(
            "disk lease: {} found on {}; watching it for {} ms before taking over",
            describe(&slot),
            device.path,
            wait.as_millis()
        ));
        let deadline = Instant::now() + wait;
        let poll = (interval / 4).max(Duration::from_millis(10));
        while Instant::now() < deadline {
            tokio::time::sleep(poll).await;
            let d = device.clone();
            let now = blocking(move || d.read_raw()).await.map_err(|e| io(e, "reading", &device))?;
            if now != first {
                return Err(AcquireError::Busy(format!(
                    "the disk is in use by another node: {} is being updated (disk heartbeat alive)",
                    describe(&Record::decode(&now))
                )));
            }
        }
        log(format!("disk lease: {} did not change for {} ms: taking it over", describe(&slot), wait.as_millis()));
    }
    let record = Record {
        holder: holder.chars().take(MAX_HOLDER).collect(),
        incarnation: rand::random(),
        counter: match &slot {
            Slot::Valid(r) => r.counter.wrapping_add(1),
            _ => 1,
        },
        time_ms: now_ms(),
        released: false,
    };
    let (d, r) = (device.clone(), record.clone());
    blocking(move || d.write(&r)).await.map_err(|e| io(e, "writing", &device))?;
    // Someone else may have read the same free or stale record and written
    // theirs: wait one interval and look again.
    tokio::time::sleep(interval).await;
    let d = device.clone();
    let again = blocking(move || d.read()).await.map_err(|e| io(e, "reading", &device))?;
    if !ours(&again, &record) {
        return Err(AcquireError::Busy(format!(
            "another node took the disk lease at the same time ({}); backing off",
            describe(&again)
        )));
    }
    let shared = Arc::new(Shared {
        state: Mutex::new(State { device, record, stopped: false }),
        lost: Mutex::new(None),
        last_ok: Mutex::new(Instant::now()),
        interval,
    });
    let task = tokio::spawn(heartbeat(shared.clone()));
    Ok(Lease { shared, task })
}

async fn heartbeat(shared: Arc<Shared>) {
    loop {
        tokio::time::sleep(shared.interval).await;
        let s = shared.clone();
        let result = blocking(move || -> Result<bool, String> {
            let mut st = s.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if st.stopped {
                return Ok(false);
            }
            let slot = st.device.read().map_err(|e| format!("reading the lease record: {e}"))?;
            if !ours(&slot, &st.record) {
                return Err(format!("the lease was taken by someone else: {}", describe(&slot)));
            }
            st.record.counter = st.record.counter.wrapping_add(1);
            st.record.time_ms = now_ms();
            st.device.write(&st.record).map_err(|e| format!("writing the lease record: {e}"))?;
            Ok(true)
        })
        .await;
        match result {
            Ok(true) => *shared.last_ok.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Instant::now(),
            Ok(false) => return,
            Err(e) => {
                tracing::error!(error = %e, "disk heartbeat lost");
                *shared.lost.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(e);
                return;
            }
        }
    }
}

impl Lease {
    /// Ok while the lease is held and renewed; else why not.
    pub fn check(&self) -> Result<(), String> {
        if let Some(e) = self.shared.lost.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone() {
            return Err(format!("disk heartbeat lost: {e}"));
        }
        let age = self.shared.last_ok.lock().unwrap_or_else(std::sync::PoisonError::into_inner).elapsed();
        if age > takeover_wait(self.shared.interval) {
            return Err(format!(
                "disk heartbeat stalled: last written {} ms ago (another node may take the disk over)",
                age.as_millis()
            ));
        }
        Ok(())
    }

    /// Stops the heartbeat and marks the record released, if it is still
    /// ours.
    pub async fn release(self) -> Result<(), String> {
        self.task.abort();
        let s = self.shared.clone();
        blocking(move || {
            let mut st = s.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            st.stopped = true;
            let slot = st.device.read().map_err(|e| format!("reading the lease record: {e}"))?;
            if !ours(&slot, &st.record) {
                return Err(format!("not released: the record is no longer ours ({})", describe(&slot)));
            }
            st.record.released = true;
            st.record.time_ms = now_ms();
            st.device.write(&st.record).map_err(|e| format!("writing the lease record: {e}"))
        })
        .await
    }
}

/// Marks `holder`'s record on `device` released, if the record is its
/// (a stop without a held lease: after a restart). `Ok(false)`: not ours.
pub async fn release_if_held_by(device: &str, holder: &str) -> std::io::Result<bool> {
    let (device, holder) = (device.to_string(), holder.to_string());
    blocking(move || {
        let d = Device::open(&device)?;
        match d.read()? {
            Slot::Valid(mut r) if r.holder == holder && !r.released => {
                r.released = true;
                r.time_ms = now_ms();
                d.write(&r)?;
                Ok(true)
            }
            _ => Ok(false),
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_record_buffer_is_aligned_for_direct_io() {
        for _ in 0..8 {
            let buf = Aligned::new();
            assert_eq!(buf.bytes().as_ptr() as usize % RECORD, 0);
            assert_eq!(buf.bytes().len(), RECORD);
        }
    }

    #[test]
    fn records_round_trip_and_checksum_guards_them() {
        let r = Record { holder: "node-a".into(), incarnation: 7, counter: 42, time_ms: 1234, released: true };
        let mut buf = vec![0u8; RECORD];
        r.encode(&mut buf);
        assert_eq!(Record::decode(&buf), Slot::Valid(r));
        buf[100] ^= 1;
        assert_eq!(Record::decode(&buf), Slot::Invalid);
        assert_eq!(Record::decode(&[0u8; RECORD]), Slot::Empty);
    }
}
