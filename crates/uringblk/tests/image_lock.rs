//! Image locks against QEMU's own tools, with the real binary: while uringblk serves an image,
//! qemu-io, qemu-img and a second uringblk see its locks; uringblk sees theirs and refuses an
//! image that QEMU (qemu-io, qemu-storage-daemon) holds for writing; readers share; --no-lock
//! turns it all off; block devices are locked too, and --null has nothing to lock.
//!
//! Without qemu-io (qemu-utils) a test prints "SKIPPED: ..." and passes, except in CI
//! (CI=true), where that is an install failure.

#[allow(dead_code)]
mod blkio_support;
mod common;

use blkio_support::{within, Client, ClientOptions, MIB};
use common::{Image, ServerProcess};
use guestvm::testing::{in_ci, QemuStorageDaemon};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Output, Stdio};
use std::time::{Duration, Instant};

const IMAGE_SIZE: u64 = 16 * MIB;
/// How long a refused start may take before it counts as "it served the image".
const START_LIMIT: Duration = Duration::from_secs(20);

/// True when every tool is installed; otherwise prints SKIPPED (fails under CI=true).
fn tools_or_skip(test: &str, tools: &[&str]) -> bool {
    let missing: Vec<&str> = tools
        .iter()
        .copied()
        .filter(|tool| !in_path(tool))
        .collect();
    if missing.is_empty() {
        return true;
    }
    let reason = format!(
        "{test}: missing {} (apt-get install qemu-utils qemu-system-x86 util-linux mount)",
        missing.join(", ")
    );
    assert!(
        !in_ci(),
        "CI must install the image-lock test tools: {reason}"
    );
    // Straight to stderr: libtest captures eprintln! of passing tests, and a skip must be seen.
    let _ = writeln!(std::io::stderr(), "SKIPPED: {reason}");
    false
}

fn in_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(tool).is_file()))
}

/// An existing image of IMAGE_SIZE zero bytes, for tests where QEMU opens it first.
fn zeroed_image() -> Image {
    let image = Image::new();
    std::fs::File::create(&image.path)
        .and_then(|f| f.set_len(IMAGE_SIZE))
        .expect("create image");
    image
}

/// uringblk serving `image` read-write (created by the server itself).
fn serve(image: &Image, extra: &[&str]) -> ServerProcess {
    let mut args = vec!["--image", image.arg(), "--create", "16M"];
    args.extend_from_slice(extra);
    ServerProcess::start(&args)
}

/// Runs `qemu-io <args>` to completion (each -c command, then exit).
fn qemu_io(args: &[&str]) -> Output {
    Command::new("qemu-io")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run qemu-io")
}

fn describe(what: &str, out: &Output) -> String {
    format!(
        "{what}: {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout).trim(),
        String::from_utf8_lossy(&out.stderr).trim()
    )
}

/// Runs uringblk on `args`, which must refuse to start: exit code 2, nothing listening, and
/// exactly one line on stderr, which names `image`. Returns that line.
fn refused(args: &[&str], image: &Path) -> String {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("blk.sock");
    let mut child = Command::new(env!("CARGO_BIN_EXE_uringblk"))
        .arg("--socket")
        .arg(&socket)
        .args(args)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn uringblk");
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for uringblk") {
            break status;
        }
        if socket.exists() || start.elapsed() > START_LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            panic!("uringblk {args:?} started serving a locked image");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    if let Some(mut pipe) = child.stderr.take() {
        std::io::Read::read_to_string(&mut pipe, &mut stderr).expect("read stderr");
    }
    assert_eq!(
        status.code(),
        Some(2),
        "exit status {status}; stderr: {stderr}"
    );
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "expected a one-line error, got: {stderr}");
    let line = lines[0];
    assert!(line.starts_with("uringblk: error: "), "{line}");
    assert!(
        line.contains(image.to_str().expect("UTF-8 path")),
        "the error does not name the image: {line}"
    );
    line.to_string()
}

/// A QEMU process holding an image open for as long as the handle lives, driven through its
/// stdin: qemu-io (read-write, or read-only with -r), or a paused VM whose virtio-blk disk is
/// the image (what a guest of QEMU's own holds, the closest kin of an export).
struct QemuHolder {
    child: Child,
    stdin: Option<ChildStdin>,
}

