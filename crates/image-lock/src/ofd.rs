//! Open file description (OFD) byte-range locks on one byte, as QEMU's file-posix takes them:
//! owned by the open file description rather than the process, so they are not dropped when
//! some other descriptor of the same file is closed, and two opens in one process conflict.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

/// A `struct flock` for one byte at `byte`.
fn one_byte(kind: libc::c_int, byte: u64) -> io::Result<libc::flock> {
    let start =
        libc::off_t::try_from(byte).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: flock is a plain C struct; all-zero is a valid value (l_pid must be 0 for OFD
    // requests), and every field that matters is set below.
    let mut lock: libc::flock = unsafe { std::mem::zeroed() };
    lock.l_type = kind as libc::c_short;
    lock.l_whence = libc::SEEK_SET as libc::c_short;
    lock.l_start = start;
    lock.l_len = 1;
    Ok(lock)
}

/// Read-locks `byte` (a shared lock: any number of holders), without waiting. A conflicting
/// write lock gives EAGAIN (or EACCES).
pub fn lock_shared(fd: BorrowedFd<'_>, byte: u64) -> io::Result<()> {
    let lock = one_byte(libc::F_RDLCK, byte)?;
    // SAFETY: F_OFD_SETLK reads the flock we pass, which lives for the call; fd is open.
    let ret = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_OFD_SETLK, &lock) };
    if ret == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// True when another open file description holds any lock on `byte`: the test QEMU makes by
/// asking whether a write (exclusive) lock could be taken. Locks of `fd`'s own description
/// never count.
pub fn held_by_other(fd: BorrowedFd<'_>, byte: u64) -> io::Result<bool> {
    let mut lock = one_byte(libc::F_WRLCK, byte)?;
    // SAFETY: F_OFD_GETLK reads and overwrites the flock we pass, which outlives the call.
    let ret = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_OFD_GETLK, &mut lock) };
    if ret == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(lock.l_type != libc::F_UNLCK as libc::c_short)
}

/// True for the errors with which a lock request says "someone else holds it".
pub fn is_conflict(err: &io::Error) -> bool {
    matches!(err.raw_os_error(), Some(libc::EAGAIN | libc::EACCES))
}
