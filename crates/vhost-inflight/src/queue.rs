//! One queue's inflight state: marking popped heads, clearing published ones, recovery.

use std::cell::Cell;
use std::marker::PhantomData;
use std::sync::atomic::Ordering::{Acquire, Relaxed, Release};
use std::sync::atomic::{AtomicU16, AtomicU64, AtomicU8};
use std::sync::Arc;

use crate::layout::{self, entry_offset, INFLIGHT_VERSION};
use crate::region::InflightRegion;

/// What [`InflightQueue::recover`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Recovery {
    /// Heads to submit again before popping, oldest pop first (counter order). They stay
    /// marked: complete them through `before_publish`/`after_publish` as any other.
    pub resubmit: Vec<u16>,
    /// Where to continue popping the avail ring: used idx + `resubmit.len()`.
    pub next_avail: u16,
}

/// One queue's inflight state; owned by the iothread that serves the queue (Send, not Sync).
#[derive(Debug)]
pub struct InflightQueue {
    region: Arc<InflightRegion>,
    /// Byte offset of this queue's header in the region.
    start: usize,
    /// The ring's size: heads are below it, used-ring slots taken mod it.
    size: u16,
    /// The region's queue size: entries this part holds.
    part_size: u16,
    next_counter: u64,
    /// Not Sync: the store order is only meaningful from one thread.
    _not_sync: PhantomData<Cell<()>>,
}

impl InflightQueue {
    pub(crate) fn new(region: Arc<InflightRegion>, start: usize, size: u16) -> Self {
        InflightQueue {
            region,
            start,
            size,
            part_size: size,
            next_counter: 0,
            _not_sync: PhantomData,
        }
    }

    /// Serve a ring of `ring_size` descriptors with this part, which the region sized for
    /// its queue size: a driver may set a smaller ring than the device offered, and its heads
    /// (all below `ring_size`) use the part's first entries, as libvhost-user does. Call
    /// before [`InflightQueue::recover`]; false (and unchanged) for a ring the part cannot
    /// hold, or an empty one.
    pub fn use_ring_size(&mut self, ring_size: u16) -> bool {
        if ring_size == 0 || ring_size > self.part_size {
            return false;
        }
        self.size = ring_size;
        true
    }

    /// Entries this part holds: the region's queue size, the largest ring it can serve.
    pub fn entries(&self) -> u16 {
        self.part_size
    }

    fn header_u16(&self, field: usize) -> &AtomicU16 {
        self.region.u16_at(self.start + field)
    }

    fn entry_inflight(&self, head: u16) -> &AtomicU8 {
        let offset = self.start + entry_offset(head) + layout::ENTRY_INFLIGHT;
        self.region.u8_at(offset)
    }

    fn entry_counter(&self, head: u16) -> &AtomicU64 {
        let offset = self.start + entry_offset(head) + layout::ENTRY_COUNTER;
        self.region.u64_at(offset)
    }

    fn entry_next(&self, head: u16) -> &AtomicU16 {
        let offset = self.start + entry_offset(head) + layout::ENTRY_NEXT;
        self.region.u16_at(offset)
    }

    /// At queue start (after SET_VRING_BASE, before the first pop), with the used ring's idx.
    ///
    /// A fresh queue (version not [`INFLIGHT_VERSION`], or desc_num not the ring size: a new
    /// region, or a driver that set a new size) is initialised and gives no resubmissions.
    /// Otherwise the heads the dead process published but had not cleared yet are cleared:
    /// `used_id_at(slot)` returns the id of the used element at ring slot `slot` (already
    /// reduced mod the queue size, so `0..queue_size`) for the positions between the region's
    /// used_idx and `vring_used_idx` (at most queue size of them), or None when guest memory
    /// cannot be read or the id does not fit a u16 (skipped); ids >= queue size are ignored.
    /// Every head still marked is then returned in counter order, and new pops count on after
    /// the largest counter.
    pub fn recover(
        &mut self,
        vring_used_idx: u16,
        mut used_id_at: impl FnMut(u16) -> Option<u16>,
    ) -> Recovery {
        let version = self.header_u16(layout::VERSION).load(Acquire);
        let desc_num = self.header_u16(layout::DESC_NUM).load(Relaxed);
        if version != INFLIGHT_VERSION || desc_num != self.size {
            self.initialise(vring_used_idx);
            return Recovery {
                resubmit: Vec::new(),
                next_avail: vring_used_idx,
            };
        }

        let recorded = self.header_u16(layout::USED_IDX).load(Relaxed);
        let published = vring_used_idx.wrapping_sub(recorded).min(self.size);
        for back in (1..=published).rev() {
            let slot = vring_used_idx.wrapping_sub(back) % self.size;
            if let Some(head) = used_id_at(slot) {
                self.clear(head);
            }
        }
        // After the clears, as in after_publish: a crash before this store clears them again.
        self.header_u16(layout::USED_IDX)
            .store(vring_used_idx, Release);

        let mut marked = Vec::new();
        for head in 0..self.size {
            match self.entry_inflight(head).load(Relaxed) {
                0 => {}
                1 => marked.push((self.entry_counter(head).load(Relaxed), head)),
                // Not a value we write: a damaged entry, not a request.
                _ => self.entry_inflight(head).store(0, Relaxed),
            }
        }
        marked.sort_unstable();
        self.next_counter = marked
            .last()
            .map_or(0, |&(counter, _)| counter.wrapping_add(1));
        let resubmit: Vec<u16> = marked.into_iter().map(|(_, head)| head).collect();
        Recovery {
            next_avail: vring_used_idx.wrapping_add(resubmit.len() as u16),
            resubmit,
        }
    }

