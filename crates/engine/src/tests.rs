//! Engine tests: real io_uring against temporary files, requests built by hand with iovecs
//! pointing at test-owned buffers (standing in for guest memory).

use super::*;
use crate::iovec::advance_iovecs;
use crate::storage::{Fault, FaultRule, FaultStorage, IoKind};
use blk_proto::{
    Range, Request, RequestKind, VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK,
};
use std::io::{Read, Seek, SeekFrom, Write};
use std::sync::atomic::AtomicBool;

const MIB: u64 = 1 << 20;

struct Fixture {
    engine: Engine,
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
}

fn config(writeback: bool) -> EngineConfig {
    let mut serial = [0u8; VIRTIO_BLK_ID_BYTES];
    serial[..4].copy_from_slice(b"test");
    EngineConfig {
        max_requests: 64,
        max_iovecs_per_request: 64,
        max_ranges_per_request: 4,
        merge: MergeLimits::default(),
        serial,
        num_queues: 2,
        writeback: Arc::new(AtomicBool::new(writeback)),
        submit_batch: 0,
        ring_setup: RingSetup::Auto,
        ring_entries: 0,
        cpu: None,
        iowq_max_workers: 0,
        fixed_buffers: true,
        bounce_budget: DEFAULT_BOUNCE_BUDGET,
        block_discard: BlockDiscard::Auto,
    }
}

fn fixture(direct: bool) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.img");
    let backend = Storage::open(
        &path,
        &ImageOptions {
            read_only: false,
            direct,
            create_size: Some(4 * MIB),
        },
    )
    .unwrap();
    let engine = Engine::new(Arc::new(backend), config(true)).unwrap();
    Fixture {
        engine,
        _dir: dir,
        path,
    }
}

/// A 4 KiB-aligned buffer, as guest pages are.
struct Buf {
    mem: Vec<u8>,
    off: usize,
    len: usize,
}

impl Buf {
    fn new(len: usize) -> Buf {
        Self::at_offset(len, 0)
    }

    /// A buffer `off` bytes past a 4 KiB boundary (to provoke the O_DIRECT bounce path).
    fn at_offset(len: usize, off: usize) -> Buf {
        let mem = vec![0u8; len + off + 8192];
        let base = mem.as_ptr() as usize;
        let align = (4096 - base % 4096) % 4096;
        Buf {
            mem,
            off: align + off,
            len,
        }
    }

    fn slice(&mut self) -> &mut [u8] {
        &mut self.mem[self.off..self.off + self.len]
    }

    fn iovec(&mut self) -> libc::iovec {
        libc::iovec {
            iov_base: self.slice().as_mut_ptr().cast(),
            iov_len: self.len,
        }
    }
}

fn request(
    e: &mut Engine,
    kind: RequestKind,
    sector: u64,
    bufs: &mut [&mut Buf],
    status: &mut u8,
) -> Request {
    let mut r = e.take_request().unwrap();
    r.kind = kind;
    r.sector = sector;
    for b in bufs.iter_mut() {
        r.iovecs.push(b.iovec());
        r.data_len += b.len as u32;
    }
    r.status = status as *mut u8;
    r.used_len = 1;
    *status = 0xff;
    r
}

fn run_to_completion(e: &mut Engine, expect: usize) -> Vec<Completion> {
    e.submit().unwrap();
    let mut out = Vec::new();
    let deadline = Instant::now() + std::time::Duration::from_secs(10);
    while out.len() < expect {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for completions"
        );
        if e.in_flight() > 0 {
            e.ring.wait_one(Duration::from_millis(100)).unwrap();
        }
        e.reap().unwrap();
        out.extend(e.take_completions());
    }
    out
}

fn file_bytes(path: &std::path::Path, offset: u64, len: usize) -> Vec<u8> {
    let mut f = std::fs::File::open(path).unwrap();
    f.seek(SeekFrom::Start(offset)).unwrap();
    let mut v = vec![0; len];
    f.read_exact(&mut v).unwrap();
    v
}

#[test]
fn write_then_read_back_through_the_ring() {
    for direct in [false, true] {
        let mut fx = fixture(direct);
        let mut data = Buf::new(8192);
        for (i, b) in data.slice().iter_mut().enumerate() {
            *b = (i % 251) as u8;
        }
        let mut st = 0u8;
        let r = request(
            &mut fx.engine,
            RequestKind::Write,
            16,
            &mut [&mut data],
            &mut st,
        );
        fx.engine.enqueue(r, 0, 7);
        let c = run_to_completion(&mut fx.engine, 1);
        assert_eq!(
            c,
            vec![Completion {
                queue: 0,
                head: 7,
                used_len: 1
            }]
        );
        assert_eq!(st, VIRTIO_BLK_S_OK);
        assert_eq!(file_bytes(&fx.path, 16 * 512, 8192), data.slice().to_vec());

        let mut back = Buf::new(8192);
        let r = request(
            &mut fx.engine,
            RequestKind::Read,
            16,
            &mut [&mut back],
            &mut st,
        );
        fx.engine.enqueue(r, 1, 3);
        run_to_completion(&mut fx.engine, 1);
        assert_eq!(st, VIRTIO_BLK_S_OK);
        assert_eq!(back.slice(), data.slice());
        assert_eq!(
            fx.engine.stats()[1].by_kind[StatKind::Read as usize].bytes,
            8192
        );
    }
}

