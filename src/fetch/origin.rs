//! Origin URLs: the forms an operator writes in `origin = "…"`, parsed into typed targets.
//!
//! - `file:///ABSOLUTE/PATH`
//! - `nbd+unix:///EXPORT?socket=/ABSOLUTE/PATH` (empty EXPORT: the server's default export)
//! - `nbd://HOST[:PORT]/EXPORT` (port 10809 by default; IPv6 hosts in brackets)

use std::path::PathBuf;
use std::sync::Arc;

use thiserror::Error;

use super::file::FileSource;
use super::{ChunkSource, SourceError};
use crate::nbd::client::{NbdClient, NbdTarget};

/// The NBD port registered with IANA.
pub const NBD_DEFAULT_PORT: u16 = 10809;

/// Errors parsing an origin URL.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum OriginError {
    #[error(
        "{0:?}: unsupported origin (use file:///PATH, nbd+unix:///EXPORT?socket=PATH or nbd://HOST[:PORT]/EXPORT)"
    )]
    Scheme(String),
    #[error("{0:?}: the path must be absolute")]
    RelativePath(String),
    #[error("{0:?}: nbd+unix needs ?socket=/ABSOLUTE/PATH")]
    MissingSocket(String),
    #[error("{0:?}: bad host or port")]
    BadHost(String),
}

/// A parsed origin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OriginUrl {
    File(PathBuf),
    Nbd { target: NbdTarget, export: String },
}

impl OriginUrl {
    pub fn parse(url: &str) -> Result<Self, OriginError> {
        if let Some(path) = url.strip_prefix("file://") {
            if !path.starts_with('/') {
                return Err(OriginError::RelativePath(url.into()));
            }
            return Ok(OriginUrl::File(path.into()));
        }
        if let Some(rest) = url.strip_prefix("nbd+unix://") {
            let rest = rest.strip_prefix('/').ok_or_else(|| OriginError::Scheme(url.into()))?;
            let (export, query) = rest.split_once('?').ok_or_else(|| OriginError::MissingSocket(url.into()))?;
            let socket = query
                .split('&')
                .find_map(|kv| kv.strip_prefix("socket="))
                .filter(|s| s.starts_with('/'))
                .ok_or_else(|| OriginError::MissingSocket(url.into()))?;
            return Ok(OriginUrl::Nbd { target: NbdTarget::Unix(socket.into()), export: export.into() });
        }
        if let Some(rest) = url.strip_prefix("nbd://") {
            let (authority, export) = rest.split_once('/').unwrap_or((rest, ""));
            let (host, port) = split_host_port(authority).ok_or_else(|| OriginError::BadHost(url.into()))?;
            return Ok(OriginUrl::Nbd { target: NbdTarget::Tcp { host, port }, export: export.into() });
        }
        Err(OriginError::Scheme(url.into()))
    }

    /// Opens the origin. Network origins connect lazily, on the first read.
    pub fn open(&self) -> Result<Arc<dyn ChunkSource>, SourceError> {
        Ok(match self {
            OriginUrl::File(p) => Arc::new(FileSource::open(p)?),
            OriginUrl::Nbd { target, export } => Arc::new(NbdClient::new(target.clone(), export.clone())),
        })
    }
}

fn split_host_port(authority: &str) -> Option<(String, u16)> {
    let (host, port) = if let Some(rest) = authority.strip_prefix('[') {
        let (h, after) = rest.split_once(']')?;
        (h, after.strip_prefix(':'))
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    if host.is_empty() || host.contains(['/', '?', ' ']) {
        return None;
    }
    let port = match port {
        Some(p) => p.parse().ok().filter(|&p| p != 0)?,
        None => NBD_DEFAULT_PORT,
    };
    Some((host.to_string(), port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_form() {
        assert_eq!(OriginUrl::parse("file:///srv/a.raw"), Ok(OriginUrl::File("/srv/a.raw".into())));
        assert_eq!(
            OriginUrl::parse("nbd+unix:///img?socket=/run/x.sock"),
            Ok(OriginUrl::Nbd { target: NbdTarget::Unix("/run/x.sock".into()), export: "img".into() })
        );
        assert_eq!(
            OriginUrl::parse("nbd://10.0.0.1/img"),
            Ok(OriginUrl::Nbd {
                target: NbdTarget::Tcp { host: "10.0.0.1".into(), port: 10809 },
                export: "img".into()
            })
        );
        assert_eq!(
            OriginUrl::parse("nbd://[::1]:1234/"),
            Ok(OriginUrl::Nbd { target: NbdTarget::Tcp { host: "::1".into(), port: 1234 }, export: "".into() })
        );
    }

    #[test]
    fn refuses_bad_forms() {
        assert!(matches!(OriginUrl::parse("file://rel/a"), Err(OriginError::RelativePath(_))));
        assert!(matches!(OriginUrl::parse("http://x/y"), Err(OriginError::Scheme(_))));
        assert!(matches!(OriginUrl::parse("nbd+unix:///img"), Err(OriginError::MissingSocket(_))));
        assert!(matches!(OriginUrl::parse("nbd+unix:///img?socket=rel"), Err(OriginError::MissingSocket(_))));
        assert!(matches!(OriginUrl::parse("nbd://host:99999/x"), Err(OriginError::BadHost(_))));
        assert!(matches!(OriginUrl::parse("nbd://:80/x"), Err(OriginError::BadHost(_))));
    }
}
