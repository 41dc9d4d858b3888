//! Membership from tracker answers, as a pure state machine: which nodes an image's relay uses,
//! given what each tracker said and when. No I/O and no clock (callers pass `now`); vmtd's
//! heartbeat tasks and `vmt sim` feed it the same events.
//!
//! - An image's members are every node some tracker named within `window` (three heartbeats
//!   plus one second): the window smooths over a tracker restart, whose first answers list only
//!   the nodes that re-registered so far, and over a tracker that misses a beat.
//! - When no tracker has answered within the window, [`Membership::members`] says so (`None`):
//!   the caller leaves its member lists as they are and keeps using the peers it knows.
//! - Of the names of one address, at most `per_address` become members (the most recently
//!   named): no key holder makes this node dial more than that many ports of its own address.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::p2p::conn::node_host;
use crate::p2p::wire::Bytes32;

/// What the trackers said: image → node → when last named, and tracker → when last answered.
#[derive(Debug, Clone)]
pub struct Membership {
    window: Duration,
    per_address: usize,
    seen: HashMap<Bytes32, HashMap<String, Instant>>,
    answered: HashMap<usize, Instant>,
}

impl Membership {
    /// Members are the nodes named within three `heartbeat`s plus one second, at most
    /// `per_address` (at least 1) names per address.
    pub fn new(heartbeat: Duration, per_address: usize) -> Membership {
        Membership {
            window: heartbeat * 3 + Duration::from_secs(1),
            per_address: per_address.max(1),
            seen: HashMap::new(),
            answered: HashMap::new(),
        }
    }

    /// Tracker `tracker` answered at `now`, naming `nodes` for `image` (call once per image of
    /// the answer, or with no image at all via [`Membership::tracker_answered`]).
    pub fn named<'a>(
        &mut self,
        tracker: usize,
        image: Bytes32,
        nodes: impl IntoIterator<Item = &'a str>,
        now: Instant,
    ) {
        self.answered.insert(tracker, now);
        let seen = self.seen.entry(image).or_default();
        for n in nodes {
            match seen.get_mut(n) {
                Some(t) => *t = now,
                None => {
                    seen.insert(n.to_string(), now);
                }
            }
        }
    }

    /// Tracker `tracker` answered at `now` (with images or not).
    pub fn tracker_answered(&mut self, tracker: usize, now: Instant) {
        self.answered.insert(tracker, now);
    }

    /// Trackers that answered within the window.
    pub fn trackers_up(&self, now: Instant) -> usize {
        self.answered.values().filter(|t| now.saturating_duration_since(**t) <= self.window).count()
    }

    /// Forgets names older than the window, if a tracker answered within it; returns whether one
    /// did (if not, member lists are to be left as they are).
    pub fn expire(&mut self, now: Instant) -> bool {
        if self.trackers_up(now) == 0 {
            return false;
        }
        let window = self.window;
        for seen in self.seen.values_mut() {
            seen.retain(|_, t| now.saturating_duration_since(*t) <= window);
        }
        true
    }

    /// The members of `image` as of the last [`Membership::expire`]: at most `per_address` per
    /// address, the most recently named first, then by name.
    pub fn members(&self, image: &Bytes32) -> Vec<String> {
        self.seen.get(image).map(|m| per_address(m, self.per_address)).unwrap_or_default()
    }
}

/// The names of `seen`, at most `limit` per address: the most recently named first, then by name.
fn per_address(seen: &HashMap<String, Instant>, limit: usize) -> Vec<String> {
    let mut by_host: HashMap<&str, Vec<(Instant, &String)>> = HashMap::new();
    // Only canonical names: peer servers admit no other spelling, and each spelling would
    // otherwise count as an address of its own here.
    for (n, t) in seen.iter().filter(|(n, _)| crate::p2p::conn::is_canonical(n)) {
        by_host.entry(node_host(n)).or_default().push((*t, n));
    }
    let mut out = Vec::new();
    for mut names in by_host.into_values() {
        names.sort_unstable_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(b.1)));
        out.extend(names.into_iter().take(limit).map(|(_, n)| n.clone()));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_are_bounded_per_address() {
        let t0 = Instant::now();
        let mut seen: HashMap<String, Instant> = HashMap::new();
        for p in 0..1000u32 {
            seen.insert(format!("10.0.0.9:{p}"), t0 + Duration::from_millis(u64::from(p)));
        }
        seen.insert("10.0.0.1:7000".into(), t0);
        seen.insert("[fd00::1]:7000".into(), t0);
        let mut got = per_address(&seen, 8);
        got.sort();
        let mut want: Vec<String> = (992..1000).map(|p| format!("10.0.0.9:{p}")).collect();
        want.extend(["10.0.0.1:7000".to_string(), "[fd00::1]:7000".to_string()]);
        want.sort();
        assert_eq!(got, want, "the 8 most recent of the crowded address, every other one");
    }

    #[test]
    fn names_last_the_window_and_a_silent_tracker_keeps_the_lists() {
        let t0 = Instant::now();
        let hb = Duration::from_secs(1);
        let mut m = Membership::new(hb, 8);
        let img = [1; 32];
        m.named(0, img, ["10.0.0.1:7000", "10.0.0.2:7000"], t0);
        assert!(m.expire(t0));
        assert_eq!(m.members(&img).len(), 2);
        // Only one named again; the other lasts the window (4 s), then goes.
        m.named(0, img, ["10.0.0.1:7000"], t0 + Duration::from_secs(3));
        assert!(m.expire(t0 + Duration::from_secs(4)));
        assert_eq!(m.members(&img).len(), 2);
        m.named(0, img, ["10.0.0.1:7000"], t0 + Duration::from_secs(5));
        assert!(m.expire(t0 + Duration::from_secs(5)));
        assert_eq!(m.members(&img), vec!["10.0.0.1:7000"]);
        // No tracker for longer than the window: nothing changes.
        assert!(!m.expire(t0 + Duration::from_secs(20)));
        assert_eq!(m.members(&img), vec!["10.0.0.1:7000"]);
        assert_eq!(m.trackers_up(t0 + Duration::from_secs(20)), 0);
    }
}