#[test]
fn adjacent_writes_merge_into_one_op_and_all_complete() {
    let mut fx = fixture(true);
    let mut bufs: Vec<Buf> = (0..4).map(|_| Buf::new(4096)).collect();
    let mut sts = [0u8; 4];
    // Submit out of order: 3, 1, 0, 2 (sectors 24, 8, 0, 16).
    for (n, &i) in [3usize, 1, 0, 2].iter().enumerate() {
        bufs[i].slice().fill(i as u8 + 1);
        let (b, s) = (&mut bufs[i], &mut sts[i]);
        let r = request(
            &mut fx.engine,
            RequestKind::Write,
            i as u64 * 8,
            &mut [b],
            s,
        );
        fx.engine.enqueue(r, 0, n as u16);
    }
    let c = run_to_completion(&mut fx.engine, 4);
    assert_eq!(c.len(), 4);
    assert!(sts.iter().all(|&s| s == VIRTIO_BLK_S_OK));
    assert_eq!(
        fx.engine.stats()[0].merged,
        3,
        "four contiguous writes make one op"
    );
    let on_disk = file_bytes(&fx.path, 0, 16384);
    for i in 0..4 {
        assert!(on_disk[i * 4096..(i + 1) * 4096]
            .iter()
            .all(|&b| b == i as u8 + 1));
    }
}

#[test]
fn misaligned_guest_buffers_use_the_bounce_buffer_under_o_direct() {
    let mut fx = fixture(true);
    // Two segments at odd addresses with odd lengths; the total is one 4 KiB block.
    let mut a = Buf::at_offset(1000, 3);
    let mut b = Buf::at_offset(3096, 5);
    a.slice().fill(0xaa);
    b.slice().fill(0xbb);
    let mut st = 0;
    let r = request(
        &mut fx.engine,
        RequestKind::Write,
        8,
        &mut [&mut a, &mut b],
        &mut st,
    );
    fx.engine.enqueue(r, 0, 0);
    run_to_completion(&mut fx.engine, 1);
    assert_eq!(st, VIRTIO_BLK_S_OK);
    let disk = file_bytes(&fx.path, 4096, 4096);
    assert!(disk[..1000].iter().all(|&x| x == 0xaa));
    assert!(disk[1000..].iter().all(|&x| x == 0xbb));

    let mut c = Buf::at_offset(4096, 1);
    let r = request(&mut fx.engine, RequestKind::Read, 8, &mut [&mut c], &mut st);
    fx.engine.enqueue(r, 0, 1);
    run_to_completion(&mut fx.engine, 1);
    assert_eq!(st, VIRTIO_BLK_S_OK);
    assert_eq!(c.slice().to_vec(), disk);
}

#[test]
fn flush_completes_after_the_writes_before_it() {
    let mut fx = fixture(false);
    let mut data = Buf::new(4096);
    data.slice().fill(9);
    let (mut s1, mut s2) = (0, 0);
    let w = request(
        &mut fx.engine,
        RequestKind::Write,
        0,
        &mut [&mut data],
        &mut s1,
    );
    fx.engine.enqueue(w, 0, 1);
    let f = request(&mut fx.engine, RequestKind::Flush, 0, &mut [], &mut s2);
    fx.engine.enqueue(f, 0, 2);
    let c = run_to_completion(&mut fx.engine, 2);
    assert_eq!(c.iter().map(|c| c.head).collect::<Vec<_>>(), vec![1, 2]);
    assert_eq!((s1, s2), (VIRTIO_BLK_S_OK, VIRTIO_BLK_S_OK));
}

#[test]
fn discard_and_write_zeroes_read_back_as_zeros() {
    for (kind, unmap) in [
        (RequestKind::Discard, false),
        (RequestKind::WriteZeroes, false),
        (RequestKind::WriteZeroes, true),
    ] {
        let mut fx = fixture(false);
        std::fs::OpenOptions::new()
            .write(true)
            .open(&fx.path)
            .unwrap()
            .write_all(&vec![0x5a; 64 * 1024])
            .unwrap();
        let mut st = 0;
        let mut r = request(&mut fx.engine, kind, 0, &mut [], &mut st);
        r.ranges.push(Range {
            sector: 16,
            num_sectors: 32,
            unmap,
        });
        fx.engine.enqueue(r, 0, 0);
        run_to_completion(&mut fx.engine, 1);
        assert_eq!(st, VIRTIO_BLK_S_OK, "{kind:?} unmap={unmap}");
        let disk = file_bytes(&fx.path, 0, 64 * 1024);
        assert!(
            disk[..8192].iter().all(|&b| b == 0x5a),
            "before the range intact"
        );
        assert!(
            disk[8192..8192 + 16384].iter().all(|&b| b == 0),
            "{kind:?} zeroed"
        );
        assert!(
            disk[8192 + 16384..].iter().all(|&b| b == 0x5a),
            "after the range intact"
        );
    }
}

#[test]
fn get_id_writes_the_zero_padded_serial() {
    let mut fx = fixture(false);
    let mut id = Buf::new(20);
    id.slice().fill(0xee);
    let mut st = 0;
    let r = request(
        &mut fx.engine,
        RequestKind::GetId,
        0,
        &mut [&mut id],
        &mut st,
    );
    fx.engine.enqueue(r, 0, 0);
    let c: Vec<_> = fx.engine.take_completions().collect();
    assert_eq!(c.len(), 1, "GET_ID completes without the ring");
    assert_eq!(st, VIRTIO_BLK_S_OK);
    assert_eq!(&id.slice()[..4], b"test");
    assert!(id.slice()[4..].iter().all(|&b| b == 0));
}

