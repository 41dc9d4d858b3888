//! The node's cache lifecycle: the budget and its collector, image versions, pins, and the
//! `vmt cache` requests.
//!
//! Versions: an image added under a name already served, with another digest, becomes the
//! version served to new connections (and so to new domains); the old version stays open,
//! held by the domains that held the name, and keeps serving their connections. Once no domain
//! holds it and no client is connected, it is closed and its cache is the first the collector
//! removes.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;

use roaring::RoaringBitmap;

use super::control::{CacheEntry, CacheUsage, Response};
use super::{Daemon, DaemonError, Image};
use crate::config::CacheLimits;
use crate::store::gc::{self, Open, Report};
use crate::store::{tick, Budget};

/// An old version of an image that running domains still read.
pub struct Retired {
    pub image: Arc<Image>,
    pub holders: BTreeSet<String>,
}

/// Size of the filesystem holding `dir`, in bytes (0 if it cannot be read).
pub fn filesystem_bytes(dir: &Path) -> u64 {
    use std::os::unix::ffi::OsStrExt;
    let Ok(path) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else { return 0 };
    // SAFETY: statvfs writes into the zeroed struct; the path is NUL-terminated.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(path.as_ptr(), &mut st) } != 0 {
        return 0;
    }
    st.f_blocks.saturating_mul(st.f_frsize)
}

/// The node's budget, from `[cache]` and the cache filesystem's size; measured once the
/// images are open (opening reclaims blocks a crash left unclaimed).
pub fn budget(limits: Option<CacheLimits>) -> Option<Arc<Budget>> {
    let l = limits?;
    Some(Arc::new(Budget::new(l.max, l.high, l.low)))
}

/// Measures `budget` now; a failed measurement keeps the estimate.
pub fn measure(budget: &Budget, cache_dir: &Path) {
    let at = budget.before_measuring();
    match gc::usage(cache_dir) {
        Ok(used) => budget.measured(at, used),
        Err(e) => tracing::warn!(dir = %cache_dir.display(), error = %e, "cannot measure the caches' usage"),
    }
}

impl Daemon {
    /// Usage against the budget, as `vmt status` and `vmt cache ls` show it.
    pub(super) fn cache_usage(&self, used: u64) -> CacheUsage {
        let b = self.budget.as_deref();
        CacheUsage {
            used,
            max: b.map(|b| b.max),
            high: b.map(|b| b.high),
            low: b.map(|b| b.low),
            refused_bytes: b.map_or(0, Budget::refused_bytes),
            unreachable: b.is_some_and(Budget::unreachable),
        }
    }

    /// Every open cache, what holds it, and the chunks it must keep.
    fn open_caches(&self) -> Vec<Open> {
        let images: Vec<Arc<Image>> = self.images.read().unwrap().values().cloned().collect();
        let mut open: Vec<Open> = images
            .iter()
            .map(|i| {
                // A connected client counts too: holds are lost at a restart, connections of
                // running domains come back at once.
                let held = !self.holders(&i.name).is_empty() || i.clients() > 0;
                Open { store: i.store.clone(), held, profile: self.profile_chunks(i) }
            })
            .collect();
        for r in self.retired.lock().unwrap().iter() {
            open.push(Open { store: r.image.store.clone(), held: true, profile: self.profile_chunks(&r.image) });
        }
        open
    }

    /// An image's profile chunks: what its next boot reads first.
    fn profile_chunks(&self, img: &Image) -> Option<RoaringBitmap> {
        let p = self.profile_of(img)?;
        Some(p.entries.iter().map(|e| e.chunk).collect())
    }

