//! Metrics for operators: the Prometheus exposition of vmtd and vmt-tracker, its HTTP endpoint
//! with health and readiness, and systemd's readiness protocol.
//!
//! Values are read at scrape time from the counters the daemon keeps anyway (the ones
//! `vmt status` shows), so the two never disagree; only latencies need [`Histogram`]s of their
//! own. Names follow Prometheus conventions: prefix `vmthunder_`, base units (`_bytes`,
//! `_seconds`), counters end in `_total`. Labels are bounded: image names come from the
//! configuration, peers appear only as aggregates.

pub mod histogram;
pub mod http;
pub mod notify;

use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};

pub use histogram::{Histogram, Snapshot};

/// The labels of one series.
pub type Labels = Vec<(&'static str, String)>;

/// Writes metric families into one scrape: a thin layer over prometheus-client's collector
/// encoder that takes whole families of `(labels, value)` series.
pub struct Families<'a, 'b> {
    enc: &'a mut DescriptorEncoder<'b>,
}

impl<'a, 'b> Families<'a, 'b> {
    pub fn new(enc: &'a mut DescriptorEncoder<'b>) -> Self {
        Families { enc }
    }

    /// A counter family; `name` without `_total` (the encoder appends it).
    pub fn counter(&mut self, name: &str, help: &str, unit: Option<Unit>, series: &[(Labels, u64)]) -> Fmt {
        let mut m = self.enc.encode_descriptor(name, help, unit.as_ref(), MetricType::Counter)?;
        for (labels, v) in series {
            ConstCounter::new(*v).encode(m.encode_family(labels)?)?;
        }
        Ok(())
    }

    pub fn gauge(&mut self, name: &str, help: &str, unit: Option<Unit>, series: &[(Labels, i64)]) -> Fmt {
        let mut m = self.enc.encode_descriptor(name, help, unit.as_ref(), MetricType::Gauge)?;
        for (labels, v) in series {
            ConstGauge::new(*v).encode(m.encode_family(labels)?)?;
        }
        Ok(())
    }

    /// A histogram family in seconds.
    pub fn seconds(&mut self, name: &str, help: &str, series: &[(Labels, Snapshot)]) -> Fmt {
        let mut m = self.enc.encode_descriptor(name, help, Some(&Unit::Seconds), MetricType::Histogram)?;
        for (labels, s) in series {
            m.encode_family(labels)?.encode_histogram::<NoLabelSet>(s.sum_seconds(), s.count(), &s.buckets(), None)?;
        }
        Ok(())
    }
}

pub type Fmt = Result<(), std::fmt::Error>;

/// A registry with the `vmthunder_` prefix and `vmthunder_build_info`.
pub fn registry() -> Registry {
    let mut r = Registry::with_prefix("vmthunder");
    r.register_collector(Box::new(BuildInfo));
    r
}

#[derive(Debug)]
struct BuildInfo;

impl prometheus_client::collector::Collector for BuildInfo {
    fn encode(&self, mut enc: DescriptorEncoder) -> Fmt {
        let labels: Labels = vec![("version", env!("CARGO_PKG_VERSION").to_string())];
        Families::new(&mut enc).gauge("build_info", "The running version (value 1).", None, &[(labels, 1)])
    }
}

/// The registry's metrics in Prometheus text format 0.0.4.
pub fn render(r: &Registry) -> String {
    let mut out = String::new();
    // Writing into a String cannot fail; a collector's own error would only cut the scrape.
    let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, r);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[derive(Debug)]
    struct One(Snapshot);

    impl prometheus_client::collector::Collector for One {
        fn encode(&self, mut enc: DescriptorEncoder) -> Fmt {
            Families::new(&mut enc).seconds("wait", "Waits.", &[(vec![("image", "a".into())], self.0.clone())])
        }
    }

    /// The exposition of a histogram is cumulative once, ends at +Inf with the count, and
    /// its sum is in seconds.
    #[test]
    fn histograms_render_as_prometheus_expects() {
        let h = Histogram::default();
        for us in [10, 10, 40, 2_000, 20_000_000] {
            h.observe(Duration::from_micros(us));
        }
        let mut r = registry();
        r.register_collector(Box::new(One(h.snapshot())));
        let text = render(&r);
        let value = |series: &str| -> f64 {
            text.lines()
                .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
                .unwrap_or_else(|| panic!("no {series} in\n{text}"))
        };
        assert_eq!(value("vmthunder_wait_seconds_bucket{image=\"a\",le=\"2.5e-05\"}"), 2.0);
        assert_eq!(value("vmthunder_wait_seconds_bucket{image=\"a\",le=\"5e-05\"}"), 3.0);
        assert_eq!(value("vmthunder_wait_seconds_bucket{image=\"a\",le=\"0.0025\"}"), 4.0);
        assert_eq!(value("vmthunder_wait_seconds_bucket{image=\"a\",le=\"10\"}"), 4.0);
        assert_eq!(value("vmthunder_wait_seconds_bucket{image=\"a\",le=\"+Inf\"}"), 5.0);
        assert_eq!(value("vmthunder_wait_seconds_count{image=\"a\"}"), 5.0);
        assert!((value("vmthunder_wait_seconds_sum{image=\"a\"}") - 20.00206).abs() < 1e-9);
        // Buckets never decrease.
        let buckets: Vec<f64> = text
            .lines()
            .filter(|l| l.starts_with("vmthunder_wait_seconds_bucket"))
            .map(|l| l.rsplit(' ').next().unwrap().parse().unwrap())
            .collect();
        assert_eq!(buckets.len(), histogram::BOUNDS_NS.len() + 1);
        assert!(buckets.windows(2).all(|w| w[0] <= w[1]), "{buckets:?}");
    }
}
