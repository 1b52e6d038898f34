//! What an engine is built with: pool sizes, merge limits, the cache mode, ring levers.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use blk_proto::VIRTIO_BLK_ID_BYTES;

use crate::discard::BlockDiscard;
use crate::merge::MergeLimits;
use crate::ring::RingSetup;

/// The default bounce budget of one iothread.
pub const DEFAULT_BOUNCE_BUDGET: usize = 64 << 20;

#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// Requests in flight at once (the sum of the thread's queue sizes is always enough).
    pub max_requests: usize,
    /// Capacity of each pooled request's iovec array (seg_max plus region splits).
    pub max_iovecs_per_request: usize,
    /// Capacity of each pooled request's discard/write-zeroes range array.
    pub max_ranges_per_request: usize,
    pub merge: MergeLimits,
    /// GET_ID answer: the serial, zero-padded to 20 bytes.
    pub serial: [u8; VIRTIO_BLK_ID_BYTES],
    /// Queues of the whole device (stats are indexed by global queue number).
    pub num_queues: usize,
    /// Write cache on (writeback) or off (writethrough: every write is O_DSYNC). The guest
    /// switches it through the config space, so it is shared with the control path.
    pub writeback: Arc<AtomicBool>,
    /// At most this many SQEs per io_uring_enter (0: the whole batch at once). Two or fewer
    /// also keep io_uring from plugging the block layer (it plugs batches of three or more).
    pub submit_batch: usize,
    /// The ring setup to ask for (the best available by default).
    pub ring_setup: RingSetup,
    /// SQ entries; 0 sizes the ring from `max_requests`.
    pub ring_entries: u32,
    /// The iothread's CPU, where its io-wq workers run too.
    pub cpu: Option<usize>,
    /// Upper bound on io-wq workers per ring (0: the kernel's default).
    pub iowq_max_workers: u32,
    /// Register guest memory as fixed buffers (READ(V)_FIXED / WRITE(V)_FIXED).
    pub fixed_buffers: bool,
    /// Bytes of O_DIRECT bounce buffers this engine may hold at once; a request that does not
    /// fit waits. One request larger than this is still served, alone.
    pub bounce_budget: usize,
    /// How DISCARD reaches a block device (the io_uring command where the kernel has it).
    pub block_discard: BlockDiscard,
}

impl EngineConfig {
    /// SQ and CQ sizes: the CQ holds an op of every request in flight, so that with the
    /// backlog's bound it never overflows.
    pub(crate) fn ring_sizes(&self) -> (u32, u32) {
        let sq = if self.ring_entries > 0 {
            self.ring_entries.next_power_of_two()
        } else {
            (self.max_requests.clamp(8, 4096) as u32).next_power_of_two()
        };
        let cq = (self.max_requests as u32)
            .next_power_of_two()
            .max(2 * sq)
            .min(65536);
        (sq, cq)
    }
}
