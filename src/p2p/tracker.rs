//! The tracker: soft state only. Nodes register each image they serve (by manifest root digest)
//! with their peer address, once per heartbeat, over an authenticated session; each
//! registration is answered with the other live nodes of that image. A node not heard from for
//! `ttl` is forgotten. Restarting a tracker loses nothing that the next heartbeats do not
//! restore, and nodes may register with several trackers and use the union of their answers.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::Instant;

use super::auth::ClusterKey;
use super::conn::{
    client_handshake, read_frame_within, server_handshake, write_frame, ConnError, MAX_HANDSHAKES, SMALL_FRAME,
};
use super::wire::{Bytes32, Frame, Message, MAX_MSG};

/// The image field of a tracker session's `Hello`.
pub const TRACKER_IMAGE: Bytes32 = [0; 32];
/// Most images a tracker keeps, and most nodes per image: bounds its memory whatever is sent.
pub const MAX_IMAGES: usize = 4096;
pub const MAX_NODES: usize = 4096;

/// The tracker's state: image → node → last heard.
pub struct Tracker {
    me: String,
    key: ClusterKey,
    ttl: Duration,
    nodes: Mutex<Table>,
}

/// Live nodes per image, and when expired entries of other images were last swept out.
#[derive(Default)]
struct Table {
    images: HashMap<Bytes32, HashMap<String, Instant>>,
    swept: Option<Instant>,
}

impl Tracker {
    pub fn new(me: &str, key: ClusterKey, ttl: Duration) -> Arc<Tracker> {
        Arc::new(Tracker { me: me.into(), key, ttl, nodes: Mutex::new(Table::default()) })
    }

    /// Records `node` for `image` and returns the other live nodes of `image`.
    pub fn register(&self, image: Bytes32, node: &str, now: Instant) -> Vec<String> {
        let mut table = self.nodes.lock().unwrap();
        let ttl = self.ttl;
        let live = |m: &mut HashMap<String, Instant>| {
            m.retain(|_, t| now.duration_since(*t) < ttl);
            !m.is_empty()
        };
        // Every registration expires its own image; the whole table, whose size grows with
        // images times nodes, is swept at most once per ttl.
        if table.swept.is_none_or(|t| now.duration_since(t) >= ttl) {
            table.images.retain(|_, m| live(m));
            table.swept = Some(now);
        } else if let Some(m) = table.images.get_mut(&image) {
            if !live(m) {
                table.images.remove(&image);
            }
        }
        let all = &mut table.images;
        if all.len() >= MAX_IMAGES && !all.contains_key(&image) {
            tracing::warn!("tracker full: {MAX_IMAGES} images; registration ignored");
        } else {
            let m = all.entry(image).or_default();
            if m.len() < MAX_NODES || m.contains_key(node) {
                m.insert(node.to_string(), now);
            }
        }
        let mut out: Vec<String> =
            all.get(&image).map(|m| m.keys().filter(|n| *n != node).cloned().collect()).unwrap_or_default();
        out.sort();
        out
    }

    /// Accepts node sessions until `shutdown` turns true.
    pub async fn run(self: Arc<Self>, listener: TcpListener, mut shutdown: watch::Receiver<bool>) {
        let sessions = Arc::new(tokio::sync::Semaphore::new(MAX_NODES));
        let handshakes = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
        loop {
            let s = tokio::select! {
                r = listener.accept() => match r { Ok((s, _)) => s, Err(_) => continue },
                _ = shutdown.wait_for(|v| *v) => return,
            };
            let (Ok(permit), Ok(shaking)) =
                (sessions.clone().try_acquire_owned(), handshakes.clone().try_acquire_owned())
            else {
                tracing::warn!("too many tracker sessions or handshakes; connection refused");
                continue;
            };
            let me = self.clone();
            tokio::spawn(async move {
                let _permit = permit;
                if let Err(e) = me.session(s, shaking).await {
                    tracing::debug!(error = %e, "tracker session ended");
                }
            });
        }
    }

