//! The peer and tracker wire format: length-prefixed, checksummed frames carrying one postcard
//! message and, for chunk data and have-maps, a raw byte tail (see FORMAT.md).
//!
//! ```text
//! magic "VMTP" | version u16 | flags u16 | msg_len u32 | tail_len u32 | crc32c u32 (msg ‖ tail)
//! msg: postcard(Message)           tail: chunk bytes (Data) or a serialized roaring bitmap (Have*)
//! packed tail (flag PACKED, chunk data only): per chunk, raw_len u32 | stored_len u32 | stored
//! ```
//! A packed tail carries each chunk as an lz4 block (`stored_len < raw_len`) or as is
//! (`stored_len == raw_len`); it is unpacked here, so a decoded frame's `tail` is always the
//! chunks' bytes, and its `packed` the tail as it came (which a relay keeps and sends on, see
//! `p2p::pack`).
//! Pure codec, no I/O: the caller reads [`HEADER_LEN`] bytes, asks [`decode_header`] how much
//! more to read, then [`decode_body_within`] with its limit for the frame. Every length is
//! checked against a limit before anything is allocated, so a hostile peer cannot make us
//! allocate more than one frame's worth, unpacked: a packed tail unpacks to at most the
//! reader's limit (32 MiB for chunk data), and each block to at most 255 times what it stores
//! (a have-map tail is checked against the image before it is decoded, see
//! `peer::decode_have`).

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use thiserror::Error;

pub const MAGIC: &[u8; 4] = b"VMTP";
pub const VERSION: u16 = 9;
/// Frame flag: the tail is packed (see the module's header).
pub const PACKED: u16 = 1;
/// A packed block's header: its chunk's length and the length stored.
pub const BLOCK_HEAD: usize = 8;
pub const HEADER_LEN: usize = 20;
/// Largest postcard message (the peer lists of a tracker reply are the largest).
pub const MAX_MSG: u32 = 1 << 20;
/// Largest tail: one coalesced read (`max_fetch` is at most 32 MiB) or one have-map.
pub const MAX_TAIL: u32 = 32 << 20;
/// Random challenge length.
pub const NONCE_LEN: usize = 32;

/// A 32-byte digest or nonce.
pub type Bytes32 = [u8; 32];

