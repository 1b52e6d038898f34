//! Drives a running server through libblkio's `virtio-blk-vhost-user` driver (the `blkio`
//! crate), the way a real userspace client does: connect with retries, memory shared with the
//! server, one-request helpers, a deterministic data pattern, a model of what the disk must hold,
//! and a deadline runner so that a hung server fails a test instead of hanging CI.

pub mod workload;

use blkio::{Blkio, Blkioq, Completion, ReqFlags};
use std::mem::MaybeUninit;
use std::path::Path;
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// virtio-blk addresses the disk in 512-byte sectors whatever the logical block size.
pub const SECTOR: u64 = 512;
/// One wait for completions longer than this means the server is hung or gone.
pub const IO_TIMEOUT: Duration = Duration::from_secs(30);
/// The server may still be tearing down the previous frontend (or not yet listening).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
pub const MIB: u64 = 1024 * 1024;

/// Runs `work` on its own thread and fails the test if it does not finish within `limit`.
/// A panic inside `work` is re-raised here with its own message.
pub fn within<T: Send + 'static>(
    limit: Duration,
    what: &str,
    work: impl FnOnce() -> T + Send + 'static,
) -> T {
    let (done_tx, done_rx) = mpsc::channel();
    let handle = std::thread::spawn(move || {
        let value = work();
        let _ = done_tx.send(());
        value
    });
    match done_rx.recv_timeout(limit) {
        // Disconnected: `work` panicked and dropped the sender; join() carries the panic.
        Ok(()) | Err(mpsc::RecvTimeoutError::Disconnected) => match handle.join() {
            Ok(value) => value,
            Err(panic) => std::panic::resume_unwind(panic),
        },
        Err(mpsc::RecvTimeoutError::Timeout) => {
            panic!("{what}: not finished after {limit:?}; the server is hung or too slow")
        }
    }
}

/// Human-readable form of a completion's return value (0 or -errno).
pub fn describe_ret(ret: i32) -> String {
    if ret == 0 {
        "0 (success)".to_string()
    } else {
        format!("{ret} ({})", std::io::Error::from_raw_os_error(-ret))
    }
}

/// How to set up a client.
#[derive(Clone, Debug)]
pub struct ClientOptions {
    pub num_queues: i32,
    /// Ring size; must not exceed the server's `--queue-size`. None keeps libblkio's 256.
    pub queue_size: Option<i32>,
    pub read_only: bool,
    /// Bytes of memory shared with the server for data buffers.
    pub buf_size: usize,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            num_queues: 1,
            queue_size: None,
            read_only: false,
            buf_size: 4 * MIB as usize,
        }
    }
}

