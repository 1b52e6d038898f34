//! `uringblk --rbd` against a real single-node Ceph cluster (scripts/ceph-cluster.sh, started
//! by this binary), with libblkio's vhost-user client: data integrity on 2 queues and 2
//! iothreads at depth 32, flush, discard, write-zeroes, a snapshot exported read-only,
//! --readonly, reconnects, kill -9 and restart with the data intact, resize through the control
//! socket and by `rbd resize`, and the start-up errors (an unreachable cluster, a missing pool or
//! image: one line, exit 2, no socket, within the connect bound). What the server acknowledged is
//! checked again after it stopped, in the image itself (`rbd export`). Closing the storage joins
//! librados's threads (checked in this process). Without Ceph installed every test prints
//! SKIPPED (and fails under CI=true).

#[allow(dead_code)]
mod blkio_support;
mod ceph_support;
mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use blkio::ReqFlags;
use blkio_support::workload::{self, Params};
use blkio_support::{
    check_file, check_old_or_new, connect, discard, expect_ok, flush, pattern, read_vec,
    submit_pattern_writes, wait, within, write_at, write_slice, write_zeroes, Client,
    ClientOptions, DiskModel, MIB,
};
use ceph_support::{cluster, Cluster, RbdImage};
use common::{spawn_server, ServerProcess};

const TEST_DEADLINE: Duration = Duration::from_secs(300);
const DISK: u64 = 64 * MIB;

fn serve(c: &Cluster, image: &RbdImage<'_>, extra: &[&str]) -> ServerProcess {
    let spec = image.spec();
    let mut args = vec!["--rbd", &spec, "--ceph-conf", c.conf_arg()];
    args.extend_from_slice(extra);
    ServerProcess::start(&args)
}

fn stop(server: ServerProcess) {
    let status = server.stop();
    assert!(status.success(), "uringblk did not exit cleanly: {status}");
}

fn write_pattern(client: &mut Client, model: &mut DiskModel, offset: u64, len: usize, seed: u64) {
    let (queue, buf) = client.queue(0);
    write_slice(queue, buf, offset, &pattern(offset, len, seed));
    model.write(offset, len as u64, seed);
}

fn check_range(client: &mut Client, model: &DiskModel, offset: u64, len: usize, what: &str) {
    let (queue, buf) = client.queue(0);
    let mut at = offset;
    while at < offset + len as u64 {
        let piece = (offset + len as u64 - at).min(MIB) as usize;
        let data = read_vec(queue, buf, at, piece);
        if let Err(report) = model.check(at, &data, what) {
            panic!("{report}");
        }
        at += piece as u64;
    }
}

/// The image's content (rbd export) must be what the model says.
fn check_image(image: &RbdImage<'_>, model: &DiskModel) {
    let dir = tempfile::tempdir().expect("tempdir");
    check_file(&image.export(dir.path()), model);
}

#[test]
fn rbd_data_integrity_two_queues_two_iothreads_depth_32() {
    let Some(c) = cluster("rbd_data_integrity_two_queues_two_iothreads_depth_32") else {
        return;
    };
    let image = c.image("64M");
    let server = serve(c, &image, &["--queues", "2", "--iothreads", "2"]);
    let socket = server.socket.clone();
    let model = within(TEST_DEADLINE, "rbd integrity workload", move || {
        let params = Params::new(512);
        let opts = ClientOptions {
            num_queues: 2,
            buf_size: params.buffer_bytes(2),
            ..ClientOptions::default()
        };
        let mut client = Client::connect(&socket, &opts);
        assert_eq!(client.capacity(), DISK, "capacity is the image's size");
        assert_eq!(client.prop_i32("max-queues"), 2);
        let model = workload::run(&mut client, &params);
        assert!(
            model.written_sectors() > 10_000,
            "the workload wrote too little"
        );
        workload::verify_disk(&mut client, &model);
        model
    });
    let (status, stats) = server.stop_with_stats();
    assert!(status.success(), "uringblk did not exit cleanly: {status}");
    let queues = stats["queues"].as_array().expect("per-queue stats");
    assert_eq!(queues.len(), 2);
    for (q, s) in queues.iter().enumerate() {
        assert!(
            s["write"]["ops"].as_u64().unwrap_or(0) > 0
                && s["read"]["ops"].as_u64().unwrap_or(0) > 0,
            "queue {q} served no reads or writes: {s}"
        );
    }
    check_image(&image, &model);
}

