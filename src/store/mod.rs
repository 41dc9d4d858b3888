//! The node cache of one image: a sparse data file plus a roaring presence map.
//!
//! ```text
//!   put(idx, data) ── pwrite ──▶ data file ──┐          readable (memory): served at once
//!                                            │
//!   commit() ── fdatasync(data) ──▶ durable |= pending ──▶ state file (atomic replace)
//! ```
//!
//! Invariants:
//! - only chunks already verified against the manifest are `put`;
//! - a chunk enters the *persisted* presence map only after an fdatasync of the data file that
//!   follows its write (group commit: one sync covers every chunk put before it);
//! - on open, the state file must name this image (root digest, size, chunk size) or opening
//!   fails: a cache is never served for another image.
//!
//! Chunks are readable from memory before they are durable: after a crash they are simply
//! fetched again, never served from a state that claims more than the disk holds.

pub mod state;

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, RwLock};

use roaring::RoaringBitmap;
use thiserror::Error;

use crate::fsutil;
use crate::image::{ChunkIdx, Digest, Geometry, Manifest};
pub use state::StateError;

/// Errors of the chunk store.
#[derive(Debug, Error)]
pub enum StoreError {
    /// A file or directory of the cache could not be used.
    #[error("cache {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    /// The state file is unreadable or belongs to another image.
    #[error("cache state {path}: {source} (remove the directory to start this cache afresh)")]
    State { path: PathBuf, source: StateError },
    /// The data file's size does not match the image.
    #[error("cache data file {path} is {found} bytes, the image is {want} (remove the directory to start afresh)")]
    SizeMismatch { path: PathBuf, found: u64, want: u64 },
    /// Another process holds this cache.
    #[error("cache {0} is in use by another process")]
    Locked(PathBuf),
    /// A chunk handed to `put` has the wrong length.
    #[error("{idx} has {got} bytes, expected {want}")]
    BadChunkLen { idx: ChunkIdx, got: usize, want: usize },
}

/// The cache of one image on this node.
pub struct ChunkStore {
    dir: PathBuf,
    geometry: Geometry,
    root: Digest,
    data: File,
    _lock: File,
    /// Chunks whose data is in the data file (maybe not yet durable): safe to serve.
    readable: RwLock<RoaringBitmap>,
    /// Chunks written since the last commit.
    pending: Mutex<Vec<u32>>,
    /// Chunks recorded in the state file; the lock also serialises commits.
    durable: Mutex<RoaringBitmap>,
    /// Serialises data-file writes: concurrent buffered writes to one file contend on the
    /// inode lock in the kernel, and spinning there costs more than queueing here.
    write: Mutex<()>,
}

impl ChunkStore {
    /// The directory under `cache_dir` holding the cache of the image with root `root`.
    pub fn dir_for(cache_dir: &Path, root: &Digest) -> PathBuf {
        cache_dir.join(root.to_hex())
    }

    /// Opens (or creates) the cache of `manifest`'s image under `cache_dir`.
    pub fn open(cache_dir: &Path, manifest: &Manifest) -> Result<Self, StoreError> {
        let geometry = manifest.geometry();
        let root = manifest.root();
        let dir = Self::dir_for(cache_dir, &root);
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| StoreError::Io { path, source }
        };
        fs::create_dir_all(&dir).map_err(io(&dir))?;

