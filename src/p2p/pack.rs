//! Chunks packed for the wire (lz4 blocks, see `wire::pack_block`), kept per image so that a
//! chunk is packed about once in the whole cluster: where it enters it (the node that read it
//! from the origin), then sent on as it came by every relay below.
//!
//! Invariants: a block goes out in place of a chunk's bytes only if it unpacks to bytes that
//! matched the manifest. A block packed here is kept only if the bytes it was packed from
//! matched; a block that came from a peer is kept unchecked, and checked once, by unpacking it
//! and comparing with the bytes the sender would send otherwise (from its cache, or fetched and
//! checked for the asker), the first time it would be sent: a peer cannot make this node send
//! on bytes it never verified, and a node that never sends a chunk on never pays for the check.
//! A checked block is never replaced by a later peer's. At most [`PACK_BUDGET`] bytes of blocks
//! are kept per image, the oldest dropped first; a block received is copied out of its frame,
//! so the budget counts what is really held.

use std::collections::{HashMap, VecDeque};
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use bytes::Bytes;

use super::wire;
use crate::image::{ChunkIdx, Geometry, Manifest};

/// Bytes of packed blocks kept per image: the Debian guest's boot working set (803 chunks of
/// 64 KiB) packs to about 21 MiB.
pub const PACK_BUDGET: usize = 32 << 20;
/// What one kept block costs beyond its bytes (map entry, queue slot, `Bytes` header).
const ENTRY_COST: usize = 96;

/// The packed blocks of one image.
pub struct Packs {
    budget: usize,
    inner: Mutex<Inner>,
    /// Chunks packed here to be sent, and chunks sent in the packed form they came in.
    packed: AtomicU64,
    sent_as_received: AtomicU64,
}

/// What a node's [`Packs`] did and holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PackStats {
    /// Chunks packed here to be sent to peers (a chunk that enters the cluster here).
    pub packed: u64,
    /// Chunks sent to peers in the packed form they came in from a peer.
    pub sent_as_received: u64,
    /// Blocks kept now, and what they cost (their bytes and their entries).
    pub blocks: u64,
    pub bytes: u64,
}

/// Where a kept block came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Origin {
    /// Packed here, from the cache's bytes.
    Here,
    /// From a peer; `true` once checked to unpack to the cache's bytes.
    Peer(bool),
}

#[derive(Default)]
struct Inner {
    /// Chunk → its block (header included), and where it came from.
    blocks: HashMap<u32, (Bytes, Origin)>,
    /// Chunks in the order their blocks were kept, oldest first.
    order: VecDeque<u32>,
    bytes: usize,
}

impl Inner {
    fn keep(&mut self, budget: usize, chunk: u32, block: Bytes, origin: Origin) {
        let cost = block.len() + ENTRY_COST;
        if cost > budget {
            return;
        }
        match self.blocks.insert(chunk, (block, origin)) {
            // Replaced in its place: it keeps its age.
            Some((old, _)) => self.bytes -= old.len() + ENTRY_COST,
            None => self.order.push_back(chunk),
        }
        self.bytes += cost;
        while self.bytes > budget {
            let Some(old) = self.order.pop_front() else { break };
            if let Some((b, _)) = self.blocks.remove(&old) {
                self.bytes -= b.len() + ENTRY_COST;
            }
        }
    }
}

impl Packs {
    pub fn new(budget: usize) -> Packs {
        Packs {
            budget,
            inner: Mutex::new(Inner::default()),
            packed: AtomicU64::new(0),
            sent_as_received: AtomicU64::new(0),
        }
    }

    /// Keeps the blocks of `packed`, the packed tail of a frame of `chunks` (as its session
    /// checked them), unchecked: one block per chunk, each of its chunk's length, or nothing
    /// is kept. A chunk already kept is left as it is unless its block is an unchecked one from
    /// a peer (so a peer cannot make this node check or pack anew what it holds already).
    pub fn keep(&self, g: Geometry, chunks: Range<u32>, packed: &Bytes) {
        let Some((_, len)) = g.run_bytes(chunks.clone()) else { return };
        let Ok(blocks) = wire::blocks(packed, len) else { return };
        if blocks.len() != chunks.len() || chunks.clone().zip(&blocks).any(|(c, (_, n))| g.chunk_len(ChunkIdx(c)) != *n)
        {
            return;
        }
        // Copied out of the frame (so the budget counts what is held) before the lock is taken.
        let copies: Vec<(u32, Bytes)> =
            chunks.zip(blocks).map(|(c, (block, _))| (c, Bytes::copy_from_slice(&block))).collect();
        let mut inner = self.inner.lock().unwrap();
        for (c, block) in copies {
            if inner.blocks.get(&c).is_none_or(|(_, o)| *o == Origin::Peer(false)) {
                inner.keep(self.budget, c, block, Origin::Peer(false));
            }
        }
    }

