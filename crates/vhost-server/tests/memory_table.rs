//! A memory-table update (SET_MEM_TABLE with a new table) while reads are in flight into the
//! old one. Guest memory is a memfd mapped once per table, as the library maps a frontend's
//! regions: the old table's mapping goes away as soon as nothing holds it. The reads are
//! buffered reads of an image evicted from the page cache, so the kernel copies their data
//! into guest memory late (io-wq, or task work when the iothread next enters the ring), through
//! the addresses they were submitted with: if the server let go of the old mapping, the copy
//! (and the status byte) would land on unmapped memory.

mod support;

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use blk_proto::{VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN};
use support::*;
use vhost_server::{ServerConfig, VhostUserBlk, Vring};
use vhost_user_backend::{VhostUserBackend, VringT};
use vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap,
    GuestRegionMmap, MmapRegion,
};
use vmm_sys_util::epoll::EventSet;

const MIB: u64 = 1 << 20;
const GUEST_SIZE: usize = 24 << 20;
const QSIZE: u16 = 128;
const RING: QueueLayout = QueueLayout {
    size: QSIZE,
    desc: 0,
    avail: 0x800,
    used: 0x1000,
};
/// Header k at HEADERS + 32k, its status byte at +16.
const HEADERS: u64 = 0x2_0000;
const DATA: u64 = MIB;
const CHUNK: u32 = 512 << 10;
/// Chains per batch: one before the memory table changes, one after.
const BATCH: u16 = 16;
const IMAGE_SIZE: u64 = 32 * MIB;

/// One table over the whole memfd (a fresh shared mapping of it).
fn table(memfd: &File) -> GuestMemoryMmap<()> {
    let file = memfd.try_clone().expect("dup memfd");
    let region =
        MmapRegion::<()>::from_file(FileOffset::new(file, 0), GUEST_SIZE).expect("map the memfd");
    GuestMemoryMmap::from_regions(vec![
        GuestRegionMmap::new(region, GuestAddress(0)).expect("region")
    ])
    .expect("guest memory")
}

