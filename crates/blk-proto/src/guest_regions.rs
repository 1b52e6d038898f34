//! A snapshot of guest memory as a short list of {guest start, length, host pointer}: built once
//! per memory table, then every guest address is translated with one lookup and one checked
//! bounds test, instead of vm-memory's generic region search and slice machinery.

use std::any::Any;
use std::sync::Arc;

use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};

/// One mapped region: guest-physical [guest_start, guest_start + len) is host [host, host + len).
#[derive(Clone, Copy, Debug)]
struct HostRegion {
    guest_start: u64,
    len: u64,
    host: *mut u8,
}

impl HostRegion {
    /// The host address of [addr, addr + len) if it lies entirely inside this region.
    #[inline]
    fn host(&self, addr: u64, len: u64) -> Option<*mut u8> {
        let offset = addr.checked_sub(self.guest_start)?;
        // offset < self.len first, so the subtraction cannot wrap.
        if offset < self.len && len <= self.len - offset {
            Some(self.host.wrapping_add(offset as usize))
        } else {
            None
        }
    }
}

/// Up to this many regions, host() scans them in order rather than binary-searching.
const LINEAR_SCAN_MAX: usize = 4;

/// Guest memory, as host pointers. Sorted by guest address (sorted here), non-overlapping (as
/// vm-memory guarantees for the memory it is built from; were it not, a lookup could fail but
/// never leave the region it checked).
pub struct GuestRegions {
    regions: Vec<HostRegion>,
    /// Keeps the mappings alive for as long as the pointers above may be used.
    owner: Option<Arc<dyn Any + Send + Sync>>,
}

// SAFETY: the pointers address shared mappings of guest memory that `owner` (or, for the
// crate-internal `borrowed` snapshot, its caller) keeps mapped for the snapshot's whole life;
// the snapshot itself never writes through them, and every access
// through them is volatile (the guest may change the bytes at any time anyway), so handing the
// snapshot to or sharing it with another thread adds no data race Rust could reason about.
unsafe impl Send for GuestRegions {}
// SAFETY: as for Send: `&GuestRegions` only reads the region list.
unsafe impl Sync for GuestRegions {}

impl std::fmt::Debug for GuestRegions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(
                self.regions
                    .iter()
                    .map(|r| (r.guest_start, r.len, r.host as usize)),
            )
            .finish()
    }
}

impl GuestRegions {
    /// No memory at all: every translation fails.
    pub fn empty() -> Self {
        GuestRegions {
            regions: Vec::new(),
            owner: None,
        }
    }

    /// A snapshot of `mem` that keeps it (and so its mappings) alive.
    pub fn new<M>(mem: Arc<M>) -> Self
    where
        M: GuestMemoryBackend + Send + Sync + 'static,
    {
        let regions = collect_regions(&*mem);
        GuestRegions {
            regions,
            owner: Some(mem),
        }
    }

    /// A snapshot that does not keep `mem` alive.
    ///
    /// # Safety
    /// The caller must keep `mem` (and so its mappings) alive for as long as the snapshot or
    /// any pointer obtained from it is used.
    pub(crate) unsafe fn borrowed<M>(mem: &M) -> Self
    where
        M: GuestMemoryBackend + ?Sized,
    {
        GuestRegions {
            regions: collect_regions(mem),
            owner: None,
        }
    }

