//! The per-iothread I/O engine. Each iothread owns one [`Engine`]: one io_uring ring, its pools
//! of requests and ops, and the stats of its queues. Nothing here is shared between iothreads.
//!
//! The request path through this crate (see docs/ARCHITECTURE.md for the whole path):
//! 1. the vhost-server drains a virtqueue, parsing each chain into a pooled
//!    [`blk_proto::Request`] taken with [`Engine::take_request`], and hands it over with
//!    [`Engine::enqueue`] (or [`Engine::reject`] for a request that failed validation);
//! 2. [`Engine::submit`] plans the batch: reads and writes sorted and merged by [`merge`], a
//!    flush held until the earlier writes of its queue have completed ([`order`]), discards
//!    and write-zeroes as fallocate; SQEs go to the kernel `submit_batch` at a time
//!    ([`ring`]: the ring is the iothread's own, SINGLE_ISSUER + DEFER_TASKRUN where possible);
//! 3. [`Engine::reap`] collects CQEs (short transfers are resubmitted for the rest, host errors
//!    become VIRTIO_BLK_S_IOERR), writes each status byte and queues a [`Completion`] for the
//!    vhost-server to put on the used ring.
//!
//! No more ops are in the ring than its CQ holds, so the CQ never overflows: the rest wait in
//! a backlog and follow as completions free room.

//! Files, in the order of a request's path: `intake` (enqueue), `plan` (merge, order,
//! batch), `dispatch` (op to its backend), `uring` (op to SQE, ring or backlog), `complete`
//! (CQEs and external results, retries, status bytes); `op` holds the units of work, `bounce`
//! the O_DIRECT bounce buffers, [`storage`] the backends and their interface.

mod bounce;
mod complete;
mod config;
mod discard;
mod dispatch;
mod fixed;
mod intake;
mod iovec;
pub mod merge;
mod op;
mod order;
mod plan;
mod ratelog;
pub mod ring;
pub mod stats;
pub mod storage;
mod uring;

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use blk_proto::Request;
use slab::Slab;

pub use bounce::BounceStats;
pub use config::{EngineConfig, DEFAULT_BOUNCE_BUDGET};
pub use discard::{BlockDiscard, BlockDiscardCounts};
pub use merge::MergeLimits;
pub use ring::{RingCounters, RingMode, RingSetup};
pub use stats::{QueueStats, StatKind};
pub use storage::{ImageOptions, ResizeError, Storage, StorageError, StorageKind};

use bounce::BouncePool;
use discard::Discarder;
use dispatch::Lane;
use fixed::FixedBuffers;
use merge::RwItem;
use op::{InFlight, Op};
use order::FlushOrder;
use ratelog::RateLimited;
use ring::{Ring, RingParams};
use storage::CompletionQueue;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("cannot set up an io_uring ring: {0}")]
    Ring(io::Error),
    #[error("cannot create the completion eventfd: {0}")]
    EventFd(io::Error),
    #[error("io_uring_enter failed: {0}")]
    Enter(io::Error),
    #[error("the ring cannot move to another thread with {0} ops in flight")]
    RingBusy(usize),
    #[error("{requests} requests ({ops} ops) still in flight after {waited:?} {cause}")]
    Timeout {
        requests: usize,
        ops: usize,
        waited: Duration,
        /// The last error met while waiting, if any.
        cause: String,
    },
    #[error("{0} requests in flight with no op left to complete them")]
    Stranded(usize),
}

/// A request whose status byte is written: the vhost-server puts it on the used ring.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Completion {
    pub queue: u16,
    pub head: u16,
    pub used_len: u32,
}

