//! The presence map's on-disk form: which chunks of the data file hold verified, durable data.
//!
//! Layout (see FORMAT.md): magic, version, flags, chunk size, image size, root digest, the
//! roaring bitmap's portable serialization, crc32c trailer. A state file names the image it
//! belongs to, so a cache directory can never be served for another image or geometry.

use roaring::RoaringBitmap;
use thiserror::Error;

use crate::fsutil;
use crate::image::{Digest, Geometry};

const MAGIC: &[u8; 8] = b"VMTSTAT\0";
const VERSION: u16 = 1;
const HEADER_LEN: usize = 60;

/// Errors decoding a state file.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum StateError {
    /// Shorter than the fixed header.
    #[error("state file is truncated ({0} bytes)")]
    Truncated(usize),
    /// Not a vmthunder state file.
    #[error("not a vmthunder cache state file (bad magic)")]
    BadMagic,
    /// Written by an unknown format version.
    #[error("unsupported cache state version {0}")]
    BadVersion(u16),
    /// The crc32c trailer does not match.
    #[error("cache state checksum mismatch (file corrupt)")]
    BadChecksum,
    /// The bitmap bytes do not decode.
    #[error("cache state bitmap is malformed")]
    BadBitmap,
    /// The file belongs to another image or geometry.
    #[error("cache state is for image {found} ({found_size} bytes, chunk {found_chunk}), not {want} ({want_size} bytes, chunk {want_chunk})")]
    Mismatch { found: String, found_size: u64, found_chunk: u64, want: String, want_size: u64, want_chunk: u64 },
    /// The bitmap names a chunk beyond the image.
    #[error("cache state marks chunk {0} present but the image has {1} chunks")]
    OutOfRange(u32, u32),
}

impl From<fsutil::SealError> for StateError {
    fn from(e: fsutil::SealError) -> Self {
        match e {
            fsutil::SealError::Truncated(n) => StateError::Truncated(n),
            fsutil::SealError::BadMagic => StateError::BadMagic,
            fsutil::SealError::BadVersion(v) => StateError::BadVersion(v),
            fsutil::SealError::BadChecksum => StateError::BadChecksum,
        }
    }
}

/// Encodes the presence bitmap of the image (`geometry`, `root`).
pub fn encode(geometry: &Geometry, root: &Digest, present: &RoaringBitmap) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + present.serialized_size() + 4);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&(geometry.chunk_size().bytes() as u32).to_le_bytes());
    out.extend_from_slice(&geometry.image_size().to_le_bytes());
    out.extend_from_slice(&root.0);
    out.extend_from_slice(&(present.serialized_size() as u32).to_le_bytes());
    present.serialize_into(&mut out).expect("writing to a Vec cannot fail");
    fsutil::seal(out)
}

/// Decodes a state file and checks that it belongs to (`geometry`, `root`).
pub fn decode(bytes: &[u8], geometry: &Geometry, root: &Digest) -> Result<RoaringBitmap, StateError> {
    let body = fsutil::open_sealed(bytes, MAGIC, VERSION, HEADER_LEN)?;
    let chunk = u64::from(u32::from_le_bytes(body[12..16].try_into().unwrap()));
    let size = u64::from_le_bytes(body[16..24].try_into().unwrap());
    let found_root = Digest(body[24..56].try_into().unwrap());
    if found_root != *root || size != geometry.image_size() || chunk != geometry.chunk_size().bytes() {
        return Err(StateError::Mismatch {
            found: found_root.to_hex(),
            found_size: size,
            found_chunk: chunk,
            want: root.to_hex(),
            want_size: geometry.image_size(),
            want_chunk: geometry.chunk_size().bytes(),
        });
    }
    let len = u32::from_le_bytes(body[56..60].try_into().unwrap()) as usize;
    if body.len() != HEADER_LEN + len {
        return Err(StateError::BadBitmap);
    }
    let bitmap = crate::image::bitmap::decode(&body[HEADER_LEN..]).ok_or(StateError::BadBitmap)?;
    if let Some(max) = bitmap.max() {
        if max >= geometry.chunk_count() {
            return Err(StateError::OutOfRange(max, geometry.chunk_count()));
        }
    }
    Ok(bitmap)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::ChunkSize;
    use proptest::prelude::*;

    fn geo() -> Geometry {
        Geometry::new(1 << 20, ChunkSize::new(4096).unwrap()).unwrap()
    }

    #[test]
    fn roundtrip() {
        let root = Digest::of(b"img");
        let bm: RoaringBitmap = [1u32, 5, 255].into_iter().collect();
        let enc = encode(&geo(), &root, &bm);
        assert_eq!(decode(&enc, &geo(), &root).unwrap(), bm);
    }

    #[test]
    fn refuses_other_image_and_range() {
        let root = Digest::of(b"img");
        let enc = encode(&geo(), &root, &RoaringBitmap::new());
        assert!(matches!(decode(&enc, &geo(), &Digest::of(b"other")), Err(StateError::Mismatch { .. })));
        let small = Geometry::new(4096 * 4, ChunkSize::new(4096).unwrap()).unwrap();
        assert!(matches!(decode(&enc, &small, &root), Err(StateError::Mismatch { .. })));
        let bm: RoaringBitmap = [300u32].into_iter().collect();
        let enc = encode(&geo(), &root, &bm);
        assert_eq!(decode(&enc, &geo(), &root), Err(StateError::OutOfRange(300, 256)));
    }

    /// Found by fuzzing: a bitmap of one container of zero runs decoded, and writing the state
    /// back then panicked; containers out of key order hid a chunk beyond the image from the
    /// range check.
    #[test]
    fn refuses_non_canonical_bitmaps() {
        let root = Digest::of(b"img");
        let with_bitmap = |bm: &[u8]| {
            let mut enc = encode(&geo(), &root, &RoaringBitmap::new());
            enc.truncate(HEADER_LEN - 4);
            enc.extend((bm.len() as u32).to_le_bytes());
            enc.extend_from_slice(bm);
            fsutil::seal(enc)
        };
        let empty_run = [0x3b, 0x30, 0, 0, 1, 0, 0, 0, 0, 0, 0];
        assert_eq!(decode(&with_bitmap(&empty_run), &geo(), &root), Err(StateError::BadBitmap));
        // Containers 1 (chunk 65536) then 0 (chunk 3): max() said 3.
        let unsorted = [58, 48, 0, 0, 2, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 24, 0, 0, 0, 26, 0, 0, 0, 0, 0, 3, 0];
        assert_eq!(decode(&with_bitmap(&unsorted), &geo(), &root), Err(StateError::BadBitmap));
    }

    proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode(&bytes, &geo(), &Digest::of(b"img"));
        }

        #[test]
        fn any_single_flip_is_caught(pos in 0usize..80, bit in 0u8..8) {
            let root = Digest::of(b"img");
            let bm: RoaringBitmap = [3u32, 4].into_iter().collect();
            let mut enc = encode(&geo(), &root, &bm);
            let pos = pos % enc.len();
            enc[pos] ^= 1 << bit;
            prop_assert!(decode(&enc, &geo(), &root).is_err());
        }
    }
}
