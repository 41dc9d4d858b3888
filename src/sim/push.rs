//! Relays that push (vmtd's `p2p.push`, on by default; `vmt sim --push false` turns it off): a
//! node that obtains a run (from its parent, the origin, a push, for its guest, its prefetch or
//! an asker) sends each of its children in that stripe's tree the chunks of it the child
//! neither holds nor fetches (as runs), so runs flow down the tree ahead of the guests. As
//! vmtd's, modelled coarsely:
//!
//! - A node's children in tree c are the nodes whose own view made it their parent in c
//!   (`Selector::parent`) at their last heartbeat, and that hold a session with it (the push
//!   rides the child's session to its parent: no session is opened for it).
//! - A push is a reply nobody asked for: it reserves the sender's upload budget within half of
//!   it (`UploadBudget::reserve_push`; refused, it is not sent), waits for one of its upload
//!   slots (FIFO with replies), costs the same CPU at both ends and crosses the sender's up link
//!   and the child's down link. No request message, so no request latency; one hop's latency
//!   on delivery. At most [`PUSH_WINDOW`] pushes to one child wait to be sent; the runs obtained
//!   meanwhile wait in that child's backlog, oldest first, and are pushed as places free up
//!   (what the child has come to hold or fetch meanwhile left out).
//! - At the child the run is in flight from the moment the push is decided: the child's reads
//!   and its children's requests for those chunks wait for it rather than ask. Once stored, the
//!   child pushes on. Pushes never go to the origin, so origin egress stays what the pulls need.
//! - With `--push-cut-through` (the default, as vmtd's), the push of a run the sender fetches
//!   from a peer starts as soon as that fetch starts receiving and ends no earlier than one
//!   check unit's time after it (an early reply, `cut.rs`): vmtd offers it with its first
//!   chunks and sends each chunk on in a `PushPart` as it arrives. A run from the origin
//!   arrives whole in vmtd and is pushed once it is in.
//! - A node's boot log is the runs it obtained in its first [`BOOT_WINDOW`] of being active (at
//!   most [`BOOT_LOG_RUNS`] and [`BOOT_LOG_BYTES`]), in order; when a child that is active takes
//!   it as its parent in trees where it was not its parent in any tree before (vmtd: at a
//!   session's first `Adopt`), the log's runs of those trees go first into the child's backlog
//!   (`--push-boot`). vmtd seeds a backlog once per session, so again after a session to the
//!   same parent was closed and opened anew; here sessions are not closed, and a node that
//!   becomes a parent again after a while is one again and seeds again.
//! - A push lost to a kill leaves its chunks to an ordinary fetch if a read, a prefetch or an
//!   asking child waits on them; pushes on to the node's own children only fail with it.
//!
//! Where vmtd differs: its parent knows at once which nodes take it as their parent (they say
//! so with `Adopt` when their view changes) and learns what a child holds from the `Adopt`'s
//! have-map and what it asks for, not what it fetches elsewhere (so it may push a run a child
//! is fetching from the origin after a refusal, a duplicate the model leaves out); its session
//! writer sends a push only when no asked reply waits (here they share the links); a push that
//! finds no room waits for it there and is dropped here. A child that lacks a run but will never
//! read it still gets it (with one image and no profile every node reads the same working set,
//! so nothing is wasted; with a profile, its prefetch asks for the same runs anyway); the
//! children list is a snapshot per heartbeat (a parent that fails between two is still pushed
//! to from above).

use std::ops::Range;

use super::engine::{Req, Sim, Wait, Want};
use crate::fetch::flight::{runs, BOOT_LOG_BYTES, BOOT_LOG_RUNS, BOOT_WINDOW};
use crate::p2p::core::tree::class_of;

/// Pushes one node has reserved and not yet sent to one child, as vmtd's `PUSH_WINDOW`.
const PUSH_WINDOW: u32 = 2;

