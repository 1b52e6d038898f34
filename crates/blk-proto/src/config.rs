//! The device's configuration: what we offer the driver (feature bits, config space) and
//! the limits the request parser enforces.

use virtio_bindings::virtio_blk as vb;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

use crate::wire::{CONFIG_SPACE_SIZE, SECTOR_SHIFT, SECTOR_SIZE, VIRTIO_BLK_ID_BYTES, WCE_OFFSET};

/// Largest single read/write accepted by default, and the default discard/write-zeroes limit.
pub const DEFAULT_MAX_TRANSFER_BYTES: u32 = 32 << 20;
/// Default max_discard_sectors / max_write_zeroes_sectors: 32 MiB in 512-byte sectors.
pub const DEFAULT_MAX_DISCARD_SECTORS: u32 = DEFAULT_MAX_TRANSFER_BYTES >> SECTOR_SHIFT;
/// The smallest size_max a config may give: a page (see [`DeviceConfig::validate`]).
pub const SIZE_MAX_MIN: u32 = 4096;
/// Default serial reported by GET_ID.
pub const DEFAULT_SERIAL: &[u8] = b"uringblk";

/// Everything the device tells the driver about itself, and the limits requests are checked
/// against. Sizes are in bytes unless the name says sectors (always 512-byte sectors).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceConfig {
    /// Capacity in 512-byte sectors.
    pub capacity_sectors: u64,
    /// 512 or 4096 (config `blk_size`).
    pub logical_block_size: u32,
    /// >= logical, power of two; config `physical_block_exp` = log2(physical / logical).
    pub physical_block_size: u32,
    /// Bytes; the config field is in logical blocks.
    pub min_io_size: u32,
    /// Bytes; the config field is in logical blocks.
    pub opt_io_size: u32,
    /// Max data segments per request (queue_size - 2).
    pub seg_max: u32,
    /// Largest single read/write accepted.
    pub max_transfer_bytes: u32,
    pub num_queues: u16,
    pub read_only: bool,
    pub discard: bool,
    pub write_zeroes: bool,
    pub max_discard_sectors: u32,
    pub max_discard_seg: u32,
    /// In 512-byte sectors, >= logical_block_size / 512.
    pub discard_sector_alignment: u32,
    pub max_write_zeroes_sectors: u32,
    pub max_write_zeroes_seg: u32,
    pub write_zeroes_may_unmap: bool,
    /// At most 20 bytes.
    pub serial: Vec<u8>,
}

/// Why a [`DeviceConfig`] cannot be offered to a driver.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum ConfigError {
    #[error("capacity is zero (after rounding down to the logical block size)")]
    ZeroCapacity,
    #[error("capacity of {0} sectors is not a multiple of the logical block size")]
    CapacityMisaligned(u64),
    #[error("logical block size {0} is not 512 or 4096")]
    LogicalBlockSize(u32),
    #[error(
        "physical block size {physical} must be a power of two >= the logical block size {logical}"
    )]
    PhysicalBlockSize { physical: u32, logical: u32 },
    #[error("{field} = {value} must be a non-zero multiple of the logical block size {logical}")]
    IoSize {
        field: &'static str,
        value: u32,
        logical: u32,
    },
    #[error("min_io_size {0} bytes does not fit the 16-bit config field (in logical blocks)")]
    MinIoSizeTooLarge(u32),
    #[error("seg_max must be at least 1")]
    ZeroSegMax,
    #[error("max_transfer_bytes {value} must be a non-zero multiple of the logical block size {logical}")]
    MaxTransfer { value: u32, logical: u32 },
    #[error(
        "seg_max {seg_max} segments of at least {min} bytes exceed max_transfer_bytes {max_transfer}: size_max would be {size_max}"
    )]
    SizeMaxTooSmall {
        size_max: u32,
        seg_max: u32,
        max_transfer: u32,
        min: u32,
    },
    #[error("num_queues must be at least 1")]
    ZeroQueues,
    #[error("{field} = {value} must be a non-zero multiple of the logical block size in sectors ({block_sectors})")]
    Sectors {
        field: &'static str,
        value: u32,
        block_sectors: u32,
    },
    #[error("{0} must be at least 1")]
    ZeroSegments(&'static str),
    #[error("serial is {0} bytes, at most 20 allowed")]
    SerialTooLong(usize),
}

