//! The tracker's table as a pure state machine: which nodes serve which image, by the time each
//! last registered, and the places of the relay trees. No I/O and no clock: callers pass `now`
//! (vmtd's tracker `Instant::now()`, `vmt sim` its virtual clock), so the simulator answers
//! heartbeats with this very code.
//!
//! An answer is bounded whatever N is: for each class, the asker's ancestors in that class's tree
//! (a `fanout`-ary heap over the live nodes sorted by [`Key`], so about log_fanout N names; with
//! other trackers sharing the nodes, its root keeps one child and room for a partition root), its
//! `near` successors on the ring of node hashes (a stable sample for have-maps and fallbacks),
//! and the number of live nodes. The sorted orders are snapshots, rebuilt at most every
//! [`REBUILD`] (and at least every half `ttl`), so a heartbeat costs O(classes · log N) and a
//! storm of registrations O(N log N) per rebuild.
//!
//! After a silence of more than a `ttl` (a restart, or an outage in which no node got
//! through), the table warms up for half a `ttl`: nothing expires and its places are
//! provisional, so the nodes keep the places they had instead of taking the trees of a table
//! that holds only the first few nodes to come back (a node that has none takes them).
//!
//! Invariants: a node is answered only while it registered within `ttl` (as of the last
//! rebuild); at most [`MAX_IMAGES`] images and [`MAX_ENTRIES`] names in all are kept, whatever
//! is sent (memory, not N, is the bound); a new name is recorded (but still answered) only
//! while fewer than `per_address` live names of its address are; an answer never names the node
//! that asked.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use super::tree::{higher_first, joined_of, node_hash, node_id, parent_place, parent_place_federated, Key, NodeId};
use crate::p2p::conn::{node_addr, node_host};
use crate::p2p::wire::{Bytes32, Summary};

/// Most images a tracker keeps.
pub const MAX_IMAGES: usize = 4096;
/// Most names a tracker keeps over all images (up to about 1 KiB each with the snapshots' tree orders).
pub const MAX_ENTRIES: usize = 1 << 20;
/// Most classes and largest fan-out a tracker computes trees for.
pub const MAX_CLASSES: u32 = 16;
pub const MAX_FANOUT: u32 = 64;
/// Most ancestors an answer names per class (a fan-out of 1 makes chains as long as N).
pub const MAX_DEPTH: usize = 32;
/// Most tree shapes (`classes` values) an image's snapshot keeps orders for: a node asking for
/// yet another one is answered without places.
pub const MAX_SHAPES: usize = 2;
/// Most ring successors an answer names, and how many a node asks for.
pub const MAX_NEAR: u32 = 64;
pub const NEAR: u32 = 8;
/// Names of the top of each tree a tracker tells the others (see [`super::federation`]): its
/// first 21 places (the root and two levels of an ordinary heap of fan-out 4).
pub const TOP: usize = 21;
/// Least time between two rebuilds of an image's snapshots.
pub const REBUILD: Duration = Duration::from_millis(250);

/// What the asker wants computed: its trees' shape and how many ring successors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ask {
    pub classes: u32,
    pub fanout: u32,
    pub near: u32,
}

/// Appends to `up`, a chain of ancestors of `me`, the node ranked right above `me` (see
/// [`Answer::ancestors`]), unless it is `me`, in the chain already, or past [`MAX_DEPTH`].
pub(super) fn append_next_above(up: &mut Vec<String>, next: Option<String>, me: &str) {
    if let Some(n) = next.filter(|n| node_addr(n) != node_addr(me) && !up.contains(n) && up.len() < MAX_DEPTH) {
        up.push(n);
    }
}

/// A tracker's answer to one registration.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Answer {
    /// Per class, the asker's ancestors, its parent first, then the node ranked right above the
    /// asker if it is not one of them (empty: the asker is the root).
    pub ancestors: Vec<Vec<String>>,
    /// The asker's successors on the ring of node hashes.
    pub near: Vec<String>,
    /// Live nodes of the image (the asker included).
    pub total: u32,
    /// Places computed while the table warms up: a node takes them only if it has none.
    pub provisional: bool,
}

impl Answer {
    /// Every name in the answer, once.
    pub fn names(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.ancestors.iter().flatten().chain(&self.near).map(String::as_str).collect();
        v.sort_unstable();
        v.dedup();
        v
    }
}