/// Errors decoding a frame. Any of them ends the connection it came from.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum WireError {
    #[error("frame has a bad magic")]
    BadMagic,
    #[error("peer protocol version {0} is not supported (this side speaks {VERSION})")]
    BadVersion(u16),
    #[error("frame flags {0:#x} are not understood")]
    BadFlags(u16),
    #[error("frame of {msg} + {tail} bytes exceeds the limits")]
    TooBig { msg: u32, tail: u32 },
    #[error("frame checksum mismatch")]
    BadChecksum,
    #[error("frame body length disagrees with its header")]
    BadLength,
    #[error("frame message malformed: {0}")]
    Malformed(String),
    #[error("a {0} frame carries no tail")]
    UnexpectedTail(&'static str),
    #[error("packed tail malformed: {0}")]
    BadPacking(&'static str),
}

/// One message. Handshake first (`Hello`, `Challenge`, `Proof`), then either a peer session
/// (have-maps, requests, data) or tracker traffic (`Register`, `Peers`, and between trackers `Summary`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message {
    /// Client → server: who I am, which image (all zero for the tracker), my challenge.
    Hello { node: String, image: Bytes32, nonce: Bytes32 },
    /// Server → client: the server's challenge and its proof that it holds the cluster key.
    Challenge { node: String, nonce: Bytes32, proof: Bytes32 },
    /// Client → server: the client's proof.
    Proof { proof: Bytes32 },
    /// Server → client: the full set of chunks the server holds (tail: roaring bitmap).
    Have,
    /// Server → client: chunks gained since the last have-map (tail: roaring bitmap).
    HaveDelta,
    /// Client → server: please send chunks `first..first + count`.
    Request { id: u32, first: u32, count: u32 },
    /// Server → client: the bytes of request `id` (tail: the chunks' bytes), or after `Part`s
    /// of it, the rest of them: the reply's last frame.
    Data { id: u32 },
    /// Server → client: I do not have (and will not fetch) what request `id` asks.
    NotHave { id: u32 },
    /// Server → client: too many requests queued here; ask someone else.
    Busy { id: u32 },
    /// Liveness, sent by a server while a request of the client's is in progress and nothing
    /// else is sent.
    Ping,
    /// Node → tracker: I serve `image` at my peer address `node` since `joined` (Unix
    /// milliseconds; 0: not said), so my name for it is `node@joined`; my relay trees are
    /// `classes` trees of fan-out `fanout`, and I want `near` ring successors.
    Register { image: Bytes32, classes: u32, fanout: u32, near: u32, joined: u64 },
    /// Tracker → node: for each class the asker's ancestors (parent first), its ring
    /// successors, the number of live nodes serving `image`, and whether the places are
    /// provisional (the tracker warms up).
    Peers { image: Bytes32, ancestors: Vec<Vec<String>>, near: Vec<String>, total: u32, provisional: bool },
    /// Tracker → tracker: what the sender holds of some images (at most
    /// `federation::SUMMARY_IMAGES` per frame).
    Summary { images: Vec<Summary> },
    /// Client → server: in the trees of `classes` this node takes the server as its parent, so
    /// the server may push it the runs of those trees' stripes it obtains; no class ends that
    /// (tail: the client's have-map, so that nothing it holds is pushed).
    Adopt { classes: Vec<u32> },
    /// Server → client: chunks `first..first + count` follow in a `Push`; the client may wait
    /// for them rather than ask.
    Offer { first: u32, count: u32 },
    /// Server → client: the bytes of an offered run nobody asked for (tail: the chunks' bytes).
    Push { first: u32, count: u32 },
    /// Server → client: request `id` asks for chunks of one run this server pushed on this
    /// session before this reply (the request crossed the push): the client takes them from
    /// the push, or asks again once (answered then as any request).
    Pushed { id: u32 },
    /// Server → client: the next `count` chunks of request `id` (tail: their bytes), sent as
    /// they reach a server that relays them (cut through). More follow: `Part`s, then `Data`
    /// with the rest, or `NotHave` / `Busy` if the rest cannot come (the parts stand).
    Part { id: u32, count: u32 },
    /// Server → client: the next `count` chunks of the run offered at `first` (tail: their
    /// bytes), sent as they reach this server (a push cut through). More follow: `PushPart`s,
    /// then the `Push` of the offer with the rest of its bytes.
    PushPart { first: u32, count: u32 },
}

impl Message {
    fn name(&self) -> &'static str {
        match self {
            Message::Hello { .. } => "Hello",
            Message::Challenge { .. } => "Challenge",
            Message::Proof { .. } => "Proof",
            Message::Have => "Have",
            Message::HaveDelta => "HaveDelta",
            Message::Request { .. } => "Request",
            Message::Data { .. } => "Data",
            Message::Part { .. } => "Part",
            Message::NotHave { .. } => "NotHave",
            Message::Busy { .. } => "Busy",
            Message::Ping => "Ping",
            Message::Register { .. } => "Register",
            Message::Peers { .. } => "Peers",
            Message::Summary { .. } => "Summary",
            Message::Adopt { .. } => "Adopt",
            Message::Offer { .. } => "Offer",
            Message::Push { .. } => "Push",
            Message::Pushed { .. } => "Pushed",
            Message::PushPart { .. } => "PushPart",
        }
    }

    fn takes_tail(&self) -> bool {
        matches!(
            self,
            Message::Have
                | Message::HaveDelta
                | Message::Data { .. }
                | Message::Part { .. }
                | Message::Adopt { .. }
                | Message::Push { .. }
                | Message::PushPart { .. }
        )
    }

    /// Frames of chunk data, whose tail may be packed.
    fn takes_packed(&self) -> bool {
        matches!(self, Message::Data { .. } | Message::Part { .. } | Message::Push { .. } | Message::PushPart { .. })
    }
}

/// One image as one tracker holds it (see `core::federation`): its node count and, per tree
/// shape (`classes`), the top of each class's tree in the tracker's partition (its first names
/// in the tree's order, highest first).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Summary {
    pub image: Bytes32,
    pub total: u32,
    pub shapes: Vec<(u32, Vec<Vec<String>>)>,
}

/// A decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub msg: Message,
    /// The chunks' bytes (or a have-map), unpacked.
    pub tail: Bytes,
    /// The tail as packed on the wire, when it is (chunk data only).
    pub packed: Option<Bytes>,
}

impl Frame {
    pub fn new(msg: Message) -> Frame {
        Frame { msg, tail: Bytes::new(), packed: None }
    }

