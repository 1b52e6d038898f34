//! virtio-blk protocol for uringblk: wire constants ([`wire`]), the device configuration we
//! offer ([`DeviceConfig`]: feature bits, config space, limits) and the parser that turns a
//! descriptor chain into a validated [`Request`] ([`parse`]). It does no I/O and owns no
//! threads: executing a request is the engine's job. For the server's hot path it also reads
//! the split virtqueue itself ([`split_ring`]) through a snapshot of the guest's memory regions
//! ([`GuestRegions`]), and [`parse_walk`] parses what that walk yields by the same rules.
//!
//! # Rules the parser enforces
//!
//! Chain errors ([`ParseError::status`] is `None`: there is no trustworthy status byte; the
//! chain is returned with used length 0):
//! - the chain must end normally: a bad indirect table, a next index outside the table, a loop
//!   or a chain longer than its table, more than 4 GiB in total, or (walked from the split
//!   ring) more than 1024 descriptors in a queue no larger -> `DescriptorChain`;
//! - every device-readable descriptor precedes every device-writable one
//!   (`ReadableAfterWritable`);
//! - the 16-byte header `{type, ioprio, sector}` is gathered from the start of the readable
//!   part, possibly across descriptors; fewer than 16 readable bytes -> `HeaderTooShort`;
//! - the status is the last byte of the last non-empty writable descriptor; none ->
//!   `NoWritableDescriptor`;
//! - every descriptor lies entirely inside guest memory (`AddressNotInGuestMemory`); nothing
//!   outside it is ever read or pointed at.
//!
//! Request errors (status located; complete at once with [`ParseError::status`]):
//! - type (BARRIER bit ignored) other than IN, OUT, FLUSH, GET_ID, and DISCARD /
//!   WRITE_ZEROES when offered -> UNSUPP;
//! - READ/WRITE: data = writable bytes before the status (read) or readable bytes after the
//!   header (write), any buffer addresses and lengths; the total a multiple of the logical
//!   block size and the sector aligned to it (`Misaligned`), inside the capacity with checked
//!   arithmetic (`SectorOutOfRange`), at most `max_transfer_bytes` (`TooLarge`); writes to a
//!   read-only device -> `ReadOnly`; data in the wrong direction (readable bytes after a read's
//!   header, writable bytes before a write's status) -> `WrongDirection`; all IOERR. A read or
//!   write of no data at all is valid (as in QEMU) and does nothing;
//! - at most seg_max + 2 data segments (non-empty data descriptors), and at most
//!   min([`request::IOV_MAX`], the request's iovec capacity) iovecs after splitting them at
//!   memory-region boundaries -> else `TooManySegments` (IOERR). Splits do not count against
//!   seg_max: where the guest's buffers sit is not the guest's limit;
//! - GET_ID: any writable length; only the first 20 bytes become iovecs;
//! - FLUSH: the sector and any data are ignored;
//! - DISCARD / WRITE_ZEROES: payload = readable bytes after the header, a non-zero multiple
//!   of 16 (`BadDiscardPayload`), at most max_discard_seg / max_write_zeroes_seg segments
//!   (`TooManyRanges`), read-only -> `ReadOnly` (all IOERR); per segment, in QEMU's order:
//!   num_sectors over the max (`RangeTooLarge`), sector or num_sectors not a whole number of
//!   logical blocks (`Misaligned`), past capacity (`SectorOutOfRange`) -> IOERR; flags other
//!   than UNMAP (`UnsupportedFlags`), UNMAP on DISCARD (`UnmapOnDiscard`) -> UNSUPP. A segment
//!   of 0 sectors is valid (as in QEMU) and is left out of `ranges`, so `ranges` may be empty;
//! - zero-length descriptors are skipped; `used_len` is the total length of the writable
//!   descriptors (saturating), whatever the outcome;
//! - `parse` never grows the request's Vecs: what does not fit is an error, not an allocation.

pub mod config;
pub mod drain;
pub mod guest_regions;
pub mod request;
pub mod split_ring;
pub mod used_ring;
pub mod wire;

pub use config::{parse_config_write, ConfigError, DeviceConfig};
pub use drain::{drain, Broken, DrainEnd, DrainSink};
pub use guest_regions::GuestRegions;
pub use request::{parse, parse_walk, ParseError, Range, Request, RequestKind};
pub use split_ring::{ChainError, DescriptorWalk, MappedRing, RingError, SplitRing};
pub use used_ring::{MappedUsedRing, UsedRing};
pub use wire::*;
