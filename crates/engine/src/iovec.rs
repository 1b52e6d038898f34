//! Small helpers over guest iovecs and status bytes.

use blk_proto::Request;

#[inline]
pub(crate) fn ranges_bytes(req: &Request) -> u64 {
    req.ranges
        .iter()
        .map(|r| u64::from(r.num_sectors) << 9)
        .sum()
}

#[inline]
pub(crate) fn write_status(req: &Request, status: u8) {
    if req.status.is_null() {
        return;
    }
    // SAFETY: the parser located the status byte inside guest memory, and the vhost-server
    // keeps that memory mapped until the request is on the used ring.
    unsafe { req.status.write_volatile(status) };
}

/// Drops the first `n` bytes from an iovec list, in place.
pub(crate) fn advance_iovecs(iovecs: &mut Vec<libc::iovec>, mut n: usize) {
    let mut skip = 0;
    while skip < iovecs.len() && n >= iovecs[skip].iov_len {
        n -= iovecs[skip].iov_len;
        skip += 1;
    }
    iovecs.drain(..skip);
    if n > 0 {
        if let Some(first) = iovecs.first_mut() {
            // SAFETY: n < first.iov_len, so the result stays inside the same buffer.
            first.iov_base = unsafe { first.iov_base.cast::<u8>().add(n) }.cast();
            first.iov_len -= n;
        }
    }
}

/// Copies `src` into the buffers in order, as far as they reach.
pub(crate) fn copy_to_iovecs(iovecs: &[libc::iovec], src: &[u8]) {
    let mut done = 0;
    for v in iovecs {
        if done == src.len() {
            break;
        }
        let n = v.iov_len.min(src.len() - done);
        // SAFETY: the parser checked that each iovec lies inside guest memory, which stays
        // mapped while the request is in flight; src is our own slice of at least done+n bytes.
        unsafe { std::ptr::copy_nonoverlapping(src[done..].as_ptr(), v.iov_base.cast(), n) };
        done += n;
    }
}
