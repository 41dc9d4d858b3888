//! End-to-end tests of the peer-to-peer relay: real vmtd nodes and a real vmt-tracker on
//! loopback, read by qemu-img. Each node has its own directories and peer port; everything is
//! killed on drop, also when a test fails.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use vmthunder::daemon::control::{NodeP2pStatus, PeerStatus, Request, Response};
use vmthunder::p2p::auth::ClusterKey;
use vmthunder::p2p::conn::{client_handshake, read_frame, write_frame};
use vmthunder::p2p::wire::{Frame, Message, HEADER_LEN, MAGIC};

const TRACKER: &str = env!("CARGO_BIN_EXE_vmt-tracker");
const MIB: usize = 1 << 20;
const KEY: &str = "p2p test cluster key, not a secret";

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

struct Node {
    env: Env,
    vmtd: Proc,
    addr: String,
}

impl Node {
    fn status(&self) -> ImageStatusP2p {
        let s = status(&self.env, "img");
        ImageStatusP2p {
            peers: s.peers,
            p2p: s.p2p.expect("p2p status"),
            origin: s.bytes_from_origin,
            failed: s.failed_reads,
        }
    }
    fn node_status(&self) -> NodeP2pStatus {
        match call(&self.env.control_sock(), Request::Status).unwrap() {
            Response::Status { p2p, .. } => p2p.expect("node p2p status"),
            r => panic!("unexpected {r:?}"),
        }
    }
    fn identical(&self, img: &std::path::Path) -> bool {
        qemu_img_identical(img, &self.env.export_uri("img"))
    }
}

struct ImageStatusP2p {
    peers: u64,
    p2p: PeerStatus,
    origin: u64,
    failed: u64,
}

/// An image, a cluster key, a tracker and nodes reading the image from a file origin.
struct Cluster {
    shared: Env,
    img: PathBuf,
    data: Vec<u8>,
    tracker_port: u16,
    tracker: Option<Proc>,
    nodes: Vec<Node>,
    /// `peer_stall` of nodes added from now on: generous by default, so that a node starved of
    /// CPU by parallel tests is not taken for a hung one.
    stall: &'static str,
}

impl Cluster {
    fn new(size: usize) -> Cluster {
        let shared = Env::new();
        let img = shared.path("image.raw");
        let data = write_image(&img, size, 11);
        let key = shared.path("cluster.key");
        std::fs::write(&key, KEY).unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        let mut c =
            Cluster { shared, img, data, tracker_port: free_port(), tracker: None, nodes: Vec::new(), stall: "3s" };
        c.start_tracker();
        c
    }

    /// A cluster of two default nodes that know each other; returns it and their indices.
    fn pair(size: usize) -> (Cluster, usize, usize) {
        let mut c = Cluster::new(size);
        let a = c.add_node("", &[]);
        let b = c.add_node("", &[]);
        c.wait_meshed(&[a, b]);
        (c, a, b)
    }

    fn key_file(&self) -> PathBuf {
        self.shared.path("cluster.key")
    }

