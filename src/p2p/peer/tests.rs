//! Sessions against a scripted peer: replies, parts, pushes and the protocol errors that end a
//! session.

use super::*;
use crate::image::{ChunkSize, Geometry};
use crate::p2p::conn::{read_frame, server_handshake};

struct NoSink;

impl PushSink for NoSink {
    fn offered(&self, _: &str, _: Range<u32>) -> Option<Offered> {
        None
    }
    fn pushed(&self, _: &str, _: Range<u32>, _: Offered, _: Pieces) -> BoxFuture<'_, bool> {
        Box::pin(async { true })
    }
}

/// Chunk `c`'s bytes: 4096 times `c`.
fn chunks(run: Range<u32>) -> Bytes {
    Bytes::from(run.flat_map(|c| [c as u8; 4096]).collect::<Vec<u8>>())
}

async fn expect_request(s: &mut tokio::net::TcpStream) -> (u32, u32, u32) {
    match read_frame(s).await.unwrap().msg {
        Message::Request { id, first, count } => (id, first, count),
        other => panic!("expected a request, got {other:?}"),
    }
}

#[tokio::test]
async fn a_request_crossing_a_push_is_answered_from_it_and_asked_again_only_once() {
    let (conn, peer) = scripted(|mut s| async move {
        // 1. The request for chunk 2 crosses the push of 0..4: answered from the push.
        let (id, first, count) = expect_request(&mut s).await;
        assert_eq!((first, count), (2, 1));
        write_frame(&mut s, &Frame::new(Message::Offer { first: 0, count: 4 })).await.unwrap();
        write_frame(&mut s, &Frame::with_tail(Message::Push { first: 0, count: 4 }, chunks(0..4))).await.unwrap();
        write_frame(&mut s, &Frame::new(Message::Pushed { id })).await.unwrap();
        // 2. `Pushed` for a run the client holds from no push: it asks again, gets `Data`.
        let (id, first, count) = expect_request(&mut s).await;
        assert_eq!((first, count), (8, 2));
        write_frame(&mut s, &Frame::new(Message::Pushed { id })).await.unwrap();
        assert_eq!(expect_request(&mut s).await, (id, 8, 2), "the same request again");
        write_frame(&mut s, &Frame::with_tail(Message::Data { id }, chunks(8..10))).await.unwrap();
        // 3. `Pushed` twice: no third request, the client counts it as `NotHave`.
        let (id, _, _) = expect_request(&mut s).await;
        write_frame(&mut s, &Frame::new(Message::Pushed { id })).await.unwrap();
        assert_eq!(expect_request(&mut s).await.0, id);
        write_frame(&mut s, &Frame::new(Message::Pushed { id })).await.unwrap();
        // 4. A push (not waited for here) whose tail is longer than its run ends the session.
        let (id, first, _) = expect_request(&mut s).await;
        assert_eq!(first, 13);
        write_frame(&mut s, &Frame::with_tail(Message::Push { first: 4, count: 2 }, chunks(4..7))).await.unwrap();
        // Answered after it: a client that read on would take this reply.
        write_frame(&mut s, &Frame::with_tail(Message::Data { id }, chunks(13..14))).await.unwrap();
        // The client closes; anything else it sent is a failure of the test.
        assert!(read_frame(&mut s).await.is_err(), "the client sent more after a bad push");
    })
    .await;
    assert_eq!(conn.request(2, 1, mpsc::unbounded_channel().0).await.unwrap(), chunks(2..3));
    assert_eq!(conn.request(8, 2, mpsc::unbounded_channel().0).await.unwrap(), chunks(8..10));
    assert_eq!(conn.request(12, 1, mpsc::unbounded_channel().0).await, Err(Refusal::NotHave));
    assert_eq!(conn.request(13, 1, mpsc::unbounded_channel().0).await, Err(Refusal::Closed));
    assert!(conn.pending.lock().unwrap().is_empty());
    tokio::time::timeout(Duration::from_secs(10), peer).await.unwrap().unwrap();
}

