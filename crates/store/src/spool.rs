//! Message bodies on their way in: a [`Spool`] takes the bytes of a message
//! as the SMTP session produces them, keeps a small message in memory and
//! writes a larger one to a file in the store's `tmp/`, hashing it as it
//! goes (SHA-256: the name of the body in `bodies/`). Finished, it is a
//! [`Body`]: the bytes, or a [`StagedFile`] that the store renames into
//! `bodies/` at commit (no second copy). A spool or staged file dropped
//! before that (the message was refused, the client went away) removes its
//! file at once.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::PathBuf;
use std::sync::Arc;

use sha2::Digest;

use crate::{BodyHash, StoreError, StoreResult};

/// The body of an [`crate::Incoming`] message.
#[derive(Debug)]
pub enum Body {
    /// Whole in memory (small messages, generated reports, tests).
    Bytes(Arc<Vec<u8>>),
    /// Written to the store's `tmp/` by a [`Spool`].
    Staged(StagedFile),
}

impl Body {
    /// Octets of the body.
    pub fn len(&self) -> u64 {
        match self {
            Body::Bytes(b) => b.len() as u64,
            Body::Staged(f) => f.size,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl From<Vec<u8>> for Body {
    fn from(bytes: Vec<u8>) -> Self {
        Body::Bytes(Arc::new(bytes))
    }
}

impl From<Arc<Vec<u8>>> for Body {
    fn from(bytes: Arc<Vec<u8>>) -> Self {
        Body::Bytes(bytes)
    }
}

/// A complete body in a file of the store's `tmp/`, not yet durable (the
/// store fdatasyncs it at commit, "commit = fsync then rename"). Removed
/// when dropped, unless the store took it.
#[derive(Debug)]
pub struct StagedFile {
    path: PathBuf,
    /// `None` once the store took the file.
    file: Option<File>,
    hash: BodyHash,
    size: u64,
}

impl StagedFile {
    pub fn hash(&self) -> BodyHash {
        self.hash
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// Where the file is, until the store takes it (to read a copy for
    /// another node).
    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    /// The path and the open file, for the store to rename and sync: the
    /// file is no longer removed on drop.
    pub(crate) fn take(mut self) -> StoreResult<(PathBuf, File)> {
        let file = self.file.take().ok_or_else(|| StoreError::Internal("a staged file was taken twice".into()))?;
        Ok((std::mem::take(&mut self.path), file))
    }
}

impl Drop for StagedFile {
    fn drop(&mut self) {
        if self.file.take().is_some() {
            remove_quietly(&self.path);
        }
    }
}

/// A message body being written (see the module documentation). Not
/// thread-safe by itself; the driver moves it to a blocking thread for an
/// append that writes ([`Spool::append_writes`]).
#[derive(Debug)]
pub struct Spool {
    path: PathBuf,
    file: Option<File>,
    /// Bytes not yet in the file (all of them while the body fits in
    /// `in_memory`).
    buffer: Vec<u8>,
    /// What may stay in memory: the body whole while it fits, then the
    /// write buffer.
    in_memory: usize,
    /// SHA-256 of the bytes written to the file so far.
    hasher: sha2::Sha256,
    /// Octets written to the file so far.
    written: u64,
}

impl Spool {
    /// A spool whose file, if it needs one, is `path` (created on the first
    /// write, never an existing file).
    pub(crate) fn new(path: PathBuf, in_memory: usize) -> Spool {
        Spool { path, file: None, buffer: Vec::new(), in_memory, hasher: sha2::Sha256::new(), written: 0 }
    }

    /// Octets appended so far.
    pub fn len(&self) -> u64 {
        self.written + self.buffer.len() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether the body went to a file.
    pub fn spilled(&self) -> bool {
        self.file.is_some()
    }

    /// Whether appending `more` octets writes to the file (blocking I/O)
    /// rather than only to memory.
    pub fn append_writes(&self, more: usize) -> bool {
        self.buffer.len().saturating_add(more) > self.in_memory
    }

    /// Appends bytes; writes to the file when they do not fit in memory.
    pub fn append(&mut self, bytes: &[u8]) -> StoreResult<()> {
        if !self.append_writes(bytes.len()) {
            self.keep(bytes);
            return Ok(());
        }
        self.flush()?;
        if bytes.len() <= self.in_memory {
            self.keep(bytes);
            Ok(())
        } else {
            self.write_out(bytes)
        }
    }

    /// The body: in memory if it never left it, else the staged file with
    /// the rest of the buffer written (blocking then).
    pub fn finish(mut self) -> StoreResult<Body> {
        if self.file.is_none() {
            return Ok(Body::from(std::mem::take(&mut self.buffer)));
        }
        self.flush()?;
        let hash = BodyHash(std::mem::take(&mut self.hasher).finalize().into());
        Ok(Body::Staged(StagedFile {
            path: std::mem::take(&mut self.path),
            file: self.file.take(),
            hash,
            size: self.written,
        }))
    }

    /// Adds bytes that fit in `in_memory` to the buffer. It grows by
    /// doubling, as a `Vec` does, but never past `in_memory`: the caller
    /// reserved that much from its memory budget, and a plain
    /// `extend_from_slice` could double a buffer of 65 KiB to 128 KiB and
    /// then to 256 KiB.
    fn keep(&mut self, bytes: &[u8]) {
        let needed = self.buffer.len() + bytes.len();
        if needed > self.buffer.capacity() {
            let capacity = needed.max(2 * self.buffer.capacity()).min(self.in_memory);
            self.buffer.reserve_exact(capacity - self.buffer.len());
        }
        self.buffer.extend_from_slice(bytes);
    }

    fn flush(&mut self) -> StoreResult<()> {
        let buffer = std::mem::take(&mut self.buffer);
        let result = self.write_out(&buffer);
        // The allocation is kept for the next bytes.
        self.buffer = buffer;
        self.buffer.clear();
        result
    }

    fn write_out(&mut self, bytes: &[u8]) -> StoreResult<()> {
        if bytes.is_empty() {
            return Ok(());
        }
        let file = match &mut self.file {
            Some(file) => file,
            None => {
                let file = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(&self.path)
                    .map_err(|e| StoreError::io(format!("creating {}", self.path.display()), e))?;
                self.file.insert(file)
            }
        };
        file.write_all(bytes).map_err(|e| StoreError::io(format!("writing {}", self.path.display()), e))?;
        self.hasher.update(bytes);
        self.written += bytes.len() as u64;
        Ok(())
    }
}

impl Drop for Spool {
    fn drop(&mut self) {
        if self.file.take().is_some() {
            remove_quietly(&self.path);
        }
    }
}

/// Removes a file that is no longer wanted; a failure only leaves a file
/// in `tmp/`, which the next start removes.
fn remove_quietly(path: &std::path::Path) {
    if let Err(e) = fs::remove_file(path) {
        if e.kind() != io::ErrorKind::NotFound {
            tracing::warn!(path = %path.display(), error = %e, "cannot remove a spool file; left for the next start");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(dir: &std::path::Path) -> usize {
        fs::read_dir(dir).unwrap().count()
    }

    #[test]
    fn small_bodies_stay_in_memory() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = Spool::new(dir.path().join("s"), 16);
        spool.append(b"0123456789").unwrap();
        assert!(!spool.append_writes(6) && spool.append_writes(7));
        spool.append(b"abcdef").unwrap();
        assert!(!spool.spilled());
        match spool.finish().unwrap() {
            Body::Bytes(b) => assert_eq!(&b[..], b"0123456789abcdef"),
            Body::Staged(_) => panic!("spilled"),
        }
        assert_eq!(files(dir.path()), 0);
    }

    #[test]
    fn the_buffer_never_grows_past_what_may_stay_in_memory() {
        let dir = tempfile::tempdir().unwrap();
        for in_memory in [0, 1, 7, 64, 1000, 128 * 1024] {
            for piece in [1, 3, 100, 999, 65 * 1024, 200 * 1024] {
                let mut spool = Spool::new(dir.path().join("s"), in_memory);
                let mut whole = Vec::new();
                while whole.len() < 3 * in_memory.max(piece) {
                    let bytes = vec![whole.len() as u8; piece];
                    spool.append(&bytes).unwrap();
                    whole.extend_from_slice(&bytes);
                    assert!(spool.buffer.capacity() <= in_memory, "{in_memory} {piece}: {}", spool.buffer.capacity());
                }
                let body = spool.finish().unwrap();
                assert_eq!(body.len(), whole.len() as u64);
            }
        }
        assert_eq!(files(dir.path()), 0);
    }

    #[test]
    fn large_bodies_go_to_a_hashed_file_removed_unless_taken() {
        let dir = tempfile::tempdir().unwrap();
        for in_memory in [0, 1, 7, 64] {
            let mut spool = Spool::new(dir.path().join("s"), in_memory);
            let mut whole = Vec::new();
            for i in 0..50u8 {
                let piece = vec![i; usize::from(i % 13)];
                spool.append(&piece).unwrap();
                whole.extend_from_slice(&piece);
                assert!(spool.buffer.len() <= in_memory);
            }
            assert_eq!(spool.len(), whole.len() as u64);
            let Body::Staged(staged) = spool.finish().unwrap() else { panic!("not spilled") };
            assert_eq!(staged.hash(), BodyHash::of(&whole));
            assert_eq!(staged.size(), whole.len() as u64);
            assert_eq!(fs::read(staged.path()).unwrap(), whole);
            drop(staged);
            assert_eq!(files(dir.path()), 0, "a staged file not taken is removed");
        }
        let mut spool = Spool::new(dir.path().join("s"), 0);
        spool.append(b"abandoned").unwrap();
        assert_eq!(files(dir.path()), 1);
        drop(spool);
        assert_eq!(files(dir.path()), 0, "an abandoned spool is removed");
    }
}
