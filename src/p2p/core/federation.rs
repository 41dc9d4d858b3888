//! Trackers that share the load, as a pure state machine: each tracker places only the nodes
//! that register with it (its partition, an ordinary [`super::Roster`]), and the trackers join
//! their partitions' trees through the tops of them. No I/O and no clock (callers pass `now`);
//! vmtd's tracker and `vmt sim` feed it the same summaries.
//!
//! A node registers with one tracker, its home (the first of the configured trackers ranked by
//! [`rank`], a rendezvous hash of node and tracker names), or the next that answers; so with M
//! trackers each holds about N / M nodes and answers N / M heartbeats. Every ttl / 3, and as
//! soon as its tops changed ([`super::Roster::changes`]), a tracker sends each other tracker a
//! [`Summary`] per image: how many nodes it holds and, for each tree shape asked, the top of
//! each class's tree in its partition (the first [`TOP`] names of its order). Its size depends
//! on images, shapes and classes, never on N.
//!
//! The joined tree of class c: its upper levels are one tree over the tops of every partition
//! merged in key order (the same tree at every tracker once the summaries have gone round: each
//! merges its current tops with the others' last summaries); below them, each partition's own
//! heap. A node's chain follows its partition's heap up to the first node among its partition's
//! tops, then that node's ancestors in the merged tree. In the merged tree each name takes as
//! parent the first name before it (so ranked above it) with room left, breadth first: a name's
//! room is its `fanout` less the children it keeps in its partition (those past the top), so
//! the lowest names of a large partition's top, which keep `fanout` children each, are leaves
//! there, and the tree is as shallow as a heap. Joining M full heaps would need M − 1 places
//! more than they have, so a federated tracker's heap keeps one child under its root
//! ([`super::tree::parent_place_federated`]): each partition's tops then have a place to spare
//! (with `fanout` ≥ 2), and once every tracker has heard the same summaries no node has more
//! than `fanout` children (a newcomer placed before the next rebuild may add one more for a
//! while; with `fanout` 1, the names that had room take one more each, the last first).
//! Partitions are sized by their snapshots ([`super::Roster::placed`]), the number each summary
//! carries, so every tracker computes the same rooms. Every step climbs strictly (a parent ranks
//! above its child, [`super::tree`]), so no chain can loop, whatever each tracker has heard; the
//! single root of all (the highest key anywhere) is the only node that reads the origin for the
//! class once the summaries have gone round. A newcomer the partition would place at its root, not yet in
//! the snapshot, enters the merged tree where its key puts it. With partitions of at most
//! [`TOP`] nodes, the merged tree holds every node and is exactly one tracker's heap over all
//! of them.
//!
//! Invariants: summaries from a tracker count for `ttl` after they were heard (a tracker gone
//! quiet drops out of the joined trees, and its nodes fail over to other trackers); at most
//! [`MAX_IMAGES`] images per tracker, [`MAX_SHAPES`] shapes per image and [`TOP`] names per class
//! are kept, names that are not canonical peer addresses are dropped, and only configured
//! trackers are heard.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use super::roster::{append_next_above, Answer, Ask, MAX_CLASSES, MAX_DEPTH, MAX_FANOUT, MAX_IMAGES, MAX_SHAPES, TOP};
use super::tree::{above, child_places_federated, higher_first, node_id, Key};
use crate::p2p::conn::node_addr;
use crate::p2p::wire::{Bytes32, Summary};

/// Most images one summary frame carries (a tracker sends as many frames as it needs): with
/// [`MAX_SHAPES`] shapes of 16 classes of [`TOP`] names of at most 80 bytes, under 1 MiB.
pub const SUMMARY_IMAGES: usize = 16;

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
    /// Bumped whenever a summary is heard: the merged orders below are recomputed after it.
    version: u64,
    /// Per (image, classes, class), the merged order of the tops and what it was computed from.
    merged: HashMap<(Bytes32, u32, u32), Merged>,
}

#[derive(Debug, Clone)]
struct Merged {
    own: (Vec<String>, u32, u32),
    from: Vec<usize>,
    version: u64,
    tops: Tops,
}

