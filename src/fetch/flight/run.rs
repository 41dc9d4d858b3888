//! A run: adjacent chunks fetched in one upstream read, the unit the miss path fetches, hands
//! to its waiters and stores. Every chunk a [`RunData`] holds is verified; [`runs`] cuts the miss
//! path's upstream reads into runs (vmtd's and `vmt sim`'s alike).

use std::ops::Range;

use bytes::Bytes;

/// Verified bytes of one coalesced upstream read, starting at byte `offset` of the image.
#[derive(Debug)]
pub struct RunData {
    /// The chunks it holds, all of them verified.
    pub chunks: Range<u32>,
    pub offset: u64,
    pub bytes: Bytes,
    /// Every byte came from peers (and was verified by the peer-aware source), none from the
    /// origin.
    pub from_peers: bool,
}

impl RunData {
    /// The bytes of `[offset, offset + len)` that this run holds, if it holds all of them.
    pub fn slice(&self, offset: u64, len: usize) -> Option<&[u8]> {
        let start = offset.checked_sub(self.offset)? as usize;
        self.bytes.get(start..start.checked_add(len)?)
    }

    /// Like [`RunData::slice`], sharing the buffer instead of copying.
    pub fn share(&self, offset: u64, len: usize) -> Option<Bytes> {
        self.slice(offset, len)?;
        let start = (offset - self.offset) as usize;
        Some(self.bytes.slice(start..start + len))
    }

    /// Like [`RunData::share`], but a copy when it is under half the run (a small read of a
    /// much longer run, a prefetch's): what waits to be written then pins no more memory than
    /// the budgets of its reply charge it.
    pub fn share_or_copy(&self, offset: u64, len: usize) -> Option<Bytes> {
        let b = self.share(offset, len)?;
        Some(if b.len() * 2 >= self.bytes.len() { b } else { Bytes::copy_from_slice(&b) })
    }
}

/// Splits sorted chunk indices into runs of adjacent chunks, each at most `max` long and, with
/// `boundary`, never crossing a multiple of it. Pure: `vmt sim` plans its nodes' upstream reads
/// with it too.
pub fn runs<T>(items: Vec<(u32, T)>, max: u32, boundary: Option<u32>) -> Vec<Vec<(u32, T)>> {
    let mut out: Vec<Vec<(u32, T)>> = Vec::new();
    for (i, t) in items {
        let cut = boundary.is_some_and(|b| b > 0 && i % b == 0);
        match out.last_mut() {
            Some(run) if !cut && run.len() < max as usize && run.last().is_some_and(|(p, _)| p + 1 == i) => {
                run.push((i, t))
            }
            _ => out.push(vec![(i, t)]),
        }
    }
    out
}
