//! Growing the disk while it is served (`uringblk ctl resize`): the checks ([`ResizePlan::new`],
//! no I/O), then the change ([`VhostUserBlk::resize`]): the storage first, then the capacity
//! every iothread validates against and GET_CONFIG reports, then the guest is told.
//!
//! - A file image (or the null backend) is grown to the size asked, a multiple of the logical
//!   block size; never shrunk; not in a read-only export.
//! - A block device is asked for its size (BLKGETSIZE64): its owner grew it (`losetup -c`
//!   after growing a loop device's file, an LVM extend, ...). Without a size the disk takes
//!   the device's size (rounded down to the logical block size, as at start); with one, the
//!   device must be exactly that large, or nothing changes. A device that shrank is refused.
//! - An external backend (Ceph RBD) grows to a size given, as a file does (rbd_resize); without
//!   a size it takes the size the image has now (someone ran `rbd resize`), as a block device.
//! - The same size again changes nothing and tells the guest nothing.

use std::fmt;
use std::sync::atomic::Ordering;

use blk_proto::SECTOR_SHIFT;
use engine::StorageKind;

use crate::backend_req::NotNotified;
use crate::VhostUserBlk;

#[derive(Debug, thiserror::Error)]
pub enum ResizeError {
    #[error("a file image is grown to the size given: give SIZE")]
    SizeNeeded,
    #[error("the export is read-only: the image is not grown")]
    ReadOnly,
    #[error("{bytes} bytes is not a multiple of the logical block size ({block} bytes)")]
    Misaligned { bytes: u64, block: u32 },
    #[error(
        "the disk is {from} bytes: shrinking it to {to} bytes is refused (the guest may hold \
         data past {to})"
    )]
    Shrink { from: u64, to: u64 },
    #[error(
        "the block device is {device} bytes, not {asked}: grow it first (e.g. losetup -c), or \
         leave SIZE out to take the size it has"
    )]
    DeviceSizeDiffers { device: u64, asked: u64 },
    #[error(
        "the block device is now {device} bytes, less than the disk's {from}: the disk is \
         never shrunk, its capacity stays {from} bytes"
    )]
    DeviceShrank { from: u64, device: u64 },
    #[error(transparent)]
    Storage(#[from] engine::ResizeError),
}

/// What a resize will do, decided before any I/O.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResizePlan {
    /// Grow the file (or the null backend) to this many bytes.
    Grow { to: u64 },
    /// Take the block device's size; with `expect`, only if it is exactly that.
    Reread { expect: Option<u64> },
}

impl ResizePlan {
    /// `size`: what the operator asked (None: re-read a block device). `from`: the disk's
    /// capacity in bytes now.
    pub fn new(
        size: Option<u64>,
        kind: StorageKind,
        from: u64,
        logical_block_size: u32,
        read_only: bool,
    ) -> Result<ResizePlan, ResizeError> {
        let block = logical_block_size;
        let aligned = |bytes: u64| {
            if bytes.is_multiple_of(u64::from(block)) {
                Ok(bytes)
            } else {
                Err(ResizeError::Misaligned { bytes, block })
            }
        };
        match kind {
            // An external backend (Ceph RBD) grows to a size given, as a file does, or takes
            // the size its owner gave it (`rbd resize`), as a block device does; one that
            // cannot be resized says so when asked (engine::ResizeError::NotSupported).
            StorageKind::External if size.is_none() => Ok(ResizePlan::Reread { expect: None }),
            StorageKind::File | StorageKind::Null | StorageKind::External => {
                let to = aligned(size.ok_or(ResizeError::SizeNeeded)?)?;
                if read_only {
                    return Err(ResizeError::ReadOnly);
                }
                if to < from {
                    return Err(ResizeError::Shrink { from, to });
                }
                Ok(ResizePlan::Grow { to })
            }
            // Re-reading writes nothing: a read-only export may take a grown device too.
            StorageKind::BlockDevice => Ok(ResizePlan::Reread {
                expect: size.map(aligned).transpose()?,
            }),
        }
    }
}

/// What the guest heard of a resize.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GuestNotice {
    /// VHOST_USER_BACKEND_CONFIG_CHANGE_MSG delivered (acknowledged, with REPLY_ACK).
    Notified,
    /// Not told; the new size is in force all the same (config reads, request checks).
    NotNotified(NotNotified),
    /// Nothing changed, nothing to tell.
    Unchanged,
}

impl fmt::Display for GuestNotice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GuestNotice::Notified => f.write_str("guest notified"),
            GuestNotice::NotNotified(why) => write!(f, "guest not notified ({why})"),
            GuestNotice::Unchanged => f.write_str("guest not notified (nothing changed)"),
        }
    }
}

/// The outcome of a resize the server accepted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resized {
    pub from_bytes: u64,
    pub to_bytes: u64,
    pub guest: GuestNotice,
}

impl VhostUserBlk {
    /// The capacity in force, in bytes (what GET_CONFIG reports and requests are checked
    /// against).
    pub fn capacity_bytes(&self) -> u64 {
        self.0.capacity_sectors.load(Ordering::Acquire) << SECTOR_SHIFT
    }

