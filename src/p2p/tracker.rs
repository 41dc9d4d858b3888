//! The tracker: soft state only. Nodes register each image they serve (by manifest root digest)
//! with their peer address, once per heartbeat, over an authenticated session; each
//! registration is answered with the other live nodes of that image. A node not heard from for
//! `ttl` is forgotten. Restarting a tracker loses nothing that the next heartbeats do not
//! restore. An answer is bounded whatever N is: the asker's ancestors in each relay tree, a few
//! ring successors and the count of live nodes ([`Roster`]); no limit refuses a node, memory is
//! bounded by [`MAX_ENTRIES`] names and [`MAX_SESSIONS`] sessions.
//!
//! Several trackers share the load when each is given the others (`peers`): a node registers
//! with one of them (its home, see [`super::core::federation`]), each tracker places the nodes
//! it holds, and every `ttl / 3` it pushes a [`Summary`] per image to each other tracker over a
//! session of its own (authenticated like a node's, and heard only from a configured tracker),
//! so that the partitions join into one tree per class; and, for the images whose tops changed,
//! at once (at most once per rebuild interval), so that a new root anywhere is known everywhere
//! within a rebuild interval and a round trip: until then, the root it displaced reads the
//! origin for its subtree as well. Trackers that do not know each other each place their own
//! nodes only; nodes then register with all of them (`p2p.tracker_replicas`).
//!
//! A node registers under the name it proved, which must be an address of the machine it
//! connects from ([`super::admit`]), and an address has at most `per_address` names registered
//! per image and sessions open: a holder of the cluster key cannot make the nodes dial other
//! machines, nor more than `per_address` ports of its own.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::Instant;

use super::admit::Admission;
use super::auth::ClusterKey;
use super::conn::{
    client_handshake, connect_from, read_frame_within, server_handshake, write_frame, ConnError, HANDSHAKE_TIMEOUT,
    MAX_HANDSHAKES, SMALL_FRAME,
};
use super::core::federation::{Federation, SUMMARY_IMAGES};
use super::core::roster::{Answer, Ask, Recorded, Roster, MAX_CLASSES, MAX_DEPTH, MAX_NEAR, REBUILD};
use super::wire::{Bytes32, Frame, Message, Summary, MAX_MSG};

/// The image field of a tracker session's `Hello`.
pub const TRACKER_IMAGE: Bytes32 = [0; 32];
pub use super::core::roster::{MAX_ENTRIES, MAX_IMAGES};
/// Most node sessions a tracker keeps open (one per node and tracker; a socket and a task each).
pub const MAX_SESSIONS: usize = 1 << 16;

/// Summaries made for the other trackers: when, at which [`Roster::changes`], and what.
type Made = (Instant, u64, Arc<Vec<Summary>>);

/// The tracker's state: image → node → last heard.
pub struct Tracker {
    me: String,
    key: ClusterKey,
    admission: Arc<Admission>,
    /// The table itself: the pure [`Roster`] (shared with `vmt sim`).
    nodes: Mutex<Roster>,
    /// The other trackers (configured), and what they said: the pure [`Federation`].
    peers: Vec<String>,
    federation: Mutex<Federation>,
    /// The summaries last made for the other trackers, and when: made once per push period for
    /// all of them, not once per peer.
    summaries: Mutex<Option<Made>>,
    /// The roster's [`Roster::changes`] as of the last registration: the pushes wake on it.
    changed: watch::Sender<u64>,
    ttl: Duration,
    /// Registrations answered, and node sessions open, since start.
    registrations: AtomicU64,
    sessions: AtomicU64,
}

impl Tracker {
    /// A tracker named `me` (its listening address) that hands out nodes heard from within
    /// `ttl`, at most `per_address` names of each address per image, and shares the load with
    /// the trackers `peers` (`me` among them is left out).
    pub fn new(me: &str, key: ClusterKey, ttl: Duration, per_address: usize, peers: &[String]) -> Arc<Tracker> {
        let per_address = per_address.max(1);
        let mut peers: Vec<String> = peers.iter().filter(|p| p.as_str() != me).cloned().collect();
        peers.sort();
        peers.dedup();
        let roster = Roster::new(ttl, per_address).federated(!peers.is_empty());
        Arc::new(Tracker {
            me: me.into(),
            key,
            admission: Admission::new(per_address),
            nodes: Mutex::new(roster),
            peers,
            federation: Mutex::new(Federation::new(ttl)),
            summaries: Mutex::new(None),
            changed: watch::channel(0).0,
            ttl,
            registrations: AtomicU64::new(0),
            sessions: AtomicU64::new(0),
        })
    }

