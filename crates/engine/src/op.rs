//! The engine's units of work: a request in flight, and the ops (one SQE's worth each) that
//! carry it; a merged op carries several requests.

use std::time::Instant;

use blk_proto::Request;

use crate::bounce::BounceBuffer;

/// What to do when fallocate says EOPNOTSUPP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Unsupported {
    /// Try this mode instead.
    Retry(i32),
    /// Discard is a hint: leaving the data in place is a valid discard.
    Succeed,
    Fail,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum OpKind {
    Read,
    Write,
    Flush,
    Fallocate {
        mode: i32,
        len: u64,
        unsupported: Unsupported,
    },
}

/// One SQE's worth of work; a merged op carries several requests.
pub(crate) struct Op {
    pub(crate) kind: OpKind,
    pub(crate) offset: u64,
    pub(crate) iovecs: Vec<libc::iovec>,
    /// Bytes still to transfer (reads and writes).
    pub(crate) remaining: u64,
    /// Keys into `Engine::inflight` of the requests this op carries.
    pub(crate) requests: Vec<usize>,
    pub(crate) bounce: Option<BounceBuffer>,
}

impl Op {
    pub(crate) fn new() -> Op {
        Op {
            kind: OpKind::Flush,
            offset: 0,
            iovecs: Vec::new(),
            remaining: 0,
            requests: Vec::new(),
            bounce: None,
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
