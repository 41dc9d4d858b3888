//! Source selection for one image on one node: a pure state machine, no I/O and no clock of its
//! own (callers pass `now`), so a simulator can drive this very code at any scale.
//!
//! For a run of missing chunks:
//! 1. this node's *parent* in the tree of the run's stripe: every stripe belongs to one of
//!    `classes` trees ([`crate::p2p::core::tree`]: keys by name, interior-node-disjoint groups),
//!    whose places the tracker computes; a node learns its ancestors in each tree (its [`View`]),
//!    asks the first usable one that was not tried, and the root reads the stripe from the
//!    origin. Without a tracker's places (a view of names only), or when every ancestor refused
//!    or failed, the tree is ranked here, over the known peers that rank above this node;
//! 2. when no such peer is left, or once a peer failed this run (timed out or sent wrong data), a
//!    live peer whose have-map holds the whole run, the least loaded first;
//! 3. the origin, when this node is the root, or when no holder is left after a failure.
//!
//! State is bounded by the view, not by N: the peers named in the last view (ancestors and ring
//! successors, about `classes · log N + near`) and, until their bans end, banned ones. Peers that
//! leave the view are forgotten.
//!
//! A peer's answers have a cost, so that what it claims cannot make others skip the trees. A
//! holder that answers `NotHave` for a run its have-map claimed loses the claim (a later full
//! have-map cannot bring it back, only a fresh announcement of the chunk, and after
//! [`MAX_DISPROOFS`] caught claims none of the peer's claims count) and the run goes to another
//! holder or the origin; a peer that answers `Busy`, or `NotHave` as a parent, is avoided for a while
//! (250 ms, doubled per refusal in a row) and the run climbs to the parent the tree has without it.
//!
//! A node relays for a requester only if its own key in the stripe's tree is higher: keys depend
//! on names and classes alone, not on who is a member, so every relay chain climbs strictly and
//! can never loop, whatever each node's view (a tracker's stale or wrong places included: an
//! ancestor that does not rank above this node is never asked). Peers that fail are avoided for
//! a backoff that doubles with each failure; peers that sent corrupt data are banned.

use std::collections::HashMap;
use std::ops::Range;
use std::time::{Duration, Instant};

use roaring::RoaringBitmap;

use crate::p2p::conn::{join_time, node_addr};
use crate::p2p::core::membership::View;
use crate::p2p::core::tree::{self, class_of, node_id, Key, NodeId};

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
    /// The session could not be opened, or broke or stalled: found out within `peer_stall`
    /// (a dead node resets its connections at once). The read climbs on to the next ancestor.
    Lost,
    /// No answer within `peer_timeout`: the read goes to a holder or the origin.
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
    id: NodeId,
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
    me_id: NodeId,
    stripe: u32,
    fanout: u32,
    classes: u32,
    peers: HashMap<String, Peer>,
    /// Per class, this node's ancestors from the tracker, parent first; empty without places.
    ancestors: Vec<Vec<String>>,
    /// Whether the view carried the tracker's places (else the trees are ranked here).
    placed: bool,
    /// The view's ring successors.
    near: Vec<String>,
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
    /// Trees in which this node has a parent (the others it roots) in its current view.
    pub parents: u64,
}

impl Selector {
    /// `me` is this node's peer name (its advertised address); `stripe` the unit of the relay
    /// trees in chunks, `fanout` their fan-out and `classes` their number (all at least 1).
    pub fn new(me: &str, stripe: u32, fanout: u32, classes: u32) -> Selector {
        Selector {
            me: me.into(),
            me_id: node_id(me),
            stripe: stripe.max(1),
            fanout: fanout.max(1),
            classes: classes.max(1),
            peers: HashMap::new(),
            ancestors: Vec::new(),
            placed: false,
            near: Vec::new(),
            bans: 0,
        }
    }

    /// The tree (class) of the stripe holding `chunk`.
    pub fn class(&self, chunk: u32) -> u32 {
        class_of(chunk / self.stripe, self.classes)
    }

    /// This node's parent in each tree that gives it one now, as `(class, parent)`.
    pub fn parents(&self, now: Instant) -> Vec<(u32, String)> {
        // Stripe c is of class c.
        (0..self.classes)
            .filter_map(|c| Some((c, self.parent(c.checked_mul(self.stripe)?, now)?.to_string())))
            .collect()
    }

    /// Whether this node ranks above `node` in the tree of `class` (so it may push to it).
    pub fn above_in(&self, class: u32, node: &str) -> bool {
        class < self.classes && tree::above(&self.me, node, class, self.classes)
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

    /// Replaces the member list with bare names (no tracker places: the trees are ranked here
    /// over them).
    pub fn set_members<'a>(&mut self, nodes: impl IntoIterator<Item = &'a str>) {
        let view = View { near: nodes.into_iter().map(str::to_string).collect(), ..View::default() };
        self.set_view(&view);
    }

