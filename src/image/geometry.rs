//! Units and the chunk grid of an image. Every byte offset the daemon handles is turned into
//! chunk indices here and only here, so rounding lives in one place.
//!
//! Invariants: a [`ChunkSize`] is a power of two in 4 KiB..=4 MiB; every chunk but the last is
//! exactly one chunk size long; the last chunk ends at the image size.

use std::fmt;
use std::ops::Range;

use thiserror::Error;

/// Smallest chunk size accepted (one page: smaller chunks only add bookkeeping).
pub const MIN_CHUNK_SIZE: u64 = 4 << 10;
/// Largest chunk size accepted (bigger chunks make a guest's first read wait too long).
pub const MAX_CHUNK_SIZE: u64 = 4 << 20;

/// Errors of the chunk grid.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum GeometryError {
    /// The chunk size is not a power of two in the accepted range.
    #[error("chunk size {0} must be a power of two between 4KiB and 4MiB")]
    BadChunkSize(u64),
    /// The image has more chunks than a 32-bit chunk index can name.
    #[error("image of {size} bytes has too many chunks of {chunk} bytes (at most 2^32 - 1)")]
    TooManyChunks { size: u64, chunk: u64 },
    /// The image is empty.
    #[error("image size is zero")]
    Empty,
}

/// Index of a chunk within one image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ChunkIdx(pub u32);

impl fmt::Display for ChunkIdx {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "chunk {}", self.0)
    }
}

/// A byte offset into an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ByteOffset(pub u64);

/// A validated chunk size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ChunkSize(u32);

impl ChunkSize {
    /// The default: 64 KiB balances fetch latency against per-chunk overhead.
    pub const DEFAULT: ChunkSize = ChunkSize(64 << 10);

    pub fn new(bytes: u64) -> Result<Self, GeometryError> {
        if bytes.is_power_of_two() && (MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&bytes) {
            Ok(ChunkSize(bytes as u32))
        } else {
            Err(GeometryError::BadChunkSize(bytes))
        }
    }

    pub fn bytes(self) -> u64 {
        u64::from(self.0)
    }

    fn shift(self) -> u32 {
        self.0.trailing_zeros()
    }
}

impl fmt::Display for ChunkSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", crate::config::format_size(self.bytes()))
    }
}

/// The chunk grid of one image: its size and chunk size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Geometry {
    image_size: u64,
    chunk_size: ChunkSize,
}

impl Geometry {
    pub fn new(image_size: u64, chunk_size: ChunkSize) -> Result<Self, GeometryError> {
        if image_size == 0 {
            return Err(GeometryError::Empty);
        }
        let g = Geometry { image_size, chunk_size };
        if g.chunk_count_u64() > u64::from(u32::MAX) {
            return Err(GeometryError::TooManyChunks { size: image_size, chunk: chunk_size.bytes() });
        }
        Ok(g)
    }

    pub fn image_size(&self) -> u64 {
        self.image_size
    }

    pub fn chunk_size(&self) -> ChunkSize {
        self.chunk_size
    }

    fn chunk_count_u64(&self) -> u64 {
        self.image_size.div_ceil(self.chunk_size.bytes())
    }

    pub fn chunk_count(&self) -> u32 {
        self.chunk_count_u64() as u32
    }

    /// Byte offset where `idx` starts.
    pub fn chunk_offset(&self, idx: ChunkIdx) -> ByteOffset {
        ByteOffset(u64::from(idx.0) << self.chunk_size.shift())
    }

    /// Length of chunk `idx` in bytes (shorter than the chunk size only for the last chunk).
    pub fn chunk_len(&self, idx: ChunkIdx) -> usize {
        let start = self.chunk_offset(idx).0;
        (self.image_size.saturating_sub(start)).min(self.chunk_size.bytes()) as usize
    }

    /// Where the adjacent chunks `run` lie: their first byte and their length in bytes, or
    /// `None` for an empty run or one reaching past the last chunk.
    pub fn run_bytes(&self, run: Range<u32>) -> Option<(ByteOffset, usize)> {
        if run.is_empty() || run.end > self.chunk_count() {
            return None;
        }
        let last = ChunkIdx(run.end - 1);
        let start = self.chunk_offset(ChunkIdx(run.start)).0;
        Some((ByteOffset(start), (self.chunk_offset(last).0 + self.chunk_len(last) as u64 - start) as usize))
    }

    /// Chunks covering `len` bytes from `offset`, clipped to the image. Empty for `len == 0`.
    pub fn chunks_covering(&self, offset: ByteOffset, len: u64) -> Range<u32> {
        if len == 0 || offset.0 >= self.image_size {
            return 0..0;
        }
        let end = offset.0.saturating_add(len).min(self.image_size);
        let first = (offset.0 >> self.chunk_size.shift()) as u32;
        let last = ((end - 1) >> self.chunk_size.shift()) as u32;
        first..last + 1
    }

    /// True when `len` bytes from `offset` lie inside the image.
    pub fn contains(&self, offset: u64, len: u64) -> bool {
        within(offset, len, self.image_size)
    }
}

/// True when `len` bytes from `offset` end at or before `size` (no overflow).
pub fn within(offset: u64, len: u64, size: u64) -> bool {
    offset.checked_add(len).is_some_and(|end| end <= size)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn chunk_size_bounds() {
        assert!(ChunkSize::new(4096).is_ok());
        assert!(ChunkSize::new(4 << 20).is_ok());
        assert_eq!(ChunkSize::new(2048), Err(GeometryError::BadChunkSize(2048)));
        assert_eq!(ChunkSize::new(8 << 20), Err(GeometryError::BadChunkSize(8 << 20)));
        assert_eq!(ChunkSize::new(65537), Err(GeometryError::BadChunkSize(65537)));
    }

    #[test]
    fn last_chunk_is_short() {
        let g = Geometry::new(10_000, ChunkSize::new(4096).unwrap()).unwrap();
        assert_eq!(g.chunk_count(), 3);
        assert_eq!(g.chunk_len(ChunkIdx(2)), 10_000 - 8192);
        assert_eq!(g.chunks_covering(ByteOffset(8000), 5000), 1..3);
        assert_eq!(g.chunks_covering(ByteOffset(0), 0), 0..0);
    }

    proptest! {
        #[test]
        fn covering_spans_exactly(size in 1u64..1 << 40, off in 0u64..1 << 40, len in 1u64..1 << 30, shift in 12u32..=22) {
            let g = Geometry::new(size, ChunkSize::new(1 << shift).unwrap());
            prop_assume!(g.is_ok());
            let g = g.unwrap();
            let r = g.chunks_covering(ByteOffset(off), len);
            if off >= size {
                prop_assert!(r.is_empty());
            } else {
                let end = (off + len).min(size);
                prop_assert!(g.chunk_offset(ChunkIdx(r.start)).0 <= off);
                let last = ChunkIdx(r.end - 1);
                prop_assert!(g.chunk_offset(last).0 + g.chunk_len(last) as u64 >= end);
                prop_assert!(g.chunk_offset(last).0 < end);
            }
        }
    }
}