/// The merged tops of one class: names highest key first, and each one's parent (always a name
/// before it, so every chain climbs; `None` for the root).
#[derive(Debug, Clone, Default)]
struct Tops {
    names: Vec<String>,
    parent: Vec<Option<usize>>,
}

/// Children the node at `place` of a partition's heap keeps there (those at places past the
/// partition's `top` names, of its `total` nodes): the merged tree gives it only what is left of
/// its `fanout`. A partition's root keeps one child ([`child_places_federated`]), so the tops of
/// a full partition have `fanout` − 1 places more than their names need, and with `fanout` ≥ 2
/// M partitions join with no node above its `fanout`.
fn kept_children(place: usize, top: usize, total: usize, fanout: usize) -> usize {
    let kids = child_places_federated(place, fanout as u32);
    kids.end.min(total).saturating_sub(kids.start.max(top))
}

/// Appends a partition's `names` (the top of its tree of `class`, of `total` nodes) to `all`,
/// each with its room for children in the merged tree: its fan-out, less the children it keeps
/// in its own partition.
fn entries<'a>(names: &'a [String], total: u32, class: u32, shape: (u32, u32), all: &mut Vec<(Key, &'a str, usize)>) {
    let (classes, f) = (shape.0, shape.1 as usize);
    all.extend(names.iter().enumerate().map(|(place, n)| {
        let room = f.saturating_sub(kept_children(place, names.len(), total as usize, f));
        (Key::new(node_id(n), class, classes), n.as_str(), room)
    }));
}

impl Tops {
    /// The tree over `all` ((key, name, room for children) per top, sorted highest first): each
    /// name takes as parent the first name before it with room left, breadth first, so the tree
    /// is as shallow as a heap. The tops' own heaps have room for every partition root (each
    /// root keeps a place, [`kept_children`]); should places run short (`fanout` 1), the names
    /// with room to start with take one more each, the last first, none a second before all
    /// have had one.
    fn build(all: &[(Key, &str, usize)]) -> Tops {
        let mut parent = vec![None; all.len()];
        let mut room: Vec<usize> = all.iter().map(|x| x.2).collect();
        let (mut next, mut hosts) = (std::collections::VecDeque::new(), Vec::new());
        let mut extras = vec![0usize; all.len()];
        for k in 0..all.len() {
            if k > 0 {
                while next.front().is_some_and(|&j| room[j] == 0) {
                    next.pop_front();
                }
                let p = match next.front() {
                    Some(&j) => {
                        room[j] -= 1;
                        j
                    }
                    None if hosts.is_empty() => k - 1,
                    None => {
                        let h = *hosts.iter().rev().min_by_key(|&&j| extras[j]).expect("hosts is not empty");
                        extras[h] += 1;
                        h
                    }
                };
                parent[k] = Some(p);
            }
            if room[k] > 0 {
                next.push_back(k);
                hosts.push(k);
            }
        }
        Tops { names: all.iter().map(|x| x.1.to_string()).collect(), parent }
    }
}

impl Federation {
    /// Summaries count for `ttl` (the trackers' node TTL: a tracker is as alive as a node).
    pub fn new(ttl: Duration) -> Federation {
        Federation { ttl, heard: HashMap::new(), last: HashMap::new(), version: 0, merged: HashMap::new() }
    }

    /// Tracker `from` (its index among the configured trackers) sent `summaries` at `now`.
    pub fn heard(&mut self, from: usize, summaries: Vec<Summary>, now: Instant) {
        let ttl = self.ttl;
        self.last.insert(from, now);
        self.version += 1;
        let images = self.heard.entry(from).or_default();
        images.retain(|_, (_, t)| now.saturating_duration_since(*t) < ttl);
        for s in summaries {
            if images.len() >= MAX_IMAGES && !images.contains_key(&s.image) {
                continue;
            }
            // Rebuilt, not cut down in place: a frame full of empty lists would otherwise keep
            // their allocations. Only canonical peer addresses (peer servers admit no other
            // spelling).
            let shapes = s
                .shapes
                .into_iter()
                .take(MAX_SHAPES)
                .map(|(classes, tops)| {
                    let classes = classes.clamp(1, MAX_CLASSES);
                    let tops = tops
                        .into_iter()
                        .take(classes as usize)
                        .map(|top| {
                            let names = top.into_iter().take(TOP).filter(|n| crate::p2p::conn::is_canonical(n));
                            names.map(|n| n.as_str().to_string()).collect()
                        })
                        .collect();
                    (classes, tops)
                })
                .collect();
            images.insert(s.image, (Summary { image: s.image, total: s.total, shapes }, now));
        }
        // Merged orders of images no tracker tells of any more go (memory: images × shapes ×
        // classes at most).
        let heard = &self.heard;
        self.merged.retain(|(img, _, _), _| heard.values().any(|m| m.contains_key(img)));
    }

