//! `vmt sim`: deterministic for a seed, faults handled, and bad input refused naming the field.

use clap::Parser;
use vmthunder::sim::{run, SimArgs, SimError};

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    sim: SimArgs,
}

const TRACE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/profiles/debian12-boot.trace.csv");
const PROFILE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/profiles/fe1cc556d4c6614bdbe337c5654ee95cb82b37f4fc60adf2e0463ce023f95f43.profile"
);

fn args(extra: &[&str]) -> SimArgs {
    let mut v = vec!["vmt-sim", "--trace", TRACE, "--from", "9.2", "--scale", "0.25"];
    v.extend_from_slice(extra);
    Cli::try_parse_from(v).expect("flags parse").sim
}

fn refused(extra: &[&str]) -> String {
    match args(extra).params().and_then(|p| run(&p)) {
        Ok(_) => panic!("{extra:?} accepted"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn the_same_seed_gives_the_same_result() {
    let a = args(&[
        "--nodes",
        "12",
        "--profile",
        PROFILE,
        "--strategies",
        "direct,cor-tree,vmthunder,vmthunder-profile",
        "--spread",
        "0.5",
        "--kill",
        "0.1",
        "--tracker-down",
        "0,2",
        "--liars",
        "0.1",
        "--seed",
        "7",
    ]);
    let p = a.params().unwrap();
    let strip = |mut r: vmthunder::sim::Report| {
        for s in &mut r.strategies {
            s.wall_s = 0.0;
        }
        r
    };
    let one = strip(run(&p).unwrap());
    let two = strip(run(&p).unwrap());
    assert_eq!(one, two);
    for s in &one.strategies {
        assert!(s.makespan_s > 0.0 && s.skipped.is_none(), "{s:?}");
    }
}

#[test]
fn relays_survive_killed_nodes_and_lying_peers_and_the_tree_does_not() {
    let a = args(&["--nodes", "24", "--strategies", "cor-tree,vmthunder", "--kill", "0.25", "--kill-at", "0.5"]);
    let r = run(&a.params().unwrap()).unwrap();
    let (tree, relay) = (&r.strategies[0], &r.strategies[1]);
    assert_eq!(tree.killed, 6);
    assert!(tree.failed_reads > 0, "children of a dead copy-on-read parent get I/O errors: {tree:?}");
    assert_eq!((relay.failed_reads, relay.unfinished), (0, 0), "{relay:?}");
    let a = args(&["--nodes", "24", "--strategies", "vmthunder", "--liars", "0.25"]);
    let r = run(&a.params().unwrap()).unwrap();
    let relay = &r.strategies[0];
    assert_eq!((relay.failed_reads, relay.unfinished), (0, 0), "{relay:?}");
    // A liar placed high in a tree answers NotHave as a parent; the reads below it climb its
    // ancestors, and where it is a root, the nodes right below it each fall back to the peers
    // they know: a little origin egress, never a failed read (1.10 × in this run).
    assert!(relay.origin_per_working_set <= 1.25, "lying peers cost little origin egress: {relay:?}");
}

#[test]
fn cut_through_relays_survive_killed_nodes_and_lying_peers() {
    // Cut through (vmtd's way, the default): replies start before their runs are in; a relay killed
    // while it passes a run on breaks the reply, and its askers read elsewhere. Without pushes,
    // so that the runs go down the trees as asked replies (pushes are `pushing_relays_…`).
    for extra in [["--kill", "0.25"], ["--liars", "0.25"]] {
        let mut flags =
            vec!["--nodes", "24", "--strategies", "vmthunder", "--push", "false", "--cut-through", "--kill-at", "0.05"];
        flags.extend_from_slice(&extra);
        let p = args(&flags).params().unwrap();
        let r = run(&p).unwrap();
        let s = &r.strategies[0];
        assert_eq!((s.failed_reads, s.unfinished), (0, 0), "{extra:?}: {s:?}");
        assert!(s.origin_per_working_set <= 1.25, "{extra:?}: {s:?}");
        assert!(s.early_replies > 0, "replies cut through: {s:?}");
        let again = run(&p).unwrap();
        assert_eq!(
            (s.makespan_s, s.events, s.early_broken),
            (again.strategies[0].makespan_s, again.strategies[0].events, again.strategies[0].early_broken),
            "deterministic"
        );
        if extra[0] == "--kill" {
            assert!(s.early_broken > 0, "the kill broke replies under way: {s:?}");
        }
    }
    // Cut through, a run costs about its transfer once on its way down a chain, not once per
    // level: with node links ten times the origin's, where bandwidth is not short, two trees
    // (each node a descendant of its descendants in the other) boot 16 nodes within 5% of a
    // solo boot (×1.09 without).
    let flags =
        ["--nodes", "16", "--strategies", "vmthunder", "--classes", "2", "--node-link", "10gbit", "--push", "false"];
    let ratio = |cut: bool| {
        let mut f = flags.to_vec();
        f.extend(["--cut-through", if cut { "true" } else { "false" }]);
        run(&args(&f).params().unwrap()).unwrap().strategies[0].ratio
    };
    let (store, cut) = (ratio(false), ratio(true));
    assert!(cut <= 1.05 && store > cut, "store and forward ×{store}, cut through ×{cut}");
}

#[test]
fn replies_checked_in_pieces_pass_on_sooner_and_leave_origin_runs_alone() {
    // `--verify-piece` (a what-if): a reply checked and passed on in 16 KiB pieces rather than
    // 64 KiB chunks reaches its asker sooner, so a node that reads through another boots sooner;
    // a node alone reads only the origin, whose runs are checked in whole chunks either way.
    let flags = ["--nodes", "2", "--strategies", "vmthunder", "--push", "false"];
    let times = |piece: Option<&str>| {
        let mut f = flags.to_vec();
        if let Some(piece) = piece {
            f.extend(["--verify-piece", piece]);
        }
        let r = run(&args(&f).params().unwrap()).unwrap();
        (r.strategies[0].makespan_s, r.strategies[0].makespan_1_s)
    };
    let (chunk, same, piece) = (times(None), times(Some("64KiB")), times(Some("16KiB")));
    assert_eq!(chunk, same, "a piece of a whole chunk is vmtd's way");
    assert_eq!(piece.1, chunk.1, "the solo boot reads only the origin");
    assert!(piece.0 < chunk.0, "16 KiB pieces {} s, chunks {} s", piece.0, chunk.0);
}

#[test]
fn pushing_relays_survive_killed_nodes_and_lying_peers_and_change_nothing_when_off() {
    // Pushes (vmtd's default): runs flow down the trees unasked; a push its sender's kill breaks
    // leaves its chunks to an ordinary fetch, and a liar pushes nothing.
    for extra in [&["--kill", "0.25"][..], &["--liars", "0.25"], &["--kill", "0.25", "--push-cut-through"]] {
        let mut flags = vec!["--nodes", "24", "--strategies", "vmthunder", "--push", "--kill-at", "0.05"];
        flags.extend_from_slice(extra);
        let p = args(&flags).params().unwrap();
        let r = run(&p).unwrap();
        let s = &r.strategies[0];
        assert_eq!((s.failed_reads, s.unfinished), (0, 0), "{extra:?}: {s:?}");
        assert!(s.origin_per_working_set <= 1.25, "{extra:?}: {s:?}");
        assert!(s.pushes > 0, "runs were pushed: {s:?}");
        let again = run(&p).unwrap();
        assert_eq!(
            (s.makespan_s, s.events),
            (again.strategies[0].makespan_s, again.strategies[0].events),
            "deterministic"
        );
    }
    // With one tree, pushing spares a node's two children sharing its up link in lockstep
    // (×1.12 pulled, ×1.02 pushed in this run).
    let ratio = |push: &str| {
        let f = ["--nodes", "16", "--strategies", "vmthunder", "--push", push];
        let r = run(&args(&f).params().unwrap()).unwrap();
        (r.strategies[0].ratio, r.strategies[0].pushes)
    };
    let ((pulled, none), (pushed, _)) = (ratio("false"), ratio("true"));
    assert_eq!(none, 0, "no pushes with --push false");
    let defaults = args(&["--strategies", "vmthunder"]).params().unwrap();
    assert!(defaults.push && defaults.cut_through && defaults.push_cut_through, "vmtd's defaults");
    let off = args(&["--strategies", "vmthunder", "--push-cut-through", "false"]).params().unwrap();
    assert!(!off.push_cut_through);
    assert!(pushed < pulled && pushed <= 1.05, "pulled ×{pulled}, pushed ×{pushed}");
}

#[test]
fn a_late_boot_is_pushed_its_parents_boot_ahead_of_its_reads() {
    // Starts spread over 30 s: most nodes start after their parent's boot, and read what it
    // read. Pushed that boot as they start, they wait on nothing; asking for each read, they
    // wait for every one (×1.10 at N = 1,000 in BENCHMARKS.md).
    let run_with = |boot: &str| {
        let f = ["--nodes", "200", "--spread", "30", "--strategies", "vmthunder", "--push-boot", boot];
        run(&args(&f).params().unwrap()).unwrap().strategies[0].clone()
    };
    let (with, without) = (run_with("true"), run_with("false"));
    assert!(args(&["--strategies", "vmthunder"]).params().unwrap().push_boot, "vmtd's default");
    assert_eq!((with.failed_reads, without.failed_reads), (0, 0));
    assert!(with.ratio <= 1.02 && with.ratio < without.ratio, "×{} with, ×{} without", with.ratio, without.ratio);
    assert!(with.stall_p99_ms < without.stall_p99_ms, "{with:?} / {without:?}");
    assert!(with.origin_per_working_set <= 1.01, "the origin sends the working set once: {with:?}");
    assert_eq!(with.upload_max_per_working_set, without.upload_max_per_working_set, "nothing pushed twice");
}

#[test]
fn relay_runs_too_large_for_memory_are_refused_with_the_reason() {
    let a = args(&["--nodes", "10000", "--strategies", "vmthunder", "--max-peer-state", "100MiB"]);
    let r = run(&a.params().unwrap()).unwrap();
    let why = r.strategies[0].skipped.as_deref().expect("not run");
    assert!(why.contains("its ancestors and ring successors") && why.contains("GiB of peer state"), "{why}");
}

#[test]
fn relay_state_and_sessions_stay_bounded_as_nodes_are_added() {
    let mut state = Vec::new();
    for n in ["50", "400"] {
        let a = args(&["--nodes", n, "--strategies", "vmthunder"]);
        let r = run(&a.params().unwrap()).unwrap();
        let s = &r.strategies[0];
        assert_eq!((s.failed_reads, s.unfinished), (0, 0), "{s:?}");
        assert!(s.origin_per_working_set <= 1.05, "each chunk from the origin about once: {s:?}");
        assert!(s.sessions_max <= 64, "{s:?}");
        assert!(s.upload_max_per_working_set <= 3.0, "{s:?}");
        state.push(s.peer_state_max_bytes);
    }
    // Eight times the nodes: the view grows by one level of each tree, not eightfold.
    assert!(state[1] < 2 * state[0], "peer state per node: {state:?}");
}

/// Guests that start one after another: each newcomer is placed below the nodes already there
/// (the trees follow the order the nodes joined), so no node takes on new children as others
/// arrive, and each forwards the image at most `fanout` (2) times. Placed by hash, newcomers
/// displaced the nodes near the top, which then served a new subtree after each arrival (the
/// busiest node uploaded 9 working sets in this run).
#[test]
fn nodes_that_arrive_one_after_another_do_not_reshape_the_trees() {
    let a = args(&["--nodes", "300", "--strategies", "vmthunder", "--spread", "20"]);
    let r = run(&a.params().unwrap()).unwrap();
    let s = &r.strategies[0];
    assert_eq!((s.failed_reads, s.unfinished), (0, 0), "{s:?}");
    assert!(s.origin_per_working_set <= 1.05, "each chunk from the origin about once: {s:?}");
    assert!(s.upload_max_per_working_set <= 2.05, "at most two children's copies: {s:?}");
}

#[test]
fn several_images_boot_at_once_each_in_its_own_trees() {
    let strategies = "direct,cor-tree,vmthunder";
    let one = run(&args(&["--nodes", "24", "--strategies", strategies]).params().unwrap()).unwrap();
    let three = run(&args(&["--nodes", "24", "--images", "3", "--strategies", strategies]).params().unwrap()).unwrap();
    for (a, b) in one.strategies.iter().zip(&three.strategies) {
        assert_eq!((b.failed_reads, b.unfinished), (0, 0), "{b:?}");
        match b.strategy.name() {
            // Direct reads do not care which image: the origin sends as much.
            "direct" => assert_eq!(a.origin_bytes, b.origin_bytes),
            // Each image comes from the origin about once: three times one image's bytes.
            _ => {
                let ratio = b.origin_bytes as f64 / a.origin_bytes as f64;
                assert!((2.9..=3.1).contains(&ratio), "{ratio}: {a:?} {b:?}");
                assert!(b.origin_per_working_set <= 1.05, "{b:?}");
            }
        }
        if b.strategy.name() == "vmthunder" {
            // Peers are the image's own 8 nodes only: at most 7 sessions each way.
            assert!(b.sessions_max <= 14, "{b:?}");
            assert!(a.sessions_max > 14, "one image: more peers than 14, or this proves nothing: {a:?}");
            assert_eq!(b.tracker_nodes, 24);
        }
    }
}

#[test]
fn bad_input_is_refused_naming_the_field() {
    for (flags, field) in [
        (&["--nodes", "0"][..], "nodes"),
        (&["--kill", "1.5"], "kill"),
        (&["--liars=-0.1"], "liars"),
        (&["--node-link", "fast"], "node-link"),
        (&["--origin-link", "0gbit"], "origin-link"),
        (&["--strategies", "direct,bittorrent"], "strategies"),
        (&["--strategies", "vmthunder-profile"], "profile"),
        (&["--chunk-size", "3000"], "chunk-size"),
        (&["--stripe", "lots"], "stripe"),
        (&["--fanout", "0"], "fanout"),
        (&["--tracker-down", "5"], "tracker-down"),
        (&["--spread", "NaN"], "spread"),
        (&["--heartbeat", "0"], "heartbeat"),
        (&["--image-size", "1MiB"], "trace"),
        (&["--link-burst", "much"], "link-burst"),
        (&["--read-overhead-us=-1"], "read-overhead"),
        (&["--host-cores", "100000"], "host-cores"),
        (&["--prefetch-lead", "5"], "prefetch-lead"),
        (&["--classes", "0"], "classes"),
        (&["--images", "0"], "images"),
        (&["--images", "101"], "images"),
        (&["--first-address", "255.255.255.200"], "first-address"),
        (&["--verify-piece", "3000"], "verify-piece"),
        (&["--verify-piece", "128KiB"], "verify-piece"),
        (&["--verify-piece", "16KiB", "--cut-through", "false"], "verify-piece"),
    ] {
        let e = refused(flags);
        assert!(e.starts_with(&format!("{field}: ")), "{flags:?}: {e}");
    }
    // A damaged trace names its line; a missing one its path.
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.csv");
    std::fs::write(&bad, "t_s,op,offset,length\n0.1,R,0,512\n0.2,X,0,512\n").unwrap();
    let e =
        Cli::try_parse_from(["vmt-sim", "--trace", bad.to_str().unwrap()]).unwrap().sim.params().and_then(|p| run(&p));
    let e = e.expect_err("refused").to_string();
    assert!(e.starts_with("trace: ") && e.contains("line 3"), "{e}");
    let e = Cli::try_parse_from(["vmt-sim", "--trace", "/nonexistent.csv"]).unwrap().sim.params().and_then(|p| run(&p));
    assert!(matches!(e, Err(SimError::Trace(_))));
    // A profile of another chunk size than the run's.
    let e = refused(&["--profile", PROFILE, "--chunk-size", "16KiB"]);
    assert!(e.starts_with("chunk-size: "), "{e}");
}

#[test]
fn a_sweep_draws_its_figures_from_its_own_reports() {
    let a = args(&["--strategies", "direct,cor-tree", "--sweep", "1,4,12"]);
    let reports = vmthunder::sim::sweep(&a.params().unwrap(), &a.sweep).unwrap();
    assert_eq!(reports.iter().map(|r| r.params.nodes).collect::<Vec<_>>(), vec![1, 4, 12]);
    let largest = &reports[2].strategies[0];
    assert_eq!(largest.node_times_s.len(), 12, "one boot time per node");
    assert!((largest.node_times_s[11] - largest.makespan_s).abs() < 1e-9, "the slowest node is the makespan");
    let dir = tempfile::tempdir().unwrap();
    let paths = vmthunder::sim::plot::write(&reports, dir.path()).unwrap();
    assert_eq!(paths.len(), 3);
    for p in &paths {
        let svg = std::fs::read_to_string(p).unwrap();
        assert!(svg.starts_with("<svg") && svg.contains("cor-tree") && svg.contains("direct"), "{}", p.display());
    }
    // Nothing ran (every relay run refused): nothing to draw, said so.
    let a = args(&["--strategies", "vmthunder", "--max-peer-state", "1KiB", "--sweep", "50"]);
    let reports = vmthunder::sim::sweep(&a.params().unwrap(), &a.sweep).unwrap();
    assert!(vmthunder::sim::plot::write(&reports, dir.path()).is_err());
}
