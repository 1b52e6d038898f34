//! The vhost-user-blk backend. `vhost-user-backend`'s daemon handles the protocol (socket,
//! memory table, vring setup); this crate answers its questions (features, config space, queue
//! to iothread map) and runs the data path on its worker threads, which are our iothreads:
//!
//! kick -> [`BlkBackend::handle_event`] -> drain the queue with notifications off, parse each
//! chain (`blk_proto::parse`) into a pooled request, hand it to the thread's `engine::Engine`
//! -> one submit for the batch -> completions (the engine's eventfd wakes the same thread)
//! -> `add_used` -> signal the guest once per batch, only if EVENT_IDX says it must.

mod control;
mod serve;

use std::cell::Cell;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use blk_proto::{parse_config_write, DeviceConfig, VIRTIO_BLK_ID_BYTES};
use engine::{Engine, EngineConfig, MergeLimits, QueueStats, RingSetup, Storage};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringEpollHandler, VringMutex, VringT};
use virtio_queue::QueueT;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use control::{ControlMsg, ControlPort};
pub use serve::{serve, ServeError};

type Mem = GuestMemoryMmap<()>;
type GuestMem = GuestMemoryAtomic<Mem>;
pub type Vring = VringMutex<GuestMem>;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("invalid device configuration: {0}")]
    Config(#[from] blk_proto::ConfigError),
    #[error("--iothreads {iothreads} must be between 1 and the number of queues ({queues})")]
    IoThreads { iothreads: usize, queues: usize },
    #[error(
        "--cpus lists {cpus} CPUs but there are {iothreads} iothreads: give one CPU per iothread"
    )]
    CpuCount { cpus: usize, iothreads: usize },
    #[error("at most 64 queues are supported, got {0}")]
    TooManyQueues(usize),
    #[error("cannot start the I/O engine: {0}")]
    Engine(#[from] engine::EngineError),
    #[error("cannot create an iothread's control channel: {0}")]
    Control(io::Error),
}

/// Everything the backend needs to serve one export.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    pub device: DeviceConfig,
    pub queue_size: u16,
    pub iothreads: usize,
    /// One CPU per iothread to pin it to; empty: no pinning.
    pub cpus: Vec<usize>,
    /// Write cache enabled at start (the guest may switch it through CONFIG_WCE).
    pub writeback: bool,
    pub merge: MergeLimits,
    /// After a batch, keep polling the thread's avail rings and completion queue this long
    /// (with guest notifications off) before sleeping in epoll; 0 disables polling.
    pub poll: Duration,
    /// At most this many SQEs per io_uring_enter (0: a whole drained batch at once).
    pub submit_batch: usize,
    pub ring_setup: RingSetup,
    /// Upper bound on each ring's io-wq workers (0: the kernel's default).
    pub iowq_max_workers: u32,
    /// Register guest memory with each ring as fixed buffers.
    pub fixed_buffers: bool,
    /// Bytes of O_DIRECT bounce buffers each iothread may hold at once.
    pub bounce_budget: usize,
}

/// Spreads `queues` over `threads` as evenly as possible, contiguous runs per thread.
pub fn queue_masks(queues: usize, threads: usize) -> Vec<u64> {
    let mut masks = vec![0u64; threads];
    for q in 0..queues {
        masks[q * threads / queues] |= 1 << q;
    }
    masks
}

/// The state one iothread owns. Behind a mutex only so that the control path (memory table
/// updates, stop, stats) can reach it; on the data path only its own thread takes it.
struct IoThread {
    engine: Engine,
    mem: Option<GuestMem>,
    /// Snapshots of the mappings that in-flight requests point into (each keeps its mapping
    /// alive): the current one last, plus older ones until nothing in flight can still use
    /// them.
    pinned: Vec<blk_proto::GuestRegions>,
    /// Local queues left with chains because the request pool was full.
    throttled: u64,
    /// Local queues whose avail ring the guest broke (an index more than a queue ahead, or a
    /// ring outside guest memory): not drained again until the queue is stopped, lest the
    /// thread spin.
    broken: u64,
    malformed_logged: u64,
    /// The current busy-poll window: doubles while polling finds work, halves while it does
    /// not (QEMU's adaptive polling, roughly), between POLL_MIN and the configured maximum.
    poll_window: Duration,
    /// When the thread last went back to sleep in epoll after polling.
    slept_at: Option<Instant>,
    /// Scratch for completions (reused, never shrinks).
    done: Vec<engine::Completion>,
    /// Times the thread was woken (events handled).
    wakeups: u64,
    /// The connection was quiesced: events still arriving from its teardown are expected.
    connection_over: bool,
}

