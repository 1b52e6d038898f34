//! Aligned bounce buffers for O_DIRECT requests whose guest buffers miss the DIO alignment:
//! a write is gathered into one before it goes out, a read scattered out of one after.

use std::ptr::NonNull;

use blk_proto::{Request, RequestKind};

use crate::iovec::copy_to_iovecs;
use crate::Engine;

/// An aligned buffer for O_DIRECT requests whose guest buffers miss the DIO alignment.
pub(crate) struct BounceBuffer {
    pub(crate) ptr: NonNull<u8>,
    pub(crate) layout: std::alloc::Layout,
}

impl BounceBuffer {
    pub(crate) fn new(len: usize) -> BounceBuffer {
        let layout = std::alloc::Layout::from_size_align(len.max(4096), 4096)
            .expect("bounce buffer size fits a Layout");
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc(layout) };
        let ptr = NonNull::new(ptr).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        BounceBuffer { ptr, layout }
    }

    pub(crate) fn capacity(&self) -> usize {
        self.layout.size()
    }
}

impl Drop for BounceBuffer {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with exactly this layout and not freed before.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), self.layout) };
    }
}

// SAFETY: a BounceBuffer owns its allocation exclusively, like a Box<[u8]>.
unsafe impl Send for BounceBuffer {}

/// Keep this many idle bounce buffers; more are freed.
pub(crate) const BOUNCE_POOL: usize = 8;

impl Engine {
    pub(crate) fn needs_bounce(&self, req: &Request) -> bool {
        if !self.storage.is_direct() || !matches!(req.kind, RequestKind::Read | RequestKind::Write)
        {
            return false;
        }
        let mem_mask = self.storage.dio_mem_align() as usize - 1;
        // Every segment's length must be a multiple of the DIO offset alignment, which the
        // logical block size (checked at start-up) satisfies: use the block size of 512.
        req.iovecs
            .iter()
            .any(|v| (v.iov_base as usize) & mem_mask != 0 || v.iov_len & 511 != 0)
    }
}

pub(crate) fn scatter_to_iovecs(iovecs: &[libc::iovec], bounce: &BounceBuffer, len: usize) {
    // SAFETY: the bounce buffer holds at least `len` initialised bytes (the read filled them).
    let src = unsafe { std::slice::from_raw_parts(bounce.ptr.as_ptr(), len) };
    copy_to_iovecs(iovecs, src);
}

pub(crate) fn gather_from_iovecs(iovecs: &[libc::iovec], bounce: &BounceBuffer, len: usize) {
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
