//! Turning an op into its io_uring SQE (file and block-device storage).

use std::sync::atomic::Ordering;

use io_uring::{opcode, squeue, types};

use crate::fixed;
use crate::op::OpKind;
use crate::Engine;

impl Engine {
    /// The SQE of an op, and for reads and writes whether it uses a fixed buffer.
    pub(crate) fn sqe(&self, key: usize) -> (squeue::Entry, Option<bool>) {
        let op = &self.ops[key];
        debug_assert!(
            self.storage.raw_fd().is_some(),
            "the null backend completes requests inline"
        );
        // Index 0 of the files registered with the ring: the backend's fd.
        let fd = types::Fixed(0);
        let (entry, fixed) = match op.kind {
            OpKind::Read | OpKind::Write => {
                let write = op.kind == OpKind::Write;
                let flags = if write && !self.cfg.writeback.load(Ordering::Relaxed) {
                    libc::RWF_DSYNC
                } else {
                    0
                };
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
            OpKind::Flush => (
                opcode::Fsync::new(fd)
                    .flags(types::FsyncFlags::DATASYNC)
                    .build(),
                None,
            ),
            OpKind::Fallocate { mode, len, .. } => (
                opcode::Fallocate::new(fd, len)
                    .offset(op.offset)
                    .mode(mode)
                    .build(),
                None,
            ),
        };
        (entry.user_data(key as u64), fixed)
    }
}
