//! The data path with mock guest memory and mock virtqueues: a chain goes in through the avail
//! ring, `handle_event` drains it, and the used ring and the status byte come out.

use super::*;
use std::sync::Arc;
use std::time::Instant;

use blk_proto::{VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_GET_ID};
use engine::Storage;
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringT};
use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE;
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Address, Bytes, GuestAddress, GuestAddressSpace};
use vmm_sys_util::epoll::EventSet;

const QSIZE: u16 = 16;

fn device(queues: u16) -> DeviceConfig {
    let mut d = DeviceConfig::new(1 << 20, 512, queues, QSIZE);
    d.serial = b"mock-serial".to_vec();
    d
}

fn backend(queues: u16, iothreads: usize) -> VhostUserBlk {
    VhostUserBlk::new(
        ServerConfig {
            iothreads,
            ..ServerConfig::new(device(queues), QSIZE)
        },
        Arc::new(Storage::null(1 << 20)),
    )
    .unwrap()
}

struct Harness {
    mem: GuestMem,
    vring: Vring,
    backend: VhostUserBlk,
}

fn harness(backend: VhostUserBlk, mq: &MockSplitQueue<Mem>, mem: GuestMem) -> Harness {
    let vring = Vring::new(mem.clone(), QSIZE).unwrap();
    vring
        .set_queue_info(mq.desc_table_addr().0, mq.avail_addr().0, mq.used_addr().0)
        .unwrap();
    vring.set_queue_size(QSIZE);
    vring.set_queue_ready(true);
    vring.set_enabled(true);
    backend.update_memory(mem.clone()).unwrap();
    Harness {
        mem,
        vring,
        backend,
    }
}

fn desc(addr: u64, len: u32, write: bool, next: Option<u16>) -> RawDescriptor {
    let mut flags = if write { VRING_DESC_F_WRITE as u16 } else { 0 };
    if next.is_some() {
        flags |= virtio_bindings::bindings::virtio_ring::VRING_DESC_F_NEXT as u16;
    }
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next.unwrap_or(0)))
}

fn header(mem: &Mem, at: u64, kind: u32, sector: u64) {
    mem.write_obj(kind, GuestAddress(at)).unwrap();
    mem.write_obj(0u32, GuestAddress(at + 4)).unwrap();
    mem.write_obj(sector, GuestAddress(at + 8)).unwrap();
}

/// One request the device writes into, published at head 0: its header at 0x8000, `data_len`
/// device-writable bytes at 0x9000, its status byte at 0xa000 (preset to 0xff).
fn one_device_writable_request(m: &Mem, mq: &MockSplitQueue<Mem>, kind: u32, data_len: u32) {
    header(m, 0x8000, kind, 0);
    m.write_obj(0xffu8, GuestAddress(0xa000)).unwrap();
    mq.add_desc_chains(
        &[
            desc(0x8000, 16, false, Some(1)),
            desc(0x9000, data_len, true, Some(2)),
            desc(0xa000, 1, true, None),
        ],
        0,
    )
    .unwrap();
}

fn used_entry(mem: &Mem, mq: &MockSplitQueue<Mem>, i: u64) -> (u32, u32) {
    let base = mq.used_addr().0 + 4 + 8 * i;
    (
        mem.read_obj(GuestAddress(base)).unwrap(),
        mem.read_obj(GuestAddress(base + 4)).unwrap(),
    )
}

