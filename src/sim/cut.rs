//! What if relays cut through (`vmt sim --cut-through`)? vmtd does not yet: a relay sends a run
//! once all of it is in and checked. Cut through, it would pass each chunk on as it arrives and
//! is checked. Modelled coarsely, to weigh the change before building it: a reply starts once
//! every fetch it waits on has started receiving (a reply from the origin or from a peer whose
//! bytes flow), shares the links like any reply, and its last byte is delivered no earlier than
//! one chunk time over the node link after the last of those fetches ended. A fetch that fails
//! under an early reply breaks it (the asker sees its connection drop, `Lost`).
//!
//! Invariant: an early reply is delivered exactly once, by whichever comes last of its own last
//! byte ([`Sim::reply_sent`]) and its fetches' end ([`Sim::early_upstream_done`]).

use super::engine::{Ev, Sim, Want};
use crate::p2p::select::Outcome;

impl Sim<'_> {
    /// CPU per chunk of a reply, at either end.
    pub(super) fn chunk_cpu(&self) -> f64 {
        if self.p.cut_through {
            self.p.cpu_per_request + self.p.chunk_size as f64 * self.p.cpu_per_byte
        } else {
            0.0
        }
    }

    /// When a reply's CPU work of `cost`, done by `done` on its node's CPU, holds it up: all of
    /// it before the first byte without cut-through; cut through, chunk by chunk alongside the
    /// transfer, so only the one chunk at an end.
    pub(super) fn pipelined(&self, done: f64, cost: f64) -> f64 {
        if self.p.cut_through {
            done - (cost - self.chunk_cpu()).max(0.0)
        } else {
            done
        }
    }

    /// Flight `f` started receiving: replies that now wait on no fetch still silent start.
    pub(super) fn receiving(&mut self, f: u32) {
        if !self.p.cut_through || !self.strategy.relays() {
            return;
        }
        let Some(fl) = self.flights.get_mut(f) else { return };
        if fl.receiving {
            return;
        }
        fl.receiving = true;
        let waits = fl.waits.clone();
        for w in waits {
            let Some(wt) = self.waits.get_mut(w) else { continue };
            let Want::Serve(r) = wt.want else { continue };
            wt.unstarted = wt.unstarted.saturating_sub(1);
            if wt.unstarted == 0 {
                self.start_early(r);
            }
        }
    }

    /// Starts request `r`'s reply before its chunks are all at its server.
    pub(super) fn start_early(&mut self, r: u32) {
        if !self.p.cut_through || !self.strategy.relays() {
            return;
        }
        let Some(q) = self.reqs.get_mut(r) else { return };
        if q.early {
            return;
        }
        q.early = true;
        self.want_slot(r);
    }

    /// The fetches request `r` waited on ended (or failed). True if `r` is an early reply, which
    /// this settles; false if it is an ordinary one, which the caller serves now.
    pub(super) fn early_upstream_done(&mut self, r: u32, failed: bool) -> bool {
        let Some(q) = self.reqs.get_mut(r) else { return true };
        if !q.early {
            return false;
        }
        if failed || !self.nodes[q.server as usize].alive {
            // The server cannot finish what it began: the connection breaks mid-reply.
            let (j, flow) = (q.server, q.flow.take());
            if let Some(id) = flow {
                self.cancel_flow(id);
            }
            self.nodes[j as usize].slot_queue.retain(|&x| x != r);
            self.release(r);
            let lat = self.lat();
            self.after(lat, Ev::AtClient(r, Outcome::Lost));
            return true;
        }
        q.upstream_done = Some(self.now);
        if q.sent {
            self.deliver(r);
        }
        true
    }
}