    /// Records `node` for `image` and answers it. A new name is not recorded (but answered)
    /// while `per_address` live names of its address are, or the table is full.
    pub fn register(&self, image: Bytes32, node: &str, ask: Ask, now: Instant) -> Answer {
        self.registrations.fetch_add(1, Ordering::Relaxed);
        let (answer, recorded, changes) = {
            let mut roster = self.nodes.lock().unwrap();
            let (mut answer, recorded) = roster.register(image, node, ask, now.into_std());
            let changes = roster.changes();
            let tops = (!self.peers.is_empty()).then(|| roster.tops(&image, ask.classes.clamp(1, MAX_CLASSES)));
            if let Some(tops) = tops.flatten() {
                let own = (tops.as_slice(), roster.placed(&image) as u32);
                self.federation.lock().unwrap().join(&image, node, ask, &mut answer, own, now.into_std());
            }
            (answer, recorded, changes)
        };
        // Registrations race to here: the count only moves forward.
        self.changed.send_if_modified(|c| {
            let newer = changes > *c;
            if newer {
                *c = changes;
            }
            newer
        });
        match recorded {
            Recorded::ImagesFull => tracing::warn!("tracker full: {MAX_IMAGES} images; registration ignored"),
            Recorded::NodesFull => tracing::debug!(node, "registration not recorded (address or table full)"),
            Recorded::Yes => {}
        }
        answer
    }

    /// Accepts node sessions until `shutdown` turns true, and pushes summaries to the other
    /// trackers meanwhile.
    pub async fn run(self: Arc<Self>, listener: TcpListener, mut shutdown: watch::Receiver<bool>) {
        for peer in 0..self.peers.len() {
            tokio::spawn(self.clone().push(peer, shutdown.clone()));
        }
        let sessions = Arc::new(tokio::sync::Semaphore::new(MAX_SESSIONS));
        let handshakes = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
        loop {
            let (s, from) = tokio::select! {
                r = listener.accept() => match r { Ok((s, a)) => (s, a.ip()), Err(_) => continue },
                _ = shutdown.wait_for(|v| *v) => return,
            };
            let (Ok(permit), Ok(shaking)) =
                (sessions.clone().try_acquire_owned(), handshakes.clone().try_acquire_owned())
            else {
                tracing::warn!("too many tracker sessions or handshakes; connection refused");
                continue;
            };
            let from_here = match self.admission.handshake(from) {
                Ok(h) => h,
                Err(e) => {
                    tracing::warn!(error = %e, "tracker connection refused");
                    continue;
                }
            };
            let me = self.clone();
            tokio::spawn(async move {
                let _permit = permit;
                me.sessions.fetch_add(1, Ordering::Relaxed);
                if let Err(e) = me.session(s, from, (shaking, from_here)).await {
                    tracing::debug!(error = %e, "tracker session ended");
                }
                me.sessions.fetch_sub(1, Ordering::Relaxed);
            });
        }
    }

    async fn session(
        &self,
        mut s: TcpStream,
        from: IpAddr,
        shaking: (tokio::sync::OwnedSemaphorePermit, super::admit::Handshaking),
    ) -> Result<(), ConnError> {
        let _ = s.set_nodelay(true);
        let handshake = server_handshake(&mut s, &self.key, &self.me, HANDSHAKE_TIMEOUT).await;
        drop(shaking);
        let auth = match handshake {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(peer = %from, error = %e, "tracker session refused");
                return Err(e);
            }
        };
        let admitted = match self.admission.admit(from, &auth.node, TRACKER_IMAGE) {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "tracker session refused");
                return Ok(());
            }
        };
        if let Some(peer) = self.peers.iter().position(|p| *p == auth.node) {
            return self.hear(s, peer, &admitted).await;
        }
        loop {
            let read = tokio::select! {
                r = read_frame_within(&mut s, SMALL_FRAME) => r?,
                _ = admitted.replaced() => return Ok(()),
            };
            let (image, ask, joined) = match read.msg {
                Message::Register { image, classes, fanout, near, joined } => {
                    (image, Ask { classes, fanout, near }, joined)
                }
                other => return Err(ConnError::Unexpected { expected: "Register", got: Box::new(other) }),
            };
            // Its name for the image carries when it joined: the trees place the first highest.
            let name = super::conn::image_name(&auth.node, joined);
            let a = self.register(image, &name, ask, Instant::now());
            let peers = Message::Peers {
                image,
                ancestors: a.ancestors,
                near: a.near,
                total: a.total,
                provisional: a.provisional,
            };
            write_frame(&mut s, &Frame::new(peers)).await?;
        }
    }
}

