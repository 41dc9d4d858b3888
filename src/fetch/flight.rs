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
//! - **Pushed runs**: a run a peer offers to push ([`Fetcher::offer`]) is in flight from the
//!   offer on, so reads wait for it rather than ask; if it does not arrive, its waiters fetch it
//!   themselves ([`FetchError::Lost`] is never a read's outcome). Every run this node obtains,
//!   fetched or pushed, is announced to [`Fetcher::obtained`]'s subscribers (the peer server
//!   pushes it on). The runs obtained in the first [`BOOT_WINDOW`] after this node's own boot
//!   begins are kept in order ([`Fetcher::boot_log`]): a peer that starts its boot later is
//!   pushed them ahead of its reads.
//!
//! Fetches run as their own tasks, so a client that disconnects mid-read does not cancel a fetch
//! that other clients are waiting on.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use thiserror::Error;
use tokio::sync::watch;
use tokio::time::Instant;

mod offer;
mod parts;
mod retry;
mod run;

pub use offer::Offered;
use parts::Emit;
pub use parts::Parts;
pub use run::{runs, RunData};

use super::slots::Slots;
use super::ChunkSource;
use crate::image::{ChunkIdx, Manifest};
use crate::store::{ChunkStore, StoreError};

/// Most runs one image has in flight (reading upstream or waiting to be stored), over a source
/// that does not wait on peers; a peer-aware source bounds its origin reads itself.
const MAX_UPSTREAM: usize = 32;
/// Obtained runs announced and not yet taken by the slowest subscriber; it misses older ones.
const OBTAINED_BACKLOG: usize = 1024;
/// How long after this node's boot begins the runs it obtains join its boot log.
pub const BOOT_WINDOW: Duration = Duration::from_secs(60);
/// Most runs a boot log keeps (half of a session's push backlog).
pub const BOOT_LOG_RUNS: usize = 1024;
/// Most bytes of runs a boot log names: what a later boot is pushed at most from one parent.
pub const BOOT_LOG_BYTES: u64 = 256 << 20;
/// Most times a read waits on offered pushes that are lost before it fetches regardless.
const MAX_LOST: usize = 4;
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
    /// A run a peer offered to push did not arrive: its waiters fetch it themselves.
    #[error("a pushed run was lost")]
    Lost,
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

/// Answers a flight's waiters with `outcome` unless they have an answer already (the first one
/// stands: chunks handed on early keep their verified bytes).
fn answer_once(tx: &watch::Sender<Outcome>, outcome: Result<Arc<RunData>, FetchError>) {
    tx.send_if_modified(|o| o.is_none() && o.replace(outcome).is_none());
}

type Outcome = Option<Result<Arc<RunData>, FetchError>>;

/// The in-flight entries one fetch owns. However the fetch ends (an outcome, cancellation, or a
/// panic in the source or the store), dropping the claim removes the entries it still holds and
/// tells their waiters `Aborted`, so the next read of those chunks starts a fresh fetch instead
/// of joining one that will never finish.
struct Claim {
    fetcher: Arc<Fetcher>,
    run: Vec<(u32, watch::Sender<Outcome>)>,
    /// What its waiters hear if it ends without an outcome.
    lost: FetchError,
}

impl Drop for Claim {
    fn drop(&mut self) {
        if self.run.is_empty() {
            return;
        }
        // May run while unwinding from a panic taken under this lock: never panic again here.
        let mut inflight = self.fetcher.inflight.lock().unwrap_or_else(|e| e.into_inner());
        for (i, tx) in self.run.drain(..) {
            release(&mut inflight, i, &tx);
            answer_once(&tx, Err(self.lost.clone()));
        }
    }
}

/// The miss path of one image.
pub struct Fetcher {
    store: Arc<ChunkStore>,
    manifest: Arc<Manifest>,
    source: Arc<dyn ChunkSource>,
    tuning: FetchTuning,
    /// Each chunk's flight, and whether it is an offered push (see [`Fetcher::ensure_pass`]).
    inflight: Mutex<HashMap<u32, (watch::Receiver<Outcome>, bool)>>,
    /// Upstream slots: guest and relay runs are urgent, prefetch stands back (see `slots`).
    upstream: Slots,
    stats: FetchStats,
    obtained: tokio::sync::broadcast::Sender<Obtained>,
    /// Chunks of runs being fetched, as they arrive ahead of the rest (see [`Arrival`]).
    arrived: tokio::sync::broadcast::Sender<Arrival>,
    /// This node's boot log, once its boot began.
    boot: Mutex<Option<BootLog>>,
}

/// When a node's boot began, and the runs it obtained since, within [`BOOT_WINDOW`], with their
/// bytes.
struct BootLog {
    began: Instant,
    runs: Vec<Range<u32>>,
    bytes: u64,
}