impl QemuHolder {
    fn qemu_io(image: &Path, read_only: bool) -> QemuHolder {
        let mut cmd = Command::new("qemu-io");
        if read_only {
            cmd.arg("-r");
        }
        cmd.args(["-f", "raw"]).arg(image);
        Self::start(cmd, "read 0 512", "read 512/512 bytes")
    }

    fn vm(image: &Path) -> QemuHolder {
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args([
            "-M",
            "q35",
            "-accel",
            "tcg",
            "-S",
            "-display",
            "none",
            "-nodefaults",
        ])
        .args(["-monitor", "stdio", "-drive"])
        .arg(format!(
            "file={},format=raw,if=none,id=disk0",
            image.display()
        ))
        .args(["-device", "virtio-blk-pci,drive=disk0"]);
        Self::start(cmd, "info block", "Attached to:")
    }

    /// Returns once the process has the image open (locks are taken at open): it has
    /// answered `command` with a line containing `answer`.
    fn start(mut cmd: Command, command: &str, answer: &'static str) -> QemuHolder {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
        let mut stdin = child.stdin.take().expect("stdin");
        writeln!(stdin, "{command}")
            .and_then(|()| stdin.flush())
            .expect("send a command");
        let stdout = child.stdout.take().expect("stdout");
        let answered = within(START_LIMIT, "QEMU opening the image", move || {
            BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
                .any(|line| line.contains(answer))
        });
        if !answered {
            drop(stdin);
            let out = child.wait_with_output().expect("exit status");
            panic!(
                "{}",
                describe(&format!("{cmd:?} did not open the image"), &out)
            );
        }
        QemuHolder {
            child,
            stdin: Some(stdin),
        }
    }
}

