//! Completions written straight onto a split virtqueue's used ring through a [`GuestRegions`]
//! snapshot: each element one volatile 8-byte write, the used index published once per batch
//! with Release ordering, and the EVENT_IDX decision made from the guest's `used_event`. This
//! is what virtio-queue's `add_used` + `needs_notification` do, without its generic
//! guest-memory lookup per element and one index store per element.
//!
//! The ring must lie inside one memory region and its index must be 2-byte aligned in the host
//! ([`UsedRing::map`] says `None` otherwise; the caller then takes the library's path).

use std::sync::atomic::{AtomicU16, Ordering};

use crate::guest_regions::GuestRegions;

/// Bytes before the first used element: flags (u16) and idx (u16).
const USED_HEADER: u64 = 4;
/// One used element: id (u32) and len (u32).
const USED_ELEMENT: u64 = 8;

/// Where a split virtqueue's used ring (and, for `used_event`, its avail ring) lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UsedRing {
    pub used_ring: u64,
    pub avail_ring: u64,
    pub size: u16,
}

impl UsedRing {
    /// The used ring translated once: `None` when its header and elements are not inside one
    /// region, its index is misaligned in the host, or the queue has no size.
    pub fn map<'r>(&self, regions: &'r GuestRegions) -> Option<MappedUsedRing<'r>> {
        if self.size == 0 {
            return None;
        }
        let bytes = USED_HEADER + USED_ELEMENT * u64::from(self.size);
        let host = regions
            .host(self.used_ring, bytes)
            .filter(|&p| p as usize % 2 == 0)?;
        Some(MappedUsedRing {
            ring: *self,
            regions,
            host,
        })
    }
}

/// A [`UsedRing`] whose header and elements are mapped (see [`UsedRing::map`]).
#[derive(Debug)]
pub struct MappedUsedRing<'r> {
    ring: UsedRing,
    regions: &'r GuestRegions,
    /// Host address of the used ring's flags; idx and elements follow.
    host: *mut u8,
}

impl MappedUsedRing<'_> {
    /// Writes element `position % size` = {id: head, len}. Not visible to the guest until
    /// [`MappedUsedRing::publish`] moves the index past it. False (nothing written) when
    /// `head` is not a descriptor index of this queue.
    pub fn put(&mut self, position: u16, head: u16, len: u32) -> bool {
        if head >= self.ring.size {
            return false;
        }
        let offset = USED_HEADER + USED_ELEMENT * u64::from(position % self.ring.size);
        let mut element = [0u8; 8];
        element[..4].copy_from_slice(&u32::from(head).to_le_bytes());
        element[4..].copy_from_slice(&len.to_le_bytes());
        // SAFETY: map() proved the header and all `size` elements lie in a mapping the
        // snapshot keeps alive, and offset + 8 <= 4 + 8 * size; a byte array needs no
        // alignment, and the write is volatile because the guest shares the page.
        unsafe {
            self.host
                .add(offset as usize)
                .cast::<[u8; 8]>()
                .write_volatile(element)
        };
        true
    }

    /// Makes every element before `next_used` visible: the index store is Release, so the
    /// element writes before it are seen by a guest that reads the index with Acquire.
    pub fn publish(&self, next_used: u16) {
        // SAFETY: the index at host + 2 lies in the range map() proved mapped, and map()
        // checked host (so host + 2) is 2-byte aligned; the guest reads it concurrently,
        // which an atomic store tolerates.
        unsafe { AtomicU16::from_ptr(self.host.add(2).cast::<u16>()) }
            .store(next_used.to_le(), Ordering::Release);
    }

    /// Whether the guest must be notified now that the used index moved from `old` to
    /// `next_used` (after [`MappedUsedRing::publish`]). Without EVENT_IDX: always (as
    /// virtio-queue does). With it: when `used_event` lies in [old, next_used), in the ring's
    /// wrapping index space (the Linux driver's `vring_need_event`); a `used_event` outside
    /// guest memory notifies, since a missed interrupt would hang the guest.
    pub fn needs_notification(&self, event_idx: bool, old: u16, next_used: u16) -> bool {
        if !event_idx {
            return true;
        }
        // The index store above must be ordered before the used_event load (a store-load
        // pair): else the guest could set used_event after our read and sleep unwoken.
        std::sync::atomic::fence(Ordering::SeqCst);
        match self.used_event() {
            Some(event) => needs_event(event, old, next_used),
            None => true,
        }
    }

    /// The guest's `used_event`: the u16 after the avail ring's `size` entries.
    fn used_event(&self) -> Option<u16> {
        let addr = self
            .ring
            .avail_ring
            .checked_add(4 + 2 * u64::from(self.ring.size))?;
        let host = self.regions.host(addr, 2)?;
        if host as usize % 2 != 0 {
            let mut b = [0u8; 2];
            return self
                .regions
                .read(addr, &mut b)
                .then(|| u16::from_le_bytes(b));
        }
        // SAFETY: host() proved [host, host + 2) lies in a mapping the snapshot keeps alive,
        // and it is 2-byte aligned (checked above); the guest writes it concurrently, which an
        // atomic load tolerates.
        let v = unsafe { AtomicU16::from_ptr(host.cast::<u16>()) }.load(Ordering::Relaxed);
        Some(u16::from_le(v))
    }
}

/// virtio's `vring_need_event(event, new, old)`: `event` is in [old, new) modulo 2^16.
pub fn needs_event(event: u16, old: u16, new: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}
