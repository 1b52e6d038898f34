//! An OSD that stops mid-write (SIGSTOP for 5 s, then SIGCONT) loses nothing and leaves no
//! request unanswered: a libblkio client keeps 32 writes in flight on an `--rbd` export
//! throughout; every one must complete with success (librbd waits and resends), some of them
//! must have been held across the outage (else it was not mid-write), and afterwards the disk,
//! read through the server and exported from the cluster, holds every acknowledged write. Its
//! own cluster (this binary's), since the outage would stall any other test on it.
//!
//! A second test blocklists the server's Ceph client: its requests then fail with IOERR,
//! the server logs that once and keeps answering every request.

#[allow(dead_code)]
mod blkio_support;
mod ceph_support;
mod common;

use std::fs::File;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use blkio::ReqFlags;
use blkio_support::{
    check_file, describe_ret, pattern, read_vec, wait, within, write_slice, Client, ClientOptions,
    DiskModel, Rng, MIB,
};
use ceph_support::cluster;
use common::{spawn_server, ServerProcess};

const DISK: u64 = 64 * MIB;
const DEPTH: usize = 32;
/// Each slot writes only inside its own region, so that the model stays exact.
const REGION: u64 = DISK / DEPTH as u64;
const MAX_LEN: usize = 64 * 1024;
const OUTAGE: Duration = Duration::from_secs(5);

/// The tests of this binary take turns: the outage would stall the other one.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn rbd_an_osd_stopped_mid_write_loses_nothing_and_answers_everything() {
    let Some(c) = cluster("rbd_an_osd_stopped_mid_write_loses_nothing_and_answers_everything")
    else {
        return;
    };
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let image = c.image("64M");
    let spec = image.spec();
    let server = ServerProcess::start(&["--rbd", &spec, "--ceph-conf", c.conf_arg()]);
    let socket = server.socket.clone();
    let outage_over = Arc::new(AtomicBool::new(false));
    let over = outage_over.clone();
    let osd = c.osd_pid();
    let stopper = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(2));
        // SAFETY: kill(2) on the OSD this test binary's cluster started; no memory involved.
        assert_eq!(
            unsafe { libc::kill(osd, libc::SIGSTOP) },
            0,
            "SIGSTOP the OSD"
        );
        let stopped = Instant::now();
        std::thread::sleep(OUTAGE);
        // SAFETY: as above.
        assert_eq!(
            unsafe { libc::kill(osd, libc::SIGCONT) },
            0,
            "SIGCONT the OSD"
        );
        over.store(true, Ordering::SeqCst);
        stopped
    });
    let (model, slowest, completed) = within(
        Duration::from_secs(240),
        "writes across an OSD outage",
        move || {
            let opts = ClientOptions {
                buf_size: DEPTH * MAX_LEN,
                ..ClientOptions::default()
            };
            let mut client = Client::connect(&socket, &opts);
            let mut model = DiskModel::new(DISK);
            let mut rng = Rng::new(0x05D);
            // Per slot: (offset, len, seed, submitted at) of its write in flight.
            let mut in_flight: Vec<Option<(u64, usize, u64, Instant)>> = vec![None; DEPTH];
            let (mut seed, mut completed, mut slowest) = (1000u64, 0u64, Duration::ZERO);
            let mut after_outage = None;
            loop {
                let (queue, buf) = client.queue(0);
                for (slot, entry) in in_flight.iter_mut().enumerate() {
                    if entry.is_some() {
                        continue;
                    }
                    let len = (1 + rng.below((MAX_LEN / 4096) as u64) as usize) * 4096;
                    let offset =
                        slot as u64 * REGION + rng.below((REGION - len as u64) / 4096) * 4096;
                    seed += 1;
                    let at = slot * MAX_LEN;
                    buf.copy_in(at, &pattern(offset, len, seed));
                    queue.write(offset, buf.ptr(at, len), len, slot, ReqFlags::empty());
                    *entry = Some((offset, len, seed, Instant::now()));
                }
                for done in wait(queue, 1) {
                    let Some((offset, len, seed, sent)) = in_flight[done.user_data].take() else {
                        panic!("completion for an idle slot {}", done.user_data);
                    };
                    assert_eq!(
                        done.ret,
                        0,
                        "a write across the OSD outage failed: {}",
                        describe_ret(done.ret)
                    );
                    model.write(offset, len as u64, seed);
                    slowest = slowest.max(sent.elapsed());
                    completed += 1;
                }
                if outage_over.load(Ordering::SeqCst) {
                    let since = *after_outage.get_or_insert_with(Instant::now);
                    if since.elapsed() > Duration::from_secs(3) {
                        break;
                    }
                }
            }
            // Drain: every request is answered.
            let (queue, _) = client.queue(0);
            while in_flight.iter().any(Option::is_some) {
                for done in wait(queue, 1) {
                    let Some((offset, len, seed, _)) = in_flight[done.user_data].take() else {
                        panic!("completion for an idle slot {}", done.user_data);
                    };
                    assert_eq!(
                        done.ret,
                        0,
                        "write after the outage: {}",
                        describe_ret(done.ret)
                    );
                    model.write(offset, len as u64, seed);
                }
            }
            // Read everything back through the server.
            let (queue, buf) = client.queue(0);
            for at in (0..DISK).step_by(MAX_LEN) {
                let data = read_vec(queue, buf, at, MAX_LEN);
                if let Err(report) = model.check(at, &data, "read back after the outage") {
                    panic!("{report}");
                }
            }
            (model, slowest, completed)
        },
    );
    stopper.join().expect("stopper thread");
    eprintln!("{completed} writes, the slowest took {slowest:?}");
    assert!(
        slowest >= OUTAGE - Duration::from_secs(1),
        "no write was held across the {OUTAGE:?} outage (slowest {slowest:?}): it was not mid-write"
    );
    let status = server.stop();
    assert!(status.success(), "uringblk did not exit cleanly: {status}");
    let dir = tempfile::tempdir().expect("tempdir");
    check_file(&image.export(dir.path()), &model);
}

