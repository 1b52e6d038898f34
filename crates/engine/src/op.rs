//! The engine's units of work: a request in flight, and the ops (one SQE's worth each) that
//! carry it; a merged op carries several requests.

use std::time::Instant;

use blk_proto::Request;

use crate::bounce::BounceBuffer;
use crate::storage::{IoKind, IoOp};

/// One op of the backend's (an SQE's worth on the ring); a merged op carries several
/// requests.
pub(crate) struct Op {
    pub(crate) kind: IoKind,
    pub(crate) offset: u64,
    pub(crate) iovecs: Vec<libc::iovec>,
    /// Bytes still to transfer (reads and writes), or the range's length (discard,
    /// write-zeroes).
    pub(crate) remaining: u64,
    /// Keys into `Engine::inflight` of the requests this op carries.
    pub(crate) requests: Vec<usize>,
    pub(crate) bounce: Option<BounceBuffer>,
    /// Writes: RWF_DSYNC (the write cache is off).
    pub(crate) dsync: bool,
    /// Discard / write-zeroes: a data sync follows before completion (the write cache is off).
    pub(crate) sync_after: bool,
    /// Write-zeroes: the preferred way was unsupported, the other one is being tried.
    /// Discard of a block device: going by BLKDISCARD (the io_uring command is not there).
    pub(crate) alternate: bool,
    /// EAGAIN resubmissions so far.
    pub(crate) retries: u32,
    /// On the ring with a linked data sync: the first CQE's result, until the second comes.
    pub(crate) first_result: Option<i32>,
}

impl Op {
    pub(crate) fn new() -> Op {
        Op {
            kind: IoKind::Flush,
            offset: 0,
            iovecs: Vec::new(),
            remaining: 0,
            requests: Vec::new(),
            bounce: None,
            dsync: false,
            sync_after: false,
            alternate: false,
            retries: 0,
            first_result: None,
        }
    }

    /// The op as its backend sees it.
    pub(crate) fn io(&self, key: usize) -> IoOp<'_> {
        IoOp {
            key: key as u64,
            kind: self.kind,
            offset: self.offset,
            len: self.remaining,
            iovecs: &self.iovecs,
            dsync: self.dsync,
            sync_after: self.sync_after,
            alternate: self.alternate,
        }
    }
}

pub(crate) struct InFlight {
    pub(crate) req: Request,
    pub(crate) queue: u16,
    pub(crate) head: u16,
    pub(crate) pending_ops: u32,
    pub(crate) status: u8,
    pub(crate) started: Instant,
    pub(crate) needs_bounce: bool,
    /// Write-type requests: their place in the queue's order, which flushes wait on.
    pub(crate) write_seq: Option<u64>,
}
