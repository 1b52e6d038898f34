//! Descriptor chain -> validated [`Request`].

use std::ops::Deref;

use virtio_queue::DescriptorChain;
use vm_memory::GuestMemory;

use crate::config::DeviceConfig;
use crate::guest_regions::{read_volatile_le128, GuestRegions};
use crate::split_ring::{Descriptor, DescriptorWalk};
use crate::wire::{
    RawRange, RequestHeader, RAW_RANGE_SIZE, REQUEST_HEADER_SIZE, SECTOR_SHIFT, SECTOR_SIZE,
    VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_BARRIER,
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};

/// Linux's IOV_MAX: no single preadv/pwritev takes more segments.
pub const IOV_MAX: usize = 1024;

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

    /// A request sized for `cfg`: two iovecs for each of seg_max + 2 data segments (a buffer
    /// crossing a memory-region boundary takes two) capped at IOV_MAX, and the larger of the
    /// two range limits.
    pub fn for_config(cfg: &DeviceConfig) -> Self {
        let max_iovecs = (cfg.seg_max as usize)
            .saturating_add(2)
            .saturating_mul(2)
            .min(IOV_MAX);
        let max_ranges = cfg.max_discard_seg.max(cfg.max_write_zeroes_seg) as usize;
        Self::with_capacity(max_iovecs, max_ranges)
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
    #[error("more than {max} data segments (or iovecs, after splitting at memory regions)")]
    TooManySegments { max: usize },
    /// A read whose data the device could only read, or a write whose data it could only
    /// write: the data is on the wrong side of the chain.
    #[error("{kind:?} request with {bytes} data bytes in the wrong direction")]
    WrongDirection { kind: RequestKind, bytes: u64 },
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
            | WrongDirection { .. }
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
///
/// `out` never grows: allocate it with [`Request::for_config`] (or with_capacity(seg_max + 2,
/// max(max_discard_seg, max_write_zeroes_seg))); segments beyond its capacity are reported as
/// TooManySegments / TooManyRanges.
///
/// This is the path for virtio-queue's chains (and the reference for [`parse_walk`]); it
/// snapshots the chain's memory regions on every call. Memory behind an IOMMU (no plain
/// physical memory) has no snapshot: every descriptor is then outside guest memory.
pub fn parse<M>(
    mut chain: DescriptorChain<M>,
    cfg: &DeviceConfig,
    out: &mut Request,
) -> Result<(), ParseError>
where
    M: Deref,
    M::Target: GuestMemory,
{
    let regions = match chain.memory().physical_memory() {
        // SAFETY: `chain` owns (or borrows) the memory for the whole call, and neither the
        // snapshot nor a pointer from it outlives the call... except the pointers in `out`,
        // which the caller may only use while it keeps that memory alive, as before.
        Some(physical) => unsafe { GuestRegions::borrowed(physical) },
        None => GuestRegions::empty(),
    };
    // virtio-queue's iterator ends silently on a bad indirect table, an out-of-table next
    // index, a loop (more descriptors than the table holds) or a chain over 4 GiB; the
    // core's "last descriptor announced a successor" test catches each of them.
    parse_descriptors(&regions, cfg, out, || {
        Ok(chain.next().map(Descriptor::from))
    })
}

/// [`parse`] over a chain walked straight from the split ring (the server's path): the same
/// rules, the same results, without virtio-queue's per-descriptor costs. A malformed chain is
/// `DescriptorChain`; `walk.error()` then says why.
pub fn parse_walk(
    walk: &mut DescriptorWalk<'_>,
    cfg: &DeviceConfig,
    out: &mut Request,
) -> Result<(), ParseError> {
    let regions = walk.regions();
    parse_descriptors(regions, cfg, out, || {
        walk.next_descriptor()
            .map_err(|_| ParseError::DescriptorChain)
    })
}

/// The parser proper: feeds the chain's descriptors, in order, through the rules.
fn parse_descriptors(
    regions: &GuestRegions,
    cfg: &DeviceConfig,
    out: &mut Request,
    mut next: impl FnMut() -> Result<Option<Descriptor>, ParseError>,
) -> Result<(), ParseError> {
    out.clear();
    let mut state = ParseState::new(cfg, out);
    let mut last_had_next = false;
    let mut yielded_any = false;
    while let Some(desc) = next()? {
        yielded_any = true;
        last_had_next = desc.has_next();
        state.descriptor(regions, desc, out)?;
    }
    if !yielded_any || last_had_next {
        return Err(ParseError::DescriptorChain);
    }
    state.finish(regions, out)
}

/// Where the header type puts each byte of the payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Decoded {
    Kind(RequestKind),
    Unsupported(u32),
}

