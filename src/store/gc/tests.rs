//! Unit tests of eviction and the collector on real files: crash-safe order, the three tiers,
//! pins and profile chunks, and reads racing evictions.

use std::sync::atomic::{AtomicBool, Ordering};

use super::*;
use crate::image::{ChunkIdx, ChunkSize, Geometry, Manifest};

const CHUNK: usize = 4096;

fn image(seed: u8, chunks: usize) -> (Vec<u8>, Arc<Manifest>) {
    let data: Vec<u8> = (0..chunks * CHUNK).map(|i| (i % 251) as u8 ^ seed).collect();
    let g = Geometry::new(data.len() as u64, ChunkSize::new(CHUNK as u64).unwrap()).unwrap();
    let m = Manifest::build(g, |idx, buf| {
        let o = g.chunk_offset(idx).0 as usize;
        buf.copy_from_slice(&data[o..o + buf.len()]);
        Ok::<_, ()>(())
    })
    .unwrap();
    (data, Arc::new(m))
}

fn filled(dir: &Path, seed: u8, chunks: usize) -> (Vec<u8>, Arc<ChunkStore>) {
    let (data, m) = image(seed, chunks);
    let s = ChunkStore::open(dir, &m).unwrap();
    s.put_span(0..chunks as u32, &data).unwrap();
    s.commit().unwrap();
    (data, Arc::new(s))
}

/// Bytes the data file really holds (allocated blocks, not its sparse size).
fn allocated(s: &ChunkStore) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(s.dir().join("data")).map_or(0, |m| m.blocks() * 512)
}

fn present(s: &ChunkStore) -> u64 {
    s.present_count()
}

#[test]
fn evicted_chunks_are_unclaimed_punched_and_cacheable_again() {
    let dir = tempfile::tempdir().unwrap();
    let (data, m) = image(1, 16);
    {
        let s = ChunkStore::open(dir.path(), &m).unwrap();
        s.put_span(0..16, &data).unwrap();
        s.commit().unwrap();
    }
    let s = ChunkStore::open(dir.path(), &m).unwrap();
    let held = allocated(&s);
    let victims: RoaringBitmap = (4..12).collect();
    let e = s.evict(&victims).unwrap();
    assert_eq!(e.chunks, 8);
    assert!(e.bytes >= 8 * CHUNK as u64 && allocated(&s) <= held - 8 * CHUNK as u64, "{e:?}");
    assert!(!s.has(ChunkIdx(4)) && s.has(ChunkIdx(3)) && s.has(ChunkIdx(12)));
    assert!(s.read_vec(4 * CHUNK as u64, CHUNK).is_err(), "an evicted chunk is never read");
    s.put(ChunkIdx(5), &data[5 * CHUNK..6 * CHUNK]).unwrap();
    assert_eq!(s.read_vec(5 * CHUNK as u64, 10).unwrap(), &data[5 * CHUNK..5 * CHUNK + 10]);
    drop(s);
    // The state file was written by the eviction itself: a "crash" now claims none of them.
    let s = ChunkStore::open(dir.path(), &m).unwrap();
    assert_eq!(s.present().iter().collect::<Vec<_>>(), [0, 1, 2, 3, 12, 13, 14, 15]);
    assert_eq!(s.verify(&m).bad, 0);
}

#[test]
fn blocks_no_state_claims_are_freed_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let (data, m) = image(6, 16);
    let claimed = {
        let s = ChunkStore::open(dir.path(), &m).unwrap();
        s.put_span(0..4, &data[..4 * CHUNK]).unwrap();
        s.commit().unwrap();
        let claimed = allocated(&s);
        // Written but never committed: a crash now leaves these blocks claimed by nothing.
        s.put_span(8..16, &data[8 * CHUNK..]).unwrap();
        assert!(allocated(&s) >= claimed + 8 * CHUNK as u64);
        claimed
    };
    let s = ChunkStore::open(dir.path(), &m).unwrap();
    assert_eq!(allocated(&s), claimed, "the unclaimed chunks' blocks are punched");
    assert_eq!(s.present().iter().collect::<Vec<_>>(), [0, 1, 2, 3]);
    assert_eq!(s.verify(&m).bad, 0);
}

