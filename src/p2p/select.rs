//! Source selection for one image on one node: a pure state machine, no I/O and no clock of its
//! own (callers pass `now`), so a simulator can drive this very code at any scale.
//!
//! For a run of missing chunks:
//! 1. a live peer whose have-map holds the whole run, the least loaded first;
//! 2. otherwise this node's *parent* in the run's stripe tree: every stripe of `stripe` chunks
//!    ranks the live members and this node by a rendezvous score of (node name, stripe); in that
//!    order they form a tree of fan-out `fanout` (the node at place i has the one at place
//!    (i − 1) / fanout as parent), whose root reads the stripe from the origin and every other
//!    node from its parent, which fetches it first if need be;
//! 3. the origin, when this node is the root, or when its parent failed.
//!
//! A node relays for a requester only if its own score for the stripe is higher: scores depend on
//! names and stripes alone, not on who is a member, so every relay chain climbs strictly in
//! score and can never loop, whatever each node's view of the membership. Each stripe has its
//! own tree, so every node is an inner node of some trees and a leaf of most: the uploads of a
//! storm spread over all nodes, and a node makes at most `fanout` copies of a run as a relay
//! parent (holders, chosen for their have-maps, serve outside the trees). The trees need no coordination beyond the member list, and a node that joins or dies
//! moves only the places below it. Peers that fail are avoided for a backoff that doubles with
//! each failure; peers that sent corrupt data are banned.

use std::collections::HashMap;
use std::ops::Range;
use std::time::{Duration, Instant};

use roaring::RoaringBitmap;

/// How long a peer that failed is avoided at first; doubled per consecutive failure.
pub const FIRST_DOWN: Duration = Duration::from_millis(500);
pub const MAX_DOWN: Duration = Duration::from_secs(30);
/// How long a peer that served data not matching the manifest is banned.
pub const BAN: Duration = Duration::from_secs(300);

/// Where to read a run from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Choice {
    /// Ask this peer; `parent` says it was chosen as this node's parent in the stripe's tree,
    /// not for its have-map.
    Peer {
        node: String,
        parent: bool,
    },
    Origin,
}

/// What became of a request to a peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Served,
    NotHave,
    Busy,
    /// Connection failed, broke or stalled.
    Failed,
    /// Sent data that does not match the manifest.
    Corrupt,
}

#[derive(Debug, Clone)]
struct Peer {
    /// Listed by a tracker (or configured); non-members are never asked.
    member: bool,
    hash: u64,
    have: RoaringBitmap,
    /// Requests in flight to it from this node.
    load: u32,
    down_until: Option<Instant>,
    failures: u32,
    banned_until: Option<Instant>,
}

/// Selection state of one image on one node.
#[derive(Debug, Clone)]
pub struct Selector {
    me: String,
    me_hash: u64,
    stripe: u32,
    fanout: u32,
    peers: HashMap<String, Peer>,
    bans: u64,
}

/// Counters for status output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Summary {
    pub members: u64,
    pub usable: u64,
    pub banned: u64,
    pub bans_total: u64,
    /// Chunks some usable peer is known to hold.
    pub chunks_at_peers: u64,
}

fn node_hash(name: &str) -> u64 {
    let h = blake3::hash(name.as_bytes());
    u64::from_le_bytes(h.as_bytes()[..8].try_into().expect("8 bytes"))
}

