//! Hostile guest input on the whole data path: descriptor chains go in through a split
//! virtqueue in (sentinel-guarded) guest memory, `VhostUserBlk::handle_event` drains them into the
//! io_uring engine over a real file, and we check what comes out: no panic, no hang, every
//! chain answered (a status byte, or used length 0 for a chain too malformed to carry one), no
//! byte written outside guest memory, and no guest byte written that the chains did not hand
//! to the device as writable.
//!
//! One thing the server cannot do: answer a chain whose head index is not below the queue
//! size. It pops and counts it (as malformed), but virtio-queue refuses to put an id that is
//! not a descriptor index on the used ring, so such an avail entry never shows up as used.
//! QEMU marks the device broken in that case; the tests below count such heads as popped
//! but not used.

mod support;

use std::path::PathBuf;
use std::time::Duration;

use blk_proto::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES,
};
use proptest::prelude::*;
use support::*;
use tempfile::TempDir;
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace};

const IMAGE_SIZE: u64 = 1 << 20;
const TIMEOUT: Duration = Duration::from_secs(10);

// ----- guest layout of the fixed-input tests -----
// Three regions: A and B adjacent in guest-physical space (but not in the host: a guard page
// sits between them), then a hole, then C.
const REGION_A: u64 = 0;
const REGION_B: u64 = 0x4_0000;
const HOLE: u64 = 0x8_0000;
const REGION_C: u64 = 0xc_0000;
const MEM_END: u64 = 0x10_0000;
const REGION_LEN: usize = 0x4_0000;

fn guest() -> Guest {
    Guest::new(&[
        (REGION_A, REGION_LEN),
        (REGION_B, REGION_LEN),
        (REGION_C, REGION_LEN),
    ])
}

const QSIZE: u16 = 64;
/// Queue q's rings live at `q * 0x1000`: table 0x400 bytes, avail at +0x400, used at +0x500.
fn layout(queue: u64, size: u16) -> QueueLayout {
    QueueLayout {
        size,
        desc: queue * 0x1000,
        avail: queue * 0x1000 + 0x400,
        used: queue * 0x1000 + 0x500,
    }
}
const IND: u64 = 0x2000;
const HDR: u64 = 0x3000;
const STATUS: u64 = 0x3800;
const DATA: u64 = 0x1_0000;
/// Guest fill byte: not a status value, not an image byte.
const FILL: u8 = 0xee;

struct Fixture {
    // Dropped in this order: the device (it holds guest memory) before the guest.
    dev: Device,
    guest: Guest,
    image: PathBuf,
    _dir: TempDir,
}

impl Fixture {
    fn new(queues: u64, iothreads: usize, direct: bool) -> Option<Fixture> {
        let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("temp dir");
        let image = dir.path().join("disk.img");
        make_image(&image, IMAGE_SIZE);
        let storage = open_image(&image, direct)?;
        let guest = guest();
        guest.fill(FILL);
        let layouts: Vec<_> = (0..queues).map(|q| layout(q, QSIZE)).collect();
        for l in &layouts {
            zero_rings(&guest, l);
        }
        let dev = Device::new(&guest, storage, iothreads, &layouts, false, Duration::ZERO);
        Some(Fixture {
            dev,
            guest,
            image,
            _dir: dir,
        })
    }

    fn mem(&self) -> vm_memory::GuestMemoryLoadGuard<Mem> {
        self.guest.mem.memory()
    }

    fn q(&self, queue: usize) -> QueueLayout {
        self.dev.layouts[queue]
    }

    /// Publishes `heads` on `queue`, kicks it and waits until they are all answered.
    fn submit(&self, queue: usize, heads: &[u16]) {
        let m = self.mem();
        self.q(queue).publish(&m, heads);
        let expected = self.dev.answered() + heads.len() as u64;
        self.run(&[queue], expected);
    }

    fn run(&self, kicks: &[usize], expected: u64) {
        if let Err(e) = self.dev.run(kicks, expected, TIMEOUT) {
            // I/O may still be in flight into guest memory: keep it mapped.
            self.guest.keep_mapped();
            panic!("{e}");
        }
        self.guest.guards_intact().expect("guard pages");
    }

    fn byte(&self, addr: u64) -> u8 {
        self.mem().read_obj(GuestAddress(addr)).expect("in memory")
    }

    fn bytes(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        self.mem()
            .read_slice(&mut v, GuestAddress(addr))
            .expect("in memory");
        v
    }

    fn put(&self, addr: u64, bytes: &[u8]) {
        self.mem()
            .write_slice(bytes, GuestAddress(addr))
            .expect("in memory");
    }

    fn header(&self, addr: u64, request_type: u32, sector: u64) {
        self.put(addr, &header_bytes(request_type, sector));
    }

    fn file(&self, offset: u64, len: usize) -> Vec<u8> {
        let all = std::fs::read(&self.image).expect("image");
        all[offset as usize..offset as usize + len].to_vec()
    }
}

fn zero_rings(guest: &Guest, l: &QueueLayout) {
    let m = guest.mem.memory();
    m.write_slice(&vec![0u8; l.desc_bytes() as usize], GuestAddress(l.desc))
        .expect("table");
    m.write_slice(&vec![0u8; l.avail_bytes() as usize], GuestAddress(l.avail))
        .expect("avail");
    m.write_slice(&vec![0u8; l.used_bytes() as usize], GuestAddress(l.used))
        .expect("used");
}

/// Every file-backed test runs buffered and with O_DIRECT (skipped if the filesystem refuses).
fn both_modes(queues: u64, iothreads: usize, test: impl Fn(&Fixture)) {
    for direct in [false, true] {
        if let Some(f) = Fixture::new(queues, iothreads, direct) {
            test(&f);
        }
    }
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| seed.wrapping_add((i * 7 + i / 512) as u8))
        .collect()
}

// ----- garbage on one queue does not take the other down -----

/// Malformed and invalid chains at heads 0..; returns the heads (one of them >= QSIZE).
fn publish_garbage(f: &Fixture, queue: usize) -> Vec<u16> {
    let q = f.q(queue);
    let m = f.mem();
    let hdr = HDR + 0x100 * queue as u64;
    f.header(hdr, VIRTIO_BLK_T_IN, 0);
    f.header(hdr + 0x20, 0x77, 0);
    f.header(hdr + 0x40, VIRTIO_BLK_T_IN, u64::MAX);
    // 0: data outside guest memory.  1: data in the hole.  2: header past the end of memory.
    q.chain(
        &m,
        0,
        &[
            (hdr, 16, false),
            (u64::MAX - 100, 512, true),
            (STATUS, 1, true),
        ],
    );
    q.chain(
        &m,
        3,
        &[(hdr, 16, false), (HOLE, 512, true), (STATUS, 1, true)],
    );
    q.chain(&m, 6, &[(MEM_END - 8, 16, false), (STATUS, 1, true)]);
    // 8: a loop.  10: unknown type (UNSUPP).  12: read far past the capacity (IOERR).
    q.desc(&m, 8, hdr, 16, VRING_DESC_F_NEXT, 9);
    q.desc(&m, 9, DATA, 512, VRING_DESC_F_NEXT | VRING_DESC_F_WRITE, 8);
    q.chain(&m, 10, &[(hdr + 0x20, 16, false), (STATUS + 1, 1, true)]);
    q.chain(
        &m,
        12,
        &[
            (hdr + 0x40, 16, false),
            (DATA, 512, true),
            (STATUS + 2, 1, true),
        ],
    );
    // 15: header too short.  17: readable after writable.  19: data straddling A's end into B
    // is fine, but straddling B's end into the hole is not.
    q.chain(&m, 15, &[(hdr, 8, false), (STATUS + 3, 1, true)]);
    q.chain(
        &m,
        17,
        &[(hdr, 16, false), (STATUS + 4, 1, true), (DATA, 512, false)],
    );
    q.chain(
        &m,
        20,
        &[
            (hdr, 16, false),
            (HOLE - 256, 512, true),
            (STATUS + 5, 1, true),
        ],
    );
    vec![0, 3, 6, 8, 10, 12, 15, 17, 20, QSIZE + 5, 0xffff]
}

