//! Frame I/O over a byte stream and the authenticated handshake that opens every peer and
//! tracker connection. Nothing is served or believed before the handshake completes.
//!
//! ```text
//! client                                   server
//!   Hello { node, image, nonce_c }   ──▶
//!                                    ◀──   Challenge { node, nonce_s, proof_s }
//!   (checks proof_s)
//!   Proof { proof_c }                ──▶   (checks proof_c; a wrong one closes the connection)
//! ```

use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::time::Duration;

use bytes::BytesMut;
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::net::{TcpSocket, TcpStream};

use super::auth::{nonce, ClusterKey, Role};
use super::wire::{self, Bytes32, Frame, Message, WireError, HEADER_LEN};

/// How long a handshake may take before the connection is dropped, by default (trackers, and
/// a peer server without `p2p.handshake_timeout`); a peer opening a session is bounded by its
/// `peer_stall` instead.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Most handshakes in progress at once on a peer server or a tracker: idle connections that
/// never authenticate cannot take the places of real sessions for longer than one handshake
/// timeout each (5 s, or a peer server's `p2p.handshake_timeout`, at most 2 min).
pub const MAX_HANDSHAKES: usize = 64;
/// Longest node name accepted: a socket address (58 bytes at most as Rust writes it, an IPv6
/// address with a scope id) and `@` and a join time (20 digits at most).
pub const MAX_NODE_NAME: usize = 80;

/// Errors of one connection.
#[derive(Debug, Error)]
pub enum ConnError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error("expected {expected}, got {got:?}")]
    Unexpected { expected: &'static str, got: Box<Message> },
    #[error("peer {0} failed authentication")]
    Auth(String),
    #[error("bad node name {0:?}")]
    BadNode(String),
    #[error("handshake timed out")]
    Timeout,
}

/// Largest body of a frame that carries no chunk data (handshake, requests, tracker
/// registrations): a party that may not send data cannot make us allocate more than this.
pub const SMALL_FRAME: usize = 4096;

/// Reads one frame.
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> Result<Frame, ConnError> {
    read_frame_within(r, usize::MAX).await
}

/// Reads one frame whose body is at most `max` bytes.
pub async fn read_frame_within<R: AsyncRead + Unpin>(r: &mut R, max: usize) -> Result<Frame, ConnError> {
    read_frame_progressing(r, max, None).await
}

/// Reads one frame whose body is at most `max` bytes, failing with [`ConnError::Timeout`] if
/// `stall` passes with no byte arriving (the first byte of the frame included). Progress is
/// what counts, not the whole frame: a large reply on a slow link is not a stall.
pub async fn read_frame_progressing<R: AsyncRead + Unpin>(
    r: &mut R,
    max: usize,
    stall: Option<std::time::Duration>,
) -> Result<Frame, ConnError> {
    async fn bounded<T>(
        stall: Option<std::time::Duration>,
        f: impl std::future::Future<Output = std::io::Result<T>>,
    ) -> Result<T, ConnError> {
        match stall {
            Some(d) => Ok(tokio::time::timeout(d, f).await.map_err(|_| ConnError::Timeout)??),
            None => Ok(f.await?),
        }
    }
    let mut head = [0u8; HEADER_LEN];
    bounded(stall, r.read_exact(&mut head)).await?;
    let header = wire::decode_header(&head)?;
    if header.body_len() > max {
        return Err(WireError::TooBig { msg: header.msg_len, tail: header.tail_len }.into());
    }
    let mut msg = vec![0u8; header.msg_len as usize];
    bounded(stall, r.read_exact(&mut msg)).await?;
    // Read into spare capacity: zeroing a buffer that is about to be overwritten costs as much
    // as the checksum.
    let want = header.tail_len as usize;
    let mut tail = BytesMut::with_capacity(want);
    while tail.len() < want {
        let mut limited = (&mut *r).take((want - tail.len()) as u64);
        if bounded(stall, limited.read_buf(&mut tail)).await? == 0 {
            return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into());
        }
    }
    Ok(wire::decode_body_within(&header, &msg, tail.freeze(), max)?)
}

