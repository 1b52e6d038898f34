//! The io_uring ring of one iothread. It is set up on the thread that uses it, so the kernel's
//! single-issuer paths apply (SINGLE_ISSUER + DEFER_TASKRUN: completions are posted only when
//! that thread enters the ring, with no task-work interrupts in between), falling back to
//! COOP_TASKRUN and then to a plain ring on kernels without them. Every io_uring_enter goes
//! through [`Ring::enter`], which counts calls and SQEs for the statistics.

use std::cell::Cell;
use std::io;
use std::os::fd::RawFd;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use io_uring::{squeue, types, IoUring};

use crate::fixed::{FixedBuffers, FIXED_SLOTS, OP_READV_FIXED, OP_WRITEV_FIXED};

/// io_uring_enter: also wait for / collect completions (the io-uring crate keeps its `sys`
/// module private).
const IORING_ENTER_GETEVENTS: u32 = 1;

/// Which ring setup to ask the kernel for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum RingSetup {
    /// The best the kernel offers: DEFER_TASKRUN, else COOP_TASKRUN, else plain.
    #[default]
    Auto,
    /// COOP_TASKRUN + TASKRUN_FLAG at most (as on a kernel without DEFER_TASKRUN).
    Coop,
    /// No task-run flags at all (as on a kernel older than 5.19).
    Plain,
}

impl FromStr for RingSetup {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(RingSetup::Auto),
            "coop" => Ok(RingSetup::Coop),
            "plain" => Ok(RingSetup::Plain),
            _ => Err(format!("{s:?}: expected auto, coop or plain")),
        }
    }
}

/// What the kernel accepted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RingMode {
    DeferTaskrun,
    CoopTaskrun,
    Plain,
}

impl RingMode {
    pub fn name(self) -> &'static str {
        match self {
            RingMode::DeferTaskrun => "single-issuer+defer-taskrun",
            RingMode::CoopTaskrun => "coop-taskrun",
            RingMode::Plain => "plain",
        }
    }
}

/// How to build a ring; kept so that the ring can be built again on another thread.
#[derive(Clone, Debug)]
pub struct RingParams {
    pub sq_entries: u32,
    pub cq_entries: u32,
    pub setup: RingSetup,
    /// The completion eventfd registered with every ring (it outlives rings).
    pub eventfd: RawFd,
    /// The backend's fd, registered as fixed file 0.
    pub file: Option<RawFd>,
    /// Keep io-wq workers on this CPU (the iothread's).
    pub cpu: Option<usize>,
    /// Upper bound on io-wq workers of each kind (bounded: regular files and block devices;
    /// unbounded: sockets and the like); 0 keeps the kernel's default.
    pub iowq_max_workers: u32,
    /// Set up a table for guest memory as fixed buffers.
    pub fixed_buffers: bool,
}

/// io_uring_enter calls and SQEs they carried.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RingCounters {
    pub enters: u64,
    pub sqes: u64,
}

impl std::ops::Add for RingCounters {
    type Output = RingCounters;

    fn add(self, other: RingCounters) -> RingCounters {
        RingCounters {
            enters: self.enters + other.enters,
            sqes: self.sqes + other.sqes,
        }
    }
}

thread_local! {
    static THREAD_TOKEN: Cell<u64> = const { Cell::new(0) };
}

/// A number naming the calling thread, unique for the life of the process.
pub(crate) fn thread_token() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    THREAD_TOKEN.with(|t| {
        if t.get() == 0 {
            t.set(NEXT.fetch_add(1, Ordering::Relaxed));
        }
        t.get()
    })
}

pub(crate) struct Ring {
    uring: IoUring,
    mode: RingMode,
    owner: u64,
    pub(crate) counters: RingCounters,
    /// A sparse table of FIXED_SLOTS buffers is registered (guest memory goes in with
    /// [`Ring::register_fixed`]).
    fixed_table: bool,
    /// The kernel has READV_FIXED / WRITEV_FIXED.
    vectored_fixed: bool,
}