fn garbage_then_valid(iothreads: usize) {
    both_modes(2, iothreads, |f| {
        let garbage = publish_garbage(f, 0);
        let m = f.mem();
        f.q(0).publish(&m, &garbage);
        // Queue 1: write 4 KiB from a buffer straddling regions A and B, then flush.
        let q1 = f.q(1);
        let src = REGION_B - 1000;
        let data = pattern(3, 4096);
        f.put(src, &data);
        f.header(HDR + 0x400, VIRTIO_BLK_T_OUT, 8);
        f.header(HDR + 0x420, VIRTIO_BLK_T_FLUSH, 0);
        q1.chain(
            &m,
            0,
            &[
                (HDR + 0x400, 16, false),
                (src, 4096, false),
                (STATUS + 0x40, 1, true),
            ],
        );
        q1.chain(&m, 3, &[(HDR + 0x420, 16, false), (STATUS + 0x41, 1, true)]);
        q1.publish(&m, &[0]);
        let expected = f.dev.answered() + garbage.len() as u64 + 1;
        f.run(&[0, 1], expected);
        f.submit(1, &[3]);
        assert_eq!(f.byte(STATUS + 0x40), VIRTIO_BLK_S_OK, "write on queue 1");
        assert_eq!(f.byte(STATUS + 0x41), VIRTIO_BLK_S_OK, "flush on queue 1");
        assert_eq!(f.file(8 * SECTOR, 4096), data, "written data in the image");

        // Read it back into the hole's edge of region C and across A/B again.
        f.header(HDR + 0x440, VIRTIO_BLK_T_IN, 8);
        q1.chain(
            &m,
            5,
            &[
                (HDR + 0x440, 16, false),
                (REGION_C, 1024, true),
                (REGION_B - 8, 3072, true),
                (STATUS + 0x42, 1, true),
            ],
        );
        f.submit(1, &[5]);
        assert_eq!(f.byte(STATUS + 0x42), VIRTIO_BLK_S_OK, "read on queue 1");
        let mut back = f.bytes(REGION_C, 1024);
        back.extend(f.bytes(REGION_B - 8, 3072));
        assert_eq!(back, data, "data round-trips on queue 1");

        // Queue 1: three answers, in order of completion.
        let used1 = q1.used_entries(&m);
        assert_eq!(used1, vec![(0, 1), (3, 1), (5, 4097)]);
        // Queue 0: every chain with a valid head is on the used ring (heads >= QSIZE cannot
        // be), malformed ones with length 0; the two request errors carry their status.
        let mut used0: Vec<u32> = f.q(0).used_entries(&m).iter().map(|e| e.0).collect();
        used0.sort_unstable();
        let mut valid: Vec<u32> = garbage
            .iter()
            .filter(|&&h| h < QSIZE)
            .map(|&h| u32::from(h))
            .collect();
        valid.sort_unstable();
        assert_eq!(used0, valid);
        for (id, len) in f.q(0).used_entries(&m) {
            let expect = match id {
                10 => 1,
                12 => 513,
                _ => 0,
            };
            assert_eq!(len, expect, "used len of head {id}");
        }
        assert_eq!(f.byte(STATUS + 1), VIRTIO_BLK_S_UNSUPP);
        assert_eq!(f.byte(STATUS + 2), VIRTIO_BLK_S_IOERR);
        for s in [0, 3, 4, 5] {
            assert_eq!(
                f.byte(STATUS + s),
                FILL,
                "status of a malformed chain untouched"
            );
        }
    });
}

#[test]
fn garbage_on_queue_0_leaves_queue_1_working_with_one_iothread() {
    garbage_then_valid(1);
}

#[test]
fn garbage_on_queue_0_leaves_queue_1_working_with_two_iothreads() {
    garbage_then_valid(2);
}

// ----- malformed shapes -----

#[test]
fn indirect_tables_that_nest_or_loop_are_returned_empty() {
    both_modes(1, 1, |f| {
        let q = f.q(0);
        let m = f.mem();
        f.header(HDR, VIRTIO_BLK_T_IN, 0);
        f.header(HDR + 0x20, VIRTIO_BLK_T_GET_ID, 0);
        // 0: an indirect table whose second entry points back at the table itself.
        q.desc(&m, 0, IND, 4 * 16, VRING_DESC_F_INDIRECT, 0);
        write_desc(&m, IND, 0, HDR, 16, VRING_DESC_F_NEXT, 1);
        write_desc(&m, IND, 1, IND, 4 * 16, VRING_DESC_F_INDIRECT, 0);
        // 1: an "indirect table" that is the queue's own descriptor table (whose entry 0 is
        // indirect: nested).
        q.desc(
            &m,
            1,
            q.desc,
            16 * u32::from(QSIZE),
            VRING_DESC_F_INDIRECT,
            0,
        );
        // 2: an indirect table whose entries loop 0 -> 1 -> 0.
        let ind2 = IND + 0x100;
        q.desc(&m, 2, ind2, 2 * 16, VRING_DESC_F_INDIRECT, 0);
        write_desc(&m, ind2, 0, HDR, 16, VRING_DESC_F_NEXT, 1);
        write_desc(
            &m,
            ind2,
            1,
            DATA,
            512,
            VRING_DESC_F_WRITE | VRING_DESC_F_NEXT,
            0,
        );
        // 3: an indirect descriptor whose length is not a whole number of descriptors.
        q.desc(&m, 3, ind2, 20, VRING_DESC_F_INDIRECT, 0);
        // 4: an indirect table outside guest memory.
        q.desc(&m, 4, HOLE, 64, VRING_DESC_F_INDIRECT, 0);
        // 5: a valid GET_ID afterwards.
        q.chain(
            &m,
            5,
            &[
                (HDR + 0x20, 16, false),
                (DATA + 0x1000, 20, true),
                (STATUS, 1, true),
            ],
        );
        f.submit(0, &[0, 1, 2, 3, 4, 5]);
        assert_eq!(
            q.used_entries(&m),
            vec![(0, 0), (1, 0), (2, 0), (3, 0), (4, 0), (5, 21)]
        );
        assert_eq!(f.byte(STATUS), VIRTIO_BLK_S_OK);
        assert_eq!(&f.bytes(DATA + 0x1000, 14), b"hostile-serial");
        assert!(
            f.bytes(DATA, 512).iter().all(|&b| b == FILL),
            "the looping chain's writable buffer was not written"
        );
    });
}

