//! Flush ordering, per queue: a FLUSH goes to the kernel once every write-type request
//! (write, discard, write-zeroes) that its queue enqueued before it has completed, and waits
//! for nothing else. An IOSQE_IO_DRAIN would instead hold back every later SQE of the ring,
//! from all of the iothread's queues, for the whole fdatasync.

/// Per-queue sequence of write-type requests and the flushes waiting on them.
pub(crate) struct FlushOrder {
    queues: Vec<QueueWrites>,
    waiting: Vec<WaitingFlush>,
}

#[derive(Clone, Copy, Default)]
struct QueueWrites {
    /// Sequence number the next write-type request of the queue gets.
    next_seq: u64,
    /// Write-type requests enqueued and not yet completed.
    outstanding: u32,
}

struct WaitingFlush {
    /// The flush request (a key into the engine's in-flight table).
    key: usize,
    queue: u16,
    /// Writes with a lower sequence number came before the flush.
    seq: u64,
    /// How many of those are still in flight.
    ahead: u32,
    /// The flush reached submission: it goes to the ring as soon as `ahead` is 0.
    released: bool,
}

impl FlushOrder {
    pub(crate) fn new(num_queues: usize) -> FlushOrder {
        FlushOrder {
            queues: vec![QueueWrites::default(); num_queues],
            waiting: Vec::new(),
        }
    }

    /// A write-type request of `queue` was enqueued: its sequence number.
    pub(crate) fn write_enqueued(&mut self, queue: u16) -> u64 {
        let Some(q) = self.queues.get_mut(queue as usize) else {
            return 0;
        };
        q.outstanding += 1;
        q.next_seq += 1;
        q.next_seq - 1
    }

    /// A flush of `queue` was enqueued: it must follow the writes now outstanding there.
    pub(crate) fn flush_enqueued(&mut self, key: usize, queue: u16) {
        let Some(q) = self.queues.get(queue as usize) else {
            return;
        };
        if q.outstanding > 0 {
            self.waiting.push(WaitingFlush {
                key,
                queue,
                seq: q.next_seq,
                ahead: q.outstanding,
                released: false,
            });
        }
    }

    /// The flush reached submission: true if it may go to the ring now, else it is issued
    /// through [`FlushOrder::write_completed`] later.
    pub(crate) fn release(&mut self, key: usize) -> bool {
        match self.waiting.iter().position(|w| w.key == key) {
            None => true,
            Some(i) if self.waiting[i].ahead == 0 => {
                self.waiting.swap_remove(i);
                true
            }
            Some(i) => {
                self.waiting[i].released = true;
                false
            }
        }
    }

    /// A write-type request of `queue` with sequence number `seq` completed; flushes now free
    /// to go are appended to `ready`.
    pub(crate) fn write_completed(&mut self, queue: u16, seq: u64, ready: &mut Vec<usize>) {
        if let Some(q) = self.queues.get_mut(queue as usize) {
            q.outstanding = q.outstanding.saturating_sub(1);
        }
        if self.waiting.is_empty() {
            return;
        }
        let mut i = 0;
        while i < self.waiting.len() {
            let w = &mut self.waiting[i];
            if w.queue == queue && seq < w.seq {
                w.ahead -= 1;
            }
            if w.ahead == 0 && w.released {
                ready.push(w.key);
                self.waiting.swap_remove(i);
            } else {
                i += 1;
            }
        }
    }

    /// Flushes held back for earlier writes.
    pub(crate) fn waiting(&self) -> usize {
        self.waiting.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flush_waits_for_earlier_writes_of_its_queue_only() {
        let mut o = FlushOrder::new(2);
        let w0 = o.write_enqueued(0);
        let w1 = o.write_enqueued(0);
        let other = o.write_enqueued(1);
        o.flush_enqueued(100, 0);
        let later = o.write_enqueued(0);
        assert!(!o.release(100), "two writes of queue 0 are ahead");
        let mut ready = Vec::new();
        o.write_completed(1, other, &mut ready);
        o.write_completed(0, later, &mut ready);
        o.write_completed(0, w0, &mut ready);
        assert!(ready.is_empty(), "one earlier write is still in flight");
        o.write_completed(0, w1, &mut ready);
        assert_eq!(ready, [100]);
        assert_eq!(o.waiting(), 0);
    }

    #[test]
    fn a_flush_with_nothing_ahead_goes_at_once() {
        let mut o = FlushOrder::new(1);
        o.flush_enqueued(7, 0);
        assert!(o.release(7));
    }

    #[test]
    fn writes_done_before_submission_leave_the_flush_free_to_go() {
        let mut o = FlushOrder::new(1);
        let w = o.write_enqueued(0);
        o.flush_enqueued(7, 0);
        let mut ready = Vec::new();
        o.write_completed(0, w, &mut ready);
        assert!(ready.is_empty(), "not released yet: submit issues it");
        assert!(o.release(7));
        assert_eq!(o.waiting(), 0);
    }
}
