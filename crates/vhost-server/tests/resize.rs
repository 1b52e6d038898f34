//! Growing a live disk, as a frontend sees it over a real socket: `serve` driven by the vhost
//! crate's own frontend, which negotiates BACKEND_REQ and REPLY_ACK, hands over a
//! backend-request channel and serves it (as QEMU does). A resize arrives there as
//! VHOST_USER_BACKEND_CONFIG_CHANGE_MSG, which the frontend acknowledges; GET_CONFIG then
//! reports the new capacity; real requests through a real vring (memfd guest memory, kick and
//! call eventfds) are checked against the old and the new end; shrinking is refused and
//! changes nothing; a frontend without the channel, or one that never answers, gets no
//! message and costs the caller a bounded wait at most. With two iothreads, each takes the new
//! size at its next batch.

mod support;

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use blk_proto::{VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
use support::{header_bytes, make_image, open_image, QueueLayout, SECTOR};
use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserHeaderFlag};
use vhost::vhost_user::{
    Frontend, FrontendReqHandler, VhostUserFrontend, VhostUserFrontendReqHandlerMut,
    VhostUserProtocolFeatures,
};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vhost_server::{GuestNotice, NotNotified, ResizeError, ServerConfig, VhostUserBlk};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const MIB: u64 = 1 << 20;
const OLD_SIZE: u64 = MIB;
const NEW_SIZE: u64 = 3 * MIB;
const QSIZE: u16 = 64;
const GUEST_SIZE: usize = 4 << 20;
const RING: QueueLayout = QueueLayout {
    size: QSIZE,
    desc: 0,
    avail: 0x800,
    used: 0x1000,
};
const HEADER: u64 = 0x1_0000;
const DATA: u64 = 0x2_0000;
const BLOCK: u32 = 4096;

/// A server on a fresh socket over a file image of OLD_SIZE bytes.
fn server(timeout: Duration) -> (VhostUserBlk, PathBuf, PathBuf, tempfile::TempDir) {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("temp dir");
    let socket = dir.path().join("blk.sock");
    let image = dir.path().join("disk.img");
    make_image(&image, OLD_SIZE);
    let storage = open_image(&image, false).expect("image");
    let backend = VhostUserBlk::new(
        ServerConfig {
            fixed_buffers: false,
            config_change_timeout: timeout,
            ..ServerConfig::new(support::device_config(OLD_SIZE, 1, QSIZE), QSIZE)
        },
        storage,
    )
    .expect("backend");
    let (tx, rx) = std::sync::mpsc::channel();
    let (b, s) = (backend.clone(), socket.clone());
    std::thread::spawn(move || {
        let stop = Arc::new(AtomicBool::new(false));
        let _ = vhost_server::serve(&b, &s, &stop, || {
            let _ = tx.send(());
        });
    });
    rx.recv_timeout(Duration::from_secs(10))
        .expect("the server listens");
    (backend, socket, image, dir)
}

/// What the frontend's side of the backend-request channel saw.
#[derive(Default)]
struct ConfigChanges {
    received: Arc<AtomicU32>,
}

impl VhostUserFrontendReqHandlerMut for ConfigChanges {
    fn handle_config_change(&mut self) -> std::io::Result<u64> {
        self.received.fetch_add(1, Ordering::SeqCst);
        Ok(0)
    }
}

/// Which backend-request channel the frontend sets up.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Channel {
    /// BACKEND_REQ not negotiated: no channel.
    None,
    /// A channel whose requests are served (and acknowledged, with REPLY_ACK).
    Served,
    /// A channel nobody reads: the frontend never answers.
    Ignored,
}

struct TestFrontend {
    f: Frontend,
    /// Config change messages received on the channel (Channel::Served).
    config_changes: Arc<AtomicU32>,
    /// Kept open: the other end of an ignored channel.
    _ignored: Option<FrontendReqHandler<Mutex<ConfigChanges>>>,
}

