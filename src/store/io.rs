//! The chunk store's data-file I/O behind one small trait, and a fault-injecting layer for it.
//!
//! The store never touches its data file but through [`DataFile`], so tests can make writes,
//! syncs and reads fail (EIO, ENOSPC) or stall where the kernel cannot fail on demand. Faults are
//! chosen per image by the `VMTHUNDER_STORE_FAULTS` environment variable of `vmtd` (testing only;
//! see the README, "Fault injection"); without it the plain file layer is used and nothing here
//! costs anything.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;

/// Positioned I/O on one data file. Every call blocks: callers run it on the blocking pool.
pub trait DataFile: Send + Sync {
    /// Fills `buf` from `offset`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Reads `len` bytes at `offset` into a new buffer.
    fn read_vec(&self, offset: u64, len: usize) -> io::Result<Vec<u8>>;
    /// Reads `len` bytes at `offset` only if that cannot block on the disk (all of it is in the
    /// page cache): `None` when it would, or on any error (the blocking read then reports it).
    /// Cheap enough for a runtime thread.
    fn read_nowait(&self, _offset: u64, _len: usize) -> Option<Vec<u8>> {
        None
    }
    /// Writes all of `data` at `offset`.
    fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()>;
    /// `fdatasync`: makes every completed write durable, or reports that some may be lost.
    fn sync_data(&self) -> io::Result<()>;
    /// The same file through a new descriptor (after a failed sync).
    fn reopen(&self) -> io::Result<Arc<dyn DataFile>>;
    /// Frees the blocks of `[offset, offset + len)`; the file keeps its size and the range reads
    /// as zeros. Called only for chunks the state file no longer claims.
    fn punch(&self, offset: u64, len: u64) -> io::Result<()>;
}

/// The data file itself.
pub struct PlainFile {
    path: PathBuf,
    file: File,
}

impl PlainFile {
    /// Opens (creating if needed) the data file at `path` for reading and writing.
    pub fn open(path: &Path) -> io::Result<Self> {
        let file = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path)?;
        Ok(PlainFile { path: path.to_path_buf(), file })
    }

    pub fn file(&self) -> &File {
        &self.file
    }
}

impl DataFile for PlainFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    fn read_vec(&self, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        let mut buf = Vec::<u8>::with_capacity(len);
        while buf.len() < len {
            let done = buf.len();
            let at = i64::try_from(offset + done as u64).map_err(|_| io::ErrorKind::InvalidInput)?;
            // SAFETY: the kernel writes at most `len - done` bytes into the spare capacity, and
            // the length grows by exactly what it reports written.
            let n = unsafe { libc::pread(self.file.as_raw_fd(), buf.as_mut_ptr().add(done).cast(), len - done, at) };
            match n {
                0 => return Err(io::ErrorKind::UnexpectedEof.into()),
                n if n < 0 => {
                    let e = io::Error::last_os_error();
                    if e.kind() != io::ErrorKind::Interrupted {
                        return Err(e);
                    }
                }
                // SAFETY: `n` more bytes were initialised by the read above.
                n => unsafe { buf.set_len(done + n as usize) },
            }
        }
        Ok(buf)
    }

    fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(data, offset)
    }

    fn read_nowait(&self, offset: u64, len: usize) -> Option<Vec<u8>> {
        let mut buf = Vec::<u8>::with_capacity(len);
        let iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: len };
        let at = i64::try_from(offset).ok()?;
        // SAFETY: the kernel writes at most `len` bytes into the buffer's capacity; RWF_NOWAIT
        // makes it return EAGAIN (or a short count) instead of waiting for the disk.
        let n = unsafe { libc::preadv2(self.file.as_raw_fd(), &iov, 1, at, libc::RWF_NOWAIT) };
        if n != len as isize {
            return None;
        }
        // SAFETY: all `len` bytes were initialised by the read above.
        unsafe { buf.set_len(len) };
        Some(buf)
    }

    fn sync_data(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn reopen(&self) -> io::Result<Arc<dyn DataFile>> {
        Ok(Arc::new(PlainFile::open(&self.path)?))
    }

    fn punch(&self, offset: u64, len: u64) -> io::Result<()> {
        let (at, n) = (i64::try_from(offset), i64::try_from(len));
        let (Ok(at), Ok(n)) = (at, n) else { return Err(io::ErrorKind::InvalidInput.into()) };
        // SAFETY: fallocate on an owned descriptor; no memory is passed.
        let r = unsafe {
            libc::fallocate(self.file.as_raw_fd(), libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, at, n)
        };
        if r == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }
}

