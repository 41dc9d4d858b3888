//! The sending end of pushes: a session whose peer took this node as its parent in some trees
//! (`Adopt`) gets every run this node obtains in those trees' stripes, less what the peer holds
//! (its have-map with the `Adopt`) or asked for on this session, as `Offer` and then `Push`.
//!
//! Invariants: a push is a reply nobody asked for and ranks below asked ones: it reserves its
//! bytes from the node's budget only while half of it is free ([`UploadBudget::reserve_push`],
//! never waiting: a push that finds no room is not offered, and the child asks when it needs
//! the run), and only while the session has fewer than [`PUSH_WINDOW`] pushes waiting; it then
//! takes an upload slot and the rate cap's turn like a reply, and is written only when no other
//! frame of the session waits. A node pushes only
//! down its trees (to a peer it ranks above in the run's tree, see `Swarm::adopted_by`), so
//! pushes never loop. Every offer is followed by its push unless the session ends.
//!
//! [`UploadBudget::reserve_push`]: crate::p2p::core::upload::UploadBudget::reserve_push

use std::collections::VecDeque;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use roaring::RoaringBitmap;
use tokio::sync::{broadcast, mpsc};

use super::{AbortOnDrop, Held, PeerExport, PeerServer, Queued, Reservation};
use crate::fetch::flight::RunData;
use crate::p2p::wire::{Frame, Message};

/// What a session's peer took this node as: its parent in `classes`, holding `known`.
#[derive(Default)]
struct Adoption {
    classes: Vec<u32>,
    /// Chunks the peer holds or has asked this session for, or that were offered to it, as far
    /// as this node knows.
    known: RoaringBitmap,
    /// Chunks the peer asked this session for.
    asked: RoaringBitmap,
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
    /// The peer asked for `run` on this session: it gets it as a reply, not as a push.
    pub(super) fn asked(&self, run: Range<u32>) {
        let mut a = self.adoption.lock().unwrap();
        a.known.insert_range(run.clone());
        a.asked.insert_range(run);
    }
}

/// A push waiting for its session's writer.
pub(super) struct QueuedPush {
    frame: Frame,
    held: Held,
    adoption: Arc<Mutex<Adoption>>,
    run: Range<u32>,
    server: Arc<PeerServer>,
    export: Arc<dyn PeerExport>,
}

