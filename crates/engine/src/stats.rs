//! Per-queue statistics: operations, bytes, merges and errors by request type, and a latency
//! histogram. Each iothread records only into its own queues' stats.

use hdrhistogram::Histogram;
use serde_json::{json, Value};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub ops: u64,
    pub bytes: u64,
    pub errors: u64,
}

impl Counters {
    fn add(&mut self, other: &Counters) {
        self.ops += other.ops;
        self.bytes += other.bytes;
        self.errors += other.errors;
    }

    fn to_json(self) -> Value {
        json!({"ops": self.ops, "bytes": self.bytes, "errors": self.errors})
    }
}

/// The request types counted separately.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StatKind {
    Read = 0,
    Write = 1,
    Flush = 2,
    GetId = 3,
    Discard = 4,
    WriteZeroes = 5,
}

/// Names of the request types, in `StatKind` order (the index into `by_kind`).
pub const KIND_NAMES: [&str; 6] = [
    "read",
    "write",
    "flush",
    "get_id",
    "discard",
    "write_zeroes",
];

#[derive(Clone, Debug)]
pub struct QueueStats {
    pub by_kind: [Counters; 6],
    /// Requests that rode in another request's op.
    pub merged: u64,
    /// Requests completed at once with IOERR/UNSUPP by validation.
    pub rejected: u64,
    /// Chains too malformed to carry a status byte.
    pub malformed: u64,
    /// Completion latency in microseconds.
    pub latency_us: Histogram<u64>,
}

impl Default for QueueStats {
    fn default() -> Self {
        QueueStats {
            by_kind: [Counters::default(); 6],
            merged: 0,
            rejected: 0,
            malformed: 0,
            // 1 us .. 1 h at 3 significant figures: never needs to grow while recording.
            latency_us: Histogram::new_with_bounds(1, 3_600_000_000, 3)
                .expect("static histogram bounds are valid"),
        }
    }
}

impl QueueStats {
    pub fn record(&mut self, kind: StatKind, bytes: u64, ok: bool, latency_us: u64) {
        let c = &mut self.by_kind[kind as usize];
        c.ops += 1;
        if ok {
            c.bytes += bytes;
        } else {
            c.errors += 1;
        }
        self.latency_us.saturating_record(latency_us.max(1));
    }

    pub fn add(&mut self, other: &QueueStats) {
        for (a, b) in self.by_kind.iter_mut().zip(other.by_kind.iter()) {
            a.add(b);
        }
        self.merged += other.merged;
        self.rejected += other.rejected;
        self.malformed += other.malformed;
        // Both histograms have the same bounds, so adding cannot fail.
        let _ = self.latency_us.add(&other.latency_us);
    }

    pub fn to_json(&self) -> Value {
        let mut v = json!({
            "merged": self.merged,
            "rejected": self.rejected,
            "malformed": self.malformed,
            "latency_us": {
                "count": self.latency_us.len(),
                "p50": self.latency_us.value_at_quantile(0.50),
                "p99": self.latency_us.value_at_quantile(0.99),
                "p999": self.latency_us.value_at_quantile(0.999),
                "max": self.latency_us.max(),
            },
        });
        for (name, c) in KIND_NAMES.iter().zip(self.by_kind.iter()) {
            v[*name] = c.to_json();
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_ops_bytes_errors_and_latency() {
        let mut s = QueueStats::default();
        s.record(StatKind::Read, 4096, true, 10);
        s.record(StatKind::Read, 4096, false, 30);
        s.record(StatKind::Write, 8192, true, 20);
        assert_eq!(
            s.by_kind[StatKind::Read as usize],
            Counters {
                ops: 2,
                bytes: 4096,
                errors: 1
            }
        );
        assert_eq!(s.by_kind[StatKind::Write as usize].bytes, 8192);
        let j = s.to_json();
        assert_eq!(j["read"]["ops"], 2);
        assert_eq!(j["latency_us"]["count"], 3);
        assert_eq!(j["latency_us"]["max"], 30);
    }

    #[test]
    fn add_sums_two_queues() {
        let mut a = QueueStats::default();
        let mut b = QueueStats::default();
        a.record(StatKind::Flush, 0, true, 5);
        b.record(StatKind::Flush, 0, true, 7);
        b.merged = 3;
        a.add(&b);
        assert_eq!(a.by_kind[StatKind::Flush as usize].ops, 2);
        assert_eq!(a.merged, 3);
        assert_eq!(a.latency_us.len(), 2);
    }
}
