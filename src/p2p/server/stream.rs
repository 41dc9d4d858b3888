//! Pushes cut through: a run this node fetches from a peer arrives a chunk per frame, and each
//! child that lacks it gets it the same way, as it arrives, instead of once the whole run is in.
//! The run's first chunks offer it (one `Offer` per run and child), each chunk that follows goes
//! in a `PushPart`, and the run's `Push` carries the rest once the run is whole and checked
//! here (so a child never waits on a part that does not come: the push is what ends the run).
//!
//! Invariants: a stream holds its offer's bytes in the budget and a place in the session's push
//! window from its offer until its `Push` is written, as a whole run's push does; its frames go
//! to the writer in order, through one forwarder per stream; the `Push` holds at least one chunk
//! (parts stop short of the offer's last); a stream whose run will not come (its fetch failed,
//! its bytes are gone, the announcements lagged, or [`OFFER_TIMEOUT`] passed) ends with a
//! withdrawal, a `Push` of no chunk, so the child's readers fetch the rest at once instead of
//! waiting out the offer. Runs from the origin arrive whole, so they are pushed whole.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::push::{piece_bytes, Adoption, PushKind, Pushed, QueuedPush, SessionQueue, Window, PUSH_WINDOW};
use super::{PeerExport, PeerServer, Queued, Reservation};
use crate::fetch::flight::{Arrival, RunData};
use crate::p2p::peer::OFFER_TIMEOUT;
use crate::p2p::wire::{Frame, Message};

/// One run being pushed to one child as it arrives.
struct Stream {
    /// The chunks offered: the run's first ones the child lacked.
    offer: Range<u32>,
    /// The first chunk of the offer not sent yet.
    next: u32,
    /// The first chunk of the offer that has not arrived (in order) yet, and the bytes of those
    /// that arrived and were not sent (`next` onwards).
    arrived: u32,
    waiting: Vec<Bytes>,
    /// A part of it waits to be written: the chunks that arrive meanwhile go in the next one
    /// (so a busy node sends fewer, longer parts).
    queued: Arc<AtomicBool>,
    /// A chunk was missed (the announcements lagged): the rest goes in the push.
    broken: bool,
    /// Wakes the session's pusher when a part is written (`SessionQueue::freed`).
    wake: Arc<tokio::sync::Notify>,
    /// The session's server, image and adoption (for a withdrawal).
    ctx: Ctx,
    /// The offer's bytes in the budget and its place in the window, for its last frame.
    held: Reservation,
    /// Its frames, in order, to the forwarder that queues them for the writer.
    frames: mpsc::UnboundedSender<QueuedPush>,
    until: Instant,
}

/// A session's runs being pushed as they arrive, by their run's first chunk.
pub(super) struct Streams(HashMap<u32, Stream>);

impl Streams {
    pub(super) fn new() -> Streams {
        Streams(HashMap::new())
    }

    pub(super) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Waits until the oldest stream's time is up, and withdraws the streams whose time is.
    pub(super) async fn expiry(&mut self) {
        let Some(until) = self.0.values().map(|s| s.until).min() else { return std::future::pending().await };
        tokio::time::sleep_until(until).await;
        let now = Instant::now();
        let over: Vec<u32> = self.0.iter().filter(|(_, s)| s.until <= now).map(|(k, _)| *k).collect();
        for k in over {
            self.fail(k);
        }
    }

    /// The run starting at `first` will not come: its stream, if any, is withdrawn.
    pub(super) fn fail(&mut self, first: u32) {
        if let Some(s) = self.0.remove(&first) {
            s.withdraw();
        }
    }

    /// Every stream is withdrawn (announcements of whole runs were missed).
    pub(super) fn fail_all(&mut self) {
        for (_, s) in self.0.drain() {
            s.withdraw();
        }
    }

    /// Sends on what arrived while a part of each stream waited for the writer.
    pub(super) fn flush_all(&mut self) {
        for s in self.0.values_mut() {
            s.flush();
        }
    }