    /// Grows the disk (see the module doc) and tells the guest. One log line either way; an
    /// error changes nothing the guest can see.
    pub fn resize(&self, size: Option<u64>) -> Result<Resized, ResizeError> {
        let result = self.resize_serialized(size);
        match &result {
            Ok(r) if r.from_bytes == r.to_bytes => log::info!(
                "resize: the capacity stays {} bytes; {}",
                r.to_bytes,
                r.guest
            ),
            Ok(r) => log::info!(
                "resized from {} to {} bytes; {}",
                r.from_bytes,
                r.to_bytes,
                r.guest
            ),
            Err(e) => log::warn!("resize refused: {e}"),
        }
        result
    }

    fn resize_serialized(&self, size: Option<u64>) -> Result<Resized, ResizeError> {
        let inner = &*self.0;
        let _one_at_a_time = inner.resize_lock.lock().unwrap_or_else(|p| p.into_inner());
        let from = self.capacity_bytes();
        let block = inner.device.logical_block_size;
        let plan = ResizePlan::new(
            size,
            inner.storage.kind(),
            from,
            block,
            inner.device.read_only,
        )?;
        let to = match plan {
            ResizePlan::Grow { to } => {
                if to != from {
                    inner.storage.grow(to)?;
                }
                to
            }
            ResizePlan::Reread { expect } => {
                let device = inner.storage.reread_size()?;
                if let Some(asked) = expect.filter(|&asked| asked != device) {
                    return Err(ResizeError::DeviceSizeDiffers { device, asked });
                }
                let usable = device - device % u64::from(block);
                if usable < from {
                    return Err(ResizeError::DeviceShrank { from, device });
                }
                usable
            }
        };
        if to == from {
            return Ok(Resized {
                from_bytes: from,
                to_bytes: to,
                guest: GuestNotice::Unchanged,
            });
        }
        // After the storage grew (the iothreads' Acquire load pairs with this), before the
        // guest hears of it: a request inside the new size is never refused once it can
        // know the size.
        inner
            .capacity_sectors
            .store(to >> SECTOR_SHIFT, Ordering::Release);
        Ok(Resized {
            from_bytes: from,
            to_bytes: to,
            guest: self.notify_config_change(),
        })
    }

    fn notify_config_change(&self) -> GuestNotice {
        if self.0.frontend.info().connected_since.is_none() {
            return GuestNotice::NotNotified(NotNotified::NoFrontend);
        }
        match self
            .0
            .backend_req
            .config_changed(self.0.config_change_timeout)
        {
            Ok(()) => GuestNotice::Notified,
            Err(why) => GuestNotice::NotNotified(why),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn plan(size: Option<u64>, kind: StorageKind, read_only: bool) -> Result<ResizePlan, String> {
        ResizePlan::new(size, kind, 64 * MIB, 4096, read_only).map_err(|e| e.to_string())
    }

    #[test]
    fn a_file_grows_to_whole_blocks_only() {
        assert_eq!(
            plan(Some(128 * MIB), StorageKind::File, false),
            Ok(ResizePlan::Grow { to: 128 * MIB })
        );
        assert_eq!(
            plan(Some(64 * MIB), StorageKind::File, false),
            Ok(ResizePlan::Grow { to: 64 * MIB }),
            "the same size is a no-op, not an error"
        );
        let e = plan(Some(64 * MIB + 512), StorageKind::File, false).unwrap_err();
        assert!(
            e.contains("not a multiple of the logical block size (4096"),
            "{e}"
        );
    }

    #[test]
    fn a_file_is_never_shrunk_nor_grown_read_only_nor_without_a_size() {
        let e = plan(Some(32 * MIB), StorageKind::File, false).unwrap_err();
        assert!(
            e.contains("shrinking it to 33554432 bytes is refused"),
            "{e}"
        );
        let e = plan(Some(128 * MIB), StorageKind::File, true).unwrap_err();
        assert!(e.contains("read-only"), "{e}");
        let e = plan(None, StorageKind::File, false).unwrap_err();
        assert!(e.contains("give SIZE"), "{e}");
        assert!(plan(Some(128 * MIB), StorageKind::Null, false).is_ok());
    }

    #[test]
    fn a_block_device_is_reread_with_or_without_a_size() {
        assert_eq!(
            plan(None, StorageKind::BlockDevice, false),
            Ok(ResizePlan::Reread { expect: None })
        );
        assert_eq!(
            plan(Some(128 * MIB), StorageKind::BlockDevice, true),
            Ok(ResizePlan::Reread {
                expect: Some(128 * MIB)
            }),
            "re-reading writes nothing: fine when read-only"
        );
        assert!(plan(Some(128 * MIB + 1), StorageKind::BlockDevice, false).is_err());
    }

    #[test]
    fn external_storage_grows_to_a_size_or_takes_the_size_it_has() {
        assert_eq!(
            plan(Some(128 * MIB), StorageKind::External, false),
            Ok(ResizePlan::Grow { to: 128 * MIB })
        );
        assert_eq!(
            plan(None, StorageKind::External, true),
            Ok(ResizePlan::Reread { expect: None }),
            "re-reading writes nothing: fine when read-only"
        );
        assert!(plan(Some(128 * MIB), StorageKind::External, true).is_err());
        assert!(plan(Some(32 * MIB), StorageKind::External, false).is_err());
    }
}
