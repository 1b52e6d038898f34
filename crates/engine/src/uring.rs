//! Ring storage (regular files and block devices): an op becomes its SQE on the engine's own
//! ring, or waits in the backlog while the ring holds as many ops as its CQ has room for.

use io_uring::{opcode, squeue, types};

use crate::discard;
use crate::fixed;
use crate::storage::{IoKind, StorageKind};
use crate::Engine;

const PUNCH: i32 = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
const ZERO: i32 = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;

/// The fallocate mode of a discard or write-zeroes op (`alternate`: after EOPNOTSUPP).
#[inline]
fn fallocate_mode(kind: IoKind, alternate: bool) -> i32 {
    match (kind, alternate) {
        (IoKind::WriteZeroes { unmap: true }, true) => ZERO,
        // Without UNMAP keep the blocks allocated; a hole still reads as zeros.
        (IoKind::WriteZeroes { unmap: false }, false) => ZERO,
        _ => PUNCH,
    }
}

/// Marks the user_data of the first SQE of a linked pair (an op and the data sync after it);
/// the second carries the op's key alone.
pub(crate) const LINKED_FIRST: u64 = 1 << 63;

impl Engine {
    /// The SQE of an op, and for reads and writes whether it uses a fixed buffer.
    #[inline(always)]
    pub(crate) fn sqe(&self, key: usize) -> (squeue::Entry, Option<bool>) {
        let op = &self.ops[key];
        debug_assert!(
            self.storage.raw_fd().is_some(),
            "the null backend completes requests inline"
        );
        // Index 0 of the files registered with the ring: the backend's fd.
        let fd = types::Fixed(0);
        let (entry, fixed) = match op.kind {
            IoKind::Read | IoKind::Write => {
                let write = op.kind == IoKind::Write;
                let flags = if op.dsync { libc::RWF_DSYNC } else { 0 };
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
            IoKind::Flush => (
                opcode::Fsync::new(fd)
                    .flags(types::FsyncFlags::DATASYNC)
                    .build(),
                None,
            ),
            // A real discard of a block device (discard.rs); BLKDISCARD ops never get here.
            IoKind::Discard if self.storage.kind() == StorageKind::BlockDevice => {
                (discard::discard_sqe(fd, op.offset, op.remaining), None)
            }
            // A file punches a hole. On a block device write-zeroes is fallocate too, which
            // the kernel turns into a zero-out: ZERO_RANGE keeps the blocks (BLKZEROOUT's
            // semantics), PUNCH_HOLE lets the device unmap them.
            IoKind::Discard | IoKind::WriteZeroes { .. } => (
                opcode::Fallocate::new(fd, op.remaining)
                    .offset(op.offset)
                    .mode(fallocate_mode(op.kind, op.alternate))
                    .build(),
                None,
            ),
        };
        (entry.user_data(key as u64), fixed)
    }

    /// Puts an op on the ring, or in the backlog while the ring holds as many ops as its CQ
    /// has room for. An op that cannot be pushed because the ring refuses to take SQEs
    /// (io_uring_enter fails) completes its requests with IOERR at once.
    #[inline]
    pub(crate) fn push_to_ring(&mut self, key: usize) {
        let sync_after = self.ops[key].sync_after;
        let cqes = if sync_after { 2 } else { 1 };
        if self.in_ring + cqes > self.ring_capacity {
            self.backlog.push_back(key);
            return;
        }
        let (entry, fixed) = self.sqe(key);
        let linked;
        let entries: &[squeue::Entry] = if sync_after {
            // The data sync runs only after the op succeeded (IO_LINK); either CQE's error is
            // the op's (see on_cqe).
            linked = [
                entry
                    .flags(squeue::Flags::IO_LINK)
                    .user_data(key as u64 | LINKED_FIRST),
                opcode::Fsync::new(types::Fixed(0))
                    .flags(types::FsyncFlags::DATASYNC)
                    .build()
                    .user_data(key as u64),
            ];
            &linked
        } else {
            std::slice::from_ref(&entry)
        };
        // The SQE points at `op.iovecs`' heap buffer and the buffers it lists: guest memory
        // the vhost-server keeps mapped while requests are in flight, or this op's bounce
        // buffer. Ops leave the slab only in `finish_op`, after their last CQE.
        // SAFETY: so neither is freed or moved before the kernel is done with them.
        let mut pushed = unsafe { self.ring.push_all(entries) };
        if !pushed {
            // The SQ is full: hand what is there to the kernel and retry.
            if let Err(e) = self.ring.enter(false, 0) {
                self.log_enter_error(&e);
                self.finish_op(key, Some(libc::EIO));
                return;
            }
            // SAFETY: as above.
            pushed = unsafe { self.ring.push_all(entries) };
        }
        if !pushed {
            // The kernel took nothing (EBUSY): try again after the next reap.
            self.backlog.push_back(key);
            return;
        }
        self.in_ring += cqes;
        match fixed {
            Some(true) => self.io_fixed += 1,
            Some(false) => self.io_plain += 1,
            None => {}
        }
        if self.cfg.submit_batch > 0 && self.ring.pending() >= self.cfg.submit_batch {
            // On failure the SQEs stay queued and go with the next io_uring_enter.
            if let Err(e) = self.ring.enter(false, 0) {
                self.log_enter_error(&e);
            }
        }
    }

    pub(crate) fn log_enter_error(&mut self, e: &std::io::Error) {
        if let Some(n) = self.enter_errors.tick() {
            log::error!("io_uring_enter failed: {e} (failure #{n})");
        }
    }
}
