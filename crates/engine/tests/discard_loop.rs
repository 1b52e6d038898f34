//! DISCARD on a block device is a real discard. A loop device shows which request reached
//! it: /sys/block/loopN/stat counts discards apart from writes (a write-zeroes, which is what
//! fallocate PUNCH_HOLE becomes on a block device, counts as a write), and the loop driver
//! punches a hole in its backing file for a discard, so the file's allocated blocks shrink.
//! Both the io_uring command (BLOCK_URING_CMD_DISCARD) and the BLKDISCARD fallback are
//! checked; a regular file still gets fallocate PUNCH_HOLE.

mod common;

use std::os::unix::fs::MetadataExt;
use std::sync::Arc;

use blk_proto::{Range, RequestKind, VIRTIO_BLK_S_OK};
use common::*;
use engine::{BlockDiscard, Engine, ImageOptions, Storage};

const MIB: u64 = 1 << 20;

fn open(path: &std::path::Path, direct: bool) -> Arc<Storage> {
    Arc::new(
        Storage::open(
            path,
            &ImageOptions {
                read_only: false,
                direct,
                create_size: None,
            },
        )
        .expect("open the image"),
    )
}

/// The running kernel is at least `major.minor`.
fn kernel_at_least(major: u32, minor: u32) -> bool {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut parts = release
        .trim()
        .split(|c: char| !c.is_ascii_digit())
        .map(|p| p.parse::<u32>().unwrap_or(0));
    let have = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    have >= (major, minor)
}

/// Allocated bytes of a file (st_blocks is in 512-byte units).
fn allocated(path: &std::path::Path) -> u64 {
    std::fs::metadata(path).expect("stat").blocks() * 512
}

/// Fills the first 8 MiB of the device with data through the engine.
fn fill(e: &mut Engine) {
    let mut mem = Memory::new(MIB as usize);
    mem.bytes(0, MIB as usize).fill(0xa5);
    let mut st = Statuses::new(8);
    for i in 0..8 {
        enqueue_rw(
            e,
            RequestKind::Write,
            i * MIB / 512,
            &mut mem,
            &[(0, MIB as usize)],
            &mut st.0[i as usize],
            i as u16,
        );
    }
    assert_eq!(run(e), 8);
    assert!(st.0.iter().all(|&s| s == VIRTIO_BLK_S_OK));
}

/// A guest DISCARD of 4 MiB at 2 MiB reaches the loop device as a discard.
fn discard_reaches_the_loop_driver(mode: BlockDiscard, writeback: bool) {
    let Some(dev) = LoopDevice::new(16 * MIB, None) else {
        return;
    };
    let mut cfg = default_config();
    cfg.block_discard = mode;
    cfg.writeback = Arc::new(std::sync::atomic::AtomicBool::new(writeback));
    let mut e = Engine::new(open(&dev.dev, true), cfg).expect("engine");
    fill(&mut e);
    let full = allocated(&dev.backing);
    assert!(full >= 8 * MIB, "the data is allocated: {full}");
    let (writes, discards) = dev.write_and_discard_sectors();

    let mut st = Statuses::new(1);
    enqueue_range(
        &mut e,
        RequestKind::Discard,
        Range {
            sector: 2 * MIB / 512,
            num_sectors: (4 * MIB / 512) as u32,
            unmap: false,
        },
        &mut st.0[0],
        0,
    );
    assert_eq!(run(&mut e), 1);
    assert_eq!(st.0[0], VIRTIO_BLK_S_OK);

    let counts = e.block_discards();
    match mode {
        BlockDiscard::Ioctl => assert_eq!((counts.by_command, counts.by_ioctl), (0, 1)),
        BlockDiscard::Auto if kernel_at_least(6, 12) => {
            assert_eq!(
                (counts.by_command, counts.by_ioctl),
                (1, 0),
                "6.12+ has BLOCK_URING_CMD_DISCARD"
            )
        }
        BlockDiscard::Auto => assert_eq!(counts.by_command + counts.by_ioctl, 1),
    }
    let (writes_after, discards_after) = dev.write_and_discard_sectors();
    assert!(
        discards_after - discards >= 4 * MIB / 512,
        "{mode:?}: the device saw a discard of the range ({discards} -> {discards_after} sectors)"
    );
    assert!(
        writes_after - writes < 4 * MIB / 512,
        "{mode:?}: and no write-zeroes of it ({writes} -> {writes_after} sectors written)"
    );
    let left = allocated(&dev.backing);
    assert!(
        left <= full - 4 * MIB,
        "{mode:?}: the loop driver punched the range out of its backing file ({full} -> {left})"
    );
    // The data around it is intact and the range reads as zeros (the loop driver's hole).
    assert!(read_at(&dev.backing, MIB, MIB as usize)
        .iter()
        .all(|&b| b == 0xa5));
    assert!(read_at(&dev.backing, 2 * MIB, 4 * MIB as usize)
        .iter()
        .all(|&b| b == 0));
    assert!(read_at(&dev.backing, 6 * MIB, MIB as usize)
        .iter()
        .all(|&b| b == 0xa5));
}

