//! A relay's cut-through reply as it goes: [`Emit`] hands the chunks of a reply, all but the
//! last, to the peer connection in order, each as soon as it is verified; it stops at the first
//! chunk that is not next or that the connection no longer takes. What it did not send goes as
//! the reply's answer once all is in.

use std::sync::Arc;

use tokio::sync::watch;

use super::{Outcome, RunData};

/// Where [`Fetcher::ensure_parts`](super::Fetcher::ensure_parts) sends the chunks it hands on
/// early (the peer connection's own kind of channel: the parts of one request).
pub use crate::p2p::peer::Parts;

/// A cut-through reply's progress: the next chunk to send, and the reply's end.
pub(super) struct Emit<'a> {
    g: crate::image::Geometry,
    tx: &'a Parts,
    next: u32,
    end: u32,
    on: bool,
}

impl<'a> Emit<'a> {
    /// A reply of the chunks `range`, none sent yet.
    pub(super) fn new(g: crate::image::Geometry, tx: &'a Parts, range: std::ops::Range<u32>) -> Self {
        Emit { g, tx, next: range.start, end: range.end, on: true }
    }

    /// The first chunk not sent: the rest of the reply.
    pub(super) fn next(&self) -> u32 {
        self.next
    }

    /// Chunk `i` arrived in `run`: sent on if it is the next, with the chunks after it that
    /// came in the same run (`ahead`: the waits after it, in order), all but the reply's last.
    pub(super) fn chunk(&mut self, i: u32, run: &Arc<RunData>, ahead: &[(u32, watch::Receiver<Outcome>)]) {
        // A chunk sent already (waited on again in a later pass) changes nothing.
        if !self.on || i < self.next {
            return;
        }
        if i != self.next {
            self.on = false;
            return;
        }
        let mut end = i + 1;
        for (j, rx) in ahead {
            let same = matches!(&*rx.borrow(), Some(Ok(r)) if Arc::ptr_eq(r, run));
            if *j != end || !same {
                break;
            }
            end += 1;
        }
        let end = end.min(self.end - 1);
        if end <= i {
            return;
        }
        // A part of a much longer run is a copy (see `share_or_copy`).
        let bytes = self.g.run_bytes(i..end).and_then(|(offset, len)| run.share_or_copy(offset.0, len));
        let Some(bytes) = bytes else {
            self.on = false;
            return;
        };
        if self.tx.send((i..end, bytes)).is_err() {
            self.on = false;
            return;
        }
        self.next = end;
    }
}
