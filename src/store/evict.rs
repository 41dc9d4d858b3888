//! Eviction from one image's cache: which chunks were used least recently, and taking chunks out
//! so that a crash at any point leaves a cache that never claims a chunk it does not hold.
//!
//! Order of an eviction (see DESIGN.md, "Cache lifecycle"):
//! 1. the chunks join `evicting` (`put` refuses them from here on);
//! 2. under `reading` held exclusively they leave the presence map: every read that saw them
//!    present has finished, every later read fetches them;
//! 3. the state file without them is written atomically (durable);
//! 4. their blocks are punched out of the data file;
//! 5. they leave `evicting` and may be cached again.
//!
//! A crash before 3 leaves them claimed and intact; after 3 they are unclaimed, punched or not.
//! On a full disk, where 3 cannot write a file, the state file is removed instead (see `evict`).
//! Only durable chunks are evicted: a chunk waiting for its commit is the newest in the cache.

use std::sync::atomic::Ordering;
use std::sync::OnceLock;
use std::time::Instant;

use roaring::RoaringBitmap;

use super::{ChunkStore, StoreError};
use crate::fsutil;
use crate::image::{ByteOffset, ChunkIdx};

/// The runs of adjacent chunks in `set`, as `start..end` pairs.
fn runs(set: &RoaringBitmap) -> Vec<(u32, u32)> {
    let mut out: Vec<(u32, u32)> = Vec::new();
    for i in set {
        match out.last_mut() {
            Some((_, end)) if *end == i => *end += 1,
            _ => out.push((i, i + 1)),
        }
    }
    out
}

/// The node's use clock, in tenths of a second since the process started, from 1 (0 means
/// "not used since the cache was opened"). Comparable between images.
pub fn tick() -> u32 {
    static START: OnceLock<Instant> = OnceLock::new();
    let t = START.get_or_init(Instant::now).elapsed().as_millis() / 100;
    u32::try_from(t).unwrap_or(u32::MAX - 1) + 1
}

/// What one eviction took out.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Evicted {
    pub chunks: u64,
    /// Bytes of the ranges punched (the chunks' lengths).
    pub bytes: u64,
}

impl ChunkStore {
    /// Sets the node budget that writes are admitted against (once, before serving).
    pub fn set_budget(&self, budget: std::sync::Arc<super::Budget>) {
        let _ = self.budget.set(budget);
    }

    /// Notes that the chunks of `range` were used now.
    pub fn touch(&self, range: std::ops::Range<u32>) {
        let now = tick();
        for i in range {
            if let Some(u) = self.uses.get(i as usize) {
                u.store(now, Ordering::Relaxed);
            }
        }
        self.last_use.fetch_max(now, Ordering::Relaxed);
    }

    /// The [`tick`] of this cache's last use (0: none since open).
    pub fn last_use(&self) -> u32 {
        self.last_use.load(Ordering::Relaxed)
    }

    /// The durable chunks that may be evicted, least recently used first, without `keep`.
    pub fn eviction_order(&self, keep: Option<&RoaringBitmap>) -> Vec<(u32, u32)> {
        let mut candidates = self.durable.lock().unwrap().clone();
        if let Some(keep) = keep {
            candidates -= keep;
        }
        let mut order: Vec<(u32, u32)> = candidates
            .iter()
            .map(|i| (self.uses.get(i as usize).map_or(0, |u| u.load(Ordering::Relaxed)), i))
            .collect();
        order.sort_unstable();
        order
    }

