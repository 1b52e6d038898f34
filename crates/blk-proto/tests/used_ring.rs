//! The used-ring writer against virtio-queue's own `add_used` + `needs_notification`: the same
//! completions leave the same bytes in guest memory and the same notification decisions, at
//! every wrap of the index and every `used_event`; and rings it cannot map are refused.

mod common;

use std::sync::Arc;

use blk_proto::used_ring::needs_event;
use blk_proto::{GuestRegions, UsedRing};
use common::*;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress};

const SIZE: u16 = 8;
const DESC: u64 = 0x1000;
const AVAIL: u64 = 0x2000;
const USED: u64 = 0x3000;
/// Bytes of a used ring of SIZE entries (flags, idx, elements, avail_event).
const USED_BYTES: usize = 4 + 8 * SIZE as usize + 2;

fn queue(mem: &Mem, event_idx: bool) -> Queue {
    let mut q = Queue::new(SIZE).expect("queue");
    q.set_size(SIZE);
    q.set_desc_table_address(Some(DESC as u32), Some(0));
    q.set_avail_ring_address(Some(AVAIL as u32), Some(0));
    q.set_used_ring_address(Some(USED as u32), Some(0));
    q.set_event_idx(event_idx);
    q.set_ready(true);
    assert!(q.is_valid(mem));
    q
}

fn set_used_event(mem: &Mem, event: u16) {
    mem.write_obj(event.to_le(), GuestAddress(AVAIL + 4 + 2 * u64::from(SIZE)))
        .expect("used_event");
}

fn used_bytes(mem: &Mem) -> Vec<u8> {
    read_guest(mem, USED, USED_BYTES)
}

fn ring() -> UsedRing {
    UsedRing {
        used_ring: USED,
        avail_ring: AVAIL,
        size: SIZE,
    }
}

/// Batches of completions (head, len), written by the library on one guest and by the writer
/// on another, with the same used_event before each batch: same bytes, same decisions.
fn compare(event_idx: bool, batches: &[(u16, Vec<(u16, u32)>)]) {
    let lib_mem = guest();
    let our_mem = guest();
    let mut lib_q = queue(&lib_mem, event_idx);
    let mut our_next = 0u16;
    let regions = GuestRegions::new(Arc::new(our_mem.clone()));
    for (batch_no, (used_event, batch)) in batches.iter().enumerate() {
        set_used_event(&lib_mem, *used_event);
        set_used_event(&our_mem, *used_event);
        for &(head, len) in batch {
            lib_q.add_used(&lib_mem, head, len).expect("add_used");
        }
        let lib_notify = lib_q
            .needs_notification(&lib_mem)
            .expect("needs_notification");

        let mut used = ring().map(&regions).expect("used ring maps");
        let old = our_next;
        for &(head, len) in batch {
            assert!(used.put(our_next, head, len));
            our_next = our_next.wrapping_add(1);
        }
        used.publish(our_next);
        let our_notify = used.needs_notification(event_idx, old, our_next);

        assert_eq!(
            used_bytes(&our_mem),
            used_bytes(&lib_mem),
            "batch {batch_no}: used ring bytes differ"
        );
        assert_eq!(our_notify, lib_notify, "batch {batch_no}: notification");
        assert_eq!(our_next, lib_q.next_used(), "batch {batch_no}: next_used");
    }
}

#[test]
fn same_bytes_and_decisions_as_virtio_queue_across_wraps() {
    // 70 batches of 1..=5 completions wrap the 8-entry ring many times; used_event sweeps
    // below, inside and past each batch.
    let mut batches = Vec::new();
    let mut next = 0u16;
    for i in 0..70u16 {
        let n = 1 + i % 5;
        let batch: Vec<(u16, u32)> = (0..n)
            .map(|k| ((i + k) % SIZE, 512 * u32::from(i) + u32::from(k)))
            .collect();
        let used_event = next.wrapping_add(i % 7).wrapping_sub(1);
        batches.push((used_event, batch));
        next = next.wrapping_add(n);
    }
    compare(true, &batches);
    compare(false, &batches);
}

#[test]
fn notification_follows_used_event_at_index_wrap() {
    // The 16-bit index wrapping from 65535 to 0 inside a batch.
    assert!(needs_event(65535, 65534, 1));
    assert!(needs_event(0, 65534, 1));
    assert!(!needs_event(1, 65534, 1));
    assert!(!needs_event(65533, 65534, 1));
    // An empty move never notifies.
    assert!(!needs_event(5, 5, 5));
}

#[test]
fn refuses_heads_outside_the_queue() {
    let mem = guest();
    let regions = GuestRegions::new(Arc::new(mem.clone()));
    let mut used = ring().map(&regions).expect("used ring maps");
    assert!(!used.put(0, SIZE, 4096));
    assert!(!used.put(0, u16::MAX, 4096));
    assert_eq!(used_bytes(&mem), vec![0; USED_BYTES], "nothing written");
}

#[test]
fn refuses_rings_it_cannot_map() {
    let mem = guest();
    let regions = GuestRegions::new(Arc::new(mem.clone()));
    let map = |used_ring: u64, size: u16| {
        UsedRing {
            used_ring,
            avail_ring: AVAIL,
            size,
        }
        .map(&regions)
        .is_some()
    };
    assert!(map(USED, SIZE));
    // Across the two regions' boundary, past the end of memory, at an odd address, size 0.
    assert!(!map(REGION_SPLIT - 8, SIZE));
    assert!(!map(MEM_END - 8, SIZE));
    assert!(!map(u64::MAX - 3, SIZE));
    assert!(!map(USED + 1, SIZE));
    assert!(!map(USED, 0));
}

#[test]
fn a_used_event_outside_memory_notifies() {
    let mem = guest();
    let regions = GuestRegions::new(Arc::new(mem.clone()));
    let ring = UsedRing {
        used_ring: USED,
        avail_ring: MEM_END - 4,
        size: SIZE,
    };
    let mut used = ring.map(&regions).expect("used ring maps");
    assert!(used.put(0, 1, 512));
    used.publish(1);
    assert!(used.needs_notification(true, 0, 1));
}

#[test]
fn publishes_through_a_chain_the_library_pops() {
    // A driver-side view: the library's own queue reads back what the writer published.
    let mem = guest();
    let regions = GuestRegions::new(Arc::new(mem.clone()));
    let mut used = ring().map(&regions).expect("used ring maps");
    assert!(used.put(0, 3, 4097));
    used.publish(1);
    let idx: u16 = mem.read_obj(GuestAddress(USED + 2)).expect("idx");
    let id: u32 = mem.read_obj(GuestAddress(USED + 4)).expect("id");
    let len: u32 = mem.read_obj(GuestAddress(USED + 8)).expect("len");
    assert_eq!(
        (u16::from_le(idx), u32::from_le(id), u32::from_le(len)),
        (1, 3, 4097)
    );
    // Nothing popped from the avail ring in the meantime.
    let mut q = queue(&mem, true);
    assert!(q.iter(&mem).expect("iter").next().is_none());
}
