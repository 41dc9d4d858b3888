//! Fuzzes cache state decoding (`store::state::decode`), which reads the presence bitmap of a
//! cache directory at start: files as read from disk (selector bit 0 clear) or resealed with the
//! right crc32c trailer (bit 0 set), checked against the image the file names itself when that
//! is a valid geometry (bit 1 clear, so the bitmap decoder is reached) or a fixed one (bit 1 set).
//! Asserts: no panic, no allocation beyond the file's size class (run with `-malloc_limit_mb`);
//! a decoded bitmap names only chunks within the image and re-encodes to a file that decodes to
//! the same bitmap.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmthunder::fsutil::seal;
use vmthunder::image::{ChunkSize, Digest, Geometry};
use vmthunder::store::state::{decode, encode};
use vmthunder_fuzz::Input;

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let sel = input.u8();
    let body = input.rest();
    let file = if sel & 1 == 0 { body.to_vec() } else { seal(body.to_vec()) };
    let fixed = Geometry::new(1 << 30, ChunkSize::DEFAULT).unwrap();
    let (g, root) = match (sel & 2 == 0).then(|| own_image(body)).flatten() {
        Some(own) => own,
        None => (fixed, Digest::of(b"fuzz")),
    };
    let Ok(bm) = decode(&file, &g, &root) else { return };
    if let Some(max) = bm.max() {
        assert!(max < g.chunk_count());
    }
    assert_eq!(decode(&encode(&g, &root, &bm), &g, &root), Ok(bm));
});

/// The geometry and root a state file declares, when they are valid.
fn own_image(body: &[u8]) -> Option<(Geometry, Digest)> {
    let chunk = u64::from(u32::from_le_bytes(body.get(12..16)?.try_into().unwrap()));
    let size = u64::from_le_bytes(body.get(16..24)?.try_into().unwrap());
    let root = Digest(body.get(24..56)?.try_into().unwrap());
    let g = ChunkSize::new(chunk).and_then(|c| Geometry::new(size, c)).ok()?;
    Some((g, root))
}