    /// Whether this is the snapshot of `mem` (same allocation): the caller's test for "the
    /// memory table changed, rebuild".
    pub fn is_snapshot_of<M: Send + Sync + 'static>(&self, mem: &Arc<M>) -> bool {
        self.owner
            .as_ref()
            .is_some_and(|o| std::ptr::addr_eq(Arc::as_ptr(o), Arc::as_ptr(mem)))
    }

    /// The host address of guest [addr, addr + len) when the range lies inside one region:
    /// one lookup, one bounds test. `None` if any byte is outside guest memory or the range
    /// crosses into another region (see [`GuestRegions::pieces`] for that case).
    #[inline]
    pub fn host(&self, addr: u64, len: u64) -> Option<*mut u8> {
        match self.regions.as_slice() {
            // The usual case (one memory region), without a search.
            [only] => only.host(addr, len),
            // A few regions (what VMMs and libblkio hand us): a scan is cheaper than a search.
            regions if regions.len() <= LINEAR_SCAN_MAX => {
                regions.iter().find_map(|r| r.host(addr, len))
            }
            regions => {
                // The last region starting at or below addr is the only candidate.
                let i = regions.partition_point(|r| r.guest_start <= addr);
                regions.get(i.checked_sub(1)?)?.host(addr, len)
            }
        }
    }

    /// Splits guest [addr, addr + len) at region boundaries: each item is one host piece, in
    /// order. Yields `None` (and then stops) at the first byte outside guest memory, so the
    /// pieces cover the whole range if and only if no `None` comes.
    pub fn pieces(&self, addr: u64, len: u64) -> Pieces<'_> {
        Pieces {
            regions: self,
            addr,
            left: len,
        }
    }

    /// Whether every byte of guest [addr, addr + len) is guest memory (possibly across
    /// adjacent regions).
    pub fn contains(&self, addr: u64, len: u64) -> bool {
        self.host(addr, len).is_some() || self.pieces(addr, len).all(|p| p.is_some())
    }

    /// Copies guest [addr, addr + dst.len()) into `dst`, byte by byte with volatile reads (the
    /// guest may be writing meanwhile). False, with `dst` partly written, if any byte is
    /// outside guest memory.
    pub fn read(&self, addr: u64, dst: &mut [u8]) -> bool {
        let mut filled = 0;
        for piece in self.pieces(addr, dst.len() as u64) {
            let Some((src, len)) = piece else {
                return false;
            };
            for (i, byte) in dst[filled..filled + len].iter_mut().enumerate() {
                // SAFETY: pieces() yields host ranges [src, src + len) inside mapped regions,
                // which `owner` (or the caller of `borrowed`) keeps alive.
                *byte = unsafe { src.add(i).read_volatile() };
            }
            filled += len;
        }
        filled == dst.len()
    }
}

fn collect_regions<M: GuestMemoryBackend + ?Sized>(mem: &M) -> Vec<HostRegion> {
    let mut regions: Vec<HostRegion> = mem
        .iter()
        .filter_map(|r| {
            // Regions without a host mapping (none in GuestMemoryMmap) cannot be translated:
            // leaving them out makes their addresses "not guest memory", which is safe.
            let host = r.get_host_address(MemoryRegionAddress(0)).ok()?;
            Some(HostRegion {
                guest_start: r.start_addr().0,
                len: r.len(),
                host,
            })
        })
        .collect();
    regions.sort_by_key(|r| r.guest_start);
    regions
}

/// See [`GuestRegions::pieces`].
pub struct Pieces<'r> {
    regions: &'r GuestRegions,
    addr: u64,
    left: u64,
}

impl Iterator for Pieces<'_> {
    /// (host address, length), or None for a byte outside guest memory.
    type Item = Option<(*mut u8, usize)>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.left == 0 {
            return None;
        }
        let regions = &self.regions.regions;
        let i = regions.partition_point(|r| r.guest_start <= self.addr);
        let piece = i.checked_sub(1).and_then(|i| {
            let r = &regions[i];
            // addr >= guest_start by the search; in the region if below its end.
            let offset = self.addr - r.guest_start;
            let in_region = r.len.checked_sub(offset).filter(|&n| n > 0)?;
            let take = in_region.min(self.left);
            Some((r.host.wrapping_add(offset as usize), take))
        });
        match piece {
            Some((host, take)) => {
                self.left -= take;
                // Cannot overflow: take bytes from addr lie inside a region.
                self.addr += take;
                Some(Some((host, take as usize)))
            }
            None => {
                // End the iteration after reporting the hole.
                self.left = 0;
                Some(None)
            }
        }
    }
}

/// 16 bytes at any alignment: a volatile read of it is two plain (possibly unaligned) 8-byte
/// loads on x86-64 and aarch64, where a `[u8; 16]` read is sixteen byte loads.
#[repr(C, packed)]
#[derive(Clone, Copy)]
struct Unaligned16 {
    lo: u64,
    hi: u64,
}

/// Reads 16 guest bytes at `src` with a volatile load, as one little-endian u128 (byte 0 is
/// the lowest). A u128 rather than a byte array because the compiler then decodes fields
/// with shifts instead of byte shuffles.
///
/// # Safety
/// [src, src + 16) must be readable host memory for the duration of the call (a range
/// [`GuestRegions::host`] returned, while the snapshot is alive).
#[inline]
pub(crate) unsafe fn read_volatile_le128(src: *const u8) -> u128 {
    // SAFETY: the caller guarantees 16 readable bytes at src; Unaligned16 has alignment 1,
    // so any address is suitably aligned for it.
    let v = unsafe { src.cast::<Unaligned16>().read_volatile() };
    let (lo, hi) = (v.lo, v.hi);
    u128::from(u64::from_le(lo)) | u128::from(u64::from_le(hi)) << 64
}
