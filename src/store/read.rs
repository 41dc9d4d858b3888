//! Reads from an image's cache: durable chunks as they are, chunks not durable yet from their
//! kept bytes or read whole and checked against the manifest; a chunk that cannot be read back
//! is forgotten (fetched again). Also `verify`, which checks every present chunk.

use std::sync::atomic::Ordering;

use bytes::Bytes;

use super::presence::Presence;
use super::{ChunkStore, VerifyReport};
use crate::image::{ChunkIdx, Manifest};

impl ChunkStore {
    /// Reads image bytes at `offset`; the caller has checked that the chunks are present. On an
    /// I/O error, or a chunk that is no longer present or fails its check, the chunks read are
    /// forgotten (the next read fetches them again) and an error returned.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        let bytes = self.read_vec(offset, buf.len())?;
        buf.copy_from_slice(&bytes);
        Ok(())
    }

    /// Reads `len` image bytes at `offset` into a new buffer, checked as [`ChunkStore::read_at`]
    /// says. Durable chunks are read as they are; chunks not durable yet are taken from their
    /// kept bytes, or read whole and checked against the manifest.
    pub fn read_vec(&self, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
        let range = self.geometry.chunks_covering(crate::image::ByteOffset(offset), len as u64);
        let _reading = self.reading.read().unwrap();
        let unsettled: Vec<(u32, Option<Bytes>)> = {
            let p = self.presence.read().unwrap();
            if p.readable.range_cardinality(range.clone()) != u64::from(range.end - range.start) {
                return Err(std::io::Error::other("chunks left the cache during the read"));
            }
            if let Some(bytes) = self.kept_slice(&p, offset, len, range.clone()) {
                return Ok(bytes.into());
            }
            // Usually none: a cardinality check keeps the hot path from walking the set.
            if p.unsettled.range_cardinality(range.clone()) == 0 {
                Vec::new()
            } else {
                range
                    .clone()
                    .filter(|i| p.unsettled.contains(*i))
                    .map(|i| (i, p.kept(i).map(|k| k.bytes.clone())))
                    .collect()
            }
        };
        if unsettled.is_empty() {
            self.file().read_vec(offset, len).inspect_err(|_| self.read_failed(range))
        } else {
            self.read_checked(offset, len, range, &unsettled)
        }
    }

    /// The bytes of `[offset, offset + len)` if every chunk of it is unsettled with its bytes
    /// kept (see `presence`): no read, no check, shared rather than copied when one chunk holds
    /// them. `None` otherwise: then read the cache.
    pub fn read_kept(&self, offset: u64, len: usize) -> Option<Bytes> {
        let range = self.geometry.chunks_covering(crate::image::ByteOffset(offset), len as u64);
        let p = self.presence.read().unwrap();
        self.kept_slice(&p, offset, len, range)
    }

    fn kept_slice(&self, p: &Presence, offset: u64, len: usize, range: std::ops::Range<u32>) -> Option<Bytes> {
        if range.is_empty() || p.kept(range.end - 1).is_none() || p.kept(range.start).is_none() {
            return None;
        }
        let g = self.geometry;
        let end = offset.checked_add(len as u64)?;
        let piece = |i: u32| -> Option<(Bytes, usize)> {
            let c = ChunkIdx(i);
            let at = g.chunk_offset(c).0;
            let (from, to) = (offset.max(at), end.min(at + g.chunk_len(c) as u64));
            let (a, b) = (from.checked_sub(at)? as usize, to.checked_sub(at)? as usize);
            let k = p.kept(i)?;
            (a <= b && b <= k.bytes.len()).then(|| (k.bytes.slice(a..b), k.pins))
        };
        let bytes = if range.len() == 1 {
            let (bytes, pins) = piece(range.start)?;
            // A small reply of a long shared buffer gets a copy (see `presence::Kept::pins`).
            if bytes.len() * 2 >= pins {
                bytes
            } else {
                Bytes::copy_from_slice(&bytes)
            }
        } else {
            let mut out = Vec::with_capacity(len.min(super::KEEP_MAX));
            for i in range {
                out.extend_from_slice(&piece(i)?.0);
            }
            Bytes::from(out)
        };
        if bytes.len() != len {
            return None;
        }
        self.stats.kept_reads.fetch_add(1, Ordering::Relaxed);
        Some(bytes)
    }

    /// Reads the whole chunks of `range` and returns the `len` bytes at `offset`; of the
    /// `suspects` among them (not durable yet), those with kept bytes are taken from them and
    /// the others checked against the manifest.
    fn read_checked(
        &self,
        offset: u64,
        len: usize,
        range: std::ops::Range<u32>,
        suspects: &[(u32, Option<Bytes>)],
    ) -> std::io::Result<Vec<u8>> {
        let (start, total) = self.geometry.run_bytes(range.clone()).ok_or(std::io::ErrorKind::InvalidInput)?;
        let mut whole = self.file().read_vec(start.0, total).inspect_err(|_| self.read_failed(range))?;
        for (i, kept) in suspects {
            let idx = ChunkIdx(*i);
            let at = (self.geometry.chunk_offset(idx).0 - start.0) as usize;
            let chunk = &mut whole[at..at + self.geometry.chunk_len(idx)];
            match kept {
                Some(bytes) if bytes.len() == chunk.len() => chunk.copy_from_slice(bytes),
                _ if self.manifest.verify(idx, chunk) => {}
                _ => {
                    self.stats.read_errors.fetch_add(1, Ordering::Relaxed);
                    self.forget(*i..*i + 1);
                    tracing::error!(cache = %self.dir.display(), %idx, "cached chunk lost before it was durable; fetching it again");
                    return Err(std::io::Error::other(format!("{idx} lost before it was durable")));
                }
            }
        }
        // In place: a long read must not cost twice its length.
        let from = (offset - start.0) as usize;
        whole.copy_within(from..from + len, 0);
        whole.truncate(len);
        Ok(whole)
    }

    /// After a failed read of `range`: forgets the chunks that fail when read one by one (one bad
    /// sector must not cost a whole long read's chunks), or all of them if none does.
    fn read_failed(&self, range: std::ops::Range<u32>) {
        self.stats.read_errors.fetch_add(1, Ordering::Relaxed);
        let file = self.file();
        let bad: Vec<u32> = if range.len() > 1 {
            range
                .clone()
                .filter(|&i| {
                    let idx = ChunkIdx(i);
                    file.read_vec(self.geometry.chunk_offset(idx).0, self.geometry.chunk_len(idx)).is_err()
                })
                .collect()
        } else {
            Vec::new()
        };
        if bad.is_empty() {
            self.forget(range);
        } else {
            for i in bad {
                self.forget(i..i + 1);
            }
        }
    }

    /// [`ChunkStore::read_vec`] only if it can be done at once, on the calling (runtime) thread:
    /// every chunk durable and every byte in the page cache. `None` otherwise, or on any error:
    /// then call `read_vec` on the blocking pool.
    pub fn read_vec_nowait(&self, offset: u64, len: usize) -> Option<Vec<u8>> {
        let range = self.geometry.chunks_covering(crate::image::ByteOffset(offset), len as u64);
        // An eviction in progress: not worth waiting for on a runtime thread.
        let _reading = self.reading.try_read().ok()?;
        {
            let p = self.presence.read().unwrap();
            let n = u64::from(range.end - range.start);
            if p.readable.range_cardinality(range.clone()) != n || p.unsettled.range_cardinality(range) != 0 {
                return None;
            }
        }
        self.file().read_nowait(offset, len)
    }

    /// Reads every present chunk and checks it against `manifest`; chunks that fail are
    /// forgotten (fetched again when read). Blocks for as long as reading the cache takes.
    pub fn verify(&self, manifest: &Manifest) -> VerifyReport {
        let mut report = VerifyReport::default();
        for i in self.present() {
            let idx = ChunkIdx(i);
            let reading = self.reading.read().unwrap();
            if !self.has(idx) {
                continue; // evicted meanwhile
            }
            let ok = match self.file().read_vec(self.geometry.chunk_offset(idx).0, self.geometry.chunk_len(idx)) {
                Ok(bytes) => manifest.verify(idx, &bytes),
                Err(_) => false,
            };
            drop(reading);
            report.checked += 1;
            if !ok {
                report.bad += 1;
                tracing::error!(cache = %self.dir.display(), %idx, "cached chunk fails verification; dropped");
                self.forget(i..i + 1);
            }
        }
        report
    }
}
