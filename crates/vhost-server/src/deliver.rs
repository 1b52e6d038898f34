//! Completions onto the used rings, and one guest notification per queue and batch, only
//! where EVENT_IDX says it is needed.

use vhost_user_backend::VringT;
use virtio_queue::QueueT;
use vm_memory::GuestAddressSpace;

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
        // One load of the memory table per batch, not one per completion.
        let Some(mem) = self.mem.as_ref().map(|m| m.memory()) else {
            log::warn!("completions but no guest memory: dropped");
            return false;
        };
        for (local, vring) in vrings.iter().enumerate() {
            if dirty & (1 << local) == 0 {
                continue;
            }
            let mut v = vring.get_mut();
            for c in self
                .done
                .iter()
                .filter(|c| inner.placement[c.queue as usize].1 == local)
            {
                if let Err(e) = v.get_queue_mut().add_used(&*mem, c.head, c.used_len) {
                    log::warn!("queue {}: add_used failed: {e}", c.queue);
                }
            }
            match v.needs_notification() {
                Ok(false) => {}
                Ok(true) | Err(_) => {
                    if let Err(e) = v.signal_used_queue() {
                        log::warn!("cannot signal the guest: {e}");
                    }
                }
            }
        }
        true
    }
}
