//! The guests of the simulated nodes: each replays the trace's bursts of reads (closed loop: a
//! burst starts once the previous one is answered and its think time has passed), reading
//! through its node's cache and fetches, or the origin directly; and a node's prefetch of its
//! boot profile, a few runs at a time.

use super::engine::{Ev, Read, Sim, Wait, Want};
use super::params::Strategy;

impl Sim<'_> {
    pub(super) fn burst(&mut self, i: u32) {
        let node = &self.nodes[i as usize];
        if !node.alive || node.done.is_some() {
            return;
        }
        self.activate(i);
        let Some(burst) = self.w.bursts.get(self.nodes[i as usize].burst) else {
            self.finish(i);
            return;
        };
        let rows: Vec<(u64, u64)> = burst.clone();
        // One more than the reads: the burst cannot end while its reads are being sent.
        self.nodes[i as usize].outstanding = rows.len() as u32 + 1;
        for (offset, len) in rows {
            let r = self.reads.insert(Read { node: i, issued: self.now, bytes: len });
            if self.strategy == Strategy::Direct {
                let lat = self.lat();
                self.after(lat + self.p.origin_delay, Ev::DirectStart(r));
                continue;
            }
            let cs = self.p.chunk_size;
            let chunks = (offset / cs) as u32..(offset + len).div_ceil(cs) as u32;
            let w = self.waits.insert(Wait { node: i, pending: 0, unstarted: 0, failed: false, want: Want::Read(r) });
            if self.ensure(i, chunks, w) {
                self.waits.remove(w);
                self.read_done(r, false);
            }
        }
        self.burst_step(i);
    }

    /// A guest read finished (or failed).
    pub fn read_done(&mut self, r: u32, failed: bool) {
        let Some(read) = self.reads.remove(r) else { return };
        let i = read.node;
        if !self.nodes[i as usize].alive {
            return;
        }
        self.c.stalls.push(self.now - read.issued);
        if failed {
            self.c.failed_reads += 1;
        }
        if self.p.read_overhead > 0.0 {
            self.after(self.p.read_overhead, Ev::ReadAnswered(i));
        } else {
            self.burst_step(i);
        }
    }

    /// One read (or the sending) of node `i`'s burst is done; the next burst follows the last.
    pub(super) fn burst_step(&mut self, i: u32) {
        let n = &mut self.nodes[i as usize];
        n.outstanding = n.outstanding.saturating_sub(1);
        if n.outstanding == 0 {
            n.burst += 1;
            match self.w.bursts.get(n.burst) {
                Some(_) => {
                    let think = self.w.think[n.burst];
                    self.after(think, Ev::Burst(i));
                }
                None => self.finish(i),
            }
        }
    }

    pub fn pump_prefetch(&mut self, i: u32) {
        while self.nodes[i as usize].prefetching < self.p.prefetch_concurrency {
            let Some(run) = self.nodes[i as usize].prefetch.pop_front() else { return };
            let w = self.waits.insert(Wait { node: i, pending: 0, unstarted: 0, failed: false, want: Want::Prefetch });
            if self.ensure(i, run, w) {
                self.waits.remove(w);
            } else {
                self.nodes[i as usize].prefetching += 1;
            }
        }
    }
}
