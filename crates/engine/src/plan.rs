//! Planning a batch: reads and writes sorted and merged into vectored ops, flushes held for
//! the earlier writes of their queue, discards and write-zeroes as one fallocate per range.

use std::sync::atomic::Ordering;

use blk_proto::RequestKind;

use crate::merge::{self, RwItem};
use crate::op::Op;
use crate::storage::IoKind;
use crate::{Engine, EngineError};

impl Engine {
    /// Issues everything enqueued since the last call (`submit_batch` SQEs per
    /// `io_uring_enter`, the whole batch in one by default).
    pub fn submit(&mut self) -> Result<(), EngineError> {
        if self.batch.is_empty() {
            return Ok(());
        }
        let batch = std::mem::take(&mut self.batch);
        for &key in &batch {
            let f = &self.inflight[key];
            match f.req.kind {
                RequestKind::Read | RequestKind::Write => self.rw_items.push(RwItem {
                    write: f.req.kind == RequestKind::Write,
                    sector: f.req.sector,
                    len: f.req.data_len,
                    iovecs: f.req.iovecs.len() as u32,
                    key,
                    mergeable: !f.needs_bounce,
                }),
                RequestKind::Flush => {
                    // The writes drained before the flush go to the ring first; the flush
                    // itself follows once they (and every earlier write of its queue) are done.
                    self.emit_reads_writes();
                    if self.order.release(key) {
                        self.issue_flush(key);
                    }
                }
                RequestKind::Discard | RequestKind::WriteZeroes => self.emit_fallocates(key),
                RequestKind::GetId => unreachable!("GET_ID completes in enqueue"),
            }
        }
        self.emit_reads_writes();
        self.batch = batch;
        self.batch.clear();
        // Every op of the batch is on the ring, in the backlog or failed by now; an error here
        // leaves the SQEs queued for the next io_uring_enter.
        self.ring.enter(false, 0).map_err(|e| {
            self.log_enter_error(&e);
            EngineError::Enter(e)
        })
    }

    #[inline]
    pub(crate) fn issue_flush(&mut self, key: usize) {
        let op = self.new_op(IoKind::Flush, 0, key);
        self.push_op(op);
    }

    /// A pooled op, reset for `kind` at `offset`, carrying no request yet.
    #[inline]
    pub(crate) fn take_op(&mut self, kind: IoKind, offset: u64) -> Op {
        let mut op = self.op_pool.pop().unwrap_or_else(Op::new);
        op.kind = kind;
        op.offset = offset;
        op.remaining = 0;
        op.dsync = false;
        op.sync_after = false;
        op.alternate = false;
        op.retries = 0;
        op.first_result = None;
        op
    }

    /// The write cache is off: write-type ops are durable before they complete.
    #[inline]
    pub(crate) fn writethrough(&self) -> bool {
        !self.cfg.writeback.load(Ordering::Relaxed)
    }

    #[inline]
    pub(crate) fn new_op(&mut self, kind: IoKind, offset: u64, key: usize) -> usize {
        let mut op = self.take_op(kind, offset);
        op.requests.push(key);
        self.inflight[key].pending_ops += 1;
        self.ops.insert(op)
    }

    /// One op per range of a discard or write-zeroes request.
    pub(crate) fn emit_fallocates(&mut self, key: usize) {
        let f = &self.inflight[key];
        let discard = f.req.kind == RequestKind::Discard;
        let nranges = f.req.ranges.len();
        for i in 0..nranges {
            let r = self.inflight[key].req.ranges[i];
            let kind = if discard {
                IoKind::Discard
            } else {
                IoKind::WriteZeroes { unmap: r.unmap }
            };
            let op = self.new_op(kind, r.sector << 9, key);
            self.ops[op].remaining = u64::from(r.num_sectors) << 9;
            // Writethrough: durable before it completes, as a write with RWF_DSYNC is.
            self.ops[op].sync_after = self.writethrough();
            self.push_op(op);
        }
    }

    pub(crate) fn emit_reads_writes(&mut self) {
        if self.rw_items.is_empty() {
            return;
        }
        merge::plan(&mut self.rw_items, &self.cfg.merge, &mut self.groups);
        for g in 0..self.groups.len() {
            let (start, end) = self.groups[g];
            let first = self.rw_items[start];
            if !first.mergeable {
                // Through a bounce buffer, alone (the planner never merges these).
                self.issue_bounced(first.key);
                continue;
            }
            let kind = if first.write {
                IoKind::Write
            } else {
                IoKind::Read
            };
            let mut op = self.take_op(kind, first.sector << 9);
            op.dsync = first.write && self.writethrough();
            for it in &self.rw_items[start..end] {
                let f = &mut self.inflight[it.key];
                f.pending_ops += 1;
                op.requests.push(it.key);
                op.remaining += u64::from(f.req.data_len);
                op.iovecs.extend_from_slice(&f.req.iovecs);
            }
            if end - start > 1 {
                if let Some(s) = self.stats.get_mut(self.inflight[first.key].queue as usize) {
                    s.merged += (end - start - 1) as u64;
                }
            }
            let key = self.ops.insert(op);
            self.push_op(key);
        }
        self.rw_items.clear();
    }
}
