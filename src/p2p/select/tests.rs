//! Unit tests of the selection state machine, driven with explicit `now`.

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
    cluster_of(n, stripe, fanout, 64)
}

/// `n` selectors that know each other by name, with `classes` trees.
fn cluster_of(n: usize, stripe: u32, fanout: u32, classes: u32) -> Vec<Selector> {
    let names = nodes(n);
    names
        .iter()
        .map(|me| {
            let mut s = Selector::new(me, stripe, fanout, classes);
            s.set_members(names.iter().map(String::as_str));
            s
        })
        .collect()
}

#[test]
fn each_stripe_forms_one_tree_of_bounded_fanout_and_roots_spread() {
    let now = Instant::now();
    let (n, fanout) = (24, 4);
    let c = cluster_of(n, 4, fanout, 4);
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
            assert_eq!(s.choose(chunk..chunk + 4, now, &none()), Choice::Peer { node: names[p].clone(), parent: true });
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
    // One root per class (4 trees): each reads a quarter of the stripes from the origin.
    let mut used: Vec<u32> = roots.iter().copied().filter(|&r| r > 0).collect();
    used.sort_unstable();
    assert_eq!(used, vec![600; 4], "one root per tree: {roots:?}");
}

#[test]
fn the_parent_comes_before_holders_and_after_a_failure_the_least_loaded_holder() {
    let now = Instant::now();
    let names = nodes(4);
    let c = cluster(4, 4, 4);
    // A node with a parent in the first stripe's tree; the two others hold the run.
    let i = (0..4).find(|&i| c[i].parent(0, now).is_some()).unwrap();
    let mut s = c[i].clone();
    let parent = s.parent(0, now).unwrap().to_string();
    let holders: Vec<String> = names.iter().filter(|n| **n != names[i] && **n != parent).cloned().collect();
    for h in &holders {
        s.have_full(h, (0..8).collect());
    }
    s.started(&holders[0]);
    // Holders do not take the run from the tree.
    assert_eq!(s.choose(0..4, now, &none()), Choice::Peer { node: parent.clone(), parent: true });
    // The parent failed: the least loaded holder, then the other.
    let failed = tried(&[&parent], Outcome::Failed);
    assert_eq!(s.choose(0..4, now, &failed), Choice::Peer { node: holders[1].clone(), parent: false });
    let mut t = failed.clone();
    t.add(&holders[1], Outcome::Busy);
    assert_eq!(s.choose(0..4, now, &t), Choice::Peer { node: holders[0].clone(), parent: false });
    // Not all of the run: the have-map does not count.
    assert_eq!(s.choose(6..10, now, &failed), Choice::Origin);
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
    let mut s = Selector::new(&names[0], 1, 4, 64);
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
fn a_holder_that_refuses_what_it_claims_loses_the_claim() {
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
    // A claim does not take the run from the tree.
    assert_eq!(s.choose(run.clone(), now, &none()), Choice::Peer { node: up[0].clone(), parent: true });
    // Once the parent failed, the holders are asked: the liar, which refuses.
    let failed = tried(&[&up[0]], Outcome::Failed);
    assert_eq!(s.choose(run.clone(), now, &failed), Choice::Peer { node: liar.clone(), parent: false });
    s.started(&liar);
    s.finished(&liar, run.clone(), Outcome::NotHave, now);
    // The liar is not paused (it may still serve what it holds), but is no longer asked for
    // this run: past the failed parent, the origin.
    assert_eq!(s.choose(run.clone(), now, &failed), Choice::Origin);
    assert!(s.usable_now(&liar, now));
    // A new full have-map (a new session) cannot bring the claim back; others stay.
    s.have_full(&liar, all.clone());
    assert_eq!(s.choose(run.clone(), now, &failed), Choice::Origin);
    let other = (chunk + 1)..(chunk + 2);
    assert_eq!(s.choose(other.clone(), now, &failed), Choice::Peer { node: liar.clone(), parent: false });
    // Serving the run proves it: the claim counts again.
    s.started(&liar);
    s.finished(&liar, run.clone(), Outcome::Served, now);
    s.have_full(&liar, all.clone());
    assert_eq!(s.choose(run.clone(), now, &failed), Choice::Peer { node: liar.clone(), parent: false });
    // An announcement anew (an honest node that dropped the chunk and has it again) brings a
    // refused claim back, until the peer has been caught MAX_DISPROOFS times: then nothing
    // it claims counts.
    s.started(&liar);
    s.finished(&liar, run.clone(), Outcome::NotHave, now);
    s.have_added(&liar, &run.clone().collect());
    assert_eq!(s.choose(run.clone(), now, &failed), Choice::Peer { node: liar.clone(), parent: false });
    for _ in 0..MAX_DISPROOFS {
        s.started(&liar);
        s.finished(&liar, run.clone(), Outcome::NotHave, now);
        s.have_added(&liar, &run.clone().collect());
    }
    s.have_full(&liar, all.clone());
    s.have_added(&liar, &all);
    assert_eq!(s.choose(other, now, &failed), Choice::Origin);
    assert_eq!(s.choose(run, now, &failed), Choice::Origin);
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
        let Choice::Peer { node, .. } = s.choose(0..1, now, &t) else { panic!("an ancestor or a holder") };
        t.add(&node, Outcome::Busy);
    }
    assert_eq!(s.choose(0..1, now, &t), Choice::Origin, "peers left, but enough tries");
}

