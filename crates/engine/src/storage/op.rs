//! What the engine hands a storage backend: one planned op (a merged read or write, a flush,
//! one discard or write-zeroes range), described without io_uring, so that a backend whose
//! I/O goes elsewhere (librbd, the fault backend) takes the same ops as the ring does.

/// The kind of a planned op.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoKind {
    Read,
    Write,
    /// Make every completed write durable (fdatasync).
    Flush,
    /// Deallocate `len` bytes at `offset`; a hint: leaving the data is a valid discard.
    Discard,
    /// Make `len` bytes at `offset` read as zeros; `unmap` allows deallocating them.
    WriteZeroes {
        unmap: bool,
    },
}

impl IoKind {
    /// Ops that change the data (the ones writethrough makes durable before they complete).
    pub fn is_write_type(self) -> bool {
        matches!(
            self,
            IoKind::Write | IoKind::Discard | IoKind::WriteZeroes { .. }
        )
    }
}

/// One op, as a backend sees it. Its completion is reported as a CQE's result would be: bytes
/// transferred (reads, writes; fewer than `len` is a short transfer, resubmitted for the rest),
/// 0 (the others), or a negative errno (-EAGAIN is retried).
#[derive(Clone, Copy, Debug)]
pub struct IoOp<'a> {
    /// Names the op in its completion.
    pub key: u64,
    pub kind: IoKind,
    /// Byte offset into the storage.
    pub offset: u64,
    /// Bytes the op covers (reads and writes: the sum of `iovecs`).
    pub len: u64,
    /// Reads and writes: the buffers, valid until the op's completion is reaped.
    pub iovecs: &'a [libc::iovec],
    /// Writes: durable before they complete (RWF_DSYNC), the write cache being off.
    pub dsync: bool,
    /// Discard / write-zeroes: a data sync follows and its error is the op's (writethrough).
    pub sync_after: bool,
    /// Write-zeroes: the backend said the preferred way is unsupported; use the other one
    /// (unmap: zero the range instead of punching a hole, or the reverse).
    pub alternate: bool,
}
