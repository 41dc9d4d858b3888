//! Durable file replacement and checksum trailers: how vmthunder writes its on-disk files.
//!
//! Invariant: after `write_atomic` returns, the path holds either the old or the new content in
//! full, across a crash or power loss (temp file, fsync, rename, fsync of the directory).

use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// Replaces `path` with `bytes` atomically and durably. `mode` applies to the new file.
///
/// The temp file gets an unpredictable name and is created with `O_EXCL` (the `tempfile`
/// crate), so a symlink or file planted in `path`'s directory can never be written through:
/// this runs as root in directories an operator names (`vmt trace stop -o`).
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    // A bare file name has an empty parent: that is the current directory.
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let mut tmp = tempfile::Builder::new()
        .prefix(&format!(".{name}."))
        .suffix(".tmp")
        .permissions(fs::Permissions::from_mode(mode))
        .tempfile_in(dir)?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    // On error the temp file is removed when `tmp` drops.
    tmp.persist(path).map_err(|e| e.error)?;
    sync_dir(dir)
}

/// True when `e` says the filesystem is full (or the quota spent). Also through wrappers such as
/// `tempfile`'s, which keep the kind but not the OS error number.
pub fn is_full(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT))
        || matches!(e.kind(), io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded)
}

/// Makes a rename or create inside `dir` durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Appends a crc32c of `body` to it: the trailer of the manifest and cache state files.
pub fn seal(mut body: Vec<u8>) -> Vec<u8> {
    let crc = crc32c::crc32c(&body);
    body.extend_from_slice(&crc.to_le_bytes());
    body
}

/// Checks and strips the crc32c trailer written by [`seal`]; `None` when it does not match.
pub fn unseal(bytes: &[u8]) -> Option<&[u8]> {
    if bytes.len() < 4 {
        return None;
    }
    let (body, trailer) = bytes.split_at(bytes.len() - 4);
    let want = u32::from_le_bytes(trailer.try_into().ok()?);
    (crc32c::crc32c(body) == want).then_some(body)
}

/// Why a sealed file was refused by [`open_sealed`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SealError {
    Truncated(usize),
    BadMagic,
    BadVersion(u16),
    BadChecksum,
}

/// Checks the frame shared by the manifest, cache state and profile files — an 8-byte magic, a
/// little-endian u16 version right after it, at least `header_len` bytes, a crc32c trailer — and
/// returns the bytes without the trailer.
pub fn open_sealed<'a>(
    bytes: &'a [u8],
    magic: &[u8; 8],
    version: u16,
    header_len: usize,
) -> Result<&'a [u8], SealError> {
    if bytes.len() < header_len.max(10) + 4 {
        return Err(SealError::Truncated(bytes.len()));
    }
    if &bytes[..8] != magic {
        return Err(SealError::BadMagic);
    }
    let found = u16::from_le_bytes([bytes[8], bytes[9]]);
    if found != version {
        return Err(SealError::BadVersion(found));
    }
    unseal(bytes).ok_or(SealError::BadChecksum)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_roundtrip_and_detects_flips() {
        let sealed = seal(b"hello".to_vec());
        assert_eq!(unseal(&sealed), Some(&b"hello"[..]));
        for i in 0..sealed.len() {
            let mut bad = sealed.clone();
            bad[i] ^= 0x40;
            assert_eq!(unseal(&bad), None, "flip at {i} not detected");
        }
        assert_eq!(unseal(&sealed[..3]), None);
    }

    #[test]
    fn atomic_write_to_a_bare_file_name() {
        let dir = tempfile::tempdir().unwrap();
        let old = std::env::current_dir().unwrap();
        std::env::set_current_dir(dir.path()).unwrap();
        let r = write_atomic(Path::new("bare"), b"x", 0o600);
        std::env::set_current_dir(old).unwrap();
        r.unwrap();
        assert_eq!(fs::read(dir.path().join("bare")).unwrap(), b"x");
    }

    #[test]
    fn atomic_write_replaces() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        write_atomic(&p, b"one", 0o600).unwrap();
        write_atomic(&p, b"two", 0o600).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
        assert_eq!(fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o600);
    }

    #[test]
    fn atomic_write_never_follows_a_planted_link() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        fs::write(&victim, b"keep").unwrap();
        // Plant links under every name the old scheme would have used.
        for seq in 0..4 {
            let planted = dir.path().join(format!(".out.tmp.{}.{seq}", std::process::id()));
            std::os::unix::fs::symlink(&victim, planted).unwrap();
        }
        write_atomic(&dir.path().join("out"), b"new", 0o644).unwrap();
        assert_eq!(fs::read(&victim).unwrap(), b"keep");
        assert_eq!(fs::read(dir.path().join("out")).unwrap(), b"new");
    }
}