/// A frontend that claimed the device with REPLY_ACK on every request, and `channel`.
fn frontend(socket: &Path, channel: Channel) -> TestFrontend {
    let mut f = Frontend::connect(socket, 1).expect("connect");
    f.set_owner().expect("SET_OWNER");
    let offered = f.get_features().expect("GET_FEATURES");
    let protocol = f.get_protocol_features().expect("GET_PROTOCOL_FEATURES");
    assert!(
        protocol.contains(VhostUserProtocolFeatures::BACKEND_REQ),
        "BACKEND_REQ must be offered"
    );
    let mut wanted = VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK;
    if channel != Channel::None {
        wanted |= VhostUserProtocolFeatures::BACKEND_REQ;
    }
    f.set_protocol_features(protocol & wanted)
        .expect("SET_PROTOCOL_FEATURES");
    f.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    f.set_features(offered).expect("SET_FEATURES");
    let config_changes = Arc::new(AtomicU32::new(0));
    let mut ignored = None;
    if channel != Channel::None {
        let changes = ConfigChanges {
            received: config_changes.clone(),
        };
        let mut handler = FrontendReqHandler::new(Arc::new(Mutex::new(changes))).expect("channel");
        handler.set_reply_ack_flag(true);
        f.set_backend_request_fd(&handler.get_tx_raw_fd())
            .expect("SET_BACKEND_REQ_FD");
        if channel == Channel::Served {
            // As QEMU does: each request handled and acknowledged as it comes, until the
            // channel closes.
            std::thread::spawn(move || while handler.handle_request().is_ok() {});
        } else {
            ignored = Some(handler);
        }
    }
    TestFrontend {
        f,
        config_changes,
        _ignored: ignored,
    }
}

fn config_capacity(f: &mut Frontend) -> u64 {
    let (_, payload) = f
        .get_config(0, 8, VhostUserConfigFlags::WRITABLE, &[0; 8])
        .expect("GET_CONFIG");
    let sectors = u64::from_le_bytes(payload[..8].try_into().expect("8 bytes"));
    sectors * SECTOR
}

/// Guest memory in a memfd (shared with the server through SET_MEM_TABLE) and one vring on it,
/// kicked and signalled through eventfds: what a VMM sets up.
struct SocketGuest {
    mem: GuestMemoryMmap<()>,
    _memfd: File,
    kick: EventFd,
    _call: EventFd,
    next_head: u16,
}

