//! The peer-aware source of one image: a [`ChunkSource`] that reads each run from the source the
//! [`Selector`] picks (this node's parent in the stripe's relay tree, a peer holding it, or the
//! origin) and falls back to the next one when a peer refuses, fails, stalls or lies: a refused
//! run still climbs the stripe's tree, a failed one goes to a holder or the origin.
//!
//! Runs a parent pushes arrive here too (`push`): this node tells each of its parents in which
//! trees it takes it as its parent, and verifies, receives and stores what they push.
//!
//! Peer data is verified against the manifest here, chunk by chunk, before it goes anywhere: a
//! mismatch drops the data, bans the peer and reads the run elsewhere. Origin bytes are passed
//! on unchecked, and origin errors as they are, so the fetcher verifies them and applies its
//! retry budget exactly as without peers; a read served wholly by peers is reported as checked
//! and not hashed twice.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::auth::ClusterKey;
use super::core::{PieceRead, View};
use super::peer::{PeerConn, Refusal};
use super::select::{Choice, Outcome, Selector, Summary};
use super::wire::Bytes32;
use crate::fetch::flight::Priority;
use crate::fetch::slots::Slots;
use crate::fetch::{BoxFuture, ChunkSource, Progress, SourceError};
use crate::image::{ChunkIdx, Manifest};

/// Origin reads in flight per image.
const ORIGIN_SLOTS: usize = 32;

/// Largest peer reply verified on a runtime thread.
const INLINE_VERIFY: usize = 256 << 10;

/// Timing of peer sessions.
#[derive(Debug, Clone, Copy)]
pub struct SwarmTuning {
    /// Silence after which a peer session counts as dead.
    pub stall: Duration,
    /// Longest wait for one peer request (a parent may first fetch the run itself).
    pub request_timeout: Duration,
    /// Unit of the relay trees, in chunks.
    pub stripe: u32,
    /// Fan-out of the relay trees.
    pub fanout: u32,
    /// Number of relay trees.
    pub classes: u32,
    /// Most peer sessions of this image at once, opened by this node and by peers together.
    pub max_sessions: usize,
    /// Whether this node asks its parents to push (and pushes to its children).
    pub push: bool,
    /// Whether this node sends chunks to its peers packed (see `p2p::pack`).
    pub pack: bool,
}

/// Counters of one image's peer traffic (downloads; uploads are counted by the server).
#[derive(Debug, Default)]
pub struct SwarmStats {
    pub bytes_from_peers: AtomicU64,
    pub bytes_from_origin: AtomicU64,
    pub peer_requests: AtomicU64,
    pub peer_refusals: AtomicU64,
    pub peer_failures: AtomicU64,
    pub peer_verify_failures: AtomicU64,
    /// Runs parents pushed here and used, their bytes, and pushes dropped (none of it was
    /// wanted, or the receive budget was spent).
    pub pushes: AtomicU64,
    pub bytes_pushed: AtomicU64,
    pub pushes_dropped: AtomicU64,
    /// Pieces of pushed runs handed to their readers ahead of the rest (a push cut through).
    pub push_parts: AtomicU64,
    /// Latency of each origin read, and of each request to a peer (whatever its answer).
    pub origin_latency: crate::metrics::Histogram,
    pub peer_latency: crate::metrics::Histogram,
}

/// The session with one peer, if open; its lock is held while connecting.
type SessionSlot = Arc<tokio::sync::Mutex<Option<Arc<PeerConn>>>>;

