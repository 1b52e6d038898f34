//! A backend's size while it is served: a file image grows (ftruncate), a block device is asked
//! what size it has now (its owner grew it). When a resize is allowed (never smaller, whole
//! blocks, not read-only) is the device's decision (vhost-server resize.rs); this is the I/O.

use std::io;
use std::os::unix::io::AsRawFd;
use std::sync::atomic::Ordering;

use super::{Storage, StorageKind};

/// BLKGETSIZE64 = _IOR(0x12, 114, u64) in the asm-generic ioctl encoding (x86_64, aarch64,
/// riscv64); libc does not define it.
const BLKGETSIZE64: libc::Ioctl =
    ((2u32 << 30) | ((std::mem::size_of::<u64>() as u32) << 16) | (0x12 << 8) | 114) as _;

#[derive(Debug, thiserror::Error)]
pub enum ResizeError {
    #[error("{kind:?} storage cannot be resized")]
    NotSupported { kind: StorageKind },
    #[error("the image is {from} bytes: it is never shrunk (asked for {to})")]
    WouldShrink { from: u64, to: u64 },
    #[error("cannot grow the image to {bytes} bytes: {source}")]
    Grow { bytes: u64, source: io::Error },
    #[error("cannot read the storage's size: {0}")]
    Size(io::Error),
}

impl Storage {
    /// Grows a regular file (ftruncate, then fdatasync so the new size is durable before the
    /// guest is told of it), an external backend that can grow, or the null backend to `bytes`, and records the new capacity.
    /// Never shrinks.
    pub fn grow(&self, bytes: u64) -> Result<(), ResizeError> {
        let from = self.capacity_bytes();
        if bytes < from {
            return Err(ResizeError::WouldShrink { from, to: bytes });
        }
        match (self.kind, &self.file) {
            (StorageKind::File, Some(file)) => file
                .set_len(bytes)
                .and_then(|()| file.sync_data())
                .map_err(|source| ResizeError::Grow { bytes, source })?,
            (StorageKind::Null, _) => {}
            (StorageKind::External, _) => {
                match self.external.as_ref().and_then(|e| e.grow(bytes)) {
                    Some(result) => result.map_err(|source| ResizeError::Grow { bytes, source })?,
                    None => return Err(ResizeError::NotSupported { kind: self.kind }),
                }
            }
            (kind, _) => return Err(ResizeError::NotSupported { kind }),
        }
        self.capacity.store(bytes, Ordering::Release);
        Ok(())
    }

    /// A block device's size now (BLKGETSIZE64), or an external backend's (one whose owner
    /// can grow it: Ceph RBD), recorded as its capacity: what it is, even if
    /// the device shrank (the caller decides what the guest sees).
    pub fn reread_size(&self) -> Result<u64, ResizeError> {
        if self.kind == StorageKind::External {
            let size = self
                .external
                .as_ref()
                .and_then(|e| e.current_size())
                .ok_or(ResizeError::NotSupported { kind: self.kind })?
                .map_err(ResizeError::Size)?;
            self.capacity.store(size, Ordering::Release);
            return Ok(size);
        }
        let file = match (self.kind, &self.file) {
            (StorageKind::BlockDevice, Some(file)) => file,
            (kind, _) => return Err(ResizeError::NotSupported { kind }),
        };
        let mut bytes: u64 = 0;
        // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which points at a u64 we
        // own; the fd is a block device we keep open.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64, &mut bytes) };
        if rc != 0 {
            return Err(ResizeError::Size(io::Error::last_os_error()));
        }
        self.capacity.store(bytes, Ordering::Release);
        Ok(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ImageOptions;

    fn image(len: u64) -> (tempfile::TempDir, Storage) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        std::fs::write(&path, vec![7u8; len as usize]).unwrap();
        let opts = ImageOptions {
            read_only: false,
            direct: false,
            create_size: None,
        };
        let storage = Storage::open(&path, &opts).unwrap();
        (dir, storage)
    }

    #[test]
    fn a_file_grows_and_keeps_its_data() {
        let (dir, storage) = image(8192);
        storage.grow(1 << 20).unwrap();
        assert_eq!(storage.capacity_bytes(), 1 << 20);
        let data = std::fs::read(dir.path().join("img")).unwrap();
        assert_eq!(data.len(), 1 << 20);
        assert!(data[..8192].iter().all(|&b| b == 7), "old data kept");
        assert!(
            data[8192..].iter().all(|&b| b == 0),
            "the new part reads as zeros"
        );
    }

    #[test]
    fn a_file_is_never_shrunk() {
        let (dir, storage) = image(8192);
        assert!(matches!(
            storage.grow(4096),
            Err(ResizeError::WouldShrink {
                from: 8192,
                to: 4096
            })
        ));
        assert_eq!(storage.capacity_bytes(), 8192);
        assert_eq!(
            std::fs::metadata(dir.path().join("img")).unwrap().len(),
            8192
        );
    }

    #[test]
    fn only_block_devices_are_reread_and_external_storage_is_not_resized() {
        let (_dir, file) = image(4096);
        assert!(matches!(
            file.reread_size(),
            Err(ResizeError::NotSupported {
                kind: StorageKind::File
            })
        ));
        let null = Storage::null(4096);
        null.grow(8192).unwrap();
        assert_eq!(null.capacity_bytes(), 8192);
        let fault = Storage::fault(crate::storage::FaultStorage::new(vec![0; 4096]));
        assert!(matches!(
            fault.grow(8192),
            Err(ResizeError::NotSupported {
                kind: StorageKind::External
            })
        ));
    }
}