struct Inner {
    device: DeviceConfig,
    queue_size: u16,
    masks: Vec<u64>,
    /// Per global queue: (thread, index among that thread's vrings).
    placement: Vec<(usize, usize)>,
    cpus: Vec<Option<usize>>,
    writeback: Arc<AtomicBool>,
    stopping: AtomicBool,
    poll: Duration,
    /// Control-path callers waiting for an iothread's lock: a polling thread yields to them.
    control_waiting: AtomicU32,
    threads: Vec<Mutex<IoThread>>,
    /// Per iothread: its control channel, served while a connection's event loops run.
    ports: Vec<ControlPort>,
    /// Set while a connection's event loops (our iothreads) are running. Messages are posted
    /// under this lock, so that none is posted after the loops ended and left unanswered.
    live: Mutex<bool>,
}

/// The `VhostUserBackend` of uringblk: cheap to clone, shared by the daemon's threads.
#[derive(Clone)]
pub struct BlkBackend(Arc<Inner>);

thread_local! {
    static PINNED: Cell<bool> = const { Cell::new(false) };
}

/// The smallest busy-poll window once polling is on.
const POLL_MIN: Duration = Duration::from_micros(4);

/// Epoll data of the completion eventfd: above every queue index, as the library requires.
fn completion_event(num_queues: usize) -> u16 {
    num_queues as u16 + 1
}

/// Epoll data of an iothread's control eventfd.
fn control_event(num_queues: usize) -> u16 {
    num_queues as u16 + 2
}

/// How long an iothread waits for its in-flight I/O to finish at a quiesce.
const QUIESCE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the control path waits for the iothread's answer: its wait, and then some.
const QUIESCE_ANSWER_TIMEOUT: Duration = Duration::from_secs(35);
/// How long it waits for an iothread to take a new memory table.
const MEMORY_TIMEOUT: Duration = Duration::from_secs(10);