/// The peer-aware source of one image.
pub struct Swarm {
    me: String,
    key: ClusterKey,
    image: Bytes32,
    manifest: Arc<Manifest>,
    origin: Arc<dyn ChunkSource>,
    selector: Arc<Mutex<Selector>>,
    /// One slot per peer: connecting holds the slot's lock, so one session per peer is made.
    conns: Mutex<HashMap<String, SessionSlot>>,
    tuning: SwarmTuning,
    stats: SwarmStats,
    /// Bounds origin reads in flight (the fetcher holds no slots over a peer-aware source);
    /// guest and relay reads take them before prefetch.
    origin_slots: Slots,
    /// Sessions peers opened to this node for this image (see [`Swarm::admit_inbound`]).
    inbound: Arc<AtomicU64>,
    /// Most places among the image's sessions held at once (both ways, as the bound counts
    /// them): never above `max_sessions`.
    places_peak: AtomicU64,
    /// The image's fetcher, which pushed runs go to (set once it exists: it reads through this
    /// swarm).
    fetcher: std::sync::OnceLock<Weak<crate::fetch::flight::Fetcher>>,
    /// Bytes of pushed runs being verified and stored at once, in KiB: a push past it is dropped.
    push_budget: Arc<tokio::sync::Semaphore>,
    /// This node's guest or prefetch has begun reading the image: only then does it adopt its
    /// parents (a node that will not read for a while is not pushed runs it may never need).
    active: std::sync::atomic::AtomicBool,
    /// Chunks packed for the wire, kept to be sent on as they came (see `p2p::pack`).
    packs: super::pack::Packs,
    weak: Weak<Swarm>,
}

/// A place among an image's sessions held by a session a peer opened; freed on drop.
pub struct InboundSession(Arc<AtomicU64>);

impl Drop for InboundSession {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Swarm {
    pub fn new(
        me: &str,
        key: ClusterKey,
        manifest: Arc<Manifest>,
        origin: Arc<dyn ChunkSource>,
        tuning: SwarmTuning,
    ) -> Arc<Swarm> {
        Arc::new_cyclic(|weak| Swarm {
            me: me.into(),
            key,
            image: manifest.root().0,
            selector: Arc::new(Mutex::new(Selector::new(me, tuning.stripe, tuning.fanout, tuning.classes))),
            manifest,
            origin,
            conns: Mutex::new(HashMap::new()),
            tuning,
            stats: SwarmStats::default(),
            origin_slots: Slots::new(ORIGIN_SLOTS),
            inbound: Arc::new(AtomicU64::new(0)),
            places_peak: AtomicU64::new(0),
            fetcher: std::sync::OnceLock::new(),
            push_budget: Arc::new(tokio::sync::Semaphore::new(push::RECEIVE_BUDGET_KIB)),
            active: std::sync::atomic::AtomicBool::new(false),
            packs: super::pack::Packs::new(super::pack::PACK_BUDGET),
            weak: weak.clone(),
        })
    }

    pub fn stats(&self) -> &SwarmStats {
        &self.stats
    }

    /// A place for a session a peer opens, while the image's sessions (both ways) are fewer than
    /// `max_sessions`; `None` refuses it (the peer reads elsewhere).
    pub fn admit_inbound(&self) -> Option<InboundSession> {
        let max = self.tuning.max_sessions as u64;
        // Under the lock `session` counts under too, so the two never both take the last place.
        // Slots of sessions that ended count until `set_view` drops them: the bound errs low.
        let conns = self.conns.lock().unwrap();
        let out = conns.len() as u64;
        let n = self
            .inbound
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| (n + out < max).then_some(n + 1))
            .ok()?;
        self.places_peak.fetch_max(n + 1 + out, Ordering::Relaxed);
        drop(conns);
        Some(InboundSession(self.inbound.clone()))
    }

    /// Whether a session with `node` would pass the image's bound: none is open or being made,
    /// and the image holds `max_sessions` already. Such a peer is passed over without counting
    /// against it (it did nothing wrong).
    fn full_without(&self, node: &str) -> bool {
        self.over_bound(&self.conns.lock().unwrap(), node)
    }

    /// [`Swarm::full_without`] with `conns` locked by the caller.
    fn over_bound(&self, conns: &HashMap<String, SessionSlot>, node: &str) -> bool {
        !conns.contains_key(node) && conns.len() as u64 + self.inbound() >= self.tuning.max_sessions as u64
    }