/// The walk over one chain: descriptors arrive in order, readable ones first.
struct ParseState<'c> {
    cfg: &'c DeviceConfig,
    header: [u8; REQUEST_HEADER_SIZE],
    header_filled: usize,
    decoded: Option<Decoded>,
    seen_writable: bool,
    /// The latest non-empty writable descriptor (guest address, length, host address or null
    /// if it spans regions): its last byte is the status, unless a later writable descriptor
    /// arrives, which makes it all data.
    pending_writable: Option<(u64, u32, *mut u8)>,
    /// Data segments (descriptors carrying data) allowed: seg_max + 2.
    max_segments: usize,
    segments: usize,
    /// iovecs allowed once segments are split at region boundaries: what `out` holds, at
    /// most IOV_MAX.
    max_iovecs: usize,
    segments_overflow: bool,
    /// The limit that overflowed (for the error).
    overflowed_limit: usize,
    /// Data bytes a read carried device-readable, or a write device-writable.
    wrong_direction_bytes: u64,
    /// GET_ID bytes still wanted: only the first 20 writable bytes are kept as iovecs.
    id_bytes_left: u32,
    /// Discard / write-zeroes payload.
    payload_len: u64,
    range_buf: [u8; RAW_RANGE_SIZE],
    range_filled: usize,
    range_count: u64,
    max_ranges: u32,
    range_error: Option<ParseError>,
}

impl<'c> ParseState<'c> {
    fn new(cfg: &'c DeviceConfig, out: &Request) -> Self {
        let max_segments = (cfg.seg_max as usize).saturating_add(2);
        let max_iovecs = IOV_MAX.min(out.iovecs.capacity());
        ParseState {
            cfg,
            header: [0; REQUEST_HEADER_SIZE],
            header_filled: 0,
            decoded: None,
            seen_writable: false,
            pending_writable: None,
            max_segments,
            segments: 0,
            max_iovecs,
            segments_overflow: false,
            overflowed_limit: 0,
            wrong_direction_bytes: 0,
            id_bytes_left: VIRTIO_BLK_ID_BYTES as u32,
            payload_len: 0,
            range_buf: [0; RAW_RANGE_SIZE],
            range_filled: 0,
            range_count: 0,
            max_ranges: 0,
            range_error: None,
        }
    }

    fn descriptor(
        &mut self,
        regions: &GuestRegions,
        desc: Descriptor,
        out: &mut Request,
    ) -> Result<(), ParseError> {
        let (addr, len) = (desc.addr, desc.len);
        if len == 0 {
            return Ok(());
        }
        // Common case: the descriptor lies inside one region, and this one lookup maps it
        // for the header, the data and the status byte. Null: it spans regions (slow path).
        let host = regions
            .host(addr, u64::from(len))
            .unwrap_or(std::ptr::null_mut());
        if host.is_null() && !regions.contains(addr, u64::from(len)) {
            return Err(not_in_memory(addr, len));
        }
        if desc.is_write_only() {
            self.writable(regions, addr, len, host, out)
        } else {
            self.readable(regions, addr, len, host, out)
        }
    }

    /// A device-readable descriptor; `host` maps all of it, or is null if it spans regions.
    fn readable(
        &mut self,
        regions: &GuestRegions,
        addr: u64,
        len: u32,
        host: *mut u8,
        out: &mut Request,
    ) -> Result<(), ParseError> {
        if self.seen_writable {
            return Err(ParseError::ReadableAfterWritable);
        }
        let mut offset = 0u32;
        if self.header_filled < REQUEST_HEADER_SIZE {
            let take = (REQUEST_HEADER_SIZE - self.header_filled).min(len as usize);
            match host {
                // The usual case, the whole header in one descriptor: one 16-byte read.
                src if !src.is_null() && take == REQUEST_HEADER_SIZE => {
                    // SAFETY: take <= len, so [src, src+16) lies in the mapped descriptor.
                    self.header = unsafe { read_volatile_le128(src) }.to_le_bytes();
                }
                src if !src.is_null() => {
                    for i in 0..take {
                        // SAFETY: take <= len: [src, src+take) lies in the mapped descriptor.
                        self.header[self.header_filled + i] = unsafe { src.add(i).read_volatile() };
                    }
                }
                _ => {
                    let dst = &mut self.header[self.header_filled..self.header_filled + take];
                    if !regions.read(addr, dst) {
                        return Err(not_in_memory(addr, len));
                    }
                }
            }
            self.header_filled += take;
            offset = take as u32;
            if self.header_filled == REQUEST_HEADER_SIZE {
                self.decode_header(out);
            }
        }
        if offset == len {
            return Ok(());
        }
        // `offset < len`, and the whole descriptor is in memory: no overflow.
        let rest_addr = addr + u64::from(offset);
        let rest_len = len - offset;
        match self.decoded {
            Some(Decoded::Kind(RequestKind::Write)) => {
                let rest_host = if host.is_null() {
                    host
                } else {
                    // SAFETY: offset < len: still inside the mapped descriptor.
                    unsafe { host.add(offset as usize) }
                };
                self.push_data(regions, rest_addr, rest_len, rest_host, out)
            }
            Some(Decoded::Kind(RequestKind::Discard | RequestKind::WriteZeroes)) => {
                self.range_payload(regions, rest_addr, rest_len, out)
            }
            // A read's data must be device-writable: these bytes would be "read" into memory
            // the device may not write (QEMU ignores them and answers OK; the guest would
            // believe data arrived that never did).
            Some(Decoded::Kind(RequestKind::Read)) => {
                self.wrong_direction_bytes += u64::from(rest_len);
                Ok(())
            }
            // Readable payload means nothing to the other types.
            _ => Ok(()),
        }
    }

