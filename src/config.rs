//! `vmtd`'s TOML configuration (`/etc/vmthunder/vmtd.toml` by default).
//!
//! Unknown keys are refused and every value is validated on load, each error naming its key, so
//! a typo never silently falls back to a default. See the README for every key.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::fetch::origin::{OriginError, OriginUrl};
use crate::image::ChunkSize;
use crate::iscsi::chap::Credentials;
use crate::iscsi::initiator::IscsiOptions;
use crate::iscsi::pdu::Digests;

mod cache;
mod nbd;
mod p2p;
pub use cache::{CacheConfig, CacheLimits};
pub use nbd::NbdConfig;
pub use p2p::{P2pConfig, P2pTuning};

/// Where `vmtd` looks for its configuration when none is given.
pub const DEFAULT_CONFIG: &str = "/etc/vmthunder/vmtd.toml";

/// Errors loading or validating the configuration.
#[derive(Debug, Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("config {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    /// The TOML is malformed or has unknown or mistyped keys.
    #[error("config {path}: {message}")]
    Parse { path: PathBuf, message: String },
    /// A value is out of range or malformed.
    #[error("config key `{key}`: {message}")]
    Invalid { key: String, message: String },
}

fn invalid(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { key: key.into(), message: message.into() }
}

/// The daemon's configuration.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Holds `control.sock` and `exports/<image>.sock`.
    #[serde(default = "default_run_dir")]
    pub run_dir: PathBuf,
    /// Holds one directory per image digest (data file, state, manifest).
    #[serde(default = "default_cache_dir")]
    pub cache_dir: PathBuf,
    /// Holds boot profiles, named by image digest.
    #[serde(default = "default_profile_dir")]
    pub profile_dir: PathBuf,
    /// The user that may connect to export sockets (QEMU's user under libvirt).
    #[serde(default = "default_export_user")]
    pub export_user: String,
    /// Optional TCP address serving every export by name (read-only, like the sockets).
    #[serde(default)]
    pub listen: Option<SocketAddr>,
    /// Optional address of the metrics endpoint (`/metrics`, `/healthz`, `/readyz`), e.g.
    /// "127.0.0.1:9477"; off when absent.
    #[serde(default)]
    pub metrics_listen: Option<SocketAddr>,
    /// How long one guest read may wait for an unreachable origin before it gets EIO.
    #[serde(default = "default_fetch_timeout")]
    pub fetch_timeout: String,
    /// Longest upstream read made by joining adjacent missing chunks.
    #[serde(default = "default_max_fetch")]
    pub max_fetch: String,
    /// How often newly fetched chunks are made durable and recorded (group commit).
    #[serde(default = "default_commit_interval")]
    pub commit_interval: String,
    /// Record the first boot of an image that has no profile (started by the libvirt hook).
    #[serde(default = "default_true")]
    pub auto_record: bool,
    /// How long a recording runs unless the domain stops or it is stopped first.
    #[serde(default = "default_record_duration")]
    pub record_duration: String,
    /// A profile chunk not read by this many merged boots in a row is dropped (0: never).
    #[serde(default = "default_age_out")]
    pub profile_age_out: u32,
    /// Prefetch runs in flight per image.
    #[serde(default = "default_prefetch_concurrency")]
    pub prefetch_concurrency: usize,
    /// Optional cap on prefetch traffic, e.g. "50MiB" (per second).
    #[serde(default)]
    pub prefetch_rate: Option<String>,
    /// Threads running the daemon's tasks: 0 for one per core; 1 runs everything on one thread
    /// (the cheapest when the node has many daemons per core, as in an emulated cluster).
    #[serde(default)]
    pub worker_threads: usize,
    /// What NBD clients may cost this node (connections, bytes in flight, timeouts).
    #[serde(default)]
    pub nbd: NbdConfig,
    /// Peer-to-peer relay between nodes (off when absent).
    #[serde(default)]
    pub p2p: Option<P2pConfig>,
    /// The disk budget of all caches together (unbounded when absent).
    #[serde(default)]
    pub cache: CacheConfig,
    /// Images served at start.
    #[serde(default, rename = "image")]
    pub images: Vec<ImageConfig>,
}

