//! The guest tooling itself, against qemu-storage-daemon (a known-good vhost-user-blk server):
//! a normal run is parsed completely, and every way a run can go wrong is reported as such
//! rather than passing.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use guestvm::testing::{guest_or_skip, vm_lock, QemuStorageDaemon};
use guestvm::{fio_io_bytes, run, FailureKind, VmConfig};

const DISK_BYTES: u64 = 64 << 20;

struct Setup {
    _dir: tempfile::TempDir,
    daemon: QemuStorageDaemon,
    guest_dir: PathBuf,
}

fn setup(test_name: &str, num_queues: u32) -> Option<Setup> {
    let guest_dir = guest_or_skip(test_name, &["qemu-storage-daemon"])?;
    let dir = tempfile::tempdir().expect("tempdir");
    let image = dir.path().join("disk.img");
    std::fs::File::create(&image)
        .and_then(|f| f.set_len(DISK_BYTES))
        .expect("create image");
    let daemon = QemuStorageDaemon::start(&image, &dir.path().join("blk.sock"), num_queues, true)
        .expect("start qemu-storage-daemon");
    Some(Setup {
        _dir: dir,
        daemon,
        guest_dir,
    })
}

const WRITE_VERIFY_JOB: &str = "\
[global]
filename=/dev/vda
direct=1
ioengine=libaio
bs=4k
iodepth=16
size=4M
offset_increment=4M
verify=crc32c
[write-verify]
rw=randwrite
numjobs=2
";

#[test]
fn run_reports_facts_fio_and_commands() {
    let _vm = vm_lock();
    let Some(s) = setup("run_reports_facts_fio_and_commands", 2) else {
        return;
    };
    let config = VmConfig::new(&s.daemon.socket, &s.guest_dir)
        .queues(2)
        .vcpus(2)
        .pre("before", "echo first; echo to-stderr >&2")
        .fio_job(WRITE_VERIFY_JOB)
        .cmd("failing", "printf 'no newline'; exit 7");
    let started = Instant::now();
    let result = run(&config).expect("VM run");
    eprintln!(
        "accel={} elapsed={:?} wall={:?}",
        result.accel,
        result.elapsed,
        started.elapsed()
    );

    assert_eq!(result.fact_u64("size_bytes").unwrap(), DISK_BYTES);
    assert_eq!(result.fact_u64("hw_queues").unwrap(), 2);
    assert_eq!(result.fact_u64("vcpus").unwrap(), 2);
    let fio = result.fio().unwrap();
    // Two jobs, 4 MiB each, written and then read back for verification.
    assert_eq!(fio_io_bytes(fio, "write"), 8 << 20);
    assert_eq!(fio_io_bytes(fio, "read"), 8 << 20);
    let before = result.command("before").unwrap();
    assert_eq!(before.output, "first\nto-stderr\n");
    assert_eq!(before.exit_code, 0);
    let failing = result.command("failing").unwrap();
    assert_eq!(failing.output, "no newline\n");
    assert_eq!(failing.exit_code, 7);
    assert!(
        result.console.contains("guest: done"),
        "console: {}",
        result.console
    );
}

#[test]
fn verify_failure_is_a_fio_error() {
    let _vm = vm_lock();
    let Some(s) = setup("verify_failure_is_a_fio_error", 1) else {
        return;
    };
    // Nothing was ever written, so the verify headers read back as zeros.
    let config = VmConfig::new(&s.daemon.socket, &s.guest_dir)
        .fio_job(WRITE_VERIFY_JOB)
        .fio_arg("--verify_only");
    let err = run(&config).expect_err("verifying an empty disk must fail");
    assert_eq!(err.failure_kind(), Some(FailureKind::Fio), "{err}");
}

#[test]
fn guest_that_stops_early_is_missing_output() {
    let _vm = vm_lock();
    let Some(s) = setup("guest_that_stops_early_is_missing_output", 1) else {
        return;
    };
    let config = VmConfig::new(&s.daemon.socket, &s.guest_dir)
        .cmd("stop", "poweroff -f")
        .cmd("never", "true");
    let err = run(&config).expect_err("an unfinished run must fail");
    assert_eq!(
        err.failure_kind(),
        Some(FailureKind::MissingOutput),
        "{err}"
    );
}

#[test]
fn kernel_panic_is_reported() {
    let _vm = vm_lock();
    let Some(s) = setup("kernel_panic_is_reported", 1) else {
        return;
    };
    let config =
        VmConfig::new(&s.daemon.socket, &s.guest_dir).cmd("crash", "echo c > /proc/sysrq-trigger");
    let err = run(&config).expect_err("a panic must fail the run");
    assert_eq!(err.failure_kind(), Some(FailureKind::KernelPanic), "{err}");
}

#[test]
fn hung_guest_times_out() {
    let _vm = vm_lock();
    let Some(s) = setup("hung_guest_times_out", 1) else {
        return;
    };
    let config = VmConfig::new(&s.daemon.socket, &s.guest_dir)
        .cmd("hang", "sleep 600")
        .timeout(Duration::from_secs(10));
    let started = Instant::now();
    let err = run(&config).expect_err("a hung guest must fail the run");
    assert_eq!(err.failure_kind(), Some(FailureKind::Timeout), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "the timeout took {:?}",
        started.elapsed()
    );
}

#[test]
fn reboot_runs_everything_again_on_the_same_connection() {
    let _vm = vm_lock();
    let Some(s) = setup("reboot_runs_everything_again_on_the_same_connection", 1) else {
        return;
    };
    let config = VmConfig::new(&s.daemon.socket, &s.guest_dir)
        .cmd("size", "blockdev --getsize64 /dev/vda")
        .reboots(1, &[]);
    let result = run(&config).expect("VM run with a reboot");
    let boots: Vec<_> = result.boots().collect();
    assert_eq!(boots.len(), 2);
    for (i, boot) in boots.iter().enumerate() {
        assert_eq!(boot.fact_u64("boot").unwrap(), i as u64);
        let size = boot.command("size").unwrap();
        assert_eq!(size.exit_code, 0);
        assert_eq!(size.output.trim(), DISK_BYTES.to_string());
    }
}