/// Errors in a fault specification.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum FaultSpecError {
    #[error(
        "store fault {0:?}: expected [IMAGE@]OP=KIND[/N] with OP read|write|sync and KIND eio|enospc|delay:DURATION"
    )]
    Malformed(String),
}

/// What an injected fault does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultKind {
    Errno(i32),
    Delay(Duration),
}

/// The operation a fault applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultOp {
    Read,
    Write,
    Sync,
}

/// One rule: every `every`-th `op` suffers `kind`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fault {
    pub image: Option<String>,
    pub op: FaultOp,
    pub kind: FaultKind,
    pub every: u64,
}

/// Parses `[IMAGE@]OP=KIND[/N]` entries separated by commas, e.g.
/// `base@sync=eio/3,slow@read=delay:200ms`.
pub fn parse_faults(spec: &str) -> Result<Vec<Fault>, FaultSpecError> {
    let bad = |s: &str| FaultSpecError::Malformed(s.to_string());
    let mut out = Vec::new();
    for entry in spec.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let (image, rule) = match entry.split_once('@') {
            Some((i, r)) if !i.is_empty() => (Some(i.to_string()), r),
            Some(_) => return Err(bad(entry)),
            None => (None, entry),
        };
        let (op, rest) = rule.split_once('=').ok_or_else(|| bad(entry))?;
        let op = match op {
            "read" => FaultOp::Read,
            "write" => FaultOp::Write,
            "sync" => FaultOp::Sync,
            _ => return Err(bad(entry)),
        };
        let (kind, every) = match rest.split_once('/') {
            Some((k, n)) => (k, n.parse::<u64>().ok().filter(|n| *n > 0).ok_or_else(|| bad(entry))?),
            None => (rest, 1),
        };
        let kind = match kind {
            "eio" => FaultKind::Errno(libc::EIO),
            "enospc" => FaultKind::Errno(libc::ENOSPC),
            d => match d.strip_prefix("delay:").map(crate::config::parse_duration) {
                Some(Ok(d)) => FaultKind::Delay(d),
                _ => return Err(bad(entry)),
            },
        };
        out.push(Fault { image, op, kind, every });
    }
    Ok(out)
}

/// A [`DataFile`] that suffers the given faults; counts survive [`DataFile::reopen`].
///
/// A failed sync loses what it should have made durable, as a disk that failed writeback does:
/// every range written since the last good sync is overwritten with [`LOST`] bytes, so a store
/// that served such a chunk afterwards would serve wrong bytes, and a test can tell.
pub struct FaultyFile {
    inner: Arc<dyn DataFile>,
    rules: Arc<Vec<(Fault, AtomicU64)>>,
    unsynced: Arc<std::sync::Mutex<Vec<(u64, usize)>>>,
}

/// What a failed sync leaves where its data was.
pub const LOST: u8 = 0xEE;

impl FaultyFile {
    pub fn new(inner: Arc<dyn DataFile>, faults: Vec<Fault>) -> Self {
        let rules = Arc::new(faults.into_iter().map(|f| (f, AtomicU64::new(0))).collect());
        FaultyFile { inner, rules, unsynced: Default::default() }
    }

