//! A test guest for driving `VhostUserBlk` the way a frontend would, through the public API only:
//! guest memory whose regions sit in a host arena between sentinel pages (so a write that
//! escapes a region is seen), split virtqueues laid out by hand, file images, and a driver that
//! kicks a queue and collects completions under a deadline (so a hang fails instead of hanging).
#![allow(dead_code)]

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use blk_proto::DeviceConfig;
use engine::{ImageOptions, Storage};
use vhost_server::{queue_masks, ServerConfig, VhostUserBlk, Vring};
use vhost_user_backend::{VhostUserBackend, VringT};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use vm_memory::{
    Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap, GuestRegionMmap,
    MmapRegion,
};
use vmm_sys_util::epoll::EventSet;

pub type Mem = GuestMemoryMmap<()>;
pub type GuestMem = GuestMemoryAtomic<Mem>;

pub const VRING_DESC_F_NEXT: u16 = 1;
pub const VRING_DESC_F_WRITE: u16 = 2;
pub const VRING_DESC_F_INDIRECT: u16 = 4;

/// Host bytes between and around guest regions, filled with [`SENTINEL`].
const GUARD: usize = 4096;
pub const SENTINEL: u8 = 0x5a;

/// Guest memory carved out of one host mapping: `[guard][region][guard][region]...[guard]`.
/// The guards are ordinary writable pages holding a known pattern, so a stray write (by the
/// server's own code or by the kernel on its behalf through io_uring) changes them instead of
/// landing silently in some other allocation.
pub struct Guest {
    pub mem: GuestMem,
    /// (guest address, length, offset of the region in the arena).
    regions: Vec<(u64, usize, usize)>,
    arena: *mut u8,
    arena_len: usize,
    /// Set when I/O may still be in flight into the arena (a test timed out): never unmap.
    keep_mapped: AtomicBool,
}

// SAFETY: the arena is plain memory owned by this value; every access goes through `mem`
// (itself Send + Sync) or through `&self` reads of the guard pages.
unsafe impl Send for Guest {}

impl Guest {
    /// Regions as (guest address, length): sorted, non-overlapping, page-sized.
    pub fn new(ranges: &[(u64, usize)]) -> Guest {
        let arena_len = GUARD + ranges.iter().map(|r| r.1 + GUARD).sum::<usize>();
        // SAFETY: a fresh anonymous private mapping; no existing memory is affected.
        let arena = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                arena_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        assert_ne!(arena, libc::MAP_FAILED, "mmap of the guest arena failed");
        let arena = arena.cast::<u8>();
        let mut regions = Vec::new();
        let mut mmap_regions = Vec::new();
        let mut offset = GUARD;
        for &(start, len) in ranges {
            assert_eq!(len % GUARD, 0, "regions are whole pages");
            // SAFETY: [offset, offset + len) lies inside the arena mapped above, which stays
            // mapped until `Guest` is dropped (callers drop every user of `mem` first, or leak).
            let region = unsafe {
                MmapRegion::<()>::build_raw(
                    arena.add(offset),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                )
            }
            .expect("region over the arena");
            mmap_regions
                .push(GuestRegionMmap::new(region, GuestAddress(start)).expect("guest region"));
            regions.push((start, len, offset));
            offset += len + GUARD;
        }
        let mem = GuestMemoryMmap::from_regions(mmap_regions).expect("guest memory");
        let guest = Guest {
            mem: GuestMemoryAtomic::new(mem),
            regions,
            arena,
            arena_len,
            keep_mapped: AtomicBool::new(false),
        };
        for (off, len) in guest.guards() {
            // SAFETY: a guard range inside the arena; nothing else references it yet.
            unsafe { std::ptr::write_bytes(arena.add(off), SENTINEL, len) };
        }
        guest
    }

    fn guards(&self) -> Vec<(usize, usize)> {
        let mut guards = vec![(0, GUARD)];
        guards.extend(self.regions.iter().map(|&(_, len, off)| (off + len, GUARD)));
        guards
    }

    /// Checks that no byte between or around the regions changed.
    pub fn guards_intact(&self) -> Result<(), String> {
        for (off, len) in self.guards() {
            // SAFETY: a guard range inside the arena, read only; the server never has a valid
            // reason to write there, and a racing stray write would itself be the bug we report.
            let bytes = unsafe { std::slice::from_raw_parts(self.arena.add(off), len) };
            if let Some(i) = bytes.iter().position(|&b| b != SENTINEL) {
                return Err(format!(
                    "host byte at arena offset {:#x} outside guest memory changed to {:#x}",
                    off + i,
                    bytes[i]
                ));
            }
        }
        Ok(())
    }