impl BlkBackend {
    pub fn new(cfg: ServerConfig, storage: Arc<Storage>) -> Result<BlkBackend, ServerError> {
        cfg.device.validate()?;
        let queues = cfg.device.num_queues as usize;
        if queues > 64 {
            return Err(ServerError::TooManyQueues(queues));
        }
        if cfg.iothreads == 0 || cfg.iothreads > queues {
            return Err(ServerError::IoThreads {
                iothreads: cfg.iothreads,
                queues,
            });
        }
        if !cfg.cpus.is_empty() && cfg.cpus.len() != cfg.iothreads {
            return Err(ServerError::CpuCount {
                cpus: cfg.cpus.len(),
                iothreads: cfg.iothreads,
            });
        }
        let masks = queue_masks(queues, cfg.iothreads);
        let mut placement = vec![(0, 0); queues];
        for (t, m) in masks.iter().enumerate() {
            let mut local = 0;
            for (q, p) in placement.iter_mut().enumerate() {
                if m & (1 << q) != 0 {
                    *p = (t, local);
                    local += 1;
                }
            }
        }
        let writeback = Arc::new(AtomicBool::new(cfg.writeback));
        let mut serial = [0u8; VIRTIO_BLK_ID_BYTES];
        let n = cfg.device.serial.len().min(VIRTIO_BLK_ID_BYTES);
        serial[..n].copy_from_slice(&cfg.device.serial[..n]);
        let mut threads = Vec::new();
        let mut ports = Vec::new();
        for (t, m) in masks.iter().enumerate() {
            let max_requests = cfg.queue_size as usize * m.count_ones() as usize;
            let engine = Engine::new(
                storage.clone(),
                EngineConfig {
                    max_requests,
                    // seg_max data descriptors, each of which may straddle memory regions.
                    max_iovecs_per_request: (cfg.device.seg_max as usize * 2).min(1024),
                    max_ranges_per_request: cfg
                        .device
                        .max_discard_seg
                        .max(cfg.device.max_write_zeroes_seg)
                        as usize,
                    merge: cfg.merge,
                    serial,
                    num_queues: queues,
                    writeback: writeback.clone(),
                    submit_batch: cfg.submit_batch,
                    ring_setup: cfg.ring_setup,
                    ring_entries: 0,
                    cpu: cfg.cpus.get(t).copied(),
                    iowq_max_workers: cfg.iowq_max_workers,
                    fixed_buffers: cfg.fixed_buffers,
                    bounce_budget: cfg.bounce_budget,
                    block_discard: engine::BlockDiscard::Auto,
                },
            )?;
            ports.push(ControlPort::new(t).map_err(ServerError::Control)?);
            threads.push(Mutex::new(IoThread {
                engine,
                mem: None,
                pinned: Vec::new(),
                throttled: 0,
                broken: 0,
                poll_window: POLL_MIN,
                slept_at: None,
                malformed_logged: 0,
                done: Vec::with_capacity(max_requests),
                wakeups: 0,
                connection_over: false,
            }));
        }
        let cpus = (0..cfg.iothreads)
            .map(|i| cfg.cpus.get(i).copied())
            .collect();
        Ok(BlkBackend(Arc::new(Inner {
            device: cfg.device,
            queue_size: cfg.queue_size,
            masks,
            placement,
            cpus,
            writeback,
            stopping: AtomicBool::new(false),
            poll: cfg.poll,
            control_waiting: AtomicU32::new(0),
            threads,
            ports,
            live: Mutex::new(false),
        })))
    }

