//! Test guest: two adjacent memory regions, a split virtqueue at address 0, helpers to lay out
//! descriptor chains and parse them (both ways: virtio-queue's chain with `parse`, and the
//! split-ring walker with `parse_walk`, which must agree).
#![allow(dead_code)]

use std::sync::Arc;

pub use blk_fuzz::assert_same_request;

use blk_proto::{
    parse, parse_walk, ChainError, DeviceConfig, GuestRegions, ParseError, Request, RequestHeader,
    SplitRing,
};
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

pub type Mem = GuestMemoryMmap<()>;

/// Where the second memory region starts (the first one is [0, REGION_SPLIT)).
pub const REGION_SPLIT: u64 = 0x10_0000;
/// First address past guest memory.
pub const MEM_END: u64 = 0x20_0000;
/// Queue size of the mock queue; its rings occupy [0, 0x2000).
pub const QUEUE_SIZE: u16 = 256;
/// Buffers live from here on.
pub const HDR: u64 = 0x1_0000;
pub const DATA: u64 = 0x2_0000;
pub const STATUS: u64 = 0x3_0000;
/// Indirect descriptor tables live here.
pub const INDIRECT: u64 = 0x8_0000;
/// A disk of 64 MiB.
pub const CAPACITY_BYTES: u64 = 64 << 20;

pub fn guest() -> Mem {
    GuestMemoryMmap::from_ranges(&[
        (GuestAddress(0), REGION_SPLIT as usize),
        (
            GuestAddress(REGION_SPLIT),
            (MEM_END - REGION_SPLIT) as usize,
        ),
    ])
    .expect("test guest memory")
}

pub fn config() -> DeviceConfig {
    DeviceConfig::new(CAPACITY_BYTES, 512, 1, QUEUE_SIZE)
}

/// One descriptor of a chain to build: guest address, length, device-writable or not.
#[derive(Clone, Copy, Debug)]
pub struct D {
    pub addr: u64,
    pub len: u32,
    pub write: bool,
}

pub fn r(addr: u64, len: u32) -> D {
    D {
        addr,
        len,
        write: false,
    }
}

pub fn w(addr: u64, len: u32) -> D {
    D {
        addr,
        len,
        write: true,
    }
}

pub fn raw(addr: u64, len: u32, flags: u32, next: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags as u16, next))
}

fn flags_of(d: &D) -> u32 {
    if d.write {
        VRING_DESC_F_WRITE
    } else {
        0
    }
}

/// Writes a request header at `addr`.
pub fn put_header(mem: &Mem, addr: u64, request_type: u32, sector: u64) {
    let header = RequestHeader {
        request_type,
        ioprio: 0,
        sector,
    };
    mem.write_slice(&header.to_le_bytes(), GuestAddress(addr))
        .expect("header inside guest memory");
}

/// Builds `descs` as one chain in the mock queue and parses it.
pub fn parse_descs(
    mem: &Mem,
    cfg: &DeviceConfig,
    descs: &[D],
    out: &mut Request,
) -> Result<(), ParseError> {
    let raws: Vec<RawDescriptor> = descs
        .iter()
        .map(|d| raw(d.addr, d.len, flags_of(d), 0))
        .collect();
    let queue = MockSplitQueue::new(mem, QUEUE_SIZE);
    let chain = queue.build_desc_chain(&raws).expect("mock chain");
    parse_both_ways(mem, &queue, QUEUE_SIZE, chain, cfg, out)
}

/// Parses a chain whose descriptor table entries (flags and next included) are given as is,
/// head at index 0.
pub fn parse_raw_table(
    mem: &Mem,
    cfg: &DeviceConfig,
    table: &[RawDescriptor],
    out: &mut Request,
) -> Result<(), ParseError> {
    let queue = MockSplitQueue::new(mem, QUEUE_SIZE);
    let chain = queue.build_multiple_desc_chains(table).expect("mock chain");
    parse_both_ways(mem, &queue, QUEUE_SIZE, chain, cfg, out)
}

/// Parses `chain` (the one the mock queue published first) with `parse` into `out`, and the
/// same chain walked from the split ring with `parse_walk` into a twin of `out`; panics unless
/// both give the same result and the same request. Returns the result. The one difference
/// allowed: the walker refuses a chain longer than the queue, which virtio-queue follows
/// through an indirect table (blk_proto::split_ring's module doc).
pub fn parse_both_ways(
    mem: &Mem,
    queue: &MockSplitQueue<'_, Mem>,
    queue_size: u16,
    chain: DescriptorChain<&Mem>,
    cfg: &DeviceConfig,
    out: &mut Request,
) -> Result<(), ParseError> {
    let mut twin = Request::with_capacity(out.iovecs.capacity(), out.ranges.capacity());
    let (walked, why) = parse_walked_why(mem, queue, queue_size, cfg, &mut twin);
    let result = parse(chain, cfg, out);
    if matches!(why, Some(ChainError::TooManyDescriptors { .. })) {
        assert_eq!(walked, Err(ParseError::DescriptorChain));
        return result;
    }
    assert_eq!(walked, result, "parse_walk and parse disagree");
    assert_same_request(&twin, out);
    result
}