#[test]
fn a_chain_that_loops_through_the_whole_table_is_returned_empty() {
    both_modes(1, 1, |f| {
        let q = f.q(0);
        let m = f.mem();
        f.header(HDR, VIRTIO_BLK_T_IN, 0);
        q.desc(&m, 0, HDR, 16, VRING_DESC_F_NEXT, 1);
        for i in 1..QSIZE {
            q.desc(
                &m,
                i,
                DATA + 512 * u64::from(i),
                512,
                VRING_DESC_F_WRITE | VRING_DESC_F_NEXT,
                (i + 1) % QSIZE,
            );
        }
        f.submit(0, &[0, 7]);
        assert_eq!(q.used_entries(&m), vec![(0, 0), (7, 0)]);
        assert!(f
            .bytes(DATA, 512 * usize::from(QSIZE))
            .iter()
            .all(|&b| b == FILL));
    });
}

#[test]
fn indirect_chains_longer_than_the_queue_are_answered() {
    both_modes(1, 1, |f| {
        let q = f.q(0);
        let m = f.mem();
        // 0: header + 98 data descriptors + status: more segments than seg_max -> IOERR.
        f.header(HDR, VIRTIO_BLK_T_OUT, 0);
        let mut long = vec![(HDR, 16, false)];
        long.extend((0..98).map(|i| (DATA + 512 * i, 512, false)));
        long.push((STATUS, 1, true));
        write_chain(&m, IND, 0, &long);
        q.desc(&m, 0, IND, 16 * long.len() as u32, VRING_DESC_F_INDIRECT, 0);
        // 1: header + seg_max + 2 = 64 data descriptors + status = 66 > QSIZE, within limits.
        let ind2 = 0x5000;
        f.header(HDR + 0x20, VIRTIO_BLK_T_OUT, 64);
        f.put(DATA, &pattern(9, 64 * 512));
        let mut longest_ok = vec![(HDR + 0x20, 16, false)];
        longest_ok.extend((0..64).map(|i| (DATA + 512 * i, 512, false)));
        longest_ok.push((STATUS + 1, 1, true));
        write_chain(&m, ind2, 0, &longest_ok);
        q.desc(
            &m,
            1,
            ind2,
            16 * longest_ok.len() as u32,
            VRING_DESC_F_INDIRECT,
            0,
        );
        f.submit(0, &[0, 1]);
        let mut used = q.used_entries(&m);
        used.sort_unstable();
        assert_eq!(used, vec![(0, 1), (1, 1)]);
        assert_eq!(f.byte(STATUS), VIRTIO_BLK_S_IOERR, "too many segments");
        assert_eq!(
            f.file(0, 512),
            (0..512).map(image_byte).collect::<Vec<_>>(),
            "a rejected write leaves the image alone"
        );
        assert_eq!(f.byte(STATUS + 1), VIRTIO_BLK_S_OK, "seg_max + 2 segments");
        assert_eq!(f.file(64 * SECTOR, 64 * 512), pattern(9, 64 * 512));
    });
}

#[test]
fn a_read_only_status_descriptor_gets_nothing_written() {
    both_modes(1, 1, |f| {
        let q = f.q(0);
        let m = f.mem();
        f.header(HDR, VIRTIO_BLK_T_IN, 0);
        // 0: header, writable data, read-only "status".  3: header, read-only "status" only.
        q.chain(
            &m,
            0,
            &[(HDR, 16, false), (DATA, 512, true), (STATUS, 1, false)],
        );
        q.chain(&m, 3, &[(HDR, 16, false), (STATUS + 1, 1, false)]);
        f.submit(0, &[0, 3]);
        assert_eq!(q.used_entries(&m), vec![(0, 0), (3, 0)]);
        assert_eq!(f.byte(STATUS), FILL);
        assert_eq!(f.byte(STATUS + 1), FILL);
        assert!(f.bytes(DATA, 512).iter().all(|&b| b == FILL));
    });
}

#[test]
fn data_in_the_wrong_direction_gets_ioerr_and_is_not_touched() {
    both_modes(1, 1, |f| {
        let q = f.q(0);
        let m = f.mem();
        // 0: a read whose data is device-readable.  3: a write whose data is device-writable.
        f.header(HDR, VIRTIO_BLK_T_IN, 0);
        f.header(HDR + 16, VIRTIO_BLK_T_OUT, 8);
        q.chain(
            &m,
            0,
            &[(HDR, 16, false), (DATA, 512, false), (STATUS, 1, true)],
        );
        q.chain(
            &m,
            3,
            &[
                (HDR + 16, 16, false),
                (DATA + 512, 512, true),
                (STATUS + 1, 1, true),
            ],
        );
        let image_before = f.file(0, 8192);
        f.submit(0, &[0, 3]);
        assert_eq!(
            f.byte(STATUS),
            VIRTIO_BLK_S_IOERR,
            "read: no data can arrive"
        );
        assert_eq!(
            f.byte(STATUS + 1),
            VIRTIO_BLK_S_IOERR,
            "write: no data to write"
        );
        // Used len: the writable bytes, as for any answered request.
        assert_eq!(q.used_entries(&m), vec![(0, 1), (3, 513)]);
        assert!(f.bytes(DATA, 1024).iter().all(|&b| b == FILL));
        assert_eq!(
            f.file(0, 8192),
            image_before,
            "nothing written to the image"
        );
    });
}

#[test]
fn a_header_split_into_sixteen_one_byte_descriptors_works() {
    both_modes(1, 1, |f| {
        let q = f.q(0);
        let m = f.mem();
        let data = pattern(5, 1024);
        f.put(DATA, &data);
        f.header(HDR, VIRTIO_BLK_T_OUT, 100);
        f.header(HDR + 0x20, VIRTIO_BLK_T_IN, 100);
        let split = |hdr: u64| -> Vec<(u64, u32, bool)> {
            // Scattered: byte i of the header sits at its own place, in order.
            (0..16).map(|i| (hdr + i, 1, false)).collect()
        };
        let mut write = split(HDR);
        write.extend([(DATA, 1024, false), (STATUS, 1, true)]);
        q.chain(&m, 0, &write);
        f.submit(0, &[0]);
        assert_eq!(f.byte(STATUS), VIRTIO_BLK_S_OK);
        assert_eq!(f.file(100 * SECTOR, 1024), data);

        let mut read = split(HDR + 0x20);
        read.extend([(DATA + 0x1000, 1024, true), (STATUS + 1, 1, true)]);
        q.chain(&m, 20, &read);
        f.submit(0, &[20]);
        assert_eq!(f.byte(STATUS + 1), VIRTIO_BLK_S_OK);
        assert_eq!(f.bytes(DATA + 0x1000, 1024), data);
        assert_eq!(q.used_entries(&m), vec![(0, 1), (20, 1025)]);

        // One 16-byte header descriptor that crosses from region A into region B (adjacent in
        // the guest, apart in the host), and a status byte that is the last byte of region A.
        let hdr = REGION_B - 7;
        f.header(hdr, VIRTIO_BLK_T_IN, 100);
        q.chain(
            &m,
            40,
            &[
                (hdr, 16, false),
                (REGION_C + 0x800, 1024, true),
                (REGION_B - 8, 1, true),
            ],
        );
        f.submit(0, &[40]);
        assert_eq!(f.byte(REGION_B - 8), VIRTIO_BLK_S_OK);
        assert_eq!(f.bytes(REGION_C + 0x800, 1024), data);
    });
}

