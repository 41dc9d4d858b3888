//! One served image: its manifest, node cache, miss path and NBD export, plus its counters.
//!
//! Opening resolves the manifest first (given by the operator, or built from a file origin and
//! remembered while the file is unchanged), because the cache directory is named by the
//! manifest's root digest.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use thiserror::Error;
use tokio::sync::watch;

use crate::config::{ImageConfig, Tuning};
use crate::fetch::flight::{FetchTuning, Fetcher, Parts, Priority, RunData};
use crate::fetch::origin::OriginUrl;
use crate::fetch::{BoxFuture, SourceError};
use crate::image::{ByteOffset, ChunkIdx, ChunkSize, Manifest, ManifestError};
use crate::nbd::proto::EIO;
use crate::nbd::server::Export;
use crate::store::{ChunkStore, StoreError};

use super::control::{ImageStatus, PeerStatus, PrefetchStatus};
use crate::bench::trace::{self, Tracer};
use crate::nbd::proto::{CMD_FLUSH, CMD_READ, CMD_WRITE};
use crate::p2p::auth::ClusterKey;
use crate::p2p::swarm::{Swarm, SwarmTuning};
use crate::profile::prefetch;
use crate::profile::recorder::Recorder;

mod peer;

/// Errors opening an image.
#[derive(Debug, Error)]
pub enum ImageError {
    #[error("image {name}: {message}")]
    Invalid { name: String, message: String },
    #[error("image {name}: {source}")]
    Manifest { name: String, source: ManifestError },
    #[error("image {name}: origin: {source}")]
    Origin { name: String, source: SourceError },
    #[error("image {name}: {source}")]
    Store { name: String, source: StoreError },
}

/// A served image.
pub struct Image {
    pub name: String,
    pub origin: String,
    pub manifest: Arc<Manifest>,
    pub store: Arc<ChunkStore>,
    pub fetcher: Arc<Fetcher>,
    pub socket: PathBuf,
    bytes_served: AtomicU64,
    clients: AtomicU64,
    /// Turned true to stop this image's listener and connections.
    pub shutdown: watch::Sender<bool>,
    /// Set while a background fill (`vmt complete`) runs, so requests do not stack up.
    pub completing: std::sync::atomic::AtomicBool,
    pub recorder: Recorder,
    /// The running or last prefetch job.
    pub prefetch: std::sync::Mutex<Option<Arc<prefetch::Job>>>,
    /// Request trace (`vmt trace start/stop`).
    pub tracer: Tracer,
    reads: AtomicU64,
    reads_waited: AtomicU64,
    /// Guest bytes served by reads that found every chunk cached.
    bytes_from_cache: AtomicU64,
    reads_in_flight: AtomicU64,
    /// How long guest reads took, by how they were served.
    pub waits: GuestWaits,
    /// The peer-aware source, with `[p2p]` configured.
    pub swarm: Option<Arc<Swarm>>,
    bytes_to_peers: AtomicU64,
    /// The export's accept loop: stopped alone when a new version takes the socket, so the
    /// connections of running domains stay on this version.
    pub listener: std::sync::Mutex<Option<tokio::task::AbortHandle>>,
}

/// How a guest read was served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Served {
    /// Every chunk was in the cache.
    Hit,
    /// It waited for chunks that all came from peers.
    Peer,
    /// It waited for chunks of which some came from the origin.
    Origin,
}

/// Guest read latency by outcome: the time guests spend waiting, the headline metric.
#[derive(Debug, Default)]
pub struct GuestWaits {
    pub hit: crate::metrics::Histogram,
    pub peer: crate::metrics::Histogram,
    pub origin: crate::metrics::Histogram,
    pub error: crate::metrics::Histogram,
}

impl GuestWaits {
    pub fn status(&self) -> super::control::WaitStatus {
        super::control::WaitStatus {
            hit: self.hit.snapshot(),
            peer: self.peer.snapshot(),
            origin: self.origin.snapshot(),
            error: self.error.snapshot(),
        }
    }
}