    /// The run `run` is in, checked (`data`: its bytes, unless they are only in the cache by
    /// now): its stream, if it has one, ends with a `Push` of the rest of its offer (withdrawn
    /// if those bytes are gone from here).
    pub(super) async fn last(&mut self, (run, data): (Range<u32>, Option<Arc<RunData>>)) {
        let Some(mut s) = self.0.remove(&run.start) else { return };
        let export = s.ctx.1.clone();
        let rest = s.next..s.offer.end;
        let held = match data {
            Some(d) => piece_bytes(&d, rest.clone(), |r| export.run_len(r)),
            // What arrived and was not sent is here still; the rest (the last chunk at least)
            // only in the cache by now.
            None if s.arrived >= rest.end => Some(s.take_waiting()),
            None => export.cached(s.arrived..rest.end).await.map(|tail| {
                s.waiting.push(tail);
                s.take_waiting()
            }),
        };
        let Some(bytes) = held.filter(|b| export.run_len(rest.clone()).is_some_and(|n| n as usize == b.len())) else {
            s.withdraw();
            return;
        };
        let (first, count) = (s.offer.start, s.offer.end - s.offer.start);
        let held = Some(s.held);
        let msg = Message::Push { first, count };
        let push = QueuedPush::new(&s.ctx, msg, (rest, bytes), (PushKind::Last, held, None), s.offer);
        let _ = s.frames.send(push);
    }
}

impl Stream {
    /// The bytes waiting to be sent, in one piece.
    fn take_waiting(&mut self) -> Bytes {
        match self.waiting.len() {
            1 => self.waiting.pop().expect("one"),
            _ => self
                .waiting
                .drain(..)
                .fold(BytesMut::new(), |mut b, x| {
                    b.extend_from_slice(&x);
                    b
                })
                .freeze(),
        }
    }

    /// Tells the child that the rest of the offer will not come: a `Push` of no chunk, after
    /// the parts sent. Its bytes and window place are given back now.
    fn withdraw(self) {
        self.queued.store(false, Ordering::Relaxed);
        let Stream { frames, held, offer, ctx, .. } = self;
        drop(held);
        let first = offer.start;
        let _ = frames.send(QueuedPush::new(
            &ctx,
            Message::Push { first, count: 0 },
            (first..first, Bytes::new()),
            (PushKind::Withdrawn, None, None),
            offer,
        ));
    }

    /// Sends what arrived and was not sent, up to the offer's last chunk, as one `PushPart`,
    /// unless a part of the stream still waits for the writer.
    fn flush(&mut self) {
        if self.queued.load(Ordering::Relaxed) {
            return;
        }
        let upto = self.arrived.min(self.offer.end - 1);
        let Some(len) = self.ctx.1.run_len(self.next..upto).filter(|_| upto > self.next) else { return };
        let mut all = self.take_waiting();
        let part = all.split_to((len as usize).min(all.len()));
        if !all.is_empty() {
            self.waiting.push(all);
        }
        let msg = Message::PushPart { first: self.offer.start, count: upto - self.next };
        let chunks = self.next..upto;
        self.next = upto;
        self.queued.store(true, Ordering::Relaxed);
        let written = Some((self.queued.clone(), self.wake.clone()));
        let _ = self.frames.send(QueuedPush::new(
            &self.ctx,
            msg,
            (chunks, part),
            (PushKind::Part, None, written),
            self.offer.clone(),
        ));
    }
}

/// A session's server, image and adoption, which a stream's frames carry.
type Ctx = (Arc<PeerServer>, Arc<dyn PeerExport>, Arc<Mutex<Adoption>>);

/// A part's flag that it waits for the writer, and the pusher's wake-up once it does not.
type Written = (Arc<AtomicBool>, Arc<tokio::sync::Notify>);

impl QueuedPush {
    /// A frame of a stream of `offer`: `msg` with `chunks`' bytes `bytes` (corrupted under
    /// the test switch, or packed), of `kind`, holding `held`, clearing `written` when the
    /// writer takes it.
    fn new(
        (server, export, adoption): &Ctx,
        msg: Message,
        (chunks, bytes): (Range<u32>, Bytes),
        (kind, held, written): (PushKind, Option<Reservation>, Option<Written>),
        offer: Range<u32>,
    ) -> QueuedPush {
        QueuedPush {
            bytes: bytes.len() as u64,
            frame: server.data_frame(&**export, msg, chunks, bytes, true),
            kind,
            held,
            written,
            adoption: adoption.clone(),
            run: offer,
            server: server.clone(),
            export: export.clone(),
        }
    }
}