    fn thread(&self, i: usize) -> MutexGuard<'_, IoThread> {
        // A panic while holding the lock already took the thread down; serve what is left.
        self.0.threads[i]
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The lock as the control path takes it: announced first, so that a busy-polling
    /// iothread returns to epoll (and unlocks) instead of making the control path wait.
    fn control(&self, i: usize) -> MutexGuard<'_, IoThread> {
        self.0.control_waiting.fetch_add(1, Ordering::SeqCst);
        let guard = self.thread(i);
        self.0.control_waiting.fetch_sub(1, Ordering::SeqCst);
        guard
    }

    /// Adds each iothread's completion and control eventfds to that thread's epoll, and
    /// from then on sends control work to the iothreads. Call once per daemon (a new daemon
    /// serves each connection), before it starts; [`BlkBackend::connection_closed`] after.
    pub fn register_completion_fds(
        &self,
        handlers: &[Arc<VringEpollHandler<Self>>],
    ) -> io::Result<()> {
        let n = self.0.device.num_queues as usize;
        for (i, h) in handlers.iter().enumerate() {
            // A message whose caller gave up on the last connection's thread means nothing now.
            self.0.ports[i].discard_stale();
            let fd = self.control(i).engine.eventfd();
            h.register_listener(fd, EventSet::IN, u64::from(completion_event(n)))?;
            h.register_listener(
                self.0.ports[i].eventfd(),
                EventSet::IN,
                u64::from(control_event(n)),
            )?;
        }
        *self.live() = true;
        Ok(())
    }

    /// The connection's event loops have ended: control work is done in place again, and a
    /// message no loop took is answered (its caller then does the work in place).
    pub fn connection_closed(&self) {
        let mut live = self.live();
        *live = false;
        for port in &self.0.ports {
            port.discard_stale();
        }
    }

    fn live(&self) -> MutexGuard<'_, bool> {
        self.0.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Has iothread `i` carry out a message, if a connection's event loop runs it: None when
    /// none does (the caller does the work in place).
    fn ask(
        &self,
        i: usize,
        make: impl FnOnce(control::Reply) -> ControlMsg,
        timeout: Duration,
    ) -> Option<Result<(), control::ControlError>> {
        let answer = {
            let live = self.live();
            if !*live {
                return None;
            }
            self.0.ports[i].post(make)
        };
        Some(answer.and_then(|a| self.0.ports[i].wait(a, timeout)))
    }

    /// Stops taking new requests (shutdown). In-flight ones still complete.
    pub fn begin_stop(&self) {
        self.0.stopping.store(true, Ordering::SeqCst);
    }

    /// Waits until every iothread's in-flight I/O has completed, and forgets guest memory.
    /// Used between connections and at shutdown.
    pub fn quiesce(&self) {
        for i in 0..self.0.threads.len() {
            // The iothread owns its ring: it waits for its own I/O.
            match self.ask(i, ControlMsg::Quiesce, QUIESCE_ANSWER_TIMEOUT) {
                Some(Ok(())) => continue,
                Some(Err(e)) => log::warn!("quiesce: {e}"),
                None => {}
            }
            // No event loop runs (between connections), or it did not answer; a failure is
            // logged where it happens.
            let _ = self.control(i).forget_connection(i);
        }
    }

    /// Per-queue statistics as JSON.
    pub fn stats_json(&self) -> serde_json::Value {
        let n = self.0.device.num_queues as usize;
        let mut per_queue: Vec<QueueStats> = (0..n).map(|_| QueueStats::default()).collect();
        for i in 0..self.0.threads.len() {
            let t = self.control(i);
            for (q, s) in per_queue.iter_mut().zip(t.engine.stats()) {
                q.add(s);
            }
        }
        let queues: Vec<_> = per_queue
            .iter()
            .enumerate()
            .map(|(q, s)| {
                let mut v = s.to_json();
                v["queue"] = q.into();
                v["iothread"] = self.0.placement[q].0.into();
                v
            })
            .collect();
        let iothreads: Vec<_> = (0..self.0.threads.len())
            .map(|i| {
                let t = self.control(i);
                let c = t.engine.ring_counters();
                let (fixed, plain) = t.engine.fixed_io_counts();
                serde_json::json!({
                    "iothread": i,
                    "ring": t.engine.ring_mode().name(),
                    "enters": c.enters,
                    "sqes": c.sqes,
                    "wakeups": t.wakeups,
                    "io_fixed_buffers": fixed,
                    "io_plain_buffers": plain,
                })
            })
            .collect();
        serde_json::json!({ "queues": queues, "iothreads": iothreads })
    }

    fn pin_current_thread(&self, thread_id: usize) {
        if PINNED.with(|p| p.replace(true)) {
            return;
        }
        if let Some(Some(cpu)) = self.0.cpus.get(thread_id) {
            if core_affinity::set_for_current(core_affinity::CoreId { id: *cpu }) {
                log::info!("iothread {thread_id} pinned to CPU {cpu}");
            } else {
                log::warn!("iothread {thread_id}: cannot pin to CPU {cpu}");
            }
        }
    }
}

impl IoThread {
    /// Waits for in-flight I/O (on the ring's owner thread, or where no owner runs any more),
    /// then drops what the connection left: guest memory, pending completions, queue states.
    fn forget_connection(&mut self, thread: usize) -> Result<(), String> {
        let waited = if self.engine.in_flight() > 0 {
            self.engine.wait_idle(QUIESCE_TIMEOUT).map_err(|e| {
                log::error!("iothread {thread}: waiting for in-flight I/O failed: {e}");
                e.to_string()
            })
        } else {
            Ok(())
        };
        // The frontend is gone: nobody reads these used-ring entries any more.
        self.engine.take_completions().for_each(drop);
        if waited.is_ok() {
            // Guest memory stays mapped while the kernel may still touch it.
            self.mem = None;
            self.pinned.clear();
            self.engine.set_guest_memory(&[]);
            self.connection_over = true;
        }
        self.throttled = 0;
        self.broken = 0;
        waited
    }

