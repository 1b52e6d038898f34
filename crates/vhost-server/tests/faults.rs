//! Host faults through the whole server: chains go in through split virtqueues in guest
//! memory, `VhostUserBlk::handle_event` drains them into the engine, and the engine hands its
//! ops to the fault-injecting storage backend (engine `FaultStorage`: an in-memory disk that
//! fails chosen ops and records every op it saw). Each fault must reach the guest as
//! VIRTIO_BLK_S_IOERR, short transfers and EAGAIN must be retried into an OK with the right
//! data, other queues must not notice, no request may be left unanswered, and with the write
//! cache off every write-type op must be durable before it completes.

mod support;

use std::sync::Arc;
use std::time::Duration;

use blk_proto::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
};
use engine::storage::{Fault, FaultRule, FaultStorage, IoKind, OpRecord};
use engine::Storage;
use support::*;
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace};

const CAPACITY: usize = 1 << 20;
const MEM_LEN: usize = 0x10_0000;
const QSIZE: u16 = 64;
const TIMEOUT: Duration = Duration::from_secs(10);
/// Per queue: headers at HDR + 0x400 q, status bytes at STATUS + 0x100 q, data at DATA + 0x2_0000 q.
const HDR: u64 = 0x4000;
const STATUS: u64 = 0x6000;
const DATA: u64 = 0x2_0000;
/// Not a status value: a status byte still holding it was never written.
const UNANSWERED: u8 = 0xee;

/// Queue q's rings at `q * 0x1000`: table 0x400 bytes, avail at +0x400, used at +0x500.
fn layout(queue: u64) -> QueueLayout {
    QueueLayout {
        size: QSIZE,
        desc: queue * 0x1000,
        avail: queue * 0x1000 + 0x400,
        used: queue * 0x1000 + 0x500,
    }
}

/// The byte the fresh disk holds at `offset`.
fn disk_byte(offset: usize) -> u8 {
    image_byte(offset as u64)
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| seed.wrapping_add((i * 7 + i / 512) as u8))
        .collect()
}

struct Fixture {
    // Dropped in this order: the device (it holds guest memory) before the guest.
    dev: Device,
    guest: Guest,
    fault: Arc<FaultStorage>,
    /// Next free descriptor per queue (each request gets its own, never reused).
    next_desc: Vec<std::cell::Cell<u16>>,
}

/// A request to lay out: type, sector, data (guest address, length, device-writable).
struct Req {
    kind: u32,
    sector: u64,
    data: Option<(u64, u32, bool)>,
}

impl Fixture {
    fn new(queues: u64, iothreads: usize, writeback: bool) -> Fixture {
        let fault = FaultStorage::new((0..CAPACITY).map(disk_byte).collect());
        let storage = Arc::new(Storage::fault(fault.clone()));
        let guest = Guest::new(&[(0, MEM_LEN)]);
        guest.fill(0);
        let layouts: Vec<_> = (0..queues).map(layout).collect();
        let dev = Device::with_cache(
            &guest,
            storage,
            iothreads,
            &layouts,
            false,
            Duration::ZERO,
            writeback,
        );
        Fixture {
            dev,
            guest,
            fault,
            next_desc: (0..queues).map(|_| std::cell::Cell::new(0)).collect(),
        }
    }

    fn mem(&self) -> vm_memory::GuestMemoryLoadGuard<Mem> {
        self.guest.mem.memory()
    }

    fn put(&self, addr: u64, bytes: &[u8]) {
        self.mem()
            .write_slice(bytes, GuestAddress(addr))
            .expect("in memory");
    }

    fn bytes(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        self.mem()
            .read_slice(&mut v, GuestAddress(addr))
            .expect("in memory");
        v
    }

    fn status_addr(queue: usize, head: u16) -> u64 {
        STATUS + 0x100 * queue as u64 + u64::from(head)
    }

    fn status(&self, queue: usize, head: u16) -> u8 {
        self.bytes(Self::status_addr(queue, head), 1)[0]
    }