    /// Sessions peers opened to this node for this image, now.
    pub fn inbound(&self) -> u64 {
        self.inbound.load(Ordering::Relaxed)
    }

    /// This node's name for the image (its address and when it joined the image).
    pub fn me(&self) -> &str {
        &self.me
    }

    /// When this node joined the image, as its name says (Unix ms; 0: its name does not say).
    pub fn joined(&self) -> u64 {
        crate::p2p::conn::join_time(&self.me).unwrap_or(0)
    }

    pub fn summary(&self) -> Summary {
        self.selector.lock().unwrap().summary(Instant::now())
    }

    /// The view from the trackers. Sessions to its ring successors and to this node's parents
    /// open in the background (to new ones, and again to ones whose session ended and that are
    /// not backing off), so their have-maps are known before the first miss that could use
    /// them; sessions to peers that left the view close.
    pub fn set_view(&self, view: &View) {
        let now = Instant::now();
        let open: Vec<String> = self.conns.lock().unwrap().keys().cloned().collect();
        // Sessions to peers that left the view, and idle ones to peers not kept (a climb's).
        let (usable, gone): (Vec<String>, Vec<String>) = {
            let mut sel = self.selector.lock().unwrap();
            sel.set_view(view);
            sel.expire_bans(now);
            let usable = if view.provisional { Vec::new() } else { sel.usable_members(now) };
            (usable, open.into_iter().filter(|n| !sel.keeps_session(n, now)).collect())
        };
        let gone: Vec<SessionSlot> = {
            let mut conns = self.conns.lock().unwrap();
            gone.iter().filter_map(|n| conns.remove(n)).collect()
        };
        for slot in gone {
            if let Ok(g) = slot.try_lock() {
                if let Some(c) = g.as_ref() {
                    c.close();
                }
            }
        }
        self.adopt_parents();
        let Some(me) = self.weak.upgrade() else { return };
        for node in usable {
            if self.full_without(&node) {
                continue;
            }
            let idle = {
                let conns = self.conns.lock().unwrap();
                // A locked slot is connecting already.
                conns.get(&node).is_none_or(|s| s.try_lock().is_ok_and(|g| g.as_ref().is_none_or(|c| c.is_closed())))
            };
            if !idle {
                continue;
            }
            let me = me.clone();
            tokio::spawn(async move {
                if me.session(&node).await.is_err() {
                    me.selector.lock().unwrap().unreachable(&node, Instant::now());
                }
            });
        }
    }

    /// Most places among the image's sessions held at once since it opened, both ways (what
    /// `max_sessions` bounds; a place counts from the moment a session is being made).
    pub fn sessions_peak(&self) -> u64 {
        self.places_peak.load(Ordering::Relaxed)
    }

    /// Peer sessions open now.
    pub fn sessions(&self) -> u64 {
        let slots: Vec<SessionSlot> = self.conns.lock().unwrap().values().cloned().collect();
        slots.iter().filter(|s| s.try_lock().ok().is_some_and(|g| g.as_ref().is_some_and(|c| !c.is_closed()))).count()
            as u64
    }

    /// Whether this node fetches `run` on behalf of `requester`: the run lies in one stripe (of
    /// this node's stripe size) and this node ranks above the requester in that stripe's tree.
    /// A run across a stripe boundary would be fetched in pieces, some possibly from nodes that
    /// rank below the requester: a wait that could close a cycle.
    pub fn relays_for(&self, run: Range<u32>, requester: &str) -> bool {
        self.selector.lock().unwrap().relays_run(run, requester)
    }

