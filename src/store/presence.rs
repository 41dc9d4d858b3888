//! Which chunks of an image's cache can be served, and the verified bytes of the ones not
//! durable yet, kept in memory until their sync settles them.
//!
//! Invariants (all under the one lock that holds a `Presence`):
//! - `unsettled` ⊆ `readable`, and every chunk with kept bytes is unsettled;
//! - kept bytes are exactly the chunk's verified bytes (what `put` wrote);
//! - a span written is kept whole or not at all, its chunks sharing one buffer that is all of
//!   it (or each a copy), so `kept_len`, the sum of their lengths, is what they hold; it never
//!   exceeds [`KEEP_MAX`].
//!
//! Why keep them: an unsettled chunk's bytes in the data file cannot be trusted until its sync
//! succeeds (a failed writeback may drop them), so a read from the file must check them
//! against the manifest. In a bulk boot nearly every cache read is of a chunk written in the
//! last commit interval (pushed ahead of the guest, or stored a moment before a child asks for
//! it): kept bytes serve those reads without a read, a hash or a trip to the blocking pool.

use std::collections::HashMap;
use std::ops::Range;

use bytes::Bytes;
use roaring::RoaringBitmap;

/// Most bytes of unsettled chunks kept per image. A commit interval's writes at the speed of a
/// bulk boot fit (a boot's whole working set is about 50 MiB over seconds); beyond it, chunks
/// are checked when read, as without it.
pub const KEEP_MAX: usize = 32 << 20;

/// The verified bytes of one unsettled chunk.
#[derive(Debug, Clone)]
pub struct Kept {
    pub bytes: Bytes,
    /// Bytes of the buffer `bytes` shares with the other chunks of its span (its own length
    /// when it was copied): a reply sharing less than half of it gets a copy, so that it pins
    /// no more than it is charged for twice over, as replies from fetched runs.
    pub pins: usize,
}

/// Which chunks can be served, under one lock so that a reader sees all of it at one moment.
pub struct Presence {
    /// Chunks whose data is in the data file: safe to serve.
    pub readable: RoaringBitmap,
    /// Readable chunks whose sync has not succeeded yet: checked on every read from the file.
    pub unsettled: RoaringBitmap,
    kept: HashMap<u32, Kept>,
    kept_len: usize,
}

impl Presence {
    /// The presence of a cache whose durable chunks are `durable`.
    pub fn new(durable: RoaringBitmap) -> Presence {
        Presence { readable: durable, unsettled: RoaringBitmap::new(), kept: HashMap::new(), kept_len: 0 }
    }

    /// True when `bytes` more fit among the kept ones.
    pub fn has_room(&self, bytes: usize) -> bool {
        self.kept_len.saturating_add(bytes) <= KEEP_MAX
    }

    /// `span` was written: readable now, unsettled until a sync covers it. `kept`: its chunks'
    /// verified bytes, one per chunk in order, or none; a span is kept whole (the caller has
    /// asked [`Presence::has_room`]) or not at all, so that a buffer shared by its chunks is
    /// counted in full.
    pub fn written(&mut self, span: Range<u32>, kept: Vec<Kept>) {
        self.readable.insert_range(span.clone());
        self.unsettled.insert_range(span.clone());
        for i in span.clone() {
            self.unkeep(i);
        }
        if kept.len() != span.len() || !self.has_room(kept.iter().map(|k| k.bytes.len()).sum()) {
            return;
        }
        for (i, k) in span.zip(kept) {
            self.kept_len += k.bytes.len();
            self.kept.insert(i, k);
        }
    }

    /// Chunk `i` is durable: no longer checked, no longer kept.
    pub fn settle(&mut self, i: u32) {
        self.unsettled.remove(i);
        self.unkeep(i);
    }

    /// Chunk `i` leaves the cache; true if it was readable.
    pub fn remove(&mut self, i: u32) -> bool {
        self.settle(i);
        self.readable.remove(i)
    }

    /// The verified bytes of unsettled chunk `i`, if kept.
    pub fn kept(&self, i: u32) -> Option<&Kept> {
        self.kept.get(&i)
    }

    /// Bytes kept now.
    pub fn kept_len(&self) -> usize {
        self.kept_len
    }

    fn unkeep(&mut self, i: u32) {
        if let Some(old) = self.kept.remove(&i) {
            self.kept_len -= old.bytes.len();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunks(span: Range<u32>, len: usize) -> Vec<Kept> {
        span.map(|i| Kept { bytes: Bytes::from(vec![i as u8; len]), pins: len }).collect()
    }

    #[test]
    fn written_chunks_are_kept_until_settled_or_removed() {
        let mut p = Presence::new(RoaringBitmap::new());
        p.written(2..5, chunks(2..5, 10));
        assert_eq!(p.kept_len(), 30);
        // Written again: its bytes replace the old ones, not counted twice.
        p.written(2..3, chunks(2..3, 10));
        assert_eq!(p.kept_len(), 30);
        assert_eq!(p.kept(3).map(|k| k.bytes[0]), Some(3));
        assert!(p.unsettled.contains(4) && p.readable.contains(4));
        p.settle(3);
        assert!(p.kept(3).is_none() && !p.unsettled.contains(3) && p.readable.contains(3));
        assert!(p.remove(4));
        assert!(p.kept(4).is_none() && !p.readable.contains(4));
        assert!(!p.remove(4));
        assert_eq!(p.kept_len(), 10);
        // Written again without bytes: the old ones go, the chunk is checked when read.
        p.written(2..3, Vec::new());
        assert!(p.kept(2).is_none() && p.unsettled.contains(2));
        assert_eq!(p.kept_len(), 0);
    }

    #[test]
    fn a_span_is_kept_whole_or_not_at_all() {
        let mut p = Presence::new(RoaringBitmap::new());
        let big = KEEP_MAX / 4 + 1;
        p.written(0..3, chunks(0..3, big));
        assert_eq!(p.kept_len(), 3 * big);
        assert!(!p.has_room(big));
        // The next span does not fit: none of it is kept, all of it is readable and unsettled.
        p.written(3..5, chunks(3..5, big / 2));
        assert!(p.kept(3).is_none() && p.kept(4).is_none());
        assert_eq!((p.unsettled.len(), p.readable.len()), (5, 5));
        assert_eq!(p.kept_len(), 3 * big);
    }
}
