//! Shared by the fuzz targets and the seed generator: how a target reads its input, and the
//! seed inputs each target starts from (valid values of every type, encoded by vmthunder's own
//! encoders, in the layout the target expects).
//!
//! Most targets take a leading selector byte that picks which parser or which mode runs, so one
//! target covers a family of related parsers and its corpus keeps inputs for each of them.
//! Checksummed formats are also fuzzed in a "resealed" mode, where the target recomputes the
//! checksum over the mutated bytes, so the fuzzer reaches the decoder behind the check instead of
//! stopping at it.

pub mod seeds;

/// A cursor over fuzz input that never fails: reads past the end give zeros or empty slices, so
/// every input means something.
pub struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    pub fn new(data: &'a [u8]) -> Input<'a> {
        Input { data }
    }

    pub fn u8(&mut self) -> u8 {
        match self.data.split_first() {
            Some((&b, rest)) => {
                self.data = rest;
                b
            }
            None => 0,
        }
    }

    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }

    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }

    /// Up to `n` bytes (fewer at the end of the input).
    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let (head, rest) = self.data.split_at(n.min(self.data.len()));
        self.data = rest;
        head
    }

    /// Exactly `N` bytes, zero-padded at the end of the input.
    pub fn array<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        let b = self.bytes(N);
        out[..b.len()].copy_from_slice(b);
        out
    }

    /// Everything left.
    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.data)
    }
}