    async fn session(&self, node: &str) -> Result<Arc<PeerConn>, Refusal> {
        let shared = {
            let mut conns = self.conns.lock().unwrap();
            // A slot of its own counts among the image's sessions from the start: at the bound,
            // no new one (the read goes to another source).
            if self.over_bound(&conns, node) {
                return Err(Refusal::Closed);
            }
            let slot = conns.entry(node.to_string()).or_default().clone();
            self.places_peak.fetch_max(conns.len() as u64 + self.inbound(), Ordering::Relaxed);
            slot
        };
        let mut slot = shared.lock().await;
        if let Some(c) = slot.as_ref().filter(|c| !c.is_closed()) {
            return Ok(c.clone());
        }
        match PeerConn::connect(
            node,
            &self.me,
            &self.key,
            (self.image, self.manifest.geometry()),
            self.tuning.stall,
            self.selector.clone(),
            self.weak.clone() as Weak<dyn super::peer::PushSink>,
        )
        .await
        {
            Ok(c) => {
                // The peer left the view while this node was connecting (`set_view` dropped the
                // slot): the session would live on unseen, so it ends here.
                let current = self.conns.lock().unwrap().get(node).is_some_and(|s| Arc::ptr_eq(s, &shared));
                if !current {
                    c.close();
                    return Err(Refusal::Closed);
                }
                *slot = Some(c.clone());
                // A parent learns at once that this node takes it as one (once it reads).
                self.adopt(&c);
                Ok(c)
            }
            Err(e) => {
                tracing::warn!(peer = node, error = %e, "cannot open a peer session");
                *slot = None;
                Err(Refusal::Closed)
            }
        }
    }

    /// Asks `node` for `run` and checks what comes back (the selector hears of it from the
    /// caller's [`PieceRead`]); the chunks a relay cuts through go to `progress` as they arrive,
    /// checked, and the reply is all of the run.
    async fn ask(&self, node: &str, run: Range<u32>, progress: Progress<'_>) -> Result<Bytes, Outcome> {
        let outcome = async {
            let conn = self.session(node).await.map_err(|_| Outcome::Lost)?;
            self.stats.peer_requests.fetch_add(1, Ordering::Relaxed);
            let asked = self.parts(node, &conn, run.clone(), progress);
            tokio::time::timeout(self.tuning.request_timeout, asked).await.map_err(|_| {
                tracing::warn!(peer = node, first = run.start, count = run.end - run.start,
                    timeout = ?self.tuning.request_timeout, "peer request timed out");
                // Its have-map is forgotten on failure; only a fresh session brings it back.
                conn.close();
                Outcome::Failed
            })?
        }
        .await;
        let how = match &outcome {
            Ok(_) => Outcome::Served,
            Err(o) => *o,
        };
        match how {
            Outcome::Served => {}
            Outcome::NotHave | Outcome::Busy => {
                self.stats.peer_refusals.fetch_add(1, Ordering::Relaxed);
            }
            Outcome::Failed | Outcome::Lost => {
                self.stats.peer_failures.fetch_add(1, Ordering::Relaxed);
            }
            Outcome::Corrupt => {
                self.stats.peer_verify_failures.fetch_add(1, Ordering::Relaxed);
                tracing::error!(peer = node, "peer sent data that does not match the manifest; banned");
            }
        }
        outcome
    }

    /// One request on `conn`: its parts checked and handed to `progress` as they come, then the
    /// rest; all of the run's bytes.
    async fn parts(
        &self,
        node: &str,
        conn: &PeerConn,
        run: Range<u32>,
        progress: Progress<'_>,
    ) -> Result<Bytes, Outcome> {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let reply = conn.request(run.start, run.end - run.start, tx);
        tokio::pin!(reply);
        // The parts, checked, gathered in one buffer as they come (a copy: they arrive in frames
        // of their own).
        let mut all: Vec<u8> = Vec::new();
        let mut at = run.start;
        let mut take = |part: Range<u32>, bytes: Bytes, all: &mut Vec<u8>| {
            if all.is_empty() {
                all.reserve_exact(self.manifest.geometry().run_bytes(run.clone()).map_or(0, |(_, len)| len));
            }
            all.extend_from_slice(&bytes);
            at = part.end;
            progress(part, bytes);
        };
        let reply = loop {
            tokio::select! {
                biased;
                Some((part, bytes)) = rx.recv() => {
                    let bytes = self.verify(node, part.clone(), bytes).await?;
                    take(part, bytes, &mut all);
                }
                r = &mut reply => break r,
            }
        };
        // Parts sent before the reply are in the channel already.
        while let Ok((part, bytes)) = rx.try_recv() {
            let bytes = self.verify(node, part.clone(), bytes).await?;
            take(part, bytes, &mut all);
        }
        let rest = match reply {
            Ok(bytes) => self.verify(node, at..run.end, bytes).await?,
            Err(Refusal::NotHave) => return Err(Outcome::NotHave),
            Err(Refusal::Busy) => return Err(Outcome::Busy),
            Err(Refusal::Closed) => return Err(Outcome::Lost),
        };
        if all.is_empty() {
            return Ok(rest);
        }
        all.extend_from_slice(&rest);
        Ok(Bytes::from(all))
    }

