//! The node's cache collector: measures what the caches under `cache_dir` hold and frees space
//! down to a target, in this order (see DESIGN.md, "Cache lifecycle"):
//! 1. caches no image is served from (unconfigured, or superseded by a new version and
//!    released), least recently written first: the whole directory goes;
//! 2. served images no domain holds, least recently used first: their chunks, least recently
//!    used first; with profile-aware eviction (the default) the chunks outside each image's boot
//!    profile go first, over all these images, and only then profile chunks: the bytes a
//!    next boot needs first stay longest;
//! 3. chunks of held images, least recently used first over all of them, never a chunk of a
//!    held image's boot profile.
//!
//! A pinned cache (a `pinned` file in its directory) is never touched. Usage is the data files'
//! allocated blocks: the bytes the caches really hold, not the filesystem's free space.
//! Everything here blocks: the daemon calls it on the blocking pool.

use std::os::unix::fs::MetadataExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use roaring::RoaringBitmap;

use super::ChunkStore;

/// Marks a cache directory as pinned.
pub const PIN_FILE: &str = "pinned";

/// One cache directory under `cache_dir`.
#[derive(Debug, Clone)]
pub struct DirInfo {
    /// The image's root digest (the directory's name).
    pub digest: String,
    pub dir: PathBuf,
    /// Allocated bytes of its data file.
    pub bytes: u64,
    /// When its presence map was last written (its last fetch or eviction).
    pub modified: SystemTime,
    pub pinned: bool,
}

/// Every cache directory under `cache_dir` (named by a 64-digit hex digest; nothing else there,
/// such as `manifests/`, is a cache). An error listing `cache_dir` is an error, not an empty
/// cache: the budget must not believe the disk was freed.
pub fn scan(cache_dir: &Path) -> std::io::Result<Vec<DirInfo>> {
    let mut out = Vec::new();
    for (digest, dir) in cache_dirs(cache_dir)? {
        let data = std::fs::metadata(dir.join("data")).ok();
        let modified = std::fs::metadata(dir.join("state"))
            .ok()
            .or_else(|| data.clone())
            .and_then(|m| m.modified().ok())
            .unwrap_or(SystemTime::UNIX_EPOCH);
        let pinned = is_pinned(&dir);
        out.push(DirInfo { digest, bytes: data.map_or(0, |m| m.blocks() * 512), dir, modified, pinned });
    }
    out.sort_by(|a, b| a.digest.cmp(&b.digest));
    Ok(out)
}

/// The cache directories under `cache_dir`: (digest, path).
fn cache_dirs(cache_dir: &Path) -> std::io::Result<impl Iterator<Item = (String, PathBuf)>> {
    Ok(std::fs::read_dir(cache_dir)?.flatten().filter_map(|e| {
        let name = e.file_name().to_string_lossy().into_owned();
        is_cache_dir_name(&name).then(|| (name, e.path()))
    }))
}

/// A cache directory is named by its image's root digest: 64 hex digits.
fn is_cache_dir_name(name: &str) -> bool {
    name.len() == 64 && name.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Bytes all caches under `cache_dir` hold: their data files' allocated blocks, one `stat`
/// each (what `scan` reports, without the rest). An error listing `cache_dir` is an error, not
/// an empty cache: the budget must not believe the disk was freed.
pub fn usage(cache_dir: &Path) -> std::io::Result<u64> {
    Ok(cache_dirs(cache_dir)?.map(|(_, dir)| std::fs::metadata(dir.join("data")).map_or(0, |m| m.blocks() * 512)).sum())
}

pub fn is_pinned(dir: &Path) -> bool {
    dir.join(PIN_FILE).exists()
}

/// Pins or unpins the cache in `dir`; the mark is a file, so it lasts across restarts.
pub fn set_pinned(dir: &Path, pinned: bool) -> std::io::Result<()> {
    let path = dir.join(PIN_FILE);
    if pinned {
        crate::fsutil::write_atomic(&path, b"pinned by `vmt cache pin`\n", 0o600)
    } else {
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }
}

/// An open cache and what protects it.
pub struct Open {
    pub store: Arc<ChunkStore>,
    /// A domain holds the image (or a running domain still reads this old version).
    pub held: bool,
    /// The chunks of its boot profile: never evicted while held, last otherwise (profile-aware).
    pub profile: Option<RoaringBitmap>,
}

/// Which chunks of unheld images go first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Policy {
    /// Least recently used images first, all of each.
    Lru,
    /// Chunks outside boot profiles first (least recently used images first), then profiles.
    #[default]
    Profile,
}

/// What a collection did.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct Report {
    /// Digests of the cache directories removed whole.
    pub removed: Vec<String>,
    /// Chunks evicted from open caches.
    pub chunks: u64,
    pub freed: u64,
    /// Usage before and after.
    pub before: u64,
    pub after: u64,
    /// True when usage is at or below the target.
    pub reached: bool,
}

