//! Unit tests of the tracker's table: places, successors, join order, bounds.

use super::*;
use crate::p2p::core::tree::above;

pub(crate) const ASK: Ask = Ask { classes: 4, fanout: 4, near: 8 };

/// Node `i`'s name: an address of its own.
pub(crate) fn name(i: u32) -> String {
    format!("10.{}.{}.{}:7000", i >> 16, (i >> 8) & 255, i & 255)
}

#[test]
fn nodes_expire_after_the_ttl_and_never_see_themselves() {
    let mut t = Roster::new(Duration::from_secs(3), 8);
    let t0 = Instant::now();
    let img = [1; 32];
    assert!(t.register(img, "a:1", ASK, t0).0.names().is_empty());
    assert_eq!(t.register([2; 32], "c:1", ASK, t0).0.names(), Vec::<&str>::new(), "images are apart");
    let later = t0 + REBUILD;
    assert_eq!(t.register(img, "b:1", ASK, later).0.names(), vec!["a:1"]);
    // b keeps its heartbeat; a, last heard at t0, expires after the ttl.
    for s in 1..=4 {
        let (a, _) = t.register(img, "b:1", ASK, t0 + Duration::from_secs(s));
        assert_eq!(a.names().is_empty(), s == 4, "{s} s: {a:?}");
    }
}

#[test]
fn answers_are_bounded_and_name_strictly_higher_ancestors_of_a_heap() {
    let mut t = Roster::new(Duration::from_secs(3), 8);
    let t0 = Instant::now();
    let img = [1; 32];
    let n = 20_000u32;
    // Two heartbeats of every node: the table is warm (half a ttl) at the third.
    for beat in 0..2 {
        for i in 0..n {
            t.register(img, &name(i), ASK, t0 + Duration::from_secs(beat));
        }
    }
    let now = t0 + Duration::from_secs(2);
    let mut children: HashMap<(usize, String), u32> = HashMap::new();
    let mut roots = vec![0; ASK.classes as usize];
    for i in 0..n {
        let me = name(i);
        let (a, r) = t.register(img, &me, ASK, now);
        assert_eq!(r, Recorded::Yes);
        assert_eq!(a.total, n);
        assert_eq!(a.near.len(), 8);
        assert!(a.ancestors.iter().all(|up| up.len() <= 9), "depth about log4 N: {:?}", a.ancestors);
        for (c, up) in a.ancestors.iter().enumerate() {
            // The chain to the root, each above the one before; then maybe the node ranked
            // right above this one, above it too.
            let mut below = me.as_str();
            for (k, u) in up.iter().enumerate() {
                assert!(above(u, &me, c as u32, ASK.classes), "{u} above {me} in class {c}");
                if !above(u, below, c as u32, ASK.classes) {
                    assert_eq!(k + 1, up.len(), "only the last may leave the chain: {up:?}");
                    break;
                }
                below = u;
            }
            match up.first() {
                Some(p) => *children.entry((c, p.clone())).or_default() += 1,
                None => roots[c] += 1,
            }
        }
    }
    assert_eq!(roots, vec![1; 4], "one root per class: the only node that reads the origin");
    assert!(children.values().all(|&k| k <= ASK.fanout), "at most fanout children");
    // A node is an inner node in (nearly always) one class only.
    let mut inner: HashMap<&str, u32> = HashMap::new();
    for (_, p) in children.keys() {
        *inner.entry(p.as_str()).or_default() += 1;
    }
    let twice = inner.values().filter(|&&k| k > 1).count();
    assert!(twice * 100 < inner.len(), "{twice} of {} inner nodes are inner twice", inner.len());
    assert_eq!(t.nodes(&img), n as usize, "no node cap");
}

