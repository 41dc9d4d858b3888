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
//! - a failed write or sync is never retried into "durable": a sync that fails drops every chunk
//!   written since the last good sync (Linux reports a writeback error once, so the next sync
//!   would succeed over lost pages), and the data file is reopened;
//! - a chunk that cannot be read back is forgotten and fetched again; it is not cached again
//!   until a commit has recorded that it is gone, so a crash can never leave the state file
//!   claiming a chunk whose rewrite was lost;
//! - on open, the state file must name this image (root digest, size, chunk size) or opening
//!   fails: a cache is never served for another image.
//!
//! Chunks are readable before they are durable: after a crash they are simply fetched again,
//! never served from a state that claims more than the disk holds. Until its sync succeeds, a
//! chunk's bytes are checked against the manifest on every read from the data file: a writeback
//! may fail (and the page cache drop the data) long before the sync reports it; the verified
//! bytes a `put_span_kept` was given serve its reads instead, until the sync (`presence`). A
//! cache that keeps failing stops caching for a while ([`DEGRADE_AFTER`], [`DEGRADE_FOR`]);
//! reads are then served from the origin or peers without it. All calls block: callers use the
//! blocking pool.

pub mod budget;
mod evict;
pub mod gc;
pub mod io;
mod presence;
mod read;
pub mod state;

use std::fs::{self, File, OpenOptions};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use roaring::RoaringBitmap;
use thiserror::Error;

use crate::fsutil;
use crate::image::{ChunkIdx, Digest, Geometry, Manifest};
pub use budget::Budget;
pub use evict::{tick, Evicted};
use io::{DataFile, Fault, FaultyFile, PlainFile};
use presence::Presence;
pub use presence::KEEP_MAX;
pub use state::StateError;

/// Failed writes or syncs in a row after which the cache stops caching for [`DEGRADE_FOR`].
pub const DEGRADE_AFTER: u32 = 3;
/// How long a failing cache stops caching before it tries again.
pub const DEGRADE_FOR: Duration = Duration::from_secs(30);
/// How long a cache whose disk is full stops caching before it tries again.
pub const FULL_FOR: Duration = Duration::from_secs(5);

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
    /// The data file's sync failed: the chunks written since the last good sync were dropped.
    #[error("cache {path}: sync failed, {dropped} chunks dropped and to be fetched again: {source}")]
    SyncFailed { path: PathBuf, dropped: usize, source: std::io::Error },
    /// The chunk was dropped and is cached again only after the next commit records that.
    #[error("{0} was dropped from the cache and is not cached again until the next commit")]
    Forgetting(ChunkIdx),
    /// The cache failed repeatedly and is not caching for now.
    #[error("cache {0} is failing; not caching for now")]
    Degraded(PathBuf),
    /// The cache's filesystem is full (ENOSPC): served without caching for now.
    #[error("cache {0}: no space left; not caching for now")]
    NoSpace(PathBuf),
    /// The node's cache budget is spent: served without caching until the collector frees space.
    #[error("cache budget spent; not caching {0}")]
    OverBudget(ChunkIdx),
    /// The chunk is being evicted and may be cached again once its hole is punched.
    #[error("{0} is being evicted")]
    Evicting(ChunkIdx),
}

/// Counters of the store's failures.
#[derive(Debug, Default)]
pub struct StoreStats {
    pub write_errors: AtomicU64,
    pub sync_errors: AtomicU64,
    pub read_errors: AtomicU64,
    /// Chunks dropped from the presence map by a failure or a failed verification.
    pub chunks_dropped: AtomicU64,
    /// Fetched chunks served without being cached: the disk was full or the budget spent.
    pub chunks_not_cached: AtomicU64,
    /// Chunks evicted to keep the node within its budget.
    pub chunks_evicted: AtomicU64,
    /// Cache reads of chunks not durable yet served from their kept bytes (no read, no check).
    pub kept_reads: AtomicU64,
}

/// What [`ChunkStore::verify`] found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VerifyReport {
    pub checked: u64,
    /// Chunks whose bytes do not match the manifest or cannot be read; they were dropped.
    pub bad: u64,
}