#[test]
fn get_id_through_the_request_path_returns_the_serial() {
    let mem = GuestMemoryAtomic::new(Mem::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap());
    let m = mem.memory();
    let mq = MockSplitQueue::new(&*m, QSIZE);
    let h = harness(backend(1, 1), &mq, mem.clone());
    m.write_slice(&[0xee; 20], GuestAddress(0x9000)).unwrap();
    one_device_writable_request(&m, &mq, VIRTIO_BLK_T_GET_ID, 20);
    h.backend
        .handle_event(0, EventSet::IN, std::slice::from_ref(&h.vring), 0)
        .unwrap();
    let mut id = [0u8; 20];
    h.mem
        .memory()
        .read_slice(&mut id, GuestAddress(0x9000))
        .unwrap();
    assert_eq!(&id[..11], b"mock-serial");
    assert!(
        id[11..].iter().all(|&b| b == 0),
        "zero-padded when shorter than 20"
    );
    assert_eq!(
        m.read_obj::<u8>(GuestAddress(0xa000)).unwrap(),
        VIRTIO_BLK_S_OK
    );
    assert_eq!(
        m.read_obj::<u16>(mq.used_addr().unchecked_add(2)).unwrap(),
        1
    );
    assert_eq!(used_entry(&m, &mq, 0), (0, 21));
}

#[test]
fn bad_requests_get_a_status_and_malformed_chains_are_returned_empty() {
    let mem = GuestMemoryAtomic::new(Mem::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap());
    let m = mem.memory();
    let mq = MockSplitQueue::new(&*m, QSIZE);
    let h = harness(backend(1, 1), &mq, mem.clone());
    // 0: unknown type -> UNSUPP.  3: read past the end -> IOERR.  6: no writable status byte.
    header(&m, 0x8000, 0x77, 0);
    header(&m, 0x8100, blk_proto::VIRTIO_BLK_T_IN, (1 << 20) / 512);
    header(&m, 0x8200, blk_proto::VIRTIO_BLK_T_IN, 0);
    mq.add_desc_chains(
        &[
            desc(0x8000, 16, false, Some(1)),
            desc(0xa000, 1, true, None),
            desc(0, 0, false, None), // unused slot keeps the indices simple
            desc(0x8100, 16, false, Some(4)),
            desc(0x9000, 512, true, Some(5)),
            desc(0xa001, 1, true, None),
            desc(0x8200, 16, false, None),
        ],
        0,
    )
    .unwrap();
    // Three chains: heads 0, 3 and 6 (add_desc_chains put head 0 only; publish the others).
    let avail = mq.avail_addr().0;
    m.write_obj(3u16, GuestAddress(avail + 4 + 2)).unwrap();
    m.write_obj(6u16, GuestAddress(avail + 4 + 4)).unwrap();
    m.write_obj(3u16, GuestAddress(avail + 2)).unwrap();
    h.backend
        .handle_event(0, EventSet::IN, std::slice::from_ref(&h.vring), 0)
        .unwrap();
    assert_eq!(
        m.read_obj::<u8>(GuestAddress(0xa000)).unwrap(),
        VIRTIO_BLK_S_UNSUPP
    );
    assert_eq!(
        m.read_obj::<u8>(GuestAddress(0xa001)).unwrap(),
        VIRTIO_BLK_S_IOERR
    );
    assert_eq!(
        m.read_obj::<u16>(mq.used_addr().unchecked_add(2)).unwrap(),
        3
    );
    let used: Vec<_> = (0..3).map(|i| used_entry(&m, &mq, i)).collect();
    assert!(
        used.contains(&(6, 0)),
        "malformed chain returned with length 0: {used:?}"
    );
    let stats = h.backend.stats_json();
    assert_eq!(stats["queues"][0]["rejected"], 2);
    assert_eq!(stats["queues"][0]["malformed"], 1);
}

#[test]
fn queues_spread_evenly_and_contiguously_over_iothreads() {
    assert_eq!(queue_masks(1, 1), vec![0b1]);
    assert_eq!(queue_masks(4, 2), vec![0b0011, 0b1100]);
    assert_eq!(queue_masks(3, 2), vec![0b011, 0b100]);
    assert_eq!(queue_masks(2, 2), vec![0b01, 0b10]);
}

