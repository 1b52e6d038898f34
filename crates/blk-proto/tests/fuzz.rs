//! Random descriptor chains (random addresses, lengths, flags, next indexes, indirect tables,
//! headers and payloads) never panic the parser, and whatever it returns stays inside guest
//! memory and inside the request's preallocated capacity.

mod common;

use blk_proto::{DeviceConfig, ParseError, RawRange, Request, RequestHeader, RequestKind};
use common::*;
use proptest::prelude::*;
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};

/// Addresses that hit the interesting places: buffers, the region boundary, the end of
/// memory, the indirect area, and anywhere at all.
fn address() -> impl Strategy<Value = u64> {
    prop_oneof![
        (0u64..0x100).prop_map(|o| HDR + o),
        (0u64..0x4000).prop_map(|o| DATA + o),
        (0u64..0x400).prop_map(|o| REGION_SPLIT - 0x200 + o),
        (0u64..0x400).prop_map(|o| MEM_END - 0x200 + o),
        (0u64..0x200).prop_map(|o| INDIRECT + o),
        any::<u64>(),
    ]
}

fn length() -> impl Strategy<Value = u32> {
    prop_oneof![
        Just(0u32),
        Just(1),
        Just(16),
        0u32..64,
        0u32..0x2000,
        (1u32..16).prop_map(|blocks| blocks * 512),
        Just(u32::MAX),
        any::<u32>(),
    ]
}

fn descriptor() -> impl Strategy<Value = RawDescriptor> {
    // flags: any mix of NEXT (1), WRITE (2), INDIRECT (4); next: inside and outside the table.
    (address(), length(), 0u32..8, 0u16..20).prop_map(|(a, l, f, n)| raw(a, l, f, n))
}

fn request_type() -> impl Strategy<Value = u32> {
    prop_oneof![
        4 => prop::sample::select(vec![0u32, 1, 4, 8, 11, 13, 0x8000_0000, 0x8000_000b]),
        1 => any::<u32>(),
    ]
}

fn config() -> impl Strategy<Value = DeviceConfig> {
    (
        prop::bool::ANY,
        prop::bool::ANY,
        prop::bool::ANY,
        prop::bool::ANY,
        1u32..6,
        1u32..4,
    )
        .prop_map(
            |(big_blocks, discard, write_zeroes, read_only, seg_max, max_seg)| {
                let lbs = if big_blocks { 4096 } else { 512 };
                let mut cfg = DeviceConfig::new(CAPACITY_BYTES, lbs, 1, 16);
                cfg.discard = discard;
                cfg.write_zeroes = write_zeroes;
                cfg.read_only = read_only;
                cfg.seg_max = seg_max;
                cfg.max_discard_seg = max_seg;
                cfg.max_write_zeroes_seg = max_seg;
                cfg
            },
        )
}

/// Whether [ptr, ptr+len) lies inside one of the guest's host mappings.
fn inside_guest(mem: &Mem, ptr: *const u8, len: usize) -> bool {
    let regions = [(0, REGION_SPLIT), (REGION_SPLIT, MEM_END - REGION_SPLIT)];
    regions.iter().any(|&(start, size)| {
        let base = host(mem, start) as usize;
        let p = ptr as usize;
        p >= base
            && p.checked_add(len)
                .is_some_and(|end| end <= base + size as usize)
    })
}

/// A chain shaped like a real request (header, readable payload, writable data, status),
/// linked properly, then optionally damaged in one descriptor.
#[derive(Debug, Clone)]
struct Shaped {
    header_len: u32,
    readable: Vec<(u64, u32)>,
    writable: Vec<(u64, u32)>,
    status: (u64, u32),
    damage: Option<(usize, u32, u16, Option<u32>)>,
}

fn buffer() -> impl Strategy<Value = (u64, u32)> {
    let addr = prop_oneof![
        4 => (0u64..4).prop_map(|k| DATA + 16 * k),
        4 => (0u64..0x400).prop_map(|o| DATA + 0x1000 + o),
        2 => (0u64..0x400).prop_map(|o| REGION_SPLIT - 0x200 + o),
        1 => (0u64..0x200).prop_map(|o| MEM_END - 0x100 + o),
    ];
    let len = prop_oneof![
        (0u32..5).prop_map(|k| 16 * k),
        (0u32..9).prop_map(|k| 512 * k),
        0u32..0x1000,
    ];
    (addr, len)
}

fn shaped() -> impl Strategy<Value = Shaped> {
    (
        prop::sample::select(vec![16u32, 16, 16, 16, 16, 16, 8, 15, 32, 16 + 512]),
        prop::collection::vec(buffer(), 0..4),
        prop::collection::vec(buffer(), 0..5),
        prop_oneof![3 => Just((STATUS, 1u32)), 1 => buffer()],
        proptest::option::weighted(
            0.3,
            (
                0usize..10,
                0u32..8,
                0u16..12,
                proptest::option::of(length()),
            ),
        ),
    )
        .prop_map(|(header_len, readable, writable, status, damage)| Shaped {
            header_len,
            readable,
            writable,
            status,
            damage,
        })
}

impl Shaped {
    fn table(&self) -> Vec<RawDescriptor> {
        let mut descs = vec![(HDR, self.header_len, 0u32)];
        descs.extend(self.readable.iter().map(|&(a, l)| (a, l, 0)));
        descs.extend(
            self.writable
                .iter()
                .map(|&(a, l)| (a, l, VRING_DESC_F_WRITE)),
        );
        descs.push((self.status.0, self.status.1, VRING_DESC_F_WRITE));
        let count = descs.len();
        let mut table: Vec<RawDescriptor> = descs
            .iter()
            .enumerate()
            .map(|(i, &(addr, len, flags))| {
                if i + 1 < count {
                    raw(addr, len, flags | VRING_DESC_F_NEXT, i as u16 + 1)
                } else {
                    raw(addr, len, flags, 0)
                }
            })
            .collect();
        if let Some((index, flags, next, len)) = self.damage {
            let index = index % count;
            let desc = SplitDescriptor::from(table[index]);
            table[index] = raw(desc.addr().0, len.unwrap_or(desc.len()), flags, next);
        }
        table
    }
}

