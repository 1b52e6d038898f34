//! The split-ring walker's bounds: every way a hostile guest can lay out a chain ends in an
//! error (never a read outside guest memory, never an endless walk).

mod common;

use std::sync::Arc;

use blk_proto::split_ring::{Descriptor, MAX_CHAIN_DESCRIPTORS};
use blk_proto::{ChainError, DescriptorWalk, GuestRegions, RingError, SplitRing};
use common::*;
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use vm_memory::{Bytes, GuestAddress};

const SIZE: u16 = 8;
const TABLE: u64 = 0;
const AVAIL: u64 = 0x100;
const NEXT: u32 = VRING_DESC_F_NEXT;

fn ring() -> SplitRing {
    SplitRing {
        desc_table: TABLE,
        avail_ring: AVAIL,
        size: SIZE,
    }
}

fn snapshot(mem: &Mem) -> GuestRegions {
    GuestRegions::new(Arc::new(mem.clone()))
}

fn desc(mem: &Mem, table: u64, index: u16, addr: u64, len: u32, flags: u32, next: u16) {
    write_raw(
        mem,
        table + 16 * u64::from(index),
        raw(addr, len, flags, next),
    );
}

/// Walks until the end or the first error; returns the descriptors and how it ended.
fn walk_all(walk: &mut DescriptorWalk<'_>) -> (Vec<Descriptor>, Result<(), ChainError>) {
    let mut seen = Vec::new();
    // Far more steps than any legal chain: the walker must stop on its own well before.
    for _ in 0..100_000 {
        match walk.next_descriptor() {
            Ok(Some(d)) => seen.push(d),
            Ok(None) => return (seen, Ok(())),
            Err(e) => return (seen, Err(e)),
        }
    }
    panic!("the walk did not end");
}

/// Walks the chain at `head` both ways (each descriptor translated on its own, and through
/// the ring mapped once as the server does), asserts they agree, returns the outcome.
fn walk_both(
    ring: SplitRing,
    regions: &GuestRegions,
    head: u16,
) -> (Vec<Descriptor>, Result<(), ChainError>) {
    let unmapped = walk_all(&mut ring.chain(regions, head));
    let mapped = walk_all(&mut ring.map(regions).chain(head));
    assert_eq!(unmapped, mapped, "mapped and unmapped walks disagree");
    unmapped
}

fn walk(mem: &Mem, head: u16) -> (Vec<Descriptor>, Result<(), ChainError>) {
    walk_both(ring(), &snapshot(mem), head)
}

#[test]
fn a_well_formed_chain_yields_its_descriptors_in_order() {
    let mem = guest();
    desc(&mem, TABLE, 3, HDR, 16, NEXT, 5);
    desc(&mem, TABLE, 5, DATA, 512, VRING_DESC_F_WRITE | NEXT, 1);
    desc(&mem, TABLE, 1, STATUS, 1, VRING_DESC_F_WRITE, 7);
    let (seen, end) = walk(&mem, 3);
    assert_eq!(end, Ok(()));
    let addrs: Vec<_> = seen.iter().map(|d| (d.addr, d.len)).collect();
    assert_eq!(addrs, vec![(HDR, 16), (DATA, 512), (STATUS, 1)]);
    assert!(seen[1].is_write_only() && !seen[0].is_write_only());
}

#[test]
fn a_head_not_below_the_queue_size_is_an_error() {
    let mem = guest();
    let (seen, end) = walk(&mem, SIZE);
    assert!(seen.is_empty());
    assert_eq!(
        end,
        Err(ChainError::HeadOutOfRange {
            head: SIZE,
            size: SIZE
        })
    );
}

#[test]
fn a_next_index_outside_the_table_is_an_error() {
    let mem = guest();
    desc(&mem, TABLE, 0, HDR, 16, NEXT, SIZE);
    let (seen, end) = walk(&mem, 0);
    assert_eq!(seen.len(), 1);
    assert_eq!(
        end,
        Err(ChainError::NextOutOfTable {
            next: SIZE,
            table_len: SIZE
        })
    );
}

