//! The `[nbd]` section: what NBD clients may cost this node (README, "Limits").
//!
//! Every bound has a default; the section may be left out. Values are checked on load and each
//! error names its key (`nbd.KEY`).

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{invalid, parse_duration, parse_size, ConfigError};
use crate::nbd::limits::{NbdLimits, PIECE};

/// Limits on NBD clients.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct NbdConfig {
    /// Connections on the whole node, handshakes included; more are closed at once.
    pub max_connections: usize,
    /// Connections in use per export; more are refused at the handshake.
    pub max_connections_per_export: u64,
    /// Reply bytes in flight per connection, held until written (at least 1MiB).
    pub connection_bytes: String,
    /// Reply bytes in flight on the whole node (at least `connection_bytes`).
    pub node_bytes: String,
    /// Longest time from accepting a connection to the end of its handshake.
    pub handshake_timeout: String,
    /// Longest time one reply may take to be written (a client that stops reading is closed).
    pub write_timeout: String,
    /// Close a connection with nothing in flight for this long ("0": never, the default: QEMU
    /// keeps idle connections for as long as the guest runs).
    pub idle_timeout: String,
}

impl Default for NbdConfig {
    fn default() -> Self {
        let d = NbdLimits::default();
        let secs = |d: Duration| format!("{}s", d.as_secs());
        NbdConfig {
            max_connections: d.max_connections,
            max_connections_per_export: d.max_connections_per_export,
            connection_bytes: super::format_size(d.connection_bytes as u64),
            node_bytes: super::format_size(d.node_bytes as u64),
            handshake_timeout: secs(d.handshake_timeout),
            write_timeout: secs(d.write_timeout),
            idle_timeout: "0".into(),
        }
    }
}

impl NbdConfig {
    /// The limits in typed units; errors carry `nbd.KEY`.
    pub fn limits(&self) -> Result<NbdLimits, ConfigError> {
        let size = |key: &str, v: &str| parse_size(v).map_err(|m| invalid(format!("nbd.{key}"), m));
        let dur = |key: &str, v: &str| parse_duration(v).map_err(|m| invalid(format!("nbd.{key}"), m));
        let connection_bytes = size("connection_bytes", &self.connection_bytes)?;
        if connection_bytes < u64::from(PIECE) || connection_bytes > 1 << 30 {
            return Err(invalid("nbd.connection_bytes", "must be between 1MiB and 1GiB"));
        }
        let node_bytes = size("node_bytes", &self.node_bytes)?;
        if node_bytes < connection_bytes || node_bytes > 1 << 40 {
            return Err(invalid("nbd.node_bytes", "must be at least nbd.connection_bytes (and at most 1TiB)"));
        }
        if self.max_connections == 0 || self.max_connections > 1 << 20 {
            return Err(invalid("nbd.max_connections", "must be between 1 and 1048576"));
        }
        if self.max_connections_per_export == 0 {
            return Err(invalid("nbd.max_connections_per_export", "must be at least 1"));
        }
        let bounded = |key: &str, v: &str| {
            let d = dur(key, v)?;
            if d < Duration::from_millis(100) || d > Duration::from_secs(3600) {
                return Err(invalid(format!("nbd.{key}"), "must be between 100ms and 60m"));
            }
            Ok(d)
        };
        let idle = dur("idle_timeout", &self.idle_timeout)?;
        Ok(NbdLimits {
            max_connections: self.max_connections,
            max_connections_per_export: self.max_connections_per_export,
            connection_bytes: connection_bytes as usize,
            node_bytes: node_bytes as usize,
            handshake_timeout: bounded("handshake_timeout", &self.handshake_timeout)?,
            write_timeout: bounded("write_timeout", &self.write_timeout)?,
            idle_timeout: (!idle.is_zero()).then_some(idle),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_documented_limits_and_bad_values_name_their_key() {
        assert_eq!(NbdConfig::default().limits().unwrap(), NbdLimits::default());
        let t: NbdConfig = toml::from_str("connection_bytes = \"64KiB\"").unwrap();
        assert!(t.limits().unwrap_err().to_string().contains("nbd.connection_bytes"));
        let t: NbdConfig = toml::from_str("node_bytes = \"2MiB\"").unwrap();
        assert!(t.limits().unwrap_err().to_string().contains("nbd.node_bytes"));
        let t: NbdConfig = toml::from_str("write_timeout = \"1ms\"").unwrap();
        assert!(t.limits().unwrap_err().to_string().contains("nbd.write_timeout"));
        let t: NbdConfig = toml::from_str("idle_timeout = \"5m\"\nmax_connections = 10").unwrap();
        assert_eq!(t.limits().unwrap().idle_timeout, Some(Duration::from_secs(300)));
        assert!(toml::from_str::<NbdConfig>("max_conections = 3").is_err(), "typos are refused");
    }
}