#[test]
fn split_cuts_at_stripe_boundaries() {
    let s = Selector::new("a:1", 4, 4, 64);
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
        let mut s = Selector::new(&names[0], stripe, fanout, 64);
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
                    let p = Selector::new(&node, stripe, fanout, 64);
                    prop_assert!(p.relays_for(chunk, &names[0]));
                }
            }
        }
    }
}

/// Views as the tracker gives them: each node's ancestors and ring successors.
fn placed(n: usize, fanout: u32, classes: u32) -> (Vec<String>, Vec<Selector>) {
    use crate::p2p::core::{Ask, Membership, Roster};
    let names: Vec<String> = (1..=n).map(|i| format!("10.{}.{}.{}:7000", i >> 16, (i >> 8) & 255, i & 255)).collect();
    let t0 = Instant::now();
    let mut roster = Roster::new(Duration::from_secs(3), 8);
    let ask = Ask { classes, fanout, near: 8 };
    for beat in 0..2 {
        for me in &names {
            roster.register([1; 32], me, ask, t0 + Duration::from_secs(beat));
        }
    }
    let now = t0 + Duration::from_secs(2);
    let sels = names
        .iter()
        .map(|me| {
            let (answer, _) = roster.register([1; 32], me, ask, now);
            let mut m = Membership::new(Duration::from_secs(1), 8);
            m.named(0, [1; 32], answer, now);
            let mut s = Selector::new(me, 1, fanout, classes);
            s.set_view(&m.view(&[1; 32]));
            s
        })
        .collect();
    (names, sels)
}

#[test]
fn with_the_trackers_places_state_is_bounded_and_a_refused_run_climbs_the_ancestors() {
    let now = Instant::now();
    let (names, c) = placed(2000, 4, 4);
    let mut roots = 0;
    for (i, s) in c.iter().enumerate() {
        assert!(s.known_peers() <= 4 * 7 + 8, "{} peers known", s.known_peers());
        assert!(s.usable_members(now).len() <= 8 + 4, "sessions: ring successors and one parent per tree");
        for chunk in 0..4 {
            match s.parent(chunk, now) {
                None => roots += 1,
                Some(p) => {
                    let j = names.iter().position(|n| n == p).unwrap();
                    assert!(c[j].relays_for(chunk, &names[i]), "a parent relays for its children");
                }
            }
        }
    }
    assert_eq!(roots, 4, "one root per tree");
    // A node deep in tree 0: a refusing parent sends the run to the next ancestor up.
    let i = (0..names.len()).find(|&i| c[i].ancestors[0].len() >= 3).unwrap();
    let mut s = c[i].clone();
    let up = s.ancestors[0].clone();
    assert_eq!(s.choose(0..1, now, &none()), Choice::Peer { node: up[0].clone(), parent: true });
    let refused = tried(&[&up[0]], Outcome::Busy);
    s.started(&up[0]);
    s.finished(&up[0], 0..1, Outcome::Busy, now);
    assert_eq!(s.choose(0..1, now, &refused), Choice::Peer { node: up[1].clone(), parent: true });
    // A lost ancestor (dead: its connection reset) sends the run on up too; one that timed out
    // sends it to the origin.
    let mut lost = refused.clone();
    lost.add(&up[1], Outcome::Lost);
    assert_eq!(s.choose(0..1, now, &lost), Choice::Peer { node: up[2].clone(), parent: true });
    let mut timed_out = refused.clone();
    timed_out.add(&up[1], Outcome::Failed);
    assert_eq!(s.choose(0..1, now, &timed_out), Choice::Origin);
    // A view that names an ancestor ranking below this node (a stale or lying tracker): never
    // asked, so no chain can loop.
    let below = names.iter().find(|n| **n != names[i] && !crate::p2p::core::tree::above(n, &names[i], 0, 4)).unwrap();
    let view = crate::p2p::core::View {
        ancestors: vec![vec![below.clone(), up[2].clone()], vec![], vec![], vec![]],
        near: vec![],
        placed: true,
        total: 2000,
        provisional: false,
    };
    s.set_view(&view);
    assert_eq!(s.choose(0..1, now, &none()), Choice::Peer { node: up[2].clone(), parent: true });
    assert!(!s.known().contains(&up[0]), "peers that left the view are forgotten");
}

