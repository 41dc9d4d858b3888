//! Upload admission, as a pure state machine: whether a peer's request gets a reply or `Busy`.
//! No I/O, no clock, never waits. vmtd's peer server and `vmt sim` ask this very type.
//!
//! Every reply reserves its length from a node-wide budget (`buffer` bytes) as its request
//! arrives, before anything is read or fetched for it, and gives it back once written (or dropped
//! with its session). A request is refused (`Busy`) when its session has `max_queue` requests
//! being answered, when its session holds a quarter of the budget already (one reply may take it
//! past that), or when the node's budget has no room for it.
//!
//! Invariant: the bytes reserved never exceed `buffer`. Reserving never waits: a relay holds its
//! reservation while it waits on other nodes, so a request that waited for bytes held that way
//! could close a cycle of waits between nodes.

/// Requests one peer session may have being answered before the next ones get `Busy`.
pub const MAX_QUEUE: usize = 512;

/// Largest reply budget: vmtd's replies count it in `u32` units.
pub const MAX_BUFFER: u64 = 2 << 30;

/// The reply budget of one node.
#[derive(Debug, Clone)]
pub struct UploadBudget {
    buffer: u64,
    max_queue: usize,
    used: u64,
    peak: u64,
}

impl UploadBudget {
    /// A node-wide budget of `buffer` bytes (1 to [`MAX_BUFFER`]), sessions of at most
    /// `max_queue` requests each.
    pub fn new(buffer: u64, max_queue: usize) -> UploadBudget {
        UploadBudget { buffer: buffer.clamp(1, MAX_BUFFER), max_queue, used: 0, peak: 0 }
    }

    /// What one session may hold before its requests get `Busy`: a quarter of the budget.
    pub fn share(&self) -> u64 {
        self.buffer / 4
    }

    /// Reserves the bytes of a reply of `len` bytes for a session that holds `session_bytes`
    /// and has `session_queued` requests being answered; `None` means `Busy`. A reply longer
    /// than the whole budget reserves all of it.
    pub fn reserve(&mut self, session_bytes: u64, session_queued: usize, len: u64) -> Option<u64> {
        if session_queued >= self.max_queue || session_bytes >= self.share() {
            return None;
        }
        let bytes = len.clamp(1, self.buffer);
        if self.used + bytes > self.buffer {
            return None;
        }
        self.used += bytes;
        self.peak = self.peak.max(self.used);
        Some(bytes)
    }

    /// Whether a push of `len` bytes can ever be reserved (a longer one would wait for ever).
    pub fn push_fits(&self, len: u64) -> bool {
        len.clamp(1, self.buffer) <= self.buffer / 2
    }

    /// Like [`UploadBudget::reserve`], for a push (a reply nobody asked for): it ranks below
    /// asked replies, so it may only take the first half of the budget, leaving the rest to them.
    pub fn reserve_push(&mut self, session_bytes: u64, session_queued: usize, len: u64) -> Option<u64> {
        if self.used + len.clamp(1, self.buffer) > self.buffer / 2 {
            return None;
        }
        self.reserve(session_bytes, session_queued, len)
    }

    /// A reply's bytes were written (or dropped).
    pub fn release(&mut self, bytes: u64) {
        self.used = self.used.saturating_sub(bytes);
    }

    /// Bytes reserved now.
    pub fn used(&self) -> u64 {
        self.used
    }

    /// Most bytes ever reserved at once.
    pub fn peak(&self) -> u64 {
        self.peak
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_queue_and_session_share_refuse() {
        let mut b = UploadBudget::new(1000, 2);
        assert_eq!(b.reserve(0, 0, 200), Some(200));
        assert_eq!(b.reserve(250, 1, 100), None, "the session holds its quarter");
        assert_eq!(b.reserve(0, 2, 1), None, "the session's queue is full");
        assert_eq!(b.reserve(0, 0, 5000), None, "a long reply waits for the whole budget");
        b.release(200);
        assert_eq!(b.reserve(0, 0, 5000), Some(1000), "and then takes all of it");
        assert_eq!(b.reserve(0, 0, 1), None);
        b.release(1000);
        assert_eq!((b.used(), b.peak()), (0, 1000));
        assert_eq!(b.reserve_push(0, 0, 400), Some(400));
        assert_eq!(b.reserve_push(0, 0, 200), None, "pushes take at most half");
        assert_eq!(b.reserve(0, 0, 500), Some(500), "asked replies take the rest");
        assert!(b.push_fits(500) && !b.push_fits(501), "a push longer than half never fits");
        b.release(900);
        assert_eq!(b.reserve_push(0, 0, 501), None, "even with the budget empty");
    }
}
