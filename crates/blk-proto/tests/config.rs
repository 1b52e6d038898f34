//! DeviceConfig: defaults, validation, feature bits, config space bytes, config writes.

use blk_proto::{parse_config_write, ConfigError, DeviceConfig, CONFIG_SPACE_SIZE, WCE_OFFSET};
use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

const MIB: u64 = 1 << 20;

#[test]
fn new_gives_sane_defaults() {
    let cfg = DeviceConfig::new(64 * MIB, 512, 2, 256);
    assert_eq!(
        cfg,
        DeviceConfig {
            capacity_sectors: 131072,
            logical_block_size: 512,
            physical_block_size: 512,
            min_io_size: 512,
            opt_io_size: 512,
            seg_max: 254,
            max_transfer_bytes: 32 << 20,
            num_queues: 2,
            read_only: false,
            discard: true,
            write_zeroes: true,
            max_discard_sectors: 65536,
            max_discard_seg: 1,
            discard_sector_alignment: 1,
            max_write_zeroes_sectors: 65536,
            max_write_zeroes_seg: 1,
            write_zeroes_may_unmap: true,
            serial: b"uringblk".to_vec(),
        }
    );
    assert_eq!(cfg.validate(), Ok(()));

    let cfg = DeviceConfig::new(64 * MIB, 4096, 1, 128);
    assert_eq!(cfg.discard_sector_alignment, 8);
    assert_eq!(cfg.min_io_size, 4096);
    assert_eq!(cfg.opt_io_size, 4096);
    assert_eq!(cfg.physical_block_size, 4096);
    assert_eq!(cfg.seg_max, 126);
    assert_eq!(cfg.validate(), Ok(()));
}

#[test]
fn new_rounds_capacity_down_to_the_logical_block() {
    assert_eq!(
        DeviceConfig::new(MIB + 1000, 512, 1, 256).capacity_sectors,
        2049
    );
    assert_eq!(
        DeviceConfig::new(MIB + 1000, 4096, 1, 256).capacity_sectors,
        2048
    );
    assert_eq!(
        DeviceConfig::new(MIB + 4095, 4096, 1, 256).capacity_sectors,
        2048
    );
}

#[test]
fn new_keeps_seg_max_at_least_one_for_tiny_queues() {
    for queue_size in [0u16, 1, 2, 3] {
        let cfg = DeviceConfig::new(MIB, 512, 1, queue_size);
        assert_eq!(cfg.seg_max, u32::from(queue_size.saturating_sub(2)).max(1));
        assert!(cfg.seg_max >= 1);
    }
}

