//! The control protocol on `{run_dir}/control.sock` (root only): framed, versioned JSON
//! requests and responses, one response per request, in order.
//!
//! Frame (see FORMAT.md): magic `VMTC`, version u16, flags u16, payload length u32, crc32c u32
//! of the payload, then the JSON payload. A frame with a bad magic, version, checksum or a
//! payload over [`MAX_FRAME`] ends the connection after an error response where possible.

use std::path::Path;
use std::time::Duration;

use serde::{de::DeserializeOwned, Deserialize, Serialize};
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::config::ImageConfig;

/// Where `vmt` and friends find vmtd with the default `run_dir`.
pub const DEFAULT_SOCKET: &str = "/run/vmthunder/control.sock";
pub const MAGIC: &[u8; 4] = b"VMTC";
pub const VERSION: u16 = 1;
pub const HEADER_LEN: usize = 16;
/// Largest payload accepted either way.
pub const MAX_FRAME: u32 = 16 << 20;

/// Errors of the control protocol.
#[derive(Debug, Error)]
pub enum ControlError {
    #[error("control socket: {0}")]
    Io(#[from] std::io::Error),
    #[error("control frame has a bad magic")]
    BadMagic,
    #[error("control protocol version {0} is not supported (this side speaks {VERSION})")]
    BadVersion(u16),
    #[error("control frame of {0} bytes exceeds the limit")]
    TooBig(u32),
    #[error("control frame checksum mismatch")]
    BadChecksum,
    #[error("control message malformed: {0}")]
    Json(String),
    #[error("no answer from vmtd within {0:?}")]
    Timeout(Duration),
    #[error("cannot reach vmtd at {path}: {source}")]
    Connect { path: String, source: std::io::Error },
    /// vmtd answered with an error.
    #[error("{0}")]
    Refused(String),
}

/// A request to the daemon.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Per-image counters and export paths.
    Status,
    /// Starts serving an image (not kept across restarts: put lasting images in the config).
    ImageAdd { image: ImageConfig },
    /// Stops serving an image; its cache stays on disk.
    ImageRemove { name: String },
    /// Readies the exports of `images` for domain `domain` and records its hold on them
    /// (sent by the libvirt hook before QEMU starts).
    Assemble { domain: String, images: Vec<String> },
    /// Drops every hold of `domain` (domain stopped or detached from vmthunder).
    Release { domain: String },
    /// Fetches every missing chunk of image `name` in the background, at most `rate` bytes/s
    /// (unlimited when absent), so the node stops needing the origin.
    Complete { name: String, rate: Option<u64> },
    /// Starts recording the boot profile of `image` for `duration_ms` (the configured
    /// `record_duration` when absent), on behalf of `domain` when given.
    RecordStart { image: String, duration_ms: Option<u64>, domain: Option<String> },
    /// Stops the recording of `image` and merges it into the image's profile.
    RecordStop { image: String },
    /// Prefetches `image` from its profile (or the profile file `profile`), at most `rate`
    /// bytes/s. Replaces a prefetch already running for the image.
    Prefetch { image: String, profile: Option<String>, rate: Option<u64> },
    /// Stops a running prefetch of `image`.
    PrefetchCancel { image: String },
    /// The profiles vmtd knows (loaded from `profile_dir`).
    ProfileList,
    /// Starts tracing every NBD request the export of `image` receives.
    TraceStart { image: String },
    /// Stops the trace of `image` and writes it as CSV to `path` (absolute), atomically.
    TraceStop { image: String, path: String },
    /// Reads every chunk of `image`'s cache and checks it against the manifest; chunks that
    /// fail are dropped (fetched again when read).
    CacheVerify { image: String },
    /// Every cache directory under `cache_dir`, with the node's usage against its budget.
    CacheList,
    /// Frees cache space down to `to` bytes (to the low watermark when absent; without a budget,
    /// only caches no image is served from go).
    CacheGc { to: Option<u64> },
    /// Pins (never evicted) or unpins the cache of `image`: a served image's name, or a prefix
    /// of at least 8 digits of a cache's digest.
    CachePin { image: String, pinned: bool },
}

