//! The region's bytes are libvhost-user's layout: checked against C mirrors of its structs and
//! byte by byte in the memfd a queue writes through.

use std::mem::{offset_of, size_of};
use std::os::unix::fs::FileExt;

use vhost_inflight::layout::*;
use vhost_inflight::{queue_region_size, region_size, InflightRegion};

/// libvhost-user's `VuDescStateSplit`.
#[repr(C)]
struct DescStateSplit {
    inflight: u8,
    padding: [u8; 5],
    next: u16,
    counter: u64,
}

/// libvhost-user's `VuVirtqInflight` (without its flexible `desc[]`).
#[repr(C)]
struct VirtqInflight {
    features: u64,
    version: u16,
    desc_num: u16,
    last_batch_head: u16,
    used_idx: u16,
}

#[test]
fn offsets_match_libvhost_user_structs() {
    assert_eq!(size_of::<VirtqInflight>() as u64, HEADER_SIZE);
    assert_eq!(offset_of!(VirtqInflight, features), FEATURES);
    assert_eq!(offset_of!(VirtqInflight, version), VERSION);
    assert_eq!(offset_of!(VirtqInflight, desc_num), DESC_NUM);
    assert_eq!(offset_of!(VirtqInflight, last_batch_head), LAST_BATCH_HEAD);
    assert_eq!(offset_of!(VirtqInflight, used_idx), USED_IDX);
    assert_eq!(size_of::<DescStateSplit>() as u64, ENTRY_SIZE);
    assert_eq!(offset_of!(DescStateSplit, inflight), ENTRY_INFLIGHT);
    assert_eq!(offset_of!(DescStateSplit, padding), 1);
    assert_eq!(offset_of!(DescStateSplit, next), ENTRY_NEXT);
    assert_eq!(offset_of!(DescStateSplit, counter), ENTRY_COUNTER);
}

#[test]
fn sizes_are_64_byte_aligned_per_queue() {
    // align_up(16 + 16 * n, 64)
    for (queue_size, bytes) in [
        (1, 64),
        (3, 64),
        (4, 128),
        (128, 2112),
        (256, 4160),
        (1024, 16448),
        (32768, 524352),
    ] {
        assert_eq!(
            queue_region_size(queue_size),
            bytes,
            "queue size {queue_size}"
        );
        assert_eq!(bytes % ALIGN, 0);
        assert!(bytes >= HEADER_SIZE + ENTRY_SIZE * u64::from(queue_size));
        assert!(bytes - (HEADER_SIZE + ENTRY_SIZE * u64::from(queue_size)) < ALIGN);
    }
    assert_eq!(region_size(4, 256), 4 * 4160);
    assert_eq!(region_size(1, 1), 64);
    assert_eq!(region_size(65535, 32768), 65535 * 524352);
}

fn u16_at(bytes: &[u8], offset: u64) -> u16 {
    let offset = offset as usize;
    u16::from_ne_bytes([bytes[offset], bytes[offset + 1]])
}

fn u64_at(bytes: &[u8], offset: u64) -> u64 {
    let offset = offset as usize;
    u64::from_ne_bytes(bytes[offset..offset + 8].try_into().unwrap())
}

#[test]
fn a_queue_writes_its_fields_where_libvhost_user_reads_them() {
    let (num_queues, queue_size) = (3u16, 4u16);
    let (region, file) = InflightRegion::create(num_queues, queue_size).unwrap();
    assert_eq!(
        file.metadata().unwrap().len(),
        region_size(num_queues, queue_size)
    );
    let mut queue = region.queue(2).unwrap();
    assert!(region.queue(3).is_none());
    queue.recover(500, |_| None);
    queue.popped(1);
    queue.popped(3);
    queue.before_publish(3);
    queue.after_publish(&[3], 501);

    let mut bytes = vec![0u8; region_size(num_queues, queue_size) as usize];
    file.read_exact_at(&mut bytes, 0).unwrap();
    let base = 2 * queue_region_size(queue_size);
    assert!(
        bytes[..base as usize].iter().all(|&b| b == 0),
        "queues 0 and 1 untouched"
    );
    assert_eq!(u64_at(&bytes, base + FEATURES as u64), 0);
    assert_eq!(u16_at(&bytes, base + VERSION as u64), INFLIGHT_VERSION);
    assert_eq!(u16_at(&bytes, base + DESC_NUM as u64), queue_size);
    assert_eq!(u16_at(&bytes, base + LAST_BATCH_HEAD as u64), 3);
    assert_eq!(u16_at(&bytes, base + USED_IDX as u64), 501);
    let entry = |head: u64| base + HEADER_SIZE + ENTRY_SIZE * head;
    assert_eq!(bytes[(entry(1) + ENTRY_INFLIGHT as u64) as usize], 1);
    assert_eq!(u64_at(&bytes, entry(1) + ENTRY_COUNTER as u64), 0);
    assert_eq!(bytes[(entry(3) + ENTRY_INFLIGHT as u64) as usize], 0);
    assert_eq!(u64_at(&bytes, entry(3) + ENTRY_COUNTER as u64), 1);
    assert_eq!(bytes[entry(0) as usize], 0);
    assert_eq!(bytes[entry(2) as usize], 0);
    assert_eq!(queue.in_flight(), 1);
}

