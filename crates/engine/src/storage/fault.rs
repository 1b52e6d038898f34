//! A fault-injecting test backend: the disk is a buffer in memory, every op the engine hands
//! it is done for real on that buffer and recorded (kind, range, durability flags), and ops
//! chosen by rules (kind, byte range, how many) fail instead: with an errno (EIO, ENOSPC,
//! EAGAIN), a short transfer, a failing data sync, or a refusal to start (a submission
//! failure). It is an [`ExternalStorage`]: its completions reach the engine through the
//! completion eventfd, as librbd's will. Built for tests (here and in vhost-server's), never
//! offered by the binary.

use std::ops::Range;
use std::sync::{Arc, Mutex, MutexGuard};

use super::external::{CompletionQueue, ExternalStorage};
use super::op::{IoKind, IoOp};

/// What a matching op suffers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Fails with this errno (EIO, ENOSPC, EAGAIN, ...) without touching the data.
    Errno(i32),
    /// Transfers at most this many bytes (reads and writes), reporting the short count.
    Short(u64),
    /// The data sync fails with EIO: a FLUSH, a RWF_DSYNC write, or a discard / write-zeroes
    /// with a sync after it. The data itself is written.
    FailSync,
    /// The op cannot be started at all (`start` returns the errno).
    Reject(i32),
}

/// Selects ops by kind and byte range, and how many of them fail.
#[derive(Clone, Debug)]
pub struct FaultRule {
    /// Which kinds (see [`FaultRule::kinds`]); empty matches none.
    kinds: u8,
    /// Ops overlapping this byte range match (flushes match whatever the range).
    pub range: Range<u64>,
    /// Let this many matching ops through first.
    pub skip: u32,
    /// Fail this many matching ops, then none.
    pub times: u32,
    pub fault: Fault,
}

fn kind_bit(kind: IoKind) -> u8 {
    match kind {
        IoKind::Read => 1,
        IoKind::Write => 2,
        IoKind::Flush => 4,
        IoKind::Discard => 8,
        IoKind::WriteZeroes { .. } => 16,
    }
}

impl FaultRule {
    /// Every op of the given kinds (`unmap` of WriteZeroes is ignored), any range, forever.
    pub fn kinds(kinds: &[IoKind], fault: Fault) -> FaultRule {
        FaultRule {
            kinds: kinds.iter().fold(0, |m, &k| m | kind_bit(k)),
            range: 0..u64::MAX,
            skip: 0,
            times: u32::MAX,
            fault,
        }
    }

    pub fn at(mut self, range: Range<u64>) -> FaultRule {
        self.range = range;
        self
    }

    pub fn times(mut self, times: u32) -> FaultRule {
        self.times = times;
        self
    }

    pub fn skip(mut self, skip: u32) -> FaultRule {
        self.skip = skip;
        self
    }

    fn matches(&self, op: &IoOp<'_>) -> bool {
        if self.kinds & kind_bit(op.kind) == 0 {
            return false;
        }
        op.kind == IoKind::Flush
            || (op.offset < self.range.end && op.offset + op.len.max(1) > self.range.start)
    }
}

/// One op the backend was handed, as the engine planned it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OpRecord {
    pub kind: IoKind,
    pub offset: u64,
    pub len: u64,
    /// Carried RWF_DSYNC.
    pub dsync: bool,
    /// A data sync was to follow it before completion.
    pub sync_after: bool,
    /// The fault injected, if any.
    pub fault: Option<Fault>,
    /// The result reported (bytes, 0, -errno), None when it was refused.
    pub result: Option<i32>,
}

#[derive(Debug)]
pub struct FaultStorage {
    data: Mutex<Vec<u8>>,
    rules: Mutex<Vec<FaultRule>>,
    record: Mutex<Vec<OpRecord>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl FaultStorage {
    /// A disk holding `data`, with no faults yet.
    pub fn new(data: Vec<u8>) -> Arc<FaultStorage> {
        Arc::new(FaultStorage {
            data: Mutex::new(data),
            rules: Mutex::new(Vec::new()),
            record: Mutex::new(Vec::new()),
        })
    }

