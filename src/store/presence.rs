//! Which chunks of an image's cache can be served, and the verified bytes of the ones not
//! durable yet, kept in memory until their sync settles them.
//!
//! Invariants (all under the one lock that holds a `Presence`):
//! - `unsettled` ⊆ `readable`, and every chunk with kept bytes is unsettled;
//! - kept bytes are exactly the chunk's verified bytes (what `put` wrote), one buffer per chunk;
//! - `kept_len` is the sum of their lengths and never exceeds [`KEEP_MAX`].
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

/// Which chunks can be served, under one lock so that a reader sees all of it at one moment.
pub struct Presence {
    /// Chunks whose data is in the data file: safe to serve.
    pub readable: RoaringBitmap,
    /// Readable chunks whose sync has not succeeded yet: checked on every read from the file.
    pub unsettled: RoaringBitmap,
    kept: HashMap<u32, Bytes>,
    kept_len: usize,
}

impl Presence {
    /// The presence of a cache whose durable chunks are `durable`.
    pub fn new(durable: RoaringBitmap) -> Presence {
        Presence { readable: durable, unsettled: RoaringBitmap::new(), kept: HashMap::new(), kept_len: 0 }
    }

    /// `span` was written: readable now, unsettled until a sync covers it. `chunks` are its
    /// chunks' verified bytes, one buffer each, in order; they are kept while they fit.
    pub fn written(&mut self, span: Range<u32>, chunks: impl Iterator<Item = Bytes>) {
        self.readable.insert_range(span.clone());
        self.unsettled.insert_range(span.clone());
        for (i, bytes) in span.zip(chunks) {
            if self.kept_len + bytes.len() > KEEP_MAX {
                break;
            }
            self.kept_len += bytes.len();
            if let Some(old) = self.kept.insert(i, bytes) {
                self.kept_len -= old.len();
            }
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
    pub fn kept(&self, i: u32) -> Option<&Bytes> {
        self.kept.get(&i)
    }

    /// Bytes kept now.
    pub fn kept_len(&self) -> usize {
        self.kept_len
    }

    fn unkeep(&mut self, i: u32) {
        if let Some(old) = self.kept.remove(&i) {
            self.kept_len -= old.len();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunks(span: Range<u32>, len: usize) -> impl Iterator<Item = Bytes> {
        span.map(move |i| Bytes::from(vec![i as u8; len]))
    }

    #[test]
    fn written_chunks_are_kept_until_settled_or_removed() {
        let mut p = Presence::new(RoaringBitmap::new());
        p.written(2..5, chunks(2..5, 10));
        assert_eq!(p.kept_len(), 30);
        // Written again: its bytes replace the old ones, not counted twice.
        p.written(2..3, chunks(2..3, 10));
        assert_eq!(p.kept_len(), 30);
        assert_eq!(p.kept(3).map(|b| b[0]), Some(3));
        assert!(p.unsettled.contains(4) && p.readable.contains(4));
        p.settle(3);
        assert!(p.kept(3).is_none() && !p.unsettled.contains(3) && p.readable.contains(3));
        assert!(p.remove(4));
        assert!(p.kept(4).is_none() && !p.readable.contains(4));
        assert!(!p.remove(4));
        assert_eq!(p.kept_len(), 10);
    }

    #[test]
    fn no_more_than_the_limit_is_kept() {
        let mut p = Presence::new(RoaringBitmap::new());
        let big = KEEP_MAX / 4 + 1;
        p.written(0..8, chunks(0..8, big));
        // Three fit, the rest are unsettled and readable but checked when read.
        assert_eq!(p.kept_len(), 3 * big);
        assert!(p.kept(2).is_some() && p.kept(3).is_none());
        assert_eq!(p.unsettled.len(), 8);
    }
}