/// splitmix64's finaliser: a cheap, well-mixed score of (node, stripe).
fn score(node: u64, stripe: u32) -> u64 {
    let mut z = node ^ (u64::from(stripe).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Selector {
    /// `me` is this node's peer name (its advertised address); `stripe` the unit of the relay
    /// trees in chunks, `fanout` their fan-out (both at least 1).
    pub fn new(me: &str, stripe: u32, fanout: u32) -> Selector {
        Selector {
            me: me.into(),
            me_hash: node_hash(me),
            stripe: stripe.max(1),
            fanout: fanout.max(1),
            peers: HashMap::new(),
            bans: 0,
        }
    }

    pub fn me(&self) -> &str {
        &self.me
    }

    /// The chunks of `run` split at stripe boundaries: each piece has one tree.
    pub fn split(&self, run: Range<u32>) -> Vec<Range<u32>> {
        let mut out = Vec::new();
        let mut at = run.start;
        while at < run.end {
            let end = ((at / self.stripe + 1) * self.stripe).min(run.end);
            out.push(at..end);
            at = end;
        }
        out
    }

    /// Replaces the member list (from the trackers). Peers that left keep their state (have-map,
    /// backoff, ban): a session may outlive a short absence, and a banned peer cannot clear its
    /// ban by re-registering.
    pub fn set_members<'a>(&mut self, nodes: impl IntoIterator<Item = &'a str>) {
        for p in self.peers.values_mut() {
            p.member = false;
        }
        for n in nodes {
            if n == self.me {
                continue;
            }
            self.peers
                .entry(n.to_string())
                .or_insert_with(|| Peer {
                    member: false,
                    hash: node_hash(n),
                    have: RoaringBitmap::new(),
                    load: 0,
                    down_until: None,
                    failures: 0,
                    banned_until: None,
                })
                .member = true;
        }
    }

    /// The members, sorted.
    pub fn members(&self) -> Vec<String> {
        let mut v: Vec<String> = self.peers.iter().filter(|(_, p)| p.member).map(|(n, _)| n.clone()).collect();
        v.sort();
        v
    }

    /// A peer's full have-map arrived.
    pub fn have_full(&mut self, node: &str, have: RoaringBitmap) {
        if let Some(p) = self.peers.get_mut(node) {
            p.have = have;
        }
    }

    /// A peer gained chunks.
    pub fn have_added(&mut self, node: &str, added: &RoaringBitmap) {
        if let Some(p) = self.peers.get_mut(node) {
            p.have |= added;
        }
    }

    /// Our session with a peer ended: what it had is no longer known.
    pub fn disconnected(&mut self, node: &str) {
        if let Some(p) = self.peers.get_mut(node) {
            p.have.clear();
        }
    }

    fn usable(p: &Peer, now: Instant) -> bool {
        p.member && p.down_until.is_none_or(|t| now >= t) && p.banned_until.is_none_or(|t| now >= t)
    }

    /// This node's parent in the tree of the stripe holding `chunk`, among usable members;
    /// `None` when this node is the root.
    pub fn parent(&self, chunk: u32, now: Instant) -> Option<&str> {
        let stripe = chunk / self.stripe;
        let mine = score(self.me_hash, stripe);
        // Nodes ranked above this one, best first; this node's place is their count.
        let mut above: Vec<(u64, &str)> = self
            .peers
            .iter()
            .filter(|(_, p)| Self::usable(p, now))
            .map(|(n, p)| (score(p.hash, stripe), n.as_str()))
            .filter(|&(s, n)| (s, n) > (mine, self.me.as_str()))
            .collect();
        if above.is_empty() {
            return None;
        }
        let place = above.len();
        let parent = (place - 1) / self.fanout as usize;
        above.sort_unstable_by(|a, b| b.cmp(a));
        Some(above[parent].1)
    }

    /// Whether this node relays the stripe of `chunk` for `requester`: it must rank above it, so
    /// that every relay chain climbs towards the root (see the module doc).
    pub fn relays_for(&self, chunk: u32, requester: &str) -> bool {
        let stripe = chunk / self.stripe;
        (score(self.me_hash, stripe), self.me.as_str()) > (score(node_hash(requester), stripe), requester)
    }

    /// Whether this node is the root of the tree of the stripe of `chunk` (it reads that stripe
    /// from the origin).
    pub fn is_root(&self, chunk: u32, now: Instant) -> bool {
        self.parent(chunk, now).is_none()
    }

    /// Where to read `run` (one stripe at most, see [`Selector::split`]) from, avoiding the
    /// peers in `exclude` (already tried for this run). Once a peer refused or failed this run
    /// (`exclude` is not empty), it goes to a usable holder if there is one, else to the origin,
    /// never to a parent: this read is late already, and climbing further could use up the
    /// fetch's time before the origin gets its turn. A parent that failed is also marked down,
    /// so later runs of its stripes go to the parent the tree has without it.
    pub fn choose(&self, run: Range<u32>, now: Instant, exclude: &[String]) -> Choice {
        // Among equally loaded holders, each asker prefers a different one (a score of holder,
        // asker and stripe), so that a popular run's holders share the askers.
        let stripe = run.start / self.stripe;
        let holder = self
            .peers
            .iter()
            .filter(|(n, p)| Self::usable(p, now) && !exclude.contains(n) && p.have.contains_range(run.clone()))
            .min_by_key(|(n, p)| (p.load, std::cmp::Reverse(score(p.hash ^ self.me_hash, stripe)), n.as_str()));
        if let Some((n, _)) = holder {
            return Choice::Peer { node: n.clone(), parent: false };
        }
        match self.parent(run.start, now) {
            Some(n) if exclude.is_empty() => Choice::Peer { node: n.to_string(), parent: true },
            _ => Choice::Origin,
        }
    }

    pub fn started(&mut self, node: &str) {
        if let Some(p) = self.peers.get_mut(node) {
            p.load += 1;
        }
    }

    /// Records how a request to `node` ended.
    pub fn finished(&mut self, node: &str, outcome: Outcome, now: Instant) {
        let Some(p) = self.peers.get_mut(node) else { return };
        p.load = p.load.saturating_sub(1);
        match outcome {
            Outcome::Served => {
                p.failures = 0;
                p.down_until = None;
            }
            Outcome::NotHave | Outcome::Busy => {}
            Outcome::Failed => {
                // Every failed request counts, also the several one outage fails at once: a peer
                // that dies mid-storm reaches a long backoff at once instead of being retried
                // every few hundred milliseconds (measured: 0.7 s faster storms with two peers
                // killed, `scripts/bench-relay-faults`).
                p.failures = p.failures.saturating_add(1);
                let backoff = FIRST_DOWN.saturating_mul(1 << (p.failures - 1).min(16)).min(MAX_DOWN);
                p.down_until = Some(now + backoff);
                p.have.clear();
            }
            Outcome::Corrupt => {
                // Replies already in flight when the ban began do not count as new bans.
                if p.banned_until.is_none_or(|t| now >= t) {
                    self.bans += 1;
                }
                p.banned_until = Some(now + BAN);
                p.have.clear();
            }
        }
    }

    /// Marks a peer down without a request (its connection could not be made).
    pub fn unreachable(&mut self, node: &str, now: Instant) {
        self.started(node);
        self.finished(node, Outcome::Failed, now);
    }

    /// Whether `node` is a member that may be asked now (not backing off, not banned).
    pub fn usable_now(&self, node: &str, now: Instant) -> bool {
        self.peers.get(node).is_some_and(|p| Self::usable(p, now))
    }

    pub fn is_banned(&self, node: &str, now: Instant) -> bool {
        self.peers.get(node).and_then(|p| p.banned_until).is_some_and(|t| now < t)
    }

    pub fn summary(&self, now: Instant) -> Summary {
        Summary {
            members: self.peers.values().filter(|p| p.member).count() as u64,
            usable: self.peers.values().filter(|p| Self::usable(p, now)).count() as u64,
            banned: self.peers.values().filter(|p| p.banned_until.is_some_and(|t| now < t)).count() as u64,
            bans_total: self.bans,
            chunks_at_peers: {
                let mut all = RoaringBitmap::new();
                for p in self.peers.values().filter(|p| Self::usable(p, now)) {
                    all |= &p.have;
                }
                all.len()
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn nodes(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("10.0.0.{}:7000", 10 + i)).collect()
    }

    fn cluster(n: usize, stripe: u32, fanout: u32) -> Vec<Selector> {
        let names = nodes(n);
        names
            .iter()
            .map(|me| {
                let mut s = Selector::new(me, stripe, fanout);
                s.set_members(names.iter().map(String::as_str));
                s
            })
            .collect()
    }

    #[test]
    fn each_stripe_forms_one_tree_of_bounded_fanout_and_roots_spread() {
        let now = Instant::now();
        let (n, fanout) = (24, 4);
        let c = cluster(n, 4, fanout);
        let names = nodes(n);
        let mut roots = vec![0u32; n];
        for stripe in 0..2400u32 {
            let chunk = stripe * 4;
            let root: Vec<usize> = (0..n).filter(|&i| c[i].is_root(chunk, now)).collect();
            assert_eq!(root.len(), 1, "stripe {stripe} has one root");
            roots[root[0]] += 1;
            let mut children = vec![0u32; n];
            for (i, s) in c.iter().enumerate() {
                let Some(p) = s.parent(chunk, now) else { continue };
                let p = names.iter().position(|x| x == p).unwrap();
                children[p] += 1;
                assert!(c[p].relays_for(chunk, &names[i]), "a parent relays for its children");
                assert!(!s.relays_for(chunk, &names[p]), "never the other way round");
                assert_eq!(s.choose(chunk..chunk + 4, now, &[]), Choice::Peer { node: names[p].clone(), parent: true });
                // Climbing from any node reaches the root within log_fanout(n) + 1 hops.
                let (mut at, mut hops) = (i, 0);
                while let Some(up) = c[at].parent(chunk, now) {
                    at = names.iter().position(|x| x == up).unwrap();
                    hops += 1;
                    assert!(hops <= 3, "tree too deep");
                }
                assert_eq!(at, root[0]);
            }
            assert!(children.iter().all(|&k| k <= fanout), "fan-out bounded: {children:?}");
            assert_eq!(c[root[0]].choose(chunk..chunk + 1, now, &[]), Choice::Origin);
        }
        assert!(roots.iter().all(|&r| (50..=150).contains(&r)), "roots are spread: {roots:?}");
    }

    #[test]
    fn a_holder_wins_over_the_parent_and_the_least_loaded_holder_first() {
        let now = Instant::now();
        let mut s = cluster(4, 4, 4).remove(0);
        let names = nodes(4);
        let mut have = RoaringBitmap::new();
        have.insert_range(0..8);
        s.have_full(&names[1], have.clone());
        s.have_full(&names[2], have);
        s.started(&names[1]);
        assert_eq!(s.choose(0..4, now, &[]), Choice::Peer { node: names[2].clone(), parent: false });
        assert_eq!(
            s.choose(0..4, now, std::slice::from_ref(&names[2])),
            Choice::Peer { node: names[1].clone(), parent: false }
        );
        // Not all of the run: the have-map does not count.
        assert!(matches!(s.choose(6..10, now, &[]), Choice::Origin | Choice::Peer { parent: true, .. }));
    }

    #[test]
    fn a_failed_parent_sends_the_run_to_the_origin_not_up_the_tree() {
        let t0 = Instant::now();
        let names = nodes(3);
        // Fan-out 1: each stripe's tree is a chain; find a stripe where this node is last.
        let mut all = cluster(3, 1, 1);
        let ranks_last = |c: u32| {
            all[0].parent(c, t0).is_some_and(|p| {
                let i = names.iter().position(|n| n == p).unwrap();
                all[i].parent(c, t0).is_some()
            })
        };
        let chunk = (0..1000).find(|&c| ranks_last(c)).unwrap();
        let mut s = all.swap_remove(0);
        let parent = s.parent(chunk, t0).unwrap().to_string();
        s.started(&parent);
        s.finished(&parent, Outcome::Failed, t0);
        assert!(s.parent(chunk, t0).is_some(), "the tree without the failed parent still has one");
        assert_eq!(s.choose(chunk..chunk + 1, t0, &[parent]), Choice::Origin);
        assert!(matches!(s.choose(chunk..chunk + 1, t0, &[]), Choice::Peer { parent: true, .. }));
    }

    #[test]
    fn failed_peers_back_off_and_return_and_corrupt_ones_are_banned() {
        let t0 = Instant::now();
        let names = nodes(2);
        let mut s = Selector::new(&names[0], 1, 4);
        s.set_members(names.iter().map(String::as_str));
        // A stripe whose root is the other node.
        let chunk = (0..1000).find(|&c| !s.is_root(c, t0)).unwrap();
        s.started(&names[1]);
        s.finished(&names[1], Outcome::Failed, t0);
        assert_eq!(s.choose(chunk..chunk + 1, t0, &[]), Choice::Origin, "down peer skipped");
        assert!(s.is_root(chunk, t0));
        let back = t0 + FIRST_DOWN;
        // A tried peer (here the parent itself) sends the run to the origin, not up the tree.
        assert_eq!(s.choose(chunk..chunk + 1, back, std::slice::from_ref(&names[1])), Choice::Origin);
        assert_eq!(s.choose(chunk..chunk + 1, back, &[]), Choice::Peer { node: names[1].clone(), parent: true });
        s.unreachable(&names[1], back);
        assert_eq!(s.choose(chunk..chunk + 1, back + FIRST_DOWN, &[]), Choice::Origin, "second failure: longer");
        assert!(s.choose(chunk..chunk + 1, back + FIRST_DOWN * 2, &[]) != Choice::Origin);

        s.finished(&names[1], Outcome::Corrupt, t0);
        assert!(s.is_banned(&names[1], t0 + Duration::from_secs(10)));
        s.set_members(names.iter().map(String::as_str));
        assert!(s.is_banned(&names[1], t0 + Duration::from_secs(10)), "re-registering does not lift a ban");
        assert_eq!(s.summary(t0).bans_total, 1);
        assert_eq!(s.choose(chunk..chunk + 1, t0 + Duration::from_secs(10), &[]), Choice::Origin);
    }

    #[test]
    fn split_cuts_at_stripe_boundaries() {
        let s = Selector::new("a:1", 4, 4);
        assert_eq!(s.split(2..11), vec![2..4, 4..8, 8..11]);
        assert_eq!(s.split(4..8), vec![4..8]);
        assert!(s.split(5..5).is_empty());
    }

    proptest! {
        /// However views differ (nodes missing from some member lists, some peers down), every
        /// choice names a member that is usable and not excluded, or the origin; and a chosen
        /// parent always agrees to relay for this node, so requests climb and never loop.
        #[test]
        fn choices_are_always_usable_and_parents_accept(
            n in 2usize..12, missing in proptest::collection::vec(any::<bool>(), 12),
            down in proptest::collection::vec(any::<bool>(), 12), chunk in 0u32..10_000,
            stripe in 1u32..64, fanout in 1u32..6
        ) {
            let now = Instant::now();
            let names = nodes(n);
            let mut s = Selector::new(&names[0], stripe, fanout);
            s.set_members(names.iter().enumerate().filter(|(i, _)| !missing[*i]).map(|(_, n)| n.as_str()));
            for (i, name) in names.iter().enumerate().skip(1) {
                if down[i] {
                    s.unreachable(name, now);
                }
            }
            let exclude = vec![names[n - 1].clone()];
            match s.choose(chunk..chunk + 1, now, &exclude) {
                Choice::Origin => {}
                Choice::Peer { node, parent } => {
                    let i = names.iter().position(|x| *x == node).unwrap();
                    prop_assert!(i != 0 && !missing[i] && !down[i] && node != exclude[0]);
                    if parent {
                        let p = Selector::new(&node, stripe, fanout);
                        prop_assert!(p.relays_for(chunk, &names[0]));
                    }
                }
            }
        }
    }
}
