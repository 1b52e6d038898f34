//! The shared mapping: creating the memfd, mapping a frontend's file, atomic access by offset.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU16, AtomicU64, AtomicU8};
use std::sync::Arc;

use crate::layout::{self, queue_region_size, region_size, MAX_QUEUE_SIZE};
use crate::queue::InflightQueue;
use crate::InflightError;

/// The mapped region; Send + Sync (every access is atomic); unmapped on drop.
#[derive(Debug)]
pub struct InflightRegion {
    /// What mmap returned (page-aligned), for munmap.
    map_addr: NonNull<libc::c_void>,
    map_len: usize,
    /// Start of queue 0 (`map_addr` + the offset's distance from its page).
    base: NonNull<u8>,
    /// Bytes from `base` that belong to us: `region_size(num_queues, queue_size)`.
    len: usize,
    num_queues: u16,
    queue_size: u16,
}

// SAFETY: the region owns its mapping, which stays valid until drop, and every access to it
// goes through atomics, so sharing or moving it between threads races on nothing.
unsafe impl Send for InflightRegion {}
// SAFETY: as above: `&InflightRegion` only hands out atomic views of the mapping.
unsafe impl Sync for InflightRegion {}

fn check_sizes(num_queues: u16, queue_size: u16) -> Result<u64, InflightError> {
    if queue_size == 0 || queue_size > MAX_QUEUE_SIZE {
        return Err(InflightError::QueueSize(queue_size));
    }
    if num_queues == 0 {
        return Err(InflightError::NoQueues);
    }
    Ok(region_size(num_queues, queue_size))
}