#[test]
fn rbd_flush_discard_and_write_zeroes() {
    let Some(c) = cluster("rbd_flush_discard_and_write_zeroes") else {
        return;
    };
    let image = c.image("64M");
    let server = serve(c, &image, &[]);
    let socket = server.socket.clone();
    let model = within(TEST_DEADLINE, "rbd flush/discard/write-zeroes", move || {
        let mut client = Client::connect(&socket, &ClientOptions::default());
        let mut model = DiskModel::new(DISK);
        for mib in 4..24 {
            write_pattern(&mut client, &mut model, mib * MIB, MIB as usize, mib);
        }
        let (queue, buf) = client.queue(0);
        expect_ok(flush(queue), "flush");
        // A FUA write is durable when it completes.
        buf.copy_in(0, &pattern(2 * MIB, 4096, 99));
        expect_ok(
            write_at(queue, buf, 0, 2 * MIB, 4096, ReqFlags::FUA),
            "FUA write",
        );
        model.write(2 * MIB, 4096, 99);

        // Whole RADOS objects (4 MiB) discarded read back as zeros.
        expect_ok(discard(queue, 8 * MIB, 8 * MIB), "discard of two objects");
        model.zero(8 * MIB, 8 * MIB);
        // A part of an object: librbd may keep the data (a discard is a hint).
        expect_ok(discard(queue, 4 * MIB + 4096, 8192), "discard of 8 KiB");
        let data = read_vec(queue, buf, 4 * MIB, 16384);
        check_old_or_new(&data, 4 * MIB, &[4], "partly discarded object");
        model.write(4 * MIB, 4096, 4);
        // Write-zeroes always reads back zeros, with unmap or not, whole or partial.
        for (offset, len, flags) in [
            (16 * MIB + 512, 64 * 1024 + 512, ReqFlags::NO_UNMAP),
            (17 * MIB, MIB, ReqFlags::empty()),
            (18 * MIB + 3584, 512, ReqFlags::empty()),
            (20 * MIB, 4 * MIB, ReqFlags::NO_UNMAP),
        ] {
            expect_ok(
                write_zeroes(queue, offset, len, flags),
                &format!("write-zeroes of {len} at {offset} ({flags:?})"),
            );
            model.zero(offset, len);
        }
        expect_ok(flush(queue), "flush after discard and write-zeroes");
        check_range(
            &mut client,
            &model,
            2 * MIB,
            22 * MIB as usize,
            "after discard and write-zeroes",
        );
        model
    });
    stop(server);
    // The partly discarded range: old data or zeros; everything else exact.
    let dir = tempfile::tempdir().expect("tempdir");
    let data = std::fs::read(image.export(dir.path())).expect("read export");
    let (a, b) = (4 * MIB as usize + 4096, 4 * MIB as usize + 12288);
    check_old_or_new(
        &data[a..b],
        a as u64,
        &[4],
        "exported partly discarded range",
    );
    if let Err(r) = model.check(0, &data[..a], "export before the partial discard") {
        panic!("{r}");
    }
    if let Err(r) = model.check(b as u64, &data[b..], "export after the partial discard") {
        panic!("{r}");
    }
}