/// Most runs waiting in one child's backlog, as vmtd's; past it the oldest is dropped.
const MAX_BACKLOG: usize = 2048;

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

    /// Node `i` begins reading (its guest or its prefetch): it takes its parents now.
    pub(super) fn activate(&mut self, i: u32) {
        if !std::mem::replace(&mut self.nodes[i as usize].active, true) {
            self.nodes[i as usize].active_at = self.now;
            self.refresh_parents(i);
        }
    }

    /// Node `i`'s parent in each tree as its view gives it now (none before it is active); the
    /// children lists follow.
    pub(super) fn refresh_parents(&mut self, i: u32) {
        if !self.pushes() {
            return;
        }
        let active = self.nodes[i as usize].active;
        let now = self.instant();
        // The parents before this view: a tree's boot goes with the first adoption of a node in
        // this round too (as in one `Adopt` naming several trees).
        let before = self.nodes[i as usize].parent_of.clone();
        for c in 0..self.p.classes {
            // Stripe c is of class c.
            let chunk = c * self.w.stripe_chunks;
            let name = self.nodes[i as usize]
                .sel
                .as_ref()
                .filter(|_| active)
                .and_then(|s| s.parent(chunk, now))
                .map(str::to_string);
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
            let adopted_before = parent.is_some_and(|q| before.contains(&Some(q)));
            self.nodes[i as usize].parent_of[c] = parent;
            if let Some(q) = parent.filter(|_| self.p.push_boot && !adopted_before) {
                self.push_boot(q, i, c);
            }
        }
    }

    /// Node `i` obtained `run` (or, with `--push-cut-through`, started receiving it in its flight
    /// `from`): it pushes to each child in the run's tree the chunks that child neither holds nor
    /// fetches.
    pub(super) fn push_run(&mut self, i: u32, run: Range<u32>, from: Option<u32>) {
        if !self.pushes() || run.is_empty() {
            return;
        }
        let (now, bytes) = (self.now, u64::from(run.end - run.start) * self.p.chunk_size);
        let n = &mut self.nodes[i as usize];
        if !n.alive || n.liar {
            return;
        }
        // Once per run: with `--push-cut-through`, it is also handed on as it starts arriving
        // (`from`).
        let (log, logged) = &mut n.boot_log;
        if from.is_none()
            && n.active
            && now - n.active_at <= BOOT_WINDOW.as_nanos() as u64
            && log.len() < BOOT_LOG_RUNS
            && *logged + bytes <= BOOT_LOG_BYTES
        {
            log.push(run.clone());
            *logged += bytes;
        }
        let c = class_of(run.start / self.w.stripe_chunks, self.p.classes) as usize;
        let children = n.children[c].clone();
        for j in children {
            // As vmtd's: the run joins the session's backlog, pushed as places free up.
            let backlog = &mut self.nodes[i as usize].pushes_out.entry(j).or_default().1;
            backlog.push_back((run.clone(), from));
            if backlog.len() > MAX_BACKLOG {
                backlog.pop_front();
            }
            self.pump(i, j);
        }
    }

    /// Child `j` took node `i` as its parent in tree `c` (and in no other before): the runs of
    /// `i`'s boot in that tree go first into `j`'s backlog.
    fn push_boot(&mut self, i: u32, j: u32, c: usize) {
        let (classes, stripe) = (self.p.classes, self.w.stripe_chunks);
        let n = &mut self.nodes[i as usize];
        let log: Vec<Range<u32>> =
            n.boot_log.0.iter().filter(|r| class_of(r.start / stripe, classes) as usize == c).cloned().collect();
        if log.is_empty() {
            return;
        }
        let backlog = &mut n.pushes_out.entry(j).or_default().1;
        for r in log.into_iter().rev() {
            backlog.push_front((r, None));
        }
        backlog.truncate(MAX_BACKLOG);
        self.pump(i, j);
    }

    /// The runs of `run`'s chunks that child `j` of node `i` in tree `c` neither holds nor
    /// fetches (none if it is no longer `i`'s child there or holds no session with it).
    fn lacks(&self, i: u32, j: u32, c: usize, run: Range<u32>) -> Vec<Range<u32>> {
        let k = &self.nodes[j as usize];
        if !k.alive || !k.sessions_out.contains(&i) || k.parent_of[c] != Some(i) {
            return Vec::new();
        }
        let lacks: Vec<(u32, ())> =
            run.filter(|x| !k.cache.contains(*x) && !k.inflight.contains_key(x)).map(|x| (x, ())).collect();
        runs(lacks, u32::MAX, None).into_iter().map(|part| part[0].0..part[part.len() - 1].0 + 1).collect()
    }

    /// A push of node `i` to `j` was sent (or dropped): the next runs of `j`'s backlog take its
    /// place.
    pub(super) fn push_done(&mut self, i: u32, j: u32) {
        if let Some(w) = self.nodes[i as usize].pushes_out.get_mut(&j) {
            w.0 = w.0.saturating_sub(1);
        }
        self.pump(i, j);
    }

    /// Pushes the oldest runs of `j`'s backlog at `i` while fewer than [`PUSH_WINDOW`] pushes to
    /// it wait to be sent.
    fn pump(&mut self, i: u32, j: u32) {
        loop {
            let n = &mut self.nodes[i as usize];
            if !n.alive {
                return;
            }
            let Some(w) = n.pushes_out.get_mut(&j).filter(|w| w.0 < PUSH_WINDOW) else { return };
            let Some((run, from)) = w.1.pop_front() else { return };
            let c = class_of(run.start / self.w.stripe_chunks, self.p.classes) as usize;
            // A run that waited may outlive its flight, whose slot a later flight then holds.
            let from = from.filter(|&g| {
                self.flights.get(g).is_some_and(|fl| fl.node == i && fl.run.start <= run.start && run.end <= fl.run.end)
            });
            let mut parts = self.lacks(i, j, c, run.clone()).into_iter();
            while let Some(part) = parts.next() {
                if !self.push_to(i, j, part.clone(), from) {
                    // No room in the budget: dropped, as vmtd's would wait (the child asks).
                    continue;
                }
                let w = self.nodes[i as usize].pushes_out.entry(j).or_default();
                if w.0 >= PUSH_WINDOW {
                    if let Some(next) = parts.next() {
                        w.1.push_front((next.start..run.end, from));
                    }
                    return;
                }
            }
        }
    }

    /// Node `i` pushes `run` to its child `j` (`--push-cut-through`: while its flight `from`
    /// arrives); false when its budget has no room.
    fn push_to(&mut self, i: u32, j: u32, run: Range<u32>, from: Option<u32>) -> bool {
        let bytes = u64::from(run.end - run.start) * self.p.chunk_size;
        let Some(reserved) = self.reserve_upload(i, j, bytes, true) else {
            self.c.pushes_refused += 1;
            return false;
        };
        self.nodes[i as usize].pushes_out.entry(j).or_default().0 += 1;
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
        true
    }

    /// The push feeding flight `f` broke (its sender was killed, or its own fetch failed): what
    /// waits on the chunks (a read, a prefetch, a child that asked) is fetched as any miss. With
    /// no one waiting but pushes on to this node's children (`--push-cut-through`), they are let
    /// go and the pushes on fail with them, each child then on its own: a push never makes a node
    /// fetch what nobody asked for, from its parent or the origin.
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