/// What an image needs to take part in peer-to-peer relay.
#[derive(Debug, Clone)]
pub struct PeerContext {
    /// This node's name (advertised peer address).
    pub me: String,
    pub key: ClusterKey,
    pub stall: std::time::Duration,
    pub request_timeout: std::time::Duration,
    /// Relay tree unit in bytes.
    pub stripe: u64,
    /// Relay tree fan-out.
    pub fanout: u32,
    /// Number of relay trees.
    pub classes: u32,
    /// Most peer sessions of one image, both ways.
    pub max_sessions: usize,
    /// Whether relays push runs down their trees.
    pub push: bool,
    /// Whether chunks go to peers packed.
    pub pack: bool,
}

impl Image {
    /// Opens image `cfg`: resolves its manifest, opens its cache and its origin.
    pub async fn open(
        cfg: &ImageConfig,
        cache_dir: &Path,
        tuning: Tuning,
        socket: PathBuf,
        peers: Option<&PeerContext>,
    ) -> Result<Arc<Image>, ImageError> {
        let name = cfg.name.clone();
        let invalid = |message: String| ImageError::Invalid { name: name.clone(), message };
        cfg.validate().map_err(|e| invalid(e.to_string()))?;
        let origin = OriginUrl::parse(&cfg.origin).map_err(|e| invalid(e.to_string()))?;
        let chunk = cfg.chunk_size().map_err(&invalid)?;
        let manifest = match (&cfg.manifest, &origin) {
            (Some(path), _) => {
                let m = Manifest::load(path).map_err(|source| ImageError::Manifest { name: name.clone(), source })?;
                if let Some(c) = chunk {
                    if c != m.geometry().chunk_size() {
                        return Err(invalid(format!(
                            "chunk_size {c} disagrees with the manifest's {}",
                            m.geometry().chunk_size()
                        )));
                    }
                }
                m
            }
            (None, OriginUrl::File(path)) => {
                let (path, dir, n) = (path.clone(), cache_dir.join("manifests"), name.clone());
                let chunk = chunk.unwrap_or(ChunkSize::DEFAULT);
                tokio::task::spawn_blocking(move || super::manifests::file_manifest(&path, &dir, &n, chunk))
                    .await
                    .map_err(|e| invalid(e.to_string()))?
                    .map_err(|source| ImageError::Manifest { name: name.clone(), source })?
            }
            (None, _) => return Err(invalid("a network origin needs a manifest".into())),
        };
        let iscsi = cfg.iscsi_options().map_err(|e| invalid(e.to_string()))?;
        let source = origin.open(iscsi).map_err(|source| ImageError::Origin { name: name.clone(), source })?;
        let manifest = Arc::new(manifest);
        let (dir, m) = (cache_dir.to_path_buf(), manifest.clone());
        let faults = store_faults(&name).map_err(&invalid)?;
        let store = tokio::task::spawn_blocking(move || ChunkStore::open_with_faults(&dir, &m, faults))
            .await
            .map_err(|e| invalid(e.to_string()))?
            .map_err(|source| ImageError::Store { name: name.clone(), source })?;
        let store = Arc::new(store);
        let max_chunks = (tuning.max_fetch / manifest.geometry().chunk_size().bytes()).max(1) as u32;
        let swarm = peers.map(|p| {
            let stripe = (p.stripe / manifest.geometry().chunk_size().bytes()).max(1) as u32;
            let tuning = SwarmTuning {
                stall: p.stall,
                request_timeout: p.request_timeout,
                stripe,
                fanout: p.fanout,
                classes: p.classes,
                max_sessions: p.max_sessions,
                push: p.push,
                pack: p.pack,
            };
            // Its name for this image carries when it joined it (now, as vmtd opens the image):
            // the trees place the nodes that joined earlier above it.
            let me = crate::p2p::conn::image_name(&p.me, crate::p2p::conn::joined_now());
            Swarm::new(&me, p.key.clone(), manifest.clone(), source.clone(), tuning)
        });
        let source: Arc<dyn crate::fetch::ChunkSource> = match &swarm {
            Some(s) => s.clone(),
            None => source,
        };
        let fetcher = Fetcher::new(
            store.clone(),
            manifest.clone(),
            source,
            FetchTuning { timeout: tuning.fetch_timeout, max_chunks },
        );
        if let Some(s) = &swarm {
            s.attach(&fetcher);
        }
        tracing::info!(image = %name, digest = %manifest.root(), size = manifest.geometry().image_size(),
            present = store.present_count(), "image ready");
        Ok(Arc::new(Image {
            name,
            origin: cfg.origin.clone(),
            manifest,
            store,
            fetcher,
            socket,
            bytes_served: AtomicU64::new(0),
            clients: AtomicU64::new(0),
            shutdown: watch::channel(false).0,
            completing: std::sync::atomic::AtomicBool::new(false),
            recorder: Recorder::default(),
            prefetch: std::sync::Mutex::new(None),
            tracer: Tracer::default(),
            reads: AtomicU64::new(0),
            reads_waited: AtomicU64::new(0),
            bytes_from_cache: AtomicU64::new(0),
            reads_in_flight: AtomicU64::new(0),
            waits: GuestWaits::default(),
            swarm,
            bytes_to_peers: AtomicU64::new(0),
            listener: std::sync::Mutex::new(None),
        }))
    }

