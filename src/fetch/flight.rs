//! The miss path: turns "these chunks must be present" into as few upstream reads as possible.
//!
//! - **Single flight**: a chunk has at most one fetch in progress; later misses on it wait for
//!   that fetch's outcome instead of asking the source again.
//! - **Coalescing**: the missing chunks of one request that lie side by side are fetched in one
//!   upstream read, up to `max_fetch` bytes.
//! - **Bounded retries**: a failing source is retried with exponential backoff until the fetch
//!   budget is spent; then the waiting reads fail (NBD EIO) and the next miss starts afresh.
//! - **Verify before store**: every chunk is checked against the manifest; a mismatch is never
//!   stored or served.
//!
//! - **Serve from memory**: waiters get the verified bytes of the run they waited on as soon as
//!   they are checked; writing them to the node cache follows off their critical path. A chunk
//!   leaves the in-flight map only after it is in the store, so a reader that arrives meanwhile
//!   joins the finished flight and gets the same bytes.
//!
//! Fetches run as their own tasks, so a client that disconnects mid-read does not cancel a fetch
//! that other clients are waiting on.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use thiserror::Error;
use tokio::sync::watch;
use tokio::time::Instant;

use super::slots::Slots;
use super::{ChunkSource, SourceError};
use crate::image::{ChunkIdx, Manifest};
use crate::store::{ChunkStore, StoreError};

/// Most runs one image has in flight (reading upstream or waiting to be stored), over a source
/// that does not wait on peers; a peer-aware source bounds its origin reads itself.
const MAX_UPSTREAM: usize = 32;
const FIRST_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// Why chunks could not be made present. Cloneable: one outcome reaches every waiter.
#[derive(Debug, Clone, Error, PartialEq)]
pub enum FetchError {
    /// The source kept failing for the whole fetch budget.
    #[error("fetching {what} gave up after {secs:.1}s: {last}")]
    GaveUp { what: String, secs: f64, last: String },
    /// The data received does not match the manifest.
    #[error("{0} from the origin does not match the image manifest")]
    Verify(ChunkIdx),
    /// The fetch task ended without an outcome (daemon shutting down).
    #[error("fetch aborted")]
    Aborted,
}

/// Counters of one image's miss path.
#[derive(Debug, Default)]
pub struct FetchStats {
    pub bytes_from_origin: AtomicU64,
    pub chunks_fetched: AtomicU64,
    pub upstream_reads: AtomicU64,
    pub retries: AtomicU64,
    pub verify_failures: AtomicU64,
    /// Fetches that gave up (the read failed after its retries).
    pub gave_up: AtomicU64,
    pub failed_reads: AtomicU64,
    /// Latency of each upstream read attempt, when the source is the origin itself (a
    /// peer-aware source times its own origin and peer reads).
    pub origin_latency: crate::metrics::Histogram,
}

/// Who needs a fetch: a guest read waiting now, or prefetch working ahead of the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Priority {
    Guest,
    /// Takes an upstream slot only while no guest fetch waits for one.
    Prefetch,
    /// A fetch on behalf of a peer (this node relays the chunks' stripe for it).
    Relay,
}

/// Tuning of the miss path.
#[derive(Debug, Clone, Copy)]
pub struct FetchTuning {
    /// Budget of one fetch, retries included.
    pub timeout: Duration,
    /// Largest coalesced upstream read, in chunks.
    pub max_chunks: u32,
}

/// Verified bytes of one coalesced upstream read, starting at byte `offset` of the image.
#[derive(Debug)]
pub struct RunData {
    pub offset: u64,
    pub bytes: Bytes,
    /// Every byte came from peers (and was verified by the peer-aware source), none from the
    /// origin.
    pub from_peers: bool,
}

impl RunData {
    /// The bytes of `[offset, offset + len)` that this run holds, if it holds all of them.
    pub fn slice(&self, offset: u64, len: usize) -> Option<&[u8]> {
        let start = offset.checked_sub(self.offset)? as usize;
        self.bytes.get(start..start.checked_add(len)?)
    }

