//! The tracker's table as a pure state machine: which nodes serve which image, by the time each
//! last registered. No I/O and no clock: callers pass `now` (vmtd's tracker `Instant::now()`,
//! `vmt sim` its virtual clock), so the simulator answers heartbeats with this very code.
//!
//! Invariants: a node is answered only while it registered within `ttl`; at most
//! [`MAX_IMAGES`] images of at most [`MAX_NODES`] nodes each are kept, whatever is sent; a new
//! name is recorded (but still answered) only while fewer than `per_address` live names of its
//! address are; an answer never names the node that asked, and is sorted.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::p2p::conn::node_host;
use crate::p2p::wire::Bytes32;

/// Most images a tracker keeps, and most nodes per image: bounds its memory whatever is sent.
pub const MAX_IMAGES: usize = 4096;
pub const MAX_NODES: usize = 4096;

/// Live nodes per image, and when expired entries of other images were last swept out.
#[derive(Debug, Clone)]
pub struct Roster {
    ttl: Duration,
    per_address: usize,
    images: HashMap<Bytes32, HashMap<String, Instant>>,
    swept: Option<Instant>,
}

/// What one registration did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recorded {
    Yes,
    /// The tracker holds [`MAX_IMAGES`] images already.
    ImagesFull,
    /// The image holds [`MAX_NODES`] nodes, or `per_address` live names of the node's address.
    NodesFull,
}

impl Roster {
    /// A table that forgets a node `ttl` after its last registration, with at most `per_address`
    /// (at least 1) names of each address per image.
    pub fn new(ttl: Duration, per_address: usize) -> Roster {
        Roster { ttl, per_address: per_address.max(1), images: HashMap::new(), swept: None }
    }

    /// Records `node` for `image` and returns the other live nodes of `image`, sorted, with
    /// whether the node was recorded.
    pub fn register(&mut self, image: Bytes32, node: &str, now: Instant) -> (Vec<String>, Recorded) {
        let ttl = self.ttl;
        let live = |m: &mut HashMap<String, Instant>| {
            m.retain(|_, t| now.saturating_duration_since(*t) < ttl);
            !m.is_empty()
        };
        // Every registration expires its own image; the whole table, whose size grows with
        // images times nodes, is swept at most once per ttl.
        if self.swept.is_none_or(|t| now.saturating_duration_since(t) >= ttl) {
            self.images.retain(|_, m| live(m));
            self.swept = Some(now);
        } else if let Some(m) = self.images.get_mut(&image) {
            if !live(m) {
                self.images.remove(&image);
            }
        }
        let recorded = if self.images.len() >= MAX_IMAGES && !self.images.contains_key(&image) {
            Recorded::ImagesFull
        } else {
            let m = self.images.entry(image).or_default();
            let host = node_host(node);
            let known = m.contains_key(node);
            if known || (m.len() < MAX_NODES && m.keys().filter(|n| node_host(n) == host).count() < self.per_address) {
                m.insert(node.to_string(), now);
                Recorded::Yes
            } else {
                Recorded::NodesFull
            }
        };
        let mut out: Vec<String> =
            self.images.get(&image).map(|m| m.keys().filter(|n| *n != node).cloned().collect()).unwrap_or_default();
        out.sort();
        (out, recorded)
    }

    /// Nodes recorded for `image` (live or not yet swept).
    pub fn nodes(&self, image: &Bytes32) -> usize {
        self.images.get(image).map_or(0, HashMap::len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nodes_expire_after_the_ttl_and_never_see_themselves() {
        let mut t = Roster::new(Duration::from_secs(3), 8);
        let t0 = Instant::now();
        let img = [1; 32];
        assert!(t.register(img, "a:1", t0).0.is_empty());
        assert_eq!(t.register(img, "b:1", t0).0, vec!["a:1"]);
        assert_eq!(t.register([2; 32], "c:1", t0).0, Vec::<String>::new(), "images are apart");
        assert_eq!(t.register(img, "b:1", t0 + Duration::from_secs(2)).0, vec!["a:1"]);
        assert_eq!(t.register(img, "b:1", t0 + Duration::from_secs(4)).0, Vec::<String>::new(), "a expired");
    }

    #[test]
    fn an_image_holds_at_most_max_nodes() {
        let mut t = Roster::new(Duration::from_secs(3), 8);
        let t0 = Instant::now();
        let img = [1; 32];
        for i in 0..MAX_NODES as u32 + 10 {
            let name = format!("10.{}.{}.{}:7000", i >> 16, (i >> 8) & 255, i & 255);
            let (_, r) = t.register(img, &name, t0);
            assert_eq!(r == Recorded::Yes, (i as usize) < MAX_NODES);
        }
        assert_eq!(t.nodes(&img), MAX_NODES);
    }
}
