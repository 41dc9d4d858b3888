//! Membership from tracker answers, as a pure state machine: the [`View`] an image's relay uses
//! (its ancestors in each tree, its ring successors, the number of live nodes), given what each
//! tracker said and when. No I/O and no clock (callers pass `now`); vmtd's
//! heartbeat tasks and `vmt sim` feed it the same events.
//!
//! - Each tracker's latest answer counts for `window` (three heartbeats plus one second): the
//!   window smooths over a tracker that misses a beat. The ancestors come from the freshest
//!   answer that carried final places, however old: a tracker warming up after a restart or an
//!   outage gives provisional places, which a node takes only if it has none, and otherwise it
//!   keeps the ones it had (stale places cost a failed
//!   request to a dead ancestor at worst, never a loop). The ring successors are the union of
//!   the answers in the window.
//! - When no tracker has answered within the window, [`Membership::expire`] says so (`false`):
//!   the caller leaves its views as they are and keeps using the peers it knows.
//! - Of the names of one address, at most `per_address` become members (the most recently
//!   named): no key holder makes this node dial more than that many ports of its own address.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use super::roster::Answer;
use crate::p2p::conn::node_host;
use crate::p2p::wire::Bytes32;

/// What a node knows of an image's members: bounded whatever N is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct View {
    /// Per class, this node's ancestors (parent first), from the freshest answer.
    pub ancestors: Vec<Vec<String>>,
    /// Ring successors named within the window (by any tracker), at most `per_address` per
    /// address.
    pub near: Vec<String>,
    /// Whether `ancestors` are a tracker's places (else the trees are ranked over the names).
    pub placed: bool,
    /// Live nodes of the image, as the freshest answer said.
    pub total: u32,
    /// Whether the places are a warming tracker's (no final ones yet): then the node opens no
    /// session before it needs one. A table warming up after a cold start places every node
    /// against its first few nodes, which would gather sessions from much of the cluster.
    pub provisional: bool,
}

/// What the trackers said: image → tracker → (answer, when), and tracker → when last answered.
#[derive(Debug, Clone)]
pub struct Membership {
    window: Duration,
    per_address: usize,
    seen: HashMap<Bytes32, HashMap<usize, (Answer, Instant)>>,
    /// Per image, the freshest places any tracker gave, with the count of live nodes then and
    /// whether they were provisional.
    placed: HashMap<Bytes32, (Vec<Vec<String>>, u32, bool)>,
    answered: HashMap<usize, Instant>,
}

impl Membership {
    /// Answers count for three `heartbeat`s plus one second; at most `per_address` (at least 1)
    /// names per address.
    pub fn new(heartbeat: Duration, per_address: usize) -> Membership {
        Membership {
            window: heartbeat * 3 + Duration::from_secs(1),
            per_address: per_address.max(1),
            seen: HashMap::new(),
            placed: HashMap::new(),
            answered: HashMap::new(),
        }
    }

    /// Tracker `tracker` answered at `now` for `image`.
    pub fn named(&mut self, tracker: usize, image: Bytes32, answer: Answer, now: Instant) {
        self.answered.insert(tracker, now);
        let had_final = self.placed.get(&image).is_some_and(|p| !p.2);
        if !answer.ancestors.is_empty() && (!answer.provisional || !had_final) {
            self.placed.insert(image, (answer.ancestors.clone(), answer.total, answer.provisional));
        }
        self.seen.entry(image).or_default().insert(tracker, (answer, now));
    }

    /// Tracker `tracker` answered at `now` (with images or not).
    pub fn tracker_answered(&mut self, tracker: usize, now: Instant) {
        self.answered.insert(tracker, now);
    }

    /// Trackers that answered within the window.
    pub fn trackers_up(&self, now: Instant) -> usize {
        self.answered.values().filter(|t| now.saturating_duration_since(**t) <= self.window).count()
    }

    /// Forgets answers older than the window, if a tracker answered within it; returns whether
    /// one did (if not, views are to be left as they are).
    pub fn expire(&mut self, now: Instant) -> bool {
        if self.trackers_up(now) == 0 {
            return false;
        }
        let window = self.window;
        for seen in self.seen.values_mut() {
            seen.retain(|_, (_, t)| now.saturating_duration_since(*t) <= window);
        }
        // An image no tracker answered for within the window is no longer served here.
        self.seen.retain(|_, m| !m.is_empty());
        let seen = &self.seen;
        self.placed.retain(|img, _| seen.contains_key(img));
        true
    }

