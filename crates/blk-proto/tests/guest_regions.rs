//! The region snapshot: one-region and multi-region translation, every boundary, overflow.

mod common;

use std::sync::Arc;

use blk_proto::GuestRegions;
use common::*;
use vm_memory::{GuestAddress, GuestMemoryMmap};

fn snapshot(mem: &Mem) -> GuestRegions {
    GuestRegions::new(Arc::new(mem.clone()))
}

#[test]
fn a_range_inside_a_region_maps_to_its_host_address() {
    let mem = guest();
    let regions = snapshot(&mem);
    assert_eq!(regions.host(DATA, 4096), Some(host(&mem, DATA)));
    assert_eq!(regions.host(0, REGION_SPLIT), Some(host(&mem, 0)));
    assert_eq!(
        regions.host(REGION_SPLIT, MEM_END - REGION_SPLIT),
        Some(host(&mem, REGION_SPLIT))
    );
    assert_eq!(regions.host(MEM_END - 1, 1), Some(host(&mem, MEM_END - 1)));
}

#[test]
fn a_range_past_the_end_or_across_regions_does_not_map() {
    let mem = guest();
    let regions = snapshot(&mem);
    assert_eq!(regions.host(MEM_END, 1), None);
    assert_eq!(regions.host(MEM_END - 1, 2), None);
    assert_eq!(regions.host(REGION_SPLIT - 1, 2), None, "crosses regions");
    assert_eq!(regions.host(u64::MAX, 1), None);
    assert_eq!(regions.host(u64::MAX, u64::MAX), None);
    assert_eq!(regions.host(0, u64::MAX), None);
    assert_eq!(regions.host(DATA, u64::MAX), None);
}

#[test]
fn the_single_region_case_checks_both_ends() {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0x1000), 0x2000)]).unwrap();
    let regions = snapshot(&mem);
    assert_eq!(regions.host(0xfff, 1), None, "below the region");
    assert_eq!(regions.host(0x1000, 0x2000), Some(host(&mem, 0x1000)));
    assert_eq!(regions.host(0x1000, 0x2001), None);
    assert_eq!(regions.host(0x2fff, 1), Some(host(&mem, 0x2fff)));
    assert_eq!(regions.host(0x3000, 0), None, "past the end, even empty");
    assert_eq!(regions.host(0x2000, u64::MAX - 0x1000), None);
}

#[test]
fn pieces_split_at_the_region_boundary_and_stop_at_a_hole() {
    let mem = guest();
    let regions = snapshot(&mem);
    let pieces: Vec<_> = regions.pieces(REGION_SPLIT - 16, 48).collect();
    assert_eq!(
        pieces,
        vec![
            Some((host(&mem, REGION_SPLIT - 16), 16)),
            Some((host(&mem, REGION_SPLIT), 32))
        ]
    );
    let pieces: Vec<_> = regions.pieces(MEM_END - 16, 32).collect();
    assert_eq!(pieces, vec![Some((host(&mem, MEM_END - 16), 16)), None]);
    assert_eq!(
        regions.pieces(u64::MAX, u64::MAX).collect::<Vec<_>>(),
        vec![None]
    );
    assert!(regions.pieces(DATA, 0).next().is_none());
    assert!(regions.contains(REGION_SPLIT - 16, 48));
    assert!(!regions.contains(MEM_END - 16, 32));
}

#[test]
fn read_copies_across_regions_and_fails_outside_memory() {
    let mem = guest();
    let bytes = fill(&mem, REGION_SPLIT - 8, 16, 7);
    let regions = snapshot(&mem);
    let mut buf = [0u8; 16];
    assert!(regions.read(REGION_SPLIT - 8, &mut buf));
    assert_eq!(buf.to_vec(), bytes);
    assert!(!regions.read(MEM_END - 8, &mut buf));
}

#[test]
fn an_empty_snapshot_maps_nothing() {
    let regions = GuestRegions::empty();
    assert_eq!(regions.host(0, 1), None);
    assert!(!regions.contains(0, 1));
    assert!(!regions.read(0, &mut [0u8; 1]));
}

#[test]
fn a_snapshot_knows_its_memory() {
    let mem = Arc::new(guest());
    let regions = GuestRegions::new(mem.clone());
    assert!(regions.is_snapshot_of(&mem));
    assert!(!regions.is_snapshot_of(&Arc::new(guest())));
    assert!(!GuestRegions::empty().is_snapshot_of(&mem));
}