#[test]
fn a_loop_ends_after_queue_size_descriptors() {
    let mem = guest();
    desc(&mem, TABLE, 0, HDR, 16, NEXT, 1);
    desc(&mem, TABLE, 1, DATA, 16, NEXT, 0);
    let (seen, end) = walk(&mem, 0);
    assert_eq!(seen.len(), SIZE as usize);
    assert_eq!(end, Err(ChainError::TooLong { table_len: SIZE }));
}

#[test]
fn a_chain_through_every_descriptor_is_legal_but_one_more_is_too_long() {
    let mem = guest();
    for i in 0..SIZE {
        desc(&mem, TABLE, i, DATA + 16 * u64::from(i), 16, NEXT, i + 1);
    }
    // The last one ends the chain: exactly queue-size descriptors, fine.
    desc(&mem, TABLE, SIZE - 1, STATUS, 1, VRING_DESC_F_WRITE, 0);
    let (seen, end) = walk(&mem, 0);
    assert_eq!((seen.len(), end), (SIZE as usize, Ok(())));
    // The last one points back at the head: one more than the queue holds.
    desc(
        &mem,
        TABLE,
        SIZE - 1,
        STATUS,
        1,
        VRING_DESC_F_WRITE | NEXT,
        0,
    );
    let (seen, end) = walk(&mem, 0);
    assert_eq!(seen.len(), SIZE as usize);
    assert_eq!(end, Err(ChainError::TooLong { table_len: SIZE }));
}

#[test]
fn a_descriptor_table_outside_guest_memory_is_an_error() {
    let mem = guest();
    let regions = snapshot(&mem);
    for table in [MEM_END, MEM_END - 8, u64::MAX - 15, u64::MAX] {
        let ring = SplitRing {
            desc_table: table,
            ..ring()
        };
        let (seen, end) = walk_both(ring, &regions, 0);
        assert!(seen.is_empty());
        assert!(
            matches!(end, Err(ChainError::DescriptorNotInMemory { .. })),
            "table at {table:#x}: {end:?}"
        );
    }
    // The head is in memory, its successor is the first descriptor past the end.
    let ring = SplitRing {
        desc_table: MEM_END - 16,
        ..ring()
    };
    desc(&mem, MEM_END - 16, 0, HDR, 16, NEXT, 1);
    let (seen, end) = walk_both(ring, &regions, 0);
    assert_eq!(seen.len(), 1);
    assert_eq!(
        end,
        Err(ChainError::DescriptorNotInMemory { addr: MEM_END })
    );
}

#[test]
fn a_descriptor_straddling_two_adjacent_regions_is_read_whole() {
    let mem = guest();
    let regions = snapshot(&mem);
    let table = REGION_SPLIT - 8;
    desc(&mem, table, 0, HDR, 16, 0, 0);
    let ring = SplitRing {
        desc_table: table,
        ..ring()
    };
    let (seen, end) = walk_both(ring, &regions, 0);
    assert_eq!(end, Ok(()));
    assert_eq!((seen[0].addr, seen[0].len), (HDR, 16));
}

#[test]
fn next_inside_an_indirect_table_indexes_that_table() {
    let mem = guest();
    // Queue descriptor 1 is a decoy: following it would be a bug.
    desc(&mem, TABLE, 1, 0xdead, 1, 0, 0);
    desc(&mem, TABLE, 0, INDIRECT, 3 * 16, VRING_DESC_F_INDIRECT, 0);
    desc(&mem, INDIRECT, 0, HDR, 16, NEXT, 2);
    desc(&mem, INDIRECT, 2, DATA, 512, VRING_DESC_F_WRITE | NEXT, 1);
    desc(&mem, INDIRECT, 1, STATUS, 1, VRING_DESC_F_WRITE, 0);
    let (seen, end) = walk(&mem, 0);
    assert_eq!(end, Ok(()));
    let addrs: Vec<_> = seen.iter().map(|d| d.addr).collect();
    assert_eq!(addrs, vec![HDR, DATA, STATUS]);
}