#[test]
fn features_and_protocol_features_offer_what_libblkio_needs() {
    let b = backend(2, 2);
    let f = b.features();
    assert_ne!(f & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(), 0);
    assert_ne!(
        f & (1 << virtio_bindings::virtio_config::VIRTIO_F_VERSION_1),
        0
    );
    let p = b.protocol_features();
    for need in [
        VhostUserProtocolFeatures::CONFIG,
        VhostUserProtocolFeatures::MQ,
        VhostUserProtocolFeatures::REPLY_ACK,
        VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS,
    ] {
        assert!(p.contains(need), "{need:?} missing");
    }
    assert_eq!(b.queues_per_thread(), vec![0b01, 0b10]);
}

#[test]
fn config_write_switches_the_write_cache() {
    let b = backend(1, 1);
    let wce = blk_proto::WCE_OFFSET as u32;
    assert_eq!(b.get_config(wce, 1), vec![1]);
    b.set_config(wce, &[0]).unwrap();
    assert_eq!(b.get_config(wce, 1), vec![0]);
    b.set_config(wce, &[1]).unwrap();
    assert_eq!(b.get_config(wce, 1), vec![1]);
}

fn backend_with_cache(writeback: bool) -> VhostUserBlk {
    VhostUserBlk::new(
        ServerConfig {
            writeback,
            ..ServerConfig::new(device(1), QSIZE)
        },
        Arc::new(Storage::null(1 << 20)),
    )
    .unwrap()
}

const FLUSH: u64 = 1 << virtio_bindings::virtio_blk::VIRTIO_BLK_F_FLUSH;
const CONFIG_WCE: u64 = 1 << virtio_bindings::virtio_blk::VIRTIO_BLK_F_CONFIG_WCE;

fn wce(b: &VhostUserBlk) -> u8 {
    b.get_config(blk_proto::WCE_OFFSET as u32, 1)[0]
}

#[test]
fn a_driver_without_flush_gets_writethrough_and_cannot_switch_the_cache_on() {
    let b = backend_with_cache(true);
    let f = b.features() & !FLUSH;
    b.acked_features(f);
    assert_eq!(wce(&b), 0, "config space must say writethrough");
    assert!(!b.write_cache_enabled(), "the engines must be writethrough");
    b.set_config(blk_proto::WCE_OFFSET as u32, &[1]).unwrap();
    assert_eq!(wce(&b), 0);
    assert!(!b.write_cache_enabled());
    // CONFIG_WCE without FLUSH is no better: it cannot flush.
    b.acked_features(CONFIG_WCE);
    assert!(!b.write_cache_enabled());
}

#[test]
fn a_driver_with_flush_only_gets_the_configured_mode_and_cannot_change_it() {
    for configured in [true, false] {
        let b = backend_with_cache(configured);
        b.acked_features(b.features() & !CONFIG_WCE);
        assert_eq!(b.write_cache_enabled(), configured);
        b.set_config(blk_proto::WCE_OFFSET as u32, &[u8::from(!configured)])
            .unwrap();
        assert_eq!(b.write_cache_enabled(), configured);
        assert_eq!(wce(&b), u8::from(configured));
    }
}

#[test]
fn a_driver_with_flush_and_config_wce_switches_the_cache_and_reset_restores_it() {
    let b = backend_with_cache(true);
    // The driver writes the mode before it finishes negotiating (QEMU's sequence): it stands.
    b.set_config(blk_proto::WCE_OFFSET as u32, &[0]).unwrap();
    b.acked_features(b.features());
    assert!(!b.write_cache_enabled());
    assert_eq!(wce(&b), 0);
    b.set_config(blk_proto::WCE_OFFSET as u32, &[1]).unwrap();
    assert!(b.write_cache_enabled());
    b.set_config(blk_proto::WCE_OFFSET as u32, &[0]).unwrap();
    // RESET_DEVICE: the next driver starts from the configured mode.
    b.reset_device();
    assert!(b.write_cache_enabled());
    assert_eq!(wce(&b), 1);
    // A configured writethrough device starts every driver writethrough.
    let b = backend_with_cache(false);
    b.acked_features(b.features());
    b.set_config(blk_proto::WCE_OFFSET as u32, &[1]).unwrap();
    assert!(b.write_cache_enabled());
    b.connection_closed();
    assert!(!b.write_cache_enabled());
}