    pub fn capacity(&self) -> u64 {
        lock(&self.data).len() as u64
    }

    /// Adds a rule; the first matching rule with failures left applies.
    pub fn inject(&self, rule: FaultRule) {
        lock(&self.rules).push(rule);
    }

    pub fn clear_faults(&self) {
        lock(&self.rules).clear();
    }

    /// Every op seen so far, in the order the engine started them.
    pub fn record(&self) -> Vec<OpRecord> {
        lock(&self.record).clone()
    }

    pub fn clear_record(&self) {
        lock(&self.record).clear();
    }

    /// A copy of `len` bytes of the disk at `offset`.
    pub fn bytes(&self, offset: u64, len: usize) -> Vec<u8> {
        let data = lock(&self.data);
        let start = (offset as usize).min(data.len());
        let end = (start + len).min(data.len());
        data[start..end].to_vec()
    }

    fn pick_fault(&self, op: &IoOp<'_>) -> Option<Fault> {
        let mut rules = lock(&self.rules);
        let rule = rules.iter_mut().find(|r| r.times > 0 && r.matches(op))?;
        if rule.skip > 0 {
            rule.skip -= 1;
            return None;
        }
        rule.times -= 1;
        Some(rule.fault)
    }

    /// Does `op` on the buffer, at most `limit` bytes of it: the bytes transferred.
    fn execute(&self, op: &IoOp<'_>, limit: u64) -> u64 {
        let mut data = lock(&self.data);
        let size = data.len() as u64;
        let start = op.offset.min(size);
        let len = op.len.min(limit).min(size - start);
        let (start, len) = (start as usize, len as usize);
        match op.kind {
            IoKind::Read => {
                let mut done = 0;
                for v in op.iovecs {
                    let n = v.iov_len.min(len - done);
                    // SAFETY: the engine keeps each iovec valid (guest memory or a bounce
                    // buffer, writable for a read) until the op's completion is reaped, which
                    // is after this returns; data[start + done..][..n] is inside the buffer.
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            data.as_ptr().add(start + done),
                            v.iov_base.cast::<u8>(),
                            n,
                        )
                    };
                    done += n;
                }
                done as u64
            }
            IoKind::Write => {
                let mut done = 0;
                for v in op.iovecs {
                    let n = v.iov_len.min(len - done);
                    // SAFETY: as for reads; the iovec is readable and data has room.
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            v.iov_base.cast::<u8>(),
                            data.as_mut_ptr().add(start + done),
                            n,
                        )
                    };
                    done += n;
                }
                done as u64
            }
            IoKind::Discard | IoKind::WriteZeroes { .. } => {
                data[start..start + len].fill(0);
                0
            }
            IoKind::Flush => 0,
        }
    }
}

impl ExternalStorage for FaultStorage {
    fn start(&self, op: &IoOp<'_>, done: &Arc<CompletionQueue>) -> Result<(), i32> {
        let fault = self.pick_fault(op);
        let result = match fault {
            Some(Fault::Reject(_)) => None,
            Some(Fault::Errno(errno)) => Some(-errno),
            Some(Fault::Short(n)) => Some(self.execute(op, n) as i32),
            Some(Fault::FailSync) => {
                let n = self.execute(op, u64::MAX);
                let syncs = op.kind == IoKind::Flush || op.dsync || op.sync_after;
                Some(if syncs { -libc::EIO } else { n as i32 })
            }
            None => Some(self.execute(op, u64::MAX) as i32),
        };
        lock(&self.record).push(OpRecord {
            kind: op.kind,
            offset: op.offset,
            len: op.len,
            dsync: op.dsync,
            sync_after: op.sync_after,
            fault,
            result,
        });
        match (result, fault) {
            (Some(res), _) => {
                done.complete(op.key, res);
                Ok(())
            }
            (None, Some(Fault::Reject(errno))) => Err(errno),
            (None, _) => Err(libc::EIO),
        }
    }
}