#[test]
fn nodes_that_joined_earlier_are_placed_higher_and_a_newcomer_moves_no_one() {
    // One tree of fan-out 2 (vmtd's default): 200 nodes joining 1 ms apart, their names
    // (ports) in no order of their join times.
    let ask = Ask { classes: 1, fanout: 2, near: 8 };
    let mut t = Roster::new(Duration::from_secs(3), 8);
    let t0 = Instant::now();
    let img = [1; 32];
    let joined = |i: u32| 1_796_000_000_000 + u64::from(i);
    let named = |i: u32| format!("{}@{}", name(i.wrapping_mul(2_654_435_761) >> 8), joined(i));
    let beat = |t: &mut Roster, n: u32, at: Instant| {
        for i in 0..n {
            t.register(img, &named(i), ask, at);
        }
    };
    beat(&mut t, 200, t0);
    beat(&mut t, 200, t0 + Duration::from_secs(2));
    let now = t0 + Duration::from_secs(2);
    let chains: Vec<Vec<String>> =
        (0..200).map(|i| t.register(img, &named(i), ask, now).0.ancestors[0].clone()).collect();
    for (i, up) in chains.iter().enumerate() {
        // The heap over the join order: the parent of the i-th to join is the (i - 1) / 2-th.
        let parent = (i > 0).then(|| named((i as u32 - 1) / 2));
        assert_eq!(up.first().cloned(), parent, "node {i}");
        assert!(up.iter().all(|u| joined_of(u) < joined(i as u32)), "node {i}: every ancestor joined first");
    }
    // A newcomer takes the next place: everyone else keeps their chain.
    beat(&mut t, 201, now + REBUILD);
    for (i, up) in chains.iter().enumerate() {
        assert_eq!(&t.register(img, &named(i as u32), ask, now + REBUILD * 2).0.ancestors[0], up, "node {i}");
    }
    let up = t.register(img, &named(200), ask, now + REBUILD * 2).0.ancestors[0].clone();
    assert_eq!(up.first(), Some(&named(99)), "the newcomer is a leaf under the 100th");
}

#[test]
fn a_node_that_joins_again_replaces_its_old_name() {
    let ask = Ask { classes: 1, fanout: 2, near: 8 };
    let mut t = Roster::new(Duration::from_secs(3), 1);
    let t0 = Instant::now();
    let img = [1; 32];
    let (a1, a2, b) = ("10.0.0.1:7000@1796000000001", "10.0.0.1:7000@1796000000009", "10.0.0.2:7000@1796000000002");
    t.register(img, a1, ask, t0);
    t.register(img, b, ask, t0);
    assert_eq!(t.register(img, b, ask, t0 + REBUILD).0.names(), vec![a1]);
    // Restarted, the node registers under a new name (even with one name allowed per
    // address): the old one is gone at once, not after the ttl.
    assert_eq!(t.register(img, a2, ask, t0 + REBUILD * 2).1, Recorded::Yes);
    assert_eq!(t.nodes(&img), 2);
    let later = t0 + REBUILD * 4;
    assert_eq!(t.register(img, b, ask, later).0.names(), vec![a2], "the new name, ranked below b");
    assert_eq!(
        t.register(img, b, ask, later).0.ancestors[0],
        Vec::<String>::new(),
        "b, which joined first, is the root"
    );
    assert_eq!(t.register(img, a2, ask, later).0.names(), vec![b], "never its own old name");
    // It expires with its last registration: the address holds no entry left behind.
    assert!(t.register(img, b, ask, t0 + Duration::from_secs(4)).0.names().is_empty());
    assert_eq!(t.nodes(&img), 1);
}

