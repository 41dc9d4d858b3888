//! The peer server of a node: serves the chunks this node holds (or, for peers below it in a
//! stripe's relay tree, fetches once and then serves) to authenticated peers, read-only.
//!
//! Per session: the handshake first (an unauthenticated or malformed client gets nothing and is
//! dropped), then the full have-map, then have-deltas as chunks arrive, and pings while a request
//! is in progress with nothing else to send; a quiet session sends nothing.
//! Requests are served concurrently; uploads are capped node-wide in concurrency and bytes per
//! second, and a session with too many requests queued gets `Busy`. Any malformed frame or
//! out-of-range request ends that session only.

use std::ops::Range;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use roaring::RoaringBitmap;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use super::auth::ClusterKey;
use super::conn::{read_frame_within, server_handshake, write_frame, ConnError, MAX_HANDSHAKES, SMALL_FRAME};
use super::wire::{Bytes32, Frame, Message, MAX_TAIL};
use crate::fetch::BoxFuture;

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
    /// The chunks this node holds.
    fn have(&self) -> RoaringBitmap;
    /// Whether this node holds every chunk of `run`.
    fn holds(&self, run: Range<u32>) -> bool;
    /// The bytes of `run` if this node holds it, or fetches it for `requester`, which it ranks
    /// above in the stripe's tree; `None` when neither (the asker then goes elsewhere).
    fn serve<'a>(&'a self, run: Range<u32>, requester: &'a str) -> BoxFuture<'a, Option<Bytes>>;
    /// Counts bytes sent to peers.
    fn uploaded(&self, bytes: u64);
    /// Turns true when the image stops being served: its sessions end then.
    fn served_until(&self) -> watch::Receiver<bool>;
}

/// Finds the image a peer asks for by its identity (manifest root digest).
pub trait PeerLookup: Send + Sync + 'static {
    fn find(&self, image: &Bytes32) -> Option<Arc<dyn PeerExport>>;
}

/// Upload caps of one node.
#[derive(Debug, Clone, Copy)]
pub struct UploadLimits {
    /// Chunk replies being sent at once, node-wide.
    pub slots: usize,
    /// Bytes per second, node-wide; `None` for no cap.
    pub rate: Option<u64>,
    /// Requests one session may have queued before it gets `Busy`.
    pub max_queue: usize,
}

/// Counters of the peer server.
#[derive(Debug, Default)]
pub struct ServerStats {
    pub sessions: AtomicU64,
    pub refused: AtomicU64,
    pub requests: AtomicU64,
    pub busy: AtomicU64,
    pub not_have: AtomicU64,
}

/// The node's peer server.
pub struct PeerServer {
    me: String,
    key: ClusterKey,
    lookup: Arc<dyn PeerLookup>,
    limits: UploadLimits,
    slots: Arc<Semaphore>,
    /// When the upload link is next free under the rate cap.
    next_free: Mutex<Instant>,
    stats: ServerStats,
    /// Test switch: flip a byte in every chunk sent, to prove that receivers catch it.
    corrupt: bool,
}

/// The environment variable that turns on [`PeerServer`]'s corrupting test switch.
pub const CORRUPT_SWITCH: &str = "VMT_TEST_CORRUPT_UPLOADS";