/// The cache of one image on this node.
pub struct ChunkStore {
    dir: PathBuf,
    geometry: Geometry,
    root: Digest,
    data: RwLock<Arc<dyn DataFile>>,
    _lock: File,
    /// Chunks whose data is in the data file, and which of them are not durable yet.
    presence: RwLock<Presence>,
    manifest: Arc<Manifest>,
    /// Chunks written since the last commit.
    pending: Mutex<Vec<u32>>,
    /// Chunks dropped after a failed read or verification that the state file may still claim:
    /// `put` refuses them until a commit has recorded their removal.
    forgotten: Mutex<RoaringBitmap>,
    /// Chunks recorded in the state file; the lock also serialises commits.
    durable: Mutex<RoaringBitmap>,
    /// Serialises data-file writes with their entry in `pending`, and a failed sync's drop of
    /// `pending` with both: a write is either dropped by that sync or made after it. Also,
    /// concurrent buffered writes to one file contend on the inode lock in the kernel, and
    /// spinning there costs more than queueing here.
    write: Mutex<()>,
    /// Failed writes and syncs in a row, and when a degraded cache may try again.
    failures: AtomicU32,
    degraded_until: Mutex<Option<Instant>>,
    stats: StoreStats,
    /// Held (shared) from a read's presence check until its bytes are read; an eviction takes
    /// it exclusively to drop chunks from `presence`, so a hole is never punched under a read.
    reading: RwLock<()>,
    /// Chunks on their way out: `put` refuses them until their holes are punched.
    evicting: Mutex<RoaringBitmap>,
    /// Per chunk, the [`tick`] of its last use (0: not used since open): eviction order.
    uses: Box<[AtomicU32]>,
    last_use: AtomicU32,
    /// The node's budget, when `[cache] max` is set.
    budget: OnceLock<Arc<Budget>>,
    /// Set when the disk was full: no caching until then.
    full_until: Mutex<Option<Instant>>,
    full_warning: crate::throttle::Throttle,
    /// The state file was removed to free a full disk (it claims nothing now): the next commit
    /// writes it again even with nothing new to record.
    restate: std::sync::atomic::AtomicBool,
}

impl ChunkStore {
    /// The directory under `cache_dir` holding the cache of the image with root `root`.
    pub fn dir_for(cache_dir: &Path, root: &Digest) -> PathBuf {
        cache_dir.join(root.to_hex())
    }

    /// Opens (or creates) the cache of `manifest`'s image under `cache_dir`.
    pub fn open(cache_dir: &Path, manifest: &Arc<Manifest>) -> Result<Self, StoreError> {
        Self::open_with_faults(cache_dir, manifest, Vec::new())
    }