/// The address librados of the watcher of `spec` uses (`rbd status`), e.g. "127.0.0.1:0/1234".
fn watcher_address(c: &ceph_support::Cluster, spec: &str) -> String {
    let out = c.rbd(&["status", "--format", "json", spec]);
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).expect("rbd status JSON");
    status["watchers"][0]["address"]
        .as_str()
        .unwrap_or_else(|| panic!("no watcher of {spec}: {status}"))
        .to_string()
}

#[test]
fn rbd_a_blocklisted_client_logs_once_and_keeps_answering() {
    let Some(c) = cluster("rbd_a_blocklisted_client_logs_once_and_keeps_answering") else {
        return;
    };
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let image = c.image("16M");
    let spec = image.spec();
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("blk.sock");
    let log_dir = tempfile::tempdir().expect("tempdir");
    let log_path = log_dir.path().join("server.log");
    let child = spawn_server(
        &socket,
        &["--rbd", &spec, "--ceph-conf", c.conf_arg()],
        Stdio::from(File::create(&log_path).expect("log file")),
    );
    let server = ServerProcess {
        child,
        socket: socket.clone(),
        dir,
    };
    let sock = socket.clone();
    within(
        Duration::from_secs(120),
        "before the blocklist",
        move || {
            let mut client = Client::connect(&sock, &ClientOptions::default());
            let (queue, buf) = client.queue(0);
            write_slice(queue, buf, 0, &pattern(0, 65536, 7));
        },
    );
    let address = watcher_address(c, &spec);
    let out = Command::new("ceph")
        .arg("-c")
        .arg(&c.conf)
        .args(["osd", "blocklist", "add", &address])
        .output()
        .expect("ceph osd blocklist add");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let sock = socket.clone();
    within(Duration::from_secs(180), "after the blocklist", move || {
        let mut client = Client::connect(&sock, &ClientOptions::default());
        let (queue, buf) = client.queue(0);
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut failed = 0;
        // Every request is answered; once the OSD map reached the client, with IOERR.
        for i in 0..200u64 {
            buf.copy_in(0, &pattern(i * 4096, 4096, 8));
            queue.write(i * 4096, buf.ptr(0, 4096), 4096, 0, ReqFlags::empty());
            let done = wait(queue, 1);
            assert_eq!(done.len(), 1);
            if done[0].ret != 0 {
                failed += 1;
            }
            if failed >= 20 || Instant::now() > deadline {
                break;
            }
        }
        assert!(
            failed >= 20,
            "a blocklisted client's writes kept succeeding"
        );
    });
    let status = server.stop();
    assert!(
        status.success(),
        "uringblk did not exit cleanly after the blocklist: {status}"
    );
    let log = std::fs::read_to_string(&log_path).expect("server log");
    let said = log.matches("disconnected or blocklisted").count();
    assert_eq!(said, 1, "the blocklist must be logged exactly once:\n{log}");
}