/// The node's cache usage against its budget.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheUsage {
    /// Bytes the caches hold (allocated blocks of their data files).
    pub used: u64,
    /// The budget and its watermarks, when `[cache] max` is set.
    pub max: Option<u64>,
    pub high: Option<u64>,
    pub low: Option<u64>,
    /// Bytes served without caching because the budget was spent.
    pub refused_bytes: u64,
    /// The collector could not get under the high watermark: what is left is pinned or held.
    pub unreachable: bool,
}

/// One cache directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheEntry {
    pub digest: String,
    /// The image served from it, if any.
    pub image: Option<String>,
    /// `serving`, `old-version` (running domains still read it) or `unused`.
    pub state: String,
    pub bytes: u64,
    pub chunks: Option<u64>,
    pub chunks_total: Option<u64>,
    /// Seconds since its last use (a read, or for an unused cache its last write).
    pub idle_secs: Option<u64>,
    pub holds: Vec<String>,
    pub pinned: bool,
}

/// Progress of an image's prefetch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrefetchStatus {
    pub total_chunks: u64,
    pub done_chunks: u64,
    pub scheduled_bytes: u64,
    pub finished: bool,
    /// Stopped before the end (`prefetch_cancel`, a newer prefetch, or the image removed).
    pub cancelled: bool,
    pub error: Option<String>,
}

/// A profile known to vmtd.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProfileInfo {
    pub digest: String,
    /// The served image with this digest, if any.
    pub image: Option<String>,
    pub boots: u32,
    pub chunks: u64,
    pub bytes: u64,
    pub path: String,
}

/// The state of one served image.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageStatus {
    pub name: String,
    pub origin: String,
    pub digest: String,
    pub image_size: u64,
    pub chunk_size: u64,
    pub chunks_present: u64,
    pub chunks_total: u64,
    pub bytes_from_origin: u64,
    pub bytes_served: u64,
    pub chunks_fetched: u64,
    pub upstream_reads: u64,
    pub retries: u64,
    /// Fetches that failed after their retries.
    #[serde(default)]
    pub gave_up: u64,
    pub verify_failures: u64,
    pub failed_reads: u64,
    pub fetching: u64,
    /// Guest reads being answered now.
    #[serde(default)]
    pub reads_in_flight: u64,
    pub clients: u64,
    /// Domains holding this image (assembled and not yet released).
    pub holds: Vec<String>,
    /// Guest reads, and those that had to wait for a fetch.
    pub reads: u64,
    pub reads_waited: u64,
    /// Guest bytes served by reads that found every chunk cached.
    #[serde(default)]
    pub bytes_from_cache: u64,
    /// Guest read latency by outcome.
    #[serde(default)]
    pub waits: WaitStatus,
    /// Latency of reads from the origin, and of requests to peers.
    #[serde(default)]
    pub origin_latency: crate::metrics::Snapshot,
    #[serde(default)]
    pub peer_latency: crate::metrics::Snapshot,
    /// A recording is running (for this domain, or "" when started by hand).
    pub recording: Option<String>,
    /// A request trace is running (`trace_start`).
    #[serde(default)]
    pub tracing: bool,
    /// Chunks in the image's profile, when it has one.
    pub profile_chunks: Option<u64>,
    pub prefetch: Option<PrefetchStatus>,
    pub socket: String,
    pub cache_dir: String,
    /// Peers known for this image (from the trackers); 0 without `[p2p]`.
    #[serde(default)]
    pub peers: u64,
    /// Peer traffic of this image, with `[p2p]` configured.
    #[serde(default)]
    pub p2p: Option<PeerStatus>,
    /// Failures of this image's cache disk.
    #[serde(default)]
    pub cache: CacheHealth,
}

/// Guest read latency histograms of one image, by how the read was served (see
/// [`crate::metrics::histogram::BOUNDS_NS`] for the buckets).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WaitStatus {
    /// Every chunk was cached.
    pub hit: crate::metrics::Snapshot,
    /// Waited on chunks that all came from peers.
    pub peer: crate::metrics::Snapshot,
    /// Waited on chunks of which some came from the origin.
    pub origin: crate::metrics::Snapshot,
    /// The read failed.
    pub error: crate::metrics::Snapshot,
}

