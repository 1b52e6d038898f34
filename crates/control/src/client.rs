//! The client side: one request, one reply.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::protocol::{Command, ProtocolError, Reply};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to the control socket {path}: {source} (is uringblk running with --control {path}?)")]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("control socket {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("control socket {path}: the server closed the connection without a reply")]
    NoReply { path: PathBuf },
    #[error("control socket {path}: bad reply: {source}")]
    BadReply {
        path: PathBuf,
        source: ProtocolError,
    },
}

/// Sends `command` to the server at `path` and returns its reply. `timeout` bounds each
/// read and write (a flush may take as long as the disk does).
pub fn request(path: &Path, command: &Command, timeout: Duration) -> Result<Reply, ClientError> {
    let stream = UnixStream::connect(path).map_err(|source| ClientError::Connect {
        path: path.into(),
        source,
    })?;
    let io = |source| ClientError::Io {
        path: path.into(),
        source,
    };
    stream.set_read_timeout(Some(timeout)).map_err(io)?;
    stream.set_write_timeout(Some(timeout)).map_err(io)?;
    let mut writer = stream.try_clone().map_err(io)?;
    writeln!(writer, "{}", command.to_line()).map_err(io)?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line).map_err(io)?;
    if line.is_empty() {
        return Err(ClientError::NoReply { path: path.into() });
    }
    Reply::parse(line.trim()).map_err(|source| ClientError::BadReply {
        path: path.into(),
        source,
    })
}
