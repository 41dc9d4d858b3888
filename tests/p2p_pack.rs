//! End-to-end tests of chunks packed on the wire (`p2p.pack`): real vmtd nodes and a real
//! vmt-tracker on loopback, read by qemu-img, every node packing what it sends. The test image
//! is noise but for every seventh chunk, which is zeros: those pack, the rest go as they are.
//!
//! Nothing here waits for time to pass: every step waits for a condition.

mod common;

use common::cluster::*;

#[test]
fn packed_pushes_and_replies_reach_every_reader_intact() {
    // Pushes on (the default) and chunks packed: every node serves the image identically, the
    // origin sends it about once, and no packed chunk fails its check at a receiver.
    let mut c = Cluster::new(16 * MIB);
    let nodes: Vec<usize> = (0..3).map(|_| c.add_node("pack = true", &[])).collect();
    let size = read_everywhere_at_once(&c, &nodes);
    let packed: u64 = nodes.iter().map(|&i| c.nodes[i].node_status().packed_bytes).sum();
    assert!(packed >= size / 2, "{packed} bytes sent packed for an image of {size}");
    for &i in &nodes {
        let s = c.nodes[i].status();
        assert_eq!((s.failed, s.p2p.peer_verify_failures, s.p2p.bans), (0, 0, 0), "{:?}", s.p2p);
    }
}

#[test]
fn a_chunk_is_packed_where_it_enters_the_cluster_and_sent_on_as_it_came() {
    // Fan-out 1 and no pushes: every stripe's tree is a chain through all five nodes, and each
    // chunk goes down it from the node that read it from the origin.
    let mut c = Cluster::new(16 * MIB);
    let nodes: Vec<usize> = (0..5).map(|_| c.add_node("fanout = 1\npush = false\npack = true", &[])).collect();
    let size = read_everywhere_at_once(&c, &nodes);
    let relayed: u64 = nodes.iter().map(|&i| c.nodes[i].status().p2p.bytes_to_peers).sum();
    assert!(relayed >= 3 * size, "relayed {relayed}");
    let status: Vec<_> = nodes.iter().map(|&i| c.nodes[i].node_status()).collect();
    let packed: u64 = status.iter().map(|s| s.packed_bytes).sum();
    let wire: u64 = status.iter().map(|s| s.packed_wire_bytes).sum();
    assert!(packed >= relayed / 2 && wire < packed - packed / 20, "{wire} bytes on the wire for {packed}");
    // Relays send on the blocks they received rather than pack the chunks again.
    let p2p: Vec<_> = nodes.iter().map(|&i| c.nodes[i].status().p2p).collect();
    let here: u64 = p2p.iter().map(|p| p.chunks_packed).sum();
    let on: u64 = p2p.iter().map(|p| p.chunks_sent_as_received).sum();
    assert!(on > here, "{here} chunks packed, {on} sent on as received");
    assert!(p2p.iter().all(|p| p.peer_verify_failures == 0 && p.bans == 0), "{p2p:?}");
    assert!(nodes.iter().all(|&i| c.nodes[i].status().failed == 0));
}
