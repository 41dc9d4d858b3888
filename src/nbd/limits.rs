//! What NBD clients may cost a node: connections, bytes in flight, and time.
//!
//! Every reply's bytes are charged to its connection's budget and then to the node's before the
//! read that produces them starts, and are released only once the reply is written: a client
//! that stops reading its replies stops being served at its own budget, and all clients
//! together never hold more than the node's. Reads longer than [`PIECE`] are produced and
//! written a piece at a time, with the room for two pieces reserved from both budgets by the
//! request reader before the read is queued: the writer, which alone gives budgets back, never
//! waits for one, so no connection can wait on itself and no set of them on each other.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The most bytes of one read produced and held at once; longer reads are streamed in pieces.
pub const PIECE: u32 = 1 << 20;

/// The configured limits (the `[nbd]` section; README, "Limits").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NbdLimits {
    /// Connections on all exports and listeners of the node, handshakes included.
    pub max_connections: usize,
    /// Connections in the transmission phase per export.
    pub max_connections_per_export: u64,
    /// Reply bytes in flight per connection (at least [`PIECE`]).
    pub connection_bytes: usize,
    /// Reply bytes in flight on the whole node (at least `connection_bytes`).
    pub node_bytes: usize,
    /// Longest time from accept to the end of option haggling.
    pub handshake_timeout: Duration,
    /// Longest time one reply write may take, and one write payload to arrive.
    pub write_timeout: Duration,
    /// A connection with nothing in flight for this long is closed (`None`: never).
    pub idle_timeout: Option<Duration>,
}

impl Default for NbdLimits {
    fn default() -> Self {
        NbdLimits {
            max_connections: 1024,
            max_connections_per_export: 256,
            connection_bytes: 4 << 20,
            node_bytes: 256 << 20,
            handshake_timeout: Duration::from_secs(10),
            write_timeout: Duration::from_secs(30),
            idle_timeout: None,
        }
    }
}

/// The node's shared budgets: one per daemon, handed to every listener.
pub struct Budgets {
    pub limits: NbdLimits,
    connections: Arc<Semaphore>,
    node_bytes: Arc<Semaphore>,
    /// Connections refused because the node was at `max_connections` or an export at its cap.
    pub refused: AtomicU64,
    warning: crate::throttle::Throttle,
}

/// Bytes charged to a connection and the node, released on drop (once the reply is written).
pub struct Held {
    _connection: Option<OwnedSemaphorePermit>,
    _node: OwnedSemaphorePermit,
}

impl Budgets {
    pub fn new(limits: NbdLimits) -> Arc<Self> {
        Arc::new(Budgets {
            limits,
            connections: Arc::new(Semaphore::new(limits.max_connections)),
            node_bytes: Arc::new(Semaphore::new(limits.node_bytes)),
            refused: AtomicU64::new(0),
            warning: crate::throttle::Throttle::new(),
        })
    }

    /// A connection slot, or `None` at the node's cap (the connection is then closed at once).
    pub fn admit(&self) -> Option<OwnedSemaphorePermit> {
        let permit = self.connections.clone().try_acquire_owned().ok();
        if permit.is_none() {
            self.refuse(format_args!("{} connections", self.limits.max_connections));
        }
        permit
    }

    /// Counts a refused connection and says so in the log at most every 10 s.
    pub fn refuse(&self, why: std::fmt::Arguments<'_>) {
        let n = self.refused.fetch_add(1, Ordering::Relaxed) + 1;
        if self.warning.due() {
            tracing::warn!(refused_total = n, "nbd connection refused: at the limit of {why}");
        }
    }

    /// A new per-connection budget.
    pub fn connection(&self) -> Arc<Semaphore> {
        Arc::new(Semaphore::new(self.limits.connection_bytes))
    }

    /// Charges `bytes` to `connection`, then to the node; waits until both have room.
    pub async fn hold(&self, connection: &Arc<Semaphore>, bytes: u32) -> Held {
        let bytes = bytes.max(1);
        let c = connection.clone().acquire_many_owned(bytes).await.expect("budgets are never closed");
        let n = self.node_bytes.clone().acquire_many_owned(bytes).await.expect("budgets are never closed");
        Held { _connection: Some(c), _node: n }
    }

    /// What a long read reserves for the pieces it has in flight: two pieces, or one when the
    /// connection's budget has room for only one (then they are produced one after the other).
    pub fn stream_reserve(&self) -> u32 {
        if self.limits.connection_bytes >= 2 * PIECE as usize {
            2 * PIECE
        } else {
            PIECE
        }
    }

    /// Connections open now (handshakes included).
    pub fn connections(&self) -> usize {
        self.limits.max_connections - self.connections.available_permits()
    }

    /// Reply bytes in flight on the node now.
    pub fn node_bytes_in_flight(&self) -> usize {
        self.limits.node_bytes - self.node_bytes.available_permits()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn bytes_are_held_until_dropped_and_connections_capped() {
        let b = Budgets::new(NbdLimits {
            max_connections: 2,
            connection_bytes: 3 << 20,
            node_bytes: 4 << 20,
            ..Default::default()
        });
        let (c1, c2) = (b.connection(), b.connection());
        let h1 = b.hold(&c1, 3 << 20).await;
        assert_eq!(b.node_bytes_in_flight(), 3 << 20);
        let h2 = b.hold(&c2, 1 << 20).await;
        // c1 is at its own budget, the node at its: both must wait for a release.
        let mut more = Box::pin(b.hold(&c2, 1 << 20));
        assert!(futures_poll_once(&mut more).await.is_none());
        drop(h1);
        let h3 = more.await;
        drop((h2, h3));
        assert_eq!(b.node_bytes_in_flight(), 0);
        let (p1, p2) = (b.admit(), b.admit());
        assert!(p1.is_some() && p2.is_some() && b.admit().is_none());
        assert_eq!(b.refused.load(Ordering::Relaxed), 1);
    }

    async fn futures_poll_once<F: std::future::Future + Unpin>(f: &mut F) -> Option<F::Output> {
        tokio::time::timeout(Duration::from_millis(50), f).await.ok()
    }
}
