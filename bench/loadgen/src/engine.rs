//! Drives a vhost-user-blk server through libblkio's `virtio-blk-vhost-user` driver: one thread
//! per virtqueue keeps `iodepth` requests in flight, timing each from submission to completion.

use std::ffi::CStr;
use std::io::Write;
use std::mem::MaybeUninit;
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use blkio::{Blkio, Blkioq, Completion, ReqFlags};
use hdrhistogram::Histogram;

use crate::offsets::OffsetGenerator;
use crate::report::{rates, LatencySummary, LoadgenReport};
use crate::spec::{CompletionMode, JobSpec};
use crate::LoadgenError;

const DRIVER: &str = "virtio-blk-vhost-user";
/// A server that completes nothing for this long is considered hung; the run fails.
const STALL_TIMEOUT: Duration = Duration::from_secs(15);
/// Latencies above this are clamped (a 60 s I/O is already a failure in all but name).
const MAX_TRACKED_LATENCY_NS: u64 = 60_000_000_000;
/// Byte the write buffers are filled with, so that writes never carry all-zero blocks that a
/// backend could detect and skip.
const WRITE_PATTERN: u8 = 0x5a;

/// Marker lines on stderr around the measured window; the harness samples the server's CPU time
/// when it reads them.
pub const PHASE_MEASURE_START: &str = "uringblk-loadgen: phase measure-start";
pub const PHASE_MEASURE_END: &str = "uringblk-loadgen: phase measure-end";

/// What one queue thread counted inside the measured window.
struct QueueOutcome {
    hist: Histogram<u64>,
    reads: u64,
    writes: u64,
    read_bytes: u64,
    write_bytes: u64,
    errors: u64,
    first_error: Option<String>,
}

/// Per-queue inputs: which queue, where its buffers are, and the shared clock.
struct QueueContext<'a> {
    index: u32,
    /// Address of this queue's `iodepth * block_size` bytes inside the mapped memory region.
    buffers: usize,
    region_size: u64,
    spec: &'a JobSpec,
    ramp_end: Instant,
    end: Instant,
}

#[derive(Clone, Copy)]
struct InFlight {
    submitted: Instant,
    is_read: bool,
    offset: u64,
}

fn blkio_err(context: &'static str) -> impl FnOnce(blkio::Error) -> LoadgenError {
    move |source| LoadgenError::Blkio { context, source }
}

/// Connects to `socket`, runs `spec`, and returns what was measured. I/O failures do not return
/// `Err`: they are counted in the report (`errors`, `first_error`) and stop new submissions.
pub fn run(
    socket: &Path,
    spec: &JobSpec,
    phase_markers: bool,
) -> Result<LoadgenReport, LoadgenError> {
    spec.validate()?;
    let socket_str = socket
        .to_str()
        .ok_or_else(|| LoadgenError::InvalidArgument("socket path is not UTF-8".into()))?;

    let mut blkio = Blkio::new(DRIVER).map_err(blkio_err("creating the libblkio instance"))?;
    blkio
        .set_str("path", socket_str)
        .map_err(blkio_err("setting the socket path"))?;
    blkio
        .connect()
        .map_err(blkio_err("connecting to the vhost-user socket"))?;

    let capacity = blkio
        .get_u64("capacity")
        .map_err(blkio_err("reading the capacity"))?;
    let region_size = match spec.region_size {
        Some(size) if size > capacity => {
            return Err(LoadgenError::InvalidArgument(format!(
                "--size {size} exceeds the device capacity {capacity}"
            )))
        }
        Some(size) => size,
        None => capacity,
    };
    check_device_limits(&blkio, spec)?;

    let queues = i32::try_from(spec.queues)
        .map_err(|_| LoadgenError::InvalidArgument("too many queues".into()))?;
    let (blocking, polling) = match spec.completion {
        CompletionMode::Blocking => (queues, 0),
        CompletionMode::Poll => (0, queues),
    };
    blkio
        .set_i32("num-queues", blocking)
        .map_err(blkio_err("setting num-queues"))?;
    blkio
        .set_i32("num-poll-queues", polling)
        .map_err(blkio_err("setting num-poll-queues"))?;
    let started = blkio.start().map_err(blkio_err("starting the device"))?;
    let queue_handles = match spec.completion {
        CompletionMode::Blocking => started.queues,
        CompletionMode::Poll => started.poll_queues,
    };

    // One shared-memory region holds every queue's buffers; the server maps it at start.
    let per_queue = buffer_bytes_per_queue(spec)?;
    let alignment = blkio
        .get_u64("mem-region-alignment")
        .map_err(blkio_err("reading mem-region-alignment"))?
        .max(1);
    let total = per_queue
        .checked_mul(u64::from(spec.queues))
        .and_then(|t| t.checked_next_multiple_of(alignment))
        .and_then(|t| usize::try_from(t).ok())
        .ok_or_else(|| LoadgenError::InvalidArgument("buffers too large".into()))?;
    let region = blkio
        .alloc_mem_region(total)
        .map_err(blkio_err("allocating the buffer region"))?;
    blkio
        .map_mem_region(&region)
        .map_err(blkio_err("mapping the buffer region"))?;
    // SAFETY: `region` is a fresh `total`-byte read-write shared mapping owned by `blkio`, which
    // outlives this slice; no request is in flight yet, so nothing else accesses it.
    unsafe { std::slice::from_raw_parts_mut(region.addr as *mut u8, total) }.fill(WRITE_PATTERN);

    let start = Instant::now();
    let ramp_end = start + spec.ramp;
    let end = ramp_end + spec.runtime;
    let outcomes = thread::scope(|scope| {
        let workers: Vec<_> = queue_handles
            .into_iter()
            .enumerate()
            .map(|(index, mut queue)| {
                let ctx = QueueContext {
                    index: index as u32,
                    buffers: region.addr + index * per_queue as usize,
                    region_size,
                    spec,
                    ramp_end,
                    end,
                };
                scope.spawn(move || run_queue(&mut queue, &ctx))
            })
            .collect();
        if phase_markers {
            announce_phase_at(ramp_end, PHASE_MEASURE_START);
            announce_phase_at(end, PHASE_MEASURE_END);
        }
        workers
            .into_iter()
            .map(|w| w.join().map_err(|_| LoadgenError::WorkerPanicked)?)
            .collect::<Result<Vec<_>, _>>()
    })?;
    let window = end.saturating_duration_since(ramp_end).as_secs_f64();
    summarize(socket_str, spec, capacity, region_size, window, outcomes)
}

