//! Relays that cut through (vmtd's way; `vmt sim --cut-through false` models store and
//! forward): a relay passes each chunk of a reply on as it arrives and is checked, rather than
//! once the whole run is in. Modelled coarsely: a reply starts once every fetch it waits on has
//! started receiving (a reply from the origin or from a peer whose bytes flow; a fetch that lost
//! its source and asks another still counts), shares the links like any reply, takes no upload
//! slot (vmtd's parts take one per frame, only while it is written), and its last byte is
//! delivered no earlier than one check unit's time over the node link after the last of those
//! fetches ended. Its CPU holds it up by one unit's share at each end; the sender's rest is
//! booked once the reply is sent, the asker's overlaps the transfer. The check unit is what a
//! relay checks before passing it on: a chunk, as in vmtd, or with `--verify-piece` (a what-if)
//! a smaller subtree of the chunk's BLAKE3 tree, checked against chaining values sent ahead of it
//! (their bytes and any cost per piece beyond the CPU per request are not charged). A run from
//! the origin is checked in whole chunks either way. Pushes of runs fetched from a peer cut
//! through too (`--push-cut-through`, on by default as in vmtd); a run from the origin arrives
//! whole in vmtd, so it is pushed once it is in. Left out: vmtd answers a
//! read waiting on a chunk as the chunk arrives; here the read waits for its run.
//!
//! Invariant: an early reply is delivered exactly once, by whichever comes last of its own last
//! byte ([`Sim::reply_sent`]) and its fetches' end ([`Sim::early_upstream_done`]); a kill that
//! ends it first drops its wait (`Want::Dropped`), so neither happens after.

use super::engine::{Ev, Sim, Want};
use crate::p2p::select::Outcome;

impl Sim<'_> {
    /// Whether replies cut through (relay strategies, unless `--cut-through false`).
    pub(super) fn cuts(&self) -> bool {
        self.p.cut_through && self.strategy.relays()
    }

    /// What a peer's reply is checked and passed on in: a chunk (vmtd), or `--verify-piece`.
    pub(super) fn check_unit(&self) -> u64 {
        self.p.verify_piece.unwrap_or(self.p.chunk_size)
    }

    /// CPU per check unit of a peer's reply, at either end.
    pub(super) fn unit_cpu(&self) -> f64 {
        self.p.cpu_per_request + self.check_unit() as f64 * self.p.cpu_per_byte
    }

    /// CPU per chunk of a run from the origin, checked at its node: always whole chunks (the
    /// origin sends plain bytes, no chaining values to check smaller pieces against).
    pub(super) fn chunk_cpu(&self) -> f64 {
        self.p.cpu_per_request + self.p.chunk_size as f64 * self.p.cpu_per_byte
    }

    /// Flight `f` started receiving: replies that now wait on no fetch still silent start.
    pub(super) fn receiving(&mut self, f: u32, from_peer: bool) {
        if !self.cuts() {
            return;
        }
        let Some(fl) = self.flights.get_mut(f) else { return };
        if fl.receiving || !self.nodes[fl.node as usize].alive {
            return;
        }
        fl.receiving = true;
        let (i, run) = (fl.node, fl.run.clone());
        let waits = fl.waits.clone();
        for w in waits {
            let Some(wt) = self.waits.get_mut(w) else { continue };
            let Want::Serve(r) = wt.want else { continue };
            wt.unstarted = wt.unstarted.saturating_sub(1);
            if wt.unstarted == 0 {
                self.start_early(r);
            }
        }
        // `--push-cut-through`: the children get a peer's run as it arrives here.
        if self.p.push_cut_through && from_peer {
            self.push_run(i, run, Some(f));
        }
    }

    /// Starts request `r`'s reply before its chunks are all at its server.
    pub(super) fn start_early(&mut self, r: u32) {
        if !self.cuts() {
            return;
        }
        let Some(q) = self.reqs.get_mut(r) else { return };
        if q.early {
            return;
        }
        q.early = true;
        self.c.early_replies += 1;
        // As vmtd's: the parts of a reply cut through take an upload slot each while they are
        // written, none while the rest is on its way (modelled as none at all).
        self.reply_cpu(r);
    }

    /// The fetches request `r` waited on ended (or failed). True if `r` is an early reply, which
    /// this settles; false if it is an ordinary one, which the caller serves now.
    pub(super) fn early_upstream_done(&mut self, r: u32, failed: bool) -> bool {
        let Some(q) = self.reqs.get_mut(r) else { return true };
        if !q.early {
            return false;
        }
        if !self.nodes[q.server as usize].serving.contains(&r) {
            // Ended by a kill already (released, its asker told).
            return true;
        }
        if failed {
            // The server cannot finish what it began: the connection breaks mid-reply. (A relay's
            // fetch falls back to the origin rather than fail; this keeps the model whole.)
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