/// Frees space until usage is at most `target`. With `unused_only`, only step 1 runs. Fails
/// only when `cache_dir` cannot be listed (nothing was measured or freed then).
pub fn collect(
    cache_dir: &Path,
    open: &[Open],
    target: u64,
    unused_only: bool,
    policy: Policy,
) -> std::io::Result<Report> {
    let dirs = scan(cache_dir)?;
    let before: u64 = dirs.iter().map(|d| d.bytes).sum();
    let mut r = Report { before, after: before, ..Report::default() };
    let open_dirs: Vec<&Path> = open.iter().map(|o| o.store.dir()).collect();

    // 1. Caches nothing serves.
    let mut unused: Vec<&DirInfo> =
        dirs.iter().filter(|d| !d.pinned && !open_dirs.contains(&d.dir.as_path())).collect();
    unused.sort_by_key(|d| d.modified);
    for d in unused {
        if r.after <= target {
            break;
        }
        match remove_cache_dir(&d.dir) {
            Ok(true) => {
                tracing::info!(digest = %d.digest, bytes = d.bytes, "removed an unused cache");
                r.after = r.after.saturating_sub(d.bytes);
                r.freed += d.bytes;
                r.removed.push(d.digest.clone());
            }
            Ok(false) => tracing::debug!(dir = %d.dir.display(), "cache in use by another process; kept"),
            Err(e) => tracing::warn!(dir = %d.dir.display(), error = %e, "removing an unused cache failed"),
        }
    }
    if unused_only {
        r.reached = r.after <= target;
        return Ok(r);
    }

    // 2. Served images nobody holds, least recently used first. A failed eviction (its state
    // file could not be written) ends the collection: the next ones would fail alike.
    let mut unheld: Vec<&Open> = open.iter().filter(|o| !o.held && !is_pinned(o.store.dir())).collect();
    unheld.sort_by_key(|o| o.store.last_use());
    let mut ok = true;
    // With `profile`, a first pass keeps every image's profile chunks; the second takes them.
    let passes: &[bool] = if policy == Policy::Profile { &[true, false] } else { &[false] };
    for &keep_profiles in passes {
        for o in &unheld {
            if !ok || r.after <= target {
                break;
            }
            let keep = if keep_profiles { o.profile.as_ref() } else { None };
            let order: Vec<u32> = o.store.eviction_order(keep).into_iter().map(|(_, i)| i).collect();
            ok = evict_prefix(&mut r, &o.store, &order, target);
        }
    }

    // 3. Chunks of held images, least recently used first over all of them.
    let held: Vec<&Open> = open.iter().filter(|o| o.held && !is_pinned(o.store.dir())).collect();
    let mut order: Vec<(u32, usize, u32)> = Vec::new();
    for (k, o) in held.iter().enumerate() {
        order.extend(o.store.eviction_order(o.profile.as_ref()).into_iter().map(|(t, i)| (t, k, i)));
    }
    order.sort_unstable();
    let mut at = 0;
    while ok && r.after > target && at < order.len() {
        // Take chunks until they cover what is still to free, then evict them per cache.
        let mut picked: Vec<RoaringBitmap> = vec![RoaringBitmap::new(); held.len()];
        let mut bytes = 0u64;
        while at < order.len() && bytes < r.after - target {
            let (_, k, i) = order[at];
            picked[k].insert(i);
            bytes += held[k].store.geometry().chunk_size().bytes();
            at += 1;
        }
        for (k, victims) in picked.iter().enumerate().filter(|(_, v)| !v.is_empty()) {
            ok = ok && evict(&mut r, &held[k].store, victims);
        }
    }
    r.reached = r.after <= target;
    Ok(r)
}

/// Evicts the first chunks of `order` from `store` until usage reaches `target` or they run out;
/// false when an eviction failed.
fn evict_prefix(r: &mut Report, store: &ChunkStore, order: &[u32], target: u64) -> bool {
    let chunk = store.geometry().chunk_size().bytes();
    let mut at = 0;
    while r.after > target && at < order.len() {
        let n = (r.after - target).div_ceil(chunk).min((order.len() - at) as u64) as usize;
        let victims: RoaringBitmap = order[at..at + n].iter().copied().collect();
        at += n;
        if !evict(r, store, &victims) {
            return false;
        }
    }
    true
}

fn evict(r: &mut Report, store: &ChunkStore, victims: &RoaringBitmap) -> bool {
    match store.evict(victims) {
        Ok(e) => {
            r.chunks += e.chunks;
            r.freed += e.bytes;
            r.after = r.after.saturating_sub(e.bytes);
            true
        }
        Err(e) => {
            tracing::warn!(cache = %store.dir().display(), error = %e, "eviction failed; collection stopped");
            false
        }
    }
}

/// Removes a cache directory unless another process holds its lock. The state file goes first:
/// a crash half-way leaves a cache that claims nothing.
fn remove_cache_dir(dir: &Path) -> std::io::Result<bool> {
    let lock = match std::fs::File::open(dir.join("lock")) {
        Ok(f) => Some(f),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(e),
    };
    if let Some(f) = &lock {
        // SAFETY: flock on a valid, owned descriptor.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            return Ok(false);
        }
    }
    match std::fs::remove_file(dir.join("state")) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    std::fs::remove_dir_all(dir)?;
    Ok(true)
}

#[cfg(test)]
mod tests;