    pub fn with_tail(msg: Message, tail: Bytes) -> Frame {
        Frame { msg, tail, packed: None }
    }

    /// A frame of chunk data to send as `packed` (its blocks, see [`pack_block`]). Its `tail`
    /// is left empty: a sender holds only what goes on the wire.
    pub fn packed(msg: Message, packed: Bytes) -> Frame {
        debug_assert!(msg.takes_packed());
        Frame { msg, tail: Bytes::new(), packed: Some(packed) }
    }

    /// The tail as it goes on the wire.
    pub fn wire_tail(&self) -> &Bytes {
        self.packed.as_ref().unwrap_or(&self.tail)
    }

    /// The header and the message; the tail follows on the wire as is (no copy of chunk data).
    pub fn encode_head(&self) -> Vec<u8> {
        let msg = postcard::to_allocvec(&self.msg).expect("messages always serialize");
        let tail = self.wire_tail();
        let mut crc = crc32c::crc32c(&msg);
        crc = crc32c::crc32c_append(crc, tail);
        let flags = if self.packed.is_some() { PACKED } else { 0 };
        let mut out = Vec::with_capacity(HEADER_LEN + msg.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_be_bytes());
        out.extend_from_slice(&flags.to_be_bytes());
        out.extend_from_slice(&(msg.len() as u32).to_be_bytes());
        out.extend_from_slice(&(tail.len() as u32).to_be_bytes());
        out.extend_from_slice(&crc.to_be_bytes());
        out.extend_from_slice(&msg);
        out
    }

    /// The whole frame in one buffer (tests and small frames).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = self.encode_head();
        out.extend_from_slice(self.wire_tail());
        out
    }
}

/// Appends one chunk's block to a packed tail: lz4 when that is smaller, else the bytes as is.
pub fn pack_block(raw: &[u8], out: &mut Vec<u8>) {
    let at = out.len();
    out.extend_from_slice(&(raw.len() as u32).to_be_bytes());
    out.extend_from_slice(&(raw.len() as u32).to_be_bytes());
    let start = out.len();
    out.resize(start + lz4_flex::block::get_maximum_output_size(raw.len()), 0);
    match lz4_flex::block::compress_into(raw, &mut out[start..]) {
        Ok(n) if n < raw.len() => {
            out.truncate(start + n);
            out[at + 4..at + 8].copy_from_slice(&(n as u32).to_be_bytes());
        }
        _ => {
            out.truncate(start);
            out.extend_from_slice(raw);
        }
    }
}

/// The blocks of a packed tail, each whole (header and what it stores) with the length of the
/// chunk it holds; an error when the tail is malformed or holds more than `limit` bytes
/// unpacked. Checked before anything is allocated: each block but the last holds at least a
/// smallest chunk (so a tail has at most [`MAX_TAIL`] / 4 KiB + 1 blocks), and states no more
/// than LZ4 can unpack from what it stores (255 bytes per byte, and a little).
pub fn blocks(packed: &Bytes, limit: usize) -> Result<Vec<(Bytes, usize)>, WireError> {
    let mut out: Vec<(Bytes, usize)> = Vec::new();
    let (mut at, mut total) = (0usize, 0usize);
    while at < packed.len() {
        let head = packed.get(at..at + BLOCK_HEAD).ok_or(WireError::BadPacking("a block header is cut short"))?;
        let raw = u32::from_be_bytes(head[0..4].try_into().expect("4 bytes")) as usize;
        let stored = u32::from_be_bytes(head[4..8].try_into().expect("4 bytes")) as usize;
        if raw == 0 || stored == 0 || stored > raw || raw > stored.saturating_mul(255).saturating_add(64) {
            return Err(WireError::BadPacking("a block's lengths are impossible"));
        }
        if out.last().is_some_and(|(_, r)| *r < MIN_BLOCK) {
            return Err(WireError::BadPacking("a block before the last is shorter than a chunk"));
        }
        total = total.saturating_add(raw);
        if total > limit.min(MAX_TAIL as usize) {
            return Err(WireError::BadPacking("it unpacks to more than the frame may hold"));
        }
        let end = at + BLOCK_HEAD + stored;
        if end > packed.len() {
            return Err(WireError::BadPacking("a block is cut short"));
        }
        out.push((packed.slice(at..end), raw));
        at = end;
    }
    Ok(out)
}