        let lock_path = dir.join("lock");
        let lock =
            OpenOptions::new().create(true).truncate(false).write(true).open(&lock_path).map_err(io(&lock_path))?;
        // SAFETY: flock on a valid, owned descriptor.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            return Err(StoreError::Locked(dir));
        }

        let manifest_path = dir.join("manifest");
        if !manifest_path.exists() {
            manifest.save(&manifest_path).map_err(|e| StoreError::Io {
                path: manifest_path.clone(),
                source: std::io::Error::other(e.to_string()),
            })?;
        }

        let state_path = dir.join("state");
        let durable = match fs::read(&state_path) {
            Ok(bytes) => state::decode(&bytes, &geometry, &root)
                .map_err(|source| StoreError::State { path: state_path.clone(), source })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => RoaringBitmap::new(),
            Err(e) => return Err(io(&state_path)(e)),
        };

        let data_path = dir.join("data");
        let data = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&data_path)
            .map_err(io(&data_path))?;
        let len = data.metadata().map_err(io(&data_path))?.len();
        if len == 0 && durable.is_empty() {
            data.set_len(geometry.image_size()).map_err(io(&data_path))?;
        } else if len != geometry.image_size() {
            return Err(StoreError::SizeMismatch { path: data_path, found: len, want: geometry.image_size() });
        }

        Ok(ChunkStore {
            dir,
            geometry,
            root,
            data,
            _lock: lock,
            readable: RwLock::new(durable.clone()),
            pending: Mutex::new(Vec::new()),
            durable: Mutex::new(durable),
            write: Mutex::new(()),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn geometry(&self) -> Geometry {
        self.geometry
    }

    /// True when chunk `idx` can be served from this cache.
    pub fn has(&self, idx: ChunkIdx) -> bool {
        self.readable.read().unwrap().contains(idx.0)
    }

    /// True when every chunk in `range` can be served from this cache.
    pub fn has_all(&self, range: std::ops::Range<u32>) -> bool {
        let len = u64::from(range.end - range.start);
        len == 0 || self.readable.read().unwrap().range_cardinality(range) == len
    }

    /// Number of chunks that can be served.
    pub fn present_count(&self) -> u64 {
        self.readable.read().unwrap().len()
    }

    /// A copy of the set of chunks that can be served.
    pub fn present(&self) -> RoaringBitmap {
        self.readable.read().unwrap().clone()
    }

    /// Reads image bytes at `offset`; the caller has checked that the chunks are present.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.data.read_exact_at(buf, offset)
    }

    /// Reads `len` image bytes at `offset` into a new buffer; the caller has checked that the
    /// chunks are present. The buffer is not zeroed first: the read fills it.
    pub fn read_vec(&self, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
        let mut buf = Vec::<u8>::with_capacity(len);
        while buf.len() < len {
            let done = buf.len();
            let at = i64::try_from(offset + done as u64).map_err(|_| std::io::ErrorKind::InvalidInput)?;
            // SAFETY: the kernel writes at most `len - done` bytes into the spare capacity, and
            // the length grows by exactly what it reports written.
            let n = unsafe { libc::pread(self.data.as_raw_fd(), buf.as_mut_ptr().add(done).cast(), len - done, at) };
            match n {
                0 => return Err(std::io::ErrorKind::UnexpectedEof.into()),
                n if n < 0 => {
                    let e = std::io::Error::last_os_error();
                    if e.kind() != std::io::ErrorKind::Interrupted {
                        return Err(e);
                    }
                }
                // SAFETY: `n` more bytes were initialised by the read above.
                n => unsafe { buf.set_len(done + n as usize) },
            }
        }
        Ok(buf)
    }

    /// Stores verified chunk `idx`. It is served at once and made durable by the next commit.
    pub fn put(&self, idx: ChunkIdx, data: &[u8]) -> Result<(), StoreError> {
        self.put_span(idx.0..idx.0 + 1, data)
    }

    /// Stores the verified, adjacent chunks `span` (their bytes back to back in `data`) with one
    /// write. They are served at once and made durable by the next commit.
    pub fn put_span(&self, span: std::ops::Range<u32>, data: &[u8]) -> Result<(), StoreError> {
        let first = ChunkIdx(span.start);
        let offset = match self.geometry.run_bytes(span.clone()) {
            Some((offset, want)) if data.len() == want => offset.0,
            found => {
                let want = found.map_or(0, |(_, want)| want);
                return Err(StoreError::BadChunkLen { idx: first, got: data.len(), want });
            }
        };
        {
            let _queue = self.write.lock().unwrap();
            self.data
                .write_all_at(data, offset)
                .map_err(|source| StoreError::Io { path: self.dir.join("data"), source })?;
        }
        self.pending.lock().unwrap().extend(span.clone());
        self.readable.write().unwrap().insert_range(span);
        Ok(())
    }

    /// The chunks of `range` that cannot be served yet (one look at the presence map).
    pub fn missing(&self, range: std::ops::Range<u32>) -> Vec<u32> {
        let readable = self.readable.read().unwrap();
        range.filter(|i| !readable.contains(*i)).collect()
    }

    /// Number of chunks written but not yet committed.
    pub fn pending_count(&self) -> usize {
        self.pending.lock().unwrap().len()
    }

    /// Group commit: makes every chunk put so far durable, then records them in the state file.
    /// Returns how many chunks were newly recorded.
    pub fn commit(&self) -> Result<usize, StoreError> {
        let mut durable = self.durable.lock().unwrap();
        let batch = std::mem::take(&mut *self.pending.lock().unwrap());
        if batch.is_empty() {
            return Ok(0);
        }
        let result = self.persist(&mut durable, &batch);
        if result.is_err() {
            // Not recorded: keep them pending so the next commit tries again.
            self.pending.lock().unwrap().extend_from_slice(&batch);
        }
        result.map(|()| batch.len())
    }

    fn persist(&self, durable: &mut RoaringBitmap, batch: &[u32]) -> Result<(), StoreError> {
        // Every pwrite of `batch` completed before its index was queued, so this sync covers it.
        self.data.sync_data().map_err(|source| StoreError::Io { path: self.dir.join("data"), source })?;
        let mut next = durable.clone();
        next.extend(batch.iter().copied());
        let path = self.dir.join("state");
        fsutil::write_atomic(&path, &state::encode(&self.geometry, &self.root, &next), 0o600)
            .map_err(|source| StoreError::Io { path, source })?;
        *durable = next;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::ChunkSize;

    fn manifest(data: &[u8]) -> Manifest {
        let g = Geometry::new(data.len() as u64, ChunkSize::new(4096).unwrap()).unwrap();
        Manifest::build(g, |idx, buf| {
            let o = g.chunk_offset(idx).0 as usize;
            buf.copy_from_slice(&data[o..o + buf.len()]);
            Ok::<_, ()>(())
        })
        .unwrap()
    }

    #[test]
    fn put_commit_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..20_000u32).map(|i| (i % 253) as u8).collect();
        let m = manifest(&data);
        {
            let s = ChunkStore::open(dir.path(), &m).unwrap();
            assert!(!s.has(ChunkIdx(1)));
            s.put(ChunkIdx(1), &data[4096..8192]).unwrap();
            s.put(ChunkIdx(4), &data[16384..]).unwrap();
            assert!(s.has(ChunkIdx(1)) && s.has_all(4..5) && !s.has_all(0..2));
            assert_eq!(s.commit().unwrap(), 2);
            s.put(ChunkIdx(2), &data[8192..12288]).unwrap();
            // Not committed: must not survive the "crash" below.
        }
        let s = ChunkStore::open(dir.path(), &m).unwrap();
        assert_eq!(s.present().iter().collect::<Vec<_>>(), vec![1, 4]);
        let mut buf = vec![0u8; 4096];
        s.read_at(4096, &mut buf).unwrap();
        assert_eq!(buf, &data[4096..8192]);
        assert_eq!(s.read_vec(4100, 3000).unwrap(), &data[4100..7100]);
        assert!(s.read_vec(19_000, 2000).is_err(), "beyond the end of the data file");
    }

    #[test]
    fn wrong_length_and_second_opener_refused() {
        let dir = tempfile::tempdir().unwrap();
        let data = vec![7u8; 10_000];
        let m = manifest(&data);
        let s = ChunkStore::open(dir.path(), &m).unwrap();
        assert!(matches!(s.put(ChunkIdx(0), &data[..100]), Err(StoreError::BadChunkLen { .. })));
        assert!(matches!(s.put_span(0..2, &data[..4096]), Err(StoreError::BadChunkLen { .. })));
        assert!(matches!(s.put_span(1..1, &[]), Err(StoreError::BadChunkLen { .. })));
        assert!(matches!(s.put_span(2..4, &data[8192..]), Err(StoreError::BadChunkLen { .. })), "beyond the image");
        s.put_span(1..3, &data[4096..]).unwrap();
        assert!(s.has_all(1..3) && !s.has(ChunkIdx(0)));
        assert_eq!(s.missing(0..3), vec![0]);
        assert_eq!(s.pending_count(), 2);
        assert!(matches!(ChunkStore::open(dir.path(), &m), Err(StoreError::Locked(_))));
    }

    #[test]
    fn foreign_state_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let data = vec![7u8; 10_000];
        let m = manifest(&data);
        let s = ChunkStore::open(dir.path(), &m).unwrap();
        s.put(ChunkIdx(0), &data[..4096]).unwrap();
        s.commit().unwrap();
        let state = s.dir().join("state");
        drop(s);
        let mut bytes = fs::read(&state).unwrap();
        bytes[30] ^= 0xff;
        fs::write(&state, &bytes).unwrap();
        let err = ChunkStore::open(dir.path(), &m).err().unwrap().to_string();
        assert!(err.contains("checksum"), "{err}");
    }
}
