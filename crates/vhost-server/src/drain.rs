//! The drain: chains off a queue's avail ring, parsed, into the engine. The split ring is read
//! straight through the iothread's region snapshot (blk-proto's walker), not through
//! virtio-queue's iterator; only next_avail is written back to the queue.

use std::sync::atomic::Ordering;

use vhost_user_backend::VringT;
use virtio_queue::QueueT;

use blk_proto::{ChainError, DrainEnd, DrainSink, ParseError, Request};
use engine::Engine;
use vhost_inflight::InflightQueue;

use crate::device::Inner;
use crate::inflight::Start;
use crate::iothread::IoThread;
use crate::{GuestMem, Vring};

/// Popped chains into the engine: valid ones enqueued, rejected ones answered with their
/// status, malformed ones (no status byte) returned with used length 0 and a log line.
struct EngineSink<'a> {
    engine: &'a mut Engine,
    vring: &'a mut vhost_user_backend::VringState<GuestMem>,
    queue: u16,
    malformed_logged: &'a mut u64,
    /// The queue's part of the inflight region, if INFLIGHT_SHMFD is in use.
    inflight: Option<&'a mut InflightQueue>,
    /// Mark popped heads in flight (not for resubmitted ones: they still are).
    mark: bool,
}

impl DrainSink for EngineSink<'_> {
    fn has_room(&mut self) -> bool {
        self.engine.can_accept()
    }

    fn take(&mut self) -> Request {
        match self.engine.take_request() {
            Some(req) => req,
            None => unreachable!("has_room checked the pool"),
        }
    }

    fn popped(
        &mut self,
        head: u16,
        req: Request,
        result: Result<(), ParseError>,
        walk_error: Option<ChainError>,
    ) {
        let queue = self.queue;
        // In pop order, before the request can be submitted (or answered).
        if self.mark {
            if let Some(inflight) = self.inflight.as_deref_mut() {
                inflight.popped(head);
            }
        }
        let e = match result {
            Ok(()) => return self.engine.enqueue(req, queue, head),
            Err(e) => e,
        };
        if let Some(status) = e.status() {
            log::debug!("queue {queue} head {head}: {e}");
            return self.engine.reject(req, queue, head, status);
        }
        *self.malformed_logged += 1;
        if *self.malformed_logged <= 10 {
            match walk_error {
                Some(why) => {
                    log::warn!("queue {queue} head {head}: malformed chain dropped: {e}: {why}")
                }
                None => log::warn!("queue {queue} head {head}: malformed chain dropped: {e}"),
            }
        }
        self.engine.discard_malformed(req, queue);
        if let Some(inflight) = self.inflight.as_deref_mut() {
            inflight.before_publish(head);
        }
        match self.vring.add_used(head, 0) {
            // add_used published it: the region follows, as after a delivered batch.
            Ok(()) => {
                if let Some(inflight) = self.inflight.as_deref_mut() {
                    inflight.after_publish(&[head], self.vring.get_queue().next_used());
                }
            }
            Err(e) => log::warn!("queue {queue}: add_used failed: {e}"),
        }
    }
}

impl IoThread {
    /// Pops every available chain of one queue, with notifications off while draining and a
    /// re-check after turning them back on so that no kick is lost.
    pub(crate) fn drain_queue(&mut self, inner: &Inner, vring: &Vring, local: usize, queue: u16) {
        self.drain(inner, vring, local, queue, true);
        self.nap.note_drain(self.drained);
    }

    /// Drains a queue; with `rearm` false notifications stay off (the thread is polling).
    /// Chains are read straight from the split ring through the region snapshot by
    /// blk-proto's drain (the rules live there, shared with the fuzz targets); this side
    /// only says where popped chains go.
    pub(crate) fn drain(
        &mut self,
        inner: &Inner,
        vring: &Vring,
        local: usize,
        queue: u16,
        rearm: bool,
    ) {
        self.drained = 0;
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
        // A disabled ring is not served (vhost-user "Ring states"), polled or kicked.
        if !v.is_enabled() {
            return;
        }
        self.throttled &= !(1 << local);
        let Some(ring) = split_ring(v.get_queue()) else {
            return;
        };
        // Translated once for the whole drain, not per request.
        let ring = ring.map(regions);
        // Pairs with the Release store of a resize, which follows the storage's growth.
        self.device.capacity_sectors = inner.capacity_sectors.load(Ordering::Acquire);
        if let Some(inflight) = self.inflight[local].as_mut() {
            let q = v.get_queue();
            match inflight.start(regions, q.used_ring(), q.size(), queue) {
                Start::From {
                    next_avail,
                    next_used,
                } => {
                    let q = v.get_queue_mut();
                    q.set_next_avail(next_avail);
                    q.set_next_used(next_used);
                }
                Start::AsIs => {}
                Start::Untracked => self.inflight[local] = None,
            }
        }
        if self.started & (1 << local) != 0 && v.get_call().is_some() {
            self.started &= !(1 << local);
            // Completions an earlier server published may never have been signalled: one
            // interrupt (spurious at worst) lets the guest catch up and move used_event on.
            if v.get_queue().next_used() != 0 {
                if let Err(e) = v.signal_used_queue() {
                    log::warn!("queue {queue}: cannot signal the guest: {e}");
                }
            }
        }
        if let Some(inflight) = self.inflight[local].as_mut() {
            // What an earlier server left in flight goes first, in counter order.
            while let Some(head) = inflight.next_resubmit() {
                if !self.engine.can_accept() {
                    self.throttled |= 1 << local;
                    return;
                }
                let Some(mut request) = self.engine.take_request() else {
                    self.throttled |= 1 << local;
                    return;
                };
                let mut walk = ring.chain(head);
                let result = blk_proto::parse_walk(&mut walk, &self.device, &mut request);
                let mut sink = EngineSink {
                    engine: &mut self.engine,
                    vring: &mut v,
                    queue,
                    malformed_logged: &mut self.malformed_logged,
                    inflight: Some(&mut inflight.part),
                    mark: false,
                };
                sink.popped(head, request, result, walk.error());
                inflight.resubmitted();
            }
        }
        loop {
            if let Err(e) = v.disable_notification() {
                log::warn!("queue {queue}: cannot disable notifications: {e}");
            }
            let mut next_avail = v.get_queue().next_avail();
            let first = next_avail;
            let end = {
                let mut sink = EngineSink {
                    engine: &mut self.engine,
                    vring: &mut v,
                    queue,
                    malformed_logged: &mut self.malformed_logged,
                    inflight: self.inflight[local].as_mut().map(|i| &mut i.part),
                    mark: true,
                };
                blk_proto::drain(&ring, &self.device, &mut next_avail, &mut sink)
            };
            // The queue's next_avail drives notification suppression (EVENT_IDX included)
            // as if virtio-queue had popped the chains.
            v.get_queue_mut().set_next_avail(next_avail);
            self.drained = self.drained.wrapping_add(next_avail.wrapping_sub(first));
            match end {
                DrainEnd::CaughtUp => {}
                DrainEnd::Throttled => {
                    self.throttled |= 1 << local;
                    return;
                }
                DrainEnd::Broken(why) => {
                    self.broken |= 1 << local;
                    log::error!("queue {queue}: {why}; queue stopped until it is reset");
                    return;
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
    v.is_enabled()
        && split_ring(q).is_some_and(|ring| {
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
