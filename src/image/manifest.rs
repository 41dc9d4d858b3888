//! The image manifest: per-chunk blake3 digests and the root digest that is the image's
//! identity. The cache is keyed by the root, so a changed image never meets a stale cache, and
//! every fetched chunk is checked against its digest before it is stored or served.
//!
//! The root commits to the chunk size, the image size and every chunk digest, in order.
//! Encoding (see FORMAT.md): magic, version, geometry, root, digests, crc32c trailer.

use std::fmt;
use std::path::Path;

use thiserror::Error;

use super::geometry::{ChunkIdx, ChunkSize, Geometry, GeometryError};
use crate::fsutil;

const MAGIC: &[u8; 8] = b"VMTMANF\0";
const VERSION: u16 = 1;
const HEADER_LEN: usize = 64;
const ROOT_DOMAIN: &[u8] = b"vmthunder manifest root v1";

/// Errors reading, decoding or building a manifest.
#[derive(Debug, Error)]
pub enum ManifestError {
    /// The file is shorter than a manifest header.
    #[error("manifest is truncated ({0} bytes)")]
    Truncated(usize),
    /// The file does not start with the manifest magic.
    #[error("not a vmthunder manifest (bad magic)")]
    BadMagic,
    /// The manifest was written by an unknown format version.
    #[error("unsupported manifest version {0}")]
    BadVersion(u16),
    /// The crc32c trailer does not match the content.
    #[error("manifest checksum mismatch (file corrupt)")]
    BadChecksum,
    /// The declared geometry is invalid.
    #[error("manifest geometry: {0}")]
    Geometry(#[from] GeometryError),
    /// The chunk count or length disagrees with the declared geometry.
    #[error("manifest declares {declared} chunks but the geometry needs {expected}")]
    ChunkCount { declared: u64, expected: u64 },
    /// The stored root does not match the digests.
    #[error("manifest root digest does not match its chunk digests")]
    BadRoot,
    /// Reading or writing the manifest file failed.
    #[error("manifest file {path}: {source}")]
    Io { path: String, source: std::io::Error },
}

/// A 32-byte blake3 digest.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(pub [u8; 32]);

impl Digest {
    pub fn of(data: &[u8]) -> Digest {
        Digest(*blake3::hash(data).as_bytes())
    }

    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    pub fn from_hex(s: &str) -> Option<Digest> {
        if s.len() != 64 || !s.is_ascii() {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, o) in out.iter_mut().enumerate() {
            *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
        }
        Some(Digest(out))
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({})", self.to_hex())
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// Per-chunk digests of one image plus its root digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    geometry: Geometry,
    digests: Vec<Digest>,
    root: Digest,
}

impl Manifest {
    /// Builds a manifest from chunk digests given in chunk order.
    pub fn from_digests(geometry: Geometry, digests: Vec<Digest>) -> Result<Self, ManifestError> {
        if digests.len() as u64 != u64::from(geometry.chunk_count()) {
            return Err(ManifestError::ChunkCount {
                declared: digests.len() as u64,
                expected: u64::from(geometry.chunk_count()),
            });
        }
        let root = root_of(&geometry, &digests);
        Ok(Manifest { geometry, digests, root })
    }

    /// Builds a manifest by reading the whole image through `read_chunk` (idx, buffer).
    pub fn build<E>(
        geometry: Geometry,
        mut read_chunk: impl FnMut(ChunkIdx, &mut [u8]) -> Result<(), E>,
    ) -> Result<Self, E> {
        let mut buf = vec![0u8; geometry.chunk_size().bytes() as usize];
        let mut digests = Vec::with_capacity(geometry.chunk_count() as usize);
        for i in 0..geometry.chunk_count() {
            let idx = ChunkIdx(i);
            let b = &mut buf[..geometry.chunk_len(idx)];
            read_chunk(idx, b)?;
            digests.push(Digest::of(b));
        }
        let root = root_of(&geometry, &digests);
        Ok(Manifest { geometry, digests, root })
    }

    pub fn geometry(&self) -> Geometry {
        self.geometry
    }

    pub fn root(&self) -> Digest {
        self.root
    }

    pub fn digest(&self, idx: ChunkIdx) -> Option<&Digest> {
        self.digests.get(idx.0 as usize)
    }

