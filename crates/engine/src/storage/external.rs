//! The interface of a storage backend whose I/O does not go through the engine's ring (Ceph
//! RBD through librbd's async API, the fault-injecting test backend): the engine hands it
//! planned ops; it runs them wherever it likes and reports each one's result, from any thread,
//! through the engine's [`CompletionQueue`], whose eventfd is the one the iothread polls.
//!
//! Each engine (iothread) has its own queue, and the queue takes no lock: results go through a
//! lock-free list (crossbeam's unbounded channel), and the eventfd is written only when the
//! queue goes from drained to not, so a burst of completions costs the backend's thread one
//! write(2) and the iothread one wake-up.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use super::op::IoOp;

/// A backend that runs ops itself. Shared by every iothread's engine (`Send + Sync`); each
/// engine passes its own completion queue.
pub trait ExternalStorage: Send + Sync + std::fmt::Debug {
    /// Starts `op`. Its result goes to `done` later (or before this returns). An Err(errno)
    /// means the op was not started and will not complete: the engine fails its requests.
    fn start(&self, op: &IoOp<'_>, done: &Arc<CompletionQueue>) -> Result<(), i32>;

    /// Makes everything written so far durable (used at shutdown).
    fn sync(&self) -> io::Result<()> {
        Ok(())
    }

    /// Grows the storage to `bytes` (durably: the new size survives a crash before the guest
    /// is told). None: this backend cannot be resized.
    fn grow(&self, _bytes: u64) -> Option<io::Result<()>> {
        None
    }

    /// The size the storage has now, which its owner may have changed. None: this backend's
    /// size never changes under it.
    fn current_size(&self) -> Option<io::Result<u64>> {
        None
    }
}

/// Where an external backend reports results for one engine: (op key, result) pairs, and a
/// wake-up on the engine's completion eventfd.
#[derive(Debug)]
pub struct CompletionQueue {
    tx: crossbeam_channel::Sender<(u64, i32)>,
    rx: crossbeam_channel::Receiver<(u64, i32)>,
    /// A wake-up is owed or on its way: set by the reporter that found it clear (and wrote the
    /// eventfd), cleared by the engine before it drains.
    woken: AtomicBool,
    /// A duplicate of the engine's completion eventfd.
    eventfd: OwnedFd,
}

impl CompletionQueue {
    pub(crate) fn new(eventfd: OwnedFd) -> CompletionQueue {
        let (tx, rx) = crossbeam_channel::unbounded();
        CompletionQueue {
            tx,
            rx,
            woken: AtomicBool::new(false),
            eventfd,
        }
    }

    /// Reports the result of op `key` (as a CQE's: bytes, 0, or -errno) and wakes the engine.
    pub fn complete(&self, key: u64, result: i32) {
        // Never fails: the receiver lives in self.
        let _ = self.tx.send((key, result));
        // After the push: either this swap sees the flag clear and wakes the engine, or the
        // engine has not cleared it yet, and its drain (which follows the clear) sees the push.
        if !self.woken.swap(true, Ordering::SeqCst) {
            let one = 1u64;
            // SAFETY: writes 8 bytes from a u64 we own to our own eventfd; a full counter
            // (EAGAIN) still leaves it readable, which is all a wake-up needs.
            unsafe { libc::write(self.eventfd.as_raw_fd(), (&one as *const u64).cast(), 8) };
        }
    }

    /// Moves every reported result to `out`.
    pub(crate) fn take(&self, out: &mut Vec<(u64, i32)>) {
        self.woken.store(false, Ordering::SeqCst);
        out.extend(self.rx.try_iter());
    }
}