    /// Stops this image's prefetch, if one runs.
    pub fn cancel_prefetch(&self) {
        if let Some(j) = self.prefetch.lock().unwrap().as_ref() {
            j.cancel();
        }
    }

    /// NBD clients connected now.
    pub fn clients(&self) -> u64 {
        self.clients.load(Ordering::SeqCst)
    }

    pub fn status(&self, holds: Vec<String>, profile_chunks: Option<u64>) -> ImageStatus {
        let g = self.manifest.geometry();
        let f = self.fetcher.stats();
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        // Once per status: it takes the selector's lock and unites the peers' have-maps.
        let summary = self.swarm.as_ref().map(|s| s.summary());
        ImageStatus {
            name: self.name.clone(),
            origin: self.origin.clone(),
            digest: self.manifest.root().to_hex(),
            image_size: g.image_size(),
            chunk_size: g.chunk_size().bytes(),
            chunks_present: self.store.present_count(),
            chunks_total: u64::from(g.chunk_count()),
            bytes_from_origin: match &self.swarm {
                Some(s) => load(&s.stats().bytes_from_origin),
                None => load(&f.bytes_from_origin),
            },
            bytes_served: load(&self.bytes_served),
            chunks_fetched: load(&f.chunks_fetched),
            upstream_reads: load(&f.upstream_reads),
            retries: load(&f.retries),
            gave_up: load(&f.gave_up),
            reads_in_flight: load(&self.reads_in_flight),
            verify_failures: load(&f.verify_failures),
            failed_reads: load(&f.failed_reads),
            fetching: self.fetcher.inflight() as u64,
            clients: load(&self.clients),
            holds,
            reads: load(&self.reads),
            reads_waited: load(&self.reads_waited),
            bytes_from_cache: load(&self.bytes_from_cache),
            waits: self.waits.status(),
            origin_latency: match &self.swarm {
                Some(s) => s.stats().origin_latency.snapshot(),
                None => f.origin_latency.snapshot(),
            },
            peer_latency: self.swarm.as_ref().map(|s| s.stats().peer_latency.snapshot()).unwrap_or_default(),
            recording: self.recorder.running().map(Option::unwrap_or_default),
            tracing: self.tracer.running(),
            profile_chunks,
            prefetch: self.prefetch.lock().unwrap().as_ref().map(|j| PrefetchStatus {
                total_chunks: load(&j.total_chunks),
                done_chunks: load(&j.done_chunks),
                scheduled_bytes: load(&j.fetched_bytes),
                finished: j.finished.load(Ordering::SeqCst),
                cancelled: j.cancelled.load(Ordering::SeqCst),
                error: j.error.lock().unwrap().clone(),
            }),
            socket: self.socket.display().to_string(),
            cache_dir: self.store.dir().display().to_string(),
            peers: summary.as_ref().map_or(0, |sum| sum.members),
            cache: {
                let st = self.store.stats();
                super::control::CacheHealth {
                    write_errors: load(&st.write_errors),
                    sync_errors: load(&st.sync_errors),
                    read_errors: load(&st.read_errors),
                    chunks_dropped: load(&st.chunks_dropped),
                    chunks_not_cached: load(&st.chunks_not_cached),
                    chunks_evicted: load(&st.chunks_evicted),
                    kept_reads: load(&st.kept_reads),
                    kept_bytes: self.store.kept_bytes(),
                    degraded: self.store.degraded(),
                }
            },
            p2p: self.swarm.as_ref().zip(summary.as_ref()).map(|(s, sum)| {
                let st = s.stats();
                let packs = s.pack_stats();
                PeerStatus {
                    peers_usable: sum.usable,
                    sessions: s.sessions(),
                    sessions_peak: s.sessions_peak(),
                    chunks_at_peers: sum.chunks_at_peers,
                    tree_parents: sum.parents,
                    peers_banned: sum.banned,
                    bans: sum.bans_total,
                    bytes_from_peers: load(&st.bytes_from_peers),
                    bytes_pushed: load(&st.bytes_pushed),
                    pushes_dropped: load(&st.pushes_dropped),
                    push_parts_received: load(&st.push_parts),
                    bytes_to_peers: load(&self.bytes_to_peers),
                    chunks_packed: packs.packed,
                    chunks_sent_as_received: packs.sent_as_received,
                    pack_bytes: packs.bytes,
                    peer_requests: load(&st.peer_requests),
                    peer_refusals: load(&st.peer_refusals),
                    peer_failures: load(&st.peer_failures),
                    peer_verify_failures: load(&st.peer_verify_failures),
                    name: s.me().to_string(),
                }
            }),
        }
    }
}