impl SocketGuest {
    fn attach(f: &mut Frontend) -> SocketGuest {
        // SAFETY: a plain syscall with a NUL-terminated name; the fd is owned right below.
        let fd = unsafe { libc::memfd_create(c"guest".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
        // SAFETY: `fd` is a fresh descriptor nothing else owns.
        let memfd = unsafe { File::from_raw_fd(fd) };
        memfd.set_len(GUEST_SIZE as u64).expect("size the memfd");
        let region = MmapRegion::<()>::from_file(
            FileOffset::new(memfd.try_clone().expect("dup"), 0),
            GUEST_SIZE,
        )
        .expect("map the memfd");
        // The frontend's addresses for the ring are its own virtual addresses.
        let host = region.as_ptr() as u64;
        let mem =
            GuestMemoryMmap::from_regions(vec![
                GuestRegionMmap::new(region, GuestAddress(0)).expect("region")
            ])
            .expect("guest memory");
        f.set_mem_table(&[VhostUserMemoryRegionInfo {
            guest_phys_addr: 0,
            memory_size: GUEST_SIZE as u64,
            userspace_addr: host,
            mmap_offset: 0,
            mmap_handle: memfd.as_raw_fd(),
        }])
        .expect("SET_MEM_TABLE");
        f.set_vring_num(0, QSIZE).expect("SET_VRING_NUM");
        f.set_vring_addr(
            0,
            &VringConfigData {
                queue_max_size: QSIZE,
                queue_size: QSIZE,
                flags: 0,
                desc_table_addr: host + RING.desc,
                used_ring_addr: host + RING.used,
                avail_ring_addr: host + RING.avail,
                log_addr: None,
            },
        )
        .expect("SET_VRING_ADDR");
        f.set_vring_base(0, 0).expect("SET_VRING_BASE");
        let call = EventFd::new(EFD_NONBLOCK).expect("call eventfd");
        let kick = EventFd::new(EFD_NONBLOCK).expect("kick eventfd");
        f.set_vring_call(0, &call).expect("SET_VRING_CALL");
        f.set_vring_kick(0, &kick).expect("SET_VRING_KICK");
        f.set_vring_enable(0, true).expect("SET_VRING_ENABLE");
        SocketGuest {
            mem,
            _memfd: memfd,
            kick,
            _call: call,
            next_head: 0,
        }
    }

    /// One read or write of BLOCK bytes at `offset` through the vring; the status byte.
    fn request(&mut self, request_type: u32, offset: u64) -> u8 {
        let m = &self.mem;
        m.write_slice(
            &header_bytes(request_type, offset / SECTOR),
            GuestAddress(HEADER),
        )
        .expect("header");
        m.write_obj(0xffu8, GuestAddress(HEADER + 16))
            .expect("status");
        let head = self.next_head;
        self.next_head = (head + 3) % (QSIZE - 2);
        RING.chain(
            m,
            head,
            &[
                (HEADER, 16, false),
                (DATA, BLOCK, request_type == VIRTIO_BLK_T_IN),
                (HEADER + 16, 1, true),
            ],
        );
        let used_before = RING.used_idx(m);
        RING.publish(m, &[head]);
        self.kick.write(1).expect("kick");
        let deadline = Instant::now() + Duration::from_secs(10);
        while RING.used_idx(m) == used_before {
            assert!(Instant::now() < deadline, "request not answered in 10 s");
            std::thread::sleep(Duration::from_millis(1));
        }
        m.read_obj(GuestAddress(HEADER + 16)).expect("status")
    }

    fn write(&mut self, offset: u64, fill: u8) -> u8 {
        self.mem
            .write_slice(&vec![fill; BLOCK as usize], GuestAddress(DATA))
            .expect("data");
        self.request(VIRTIO_BLK_T_OUT, offset)
    }

    fn read(&mut self, offset: u64) -> (u8, Vec<u8>) {
        self.mem
            .write_slice(&vec![0u8; BLOCK as usize], GuestAddress(DATA))
            .expect("clear data");
        let status = self.request(VIRTIO_BLK_T_IN, offset);
        let mut data = vec![0u8; BLOCK as usize];
        self.mem
            .read_slice(&mut data, GuestAddress(DATA))
            .expect("data");
        (status, data)
    }
}

fn image_bytes(image: &Path, offset: u64, len: usize) -> Vec<u8> {
    let data = std::fs::read(image).expect("read the image");
    data[offset as usize..offset as usize + len].to_vec()
}

#[test]
fn a_resize_reaches_the_frontend_and_the_new_end_is_served() {
    let (backend, socket, image, _dir) = server(Duration::from_secs(10));
    let mut fe = frontend(&socket, Channel::Served);
    let mut guest = SocketGuest::attach(&mut fe.f);
    assert_eq!(config_capacity(&mut fe.f), OLD_SIZE);

    // Before: the old end is the end.
    let past_old_end = OLD_SIZE + MIB;
    assert_eq!(
        guest.write(OLD_SIZE - u64::from(BLOCK), 0x31),
        VIRTIO_BLK_S_OK
    );
    assert_eq!(guest.write(past_old_end, 0x42), VIRTIO_BLK_S_IOERR);

    let resized = backend.resize(Some(NEW_SIZE)).expect("resize");
    assert_eq!(resized.from_bytes, OLD_SIZE);
    assert_eq!(resized.to_bytes, NEW_SIZE);
    assert_eq!(resized.guest, GuestNotice::Notified);
    // With REPLY_ACK the resize returned after the frontend acknowledged: the message is in.
    assert_eq!(fe.config_changes.load(Ordering::SeqCst), 1);
    assert_eq!(config_capacity(&mut fe.f), NEW_SIZE);
    assert_eq!(backend.capacity_bytes(), NEW_SIZE);
    assert_eq!(std::fs::metadata(&image).unwrap().len(), NEW_SIZE);

    // Past the old end, inside the new one: written to the image and read back.
    assert_eq!(guest.write(past_old_end, 0x42), VIRTIO_BLK_S_OK);
    let (status, data) = guest.read(past_old_end);
    assert_eq!(status, VIRTIO_BLK_S_OK);
    assert!(
        data.iter().all(|&b| b == 0x42),
        "read back what was written"
    );
    assert!(image_bytes(&image, past_old_end, BLOCK as usize)
        .iter()
        .all(|&b| b == 0x42));
    let last = NEW_SIZE - u64::from(BLOCK);
    assert_eq!(guest.write(last, 0x53), VIRTIO_BLK_S_OK, "the last block");
    // Past the new end: refused.
    assert_eq!(guest.write(NEW_SIZE, 0x64), VIRTIO_BLK_S_IOERR);
    assert_eq!(
        guest.read(NEW_SIZE - 512).0,
        VIRTIO_BLK_S_IOERR,
        "straddles the end"
    );

    // Shrinking: refused, no message, nothing changed.
    let e = backend.resize(Some(OLD_SIZE)).expect_err("shrink refused");
    assert!(matches!(e, ResizeError::Shrink { .. }), "{e}");
    assert_eq!(config_capacity(&mut fe.f), NEW_SIZE);
    assert_eq!(std::fs::metadata(&image).unwrap().len(), NEW_SIZE);
    assert_eq!(guest.read(past_old_end).0, VIRTIO_BLK_S_OK);
    // The same size again: nothing to tell.
    let same = backend.resize(Some(NEW_SIZE)).expect("same size");
    assert_eq!(same.guest, GuestNotice::Unchanged);
    assert_eq!(fe.config_changes.load(Ordering::SeqCst), 1);
}

#[test]
fn without_a_channel_the_new_size_is_in_force_and_the_guest_is_not_notified() {
    let (backend, socket, _image, _dir) = server(Duration::from_secs(10));
    let r = backend.resize(Some(2 * MIB)).expect("resize, no frontend");
    assert_eq!(r.guest, GuestNotice::NotNotified(NotNotified::NoFrontend));

    let mut fe = frontend(&socket, Channel::None);
    let r = backend.resize(Some(NEW_SIZE)).expect("resize");
    assert_eq!(r.guest, GuestNotice::NotNotified(NotNotified::NoChannel));
    assert_eq!(config_capacity(&mut fe.f), NEW_SIZE);
    let mut guest = SocketGuest::attach(&mut fe.f);
    assert_eq!(guest.write(2 * MIB, 0x77), VIRTIO_BLK_S_OK);
}

#[test]
fn a_frontend_that_never_answers_costs_a_bounded_wait() {
    let timeout = Duration::from_millis(300);
    let (backend, socket, _image, _dir) = server(timeout);
    let mut fe = frontend(&socket, Channel::Ignored);
    let started = Instant::now();
    let r = backend.resize(Some(2 * MIB)).expect("resize");
    assert_eq!(
        r.guest,
        GuestNotice::NotNotified(NotNotified::NoAnswer(timeout))
    );
    assert!(started.elapsed() < timeout + Duration::from_secs(2));
    // While that message waits, the next change is not sent, and does not wait.
    let started = Instant::now();
    let r = backend.resize(Some(NEW_SIZE)).expect("resize");
    assert_eq!(r.guest, GuestNotice::NotNotified(NotNotified::StillWaiting));
    assert!(started.elapsed() < timeout);
    // The protocol thread was never held up, and the size is in force.
    assert_eq!(config_capacity(&mut fe.f), NEW_SIZE);
}

/// Two queues on two iothreads (driven in place, as tests/hostile.rs does): after a resize,
/// each iothread serves the new space from its next batch on, with no message of its own.
#[test]
fn every_iothread_takes_the_new_size_at_its_next_batch() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("temp dir");
    let image = dir.path().join("disk.img");
    make_image(&image, OLD_SIZE);
    let storage = open_image(&image, false).expect("image");
    let guest = support::Guest::new(&[(0, GUEST_SIZE)]);
    let layouts = [0u64, 0x4000].map(|base| QueueLayout {
        size: QSIZE,
        desc: base,
        avail: base + 0x800,
        used: base + 0x1000,
    });
    let dev = support::Device::new(&guest, storage, 2, &layouts, false, Duration::ZERO);
    let write_past_old_end = |round: u16| -> Vec<u8> {
        let m = guest.mem.memory();
        for (q, l) in layouts.iter().enumerate() {
            let header = HEADER + 0x100 * q as u64;
            let data = DATA + 0x1_0000 * q as u64;
            let offset = OLD_SIZE + MIB * q as u64;
            m.write_slice(
                &header_bytes(VIRTIO_BLK_T_OUT, offset / SECTOR),
                GuestAddress(header),
            )
            .expect("header");
            m.write_obj(0xffu8, GuestAddress(header + 16))
                .expect("status");
            m.write_slice(&[0x60 + q as u8; BLOCK as usize], GuestAddress(data))
                .expect("data");
            let head = 3 * round;
            l.chain(
                &m,
                head,
                &[
                    (header, 16, false),
                    (data, BLOCK, false),
                    (header + 16, 1, true),
                ],
            );
            l.publish(&m, &[head]);
        }
        let expected = dev.answered() + layouts.len() as u64;
        if let Err(e) = dev.run(&[0, 1], expected, Duration::from_secs(10)) {
            guest.keep_mapped();
            panic!("{e}");
        }
        (0..layouts.len())
            .map(|q| {
                m.read_obj(GuestAddress(HEADER + 0x100 * q as u64 + 16))
                    .expect("status")
            })
            .collect()
    };
    use vm_memory::GuestAddressSpace;
    assert_eq!(write_past_old_end(0), [VIRTIO_BLK_S_IOERR; 2]);
    let r = dev.backend.resize(Some(NEW_SIZE)).expect("resize");
    assert_eq!(r.guest, GuestNotice::NotNotified(NotNotified::NoFrontend));
    assert_eq!(write_past_old_end(1), [VIRTIO_BLK_S_OK; 2]);
    for q in 0..2u64 {
        let block = image_bytes(&image, OLD_SIZE + MIB * q, BLOCK as usize);
        assert!(
            block.iter().all(|&b| b == 0x60 + q as u8),
            "queue {q}'s block"
        );
    }
}
