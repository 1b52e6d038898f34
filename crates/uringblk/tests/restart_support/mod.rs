//! A test frontend that survives its backend, as QEMU does: guest memory in a memfd, split
//! rings laid out by hand in it, the inflight region from GET_INFLIGHT_FD, all kept across a
//! `kill -9` of the server, and a reconnect that hands them back (SET_INFLIGHT_FD, the same
//! memory table, each vring's base set to its used index). Built on the vhost crate's
//! `Frontend`.
#![allow(dead_code)]

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::Path;
use std::sync::atomic::{fence, Ordering};
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{VhostUserInflight, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

pub const QUEUE_SIZE: u16 = 128;
const VIRTIO_F_VERSION_1: u64 = 1 << 32;
const PROTOCOL_FEATURES: u64 = 1 << 30;
const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;
const DESC_F_NEXT: u16 = 1;
const DESC_F_WRITE: u16 = 2;
/// Per queue: its rings at queue * RING_STRIDE (descriptors, avail at +0x1000, used at +0x2000).
const RING_STRIDE: u64 = 0x4000;
/// Request headers and status bytes, 32 bytes per head and queue, after the rings.
const HEADERS: u64 = 0x10_0000;

/// Guest memory: one shared memfd mapping, guest physical address 0.
pub struct Memory {
    pub file: File,
    base: *mut u8,
    pub len: usize,
}

impl Memory {
    pub fn new(len: usize) -> Memory {
        // SAFETY: a NUL-terminated literal name; the call only creates a descriptor.
        let fd = unsafe { libc::memfd_create(c"guest".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
        // SAFETY: `fd` was just created and nothing else owns it.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(len as u64).expect("size the memfd");
        // SAFETY: a new shared mapping of the whole memfd; no existing memory is affected.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        assert_ne!(base, libc::MAP_FAILED, "mmap the memfd");
        Memory {
            file,
            base: base.cast(),
            len,
        }
    }

    fn ptr(&self, gpa: u64, len: usize) -> *mut u8 {
        assert!(
            gpa as usize + len <= self.len,
            "{gpa:#x}+{len} outside guest memory"
        );
        // SAFETY: inside the mapping (checked above).
        unsafe { self.base.add(gpa as usize) }
    }

    pub fn write(&self, gpa: u64, bytes: &[u8]) {
        let p = self.ptr(gpa, bytes.len());
        for (i, b) in bytes.iter().enumerate() {
            // SAFETY: inside the range `ptr` checked; volatile since the server shares it.
            unsafe { p.add(i).write_volatile(*b) };
        }
    }

    /// Large fills, written before the requests are published (nothing reads them yet).
    pub fn fill_with(&self, gpa: u64, len: usize, f: impl Fn(usize) -> u8) {
        let p = self.ptr(gpa, len);
        for i in 0..len {
            // SAFETY: inside the range `ptr` checked.
            unsafe { p.add(i).write(f(i)) };
        }
    }

    pub fn read(&self, gpa: u64, len: usize) -> Vec<u8> {
        let p = self.ptr(gpa, len);
        // SAFETY: inside the range `ptr` checked; volatile since the server writes it.
        (0..len)
            .map(|i| unsafe { p.add(i).read_volatile() })
            .collect()
    }

    fn u16_at(&self, gpa: u64) -> u16 {
        let b = self.read(gpa, 2);
        u16::from_le_bytes([b[0], b[1]])
    }

    fn u32_at(&self, gpa: u64) -> u32 {
        let b = self.read(gpa, 4);
        u32::from_le_bytes([b[0], b[1], b[2], b[3]])
    }

    fn region(&self) -> VhostUserMemoryRegionInfo {
        VhostUserMemoryRegionInfo {
            guest_phys_addr: 0,
            memory_size: self.len as u64,
            userspace_addr: self.base as u64,
            mmap_offset: 0,
            mmap_handle: self.file.as_raw_fd(),
        }
    }
}

impl Drop for Memory {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, with its length; nothing uses it after this.
        unsafe { libc::munmap(self.base.cast(), self.len) };
    }
}

/// One request: read or write `len` bytes at `offset` of the disk, from/to guest `data`.
#[derive(Clone, Copy, Debug)]
pub struct Request {
    pub write: bool,
    pub offset: u64,
    pub data: u64,
    pub len: u32,
}

/// One split queue in guest memory, driven by hand.
pub struct Queue {
    pub index: u16,
    /// Descriptors in the ring (SET_VRING_NUM), at most [`QUEUE_SIZE`], the inflight
    /// region's queue size: a driver may set a smaller ring than the device offers.
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    avail_idx: u16,
    kick: EventFd,
    call: EventFd,
}

impl Queue {
    fn new(index: u16, size: u16) -> Queue {
        assert!(size > 0 && size <= QUEUE_SIZE, "ring size {size}");
        let desc = u64::from(index) * RING_STRIDE;
        Queue {
            index,
            size,
            desc,
            avail: desc + 0x1000,
            used: desc + 0x2000,
            avail_idx: 0,
            kick: EventFd::new(EFD_NONBLOCK).expect("kick eventfd"),
            call: EventFd::new(EFD_NONBLOCK).expect("call eventfd"),
        }
    }

    fn header(&self, head: u16) -> u64 {
        HEADERS + (u64::from(self.index) * u64::from(QUEUE_SIZE) + u64::from(head)) * 32
    }

    fn status_addr(&self, head: u16) -> u64 {
        self.header(head) + 16
    }

    pub fn status(&self, mem: &Memory, head: u16) -> u8 {
        mem.read(self.status_addr(head), 1)[0]
    }

    fn write_desc(&self, mem: &Memory, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let mut d = [0u8; 16];
        d[0..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..16].copy_from_slice(&next.to_le_bytes());
        mem.write(self.desc + 16 * u64::from(i), &d);
    }

    /// Lays out each request as a 3-descriptor chain (header, data, status), the heads 0, 3,
    /// 6, ..., then publishes them all with one avail index store and kicks once.
    /// Returns the heads, in request order.
    pub fn publish(&mut self, mem: &Memory, requests: &[Request]) -> Vec<u16> {
        let mut heads = Vec::new();
        for (n, r) in requests.iter().enumerate() {
            let head = (n * 3) as u16;
            let mut h = [0u8; 16];
            h[0..4].copy_from_slice(&u32::from(r.write).to_le_bytes());
            h[8..16].copy_from_slice(&(r.offset / 512).to_le_bytes());
            mem.write(self.header(head), &h);
            mem.write(self.status_addr(head), &[0xff]);
            self.write_desc(mem, head, self.header(head), 16, DESC_F_NEXT, head + 1);
            let data_flags = DESC_F_NEXT | if r.write { 0 } else { DESC_F_WRITE };
            self.write_desc(mem, head + 1, r.data, r.len, data_flags, head + 2);
            self.write_desc(mem, head + 2, self.status_addr(head), 1, DESC_F_WRITE, 0);
            let slot =
                self.avail + 4 + 2 * u64::from(self.avail_idx.wrapping_add(n as u16) % self.size);
            mem.write(slot, &head.to_le_bytes());
            heads.push(head);
        }
        self.avail_idx = self.avail_idx.wrapping_add(requests.len() as u16);
        // The entries before the index (the server reads the index with Acquire).
        fence(Ordering::SeqCst);
        mem.write(self.avail + 2, &self.avail_idx.to_le_bytes());
        fence(Ordering::SeqCst);
        self.kick.write(1).expect("kick");
        heads
    }

    /// With EVENT_IDX: the guest asks to be signalled once the used index passes `idx`.
    pub fn set_used_event(&self, mem: &Memory, idx: u16) {
        mem.write(
            self.avail + 4 + 2 * u64::from(self.size),
            &idx.to_le_bytes(),
        );
        fence(Ordering::SeqCst);
    }

    /// Whether the server signalled the queue (its call eventfd) since the last take.
    pub fn take_signal(&self) -> bool {
        self.call.read().is_ok()
    }

    pub fn used_idx(&self, mem: &Memory) -> u16 {
        mem.u16_at(self.used + 2)
    }

    /// The ids of the used ring's elements from slot 0 up to the used index (no wrap: tests
    /// publish fewer requests than a queue holds).
    pub fn used_ids(&self, mem: &Memory) -> Vec<u16> {
        let n = self.used_idx(mem);
        assert!(
            n <= self.size,
            "the used index {n} is past one lap of the ring"
        );
        (0..n)
            .map(|i| mem.u32_at(self.used + 4 + 8 * u64::from(i)) as u16)
            .collect()
    }
}

/// The frontend: a connection, and what it keeps across the server's death.
pub struct TestFrontend {
    pub mem: Memory,
    pub queues: Vec<Queue>,
    inflight: Option<(VhostUserInflight, File)>,
    frontend: Option<Frontend>,
    features: u64,
    /// Negotiate VIRTIO_RING_F_EVENT_IDX (the guest's used_event decides each signal).
    pub event_idx: bool,
}

impl TestFrontend {
    pub fn new(mem_len: usize, queues: u16) -> TestFrontend {
        Self::with_ring_size(mem_len, queues, QUEUE_SIZE)
    }

    /// Rings of `ring_size` descriptors, in an inflight region asked for [`QUEUE_SIZE`].
    pub fn with_ring_size(mem_len: usize, queues: u16, ring_size: u16) -> TestFrontend {
        TestFrontend {
            mem: Memory::new(mem_len),
            queues: (0..queues).map(|q| Queue::new(q, ring_size)).collect(),
            inflight: None,
            frontend: None,
            features: 0,
            event_idx: false,
        }
    }

    /// Connects and sets the device up as QEMU's vhost-user-blk does on its first start
    /// (GET_INFLIGHT_FD, then SET_INFLIGHT_FD of that region), or on a reconnect after the
    /// backend went away (SET_INFLIGHT_FD of the kept region; each vring's base is its used
    /// index).
    pub fn connect(&mut self, socket: &Path) {
        let mut f = self.handshake(socket);
        if self.inflight.is_none() {
            self.inflight = Some(self.get_inflight(&mut f));
        }
        let (msg, file) = self.inflight.as_ref().expect("region");
        f.set_inflight_fd(msg, file.as_raw_fd())
            .expect("SET_INFLIGHT_FD");
        f.set_mem_table(&[self.mem.region()])
            .expect("SET_MEM_TABLE");
        for q in 0..self.queues.len() {
            self.start_queue(&mut f, q);
        }
        self.frontend = Some(f);
    }

    /// A first start as QEMU makes it when the firmware drives the disk before Linux does:
    /// a region, only queue 0 started but every queue enabled, queue 0 stopped (the driver's
    /// reset), then a new region and every queue started. The second region is the one kept.
    pub fn connect_after_firmware(&mut self, socket: &Path) {
        let mut f = self.handshake(socket);
        let (msg, file) = self.get_inflight(&mut f);
        f.set_inflight_fd(&msg, file.as_raw_fd())
            .expect("SET_INFLIGHT_FD");
        f.set_mem_table(&[self.mem.region()])
            .expect("SET_MEM_TABLE");
        self.start_queue(&mut f, 0);
        for q in 1..self.queues.len() {
            f.set_vring_call(q, &self.queues[q].call)
                .expect("SET_VRING_CALL");
            f.set_vring_enable(q, true).expect("SET_VRING_ENABLE");
        }
        f.get_vring_base(0).expect("GET_VRING_BASE");
        let region = self.get_inflight(&mut f);
        let (msg, file) = &region;
        f.set_inflight_fd(msg, file.as_raw_fd())
            .expect("SET_INFLIGHT_FD");
        self.inflight = Some(region);
        for q in 0..self.queues.len() {
            self.start_queue(&mut f, q);
        }
        self.frontend = Some(f);
    }

    fn handshake(&mut self, socket: &Path) -> Frontend {
        let mut f = connect_retrying(socket, self.queues.len() as u64);
        f.set_owner().expect("SET_OWNER");
        let offered = f.get_features().expect("GET_FEATURES");
        assert_ne!(offered & PROTOCOL_FEATURES, 0);
        let protocol = f.get_protocol_features().expect("GET_PROTOCOL_FEATURES");
        let wanted = VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::INFLIGHT_SHMFD;
        assert!(
            protocol.contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD),
            "INFLIGHT_SHMFD must be offered"
        );
        f.set_protocol_features(protocol & wanted)
            .expect("SET_PROTOCOL_FEATURES");
        // No FLUSH: the driver is served writethrough, so writes take the disk's time.
        let event_idx = if self.event_idx {
            VIRTIO_RING_F_EVENT_IDX
        } else {
            0
        };
        self.features = offered & (VIRTIO_F_VERSION_1 | PROTOCOL_FEATURES | event_idx);
        assert_eq!(self.features & event_idx, event_idx, "EVENT_IDX offered");
        f.set_features(self.features).expect("SET_FEATURES");
        f
    }

    fn get_inflight(&self, f: &mut Frontend) -> (VhostUserInflight, File) {
        let asked = VhostUserInflight::new(0, 0, self.queues.len() as u16, QUEUE_SIZE);
        f.get_inflight_fd(&asked).expect("GET_INFLIGHT_FD")
    }

    /// Sets queue `i` up and starts it (its base is its used index, as after a reconnect).
    fn start_queue(&self, f: &mut Frontend, i: usize) {
        let q = &self.queues[i];
        let base = self.mem.base as u64;
        f.set_vring_num(i, q.size).expect("SET_VRING_NUM");
        f.set_vring_base(i, q.used_idx(&self.mem))
            .expect("SET_VRING_BASE");
        f.set_vring_addr(
            i,
            &VringConfigData {
                queue_max_size: QUEUE_SIZE,
                queue_size: q.size,
                flags: 0,
                desc_table_addr: base + q.desc,
                used_ring_addr: base + q.used,
                avail_ring_addr: base + q.avail,
                log_addr: None,
            },
        )
        .expect("SET_VRING_ADDR");
        f.set_vring_kick(i, &q.kick).expect("SET_VRING_KICK");
        f.set_vring_call(i, &q.call).expect("SET_VRING_CALL");
        f.set_vring_enable(i, true).expect("SET_VRING_ENABLE");
    }

    /// The heads of queue `queue` that the kept inflight region marks in flight (popped by
    /// the server, not yet cleared), read as libvhost-user lays the region out: per queue a
    /// 16-byte header, then 16 bytes per descriptor (the first the inflight flag), padded to
    /// 64 bytes.
    pub fn marked_in_flight(&self, queue: u16) -> Vec<u16> {
        use std::os::unix::fs::FileExt;
        let Some((_, file)) = &self.inflight else {
            return Vec::new();
        };
        let part = (16 + 16 * u64::from(QUEUE_SIZE)).div_ceil(64) * 64;
        let mut entries = vec![0u8; 16 + 16 * usize::from(QUEUE_SIZE)];
        if file
            .read_exact_at(&mut entries, u64::from(queue) * part)
            .is_err()
        {
            return Vec::new();
        }
        (0..QUEUE_SIZE)
            .filter(|&h| entries[16 + 16 * usize::from(h)] == 1)
            .collect()
    }

    /// Forgets the connection (its server is dead); memory, rings and region stay.
    pub fn disconnect(&mut self) {
        self.frontend = None;
    }

    /// Waits until `done` holds over the used rings, polling them (no interrupts needed).
    pub fn wait_until(&self, timeout: Duration, done: impl Fn(&TestFrontend) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if done(self) {
                return true;
            }
            std::hint::spin_loop();
        }
        done(self)
    }
}

fn connect_retrying(socket: &Path, queues: u64) -> Frontend {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match Frontend::connect(socket, queues) {
            Ok(f) => return f,
            Err(e) if Instant::now() > deadline => panic!("cannot connect to the server: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}