#[test]
fn rbd_snapshot_is_exported_read_only_and_readonly_flag_works() {
    let Some(c) = cluster("rbd_snapshot_is_exported_read_only_and_readonly_flag_works") else {
        return;
    };
    let image = c.image("64M");
    let mut snap_model = DiskModel::new(DISK);
    let server = serve(c, &image, &[]);
    let socket = server.socket.clone();
    snap_model = within(TEST_DEADLINE, "write before the snapshot", move || {
        let mut client = Client::connect(&socket, &ClientOptions::default());
        write_pattern(&mut client, &mut snap_model, 0, MIB as usize, 41);
        write_pattern(&mut client, &mut snap_model, DISK - MIB, MIB as usize, 42);
        snap_model
    });
    stop(server);
    c.rbd(&["snap", "create", &format!("{}@s1", image.spec())]);
    // The image changes after the snapshot; the snapshot must not.
    let server = serve(c, &image, &[]);
    let socket = server.socket.clone();
    let mut head_model = snap_model.clone();
    head_model = within(TEST_DEADLINE, "write after the snapshot", move || {
        let mut client = Client::connect(&socket, &ClientOptions::default());
        write_pattern(&mut client, &mut head_model, 0, MIB as usize, 43);
        head_model
    });
    stop(server);

    let snap = format!("{}@s1", image.spec());
    let server = ServerProcess::start(&["--rbd", &snap, "--ceph-conf", c.conf_arg()]);
    let socket = server.socket.clone();
    within(TEST_DEADLINE, "read the snapshot", move || {
        let writable = connect(&socket, false);
        match Client::start(writable, &ClientOptions::default()) {
            Ok(_) => panic!("a writable client started on a snapshot (RO not offered)"),
            Err(e) => assert_eq!(e.errno(), blkio::Errno::ROFS, "unexpected error: {e}"),
        }
        let opts = ClientOptions {
            read_only: true,
            ..ClientOptions::default()
        };
        let mut client = Client::connect(&socket, &opts);
        check_range(&mut client, &snap_model, 0, MIB as usize, "snapshot start");
        check_range(
            &mut client,
            &snap_model,
            DISK - MIB,
            MIB as usize,
            "snapshot end",
        );
        let (queue, buf) = client.queue(0);
        assert_ne!(
            write_at(queue, buf, 0, 0, 4096, ReqFlags::empty()),
            0,
            "write on a snapshot"
        );
    });
    stop(server);

    let server = serve(c, &image, &["--readonly"]);
    let socket = server.socket.clone();
    let expected = head_model.clone();
    within(TEST_DEADLINE, "read the image --readonly", move || {
        let writable = connect(&socket, false);
        assert!(
            Client::start(writable, &ClientOptions::default()).is_err(),
            "a writable client started on --readonly"
        );
        let opts = ClientOptions {
            read_only: true,
            ..ClientOptions::default()
        };
        let mut client = Client::connect(&socket, &opts);
        check_range(&mut client, &expected, 0, MIB as usize, "--readonly image");
    });
    stop(server);
    check_image(&image, &head_model);
}

#[test]
fn rbd_reconnect_to_the_same_server_keeps_data() {
    let Some(c) = cluster("rbd_reconnect_to_the_same_server_keeps_data") else {
        return;
    };
    let image = c.image("64M");
    let mut server = serve(c, &image, &["--queues", "2", "--iothreads", "2"]);
    let socket = server.socket.clone();
    let model = within(TEST_DEADLINE, "rbd reconnect", move || {
        let mut model = DiskModel::new(DISK);
        for (round, seed) in [51u64, 52, 53].into_iter().enumerate() {
            let mut client = Client::connect(&socket, &ClientOptions::default());
            if round > 0 {
                check_range(
                    &mut client,
                    &model,
                    0,
                    3 * MIB as usize,
                    "an earlier client's data",
                );
            }
            write_pattern(
                &mut client,
                &mut model,
                round as u64 * MIB,
                MIB as usize,
                seed,
            );
        }
        model
    });
    assert!(
        server.child.try_wait().expect("try_wait").is_none(),
        "uringblk exited after its clients disconnected"
    );
    stop(server);
    check_image(&image, &model);
}