    /// Carries out the control messages posted to this thread.
    fn serve_control(&mut self, port: &ControlPort, thread: usize) {
        while let Some(msg) = port.next() {
            match msg {
                ControlMsg::Quiesce(reply) => {
                    let _ = reply.send(self.forget_connection(thread));
                }
                ControlMsg::SetMemory(mem, reply) => {
                    // Registered before the reply: the old mappings go away after it.
                    self.engine.set_guest_memory(&host_regions(&mem));
                    self.mem = Some(mem);
                    self.connection_over = false;
                    let _ = reply.send(Ok(()));
                }
            }
        }
    }

    /// The current guest memory, pinned for the requests about to be parsed.
    fn current_memory(&mut self) -> Option<Arc<Mem>> {
        let mem = self.mem.as_ref()?.memory().into_inner();
        if self.engine.in_flight() == 0 {
            self.pinned.retain(|p| p.is_snapshot_of(&mem));
        }
        // Each pin is a region snapshot (it keeps its mapping alive), built once per memory
        // table; the last one is what drain translates guest addresses through.
        if !self.pinned.last().is_some_and(|p| p.is_snapshot_of(&mem)) {
            self.pinned.push(blk_proto::GuestRegions::new(mem.clone()));
        }
        Some(mem)
    }

    /// Pops every available chain of one queue, with notifications off while draining and a
    /// re-check after turning them back on so that no kick is lost.
    fn drain_queue(&mut self, inner: &Inner, vring: &Vring, local: usize, queue: u16) {
        self.drain(inner, vring, local, queue, true);
    }

    /// Drains a queue; with `rearm` false notifications stay off (the thread is polling).
    /// Chains are read straight from the split ring through the region snapshot; the queue's
    /// next_avail is kept current after every pop, so notification suppression (EVENT_IDX
    /// included) works as if virtio-queue had popped them.
    fn drain(&mut self, inner: &Inner, vring: &Vring, local: usize, queue: u16, rearm: bool) {
        if self.current_memory().is_none() {
            if self.connection_over {
                log::debug!("queue {queue} kicked after the connection was quiesced");
            } else {
                log::warn!("queue {queue} kicked before the memory table was set");
            }
            return;
        }
        if self.broken & (1 << local) != 0 {
            return;
        }
        let Some(regions) = self.pinned.last() else {
            return;
        };
        let mut v = vring.get_mut();
        self.throttled &= !(1 << local);
        let Some(ring) = split_ring(v.get_queue()) else {
            return;
        };
        // Translated once for the whole drain, not per request.
        let ring = ring.map(regions);
        loop {
            if let Err(e) = v.disable_notification() {
                log::warn!("queue {queue}: cannot disable notifications: {e}");
            }
            loop {
                let mut next_avail = v.get_queue().next_avail();
                let avail_idx = match ring.avail_idx() {
                    Ok(idx) if idx == next_avail => break,
                    // More than a queue ahead: the guest claims chains that cannot exist, and
                    // the queue would look "available" forever.
                    Ok(idx) if idx.wrapping_sub(next_avail) > ring.size() => {
                        self.broken |= 1 << local;
                        log::error!(
                            "queue {queue}: the guest's avail index {idx} is more than a queue \
                             ahead of {next_avail}; queue stopped until it is reset"
                        );
                        return;
                    }
                    Ok(idx) => idx,
                    Err(e) => {
                        self.broken |= 1 << local;
                        log::error!("queue {queue}: {e}; queue stopped until it is reset");
                        return;
                    }
                };
                while next_avail != avail_idx {
                    if !self.engine.can_accept() {
                        self.throttled |= 1 << local;
                        return;
                    }
                    let head = match ring.head(next_avail) {
                        Ok(head) => head,
                        Err(e) => {
                            self.broken |= 1 << local;
                            log::error!("queue {queue}: {e}; queue stopped until it is reset");
                            return;
                        }
                    };
                    next_avail = next_avail.wrapping_add(1);
                    v.get_queue_mut().set_next_avail(next_avail);
                    let Some(mut req) = self.engine.take_request() else {
                        unreachable!("can_accept checked above");
                    };
                    let mut walk = ring.chain(head);
                    match blk_proto::parse_walk(&mut walk, &inner.device, &mut req) {
                        Ok(()) => self.engine.enqueue(req, queue, head),
                        Err(e) => match e.status() {
                            Some(status) => {
                                log::debug!("queue {queue} head {head}: {e}");
                                self.engine.reject(req, queue, head, status);
                            }
                            None => {
                                self.malformed_logged += 1;
                                if self.malformed_logged <= 10 {
                                    match walk.error() {
                                        Some(why) => log::warn!(
                                            "queue {queue} head {head}: malformed chain \
                                             dropped: {e}: {why}"
                                        ),
                                        None => log::warn!(
                                            "queue {queue} head {head}: malformed chain \
                                             dropped: {e}"
                                        ),
                                    }
                                }
                                self.engine.discard_malformed(req, queue);
                                if let Err(e) = v.add_used(head, 0) {
                                    log::warn!("queue {queue}: add_used failed: {e}");
                                }
                            }
                        },
                    }
                }
            }
            if !rearm {
                break;
            }
            match v.enable_notification() {
                Ok(true) => continue,
                Ok(false) => break,
                Err(e) => {
                    log::warn!("queue {queue}: cannot enable notifications: {e}");
                    break;
                }
            }
        }
    }