#[test]
fn a_zero_length_writable_descriptor_after_the_status_is_ignored() {
    both_modes(1, 1, |f| {
        let q = f.q(0);
        let m = f.mem();
        f.header(HDR, VIRTIO_BLK_T_IN, 2);
        q.chain(
            &m,
            0,
            &[
                (HDR, 16, false),
                (DATA, 512, true),
                (STATUS, 1, true),
                (STATUS + 1, 0, true),
            ],
        );
        // Also a zero-length descriptor pointing outside guest memory, after the status.
        f.header(HDR + 0x20, VIRTIO_BLK_T_GET_ID, 0);
        q.chain(
            &m,
            4,
            &[
                (HDR + 0x20, 16, false),
                (DATA + 0x1000, 20, true),
                (STATUS + 2, 1, true),
                (u64::MAX, 0, true),
            ],
        );
        f.submit(0, &[0, 4]);
        let mut used = q.used_entries(&m);
        used.sort_unstable();
        assert_eq!(used, vec![(0, 513), (4, 21)]);
        assert_eq!(f.byte(STATUS), VIRTIO_BLK_S_OK);
        assert_eq!(f.bytes(DATA, 512), f.file(2 * SECTOR, 512));
        assert_eq!(f.byte(STATUS + 1), FILL);
        assert_eq!(f.byte(STATUS + 2), VIRTIO_BLK_S_OK);
    });
}

/// More requests in flight than the thread has request slots for (the guest publishes the
/// same 64 heads again while the first 64 are still being read), so the drain stops for
/// want of a free request and must resume as completions free some: all 128 are answered.
#[test]
fn heads_republished_while_in_flight_beyond_the_request_pool_are_all_answered() {
    both_modes(1, 1, |f| {
        let q = f.q(0);
        let m = f.mem();
        // Every head is an indirect descriptor to the same 256 KiB read (across regions A
        // and B). With O_DIRECT the first batch is still in flight at the second kick (from
        // the page cache it may all complete inside the first).
        f.header(HDR, VIRTIO_BLK_T_IN, 0);
        let len = 256 << 10;
        write_chain(
            &m,
            IND,
            0,
            &[(HDR, 16, false), (DATA, len, true), (STATUS, 1, true)],
        );
        for i in 0..QSIZE {
            q.desc(&m, i, IND, 3 * 16, VRING_DESC_F_INDIRECT, 0);
        }
        let heads: Vec<u16> = (0..QSIZE).collect();
        let before = f.dev.answered();
        q.publish(&m, &heads);
        if let Err(e) = f.dev.kick(&[0], TIMEOUT) {
            f.guest.keep_mapped();
            panic!("{e}");
        }
        q.publish(&m, &heads);
        f.run(&[0], before + 2 * u64::from(QSIZE));
        assert_eq!(q.used_idx(&m), 2 * QSIZE);
        assert!(q.used_entries(&m).iter().all(|&(_, l)| l == len + 1));
        assert_eq!(f.byte(STATUS), VIRTIO_BLK_S_OK);
        assert_eq!(f.bytes(DATA, len as usize), f.file(0, len as usize));
    });
}

// ----- data buffers on top of the rings -----

#[test]
fn data_buffers_overlapping_the_descriptor_table_and_used_ring_do_not_crash() {
    both_modes(1, 1, |f| {
        let q = f.q(0);
        let m = f.mem();
        // Write the descriptor table itself (its chain included) to sectors 10..12.
        f.header(HDR, VIRTIO_BLK_T_OUT, 10);
        q.chain(
            &m,
            0,
            &[(HDR, 16, false), (q.desc, 1024, false), (STATUS, 1, true)],
        );
        let table = f.bytes(q.desc, 1024);
        f.submit(0, &[0]);
        assert_eq!(f.byte(STATUS), VIRTIO_BLK_S_OK);
        assert_eq!(f.file(10 * SECTOR, 1024), table);

        // Read into the unused upper half of the descriptor table.
        f.header(HDR + 0x20, VIRTIO_BLK_T_IN, 20);
        q.chain(
            &m,
            3,
            &[
                (HDR + 0x20, 16, false),
                (q.desc + 0x200, 512, true),
                (STATUS + 1, 1, true),
            ],
        );
        f.submit(0, &[3]);
        assert_eq!(f.byte(STATUS + 1), VIRTIO_BLK_S_OK);
        assert_eq!(f.bytes(q.desc + 0x200, 512), f.file(20 * SECTOR, 512));

        // Read over the used ring: the data lands first, the used entry is written after it.
        f.header(HDR + 0x40, VIRTIO_BLK_T_IN, 30);
        q.chain(
            &m,
            6,
            &[
                (HDR + 0x40, 16, false),
                (q.used, 512, true),
                (STATUS + 2, 1, true),
            ],
        );
        f.submit(0, &[6]);
        assert_eq!(f.byte(STATUS + 2), VIRTIO_BLK_S_OK);
        assert_eq!(q.used_idx(&m), 3);
        assert_eq!(q.used_entry(&m, 2), (6, 513));
        assert_eq!(
            f.bytes(q.used + 4 + 3 * 8, 512 - 4 - 3 * 8),
            f.file(30 * SECTOR + 4 + 3 * 8, 512 - 4 - 3 * 8),
            "the rest of the used ring holds the data read"
        );

        // A write whose data is the avail ring and the used ring: read-only, harmless.
        f.header(HDR + 0x60, VIRTIO_BLK_T_OUT, 40);
        q.chain(
            &m,
            9,
            &[
                (HDR + 0x60, 16, false),
                (q.avail, 1024, false),
                (STATUS + 3, 1, true),
            ],
        );
        f.submit(0, &[9]);
        assert_eq!(f.byte(STATUS + 3), VIRTIO_BLK_S_OK);
        assert_eq!(q.used_entry(&m, 3), (9, 1));
    });
}

// ----- a hostile avail index -----

