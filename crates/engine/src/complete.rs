//! Completion: CQEs reaped, short transfers and EAGAIN resubmitted, errors mapped to IOERR,
//! status bytes written, requests returned to the pool as [`Completion`]s.

use std::io;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use blk_proto::{RequestKind, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK};

use crate::bounce::{scatter_to_iovecs, BOUNCE_POOL};
use crate::iovec::{advance_iovecs, ranges_bytes, write_status};
use crate::op::{OpKind, Unsupported};
use crate::stats::StatKind;
use crate::{Completion, Engine, EngineError};

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

    /// Collects every available CQE, finishing ops and requests. Completions accumulate until
    /// taken with [`Engine::take_completions`].
    pub fn reap(&mut self) -> Result<(), EngineError> {
        self.refill_from_backlog();
        if self.in_ring == 0 {
            return Ok(());
        }
        // Submits what is queued and, under DEFER/COOP_TASKRUN, has the kernel post the
        // completions it holds: one syscall, and none when there is nothing to do.
        self.ring.enter(true, 0).map_err(EngineError::Enter)?;
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
                self.on_cqe(key as usize, res);
            }
            self.refill_from_backlog();
            self.ring.enter(true, 0).map_err(EngineError::Enter)?;
        }
        Ok(())
    }

    /// Handles one CQE.
    pub(crate) fn on_cqe(&mut self, key: usize, res: i32) {
        let Some(op) = self.ops.get_mut(key) else {
            log::error!("completion for unknown op {key}");
            return;
        };
        if res == -libc::EAGAIN || res == -libc::EINTR {
            self.push_op(key);
            return;
        }
        let mut error = None;
        match op.kind {
            OpKind::Read | OpKind::Write if res >= 0 => {
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
            OpKind::Fallocate {
                mode,
                len,
                unsupported,
            } if res == -libc::EOPNOTSUPP => match unsupported {
                Unsupported::Retry(other) => {
                    op.kind = OpKind::Fallocate {
                        mode: other,
                        len,
                        unsupported: Unsupported::Fail,
                    };
                    log::debug!("fallocate mode {mode:#x} unsupported, trying {other:#x}");
                    self.push_op(key);
                    return;
                }
                Unsupported::Succeed => {}
                Unsupported::Fail => error = Some(libc::EOPNOTSUPP),
            },
            _ if res < 0 => error = Some(-res),
            _ => {}
        }
        self.finish_op(key, error);
    }

    pub(crate) fn finish_op(&mut self, key: usize, error: Option<i32>) {
        let mut op = self.ops.remove(key);
        if let Some(errno) = error {
            self.errors_logged += 1;
            // A failing disk fails every request: log the first ones and then every 1000th.
            if self.errors_logged <= 10 || self.errors_logged.is_multiple_of(1000) {
                log::error!(
                    "{:?} at byte {} failed: {} (error #{})",
                    op.kind,
                    op.offset,
                    io::Error::from_raw_os_error(errno),
                    self.errors_logged
                );
            }
        }
        if let Some(bounce) = op.bounce.take() {
            if error.is_none() && op.kind == OpKind::Read {
                if let Some(&rk) = op.requests.first() {
                    let f = &self.inflight[rk];
                    scatter_to_iovecs(&f.req.iovecs, &bounce, f.req.data_len as usize);
                }
            }
            if self.bounce_pool.len() < BOUNCE_POOL {
                self.bounce_pool.push(bounce);
            }
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
    /// `timeout` has passed. Call it on the ring's owner thread.
    pub fn wait_idle(&mut self, timeout: Duration) -> Result<(), EngineError> {
        let start = Instant::now();
        self.submit()?;
        while !self.ops.is_empty() || !self.inflight.is_empty() {
            let waited = start.elapsed();
            if waited >= timeout {
                return Err(EngineError::Timeout {
                    ops: self.ops.len(),
                    waited,
                });
            }
            self.refill_from_backlog();
            let slice = (timeout - waited).min(Duration::from_millis(100));
            self.ring.wait_one(slice).map_err(EngineError::Enter)?;
            self.reap()?;
        }
        Ok(())
    }
}