/// Writes one frame in one system call where the socket allows; the tail is not copied.
pub async fn write_frame<W: AsyncWrite + Unpin>(w: &mut W, f: &Frame) -> Result<(), ConnError> {
    Ok(crate::netio::write_all_vectored(w, &[&f.encode_head(), f.wire_tail()]).await?)
}

/// A node name is its peer address, `host:port`, and for an image maybe `@` and when it joined
/// it: printable, short.
pub fn check_node(node: &str) -> Result<(), ConnError> {
    let ok = !node.is_empty()
        && node.len() <= MAX_NODE_NAME
        && node.bytes().all(|b| b.is_ascii_graphic())
        && node_addr(node).rsplit_once(':').is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok());
    if ok {
        Ok(())
    } else {
        Err(ConnError::BadNode(node.chars().take(MAX_NODE_NAME).collect()))
    }
}

/// A node name's parts: its peer address and, in a node's name for an image, the text after the
/// first `@`, its join time (`10.0.0.5:7000` and `1796000000000` of
/// `10.0.0.5:7000@1796000000000`; see `tree::joined_of`).
pub fn split_name(node: &str) -> (&str, Option<&str>) {
    match node.split_once('@') {
        Some((addr, t)) => (addr, Some(t)),
        None => (node, None),
    }
}

/// When the node of an image's name joined the image (Unix ms), if the name says so readably
/// (see [`split_name`]).
pub fn join_time(node: &str) -> Option<u64> {
    split_name(node).1.and_then(|t| t.parse().ok())
}

/// The peer address of a node name (see [`split_name`]).
pub fn node_addr(node: &str) -> &str {
    split_name(node).0
}

/// A node's name for an image it joined at `joined` (Unix milliseconds): `ADDR@JOINED`, or the
/// bare address when `joined` is 0 (not said).
pub fn image_name(addr: &str, joined: u64) -> String {
    let addr = node_addr(addr);
    if joined == 0 {
        addr.to_string()
    } else {
        format!("{addr}@{joined}")
    }
}

/// Now, in Unix milliseconds (at least 1: 0 means "not said" on the wire): when a node joins
/// an image, for [`image_name`].
pub fn joined_now() -> u64 {
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    u64::try_from(t.as_millis()).unwrap_or(u64::MAX).max(1)
}

/// The host part of a node name (`10.0.0.5` of `10.0.0.5:7000`, `[fd00::5]` of
/// `[fd00::5]:7000`): the whole address if it has no port.
pub fn node_host(node: &str) -> &str {
    let addr = node_addr(node);
    addr.rsplit_once(':').map_or(addr, |(h, _)| h)
}

/// The IP address a node name stands for, if its address is an IP socket address (`vmtd`'s
/// names always are), IPv4-mapped IPv6 addresses as IPv4.
pub fn node_ip(node: &str) -> Option<IpAddr> {
    node_addr(node).parse::<SocketAddr>().ok().map(|a| a.ip().to_canonical())
}

/// True when `addr` is an IP socket address written the one way Rust writes it, with an IPv4
/// address for an IPv4-mapped one.
pub fn is_canonical_addr(addr: &str) -> bool {
    addr.parse::<std::net::SocketAddr>().is_ok_and(|a| {
        let a = std::net::SocketAddr::new(a.ip().to_canonical(), a.port());
        a.to_string() == addr
    })
}

/// True when `node` is the only spelling of a node name that is admitted: a canonical address
/// ([`is_canonical_addr`]), then optionally `@` and a join time from 1 on, in decimal without
/// leading zeros.
pub fn is_canonical(node: &str) -> bool {
    let (addr, time) = split_name(node);
    let time_ok = |t: &str| t.parse::<u64>().is_ok_and(|v| v > 0 && v.to_string() == t);
    is_canonical_addr(addr) && time.is_none_or(time_ok)
}