    /// Frees space down to `target` (see [`gc::collect`]); the budget's estimate then becomes
    /// what the collection measured.
    pub(super) async fn collect(&self, target: u64, unused_only: bool) -> Report {
        let _gate = self.cache_gate.lock().await;
        let at = self.budget.as_ref().map(|b| b.before_measuring());
        let open = self.open_caches();
        let dir = self.cfg.cache_dir.clone();
        let policy = self.cfg.cache.eviction;
        let r = match tokio::task::spawn_blocking(move || gc::collect(&dir, &open, target, unused_only, policy)).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                // Nothing measured: the budget keeps its estimate.
                tracing::error!(error = %e, "cache collection cannot list the cache directory");
                return Report::default();
            }
            Err(e) => {
                // No measurement: the budget keeps its estimate rather than a made-up zero.
                tracing::error!(error = %e, "cache collection failed");
                return Report::default();
            }
        };
        if let (Some(b), Some(at)) = (&self.budget, at) {
            b.measured(at, r.after);
        }
        if r.freed > 0 {
            tracing::info!(
                before = r.before,
                after = r.after,
                removed = r.removed.len(),
                chunks = r.chunks,
                reached = r.reached,
                "cache collected"
            );
        }
        r
    }

    /// Keeps the node within its budget: measures at every commit interval and whenever a write
    /// passes the high watermark, and collects down to the low one.
    pub(super) async fn collect_loop(self: Arc<Self>, budget: Arc<Budget>) {
        let mut shutdown = self.shutdown.subscribe();
        let mut tick = tokio::time::interval(self.tuning.commit_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let pressed = tokio::select! {
                _ = tick.tick() => false,
                _ = budget.pressed() => true,
                _ = crate::shutdown::stopped(&mut shutdown) => return,
            };
            // Out of reach (all pinned or held): every miss presses, and a pass each time would
            // only churn; the tick checks again.
            if pressed && budget.unreachable() {
                continue;
            }
            let (dir, b) = (self.cfg.cache_dir.clone(), budget.clone());
            let _ = tokio::task::spawn_blocking(move || measure(&b, &dir)).await;
            if budget.used() <= budget.high {
                budget.set_unreachable(false);
                continue;
            }
            let r = self.collect(budget.low, false).await;
            let unreachable = r.after > budget.high;
            if unreachable && !budget.unreachable() {
                tracing::warn!(used = r.after, high = budget.high,
                    "cache budget unreachable: what is left is pinned, held or in use; new chunks are served without caching");
            }
            budget.set_unreachable(unreachable);
        }
    }

    /// Closes old versions nobody holds or reads any more; their caches become unused once the
    /// caller has committed them (the images returned) and dropped them.
    pub(super) fn sweep_retired(&self) -> Vec<Arc<Image>> {
        let mut closed = Vec::new();
        self.retired.lock().unwrap().retain(|r| {
            let keep = !r.holders.is_empty() || r.image.clients() > 0;
            if !keep {
                r.image.cancel_prefetch();
                let _ = r.image.shutdown.send(true);
                tracing::info!(image = %r.image.name, digest = %r.image.manifest.root(), "old version closed");
                closed.push(r.image.clone());
            }
            keep
        });
        closed
    }

    /// Moves `old`'s holds to a [`Retired`] entry: the domains holding its name run on it. The
    /// caller holds the image map's write lock (so no assemble finds the name in between), and
    /// the holds stay locked until the entry is listed (so no release misses both).
    pub(super) fn retire(&self, old: Arc<Image>) {
        if let Some(h) = old.listener.lock().unwrap().take() {
            h.abort();
        }
        let mut holds = self.holds.lock().unwrap();
        let mut holders = BTreeSet::new();
        for (domain, images) in holds.iter_mut() {
            if images.remove(&old.name) {
                holders.insert(domain.clone());
            }
        }
        holds.retain(|_, images| !images.is_empty());
        tracing::info!(image = %old.name, digest = %old.manifest.root(), holders = holders.len(),
            "new version served; the old one stays open for its domains");
        self.retired.lock().unwrap().push(Retired { image: old, holders });
    }

    /// The cache directory `name` refers to: a served image, or a unique digest prefix.
    fn cache_dir_of(&self, name: &str) -> Result<std::path::PathBuf, String> {
        if let Some(img) = self.image(name) {
            return Ok(img.store.dir().to_path_buf());
        }
        let name = name.to_ascii_lowercase();
        if name.len() < 8 || !name.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(DaemonError::UnknownImage(name).to_string());
        }
        let all = gc::scan(&self.cfg.cache_dir).map_err(|e| format!("{}: {e}", self.cfg.cache_dir.display()))?;
        let found: Vec<_> = all.into_iter().filter(|d| d.digest.starts_with(&name)).collect();
        match found.as_slice() {
            [one] => Ok(one.dir.clone()),
            [] => Err(format!("no image or cache digest {name}")),
            _ => Err(format!("digest prefix {name} names {} caches", found.len())),
        }
    }

    /// `cache_list`: every cache directory and the usage against the budget.
    pub(super) fn cache_ls(&self) -> Response {
        let caches = match self.cache_list() {
            Ok(c) => c,
            Err(e) => return Response::Error { message: format!("{}: {e}", self.cfg.cache_dir.display()) },
        };
        let used = caches.iter().map(|c| c.bytes).sum();
        Response::Caches { usage: self.cache_usage(used), caches }
    }

    /// `cache_gc`: down to `to`, else the low watermark; without either, unused caches only.
    pub(super) async fn cache_gc(&self, to: Option<u64>) -> Response {
        let report = match (to, &self.budget) {
            (Some(to), _) => self.collect(to, false).await,
            (None, Some(b)) => self.collect(b.low, false).await,
            (None, None) => self.collect(0, true).await,
        };
        Response::Collected { report }
    }

    /// `cache_pin`.
    pub(super) async fn cache_pin(&self, image: &str, pinned: bool) -> Response {
        match self.cache_dir_of(image) {
            Ok(dir) => match self.set_pinned(&dir, pinned).await {
                Ok(()) => {
                    tracing::info!(image, pinned, "cache pin changed");
                    Response::Done
                }
                Err(e) => Response::Error { message: format!("{}: {e}", dir.display()) },
            },
            Err(message) => Response::Error { message },
        }
    }

    /// Pins or unpins, never while a collection may be removing the directory.
    async fn set_pinned(&self, dir: &Path, pinned: bool) -> std::io::Result<()> {
        let _gate = self.cache_gate.lock().await;
        gc::set_pinned(dir, pinned)
    }

    fn cache_list(&self) -> std::io::Result<Vec<CacheEntry>> {
        let images: Vec<Arc<Image>> = self.images.read().unwrap().values().cloned().collect();
        let retired: Vec<(Arc<Image>, Vec<String>)> = self
            .retired
            .lock()
            .unwrap()
            .iter()
            .map(|r| (r.image.clone(), r.holders.iter().cloned().collect()))
            .collect();
        let now = tick();
        Ok(gc::scan(&self.cfg.cache_dir)?
            .into_iter()
            .map(|d| {
                let serving =
                    images.iter().find(|i| i.store.dir() == d.dir).map(|i| (i, "serving", self.holders(&i.name)));
                let old =
                    || retired.iter().find(|(i, _)| i.store.dir() == d.dir).map(|(i, h)| (i, "old-version", h.clone()));
                match serving.or_else(old) {
                    Some((img, state, holds)) => CacheEntry {
                        digest: d.digest,
                        image: Some(img.name.clone()),
                        state: state.into(),
                        bytes: d.bytes,
                        chunks: Some(img.store.present_count()),
                        chunks_total: Some(u64::from(img.manifest.geometry().chunk_count())),
                        idle_secs: Some(img.store.last_use())
                            .filter(|&t| t > 0)
                            .map(|t| u64::from(now.saturating_sub(t)) / 10),
                        holds,
                        pinned: d.pinned,
                    },
                    None => {
                        let counts = closed_counts(&d.dir);
                        CacheEntry {
                            digest: d.digest,
                            image: None,
                            state: "unused".into(),
                            bytes: d.bytes,
                            chunks: counts.map(|c| c.0),
                            chunks_total: counts.map(|c| c.1),
                            idle_secs: d.modified.elapsed().ok().map(|e| e.as_secs()),
                            holds: Vec::new(),
                            pinned: d.pinned,
                        }
                    }
                }
            })
            .collect())
    }
}

/// Chunks held and total of a cache no image is served from, from its manifest and state file.
fn closed_counts(dir: &Path) -> Option<(u64, u64)> {
    let m = crate::image::Manifest::load(&dir.join("manifest")).ok()?;
    let g = m.geometry();
    let present =
        std::fs::read(dir.join("state")).ok().and_then(|b| crate::store::state::decode(&b, &g, &m.root()).ok());
    Some((present.map_or(0, |p| p.len()), u64::from(g.chunk_count())))
}

/// Bytes the caches under `dir` hold, measured (blocking: one `stat` per cache). When `dir`
/// cannot be listed, the budget's estimate (0 without a budget), with a warning: an unlistable
/// directory is not an empty cache.
pub(super) fn cache_used(dir: &Path, budget: Option<&crate::store::Budget>) -> u64 {
    static WARNED: crate::throttle::Throttle = crate::throttle::Throttle::new();
    gc::usage(dir).unwrap_or_else(|e| {
        if WARNED.due() {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot measure the cache's usage");
        }
        budget.map_or(0, |b| b.used())
    })
}