    /// Nodes the other trackers hold for `image`, as last heard within the TTL.
    pub fn total(&self, image: &Bytes32, now: Instant) -> u32 {
        self.fresh(image, now).map(|(_, s)| s.total).fold(0u32, u32::saturating_add)
    }

    fn fresh<'a>(&'a self, image: &'a Bytes32, now: Instant) -> impl Iterator<Item = (usize, &'a Summary)> + 'a {
        let ttl = self.ttl;
        self.heard
            .iter()
            .filter_map(move |(t, m)| Some((*t, m.get(image)?)))
            .filter(move |(_, (_, at))| now.saturating_duration_since(*at) < ttl)
            .map(|(t, (s, _))| (t, s))
    }

    /// The tops of class `class` of every tracker heard (and `own`, this tracker's, of a
    /// partition of `own_total` nodes), merged into one tree (see [`Tops::build`]).
    fn tops(&mut self, image: &Bytes32, shape: (u32, u32), class: u32, own: (&[String], u32), now: Instant) -> &Tops {
        let ((classes, fanout), (top, own_total)) = (shape, own);
        let mut from: Vec<usize> = self.fresh(image, now).map(|(t, _)| t).collect();
        from.sort_unstable();
        let (version, cache_key) = (self.version, (*image, classes, class));
        let stale = self.merged.get(&cache_key).is_none_or(|m| {
            m.version != version || m.from != from || m.own.0 != top || (m.own.1, m.own.2) != (own_total, fanout)
        });
        if stale {
            let shape = (classes, fanout);
            let mut all: Vec<(Key, &str, usize)> = Vec::new();
            entries(top, own_total, class, shape, &mut all);
            for (_, s) in self.fresh(image, now) {
                let Some((_, tops)) = s.shapes.iter().find(|(c, _)| *c == classes) else { continue };
                if let Some(names) = tops.get(class as usize) {
                    entries(names, s.total, class, shape, &mut all);
                }
            }
            // A name two partitions list (a node moving between trackers) is kept once, with the
            // lesser room, so that every tracker builds the same tree whatever order it heard in.
            all.sort_unstable_by(|a, b| higher_first(&(a.0, a.1), &(b.0, b.1)).then(a.2.cmp(&b.2)));
            all.dedup_by(|a, b| a.1 == b.1);
            let tops = Tops::build(&all);
            // Bounded whatever images nodes register: at most one tree per image, shape and class.
            if self.merged.len() >= MAX_IMAGES * MAX_SHAPES * MAX_CLASSES as usize {
                self.merged.clear();
            }
            let own = (top.to_vec(), own_total, fanout);
            self.merged.insert(cache_key, Merged { own, from, version, tops });
        }
        &self.merged[&cache_key].tops
    }

    /// Extends `answer` (this tracker's answer to `me`, from its partition of `own.1` nodes, whose
    /// tops are `own.0`: per class the first [`TOP`] names of its order) with the joined trees.
    /// The chain is kept up to its first node among the tops (`me` itself, maybe), and goes on
    /// from there with that node's ancestors in the tree over the merged tops of every tracker
    /// heard; and the count is of every tracker's nodes. With no other tracker heard, the tree
    /// over its own tops alone is an ordinary heap (its root's one child in the partition is a
    /// top itself, so the root has room for `fanout`): loop-free, no node above `fanout`.
    pub fn join(
        &mut self,
        image: &Bytes32,
        me: &str,
        ask: Ask,
        answer: &mut Answer,
        own: (&[Vec<String>], u32),
        now: Instant,
    ) {
        let (own, own_total) = own;
        let classes = ask.classes.clamp(1, MAX_CLASSES);
        let fanout = ask.fanout.clamp(1, MAX_FANOUT);
        for (c, up) in answer.ancestors.iter_mut().enumerate() {
            let Some(top) = own.get(c) else { continue };
            // The partition's node ranked right above `me`, after the chain (see `Answer`): kept
            // aside while the chain is joined, then the merged tops' own where `me` is one.
            let last_two = up.len().checked_sub(2).map(|k| (&up[k + 1], &up[k]));
            let off_chain = last_two.is_some_and(|(l, b)| !above(l, b, c as u32, classes));
            let mut next = if off_chain { up.pop() } else { None };
            'join: {
                // The first of the chain (from `me`) among the tops; none when the chain was cut at
                // the depth bound before it got there. A node with no chain at all is its
                // partition's root, in the snapshot's tops or not yet (a newcomer is placed where it
                // would be before the next rebuild records it): it enters the merged tree itself.
                // Left alone, such a newcomer would read the origin as a root of its own until its
                // next heartbeat, however many nodes rank above it elsewhere.
                let seq = std::iter::once(me).chain(up.iter().map(String::as_str));
                let Some(i) = seq.clone().position(|n| top.iter().any(|t| t == n)).or(up.is_empty().then_some(0))
                else {
                    break 'join;
                };
                let entry = seq.clone().nth(i).expect("found above").to_string();
                let tops = self.tops(image, (classes, fanout), c as u32, (top, own_total), now);
                let names = &tops.names;
                let mut at = match names.iter().position(|n| *n == entry) {
                    Some(p) => tops.parent[p],
                    // Where it would be, under the parent of the name it would come before (which
                    // ranks above it, as every name before that place does), or the last name.
                    None if i == 0 => {
                        let key = |n: &str| Key::new(node_id(n), c as u32, classes);
                        let mine = (key(me), me);
                        let q = names.partition_point(|n| higher_first(&(key(n), n.as_str()), &mine).is_lt());
                        if q < names.len() {
                            tops.parent[q]
                        } else {
                            q.checked_sub(1)
                        }
                    }
                    None => break 'join,
                };
                let mut above = Vec::new();
                while let Some(p) = at {
                    above.push(names[p].clone());
                    at = tops.parent[p];
                }
                if i == 0 {
                    if let Some(p) = names.iter().position(|n| node_addr(n) == node_addr(me)) {
                        next = p.checked_sub(1).map(|q| names[q].clone());
                    }
                }
                up.truncate(i);
                up.extend(above);
                up.truncate(MAX_DEPTH);
            }
            append_next_above(up, next, me);
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
    use crate::p2p::core::roster::tests::{name, ASK};
    use crate::p2p::core::roster::Roster;
    use crate::p2p::core::tree::above;

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
        let mut rosters: Vec<Roster> = (0..m).map(|_| Roster::new(ttl, 8).federated(m > 1)).collect();
        let t0 = Instant::now();
        let img = [1; 32];
        for beat in 0..2 {
            for i in 0..n {
                let home = rank(&name(i), &trackers)[0];
                rosters[home].register(img, &name(i), ASK, t0 + Duration::from_secs(beat));
            }
        }
        // Half a ttl after the last rebuild (at the second beat): one registration each at `now`
        // rebuilds every tracker's snapshot.
        let now = t0 + Duration::from_secs(1) + ttl / 2;
        for (t, r) in rosters.iter_mut().enumerate() {
            let home = (0..n).find(|&i| rank(&name(i), &trackers)[0] == t).expect("a node at each tracker");
            r.register(img, &name(home), ASK, now);
        }
        let mut feds: Vec<Federation> = (0..m).map(|_| Federation::new(ttl)).collect();
        for (to, fed) in feds.iter_mut().enumerate() {
            for (from, r) in rosters.iter().enumerate().filter(|(from, _)| *from != to) {
                fed.heard(from, r.summary(0), now);
            }
        }
        (rosters, feds, now)
    }

    /// Node `me`'s answer from its home tracker, joined.
    fn joined(rosters: &mut [Roster], feds: &mut [Federation], home: usize, me: &str, now: Instant) -> Answer {
        let img = [1; 32];
        let (mut a, _) = rosters[home].register(img, me, ASK, now);
        let tops = rosters[home].tops(&img, ASK.classes).expect("a snapshot");
        let own = (tops.as_slice(), rosters[home].placed(&img) as u32);
        feds[home].join(&img, me, ASK, &mut a, own, now);
        a
    }

    #[test]
    fn partitions_join_into_one_tree_per_class_that_climbs_strictly() {
        let (n, m) = (6000u32, 3usize);
        let (mut rosters, mut feds, now) = cluster(n, m);
        let trackers: Vec<String> = (0..m).map(|i| format!("10.9.0.{i}:7070")).collect();
        let mut roots = vec![0u32; ASK.classes as usize];
        let mut children: HashMap<(usize, String), u32> = HashMap::new();
        let mut load = vec![0u32; m];
        for i in 0..n {
            let me = name(i);
            let home = rank(&me, &trackers)[0];
            load[home] += 1;
            let a = joined(&mut rosters, &mut feds, home, &me, now);
            assert_eq!(a.total, n, "every tracker counts the nodes of all");
            for (c, up) in a.ancestors.iter().enumerate() {
                // Each above the one before, but for a last one off the chain (the node ranked
                // right above `me`), which is above `me`.
                let mut below = me.as_str();
                for (k, u) in up.iter().enumerate() {
                    assert!(above(u, &me, c as u32, ASK.classes), "{u} above {me} in class {c}");
                    if !above(u, below, c as u32, ASK.classes) {
                        assert_eq!(k + 1, up.len(), "only the last may leave the chain: {up:?}");
                    }
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
        // Full heaps would need M − 1 places more than they have; each partition's root keeps
        // one, so no node has more than `fanout` children.
        assert!(children.values().all(|&k| k <= ASK.fanout), "fanout at most: {:?}", children.values().max());
        assert!(load.iter().all(|&l| l > n / 4 && l < n / 2), "each tracker answers about N / M: {load:?}");
    }

    #[test]
    fn partition_tops_have_the_places_their_names_need() {
        // With fan-out 2 or more, the tops of a partition of any size have at least as many
        // places for children in the joined tree as they have names: joining M partitions
        // needs no node above its fan-out.
        for f in 2..=MAX_FANOUT as usize {
            for total in [1, 2, 21, 22, 43, 100, 1000, 100_000] {
                let tops = TOP.min(total);
                let room: usize = (0..tops).map(|p| f - kept_children(p, TOP, total, f)).sum();
                assert!(room >= tops, "fan-out {f}, {total} nodes: room {room} for {tops} tops");
            }
        }
        // Fan-out 1 (chains) is short one place per partition: ten partitions of 1,000 nodes,
        // whose tops have room for all but one of them; the names with room take one more
        // each, never two while another has none.
        let names: Vec<String> = (0..10_000).map(name).collect();
        let mut all: Vec<(Key, &str, usize)> = Vec::new();
        for q in 0..10 {
            let mut part: Vec<(Key, &str)> =
                names.iter().skip(q).step_by(10).map(|n| (Key::new(node_id(n), 0, 1), n.as_str())).collect();
            part.sort_by(higher_first);
            all.extend(part[..TOP].iter().enumerate().map(|(p, &(k, n))| (k, n, 1 - kept_children(p, TOP, 1000, 1))));
        }
        all.sort_by(|a, b| higher_first(&(a.0, a.1), &(b.0, b.1)));
        let tops = Tops::build(&all);
        // Each name's children: those it keeps in its partition (1 - room) and in the tree.
        let mut children: Vec<usize> = all.iter().map(|e| 1 - e.2).collect();
        for p in tops.parent.iter().flatten() {
            children[*p] += 1;
        }
        assert!(children.iter().all(|&c| c <= 2), "at most one extra child each: {:?}", children.iter().max());
        assert!(children.iter().filter(|&&c| c == 2).count() >= 9, "the 9 extra places were taken");
    }

    #[test]
    fn a_newcomer_above_its_partition_climbs_into_the_joined_tree() {
        let (n, m) = (300u32, 3usize);
        let (mut rosters, mut feds, now) = cluster(n, m);
        let trackers: Vec<String> = (0..m).map(|i| format!("10.9.0.{i}:7070")).collect();
        let img = [1; 32];
        // The root of each class over all trackers.
        let tops: Vec<Vec<Vec<String>>> = rosters.iter().map(|r| r.tops(&img, ASK.classes).unwrap()).collect();
        let root = |c: u32| {
            let mut all: Vec<&String> = tops.iter().map(|t| &t[c as usize][0]).collect();
            all.sort_by(|a, b| {
                if above(a, b, c, ASK.classes) {
                    std::cmp::Ordering::Less
                } else {
                    std::cmp::Ordering::Greater
                }
            });
            all[0].clone()
        };
        // A node not yet in its tracker's snapshot (registered at the instant of the last
        // rebuild) that would be its partition's root in some class, but not the root of all.
        let (me, home, c) = (n..n + 20_000)
            .map(name)
            .find_map(|me| {
                let home = rank(&me, &trackers)[0];
                let c = (0..ASK.classes).find(|&c| {
                    above(&me, &tops[home][c as usize][0], c, ASK.classes) && !above(&me, &root(c), c, ASK.classes)
                })?;
                Some((me, home, c))
            })
            .expect("such a name");
        // The snapshots were rebuilt at `now`: the newcomer's registration is not recorded in
        // them before the next rebuild.
        let a = joined(&mut rosters, &mut feds, home, &me, now);
        let up = &a.ancestors[c as usize];
        assert!(!rosters[home].tops(&img, ASK.classes).unwrap()[c as usize].contains(&me), "not in the snapshot yet");
        assert_eq!(up.last(), Some(&root(c)), "its chain ends at the root of all, not at itself: {up:?}");
        let mut below = me.as_str();
        for u in up {
            assert!(above(u, below, c, ASK.classes), "{u} above {below}");
            below = u;
        }
    }

    #[test]
    fn small_partitions_join_into_exactly_the_one_tracker_heap() {
        let (n, m) = (40u32, 3usize);
        let (mut rosters, mut feds, now) = cluster(n, m);
        let trackers: Vec<String> = (0..m).map(|i| format!("10.9.0.{i}:7070")).collect();
        let (mut one, _, _) = cluster(n, 1);
        for i in 0..n {
            let me = name(i);
            let home = rank(&me, &trackers)[0];
            assert!(rosters[home].nodes(&[1; 32]) <= TOP, "every partition within its top");
            let a = joined(&mut rosters, &mut feds, home, &me, now);
            let (b, _) = one[0].register([1; 32], &me, ASK, now);
            assert_eq!(a.ancestors, b.ancestors, "{me}");
        }
    }

    #[test]
    fn a_silent_tracker_drops_out_and_bad_summaries_are_bounded() {
        let (mut rosters, mut feds, now) = cluster(300, 2);
        let img = [1; 32];
        assert_eq!(feds[0].total(&img, now), rosters[1].nodes(&img) as u32);
        assert_eq!(feds[0].trackers_heard(now), 1);
        let later = now + Duration::from_secs(4);
        assert_eq!((feds[0].total(&img, later), feds[0].trackers_heard(later)), (0, 0), "gone after the ttl");
        // Once its peers are gone, a partition's root has nothing above it: it reads the origin.
        let root = rosters[0].tops(&img, 4).unwrap()[0][0].clone();
        let a = joined(&mut rosters, &mut feds, 0, &root, later);
        assert!(a.ancestors[0].is_empty(), "{:?}", a.ancestors);
        // Garbage is bounded: shapes, classes and names.
        let junk = Summary {
            image: img,
            total: u32::MAX,
            shapes: (1..10).map(|c| (c * 100, vec![vec!["not a name".to_string(); 500]; 500])).collect(),
        };
        feds[0].heard(1, vec![junk], later);
        let s = &feds[0].heard[&1][&img].0;
        assert_eq!(s.shapes.len(), MAX_SHAPES);
        assert!(s.shapes.iter().all(|(c, t)| *c <= MAX_CLASSES && t.len() <= MAX_CLASSES as usize));
        assert!(s.shapes.iter().flat_map(|(_, t)| t).all(|t| t.is_empty()));
        assert_eq!(feds[0].total(&img, later), u32::MAX, "saturating, never wrapping");
    }
}