#[test]
fn an_event_for_an_unknown_thread_does_not_end_the_worker() {
    // An Err would end the event loop and the connection: it is handled instead (logged,
    // the connection asked to end).
    let b = backend(1, 1);
    assert!(b.handle_event(0, EventSet::IN, &[], 7).is_ok());
}

#[test]
fn bad_thread_and_cpu_counts_are_refused() {
    let mk = |iothreads, cpus: Vec<usize>| {
        VhostUserBlk::new(
            ServerConfig {
                iothreads,
                cpus,
                ..ServerConfig::new(device(2), QSIZE)
            },
            Arc::new(Storage::null(1 << 20)),
        )
    };
    assert!(matches!(mk(3, vec![]), Err(ServerError::IoThreads { .. })));
    assert!(matches!(mk(0, vec![]), Err(ServerError::IoThreads { .. })));
    assert!(matches!(mk(2, vec![0]), Err(ServerError::CpuCount { .. })));
    assert!(mk(2, vec![0, 1]).is_ok());
}

#[test]
fn a_read_only_export_answers_writes_discards_and_write_zeroes_with_ioerr() {
    let mem = GuestMemoryAtomic::new(Mem::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap());
    let m = mem.memory();
    let mq = MockSplitQueue::new(&*m, QSIZE);
    let mut dev = device(1);
    dev.read_only = true;
    let b = VhostUserBlk::new(
        ServerConfig::new(dev, QSIZE),
        Arc::new(Storage::null(1 << 20)),
    )
    .unwrap();
    assert_ne!(
        b.features() & (1 << virtio_bindings::virtio_blk::VIRTIO_BLK_F_RO),
        0
    );
    let h = harness(b, &mq, mem.clone());
    // Head 0: OUT, head 3: DISCARD, head 6: WRITE_ZEROES (each header, payload, status).
    let kinds = [
        blk_proto::VIRTIO_BLK_T_OUT,
        blk_proto::VIRTIO_BLK_T_DISCARD,
        blk_proto::VIRTIO_BLK_T_WRITE_ZEROES,
    ];
    let mut descs = Vec::new();
    for (i, kind) in kinds.iter().enumerate() {
        let base = 0x8000 + 0x1000 * i as u64;
        header(&m, base, *kind, 0);
        let range = blk_proto::RawRange {
            sector: 0,
            num_sectors: 8,
            flags: 0,
        };
        m.write_slice(&range.to_le_bytes(), GuestAddress(base + 0x100))
            .unwrap();
        m.write_obj(0xffu8, GuestAddress(0xc000 + i as u64))
            .unwrap();
        let n = descs.len() as u16;
        let payload = if i == 0 { 512 } else { 16 };
        descs.push(desc(base, 16, false, Some(n + 1)));
        descs.push(desc(base + 0x100, payload, false, Some(n + 2)));
        descs.push(desc(0xc000 + i as u64, 1, true, None));
    }
    mq.add_desc_chains(&descs, 0).unwrap();
    let avail = mq.avail_addr().0;
    m.write_obj(3u16, GuestAddress(avail + 4 + 2)).unwrap();
    m.write_obj(6u16, GuestAddress(avail + 4 + 4)).unwrap();
    m.write_obj(3u16, GuestAddress(avail + 2)).unwrap();
    h.backend
        .handle_event(0, EventSet::IN, std::slice::from_ref(&h.vring), 0)
        .unwrap();
    for i in 0..3u64 {
        assert_eq!(
            m.read_obj::<u8>(GuestAddress(0xc000 + i)).unwrap(),
            VIRTIO_BLK_S_IOERR,
            "request type {} on a read-only export",
            kinds[i as usize]
        );
    }
    assert_eq!(
        m.read_obj::<u16>(mq.used_addr().unchecked_add(2)).unwrap(),
        3
    );
}