/// `parse_walk` over the chain at avail ring position 0 of `queue`.
pub fn parse_walked(
    mem: &Mem,
    queue: &MockSplitQueue<'_, Mem>,
    queue_size: u16,
    cfg: &DeviceConfig,
    out: &mut Request,
) -> Result<(), ParseError> {
    parse_walked_why(mem, queue, queue_size, cfg, out).0
}

/// As [`parse_walked`], with the walk's error, if any.
pub fn parse_walked_why(
    mem: &Mem,
    queue: &MockSplitQueue<'_, Mem>,
    queue_size: u16,
    cfg: &DeviceConfig,
    out: &mut Request,
) -> (Result<(), ParseError>, Option<ChainError>) {
    // A clone shares the mappings (regions are reference counted).
    let regions = GuestRegions::new(Arc::new(mem.clone()));
    let ring = SplitRing {
        desc_table: queue.desc_table_addr().0,
        avail_ring: queue.avail_addr().0,
        size: queue_size,
    };
    // The server's path: the ring mapped once.
    let ring = ring.map(&regions);
    let head = ring.head(0).expect("avail ring in memory");
    let mut walk = ring.chain(head);
    let result = parse_walk(&mut walk, cfg, out);
    (result, walk.error())
}

/// Writes `descs` as a properly linked indirect table at `table_addr` and returns the
/// descriptor that points at it.
pub fn indirect_table(mem: &Mem, table_addr: u64, descs: &[D]) -> RawDescriptor {
    for (i, d) in descs.iter().enumerate() {
        let last = i + 1 == descs.len();
        let flags = flags_of(d) | if last { 0 } else { VRING_DESC_F_NEXT };
        let next = if last { 0 } else { i as u16 + 1 };
        write_raw(
            mem,
            table_addr + 16 * i as u64,
            raw(d.addr, d.len, flags, next),
        );
    }
    raw(
        table_addr,
        16 * descs.len() as u32,
        VRING_DESC_F_INDIRECT,
        0,
    )
}

pub fn write_raw(mem: &Mem, addr: u64, desc: RawDescriptor) {
    mem.write_obj(desc, GuestAddress(addr))
        .expect("descriptor inside guest memory");
}

pub fn host(mem: &Mem, addr: u64) -> *mut u8 {
    mem.get_host_address(GuestAddress(addr))
        .expect("address inside guest memory")
}

/// A request with room for the default config's limits.
pub fn request() -> Request {
    Request::for_config(&config())
}

/// Fills [addr, addr+len) with a pattern derived from `seed`, returns the bytes written.
pub fn fill(mem: &Mem, addr: u64, len: usize, seed: u8) -> Vec<u8> {
    let bytes: Vec<u8> = (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect();
    mem.write_slice(&bytes, GuestAddress(addr))
        .expect("inside guest memory");
    bytes
}

pub fn read_guest(mem: &Mem, addr: u64, len: usize) -> Vec<u8> {
    let mut bytes = vec![0u8; len];
    mem.read_slice(&mut bytes, GuestAddress(addr))
        .expect("inside guest memory");
    bytes
}

/// Copies the bytes the iovecs point at.
pub fn gather(req: &Request) -> Vec<u8> {
    let mut bytes = Vec::new();
    for iov in &req.iovecs {
        // SAFETY: parse() only produces iovecs inside the test's guest memory, which is
        // alive for the whole test.
        let part = unsafe { std::slice::from_raw_parts(iov.iov_base as *const u8, iov.iov_len) };
        bytes.extend_from_slice(part);
    }
    bytes
}

/// Writes `data` through the iovecs, in order (as an executor serving a read would).
pub fn scatter(req: &Request, data: &[u8]) {
    let mut offset = 0;
    for iov in &req.iovecs {
        let take = iov.iov_len.min(data.len() - offset);
        // SAFETY: as in gather(); the test owns the guest memory and nothing else touches it.
        unsafe {
            std::ptr::copy_nonoverlapping(data[offset..].as_ptr(), iov.iov_base as *mut u8, take)
        };
        offset += take;
    }
    assert_eq!(offset, data.len(), "iovecs shorter than the data");
}
