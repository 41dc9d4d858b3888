//! A cluster of real vmtd nodes and a real vmt-tracker on loopback, reading one image from a
//! file origin; everything is killed on drop, also when a test fails. Shared by the relay tests.

use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use super::*;
use vmthunder::daemon::control::{NodeP2pStatus, PeerStatus, Request, Response};
use vmthunder::p2p::auth::ClusterKey;
use vmthunder::p2p::wire::Bytes32;

pub const TRACKER: &str = env!("CARGO_BIN_EXE_vmt-tracker");
pub const MIB: usize = 1 << 20;
pub const KEY: &str = "p2p test cluster key, not a secret";

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

pub struct Node {
    pub env: Env,
    pub vmtd: Proc,
    pub addr: String,
}

impl Node {
    pub fn status(&self) -> ImageStatusP2p {
        let s = status(&self.env, "img");
        ImageStatusP2p {
            peers: s.peers,
            p2p: s.p2p.expect("p2p status"),
            origin: s.bytes_from_origin,
            failed: s.failed_reads,
        }
    }
    pub fn node_status(&self) -> NodeP2pStatus {
        match call(&self.env.control_sock(), Request::Status).unwrap() {
            Response::Status { p2p, .. } => *p2p.expect("node p2p status"),
            r => panic!("unexpected {r:?}"),
        }
    }
    pub fn identical(&self, img: &std::path::Path) -> bool {
        qemu_img_identical(img, &self.env.export_uri("img"))
    }
    /// The image's identity, as peers name it.
    pub fn image_id(&self) -> Bytes32 {
        vmthunder::image::Digest::from_hex(&status(&self.env, "img").digest).unwrap().0
    }
    /// Resident memory of this node's vmtd, in bytes.
    pub fn rss(&self) -> u64 {
        let text = std::fs::read_to_string(format!("/proc/{}/status", self.vmtd.pid())).unwrap();
        let kib = text.lines().find_map(|l| l.strip_prefix("VmRSS:")).expect("VmRSS in /proc/PID/status");
        kib.trim().trim_end_matches("kB").trim().parse::<u64>().unwrap() * 1024
    }
}

pub struct ImageStatusP2p {
    pub peers: u64,
    pub p2p: PeerStatus,
    pub origin: u64,
    pub failed: u64,
}

/// An image, a cluster key, a tracker and nodes reading the image from a file origin.
pub struct Cluster {
    pub shared: Env,
    pub img: PathBuf,
    pub data: Vec<u8>,
    pub tracker_port: u16,
    pub tracker: Option<Proc>,
    pub nodes: Vec<Node>,
    /// `peer_stall` of nodes added from now on: generous by default, so that a node starved of
    /// CPU by parallel tests is not taken for a hung one.
    pub stall: &'static str,
}

impl Cluster {
    pub fn new(size: usize) -> Cluster {
        let mut c = Cluster::without_tracker(size);
        c.start_tracker();
        c
    }

    /// A cluster whose trackers the test starts itself.
    pub fn without_tracker(size: usize) -> Cluster {
        let shared = Env::new();
        let img = shared.path("image.raw");
        let data = write_image(&img, size, 11);
        let key = shared.path("cluster.key");
        std::fs::write(&key, KEY).unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        Cluster { shared, img, data, tracker_port: free_port(), tracker: None, nodes: Vec::new(), stall: "3s" }
    }

    /// A cluster of two default nodes that know each other; returns it and their indices.
    pub fn pair(size: usize) -> (Cluster, usize, usize) {
        let mut c = Cluster::new(size);
        let a = c.add_node("", &[]);
        let b = c.add_node("", &[]);
        c.wait_meshed(&[a, b]);
        (c, a, b)
    }

    pub fn key_file(&self) -> PathBuf {
        self.shared.path("cluster.key")
    }

    pub fn start_tracker(&mut self) {
        let addr = format!("127.0.0.1:{}", self.tracker_port);
        let log = std::fs::File::create(self.shared.path("tracker.log")).unwrap();
        let child = Command::new(TRACKER)
            .args(["--listen", &addr, "--ttl", "1s", "--cluster-key-file"])
            .arg(self.key_file())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.tracker = Some(Proc { child: Some(child), name: "vmt-tracker".into() });
        wait_until("tracker listening", Duration::from_secs(20), || TcpStream::connect(&addr).is_ok());
    }

    /// Starts a node; `p2p_extra` goes into its `[p2p]` section, `vars` into its environment.
    pub fn add_node(&mut self, p2p_extra: &str, vars: &[(&str, &str)]) -> usize {
        let trackers = format!("\"127.0.0.1:{}\"", self.tracker_port);
        self.add_node_with_trackers(&trackers, p2p_extra, vars)
    }

    pub fn add_node_with_trackers(&mut self, trackers: &str, p2p_extra: &str, vars: &[(&str, &str)]) -> usize {
        self.add_node_full(trackers, free_port(), p2p_extra, vars)
    }

    /// [`Cluster::add_node`] with its peer server on `port`, which names it (tree places follow
    /// from names).
    pub fn add_node_on(&mut self, port: u16, p2p_extra: &str, vars: &[(&str, &str)]) -> usize {
        let trackers = format!("\"127.0.0.1:{}\"", self.tracker_port);
        self.add_node_full(&trackers, port, p2p_extra, vars)
    }

