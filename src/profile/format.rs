//! Boot profiles: which chunks an image's boot reads, in what order and by when.
//!
//! A profile lists, for every chunk a boot touched, its *deadline* (earliest first-touch time
//! after the boot's first read, over all merged boots), how many merged boots touched it, and how
//! many of the latest boots did not (so chunks a changed boot no longer reads age out). Entries
//! are kept in first-touch order: deadline, then recorded order. The file also carries one roaring
//! bitmap per time bucket, so a reader can take "everything needed in the first N seconds"
//! without decoding the order.
//!
//! File (see FORMAT.md): fixed header (magic, version, image identity, chunk size, boots, bucket
//! width), a postcard body (order delta-encoded as zigzag varints, deadlines delta-encoded,
//! counts, misses, buckets), crc32c trailer. Decoding checks every chunk against the image.

use roaring::RoaringBitmap;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::fsutil;
use crate::image::{Digest, Geometry};

const MAGIC: &[u8; 8] = b"VMTPROF\0";
const VERSION: u16 = 1;
const HEADER_LEN: usize = 72;
/// Profiles larger than this are refused before decoding.
pub const MAX_PROFILE_BYTES: usize = 64 << 20;
/// Width of a time bucket.
pub const BUCKET_MS: u32 = 1000;

/// Errors decoding or combining profiles.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ProfileError {
    #[error("profile is truncated ({0} bytes)")]
    Truncated(usize),
    #[error("profile of {0} bytes exceeds the {MAX_PROFILE_BYTES}-byte limit")]
    TooBig(usize),
    #[error("not a vmthunder profile (bad magic)")]
    BadMagic,
    #[error("unsupported profile version {0}")]
    BadVersion(u16),
    #[error("profile checksum mismatch (file corrupt)")]
    BadChecksum,
    #[error("profile body is malformed: {0}")]
    Malformed(String),
    #[error("profile is for image {found}, not {want}")]
    OtherImage { found: String, want: String },
    #[error("profile geometry ({found_size} bytes, chunk {found_chunk}) does not match the image ({want_size} bytes, chunk {want_chunk})")]
    Geometry { found_size: u64, found_chunk: u64, want_size: u64, want_chunk: u64 },
    #[error("profile names chunk {0}, beyond the image's {1} chunks")]
    ChunkOutOfRange(u32, u32),
    #[error("profile names chunk {0} twice")]
    Duplicate(u32),
}

/// One chunk of a profile.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub chunk: u32,
    /// Milliseconds after the boot's first read by which the chunk was first needed.
    pub deadline_ms: u32,
    /// Merged boots that touched the chunk.
    pub count: u32,
    /// Latest merged boots in a row that did not touch it.
    pub misses: u32,
}

/// A boot profile of one image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Profile {
    pub root: Digest,
    pub image_size: u64,
    pub chunk_size: u64,
    /// Boots merged into this profile.
    pub boots: u32,
    /// In first-touch order.
    pub entries: Vec<Entry>,
}

#[derive(Serialize, Deserialize)]
struct Body {
    /// Chunk index deltas from the previous entry, zigzag-encoded.
    order: Vec<u64>,
    /// Deadline deltas from the previous entry (deadlines never decrease along the order).
    deadlines: Vec<u32>,
    counts: Vec<u32>,
    misses: Vec<u32>,
    /// (bucket index, serialized roaring bitmap of chunks whose deadline falls in it).
    buckets: Vec<(u32, Vec<u8>)>,
}

impl From<fsutil::SealError> for ProfileError {
    fn from(e: fsutil::SealError) -> Self {
        match e {
            fsutil::SealError::Truncated(n) => ProfileError::Truncated(n),
            fsutil::SealError::BadMagic => ProfileError::BadMagic,
            fsutil::SealError::BadVersion(v) => ProfileError::BadVersion(v),
            fsutil::SealError::BadChecksum => ProfileError::BadChecksum,
        }
    }
}

fn zigzag(d: i64) -> u64 {
    ((d << 1) ^ (d >> 63)) as u64
}

fn unzigzag(z: u64) -> i64 {
    ((z >> 1) as i64) ^ -((z & 1) as i64)
}

