//! Where the data lives, behind one interface: the engine plans ops ([`IoOp`]) and a storage
//! backend carries them out. A regular file or a block device: the engine's own ring does the
//! I/O (`crate::uring` builds the SQEs). The null backend: nothing at all (requests complete
//! inline, so that the dataplane alone can be measured). An [`ExternalStorage`] (the
//! fault-injecting [`FaultStorage`], later Ceph RBD): ops are handed over and their results
//! come back through the engine's completion eventfd.

mod external;
mod fault;
mod op;
mod resize;

pub use external::{CompletionQueue, ExternalStorage};
pub use fault::{Fault, FaultRule, FaultStorage, OpRecord};
pub use op::{IoKind, IoOp};
pub use resize::ResizeError;

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::os::unix::io::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("cannot open {path}: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error("cannot create {path}: {source}")]
    Create { path: PathBuf, source: io::Error },
    #[error("{path} is neither a regular file nor a block device")]
    NotAFileOrBlockDevice { path: PathBuf },
    #[error("{path} has size 0; give --create SIZE to make it")]
    Empty { path: PathBuf },
    #[error("cannot read the size of {path}: {source}")]
    Size { path: PathBuf, source: io::Error },
    #[error(
        "{path} needs O_DIRECT offsets aligned to {need} bytes but the logical block size is \
         {have}: use --logical-block-size {need} or --buffered"
    )]
    BlockSizeTooSmall { path: PathBuf, need: u32, have: u32 },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StorageKind {
    File,
    BlockDevice,
    Null,
    /// Ops go to an [`ExternalStorage`].
    External,
}

/// How to open an image.
#[derive(Clone, Debug)]
pub struct ImageOptions {
    pub read_only: bool,
    /// O_DIRECT: bypass the host page cache.
    pub direct: bool,
    /// Create a sparse file of this many bytes if the path does not exist.
    pub create_size: Option<u64>,
}

/// An opened storage backend. Shared read-only by every iothread (each has its own ring).
#[derive(Debug)]
pub struct Storage {
    file: Option<File>,
    external: Option<Arc<dyn ExternalStorage>>,
    kind: StorageKind,
    /// Bytes: the size at open, or after the last resize (`resize.rs`).
    capacity: AtomicU64,
    direct: bool,
    /// O_DIRECT alignment of buffer addresses and lengths in memory (1 when not direct).
    dio_mem_align: u32,
    /// O_DIRECT alignment of file offsets and lengths (1 when not direct).
    dio_offset_align: u32,
}

impl Storage {
    /// The null backend: `capacity` bytes that read as whatever the buffer held.
    pub fn null(capacity: u64) -> Storage {
        Storage {
            file: None,
            external: None,
            kind: StorageKind::Null,
            capacity: AtomicU64::new(capacity),
            direct: false,
            dio_mem_align: 1,
            dio_offset_align: 1,
        }
    }

    /// A backend that runs ops itself, `capacity` bytes large.
    pub fn external(external: Arc<dyn ExternalStorage>, capacity: u64) -> Storage {
        Storage {
            file: None,
            external: Some(external),
            kind: StorageKind::External,
            capacity: AtomicU64::new(capacity),
            direct: false,
            dio_mem_align: 1,
            dio_offset_align: 1,
        }
    }

    /// The fault-injecting test backend.
    pub fn fault(fault: Arc<FaultStorage>) -> Storage {
        let capacity = fault.capacity();
        Storage::external(fault, capacity)
    }

    pub fn open(path: &Path, opts: &ImageOptions) -> Result<Storage, StorageError> {
        if let Some(size) = opts.create_size {
            if !path.exists() {
                let f = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(path)
                    .and_then(|f| f.set_len(size).map(|_| f))
                    .map_err(|source| StorageError::Create {
                        path: path.into(),
                        source,
                    })?;
                drop(f);
                log::info!("created sparse image {} of {} bytes", path.display(), size);
            }
        }
        let mut open = OpenOptions::new();
        open.read(true).write(!opts.read_only);
        if opts.direct {
            open.custom_flags(libc::O_DIRECT);
        }
        let file = open.open(path).map_err(|source| StorageError::Open {
            path: path.into(),
            source,
        })?;
        let meta = file.metadata().map_err(|source| StorageError::Open {
            path: path.into(),
            source,
        })?;
        let kind = if meta.file_type().is_block_device() {
            StorageKind::BlockDevice
        } else if meta.file_type().is_file() {
            StorageKind::File
        } else {
            return Err(StorageError::NotAFileOrBlockDevice { path: path.into() });
        };
        // lseek(SEEK_END) gives the size of regular files and block devices alike.
        // SAFETY: lseek on a file descriptor we own; it does not touch memory.
        let end = unsafe { libc::lseek(file.as_raw_fd(), 0, libc::SEEK_END) };
        if end < 0 {
            return Err(StorageError::Size {
                path: path.into(),
                source: io::Error::last_os_error(),
            });
        }
        let capacity = end as u64;
        if capacity == 0 {
            return Err(StorageError::Empty { path: path.into() });
        }
        let (dio_mem_align, dio_offset_align) = if opts.direct {
            dio_alignment(&file, kind)
        } else {
            (1, 1)
        };
        Ok(Storage {
            file: Some(file),
            external: None,
            kind,
            capacity: AtomicU64::new(capacity),
            direct: opts.direct,
            dio_mem_align,
            dio_offset_align,
        })
    }

