//! End-to-end tests of the peer-to-peer relay: real vmtd nodes and a real vmt-tracker on
//! loopback, read by qemu-img. Each node has its own directories and peer port; everything is
//! killed on drop, also when a test fails. Hostile peers are played by the test itself, with the
//! cluster key and the library's protocol code, from 127.0.0.2 (the nodes are at 127.0.0.1);
//! peers that lie are in `p2p_lies.rs`.
//!
//! Nothing here waits for time to pass: every step waits for a condition. Where a test needs one
//! node to read from another, the other holds the data before the reader joins, so the outcome
//! does not depend on which node the stripe trees (which hash the random ports) make the root.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::Duration;

use common::cluster::*;
use common::*;
use vmthunder::p2p::auth::ClusterKey;
use vmthunder::p2p::conn::{client_handshake, connect_from, read_frame, write_frame, HANDSHAKE_TIMEOUT};
use vmthunder::p2p::tracker::TrackerClient;
use vmthunder::p2p::wire::{Bytes32, Frame, Message, HEADER_LEN, MAGIC};

/// A runtime for the test's own protocol work (hostile peers).
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

/// Where the test's hostile peers connect from and listen at: another machine, as far as the
/// nodes at 127.0.0.1 can tell.
const ELSEWHERE: &str = "127.0.0.2";

/// A session opened to `addr` under the name `me`, from `me`'s address, authenticated with the
/// cluster key; `Some` if the node admitted it (it sent its have-map), `None` if it closed it.
async fn session_as(addr: &str, me: &str, image: Bytes32) -> Option<tokio::net::TcpStream> {
    session_from(addr, me, me, image).await
}

/// [`session_as`] from the address of the name `from`.
async fn session_from(addr: &str, from: &str, me: &str, image: Bytes32) -> Option<tokio::net::TcpStream> {
    let mut s = connect_from(addr, from).await.unwrap();
    client_handshake(&mut s, &cluster_key(), me, image, HANDSHAKE_TIMEOUT).await.ok()?;
    match tokio::time::timeout(Duration::from_secs(30), read_frame(&mut s)).await.expect("an answer") {
        Ok(f) if f.msg == Message::Have => Some(s),
        _ => None,
    }
}

#[test]
fn a_node_reads_what_its_peer_holds_from_the_peer() {
    let mut c = Cluster::new(16 * MIB);
    // A, the reader, has a parent in some trees, B is its parent there. Neither pushes: B then
    // holds only what it relayed, and reads the rest from A.
    let (a, b) = c.pair_in_16_trees("256KiB", "push = false");
    assert!(c.nodes[a].identical(&c.img));
    // A's misses on stripes whose tree B roots went through B, which read them from the origin
    // once.
    let origin = |c: &Cluster| {
        settled(&c.nodes[a].env, "img").bytes_from_origin + settled(&c.nodes[b].env, "img").bytes_from_origin
    };
    assert_eq!(origin(&c), c.data.len() as u64, "each chunk crossed the origin link once");
    let relayed = c.nodes[b].status().p2p.bytes_to_peers;
    assert!(relayed > 0 && relayed < c.data.len() as u64, "B relayed the stripes it roots, not all: {relayed}");
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
    // One chunk per stripe, over 16 trees: B relays some of A's reads and not all (with the
    // default 4 trees one node roots all of them once in 16 runs, and B then relayed every read).
    // Without pushes B holds only what it relayed (`a_parent_pushes_…` has the quiet check with
    // pushes).
    let (a, b) = c.pair_in_16_trees("64KiB", "push = false");
    assert!(c.nodes[a].identical(&c.img));
    // Once each side knows every chunk the other holds, every have-map has been sent and
    // received, no request is pending, and neither session has anything left to say.
    c.wait_known(b, 64);
    let held_by_b = settled(&c.nodes[b].env, "img").chunks_present;
    assert!(held_by_b > 0 && held_by_b < 64, "B relayed some of A's reads: {held_by_b} chunks");
    c.wait_known(a, held_by_b);
    let both = |c: &Cluster| bytes_on_sessions(&c.nodes[a].addr) + bytes_on_sessions(&c.nodes[b].addr);
    let last = both(&c);
    // The property itself is about time: nothing for 2 s.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(both(&c), last, "idle sessions carry no frames, not even pings");
    let sb = c.nodes[b].status();
    assert!(sb.p2p.sessions >= 1 && sb.p2p.peer_failures == 0, "the session stayed open: {:?}", sb.p2p);
    // The quiet session still serves: B reads the rest from A at once, with no failure.
    assert!(c.nodes[b].identical(&c.img));
    let sb = c.nodes[b].status();
    assert_eq!(sb.p2p.bytes_from_peers, (64 - held_by_b) * 64 * 1024, "the rest came from A: {:?}", sb.p2p);
    assert!(sb.p2p.peer_failures == 0 && sb.failed == 0, "{:?}", sb.p2p);
}

