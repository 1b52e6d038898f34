//! [`VhostUserBlk`]: the state every thread shares (device config, cache mode, the iothreads
//! behind their locks and control ports) and the control path: connection start and end,
//! quiesce, statistics.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use blk_proto::{DeviceConfig, VIRTIO_BLK_ID_BYTES};
use engine::{Engine, EngineConfig, QueueStats, Storage};

use crate::backend_req::BackendChannel;
use crate::cache_mode::CacheMode;
use crate::control::{self, ControlError, ControlMsg, ControlPort};
use crate::iothread::IoThread;
use crate::placement::{placement, queue_masks};
use crate::serve::ConnectionHandle;
use crate::{ServerConfig, ServerError};

pub(crate) struct Inner {
    /// As configured at start; its `capacity_sectors` is the start-up size (the size in force
    /// is `capacity_sectors` below).
    pub(crate) device: DeviceConfig,
    /// The capacity in force, in 512-byte sectors: what GET_CONFIG reports and what each
    /// iothread validates requests against (loaded once per drain). Only grows (resize.rs).
    pub(crate) capacity_sectors: AtomicU64,
    pub(crate) storage: Arc<Storage>,
    /// Resizes one at a time.
    pub(crate) resize_lock: Mutex<()>,
    /// This connection's backend-request channel, if the frontend gave one.
    pub(crate) backend_req: BackendChannel,
    /// How long a resize waits for the frontend to take the config change message.
    pub(crate) config_change_timeout: Duration,
    pub(crate) queue_size: u16,
    pub(crate) masks: Vec<u64>,
    /// Per global queue: (thread, index among that thread's vrings).
    pub(crate) placement: Vec<(usize, usize)>,
    pub(crate) cpus: Vec<Option<usize>>,
    /// The write cache mode in force (shared with the engines) and what the driver may do.
    pub(crate) cache: CacheMode,
    pub(crate) stopping: AtomicBool,
    pub(crate) poll: Duration,
    /// The longest nap while polling (zero: spin).
    pub(crate) poll_nap: Duration,
    /// The least polling after the last sign of work while requests are in flight.
    pub(crate) poll_in_flight: Duration,
    /// Control-path callers waiting for an iothread's lock: a polling thread yields to them.
    pub(crate) control_waiting: AtomicU32,
    pub(crate) threads: Vec<Mutex<IoThread>>,
    /// Per iothread: its control channel, served while a connection's event loops run.
    pub(crate) ports: Vec<ControlPort>,
    /// Set while a connection's event loops (our iothreads) are running. Messages are posted
    /// under this lock, so that none is posted after the loops ended and left unanswered.
    pub(crate) live: Mutex<bool>,
    /// Ends the current connection (an iothread that cannot go on asks for it).
    pub(crate) connection: Mutex<Option<ConnectionHandle>>,
    /// The frontend as the operator sees it (control socket `info`).
    pub(crate) frontend: crate::frontend::Frontend,
}

/// An iothread that could not finish its in-flight I/O when a connection ended: that I/O may
/// still touch the connection's guest memory, which therefore stays mapped.
#[derive(Debug, thiserror::Error)]
#[error("in-flight I/O did not finish ({}); its guest memory stays mapped", .0.join("; "))]
pub struct QuiesceError(Vec<String>);

/// uringblk's vhost-user-blk device: what the vhost-user session (session.rs) asks it, through
/// the `VhostUserBackend` trait, and the iothreads' dispatch; cheap to clone, shared by the
/// protocol thread and the iothreads.
#[derive(Clone)]
pub struct VhostUserBlk(pub(crate) Arc<Inner>);

/// Epoll data of the completion eventfd: above every queue index and the exit eventfd's.
pub(crate) fn completion_event(num_queues: usize) -> u16 {
    num_queues as u16 + 1
}

/// Epoll data of an iothread's control eventfd.
pub(crate) fn control_event(num_queues: usize) -> u16 {
    num_queues as u16 + 2
}

