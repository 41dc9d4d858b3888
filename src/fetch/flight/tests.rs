//! The miss path against a memory source: single flight, retries, verification, pushed runs.

use super::*;
use crate::fetch::{BoxFuture, SourceError};
use crate::image::{ChunkSize, Geometry};
use std::sync::atomic::AtomicBool;

#[test]
fn runs_split_on_gaps_and_size() {
    let items: Vec<(u32, ())> = [1, 2, 3, 5, 6, 7, 8, 9].iter().map(|&i| (i, ())).collect();
    let r: Vec<Vec<u32>> =
        runs(items.clone(), 3, None).into_iter().map(|r| r.into_iter().map(|(i, _)| i).collect()).collect();
    assert_eq!(r, vec![vec![1, 2, 3], vec![5, 6, 7], vec![8, 9]]);
    let r: Vec<Vec<u32>> =
        runs(items, 8, Some(4)).into_iter().map(|r| r.into_iter().map(|(i, _)| i).collect()).collect();
    assert_eq!(r, vec![vec![1, 2, 3], vec![5, 6, 7], vec![8, 9]], "cut at multiples of 4");
}

/// A source over a byte vector that counts reads and can be switched off or made to lie.
struct MemSource {
    data: Vec<u8>,
    reads: AtomicU64,
    down: AtomicBool,
    corrupt: AtomicBool,
    panic: AtomicBool,
}

impl ChunkSource for MemSource {
    fn describe(&self) -> String {
        "memory".into()
    }
    fn size(&self) -> BoxFuture<'_, Result<u64, SourceError>> {
        Box::pin(async move { Ok(self.data.len() as u64) })
    }
    fn read(&self, offset: u64, len: usize) -> BoxFuture<'_, Result<Vec<u8>, SourceError>> {
        Box::pin(async move {
            self.reads.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(20)).await;
            if self.panic.swap(false, Ordering::SeqCst) {
                panic!("a source bug");
            }
            if self.down.load(Ordering::SeqCst) {
                return Err(SourceError::Unreachable { what: "memory".into(), reason: "down".into() });
            }
            let mut v = self.data[offset as usize..offset as usize + len].to_vec();
            if self.corrupt.load(Ordering::SeqCst) {
                v[0] ^= 1;
            }
            Ok(v)
        })
    }
}

/// Waits until every started fetch has been stored (stores follow the waiters' wake-up).
async fn settled(f: &Fetcher) {
    for _ in 0..400 {
        if f.inflight() == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("fetches never settled");
}

fn setup(timeout: Duration) -> (tempfile::TempDir, Arc<MemSource>, Arc<ChunkStore>, Arc<Fetcher>) {
    setup_with(timeout, |data| MemSource {
        data,
        reads: AtomicU64::new(0),
        down: AtomicBool::new(false),
        corrupt: AtomicBool::new(false),
        panic: AtomicBool::new(false),
    })
}

/// A fetcher of 16 chunks of 4 KiB, in runs of at most 4, over the source `make` builds from
/// the image's bytes.
fn setup_with<S: ChunkSource>(
    timeout: Duration,
    make: impl FnOnce(Vec<u8>) -> S,
) -> (tempfile::TempDir, Arc<S>, Arc<ChunkStore>, Arc<Fetcher>) {
    let data: Vec<u8> = (0..64 * 1024u32).map(|i| (i * 31 % 256) as u8).collect();
    let g = Geometry::new(data.len() as u64, ChunkSize::new(4096).unwrap()).unwrap();
    let m = Manifest::build(g, |idx, buf| {
        let o = g.chunk_offset(idx).0 as usize;
        buf.copy_from_slice(&data[o..o + buf.len()]);
        Ok::<_, ()>(())
    })
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let m = Arc::new(m);
    let store = Arc::new(ChunkStore::open(dir.path(), &m).unwrap());
    let src = Arc::new(make(data));
    let f = Fetcher::new(store.clone(), m, src.clone(), FetchTuning { timeout, max_chunks: 4 });
    (dir, src, store, f)
}

/// A source that hands on the first `ahead` chunks of a read at once (as a relay cutting
/// through), then holds the rest until `gate` opens.
struct Streaming {
    data: Vec<u8>,
    ahead: u32,
    gate: tokio::sync::Semaphore,
}

impl ChunkSource for Streaming {
    fn describe(&self) -> String {
        "streaming".into()
    }
    fn size(&self) -> BoxFuture<'_, Result<u64, SourceError>> {
        Box::pin(async move { Ok(self.data.len() as u64) })
    }
    fn read(&self, offset: u64, len: usize) -> BoxFuture<'_, Result<Vec<u8>, SourceError>> {
        Box::pin(async move { Ok(self.data[offset as usize..offset as usize + len].to_vec()) })
    }
    fn read_streaming<'a>(
        &'a self,
        offset: u64,
        len: usize,
        _: Priority,
        progress: crate::fetch::Progress<'a>,
    ) -> BoxFuture<'a, Result<(Vec<u8>, bool), SourceError>> {
        Box::pin(async move {
            let first = (offset / 4096) as u32;
            let ahead = (self.ahead as usize * 4096).min(len);
            let o = offset as usize;
            progress(first..first + self.ahead, Bytes::copy_from_slice(&self.data[o..o + ahead]));
            // A second, overlapping hand-on (another attempt starting again) changes nothing.
            progress(first..first + 1, Bytes::copy_from_slice(&self.data[o..o + 4096]));
            let _open = self.gate.acquire().await.unwrap();
            Ok((self.data[o..o + len].to_vec(), true))
        })
    }
}

