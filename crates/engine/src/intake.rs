//! Requests coming in from the vhost-server: pooled requests to parse into, rejects, and
//! [`Engine::enqueue`], which completes what needs no I/O at once and queues the rest for
//! the next submit.

use blk_proto::{Request, RequestKind, VIRTIO_BLK_S_OK};

use crate::iovec::{copy_to_iovecs, write_status};
use crate::op::InFlight;
use crate::storage::StorageKind;
use crate::{Completion, Engine};

impl Engine {
    /// True while a request can be taken: the caller stops draining its queue otherwise.
    pub fn can_accept(&self) -> bool {
        !self.request_pool.is_empty()
    }

    /// A cleared request to parse into, or None when `max_requests` are in flight.
    pub fn take_request(&mut self) -> Option<Request> {
        let mut req = self.request_pool.pop()?;
        req.clear();
        Some(req)
    }

    /// Returns a request for a chain too malformed to carry a status byte (the caller puts the
    /// chain on the used ring with length 0).
    pub fn discard_malformed(&mut self, req: Request, queue: u16) {
        if let Some(s) = self.stats.get_mut(queue as usize) {
            s.malformed += 1;
        }
        self.request_pool.push(req);
    }

    /// Completes a request that failed validation with `status` at once.
    pub fn reject(&mut self, req: Request, queue: u16, head: u16, status: u8) {
        if let Some(s) = self.stats.get_mut(queue as usize) {
            s.rejected += 1;
        }
        write_status(&req, status);
        self.completions.push(Completion {
            queue,
            head,
            used_len: req.used_len,
        });
        self.request_pool.push(req);
    }

    /// Accepts a validated request; it is issued by the next [`Engine::submit`].
    pub fn enqueue(&mut self, req: Request, queue: u16, head: u16) {
        let needs_bounce = self.needs_bounce(&req);
        let key = self.inflight.insert(InFlight {
            req,
            queue,
            head,
            pending_ops: 0,
            status: VIRTIO_BLK_S_OK,
            started: self.clock,
            needs_bounce,
            write_seq: None,
        });
        if let Some(n) = self.inflight_per_queue.get_mut(queue as usize) {
            *n += 1;
        }
        let f = &mut self.inflight[key];
        let inline = match f.req.kind {
            RequestKind::GetId => {
                copy_to_iovecs(&f.req.iovecs, &self.cfg.serial);
                true
            }
            // Nothing to transfer, or nowhere to transfer it to.
            RequestKind::Read | RequestKind::Write => {
                f.req.data_len == 0 || self.storage.kind() == StorageKind::Null
            }
            // Zero-sector segments are valid and dropped by the parser: nothing left to do.
            RequestKind::Discard | RequestKind::WriteZeroes => {
                f.req.ranges.is_empty() || self.storage.kind() == StorageKind::Null
            }
            RequestKind::Flush => self.storage.kind() == StorageKind::Null,
        };
        if inline {
            self.complete_request(key);
            return;
        }
        match f.req.kind {
            RequestKind::Write | RequestKind::Discard | RequestKind::WriteZeroes => {
                f.write_seq = Some(self.order.write_enqueued(queue));
            }
            RequestKind::Flush => self.order.flush_enqueued(key, queue),
            RequestKind::Read | RequestKind::GetId => {}
        }
        self.batch.push(key);
    }
}
