//! Completion: CQEs reaped, short transfers and EAGAIN resubmitted, errors mapped to IOERR,
//! status bytes written, requests returned to the pool as [`Completion`]s.

use std::io;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use blk_proto::{RequestKind, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK};

use crate::bounce::scatter_to_iovecs;
use crate::dispatch::Lane;
use crate::iovec::{advance_iovecs, ranges_bytes, write_status};
use crate::stats::StatKind;
use crate::storage::{IoKind, StorageKind};
use crate::uring::LINKED_FIRST;
use crate::{Completion, Engine, EngineError};

/// EAGAIN / EINTR resubmissions of one op before it fails with IOERR.
pub(crate) const MAX_RETRIES: u32 = 100;

impl Engine {
    /// Resets the completion eventfd after it woke the thread. Separate from [`Engine::reap`]
    /// so that the opportunistic reap after each submit costs no syscall.
    pub fn clear_eventfd(&self) {
        let mut counter = 0u64;
        // SAFETY: reads 8 bytes into a u64 we own from our own non-blocking eventfd.
        unsafe {
            libc::read(
                self.eventfd.as_raw_fd(),
                (&mut counter as *mut u64).cast(),
                8,
            )
        };
    }

    /// Collects every available completion (CQEs of the ring, results of an external
    /// backend), finishing ops and requests. Completions accumulate until taken with
    /// [`Engine::take_completions`]. A failing io_uring_enter is returned, but only after
    /// every CQE already in the CQ has been handled: nothing reaped is dropped.
    #[inline]
    pub fn reap(&mut self) -> Result<(), EngineError> {
        self.reap_ioctl_discards();
        self.refill_from_backlog();
        if self.in_external > 0 {
            self.reap_external();
        }
        if self.in_ring == 0 {
            return Ok(());
        }
        // Submits what is queued and, under DEFER/COOP_TASKRUN, has the kernel post the
        // completions it holds: one syscall, and none when there is nothing to do.
        let mut result = self.ring.enter(true, 0).map_err(EngineError::Enter);
        loop {
            self.cqes.clear();
            self.ring.take_cqes(&mut self.cqes);
            if self.cqes.is_empty() {
                break;
            }
            self.clock = Instant::now();
            self.in_ring -= self.cqes.len().min(self.in_ring);
            for i in 0..self.cqes.len() {
                let (key, res) = self.cqes[i];
                self.on_cqe(key, res);
            }
            self.refill_from_backlog();
            if let Err(e) = self.ring.enter(true, 0) {
                result = Err(EngineError::Enter(e));
            }
        }
        result
    }

    /// Handles what the external backend reported (ops it restarts report again later).
    #[inline]
    fn reap_external(&mut self) {
        let Lane::External(_, done) = &self.lane else {
            return;
        };
        let done = done.clone();
        self.cqes.clear();
        done.take(&mut self.cqes);
        if self.cqes.is_empty() {
            return;
        }
        self.clock = Instant::now();
        self.in_external -= self.cqes.len().min(self.in_external);
        for i in 0..self.cqes.len() {
            let (key, res) = self.cqes[i];
            self.on_cqe(key, res);
        }
    }

    /// Handles one completion: `res` as a CQE's (bytes, 0 or -errno).
    #[inline(always)]
    pub(crate) fn on_cqe(&mut self, user_data: u64, res: i32) {
        let key = (user_data & !LINKED_FIRST) as usize;
        let Some(op) = self.ops.get_mut(key) else {
            log::error!("completion for unknown op {key}");
            return;
        };
        if user_data & LINKED_FIRST != 0 {
            // The op of a linked pair: its data sync's CQE follows (-ECANCELED if this failed).
            op.first_result = Some(res);
            return;
        }
        let res = match op.first_result.take() {
            // The op failed: its error, not the cancelled sync's.
            Some(first) if first < 0 => first,
            // The op worked: the sync's result is the pair's.
            Some(_) => res,
            None => res,
        };
        if res == -libc::EAGAIN || res == -libc::EINTR {
            op.retries += 1;
            if op.retries <= MAX_RETRIES {
                self.push_op(key);
                return;
            }
        }
        if op.kind == IoKind::Discard && self.storage.kind() == StorageKind::BlockDevice {
            if !op.alternate && !self.discarder.command_result(res) {
                // No io_uring discard command here: the same op again, by BLKDISCARD.
                op.alternate = true;
                self.push_op(key);
                return;
            }
            if res >= 0 {
                self.discarder.count(op.alternate);
            }
        }
        let mut error = None;
        match op.kind {
            IoKind::Read | IoKind::Write if res >= 0 => {
                let n = res as u64;
                if n < op.remaining {
                    if n == 0 {
                        error = Some(libc::EIO);
                    } else {
                        // Short transfer: go on with the rest.
                        advance_iovecs(&mut op.iovecs, n as usize);
                        op.offset += n;
                        op.remaining -= n;
                        self.push_op(key);
                        return;
                    }
                }
            }
            // Discard is a hint: leaving the data in place is a valid discard.
            IoKind::Discard if res == -libc::EOPNOTSUPP => {}
            IoKind::WriteZeroes { unmap } if res == -libc::EOPNOTSUPP && !op.alternate => {
                log::debug!("write-zeroes (unmap {unmap}) unsupported, trying the other way");
                op.alternate = true;
                self.push_op(key);
                return;
            }
            _ if res < 0 => error = Some(-res),
            _ => {}
        }
        self.finish_op(key, error);
    }

