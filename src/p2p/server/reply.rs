//! Answering one request: a reply from the cache, or fetched for the asker (a relay) and sent
//! as its chunks arrive (`Part` frames, then `Data` with the rest); the upload cap's pacing and
//! the test switch that corrupts uploads. Every reply's bytes are reserved before it is read
//! (`PeerServer::reserve`) and its upload slot held while it is written.

use std::ops::Range;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::{Held, PeerExport, PeerServer, Reservation};
use crate::p2p::wire::{Frame, Message};

impl PeerServer {
    pub(super) async fn reply(
        &self,
        export: Arc<dyn PeerExport>,
        id: u32,
        run: Range<u32>,
        requester: &str,
        bytes_held: Reservation,
        tx: &mpsc::Sender<(Frame, Held)>,
    ) {
        // The reply's bytes are reserved already. From the cache, it takes its upload slot
        // before reading, so replies waiting for a slot read nothing yet. Fetched for the asker
        // (a relay), it takes its slot once the bytes are here: slots are waited for, and a
        // slot held across a wait on other nodes could close a cycle of waits between them.
        let early = if export.holds(run.clone()) {
            Some(self.slots.clone().acquire_owned().await.expect("semaphore never closed"))
        } else {
            None
        };
        let (parts_tx, mut parts) = mpsc::unbounded_channel();
        let lie = self.lie && early.is_none();
        let held = early.is_some();
        let served = async {
            if lie {
                return None;
            }
            if held {
                // Holding its slot: never a fetch (a run that left the cache since is not here).
                return export.cached(run.clone()).await;
            }
            export.serve(run.clone(), requester, &parts_tx).await
        };
        tokio::pin!(served);
        // Parts go out as they come; `next` is the first chunk not sent.
        let mut next = run.start;
        let served = loop {
            tokio::select! {
                biased;
                Some(part) = parts.recv() => next = self.part(&*export, id, part, false, tx).await,
                s = &mut served => break s,
            }
        };
        while let Ok(part) = parts.try_recv() {
            next = self.part(&*export, id, part, false, tx).await;
        }
        let Some(mut bytes) = served else {
            // Parts sent stand: the asker reads the rest elsewhere.
            self.stats.not_have.fetch_add(1, Ordering::Relaxed);
            drop(bytes_held);
            let _ = tx.send((Frame::new(Message::NotHave { id }), (None, None))).await;
            return;
        };
        let permit = match early {
            Some(p) => p,
            None => self.slots.clone().acquire_owned().await.expect("semaphore never closed"),
        };
        // The rest goes a chunk per frame too, but for its last: a relay below passes each on as
        // it arrives rather than once the whole run is in.
        let ahead = export.run_len(next..run.end - 1).map_or(0, |n| n as usize);
        let mut rest = next..run.end;
        if next + 1 < run.end && ahead < bytes.len() {
            let part = bytes.split_to(ahead);
            self.part(&*export, id, (next..run.end - 1, part), true, tx).await;
            rest = run.end - 1..run.end;
        }
        let n = bytes.len() as u64;
        let frame = self.data_frame(&*export, Message::Data { id }, rest, bytes, false);
        self.pace(frame.wire_tail().len() as u64).await;
        if tx.send((frame, (Some(permit), Some(bytes_held)))).await.is_ok() {
            export.uploaded(n);
        }
    }

    /// Sends `chunks` of request `id`'s reply ahead of the rest, a chunk per frame. `holding`:
    /// under the reply's upload slot, held until its last frame; otherwise each frame takes a
    /// slot until it is written. A part cut through must hold none while the rest is fetched:
    /// a slot held across a wait on other nodes could close a cycle of waits between them.
    pub(super) async fn part(
        &self,
        export: &dyn PeerExport,
        id: u32,
        (chunks, mut bytes): (Range<u32>, Bytes),
        holding: bool,
        tx: &mpsc::Sender<(Frame, Held)>,
    ) -> u32 {
        for c in chunks.clone() {
            let n = if c + 1 == chunks.end { bytes.len() } else { export.run_len(c..c + 1).map_or(0, |n| n as usize) };
            let chunk = bytes.split_to(n.min(bytes.len()));
            let permit = match holding {
                true => None,
                false => Some(self.slots.clone().acquire_owned().await.expect("semaphore never closed")),
            };
            let n = chunk.len() as u64;
            let frame = self.data_frame(export, Message::Part { id, count: 1 }, c..c + 1, chunk, false);
            self.pace(frame.wire_tail().len() as u64).await;
            if tx.send((frame, (permit, None))).await.is_err() {
                break;
            }
            export.uploaded(n);
            self.stats.parts.fetch_add(1, Ordering::Relaxed);
            if !holding {
                self.stats.cut_through.fetch_add(1, Ordering::Relaxed);
            }
        }
        chunks.end
    }

    /// The frame `msg` carrying `chunks`' bytes (`push`: a push's): corrupted under the test
    /// switches (and then never packed, so the corruption reaches the peer as it is), else
    /// packed when the image packs (`p2p.pack`) and the packed tail fits a frame. Counted as
    /// sent packed when built (`packed_bytes`).
    pub(super) fn data_frame(
        &self,
        export: &dyn PeerExport,
        msg: Message,
        chunks: Range<u32>,
        bytes: Bytes,
        push: bool,
    ) -> Frame {
        if bytes.is_empty() || self.corrupt || (push && self.corrupt_pushes) {
            return Frame::with_tail(msg, self.maybe_corrupt(bytes, push));
        }
        // A tail of incompressible chunks packs to 8 bytes more per chunk: a run that fills a
        // frame goes as it is then (`pack` answers `None`).
        match export.pack(chunks, &bytes) {
            Some(packed) => {
                self.stats.packed_bytes.fetch_add(bytes.len() as u64, Ordering::Relaxed);
                self.stats.packed_wire.fetch_add(packed.len() as u64, Ordering::Relaxed);
                Frame::packed(msg, packed)
            }
            None => Frame::with_tail(msg, bytes),
        }
    }

    /// `bytes` as sent (`push`: in a push): corrupted under the test switches.
    fn maybe_corrupt(&self, bytes: Bytes, push: bool) -> Bytes {
        if !(self.corrupt || (push && self.corrupt_pushes)) {
            return bytes;
        }
        let mut v = bytes.to_vec();
        for b in v.iter_mut().step_by(4096) {
            *b ^= 0x5A;
        }
        Bytes::from(v)
    }

    /// Waits for this reply's turn under the upload rate cap.
    pub(super) async fn pace(&self, bytes: u64) {
        let Some(rate) = self.limits.rate.filter(|r| *r > 0) else { return };
        let start = {
            let mut next = self.next_free.lock().unwrap();
            let start = (*next).max(Instant::now());
            *next = start + Duration::from_secs_f64(bytes as f64 / rate as f64);
            start
        };
        tokio::time::sleep_until(start).await;
    }
}
