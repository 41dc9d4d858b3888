//! Image identity: the chunk grid ([`geometry`]) and the content manifest ([`manifest`]).

pub mod bitmap;
pub mod geometry;
pub mod manifest;

pub use geometry::{ByteOffset, ChunkIdx, ChunkSize, Geometry, GeometryError};
pub use manifest::{Digest, Manifest, ManifestError};
