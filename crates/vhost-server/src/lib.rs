//! The vhost-user-blk device. The protocol is served here: [`serve`] accepts one frontend at
//! a time and hands its requests to the `vhost` crate's `BackendReqHandler`, which calls our
//! [`session`] (owner, features, memory table, vrings, the inflight region); the session asks
//! [`VhostUserBlk`] what is about the device (features, config space, memory for the
//! iothreads, waiting for a stopped queue). Each iothread runs an [`event_loop`] per
//! connection, and the data path on it:
//!
//! kick -> [`VhostUserBlk::handle_event`](vhost_user_backend::VhostUserBackend::handle_event)
//! -> drain the queue with notifications off, parse each chain (`blk_proto::parse_walk`) into a
//! pooled request (marked in flight in the inflight region, if there is one), hand it to the
//! thread's `engine::Engine` -> one submit for the batch -> completions (the engine's eventfd
//! wakes the same thread) -> used ring -> signal the guest once per batch, only if EVENT_IDX
//! says it must.
//!
//! One job per file: [`serve`] (the connection loop), [`next_request`] (the next request's
//! header, read ahead, and the error replies the vhost crate does not send), [`session`] (the
//! protocol state and the answer to each request), [`mem_table`] (the memory table checked
//! and mapped), [`event_loop`] (an iothread's epoll loop), [`device`] (the shared state and
//! the control path), [`vhost_user`] (the device's side: the `VhostUserBackend` trait impl and
//! the event dispatch), [`placement`] (queues to iothreads), [`affinity`] (CPU pinning),
//! [`cache_mode`] (the negotiated write cache mode), [`iothread`] (one iothread's state),
//! [`guest_memory`] (which mappings in-flight requests keep alive), [`drain`] (avail ring ->
//! engine), [`inflight`] (recovery and resubmission from the inflight region), [`poll`]
//! (busy-polling), [`deliver`] (completions -> used ring), [`control`] (messages to an
//! iothread), [`resize`] (growing the disk while it is served), [`backend_req`] (the
//! backend-request channel: config change messages).

mod affinity;
mod backend_req;
mod cache_mode;
mod control;
mod deliver;
mod device;
mod drain;
mod event_loop;
mod frontend;
mod guest_memory;
mod inflight;
mod iothread;
mod mem_table;
mod next_request;
mod placement;
mod poll;
mod ratelimit;
mod resize;
mod serve;
mod session;
mod vhost_user;

use std::io;
use std::time::Duration;

use blk_proto::DeviceConfig;
use engine::{MergeLimits, RingSetup};
use vhost_user_backend::VringMutex;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

pub use backend_req::NotNotified;
pub use device::{QuiesceError, VhostUserBlk};
pub use frontend::FrontendInfo;
pub use placement::queue_masks;
pub use resize::{GuestNotice, ResizeError, ResizePlan, Resized};
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

/// [`ServerConfig::config_change_timeout`] by default: QEMU answers within milliseconds.
pub const DEFAULT_CONFIG_CHANGE_TIMEOUT: Duration = Duration::from_secs(5);

/// Everything the backend needs to serve one export.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    pub device: DeviceConfig,
    pub queue_size: u16,
    pub iothreads: usize,
    /// One CPU per iothread to pin it to; empty: no pinning.
    pub cpus: Vec<usize>,
    /// Write cache mode every driver starts from (a driver without FLUSH gets writethrough;
    /// one with FLUSH and CONFIG_WCE may switch it).
    pub writeback: bool,
    pub merge: MergeLimits,
    /// After a batch, keep polling the thread's avail rings and completion queue this long
    /// (with guest notifications off) before sleeping in epoll; 0 disables polling.
    pub poll: Duration,
    /// While polling, sleep (nanosleep, guest notifications still off) instead of spinning
    /// when a look finds nothing and the queues run deep, for at most this long a nap; a nap
    /// that overruns its length by more than this turns napping off for a while (poll.rs).
    /// Zero: never nap (spin for the whole window).
    pub poll_nap: Duration,
    /// While requests of the iothread are in flight at the storage, polling goes on at least
    /// this long after the last sign of work, however short the adaptive window: a completion
    /// is coming, and catching it (and the guest's next requests) while spinning saves the
    /// two wake-ups a sleep costs (the ring's eventfd, then the guest's kick). Zero: the
    /// adaptive window alone. Needs `poll` on.
    pub poll_in_flight: Duration,
    /// At most this many SQEs per io_uring_enter (0: a whole drained batch at once).
    pub submit_batch: usize,
    pub ring_setup: RingSetup,
    /// Upper bound on each ring's io-wq workers (0: the kernel's default).
    pub iowq_max_workers: u32,
    /// Register guest memory with each ring as fixed buffers.
    pub fixed_buffers: bool,
    /// Bytes of O_DIRECT bounce buffers each iothread may hold at once.
    pub bounce_budget: usize,
    /// How long a resize waits for the frontend to take (with REPLY_ACK: acknowledge) the
    /// config change message before it reports the guest as not notified.
    pub config_change_timeout: Duration,
}

impl ServerConfig {
    /// One unpinned iothread, writeback, no polling, a drained batch submitted whole, and
    /// every other lever at its default: a base to adjust with struct-update syntax.
    pub fn new(device: DeviceConfig, queue_size: u16) -> ServerConfig {
        ServerConfig {
            device,
            queue_size,
            iothreads: 1,
            cpus: Vec::new(),
            writeback: true,
            merge: MergeLimits::default(),
            poll: Duration::ZERO,
            poll_nap: Duration::ZERO,
            poll_in_flight: Duration::ZERO,
            submit_batch: 0,
            ring_setup: RingSetup::Auto,
            iowq_max_workers: 0,
            fixed_buffers: true,
            bounce_budget: engine::DEFAULT_BOUNCE_BUDGET,
            config_change_timeout: DEFAULT_CONFIG_CHANGE_TIMEOUT,
        }
    }
}

#[cfg(test)]
mod tests;
