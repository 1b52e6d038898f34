//! virtio-blk wire constants and the on-the-wire layouts this crate reads.
//!
//! Numbers come from `virtio-bindings` where it defines them; the few that it does not
//! (sector size, config space length, header sizes) are defined here, with a compile-time
//! check against the bindings' `virtio_blk_config` layout.

use virtio_bindings::virtio_blk as vb;

/// log2 of the virtio-blk sector size: request sectors are always 512 bytes.
pub const SECTOR_SHIFT: u32 = 9;
/// The virtio-blk sector size in bytes.
pub const SECTOR_SIZE: u32 = 1 << SECTOR_SHIFT;

pub const VIRTIO_BLK_T_IN: u32 = vb::VIRTIO_BLK_T_IN;
pub const VIRTIO_BLK_T_OUT: u32 = vb::VIRTIO_BLK_T_OUT;
pub const VIRTIO_BLK_T_FLUSH: u32 = vb::VIRTIO_BLK_T_FLUSH;
pub const VIRTIO_BLK_T_GET_ID: u32 = vb::VIRTIO_BLK_T_GET_ID;
pub const VIRTIO_BLK_T_DISCARD: u32 = vb::VIRTIO_BLK_T_DISCARD;
pub const VIRTIO_BLK_T_WRITE_ZEROES: u32 = vb::VIRTIO_BLK_T_WRITE_ZEROES;
/// Legacy barrier flag in the request type; ignored (as QEMU does).
pub const VIRTIO_BLK_T_BARRIER: u32 = vb::VIRTIO_BLK_T_BARRIER;

/// The UNMAP flag of a discard / write-zeroes segment.
pub const VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP: u32 = vb::VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP;

// Status values are one byte on the wire; the bindings give them as u32.
pub const VIRTIO_BLK_S_OK: u8 = vb::VIRTIO_BLK_S_OK as u8;
pub const VIRTIO_BLK_S_IOERR: u8 = vb::VIRTIO_BLK_S_IOERR as u8;
pub const VIRTIO_BLK_S_UNSUPP: u8 = vb::VIRTIO_BLK_S_UNSUPP as u8;

/// Length of the GET_ID answer (the serial), in bytes.
pub const VIRTIO_BLK_ID_BYTES: usize = vb::VIRTIO_BLK_ID_BYTES as usize;

/// Length of the config space we expose: `virtio_blk_config` up to and including
/// `write_zeroes_may_unmap` plus its 3 padding bytes (no secure-erase or zoned fields).
pub const CONFIG_SPACE_SIZE: usize = 60;
/// Offset of the `wce` (writeback cache enable) byte, the only guest-writable field.
pub const WCE_OFFSET: usize = 32;

/// Size of the request header `{u32 type, u32 ioprio, u64 sector}` (virtio_blk_outhdr).
pub const REQUEST_HEADER_SIZE: usize = 16;
/// Size of one discard / write-zeroes segment (virtio_blk_discard_write_zeroes).
pub const RAW_RANGE_SIZE: usize = 16;

// Our offsets must agree with the kernel header as bindgen saw it.
const _: () = {
    assert!(std::mem::offset_of!(vb::virtio_blk_config, wce) == WCE_OFFSET);
    assert!(std::mem::offset_of!(vb::virtio_blk_config, unused1) + 3 == CONFIG_SPACE_SIZE);
    assert!(std::mem::size_of::<vb::virtio_blk_outhdr>() == REQUEST_HEADER_SIZE);
    assert!(std::mem::size_of::<vb::virtio_blk_discard_write_zeroes>() == RAW_RANGE_SIZE);
};

/// One discard / write-zeroes segment as the guest lays it out (16 bytes, little endian).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RawRange {
    pub sector: u64,
    pub num_sectors: u32,
    pub flags: u32,
}

impl RawRange {
    /// Decodes the little-endian wire form.
    pub fn from_le_bytes(bytes: &[u8; RAW_RANGE_SIZE]) -> Self {
        let mut sector = [0u8; 8];
        let mut num_sectors = [0u8; 4];
        let mut flags = [0u8; 4];
        sector.copy_from_slice(&bytes[0..8]);
        num_sectors.copy_from_slice(&bytes[8..12]);
        flags.copy_from_slice(&bytes[12..16]);
        RawRange {
            sector: u64::from_le_bytes(sector),
            num_sectors: u32::from_le_bytes(num_sectors),
            flags: u32::from_le_bytes(flags),
        }
    }

    /// Encodes to the little-endian wire form (tests and clients build payloads with it).
    pub fn to_le_bytes(&self) -> [u8; RAW_RANGE_SIZE] {
        let mut out = [0u8; RAW_RANGE_SIZE];
        out[0..8].copy_from_slice(&self.sector.to_le_bytes());
        out[8..12].copy_from_slice(&self.num_sectors.to_le_bytes());
        out[12..16].copy_from_slice(&self.flags.to_le_bytes());
        out
    }
}

/// The request header `{u32 type, u32 ioprio, u64 sector}`, decoded.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RequestHeader {
    pub request_type: u32,
    pub ioprio: u32,
    pub sector: u64,
}

impl RequestHeader {
    /// Decodes the little-endian wire form.
    pub fn from_le_bytes(bytes: &[u8; REQUEST_HEADER_SIZE]) -> Self {
        let mut request_type = [0u8; 4];
        let mut ioprio = [0u8; 4];
        let mut sector = [0u8; 8];
        request_type.copy_from_slice(&bytes[0..4]);
        ioprio.copy_from_slice(&bytes[4..8]);
        sector.copy_from_slice(&bytes[8..16]);
        RequestHeader {
            request_type: u32::from_le_bytes(request_type),
            ioprio: u32::from_le_bytes(ioprio),
            sector: u64::from_le_bytes(sector),
        }
    }

    /// Encodes to the little-endian wire form.
    pub fn to_le_bytes(&self) -> [u8; REQUEST_HEADER_SIZE] {
        let mut out = [0u8; REQUEST_HEADER_SIZE];
        out[0..4].copy_from_slice(&self.request_type.to_le_bytes());
        out[4..8].copy_from_slice(&self.ioprio.to_le_bytes());
        out[8..16].copy_from_slice(&self.sector.to_le_bytes());
        out
    }
}
