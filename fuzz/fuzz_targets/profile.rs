//! Fuzzes boot profile decoding (`Profile::decode`, `Profile::decode_for`): files as read from
//! disk (selector 0), and files resealed with the right crc32c trailer, so the fuzzer reaches
//! the header checks and the postcard body behind the checksum (1).
//! Asserts: no panic; every decoded chunk is within the image and named once; a decoded profile
//! re-encodes to a file that decodes to the same profile, also after merging it with itself;
//! `decode_for` accepts it for its own image.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmthunder::fsutil::seal;
use vmthunder::image::{ChunkSize, Geometry};
use vmthunder::profile::Profile;
use vmthunder_fuzz::Input;

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let sel = input.u8();
    let file = if sel & 1 == 0 { input.rest().to_vec() } else { seal(input.rest().to_vec()) };
    let Ok(p) = Profile::decode(&file) else { return };
    let g = Geometry::new(p.image_size, ChunkSize::new(p.chunk_size).unwrap()).unwrap();
    let mut seen = std::collections::HashSet::new();
    for e in &p.entries {
        assert!(e.chunk < g.chunk_count());
        assert!(seen.insert(e.chunk));
    }
    assert!(p.entries.windows(2).all(|w| w[0].deadline_ms <= w[1].deadline_ms));
    assert_eq!(Profile::decode_for(&file, &p.root, &g).as_ref(), Ok(&p));
    assert_eq!(Profile::decode(&p.encode()).as_ref(), Ok(&p));
    let _ = p.bytes();
    let merged = p.merge(&p, u32::from(sel >> 1)).unwrap();
    assert_eq!(merged.entries.len(), p.entries.len());
    assert_eq!(Profile::decode(&merged.encode()), Ok(merged));
});