    /// The packed tail of `chunks`, whose bytes `raw` this node would send otherwise: each
    /// chunk's kept block if it unpacks to those bytes (a block from a peer is checked the first
    /// time), else packed now (and kept if the bytes match the manifest: a bad read of the
    /// cache is sent once, and refused by the peer, but not kept). A tail that does not pack
    /// is still sent packed (its blocks stored as they are, 8 bytes more per chunk), so that
    /// the relays below keep its blocks too and never try again to pack what does not pack.
    /// `None` when `raw` is not as long as those chunks, or the tail would be longer than
    /// `limit`.
    pub fn tail(&self, manifest: &Manifest, chunks: Range<u32>, raw: &Bytes, limit: usize) -> Option<Bytes> {
        let g = manifest.geometry();
        if g.run_bytes(chunks.clone()).map(|(_, n)| n) != Some(raw.len()) {
            return None;
        }
        let mut out = Vec::with_capacity(raw.len() / 2);
        let (mut at, mut packed, mut kept) = (0, 0, 0);
        for c in chunks {
            let bytes = &raw[at..at + g.chunk_len(ChunkIdx(c))];
            at += bytes.len();
            let found = self.inner.lock().unwrap().blocks.get(&c).cloned();
            // Checked outside the lock: other sessions send meanwhile.
            let good = found.filter(|(block, origin)| {
                *origin != Origin::Peer(false) || wire::unpack(block, bytes.len()).is_ok_and(|b| b == bytes)
            });
            match good {
                Some((block, origin)) => {
                    out.extend_from_slice(&block);
                    if origin == Origin::Peer(false) {
                        if let Some(e) = self.inner.lock().unwrap().blocks.get_mut(&c) {
                            // The block checked, not one a peer sent since.
                            if e.0.as_ptr() == block.as_ptr() {
                                e.1 = Origin::Peer(true);
                            }
                        }
                    }
                    if origin != Origin::Here {
                        kept += 1;
                    }
                }
                None => {
                    let start = out.len();
                    wire::pack_block(bytes, &mut out);
                    if manifest.verify(ChunkIdx(c), bytes) {
                        let block = Bytes::copy_from_slice(&out[start..]);
                        self.inner.lock().unwrap().keep(self.budget, c, block, Origin::Here);
                    }
                    packed += 1;
                }
            }
        }
        if out.len() > limit {
            return None;
        }
        self.packed.fetch_add(packed, Ordering::Relaxed);
        self.sent_as_received.fetch_add(kept, Ordering::Relaxed);
        Some(Bytes::from(out))
    }