#[test]
fn a_host_error_reaches_the_guest_as_ioerr() {
    // A read-only file descriptor makes every write fail with EBADF inside the kernel.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ro.img");
    std::fs::File::create(&path).unwrap().set_len(MIB).unwrap();
    let backend = Storage::open(
        &path,
        &ImageOptions {
            read_only: true,
            direct: false,
            create_size: None,
        },
    )
    .unwrap();
    let mut e = Engine::new(Arc::new(backend), config(true)).unwrap();
    let mut data = Buf::new(4096);
    let mut st = 0;
    let r = request(&mut e, RequestKind::Write, 0, &mut [&mut data], &mut st);
    e.enqueue(r, 0, 0);
    run_to_completion(&mut e, 1);
    assert_eq!(st, VIRTIO_BLK_S_IOERR);
    assert_eq!(e.stats()[0].by_kind[StatKind::Write as usize].errors, 1);
}

#[test]
fn a_read_past_the_end_of_the_file_is_an_error_not_a_hang() {
    // The parser rejects ranges past the capacity; if the file shrank under us, the short
    // read (0 bytes) must still complete the request with IOERR.
    let mut fx = fixture(false);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&fx.path)
        .unwrap()
        .set_len(4096)
        .unwrap();
    let mut buf = Buf::new(8192);
    let mut st = 0;
    let r = request(
        &mut fx.engine,
        RequestKind::Read,
        0,
        &mut [&mut buf],
        &mut st,
    );
    fx.engine.enqueue(r, 0, 0);
    run_to_completion(&mut fx.engine, 1);
    assert_eq!(st, VIRTIO_BLK_S_IOERR);
}

#[test]
fn short_transfers_continue_where_they_stopped() {
    let mut v = vec![
        libc::iovec {
            iov_base: 0x1000 as *mut _,
            iov_len: 100,
        },
        libc::iovec {
            iov_base: 0x2000 as *mut _,
            iov_len: 200,
        },
    ];
    advance_iovecs(&mut v, 150);
    assert_eq!(v.len(), 1);
    assert_eq!(v[0].iov_base as usize, 0x2000 + 50);
    assert_eq!(v[0].iov_len, 150);
    advance_iovecs(&mut v, 150);
    assert!(v.is_empty());
}

#[test]
fn writethrough_writes_still_land() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("wt.img");
    let backend = Storage::open(
        &path,
        &ImageOptions {
            read_only: false,
            direct: false,
            create_size: Some(MIB),
        },
    )
    .unwrap();
    let mut e = Engine::new(Arc::new(backend), config(false)).unwrap();
    let mut data = Buf::new(4096);
    data.slice().fill(3);
    let mut st = 0;
    let r = request(&mut e, RequestKind::Write, 8, &mut [&mut data], &mut st);
    e.enqueue(r, 0, 0);
    run_to_completion(&mut e, 1);
    assert_eq!(st, VIRTIO_BLK_S_OK);
    assert!(file_bytes(&path, 4096, 4096).iter().all(|&b| b == 3));
}

#[test]
fn null_backend_completes_inline() {
    let mut e = Engine::new(Arc::new(Storage::null(MIB)), config(true)).unwrap();
    let mut data = Buf::new(4096);
    let mut st = 0;
    let r = request(&mut e, RequestKind::Read, 0, &mut [&mut data], &mut st);
    e.enqueue(r, 0, 5);
    e.submit().unwrap();
    let c: Vec<_> = e.take_completions().collect();
    assert_eq!(
        c,
        vec![Completion {
            queue: 0,
            head: 5,
            used_len: 1
        }]
    );
    assert_eq!(st, VIRTIO_BLK_S_OK);
}

#[test]
fn pool_exhaustion_is_backpressure_not_allocation() {
    let mut e = Engine::new(Arc::new(Storage::null(MIB)), config(true)).unwrap();
    let taken: Vec<Request> = (0..64).map(|_| e.take_request().unwrap()).collect();
    assert!(e.take_request().is_none());
    for r in taken {
        e.discard_malformed(r, 0);
    }
    assert!(e.take_request().is_some());
    assert_eq!(e.stats()[0].malformed, 64);
}

#[test]
fn a_discard_with_no_ranges_left_completes_at_once() {
    let mut fx = fixture(false);
    let mut st = 0;
    let r = request(&mut fx.engine, RequestKind::Discard, 0, &mut [], &mut st);
    fx.engine.enqueue(r, 0, 4);
    fx.engine.submit().unwrap();
    let c: Vec<_> = fx.engine.take_completions().collect();
    assert_eq!(c.len(), 1, "must not wait for an op that was never issued");
    assert_eq!(st, VIRTIO_BLK_S_OK);
    assert_eq!(fx.engine.in_flight(), 0);
}

/// An engine whose backend is a FIFO: a write bigger than the pipe's buffer stays in flight
/// until the test reads the pipe, so ordering against it can be observed deterministically.
fn fifo_engine(cfg: EngineConfig) -> (Engine, std::fs::File, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fifo");
    let cpath = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(cpath.as_ptr(), 0o600) }, 0);
    // O_RDWR: opening does not wait for the other end.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    let reader = std::fs::File::open(&path).unwrap();
    let backend = Storage::from_file_for_tests(file, 64 * MIB);
    (Engine::new(Arc::new(backend), cfg).unwrap(), reader, dir)
}

/// Reaps for `d`, returning what completed.
fn reap_for(e: &mut Engine, d: Duration) -> Vec<Completion> {
    let end = Instant::now() + d;
    let mut out = Vec::new();
    while Instant::now() < end {
        e.ring.wait_one(Duration::from_millis(10)).unwrap();
        e.reap().unwrap();
        out.extend(e.take_completions());
    }
    out
}

