//! uringblk's Prometheus endpoint: `--metrics ADDR` serves `/metrics` in the Prometheus text
//! format ([`exposition`]), built from a snapshot of the per-queue statistics at each scrape
//! ([`StatsSource`]), by an HTTP thread of its own ([`server`]); the data path only ever
//! records into its own queues' statistics.

pub mod exposition;
pub mod server;

pub use exposition::{encode, QueueMetrics, StatsSource, CONTENT_TYPE};
pub use server::{MetricsError, MetricsServer};