#[test]
fn the_collector_takes_unused_then_unheld_then_held_lru_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let chunk = CHUNK as u64;
    // An unused cache (its image no longer served), and a pinned unused one.
    drop(filled(dir.path(), 9, 8));
    let (_, pinned) = filled(dir.path(), 8, 8);
    set_pinned(pinned.dir(), true).unwrap();
    drop(pinned);
    let (_, old) = filled(dir.path(), 2, 8);
    let (_, recent) = filled(dir.path(), 3, 8);
    let (_, held) = filled(dir.path(), 4, 8);
    old.touch(0..8);
    std::thread::sleep(std::time::Duration::from_millis(120));
    recent.touch(0..8);
    held.touch(0..4);
    let keep: RoaringBitmap = (6..8).collect();
    let open = |keep: &RoaringBitmap| {
        vec![
            Open { store: recent.clone(), held: false, profile: None },
            Open { store: old.clone(), held: false, profile: None },
            Open { store: held.clone(), held: true, profile: Some(keep.clone()) },
        ]
    };
    let total = usage(dir.path()).unwrap();
    assert_eq!(total, scan(dir.path()).unwrap().iter().map(|d| d.bytes).sum::<u64>());
    assert!(usage(&dir.path().join("missing")).is_err(), "an unlistable cache dir is not an empty one");
    assert!(total >= 5 * 8 * chunk);

    let r = collect(dir.path(), &open(&keep), total - 8 * chunk, true, Policy::Lru).unwrap();
    assert_eq!(r.removed.len(), 1, "only the unpinned unused cache goes: {r:?}");
    assert!(r.reached);
    assert_eq!(scan(dir.path()).unwrap().len(), 4);

    // Down by 12 more chunks: the least recently used unheld image first, all of it, then
    // the next one's least recently used chunks.
    let r = collect(dir.path(), &open(&keep), r.after - 12 * chunk, false, Policy::Lru).unwrap();
    assert!(r.reached, "{r:?}");
    assert_eq!(present(&old), 0);
    assert_eq!(present(&recent), 4);
    assert_eq!(present(&held), 8);

    // To nothing: the held image keeps its profile chunks, the pinned cache stays whole.
    let r = collect(dir.path(), &open(&keep), 0, false, Policy::Lru).unwrap();
    assert!(!r.reached);
    assert_eq!(present(&recent), 0);
    assert_eq!(held.present().iter().collect::<Vec<_>>(), [6, 7]);
    assert_eq!(scan(dir.path()).unwrap().iter().filter(|d| d.pinned).count(), 1);
    assert!(scan(dir.path()).unwrap().iter().find(|d| d.pinned).unwrap().bytes >= 8 * chunk);
}

#[test]
fn profile_aware_eviction_takes_chunks_outside_profiles_first() {
    let dir = tempfile::tempdir().unwrap();
    let chunk = CHUNK as u64;
    let (_, a) = filled(dir.path(), 2, 8);
    let (_, b) = filled(dir.path(), 3, 8);
    a.touch(0..8);
    std::thread::sleep(std::time::Duration::from_millis(120));
    b.touch(0..8);
    let profile: RoaringBitmap = (0..4).collect();
    let open = [
        Open { store: a.clone(), held: false, profile: Some(profile.clone()) },
        Open { store: b.clone(), held: false, profile: Some(profile.clone()) },
    ];
    // 8 chunks to free: the non-profile halves of both images, not all of the older one.
    let r = collect(dir.path(), &open, usage(dir.path()).unwrap() - 8 * chunk, false, Policy::Profile).unwrap();
    assert!(r.reached, "{r:?}");
    assert_eq!(a.present().iter().collect::<Vec<_>>(), [0, 1, 2, 3]);
    assert_eq!(b.present().iter().collect::<Vec<_>>(), [0, 1, 2, 3]);
    // Then profile chunks, least recently used image first.
    let r = collect(dir.path(), &open, usage(dir.path()).unwrap() - 4 * chunk, false, Policy::Profile).unwrap();
    assert!(r.reached);
    assert_eq!((a.present_count(), b.present_count()), (0, 4));
}

#[test]
fn a_read_racing_evictions_never_returns_a_wrong_byte() {
    let dir = tempfile::tempdir().unwrap();
    let (data, m) = image(5, 4);
    // Every read waits a little between its presence check and its pread: the window in which
    // an eviction would punch the hole under it.
    let faults = crate::store::io::parse_faults("read=delay:1ms").unwrap();
    let s = ChunkStore::open_with_faults(dir.path(), &m, faults).unwrap();
    s.put_span(0..4, &data).unwrap();
    s.commit().unwrap();
    let stop = AtomicBool::new(false);
    let (mut ok, mut refused) = (0u64, 0u64);
    std::thread::scope(|t| {
        t.spawn(|| {
            for _ in 0..200 {
                std::thread::sleep(std::time::Duration::from_micros(300));
                let _ = s.evict(&(0..4).collect());
                for i in 0..4u32 {
                    let at = i as usize * CHUNK;
                    let _ = s.put(ChunkIdx(i), &data[at..at + CHUNK]);
                }
                s.commit().unwrap();
            }
            stop.store(true, Ordering::SeqCst);
        });
        while !stop.load(Ordering::SeqCst) {
            let at = 1000;
            let read = s.read_vec_nowait(at, 3 * CHUNK).map(Ok).unwrap_or_else(|| s.read_vec(at, 3 * CHUNK));
            match read {
                Ok(bytes) => {
                    assert_eq!(bytes, &data[at as usize..at as usize + 3 * CHUNK]);
                    ok += 1;
                }
                Err(_) => refused += 1,
            }
        }
    });
    assert!(ok > 0, "some reads found the chunks present ({refused} did not)");
}
