//! Host-side load generator for vhost-user-blk servers. It speaks to the server exactly as a VMM
//! would (shared memory, virtqueues, eventfds) through libblkio, so it measures the server's
//! dataplane without a VM in the way. The harness (`uringblk-bench`) runs the binary and reads
//! its JSON report (`LoadgenReport`).

pub mod engine;
pub mod offsets;
pub mod report;
pub mod spec;

pub use engine::{run, PHASE_MEASURE_END, PHASE_MEASURE_START};
pub use report::{LatencySummary, LoadgenReport};
pub use spec::{CompletionMode, JobSpec, RwPattern};

#[derive(Debug, thiserror::Error)]
pub enum LoadgenError {
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("libblkio: {context}: {source}")]
    Blkio {
        context: &'static str,
        #[source]
        source: blkio::Error,
    },
    #[error("queue {queue}: no completion for {in_flight} in-flight requests: {source}")]
    Stalled {
        queue: u32,
        in_flight: usize,
        #[source]
        source: blkio::Error,
    },
    #[error("completion for unknown request slot {0}")]
    UnknownCompletion(usize),
    #[error("cannot pin a queue thread to CPU {0}")]
    Pin(usize),
    #[error("latency histogram: {0}")]
    Histogram(String),
    #[error("a queue thread panicked")]
    WorkerPanicked,
}
