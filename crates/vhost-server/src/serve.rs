//! The connection loop: one frontend at a time on a listening socket that stays open, so the
//! next VM (or a rebooted one, or the same one after a restart of this server) can attach
//! without restarting anything. Each connection gets a [`Session`] (the protocol state, and
//! one event loop per iothread); its requests are read and answered by the `vhost` crate's
//! `BackendReqHandler` calling into that session.
//!
//! A refused request gets its error reply and the connection goes on (next_request.rs covers
//! what the vhost crate leaves unanswered); EOF, a socket error, a request whose reply has no
//! error form, or an iothread that cannot go on end the connection.

use std::os::unix::net::UnixStream;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use vhost::vhost_user::{BackendReqHandler, Error as VhostUserError, Listener};

use crate::next_request::{self, Header};
use crate::ratelimit::RateLimit;
use crate::session::Session;
use crate::VhostUserBlk;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot listen on {path}: {source}")]
    Listen {
        path: String,
        source: vhost::vhost_user::Error,
    },
}

/// Ends the current connection from another thread (an iothread that cannot go on).
pub(crate) struct ConnectionHandle {
    stream: UnixStream,
    asked: Arc<AtomicBool>,
}

impl ConnectionHandle {
    pub(crate) fn shutdown(&self) {
        self.asked.store(true, Ordering::SeqCst);
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }
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
    let listener = Listener::new(socket, true).map_err(|source| ServeError::Listen {
        path: path.clone(),
        source,
    })?;
    on_listening();
    let mut connection = 0u64;
    while !stop.load(Ordering::SeqCst) {
        let stream = match listener.accept() {
            Ok(Some(stream)) => stream,
            Ok(None) => continue,
            Err(e) => {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                log::error!("accepting a frontend failed: {e}");
                // Out of fds, say: do not spin.
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        connection += 1;
        serve_connection(backend, stream, connection);
    }
    Ok(())
}

/// One connection, from accept to the moment its iothreads are idle again.
fn serve_connection(backend: &VhostUserBlk, stream: UnixStream, number: u64) {
    let since = Instant::now();
    let (peer, handle) = match (stream.try_clone(), stream.try_clone()) {
        (Ok(peer), Ok(handle)) => (peer, handle),
        (Err(e), _) | (_, Err(e)) => {
            log::error!("frontend #{number}: cannot use its socket: {e}");
            return;
        }
    };
    let session = match Session::start(backend) {
        Ok(s) => Arc::new(Mutex::new(s)),
        Err(e) => {
            log::error!("frontend #{number}: cannot start the iothreads' event loops: {e}");
            return;
        }
    };
    let asked = Arc::new(AtomicBool::new(false));
    backend.connection_started(ConnectionHandle {
        stream: handle,
        asked: asked.clone(),
    });
    log::info!("frontend #{number} connected");
    let mut handler = BackendReqHandler::from_stream(stream, session.clone());
    let end = serve_requests(&mut handler, &session, &peer);
    let lasted = since.elapsed();
    match end {
        End::Disconnected if asked.load(Ordering::SeqCst) => log::warn!(
            "frontend #{number}: connection ended by the server after {lasted:.1?} (see the \
             error above)"
        ),
        End::Disconnected => log::info!("frontend #{number} disconnected after {lasted:.1?}"),
        End::Protocol(why) => {
            log::error!("frontend #{number}: connection ended after {lasted:.1?}: {why}")
        }
    }
    // The iothreads finish their in-flight I/O on their own rings, then their loops end.
    if let Err(e) = backend.quiesce() {
        log::error!("after frontend #{number}: {e}");
    }
    lock(&session).stop_loops();
    drop(handler);
    backend.connection_closed();
}

enum End {
    /// EOF or a socket error (the frontend went away, or the server shut the socket).
    Disconnected,
    /// The connection cannot go on.
    Protocol(String),
}

fn lock(session: &Mutex<Session>) -> MutexGuard<'_, Session> {
    session.lock().unwrap_or_else(|p| p.into_inner())
}

/// Requests until the connection ends.
fn serve_requests(
    handler: &mut BackendReqHandler<Mutex<Session>>,
    session: &Mutex<Session>,
    peer: &UnixStream,
) -> End {
    let mut warnings = RateLimit::new();
    loop {
        let header = match next_request::peek(peer) {
            Ok(h) => h,
            Err(e) => {
                log::debug!("reading the next request: {e}");
                return End::Disconnected;
            }
        };
        if let Some(h) = &header {
            log::debug!("frontend request {}", h.name());
        }
        // A panic in a request's handling would take the protocol thread with it, and the
        // server would stop answering: this connection ends instead, loudly.
        let result = match catch_unwind(AssertUnwindSafe(|| handler.handle_request())) {
            Ok(result) => result,
            Err(_) => {
                return End::Protocol(format!(
                    "handling {} panicked",
                    header.map_or_else(|| "a request".to_string(), |h| h.name())
                ))
            }
        };
        let refusal = lock(session).take_refusal();
        let e = match result {
            Ok(()) => {
                // A refusal the vhost crate answered in its own way (GET_CONFIG: size 0).
                if let Some(r) = refusal {
                    warn_limited(&mut warnings, &format!("{} refused: {}", r.request, r.why));
                }
                continue;
            }
            Err(e) => e,
        };
        if is_socket_error(&e) {
            log::debug!("frontend socket: {e}");
            return End::Disconnected;
        }
        let Some(header) = header.filter(Header::framed) else {
            return End::Protocol(format!(
                "malformed request header ({e}): where the next request starts is unknown"
            ));
        };
        let name = header.name();
        if header.body_left_unread() {
            if let Err(e) = next_request::skip_body(peer, &header) {
                log::debug!("skipping the body of {name}: {e}");
                return End::Disconnected;
            }
        }
        let why = match &refusal {
            Some(r) => r.why.to_string(),
            None => e.to_string(),
        };
        let answered = if header.is_get_inflight_fd() {
            // No error form, but "no region" is an answer QEMU takes.
            next_request::send_no_inflight(peer, &header)
        } else if header.has_own_reply() {
            return End::Protocol(format!(
                "{name} failed ({why}) and its reply has no error form; the frontend would \
                 wait for it forever"
            ));
        } else if refusal.is_none() && header.needs_ack() && lock(session).reply_ack() {
            // Refused by the vhost crate itself, which sent no REPLY_ACK.
            next_request::send_error_ack(peer, &header)
        } else {
            Ok(())
        };
        if let Err(e) = answered {
            log::debug!("answering {name}: {e}");
            return End::Disconnected;
        }
        warn_limited(&mut warnings, &format!("{name} refused: {why}"));
    }
}

fn is_socket_error(e: &VhostUserError) -> bool {
    matches!(
        e,
        VhostUserError::Disconnected
            | VhostUserError::PartialMessage
            | VhostUserError::SocketError(_)
            | VhostUserError::SocketBroken(_)
            | VhostUserError::SocketRetry(_)
            | VhostUserError::SocketConnect(_)
    )
}

/// A frontend that keeps sending bad requests is heard a few times a second.
fn warn_limited(limit: &mut RateLimit, line: &str) {
    match limit.allow() {
        Some(0) => log::warn!("{line}"),
        Some(left_out) => log::warn!("{line} ({left_out} similar lines left out)"),
        None => {}
    }
}