impl Profile {
    /// A profile of one boot from its first touches `(chunk, ms)`, in the order they happened.
    pub fn from_touches(root: Digest, geometry: &Geometry, touches: &[(u32, u32)]) -> Profile {
        let mut seen = RoaringBitmap::new();
        let mut entries = Vec::with_capacity(touches.len());
        for &(chunk, ms) in touches {
            if seen.insert(chunk) {
                entries.push(Entry { chunk, deadline_ms: ms, count: 1, misses: 0 });
            }
        }
        let mut p = Profile {
            root,
            image_size: geometry.image_size(),
            chunk_size: geometry.chunk_size().bytes(),
            boots: 1,
            entries,
        };
        p.sort();
        p
    }

    fn sort(&mut self) {
        // Stable: equal deadlines keep their recorded order.
        self.entries.sort_by_key(|e| e.deadline_ms);
    }

    /// Merges `newer` (more recent boots) into this profile: union of chunks, counts added,
    /// earliest deadline kept; a chunk `newer` lacks gains `newer.boots` misses and is dropped
    /// once it has missed `age_out` boots in a row (0 keeps everything).
    pub fn merge(&self, newer: &Profile, age_out: u32) -> Result<Profile, ProfileError> {
        if self.root != newer.root {
            return Err(ProfileError::OtherImage { found: newer.root.to_hex(), want: self.root.to_hex() });
        }
        if (self.image_size, self.chunk_size) != (newer.image_size, newer.chunk_size) {
            return Err(ProfileError::Geometry {
                found_size: newer.image_size,
                found_chunk: newer.chunk_size,
                want_size: self.image_size,
                want_chunk: self.chunk_size,
            });
        }
        let mut by_chunk: std::collections::HashMap<u32, Entry> = newer.entries.iter().map(|e| (e.chunk, *e)).collect();
        let mut entries: Vec<Entry> = newer.entries.clone();
        for old in &self.entries {
            match by_chunk.get_mut(&old.chunk) {
                Some(n) => {
                    n.deadline_ms = n.deadline_ms.min(old.deadline_ms);
                    n.count = n.count.saturating_add(old.count);
                }
                None => {
                    let misses = old.misses.saturating_add(newer.boots);
                    if age_out == 0 || misses < age_out {
                        by_chunk.insert(old.chunk, Entry { misses, ..*old });
                        entries.push(Entry { misses, ..*old });
                    }
                }
            }
        }
        for e in &mut entries {
            *e = by_chunk[&e.chunk];
        }
        let mut p = Profile {
            root: self.root,
            image_size: self.image_size,
            chunk_size: self.chunk_size,
            boots: self.boots.saturating_add(newer.boots),
            entries,
        };
        p.sort();
        Ok(p)
    }

    /// Total bytes of the chunks in the profile.
    pub fn bytes(&self) -> u64 {
        match crate::image::ChunkSize::new(self.chunk_size).and_then(|c| Geometry::new(self.image_size, c)) {
            Ok(g) => self.entries.iter().map(|e| g.chunk_len(crate::image::ChunkIdx(e.chunk)) as u64).sum(),
            Err(_) => 0,
        }
    }

