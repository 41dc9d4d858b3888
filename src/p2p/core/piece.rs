//! The read of one piece (a run within one stripe) from peers, as a pure state machine: ask the
//! source the [`Selector`] picks, record how it answered, ask again, until a peer serves it or
//! the choice is the origin. No I/O and no clock (callers pass `now`): vmtd's `Swarm` drives it
//! with its peer sessions, `vmt sim` with simulated ones.
//!
//! Invariants: every request the selector is told of as started is told of as finished (its
//! load count stays exact); a peer that did not serve is never asked again for this piece
//! ([`Tried`]), so a read asks at most [`crate::p2p::select::MAX_TRIES`] peers before the origin.

use std::ops::Range;
use std::time::Instant;

use crate::p2p::select::{Choice, Outcome, Selector, Tried};

/// One piece being read.
#[derive(Debug, Clone)]
pub struct PieceRead {
    run: Range<u32>,
    tried: Tried,
}

impl PieceRead {
    /// A read of `run`, which lies within one stripe ([`Selector::split`]).
    pub fn new(run: Range<u32>) -> PieceRead {
        PieceRead { run, tried: Tried::default() }
    }

    pub fn run(&self) -> Range<u32> {
        self.run.clone()
    }

    /// Where to ask next. A peer chosen counts as a request started to it: report its answer
    /// with [`PieceRead::answered`].
    pub fn next(&self, sel: &mut Selector, now: Instant) -> Choice {
        let choice = sel.choose(self.run.clone(), now, &self.tried);
        if let Choice::Peer { node, .. } = &choice {
            sel.started(node);
        }
        choice
    }

    /// `node` was chosen but not asked (this node could open no session with it): the next
    /// choice avoids it, as after a refusal, and nothing counts against it.
    pub fn passed(&mut self, sel: &mut Selector, node: &str) {
        sel.not_asked(node);
        self.tried.add(node, Outcome::Busy);
    }

    /// `node` answered with `outcome`; unless it served, the next choice avoids it.
    pub fn answered(&mut self, sel: &mut Selector, node: &str, outcome: Outcome, now: Instant) {
        sel.finished(node, self.run.clone(), outcome, now);
        if outcome != Outcome::Served {
            self.tried.add(node, outcome);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NAMES: [&str; 3] = ["10.0.0.1:7000", "10.0.0.2:7000", "10.0.0.3:7000"];

    /// The first of three nodes, knowing the others; the second holds every chunk. Returns its
    /// selector and a piece of a stripe it is the root of (no parent comes first), whose first
    /// choice is that holder, already made.
    fn asked_the_holder(now: Instant) -> (Selector, PieceRead, String) {
        let mut s = Selector::new(NAMES[0], 1, 4, 64);
        s.set_members(NAMES);
        s.have_full(NAMES[1], (0..1000).collect());
        let c = (0..1000).find(|&c| s.is_root(c, now)).unwrap();
        let p = PieceRead::new(c..c + 1);
        let Choice::Peer { node, parent: false } = p.next(&mut s, now) else { panic!("the holder") };
        assert_eq!(node, NAMES[1]);
        (s, p, node)
    }

    #[test]
    fn a_refused_piece_goes_elsewhere_and_loads_stay_exact() {
        let now = Instant::now();
        let (mut s, mut p, node) = asked_the_holder(now);
        p.answered(&mut s, &node, Outcome::NotHave, now);
        // The holder lost its claim; the piece climbs or goes to the origin, never to it again.
        match p.next(&mut s, now) {
            Choice::Peer { node, .. } => {
                assert_ne!(node, NAMES[1]);
                p.answered(&mut s, &node, Outcome::Served, now);
            }
            Choice::Origin => {}
        }
        assert!(s.usable_now(NAMES[1], now));
    }

    #[test]
    fn a_peer_passed_over_costs_it_nothing() {
        let now = Instant::now();
        let (mut s, mut p, node) = asked_the_holder(now);
        p.passed(&mut s, &node);
        assert_ne!(p.next(&mut s, now), Choice::Peer { node: node.clone(), parent: false }, "not asked again");
        // For the next piece it is the holder again: no backoff, its claim kept, its load 0.
        let q = PieceRead::new(p.run());
        assert_eq!(q.next(&mut s, now), Choice::Peer { node, parent: false });
        assert!(s.usable_now(NAMES[1], now));
    }
}
