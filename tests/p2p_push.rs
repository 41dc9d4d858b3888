//! End-to-end tests of the push protocol as a child sees it on the wire: a real vmtd node on
//! loopback, and the child played by the test itself from 127.0.0.2 with the cluster key and the
//! library's protocol code, so that what the node sends, and in which order, can be checked
//! frame by frame. Everything is killed on drop, also when a test fails; every step waits for a
//! frame or a condition, never for time to pass.

mod common;

use std::time::Duration;

use common::cluster::*;
use common::{qemu_io_read, wait_until};
use roaring::RoaringBitmap;
use vmthunder::p2p::conn::{client_handshake, connect_from, image_name, joined_now, read_frame, write_frame};
use vmthunder::p2p::wire::{Frame, Message};

/// Where the test's child connects from: another machine, as far as the node can tell.
const ELSEWHERE: &str = "127.0.0.2";

/// The next frame whose message `pick` takes, skipping the others (have-maps, pings, offers).
async fn next<T>(s: &mut tokio::net::TcpStream, pick: impl Fn(&Frame) -> Option<T>) -> T {
    loop {
        let f = tokio::time::timeout(Duration::from_secs(30), read_frame(s)).await.expect("a frame").unwrap();
        if let Some(t) = pick(&f) {
            return t;
        }
    }
}

#[test]
fn a_request_that_crosses_a_push_is_answered_pushed_once_and_then_with_data() {
    // 32 chunks: fewer pushes in all than a session remembers, however many are on their way
    // when the request arrives.
    let mut c = Cluster::new(2 * MIB);
    // A reads the whole image: its boot, which it pushes to a child that adopts it.
    let a = c.add_node_in_order(free_port(), "", &[]);
    assert!(c.nodes[a].identical(&c.img));
    let image = c.nodes[a].image_id();
    // The child joins after A, so A ranks above it in the tree and takes the adoption.
    let me = image_name(&format!("{ELSEWHERE}:{}", free_port()), joined_now());
    let chunk = 64usize << 10;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let mut s = connect_from(&c.nodes[a].addr, &me).await.unwrap();
        client_handshake(&mut s, &cluster_key(), &me, image, Duration::from_secs(5)).await.unwrap();
        let mut none = Vec::new();
        RoaringBitmap::new().serialize_into(&mut none).unwrap();
        write_frame(&mut s, &Frame::with_tail(Message::Adopt { classes: vec![0] }, none.into())).await.unwrap();
        let (first, pushed) = next(&mut s, |f| match f.msg {
            Message::Push { first, .. } => Some((first, f.tail.clone())),
            _ => None,
        })
        .await;
        assert_eq!(&pushed[..chunk], &c.data[first as usize * chunk..][..chunk], "A pushed its boot");
        // Asked after the push was written (it crossed it, as far as A can tell): `Pushed`.
        write_frame(&mut s, &Frame::new(Message::Request { id: 7, first, count: 1 })).await.unwrap();
        let answer = next(&mut s, |f| match f.msg {
            Message::Pushed { .. } | Message::Data { .. } | Message::NotHave { .. } | Message::Busy { .. } => {
                Some(f.msg.clone())
            }
            _ => None,
        })
        .await;
        assert_eq!(answer, Message::Pushed { id: 7 }, "not sent twice");
        // Asked again (this child pretends it dropped the push): the bytes, not `Pushed` again.
        write_frame(&mut s, &Frame::new(Message::Request { id: 7, first, count: 1 })).await.unwrap();
        let data = next(&mut s, |f| match f.msg {
            Message::Data { id: 7 } => Some(f.tail.clone()),
            Message::Pushed { .. } | Message::NotHave { .. } | Message::Busy { .. } => {
                panic!("asked again, answered {:?}", f.msg)
            }
            _ => None,
        })
        .await;
        assert_eq!(&data[..], &pushed[..chunk]);
    });
    assert_eq!(c.nodes[a].node_status().pushes_answered, 1);
}