impl Tracker {
    /// Reads summaries from the other tracker `peer` until its session ends.
    async fn hear(&self, mut s: TcpStream, peer: usize, admitted: &super::admit::Admitted) -> Result<(), ConnError> {
        loop {
            let read = tokio::select! {
                r = read_frame_within(&mut s, MAX_MSG as usize) => r?,
                _ = admitted.replaced() => return Ok(()),
            };
            let Message::Summary { images } = read.msg else {
                return Err(ConnError::Unexpected { expected: "Summary", got: Box::new(read.msg) });
            };
            self.federation.lock().unwrap().heard(peer, images, Instant::now().into_std());
        }
    }

    /// Sends this tracker's summaries to the other tracker `peer` every `ttl / 3`, reconnecting
    /// as needed, until shutdown.
    async fn push(self: Arc<Self>, peer: usize, mut shutdown: watch::Receiver<bool>) {
        let addr = self.peers[peer].clone();
        let mut conn: Option<TcpStream> = None;
        let period = self.ttl / 3;
        let mut tick = tokio::time::interval(period.max(Duration::from_millis(10)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut was_up = true;
        let mut changed = self.changed.subscribe();
        let mut last = Instant::now();
        // The table's changes as of the last summaries the peer took.
        let mut told = 0;
        loop {
            let early = tokio::select! {
                _ = tick.tick() => false,
                Ok(()) = changed.changed() => true,
                _ = shutdown.wait_for(|v| *v) => return,
            };
            if early {
                // Tops changed: pushed now, but at most once per rebuild interval, or once a
                // second to a peer that did not answer last time (it may be down a while).
                let gap = if was_up { REBUILD } else { Duration::from_secs(1) };
                tokio::time::sleep_until(last + gap).await;
            }
            last = Instant::now();
            let changes = *changed.borrow_and_update();
            let summaries = if early {
                // Only the images whose tops changed since: the peer keeps the others' last
                // summaries for a ttl.
                let since = self.nodes.lock().unwrap().summary(told);
                if since.is_empty() {
                    continue;
                }
                Arc::new(since)
            } else {
                self.summaries(period / 2)
            };
            let limit = period.max(Duration::from_secs(1));
            let sent = tokio::time::timeout(limit, self.send(&addr, &mut conn, summaries)).await;
            match sent.unwrap_or(Err(ConnError::Timeout)) {
                Ok(()) if !was_up => {
                    tracing::info!(tracker = %addr, "peer tracker reachable again");
                    was_up = true;
                    told = changes;
                }
                Ok(()) => told = changes,
                Err(e) => {
                    if was_up {
                        tracing::warn!(tracker = %addr, error = %e, "peer tracker unreachable");
                    }
                    was_up = false;
                    conn = None;
                }
            }
        }
    }

    /// This tracker's summaries, made again if older than `fresh` or its tops changed since.
    fn summaries(&self, fresh: Duration) -> Arc<Vec<Summary>> {
        let mut made = self.summaries.lock().unwrap();
        let now = Instant::now();
        let changes = *self.changed.borrow();
        match made.as_ref() {
            Some((at, c, s)) if now.saturating_duration_since(*at) < fresh && *c == changes => s.clone(),
            _ => {
                let s = Arc::new(self.nodes.lock().unwrap().summary(0));
                *made = Some((now, changes, s.clone()));
                s
            }
        }
    }

    async fn send(
        &self,
        addr: &str,
        conn: &mut Option<TcpStream>,
        summaries: Arc<Vec<Summary>>,
    ) -> Result<(), ConnError> {
        if conn.is_none() {
            *conn = Some(open_session(addr, &self.me, &self.key).await?);
        }
        let s = conn.as_mut().expect("connected above");
        // An empty frame too: a tracker with no nodes is still heard.
        let mut frames: Vec<Vec<Summary>> = summaries.chunks(SUMMARY_IMAGES).map(<[Summary]>::to_vec).collect();
        if frames.is_empty() {
            frames.push(Vec::new());
        }
        for images in frames {
            write_frame(s, &Frame::new(Message::Summary { images })).await?;
        }
        Ok(())
    }

    /// Other trackers heard from within the TTL.
    pub fn peers_heard(&self) -> usize {
        self.federation.lock().unwrap().trackers_heard(Instant::now().into_std())
    }
}

/// A session with the tracker at `addr` as `me` (a node, or another tracker): connected from
/// `me`'s address and authenticated.
async fn open_session(addr: &str, me: &str, key: &ClusterKey) -> Result<TcpStream, ConnError> {
    let mut s = connect_from(addr, me).await?;
    s.set_nodelay(true)?;
    client_handshake(&mut s, key, me, TRACKER_IMAGE, HANDSHAKE_TIMEOUT).await?;
    Ok(s)
}

/// The tracker's Prometheus metrics, read at scrape time.
#[derive(Debug)]
pub struct TrackerMetrics(pub Arc<Tracker>);

impl std::fmt::Debug for Tracker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tracker").field("me", &self.me).finish_non_exhaustive()
    }
}

