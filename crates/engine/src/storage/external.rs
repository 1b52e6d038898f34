//! The interface of a storage backend whose I/O does not go through the engine's ring (Ceph
//! RBD through librbd's async API, the fault-injecting test backend): the engine hands it
//! planned ops; it runs them wherever it likes and reports each one's result, from any thread,
//! through the engine's [`CompletionQueue`], whose eventfd is the one the iothread polls.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::{Arc, Mutex};

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
}

/// Where an external backend reports results for one engine: (op key, result) pairs, and a
/// wake-up on the engine's completion eventfd.
#[derive(Debug)]
pub struct CompletionQueue {
    done: Mutex<Vec<(u64, i32)>>,
    /// A duplicate of the engine's completion eventfd.
    eventfd: OwnedFd,
}

impl CompletionQueue {
    pub(crate) fn new(eventfd: OwnedFd) -> CompletionQueue {
        CompletionQueue {
            done: Mutex::new(Vec::new()),
            eventfd,
        }
    }

    /// Reports the result of op `key` (as a CQE's: bytes, 0, or -errno) and wakes the engine.
    pub fn complete(&self, key: u64, result: i32) {
        self.done
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((key, result));
        let one = 1u64;
        // SAFETY: writes 8 bytes from a u64 we own to our own eventfd; a full counter
        // (EAGAIN) still leaves it readable, which is all a wake-up needs.
        unsafe { libc::write(self.eventfd.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }

    /// Moves every reported result to `out`.
    pub(crate) fn take(&self, out: &mut Vec<(u64, i32)>) {
        let mut done = self.done.lock().unwrap_or_else(|p| p.into_inner());
        out.append(&mut done);
    }
}