    /// Punches out the blocks of chunks the state file does not claim: writes not committed
    /// before a crash, a crash between an eviction's state write and its punch, chunks dropped
    /// after a failed sync. Nothing else would ever free them (eviction takes claimed chunks
    /// only), yet they count against the budget. Called at open, before anything is served, so
    /// every readable chunk is durable. Returns the bytes punched.
    pub(super) fn reclaim_unclaimed(&self) -> u64 {
        use std::os::unix::io::AsRawFd;
        let Ok(f) = std::fs::File::open(self.dir.join("data")) else { return 0 };
        let (fd, size) = (f.as_raw_fd(), self.geometry.image_size() as i64);
        let mut unclaimed = RoaringBitmap::new();
        let mut at: i64 = 0;
        while at < size {
            // SAFETY: lseek on an owned descriptor; no memory is passed.
            let data = unsafe { libc::lseek(fd, at, libc::SEEK_DATA) };
            if data < 0 || data >= size {
                break; // ENXIO: no data past `at` (or SEEK_DATA unsupported: nothing found)
            }
            // SAFETY: as above.
            let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
            let end = if hole <= data { size } else { hole.min(size) };
            unclaimed.insert_range(self.geometry.chunks_covering(ByteOffset(data as u64), (end - data) as u64));
            at = end;
        }
        unclaimed -= &*self.durable.lock().unwrap();
        let file = self.file();
        let mut freed = 0;
        for (start, end) in runs(&unclaimed) {
            if let Some((offset, len)) = self.geometry.run_bytes(start..end) {
                if file.punch(offset.0, len as u64).is_ok() {
                    freed += len as u64;
                }
            }
        }
        if freed > 0 {
            tracing::info!(cache = %self.dir.display(), bytes = freed, "freed blocks of chunks the cache does not claim");
        }
        freed
    }

    /// Takes `victims` out of the cache in the crash-safe order above. Chunks not durable, or
    /// already gone, are skipped. Fails only when the state file cannot be written (and the
    /// disk is not full, see below); nothing is punched then, and the chunks, intact and
    /// durable, go back into the presence map and are served again.
    pub fn evict(&self, victims: &RoaringBitmap) -> Result<Evicted, StoreError> {
        let mut durable = self.durable.lock().unwrap();
        let asked = victims & &*durable;
        let mut victims = asked.clone();
        // 1. Refused by `put` from now on (checked under the write queue's lock).
        {
            let _queue = self.write.lock().unwrap();
            *self.evicting.lock().unwrap() |= &asked;
        }
        // 2. Out of the presence map, after every read that saw them present.
        {
            let _reads = self.reading.write().unwrap();
            let mut p = self.presence.write().unwrap();
            victims -= &p.unsettled;
            victims &= &p.readable;
            p.readable -= &victims;
        }
        let release = || *self.evicting.lock().unwrap() -= &asked;
        if victims.is_empty() {
            release();
            return Ok(Evicted::default());
        }
        // 3. Durably unclaimed.
        let next = &*durable - &victims;
        let path = self.dir.join("state");
        if let Err(source) =
            fsutil::write_atomic(&path, &super::state::encode(&self.geometry, &self.root, &next), 0o600)
        {
            // A full disk cannot take the new state file, and only punching frees it: the old
            // state goes instead, so that nothing is claimed, and the next commit writes it
            // again. A crash in between costs the cache's contents, never a wrong byte.
            let unclaimed = fsutil::is_full(&source)
                && std::fs::remove_file(&path).and_then(|()| fsutil::sync_dir(&self.dir)).is_ok();
            if !unclaimed {
                // Nothing was punched: the chunks are intact and durable, and the state file
                // (old or, if only the directory sync failed, new) claims nothing they do not
                // hold once the next commit has written it. They are served again.
                self.presence.write().unwrap().readable |= &victims;
                release();
                return Err(StoreError::Io { path, source });
            }
            self.restate.store(true, Ordering::SeqCst);
            tracing::warn!(cache = %self.dir.display(), "disk full: state file dropped to free space; rewritten at the next commit");
        }
        *durable = next;
        drop(durable);
        // 4. Blocks freed, run by run. What was freed is counted from the runs punched, not
        // from the file's size before and after: writes of other chunks go on meanwhile.
        let file = self.file();
        let mut punched = true;
        let mut freed = 0u64;
        for (start, end) in runs(&victims) {
            let Some((offset, len)) = self.geometry.run_bytes(start..end) else { continue };
            if let Err(e) = file.punch(offset.0, len as u64) {
                punched = false;
                tracing::warn!(cache = %self.dir.display(), chunk = %ChunkIdx(start), error = %e,
                    "punching a hole failed: the chunks are out of the cache but their space is not freed");
            } else {
                freed += len as u64;
            }
        }
        // 5. Cacheable again.
        release();
        let n = victims.len();
        self.stats.chunks_evicted.fetch_add(n, Ordering::Relaxed);
        if let Some(b) = self.budget.get() {
            b.give_back(freed);
        }
        if !punched {
            tracing::debug!(cache = %self.dir.display(), "some holes were not punched");
        }
        Ok(Evicted { chunks: n, bytes: freed })
    }
}
