//! End-to-end tests of peers that lie: real vmtd nodes and a real vmt-tracker on loopback, read
//! by qemu-img, with one node told to lie by a test switch (corrupt uploads, claims it cannot
//! serve) or a hostile member played by the test itself from 127.0.0.2 with the cluster key.
//! What a lie may cost is latency, never a wrong byte, a failed read or more origin egress.
//! Everything is killed on drop, also when a test fails; every step waits for a condition.

mod common;

use std::net::TcpListener;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::cluster::*;
use common::*;
use roaring::RoaringBitmap;
use vmthunder::p2p::conn::{read_frame, server_handshake, write_frame, ConnError, HANDSHAKE_TIMEOUT};
use vmthunder::p2p::tracker::TrackerClient;
use vmthunder::p2p::wire::{Bytes32, Frame, Message};

/// A runtime for the test's own protocol work (the hostile member).
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

/// Where the hostile member listens: another machine, as far as the nodes at 127.0.0.1 can tell.
const ELSEWHERE: &str = "127.0.0.2";

/// A hostile member of the cluster: it holds the key, listens at [`ELSEWHERE`], registers with
/// the tracker every 200 ms like a node, claims every chunk of the image in its have-map, and
/// answers every request with `NotHave`. Stopped on drop, also when a test fails.
struct Liar {
    name: String,
    asked: Arc<AtomicU64>,
    stop: Option<tokio::sync::watch::Sender<bool>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Liar {
    fn start(c: &Cluster, image: Bytes32, chunks: u32) -> Liar {
        let listener = TcpListener::bind(format!("{ELSEWHERE}:0")).unwrap();
        listener.set_nonblocking(true).unwrap();
        let name = listener.local_addr().unwrap().to_string();
        let tracker = format!("127.0.0.1:{}", c.tracker_port);
        let asked = Arc::new(AtomicU64::new(0));
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        let (me, counter) = (name.clone(), asked.clone());
        let thread = std::thread::spawn(move || {
            runtime().block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                let mut tracker = TrackerClient::new(&tracker, &me, cluster_key());
                let mut tick = tokio::time::interval(Duration::from_millis(200));
                loop {
                    tokio::select! {
                        _ = tick.tick() => {
                            let _ = tracker.heartbeat(&[(image, 0)], ASK, Duration::from_secs(1)).await;
                        }
                        r = listener.accept() => if let Ok((s, _)) = r {
                            let (me, counter) = (me.clone(), counter.clone());
                            tokio::spawn(async move { let _ = Liar::lie(s, &me, chunks, &counter).await; });
                        },
                        _ = stopped.wait_for(|v| *v) => return,
                    }
                }
            })
        });
        Liar { name, asked, stop: Some(stop), thread: Some(thread) }
    }

    async fn lie(mut s: tokio::net::TcpStream, me: &str, chunks: u32, asked: &AtomicU64) -> Result<(), ConnError> {
        server_handshake(&mut s, &cluster_key(), me, HANDSHAKE_TIMEOUT).await?;
        let all: RoaringBitmap = (0..chunks).collect();
        let mut map = Vec::new();
        all.serialize_into(&mut map).unwrap();
        write_frame(&mut s, &Frame::with_tail(Message::Have, map.into())).await?;
        loop {
            let Message::Request { id, .. } = read_frame(&mut s).await?.msg else { return Ok(()) };
            asked.fetch_add(1, Ordering::Relaxed);
            write_frame(&mut s, &Frame::new(Message::NotHave { id })).await?;
        }
    }
}

