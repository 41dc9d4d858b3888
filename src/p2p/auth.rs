//! Cluster-key authentication: a mutual challenge–response in which the key never crosses the
//! wire.
//!
//! Both sides send a fresh 32-byte nonce; each proves it holds the key with a keyed BLAKE3 MAC
//! over both nonces, the image digest and its own node name, under a role label, so a proof can
//! be neither replayed into another session nor reflected back to its sender. The MAC key is
//! derived from the key file's bytes, so any secret of at least [`MIN_KEY_LEN`] bytes works.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use thiserror::Error;

use super::wire::{Bytes32, NONCE_LEN};

/// Shortest accepted key file content, in bytes.
pub const MIN_KEY_LEN: usize = 16;
const CONTEXT: &str = "vmthunder 2026 peer authentication v1";

/// Errors loading the cluster key.
#[derive(Debug, Error)]
pub enum KeyError {
    #[error("cluster key {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("cluster key {path}: {message}")]
    Invalid { path: String, message: String },
}

/// Which side of a handshake a proof speaks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Client,
    Server,
}

/// The shared cluster key, ready to compute proofs. Debug output never shows it.
#[derive(Clone)]
pub struct ClusterKey([u8; 32]);

impl std::fmt::Debug for ClusterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClusterKey(..)")
    }
}

impl ClusterKey {
    /// Derives the key from secret bytes (surrounding whitespace ignored, so a key file may end
    /// with a newline).
    pub fn from_secret(secret: &[u8]) -> Result<ClusterKey, String> {
        let s = secret.trim_ascii();
        if s.len() < MIN_KEY_LEN {
            return Err(format!("holds {} bytes; at least {MIN_KEY_LEN} are needed", s.len()));
        }
        Ok(ClusterKey(blake3::derive_key(CONTEXT, s)))
    }

    /// Loads a key file, which must not be readable by group or others.
    pub fn load(path: &Path) -> Result<ClusterKey, KeyError> {
        let p = path.display().to_string();
        let meta = std::fs::metadata(path).map_err(|source| KeyError::Read { path: p.clone(), source })?;
        if meta.permissions().mode() & 0o077 != 0 {
            return Err(KeyError::Invalid {
                path: p,
                message: "must not be accessible by group or others (chmod 600)".into(),
            });
        }
        let secret = std::fs::read(path).map_err(|source| KeyError::Read { path: p.clone(), source })?;
        ClusterKey::from_secret(&secret).map_err(|message| KeyError::Invalid { path: p, message })
    }

    /// The proof that `role`, named `node`, holds the key in the session of these nonces.
    pub fn proof(
        &self,
        role: Role,
        node: &str,
        image: &Bytes32,
        client_nonce: &Bytes32,
        server_nonce: &Bytes32,
    ) -> Bytes32 {
        let mut h = blake3::Hasher::new_keyed(&self.0);
        h.update(match role {
            Role::Client => b"client\0",
            Role::Server => b"server\0",
        });
        h.update(client_nonce);
        h.update(server_nonce);
        h.update(image);
        h.update(&(node.len() as u32).to_be_bytes());
        h.update(node.as_bytes());
        *h.finalize().as_bytes()
    }

    /// Checks a proof in constant time.
    #[allow(clippy::too_many_arguments)]
    pub fn check(
        &self,
        proof: &Bytes32,
        role: Role,
        node: &str,
        image: &Bytes32,
        client_nonce: &Bytes32,
        server_nonce: &Bytes32,
    ) -> bool {
        let want = blake3::Hash::from(self.proof(role, node, image, client_nonce, server_nonce));
        want == blake3::Hash::from(*proof)
    }
}

/// A fresh random nonce from the kernel.
pub fn nonce() -> Bytes32 {
    let mut n = [0u8; NONCE_LEN];
    let mut filled = 0;
    while filled < n.len() {
        // SAFETY: the pointer and length describe the unfilled part of `n`.
        let r = unsafe { libc::getrandom(n[filled..].as_mut_ptr().cast(), n.len() - filled, 0) };
        if r > 0 {
            filled += r as usize;
        } else if std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            // getrandom(2) only fails on ancient kernels; a predictable nonce would weaken
            // replay protection, so refuse to go on.
            panic!("getrandom failed: {}", std::io::Error::last_os_error());
        }
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proofs_bind_key_role_node_image_and_nonces() {
        let k = ClusterKey::from_secret(b"correct horse battery staple\n").unwrap();
        let other = ClusterKey::from_secret(b"another cluster entirely").unwrap();
        let (img, a, b) = ([1; 32], nonce(), nonce());
        assert_ne!(a, b, "nonces are fresh");
        let p = k.proof(Role::Client, "n1:7000", &img, &a, &b);
        assert!(k.check(&p, Role::Client, "n1:7000", &img, &a, &b));
        assert!(!other.check(&p, Role::Client, "n1:7000", &img, &a, &b), "wrong key");
        assert!(!k.check(&p, Role::Server, "n1:7000", &img, &a, &b), "reflected");
        assert!(!k.check(&p, Role::Client, "n2:7000", &img, &a, &b), "other node");
        assert!(!k.check(&p, Role::Client, "n1:7000", &[2; 32], &a, &b), "other image");
        assert!(!k.check(&p, Role::Client, "n1:7000", &img, &b, &a), "other session");
    }

    #[test]
    fn short_or_exposed_keys_are_refused() {
        assert!(ClusterKey::from_secret(b"  short \n").is_err());
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("key");
        std::fs::write(&p, "0123456789abcdef0123").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(ClusterKey::load(&p), Err(KeyError::Invalid { .. })));
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(ClusterKey::load(&p).is_ok());
        assert_eq!(format!("{:?}", ClusterKey::load(&p).unwrap()), "ClusterKey(..)");
    }
}
