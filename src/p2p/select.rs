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
//! 3. the origin, when this node is the root, or when a peer failed this run.
//!
//! A peer's answers have a cost, so that what it claims cannot make others skip the trees. A
//! holder that answers `NotHave` for a run its have-map claimed loses the claim (a later full
//! have-map cannot bring it back, only a fresh announcement of the chunk, and after
//! [`MAX_DISPROOFS`] caught claims none of the peer's claims count) and the run goes to another
//! holder or up the tree; a peer that answers `Busy`, or `NotHave` as a parent, is avoided for a while
//! (250 ms, doubled per refusal in a row) and the run climbs to the parent the tree has without it.
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
/// Chunks a peer may claim and then refuse (re-claims included) before none of its claims count.
pub const MAX_DISPROOFS: u32 = 1024;
/// How long a peer that refused a request (`Busy`, or `NotHave` asked as a parent) is avoided at
/// first; doubled per refusal in a row, up to [`MAX_DOWN`].
pub const FIRST_REFUSED: Duration = Duration::from_millis(250);
/// Most peers asked for one run before it goes to the origin.
pub const MAX_TRIES: usize = 8;

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

/// The peers already asked for one run, and whether one of them failed (rather than answered
/// `NotHave` or `Busy`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tried {
    peers: Vec<String>,
    failed: bool,
}

impl Tried {
    /// `node` was asked, with this outcome.
    pub fn add(&mut self, node: &str, outcome: Outcome) {
        self.failed |= matches!(outcome, Outcome::Failed | Outcome::Corrupt);
        self.peers.push(node.to_string());
    }

    pub fn contains(&self, node: &str) -> bool {
        self.peers.iter().any(|p| p == node)
    }

    pub fn is_empty(&self) -> bool {
        self.peers.is_empty()
    }
}

#[derive(Debug, Clone)]
struct Peer {
    /// Listed by a tracker (or configured); non-members are never asked.
    member: bool,
    hash: u64,
    have: RoaringBitmap,
    /// Chunks it claimed and then refused: not taken from a full have-map again; a later delta
    /// that announces one anew (an honest node that dropped a chunk and fetched it again) brings
    /// it back, until the peer has been caught [`MAX_DISPROOFS`] times: then none of its claims
    /// count any more.
    disproved: RoaringBitmap,
    /// Chunks it claimed and refused, re-claims included.
    disproofs: u32,
    /// Requests in flight to it from this node.
    load: u32,
    down_until: Option<Instant>,
    failures: u32,
    /// Refusals (`Busy`, or `NotHave` as a parent) since it last served.
    refusals: u32,
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
                    disproved: RoaringBitmap::new(),
                    disproofs: 0,
                    load: 0,
                    down_until: None,
                    failures: 0,
                    refusals: 0,
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

    /// A peer's full have-map arrived (less what it claimed and refused before).
    pub fn have_full(&mut self, node: &str, have: RoaringBitmap) {
        if let Some(p) = self.peers.get_mut(node) {
            p.have = if p.disproofs >= MAX_DISPROOFS { RoaringBitmap::new() } else { have - &p.disproved };
        }
    }