    #[inline]
    pub(crate) fn finish_op(&mut self, key: usize, error: Option<i32>) {
        let mut op = self.ops.remove(key);
        if let Some(errno) = error {
            if let Some(n) = self.op_errors.tick() {
                log::error!(
                    "{:?} at byte {} failed: {}; its {} requests get IOERR (error #{n})",
                    op.kind,
                    op.offset,
                    io::Error::from_raw_os_error(errno),
                    op.requests.len(),
                );
            }
        }
        if let Some(bounce) = op.bounce.take() {
            if error.is_none() && op.kind == IoKind::Read {
                if let Some(&rk) = op.requests.first() {
                    let f = &self.inflight[rk];
                    scatter_to_iovecs(&f.req.iovecs, &bounce, f.req.data_len as usize);
                }
            }
            self.return_bounce(bounce);
        }
        for i in 0..op.requests.len() {
            let rk = op.requests[i];
            let f = &mut self.inflight[rk];
            if error.is_some() {
                f.status = VIRTIO_BLK_S_IOERR;
            }
            f.pending_ops -= 1;
            if f.pending_ops == 0 {
                self.complete_request(rk);
            }
        }
        op.requests.clear();
        op.iovecs.clear();
        self.op_pool.push(op);
    }

    #[inline]
    pub(crate) fn complete_request(&mut self, key: usize) {
        let f = self.inflight.remove(key);
        write_status(&f.req, f.status);
        if let Some(seq) = f.write_seq {
            self.order
                .write_completed(f.queue, seq, &mut self.ready_flushes);
            while let Some(flush) = self.ready_flushes.pop() {
                self.issue_flush(flush);
            }
        }
        let q = f.queue as usize;
        if let Some(n) = self.inflight_per_queue.get_mut(q) {
            *n = n.saturating_sub(1);
        }
        if let Some(s) = self.stats.get_mut(q) {
            let (kind, bytes) = match f.req.kind {
                RequestKind::Read => (StatKind::Read, u64::from(f.req.data_len)),
                RequestKind::Write => (StatKind::Write, u64::from(f.req.data_len)),
                RequestKind::Flush => (StatKind::Flush, 0),
                RequestKind::GetId => (StatKind::GetId, 0),
                RequestKind::Discard => (StatKind::Discard, ranges_bytes(&f.req)),
                RequestKind::WriteZeroes => (StatKind::WriteZeroes, ranges_bytes(&f.req)),
            };
            let us = self.clock.saturating_duration_since(f.started).as_micros() as u64;
            s.record(kind, bytes, f.status == VIRTIO_BLK_S_OK, us);
        }
        self.completions.push(Completion {
            queue: f.queue,
            head: f.head,
            used_len: f.req.used_len,
        });
        self.request_pool.push(f.req);
    }

    /// Blocks until every request in flight has completed (stop, disconnect, shutdown), or
    /// `timeout` has passed: Err(Timeout) then, saying how many are left. Call it on the
    /// ring's owner thread.
    pub fn wait_idle(&mut self, timeout: Duration) -> Result<(), EngineError> {
        let start = Instant::now();
        let mut last_error = self.submit().err();
        while !self.inflight.is_empty() {
            let waited = start.elapsed();
            if waited >= timeout {
                return Err(EngineError::Timeout {
                    requests: self.inflight.len(),
                    ops: self.ops.len(),
                    waited,
                    cause: last_error.map(|e| e.to_string()).unwrap_or_default(),
                });
            }
            let slice = (timeout - waited).min(Duration::from_millis(100));
            if self.in_ring > 0 {
                // Both kinds in flight: come back soon for the external ones.
                let slice = if self.in_external > 0 {
                    slice.min(Duration::from_millis(1))
                } else {
                    slice
                };
                if let Err(e) = self.ring.wait_one(slice) {
                    // Do not spin on a broken ring; the deadline still holds.
                    std::thread::sleep(slice.min(Duration::from_millis(10)));
                    last_error = Some(EngineError::Enter(e));
                }
            } else if self.in_external > 0 || self.ioctl_discards_outstanding() > 0 {
                // Results that come through the eventfd, not the CQ.
                self.wait_eventfd(slice);
            } else if self.ops.is_empty() && self.backlog.is_empty() && self.batch.is_empty() {
                // Requests in flight with no op to finish them: nothing will.
                return Err(EngineError::Stranded(self.inflight.len()));
            }
            if let Err(e) = self.reap() {
                last_error = Some(e);
            }
        }
        Ok(())
    }

    /// Waits up to `timeout` for the completion eventfd (an external backend's results).
    pub(crate) fn wait_eventfd(&self, timeout: Duration) {
        let mut pfd = libc::pollfd {
            fd: self.eventfd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = timeout.as_millis().clamp(1, i32::MAX as u128) as i32;
        // SAFETY: one pollfd we own, and the count says one.
        unsafe { libc::poll(&mut pfd, 1, ms) };
        self.clear_eventfd();
    }
}