    /// A device-writable descriptor; `host` as for readable().
    fn writable(
        &mut self,
        regions: &GuestRegions,
        addr: u64,
        len: u32,
        host: *mut u8,
        out: &mut Request,
    ) -> Result<(), ParseError> {
        if self.header_filled < REQUEST_HEADER_SIZE {
            return Err(ParseError::HeaderTooShort(self.header_filled as u32));
        }
        self.seen_writable = true;
        out.used_len = out.used_len.saturating_add(len);
        if let Some((prev_addr, prev_len, prev_host)) =
            self.pending_writable.replace((addr, len, host))
        {
            self.writable_data(regions, prev_addr, prev_len, prev_host, out)?;
        }
        Ok(())
    }

    fn writable_data(
        &mut self,
        regions: &GuestRegions,
        addr: u64,
        len: u32,
        host: *mut u8,
        out: &mut Request,
    ) -> Result<(), ParseError> {
        match self.decoded {
            Some(Decoded::Kind(RequestKind::Read)) => self.push_data(regions, addr, len, host, out),
            Some(Decoded::Kind(RequestKind::GetId)) => {
                let take = len.min(self.id_bytes_left);
                self.id_bytes_left -= take;
                if take == 0 {
                    return Ok(());
                }
                self.push_data(regions, addr, take, host, out)
            }
            // A write's data must be device-readable: writable bytes before the status would
            // be written from memory the guest gave the device to fill.
            Some(Decoded::Kind(RequestKind::Write)) => {
                self.wrong_direction_bytes += u64::from(len);
                Ok(())
            }
            // Writable bytes before the status mean nothing to the other types.
            _ => Ok(()),
        }
    }

    fn decode_header(&mut self, out: &mut Request) {
        let header = RequestHeader::from_le_bytes(&self.header);
        out.sector = header.sector;
        let request_type = header.request_type & !VIRTIO_BLK_T_BARRIER;
        let decoded = match request_type {
            VIRTIO_BLK_T_IN => Decoded::Kind(RequestKind::Read),
            VIRTIO_BLK_T_OUT => Decoded::Kind(RequestKind::Write),
            VIRTIO_BLK_T_FLUSH => Decoded::Kind(RequestKind::Flush),
            VIRTIO_BLK_T_GET_ID => Decoded::Kind(RequestKind::GetId),
            VIRTIO_BLK_T_DISCARD if self.cfg.discard => {
                self.max_ranges = self.cfg.max_discard_seg;
                Decoded::Kind(RequestKind::Discard)
            }
            VIRTIO_BLK_T_WRITE_ZEROES if self.cfg.write_zeroes => {
                self.max_ranges = self.cfg.max_write_zeroes_seg;
                Decoded::Kind(RequestKind::WriteZeroes)
            }
            other => Decoded::Unsupported(other),
        };
        if let Decoded::Kind(kind) = decoded {
            out.kind = kind;
        }
        // Never hold more ranges than `out` can take without reallocating.
        let capacity = u32::try_from(out.ranges.capacity()).unwrap_or(u32::MAX);
        self.max_ranges = self.max_ranges.min(capacity);
        self.decoded = Some(decoded);
    }