impl Drop for QemuHolder {
    fn drop(&mut self) {
        // qemu-io and QEMU's monitor both know "quit"; kill what does not listen.
        if let Some(mut stdin) = self.stdin.take() {
            let _ = writeln!(stdin, "quit");
        }
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(5) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn first_sector(path: &Path) -> Vec<u8> {
    let data = std::fs::read(path).expect("read image");
    data[..512].to_vec()
}

fn stop(server: ServerProcess) {
    let status = server.stop();
    assert!(status.success(), "uringblk did not exit cleanly: {status}");
}

#[test]
fn qemu_io_cannot_write_an_image_served_read_write() {
    if !tools_or_skip(
        "qemu_io_cannot_write_an_image_served_read_write",
        &["qemu-io"],
    ) {
        return;
    }
    let image = Image::new();
    let server = serve(&image, &[]);
    let out = qemu_io(&["-f", "raw", "-c", "write 0 4k", image.arg()]);
    assert!(
        !out.status.success(),
        "{}",
        describe("qemu-io wrote an image uringblk serves", &out)
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("\"write\" lock"),
        "{}",
        describe("qemu-io failed, but not on the lock", &out)
    );
    assert_eq!(
        first_sector(&image.path),
        vec![0; 512],
        "the image was written"
    );
    stop(server);
    // Once the server is gone the same write goes through.
    let out = qemu_io(&["-f", "raw", "-c", "write 0 4k", image.arg()]);
    assert!(
        out.status.success(),
        "{}",
        describe("write after stop", &out)
    );
}

#[test]
fn qemu_io_reads_an_image_served_read_write() {
    if !tools_or_skip("qemu_io_reads_an_image_served_read_write", &["qemu-io"]) {
        return;
    }
    let image = Image::new();
    let server = serve(&image, &[]);
    let out = qemu_io(&["-r", "-f", "raw", "-c", "read 0 4k", image.arg()]);
    assert!(
        out.status.success(),
        "{}",
        describe("qemu-io -r read", &out)
    );
    stop(server);
}

#[test]
fn qemu_img_behaves_as_with_a_qemu_writer_holding_the_image() {
    if !tools_or_skip(
        "qemu_img_behaves_as_with_a_qemu_writer_holding_the_image",
        &["qemu-img", "qemu-system-x86_64"],
    ) {
        return;
    }
    let scratch = tempfile::tempdir().expect("tempdir");
    let copy = scratch.path().join("copy.img");
    let copy = copy.to_str().expect("UTF-8 path");
    // Reads that lock nothing, reads that forbid writers (BDRV_O_NO_SHARE), the same with
    // -U (force share), and a write.
    let commands: Vec<Vec<&str>> = vec![
        vec!["info", "-f", "raw", "IMG"],
        vec!["info", "-U", "-f", "raw", "IMG"],
        vec!["map", "-f", "raw", "IMG"],
        vec!["convert", "-f", "raw", "-O", "raw", "IMG", copy],
        vec!["convert", "-U", "-f", "raw", "-O", "raw", "IMG", copy],
        vec!["resize", "-f", "raw", "IMG", "32M"],
    ];
    let outcomes = |image: &Path| -> Vec<(bool, String)> {
        let image = image.to_str().expect("UTF-8 path");
        commands
            .iter()
            .map(|args| {
                let args: Vec<&str> = args
                    .iter()
                    .map(|&a| if a == "IMG" { image } else { a })
                    .collect();
                let out = Command::new("qemu-img")
                    .args(&args)
                    .stdin(Stdio::null())
                    .output()
                    .expect("run qemu-img");
                let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
                (
                    out.status.success(),
                    format!("qemu-img {}: {err}", args.join(" ")),
                )
            })
            .collect()
    };
    // The reference: a QEMU guest's disk (a paused VM) holding the image for writing.
    let reference_image = zeroed_image();
    let reference = {
        let _qemu = QemuHolder::vm(&reference_image.path);
        outcomes(&reference_image.path)
    };
    let image = Image::new();
    let server = serve(&image, &[]);
    let ours = outcomes(&image.path);
    for (theirs, ours) in reference.iter().zip(&ours) {
        assert_eq!(
            theirs.0, ours.0,
            "with a QEMU writer: {}\nwith uringblk serving: {}",
            theirs.1, ours.1
        );
    }
    assert!(
        ours.iter().any(|(ok, _)| !ok) && ours.iter().any(|(ok, _)| *ok),
        "some qemu-img commands must be refused and some allowed: {ours:?}"
    );
    assert_eq!(
        std::fs::metadata(&image.path).expect("stat").len(),
        IMAGE_SIZE,
        "qemu-img resized an image uringblk serves"
    );
    stop(server);
}

#[test]
fn a_second_uringblk_cannot_serve_an_image_served_read_write() {
    let image = Image::new();
    let server = serve(&image, &[]);
    let line = refused(&["--image", image.arg()], &image.path);
    assert!(line.contains("\"write\""), "{line}");
    refused(&["--image", image.arg(), "--readonly"], &image.path);
    stop(server);
}

#[test]
fn uringblk_refuses_an_image_qemu_io_holds_for_writing() {
    if !tools_or_skip(
        "uringblk_refuses_an_image_qemu_io_holds_for_writing",
        &["qemu-io"],
    ) {
        return;
    }
    let image = zeroed_image();
    let qemu = QemuHolder::qemu_io(&image.path, false);
    let line = refused(&["--image", image.arg()], &image.path);
    assert!(line.contains("\"write\""), "{line}");
    refused(&["--image", image.arg(), "--readonly"], &image.path);
    drop(qemu);
    // Free again once qemu-io has quit.
    stop(ServerProcess::start(&["--image", image.arg()]));
}

#[test]
fn uringblk_refuses_an_image_qemu_storage_daemon_exports_writable() {
    if !tools_or_skip(
        "uringblk_refuses_an_image_qemu_storage_daemon_exports_writable",
        &["qemu-storage-daemon"],
    ) {
        return;
    }
    let image = zeroed_image();
    let dir = tempfile::tempdir().expect("tempdir");
    let qsd = QemuStorageDaemon::start(&image.path, &dir.path().join("qsd.sock"), 1, true)
        .expect("qemu-storage-daemon export");
    refused(&["--image", image.arg()], &image.path);
    drop(qsd);
    stop(ServerProcess::start(&["--image", image.arg()]));
}

#[test]
fn two_readonly_exports_share_an_image() {
    let image = zeroed_image();
    let first = ServerProcess::start(&["--image", image.arg(), "--readonly"]);
    let second = ServerProcess::start(&["--image", image.arg(), "--readonly"]);
    // Readers together still keep a writer out.
    refused(&["--image", image.arg()], &image.path);
    stop(second);
    stop(first);
}

#[test]
fn a_readonly_export_runs_while_qemu_io_reads() {
    if !tools_or_skip("a_readonly_export_runs_while_qemu_io_reads", &["qemu-io"]) {
        return;
    }
    let image = zeroed_image();
    let reader = QemuHolder::qemu_io(&image.path, true);
    let server = ServerProcess::start(&["--image", image.arg(), "--readonly"]);
    // And the other way round: qemu-io reads while the export runs.
    let out = qemu_io(&["-r", "-f", "raw", "-c", "read 0 4k", image.arg()]);
    assert!(
        out.status.success(),
        "{}",
        describe("qemu-io -r read", &out)
    );
    // A read-only export still keeps writers out, as a QEMU read-only device does.
    let out = qemu_io(&["-f", "raw", "-c", "write 0 4k", image.arg()]);
    assert!(
        !out.status.success(),
        "{}",
        describe("qemu-io wrote an image a read-only export serves", &out)
    );
    stop(server);
    drop(reader);
}

#[test]
fn no_lock_serves_an_image_qemu_holds_and_leaves_it_unlocked() {
    if !tools_or_skip(
        "no_lock_serves_an_image_qemu_holds_and_leaves_it_unlocked",
        &["qemu-io"],
    ) {
        return;
    }
    let image = zeroed_image();
    let qemu = QemuHolder::qemu_io(&image.path, false);
    let server = ServerProcess::start(&["--image", image.arg(), "--no-lock"]);
    drop(qemu);
    let out = qemu_io(&["-f", "raw", "-c", "write 0 4k", image.arg()]);
    assert!(
        out.status.success(),
        "{}",
        describe("qemu-io write beside a --no-lock export", &out)
    );
    stop(server);
}

#[test]
fn the_lock_outlives_client_reconnects() {
    if !tools_or_skip("the_lock_outlives_client_reconnects", &["qemu-io"]) {
        return;
    }
    let image = Image::new();
    let server = serve(&image, &[]);
    let socket = server.socket.clone();
    within(
        Duration::from_secs(120),
        "two client connections",
        move || {
            for _ in 0..2 {
                let client = Client::connect(&socket, &ClientOptions::default());
                assert_eq!(client.capacity(), IMAGE_SIZE);
            }
        },
    );
    let out = qemu_io(&["-f", "raw", "-c", "write 0 4k", image.arg()]);
    assert!(
        !out.status.success(),
        "{}",
        describe("qemu-io wrote the image after a reconnect", &out)
    );
    stop(server);
}

/// A loop device over a file, detached on drop.
struct LoopDevice {
    path: PathBuf,
}

impl LoopDevice {
    fn attach(backing: &Path) -> LoopDevice {
        let out = Command::new("losetup")
            .args(["--find", "--show"])
            .arg(backing)
            .output()
            .expect("run losetup");
        assert!(
            out.status.success(),
            "{}",
            describe("losetup --find --show", &out)
        );
        let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        LoopDevice { path }
    }

    fn arg(&self) -> &str {
        self.path.to_str().expect("UTF-8 device path")
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.path).status();
    }
}

#[test]
fn block_devices_are_locked_too() {
    if !tools_or_skip("block_devices_are_locked_too", &["qemu-io", "losetup"]) {
        return;
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        let reason = "block_devices_are_locked_too: loop devices need root";
        assert!(!in_ci(), "CI runs as root: {reason}");
        let _ = writeln!(std::io::stderr(), "SKIPPED: {reason}");
        return;
    }
    let backing = zeroed_image();
    let device = LoopDevice::attach(&backing.path);
    let server = ServerProcess::start(&["--image", device.arg()]);
    let out = qemu_io(&["-f", "raw", "-c", "write 0 4k", device.arg()]);
    assert!(
        !out.status.success(),
        "{}",
        describe("qemu-io wrote a block device uringblk serves", &out)
    );
    let out = qemu_io(&["-r", "-f", "raw", "-c", "read 0 4k", device.arg()]);
    assert!(
        out.status.success(),
        "{}",
        describe("qemu-io -r read", &out)
    );
    refused(&["--image", device.arg()], &device.path);
    stop(server);
}

#[test]
fn the_null_backend_has_nothing_to_lock() {
    // Two null servers side by side, with and without --no-lock.
    let first = ServerProcess::start(&["--null", "64M"]);
    let second = ServerProcess::start(&["--null", "64M", "--no-lock"]);
    stop(second);
    stop(first);
}
