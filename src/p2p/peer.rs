//! Our side of a session with one peer for one image: requests out, data and have-maps in.
//!
//! One reader task dispatches replies to the requests waiting on them, feeds have-maps into
//! the image's [`Selector`] and hands runs the peer pushes to a [`PushSink`]; one writer task
//! sends requests (and `Adopt`, which makes the peer push). A request that crosses a push of
//! its chunks on the wire is answered from the push when it arrives (the peer then answers the
//! request `Pushed`, not with the bytes again). While a request of ours or a run it
//! offered is in progress the server sends something at least every 250 ms (a ping if nothing
//! else), so silence longer than `stall` while we wait means the peer is dead or hung: the
//! session closes, every request on it fails at once, to be retried elsewhere, and every offered
//! run is lost (its readers fetch it). A session with nothing pending may be silent for ever:
//! it costs nothing, and a dead peer is found by the next request to it.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use roaring::RoaringBitmap;
use tokio::io::AsyncBufReadExt;
use tokio::sync::{mpsc, oneshot};

use super::auth::ClusterKey;
use super::conn::{client_handshake, connect_from, node_addr, read_frame_progressing, write_frame, ConnError};
use super::select::Selector;
use super::wire::{Bytes32, Frame, Message};
use crate::fetch::flight::Offered;
use crate::fetch::BoxFuture;

/// Longest wait for the push of an offered run, however chatty its session: past it the offer
/// is dropped and its readers fetch the chunks (as `peer_timeout` bounds a request's wait).
pub const OFFER_TIMEOUT: Duration = Duration::from_secs(10);
/// Most offers of one session waiting for their pushes; further ones are ignored (their pushes
/// dropped). A parent has two at a time.
const MAX_OFFERS: usize = 16;

/// Where the runs a peer pushes go (the image's swarm).
pub trait PushSink: Send + Sync + 'static {
    /// `from` offers to push `run`: the chunks of it this node lacks and fetches from nowhere
    /// else now, taken as in flight; `None` when there are none (the push is dropped).
    fn offered(&self, from: &str, run: Range<u32>) -> Option<Offered>;
    /// The bytes of an offered run: verified, handed to the offer's waiters and stored. False
    /// when they do not match the manifest (the session then ends).
    fn pushed(&self, from: &str, run: Range<u32>, offered: Offered, bytes: Bytes) -> BoxFuture<'_, bool>;
}

/// How a request to a peer ended, short of data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    NotHave,
    Busy,
    /// The session closed, stalled or broke the protocol.
    Closed,
}

type Reply = Result<Bytes, Refusal>;

/// A request waiting for its reply: the chunks it asks for, whether it was asked again after a
/// `Pushed` this node could not take from a push, how many chunks came ahead in `Part`s and
/// where they went, and where the rest of its reply goes.
struct Pending {
    run: Range<u32>,
    again: bool,
    got: u32,
    parts: Parts,
    reply: oneshot::Sender<Reply>,
}

/// Where the `Part`s of a reply go as they arrive: `(chunks, bytes)`, in order, unchecked.
pub type Parts = mpsc::UnboundedSender<(Range<u32>, Bytes)>;

/// An open session with one peer.
pub struct PeerConn {
    node: String,
    tx: mpsc::Sender<Frame>,
    pending: Mutex<HashMap<u32, Pending>>,
    next: AtomicU32,
    closed: AtomicBool,
    /// Wakes the reader to end the session from our side.
    stop: tokio::sync::Notify,
    /// Wakes the reader when a request is added: its stall clock runs only while one is pending.
    requested: tokio::sync::Notify,
    /// The trees in which this node last told the peer it is its parent (`Adopt`).
    adopted: Mutex<Option<Vec<u32>>>,
}

/// Removes a request's entry when its caller stops waiting (it timed out or was dropped).
struct Waiting<'a> {
    conn: &'a PeerConn,
    id: u32,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.conn.pending.lock().unwrap().remove(&self.id);
    }
}