/// Opens a TCP connection to `addr` from the IP address of this node's name `me`, so that the
/// other side sees it come from the address the name claims: peer servers and trackers refuse a
/// name whose address is not the one the connection comes from. When that address is not local
/// (a node behind NAT advertises another one) or not of the target's family, the kernel picks
/// the source as usual.
pub async fn connect_from(addr: &str, me: &str) -> std::io::Result<TcpStream> {
    let from = node_ip(me).filter(|ip| !ip.is_unspecified());
    let mut last = None;
    for target in tokio::net::lookup_host(addr).await? {
        let socket = if target.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
        if let Some(ip) = from.filter(|ip| ip.is_ipv4() == target.is_ipv4()) {
            // The port is chosen at connect time, per destination, not at bind time: binding
            // does not use up the ephemeral ports of the address.
            let one: libc::c_int = 1;
            // SAFETY: a valid socket descriptor and a c_int option value of the given size.
            unsafe {
                libc::setsockopt(
                    socket.as_raw_fd(),
                    libc::IPPROTO_IP,
                    libc::IP_BIND_ADDRESS_NO_PORT,
                    (&one as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                );
            }
            // An address that is not local: connect from whatever the route gives.
            let _ = socket.bind(SocketAddr::new(ip, 0));
        }
        match socket.connect(target).await {
            Ok(s) => return Ok(s),
            Err(e) => last = Some(e),
        }
    }
    Err(last
        .unwrap_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, format!("{addr} resolves to no address"))))
}

/// The client side: proves itself to the server at the other end and checks the server's
/// proof, all `within` the given time. Returns the server's node name.
pub async fn client_handshake<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    key: &ClusterKey,
    me: &str,
    image: Bytes32,
    within: Duration,
) -> Result<String, ConnError> {
    let run = async {
        let nonce_c = nonce();
        write_frame(s, &Frame::new(Message::Hello { node: me.into(), image, nonce: nonce_c })).await?;
        let (node, nonce_s, proof) = match read_frame_within(s, SMALL_FRAME).await?.msg {
            Message::Challenge { node, nonce, proof } => (node, nonce, proof),
            other => return Err(ConnError::Unexpected { expected: "Challenge", got: Box::new(other) }),
        };
        check_node(&node)?;
        if !key.check(&proof, Role::Server, &node, &image, &nonce_c, &nonce_s) {
            return Err(ConnError::Auth(node));
        }
        let proof = key.proof(Role::Client, me, &image, &nonce_c, &nonce_s);
        write_frame(s, &Frame::new(Message::Proof { proof })).await?;
        Ok(node)
    };
    tokio::time::timeout(within, run).await.map_err(|_| ConnError::Timeout)?
}

/// What the server learns from a successful handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authenticated {
    pub node: String,
    pub image: Bytes32,
}

