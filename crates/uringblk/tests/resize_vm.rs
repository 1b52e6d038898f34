//! Growing the disk of a running guest, end to end: QEMU boots the measurement guest on
//! uringblk's socket; the guest reads /sys/block/vda/size and says so (a marker written to the
//! disk's first block, which the host watches for in the image); the host runs
//! `uringblk ctl resize`; the guest sees the new size without a reboot (QEMU forwards the
//! config change message as a virtio config interrupt) and writes and reads back a block past
//! the old end, which the host then finds in the image. Once with a file image (`resize SIZE`
//! grows it), once with a loop device the host grows (`losetup -c`, then `resize` without a
//! size).

mod common;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::MutexGuard;
use std::time::{Duration, Instant};

use common::{Image, ServerProcess};
use guestvm::testing::{guest_or_skip, in_ci, tool_or_skip, vm_lock};
use guestvm::{GuestRun, VmConfig};
use serde_json::Value;

const MIB: u64 = 1 << 20;
const OLD_SIZE: u64 = 64 * MIB;
const NEW_SIZE: u64 = 96 * MIB;
const READY: &[u8] = b"uringblk-resize-ready";
const PATTERN: &str = "uringblk-past-the-old-end";

/// What the guest runs: note the size, tell the host, wait for the size to change, then use
/// the new space (a block right past the old end).
fn guest_script() -> String {
    format!(
        r#"before=$(cat /sys/block/vda/size)
echo "before=$before"
printf '{ready}' >/tmp/ready
dd if=/tmp/ready of=/dev/vda bs=512 count=1 conv=sync,fsync oflag=direct 2>/dev/null || exit 10
i=0
while [ "$(cat /sys/block/vda/size)" = "$before" ]; do
    i=$((i + 1))
    [ $i -gt 600 ] && {{ echo "size still $before sectors after 60 s"; exit 11; }}
    sleep 0.1
done
echo "after=$(cat /sys/block/vda/size)"
yes {pattern} | head -c 4096 >/tmp/block
dd if=/tmp/block of=/dev/vda bs=4096 seek=$((before / 8)) count=1 conv=fsync oflag=direct 2>/dev/null || exit 12
dd if=/dev/vda of=/tmp/back bs=4096 skip=$((before / 8)) count=1 iflag=direct 2>/dev/null || exit 13
cmp /tmp/block /tmp/back || exit 14
echo readback=ok
"#,
        ready = std::str::from_utf8(READY).expect("ASCII"),
        pattern = PATTERN,
    )
}

fn vm(test: &str) -> Option<(MutexGuard<'static, ()>, PathBuf)> {
    let slot = vm_lock();
    let guest_dir = guest_or_skip(test, &[])?;
    Some((slot, guest_dir))
}

fn ctl_resize(control: &Path, size: Option<&str>) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_uringblk"))
        .arg("ctl")
        .arg("--control")
        .arg(control)
        .arg("resize")
        .args(size)
        .output()
        .expect("run uringblk ctl");
    assert!(
        out.status.success(),
        "ctl resize: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("ctl prints JSON")
}

fn read_at(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    let file = std::fs::File::open(path).expect("open the image");
    let mut buf = vec![0u8; len];
    match file.read_exact_at(&mut buf, offset) {
        Ok(()) => buf,
        Err(_) => Vec::new(),
    }
}

