//! The vhost-user inflight region (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD) for split virtqueues.
//!
//! # What the region is
//! A shared memory file the backend creates on GET_INFLIGHT_FD ([`InflightRegion::create`]) and
//! the frontend keeps. The frontend never interprets it: after the backend dies it hands the
//! same file to the next backend process with SET_INFLIGHT_FD ([`InflightRegion::map`]), which
//! learns from it which requests the dead process had taken from the avail ring but never
//! returned on the used ring, and resubmits them. The layout is QEMU libvhost-user's for split
//! queues (see [`layout`]): per queue a 16-byte header {features, version, desc_num,
//! last_batch_head, used_idx} and one 16-byte entry per descriptor head {inflight, padding,
//! next, counter}, each queue's part padded to 64 bytes.
//!
//! # Who writes what
//! Only the backend writes it; the frontend only stores it. Each queue's part is written by the
//! one iothread that serves the queue ([`InflightQueue`]):
//! - pop: `counter` of the head, then `inflight = 1` ([`InflightQueue::popped`]), before the
//!   request is submitted;
//! - complete a batch: used elements written, `last_batch_head` stored
//!   ([`InflightQueue::before_publish`]), the used ring's `idx` published (by the caller), then
//!   each head of the batch cleared and `used_idx` set to the published index
//!   ([`InflightQueue::after_publish`]).
//!
//! # Why a crash at any instant is recoverable
//! A `kill -9` loses no store the process made (the pages belong to the file) but can land
//! between any two, so the stores are atomics in the order above, each one that must follow an
//! earlier one a Release store (which keeps the compiler and the CPU from moving earlier
//! stores after it). At every instant the region then says, for the heads popped from the
//! avail ring so far:
//! - not yet marked (crash before `inflight = 1`): the chain is still in the avail ring past
//!   the recovered `next_avail`, and is popped again;
//! - marked, not on the used ring (or on it but `idx` not yet published): marked, resubmitted;
//! - published but not yet cleared: the used ring between the region's `used_idx` and the
//!   ring's `idx` lists it, so [`InflightQueue::recover`] clears it before resubmitting (a batch
//!   publishes many heads with one `idx` store, so `last_batch_head` alone, which
//!   libvhost-user clears, would not be enough; it is still stored for readers that use it);
//! - cleared: done, nothing to do.
//!
//! Popped in avail order, the marked heads number `avail position - used idx`, so recovery's
//! `next_avail = used idx + resubmitted` is exactly where the dead process stopped popping.
//! Recovery's own stores follow the same order, so a crash during recovery is recovered again.

pub mod layout;
mod queue;
mod region;

pub use layout::{queue_region_size, region_size, INFLIGHT_VERSION, MAX_QUEUE_SIZE};
pub use queue::{InflightQueue, Recovery};
pub use region::InflightRegion;

/// Why a region could not be created or mapped.
#[derive(Debug, thiserror::Error)]
pub enum InflightError {
    #[error("inflight queue size {0} is not in 1..={MAX_QUEUE_SIZE}")]
    QueueSize(u16),
    #[error("an inflight region needs at least one queue")]
    NoQueues,
    #[error("memfd_create for the inflight region: {0}")]
    Memfd(std::io::Error),
    #[error("sizing the inflight memfd: {0}")]
    Resize(std::io::Error),
    #[error("sealing the inflight memfd: {0}")]
    Seal(std::io::Error),
    #[error(
        "the inflight fd is not sealed against shrinking (F_SEAL_SHRINK); a shrink would make \
         the mapping fault"
    )]
    NotSealed,
    #[error("fstat of the inflight fd: {0}")]
    Stat(std::io::Error),
    #[error("mmap of the inflight region: {0}")]
    Mmap(std::io::Error),
    #[error("inflight mmap_size {given} is smaller than the {needed} bytes the queues need")]
    TooSmall { needed: u64, given: u64 },
    #[error("inflight mmap_offset {0} is not a multiple of {align}", align = layout::ALIGN)]
    BadOffset(u64),
    #[error(
        "inflight mmap_offset {offset} + mmap_size {size} lies outside the {file_len}-byte file"
    )]
    OutsideFile {
        offset: u64,
        size: u64,
        file_len: u64,
    },
}