/// A backend that polls for `window` after each batch (its adaptive window already grown to
/// the full length) and naps for at most `nap`.
fn polling_harness(
    window: Duration,
    nap: Duration,
    mq: &MockSplitQueue<Mem>,
    mem: GuestMem,
) -> Harness {
    let backend = VhostUserBlk::new(
        ServerConfig {
            poll: window,
            poll_nap: nap,
            ..ServerConfig::new(device(1), QSIZE)
        },
        Arc::new(Storage::null(1 << 20)),
    )
    .unwrap();
    let h = harness(backend, mq, mem);
    h.backend.control(0).poll_window = window;
    h
}

/// GET_ID chains at heads 0, 3, 6, ...: header at 0x8000 + 0x100 * i, the ID at
/// 0x9000 + 0x100 * i, the status byte at 0xa000 + i (preset to 0xff). None published yet.
fn get_id_chains(m: &Mem, mq: &MockSplitQueue<Mem>, n: u16) {
    let mut descs = Vec::new();
    for i in 0..n {
        let (i64_, head) = (u64::from(i), 3 * i);
        header(m, 0x8000 + 0x100 * i64_, VIRTIO_BLK_T_GET_ID, 0);
        m.write_obj(0xffu8, GuestAddress(0xa000 + i64_)).unwrap();
        descs.push(desc(0x8000 + 0x100 * i64_, 16, false, Some(head + 1)));
        descs.push(desc(0x9000 + 0x100 * i64_, 20, true, Some(head + 2)));
        descs.push(desc(0xa000 + i64_, 1, true, None));
    }
    mq.add_desc_chains(&descs, 0).unwrap();
    // add_desc_chains published head 0; the tests publish what they need themselves.
    m.write_obj(0u16, GuestAddress(mq.avail_addr().0 + 2))
        .unwrap();
}

/// Publishes chain `i` (head 3 * i) in avail slot `i` of the avail ring at `avail`, then the
/// avail index `i + 1`.
fn publish(m: &Mem, avail: u64, i: u16) {
    m.write_obj(3 * i, GuestAddress(avail + 4 + 2 * u64::from(i)))
        .unwrap();
    std::sync::atomic::fence(std::sync::atomic::Ordering::Release);
    m.write_obj(i + 1, GuestAddress(avail + 2)).unwrap();
}

/// The used index of the used ring at `used`.
fn used_idx(m: &Mem, used: u64) -> u16 {
    m.read_obj::<u16>(GuestAddress(used + 2)).unwrap()
}

#[test]
fn a_napping_poll_serves_a_chain_published_during_a_nap() {
    let mem = GuestMemoryAtomic::new(Mem::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap());
    let m = mem.memory();
    let mq = MockSplitQueue::new(&*m, QSIZE);
    // Naps up to 1 ms: well above what a loaded CI machine takes to wake a thread, so the
    // bound does not turn napping off here.
    let window = Duration::from_millis(400);
    let h = polling_harness(window, Duration::from_millis(1), &mq, mem.clone());
    get_id_chains(&m, &mq, 3);
    let (avail, used) = (mq.avail_addr().0, mq.used_addr().0);
    // Two chains at once: a deep drain, so the poll that follows naps.
    publish(&m, avail, 0);
    publish(&m, avail, 1);
    let served_after = std::thread::scope(|s| {
        let guest = s.spawn(|| {
            let m = mem.memory();
            // The iothread is polling (napping) by now; notifications are off, so nothing
            // but the poll can find this chain before the window ends.
            std::thread::sleep(Duration::from_millis(50));
            publish(&m, avail, 2);
            let published = Instant::now();
            while used_idx(&m, used) < 3 && published.elapsed() < Duration::from_secs(5) {
                std::thread::yield_now();
            }
            published.elapsed()
        });
        h.backend
            .handle_event(0, EventSet::IN, std::slice::from_ref(&h.vring), 0)
            .unwrap();
        guest.join().unwrap()
    });
    assert_eq!(used_idx(&m, used), 3, "all three chains served");
    for i in 0..3 {
        assert_eq!(
            m.read_obj::<u8>(GuestAddress(0xa000 + i)).unwrap(),
            VIRTIO_BLK_S_OK
        );
    }
    // Served by the poll itself, long before its window ran out (and the final look after
    // the window could have caught it).
    assert!(
        served_after < window / 2,
        "the chain published during the poll waited {served_after:?}"
    );
    let t = h.backend.control(0);
    assert!(t.nap.naps > 0, "the poll never napped");
}