/// kill -9 with writes in flight, then a new server on the same image: what was acknowledged
/// is there, what was cut off is old or new, and the new server takes writes (librbd breaks
/// the dead client's exclusive lock).
#[test]
fn rbd_kill_9_and_restart_keeps_the_data() {
    let Some(c) = cluster("rbd_kill_9_and_restart_keeps_the_data") else {
        return;
    };
    let image = c.image("64M");
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("blk.sock");
    let spec = image.spec();
    let args = [
        "--rbd",
        &spec,
        "--ceph-conf",
        c.conf_arg(),
        "--queues",
        "2",
        "--iothreads",
        "2",
    ];
    let mut child = spawn_server(&socket, &args, Stdio::inherit());
    let chunk = 64 * 1024usize;
    let cut_off = 32 * chunk;
    let sock = socket.clone();
    let model = within(TEST_DEADLINE, "kill -9 mid-write", move || {
        let mut model = DiskModel::new(DISK);
        let mut client = Client::connect(&sock, &ClientOptions::default());
        write_pattern(&mut client, &mut model, 16 * MIB, 4 * MIB as usize, 61);
        expect_ok(flush(&mut client.queues[0]), "flush");
        let (queue, buf) = client.queue(0);
        submit_pattern_writes(queue, buf, 0, chunk, 32, 62);
        // Submitted; killed before (most of) them complete.
        for done in wait(queue, 0) {
            expect_ok(done.ret, "write completed before the kill");
        }
        child.kill().expect("kill -9");
        let status = child.wait().expect("wait");
        assert!(!status.success(), "killed server: {status}");
        drop(client);
        model
    });
    let server = spawn_server(&socket, &args, Stdio::inherit());
    let mut server = ServerProcess {
        child: server,
        socket: socket.clone(),
        dir,
    };
    let sock = socket.clone();
    let model = within(TEST_DEADLINE, "after the restart", move || {
        let mut model = model;
        let mut client = Client::connect(&sock, &ClientOptions::default());
        check_range(
            &mut client,
            &model,
            16 * MIB,
            4 * MIB as usize,
            "acknowledged data after kill -9",
        );
        let (queue, buf) = client.queue(0);
        let data = read_vec(queue, buf, 0, cut_off);
        check_old_or_new(&data, 0, &[62], "writes cut off by kill -9");
        let started = Instant::now();
        write_pattern(&mut client, &mut model, 32 * MIB, MIB as usize, 63);
        eprintln!("first write after the restart took {:?}", started.elapsed());
        check_range(
            &mut client,
            &model,
            32 * MIB,
            MIB as usize,
            "write after the restart",
        );
        model
    });
    assert!(server.child.try_wait().expect("try_wait").is_none());
    stop(server);
    let dir = tempfile::tempdir().expect("tempdir");
    let data = std::fs::read(image.export(dir.path())).expect("export");
    check_old_or_new(&data[..cut_off], 0, &[62], "exported cut-off writes");
    if let Err(r) = model.check(cut_off as u64, &data[cut_off..], "export after kill -9") {
        panic!("{r}");
    }
}

fn ctl(control: &Path, args: &[&str]) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_uringblk"))
        .arg("ctl")
        .arg("--control")
        .arg(control)
        .args(args)
        .output()
        .expect("run uringblk ctl");
    assert!(
        out.status.success(),
        "ctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("ctl prints JSON")
}

#[test]
fn rbd_resize_by_ctl_and_by_rbd_resize_is_seen() {
    let Some(c) = cluster("rbd_resize_by_ctl_and_by_rbd_resize_is_seen") else {
        return;
    };
    let image = c.image("64M");
    let server = serve(c, &image, &["--control", "{dir}/ctl.sock"]);
    let control = server.dir().join("ctl.sock");
    let info = ctl(&control, &["info"]);
    assert_eq!(info["capacity_bytes"], DISK);
    assert_eq!(info["storage"], "external");
    // Through the control socket: rbd_resize, then the new capacity.
    let r = ctl(&control, &["resize", "96M"]);
    assert_eq!(r["to_bytes"], 96 * MIB, "{r}");
    assert_eq!(image.size(), 96 * MIB, "the image itself grew");
    assert_eq!(ctl(&control, &["info"])["capacity_bytes"], 96 * MIB);
    // By someone else: the header watch notices.
    c.rbd(&["resize", &image.spec(), "--size", "128M"]);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let cap = ctl(&control, &["info"])["capacity_bytes"].as_u64();
        if cap == Some(128 * MIB) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "rbd resize not seen: capacity {cap:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // A client sees the new size and writes at its end.
    let socket = server.socket.clone();
    within(TEST_DEADLINE, "write past the old end", move || {
        let mut client = Client::connect(&socket, &ClientOptions::default());
        assert_eq!(client.capacity(), 128 * MIB);
        let mut model = DiskModel::new(128 * MIB);
        write_pattern(&mut client, &mut model, 127 * MIB, MIB as usize, 71);
        check_range(
            &mut client,
            &model,
            127 * MIB,
            MIB as usize,
            "past the old end",
        );
    });
    stop(server);
}