    /// Like [`RunData::slice`], sharing the buffer instead of copying.
    pub fn share(&self, offset: u64, len: usize) -> Option<Bytes> {
        self.slice(offset, len)?;
        let start = (offset - self.offset) as usize;
        Some(self.bytes.slice(start..start + len))
    }
}

type Outcome = Option<Result<Arc<RunData>, FetchError>>;

/// The in-flight entries one fetch owns. However the fetch ends (an outcome, cancellation, or a
/// panic in the source or the store), dropping the claim removes the entries it still holds and
/// tells their waiters `Aborted`, so the next read of those chunks starts a fresh fetch instead
/// of joining one that will never finish.
struct Claim {
    fetcher: Arc<Fetcher>,
    run: Vec<(u32, watch::Sender<Outcome>)>,
}

impl Drop for Claim {
    fn drop(&mut self) {
        if self.run.is_empty() {
            return;
        }
        // May run while unwinding from a panic taken under this lock: never panic again here.
        let mut inflight = self.fetcher.inflight.lock().unwrap_or_else(|e| e.into_inner());
        for (i, tx) in self.run.drain(..) {
            if inflight.get(&i).is_some_and(|rx| rx.same_channel(&tx.subscribe())) {
                inflight.remove(&i);
            }
            tx.send_if_modified(|o| o.is_none() && o.replace(Err(FetchError::Aborted)).is_none());
        }
    }
}

/// The miss path of one image.
pub struct Fetcher {
    store: Arc<ChunkStore>,
    manifest: Arc<Manifest>,
    source: Arc<dyn ChunkSource>,
    tuning: FetchTuning,
    inflight: Mutex<HashMap<u32, watch::Receiver<Outcome>>>,
    /// Upstream slots: guest and relay runs are urgent, prefetch stands back (see `slots`).
    upstream: Slots,
    stats: FetchStats,
}

impl Fetcher {
    pub fn new(
        store: Arc<ChunkStore>,
        manifest: Arc<Manifest>,
        source: Arc<dyn ChunkSource>,
        tuning: FetchTuning,
    ) -> Arc<Self> {
        Arc::new(Fetcher {
            store,
            manifest,
            source,
            tuning,
            inflight: Mutex::new(HashMap::new()),
            upstream: Slots::new(MAX_UPSTREAM),
            stats: FetchStats::default(),
        })
    }

    pub fn stats(&self) -> &FetchStats {
        &self.stats
    }

    /// Largest number of chunks fetched in one upstream read.
    pub fn max_chunks(&self) -> u32 {
        self.tuning.max_chunks
    }

    /// Number of chunks being fetched right now.
    pub fn inflight(&self) -> usize {
        self.inflight.lock().unwrap().len()
    }

    /// Makes every chunk in `range` present, fetching what is missing. Returns the fetched runs
    /// that hold the chunks which were missing (chunks not covered by them are in the store), or
    /// the first failure among them.
    pub async fn ensure(self: &Arc<Self>, range: Range<u32>) -> Result<Vec<Arc<RunData>>, FetchError> {
        self.ensure_with(range, Priority::Guest).await
    }