    /// [`ChunkStore::open`] with `faults` injected into the data file's I/O (tests).
    pub fn open_with_faults(
        cache_dir: &Path,
        manifest: &Arc<Manifest>,
        faults: Vec<Fault>,
    ) -> Result<Self, StoreError> {
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
        let plain = PlainFile::open(&data_path).map_err(io(&data_path))?;
        let len = plain.file().metadata().map_err(io(&data_path))?.len();
        if len == 0 && durable.is_empty() {
            plain.file().set_len(geometry.image_size()).map_err(io(&data_path))?;
        } else if len != geometry.image_size() {
            return Err(StoreError::SizeMismatch { path: data_path, found: len, want: geometry.image_size() });
        }
        let data: Arc<dyn DataFile> =
            if faults.is_empty() { Arc::new(plain) } else { Arc::new(FaultyFile::new(Arc::new(plain), faults)) };

        let store = ChunkStore {
            dir,
            geometry,
            root,
            data: RwLock::new(data),
            _lock: lock,
            presence: RwLock::new(Presence::new(durable.clone())),
            manifest: manifest.clone(),
            pending: Mutex::new(Vec::new()),
            forgotten: Mutex::new(RoaringBitmap::new()),
            durable: Mutex::new(durable),
            write: Mutex::new(()),
            failures: AtomicU32::new(0),
            degraded_until: Mutex::new(None),
            stats: StoreStats::default(),
            reading: RwLock::new(()),
            evicting: Mutex::new(RoaringBitmap::new()),
            uses: (0..geometry.chunk_count()).map(|_| AtomicU32::new(0)).collect(),
            last_use: AtomicU32::new(0),
            budget: OnceLock::new(),
            full_until: Mutex::new(None),
            full_warning: crate::throttle::Throttle::new(),
            restate: std::sync::atomic::AtomicBool::new(false),
        };
        store.reclaim_unclaimed();
        Ok(store)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn geometry(&self) -> Geometry {
        self.geometry
    }

    pub fn stats(&self) -> &StoreStats {
        &self.stats
    }

    /// True while the cache is failing and not caching.
    pub fn degraded(&self) -> bool {
        self.degraded_until.lock().unwrap().is_some_and(|t| Instant::now() < t)
    }

    fn file(&self) -> Arc<dyn DataFile> {
        self.data.read().unwrap().clone()
    }

    /// True when chunk `idx` can be served from this cache.
    pub fn has(&self, idx: ChunkIdx) -> bool {
        self.presence.read().unwrap().readable.contains(idx.0)
    }

    /// True when every chunk in `range` can be served from this cache.
    pub fn has_all(&self, range: std::ops::Range<u32>) -> bool {
        let len = u64::from(range.end - range.start);
        len == 0 || self.presence.read().unwrap().readable.range_cardinality(range) == len
    }

    /// Bytes of chunks not durable yet kept in memory (see `presence`).
    pub fn kept_bytes(&self) -> u64 {
        self.presence.read().unwrap().kept_len() as u64
    }

    /// Number of chunks that can be served.
    pub fn present_count(&self) -> u64 {
        self.presence.read().unwrap().readable.len()
    }

    /// A copy of the set of chunks that can be served.
    pub fn present(&self) -> RoaringBitmap {
        self.presence.read().unwrap().readable.clone()
    }

    /// True when a commit has work: chunks to record, or forgotten ones to remove from the state.
    pub fn needs_commit(&self) -> bool {
        self.pending_count() > 0 || !self.forgotten.lock().unwrap().is_empty() || self.restate.load(Ordering::SeqCst)
    }

    /// Drops the chunks of `range` from the presence map: they are fetched again when read, and
    /// cached again once the next commit has removed them from the state file.
    pub fn forget(&self, range: std::ops::Range<u32>) {
        let mut forgotten = self.forgotten.lock().unwrap();
        let mut presence = self.presence.write().unwrap();
        for i in range {
            if presence.remove(i) {
                self.stats.chunks_dropped.fetch_add(1, Ordering::Relaxed);
                forgotten.insert(i);
            }
        }
    }

    /// Stores verified chunk `idx`. It is served at once and made durable by the next commit.
    pub fn put(&self, idx: ChunkIdx, data: &[u8]) -> Result<(), StoreError> {
        self.put_span(idx.0..idx.0 + 1, data)
    }

    /// Stores the verified, adjacent chunks `span` (their bytes back to back in `data`) with one
    /// write. They are served at once and made durable by the next commit.
    pub fn put_span(&self, span: std::ops::Range<u32>, data: &[u8]) -> Result<(), StoreError> {
        self.put_inner(span, data, None)
    }

    /// [`ChunkStore::put_span`] of bytes the caller shares: until the chunks are durable, reads
    /// of them are served from these bytes (see `presence`) instead of read back and checked.
    /// `pins` is the length of the buffer `data` is a slice of (its own length if it is all of
    /// it): the chunks share that buffer only when they are all of it, else they are copied.
    pub fn put_span_kept(&self, span: std::ops::Range<u32>, data: Bytes, pins: usize) -> Result<(), StoreError> {
        let keep = data.clone();
        self.put_inner(span, &data, Some((keep, pins)))
    }

    fn put_inner(
        &self,
        span: std::ops::Range<u32>,
        data: &[u8],
        keep: Option<(Bytes, usize)>,
    ) -> Result<(), StoreError> {
        let first = ChunkIdx(span.start);
        let offset = match self.geometry.run_bytes(span.clone()) {
            Some((offset, want)) if data.len() == want => offset.0,
            found => {
                let want = found.map_or(0, |(_, want)| want);
                return Err(StoreError::BadChunkLen { idx: first, got: data.len(), want });
            }
        };
        if self.degraded() {
            return Err(StoreError::Degraded(self.dir.clone()));
        }
        let n = u64::from(span.end - span.start);
        if self.full_until.lock().unwrap().is_some_and(|t| Instant::now() < t) {
            self.stats.chunks_not_cached.fetch_add(n, Ordering::Relaxed);
            return Err(StoreError::NoSpace(self.dir.clone()));
        }
        let _queue = self.write.lock().unwrap();
        if self.forgotten.lock().unwrap().range_cardinality(span.clone()) > 0 {
            return Err(StoreError::Forgetting(first));
        }
        if self.evicting.lock().unwrap().range_cardinality(span.clone()) > 0 {
            return Err(StoreError::Evicting(first));
        }
        let budget = self.budget.get();
        if budget.is_some_and(|b| !b.admit(data.len() as u64)) {
            self.stats.chunks_not_cached.fetch_add(n, Ordering::Relaxed);
            return Err(StoreError::OverBudget(first));
        }
        let written = self.file().write_at(data, offset);
        if let Some(b) = budget {
            b.written(data.len() as u64);
        }
        if let Err(source) = written {
            if let Some(b) = budget {
                b.give_back(data.len() as u64);
            }
            if fsutil::is_full(&source) {
                return Err(self.disk_full(n, source));
            }
            self.stats.write_errors.fetch_add(1, Ordering::Relaxed);
            self.failed(&source);
            return Err(StoreError::Io { path: self.dir.join("data"), source });
        }
        self.failures.store(0, Ordering::SeqCst);
        self.touch(span.clone());
        // Copies (if any) made outside the presence lock; `written` checks the room again under it.
        let room = |n: usize| self.presence.read().unwrap().has_room(n);
        let kept = match keep {
            Some((bytes, pins)) if room(bytes.len()) => self.kept_chunks(span.clone(), bytes, pins),
            _ => Vec::new(),
        };
        // Unsettled before queued: a commit that takes the queue then settles what it synced.
        self.presence.write().unwrap().written(span.clone(), kept);
        self.pending.lock().unwrap().extend(span);
        Ok(())
    }

    /// The chunks of `span` in `bytes` (its chunks back to back, a slice of a buffer of `pins`
    /// bytes), to keep: slices of it when it is the whole buffer, else copies.
    fn kept_chunks(&self, span: std::ops::Range<u32>, bytes: Bytes, pins: usize) -> Vec<presence::Kept> {
        let g = self.geometry;
        let base = g.chunk_offset(ChunkIdx(span.start)).0;
        let whole = pins == bytes.len();
        span.map(|i| {
            let c = ChunkIdx(i);
            let at = (g.chunk_offset(c).0 - base) as usize;
            let chunk = bytes.slice(at..at + g.chunk_len(c));
            if whole {
                presence::Kept { bytes: chunk, pins }
            } else {
                presence::Kept { pins: chunk.len(), bytes: Bytes::copy_from_slice(&chunk) }
            }
        })
        .collect()
    }

    /// After ENOSPC: stops caching for [`FULL_FOR`] (reads are served all the same), counts the
    /// chunks, and warns now and then. Not a failure of the disk: nothing is dropped.
    fn disk_full(&self, chunks: u64, source: std::io::Error) -> StoreError {
        self.stats.chunks_not_cached.fetch_add(chunks, Ordering::Relaxed);
        *self.full_until.lock().unwrap() = Some(Instant::now() + FULL_FOR);
        if self.full_warning.due() {
            tracing::warn!(cache = %self.dir.display(), error = %source, retry_in = ?FULL_FOR,
                "cache disk full: serving reads without caching them");
        }
        StoreError::NoSpace(self.dir.clone())
    }

    /// Counts a failed write or sync; enough of them in a row stop caching for a while.
    fn failed(&self, e: &std::io::Error) {
        if self.failures.fetch_add(1, Ordering::SeqCst) + 1 >= DEGRADE_AFTER {
            self.failures.store(0, Ordering::SeqCst);
            *self.degraded_until.lock().unwrap() = Some(Instant::now() + DEGRADE_FOR);
            tracing::error!(cache = %self.dir.display(), error = %e, retry_in = ?DEGRADE_FOR,
                "cache keeps failing: serving from the origin and peers without caching");
        }
    }

    /// The chunks of `range` that cannot be served yet (one look at the presence map).
    pub fn missing(&self, range: std::ops::Range<u32>) -> Vec<u32> {
        let presence = self.presence.read().unwrap();
        range.filter(|i| !presence.readable.contains(*i)).collect()
    }

    /// Number of chunks written but not yet committed.
    pub fn pending_count(&self) -> usize {
        self.pending.lock().unwrap().len()
    }

    /// Group commit: makes every chunk put so far durable, then records them in the state file.
    /// Returns how many chunks were newly recorded. A failed sync drops every chunk written
    /// since the last good one and is never retried into success.
    pub fn commit(&self) -> Result<usize, StoreError> {
        let mut durable = self.durable.lock().unwrap();
        let batch = std::mem::take(&mut *self.pending.lock().unwrap());
        let forgotten = self.forgotten.lock().unwrap().clone();
        if batch.is_empty() && forgotten.is_empty() && !self.restate.load(Ordering::SeqCst) {
            return Ok(0);
        }
        // Every pwrite of `batch` completed before its index was queued, so this sync covers it.
        if let Err(source) = self.file().sync_data() {
            return Err(self.sync_failed(batch, source));
        }
        self.failures.store(0, Ordering::SeqCst);
        let mut next = durable.clone();
        next.extend(batch.iter().copied());
        next -= &forgotten;
        let path = self.dir.join("state");
        if let Err(source) = fsutil::write_atomic(&path, &state::encode(&self.geometry, &self.root, &next), 0o600) {
            // The data is durable; only its record is not. Try again at the next commit.
            self.pending.lock().unwrap().extend_from_slice(&batch);
            return Err(StoreError::Io { path, source });
        }
        *durable = next;
        self.restate.store(false, Ordering::SeqCst);
        let mut presence = self.presence.write().unwrap();
        for i in &batch {
            presence.settle(*i);
        }
        drop(presence);
        // Recorded as gone: these may be cached again.
        *self.forgotten.lock().unwrap() -= &forgotten;
        Ok(batch.len())
    }

    /// After a failed sync: drops `batch` and every chunk written since (their pages may be lost
    /// and the error is reported only once), and reopens the file. None of them is in the state
    /// file: a chunk the state claims is never rewritten (see `forgotten`).
    fn sync_failed(&self, batch: Vec<u32>, source: std::io::Error) -> StoreError {
        self.stats.sync_errors.fetch_add(1, Ordering::Relaxed);
        let path = self.dir.join("data");
        let dropped = {
            let _queue = self.write.lock().unwrap();
            let mut lost = batch;
            lost.append(&mut self.pending.lock().unwrap());
            let mut presence = self.presence.write().unwrap();
            for i in &lost {
                presence.remove(*i);
            }
            drop(presence);
            match self.file().reopen() {
                Ok(file) => *self.data.write().unwrap() = file,
                Err(e) => tracing::error!(path = %path.display(), error = %e, "reopening the cache data file failed"),
            }
            lost.len()
        };
        self.stats.chunks_dropped.fetch_add(dropped as u64, Ordering::Relaxed);
        tracing::error!(path = %path.display(), error = %source, dropped, "cache sync failed; chunks dropped");
        self.failed(&source);
        StoreError::SyncFailed { path, dropped, source }
    }
}

#[cfg(test)]
mod tests;
