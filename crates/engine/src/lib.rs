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

pub mod backend;
mod fixed;
pub mod merge;
mod order;
pub mod ring;
pub mod stats;

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use blk_proto::{Request, RequestKind, VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK};
use io_uring::{opcode, squeue, types};
use slab::Slab;

pub use backend::{Backend, BackendError, BackendKind, ImageOptions};
pub use merge::MergeLimits;
pub use ring::{RingCounters, RingMode, RingSetup};
pub use stats::{QueueStats, StatKind};

use fixed::FixedBuffers;
use merge::RwItem;
use order::FlushOrder;
use ring::{Ring, RingParams};

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
    #[error("{ops} ops still in flight after {waited:?}")]
    Timeout { ops: usize, waited: Duration },
}

/// A request whose status byte is written: the vhost-server puts it on the used ring.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Completion {
    pub queue: u16,
    pub head: u16,
    pub used_len: u32,
}

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
}

impl EngineConfig {
    /// SQ and CQ sizes: the CQ holds an op of every request in flight, so that with the
    /// backlog's bound it never overflows.
    fn ring_sizes(&self) -> (u32, u32) {
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

/// What to do when fallocate says EOPNOTSUPP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Unsupported {
    /// Try this mode instead.
    Retry(i32),
    /// Discard is a hint: leaving the data in place is a valid discard.
    Succeed,
    Fail,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum OpKind {
    Read,
    Write,
    Flush,
    Fallocate {
        mode: i32,
        len: u64,
        unsupported: Unsupported,
    },
}

/// One SQE's worth of work; a merged op carries several requests.
struct Op {
    kind: OpKind,
    offset: u64,
    iovecs: Vec<libc::iovec>,
    /// Bytes still to transfer (reads and writes).
    remaining: u64,
    /// Keys into `Engine::inflight` of the requests this op carries.
    requests: Vec<usize>,
    bounce: Option<BounceBuffer>,
}

impl Op {
    fn new() -> Op {
        Op {
            kind: OpKind::Flush,
            offset: 0,
            iovecs: Vec::new(),
            remaining: 0,
            requests: Vec::new(),
            bounce: None,
        }
    }
}

struct InFlight {
    req: Request,
    queue: u16,
    head: u16,
    pending_ops: u32,
    status: u8,
    started: Instant,
    needs_bounce: bool,
    /// Write-type requests: their place in the queue's order, which flushes wait on.
    write_seq: Option<u64>,
}

/// An aligned buffer for O_DIRECT requests whose guest buffers miss the DIO alignment.
struct BounceBuffer {
    ptr: NonNull<u8>,
    layout: std::alloc::Layout,
}

impl BounceBuffer {
    fn new(len: usize) -> BounceBuffer {
        let layout = std::alloc::Layout::from_size_align(len.max(4096), 4096)
            .expect("bounce buffer size fits a Layout");
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc(layout) };
        let ptr = NonNull::new(ptr).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        BounceBuffer { ptr, layout }
    }

    fn capacity(&self) -> usize {
        self.layout.size()
    }
}

impl Drop for BounceBuffer {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with exactly this layout and not freed before.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), self.layout) };
    }
}

// SAFETY: a BounceBuffer owns its allocation exclusively, like a Box<[u8]>.
unsafe impl Send for BounceBuffer {}

/// Keep this many idle bounce buffers; more are freed.
const BOUNCE_POOL: usize = 8;

