//! Aligned bounce buffers for O_DIRECT requests whose guest buffers miss the DIO alignment:
//! a write is gathered into one before it goes out, a read scattered out of one after.
//!
//! The buffers come from a per-iothread budget ([`BouncePool`]): what is lent out plus what is
//! kept idle never exceeds it, except for one request larger than the whole budget, which is
//! served alone (nothing else lent). A request that does not fit waits in the engine, oldest
//! first, and is issued when a bounced op completes and gives its buffer back; something is
//! always lent out while a request waits, so that completion always comes. An allocation the
//! system refuses fails that request with IOERR.

use std::alloc::Layout;
use std::collections::VecDeque;
use std::ptr::NonNull;

use blk_proto::{Request, RequestKind, VIRTIO_BLK_S_IOERR};

use crate::iovec::copy_to_iovecs;
use crate::storage::IoKind;
use crate::Engine;

/// An aligned buffer for O_DIRECT requests whose guest buffers miss the DIO alignment.
pub(crate) struct BounceBuffer {
    pub(crate) ptr: NonNull<u8>,
    pub(crate) layout: Layout,
}

impl BounceBuffer {
    /// None when `len` cannot be laid out at `align` or the allocator has no memory for it.
    fn alloc(len: usize, align: usize) -> Option<BounceBuffer> {
        let layout = Layout::from_size_align(len.max(1), align).ok()?;
        // SAFETY: the layout has a non-zero size; a null result is checked below.
        let ptr = unsafe { std::alloc::alloc(layout) };
        NonNull::new(ptr).map(|ptr| BounceBuffer { ptr, layout })
    }

    pub(crate) fn capacity(&self) -> usize {
        self.layout.size()
    }
}

impl Drop for BounceBuffer {
    fn drop(&mut self) {
        // SAFETY: allocated in `alloc` with exactly this layout and not freed before.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), self.layout) };
    }
}

// SAFETY: a BounceBuffer owns its allocation exclusively, like a Box<[u8]>.
unsafe impl Send for BounceBuffer {}

/// Keep at most this many idle bounce buffers (within the budget); more are freed.
const IDLE_BUFFERS: usize = 8;

/// What asking the pool for a buffer gave.
pub(crate) enum Lend {
    Ready(BounceBuffer),
    /// Not now: the budget is lent out; retry when a buffer comes back.
    Wait,
    /// The system has no memory for it (or the size is absurd): fail the request.
    Failed,
}

/// Bounce counters of one engine.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BounceStats {
    /// Requests that went through a bounce buffer.
    pub ops: u64,
    /// Requests that had to wait for bounce memory (backpressure).
    pub waited: u64,
    /// Requests failed because memory could not be allocated.
    pub failed: u64,
    /// Most bytes allocated at once (lent and idle).
    pub peak_bytes: usize,
}

/// One iothread's bounce memory: a byte budget, buffers lent to ops, idle buffers kept for
/// reuse, and the requests waiting for room.
pub(crate) struct BouncePool {
    budget: usize,
    align: usize,
    /// Bytes allocated: lent out and idle.
    allocated: usize,
    lent: usize,
    idle: Vec<BounceBuffer>,
    /// Keys of requests waiting for bounce memory, oldest first.
    waiting: VecDeque<usize>,
    /// Issuing waiting requests now (an op that fails at once gives its buffer back from
    /// inside that loop, which must not start another).
    draining: bool,
    stats: BounceStats,
}

impl BouncePool {
    /// `align`: the DIO memory alignment (at least a page, which is what guests use).
    pub(crate) fn new(budget: usize, align: usize) -> BouncePool {
        BouncePool {
            budget,
            align: align.max(4096).next_power_of_two(),
            allocated: 0,
            lent: 0,
            idle: Vec::new(),
            waiting: VecDeque::new(),
            draining: false,
            stats: BounceStats::default(),
        }
    }