    /// Clears every entry of the part (a larger ring may have used them) and the header, then
    /// stores the version last: a crash part way leaves a region that is still fresh
    /// (version 0), never one that trusts stale entries.
    fn initialise(&mut self, vring_used_idx: u16) {
        self.header_u16(layout::VERSION).store(0, Release);
        for head in 0..self.part_size {
            self.entry_inflight(head).store(0, Relaxed);
            self.entry_next(head).store(0, Relaxed);
            self.entry_counter(head).store(0, Relaxed);
        }
        self.region
            .u64_at(self.start + layout::FEATURES)
            .store(0, Relaxed);
        self.header_u16(layout::LAST_BATCH_HEAD).store(0, Relaxed);
        self.header_u16(layout::USED_IDX)
            .store(vring_used_idx, Relaxed);
        self.header_u16(layout::DESC_NUM).store(self.size, Relaxed);
        self.header_u16(layout::VERSION)
            .store(INFLIGHT_VERSION, Release);
        self.next_counter = 0;
    }

    /// A chain popped from the avail ring: call in pop order, before it is submitted, and not
    /// between a publication and its `after_publish`. Heads >= queue size are ignored.
    pub fn popped(&mut self, head: u16) {
        if head >= self.size {
            return;
        }
        self.store_counter(head);
        self.mark(head);
    }

    fn store_counter(&mut self, head: u16) {
        self.entry_counter(head).store(self.next_counter, Relaxed);
        self.next_counter = self.next_counter.wrapping_add(1);
    }

    fn mark(&self, head: u16) {
        // Release: the counter is in place before the entry counts as in flight.
        self.entry_inflight(head).store(1, Release);
    }

    /// The batch's used elements are written but used->idx is not yet published: record the
    /// last head (for libvhost-user's reading of the region; recovery reads the used ring).
    pub fn before_publish(&mut self, last_head: u16) {
        if last_head < self.size {
            // Release: after every pop of the batch; the caller's Release store of used->idx
            // keeps it before the publication.
            self.header_u16(layout::LAST_BATCH_HEAD)
                .store(last_head, Release);
        }
    }

    /// used->idx was published as `new_used_idx` (that store came first, with Release): clear
    /// each head of the batch, then store used_idx. Heads >= queue size are ignored.
    pub fn after_publish(&mut self, heads: &[u16], new_used_idx: u16) {
        for &head in heads {
            self.clear(head);
        }
        self.store_used_idx(new_used_idx);
    }

    /// Release: a clear must never become visible before the used->idx store that precedes it
    /// (a crash between would lose the request).
    fn clear(&self, head: u16) {
        if head < self.size {
            self.entry_inflight(head).store(0, Release);
        }
    }

    /// Release: after the batch's clears, else a crash between would resubmit published heads.
    fn store_used_idx(&self, new_used_idx: u16) {
        self.header_u16(layout::USED_IDX)
            .store(new_used_idx, Release);
    }

    /// How many entries are marked (for stats and tests; walks the queue's entries).
    pub fn in_flight(&self) -> usize {
        (0..self.size)
            .filter(|&head| self.entry_inflight(head).load(Relaxed) == 1)
            .count()
    }
}

#[cfg(test)]
mod crash_model;