#[test]
fn validate_rejects_each_bad_field() {
    let base = DeviceConfig::new(64 * MIB, 4096, 1, 256);
    assert_eq!(base.validate(), Ok(()));
    type Mutation = fn(&mut DeviceConfig);
    let cases: Vec<(Mutation, ConfigError)> = vec![
        (
            |c| c.logical_block_size = 1024,
            ConfigError::LogicalBlockSize(1024),
        ),
        (
            |c| c.logical_block_size = 0,
            ConfigError::LogicalBlockSize(0),
        ),
        (|c| c.capacity_sectors = 0, ConfigError::ZeroCapacity),
        (
            |c| c.capacity_sectors = 9,
            ConfigError::CapacityMisaligned(9),
        ),
        (
            |c| c.physical_block_size = 12288,
            ConfigError::PhysicalBlockSize {
                physical: 12288,
                logical: 4096,
            },
        ),
        (
            |c| c.physical_block_size = 512,
            ConfigError::PhysicalBlockSize {
                physical: 512,
                logical: 4096,
            },
        ),
        (
            |c| c.min_io_size = 0,
            ConfigError::IoSize {
                field: "min_io_size",
                value: 0,
                logical: 4096,
            },
        ),
        (
            |c| c.min_io_size = 512,
            ConfigError::IoSize {
                field: "min_io_size",
                value: 512,
                logical: 4096,
            },
        ),
        (
            |c| c.min_io_size = 4096 * 65536,
            ConfigError::MinIoSizeTooLarge(4096 * 65536),
        ),
        (
            |c| c.opt_io_size = 0,
            ConfigError::IoSize {
                field: "opt_io_size",
                value: 0,
                logical: 4096,
            },
        ),
        (
            |c| c.opt_io_size = 6000,
            ConfigError::IoSize {
                field: "opt_io_size",
                value: 6000,
                logical: 4096,
            },
        ),
        (|c| c.seg_max = 0, ConfigError::ZeroSegMax),
        (
            |c| c.max_transfer_bytes = 0,
            ConfigError::MaxTransfer {
                value: 0,
                logical: 4096,
            },
        ),
        (
            |c| c.max_transfer_bytes = 512,
            ConfigError::MaxTransfer {
                value: 512,
                logical: 4096,
            },
        ),
        (
            |c| c.max_transfer_bytes = 16 * 4096,
            ConfigError::SizeMaxTooSmall {
                size_max: 0,
                seg_max: 254,
                max_transfer: 16 * 4096,
                min: 4096,
            },
        ),
        (|c| c.num_queues = 0, ConfigError::ZeroQueues),
        (
            |c| c.max_discard_sectors = 0,
            ConfigError::Sectors {
                field: "max_discard_sectors",
                value: 0,
                block_sectors: 8,
            },
        ),
        (
            |c| c.max_discard_sectors = 12,
            ConfigError::Sectors {
                field: "max_discard_sectors",
                value: 12,
                block_sectors: 8,
            },
        ),
        (
            |c| c.discard_sector_alignment = 0,
            ConfigError::Sectors {
                field: "discard_sector_alignment",
                value: 0,
                block_sectors: 8,
            },
        ),
        // Smaller than the block: Windows guests mis-size discards.
        (
            |c| c.discard_sector_alignment = 1,
            ConfigError::Sectors {
                field: "discard_sector_alignment",
                value: 1,
                block_sectors: 8,
            },
        ),
        (
            |c| c.max_write_zeroes_sectors = 0,
            ConfigError::Sectors {
                field: "max_write_zeroes_sectors",
                value: 0,
                block_sectors: 8,
            },
        ),
        (
            |c| c.max_discard_seg = 0,
            ConfigError::ZeroSegments("max_discard_seg"),
        ),
        (
            |c| c.max_write_zeroes_seg = 0,
            ConfigError::ZeroSegments("max_write_zeroes_seg"),
        ),
        (
            |c| c.serial = vec![b'x'; 21],
            ConfigError::SerialTooLong(21),
        ),
    ];
    for (mutate, expected) in cases {
        let mut cfg = base.clone();
        mutate(&mut cfg);
        assert_eq!(cfg.validate(), Err(expected));
    }
    // The limits themselves are fine.
    let mut cfg = base.clone();
    cfg.serial = vec![b'x'; 20];
    cfg.physical_block_size = 65536;
    cfg.discard_sector_alignment = 16;
    cfg.min_io_size = 4096 * 65535;
    assert_eq!(cfg.validate(), Ok(()));
}

fn bit(b: u32) -> u64 {
    1 << b
}

#[test]
fn virtio_features_for_each_option_combination() {
    let always = bit(VIRTIO_BLK_F_SIZE_MAX)
        | bit(VIRTIO_BLK_F_SEG_MAX)
        | bit(VIRTIO_BLK_F_BLK_SIZE)
        | bit(VIRTIO_BLK_F_TOPOLOGY)
        | bit(VIRTIO_BLK_F_FLUSH)
        | bit(VIRTIO_BLK_F_CONFIG_WCE)
        | bit(VIRTIO_BLK_F_MQ)
        | bit(VIRTIO_F_VERSION_1)
        | bit(VIRTIO_RING_F_EVENT_IDX)
        | bit(VIRTIO_RING_F_INDIRECT_DESC);
    for discard in [false, true] {
        for write_zeroes in [false, true] {
            for read_only in [false, true] {
                let mut cfg = DeviceConfig::new(MIB, 512, 1, 256);
                cfg.discard = discard;
                cfg.write_zeroes = write_zeroes;
                cfg.read_only = read_only;
                let mut expected = always;
                if discard {
                    expected |= bit(VIRTIO_BLK_F_DISCARD);
                }
                if write_zeroes {
                    expected |= bit(VIRTIO_BLK_F_WRITE_ZEROES);
                }
                if read_only {
                    expected |= bit(VIRTIO_BLK_F_RO);
                }
                let features = cfg.virtio_features();
                assert_eq!(features, expected, "{discard} {write_zeroes} {read_only}");
                // Never offered: geometry, and the vhost-user protocol bit (30) that
                // vhost-server adds itself.
                assert_eq!(features & bit(VIRTIO_BLK_F_GEOMETRY), 0);
                assert_eq!(features & bit(30), 0);
            }
        }
    }
}

