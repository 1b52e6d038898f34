//! Shared by the engine's loop-device tests: a loop device over a temporary file (root and
//! losetup needed: SKIPPED otherwise, a failure under CI=true), guest-like buffers, and
//! requests built by hand and run through a real engine.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use blk_proto::{Range, RequestKind, VIRTIO_BLK_ID_BYTES};
use engine::{BlockDiscard, Engine, EngineConfig, MergeLimits, RingSetup, DEFAULT_BOUNCE_BUDGET};

/// Prints why a test cannot run and returns; under CI a missing prerequisite is a failure.
pub fn skip(reason: &str) {
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("prerequisite missing under CI: {reason}");
    }
    eprintln!("SKIPPED: {reason}");
}

/// A loop device over a sparse temporary file, detached on drop.
pub struct LoopDevice {
    pub dev: PathBuf,
    pub backing: PathBuf,
    _dir: tempfile::TempDir,
}

impl LoopDevice {
    /// None (after `skip`) where losetup is missing or may not attach a device.
    pub fn new(size: u64, sector_size: Option<u32>) -> Option<LoopDevice> {
        let dir = tempfile::tempdir().expect("temporary directory");
        let backing = dir.path().join("backing.img");
        std::fs::File::create(&backing)
            .and_then(|f| f.set_len(size))
            .expect("backing file");
        let mut cmd = Command::new("losetup");
        if let Some(s) = sector_size {
            cmd.arg("--sector-size").arg(s.to_string());
        }
        cmd.arg("-f").arg("--show").arg(&backing);
        let out = match cmd.output() {
            Ok(o) => o,
            Err(e) => {
                skip(&format!("losetup cannot run: {e}"));
                return None;
            }
        };
        if !out.status.success() {
            skip(&format!(
                "losetup cannot attach a loop device (root needed): {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
            return None;
        }
        let dev = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        Some(LoopDevice {
            dev,
            backing,
            _dir: dir,
        })
    }

    /// /sys/block/loopN/stat: (sectors written, sectors discarded), in 512-byte sectors.
    pub fn write_and_discard_sectors(&self) -> (u64, u64) {
        let name = self.dev.file_name().expect("device name").to_string_lossy();
        let stat = std::fs::read_to_string(format!("/sys/block/{name}/stat")).expect("stat");
        let f: Vec<u64> = stat
            .split_whitespace()
            .map(|x| x.parse().expect("number"))
            .collect();
        // Fields: reads (4), writes (4), in flight, io ticks, queue time, discards (4), ...
        (f[6], f[13])
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.dev).status();
    }
}

pub fn config(bounce_budget: usize) -> EngineConfig {
    let mut serial = [0u8; VIRTIO_BLK_ID_BYTES];
    serial[..4].copy_from_slice(b"test");
    EngineConfig {
        max_requests: 128,
        max_iovecs_per_request: 64,
        max_ranges_per_request: 4,
        merge: MergeLimits::default(),
        serial,
        num_queues: 1,
        writeback: Arc::new(AtomicBool::new(true)),
        submit_batch: 0,
        ring_setup: RingSetup::Auto,
        ring_entries: 0,
        cpu: None,
        iowq_max_workers: 0,
        fixed_buffers: false,
        bounce_budget,
        block_discard: BlockDiscard::Auto,
    }
}

pub fn default_config() -> EngineConfig {
    config(DEFAULT_BOUNCE_BUDGET)
}

/// Page-aligned memory standing in for guest RAM; buffers are carved out at any offset.
pub struct Memory {
    mem: Vec<u8>,
    base: usize,
}

impl Memory {
    pub fn new(len: usize) -> Memory {
        let mem = vec![0u8; len + 4096];
        let base = (4096 - mem.as_ptr() as usize % 4096) % 4096;
        Memory { mem, base }
    }

    pub fn bytes(&mut self, off: usize, len: usize) -> &mut [u8] {
        &mut self.mem[self.base + off..self.base + off + len]
    }

    pub fn iovec(&mut self, off: usize, len: usize) -> libc::iovec {
        libc::iovec {
            iov_base: self.bytes(off, len).as_mut_ptr().cast(),
            iov_len: len,
        }
    }
}

/// One status byte per request, kept apart from the data.
pub struct Statuses(pub Vec<u8>);

impl Statuses {
    pub fn new(n: usize) -> Statuses {
        Statuses(vec![0xff; n])
    }
}

/// Enqueues a read or write of `segments` (offset into `mem`, length) at `sector`.
pub fn enqueue_rw(
    e: &mut Engine,
    kind: RequestKind,
    sector: u64,
    mem: &mut Memory,
    segments: &[(usize, usize)],
    status: &mut u8,
    head: u16,
) {
    let mut r = e.take_request().expect("a pooled request");
    r.kind = kind;
    r.sector = sector;
    for &(off, len) in segments {
        r.iovecs.push(mem.iovec(off, len));
        r.data_len += len as u32;
    }
    *status = 0xff;
    r.status = status as *mut u8;
    r.used_len = 1;
    e.enqueue(r, 0, head);
}

/// Enqueues a discard or write-zeroes of one range.
pub fn enqueue_range(e: &mut Engine, kind: RequestKind, range: Range, status: &mut u8, head: u16) {
    let mut r = e.take_request().expect("a pooled request");
    r.kind = kind;
    r.ranges.push(range);
    *status = 0xff;
    r.status = status as *mut u8;
    r.used_len = 1;
    e.enqueue(r, 0, head);
}

/// Submits and waits until everything in flight has completed; returns how many did.
pub fn run(e: &mut Engine) -> usize {
    e.wait_idle(Duration::from_secs(20))
        .expect("every request completes");
    e.take_completions().count()
}

/// Bytes at `offset` of a file or device, read without O_DIRECT.
pub fn read_at(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(path).expect("open for reading");
    let mut v = vec![0; len];
    f.read_exact_at(&mut v, offset).expect("read");
    v
}

pub fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| seed.wrapping_mul(31).wrapping_add((i * 7 + i / 4096) as u8))
        .collect()
}