impl Ring {
    /// Builds a ring on the calling thread, which becomes its only submitter.
    pub(crate) fn new(p: &RingParams) -> io::Result<Ring> {
        let tiers: &[RingMode] = match p.setup {
            RingSetup::Auto => &[
                RingMode::DeferTaskrun,
                RingMode::CoopTaskrun,
                RingMode::Plain,
            ],
            RingSetup::Coop => &[RingMode::CoopTaskrun, RingMode::Plain],
            RingSetup::Plain => &[RingMode::Plain],
        };
        let mut last = None;
        for &mode in tiers {
            let mut b = IoUring::builder();
            b.setup_cqsize(p.cq_entries);
            match mode {
                RingMode::DeferTaskrun => {
                    b.setup_single_issuer()
                        .setup_defer_taskrun()
                        .setup_taskrun_flag();
                }
                RingMode::CoopTaskrun => {
                    b.setup_coop_taskrun().setup_taskrun_flag();
                }
                RingMode::Plain => {}
            }
            match b.build(p.sq_entries) {
                Ok(uring) => {
                    let mut ring = Ring {
                        uring,
                        mode,
                        owner: thread_token(),
                        counters: RingCounters::default(),
                        fixed_table: false,
                        vectored_fixed: false,
                    };
                    ring.register(p)?;
                    if p.fixed_buffers {
                        ring.set_up_fixed_table();
                    }
                    return Ok(ring);
                }
                // EINVAL: a flag this kernel does not know.
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    log::debug!("io_uring setup {} refused: {e}", mode.name());
                    last = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| io::Error::from_raw_os_error(libc::EINVAL)))
    }

    fn register(&self, p: &RingParams) -> io::Result<()> {
        let s = self.uring.submitter();
        s.register_eventfd(p.eventfd)?;
        // A registered file spares the kernel a file-table lookup and refcount per op.
        if let Some(fd) = p.file {
            s.register_files(&[fd])?;
        }
        if p.iowq_max_workers > 0 {
            let mut max = [p.iowq_max_workers, p.iowq_max_workers];
            if let Err(e) = s.register_iowq_max_workers(&mut max) {
                log::debug!("cannot bound io-wq workers: {e}");
            }
        }
        if let Some(cpu) = p.cpu {
            // SAFETY: cpu_set_t is a plain bit array for which all-zero bytes are valid.
            let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
            // SAFETY: CPU_SET writes one bit inside the set we own (cpu is checked below).
            if cpu < libc::CPU_SETSIZE as usize {
                unsafe { libc::CPU_SET(cpu, &mut set) };
                if let Err(e) = s.register_iowq_aff(&set) {
                    log::debug!("cannot pin io-wq workers to CPU {cpu}: {e}");
                }
            }
        }
        Ok(())
    }

    /// Registers an empty buffer table to fill on every memory-table change, and asks the
    /// kernel whether it has the vectored fixed opcodes.
    fn set_up_fixed_table(&mut self) {
        let s = self.uring.submitter();
        match s.register_buffers_sparse(FIXED_SLOTS) {
            Ok(()) => self.fixed_table = true,
            Err(e) => log::debug!("no fixed-buffer table: {e}"),
        }
        let mut probe = io_uring::Probe::new();
        if s.register_probe(&mut probe).is_ok() {
            self.vectored_fixed =
                probe.is_supported(OP_READV_FIXED) && probe.is_supported(OP_WRITEV_FIXED);
        }
    }

    pub(crate) fn vectored_fixed(&self) -> bool {
        self.vectored_fixed
    }

