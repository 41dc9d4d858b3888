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
//! more to read, then [`decode_body`]. Every length is checked against a limit before anything
//! is allocated, so a hostile peer cannot make us allocate more than one frame's worth (and a
//! have-map tail is checked against the image before it is decoded, see `peer::decode_have`).

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

/// The smallest chunk (`image::geometry::MIN_CHUNK_SIZE`): every block of a packed tail but
/// its last (the image's last chunk may be shorter) holds at least this much.
const MIN_BLOCK: usize = 4096;

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
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn messages() -> Vec<Frame> {
        vec![
            Frame::new(Message::Hello { node: "10.0.0.1:7000".into(), image: [7; 32], nonce: [9; 32] }),
            Frame::new(Message::Challenge { node: "n".into(), nonce: [1; 32], proof: [2; 32] }),
            Frame::new(Message::Proof { proof: [3; 32] }),
            Frame::with_tail(Message::Have, Bytes::from_static(b"bitmap")),
            Frame::with_tail(Message::Data { id: 5 }, Bytes::from(vec![0xAB; 4096])),
            Frame::with_tail(Message::Part { id: 5, count: 1 }, Bytes::from(vec![0xAC; 4096])),
            Frame::new(Message::Request { id: 1, first: 2, count: 3 }),
            Frame::new(Message::NotHave { id: 1 }),
            Frame::new(Message::Busy { id: 1 }),
            Frame::new(Message::Ping),
            Frame::with_tail(Message::Adopt { classes: vec![0, 3] }, Bytes::from_static(b"bitmap")),
            Frame::new(Message::Offer { first: 16, count: 16 }),
            Frame::with_tail(Message::Push { first: 16, count: 1 }, Bytes::from(vec![0xCD; 4096])),
            Frame::new(Message::Pushed { id: 9 }),
            Frame::with_tail(Message::PushPart { first: 16, count: 1 }, Bytes::from(vec![0xCE; 4096])),
            Frame::new(Message::Register { image: [4; 32], classes: 4, fanout: 4, near: 8, joined: 1_796_000_000_000 }),
            Frame::new(Message::Peers {
                image: [4; 32],
                ancestors: vec![vec!["a:1".into()], vec![]],
                near: vec!["b:2".into()],
                total: 3,
                provisional: false,
            }),
        ]
    }

    #[test]
    fn message_numbers_are_those_of_format_md() {
        let number = |m: Message| postcard::to_allocvec(&m).unwrap()[0];
        assert_eq!(number(Message::Data { id: 0 }), 6);
        assert_eq!(number(Message::NotHave { id: 0 }), 7);
        assert_eq!(number(Message::Pushed { id: 0 }), 16);
        assert_eq!(number(Message::Part { id: 0, count: 0 }), 17);
        assert_eq!(number(Message::PushPart { first: 0, count: 0 }), 18);
    }

    #[test]
    fn every_message_round_trips() {
        for f in messages() {
            assert_eq!(decode(&f.encode()).unwrap(), f);
        }
    }

    #[test]
    fn damaged_frames_are_refused() {
        let good = Frame::with_tail(Message::Data { id: 5 }, Bytes::from(vec![1; 100])).encode();
        let mut b = good.clone();
        b[0] = b'X';
        assert_eq!(decode(&b), Err(WireError::BadMagic));
        let mut b = good.clone();
        b[5] = 8;
        assert_eq!(decode(&b), Err(WireError::BadVersion(8)));
        let mut b = good.clone();
        b[7] = 4;
        assert_eq!(decode(&b), Err(WireError::BadFlags(4)));
        let mut b = good.clone();
        *b.last_mut().unwrap() ^= 1;
        assert_eq!(decode(&b), Err(WireError::BadChecksum));
        let mut b = good.clone();
        b[12..16].copy_from_slice(&(MAX_TAIL + 1).to_be_bytes());
        assert!(matches!(decode(&b), Err(WireError::TooBig { .. })));
        assert_eq!(decode(&good[..good.len() - 1]), Err(WireError::BadLength));
        // A tail on a message that takes none.
        let f = Frame::with_tail(Message::Ping, Bytes::from_static(b"x"));
        assert_eq!(decode(&f.encode()), Err(WireError::UnexpectedTail("Ping")));
    }

    /// Two chunks: one that packs (text), one that does not (noise).
    fn two_chunks() -> (Bytes, Bytes) {
        let mut raw: Vec<u8> = b"a line of text that repeats\n".iter().copied().cycle().take(4096).collect();
        let mut x = 0x2545_f491_u32;
        raw.extend((0..4096).map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        }));
        let mut packed = Vec::new();
        pack_block(&raw[..4096], &mut packed);
        pack_block(&raw[4096..], &mut packed);
        (Bytes::from(raw), Bytes::from(packed))
    }

    #[test]
    fn packed_frames_unpack_to_their_chunks_and_keep_what_came() {
        let (raw, packed) = two_chunks();
        assert!(packed.len() < raw.len() / 2 + 4096 && packed.len() > 4096, "{}", packed.len());
        let b = blocks(&packed, usize::MAX).unwrap();
        assert_eq!(b.iter().map(|(_, r)| *r).collect::<Vec<_>>(), vec![4096, 4096]);
        // The noise is stored as it is.
        assert_eq!(&b[1].0[BLOCK_HEAD..], &raw[4096..]);
        for msg in [
            Message::Data { id: 5 },
            Message::Part { id: 5, count: 2 },
            Message::Push { first: 3, count: 2 },
            Message::PushPart { first: 3, count: 2 },
        ] {
            let f = Frame::packed(msg.clone(), packed.clone());
            let wire = f.encode();
            assert_eq!(wire.len(), HEADER_LEN + postcard::to_allocvec(&f.msg).unwrap().len() + packed.len());
            assert_eq!(u16::from_be_bytes([wire[6], wire[7]]), PACKED);
            // Decoded: the chunks' bytes, and the tail as it came.
            assert_eq!(decode(&wire).unwrap(), Frame { msg, tail: raw.clone(), packed: Some(packed.clone()) });
        }
    }

    #[test]
    fn damaged_packed_tails_are_refused() {
        let (raw, packed) = two_chunks();
        let frame = |msg: Message, packed: Vec<u8>| {
            Frame { msg, tail: raw.clone(), packed: Some(Bytes::from(packed)) }.encode()
        };
        let data = Message::Data { id: 1 };
        let bad = |p: Vec<u8>| decode(&frame(data.clone(), p));
        let p = packed.to_vec();
        assert!(matches!(bad(p[..p.len() - 1].to_vec()), Err(WireError::BadPacking(_))), "cut short");
        assert!(matches!(bad(p[..5].to_vec()), Err(WireError::BadPacking(_))), "header cut short");
        let mut q = p.clone();
        q[4..8].copy_from_slice(&5000u32.to_be_bytes());
        assert!(matches!(bad(q), Err(WireError::BadPacking(_))), "stored > raw");
        let mut q = p.clone();
        q[0..4].copy_from_slice(&0u32.to_be_bytes());
        assert!(matches!(bad(q), Err(WireError::BadPacking(_))), "an empty chunk");
        let mut q = p.clone();
        q[0..4].copy_from_slice(&4097u32.to_be_bytes());
        assert!(matches!(bad(q), Err(WireError::BadPacking(_))), "unpacks short of its length");
        // The lz4 block a byte short (its header says so): it no longer unpacks.
        let stored = u32::from_be_bytes(p[4..8].try_into().unwrap()) as usize;
        let mut q = p.clone();
        q.remove(BLOCK_HEAD + stored - 1);
        q[4..8].copy_from_slice(&(stored as u32 - 1).to_be_bytes());
        assert!(matches!(bad(q), Err(WireError::BadPacking(_))), "a damaged lz4 block");
        // More than LZ4 can unpack from what a block stores: refused before anything is
        // allocated for it.
        let mut q = Vec::new();
        q.extend_from_slice(&(MAX_TAIL / 2).to_be_bytes());
        q.extend_from_slice(&1u32.to_be_bytes());
        q.push(0);
        assert!(matches!(bad(q), Err(WireError::BadPacking(_))), "a ratio LZ4 cannot reach");
        // Blocks that add up to more than a tail may hold unpacked.
        let (half, stored) = (MAX_TAIL / 2 + 1, (MAX_TAIL / 2) / 255 + 1);
        let mut q = Vec::new();
        for _ in 0..2 {
            q.extend_from_slice(&half.to_be_bytes());
            q.extend_from_slice(&stored.to_be_bytes());
            q.resize(q.len() + stored as usize, 0);
        }
        assert!(matches!(bad(q), Err(WireError::BadPacking(_))), "over the tail limit");
        // A block short of a chunk before another.
        let mut q = Vec::new();
        pack_block(&raw[..100], &mut q);
        pack_block(&raw[..4096], &mut q);
        assert!(matches!(bad(q), Err(WireError::BadPacking(_))), "a short block before the last");
        // Where only small frames may come, a packed one may not unpack past the limit either.
        let f = Frame::packed(Message::Data { id: 1 }, packed.clone());
        let wire = f.encode();
        let header = decode_header(wire[..HEADER_LEN].try_into().unwrap()).unwrap();
        let (msg, tail) = wire[HEADER_LEN..].split_at(header.msg_len as usize);
        let tail = Bytes::copy_from_slice(tail);
        assert!(tail.len() < 8192 && decode_body_within(&header, msg, tail.clone(), 8192).is_ok());
        assert!(matches!(decode_body_within(&header, msg, tail, 8191), Err(WireError::BadPacking(_))));
        // The flag on a frame that carries no chunk data, or with no tail.
        assert_eq!(decode(&frame(Message::Have, p.clone())), Err(WireError::BadFlags(PACKED)));
        let mut empty = Frame::new(Message::Data { id: 1 }).encode();
        empty[7] = 1;
        assert_eq!(decode(&empty), Err(WireError::BadFlags(PACKED)));
        let mut b = Frame::new(Message::Ping).encode();
        b[7] = 2;
        assert_eq!(decode(&b), Err(WireError::BadFlags(2)));
    }

    proptest! {
        #[test]
        fn arbitrary_packed_tails_never_panic(
            blocks in proptest::collection::vec((1u32..70_000, proptest::collection::vec(any::<u8>(), 1..300)), 0..4),
            cut in 0usize..16,
        ) {
            // Well-formed headers over arbitrary contents, so the LZ4 decoder is reached.
            let mut tail = Vec::new();
            for (raw, stored) in &blocks {
                tail.extend_from_slice(&raw.to_be_bytes());
                tail.extend_from_slice(&(stored.len() as u32).to_be_bytes());
                tail.extend_from_slice(stored);
            }
            tail.truncate(tail.len().saturating_sub(cut));
            if let Ok(raw) = unpack(&Bytes::from(tail), usize::MAX) {
                prop_assert!(raw.len() <= MAX_TAIL as usize);
            }
        }

        #[test]
        fn packing_round_trips(raw in proptest::collection::vec(0u8..4, 1..20_000)) {
            let mut packed = Vec::new();
            pack_block(&raw, &mut packed);
            prop_assert!(packed.len() <= raw.len() + BLOCK_HEAD);
            prop_assert_eq!(unpack(&Bytes::from(packed), usize::MAX).unwrap(), Bytes::from(raw));
        }

        #[test]
        fn arbitrary_bytes_never_panic(buf in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode(&buf);
        }

        #[test]
        fn arbitrary_bodies_under_a_valid_header_never_panic(
            body in proptest::collection::vec(any::<u8>(), 0..256), split in 0usize..256
        ) {
            let split = split.min(body.len());
            let mut f = Vec::new();
            f.extend_from_slice(MAGIC);
            f.extend_from_slice(&VERSION.to_be_bytes());
            f.extend_from_slice(&0u16.to_be_bytes());
            f.extend_from_slice(&(split as u32).to_be_bytes());
            f.extend_from_slice(&((body.len() - split) as u32).to_be_bytes());
            f.extend_from_slice(&crc32c::crc32c(&body).to_be_bytes());
            f.extend_from_slice(&body);
            let _ = decode(&f);
        }

        #[test]
        fn requests_round_trip(id: u32, first: u32, count: u32) {
            let f = Frame::new(Message::Request { id, first, count });
            prop_assert_eq!(decode(&f.encode()).unwrap(), f);
        }
    }
}
