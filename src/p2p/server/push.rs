//! The sending end of pushes: a session whose peer took this node as its parent in some trees
//! (`Adopt`) gets every run this node obtains in those trees' stripes, less what the peer holds
//! (its have-map with the `Adopt`) or asked for on this session, as `Offer` and then `Push`.
//!
//! Invariants: a push is a reply nobody asked for and ranks below asked ones: it reserves its
//! bytes from the node's budget only while half of it is free ([`UploadBudget::reserve_push`],
//! never waiting: a push that finds no room is not offered, and the child asks when it needs
//! the run), then takes an upload slot and the rate cap's turn like a reply. A node pushes only
//! down its trees (to a peer it ranks above in the run's tree, see `Swarm::adopted_by`), so
//! pushes never loop. Every offer is followed by its push unless the session ends.
//!
//! [`UploadBudget::reserve_push`]: crate::p2p::core::upload::UploadBudget::reserve_push

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

/// What a session lends its pushes: its frame queue and its share of the budget and queue.
pub(super) struct SessionQueue {
    pub tx: mpsc::Sender<(Frame, Held)>,
    pub reserved: Arc<AtomicU64>,
    pub queued: Arc<AtomicUsize>,
    pub requested: Arc<tokio::sync::Notify>,
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
    /// session lives.
    async fn push_runs(
        self: Arc<Self>,
        export: Arc<dyn PeerExport>,
        adoption: Arc<Mutex<Adoption>>,
        mut obtained: broadcast::Receiver<Arc<RunData>>,
        queue: SessionQueue,
    ) {
        loop {
            let run = match obtained.recv().await {
                Ok(r) => r,
                // Runs missed are asked for when needed.
                Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => return,
            };
            let class = export.class(run.chunks.start);
            let wanted = {
                let a = adoption.lock().unwrap();
                if !a.classes.contains(&class) {
                    continue;
                }
                let mut w = RoaringBitmap::new();
                w.insert_range(run.chunks.clone());
                w - &a.known
            };
            for piece in stretches(&wanted) {
                if !self.push(&export, &adoption, &run, piece, &queue).await {
                    return;
                }
            }
        }
    }

    /// Offers `piece` of `run` and sends it once it has a slot; false when the session ended.
    async fn push(
        self: &Arc<Self>,
        export: &Arc<dyn PeerExport>,
        adoption: &Arc<Mutex<Adoption>>,
        run: &Arc<RunData>,
        piece: Range<u32>,
        queue: &SessionQueue,
    ) -> bool {
        let skip = if piece.start > run.chunks.start { export.run_len(run.chunks.start..piece.start) } else { Some(0) };
        let (Some(skip), Some(len)) = (skip, export.run_len(piece.clone())) else { return true };
        let Some(bytes) = run
            .bytes
            .get(skip as usize..(skip + len) as usize)
            .map(|_| run.bytes.slice(skip as usize..(skip + len) as usize))
        else {
            return true;
        };
        let Some(held) = self.reserve_push(len, &queue.reserved, queue.queued.load(Ordering::Relaxed)) else {
            self.stats.pushes_skipped.fetch_add(1, Ordering::Relaxed);
            return true;
        };
        adoption.lock().unwrap().known.insert_range(piece.clone());
        if queue.queued.fetch_add(1, Ordering::Relaxed) == 0 {
            queue.requested.notify_one();
        }
        let slot = Queued(queue.queued.clone());
        let (first, count) = (piece.start, piece.end - piece.start);
        if queue.tx.send((Frame::new(Message::Offer { first, count }), None)).await.is_err() {
            return false;
        }
        let (me, export, tx) = (self.clone(), export.clone(), queue.tx.clone());
        let adoption = adoption.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let permit = me.slots.clone().acquire_owned().await.expect("semaphore never closed");
            // Asked for wholly since it was offered: the peer asked before the offer reached it
            // (it waits on no chunk of it then), and its reply carries the bytes.
            if adoption.lock().unwrap().asked.contains_range(first..first + count) {
                me.stats.pushes_skipped.fetch_add(1, Ordering::Relaxed);
                return;
            }
            me.pace(len).await;
            let bytes = me.maybe_corrupt(bytes);
            me.stats.pushes.fetch_add(1, Ordering::Relaxed);
            if tx.send((Frame::with_tail(Message::Push { first, count }, bytes), Some((permit, held)))).await.is_ok() {
                export.uploaded(len);
            }
        });
        true
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
