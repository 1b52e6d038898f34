//! The connection loop: one frontend at a time on a listening socket that stays open, so the
//! next VM (or a rebooted one) can attach without restarting the server.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use vhost::vhost_user::Listener;
use vhost_user_backend::VhostUserDaemon;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

use crate::VhostUserBlk;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot listen on {path}: {source}")]
    Listen {
        path: String,
        source: vhost::vhost_user::Error,
    },
    #[error("vhost-user daemon: {0}")]
    Daemon(String),
    #[error("cannot watch I/O completions: {0}")]
    Register(std::io::Error),
}

/// Serves frontends one after another until `stop` is set (checked between connections).
/// `on_listening` runs once the socket exists.
pub fn serve(
    backend: &VhostUserBlk,
    socket: &Path,
    stop: &Arc<AtomicBool>,
    on_listening: impl FnOnce(),
) -> Result<(), ServeError> {
    let path = socket.to_string_lossy().into_owned();
    let mut listener = Listener::new(socket, true).map_err(|source| ServeError::Listen {
        path: path.clone(),
        source,
    })?;
    on_listening();
    let mut connection = 0u64;
    while !stop.load(Ordering::SeqCst) {
        // A fresh daemon per connection: the library's worker threads end with each one.
        let mut daemon = VhostUserDaemon::new(
            "uringblk".to_string(),
            backend.clone(),
            GuestMemoryAtomic::new(GuestMemoryMmap::new()),
        )
        .map_err(|e| ServeError::Daemon(e.to_string()))?;
        backend
            .register_completion_fds(&daemon.get_epoll_handlers())
            .map_err(ServeError::Register)?;
        if let Err(e) = daemon.start(&mut listener) {
            if stop.load(Ordering::SeqCst) {
                break;
            }
            log::error!("accepting a frontend failed: {e}");
            continue;
        }
        connection += 1;
        log::info!("frontend #{connection} connected");
        backend.connection_started(daemon.shutdown_handle());
        match daemon.wait() {
            Ok(()) => log::info!("frontend #{connection} disconnected"),
            // A VM that shuts down just closes the socket: that is not worth a warning.
            Err(e) if e.to_string().contains("disconnected") => {
                log::info!("frontend #{connection} disconnected")
            }
            Err(e) => log::warn!("frontend #{connection} ended with an error: {e}"),
        }
        // The iothreads finish their in-flight I/O on their own rings, then end (exit events).
        if let Err(e) = backend.quiesce() {
            log::error!("after frontend #{connection}: {e}");
        }
        drop(daemon);
        backend.connection_closed();
    }
    Ok(())
}
