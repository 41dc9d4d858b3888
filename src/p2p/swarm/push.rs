//! The receiving end of pushes: this node tells each parent in which trees it takes it as its
//! parent (`Adopt`, with its have-map), and takes the runs that parent then offers and pushes.
//!
//! Invariants: only a node's current parent in a run's tree may make it wait on an offer (an
//! offer from anyone else is dropped); every pushed chunk is verified against the manifest
//! before it is handed on or stored, and a mismatch bans the parent as a corrupt reply does;
//! pushed bytes being verified and stored are bounded ([`RECEIVE_BUDGET_KIB`]), a push past
//! that is dropped and its chunks are fetched as if never offered. With `p2p.pack`, chunk data
//! that comes packed (from parents and from peers alike) leaves its blocks in the image's
//! `Packs`, to be sent on as it came.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Instant;

use bytes::Bytes;

use super::Swarm;
use crate::fetch::flight::{Fetcher, Offered};
use crate::fetch::BoxFuture;
use crate::p2p::peer::{PeerConn, Pieces, PushSink};
use crate::p2p::select::Outcome;
use crate::p2p::wire::MAX_TAIL;

/// Pushed bytes being verified and stored at once, per image, in KiB.
pub(super) const RECEIVE_BUDGET_KIB: usize = 32 << 10;

impl Swarm {
    /// The image's fetcher, once it exists: pushed runs go there.
    pub fn attach(&self, fetcher: &Arc<Fetcher>) {
        let _ = self.fetcher.set(Arc::downgrade(fetcher));
    }

    /// Whether this node pushes and is pushed to.
    pub fn pushes(&self) -> bool {
        self.tuning.push
    }

    /// This node's guest or prefetch reads the image: from now on it adopts its parents (at
    /// once, so that what they obtain next is pushed here). Cheap after the first call.
    pub fn activate(&self) {
        // Every guest read calls this: a load, not a write, once active.
        if self.tuning.push && !self.active.load(Ordering::Relaxed) && !self.active.swap(true, Ordering::Relaxed) {
            if let Some(f) = self.fetcher.get().and_then(Weak::upgrade) {
                f.boot_begins();
            }
            self.adopt_parents();
        }
    }

    /// The tree (class) of the stripe holding `chunk`.
    pub fn class(&self, chunk: u32) -> u32 {
        self.selector.lock().unwrap().class(chunk)
    }

    /// The trees among `classes` in which `child` may take this node as its parent: those in
    /// which this node ranks above it (a node pushes only down its trees).
    pub fn adopted_by(&self, child: &str, classes: &[u32]) -> Vec<u32> {
        let sel = self.selector.lock().unwrap();
        let mut v: Vec<u32> = classes.iter().copied().filter(|c| sel.above_in(*c, child)).collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    /// Tells every open session's peer in which trees it is this node's parent now.
    pub(super) fn adopt_parents(&self) {
        if !self.tuning.push {
            return;
        }
        let open: Vec<Arc<PeerConn>> = {
            let conns = self.conns.lock().unwrap();
            conns.values().filter_map(|s| s.try_lock().ok().and_then(|g| g.clone())).collect()
        };
        let mut parents: HashMap<String, Vec<u32>> = HashMap::new();
        for (class, node) in self.parents() {
            parents.entry(node).or_default().push(class);
        }
        for conn in open.iter().filter(|c| !c.is_closed()) {
            let classes = parents.remove(conn.node()).unwrap_or_default();
            conn.adopt(classes, || self.have());
        }
    }

    /// Tells `conn`'s peer in which trees it is this node's parent now.
    pub(super) fn adopt(&self, conn: &PeerConn) {
        if !self.tuning.push {
            return;
        }
        let classes = self.parents().into_iter().filter(|(_, n)| n == conn.node()).map(|(c, _)| c).collect();
        conn.adopt(classes, || self.have());
    }

    /// This node's parent in each tree, once it is active (none before).
    fn parents(&self) -> Vec<(u32, String)> {
        if !self.active.load(Ordering::Relaxed) {
            return Vec::new();
        }
        self.selector.lock().unwrap().parents(Instant::now())
    }

    fn have(&self) -> roaring::RoaringBitmap {
        self.fetcher.get().and_then(Weak::upgrade).map(|f| f.present()).unwrap_or_default()
    }
}

impl Swarm {
    /// The packed tail of `chunks` (whose bytes `raw` come from the cache) for a peer, when
    /// this node packs.
    pub fn pack(&self, chunks: Range<u32>, raw: &Bytes) -> Option<Bytes> {
        self.tuning.pack.then(|| self.packs.tail(&self.manifest, chunks, raw, MAX_TAIL as usize)).flatten()
    }

