//! Image locks that QEMU understands, and that understand QEMU's.
//!
//! QEMU's file-posix driver announces how it uses an image with OFD read locks on single bytes
//! (perm.rs): byte `100 + i` while it uses permission `i`, byte `200 + i` while it forbids
//! others to use it. Before it relies on a set of permissions it takes its own bytes, then
//! checks that no other open file description holds the "forbids" byte of any permission it
//! uses, nor the "uses" byte of any permission it forbids. [`ImageLock::acquire`] does the same
//! on a descriptor of its own, so QEMU, qemu-img, qemu-storage-daemon and other uringblk
//! processes see each other both ways. The locks last as long as the [`ImageLock`].

mod ofd;
mod perm;

use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

pub use perm::{Perm, Perms, PERM_BASE, SHARED_BASE};

/// How an export uses its image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    ReadOnly,
    ReadWrite,
}

impl Access {
    /// The permissions an export needs: reads, and writes unless read-only.
    pub fn uses(self) -> Perms {
        match self {
            Access::ReadOnly => Perms::CONSISTENT_READ,
            Access::ReadWrite => Perms::CONSISTENT_READ.union(Perms::WRITE),
        }
    }

    /// What an export lets others do: what a QEMU guest device shares by default (no
    /// share-rw, not resizable). Other writers or a resize would change the disk under the
    /// guest, so they are refused, read-only export or not; readers are always welcome.
    pub fn shares(self) -> Perms {
        Perms::CONSISTENT_READ
            .union(Perms::WRITE_UNCHANGED)
            .union(Perms::GRAPH_MOD)
    }
}

/// Which side of QEMU's scheme the other process is on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Conflict {
    /// It forbids a permission we need (it holds our permission's "unshare" byte).
    Forbids(Perm),
    /// It uses a permission we do not share (it holds that permission's "use" byte).
    Uses(Perm),
    /// It holds an exclusive lock on one of the bytes, which QEMU itself never does.
    Exclusive(u64),
}

impl std::fmt::Display for Conflict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Conflict::Forbids(p) => {
                write!(f, "another process does not share \"{}\" access", p.name())
            }
            Conflict::Uses(p) => write!(f, "another process has \"{}\" access", p.name()),
            Conflict::Exclusive(byte) => {
                write!(f, "another process holds an exclusive lock on byte {byte}")
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("cannot open {} to lock it: {source}", path.display())]
    Open { path: PathBuf, source: io::Error },
    #[error("cannot lock byte {byte} of {}: {source}", path.display())]
    Lock {
        path: PathBuf,
        byte: u64,
        source: io::Error,
    },
    #[error("{} is locked: {conflict} (QEMU-compatible image locks)", path.display())]
    Conflict { path: PathBuf, conflict: Conflict },
}

/// Held image locks; dropping it (closing its descriptor) releases them.
#[derive(Debug)]
pub struct ImageLock {
    file: File,
    path: PathBuf,
}

impl ImageLock {
    /// Locks `path` for an export with `access`.
    pub fn acquire(path: &Path, access: Access) -> Result<ImageLock, LockError> {
        Self::acquire_perms(path, access.uses(), access.shares())
    }

    /// Locks `path` as a QEMU node with permissions `uses` that shares `shares` with others.
    pub fn acquire_perms(path: &Path, uses: Perms, shares: Perms) -> Result<ImageLock, LockError> {
        // Read access is all a read lock needs; the data path has descriptors of its own.
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)
            .map_err(|source| LockError::Open {
                path: path.to_path_buf(),
                source,
            })?;
        let lock = ImageLock {
            file,
            path: path.to_path_buf(),
        };
        let unshared = shares.complement();
        // Announce first, check second (as QEMU does): of two openers racing for conflicting
        // permissions, at least one sees the other's bytes and fails.
        for byte in uses
            .iter()
            .map(Perm::use_byte)
            .chain(unshared.iter().map(Perm::unshare_byte))
        {
            lock.lock_byte(byte)?;
        }
        for perm in uses.iter() {
            lock.check(perm.unshare_byte(), Conflict::Forbids(perm))?;
        }
        for perm in unshared.iter() {
            lock.check(perm.use_byte(), Conflict::Uses(perm))?;
        }
        Ok(lock)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn lock_byte(&self, byte: u64) -> Result<(), LockError> {
        ofd::lock_shared(self.file.as_fd(), byte).map_err(|source| {
            if ofd::is_conflict(&source) {
                self.conflict(Conflict::Exclusive(byte))
            } else {
                LockError::Lock {
                    path: self.path.clone(),
                    byte,
                    source,
                }
            }
        })
    }

    fn check(&self, byte: u64, conflict: Conflict) -> Result<(), LockError> {
        match ofd::held_by_other(self.file.as_fd(), byte) {
            Ok(false) => Ok(()),
            Ok(true) => Err(self.conflict(conflict)),
            Err(source) => Err(LockError::Lock {
                path: self.path.clone(),
                byte,
                source,
            }),
        }
    }

    fn conflict(&self, conflict: Conflict) -> LockError {
        LockError::Conflict {
            path: self.path.clone(),
            conflict,
        }
    }
}