/// The driver may have at most `size` chains outstanding; an avail idx further ahead makes
/// virtio-queue refuse to pop, and the server must give up on the queue rather than spin.
/// Both with and without busy-polling after a batch.
#[test]
fn an_avail_index_too_far_ahead_does_not_hang_the_iothread() {
    for poll in [Duration::ZERO, Duration::from_micros(200)] {
        let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("temp dir");
        let image = dir.path().join("disk.img");
        make_image(&image, IMAGE_SIZE);
        let storage = open_image(&image, false).expect("buffered image");
        let guest = guest();
        let q = layout(0, QSIZE);
        zero_rings(&guest, &q);
        let dev = Device::new(&guest, storage, 1, &[q], false, poll);
        q.set_avail_idx(&guest.mem.memory(), QSIZE + 1);
        if let Err(e) = dev.run(&[0], 0, Duration::from_secs(3)) {
            guest.keep_mapped();
            panic!("poll {poll:?}: {e}");
        }
    }
}

#[test]
fn rings_outside_guest_memory_stop_only_their_queue() {
    for poll in [Duration::ZERO, Duration::from_micros(200)] {
        let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("temp dir");
        let image = dir.path().join("disk.img");
        make_image(&image, IMAGE_SIZE);
        let storage = open_image(&image, false).expect("buffered image");
        let guest = guest();
        // Queue 0: avail ring in the hole between regions B and C. Queue 1: descriptor table
        // in the hole (its avail ring is fine and says one chain is there). Queue 2: sane.
        let in_hole = QueueLayout {
            avail: HOLE + 0x400,
            ..layout(0, QSIZE)
        };
        let table_in_hole = QueueLayout {
            desc: HOLE + 0x1000,
            ..layout(1, QSIZE)
        };
        let sane = layout(2, QSIZE);
        zero_rings(&guest, &sane);
        let m = guest.mem.memory();
        // Queue 1's avail and used rings are in memory: zero them (its table cannot be).
        let l = &table_in_hole;
        m.write_slice(&vec![0u8; l.avail_bytes() as usize], GuestAddress(l.avail))
            .expect("avail");
        m.write_slice(&vec![0u8; l.used_bytes() as usize], GuestAddress(l.used))
            .expect("used");
        let dev = Device::new(
            &guest,
            storage,
            1,
            &[in_hole, table_in_hole, sane],
            false,
            poll,
        );
        table_in_hole.publish(&m, &[0]);
        m.write_slice(&header_bytes(VIRTIO_BLK_T_IN, 0), GuestAddress(HDR))
            .expect("header");
        sane.chain(
            &m,
            0,
            &[(HDR, 16, false), (DATA, 512, true), (STATUS, 1, true)],
        );
        sane.publish(&m, &[0]);
        // The chain on queue 1 is answered (malformed: used len 0), queue 2's is served, and
        // queue 0 neither hangs the thread nor touches anything.
        if let Err(e) = dev.run(&[0, 1, 2], 2, Duration::from_secs(3)) {
            guest.keep_mapped();
            panic!("poll {poll:?}: {e}");
        }
        guest.guards_intact().expect("guard pages");
        assert_eq!(
            table_in_hole.used_entries(&m),
            vec![(0, 0)],
            "poll {poll:?}"
        );
        assert_eq!(sane.used_entries(&m), vec![(0, 513)], "poll {poll:?}");
        assert_eq!(
            m.read_obj::<u8>(GuestAddress(STATUS)).unwrap(),
            VIRTIO_BLK_S_OK
        );
    }
}

// ----- random chains -----

mod random {
    //! Random descriptor tables, indirect tables, headers and avail entries on a queue of 16,
    //! over guest memory with three regions (two adjacent, one after a hole).
    use super::*;

    pub const QSIZE: u16 = 16;
    pub const DESC: u64 = 0x0;
    pub const IND0: u64 = 0x400;
    pub const IND1: u64 = 0x600;
    pub const IND_ENTRIES: u16 = 32;
    pub const USED: u64 = 0x800;
    pub const HDR: u64 = 0x1000;
    pub const HDR_SLOTS: u64 = 8;
    pub const STATUS: u64 = 0x1800;
    pub const DATA: u64 = 0x2000;
    /// Far from every address the strategies aim at: a byte the device wrote into the avail
    /// ring during the drain could move avail idx (see the ignored test above).
    pub const AVAIL: u64 = 0x3_8000;
    const AVAIL_ZONE: std::ops::Range<u64> = 0x3_7000..0x3_9000;

    pub fn layout() -> QueueLayout {
        QueueLayout {
            size: QSIZE,
            desc: DESC,
            avail: AVAIL,
            used: USED,
        }
    }

    fn clear_of_avail(a: u64) -> u64 {
        if AVAIL_ZONE.contains(&a) {
            a - 0x2000
        } else {
            a
        }
    }

    /// Buffer addresses: header slots, status bytes, data, every region edge, anywhere.
    pub fn address() -> impl Strategy<Value = u64> {
        prop_oneof![
            3 => (0..HDR_SLOTS).prop_map(|k| HDR + 0x40 * k),
            2 => (0u64..16).prop_map(|k| STATUS + k),
            4 => (0u64..0x8000).prop_map(|o| DATA + o),
            1 => (0u64..8).prop_map(|k| DATA + 512 * k),
            2 => (0u64..0x400).prop_map(|o| REGION_B - 0x200 + o),
            2 => (0u64..0x400).prop_map(|o| HOLE - 0x200 + o),
            1 => (0u64..0x400).prop_map(|o| REGION_C - 0x200 + o),
            2 => (0u64..0x400).prop_map(|o| MEM_END - 0x200 + o),
            1 => (0u64..0x100).prop_map(|o| u64::MAX - o),
            1 => (0u64..MEM_END).prop_map(clear_of_avail),
            1 => any::<u64>().prop_map(clear_of_avail),
        ]
    }

    pub fn length() -> impl Strategy<Value = u32> {
        prop_oneof![
            2 => Just(0u32),
            2 => Just(1u32),
            2 => Just(16u32),
            2 => 0u32..64,
            3 => (1u32..9).prop_map(|k| 512 * k),
            1 => 0u32..0x3000,
            1 => Just(u32::MAX),
            1 => any::<u32>(),
        ]
    }

    /// (addr, len, flags, next) of one descriptor. An indirect one mostly points at a table.
    pub fn descriptor() -> impl Strategy<Value = (u64, u32, u16, u16)> {
        let flags = prop_oneof![
            3 => prop::sample::select(vec![
                0,
                VRING_DESC_F_NEXT,
                VRING_DESC_F_WRITE,
                VRING_DESC_F_NEXT | VRING_DESC_F_WRITE,
            ]),
            1 => 0u16..8,
        ];
        let plain = (address(), length(), flags, 0u16..20);
        let table = prop_oneof![
            Just(IND0),
            Just(IND1),
            Just(DESC),
            Just(IND0 + 8),
            address()
        ];
        let table_len = prop_oneof![(0u32..=32).prop_map(|n| 16 * n), length()];
        let indirect = (table, table_len, 0u16..8, 0u16..20)
            .prop_map(|(a, l, f, n)| (a, l, f | VRING_DESC_F_INDIRECT, n));
        prop_oneof![6 => plain, 1 => indirect]
    }