#[tokio::test]
async fn parts_of_a_reply_come_ahead_in_order_and_the_reply_holds_the_rest() {
    let (go_on, go) = oneshot::channel::<()>();
    let (conn, peer) = scripted(|mut s| async move {
        // 1. Chunks 4..8: one part, then one of two chunks, then the reply's last chunk,
        // held back until the client has seen the parts.
        let (id, first, count) = expect_request(&mut s).await;
        assert_eq!((first, count), (4, 4));
        write_frame(&mut s, &Frame::with_tail(Message::Part { id, count: 1 }, chunks(4..5))).await.unwrap();
        write_frame(&mut s, &Frame::with_tail(Message::Part { id, count: 2 }, chunks(5..7))).await.unwrap();
        go.await.unwrap();
        write_frame(&mut s, &Frame::with_tail(Message::Data { id }, chunks(7..8))).await.unwrap();
        // 2. A part, then `NotHave`: the part stands, the request is refused.
        let (id, _, _) = expect_request(&mut s).await;
        write_frame(&mut s, &Frame::with_tail(Message::Part { id, count: 1 }, chunks(8..9))).await.unwrap();
        write_frame(&mut s, &Frame::new(Message::NotHave { id })).await.unwrap();
        // 3. A part that leaves nothing to the reply ends the session.
        let (id, _, _) = expect_request(&mut s).await;
        write_frame(&mut s, &Frame::with_tail(Message::Part { id, count: 2 }, chunks(10..12))).await.unwrap();
        assert!(read_frame(&mut s).await.is_err(), "the client sent more after a bad part");
    })
    .await;
    let (tx, mut parts) = mpsc::unbounded_channel();
    let reply = {
        let conn = conn.clone();
        tokio::spawn(async move { conn.request(4, 4, tx).await })
    };
    assert_eq!(parts.recv().await.unwrap(), (4..5, chunks(4..5)));
    assert_eq!(parts.recv().await.unwrap(), (5..7, chunks(5..7)));
    assert!(!reply.is_finished(), "the parts came ahead of the reply");
    go_on.send(()).unwrap();
    assert_eq!(reply.await.unwrap().unwrap(), chunks(7..8), "the reply is the rest");
    let (tx, mut parts) = mpsc::unbounded_channel();
    assert_eq!(conn.request(8, 2, tx).await, Err(Refusal::NotHave));
    assert_eq!(parts.recv().await.unwrap(), (8..9, chunks(8..9)));
    assert_eq!(conn.request(10, 2, mpsc::unbounded_channel().0).await, Err(Refusal::Closed));
    tokio::time::timeout(Duration::from_secs(10), peer).await.unwrap().unwrap();
}

#[tokio::test]
async fn pushed_after_parts_ends_the_session() {
    let (conn, peer) = scripted(|mut s| async move {
        let (id, _, _) = expect_request(&mut s).await;
        write_frame(&mut s, &Frame::with_tail(Message::Part { id, count: 1 }, chunks(0..1))).await.unwrap();
        write_frame(&mut s, &Frame::new(Message::Pushed { id })).await.unwrap();
        assert!(read_frame(&mut s).await.is_err(), "the client asked again after parts");
    })
    .await;
    assert_eq!(conn.request(0, 2, mpsc::unbounded_channel().0).await, Err(Refusal::Closed));
    tokio::time::timeout(Duration::from_secs(10), peer).await.unwrap().unwrap();
}

