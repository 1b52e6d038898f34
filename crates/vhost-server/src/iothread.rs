//! One iothread's state, and what it does outside the data path proper: control messages,
//! the end of a connection, and the submit/reap step every loop ends with.

use std::time::{Duration, Instant};

use blk_proto::DeviceConfig;
use engine::Engine;

use crate::control::{ControlMsg, ControlPort};
use crate::device::Inner;
use crate::guest_memory::host_regions;
use crate::inflight::QueueInflight;
use crate::ratelimit::{error_limited, RateLimit};
use crate::{GuestMem, Vring};

/// How long an iothread waits for its in-flight I/O to finish at a quiesce.
pub(crate) const QUIESCE_TIMEOUT: Duration = Duration::from_secs(30);

/// The state one iothread owns. Behind a mutex only so that the control path (memory table
/// updates, stop, stats) can reach it; on the data path only its own thread takes it.
pub(crate) struct IoThread {
    pub(crate) engine: Engine,
    /// The device config requests are validated against: the configured one, with the
    /// capacity in force taken at the start of each drain (a resize reaches every iothread
    /// at its next drain, for the cost of one load).
    pub(crate) device: DeviceConfig,
    pub(crate) mem: Option<GuestMem>,
    /// Snapshots of the mappings that in-flight requests point into (each keeps its mapping
    /// alive): the current one last, plus older ones until nothing in flight can still use
    /// them.
    pub(crate) pinned: Vec<blk_proto::GuestRegions>,
    /// Local queues left with chains because the request pool was full.
    pub(crate) throttled: u64,
    /// Local queues whose avail ring the guest broke (an index more than a queue ahead, or a
    /// ring outside guest memory): not drained again until the queue is stopped, lest the
    /// thread spin.
    pub(crate) broken: u64,
    pub(crate) malformed_logged: u64,
    /// The current busy-poll window: doubles while polling finds work, halves while it does
    /// not (QEMU's adaptive polling, roughly), between POLL_MIN and the configured maximum.
    pub(crate) poll_window: Duration,
    /// When the thread last went back to sleep in epoll after polling.
    pub(crate) slept_at: Option<Instant>,
    /// Scratch for completions (reused, never shrinks).
    pub(crate) done: Vec<engine::Completion>,
    /// Times the thread was woken (events handled).
    pub(crate) wakeups: u64,
    /// The connection was quiesced: events still arriving from its teardown are expected.
    pub(crate) connection_over: bool,
    /// Why this thread cannot serve its queues in this connection (it asked for the
    /// connection to end); it still answers control messages.
    pub(crate) failed: Option<String>,
    /// Engine errors, logged a few per second.
    pub(crate) engine_errors: RateLimit,
    /// Per local queue: its part of the inflight region, while the queue runs with one.
    pub(crate) inflight: Vec<Option<QueueInflight>>,
    /// Scratch: the heads of one queue's delivered batch (reused, never shrinks).
    pub(crate) published: Vec<u16>,
    /// Local queues just started (watched): their first drain signals the guest once if the
    /// used ring is not empty. A server killed between publishing completions and signalling
    /// them leaves a guest whose `used_event` is behind the used index; with EVENT_IDX no later
    /// completion would ever reach it (libvhost-user's `signalled_used_valid = false`).
    pub(crate) started: u64,
    /// Chains the last drain popped off its avail ring (the nap's depth signal).
    pub(crate) drained: u16,
    /// Napping while polling (poll.rs).
    pub(crate) nap: crate::poll::Nap,
}

impl IoThread {
    pub(crate) fn new(
        engine: Engine,
        max_requests: usize,
        device: DeviceConfig,
        queues: usize,
    ) -> IoThread {
        IoThread {
            engine,
            device,
            mem: None,
            pinned: Vec::new(),
            throttled: 0,
            broken: 0,
            poll_window: crate::poll::POLL_MIN,
            slept_at: None,
            malformed_logged: 0,
            done: Vec::with_capacity(max_requests),
            wakeups: 0,
            connection_over: false,
            failed: None,
            engine_errors: RateLimit::new(),
            inflight: (0..queues).map(|_| None).collect(),
            published: Vec::with_capacity(max_requests),
            started: 0,
            drained: 0,
            nap: crate::poll::Nap::default(),
        }
    }

    /// Waits for in-flight I/O (on the ring's owner thread, or where no owner runs any more),
    /// then drops what the connection left: guest memory, pending completions, queue states.
    pub(crate) fn forget_connection(&mut self, thread: usize) -> Result<(), String> {
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
        // The next connection's thread tries again (its own ring, its own thread).
        self.failed = None;
        waited
    }

    /// Carries out the control messages posted to this thread. `finish` is given at
    /// shutdown while the frontend is still connected: a quiesce then puts what completes on
    /// the used rings (and signals the guest) before memory is forgotten, so a clean stop
    /// leaves nothing for the next server to resubmit. Between connections it is None: the
    /// frontend already read its rings, and completions are dropped.
    pub(crate) fn serve_control(
        &mut self,
        port: &ControlPort,
        thread: usize,
        finish: Option<(&Inner, &[Vring])>,
    ) {
        while let Some(msg) = port.next() {
            match msg {
                ControlMsg::Quiesce(reply) => {
                    if let Some((inner, vrings)) = finish {
                        self.finish_in_flight(inner, vrings, thread);
                    }
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

    /// Waits for the requests in flight and delivers them to the guest.
    fn finish_in_flight(&mut self, inner: &Inner, vrings: &[Vring], thread: usize) {
        if self.engine.in_flight() > 0 {
            if let Err(e) = self.engine.wait_idle(QUIESCE_TIMEOUT) {
                log::error!("iothread {thread}: waiting for in-flight I/O failed: {e}");
            }
        }
        self.deliver(inner, vrings);
    }

    /// Submits what was enqueued and reaps what completed. An engine error is survivable
    /// (the engine fails the requests it touched with IOERR, or keeps them for the next
    /// try): log it, a few lines a second at most, and go on.
    pub(crate) fn submit_and_reap(&mut self) {
        if let Err(e) = self.engine.submit() {
            error_limited!(self.engine_errors, "submitting I/O failed: {e}");
        }
        if self.engine.in_flight() > 0 {
            if let Err(e) = self.engine.reap() {
                error_limited!(self.engine_errors, "reaping I/O failed: {e}");
            }
        }
    }
}
