//! A node's miss path in the simulation: the `Fetcher`'s single flight (a miss joins the fetch of
//! its chunks in progress), its runs as `fetch::flight::runs` plans them (at most `max_fetch`,
//! never across a stripe with a relay), and where each run is read: the origin (within the
//! node's 32 origin slots with a relay), the copy-on-read parent, or the relay's choice.
//!
//! Invariant: a chunk is in a node's `inflight` map exactly while a flight holding it lasts; a
//! flight's waiters each count the flights they wait on and move on when the last one ends.

use std::ops::Range;

use super::engine::{Ev, Flight, Purpose, Sim, Want, HAVE_INTERVAL};
use super::params::Strategy;
use crate::fetch::flight::runs;
use crate::p2p::core::PieceRead;

impl Sim<'_> {
    /// Makes `chunks` present on node `i` for wait `w`; true if they are all there already.
    pub(super) fn ensure(&mut self, i: u32, chunks: Range<u32>, w: u32) -> bool {
        let mut join: Vec<u32> = Vec::new();
        let mut mine: Vec<(u32, ())> = Vec::new();
        {
            let n = &self.nodes[i as usize];
            for c in chunks {
                if n.cache.contains(c) {
                    continue;
                }
                match n.inflight.get(&c) {
                    Some(&f) => {
                        if !join.contains(&f) {
                            join.push(f)
                        }
                    }
                    None => mine.push((c, ())),
                }
            }
        }
        if join.is_empty() && mine.is_empty() {
            return true;
        }
        let boundary = self.strategy.relays().then_some(self.w.stripe_chunks);
        let max = (self.p.max_fetch / self.p.chunk_size) as u32;
        let mut new = Vec::new();
        for run in runs(mine, max, boundary) {
            let range = run[0].0..run[run.len() - 1].0 + 1;
            let f = self.new_flight(i, range, false);
            join.push(f);
            new.push(f);
        }
        for &f in &join {
            if let Some(fl) = self.flights.get_mut(f) {
                fl.waits.push(w);
            }
        }
        let unstarted = join.iter().filter(|&&f| self.flights.get(f).is_some_and(|fl| !fl.receiving)).count();
        if let Some(wt) = self.waits.get_mut(w) {
            wt.pending = join.len() as u32;
            wt.unstarted = unstarted as u32;
        }
        for f in new {
            self.start_fetch(f);
        }
        false
    }

    pub(super) fn start_fetch(&mut self, f: u32) {
        let Some(fl) = self.flights.get(f) else { return };
        let (i, run) = (fl.node, fl.run.clone());
        match self.strategy {
            Strategy::CorTree => {
                // The image's own tree, over its nodes (every `images`-th, from its number).
                let m = self.p.images;
                let rank = i / m;
                if rank == 0 {
                    self.origin_read(f);
                } else {
                    let parent = (rank - 1) / self.p.tree_fanout * m + i % m;
                    self.ask(i, parent, f, run);
                }
            }
            _ => {
                if let Some(fl) = self.flights.get_mut(f) {
                    fl.piece = Some(PieceRead::new(run));
                }
                self.next_source(f);
            }
        }
    }

    /// Reads flight `f` from the origin, within the node's origin slots (relay strategies).
    pub(super) fn origin_read(&mut self, f: u32) {
        let Some(i) = self.flights.get(f).map(|fl| fl.node) else { return };
        if self.strategy.relays() {
            let n = &mut self.nodes[i as usize];
            if n.origin_free == 0 {
                n.origin_queue.push_back(f);
                return;
            }
            n.origin_free -= 1;
        }
        let lat = self.lat();
        self.after(lat + self.p.origin_delay, Ev::OriginStart(f));
    }

    pub(super) fn origin_start(&mut self, f: u32) {
        let Some(fl) = self.flights.get(f) else { return };
        let (i, bytes) = (fl.node, u64::from(fl.run.end - fl.run.start) * self.p.chunk_size);
        if !self.nodes[i as usize].alive {
            return;
        }
        self.c.origin_bytes += bytes;
        let down = self.nodes[i as usize].down;
        self.flow(self.origin_up, down, bytes, Purpose::Origin(f));
        self.receiving(f, false);
    }

    pub(super) fn origin_done(&mut self, f: u32) {
        let Some((i, chunks)) = self.flights.get(f).map(|fl| (fl.node, fl.run.end - fl.run.start)) else { return };
        if self.strategy.relays() {
            let n = &mut self.nodes[i as usize];
            n.origin_free += 1;
            if let Some(next) = n.origin_queue.pop_front() {
                n.origin_free -= 1;
                let lat = self.lat();
                self.after(lat + self.p.origin_delay, Ev::OriginStart(next));
            }
        }
        if self.nodes[i as usize].alive {
            // The node's process receives and handles the run as it does a peer's reply (vmtd
            // also checks it against the manifest before its readers get it): the receiver's
            // share of the CPU cost, from the origin too. Cut through, only the last chunk's is
            // left once the run is in, as in `deliver`.
            let cost = f64::from(chunks) * self.p.chunk_size as f64 * self.p.cpu_per_byte + self.p.cpu_per_request;
            let verify = self.cpu(i, cost);
            let done = if self.cuts() {
                let chunk = self.chunk_cpu();
                (self.secs() + chunk).max(verify - (cost - chunk).max(0.0))
            } else {
                verify
            };
            self.at(super::engine::ns(done), Ev::OriginChecked(f));
            return;
        }
        self.fetched(f);
    }

    /// Flight `f`'s bytes arrived: it ends once the node has handled them (`fetch_overhead`).
    pub(super) fn fetched(&mut self, f: u32) {
        if self.p.fetch_overhead > 0.0 {
            self.after(self.p.fetch_overhead, Ev::Fetched(f));
        } else {
            self.flight_done(f, false);
        }
    }

    /// A new flight of `run` on node `i` (pushed to it, or to be fetched), its chunks in flight.
    pub(super) fn new_flight(&mut self, i: u32, run: Range<u32>, pushed: bool) -> u32 {
        let f = self.flights.insert(Flight {
            node: i,
            run: run.clone(),
            waits: Vec::new(),
            piece: None,
            receiving: false,
            pushed,
        });
        for c in run {
            self.nodes[i as usize].inflight.insert(c, f);
        }
        f
    }

    /// Flight `f` ended: its chunks are cached (unless it failed) and its waiters move on.
    pub(super) fn flight_done(&mut self, f: u32, failed: bool) {
        let Some(fl) = self.flights.remove(f) else { return };
        let (i, run) = (fl.node, fl.run.clone());
        {
            let n = &mut self.nodes[i as usize];
            for c in fl.run.clone() {
                if n.inflight.get(&c) == Some(&f) {
                    n.inflight.remove(&c);
                }
            }
            if !failed {
                n.cache.insert_range(fl.run.clone());
            }
        }
        if !failed && self.strategy.relays() && !self.nodes[i as usize].announcing {
            self.nodes[i as usize].announcing = true;
            self.after(HAVE_INTERVAL, Ev::Announce(i));
        }
        for w in fl.waits {
            let Some(wt) = self.waits.get_mut(w) else { continue };
            wt.failed |= failed;
            wt.pending = wt.pending.saturating_sub(1);
            if wt.pending > 0 {
                continue;
            }
            let Some(wt) = self.waits.remove(w) else { continue };
            match wt.want {
                Want::Read(r) => self.read_done(r, wt.failed),
                Want::Serve(q) => self.ready_to_serve(q, wt.failed),
                Want::Prefetch => {
                    let n = &mut self.nodes[wt.node as usize];
                    n.prefetching = n.prefetching.saturating_sub(1);
                    self.pump_prefetch(wt.node);
                }
                Want::Dropped => {}
            }
        }
        if !failed {
            // `--push`: on to the children that lack it.
            self.push_run(i, run, None);
        }
    }
}
