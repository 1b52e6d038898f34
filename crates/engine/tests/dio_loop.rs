//! O_DIRECT on a 4096-byte-sector loop device: the alignment comes from the device (statx
//! STATX_DIOALIGN, or its logical block size), guest buffers that meet it go straight to the
//! disk, buffers that miss it go through bounce buffers from the iothread's budget, and a
//! budget smaller than the I/O in flight makes requests wait, never fail or hang.

mod common;

use std::sync::Arc;

use blk_proto::{RequestKind, VIRTIO_BLK_S_OK};
use common::*;
use engine::{Engine, ImageOptions, Storage};

const MIB: u64 = 1 << 20;

fn open_4kn(dev: &LoopDevice) -> Storage {
    Storage::open(
        &dev.dev,
        &ImageOptions {
            read_only: false,
            direct: true,
            create_size: None,
        },
    )
    .expect("open the loop device with O_DIRECT")
}

#[test]
fn the_dio_alignment_is_the_devices_and_a_512_byte_guest_block_is_refused() {
    let Some(dev) = LoopDevice::new(16 * MIB, Some(4096)) else {
        return;
    };
    let s = open_4kn(&dev);
    assert_eq!(
        s.dio_offset_align(),
        4096,
        "offset alignment of a 4Kn device"
    );
    assert!(s.dio_mem_align() <= 4096);
    assert!(s.check_block_size(&dev.dev, 512).is_err());
    assert!(s.check_block_size(&dev.dev, 4096).is_ok());
}

#[test]
fn aligned_guest_io_goes_straight_to_the_disk_and_misaligned_io_through_a_bounce() {
    let Some(dev) = LoopDevice::new(16 * MIB, Some(4096)) else {
        return;
    };
    let mut e = Engine::new(Arc::new(open_4kn(&dev)), default_config()).expect("engine");
    let mut mem = Memory::new(1 << 20);
    let mut st = Statuses::new(8);

    // Page-aligned, page-sized segments: no bounce.
    let data = pattern(1, 65536);
    mem.bytes(0, 65536).copy_from_slice(&data);
    enqueue_rw(
        &mut e,
        RequestKind::Write,
        8,
        &mut mem,
        &[(0, 32768), (32768, 32768)],
        &mut st.0[0],
        0,
    );
    assert_eq!(run(&mut e), 1);
    assert_eq!(st.0[0], VIRTIO_BLK_S_OK);
    assert_eq!(e.bounce_stats().ops, 0, "aligned I/O needs no bounce");
    assert!(read_at(&dev.backing, 4096, 65536) == data, "aligned write");

    // A buffer 256 bytes past a page start misses the device's memory alignment (the kernel
    // refuses it with EINVAL), and 512-byte segments miss its 4096-byte block: both bounce.
    let data2 = pattern(2, 8192);
    mem.bytes(65536 + 256, 8192).copy_from_slice(&data2);
    enqueue_rw(
        &mut e,
        RequestKind::Write,
        256,
        &mut mem,
        &[(65536 + 256, 8192)],
        &mut st.0[1],
        1,
    );
    let data3 = pattern(3, 4096);
    for i in 0..8 {
        mem.bytes(131072 + i * 1024, 512)
            .copy_from_slice(&data3[i * 512..(i + 1) * 512]);
    }
    let segs: Vec<(usize, usize)> = (0..8).map(|i| (131072 + i * 1024, 512)).collect();
    enqueue_rw(
        &mut e,
        RequestKind::Write,
        512,
        &mut mem,
        &segs,
        &mut st.0[2],
        2,
    );
    assert_eq!(run(&mut e), 2);
    assert_eq!(&st.0[1..3], &[VIRTIO_BLK_S_OK; 2]);
    assert_eq!(e.bounce_stats().ops, 2, "both misaligned writes bounced");
    assert!(
        read_at(&dev.backing, 256 * 512, 8192) == data2,
        "first bounced write"
    );
    assert!(
        read_at(&dev.backing, 512 * 512, 4096) == data3,
        "512-byte segments"
    );

    // Reads into misaligned buffers come back right through the bounce too.
    mem.bytes(262144 + 256, 65536).fill(0);
    enqueue_rw(
        &mut e,
        RequestKind::Read,
        8,
        &mut mem,
        &[(262144 + 256, 65536)],
        &mut st.0[3],
        3,
    );
    assert_eq!(run(&mut e), 1);
    assert_eq!(st.0[3], VIRTIO_BLK_S_OK);
    assert!(mem.bytes(262144 + 256, 65536) == &data[..], "bounced read");
    assert_eq!(e.bounce_stats().ops, 3);
}