    /// True when `data` is exactly chunk `idx` of this image.
    pub fn verify(&self, idx: ChunkIdx, data: &[u8]) -> bool {
        data.len() == self.geometry.chunk_len(idx) && self.digest(idx) == Some(&Digest::of(data))
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + 32 * self.digests.len() + 4);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&0u16.to_le_bytes());
        out.extend_from_slice(&(self.geometry.chunk_size().bytes() as u32).to_le_bytes());
        out.extend_from_slice(&self.geometry.image_size().to_le_bytes());
        out.extend_from_slice(&(self.digests.len() as u64).to_le_bytes());
        out.extend_from_slice(&self.root.0);
        for d in &self.digests {
            out.extend_from_slice(&d.0);
        }
        fsutil::seal(out)
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, ManifestError> {
        let body = fsutil::open_sealed(bytes, MAGIC, VERSION, HEADER_LEN)?;
        let u32_at = |o: usize| u32::from_le_bytes(body[o..o + 4].try_into().unwrap());
        let u64_at = |o: usize| u64::from_le_bytes(body[o..o + 8].try_into().unwrap());
        let chunk = ChunkSize::new(u64::from(u32_at(12)))?;
        let geometry = Geometry::new(u64_at(16), chunk)?;
        let declared = u64_at(24);
        let expected = u64::from(geometry.chunk_count());
        let present = (body.len() - HEADER_LEN) as u64 / 32;
        if declared != expected || present != expected || (body.len() - HEADER_LEN) % 32 != 0 {
            return Err(ManifestError::ChunkCount { declared, expected });
        }
        let root = Digest(body[32..64].try_into().unwrap());
        let digests: Vec<Digest> = body[HEADER_LEN..].chunks_exact(32).map(|c| Digest(c.try_into().unwrap())).collect();
        let m = Manifest::from_digests(geometry, digests)?;
        if m.root != root {
            return Err(ManifestError::BadRoot);
        }
        Ok(m)
    }

    pub fn load(path: &Path) -> Result<Self, ManifestError> {
        let bytes =
            std::fs::read(path).map_err(|source| ManifestError::Io { path: path.display().to_string(), source })?;
        Self::decode(&bytes)
    }

    pub fn save(&self, path: &Path) -> Result<(), ManifestError> {
        fsutil::write_atomic(path, &self.encode(), 0o644)
            .map_err(|source| ManifestError::Io { path: path.display().to_string(), source })
    }
}

impl From<fsutil::SealError> for ManifestError {
    fn from(e: fsutil::SealError) -> Self {
        match e {
            fsutil::SealError::Truncated(n) => ManifestError::Truncated(n),
            fsutil::SealError::BadMagic => ManifestError::BadMagic,
            fsutil::SealError::BadVersion(v) => ManifestError::BadVersion(v),
            fsutil::SealError::BadChecksum => ManifestError::BadChecksum,
        }
    }
}

fn root_of(geometry: &Geometry, digests: &[Digest]) -> Digest {
    let mut h = blake3::Hasher::new();
    h.update(ROOT_DOMAIN);
    h.update(&geometry.chunk_size().bytes().to_le_bytes());
    h.update(&geometry.image_size().to_le_bytes());
    for d in digests {
        h.update(&d.0);
    }
    Digest(*h.finalize().as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample(size: u64) -> (Vec<u8>, Manifest) {
        let data: Vec<u8> = (0..size).map(|i| (i * 7 % 251) as u8).collect();
        let g = Geometry::new(size, ChunkSize::new(4096).unwrap()).unwrap();
        let m = Manifest::build(g, |idx, buf| {
            let o = g.chunk_offset(idx).0 as usize;
            buf.copy_from_slice(&data[o..o + buf.len()]);
            Ok::<_, ()>(())
        })
        .unwrap();
        (data, m)
    }

    #[test]
    fn roundtrip_and_verify() {
        let (data, m) = sample(10_000);
        let back = Manifest::decode(&m.encode()).unwrap();
        assert_eq!(back, m);
        assert!(m.verify(ChunkIdx(2), &data[8192..]));
        assert!(!m.verify(ChunkIdx(1), &data[8192..]));
        let mut bad = data[..4096].to_vec();
        bad[7] ^= 1;
        assert!(!m.verify(ChunkIdx(0), &bad));
    }

    #[test]
    fn root_depends_on_content_and_geometry() {
        let (_, a) = sample(10_000);
        let (_, b) = sample(10_001);
        assert_ne!(a.root(), b.root());
    }

    #[test]
    fn rejects_corruption() {
        let (_, m) = sample(10_000);
        let enc = m.encode();
        assert!(matches!(Manifest::decode(&enc[..20]), Err(ManifestError::Truncated(_))));
        let mut bad = enc.clone();
        bad[0] = b'X';
        assert!(matches!(Manifest::decode(&bad), Err(ManifestError::BadMagic)));
        let mut bad = enc.clone();
        bad[100] ^= 1;
        assert!(matches!(Manifest::decode(&bad), Err(ManifestError::BadChecksum)));
        assert!(Manifest::decode(&enc[..enc.len() - 1]).is_err());
    }

    #[test]
    fn hex_roundtrip() {
        let d = Digest::of(b"x");
        assert_eq!(Digest::from_hex(&d.to_hex()), Some(d));
        assert_eq!(Digest::from_hex("zz"), None);
    }

    proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = Manifest::decode(&bytes);
        }
    }
}