    /// Puts `bufs` in the buffer table, clearing slots up to `previous` that held others.
    /// Requests in flight on a replaced buffer keep the kernel's reference to its pages.
    pub(crate) fn register_fixed(
        &mut self,
        bufs: &FixedBuffers,
        previous: usize,
    ) -> io::Result<()> {
        if !self.fixed_table {
            return Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP));
        }
        let mut iovecs = bufs.iovecs();
        while iovecs.len() < previous {
            // An empty entry clears the slot.
            iovecs.push(libc::iovec {
                iov_base: std::ptr::null_mut(),
                iov_len: 0,
            });
        }
        if iovecs.is_empty() {
            return Ok(());
        }
        // SAFETY: each iovec is a mapped range of guest memory (or empty); the kernel pins its
        // pages, and SQEs name a slot only for buffers that lie inside it (FixedBuffers::slot_of).
        unsafe {
            self.uring
                .submitter()
                .register_buffers_update(0, &iovecs, None)
        }
    }

    pub(crate) fn mode(&self) -> RingMode {
        self.mode
    }

    pub(crate) fn owned_by_current_thread(&self) -> bool {
        self.owner == thread_token()
    }

    pub(crate) fn cq_entries(&self) -> usize {
        self.uring.params().cq_entries() as usize
    }

    /// Queues linked SQEs, all or none; false when the SQ has no room for all of them.
    ///
    /// # Safety
    /// Every buffer the entries point to must stay valid until their CQEs are reaped.
    pub(crate) unsafe fn push_all(&mut self, entries: &[squeue::Entry]) -> bool {
        let mut sq = self.uring.submission();
        // One entry (the common case) without push_multiple's loop.
        match entries {
            // SAFETY: the caller keeps the entry's buffers alive until completion.
            [one] => unsafe { sq.push(one) }.is_ok(),
            // SAFETY: the caller keeps every entry's buffers alive until completion.
            _ => unsafe { sq.push_multiple(entries) }.is_ok(),
        }
    }

    /// SQEs queued and not yet handed to the kernel.
    pub(crate) fn pending(&mut self) -> usize {
        self.uring.submission().len()
    }

    /// The kernel has completions to post (DEFER/COOP_TASKRUN) or an overflow to flush: only
    /// an io_uring_enter with GETEVENTS brings them to the CQ.
    fn needs_getevents(&mut self) -> bool {
        let sq = self.uring.submission();
        sq.taskrun() || sq.cq_overflow()
    }

    /// Hands queued SQEs to the kernel and, with `collect`, lets it post whatever completions
    /// are ready (task work); waits for at least `wait` completions. Skips the syscall when
    /// there is nothing to do.
    pub(crate) fn enter(&mut self, collect: bool, wait: u32) -> io::Result<()> {
        let to_submit = self.pending() as u32;
        let getevents = wait > 0 || (collect && self.needs_getevents());
        if to_submit == 0 && !getevents {
            return Ok(());
        }
        let flags = if getevents { IORING_ENTER_GETEVENTS } else { 0 };
        self.counters.enters += 1;
        loop {
            // SAFETY: no extended argument is passed; the SQEs were checked when pushed.
            let r = unsafe {
                self.uring
                    .submitter()
                    .enter::<libc::sigset_t>(to_submit, wait, flags, None)
            };
            match r {
                Ok(n) => {
                    self.counters.sqes += n as u64;
                    return Ok(());
                }
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                // The CQ is full or the kernel is short of memory: completions must be
                // reaped first; the caller reaps and comes back.
                Err(e)
                    if e.raw_os_error() == Some(libc::EBUSY)
                        || e.raw_os_error() == Some(libc::EAGAIN) =>
                {
                    return Ok(())
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Waits up to `timeout` for one completion (used only when idling towards a stop).
    pub(crate) fn wait_one(&mut self, timeout: Duration) -> io::Result<()> {
        let ts = types::Timespec::from(timeout);
        let args = types::SubmitArgs::new().timespec(&ts);
        self.counters.enters += 1;
        match self.uring.submitter().submit_with_args(1, &args) {
            Ok(n) => {
                self.counters.sqes += n as u64;
                Ok(())
            }
            Err(e) if matches!(e.raw_os_error(), Some(libc::ETIME) | Some(libc::EINTR)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Appends every CQE in the ring to `out` as (user_data, result).
    pub(crate) fn take_cqes(&mut self, out: &mut Vec<(u64, i32)>) {
        out.extend(self.uring.completion().map(|c| (c.user_data(), c.result())));
    }

    /// While the iothread polls the CQ itself, the eventfd would only wake it for nothing
    /// after it goes to sleep: turn it off, and back on before sleeping.
    pub(crate) fn set_eventfd_enabled(&mut self, enabled: bool) {
        let cq = self.uring.completion();
        if enabled {
            cq.enable_eventfd();
        } else {
            cq.disable_eventfd();
        }
    }

    pub(crate) fn cq_overflowed(&mut self) -> u32 {
        self.uring.completion().overflow()
    }
}