    /// A backend on any open file (a FIFO, say, whose writes stay in flight until the test
    /// reads them), for the engine's own tests.
    #[cfg(test)]
    pub(crate) fn from_file_for_tests(file: File, capacity: u64) -> Storage {
        Storage {
            file: Some(file),
            external: None,
            kind: StorageKind::File,
            capacity: AtomicU64::new(capacity),
            direct: false,
            dio_mem_align: 1,
            dio_offset_align: 1,
        }
    }

    /// Fails when O_DIRECT needs a larger offset alignment than the guest's block size gives.
    pub fn check_block_size(
        &self,
        path: &Path,
        logical_block_size: u32,
    ) -> Result<(), StorageError> {
        if self.direct && self.dio_offset_align > logical_block_size {
            return Err(StorageError::BlockSizeTooSmall {
                path: path.into(),
                need: self.dio_offset_align,
                have: logical_block_size,
            });
        }
        Ok(())
    }

    pub fn kind(&self) -> StorageKind {
        self.kind
    }

    /// The size at open, or as the last [`Storage::grow`] / [`Storage::reread_size`] left it.
    pub fn capacity_bytes(&self) -> u64 {
        self.capacity.load(Ordering::Acquire)
    }

    pub fn is_direct(&self) -> bool {
        self.direct
    }

    pub fn dio_mem_align(&self) -> u32 {
        self.dio_mem_align
    }

    pub fn dio_offset_align(&self) -> u32 {
        self.dio_offset_align
    }

    pub(crate) fn raw_fd(&self) -> Option<RawFd> {
        self.file.as_ref().map(|f| f.as_raw_fd())
    }

    pub(crate) fn external_backend(&self) -> Option<&Arc<dyn ExternalStorage>> {
        self.external.as_ref()
    }

    /// Makes everything written so far durable (used at shutdown).
    pub fn sync(&self) -> io::Result<()> {
        match (&self.file, &self.external) {
            (Some(f), _) => f.sync_data(),
            (None, Some(e)) => e.sync(),
            (None, None) => Ok(()),
        }
    }
}

/// O_DIRECT alignment (memory, offset): what statx(STATX_DIOALIGN) says (kernel 6.1+ for
/// files, 6.11+ for block devices); else, for a block device, its logical block size for both
/// (what the block layer required before it relaxed memory alignment); else 512.
fn dio_alignment(file: &File, kind: StorageKind) -> (u32, u32) {
    if let Some(align) = statx_dio_alignment(file) {
        return align;
    }
    if kind == StorageKind::BlockDevice {
        if let Some(lbs) = logical_block_size(file) {
            return (lbs, lbs);
        }
    }
    (512, 512)
}

/// (memory, offset) from statx(STATX_DIOALIGN), when the kernel tells it.
fn statx_dio_alignment(file: &File) -> Option<(u32, u32)> {
    // SAFETY: statx is a plain C struct for which all-zero bytes are a valid value.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: valid fd, empty path with AT_EMPTY_PATH, and a pointer to a statx we own.
    let rc = unsafe {
        libc::statx(
            file.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut stx,
        )
    };
    if rc != 0 || stx.stx_mask & libc::STATX_DIOALIGN == 0 || stx.stx_dio_offset_align == 0 {
        return None;
    }
    Some((
        stx.stx_dio_mem_align.max(1).next_power_of_two(),
        stx.stx_dio_offset_align.next_power_of_two(),
    ))
}

/// A block device's logical block size (BLKSSZGET).
pub(crate) fn logical_block_size(file: &File) -> Option<u32> {
    let mut lbs: libc::c_int = 0;
    // SAFETY: BLKSSZGET writes one int through the pointer, which points at an int we own.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::BLKSSZGET, &mut lbs) };
    (rc == 0 && lbs > 0 && (lbs as u32).is_power_of_two()).then_some(lbs as u32)
}
