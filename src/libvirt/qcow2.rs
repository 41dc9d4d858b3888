//! Follows a disk file's qcow2 backing chain, reading only image headers, to find whether it
//! ends at a vmthunder export: how the hook recognises `<disk type='file'|'block'|'volume'>`
//! disks whose XML does not show the chain.
//!
//! Bounded and hostile-safe: at most [`MAX_DEPTH`] files (libvirt's own limit), each checked
//! with `stat` before it is opened (only a regular file or a block device: never a FIFO,
//! socket or character device), opened with `O_NONBLOCK | O_NOCTTY`, checked again
//! to be the file stat saw, and read with two positioned reads (the 20 header bytes and at most
//! 1023 bytes of backing name, the qcow2 limit); a file seen twice is a loop. A file that is not
//! qcow2 (or is qcow v1) ends the chain. Never a shell, never libvirt.

use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use thiserror::Error;

/// Longest backing chain followed (the overlay counts as one): libvirt's own limit.
pub const MAX_DEPTH: usize = 200;
/// The qcow2 format's limit on a backing file name.
pub const MAX_NAME: u32 = 1023;
const MAGIC: &[u8; 4] = b"QFI\xfb";

/// Why a chain could not be followed.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ChainError {
    #[error("{path}: {message}")]
    Io { path: String, message: String },
    #[error("{path}: not a regular file or block device")]
    NotAFile { path: String },
    /// Root may not read it (NFS with root squash, say): not a disk vmthunder serves.
    #[error("{path}: permission denied")]
    NoAccess { path: String },
    #[error("{path}: bad qcow2 header: {message}")]
    BadHeader { path: String, message: String },
    #[error("{path}: backing chain loops back to {again}")]
    Loop { path: String, again: String },
    #[error("{path}: backing chain longer than {MAX_DEPTH} files")]
    TooDeep { path: String },
}

/// Where a chain ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChainEnd {
    /// At a file that is not qcow2 or has no backing file.
    Local,
    /// At a network backing string (`nbd+unix://…`, `nbd://…`, `json:…` and the like).
    Network(String),
}

/// The backing file name in the header of `path`; `None` when it is not qcow2 (v2 or v3) or
/// has none. Regular files and block devices (an LVM volume as a base image) are read, opened
/// non-blocking; anything else (a FIFO, a character device, a directory) never is.
fn backing_name(path: &Path) -> Result<Option<String>, ChainError> {
    use std::os::unix::fs::MetadataExt;
    let shown = || format!("{:?}", path.display().to_string());
    let io = |e: std::io::Error| match e.kind() {
        std::io::ErrorKind::PermissionDenied => ChainError::NoAccess { path: shown() },
        _ => ChainError::Io { path: shown(), message: e.to_string() },
    };
    let before = std::fs::metadata(path).map_err(io)?;
    let kind = before.file_type();
    if !(kind.is_file() || kind.is_block_device()) {
        return Err(ChainError::NotAFile { path: shown() });
    }
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(io)?;
    let after = f.metadata().map_err(io)?;
    if (after.dev(), after.ino()) != (before.dev(), before.ino()) {
        return Err(ChainError::Io { path: shown(), message: "replaced while being opened".into() });
    }
    let mut head = [0u8; 20];
    match f.read_exact_at(&mut head, 0) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(io(e)),
    }
    if &head[..4] != MAGIC {
        return Ok(None);
    }
    let bad = |message: String| ChainError::BadHeader { path: shown(), message };
    let version = u32::from_be_bytes(head[4..8].try_into().unwrap());
    if version == 1 {
        return Ok(None); // qcow v1: not written by vmthunder, and QEMU's backing rules differ
    }
    if !(2..=3).contains(&version) {
        return Err(bad(format!("version {version}")));
    }
    let offset = u64::from_be_bytes(head[8..16].try_into().unwrap());
    let len = u32::from_be_bytes(head[16..20].try_into().unwrap());
    if offset == 0 || len == 0 {
        return Ok(None); // no backing file, as QEMU reads it
    }
    if len > MAX_NAME {
        return Err(bad(format!("backing file name of {len} bytes (1 to {MAX_NAME})")));
    }
    let mut name = vec![0u8; len as usize];
    f.read_exact_at(&mut name, offset).map_err(|e| bad(format!("backing file name at {offset}: {e}")))?;
    String::from_utf8(name).map(Some).map_err(|_| bad("backing file name is not UTF-8".into()))
}

/// Follows the backing chain of `start` to its end. Relative backing names are resolved
/// against the directory of the file as named (as QEMU does), not of its canonical path.
pub fn chain_end(start: &Path) -> Result<ChainEnd, ChainError> {
    let shown = |p: &Path| format!("{:?}", p.display().to_string());
    let mut seen: Vec<PathBuf> = Vec::new();
    let mut current = start.to_path_buf();
    for _ in 0..MAX_DEPTH {
        let real = std::fs::canonicalize(&current)
            .map_err(|e| ChainError::Io { path: shown(&current), message: e.to_string() })?;
        if seen.contains(&real) {
            return Err(ChainError::Loop { path: shown(start), again: shown(&real) });
        }
        seen.push(real);
        let Some(name) = backing_name(&current)? else { return Ok(ChainEnd::Local) };
        if is_network(&name) {
            return Ok(ChainEnd::Network(name));
        }
        let next = Path::new(name.strip_prefix("file:").unwrap_or(&name));
        current =
            if next.is_absolute() { next.to_path_buf() } else { current.parent().unwrap_or(Path::new("/")).join(next) };
    }
    Err(ChainError::TooDeep { path: shown(start) })
}

/// A backing string QEMU reads as a protocol (network) source rather than a file name: `json:`,
/// or a `:` before the first `/` (`nbd://…`, `nbd:unix:…`, `rbd:pool/img`), except `file:`.
fn is_network(name: &str) -> bool {
    if name.starts_with("file:") {
        return false;
    }
    match (name.find(':'), name.find('/')) {
        (Some(colon), Some(slash)) => colon < slash,
        (Some(_), None) => true,
        _ => false,
    }
}

/// The unix socket of an `nbd+unix:///EXPORT?socket=PATH` backing string, and its export.
pub fn nbd_unix(name: &str) -> Option<(String, PathBuf)> {
    let rest = name.strip_prefix("nbd+unix:///")?;
    let (export, query) = rest.split_once('?')?;
    let socket = query.split('&').find_map(|kv| kv.strip_prefix("socket="))?;
    Some((export.to_string(), PathBuf::from(socket)))
}

#[cfg(test)]
mod tests;
