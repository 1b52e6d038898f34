//! DISCARD on a block device is a real discard (REQ_OP_DISCARD), not fallocate: on a block
//! device PUNCH_HOLE is a write-zeroes, which costs a thin or SSD target a write where the
//! guest asked it to forget. Where the kernel has it (6.12+) the op is IORING_OP_URING_CMD
//! with BLOCK_URING_CMD_DISCARD (start in sqe->addr, length in sqe->addr3), async on the ring.
//! The first command that fails with EINVAL or EOPNOTSUPP, before one has succeeded, means the
//! kernel lacks it: that op and every later one go to BLKDISCARD instead. The ioctl blocks
//! until the device is done, so it runs on a helper thread of this engine (spawned at the
//! first such op), never on the iothread; its results come back through the engine's
//! completion eventfd and are reaped like CQEs. io_uring has no ioctl op, and the fallocate
//! mode that once meant "discard" on a block device (PUNCH_HOLE | NO_HIDE_STALE) is refused by
//! current kernels, so a thread it is.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use io_uring::{opcode, squeue, types};

use crate::storage::{IoKind, Storage, StorageKind};
use crate::Engine;

/// _IO(0x12, 0): the block layer's io_uring command number space reuses its ioctl code.
const BLOCK_URING_CMD_DISCARD: u32 = 0x12 << 8;
/// _IO(0x12, 119).
const BLKDISCARD: libc::Ioctl = (0x12 << 8) | 119;

/// How DISCARD reaches a block device.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum BlockDiscard {
    /// BLOCK_URING_CMD_DISCARD where the kernel has it, else BLKDISCARD.
    #[default]
    Auto,
    /// BLKDISCARD only (the fallback, forced: for tests and for kernels whose command is
    /// broken).
    Ioctl,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Command {
    Unknown,
    Works,
    Absent,
}

/// One engine's block-device discard state: whether the io_uring command works here, and the
/// BLKDISCARD helper once one was needed.
pub(crate) struct Discarder {
    command: Command,
    worker: Option<IoctlWorker>,
    /// Ops the helper has not answered yet.
    outstanding: usize,
    counts: BlockDiscardCounts,
}

/// Block-device discards that completed, by the way they went.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlockDiscardCounts {
    pub by_command: u64,
    pub by_ioctl: u64,
}

impl Discarder {
    pub(crate) fn new(mode: BlockDiscard) -> Discarder {
        Discarder {
            command: match mode {
                BlockDiscard::Auto => Command::Unknown,
                BlockDiscard::Ioctl => Command::Absent,
            },
            worker: None,
            outstanding: 0,
            counts: BlockDiscardCounts::default(),
        }
    }

    /// A block-device discard completed (`ioctl`: by BLKDISCARD).
    pub(crate) fn count(&mut self, ioctl: bool) {
        if ioctl {
            self.counts.by_ioctl += 1;
        } else {
            self.counts.by_command += 1;
        }
    }

    pub(crate) fn use_ioctl(&self) -> bool {
        self.command == Command::Absent
    }

    /// A URING_CMD discard's result: false when it says the kernel lacks the command, so
    /// the op must go again by ioctl (the caller re-dispatches it).
    pub(crate) fn command_result(&mut self, res: i32) -> bool {
        let absent = res == -libc::EINVAL || res == -libc::EOPNOTSUPP;
        match self.command {
            Command::Unknown if absent => {
                log::info!(
                    "this kernel has no io_uring block discard command ({}): using BLKDISCARD",
                    std::io::Error::from_raw_os_error(-res)
                );
                self.command = Command::Absent;
                false
            }
            // An op issued before the probe decided.
            Command::Absent if absent => false,
            Command::Unknown if res >= 0 => {
                self.command = Command::Works;
                true
            }
            _ => true,
        }
    }
}

/// One BLKDISCARD for the helper: op key, start, length, and whether a data sync follows
/// (writethrough).
type Job = (u64, u64, u64, bool);

/// The helper thread: jobs in, (op key, 0 or -errno) out.
struct IoctlWorker {
    jobs: mpsc::Sender<Job>,
    done: Arc<Mutex<Vec<(u64, i32)>>>,
}

impl IoctlWorker {
    fn spawn(storage: Arc<Storage>, eventfd: OwnedFd) -> std::io::Result<IoctlWorker> {
        let (jobs, rx) = mpsc::channel::<Job>();
        let done = Arc::new(Mutex::new(Vec::new()));
        let results = done.clone();
        std::thread::Builder::new()
            .name("uringblk-discard".into())
            .spawn(move || {
                // Ends when the engine (the sender) goes away.
                while let Ok((key, start, len, sync_after)) = rx.recv() {
                    let mut res = blkdiscard(&storage, start, len);
                    if res == 0 && sync_after {
                        res = match storage.sync() {
                            Ok(()) => 0,
                            Err(e) => -e.raw_os_error().unwrap_or(libc::EIO),
                        };
                    }
                    results
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push((key, res));
                    let one = 1u64;
                    // SAFETY: writes 8 bytes from a u64 we own to an eventfd this thread owns
                    // (a duplicate of the engine's); a full counter still leaves it readable.
                    unsafe { libc::write(eventfd.as_raw_fd(), (&one as *const u64).cast(), 8) };
                }
            })?;
        Ok(IoctlWorker { jobs, done })
    }
}

/// BLKDISCARD of `len` bytes at `start`: 0 or -errno.
fn blkdiscard(storage: &Storage, start: u64, len: u64) -> i32 {
    let Some(fd) = storage.raw_fd() else {
        return -libc::EBADF;
    };
    let range = [start, len];
    // SAFETY: BLKDISCARD reads two u64s through the pointer, which points at an array of two.
    let rc = unsafe { libc::ioctl(fd, BLKDISCARD, range.as_ptr()) };
    if rc == 0 {
        0
    } else {
        -std::io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO)
    }
}