/// Failures of one image's cache disk since start.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheHealth {
    pub write_errors: u64,
    pub sync_errors: u64,
    pub read_errors: u64,
    /// Chunks dropped from the cache by those failures or by `vmt cache verify`.
    pub chunks_dropped: u64,
    /// Fetched chunks served without caching: the disk was full or the budget spent.
    #[serde(default)]
    pub chunks_not_cached: u64,
    /// Chunks evicted to keep the node within its budget.
    #[serde(default)]
    pub chunks_evicted: u64,
    /// Reads of chunks not durable yet served from their verified bytes kept in memory.
    #[serde(default)]
    pub kept_reads: u64,
    /// Bytes of chunks not durable yet kept in memory now (at most `store::KEEP_MAX`).
    #[serde(default)]
    pub kept_bytes: u64,
    /// True while the cache keeps failing and is not caching.
    pub degraded: bool,
}

/// The node's NBD clients against their limits.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NbdStatus {
    /// Connections open now (handshakes included), and the node's cap.
    pub connections: u64,
    pub max_connections: u64,
    /// Connections refused at a cap since start.
    pub refused: u64,
    /// Reply bytes held for clients now, and the node's budget.
    pub bytes_in_flight: u64,
    pub node_bytes: u64,
}

/// Peer-to-peer counters of one image.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerStatus {
    pub peers_usable: u64,
    /// Sessions open to peers (each brings that peer's have-map).
    pub sessions: u64,
    /// Most session places of this image held at once since it opened, both ways (what
    /// `p2p.max_sessions` bounds).
    #[serde(default)]
    pub sessions_peak: u64,
    /// Chunks of this image that usable peers are known to hold.
    pub chunks_at_peers: u64,
    pub peers_banned: u64,
    /// Bans since start (a peer sent data not matching the manifest).
    pub bans: u64,
    /// Bytes received from peers, asked for or pushed (verified).
    pub bytes_from_peers: u64,
    /// Of them, bytes a parent pushed unasked and this node took.
    #[serde(default)]
    pub bytes_pushed: u64,
    /// Pushes offered and not taken: nothing of them was wanted, the offer did not come from
    /// this node's parent in the run's tree, or the receive budget was spent.
    #[serde(default)]
    pub pushes_dropped: u64,
    /// `PushPart`s taken: pieces of pushed runs handed to their readers ahead of the rest.
    #[serde(default)]
    pub push_parts_received: u64,
    /// Bytes uploaded to peers, replies and pushes.
    pub bytes_to_peers: u64,
    /// Chunks this node packed to send to peers (it is where they entered the cluster), and
    /// chunks it sent on in the packed form they came in.
    #[serde(default)]
    pub chunks_packed: u64,
    #[serde(default)]
    pub chunks_sent_as_received: u64,
    /// Bytes of packed chunks kept now to be sent on (at most 32 MiB).
    #[serde(default)]
    pub pack_bytes: u64,
    pub peer_requests: u64,
    /// Requests a peer answered with not-have or busy.
    pub peer_refusals: u64,
    /// Requests that failed: no session, broken or stalled session, timeout.
    pub peer_failures: u64,
    /// Replies that did not match the manifest (dropped, peer banned).
    pub peer_verify_failures: u64,
    /// Relay trees in which this node has a parent, in its current view (it roots the others).
    #[serde(default)]
    pub tree_parents: u64,
    /// This node's name for the image: its address and when it joined the image (Unix ms);
    /// nodes that joined earlier are placed higher in the trees.
    #[serde(default)]
    pub name: String,
}