/// One image served by the daemon.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ImageConfig {
    /// The export name and socket name: `[A-Za-z0-9._-]`, 1 to 64 characters, no leading dot.
    pub name: String,
    /// `file:///PATH`, `nbd+unix:///EXPORT?socket=PATH`, `nbd://HOST[:PORT]/EXPORT` or
    /// `iscsi://HOST[:PORT]/IQN/LUN`.
    pub origin: String,
    /// Power of two, 4KiB to 4MiB; 64KiB by default, or the manifest's when one is given.
    #[serde(default)]
    pub chunk_size: Option<String>,
    /// Manifest file (from `vmt image manifest`); required for network origins, built by
    /// reading the image once for file origins when absent.
    #[serde(default)]
    pub manifest: Option<PathBuf>,
    /// CHAP user name for an iSCSI origin (with `chap_secret_file`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chap_user: Option<String>,
    /// File holding the CHAP secret (one line; accessible by its owner only). Secrets never
    /// appear in the config, URLs or command lines.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chap_secret_file: Option<PathBuf>,
    /// Offer CRC32C header digests to an iSCSI origin (RFC 7143 §13.1); the target may refuse.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub iscsi_header_digest: bool,
    /// Offer CRC32C data digests to an iSCSI origin; the target may refuse.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub iscsi_data_digest: bool,
}

/// Run-time settings derived from [`Config`], in typed units.
#[derive(Debug, Clone, Copy)]
pub struct Tuning {
    pub fetch_timeout: Duration,
    pub max_fetch: u64,
    pub commit_interval: Duration,
    pub record_duration: Duration,
    pub prefetch_rate: Option<u64>,
}

fn default_true() -> bool {
    true
}
fn default_record_duration() -> String {
    "120s".into()
}
fn default_age_out() -> u32 {
    3
}
fn default_prefetch_concurrency() -> usize {
    4
}
fn default_run_dir() -> PathBuf {
    "/run/vmthunder".into()
}
fn default_cache_dir() -> PathBuf {
    "/var/lib/vmthunder/cache".into()
}
fn default_profile_dir() -> PathBuf {
    "/var/lib/vmthunder/profiles".into()
}
fn default_export_user() -> String {
    "libvirt-qemu".into()
}
fn default_fetch_timeout() -> String {
    "30s".into()
}
fn default_max_fetch() -> String {
    "1MiB".into()
}
fn default_commit_interval() -> String {
    "1s".into()
}

impl Config {
    /// Reads and validates the configuration file at `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.into(), source })?;
        let cfg: Config =
            toml::from_str(&text).map_err(|e| ConfigError::Parse { path: path.into(), message: e.to_string() })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Parses and validates TOML text (for tests and tools).
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        let cfg: Config =
            toml::from_str(text).map_err(|e| ConfigError::Parse { path: "<text>".into(), message: e.to_string() })?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        for (key, p) in [("run_dir", &self.run_dir), ("cache_dir", &self.cache_dir), ("profile_dir", &self.profile_dir)]
        {
            if !p.is_absolute() {
                return Err(invalid(key, format!("{} must be an absolute path", p.display())));
            }
        }
        self.tuning()?;
        self.nbd.limits()?;
        self.cache.validate()?;
        if let Some(p) = &self.p2p {
            let t = p.tuning()?;
            // A relay that may wait as long as a guest read may would turn a hung parent into
            // EIO for the guest instead of a fallback to the origin.
            if t.peer_timeout >= self.tuning()?.fetch_timeout {
                return Err(invalid("p2p.peer_timeout", "must be shorter than fetch_timeout"));
            }
        }
        let mut seen = HashSet::new();
        for (i, img) in self.images.iter().enumerate() {
            img.validate().map_err(|e| match e {
                ConfigError::Invalid { key, message } => invalid(format!("image[{i}].{key}"), message),
                other => other,
            })?;
            if !seen.insert(img.name.as_str()) {
                return Err(invalid(format!("image[{i}].name"), format!("duplicate image name {:?}", img.name)));
            }
        }
        Ok(())
    }

    pub fn tuning(&self) -> Result<Tuning, ConfigError> {
        let fetch_timeout = parse_duration(&self.fetch_timeout).map_err(|m| invalid("fetch_timeout", m))?;
        let commit_interval = parse_duration(&self.commit_interval).map_err(|m| invalid("commit_interval", m))?;
        if commit_interval.is_zero() || commit_interval > Duration::from_secs(60) {
            return Err(invalid("commit_interval", "must be between 1ms and 60s"));
        }
        let max_fetch = parse_size(&self.max_fetch).map_err(|m| invalid("max_fetch", m))?;
        if !(4096..=32 << 20).contains(&max_fetch) {
            return Err(invalid("max_fetch", "must be between 4KiB and 32MiB"));
        }
        let record_duration = parse_duration(&self.record_duration).map_err(|m| invalid("record_duration", m))?;
        if record_duration.is_zero() || record_duration > Duration::from_secs(3600) {
            return Err(invalid("record_duration", "must be between 1ms and 60m"));
        }
        if !(1..=64).contains(&self.prefetch_concurrency) {
            return Err(invalid("prefetch_concurrency", "must be between 1 and 64"));
        }
        if self.worker_threads > 1024 {
            return Err(invalid("worker_threads", "must be between 0 (one per core) and 1024"));
        }
        let prefetch_rate =
            self.prefetch_rate.as_deref().map(parse_size).transpose().map_err(|m| invalid("prefetch_rate", m))?;
        Ok(Tuning { fetch_timeout, max_fetch, commit_interval, record_duration, prefetch_rate })
    }

    pub fn control_socket(&self) -> PathBuf {
        self.run_dir.join("control.sock")
    }

    pub fn export_socket(&self, image: &str) -> PathBuf {
        self.run_dir.join("exports").join(format!("{image}.sock"))
    }
}