impl PeerConn {
    /// Connects to `node` (its peer address), authenticates for `image` (of geometry `g`), and
    /// starts the session.
    pub async fn connect(
        node: &str,
        me: &str,
        key: &ClusterKey,
        (image, g): (Bytes32, crate::image::Geometry),
        stall: Duration,
        selector: Arc<Mutex<Selector>>,
        sink: std::sync::Weak<dyn PushSink>,
    ) -> Result<Arc<PeerConn>, ConnError> {
        // A frozen peer still completes TCP handshakes (the kernel does), so the whole opening,
        // not just the connect, is bounded by the stall limit: a read never waits longer on a
        // peer that cannot answer.
        let limit = stall.max(Duration::from_secs(1));
        let (s, name) = tokio::time::timeout(limit, async {
            // From this node's own address: the peer admits only a name that is the address a
            // session comes from.
            let mut s = connect_from(node_addr(node), me).await?;
            s.set_nodelay(true)?;
            let name = client_handshake(&mut s, key, me, image, limit).await?;
            Ok::<_, ConnError>((s, name))
        })
        .await
        .map_err(|_| ConnError::Timeout)??;
        if node_addr(&name) != node_addr(node) {
            // A peer answering for another address would corrupt everyone's relay trees. (It
            // answers with its address alone: its name for this image, with when it joined it,
            // came from the tracker it registered with.)
            return Err(ConnError::BadNode(name));
        }
        let (rd, mut wr) = s.into_split();
        // Buffered: a frame's header and message come in one read, and the reader can wait for
        // the next frame's first byte without consuming it.
        let mut rd = tokio::io::BufReader::with_capacity(16 << 10, rd);
        let (tx, mut rx) = mpsc::channel::<Frame>(256);
        let conn = Arc::new(PeerConn {
            node: node.into(),
            tx,
            pending: Mutex::new(HashMap::new()),
            next: AtomicU32::new(1),
            closed: AtomicBool::new(false),
            stop: tokio::sync::Notify::new(),
            requested: tokio::sync::Notify::new(),
            adopted: Mutex::new(None),
        });
        let writer = tokio::spawn(async move {
            while let Some(f) = rx.recv().await {
                if write_frame(&mut wr, &f).await.is_err() {
                    break;
                }
            }
        });
        let me = conn.clone();
        let chunks = g.chunk_count();
        tokio::spawn(async move {
            // Silence counts from the last frame, or from when a request found the session
            // quiet; the frame itself must then keep arriving (no `stall` between its bytes).
            let mut heard = tokio::time::Instant::now();
            // Runs the peer offered, by first chunk, until their bytes come or their time is up.
            let mut offers: HashMap<u32, (u32, Offered, tokio::time::Instant)> = HashMap::new();
            let why = loop {
                let waiting = !me.pending.lock().unwrap().is_empty() || !offers.is_empty();
                let ready = tokio::select! {
                    // Waits for the first byte of the next frame without taking it.
                    r = rd.fill_buf() => match r {
                        Ok([]) => Err("closed by the peer".to_string()),
                        Ok(_) => Ok(()),
                        Err(e) => Err(e.to_string()),
                    },
                    _ = tokio::time::sleep_until(heard + stall), if waiting => {
                        if me.pending.lock().unwrap().is_empty() && offers.is_empty() {
                            continue;
                        }
                        Err(format!("silent for {stall:?}"))
                    }
                    _ = me.requested.notified(), if !waiting => {
                        heard = tokio::time::Instant::now();
                        continue;
                    }
                    _ = me.stop.notified() => Err("closed by this node".to_string()),
                    _ = tokio::time::sleep_until(
                        offers.values().map(|o| o.2).min().unwrap_or_else(|| heard + OFFER_TIMEOUT)
                    ), if !offers.is_empty() => {
                        // Its readers fetch the chunks.
                        let now = tokio::time::Instant::now();
                        offers.retain(|_, o| o.2 > now);
                        continue;
                    }
                };
                if let Err(why) = ready {
                    break why;
                }
                let f = match read_frame_progressing(&mut rd, usize::MAX, Some(stall)).await {
                    Err(ConnError::Timeout) => break format!("silent for {stall:?} within a frame"),
                    Err(e) => break e.to_string(),
                    Ok(f) => f,
                };
                heard = tokio::time::Instant::now();
                let (id, reply) = match f.msg {
                    Message::Data { id } => (id, Ok(f.tail)),
                    Message::Part { id, count } => {
                        let mut pending = me.pending.lock().unwrap();
                        // A reply nobody waits for any more (answered from a push, timed out).
                        let Some(p) = pending.get_mut(&id) else { continue };
                        // Parts leave at least one chunk to the reply's `Data`.
                        let from = p.run.start + p.got;
                        let part = from..from.saturating_add(count);
                        if count == 0
                            || part.end >= p.run.end
                            || g.run_bytes(part.clone()).is_none_or(|(_, len)| len != f.tail.len())
                        {
                            break format!("part of chunks {from}+{count} in {} bytes", f.tail.len());
                        }
                        p.got += count;
                        // The asker may have given up on the parts: they are dropped then.
                        let _ = p.parts.send((part, f.tail));
                        continue;
                    }
                    Message::NotHave { id } => (id, Err(Refusal::NotHave)),
                    Message::Busy { id } => (id, Err(Refusal::Busy)),
                    Message::Have | Message::HaveDelta => {
                        let Some(map) = decode_have(&f.tail, chunks) else {
                            break "malformed have-map".into();
                        };
                        let mut sel = selector.lock().unwrap();
                        if f.msg == Message::Have {
                            sel.have_full(&me.node, map);
                        } else {
                            sel.have_added(&me.node, &map);
                        }
                        continue;
                    }
                    Message::Ping => continue,
                    Message::Pushed { id } => {
                        // Not answered by a push read before (this node had read the push
                        // before it asked, and dropped it): asked again, once; the peer then
                        // answers it as any request.
                        let mut pending = me.pending.lock().unwrap();
                        let Some(p) = pending.get_mut(&id) else { continue };
                        if p.got > 0 {
                            // A request being answered in parts crossed no push.
                            break format!("Pushed after parts of request {id}");
                        }
                        let frame = Frame::new(Message::Request { id, first: p.run.start, count: p.run.len() as u32 });
                        if p.again || me.tx.try_send(frame).is_err() {
                            let p = pending.remove(&id).expect("found above");
                            let _ = p.reply.send(Err(if p.again { Refusal::NotHave } else { Refusal::Busy }));
                        } else {
                            p.again = true;
                        }
                        continue;
                    }
                    Message::Offer { first, count } => {
                        let run = first..first.saturating_add(count);
                        if count == 0 || run.end > chunks || offers.contains_key(&first) {
                            break format!("bad offer of chunks {first}+{count}");
                        }
                        if offers.len() >= MAX_OFFERS {
                            continue;
                        }
                        if let Some(o) = sink.upgrade().and_then(|s| s.offered(&me.node, run)) {
                            offers.insert(first, (count, o, tokio::time::Instant::now() + OFFER_TIMEOUT));
                        }
                        continue;
                    }
                    Message::Push { first, count } => {
                        let run = first..first.saturating_add(count);
                        if g.run_bytes(run.clone()).is_none_or(|(_, len)| len != f.tail.len()) {
                            break format!("push of chunks {first}+{count} in {} bytes", f.tail.len());
                        }
                        // Requests of ours it holds crossed it: the peer answers them `Pushed`.
                        me.answer_from_push(g, run, &f.tail);
                        // A push nobody here waits for (nothing of it was wanted) is dropped.
                        let Some((offered_count, offered, _)) = offers.remove(&first) else { continue };
                        if offered_count != count {
                            break format!("push of chunks {first}+{count} does not match its offer");
                        }
                        let Some(sink) = sink.upgrade() else { continue };
                        let (from, run) = (me.clone(), first..first + count);
                        tokio::spawn(async move {
                            if !sink.pushed(&from.node, run, offered, f.tail).await {
                                from.close();
                            }
                        });
                        continue;
                    }
                    other => break format!("unexpected {other:?}"),
                };
                if let Some(p) = me.pending.lock().unwrap().remove(&id) {
                    let _ = p.reply.send(reply);
                }
            };
            tracing::debug!(peer = %me.node, reason = %why, "peer session ended");
            me.closed.store(true, Ordering::SeqCst);
            // Offered runs still to come are lost: their readers fetch them.
            drop(offers);
            selector.lock().unwrap().disconnected(&me.node);
            // Dropping the senders fails every waiting request with `Closed`.
            me.pending.lock().unwrap().clear();
            writer.abort();
        });
        Ok(conn)
    }