impl prometheus_client::collector::Collector for TrackerMetrics {
    fn encode(&self, mut enc: prometheus_client::encoding::DescriptorEncoder) -> crate::metrics::Fmt {
        let t = &self.0;
        let live = t.nodes.lock().unwrap().live(Instant::now().into_std());
        // Images are labelled by the first 16 hex digits of their manifest digest; the roster
        // holds at most MAX_IMAGES of them.
        let series: Vec<_> = live
            .into_iter()
            .map(|(id, n)| (vec![("image", id[..8].iter().map(|b| format!("{b:02x}")).collect::<String>())], n as i64))
            .collect();
        let mut f = crate::metrics::Families::new(&mut enc);
        f.gauge("tracker_nodes", "Live nodes registered per image.", None, &series)?;
        let load = |a: &AtomicU64| vec![(crate::metrics::Labels::new(), a.load(Ordering::Relaxed))];
        f.counter("tracker_registrations", "Registrations answered.", None, &load(&t.registrations))?;
        let open = t.sessions.load(Ordering::Relaxed) as i64;
        f.gauge(
            "tracker_sessions",
            "Sessions open (of nodes and of other trackers).",
            None,
            &[(crate::metrics::Labels::new(), open)],
        )?;
        let heard = t.peers_heard() as i64;
        f.gauge(
            "tracker_peers_heard",
            "Other trackers heard from within the TTL.",
            None,
            &[(crate::metrics::Labels::new(), heard)],
        )
    }
}

/// A node's session with one tracker, reopened as needed.
pub struct TrackerClient {
    addr: String,
    me: String,
    key: ClusterKey,
    conn: Option<TcpStream>,
}

impl TrackerClient {
    pub fn new(addr: &str, me: &str, key: ClusterKey) -> TrackerClient {
        TrackerClient { addr: addr.into(), me: me.into(), key, conn: None }
    }

    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Closes the session, if open (this node registers elsewhere now).
    pub fn close(&mut self) {
        self.conn = None;
    }

    /// Registers this node for each of `images` (with when it joined each; asking for trees of
    /// `ask`'s shape) and returns the answer for each, within `limit`. A failure drops the session; the next call
    /// reconnects.
    pub async fn heartbeat(
        &mut self,
        images: &[(Bytes32, u64)],
        ask: Ask,
        limit: Duration,
    ) -> Result<HashMap<Bytes32, Answer>, ConnError> {
        let r = tokio::time::timeout(limit, self.exchange(images, ask)).await.unwrap_or(Err(ConnError::Timeout));
        if r.is_err() {
            self.conn = None;
        }
        r
    }

