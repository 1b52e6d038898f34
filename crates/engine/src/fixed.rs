//! Guest memory registered with the ring as fixed buffers: the kernel pins its pages once per
//! memory table instead of on every I/O. Reads and writes whose buffers all lie in one
//! registered buffer use READ_FIXED / WRITE_FIXED (one segment) or READV_FIXED / WRITEV_FIXED
//! (several, kernel 6.15+); anything else (a request spanning two buffers, a bounce buffer, a
//! kernel without the opcode, a registration the kernel refused) uses plain READV / WRITEV.

use io_uring::squeue;

/// The kernel takes at most 1 GiB per registered buffer: larger regions are split.
pub(crate) const MAX_FIXED_BUFFER: usize = 1 << 30;
/// Slots of the (sparse) buffer table every ring registers at setup: 64 GiB of guest memory in
/// 1 GiB pieces; memory beyond it is served with plain READV/WRITEV.
pub(crate) const FIXED_SLOTS: u32 = 64;

/// IORING_OP_READV_FIXED / IORING_OP_WRITEV_FIXED (Linux 6.15), which the io-uring crate does
/// not build yet.
pub(crate) const OP_READV_FIXED: u8 = 60;
pub(crate) const OP_WRITEV_FIXED: u8 = 61;

/// The registered buffers, as host address ranges: slot i is `ranges[i]`.
#[derive(Default)]
pub(crate) struct FixedBuffers {
    ranges: Vec<(usize, usize)>,
}

impl FixedBuffers {
    /// Splits host regions into buffers of at most [`MAX_FIXED_BUFFER`], at most
    /// [`FIXED_SLOTS`] of them.
    pub(crate) fn plan(regions: &[(usize, usize)]) -> FixedBuffers {
        let mut ranges = Vec::new();
        'regions: for &(start, len) in regions {
            let mut at = start;
            let end = start.saturating_add(len);
            while at < end {
                if ranges.len() == FIXED_SLOTS as usize {
                    break 'regions;
                }
                let piece = (end - at).min(MAX_FIXED_BUFFER);
                ranges.push((at, at + piece));
                at += piece;
            }
        }
        FixedBuffers { ranges }
    }

    pub(crate) fn none() -> FixedBuffers {
        FixedBuffers::default()
    }

    /// The iovecs the kernel registers, slot by slot.
    pub(crate) fn iovecs(&self) -> Vec<libc::iovec> {
        self.ranges
            .iter()
            .map(|&(start, end)| libc::iovec {
                iov_base: start as *mut libc::c_void,
                iov_len: end - start,
            })
            .collect()
    }

    pub(crate) fn len(&self) -> usize {
        self.ranges.len()
    }

    /// The slot of the one buffer that holds every byte of `iovecs`, if there is one.
    #[inline]
    pub(crate) fn slot_of(&self, iovecs: &[libc::iovec]) -> Option<u16> {
        let first = iovecs.first()?;
        let base = first.iov_base as usize;
        let slot = self
            .ranges
            .iter()
            .position(|&(start, end)| start <= base && base < end)?;
        let (start, end) = self.ranges[slot];
        let inside = |v: &libc::iovec| {
            let b = v.iov_base as usize;
            b >= start && b.checked_add(v.iov_len).is_some_and(|e| e <= end)
        };
        iovecs.iter().all(inside).then_some(slot as u16)
    }
}

/// Turns a built READV/WRITEV entry into READV_FIXED/WRITEV_FIXED on buffer `slot`: same
/// fields (fd, iovec array, count, offset, flags), another opcode and the buffer index.
pub(crate) fn vectored_fixed(entry: squeue::Entry, write: bool, slot: u16) -> squeue::Entry {
    // SAFETY: squeue::Entry is #[repr(C)] around the kernel's 64-byte io_uring_sqe, a plain
    // struct of integers for which every bit pattern is valid; its layout is the kernel ABI.
    let mut raw: [u8; 64] = unsafe { std::mem::transmute(entry) };
    // io_uring_sqe: opcode at byte 0, buf_index (u16) at byte 40.
    raw[0] = if write {
        OP_WRITEV_FIXED
    } else {
        OP_READV_FIXED
    };
    raw[40..42].copy_from_slice(&slot.to_ne_bytes());
    // SAFETY: as above, any 64 bytes are a valid io_uring_sqe.
    unsafe { std::mem::transmute::<[u8; 64], squeue::Entry>(raw) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iov(base: usize, len: usize) -> libc::iovec {
        libc::iovec {
            iov_base: base as *mut libc::c_void,
            iov_len: len,
        }
    }

    #[test]
    fn regions_over_a_gib_are_split() {
        let f = FixedBuffers::plan(&[(1 << 40, 3 * MAX_FIXED_BUFFER + 4096), (1 << 20, 8192)]);
        assert_eq!(f.len(), 5);
        assert_eq!(
            f.ranges[3],
            (
                (1 << 40) + 3 * MAX_FIXED_BUFFER,
                (1 << 40) + 3 * MAX_FIXED_BUFFER + 4096
            )
        );
        assert!(f.ranges.iter().all(|(s, e)| e - s <= MAX_FIXED_BUFFER));
    }

    #[test]
    fn no_more_buffers_than_slots() {
        let f = FixedBuffers::plan(&[(0x1000, 100 * MAX_FIXED_BUFFER)]);
        assert_eq!(f.len(), FIXED_SLOTS as usize);
    }

    #[test]
    fn io_spanning_two_buffers_has_no_slot() {
        let f = FixedBuffers::plan(&[(0x10000, 0x10000), (0x40000, 0x10000)]);
        assert_eq!(f.slot_of(&[iov(0x11000, 0x1000)]), Some(0));
        assert_eq!(
            f.slot_of(&[iov(0x41000, 0x1000), iov(0x48000, 0x8000)]),
            Some(1)
        );
        assert_eq!(
            f.slot_of(&[iov(0x11000, 0x1000), iov(0x41000, 0x1000)]),
            None
        );
        assert_eq!(f.slot_of(&[iov(0x1f000, 0x2000)]), None, "past the end");
        assert_eq!(f.slot_of(&[iov(0x30000, 0x1000)]), None, "in no buffer");
        assert_eq!(f.slot_of(&[iov(0x11000, usize::MAX)]), None);
    }

    #[test]
    fn the_vectored_fixed_entry_keeps_every_field_but_opcode_and_index() {
        let v = [iov(0x1000, 512)];
        let e = io_uring::opcode::Readv::new(io_uring::types::Fixed(0), v.as_ptr(), 1)
            .offset(4096)
            .build()
            .user_data(77);
        // SAFETY: as in vectored_fixed.
        let before: [u8; 64] = unsafe { std::mem::transmute(e.clone()) };
        // SAFETY: as above.
        let after: [u8; 64] = unsafe { std::mem::transmute(vectored_fixed(e, false, 5)) };
        assert_eq!(after[0], OP_READV_FIXED);
        assert_eq!(u16::from_ne_bytes([after[40], after[41]]), 5);
        assert_eq!(before[1..40], after[1..40]);
        assert_eq!(before[42..], after[42..]);
    }
}