    /// Region list as (guest address, length).
    pub fn ranges(&self) -> Vec<(u64, usize)> {
        self.regions.iter().map(|&(a, l, _)| (a, l)).collect()
    }

    /// A copy of every region, in order.
    pub fn snapshot(&self) -> Vec<Vec<u8>> {
        let m = self.mem.memory();
        self.regions
            .iter()
            .map(|&(start, len, _)| {
                let mut v = vec![0u8; len];
                m.read_slice(&mut v, GuestAddress(start)).expect("region");
                v
            })
            .collect()
    }

    /// Fills every region with `byte`.
    pub fn fill(&self, byte: u8) {
        let m = self.mem.memory();
        for &(start, len, _) in &self.regions {
            m.write_slice(&vec![byte; len], GuestAddress(start))
                .expect("region");
        }
    }

    /// For a test that timed out with I/O possibly still in flight: keep the memory mapped.
    pub fn keep_mapped(&self) {
        self.keep_mapped.store(true, Ordering::Relaxed);
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        if self.keep_mapped.load(Ordering::Relaxed) {
            return;
        }
        // SAFETY: the arena was mapped in `new` with this length; the regions built over it do
        // not own it (build_raw), and every other user of guest memory is gone by now.
        unsafe { libc::munmap(self.arena.cast(), self.arena_len) };
    }
}

// ----- guest memory accessors (the guest's side of the protocol) -----

pub fn write_desc(m: &Mem, table: u64, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
    let raw = RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next));
    m.write_obj(raw, GuestAddress(table + 16 * u64::from(index)))
        .expect("descriptor table in guest memory");
}

/// The 16-byte virtio-blk request header.
pub fn header_bytes(request_type: u32, sector: u64) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[..4].copy_from_slice(&request_type.to_le_bytes());
    h[8..].copy_from_slice(&sector.to_le_bytes());
    h
}

/// One discard / write-zeroes segment.
pub fn range_bytes(sector: u64, num_sectors: u32, flags: u32) -> [u8; 16] {
    let mut r = [0u8; 16];
    r[..8].copy_from_slice(&sector.to_le_bytes());
    r[8..12].copy_from_slice(&num_sectors.to_le_bytes());
    r[12..].copy_from_slice(&flags.to_le_bytes());
    r
}

/// Where one split virtqueue lives in guest memory.
#[derive(Clone, Copy, Debug)]
pub struct QueueLayout {
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
}

impl QueueLayout {
    pub fn desc_bytes(&self) -> u64 {
        16 * u64::from(self.size)
    }

    /// flags, idx, ring, used_event.
    pub fn avail_bytes(&self) -> u64 {
        6 + 2 * u64::from(self.size)
    }

    /// flags, idx, ring, avail_event.
    pub fn used_bytes(&self) -> u64 {
        6 + 8 * u64::from(self.size)
    }

    pub fn desc(&self, m: &Mem, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        write_desc(m, self.desc, index, addr, len, flags, next);
    }

    /// Lays out a properly linked chain at `first..` of the table: (addr, len, writable).
    pub fn chain(&self, m: &Mem, first: u16, descs: &[(u64, u32, bool)]) {
        write_chain(m, self.desc, first, descs);
    }

    pub fn avail_idx(&self, m: &Mem) -> u16 {
        m.read_obj(GuestAddress(self.avail + 2)).expect("avail idx")
    }

    pub fn set_avail_idx(&self, m: &Mem, idx: u16) {
        m.write_obj(idx, GuestAddress(self.avail + 2))
            .expect("avail idx");
    }

    /// Puts `heads` on the avail ring after what is there and moves avail idx past them.
    pub fn publish(&self, m: &Mem, heads: &[u16]) {
        let mut idx = self.avail_idx(m);
        for &h in heads {
            let slot = u64::from(idx % self.size);
            m.write_obj(h, GuestAddress(self.avail + 4 + 2 * slot))
                .expect("avail ring");
            idx = idx.wrapping_add(1);
        }
        self.set_avail_idx(m, idx);
    }

    pub fn used_idx(&self, m: &Mem) -> u16 {
        m.read_obj(GuestAddress(self.used + 2)).expect("used idx")
    }

    /// (id, len) of used ring entry `i` (counted from 0, wrapping over the ring).
    pub fn used_entry(&self, m: &Mem, i: u16) -> (u32, u32) {
        let base = self.used + 4 + 8 * u64::from(i % self.size);
        (
            m.read_obj(GuestAddress(base)).expect("used ring"),
            m.read_obj(GuestAddress(base + 4)).expect("used ring"),
        )
    }

    pub fn used_entries(&self, m: &Mem) -> Vec<(u32, u32)> {
        (0..self.used_idx(m))
            .map(|i| self.used_entry(m, i))
            .collect()
    }
}