fn check_device_limits(blkio: &Blkio, spec: &JobSpec) -> Result<(), LoadgenError> {
    let alignment = blkio
        .get_i32("request-alignment")
        .map_err(blkio_err("reading request-alignment"))?;
    if alignment > 0 && spec.block_size % alignment as u64 != 0 {
        return Err(LoadgenError::InvalidArgument(format!(
            "block size {} is not a multiple of the device's block size {alignment}",
            spec.block_size
        )));
    }
    let max_transfer = blkio
        .get_i32("max-transfer")
        .map_err(blkio_err("reading max-transfer"))?;
    if max_transfer > 0 && spec.block_size > max_transfer as u64 {
        return Err(LoadgenError::InvalidArgument(format!(
            "block size {} exceeds the device's max transfer {max_transfer}",
            spec.block_size
        )));
    }
    let max_queues = blkio
        .get_i32("max-queues")
        .map_err(blkio_err("reading max-queues"))?;
    if i64::from(spec.queues) > i64::from(max_queues) {
        return Err(LoadgenError::InvalidArgument(format!(
            "{} queues requested, the server offers {max_queues}",
            spec.queues
        )));
    }
    Ok(())
}

fn buffer_bytes_per_queue(spec: &JobSpec) -> Result<u64, LoadgenError> {
    spec.block_size
        .checked_mul(u64::from(spec.iodepth))
        .ok_or_else(|| LoadgenError::InvalidArgument("iodepth * block size overflows".into()))
}

fn announce_phase_at(when: Instant, marker: &str) {
    let now = Instant::now();
    if when > now {
        thread::sleep(when - now);
    }
    let mut stderr = std::io::stderr().lock();
    // A closed stderr only loses the marker; the measurement itself is unaffected.
    let _ = writeln!(stderr, "{marker}");
    let _ = stderr.flush();
}

