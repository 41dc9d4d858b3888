//! Trackers that share the load, as a pure state machine: each tracker places only the nodes
//! that register with it (its partition, an ordinary [`super::Roster`]), and the trackers join
//! their partitions' trees through their roots. No I/O and no clock (callers pass `now`); vmtd's
//! tracker and `vmt sim` feed it the same summaries.
//!
//! A node registers with one tracker, its home (the first of the configured trackers ranked by
//! [`rank`], a rendezvous hash of node and tracker names), or the next that answers; so with M
//! trackers each holds about N / M nodes and answers N / M heartbeats. Every sync period a
//! tracker sends each other tracker a [`Summary`] per image: how many nodes it holds and, for
//! each tree shape asked, the root of each class's tree in its partition. Its size depends on
//! images, shapes and classes, never on N.
//!
//! The joined tree of class c: within a partition, the partition's heap (as with one tracker);
//! above the partition roots, a `fanout`-ary heap over the roots of every partition, sorted by
//! key, highest first. A root's key is the highest of its partition, and a heap's parent ranks
//! above its child, so every chain still climbs strictly ([`super::tree`]): no loop whatever each
//! tracker has heard, and the single root of all (the highest key anywhere) is the only node that
//! reads the origin for the class once the summaries have gone round. A partition root has up to
//! `fanout` children in each heap.
//!
//! Invariants: summaries from a tracker count for `ttl` after they were heard (a tracker gone
//! quiet drops out of the joined trees, and its nodes fail over to other trackers); at most
//! [`MAX_IMAGES`] images per tracker and [`MAX_SHAPES`] shapes per image are kept, names that are
//! not canonical peer addresses are dropped, and only configured trackers are heard.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use super::roster::{Answer, Ask, MAX_CLASSES, MAX_DEPTH, MAX_FANOUT, MAX_IMAGES, MAX_SHAPES};
use super::tree::{higher_first, node_hash, parent_place, Key};
use crate::p2p::wire::{Bytes32, Summary};

/// Most images one summary frame carries (a tracker sends as many frames as it needs).
pub const SUMMARY_IMAGES: usize = 64;

/// The order in which node `me` tries `trackers`: highest rendezvous score first. Every node
/// computes it alone, and removing a tracker moves only that tracker's nodes (to their next).
pub fn rank(me: &str, trackers: &[String]) -> Vec<usize> {
    let mut order: Vec<(u64, usize)> = trackers
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let h = blake3::Hasher::new().update(me.as_bytes()).update(&[0]).update(t.as_bytes()).finalize();
            (u64::from_le_bytes(h.as_bytes()[..8].try_into().expect("8 bytes")), i)
        })
        .collect();
    order.sort_unstable_by(|a, b| b.cmp(a));
    order.into_iter().map(|(_, i)| i).collect()
}

/// What the other trackers said: tracker → image → (summary, when heard).
#[derive(Debug, Clone)]
pub struct Federation {
    ttl: Duration,
    heard: HashMap<usize, HashMap<Bytes32, (Summary, Instant)>>,
    /// Per tracker, when it last sent anything (a tracker with no nodes sends empty summaries).
    last: HashMap<usize, Instant>,
}

impl Federation {
    /// Summaries count for `ttl` (the trackers' node TTL: a tracker is as alive as a node).
    pub fn new(ttl: Duration) -> Federation {
        Federation { ttl, heard: HashMap::new(), last: HashMap::new() }
    }

    /// Tracker `from` (its index among the configured trackers) sent `summaries` at `now`.
    pub fn heard(&mut self, from: usize, summaries: Vec<Summary>, now: Instant) {
        let ttl = self.ttl;
        self.last.insert(from, now);
        let images = self.heard.entry(from).or_default();
        images.retain(|_, (_, t)| now.saturating_duration_since(*t) < ttl);
        for mut s in summaries {
            if images.len() >= MAX_IMAGES && !images.contains_key(&s.image) {
                continue;
            }
            s.shapes.truncate(MAX_SHAPES);
            for (classes, roots) in &mut s.shapes {
                *classes = (*classes).clamp(1, MAX_CLASSES);
                roots.truncate(*classes as usize);
                // A root that is no canonical peer address is left out of its class's heap
                // (an empty name keeps the classes aligned).
                for r in roots.iter_mut().filter(|r| !crate::p2p::conn::is_canonical(r)) {
                    r.clear();
                }
            }
            images.insert(s.image, (s, now));
        }
    }

