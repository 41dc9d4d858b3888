//! The simulated network: links of fixed capacity shared by the flows that cross them.
//!
//! Each flow crosses two links, its sender's up link and its receiver's down link. Sharing is
//! processor sharing, not FIFO booking: a link's fair share is its capacity over the flows that
//! cross it now. A flow is bound, when it starts, to the link of its path with the smaller fair
//! share (its bottleneck then), and progresses at that link's fair share for its whole life.
//! This is max-min fairness whenever a flow's bottleneck does not move while it lasts (the
//! common case in a storm: the origin's link, or a holder's up link, stays the bottleneck);
//! when it moves, the flow keeps the rate of its first bottleneck. In exchange, every start and
//! end costs O(log n) on the two links it touches, whatever the number of flows: each link keeps
//! a virtual clock (bytes served per flow so far) and its bound flows ordered by the clock value
//! at which they finish, so only the link's next completion is ever scheduled.
//!
//! A link may have a token bucket (`tc tbf`'s `burst`, as the testbed's links do): while it is
//! idle it saves up to `burst` bytes at its rate, and a flow that starts takes what both its
//! links have saved as bytes sent at once; only the rest shares the links' rates.
//!
//! Invariant: a link's `crossing` counts every live flow that crosses it, bound there or not.

use std::collections::BTreeSet;

/// Identifies a link.
pub type LinkId = u32;
/// Identifies a flow.
pub type FlowId = u32;

#[derive(Debug)]
struct Link {
    /// Bytes per second.
    cap: f64,
    /// Flows crossing it now.
    crossing: u32,
    /// Bytes each flow of fair share received since the start (the virtual clock), as of `at`.
    v: f64,
    at: f64,
    /// Bound flows by the virtual time at which they finish.
    bound: BTreeSet<(u64, FlowId)>,
    /// Bumped whenever the next completion moves: stale wake-ups are ignored.
    pub generation: u64,
    /// Bytes saved up while idle (at most the net's `burst`).
    tokens: f64,
}

impl Link {
    fn share(&self, extra: u32) -> f64 {
        self.cap / f64::from((self.crossing + extra).max(1))
    }