    /// A peer gained chunks: an announcement anew, which counts also for chunks it claimed and
    /// refused before, unless it has been caught too often.
    pub fn have_added(&mut self, node: &str, added: &RoaringBitmap) {
        if let Some(p) = self.peers.get_mut(node) {
            if p.disproofs < MAX_DISPROOFS {
                p.disproved -= added;
                p.have |= added;
            }
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
        self.parent_without(chunk, now, &Tried::default())
    }

    /// This node's parent in the tree the stripe of `chunk` has without the peers of `tried`.
    fn parent_without(&self, chunk: u32, now: Instant, tried: &Tried) -> Option<&str> {
        let stripe = chunk / self.stripe;
        let mine = score(self.me_hash, stripe);
        // Nodes ranked above this one, best first; this node's place is their count.
        let mut above: Vec<(u64, &str)> = self
            .peers
            .iter()
            .filter(|(n, p)| Self::usable(p, now) && !tried.contains(n))
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

    /// Whether this node fetches `run` on behalf of `requester`: the run lies in one stripe and
    /// this node ranks above the requester in that stripe's tree. A run across a stripe boundary
    /// would be fetched in pieces, some possibly from nodes that rank below the requester: a wait
    /// that could close a cycle.
    pub fn relays_run(&self, run: Range<u32>, requester: &str) -> bool {
        !run.is_empty() && self.split(run.clone()).len() == 1 && self.relays_for(run.start, requester)
    }

    /// The members usable now (not backing off, not banned), sorted: those a node keeps a
    /// session with, opened as they become members.
    pub fn usable_members(&self, now: Instant) -> Vec<String> {
        let mut v: Vec<String> =
            self.peers.iter().filter(|(_, p)| Self::usable(p, now)).map(|(n, _)| n.clone()).collect();
        v.sort();
        v
    }

    /// Whether this node is the root of the tree of the stripe of `chunk` (it reads that stripe
    /// from the origin).
    pub fn is_root(&self, chunk: u32, now: Instant) -> bool {
        self.parent(chunk, now).is_none()
    }

    /// Where to read `run` (one stripe at most, see [`Selector::split`]) from, avoiding the
    /// peers already asked for it (`tried`). A usable holder first; else, while every peer
    /// asked only refused (`NotHave`, `Busy`: quick answers), the parent the stripe's tree has
    /// without them, which ranks above this node as every parent does, so the run still climbs
    /// towards the one node that reads it from the origin. Once a peer failed this run (an
    /// error, a stall, a timeout), it goes to a holder or the origin, never up the tree: this
    /// read is late already, and climbing further could use up the fetch's time before the
    /// origin gets its turn. A peer that failed is also marked down, so later runs of its
    /// stripes go to the parent the tree has without it. After [`MAX_TRIES`] peers, the origin.
    pub fn choose(&self, run: Range<u32>, now: Instant, tried: &Tried) -> Choice {
        if tried.peers.len() >= MAX_TRIES {
            return Choice::Origin;
        }
        // Among equally loaded holders, each asker prefers a different one (a score of holder,
        // asker and stripe), so that a popular run's holders share the askers.
        let stripe = run.start / self.stripe;
        let holder = self
            .peers
            .iter()
            .filter(|(n, p)| Self::usable(p, now) && !tried.contains(n) && p.have.contains_range(run.clone()))
            .min_by_key(|(n, p)| (p.load, std::cmp::Reverse(score(p.hash ^ self.me_hash, stripe)), n.as_str()));
        if let Some((n, _)) = holder {
            return Choice::Peer { node: n.clone(), parent: false };
        }
        match self.parent_without(run.start, now, tried) {
            Some(n) if !tried.failed => Choice::Peer { node: n.to_string(), parent: true },
            _ => Choice::Origin,
        }
    }

    pub fn started(&mut self, node: &str) {
        if let Some(p) = self.peers.get_mut(node) {
            p.load += 1;
        }
    }

    /// Records how a request to `node` for `run` ended.
    pub fn finished(&mut self, node: &str, run: Range<u32>, outcome: Outcome, now: Instant) {
        let Some(p) = self.peers.get_mut(node) else { return };
        p.load = p.load.saturating_sub(1);
        let refused = |p: &mut Peer| {
            p.refusals = p.refusals.saturating_add(1);
            let pause = FIRST_REFUSED.saturating_mul(1 << (p.refusals - 1).min(16)).min(MAX_DOWN);
            p.down_until = Some(p.down_until.map_or(now + pause, |t| t.max(now + pause)));
        };
        match outcome {
            Outcome::Served => {
                p.failures = 0;
                p.refusals = 0;
                p.down_until = None;
                p.disproved.remove_range(run);
            }
            // It claimed the run and does not have it: the claim goes, for good.
            Outcome::NotHave if !run.is_empty() && p.have.contains_range(run.clone()) => {
                p.disproofs = p.disproofs.saturating_add(run.len() as u32);
                p.have.remove_range(run.clone());
                p.disproved.insert_range(run);
                if p.disproofs >= MAX_DISPROOFS {
                    p.have.clear();
                }
            }
            Outcome::NotHave | Outcome::Busy => refused(p),
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
        self.finished(node, 0..0, Outcome::Failed, now);
    }

    /// Whether `node` is a member that may be asked now (not backing off, not banned).
    pub fn usable_now(&self, node: &str, now: Instant) -> bool {
        self.peers.get(node).is_some_and(|p| Self::usable(p, now))
    }

    /// Bytes this selector holds for its peers (names, per-peer state, have-maps), estimated
    /// from their sizes: what one node spends on peer state for one image.
    pub fn state_bytes(&self) -> u64 {
        let per_peer = (std::mem::size_of::<Peer>() + std::mem::size_of::<String>() + 16) as u64;
        self.peers
            .iter()
            .map(|(n, p)| {
                per_peer + n.len() as u64 + p.have.serialized_size() as u64 + p.disproved.serialized_size() as u64
            })
            .sum()
    }

    /// Peers this selector keeps state for, members or not.
    pub fn known_peers(&self) -> usize {
        self.peers.len()
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

    /// `nodes` tried, each with `how`.
    fn tried(nodes: &[&String], how: Outcome) -> Tried {
        let mut t = Tried::default();
        for n in nodes {
            t.add(n, how);
        }
        t
    }

    fn none() -> Tried {
        Tried::default()
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
                assert_eq!(
                    s.choose(chunk..chunk + 4, now, &none()),
                    Choice::Peer { node: names[p].clone(), parent: true }
                );
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
            assert_eq!(c[root[0]].choose(chunk..chunk + 1, now, &none()), Choice::Origin);
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
        assert_eq!(s.choose(0..4, now, &none()), Choice::Peer { node: names[2].clone(), parent: false });
        assert_eq!(
            s.choose(0..4, now, &tried(&[&names[2]], Outcome::Busy)),
            Choice::Peer { node: names[1].clone(), parent: false }
        );
        // Not all of the run: the have-map does not count.
        assert!(matches!(s.choose(6..10, now, &none()), Choice::Origin | Choice::Peer { parent: true, .. }));
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
        s.finished(&parent, chunk..chunk + 1, Outcome::Failed, t0);
        assert!(s.parent(chunk, t0).is_some(), "the tree without the failed parent still has one");
        assert_eq!(s.choose(chunk..chunk + 1, t0, &tried(&[&parent], Outcome::Failed)), Choice::Origin);
        assert!(matches!(s.choose(chunk..chunk + 1, t0, &none()), Choice::Peer { parent: true, .. }));
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
        s.finished(&names[1], chunk..chunk + 1, Outcome::Failed, t0);
        assert_eq!(s.choose(chunk..chunk + 1, t0, &none()), Choice::Origin, "down peer skipped");
        assert!(s.is_root(chunk, t0));
        let back = t0 + FIRST_DOWN;
        // A tried peer (here the parent itself) sends the run to the origin, not up the tree.
        assert_eq!(s.choose(chunk..chunk + 1, back, &tried(&[&names[1]], Outcome::Failed)), Choice::Origin);
        assert_eq!(s.choose(chunk..chunk + 1, back, &none()), Choice::Peer { node: names[1].clone(), parent: true });
        s.unreachable(&names[1], back);
        assert_eq!(s.choose(chunk..chunk + 1, back + FIRST_DOWN, &none()), Choice::Origin, "second failure: longer");
        assert!(s.choose(chunk..chunk + 1, back + FIRST_DOWN * 2, &none()) != Choice::Origin);

        s.finished(&names[1], 0..0, Outcome::Corrupt, t0);
        assert!(s.is_banned(&names[1], t0 + Duration::from_secs(10)));
        s.set_members(names.iter().map(String::as_str));
        assert!(s.is_banned(&names[1], t0 + Duration::from_secs(10)), "re-registering does not lift a ban");
        assert_eq!(s.summary(t0).bans_total, 1);
        assert_eq!(s.choose(chunk..chunk + 1, t0 + Duration::from_secs(10), &none()), Choice::Origin);
    }

    /// A chunk of a stripe in which, at fan-out 1 (each tree a chain), node 0 of `c` is at
    /// least `depth` places below the root; and node 0's ancestors there, nearest first.
    fn deep_chunk(c: &[Selector], depth: usize, now: Instant) -> (u32, Vec<String>) {
        let names: Vec<String> = c.iter().map(|s| s.me().to_string()).collect();
        let ancestors = |chunk: u32| {
            let mut up = Vec::new();
            let mut at = 0;
            while let Some(p) = c[at].parent(chunk, now) {
                up.push(p.to_string());
                at = names.iter().position(|n| n == p).unwrap();
            }
            up
        };
        let chunk = (0..10_000).find(|&ch| ancestors(ch).len() >= depth).unwrap();
        (chunk, ancestors(chunk))
    }

    #[test]
    fn a_holder_that_refuses_what_it_claims_loses_the_claim_and_the_run_climbs() {
        let now = Instant::now();
        let c = cluster(4, 1, 1);
        let (chunk, up) = deep_chunk(&c, 2, now);
        let mut s = c[0].clone();
        let names = nodes(4);
        // The liar claims every chunk; it is not this node's parent in the chunk's stripe.
        let liar = names[1..].iter().find(|n| **n != up[0]).unwrap().clone();
        let all: RoaringBitmap = (0..10_000).collect();
        s.have_full(&liar, all.clone());
        let run = chunk..chunk + 1;
        assert_eq!(s.choose(run.clone(), now, &none()), Choice::Peer { node: liar.clone(), parent: false });
        s.started(&liar);
        s.finished(&liar, run.clone(), Outcome::NotHave, now);
        // The run climbs to this node's parent, not to the origin; the liar is not paused (it
        // may still serve what it holds), but is no longer asked for this run.
        let refused = tried(&[&liar], Outcome::NotHave);
        assert_eq!(s.choose(run.clone(), now, &refused), Choice::Peer { node: up[0].clone(), parent: true });
        assert_eq!(s.choose(run.clone(), now, &none()), Choice::Peer { node: up[0].clone(), parent: true });
        assert!(s.usable_now(&liar, now));
        // A new full have-map (a new session) cannot bring the claim back; others stay.
        s.have_full(&liar, all.clone());
        assert_eq!(s.choose(run.clone(), now, &none()), Choice::Peer { node: up[0].clone(), parent: true });
        let other = (chunk + 1)..(chunk + 2);
        assert_eq!(s.choose(other.clone(), now, &none()), Choice::Peer { node: liar.clone(), parent: false });
        // Serving the run proves it: the claim counts again.
        s.started(&liar);
        s.finished(&liar, run.clone(), Outcome::Served, now);
        s.have_full(&liar, all.clone());
        assert_eq!(s.choose(run.clone(), now, &none()), Choice::Peer { node: liar.clone(), parent: false });
        // An announcement anew (an honest node that dropped the chunk and has it again) brings a
        // refused claim back, until the peer has been caught MAX_DISPROOFS times: then nothing
        // it claims counts.
        s.started(&liar);
        s.finished(&liar, run.clone(), Outcome::NotHave, now);
        s.have_added(&liar, &run.clone().collect());
        assert_eq!(s.choose(run.clone(), now, &none()), Choice::Peer { node: liar.clone(), parent: false });
        for _ in 0..MAX_DISPROOFS {
            s.started(&liar);
            s.finished(&liar, run.clone(), Outcome::NotHave, now);
            s.have_added(&liar, &run.clone().collect());
        }
        s.have_full(&liar, all.clone());
        s.have_added(&liar, &all);
        assert_ne!(s.choose(other, now, &none()), Choice::Peer { node: liar.clone(), parent: false });
        assert_ne!(s.choose(run, now, &none()), Choice::Peer { node: liar, parent: false });
    }

    #[test]
    fn a_refusing_parent_is_avoided_and_the_run_climbs_past_it() {
        let t0 = Instant::now();
        let c = cluster(5, 1, 1);
        let (chunk, up) = deep_chunk(&c, 3, t0);
        let mut s = c[0].clone();
        let run = chunk..chunk + 1;
        for how in [Outcome::NotHave, Outcome::Busy] {
            assert_eq!(s.choose(run.clone(), t0, &none()), Choice::Peer { node: up[0].clone(), parent: true });
            s.started(&up[0]);
            s.finished(&up[0], run.clone(), how, t0);
            // The tree without the refusing parent: the next node up is this node's parent.
            let refused = tried(&[&up[0]], how);
            assert_eq!(s.choose(run.clone(), t0, &refused), Choice::Peer { node: up[1].clone(), parent: true });
            // And for a while, for every run: it is avoided (its have-map kept).
            assert!(!s.usable_now(&up[0], t0));
            assert_eq!(s.choose(run.clone(), t0, &none()), Choice::Peer { node: up[1].clone(), parent: true });
            // Past it, the run climbs on; once a peer failed, it goes to the origin.
            let mut both = refused.clone();
            both.add(&up[1], Outcome::Busy);
            assert_eq!(s.choose(run.clone(), t0, &both), Choice::Peer { node: up[2].clone(), parent: true });
            let mut failed = refused.clone();
            failed.add(&up[1], Outcome::Failed);
            assert_eq!(s.choose(run.clone(), t0, &failed), Choice::Origin);
            s.finished(&up[0], run.clone(), Outcome::Served, t0);
        }
        // Refusals in a row: avoided twice as long each time, until it serves again.
        for k in 0..3u32 {
            s.finished(&up[0], run.clone(), Outcome::Busy, t0);
            let pause = FIRST_REFUSED * 2u32.pow(k);
            assert!(!s.usable_now(&up[0], t0 + pause - Duration::from_millis(1)));
            assert!(s.usable_now(&up[0], t0 + pause));
        }
        s.finished(&up[0], run.clone(), Outcome::Served, t0);
        s.finished(&up[0], run, Outcome::Busy, t0);
        assert!(s.usable_now(&up[0], t0 + FIRST_REFUSED));
    }

    #[test]
    fn after_max_tries_peers_a_run_goes_to_the_origin() {
        let now = Instant::now();
        let names = nodes(MAX_TRIES + 2);
        let mut s = cluster(MAX_TRIES + 2, 1, 4).remove(0);
        for n in &names[1..] {
            s.have_full(n, (0..10).collect());
        }
        let mut t = none();
        for _ in 0..MAX_TRIES {
            let Choice::Peer { node, parent: false } = s.choose(0..1, now, &t) else { panic!("a holder") };
            t.add(&node, Outcome::Busy);
        }
        assert_eq!(s.choose(0..1, now, &t), Choice::Origin, "one holder left, but enough tries");
    }

    #[test]
    fn split_cuts_at_stripe_boundaries() {
        let s = Selector::new("a:1", 4, 4);
        assert_eq!(s.split(2..11), vec![2..4, 4..8, 8..11]);
        assert_eq!(s.split(4..8), vec![4..8]);
        assert!(s.split(5..5).is_empty());
    }

    proptest! {
        /// However views differ (nodes missing from some member lists, some peers down), and
        /// whatever peers were tried and how they answered, every choice names a member that is
        /// usable and not tried, or the origin; and a chosen parent always agrees to relay for
        /// this node, so requests climb and never loop.
        #[test]
        fn choices_are_always_usable_and_parents_accept(
            n in 2usize..12, missing in proptest::collection::vec(any::<bool>(), 12),
            down in proptest::collection::vec(any::<bool>(), 12), chunk in 0u32..10_000,
            stripe in 1u32..64, fanout in 1u32..6,
            asked in proptest::collection::vec((0usize..12, 0usize..3), 0..4)
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
            let mut t = none();
            for (i, how) in asked {
                let how = [Outcome::NotHave, Outcome::Busy, Outcome::Failed][how];
                let node = &names[i % n];
                s.started(node);
                s.finished(node, chunk..chunk + 1, how, now);
                t.add(node, how);
            }
            match s.choose(chunk..chunk + 1, now, &t) {
                Choice::Origin => {}
                Choice::Peer { node, parent } => {
                    let i = names.iter().position(|x| *x == node).unwrap();
                    prop_assert!(i != 0 && !missing[i] && !down[i] && !t.contains(&node));
                    prop_assert!(s.usable_now(&node, now));
                    if parent {
                        let p = Selector::new(&node, stripe, fanout);
                        prop_assert!(p.relays_for(chunk, &names[0]));
                    }
                }
            }
        }
    }
}