#[tokio::test]
async fn chunks_cut_through_reach_readers_and_relays_before_the_run_is_in() {
    let (_d, src, store, f) =
        setup_with(Duration::from_secs(5), |data| Streaming { data, ahead: 2, gate: tokio::sync::Semaphore::new(0) });
    // A relay's reply for 0..4: the two chunks that came ahead go out as a part while the
    // read still waits for the rest.
    let (tx, mut parts) = tokio::sync::mpsc::unbounded_channel();
    let relay = {
        let f = f.clone();
        tokio::spawn(async move { f.ensure_parts(0..4, Priority::Relay, &tx).await })
    };
    let ahead = Duration::from_secs(5);
    let (chunks, bytes) = tokio::time::timeout(ahead, parts.recv()).await.expect("a part ahead of the run").unwrap();
    assert_eq!((chunks, &bytes[..]), (0..2, &src.data[..2 * 4096]));
    // A reader of chunk 1 gets it now too, from the same flight.
    let runs = tokio::time::timeout(ahead, f.ensure(1..2)).await.expect("chunk 1 ahead of the run").unwrap();
    assert_eq!(runs[0].slice(4096, 4096).unwrap(), &src.data[4096..8192]);
    assert!(!relay.is_finished(), "the rest of the run is not in");
    assert!(!store.has(ChunkIdx(0)), "stored only once the run is whole");
    src.gate.add_permits(1);
    let (runs, rest) = relay.await.unwrap().unwrap();
    // Chunks 2 and 3 came at once: 2 goes on as a part, the last is the reply's rest.
    assert_eq!(parts.try_recv().unwrap(), (2..3, Bytes::copy_from_slice(&src.data[2 * 4096..3 * 4096])));
    assert!(parts.try_recv().is_err(), "the reply's last chunk is not sent as a part");
    assert_eq!(rest, 3, "the rest of the reply starts after the parts");
    assert!(runs.iter().any(|r| r.slice(3 * 4096, 4096) == Some(&src.data[3 * 4096..4 * 4096])));
    settled(&f).await;
    assert!(store.has_all(0..4));
    // All of a run in at once: all but its last chunk go ahead, the last is the reply's.
    let (tx, mut parts) = tokio::sync::mpsc::unbounded_channel();
    let src4 = Streaming { data: src.data.clone(), ahead: 4, gate: tokio::sync::Semaphore::new(1) };
    let (_d2, _, _, f4) = setup_with(Duration::from_secs(5), |_| src4);
    let (_, rest) = f4.ensure_parts(4..8, Priority::Relay, &tx).await.unwrap();
    assert_eq!(rest, 7);
    let mut next = 4;
    while let Ok((chunks, _)) = parts.try_recv() {
        assert_eq!(chunks.start, next, "parts in order");
        next = chunks.end;
    }
    assert_eq!(next, 7);
    // A chunk the cache holds ends the parts: the reply then carries it all (the gate is open:
    // each read gives its permit back).
    let (tx, mut parts) = tokio::sync::mpsc::unbounded_channel();
    let (_, rest) = f.ensure_parts(3..8, Priority::Relay, &tx).await.unwrap();
    assert_eq!(rest, 3);
    assert!(parts.try_recv().is_err());
}

#[tokio::test]
async fn concurrent_misses_fetch_once() {
    let (_d, src, store, f) = setup(Duration::from_secs(5));
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let f = f.clone();
            tokio::spawn(async move { f.ensure(0..4).await })
        })
        .collect();
    for t in tasks {
        let runs = t.await.unwrap().unwrap();
        assert_eq!(runs.len(), 1);
        assert_eq!(runs[0].slice(0, 4096).unwrap(), &src.data[..4096]);
    }
    assert_eq!(src.reads.load(Ordering::SeqCst), 1, "one coalesced read for chunks 0..4");
    settled(&f).await;
    assert!(store.has_all(0..4));
    assert!(f.ensure(0..4).await.unwrap().is_empty(), "present chunks come from the store");
    assert_eq!(src.reads.load(Ordering::SeqCst), 1, "present chunks are not fetched again");
    f.ensure(4..16).await.unwrap();
    assert_eq!(src.reads.load(Ordering::SeqCst), 4, "12 chunks in runs of at most 4");
}