    async fn session(&self, mut s: TcpStream, shaking: tokio::sync::OwnedSemaphorePermit) -> Result<(), ConnError> {
        let _ = s.set_nodelay(true);
        let handshake = server_handshake(&mut s, &self.key, &self.me).await;
        drop(shaking);
        let auth = match handshake {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(peer = ?s.peer_addr().ok(), error = %e, "tracker session refused");
                return Err(e);
            }
        };
        loop {
            let image = match read_frame_within(&mut s, SMALL_FRAME).await?.msg {
                Message::Register { image } => image,
                other => return Err(ConnError::Unexpected { expected: "Register", got: Box::new(other) }),
            };
            let nodes = self.register(image, &auth.node, Instant::now());
            write_frame(&mut s, &Frame::new(Message::Peers { image, nodes })).await?;
        }
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

    /// Registers this node for each of `images` and returns the peers of each, within `limit`.
    /// A failure drops the session; the next call reconnects.
    pub async fn heartbeat(
        &mut self,
        images: &[Bytes32],
        limit: Duration,
    ) -> Result<HashMap<Bytes32, BTreeSet<String>>, ConnError> {
        let r = tokio::time::timeout(limit, self.exchange(images)).await.unwrap_or(Err(ConnError::Timeout));
        if r.is_err() {
            self.conn = None;
        }
        r
    }

    async fn exchange(&mut self, images: &[Bytes32]) -> Result<HashMap<Bytes32, BTreeSet<String>>, ConnError> {
        if self.conn.is_none() {
            let mut s = TcpStream::connect(&self.addr).await?;
            s.set_nodelay(true)?;
            client_handshake(&mut s, &self.key, &self.me, TRACKER_IMAGE).await?;
            self.conn = Some(s);
        }
        let s = self.conn.as_mut().expect("connected above");
        let mut out = HashMap::new();
        for image in images {
            write_frame(s, &Frame::new(Message::Register { image: *image })).await?;
            match read_frame_within(s, MAX_MSG as usize).await?.msg {
                Message::Peers { image: i, nodes } if i == *image => {
                    out.insert(i, nodes.into_iter().filter(|n| super::conn::check_node(n).is_ok()).collect());
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

    #[test]
    fn nodes_expire_after_the_ttl_and_never_see_themselves() {
        let key = ClusterKey::from_secret(b"tracker test key 0123").unwrap();
        let t = Tracker::new("t:1", key, Duration::from_secs(3));
        let t0 = Instant::now();
        let img = [1; 32];
        assert!(t.register(img, "a:1", t0).is_empty());
        assert_eq!(t.register(img, "b:1", t0), vec!["a:1"]);
        assert_eq!(t.register([2; 32], "c:1", t0), Vec::<String>::new(), "images are apart");
        assert_eq!(t.register(img, "b:1", t0 + Duration::from_secs(2)), vec!["a:1"]);
        assert_eq!(t.register(img, "b:1", t0 + Duration::from_secs(4)), Vec::<String>::new(), "a expired");
    }

    #[tokio::test]
    async fn a_node_registers_over_a_real_session() {
        let key = ClusterKey::from_secret(b"tracker test key 0123").unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let t = Tracker::new(&addr, key.clone(), Duration::from_secs(3));
        let (stop, rx) = watch::channel(false);
        tokio::spawn(t.run(listener, rx));
        let mut a = TrackerClient::new(&addr, "10.0.0.1:7000", key.clone());
        let mut b = TrackerClient::new(&addr, "10.0.0.2:7000", key);
        let img = [9; 32];
        a.heartbeat(&[img], Duration::from_secs(5)).await.unwrap();
        let peers = b.heartbeat(&[img], Duration::from_secs(5)).await.unwrap();
        assert_eq!(peers[&img].iter().collect::<Vec<_>>(), vec!["10.0.0.1:7000"]);
        let mut outsider =
            TrackerClient::new(&addr, "10.0.0.3:7000", ClusterKey::from_secret(b"not the cluster key!").unwrap());
        assert!(outsider.heartbeat(&[img], Duration::from_secs(5)).await.is_err());
        let _ = stop.send(true);
    }
}
