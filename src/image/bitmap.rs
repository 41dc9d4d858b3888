//! Chunk bitmaps as stored (the cache's presence map) and as sent (a peer's have-map): the
//! portable Roaring serialization, decoded strictly.
//!
//! `RoaringBitmap::deserialize_from` checks each container on its own, not the whole: it takes
//! containers in any key order, the same key twice, and containers of zero runs. Such a bitmap
//! answers `max()` and `contains()` wrongly (so a range check on `max()` misses chunks beyond
//! the image) and panics when it is serialized again. [`decode`] refuses all of that.

use roaring::RoaringBitmap;

/// The cookie of the form without run containers, the only one `serialize_into` writes.
const SERIAL_COOKIE_NO_RUNCONTAINER: u32 = 12346;

/// Decodes a serialized bitmap in the form `serialize_into` writes (no run containers, keys
/// strictly increasing) that fills `bytes` exactly; `None` for anything else.
///
/// Costs one pass over the container headers on top of Roaring's own checks, which already
/// refuse an array container out of order or a bitmap container whose bit count is not its
/// cardinality: without runs, no container can be empty or stored in the wrong form.
pub fn decode(bytes: &[u8]) -> Option<RoaringBitmap> {
    let word = |at: usize| bytes.get(at..at + 4).map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")));
    if word(0)? != SERIAL_COOKIE_NO_RUNCONTAINER {
        return None;
    }
    // (key u16, cardinality - 1 u16) per container, right after the count.
    let count = word(4)? as usize;
    let headers = bytes.get(8..8 + 4 * count)?;
    if !headers.chunks_exact(4).map(|h| u16::from_le_bytes([h[0], h[1]])).is_sorted_by(|a, b| a < b) {
        return None;
    }
    let map = RoaringBitmap::deserialize_from(bytes).ok()?;
    (map.serialized_size() == bytes.len()).then_some(map)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(map: &RoaringBitmap) -> Vec<u8> {
        let mut v = Vec::new();
        map.serialize_into(&mut v).unwrap();
        v
    }

    /// A map without runs: cookie, container count, (key, cardinality - 1) per container,
    /// offsets, then each container's sorted values.
    fn arrays(containers: &[(u16, &[u16])]) -> Vec<u8> {
        let mut v = 12346u32.to_le_bytes().to_vec();
        v.extend((containers.len() as u32).to_le_bytes());
        for (key, values) in containers {
            v.extend(key.to_le_bytes());
            v.extend((values.len() as u16 - 1).to_le_bytes());
        }
        let mut offset = 8 + 8 * containers.len() as u32;
        for (_, values) in containers {
            v.extend(offset.to_le_bytes());
            offset += 2 * values.len() as u32;
        }
        for (_, values) in containers {
            values.iter().for_each(|x| v.extend(x.to_le_bytes()));
        }
        v
    }

    #[test]
    fn canonical_maps_decode() {
        let mut dense: RoaringBitmap = (0..100_000).collect();
        dense.insert(1 << 30);
        for map in [RoaringBitmap::new(), [1u32, 5, 70_000].into_iter().collect(), dense] {
            assert_eq!(decode(&bytes(&map)), Some(map));
        }
        assert_eq!(decode(&arrays(&[(0, &[1, 2]), (3, &[7])])), Some([1, 2, (3 << 16) | 7].into_iter().collect()));
    }

    #[test]
    fn non_canonical_maps_are_refused() {
        // Roaring's own decoder takes each of these.
        let unsorted = arrays(&[(3, &[7]), (0, &[1, 2])]);
        let m = RoaringBitmap::deserialize_from(&unsorted[..]).unwrap();
        assert_eq!(m.max(), Some(2), "max() misses chunk 3 << 16 | 7");
        assert_eq!(decode(&unsorted), None);
        assert_eq!(decode(&arrays(&[(0, &[1]), (0, &[2])])), None, "the same key twice");
        // One container of zero runs (the cookie with runs, its run flag set, key 0).
        let empty_run = [0x3b, 0x30, 0, 0, 1, 0, 0, 0, 0, 0, 0];
        assert!(RoaringBitmap::deserialize_from(&empty_run[..]).is_ok());
        assert_eq!(decode(&empty_run), None);
        let mut trailing = bytes(&[4u32].into_iter().collect());
        trailing.push(0);
        assert_eq!(decode(&trailing), None);
        assert_eq!(decode(&[]), None);
    }
}