/// Frames of pushes cut through that break the protocol end the session (each in a session of
/// its own): a part of no chunk, a part whose tail is not its chunks' length, a part reaching
/// the image's end (its offer's last chunk, for an offer not taken), a withdrawal with bytes.
#[tokio::test]
async fn bad_push_parts_and_withdrawals_end_the_session() {
    let bad = [
        Frame::with_tail(Message::PushPart { first: 2, count: 0 }, Bytes::new()),
        Frame::with_tail(Message::PushPart { first: 2, count: 2 }, chunks(2..3)),
        Frame::with_tail(Message::PushPart { first: 12, count: 4 }, chunks(12..16)),
        Frame::with_tail(Message::Push { first: 2, count: 0 }, chunks(2..3)),
    ];
    for frame in bad {
        let what = format!("{:?}", frame.msg);
        let (conn, peer) = scripted(move |mut s| async move {
            let (id, _, _) = expect_request(&mut s).await;
            write_frame(&mut s, &Frame::new(Message::Offer { first: 2, count: 8 })).await.unwrap();
            // Withdrawn and pushed in parts as it should be: the session goes on.
            write_frame(&mut s, &Frame::with_tail(Message::PushPart { first: 2, count: 1 }, chunks(2..3)))
                .await
                .unwrap();
            write_frame(&mut s, &Frame::new(Message::Push { first: 2, count: 0 })).await.unwrap();
            write_frame(&mut s, &frame).await.unwrap();
            // Answered after it: a client that read on would take this reply.
            write_frame(&mut s, &Frame::with_tail(Message::Data { id }, chunks(0..1))).await.unwrap();
            assert!(read_frame(&mut s).await.is_err(), "the client goes on after {:?}", frame.msg);
        })
        .await;
        assert_eq!(conn.request(0, 1, mpsc::unbounded_channel().0).await, Err(Refusal::Closed), "{what}");
        tokio::time::timeout(Duration::from_secs(10), peer).await.unwrap().unwrap();
    }
}

/// A session (16 chunks of 4 KiB) with a peer that plays `script` on the wire after the
/// handshake.
async fn scripted<F, Fut>(script: F) -> (Arc<PeerConn>, tokio::task::JoinHandle<()>)
where
    F: FnOnce(tokio::net::TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let key = ClusterKey::from_secret(b"a test cluster key of some length").unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = listener.local_addr().unwrap().to_string();
    let g = Geometry::new(16 * 4096, ChunkSize::new(4096).unwrap()).unwrap();
    let me = "127.0.0.1:1";
    let selector = Arc::new(Mutex::new(Selector::new(me, 16, 2, 1)));
    let sink: std::sync::Weak<dyn PushSink> = std::sync::Weak::<NoSink>::new();
    let (skey, sname) = (key.clone(), server.clone());
    let peer = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        server_handshake(&mut s, &skey, &sname, Duration::from_secs(5)).await.unwrap();
        script(s).await;
    });
    let conn =
        PeerConn::connect(&server, me, &key, ([5; 32], g), Duration::from_secs(5), selector, sink).await.unwrap();
    (conn, peer)
}

fn bytes(map: &RoaringBitmap) -> Vec<u8> {
    let mut v = Vec::new();
    map.serialize_into(&mut v).unwrap();
    v
}

#[test]
fn have_maps_are_bounded_by_the_image() {
    let mut map: RoaringBitmap = (0..100).collect();
    map.insert_range(500..1000);
    assert_eq!(decode_have(&bytes(&map), 1000), Some(map.clone()));
    assert_eq!(decode_have(&bytes(&RoaringBitmap::new()), 1000), Some(RoaringBitmap::new()));
    assert_eq!(decode_have(&bytes(&map), 999), None, "a chunk past the image");
    // More containers than the image has room for: refused before decoding, whether the
    // header counts them in the cookie (maps with runs) or in the word after it.
    let wide: RoaringBitmap = (0..64u32).map(|c| c << 16).collect();
    assert_eq!(decode_have(&bytes(&wide), 1000), None);
    assert_eq!(decode_have(&bytes(&wide), u32::MAX), Some(wide));
    let runs_cookie = (12347u32 | (999 << 16)).to_le_bytes();
    assert_eq!(decode_have(&runs_cookie, 1000), None, "1000 run containers announced");
    assert_eq!(decode_have(&[], 1000), None);
    assert_eq!(decode_have(&[1, 2, 3, 4, 5, 6, 7, 8], 1000), None);
    let b = bytes(&map);
    assert_eq!(decode_have(&b[..b.len() - 1], 1000), None, "truncated");
}