    fn add_node_full(&mut self, trackers: &str, port: u16, p2p_extra: &str, vars: &[(&str, &str)]) -> usize {
        let env = Env::new();
        let addr = format!("127.0.0.1:{port}");
        let head = format!(
            "[p2p]\nlisten = \"{addr}\"\ntrackers = [{trackers}]\ncluster_key_file = \"{}\"\nheartbeat = \"200ms\"\npeer_stall = \"{}\"\n{p2p_extra}\n",
            self.key_file().display(),
            self.stall
        );
        let cfg = env.config(&head, &file_image("img", &self.img, "chunk_size = \"64KiB\""));
        let vmtd = start_vmtd_with(&env, &cfg, vars);
        self.nodes.push(Node { env, vmtd, addr });
        self.nodes.len() - 1
    }

    /// Waits until node `i` knows that its peers hold `chunks` chunks (have-maps arrived).
    pub fn wait_known(&self, i: usize, chunks: u64) {
        wait_until("have-maps", Duration::from_secs(20), || self.nodes[i].status().p2p.chunks_at_peers == chunks);
    }

    /// Waits until every live node knows and has a session with every other live node.
    pub fn wait_meshed(&self, live: &[usize]) {
        let want = live.len() as u64 - 1;
        for &i in live {
            wait_until("peers known and sessions open", Duration::from_secs(20), || {
                let s = self.nodes[i].status();
                s.peers == want && s.p2p.sessions >= want
            });
        }
    }
    /// Starts a node, as [`Cluster::add_node_on`], and waits until the clock is past the time it
    /// joined the image: a node started next joins later, so it is placed below this one in
    /// every tree but those of its own groups.
    pub fn add_node_in_order(&mut self, port: u16, p2p_extra: &str, vars: &[(&str, &str)]) -> usize {
        use vmthunder::p2p::{conn::joined_now, core::tree::joined_of};
        let i = self.add_node_on(port, p2p_extra, vars);
        let joined = || joined_of(&self.nodes[i].status().p2p.name);
        wait_until("the node's name for the image", Duration::from_secs(20), || joined() != u64::MAX);
        let t = joined();
        wait_until("the clock past the node's join time", Duration::from_secs(20), || joined_now() > t);
        i
    }

    /// Two nodes in 16 trees (the most `classes` allows), with `stripe` bytes a stripe, once
    /// both views hold the tracker's final places: (A, B), where A has a parent in some trees
    /// and B is its parent there. Each tree has one root, the other node its child, so the
    /// parents the two show add up to 16. Their ports are picked in different groups: the node
    /// that joined first roots every tree but the other's group's (and maybe its second
    /// group's), which the other roots. `extra` goes into both nodes' `[p2p]` sections.
    pub fn pair_in_16_trees(&mut self, stripe: &str, extra: &str) -> (usize, usize) {
        use vmthunder::p2p::core::tree::{group_of, node_hash};
        let conf = format!("stripe = \"{stripe}\"\nclasses = 16\n{extra}");
        let group = |p: u16| group_of(node_hash(&format!("127.0.0.1:{p}")), 16);
        let p1 = free_port();
        let first = self.add_node_in_order(p1, &conf, &[]);
        let p2 = std::iter::repeat_with(free_port).find(|&p| p != p1 && group(p) != group(p1)).unwrap();
        let second = self.add_node_on(p2, &conf, &[]);
        self.wait_meshed(&[first, second]);
        let parents = |i: usize| self.nodes[i].status().p2p.tree_parents;
        wait_until("final places in both views", Duration::from_secs(20), || parents(first) + parents(second) == 16);
        if parents(first) > 0 {
            (first, second)
        } else {
            (second, first)
        }
    }
}

/// The tree shape the tests' own tracker clients ask for: four trees of fan-out 4 (vmtd's
/// default is one of fan-out 2).
pub const ASK: vmthunder::p2p::core::Ask = vmthunder::p2p::core::Ask { classes: 4, fanout: 4, near: 8 };

pub fn cluster_key() -> ClusterKey {
    ClusterKey::from_secret(KEY.as_bytes()).unwrap()
}

/// Spawns `qemu-img compare` of the image against node `i`'s export.
pub fn compare_in_background(c: &Cluster, i: usize) -> std::process::Child {
    Command::new("timeout")
        .args(["120", "qemu-img", "compare", "-f", "raw", "-F", "raw"])
        .arg(&c.img)
        .arg(c.nodes[i].env.export_uri("img"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// Reads the whole image through every node of `nodes` at once and checks the data, and that the
/// origin sent each chunk about once (at most 5% more) in all. Returns the image size.
pub fn read_everywhere_at_once(c: &Cluster, nodes: &[usize]) -> u64 {
    c.wait_meshed(nodes);
    read_at_once(c, nodes).0
}

/// [`read_everywhere_at_once`] without waiting for a mesh; returns the image size and the bytes
/// the origin sent.
pub fn read_at_once(c: &Cluster, nodes: &[usize]) -> (u64, u64) {
    let mut readers: Vec<_> = nodes.iter().map(|&i| compare_in_background(c, i)).collect();
    for r in &mut readers {
        assert!(r.wait().unwrap().success(), "every node serves the image identically");
    }
    let size = c.data.len() as u64;
    let origin: u64 = nodes.iter().map(|&i| settled(&c.nodes[i].env, "img").bytes_from_origin).sum();
    assert!(origin >= size, "every chunk came from the origin once: {origin}");
    assert!(origin <= size + size / 20, "origin sent {origin} bytes for an image of {size}");
    (size, origin)
}
