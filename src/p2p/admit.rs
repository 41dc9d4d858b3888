//! Who may hold sessions on a peer server or a tracker, so that one holder of the cluster key
//! takes a bounded share of them whatever names it claims.
//!
//! - **Names are bound to addresses.** A node's name is its peer address (for an image, followed
//!   by `@` and when it joined the image); a session whose proven name does not have the IP
//!   address the connection comes from is refused. A key holder on one machine can therefore
//!   only speak for addresses of that machine.
//! - **One session per peer address and image.** A node keeps one session per image with each
//!   peer and one with each tracker; a second one of the same address (whatever join time its
//!   name carries) replaces the first, which is told to end (a node that lost its connection
//!   without a reset, or restarted, must be able to come back).
//! - **`per_address` peer addresses per IP address**, and as many handshakes in progress from
//!   it: the sessions one IP address can hold are at most `per_address` times the images served.
//!
//! ```text
//!  accept ──▶ handshake(ip) ─ more than per_address in progress from ip? ─▶ refused
//!              │ authenticated as `node`
//!              ▼
//!            admit(ip, node, image) ─ node's IP ≠ ip? ─▶ refused
//!              │                    └ ip holds per_address other names? ─▶ refused
//!              ▼
//!            Admitted (one per node and image: a newer one replaces it) ── dropped ─▶ place free
//! ```

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use thiserror::Error;
use tokio::sync::Notify;

use super::conn::{is_canonical, node_addr, node_ip};
use super::wire::Bytes32;

/// Why a connection or a session was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum AdmitError {
    #[error("{from} has {limit} handshakes in progress already")]
    Handshakes { from: IpAddr, limit: usize },
    #[error("node name {node} does not have the address {from} it connects from")]
    NotBound { node: String, from: IpAddr },
    #[error("{from} holds sessions under {limit} node names already")]
    Names { from: IpAddr, limit: usize },
}

/// The sessions and handshakes of every address, on one peer server or tracker.
#[derive(Debug)]
pub struct Admission {
    per_address: usize,
    table: Mutex<HashMap<IpAddr, Address>>,
    next_id: AtomicU64,
}

#[derive(Debug, Default)]
struct Address {
    handshakes: usize,
    /// Node address (a name without its join time: a node has one name per image) → image →
    /// the session holding that place.
    names: HashMap<String, HashMap<Bytes32, Holder>>,
}

#[derive(Debug)]
struct Holder {
    id: u64,
    replaced: Arc<Notify>,
}

impl Admission {
    /// At most `per_address` (at least 1) names and handshakes per address.
    pub fn new(per_address: usize) -> Arc<Admission> {
        Arc::new(Admission { per_address: per_address.max(1), table: Mutex::default(), next_id: AtomicU64::new(0) })
    }

    /// A connection from `from` starts its handshake: its place is held until the guard drops.
    pub fn handshake(self: &Arc<Self>, from: IpAddr) -> Result<Handshaking, AdmitError> {
        let from = from.to_canonical();
        let mut table = self.table.lock().unwrap();
        let a = table.entry(from).or_default();
        if a.handshakes >= self.per_address {
            return Err(AdmitError::Handshakes { from, limit: self.per_address });
        }
        a.handshakes += 1;
        Ok(Handshaking { adm: self.clone(), from })
    }

