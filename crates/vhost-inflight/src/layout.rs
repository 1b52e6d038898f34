//! Byte layout of the region, as QEMU libvhost-user's `VuVirtqInflight` / `VuDescStateSplit`.
//!
//! Per queue (little-endian, the host's order: the frontend only stores the bytes):
//! ```text
//! 0  features        u64   (reserved, 0)
//! 8  version         u16   (INFLIGHT_VERSION once initialised)
//! 10 desc_num        u16   (the queue size the entries cover)
//! 12 last_batch_head u16
//! 14 used_idx        u16   (used->idx up to which every published head is cleared)
//! 16 desc_num entries of 16 bytes:
//!    0 inflight u8, 1 padding [u8; 5], 6 next u16, 8 counter u64
//! ```
//! each queue's part padded to a multiple of [`ALIGN`] bytes.

/// The version [`crate::InflightQueue::recover`] writes, and the only one it trusts.
pub const INFLIGHT_VERSION: u16 = 1;
/// The largest split virtqueue.
pub const MAX_QUEUE_SIZE: u16 = 32768;
/// Each queue's part starts on this boundary (libvhost-user's INFLIGHT_ALIGNMENT).
pub const ALIGN: u64 = 64;

pub const HEADER_SIZE: u64 = 16;
pub const FEATURES: usize = 0;
pub const VERSION: usize = 8;
pub const DESC_NUM: usize = 10;
pub const LAST_BATCH_HEAD: usize = 12;
pub const USED_IDX: usize = 14;

pub const ENTRY_SIZE: u64 = 16;
pub const ENTRY_INFLIGHT: usize = 0;
pub const ENTRY_NEXT: usize = 6;
pub const ENTRY_COUNTER: usize = 8;

/// Bytes of one queue's part: header and entries, rounded up to [`ALIGN`].
pub fn queue_region_size(queue_size: u16) -> u64 {
    (HEADER_SIZE + ENTRY_SIZE * u64::from(queue_size)).div_ceil(ALIGN) * ALIGN
}

/// Bytes of the whole region (the `mmap_size` of GET_INFLIGHT_FD).
pub fn region_size(num_queues: u16, queue_size: u16) -> u64 {
    u64::from(num_queues) * queue_region_size(queue_size)
}

/// Byte offset of `head`'s entry within its queue's part.
pub(crate) fn entry_offset(head: u16) -> usize {
    HEADER_SIZE as usize + ENTRY_SIZE as usize * usize::from(head)
}