impl Drop for Liar {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(true);
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[test]
fn a_peer_serving_corrupt_data_is_banned_and_no_bad_byte_reaches_a_client() {
    let mut c = Cluster::new(8 * MIB);
    let liar = c.add_node("", &[("VMT_TEST_CORRUPT_UPLOADS", "1")]);
    // The liar holds the whole image before B joins: B has every chunk left to read, whatever
    // the stripe trees.
    assert!(c.nodes[liar].identical(&c.img), "the liar's own cache is fine");
    let b = c.add_node("", &[]);
    c.wait_meshed(&[liar, b]);
    c.wait_known(b, 128);
    assert!(c.nodes[b].identical(&c.img), "0 corrupt bytes reach the client");
    let s = settled(&c.nodes[b].env, "img");
    let p = s.p2p.clone().unwrap();
    assert!(p.peer_verify_failures >= 1, "the lie was caught");
    assert_eq!(p.bans, 1);
    assert_eq!(p.peers_banned, 1);
    assert_eq!(s.verify_failures, 0, "nothing bad got past the peer check");
    assert_eq!(s.bytes_from_origin, c.data.len() as u64, "read elsewhere: the origin");
    assert_eq!(s.p2p.as_ref().unwrap().bytes_from_peers, 0, "nothing from the liar was used");
    assert_eq!(s.failed_reads, 0);
}

/// A parent that pushes corrupt runs (its replies are sound): its child checks every pushed
/// chunk, stores none of them, bans it, and reads the image intact from the origin.
#[test]
fn a_parent_pushing_corrupt_data_is_banned_and_nothing_of_it_is_stored() {
    let mut c = Cluster::new(8 * MIB);
    // Joining first, the liar is the root of vmtd's one tree and B's parent.
    let liar = c.add_node_in_order(free_port(), "", &[("VMT_TEST_CORRUPT_PUSHES", "1")]);
    let b = c.add_node("", &[]);
    c.wait_meshed(&[liar, b]);
    // B adopts its parent once its guest reads: one chunk, from the liar.
    assert!(qemu_io_read(&c.nodes[b].env.export_uri("img"), 0, 4096));
    wait_until("B adopted the liar", Duration::from_secs(20), || c.nodes[liar].node_status().children == 1);
    assert!(c.nodes[liar].identical(&c.img), "the liar's own cache is fine");
    wait_until("the lie caught", Duration::from_secs(20), || c.nodes[b].status().p2p.bans == 1);
    let p = c.nodes[b].status().p2p;
    assert!(c.nodes[liar].node_status().pushes >= 1, "the liar pushed");
    assert!(p.peer_verify_failures >= 1 && p.peers_banned == 1, "{p:?}");
    assert_eq!((p.bytes_pushed, p.bytes_from_peers), (0, 64 << 10), "nothing pushed was taken: {p:?}");
    assert!(c.nodes[b].identical(&c.img), "0 corrupt bytes reach the client");
    let s = settled(&c.nodes[b].env, "img");
    assert_eq!(s.verify_failures, 0, "nothing bad got past the peer check");
    assert_eq!(s.bytes_from_origin, c.data.len() as u64 - (64 << 10), "the rest read elsewhere: the origin");
    assert_eq!(s.failed_reads, 0);
}

/// A parent that claims every chunk and refuses what it lacks instead of fetching it for its
/// children (the lying switch): they climb past it, and the origin still sends each chunk about
/// once (`read_at_once` checks it within 5%).
#[test]
fn a_parent_that_claims_everything_and_relays_nothing_raises_no_origin_egress() {
    // Six nodes joining in turn, the order of vmtd's one tree: the liar, second, is the root's
    // first child, so it is the parent of two nodes and not the root (which reads the origin
    // itself).
    lying_parent_at(1);
}

/// As above with the liar at the root of the tree, reading nothing itself (a root that reads
/// the image reads it from the origin, as any root does): it refuses every chunk, its first
/// child reads the origin in its stead and the second climbs to the first, so the origin still
/// sends each chunk about once.
#[test]
fn a_lying_root_that_reads_nothing_raises_no_origin_egress() {
    lying_parent_at(0);
}

/// Six nodes joining in turn, the `at`-th of them lying (see above); the others read the image
/// at once, and the liar too unless it is the root.
fn lying_parent_at(at: usize) {
    let mut c = Cluster::new(8 * MIB);
    let lie = [(vmthunder::p2p::server::LIE_SWITCH, "1")];
    let nodes: Vec<usize> =
        (0..6).map(|k| c.add_node_in_order(free_port(), "", if k == at { &lie } else { &[] })).collect();
    c.wait_meshed(&nodes);
    // The tracker's places in every view (one tree): the first node roots it, the others have
    // a parent, so no read goes by a view ranked before the places came.
    wait_until("the tracker's places", Duration::from_secs(20), || {
        nodes.iter().enumerate().all(|(k, &i)| c.nodes[i].status().p2p.tree_parents == u64::from(k > 0))
    });
    let readers: Vec<usize> = nodes.iter().copied().filter(|&i| at != 0 || i != nodes[at]).collect();
    read_at_once(&c, &readers);
    assert!(c.nodes[nodes[at]].node_status().not_have > 0, "the liar was asked as a parent and refused");
    if at == 0 {
        assert_eq!(settled(&c.nodes[nodes[at]].env, "img").bytes_from_origin, 0, "the liar read nothing");
    }
    assert!(nodes.iter().all(|&i| c.nodes[i].status().failed == 0));
}

#[test]
fn a_peer_that_answers_not_have_for_what_it_claims_does_not_raise_origin_egress() {
    let mut c = Cluster::new(32 * MIB);
    let nodes: Vec<usize> = (0..3).map(|_| c.add_node("", &[])).collect();
    let chunks = (c.data.len() / (64 << 10)) as u32;
    let liar = Liar::start(&c, c.nodes[nodes[0]].image_id(), chunks);
    // Every node knows the liar and believes it holds the whole image.
    for &i in &nodes {
        wait_until("the liar's claims known", Duration::from_secs(30), || {
            let s = c.nodes[i].status();
            s.peers == 3 && s.p2p.sessions >= 3 && s.p2p.chunks_at_peers == u64::from(chunks)
        });
    }
    let (size, origin) = read_at_once(&c, &nodes);
    let asked = liar.asked.load(Ordering::Relaxed);
    eprintln!(
        "origin sent {origin} bytes for an image of {size} ({:.3}x); the liar ({}) was asked {asked} times",
        origin as f64 / size as f64,
        liar.name
    );
    assert!(asked > 0, "the liar was asked");
    let from_peers: u64 = nodes.iter().map(|&i| c.nodes[i].status().p2p.bytes_from_peers).sum();
    assert!(from_peers >= size, "the rest came from real peers: {from_peers}");
    assert!(nodes.iter().all(|&i| c.nodes[i].status().failed == 0));
}
