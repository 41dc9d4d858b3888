//! The relay trees, as pure functions of node names: every stripe belongs to one of `classes`
//! trees (its class), and in the tree of class c every node has a key: (whether its group is c,
//! whether its second group is c, how early it joined the image, its score for c). A node's
//! group is its address's hash modulo `classes`, so the trees are interior-node-disjoint (as SplitStream's): the nodes of group c
//! fill the upper places of tree c and are leaves in every other tree, so each node forwards at
//! most one class of the image (`fanout` copies of a `1 / classes` share), whatever N is. This
//! needs `fanout` ≥ `classes` (a heap of fan-out k has about N / k inner places, a group about
//! N / classes members). A group is only about that size, so some trees have more inner places
//! than group members; the places left go to the nodes whose second group (another class, from
//! other bits of the hash) is c, so a node fills in for one other class at most. By score alone,
//! a node could fill in for several: with the trees of 100 nodes a tracker places over 10
//! trackers at N = 1,000, some node forwarded three classes and uploaded 3.2 working sets.
//!
//! Invariants: a key depends on names and the class alone, never on who is a member, so every
//! node ranks any two nodes alike; a node relays for a requester only if its key is higher, so
//! every relay chain climbs strictly and can never loop, whatever each node's view. The places
//! in a tree (a `fanout`-ary heap over the members sorted by key, highest first) are the
//! tracker's work ([`super::roster`]): a node learns its ancestors, not the whole order.

use std::cmp::Ordering;

/// A node name's hash: the basis of its group, its scores and its place on the tracker's ring.
/// Of its address alone, so a node keeps its group and place on the ring in every image and
/// across restarts (which change when it joined).
pub fn node_hash(name: &str) -> u64 {
    let h = blake3::hash(crate::p2p::conn::node_addr(name).as_bytes());
    u64::from_le_bytes(h.as_bytes()[..8].try_into().expect("8 bytes"))
}

/// splitmix64's finaliser: a cheap, well-mixed score of (node, class).
pub fn score(node: u64, class: u32) -> u64 {
    let mut z = node ^ (u64::from(class).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The class (tree) of a stripe.
pub fn class_of(stripe: u32, classes: u32) -> u32 {
    stripe % classes.max(1)
}

/// The group of a node: the class whose tree it may be an inner node of.
pub fn group_of(hash: u64, classes: u32) -> u32 {
    (hash % u64::from(classes.max(1))) as u32
}

/// What a node's keys are made of, read from its name alone: the hash of the name and when the
/// node joined the image (see [`joined_of`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeId {
    pub hash: u64,
    pub joined: u64,
}

/// The [`NodeId`] of a node name.
pub fn node_id(name: &str) -> NodeId {
    NodeId { hash: node_hash(name), joined: joined_of(name) }
}

/// When a node joined its image, in milliseconds since the Unix epoch: the `@MILLIS` suffix of
/// its name for the image (`10.0.0.5:7000@1796000000000`); a name without one ranks after
/// every join time.
pub fn joined_of(name: &str) -> u64 {
    crate::p2p::conn::join_time(name).unwrap_or(u64::MAX)
}

/// A node's key in the tree of one class; higher ranks nearer the root. Within its group, the
/// node that joined the image first ranks highest: a node joining later is placed below the
/// nodes already there, which hold more of the image than it does, and the places of the
/// others do not move when it joins.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Key {
    in_group: bool,
    in_second: bool,
    earlier: std::cmp::Reverse<u64>,
    score: u64,
}

/// The second group of a node: another class than its group, whose tree it fills in for.
pub fn second_group_of(hash: u64, classes: u32) -> u32 {
    let classes = classes.max(1);
    if classes == 1 {
        return 0;
    }
    let other = ((hash >> 32) % u64::from(classes - 1)) as u32;
    (group_of(hash, classes) + 1 + other) % classes
}

impl Key {
    pub fn new(id: NodeId, class: u32, classes: u32) -> Key {
        let hash = id.hash;
        let in_group = group_of(hash, classes) == class;
        let in_second = !in_group && second_group_of(hash, classes) == class;
        Key { in_group, in_second, earlier: std::cmp::Reverse(id.joined), score: score(hash, class) }
    }
}

/// Orders (key, name) pairs highest first; names break the (astronomically rare) ties so the
/// order is total.
pub fn higher_first(a: &(Key, &str), b: &(Key, &str)) -> Ordering {
    b.0.cmp(&a.0).then_with(|| b.1.cmp(a.1))
}