    async fn exchange(&mut self, images: &[(Bytes32, u64)], ask: Ask) -> Result<HashMap<Bytes32, Answer>, ConnError> {
        if self.conn.is_none() {
            self.conn = Some(open_session(&self.addr, &self.me, &self.key).await?);
        }
        let s = self.conn.as_mut().expect("connected above");
        let mut out = HashMap::new();
        for (image, joined) in images {
            let (classes, fanout, near, joined) = (ask.classes, ask.fanout, ask.near, *joined);
            write_frame(s, &Frame::new(Message::Register { image: *image, classes, fanout, near, joined })).await?;
            match read_frame_within(s, MAX_MSG as usize).await?.msg {
                Message::Peers { image: i, mut ancestors, mut near, total, provisional } if i == *image => {
                    // Bounded whatever a tracker sends: the view is this node's peer state.
                    let ok = |n: &String| super::conn::check_node(n).is_ok();
                    ancestors.truncate(classes as usize);
                    for up in &mut ancestors {
                        up.truncate(MAX_DEPTH);
                        up.retain(ok);
                    }
                    near.truncate(ask.near.min(MAX_NEAR) as usize);
                    near.retain(ok);
                    out.insert(i, Answer { ancestors, near, total, provisional });
                }
                other => return Err(ConnError::Unexpected { expected: "Peers", got: Box::new(other) }),
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::p2p::core::roster::REBUILD;

    const ASK: Ask = Ask { classes: 4, fanout: 4, near: 8 };

    #[test]
    fn an_address_registers_at_most_per_address_names_per_image() {
        let key = ClusterKey::from_secret(b"tracker test key 0123").unwrap();
        let t = Tracker::new("t:1", key, Duration::from_secs(3), 4, &[]);
        let t0 = Instant::now();
        let img = [1; 32];
        t.register(img, "10.0.0.1:7000", ASK, t0);
        for p in 0..1000 {
            t.register(img, &format!("10.0.0.9:{p}"), ASK, t0);
        }
        let later = t0 + REBUILD;
        let a = t.register(img, "10.0.0.2:7000", ASK, later);
        assert_eq!(a.total, 6, "the first four of the crowded address, and the two others");
        let crowd: Vec<&str> = a.names().into_iter().filter(|n| n.starts_with("10.0.0.9:")).collect();
        assert!(crowd.iter().all(|n| ["10.0.0.9:0", "10.0.0.9:1", "10.0.0.9:2", "10.0.0.9:3"].contains(n)));
        assert!(a.names().contains(&"10.0.0.1:7000"), "other addresses are not crowded out");
        // Registered names stay; once they expire, others of the address may take their places.
        for s in 1..=5 {
            t.register(img, "10.0.0.9:3", ASK, t0 + Duration::from_secs(s));
            t.register(img, "10.0.0.9:500", ASK, t0 + Duration::from_secs(s));
        }
        let a = t.register(img, "10.0.0.9:501", ASK, t0 + Duration::from_secs(5) + REBUILD);
        assert!(a.names().contains(&"10.0.0.9:500") && !a.names().contains(&"10.0.0.9:0"));
    }

    #[tokio::test]
    async fn a_node_registers_over_a_real_session() {
        let key = ClusterKey::from_secret(b"tracker test key 0123").unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let t = Tracker::new(&addr, key.clone(), Duration::from_secs(3), 8, &[]);
        let (stop, rx) = watch::channel(false);
        tokio::spawn(t.run(listener, rx));
        let mut a = TrackerClient::new(&addr, "127.0.0.1:7000", key.clone());
        let mut b = TrackerClient::new(&addr, "127.0.0.2:7000", key.clone());
        let img = [9; 32];
        let limit = Duration::from_secs(5);
        a.heartbeat(&[(img, 0)], ASK, limit).await.unwrap();
        // The tracker's places follow within its rebuild interval: wait on the condition.
        let mut seen = Vec::new();
        for _ in 0..200 {
            let got = b.heartbeat(&[(img, 0)], ASK, limit).await.unwrap();
            seen = got[&img].names().into_iter().map(String::from).collect();
            if got[&img].total == 2 && !seen.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(seen, vec!["127.0.0.1:7000"]);
        let mut outsider =
            TrackerClient::new(&addr, "127.0.0.3:7000", ClusterKey::from_secret(b"not the cluster key!").unwrap());
        assert!(outsider.heartbeat(&[(img, 0)], ASK, limit).await.is_err());
        // A name that is not an address of the machine it connects from is refused.
        let mut liar = TrackerClient::new(&addr, "192.0.2.1:7000", key);
        assert!(liar.heartbeat(&[(img, 0)], ASK, limit).await.is_err());
        let _ = stop.send(true);
    }
}
