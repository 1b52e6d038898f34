//! Handing planned ops to the storage backend: the ring's (file, block device) or an external
//! backend's, whose results come back through the completion queue.

use crate::storage::ExternalStorage;
use crate::Engine;

/// Where this engine's ops go.
pub(crate) enum Lane {
    /// The engine's own ring (file, block device).
    Ring,
    /// An external backend, reporting to this engine's completion queue.
    External(
        std::sync::Arc<dyn ExternalStorage>,
        std::sync::Arc<crate::storage::CompletionQueue>,
    ),
    /// Nothing to do I/O on (the null backend: requests complete in enqueue).
    None,
}

impl Engine {
    /// Hands an op to its backend. Never loses it: an op that cannot go now waits in the
    /// backlog.
    #[inline]
    pub(crate) fn push_op(&mut self, key: usize) {
        match &self.lane {
            Lane::Ring if self.goes_by_ioctl(key) => self.discard_by_ioctl(key),
            Lane::Ring => self.push_to_ring(key),
            Lane::External(..) => self.start_external(key),
            Lane::None => self.finish_op(key, Some(libc::EIO)),
        }
    }

    fn start_external(&mut self, key: usize) {
        let Lane::External(backend, done) = &self.lane else {
            return;
        };
        let op = &self.ops[key];
        match backend.start(&op.io(key), done) {
            Ok(()) => self.in_external += 1,
            Err(errno) => self.finish_op(key, Some(errno)),
        }
    }

    /// Moves backlogged ops to the ring while it has room (each at most once per call: one
    /// the ring does not take goes back to the end).
    #[inline]
    pub(crate) fn refill_from_backlog(&mut self) {
        for _ in 0..self.backlog.len() {
            if self.in_ring >= self.ring_capacity {
                break;
            }
            let Some(key) = self.backlog.pop_front() else {
                break;
            };
            self.push_op(key);
        }
    }
}