fn distinctive_config() -> DeviceConfig {
    DeviceConfig {
        capacity_sectors: 0x0102_0304_0506_0708,
        logical_block_size: 4096,
        physical_block_size: 16384,
        min_io_size: 2 * 4096,
        opt_io_size: 0x10 * 4096,
        seg_max: 0x3344,
        max_transfer_bytes: 0xf000_0000,
        num_queues: 0x0506,
        read_only: false,
        discard: true,
        write_zeroes: true,
        max_discard_sectors: 0xa1a2_a3a4,
        max_discard_seg: 0xb1b2_b3b4,
        discard_sector_alignment: 0xc1c2_c3c4,
        max_write_zeroes_sectors: 0xd1d2_d3d4,
        max_write_zeroes_seg: 0xe1e2_e3e4,
        write_zeroes_may_unmap: true,
        serial: b"s".to_vec(),
    }
}

#[rustfmt::skip]
const EXPECTED_SPACE: [u8; CONFIG_SPACE_SIZE] = [
    0x08, 0x07, 0x06, 0x05, 0x04, 0x03, 0x02, 0x01, // 0 capacity
    0x00, 0xa0, 0x04, 0x00,                         // 8 size_max: 0xf000_0000 / 0x3344, in 4K
    0x44, 0x33, 0x00, 0x00,                         // 12 seg_max
    0, 0, 0, 0,                                     // 16 geometry (not offered)
    0x00, 0x10, 0x00, 0x00,                         // 20 blk_size 4096
    2,                                              // 24 physical_block_exp: 16K/4K = 2^2
    0,                                              // 25 alignment_offset
    0x02, 0x00,                                     // 26 min_io_size, in blocks
    0x10, 0x00, 0x00, 0x00,                         // 28 opt_io_size, in blocks
    1,                                              // 32 wce
    0,                                              // 33 unused
    0x06, 0x05,                                     // 34 num_queues
    0xa4, 0xa3, 0xa2, 0xa1,                         // 36 max_discard_sectors
    0xb4, 0xb3, 0xb2, 0xb1,                         // 40 max_discard_seg
    0xc4, 0xc3, 0xc2, 0xc1,                         // 44 discard_sector_alignment
    0xd4, 0xd3, 0xd2, 0xd1,                         // 48 max_write_zeroes_sectors
    0xe4, 0xe3, 0xe2, 0xe1,                         // 52 max_write_zeroes_seg
    1,                                              // 56 write_zeroes_may_unmap
    0, 0, 0,                                        // 57 unused
];

#[test]
fn config_space_bytes_at_each_offset() {
    let cfg = distinctive_config();
    assert_eq!(cfg.config_space(true), EXPECTED_SPACE);
    let mut writethrough = EXPECTED_SPACE;
    writethrough[WCE_OFFSET] = 0;
    assert_eq!(cfg.config_space(false), writethrough);

    let mut no_unmap = cfg.clone();
    no_unmap.write_zeroes_may_unmap = false;
    assert_eq!(no_unmap.config_space(true)[56], 0);
}

#[test]
fn config_space_agrees_with_the_kernel_struct_layout() {
    let cfg = distinctive_config();
    let space = cfg.config_space(true);
    // SAFETY: virtio_blk_config is a plain-old-data repr(C) struct of integers, at least
    // CONFIG_SPACE_SIZE bytes long; read_unaligned copes with the byte buffer's alignment.
    let kernel: virtio_blk_config = unsafe {
        let mut bytes = [0u8; std::mem::size_of::<virtio_blk_config>()];
        bytes[..CONFIG_SPACE_SIZE].copy_from_slice(&space);
        std::ptr::read_unaligned(bytes.as_ptr().cast())
    };
    assert_eq!(u64::from_le(kernel.capacity), cfg.capacity_sectors);
    assert_eq!(u32::from_le(kernel.seg_max), cfg.seg_max);
    assert_eq!(u32::from_le(kernel.blk_size), 4096);
    assert_eq!(kernel.physical_block_exp, 2);
    assert_eq!(u16::from_le(kernel.min_io_size), 2);
    assert_eq!(u32::from_le(kernel.opt_io_size), 0x10);
    assert_eq!(kernel.wce, 1);
    assert_eq!(u16::from_le(kernel.num_queues), cfg.num_queues);
    assert_eq!(
        u32::from_le(kernel.max_discard_sectors),
        cfg.max_discard_sectors
    );
    assert_eq!(u32::from_le(kernel.max_discard_seg), cfg.max_discard_seg);
    assert_eq!(
        u32::from_le(kernel.discard_sector_alignment),
        cfg.discard_sector_alignment
    );
    assert_eq!(
        u32::from_le(kernel.max_write_zeroes_sectors),
        cfg.max_write_zeroes_sectors
    );
    assert_eq!(
        u32::from_le(kernel.max_write_zeroes_seg),
        cfg.max_write_zeroes_seg
    );
    assert_eq!(kernel.write_zeroes_may_unmap, 1);
}

