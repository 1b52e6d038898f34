//! The data-integrity workload. The disk is cut into stripes; queue `i` of `n` owns stripes
//! `i, i+n, i+2n, ...` and runs on its own thread, so requests in flight on different queues never
//! overlap and the expected content stays exact while every queue runs at full depth.
//!
//! Per queue: a sequential phase (batches of `depth` adjacent writes covering one stripe,
//! submitted together in ascending or descending order so the server can merge them, then one read
//! of the whole stripe spanning all of them) and a random phase (a window of `depth` requests kept
//! in flight: writes, some extending the previous write, and reads checked against the model).
//! Finally `verify_disk` reads the whole disk in chunks spanning many writes of every queue.

use super::{describe_ret, wait, Client, DiskModel, Rng, SharedBuf};
use blkio::{Blkioq, ReqFlags};

#[derive(Clone, Debug)]
pub struct Params {
    pub logical_block: u64,
    pub stripe: u64,
    /// Requests kept in flight per queue.
    pub depth: usize,
    pub sequential_batches: usize,
    pub random_ops: usize,
    pub seed: u64,
}

impl Params {
    pub fn new(logical_block: u64) -> Params {
        Params {
            logical_block,
            stripe: 128 * 1024,
            depth: 32,
            sequential_batches: 8,
            random_ops: 1500,
            seed: 0x5EED,
        }
    }

    /// Shared memory the workload needs for `queues` queues (and enough for `verify_disk`).
    pub fn buffer_bytes(&self, queues: usize) -> usize {
        let workload = queues * (self.depth + 1) * self.stripe as usize;
        workload.max(queues * VERIFY_DEPTH * VERIFY_CHUNK)
    }
}

const VERIFY_DEPTH: usize = 8;
const VERIFY_CHUNK: usize = 256 * 1024;

/// Runs the workload on every queue of `client` at once and returns what the disk must hold.
pub fn run(client: &mut Client, params: &Params) -> DiskModel {
    let capacity = client.capacity();
    let queue_count = client.queues.len();
    assert_eq!(
        capacity % params.stripe,
        0,
        "capacity not a whole number of stripes"
    );
    assert!(params.stripe / params.depth as u64 >= params.logical_block);
    assert!(
        client.buf.len() >= params.buffer_bytes(queue_count),
        "shared buffer too small"
    );
    let buf = &client.buf;
    let models: Vec<DiskModel> = std::thread::scope(|scope| {
        let runs: Vec<_> = client
            .queues
            .iter_mut()
            .enumerate()
            .map(|(index, queue)| {
                let run = QueueRun {
                    queue,
                    buf,
                    buf_base: index * (params.depth + 1) * params.stripe as usize,
                    index,
                    queue_count,
                    stripes: capacity / params.stripe,
                    params,
                    model: DiskModel::new(capacity),
                    rng: Rng::new(params.seed ^ (index as u64 + 1).rotate_left(40)),
                    writes: 0,
                };
                scope.spawn(move || run.run())
            })
            .collect();
        runs.into_iter()
            .map(|run| {
                run.join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
            })
            .collect()
    });
    let mut model = DiskModel::new(capacity);
    for queue_model in &models {
        model.absorb(queue_model);
    }
    model
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    Read,
    Write,
}

#[derive(Clone, Copy, Debug)]
struct Op {
    kind: Kind,
    offset: u64,
    len: u64,
    seed: u64,
}

impl Op {
    fn overlaps(&self, other: &Op) -> bool {
        self.offset < other.offset + other.len && other.offset < self.offset + self.len
    }
}

struct QueueRun<'a> {
    queue: &'a mut Blkioq,
    buf: &'a SharedBuf,
    /// This queue's part of the shared buffer: `depth` request slots, then one stripe for reads.
    buf_base: usize,
    index: usize,
    queue_count: usize,
    stripes: u64,
    params: &'a Params,
    model: DiskModel,
    rng: Rng,
    writes: u64,
}