/// Builds a read that spans several fetched runs and cached chunks, chunk by chunk; `None` when
/// a cached chunk could not be read (the store then forgot it). Blocks on the cache.
fn assemble(
    store: &ChunkStore,
    offset: u64,
    len: u32,
    range: std::ops::Range<u32>,
    runs: &[Arc<RunData>],
) -> Option<Vec<u8>> {
    let g = store.geometry();
    let mut buf = vec![0u8; len as usize];
    let end = offset + u64::from(len);
    for i in range {
        let c = ChunkIdx(i);
        let start = g.chunk_offset(c).0.max(offset);
        let stop = (g.chunk_offset(c).0 + g.chunk_len(c) as u64).min(end);
        let piece = &mut buf[(start - offset) as usize..(stop - offset) as usize];
        match runs.iter().find_map(|r| r.slice(start, piece.len())) {
            Some(bytes) => piece.copy_from_slice(bytes),
            None => store.read_at(start, piece).ok()?,
        }
    }
    Some(buf)
}

impl Image {
    /// The bytes of `[offset, offset + len)`, fetched first if missing: from the cache, or
    /// shared from the fetched run that holds them. Cache reads that would wait for the disk run
    /// on the blocking pool: a slow cache disk must not hold the runtime's threads, which serve
    /// every other image too.
    async fn bytes(&self, offset: u64, len: u32, priority: Priority) -> Result<(Bytes, Served), u32> {
        // A cached chunk that cannot be read back is forgotten by the store and fetched in the
        // same round; a round fails only when a chunk leaves the cache (a failed read, an
        // eviction) between a fetch and the read of what it did not fetch.
        let range = self.manifest.geometry().chunks_covering(ByteOffset(offset), u64::from(len));
        self.store.touch(range.clone());
        if priority != Priority::Relay {
            if let Some(s) = &self.swarm {
                s.activate();
            }
        }
        for _ in 0..=range.len() {
            if let Some(served) = self.try_bytes(offset, len, priority).await? {
                return Ok(served);
            }
            tracing::warn!(image = %self.name, offset, len, "cache read failed; fetching the chunks again");
        }
        Err(EIO)
    }