    async fn verify(&self, node: &str, run: Range<u32>, bytes: Bytes) -> Result<Bytes, Outcome> {
        let g = self.manifest.geometry();
        let first = ChunkIdx(run.start);
        let want = g.run_bytes(run.clone()).map_or(0, |(_, len)| len as u64);
        if bytes.len() as u64 != want {
            tracing::warn!(peer = node, got = bytes.len(), want, "peer sent a reply of the wrong length");
            return Err(Outcome::Corrupt);
        }
        let check = move |m: &Manifest, bytes: &[u8]| {
            let base = g.chunk_offset(first).0;
            run.clone().all(|i| {
                let start = (g.chunk_offset(ChunkIdx(i)).0 - base) as usize;
                m.verify(ChunkIdx(i), &bytes[start..start + g.chunk_len(ChunkIdx(i))])
            })
        };
        // Hashing a few chunks takes tens of microseconds: cheaper in place than a hand-off to
        // the blocking pool. Longer runs go there, off the runtime's threads.
        let ok = if bytes.len() <= INLINE_VERIFY {
            check(&self.manifest, &bytes)
        } else {
            let (m, b) = (self.manifest.clone(), bytes.clone());
            tokio::task::spawn_blocking(move || check(&m, &b)).await.unwrap_or(false)
        };
        if ok {
            Ok(bytes)
        } else {
            Err(Outcome::Corrupt)
        }
    }

    /// Reads one stripe's piece of a run from the best source that answers; true when the
    /// bytes came from a peer (and were verified here).
    async fn read_piece(
        &self,
        run: Range<u32>,
        priority: Priority,
        progress: Progress<'_>,
    ) -> Result<(Bytes, bool), SourceError> {
        let mut piece = PieceRead::new(run.clone());
        loop {
            let choice = piece.next(&mut self.selector.lock().unwrap(), Instant::now());
            match choice {
                Choice::Origin => {
                    let (offset, len) = self
                        .manifest
                        .geometry()
                        .run_bytes(run.clone())
                        .map(|(o, l)| (o.0, l))
                        .expect("pieces are chunks inside the image");
                    let _slot = match priority {
                        Priority::Prefetch => self.origin_slots.background().await,
                        Priority::Guest | Priority::Relay => self.origin_slots.urgent().await,
                    };
                    // Observed however the read ends, a cancelled one included.
                    let timer = self.stats.origin_latency.timer();
                    let data = self.origin.read(offset, len).await;
                    drop(timer);
                    let data = data?;
                    self.stats.bytes_from_origin.fetch_add(data.len() as u64, Ordering::Relaxed);
                    return Ok((Bytes::from(data), false));
                }
                Choice::Peer { node, .. } if self.full_without(&node) => {
                    piece.passed(&mut self.selector.lock().unwrap(), &node);
                }
                Choice::Peer { node, .. } => {
                    let timer = self.stats.peer_latency.timer();
                    let got = self.ask(&node, run.clone(), progress).await;
                    drop(timer);
                    let how = got.as_ref().map_or_else(|o| *o, |_| Outcome::Served);
                    piece.answered(&mut self.selector.lock().unwrap(), &node, how, Instant::now());
                    if let Ok(bytes) = got {
                        self.stats.bytes_from_peers.fetch_add(bytes.len() as u64, Ordering::Relaxed);
                        return Ok((bytes, true));
                    }
                }
            }
        }
    }
}