/// What one registration did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recorded {
    Yes,
    /// The tracker holds [`MAX_IMAGES`] images already.
    ImagesFull,
    /// The tracker holds [`MAX_ENTRIES`] names, or `per_address` live names of the node's address.
    NodesFull,
}

#[derive(Debug, Clone, Default)]
struct Image {
    /// Name → (hash, last registration).
    nodes: HashMap<String, (u64, Instant)>,
    /// Recorded names per IP address.
    hosts: HashMap<String, usize>,
    /// Peer address (`HOST:PORT`) → its recorded name: one name per node, the latest it
    /// registered under (a node that joins again, after a restart, has a new one).
    addrs: HashMap<String, String>,
    /// Snapshot: names, the ring (hash, name index) by hash, and per (classes) the order of
    /// each class's tree, highest first.
    names: Vec<String>,
    ring: Vec<(u64, u32)>,
    orders: HashMap<u32, Vec<Vec<(Key, u32)>>>,
    /// Shapes asked for since the last rebuild: only those are rebuilt.
    asked: std::collections::HashSet<u32>,
    built: Option<Instant>,
    dirty: bool,
    /// The table's [`Roster::changes`] when this image's tops last changed.
    changed: u64,
}

impl Image {
    fn expire(&mut self, now: Instant, ttl: Duration) {
        let (hosts, addrs) = (&mut self.hosts, &mut self.addrs);
        let before = self.nodes.len();
        self.nodes.retain(|n, (_, t)| {
            let live = now.saturating_duration_since(*t) < ttl;
            if !live {
                if let Some(c) = hosts.get_mut(node_host(n)) {
                    *c = c.saturating_sub(1);
                }
                if addrs.get(node_addr(n)).is_some_and(|a| a == n) {
                    addrs.remove(node_addr(n));
                }
            }
            live
        });
        hosts.retain(|_, c| *c > 0);
        self.dirty |= self.nodes.len() != before;
    }

    /// The names of the tops of every tree shape held (see [`Roster::tops`]), shapes in order.
    fn top_names(&self) -> Vec<(u32, Vec<Vec<String>>)> {
        let top = |o: &Vec<(Key, u32)>| o.iter().take(TOP).map(|&(_, i)| self.names[i as usize].clone()).collect();
        let mut shapes: Vec<_> = self.orders.iter().map(|(&c, orders)| (c, orders.iter().map(top).collect())).collect();
        shapes.sort_unstable();
        shapes
    }

    /// Rebuilds the snapshot; whether its tops changed.
    fn rebuild(&mut self, now: Instant, ttl: Duration, expire: bool) -> bool {
        let before = self.top_names();
        if expire {
            self.expire(now, ttl);
        }
        let mut ring: Vec<(u64, &String)> = self.nodes.iter().map(|(n, (h, _))| (*h, n)).collect();
        ring.sort_unstable();
        self.names = ring.iter().map(|(_, n)| (*n).clone()).collect();
        self.ring = ring.iter().enumerate().map(|(i, (h, _))| (*h, i as u32)).collect();
        let shapes: Vec<u32> = std::mem::take(&mut self.asked).into_iter().take(MAX_SHAPES).collect();
        self.orders.clear();
        for classes in shapes {
            self.order(classes);
        }
        self.built = Some(now);
        self.dirty = false;
        before != self.top_names()
    }

    /// The snapshot's order of every class for `classes` trees, computed on first use.
    fn order(&mut self, classes: u32) -> &Vec<Vec<(Key, u32)>> {
        let (names, ring) = (&self.names, &self.ring);
        self.orders.entry(classes).or_insert_with(|| {
            (0..classes)
                .map(|c| {
                    let mut o: Vec<(Key, u32)> = ring
                        .iter()
                        .map(|&(h, i)| {
                            (Key::new(NodeId { hash: h, joined: joined_of(&names[i as usize]) }, c, classes), i)
                        })
                        .collect();
                    o.sort_unstable_by(|a, b| {
                        higher_first(&(a.0, names[a.1 as usize].as_str()), &(b.0, names[b.1 as usize].as_str()))
                    });
                    o
                })
                .collect()
        })
    }