/// Lays out a properly linked chain at `first..` of the table at `table`.
pub fn write_chain(m: &Mem, table: u64, first: u16, descs: &[(u64, u32, bool)]) {
    for (i, &(addr, len, writable)) in descs.iter().enumerate() {
        let index = first + i as u16;
        let last = i + 1 == descs.len();
        let mut flags = if writable { VRING_DESC_F_WRITE } else { 0 };
        if !last {
            flags |= VRING_DESC_F_NEXT;
        }
        write_desc(
            m,
            table,
            index,
            addr,
            len,
            flags,
            if last { 0 } else { index + 1 },
        );
    }
}

// ----- images -----

pub const SECTOR: u64 = 512;

/// The byte a fresh test image holds at `offset`: never 0xee (the guest's fill pattern), and
/// different per sector so a read from the wrong place shows.
pub fn image_byte(offset: u64) -> u8 {
    0x11 + ((offset / SECTOR) % 64) as u8 + (offset % 3) as u8
}

/// Creates (or rewrites) an image of `size` bytes holding [`image_byte`] everywhere.
pub fn make_image(path: &Path, size: u64) {
    let data: Vec<u8> = (0..size).map(image_byte).collect();
    std::fs::write(path, data).expect("write the test image");
}

/// Opens `path` for the engine; None (after a visible SKIPPED line, or a failure under
/// CI=true) when O_DIRECT was asked for and the filesystem refuses it.
pub fn open_image(path: &Path, direct: bool) -> Option<Arc<Storage>> {
    let opts = ImageOptions {
        read_only: false,
        direct,
        create_size: None,
    };
    match Storage::open(path, &opts) {
        Ok(b) => Some(Arc::new(b)),
        Err(e) if direct => {
            skip(&format!("O_DIRECT image at {}: {e}", path.display()));
            None
        }
        Err(e) => panic!("cannot open the test image: {e}"),
    }
}

/// True when CI runs us: there, a missing prerequisite is a failure, not a skip.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// A test that cannot run here: fails under CI=true, else says SKIPPED where it is seen.
pub fn skip(reason: &str) {
    skip_in(in_ci(), reason);
}

/// [`skip`] with the CI decision given.
pub fn skip_in(ci: bool, reason: &str) {
    assert!(!ci, "CI must provide this test's prerequisite: {reason}");
    // Straight to stderr: libtest captures eprintln! of passing tests, and a skip must be
    // seen.
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "SKIPPED: {reason}");
}

// ----- the device -----

pub struct Device {
    pub backend: VhostUserBlk,
    /// One per global queue.
    pub vrings: Vec<Vring>,
    pub layouts: Vec<QueueLayout>,
    pub iothreads: usize,
    masks: Vec<u64>,
    /// The thread that plays the iothreads: an iothread's ring takes submissions only from
    /// the thread that set it up, so every event goes through this one, as in the server.
    driver: mpsc::Sender<Box<dyn FnOnce() + Send>>,
}

/// A thread that runs the jobs it is sent, one after another, until the sender is dropped.
fn spawn_driver() -> mpsc::Sender<Box<dyn FnOnce() + Send>> {
    let (tx, rx) = mpsc::channel::<Box<dyn FnOnce() + Send>>();
    std::thread::spawn(move || {
        for job in rx {
            job();
        }
    });
    tx
}

pub fn device_config(capacity: u64, queues: u16, queue_size: u16) -> DeviceConfig {
    let mut d = DeviceConfig::new(capacity, 512, queues, queue_size);
    d.serial = b"hostile-serial".to_vec();
    d
}

impl Device {
    /// A backend over `storage` with one vring per layout, memory table already set.
    pub fn new(
        guest: &Guest,
        storage: Arc<Storage>,
        iothreads: usize,
        layouts: &[QueueLayout],
        event_idx: bool,
        poll: Duration,
    ) -> Device {
        Device::with_cache(guest, storage, iothreads, layouts, event_idx, poll, true)
    }

    /// As [`Device::new`], starting with the write cache on (writeback) or off.
    pub fn with_cache(
        guest: &Guest,
        storage: Arc<Storage>,
        iothreads: usize,
        layouts: &[QueueLayout],
        event_idx: bool,
        poll: Duration,
        writeback: bool,
    ) -> Device {
        let queue_size = layouts.iter().map(|l| l.size).max().expect("one queue");
        let queues = layouts.len();
        let backend = VhostUserBlk::new(
            ServerConfig {
                iothreads,
                writeback,
                poll,
                ..ServerConfig::new(
                    device_config(storage.capacity_bytes(), queues as u16, queue_size),
                    queue_size,
                )
            },
            storage,
        )
        .expect("backend");
        let vrings = layouts
            .iter()
            .map(|l| {
                let v = Vring::new(guest.mem.clone(), queue_size).expect("vring");
                v.set_queue_info(l.desc, l.avail, l.used)
                    .expect("queue addresses");
                v.set_queue_size(l.size);
                v.set_queue_event_idx(event_idx);
                v.set_queue_ready(true);
                v.set_enabled(true);
                v
            })
            .collect();
        backend
            .update_memory(guest.mem.clone())
            .expect("memory table");
        Device {
            driver: spawn_driver(),
            masks: queue_masks(queues, iothreads),
            backend,
            vrings,
            layouts: layouts.to_vec(),
            iothreads,
        }
    }

