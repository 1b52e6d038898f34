//! Helpers for VM tests: the prerequisite gate, a one-time guest build, a lock that keeps VMs
//! from running side by side, and qemu-storage-daemon as a reference vhost-user-blk server.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use crate::{build_guest, default_guest_dir, missing_prerequisites};

/// True when CI runs us: there, a missing prerequisite is an install failure.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// True when `tool` is on PATH. Otherwise, outside CI, prints "SKIPPED: <reason>" (straight to
/// stderr, which libtest does not capture) and returns false; in CI a missing tool panics.
pub fn tool_or_skip(test_name: &str, tool: &str, install_hint: &str) -> bool {
    if crate::find_in_path(tool) {
        return true;
    }
    let reason = format!("{test_name}: {tool} missing ({install_hint})");
    assert!(!in_ci(), "CI must install {tool}: {reason}");
    let _ = writeln!(std::io::stderr(), "SKIPPED: {reason}");
    false
}

/// The value of the sample whose line starts with `series` (name and labels, as printed) in
/// a Prometheus text exposition; panics, showing the exposition, when there is none.
pub fn prometheus_sample(exposition: &str, series: &str) -> f64 {
    exposition
        .lines()
        .find_map(|l| l.strip_prefix(series))
        .unwrap_or_else(|| panic!("no sample {series:?} in:\n{exposition}"))
        .trim()
        .parse()
        .expect("a number")
}

/// Runs `promtool check metrics` on a Prometheus exposition: Err with promtool's complaints
/// (and the exposition) when it refuses it.
pub fn promtool_check(exposition: &str) -> Result<(), String> {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run promtool: {e}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(exposition.as_bytes())
            .map_err(|e| format!("cannot feed promtool: {e}"))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("promtool: {e}"))?;
    if out.status.success() {
        return Ok(());
    }
    Err(format!(
        "promtool refused the metrics:\n{}{}\n--- metrics:\n{exposition}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    ))
}

/// Checks that VMs can run here (and that `extra_tools` are installed) and builds the guest
/// (once per process). Returns the guest folder, or `None` after printing "SKIPPED: <reason>"
/// when a prerequisite is missing outside CI. In CI a missing prerequisite panics, and a failed
/// guest build panics everywhere.
pub fn guest_or_skip(test_name: &str, extra_tools: &[&str]) -> Option<PathBuf> {
    let mut missing = missing_prerequisites();
    for tool in extra_tools {
        if !crate::find_in_path(tool) {
            missing.push(tool.to_string());
        }
    }
    if !missing.is_empty() {
        let reason = format!(
            "{test_name}: missing {} (apt-get install qemu-system-x86 fio busybox-static util-linux)",
            missing.join(", ")
        );
        assert!(!in_ci(), "CI must install the VM prerequisites: {reason}");
        // Straight to stderr: libtest captures eprintln! of passing tests, and a skip must
        // be seen.
        let _ = writeln!(std::io::stderr(), "SKIPPED: {reason}");
        return None;
    }
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let built = BUILT.get_or_init(|| {
        let dir = default_guest_dir();
        build_guest(&dir).map(|()| dir).map_err(|e| e.to_string())
    });
    match built {
        Ok(dir) => Some(dir.clone()),
        Err(e) => panic!("building the guest failed: {e}"),
    }
}

/// One VM at a time per test process: TCG vCPUs are host threads, and two VMs at once on a
/// small CI machine would starve each other into timeouts.
pub fn vm_lock() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    // A test that panicked while holding the lock left nothing half-done behind it.
    LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// qemu-storage-daemon exporting an image as vhost-user-blk: the reference server the
/// project compares against, and a known-good server to test the guest tooling with.
pub struct QemuStorageDaemon {
    child: Child,
    pub socket: PathBuf,
}

impl QemuStorageDaemon {
    /// Exports `image` (O_DIRECT, io_uring) on `socket` with `num_queues` queues.
    pub fn start(
        image: &Path,
        socket: &Path,
        num_queues: u32,
        writable: bool,
    ) -> std::io::Result<Self> {
        let child = Command::new("qemu-storage-daemon")
            .arg("--blockdev")
            .arg(format!(
                "driver=file,node-name=disk,filename={},cache.direct=on,aio=io_uring",
                image.display()
            ))
            .arg("--export")
            .arg(format!(
                "type=vhost-user-blk,id=export,node-name=disk,addr.type=unix,addr.path={},\
                 writable={},num-queues={num_queues}",
                socket.display(),
                if writable { "on" } else { "off" }
            ))
            .stdin(Stdio::null())
            .spawn()?;
        let mut daemon = QemuStorageDaemon {
            child,
            socket: socket.to_path_buf(),
        };
        let start = Instant::now();
        while !socket.exists() {
            if let Some(status) = daemon.child.try_wait()? {
                return Err(std::io::Error::other(format!(
                    "qemu-storage-daemon exited before listening: {status}"
                )));
            }
            if start.elapsed() > Duration::from_secs(10) {
                return Err(std::io::Error::other(
                    "qemu-storage-daemon did not create its socket in 10 s",
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(daemon)
    }
}

impl Drop for QemuStorageDaemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// fio in the guest: `jobs` jobs, each writing its own `per_job_mib` MiB region of /dev/vda at
/// random offsets with block sizes from 4k to 64k, QD 16, then reading it all back against
/// crc32c checksums. With `--verify_only` the same job only reads and verifies what an earlier
/// run wrote (the offsets and data are reproducible: fio's random seeds are fixed by default).
pub fn write_verify_job(jobs: u32, per_job_mib: u64) -> String {
    format!(
        "[global]
filename=/dev/vda
direct=1
ioengine=libaio
iodepth=16
bsrange=4k-64k
rw=randwrite
size={per_job_mib}M
offset_increment={per_job_mib}M
verify=crc32c
verify_fatal=1
# one CPU per job, so every hardware queue carries I/O
cpus_allowed_policy=split
[write-verify]
numjobs={jobs}
"
    )
}
