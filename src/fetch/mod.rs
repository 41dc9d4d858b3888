//! Where chunks come from when the node cache misses.
//!
//! ```text
//!   flight::Fetcher ──(single flight, coalesced runs, bounded retries)──▶ dyn ChunkSource
//!                                                                        ├─ file::FileSource
//!                                                                        ├─ nbd::client::NbdClient
//!                                                                        └─ iscsi::initiator::IscsiClient
//! ```
//! [`ChunkSource`] is the one seam every origin (and later every peer) plugs into: read bytes
//! at an offset. Verification and storing happen above it, in [`flight`].

pub mod file;
pub mod flight;
pub mod origin;
pub mod slots;

use std::future::Future;
use std::pin::Pin;

use thiserror::Error;

use crate::image::{ChunkIdx, ChunkSize, Geometry, Manifest};

/// A boxed future, so that sources can sit behind `dyn ChunkSource`.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Where a streaming read ([`ChunkSource::read_streaming`]) hands on its first chunks as they
/// arrive, before the read ends: `(chunks, their bytes)`, whole chunks already checked against
/// the image's manifest, in order within one attempt (a source that gives up on one peer and
/// asks another starts again from the beginning; the receiver skips what it has).
pub type Progress<'a> = &'a (dyn Fn(std::ops::Range<u32>, bytes::Bytes) + Send + Sync);

/// Errors of one read from a source. Cloneable: one failure is handed to every waiter.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum SourceError {
    /// The source could not be reached or the connection broke.
    #[error("{what} unreachable: {reason}")]
    Unreachable { what: String, reason: String },
    /// The source answered with an error code.
    #[error("{what} answered error {errno} for {len} bytes at {offset}")]
    Remote { what: String, errno: u32, offset: u64, len: usize },
    /// The source refused us access (login or authentication failure).
    #[error("{what} refused the login: {reason}")]
    Refused { what: String, reason: String },
    /// The source broke its protocol.
    #[error("{what}: protocol error: {reason}")]
    Protocol { what: String, reason: String },
    /// The read lies beyond the source's end.
    #[error("{what}: read of {len} bytes at {offset} is beyond its size {size}")]
    OutOfRange { what: String, offset: u64, len: usize, size: u64 },
    /// A local I/O error.
    #[error("{what}: {reason}")]
    Io { what: String, reason: String },
}

/// A place that can read bytes of an image: an origin or a peer.
pub trait ChunkSource: Send + Sync + 'static {
    /// A short description for logs and errors (no secrets).
    fn describe(&self) -> String;
    /// The image size in bytes (may connect to learn it).
    fn size(&self) -> BoxFuture<'_, Result<u64, SourceError>>;
    /// Reads exactly `len` bytes at `offset`.
    fn read(&self, offset: u64, len: usize) -> BoxFuture<'_, Result<Vec<u8>, SourceError>>;
    /// Like [`ChunkSource::read`], also saying whether the bytes were already checked against
    /// this image's manifest (by a source that verifies what it relays), so the fetcher need
    /// not hash them again.
    fn read_checked(&self, offset: u64, len: usize) -> BoxFuture<'_, Result<(Vec<u8>, bool), SourceError>> {
        Box::pin(async move { self.read(offset, len).await.map(|d| (d, false)) })
    }
    /// [`ChunkSource::read_checked`] on behalf of `priority`: a source with queues of its own
    /// (the peer-aware source's origin slots) serves guest and relay reads before prefetch.
    fn read_checked_as(
        &self,
        offset: u64,
        len: usize,
        priority: flight::Priority,
    ) -> BoxFuture<'_, Result<(Vec<u8>, bool), SourceError>> {
        let _ = priority;
        self.read_checked(offset, len)
    }
    /// [`ChunkSource::read_checked_as`], handing on the first chunks as they arrive (a relay
    /// up the tree that cuts through): the fetcher's waiters get them before the read ends.
    /// Sources that read all at once ignore `progress`.
    fn read_streaming<'a>(
        &'a self,
        offset: u64,
        len: usize,
        priority: flight::Priority,
        progress: Progress<'a>,
    ) -> BoxFuture<'a, Result<(Vec<u8>, bool), SourceError>> {
        let _ = progress;
        self.read_checked_as(offset, len, priority)
    }
    /// Whether a read may wait on other nodes' fetches (a peer-aware source). The fetcher then
    /// holds no upstream slot across reads: slots held while waiting on peers that hold slots
    /// while waiting on us would deadlock.
    fn waits_on_peers(&self) -> bool {
        false
    }
    /// A chunk index multiple that coalesced runs must not cross (a peer-aware source's stripe:
    /// a run spanning two stripes would make a relay of one wait on the tree of the other, and
    /// waits between trees can form cycles).
    fn run_boundary(&self) -> Option<u32> {
        None
    }
    /// Ends any session politely (an iSCSI logout); reads after it reconnect. Sources without
    /// sessions need not implement it.
    fn close(&self) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }
}

/// Builds the manifest of the image behind `source` by reading it once, in large reads.
pub async fn build_manifest(source: &dyn ChunkSource, chunk: ChunkSize) -> Result<Manifest, BuildError> {
    let size = source.size().await?;
    let geometry = Geometry::new(size, chunk)?;
    let per_read = (8u64 << 20).max(chunk.bytes()) / chunk.bytes();
    let mut digests = Vec::with_capacity(geometry.chunk_count() as usize);
    let mut next = 0u32;
    while next < geometry.chunk_count() {
        let last = (u64::from(next) + per_read).min(u64::from(geometry.chunk_count())) as u32;
        let offset = geometry.chunk_offset(ChunkIdx(next)).0;
        let end = geometry.chunk_offset(ChunkIdx(last - 1)).0 + geometry.chunk_len(ChunkIdx(last - 1)) as u64;
        let data = source.read(offset, (end - offset) as usize).await?;
        let hashed = tokio::task::spawn_blocking(move || {
            data.chunks(chunk.bytes() as usize).map(crate::image::Digest::of).collect::<Vec<_>>()
        })
        .await
        .map_err(|e| BuildError::Source(SourceError::Io { what: "hashing".into(), reason: e.to_string() }))?;
        digests.extend(hashed);
        next = last;
    }
    Ok(Manifest::from_digests(geometry, digests)?)
}

/// Errors building a manifest from a source.
#[derive(Debug, Error)]
pub enum BuildError {
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error("origin geometry: {0}")]
    Geometry(#[from] crate::image::GeometryError),
    #[error(transparent)]
    Manifest(#[from] crate::image::ManifestError),
}