    pub fn request_type() -> impl Strategy<Value = u32> {
        prop_oneof![
            6 => prop::sample::select(vec![
                VIRTIO_BLK_T_IN,
                VIRTIO_BLK_T_OUT,
                VIRTIO_BLK_T_FLUSH,
                VIRTIO_BLK_T_GET_ID,
                VIRTIO_BLK_T_DISCARD,
                VIRTIO_BLK_T_WRITE_ZEROES,
                VIRTIO_BLK_T_IN | blk_proto::VIRTIO_BLK_T_BARRIER,
                VIRTIO_BLK_T_OUT | blk_proto::VIRTIO_BLK_T_BARRIER,
                2,
                0x77,
            ]),
            1 => any::<u32>(),
        ]
    }

    pub fn sector() -> impl Strategy<Value = u64> {
        let cap = IMAGE_SIZE / SECTOR;
        prop_oneof![
            3 => 0u64..64,
            2 => (cap - 16)..(cap + 4),
            1 => any::<u64>(),
        ]
    }

    /// A header slot's 16 bytes and the 16 bytes after them (a discard segment).
    pub fn header_slot() -> impl Strategy<Value = ([u8; 16], [u8; 16])> {
        (
            request_type(),
            any::<u32>(),
            sector(),
            sector(),
            prop_oneof![Just(0u32), Just(1), Just(8), 0u32..0x20_0000, any::<u32>()],
            prop_oneof![3 => Just(0u32), 1 => Just(1), 1 => any::<u32>()],
        )
            .prop_map(|(t, ioprio, s, rs, rn, rf)| {
                let mut h = header_bytes(t, s);
                h[4..8].copy_from_slice(&ioprio.to_le_bytes());
                (h, range_bytes(rs, rn, rf))
            })
    }

    /// The header of a request-shaped chain: mostly reads and writes inside the disk.
    pub fn plausible_header() -> impl Strategy<Value = ([u8; 16], [u8; 16])> {
        let cap = IMAGE_SIZE / SECTOR;
        (
            prop_oneof![
                4 => Just(VIRTIO_BLK_T_IN),
                4 => Just(VIRTIO_BLK_T_OUT),
                1 => Just(VIRTIO_BLK_T_FLUSH),
                1 => Just(VIRTIO_BLK_T_GET_ID),
                1 => Just(VIRTIO_BLK_T_DISCARD),
                1 => Just(VIRTIO_BLK_T_WRITE_ZEROES),
                1 => request_type(),
            ],
            // Sectors 8 apart make neighbouring 4 KiB requests, which the engine merges.
            prop_oneof![
                4 => (0u64..8).prop_map(|k| 8 * k),
                4 => 0u64..(cap - 64),
                1 => sector()
            ],
            prop_oneof![4 => 0u64..(cap - 64), 1 => sector()],
            prop_oneof![3 => 0u32..64, 1 => any::<u32>()],
            prop_oneof![4 => Just(0u32), 1 => Just(1), 1 => any::<u32>()],
        )
            .prop_map(|(t, s, rs, rn, rf)| (header_bytes(t, s), range_bytes(rs, rn, rf)))
    }

    /// A chain shaped like a request (so that real I/O happens), laid out properly linked,
    /// directly in the table or in an indirect table, maybe damaged in one descriptor.
    #[derive(Clone, Debug)]
    pub struct Shaped {
        pub header: ([u8; 16], [u8; 16]),
        pub header_pieces: Vec<u32>,
        pub readable: Vec<(u64, u32)>,
        pub writable: Vec<(u64, u32)>,
        pub status: (u64, u32),
        pub trailing_empty: bool,
        pub indirect: bool,
        pub damage: Option<(usize, (u64, u32, u16, u16))>,
    }

    /// A data buffer anywhere valid (aligned or not, across the A/B boundary, in C) with a
    /// whole number of sectors.
    fn clean_buffer() -> impl Strategy<Value = (u64, u32)> {
        let addr = prop_oneof![
            4 => (0u64..16).prop_map(|k| DATA + 512 * k),
            3 => (0u64..0x2000).prop_map(|o| DATA + 0x2000 + o),
            2 => (0u64..0x800).prop_map(|o| REGION_B - 0x400 + o),
            1 => (0u64..0x1000).prop_map(|o| REGION_C + o),
        ];
        let len = prop_oneof![
            2 => Just(2048u32),
            3 => (1u32..9).prop_map(|k| 512 * k),
        ];
        (addr, len)
    }

    /// A data buffer that may also be misaligned in length or run into the hole.
    fn messy_buffer() -> impl Strategy<Value = (u64, u32)> {
        let addr = prop_oneof![
            8 => clean_buffer().prop_map(|b| b.0),
            1 => (0u64..0x200).prop_map(|o| HOLE - 0x100 + o),
        ];
        let len = prop_oneof![
            4 => (1u32..9).prop_map(|k| 512 * k),
            1 => (0u32..5).prop_map(|k| 16 * k),
            1 => 0u32..0x1000,
        ];
        (addr, len)
    }

    pub fn shaped() -> impl Strategy<Value = Shaped> {
        let cap = IMAGE_SIZE / SECTOR;
        // 4 KiB transfers at sectors 8 apart: neighbours in one batch get merged.
        let sequential = (
            shaped_with(clean_buffer().boxed(), false),
            prop::sample::select(vec![VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT]),
            0u64..4,
            (0u64..0x100, 0u64..0x100),
        )
            .prop_map(|(mut s, t, k, (a, b))| {
                s.header.0 = header_bytes(t, 8 * k);
                s.header_pieces = vec![16];
                let halves = vec![(DATA + 0x4000 + a, 2048), (REGION_B - 1024 + b, 2048)];
                s.readable = halves.clone();
                s.writable = halves;
                s
            });
        // Discard / write-zeroes with one segment, as the header's tail or its own buffer.
        let ranged = (
            shaped_with(clean_buffer().boxed(), false),
            prop::sample::select(vec![VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES]),
            prop::bool::ANY,
            (
                0u64..cap,
                0u32..64,
                prop_oneof![3 => Just(0u32), 1 => Just(1), 1 => 0u32..4],
            ),
        )
            .prop_map(|(mut s, t, separate, (rs, rn, rf))| {
                s.header = (header_bytes(t, 0), range_bytes(rs, rn, rf));
                if separate {
                    s.header_pieces = vec![16];
                    s.readable = vec![(DATA + 0x7000, 16)];
                } else {
                    s.header_pieces = vec![32];
                    s.readable.clear();
                }
                s.writable.clear();
                s
            });
        prop_oneof![
            3 => shaped_with(clean_buffer().boxed(), false),
            3 => sequential,
            1 => ranged,
            3 => shaped_with(messy_buffer().boxed(), true),
        ]
    }