impl PeerServer {
    pub fn new(me: &str, key: ClusterKey, lookup: Arc<dyn PeerLookup>, limits: UploadLimits) -> Arc<PeerServer> {
        let corrupt = std::env::var_os(CORRUPT_SWITCH).is_some_and(|v| v == "1");
        if corrupt {
            tracing::warn!("{CORRUPT_SWITCH}=1: this node sends corrupted chunks to its peers (test switch)");
        }
        Arc::new(PeerServer {
            me: me.into(),
            key,
            lookup,
            limits,
            slots: Arc::new(Semaphore::new(limits.slots.max(1))),
            next_free: Mutex::new(Instant::now()),
            stats: ServerStats::default(),
            corrupt,
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
            let s = tokio::select! {
                r = listener.accept() => match r { Ok((s, _)) => s, Err(_) => continue },
                _ = shutdown.wait_for(|v| *v) => return,
            };
            let (Ok(permit), Ok(shaking)) =
                (sessions.clone().try_acquire_owned(), handshakes.clone().try_acquire_owned())
            else {
                self.stats.refused.fetch_add(1, Ordering::Relaxed);
                tracing::warn!("too many peer sessions or handshakes; connection refused");
                continue;
            };
            let me = self.clone();
            let mut stop = shutdown.clone();
            tokio::spawn(async move {
                let _permit = permit;
                tokio::select! {
                    _ = me.session(s, shaking) => {}
                    _ = stop.wait_for(|v| *v) => {}
                }
            });
        }
    }

    async fn session(self: Arc<Self>, mut s: TcpStream, shaking: OwnedSemaphorePermit) {
        let _ = s.set_nodelay(true);
        let peer = s.peer_addr().map(|a| a.to_string()).unwrap_or_default();
        let handshake = server_handshake(&mut s, &self.key, &self.me).await;
        drop(shaking);
        let auth = match handshake {
            Ok(a) => a,
            Err(e) => {
                self.stats.refused.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%peer, error = %e, "peer session refused");
                return;
            }
        };
        let Some(export) = self.lookup.find(&auth.image) else {
            tracing::debug!(peer = %auth.node, "peer asked for an image not served here");
            return;
        };
        self.stats.sessions.fetch_add(1, Ordering::Relaxed);
        let (rd, mut wr) = s.into_split();
        // Requests are small: one read takes in several.
        let mut rd = tokio::io::BufReader::with_capacity(4096, rd);
        let (tx, mut rx) = mpsc::channel::<(Frame, Option<OwnedSemaphorePermit>)>(64);
        let writer_gone = Arc::new(tokio::sync::Notify::new());
        let gone = writer_gone.clone();
        let writer = tokio::spawn(async move {
            while let Some((f, permit)) = rx.recv().await {
                match tokio::time::timeout(WRITE_TIMEOUT, write_frame(&mut wr, &f)).await {
                    Ok(Ok(())) => drop(permit),
                    _ => break,
                }
            }
            // Frames still queued, and their upload slots, go with the channel.
            drop(rx);
            gone.notify_one();
        });
        let queued = Arc::new(AtomicUsize::new(0));
        let requested = Arc::new(tokio::sync::Notify::new());
        // Aborted however the session ends (also when dropped at shutdown): a quiet announcer
        // never sends, so it would never notice that the session is gone.
        let announcer =
            AbortOnDrop(tokio::spawn(announce(export.clone(), tx.clone(), queued.clone(), requested.clone())));
        let mut removed = export.served_until();
        let why = loop {
            let read = tokio::select! {
                r = read_frame_within(&mut rd, SMALL_FRAME) => r,
                _ = writer_gone.notified() => break "the peer stopped reading".to_string(),
                _ = removed.wait_for(|v| *v) => break "the image is no longer served".to_string(),
            };
            let (id, first, count) = match read {
                Ok(Frame { msg: Message::Request { id, first, count }, .. }) => (id, first, count),
                Ok(f) => break ConnError::Unexpected { expected: "Request", got: Box::new(f.msg) }.to_string(),
                Err(e) => break e.to_string(),
            };
            let run = first..first.saturating_add(count);
            let fits = count > 0 && export.run_len(run.clone()).is_some_and(|n| n <= u64::from(MAX_TAIL));
            if !fits {
                break format!("request for chunks {first}+{count} is out of range");
            }
            self.stats.requests.fetch_add(1, Ordering::Relaxed);
            if queued.load(Ordering::Relaxed) >= self.limits.max_queue {
                self.stats.busy.fetch_add(1, Ordering::Relaxed);
                let _ = tx.send((Frame::new(Message::Busy { id }), None)).await;
                continue;
            }
            if queued.fetch_add(1, Ordering::Relaxed) == 0 {
                requested.notify_one();
            }
            let (me, export, tx, slot) = (self.clone(), export.clone(), tx.clone(), Queued(queued.clone()));
            let requester = auth.node.clone();
            tokio::spawn(async move {
                let _slot = slot;
                me.reply(export, id, run, &requester, &tx).await;
            });
        };
        tracing::debug!(peer = %auth.node, reason = %why, "peer session ended");
        drop(announcer);
        drop(tx);
        // Replies still being prepared hold senders; the writer ends when the last is done.
        let _ = writer.await;
    }

    async fn reply(
        &self,
        export: Arc<dyn PeerExport>,
        id: u32,
        run: Range<u32>,
        requester: &str,
        tx: &mpsc::Sender<(Frame, Option<OwnedSemaphorePermit>)>,
    ) {
        // A reply from the cache takes its upload slot before reading, so replies waiting for a
        // slot hold no chunk bytes; one this node must fetch first takes it after.
        let early = if export.holds(run.clone()) {
            Some(self.slots.clone().acquire_owned().await.expect("semaphore never closed"))
        } else {
            None
        };
        let Some(bytes) = export.serve(run, requester).await else {
            self.stats.not_have.fetch_add(1, Ordering::Relaxed);
            let _ = tx.send((Frame::new(Message::NotHave { id }), None)).await;
            return;
        };
        let permit = match early {
            Some(p) => p,
            None => self.slots.clone().acquire_owned().await.expect("semaphore never closed"),
        };
        self.pace(bytes.len() as u64).await;
        let bytes = if self.corrupt {
            let mut v = bytes.to_vec();
            for b in v.iter_mut().step_by(4096) {
                *b ^= 0x5A;
            }
            Bytes::from(v)
        } else {
            bytes
        };
        let n = bytes.len() as u64;
        if tx.send((Frame::with_tail(Message::Data { id }, bytes), Some(permit))).await.is_ok() {
            export.uploaded(n);
        }
    }

    /// Waits for this reply's turn under the upload rate cap.
    async fn pace(&self, bytes: u64) {
        let Some(rate) = self.limits.rate.filter(|r| *r > 0) else { return };
        let start = {
            let mut next = self.next_free.lock().unwrap();
            let start = (*next).max(Instant::now());
            *next = start + Duration::from_secs_f64(bytes as f64 / rate as f64);
            start
        };
        tokio::time::sleep_until(start).await;
    }
}

/// Sends the full have-map, then, every [`HAVE_INTERVAL`] while the session is busy, the chunks
/// gained or, if there are none and a request of the peer's is in progress, a ping. A quiet
/// session is looked at every [`QUIET_INTERVAL`], or at once when a request arrives.
async fn announce(
    export: Arc<dyn PeerExport>,
    tx: mpsc::Sender<(Frame, Option<OwnedSemaphorePermit>)>,
    queued: Arc<AtomicUsize>,
    requested: Arc<tokio::sync::Notify>,
) {
    let mut sent = export.have();
    let mut count = sent.len();
    if tx.send((Frame::with_tail(Message::Have, bitmap_bytes(&sent)), None)).await.is_err() {
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
        if tx.send((frame, None)).await.is_err() {
            return;
        }
    }
}

fn bitmap_bytes(map: &RoaringBitmap) -> Bytes {
    let mut v = Vec::with_capacity(map.serialized_size());
    map.serialize_into(&mut v).expect("writing to a Vec cannot fail");
    Bytes::from(v)
}
