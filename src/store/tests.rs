//! Unit tests of the chunk store: group commit, failed syncs and writes, forgotten and
//! unsettled chunks, verification.

use super::*;
use crate::image::ChunkSize;
use io::parse_faults;

fn manifest(data: &[u8]) -> Arc<Manifest> {
    let g = Geometry::new(data.len() as u64, ChunkSize::new(4096).unwrap()).unwrap();
    Manifest::build(g, |idx, buf| {
        let o = g.chunk_offset(idx).0 as usize;
        buf.copy_from_slice(&data[o..o + buf.len()]);
        Ok::<_, ()>(())
    })
    .map(Arc::new)
    .unwrap()
}

#[test]
fn put_commit_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let data: Vec<u8> = (0..20_000u32).map(|i| (i % 253) as u8).collect();
    let m = manifest(&data);
    {
        let s = ChunkStore::open(dir.path(), &m).unwrap();
        assert!(!s.has(ChunkIdx(1)));
        s.put(ChunkIdx(1), &data[4096..8192]).unwrap();
        s.put(ChunkIdx(4), &data[16384..]).unwrap();
        assert!(s.has(ChunkIdx(1)) && s.has_all(4..5) && !s.has_all(0..2));
        assert_eq!(s.commit().unwrap(), 2);
        s.put(ChunkIdx(2), &data[8192..12288]).unwrap();
        // Not committed: must not survive the "crash" below.
    }
    let s = ChunkStore::open(dir.path(), &m).unwrap();
    assert_eq!(s.present().iter().collect::<Vec<_>>(), vec![1, 4]);
    let mut buf = vec![0u8; 4096];
    s.read_at(4096, &mut buf).unwrap();
    assert_eq!(buf, &data[4096..8192]);
    assert_eq!(s.read_vec(4100, 3000).unwrap(), &data[4100..7100]);
    assert!(s.read_vec(19_000, 2000).is_err(), "beyond the end of the data file");
}

#[test]
fn wrong_length_and_second_opener_refused() {
    let dir = tempfile::tempdir().unwrap();
    let data = vec![7u8; 10_000];
    let m = manifest(&data);
    let s = ChunkStore::open(dir.path(), &m).unwrap();
    assert!(matches!(s.put(ChunkIdx(0), &data[..100]), Err(StoreError::BadChunkLen { .. })));
    assert!(matches!(s.put_span(0..2, &data[..4096]), Err(StoreError::BadChunkLen { .. })));
    assert!(matches!(s.put_span(1..1, &[]), Err(StoreError::BadChunkLen { .. })));
    assert!(matches!(s.put_span(2..4, &data[8192..]), Err(StoreError::BadChunkLen { .. })), "beyond the image");
    s.put_span(1..3, &data[4096..]).unwrap();
    assert!(s.has_all(1..3) && !s.has(ChunkIdx(0)));
    assert_eq!(s.missing(0..3), vec![0]);
    assert_eq!(s.pending_count(), 2);
    assert!(matches!(ChunkStore::open(dir.path(), &m), Err(StoreError::Locked(_))));
}

#[test]
fn foreign_state_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let data = vec![7u8; 10_000];
    let m = manifest(&data);
    let s = ChunkStore::open(dir.path(), &m).unwrap();
    s.put(ChunkIdx(0), &data[..4096]).unwrap();
    s.commit().unwrap();
    let state = s.dir().join("state");
    drop(s);
    let mut bytes = fs::read(&state).unwrap();
    bytes[30] ^= 0xff;
    fs::write(&state, &bytes).unwrap();
    let err = ChunkStore::open(dir.path(), &m).err().unwrap().to_string();
    assert!(err.contains("checksum"), "{err}");
}