/// Runs uringblk with `args` that must fail at start: exit 2, one line on stderr, no socket.
fn start_error(args: &[&str]) -> (String, Duration) {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("blk.sock");
    let started = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_uringblk"))
        .arg("--socket")
        .arg(&socket)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run uringblk");
    let took = started.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
    let errors: Vec<&str> = stderr.lines().filter(|l| l.contains("error")).collect();
    assert_eq!(errors.len(), 1, "one error line: {stderr}");
    assert!(!socket.exists(), "the socket was created");
    (errors[0].to_string(), took)
}

#[test]
fn rbd_start_errors_exit_2_before_the_socket() {
    let Some(c) = cluster("rbd_start_errors_exit_2_before_the_socket") else {
        return;
    };
    let (e, _) = start_error(&["--rbd", "rbd/no-such-image", "--ceph-conf", c.conf_arg()]);
    assert!(
        e.contains("rbd/no-such-image") && e.contains("No such file"),
        "{e}"
    );
    let (e, _) = start_error(&["--rbd", "no-such-pool/x", "--ceph-conf", c.conf_arg()]);
    assert!(e.contains("pool 'no-such-pool'"), "{e}");
    let (e, _) = start_error(&["--rbd", "rbd/x", "--ceph-conf", "/nonexistent/ceph.conf"]);
    assert!(e.contains("/nonexistent/ceph.conf"), "{e}");
    // A cluster nobody answers for: a monitor address where nothing listens.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    drop(listener);
    let dir = tempfile::tempdir().expect("tempdir");
    let conf = dir.path().join("ceph.conf");
    std::fs::write(
        &conf,
        format!("[global]\nmon host = v2:127.0.0.1:{port}\nauth client required = none\n"),
    )
    .expect("write conf");
    let (e, took) = start_error(&[
        "--rbd",
        "rbd/x",
        "--ceph-conf",
        conf.to_str().expect("UTF-8"),
        "--ceph-connect-timeout",
        "2",
    ]);
    assert!(e.contains("cannot connect to the Ceph cluster"), "{e}");
    assert!(
        took < Duration::from_secs(8),
        "an unreachable cluster took {took:?} with --ceph-connect-timeout 2"
    );
    // Flags that need --rbd, or that --rbd does not take.
    let out = Command::new(env!("CARGO_BIN_EXE_uringblk"))
        .args([
            "--socket",
            "/tmp/never.sock",
            "--null",
            "1G",
            "--ceph-id",
            "x",
        ])
        .output()
        .expect("run uringblk");
    assert_eq!(out.status.code(), Some(2));
    let (e, _) = start_error(&["--rbd", "rbd/x", "--ceph-conf", c.conf_arg(), "--buffered"]);
    assert!(e.contains("not --rbd"), "{e}");
}