/// Chunks of a run this node is fetching that arrived, verified, ahead of the rest (a peer's
/// reply in parts): `part` of `run`, the bytes while anything still holds them. The whole run
/// is announced as [`Obtained`] once it is in; a fetch that fails (or whose run does not match
/// the manifest) is announced with an empty `part`: no more of that run comes.
#[derive(Debug, Clone)]
pub struct Arrival {
    pub run: Range<u32>,
    pub part: Range<u32>,
    pub data: std::sync::Weak<RunData>,
}

impl Arrival {
    /// The fetch of `run` failed.
    fn failed(run: Range<u32>) -> Arrival {
        Arrival { part: run.end..run.end, run, data: std::sync::Weak::new() }
    }

    pub fn is_failure(&self) -> bool {
        self.part.is_empty()
    }
}

/// A run this node obtained, verified: its chunks, and its bytes while anything still holds
/// them (the ring of announcements pins no memory; once gone, they are in the cache).
#[derive(Debug, Clone)]
pub struct Obtained {
    pub chunks: Range<u32>,
    pub data: std::sync::Weak<RunData>,
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
            obtained: tokio::sync::broadcast::channel(OBTAINED_BACKLOG).0,
            arrived: tokio::sync::broadcast::channel(OBTAINED_BACKLOG).0,
            boot: Mutex::new(None),
        })
    }

    pub fn stats(&self) -> &FetchStats {
        &self.stats
    }

    /// The chunks the node cache holds.
    pub fn present(&self) -> roaring::RoaringBitmap {
        self.store.present()
    }

    /// Largest number of chunks fetched in one upstream read.
    pub fn max_chunks(&self) -> u32 {
        self.tuning.max_chunks
    }

    /// Number of chunks being fetched right now.
    pub fn inflight(&self) -> usize {
        self.inflight.lock().unwrap().len()
    }

    /// Every run this node obtains from now on, fetched or pushed, once verified (a subscriber
    /// that falls [`OBTAINED_BACKLOG`] runs behind misses the oldest).
    pub fn obtained(&self) -> tokio::sync::broadcast::Receiver<Obtained> {
        self.obtained.subscribe()
    }

    /// The chunks of every run this node fetches from now on that arrive ahead of the rest of
    /// their run (the peer server pushes them on as they come).
    pub fn arrivals(&self) -> tokio::sync::broadcast::Receiver<Arrival> {
        self.arrived.subscribe()
    }

    /// This node's boot begins (its guest's or its prefetch's first read): the runs it obtains
    /// from now on, for [`BOOT_WINDOW`], join its boot log. Once only.
    pub fn boot_begins(&self) {
        self.boot.lock().unwrap().get_or_insert_with(|| BootLog { began: Instant::now(), runs: Vec::new(), bytes: 0 });
    }

    /// The runs this node obtained since its boot began, in the order it obtained them (at most
    /// [`BOOT_LOG_RUNS`] and [`BOOT_LOG_BYTES`], within [`BOOT_WINDOW`]): what a peer that
    /// boots the same image later will read, roughly in that order.
    pub fn boot_log(&self) -> Vec<Range<u32>> {
        self.boot.lock().unwrap().as_ref().map(|log| log.runs.clone()).unwrap_or_default()
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
        self.ensure_passes(range, priority, None).await
    }

    /// [`Fetcher::ensure_with`] for a relay that cuts through: while the chunks of `range` come
    /// in order, each is sent to `parts` as it arrives (coalesced with those that came with it),
    /// all but the last. Returns the runs, and the first chunk not sent: the rest of the reply.
    /// A chunk the cache held, or one that came out of order, ends the parts.
    pub async fn ensure_parts(
        self: &Arc<Self>,
        range: Range<u32>,
        priority: Priority,
        parts: &Parts,
    ) -> Result<(Vec<Arc<RunData>>, u32), FetchError> {
        let mut emit = Emit::new(self.manifest.geometry(), parts, range.clone());
        let runs = self.ensure_passes(range, priority, Some(&mut emit)).await?;
        Ok((runs, emit.next()))
    }

    async fn ensure_passes(
        self: &Arc<Self>,
        range: Range<u32>,
        priority: Priority,
        mut emit: Option<&mut Emit<'_>>,
    ) -> Result<Vec<Arc<RunData>>, FetchError> {
        // A lost push leaves its chunks to the next pass, which fetches what is still missing;
        // the last pass fetches even chunks offered again.
        let mut data: Vec<Arc<RunData>> = Vec::new();
        let mut pass = 0;
        loop {
            let last = pass == MAX_LOST;
            match self.ensure_pass(range.clone(), priority, &mut data, last, emit.as_deref_mut()).await {
                Err(FetchError::Lost) if pass < MAX_LOST => pass += 1,
                Err(e) => {
                    if priority == Priority::Guest {
                        self.stats.failed_reads.fetch_add(1, Ordering::Relaxed);
                    }
                    return Err(e);
                }
                Ok(()) => return Ok(data),
            }
        }
    }

    /// One pass of [`Fetcher::ensure_with`]: the runs it waited on join `data`; `Lost` when a
    /// pushed run it waited on did not arrive. The `last` pass waits on no offered push.
    async fn ensure_pass(
        self: &Arc<Self>,
        range: Range<u32>,
        priority: Priority,
        data: &mut Vec<Arc<RunData>>,
        last: bool,
        mut emit: Option<&mut Emit<'_>>,
    ) -> Result<(), FetchError> {
        let mut waits = Vec::new();
        let mut mine: Vec<(u32, watch::Sender<Outcome>)> = Vec::new();
        {
            // `put` happens before an entry leaves this map, so checking the store under the
            // lock cannot miss a fetch that is just finishing.
            let mut inflight = self.inflight.lock().unwrap();
            for i in self.store.missing(range) {
                // On the last pass an offered push is not waited for but raced: its peer may
                // offer again and again and never deliver.
                match inflight.get(&i) {
                    Some((rx, pushed)) if !(last && *pushed) => waits.push((i, rx.clone())),
                    _ => {
                        let (tx, rx) = watch::channel(None);
                        inflight.insert(i, (rx.clone(), false));
                        waits.push((i, rx));
                        mine.push((i, tx));
                    }
                }
            }
        }
        for run in runs(mine, self.tuning.max_chunks, self.source.run_boundary()) {
            let me = Arc::clone(self);
            tokio::spawn(async move { me.fetch_run(run, priority).await });
        }
        let mut failure = None;
        for k in 0..waits.len() {
            let (i, rx) = &mut waits[k];
            let outcome = match rx.wait_for(Option::is_some).await {
                Ok(v) => v.clone().unwrap_or(Err(FetchError::Aborted)),
                Err(_) => Err(FetchError::Aborted),
            };
            match outcome {
                Ok(run) => {
                    if let Some(emit) = emit.as_deref_mut() {
                        emit.chunk(*i, &run, &waits[k + 1..]);
                    }
                    if !data.iter().any(|d| Arc::ptr_eq(d, &run)) {
                        data.push(run);
                    }
                }
                Err(FetchError::Lost) => {
                    failure.get_or_insert(FetchError::Lost);
                }
                Err(e) => {
                    // A real failure outranks a lost push.
                    if failure.as_ref().is_none_or(|f| *f == FetchError::Lost) {
                        failure = Some(e);
                    }
                }
            }
        }
        failure.map_or(Ok(()), Err)
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
        let mut claim = Claim { fetcher: self.clone(), run, lost: FetchError::Aborted };
        // Held until the run is stored: bounds both upstream reads in flight and fetched bytes
        // waiting for the data file (none over a peer-aware source, see `slot`).
        let _permit = self.slot(priority).await;
        let read = {
            // Chunks a relay up the tree cuts through reach their waiters as they arrive.
            let early = AtomicU32::new(0);
            let progress = |chunks: Range<u32>, bytes: Bytes| self.early(&claim.run, &early, chunks, bytes);
            self.read_with_retries(offset, len, priority, &progress).await
        };
        let (data, checked) = match read {
            Ok(read) => read,
            Err(e) => {
                let run = claim.run[0].0..claim.run[claim.run.len() - 1].0 + 1;
                let mut inflight = self.inflight.lock().unwrap();
                for (i, tx) in claim.run.drain(..) {
                    release(&mut inflight, i, &tx);
                    // Chunks handed on early keep their (verified) bytes.
                    answer_once(&tx, Err(e.clone()));
                }
                // What is being pushed on as it arrived ends here.
                let _ = self.arrived.send(Arrival::failed(run));
                return;
            }
        };
        self.stats.bytes_from_origin.fetch_add(len as u64, Ordering::Relaxed);
        let me = Arc::clone(&self);
        // Hashing and the data-file write run on the blocking pool: a slow or failing cache disk
        // must never hold a runtime thread, which with `worker_threads = 1` is every session's.
        let chunks = claim.run[0].0..claim.run[claim.run.len() - 1].0 + 1;
        let finish = move || me.finish(chunks, offset, Bytes::from(data), checked, claim);
        if tokio::task::spawn_blocking(finish).await.is_err() {
            // The claim moved into the task cleaned up the in-flight entries as it unwound.
            tracing::error!("verify-and-store task failed");
        }
    }

    /// Verified `bytes` of `chunks` that arrived ahead of the rest of the fetched `run`: the
    /// waiters of those not handed on yet (`done` counts them from the run's start) get them
    /// now. The run stays in flight until it is whole and stored.
    fn early(&self, run: &[(u32, watch::Sender<Outcome>)], done: &AtomicU32, chunks: Range<u32>, bytes: Bytes) {
        let g = self.manifest.geometry();
        let first = run[0].0;
        let from = first + done.load(Ordering::Relaxed);
        let end = chunks.end.min(first + run.len() as u32);
        if chunks.start > from || end <= from {
            return;
        }
        let skip = g.run_bytes(chunks.start..from).map_or(0, |(_, n)| n);
        let Some((offset, len)) = g.run_bytes(from..end) else { return };
        let Some(part) = bytes.get(skip..skip + len).map(|_| bytes.slice(skip..skip + len)) else { return };
        let from_peers = self.source.waits_on_peers();
        let part = Arc::new(RunData { chunks: from..end, offset: offset.0, bytes: part, from_peers });
        for (_, tx) in &run[(from - first) as usize..(end - first) as usize] {
            answer_once(tx, Ok(part.clone()));
        }
        done.store(end - first, Ordering::Relaxed);
        // Nobody subscribed is no error.
        let whole = first..run[run.len() - 1].0 + 1;
        let _ = self.arrived.send(Arrival { run: whole, part: from..end, data: Arc::downgrade(&part) });
    }

    /// Verifies a fetched run (unless `checked`), hands it to its waiters, announces it, stores
    /// the claim's chunks of it, and lets them leave the in-flight map.
    fn finish(&self, chunks: Range<u32>, offset: u64, bytes: Bytes, checked: bool, mut claim: Claim) {
        let from_peers = checked && self.source.waits_on_peers();
        let run_data = Arc::new(RunData { chunks, offset, bytes, from_peers });
        let run = &claim.run;
        // Verify, hand the bytes to the waiters, then store: the write is off their path.
        let verified: Vec<bool> = run.iter().map(|(i, _)| checked || self.verify(&run_data, ChunkIdx(*i))).collect();
        for ((i, tx), ok) in run.iter().zip(&verified) {
            let outcome = if *ok { Ok(run_data.clone()) } else { Err(FetchError::Verify(ChunkIdx(*i))) };
            let _ = tx.send(Some(outcome));
        }
        if verified.iter().all(|v| *v) {
            if let Some(log) = self.boot.lock().unwrap().as_mut() {
                let len = run_data.bytes.len() as u64;
                if log.began.elapsed() <= BOOT_WINDOW
                    && log.runs.len() < BOOT_LOG_RUNS
                    && log.bytes + len <= BOOT_LOG_BYTES
                {
                    log.runs.push(run_data.chunks.clone());
                    log.bytes += len;
                }
            }
            // Nobody subscribed is no error.
            let _ = self.obtained.send(Obtained { chunks: run_data.chunks.clone(), data: Arc::downgrade(&run_data) });
        } else {
            let _ = self.arrived.send(Arrival::failed(run_data.chunks.clone()));
        }
        // One write per stretch of adjacent verified chunks (a pushed run's claim may have gaps).
        let mut k = 0;
        while k < run.len() {
            if !verified[k] {
                k += 1;
                continue;
            }
            let start = k;
            while k < run.len() && verified[k] && run[k].0 - run[start].0 == (k - start) as u32 {
                k += 1;
            }
            self.store_span(&run_data, run[start].0..run[k - 1].0 + 1);
        }
        // Chunks that could not be stored were served from memory (also to readers that joined
        // meanwhile: the outcome stays the verified bytes); a later read fetches them again.
        let mut inflight = self.inflight.lock().unwrap();
        for (i, tx) in claim.run.drain(..) {
            release(&mut inflight, i, &tx);
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
        let bytes = run.share(offset.0, len).unwrap_or_default();
        let n = u64::from(span.end - span.start);
        // The store keeps them until durable: shared while they are the whole run, else copied.
        match self.store.put_span_kept(span.clone(), bytes, run.bytes.len()) {
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
}

/// Takes chunk `i`'s entry out of the in-flight map if it is `tx`'s flight (a read may have
/// replaced an offered push's entry with a fetch of its own).
fn release(inflight: &mut HashMap<u32, (watch::Receiver<Outcome>, bool)>, i: u32, tx: &watch::Sender<Outcome>) {
    if inflight.get(&i).is_some_and(|(rx, _)| rx.same_channel(&tx.subscribe())) {
        inflight.remove(&i);
    }
}

#[cfg(test)]
mod tests;