    /// What this image's packed blocks did and hold.
    pub fn pack_stats(&self) -> crate::p2p::pack::PackStats {
        self.packs.stats()
    }
}

impl PushSink for Swarm {
    fn packed(&self, chunks: Range<u32>, packed: &Bytes) {
        if self.tuning.pack {
            self.packs.keep(self.manifest.geometry(), chunks, packed);
        }
    }

    fn offered(&self, from: &str, run: Range<u32>) -> Option<Offered> {
        let parent = {
            let sel = self.selector.lock().unwrap();
            self.tuning.push && sel.split(run.clone()).len() == 1 && sel.parent(run.start, Instant::now()) == Some(from)
        };
        if !parent {
            self.stats.pushes_dropped.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        let offered = self.fetcher.get().and_then(Weak::upgrade)?.offer(run);
        if offered.is_none() {
            self.stats.pushes_dropped.fetch_add(1, Ordering::Relaxed);
        }
        offered
    }

    fn pushed(&self, from: &str, run: Range<u32>, offered: Offered, mut pieces: Pieces) -> BoxFuture<'_, bool> {
        let from = from.to_string();
        Box::pin(async move {
            let g = self.manifest.geometry();
            let len = g.run_bytes(run.clone()).map_or(0, |(_, n)| n);
            let kib = u32::try_from(len.div_ceil(1024).max(1)).unwrap_or(u32::MAX);
            let Ok(_budget) = self.push_budget.clone().try_acquire_many_owned(kib) else {
                // Dropping the offer sends its readers to fetch.
                self.stats.pushes_dropped.fetch_add(1, Ordering::Relaxed);
                return true;
            };
            let Some(fetcher) = self.fetcher.get().and_then(Weak::upgrade) else { return true };
            // The pieces, checked, in one buffer (a copy when there are several).
            let mut all: Vec<u8> = Vec::new();
            let bytes = loop {
                // Ended early (the session ended, the offer timed out): the offer is lost.
                let Some((piece, bytes)) = pieces.recv().await else { return true };
                let bytes = match self.verify(&from, piece.clone(), bytes).await {
                    Ok(b) => b,
                    Err(_) => {
                        tracing::warn!(peer = %from, first = piece.start, count = piece.len(), "pushed run does not match the manifest");
                        self.stats.peer_verify_failures.fetch_add(1, Ordering::Relaxed);
                        let mut sel = self.selector.lock().unwrap();
                        sel.started(&from);
                        sel.finished(&from, run, Outcome::Corrupt, Instant::now());
                        return false;
                    }
                };
                let last = piece.end >= run.end;
                if last && all.is_empty() {
                    break bytes;
                }
                if all.is_empty() {
                    all.reserve_exact(len);
                }
                all.extend_from_slice(&bytes);
                if last {
                    break Bytes::from(all);
                }
                // Cut through: its readers need not wait for the rest.
                self.stats.push_parts.fetch_add(1, Ordering::Relaxed);
                fetcher.deliver_part(&offered, piece, bytes);
            };
            let offset = g.chunk_offset(crate::image::ChunkIdx(run.start)).0;
            // What the offer took is what is used; the rest of the run was here or on its way.
            let used: u64 = offered.chunks().map(|i| g.chunk_len(crate::image::ChunkIdx(i)) as u64).sum();
            self.stats.pushes.fetch_add(1, Ordering::Relaxed);
            self.stats.bytes_pushed.fetch_add(used, Ordering::Relaxed);
            self.stats.bytes_from_peers.fetch_add(used, Ordering::Relaxed);
            fetcher.deliver(offered, run, offset, bytes).await;
            true
        })
    }
}