    /// Chunks per time bucket: (bucket start in ms, chunks whose deadline falls in it).
    pub fn buckets(&self) -> Vec<(u32, RoaringBitmap)> {
        let mut out: Vec<(u32, RoaringBitmap)> = Vec::new();
        for e in &self.entries {
            let b = e.deadline_ms / BUCKET_MS;
            match out.last_mut() {
                Some((idx, bm)) if *idx == b => {
                    bm.insert(e.chunk);
                }
                _ => out.push((b, [e.chunk].into_iter().collect())),
            }
        }
        out.into_iter().map(|(b, bm)| (b * BUCKET_MS, bm)).collect()
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut prev_chunk = 0i64;
        let mut prev_deadline = 0u32;
        let mut body = Body { order: vec![], deadlines: vec![], counts: vec![], misses: vec![], buckets: vec![] };
        for e in &self.entries {
            body.order.push(zigzag(i64::from(e.chunk) - prev_chunk));
            body.deadlines.push(e.deadline_ms - prev_deadline);
            body.counts.push(e.count);
            body.misses.push(e.misses);
            prev_chunk = i64::from(e.chunk);
            prev_deadline = e.deadline_ms;
        }
        for (start, bm) in self.buckets() {
            let mut bytes = Vec::with_capacity(bm.serialized_size());
            bm.serialize_into(&mut bytes).expect("writing to a Vec cannot fail");
            body.buckets.push((start / BUCKET_MS, bytes));
        }
        let body = postcard::to_allocvec(&body).expect("profile bodies always serialize");
        let mut out = Vec::with_capacity(HEADER_LEN + body.len() + 4);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&0u16.to_le_bytes());
        out.extend_from_slice(&(self.chunk_size as u32).to_le_bytes());
        out.extend_from_slice(&self.image_size.to_le_bytes());
        out.extend_from_slice(&self.root.0);
        out.extend_from_slice(&self.boots.to_le_bytes());
        out.extend_from_slice(&BUCKET_MS.to_le_bytes());
        out.extend_from_slice(&(self.entries.len() as u32).to_le_bytes());
        out.extend_from_slice(&(body.len() as u32).to_le_bytes());
        out.extend_from_slice(&body);
        fsutil::seal(out)
    }

    /// Decodes a profile file on its own (chunks checked against the geometry it declares).
    pub fn decode(bytes: &[u8]) -> Result<Profile, ProfileError> {
        if bytes.len() > MAX_PROFILE_BYTES {
            return Err(ProfileError::TooBig(bytes.len()));
        }
        let b = fsutil::open_sealed(bytes, MAGIC, VERSION, HEADER_LEN)?;
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
        let chunk_size = u64::from(u32_at(12));
        let image_size = u64::from_le_bytes(b[16..24].try_into().unwrap());
        let root = Digest(b[24..56].try_into().unwrap());
        let boots = u32_at(56);
        let bucket_ms = u32_at(60);
        let count = u32_at(64) as usize;
        let body_len = u32_at(68) as usize;
        let bad = |m: &str| ProfileError::Malformed(m.to_string());
        if b.len() != HEADER_LEN + body_len {
            return Err(bad("body length does not match the header"));
        }
        if bucket_ms != BUCKET_MS {
            return Err(bad("unsupported bucket width"));
        }
        let g = crate::image::ChunkSize::new(chunk_size)
            .and_then(|c| Geometry::new(image_size, c))
            .map_err(|e| ProfileError::Malformed(e.to_string()))?;
        let body: Body = postcard::from_bytes(&b[HEADER_LEN..]).map_err(|e| ProfileError::Malformed(e.to_string()))?;
        if [body.order.len(), body.deadlines.len(), body.counts.len(), body.misses.len()].iter().any(|&l| l != count) {
            return Err(bad("column lengths disagree"));
        }
        let mut entries = Vec::with_capacity(count);
        let mut seen = RoaringBitmap::new();
        let (mut chunk, mut deadline) = (0i64, 0u32);
        for i in 0..count {
            chunk = chunk.checked_add(unzigzag(body.order[i])).ok_or_else(|| bad("chunk delta overflows"))?;
            deadline = deadline.checked_add(body.deadlines[i]).ok_or_else(|| bad("deadline overflows"))?;
            let c = u32::try_from(chunk).map_err(|_| bad("negative chunk index"))?;
            if c >= g.chunk_count() {
                return Err(ProfileError::ChunkOutOfRange(c, g.chunk_count()));
            }
            if !seen.insert(c) {
                return Err(ProfileError::Duplicate(c));
            }
            entries.push(Entry { chunk: c, deadline_ms: deadline, count: body.counts[i], misses: body.misses[i] });
        }
        let p = Profile { root, image_size, chunk_size, boots, entries };
        // The buckets must say exactly what the order says.
        let mut want = p.buckets().into_iter();
        for (idx, bytes) in &body.buckets {
            let bm = RoaringBitmap::deserialize_from(&bytes[..]).map_err(|_| bad("bucket bitmap malformed"))?;
            match want.next() {
                Some((start, w)) if start / BUCKET_MS == *idx && w == bm => {}
                _ => return Err(bad("time buckets disagree with the order")),
            }
        }
        if want.next().is_some() {
            return Err(bad("time buckets missing"));
        }
        Ok(p)
    }

    /// Decodes a profile and checks that it belongs to the image (`root`, `geometry`).
    pub fn decode_for(bytes: &[u8], root: &Digest, geometry: &Geometry) -> Result<Profile, ProfileError> {
        let p = Profile::decode(bytes)?;
        if p.root != *root {
            return Err(ProfileError::OtherImage { found: p.root.to_hex(), want: root.to_hex() });
        }
        if p.image_size != geometry.image_size() || p.chunk_size != geometry.chunk_size().bytes() {
            return Err(ProfileError::Geometry {
                found_size: p.image_size,
                found_chunk: p.chunk_size,
                want_size: geometry.image_size(),
                want_chunk: geometry.chunk_size().bytes(),
            });
        }
        Ok(p)
    }

    /// The file name of the profile of image `root` inside the profile directory.
    pub fn file_name(root: &Digest) -> String {
        format!("{}.profile", root.to_hex())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::ChunkSize;
    use proptest::prelude::*;

    fn geo() -> Geometry {
        Geometry::new(100 * 65536 + 5, ChunkSize::new(65536).unwrap()).unwrap()
    }

    fn boot(touches: &[(u32, u32)]) -> Profile {
        Profile::from_touches(Digest::of(b"img"), &geo(), touches)
    }

    #[test]
    fn roundtrip_orders_by_deadline() {
        let p = boot(&[(5, 0), (6, 0), (2, 1500), (5, 1600), (100, 2500)]);
        assert_eq!(p.entries.iter().map(|e| e.chunk).collect::<Vec<_>>(), vec![5, 6, 2, 100]);
        assert_eq!(p.bytes(), 3 * 65536 + 5);
        let back = Profile::decode(&p.encode()).unwrap();
        assert_eq!(back, p);
        assert_eq!(
            p.buckets().iter().map(|(s, b)| (*s, b.len())).collect::<Vec<_>>(),
            vec![(0, 2), (1000, 1), (2000, 1)]
        );
    }

    #[test]
    fn merge_counts_deadlines_and_ages_out() {
        let a = boot(&[(1, 0), (2, 500), (3, 900)]);
        let b = boot(&[(2, 100), (4, 200)]);
        let m = a.merge(&b, 3).unwrap();
        assert_eq!(m.boots, 2);
        let e = |c| *m.entries.iter().find(|e| e.chunk == c).unwrap();
        assert_eq!((e(2).deadline_ms, e(2).count, e(2).misses), (100, 2, 0));
        assert_eq!((e(1).count, e(1).misses), (1, 1));
        let m = m.merge(&b, 3).unwrap().merge(&b, 3).unwrap();
        assert!(m.entries.iter().all(|e| e.chunk != 1 && e.chunk != 3), "aged out after 3 missed boots");
        let other = Profile::from_touches(Digest::of(b"other"), &geo(), &[(1, 0)]);
        assert!(matches!(a.merge(&other, 3), Err(ProfileError::OtherImage { .. })));
    }

    #[test]
    fn refuses_foreign_and_corrupt() {
        let p = boot(&[(1, 0), (2, 10)]);
        let enc = p.encode();
        assert!(matches!(Profile::decode_for(&enc, &Digest::of(b"x"), &geo()), Err(ProfileError::OtherImage { .. })));
        let small = Geometry::new(65536, ChunkSize::new(65536).unwrap()).unwrap();
        assert!(matches!(Profile::decode_for(&enc, &p.root, &small), Err(ProfileError::Geometry { .. })));
        assert!(matches!(Profile::decode(&enc[..40]), Err(ProfileError::Truncated(_))));
        let mut bad = enc.clone();
        bad[80] ^= 1;
        assert_eq!(Profile::decode(&bad), Err(ProfileError::BadChecksum));
        let beyond = Profile { entries: vec![Entry { chunk: 5000, deadline_ms: 0, count: 1, misses: 0 }], ..p.clone() };
        assert!(matches!(Profile::decode(&beyond.encode()), Err(ProfileError::ChunkOutOfRange(5000, 101))));
        assert!(matches!(Profile::decode(&vec![0u8; MAX_PROFILE_BYTES + 1]), Err(ProfileError::TooBig(_))));
    }

    proptest! {
        #[test]
        fn roundtrip_any(touches in proptest::collection::vec((0u32..101, 0u32..100_000), 0..300)) {
            let mut t = touches;
            t.sort_by_key(|x| x.1);
            let p = boot(&t);
            prop_assert_eq!(Profile::decode(&p.encode()).unwrap(), p);
        }

        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = Profile::decode(&bytes);
        }

        #[test]
        fn decode_of_resealed_garbage_body_never_panics(body in proptest::collection::vec(any::<u8>(), 0..200)) {
            let mut enc = boot(&[(1, 0)]).encode();
            enc.truncate(HEADER_LEN);
            enc[68..72].copy_from_slice(&(body.len() as u32).to_le_bytes());
            enc.extend_from_slice(&body);
            let _ = Profile::decode(&fsutil::seal(enc));
        }
    }
}
