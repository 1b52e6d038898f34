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

/// What the queue's first drain does with its part of the region.
pub(crate) enum Start {
    /// Recovered: the queue goes on from these indexes.
    From { next_avail: u16, next_used: u16 },
    /// Recovered already (or the used index is unreadable: the queue is left as set).
    AsIs,
    /// The part does not fit the queue: drop it, the queue runs untracked.
    Untracked,
}

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

    /// At every drain, before anything is popped: the first one recovers from the region and
    /// says where the queue goes on. `used_ring` and `size` are the queue's.
    pub(crate) fn start(
        &mut self,
        regions: &GuestRegions,
        used_ring: u64,
        size: u16,
        queue: u16,
    ) -> Start {
        if self.recovered {
            return Start::AsIs;
        }
        self.recovered = true;
        // A smaller ring than the region was sized for uses the first entries of its part.
        if !self.part.use_ring_size(size) {
            log::warn!(
                "queue {queue}: its size {size} is larger than the inflight region's {}: its \
                 requests are not tracked for a restart",
                self.part.entries()
            );
            return Start::Untracked;
        }
        let Some(used_idx) = used_ring
            .checked_add(2)
            .and_then(|addr| read_u16(regions, addr))
        else {
            log::error!(
                "queue {queue}: cannot read its used index at {used_ring:#x}: in-flight \
                 requests of an earlier server are not resubmitted"
            );
            return Start::AsIs;
        };
        let id_at = |slot: u16| {
            let addr = used_ring.checked_add(4 + 8 * u64::from(slot % size.max(1)))?;
            read_u32(regions, addr).and_then(|id| u16::try_from(id).ok())
        };
        let marked = self.part.in_flight();
        let recovery = self.part.recover(used_idx, id_at);
        log::debug!(
            "queue {queue}: recovery at used index {used_idx}: {marked} entries marked, {} to \
             resubmit, next avail {}",
            recovery.resubmit.len(),
            recovery.next_avail
        );
        if self.handed_back || !recovery.resubmit.is_empty() {
            log::info!(
                "queue {queue}: resubmitted {} requests in flight when the last server stopped",
                recovery.resubmit.len()
            );
        }
        self.resubmit = recovery.resubmit;
        self.next = 0;
        Start::From {
            next_avail: recovery.next_avail,
            next_used: used_idx,
        }
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