    pub(crate) fn lend(&mut self, len: usize) -> Lend {
        let Some(size) = len.checked_next_multiple_of(self.align) else {
            return Lend::Failed;
        };
        if let Some(i) = self.idle.iter().position(|b| b.capacity() >= size) {
            self.lent += 1;
            return Lend::Ready(self.idle.swap_remove(i));
        }
        // Idle buffers too small for this one make room for it.
        while self.allocated.saturating_add(size) > self.budget {
            let Some(b) = self.idle.pop() else { break };
            self.allocated -= b.capacity();
        }
        // Over the budget is allowed only alone: a request larger than the whole budget.
        if self.allocated.saturating_add(size) > self.budget && self.lent > 0 {
            return Lend::Wait;
        }
        match BounceBuffer::alloc(size, self.align) {
            Some(b) => {
                self.allocated += size;
                self.lent += 1;
                self.stats.peak_bytes = self.stats.peak_bytes.max(self.allocated);
                Lend::Ready(b)
            }
            None => Lend::Failed,
        }
    }

    pub(crate) fn give_back(&mut self, b: BounceBuffer) {
        self.lent -= 1;
        if self.idle.len() < IDLE_BUFFERS && self.allocated <= self.budget {
            self.idle.push(b);
        } else {
            self.allocated -= b.capacity();
        }
    }

    pub(crate) fn stats(&self) -> BounceStats {
        self.stats
    }

    /// Requests waiting for bounce memory.
    pub(crate) fn waiting(&self) -> usize {
        self.waiting.len()
    }
}

impl Engine {
    pub(crate) fn needs_bounce(&self, req: &Request) -> bool {
        if !self.storage.is_direct() || !matches!(req.kind, RequestKind::Read | RequestKind::Write)
        {
            return false;
        }
        // O_DIRECT wants every segment's address at the memory alignment and its length a
        // multiple of the offset alignment (the block layer's bdev_iter_is_aligned); the
        // offset and total length are whole logical blocks, checked at start-up to be enough.
        let mem_mask = self.storage.dio_mem_align() as usize - 1;
        let len_mask = self.storage.dio_offset_align() as usize - 1;
        req.iovecs
            .iter()
            .any(|v| (v.iov_base as usize) & mem_mask != 0 || v.iov_len & len_mask != 0)
    }

    /// Issues a read or write that needs a bounce buffer, or queues it behind the ones
    /// already waiting for bounce memory.
    pub(crate) fn issue_bounced(&mut self, key: usize) {
        self.bounce.stats.ops += 1;
        if self.bounce.waiting.is_empty() && self.try_issue_bounced(key) {
            return;
        }
        self.bounce.stats.waited += 1;
        self.bounce.waiting.push_back(key);
    }

    /// False when the request must wait for bounce memory.
    fn try_issue_bounced(&mut self, key: usize) -> bool {
        let len = self.inflight[key].req.data_len as usize;
        let bounce = match self.bounce.lend(len) {
            Lend::Ready(b) => b,
            Lend::Wait => return false,
            Lend::Failed => {
                self.bounce.stats.failed += 1;
                if let Some(n) = self.op_errors.tick() {
                    log::error!(
                        "cannot allocate a {len}-byte bounce buffer: request failed (error #{n})"
                    );
                }
                self.inflight[key].status = VIRTIO_BLK_S_IOERR;
                self.complete_request(key);
                return true;
            }
        };
        let f = &mut self.inflight[key];
        let write = f.req.kind == RequestKind::Write;
        if write {
            gather_from_iovecs(&f.req.iovecs, &bounce, len);
        }
        f.pending_ops += 1;
        let offset = f.req.sector << 9;
        let kind = if write { IoKind::Write } else { IoKind::Read };
        let mut op = self.take_op(kind, offset);
        op.dsync = write && self.writethrough();
        op.requests.push(key);
        op.remaining = len as u64;
        op.iovecs.push(libc::iovec {
            iov_base: bounce.ptr.as_ptr().cast(),
            iov_len: len,
        });
        op.bounce = Some(bounce);
        let op = self.ops.insert(op);
        self.push_op(op);
        true
    }

