//! One-way CHAP with MD5 (RFC 1994, as iSCSI uses it in RFC 7143 §12.1.3): the target
//! challenges, the initiator proves it knows the secret. Pure functions, no I/O.
//!
//! Invariant: the secret never appears in a `Debug` or `Display` output, so logging a
//! credential or an error cannot leak it.

use md5::{Digest as _, Md5};
use thiserror::Error;

/// The only CHAP algorithm offered: MD5 (`CHAP_A=5`).
pub const CHAP_MD5: u32 = 5;

/// Errors of the CHAP exchange.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum ChapError {
    /// The target sent a key malformed or missing.
    #[error("CHAP: {0}")]
    Bad(String),
}

/// CHAP credentials: a user name and its secret.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub user: String,
    secret: Vec<u8>,
}

impl Credentials {
    pub fn new(user: impl Into<String>, secret: impl Into<Vec<u8>>) -> Credentials {
        Credentials { user: user.into(), secret: secret.into() }
    }
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials").field("user", &self.user).field("secret", &"<redacted>").finish()
    }
}

/// Decodes a CHAP binary value: `0x` hex or `0b` base64 (RFC 7143 §6.1).
pub fn decode_binary(v: &str) -> Result<Vec<u8>, ChapError> {
    if let Some(hex) = v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        if hex.is_empty() || hex.len() > 2048 {
            return Err(ChapError::Bad(format!("hex value of {} digits", hex.len())));
        }
        // Checked before slicing: a multi-byte character would be cut in two, and
        // `from_str_radix` alone would also take a sign ("+f").
        if !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(ChapError::Bad(format!("bad hex {v:?}")));
        }
        // An odd count has an implied leading zero.
        let padded = if hex.len() % 2 == 1 { format!("0{hex}") } else { hex.to_string() };
        return (0..padded.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&padded[i..i + 2], 16).map_err(|_| ChapError::Bad(format!("bad hex {v:?}"))))
            .collect();
    }
    if let Some(b64) = v.strip_prefix("0b").or_else(|| v.strip_prefix("0B")) {
        return decode_base64(b64).ok_or_else(|| ChapError::Bad(format!("bad base64 {v:?}")));
    }
    Err(ChapError::Bad(format!("binary value {v:?} is neither 0x hex nor 0b base64")))
}

fn decode_base64(s: &str) -> Option<Vec<u8>> {
    let s = s.trim_end_matches('=');
    // 4n + 1 characters cannot be base64: the last one would hold 6 bits of no byte.
    if s.is_empty() || s.len() > 4096 || s.len() % 4 == 1 {
        return None;
    }
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in s.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    Some(out)
}

/// `CHAP_R` for identifier `id` and challenge `challenge`: MD5(id ‖ secret ‖ challenge), hex.
pub fn response(id: u8, creds: &Credentials, challenge: &[u8]) -> String {
    let mut h = Md5::new();
    h.update([id]);
    h.update(&creds.secret);
    h.update(challenge);
    let d = h.finalize();
    let mut s = String::with_capacity(2 + 32);
    s.push_str("0x");
    for b in d {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn md5_response_matches_a_known_value() {
        // MD5(0x01 ‖ "secret" ‖ 0x0102) computed independently (python hashlib).
        let c = Credentials::new("u", "secret");
        assert_eq!(response(1, &c, &[1, 2]), "0x".to_string() + &md5_hex(&[&[1], b"secret", &[1, 2]]));
        assert_eq!(response(0, &Credentials::new("u", ""), &[]), "0x93b885adfe0da089cdf634904fd59f71");
    }

    fn md5_hex(parts: &[&[u8]]) -> String {
        let mut h = Md5::new();
        for p in parts {
            h.update(p);
        }
        h.finalize().iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn binary_values() {
        assert_eq!(decode_binary("0x0a0B"), Ok(vec![10, 11]));
        assert_eq!(decode_binary("0xabc"), Ok(vec![0x0a, 0xbc]));
        assert_eq!(decode_binary("0bAQID"), Ok(vec![1, 2, 3]));
        assert!(decode_binary("0xzz").is_err());
        assert!(decode_binary("12").is_err());
        assert!(decode_binary("0x").is_err());
    }

    /// Found by fuzzing: `CHAP_C=0bA` decoded to an empty challenge instead of an error.
    #[test]
    fn base64_of_impossible_length_is_refused() {
        assert!(decode_binary("0bA").is_err());
        assert!(decode_binary("0bAQIDB").is_err());
        assert!(decode_binary("0bA===").is_err());
        assert_eq!(decode_binary("0bAQ=="), Ok(vec![1]));
        assert_eq!(decode_binary("0bAQI"), Ok(vec![1, 2]));
    }

    /// Found by fuzzing: a target's `CHAP_C=0x\u{49e}b` made the initiator panic, slicing the
    /// hex digits inside a two-byte character.
    #[test]
    fn hex_values_take_hex_digits_only() {
        assert!(decode_binary("0x\u{49e}b").is_err());
        assert!(decode_binary("0xa\u{e9}").is_err());
        assert!(decode_binary("0x+f+f").is_err());
    }

    #[test]
    fn secret_is_never_printed() {
        let c = Credentials::new("alice", "hunter2");
        assert!(!format!("{c:?}").contains("hunter2"));
    }
}
