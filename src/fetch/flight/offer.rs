//! Runs a peer pushes: an offer takes their missing chunks as in flight (reads wait for the push
//! rather than ask), the push's pieces answer those reads as they come, and the whole run is
//! stored once it is in.
//!
//! Invariant: only verified bytes get here (the swarm checks each piece against the manifest);
//! an offer dropped before its run is delivered lets its chunks go, and their readers fetch them.

use std::ops::Range;
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::watch;

use super::{answer_once, Claim, FetchError, Fetcher, RunData};

/// Chunks a peer offered to push, in flight here until [`Fetcher::deliver`] gets their bytes;
/// dropped undelivered, their waiters fetch them themselves.
pub struct Offered(Claim);

impl Offered {
    /// The chunks the offer took (those it found neither present nor in flight).
    pub fn chunks(&self) -> impl Iterator<Item = u32> + '_ {
        self.0.run.iter().map(|(i, _)| *i)
    }
}

impl Fetcher {
    /// Takes the chunks of `run` that are neither present nor in flight as in flight until a
    /// push delivers them (`None`: there are none).
    pub fn offer(self: &Arc<Self>, run: Range<u32>) -> Option<Offered> {
        let mut inflight = self.inflight.lock().unwrap();
        let mut mine = Vec::new();
        for i in self.store.missing(run) {
            if let std::collections::hash_map::Entry::Vacant(e) = inflight.entry(i) {
                let (tx, rx) = watch::channel(None);
                e.insert((rx, true));
                mine.push((i, tx));
            }
        }
        (!mine.is_empty()).then(|| Offered(Claim { fetcher: self.clone(), run: mine, lost: FetchError::Lost }))
    }

    /// The verified bytes of `chunks`, a piece of an offered run that came ahead of the rest (a
    /// push cut through): the offer's waiters on those chunks get them now. The run stays in
    /// flight until [`Fetcher::deliver`] has it all and stores it.
    pub fn deliver_part(&self, offered: &Offered, chunks: Range<u32>, bytes: Bytes) {
        let Some((offset, len)) = self.manifest.geometry().run_bytes(chunks.clone()) else { return };
        if bytes.len() != len {
            return;
        }
        let from_peers = true;
        let part = Arc::new(RunData { chunks: chunks.clone(), offset: offset.0, bytes, from_peers });
        for (_, tx) in offered.0.run.iter().filter(|(i, _)| chunks.contains(i)) {
            answer_once(tx, Ok(part.clone()));
        }
    }

    /// The bytes of the run `chunks` starting at byte `offset`, pushed by a peer and verified
    /// against the manifest already: hands them to the offer's waiters and stores them.
    pub async fn deliver(self: &Arc<Self>, offered: Offered, chunks: Range<u32>, offset: u64, bytes: Bytes) {
        let me = self.clone();
        let claim = offered.0;
        if tokio::task::spawn_blocking(move || me.finish(chunks, offset, bytes, true, claim)).await.is_err() {
            tracing::error!("storing a pushed run failed");
        }
    }
}
