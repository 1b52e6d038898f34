//! Completions onto the used rings, and one guest notification per queue and batch, only
//! where EVENT_IDX says it is needed.

use vhost_user_backend::VringT;
use virtio_queue::QueueT;

use crate::device::Inner;
use crate::iothread::IoThread;
use crate::Vring;

impl IoThread {
    /// Puts completions on their used rings and signals each queue at most once.
    /// Returns whether there was anything to deliver.
    pub(crate) fn deliver(&mut self, inner: &Inner, vrings: &[Vring]) -> bool {
        self.done.clear();
        self.done.extend(self.engine.take_completions());
        if self.done.is_empty() {
            return false;
        }
        let mut dirty = 0u64;
        for c in &self.done {
            dirty |= 1 << inner.placement[c.queue as usize].1;
        }
        // One load of the memory table per batch, not one per completion; the last pin is
        // its region snapshot, which the used rings are written through.
        let Some(mem) = self.current_memory() else {
            log::warn!("completions but no guest memory: dropped");
            return false;
        };
        let regions = self.pinned.last();
        for (local, vring) in vrings.iter().enumerate() {
            if dirty & (1 << local) == 0 {
                continue;
            }
            let mut v = vring.get_mut();
            let mine = self
                .done
                .iter()
                .filter(|c| inner.placement[c.queue as usize].1 == local);
            let q = v.get_queue();
            let ring = blk_proto::UsedRing {
                used_ring: q.used_ring(),
                avail_ring: q.avail_ring(),
                size: q.size(),
            };
            let notify = match regions.and_then(|r| ring.map(r)) {
                // The fast path: the used ring is written through the region snapshot and
                // its index published once for the batch.
                Some(mut used) => {
                    let old = q.next_used();
                    let event_idx = q.event_idx_enabled();
                    let mut next = old;
                    self.published.clear();
                    for c in mine {
                        if used.put(next, c.head, c.used_len) {
                            next = next.wrapping_add(1);
                            self.published.push(c.head);
                        } else {
                            log::warn!("queue {}: completion for head {} dropped", c.queue, c.head);
                        }
                    }
                    // The inflight region's order (vhost-inflight): last head, the used index,
                    // then the heads cleared.
                    let mut inflight = self.inflight[local].as_mut().map(|i| &mut i.part);
                    if let (Some(inflight), Some(&last)) =
                        (inflight.as_deref_mut(), self.published.last())
                    {
                        inflight.before_publish(last);
                    }
                    used.publish(next);
                    if let Some(inflight) = inflight {
                        inflight.after_publish(&self.published, next);
                    }
                    v.get_queue_mut().set_next_used(next);
                    used.needs_notification(event_idx, old, next)
                }
                // A used ring that spans regions (or none mapped yet): the library's path.
                None => {
                    let mut inflight = self.inflight[local].as_mut().map(|i| &mut i.part);
                    for c in mine {
                        // add_used publishes each element: the region follows one by one.
                        if let Some(inflight) = inflight.as_deref_mut() {
                            inflight.before_publish(c.head);
                        }
                        match v.get_queue_mut().add_used(&*mem, c.head, c.used_len) {
                            Ok(()) => {
                                if let Some(inflight) = inflight.as_deref_mut() {
                                    let next = v.get_queue().next_used();
                                    inflight.after_publish(&[c.head], next);
                                }
                            }
                            Err(e) => log::warn!("queue {}: add_used failed: {e}", c.queue),
                        }
                    }
                    v.needs_notification().unwrap_or(true)
                }
            };
            if notify {
                if let Err(e) = v.signal_used_queue() {
                    log::warn!("cannot signal the guest: {e}");
                }
            }
        }
        true
    }
}