pub struct Engine {
    ring: Ring,
    ring_params: RingParams,
    /// Counters of rings this engine had before the current one.
    counters_before: RingCounters,
    eventfd: OwnedFd,
    storage: Arc<Storage>,
    cfg: EngineConfig,
    request_pool: Vec<Request>,
    inflight: Slab<InFlight>,
    inflight_per_queue: Vec<u32>,
    ops: Slab<Op>,
    op_pool: Vec<Op>,
    bounce: BouncePool,
    discarder: Discarder,
    /// Requests enqueued since the last submit, in arrival order.
    batch: Vec<usize>,
    rw_items: Vec<RwItem>,
    groups: Vec<(usize, usize)>,
    cqes: Vec<(u64, i32)>,
    completions: Vec<Completion>,
    stats: Vec<QueueStats>,
    /// Failed ops, and failed io_uring_enter calls, logged at a bounded rate.
    op_errors: RateLimited,
    enter_errors: RateLimited,
    /// Ops pushed to the ring and not reaped yet; at most `ring_capacity`.
    in_ring: usize,
    /// Ops started on an external backend and not reaped yet.
    in_external: usize,
    lane: Lane,
    ring_capacity: usize,
    /// Ops ready to go while the ring is at capacity, oldest first.
    backlog: VecDeque<usize>,
    order: FlushOrder,
    /// Scratch: flushes whose earlier writes just completed.
    ready_flushes: Vec<usize>,
    /// Read once per drain ([`Engine::tick`]) and once per reap, not per request.
    clock: Instant,
    /// Guest memory as host ranges, for the fixed-buffer table.
    memory: Vec<(usize, usize)>,
    /// What the current ring's buffer table holds.
    fixed: FixedBuffers,
    /// `memory` changed and the ring does not have it yet.
    fixed_stale: bool,
    fixed_failure_logged: bool,
    /// Reads and writes issued on fixed buffers, and plainly.
    io_fixed: u64,
    io_plain: u64,
}

// SAFETY: the raw pointers an Engine holds (in Requests and ops) point into guest memory or its
// own bounce buffers; an Engine is used by one thread at a time (it lives behind its iothread's
// mutex), so moving it between threads is sound.
unsafe impl Send for Engine {}

