//! The metrics, encoded with prometheus-client from a statistics snapshot.
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `uringblk_requests_total` | counter | queue, type |
//! | `uringblk_request_bytes_total` | counter | queue, type |
//! | `uringblk_request_errors_total` | counter | queue, type |
//! | `uringblk_merged_requests_total` | counter | queue |
//! | `uringblk_rejected_requests_total` | counter | queue |
//! | `uringblk_malformed_chains_total` | counter | queue |
//! | `uringblk_requests_in_flight` | gauge | queue |
//! | `uringblk_request_latency_seconds` | histogram | queue |

use engine::stats::{Counters, KIND_NAMES};
use engine::QueueStats;
use prometheus::proto::{
    Bucket, Counter, Gauge, Histogram, LabelPair, Metric, MetricFamily, MetricType,
};
use prometheus::{Encoder, TextEncoder};

/// One queue's statistics at the moment of a scrape.
#[derive(Clone, Debug)]
pub struct QueueMetrics {
    pub queue: u16,
    pub stats: QueueStats,
    pub in_flight: u64,
}

/// Where the statistics come from (the running server).
pub trait StatsSource: Send + Sync + 'static {
    fn snapshot(&self) -> Vec<QueueMetrics>;
}

/// Content type of [`encode`]'s output.
pub const CONTENT_TYPE: &str = prometheus::TEXT_FORMAT;

/// Upper bounds of the latency histogram's buckets, in microseconds (+Inf follows).
const LATENCY_BOUNDS_US: [u64; 16] = [
    10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000,
    1_000_000, 10_000_000,
];

/// The Prometheus text exposition (format 0.0.4) of `queues`. The statistics are snapshots,
/// so the families are built from their values directly rather than through live metric
/// objects.
pub fn encode(queues: &[QueueMetrics]) -> String {
    let by_type = |name: &str, help: &str, value: fn(&Counters) -> u64| {
        let metrics = queues
            .iter()
            .flat_map(|q| {
                KIND_NAMES
                    .iter()
                    .zip(q.stats.by_kind.iter())
                    .map(move |(kind, c)| {
                        let mut m = Metric::from_label(labels(q, Some(kind)));
                        m.set_counter(counter(value(c)));
                        m
                    })
            })
            .collect();
        family(name, help, MetricType::COUNTER, metrics)
    };
    let by_queue = |name: &str, help: &str, value: fn(&QueueMetrics) -> u64| {
        let metrics = queues
            .iter()
            .map(|q| {
                let mut m = Metric::from_label(labels(q, None));
                m.set_counter(counter(value(q)));
                m
            })
            .collect();
        family(name, help, MetricType::COUNTER, metrics)
    };
    let in_flight = queues
        .iter()
        .map(|q| {
            let mut g = Gauge::default();
            g.set_value(q.in_flight as f64);
            let mut m = Metric::from_label(labels(q, None));
            m.set_gauge(g);
            m
        })
        .collect();
    let latency = queues
        .iter()
        .map(|q| {
            let mut m = Metric::from_label(labels(q, None));
            m.set_histogram(latency_histogram(&q.stats.latency_us));
            m
        })
        .collect();
    let families = [
        by_type(
            "uringblk_requests_total",
            "Requests completed, by queue and request type.",
            |c| c.ops,
        ),
        by_type(
            "uringblk_request_bytes_total",
            "Bytes moved by requests that completed OK.",
            |c| c.bytes,
        ),
        by_type(
            "uringblk_request_errors_total",
            "Requests completed with an error status.",
            |c| c.errors,
        ),
        by_queue(
            "uringblk_merged_requests_total",
            "Requests that rode in another request's I/O.",
            |q| q.stats.merged,
        ),
        by_queue(
            "uringblk_rejected_requests_total",
            "Requests refused by validation (IOERR or UNSUPP at once).",
            |q| q.stats.rejected,
        ),
        by_queue(
            "uringblk_malformed_chains_total",
            "Descriptor chains too malformed to carry a status.",
            |q| q.stats.malformed,
        ),
        family(
            "uringblk_requests_in_flight",
            "Requests taken from the queue and not yet completed.",
            MetricType::GAUGE,
            in_flight,
        ),
        family(
            "uringblk_request_latency_seconds",
            "Time from taking a request off the queue to completing it.",
            MetricType::HISTOGRAM,
            latency,
        ),
    ];
    let mut out = Vec::new();
    if let Err(e) = TextEncoder::new().encode(&families, &mut out) {
        log::error!("encoding metrics failed: {e}");
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn family(name: &str, help: &str, kind: MetricType, metrics: Vec<Metric>) -> MetricFamily {
    let mut f = MetricFamily::default();
    f.set_name(name.into());
    f.set_help(help.into());
    f.set_field_type(kind);
    f.set_metric(metrics);
    f
}

fn labels(q: &QueueMetrics, kind: Option<&str>) -> Vec<LabelPair> {
    let pair = |name: &str, value: String| {
        let mut l = LabelPair::default();
        l.set_name(name.into());
        l.set_value(value);
        l
    };
    let mut v = vec![pair("queue", q.queue.to_string())];
    if let Some(kind) = kind {
        v.push(pair("type", kind.to_string()));
    }
    v
}

fn counter(v: u64) -> Counter {
    let mut c = Counter::default();
    c.set_value(v as f64);
    c
}

/// The histogram with cumulative buckets at LATENCY_BOUNDS_US (seconds; the encoder adds
/// +Inf = the count), and the sum estimated from the mean (hdrhistogram keeps no exact sum).
fn latency_histogram(h: &hdrhistogram::Histogram<u64>) -> Histogram {
    let buckets = LATENCY_BOUNDS_US
        .iter()
        .map(|&bound| {
            let mut b = Bucket::default();
            b.set_upper_bound(bound as f64 / 1e6);
            // Values recorded at or below `bound` (within hdrhistogram's precision).
            b.set_cumulative_count(h.count_between(0, bound));
            b
        })
        .collect();
    let mut hist = Histogram::default();
    hist.set_sample_count(h.len());
    hist.set_sample_sum(h.mean() * h.len() as f64 / 1e6);
    hist.set_bucket(buckets);
    hist
}