    pub fn stats(&self) -> PackStats {
        let inner = self.inner.lock().unwrap();
        PackStats {
            packed: self.packed.load(Ordering::Relaxed),
            sent_as_received: self.sent_as_received.load(Ordering::Relaxed),
            blocks: inner.blocks.len() as u64,
            bytes: inner.bytes as u64,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A manifest of `n` chunks of 64 KiB, each compressible (text) but distinct.
    fn image(n: u32) -> (Manifest, Bytes) {
        let mut data = Vec::new();
        for c in 0..n {
            while data.len() < ((c + 1) as usize) << 16 {
                data.extend_from_slice(format!("chunk {c} line {} of a compressible image\n", data.len()).as_bytes());
            }
            data.truncate(((c + 1) as usize) << 16);
        }
        let g = crate::image::Geometry::new(data.len() as u64, crate::image::ChunkSize::new(65536).unwrap()).unwrap();
        let m = Manifest::build(g, |idx, buf| {
            let o = g.chunk_offset(idx).0 as usize;
            buf.copy_from_slice(&data[o..o + buf.len()]);
            Ok::<_, ()>(())
        })
        .unwrap();
        (m, data.into())
    }

    #[test]
    fn a_tail_packed_here_unpacks_to_the_chunks_and_is_sent_on_as_kept() {
        let (m, data) = image(4);
        let g = m.geometry();
        let packs = Packs::new(PACK_BUDGET);
        let raw = data.slice(65536..4 * 65536);
        let tail = packs.tail(&m, 1..4, &raw, usize::MAX).expect("text packs");
        assert!(tail.len() < raw.len() / 2, "{} of {}", tail.len(), raw.len());
        assert_eq!(wire::unpack(&tail, usize::MAX).unwrap(), raw);
        assert_eq!(packs.stats().blocks, 3);
        // Sent again from where it was packed: neither packed again nor counted as received.
        assert_eq!(packs.tail(&m, 1..4, &raw, usize::MAX).unwrap(), tail);
        assert_eq!((packs.stats().packed, packs.stats().sent_as_received), (3, 0));
        // A relay that received it keeps its blocks and sends the same bytes on.
        let relay = Packs::new(PACK_BUDGET);
        relay.keep(g, 1..4, &tail);
        assert_eq!(relay.stats().blocks, 3);
        let on = relay.tail(&m, 2..4, &data.slice(2 * 65536..4 * 65536), usize::MAX).unwrap();
        let b = wire::blocks(&tail, usize::MAX).unwrap();
        assert_eq!(on, tail.slice(b[0].0.len()..));
        assert_eq!((relay.stats().packed, relay.stats().sent_as_received), (0, 2));
        // A tail longer than the frame may carry: not sent packed, and not counted.
        assert!(relay.tail(&m, 2..4, &data.slice(2 * 65536..4 * 65536), on.len() - 1).is_none());
        assert_eq!((relay.stats().packed, relay.stats().sent_as_received), (0, 2));
        // Kept only as the chunks the session says it carries, each of its length.
        let other = Packs::new(PACK_BUDGET);
        other.keep(g, 1..3, &tail);
        other.keep(g, 0..3, &tail.slice(b[0].0.len()..b[0].0.len() + b[1].0.len()));
        assert_eq!(other.stats().blocks, 0);
    }

    #[test]
    fn a_block_that_unpacks_to_other_bytes_is_never_sent_on() {
        let (m, data) = image(2);
        let g = m.geometry();
        let packs = Packs::new(PACK_BUDGET);
        // A peer sends, as chunk 0, the bytes of chunk 1 packed: kept, unchecked.
        let mut lie = Vec::new();
        wire::pack_block(&data[65536..], &mut lie);
        packs.keep(g, 0..1, &Bytes::from(lie.clone()));
        assert_eq!(packs.stats().blocks, 1);
        let tail = packs.tail(&m, 0..1, &data.slice(0..65536), usize::MAX).unwrap();
        assert_ne!(&tail[..], &lie[..]);
        assert_eq!(wire::unpack(&tail, usize::MAX).unwrap(), data.slice(0..65536));
        // Packed here in its place: the lie is gone.
        assert_eq!((packs.stats().packed, packs.stats().sent_as_received), (1, 0));
        // Sent again, even after the peer sends the lie again: the block packed here stays.
        packs.keep(g, 0..1, &Bytes::from(lie.clone()));
        assert_eq!(packs.tail(&m, 0..1, &data.slice(0..65536), usize::MAX).unwrap(), tail);
        assert_eq!(packs.stats().packed, 1);
        // Bytes of another length than the chunks': nothing.
        assert!(packs.tail(&m, 0..2, &data.slice(0..65536), usize::MAX).is_none());
    }

    #[test]
    fn bytes_that_do_not_match_the_manifest_are_packed_but_not_kept() {
        let (m, data) = image(1);
        let packs = Packs::new(PACK_BUDGET);
        let mut bad = data.to_vec();
        bad[100] ^= 1;
        let tail = packs.tail(&m, 0..1, &Bytes::from(bad.clone()), usize::MAX).unwrap();
        assert_eq!(wire::unpack(&tail, usize::MAX).unwrap(), Bytes::from(bad));
        assert_eq!(packs.stats().blocks, 0);
        let good = packs.tail(&m, 0..1, &data, usize::MAX).unwrap();
        assert_eq!(wire::unpack(&good, usize::MAX).unwrap(), data);
        assert_eq!(packs.stats().blocks, 1);
    }

    #[test]
    fn blocks_past_the_budget_go_oldest_first() {
        let (m, data) = image(8);
        let one = Packs::new(PACK_BUDGET);
        one.tail(&m, 0..1, &data.slice(0..65536), usize::MAX).unwrap();
        let per = one.stats().bytes as usize;
        let packs = Packs::new(3 * per + per / 2);
        for c in 0..8u32 {
            let at = (c as usize) << 16;
            packs.tail(&m, c..c + 1, &data.slice(at..at + 65536), usize::MAX).unwrap();
            assert!(packs.stats().bytes as usize <= 3 * per + per / 2);
        }
        let inner = packs.inner.lock().unwrap();
        assert!(inner.blocks.contains_key(&7) && !inner.blocks.contains_key(&0), "{:?}", inner.order);
    }
}
