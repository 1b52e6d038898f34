//! The crash model: a simulated split queue driven by a seeded random schedule of pops,
//! out-of-order completions and batched publications, "killed" after every single store the
//! protocol makes (inside `popped` and `after_publish` too), recovered from a copy of the
//! region, the used ring and used idx, and checked against what the guest can see.

use std::fs::File;
use std::os::unix::fs::FileExt;

use super::InflightQueue;
use crate::{region_size, InflightRegion, Recovery};

/// The queue index the model drives; the other queue of the region must stay untouched.
const MODEL_QUEUE: u16 = 1;
const NUM_QUEUES: u16 = 2;

struct Model {
    size: u16,
    file: File,
    queue: InflightQueue,
    /// The avail ring, by free-running position from `start`.
    avail: Vec<u16>,
    /// Avail positions below this are fully popped (marked in the region).
    marked_upto: usize,
    /// Guest-owned heads the guest may offer.
    free: Vec<u16>,
    /// Popped and marked, in pop order, not yet visible on the used ring.
    pending: Vec<u16>,
    /// Submitted, not completed.
    submitted: Vec<u16>,
    /// Completed, waiting for the next batch.
    completed: Vec<u16>,
    used_ring: Vec<u32>,
    /// The used ring's published idx.
    used_idx: u16,
    start: u16,
    crashes: usize,
}

impl Model {
    fn new(size: u16, start: u16) -> Model {
        let (region, file) = InflightRegion::create(NUM_QUEUES, size).unwrap();
        let mut queue = region.queue(MODEL_QUEUE).unwrap();
        let fresh = queue.recover(start, |_| panic!("a fresh queue reads no used ring"));
        assert_eq!(
            fresh,
            Recovery {
                resubmit: vec![],
                next_avail: start
            }
        );
        Model {
            size,
            file,
            queue,
            avail: Vec::new(),
            marked_upto: 0,
            free: (0..size).collect(),
            pending: Vec::new(),
            submitted: Vec::new(),
            completed: Vec::new(),
            used_ring: vec![u32::MAX; usize::from(size)],
            used_idx: start,
            start,
            crashes: 0,
        }
    }

    fn slot(&self, pos: u16) -> usize {
        usize::from(pos % self.size)
    }

    /// Kill here: copy the region into a new sealed memfd, map it as SET_INFLIGHT_FD would,
    /// recover with the guest-visible used ring, and check the outcome.
    fn crash(&mut self) {
        self.crashes += 1;
        let len = region_size(NUM_QUEUES, self.size);
        let mut bytes = vec![0u8; len as usize];
        self.file.read_exact_at(&mut bytes, 0).unwrap();
        let (_, copy) = InflightRegion::create(NUM_QUEUES, self.size).unwrap();
        copy.write_all_at(&bytes, 0).unwrap();
        let region = InflightRegion::map(&copy, 0, len, NUM_QUEUES, self.size).unwrap();

        let used_ring = self.used_ring.clone();
        let read_used = |slot: u16| u16::try_from(used_ring[usize::from(slot)]).ok();
        let mut queue = region.queue(MODEL_QUEUE).unwrap();
        let recovery = queue.recover(self.used_idx, read_used);

        assert_eq!(
            recovery.resubmit, self.pending,
            "resubmit = the popped chains not visible on the used ring, in pop order"
        );
        let expected_next = self.used_idx.wrapping_add(self.pending.len() as u16);
        assert_eq!(recovery.next_avail, expected_next);
        assert_eq!(
            recovery.next_avail,
            self.start.wrapping_add(self.marked_upto as u16),
            "next_avail = the first avail entry not marked, so it is popped again"
        );
        assert_eq!(queue.in_flight(), self.pending.len());

        // Recovering again (a crash during or after recovery) finds the same.
        let mut again = region.queue(MODEL_QUEUE).unwrap();
        assert_eq!(again.recover(self.used_idx, read_used), recovery);
        // The other queue never saw a store.
        let mut other = region.queue(0).unwrap();
        assert_eq!(other.recover(0, |_| None).resubmit, Vec::<u16>::new());

        // New pops count on after the recovered ones: resubmitted heads stay oldest.
        if let Some(free) = (0..self.size).find(|h| !self.pending.contains(h)) {
            queue.popped(free);
            let mut third = region.queue(MODEL_QUEUE).unwrap();
            let mut expected = self.pending.clone();
            expected.push(free);
            assert_eq!(third.recover(self.used_idx, read_used).resubmit, expected);
        }
    }

    fn offer(&mut self, rng: &mut fastrand::Rng) {
        let head = self.free.swap_remove(rng.usize(..self.free.len()));
        self.avail.push(head);
    }

    fn pop(&mut self) {
        let head = self.avail[self.marked_upto];
        self.queue.store_counter(head);
        self.crash();
        self.queue.mark(head);
        self.marked_upto += 1;
        self.pending.push(head);
        self.submitted.push(head);
        self.crash();
    }

    fn complete(&mut self, rng: &mut fastrand::Rng) {
        let head = self.submitted.remove(rng.usize(..self.submitted.len()));
        self.completed.push(head);
    }

    fn publish(&mut self, rng: &mut fastrand::Rng) {
        let count = rng.usize(1..=self.completed.len());
        let batch: Vec<u16> = self.completed.drain(..count).collect();
        for (i, &head) in batch.iter().enumerate() {
            let slot = self.slot(self.used_idx.wrapping_add(i as u16));
            self.used_ring[slot] = u32::from(head);
            self.crash();
        }
        self.queue.before_publish(*batch.last().unwrap());
        self.crash();
        // used->idx published: the guest sees the batch and may offer its heads again.
        self.used_idx = self.used_idx.wrapping_add(count as u16);
        self.pending.retain(|head| !batch.contains(head));
        self.free.extend_from_slice(&batch);
        self.crash();
        for &head in &batch {
            self.queue.clear(head);
            self.crash();
        }
        self.queue.store_used_idx(self.used_idx);
        self.crash();
    }

    /// One random step (one is always possible: every head is free, offered, submitted or
    /// completed).
    fn step(&mut self, rng: &mut fastrand::Rng) {
        loop {
            match rng.u8(..4) {
                0 if !self.free.is_empty() => self.offer(rng),
                1 if self.marked_upto < self.avail.len() => self.pop(),
                2 if !self.submitted.is_empty() => self.complete(rng),
                3 if !self.completed.is_empty() => self.publish(rng),
                _ => continue,
            }
            return;
        }
    }
}

#[test]
fn every_crash_point_recovers_exactly_the_invisible_requests() {
    let mut crashes = 0;
    for seed in 0..120u64 {
        let mut rng = fastrand::Rng::with_seed(seed);
        let size = [1u16, 2, 4, 8, 16][rng.usize(..5)];
        // Some runs start near the u16 wrap of the ring indexes.
        let start = if seed % 3 == 0 {
            u16::MAX - rng.u16(..40)
        } else {
            rng.u16(..)
        };
        let mut model = Model::new(size, start);
        for _ in 0..400 {
            model.step(&mut rng);
        }
        assert!(
            model.used_idx.wrapping_sub(start) > 50,
            "seed {seed}: the schedule published too little"
        );
        crashes += model.crashes;
    }
    assert!(crashes > 50_000, "only {crashes} crash points");
}