#[tokio::test]
async fn source_down_fails_within_budget_then_recovers() {
    let (_d, src, store, f) = setup(Duration::from_millis(400));
    src.down.store(true, Ordering::SeqCst);
    let t0 = std::time::Instant::now();
    assert!(matches!(f.ensure(0..1).await, Err(FetchError::GaveUp { .. })));
    assert!(t0.elapsed() < Duration::from_secs(2));
    assert!(src.reads.load(Ordering::SeqCst) >= 2, "retried before giving up");
    assert!(!store.has(ChunkIdx(0)));
    src.down.store(false, Ordering::SeqCst);
    f.ensure(0..1).await.unwrap();
    settled(&f).await;
    assert!(store.has(ChunkIdx(0)));
}

#[tokio::test]
async fn corrupt_data_is_never_stored() {
    let (_d, src, store, f) = setup(Duration::from_secs(1));
    src.corrupt.store(true, Ordering::SeqCst);
    assert_eq!(f.ensure(2..3).await.unwrap_err(), FetchError::Verify(ChunkIdx(2)));
    settled(&f).await;
    assert!(!store.has(ChunkIdx(2)));
    assert_eq!(f.stats().verify_failures.load(Ordering::SeqCst), 1);
    assert_eq!(store.pending_count(), 0);
}

#[tokio::test]
async fn a_fetch_that_panics_leaves_no_dead_entries() {
    let (_d, src, store, f) = setup(Duration::from_secs(1));
    src.panic.store(true, Ordering::SeqCst);
    assert_eq!(f.ensure(1..3).await.unwrap_err(), FetchError::Aborted);
    assert_eq!(f.inflight(), 0, "the panicked fetch's entries are gone");
    let runs = f.ensure(1..3).await.unwrap();
    assert_eq!(runs[0].slice(4096, 8192).unwrap(), &src.data[4096..12288]);
    settled(&f).await;
    assert!(store.has_all(1..3));
}

#[tokio::test]
async fn readers_wait_for_an_offered_run_and_take_its_push_without_a_fetch() {
    let (_d, src, store, f) = setup(Duration::from_secs(5));
    let mut obtained = f.obtained();
    // Chunk 1 is being fetched already: the offer takes only 0 and 2..4.
    let fetching = {
        let f = f.clone();
        tokio::spawn(async move { f.ensure(1..2).await })
    };
    while f.inflight() == 0 {
        tokio::task::yield_now().await;
    }
    let offered = f.offer(0..4).expect("chunks 0, 2 and 3 are wanted");
    assert!(f.offer(0..4).is_none(), "a second offer finds them all in flight");
    let reader = {
        let f = f.clone();
        tokio::spawn(async move { f.ensure(2..4).await })
    };
    // The reader waits on the offer; pushing its bytes answers it.
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!reader.is_finished(), "the reader waits for the push");
    f.deliver(offered, 0..4, 0, Bytes::copy_from_slice(&src.data[..4 * 4096])).await;
    let runs = reader.await.unwrap().unwrap();
    assert_eq!(runs[0].slice(8192, 8192).unwrap(), &src.data[8192..16384]);
    fetching.await.unwrap().unwrap();
    settled(&f).await;
    assert!(store.has_all(0..4));
    assert_eq!(src.reads.load(Ordering::SeqCst), 1, "only chunk 1 was fetched");
    // Both runs are announced to subscribers (the peer server pushes them on).
    let mut got = vec![obtained.recv().await.unwrap().chunks.clone(), obtained.recv().await.unwrap().chunks.clone()];
    got.sort_by_key(|r| r.start);
    assert_eq!(got, vec![0..4, 1..2]);
}

#[tokio::test]
async fn an_offered_run_that_never_comes_is_fetched_by_its_readers() {
    let (_d, src, store, f) = setup(Duration::from_secs(5));
    // An offer dropped undelivered (its session ended): the reader fetches.
    let offered = f.offer(4..8).unwrap();
    let reader = {
        let f = f.clone();
        tokio::spawn(async move { f.ensure(4..6).await })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(src.reads.load(Ordering::SeqCst), 0, "nothing fetched while the push may come");
    drop(offered);
    let runs = reader.await.unwrap().unwrap();
    assert_eq!(runs[0].slice(4 * 4096, 4096).unwrap(), &src.data[4 * 4096..5 * 4096]);
    // A peer that offers again and again and never delivers (each offer lost after a while,
    // the next one made at once) holds a read for a few offers only: the last pass fetches
    // through a standing offer.
    let before = src.reads.load(Ordering::SeqCst);
    let reoffer = {
        let f = f.clone();
        tokio::spawn(async move {
            loop {
                if let Some(o) = f.offer(8..9) {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    drop(o);
                }
                tokio::task::yield_now().await;
            }
        })
    };
    while f.inflight() == 0 {
        tokio::task::yield_now().await;
    }
    let runs = f.ensure(8..9).await.unwrap();
    reoffer.abort();
    assert_eq!(runs[0].slice(8 * 4096, 4096).unwrap(), &src.data[8 * 4096..9 * 4096]);
    assert_eq!(src.reads.load(Ordering::SeqCst), before + 1, "fetched through the offers");
    settled(&f).await;
    assert!(store.has_all(4..6) && store.has(ChunkIdx(8)));
}
