//! vmtd's part in the peer-to-peer relay: its peer server and its tracker heartbeats.
//!
//! One heartbeat task registers every image with a swarm at `tracker_replicas` trackers: the
//! first that answer in this node's own order of them (its home first, see
//! `p2p::core::federation::rank`); a tracker that fails is passed over for [`RETRY_BEATS`]
//! heartbeats, then tried again in its turn, so nodes go home after a restart. Each image's
//! member list is every node some tracker named within the last three heartbeats. That window
//! smooths over a failover or a tracker restart (its first answers list only the nodes that
//! re-registered so far). When no tracker has answered within the window, members are left as
//! they were: the node keeps using the peers it knows, and the origin. Of the names of one address, at most `peers_per_address`
//! become members (the most recently named), so that no key holder makes this node dial more
//! than that many ports of its own address, whatever it registers.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use super::control::NodeP2pStatus;
use super::image::PeerContext;
use super::Daemon;
use crate::config::P2pTuning;
use crate::p2p::auth::ClusterKey;
use crate::p2p::core::federation::rank;
use crate::p2p::core::roster::NEAR;
use crate::p2p::core::{Ask, Membership};
use crate::p2p::server::{PeerExport, PeerLookup, PeerServer, UploadLimits};
use crate::p2p::tracker::TrackerClient;
use crate::p2p::wire::Bytes32;

use crate::p2p::core::upload::MAX_QUEUE;

/// Heartbeats a tracker that failed is passed over for (tried only if no other answers).
pub const RETRY_BEATS: u64 = 10;

/// The node's peer-to-peer state.
pub struct Peers {
    pub ctx: PeerContext,
    pub server: Arc<PeerServer>,
    heartbeat: Duration,
    /// The relay trees' shape this node asks the trackers for.
    ask: Ask,
    /// What the trackers said: the pure [`Membership`] (shared with `vmt sim`).
    answers: Mutex<Membership>,
    trackers_up: AtomicU64,
}

/// Finds images for the peer server without keeping the daemon alive.
struct Lookup(Weak<Daemon>);

impl PeerLookup for Lookup {
    fn find(&self, image: &Bytes32) -> Option<Arc<dyn PeerExport>> {
        let d = self.0.upgrade()?;
        let images = d.images.read().unwrap();
        images.values().find(|i| i.swarm.is_some() && i.manifest.root().0 == *image).map(|i| i.clone() as _)
    }
}

impl Peers {
    pub fn new(t: &P2pTuning, key: ClusterKey, daemon: Weak<Daemon>) -> Peers {
        let ctx = PeerContext {
            me: t.advertise.clone(),
            key: key.clone(),
            stall: t.peer_stall,
            request_timeout: t.peer_timeout,
            stripe: t.stripe,
            fanout: t.fanout,
            classes: t.classes,
            max_sessions: t.max_sessions,
            push: t.push,
            pack: t.pack,
        };
        let limits = UploadLimits {
            slots: t.upload_slots,
            rate: t.upload_rate,
            session_rate: t.session_rate,
            max_queue: MAX_QUEUE,
            buffer: t.upload_buffer,
            per_address: t.peers_per_address,
            handshake_timeout: t.handshake_timeout,
        };
        let server = PeerServer::new(&t.advertise, key, Arc::new(Lookup(daemon)), limits);
        Peers {
            ctx,
            server,
            heartbeat: t.heartbeat,
            ask: Ask { classes: t.classes, fanout: t.fanout, near: NEAR },
            answers: Mutex::new(Membership::new(t.heartbeat, t.peers_per_address)),
            trackers_up: AtomicU64::new(0),
        }
    }