impl QueueRun<'_> {
    fn run(mut self) -> DiskModel {
        self.sequential_phase();
        self.random_phase();
        self.model
    }

    fn slot_offset(&self, slot: usize) -> usize {
        self.buf_base + slot * self.params.stripe as usize
    }

    /// Unique per queue and write; never 0 (0 means zeros in the model).
    fn next_seed(&mut self) -> u64 {
        self.writes += 1;
        ((self.index as u64 + 1) << 48) | self.writes
    }

    fn owned_stripes(&self) -> u64 {
        (self.stripes - self.index as u64).div_ceil(self.queue_count as u64)
    }

    fn submit(&mut self, slot: usize, op: &Op) {
        let ptr = self.buf.ptr(self.slot_offset(slot), op.len as usize);
        match op.kind {
            Kind::Write => {
                let mut data = vec![0u8; op.len as usize];
                super::fill_pattern(&mut data, op.offset, op.seed);
                self.buf.copy_in(self.slot_offset(slot), &data);
                self.queue
                    .write(op.offset, ptr, op.len as usize, slot, ReqFlags::empty());
            }
            Kind::Read => {
                // Poison first so a read that "succeeds" without filling the buffer is caught.
                self.buf.fill(self.slot_offset(slot), op.len as usize, 0xA5);
                self.queue
                    .read(op.offset, ptr, op.len as usize, slot, ReqFlags::empty());
            }
        }
    }

    /// Handles one completion of a request in `slots`.
    fn complete(&mut self, slots: &mut [Option<Op>], user_data: usize, ret: i32) {
        let op = slots
            .get_mut(user_data)
            .and_then(Option::take)
            .unwrap_or_else(|| {
                panic!(
                    "queue {}: completion for unknown request {user_data}",
                    self.index
                )
            });
        assert_eq!(
            ret,
            0,
            "queue {}: {:?} of {} bytes at {} failed: {}",
            self.index,
            op.kind,
            op.len,
            op.offset,
            describe_ret(ret)
        );
        match op.kind {
            Kind::Write => self.model.write(op.offset, op.len, op.seed),
            Kind::Read => {
                let data = self
                    .buf
                    .copy_out(self.slot_offset(user_data), op.len as usize);
                let what = format!(
                    "queue {} read of {} bytes at {}",
                    self.index, op.len, op.offset
                );
                if let Err(report) = self.model.check(op.offset, &data, &what) {
                    panic!("{report}");
                }
            }
        }
    }

    fn sequential_phase(&mut self) {
        let depth = self.params.depth;
        let chunk = self.params.stripe / depth as u64;
        for batch in 0..self.params.sequential_batches {
            let stripe = (self.index + batch * self.queue_count) as u64;
            assert!(
                stripe < self.stripes,
                "disk too small for the sequential phase"
            );
            let base = stripe * self.params.stripe;
            let mut slots: Vec<Option<Op>> = vec![None; depth];
            let order: Vec<usize> = if batch % 2 == 0 {
                (0..depth).collect()
            } else {
                (0..depth).rev().collect()
            };
            for slot in order {
                let op = Op {
                    kind: Kind::Write,
                    offset: base + slot as u64 * chunk,
                    len: chunk,
                    seed: self.next_seed(),
                };
                self.submit(slot, &op);
                slots[slot] = Some(op);
            }
            self.drain(&mut slots);

            // One read spanning the whole batch, through the spare slot after the request slots.
            let read = Op {
                kind: Kind::Read,
                offset: base,
                len: self.params.stripe,
                seed: 0,
            };
            let mut read_slots: Vec<Option<Op>> = vec![None; depth + 1];
            self.submit(depth, &read);
            read_slots[depth] = Some(read);
            self.drain(&mut read_slots);
        }
    }

    fn drain(&mut self, slots: &mut [Option<Op>]) {
        while slots.iter().any(Option::is_some) {
            for done in wait(self.queue, 1) {
                self.complete(slots, done.user_data, done.ret);
            }
        }
    }

    fn random_phase(&mut self) {
        let depth = self.params.depth;
        let mut slots: Vec<Option<Op>> = vec![None; depth];
        let mut submitted = 0;
        let mut deepest = 0;
        let mut last_write: Option<Op> = None;
        loop {
            for slot in 0..depth {
                if slots[slot].is_none() && submitted < self.params.random_ops {
                    let op = self.pick(&slots, last_write);
                    if op.kind == Kind::Write {
                        last_write = Some(op);
                    }
                    self.submit(slot, &op);
                    slots[slot] = Some(op);
                    submitted += 1;
                }
            }
            let in_flight = slots.iter().filter(|slot| slot.is_some()).count();
            if in_flight == 0 {
                break;
            }
            deepest = deepest.max(in_flight);
            for done in wait(self.queue, 1) {
                self.complete(&mut slots, done.user_data, done.ret);
            }
        }
        assert_eq!(
            deepest, depth,
            "queue {} never reached depth {depth}",
            self.index
        );
    }

    /// A random request inside one of this queue's stripes that does not conflict with the
    /// requests in flight (a write overlaps nothing in flight, a read no write in flight).
    fn pick(&mut self, in_flight: &[Option<Op>], last_write: Option<Op>) -> Op {
        let lbs = self.params.logical_block;
        let blocks_per_stripe = self.params.stripe / lbs;
        let max_blocks = blocks_per_stripe.min(32);
        for _ in 0..10_000 {
            let kind = if self.rng.below(10) < 7 {
                Kind::Write
            } else {
                Kind::Read
            };
            let len = (1 + self.rng.below(max_blocks)) * lbs;
            // A quarter of the writes continue right after the previous one, when it fits in
            // the same stripe, so that contiguous writes are in flight together.
            let follow = last_write.filter(|prev| {
                let end = prev.offset + prev.len;
                kind == Kind::Write
                    && self.rng.below(4) == 0
                    && (end - 1) / self.params.stripe == (end + len - 1) / self.params.stripe
            });
            let offset = match follow {
                Some(prev) => prev.offset + prev.len,
                None => {
                    let stripe = self.index as u64
                        + self.queue_count as u64 * self.rng.below(self.owned_stripes());
                    let start_block = self.rng.below(blocks_per_stripe - len / lbs + 1);
                    stripe * self.params.stripe + start_block * lbs
                }
            };
            let seed = if kind == Kind::Write {
                self.next_seed()
            } else {
                0
            };
            let op = Op {
                kind,
                offset,
                len,
                seed,
            };
            let conflict = in_flight.iter().flatten().any(|other| {
                (op.kind == Kind::Write || other.kind == Kind::Write) && op.overlaps(other)
            });
            if !conflict {
                return op;
            }
        }
        panic!("queue {}: found no request free of conflicts", self.index);
    }
}