#[test]
fn create_seals_the_memfd_against_grow_and_shrink() {
    let (_region, file) = InflightRegion::create(2, 128).unwrap();
    let len = file.metadata().unwrap().len();
    for new_len in [len + 4096, len - 64, 0] {
        let err = file.set_len(new_len).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EPERM), "set_len({new_len})");
    }
    assert_eq!(file.metadata().unwrap().len(), len);
    // F_SEAL_SEAL: the seals cannot be changed either.
    // SAFETY: F_ADD_SEALS takes an int and touches no memory.
    let rc = unsafe { libc::fcntl(std::os::fd::AsRawFd::as_raw_fd(&file), libc::F_ADD_SEALS, 0) };
    assert_eq!(rc, -1);
    assert_eq!(
        std::io::Error::last_os_error().raw_os_error(),
        Some(libc::EPERM)
    );
}

#[test]
fn a_mapped_region_is_the_created_one() {
    let (region, file) = InflightRegion::create(1, 8).unwrap();
    let mut first = region.queue(0).unwrap();
    first.recover(7, |_| None);
    first.popped(5);
    first.popped(2);
    // A new process maps the same file (SET_INFLIGHT_FD after a reconnect).
    drop(first);
    drop(region);
    let again = InflightRegion::map(&file, 0, region_size(1, 8), 1, 8).unwrap();
    assert_eq!((again.num_queues(), again.queue_size()), (1, 8));
    let mut queue = again.queue(0).unwrap();
    let recovery = queue.recover(7, |_| None);
    assert_eq!(recovery.resubmit, vec![5, 2]);
    assert_eq!(recovery.next_avail, 9);
}

/// A driver that set a ring smaller than the region's queue size: its heads use the part's
/// first entries, desc_num says the ring's size, recovery takes used-ring slots mod the ring,
/// and the next queue's part is untouched. A ring larger than the part is refused.
#[test]
fn a_ring_smaller_than_the_region_uses_the_first_entries_of_its_part() {
    let (num_queues, queue_size, ring) = (2u16, 8u16, 4u16);
    let (region, file) = InflightRegion::create(num_queues, queue_size).unwrap();
    let mut queue = region.queue(0).unwrap();
    assert!(!queue.use_ring_size(queue_size + 1), "larger than the part");
    assert!(!queue.use_ring_size(0), "an empty ring");
    assert!(queue.use_ring_size(ring));
    queue.recover(3, |_| None);
    for head in 0..ring {
        queue.popped(head);
    }
    queue.popped(ring); // not a head of this ring: ignored
    let mut bytes = vec![0u8; region_size(num_queues, queue_size) as usize];
    file.read_exact_at(&mut bytes, 0).unwrap();
    assert_eq!(u16_at(&bytes, DESC_NUM as u64), ring);
    let entry = |head: u64| HEADER_SIZE + ENTRY_SIZE * head + ENTRY_INFLIGHT as u64;
    for head in 0..u64::from(queue_size) {
        let want = u8::from(head < u64::from(ring));
        assert_eq!(bytes[entry(head) as usize], want, "entry {head}");
    }
    let next_part = queue_region_size(queue_size) as usize;
    assert!(
        bytes[next_part..].iter().all(|&b| b == 0),
        "queue 1 untouched"
    );

    // The server died after publishing heads 1 and 2 at used slots 3 and 0 (used idx 3 -> 5,
    // slots mod 4), before clearing them: a new life of the same ring resubmits 0 then 3.
    let mut again = region.queue(0).unwrap();
    assert!(again.use_ring_size(ring));
    let mut slots = Vec::new();
    let recovery = again.recover(5, |slot| {
        slots.push(slot);
        match slot {
            3 => Some(1),
            0 => Some(2),
            _ => None,
        }
    });
    assert_eq!(slots, vec![3, 0], "slots of used idx 3 and 4, mod the ring");
    assert_eq!(recovery.resubmit, vec![0, 3]);
    assert_eq!(recovery.next_avail, 7);
}