    /// (iothread, index among that thread's vrings) of a global queue.
    fn placement(&self, queue: usize) -> (usize, u16) {
        let thread = self
            .masks
            .iter()
            .position(|m| m & (1 << queue) != 0)
            .expect("queue mapped");
        let local = (self.masks[thread] & ((1 << queue) - 1)).count_ones();
        (thread, local as u16)
    }

    /// Chains taken off all avail rings so far: completed, rejected or dropped as malformed.
    pub fn answered(&self) -> u64 {
        answered(&self.backend)
    }

    /// Kicks each queue in `kicks`, then services the completion eventfd of every iothread
    /// until `expected` chains have been answered in total (see [`answered`]). Runs on a
    /// helper thread so that a server stuck in a loop fails the test at `timeout` instead of
    /// hanging it.
    pub fn run(&self, kicks: &[usize], expected: u64, timeout: Duration) -> Result<(), String> {
        self.drive(kicks, Some(expected), timeout)
    }

    /// Only kicks (the drain, one submit, whatever completed already): leaves the rest in
    /// flight, as when the guest kicks again before the completion eventfd fires.
    pub fn kick(&self, kicks: &[usize], timeout: Duration) -> Result<(), String> {
        self.drive(kicks, None, timeout)
    }

    fn drive(
        &self,
        kicks: &[usize],
        expected: Option<u64>,
        timeout: Duration,
    ) -> Result<(), String> {
        let backend = self.backend.clone();
        let per_thread: Vec<Vec<Vring>> = (0..self.iothreads)
            .map(|t| {
                (0..self.vrings.len())
                    .filter(|&q| self.masks[t] & (1 << q) != 0)
                    .map(|q| self.vrings[q].clone())
                    .collect()
            })
            .collect();
        let kicks: Vec<(usize, u16)> = kicks.iter().map(|&q| self.placement(q)).collect();
        let completion_event = self.vrings.len() as u16 + 1;
        let (tx, rx) = mpsc::channel();
        let deadline = Instant::now() + timeout;
        let job = Box::new(move || {
            let result = (|| -> Result<(), String> {
                for (thread, local) in kicks {
                    backend
                        .handle_event(local, EventSet::IN, &per_thread[thread], thread)
                        .map_err(|e| format!("kick of thread {thread}: {e}"))?;
                }
                let Some(expected) = expected else {
                    return Ok(());
                };
                loop {
                    for (thread, vrings) in per_thread.iter().enumerate() {
                        backend
                            .handle_event(completion_event, EventSet::IN, vrings, thread)
                            .map_err(|e| format!("completion on thread {thread}: {e}"))?;
                    }
                    let done = answered(&backend);
                    if done >= expected {
                        return if done == expected {
                            Ok(())
                        } else {
                            Err(format!("{done} chains answered, {expected} published"))
                        };
                    }
                    if Instant::now() > deadline {
                        return Err(format!(
                            "only {done} of {expected} chains answered before the deadline"
                        ));
                    }
                    std::thread::sleep(Duration::from_micros(100));
                }
            })();
            let _ = tx.send(result);
        });
        if self.driver.send(job).is_err() {
            return Err("the driver thread is gone".into());
        }
        match rx.recv_timeout(timeout + Duration::from_secs(1)) {
            Ok(r) => r,
            Err(_) => Err(format!(
                "handle_event did not return within {timeout:?}: the iothread is stuck"
            )),
        }
    }
}

/// Sum over queues of completed requests (every kind), rejected and malformed chains.
pub fn answered(backend: &VhostUserBlk) -> u64 {
    let stats = backend.stats_json();
    let mut n = 0;
    for q in stats["queues"].as_array().expect("queues") {
        for kind in [
            "read",
            "write",
            "flush",
            "get_id",
            "discard",
            "write_zeroes",
        ] {
            n += q[kind]["ops"].as_u64().expect("ops");
        }
        n += q["rejected"].as_u64().expect("rejected");
        n += q["malformed"].as_u64().expect("malformed");
    }
    n
}
