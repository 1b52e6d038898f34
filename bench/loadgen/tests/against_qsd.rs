//! The load generator against a real vhost-user-blk server: qemu-storage-daemon, the peer the
//! harness compares with (uringblk's own tests cover uringblk). Needs `qemu-storage-daemon` on
//! PATH: skipped loudly without it, a failure in CI (env CI=true), which installs it.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use uringblk_loadgen::LoadgenReport;

const QSD: &str = "qemu-storage-daemon";

/// A qemu-storage-daemon exporting one block node over vhost-user-blk; killed on drop.
struct Daemon {
    child: Child,
    socket: PathBuf,
    _dir: tempfile::TempDir,
}

impl Daemon {
    fn start(blockdev_json: &str, num_queues: u32) -> Option<Daemon> {
        if Command::new(QSD).arg("--version").output().is_err() {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "{QSD} is missing but CI is supposed to install it"
            );
            eprintln!("SKIPPED: {QSD} not found on PATH");
            return None;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("vhost.sock");
        let export = format!(
            "type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,addr.path={},\
             writable=on,num-queues={num_queues}",
            socket.display()
        );
        let child = Command::new(QSD)
            .args(["--blockdev", blockdev_json, "--export", &export])
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn qemu-storage-daemon");
        let mut daemon = Daemon {
            child,
            socket,
            _dir: dir,
        };
        let start = Instant::now();
        while !daemon.socket.exists() {
            if let Ok(Some(status)) = daemon.child.try_wait() {
                panic!("{QSD} exited before listening: {status}");
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "{QSD} did not listen"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(daemon)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn loadgen(socket: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_uringblk-loadgen"))
        .arg("--socket")
        .arg(socket)
        .args(["--json", "--runtime", "300ms"])
        .args(args)
        .output()
        .expect("run uringblk-loadgen")
}

fn report_of(output: &Output) -> LoadgenReport {
    let stdout = String::from_utf8_lossy(&output.stdout);
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        panic!(
            "bad JSON ({e}): {stdout}\nstderr: {}",
            String::from_utf8_lossy(&output.stderr)
        )
    })
}

const NULL_DISK: &str = r#"{"driver":"null-co","node-name":"disk0","size":67108864}"#;

#[test]
fn mixed_load_on_two_queues_counts_reads_writes_and_latency() {
    let Some(daemon) = Daemon::start(NULL_DISK, 2) else {
        return;
    };
    let output = loadgen(
        &daemon.socket,
        &[
            "--rw",
            "randrw",
            "--rwmixread",
            "70",
            "--queues",
            "2",
            "--iodepth",
            "8",
        ],
    );
    assert!(output.status.success(), "{output:?}");
    let report = report_of(&output);
    assert_eq!(report.errors, 0);
    assert_eq!(report.capacity_bytes, 64 << 20);
    assert_eq!(report.per_queue_ios.len(), 2);
    assert!(report.per_queue_ios.iter().all(|&n| n > 0), "{report:?}");
    assert!(
        report.reads > report.writes && report.writes > 0,
        "{report:?}"
    );
    assert_eq!(report.read_bytes, report.reads * 4096);
    assert_eq!(report.latency.samples, report.total_ios());
    assert!(report.latency.p50_ns <= report.latency.p99_ns);
    assert!(report.latency.p99_ns <= report.latency.p99_9_ns);
    assert!(report.iops > 0.0);
}

#[test]
fn poll_completion_and_sequential_writes_work() {
    let Some(daemon) = Daemon::start(NULL_DISK, 1) else {
        return;
    };
    let output = loadgen(
        &daemon.socket,
        &[
            "--rw",
            "write",
            "--bs",
            "128k",
            "--iodepth",
            "4",
            "--completion",
            "poll",
        ],
    );
    assert!(output.status.success(), "{output:?}");
    let report = report_of(&output);
    assert_eq!(report.reads, 0);
    assert!(report.writes > 0);
    assert_eq!(report.write_bytes, report.writes * 128 * 1024);
    assert_eq!(report.completion, "poll");
}

#[test]
fn failed_io_fails_the_run_and_is_reported() {
    // blkdebug fails every read with EIO; writes still succeed.
    let failing_reads = r#"{"driver":"blkdebug","node-name":"disk0",
        "inject-error":[{"event":"none","iotype":"read","errno":5}],
        "image":{"driver":"null-co","size":67108864}}"#;
    let Some(daemon) = Daemon::start(failing_reads, 1) else {
        return;
    };
    let output = loadgen(&daemon.socket, &["--rw", "randread", "--iodepth", "4"]);
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    let report = report_of(&output);
    assert!(report.errors > 0);
    assert_eq!(report.reads, 0);
    let first = report.first_error.expect("first error described");
    assert!(first.contains("read of 4096 bytes"), "{first}");
}

#[test]
fn region_beyond_the_device_is_a_usage_error() {
    let Some(daemon) = Daemon::start(NULL_DISK, 1) else {
        return;
    };
    let output = loadgen(&daemon.socket, &["--size", "1G"]);
    assert_eq!(output.status.code(), Some(2), "{output:?}");
    assert!(String::from_utf8_lossy(&output.stderr).contains("exceeds the device capacity"));
}
