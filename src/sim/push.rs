//! What if relays pushed (`vmt sim --push`)? vmtd does not: a relay sends a run only when a
//! child asks for it. Pushing, a node that obtains a run (from its parent, the origin, a push,
//! for its guest, its prefetch or an asker) sends each of its children in that stripe's tree
//! at once the chunks of it the child neither holds nor fetches (as runs), so
//! runs flood down every tree at link rate and every node is "ahead" of its subtree in every
//! tree, not in one only. Modelled coarsely, to weigh the change before building it:
//!
//! - A node's children in tree c are the nodes whose own view made it their parent in c
//!   (`Selector::parent`) at their last heartbeat, and that hold a session with it (the push
//!   rides the child's session to its parent: no session is opened for it).
//! - A push is a reply nobody asked for: it reserves the sender's upload budget (per session and
//!   node-wide; refused, it is not sent), waits for one of its upload slots (FIFO with replies),
//!   costs the same CPU at both ends and crosses the sender's up link and the child's down link.
//!   No request message, so no request latency; one hop's latency on delivery.
//! - At the child the run is in flight from the moment the push is decided: the child's reads
//!   and its children's requests for those chunks wait for it rather than ask. Once stored, the
//!   child pushes on. Pushes never go to the origin, so origin egress stays what the pulls need.
//! - With `--cut-through`, a push starts as soon as the sender's own fetch starts receiving and
//!   ends no earlier than one chunk time after it (an early reply, `cut.rs`).
//! - A push lost to a kill leaves its chunks to an ordinary fetch if a read, a prefetch or an
//!   asking child waits on them; pushes on to the node's own children only fail with it.
//!
//! Not modelled: the parent knows at once which nodes take it as their parent and what each
//! holds and fetches (vmtd's would learn it from messages: a child saying so, and have-maps up
//! to 250 ms old, so it could push what a child is already fetching elsewhere); a child that lacks a run but will never read it still gets it (with one image
//! and no profile every node reads the same working set, so nothing is wasted; with a profile,
//! its prefetch asks for the same runs anyway); no prioritisation of asked replies over pushes;
//! the children list is a snapshot per heartbeat (a parent that fails between two is still
//! pushed to from above).

use std::ops::Range;

use super::engine::{Req, Sim, Wait, Want};
use crate::fetch::flight::runs;
use crate::p2p::core::tree::class_of;

/// Pushes' serials (a request's serial is its number, far below).
const PUSH_SERIAL: u64 = 1 << 62;

/// Whether a request's serial is a push's.
pub(super) fn is_push(serial: u64) -> bool {
    serial & PUSH_SERIAL != 0
}

impl Sim<'_> {
    /// Whether relays push (relay strategies with `--push`).
    pub(super) fn pushes(&self) -> bool {
        self.p.push && self.strategy.relays()
    }

    /// Node `i`'s parent in each tree as its view gives it now; the children lists follow.
    pub(super) fn refresh_parents(&mut self, i: u32) {
        if !self.pushes() {
            return;
        }
        let now = self.instant();
        for c in 0..self.p.classes {
            // Stripe c is of class c.
            let chunk = c * self.w.stripe_chunks;
            let name = self.nodes[i as usize].sel.as_ref().and_then(|s| s.parent(chunk, now)).map(str::to_string);
            let parent = name.and_then(|n| self.index(&n));
            let c = c as usize;
            let old = self.nodes[i as usize].parent_of[c];
            if old == parent {
                continue;
            }
            if let Some(o) = old {
                self.nodes[o as usize].children[c].retain(|&x| x != i);
            }
            if let Some(q) = parent {
                self.nodes[q as usize].children[c].push(i);
            }
            self.nodes[i as usize].parent_of[c] = parent;
        }
    }

    /// Node `i` obtained `run` (or, cut through, started receiving it in its flight `from`): it
    /// pushes to each child in the run's tree the chunks that child neither holds nor fetches.
    pub(super) fn push_run(&mut self, i: u32, run: Range<u32>, from: Option<u32>) {
        if !self.pushes() || run.is_empty() {
            return;
        }
        let n = &self.nodes[i as usize];
        if !n.alive || n.liar {
            return;
        }
        let c = class_of(run.start / self.w.stripe_chunks, self.p.classes) as usize;
        let mut todo: Vec<(u32, Range<u32>)> = Vec::new();
        for &j in &n.children[c] {
            let k = &self.nodes[j as usize];
            if !k.alive || !k.sessions_out.contains(&i) || k.parent_of[c] != Some(i) {
                continue;
            }
            let lacks: Vec<(u32, ())> =
                run.clone().filter(|x| !k.cache.contains(*x) && !k.inflight.contains_key(x)).map(|x| (x, ())).collect();
            for part in runs(lacks, u32::MAX, None) {
                todo.push((j, part[0].0..part[part.len() - 1].0 + 1));
            }
        }
        for (j, r) in todo {
            self.push_to(i, j, r, from);
        }
    }

    /// Node `i` pushes `run` to its child `j` (cut through: while its flight `from` arrives).
    fn push_to(&mut self, i: u32, j: u32, run: Range<u32>, from: Option<u32>) {
        let bytes = u64::from(run.end - run.start) * self.p.chunk_size;
        let Some(reserved) = self.reserve_upload(i, j, bytes, true) else {
            self.c.pushes_refused += 1;
            return;
        };
        self.c.pushes += 1;
        self.c.push_bytes += bytes;
        let f = self.new_flight(j, run.clone(), true);
        let r = self.reqs.insert(Req::new(PUSH_SERIAL | self.c.pushes, j, i, f, run, bytes, reserved));
        self.nodes[i as usize].serving.insert(r);
        if let Some(g) = from.filter(|&g| self.flights.get(g).is_some()) {
            // Cut through: an early reply, settled when the sender's own flight ends.
            let w = self.waits.insert(Wait { node: i, pending: 1, unstarted: 0, failed: false, want: Want::Serve(r) });
            if let Some(fl) = self.flights.get_mut(g) {
                fl.waits.push(w);
            }
            if let Some(q) = self.reqs.get_mut(r) {
                q.wait = Some(w);
                q.early = true;
            }
        }
        self.want_slot(r);
    }

    /// The push feeding flight `f` broke (its sender was killed, or its own fetch failed): what
    /// waits on the chunks (a read, a prefetch, a child that asked) is fetched as any miss. With
    /// no one waiting but pushes on to this node's children (cut through), they are let go and
    /// the pushes on fail with them, each child then on its own: a push never makes a node fetch
    /// what nobody asked for, from its parent or the origin.
    pub(super) fn push_lost(&mut self, f: u32) {
        self.c.pushes_lost += 1;
        let Some(waits) = self.flights.get(f).map(|fl| fl.waits.clone()) else { return };
        let unasked = waits.iter().all(|&w| match self.waits.get(w).map(|wt| wt.want) {
            Some(Want::Serve(r)) => self.reqs.get(r).is_some_and(|q| is_push(q.serial)),
            Some(Want::Dropped) | None => true,
            Some(Want::Read(_) | Want::Prefetch) => false,
        });
        if unasked {
            self.flight_done(f, true);
            return;
        }
        if let Some(fl) = self.flights.get_mut(f) {
            fl.pushed = false;
        }
        self.start_fetch(f);
    }
}