#[test]
fn read_config_returns_the_requested_window_or_nothing() {
    let cfg = distinctive_config();
    assert_eq!(cfg.read_config(true, 0, 60), EXPECTED_SPACE);
    assert_eq!(cfg.read_config(true, 3, 5), EXPECTED_SPACE[3..8]);
    assert_eq!(cfg.read_config(false, 32, 1), [0]);
    assert_eq!(cfg.read_config(true, 32, 1), [1]);
    assert_eq!(cfg.read_config(true, 59, 1), [0]);
    assert_eq!(cfg.read_config(true, 34, 2), [0x06, 0x05]);
    for (offset, size) in [
        (59u32, 2u32),
        (0, 61),
        (60, 1),
        (61, 0),
        (100, 4),
        (u32::MAX, 2),
        (2, u32::MAX),
        (u32::MAX, u32::MAX),
    ] {
        assert!(
            cfg.read_config(true, offset, size).is_empty(),
            "offset {offset} size {size}"
        );
    }
    assert!(cfg.read_config(true, 60, 0).is_empty());
    assert!(cfg.read_config(true, 10, 0).is_empty());
}

#[test]
fn only_a_one_byte_wce_write_is_accepted() {
    assert_eq!(parse_config_write(32, &[1]), Some(true));
    assert_eq!(parse_config_write(32, &[0]), Some(false));
    // Any non-zero byte enables the cache, as in QEMU.
    assert_eq!(parse_config_write(32, &[0x80]), Some(true));
    assert_eq!(parse_config_write(32, &[]), None);
    assert_eq!(parse_config_write(32, &[1, 0]), None);
    assert_eq!(parse_config_write(31, &[1]), None);
    assert_eq!(parse_config_write(33, &[1]), None);
    assert_eq!(parse_config_write(0, &[0; 8]), None);
    assert_eq!(parse_config_write(28, &[0, 0, 0, 0, 1]), None);
    assert_eq!(parse_config_write(u32::MAX, &[1]), None);
}

#[test]
fn size_max_is_the_largest_block_multiple_whose_seg_max_segments_fit_max_transfer() {
    for lbs in [512u32, 4096] {
        for queue_size in [4u16, 64, 128, 256, 1024] {
            for max_transfer in [1u32 << 20, 4 << 20, 32 << 20] {
                let mut cfg = DeviceConfig::new(64 * MIB, lbs, 1, queue_size);
                cfg.max_transfer_bytes = max_transfer;
                let size_max = cfg.size_max();
                let what = format!("lbs {lbs} queue {queue_size} max {max_transfer}");
                assert_eq!(size_max % lbs, 0, "{what}");
                assert!(
                    u64::from(size_max) * u64::from(cfg.seg_max) <= u64::from(max_transfer),
                    "{what}"
                );
                assert!(
                    u64::from(size_max + lbs) * u64::from(cfg.seg_max) > u64::from(max_transfer),
                    "{what}: not the largest"
                );
                let space = cfg.config_space(true);
                assert_eq!(space[8..12], size_max.to_le_bytes(), "{what}");
                assert_ne!(cfg.virtio_features() & bit(VIRTIO_BLK_F_SIZE_MAX), 0);
                if size_max >= 4096 {
                    assert_eq!(cfg.validate(), Ok(()), "{what}");
                }
            }
        }
    }
    // The defaults: 32 MiB over 254 segments.
    let cfg = DeviceConfig::new(64 * MIB, 512, 1, 256);
    assert_eq!(cfg.size_max(), (32 << 20) / 254 / 512 * 512);
}
