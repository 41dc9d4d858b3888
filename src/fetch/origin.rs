//! Origin URLs: the forms an operator writes in `origin = "…"`, parsed into typed targets.
//!
//! - `file:///ABSOLUTE/PATH`
//! - `nbd+unix:///EXPORT?socket=/ABSOLUTE/PATH` (empty EXPORT: the server's default export)
//! - `nbd://HOST[:PORT]/EXPORT` (port 10809 by default; IPv6 hosts in brackets)
//! - `iscsi://HOST[:PORT]/IQN/LUN` (port 3260 by default; CHAP credentials never in the URL,
//!   they come from the image's configuration)

use std::path::PathBuf;
use std::sync::Arc;

use thiserror::Error;

use super::file::FileSource;
use super::{ChunkSource, SourceError};
use crate::iscsi::initiator::{IscsiClient, IscsiOptions, IscsiTarget, ISCSI_DEFAULT_PORT};
use crate::nbd::client::{NbdClient, NbdTarget};

/// The NBD port registered with IANA.
pub const NBD_DEFAULT_PORT: u16 = 10809;

/// Errors parsing an origin URL.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum OriginError {
    #[error(
        "{0:?}: unsupported origin (use file:///PATH, nbd+unix:///EXPORT?socket=PATH, nbd://HOST[:PORT]/EXPORT or iscsi://HOST[:PORT]/IQN/LUN)"
    )]
    Scheme(String),
    #[error("{0:?}: the path must be absolute")]
    RelativePath(String),
    #[error("{0:?}: nbd+unix needs ?socket=/ABSOLUTE/PATH")]
    MissingSocket(String),
    #[error("{0:?}: bad host or port")]
    BadHost(String),
    #[error("{0:?}: iscsi needs /IQN/LUN after the host (LUN 0 to 16383)")]
    BadIscsiPath(String),
    #[error("{0:?}: credentials do not belong in the URL (use chap_user and chap_secret_file)")]
    UserInfo(String),
}

/// A parsed origin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OriginUrl {
    File(PathBuf),
    Nbd { target: NbdTarget, export: String },
    Iscsi(IscsiTarget),
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
            let (host, port) =
                split_host_port(authority, NBD_DEFAULT_PORT).ok_or_else(|| OriginError::BadHost(url.into()))?;
            return Ok(OriginUrl::Nbd { target: NbdTarget::Tcp { host, port }, export: export.into() });
        }
        if let Some(rest) = url.strip_prefix("iscsi://") {
            let (authority, path) = rest.split_once('/').ok_or_else(|| OriginError::BadIscsiPath(url.into()))?;
            if authority.contains('@') {
                return Err(OriginError::UserInfo(url.into()));
            }
            let (host, port) =
                split_host_port(authority, ISCSI_DEFAULT_PORT).ok_or_else(|| OriginError::BadHost(url.into()))?;
            let (iqn, lun) = path.rsplit_once('/').ok_or_else(|| OriginError::BadIscsiPath(url.into()))?;
            let lun: u16 =
                lun.parse().ok().filter(|&l| l < 16384).ok_or_else(|| OriginError::BadIscsiPath(url.into()))?;
            if iqn.is_empty() || iqn.contains(['/', '?', ' ']) {
                return Err(OriginError::BadIscsiPath(url.into()));
            }
            return Ok(OriginUrl::Iscsi(IscsiTarget { host, port, iqn: iqn.into(), lun }));
        }
        Err(OriginError::Scheme(url.into()))
    }

    /// Opens the origin; `iscsi` (CHAP credentials, digests) is used by iSCSI origins only.
    /// Network origins connect lazily, on the first read.
    pub fn open(&self, iscsi: IscsiOptions) -> Result<Arc<dyn ChunkSource>, SourceError> {
        Ok(match self {
            OriginUrl::File(p) => Arc::new(FileSource::new(p)),
            OriginUrl::Nbd { target, export } => Arc::new(NbdClient::new(target.clone(), export.clone())),
            OriginUrl::Iscsi(target) => Arc::new(IscsiClient::new(target.clone(), iscsi)),
        })
    }
}

fn split_host_port(authority: &str, default_port: u16) -> Option<(String, u16)> {
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
        None => default_port,
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
        let iqn = "iqn.2026-01.org.example:disk1";
        assert_eq!(
            OriginUrl::parse(&format!("iscsi://10.0.0.2/{iqn}/1")),
            Ok(OriginUrl::Iscsi(IscsiTarget { host: "10.0.0.2".into(), port: 3260, iqn: iqn.into(), lun: 1 }))
        );
        assert_eq!(
            OriginUrl::parse(&format!("iscsi://[fd00::1]:3261/{iqn}/0")),
            Ok(OriginUrl::Iscsi(IscsiTarget { host: "fd00::1".into(), port: 3261, iqn: iqn.into(), lun: 0 }))
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
        assert!(matches!(OriginUrl::parse("iscsi://h/iqn.x"), Err(OriginError::BadIscsiPath(_))));
        assert!(matches!(OriginUrl::parse("iscsi://h/iqn.x/a"), Err(OriginError::BadIscsiPath(_))));
        assert!(matches!(OriginUrl::parse("iscsi://h/iqn.x/16384"), Err(OriginError::BadIscsiPath(_))));
        assert!(matches!(OriginUrl::parse("iscsi://h//1"), Err(OriginError::BadIscsiPath(_))));
        assert!(matches!(OriginUrl::parse("iscsi://h"), Err(OriginError::BadIscsiPath(_))));
        assert!(matches!(OriginUrl::parse("iscsi://u:p@h/iqn.x/1"), Err(OriginError::UserInfo(_))));
    }
}
