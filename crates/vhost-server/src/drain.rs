//! The drain: chains off a queue's avail ring, parsed, into the engine. The split ring is read
//! straight through the iothread's region snapshot (blk-proto's walker), not through
//! virtio-queue's iterator; only next_avail is written back to the queue.

use vhost_user_backend::VringT;
use virtio_queue::QueueT;

use crate::device::Inner;
use crate::iothread::IoThread;
use crate::{GuestMem, Vring};

impl IoThread {
    /// Pops every available chain of one queue, with notifications off while draining and a
    /// re-check after turning them back on so that no kick is lost.
    pub(crate) fn drain_queue(&mut self, inner: &Inner, vring: &Vring, local: usize, queue: u16) {
        self.drain(inner, vring, local, queue, true);
    }

    /// Drains a queue; with `rearm` false notifications stay off (the thread is polling).
    /// Chains are read straight from the split ring through the region snapshot; the queue's
    /// next_avail is kept current after every pop, so notification suppression (EVENT_IDX
    /// included) works as if virtio-queue had popped them.
    pub(crate) fn drain(
        &mut self,
        inner: &Inner,
        vring: &Vring,
        local: usize,
        queue: u16,
        rearm: bool,
    ) {
        if self.current_memory().is_none() {
            if self.connection_over {
                log::debug!("queue {queue} kicked after the connection was quiesced");
            } else {
                log::warn!("queue {queue} kicked before the memory table was set");
            }
            return;
        }
        if self.broken & (1 << local) != 0 {
            return;
        }
        let Some(regions) = self.pinned.last() else {
            return;
        };
        let mut v = vring.get_mut();
        self.throttled &= !(1 << local);
        let Some(ring) = split_ring(v.get_queue()) else {
            return;
        };
        // Translated once for the whole drain, not per request.
        let ring = ring.map(regions);
        loop {
            if let Err(e) = v.disable_notification() {
                log::warn!("queue {queue}: cannot disable notifications: {e}");
            }
            loop {
                let mut next_avail = v.get_queue().next_avail();
                let avail_idx = match ring.avail_idx() {
                    Ok(idx) if idx == next_avail => break,
                    // More than a queue ahead: the guest claims chains that cannot exist, and
                    // the queue would look "available" forever.
                    Ok(idx) if idx.wrapping_sub(next_avail) > ring.size() => {
                        self.broken |= 1 << local;
                        log::error!(
                            "queue {queue}: the guest's avail index {idx} is more than a queue \
                             ahead of {next_avail}; queue stopped until it is reset"
                        );
                        return;
                    }
                    Ok(idx) => idx,
                    Err(e) => {
                        self.broken |= 1 << local;
                        log::error!("queue {queue}: {e}; queue stopped until it is reset");
                        return;
                    }
                };
                while next_avail != avail_idx {
                    if !self.engine.can_accept() {
                        self.throttled |= 1 << local;
                        return;
                    }
                    let head = match ring.head(next_avail) {
                        Ok(head) => head,
                        Err(e) => {
                            self.broken |= 1 << local;
                            log::error!("queue {queue}: {e}; queue stopped until it is reset");
                            return;
                        }
                    };
                    next_avail = next_avail.wrapping_add(1);
                    v.get_queue_mut().set_next_avail(next_avail);
                    let Some(mut req) = self.engine.take_request() else {
                        unreachable!("can_accept checked above");
                    };
                    let mut walk = ring.chain(head);
                    match blk_proto::parse_walk(&mut walk, &inner.device, &mut req) {
                        Ok(()) => self.engine.enqueue(req, queue, head),
                        Err(e) => match e.status() {
                            Some(status) => {
                                log::debug!("queue {queue} head {head}: {e}");
                                self.engine.reject(req, queue, head, status);
                            }
                            None => {
                                self.malformed_logged += 1;
                                if self.malformed_logged <= 10 {
                                    match walk.error() {
                                        Some(why) => log::warn!(
                                            "queue {queue} head {head}: malformed chain \
                                             dropped: {e}: {why}"
                                        ),
                                        None => log::warn!(
                                            "queue {queue} head {head}: malformed chain \
                                             dropped: {e}"
                                        ),
                                    }
                                }
                                self.engine.discard_malformed(req, queue);
                                if let Err(e) = v.add_used(head, 0) {
                                    log::warn!("queue {queue}: add_used failed: {e}");
                                }
                            }
                        },
                    }
                }
            }
            if !rearm {
                break;
            }
            match v.enable_notification() {
                Ok(true) => continue,
                Ok(false) => break,
                Err(e) => {
                    log::warn!("queue {queue}: cannot enable notifications: {e}");
                    break;
                }
            }
        }
    }

    /// True if the guest has published chains this thread has not popped yet.
    pub(crate) fn has_avail(&self, vring: &Vring) -> bool {
        let Some(regions) = self.pinned.last() else {
            return false;
        };
        avail_pending(&vring.get_ref(), regions)
    }
}

/// The guest's avail index differs from the next chain this queue would pop.
fn avail_pending(
    v: &vhost_user_backend::VringState<GuestMem>,
    regions: &blk_proto::GuestRegions,
) -> bool {
    let q = v.get_queue();
    split_ring(q).is_some_and(|ring| {
        ring.avail_idx(regions)
            .is_ok_and(|idx| idx != q.next_avail())
    })
}

/// Where the walker finds the queue's rings; None while the queue cannot be popped (not
/// started, or no rings yet).
fn split_ring(q: &virtio_queue::Queue) -> Option<blk_proto::SplitRing> {
    (q.ready() && q.avail_ring() != 0 && q.size() != 0).then(|| blk_proto::SplitRing {
        desc_table: q.desc_table(),
        avail_ring: q.avail_ring(),
        size: q.size(),
    })
}
