//! The sending end of pushes: a session whose peer took this node as its parent in some trees
//! (`Adopt`) gets every run this node obtains in those trees' stripes, less what the peer holds
//! (its have-map with the `Adopt`) or asked for on this session, as `Offer` and then `Push`.
//!
//! Invariants: a push is a reply nobody asked for and ranks below asked ones. It is offered only
//! while the session has fewer than [`PUSH_WINDOW`] pushes offered and not yet written, and only
//! with its bytes reserved from the node's budget within half of it
//! ([`UploadBudget::reserve_push`], never waiting); runs that find no place wait in the
//! session's backlog (at most [`MAX_BACKLOG`] runs, the oldest dropped: the child asks for what
//! it needs). It takes no upload slot (the window bounds pushes per session, the budget their
//! bytes), and the session's writer sends it, in its turn under the rate cap, only when no
//! other frame of the session waits. A node pushes only down its trees (to a peer it ranks
//! above in the run's tree, see `Swarm::adopted_by`), so pushes never loop. An offer is
//! followed by its push unless the peer asked for the whole run on the session meanwhile (its
//! reply carries it) or the session ends; the peer gives up on an offer that does not come.
//! A request for chunks of a push written already crossed it on the wire and is answered
//! `Pushed` (see [`Pushing::asked`]), once per chunk.
//! A peer that adopts this node after this node's own boot began is first pushed the runs of
//! that boot (`Fetcher::boot_log`) in the order this node obtained them: a later boot of the
//! same image reads them, in about that order, and finds them there ahead of its reads.
//!
//! [`UploadBudget::reserve_push`]: crate::p2p::core::upload::UploadBudget::reserve_push

use std::collections::VecDeque;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use roaring::RoaringBitmap;
use tokio::sync::{broadcast, mpsc};

use super::stream::Streams;
use super::{AbortOnDrop, Held, PeerExport, PeerServer, Queued, Reservation};
use crate::fetch::flight::{runs, Arrival, Obtained, RunData};
use crate::p2p::wire::{Frame, Message};

/// What a session's peer took this node as: its parent in `classes`, holding `known`.
#[derive(Default)]
pub(super) struct Adoption {
    pub(super) classes: Vec<u32>,
    /// Chunks the peer holds or has asked this session for, or that were offered to it, as far
    /// as this node knows.
    pub(super) known: RoaringBitmap,
    /// Chunks the peer asked this session for.
    asked: RoaringBitmap,
    /// The last runs pushed on this session ([`RECENT_PUSHES`]), oldest first, each with the
    /// chunks of it already answered `Pushed`: a request for chunks within one of them crossed
    /// its push and is answered `Pushed`, once per chunk (a request asked again gets `Data`).
    sent: VecDeque<(Range<u32>, RoaringBitmap)>,
}

/// The pushes of one session, once its peer adopted this node; ends with the session.
pub(super) struct Pushing {
    server: Arc<PeerServer>,
    adoption: Arc<Mutex<Adoption>>,
    _task: AbortOnDrop,
}