#[test]
fn a_parent_pushes_what_it_obtains_to_a_reading_child_that_never_asks() {
    let mut c = Cluster::new(16 * MIB);
    // A reads everything; B reads one chunk (a node adopts its parents once it reads) and then
    // nothing. In the trees A roots, B is its child: what A reads from the origin there, A
    // pushes to B. In the others B relays A's reads.
    let (a, b) = c.pair_in_16_trees("256KiB", "");
    let chunk = 64u64 << 10;
    assert!(qemu_io_read(&c.nodes[b].env.export_uri("img"), 0, 4096));
    wait_until("B adopted A", Duration::from_secs(20), || c.nodes[a].node_status().children == 1);
    assert!(c.nodes[a].identical(&c.img));
    let chunks = c.data.len() as u64 / chunk;
    wait_until("B holds every chunk", Duration::from_secs(30), || {
        settled(&c.nodes[b].env, "img").chunks_present == chunks
    });
    let (sa, sb) = (c.nodes[a].status(), settled(&c.nodes[b].env, "img"));
    let pb = sb.p2p.clone().unwrap();
    assert!(pb.bytes_to_peers > 0, "B relayed the stripes it roots: {pb:?}");
    // Each chunk came to B once: from the origin (what it relayed, maybe chunk 0) or from A;
    // from A as a reply chunk 0 at most, the rest pushed.
    assert_eq!(sb.bytes_from_origin + pb.bytes_from_peers, c.data.len() as u64, "{pb:?}");
    assert!(
        pb.peer_requests <= 1 && pb.bytes_from_peers - pb.bytes_pushed <= chunk,
        "B asked for chunk 0 at most: {pb:?}"
    );
    assert!(pb.bytes_pushed >= c.data.len() as u64 - sb.bytes_from_origin - chunk, "A pushed the rest: {pb:?}");
    assert_eq!(sa.p2p.bytes_to_peers, pb.bytes_from_peers, "every push was taken");
    let origin = |c: &Cluster| {
        settled(&c.nodes[a].env, "img").bytes_from_origin + settled(&c.nodes[b].env, "img").bytes_from_origin
    };
    assert_eq!(origin(&c), c.data.len() as u64, "each chunk crossed the origin link once");
    // Pushes done and every have-map sent, the sessions fall quiet (nothing for 2 s), and B
    // serves its cache.
    c.wait_known(a, chunks);
    c.wait_known(b, chunks);
    let both = |c: &Cluster| bytes_on_sessions(&c.nodes[a].addr) + bytes_on_sessions(&c.nodes[b].addr);
    let last = both(&c);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(both(&c), last, "sessions carry nothing once the pushes are done");
    assert!(c.nodes[b].identical(&c.img));
    let sb2 = c.nodes[b].status();
    assert_eq!(
        (sb2.p2p.bytes_from_peers, sb2.p2p.peer_requests),
        (pb.bytes_from_peers, pb.peer_requests),
        "all from B's cache"
    );
    assert_eq!(origin(&c), c.data.len() as u64);
}