/// How long the control path waits for the iothread's answer: its wait, and then some.
pub(crate) const QUIESCE_ANSWER_TIMEOUT: Duration = Duration::from_secs(35);
/// How long it waits for an iothread to take a new memory table.
pub(crate) const MEMORY_TIMEOUT: Duration = Duration::from_secs(10);

impl VhostUserBlk {
    pub fn new(cfg: ServerConfig, storage: Arc<Storage>) -> Result<VhostUserBlk, ServerError> {
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
        let placement = placement(&masks, queues);
        let cache = CacheMode::new(cfg.writeback);
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
                    writeback: cache.flag(),
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
            threads.push(Mutex::new(IoThread::new(
                engine,
                max_requests,
                cfg.device.clone(),
                m.count_ones() as usize,
            )));
        }
        let cpus = (0..cfg.iothreads)
            .map(|i| cfg.cpus.get(i).copied())
            .collect();
        Ok(VhostUserBlk(Arc::new(Inner {
            capacity_sectors: AtomicU64::new(cfg.device.capacity_sectors),
            device: cfg.device,
            storage,
            resize_lock: Mutex::new(()),
            backend_req: BackendChannel::default(),
            config_change_timeout: cfg.config_change_timeout,
            queue_size: cfg.queue_size,
            masks,
            placement,
            cpus,
            cache,
            stopping: AtomicBool::new(false),
            poll: cfg.poll,
            poll_nap: cfg.poll_nap,
            poll_in_flight: cfg.poll_in_flight,
            control_waiting: AtomicU32::new(0),
            threads,
            ports,
            live: Mutex::new(false),
            connection: Mutex::new(None),
            frontend: Default::default(),
        })))
    }

    pub(crate) fn thread(&self, i: usize) -> MutexGuard<'_, IoThread> {
        // A panic while holding the lock already took the thread down; serve what is left.
        self.0.threads[i]
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The lock as the control path takes it: announced first, so that a busy-polling
    /// iothread returns to epoll (and unlocks) instead of making the control path wait.
    pub(crate) fn control(&self, i: usize) -> MutexGuard<'_, IoThread> {
        self.0.control_waiting.fetch_add(1, Ordering::SeqCst);
        let guard = self.thread(i);
        self.0.control_waiting.fetch_sub(1, Ordering::SeqCst);
        guard
    }

    /// A connection's event loops (one per iothread, event_loop.rs) are running: from now on
    /// control work goes to them. [`VhostUserBlk::connection_closed`] once they ended.
    pub(crate) fn loops_started(&self) {
        // A new frontend: its driver starts from the configured cache mode.
        self.0.cache.reset();
        for port in &self.0.ports {
            // A message whose caller gave up on the last connection's thread means nothing now.
            port.discard_stale();
        }
        *self.live() = true;
    }

    /// The connection's event loops have ended: control work is done in place again, and a
    /// message no loop took is answered (its caller then does the work in place).
    pub fn connection_closed(&self) {
        let mut live = self.live();
        *live = false;
        // Nothing the gone driver wrote outlives it.
        self.0.cache.reset();
        *self.0.connection.lock().unwrap_or_else(|p| p.into_inner()) = None;
        self.0.frontend.disconnected();
        self.0.backend_req.clear();
        for port in &self.0.ports {
            port.discard_stale();
        }
    }

    fn live(&self) -> MutexGuard<'_, bool> {
        self.0.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Has iothread `i` carry out a message, if a connection's event loop runs it: None when
    /// none does (the caller does the work in place).
    pub(crate) fn ask(
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

    /// Whether the write cache is on now (the mode the driver negotiated, see cache_mode.rs).
    pub fn write_cache_enabled(&self) -> bool {
        self.0.cache.writeback()
    }

    /// Stops taking new requests (shutdown). In-flight ones still complete.
    pub fn begin_stop(&self) {
        self.0.stopping.store(true, Ordering::SeqCst);
    }

    /// Waits until every iothread's in-flight I/O has completed, and forgets guest memory.
    /// Used between connections and at shutdown. An iothread whose wait failed keeps its
    /// guest memory mapped (the kernel may still write into it): that is the error.
    pub fn quiesce(&self) -> Result<(), QuiesceError> {
        let mut failures = Vec::new();
        for i in 0..self.0.threads.len() {
            // The iothread owns its ring: it waits for its own I/O.
            match self.ask(i, ControlMsg::Quiesce, QUIESCE_ANSWER_TIMEOUT) {
                Some(Ok(())) => continue,
                // Its own wait failed (it kept its memory). Waiting again from here would
                // touch its ring from a thread that does not own it.
                Some(Err(e @ ControlError::Failed(..))) => failures.push(e.to_string()),
                // Stuck: it may hold its lock, and taking it would hang this thread too.
                Some(Err(e @ ControlError::NoAnswer(..))) => failures.push(e.to_string()),
                // Its thread is gone: nobody else can wait, so try here.
                Some(Err(ControlError::Gone(_))) | None => {
                    if let Err(why) = self.control(i).forget_connection(i) {
                        failures.push(format!("iothread {i}: {why}"));
                    }
                }
            }
        }
        if failures.is_empty() {
            Ok(())
        } else {
            Err(QuiesceError(failures))
        }
    }

    /// The connection just accepted: an iothread that cannot go on ends it.
    pub(crate) fn connection_started(&self, handle: ConnectionHandle) {
        *self.0.connection.lock().unwrap_or_else(|p| p.into_inner()) = Some(handle);
        self.0.frontend.connected();
    }

    /// The current frontend: connected since when, how many so far, what its driver acked.
    pub fn frontend_info(&self) -> crate::FrontendInfo {
        self.0.frontend.info()
    }

    /// Something this connection cannot survive: said loudly, and the connection ends (the
    /// frontend sees its socket close; the server waits for the next one).
    pub(crate) fn end_connection(&self, why: &str) {
        log::error!("{why}: ending the connection");
        let handle = self
            .0
            .connection
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        match handle {
            Some(h) => h.shutdown(),
            None => log::error!("no connection to end (not started through serve)"),
        }
    }

    /// Each queue's statistics and requests in flight, summed over the iothreads (each
    /// records only into its own queues').
    pub fn queue_stats(&self) -> Vec<(QueueStats, u32)> {
        let n = self.0.device.num_queues as usize;
        let mut per_queue: Vec<(QueueStats, u32)> =
            (0..n).map(|_| (QueueStats::default(), 0)).collect();
        for i in 0..self.0.threads.len() {
            let t = self.control(i);
            for (q, ((stats, in_flight), s)) in
                per_queue.iter_mut().zip(t.engine.stats()).enumerate()
            {
                stats.add(s);
                *in_flight += t.engine.in_flight_on(q as u16);
            }
        }
        per_queue
    }

    /// Per-queue statistics as JSON.
    pub fn stats_json(&self) -> serde_json::Value {
        let per_queue = self.queue_stats();
        let queues: Vec<_> = per_queue
            .iter()
            .enumerate()
            .map(|(q, (s, in_flight))| {
                let mut v = s.to_json();
                v["queue"] = q.into();
                v["in_flight"] = (*in_flight).into();
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
                    "naps": t.nap.naps,
                    "nap_overruns": t.nap.overruns,
                    "io_fixed_buffers": fixed,
                    "io_plain_buffers": plain,
                })
            })
            .collect();
        serde_json::json!({ "queues": queues, "iothreads": iothreads })
    }

    pub(crate) fn pin_current_thread(&self, thread_id: usize) {
        crate::affinity::pin_current_thread(
            thread_id,
            self.0.cpus.get(thread_id).copied().flatten(),
        );
    }
}