impl Engine {
    pub fn new(storage: Arc<Storage>, cfg: EngineConfig) -> Result<Engine, EngineError> {
        // SAFETY: eventfd(2) takes no pointers; the result is checked before use.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(EngineError::EventFd(io::Error::last_os_error()));
        }
        // SAFETY: fd is a fresh descriptor that nothing else owns.
        let eventfd = unsafe { OwnedFd::from_raw_fd(fd) };
        let (sq_entries, cq_entries) = cfg.ring_sizes();
        let ring_params = RingParams {
            sq_entries,
            cq_entries,
            setup: cfg.ring_setup,
            eventfd: eventfd.as_raw_fd(),
            file: storage.raw_fd(),
            cpu: cfg.cpu,
            iowq_max_workers: cfg.iowq_max_workers,
            fixed_buffers: cfg.fixed_buffers,
        };
        // Built here, on the creating thread, so that a ring that cannot be set up is an error
        // at start-up; an iothread builds its own with `adopt_current_thread`.
        let ring = Ring::new(&ring_params).map_err(EngineError::Ring)?;
        let ring_capacity = ring.cq_entries();
        let lane = match (storage.kind(), storage.external_backend()) {
            (StorageKind::Null, _) => Lane::None,
            (_, Some(external)) => {
                let fd = eventfd.try_clone().map_err(EngineError::EventFd)?;
                Lane::External(external.clone(), Arc::new(CompletionQueue::new(fd)))
            }
            (_, None) => Lane::Ring,
        };
        let request_pool = (0..cfg.max_requests)
            .map(|_| Request::with_capacity(cfg.max_iovecs_per_request, cfg.max_ranges_per_request))
            .collect();
        let op_pool = (0..cfg.max_requests).map(|_| Op::new()).collect();
        Ok(Engine {
            ring,
            ring_params,
            counters_before: RingCounters::default(),
            in_ring: 0,
            in_external: 0,
            lane,
            ring_capacity,
            backlog: VecDeque::new(),
            order: FlushOrder::new(cfg.num_queues),
            ready_flushes: Vec::new(),
            clock: Instant::now(),
            memory: Vec::new(),
            fixed: FixedBuffers::none(),
            fixed_stale: false,
            fixed_failure_logged: false,
            io_fixed: 0,
            io_plain: 0,
            eventfd,
            discarder: Discarder::new(cfg.block_discard),
            bounce: BouncePool::new(cfg.bounce_budget, storage.dio_mem_align() as usize),
            storage,
            inflight: Slab::with_capacity(cfg.max_requests),
            inflight_per_queue: vec![0; cfg.num_queues],
            ops: Slab::with_capacity(cfg.max_requests),
            op_pool,
            batch: Vec::with_capacity(cfg.max_requests),
            rw_items: Vec::with_capacity(cfg.max_requests),
            groups: Vec::with_capacity(cfg.max_requests),
            cqes: Vec::with_capacity(cq_entries as usize),
            completions: Vec::with_capacity(cfg.max_requests),
            stats: (0..cfg.num_queues).map(|_| QueueStats::default()).collect(),
            request_pool,
            cfg,
            op_errors: RateLimited::default(),
            enter_errors: RateLimited::default(),
        })
    }

    /// Readable when CQEs are waiting; add it to the iothread's epoll.
    pub fn eventfd(&self) -> RawFd {
        self.eventfd.as_raw_fd()
    }

    /// Makes the calling thread the ring's owner: the only thread that submits to it and reaps
    /// it. A ring set up by another thread (at start-up, or by the iothread of an earlier
    /// connection) is replaced by a new one set up here, which needs it idle. Returns true
    /// when a new ring was set up.
    pub fn adopt_current_thread(&mut self) -> Result<bool, EngineError> {
        if self.ring.owned_by_current_thread() {
            return Ok(false);
        }
        if self.in_ring > 0 {
            return Err(EngineError::RingBusy(self.in_ring));
        }
        let ring = Ring::new(&self.ring_params).map_err(EngineError::Ring)?;
        let old = std::mem::replace(&mut self.ring, ring);
        self.counters_before = self.counters_before + old.counters;
        self.ring_capacity = self.ring.cq_entries();
        self.fixed = FixedBuffers::none();
        self.fixed_stale = !self.memory.is_empty();
        self.sync_fixed_buffers();
        Ok(true)
    }

    /// Guest memory changed (or went away: empty): these host ranges are what requests point
    /// into from now on. The ring's buffer table follows at once on the ring's own thread, else
    /// at the next [`Engine::sync_fixed_buffers`] there.
    pub fn set_guest_memory(&mut self, regions: &[(usize, usize)]) {
        self.memory.clear();
        self.memory.extend_from_slice(regions);
        self.fixed_stale = true;
        self.sync_fixed_buffers();
    }

    /// Registers the current guest memory with the ring if it does not have it yet (call on
    /// the ring's thread; cheap when nothing changed). A kernel that refuses (RLIMIT_MEMLOCK,
    /// memory that cannot be pinned) leaves plain READV/WRITEV, logged once.
    pub fn sync_fixed_buffers(&mut self) {
        if !self.fixed_stale || !self.cfg.fixed_buffers || !self.ring.owned_by_current_thread() {
            return;
        }
        self.fixed_stale = false;
        let plan = FixedBuffers::plan(&self.memory);
        match self.ring.register_fixed(&plan, self.fixed.len()) {
            Ok(()) => self.fixed = plan,
            Err(e) => {
                self.fixed = FixedBuffers::none();
                if !self.fixed_failure_logged {
                    self.fixed_failure_logged = true;
                    log::warn!(
                        "cannot register guest memory as fixed buffers ({e}); using plain \
                         READV/WRITEV (see README: memlock limit)"
                    );
                }
            }
        }
    }

    /// Reads and writes issued on registered buffers, and on plain ones.
    pub fn fixed_io_counts(&self) -> (u64, u64) {
        (self.io_fixed, self.io_plain)
    }

    /// What the kernel accepted for the current ring.
    pub fn ring_mode(&self) -> RingMode {
        self.ring.mode()
    }

    /// io_uring_enter calls and SQEs over the engine's life.
    pub fn ring_counters(&self) -> RingCounters {
        self.counters_before + self.ring.counters
    }

    /// Reads the clock that stamps the requests enqueued next (once per drain).
    pub fn tick(&mut self) {
        self.clock = Instant::now();
    }

    /// While the iothread busy-polls the CQ, the completion eventfd stays quiet, so that it
    /// does not wake the thread for completions it already reaped.
    pub fn set_eventfd_enabled(&mut self, enabled: bool) {
        self.ring.set_eventfd_enabled(enabled);
    }

    /// Completions since the last call, oldest first.
    pub fn take_completions(&mut self) -> std::vec::Drain<'_, Completion> {
        self.completions.drain(..)
    }

    pub fn in_flight(&self) -> usize {
        self.inflight.len()
    }

    pub fn in_flight_on(&self, queue: u16) -> u32 {
        self.inflight_per_queue
            .get(queue as usize)
            .copied()
            .unwrap_or(0)
    }

    /// CQEs the kernel had to drop or hold back for a full CQ (never more than 0 here: the
    /// ring holds at most as many ops as its CQ).
    pub fn cq_overflows(&mut self) -> u32 {
        self.ring.cq_overflowed()
    }

    /// Ops the ring could not take yet (at capacity), waiting to be pushed.
    pub fn backlogged(&self) -> usize {
        self.backlog.len()
    }

    /// Flushes held back until earlier writes of their queue complete.
    pub fn flushes_waiting(&self) -> usize {
        self.order.waiting()
    }

    pub fn stats(&self) -> &[QueueStats] {
        &self.stats
    }
}

#[cfg(test)]
mod tests;