/// Lays out guest memory for a case: headers at HDR (+0x40, +0x80), discard segments then
/// random bytes at DATA, an indirect table at INDIRECT.
fn prepare(
    mem: &Mem,
    header: RequestHeader,
    segments: &[RawRange],
    payload: &[u8],
    indirect: &[RawDescriptor],
) {
    for offset in [0u64, 0x40, 0x80] {
        mem.write_slice(&header.to_le_bytes(), GuestAddress(HDR + offset))
            .unwrap();
    }
    for (i, segment) in segments.iter().enumerate() {
        mem.write_slice(&segment.to_le_bytes(), GuestAddress(DATA + 16 * i as u64))
            .unwrap();
    }
    mem.write_slice(payload, GuestAddress(DATA + 16 * segments.len() as u64))
        .unwrap();
    for (i, desc) in indirect.iter().enumerate() {
        write_raw(mem, INDIRECT + 16 * i as u64, *desc);
    }
}

fn segment() -> impl Strategy<Value = RawRange> {
    (
        prop_oneof![0u64..0x2_0000, any::<u64>()],
        prop_oneof![0u32..64, any::<u32>()],
        prop_oneof![0u32..3, any::<u32>()],
    )
        .prop_map(|(sector, num_sectors, flags)| RawRange {
            sector,
            num_sectors,
            flags,
        })
}

/// Parses `table` and checks what the parser promises, whatever the input.
fn parse_and_check(
    mem: &Mem,
    table: &[RawDescriptor],
    cfg: &DeviceConfig,
    iovec_capacity: usize,
    range_capacity: usize,
) -> Result<Result<(), ParseError>, TestCaseError> {
    let mut req = Request::with_capacity(iovec_capacity, range_capacity);
    let (iovecs_ptr, ranges_ptr) = (req.iovecs.as_ptr(), req.ranges.as_ptr());
    let queue = MockSplitQueue::new(mem, 16);
    let chain = queue.build_multiple_desc_chains(table).unwrap();
    // The walker's twin parse is checked against this one inside (same result, same request).
    let result = parse_both_ways(mem, &queue, 16, chain, cfg, &mut req);

    // Never reallocated.
    prop_assert_eq!(req.iovecs.as_ptr(), iovecs_ptr);
    prop_assert_eq!(req.ranges.as_ptr(), ranges_ptr);
    let has_status = match &result {
        Ok(()) => true,
        Err(e) => e.status().is_some(),
    };
    if has_status {
        prop_assert!(!req.status.is_null());
        prop_assert!(inside_guest(mem, req.status, 1));
    }
    if result.is_ok() {
        let mut total = 0usize;
        for iov in &req.iovecs {
            prop_assert!(inside_guest(mem, iov.iov_base as *const u8, iov.iov_len));
            total += iov.iov_len;
        }
        prop_assert_eq!(total, req.data_len as usize);
        if matches!(req.kind, RequestKind::Read | RequestKind::Write) {
            let block = cfg.logical_block_size;
            prop_assert_eq!(req.data_len % block, 0);
            prop_assert!(req.data_len <= cfg.max_transfer_bytes);
            let end = req.sector.checked_add(u64::from(req.data_len / 512));
            prop_assert!(end.is_some_and(|end| end <= cfg.capacity_sectors));
        }
        for range in &req.ranges {
            let end = range.sector.checked_add(u64::from(range.num_sectors));
            prop_assert!(end.is_some_and(|end| end <= cfg.capacity_sectors));
            prop_assert!(range.num_sectors > 0);
            prop_assert!(!range.unmap || req.kind == RequestKind::WriteZeroes);
        }
    }
    Ok(result)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn random_tables_never_escape_guest_memory(
        table in prop::collection::vec(descriptor(), 1..12),
        indirect in prop::collection::vec(descriptor(), 0..8),
        request_type in request_type(),
        sector in prop_oneof![0u64..0x30000, any::<u64>()],
        segments in prop::collection::vec(segment(), 0..4),
        payload in prop::collection::vec(any::<u8>(), 64),
        cfg in config(),
        iovec_capacity in 0usize..8,
        range_capacity in 0usize..4,
    ) {
        let mem = guest();
        let header = RequestHeader { request_type, ioprio: 0, sector };
        prepare(&mem, header, &segments, &payload, &indirect);
        let _outcome = parse_and_check(&mem, &table, &cfg, iovec_capacity, range_capacity)?;
    }

    #[test]
    fn request_shaped_chains_never_escape_guest_memory(
        shape in shaped(),
        request_type in request_type(),
        sector in prop_oneof![0u64..0x30000, any::<u64>()],
        segments in prop::collection::vec(segment(), 0..4),
        payload in prop::collection::vec(any::<u8>(), 64),
        cfg in config(),
        iovec_capacity in 0usize..8,
        range_capacity in 0usize..4,
    ) {
        let mem = guest();
        let header = RequestHeader { request_type, ioprio: 0, sector };
        prepare(&mem, header, &segments, &payload, &[]);
        let result = parse_and_check(&mem, &shape.table(), &cfg, iovec_capacity, range_capacity)?;
        if std::env::var_os("BLK_PROTO_FUZZ_STATS").is_some() {
            eprintln!("OUTCOME {:?}", result.map_err(|e| e.status()));
        }
    }
}