/// The SQE of a block-device discard: the command's start in `addr`, its length in `addr3`,
/// which is the first 8 bytes of the 16-byte command area UringCmd16 fills.
pub(crate) fn discard_sqe(fd: types::Fixed, offset: u64, len: u64) -> squeue::Entry {
    let mut cmd = [0u8; 16];
    cmd[..8].copy_from_slice(&len.to_ne_bytes());
    opcode::UringCmd16::new(fd, BLOCK_URING_CMD_DISCARD)
        .addr(Some(offset))
        .cmd(cmd)
        .build()
}

impl Engine {
    /// A discard of a block device that goes by BLKDISCARD: the command is absent (or
    /// turned off), or said so for this very op.
    pub(crate) fn goes_by_ioctl(&self, key: usize) -> bool {
        let op = &self.ops[key];
        op.kind == IoKind::Discard
            && self.storage.kind() == StorageKind::BlockDevice
            && (op.alternate || self.discarder.use_ioctl())
    }

    /// Hands a block-device discard to the BLKDISCARD helper (started on first use).
    pub(crate) fn discard_by_ioctl(&mut self, key: usize) {
        let op = &mut self.ops[key];
        op.alternate = true;
        let job = (key as u64, op.offset, op.remaining, op.sync_after);
        if self.discarder.worker.is_none() {
            let spawned = dup_fd(self.eventfd.as_raw_fd())
                .and_then(|fd| IoctlWorker::spawn(self.storage.clone(), fd));
            match spawned {
                Ok(w) => self.discarder.worker = Some(w),
                Err(e) => {
                    log::error!("cannot start the BLKDISCARD helper thread: {e}");
                    self.finish_op(key, Some(libc::EIO));
                    return;
                }
            }
        }
        let sent = self
            .discarder
            .worker
            .as_ref()
            .is_some_and(|w| w.jobs.send(job).is_ok());
        if sent {
            self.discarder.outstanding += 1;
        } else {
            log::error!("the BLKDISCARD helper thread is gone");
            self.discarder.worker = None;
            self.finish_op(key, Some(libc::EIO));
        }
    }

    /// Results the BLKDISCARD helper posted, handled like CQEs.
    pub(crate) fn reap_ioctl_discards(&mut self) {
        if self.discarder.outstanding == 0 {
            return;
        }
        let done = match &self.discarder.worker {
            Some(w) => std::mem::take(&mut *w.done.lock().unwrap_or_else(|p| p.into_inner())),
            None => return,
        };
        for (key, res) in done {
            self.discarder.outstanding -= 1;
            self.on_cqe(key, res);
        }
    }

    /// Block-device discards that completed, by the way they went.
    pub fn block_discards(&self) -> BlockDiscardCounts {
        self.discarder.counts
    }

    /// Block-device discards the helper thread has not answered.
    pub(crate) fn ioctl_discards_outstanding(&self) -> usize {
        self.discarder.outstanding
    }
}

fn dup_fd(fd: i32) -> std::io::Result<OwnedFd> {
    // SAFETY: F_DUPFD_CLOEXEC on a descriptor this engine owns; the result is checked.
    let new = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
    if new < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `new` is a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(new) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_einval_or_eopnotsupp_turns_the_command_off_for_good() {
        for errno in [libc::EINVAL, libc::EOPNOTSUPP] {
            let mut d = Discarder::new(BlockDiscard::Auto);
            assert!(!d.use_ioctl());
            assert!(!d.command_result(-errno), "retried by ioctl");
            assert!(d.use_ioctl());
            // A second op that was already on the ring when the probe decided goes again too.
            assert!(!d.command_result(-errno));
        }
    }

    #[test]
    fn once_the_command_worked_its_errors_are_the_ops_own() {
        let mut d = Discarder::new(BlockDiscard::Auto);
        assert!(d.command_result(0));
        assert!(d.command_result(-libc::EINVAL), "final: not retried");
        assert!(d.command_result(-libc::EIO));
        assert!(!d.use_ioctl());
    }

    #[test]
    fn forced_ioctl_never_uses_the_command() {
        assert!(Discarder::new(BlockDiscard::Ioctl).use_ioctl());
    }

    #[test]
    fn the_sqe_carries_start_in_addr_and_length_in_addr3() {
        let e = discard_sqe(types::Fixed(0), 1 << 20, 4 << 20);
        // SAFETY: an Entry is the 64-byte io_uring_sqe; reading its bytes is sound.
        let raw: [u8; 64] = unsafe { std::mem::transmute(e) };
        assert_eq!(raw[0], opcode::UringCmd16::CODE);
        let u32_at = |o: usize| u32::from_ne_bytes(raw[o..o + 4].try_into().unwrap());
        let u64_at = |o: usize| u64::from_ne_bytes(raw[o..o + 8].try_into().unwrap());
        assert_eq!(u32_at(8), 0x1200, "cmd_op = _IO(0x12, 0)");
        assert_eq!(&raw[2..4], &[0, 0], "ioprio");
        assert_eq!(u32_at(12), 0, "__pad1");
        assert_eq!(u64_at(16), 1 << 20, "addr = start");
        assert_eq!(u64_at(48), 4 << 20, "addr3 = length");
        // The kernel refuses the command unless these are zero.
        assert_eq!(u32_at(24), 0, "len");
        assert_eq!(u32_at(28), 0, "rw_flags");
        assert_eq!(u32_at(44), 0, "file_index");
    }
}