fn memfd() -> File {
    // SAFETY: a plain syscall with a NUL-terminated name; the fd it returns is owned below.
    let fd = unsafe { libc::memfd_create(c"guest".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` is a fresh descriptor nothing else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(GUEST_SIZE as u64).expect("size the memfd");
    file
}

/// Writes the image, then drops it from the page cache so that reading it takes real I/O.
fn cold_image(path: &std::path::Path) {
    make_image(path, IMAGE_SIZE);
    let f = File::open(path).expect("image");
    f.sync_all().expect("fsync");
    // SAFETY: fadvise on an open fd; advice only, no memory involved.
    let rc = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    assert_eq!(rc, 0, "posix_fadvise");
}

/// Lays out chain k (a 512 KiB read of image chunk k into data chunk k) and publishes it.
fn publish_read(m: &GuestMemoryMmap<()>, k: u16) {
    let header = HEADERS + 32 * u64::from(k);
    m.write_slice(
        &header_bytes(VIRTIO_BLK_T_IN, u64::from(k) * u64::from(CHUNK) / SECTOR),
        GuestAddress(header),
    )
    .expect("header");
    m.write_obj(0xffu8, GuestAddress(header + 16))
        .expect("status");
    let data = DATA + u64::from(k) * u64::from(CHUNK);
    RING.chain(
        m,
        3 * k,
        &[
            (header, 16, false),
            (data, CHUNK, true),
            (header + 16, 1, true),
        ],
    );
    RING.publish(m, &[3 * k]);
}

#[test]
fn a_memory_table_update_with_reads_in_flight_keeps_their_buffers_mapped() {
    // Whether the reads are still in flight when the table changes is up to the disk (a host
    // cache can serve them at once): run the scenario again until it is, a few times at most.
    const ATTEMPTS: usize = 5;
    for attempt in 1..=ATTEMPTS {
        let in_flight_at_update = update_the_table_under_reads();
        if in_flight_at_update > 0 {
            eprintln!("attempt {attempt}: {in_flight_at_update} reads in flight at the update");
            return;
        }
        eprintln!("attempt {attempt}: the reads completed before the memory table changed");
    }
    panic!("in {ATTEMPTS} attempts the reads always completed before the memory table changed: the test proved nothing");
}

/// One run: every chain must be answered with the image's data whatever the timing; returns
/// how many reads were still in flight when the table changed.
fn update_the_table_under_reads() -> u64 {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("temp dir");
    let path = dir.path().join("cold.img");
    cold_image(&path);
    let storage = open_image(&path, false).expect("buffered image");
    let backend = VhostUserBlk::new(
        ServerConfig {
            // The kernel must go through the user addresses, not pages registered up front.
            fixed_buffers: false,
            ..ServerConfig::new(device_config(IMAGE_SIZE, 1, QSIZE), QSIZE)
        },
        storage,
    )
    .expect("backend");
    let memfd = memfd();
    // As the library does: one GuestMemoryAtomic shared by the vrings and the backend, whose
    // table a SET_MEM_TABLE replaces.
    let mem = GuestMemoryAtomic::new(table(&memfd));
    let vring = Vring::new(mem.clone(), QSIZE).expect("vring");
    vring
        .set_queue_info(RING.desc, RING.avail, RING.used)
        .expect("queue addresses");
    vring.set_queue_size(QSIZE);
    vring.set_queue_ready(true);
    vring.set_enabled(true);
    backend.update_memory(mem.clone()).expect("memory table");

    // Everything that touches the ring runs on one thread (the ring's owner), as in the server.
    let (tx, rx) = mpsc::channel();
    let (b, m, v, fd) = (
        backend.clone(),
        mem.clone(),
        vring.clone(),
        memfd.try_clone().expect("dup"),
    );
    std::thread::spawn(move || {
        let vrings = [v];
        let kick = |b: &VhostUserBlk| b.handle_event(0, EventSet::IN, &vrings, 0);
        for k in 0..BATCH {
            publish_read(&m.memory(), k);
        }
        kick(&b).expect("kick");
        let in_flight_at_update = u64::from(BATCH) - answered(&b);
        // SET_MEM_TABLE: a new mapping of the same memory; the old one is unmapped as soon as
        // nothing holds it.
        m.lock().expect("memory lock").replace(table(&fd));
        b.update_memory(m.clone()).expect("new memory table");
        // The guest goes on submitting through the new table.
        for k in BATCH..2 * BATCH {
            publish_read(&m.memory(), k);
        }
        kick(&b).expect("second kick");
        let deadline = Instant::now() + Duration::from_secs(30);
        while answered(&b) < 2 * u64::from(BATCH) && Instant::now() < deadline {
            b.handle_event(2, EventSet::IN, &vrings, 0)
                .expect("completion");
            std::thread::sleep(Duration::from_micros(200));
        }
        let _ = tx.send(in_flight_at_update);
    });
    let in_flight_at_update = rx
        .recv_timeout(Duration::from_secs(40))
        .expect("the iothread finished");
    let m = mem.memory();
    assert_eq!(RING.used_idx(&m), 2 * BATCH, "every chain answered");
    for k in 0..2 * BATCH {
        let header = HEADERS + 32 * u64::from(k);
        let status: u8 = m.read_obj(GuestAddress(header + 16)).expect("status");
        assert_eq!(status, VIRTIO_BLK_S_OK, "chain {k}");
        let mut data = vec![0u8; CHUNK as usize];
        let offset = u64::from(k) * u64::from(CHUNK);
        m.read_slice(&mut data, GuestAddress(DATA + offset))
            .expect("data");
        if let Some(i) = (0..data.len()).find(|&i| data[i] != image_byte(offset + i as u64)) {
            panic!(
                "chain {k}: byte {i} is {:#x}, the image has {:#x}",
                data[i],
                image_byte(offset + i as u64)
            );
        }
    }
    in_flight_at_update
}
