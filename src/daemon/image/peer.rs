//! How an image answers its peers (`PeerExport`): what it holds, a run from its cache, and a run
//! fetched on a peer's behalf only where this node ranks above the peer in the stripe's tree, so
//! relay chains climb towards the root and never loop.

use std::sync::atomic::Ordering;

use bytes::Bytes;
use tokio::sync::watch;

use super::Image;
use crate::fetch::flight::Parts;
use crate::fetch::BoxFuture;
use crate::image::ChunkIdx;
use crate::p2p::server::PeerExport;

impl PeerExport for Image {
    fn run_len(&self, run: std::ops::Range<u32>) -> Option<u64> {
        self.manifest.geometry().run_bytes(run).map(|(_, len)| len as u64)
    }

    fn chunks(&self) -> u32 {
        self.manifest.geometry().chunk_count()
    }

    fn have_count(&self) -> u64 {
        self.store.present_count()
    }

    fn holds(&self, run: std::ops::Range<u32>) -> bool {
        self.store.has_all(run)
    }

    fn have(&self) -> roaring::RoaringBitmap {
        self.store.present()
    }

    fn admit_session(&self) -> Option<Box<dyn Send>> {
        Some(Box::new(self.swarm.as_ref()?.admit_inbound()?))
    }

    fn obtained(
        &self,
    ) -> Option<(
        tokio::sync::broadcast::Receiver<crate::fetch::flight::Obtained>,
        tokio::sync::broadcast::Receiver<crate::fetch::flight::Arrival>,
    )> {
        self.swarm.as_ref().filter(|s| s.pushes()).map(|_| (self.fetcher.obtained(), self.fetcher.arrivals()))
    }

    fn boot_log(&self) -> Vec<std::ops::Range<u32>> {
        self.fetcher.boot_log()
    }
    fn adopted_by(&self, child: &str, classes: &[u32]) -> Vec<u32> {
        self.swarm.as_ref().map(|s| s.adopted_by(child, classes)).unwrap_or_default()
    }

    fn class(&self, chunk: u32) -> u32 {
        self.swarm.as_ref().map_or(0, |s| s.class(chunk))
    }

    fn pack(&self, chunks: std::ops::Range<u32>, raw: &Bytes) -> Option<Bytes> {
        self.swarm.as_ref()?.pack(chunks, raw)
    }

    fn cached(&self, run: std::ops::Range<u32>) -> BoxFuture<'_, Option<Bytes>> {
        Box::pin(async move {
            let len = u32::try_from(self.run_len(run.clone())?).ok()?;
            let offset = self.manifest.geometry().chunk_offset(ChunkIdx(run.start)).0;
            Image::cached(self, offset, len).await
        })
    }

    fn serve<'a>(
        &'a self,
        run: std::ops::Range<u32>,
        requester: &'a str,
        parts: &'a Parts,
    ) -> BoxFuture<'a, Option<Bytes>> {
        Box::pin(async move {
            let len = u32::try_from(self.run_len(run.clone())?).ok()?;
            let offset = self.manifest.geometry().chunk_offset(ChunkIdx(run.start)).0;
            // Fetch on a peer's behalf only when this node ranks above it in the stripe's tree:
            // relay chains then always climb to the root and never loop. A run held but not
            // readable after all (a failed cache read) is then "not here", never a fetch.
            if !self.swarm.as_ref().is_some_and(|s| s.relays_for(run.clone(), requester)) {
                return self.cached(offset, len).await;
            }
            if let Some(bytes) = self.cached(offset, len).await {
                return Some(bytes);
            }
            // Not held, or not readable after all (the store forgets a chunk whose read failed):
            // fetched.
            self.relay(run, parts).await
        })
    }

    fn uploaded(&self, bytes: u64) {
        self.bytes_to_peers.fetch_add(bytes, Ordering::Relaxed);
    }

    fn served_until(&self) -> watch::Receiver<bool> {
        self.shutdown.subscribe()
    }
}