    async fn try_bytes(&self, offset: u64, len: u32, priority: Priority) -> Result<Option<(Bytes, Served)>, u32> {
        let range = self.manifest.geometry().chunks_covering(ByteOffset(offset), u64::from(len));
        let store = self.store.clone();
        if self.store.has_all(range.clone()) {
            // Chunks stored a moment ago (pushed ahead of the guest, fetched for a child): their
            // verified bytes, kept in memory until durable.
            if let Some(bytes) = self.store.read_kept(offset, len as usize) {
                return Ok(Some((bytes, Served::Hit)));
            }
            // The common hit: the bytes are in the page cache, read at once without a hand-off.
            if let Some(bytes) = self.store.read_vec_nowait(offset, len as usize) {
                return Ok(Some((Bytes::from(bytes), Served::Hit)));
            }
            let read = tokio::task::spawn_blocking(move || store.read_vec(offset, len as usize).ok());
            if let Some(bytes) = read.await.map_err(|_| EIO)? {
                return Ok(Some((Bytes::from(bytes), Served::Hit)));
            }
            // The chunks left the cache meanwhile (evicted, or forgotten after a failed read):
            // fetch them in this same round.
        }
        let guest = priority == Priority::Guest;
        let runs = self.fetcher.ensure_with(range.clone(), priority).await.map_err(|e| {
            if guest {
                self.reads_waited.fetch_add(1, Ordering::Relaxed);
            }
            tracing::warn!(image = %self.name, offset, len, error = %e, "read failed");
            EIO
        })?;
        // No run: the chunks were stored between the presence check and the fetcher's look,
        // so nothing was waited for.
        let how = match &runs[..] {
            [] => Served::Hit,
            runs if runs.iter().all(|r| r.from_peers) => Served::Peer,
            _ => Served::Origin,
        };
        if guest && how != Served::Hit {
            self.reads_waited.fetch_add(1, Ordering::Relaxed);
        }
        let bytes = self.bytes_of_runs(offset, len, runs).await.map_err(|_| EIO)?;
        Ok(bytes.map(|b| (b, how)))
    }

    /// The bytes of `[offset, offset + len)` from fetched `runs`, or from the cache for chunks
    /// none of them holds; `Err` if the blocking pool failed, `None` if the cache read did.
    async fn bytes_of_runs(&self, offset: u64, len: u32, runs: Vec<Arc<RunData>>) -> Result<Option<Bytes>, ()> {
        // The common cold read: one fetched run holds it all, its buffer shared (or, for a small
        // read of a much longer run, copied: see `share_or_copy`).
        if let Some(bytes) = runs.iter().find_map(|r| r.share_or_copy(offset, len as usize)) {
            return Ok(Some(bytes));
        }
        let range = self.manifest.geometry().chunks_covering(ByteOffset(offset), u64::from(len));
        let store = self.store.clone();
        let read = tokio::task::spawn_blocking(move || assemble(&store, offset, len, range, &runs));
        Ok(read.await.map_err(|_| ())?.map(Bytes::from))
    }

    /// A relay's reply to a peer for `run`, fetched on its behalf: the chunks that arrive in
    /// order go to `parts` as they come (cut through), and the rest is returned.
    async fn relay(&self, run: std::ops::Range<u32>, parts: &Parts) -> Option<Bytes> {
        let g = self.manifest.geometry();
        self.store.touch(run.clone());
        let (runs, rest) = self.fetcher.ensure_parts(run.clone(), Priority::Relay, parts).await.ok()?;
        let (offset, len) = g.run_bytes(rest..run.end)?;
        let len = u32::try_from(len).ok()?;
        match self.bytes_of_runs(offset.0, len, runs).await {
            Ok(Some(bytes)) => Some(bytes),
            // A chunk of the rest left the cache before it was read back: fetched again.
            _ => self.bytes(offset.0, len, Priority::Relay).await.ok().map(|(b, _)| b),
        }
    }
}

