//! The iothread's side of INFLIGHT_SHMFD (the region itself is crate vhost-inflight): per
//! queue the part of the region it owns, the recovery at the queue's start, and the
//! resubmission of what an earlier server left in flight.
//!
//! The session hands a queue its part when the queue starts (kick fd set, ring enabled) and
//! kicks it; the first drain then recovers: the used ring's idx and element ids are read
//! through the region snapshot (bounds-checked), the heads still marked are taken in
//! counter order, next_avail becomes `used idx + resubmitted` (the frontend's base is not
//! trusted, as in libvhost-user) and next_used the used idx. The heads are then walked and
//! parsed again from guest memory like freshly popped chains (drain.rs), before anything new
//! is popped; a malformed one gets its status like any chain.

use blk_proto::GuestRegions;
use vhost_inflight::InflightQueue;

/// One queue's part of the region, as its iothread holds it.
pub(crate) struct QueueInflight {
    pub(crate) part: InflightQueue,
    /// Recovery still to run (at the queue's first drain).
    recovered: bool,
    /// Heads to resubmit, in counter order; `next` is the first not yet resubmitted.
    resubmit: Vec<u16>,
    next: usize,
    /// The region came from an earlier server (SET_INFLIGHT_FD without GET_INFLIGHT_FD on
    /// this connection): its recovery is worth a log line even when nothing was in flight.
    handed_back: bool,
}

impl QueueInflight {
    pub(crate) fn new(part: InflightQueue, handed_back: bool) -> QueueInflight {
        QueueInflight {
            part,
            recovered: false,
            resubmit: Vec::new(),
            next: 0,
            handed_back,
        }
    }

    /// At the queue's first drain: recovers from the region, and sets where the queue goes on.
    /// `used_ring` and `size` are the queue's. Returns (next_avail, next_used), or None when
    /// the used index cannot be read (the ring is outside guest memory: the queue is left as
    /// the frontend set it, and breaks on its own).
    pub(crate) fn recover(
        &mut self,
        regions: &GuestRegions,
        used_ring: u64,
        size: u16,
        queue: u16,
    ) -> Option<(u16, u16)> {
        if self.recovered {
            return None;
        }
        self.recovered = true;
        let Some(used_idx) = read_u16(regions, used_ring.checked_add(2)?) else {
            log::error!(
                "queue {queue}: cannot read its used index at {used_ring:#x}: in-flight \
                 requests of an earlier server are not resubmitted"
            );
            return None;
        };
        let id_at = |slot: u16| {
            let addr = used_ring.checked_add(4 + 8 * u64::from(slot % size.max(1)))?;
            read_u32(regions, addr).and_then(|id| u16::try_from(id).ok())
        };
        let recovery = self.part.recover(used_idx, id_at);
        if self.handed_back || !recovery.resubmit.is_empty() {
            log::info!(
                "queue {queue}: resubmitted {} requests in flight when the last server stopped",
                recovery.resubmit.len()
            );
        }
        self.resubmit = recovery.resubmit;
        self.next = 0;
        Some((recovery.next_avail, used_idx))
    }

    /// The next head to resubmit, if any is left.
    pub(crate) fn next_resubmit(&self) -> Option<u16> {
        self.resubmit.get(self.next).copied()
    }

    /// That head went back to the engine.
    pub(crate) fn resubmitted(&mut self) {
        self.next += 1;
        if self.next == self.resubmit.len() {
            self.resubmit = Vec::new();
            self.next = 0;
        }
    }
}

fn read_u16(regions: &GuestRegions, addr: u64) -> Option<u16> {
    let mut b = [0u8; 2];
    regions.read(addr, &mut b).then(|| u16::from_le_bytes(b))
}

fn read_u32(regions: &GuestRegions, addr: u64) -> Option<u32> {
    let mut b = [0u8; 4];
    regions.read(addr, &mut b).then(|| u32::from_le_bytes(b))
}