#[test]
fn a_node_named_twice_is_one_peer_and_never_this_node() {
    // Trackers that have not all heard of a restart name a node under its old and its new name;
    // this node's own old name may come back too.
    let mut s = Selector::new("10.0.0.1:7000@1796000000005", 1, 2, 1);
    let (old, new) = ("10.0.0.2:7000@1796000000001".to_string(), "10.0.0.2:7000@1796000000007".to_string());
    let view = crate::p2p::core::View {
        ancestors: vec![vec![old.clone(), "10.0.0.3:7000@1796000000000".into()]],
        near: vec![new.clone(), "10.0.0.1:7000@1796000000002".into()],
        placed: true,
        total: 4,
        provisional: false,
    };
    s.set_view(&view);
    let mut known: Vec<String> = s.known().into_iter().collect();
    known.sort();
    assert_eq!(known, vec![new.clone(), "10.0.0.3:7000@1796000000000".to_string()]);
    assert_eq!(s.ancestors[0], vec!["10.0.0.3:7000@1796000000000".to_string()], "the old name is not asked");
}

#[test]
fn the_session_to_an_ancestor_climbed_to_closes_once_idle() {
    let now = Instant::now();
    let (names, c) = placed(2000, 4, 4);
    let i = (0..names.len()).find(|&i| c[i].ancestors[0].len() >= 3).unwrap();
    let mut s = c[i].clone();
    let up = s.ancestors[0].clone();
    assert!(s.keeps_session(&up[0], now) && !s.keeps_session(&up[1], now), "the parent only");
    // The parent refuses; the grandparent is asked and, while asked, keeps its session.
    s.started(&up[0]);
    s.finished(&up[0], 0..1, Outcome::Busy, now);
    s.started(&up[1]);
    assert!(s.keeps_session(&up[1], now));
    s.finished(&up[1], 0..1, Outcome::Served, now);
    // Idle again and holding everything: its session is not kept; once closed, its have-map
    // goes, and the parent is asked again.
    s.have_full(&up[1], (0..4096).collect());
    s.have_full(&up[0], RoaringBitmap::new());
    let later = now + Duration::from_secs(600);
    assert!(!s.keeps_session(&up[1], later));
    assert_eq!(s.choose(0..1, later, &none()), Choice::Peer { node: up[0].clone(), parent: true });
    let failed = tried(&[&up[0]], Outcome::Failed);
    assert_eq!(s.choose(0..1, later, &failed), Choice::Peer { node: up[1].clone(), parent: false });
    s.disconnected(&up[1]);
    assert_eq!(s.choose(0..1, later, &failed), Choice::Origin);
    // A ring successor holding the run is a holder.
    let near = s.near[0].clone();
    s.have_full(&near, (0..4096).collect());
    assert_eq!(s.choose(0..1, later, &failed), Choice::Peer { node: near.clone(), parent: false });
    assert!(s.keeps_session(&near, later));
}

#[test]
fn past_a_root_that_refuses_the_run_goes_to_the_node_ranked_next_not_to_the_origin() {
    let now = Instant::now();
    let (names, c) = placed(100, 2, 1);
    let root = names[(0..names.len()).find(|&i| c[i].ancestors[0].is_empty()).unwrap()].clone();
    // The root's second child: its answer names the root, then the root's first child.
    let i = (0..names.len()).find(|&i| c[i].ancestors[0].len() == 2 && c[i].ancestors[0][0] == root).unwrap();
    let mut s = c[i].clone();
    let first = s.ancestors[0][1].clone();
    let at = |n: &str| names.iter().position(|x| x == n).unwrap();
    assert_eq!(c[at(&first)].ancestors[0], vec![root.clone()], "the root's first child, right above");
    assert_eq!(s.choose(0..1, now, &none()), Choice::Peer { node: root.clone(), parent: true });
    s.started(&root);
    s.finished(&root, 0..1, Outcome::NotHave, now);
    // Refused: not the origin (two children of a root that never relays would both read it).
    assert_eq!(
        s.choose(0..1, now, &tried(&[&root], Outcome::NotHave)),
        Choice::Peer { node: first.clone(), parent: true }
    );
    // And while the root is paused, the next runs go there at once.
    assert_eq!(s.choose(1..2, now, &none()), Choice::Peer { node: first, parent: true });
}
