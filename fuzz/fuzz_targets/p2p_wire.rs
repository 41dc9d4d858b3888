//! Fuzzes the peer and tracker frame codec (`p2p::wire`): whole frames as they come off a socket
//! (selector 0), bodies under a header this target makes valid, with the right lengths and
//! checksum, so the postcard message decoder is reached (1; packed tails when the selector's
//! high bit is set), headers alone (2), and packed tails alone (3).
//! Asserts: no panic; a header's announced body stays within the limits; a decoded frame
//! re-encodes to a frame that decodes to the same value; node names from frames are checked
//! without panic.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use vmthunder::p2p::conn::check_node;
use vmthunder::p2p::wire::*;
use vmthunder_fuzz::Input;

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let selector = input.u8();
    match selector % 4 {
        0 => {
            if let Ok(f) = decode(input.rest()) {
                check(f);
            }
        }
        1 => {
            let split = input.u16() as usize;
            let body = input.rest();
            let (msg, tail) = body.split_at(split.min(body.len()));
            let packed = selector & 0x80 != 0;
            let header = Header {
                msg_len: msg.len() as u32,
                tail_len: tail.len() as u32,
                crc: crc32c::crc32c_append(crc32c::crc32c(msg), tail),
                packed,
            };
            let mut frame = Vec::with_capacity(HEADER_LEN + body.len());
            frame.extend_from_slice(MAGIC);
            frame.extend_from_slice(&VERSION.to_be_bytes());
            frame.extend_from_slice(&(if packed { PACKED } else { 0 }).to_be_bytes());
            frame.extend_from_slice(&header.msg_len.to_be_bytes());
            frame.extend_from_slice(&header.tail_len.to_be_bytes());
            frame.extend_from_slice(&header.crc.to_be_bytes());
            assert_eq!(decode_header(frame[..HEADER_LEN].try_into().unwrap()), Ok(header));
            frame.extend_from_slice(body);
            let whole = decode(&frame);
            let parts = decode_body(&header, msg, Bytes::copy_from_slice(tail));
            assert_eq!(whole, parts);
            if let Ok(f) = whole {
                check(f);
            }
        }
        2 => {
            if let Ok(h) = decode_header(&input.array()) {
                assert!(h.msg_len <= MAX_MSG && h.tail_len <= MAX_TAIL);
                assert!(h.body_len() <= (MAX_MSG + MAX_TAIL) as usize);
            }
        }
        _ => {
            let tail = Bytes::copy_from_slice(input.rest());
            if let Ok(raw) = unpack(&tail, usize::MAX) {
                assert!(raw.len() <= MAX_TAIL as usize);
                let sum: usize = blocks(&tail, usize::MAX).expect("it unpacked").iter().map(|(_, r)| r).sum();
                assert_eq!(raw.len(), sum);
            }
        }
    }
});

fn check(f: Frame) {
    let again = f.encode();
    assert_eq!(decode(&again).as_ref(), Ok(&f));
    match &f.msg {
        Message::Hello { node, .. } | Message::Challenge { node, .. } => {
            let _ = check_node(node);
        }
        Message::Peers { ancestors, near, .. } => {
            for n in ancestors.iter().flatten().chain(near) {
                let _ = check_node(n);
            }
        }
        _ => {}
    }
}
