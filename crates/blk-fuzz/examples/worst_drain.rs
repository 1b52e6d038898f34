//! What one drain costs at worst on a ring the server can be handed: a queue of 1024 whose
//! every avail entry names a chain through a full indirect table (65535 descriptors, looping,
//! so the walk runs to its bound: 1024 since blk-proto caps chains there, 65535 before).
//! Prints time per drain.
//!
//!     cargo run --release -p blk-fuzz --example worst_drain

use std::sync::Arc;
use std::time::Instant;

use blk_fuzz::drain::drain;
use blk_fuzz::guest::{GuardedGuest, RegionSpec};
use blk_proto::{DeviceConfig, GuestRegions, Request, SplitRing};
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT};
use vm_memory::{Bytes, GuestAddress};

fn descriptor(addr: u64, len: u32, flags: u32, next: u16) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&addr.to_le_bytes());
    b[8..12].copy_from_slice(&len.to_le_bytes());
    b[12..14].copy_from_slice(&(flags as u16).to_le_bytes());
    b[14..].copy_from_slice(&next.to_le_bytes());
    b
}

fn main() {
    const SIZE: u16 = 1024;
    const TABLE: u64 = 0x10_0000;
    const ENTRIES: u32 = 65535;
    // 2 MiB + 64 KiB of guest memory: rings at 0, the indirect table at 1 MiB.
    let guest = GuardedGuest::new(&[RegionSpec {
        guest_start: 0,
        pages: 528,
    }])
    .expect("guest memory");
    let mem = guest.mem();
    let ring = SplitRing {
        desc_table: 0,
        avail_ring: 0x4000,
        size: SIZE,
    };
    mem.write_slice(
        &descriptor(TABLE, 16 * ENTRIES, VRING_DESC_F_INDIRECT, 0),
        GuestAddress(0),
    )
    .unwrap();
    for i in 0..ENTRIES {
        // Readable, empty, each pointing at the next: the walk reads all of them and the
        // last one points back at the first (the loop the bound ends).
        let next = ((i + 1) % ENTRIES) as u16;
        let d = descriptor(0x8000, 0, VRING_DESC_F_NEXT, next);
        mem.write_slice(&d, GuestAddress(TABLE + 16 * u64::from(i)))
            .unwrap();
    }
    let cfg = DeviceConfig::new(64 << 20, 512, 1, SIZE);
    let regions = GuestRegions::new(Arc::clone(mem));
    let mapped = ring.map(&regions);
    let rounds = 5u16;
    let start = Instant::now();
    let mut popped = 0usize;
    let mut next_avail = 0u16;
    for round in 1..=rounds {
        // Publish a whole queue of heads, all 0.
        mem.write_slice(&(round * SIZE).to_le_bytes(), GuestAddress(0x4002))
            .unwrap();
        drain(
            &mapped,
            &cfg,
            &mut next_avail,
            usize::MAX,
            || Request::for_config(&cfg),
            |_| popped += 1,
        );
    }
    let per_drain = start.elapsed() / u32::from(rounds);
    println!("{popped} chains in {rounds} drains: {per_drain:?} per drain");
    // The snapshot goes before the guest it points into.
    drop(regions);
}