impl DeviceConfig {
    /// Sane defaults for a disk of `capacity_bytes` (rounded down to the logical block size).
    pub fn new(
        capacity_bytes: u64,
        logical_block_size: u32,
        num_queues: u16,
        queue_size: u16,
    ) -> Self {
        let lbs = u64::from(logical_block_size.max(1));
        let capacity_bytes = capacity_bytes - capacity_bytes % lbs;
        let block_sectors = (logical_block_size >> SECTOR_SHIFT).max(1);
        DeviceConfig {
            capacity_sectors: capacity_bytes >> SECTOR_SHIFT,
            logical_block_size,
            physical_block_size: logical_block_size,
            min_io_size: logical_block_size,
            opt_io_size: logical_block_size,
            seg_max: u32::from(queue_size.saturating_sub(2)).max(1),
            max_transfer_bytes: DEFAULT_MAX_TRANSFER_BYTES,
            num_queues,
            read_only: false,
            discard: true,
            write_zeroes: true,
            max_discard_sectors: DEFAULT_MAX_DISCARD_SECTORS,
            max_discard_seg: 1,
            discard_sector_alignment: block_sectors,
            max_write_zeroes_sectors: DEFAULT_MAX_DISCARD_SECTORS,
            max_write_zeroes_seg: 1,
            write_zeroes_may_unmap: true,
            serial: DEFAULT_SERIAL.to_vec(),
        }
    }

    /// The largest data segment a driver may send (config `size_max`, offered with
    /// VIRTIO_BLK_F_SIZE_MAX): the largest multiple of the logical block size of which seg_max
    /// segments still fit max_transfer_bytes, so that no request the config allows is
    /// `TooLarge` (Linux takes seg_max * size_max as its largest request).
    pub fn size_max(&self) -> u32 {
        let lbs = self.logical_block_size.max(SECTOR_SIZE);
        let per_segment = self.max_transfer_bytes / self.seg_max.max(1);
        per_segment - per_segment % lbs
    }

    /// The logical block size in 512-byte sectors (1 or 8 for a valid config).
    pub fn block_sectors(&self) -> u32 {
        (self.logical_block_size >> SECTOR_SHIFT).max(1)
    }