pub struct Engine {
    ring: Ring,
    ring_params: RingParams,
    /// Counters of rings this engine had before the current one.
    counters_before: RingCounters,
    eventfd: OwnedFd,
    backend: Arc<Backend>,
    cfg: EngineConfig,
    request_pool: Vec<Request>,
    inflight: Slab<InFlight>,
    inflight_per_queue: Vec<u32>,
    ops: Slab<Op>,
    op_pool: Vec<Op>,
    bounce_pool: Vec<BounceBuffer>,
    /// Requests enqueued since the last submit, in arrival order.
    batch: Vec<usize>,
    rw_items: Vec<RwItem>,
    groups: Vec<(usize, usize)>,
    cqes: Vec<(u64, i32)>,
    completions: Vec<Completion>,
    stats: Vec<QueueStats>,
    errors_logged: u64,
    /// Ops pushed to the ring and not reaped yet; at most `ring_capacity`.
    in_ring: usize,
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
    pub fn new(backend: Arc<Backend>, cfg: EngineConfig) -> Result<Engine, EngineError> {
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
            file: backend.raw_fd(),
            cpu: cfg.cpu,
            iowq_max_workers: cfg.iowq_max_workers,
            fixed_buffers: cfg.fixed_buffers,
        };
        // Built here, on the creating thread, so that a ring that cannot be set up is an error
        // at start-up; an iothread builds its own with `adopt_current_thread`.
        let ring = Ring::new(&ring_params).map_err(EngineError::Ring)?;
        let ring_capacity = ring.cq_entries();
        let request_pool = (0..cfg.max_requests)
            .map(|_| Request::with_capacity(cfg.max_iovecs_per_request, cfg.max_ranges_per_request))
            .collect();
        let op_pool = (0..cfg.max_requests).map(|_| Op::new()).collect();
        Ok(Engine {
            ring,
            ring_params,
            counters_before: RingCounters::default(),
            in_ring: 0,
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
            backend,
            inflight: Slab::with_capacity(cfg.max_requests),
            inflight_per_queue: vec![0; cfg.num_queues],
            ops: Slab::with_capacity(cfg.max_requests),
            op_pool,
            bounce_pool: Vec::new(),
            batch: Vec::with_capacity(cfg.max_requests),
            rw_items: Vec::with_capacity(cfg.max_requests),
            groups: Vec::with_capacity(cfg.max_requests),
            cqes: Vec::with_capacity(cq_entries as usize),
            completions: Vec::with_capacity(cfg.max_requests),
            stats: (0..cfg.num_queues).map(|_| QueueStats::default()).collect(),
            request_pool,
            cfg,
            errors_logged: 0,
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

    /// True while a request can be taken: the caller stops draining its queue otherwise.
    pub fn can_accept(&self) -> bool {
        !self.request_pool.is_empty()
    }

    /// A cleared request to parse into, or None when `max_requests` are in flight.
    pub fn take_request(&mut self) -> Option<Request> {
        let mut req = self.request_pool.pop()?;
        req.clear();
        Some(req)
    }

    /// Returns a request for a chain too malformed to carry a status byte (the caller puts the
    /// chain on the used ring with length 0).
    pub fn discard_malformed(&mut self, req: Request, queue: u16) {
        if let Some(s) = self.stats.get_mut(queue as usize) {
            s.malformed += 1;
        }
        self.request_pool.push(req);
    }

    /// Completes a request that failed validation with `status` at once.
    pub fn reject(&mut self, req: Request, queue: u16, head: u16, status: u8) {
        if let Some(s) = self.stats.get_mut(queue as usize) {
            s.rejected += 1;
        }
        write_status(&req, status);
        self.completions.push(Completion {
            queue,
            head,
            used_len: req.used_len,
        });
        self.request_pool.push(req);
    }

    /// Accepts a validated request; it is issued by the next [`Engine::submit`].
    pub fn enqueue(&mut self, req: Request, queue: u16, head: u16) {
        let needs_bounce = self.needs_bounce(&req);
        let key = self.inflight.insert(InFlight {
            req,
            queue,
            head,
            pending_ops: 0,
            status: VIRTIO_BLK_S_OK,
            started: self.clock,
            needs_bounce,
            write_seq: None,
        });
        if let Some(n) = self.inflight_per_queue.get_mut(queue as usize) {
            *n += 1;
        }
        let f = &mut self.inflight[key];
        let inline = match f.req.kind {
            RequestKind::GetId => {
                copy_to_iovecs(&f.req.iovecs, &self.cfg.serial);
                true
            }
            // Nothing to transfer, or nowhere to transfer it to.
            RequestKind::Read | RequestKind::Write => {
                f.req.data_len == 0 || self.backend.kind() == BackendKind::Null
            }
            // Zero-sector segments are valid and dropped by the parser: nothing left to do.
            RequestKind::Discard | RequestKind::WriteZeroes => {
                f.req.ranges.is_empty() || self.backend.kind() == BackendKind::Null
            }
            RequestKind::Flush => self.backend.kind() == BackendKind::Null,
        };
        if inline {
            self.complete_request(key);
            return;
        }
        match f.req.kind {
            RequestKind::Write | RequestKind::Discard | RequestKind::WriteZeroes => {
                f.write_seq = Some(self.order.write_enqueued(queue));
            }
            RequestKind::Flush => self.order.flush_enqueued(key, queue),
            RequestKind::Read | RequestKind::GetId => {}
        }
        self.batch.push(key);
    }

    fn needs_bounce(&self, req: &Request) -> bool {
        if !self.backend.is_direct() || !matches!(req.kind, RequestKind::Read | RequestKind::Write)
        {
            return false;
        }
        let mem_mask = self.backend.dio_mem_align() as usize - 1;
        // Every segment's length must be a multiple of the DIO offset alignment, which the
        // logical block size (checked at start-up) satisfies: use the block size of 512.
        req.iovecs
            .iter()
            .any(|v| (v.iov_base as usize) & mem_mask != 0 || v.iov_len & 511 != 0)
    }

    /// Issues everything enqueued since the last call (`submit_batch` SQEs per
    /// `io_uring_enter`, the whole batch in one by default).
    pub fn submit(&mut self) -> Result<(), EngineError> {
        if self.batch.is_empty() {
            return Ok(());
        }
        let batch = std::mem::take(&mut self.batch);
        for &key in &batch {
            let f = &self.inflight[key];
            match f.req.kind {
                RequestKind::Read | RequestKind::Write => self.rw_items.push(RwItem {
                    write: f.req.kind == RequestKind::Write,
                    sector: f.req.sector,
                    len: f.req.data_len,
                    iovecs: f.req.iovecs.len() as u32,
                    key,
                    mergeable: !f.needs_bounce,
                }),
                RequestKind::Flush => {
                    // The writes drained before the flush go to the ring first; the flush
                    // itself follows once they (and every earlier write of its queue) are done.
                    self.emit_reads_writes();
                    if self.order.release(key) {
                        self.issue_flush(key);
                    }
                }
                RequestKind::Discard | RequestKind::WriteZeroes => self.emit_fallocates(key),
                RequestKind::GetId => unreachable!("GET_ID completes in enqueue"),
            }
        }
        self.emit_reads_writes();
        self.batch = batch;
        self.batch.clear();
        self.ring.enter(false, 0).map_err(EngineError::Enter)
    }

    fn issue_flush(&mut self, key: usize) {
        let op = self.new_op(OpKind::Flush, 0, key);
        self.push_op(op);
    }

    /// A pooled op, reset for `kind` at `offset`, carrying no request yet.
    fn take_op(&mut self, kind: OpKind, offset: u64) -> Op {
        let mut op = self.op_pool.pop().unwrap_or_else(Op::new);
        op.kind = kind;
        op.offset = offset;
        op.remaining = 0;
        op
    }

    fn new_op(&mut self, kind: OpKind, offset: u64, key: usize) -> usize {
        let mut op = self.take_op(kind, offset);
        op.requests.push(key);
        self.inflight[key].pending_ops += 1;
        self.ops.insert(op)
    }

    fn emit_fallocates(&mut self, key: usize) {
        let f = &self.inflight[key];
        let discard = f.req.kind == RequestKind::Discard;
        let nranges = f.req.ranges.len();
        for i in 0..nranges {
            let r = self.inflight[key].req.ranges[i];
            let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
            let zero = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;
            let (mode, unsupported) = if discard {
                (punch, Unsupported::Succeed)
            } else if r.unmap {
                (punch, Unsupported::Retry(zero))
            } else {
                // Without UNMAP keep the blocks allocated; a hole still reads as zeros.
                (zero, Unsupported::Retry(punch))
            };
            let kind = OpKind::Fallocate {
                mode,
                len: u64::from(r.num_sectors) << 9,
                unsupported,
            };
            let op = self.new_op(kind, r.sector << 9, key);
            self.push_op(op);
        }
    }

    fn emit_reads_writes(&mut self) {
        if self.rw_items.is_empty() {
            return;
        }
        merge::plan(&mut self.rw_items, &self.cfg.merge, &mut self.groups);
        for g in 0..self.groups.len() {
            let (start, end) = self.groups[g];
            let first = self.rw_items[start];
            let kind = if first.write {
                OpKind::Write
            } else {
                OpKind::Read
            };
            let mut op = self.take_op(kind, first.sector << 9);
            for it in &self.rw_items[start..end] {
                let f = &mut self.inflight[it.key];
                f.pending_ops += 1;
                op.requests.push(it.key);
                op.remaining += u64::from(f.req.data_len);
                if !f.needs_bounce {
                    op.iovecs.extend_from_slice(&f.req.iovecs);
                }
            }
            if end - start > 1 {
                if let Some(s) = self.stats.get_mut(self.inflight[first.key].queue as usize) {
                    s.merged += (end - start - 1) as u64;
                }
            }
            if !first.mergeable {
                let len = op.remaining as usize;
                let pos = self.bounce_pool.iter().position(|b| b.capacity() >= len);
                let bounce = match pos {
                    Some(i) => self.bounce_pool.swap_remove(i),
                    None => BounceBuffer::new(len),
                };
                if first.write {
                    gather_from_iovecs(&self.inflight[first.key].req.iovecs, &bounce, len);
                }
                op.iovecs.push(libc::iovec {
                    iov_base: bounce.ptr.as_ptr().cast(),
                    iov_len: len,
                });
                op.bounce = Some(bounce);
            }
            let key = self.ops.insert(op);
            self.push_op(key);
        }
        self.rw_items.clear();
    }

    /// Puts an op on the ring, or in the backlog while the ring holds as many ops as its CQ
    /// has room for. Never fails: what cannot go now goes later.
    fn push_op(&mut self, key: usize) {
        if self.in_ring >= self.ring_capacity {
            self.backlog.push_back(key);
            return;
        }
        let (entry, fixed) = self.sqe(key);
        // The SQE points at `op.iovecs`' heap buffer and the buffers it lists: guest memory
        // the vhost-server keeps mapped while requests are in flight, or this op's bounce
        // buffer. Ops leave the slab only in `finish_op`, after their CQE.
        // SAFETY: so neither is freed or moved before the kernel is done with them.
        let mut pushed = unsafe { self.ring.push(&entry) };
        if !pushed {
            // The SQ is full: hand what is there to the kernel and retry.
            if let Err(e) = self.ring.enter(false, 0) {
                log::error!("io_uring_enter failed: {e}");
            }
            // SAFETY: as above.
            pushed = unsafe { self.ring.push(&entry) };
        }
        if !pushed {
            self.backlog.push_back(key);
            return;
        }
        self.in_ring += 1;
        match fixed {
            Some(true) => self.io_fixed += 1,
            Some(false) => self.io_plain += 1,
            None => {}
        }
        if self.cfg.submit_batch > 0 && self.ring.pending() >= self.cfg.submit_batch {
            if let Err(e) = self.ring.enter(false, 0) {
                log::error!("io_uring_enter failed: {e}");
            }
        }
    }

    /// Moves backlogged ops to the ring while it has room.
    fn refill_from_backlog(&mut self) {
        while self.in_ring < self.ring_capacity {
            let Some(key) = self.backlog.pop_front() else {
                break;
            };
            self.push_op(key);
        }
    }

    /// The SQE of an op, and for reads and writes whether it uses a fixed buffer.
    fn sqe(&self, key: usize) -> (squeue::Entry, Option<bool>) {
        let op = &self.ops[key];
        debug_assert!(
            self.backend.raw_fd().is_some(),
            "the null backend completes requests inline"
        );
        // Index 0 of the files registered with the ring: the backend's fd.
        let fd = types::Fixed(0);
        let (entry, fixed) = match op.kind {
            OpKind::Read | OpKind::Write => {
                let write = op.kind == OpKind::Write;
                let flags = if write && !self.cfg.writeback.load(Ordering::Relaxed) {
                    libc::RWF_DSYNC
                } else {
                    0
                };
                // A bounce buffer is not guest memory: never in the table.
                let slot = match op.bounce {
                    None => self.fixed.slot_of(&op.iovecs),
                    Some(_) => None,
                };
                let n = op.iovecs.len() as u32;
                let entry = match (slot, n) {
                    (Some(slot), 1) => {
                        let v = op.iovecs[0];
                        if write {
                            opcode::WriteFixed::new(fd, v.iov_base.cast(), v.iov_len as u32, slot)
                                .offset(op.offset)
                                .rw_flags(flags)
                                .build()
                        } else {
                            opcode::ReadFixed::new(fd, v.iov_base.cast(), v.iov_len as u32, slot)
                                .offset(op.offset)
                                .build()
                        }
                    }
                    _ if write => opcode::Writev::new(fd, op.iovecs.as_ptr(), n)
                        .offset(op.offset)
                        .rw_flags(flags)
                        .build(),
                    _ => opcode::Readv::new(fd, op.iovecs.as_ptr(), n)
                        .offset(op.offset)
                        .build(),
                };
                match slot {
                    Some(_) if n == 1 => (entry, Some(true)),
                    Some(slot) if self.ring.vectored_fixed() => {
                        (fixed::vectored_fixed(entry, write, slot), Some(true))
                    }
                    _ => (entry, Some(false)),
                }
            }
            OpKind::Flush => (
                opcode::Fsync::new(fd)
                    .flags(types::FsyncFlags::DATASYNC)
                    .build(),
                None,
            ),
            OpKind::Fallocate { mode, len, .. } => (
                opcode::Fallocate::new(fd, len)
                    .offset(op.offset)
                    .mode(mode)
                    .build(),
                None,
            ),
        };
        (entry.user_data(key as u64), fixed)
    }

    /// Resets the completion eventfd after it woke the thread. Separate from [`Engine::reap`]
    /// so that the opportunistic reap after each submit costs no syscall.
    pub fn clear_eventfd(&self) {
        let mut counter = 0u64;
        // SAFETY: reads 8 bytes into a u64 we own from our own non-blocking eventfd.
        unsafe {
            libc::read(
                self.eventfd.as_raw_fd(),
                (&mut counter as *mut u64).cast(),
                8,
            )
        };
    }

    /// Collects every available CQE, finishing ops and requests. Completions accumulate until
    /// taken with [`Engine::take_completions`].
    pub fn reap(&mut self) -> Result<(), EngineError> {
        self.refill_from_backlog();
        if self.in_ring == 0 {
            return Ok(());
        }
        // Submits what is queued and, under DEFER/COOP_TASKRUN, has the kernel post the
        // completions it holds: one syscall, and none when there is nothing to do.
        self.ring.enter(true, 0).map_err(EngineError::Enter)?;
        loop {
            self.cqes.clear();
            self.ring.take_cqes(&mut self.cqes);
            if self.cqes.is_empty() {
                break;
            }
            self.clock = Instant::now();
            self.in_ring -= self.cqes.len().min(self.in_ring);
            for i in 0..self.cqes.len() {
                let (key, res) = self.cqes[i];
                self.on_cqe(key as usize, res);
            }
            self.refill_from_backlog();
            self.ring.enter(true, 0).map_err(EngineError::Enter)?;
        }
        Ok(())
    }

    /// Handles one CQE.
    fn on_cqe(&mut self, key: usize, res: i32) {
        let Some(op) = self.ops.get_mut(key) else {
            log::error!("completion for unknown op {key}");
            return;
        };
        if res == -libc::EAGAIN || res == -libc::EINTR {
            self.push_op(key);
            return;
        }
        let mut error = None;
        match op.kind {
            OpKind::Read | OpKind::Write if res >= 0 => {
                let n = res as u64;
                if n < op.remaining {
                    if n == 0 {
                        error = Some(libc::EIO);
                    } else {
                        // Short transfer: go on with the rest.
                        advance_iovecs(&mut op.iovecs, n as usize);
                        op.offset += n;
                        op.remaining -= n;
                        self.push_op(key);
                        return;
                    }
                }
            }
            OpKind::Fallocate {
                mode,
                len,
                unsupported,
            } if res == -libc::EOPNOTSUPP => match unsupported {
                Unsupported::Retry(other) => {
                    op.kind = OpKind::Fallocate {
                        mode: other,
                        len,
                        unsupported: Unsupported::Fail,
                    };
                    log::debug!("fallocate mode {mode:#x} unsupported, trying {other:#x}");
                    self.push_op(key);
                    return;
                }
                Unsupported::Succeed => {}
                Unsupported::Fail => error = Some(libc::EOPNOTSUPP),
            },
            _ if res < 0 => error = Some(-res),
            _ => {}
        }
        self.finish_op(key, error);
    }

    fn finish_op(&mut self, key: usize, error: Option<i32>) {
        let mut op = self.ops.remove(key);
        if let Some(errno) = error {
            self.errors_logged += 1;
            // A failing disk fails every request: log the first ones and then every 1000th.
            if self.errors_logged <= 10 || self.errors_logged.is_multiple_of(1000) {
                log::error!(
                    "{:?} at byte {} failed: {} (error #{})",
                    op.kind,
                    op.offset,
                    io::Error::from_raw_os_error(errno),
                    self.errors_logged
                );
            }
        }
        if let Some(bounce) = op.bounce.take() {
            if error.is_none() && op.kind == OpKind::Read {
                if let Some(&rk) = op.requests.first() {
                    let f = &self.inflight[rk];
                    scatter_to_iovecs(&f.req.iovecs, &bounce, f.req.data_len as usize);
                }
            }
            if self.bounce_pool.len() < BOUNCE_POOL {
                self.bounce_pool.push(bounce);
            }
        }
        for i in 0..op.requests.len() {
            let rk = op.requests[i];
            let f = &mut self.inflight[rk];
            if error.is_some() {
                f.status = VIRTIO_BLK_S_IOERR;
            }
            f.pending_ops -= 1;
            if f.pending_ops == 0 {
                self.complete_request(rk);
            }
        }
        op.requests.clear();
        op.iovecs.clear();
        self.op_pool.push(op);
    }

    fn complete_request(&mut self, key: usize) {
        let f = self.inflight.remove(key);
        write_status(&f.req, f.status);
        if let Some(seq) = f.write_seq {
            self.order
                .write_completed(f.queue, seq, &mut self.ready_flushes);
            while let Some(flush) = self.ready_flushes.pop() {
                self.issue_flush(flush);
            }
        }
        let q = f.queue as usize;
        if let Some(n) = self.inflight_per_queue.get_mut(q) {
            *n = n.saturating_sub(1);
        }
        if let Some(s) = self.stats.get_mut(q) {
            let (kind, bytes) = match f.req.kind {
                RequestKind::Read => (StatKind::Read, u64::from(f.req.data_len)),
                RequestKind::Write => (StatKind::Write, u64::from(f.req.data_len)),
                RequestKind::Flush => (StatKind::Flush, 0),
                RequestKind::GetId => (StatKind::GetId, 0),
                RequestKind::Discard => (StatKind::Discard, ranges_bytes(&f.req)),
                RequestKind::WriteZeroes => (StatKind::WriteZeroes, ranges_bytes(&f.req)),
            };
            let us = self.clock.saturating_duration_since(f.started).as_micros() as u64;
            s.record(kind, bytes, f.status == VIRTIO_BLK_S_OK, us);
        }
        self.completions.push(Completion {
            queue: f.queue,
            head: f.head,
            used_len: f.req.used_len,
        });
        self.request_pool.push(f.req);
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

    /// Blocks until every request in flight has completed (stop, disconnect, shutdown), or
    /// `timeout` has passed. Call it on the ring's owner thread.
    pub fn wait_idle(&mut self, timeout: Duration) -> Result<(), EngineError> {
        let start = Instant::now();
        self.submit()?;
        while !self.ops.is_empty() || !self.inflight.is_empty() {
            let waited = start.elapsed();
            if waited >= timeout {
                return Err(EngineError::Timeout {
                    ops: self.ops.len(),
                    waited,
                });
            }
            self.refill_from_backlog();
            let slice = (timeout - waited).min(Duration::from_millis(100));
            self.ring.wait_one(slice).map_err(EngineError::Enter)?;
            self.reap()?;
        }
        Ok(())
    }

    pub fn stats(&self) -> &[QueueStats] {
        &self.stats
    }
}

fn ranges_bytes(req: &Request) -> u64 {
    req.ranges
        .iter()
        .map(|r| u64::from(r.num_sectors) << 9)
        .sum()
}

fn write_status(req: &Request, status: u8) {
    if req.status.is_null() {
        return;
    }
    // SAFETY: the parser located the status byte inside guest memory, and the vhost-server
    // keeps that memory mapped until the request is on the used ring.
    unsafe { req.status.write_volatile(status) };
}

/// Drops the first `n` bytes from an iovec list, in place.
fn advance_iovecs(iovecs: &mut Vec<libc::iovec>, mut n: usize) {
    let mut skip = 0;
    while skip < iovecs.len() && n >= iovecs[skip].iov_len {
        n -= iovecs[skip].iov_len;
        skip += 1;
    }
    iovecs.drain(..skip);
    if n > 0 {
        if let Some(first) = iovecs.first_mut() {
            // SAFETY: n < first.iov_len, so the result stays inside the same buffer.
            first.iov_base = unsafe { first.iov_base.cast::<u8>().add(n) }.cast();
            first.iov_len -= n;
        }
    }
}

/// Copies `src` into the buffers in order, as far as they reach.
fn copy_to_iovecs(iovecs: &[libc::iovec], src: &[u8]) {
    let mut done = 0;
    for v in iovecs {
        if done == src.len() {
            break;
        }
        let n = v.iov_len.min(src.len() - done);
        // SAFETY: the parser checked that each iovec lies inside guest memory, which stays
        // mapped while the request is in flight; src is our own slice of at least done+n bytes.
        unsafe { std::ptr::copy_nonoverlapping(src[done..].as_ptr(), v.iov_base.cast(), n) };
        done += n;
    }
}

fn scatter_to_iovecs(iovecs: &[libc::iovec], bounce: &BounceBuffer, len: usize) {
    // SAFETY: the bounce buffer holds at least `len` initialised bytes (the read filled them).
    let src = unsafe { std::slice::from_raw_parts(bounce.ptr.as_ptr(), len) };
    copy_to_iovecs(iovecs, src);
}

fn gather_from_iovecs(iovecs: &[libc::iovec], bounce: &BounceBuffer, len: usize) {
    let mut done = 0;
    for v in iovecs {
        let n = v.iov_len.min(len - done);
        // SAFETY: each iovec lies inside mapped guest memory (checked by the parser); the
        // bounce buffer has room for `len` bytes and done + n <= len.
        unsafe {
            std::ptr::copy_nonoverlapping(v.iov_base.cast::<u8>(), bounce.ptr.as_ptr().add(done), n)
        };
        done += n;
        if done == len {
            break;
        }
    }
}

#[cfg(test)]
mod tests;
