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
use super::wire::{Bytes32, Frame, Message, MAX_TAIL};
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
    /// The bytes of an offered run, in order as they come (`PushPart`s, then the `Push`'s
    /// rest, which ends at the run's end): each piece verified and handed to the offer's
    /// waiters, the whole run stored. False when a piece does not match the manifest (the
    /// session then ends); the pieces ending early (the session ended) lose the offer.
    fn pushed(&self, from: &str, run: Range<u32>, offered: Offered, pieces: Pieces) -> BoxFuture<'_, bool>;
    /// A packed frame of chunk data came, carrying `chunks` (its tail unpacked, its length
    /// checked) packed as `packed`: its blocks may be kept to be sent on as they came (see
    /// `p2p::pack`).
    fn packed(&self, _chunks: Range<u32>, _packed: &Bytes) {}
}

/// The pieces of one pushed run, in order: chunks and their bytes.
pub type Pieces = mpsc::UnboundedReceiver<(Range<u32>, Bytes)>;

/// A run the peer offered, until its push came or its time is up.
struct Offer {
    count: u32,
    /// Chunks that came in `PushPart`s so far.
    got: u32,
    /// The chunks this node took as in flight, until its first piece comes (then the sink's
    /// task holds them).
    offered: Option<Offered>,
    /// Where its pieces go once they come (the sink's task holds the offer then).
    pieces: Option<mpsc::UnboundedSender<(Range<u32>, Bytes)>>,
    until: tokio::time::Instant,
}

impl Offer {
    /// Hands `piece` to the sink, starting its task with the first piece.
    fn piece(
        &mut self,
        sink: &std::sync::Weak<dyn PushSink>,
        from: &Arc<PeerConn>,
        first: u32,
        piece: (Range<u32>, Bytes),
    ) {
        if self.pieces.is_none() {
            let (Some(offered), Some(sink)) = (self.offered.take(), sink.upgrade()) else { return };
            let (tx, rx) = mpsc::unbounded_channel();
            self.pieces = Some(tx);
            let (from, run) = (from.clone(), first..first + self.count);
            tokio::spawn(async move {
                if !sink.pushed(&from.node, run, offered, rx).await {
                    from.close();
                }
            });
        }
        if let Some(tx) = &self.pieces {
            let _ = tx.send(piece);
        }
    }
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
            let mut offers: HashMap<u32, Offer> = HashMap::new();
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
                        offers.values().map(|o| o.until).min().unwrap_or_else(|| heard + OFFER_TIMEOUT)
                    ), if !offers.is_empty() => {
                        // Its readers fetch the chunks.
                        let now = tokio::time::Instant::now();
                        offers.retain(|_, o| o.until > now);
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
                // A packed frame's blocks, once its chunks and length are checked below, may be
                // kept to be sent on (checked against the bytes they stand for first).
                // (Called with no lock held: it copies the blocks.)
                let packed = f.packed.clone();
                let keep = |chunks: Range<u32>| {
                    if let (Some(packed), Some(sink)) = (&packed, sink.upgrade()) {
                        sink.packed(chunks, packed);
                    }
                };
                let (id, reply) = match f.msg {
                    Message::Data { id } => {
                        // Only a packed reply looks up its request here (the reply path does it
                        // anyway): a frame as it is costs no extra lock.
                        if packed.is_some() {
                            let rest = me.pending.lock().unwrap().get(&id).map(|p| p.run.start + p.got..p.run.end);
                            if let Some(rest) =
                                rest.filter(|r| g.run_bytes(r.clone()).is_some_and(|(_, n)| n == f.tail.len()))
                            {
                                keep(rest);
                            }
                        }
                        (id, Ok(f.tail))
                    }
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
                        let _ = p.parts.send((part.clone(), f.tail));
                        drop(pending);
                        keep(part);
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
                        // Longer than one frame's tail: pieces could bring more than the receive
                        // budget holds, so it is not waited for.
                        if offers.len() >= MAX_OFFERS
                            || g.run_bytes(run.clone()).is_none_or(|(_, n)| n > MAX_TAIL as usize)
                        {
                            continue;
                        }
                        if let Some(o) = sink.upgrade().and_then(|s| s.offered(&me.node, run)) {
                            let until = tokio::time::Instant::now() + OFFER_TIMEOUT;
                            offers.insert(first, Offer { count, got: 0, offered: Some(o), pieces: None, until });
                        }
                        continue;
                    }
                    Message::PushPart { first, count } => {
                        let from = first + offers.get(&first).map_or(0, |o| o.got);
                        let part = from..from.saturating_add(count);
                        let end = offers.get(&first).map_or(chunks, |o| first + o.count);
                        // Parts leave at least one chunk to the offer's `Push`.
                        if count == 0
                            || part.end >= end
                            || g.run_bytes(part.clone()).is_none_or(|(_, len)| len != f.tail.len())
                        {
                            break format!("push part of chunks {from}+{count} in {} bytes", f.tail.len());
                        }
                        // Of an offer not taken (nothing of it wanted, too many waiting): dropped.
                        let Some(o) = offers.get_mut(&first) else { continue };
                        o.got += count;
                        keep(part.clone());
                        o.piece(&sink, &me, first, (part, f.tail));
                        continue;
                    }
                    Message::Push { first, count: 0 } => {
                        if !f.tail.is_empty() {
                            break format!("withdrawal of the offer at chunk {first} with {} bytes", f.tail.len());
                        }
                        // The rest of the offer will not come: its readers fetch it (the parts
                        // that came stand).
                        offers.remove(&first);
                        continue;
                    }
                    Message::Push { first, count } => {
                        let run = first..first.saturating_add(count);
                        let Some((_, whole)) = g.run_bytes(run.clone()).filter(|_| count > 0) else {
                            break format!("push of chunks {first}+{count}");
                        };
                        let Some(mut offer) = offers.remove(&first) else {
                            // Not waited for here: a push of the whole run answers the requests
                            // of ours that crossed it (the peer answers them `Pushed`); the rest
                            // of a push cut through is dropped with it.
                            if f.tail.len() == whole {
                                keep(run.clone());
                                me.answer_from_push(g, run, &f.tail);
                            } else if f.tail.len() > whole || f.tail.is_empty() {
                                break format!("push of chunks {first}+{count} in {} bytes", f.tail.len());
                            }
                            continue;
                        };
                        // What came in parts is not in the push again.
                        let rest = first + offer.got..run.end;
                        if offer.count != count || g.run_bytes(rest.clone()).is_none_or(|(_, len)| len != f.tail.len())
                        {
                            break format!(
                                "push of chunks {first}+{count} in {} bytes does not match its offer",
                                f.tail.len()
                            );
                        }
                        keep(rest.clone());
                        if offer.got == 0 {
                            me.answer_from_push(g, run, &f.tail);
                        }
                        offer.piece(&sink, &me, first, (rest, f.tail));
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
mod tests;