#[test]
fn a_node_that_boots_later_is_pushed_its_parents_boot_without_asking() {
    let mut c = Cluster::new(16 * MIB);
    // A roots the one tree and boots first: it reads the whole image, which is then its boot.
    // B joins after it, below it, and reads one chunk: from then on A pushes it every run of
    // A's boot it lacks, in the order A read them.
    let a = c.add_node_in_order(free_port(), "", &[]);
    let b = c.add_node_in_order(free_port(), "", &[]);
    c.wait_meshed(&[a, b]);
    wait_until("the tracker's places", Duration::from_secs(20), || {
        (c.nodes[a].status().p2p.tree_parents, c.nodes[b].status().p2p.tree_parents) == (0, 1)
    });
    assert!(c.nodes[a].identical(&c.img));
    let chunk = 64u64 << 10;
    let chunks = c.data.len() as u64 / chunk;
    assert!(qemu_io_read(&c.nodes[b].env.export_uri("img"), 0, 4096));
    wait_until("B holds A's whole boot", Duration::from_secs(30), || {
        settled(&c.nodes[b].env, "img").chunks_present == chunks
    });
    let sb = settled(&c.nodes[b].env, "img");
    let pb = sb.p2p.clone().unwrap();
    assert_eq!(sb.bytes_from_origin, 0, "B read nothing from the origin: {pb:?}");
    assert!(pb.peer_requests <= 1, "B asked for its one read at most: {pb:?}");
    assert!(pb.bytes_pushed >= c.data.len() as u64 - chunk, "A pushed the rest: {pb:?}");
    assert_eq!(settled(&c.nodes[a].env, "img").bytes_from_origin, c.data.len() as u64);
    assert!(c.nodes[b].identical(&c.img));
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
    // to four relays, each fetching the run from the next before serving it. Without pushes:
    // with them, a push that crosses its child's request for the same run on the wire is sent
    // twice (3–6% of the bytes in the storms of BENCHMARKS.md), which this count of each link
    // carrying the image once would take for a relay fault.
    let mut c = Cluster::new(16 * MIB);
    let nodes: Vec<usize> = (0..5).map(|_| c.add_node("fanout = 1\npush = false", &[])).collect();
    let size = read_everywhere_at_once(&c, &nodes);
    let relayed: Vec<u64> = nodes.iter().map(|&i| c.nodes[i].status().p2p.bytes_to_peers).collect();
    // In a chain every node but the last relays each stripe once: about 4 × the image in all,
    // spread over the nodes.
    let total: u64 = relayed.iter().sum();
    assert!(total >= 3 * size && total <= 4 * size + size / 5, "relayed {total}: {relayed:?}");
    assert!(relayed.iter().filter(|&&r| r > 0).count() >= 4, "uploads spread: {relayed:?}");
    assert!(nodes.iter().all(|&i| c.nodes[i].status().failed == 0));
    // Replies go a chunk per frame (a 16-chunk run is 15 parts and the rest), and relays send
    // the chunks of the runs they fetch for their askers on as they come (cut through).
    let status: Vec<_> = nodes.iter().map(|&i| c.nodes[i].node_status()).collect();
    let parts: u64 = status.iter().map(|s| s.parts).sum();
    let cut: u64 = status.iter().map(|s| s.cut_through).sum();
    let chunk = 64 << 10;
    assert!(parts * chunk >= total / 2, "{parts} parts for {total} bytes relayed");
    assert!(cut > 0 && cut <= parts, "{cut} of {parts} parts cut through");
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
        assert_eq!(c.nodes[i].status().failed, 0, "no read failed");
        // Noticed by a request that failed, or (when none was under way to it at the strike) by
        // the session's end or the tracker's next answers: the victim is no longer used.
        wait_until("the victim no longer used", Duration::from_secs(30), || {
            let p = c.nodes[i].status().p2p;
            p.peer_failures + p.peer_refusals >= 1 || p.peers_usable == 1
        });
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
    // A holds the whole image before B joins, so B has all of it to read from A. (When both
    // read in turn, B relays A's reads in the stripes it roots, which depend on the ports: once
    // in 256 runs it roots all 8 and then holds everything before its own read.)
    let mut c = Cluster::new(8 * MIB);
    let a = c.add_node("", &[]);
    assert!(c.nodes[a].identical(&c.img));
    let b = c.add_node("", &[]);
    c.wait_meshed(&[a, b]);
    c.wait_known(b, 128);
    c.tracker.as_mut().unwrap().kill9();
    for i in [a, b] {
        wait_until("trackers reported down", Duration::from_secs(20), || c.nodes[i].node_status().trackers_up == 0);
        assert_eq!(c.nodes[i].status().peers, 1, "known peers are kept while no tracker answers");
    }
    assert!(c.nodes[b].identical(&c.img));
    let after = settled(&c.nodes[b].env, "img");
    assert_eq!(after.bytes_from_origin, 0, "B still reads from A with the tracker down");
    assert_eq!(after.p2p.unwrap().bytes_from_peers, c.data.len() as u64);
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
        assert!(client_handshake(&mut s, &wrong, "127.0.0.1:1", image, HANDSHAKE_TIMEOUT).await.is_err());
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
        client_handshake(&mut s, &key, "127.0.0.1:1", image, HANDSHAKE_TIMEOUT).await.unwrap();
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

#[test]
fn a_key_holder_gets_no_more_than_the_per_address_bound_whatever_names_it_claims() {
    let (c, a, b) = Cluster::pair(4 * MIB);
    let (node, image) = (c.nodes[a].addr.clone(), c.nodes[a].image_id());
    let tracker = format!("127.0.0.1:{}", c.tracker_port);
    let per_address = 8;
    let rt = runtime();
    // 1,000 names of its own address at A's peer server, each kept open once admitted.
    let mut admitted = Vec::new();
    for port in 1..=1000 {
        if let Some(s) = rt.block_on(session_as(&node, &format!("{ELSEWHERE}:{port}"), image)) {
            admitted.push(s);
        }
    }
    eprintln!("peer server: {} of 1000 names admitted", admitted.len());
    assert_eq!(admitted.len(), per_address, "the per-address bound, and no more");
    let sa = c.nodes[a].node_status();
    assert_eq!(sa.open_sessions, per_address as u64 + 1, "B's session and the key holder's: {sa:?}");
    // A name that is not an address of the machine it comes from is refused, places or not.
    drop(admitted.pop());
    wait_until("a place free", Duration::from_secs(20), || c.nodes[a].node_status().open_sessions == 8);
    let from = format!("{ELSEWHERE}:1");
    assert!(rt.block_on(session_from(&node, &from, "127.0.0.3:1", image)).is_none(), "a name of another address");
    assert!(rt.block_on(session_as(&node, &format!("{ELSEWHERE}:1001"), image)).is_some(), "the free place");
    // The same names at the tracker: every registration is answered, but the answers, and so the
    // nodes' member lists, name at most the bound of them at once.
    let mut most_named = 0;
    let mut most_known = 0;
    let mut answered = 0;
    for port in 1..=1000 {
        let mut client = TrackerClient::new(&tracker, &format!("{ELSEWHERE}:{port}"), cluster_key());
        if let Ok(answer) = rt.block_on(client.heartbeat(&[(image, 0)], ASK, Duration::from_secs(5))) {
            let named = answer[&image].names().iter().filter(|n| n.starts_with(&format!("{ELSEWHERE}:"))).count();
            most_named = most_named.max(named);
            answered += 1;
        }
        if port % 50 == 0 {
            most_known = most_known.max(c.nodes[a].status().peers);
        }
    }
    wait_until("A heard of the key holder's names", Duration::from_secs(20), || c.nodes[a].status().peers > 1);
    for i in [a, b] {
        most_known = most_known.max(c.nodes[i].status().peers);
    }
    eprintln!(
        "tracker: {answered} of 1000 registrations answered, at most {most_named} of the names in one answer; \
         nodes knew at most {most_known} peers"
    );
    assert!(most_named <= per_address, "the tracker named {most_named} of them at once");
    assert!(most_known <= per_address as u64 + 1, "a node knew {most_known} peers");
    // Once the names expire, the real nodes relay to each other as before.
    for i in [a, b] {
        wait_until("the names forgotten", Duration::from_secs(30), || c.nodes[i].status().peers == 1);
    }
    assert!(c.nodes[a].identical(&c.img) && c.nodes[b].identical(&c.img));
    let origin = settled(&c.nodes[a].env, "img").bytes_from_origin + settled(&c.nodes[b].env, "img").bytes_from_origin;
    assert_eq!(origin, c.data.len() as u64, "each chunk crossed the origin link once");
}

#[test]
fn a_peer_that_never_reads_its_replies_holds_no_more_than_the_reply_budget() {
    const BUDGET: u64 = 64 << 20;
    let mut c = Cluster::new(32 * MIB);
    let a = c.add_node("", &[]);
    assert!(c.nodes[a].identical(&c.img));
    let _ = settled(&c.nodes[a].env, "img");
    let (node, image) = (c.nodes[a].addr.clone(), c.nodes[a].image_id());
    let before = c.nodes[a].rss();
    // Eight names of one address (its bound), each asking 16 times for the whole image (32 MiB)
    // and reading none of it: 4 GiB asked. Without a budget, every upload slot (16) would hold a
    // 32 MiB reply until its write timed out: 512 MiB.
    let rt = runtime();
    let mut sessions: Vec<tokio::net::TcpStream> = (1..=8)
        .map(|port| rt.block_on(session_as(&node, &format!("{ELSEWHERE}:{port}"), image)).expect("admitted"))
        .collect();
    rt.block_on(async {
        for s in &mut sessions {
            // A small, fixed receive buffer (no autotuning): the node's writes stall at once.
            let small: libc::c_int = 64 << 10;
            let fd = std::os::fd::AsRawFd::as_raw_fd(&*s);
            // SAFETY: a valid socket descriptor and a c_int option value of the given size.
            let r = unsafe {
                libc::setsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    libc::SO_RCVBUF,
                    (&small as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            assert_eq!(r, 0);
            // All 16 in one write, so that they arrive together: the node answers the ones it
            // cannot take with `Busy` at once, before a reply's frames fill the session's queue
            // behind the write that this reader stalls (then the node stops reading requests
            // until the write times out, which is right, but leaves fewer to count).
            let mut all = Vec::new();
            for id in 1..=16 {
                all.extend(Frame::new(Message::Request { id, first: 0, count: 512 }).encode());
            }
            tokio::io::AsyncWriteExt::write_all(s, &all).await.unwrap();
        }
    });
    // Replies are reserved before they are read; the rest are refused at once. Memory is sampled
    // until the node gave up on the stuck writes (5 s each) and freed every reservation.
    wait_until("the budget spent and the rest refused", Duration::from_secs(30), || {
        let s = c.nodes[a].node_status();
        s.requests == 8 * 16 && s.busy + 2 == 8 * 16
    });
    let mut most = 0;
    wait_until("the stuck replies dropped", Duration::from_secs(60), || {
        most = most.max(c.nodes[a].rss());
        c.nodes[a].node_status().reply_bytes == 0
    });
    let s = c.nodes[a].node_status();
    let grew = most.saturating_sub(before);
    eprintln!(
        "reply bytes held at most {} (budget {BUDGET}); vmtd grew by {} MiB at most ({} MiB before)",
        s.reply_bytes_peak,
        grew >> 20,
        before >> 20
    );
    assert_eq!(s.reply_bytes_peak, BUDGET, "two 32 MiB replies fill the budget");
    assert!(grew <= BUDGET + (32 << 20), "vmtd grew by {grew} bytes");
    drop(sessions);
    // The node serves a real peer as before.
    let b = c.add_node("", &[]);
    c.wait_meshed(&[a, b]);
    c.wait_known(b, 512);
    assert!(c.nodes[b].identical(&c.img));
    let sb = settled(&c.nodes[b].env, "img");
    assert_eq!(sb.bytes_from_origin, 0);
    assert_eq!(sb.p2p.unwrap().bytes_from_peers, c.data.len() as u64);
}

#[test]
fn an_image_holds_no_more_peer_sessions_than_its_bound() {
    let mut c = Cluster::new(4 * MIB);
    let a = c.add_node("max_sessions = 3", &[]);
    assert!(c.nodes[a].identical(&c.img), "A holds the image");
    let (node, image) = (c.nodes[a].addr.clone(), c.nodes[a].image_id());
    let held = |c: &Cluster| {
        let (n, s) = (c.nodes[a].node_status(), c.nodes[a].status());
        n.open_sessions + s.p2p.sessions
    };
    // Six key holders of another address: three are admitted, the rest refused after the
    // handshake (no have-map), however long the three stay.
    let rt = runtime();
    let mut admitted = Vec::new();
    for port in 1..=6 {
        if let Some(s) = rt.block_on(session_as(&node, &format!("{ELSEWHERE}:{port}"), image)) {
            admitted.push(s);
        }
    }
    assert_eq!(admitted.len(), 3, "the bound, and no more");
    assert_eq!(held(&c), 3);
    // A place frees up when a session ends, and is taken again.
    drop(admitted.pop());
    wait_until("a place free", Duration::from_secs(20), || c.nodes[a].node_status().open_sessions == 2);
    let again = rt.block_on(session_as(&node, &format!("{ELSEWHERE}:7"), image));
    admitted.push(again.expect("the free place"));
    assert!(rt.block_on(session_as(&node, &format!("{ELSEWHERE}:8"), image)).is_none(), "full again");
    // A real node joins while A is full: it reads the whole image elsewhere, and A holds at most
    // its bound all along (sampled while B reads).
    let b = c.add_node("", &[]);
    let mut reader = compare_in_background(&c, b);
    let mut most = 0;
    while reader.try_wait().unwrap().is_none() {
        most = most.max(held(&c));
    }
    assert!(reader.wait().unwrap().success(), "B reads the image whole");
    assert!(most <= 3, "A held {most} sessions");
    assert_eq!(c.nodes[a].status().p2p.sessions_peak, 3, "A's own count: the bound reached, never passed");
    assert_eq!(c.nodes[b].status().failed, 0);
}
