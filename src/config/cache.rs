//! The `[cache]` section: how much disk the caches of all images may hold together, and the
//! watermarks the collector works between. Without `max` the caches are unbounded (they stop
//! caching only when the disk is full). Each error names its key (`cache.KEY`).

use serde::{Deserialize, Serialize};

use super::{invalid, parse_size, ConfigError};

/// The `[cache]` section.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CacheConfig {
    /// Bytes (`"20GiB"`) or a share of the cache filesystem (`"50%"`) the caches may hold.
    #[serde(default)]
    pub max: Option<String>,
    /// Share of `max` at which eviction starts (default `"90%"`).
    #[serde(default)]
    pub high_watermark: Option<String>,
    /// Share of `max` eviction frees down to (default `"80%"`).
    #[serde(default)]
    pub low_watermark: Option<String>,
    /// `"profile"` (default): chunks outside boot profiles are evicted first; `"lru"`: least
    /// recently used images first, whole.
    #[serde(default)]
    pub eviction: crate::store::gc::Policy,
}

/// The budget in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheLimits {
    pub max: u64,
    pub high: u64,
    pub low: u64,
}

/// A percentage `"N%"` with 1 <= N <= 100.
fn percent(key: &str, v: &str) -> Result<u64, ConfigError> {
    let n = v.trim().strip_suffix('%').and_then(|n| n.trim().parse::<u64>().ok());
    match n {
        Some(n) if (1..=100).contains(&n) => Ok(n),
        _ => Err(invalid(format!("cache.{key}"), format!("{v:?} is not a percentage between 1% and 100%"))),
    }
}

impl CacheConfig {
    /// Checks the section without looking at the filesystem.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.limits(1 << 40).map(|_| ())
    }

    /// The budget, given the size of the cache filesystem (for a `max` in percent); `None`
    /// when `max` is not set.
    pub fn limits(&self, fs_bytes: u64) -> Result<Option<CacheLimits>, ConfigError> {
        let high = percent("high_watermark", self.high_watermark.as_deref().unwrap_or("90%"))?;
        let low = percent("low_watermark", self.low_watermark.as_deref().unwrap_or("80%"))?;
        if low >= high {
            return Err(invalid("cache.low_watermark", "must be below cache.high_watermark"));
        }
        let Some(max) = &self.max else { return Ok(None) };
        let max = if max.trim().ends_with('%') {
            fs_bytes / 100 * percent("max", max)?
        } else {
            parse_size(max).map_err(|m| invalid("cache.max", m))?
        };
        if max < 1 << 20 {
            return Err(invalid("cache.max", "must be at least 1MiB"));
        }
        Ok(Some(CacheLimits { max, high: max / 100 * high, low: max / 100 * low }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(max: Option<&str>, high: Option<&str>, low: Option<&str>) -> CacheConfig {
        CacheConfig {
            max: max.map(Into::into),
            high_watermark: high.map(Into::into),
            low_watermark: low.map(Into::into),
            eviction: Default::default(),
        }
    }

    #[test]
    fn sizes_and_shares() {
        let l = cfg(Some("1GiB"), None, None).limits(0).unwrap().unwrap();
        assert_eq!((l.max, l.high, l.low), (1 << 30, (1 << 30) / 100 * 90, (1 << 30) / 100 * 80));
        let l = cfg(Some("50%"), Some("100%"), Some("1%")).limits(200 << 20).unwrap().unwrap();
        assert_eq!(l.max, 100 << 20);
        assert_eq!(cfg(None, None, None).limits(0).unwrap(), None);
    }

    #[test]
    fn refusals_name_the_key() {
        for (c, key) in [
            (cfg(Some("lots"), None, None), "cache.max"),
            (cfg(Some("0%"), None, None), "cache.max"),
            (cfg(Some("512KiB"), None, None), "cache.max"),
            (cfg(None, Some("101%"), None), "cache.high_watermark"),
            (cfg(None, Some("90"), None), "cache.high_watermark"),
            (cfg(None, None, Some("x%")), "cache.low_watermark"),
            (cfg(None, Some("50%"), Some("60%")), "cache.low_watermark"),
        ] {
            match c.validate() {
                Err(ConfigError::Invalid { key: k, .. }) => assert_eq!(k, key),
                other => panic!("{c:?}: {other:?}"),
            }
        }
    }
}