/// The server side: answers a client's `Hello` with a challenge and checks its proof. The
/// caller looks the image up only afterwards, so an outsider learns nothing about what is
/// served here. A client that has not proved itself `within` the given time is dropped.
pub async fn server_handshake<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    key: &ClusterKey,
    me: &str,
    within: Duration,
) -> Result<Authenticated, ConnError> {
    let run = async {
        let (node, image, nonce_c) = match read_frame_within(s, SMALL_FRAME).await?.msg {
            Message::Hello { node, image, nonce } => (node, image, nonce),
            other => return Err(ConnError::Unexpected { expected: "Hello", got: Box::new(other) }),
        };
        check_node(&node)?;
        let nonce_s = nonce();
        let proof = key.proof(Role::Server, me, &image, &nonce_c, &nonce_s);
        write_frame(s, &Frame::new(Message::Challenge { node: me.into(), nonce: nonce_s, proof })).await?;
        let proof = match read_frame_within(s, SMALL_FRAME).await?.msg {
            Message::Proof { proof } => proof,
            other => return Err(ConnError::Unexpected { expected: "Proof", got: Box::new(other) }),
        };
        if !key.check(&proof, Role::Client, &node, &image, &nonce_c, &nonce_s) {
            return Err(ConnError::Auth(node));
        }
        Ok(Authenticated { node, image })
    };
    tokio::time::timeout(within, run).await.map_err(|_| ConnError::Timeout)?
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(s: &str) -> ClusterKey {
        ClusterKey::from_secret(s.as_bytes()).unwrap()
    }

    #[tokio::test]
    async fn both_sides_authenticate_with_the_same_key() {
        let (mut a, mut b) = tokio::io::duplex(1 << 16);
        let k = key("the cluster key of this test");
        let (k2, img) = (k.clone(), [5u8; 32]);
        let server =
            tokio::spawn(async move { server_handshake(&mut b, &k2, "10.0.0.2:7000", HANDSHAKE_TIMEOUT).await });
        let peer = client_handshake(&mut a, &k, "10.0.0.1:7000", img, HANDSHAKE_TIMEOUT).await.unwrap();
        assert_eq!(peer, "10.0.0.2:7000");
        let auth = server.await.unwrap().unwrap();
        assert_eq!(auth, Authenticated { node: "10.0.0.1:7000".into(), image: img });
    }

    #[tokio::test]
    async fn a_wrong_key_is_refused_on_both_sides() {
        let (mut a, mut b) = tokio::io::duplex(1 << 16);
        let server = tokio::spawn(async move {
            server_handshake(&mut b, &key("the server's own key"), "10.0.0.2:7000", HANDSHAKE_TIMEOUT).await
        });
        let r =
            client_handshake(&mut a, &key("an outsider's guess!"), "10.0.0.1:7000", [0; 32], HANDSHAKE_TIMEOUT).await;
        assert!(matches!(r, Err(ConnError::Auth(_))), "{r:?}");
        drop(a);
        assert!(server.await.unwrap().is_err());
    }

    #[tokio::test]
    async fn a_forged_proof_is_refused_by_the_server() {
        let (mut a, mut b) = tokio::io::duplex(1 << 16);
        let k = key("the cluster key of this test");
        let server =
            tokio::spawn(async move { server_handshake(&mut b, &k, "10.0.0.2:7000", HANDSHAKE_TIMEOUT).await });
        write_frame(&mut a, &Frame::new(Message::Hello { node: "1.2.3.4:5".into(), image: [0; 32], nonce: [0; 32] }))
            .await
            .unwrap();
        let _challenge = read_frame(&mut a).await.unwrap();
        write_frame(&mut a, &Frame::new(Message::Proof { proof: [0; 32] })).await.unwrap();
        assert!(matches!(server.await.unwrap(), Err(ConnError::Auth(_))));
    }

    #[test]
    fn node_names_have_a_host_and_an_ip() {
        assert_eq!(node_host("10.0.0.5:7000"), "10.0.0.5");
        assert_eq!(node_host("[fd00::5]:7000"), "[fd00::5]");
        assert_eq!(node_ip("[fd00::5]:7000"), Some("fd00::5".parse().unwrap()));
        assert_eq!(node_ip("[::ffff:10.0.0.5]:7000"), Some("10.0.0.5".parse().unwrap()), "v4-mapped");
        assert_eq!(node_ip("host.example:7000"), None);
        // A node's name for an image: its address and when it joined the image.
        assert_eq!(node_addr("10.0.0.5:7000@1796000000000"), "10.0.0.5:7000");
        assert_eq!(node_host("[fd00::5]:7000@17"), "[fd00::5]");
        assert_eq!(node_ip("10.0.0.5:7000@17"), Some("10.0.0.5".parse().unwrap()));
        assert!(is_canonical("10.0.0.5:7000@1796000000000") && is_canonical("10.0.0.5:7000"));
        for bad in ["10.0.0.5:7000@", "10.0.0.5:7000@017", "10.0.0.5:7000@0", "10.0.0.5:7000@1@2", "10.0.0.5@1"] {
            assert!(!is_canonical(bad), "{bad}");
        }
        assert!(!is_canonical_addr("10.0.0.5:7000@1"));
    }

    #[tokio::test]
    async fn connections_come_from_the_address_of_the_name() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        for (me, from) in [("127.0.0.2:7000", "127.0.0.2"), ("192.0.2.1:7000", "127.0.0.1")] {
            let _c = connect_from(&addr, me).await.unwrap();
            let (_, peer) = listener.accept().await.unwrap();
            assert_eq!(peer.ip().to_string(), from, "{me}: not local, any source");
        }
    }

    #[test]
    fn node_names_are_checked() {
        assert!(check_node("10.77.0.11:7000").is_ok());
        assert!(check_node("[::1]:7000").is_ok());
        for bad in ["", "nohost", ":7000", "a:99999", "a b:1", &"x".repeat(70)] {
            assert!(check_node(bad).is_err(), "{bad:?}");
        }
    }
}
