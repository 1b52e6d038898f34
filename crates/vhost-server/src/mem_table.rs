//! The guest memory table as the frontend describes it (SET_MEM_TABLE, ADD_MEM_REG,
//! REM_MEM_REG): each region checked, then mapped from the frontend's fd (vm-memory), and
//! kept with the frontend's own virtual address, through which ring addresses
//! (SET_VRING_ADDR) are translated to guest addresses.
//!
//! Checks: a region has a size, none of its ranges (guest, frontend, file) wraps, a regular
//! file is long enough for it (a mapping past EOF would SIGBUS the server on first touch),
//! no two regions overlap in guest or frontend addresses, and the table has at most
//! [`MAX_MEM_SLOTS`] regions.

use std::fs::File;
use std::sync::Arc;

use vhost::vhost_user::message::VhostUserMemoryRegion;
use vm_memory::mmap::MmapRegion;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryRegion, GuestRegionMmap};

use crate::Mem;

/// Regions a table may hold (GET_MAX_MEM_SLOTS): what vhost-user-backend offered, under
/// QEMU's own limit of 512 slots for vhost-user.
pub(crate) const MAX_MEM_SLOTS: u64 = 509;

#[derive(Debug, thiserror::Error)]
pub(crate) enum MemoryError {
    #[error("a memory table of {0} regions is more than the {MAX_MEM_SLOTS} slots offered")]
    TooManyRegions(usize),
    #[error("region at guest {guest:#x}: size 0")]
    Empty { guest: u64 },
    #[error("region at guest {guest:#x} of {size:#x} bytes wraps around an address space")]
    Wraps { guest: u64, size: u64 },
    #[error(
        "region at guest {guest:#x}: the file is {file_len:#x} bytes, the region ends at \
         offset {end:#x}"
    )]
    PastEndOfFile { guest: u64, file_len: u64, end: u64 },
    #[error("region at guest {guest:#x}: cannot look at its file: {source}")]
    File { guest: u64, source: std::io::Error },
    #[error("region at guest {guest:#x}: cannot map it: {why}")]
    Map { guest: u64, why: String },
    #[error("region at guest {guest:#x} overlaps another one ({what} addresses)")]
    Overlap { guest: u64, what: &'static str },
    #[error("no region at guest {guest:#x} of {size:#x} bytes to remove")]
    NotFound { guest: u64, size: u64 },
}

/// One region as the frontend sees it.
#[derive(Clone, Copy, Debug)]
struct Entry {
    guest: u64,
    size: u64,
    /// The frontend's virtual address of the region.
    user: u64,
}

#[derive(Default)]
pub(crate) struct MemoryTable {
    entries: Vec<Entry>,
}

impl MemoryTable {
    /// SET_MEM_TABLE: the whole table replaced. Nothing changes unless every region is good.
    pub(crate) fn replace(
        &mut self,
        regions: &[VhostUserMemoryRegion],
        files: Vec<File>,
    ) -> Result<Mem, MemoryError> {
        if regions.len() as u64 > MAX_MEM_SLOTS {
            return Err(MemoryError::TooManyRegions(regions.len()));
        }
        let mut entries = Vec::with_capacity(regions.len());
        let mut mapped = Vec::with_capacity(regions.len());
        for (region, file) in regions.iter().zip(files) {
            let (entry, map) = map_region(region, file)?;
            check_disjoint(&entries, &entry)?;
            entries.push(entry);
            mapped.push(Arc::new(map));
        }
        mapped.sort_by_key(|r| r.start_addr());
        // The vhost crate refuses an empty table; were one to come, it means no memory.
        let mem = if mapped.is_empty() {
            Mem::new()
        } else {
            Mem::from_arc_regions(mapped).map_err(|e| MemoryError::Map {
                guest: regions[0].guest_phys_addr,
                why: e.to_string(),
            })?
        };
        self.entries = entries;
        Ok(mem)
    }