#[test]
fn an_indirect_table_outside_guest_memory_is_an_error() {
    let mem = guest();
    for (table, len) in [(MEM_END, 16), (u64::MAX - 15, 16), (MEM_END - 16, 32)] {
        desc(&mem, TABLE, 0, table, len, VRING_DESC_F_INDIRECT, 0);
        if table == MEM_END - 16 {
            desc(&mem, table, 0, HDR, 16, NEXT, 1);
        }
        let (_, end) = walk(&mem, 0);
        assert!(
            matches!(end, Err(ChainError::DescriptorNotInMemory { .. })),
            "table at {table:#x}: {end:?}"
        );
    }
}

#[test]
fn an_indirect_table_with_a_bad_length_is_an_error() {
    let mem = guest();
    for len in [0, 1, 15, 17, 16 * 65536, u32::MAX] {
        desc(&mem, TABLE, 0, INDIRECT, len, VRING_DESC_F_INDIRECT, 0);
        let (seen, end) = walk(&mem, 0);
        assert!(seen.is_empty());
        assert_eq!(end, Err(ChainError::BadIndirectLength { len }), "len {len}");
    }
}

#[test]
fn the_largest_indirect_table_is_accepted() {
    let mem = guest();
    desc(
        &mem,
        TABLE,
        0,
        INDIRECT,
        16 * 65535,
        VRING_DESC_F_INDIRECT,
        0,
    );
    desc(&mem, INDIRECT, 0, HDR, 16, 0, 0);
    let (seen, end) = walk(&mem, 0);
    assert_eq!((seen.len(), end), (1, Ok(())));
}

#[test]
fn an_indirect_descriptor_inside_an_indirect_table_is_an_error() {
    let mem = guest();
    desc(&mem, TABLE, 0, INDIRECT, 32, VRING_DESC_F_INDIRECT, 0);
    desc(&mem, INDIRECT, 0, HDR, 16, NEXT, 1);
    desc(&mem, INDIRECT, 1, INDIRECT, 32, VRING_DESC_F_INDIRECT, 0);
    let (seen, end) = walk(&mem, 0);
    assert_eq!(seen.len(), 1);
    assert_eq!(end, Err(ChainError::NestedIndirect));
}

#[test]
fn a_loop_inside_an_indirect_table_ends_after_its_length() {
    let mem = guest();
    desc(&mem, TABLE, 0, INDIRECT, 4 * 16, VRING_DESC_F_INDIRECT, 0);
    desc(&mem, INDIRECT, 0, HDR, 16, NEXT, 1);
    desc(&mem, INDIRECT, 1, DATA, 16, NEXT, 0);
    let (seen, end) = walk(&mem, 0);
    assert_eq!(seen.len(), 4);
    assert_eq!(end, Err(ChainError::TooLong { table_len: 4 }));
    // And past its end.
    desc(&mem, INDIRECT, 1, DATA, 16, NEXT, 4);
    let (_, end) = walk(&mem, 0);
    assert_eq!(
        end,
        Err(ChainError::NextOutOfTable {
            next: 4,
            table_len: 4
        })
    );
}

#[test]
fn direct_descriptors_then_an_indirect_table_are_walked_like_virtio_queue() {
    let mem = guest();
    desc(&mem, TABLE, 0, HDR, 16, NEXT, 1);
    // NEXT on the indirect descriptor is ignored: the chain continues in the table.
    desc(
        &mem,
        TABLE,
        1,
        INDIRECT,
        16,
        VRING_DESC_F_INDIRECT | NEXT,
        2,
    );
    desc(&mem, TABLE, 2, 0xdead, 1, 0, 0);
    desc(&mem, INDIRECT, 0, STATUS, 1, VRING_DESC_F_WRITE, 0);
    let (seen, end) = walk(&mem, 0);
    assert_eq!(end, Ok(()));
    let addrs: Vec<_> = seen.iter().map(|d| d.addr).collect();
    assert_eq!(addrs, vec![HDR, STATUS]);
}

#[test]
fn a_chain_of_4_gib_is_an_error() {
    let mem = guest();
    desc(&mem, TABLE, 0, DATA, u32::MAX, NEXT, 1);
    desc(&mem, TABLE, 1, DATA, 1, 0, 0);
    let (seen, end) = walk(&mem, 0);
    assert_eq!(seen.len(), 1);
    assert_eq!(end, Err(ChainError::TooManyBytes));
}