/// `config get KEY` through the server's librados admin socket.
fn librados_config(asok: &Path, key: &str) -> String {
    let out = Command::new("ceph")
        .arg("--admin-daemon")
        .arg(asok)
        .args(["config", "get", key])
        .output()
        .expect("run ceph --admin-daemon");
    assert!(out.status.success(), "config get {key}: {out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("config get is JSON");
    v[key]
        .as_str()
        .unwrap_or_else(|| panic!("no {key} in {v}"))
        .to_owned()
}

#[test]
fn rbd_librbd_defaults_apply_and_ceph_option_overrides_them() {
    let Some(c) = cluster("rbd_librbd_defaults_apply_and_ceph_option_overrides_them") else {
        return;
    };
    let image = c.image("16M");
    let asok_arg = "admin_socket={dir}/client.asok";
    let server = serve(
        c,
        &image,
        &[
            "--queues",
            "2",
            "--iothreads",
            "2",
            "--ceph-option",
            asok_arg,
        ],
    );
    let asok = server.dir().join("client.asok");
    assert_eq!(librados_config(&asok, "rbd_cache"), "false");
    assert_eq!(
        librados_config(&asok, "rbd_non_blocking_aio"),
        "false",
        "ops are dispatched in the iothread"
    );
    assert_eq!(
        librados_config(&asok, "librados_thread_count"),
        "2",
        "one completion thread per iothread"
    );
    stop(server);
    let server = serve(
        c,
        &image,
        &[
            "--ceph-option",
            asok_arg,
            "--ceph-option",
            "librados_thread_count=3",
            "--ceph-option",
            "rbd_non_blocking_aio=true",
        ],
    );
    let asok = server.dir().join("client.asok");
    assert_eq!(librados_config(&asok, "librados_thread_count"), "3");
    assert_eq!(librados_config(&asok, "rbd_non_blocking_aio"), "true");
    stop(server);
    let (e, _) = start_error(&[
        "--rbd",
        &image.spec(),
        "--ceph-conf",
        c.conf_arg(),
        "--ceph-option",
        "no_such_option=1",
    ]);
    assert!(e.contains("no_such_option"), "{e}");
}

/// The threads of this process whose ids are not in `before`, with their names.
fn threads_since(before: &[u32]) -> Vec<(u32, String)> {
    let mut new = Vec::new();
    for entry in std::fs::read_dir("/proc/self/task").expect("/proc/self/task") {
        let Ok(entry) = entry else { continue };
        let Some(tid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if before.contains(&tid) {
            continue;
        }
        // A thread that ended since the listing has no comm any more.
        if let Ok(name) = std::fs::read_to_string(entry.path().join("comm")) {
            new.push((tid, name.trim().to_string()));
        }
    }
    new
}

/// librados's own threads (messenger workers, timers, the log, the admin socket), as opposed
/// to the other tests' threads that run in this process meanwhile (named after their test).
fn is_librados_thread(name: &str) -> bool {
    !name.starts_with("rbd_") && !name.starts_with("main")
}

/// What the server does at stop, in this process: `RbdStorage::close` ends librados (every
/// thread it started is joined) while other references to the storage are still held, as the
/// iothreads' are when the server exits. A librados thread still running during the exit
/// handlers once crashed the server's clean stop (SIGSEGV under __cxa_finalize).
#[test]
fn rbd_close_joins_librados_threads_before_exit() {
    let Some(c) = cluster("rbd_close_joins_librados_threads_before_exit") else {
        return;
    };
    let image = c.image("16M");
    let before: Vec<u32> = threads_since(&[]).into_iter().map(|(t, _)| t).collect();
    let storage = rbd_backend::RbdStorage::open(&rbd_backend::RbdOptions {
        spec: rbd_backend::RbdImageSpec::parse(&image.spec()).expect("spec"),
        conf: c.conf.clone(),
        id: "admin".into(),
        keyring: None,
        iothreads: 1,
        extra_options: Vec::new(),
        connect_timeout: Duration::from_secs(30),
        read_only: false,
    })
    .expect("open the image in-process");
    storage
        .watch_updates(Box::new(|| {}))
        .expect("watch the header");
    let started: Vec<(u32, String)> = threads_since(&before)
        .into_iter()
        .filter(|(_, name)| is_librados_thread(name))
        .collect();
    eprintln!("librados threads: {started:?}");
    assert!(!started.is_empty(), "librados started no thread we can see");
    let still_held = storage.clone();
    // SAFETY: no op was started on this storage and none will be.
    unsafe { still_held.close() }.expect("close");
    let left: Vec<&(u32, String)> = started
        .iter()
        .filter(|(tid, _)| Path::new(&format!("/proc/self/task/{tid}")).exists())
        .collect();
    assert!(
        left.is_empty(),
        "librados threads still run after close: {left:?}"
    );
    assert!(storage.size().is_err(), "a closed storage answers no more");
}
