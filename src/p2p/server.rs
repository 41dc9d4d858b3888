//! The peer server of a node: serves the chunks this node holds (or, for peers below it in a
//! stripe's relay tree, fetches once and then serves) to authenticated peers, read-only.
//!
//! Per session: the handshake first (an unauthenticated or malformed client gets nothing and is
//! dropped), then the full have-map, then have-deltas as chunks arrive, and pings while a request
//! is in progress with nothing else to send; a quiet session sends nothing.
//! Requests are served concurrently; uploads are capped node-wide in concurrency and bytes per
//! second. Each reply reserves its bytes from a node-wide budget as its request arrives, before
//! anything is read or fetched, and keeps them until its frame is written: a request that finds
//! the budget (or its session's share of it) spent, or too many requests queued, gets `Busy` at
//! once. Sessions are admitted per name and per address ([`super::admit`]). Any malformed frame
//! or out-of-range request ends that session only. A peer that takes this node as its parent in
//! some trees (`Adopt`) is also pushed the runs of those trees this node obtains ([`push`]).

use std::net::IpAddr;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use roaring::RoaringBitmap;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{broadcast, mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use super::admit::{Admission, Admitted, Handshaking};
use super::auth::ClusterKey;
use super::conn::{read_frame_within, server_handshake, write_frame, ConnError, MAX_HANDSHAKES, SMALL_FRAME};
use super::core::upload::UploadBudget;
use super::wire::{Bytes32, Frame, Message, MAX_TAIL};
use crate::fetch::flight::{Arrival, Obtained, Parts};
use crate::fetch::BoxFuture;

mod push;
mod reply;
mod stream;

/// How often a busy session announces new chunks, or pings while the peer waits on us with
/// nothing else to send: the longest silence a waiting peer sees (it gives up on us after its
/// `stall`, 1 s by default). New chunks matter less than their count suggests: while nobody
/// holds a chunk its tree is climbed anyway.
pub const HAVE_INTERVAL: Duration = Duration::from_millis(250);
/// How often a quiet session (no request in progress, no chunk gained) looks for new chunks.
/// A quiet session sends nothing at all: a cluster of idle nodes costs no traffic and no
/// wake-ups beyond this, and a peer with no request pending does not watch for silence.
const QUIET_INTERVAL: Duration = Duration::from_secs(1);
/// Most sessions at once; more connections are closed at once.
const MAX_SESSIONS: usize = 4096;
/// Longest one frame may take to write: a peer that stopped reading (frozen, or its network
/// gone without a reset) would otherwise hold upload slots for ever.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// Takes one request off a session's queue count when its reply task ends, however it ends.
struct Queued(Arc<AtomicUsize>);

impl Drop for Queued {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// One image as the peer server sees it.
pub trait PeerExport: Send + Sync + 'static {
    /// How many chunks this node holds; cheap, and grows whenever `have` does.
    fn have_count(&self) -> u64;
    /// Bytes in chunks `run`, or `None` if `run` is out of range.
    fn run_len(&self, run: Range<u32>) -> Option<u64>;
    /// Chunks in the image.
    fn chunks(&self) -> u32;
    /// The chunks this node holds.
    fn have(&self) -> RoaringBitmap;
    /// Whether this node holds every chunk of `run`.
    fn holds(&self, run: Range<u32>) -> bool;
    /// The bytes of `run` if this node holds it, or fetches it for `requester`, which it ranks
    /// above in the stripe's tree; `None` when neither (the asker then goes elsewhere). Fetched,
    /// the first chunks may go to `parts` as they arrive (cut through): then the bytes returned
    /// are the rest, and `None` means the rest cannot come.
    fn serve<'a>(&'a self, run: Range<u32>, requester: &'a str, parts: &'a Parts) -> BoxFuture<'a, Option<Bytes>>;
    /// Counts bytes sent to peers.
    fn uploaded(&self, bytes: u64);
    /// Turns true when the image stops being served: its sessions end then.
    fn served_until(&self) -> watch::Receiver<bool>;
    /// A place among the image's sessions for one a peer opens, held until it ends; `None` when
    /// the image has its most sessions already (the peer reads elsewhere).
    fn admit_session(&self) -> Option<Box<dyn Send>>;
    /// Every run this node obtains from now on, and the chunks of those it fetches as they
    /// arrive ahead of the rest, if it pushes them to its children.
    fn obtained(&self) -> Option<(broadcast::Receiver<Obtained>, broadcast::Receiver<Arrival>)>;
    /// The runs this node obtained since its own boot began, in order (`Fetcher::boot_log`).
    fn boot_log(&self) -> Vec<Range<u32>>;
    /// The trees among `classes` in which `child` may take this node as its parent (those in
    /// which this node ranks above it).
    fn adopted_by(&self, child: &str, classes: &[u32]) -> Vec<u32>;
    /// The tree of the stripe holding `chunk`.
    fn class(&self, chunk: u32) -> u32;
    /// The bytes of `run` if this node holds it and they read back; never a fetch.
    fn cached(&self, run: Range<u32>) -> BoxFuture<'_, Option<Bytes>>;
    /// `chunks`' bytes `raw` (from this node's cache, or fetched and checked for a peer) packed
    /// for the wire, when the image packs them (`p2p.pack`) and they fit a frame packed (see
    /// `p2p::pack`).
    fn pack(&self, _chunks: Range<u32>, _raw: &Bytes) -> Option<Bytes> {
        None
    }
}