impl PeerServer {
    /// Chunks of a run this node fetches arrived: the first ones offer the run to the child
    /// (if it lacks them and the window and budget have room), and each one the offer holds
    /// goes to it in a `PushPart`.
    pub(super) async fn arrive(
        self: &Arc<Self>,
        export: &Arc<dyn PeerExport>,
        adoption: &Arc<Mutex<Adoption>>,
        streams: &mut Streams,
        a: Arrival,
        queue: &SessionQueue,
    ) -> Pushed {
        if a.is_failure() {
            streams.fail(a.run.start);
            return Pushed::Sent;
        }
        let Some(data) = a.data.upgrade() else { return Pushed::Sent };
        if !streams.0.contains_key(&a.run.start) && a.part.start == a.run.start {
            match self.offer_stream(export, adoption, &a, queue).await {
                Some(s) => {
                    streams.0.insert(a.run.start, s);
                }
                None if queue.tx.is_closed() => return Pushed::Closed,
                None => return Pushed::Sent,
            }
        }
        let Some(s) = streams.0.get_mut(&a.run.start) else { return Pushed::Sent };
        if s.broken || a.part.end <= s.arrived {
            return Pushed::Sent;
        }
        if a.part.start > s.arrived {
            s.broken = true;
            return Pushed::Sent;
        }
        let end = a.part.end.min(s.offer.end);
        let Some(bytes) = piece_bytes(&data, s.arrived..end, |r| export.run_len(r)) else { return Pushed::Sent };
        s.waiting.push(bytes);
        s.arrived = end;
        // The part before is still queued: these chunks go with the next.
        s.flush();
        if s.frames.is_closed() {
            return Pushed::Closed;
        }
        Pushed::Sent
    }

    /// Offers the first chunks of the arriving run that the child lacks, if they are more than
    /// one (a run of one chunk is pushed whole) and the window and budget have room.
    async fn offer_stream(
        self: &Arc<Self>,
        export: &Arc<dyn PeerExport>,
        adoption: &Arc<Mutex<Adoption>>,
        a: &Arrival,
        queue: &SessionQueue,
    ) -> Option<Stream> {
        if queue.pushing.load(Ordering::Relaxed) >= PUSH_WINDOW {
            return None;
        }
        let offer = {
            let ad = adoption.lock().unwrap();
            if !ad.classes.contains(&export.class(a.run.start)) {
                return None;
            }
            let end = a.run.clone().find(|c| ad.known.contains(*c)).unwrap_or(a.run.end);
            a.run.start..end
        };
        // Nothing would follow the first part: the run's push carries it all.
        if offer.end <= a.part.end {
            return None;
        }
        let len = export.run_len(offer.clone())?;
        if !self.budget.lock().unwrap().push_fits(len) {
            return None;
        }
        let mut held = self.reserve_push(len, &queue.reserved, queue.queued.load(Ordering::Relaxed))?;
        queue.pushing.fetch_add(1, Ordering::Relaxed);
        held.window = Some(Window(queue.pushing.clone(), queue.freed.clone()));
        adoption.lock().unwrap().known.insert_range(offer.clone());
        let (first, count) = (offer.start, offer.end - offer.start);
        if queue.tx.send((Frame::new(Message::Offer { first, count }), (None, None))).await.is_err() {
            return None;
        }
        // Counted among the session's requests in progress (pings go on) until its last frame
        // is handed over.
        if queue.queued.fetch_add(1, Ordering::Relaxed) == 0 {
            queue.requested.notify_one();
        }
        let slot = Queued(queue.queued.clone());
        let (frames, mut rx) = mpsc::unbounded_channel::<QueuedPush>();
        let push_tx = queue.push_tx.clone();
        tokio::spawn(async move {
            let _slot = slot;
            while let Some(p) = rx.recv().await {
                if push_tx.send(p).await.is_err() {
                    return;
                }
            }
        });
        let until = Instant::now() + OFFER_TIMEOUT;
        Some(Stream {
            next: offer.start,
            arrived: offer.start,
            offer,
            waiting: Vec::new(),
            queued: Arc::new(AtomicBool::new(false)),
            broken: false,
            wake: queue.freed.clone(),
            ctx: (self.clone(), export.clone(), adoption.clone()),
            held,
            frames,
            until,
        })
    }
}