#[test]
fn a_failed_sync_drops_its_batch_for_good() {
    let dir = tempfile::tempdir().unwrap();
    let data: Vec<u8> = (0..20_000u32).map(|i| (i % 251) as u8).collect();
    let m = manifest(&data);
    let s = ChunkStore::open_with_faults(dir.path(), &m, parse_faults("sync=eio/2").unwrap()).unwrap();
    s.put(ChunkIdx(0), &data[..4096]).unwrap();
    assert_eq!(s.commit().unwrap(), 1, "the first sync succeeds");
    s.put(ChunkIdx(1), &data[4096..8192]).unwrap();
    s.put(ChunkIdx(2), &data[8192..12288]).unwrap();
    assert!(matches!(s.commit(), Err(StoreError::SyncFailed { dropped: 2, .. })));
    assert!(!s.has(ChunkIdx(1)) && !s.has(ChunkIdx(2)), "not served from memory either");
    assert!(s.has(ChunkIdx(0)));
    assert_eq!(s.commit().unwrap(), 0, "nothing is retried into durable");
    assert_eq!(s.stats().sync_errors.load(Ordering::Relaxed), 1);
    drop(s);
    let s = ChunkStore::open(dir.path(), &m).unwrap();
    assert_eq!(s.present().iter().collect::<Vec<_>>(), vec![0]);
    assert_eq!(s.verify(&m), VerifyReport { checked: 1, bad: 0 });
}

#[test]
fn a_failed_read_forgets_the_chunk_and_a_failing_cache_degrades() {
    let dir = tempfile::tempdir().unwrap();
    let data: Vec<u8> = (0..20_000u32).map(|i| (i % 241) as u8).collect();
    let m = manifest(&data);
    let s = ChunkStore::open_with_faults(dir.path(), &m, parse_faults("read=eio/2,write=eio/2").unwrap()).unwrap();
    s.put_span(0..2, &data[..8192]).unwrap();
    assert!(s.put(ChunkIdx(2), &data[8192..12288]).is_err(), "second write fails");
    assert!(!s.has(ChunkIdx(2)));
    s.commit().unwrap();
    assert!(s.read_vec(0, 100).is_ok());
    assert!(s.read_vec(4096, 100).is_err(), "second read fails");
    assert!(s.has(ChunkIdx(0)) && !s.has(ChunkIdx(1)), "the chunk read is forgotten");
    assert!(matches!(s.put(ChunkIdx(1), &data[4096..8192]), Err(StoreError::Forgetting(_))), "until recorded");
    s.commit().unwrap();
    drop(s);
    let s = ChunkStore::open_with_faults(dir.path(), &m, parse_faults("write=eio").unwrap()).unwrap();
    assert_eq!(s.present().iter().collect::<Vec<_>>(), vec![0], "forgotten in the state file too");
    for _ in 0..DEGRADE_AFTER {
        assert!(matches!(s.put(ChunkIdx(3), &data[12288..16384]), Err(StoreError::Io { .. })));
    }
    assert!(s.degraded());
    assert!(matches!(s.put(ChunkIdx(3), &data[12288..16384]), Err(StoreError::Degraded(_))));
    assert_eq!(s.stats().write_errors.load(Ordering::Relaxed), u64::from(DEGRADE_AFTER));
}

#[test]
fn a_full_disk_stops_caching_without_counting_as_a_failure() {
    let dir = tempfile::tempdir().unwrap();
    let data: Vec<u8> = (0..20_000u32).map(|i| (i % 233) as u8).collect();
    let m = manifest(&data);
    let s = ChunkStore::open_with_faults(dir.path(), &m, parse_faults("write=enospc").unwrap()).unwrap();
    assert!(matches!(s.put_span(0..2, &data[..8192]), Err(StoreError::NoSpace(_))));
    assert!(matches!(s.put(ChunkIdx(3), &data[12288..16384]), Err(StoreError::NoSpace(_))), "not tried again at once");
    assert!(!s.has(ChunkIdx(0)) && !s.has(ChunkIdx(3)));
    assert_eq!(s.stats().chunks_not_cached.load(Ordering::Relaxed), 3);
    assert_eq!(s.stats().write_errors.load(Ordering::Relaxed), 0);
    assert!(!s.degraded());
}