    fn start_tracker(&mut self) {
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
    fn add_node(&mut self, p2p_extra: &str, vars: &[(&str, &str)]) -> usize {
        let trackers = format!("\"127.0.0.1:{}\"", self.tracker_port);
        self.add_node_with_trackers(&trackers, p2p_extra, vars)
    }

    fn add_node_with_trackers(&mut self, trackers: &str, p2p_extra: &str, vars: &[(&str, &str)]) -> usize {
        let env = Env::new();
        let port = free_port();
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
    fn wait_known(&self, i: usize, chunks: u64) {
        wait_until("have-maps", Duration::from_secs(20), || self.nodes[i].status().p2p.chunks_at_peers == chunks);
    }

    /// Waits until every live node knows and has a session with every other live node.
    fn wait_meshed(&self, live: &[usize]) {
        let want = live.len() as u64 - 1;
        for &i in live {
            wait_until("peers known and sessions open", Duration::from_secs(20), || {
                let s = self.nodes[i].status();
                s.peers == want && s.p2p.sessions >= want
            });
        }
    }
}

/// Spawns `qemu-img compare` of the image against node `i`'s export.
fn compare_in_background(c: &Cluster, i: usize) -> std::process::Child {
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
fn read_everywhere_at_once(c: &Cluster, nodes: &[usize]) -> u64 {
    c.wait_meshed(nodes);
    let mut readers: Vec<_> = nodes.iter().map(|&i| compare_in_background(c, i)).collect();
    for r in &mut readers {
        assert!(r.wait().unwrap().success(), "every node serves the image identically");
    }
    let size = c.data.len() as u64;
    let origin: u64 = nodes.iter().map(|&i| settled(&c.nodes[i].env, "img").bytes_from_origin).sum();
    assert!(origin >= size, "every chunk came from the origin once: {origin}");
    assert!(origin <= size + size / 20, "origin sent {origin} bytes for an image of {size}");
    size
}

#[test]
fn a_node_reads_what_its_peer_holds_from_the_peer() {
    let (c, a, b) = Cluster::pair(16 * MIB);
    assert!(c.nodes[a].identical(&c.img));
    // A's misses on stripes whose tree B roots went through B, which read them from the origin
    // once.
    let origin = |c: &Cluster| {
        settled(&c.nodes[a].env, "img").bytes_from_origin + settled(&c.nodes[b].env, "img").bytes_from_origin
    };
    assert_eq!(origin(&c), c.data.len() as u64, "each chunk crossed the origin link once");
    let relayed = c.nodes[b].status().p2p.bytes_to_peers;
    assert!(relayed > 0 && relayed < c.data.len() as u64, "B relayed the stripes it roots: {relayed}");
    // B learns A's have-map through its session, then reads the rest from A.
    c.wait_known(b, 256);
    assert!(c.nodes[b].identical(&c.img));
    assert_eq!(origin(&c), c.data.len() as u64, "nothing more from the origin");
    let sb = c.nodes[b].status();
    assert_eq!(sb.p2p.bytes_from_peers, c.data.len() as u64 - relayed);
    assert_eq!(c.nodes[a].status().p2p.bytes_to_peers, c.data.len() as u64 - relayed);
    assert!(c.nodes[a].node_status().sessions >= 1);
}

/// Payload bytes sent and received so far on the TCP connections to or from `addr`'s port.
fn bytes_on_sessions(addr: &str) -> u64 {
    let port = addr.rsplit_once(':').unwrap().1;
    let filter = format!("( sport = :{port} or dport = :{port} )");
    let out = Command::new("ss").args(["-tinH", "state", "established", &filter]).output().unwrap();
    assert!(out.status.success(), "ss: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|w| w.strip_prefix("bytes_sent:").or_else(|| w.strip_prefix("bytes_received:")))
        .map(|n| n.parse::<u64>().unwrap())
        .sum()
}

#[test]
fn a_quiet_session_carries_nothing_and_stays_open() {
    let mut c = Cluster::new(4 * MIB);
    // The shortest stall limit: a node that still took an idle session's silence for a hung peer
    // would drop the session within the quiet time below.
    c.stall = "600ms";
    let a = c.add_node("", &[]);
    let b = c.add_node("", &[]);
    c.wait_meshed(&[a, b]);
    assert!(c.nodes[a].identical(&c.img));
    c.wait_known(b, 64);
    // The last have-deltas go out within a tick of the last chunk; then both sessions (A's to
    // B and B's to A) fall quiet.
    let both = |c: &Cluster| bytes_on_sessions(&c.nodes[a].addr) + bytes_on_sessions(&c.nodes[b].addr);
    let mut last = both(&c);
    wait_until("sessions quiet", Duration::from_secs(20), || {
        std::thread::sleep(Duration::from_millis(600));
        let now = both(&c);
        std::mem::replace(&mut last, now) == now
    });
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(both(&c), last, "idle sessions carry no frames, not even pings");
    let sb = c.nodes[b].status();
    assert!(sb.p2p.sessions >= 1 && sb.p2p.peer_failures == 0, "the session stayed open: {:?}", sb.p2p);
    // The quiet session still serves: B reads the rest from A at once, with no failure.
    assert!(c.nodes[b].identical(&c.img));
    let sb = c.nodes[b].status();
    assert!(sb.p2p.bytes_from_peers > 0 && sb.p2p.peer_failures == 0 && sb.failed == 0, "{:?}", sb.p2p);
}

#[test]
fn concurrent_readers_take_each_chunk_from_the_origin_about_once() {
    let mut c = Cluster::new(32 * MIB);
    let nodes: Vec<usize> = (0..3).map(|_| c.add_node("", &[])).collect();
    let size = read_everywhere_at_once(&c, &nodes);
    let from_peers: u64 = nodes.iter().map(|&i| c.nodes[i].status().p2p.bytes_from_peers).sum();
    assert!(from_peers >= size, "the rest came from peers: {from_peers}");
    assert!(nodes.iter().all(|&i| c.nodes[i].status().failed == 0));
}

#[test]
fn relay_chains_climb_to_the_root_of_each_stripe() {
    // Fan-out 1 turns every stripe's tree into a chain through all five nodes: reads climb up
    // to four relays, each fetching the run from the next before serving it.
    let mut c = Cluster::new(16 * MIB);
    let nodes: Vec<usize> = (0..5).map(|_| c.add_node("fanout = 1", &[])).collect();
    let size = read_everywhere_at_once(&c, &nodes);
    let relayed: Vec<u64> = nodes.iter().map(|&i| c.nodes[i].status().p2p.bytes_to_peers).collect();
    // In a chain every node but the last relays each stripe once: about 4 × the image in all,
    // spread over the nodes.
    let total: u64 = relayed.iter().sum();
    assert!(total >= 3 * size && total <= 4 * size + size / 5, "relayed {total}: {relayed:?}");
    assert!(relayed.iter().filter(|&&r| r > 0).count() >= 4, "uploads spread: {relayed:?}");
    assert!(nodes.iter().all(|&i| c.nodes[i].status().failed == 0));
}

#[test]
fn a_peer_serving_corrupt_data_is_banned_and_no_bad_byte_reaches_a_client() {
    let mut c = Cluster::new(8 * MIB);
    let liar = c.add_node("", &[("VMT_TEST_CORRUPT_UPLOADS", "1")]);
    let b = c.add_node("", &[]);
    c.wait_meshed(&[liar, b]);
    assert!(c.nodes[liar].identical(&c.img), "the liar's own cache is fine");
    c.wait_known(b, 128);
    let before = settled(&c.nodes[b].env, "img").bytes_from_origin;
    assert!(c.nodes[b].identical(&c.img), "0 corrupt bytes reach the client");
    let s = settled(&c.nodes[b].env, "img");
    let p = s.p2p.clone().unwrap();
    assert!(p.peer_verify_failures >= 1, "the lie was caught");
    assert_eq!(p.bans, 1);
    assert_eq!(p.peers_banned, 1);
    assert_eq!(s.verify_failures, 0, "nothing bad got past the peer check");
    assert!(s.bytes_from_origin > before, "read elsewhere: the origin");
    assert_eq!(s.p2p.as_ref().unwrap().bytes_from_peers, 0, "nothing from the liar was used");
    assert_eq!(s.failed_reads, 0);
}

/// Reads on `readers` while `victim` (which holds everything and serves slowly) is taken out
/// by `strike`: the readers finish with correct data and no failed read.
fn survive(stall: &'static str, strike: impl FnOnce(&mut Proc)) {
    let mut c = Cluster::new(32 * MIB);
    c.stall = stall;
    let victim = c.add_node("upload_rate = \"8MiB\"", &[]);
    assert!(c.nodes[victim].identical(&c.img));
    let readers = [c.add_node("", &[]), c.add_node("", &[])];
    c.wait_meshed(&[victim, readers[0], readers[1]]);
    c.wait_known(readers[0], 512);
    c.wait_known(readers[1], 512);
    let mut procs: Vec<_> = readers.iter().map(|&i| compare_in_background(&c, i)).collect();
    wait_until("readers under way from the victim", Duration::from_secs(30), || {
        readers.iter().all(|&i| c.nodes[i].status().p2p.bytes_from_peers >= 2 * MIB as u64)
    });
    strike(&mut c.nodes[victim].vmtd);
    for p in &mut procs {
        assert!(p.wait().unwrap().success(), "identical data despite the lost peer");
    }
    for &i in &readers {
        let s = c.nodes[i].status();
        assert_eq!(s.failed, 0, "no read failed");
        assert!(s.p2p.peer_failures >= 1 || s.p2p.peer_refusals >= 1, "the loss was noticed");
    }
}

#[test]
fn a_peer_killed_mid_read_costs_latency_not_errors() {
    survive("3s", |p| p.kill9());
}

#[test]
fn a_peer_that_stalls_mid_read_is_left_within_the_stall_limit() {
    // Frozen, not dead: its sockets stay open and silent (SIGKILL on drop ends it).
    // The default stall limit: 1 s of silence.
    survive("1s", |p| unsafe {
        libc::kill(p.pid(), libc::SIGSTOP);
    });
}

#[test]
fn the_tracker_may_die_and_come_back() {
    let (mut c, a, b) = Cluster::pair(8 * MIB);
    c.tracker.as_mut().unwrap().kill9();
    wait_until("trackers reported down", Duration::from_secs(20), || c.nodes[a].node_status().trackers_up == 0);
    assert_eq!(c.nodes[a].status().peers, 1, "known peers are kept while no tracker answers");
    assert!(c.nodes[a].identical(&c.img));
    c.wait_known(b, 128);
    let before = c.nodes[b].status();
    assert!(c.nodes[b].identical(&c.img));
    let after = c.nodes[b].status();
    assert_eq!(after.origin, before.origin, "B still reads from A with the tracker down");
    assert!(after.p2p.bytes_from_peers > before.p2p.bytes_from_peers);
    c.start_tracker();
    wait_until("re-registered", Duration::from_secs(20), || c.nodes[b].node_status().trackers_up == 1);
    let late = c.add_node("", &[]);
    c.wait_meshed(&[a, b, late]);
    c.wait_known(late, 128);
    assert!(c.nodes[late].identical(&c.img));
    assert_eq!(c.nodes[late].status().origin, 0, "the newcomer found its peers through the restarted tracker");
}

#[test]
fn any_one_of_several_trackers_serves() {
    let mut c = Cluster::new(4 * MIB);
    // Each node names the live tracker and one that is down, in a different order.
    let dead = format!("\"127.0.0.1:{}\"", free_port());
    let live = format!("\"127.0.0.1:{}\"", c.tracker_port);
    let a = c.add_node_with_trackers(&format!("{dead}, {live}"), "", &[]);
    let b = c.add_node_with_trackers(&format!("{live}, {dead}"), "", &[]);
    c.wait_meshed(&[a, b]);
    assert_eq!(c.nodes[a].node_status().trackers_up, 1);
    assert!(c.nodes[a].identical(&c.img));
    c.wait_known(b, 64);
    let before = c.nodes[b].status().origin;
    assert!(c.nodes[b].identical(&c.img));
    assert_eq!(c.nodes[b].status().origin, before, "B found A through the tracker that is up");
}

#[test]
fn removing_an_image_ends_its_peer_sessions_and_it_can_come_back() {
    let (c, a, b) = Cluster::pair(4 * MIB);
    let vmt = |args: &[&str]| {
        let ctl = c.nodes[a].env.control_sock();
        let out = run(Command::new(VMT).arg("--socket").arg(&ctl).args(args));
        assert!(out.status.success(), "vmt {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    vmt(&["image", "remove", "img"]);
    // B's session to A ends with A's image: A no longer serves it to peers.
    wait_until("B's session to A closed", Duration::from_secs(20), || c.nodes[b].status().p2p.sessions == 0);
    // The cache is free again (its lock went with the last session): the image comes back.
    let origin = format!("file://{}", c.img.display());
    vmt(&["image", "add", "img", &origin, "--chunk-size", "64KiB"]);
    c.wait_meshed(&[a, b]);
    assert!(c.nodes[a].identical(&c.img));
}

#[test]
fn unauthenticated_and_malformed_peer_frames_only_end_their_connection() {
    let mut c = Cluster::new(4 * MIB);
    let a = c.add_node("", &[]);
    let addr = c.nodes[a].addr.clone();
    let closed = |s: &mut TcpStream| {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut b = [0u8; 4096];
        loop {
            match s.read(&mut b) {
                Ok(0) | Err(_) => return true,
                Ok(_) => continue,
            }
        }
    };
    // Garbage, an HTTP request, a frame over every limit, a frame too big for a handshake.
    let header = |msg_len: u32| {
        let mut h = MAGIC.to_vec();
        h.extend_from_slice(&[0, 1, 0, 0]);
        h.extend_from_slice(&msg_len.to_be_bytes());
        h.extend_from_slice(&[0; 8]);
        assert_eq!(h.len(), HEADER_LEN);
        h
    };
    for bytes in [vec![0x55u8; 64], b"GET / HTTP/1.1\r\n\r\n".to_vec(), header(u32::MAX), header(64 << 10)] {
        let mut s = TcpStream::connect(&addr).unwrap();
        s.write_all(&bytes).unwrap();
        assert!(closed(&mut s));
    }
    // A client that does not know the key gets a challenge, then nothing.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let image = vmthunder::image::Digest::from_hex(&status(&c.nodes[a].env, "img").digest).unwrap().0;
    rt.block_on(async {
        let wrong = ClusterKey::from_secret(b"a guess at the cluster key").unwrap();
        let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
        assert!(client_handshake(&mut s, &wrong, "127.0.0.1:1", image).await.is_err());
        // Skipping the proof and asking for data straight away.
        let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
        write_frame(&mut s, &Frame::new(Message::Hello { node: "127.0.0.1:1".into(), image, nonce: [0; 32] }))
            .await
            .unwrap();
        let _ = read_frame(&mut s).await.unwrap();
        write_frame(&mut s, &Frame::new(Message::Request { id: 1, first: 0, count: 1 })).await.unwrap();
        assert!(read_frame(&mut s).await.is_err(), "no data without a proof");
        // Authenticated, then a request beyond the image: the session ends.
        let key = ClusterKey::from_secret(KEY.as_bytes()).unwrap();
        let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
        client_handshake(&mut s, &key, "127.0.0.1:1", image).await.unwrap();
        assert_eq!(read_frame(&mut s).await.unwrap().msg, Message::Have);
        write_frame(&mut s, &Frame::new(Message::Request { id: 1, first: 60, count: 10 })).await.unwrap();
        loop {
            match read_frame(&mut s).await {
                Ok(f) if matches!(f.msg, Message::Ping | Message::HaveDelta) => continue,
                Ok(f) => panic!("unexpected reply {f:?}"),
                Err(_) => break,
            }
        }
    });
    assert!(c.nodes[a].vmtd.alive());
    // Counted as the server notices each (some only when the client hangs up).
    wait_until("six refused sessions counted", Duration::from_secs(10), || c.nodes[a].node_status().refused == 6);
    // The node still serves its guests and real peers.
    assert!(c.nodes[a].identical(&c.img));
    let b = c.add_node("", &[]);
    c.wait_meshed(&[a, b]);
    c.wait_known(b, 64);
    assert!(c.nodes[b].identical(&c.img));
    let s = c.nodes[b].status();
    assert!(s.p2p.bytes_from_peers > 0 && s.failed == 0, "the new peer read from A: {:?}", s.p2p);
}