    /// Lays out `req` on `queue` (not yet published): its head.
    fn lay_out(&self, queue: usize, req: &Req) -> u16 {
        let q = self.dev.layouts[queue];
        let head = self.next_desc[queue].get();
        let hdr = HDR + 0x400 * queue as u64 + 0x10 * u64::from(head);
        self.put(hdr, &header_bytes(req.kind, req.sector));
        let status = Self::status_addr(queue, head);
        self.put(status, &[UNANSWERED]);
        let mut descs = vec![(hdr, 16, false)];
        descs.extend(req.data);
        descs.push((status, 1, true));
        q.chain(&self.mem(), head, &descs);
        self.next_desc[queue].set(head + descs.len() as u16);
        head
    }

    /// Lays out, publishes and kicks requests on several queues at once and waits for all.
    fn run(&self, per_queue: &[(usize, Vec<Req>)]) -> Vec<(usize, Vec<u16>)> {
        let mut heads = Vec::new();
        let mut total = 0;
        for (queue, reqs) in per_queue {
            let h: Vec<u16> = reqs.iter().map(|r| self.lay_out(*queue, r)).collect();
            self.dev.layouts[*queue].publish(&self.mem(), &h);
            total += h.len() as u64;
            heads.push((*queue, h));
        }
        let kicks: Vec<usize> = per_queue.iter().map(|(q, _)| *q).collect();
        let expected = self.dev.answered() + total;
        if let Err(e) = self.dev.run(&kicks, expected, TIMEOUT) {
            self.guest.keep_mapped();
            panic!("{e}");
        }
        self.guest.guards_intact().expect("guard pages");
        for (queue, h) in &heads {
            let used = self.dev.layouts[*queue].used_entries(&self.mem());
            for head in h {
                assert!(
                    used.iter().any(|&(id, _)| id == u32::from(*head)),
                    "queue {queue} head {head} is not on the used ring"
                );
            }
        }
        heads
    }

    /// Runs requests on queue 0: their status bytes.
    fn statuses(&self, reqs: Vec<Req>) -> Vec<u8> {
        let heads = self.run(&[(0, reqs)]);
        heads[0].1.iter().map(|&h| self.status(0, h)).collect()
    }
}

fn write(sector: u64, addr: u64, len: u32) -> Req {
    Req {
        kind: VIRTIO_BLK_T_OUT,
        sector,
        data: Some((addr, len, false)),
    }
}

fn read(sector: u64, addr: u64, len: u32) -> Req {
    Req {
        kind: VIRTIO_BLK_T_IN,
        sector,
        data: Some((addr, len, true)),
    }
}

fn flush() -> Req {
    Req {
        kind: VIRTIO_BLK_T_FLUSH,
        sector: 0,
        data: None,
    }
}

/// A discard / write-zeroes of one segment, its payload at `addr`.
fn ranged(f: &Fixture, kind: u32, sector: u64, sectors: u32, unmap: bool, addr: u64) -> Req {
    f.put(addr, &range_bytes(sector, sectors, u32::from(unmap)));
    Req {
        kind,
        sector: 0,
        data: Some((addr, 16, false)),
    }
}