#[test]
fn a_failed_walk_stays_failed() {
    let mem = guest();
    let regions = snapshot(&mem);
    let mut walk = ring().map(&regions).chain(SIZE);
    let first = walk.next_descriptor();
    assert!(first.is_err());
    assert_eq!(walk.next_descriptor(), first);
    assert_eq!(walk.error(), first.err());
}

#[test]
fn the_avail_index_and_entries_are_read_through_the_snapshot() {
    let mem = guest();
    mem.write_obj(7u16.to_le(), GuestAddress(AVAIL + 2))
        .unwrap();
    mem.write_obj(5u16.to_le(), GuestAddress(AVAIL + 4 + 2 * 3))
        .unwrap();
    let regions = snapshot(&mem);
    let mapped = ring().map(&regions);
    assert_eq!(ring().avail_idx(&regions), Ok(7));
    assert_eq!(mapped.avail_idx(), Ok(7));
    // Positions wrap at the queue size.
    for position in [0, 3, 3 + SIZE, 7, u16::MAX] {
        assert_eq!(mapped.head(position), ring().head(&regions, position));
    }
    assert_eq!(mapped.head(3), Ok(5));
    assert_eq!(ring().head(&regions, 3 + SIZE), Ok(5));
    assert_eq!(ring().head(&regions, u16::MAX), ring().head(&regions, 7));
}

#[test]
fn an_avail_ring_outside_guest_memory_or_misaligned_is_an_error() {
    let mem = guest();
    let regions = snapshot(&mem);
    for avail in [MEM_END, MEM_END - 2, u64::MAX - 1, u64::MAX] {
        let ring = SplitRing {
            avail_ring: avail,
            ..ring()
        };
        assert!(
            matches!(
                ring.avail_idx(&regions),
                Err(RingError::AvailNotInMemory { .. })
            ),
            "avail at {avail:#x}"
        );
        assert!(matches!(
            ring.head(&regions, 0),
            Err(RingError::AvailNotInMemory { .. })
        ));
        let mapped = ring.map(&regions);
        assert_eq!(mapped.avail_idx(), ring.avail_idx(&regions));
        assert_eq!(mapped.head(0), ring.head(&regions, 0));
    }
    let odd = SplitRing {
        avail_ring: AVAIL + 1,
        ..ring()
    };
    assert_eq!(
        odd.avail_idx(&regions),
        Err(RingError::AvailIndexMisaligned { addr: AVAIL + 3 })
    );
    assert_eq!(odd.map(&regions).avail_idx(), odd.avail_idx(&regions));
    let empty = SplitRing { size: 0, ..ring() };
    assert_eq!(empty.head(&regions, 0), Err(RingError::EmptyQueue));
    assert_eq!(empty.map(&regions).head(0), Err(RingError::EmptyQueue));
}

#[test]
fn an_unaligned_table_is_read_correctly() {
    let mem = guest();
    let regions = snapshot(&mem);
    for table in [0x2001u64, 0x2004, 0x2008] {
        desc(
            &mem,
            table,
            0,
            0x1122_3344_5566_7788,
            0x99aa_bbcc,
            NEXT | VRING_DESC_F_WRITE,
            1,
        );
        desc(&mem, table, 1, HDR, 16, 0, 0);
        let ring = SplitRing {
            desc_table: table,
            ..ring()
        };
        let (seen, end) = walk_both(ring, &regions, 0);
        assert_eq!(end, Ok(()));
        assert_eq!(
            seen[0],
            Descriptor {
                addr: 0x1122_3344_5566_7788,
                len: 0x99aa_bbcc,
                flags: (NEXT | VRING_DESC_F_WRITE) as u16,
                next: 1
            }
        );
        assert_eq!((seen[1].addr, seen[1].len), (HDR, 16));
    }
}