/// Whether `a` ranks above `b` in the tree of `class`.
pub fn above(a: &str, b: &str, class: u32, classes: u32) -> bool {
    let (ka, kb) = (Key::new(node_id(a), class, classes), Key::new(node_id(b), class, classes));
    (ka, a) > (kb, b)
}

/// The parent's place of the node at `place` in a `fanout`-ary heap (`None` for the root).
pub fn parent_place(place: usize, fanout: u32) -> Option<usize> {
    (place > 0).then(|| (place - 1) / fanout.max(1) as usize)
}

/// The parent's place in a partition's heap when trackers share the nodes
/// ([`super::federation`]): its root keeps one child (place 1, the root of an ordinary heap
/// below), so every partition root has room for the root of another partition in the joined
/// tree, and with `fanout` ≥ 2 joining M partitions needs no node with more than `fanout`
/// children (with `fanout` 1 this is the ordinary chain).
pub fn parent_place_federated(place: usize, fanout: u32) -> Option<usize> {
    match place {
        0 => None,
        1 => Some(0),
        p => Some((p - 2) / fanout.max(1) as usize + 1),
    }
}

/// The places of the children of `place` in a partition's heap (see [`parent_place_federated`]).
pub fn child_places_federated(place: usize, fanout: u32) -> std::ops::Range<usize> {
    let f = fanout.max(1) as usize;
    match place {
        0 => 1..2,
        p => {
            let first = (p - 1) * f + 2;
            first..first + f
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_fill_the_upper_places_of_their_own_tree_only() {
        let classes = 4;
        let names: Vec<String> = (0..400).map(|i| format!("10.0.{}.{}:7000", i / 256, i % 256)).collect();
        for class in 0..classes {
            let mut keyed: Vec<(Key, &str)> =
                names.iter().map(|n| (Key::new(node_id(n), class, classes), n.as_str())).collect();
            keyed.sort_by(higher_first);
            // The group comes first: with about N / classes members it fills the heap's inner
            // places (N / fanout of them) when fanout = classes.
            let group = keyed.iter().filter(|(k, _)| k.in_group).count();
            assert!((70..=130).contains(&group), "class {class}: a group of {group}");
            assert!(keyed[..group].iter().all(|(k, _)| k.in_group) && !keyed[group..].iter().any(|(k, _)| k.in_group));
            for w in keyed.windows(2) {
                assert!(above(w[0].1, w[1].1, class, classes) && !above(w[1].1, w[0].1, class, classes));
            }
        }
        // A group short of the inner places is filled in by the second group's nodes, so no
        // node is inner in more than two trees (100 nodes: the size of a partition at N = 1,000
        // over 10 trackers, where by score alone some node was inner in three).
        for set in 0..50 {
            let names: Vec<String> = (0..100).map(|i| format!("10.{set}.{}.{}:7000", i / 256, i % 256)).collect();
            // The places with a child at fan-out 4: p · 4 + 1 < N.
            let inner = (names.len() - 1).div_ceil(4);
            let mut trees = vec![0; names.len()];
            for class in 0..classes {
                let mut keyed: Vec<(Key, &str, usize)> = names
                    .iter()
                    .enumerate()
                    .map(|(i, n)| (Key::new(node_id(n), class, classes), n.as_str(), i))
                    .collect();
                keyed.sort_by(|a, b| higher_first(&(a.0, a.1), &(b.0, b.1)));
                keyed[..inner].iter().for_each(|&(_, _, i)| trees[i] += 1);
            }
            assert!(trees.iter().all(|&t| t <= 2), "set {set}: inner in {:?} trees", trees.iter().max());
        }
        assert_eq!(parent_place(0, 4), None);
        assert_eq!((1..=4).map(|p| parent_place(p, 4)).collect::<Vec<_>>(), vec![Some(0); 4]);
        assert_eq!(parent_place(5, 4), Some(1));
        // A federated partition's heap: the root keeps one child, below it an ordinary heap.
        for f in [1, 2, 4] {
            assert_eq!(parent_place_federated(0, f), None);
            assert_eq!(child_places_federated(0, f), 1..2);
            for p in 1..200 {
                let parent = parent_place_federated(p, f).unwrap();
                assert!(parent < p && child_places_federated(parent, f).contains(&p), "f {f}, place {p}");
            }
        }
        assert_eq!((2..=5).map(|p| parent_place_federated(p, 2)).collect::<Vec<_>>(), [1, 1, 2, 2].map(Some));
    }
}