#[test]
fn verify_drops_chunks_that_do_not_match() {
    let dir = tempfile::tempdir().unwrap();
    let data: Vec<u8> = (0..20_000u32).map(|i| (i % 239) as u8).collect();
    let m = manifest(&data);
    let s = ChunkStore::open(dir.path(), &m).unwrap();
    s.put_span(0..3, &data[..12288]).unwrap();
    s.commit().unwrap();
    // Damage chunk 1 behind the store's back.
    std::os::unix::fs::FileExt::write_all_at(
        &File::options().write(true).open(s.dir().join("data")).unwrap(),
        b"x",
        5000,
    )
    .unwrap();
    assert_eq!(s.verify(&m), VerifyReport { checked: 3, bad: 1 });
    assert_eq!(s.missing(0..3), vec![1]);
    // A chunk not yet durable is checked on every read: its loss is caught, not served.
    s.put(ChunkIdx(3), &data[12288..16384]).unwrap();
    std::os::unix::fs::FileExt::write_all_at(
        &File::options().write(true).open(s.dir().join("data")).unwrap(),
        b"y",
        13000,
    )
    .unwrap();
    assert!(s.read_vec(12300, 100).is_err());
    assert!(!s.has(ChunkIdx(3)));
    assert_eq!(s.read_vec(8300, 3000).unwrap(), &data[8300..11300], "durable chunks read as they are");
}

#[test]
fn unsettled_chunks_are_served_from_their_kept_bytes_until_durable() {
    use std::os::unix::fs::FileExt;
    let dir = tempfile::tempdir().unwrap();
    let data: Vec<u8> = (0..20_000u32).map(|i| (i % 239) as u8).collect();
    let m = manifest(&data);
    let s = ChunkStore::open(dir.path(), &m).unwrap();
    s.put_span_kept(0..2, Bytes::copy_from_slice(&data[..8192]), 8192).unwrap();
    s.put(ChunkIdx(2), &data[8192..12288]).unwrap();
    assert_eq!(s.kept_bytes(), 8192, "only what was put with its bytes shared is kept");
    // A writeback lost under the store: the data file no longer holds chunks 1 and 2.
    let file = OpenOptions::new().write(true).open(s.dir().join("data")).unwrap();
    file.write_all_at(&[0u8; 8192], 4096).unwrap();
    assert_eq!(s.read_kept(4100, 100).unwrap(), &data[4100..4200]);
    assert_eq!(s.read_kept(0, 8192).unwrap(), &data[..8192]);
    assert!(s.read_kept(4096, 8192).is_none(), "chunk 2 is not kept");
    // Across a kept chunk and a checked one: the kept one from memory, the other checked,
    // found lost and forgotten.
    assert!(s.read_vec(4096, 8192).is_err());
    assert!(s.has(ChunkIdx(1)) && !s.has(ChunkIdx(2)));
    assert_eq!(s.read_vec(0, 8192).unwrap(), &data[..8192]);
    assert_eq!(s.stats().kept_reads.load(Ordering::Relaxed), 3);
    // Durable: no longer kept, read from the file as it is.
    s.commit().unwrap();
    assert_eq!(s.kept_bytes(), 0);
    assert!(s.read_kept(0, 100).is_none());
    assert_eq!(s.read_vec(0, 4096).unwrap(), &data[..4096]);
}

