//! Getting ops to the kernel: onto the ring while its CQ has room, into the backlog beyond.

use crate::Engine;

impl Engine {
    /// Puts an op on the ring, or in the backlog while the ring holds as many ops as its CQ
    /// has room for. Never fails: what cannot go now goes later.
    pub(crate) fn push_op(&mut self, key: usize) {
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
    pub(crate) fn refill_from_backlog(&mut self) {
        while self.in_ring < self.ring_capacity {
            let Some(key) = self.backlog.pop_front() else {
                break;
            };
            self.push_op(key);
        }
    }
}