#[test]
fn each_host_fault_reaches_the_guest_as_ioerr_and_the_next_request_is_served() {
    let cases: [(&str, IoKind, Fault); 7] = [
        ("EIO on write", IoKind::Write, Fault::Errno(libc::EIO)),
        ("ENOSPC on write", IoKind::Write, Fault::Errno(libc::ENOSPC)),
        ("EIO on read", IoKind::Read, Fault::Errno(libc::EIO)),
        ("failing fdatasync", IoKind::Flush, Fault::FailSync),
        ("EIO on flush", IoKind::Flush, Fault::Errno(libc::EIO)),
        ("EIO on discard", IoKind::Discard, Fault::Errno(libc::EIO)),
        (
            "ENOSPC on write-zeroes",
            IoKind::WriteZeroes { unmap: false },
            Fault::Errno(libc::ENOSPC),
        ),
    ];
    for (name, kind, fault) in cases {
        let f = Fixture::new(1, 1, true);
        f.fault.inject(FaultRule::kinds(&[kind], fault).times(1));
        f.put(DATA, &pattern(1, 4096));
        let req = match kind {
            IoKind::Write => write(8, DATA, 4096),
            IoKind::Read => read(8, DATA, 4096),
            IoKind::Flush => flush(),
            IoKind::Discard => ranged(&f, VIRTIO_BLK_T_DISCARD, 8, 8, false, DATA),
            IoKind::WriteZeroes { .. } => ranged(&f, VIRTIO_BLK_T_WRITE_ZEROES, 8, 8, false, DATA),
        };
        // The same request again: the rule fired once, so this one is served.
        let again = match kind {
            IoKind::Write => write(8, DATA, 4096),
            IoKind::Read => read(8, DATA, 4096),
            IoKind::Flush => flush(),
            IoKind::Discard => ranged(&f, VIRTIO_BLK_T_DISCARD, 8, 8, false, DATA + 0x100),
            IoKind::WriteZeroes { .. } => {
                ranged(&f, VIRTIO_BLK_T_WRITE_ZEROES, 8, 8, false, DATA + 0x100)
            }
        };
        assert_eq!(f.statuses(vec![req]), [VIRTIO_BLK_S_IOERR], "{name}");
        assert_eq!(
            f.statuses(vec![again]),
            [VIRTIO_BLK_S_OK],
            "{name}: next one"
        );
        let faults: Vec<_> = f.fault.record().iter().filter_map(|r| r.fault).collect();
        assert_eq!(faults, [fault], "{name}: injected exactly once");
        let stats = f.dev.backend.stats_json();
        let errors: u64 = ["read", "write", "flush", "discard", "write_zeroes"]
            .iter()
            .map(|k| stats["queues"][0][k]["errors"].as_u64().expect("errors"))
            .sum();
        assert_eq!(errors, 1, "{name}: counted once");
    }
}

#[test]
fn a_failed_write_leaves_the_disk_as_it_was() {
    let f = Fixture::new(1, 1, true);
    f.fault
        .inject(FaultRule::kinds(&[IoKind::Write], Fault::Errno(libc::EIO)));
    f.put(DATA, &pattern(9, 4096));
    assert_eq!(f.statuses(vec![write(8, DATA, 4096)]), [VIRTIO_BLK_S_IOERR]);
    let want: Vec<u8> = (4096..8192).map(disk_byte).collect();
    assert_eq!(f.fault.bytes(4096, 4096), want);
}

#[test]
fn short_transfers_are_completed_by_resubmitting_the_rest() {
    let f = Fixture::new(1, 1, true);
    // Every write and read transfers at most 3000 bytes a time (not even a sector).
    f.fault
        .inject(FaultRule::kinds(&[IoKind::Write, IoKind::Read], Fault::Short(3000)).times(20));
    let data = pattern(5, 16384);
    f.put(DATA, &data);
    assert_eq!(f.statuses(vec![write(16, DATA, 16384)]), [VIRTIO_BLK_S_OK]);
    assert_eq!(f.fault.bytes(16 * 512, 16384), data);
    assert_eq!(
        f.statuses(vec![read(16, DATA + 0x8000, 16384)]),
        [VIRTIO_BLK_S_OK]
    );
    assert_eq!(f.bytes(DATA + 0x8000, 16384), data);
    let ops = f.fault.record();
    // 16384 bytes in pieces of 3000: six ops per request.
    assert_eq!(ops.len(), 12, "{ops:?}");
    let mut at = 16 * 512;
    for op in &ops[..6] {
        assert_eq!(op.offset, at, "each piece goes on where the last stopped");
        at += 3000;
    }
}