#[test]
fn a_bounce_budget_smaller_than_the_io_in_flight_is_backpressure_not_failure() {
    let Some(dev) = LoopDevice::new(16 * MIB, Some(4096)) else {
        return;
    };
    const BUDGET: usize = 64 << 10;
    const REQS: usize = 48;
    const LEN: usize = 16 << 10;
    let mut e = Engine::new(Arc::new(open_4kn(&dev)), config(BUDGET)).expect("engine");
    let mut mem = Memory::new(REQS * (LEN + 4096) + (1 << 20));
    let mut st = Statuses::new(REQS + 1);
    let slot = |i: usize| i * (LEN + 4096) + 256;

    // 48 misaligned 16 KiB writes (768 KiB) in flight at once against a 64 KiB budget, plus
    // one 256 KiB write larger than the whole budget.
    for i in 0..REQS {
        let data = pattern(i as u8, LEN);
        mem.bytes(slot(i), LEN).copy_from_slice(&data);
        enqueue_rw(
            &mut e,
            RequestKind::Write,
            (i * LEN / 512) as u64,
            &mut mem,
            &[(slot(i), LEN)],
            &mut st.0[i],
            i as u16,
        );
    }
    let big_at = REQS * (LEN + 4096) + 256;
    let big = pattern(200, 256 << 10);
    mem.bytes(big_at, 256 << 10).copy_from_slice(&big);
    enqueue_rw(
        &mut e,
        RequestKind::Write,
        8 * MIB / 512,
        &mut mem,
        &[(big_at, 256 << 10)],
        &mut st.0[REQS],
        REQS as u16,
    );
    assert_eq!(run(&mut e), REQS + 1);
    assert!(st.0.iter().all(|&s| s == VIRTIO_BLK_S_OK), "{:?}", st.0);
    let stats = e.bounce_stats();
    assert!(stats.waited > 0, "the budget held requests back: {stats:?}");
    assert!(
        stats.peak_bytes <= 256 << 10,
        "bounce memory stayed within the budget or the one big request: {stats:?}"
    );
    assert_eq!(e.bounce_waiting(), 0);
    for i in 0..REQS {
        assert!(
            read_at(&dev.backing, (i * LEN) as u64, LEN) == pattern(i as u8, LEN),
            "write {i}"
        );
    }
    assert!(
        read_at(&dev.backing, 8 * MIB, 256 << 10) == big,
        "big write"
    );

    // And back through misaligned reads under the same budget.
    for i in 0..REQS {
        mem.bytes(slot(i), LEN).fill(0);
        enqueue_rw(
            &mut e,
            RequestKind::Read,
            (i * LEN / 512) as u64,
            &mut mem,
            &[(slot(i), LEN)],
            &mut st.0[i],
            i as u16,
        );
    }
    assert_eq!(run(&mut e), REQS);
    assert!(st.0[..REQS].iter().all(|&s| s == VIRTIO_BLK_S_OK));
    for i in 0..REQS {
        assert!(
            mem.bytes(slot(i), LEN) == &pattern(i as u8, LEN)[..],
            "read {i}"
        );
    }
    assert!(e.bounce_stats().waited > stats.waited, "reads waited too");
}
