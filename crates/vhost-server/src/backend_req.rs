//! The backend-request channel: the socket a frontend that negotiated BACKEND_REQ hands us
//! with VHOST_USER_SET_BACKEND_REQ_FD, for messages from us to it. It belongs to the
//! connection it came with (dropped when that ends). uringblk sends one message on it:
//! VHOST_USER_BACKEND_CONFIG_CHANGE_MSG after the capacity changed, upon which the frontend
//! reads the config space again (GET_CONFIG) and, for QEMU, raises the guest's config
//! interrupt.
//!
//! vhost's `Backend` sends it and, when REPLY_ACK was negotiated (the library then sets the
//! flag on the `Backend` it hands us), waits for the frontend's answer with no time limit.
//! That wait runs on a thread of its own, and the caller waits for it a bounded time: a
//! frontend that never answers costs one parked thread (until it answers or closes the
//! socket), never the control path. While it is parked, later changes are not sent (the
//! frontend reads the whole config when it gets to the first message).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crossbeam_channel::RecvTimeoutError;
use vhost::vhost_user::{Backend, VhostUserFrontendReqHandler};

/// Why the guest was not told of a config change (the change is in force regardless).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NotNotified {
    #[error("no frontend connected")]
    NoFrontend,
    #[error("the frontend did not negotiate BACKEND_REQ, so it has no channel for it")]
    NoChannel,
    #[error("the frontend has not answered the previous config change message yet")]
    StillWaiting,
    #[error("the frontend did not answer the config change message within {0:?}")]
    NoAnswer(Duration),
    #[error("the config change message failed: {0}")]
    Failed(String),
}

#[derive(Default)]
pub(crate) struct BackendChannel {
    current: Mutex<Option<Backend>>,
    /// A config change message still waits for the frontend's answer.
    waiting: Arc<AtomicBool>,
}

impl BackendChannel {
    /// SET_BACKEND_REQ_FD: this connection's channel (a second one replaces the first).
    pub(crate) fn keep(&self, backend: Backend) {
        *self.lock() = Some(backend);
    }

    /// The connection ended: its channel goes with it.
    pub(crate) fn clear(&self) {
        *self.lock() = None;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Backend>> {
        self.current.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sends VHOST_USER_BACKEND_CONFIG_CHANGE_MSG and waits up to `timeout` for it to be
    /// delivered (with REPLY_ACK: acknowledged).
    pub(crate) fn config_changed(&self, timeout: Duration) -> Result<(), NotNotified> {
        let backend = self.lock().clone().ok_or(NotNotified::NoChannel)?;
        if self.waiting.swap(true, Ordering::AcqRel) {
            return Err(NotNotified::StillWaiting);
        }
        let (tx, answer) = crossbeam_channel::bounded(1);
        let waiting = self.waiting.clone();
        let spawned = std::thread::Builder::new()
            .name("config-change".into())
            .spawn(move || {
                let result = backend.handle_config_change().map_err(|e| e.to_string());
                waiting.store(false, Ordering::Release);
                let _ = tx.send(result);
            });
        if let Err(e) = spawned {
            self.waiting.store(false, Ordering::Release);
            return Err(NotNotified::Failed(format!("cannot start a thread: {e}")));
        }
        match answer.recv_timeout(timeout) {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(NotNotified::Failed(e)),
            Err(RecvTimeoutError::Timeout) => Err(NotNotified::NoAnswer(timeout)),
            Err(RecvTimeoutError::Disconnected) => Err(NotNotified::Failed(
                "the sending thread ended without a result".into(),
            )),
        }
    }
}