    pub fn status(&self) -> NodeP2pStatus {
        let s = self.server.stats();
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        NodeP2pStatus {
            node: self.ctx.me.clone(),
            sessions: load(&s.sessions),
            refused: load(&s.refused),
            requests: load(&s.requests),
            busy: load(&s.busy),
            not_have: load(&s.not_have),
            open_sessions: load(&s.open),
            reply_bytes: load(&s.buffered),
            reply_bytes_peak: load(&s.buffered_peak),
            children: load(&s.children),
            pushes: load(&s.pushes),
            pushes_skipped: load(&s.pushes_skipped),
            pushes_answered: load(&s.pushes_answered),
            parts: load(&s.parts),
            cut_through: load(&s.cut_through),
            push_parts: load(&s.push_parts),
            packed_bytes: load(&s.packed_bytes),
            packed_wire_bytes: load(&s.packed_wire),
            trackers_up: load(&self.trackers_up),
        }
    }

    /// Registers with `replicas` of `trackers` every heartbeat until shutdown.
    pub async fn heartbeats(
        daemon: Weak<Daemon>,
        trackers: Vec<String>,
        replicas: usize,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let Some(peers) = daemon.upgrade().and_then(|d| d.peers.clone()) else { return };
        let me = &peers.ctx.me;
        let mut clients: Vec<TrackerClient> =
            trackers.iter().map(|a| TrackerClient::new(a, me, peers.ctx.key.clone())).collect();
        let order = rank(me, &trackers);
        // Per tracker: the heartbeat it last failed at, and whether it answered last time.
        let mut failed: Vec<Option<u64>> = vec![None; trackers.len()];
        let mut was_up = vec![true; trackers.len()];
        let mut tick = tokio::time::interval(peers.heartbeat);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        for beat in 0u64.. {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.wait_for(|v| *v) => return,
            }
            let Some(d) = daemon.upgrade() else { return };
            let ids: Vec<(Bytes32, u64)> = d
                .images
                .read()
                .unwrap()
                .values()
                .filter_map(|i| Some((i.manifest.root().0, i.swarm.as_ref()?.joined())))
                .collect();
            if ids.is_empty() {
                continue;
            }
            let limit = peers.heartbeat.max(Duration::from_secs(1));
            // Trackers that failed lately are tried only when no other answered: each may take
            // `limit` to fail again, and a heartbeat that took several would come late.
            let resting = |i: usize| failed[i].is_some_and(|b| beat < b + RETRY_BEATS);
            let (fresh, rest): (Vec<usize>, Vec<usize>) = order.iter().partition(|&&i| !resting(i));
            let mut served = 0;
            for (i, retry) in fresh.into_iter().map(|i| (i, false)).chain(rest.into_iter().map(|i| (i, true))) {
                if served == replicas || (retry && served > 0) {
                    clients[i].close();
                    continue;
                }
                match clients[i].heartbeat(&ids, peers.ask, limit).await {
                    Ok(answer) => {
                        if !was_up[i] {
                            tracing::info!(tracker = %clients[i].addr(), "tracker reachable again");
                        }
                        (served, failed[i], was_up[i]) = (served + 1, None, true);
                        let now = Instant::now().into_std();
                        let mut a = peers.answers.lock().unwrap();
                        a.tracker_answered(i, now);
                        for (image, answer) in answer {
                            a.named(i, image, answer, now);
                        }
                    }
                    Err(e) => {
                        if was_up[i] {
                            tracing::warn!(tracker = %clients[i].addr(), error = %e, "tracker unreachable; trying the next");
                        }
                        (failed[i], was_up[i]) = (Some(beat), false);
                    }
                }
            }
            peers.apply(&d);
        }
    }

    /// Sets each image's view to what the trackers said within the window, if any answered
    /// within it.
    fn apply(&self, d: &Daemon) {
        let now = Instant::now().into_std();
        let mut a = self.answers.lock().unwrap();
        self.trackers_up.store(a.trackers_up(now) as u64, Ordering::Relaxed);
        if !a.expire(now) {
            return;
        }
        for img in d.images.read().unwrap().values() {
            let Some(swarm) = &img.swarm else { continue };
            swarm.set_view(&a.view(&img.manifest.root().0));
        }
    }
}