    /// The peer's name.
    pub fn node(&self) -> &str {
        &self.node
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    /// Ends the session: its requests fail at once, the peer's have-map is forgotten, and the
    /// next request opens a fresh session (with a fresh have-map).
    pub fn close(&self) {
        self.stop.notify_one();
    }

    /// Tells the peer that this node takes it as its parent in the trees of `classes` (none:
    /// in no tree), unless that is what it was told last; `have` gives this node's chunks.
    pub fn adopt(&self, classes: Vec<u32>, have: impl FnOnce() -> RoaringBitmap) {
        let mut last = self.adopted.lock().unwrap();
        if last.as_ref() == Some(&classes) || (last.is_none() && classes.is_empty()) {
            return;
        }
        let mut tail = Vec::new();
        have().serialize_into(&mut tail).expect("writing to a Vec cannot fail");
        let frame = Frame::with_tail(Message::Adopt { classes: classes.clone() }, Bytes::from(tail));
        // Never waits: with the queue full, the next view tries again.
        if self.tx.try_send(frame).is_ok() {
            *last = Some(classes);
        }
    }

    /// Answers each request waiting for chunks that all lie in the pushed run `run` (whose
    /// bytes are `bytes`) from the push: the peer answers it `Pushed`, which then finds nothing
    /// waiting. The bytes are checked as any reply's.
    fn answer_from_push(&self, g: crate::image::Geometry, run: Range<u32>, bytes: &Bytes) {
        let mut pending = self.pending.lock().unwrap();
        let held: Vec<u32> = pending
            .iter()
            .filter(|(_, p)| run.start <= p.run.start && p.run.end <= run.end)
            .map(|(id, _)| *id)
            .collect();
        for id in held {
            let p = pending.remove(&id).expect("listed above");
            // What came in parts is the caller's already.
            let rest = p.run.start + p.got..p.run.end;
            let skip = g.run_bytes(run.start..rest.start).map_or(0, |(_, n)| n);
            let len = g.run_bytes(rest).map_or(0, |(_, n)| n);
            let _ = p.reply.send(Ok(bytes.slice(skip..skip + len)));
        }
    }

    /// Asks for chunks `first..first + count`. A relay that cuts through sends the first of
    /// them ahead in parts: those go to `parts` as they arrive, and the reply holds the rest
    /// (all of them when no part came).
    pub async fn request(&self, first: u32, count: u32, parts: Parts) -> Reply {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        let run = first..first.saturating_add(count);
        self.pending.lock().unwrap().insert(id, Pending { run, again: false, got: 0, parts, reply: tx });
        self.requested.notify_one();
        let _waiting = Waiting { conn: self, id };
        if self.is_closed() {
            return Err(Refusal::Closed);
        }
        self.tx.send(Frame::new(Message::Request { id, first, count })).await.map_err(|_| Refusal::Closed)?;
        rx.await.unwrap_or(Err(Refusal::Closed))
    }
}
/// A peer's have-map, if it is a valid Roaring bitmap of chunks below `chunks`. The container
/// count in its header is checked before decoding: a Roaring decoder gives every container of
/// runs a full 8 KiB bitmap, so a small hostile map could otherwise cost hundreds of MiB.
pub(crate) fn decode_have(tail: &[u8], chunks: u32) -> Option<RoaringBitmap> {
    const SERIAL_COOKIE_NO_RUNCONTAINER: u32 = 12346;
    const SERIAL_COOKIE: u32 = 12347;
    let word = |at: usize| tail.get(at..at + 4).map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")));
    let cookie = word(0)?;
    let containers = if cookie & 0xFFFF == SERIAL_COOKIE {
        (cookie >> 16) + 1
    } else if cookie == SERIAL_COOKIE_NO_RUNCONTAINER {
        word(4)?
    } else {
        return None;
    };
    if containers > chunks.div_ceil(1 << 16) {
        return None;
    }
    let map = crate::image::bitmap::decode(tail)?;
    map.max().is_none_or(|m| m < chunks).then_some(map)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::{ChunkSize, Geometry};
    use crate::p2p::conn::{read_frame, server_handshake};

    struct NoSink;

    impl PushSink for NoSink {
        fn offered(&self, _: &str, _: Range<u32>) -> Option<Offered> {
            None
        }
        fn pushed(&self, _: &str, _: Range<u32>, _: Offered, _: Bytes) -> BoxFuture<'_, bool> {
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
            // 4. A push whose tail is not its run's length ends the session.
            assert_eq!(expect_request(&mut s).await.1, 13);
            write_frame(&mut s, &Frame::with_tail(Message::Push { first: 4, count: 2 }, chunks(4..5))).await.unwrap();
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
}