    fn advance(&mut self, now: f64, burst: f64) {
        if now > self.at {
            if self.crossing == 0 {
                self.tokens = (self.tokens + (now - self.at) * self.cap).min(burst);
            }
            self.v += (now - self.at) * self.share(0);
            self.at = now;
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Flow {
    up: LinkId,
    down: LinkId,
    bound: LinkId,
    finish_v: u64,
    live: bool,
}

/// All links and flows.
#[derive(Debug, Default)]
pub struct Net {
    links: Vec<Link>,
    flows: Vec<Flow>,
    free: Vec<FlowId>,
    /// Token-bucket depth of every link, bytes (0: none).
    burst: f64,
}

/// Virtual times are kept as integers (1/1024 byte) so that the ordering is exact.
const SCALE: f64 = 1024.0;

impl Net {
    /// A network whose links save up to `burst` bytes while idle (see the module doc).
    pub fn with_burst(burst: u64) -> Net {
        Net { burst: burst as f64, ..Net::default() }
    }

    /// A link of `bytes_per_s` capacity.  It starts with a full bucket.
    pub fn link(&mut self, bytes_per_s: f64) -> LinkId {
        self.links.push(Link {
            cap: bytes_per_s.max(1.0),
            crossing: 0,
            v: 0.0,
            at: 0.0,
            bound: BTreeSet::new(),
            generation: 0,
            tokens: self.burst,
        });
        (self.links.len() - 1) as LinkId
    }

    /// Starts a flow of `bytes` from `up` to `down` at `now` (seconds); returns it and the links
    /// whose next completion moved (to be rescheduled with [`Net::next_completion`]).
    pub fn start(&mut self, up: LinkId, down: LinkId, bytes: u64, now: f64) -> (FlowId, [LinkId; 2]) {
        for l in [up, down] {
            self.links[l as usize].advance(now, self.burst);
        }
        let saved = self.links[up as usize].tokens.min(self.links[down as usize].tokens).min(bytes as f64);
        for l in [up, down] {
            self.links[l as usize].tokens -= saved;
        }
        let bytes = (bytes as f64 - saved).max(1.0) as u64;
        let (su, sd) = (self.links[up as usize].share(1), self.links[down as usize].share(1));
        let bound = if su <= sd { up } else { down };
        let link = &mut self.links[bound as usize];
        let finish_v = ((link.v + bytes.max(1) as f64) * SCALE) as u64;
        let flow = Flow { up, down, bound, finish_v, live: true };
        let id = match self.free.pop() {
            Some(id) => {
                self.flows[id as usize] = flow;
                id
            }
            None => {
                self.flows.push(flow);
                (self.flows.len() - 1) as FlowId
            }
        };
        link.bound.insert((finish_v, id));
        for l in [up, down] {
            let l = &mut self.links[l as usize];
            l.crossing += 1;
            l.generation += 1;
        }
        (id, [up, down])
    }

    /// Ends flow `id` (done or cancelled) at `now`; returns the links whose next completion moved.
    pub fn end(&mut self, id: FlowId, now: f64) -> Option<[LinkId; 2]> {
        let f = *self.flows.get(id as usize).filter(|f| f.live)?;
        for l in [f.up, f.down] {
            self.links[l as usize].advance(now, self.burst);
        }
        self.links[f.bound as usize].bound.remove(&(f.finish_v, id));
        for l in [f.up, f.down] {
            let l = &mut self.links[l as usize];
            l.crossing = l.crossing.saturating_sub(1);
            l.generation += 1;
        }
        self.flows[id as usize].live = false;
        self.free.push(id);
        Some([f.up, f.down])
    }

    /// When the next flow bound to `link` finishes (seconds), that flow, and the link's
    /// generation now; `None` if no flow is bound there.
    pub fn next_completion(&mut self, link: LinkId, now: f64) -> Option<(f64, FlowId, u64)> {
        let burst = self.burst;
        let l = &mut self.links[link as usize];
        l.advance(now, burst);
        let &(finish_v, id) = l.bound.first()?;
        let left = (finish_v as f64 / SCALE - l.v).max(0.0);
        Some((now + left / l.share(0), id, l.generation))
    }

    /// Whether `generation` is still `link`'s (its scheduled completion is not stale).
    pub fn current(&self, link: LinkId, generation: u64) -> bool {
        self.links[link as usize].generation == generation
    }

    pub fn is_live(&self, id: FlowId) -> bool {
        self.flows.get(id as usize).is_some_and(|f| f.live)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flows_share_a_link_fairly_and_speed_up_when_one_ends() {
        let mut n = Net::default();
        let origin = n.link(100.0);
        let (a, b) = (n.link(1000.0), n.link(1000.0));
        let (f1, _) = n.start(origin, a, 100, 0.0);
        let (f2, _) = n.start(origin, b, 300, 0.0);
        // Both bound to the origin's link at 50 B/s: f1 ends at 2 s.
        let (t, id, _) = n.next_completion(origin, 0.0).unwrap();
        assert_eq!(id, f1);
        assert!((t - 2.0).abs() < 1e-6, "{t}");
        n.end(f1, t);
        // f2 has 200 B left at 100 B/s: ends at 4 s.
        let (t2, id, _) = n.next_completion(origin, t).unwrap();
        assert_eq!(id, f2);
        assert!((t2 - 4.0).abs() < 1e-6, "{t2}");
    }

    #[test]
    fn an_idle_links_bucket_sends_at_once_and_refills_only_while_idle() {
        let mut n = Net::with_burst(50);
        let (a, b) = (n.link(100.0), n.link(100.0));
        // 50 of 150 bytes go at once: the flow ends after 100 bytes at 100 B/s.
        let (f, _) = n.start(a, b, 150, 0.0);
        let (t, _, _) = n.next_completion(a, 0.0).unwrap();
        assert!((t - 1.0).abs() < 1e-6, "{t}");
        n.end(f, t);
        // Idle for 0.2 s: 20 bytes saved; a 120-byte flow then takes 1 s.
        let (_, _) = n.start(a, b, 120, t + 0.2);
        let (t2, _, _) = n.next_completion(a, t + 0.2).unwrap();
        assert!((t2 - (t + 1.2)).abs() < 1e-6, "{t2}");
    }
}
