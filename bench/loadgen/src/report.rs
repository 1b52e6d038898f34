//! The result of one run: what the harness reads (`--json`) and what a person reads.

use std::fmt;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Latency summary in nanoseconds, from submission to completion of each counted I/O.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LatencySummary {
    pub samples: u64,
    pub min_ns: u64,
    pub mean_ns: f64,
    pub p50_ns: u64,
    pub p99_ns: u64,
    pub p99_9_ns: u64,
    pub max_ns: u64,
}

impl LatencySummary {
    pub fn from_histogram(hist: &Histogram<u64>) -> Self {
        if hist.is_empty() {
            return LatencySummary::default();
        }
        LatencySummary {
            samples: hist.len(),
            min_ns: hist.min(),
            mean_ns: hist.mean(),
            p50_ns: hist.value_at_quantile(0.50),
            p99_ns: hist.value_at_quantile(0.99),
            p99_9_ns: hist.value_at_quantile(0.999),
            max_ns: hist.max(),
        }
    }
}

/// One load generator run. Field names are part of the harness's input format.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoadgenReport {
    pub socket: String,
    pub rw: String,
    pub rwmixread: u8,
    pub block_size: u64,
    pub iodepth: u32,
    pub queues: u32,
    pub completion: String,
    pub capacity_bytes: u64,
    pub region_bytes: u64,
    pub ramp_s: f64,
    /// Length of the measured window, as measured.
    pub runtime_s: f64,
    pub reads: u64,
    pub writes: u64,
    pub read_bytes: u64,
    pub write_bytes: u64,
    pub iops: f64,
    pub mib_per_s: f64,
    pub latency: LatencySummary,
    /// I/Os completed in the measured window, per queue (shows imbalance between queues).
    pub per_queue_ios: Vec<u64>,
    /// Failed I/Os. Any failure makes the run fail (exit status 1).
    pub errors: u64,
    pub first_error: Option<String>,
}

impl LoadgenReport {
    pub fn total_ios(&self) -> u64 {
        self.reads + self.writes
    }
}

/// I/Os per second and MiB/s for `ios` I/Os moving `bytes` in `seconds`; zero when no time passed.
pub fn rates(ios: u64, bytes: u64, seconds: f64) -> (f64, f64) {
    if seconds <= 0.0 {
        return (0.0, 0.0);
    }
    (
        ios as f64 / seconds,
        bytes as f64 / seconds / (1024.0 * 1024.0),
    )
}

impl fmt::Display for LoadgenReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let us = |ns: u64| ns as f64 / 1000.0;
        writeln!(
            f,
            "{} bs={} iodepth={} queues={} completion={} on {}",
            self.rw, self.block_size, self.iodepth, self.queues, self.completion, self.socket
        )?;
        writeln!(
            f,
            "  {:.0} IOPS, {:.1} MiB/s over {:.2} s ({} reads, {} writes)",
            self.iops, self.mib_per_s, self.runtime_s, self.reads, self.writes
        )?;
        writeln!(
            f,
            "  latency us: min {:.1} mean {:.1} p50 {:.1} p99 {:.1} p99.9 {:.1} max {:.1}",
            us(self.latency.min_ns),
            self.latency.mean_ns / 1000.0,
            us(self.latency.p50_ns),
            us(self.latency.p99_ns),
            us(self.latency.p99_9_ns),
            us(self.latency.max_ns)
        )?;
        write!(f, "  errors: {}", self.errors)?;
        if let Some(err) = &self.first_error {
            write!(f, " (first: {err})")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_of_known_samples() {
        let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3).unwrap();
        for v in 1..=1000u64 {
            hist.record(v * 1000).unwrap();
        }
        let s = LatencySummary::from_histogram(&hist);
        assert_eq!(s.samples, 1000);
        // hdrhistogram with 3 significant digits: within 0.1 %.
        let close = |got: u64, want: u64| (got as f64 - want as f64).abs() <= want as f64 * 0.001;
        assert!(close(s.p50_ns, 500_000), "p50 {}", s.p50_ns);
        assert!(close(s.p99_ns, 990_000), "p99 {}", s.p99_ns);
        assert!(close(s.p99_9_ns, 999_000), "p99.9 {}", s.p99_9_ns);
        assert!(close(s.max_ns, 1_000_000));
        assert!(close(s.min_ns, 1000));
    }

    #[test]
    fn empty_histogram_gives_zeroes() {
        let hist = Histogram::<u64>::new_with_bounds(1, 1000, 3).unwrap();
        assert_eq!(
            LatencySummary::from_histogram(&hist),
            LatencySummary::default()
        );
    }

    #[test]
    fn rates_divide_by_time() {
        assert_eq!(
            rates(1000, 4096 * 1000, 2.0),
            (500.0, 4096.0 * 500.0 / 1048576.0)
        );
        assert_eq!(rates(1000, 1000, 0.0), (0.0, 0.0));
    }
}