    /// Appends the host view of guest range [addr, addr+len) to `out.iovecs`, one iovec per
    /// memory region it touches. `host` maps the whole range, or is null if it spans regions.
    fn push_data(
        &mut self,
        regions: &GuestRegions,
        addr: u64,
        len: u32,
        host: *mut u8,
        out: &mut Request,
    ) -> Result<(), ParseError> {
        out.data_len = out.data_len.saturating_add(len);
        if self.segments_overflow {
            return Ok(());
        }
        if len == 0 {
            return Ok(());
        }
        // seg_max counts the guest's segments; how memory regions split them is the host's
        // business (up to what one preadv takes), so a request the config allows is not
        // refused for where its buffers happen to sit.
        self.segments += 1;
        if self.segments > self.max_segments {
            self.segments_overflow = true;
            self.overflowed_limit = self.max_segments;
            return Ok(());
        }
        if !host.is_null() {
            if out.iovecs.len() >= self.max_iovecs {
                self.segments_overflow = true;
                self.overflowed_limit = self.max_iovecs;
                return Ok(());
            }
            out.iovecs.push(libc::iovec {
                iov_base: host.cast(),
                iov_len: len as usize,
            });
            return Ok(());
        }
        for piece in regions.pieces(addr, u64::from(len)) {
            let (base, piece_len) = piece.ok_or_else(|| not_in_memory(addr, len))?;
            if out.iovecs.len() >= self.max_iovecs {
                self.segments_overflow = true;
                self.overflowed_limit = self.max_iovecs;
                return Ok(());
            }
            out.iovecs.push(libc::iovec {
                iov_base: base.cast(),
                iov_len: piece_len,
            });
        }
        Ok(())
    }

    /// Feeds discard / write-zeroes payload bytes: whole 16-byte segments are decoded and
    /// validated as they complete; bytes past the allowed segment count are only counted.
    fn range_payload(
        &mut self,
        regions: &GuestRegions,
        addr: u64,
        len: u32,
        out: &mut Request,
    ) -> Result<(), ParseError> {
        let wanted_bytes = u64::from(self.max_ranges) * RAW_RANGE_SIZE as u64;
        let mut offset = 0u64;
        let len = u64::from(len);
        while offset < len && self.payload_len < wanted_bytes {
            let take = ((RAW_RANGE_SIZE - self.range_filled) as u64).min(len - offset) as usize;
            let dst = &mut self.range_buf[self.range_filled..self.range_filled + take];
            // addr + offset stays inside the descriptor, which is inside guest memory.
            if !regions.read(addr + offset, dst) {
                return Err(not_in_memory(addr, len as u32));
            }
            self.range_filled += take;
            self.payload_len += take as u64;
            offset += take as u64;
            if self.range_filled == RAW_RANGE_SIZE {
                self.range_filled = 0;
                self.range_count += 1;
                let raw = RawRange::from_le_bytes(&self.range_buf);
                self.range(raw, out);
            }
        }
        self.payload_len += len - offset;
        Ok(())
    }

    fn range(&mut self, raw: RawRange, out: &mut Request) {
        if self.range_error.is_some() {
            return;
        }
        let is_write_zeroes = out.kind == RequestKind::WriteZeroes;
        match validate_range(raw, is_write_zeroes, self.cfg) {
            // A zero-length segment is valid (as in QEMU) and does nothing: drop it so the
            // executor never issues a zero-length discard.
            Ok(range) if range.num_sectors == 0 => {}
            // max_ranges <= capacity, so this push never reallocates.
            Ok(range) => out.ranges.push(range),
            Err(e) => self.range_error = Some(e),
        }
    }

    fn finish(&mut self, regions: &GuestRegions, out: &mut Request) -> Result<(), ParseError> {
        if self.header_filled < REQUEST_HEADER_SIZE {
            return Err(ParseError::HeaderTooShort(self.header_filled as u32));
        }
        let Some((addr, len, host)) = self.pending_writable else {
            return Err(ParseError::NoWritableDescriptor);
        };
        // len >= 1: empty descriptors never become pending; inside memory: no overflow.
        let status_addr = addr + u64::from(len - 1);
        self.writable_data(regions, addr, len - 1, host, out)?;
        out.status = if host.is_null() {
            regions
                .host(status_addr, 1)
                .ok_or_else(|| not_in_memory(status_addr, 1))?
        } else {
            // SAFETY: len >= 1 bytes are mapped at host: the last one is too.
            unsafe { host.add(len as usize - 1) }
        };
        self.validate(out)
    }

