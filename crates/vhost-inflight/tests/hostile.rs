//! What a hostile frontend or guest controls: SET_INFLIGHT_FD's fd, offset, size and queue
//! counts, the region's bytes, the used ring and the heads. None may panic, map outside the
//! file or yield a head outside the queue.

use std::fs::File;
use std::os::fd::FromRawFd;
use std::os::unix::fs::FileExt;

use vhost_inflight::{region_size, InflightError, InflightRegion};

/// A sealed memfd of `len` bytes (what map() accepts), reusing create()'s.
fn sealed_file(len_queues: u16, queue_size: u16) -> File {
    InflightRegion::create(len_queues, queue_size).unwrap().1
}

#[test]
fn map_refuses_what_does_not_fit_the_file() {
    let file = sealed_file(2, 256); // 2 * 4160 bytes
    let len = region_size(2, 256);
    let map = |offset, size, queues, queue_size| {
        InflightRegion::map(&file, offset, size, queues, queue_size).map(|_| ())
    };
    assert!(map(0, len, 2, 256).is_ok());
    assert!(map(0, len, 1, 256).is_ok(), "a prefix is fine");
    assert!(matches!(
        map(0, len, 3, 256),
        Err(InflightError::TooSmall { .. })
    ));
    assert!(matches!(
        map(0, len - 64, 2, 256),
        Err(InflightError::TooSmall { .. })
    ));
    assert!(matches!(
        map(64, len, 2, 256),
        Err(InflightError::OutsideFile { .. })
    ));
    assert!(matches!(
        map(0, len + 1, 2, 256),
        Err(InflightError::OutsideFile { .. })
    ));
    assert!(matches!(
        map(u64::MAX - 63, len, 2, 256),
        Err(InflightError::OutsideFile { .. })
    ));
    assert!(matches!(
        map(0, u64::MAX, 2, 256),
        Err(InflightError::OutsideFile { .. })
    ));
    assert!(matches!(
        map(8, len - 64, 1, 256),
        Err(InflightError::BadOffset(8))
    ));
    assert!(matches!(
        map(0, len, 2, 0),
        Err(InflightError::QueueSize(0))
    ));
    assert!(matches!(
        map(0, len, 2, 32769),
        Err(InflightError::QueueSize(32769))
    ));
    assert!(matches!(
        map(0, len, 2, u16::MAX),
        Err(InflightError::QueueSize(u16::MAX))
    ));
    assert!(matches!(map(0, len, 0, 256), Err(InflightError::NoQueues)));
    assert!(matches!(
        map(0, u64::MAX, u16::MAX, 32768),
        Err(InflightError::OutsideFile { .. })
    ));
}

#[test]
fn map_at_an_offset_inside_the_file() {
    // A second queue's part (offset 4160, not page aligned) mapped as a one-queue region.
    let (region, file) = InflightRegion::create(2, 256).unwrap();
    let mut second = region.queue(1).unwrap();
    second.recover(0, |_| None);
    second.popped(200);
    let size = region_size(1, 256);
    let mapped = InflightRegion::map(&file, size, size, 1, 256).unwrap();
    let recovery = mapped.queue(0).unwrap().recover(0, |_| None);
    assert_eq!(recovery.resubmit, vec![200]);
}

#[test]
fn map_refuses_an_unsealed_file() {
    // SAFETY: a NUL-terminated name; creates a descriptor we own.
    let fd = unsafe { libc::memfd_create(c"unsealed".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: `fd` was just created and is owned by nothing else.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(region_size(1, 8)).unwrap();
    assert!(matches!(
        InflightRegion::map(&file, 0, region_size(1, 8), 1, 8),
        Err(InflightError::NotSealed)
    ));
}

#[test]
fn create_refuses_bad_sizes() {
    assert!(matches!(
        InflightRegion::create(1, 0),
        Err(InflightError::QueueSize(0))
    ));
    assert!(matches!(
        InflightRegion::create(1, 40000),
        Err(InflightError::QueueSize(40000))
    ));
    assert!(matches!(
        InflightRegion::create(0, 8),
        Err(InflightError::NoQueues)
    ));
}

#[test]
fn garbage_regions_recover_without_panic_and_only_real_heads() {
    for seed in 0..300u64 {
        let mut rng = fastrand::Rng::with_seed(seed);
        let queue_size = [1u16, 2, 3, 7, 8, 64, 255, 256, 1024][rng.usize(..9)];
        let num_queues = rng.u16(1..4);
        let len = region_size(num_queues, queue_size);
        let file = sealed_file(num_queues, queue_size);
        let mut bytes: Vec<u8> = (0..len).map(|_| rng.u8(..)).collect();
        // Half the time make the headers plausible so recovery reads entries and the ring.
        if seed % 2 == 0 {
            for queue in 0..usize::from(num_queues) {
                let base = queue * vhost_inflight::queue_region_size(queue_size) as usize;
                bytes[base + 8..base + 10].copy_from_slice(&1u16.to_ne_bytes());
                bytes[base + 10..base + 12].copy_from_slice(&queue_size.to_ne_bytes());
            }
        }
        file.write_all_at(&bytes, 0).unwrap();
        let region = InflightRegion::map(&file, 0, len, num_queues, queue_size).unwrap();
        for index in 0..num_queues {
            let mut queue = region.queue(index).unwrap();
            let used_idx = rng.u16(..);
            let mut reads = 0u32;
            let recovery = queue.recover(used_idx, |slot| {
                assert!(slot < queue_size, "slot {slot} past the ring");
                reads += 1;
                rng.bool().then(|| rng.u16(..))
            });
            assert!(reads <= u32::from(queue_size));
            let mut seen = vec![false; usize::from(queue_size)];
            for &head in &recovery.resubmit {
                assert!(head < queue_size, "seed {seed}: head {head}");
                assert!(!seen[usize::from(head)], "seed {seed}: head {head} twice");
                seen[usize::from(head)] = true;
            }
            assert_eq!(
                recovery.next_avail,
                used_idx.wrapping_add(recovery.resubmit.len() as u16)
            );
            assert_eq!(queue.in_flight(), recovery.resubmit.len());
            // Hostile heads afterwards are ignored, never out of bounds.
            for _ in 0..8 {
                let head = rng.u16(..);
                queue.popped(head);
                queue.before_publish(head);
                queue.after_publish(&[head, rng.u16(..)], rng.u16(..));
            }
            assert!(queue.in_flight() <= usize::from(queue_size));
        }
    }
}

#[test]
fn heads_past_the_queue_are_ignored() {
    let (region, file) = InflightRegion::create(2, 8).unwrap();
    let mut queue = region.queue(0).unwrap();
    queue.recover(0, |_| None);
    let mut before = vec![0u8; region_size(2, 8) as usize];
    file.read_exact_at(&mut before, 0).unwrap();
    for head in [8, 9, 255, u16::MAX] {
        queue.popped(head);
        queue.before_publish(head);
        queue.after_publish(&[head], 0);
    }
    let mut after = before.clone();
    file.read_exact_at(&mut after, 0).unwrap();
    assert_eq!(before, after, "no byte changed");
    assert_eq!(queue.in_flight(), 0);
}