#[test]
fn a_flush_waits_for_the_earlier_write_of_its_queue_and_nothing_else() {
    let (mut e, mut reader, _dir) = fifo_engine(config(true));
    // 1 MiB: far more than a pipe buffers, so the write cannot complete while nobody reads.
    let mut data = Buf::new(MIB as usize);
    data.slice().fill(7);
    let (mut sw, mut sf, mut sother) = (0, 0, 0);
    let w = request(&mut e, RequestKind::Write, 0, &mut [&mut data], &mut sw);
    e.enqueue(w, 0, 1);
    let f = request(&mut e, RequestKind::Flush, 0, &mut [], &mut sf);
    e.enqueue(f, 0, 2);
    // A flush of the other queue has no write ahead of it: it must not wait for queue 0's.
    let other = request(&mut e, RequestKind::Flush, 0, &mut [], &mut sother);
    e.enqueue(other, 1, 3);
    e.submit().unwrap();
    let early = reap_for(&mut e, Duration::from_millis(300));
    assert_eq!(
        early.iter().map(|c| (c.queue, c.head)).collect::<Vec<_>>(),
        [(1, 3)],
        "only queue 1's flush may complete while queue 0's write is in flight"
    );
    assert_eq!(e.flushes_waiting(), 1);
    // Another thread reads the pipe: the write's progress is task work that runs only while
    // this thread enters the ring (DEFER_TASKRUN).
    let drain = std::thread::spawn(move || {
        let mut sink = vec![0u8; MIB as usize];
        reader.read_exact(&mut sink).unwrap();
        sink.iter().all(|&b| b == 7)
    });
    let rest = run_to_completion(&mut e, 2);
    assert!(drain.join().unwrap(), "the write's data came through");
    assert_eq!(rest.iter().map(|c| c.head).collect::<Vec<_>>(), [1, 2]);
    assert_eq!(sw, VIRTIO_BLK_S_OK);
}

#[test]
fn more_ops_than_the_cq_holds_wait_in_the_backlog_and_all_complete() {
    // Write-zeroes of 4 ranges each take 4 ops: 16 requests (the pool's size) make 64 ops
    // for a CQ of 16, as many queues on one iothread with multi-range requests would.
    let mut cfg = config(true);
    cfg.max_requests = 16;
    cfg.ring_entries = 4;
    let mut fx = fixture(false);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&fx.path)
        .unwrap()
        .write_all(&vec![0x5a; 2 * MIB as usize])
        .unwrap();
    fx.engine = Engine::new(fx.engine.storage.clone(), cfg).unwrap();
    let cq = fx.engine.ring_capacity;
    assert_eq!(cq, 16);
    let mut status = [0u8; 16];
    for (i, st) in status.iter_mut().enumerate() {
        let mut r = request(&mut fx.engine, RequestKind::WriteZeroes, 0, &mut [], st);
        for k in 0..4u64 {
            r.ranges.push(Range {
                sector: (i as u64 * 64 + k * 16) * 2,
                num_sectors: 8,
                unmap: false,
            });
        }
        fx.engine.enqueue(r, 0, i as u16);
    }
    fx.engine.submit().unwrap();
    assert_eq!(fx.engine.in_ring, cq, "the ring holds what its CQ holds");
    assert_eq!(fx.engine.backlogged(), 64 - cq);
    let done = run_to_completion(&mut fx.engine, 16);
    assert_eq!(done.len(), 16);
    assert!(status.iter().all(|&s| s == VIRTIO_BLK_S_OK));
    assert_eq!(fx.engine.cq_overflows(), 0);
    let disk = file_bytes(&fx.path, 0, 2 * MIB as usize);
    // Request i zeroed 4 KiB blocks 0, 4, 8 and 12 of its own 64 KiB (16 blocks).
    for (block, bytes) in disk.chunks(4096).enumerate() {
        let zeroed = block < 16 * 16 && block % 4 == 0;
        assert!(
            bytes.iter().all(|&b| b == if zeroed { 0 } else { 0x5a }),
            "block {block}"
        );
    }
}

#[test]
fn rings_without_defer_taskrun_serve_io_the_same() {
    for setup in [RingSetup::Coop, RingSetup::Plain] {
        let mut cfg = config(true);
        cfg.ring_setup = setup;
        let mut fx = fixture(true);
        fx.engine = Engine::new(fx.engine.storage.clone(), cfg).unwrap();
        let want = match setup {
            RingSetup::Coop => RingMode::CoopTaskrun,
            _ => RingMode::Plain,
        };
        assert_eq!(fx.engine.ring_mode(), want);
        let mut w = Buf::new(8192);
        w.slice().fill(0x5a);
        let mut st = 0;
        let r = request(
            &mut fx.engine,
            RequestKind::Write,
            8,
            &mut [&mut w],
            &mut st,
        );
        fx.engine.enqueue(r, 0, 1);
        run_to_completion(&mut fx.engine, 1);
        assert_eq!(st, VIRTIO_BLK_S_OK);
        let mut back = Buf::new(8192);
        let r = request(
            &mut fx.engine,
            RequestKind::Read,
            8,
            &mut [&mut back],
            &mut st,
        );
        fx.engine.enqueue(r, 0, 2);
        run_to_completion(&mut fx.engine, 1);
        assert!(back.slice().iter().all(|&b| b == 0x5a), "{setup:?}");
    }
}

#[test]
fn the_default_ring_is_single_issuer_with_deferred_task_work_here() {
    // This machine's kernel (6.1+) has both; the fallback test above covers older ones.
    let fx = fixture(true);
    assert_eq!(fx.engine.ring_mode(), RingMode::DeferTaskrun);
}