impl QueuedPush {
    /// The frame to write and what it holds, unless the peer has asked for the whole run on the
    /// session since it was offered: it asked before the offer reached it (so it waits on no
    /// chunk of it), and its reply carries the bytes.
    pub(super) fn still_wanted(self) -> Option<(Frame, Held)> {
        if self.adoption.lock().unwrap().asked.contains_range(self.run.clone()) {
            self.server.stats.pushes_skipped.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        self.server.stats.pushes.fetch_add(1, Ordering::Relaxed);
        self.export.uploaded(self.frame.tail.len() as u64);
        Some((self.frame, self.held))
    }
}

/// What a session lends its pushes: its frame queue and its share of the budget and queue.
pub(super) struct SessionQueue {
    pub tx: mpsc::Sender<(Frame, Held)>,
    /// The writer's queue of pushes, taken only while `tx` has nothing.
    pub push_tx: mpsc::Sender<QueuedPush>,
    /// Pushes offered and not yet handed to the writer (at most [`PUSH_WINDOW`]), and a wake-up
    /// when one is.
    pub pushing: Arc<AtomicUsize>,
    pub freed: Arc<tokio::sync::Notify>,
    pub reserved: Arc<AtomicU64>,
    pub queued: Arc<AtomicUsize>,
    pub requested: Arc<tokio::sync::Notify>,
}

/// Pushes one session may have offered and not yet handed to its writer: runs obtained while
/// that many wait queue in the session's backlog, not offered (the child asks for one when it
/// needs it first). Pushes then fill the link's idle time instead of queueing up in front of
/// the runs the child's guest asks for.
const PUSH_WINDOW: usize = 2;

/// Runs at the back of a session's backlog that keep their bytes (the others are read back from
/// the cache when their turn comes).
const KEPT_BYTES: usize = 4;
/// How soon a push that found no room in the budget tries again (unless a push ends first).
const RETRY: std::time::Duration = std::time::Duration::from_millis(20);

/// How an attempt to push ended.
enum Pushed {
    /// Offered (and on its way), or nothing to push.
    Sent,
    /// No room in the budget: try again later.
    NoRoom,
    /// The session ended.
    Closed,
}

/// Takes one push off its session's window when it is handed to the writer or dropped, and
/// wakes the session's pusher.
struct Window(Arc<AtomicUsize>, Arc<tokio::sync::Notify>);

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
        let Some(have) = crate::p2p::peer::decode_have(have, export.chunks()) else {
            return Err("malformed have-map in an adoption".into());
        };
        let classes = export.adopted_by(child, &classes);
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
        let Some(obtained) = export.obtained() else { return Ok(()) };
        let adoption = Arc::new(Mutex::new(Adoption { classes, known: have, asked: RoaringBitmap::new() }));
        let task = tokio::spawn(self.clone().push_runs(export.clone(), adoption.clone(), obtained, queue.clone()));
        self.stats.children.fetch_add(1, Ordering::Relaxed);
        *pushing = Some(Pushing { server: self.clone(), adoption, _task: AbortOnDrop(task) });
        Ok(())
    }

    /// Offers and pushes each run this node obtains in the adopted trees, as long as the
    /// session lives, oldest first, as the window and the budget let it.
    async fn push_runs(
        self: Arc<Self>,
        export: Arc<dyn PeerExport>,
        adoption: Arc<Mutex<Adoption>>,
        mut obtained: broadcast::Receiver<Arc<RunData>>,
        queue: SessionQueue,
    ) {
        // Runs to push, oldest first; the newest few keep their bytes, the others are read back
        // from the cache when their turn comes.
        let mut backlog: VecDeque<(Range<u32>, Option<Arc<RunData>>)> = VecDeque::new();
        let mut blocked = false;
        loop {
            tokio::select! {
                r = obtained.recv() => match r {
                    Ok(run) => {
                        if adoption.lock().unwrap().classes.contains(&export.class(run.chunks.start)) {
                            backlog.push_back((run.chunks.clone(), Some(run)));
                            if let Some(k) = backlog.len().checked_sub(KEPT_BYTES + 1) {
                                backlog[k].1 = None;
                            }
                        }
                    }
                    // Runs missed are asked for when needed.
                    Err(broadcast::error::RecvError::Lagged(_)) => {}
                    Err(broadcast::error::RecvError::Closed) => return,
                },
                _ = queue.freed.notified(), if !backlog.is_empty() => {}
                _ = tokio::time::sleep(RETRY), if blocked && !backlog.is_empty() => {}
            }
            blocked = false;
            while queue.pushing.load(Ordering::Relaxed) < PUSH_WINDOW {
                let Some((chunks, data)) = backlog.pop_front() else { break };
                let wanted = {
                    let a = adoption.lock().unwrap();
                    let mut w = RoaringBitmap::new();
                    w.insert_range(chunks.clone());
                    w - &a.known
                };
                let mut pieces = stretches(&wanted).into_iter();
                while let Some(piece) = pieces.next() {
                    match self.push(&export, &adoption, (&chunks, data.as_ref()), piece.clone(), &queue).await {
                        Pushed::Sent => {}
                        Pushed::Closed => return,
                        Pushed::NoRoom => {
                            // The rest of this run waits for room, at the front.
                            let rest = piece.start..chunks.end;
                            backlog.push_front((rest, data.clone()));
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

    /// Offers `piece` of `chunks` (whose bytes `data` may hold) and sends it once it has a slot.
    async fn push(
        self: &Arc<Self>,
        export: &Arc<dyn PeerExport>,
        adoption: &Arc<Mutex<Adoption>>,
        (chunks, data): (&Range<u32>, Option<&Arc<RunData>>),
        piece: Range<u32>,
        queue: &SessionQueue,
    ) -> Pushed {
        let Some(len) = export.run_len(piece.clone()) else { return Pushed::Sent };
        let skip = if piece.start > chunks.start { export.run_len(chunks.start..piece.start) } else { Some(0) };
        let held_bytes = data.zip(skip).and_then(|(d, skip)| {
            let range = skip as usize..(skip + len) as usize;
            d.bytes.get(range.clone()).map(|_| d.bytes.slice(range))
        });
        let Some(held) = self.reserve_push(len, &queue.reserved, queue.queued.load(Ordering::Relaxed)) else {
            return Pushed::NoRoom;
        };
        queue.pushing.fetch_add(1, Ordering::Relaxed);
        let window = Window(queue.pushing.clone(), queue.freed.clone());
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
        if queue.tx.send((Frame::new(Message::Offer { first, count }), None)).await.is_err() {
            return Pushed::Closed;
        }
        let (me, export, tx) = (self.clone(), export.clone(), queue.push_tx.clone());
        let adoption = adoption.clone();
        tokio::spawn(async move {
            let (_slot, _window) = (slot, window);
            let permit = me.slots.clone().acquire_owned().await.expect("semaphore never closed");
            me.pace(len).await;
            let bytes = me.maybe_corrupt(bytes, true);
            let frame = Frame::with_tail(Message::Push { first, count }, bytes);
            let run = first..first + count;
            let push = QueuedPush { frame, held: Some((permit, held)), adoption, run, server: me.clone(), export };
            let _ = tx.send(push).await;
        });
        Pushed::Sent
    }

    /// Reserves `len` bytes for a push, as [`PeerServer::reserve`] does for a reply.
    fn reserve_push(self: &Arc<Self>, len: u64, reserved: &Arc<AtomicU64>, queued: usize) -> Option<Reservation> {
        let bytes = self.budget.lock().unwrap().reserve_push(reserved.load(Ordering::Relaxed), queued, len)?;
        Some(self.reserved(bytes, reserved))
    }
}

impl Clone for SessionQueue {
    fn clone(&self) -> SessionQueue {
        SessionQueue {
            tx: self.tx.clone(),
            push_tx: self.push_tx.clone(),
            pushing: self.pushing.clone(),
            freed: self.freed.clone(),
            reserved: self.reserved.clone(),
            queued: self.queued.clone(),
            requested: self.requested.clone(),
        }
    }
}

/// The runs of adjacent chunks in `map`.
fn stretches(map: &RoaringBitmap) -> Vec<Range<u32>> {
    let mut out: Vec<Range<u32>> = Vec::new();
    for c in map {
        match out.last_mut() {
            Some(r) if r.end == c => r.end += 1,
            _ => out.push(c..c + 1),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stretches_are_runs_of_adjacent_chunks() {
        let map: RoaringBitmap = [1, 2, 3, 7, 9, 10].into_iter().collect();
        assert_eq!(stretches(&map), vec![1..4, 7..8, 9..11]);
        assert!(stretches(&RoaringBitmap::new()).is_empty());
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
