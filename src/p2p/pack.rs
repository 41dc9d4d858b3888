//! Chunks packed for the wire (lz4 blocks, see `wire::pack_block`), kept per image so that a
//! chunk is packed about once in the whole cluster: where it enters it (the node that read it
//! from the origin), then sent on as it came by every relay below.
//!
//! Invariants: a block goes out for chunk `c` only if it unpacks to `c`'s bytes as the manifest
//! has them. A block that came from a peer is kept with the digest of what it unpacked to, and
//! that digest is checked against the manifest's before the block is sent (a peer cannot make
//! this node send on bytes it never verified); a block packed here, from this node's own cache,
//! is kept with the manifest's digest. At most [`PACK_BUDGET`] bytes of blocks are kept per
//! image, the oldest dropped first; a block received is copied out of its frame, so the budget
//! counts what is really held.

use std::collections::{HashMap, VecDeque};
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use bytes::Bytes;

use super::wire::{self, Frame};
use crate::image::{ChunkIdx, Digest, Manifest};

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

#[derive(Default)]
struct Inner {
    /// Chunk → its block (header included) and the digest of what it unpacks to.
    blocks: HashMap<u32, (Bytes, Digest)>,
    /// Chunks in the order their blocks were kept, oldest first.
    order: VecDeque<u32>,
    bytes: usize,
}

impl Inner {
    fn keep(&mut self, budget: usize, chunk: u32, block: Bytes, digest: Digest) {
        let cost = block.len() + ENTRY_COST;
        if cost > budget {
            return;
        }
        match self.blocks.insert(chunk, (block, digest)) {
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

    /// Keeps the blocks of `frame`, a packed frame of the chunks from `first` on, each with the
    /// digest of what it unpacked to (a frame that is not packed, or whose blocks do not match
    /// its bytes, leaves nothing).
    pub fn keep(&self, first: u32, frame: &Frame) {
        let Some(packed) = &frame.packed else { return };
        let Ok(blocks) = wire::blocks(packed) else { return };
        let mut at = 0;
        let mut kept = Vec::with_capacity(blocks.len());
        for (i, (block, raw)) in blocks.into_iter().enumerate() {
            let Some(bytes) = frame.tail.get(at..at + raw) else { return };
            at += raw;
            kept.push((first.saturating_add(i as u32), Bytes::copy_from_slice(&block), Digest::of(bytes)));
        }
        let mut inner = self.inner.lock().unwrap();
        for (chunk, block, digest) in kept {
            inner.keep(self.budget, chunk, block, digest);
        }
    }

    /// The packed tail of `chunks`, whose bytes `raw` come from this node's cache: each
    /// chunk's kept block if it unpacks to the manifest's bytes, else packed now (and kept).
    /// A tail that does not pack is still sent packed (its blocks stored as they are, 8 bytes
    /// more per chunk), so that the relays below keep its blocks too and never try again to
    /// pack what does not pack. `None` when `raw` is not those chunks' bytes.
    pub fn tail(&self, manifest: &Manifest, chunks: Range<u32>, raw: &Bytes) -> Option<Bytes> {
        let g = manifest.geometry();
        let mut out = Vec::with_capacity(raw.len() / 2);
        let (mut at, mut packed, mut kept) = (0, 0, 0);
        for c in chunks {
            let len = g.chunk_len(ChunkIdx(c));
            let bytes = raw.get(at..at + len)?;
            at += len;
            let want = manifest.digest(ChunkIdx(c))?;
            let mut inner = self.inner.lock().unwrap();
            match inner.blocks.get(&c) {
                Some((block, digest)) if digest == want => {
                    out.extend_from_slice(block);
                    kept += 1;
                }
                _ => {
                    let start = out.len();
                    wire::pack_block(bytes, &mut out);
                    inner.keep(self.budget, c, Bytes::copy_from_slice(&out[start..]), *want);
                    packed += 1;
                }
            }
        }
        let tail = (at == raw.len()).then(|| Bytes::from(out))?;
        self.packed.fetch_add(packed, Ordering::Relaxed);
        self.sent_as_received.fetch_add(kept, Ordering::Relaxed);
        Some(tail)
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
    use crate::p2p::wire::Message;

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
        let packs = Packs::new(PACK_BUDGET);
        let raw = data.slice(65536..4 * 65536);
        let tail = packs.tail(&m, 1..4, &raw).expect("text packs");
        assert!(tail.len() < raw.len() / 2, "{} of {}", tail.len(), raw.len());
        assert_eq!(wire::unpack(&tail).unwrap(), raw);
        assert_eq!(packs.stats().blocks, 3);
        // A relay that received it keeps its blocks and sends the same bytes on.
        let relay = Packs::new(PACK_BUDGET);
        relay.keep(1, &Frame { msg: Message::Data { id: 1 }, tail: raw.clone(), packed: Some(tail.clone()) });
        assert_eq!(relay.stats().blocks, 3);
        let on = relay.tail(&m, 2..4, &data.slice(2 * 65536..4 * 65536)).unwrap();
        assert_eq!(on, tail.slice(tail.len() - relay_len(&tail, 2)..));
        let s = relay.stats();
        assert_eq!((s.packed, s.sent_as_received), (0, 2));
        assert_eq!(packs.stats().packed, 3);
    }

    /// The length of the last `n` blocks of a packed tail.
    fn relay_len(tail: &Bytes, n: usize) -> usize {
        let b = wire::blocks(tail).unwrap();
        b[b.len() - n..].iter().map(|(x, _)| x.len()).sum()
    }

    #[test]
    fn a_block_that_unpacks_to_other_bytes_is_never_sent_on() {
        let (m, data) = image(2);
        let packs = Packs::new(PACK_BUDGET);
        // A peer sends chunk 0's place the bytes of chunk 1, packed: kept under what they are.
        let wrong = data.slice(65536..2 * 65536);
        let mut lie = Vec::new();
        wire::pack_block(&wrong, &mut lie);
        packs.keep(
            0,
            &Frame { msg: Message::Push { first: 0, count: 1 }, tail: wrong, packed: Some(Bytes::from(lie.clone())) },
        );
        assert_eq!(packs.stats().blocks, 1);
        let tail = packs.tail(&m, 0..1, &data.slice(0..65536)).unwrap();
        assert_ne!(&tail[..], &lie[..]);
        assert_eq!(wire::unpack(&tail).unwrap(), data.slice(0..65536));
        // Raw bytes that are not the chunks': nothing.
        assert!(packs.tail(&m, 0..2, &data.slice(0..65536)).is_none());
    }

    #[test]
    fn blocks_past_the_budget_go_oldest_first() {
        let (m, data) = image(8);
        let one = Packs::new(PACK_BUDGET);
        one.tail(&m, 0..1, &data.slice(0..65536)).unwrap();
        let per = one.stats().bytes as usize;
        let packs = Packs::new(3 * per + per / 2);
        for c in 0..8u32 {
            let at = (c as usize) << 16;
            packs.tail(&m, c..c + 1, &data.slice(at..at + 65536)).unwrap();
            assert!(packs.stats().bytes as usize <= 3 * per + per / 2);
        }
        let inner = packs.inner.lock().unwrap();
        assert!(inner.blocks.contains_key(&7) && !inner.blocks.contains_key(&0), "{:?}", inner.order);
    }
}