    fn shaped_with(
        buffer: BoxedStrategy<(u64, u32)>,
        damaged: bool,
    ) -> impl Strategy<Value = Shaped> {
        let damage = if damaged {
            proptest::option::weighted(0.3, (0usize..10, descriptor())).boxed()
        } else {
            Just(None).boxed()
        };
        (
            plausible_header(),
            prop::sample::select(vec![
                vec![16u32],
                vec![16],
                vec![16],
                vec![32],
                vec![8, 8],
                vec![1, 15],
                vec![4, 4, 4, 4],
                vec![12],
            ]),
            prop::collection::vec(buffer.clone(), 0..3),
            prop::collection::vec(buffer.clone(), 0..3),
            prop_oneof![3 => (0u64..16).prop_map(|k| (STATUS + k, 1u32)), 1 => buffer],
            prop::bool::weighted(0.2),
            prop::bool::weighted(0.3),
            damage,
        )
            .prop_map(
                |(
                    header,
                    header_pieces,
                    readable,
                    writable,
                    status,
                    trailing_empty,
                    indirect,
                    damage,
                )| {
                    Shaped {
                        header,
                        header_pieces,
                        readable,
                        writable,
                        status,
                        trailing_empty,
                        indirect,
                        damage,
                    }
                },
            )
    }

    impl Shaped {
        /// (addr, len, writable) in chain order, for a header at `hdr`.
        pub fn descs(&self, hdr: u64) -> Vec<(u64, u32, bool)> {
            let mut d = Vec::new();
            let mut at = hdr;
            for &p in &self.header_pieces {
                d.push((at, p, false));
                at += u64::from(p);
            }
            d.extend(self.readable.iter().map(|&(a, l)| (a, l, false)));
            d.extend(self.writable.iter().map(|&(a, l)| (a, l, true)));
            d.push((self.status.0, self.status.1, true));
            if self.trailing_empty {
                d.push((STATUS + 0x100, 0, true));
            }
            d
        }
    }

    #[derive(Clone, Debug)]
    pub struct Case {
        pub table: Vec<(u64, u32, u16, u16)>,
        pub ind0: Vec<(u64, u32, u16, u16)>,
        pub ind1: Vec<(u64, u32, u16, u16)>,
        pub slots: Vec<([u8; 16], [u8; 16])>,
        pub shaped: Vec<Shaped>,
        pub extra_heads: Vec<u16>,
        pub direct: bool,
        pub event_idx: bool,
        /// The iothread's busy-poll window after a batch (0: off).
        pub poll: Duration,
    }

    pub fn case() -> impl Strategy<Value = Case> {
        (
            prop::collection::vec(descriptor(), QSIZE as usize),
            prop::collection::vec(descriptor(), IND_ENTRIES as usize),
            prop::collection::vec(descriptor(), IND_ENTRIES as usize),
            prop::collection::vec(header_slot(), HDR_SLOTS as usize),
            prop::collection::vec(shaped(), 0..5),
            prop::collection::vec(
                prop_oneof![4 => 0u16..QSIZE, 1 => QSIZE..QSIZE + 4, 1 => any::<u16>()],
                0..5,
            ),
            any::<bool>(),
            any::<bool>(),
            prop_oneof![3 => Just(Duration::ZERO), 1 => Just(Duration::from_micros(200))],
        )
            .prop_map(
                |(table, ind0, ind1, slots, shaped, extra_heads, direct, event_idx, poll)| Case {
                    table,
                    ind0,
                    ind1,
                    slots,
                    shaped,
                    extra_heads,
                    direct,
                    event_idx,
                    poll,
                },
            )
    }

    /// Writes the case into guest memory; returns the avail entries to publish.
    pub fn lay_out(case: &Case, m: &Mem) -> Vec<u16> {
        for (i, &(a, l, fl, n)) in case.table.iter().enumerate() {
            write_desc(m, DESC, i as u16, a, l, fl, n);
        }
        for (table, entries) in [(IND0, &case.ind0), (IND1, &case.ind1)] {
            for (i, &(a, l, fl, n)) in entries.iter().enumerate() {
                write_desc(m, table, i as u16, a, l, fl, n);
            }
        }
        for (k, (h, r)) in case.slots.iter().enumerate() {
            let at = HDR + 0x40 * k as u64;
            m.write_slice(h, GuestAddress(at)).expect("slot");
            m.write_slice(r, GuestAddress(at + 16)).expect("slot");
        }
        let mut heads = Vec::new();
        let mut next_free = 0u16;
        let mut free_tables = vec![IND1, IND0];
        for (k, s) in case.shaped.iter().enumerate() {
            let hdr = HDR + 0x40 * k as u64;
            m.write_slice(&s.header.0, GuestAddress(hdr)).expect("slot");
            m.write_slice(&s.header.1, GuestAddress(hdr + 16))
                .expect("slot");
            let descs = s.descs(hdr);
            // The slot's discard / write-zeroes segment also goes to the first readable
            // buffer, where a request with a bare 16-byte header has its payload.
            if let Some(&(a, _)) = s.readable.first() {
                let _ = m.write_slice(&s.header.1, GuestAddress(a));
            }
            let (table, first) = if s.indirect && !free_tables.is_empty() {
                if next_free >= QSIZE {
                    continue;
                }
                let table = free_tables.pop().expect("checked non-empty");
                write_desc(
                    m,
                    DESC,
                    next_free,
                    table,
                    16 * descs.len() as u32,
                    VRING_DESC_F_INDIRECT,
                    0,
                );
                heads.push(next_free);
                next_free += 1;
                (table, 0)
            } else {
                if usize::from(next_free) + descs.len() > usize::from(QSIZE) {
                    continue;
                }
                heads.push(next_free);
                next_free += descs.len() as u16;
                (DESC, next_free - descs.len() as u16)
            };
            write_chain(m, table, first, &descs);
            if let Some((i, (a, l, fl, n))) = s.damage {
                let i = (i % descs.len()) as u16;
                write_desc(m, table, first + i, a, l, fl, n);
            }
        }
        heads.extend(&case.extra_heads);
        heads.truncate(usize::from(QSIZE));
        heads
    }
}

/// One avail entry as walked: head, writable (addr, len) of its non-empty descriptors in
/// chain order, and the total writable length (the used len of a status-carrying answer).
type Walked = (u16, Vec<(u64, u32)>, u32);

/// What the device may do to guest memory for the chains on the avail ring, worked out
/// beforehand by walking them with virtio-queue itself (the same walk the server does).
struct Oracle {
    chains: Vec<Walked>,
    /// Guest ranges whose contents steer the walk: tables and the avail ring.
    steering: Vec<(u64, u64)>,
}

fn oracle(m: &Mem, q: &QueueLayout, indirect_tables: &[(u64, u64)]) -> Oracle {
    use virtio_queue::{Queue, QueueOwnedT, QueueT};
    let mut queue = Queue::new(q.size).expect("queue");
    queue.set_size(q.size);
    queue.set_ready(true);
    queue
        .try_set_desc_table_address(GuestAddress(q.desc))
        .expect("desc");
    queue
        .try_set_avail_ring_address(GuestAddress(q.avail))
        .expect("avail");
    queue
        .try_set_used_ring_address(GuestAddress(q.used))
        .expect("used");
    let mut chains = Vec::new();
    for chain in queue.iter(m).expect("avail ring") {
        let head = chain.head_index();
        let mut writable = Vec::new();
        let mut total = 0u32;
        for d in chain {
            if d.is_write_only() {
                total = total.saturating_add(d.len());
                if d.len() > 0 {
                    writable.push((d.addr().0, d.len()));
                }
            }
        }
        chains.push((head, writable, total));
    }
    let mut steering = vec![(q.desc, q.desc_bytes()), (q.avail, q.avail_bytes())];
    steering.extend_from_slice(indirect_tables);
    Oracle { chains, steering }
}