    fn check(&self, op: FaultOp) -> io::Result<()> {
        for (f, count) in self.rules.iter().filter(|(f, _)| f.op == op) {
            if (count.fetch_add(1, Ordering::SeqCst) + 1) % f.every != 0 {
                continue;
            }
            match f.kind {
                FaultKind::Errno(e) => return Err(io::Error::from_raw_os_error(e)),
                FaultKind::Delay(d) => std::thread::sleep(d),
            }
        }
        Ok(())
    }
}

impl DataFile for FaultyFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.check(FaultOp::Read)?;
        self.inner.read_at(buf, offset)
    }

    fn read_vec(&self, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        self.check(FaultOp::Read)?;
        self.inner.read_vec(offset, len)
    }

    fn read_nowait(&self, offset: u64, len: usize) -> Option<Vec<u8>> {
        // Reads with faults take the blocking path, where the faults are.
        if self.rules.iter().any(|(f, _)| f.op == FaultOp::Read) {
            return None;
        }
        self.inner.read_nowait(offset, len)
    }

    fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        // A failed write may have written part of its data, as a real one may.
        if let Err(e) = self.check(FaultOp::Write) {
            let _ = self.inner.write_at(&vec![LOST; data.len() / 2], offset);
            return Err(e);
        }
        self.inner.write_at(data, offset)?;
        self.unsynced.lock().unwrap().push((offset, data.len()));
        Ok(())
    }

    fn sync_data(&self) -> io::Result<()> {
        let mut unsynced = self.unsynced.lock().unwrap();
        if let Err(e) = self.check(FaultOp::Sync) {
            for (offset, len) in unsynced.drain(..) {
                self.inner.write_at(&vec![LOST; len], offset)?;
            }
            // Made durable as lost: a page cache dropped after the failure shows the same.
            let _ = self.inner.sync_data();
            return Err(e);
        }
        self.inner.sync_data()?;
        unsynced.clear();
        Ok(())
    }

    fn punch(&self, offset: u64, len: u64) -> io::Result<()> {
        self.inner.punch(offset, len)
    }

    fn reopen(&self) -> io::Result<Arc<dyn DataFile>> {
        Ok(Arc::new(FaultyFile {
            inner: self.inner.reopen()?,
            rules: self.rules.clone(),
            unsynced: self.unsynced.clone(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fault_specs_parse_and_refuse() {
        let f = parse_faults("base@sync=eio/3, read=delay:200ms,write=enospc").unwrap();
        assert_eq!(f.len(), 3);
        assert_eq!(
            f[0],
            Fault { image: Some("base".into()), op: FaultOp::Sync, kind: FaultKind::Errno(libc::EIO), every: 3 }
        );
        assert_eq!(f[1].kind, FaultKind::Delay(Duration::from_millis(200)));
        assert_eq!(f[2].every, 1);
        for bad in ["sync", "x=eio", "sync=eio/0", "sync=boom", "@read=eio", "read=delay:soon"] {
            assert!(parse_faults(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn every_nth_operation_fails() {
        let dir = tempfile::tempdir().unwrap();
        let plain: Arc<dyn DataFile> = Arc::new(PlainFile::open(&dir.path().join("d")).unwrap());
        let f = FaultyFile::new(plain, parse_faults("sync=eio/2").unwrap());
        f.write_at(b"abcd", 0).unwrap();
        assert!(f.sync_data().is_ok());
        let err = f.sync_data().unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EIO));
        assert_eq!(f.read_vec(0, 4).unwrap(), b"abcd", "synced before the failure: kept");
        f.write_at(b"efgh", 4).unwrap();
        let again = f.reopen().unwrap();
        assert!(again.sync_data().is_ok(), "the third sync");
        again.write_at(b"ijkl", 8).unwrap();
        assert!(again.sync_data().is_err(), "counts survive a reopen");
        assert_eq!(again.read_vec(0, 12).unwrap(), b"abcdefgh\xee\xee\xee\xee", "the failed sync lost its write");
        assert_eq!(again.read_nowait(2, 4).as_deref(), Some(&b"cdef"[..]), "in the page cache: no wait");
        assert!(again.read_nowait(8, 100).is_none(), "short: beyond the end");
    }
}