#[test]
fn a_relay_pushes_each_chunk_on_to_its_child_as_it_arrives() {
    // A holds the image (and pushes nothing: B asks for every run); B, below A, reads it all
    // at once, each run a chunk per frame from A (at 1 MiB/s: B's pusher sees each chunk
    // arrive while the rest of its run is on its way);
    // the child below B gets every run in `PushPart`s as its chunks reach B, before the run's
    // `Push` with the rest.
    let mut c = Cluster::new(2 * MIB);
    let a = c.add_node_in_order(free_port(), "upload_rate = \"1MiB\"\npush = false", &[]);
    assert!(c.nodes[a].identical(&c.img));
    let b = c.add_node_in_order(free_port(), "", &[]);
    wait_until("B's parent is A", Duration::from_secs(20), || c.nodes[b].status().p2p.tree_parents == 1);
    let image = c.nodes[b].image_id();
    let me = image_name(&format!("{ELSEWHERE}:{}", free_port()), joined_now());
    let chunk = 64usize << 10;
    let chunks = c.data.len() / chunk;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let mut s = rt.block_on(async {
        let mut s = connect_from(&c.nodes[b].addr, &me).await.unwrap();
        client_handshake(&mut s, &cluster_key(), &me, image, Duration::from_secs(5)).await.unwrap();
        let mut none = Vec::new();
        RoaringBitmap::new().serialize_into(&mut none).unwrap();
        write_frame(&mut s, &Frame::with_tail(Message::Adopt { classes: vec![0] }, none.into())).await.unwrap();
        s
    });
    wait_until("B takes the adoption", Duration::from_secs(20), || c.nodes[b].node_status().children == 1);
    let uri = c.nodes[b].env.export_uri("img");
    let reader = std::thread::spawn(move || qemu_io_read(&uri, 0, 2 * MIB as u64));
    let got = rt.block_on(async {
        // Per offer, by its first chunk: its length, the bytes so far and the frames they came in.
        let mut offers: std::collections::HashMap<u32, (u32, Vec<u8>, Vec<&'static str>)> = Default::default();
        let mut done: Vec<(u32, u32, Vec<u8>, Vec<&'static str>)> = Vec::new();
        while done.iter().map(|d| d.1 as usize).sum::<usize>() < chunks {
            let f = tokio::time::timeout(Duration::from_secs(30), read_frame(&mut s)).await.expect("a frame").unwrap();
            match f.msg {
                Message::Offer { first, count } => {
                    assert!(offers.insert(first, (count, Vec::new(), Vec::new())).is_none(), "offered twice");
                }
                Message::PushPart { first, .. } => {
                    let o = offers.get_mut(&first).expect("a part of an offered run");
                    o.1.extend_from_slice(&f.tail);
                    o.2.push("PushPart");
                }
                Message::Push { first, count } => {
                    let mut o = offers.remove(&first).expect("a push of an offered run");
                    assert_eq!(o.0, count, "the push ends its offer");
                    o.1.extend_from_slice(&f.tail);
                    o.2.push("Push");
                    done.push((first, count, o.1, o.2));
                }
                _ => {}
            }
        }
        done
    });
    assert!(reader.join().unwrap(), "B's read");
    for (first, count, bytes, frames) in &got {
        let at = *first as usize * chunk;
        assert_eq!(&bytes[..], &c.data[at..at + *count as usize * chunk], "chunks {first}+{count}");
        assert_eq!(frames.last(), Some(&"Push"));
    }
    // Both runs cut through, each but its first chunks (those in the frame that offered it) and
    // its last (in the push).
    let parts: Vec<usize> = got.iter().map(|d| d.3.len() - 1).collect();
    assert!(parts.iter().all(|&p| p > 0), "parts per run: {parts:?}");
    let parts: usize = parts.iter().sum();
    assert_eq!(c.nodes[b].node_status().push_parts as usize, parts);
    assert!(c.nodes[b].identical(&c.img));
}