impl ImageConfig {
    /// Checks every field; errors carry the field name as key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        validate_name(&self.name).map_err(|m| invalid("name", m))?;
        let origin = OriginUrl::parse(&self.origin).map_err(|e: OriginError| invalid("origin", e.to_string()))?;
        self.chunk_size().map_err(|m| invalid("chunk_size", m))?;
        if self.manifest.is_none() && !matches!(origin, OriginUrl::File(_)) {
            return Err(invalid(
                "manifest",
                "a network origin needs a manifest file (build one with `vmt image manifest`)",
            ));
        }
        match (&self.chap_user, &self.chap_secret_file) {
            (None, None) => {}
            (Some(_), None) => return Err(invalid("chap_secret_file", "chap_user needs chap_secret_file")),
            (None, Some(_)) => return Err(invalid("chap_user", "chap_secret_file needs chap_user")),
            (Some(user), Some(file)) => {
                if !matches!(origin, OriginUrl::Iscsi(_)) {
                    return Err(invalid("chap_user", "CHAP applies to iscsi:// origins only"));
                }
                validate_chap_user(user).map_err(|m| invalid("chap_user", m))?;
                check_secret_file(file).map_err(|m| invalid("chap_secret_file", m))?;
            }
        }
        if !matches!(origin, OriginUrl::Iscsi(_)) {
            for (key, on) in
                [("iscsi_header_digest", self.iscsi_header_digest), ("iscsi_data_digest", self.iscsi_data_digest)]
            {
                if on {
                    return Err(invalid(key, "digests apply to iscsi:// origins only"));
                }
            }
        }
        Ok(())
    }

    /// How to log in to this image's iSCSI origin: CHAP credentials (read from
    /// `chap_secret_file`) and the digests to offer.
    pub fn iscsi_options(&self) -> Result<IscsiOptions, ConfigError> {
        let credentials = match (&self.chap_user, &self.chap_secret_file) {
            (Some(user), Some(file)) => Some(load_chap(user, file)?),
            _ => None,
        };
        let digests = Digests { header: self.iscsi_header_digest, data: self.iscsi_data_digest };
        Ok(IscsiOptions { credentials, digests })
    }

    /// The configured chunk size, if any.
    pub fn chunk_size(&self) -> Result<Option<ChunkSize>, String> {
        match &self.chunk_size {
            None => Ok(None),
            Some(s) => ChunkSize::new(parse_size(s)?).map(Some).map_err(|e| e.to_string()),
        }
    }
}

/// CHAP names travel as login text: printable, no NUL, bounded.
fn validate_chap_user(user: &str) -> Result<(), String> {
    if user.is_empty() || user.len() > 255 || user.chars().any(|c| c.is_control()) {
        return Err(format!("{user:?} is not a valid CHAP user name (1-255 printable characters)"));
    }
    Ok(())
}