#[test]
fn eagain_is_retried_and_completes_ok() {
    let f = Fixture::new(1, 1, true);
    f.fault.inject(
        FaultRule::kinds(&[IoKind::Write, IoKind::Read], Fault::Errno(libc::EAGAIN)).times(6),
    );
    let data = pattern(7, 8192);
    f.put(DATA, &data);
    assert_eq!(
        f.statuses(vec![write(32, DATA, 8192), read(64, DATA + 0x4000, 4096)]),
        [VIRTIO_BLK_S_OK, VIRTIO_BLK_S_OK]
    );
    assert_eq!(f.fault.bytes(32 * 512, 8192), data);
    let want: Vec<u8> = (64 * 512..64 * 512 + 4096).map(disk_byte).collect();
    assert_eq!(f.bytes(DATA + 0x4000, 4096), want);
    let eagains = f
        .fault
        .record()
        .iter()
        .filter(|r| r.fault == Some(Fault::Errno(libc::EAGAIN)))
        .count();
    assert_eq!(eagains, 6);
}

#[test]
fn a_fault_on_queue_0_leaves_queue_1_served() {
    for iothreads in [1, 2] {
        let f = Fixture::new(2, iothreads, true);
        // Queue 0 works on the first 64 KiB, queue 1 above: every op down there fails.
        f.fault.inject(
            FaultRule::kinds(
                &[
                    IoKind::Write,
                    IoKind::Read,
                    IoKind::WriteZeroes { unmap: false },
                ],
                Fault::Errno(libc::EIO),
            )
            .at(0..65536),
        );
        let d1 = DATA + 0x2_0000;
        f.put(DATA, &pattern(1, 8192));
        f.put(d1, &pattern(2, 8192));
        let q0 = vec![
            write(0, DATA, 4096),
            read(8, DATA + 0x1000, 4096),
            ranged(&f, VIRTIO_BLK_T_WRITE_ZEROES, 16, 8, false, DATA + 0x3000),
            flush(),
        ];
        let q1 = vec![write(256, d1, 8192), flush()];
        let heads = f.run(&[(0, q0), (1, q1)]);
        let s0: Vec<u8> = heads[0].1.iter().map(|&h| f.status(0, h)).collect();
        let s1: Vec<u8> = heads[1].1.iter().map(|&h| f.status(1, h)).collect();
        assert_eq!(
            s0,
            [
                VIRTIO_BLK_S_IOERR,
                VIRTIO_BLK_S_IOERR,
                VIRTIO_BLK_S_IOERR,
                VIRTIO_BLK_S_OK
            ],
            "{iothreads} iothreads"
        );
        assert_eq!(s1, [VIRTIO_BLK_S_OK; 2], "{iothreads} iothreads");
        // Read back on queue 1 once the write is done (requests in flight are unordered).
        let back = f.run(&[(1, vec![read(256, d1 + 0x4000, 8192)])]);
        assert_eq!(f.status(1, back[0].1[0]), VIRTIO_BLK_S_OK);
        assert_eq!(f.bytes(d1 + 0x4000, 8192), pattern(2, 8192));
    }
}

#[test]
fn no_request_is_left_unanswered_under_mixed_faults() {
    let f = Fixture::new(2, 1, true);
    // Every third op fails, with a different fault per kind; some refuse to start at all.
    let rules = [
        (IoKind::Write, Fault::Errno(libc::ENOSPC)),
        (IoKind::Read, Fault::Errno(libc::EIO)),
        (IoKind::Flush, Fault::FailSync),
        (IoKind::Discard, Fault::Reject(libc::EIO)),
        (
            IoKind::WriteZeroes { unmap: false },
            Fault::Errno(libc::EIO),
        ),
    ];
    for skip in [0, 2, 4] {
        for (kind, fault) in rules {
            f.fault
                .inject(FaultRule::kinds(&[kind], fault).skip(skip).times(1));
        }
    }
    let mut per_queue = Vec::new();
    for queue in 0..2 {
        let base = DATA + 0x2_0000 * queue as u64;
        let mut reqs = Vec::new();
        for i in 0..12u64 {
            let sector = 64 * (2 * i + queue as u64);
            reqs.push(match i % 5 {
                0 => write(sector, base + 0x1000 * i, 4096),
                1 => read(sector, base + 0x1000 * i, 4096),
                2 => flush(),
                3 => ranged(
                    &f,
                    VIRTIO_BLK_T_DISCARD,
                    sector,
                    8,
                    false,
                    base + 0x1000 * i,
                ),
                _ => ranged(
                    &f,
                    VIRTIO_BLK_T_WRITE_ZEROES,
                    sector,
                    8,
                    false,
                    base + 0x1000 * i,
                ),
            });
        }
        per_queue.push((queue, reqs));
    }
    let heads = f.run(&per_queue);
    let mut failed = 0;
    for (queue, h) in &heads {
        for &head in h {
            let s = f.status(*queue, head);
            assert!(
                s == VIRTIO_BLK_S_OK || s == VIRTIO_BLK_S_IOERR,
                "queue {queue} head {head}: status {s:#x}"
            );
            failed += usize::from(s == VIRTIO_BLK_S_IOERR);
        }
    }
    assert!(failed > 0, "faults were injected");
}