/// Indirect tables the walk of the published chains follows: the first indirect descriptor
/// reached from each head in the main table, if virtio-queue accepts its length.
fn followed_tables(m: &Mem, q: &QueueLayout, heads: &[u16]) -> Vec<(u64, u64)> {
    let mut tables = Vec::new();
    for &head in heads {
        let (mut i, mut ttl) = (head, q.size);
        while i < q.size && ttl > 0 {
            let base = GuestAddress(q.desc + 16 * u64::from(i));
            let raw: RawDescriptor = m.read_obj(base).expect("descriptor table");
            let d = SplitDescriptor::from(raw);
            if d.flags() & VRING_DESC_F_INDIRECT != 0 {
                if d.len() % 16 == 0 && d.len() / 16 <= 0xffff {
                    tables.push((d.addr().0, u64::from(d.len())));
                }
                break;
            }
            if !d.has_next() {
                break;
            }
            i = d.next();
            ttl -= 1;
        }
    }
    tables
}

fn overlaps(a: (u64, u64), b: (u64, u64)) -> bool {
    let end = |(s, l): (u64, u64)| s.saturating_add(l);
    a.0 < end(b) && b.0 < end(a)
}

fn check_random_case(case: &random::Case, image: &std::path::Path) -> Result<(), TestCaseError> {
    let Some(storage) = open_image(image, case.direct) else {
        return Ok(());
    };
    let guest = guest();
    guest.fill(FILL);
    let q = random::layout();
    zero_rings(&guest, &q);
    let m = guest.mem.memory();
    let heads = random::lay_out(case, &m);
    q.publish(&m, &heads);
    let indirect = followed_tables(&m, &q, &heads);
    let oracle = oracle(&m, &q, &indirect);
    prop_assert_eq!(oracle.chains.len(), heads.len());
    let before = guest.snapshot();

    let dev = Device::new(&guest, storage, 1, &[q], case.event_idx, case.poll);
    if let Err(e) = dev.run(&[0], heads.len() as u64, TIMEOUT) {
        guest.keep_mapped();
        return Err(TestCaseError::fail(e));
    }
    drop(dev);
    if let Err(e) = guest.guards_intact() {
        return Err(TestCaseError::fail(e));
    }

    // Writes made during the drain (status bytes of rejected requests, GET_ID) may rewrite
    // descriptors or the used ring still to be read: then only the checks above hold.
    let writable: Vec<(u64, u64)> = oracle
        .chains
        .iter()
        .flat_map(|c| c.1.iter().map(|&(a, l)| (a, u64::from(l))))
        .collect();
    let used_ring = (q.used, q.used_bytes());
    let steered = writable
        .iter()
        .any(|&w| overlaps(w, used_ring) || oracle.steering.iter().any(|&s| overlaps(w, s)));
    if steered {
        return Ok(());
    }
    // Every chain with a valid head is on the used ring once per avail entry.
    let used = q.used_entries(&m);
    let mut used_ids: Vec<u32> = used.iter().map(|e| e.0).collect();
    used_ids.sort_unstable();
    let mut expect_ids: Vec<u32> = heads
        .iter()
        .filter(|&&h| h < random::QSIZE)
        .map(|&h| u32::from(h))
        .collect();
    expect_ids.sort_unstable();
    prop_assert_eq!(used_ids, expect_ids, "used ids vs published heads");

    // Used len: 0 (malformed) or the chain's writable total (status located).
    for &(id, len) in &used {
        let totals: Vec<u32> = oracle
            .chains
            .iter()
            .filter(|c| u32::from(c.0) == id)
            .map(|c| c.2)
            .collect();
        prop_assert!(
            len == 0 || totals.contains(&len),
            "head {} used len {} not in {:?}",
            id,
            len,
            totals
        );
        // A chain answered with a status: its status byte holds one, unless some writable
        // buffer that may take data (anything but a status descriptor ending there) covers it.
        if len > 0 {
            for c in oracle.chains.iter().filter(|c| u32::from(c.0) == id) {
                let Some(&(a, l)) = c.1.last() else { continue };
                let status = a + u64::from(l) - 1;
                let clean = oracle.chains.iter().all(|other| {
                    other.1.iter().enumerate().all(|(i, &(wa, wl))| {
                        let w = (wa, u64::from(wl));
                        !overlaps(w, (status, 1))
                            || (i + 1 == other.1.len() && wa + u64::from(wl) == status + 1)
                    })
                });
                if clean {
                    let s: u8 = m.read_obj(GuestAddress(status)).expect("status");
                    prop_assert!(
                        s <= VIRTIO_BLK_S_UNSUPP,
                        "head {} status byte {:#x} at {:#x} not written",
                        id,
                        s,
                        status
                    );
                }
            }
        }
    }

    // No guest byte outside the chains' writable buffers and the used ring changed.
    let after = guest.snapshot();
    for ((start, len), (b, a)) in guest.ranges().into_iter().zip(before.iter().zip(&after)) {
        if b == a {
            continue;
        }
        for off in 0..len {
            if b[off] == a[off] {
                continue;
            }
            let addr = start + off as u64;
            let allowed =
                overlaps((addr, 1), used_ring) || writable.iter().any(|&w| overlaps((addr, 1), w));
            prop_assert!(
                allowed,
                "guest byte {:#x} changed ({:#x} -> {:#x}) outside every writable buffer",
                addr,
                b[off],
                a[off]
            );
        }
    }
    Ok(())
}

proptest! {
    // PROPTEST_CASES overrides the default of 256.
    #![proptest_config(ProptestConfig { max_shrink_time: 120_000, ..ProptestConfig::default() })]

    #[test]
    fn random_chains_are_answered_without_straying(case in random::case()) {
        let dir = image_dir();
        check_random_case(&case, &dir.1)?;
    }
}

#[test]
fn a_missing_prerequisite_is_a_visible_skip_and_a_failure_under_ci() {
    let under_ci =
        std::panic::catch_unwind(|| skip_in(true, "(an example; this panic is the test passing)"));
    assert!(under_ci.is_err(), "a skip must fail under CI=true");
}

/// One image shared by every case of the property test (its contents do not matter there).
fn image_dir() -> &'static (TempDir, PathBuf) {
    static IMAGE: std::sync::OnceLock<(TempDir, PathBuf)> = std::sync::OnceLock::new();
    IMAGE.get_or_init(|| {
        let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("temp dir");
        let path = dir.path().join("random.img");
        make_image(&path, IMAGE_SIZE);
        (dir, path)
    })
}