    /// [`Fetcher::ensure`] on behalf of `priority`.
    pub async fn ensure_with(
        self: &Arc<Self>,
        range: Range<u32>,
        priority: Priority,
    ) -> Result<Vec<Arc<RunData>>, FetchError> {
        let mut waits = Vec::new();
        let mut mine: Vec<(u32, watch::Sender<Outcome>)> = Vec::new();
        {
            // `put` happens before an entry leaves this map, so checking the store under the
            // lock cannot miss a fetch that is just finishing.
            let mut inflight = self.inflight.lock().unwrap();
            for i in self.store.missing(range) {
                if let Some(rx) = inflight.get(&i) {
                    waits.push(rx.clone());
                } else {
                    let (tx, rx) = watch::channel(None);
                    inflight.insert(i, rx.clone());
                    waits.push(rx);
                    mine.push((i, tx));
                }
            }
        }
        for run in runs(mine, self.tuning.max_chunks, self.source.run_boundary()) {
            let me = Arc::clone(self);
            tokio::spawn(async move { me.fetch_run(run, priority).await });
        }
        let mut data: Vec<Arc<RunData>> = Vec::new();
        let mut failure = None;
        for mut rx in waits {
            let outcome = match rx.wait_for(Option::is_some).await {
                Ok(v) => v.clone().unwrap_or(Err(FetchError::Aborted)),
                Err(_) => Err(FetchError::Aborted),
            };
            match outcome {
                Ok(run) => {
                    if !data.iter().any(|d| Arc::ptr_eq(d, &run)) {
                        data.push(run);
                    }
                }
                Err(e) => {
                    failure.get_or_insert(e);
                }
            }
        }
        match failure {
            None => Ok(data),
            Some(e) => {
                if priority == Priority::Guest {
                    self.stats.failed_reads.fetch_add(1, Ordering::Relaxed);
                }
                Err(e)
            }
        }
    }