    fn answer(&mut self, me: &str, ask: Ask, federated: bool) -> Answer {
        let hash = node_hash(me);
        let classes = ask.classes.clamp(1, MAX_CLASSES);
        let fanout = ask.fanout.clamp(1, MAX_FANOUT);
        let mut ancestors = Vec::with_capacity(classes as usize);
        if !self.orders.contains_key(&classes) && self.orders.len() >= MAX_SHAPES {
            // A third shape: no places for it (the nodes of one cluster share one shape).
            ancestors.clear();
            let near = self.near(me, hash, ask.near);
            return Answer { ancestors, near, total: self.nodes.len() as u32, provisional: false };
        }
        self.asked.insert(classes);
        self.order(classes);
        let (names, orders) = (&self.names, &self.orders[&classes]);
        for (c, order) in orders.iter().enumerate() {
            let mine = (Key::new(node_id(me), c as u32, classes), me);
            // Its place: the number of nodes ranked above it (where it is, or would be).
            let mut place = order.partition_point(|&(k, i)| (k, names[i as usize].as_str()) > mine);
            // The node ranked right above this one comes after the chain (it ranks above, so a
            // read that climbs to it still climbs): the way up when every ancestor refuses. A root
            // that never relays would otherwise leave both its children reading the origin.
            let next_above = place.checked_sub(1).map(|p| names[order[p].1 as usize].clone());
            let mut up = Vec::new();
            let parent = if federated { parent_place_federated } else { parent_place };
            while let Some(p) = parent(place, fanout) {
                if up.len() == MAX_DEPTH {
                    break;
                }
                up.push(names[order[p].1 as usize].clone());
                place = p;
            }
            append_next_above(&mut up, next_above, me);
            ancestors.push(up);
        }
        Answer { ancestors, near: self.near(me, hash, ask.near), total: self.nodes.len() as u32, provisional: false }
    }

    /// The `want` successors of `hash` on the snapshot's ring, `me` left out.
    fn near(&self, me: &str, hash: u64, want: u32) -> Vec<String> {
        let start = self.ring.partition_point(|&(h, _)| h <= hash);
        (0..self.ring.len())
            .map(|k| &self.names[self.ring[(start + k) % self.ring.len()].1 as usize])
            .filter(|n| node_addr(n) != node_addr(me))
            .take(want.min(MAX_NEAR) as usize)
            .cloned()
            .collect()
    }
}

/// Live nodes per image, and when expired entries of other images were last swept out.
#[derive(Debug, Clone)]
pub struct Roster {
    ttl: Duration,
    per_address: usize,
    images: HashMap<Bytes32, Image>,
    entries: usize,
    swept: Option<Instant>,
    /// The last registration, and the end of the current warm-up.
    last: Option<Instant>,
    warm_until: Option<Instant>,
    /// Rebuilds that changed some image's tops (what the other trackers are told of).
    changes: u64,
    /// Other trackers share the nodes: each image's root keeps a place for another partition's
    /// root ([`super::tree::parent_place_federated`]).
    federated: bool,
}

impl Roster {
    /// A table that forgets a node `ttl` after its last registration, with at most `per_address`
    /// (at least 1) names of each address per image.
    pub fn new(ttl: Duration, per_address: usize) -> Roster {
        Roster {
            ttl,
            per_address: per_address.max(1),
            images: HashMap::new(),
            entries: 0,
            swept: None,
            last: None,
            warm_until: None,
            changes: 0,
            federated: false,
        }
    }

    /// Whether other trackers share the nodes ([`super::federation`]): the places keep room.
    pub fn federated(mut self, federated: bool) -> Roster {
        self.federated = federated;
        self
    }