/// Every block of a packed tail but its last (the image's last chunk may be shorter) holds at
/// least a smallest chunk.
const MIN_BLOCK: usize = crate::image::geometry::MIN_CHUNK_SIZE as usize;

/// Unpacks a packed tail of at most `limit` bytes unpacked: every block to exactly its stated
/// length.
pub fn unpack(packed: &Bytes, limit: usize) -> Result<Bytes, WireError> {
    let blocks = blocks(packed, limit)?;
    let mut out = vec![0u8; blocks.iter().map(|(_, raw)| raw).sum()];
    let mut at = 0;
    for (block, raw) in blocks {
        let stored = &block[BLOCK_HEAD..];
        let into = &mut out[at..at + raw];
        if stored.len() == raw {
            into.copy_from_slice(stored);
        } else if !matches!(lz4_flex::block::decompress_into(stored, into), Ok(n) if n == raw) {
            return Err(WireError::BadPacking("a block does not unpack to its length"));
        }
        at += raw;
    }
    Ok(Bytes::from(out))
}

/// What a header announces: the body that follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub msg_len: u32,
    pub tail_len: u32,
    pub crc: u32,
    /// The tail is packed.
    pub packed: bool,
}

impl Header {
    pub fn body_len(&self) -> usize {
        self.msg_len as usize + self.tail_len as usize
    }
}

/// Checks a frame header.
pub fn decode_header(h: &[u8; HEADER_LEN]) -> Result<Header, WireError> {
    if &h[0..4] != MAGIC {
        return Err(WireError::BadMagic);
    }
    let version = u16::from_be_bytes([h[4], h[5]]);
    if version != VERSION {
        return Err(WireError::BadVersion(version));
    }
    let flags = u16::from_be_bytes([h[6], h[7]]);
    if flags & !PACKED != 0 {
        return Err(WireError::BadFlags(flags));
    }
    let msg_len = u32::from_be_bytes([h[8], h[9], h[10], h[11]]);
    let tail_len = u32::from_be_bytes([h[12], h[13], h[14], h[15]]);
    if msg_len > MAX_MSG || tail_len > MAX_TAIL {
        return Err(WireError::TooBig { msg: msg_len, tail: tail_len });
    }
    let crc = u32::from_be_bytes([h[16], h[17], h[18], h[19]]);
    Ok(Header { msg_len, tail_len, crc, packed: flags & PACKED != 0 })
}

/// Checks and decodes the body announced by `header`: its message part and its tail (kept in
/// a buffer of its own, so chunk data is handed on without a copy; a packed tail is unpacked).
pub fn decode_body(header: &Header, msg: &[u8], tail: Bytes) -> Result<Frame, WireError> {
    decode_body_within(header, msg, tail, usize::MAX)
}

/// [`decode_body`] for a reader that takes bodies of at most `max` bytes: a packed tail may not
/// unpack to more than that either.
pub fn decode_body_within(header: &Header, msg: &[u8], tail: Bytes, max: usize) -> Result<Frame, WireError> {
    if msg.len() != header.msg_len as usize || tail.len() != header.tail_len as usize {
        return Err(WireError::BadLength);
    }
    if crc32c::crc32c_append(crc32c::crc32c(msg), &tail) != header.crc {
        return Err(WireError::BadChecksum);
    }
    let msg: Message = postcard::from_bytes(msg).map_err(|e| WireError::Malformed(e.to_string()))?;
    if !tail.is_empty() && !msg.takes_tail() {
        return Err(WireError::UnexpectedTail(msg.name()));
    }
    if !header.packed {
        return Ok(Frame { msg, tail, packed: None });
    }
    if !msg.takes_packed() || tail.is_empty() {
        return Err(WireError::BadFlags(PACKED));
    }
    Ok(Frame { msg, tail: unpack(&tail, max)?, packed: Some(tail) })
}

/// Decodes one whole frame from `buf` (tests and fuzzing).
pub fn decode(buf: &[u8]) -> Result<Frame, WireError> {
    let head: &[u8; HEADER_LEN] = buf.get(..HEADER_LEN).and_then(|h| h.try_into().ok()).ok_or(WireError::BadLength)?;
    let header = decode_header(head)?;
    let body = &buf[HEADER_LEN..];
    if body.len() != header.body_len() {
        return Err(WireError::BadLength);
    }
    let (msg, tail) = body.split_at(header.msg_len as usize);
    decode_body(&header, msg, Bytes::copy_from_slice(tail))
}

#[cfg(test)]
mod tests;