/// Storage whose every op completes `delay` after it starts, from a thread of its own (a
/// disk slower than the poll window).
#[derive(Debug)]
struct SlowStorage {
    delay: Duration,
}

impl engine::storage::ExternalStorage for SlowStorage {
    fn start(
        &self,
        op: &engine::storage::IoOp<'_>,
        done: &Arc<engine::storage::CompletionQueue>,
    ) -> Result<(), i32> {
        let (key, len, delay, done) = (op.key, op.len as i32, self.delay, done.clone());
        std::thread::spawn(move || {
            std::thread::sleep(delay);
            done.complete(key, len);
        });
        Ok(())
    }
}

/// One 512-byte read through a 1 ms poll window on storage that takes 50 ms, with polling
/// kept on for `in_flight` while the read is out. Returns the used index once the event
/// handler (drain, then poll) has returned.
fn used_after_a_slow_read(in_flight: Duration) -> u16 {
    let mem = GuestMemoryAtomic::new(Mem::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap());
    let m = mem.memory();
    let mq = MockSplitQueue::new(&*m, QSIZE);
    let storage = SlowStorage {
        delay: Duration::from_millis(50),
    };
    let backend = VhostUserBlk::new(
        ServerConfig {
            poll: Duration::from_millis(1),
            poll_in_flight: in_flight,
            ..ServerConfig::new(device(1), QSIZE)
        },
        Arc::new(Storage::external(Arc::new(storage), 1 << 20)),
    )
    .unwrap();
    let h = harness(backend, &mq, mem.clone());
    one_device_writable_request(&m, &mq, blk_proto::VIRTIO_BLK_T_IN, 512);
    h.backend
        .handle_event(0, EventSet::IN, std::slice::from_ref(&h.vring), 0)
        .unwrap();
    used_idx(&m, mq.used_addr().0)
}

#[test]
fn polling_outlasts_the_window_while_a_request_is_in_flight() {
    // The 1 ms window ends long before the 50 ms read: without in-flight polling the thread
    // leaves the poll (to sleep until the completion's wake-up) with the read still out.
    assert_eq!(used_after_a_slow_read(Duration::ZERO), 0);
    // With it, the poll itself catches the completion and answers the guest.
    assert_eq!(used_after_a_slow_read(Duration::from_secs(2)), 1);
}

#[test]
fn a_qd1_poll_does_not_nap() {
    let mem = GuestMemoryAtomic::new(Mem::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap());
    let m = mem.memory();
    let mq = MockSplitQueue::new(&*m, QSIZE);
    let window = Duration::from_millis(20);
    let h = polling_harness(window, Duration::from_millis(1), &mq, mem.clone());
    get_id_chains(&m, &mq, 3);
    let (avail, used) = (mq.avail_addr().0, mq.used_addr().0);
    // One chain at a time, the next only after the last was served: a QD1 guest.
    for i in 0..3 {
        publish(&m, avail, i);
        h.backend
            .handle_event(0, EventSet::IN, std::slice::from_ref(&h.vring), 0)
            .unwrap();
        assert_eq!(used_idx(&m, used), i + 1);
    }
    let t = h.backend.control(0);
    assert_eq!(t.nap.naps, 0, "a QD1 load napped");
}