#[test]
fn another_thread_adopts_an_idle_ring_by_setting_up_its_own() {
    let mut fx = fixture(true);
    assert!(!fx.engine.adopt_current_thread().unwrap(), "already ours");
    let mut e = std::thread::scope(|s| {
        s.spawn(|| {
            let mut e = fx.engine;
            assert!(
                e.adopt_current_thread().unwrap(),
                "a new ring for this thread"
            );
            let mut b = Buf::new(4096);
            b.slice().fill(3);
            let mut st = 0;
            let r = request(&mut e, RequestKind::Write, 0, &mut [&mut b], &mut st);
            e.enqueue(r, 0, 1);
            run_to_completion(&mut e, 1);
            assert_eq!(st, VIRTIO_BLK_S_OK);
            e
        })
        .join()
        .unwrap()
    });
    assert!(e.ring_counters().enters > 0);
    // Back on this thread, which sets up a ring of its own again.
    let mut b = Buf::new(4096);
    let mut st = 0;
    let r = request(&mut e, RequestKind::Read, 0, &mut [&mut b], &mut st);
    e.enqueue(r, 0, 2);
    assert!(e.adopt_current_thread().unwrap());
    e.submit().unwrap();
    run_to_completion(&mut e, 1);
    assert!(b.slice().iter().all(|&x| x == 3));
}

/// A page-aligned block standing in for one guest memory region.
struct GuestRegion {
    mem: Vec<u8>,
    off: usize,
    len: usize,
}

impl GuestRegion {
    fn new(len: usize) -> GuestRegion {
        let mem = vec![0u8; len + 4096];
        let off = (4096 - mem.as_ptr() as usize % 4096) % 4096;
        GuestRegion { mem, off, len }
    }

    fn range(&self) -> (usize, usize) {
        (self.mem.as_ptr() as usize + self.off, self.len)
    }

    fn bytes(&mut self, at: usize, len: usize) -> &mut [u8] {
        &mut self.mem[self.off + at..self.off + at + len]
    }

    fn iovec(&mut self, at: usize, len: usize) -> libc::iovec {
        libc::iovec {
            iov_base: self.bytes(at, len).as_mut_ptr().cast(),
            iov_len: len,
        }
    }
}

/// A request on iovecs given as they are.
fn request_on(
    e: &mut Engine,
    kind: RequestKind,
    sector: u64,
    iovecs: &[libc::iovec],
    status: &mut u8,
) -> Request {
    let mut r = request(e, kind, sector, &mut [], status);
    for v in iovecs {
        r.iovecs.push(*v);
        r.data_len += v.iov_len as u32;
    }
    r
}

#[test]
fn io_on_registered_guest_memory_uses_fixed_buffers_and_other_io_does_not() {
    let mut fx = fixture(true);
    let mut guest = GuestRegion::new(MIB as usize);
    fx.engine.set_guest_memory(&[guest.range()]);
    assert!(
        fx.engine.ring.vectored_fixed(),
        "kernel 6.15+ has READV_FIXED"
    );
    guest.bytes(0, 8192).fill(0x11);
    guest.bytes(65536, 4096).fill(0x22);
    let mut st = 0;
    // One segment: WRITE_FIXED. Two segments in the region: WRITEV_FIXED.
    let one = [guest.iovec(0, 4096)];
    let r = request_on(&mut fx.engine, RequestKind::Write, 0, &one, &mut st);
    fx.engine.enqueue(r, 0, 1);
    run_to_completion(&mut fx.engine, 1);
    let two = [guest.iovec(4096, 4096), guest.iovec(65536, 4096)];
    let r = request_on(&mut fx.engine, RequestKind::Write, 16, &two, &mut st);
    fx.engine.enqueue(r, 0, 2);
    run_to_completion(&mut fx.engine, 1);
    assert_eq!(st, VIRTIO_BLK_S_OK);
    assert_eq!(fx.engine.fixed_io_counts(), (2, 0));
    assert!(file_bytes(&fx.path, 0, 4096).iter().all(|&b| b == 0x11));
    let disk = file_bytes(&fx.path, 8192, 8192);
    assert!(disk[..4096].iter().all(|&b| b == 0x11) && disk[4096..].iter().all(|&b| b == 0x22));
    // Read it back through READV_FIXED into two other places of the region.
    let back = [guest.iovec(131072, 4096), guest.iovec(262144, 4096)];
    let r = request_on(&mut fx.engine, RequestKind::Read, 16, &back, &mut st);
    fx.engine.enqueue(r, 0, 3);
    run_to_completion(&mut fx.engine, 1);
    assert_eq!(st, VIRTIO_BLK_S_OK);
    assert!(guest.bytes(131072, 4096).iter().all(|&b| b == 0x11));
    assert!(guest.bytes(262144, 4096).iter().all(|&b| b == 0x22));
    assert_eq!(fx.engine.fixed_io_counts(), (3, 0));
    // A request whose segments are not all in one registered buffer: plain READV.
    let mut outside = Buf::new(4096);
    let mixed = [guest.iovec(0, 4096), outside.iovec()];
    let r = request_on(&mut fx.engine, RequestKind::Read, 16, &mixed, &mut st);
    fx.engine.enqueue(r, 0, 4);
    run_to_completion(&mut fx.engine, 1);
    assert_eq!(st, VIRTIO_BLK_S_OK);
    assert!(guest.bytes(0, 4096).iter().all(|&b| b == 0x11));
    assert!(outside.slice().iter().all(|&b| b == 0x22));
    assert_eq!(fx.engine.fixed_io_counts(), (3, 1));
}