    /// Nodes the other trackers hold for `image`, as last heard within the TTL.
    pub fn total(&self, image: &Bytes32, now: Instant) -> u32 {
        self.fresh(image, now).map(|s| s.total).fold(0u32, u32::saturating_add)
    }

    fn fresh<'a>(&'a self, image: &'a Bytes32, now: Instant) -> impl Iterator<Item = &'a Summary> + 'a {
        let ttl = self.ttl;
        self.heard
            .values()
            .filter_map(move |m| m.get(image))
            .filter(move |(_, t)| now.saturating_duration_since(*t) < ttl)
            .map(|(s, _)| s)
    }

    /// The ancestors of `root` (this tracker's root of class `class` for `classes` trees) in the
    /// heap over the partition roots of every tracker, parent first.
    pub fn above(
        &self,
        image: &Bytes32,
        classes: u32,
        fanout: u32,
        class: u32,
        root: &str,
        now: Instant,
    ) -> Vec<String> {
        let key = |n: &str| Key::new(node_hash(n), class, classes);
        let mut roots: Vec<(Key, &str)> = vec![(key(root), root)];
        for s in self.fresh(image, now) {
            let Some((_, rs)) = s.shapes.iter().find(|(c, _)| *c == classes) else { continue };
            if let Some(r) = rs.get(class as usize).filter(|r| !r.is_empty()) {
                roots.push((key(r), r.as_str()));
            }
        }
        roots.sort_unstable_by(higher_first);
        roots.dedup_by(|a, b| a.1 == b.1);
        let Some(mut place) = roots.iter().position(|(_, n)| *n == root) else { return Vec::new() };
        let mut up = Vec::new();
        while let Some(p) = parent_place(place, fanout) {
            if up.len() == MAX_DEPTH {
                break;
            }
            up.push(roots[p].1.to_string());
            place = p;
        }
        up
    }

    /// Extends `answer` (this tracker's answer to `me`, from its partition) with the joined
    /// trees: where a chain ends at the partition's root, the root's ancestors among the
    /// partition roots follow; and the count is of every tracker's nodes.
    pub fn join(&self, image: &Bytes32, me: &str, ask: Ask, answer: &mut Answer, now: Instant) {
        let classes = ask.classes.clamp(1, MAX_CLASSES);
        for (c, up) in answer.ancestors.iter_mut().enumerate() {
            // A chain shorter than the bound ends at place 0: the partition's root.
            if up.len() >= MAX_DEPTH {
                continue;
            }
            let root = up.last().map_or(me, String::as_str).to_string();
            let more = self.above(image, classes, ask.fanout.clamp(1, MAX_FANOUT), c as u32, &root, now);
            up.extend(more.into_iter().filter(|n| n != me));
            up.truncate(MAX_DEPTH);
        }
        answer.total = answer.total.saturating_add(self.total(image, now));
    }

    /// Trackers heard from within the TTL.
    pub fn trackers_heard(&self, now: Instant) -> usize {
        let ttl = self.ttl;
        self.last.values().filter(|t| now.saturating_duration_since(**t) < ttl).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::p2p::core::roster::{Roster, REBUILD};
    use crate::p2p::core::tree::above;

    const ASK: Ask = Ask { classes: 4, fanout: 4, near: 8 };

    fn name(i: u32) -> String {
        format!("10.{}.{}.{}:7000", i >> 16, (i >> 8) & 255, i & 255)
    }

    #[test]
    fn rank_is_a_stable_permutation_that_spreads_nodes_evenly() {
        let trackers: Vec<String> = (1..=4).map(|i| format!("10.9.0.{i}:7070")).collect();
        let mut homes = [0u32; 4];
        for i in 0..4000 {
            let r = rank(&name(i), &trackers);
            let mut sorted = r.clone();
            sorted.sort_unstable();
            assert_eq!(sorted, vec![0, 1, 2, 3]);
            assert_eq!(r, rank(&name(i), &trackers), "the same every time");
            // Without tracker 3, a node keeps its order among the others.
            let without: Vec<usize> = rank(&name(i), &trackers[..3]);
            assert_eq!(without, r.iter().copied().filter(|&t| t != 3).collect::<Vec<_>>());
            homes[r[0]] += 1;
        }
        assert!(homes.iter().all(|&h| (850..=1150).contains(&h)), "about N / M each: {homes:?}");
    }

    /// `m` trackers' rosters with nodes `0..n` registered at their homes, warm, and each
    /// tracker's federation having heard every other's summaries.
    fn cluster(n: u32, m: usize) -> (Vec<Roster>, Vec<Federation>, Instant) {
        let trackers: Vec<String> = (0..m).map(|i| format!("10.9.0.{i}:7070")).collect();
        let ttl = Duration::from_secs(3);
        let mut rosters: Vec<Roster> = (0..m).map(|_| Roster::new(ttl, 8)).collect();
        let t0 = Instant::now();
        let img = [1; 32];
        for beat in 0..2 {
            for i in 0..n {
                let home = rank(&name(i), &trackers)[0];
                rosters[home].register(img, &name(i), ASK, t0 + Duration::from_secs(beat));
            }
        }
        let now = t0 + Duration::from_secs(2) + REBUILD;
        // One registration each at `now` rebuilds every tracker's snapshot.
        for (t, r) in rosters.iter_mut().enumerate() {
            let home = (0..n).find(|&i| rank(&name(i), &trackers)[0] == t).expect("a node at each tracker");
            r.register(img, &name(home), ASK, now);
        }
        let mut feds: Vec<Federation> = (0..m).map(|_| Federation::new(ttl)).collect();
        for (to, fed) in feds.iter_mut().enumerate() {
            for (from, r) in rosters.iter().enumerate().filter(|(from, _)| *from != to) {
                fed.heard(from, r.summary(), now);
            }
        }
        (rosters, feds, now)
    }

    #[test]
    fn partitions_join_into_one_tree_per_class_that_climbs_strictly() {
        let (n, m) = (6000u32, 3usize);
        let (mut rosters, feds, now) = cluster(n, m);
        let trackers: Vec<String> = (0..m).map(|i| format!("10.9.0.{i}:7070")).collect();
        let img = [1; 32];
        let mut roots = vec![0u32; ASK.classes as usize];
        let mut children: HashMap<(usize, String), u32> = HashMap::new();
        let mut load = vec![0u32; m];
        for i in 0..n {
            let me = name(i);
            let home = rank(&me, &trackers)[0];
            load[home] += 1;
            let (mut a, _) = rosters[home].register(img, &me, ASK, now);
            feds[home].join(&img, &me, ASK, &mut a, now);
            assert_eq!(a.total, n, "every tracker counts the nodes of all");
            for (c, up) in a.ancestors.iter().enumerate() {
                let mut below = me.as_str();
                for u in up {
                    assert!(above(u, below, c as u32, ASK.classes), "{u} above {below} in class {c}");
                    below = u;
                }
                assert!(up.len() <= 9, "about log4 N deep: {up:?}");
                match up.first() {
                    Some(p) => *children.entry((c, p.clone())).or_default() += 1,
                    None => roots[c] += 1,
                }
            }
        }
        assert_eq!(roots, vec![1; 4], "one root per class over all trackers");
        assert!(children.values().all(|&k| k <= 2 * ASK.fanout), "a fanout per heap");
        assert!(load.iter().all(|&l| l > n / 4 && l < n / 2), "each tracker answers about N / M: {load:?}");
    }

    #[test]
    fn a_silent_tracker_drops_out_and_bad_summaries_are_bounded() {
        let (mut rosters, mut feds, now) = cluster(300, 2);
        let img = [1; 32];
        assert_eq!(feds[0].total(&img, now), rosters[1].nodes(&img) as u32);
        assert_eq!(feds[0].trackers_heard(now), 1);
        let later = now + Duration::from_secs(4);
        assert_eq!((feds[0].total(&img, later), feds[0].trackers_heard(later)), (0, 0), "gone after the ttl");
        // Nothing above a partition's root once its peers are gone: it reads the origin.
        let root = rosters[0].summary()[0].shapes[0].1[0].clone();
        assert!(feds[0].above(&img, 4, 4, 0, &root, later).is_empty());
        // Garbage is bounded: shapes, classes and names.
        let junk = Summary {
            image: img,
            total: u32::MAX,
            shapes: (1..10).map(|c| (c * 100, vec!["not a name".to_string(); 500])).collect(),
        };
        feds[0].heard(1, vec![junk], later);
        let s = &feds[0].heard[&1][&img].0;
        assert_eq!(s.shapes.len(), MAX_SHAPES);
        assert!(s.shapes.iter().all(|(c, r)| *c <= MAX_CLASSES && r.len() <= MAX_CLASSES as usize));
        assert!(s.shapes.iter().flat_map(|(_, r)| r).all(|r| r.is_empty()));
        assert_eq!(feds[0].total(&img, later), u32::MAX, "saturating, never wrapping");
        let _ = rosters[0].register(img, &name(1), ASK, later);
    }
}