    /// On waking from epoll for work: had the thread polled a little longer, would it have
    /// caught this event? Then grow the window; if it slept longer than the largest window,
    /// shrink it (QEMU's rule: judge polling by how long the thread blocked). Wake-ups that
    /// found nothing to do say nothing about polling and are not counted.
    fn adapt_poll_window(&mut self, slept_at: Option<Instant>, max: Duration) {
        if let Some(slept) = slept_at {
            let blocked = slept.elapsed();
            self.poll_window = if blocked < max {
                (self.poll_window * 2).clamp(POLL_MIN, max)
            } else {
                (self.poll_window / 2).max(POLL_MIN)
            };
        }
    }

    /// True if the guest has published chains this thread has not popped yet.
    fn has_avail(&self, vring: &Vring) -> bool {
        let Some(regions) = self.pinned.last() else {
            return false;
        };
        avail_pending(&vring.get_ref(), regions)
    }

    /// Busy-polls the thread's avail rings and its completion queue for `inner.poll` after the
    /// last sign of work, with guest notifications and the ring's eventfd off (the thread
    /// looks itself); then turns both back on, draining and reaping whatever raced in, before
    /// the thread sleeps in epoll.
    fn poll(&mut self, inner: &Inner, port: &ControlPort, vrings: &[Vring], first_queue: usize) {
        // Only started queues: a stopped one has no rings to look at or write to.
        let ready: u64 = vrings
            .iter()
            .enumerate()
            .filter(|(_, v)| v.get_ref().get_queue().ready())
            .fold(0, |m, (i, _)| m | 1 << i);
        for (local, vring) in vrings.iter().enumerate() {
            if ready & (1 << local) != 0 {
                let _ = vring.get_mut().disable_notification();
            }
        }
        self.engine.set_eventfd_enabled(false);
        let window = self.poll_window.clamp(POLL_MIN.min(inner.poll), inner.poll);
        let mut found_work = false;
        let mut idle_since = Instant::now();
        while idle_since.elapsed() < window
            && !inner.stopping.load(Ordering::Relaxed)
            && inner.control_waiting.load(Ordering::Relaxed) == 0
            && !port.pending()
        {
            let mut busy = false;
            for (local, vring) in vrings.iter().enumerate() {
                let live = ready & !self.broken;
                if live & (1 << local) != 0 && self.engine.can_accept() && self.has_avail(vring) {
                    self.engine.tick();
                    self.drain(inner, vring, local, (first_queue + local) as u16, false);
                    busy = true;
                }
            }
            self.submit_and_reap();
            busy |= self.deliver(inner, vrings);
            if busy {
                found_work = true;
                idle_since = Instant::now();
            } else {
                std::hint::spin_loop();
            }
        }
        // Completions from here on wake the thread: the eventfd is back on before the last
        // look at the CQ, and what it counted while the thread polled is stale.
        self.engine.set_eventfd_enabled(true);
        self.engine.clear_eventfd();
        for (local, vring) in vrings.iter().enumerate() {
            if ready & (1 << local) != 0 {
                self.drain(inner, vring, local, (first_queue + local) as u16, true);
            }
        }
        self.submit_and_reap();
        self.deliver(inner, vrings);
        // Spinning pays only when work shows up while we spin (e.g. deep queues); at low
        // depth it burns a core for nothing, so the window shrinks.
        self.poll_window = if found_work {
            (window * 2).min(inner.poll)
        } else {
            (window / 2).max(POLL_MIN)
        };
        self.slept_at = Some(Instant::now());
    }