impl InflightRegion {
    /// GET_INFLIGHT_FD: a new zero-filled memfd ("uringblk-inflight"), sized, sealed against
    /// grow/shrink (and against further sealing), mapped shared. Returns the file to hand to the
    /// frontend.
    pub fn create(
        num_queues: u16,
        queue_size: u16,
    ) -> Result<(Arc<InflightRegion>, File), InflightError> {
        let size = check_sizes(num_queues, queue_size)?;
        // SAFETY: the name is a NUL-terminated literal; the call only creates a descriptor.
        let fd = unsafe {
            libc::memfd_create(
                c"uringblk-inflight".as_ptr(),
                libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
            )
        };
        if fd < 0 {
            return Err(InflightError::Memfd(io::Error::last_os_error()));
        }
        // SAFETY: `fd` was just created and is owned by nothing else.
        let file = unsafe { File::from_raw_fd(fd) };
        // A new memfd reads as zeros, which is a "fresh" region (version 0) for every queue.
        file.set_len(size).map_err(InflightError::Resize)?;
        let seals = libc::F_SEAL_GROW | libc::F_SEAL_SHRINK | libc::F_SEAL_SEAL;
        // SAFETY: F_ADD_SEALS takes an int argument and touches no memory of ours.
        if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) } < 0 {
            return Err(InflightError::Seal(io::Error::last_os_error()));
        }
        let region = Self::mmap(&file, 0, size, num_queues, queue_size)?;
        Ok((Arc::new(region), file))
    }

    /// SET_INFLIGHT_FD: map the region the frontend hands back (after a reconnect: the one an
    /// earlier server process filled). `mmap_offset` must be a multiple of 64 and
    /// `mmap_offset + mmap_size` inside the file; `mmap_size` must hold `num_queues` queues of
    /// `queue_size` (only those bytes are mapped). The file must be sealed against shrinking
    /// (as [`InflightRegion::create`]'s and libvhost-user's are): a file that shrank under the
    /// mapping would kill the server with SIGBUS on the next access.
    pub fn map(
        file: &File,
        mmap_offset: u64,
        mmap_size: u64,
        num_queues: u16,
        queue_size: u16,
    ) -> Result<Arc<InflightRegion>, InflightError> {
        let needed = check_sizes(num_queues, queue_size)?;
        if mmap_size < needed {
            return Err(InflightError::TooSmall {
                needed,
                given: mmap_size,
            });
        }
        if mmap_offset % layout::ALIGN != 0 {
            return Err(InflightError::BadOffset(mmap_offset));
        }
        // SAFETY: F_GET_SEALS takes no argument and touches no memory of ours.
        let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
        if seals < 0 || seals & libc::F_SEAL_SHRINK == 0 {
            return Err(InflightError::NotSealed);
        }
        let file_len = file.metadata().map_err(InflightError::Stat)?.len();
        let outside = InflightError::OutsideFile {
            offset: mmap_offset,
            size: mmap_size,
            file_len,
        };
        match mmap_offset.checked_add(mmap_size) {
            Some(end) if end <= file_len => {}
            _ => return Err(outside),
        }
        Ok(Arc::new(Self::mmap(
            file,
            mmap_offset,
            needed,
            num_queues,
            queue_size,
        )?))
    }

    /// Maps `len` bytes at `offset` (checked by the caller to lie inside the sealed file).
    fn mmap(
        file: &File,
        offset: u64,
        len: u64,
        num_queues: u16,
        queue_size: u16,
    ) -> Result<InflightRegion, InflightError> {
        let too_big = || InflightError::Mmap(io::Error::from(io::ErrorKind::InvalidInput));
        // SAFETY: sysconf reads a constant of the system.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        let page = u64::try_from(page).unwrap_or(4096).max(1);
        let in_page = offset % page;
        let map_offset = libc::off_t::try_from(offset - in_page).map_err(|_| too_big())?;
        let map_len = usize::try_from(in_page + len).map_err(|_| too_big())?;
        let len = usize::try_from(len).map_err(|_| too_big())?;
        // SAFETY: a new shared mapping chosen by the kernel (no fixed address), of a range the
        // callers checked lies inside the file; it aliases no Rust object.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                map_offset,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(InflightError::Mmap(io::Error::last_os_error()));
        }
        let map_addr = NonNull::new(addr).ok_or_else(too_big)?;
        // SAFETY: `in_page < map_len`, so the pointer stays inside the mapping.
        let base = unsafe { NonNull::new_unchecked(addr.cast::<u8>().add(in_page as usize)) };
        Ok(InflightRegion {
            map_addr,
            map_len,
            base,
            len,
            num_queues,
            queue_size,
        })
    }

    pub fn num_queues(&self) -> u16 {
        self.num_queues
    }

    pub fn queue_size(&self) -> u16 {
        self.queue_size
    }

    /// One queue's part; None past num_queues. Give each queue's part to one thread only.
    pub fn queue(self: &Arc<Self>, index: u16) -> Option<InflightQueue> {
        if index >= self.num_queues {
            return None;
        }
        let start = usize::from(index) * queue_region_size(self.queue_size) as usize;
        Some(InflightQueue::new(Arc::clone(self), start, self.queue_size))
    }

    /// A pointer to the `T`-sized field at byte `offset`, after checking it lies inside the
    /// region and is aligned for `T` (both hold for every offset the layout computes; the
    /// assert keeps a bug in that arithmetic from touching memory outside).
    fn field<T>(&self, offset: usize) -> *mut T {
        let size = std::mem::size_of::<T>();
        assert!(offset.checked_add(size).is_some_and(|end| end <= self.len));
        // SAFETY: `offset + size <= len`, so the pointer is inside the mapping.
        let ptr = unsafe { self.base.as_ptr().add(offset) };
        assert!(ptr.cast::<T>().is_aligned());
        ptr.cast()
    }

    pub(crate) fn u8_at(&self, offset: usize) -> &AtomicU8 {
        // SAFETY: `field` checked bounds and alignment; the mapping lives as long as `self` and
        // is only ever accessed atomically by us (the frontend does not write it).
        unsafe { AtomicU8::from_ptr(self.field(offset)) }
    }

    pub(crate) fn u16_at(&self, offset: usize) -> &AtomicU16 {
        // SAFETY: as in `u8_at`.
        unsafe { AtomicU16::from_ptr(self.field(offset)) }
    }

    pub(crate) fn u64_at(&self, offset: usize) -> &AtomicU64 {
        // SAFETY: as in `u8_at`.
        unsafe { AtomicU64::from_ptr(self.field(offset)) }
    }
}

impl Drop for InflightRegion {
    fn drop(&mut self) {
        // SAFETY: the mapping is ours, created by `mmap` with this address and length; no
        // reference into it outlives `self` (InflightQueue holds an Arc to the region).
        unsafe { libc::munmap(self.map_addr.as_ptr(), self.map_len) };
    }
}
