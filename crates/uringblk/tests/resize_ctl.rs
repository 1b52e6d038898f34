//! `uringblk ctl resize` against the real binary, without a VM: what is refused (shrinking, a
//! size off the block size, growing a read-only export, a file without SIZE, a block device
//! that is not the size asked) comes back as a JSON error that changes nothing, and the server
//! goes on; what is accepted changes the image and `info`. A libblkio client then reads and
//! writes past the old end.

#[allow(dead_code)]
mod blkio_support;
mod common;

use std::path::Path;
use std::process::{Command, Output};

use blkio_support::{read_vec, write_slice, Client, ClientOptions};
use common::{Image, ServerProcess};
use guestvm::testing::{in_ci, tool_or_skip};
use serde_json::Value;

const MIB: u64 = 1 << 20;

fn ctl(control: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_uringblk"))
        .arg("ctl")
        .arg("--control")
        .arg(control)
        .args(args)
        .output()
        .expect("run uringblk ctl")
}

fn ok_json(control: &Path, args: &[&str]) -> Value {
    let out = ctl(control, args);
    assert!(
        out.status.success(),
        "ctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("ctl prints JSON")
}

/// The error `ctl` printed for a refused command (exit code 1: the server answered).
fn refused(control: &Path, args: &[&str]) -> String {
    let out = ctl(control, args);
    assert_eq!(out.status.code(), Some(1), "ctl {args:?} must be refused");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn capacity(control: &Path) -> u64 {
    ok_json(control, &["info"])["capacity_bytes"]
        .as_u64()
        .expect("capacity")
}

#[test]
fn a_file_image_grows_and_nothing_else_changes_it() {
    let image = Image::new();
    let server = ServerProcess::start(&[
        "--image",
        image.arg(),
        "--create",
        "64M",
        "--logical-block-size",
        "4096",
        "--control",
        "{dir}/ctl.sock",
    ]);
    let control = server.dir().join("ctl.sock");
    let size = || std::fs::metadata(&image.path).unwrap().len();

    let r = ok_json(&control, &["resize", "96M"]);
    assert_eq!(r["from_bytes"], 64 * MIB);
    assert_eq!(r["to_bytes"], 96 * MIB);
    assert_eq!(r["guest_notified"], false);
    assert_eq!(r["guest"], "guest not notified (no frontend connected)");
    assert_eq!(size(), 96 * MIB);
    assert_eq!(capacity(&control), 96 * MIB);

    for (args, why) in [
        (
            vec!["resize", "32M"],
            "shrinking it to 33554432 bytes is refused",
        ),
        (
            vec!["resize", "100000512"],
            "not a multiple of the logical block size (4096",
        ),
        (vec!["resize"], "give SIZE"),
    ] {
        let e = refused(&control, &args);
        assert!(e.contains(why), "{args:?}: {e}");
        assert_eq!(size(), 96 * MIB, "{args:?} changed the image");
        assert_eq!(
            capacity(&control),
            96 * MIB,
            "{args:?} changed the capacity"
        );
    }
    // A size ctl cannot parse never reaches the server (clap's usage error, exit code 2).
    assert_eq!(ctl(&control, &["resize", "12Q"]).status.code(), Some(2));

    let same = ok_json(&control, &["resize", "96M"]);
    assert_eq!(same["guest"], "guest not notified (nothing changed)");

    // A client connecting now sees the new size and uses it.
    let mut client = Client::connect(&server.socket, &ClientOptions::default());
    assert_eq!(client.capacity(), 96 * MIB);
    let (queue, buf) = client.queue(0);
    let data = vec![0x5au8; 4096];
    write_slice(queue, buf, 80 * MIB, &data);
    assert_eq!(read_vec(queue, buf, 80 * MIB, 4096), data);
}

#[test]
fn a_read_only_export_is_not_grown() {
    let image = Image::new();
    std::fs::File::create(&image.path)
        .and_then(|f| f.set_len(64 * MIB))
        .unwrap();
    let server = ServerProcess::start(&[
        "--image",
        image.arg(),
        "--readonly",
        "--control",
        "{dir}/ctl.sock",
    ]);
    let control = server.dir().join("ctl.sock");
    let e = refused(&control, &["resize", "96M"]);
    assert!(e.contains("read-only"), "{e}");
    assert_eq!(std::fs::metadata(&image.path).unwrap().len(), 64 * MIB);
    assert_eq!(capacity(&control), 64 * MIB);
}

#[test]
fn a_block_device_is_reread_after_its_owner_grew_it() {
    const TEST: &str = "a_block_device_is_reread_after_its_owner_grew_it";
    if !tool_or_skip(TEST, "losetup", "apt-get install mount") {
        return;
    }
    let backing = Image::new();
    std::fs::File::create(&backing.path)
        .and_then(|f| f.set_len(64 * MIB))
        .unwrap();
    let out = Command::new("losetup")
        .args(["--find", "--show"])
        .arg(&backing.path)
        .output()
        .expect("losetup");
    if !out.status.success() {
        let e = String::from_utf8_lossy(&out.stderr);
        assert!(!in_ci(), "CI must be able to set up a loop device: {e}");
        eprintln!("SKIPPED: {TEST}: losetup: {e}");
        return;
    }
    let device = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let detach = Detach(device.clone());
    let server = ServerProcess::start(&["--image", &device, "--control", "{dir}/ctl.sock"]);
    let control = server.dir().join("ctl.sock");

    // Not grown yet: nothing to take.
    let same = ok_json(&control, &["resize"]);
    assert_eq!(same["to_bytes"], 64 * MIB);
    assert_eq!(same["guest"], "guest not notified (nothing changed)");

    std::fs::OpenOptions::new()
        .write(true)
        .open(&backing.path)
        .and_then(|f| f.set_len(96 * MIB))
        .unwrap();
    let status = Command::new("losetup")
        .args(["-c", &device])
        .status()
        .unwrap();
    assert!(status.success(), "losetup -c");

    // A size that is not the device's: refused, nothing changes.
    let e = refused(&control, &["resize", "128M"]);
    assert!(e.contains("is 100663296 bytes, not 134217728"), "{e}");
    assert_eq!(capacity(&control), 64 * MIB);
    // The device's own size, given or not.
    let r = ok_json(&control, &["resize", "96M"]);
    assert_eq!(r["from_bytes"], 64 * MIB);
    assert_eq!(r["to_bytes"], 96 * MIB);
    assert_eq!(capacity(&control), 96 * MIB);
    drop(server);
    drop(detach);
}

/// Detaches a loop device when dropped.
struct Detach(String);

impl Drop for Detach {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}