impl Drop for Swarm {
    /// The image is gone: its sessions end (their reader tasks would keep them open).
    fn drop(&mut self) {
        for slot in self.conns.lock().unwrap().values() {
            if let Ok(g) = slot.try_lock() {
                if let Some(c) = g.as_ref() {
                    c.close();
                }
            }
        }
    }
}

impl ChunkSource for Swarm {
    fn describe(&self) -> String {
        format!("{} (with peers)", self.origin.describe())
    }

    fn size(&self) -> BoxFuture<'_, Result<u64, SourceError>> {
        self.origin.size()
    }

    fn read(&self, offset: u64, len: usize) -> BoxFuture<'_, Result<Vec<u8>, SourceError>> {
        Box::pin(async move { self.read_checked(offset, len).await.map(|(d, _)| d) })
    }

    fn read_checked(&self, offset: u64, len: usize) -> BoxFuture<'_, Result<(Vec<u8>, bool), SourceError>> {
        self.read_checked_as(offset, len, Priority::Guest)
    }

    fn read_checked_as(
        &self,
        offset: u64,
        len: usize,
        priority: Priority,
    ) -> BoxFuture<'_, Result<(Vec<u8>, bool), SourceError>> {
        Box::pin(async move { self.read_streaming(offset, len, priority, &|_, _| {}).await })
    }

    fn read_streaming<'a>(
        &'a self,
        offset: u64,
        len: usize,
        priority: Priority,
        progress: Progress<'a>,
    ) -> BoxFuture<'a, Result<(Vec<u8>, bool), SourceError>> {
        Box::pin(async move {
            let g = self.manifest.geometry();
            let run = g.chunks_covering(crate::image::ByteOffset(offset), len as u64);
            let aligned = g.chunk_offset(ChunkIdx(run.start)).0 == offset;
            let pieces = self.selector.lock().unwrap().split(run);
            let Some(me) = self.weak.upgrade().filter(|_| aligned && !pieces.is_empty()) else {
                // Not a chunk-aligned run (never asked by the fetcher): read the origin as is.
                return self.origin.read(offset, len).await.map(|d| (d, false));
            };
            if let [piece] = &pieces[..] {
                // The usual case: one stripe, read in this task. The reply's buffer is taken
                // over without a copy (a run that came in parts was gathered into it once).
                let (bytes, checked) = self.read_piece(piece.clone(), priority, progress).await?;
                let mut out = Vec::from(bytes);
                out.truncate(len);
                return Ok((out, checked));
            }
            let mut tasks = tokio::task::JoinSet::new();
            for (k, piece) in pieces.into_iter().enumerate() {
                let me = me.clone();
                tasks.spawn(async move { (k, me.read_piece(piece, priority, &|_, _| {}).await) });
            }
            let mut parts: Vec<Option<Bytes>> = vec![None; tasks.len()];
            let mut all_checked = true;
            while let Some(done) = tasks.join_next().await {
                let (k, r) = done.map_err(|e| SourceError::Io { what: "peer read".into(), reason: e.to_string() })?;
                let (bytes, checked) = r?;
                all_checked &= checked;
                parts[k] = Some(bytes);
            }
            let mut out = Vec::with_capacity(len);
            for p in parts.into_iter().flatten() {
                out.extend_from_slice(&p);
            }
            out.truncate(len);
            Ok((out, all_checked))
        })
    }

    fn waits_on_peers(&self) -> bool {
        true
    }

    fn run_boundary(&self) -> Option<u32> {
        Some(self.tuning.stripe)
    }

    fn close(&self) -> BoxFuture<'_, ()> {
        self.origin.close()
    }
}

mod push;
#[cfg(test)]
mod tests;