/// Finds the image a peer asks for by its identity (manifest root digest).
pub trait PeerLookup: Send + Sync + 'static {
    fn find(&self, image: &Bytes32) -> Option<Arc<dyn PeerExport>>;
}

/// Upload caps of one node, and its handshakes' time limit.
#[derive(Debug, Clone, Copy)]
pub struct UploadLimits {
    /// Chunk replies being sent at once, node-wide.
    pub slots: usize,
    /// Bytes per second, node-wide; `None` for no cap.
    pub rate: Option<u64>,
    /// Bytes per second each session sends, paced by the kernel; `None` for no cap.
    pub session_rate: Option<u64>,
    /// Requests one session may have queued before it gets `Busy`.
    pub max_queue: usize,
    /// Bytes of replies held at once, node-wide, from their request's arrival until written;
    /// one session may hold a quarter of them (plus one reply).
    pub buffer: u64,
    /// Node names one IP address may hold sessions under, and handshakes in progress from it.
    pub per_address: usize,
    /// How long a peer may take to prove itself (`p2p.handshake_timeout`).
    pub handshake_timeout: Duration,
}

pub use super::core::upload::MAX_BUFFER;

/// A session the kernel would not pace is warned about once in a while, not per session.
static PACING_WARNING: crate::throttle::Throttle = crate::throttle::Throttle::new();

/// Counters of the peer server.
#[derive(Debug, Default)]
pub struct ServerStats {
    /// Sessions admitted since start.
    pub sessions: AtomicU64,
    /// Sessions admitted and not ended yet.
    pub open: AtomicU64,
    pub refused: AtomicU64,
    pub requests: AtomicU64,
    pub busy: AtomicU64,
    pub not_have: AtomicU64,
    /// Bytes of replies reserved now, and the most ever reserved at once.
    pub buffered: AtomicU64,
    pub buffered_peak: AtomicU64,
    /// Sessions whose peer takes this node as its parent in some tree, now.
    pub children: AtomicU64,
    /// Runs pushed to children, and runs not pushed (asked for after their offer, gone from the
    /// cache before they could be offered, or longer than half the budget).
    pub pushes: AtomicU64,
    pub pushes_skipped: AtomicU64,
    /// Requests answered `Pushed`: they crossed a push of what they ask for.
    pub pushes_answered: AtomicU64,
    /// Replies' chunks sent ahead of their last, a frame each; of those, the chunks of runs
    /// fetched for the asker, sent as they arrived here (cut through).
    pub parts: AtomicU64,
    pub cut_through: AtomicU64,
    /// `PushPart` frames sent: chunks of pushed runs sent as they arrived here (cut through).
    pub push_parts: AtomicU64,
    /// Bytes of chunks sent packed, and what they took on the wire.
    pub packed_bytes: AtomicU64,
    pub packed_wire: AtomicU64,
}