    /// ADD_MEM_REG: `current` plus one region.
    pub(crate) fn add(
        &mut self,
        current: &Mem,
        region: &VhostUserMemoryRegion,
        file: File,
    ) -> Result<Mem, MemoryError> {
        if self.entries.len() as u64 >= MAX_MEM_SLOTS {
            return Err(MemoryError::TooManyRegions(self.entries.len() + 1));
        }
        let (entry, map) = map_region(region, file)?;
        check_disjoint(&self.entries, &entry)?;
        let mem = current
            .insert_region(Arc::new(map))
            .map_err(|e| MemoryError::Map {
                guest: entry.guest,
                why: e.to_string(),
            })?;
        self.entries.push(entry);
        Ok(mem)
    }

    /// REM_MEM_REG: `current` without the region at that guest address and of that size.
    pub(crate) fn remove(
        &mut self,
        current: &Mem,
        region: &VhostUserMemoryRegion,
    ) -> Result<Mem, MemoryError> {
        let (guest, size) = (region.guest_phys_addr, region.memory_size);
        let not_found = MemoryError::NotFound { guest, size };
        let at = self
            .entries
            .iter()
            .position(|e| e.guest == guest && e.size == size)
            .ok_or(not_found)?;
        let (mem, _) = current
            .remove_region(GuestAddress(guest), size)
            .map_err(|_| MemoryError::NotFound { guest, size })?;
        self.entries.remove(at);
        Ok(mem)
    }

    /// The guest address of a frontend virtual address, if a region holds it.
    pub(crate) fn to_guest(&self, user: u64) -> Option<u64> {
        self.entries
            .iter()
            .find(|e| user >= e.user && user - e.user < e.size)
            .map(|e| e.guest + (user - e.user))
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// Checks one region and maps it.
fn map_region(
    region: &VhostUserMemoryRegion,
    file: File,
) -> Result<(Entry, GuestRegionMmap<()>), MemoryError> {
    let (guest, size) = (region.guest_phys_addr, region.memory_size);
    if size == 0 {
        return Err(MemoryError::Empty { guest });
    }
    let wraps = || MemoryError::Wraps { guest, size };
    guest.checked_add(size).ok_or_else(wraps)?;
    region.user_addr.checked_add(size).ok_or_else(wraps)?;
    let end = region
        .mmap_offset
        .checked_add(size)
        .filter(|&end| i64::try_from(end).is_ok())
        .ok_or_else(wraps)?;
    let meta = file
        .metadata()
        .map_err(|source| MemoryError::File { guest, source })?;
    // Only a regular file (memfd, tmpfs, hugetlbfs) has a length to check; a device (DAX)
    // has none.
    if meta.is_file() && meta.len() < end {
        return Err(MemoryError::PastEndOfFile {
            guest,
            file_len: meta.len(),
            end,
        });
    }
    let map = MmapRegion::<()>::from_file(FileOffset::new(file, region.mmap_offset), size as usize)
        .map_err(|e| MemoryError::Map {
            guest,
            why: e.to_string(),
        })?;
    let map = GuestRegionMmap::new(map, GuestAddress(guest)).ok_or_else(wraps)?;
    Ok((
        Entry {
            guest,
            size,
            user: region.user_addr,
        },
        map,
    ))
}

/// `new` overlaps none of `entries`, in guest or in frontend addresses.
fn check_disjoint(entries: &[Entry], new: &Entry) -> Result<(), MemoryError> {
    for e in entries {
        // No sum wraps: every entry's ranges were checked when it was mapped.
        let apart = |x: u64, y: u64| x + new.size <= y || y + e.size <= x;
        if !apart(new.guest, e.guest) {
            return Err(MemoryError::Overlap {
                guest: new.guest,
                what: "guest",
            });
        }
        if !apart(new.user, e.user) {
            return Err(MemoryError::Overlap {
                guest: new.guest,
                what: "frontend",
            });
        }
    }
    Ok(())
}