/// A secret file must be a regular file that only its owner can access.
fn check_secret_file(path: &Path) -> Result<std::fs::Metadata, String> {
    use std::os::unix::fs::PermissionsExt;
    if !path.is_absolute() {
        return Err(format!("{} must be an absolute path", path.display()));
    }
    let meta = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if !meta.is_file() {
        return Err(format!("{} is not a regular file", path.display()));
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(format!(
            "{} is accessible by group or others (mode {mode:04o}); a CHAP secret must be mode 0600 or 0400",
            path.display()
        ));
    }
    Ok(meta)
}

/// Loads CHAP credentials: `user` and the secret held in `file` (mode checked, one trailing
/// newline dropped). Used by `vmtd` and by `vmt image manifest --chap-secret-file`.
pub fn load_chap(user: &str, file: &Path) -> Result<Credentials, ConfigError> {
    validate_chap_user(user).map_err(|m| invalid("chap_user", m))?;
    check_secret_file(file).map_err(|m| invalid("chap_secret_file", m))?;
    let mut secret =
        std::fs::read(file).map_err(|e| invalid("chap_secret_file", format!("{}: {e}", file.display())))?;
    if secret.ends_with(b"\n") {
        secret.pop();
        if secret.ends_with(b"\r") {
            secret.pop();
        }
    }
    if secret.is_empty() || secret.len() > 255 || secret.contains(&0) {
        return Err(invalid("chap_secret_file", format!("{}: the secret must be 1-255 bytes, no NUL", file.display())));
    }
    Ok(Credentials::new(user, secret))
}

/// Image names become file names and export names: keep them to a safe alphabet.
pub fn validate_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(format!("{name:?} is not a valid image name (1-64 of A-Z a-z 0-9 . _ -, not starting with '.')"))
    }
}

/// Parses sizes such as `65536`, `64KiB`, `4MiB`, `1GiB` (also `K`, `M`, `G`, `KB`...: all binary).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("{s:?} is not a size (e.g. 64KiB)"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        _ => return Err(format!("{s:?}: unknown size unit (use KiB, MiB, GiB)")),
    };
    n.checked_mul(mult).ok_or_else(|| format!("{s:?} is too large"))
}

