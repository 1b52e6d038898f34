//! Shared by the integration tests: start a real `uringblk` process on a private socket and
//! stop it (SIGTERM, then wait) when the handle is dropped.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running `uringblk` server with its own temporary directory (socket, image).
pub struct ServerProcess {
    pub child: Child,
    pub socket: PathBuf,
    pub dir: tempfile::TempDir,
}

impl ServerProcess {
    /// Starts `uringblk --socket <dir>/blk.sock <args...>` and waits until the socket exists.
    /// `args` may use the placeholder `{dir}` for the private temporary directory.
    pub fn start(args: &[&str]) -> ServerProcess {
        let dir = tempfile::tempdir().expect("tempdir");
        Self::start_in(dir, args)
    }

    pub fn start_in(dir: tempfile::TempDir, args: &[&str]) -> ServerProcess {
        let socket = dir.path().join("blk.sock");
        let dir_str = dir.path().to_str().expect("utf-8 tempdir").to_string();
        let args: Vec<String> = args.iter().map(|a| a.replace("{dir}", &dir_str)).collect();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let child = spawn_server(&socket, &args, Stdio::inherit());
        ServerProcess { child, socket, dir }
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn stop(mut self) -> std::process::ExitStatus {
        self.terminate()
    }

    /// Sends SIGTERM; returns the exit status and the final statistics JSON (the last line
    /// the server printed on stdout).
    pub fn stop_with_stats(mut self) -> (std::process::ExitStatus, serde_json::Value) {
        use std::io::Read;
        let status = self.terminate();
        let mut out = String::new();
        if let Some(mut stdout) = self.child.stdout.take() {
            stdout.read_to_string(&mut out).expect("read server stdout");
        }
        let last = out.lines().last().unwrap_or("");
        let stats = serde_json::from_str(last)
            .unwrap_or_else(|e| panic!("final stats are not JSON ({e}): {last:?}"));
        (status, stats)
    }

    fn terminate(&mut self) -> std::process::ExitStatus {
        if let Ok(Some(status)) = self.child.try_wait() {
            return status;
        }
        // SAFETY: kill(2) on the pid of a child we spawned and have not reaped yet.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
        let start = Instant::now();
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status;
            }
            if start.elapsed() > Duration::from_secs(20) {
                let _ = self.child.kill();
                return self.child.wait().expect("wait after kill");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.terminate();
    }
}

/// Starts `uringblk --socket SOCKET <args...>` (logs to `stderr`) and returns once the socket
/// exists; the socket may be one an earlier, killed, server left behind.
pub fn spawn_server(socket: &Path, args: &[&str], stderr: Stdio) -> Child {
    let _ = std::fs::remove_file(socket);
    let mut child = Command::new(env!("CARGO_BIN_EXE_uringblk"))
        .arg("--socket")
        .arg(socket)
        .args(args)
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
        )
        .stdin(Stdio::null())
        // Statistics JSON arrives on stdout; logs stay on stderr.
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .expect("spawn uringblk");
    let timeout = Duration::from_secs(20);
    let start = Instant::now();
    while !socket.exists() {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("uringblk exited before listening: {status}");
        }
        assert!(
            start.elapsed() < timeout,
            "uringblk did not create its socket in {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

/// An image file in a directory of its own: the server's directory goes away with the server
/// handle, and the image must outlive the server to be checked (or served again) afterwards.
pub struct Image {
    _dir: tempfile::TempDir,
    pub path: PathBuf,
}

impl Image {
    pub fn new() -> Image {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("disk.img");
        Image { _dir: dir, path }
    }

    pub fn arg(&self) -> &str {
        self.path.to_str().expect("UTF-8 temp path")
    }
}
