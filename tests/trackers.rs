//! Trackers that share the load: real vmt-tracker processes given each other (`--peer`) and real
//! vmtd nodes, each registering with one of them. Every step waits for a condition; everything
//! is killed on drop, also when a test fails.

mod common;

use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::cluster::*;
use common::*;
use vmthunder::p2p::tracker::TrackerClient;

/// Trackers on loopback that know each other; `procs[i]` is `None` while tracker i is down.
struct Trackers {
    addrs: Vec<String>,
    ttl: &'static str,
    metrics: Vec<u16>,
    procs: Vec<Option<Proc>>,
}

impl Trackers {
    fn start(c: &Cluster, m: usize) -> Trackers {
        Trackers::start_with_ttl(c, m, "1s")
    }

    fn start_with_ttl(c: &Cluster, m: usize, ttl: &'static str) -> Trackers {
        let addrs: Vec<String> = (0..m).map(|_| format!("127.0.0.1:{}", free_port())).collect();
        let metrics = (0..m).map(|_| free_port()).collect();
        let mut t = Trackers { addrs, ttl, metrics, procs: (0..m).map(|_| None).collect() };
        for i in 0..m {
            t.up(c, i);
        }
        t
    }

    /// Starts tracker `i` (again).
    fn up(&mut self, c: &Cluster, i: usize) {
        let log = std::fs::File::create(c.shared.path(&format!("tracker{i}.log"))).unwrap();
        let mut cmd = Command::new(TRACKER);
        // Every node and tracker here is at 127.0.0.1: room for all their names.
        cmd.args(["--listen", &self.addrs[i], "--ttl", self.ttl, "--peers-per-address", "64"])
            .args(["--metrics-listen", &format!("127.0.0.1:{}", self.metrics[i])])
            .arg("--cluster-key-file")
            .arg(c.key_file());
        for a in &self.addrs {
            cmd.args(["--peer", a]);
        }
        let child = cmd.stdout(Stdio::null()).stderr(log).spawn().unwrap();
        self.procs[i] = Some(Proc { child: Some(child), name: format!("vmt-tracker {i}") });
        let addr = self.addrs[i].clone();
        wait_until("tracker listening", Duration::from_secs(20), || TcpStream::connect(&addr).is_ok());
    }