impl Drop for Pushing {
    fn drop(&mut self) {
        if !self.adoption.lock().unwrap().classes.is_empty() {
            self.server.stats.children.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl Pushing {
    /// The peer asked for `run` on this session: it gets it as a reply, not as a push. True
    /// when a push written on this session before now holds all of `run` and no chunk of it
    /// was answered so before: the request crossed the push, and the reply is `Pushed` (the
    /// peer has the bytes from the push, or asks again, and then gets `Data`).
    pub(super) fn asked(&self, run: Range<u32>) -> bool {
        let mut a = self.adoption.lock().unwrap();
        let crossed = a.sent.iter_mut().find(|(s, answered)| {
            s.start <= run.start && run.end <= s.end && answered.range_cardinality(run.clone()) == 0
        });
        if let Some((_, answered)) = crossed {
            answered.insert_range(run);
            self.server.stats.pushes_answered.fetch_add(1, Ordering::Relaxed);
            return true;
        }
        a.known.insert_range(run.clone());
        a.asked.insert_range(run);
        false
    }
}

/// Runs waiting to be offered on a session, oldest first, with their bytes while kept.
type Backlog = VecDeque<(Range<u32>, Option<Arc<RunData>>)>;

/// A push waiting for its session's writer.
pub(super) struct QueuedPush {
    pub(super) frame: Frame,
    /// The bytes of the chunks it carries (its tail may be packed).
    pub(super) bytes: u64,
    pub(super) kind: PushKind,
    /// Its bytes in the budget and its place in the session's window, until written (a
    /// `PushPart` holds none: its push's last frame holds them).
    pub(super) held: Option<Reservation>,
    /// Cleared once the writer takes it (a part of a push cut through: see `stream.rs`).
    pub(super) written: Option<(Arc<std::sync::atomic::AtomicBool>, Arc<tokio::sync::Notify>)>,
    pub(super) adoption: Arc<Mutex<Adoption>>,
    /// The run offered.
    pub(super) run: Range<u32>,
    pub(super) server: Arc<PeerServer>,
    pub(super) export: Arc<dyn PeerExport>,
}

/// Which frame of a push a [`QueuedPush`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum PushKind {
    /// A `Push` of a whole run that was in when it was offered.
    Whole,
    /// A `PushPart` of a run cut through (see `stream.rs`).
    Part,
    /// The `Push` that ends a run cut through, with the rest of its bytes.
    Last,
    /// The `Push` of no chunk that withdraws the rest of a run cut through.
    Withdrawn,
}

impl QueuedPush {
    /// The frame to write now and what it holds, after its turn under the rate cap; `None` when
    /// the peer has asked for the whole run on the session since it was offered: it asked
    /// before the offer reached it (so it waits on no chunk of it), and its reply carries the
    /// bytes.
    pub(super) async fn ready(self) -> Option<(Frame, Held)> {
        if let Some(w) = &self.written {
            w.0.store(false, Ordering::Relaxed);
            // What arrived meanwhile goes in the next part.
            w.1.notify_one();
        }
        if self.kind == PushKind::Withdrawn {
            self.server.stats.pushes_skipped.fetch_add(1, Ordering::Relaxed);
            return Some((self.frame, (None, None)));
        }
        {
            let mut a = self.adoption.lock().unwrap();
            if a.asked.contains_range(self.run.clone()) {
                if self.kind != PushKind::Part {
                    self.server.stats.pushes_skipped.fetch_add(1, Ordering::Relaxed);
                }
                return None;
            }
            // From here on a request for chunks of the run is answered `Pushed`: its reply is
            // queued after this push, which the writer writes next. (A request that crosses
            // the parts of a push cut through is answered with the bytes again.)
            if self.kind != PushKind::Part {
                if a.sent.len() == RECENT_PUSHES {
                    a.sent.pop_front();
                }
                a.sent.push_back((self.run.clone(), RoaringBitmap::new()));
            }
        }
        self.server.pace(self.frame.wire_tail().len() as u64).await;
        let counter = match self.kind {
            PushKind::Part => &self.server.stats.push_parts,
            PushKind::Whole | PushKind::Last | PushKind::Withdrawn => &self.server.stats.pushes,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        self.export.uploaded(self.bytes);
        Some((self.frame, (None, self.held)))
    }
}

/// What a session lends its pushes: its frame queue and its share of the budget and queue.
#[derive(Clone)]
pub(super) struct SessionQueue {
    pub tx: mpsc::Sender<(Frame, Held)>,
    /// The writer's queue of pushes, taken only while `tx` has nothing.
    pub push_tx: mpsc::Sender<QueuedPush>,
    /// Pushes offered and not yet written (at most [`PUSH_WINDOW`]), and a wake-up when one is.
    pub pushing: Arc<AtomicUsize>,
    pub freed: Arc<tokio::sync::Notify>,
    pub reserved: Arc<AtomicU64>,
    pub queued: Arc<AtomicUsize>,
    pub requested: Arc<tokio::sync::Notify>,
}

/// Pushes one session may have offered and not yet written: runs obtained while that many wait
/// queue in the session's backlog, not offered (the child asks for one when it needs it
/// first). Pushes then fill the link's idle time instead of queueing up in front of the runs
/// the child's guest asks for.
pub(super) const PUSH_WINDOW: usize = 2;
/// Most runs waiting in one session's backlog; past it the oldest is dropped.
const MAX_BACKLOG: usize = 2048;

/// Pushes written on a session that answer a request crossing them (see [`Pushing::asked`]):
/// as many as may be on their way at once (a socket's buffers hold megabytes, many pushes of a
/// few chunks), so that a request that crossed an older one is not answered with the bytes again.
const RECENT_PUSHES: usize = 64;

/// Runs at the back of a session's backlog that keep their bytes (the others are read back from
/// the cache when their turn comes).
const KEPT_BYTES: usize = 4;
/// How soon a push that found no room in the budget tries again (unless a push ends first).
const RETRY: std::time::Duration = std::time::Duration::from_millis(20);

/// How an attempt to push ended.
pub(super) enum Pushed {
    /// Offered (and on its way), or nothing to push.
    Sent,
    /// No room in the budget: try again later.
    NoRoom,
    /// The session ended.
    Closed,
}

/// Takes one push off its session's window when it is written or dropped, and wakes the
/// session's pusher.
pub(super) struct Window(pub(super) Arc<AtomicUsize>, pub(super) Arc<tokio::sync::Notify>);

impl Drop for Window {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
        self.1.notify_one();
    }
}

/// Largest `Adopt` frame for an image of `chunks` chunks: its classes and a have-map (a Roaring
/// container of 65,536 chunks takes at most 8 KiB and a few bytes of header).
pub(super) fn adopt_limit(chunks: u32) -> usize {
    super::SMALL_FRAME + (chunks as usize).div_ceil(1 << 16) * (8 << 10 | 16)
}

impl PeerServer {
    /// The session's peer `child` takes this node as its parent in `classes` and holds the
    /// chunks of the have-map `have`. Pushing starts with the first adoption; an adoption in no
    /// tree this node ranks above `child` in stops it. `Err` ends the session.
    pub(super) fn adopt(
        self: &Arc<Self>,
        pushing: &mut Option<Pushing>,
        export: &Arc<dyn PeerExport>,
        child: &str,
        (classes, have): (Vec<u32>, &[u8]),
        queue: &SessionQueue,
    ) -> Result<(), String> {
        if classes.len() > 1024 {
            return Err(format!("adoption in {} trees", classes.len()));
        }
        let classes = export.adopted_by(child, &classes);
        if pushing.as_ref().is_some_and(|p| p.adoption.lock().unwrap().classes == classes) {
            // Nothing changes (a peer's own vmtd sends an adoption only when it does): its map
            // is not decoded again.
            return Ok(());
        }
        let Some(have) = crate::p2p::peer::decode_have(have, export.chunks()) else {
            return Err("malformed have-map in an adoption".into());
        };
        if let Some(p) = pushing {
            let mut a = p.adoption.lock().unwrap();
            match (a.classes.is_empty(), classes.is_empty()) {
                (true, false) => self.stats.children.fetch_add(1, Ordering::Relaxed),
                (false, true) => self.stats.children.fetch_sub(1, Ordering::Relaxed),
                _ => 0,
            };
            a.classes = classes;
            a.known |= have;
            return Ok(());
        }
        if classes.is_empty() {
            return Ok(());
        }
        let Some((obtained, arrived)) = export.obtained() else { return Ok(()) };
        // Subscribed first: a run obtained meanwhile is in both, and offered once (`known`).
        let boot: Backlog = export
            .boot_log()
            .into_iter()
            .filter(|r| classes.contains(&export.class(r.start)))
            .map(|r| (r, None))
            .collect();
        let adoption = Arc::new(Mutex::new(Adoption { classes, known: have, ..Default::default() }));
        let task = tokio::spawn(self.clone().push_runs(
            export.clone(),
            adoption.clone(),
            (obtained, arrived, boot),
            queue.clone(),
        ));
        self.stats.children.fetch_add(1, Ordering::Relaxed);
        *pushing = Some(Pushing { server: self.clone(), adoption, _task: AbortOnDrop(task) });
        Ok(())
    }

    /// Offers and pushes the runs of this node's boot (`boot`) and each run it obtains in the
    /// adopted trees, as long as the session lives, oldest first, as the window and the budget
    /// let it.
    async fn push_runs(
        self: Arc<Self>,
        export: Arc<dyn PeerExport>,
        adoption: Arc<Mutex<Adoption>>,
        (mut obtained, mut arrived, boot): (broadcast::Receiver<Obtained>, broadcast::Receiver<Arrival>, Backlog),
        queue: SessionQueue,
    ) {
        // Runs being pushed as they arrive here, by their first chunk.
        let mut streams = Streams::new();
        // Runs to push, oldest first; the newest few keep their bytes, the others are read back
        // from the cache when their turn comes.
        let mut backlog = boot;
        backlog.truncate(MAX_BACKLOG);
        let mut blocked = false;
        // With a boot to push, the first round offers it at once, before any run is obtained.
        let mut waits = backlog.is_empty();
        loop {
            if std::mem::replace(&mut waits, true) {
                tokio::select! {
                    // Chunks before their run: a run is offered as its first chunks arrive.
                    biased;
                    r = arrived.recv() => match r {
                        Ok(a) => {
                            if let Pushed::Closed = self.arrive(&export, &adoption, &mut streams, a, &queue).await {
                                return;
                            }
                            continue;
                        }
                        // Parts missed: their runs' pushes carry them.
                        Err(broadcast::error::RecvError::Lagged(_)) => continue,
                        Err(broadcast::error::RecvError::Closed) => return,
                    },
                    r = obtained.recv() => match r {
                        Ok(run) => {
                            streams.last((run.chunks.clone(), run.data.upgrade())).await;
                            if adoption.lock().unwrap().classes.contains(&export.class(run.chunks.start)) {
                                backlog.push_back((run.chunks.clone(), run.data.upgrade()));
                                if let Some(k) = backlog.len().checked_sub(KEPT_BYTES + 1) {
                                    backlog[k].1 = None;
                                }
                                if backlog.len() > MAX_BACKLOG {
                                    backlog.pop_front();
                                }
                            }
                        }
                        // Runs missed are asked for when needed; the streams among them would
                        // never end.
                        Err(broadcast::error::RecvError::Lagged(_)) => streams.fail_all(),
                        Err(broadcast::error::RecvError::Closed) => return,
                    },
                    // A push or a part was written.
                    _ = queue.freed.notified(), if !backlog.is_empty() || !streams.is_empty() => {}
                    _ = tokio::time::sleep(RETRY), if blocked && !backlog.is_empty() => {}
                    _ = streams.expiry(), if !streams.is_empty() => continue,
                }
                streams.flush_all();
            }
            blocked = false;
            while queue.pushing.load(Ordering::Relaxed) < PUSH_WINDOW {
                let Some((chunks, data)) = backlog.pop_front() else { break };
                let wanted: Vec<(u32, ())> = {
                    let a = adoption.lock().unwrap();
                    // A tree no longer adopted: its runs are not pushed.
                    if !a.classes.contains(&export.class(chunks.start)) {
                        continue;
                    }
                    chunks.clone().filter(|c| !a.known.contains(*c)).map(|c| (c, ())).collect()
                };
                let mut pieces = runs(wanted, u32::MAX, None).into_iter().map(|r| r[0].0..r[r.len() - 1].0 + 1);
                while let Some(piece) = pieces.next() {
                    match self.push(&export, &adoption, data.as_ref(), piece.clone(), &queue).await {
                        Pushed::Sent => {}
                        Pushed::Closed => return,
                        Pushed::NoRoom => {
                            // The rest of this run waits for room, at the front.
                            backlog.push_front((piece.start..chunks.end, data.clone()));
                            blocked = true;
                            break;
                        }
                    }
                    if queue.pushing.load(Ordering::Relaxed) >= PUSH_WINDOW {
                        if let Some(next) = pieces.next() {
                            backlog.push_front((next.start..chunks.end, data.clone()));
                        }
                        break;
                    }
                }
                if blocked {
                    break;
                }
            }
        }
    }

    /// Offers `piece` (whose bytes the obtained run `data` may hold) and hands it to the writer.
    async fn push(
        self: &Arc<Self>,
        export: &Arc<dyn PeerExport>,
        adoption: &Arc<Mutex<Adoption>>,
        data: Option<&Arc<RunData>>,
        piece: Range<u32>,
        queue: &SessionQueue,
    ) -> Pushed {
        let Some(len) = export.run_len(piece.clone()) else { return Pushed::Sent };
        if !self.budget.lock().unwrap().push_fits(len) {
            // Longer than half the budget (a small `upload_buffer`): never pushed, the child
            // asks for it.
            self.stats.pushes_skipped.fetch_add(1, Ordering::Relaxed);
            return Pushed::Sent;
        }
        let held_bytes = data.and_then(|d| piece_bytes(d, piece.clone(), |r| export.run_len(r)));
        let Some(mut held) = self.reserve_push(len, &queue.reserved, queue.queued.load(Ordering::Relaxed)) else {
            return Pushed::NoRoom;
        };
        queue.pushing.fetch_add(1, Ordering::Relaxed);
        held.window = Some(Window(queue.pushing.clone(), queue.freed.clone()));
        adoption.lock().unwrap().known.insert_range(piece.clone());
        if queue.queued.fetch_add(1, Ordering::Relaxed) == 0 {
            queue.requested.notify_one();
        }
        let slot = Queued(queue.queued.clone());
        let bytes = match held_bytes {
            Some(b) => b,
            // Read back before it is offered: a run that left the cache is not pushed.
            None => match export.cached(piece.clone()).await {
                Some(b) => b,
                None => {
                    self.stats.pushes_skipped.fetch_add(1, Ordering::Relaxed);
                    return Pushed::Sent;
                }
            },
        };
        let (first, count) = (piece.start, piece.end - piece.start);
        if queue.tx.send((Frame::new(Message::Offer { first, count }), (None, None))).await.is_err() {
            return Pushed::Closed;
        }
        let len = bytes.len() as u64;
        let frame = self.data_frame(&**export, Message::Push { first, count }, piece.clone(), bytes, true);
        let push = QueuedPush {
            frame,
            bytes: len,
            kind: PushKind::Whole,
            held: Some(held),
            written: None,
            adoption: adoption.clone(),
            run: piece,
            server: self.clone(),
            export: export.clone(),
        };
        let tx = queue.push_tx.clone();
        tokio::spawn(async move {
            // Counted among the session's requests in progress (pings go on) until handed over.
            let _slot = slot;
            let _ = tx.send(push).await;
        });
        Pushed::Sent
    }

    /// Reserves `len` bytes for a push, as [`PeerServer::reserve`] does for a reply.
    pub(super) fn reserve_push(
        self: &Arc<Self>,
        len: u64,
        reserved: &Arc<AtomicU64>,
        queued: usize,
    ) -> Option<Reservation> {
        let bytes = self.budget.lock().unwrap().reserve_push(reserved.load(Ordering::Relaxed), queued, len)?;
        Some(self.reserved(bytes, reserved))
    }
}

/// The bytes of `piece` within the obtained run `data`, if it holds them all. The backlog may
/// have cut the run since (a piece sent, the rest put back): its bytes still start at its first
/// chunk, whatever the entry's range now says.
pub(super) fn piece_bytes(
    data: &RunData,
    piece: Range<u32>,
    run_len: impl Fn(Range<u32>) -> Option<u64>,
) -> Option<bytes::Bytes> {
    if piece.is_empty() || piece.start < data.chunks.start || piece.end > data.chunks.end {
        return None;
    }
    let skip = if piece.start > data.chunks.start { run_len(data.chunks.start..piece.start)? } else { 0 };
    let range = skip as usize..skip.checked_add(run_len(piece)?)? as usize;
    data.bytes.get(range.clone())?;
    Some(data.bytes.slice(range))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_piece_of_a_cut_run_takes_its_own_bytes() {
        // Chunks of 4 bytes, the run 8..16 holds chunk c's bytes as four times c.
        let bytes: Vec<u8> = (8u8..16).flat_map(|c| [c; 4]).collect();
        let run = RunData { chunks: 8..16, offset: 32, bytes: bytes::Bytes::from(bytes), from_peers: false };
        let len = |r: Range<u32>| Some(u64::from(r.end - r.start) * 4);
        assert_eq!(&piece_bytes(&run, 10..12, len).unwrap()[..], &[10, 10, 10, 10, 11, 11, 11, 11]);
        assert_eq!(&piece_bytes(&run, 8..9, len).unwrap()[..], &[8; 4]);
        assert_eq!(&piece_bytes(&run, 15..16, len).unwrap()[..], &[15; 4]);
        assert!(piece_bytes(&run, 7..9, len).is_none() && piece_bytes(&run, 15..17, len).is_none());
        assert!(piece_bytes(&run, 9..9, len).is_none());
    }

    #[test]
    fn an_adoption_frame_of_a_whole_have_map_fits_its_limit() {
        for chunks in [1u32, 1000, 1 << 16, 200_000] {
            let mut every = RoaringBitmap::new();
            every.insert_range(0..chunks);
            // Every other chunk: the largest serialization (no runs, full bitmap containers).
            let alternate: RoaringBitmap = (0..chunks).step_by(2).collect();
            for map in [every, alternate] {
                let frame = Frame::with_tail(
                    Message::Adopt { classes: (0..64).collect() },
                    bytes::Bytes::from({
                        let mut v = Vec::new();
                        map.serialize_into(&mut v).unwrap();
                        v
                    }),
                );
                assert!(frame.encode().len() <= adopt_limit(chunks), "{chunks} chunks");
            }
        }
    }
}