/// Formats a byte count the way [`parse_size`] reads it, exactly when possible.
pub fn format_size(n: u64) -> String {
    for (unit, shift) in [("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)] {
        if n >= 1 << shift && n % (1 << shift) == 0 {
            return format!("{}{unit}", n >> shift);
        }
    }
    format!("{n}")
}

/// Parses durations such as `500ms`, `30s`, `2m`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("{s:?} is not a duration (e.g. 30s)"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" | "" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n.saturating_mul(60))),
        _ => Err(format!("{s:?}: unknown duration unit (use ms, s, m)")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const GOOD: &str = r#"
run_dir = "/run/vmthunder"
cache_dir = "/var/lib/vmthunder/cache"
profile_dir = "/var/lib/vmthunder/profiles"
[[image]]
name = "debian12"
origin = "file:///srv/images/debian12.raw"
chunk_size = "64KiB"
"#;

    #[test]
    fn good_config_loads() {
        let c = Config::from_toml(GOOD).unwrap();
        assert_eq!(c.images.len(), 1);
        assert_eq!(c.images[0].chunk_size().unwrap().unwrap().bytes(), 65536);
        assert_eq!(c.tuning().unwrap().fetch_timeout, Duration::from_secs(30));
    }

    fn err(text: &str) -> String {
        Config::from_toml(text).unwrap_err().to_string()
    }

    #[test]
    fn errors_name_the_key() {
        assert!(err(&GOOD.replace("64KiB", "3000")).contains("image[0].chunk_size"));
        assert!(err(&GOOD.replace("64KiB", "8MiB")).contains("power of two"));
        assert!(err(&GOOD.replace("debian12\"\norigin", "../x\"\norigin")).contains("image[0].name"));
        assert!(err(&GOOD.replace("file:///srv", "ftp://srv")).contains("image[0].origin"));
        assert!(err(&format!("{GOOD}\nbogus = 1")).contains("bogus"));
        assert!(err(&GOOD.replace("chunk_size", "chunksize")).contains("chunksize"));
        assert!(err(&GOOD.replace("\"/run/vmthunder\"", "\"run\"")).contains("run_dir"));
        let dup = format!("{GOOD}\n[[image]]\nname = \"debian12\"\norigin = \"file:///x\"\n");
        assert!(err(&dup).contains("duplicate"));
        let nbd = GOOD.replace("file:///srv/images/debian12.raw", "nbd://127.0.0.1:10809/img");
        assert!(err(&nbd).contains("image[0].manifest"));
        assert!(err(&format!("fetch_timeout = \"soon\"\n{GOOD}")).contains("fetch_timeout"));
        assert!(err(&format!("record_duration = \"0s\"\n{GOOD}")).contains("record_duration"));
        assert!(err(&format!("prefetch_concurrency = 0\n{GOOD}")).contains("prefetch_concurrency"));
        assert!(err(&format!("worker_threads = 5000\n{GOOD}")).contains("worker_threads"));
        assert!(err(&format!("prefetch_rate = \"fast\"\n{GOOD}")).contains("prefetch_rate"));
        for bad in ["\"localhost:9477\"", "\"9477\"", "\"127.0.0.1\"", "\"\"", "9477"] {
            assert!(err(&format!("metrics_listen = {bad}\n{GOOD}")).contains("metrics_listen"), "{bad}");
        }
        let ok = Config::from_toml(&format!("metrics_listen = \"[::1]:9477\"\n{GOOD}")).unwrap();
        assert_eq!(ok.metrics_listen, Some("[::1]:9477".parse().unwrap()));
    }

    #[test]
    fn chap_keys_are_validated() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("secret");
        std::fs::write(&secret, "s3cret-s3cret\n").unwrap();
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
        let iscsi = GOOD.replace("file:///srv/images/debian12.raw", "iscsi://10.0.0.1/iqn.2026-01.x:d/1")
            + "manifest = \"/m\"\n";
        let with = |extra: &str| format!("{iscsi}{extra}\n");
        let ok = with(&format!("chap_user = \"u\"\nchap_secret_file = \"{}\"", secret.display()));
        let c = Config::from_toml(&ok).unwrap();
        let opts = c.images[0].iscsi_options().unwrap();
        assert_eq!(opts.credentials.unwrap(), Credentials::new("u", "s3cret-s3cret"));
        assert_eq!(opts.digests, Digests::default(), "no digests unless asked for");
        let c = Config::from_toml(&with("iscsi_header_digest = true\niscsi_data_digest = true")).unwrap();
        let opts = c.images[0].iscsi_options().unwrap();
        assert!(opts.credentials.is_none());
        assert_eq!(opts.digests, Digests { header: true, data: true });
        assert!(err(&format!("{GOOD}iscsi_data_digest = true\n")).contains("image[0].iscsi_data_digest"));
        assert!(err(&with("iscsi_header_digest = \"yes\"")).contains("iscsi_header_digest"));
        assert!(err(&with("chap_user = \"u\"")).contains("image[0].chap_secret_file"));
        assert!(err(&with(&format!("chap_secret_file = \"{}\"", secret.display()))).contains("image[0].chap_user"));
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = err(&ok);
        assert!(e.contains("image[0].chap_secret_file") && e.contains("0644"), "{e}");
        assert!(!e.contains("s3cret"));
        let file_origin = format!("{GOOD}chap_user = \"u\"\nchap_secret_file = \"{}\"\n", secret.display());
        assert!(err(&file_origin).contains("iscsi"));
    }

    #[test]
    fn sizes_and_durations() {
        assert_eq!(parse_size("64KiB"), Ok(65536));
        assert_eq!(parse_size("4M"), Ok(4 << 20));
        assert_eq!(parse_size("123"), Ok(123));
        assert!(parse_size("12XB").is_err());
        assert!(parse_size("99999999999999TiB").is_err());
        assert_eq!(format_size(65536), "64KiB");
        assert_eq!(format_size(1000), "1000");
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert!(parse_duration("1h").is_err());
    }

    proptest! {
        #[test]
        fn size_roundtrip(n in 0u64..1 << 50) {
            prop_assert_eq!(parse_size(&format_size(n)), Ok(n));
        }

        #[test]
        fn arbitrary_toml_never_panics(s in "\\PC{0,200}") {
            let _ = Config::from_toml(&s);
        }
    }
}
