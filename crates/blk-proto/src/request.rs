//! Descriptor chain -> validated [`Request`].

use std::ops::Deref;

use virtio_queue::DescriptorChain;
use vm_memory::GuestMemory;

use crate::config::DeviceConfig;
use crate::wire::{VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_UNSUPP};

/// What a request asks the device to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestKind {
    Read,
    Write,
    Flush,
    GetId,
    Discard,
    WriteZeroes,
}

/// One validated discard / write-zeroes segment, in 512-byte sectors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Range {
    pub sector: u64,
    pub num_sectors: u32,
    /// WRITE_ZEROES with the UNMAP flag: the device may punch a hole.
    pub unmap: bool,
}

/// A validated request, ready to execute. Reused across requests: `clear()` keeps the Vecs'
/// capacity so the hot path does not allocate.
#[derive(Debug)]
pub struct Request {
    pub kind: RequestKind,
    /// First 512-byte sector (Read/Write).
    pub sector: u64,
    /// Host addresses of the data buffers, in order (Read/Write/GetId).
    pub iovecs: Vec<libc::iovec>,
    /// Sum of the iovecs' lengths.
    pub data_len: u32,
    /// Discard/WriteZeroes segments, validated.
    pub ranges: Vec<Range>,
    /// Host address of the status byte (null until located).
    pub status: *mut u8,
    /// Total length of the chain's device-writable descriptors (what add_used gets), saturating.
    pub used_len: u32,
}

// SAFETY: the raw pointers in `iovecs` and `status` point into guest memory mapped for the
// whole lifetime of the device; a Request is only moved between threads as part of the owning
// iothread's state, and only that thread dereferences the pointers.
unsafe impl Send for Request {}

impl Request {
    /// A request whose Vecs can hold `max_iovecs` data segments and `max_ranges` segments
    /// without reallocating; parse never grows them beyond that.
    pub fn with_capacity(max_iovecs: usize, max_ranges: usize) -> Self {
        Request {
            kind: RequestKind::Flush,
            sector: 0,
            iovecs: Vec::with_capacity(max_iovecs),
            data_len: 0,
            ranges: Vec::with_capacity(max_ranges),
            status: std::ptr::null_mut(),
            used_len: 0,
        }
    }

    /// Resets every field, keeping the Vecs' capacity.
    pub fn clear(&mut self) {
        self.kind = RequestKind::Flush;
        self.sector = 0;
        self.iovecs.clear();
        self.data_len = 0;
        self.ranges.clear();
        self.status = std::ptr::null_mut();
        self.used_len = 0;
    }
}

/// Why a chain cannot be executed. Chain errors (status() == None) leave no usable status
/// byte: complete the chain with used len 0. Request errors (status() == Some) have located
/// the status byte: complete at once with that status.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum ParseError {
    // --- chain errors ---
    /// The descriptor chain ended abnormally: an invalid indirect table, a next index out of
    /// the table, a loop / chain longer than the queue, more than 4 GiB in total, or a
    /// descriptor that could not be read.
    #[error("malformed descriptor chain (bad indirect table, loop, bad next index or over 4 GiB)")]
    DescriptorChain,
    #[error("request header too short: {0} readable bytes, 16 needed")]
    HeaderTooShort(u32),
    #[error("no device-writable byte for the status")]
    NoWritableDescriptor,
    #[error("device-readable descriptor after a device-writable one")]
    ReadableAfterWritable,
    #[error("descriptor [{addr:#x}, +{len}) is not inside guest memory")]
    AddressNotInGuestMemory { addr: u64, len: u32 },

    // --- request errors, UNSUPP ---
    #[error("unsupported request type {0:#x}")]
    UnsupportedType(u32),
    #[error("unsupported discard/write-zeroes flags {0:#x}")]
    UnsupportedFlags(u32),
    #[error("UNMAP flag on a DISCARD segment")]
    UnmapOnDiscard,

    // --- request errors, IOERR ---
    #[error("sectors [{sector}, +{num_sectors}) past capacity {capacity_sectors}")]
    SectorOutOfRange {
        sector: u64,
        num_sectors: u64,
        capacity_sectors: u64,
    },
    #[error(
        "sector {sector} / length {len} bytes not aligned to the logical block size {block_size}"
    )]
    Misaligned {
        sector: u64,
        len: u64,
        block_size: u32,
    },
    #[error("transfer of {len} bytes exceeds the maximum {max}")]
    TooLarge { len: u32, max: u32 },
    #[error("more than {max} data segments")]
    TooManySegments { max: usize },
    #[error("write to a read-only device")]
    ReadOnly,
    #[error("discard/write-zeroes payload of {0} bytes is not a non-zero multiple of 16")]
    BadDiscardPayload(u32),
    #[error("{count} discard/write-zeroes segments, at most {max}")]
    TooManyRanges { count: u64, max: u32 },
    #[error("segment of {num_sectors} sectors exceeds the maximum {max}")]
    RangeTooLarge { num_sectors: u32, max: u32 },
}

impl ParseError {
    /// The status to complete with, or None for a chain too malformed to carry a status byte.
    pub fn status(&self) -> Option<u8> {
        use ParseError::*;
        match self {
            DescriptorChain
            | HeaderTooShort(_)
            | NoWritableDescriptor
            | ReadableAfterWritable
            | AddressNotInGuestMemory { .. } => None,
            UnsupportedType(_) | UnsupportedFlags(_) | UnmapOnDiscard => Some(VIRTIO_BLK_S_UNSUPP),
            SectorOutOfRange { .. }
            | Misaligned { .. }
            | TooLarge { .. }
            | TooManySegments { .. }
            | ReadOnly
            | BadDiscardPayload(_)
            | TooManyRanges { .. }
            | RangeTooLarge { .. } => Some(VIRTIO_BLK_S_IOERR),
        }
    }
}

/// Parses one descriptor chain into `out` (cleared first), validating it against `cfg`.
/// On Ok, `out` is a validated request. On Err(e) with e.status() == Some(s), `out.status` and
/// `out.used_len` are valid and the caller completes the chain with status s at once.
pub fn parse<M>(
    chain: DescriptorChain<M>,
    cfg: &DeviceConfig,
    out: &mut Request,
) -> Result<(), ParseError>
where
    M: Deref,
    M::Target: GuestMemory,
{
    // Stub: the real parser lands next.
    let _ = (chain, cfg);
    out.clear();
    Err(ParseError::DescriptorChain)
}