impl Image {
    /// The bytes of `[offset, offset + len)` if the cache holds them and they read back; never a
    /// fetch.
    async fn cached(&self, offset: u64, len: u32) -> Option<Bytes> {
        let range = self.manifest.geometry().chunks_covering(ByteOffset(offset), u64::from(len));
        if !self.store.has_all(range.clone()) {
            return None;
        }
        self.store.touch(range);
        if let Some(bytes) = self.store.read_kept(offset, len as usize) {
            return Some(bytes);
        }
        if let Some(bytes) = self.store.read_vec_nowait(offset, len as usize) {
            return Some(Bytes::from(bytes));
        }
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || store.read_vec(offset, len as usize).ok()).await.ok()?.map(Bytes::from)
    }
}

impl Export for Image {
    fn size(&self) -> u64 {
        self.manifest.geometry().image_size()
    }

    fn read(&self, offset: u64, len: u32) -> BoxFuture<'_, Result<Bytes, u32>> {
        Box::pin(async move {
            let range = self.manifest.geometry().chunks_covering(ByteOffset(offset), u64::from(len));
            self.recorder.note(range);
            self.reads.fetch_add(1, Ordering::Relaxed);
            let start = std::time::Instant::now();
            self.reads_in_flight.fetch_add(1, Ordering::Relaxed);
            // Counted down also when the connection drops the read half way.
            let _in_flight = scopeguard(|| {
                self.reads_in_flight.fetch_sub(1, Ordering::Relaxed);
            });
            let read = self.bytes(offset, len, Priority::Guest).await;
            let waited = start.elapsed();
            let (buf, how) = read.inspect_err(|_| self.waits.error.observe(waited))?;
            match how {
                Served::Hit => {
                    self.waits.hit.observe(waited);
                    self.bytes_from_cache.fetch_add(u64::from(len), Ordering::Relaxed);
                }
                Served::Peer => self.waits.peer.observe(waited),
                Served::Origin => self.waits.origin.observe(waited),
            }
            self.bytes_served.fetch_add(u64::from(len), Ordering::Relaxed);
            Ok(buf)
        })
    }

    fn stop_signal(&self) -> Option<watch::Receiver<bool>> {
        Some(self.shutdown.subscribe())
    }

    fn request_received(&self, command: u16, offset: u64, length: u32) {
        let op = match command {
            CMD_READ => trace::Op::Read,
            CMD_WRITE => trace::Op::Write,
            CMD_FLUSH => trace::Op::Flush,
            _ => return,
        };
        self.tracer.note(op, offset, u64::from(length));
    }

    fn client_joined(&self, max: u64) -> bool {
        self.clients.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| (n < max).then_some(n + 1)).is_ok()
    }

    fn client_left(&self) {
        self.clients.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Runs `f` when dropped.
fn scopeguard<F: FnOnce()>(f: F) -> impl Drop {
    struct Guard<F: FnOnce()>(Option<F>);
    impl<F: FnOnce()> Drop for Guard<F> {
        fn drop(&mut self) {
            if let Some(f) = self.0.take() {
                f();
            }
        }
    }
    Guard(Some(f))
}

/// The store faults `VMTHUNDER_STORE_FAULTS` injects into image `name`'s cache (testing only).
fn store_faults(name: &str) -> Result<Vec<crate::store::io::Fault>, String> {
    let Ok(spec) = std::env::var("VMTHUNDER_STORE_FAULTS") else { return Ok(Vec::new()) };
    let mut faults = crate::store::io::parse_faults(&spec).map_err(|e| e.to_string())?;
    faults.retain(|f| f.image.as_deref().is_none_or(|i| i == name));
    if !faults.is_empty() {
        tracing::warn!(image = name, spec, "injecting cache faults (VMTHUNDER_STORE_FAULTS)");
    }
    Ok(faults)
}