/// The node's peer server and tracker sessions.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeP2pStatus {
    /// This node's name among its peers (its advertised address).
    pub node: String,
    /// Authenticated peer sessions opened to this node since start.
    pub sessions: u64,
    /// Sessions refused (authentication failed or malformed handshake).
    pub refused: u64,
    pub requests: u64,
    pub busy: u64,
    pub not_have: u64,
    /// Trackers that answered within the membership window (three heartbeats and a second).
    pub trackers_up: u64,
    /// Peer sessions open to this node now.
    #[serde(default)]
    pub open_sessions: u64,
    /// Bytes of replies to peers held now (reserved from `p2p.upload_buffer`), and the most
    /// held at once since start.
    #[serde(default)]
    pub reply_bytes: u64,
    #[serde(default)]
    pub reply_bytes_peak: u64,
    /// Peer sessions whose peer takes this node as its parent in some relay tree, now (it
    /// pushes to them).
    #[serde(default)]
    pub children: u64,
    /// Runs pushed to children since start, and runs not pushed (asked for on the session after
    /// their offer, gone from the cache before they could be offered, or longer than half the
    /// reply budget).
    #[serde(default)]
    pub pushes: u64,
    #[serde(default)]
    pub pushes_skipped: u64,
    /// Requests answered `Pushed` since start: they asked for a run this node had pushed to
    /// the asker on the session already.
    #[serde(default)]
    pub pushes_answered: u64,
    /// Replies' chunks sent ahead of their last, a frame each, since start; of those, the
    /// chunks of runs fetched for the asker, sent as they arrived (cut through).
    #[serde(default)]
    pub parts: u64,
    #[serde(default)]
    pub cut_through: u64,
    /// `PushPart` frames sent since start: chunks of pushed runs sent as they arrived here.
    #[serde(default)]
    pub push_parts: u64,
    /// Bytes of chunks sent packed since start, and the bytes they took on the wire.
    #[serde(default)]
    pub packed_bytes: u64,
    #[serde(default)]
    pub packed_wire_bytes: u64,
}

/// A response from the daemon.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case", deny_unknown_fields)]
pub enum Response {
    Status {
        version: String,
        images: Vec<ImageStatus>,
        /// Profile files in `profile_dir` refused since start (malformed or misnamed).
        profiles_rejected: u64,
        /// The peer server, with `[p2p]` configured.
        #[serde(default)]
        p2p: Option<Box<NodeP2pStatus>>,
        #[serde(default)]
        nbd: NbdStatus,
        #[serde(default)]
        cache: CacheUsage,
    },
    Caches {
        usage: CacheUsage,
        caches: Vec<CacheEntry>,
    },
    Collected {
        report: crate::store::gc::Report,
    },
    /// Export sockets of assembled images, in request order.
    Assembled {
        sockets: Vec<String>,
    },
    /// A recording was stopped and merged into the profile at `path`.
    Recorded {
        path: String,
        boots: u32,
        chunks: u64,
        bytes: u64,
    },
    Profiles {
        profiles: Vec<ProfileInfo>,
    },
    /// `checked` cached chunks were read, `bad` of them failed and were dropped.
    Verified {
        checked: u64,
        bad: u64,
    },
    /// A trace was stopped and written to `path`: `rows` requests, and `dropped` more that did
    /// not fit in memory.
    Traced {
        path: String,
        rows: u64,
        dropped: u64,
    },
    Done,
    Error {
        message: String,
    },
}

/// Encodes one frame.
pub fn encode<T: Serialize>(msg: &T) -> Vec<u8> {
    let payload = serde_json::to_vec(msg).expect("control messages always serialize");
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32c::crc32c(&payload).to_le_bytes());
    out.extend_from_slice(&payload);
    out
}

/// Checks a frame header; returns (payload length, payload crc).
pub fn decode_header(h: &[u8; HEADER_LEN]) -> Result<(u32, u32), ControlError> {
    if &h[..4] != MAGIC {
        return Err(ControlError::BadMagic);
    }
    let version = u16::from_le_bytes([h[4], h[5]]);
    if version != VERSION {
        return Err(ControlError::BadVersion(version));
    }
    let len = u32::from_le_bytes(h[8..12].try_into().unwrap());
    if len > MAX_FRAME {
        return Err(ControlError::TooBig(len));
    }
    Ok((len, u32::from_le_bytes(h[12..16].try_into().unwrap())))
}