    /// Records `node` for `image` and answers it (see [`Answer`]), with whether it was recorded.
    pub fn register(&mut self, image: Bytes32, node: &str, ask: Ask, now: Instant) -> (Answer, Recorded) {
        let ttl = self.ttl;
        // Silence: no registration for a whole ttl (every entry would expire) or none ever.
        if self.last.is_none_or(|t| now.saturating_duration_since(t) > ttl) {
            self.warm_until = now.checked_add(ttl / 2);
        }
        self.last = Some(now);
        let warming = self.warm_until.is_some_and(|w| now < w);
        // The whole table, whose size grows with images times nodes, is swept at most once per
        // ttl; each image's own snapshot rebuild expires it more often.
        if !warming && self.swept.is_none_or(|t| now.saturating_duration_since(t) >= ttl) {
            for m in self.images.values_mut() {
                m.expire(now, ttl);
            }
            self.images.retain(|_, m| !m.nodes.is_empty());
            self.entries = self.images.values().map(|m| m.nodes.len()).sum();
            self.swept = Some(now);
        }
        let recorded = if self.images.len() >= MAX_IMAGES && !self.images.contains_key(&image) {
            Recorded::ImagesFull
        } else {
            let m = self.images.entry(image).or_default();
            let (host, addr) = (node_host(node), node_addr(node));
            let older = m.addrs.get(addr).filter(|o| o.as_str() != node).cloned();
            match m.nodes.get_mut(node) {
                Some((_, t)) => {
                    *t = now;
                    Recorded::Yes
                }
                None if older.is_some() => {
                    // The node joined the image again (a restart): its new name replaces the
                    // old, which would otherwise rank above it and be taken for another node.
                    m.nodes.remove(older.as_deref().unwrap_or_default());
                    m.nodes.insert(node.to_string(), (node_hash(node), now));
                    m.addrs.insert(addr.to_string(), node.to_string());
                    m.dirty = true;
                    Recorded::Yes
                }
                None if self.entries < MAX_ENTRIES && m.hosts.get(host).copied().unwrap_or(0) < self.per_address => {
                    m.nodes.insert(node.to_string(), (node_hash(node), now));
                    m.addrs.insert(addr.to_string(), node.to_string());
                    *m.hosts.entry(host.to_string()).or_default() += 1;
                    m.dirty = true;
                    self.entries += 1;
                    Recorded::Yes
                }
                None => Recorded::NodesFull,
            }
        };
        let Some(m) = self.images.get_mut(&image) else { return (Answer::default(), recorded) };
        let stale = m.built.is_none_or(|b| {
            let age = now.saturating_duration_since(b);
            (m.dirty && age >= REBUILD) || age >= ttl / 2
        });
        let mut moved = false;
        if stale {
            let before = m.nodes.len();
            moved = m.rebuild(now, ttl, !warming);
            self.entries = self.entries + m.nodes.len() - before;
        }
        // A shape asked for the first time gets its orders (and so its tops) in the answer.
        let shapes = m.orders.len();
        let mut answer = m.answer(node, ask, self.federated);
        if moved || m.orders.len() != shapes {
            self.changes += 1;
            m.changed = self.changes;
        }
        answer.provisional = warming;
        (answer, recorded)
    }

    /// Per image, the nodes heard from within the TTL at `now`.
    pub fn live(&self, now: Instant) -> Vec<(Bytes32, usize)> {
        let ttl = self.ttl;
        self.images
            .iter()
            .map(|(id, m)| {
                (*id, m.nodes.values().filter(|(_, last)| now.saturating_duration_since(*last) < ttl).count())
            })
            .collect()
    }

    /// What this tracker tells the others (see [`super::federation`]): per image whose tops
    /// changed after `since` (a value of [`Roster::changes`]; 0 for all of them), the nodes of its
    /// snapshot ([`Roster::placed`]) and, per tree shape of the snapshot, the top of each class's
    /// tree (see [`Roster::tops`]).
    pub fn summary(&self, since: u64) -> Vec<Summary> {
        self.images
            .iter()
            .filter(|(_, m)| since == 0 || m.changed > since)
            .map(|(id, m)| {
                let shapes = m.orders.keys().filter_map(|&c| Some((c, self.tops(id, c)?))).collect();
                Summary { image: *id, total: m.names.len() as u32, shapes }
            })
            .collect()
    }

    /// Per class of the `classes` trees of `image`, the first [`TOP`] names of the snapshot's
    /// order (the upper levels of this table's heap), if the snapshot holds that shape.
    pub fn tops(&self, image: &Bytes32, classes: u32) -> Option<Vec<Vec<String>>> {
        let m = self.images.get(image)?;
        let orders = m.orders.get(&classes)?;
        Some(orders.iter().map(|o| o.iter().take(TOP).map(|&(_, i)| m.names[i as usize].clone()).collect()).collect())
    }

    /// How many times some image's tops changed (a rebuild moved them, or a shape was asked
    /// for the first time): a tracker tells the others as soon as this moves, so that the joined
    /// trees follow a new root within a rebuild interval and a round trip, not a push period.
    pub fn changes(&self) -> u64 {
        self.changes
    }

    /// Nodes in `image`'s snapshot: the partition whose tops [`Roster::tops`] gives, as the
    /// federation sizes it (the same number the other trackers hear in its summary).
    pub fn placed(&self, image: &Bytes32) -> usize {
        self.images.get(image).map_or(0, |m| m.names.len())
    }

    /// Nodes recorded for `image` (live or not yet swept).
    pub fn nodes(&self, image: &Bytes32) -> usize {
        self.images.get(image).map_or(0, |m| m.nodes.len())
    }
}

#[cfg(test)]
pub(super) mod tests;