    /// The upstream slot a fetch holds until its run is stored; none with a peer-aware source.
    /// There a fetch may wait on a relay up its stripe's tree, which may join a fetch queued for
    /// a slot on that node, whose slots may all be held by fetches waiting on relays here: any
    /// slot held across a peer read can close such a cycle (a deadlock until the peer requests
    /// time out). The source bounds its origin reads itself, relays in flight are bounded by the
    /// peer sessions' queues, and prefetch by its own concurrency.
    async fn slot(&self, priority: Priority) -> Option<tokio::sync::SemaphorePermit<'_>> {
        if self.source.waits_on_peers() {
            return None;
        }
        match priority {
            Priority::Relay => None,
            Priority::Guest => Some(self.upstream.urgent().await),
            Priority::Prefetch => Some(self.upstream.background().await),
        }
    }

    async fn fetch_run(self: Arc<Self>, run: Vec<(u32, watch::Sender<Outcome>)>, priority: Priority) {
        let (offset, len) = self
            .manifest
            .geometry()
            .run_bytes(run[0].0..run[run.len() - 1].0 + 1)
            .map(|(o, l)| (o.0, l))
            .expect("fetched runs are adjacent chunks inside the image");
        // From here on the entries leave the in-flight map however this task ends.
        let mut claim = Claim { fetcher: self.clone(), run };
        // Held until the run is stored: bounds both upstream reads in flight and fetched bytes
        // waiting for the data file (none over a peer-aware source, see `slot`).
        let _permit = self.slot(priority).await;
        let (data, checked) = match self.read_with_retries(offset, len, priority).await {
            Ok(read) => read,
            Err(e) => {
                let mut inflight = self.inflight.lock().unwrap();
                for (i, tx) in claim.run.drain(..) {
                    inflight.remove(&i);
                    let _ = tx.send(Some(Err(e.clone())));
                }
                return;
            }
        };
        self.stats.bytes_from_origin.fetch_add(len as u64, Ordering::Relaxed);
        let me = Arc::clone(&self);
        // Hashing and the data-file write run on the blocking pool: a slow or failing cache disk
        // must never hold a runtime thread, which with `worker_threads = 1` is every session's.
        let finish = move || me.finish(offset, data, checked, claim);
        if tokio::task::spawn_blocking(finish).await.is_err() {
            // The claim moved into the task cleaned up the in-flight entries as it unwound.
            tracing::error!("verify-and-store task failed");
        }
    }

    /// Verifies a fetched run (unless `checked`), hands it to its waiters, stores it, and lets
    /// its chunks leave the in-flight map.
    fn finish(&self, offset: u64, data: Vec<u8>, checked: bool, mut claim: Claim) {
        let from_peers = checked && self.source.waits_on_peers();
        let run_data = Arc::new(RunData { offset, bytes: Bytes::from(data), from_peers });
        let run = &claim.run;
        // Verify, hand the bytes to the waiters, then store: the write is off their path.
        let verified: Vec<bool> = run.iter().map(|(i, _)| checked || self.verify(&run_data, ChunkIdx(*i))).collect();
        for ((i, tx), ok) in run.iter().zip(&verified) {
            let outcome = if *ok { Ok(run_data.clone()) } else { Err(FetchError::Verify(ChunkIdx(*i))) };
            let _ = tx.send(Some(outcome));
        }
        // One write per stretch of verified chunks (the run is contiguous).
        let mut k = 0;
        while k < run.len() {
            if !verified[k] {
                k += 1;
                continue;
            }
            let start = k;
            while k < run.len() && verified[k] {
                k += 1;
            }
            self.store_span(&run_data, run[start].0..run[k - 1].0 + 1);
        }
        // Chunks that could not be stored were served from memory (also to readers that joined
        // meanwhile: the outcome stays the verified bytes); a later read fetches them again.
        let mut inflight = self.inflight.lock().unwrap();
        for (i, _tx) in claim.run.drain(..) {
            inflight.remove(&i);
        }
    }

    fn verify(&self, run: &RunData, idx: ChunkIdx) -> bool {
        let g = self.manifest.geometry();
        let chunk = run.slice(g.chunk_offset(idx).0, g.chunk_len(idx)).unwrap_or_default();
        if self.manifest.verify(idx, chunk) {
            return true;
        }
        self.stats.verify_failures.fetch_add(1, Ordering::Relaxed);
        tracing::error!(%idx, source = %self.source.describe(), "chunk does not match the manifest; not stored");
        false
    }

    /// Writes a verified span to the cache; a failure is logged (not per chunk when the store
    /// has said why once already) and costs nothing else: the bytes were served from memory.
    fn store_span(&self, run: &RunData, span: Range<u32>) {
        let (offset, len) =
            self.manifest.geometry().run_bytes(span.clone()).expect("stored spans are chunks inside the image");
        let bytes = run.slice(offset.0, len).unwrap_or_default();
        let n = u64::from(span.end - span.start);
        match self.store.put_span(span.clone(), bytes) {
            Ok(()) => {
                self.stats.chunks_fetched.fetch_add(n, Ordering::Relaxed);
            }
            Err(
                StoreError::Degraded(_)
                | StoreError::Forgetting(_)
                | StoreError::NoSpace(_)
                | StoreError::OverBudget(_)
                | StoreError::Evicting(_),
            ) => {}
            Err(e) => tracing::warn!(chunks = ?span, error = %e, "storing fetched chunks failed"),
        }
    }

    async fn read_with_retries(
        &self,
        offset: u64,
        len: usize,
        priority: Priority,
    ) -> Result<(Vec<u8>, bool), FetchError> {
        let start = Instant::now();
        let deadline = start + self.tuning.timeout;
        let mut backoff = FIRST_BACKOFF;
        let mut last = String::from("no attempt finished in time");
        loop {
            let attempt = async {
                self.stats.upstream_reads.fetch_add(1, Ordering::Relaxed);
                // Observed when the attempt ends, also by the deadline (the guard drops then).
                let _timer = (!self.source.waits_on_peers()).then(|| self.stats.origin_latency.timer());
                self.source.read_checked_as(offset, len, priority).await
            };
            match tokio::time::timeout_at(deadline, attempt).await {
                Ok(Ok((data, checked))) if data.len() == len => return Ok((data, checked)),
                Ok(Ok((data, _))) => last = format!("short read: {} of {len} bytes", data.len()),
                Ok(Err(e @ SourceError::OutOfRange { .. })) => {
                    // Retrying cannot fix a source smaller than the manifest says.
                    return Err(self.gave_up(start, e.to_string()));
                }
                Ok(Err(e)) => last = e.to_string(),
                Err(_) => return Err(self.gave_up(start, last)),
            }
            if Instant::now() + backoff >= deadline {
                tokio::time::sleep_until(deadline).await;
                return Err(self.gave_up(start, last));
            }
            self.stats.retries.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(source = %self.source.describe(), offset, len, error = %last, "upstream read failed; retrying");
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    fn gave_up(&self, start: Instant, last: String) -> FetchError {
        self.stats.gave_up.fetch_add(1, Ordering::Relaxed);
        FetchError::GaveUp { what: self.source.describe(), secs: start.elapsed().as_secs_f64(), last }
    }
}

/// Splits sorted chunk indices into runs of adjacent chunks, each at most `max` long and, with
/// `boundary`, never crossing a multiple of it. Pure: `vmt sim` plans its nodes' upstream reads
/// with it too.
pub fn runs<T>(items: Vec<(u32, T)>, max: u32, boundary: Option<u32>) -> Vec<Vec<(u32, T)>> {
    let mut out: Vec<Vec<(u32, T)>> = Vec::new();
    for (i, t) in items {
        let cut = boundary.is_some_and(|b| b > 0 && i % b == 0);
        match out.last_mut() {
            Some(run) if !cut && run.len() < max as usize && run.last().is_some_and(|(p, _)| p + 1 == i) => {
                run.push((i, t))
            }
            _ => out.push(vec![(i, t)]),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fetch::BoxFuture;
    use crate::image::{ChunkSize, Geometry};
    use std::sync::atomic::AtomicBool;

    #[test]
    fn runs_split_on_gaps_and_size() {
        let items: Vec<(u32, ())> = [1, 2, 3, 5, 6, 7, 8, 9].iter().map(|&i| (i, ())).collect();
        let r: Vec<Vec<u32>> =
            runs(items.clone(), 3, None).into_iter().map(|r| r.into_iter().map(|(i, _)| i).collect()).collect();
        assert_eq!(r, vec![vec![1, 2, 3], vec![5, 6, 7], vec![8, 9]]);
        let r: Vec<Vec<u32>> =
            runs(items, 8, Some(4)).into_iter().map(|r| r.into_iter().map(|(i, _)| i).collect()).collect();
        assert_eq!(r, vec![vec![1, 2, 3], vec![5, 6, 7], vec![8, 9]], "cut at multiples of 4");
    }

    /// A source over a byte vector that counts reads and can be switched off or made to lie.
    struct MemSource {
        data: Vec<u8>,
        reads: AtomicU64,
        down: AtomicBool,
        corrupt: AtomicBool,
        panic: AtomicBool,
    }

    impl ChunkSource for MemSource {
        fn describe(&self) -> String {
            "memory".into()
        }
        fn size(&self) -> BoxFuture<'_, Result<u64, SourceError>> {
            Box::pin(async move { Ok(self.data.len() as u64) })
        }
        fn read(&self, offset: u64, len: usize) -> BoxFuture<'_, Result<Vec<u8>, SourceError>> {
            Box::pin(async move {
                self.reads.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(20)).await;
                if self.panic.swap(false, Ordering::SeqCst) {
                    panic!("a source bug");
                }
                if self.down.load(Ordering::SeqCst) {
                    return Err(SourceError::Unreachable { what: "memory".into(), reason: "down".into() });
                }
                let mut v = self.data[offset as usize..offset as usize + len].to_vec();
                if self.corrupt.load(Ordering::SeqCst) {
                    v[0] ^= 1;
                }
                Ok(v)
            })
        }
    }

    /// Waits until every started fetch has been stored (stores follow the waiters' wake-up).
    async fn settled(f: &Fetcher) {
        for _ in 0..400 {
            if f.inflight() == 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!("fetches never settled");
    }

    fn setup(timeout: Duration) -> (tempfile::TempDir, Arc<MemSource>, Arc<ChunkStore>, Arc<Fetcher>) {
        let data: Vec<u8> = (0..64 * 1024u32).map(|i| (i * 31 % 256) as u8).collect();
        let g = Geometry::new(data.len() as u64, ChunkSize::new(4096).unwrap()).unwrap();
        let m = Manifest::build(g, |idx, buf| {
            let o = g.chunk_offset(idx).0 as usize;
            buf.copy_from_slice(&data[o..o + buf.len()]);
            Ok::<_, ()>(())
        })
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let m = Arc::new(m);
        let store = Arc::new(ChunkStore::open(dir.path(), &m).unwrap());
        let src = Arc::new(MemSource {
            data,
            reads: AtomicU64::new(0),
            down: AtomicBool::new(false),
            corrupt: AtomicBool::new(false),
            panic: AtomicBool::new(false),
        });
        let f = Fetcher::new(store.clone(), m, src.clone(), FetchTuning { timeout, max_chunks: 4 });
        (dir, src, store, f)
    }

    #[tokio::test]
    async fn concurrent_misses_fetch_once() {
        let (_d, src, store, f) = setup(Duration::from_secs(5));
        let tasks: Vec<_> = (0..8)
            .map(|_| {
                let f = f.clone();
                tokio::spawn(async move { f.ensure(0..4).await })
            })
            .collect();
        for t in tasks {
            let runs = t.await.unwrap().unwrap();
            assert_eq!(runs.len(), 1);
            assert_eq!(runs[0].slice(0, 4096).unwrap(), &src.data[..4096]);
        }
        assert_eq!(src.reads.load(Ordering::SeqCst), 1, "one coalesced read for chunks 0..4");
        settled(&f).await;
        assert!(store.has_all(0..4));
        assert!(f.ensure(0..4).await.unwrap().is_empty(), "present chunks come from the store");
        assert_eq!(src.reads.load(Ordering::SeqCst), 1, "present chunks are not fetched again");
        f.ensure(4..16).await.unwrap();
        assert_eq!(src.reads.load(Ordering::SeqCst), 4, "12 chunks in runs of at most 4");
    }

    #[tokio::test]
    async fn source_down_fails_within_budget_then_recovers() {
        let (_d, src, store, f) = setup(Duration::from_millis(400));
        src.down.store(true, Ordering::SeqCst);
        let t0 = std::time::Instant::now();
        assert!(matches!(f.ensure(0..1).await, Err(FetchError::GaveUp { .. })));
        assert!(t0.elapsed() < Duration::from_secs(2));
        assert!(src.reads.load(Ordering::SeqCst) >= 2, "retried before giving up");
        assert!(!store.has(ChunkIdx(0)));
        src.down.store(false, Ordering::SeqCst);
        f.ensure(0..1).await.unwrap();
        settled(&f).await;
        assert!(store.has(ChunkIdx(0)));
    }

    #[tokio::test]
    async fn corrupt_data_is_never_stored() {
        let (_d, src, store, f) = setup(Duration::from_secs(1));
        src.corrupt.store(true, Ordering::SeqCst);
        assert_eq!(f.ensure(2..3).await.unwrap_err(), FetchError::Verify(ChunkIdx(2)));
        settled(&f).await;
        assert!(!store.has(ChunkIdx(2)));
        assert_eq!(f.stats().verify_failures.load(Ordering::SeqCst), 1);
        assert_eq!(store.pending_count(), 0);
    }

    #[tokio::test]
    async fn a_fetch_that_panics_leaves_no_dead_entries() {
        let (_d, src, store, f) = setup(Duration::from_secs(1));
        src.panic.store(true, Ordering::SeqCst);
        assert_eq!(f.ensure(1..3).await.unwrap_err(), FetchError::Aborted);
        assert_eq!(f.inflight(), 0, "the panicked fetch's entries are gone");
        let runs = f.ensure(1..3).await.unwrap();
        assert_eq!(runs[0].slice(4096, 8192).unwrap(), &src.data[4096..12288]);
        settled(&f).await;
        assert!(store.has_all(1..3));
    }
}
