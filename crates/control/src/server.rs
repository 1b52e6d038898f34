//! The control socket's server: an accept thread and one short-lived thread per connection,
//! none of them an iothread, so a slow or stuck client never holds up the data path.

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use serde_json::Value;

use crate::protocol::{Command, ProtocolError, Reply, MAX_LINE};

/// What executes parsed commands (the uringblk binary implements it over the running server).
pub trait ControlHandler: Send + Sync + 'static {
    fn handle(&self, command: &Command) -> Result<Value, String>;
}

/// Connections served at once; more get an error reply and are closed.
const MAX_CONNECTIONS: usize = 8;
/// A connection idle this long is closed.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("control socket {path}: another server is listening there")]
    InUse { path: PathBuf },
    #[error("control socket {path}: exists and is not a socket")]
    NotASocket { path: PathBuf },
    #[error("control socket {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// A listening control socket; dropping it stops accepting and removes the socket file.
pub struct ControlServer {
    path: PathBuf,
    /// (device, inode) of the socket file we made, so Drop removes only ours.
    identity: (u64, u64),
    listener: UnixListener,
    stop: Arc<AtomicBool>,
    accept_thread: Option<JoinHandle<()>>,
}

impl ControlServer {
    /// Listens on `path` (owner-only permissions; a stale socket left by a dead server is
    /// replaced, a live one or any other file is an error) and serves `handler`.
    pub fn start(path: &Path, handler: Arc<dyn ControlHandler>) -> Result<Self, ServerError> {
        let io = |source| ServerError::Io {
            path: path.into(),
            source,
        };
        remove_stale_socket(path)?;
        let listener = UnixListener::bind(path).map_err(io)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
        let meta = std::fs::metadata(path).map_err(io)?;
        let stop = Arc::new(AtomicBool::new(false));
        let accept_thread = {
            let listener = listener.try_clone().map_err(io)?;
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("control".into())
                .spawn(move || accept_loop(listener, handler, stop))
                .map_err(io)?
        };
        log::info!("control socket listening on {}", path.display());
        Ok(ControlServer {
            path: path.into(),
            identity: (meta.dev(), meta.ino()),
            listener,
            stop,
            accept_thread: Some(accept_thread),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // SAFETY: shutdown(2) on a listening socket we own; it wakes the accept thread
        // blocked in accept(2), which then sees `stop`.
        unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
        if let Some(t) = self.accept_thread.take() {
            let _ = t.join();
        }
        if std::fs::metadata(&self.path).is_ok_and(|m| (m.dev(), m.ino()) == self.identity) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

fn remove_stale_socket(path: &Path) -> Result<(), ServerError> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(ServerError::Io {
                path: path.into(),
                source,
            })
        }
    };
    if !meta.file_type().is_socket() {
        return Err(ServerError::NotASocket { path: path.into() });
    }
    match UnixStream::connect(path) {
        Ok(_) => Err(ServerError::InUse { path: path.into() }),
        Err(_) => std::fs::remove_file(path).map_err(|source| ServerError::Io {
            path: path.into(),
            source,
        }),
    }
}

fn accept_loop(listener: UnixListener, handler: Arc<dyn ControlHandler>, stop: Arc<AtomicBool>) {
    let active = Arc::new(AtomicUsize::new(0));
    for conn in listener.incoming() {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let mut stream = match conn {
            Ok(s) => s,
            Err(e) => {
                log::warn!("control socket: accept failed: {e}");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        // The socket's mode keeps other users out; the peer's uid is checked as well, for a
        // client that connected in the instant between bind and chmod.
        if !peer_is_trusted(&stream) {
            log::warn!("control socket: refused a connection from another user");
            continue;
        }
        if active.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
            active.fetch_sub(1, Ordering::SeqCst);
            let _ = writeln!(
                stream,
                "{}",
                Reply::Error("too many control connections".into()).to_line()
            );
            continue;
        }
        let handler = handler.clone();
        let active = active.clone();
        let spawned = std::thread::Builder::new()
            .name("control-conn".into())
            .spawn(move || {
                serve_connection(stream, &*handler);
                active.fetch_sub(1, Ordering::SeqCst);
            });
        if let Err(e) = spawned {
            log::warn!("control socket: cannot start a connection thread: {e}");
        }
    }
}

fn peer_is_trusted(stream: &UnixStream) -> bool {
    let mut cred = libc::ucred {
        pid: 0,
        uid: u32::MAX,
        gid: u32::MAX,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: SO_PEERCRED fills a ucred of the size we pass, on a socket we own.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    // SAFETY: geteuid cannot fail.
    let me = unsafe { libc::geteuid() };
    rc == 0 && (cred.uid == me || cred.uid == 0)
}

/// Answers request lines until the client closes, goes idle, or sends a line too long.
fn serve_connection(stream: UnixStream, handler: &dyn ControlHandler) {
    let _ = stream.set_read_timeout(Some(IDLE_TIMEOUT));
    let _ = stream.set_write_timeout(Some(IDLE_TIMEOUT));
    let Ok(mut writer) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(stream);
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = match (&mut reader)
            .take(MAX_LINE as u64 + 1)
            .read_until(b'\n', &mut line)
        {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let complete = line.last() == Some(&b'\n');
        if !complete && n > MAX_LINE {
            let _ = writeln!(
                writer,
                "{}",
                Reply::Error(ProtocolError::TooLong.to_string()).to_line()
            );
            return;
        }
        let text = String::from_utf8_lossy(&line);
        let text = text.trim();
        if text.is_empty() {
            continue;
        }
        let reply = match Command::parse(text) {
            Ok(cmd) => {
                log::info!("control: {}", cmd.to_line());
                match handler.handle(&cmd) {
                    Ok(v) => Reply::Ok(v),
                    Err(e) => Reply::Error(e),
                }
            }
            Err(e) => Reply::Error(e.to_string()),
        };
        if writeln!(writer, "{}", reply.to_line()).is_err() {
            return;
        }
    }
}