#[test]
fn memory_the_kernel_cannot_pin_falls_back_to_plain_io() {
    let mut fx = fixture(true);
    // SAFETY: a fresh anonymous PROT_NONE mapping we own and unmap below.
    let hole = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            65536,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(hole, libc::MAP_FAILED);
    fx.engine.set_guest_memory(&[(hole as usize, 65536)]);
    let mut b = Buf::new(4096);
    b.slice().fill(0x33);
    let mut st = 0;
    let r = request(
        &mut fx.engine,
        RequestKind::Write,
        0,
        &mut [&mut b],
        &mut st,
    );
    fx.engine.enqueue(r, 0, 1);
    run_to_completion(&mut fx.engine, 1);
    assert_eq!(st, VIRTIO_BLK_S_OK);
    assert_eq!(fx.engine.fixed_io_counts(), (0, 1));
    assert!(file_bytes(&fx.path, 0, 4096).iter().all(|&x| x == 0x33));
    // SAFETY: unmapping the mapping made above, which nothing uses any more.
    unsafe { libc::munmap(hole, 65536) };
}

#[test]
fn a_memory_table_change_with_io_in_flight_keeps_that_io_whole() {
    let (mut e, mut reader, _dir) = fifo_engine(config(true));
    let mut old = GuestRegion::new(2 * MIB as usize);
    old.bytes(0, MIB as usize).fill(0x44);
    e.set_guest_memory(&[old.range()]);
    let mut st = 0;
    let w = [old.iovec(0, MIB as usize)];
    let r = request_on(&mut e, RequestKind::Write, 0, &w, &mut st);
    e.enqueue(r, 0, 1);
    e.submit().unwrap();
    assert!(
        reap_for(&mut e, Duration::from_millis(100)).is_empty(),
        "the FIFO holds the write"
    );
    // The guest's memory table changes while the write is in flight on the old buffer.
    let mut new = GuestRegion::new(MIB as usize);
    new.bytes(0, 4096).fill(0x55);
    e.set_guest_memory(&[new.range()]);
    let drain = std::thread::spawn(move || {
        let mut first = vec![0u8; MIB as usize];
        reader.read_exact(&mut first).unwrap();
        let mut second = vec![0u8; 4096];
        reader.read_exact(&mut second).unwrap();
        (first, second)
    });
    run_to_completion(&mut e, 1);
    assert_eq!(st, VIRTIO_BLK_S_OK);
    // (The pipe takes the write in pieces; the pieces resubmitted after the change are plain,
    // the old buffer having left the table.)
    let before = e.fixed_io_counts();
    let w = [new.iovec(0, 4096)];
    let r = request_on(&mut e, RequestKind::Write, 0, &w, &mut st);
    e.enqueue(r, 0, 2);
    run_to_completion(&mut e, 1);
    let (first, second) = drain.join().unwrap();
    assert!(
        first.iter().all(|&b| b == 0x44),
        "the in-flight write sent the old memory"
    );
    assert!(second.iter().all(|&b| b == 0x55));
    let after = e.fixed_io_counts();
    assert!(
        before.0 >= 1,
        "the first write went out on the old fixed buffer"
    );
    assert_eq!(
        (after.0 - before.0, after.1 - before.1),
        (1, 0),
        "the new memory is registered"
    );
}

#[test]
fn the_cq_holds_a_request_of_every_queue_of_the_iothread() {
    // 64 queues of 1024 on one iothread: 65536 requests, the most the kernel's CQ takes.
    for (requests, want_cq) in [(256, 512), (4096, 8192), (16384, 16384), (65536, 65536)] {
        let mut cfg = config(true);
        cfg.max_requests = requests;
        let (sq, cq) = cfg.ring_sizes();
        assert!(sq <= 4096 && cq >= 2 * sq, "{requests}: sq {sq} cq {cq}");
        assert_eq!(cq, want_cq, "{requests} requests");
        assert!(cq as usize >= requests.min(65536));
    }
}

/// An engine over the fault-injecting backend (a 4 MiB disk in memory).
fn fault_engine(writeback: bool) -> (Engine, Arc<FaultStorage>) {
    let fault = FaultStorage::new(vec![0u8; 4 * MIB as usize]);
    let storage = Storage::fault(fault.clone());
    (
        Engine::new(Arc::new(storage), config(writeback)).unwrap(),
        fault,
    )
}

/// Waits on the completion eventfd (an external backend's results), reaping.
fn run_external(e: &mut Engine, expect: usize) -> Vec<Completion> {
    e.submit().unwrap();
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while out.len() < expect {
        assert!(Instant::now() < deadline, "timed out");
        e.wait_eventfd(Duration::from_millis(10));
        e.reap().unwrap();
        out.extend(e.take_completions());
    }
    out
}

#[test]
fn an_external_backend_gets_planned_ops_and_reports_through_the_eventfd() {
    let (mut e, fault) = fault_engine(true);
    let mut data = Buf::new(8192);
    data.slice().fill(0x42);
    let mut st = 0;
    let r = request(&mut e, RequestKind::Write, 8, &mut [&mut data], &mut st);
    e.enqueue(r, 0, 1);
    let c = run_external(&mut e, 1);
    assert_eq!(c[0].head, 1);
    assert_eq!(st, VIRTIO_BLK_S_OK);
    assert!(fault.bytes(4096, 8192).iter().all(|&b| b == 0x42));
    let mut back = Buf::new(4096);
    let r = request(&mut e, RequestKind::Read, 16, &mut [&mut back], &mut st);
    e.enqueue(r, 0, 2);
    run_external(&mut e, 1);
    assert_eq!(st, VIRTIO_BLK_S_OK);
    assert!(back.slice().iter().all(|&b| b == 0x42));
    let rec = fault.record();
    assert_eq!(
        rec.iter()
            .map(|r| (r.kind, r.offset, r.len))
            .collect::<Vec<_>>(),
        [(IoKind::Write, 4096, 8192), (IoKind::Read, 8192, 4096)]
    );
    assert!(rec.iter().all(|r| !r.dsync), "the write cache is on");
}