    /// The handshake of a connection from `from` proved the name `node`, for `image`: admits the
    /// session if the name has that address and the address has a place for it. A session of
    /// the same node address and image is replaced: [`Admitted::replaced`] fires for it.
    pub fn admit(self: &Arc<Self>, from: IpAddr, node: &str, image: Bytes32) -> Result<Admitted, AdmitError> {
        let from = from.to_canonical();
        // Only the canonical spelling of an address counts (`10.0.0.1:7000`, `[fd00::1]:7000`):
        // otherwise one address could hold `per_address` places under each of its spellings
        // (`[::ffff:10.0.0.1]:7000`, `[0::FFFF:a00:1]:7000`, ...).
        if node_ip(node) != Some(from) || !is_canonical(node) {
            return Err(AdmitError::NotBound { node: node.into(), from });
        }
        // A node's names for its images differ in their join times only: one place per address.
        let node = node_addr(node);
        let mut table = self.table.lock().unwrap();
        let a = table.entry(from).or_default();
        if !a.names.contains_key(node) && a.names.len() >= self.per_address {
            let e = AdmitError::Names { from, limit: self.per_address };
            Self::tidy(&mut table, from);
            return Err(e);
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let replaced = Arc::new(Notify::new());
        let holder = Holder { id, replaced: replaced.clone() };
        if let Some(old) = a.names.entry(node.to_string()).or_default().insert(image, holder) {
            // Stored if the old session is not waiting right now: it sees it at its next look.
            old.replaced.notify_one();
        }
        Ok(Admitted { adm: self.clone(), from, node: node.into(), image, id, replaced })
    }

    /// Names holding sessions from `from` now.
    pub fn names(&self, from: IpAddr) -> usize {
        self.table.lock().unwrap().get(&from.to_canonical()).map_or(0, |a| a.names.len())
    }

    fn tidy(table: &mut HashMap<IpAddr, Address>, from: IpAddr) {
        if table.get(&from).is_some_and(|a| a.handshakes == 0 && a.names.is_empty()) {
            table.remove(&from);
        }
    }
}

/// A handshake in progress; its place is given back when dropped.
#[derive(Debug)]
pub struct Handshaking {
    adm: Arc<Admission>,
    from: IpAddr,
}

impl Drop for Handshaking {
    fn drop(&mut self) {
        let mut table = self.adm.table.lock().unwrap();
        if let Some(a) = table.get_mut(&self.from) {
            a.handshakes = a.handshakes.saturating_sub(1);
        }
        Admission::tidy(&mut table, self.from);
    }
}

/// An admitted session's place; given back when dropped, unless a newer session of the same
/// name and image took it over.
#[derive(Debug)]
pub struct Admitted {
    adm: Arc<Admission>,
    from: IpAddr,
    node: String,
    image: Bytes32,
    id: u64,
    replaced: Arc<Notify>,
}

impl Admitted {
    /// Completes when a newer session of the same name and image has taken this one's place.
    pub async fn replaced(&self) {
        self.replaced.notified().await
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut table = self.adm.table.lock().unwrap();
        if let Some(a) = table.get_mut(&self.from) {
            if let Some(images) = a.names.get_mut(&self.node) {
                if images.get(&self.image).is_some_and(|h| h.id == self.id) {
                    images.remove(&self.image);
                }
                if images.is_empty() {
                    a.names.remove(&self.node);
                }
            }
        }
        Admission::tidy(&mut table, self.from);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_name_must_have_the_address_it_comes_from() {
        let adm = Admission::new(8);
        assert!(adm.admit(ip("10.0.0.1"), "10.0.0.1:7000", [1; 32]).is_ok());
        let e = adm.admit(ip("10.0.0.1"), "10.0.0.2:7000", [1; 32]).unwrap_err();
        assert!(matches!(e, AdmitError::NotBound { .. }), "{e}");
        assert!(adm.admit(ip("10.0.0.1"), "host.example:7000", [1; 32]).is_err(), "names are addresses");
        assert!(adm.admit(ip("::ffff:10.0.0.1"), "10.0.0.1:7001", [1; 32]).is_ok(), "v4-mapped is v4");
        assert!(adm.admit(ip("fd00::1"), "[fd00::1]:7000", [1; 32]).is_ok());
        for spelling in ["[::ffff:10.0.0.1]:7002", "[0::FFFF:a00:1]:7002", "[::ffff:a00:1]:7002", "010.0.0.1:7002"] {
            assert!(adm.admit(ip("10.0.0.1"), spelling, [1; 32]).is_err(), "{spelling} is not the canonical name");
        }
        assert!(adm.admit(ip("fd00::1"), "[FD00:0::1]:7000", [1; 32]).is_err());
        // A node's names for its images (with when it joined each) take one place: its address's.
        let adm = Admission::new(1);
        let a = adm.admit(ip("10.0.0.1"), "10.0.0.1:7000@1796000000000", [1; 32]).unwrap();
        let b = adm.admit(ip("10.0.0.1"), "10.0.0.1:7000@1796000000001", [2; 32]).unwrap();
        assert!(adm.admit(ip("10.0.0.1"), "10.0.0.1:7001@1796000000000", [1; 32]).is_err(), "a second address");
        assert_eq!(adm.names(ip("10.0.0.1")), 1);
        drop((a, b));
        assert_eq!(adm.names(ip("10.0.0.1")), 0);
        assert!(adm.admit(ip("10.0.0.1"), "10.0.0.1:7000@", [1; 32]).is_err(), "a join time must be a number");
    }

    #[test]
    fn an_address_holds_at_most_per_address_names_and_gets_them_back() {
        let adm = Admission::new(3);
        let from = ip("10.0.0.9");
        let mut held: Vec<Admitted> =
            (0..3).map(|p| adm.admit(from, &format!("10.0.0.9:{p}"), [1; 32]).unwrap()).collect();
        // Other images of a name already there take no new place; a fourth name does.
        held.push(adm.admit(from, "10.0.0.9:0", [2; 32]).unwrap());
        let e = adm.admit(from, "10.0.0.9:99", [1; 32]).unwrap_err();
        assert_eq!(e, AdmitError::Names { from, limit: 3 });
        assert!(adm.admit(ip("10.0.0.8"), "10.0.0.8:99", [1; 32]).is_ok(), "other addresses are apart");
        assert_eq!(adm.names(from), 3);
        held.remove(1);
        assert_eq!(adm.names(from), 2);
        assert!(adm.admit(from, "10.0.0.9:99", [1; 32]).is_ok());
        drop(held);
        assert!(adm.table.lock().unwrap().get(&from).is_none(), "nothing left behind");
    }

    #[tokio::test]
    async fn a_newer_session_of_the_same_name_and_image_replaces_the_older() {
        let adm = Admission::new(1);
        let from = ip("10.0.0.1");
        let old = adm.admit(from, "10.0.0.1:7000", [1; 32]).unwrap();
        let other_image = adm.admit(from, "10.0.0.1:7000", [2; 32]).unwrap();
        let new = adm.admit(from, "10.0.0.1:7000", [1; 32]).unwrap();
        old.replaced().await;
        // The old one ending does not free the place the new one holds.
        drop(old);
        assert!(adm.admit(from, "10.0.0.1:7001", [1; 32]).is_err());
        let pending = tokio::time::timeout(std::time::Duration::from_millis(10), other_image.replaced()).await;
        assert!(pending.is_err(), "only the same image is replaced");
        drop((new, other_image));
        assert_eq!(adm.names(from), 0);
    }

    #[test]
    fn handshakes_in_progress_are_bounded_per_address() {
        let adm = Admission::new(2);
        let from = ip("10.0.0.1");
        let a = adm.handshake(from).unwrap();
        let _b = adm.handshake(from).unwrap();
        assert_eq!(adm.handshake(from).unwrap_err(), AdmitError::Handshakes { from, limit: 2 });
        assert!(adm.handshake(ip("10.0.0.2")).is_ok());
        drop(a);
        assert!(adm.handshake(from).is_ok());
    }
}