    /// Replaces the view (from the trackers). Peers that left it are forgotten, unless banned
    /// (a banned peer cannot clear its ban by re-registering) or asked right now.
    pub fn set_view(&mut self, view: &View) {
        // One name per node: a node that joined the image again (a restart) may still be named
        // under its old name for a while, by a tracker that has not heard of the new one; the
        // name that joined last is the node. This node's own names are left out.
        let mut latest: HashMap<&str, &String> = HashMap::new();
        for n in view.ancestors.iter().flatten().chain(&view.near) {
            let joined = |n: &str| join_time(n).unwrap_or(0);
            let e = latest.entry(node_addr(n)).or_insert(n);
            if (joined(n), n) > (joined(e), *e) {
                *e = n;
            }
        }
        let me = node_addr(&self.me);
        let keep = |n: &String| node_addr(n) != me && latest.get(node_addr(n)) == Some(&n);
        let names: std::collections::HashSet<&String> =
            view.ancestors.iter().flatten().chain(&view.near).filter(|n| keep(n)).collect();
        self.peers.retain(|n, p| names.contains(n) || p.banned_until.is_some() || p.load > 0);
        for p in self.peers.values_mut() {
            p.member = false;
        }
        self.placed = view.placed;
        self.near = view.near.iter().filter(|n| keep(n)).cloned().collect();
        self.ancestors = view.ancestors.iter().map(|up| up.iter().filter(|n| keep(n)).cloned().collect()).collect();
        self.ancestors.resize(self.classes as usize, Vec::new());
        for n in names {
            self.peers
                .entry(n.clone())
                .or_insert_with(|| Peer {
                    member: false,
                    id: node_id(n),
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

    /// Forgets bans that have ended (of peers outside the view: their whole state).
    pub fn expire_bans(&mut self, now: Instant) {
        for p in self.peers.values_mut() {
            if p.banned_until.is_some_and(|t| now >= t) {
                p.banned_until = None;
            }
        }
        self.peers.retain(|_, p| p.member || p.banned_until.is_some() || p.load > 0);
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

    /// This node's parent in the tree the stripe of `chunk` has without the peers of `tried`:
    /// the first usable ancestor the tracker named that ranks above this node, or, without the
    /// tracker's places, the parent a heap over the usable known peers gives.
    fn parent_without(&self, chunk: u32, now: Instant, tried: &Tried) -> Option<&str> {
        let class = self.class(chunk);
        let mine = (Key::new(self.me_id, class, self.classes), self.me.as_str());
        let ok = |n: &str, p: &Peer| {
            Self::usable(p, now) && !tried.contains(n) && (Key::new(p.id, class, self.classes), n) > mine
        };
        if self.placed {
            let up = self.ancestors.get(class as usize).map(Vec::as_slice).unwrap_or_default();
            if let Some(n) = up.iter().find(|n| self.peers.get(n.as_str()).is_some_and(|p| ok(n, p))) {
                return Some(n);
            }
            // Every ancestor refused, failed or is gone (until the tracker's next places): the
            // tree the known peers above this node form without them, as without places.
        }
        // Nodes ranked above this one, best first; this node's place is their count.
        let mut above: Vec<(Key, &str)> = self
            .peers
            .iter()
            .filter(|(n, p)| ok(n, p))
            .map(|(n, p)| (Key::new(p.id, class, self.classes), n.as_str()))
            .collect();
        let parent = tree::parent_place(above.len(), self.fanout)?;
        above.sort_unstable_by(tree::higher_first);
        Some(above[parent].1)
    }

    /// Whether this node relays the stripe of `chunk` for `requester`: it must rank above it, so
    /// that every relay chain climbs towards the root (see the module doc).
    pub fn relays_for(&self, chunk: u32, requester: &str) -> bool {
        tree::above(&self.me, requester, self.class(chunk), self.classes)
    }

    /// Whether this node fetches `run` on behalf of `requester`: the run lies in one stripe and
    /// this node ranks above the requester in that stripe's tree. A run across a stripe boundary
    /// would be fetched in pieces, some possibly from nodes that rank below the requester: a wait
    /// that could close a cycle.
    pub fn relays_run(&self, run: Range<u32>, requester: &str) -> bool {
        !run.is_empty() && self.split(run.clone()).len() == 1 && self.relays_for(run.start, requester)
    }

    /// The peers a node keeps a session with, sorted: the usable ring successors of its view and
    /// its first usable ancestor in each tree (sessions to others open when first asked). Without
    /// the tracker's places, every usable member.
    pub fn usable_members(&self, now: Instant) -> Vec<String> {
        let usable = |n: &String| self.peers.get(n).is_some_and(|p| Self::usable(p, now));
        let mut v: Vec<String> = if self.placed {
            let near = self.near.iter().cloned();
            let parents = self.ancestors.iter().filter_map(|up| up.iter().find(|n| usable(n)).cloned());
            near.chain(parents).filter(usable).collect()
        } else {
            self.peers.iter().filter(|(_, p)| Self::usable(p, now)).map(|(n, _)| n.clone()).collect()
        };
        v.sort();
        v.dedup();
        v
    }

    /// Whether `node` is one of the peers this node keeps a session with (see
    /// [`Selector::usable_members`]).
    fn kept(&self, node: &str, now: Instant) -> bool {
        if !self.placed || self.near.iter().any(|n| n == node) {
            return true;
        }
        let usable = |n: &String| self.peers.get(n).is_some_and(|p| Self::usable(p, now));
        self.ancestors.iter().any(|up| up.iter().find(|n| usable(n)).is_some_and(|n| n == node))
    }

    /// Whether a session with `node` stays open: it is known, and kept (see
    /// [`Selector::usable_members`]) or has requests of this node in flight. The sessions a
    /// climb past refusing ancestors opened close once idle (and with them the peer's have-map
    /// here): were an ancestor high up a holder for every node that once climbed to it, the
    /// nodes near the root would serve ever more of their subtrees.
    pub fn keeps_session(&self, node: &str, now: Instant) -> bool {
        self.peers.get(node).is_some_and(|p| p.load > 0 || self.kept(node, now))
    }

    /// Whether this node is the root of the tree of the stripe of `chunk` (it reads that stripe
    /// from the origin).
    pub fn is_root(&self, chunk: u32, now: Instant) -> bool {
        self.parent(chunk, now).is_none()
    }

    /// Where to read `run` (one stripe at most, see [`Selector::split`]) from, avoiding the
    /// peers already asked for it (`tried`). While every peer asked only refused (`NotHave`,
    /// `Busy`: quick answers), the parent the stripe's tree has without them: it ranks above
    /// this node as every parent does, so the run climbs towards the one node that reads it
    /// from the origin. The tree comes first even where another peer holds the run already:
    /// holders are the nodes near the root, which everyone's view holds, and asking them would
    /// load them with their whole subtrees (`vmt sim`, N = 1,000 in a binary tree: the busiest
    /// node uploaded 7.6 working sets and the storm took ×1.73 a solo boot; parent first, 2.0
    /// and ×1.23). Without a parent, or once a peer failed this run (an error, a stall, a
    /// timeout), a usable holder, else the origin, never further up the tree: this read is late
    /// already, and climbing further could use up the fetch's time before the origin gets its
    /// turn. A peer that failed is also marked down, so later runs of its stripes go to the
    /// parent the tree has without it. After [`MAX_TRIES`] peers, the origin.
    pub fn choose(&self, run: Range<u32>, now: Instant, tried: &Tried) -> Choice {
        if tried.peers.len() >= MAX_TRIES {
            return Choice::Origin;
        }
        if !tried.failed {
            if let Some(n) = self.parent_without(run.start, now, tried) {
                return Choice::Peer { node: n.to_string(), parent: true };
            }
        }
        // Among equally loaded holders, each asker prefers a different one (a score of holder,
        // asker and stripe), so that a popular run's holders share the askers.
        let stripe = run.start / self.stripe;
        let holder = self
            .peers
            .iter()
            .filter(|(n, p)| Self::usable(p, now) && !tried.contains(n) && p.have.contains_range(run.clone()))
            .min_by_key(|(n, p)| {
                (p.load, std::cmp::Reverse(tree::score(p.id.hash ^ self.me_id.hash, stripe)), n.as_str())
            });
        match holder {
            Some((n, _)) => Choice::Peer { node: n.clone(), parent: false },
            None => Choice::Origin,
        }
    }

    /// A request to `node` counted by [`Selector::started`] was not sent after all.
    pub fn not_asked(&mut self, node: &str) {
        if let Some(p) = self.peers.get_mut(node) {
            p.load = p.load.saturating_sub(1);
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
            Outcome::Failed | Outcome::Lost => {
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

    /// Names of the peers this selector keeps state for, members or not.
    pub fn known(&self) -> std::collections::HashSet<String> {
        self.peers.keys().cloned().collect()
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
            parents: self.ancestors.iter().filter(|a| !a.is_empty()).count() as u64,
        }
    }
}

#[cfg(test)]
mod tests;