#[test]
fn an_indirect_table_across_two_regions_is_read_descriptor_by_descriptor() {
    let mem = guest();
    let table = REGION_SPLIT - 16;
    desc(&mem, TABLE, 0, table, 32, VRING_DESC_F_INDIRECT, 0);
    desc(&mem, table, 0, HDR, 16, NEXT, 1);
    desc(&mem, table, 1, STATUS, 1, VRING_DESC_F_WRITE, 0);
    let (seen, end) = walk(&mem, 0);
    assert_eq!(end, Ok(()));
    let addrs: Vec<_> = seen.iter().map(|d| d.addr).collect();
    assert_eq!(addrs, vec![HDR, STATUS]);
}

#[test]
fn a_queue_table_only_partly_in_memory_fails_only_past_the_end() {
    let mem = guest();
    let regions = snapshot(&mem);
    // Entries 0 and 1 in memory, the rest of the 8-entry table past its end.
    let table = MEM_END - 32;
    desc(&mem, table, 0, HDR, 16, NEXT, 1);
    desc(&mem, table, 1, STATUS, 1, VRING_DESC_F_WRITE, 0);
    let ring = SplitRing {
        desc_table: table,
        ..ring()
    };
    let (seen, end) = walk_both(ring, &regions, 0);
    assert_eq!((seen.len(), end), (2, Ok(())));
    desc(&mem, table, 1, STATUS, 1, VRING_DESC_F_WRITE | NEXT, 2);
    let (_, end) = walk_both(ring, &regions, 0);
    assert_eq!(
        end,
        Err(ChainError::DescriptorNotInMemory { addr: MEM_END })
    );
}

/// Found by the drain_ring fuzzer (inputs that took 14 to 69 s): every avail entry naming
/// the same looping, full-size indirect table made each chain walk 65535 descriptors. A chain
/// now ends after MAX_CHAIN_DESCRIPTORS, direct and indirect descriptors together, while an
/// indirect chain longer than the queue but within that bound (what Linux builds) is whole.
#[test]
fn a_chain_ends_at_the_chain_bound_even_through_a_large_indirect_table() {
    let mem = guest();
    let max = usize::from(MAX_CHAIN_DESCRIPTORS);
    // A looping indirect table of 2 * max entries: longer than the bound, shorter than its
    // own.
    let entries = 2 * MAX_CHAIN_DESCRIPTORS;
    desc(
        &mem,
        TABLE,
        0,
        INDIRECT,
        u32::from(entries) * 16,
        VRING_DESC_F_INDIRECT,
        0,
    );
    for i in 0..entries {
        desc(&mem, INDIRECT, i, HDR, 16, NEXT, (i + 1) % entries);
    }
    let (seen, end) = walk(&mem, 0);
    assert_eq!(seen.len(), max);
    assert_eq!(
        end,
        Err(ChainError::TooManyDescriptors {
            max: MAX_CHAIN_DESCRIPTORS
        })
    );

    // Direct descriptors count too: 3 direct, then the table yields max - 3 more at most.
    desc(&mem, TABLE, 0, HDR, 16, NEXT, 1);
    desc(&mem, TABLE, 1, DATA, 16, NEXT, 2);
    desc(&mem, TABLE, 2, DATA, 16, NEXT, 3);
    desc(
        &mem,
        TABLE,
        3,
        INDIRECT,
        u32::from(entries) * 16,
        VRING_DESC_F_INDIRECT,
        0,
    );
    let (seen, end) = walk(&mem, 0);
    assert_eq!(seen.len(), max);
    assert!(matches!(end, Err(ChainError::TooManyDescriptors { .. })));

    // A chain of exactly the bound is whole (far longer than this queue of SIZE): 3 direct +
    // max - 3 indirect, the last one without NEXT.
    let last = MAX_CHAIN_DESCRIPTORS - 4;
    desc(
        &mem,
        TABLE,
        3,
        INDIRECT,
        (u32::from(last) + 1) * 16,
        VRING_DESC_F_INDIRECT,
        0,
    );
    desc(&mem, INDIRECT, last, STATUS, 1, VRING_DESC_F_WRITE, 0);
    let (seen, end) = walk(&mem, 0);
    assert_eq!((seen.len(), end), (max, Ok(())));
}