    /// Rejects zero/invalid fields: every limit and alignment non-zero (Windows guests crash
    /// on zero config fields), sizes multiples of the logical block, lbs 512|4096, serial
    /// <= 20 bytes, num_queues >= 1, seg_max >= 1, size_max (max_transfer_bytes / seg_max)
    /// at least a page.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let lbs = self.logical_block_size;
        if lbs != 512 && lbs != 4096 {
            return Err(ConfigError::LogicalBlockSize(lbs));
        }
        let block_sectors = lbs / SECTOR_SIZE;
        if self.capacity_sectors == 0 {
            return Err(ConfigError::ZeroCapacity);
        }
        if self.capacity_sectors % u64::from(block_sectors) != 0 {
            return Err(ConfigError::CapacityMisaligned(self.capacity_sectors));
        }
        if !self.physical_block_size.is_power_of_two() || self.physical_block_size < lbs {
            return Err(ConfigError::PhysicalBlockSize {
                physical: self.physical_block_size,
                logical: lbs,
            });
        }
        for (field, value) in [
            ("min_io_size", self.min_io_size),
            ("opt_io_size", self.opt_io_size),
        ] {
            if value == 0 || value % lbs != 0 {
                return Err(ConfigError::IoSize {
                    field,
                    value,
                    logical: lbs,
                });
            }
        }
        if self.min_io_size / lbs > u32::from(u16::MAX) {
            return Err(ConfigError::MinIoSizeTooLarge(self.min_io_size));
        }
        if self.seg_max == 0 {
            return Err(ConfigError::ZeroSegMax);
        }
        if self.max_transfer_bytes == 0 || self.max_transfer_bytes % lbs != 0 {
            return Err(ConfigError::MaxTransfer {
                value: self.max_transfer_bytes,
                logical: lbs,
            });
        }
        // A guest's segments are at least a page: Linux refuses (or raises) a smaller
        // max_segment_size, and would then send requests over max_transfer_bytes.
        let min = SIZE_MAX_MIN.max(lbs);
        if self.size_max() < min {
            return Err(ConfigError::SizeMaxTooSmall {
                size_max: self.size_max(),
                seg_max: self.seg_max,
                max_transfer: self.max_transfer_bytes,
                min,
            });
        }
        if self.num_queues == 0 {
            return Err(ConfigError::ZeroQueues);
        }
        for (field, value) in [
            ("max_discard_sectors", self.max_discard_sectors),
            ("discard_sector_alignment", self.discard_sector_alignment),
            ("max_write_zeroes_sectors", self.max_write_zeroes_sectors),
        ] {
            if value == 0 || value % block_sectors != 0 {
                return Err(ConfigError::Sectors {
                    field,
                    value,
                    block_sectors,
                });
            }
        }
        if self.max_discard_seg == 0 {
            return Err(ConfigError::ZeroSegments("max_discard_seg"));
        }
        if self.max_write_zeroes_seg == 0 {
            return Err(ConfigError::ZeroSegments("max_write_zeroes_seg"));
        }
        if self.serial.len() > VIRTIO_BLK_ID_BYTES {
            return Err(ConfigError::SerialTooLong(self.serial.len()));
        }
        Ok(())
    }

    /// virtio feature bits offered: SIZE_MAX, SEG_MAX, BLK_SIZE, TOPOLOGY, FLUSH, CONFIG_WCE,
    /// MQ, DISCARD (if discard), WRITE_ZEROES (if write_zeroes), RO (if read_only), VERSION_1,
    /// RING_EVENT_IDX, RING_INDIRECT_DESC. Not GEOMETRY; the vhost-user PROTOCOL_FEATURES bit
    /// is added by vhost-server.
    pub fn virtio_features(&self) -> u64 {
        let bit = |b: u32| 1u64 << b;
        let mut features = bit(vb::VIRTIO_BLK_F_SIZE_MAX)
            | bit(vb::VIRTIO_BLK_F_SEG_MAX)
            | bit(vb::VIRTIO_BLK_F_BLK_SIZE)
            | bit(vb::VIRTIO_BLK_F_TOPOLOGY)
            | bit(vb::VIRTIO_BLK_F_FLUSH)
            | bit(vb::VIRTIO_BLK_F_CONFIG_WCE)
            | bit(vb::VIRTIO_BLK_F_MQ)
            | bit(VIRTIO_F_VERSION_1)
            | bit(VIRTIO_RING_F_EVENT_IDX)
            | bit(VIRTIO_RING_F_INDIRECT_DESC);
        if self.discard {
            features |= bit(vb::VIRTIO_BLK_F_DISCARD);
        }
        if self.write_zeroes {
            features |= bit(vb::VIRTIO_BLK_F_WRITE_ZEROES);
        }
        if self.read_only {
            features |= bit(vb::VIRTIO_BLK_F_RO);
        }
        features
    }

    /// The config space bytes (little-endian `virtio_blk_config`, [`CONFIG_SPACE_SIZE`] long)
    /// with `writeback` as the wce byte.
    pub fn config_space(&self, writeback: bool) -> [u8; CONFIG_SPACE_SIZE] {
        let mut space = [0u8; CONFIG_SPACE_SIZE];
        let mut put = |offset: usize, bytes: &[u8]| {
            space[offset..offset + bytes.len()].copy_from_slice(bytes);
        };
        let lbs = self.logical_block_size.max(1);
        put(0, &self.capacity_sectors.to_le_bytes());
        put(8, &self.size_max().to_le_bytes());
        put(12, &self.seg_max.to_le_bytes());
        // 16: geometry stays 0 (VIRTIO_BLK_F_GEOMETRY not offered).
        put(20, &lbs.to_le_bytes());
        let physical_block_exp = (self.physical_block_size / lbs).max(1).ilog2() as u8;
        put(24, &[physical_block_exp]);
        // 25: alignment_offset 0: logical block 0 starts a physical block.
        let min_io_blocks = u16::try_from(self.min_io_size / lbs).unwrap_or(u16::MAX);
        put(26, &min_io_blocks.to_le_bytes());
        put(28, &(self.opt_io_size / lbs).to_le_bytes());
        put(WCE_OFFSET, &[u8::from(writeback)]);
        put(34, &self.num_queues.to_le_bytes());
        put(36, &self.max_discard_sectors.to_le_bytes());
        put(40, &self.max_discard_seg.to_le_bytes());
        put(44, &self.discard_sector_alignment.to_le_bytes());
        put(48, &self.max_write_zeroes_sectors.to_le_bytes());
        put(52, &self.max_write_zeroes_seg.to_le_bytes());
        put(56, &[u8::from(self.write_zeroes_may_unmap)]);
        space
    }

    /// The slice a VHOST_USER_GET_CONFIG(offset, size) returns: empty if the range is not
    /// inside the config space.
    pub fn read_config(&self, writeback: bool, offset: u32, size: u32) -> Vec<u8> {
        let space = self.config_space(writeback);
        let start = offset as usize;
        match start.checked_add(size as usize) {
            Some(end) if end <= CONFIG_SPACE_SIZE => space[start..end].to_vec(),
            _ => Vec::new(),
        }
    }
}

/// A guest's config write: only the wce byte is writable. Returns `Some(new_writeback)` for a
/// 1-byte write at [`WCE_OFFSET`], `None` (ignored and logged) for anything else.
pub fn parse_config_write(offset: u32, data: &[u8]) -> Option<bool> {
    if offset as usize == WCE_OFFSET && data.len() == 1 {
        return Some(data[0] != 0);
    }
    log::warn!(
        "ignoring guest config write of {} bytes at offset {offset}: only wce (offset {WCE_OFFSET}, 1 byte) is writable",
        data.len()
    );
    None
}
