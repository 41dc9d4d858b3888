//! Synthetic images for benchmarks and tests of many images: sparse files whose every chunk
//! starts with a few KiB unique to (seed, chunk), so images differ chunk by chunk, are cheap to
//! make, and every chunk read can be checked. The rest of each chunk is a hole.

use std::os::unix::fs::FileExt;
use std::path::Path;

/// Bytes at the start of each chunk that carry its identity.
pub const HEAD: usize = 4096;

/// Writes the synthetic image (`size` bytes, chunks of `chunk` bytes) for `seed` at `path`.
pub fn write(path: &Path, size: u64, chunk: u64, seed: u64) -> std::io::Result<()> {
    if chunk < HEAD as u64 {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "chunk must be at least 4KiB"));
    }
    let f = std::fs::File::create(path)?;
    f.set_len(size)?;
    let mut head = vec![0u8; HEAD];
    for c in 0..size.div_ceil(chunk) {
        let mut x = (seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ c.wrapping_mul(0xbf58_476d_1ce4_e5b9)) | 1;
        for b in head.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        let at = c * chunk;
        let n = (size - at).min(HEAD as u64) as usize;
        f.write_all_at(&head[..n], at)?;
    }
    f.sync_all()
}

#[cfg(test)]
mod tests {
    #[test]
    fn images_differ_by_seed_and_chunk() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        super::write(&a, 3 * 65536 + 100, 65536, 1).unwrap();
        super::write(&b, 3 * 65536 + 100, 65536, 2).unwrap();
        let (a, b) = (std::fs::read(a).unwrap(), std::fs::read(b).unwrap());
        assert_eq!(a.len(), 3 * 65536 + 100);
        assert_ne!(a[..4096], b[..4096]);
        assert_ne!(a[..4096], a[65536..65536 + 4096]);
        assert!(a[4096..65536].iter().all(|&x| x == 0));
        assert_ne!(a[3 * 65536..], [0u8; 100]);
    }
}