#[test]
fn an_op_that_cannot_be_submitted_completes_with_ioerr() {
    let f = Fixture::new(1, 1, true);
    f.fault
        .inject(FaultRule::kinds(&[IoKind::Write], Fault::Reject(libc::EIO)).at(0..4096));
    f.put(DATA, &pattern(3, 8192));
    // Adjacent writes merge into one refused op: both fail; the one elsewhere is served.
    assert_eq!(
        f.statuses(vec![
            write(0, DATA, 2048),
            write(4, DATA + 2048, 2048),
            write(64, DATA + 4096, 4096)
        ]),
        [VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK]
    );
    assert_eq!(f.fault.bytes(64 * 512, 4096), pattern(3, 8192)[4096..]);
}

/// Write-type ops as the fault backend saw them.
fn write_type_ops(f: &Fixture) -> Vec<OpRecord> {
    f.fault
        .record()
        .into_iter()
        .filter(|r| r.kind.is_write_type())
        .collect()
}

fn write_type_mix(f: &Fixture) -> Vec<u8> {
    f.put(DATA, &pattern(4, 16384));
    f.statuses(vec![
        // Two adjacent writes (merged into one op) and one apart.
        write(0, DATA, 4096),
        write(8, DATA + 4096, 4096),
        write(128, DATA + 8192, 8192),
        ranged(f, VIRTIO_BLK_T_WRITE_ZEROES, 256, 16, false, DATA + 0x8000),
        ranged(f, VIRTIO_BLK_T_WRITE_ZEROES, 512, 16, true, DATA + 0x8100),
        ranged(f, VIRTIO_BLK_T_DISCARD, 768, 16, false, DATA + 0x8200),
    ])
}

#[test]
fn writethrough_makes_every_write_type_op_durable_before_it_completes() {
    let f = Fixture::new(1, 1, false);
    assert_eq!(write_type_mix(&f), [VIRTIO_BLK_S_OK; 6]);
    let ops = write_type_ops(&f);
    assert_eq!(ops.len(), 5, "{ops:?}");
    for op in &ops {
        match op.kind {
            IoKind::Write => assert!(op.dsync, "write without RWF_DSYNC: {op:?}"),
            _ => assert!(op.sync_after, "no data sync after {op:?}"),
        }
    }
    // The durability is real: a failing sync fails the request.
    f.fault.inject(FaultRule::kinds(
        &[IoKind::WriteZeroes { unmap: false }],
        Fault::FailSync,
    ));
    f.fault
        .inject(FaultRule::kinds(&[IoKind::Write], Fault::FailSync));
    assert_eq!(
        f.statuses(vec![
            ranged(&f, VIRTIO_BLK_T_WRITE_ZEROES, 256, 16, false, DATA + 0x9000),
            write(1024, DATA, 4096),
        ]),
        [VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_IOERR]
    );
}

#[test]
fn writeback_leaves_durability_to_flush() {
    // The other side of the test above: with the cache on, no op pays for a sync.
    let f = Fixture::new(1, 1, true);
    assert_eq!(write_type_mix(&f), [VIRTIO_BLK_S_OK; 6]);
    let ops = write_type_ops(&f);
    assert_eq!(ops.len(), 5);
    assert!(ops.iter().all(|op| !op.dsync && !op.sync_after), "{ops:?}");
}
