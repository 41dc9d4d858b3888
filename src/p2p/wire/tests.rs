//! Tests of the frame codec: every message, damaged frames, packed tails and their limits.

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
    let frame =
        |msg: Message, packed: Vec<u8>| Frame { msg, tail: raw.clone(), packed: Some(Bytes::from(packed)) }.encode();
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
    assert!(blocks(&Bytes::from(q.clone()), usize::MAX).is_err(), "a ratio LZ4 cannot reach");
    assert!(matches!(bad(q), Err(WireError::BadPacking(_))));
    // Blocks that add up to more than a tail may hold unpacked.
    let (half, stored) = (MAX_TAIL / 2 + 1, (MAX_TAIL / 2) / 255 + 1);
    let mut q = Vec::new();
    for _ in 0..2 {
        q.extend_from_slice(&half.to_be_bytes());
        q.extend_from_slice(&stored.to_be_bytes());
        q.resize(q.len() + stored as usize, 0);
    }
    // (Each alone is within the limits.)
    assert!(blocks(&Bytes::from(q[..q.len() / 2].to_vec()), usize::MAX).is_ok());
    assert!(blocks(&Bytes::from(q.clone()), usize::MAX).is_err(), "over the tail limit");
    // A block short of a chunk before another.
    let mut q = Vec::new();
    pack_block(&raw[..100], &mut q);
    pack_block(&raw[..4096], &mut q);
    assert!(blocks(&Bytes::from(q.clone()), usize::MAX).is_err(), "a short block before the last");
    // As the last block, a short one is fine (the image's last chunk).
    let mut ok = Vec::new();
    pack_block(&raw[..4096], &mut ok);
    pack_block(&raw[..100], &mut ok);
    assert!(unpack(&Bytes::from(ok), usize::MAX).is_ok());
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