/// Connects a `Blkio` to `socket` (state Connected, not started), retrying while the server is
/// not accepting yet: it accepts the next frontend only after it has torn down the previous one.
pub fn connect(socket: &Path, read_only: bool) -> Blkio {
    let path = socket.to_str().expect("socket path is UTF-8");
    let start = Instant::now();
    let mut attempts = 0u32;
    loop {
        attempts += 1;
        let mut blkio = Blkio::new("virtio-blk-vhost-user").expect("blkio driver available");
        blkio.set_str("path", path).expect("set path");
        blkio
            .set_bool("read-only", read_only)
            .expect("set read-only");
        match blkio.connect() {
            Ok(()) => {
                if attempts > 1 {
                    eprintln!("connected to {path} after {attempts} attempts ({:?})", start.elapsed());
                }
                return blkio;
            }
            Err(e) if start.elapsed() < CONNECT_TIMEOUT => {
                if attempts == 1 {
                    eprintln!("connect to {path} failed ({e}, errno {:?}); retrying", e.errno());
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => panic!(
                "could not connect to {path} within {CONNECT_TIMEOUT:?} ({attempts} attempts): {e} (errno {:?})",
                e.errno()
            ),
        }
    }
}

/// A started libblkio client with one region of memory shared with the server.
pub struct Client {
    // Field order is drop order: the queues go before the Blkio that owns their rings, and the
    // shared buffer is only an address into memory the Blkio frees.
    pub queues: Vec<Blkioq>,
    pub buf: SharedBuf,
    pub blkio: Blkio,
}

impl Client {
    /// Connects, starts `opts.num_queues` queues and maps `opts.buf_size` bytes of shared memory.
    pub fn connect(socket: &Path, opts: &ClientOptions) -> Client {
        let blkio = connect(socket, opts.read_only);
        Self::start(blkio, opts).unwrap_or_else(|e| {
            panic!(
                "starting the blkio client ({opts:?}): {e} (errno {:?})",
                e.errno()
            )
        })
    }

    /// Starts an already connected `Blkio`; an error is returned for tests that expect one.
    pub fn start(mut blkio: Blkio, opts: &ClientOptions) -> Result<Client, blkio::Error> {
        blkio.set_i32("num-queues", opts.num_queues)?;
        if let Some(size) = opts.queue_size {
            blkio.set_i32("queue-size", size)?;
        }
        let outcome = blkio.start()?;
        let align = blkio.get_u64("mem-region-alignment")?.max(4096) as usize;
        let len = opts.buf_size.div_ceil(align) * align;
        let region = blkio.alloc_mem_region(len)?;
        blkio.map_mem_region(&region)?;
        Ok(Client {
            queues: outcome.queues,
            buf: SharedBuf {
                addr: region.addr,
                len: region.len,
            },
            blkio,
        })
    }

    pub fn capacity(&self) -> u64 {
        self.blkio.get_u64("capacity").expect("capacity property")
    }

    pub fn prop_i32(&self, name: &str) -> i32 {
        self.blkio
            .get_i32(name)
            .unwrap_or_else(|e| panic!("property {name}: {e}"))
    }

    pub fn prop_u64(&self, name: &str) -> u64 {
        self.blkio
            .get_u64(name)
            .unwrap_or_else(|e| panic!("property {name}: {e}"))
    }

    pub fn prop_bool(&self, name: &str) -> bool {
        self.blkio
            .get_bool(name)
            .unwrap_or_else(|e| panic!("property {name}: {e}"))
    }

    /// Queue `index` and the shared buffer, borrowed together.
    pub fn queue(&mut self, index: usize) -> (&mut Blkioq, &SharedBuf) {
        (&mut self.queues[index], &self.buf)
    }
}

/// Memory shared with the server (request data must live there). Accessed only by copying in and
/// out through raw pointers, never through references, because the server writes into it.
/// Callers touch only buffers of requests that are not in flight.
pub struct SharedBuf {
    addr: usize,
    len: usize,
}

impl SharedBuf {
    pub fn len(&self) -> usize {
        self.len
    }

    /// Address of `len` bytes at `offset`, bounds-checked, for handing to a request.
    pub fn ptr(&self, offset: usize, len: usize) -> *mut u8 {
        assert!(
            offset.checked_add(len).is_some_and(|end| end <= self.len),
            "buffer range {offset}+{len} outside the shared region of {} bytes",
            self.len
        );
        (self.addr + offset) as *mut u8
    }

    pub fn copy_in(&self, offset: usize, src: &[u8]) {
        let dst = self.ptr(offset, src.len());
        // SAFETY: `ptr` checked the range lies in the region mapped read-write by
        // alloc_mem_region, which lives as long as the Blkio owning this SharedBuf's Client;
        // `src` is ordinary memory, so the ranges cannot overlap.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst, src.len()) };
    }

    pub fn copy_out(&self, offset: usize, len: usize) -> Vec<u8> {
        let src = self.ptr(offset, len);
        let mut out = vec![0u8; len];
        // SAFETY: as in copy_in: the source range is inside the live mapped region and `out`
        // is a fresh allocation of exactly `len` bytes.
        unsafe { std::ptr::copy_nonoverlapping(src, out.as_mut_ptr(), len) };
        out
    }

    /// iovecs for `pieces` given as (offset in this buffer, length).
    pub fn iovecs(&self, pieces: &[(usize, usize)]) -> Vec<blkio::iovec> {
        pieces
            .iter()
            .map(|&(offset, len)| blkio::iovec {
                iov_base: self.ptr(offset, len).cast(),
                iov_len: len,
            })
            .collect()
    }

    /// Copies `data` into `pieces` in order; their lengths must add up to `data.len()`.
    pub fn scatter(&self, pieces: &[(usize, usize)], data: &[u8]) {
        let mut at = 0;
        for &(offset, len) in pieces {
            self.copy_in(offset, &data[at..at + len]);
            at += len;
        }
        assert_eq!(at, data.len(), "pieces do not cover the data");
    }

    /// Concatenates the contents of `pieces`.
    pub fn gather(&self, pieces: &[(usize, usize)]) -> Vec<u8> {
        pieces
            .iter()
            .flat_map(|&(offset, len)| self.copy_out(offset, len))
            .collect()
    }

    pub fn fill(&self, offset: usize, len: usize, byte: u8) {
        let dst = self.ptr(offset, len);
        // SAFETY: `ptr` checked the range lies inside the live mapped region.
        unsafe { std::ptr::write_bytes(dst, byte, len) };
    }
}

/// One finished request: the `user_data` it was submitted with and its return value.
#[derive(Clone, Copy, Debug)]
pub struct Done {
    pub user_data: usize,
    pub ret: i32,
}

/// Waits until at least `min` requests of `queue` complete (with IO_TIMEOUT) and returns all
/// completions available.
pub fn wait(queue: &mut Blkioq, min: usize) -> Vec<Done> {
    let mut slots: Vec<MaybeUninit<Completion>> =
        (0..min.max(64)).map(|_| MaybeUninit::uninit()).collect();
    let mut timeout = IO_TIMEOUT;
    let count = queue
        .do_io(&mut slots, min, Some(&mut timeout), None)
        .unwrap_or_else(|e| {
            panic!(
                "waiting for {min} completion(s): {e} (errno {:?}); server hung or disconnected",
                e.errno()
            )
        });
    slots[..count]
        .iter()
        .map(|slot| {
            // SAFETY: do_io initialised the first `count` entries.
            let completion = unsafe { slot.assume_init_read() };
            Done {
                user_data: completion.user_data,
                ret: completion.ret,
            }
        })
        .collect()
}

/// Waits for the completion of the only request in flight, submitted with `user_data`.
pub fn wait_one(queue: &mut Blkioq, user_data: usize) -> i32 {
    let done = wait(queue, 1);
    assert_eq!(done.len(), 1, "one request in flight, got {done:?}");
    assert_eq!(
        done[0].user_data, user_data,
        "completion for an unknown request"
    );
    done[0].ret
}

/// Reads `len` bytes at disk `offset` into the shared buffer at `buf_offset`; returns the
/// completion's return value.
pub fn read_at(
    queue: &mut Blkioq,
    buf: &SharedBuf,
    buf_offset: usize,
    offset: u64,
    len: usize,
) -> i32 {
    queue.read(offset, buf.ptr(buf_offset, len), len, 1, ReqFlags::empty());
    wait_one(queue, 1)
}

/// Reads and returns the data, failing the test if the read fails.
pub fn read_vec(queue: &mut Blkioq, buf: &SharedBuf, offset: u64, len: usize) -> Vec<u8> {
    let ret = read_at(queue, buf, 0, offset, len);
    assert_eq!(
        ret,
        0,
        "read of {len} bytes at {offset}: {}",
        describe_ret(ret)
    );
    buf.copy_out(0, len)
}

pub fn write_at(
    queue: &mut Blkioq,
    buf: &SharedBuf,
    buf_offset: usize,
    offset: u64,
    len: usize,
    flags: ReqFlags,
) -> i32 {
    queue.write(offset, buf.ptr(buf_offset, len), len, 2, flags);
    wait_one(queue, 2)
}

/// A request's result must be success.
pub fn expect_ok(ret: i32, what: &str) {
    assert_eq!(ret, 0, "{what}: {}", describe_ret(ret));
}

/// Submits `count` writes of `chunk` bytes of `pattern(.., seed)`, back to back from disk (and
/// buffer) offset `first`, user data = their slot, without waiting for them: the load a test
/// cuts off (a kill, a disconnect).
pub fn submit_pattern_writes(
    queue: &mut Blkioq,
    buf: &SharedBuf,
    first: usize,
    chunk: usize,
    count: usize,
    seed: u64,
) {
    for slot in 0..count {
        let at = first + slot * chunk;
        buf.copy_in(at, &pattern(at as u64, chunk, seed));
        queue.write(
            at as u64,
            buf.ptr(at, chunk),
            chunk,
            slot,
            ReqFlags::empty(),
        );
    }
}

/// Writes `data` at `offset` (through the start of the shared buffer), failing on error.
pub fn write_slice(queue: &mut Blkioq, buf: &SharedBuf, offset: u64, data: &[u8]) {
    buf.copy_in(0, data);
    let ret = write_at(queue, buf, 0, offset, data.len(), ReqFlags::empty());
    assert_eq!(
        ret,
        0,
        "write of {} bytes at {offset}: {}",
        data.len(),
        describe_ret(ret)
    );
}

pub fn discard(queue: &mut Blkioq, offset: u64, len: u64) -> i32 {
    queue.discard(offset, len, 3, ReqFlags::empty());
    wait_one(queue, 3)
}

pub fn write_zeroes(queue: &mut Blkioq, offset: u64, len: u64, flags: ReqFlags) -> i32 {
    queue.write_zeroes(offset, len, 4, flags);
    wait_one(queue, 4)
}

pub fn flush(queue: &mut Blkioq) -> i32 {
    queue.flush(5, ReqFlags::empty());
    wait_one(queue, 5)
}

/// splitmix64: a small deterministic generator for test data and choices (no rand crate among
/// this crate's dev-dependencies).
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in 0..bound (bound > 0; the modulo bias is irrelevant here).
    pub fn below(&mut self, bound: u64) -> u64 {
        self.next_u64() % bound
    }
}

/// Fills `dst` (a whole number of sectors destined for disk byte `offset`) so that every sector
/// names itself: bytes 0..8 its LBA, 8..16 the write's `seed`, then bytes derived from both. A
/// sector that lands elsewhere, or stale data, is then recognisable in a mismatch report.
pub fn fill_pattern(dst: &mut [u8], offset: u64, seed: u64) {
    assert_eq!(
        dst.len() as u64 % SECTOR,
        0,
        "pattern length not whole sectors"
    );
    assert_eq!(offset % SECTOR, 0, "pattern offset not sector aligned");
    for (index, sector) in dst.chunks_exact_mut(SECTOR as usize).enumerate() {
        fill_sector(sector, offset / SECTOR + index as u64, seed);
    }
}

fn fill_sector(sector: &mut [u8], lba: u64, seed: u64) {
    sector[..8].copy_from_slice(&lba.to_le_bytes());
    sector[8..16].copy_from_slice(&seed.to_le_bytes());
    let mut rng = Rng::new(lba.rotate_left(32) ^ seed);
    for word in sector[16..].chunks_exact_mut(8) {
        word.copy_from_slice(&rng.next_u64().to_le_bytes());
    }
}

pub fn pattern(offset: u64, len: usize, seed: u64) -> Vec<u8> {
    let mut data = vec![0u8; len];
    fill_pattern(&mut data, offset, seed);
    data
}

/// What the disk must contain: per 512-byte sector, the seed of the last write that covered it
/// (0: zeros, i.e. never written, discarded or write-zeroed).
#[derive(Clone, Debug)]
pub struct DiskModel {
    seeds: Vec<u64>,
}

impl DiskModel {
    pub fn new(capacity: u64) -> DiskModel {
        DiskModel {
            seeds: vec![0; (capacity / SECTOR) as usize],
        }
    }

    pub fn capacity(&self) -> u64 {
        self.seeds.len() as u64 * SECTOR
    }

    fn sectors(&self, offset: u64, len: u64) -> std::ops::Range<usize> {
        assert_eq!(
            (offset % SECTOR, len % SECTOR),
            (0, 0),
            "model range not sector aligned"
        );
        assert!(offset + len <= self.capacity(), "model range past the end");
        (offset / SECTOR) as usize..((offset + len) / SECTOR) as usize
    }

    /// Records a completed write of `pattern(offset, len, seed)`; seed must not be 0.
    pub fn write(&mut self, offset: u64, len: u64, seed: u64) {
        assert_ne!(seed, 0, "seed 0 means zeros");
        let range = self.sectors(offset, len);
        self.seeds[range].fill(seed);
    }

    pub fn zero(&mut self, offset: u64, len: u64) {
        let range = self.sectors(offset, len);
        self.seeds[range].fill(0);
    }

    pub fn written_sectors(&self) -> usize {
        self.seeds.iter().filter(|&&seed| seed != 0).count()
    }

    /// Takes over the sectors `other` wrote (models of writers with disjoint ranges).
    pub fn absorb(&mut self, other: &DiskModel) {
        assert_eq!(self.seeds.len(), other.seeds.len());
        for (mine, theirs) in self.seeds.iter_mut().zip(&other.seeds) {
            if *theirs != 0 {
                *mine = *theirs;
            }
        }
    }

    pub fn expected(&self, offset: u64, len: usize) -> Vec<u8> {
        let mut data = vec![0u8; len];
        let range = self.sectors(offset, len as u64);
        let mut start = range.start;
        while start < range.end {
            let seed = self.seeds[start];
            let mut end = start + 1;
            while end < range.end && self.seeds[end] == seed {
                end += 1;
            }
            if seed != 0 {
                let from = (start - range.start) * SECTOR as usize;
                let to = (end - range.start) * SECTOR as usize;
                fill_pattern(&mut data[from..to], start as u64 * SECTOR, seed);
            }
            start = end;
        }
        data
    }

    /// Compares `actual`, read from disk byte `offset`, with the model; the error names the
    /// first mismatching sectors and what they held instead.
    pub fn check(&self, offset: u64, actual: &[u8], what: &str) -> Result<(), String> {
        let expected = self.expected(offset, actual.len());
        if expected == actual {
            return Ok(());
        }
        let mut report = Vec::new();
        let mut bad = 0usize;
        for (index, (want, got)) in expected
            .chunks_exact(SECTOR as usize)
            .zip(actual.chunks_exact(SECTOR as usize))
            .enumerate()
        {
            if want != got {
                bad += 1;
                if report.len() < 4 {
                    let lba = offset / SECTOR + index as u64;
                    report.push(format!(
                        "sector {lba}: expected {}, found {}",
                        describe_sector(want),
                        describe_sector(got)
                    ));
                }
            }
        }
        Err(format!(
            "{what}: {bad} of {} sectors differ from the model, first: {}",
            actual.len() / SECTOR as usize,
            report.join("; ")
        ))
    }
}

/// "zeros", "pattern lba=L seed=S" or "other data (...)" for a mismatch report.
pub fn describe_sector(sector: &[u8]) -> String {
    if sector.iter().all(|&b| b == 0) {
        return "zeros".to_string();
    }
    let lba = u64::from_le_bytes(sector[..8].try_into().expect("8 bytes"));
    let seed = u64::from_le_bytes(sector[8..16].try_into().expect("8 bytes"));
    let mut check = vec![0u8; sector.len()];
    fill_sector(&mut check, lba, seed);
    if check == sector {
        format!("pattern lba={lba} seed={seed:#x}")
    } else {
        format!("other data (first bytes {:02x?})", &sector[..16])
    }
}

/// Reads the image file after the server stopped and compares it with the model, so that a
/// server that acknowledges writes without making them fails.
pub fn check_file(path: &Path, model: &DiskModel) {
    let data = std::fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    assert_eq!(
        data.len() as u64,
        model.capacity(),
        "image file size differs from the disk capacity"
    );
    if let Err(report) = model.check(0, &data, &format!("image file {}", path.display())) {
        panic!("{report}");
    }
}

/// For ranges whose writes were cut off by a disconnect: every sector of `data` (read from disk
/// byte `offset`) must hold zeros or the pattern of one of `seeds` for its own LBA, never
/// anything else (garbage, or data meant for another place).
pub fn check_old_or_new(data: &[u8], offset: u64, seeds: &[u64], what: &str) {
    let mut candidate = vec![0u8; SECTOR as usize];
    for (index, sector) in data.chunks_exact(SECTOR as usize).enumerate() {
        let lba = offset / SECTOR + index as u64;
        let known = sector.iter().all(|&b| b == 0)
            || seeds.iter().any(|&seed| {
                fill_sector(&mut candidate, lba, seed);
                candidate == sector
            });
        assert!(
            known,
            "{what}: sector {lba} holds {}, neither zeros nor a pattern of seeds {seeds:x?}",
            describe_sector(sector)
        );
    }
}

/// Allocated bytes of a file (st_blocks is in 512-byte units whatever the filesystem).
pub fn allocated_bytes(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("stat {}: {e}", path.display()))
        .blocks()
        * 512
}