/// The bytes of one reply, reserved from the node's budget and its session's share from the
/// request's arrival until the reply's frame is written (or dropped with its session).
struct Reservation {
    server: Arc<PeerServer>,
    session: Arc<AtomicU64>,
    bytes: u64,
    /// A push's place in its session's window, given back with the bytes.
    window: Option<push::Window>,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.server.budget.lock().unwrap().release(self.bytes);
        self.session.fetch_sub(self.bytes, Ordering::Relaxed);
        self.server.stats.buffered.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

/// What a frame on its way out holds until it is written: a reply's upload slot and bytes (a
/// push takes no slot; a part ahead of its reply, no bytes of its own).
type Held = (Option<OwnedSemaphorePermit>, Option<Reservation>);

/// Counts a session as open while it lives.
struct Open(Arc<PeerServer>);

impl Drop for Open {
    fn drop(&mut self) {
        self.0.stats.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The node's peer server.
pub struct PeerServer {
    me: String,
    key: ClusterKey,
    lookup: Arc<dyn PeerLookup>,
    limits: UploadLimits,
    slots: Arc<Semaphore>,
    /// The reply budget (see [`UploadLimits::buffer`]): the pure [`UploadBudget`], shared with
    /// `vmt sim`.
    budget: Mutex<UploadBudget>,
    admission: Arc<Admission>,
    /// When the upload link is next free under the rate cap.
    next_free: Mutex<Instant>,
    stats: ServerStats,
    /// Test switch: flip a byte in every chunk sent, to prove that receivers catch it.
    corrupt: bool,
    /// Test switch: the same for pushed chunks only.
    corrupt_pushes: bool,
    /// Test switch: claim every chunk, and answer `NotHave` for what is not held instead of
    /// fetching it for the asker, to prove that a lying peer cannot make others skip the tree.
    lie: bool,
}

/// The environment variable that turns on [`PeerServer`]'s corrupting test switch.
pub const CORRUPT_SWITCH: &str = "VMT_TEST_CORRUPT_UPLOADS";
/// The environment variable that turns on [`PeerServer`]'s corrupting test switch for pushes
/// only.
pub const CORRUPT_PUSHES_SWITCH: &str = "VMT_TEST_CORRUPT_PUSHES";
/// The environment variable that turns on [`PeerServer`]'s lying test switch.
pub const LIE_SWITCH: &str = "VMT_TEST_LIE_NOT_HAVE";

impl PeerServer {
    pub fn new(me: &str, key: ClusterKey, lookup: Arc<dyn PeerLookup>, limits: UploadLimits) -> Arc<PeerServer> {
        let corrupt = std::env::var_os(CORRUPT_SWITCH).is_some_and(|v| v == "1");
        if corrupt {
            tracing::warn!("{CORRUPT_SWITCH}=1: this node sends corrupted chunks to its peers (test switch)");
        }
        let corrupt_pushes = std::env::var_os(CORRUPT_PUSHES_SWITCH).is_some_and(|v| v == "1");
        if corrupt_pushes {
            tracing::warn!(
                "{CORRUPT_PUSHES_SWITCH}=1: this node pushes corrupted chunks to its children (test switch)"
            );
        }
        let lie = std::env::var_os(LIE_SWITCH).is_some_and(|v| v == "1");
        if lie {
            tracing::warn!("{LIE_SWITCH}=1: this node claims every chunk and relays nothing (test switch)");
        }
        Arc::new(PeerServer {
            me: me.into(),
            key,
            lookup,
            limits,
            slots: Arc::new(Semaphore::new(limits.slots.max(1))),
            budget: Mutex::new(UploadBudget::new(limits.buffer, limits.max_queue)),
            admission: Admission::new(limits.per_address),
            next_free: Mutex::new(Instant::now()),
            stats: ServerStats::default(),
            corrupt,
            corrupt_pushes,
            lie,
        })
    }

    pub fn stats(&self) -> &ServerStats {
        &self.stats
    }

    /// Accepts sessions until `shutdown` turns true.
    pub async fn run(self: Arc<Self>, listener: TcpListener, mut shutdown: watch::Receiver<bool>) {
        let sessions = Arc::new(Semaphore::new(MAX_SESSIONS));
        let handshakes = Arc::new(Semaphore::new(MAX_HANDSHAKES));
        loop {
            let (s, from) = tokio::select! {
                r = listener.accept() => match r { Ok((s, a)) => (s, a.ip()), Err(_) => continue },
                _ = shutdown.wait_for(|v| *v) => return,
            };
            if let Some(rate) = self.limits.session_rate {
                if let Err(e) = crate::netio::set_pacing_rate(&s, rate) {
                    if PACING_WARNING.due() {
                        tracing::warn!(error = %e, "cannot pace a peer session (p2p.session_rate); it sends unpaced");
                    }
                }
            }
            let (Ok(permit), Ok(shaking)) =
                (sessions.clone().try_acquire_owned(), handshakes.clone().try_acquire_owned())
            else {
                self.stats.refused.fetch_add(1, Ordering::Relaxed);
                tracing::warn!("too many peer sessions or handshakes; connection refused");
                continue;
            };
            let from_here = match self.admission.handshake(from) {
                Ok(h) => h,
                Err(e) => {
                    self.stats.refused.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(error = %e, "peer connection refused");
                    continue;
                }
            };
            let me = self.clone();
            let mut stop = shutdown.clone();
            tokio::spawn(async move {
                let _permit = permit;
                tokio::select! {
                    _ = me.session(s, from, (shaking, from_here)) => {}
                    _ = stop.wait_for(|v| *v) => {}
                }
            });
        }
    }

    /// Admits a session that proved `node` for `image`, or says why not.
    fn admit(&self, from: IpAddr, node: &str, image: Bytes32) -> Option<Admitted> {
        match self.admission.admit(from, node, image) {
            Ok(a) => Some(a),
            Err(e) => {
                self.stats.refused.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, "peer session refused");
                None
            }
        }
    }

    /// One connection from `from`, in its handshake (`shaking`: its places among the handshakes
    /// in progress) and then its session.
    async fn session(self: Arc<Self>, mut s: TcpStream, from: IpAddr, shaking: (OwnedSemaphorePermit, Handshaking)) {
        let _ = s.set_nodelay(true);
        let handshake = server_handshake(&mut s, &self.key, &self.me, self.limits.handshake_timeout).await;
        drop(shaking);
        let auth = match handshake {
            Ok(a) => a,
            Err(e) => {
                self.stats.refused.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(peer = %from, error = %e, "peer session refused");
                return;
            }
        };
        let Some(export) = self.lookup.find(&auth.image) else {
            tracing::debug!(peer = %auth.node, "peer asked for an image not served here");
            return;
        };
        // The image's bound first: a session refused here must not have replaced the node's
        // older one, which admission does.
        let Some(_place) = export.admit_session() else {
            self.stats.refused.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(peer = %auth.node, "peer session refused: the image has its most sessions");
            return;
        };
        let Some(admitted) = self.admit(from, &auth.node, auth.image) else { return };
        self.stats.sessions.fetch_add(1, Ordering::Relaxed);
        self.stats.open.fetch_add(1, Ordering::Relaxed);
        let _open = Open(self.clone());
        let (rd, mut wr) = s.into_split();
        // Requests are small: one read takes in several.
        let mut rd = tokio::io::BufReader::with_capacity(4096, rd);
        let (tx, mut rx) = mpsc::channel::<(Frame, Held)>(64);
        // Pushes wait in a queue of their own, written only while no other frame waits: an
        // asked reply never queues behind runs nobody asked for (an offer is in `rx` before its
        // push is in `pushes`, so it is written first).
        let (push_tx, mut pushes) = mpsc::channel::<push::QueuedPush>(1);
        let writer_gone = Arc::new(tokio::sync::Notify::new());
        let gone = writer_gone.clone();
        let writer = tokio::spawn(async move {
            loop {
                let next = tokio::select! {
                    biased;
                    f = rx.recv() => f,
                    Some(p) = pushes.recv() => match p.ready().await {
                        Some(f) => Some(f),
                        None => continue,
                    },
                };
                let Some((f, held)) = next else { break };
                match tokio::time::timeout(WRITE_TIMEOUT, write_frame(&mut wr, &f)).await {
                    Ok(Ok(())) => drop(held),
                    _ => break,
                }
            }
            // Frames still queued, their upload slots and their bytes, go with the channels.
            drop((rx, pushes));
            gone.notify_one();
        });
        // Bytes of replies this session holds, and requests it has being answered.
        let reserved = Arc::new(AtomicU64::new(0));
        let queued = Arc::new(AtomicUsize::new(0));
        let requested = Arc::new(tokio::sync::Notify::new());
        // Pushes offered on this session and not yet handed to the writer.
        let pushing_now = Arc::new(AtomicUsize::new(0));
        let push_freed = Arc::new(tokio::sync::Notify::new());
        // Aborted however the session ends (also when dropped at shutdown): a quiet announcer
        // never sends, so it would never notice that the session is gone.
        let announcer = AbortOnDrop(tokio::spawn(announce(
            export.clone(),
            tx.clone(),
            queued.clone(),
            requested.clone(),
            self.lie,
        )));
        let mut removed = export.served_until();
        // Requests are small; an `Adopt` carries a have-map.
        let frame_limit = push::adopt_limit(export.chunks());
        let mut pushing: Option<push::Pushing> = None;
        let why = loop {
            let read = tokio::select! {
                r = read_frame_within(&mut rd, frame_limit) => r,
                _ = writer_gone.notified() => break "the peer stopped reading".to_string(),
                _ = removed.wait_for(|v| *v) => break "the image is no longer served".to_string(),
                _ = admitted.replaced() => break "replaced by a newer session of the same node".to_string(),
            };
            let (id, first, count) = match read {
                Ok(Frame { msg: Message::Request { id, first, count }, .. }) => (id, first, count),
                Ok(Frame { msg: Message::Adopt { classes }, tail, .. }) => {
                    let queue = push::SessionQueue {
                        tx: tx.clone(),
                        push_tx: push_tx.clone(),
                        pushing: pushing_now.clone(),
                        freed: push_freed.clone(),
                        reserved: reserved.clone(),
                        queued: queued.clone(),
                        requested: requested.clone(),
                    };
                    match self.adopt(&mut pushing, &export, &auth.node, (classes, &tail), &queue) {
                        Ok(()) => continue,
                        Err(why) => break why,
                    }
                }
                Ok(f) => break ConnError::Unexpected { expected: "Request", got: Box::new(f.msg) }.to_string(),
                Err(e) => break e.to_string(),
            };
            let run = first..first.saturating_add(count);
            let Some(len) = export.run_len(run.clone()).filter(|n| count > 0 && *n <= u64::from(MAX_TAIL)) else {
                break format!("request for chunks {first}+{count} is out of range");
            };
            self.stats.requests.fetch_add(1, Ordering::Relaxed);
            if pushing.as_ref().is_some_and(|p| p.asked(run.clone())) {
                // Written after the push that holds the run: not sent twice.
                let _ = tx.send((Frame::new(Message::Pushed { id }), (None, None))).await;
                continue;
            }
            let bytes = self.reserve(len, &reserved, queued.load(Ordering::Relaxed));
            let Some(bytes) = bytes else {
                self.stats.busy.fetch_add(1, Ordering::Relaxed);
                let _ = tx.send((Frame::new(Message::Busy { id }), (None, None))).await;
                continue;
            };
            if queued.fetch_add(1, Ordering::Relaxed) == 0 {
                requested.notify_one();
            }
            let (me, export, tx, slot) = (self.clone(), export.clone(), tx.clone(), Queued(queued.clone()));
            let requester = auth.node.clone();
            tokio::spawn(async move {
                let _slot = slot;
                me.reply(export, id, run, &requester, bytes, &tx).await;
            });
        };
        tracing::debug!(peer = %auth.node, reason = %why, "peer session ended");
        // Its place goes to the next session of this node (a replacing one has it already).
        drop(admitted);
        drop(announcer);
        drop(pushing);
        drop(tx);
        // Replies still being prepared hold senders (and their bytes, within the budget); the
        // writer ends when the last is done.
        let _ = writer.await;
    }

    /// Reserves `len` bytes for one reply of a session that holds `reserved` bytes already and
    /// has `queued` requests being answered, or `None` (the request gets `Busy`): the decision is
    /// [`UploadBudget::reserve`]'s. Never waits (see there why).
    fn reserve(self: &Arc<Self>, len: u64, reserved: &Arc<AtomicU64>, queued: usize) -> Option<Reservation> {
        let bytes = self.budget.lock().unwrap().reserve(reserved.load(Ordering::Relaxed), queued, len)?;
        Some(self.reserved(bytes, reserved))
    }

    /// Counts `bytes` taken from the budget as a session's, held by the [`Reservation`].
    fn reserved(self: &Arc<Self>, bytes: u64, reserved: &Arc<AtomicU64>) -> Reservation {
        reserved.fetch_add(bytes, Ordering::Relaxed);
        let now = self.stats.buffered.fetch_add(bytes, Ordering::Relaxed) + bytes;
        self.stats.buffered_peak.fetch_max(now, Ordering::Relaxed);
        Reservation { server: self.clone(), session: reserved.clone(), bytes, window: None }
    }
}

/// Sends the full have-map, then, every [`HAVE_INTERVAL`] while the session is busy, the chunks
/// gained or, if there are none and a request of the peer's is in progress, a ping. A quiet
/// session is looked at every [`QUIET_INTERVAL`], or at once when a request arrives.
async fn announce(
    export: Arc<dyn PeerExport>,
    tx: mpsc::Sender<(Frame, Held)>,
    queued: Arc<AtomicUsize>,
    requested: Arc<tokio::sync::Notify>,
    lie: bool,
) {
    // Lying, the first have-map claims every chunk; pings and the deltas of chunks gained go on.
    let mut sent = if lie { (0..export.chunks()).collect() } else { export.have() };
    let mut count = sent.len();
    if tx.send((Frame::with_tail(Message::Have, bitmap_bytes(&sent)), (None, None))).await.is_err() {
        return;
    }
    let mut busy = false;
    loop {
        if busy {
            tokio::time::sleep(HAVE_INTERVAL).await;
        } else {
            tokio::select! {
                _ = tokio::time::sleep(QUIET_INTERVAL) => {}
                _ = requested.notified() => {}
            }
        }
        // Chunks are only ever added, so an unchanged count means nothing new to announce.
        let frame = if export.have_count() != count {
            let now = export.have();
            let added = &now - &sent;
            count = now.len();
            sent = now;
            (!added.is_empty()).then(|| Frame::with_tail(Message::HaveDelta, bitmap_bytes(&added)))
        } else {
            None
        };
        let waiting = queued.load(Ordering::Relaxed) > 0;
        busy = frame.is_some() || waiting;
        let Some(frame) = frame.or_else(|| waiting.then(|| Frame::new(Message::Ping))) else { continue };
        if tx.send((frame, (None, None))).await.is_err() {
            return;
        }
    }
}

fn bitmap_bytes(map: &RoaringBitmap) -> Bytes {
    let mut v = Vec::with_capacity(map.serialized_size());
    map.serialize_into(&mut v).expect("writing to a Vec cannot fail");
    Bytes::from(v)
}
