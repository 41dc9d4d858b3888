//! Fuzzes image manifest decoding (`Manifest::decode`): files as read from disk (selector 0);
//! files resealed with the right crc32c trailer (1); and resealed files whose root digest is
//! first set to the one `Manifest::from_digests` computes for their geometry and chunk digests
//! (2), so decoding gets past the root check and its success path is fuzzed too.
//! Asserts: no panic; a decoded manifest holds one digest per chunk of its geometry, verifies
//! nothing of the wrong length, and re-encodes to a file that decodes to the same manifest;
//! digests survive hex encoding.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmthunder::fsutil::seal;
use vmthunder::image::{ChunkIdx, ChunkSize, Digest, Geometry, Manifest};
use vmthunder_fuzz::Input;

const HEADER_LEN: usize = 64;

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let sel = input.u8() % 3;
    let mut body = input.rest().to_vec();
    if sel == 2 {
        set_root(&mut body);
    }
    let file = if sel == 0 { body } else { seal(body) };
    let Ok(m) = Manifest::decode(&file) else { return };
    let g = m.geometry();
    assert!(m.digest(ChunkIdx(g.chunk_count() - 1)).is_some());
    assert!(m.digest(ChunkIdx(g.chunk_count())).is_none());
    assert!(!m.verify(ChunkIdx(0), &[]));
    let again = m.encode();
    let back = Manifest::decode(&again).expect("own encoding decodes");
    assert_eq!(back, m);
    assert_eq!(Digest::from_hex(&m.root().to_hex()), Some(m.root()));
});

/// Writes into `body` the root `from_digests` computes, when its header and digests agree.
fn set_root(body: &mut [u8]) {
    if body.len() < HEADER_LEN || !(body.len() - HEADER_LEN).is_multiple_of(32) {
        return;
    }
    let chunk = u64::from(u32::from_le_bytes(body[12..16].try_into().unwrap()));
    let size = u64::from_le_bytes(body[16..24].try_into().unwrap());
    let Ok(g) = ChunkSize::new(chunk).and_then(|c| Geometry::new(size, c)) else { return };
    let digests = body[HEADER_LEN..].chunks_exact(32).map(|c| Digest(c.try_into().unwrap())).collect();
    if let Ok(m) = Manifest::from_digests(g, digests) {
        body[32..64].copy_from_slice(&m.root().0);
    }
}