    /// The nodes tracker `i` holds, and the other trackers it has heard from (`None` if down).
    fn load(&self, i: usize) -> Option<(u64, u64)> {
        self.procs[i].as_ref()?;
        let scrape = http_get(self.metrics[i], "/metrics")?;
        let nodes: f64 = scrape
            .lines()
            .filter(|l| l.starts_with("vmthunder_tracker_nodes{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        Some((nodes as u64, sample(&scrape, "vmthunder_tracker_peers_heard")? as u64))
    }

    /// The node-trackers list of a node's config: all of them.
    fn list(&self) -> String {
        self.addrs.iter().map(|a| format!("\"{a}\"")).collect::<Vec<_>>().join(", ")
    }
}

/// Classes in which each node of `nodes` has a parent, summed: `classes × (N − 1)` exactly when
/// every class has one tree over all nodes (one root, the only node reading the origin).
fn parents(c: &Cluster, nodes: &[usize]) -> u64 {
    nodes.iter().map(|&i| c.nodes[i].status().p2p.tree_parents).sum()
}

#[test]
fn trackers_share_the_nodes_join_their_trees_and_survive_a_restart() {
    // Four trees (not vmtd's one): joining the partitions' trees is checked in each.
    const CLASSES: u64 = 4;
    const TREES: &str = "classes = 4\nfanout = 4";
    let mut c = Cluster::without_tracker(16 * MIB);
    let mut t = Trackers::start(&c, 3);
    let nodes: Vec<usize> = (0..6).map(|_| c.add_node_with_trackers(&t.list(), TREES, &[])).collect();
    let held = |t: &Trackers| (0..3).filter_map(|i| t.load(i)).map(|(n, _)| n).sum::<u64>();
    wait_until("every tracker hears the others", Duration::from_secs(30), || {
        (0..3).all(|i| t.load(i).is_some_and(|(_, heard)| heard == 2))
    });
    // Each node registers with one tracker: the trackers hold N nodes in all, not N × M.
    wait_until("each node at one tracker", Duration::from_secs(30), || held(&t) == 6);
    wait_until("one tree per class over all trackers", Duration::from_secs(30), || parents(&c, &nodes) == CLASSES * 5);
    assert_eq!(held(&t), 6, "no node registered twice");
    // Read everywhere at once: the origin sends each chunk about once (one root per class).
    read_at_once(&c, &nodes);
    assert!(nodes.iter().all(|&i| c.nodes[i].status().failed == 0));

    // The busiest tracker dies: its nodes go to their next, and the trees join again.
    let busiest = (0..3).max_by_key(|&i| t.load(i).map_or(0, |(n, _)| n)).unwrap();
    let moved = t.load(busiest).unwrap().0;
    assert!(moved >= 2, "6 nodes over 3 trackers: the busiest holds 2 or more");
    t.procs[busiest].as_mut().unwrap().kill9();
    t.procs[busiest] = None;
    wait_until("the dead tracker's nodes moved", Duration::from_secs(30), || held(&t) == 6);
    wait_until("one tree per class again", Duration::from_secs(30), || parents(&c, &nodes) == CLASSES * 5);
    let late = c.add_node_with_trackers(&t.list(), TREES, &[]);
    let all: Vec<usize> = nodes.iter().copied().chain([late]).collect();
    wait_until("the newcomer placed", Duration::from_secs(30), || parents(&c, &all) == CLASSES * 6);
    assert!(c.nodes[late].identical(&c.img));
    assert_eq!(c.nodes[late].status().origin, 0, "the newcomer read everything from its peers");

    // Back up, the tracker gets its nodes back (after the failed tracker's rest) and the trees
    // stay one per class.
    t.up(&c, busiest);
    wait_until("nodes back home", Duration::from_secs(30), || {
        t.load(busiest).is_some_and(|(n, heard)| n >= 1 && heard == 2) && held(&t) == 7
    });
    wait_until("one tree per class with all three", Duration::from_secs(30), || parents(&c, &all) == CLASSES * 6);
}

/// A tracker whose tops change tells the others at once, not at its next periodic push: until
/// they know, the root a newcomer displaced goes on reading the origin for its own subtree.
#[test]
fn a_new_root_is_known_to_every_tracker_at_once() {
    // A ttl of 10 minutes: the periodic pushes come every 200 s, long after this test's waits.
    let c = Cluster::without_tracker(MIB);
    let t = Trackers::start_with_ttl(&c, 2, "600s");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let (image, class) = ([7; 32], 0);
    let above = |a: &str, b: &str| vmthunder::p2p::core::tree::above(a, b, class, ASK.classes);
    let home = |n: &str| vmthunder::p2p::core::federation::rank(n, &t.addrs)[0];
    let key = cluster_key();
    let mut clients: std::collections::HashMap<String, TrackerClient> = Default::default();
    let mut beat = |n: &str| {
        let client =
            clients.entry(n.to_string()).or_insert_with(|| TrackerClient::new(&t.addrs[home(n)], n, key.clone()));
        let answer = rt.block_on(client.heartbeat(&[(image, 0)], ASK, Duration::from_secs(5))).ok()?;
        answer.get(&image).map(|a| a.ancestors[class as usize].clone())
    };
    let names: Vec<String> = (0..16).map(|i| format!("127.0.0.1:{}", 20_000 + i)).collect();
    let root = names.iter().fold(&names[0], |r, n| if above(n, r) { n } else { r }).clone();
    // A node of the other tracker than the root's, whose chain reaches the root of all once the
    // trackers have told each other of their first nodes.
    let witness = names.iter().find(|n| home(n) != home(&root)).expect("nodes at both trackers").clone();
    wait_until("one tree over both trackers", Duration::from_secs(60), || {
        names.iter().filter(|n| **n != witness).for_each(|n| drop(beat(n)));
        beat(&witness).is_some_and(|up| up.contains(&root))
    });
    // A newcomer above the root, at the witness's tracker's peer: the witness's chain reaches
    // it within a rebuild and a round trip, not at the next periodic push.
    let newcomer = (100..60_000)
        .map(|p| format!("127.0.0.1:{p}"))
        .find(|n| above(n, &root) && home(n) == home(&root))
        .expect("such a name");
    wait_until("the new root known at the other tracker", Duration::from_secs(60), || {
        drop(beat(&newcomer));
        // (It ranks above the root: in the chain, not the node named after it.)
        beat(&witness).is_some_and(|up| up.contains(&newcomer))
    });
}

#[test]
fn bad_peer_trackers_are_refused_at_start() {
    let c = Cluster::without_tracker(MIB);
    for (args, named) in [
        (vec!["--listen", "127.0.0.1:0", "--peer", "nohost"], "--peer \"nohost\""),
        (vec!["--listen", "0.0.0.0:0", "--peer", "127.0.0.1:1"], "--listen"),
    ] {
        let mut cmd = Command::new(TRACKER);
        cmd.args(&args).arg("--cluster-key-file").arg(c.key_file());
        let out = run(Command::new("timeout").arg("20").arg(cmd.get_program()).args(cmd.get_args()));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(named), "{args:?}: {err}");
    }
}