    /// The request-level rules, checked once the status byte is known.
    fn validate(&self, out: &Request) -> Result<(), ParseError> {
        let cfg = self.cfg;
        let kind = match self.decoded {
            Some(Decoded::Kind(kind)) => kind,
            Some(Decoded::Unsupported(t)) => return Err(ParseError::UnsupportedType(t)),
            None => return Err(ParseError::HeaderTooShort(self.header_filled as u32)),
        };
        match kind {
            RequestKind::Read | RequestKind::Write => {
                if kind == RequestKind::Write && cfg.read_only {
                    return Err(ParseError::ReadOnly);
                }
                if self.wrong_direction_bytes != 0 {
                    return Err(ParseError::WrongDirection {
                        kind,
                        bytes: self.wrong_direction_bytes,
                    });
                }
                if self.segments_overflow {
                    return Err(ParseError::TooManySegments {
                        max: self.overflowed_limit,
                    });
                }
                let block_size = cfg.logical_block_size.max(SECTOR_SIZE);
                if out.data_len % block_size != 0
                    || out.sector % u64::from(cfg.block_sectors()) != 0
                {
                    return Err(ParseError::Misaligned {
                        sector: out.sector,
                        len: u64::from(out.data_len),
                        block_size,
                    });
                }
                let num_sectors = u64::from(out.data_len >> SECTOR_SHIFT);
                check_in_capacity(out.sector, num_sectors, cfg)?;
                if out.data_len > cfg.max_transfer_bytes {
                    return Err(ParseError::TooLarge {
                        len: out.data_len,
                        max: cfg.max_transfer_bytes,
                    });
                }
                Ok(())
            }
            RequestKind::Flush => Ok(()),
            RequestKind::GetId => {
                if self.segments_overflow {
                    return Err(ParseError::TooManySegments {
                        max: self.overflowed_limit,
                    });
                }
                Ok(())
            }
            RequestKind::Discard | RequestKind::WriteZeroes => {
                if cfg.read_only {
                    return Err(ParseError::ReadOnly);
                }
                let payload_len = u32::try_from(self.payload_len).unwrap_or(u32::MAX);
                if self.payload_len == 0 || self.payload_len % RAW_RANGE_SIZE as u64 != 0 {
                    return Err(ParseError::BadDiscardPayload(payload_len));
                }
                let count = self.payload_len / RAW_RANGE_SIZE as u64;
                if count > u64::from(self.max_ranges) {
                    return Err(ParseError::TooManyRanges {
                        count,
                        max: self.max_ranges,
                    });
                }
                match &self.range_error {
                    Some(e) => Err(e.clone()),
                    None => Ok(()),
                }
            }
        }
    }
}

/// One discard / write-zeroes segment against the device limits, in QEMU's order: size,
/// alignment and range (IOERR) before flags (UNSUPP).
fn validate_range(
    raw: RawRange,
    is_write_zeroes: bool,
    cfg: &DeviceConfig,
) -> Result<Range, ParseError> {
    let max_sectors = if is_write_zeroes {
        cfg.max_write_zeroes_sectors
    } else {
        cfg.max_discard_sectors
    };
    if raw.num_sectors > max_sectors {
        return Err(ParseError::RangeTooLarge {
            num_sectors: raw.num_sectors,
            max: max_sectors,
        });
    }
    let block_sectors = u64::from(cfg.block_sectors());
    if raw.sector % block_sectors != 0 || u64::from(raw.num_sectors) % block_sectors != 0 {
        return Err(ParseError::Misaligned {
            sector: raw.sector,
            len: u64::from(raw.num_sectors) << SECTOR_SHIFT,
            block_size: cfg.logical_block_size,
        });
    }
    check_in_capacity(raw.sector, u64::from(raw.num_sectors), cfg)?;
    if raw.flags & !VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0 {
        return Err(ParseError::UnsupportedFlags(raw.flags));
    }
    let unmap = raw.flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0;
    if unmap && !is_write_zeroes {
        return Err(ParseError::UnmapOnDiscard);
    }
    Ok(Range {
        sector: raw.sector,
        num_sectors: raw.num_sectors,
        unmap,
    })
}

fn check_in_capacity(sector: u64, num_sectors: u64, cfg: &DeviceConfig) -> Result<(), ParseError> {
    match sector.checked_add(num_sectors) {
        Some(end) if end <= cfg.capacity_sectors => Ok(()),
        _ => Err(ParseError::SectorOutOfRange {
            sector,
            num_sectors,
            capacity_sectors: cfg.capacity_sectors,
        }),
    }
}

fn not_in_memory(addr: u64, len: u32) -> ParseError {
    ParseError::AddressNotInGuestMemory { addr, len }
}