#[test]
fn an_op_the_backend_refuses_fails_its_requests_and_the_rest_of_the_batch_goes_on() {
    let (mut e, fault) = fault_engine(true);
    // Sectors 0..16 refuse to start: the two adjacent writes there merge into one op.
    fault.inject(FaultRule::kinds(&[IoKind::Write], Fault::Reject(libc::EIO)).at(0..8192));
    let mut bufs: Vec<Buf> = (0..3).map(|_| Buf::new(4096)).collect();
    let mut sts = [0u8; 3];
    for (i, (b, s)) in bufs.iter_mut().zip(sts.iter_mut()).enumerate() {
        b.slice().fill(0x30 + i as u8);
        let sector = [0, 8, 64][i];
        let r = request(&mut e, RequestKind::Write, sector, &mut [b], s);
        e.enqueue(r, 0, i as u16);
    }
    let c = run_external(&mut e, 3);
    assert_eq!(c.len(), 3, "no request stranded");
    assert_eq!(
        sts,
        [VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK]
    );
    assert_eq!(e.in_flight(), 0);
    assert!(
        fault.bytes(0, 8192).iter().all(|&b| b == 0),
        "nothing written"
    );
    assert!(fault.bytes(64 * 512, 4096).iter().all(|&b| b == 0x32));
    assert_eq!(e.stats()[0].by_kind[StatKind::Write as usize].errors, 2);
}

#[test]
fn eagain_is_retried_until_it_succeeds_and_bounded_when_it_never_does() {
    let (mut e, fault) = fault_engine(true);
    fault.inject(FaultRule::kinds(&[IoKind::Read], Fault::Errno(libc::EAGAIN)).times(3));
    let mut b = Buf::new(4096);
    let mut st = 0;
    let r = request(&mut e, RequestKind::Read, 0, &mut [&mut b], &mut st);
    e.enqueue(r, 0, 1);
    run_external(&mut e, 1);
    assert_eq!(st, VIRTIO_BLK_S_OK);
    assert_eq!(fault.record().len(), 4, "three EAGAINs, then the read");
    // EAGAIN forever: the request fails instead of spinning for good.
    fault.inject(FaultRule::kinds(
        &[IoKind::Read],
        Fault::Errno(libc::EAGAIN),
    ));
    fault.clear_record();
    let r = request(&mut e, RequestKind::Read, 0, &mut [&mut b], &mut st);
    e.enqueue(r, 0, 2);
    run_external(&mut e, 1);
    assert_eq!(st, VIRTIO_BLK_S_IOERR);
    assert_eq!(
        fault.record().len(),
        1 + crate::complete::MAX_RETRIES as usize
    );
}

#[test]
fn a_short_transfer_is_resubmitted_for_the_rest() {
    for kind in [RequestKind::Write, RequestKind::Read] {
        let (mut e, fault) = fault_engine(true);
        let io = if kind == RequestKind::Write {
            IoKind::Write
        } else {
            IoKind::Read
        };
        fault.inject(FaultRule::kinds(&[io], Fault::Short(5000)).times(2));
        let mut b = Buf::new(16384);
        for (i, x) in b.slice().iter_mut().enumerate() {
            *x = (i % 253) as u8;
        }
        let want = b.slice().to_vec();
        if kind == RequestKind::Read {
            // Put the pattern on the disk first, then read it into a cleared buffer.
            let mut w = Buf::new(16384);
            w.slice().copy_from_slice(&want);
            let mut st = 0;
            let r = request(&mut e, RequestKind::Write, 8, &mut [&mut w], &mut st);
            e.enqueue(r, 0, 0);
            run_external(&mut e, 1);
            b.slice().fill(0);
            fault.clear_record();
        }
        let mut st = 0;
        let r = request(&mut e, kind, 8, &mut [&mut b], &mut st);
        e.enqueue(r, 0, 1);
        run_external(&mut e, 1);
        assert_eq!(st, VIRTIO_BLK_S_OK, "{kind:?}");
        assert_eq!(
            fault
                .record()
                .iter()
                .map(|r| (r.offset, r.len))
                .collect::<Vec<_>>(),
            [
                (4096, 16384),
                (4096 + 5000, 16384 - 5000),
                (4096 + 10000, 6384)
            ],
            "{kind:?}: each resubmission goes on where the last stopped"
        );
        assert_eq!(fault.bytes(4096, 16384), want, "{kind:?}");
        assert_eq!(b.slice().to_vec(), want, "{kind:?}");
    }
}