#[test]
fn a_failed_sync_drops_kept_bytes_with_its_batch() {
    let dir = tempfile::tempdir().unwrap();
    let data: Vec<u8> = (0..20_000u32).map(|i| (i % 233) as u8).collect();
    let m = manifest(&data);
    let s = ChunkStore::open_with_faults(dir.path(), &m, parse_faults("sync=eio").unwrap()).unwrap();
    s.put_span_kept(0..2, Bytes::copy_from_slice(&data[..8192]), 8192).unwrap();
    assert!(matches!(s.commit(), Err(StoreError::SyncFailed { dropped: 2, .. })));
    assert_eq!(s.kept_bytes(), 0);
    assert!(!s.has(ChunkIdx(0)) && s.read_kept(0, 100).is_none() && s.read_vec(0, 100).is_err());
}

#[test]
fn kept_bytes_serve_any_range_and_stand_in_for_lost_file_bytes() {
    use std::os::unix::fs::FileExt;
    let dir = tempfile::tempdir().unwrap();
    let data: Vec<u8> = (0..20_000u32).map(|i| (i % 229) as u8).collect();
    let m = manifest(&data);
    let s = ChunkStore::open(dir.path(), &m).unwrap();
    s.put(ChunkIdx(0), &data[..4096]).unwrap();
    s.commit().unwrap();
    // Chunks 1-2 kept; 3 and the image's last, short chunk 4 (3,616 bytes) kept as one span.
    s.put_span_kept(1..3, Bytes::copy_from_slice(&data[4096..12288]), 8192).unwrap();
    s.put_span_kept(3..5, Bytes::copy_from_slice(&data[12288..]), 20_000 - 12288).unwrap();
    assert_eq!(s.kept_bytes(), 20_000 - 4096);
    // Their bytes lost from the file under the store.
    let file = OpenOptions::new().write(true).open(s.dir().join("data")).unwrap();
    file.write_all_at(&vec![0u8; 20_000 - 4096], 4096).unwrap();
    for (at, len) in [(4100, 200), (8000, 200), (4096, 8192), (5000, 14_000), (19_000, 1000), (16_384, 3616)] {
        assert_eq!(s.read_kept(at, len).unwrap(), &data[at as usize..at as usize + len], "{at}+{len}");
    }
    assert!(s.read_kept(19_000, 2000).is_none(), "past the end of the image");
    assert!(s.read_kept(4000, 200).is_none(), "chunk 0 is durable, not kept");
    // Durable and kept chunks in one read: the file's bytes for the first, the kept ones for
    // the rest (nothing is checked, nothing found lost).
    assert_eq!(s.read_vec(0, 20_000).unwrap(), data);
    assert_eq!(s.stats().read_errors.load(Ordering::Relaxed), 0);
    // A forgotten chunk's bytes go with it.
    s.forget(2..3);
    assert_eq!(s.kept_bytes(), 20_000 - 2 * 4096);
    assert!(s.read_kept(4096, 8192).is_none());
}

#[test]
fn kept_replies_share_a_buffer_only_when_they_are_half_of_it() {
    let dir = tempfile::tempdir().unwrap();
    let data: Vec<u8> = (0..20_000u32).map(|i| (i % 227) as u8).collect();
    let m = manifest(&data);
    let s = ChunkStore::open(dir.path(), &m).unwrap();
    let run = Bytes::copy_from_slice(&data[..8192]);
    s.put_span_kept(0..2, run.clone(), run.len()).unwrap();
    assert_eq!(s.read_kept(4096, 4096).unwrap().as_ptr(), run[4096..].as_ptr(), "half of the run: shared");
    let small = s.read_kept(4096, 100).unwrap();
    assert_eq!(small, &data[4096..4196]);
    assert_ne!(small.as_ptr(), run[4096..].as_ptr(), "a small reply of the run is a copy");
    // A span that is part of a longer buffer is copied when kept: nothing pins the buffer.
    let longer = Bytes::copy_from_slice(&data[8192..20_000]);
    s.put_span_kept(2..3, longer.slice(..4096), longer.len()).unwrap();
    assert_ne!(s.read_kept(8192, 4096).unwrap().as_ptr(), longer.as_ptr());
    assert_eq!(s.read_kept(8192, 4096).unwrap(), &data[8192..12288]);
}