/// Checks and decodes a payload.
pub fn decode_payload<T: DeserializeOwned>(payload: &[u8], crc: u32) -> Result<T, ControlError> {
    if crc32c::crc32c(payload) != crc {
        return Err(ControlError::BadChecksum);
    }
    serde_json::from_slice(payload).map_err(|e| ControlError::Json(e.to_string()))
}

/// Reads one frame; `Ok(None)` on a clean end of stream.
pub async fn read_frame<T: DeserializeOwned, R: AsyncRead + Unpin>(r: &mut R) -> Result<Option<T>, ControlError> {
    let mut h = [0u8; HEADER_LEN];
    match r.read_exact(&mut h).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let (len, crc) = decode_header(&h)?;
    let mut payload = vec![0u8; len as usize];
    r.read_exact(&mut payload).await?;
    decode_payload(&payload, crc).map(Some)
}

pub async fn write_frame<T: Serialize, W: AsyncWrite + Unpin>(w: &mut W, msg: &T) -> Result<(), ControlError> {
    w.write_all(&encode(msg)).await?;
    w.flush().await?;
    Ok(())
}

/// Sends one request to the daemon at `socket` and waits (bounded) for its response.
pub async fn call(socket: &Path, req: &Request, timeout: Duration) -> Result<Response, ControlError> {
    let work = async {
        let mut s = tokio::net::UnixStream::connect(socket)
            .await
            .map_err(|source| ControlError::Connect { path: socket.display().to_string(), source })?;
        write_frame(&mut s, req).await?;
        read_frame::<Response, _>(&mut s).await?.ok_or_else(|| {
            ControlError::Io(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "vmtd closed the connection"))
        })
    };
    tokio::time::timeout(timeout, work).await.map_err(|_| ControlError::Timeout(timeout))?
}

/// Like [`call`], turning an error response into [`ControlError::Refused`].
pub async fn ask(socket: &Path, req: &Request, timeout: Duration) -> Result<Response, ControlError> {
    match call(socket, req, timeout).await? {
        Response::Error { message } => Err(ControlError::Refused(message)),
        r => Ok(r),
    }
}

/// The status of every image served by the vmtd at `socket`.
pub async fn status(socket: &Path, timeout: Duration) -> Result<Vec<ImageStatus>, ControlError> {
    match ask(socket, &Request::Status, timeout).await? {
        Response::Status { images, .. } => Ok(images),
        other => Err(ControlError::Json(format!("unexpected answer {other:?}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn roundtrip() {
        let req = Request::ImageRemove { name: "x".into() };
        let f = encode(&req);
        let (len, crc) = decode_header(f[..HEADER_LEN].try_into().unwrap()).unwrap();
        assert_eq!(len as usize, f.len() - HEADER_LEN);
        assert_eq!(decode_payload::<Request>(&f[HEADER_LEN..], crc).unwrap(), req);
    }

    #[test]
    fn rejects_bad_frames() {
        let f = encode(&Request::Status);
        let mut h: [u8; HEADER_LEN] = f[..HEADER_LEN].try_into().unwrap();
        h[4] = 9;
        assert!(matches!(decode_header(&h), Err(ControlError::BadVersion(9))));
        h[0] = b'X';
        assert!(matches!(decode_header(&h), Err(ControlError::BadMagic)));
        let mut h: [u8; HEADER_LEN] = f[..HEADER_LEN].try_into().unwrap();
        h[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(decode_header(&h), Err(ControlError::TooBig(_))));
        let (_, crc) = decode_header(f[..HEADER_LEN].try_into().unwrap()).unwrap();
        assert!(matches!(decode_payload::<Request>(b"{\"op\":\"status\"}x", crc), Err(ControlError::BadChecksum)));
        let junk = b"{\"op\":\"reboot\"}";
        assert!(matches!(decode_payload::<Request>(junk, crc32c::crc32c(junk)), Err(ControlError::Json(_))));
    }

    proptest! {
        #[test]
        fn never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            if bytes.len() >= HEADER_LEN {
                let _ = decode_header(bytes[..HEADER_LEN].try_into().unwrap());
            }
            let _ = decode_payload::<Request>(&bytes, crc32c::crc32c(&bytes));
        }
    }
}
