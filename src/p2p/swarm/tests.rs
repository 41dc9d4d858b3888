//! The peer-aware source with no peers (this node is the root of every stripe), over an origin
//! whose reads the test releases one at a time: the order in which reads reach the origin is
//! what the test checks, not how long anything takes.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use super::*;
use crate::fetch::flight::{FetchTuning, Fetcher};
use crate::image::{ChunkSize, Geometry};
use crate::store::ChunkStore;

/// An origin that records the offset of every read as it starts and answers only when the
/// test releases it.
struct GatedOrigin {
    data: Vec<u8>,
    started: Mutex<Vec<u64>>,
    gate: tokio::sync::Semaphore,
}

impl ChunkSource for GatedOrigin {
    fn describe(&self) -> String {
        "gated memory".into()
    }
    fn size(&self) -> BoxFuture<'_, Result<u64, SourceError>> {
        Box::pin(async move { Ok(self.data.len() as u64) })
    }
    fn read(&self, offset: u64, len: usize) -> BoxFuture<'_, Result<Vec<u8>, SourceError>> {
        Box::pin(async move {
            self.started.lock().unwrap().push(offset);
            self.gate.acquire().await.expect("gate open").forget();
            Ok(self.data[offset as usize..offset as usize + len].to_vec())
        })
    }
}

async fn until(what: &str, mut cond: impl FnMut() -> bool) {
    for _ in 0..20_000 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test]
async fn a_guest_miss_overtakes_queued_prefetch_at_the_origin() {
    const CHUNK: usize = 4096;
    let data: Vec<u8> = (0..256 * CHUNK as u32).map(|i| (i * 7 % 251) as u8).collect();
    let g = Geometry::new(data.len() as u64, ChunkSize::new(CHUNK as u64).unwrap()).unwrap();
    let m = Arc::new(
        Manifest::build(g, |idx, buf| {
            let o = g.chunk_offset(idx).0 as usize;
            buf.copy_from_slice(&data[o..o + buf.len()]);
            Ok::<_, ()>(())
        })
        .unwrap(),
    );
    let origin = Arc::new(GatedOrigin { data, started: Mutex::new(Vec::new()), gate: tokio::sync::Semaphore::new(0) });
    let key = ClusterKey::from_secret(b"a cluster key for this test only").unwrap();
    let tuning = SwarmTuning {
        stall: Duration::from_secs(5),
        request_timeout: Duration::from_secs(5),
        stripe: 1,
        fanout: 4,
        classes: 4,
        max_sessions: 64,
        push: true,
        pack: false,
    };
    let swarm = Swarm::new("127.0.0.1:9", key, m.clone(), origin.clone(), tuning);
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(ChunkStore::open(dir.path(), &m).unwrap());
    let fetcher =
        Fetcher::new(store, m, swarm.clone(), FetchTuning { timeout: Duration::from_secs(60), max_chunks: 1 });

    // Prefetch of 2 × ORIGIN_SLOTS chunks: the first ORIGIN_SLOTS reads take every origin slot,
    // the rest wait for one.
    let prefetch = 2 * ORIGIN_SLOTS as u32;
    let done = Arc::new(AtomicU64::new(0));
    for i in 0..prefetch {
        let (f, done) = (fetcher.clone(), done.clone());
        tokio::spawn(async move {
            f.ensure_with(i..i + 1, Priority::Prefetch).await.unwrap();
            done.fetch_add(1, Ordering::SeqCst);
        });
    }
    until("the origin slots to fill", || origin.started.lock().unwrap().len() == ORIGIN_SLOTS).await;

    // A guest miss arrives behind the queued prefetch.
    let guest_chunk = 200u32;
    let f = fetcher.clone();
    let guest = tokio::spawn(async move { f.ensure(guest_chunk..guest_chunk + 1).await.map(|_| ()) });
    until("the guest miss to wait for a slot", || swarm.origin_slots.urgent_waiting() == 1).await;

    // One origin read finishes: its slot goes to the guest miss, not to the next prefetch read.
    origin.gate.add_permits(1);
    until("the next origin read", || origin.started.lock().unwrap().len() == ORIGIN_SLOTS + 1).await;
    let next = *origin.started.lock().unwrap().last().unwrap();
    assert_eq!(next, u64::from(guest_chunk) * CHUNK as u64, "the guest's read reached the origin next");
    // The gate answers in arrival order: the other first-round reads, then the guest's.
    origin.gate.add_permits(ORIGIN_SLOTS);
    guest.await.unwrap().unwrap();
    assert!(done.load(Ordering::SeqCst) < u64::from(prefetch), "prefetch was still queued when the guest was served");

    // The rest of the prefetch completes.
    origin.gate.add_permits(prefetch as usize);
    until("prefetch to finish", || done.load(Ordering::SeqCst) == u64::from(prefetch)).await;
}
