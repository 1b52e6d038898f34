//! Control-path requests to an iothread. The vhost-user thread and the main thread never touch
//! an iothread's ring (it is SINGLE_ISSUER: only its own thread may submit to it or reap it);
//! they post a message on the iothread's channel, wake it through an eventfd in its epoll, and
//! wait, for a bounded time, for its answer.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::GuestMem;

/// What the iothread answers: Ok, or why not.
pub(crate) type Reply = Sender<Result<(), String>>;

pub(crate) enum ControlMsg {
    /// Finish every request in flight, then forget guest memory (disconnect, shutdown).
    Quiesce(Reply),
    /// The frontend changed the memory table.
    SetMemory(GuestMem, Reply),
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum ControlError {
    #[error("iothread {0} did not answer within {1:?}")]
    NoAnswer(usize, Duration),
    #[error("iothread {0} is gone")]
    Gone(usize),
    #[error("iothread {0}: {1}")]
    Failed(usize, String),
}

/// One iothread's end of the control path.
pub(crate) struct ControlPort {
    thread: usize,
    tx: Sender<ControlMsg>,
    rx: Receiver<ControlMsg>,
    wake: EventFd,
}

impl ControlPort {
    pub(crate) fn new(thread: usize) -> io::Result<ControlPort> {
        let (tx, rx) = crossbeam_channel::unbounded();
        Ok(ControlPort {
            thread,
            tx,
            rx,
            wake: EventFd::new(EFD_NONBLOCK)?,
        })
    }

    /// Readable when messages wait: add it to the iothread's epoll.
    pub(crate) fn eventfd(&self) -> RawFd {
        self.wake.as_raw_fd()
    }

    /// Posts the message `make` builds around a reply channel and wakes the iothread; the
    /// answer arrives on the returned channel.
    pub(crate) fn post(
        &self,
        make: impl FnOnce(Reply) -> ControlMsg,
    ) -> Result<Receiver<Result<(), String>>, ControlError> {
        let (reply, answer) = crossbeam_channel::bounded(1);
        self.tx
            .send(make(reply))
            .map_err(|_| ControlError::Gone(self.thread))?;
        if self.wake.write(1).is_err() {
            return Err(ControlError::Gone(self.thread));
        }
        Ok(answer)
    }

    /// Waits up to `timeout` for the answer to a posted message.
    pub(crate) fn wait(
        &self,
        answer: Receiver<Result<(), String>>,
        timeout: Duration,
    ) -> Result<(), ControlError> {
        match answer.recv_timeout(timeout) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(why)) => Err(ControlError::Failed(self.thread, why)),
            Err(RecvTimeoutError::Timeout) => Err(ControlError::NoAnswer(self.thread, timeout)),
            Err(RecvTimeoutError::Disconnected) => Err(ControlError::Gone(self.thread)),
        }
    }

    /// On the iothread: the next message, if any (the wake-up eventfd is reset first, so a
    /// message posted meanwhile wakes the thread again).
    pub(crate) fn next(&self) -> Option<ControlMsg> {
        let _ = self.wake.read();
        self.rx.try_recv().ok()
    }

    /// Drops messages no thread took (their callers timed out, or the loops ended first). A
    /// caller still waiting sees its reply channel close (ControlError::Gone) and does the
    /// work in place, as it does when the thread is gone.
    pub(crate) fn discard_stale(&self) {
        while let Ok(msg) = self.rx.try_recv() {
            drop(msg);
        }
    }

    /// Messages posted and not yet taken (a busy-polling iothread stops polling for them).
    pub(crate) fn pending(&self) -> bool {
        !self.rx.is_empty()
    }
}