fn run_queue(queue: &mut Blkioq, ctx: &QueueContext<'_>) -> Result<QueueOutcome, LoadgenError> {
    let spec = ctx.spec;
    if !spec.cpus.is_empty() {
        let cpu = spec.cpus[ctx.index as usize % spec.cpus.len()];
        if !core_affinity::set_for_current(core_affinity::CoreId { id: cpu }) {
            return Err(LoadgenError::Pin(cpu));
        }
    }
    let mut offsets = OffsetGenerator::new(
        spec.pattern.is_random(),
        ctx.region_size,
        spec.block_size,
        ctx.index,
        spec.queues,
        spec.seed,
    )?;
    let read_percent = spec.pattern.read_percentage(spec.rwmixread);
    let block_size = spec.block_size as usize;
    let depth = spec.iodepth as usize;
    let mut outcome = QueueOutcome {
        hist: Histogram::new_with_bounds(1, MAX_TRACKED_LATENCY_NS, 3)
            .map_err(|e| LoadgenError::Histogram(e.to_string()))?,
        reads: 0,
        writes: 0,
        read_bytes: 0,
        write_bytes: 0,
        errors: 0,
        first_error: None,
    };

    let mut slots: Vec<InFlight> = Vec::with_capacity(depth);
    let mut submit = |queue: &mut Blkioq, slot: usize, slots: &mut Vec<InFlight>| {
        let offset = offsets.next_offset();
        let is_read = offsets.roll_read(read_percent);
        let buf = (ctx.buffers + slot * block_size) as *mut u8;
        let io = InFlight {
            submitted: Instant::now(),
            is_read,
            offset,
        };
        if slot < slots.len() {
            slots[slot] = io;
        } else {
            slots.push(io);
        }
        // The slot's buffer lies inside the mapped region and is reused only after this
        // request's completion has been reaped.
        if is_read {
            queue.read(offset, buf, block_size, slot, ReqFlags::empty());
        } else {
            queue.write(offset, buf, block_size, slot, ReqFlags::empty());
        }
    };

    for slot in 0..depth {
        submit(queue, slot, &mut slots);
    }
    let mut in_flight = depth;
    let mut completions: Vec<MaybeUninit<Completion>> =
        (0..depth).map(|_| MaybeUninit::uninit()).collect();

    while in_flight > 0 {
        let mut timeout = STALL_TIMEOUT;
        let reaped = queue
            .do_io(&mut completions, 1, Some(&mut timeout), None)
            .map_err(|source| LoadgenError::Stalled {
                queue: ctx.index,
                in_flight,
                source,
            })?;
        let now = Instant::now();
        for entry in completions.iter().take(reaped.min(depth)) {
            // SAFETY: do_io() initialised the first `reaped` entries.
            let completion = unsafe { entry.assume_init_read() };
            let slot = completion.user_data;
            let Some(io) = slots.get(slot).copied() else {
                return Err(LoadgenError::UnknownCompletion(slot));
            };
            in_flight -= 1;
            if completion.ret != 0 {
                outcome.errors += 1;
                if outcome.first_error.is_none() {
                    outcome.first_error = Some(describe_failure(ctx.index, &io, spec, &completion));
                }
            } else if now >= ctx.ramp_end && now < ctx.end {
                let latency = now.saturating_duration_since(io.submitted).as_nanos();
                outcome
                    .hist
                    .saturating_record(u64::try_from(latency).unwrap_or(u64::MAX).max(1));
                if io.is_read {
                    outcome.reads += 1;
                    outcome.read_bytes += spec.block_size;
                } else {
                    outcome.writes += 1;
                    outcome.write_bytes += spec.block_size;
                }
            }
            // After the first failure nothing new is submitted: the run is already failed.
            if now < ctx.end && outcome.errors == 0 {
                submit(queue, slot, &mut slots);
                in_flight += 1;
            }
        }
    }
    Ok(outcome)
}

fn describe_failure(queue: u32, io: &InFlight, spec: &JobSpec, completion: &Completion) -> String {
    let message = if completion.error_msg.is_null() {
        String::new()
    } else {
        // SAFETY: libblkio sets `error_msg` either to null or to a NUL-terminated static string.
        let text = unsafe { CStr::from_ptr(completion.error_msg) };
        format!(": {}", text.to_string_lossy())
    };
    format!(
        "queue {queue}: {} of {} bytes at offset {} failed with {}{message}",
        if io.is_read { "read" } else { "write" },
        spec.block_size,
        io.offset,
        std::io::Error::from_raw_os_error(completion.ret.saturating_neg()),
    )
}

fn summarize(
    socket: &str,
    spec: &JobSpec,
    capacity: u64,
    region_size: u64,
    window_s: f64,
    outcomes: Vec<QueueOutcome>,
) -> Result<LoadgenReport, LoadgenError> {
    let mut hist = Histogram::<u64>::new_with_bounds(1, MAX_TRACKED_LATENCY_NS, 3)
        .map_err(|e| LoadgenError::Histogram(e.to_string()))?;
    let (mut reads, mut writes, mut read_bytes, mut write_bytes, mut errors) = (0, 0, 0, 0, 0);
    let mut first_error = None;
    let mut per_queue_ios = Vec::with_capacity(outcomes.len());
    for outcome in outcomes {
        hist.add(&outcome.hist)
            .map_err(|e| LoadgenError::Histogram(format!("{e:?}")))?;
        reads += outcome.reads;
        writes += outcome.writes;
        read_bytes += outcome.read_bytes;
        write_bytes += outcome.write_bytes;
        errors += outcome.errors;
        per_queue_ios.push(outcome.reads + outcome.writes);
        if first_error.is_none() {
            first_error = outcome.first_error;
        }
    }
    let (iops, mib_per_s) = rates(reads + writes, read_bytes + write_bytes, window_s);
    Ok(LoadgenReport {
        socket: socket.to_string(),
        rw: spec.pattern.to_string(),
        rwmixread: spec.pattern.read_percentage(spec.rwmixread),
        block_size: spec.block_size,
        iodepth: spec.iodepth,
        queues: spec.queues,
        completion: spec.completion.to_string(),
        capacity_bytes: capacity,
        region_bytes: region_size,
        ramp_s: spec.ramp.as_secs_f64(),
        runtime_s: window_s,
        reads,
        writes,
        read_bytes,
        write_bytes,
        iops,
        mib_per_s,
        latency: LatencySummary::from_histogram(&hist),
        per_queue_ios,
        errors,
        first_error,
    })
}