#[test]
fn changes_count_rebuilds_that_moved_the_tops_only() {
    let mut t = Roster::new(Duration::from_secs(3), 8);
    let t0 = Instant::now();
    let (img, other) = ([1; 32], [2; 32]);
    t.register(img, &name(0), ASK, t0);
    assert_eq!(t.changes(), 1, "an image's first tops are a change");
    for i in 0..100 {
        t.register(img, &name(i), ASK, t0);
    }
    t.register(other, &name(0), ASK, t0);
    let built = t0 + REBUILD;
    t.register(img, &name(0), ASK, built);
    let (tops, changes) = (t.tops(&img, ASK.classes).unwrap(), t.changes());
    // The same nodes again, past a rebuild (half a ttl later): nothing moved.
    for beat in 1..=8 {
        for i in 0..100 {
            t.register(img, &name(i), ASK, built + REBUILD * beat);
        }
    }
    assert_eq!((t.changes(), t.tops(&img, ASK.classes).unwrap()), (changes, tops.clone()));
    // A newcomer above the root of class 0 moves the tops at the next rebuild.
    let top = (100..10_000).map(name).find(|n| above(n, &tops[0][0], 0, ASK.classes)).unwrap();
    let later = built + REBUILD * 9;
    t.register(img, &top, ASK, later);
    t.register(img, &name(0), ASK, later + REBUILD);
    assert_eq!(t.changes(), changes + 1);
    assert_eq!(t.tops(&img, ASK.classes).unwrap()[0][0], top);
    // Told since: that image only; from 0: both.
    let told: Vec<Bytes32> = t.summary(changes).iter().map(|s| s.image).collect();
    assert_eq!(told, vec![img]);
    assert_eq!(t.summary(0).len(), 2);
    assert_eq!(t.placed(&img), 101);
}

#[test]
fn after_a_silence_the_table_warms_up_before_it_places_or_forgets() {
    let ttl = Duration::from_secs(3);
    let mut t = Roster::new(ttl, 8);
    let t0 = Instant::now();
    let img = [1; 32];
    for beat in 0..2 {
        for i in 1..=100 {
            t.register(img, &name(i), ASK, t0 + Duration::from_secs(beat));
        }
    }
    let placed = t.register(img, &name(1), ASK, t0 + Duration::from_secs(2)).0;
    assert_eq!((placed.ancestors.len(), placed.provisional), (4, false), "places once warm");
    // Ten silent seconds (the tracker was unreachable), then only half the nodes come back.
    let back = t0 + Duration::from_secs(12);
    for i in 1..=50 {
        let (a, _) = t.register(img, &name(i), ASK, back + Duration::from_millis(10 * i as u64));
        assert!(a.provisional, "provisional places while warming up: nodes keep theirs");
        assert_eq!(a.total, 100, "nothing forgotten while warming up");
    }
    let warm = back + ttl / 2 + REBUILD;
    let (a, _) = t.register(img, &name(1), ASK, warm);
    assert_eq!((a.ancestors.len(), a.total, a.provisional), (4, 50, false), "warm: the silent half forgotten");
}

#[test]
fn chains_and_shapes_are_bounded_whatever_is_asked() {
    let mut t = Roster::new(Duration::from_secs(3), 8);
    let t0 = Instant::now();
    let img = [1; 32];
    let chain = Ask { classes: 2, fanout: 1, near: 1000 };
    for beat in 0..2 {
        for i in 1..=200 {
            t.register(img, &name(i), chain, t0 + Duration::from_secs(beat));
        }
    }
    let now = t0 + Duration::from_secs(2);
    let deepest = (1..=200).map(|i| t.register(img, &name(i), chain, now).0).max_by_key(|a| a.ancestors[0].len());
    let a = deepest.unwrap();
    assert_eq!(a.ancestors[0].len(), MAX_DEPTH, "a chain of 200 is cut at the depth bound");
    assert_eq!(a.near.len(), MAX_NEAR as usize, "ring successors at most MAX_NEAR");
    // Two shapes are placed; a third is answered without places.
    let (a, _) = t.register(img, &name(1), Ask { classes: 3, fanout: 4, near: 8 }, now);
    assert_eq!(a.ancestors.len(), 3);
    let (a, _) = t.register(img, &name(1), Ask { classes: 5, fanout: 4, near: 8 }, now);
    assert!(a.ancestors.is_empty() && a.near.len() == 8);
}