    /// Submits what was enqueued and reaps what completed. An engine error fails no request
    /// by itself (ops that cannot go now wait in the engine's backlog): log it and go on.
    fn submit_and_reap(&mut self) {
        if let Err(e) = self.engine.submit() {
            log::error!("submitting I/O failed: {e}");
        }
        if self.engine.in_flight() > 0 {
            if let Err(e) = self.engine.reap() {
                log::error!("reaping I/O failed: {e}");
            }
        }
    }

    /// Puts completions on their used rings and signals each queue at most once.
    /// Returns whether there was anything to deliver.
    fn deliver(&mut self, inner: &Inner, vrings: &[Vring]) -> bool {
        self.done.clear();
        self.done.extend(self.engine.take_completions());
        if self.done.is_empty() {
            return false;
        }
        let mut dirty = 0u64;
        for c in &self.done {
            dirty |= 1 << inner.placement[c.queue as usize].1;
        }
        // One load of the memory table per batch, not one per completion.
        let Some(mem) = self.mem.as_ref().map(|m| m.memory()) else {
            log::warn!("completions but no guest memory: dropped");
            return false;
        };
        for (local, vring) in vrings.iter().enumerate() {
            if dirty & (1 << local) == 0 {
                continue;
            }
            let mut v = vring.get_mut();
            for c in self
                .done
                .iter()
                .filter(|c| inner.placement[c.queue as usize].1 == local)
            {
                if let Err(e) = v.get_queue_mut().add_used(&*mem, c.head, c.used_len) {
                    log::warn!("queue {}: add_used failed: {e}", c.queue);
                }
            }
            match v.needs_notification() {
                Ok(false) => {}
                Ok(true) | Err(_) => {
                    if let Err(e) = v.signal_used_queue() {
                        log::warn!("cannot signal the guest: {e}");
                    }
                }
            }
        }
        true
    }
}

/// Guest memory as (host address, length) per region, for the rings' fixed-buffer tables.
fn host_regions(mem: &GuestMem) -> Vec<(usize, usize)> {
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    mem.memory()
        .iter()
        .map(|r| (r.as_ptr() as usize, r.len() as usize))
        .collect()
}

/// The guest's avail index differs from the next chain this queue would pop.
fn avail_pending(
    v: &vhost_user_backend::VringState<GuestMem>,
    regions: &blk_proto::GuestRegions,
) -> bool {
    let q = v.get_queue();
    split_ring(q).is_some_and(|ring| {
        ring.avail_idx(regions)
            .is_ok_and(|idx| idx != q.next_avail())
    })
}

/// Where the walker finds the queue's rings; None while the queue cannot be popped (not
/// started, or no rings yet).
fn split_ring(q: &virtio_queue::Queue) -> Option<blk_proto::SplitRing> {
    (q.ready() && q.avail_ring() != 0 && q.size() != 0).then(|| blk_proto::SplitRing {
        desc_table: q.desc_table(),
        avail_ring: q.avail_ring(),
        size: q.size(),
    })
}