#[test]
fn a_discard_of_a_block_device_is_a_real_discard_through_the_io_uring_command() {
    discard_reaches_the_loop_driver(BlockDiscard::Auto, true);
}

#[test]
fn with_the_command_off_blkdiscard_discards_the_same() {
    discard_reaches_the_loop_driver(BlockDiscard::Ioctl, true);
}

#[test]
fn in_writethrough_mode_both_ways_still_discard() {
    discard_reaches_the_loop_driver(BlockDiscard::Auto, false);
    discard_reaches_the_loop_driver(BlockDiscard::Ioctl, false);
}

#[test]
fn write_zeroes_on_a_block_device_zeroes_without_discarding() {
    let Some(dev) = LoopDevice::new(16 * MIB, None) else {
        return;
    };
    let mut e = Engine::new(open(&dev.dev, true), default_config()).expect("engine");
    fill(&mut e);
    let (_, discards) = dev.write_and_discard_sectors();
    let mut st = Statuses::new(1);
    enqueue_range(
        &mut e,
        RequestKind::WriteZeroes,
        Range {
            sector: 2 * MIB / 512,
            num_sectors: (MIB / 512) as u32,
            unmap: false,
        },
        &mut st.0[0],
        0,
    );
    assert_eq!(run(&mut e), 1);
    assert_eq!(st.0[0], VIRTIO_BLK_S_OK);
    assert_eq!(dev.write_and_discard_sectors().1, discards, "no discard");
    assert!(read_at(&dev.dev, 2 * MIB, MIB as usize)
        .iter()
        .all(|&b| b == 0));
    assert!(read_at(&dev.dev, MIB, MIB as usize)
        .iter()
        .all(|&b| b == 0xa5));
}

#[test]
fn a_discard_of_a_file_still_punches_a_hole() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = dir.path().join("disk.img");
    std::fs::write(&path, vec![0x5au8; 4 * MIB as usize]).expect("image");
    let mut e = Engine::new(open(&path, false), default_config()).expect("engine");
    let before = allocated(&path);
    let mut st = Statuses::new(1);
    enqueue_range(
        &mut e,
        RequestKind::Discard,
        Range {
            sector: MIB / 512,
            num_sectors: (2 * MIB / 512) as u32,
            unmap: false,
        },
        &mut st.0[0],
        0,
    );
    assert_eq!(run(&mut e), 1);
    assert_eq!(st.0[0], VIRTIO_BLK_S_OK);
    assert!(allocated(&path) <= before - 2 * MIB);
    assert!(read_at(&path, MIB, 2 * MIB as usize)
        .iter()
        .all(|&b| b == 0));
}