/// Reads the whole disk in chunks that span stripes of every queue, `VERIFY_DEPTH` in flight per
/// queue on all queues, and compares with `model`.
pub fn verify_disk(client: &mut Client, model: &DiskModel) {
    let capacity = client.capacity();
    assert_eq!(capacity, model.capacity());
    let chunk = VERIFY_CHUNK as u64;
    assert_eq!(capacity % chunk, 0);
    let chunks = capacity / chunk;
    let queue_count = client.queues.len();
    assert!(client.buf.len() >= queue_count * VERIFY_DEPTH * VERIFY_CHUNK);
    let mut next = 0u64;
    while next < chunks {
        let mut submitted: Vec<Vec<(usize, u64)>> = vec![Vec::new(); queue_count];
        for (queue_index, queue) in client.queues.iter_mut().enumerate() {
            for slot in 0..VERIFY_DEPTH {
                if next == chunks {
                    break;
                }
                let buf_offset = (queue_index * VERIFY_DEPTH + slot) * VERIFY_CHUNK;
                client.buf.fill(buf_offset, VERIFY_CHUNK, 0xA5);
                let ptr = client.buf.ptr(buf_offset, VERIFY_CHUNK);
                queue.read(next * chunk, ptr, VERIFY_CHUNK, slot, ReqFlags::empty());
                submitted[queue_index].push((slot, next * chunk));
                next += 1;
            }
        }
        for (queue_index, queue) in client.queues.iter_mut().enumerate() {
            let mut pending = submitted[queue_index].len();
            while pending > 0 {
                for done in wait(queue, 1) {
                    let offset = submitted[queue_index]
                        .iter()
                        .find(|(slot, _)| *slot == done.user_data)
                        .map(|(_, offset)| *offset)
                        .unwrap_or_else(|| {
                            panic!("completion for unknown read {}", done.user_data)
                        });
                    assert_eq!(
                        done.ret,
                        0,
                        "verification read of {VERIFY_CHUNK} bytes at {offset}: {}",
                        describe_ret(done.ret)
                    );
                    let buf_offset = (queue_index * VERIFY_DEPTH + done.user_data) * VERIFY_CHUNK;
                    let data = client.buf.copy_out(buf_offset, VERIFY_CHUNK);
                    let what = format!("verification read at {offset} (queue {queue_index})");
                    if let Err(report) = model.check(offset, &data, &what) {
                        panic!("{report}");
                    }
                    pending -= 1;
                }
            }
        }
    }
}