    /// A bounced op is done with its buffer: back to the pool, and the requests waiting for
    /// bounce memory go out while it lasts.
    pub(crate) fn return_bounce(&mut self, bounce: BounceBuffer) {
        self.bounce.give_back(bounce);
        if self.bounce.draining {
            return;
        }
        self.bounce.draining = true;
        while let Some(&key) = self.bounce.waiting.front() {
            if !self.try_issue_bounced(key) {
                break;
            }
            self.bounce.waiting.pop_front();
        }
        self.bounce.draining = false;
    }

    /// Bounce buffer counters of this engine.
    pub fn bounce_stats(&self) -> BounceStats {
        self.bounce.stats()
    }

    /// Requests waiting for bounce memory.
    pub fn bounce_waiting(&self) -> usize {
        self.bounce.waiting()
    }
}

pub(crate) fn scatter_to_iovecs(iovecs: &[libc::iovec], bounce: &BounceBuffer, len: usize) {
    // SAFETY: the bounce buffer holds at least `len` initialised bytes (the read filled them).
    let src = unsafe { std::slice::from_raw_parts(bounce.ptr.as_ptr(), len) };
    copy_to_iovecs(iovecs, src);
}

fn gather_from_iovecs(iovecs: &[libc::iovec], bounce: &BounceBuffer, len: usize) {
    let mut done = 0;
    for v in iovecs {
        let n = v.iov_len.min(len - done);
        // SAFETY: each iovec lies inside mapped guest memory (checked by the parser); the
        // bounce buffer has room for `len` bytes and done + n <= len.
        unsafe {
            std::ptr::copy_nonoverlapping(v.iov_base.cast::<u8>(), bounce.ptr.as_ptr().add(done), n)
        };
        done += n;
        if done == len {
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ready(l: Lend) -> BounceBuffer {
        match l {
            Lend::Ready(b) => b,
            Lend::Wait => panic!("waits"),
            Lend::Failed => panic!("failed"),
        }
    }

    #[test]
    fn the_pool_lends_within_its_budget_and_then_makes_requests_wait() {
        let mut p = BouncePool::new(64 << 10, 4096);
        let a = ready(p.lend(32 << 10));
        let b = ready(p.lend(30 << 10));
        assert!(matches!(p.lend(4096), Lend::Wait));
        p.give_back(a);
        // The idle 32 KiB buffer serves the next request of that size.
        let c = ready(p.lend(32 << 10));
        assert!(p.stats().peak_bytes <= 64 << 10);
        p.give_back(b);
        p.give_back(c);
    }

    #[test]
    fn a_request_larger_than_the_budget_is_served_alone() {
        let mut p = BouncePool::new(16 << 10, 4096);
        let small = ready(p.lend(4096));
        assert!(matches!(p.lend(1 << 20), Lend::Wait));
        p.give_back(small);
        let big = ready(p.lend(1 << 20));
        assert!(matches!(p.lend(4096), Lend::Wait));
        p.give_back(big);
        // The oversized buffer is not kept idle past the budget.
        let again = ready(p.lend(4096));
        assert!(p.allocated <= 16 << 10);
        p.give_back(again);
    }

    #[test]
    fn an_allocation_the_system_refuses_is_a_failure_not_an_abort() {
        let mut p = BouncePool::new(usize::MAX, 4096);
        assert!(matches!(p.lend(usize::MAX - 4095), Lend::Failed));
        assert!(matches!(p.lend(isize::MAX as usize), Lend::Failed));
        // A size the allocator can lay out but not back with memory: alloc returns null.
        assert!(matches!(p.lend(1 << 50), Lend::Failed));
    }
}