impl VhostUserBackend for BlkBackend {
    type Bitmap = ();
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        self.0.device.num_queues as usize
    }

    fn max_queue_size(&self) -> usize {
        self.0.queue_size as usize
    }

    fn features(&self) -> u64 {
        self.0.device.virtio_features() | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
    }

    fn set_event_idx(&self, enabled: bool) {
        // The vrings apply it themselves; this is only worth a log line.
        log::debug!("EVENT_IDX {}", if enabled { "on" } else { "off" });
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let wb = self.0.writeback.load(Ordering::Relaxed);
        self.0.device.read_config(wb, offset, size)
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        match parse_config_write(offset, buf) {
            Some(wb) => {
                log::info!(
                    "guest switched the write cache {}",
                    if wb { "on" } else { "off" }
                );
                self.0.writeback.store(wb, Ordering::Relaxed);
            }
            None => log::warn!("ignored config write at {offset} of {} bytes", buf.len()),
        }
        Ok(())
    }

    fn update_memory(&self, mem: GuestMem) -> io::Result<()> {
        for i in 0..self.0.threads.len() {
            let m = mem.clone();
            match self.ask(i, |r| ControlMsg::SetMemory(m, r), MEMORY_TIMEOUT) {
                Some(Ok(())) => continue,
                Some(Err(e)) => log::warn!("memory table update: {e}"),
                None => {}
            }
            let mut t = self.control(i);
            // Registered by the iothread at its next event (its ring, its thread).
            t.engine.set_guest_memory(&host_regions(&mem));
            t.mem = Some(mem.clone());
            t.connection_over = false;
        }
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        self.0.masks.clone()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        new_event_consumer_and_notifier(EventFlag::NONBLOCK).ok()
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        // GET_VRING_BASE: the frontend reads next_avail after this returns, so every request
        // of the queue must be completed and on the used ring first.
        let Some(&(t, local)) = self.0.placement.get(queue_index as usize) else {
            return Ok(());
        };
        // A restarted queue starts from a fresh avail index.
        self.control(t).broken &= !(1 << local);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if self.control(t).engine.in_flight_on(queue_index as u16) == 0 {
                return Ok(());
            }
            if Instant::now() > deadline {
                log::error!("queue {queue_index}: I/O still in flight after 30 s at stop");
                return Ok(());
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[Vring],
        thread_id: usize,
    ) -> io::Result<()> {
        let inner = &*self.0;
        if thread_id >= inner.threads.len() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "unknown thread",
            ));
        }
        self.pin_current_thread(thread_id);
        let mut t = self.thread(thread_id);
        t.wakeups += 1;
        // The ring belongs to the thread that submits to it: a new connection's iothread
        // sets up its own.
        match t.engine.adopt_current_thread() {
            Ok(false) => {}
            Ok(true) => log::info!(
                "iothread {thread_id}: io_uring ring set up ({})",
                t.engine.ring_mode().name()
            ),
            Err(e) => {
                log::error!("iothread {thread_id}: {e}");
                return Ok(());
            }
        }
        t.engine.sync_fixed_buffers();
        let slept_at = t.slept_at.take();
        let stopping = inner.stopping.load(Ordering::Relaxed);
        // Queues of a thread are contiguous (see queue_masks): local i is first_queue + i.
        let first_queue = inner.masks[thread_id].trailing_zeros() as usize;
        let n = inner.device.num_queues as usize;
        let local = device_event as usize;
        let mut work = false;
        if local < vrings.len() {
            if !stopping {
                t.engine.tick();
                t.drain_queue(inner, &vrings[local], local, (first_queue + local) as u16);
                work = true;
            }
        } else if device_event == completion_event(n) {
            t.engine.clear_eventfd();
        } else if device_event == control_event(n) {
            t.serve_control(&inner.ports[thread_id], thread_id);
        } else {
            log::warn!("iothread {thread_id}: unexpected event {device_event}");
        }
        loop {
            t.submit_and_reap();
            work |= t.deliver(inner, vrings);
            // Chains left behind for want of a free request: take them now that some are free.
            if t.throttled == 0 || stopping || !t.engine.can_accept() {
                break;
            }
            let throttled = t.throttled;
            for (local, vring) in vrings.iter().enumerate() {
                if throttled & (1 << local) != 0 {
                    t.drain_queue(inner, vring, local, (first_queue + local) as u16);
                }
            }
        }
        if !inner.poll.is_zero() && !stopping {
            if work {
                t.adapt_poll_window(slept_at, inner.poll);
            }
            t.poll(inner, &inner.ports[thread_id], vrings, first_queue);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