/// Boots the guest and, once it has read the disk's size (its marker is in `backing`), runs
/// `grow`; returns the guest's report and what `grow` returned.
fn run_with_resize(
    test: &str,
    config: VmConfig,
    backing: &Path,
    grow: impl FnOnce() -> Value,
) -> (GuestRun, Value) {
    let vm = std::thread::spawn(move || guestvm::run(&config));
    let deadline = Instant::now() + Duration::from_secs(240);
    while read_at(backing, 0, READY.len()) != READY {
        if vm.is_finished() {
            let run = vm.join().expect("VM thread");
            panic!("{test}: the guest ended before it read the size: {run:?}");
        }
        assert!(
            Instant::now() < deadline,
            "{test}: no marker from the guest"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let resized = grow();
    let run = vm
        .join()
        .expect("VM thread")
        .unwrap_or_else(|e| panic!("{test}: {e}"));
    eprintln!(
        "{test}: accel={} elapsed={:.1}s",
        run.accel,
        run.elapsed.as_secs_f64()
    );
    (run, resized)
}

/// The guest saw OLD_SIZE, then NEW_SIZE without a reboot, and read back its block; the block
/// is in `backing` right past the old end.
fn assert_guest_grew(test: &str, run: &GuestRun, resized: &Value, backing: &Path) {
    assert_eq!(resized["from_bytes"], OLD_SIZE, "{test}: {resized}");
    assert_eq!(resized["to_bytes"], NEW_SIZE, "{test}: {resized}");
    assert_eq!(resized["guest_notified"], true, "{test}: {resized}");
    let out = run.command("resize").expect("the resize command ran");
    assert_eq!(
        out.exit_code, 0,
        "{test}: guest side failed:\n{}",
        out.output
    );
    let value = |key: &str| -> u64 {
        out.output
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{key}=")))
            .unwrap_or_else(|| panic!("{test}: no {key}= in {}", out.output))
            .trim()
            .parse()
            .expect("a number")
    };
    assert_eq!(value("before") * 512, OLD_SIZE, "{test}: size before");
    assert_eq!(value("after") * 512, NEW_SIZE, "{test}: size after");
    assert!(out.output.contains("readback=ok"), "{test}: {}", out.output);
    let block = read_at(backing, OLD_SIZE, 4096);
    let expected: Vec<u8> = format!("{PATTERN}\n").bytes().cycle().take(4096).collect();
    assert!(
        block == expected,
        "{test}: the guest's block is not in the image past the old end"
    );
}

#[test]
fn a_guest_sees_its_file_image_grow_without_a_reboot() {
    const TEST: &str = "a_guest_sees_its_file_image_grow_without_a_reboot";
    let Some((_slot, guest_dir)) = vm(TEST) else {
        return;
    };
    let image = Image::new();
    let server = ServerProcess::start(&[
        "--image",
        image.arg(),
        "--create",
        "64M",
        "--control",
        "{dir}/ctl.sock",
    ]);
    let control = server.dir().join("ctl.sock");
    let config = VmConfig::new(&server.socket, &guest_dir).pre("resize", &guest_script());
    let (run, resized) = run_with_resize(TEST, config, &image.path, || {
        ctl_resize(&control, Some("96M"))
    });
    assert_guest_grew(TEST, &run, &resized, &image.path);
    assert_eq!(std::fs::metadata(&image.path).unwrap().len(), NEW_SIZE);
}

/// A loop device over a file, detached when dropped.
struct LoopDevice {
    device: String,
}

impl LoopDevice {
    fn attach(file: &Path) -> Result<LoopDevice, String> {
        let out = Command::new("losetup")
            .args(["--find", "--show"])
            .arg(file)
            .output()
            .map_err(|e| format!("losetup: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "losetup --find: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(LoopDevice {
            device: String::from_utf8_lossy(&out.stdout).trim().to_string(),
        })
    }

    /// `losetup -c`: the loop device takes its file's new size.
    fn reread(&self) {
        let status = Command::new("losetup")
            .args(["-c", &self.device])
            .status()
            .expect("losetup -c");
        assert!(status.success(), "losetup -c {}", self.device);
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.device]).status();
    }
}

#[test]
fn a_guest_sees_its_loop_device_grow_without_a_reboot() {
    const TEST: &str = "a_guest_sees_its_loop_device_grow_without_a_reboot";
    if !tool_or_skip(TEST, "losetup", "apt-get install mount") {
        return;
    }
    let Some((_slot, guest_dir)) = vm(TEST) else {
        return;
    };
    let backing = Image::new();
    std::fs::File::create(&backing.path)
        .and_then(|f| f.set_len(OLD_SIZE))
        .expect("the loop device's file");
    let device = match LoopDevice::attach(&backing.path) {
        Ok(d) => d,
        Err(e) => {
            assert!(!in_ci(), "CI must be able to set up a loop device: {e}");
            eprintln!("SKIPPED: {TEST}: {e}");
            return;
        }
    };
    let server = ServerProcess::start(&["--image", &device.device, "--control", "{dir}/ctl.sock"]);
    let control = server.dir().join("ctl.sock");
    let config = VmConfig::new(&server.socket, &guest_dir).pre("resize", &guest_script());
    let (run, resized) = run_with_resize(TEST, config, &backing.path, || {
        std::fs::OpenOptions::new()
            .write(true)
            .open(&backing.path)
            .and_then(|f| f.set_len(NEW_SIZE))
            .expect("grow the loop device's file");
        device.reread();
        ctl_resize(&control, None)
    });
    assert_guest_grew(TEST, &run, &resized, &backing.path);
    drop(server);
}