#[test]
fn wait_idle_is_bounded_and_says_what_is_left() {
    let (mut e, mut reader, _dir) = fifo_engine(config(true));
    let mut data = Buf::new(MIB as usize);
    let mut st = 0;
    let w = request(&mut e, RequestKind::Write, 0, &mut [&mut data], &mut st);
    e.enqueue(w, 0, 1);
    let f = request(&mut e, RequestKind::Flush, 0, &mut [], &mut st);
    e.enqueue(f, 0, 2);
    let started = Instant::now();
    match e.wait_idle(Duration::from_millis(200)) {
        Err(EngineError::Timeout { requests, .. }) => assert_eq!(requests, 2),
        other => panic!("expected a timeout, got {other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(2));
    let drain = std::thread::spawn(move || {
        let mut sink = vec![0u8; MIB as usize];
        reader.read_exact(&mut sink).unwrap();
    });
    e.wait_idle(Duration::from_secs(10)).unwrap();
    drain.join().unwrap();
    assert_eq!(e.take_completions().count(), 2);
}

#[test]
fn writethrough_fallocates_carry_a_linked_data_sync_on_the_ring() {
    for (kind, unmap) in [
        (RequestKind::Discard, false),
        (RequestKind::WriteZeroes, false),
        (RequestKind::WriteZeroes, true),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wt.img");
        std::fs::write(&path, vec![0x5a; MIB as usize]).unwrap();
        let storage = Storage::open(
            &path,
            &ImageOptions {
                read_only: false,
                direct: false,
                create_size: None,
            },
        )
        .unwrap();
        let mut e = Engine::new(Arc::new(storage), config(false)).unwrap();
        let before = e.ring_counters().sqes;
        let mut st = 0;
        let mut r = request(&mut e, kind, 0, &mut [], &mut st);
        r.ranges.push(Range {
            sector: 8,
            num_sectors: 16,
            unmap,
        });
        e.enqueue(r, 0, 0);
        run_to_completion(&mut e, 1);
        assert_eq!(st, VIRTIO_BLK_S_OK, "{kind:?} unmap={unmap}");
        assert_eq!(
            e.ring_counters().sqes - before,
            2,
            "{kind:?}: the fallocate and its fdatasync"
        );
        assert!(file_bytes(&path, 4096, 8192).iter().all(|&b| b == 0));
        assert!(file_bytes(&path, 0, 4096).iter().all(|&b| b == 0x5a));
    }
}

#[test]
fn writethrough_ops_report_a_failing_sync() {
    let (mut e, fault) = fault_engine(false);
    fault.inject(FaultRule::kinds(&[IoKind::Discard], Fault::FailSync));
    let mut st = 0;
    let mut r = request(&mut e, RequestKind::Discard, 0, &mut [], &mut st);
    r.ranges.push(Range {
        sector: 8,
        num_sectors: 8,
        unmap: false,
    });
    e.enqueue(r, 0, 0);
    let mut data = Buf::new(4096);
    let mut sw = 0;
    let w = request(&mut e, RequestKind::Write, 64, &mut [&mut data], &mut sw);
    e.enqueue(w, 0, 1);
    run_external(&mut e, 2);
    assert_eq!(st, VIRTIO_BLK_S_IOERR, "the discard's sync failed");
    assert_eq!(sw, VIRTIO_BLK_S_OK);
    let rec = fault.record();
    assert!(rec
        .iter()
        .any(|r| r.kind == IoKind::Discard && r.sync_after));
    assert!(rec.iter().any(|r| r.kind == IoKind::Write && r.dsync));
}

/// The rw_flags field of an SQE (io_uring_sqe bytes 28..32).
fn sqe_rw_flags(entry: io_uring::squeue::Entry) -> u32 {
    // SAFETY: squeue::Entry is #[repr(C)] over the 64-byte io_uring_sqe, built from zeroed
    // bytes by the io-uring crate, so every byte is initialised.
    let bytes: [u8; 64] = unsafe { std::mem::transmute(entry) };
    u32::from_ne_bytes(bytes[28..32].try_into().unwrap())
}

#[test]
fn writethrough_writes_carry_rwf_dsync_in_their_sqe_and_writeback_ones_do_not() {
    for writeback in [false, true] {
        // The FIFO holds the write in flight, so its op can be looked at.
        let (mut e, mut reader, _dir) = fifo_engine(config(writeback));
        let mut data = Buf::new(MIB as usize);
        let mut st = 0;
        let w = request(&mut e, RequestKind::Write, 0, &mut [&mut data], &mut st);
        e.enqueue(w, 0, 1);
        e.submit().unwrap();
        let keys: Vec<usize> = e.ops.iter().map(|(k, _)| k).collect();
        assert_eq!(keys.len(), 1);
        let flags = sqe_rw_flags(e.sqe(keys[0]).0);
        assert_eq!(
            flags & libc::RWF_DSYNC as u32 != 0,
            !writeback,
            "writeback={writeback}: rw_flags {flags:#x}"
        );
        let drain = std::thread::spawn(move || {
            let mut sink = vec![0u8; MIB as usize];
            reader.read_exact(&mut sink).unwrap();
        });
        run_to_completion(&mut e, 1);
        drain.join().unwrap();
        assert_eq!(st, VIRTIO_BLK_S_OK);
    }
}

#[test]
fn a_linked_pair_reports_the_error_of_either_cqe() {
    // (fallocate CQE, fdatasync CQE) -> status: the sync's error counts when the op worked,
    // the op's when it did not (its sync is cancelled then).
    for (first, second, want) in [
        (0, 0, VIRTIO_BLK_S_OK),
        (0, -libc::EIO, VIRTIO_BLK_S_IOERR),
        (-libc::ENOSPC, -libc::ECANCELED, VIRTIO_BLK_S_IOERR),
    ] {
        let mut fx = fixture(false);
        let mut st = 0;
        let r = request(
            &mut fx.engine,
            RequestKind::WriteZeroes,
            0,
            &mut [],
            &mut st,
        );
        let mut r = r;
        r.ranges.push(Range {
            sector: 8,
            num_sectors: 8,
            unmap: false,
        });
        fx.engine.enqueue(r, 0, 0);
        // Take the request before submit plans it, and play the ring's part by hand.
        let key = fx.engine.batch.pop().unwrap();
        let op = fx
            .engine
            .new_op(IoKind::WriteZeroes { unmap: false }, 4096, key);
        fx.engine.ops[op].sync_after = true;
        fx.engine
            .on_cqe(op as u64 | crate::uring::LINKED_FIRST, first);
        assert_eq!(st, 0xff, "not complete before the sync's CQE");
        fx.engine.on_cqe(op as u64, second);
        assert_eq!(st, want, "({first}, {second})");
        assert_eq!(fx.engine.in_flight(), 0);
    }
}