    /// The view of `image` as of the last [`Membership::expire`].
    pub fn view(&self, image: &Bytes32) -> View {
        let mut view = View::default();
        if let Some((ancestors, total, provisional)) = self.placed.get(image) {
            let (ancestors, total, provisional) = (ancestors.clone(), *total, *provisional);
            view = View { ancestors, placed: true, total, provisional, ..View::default() };
        }
        let Some(answers) = self.seen.get(image) else { return view };
        if let Some((a, _)) = answers.values().max_by_key(|(_, t)| *t) {
            view.total = a.total;
        }
        let mut near: HashMap<String, Instant> = HashMap::new();
        for (a, t) in answers.values() {
            for n in &a.near {
                let e = near.entry(n.clone()).or_insert(*t);
                *e = (*e).max(*t);
            }
        }
        view.near = per_address(&near, self.per_address);
        view.near.sort();
        // Only canonical names (peer servers admit no other spelling); the tracker bounds the
        // names per address it records, so ancestors need no bound of their own here.
        for up in &mut view.ancestors {
            up.retain(|n| crate::p2p::conn::is_canonical(n));
        }
        view
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

    fn answer(near: &[&str], parent: &str) -> Answer {
        Answer {
            ancestors: vec![vec![parent.to_string()], vec![]],
            near: near.iter().map(|n| n.to_string()).collect(),
            total: 9,
            provisional: false,
        }
    }

    #[test]
    fn answers_last_the_window_and_a_silent_tracker_keeps_the_view() {
        let t0 = Instant::now();
        let hb = Duration::from_secs(1);
        let mut m = Membership::new(hb, 8);
        let img = [1; 32];
        m.named(0, img, answer(&["10.0.0.1:7000", "10.0.0.2:7000"], "10.0.0.3:7000"), t0);
        m.named(1, img, answer(&["10.0.0.4:7000", "bad name"], "10.0.0.5:7000"), t0 + Duration::from_secs(1));
        assert!(m.expire(t0 + Duration::from_secs(1)));
        let v = m.view(&img);
        assert_eq!(v.near, vec!["10.0.0.1:7000", "10.0.0.2:7000", "10.0.0.4:7000"], "union, canonical names only");
        assert_eq!(v.ancestors, vec![vec!["10.0.0.5:7000".to_string()], vec![]], "the freshest answer's places");
        assert!(v.placed && v.total == 9);
        // Tracker 0 falls silent: its answer lasts the window (4 s), then goes.
        m.named(1, img, answer(&["10.0.0.4:7000"], "10.0.0.5:7000"), t0 + Duration::from_secs(5));
        assert!(m.expire(t0 + Duration::from_secs(5)));
        assert_eq!(m.view(&img).near, vec!["10.0.0.4:7000"]);
        // No tracker for longer than the window: nothing changes.
        assert!(!m.expire(t0 + Duration::from_secs(20)));
        assert_eq!(m.view(&img).near, vec!["10.0.0.4:7000"]);
        assert_eq!(m.trackers_up(t0 + Duration::from_secs(20)), 0);
    }

    #[test]
    fn provisional_places_are_marked_and_never_replace_final_ones() {
        let t0 = Instant::now();
        let mut m = Membership::new(Duration::from_secs(1), 8);
        let img = [1; 32];
        let warm = |parent: &str| Answer { provisional: true, ..answer(&["10.0.0.1:7000"], parent) };
        m.named(0, img, warm("10.0.0.3:7000"), t0);
        m.expire(t0);
        let v = m.view(&img);
        assert!(v.placed && v.provisional, "a warming tracker's places, marked");
        m.named(0, img, answer(&["10.0.0.1:7000"], "10.0.0.5:7000"), t0);
        m.expire(t0);
        assert!(!m.view(&img).provisional);
        m.named(0, img, warm("10.0.0.6:7000"), t0);
        m.expire(t0);
        let v = m.view(&img);
        assert!(!v.provisional && v.ancestors[0] == vec!["10.0.0.5:7000".to_string()], "final places stay");
    }
}
