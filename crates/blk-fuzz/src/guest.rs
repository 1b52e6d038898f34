//! Guest memory with guard pages: every region is its own run of read-write pages inside one
//! PROT_NONE reservation, with at least one inaccessible page between regions (and before the
//! first and after the last). A read or write one byte outside any region, through a pointer
//! the parser or walker produced, faults at once instead of silently touching other memory.
//! Regions adjacent in guest-physical space are therefore never adjacent in the host: a range
//! crossing them must be split, as in a real VMM.

use std::sync::Arc;

use vm_memory::{GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

pub type Mem = GuestMemoryMmap<()>;

pub const PAGE: usize = 4096;

/// One guest region: where it starts in guest-physical space and how many pages it has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RegionSpec {
    pub guest_start: u64,
    pub pages: usize,
}

impl RegionSpec {
    pub fn len(&self) -> u64 {
        (self.pages * PAGE) as u64
    }

    pub fn is_empty(&self) -> bool {
        self.pages == 0
    }
}

/// The mapped guest. Field order matters: `mem` (and every snapshot cloned from it) must be
/// dropped before the reservation is unmapped, which `Drop` does last.
pub struct GuardedGuest {
    mem: Arc<Mem>,
    /// Host [start, start + len) of each region, in guest order.
    host_ranges: Vec<(usize, usize)>,
    reservation: *mut libc::c_void,
    reservation_len: usize,
}

impl GuardedGuest {
    /// Maps `specs` (sorted by guest address, non-overlapping, none empty). None if they are
    /// not (the decoder never asks for that) or the kernel refuses the mapping.
    pub fn new(specs: &[RegionSpec]) -> Option<Self> {
        let pages: usize = specs.iter().map(|s| s.pages + 1).sum::<usize>() + 1;
        let reservation_len = pages * PAGE;
        // SAFETY: a fresh anonymous mapping at an address of the kernel's choosing; nothing
        // else refers to it.
        let reservation = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                reservation_len,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if reservation == libc::MAP_FAILED {
            return None;
        }
        let mut guest = GuardedGuest {
            mem: Arc::new(Mem::new()),
            host_ranges: Vec::with_capacity(specs.len()),
            reservation,
            reservation_len,
        };
        let mut regions = Vec::with_capacity(specs.len());
        let mut page = 1; // page 0 is a guard
        for spec in specs {
            if spec.is_empty() {
                return None;
            }
            let host = reservation.cast::<u8>().wrapping_add(page * PAGE);
            let len = spec.pages * PAGE;
            // SAFETY: [host, host + len) lies inside the reservation made above, which this
            // guest owns; making it read-write affects nothing else.
            if unsafe { libc::mprotect(host.cast(), len, libc::PROT_READ | libc::PROT_WRITE) } != 0
            {
                return None;
            }
            // SAFETY: the pages stay mapped read-write until Drop unmaps the reservation, which
            // it does only once no Arc of `mem` (the owner of these regions) is left.
            let mapping = unsafe {
                MmapRegion::build_raw(
                    host,
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                )
            }
            .ok()?;
            regions.push(GuestRegionMmap::new(
                mapping,
                GuestAddress(spec.guest_start),
            )?);
            guest.host_ranges.push((host as usize, len));
            page += spec.pages + 1;
        }
        guest.mem = Arc::new(Mem::from_regions(regions).ok()?);
        Some(guest)
    }

    pub fn mem(&self) -> &Arc<Mem> {
        &self.mem
    }

    /// Whether host [ptr, ptr + len) lies inside one region's mapping.
    pub fn inside(&self, ptr: *const u8, len: usize) -> bool {
        let p = ptr as usize;
        self.host_ranges.iter().any(|&(base, size)| {
            p >= base && p.checked_add(len).is_some_and(|end| end <= base + size)
        })
    }
}

impl Drop for GuardedGuest {
    fn drop(&mut self) {
        // A snapshot still holding the regions: leak the pages rather than unmap them under it.
        if Arc::strong_count(&self.mem) != 1 {
            return;
        }
        // The regions first (they do not own their pages), then the pages.
        self.mem = Arc::new(Mem::new());
        // SAFETY: the reservation was mapped in new() and nothing refers to it any more: the
        // only user was `mem`, whose last reference was dropped just above.
        unsafe { libc::munmap(self.reservation, self.reservation_len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryBackend};

    #[test]
    fn adjacent_guest_regions_are_apart_in_the_host() {
        let specs = [
            RegionSpec {
                guest_start: 0x1000,
                pages: 1,
            },
            RegionSpec {
                guest_start: 0x2000,
                pages: 2,
            },
        ];
        let guest = GuardedGuest::new(&specs).expect("mapped");
        let mem = guest.mem();
        let first = mem.get_host_address(GuestAddress(0x1000)).unwrap();
        let second = mem.get_host_address(GuestAddress(0x2000)).unwrap();
        assert!(guest.inside(first, PAGE));
        assert!(
            !guest.inside(first, PAGE + 1),
            "one byte past the first region"
        );
        assert!(guest.inside(second, 2 * PAGE));
        // A guard page lies between them, so the host gap is at least a page.
        assert!(second as usize >= first as usize + 2 * PAGE);
        // A guest range across the boundary is still guest memory (vm-memory splits it).
        mem.write_slice(&[7u8; 32], GuestAddress(0x2000 - 16))
            .expect("write across the regions");
    }
}
