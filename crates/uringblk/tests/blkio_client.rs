//! A real vhost-user-blk client against the real binary: libblkio's `virtio-blk-vhost-user`
//! driver (the `blkio` crate) connects to a `uringblk` process and checks data integrity on
//! several queues and iothreads at depth 32, that data reaches the image file, flush, discard,
//! write-zeroes, capacity and limits, read-only exports, the null backend, and reconnects.
//! No VM needed. Each test starts its own server; client work runs under a deadline so a hung
//! server fails the test instead of hanging CI.

mod blkio_support;
mod common;

use blkio::{Blkioq, ReqFlags};
use blkio_support::workload::{self, Params};
use blkio_support::{
    allocated_bytes, check_file, check_old_or_new, connect, describe_ret, discard, expect_ok,
    flush, pattern, read_at, read_vec, submit_pattern_writes, wait, wait_one, within, write_at,
    write_slice, write_zeroes, Client, ClientOptions, DiskModel, Rng, SharedBuf, MIB, SECTOR,
};
use common::{Image, ServerProcess};
use std::path::Path;
use std::time::Duration;

/// Upper bound for one test's client work (debug build, 2 CPUs shared with other tests).
const TEST_DEADLINE: Duration = Duration::from_secs(300);
const DISK: u64 = 64 * MIB;
const EIO: i32 = -libc::EIO;

/// SIGTERM, and the server must exit with status 0.
fn stop(server: ServerProcess) {
    let status = server.stop();
    assert!(
        status.success(),
        "uringblk did not exit cleanly on SIGTERM: {status}"
    );
}

fn one_queue() -> ClientOptions {
    ClientOptions::default()
}

fn expect_err(ret: i32, expected: i32, what: &str) {
    assert_eq!(
        ret,
        expected,
        "{what}: expected {}, got {}",
        describe_ret(expected),
        describe_ret(ret)
    );
}

/// Reads `[offset, offset+len)` in reads of at most 1 MiB and compares with `model`.
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

/// Writes the pattern for `seed` over `[offset, offset+len)` and records it in `model`.
fn write_pattern(client: &mut Client, model: &mut DiskModel, offset: u64, len: usize, seed: u64) {
    let (queue, buf) = client.queue(0);
    write_slice(queue, buf, offset, &pattern(offset, len, seed));
    model.write(offset, len as u64, seed);
}

/// The integrity workload on `queues` queues served by `iothreads` iothreads, then the whole
/// disk read back through the server, then (after SIGTERM) the image file read with std::fs.
fn integrity_run(queues: usize, iothreads: usize, extra_args: &[&str], logical_block: u64) {
    let image = Image::new();
    let (queues_arg, iothreads_arg) = (queues.to_string(), iothreads.to_string());
    let mut args = vec![
        "--image",
        image.arg(),
        "--create",
        "64M",
        "--queues",
        &queues_arg,
        "--iothreads",
        &iothreads_arg,
    ];
    args.extend_from_slice(extra_args);
    let server = ServerProcess::start(&args);
    let socket = server.socket.clone();
    let model = within(TEST_DEADLINE, "data integrity workload", move || {
        let params = Params::new(logical_block);
        let opts = ClientOptions {
            num_queues: queues as i32,
            buf_size: params.buffer_bytes(queues),
            ..ClientOptions::default()
        };
        let mut client = Client::connect(&socket, &opts);
        assert_eq!(
            client.capacity(),
            DISK,
            "capacity differs from --create 64M"
        );
        assert_eq!(
            client.prop_i32("max-queues") as usize,
            queues,
            "max-queues differs from --queues"
        );
        assert_eq!(
            client.prop_i32("request-alignment") as u64,
            logical_block,
            "request alignment (blk_size) differs from the logical block size"
        );
        let mut model = workload::run(&mut client, &params);
        assert!(
            model.written_sectors() > 10_000,
            "workload wrote too little to mean anything"
        );
        workload::verify_disk(&mut client, &model);
        // Guest buffers at odd addresses in odd-sized segments (bounce-buffer path).
        let offset = 40 * MIB + 3 * logical_block;
        scattered_round_trip(&mut client, &mut model, offset, 16 * 1024, logical_block);
        model
    });
    let (status, stats) = server.stop_with_stats();
    assert!(status.success(), "uringblk did not exit cleanly: {status}");
    let queues_stats = stats["queues"].as_array().expect("per-queue stats");
    assert_eq!(queues_stats.len(), queues, "one stats entry per queue");
    let total = |key: &str, field: &str| -> u64 {
        queues_stats
            .iter()
            .map(|q| q[key][field].as_u64().unwrap_or(0))
            .sum()
    };
    assert!(
        total("write", "ops") > 0 && total("read", "ops") > 0,
        "stats: {stats}"
    );
    assert_eq!(
        total("write", "errors") + total("read", "errors"),
        0,
        "stats: {stats}"
    );
    // The workload submits adjacent writes together: the server must have merged some.
    let merged: u64 = queues_stats
        .iter()
        .map(|q| q["merged"].as_u64().unwrap_or(0))
        .sum();
    assert!(merged > 0, "no request was merged: {stats}");
    check_file(&image.path, &model);
}

#[test]
fn data_integrity_two_queues_two_iothreads_direct() {
    integrity_run(2, 2, &[], 512);
}

#[test]
fn data_integrity_four_queues_on_two_iothreads() {
    integrity_run(4, 2, &[], 512);
}

#[test]
fn data_integrity_buffered() {
    integrity_run(2, 2, &["--buffered"], 512);
}

#[test]
fn data_integrity_4k_logical_blocks() {
    integrity_run(2, 2, &["--logical-block-size", "4096"], 4096);
}

/// Splits `total` bytes into pieces of 1..=`longest` bytes (the last one whatever remains) laid
/// out from `buf_offset + 3` with gaps of 1..=7 bytes, so no piece is aligned to anything.
/// `longest` is chosen so the count stays well under `max_segments`. Returns (offset, length).
fn odd_pieces(
    rng: &mut Rng,
    buf_offset: usize,
    total: usize,
    max_segments: usize,
) -> Vec<(usize, usize)> {
    let longest = 700.max(4 * total / max_segments) as u64;
    let mut pieces = Vec::new();
    let mut at = buf_offset + 3;
    let mut left = total;
    while left > 0 {
        let len = (1 + rng.below(longest) as usize).min(left);
        pieces.push((at, len));
        at += len + 1 + rng.below(7) as usize;
        left -= len;
    }
    assert!(
        pieces.len() <= max_segments,
        "test wants more segments than seg_max"
    );
    pieces
}

/// writev of `data` at `offset` from `write_pieces`, then readv into `read_pieces` (poisoned
/// first), then a plain read; both reads must return `data`.
fn vectored_round_trip(
    queue: &mut Blkioq,
    buf: &SharedBuf,
    offset: u64,
    data: &[u8],
    write_pieces: &[(usize, usize)],
    read_pieces: &[(usize, usize)],
) {
    buf.scatter(write_pieces, data);
    let iovecs = buf.iovecs(write_pieces);
    queue.writev(
        offset,
        iovecs.as_ptr(),
        iovecs.len() as u32,
        7,
        ReqFlags::empty(),
    );
    let what = format!(
        "writev of {} bytes in {} segments at {offset}",
        data.len(),
        iovecs.len()
    );
    expect_ok(wait_one(queue, 7), &what);

    for &(piece_offset, len) in read_pieces {
        buf.fill(piece_offset, len, 0xA5);
    }
    let iovecs = buf.iovecs(read_pieces);
    queue.readv(
        offset,
        iovecs.as_ptr(),
        iovecs.len() as u32,
        8,
        ReqFlags::empty(),
    );
    let what = format!(
        "readv of {} bytes in {} segments at {offset}",
        data.len(),
        iovecs.len()
    );
    expect_ok(wait_one(queue, 8), &what);
    assert!(
        buf.gather(read_pieces) == data,
        "{what} returned other data than written"
    );

    let plain = read_vec(queue, buf, offset, data.len());
    assert!(
        plain == data,
        "plain read at {offset} differs from the vectored write"
    );
}

/// Writes `total` bytes at `offset` from unaligned odd-sized segments and reads them back through
/// a different unaligned segmentation (the O_DIRECT bounce-buffer path of the server).
fn scattered_round_trip(
    client: &mut Client,
    model: &mut DiskModel,
    offset: u64,
    total: usize,
    logical_block: u64,
) {
    assert_eq!(total as u64 % logical_block, 0);
    let max_segments = client.prop_i32("max-segments") as usize;
    let (queue, buf) = client.queue(0);
    let mut rng = Rng::new(offset ^ 0xDA7A);
    let seed = 0xC0FFEE;
    let write_pieces = odd_pieces(&mut rng, 0, total, max_segments);
    let read_pieces = odd_pieces(&mut rng, buf.len() / 2, total, max_segments);
    let data = pattern(offset, total, seed);
    vectored_round_trip(queue, buf, offset, &data, &write_pieces, &read_pieces);
    model.write(offset, total as u64, seed);
}

#[test]
fn scattered_unaligned_segments_round_trip_with_direct_io() {
    let image = Image::new();
    let server = ServerProcess::start(&["--image", image.arg(), "--create", "64M"]);
    let socket = server.socket.clone();
    let model = within(TEST_DEADLINE, "odd segments", move || {
        let mut client = Client::connect(&socket, &one_queue());
        let mut model = DiskModel::new(DISK);
        for (index, total) in [512usize, 4096, 16 * 1024, 64 * 1024]
            .into_iter()
            .enumerate()
        {
            let offset = (index as u64 + 1) * MIB + 512 * (index as u64 + 1);
            scattered_round_trip(&mut client, &mut model, offset, total, 512);
        }
        model
    });
    stop(server);
    check_file(&image.path, &model);
}

#[test]
fn unaligned_requests_fail_with_4k_logical_blocks() {
    let image = Image::new();
    let server = ServerProcess::start(&[
        "--image",
        image.arg(),
        "--create",
        "64M",
        "--logical-block-size",
        "4096",
    ]);
    let socket = server.socket.clone();
    let model = within(TEST_DEADLINE, "4k alignment", move || {
        let mut client = Client::connect(&socket, &one_queue());
        let mut model = DiskModel::new(DISK);
        write_pattern(&mut client, &mut model, 0, 64 * 1024, 1);
        let (queue, buf) = client.queue(0);
        buf.copy_in(0, &pattern(0, 8192, 2));
        // 512-byte aligned (what virtio addresses) but not 4096-byte aligned.
        expect_err(
            write_at(queue, buf, 0, 512, 4096, ReqFlags::empty()),
            EIO,
            "write at 512",
        );
        expect_err(
            write_at(queue, buf, 0, 4096, 512, ReqFlags::empty()),
            EIO,
            "write of 512 bytes",
        );
        expect_err(read_at(queue, buf, 0, 512, 4096), EIO, "read at 512");
        expect_err(
            read_at(queue, buf, 0, 0, 4096 + 512),
            EIO,
            "read of 4608 bytes",
        );
        expect_err(discard(queue, 512, 4096), EIO, "discard at 512");
        expect_err(
            write_zeroes(queue, 4096, 512, ReqFlags::NO_UNMAP),
            EIO,
            "write-zeroes of 512 bytes",
        );
        // Nothing of the refused requests landed.
        check_range(
            &mut client,
            &model,
            0,
            64 * 1024,
            "data after refused unaligned requests",
        );
        model
    });
    stop(server);
    check_file(&image.path, &model);
}

#[test]
fn flush_and_fua_writes_succeed() {
    let image = Image::new();
    let server = ServerProcess::start(&["--image", image.arg(), "--create", "64M"]);
    let socket = server.socket.clone();
    let model = within(TEST_DEADLINE, "flush", move || {
        let mut client = Client::connect(&socket, &one_queue());
        assert!(
            client.prop_bool("flush-needed"),
            "default writeback cache (WCE on) not reported"
        );
        let mut model = DiskModel::new(DISK);
        let (queue, _) = client.queue(0);
        expect_ok(flush(queue), "flush with nothing written");
        write_pattern(&mut client, &mut model, 0, 1024 * 1024, 1);
        let (queue, buf) = client.queue(0);
        expect_ok(flush(queue), "flush after a write");

        // libblkio implements FUA on virtio-blk as write + flush.
        buf.copy_in(0, &pattern(MIB, 64 * 1024, 2));
        expect_ok(
            write_at(queue, buf, 0, MIB, 64 * 1024, ReqFlags::FUA),
            "FUA write",
        );
        model.write(MIB, 64 * 1024, 2);

        // Writes and flushes submitted together: every one completes successfully.
        let chunk = 16 * 1024usize;
        let mut expected = Vec::new();
        for index in 0..32usize {
            let offset = 2 * MIB + (index * chunk) as u64;
            let seed = 100 + index as u64;
            buf.copy_in(index * chunk, &pattern(offset, chunk, seed));
            queue.write(
                offset,
                buf.ptr(index * chunk, chunk),
                chunk,
                index,
                ReqFlags::empty(),
            );
            expected.push(index);
            model.write(offset, chunk as u64, seed);
            if index % 8 == 7 {
                queue.flush(1000 + index, ReqFlags::empty());
                expected.push(1000 + index);
            }
        }
        while !expected.is_empty() {
            for done in wait(queue, 1) {
                let position = expected
                    .iter()
                    .position(|&user_data| user_data == done.user_data)
                    .unwrap_or_else(|| panic!("unknown or repeated completion {done:?}"));
                expected.swap_remove(position);
                expect_ok(
                    done.ret,
                    &format!("request {} of the write/flush batch", done.user_data),
                );
            }
        }
        check_range(
            &mut client,
            &model,
            0,
            4 * MIB as usize,
            "data written around flushes",
        );
        model
    });
    stop(server);
    check_file(&image.path, &model);
}

#[test]
fn writethrough_mode_is_reported_and_keeps_data() {
    let image = Image::new();
    let server = ServerProcess::start(&[
        "--image",
        image.arg(),
        "--create",
        "64M",
        "--queues",
        "2",
        "--iothreads",
        "2",
        "--writethrough",
    ]);
    let socket = server.socket.clone();
    let model = within(TEST_DEADLINE, "writethrough workload", move || {
        let mut params = Params::new(512);
        params.random_ops = 500;
        let opts = ClientOptions {
            num_queues: 2,
            buf_size: params.buffer_bytes(2),
            ..ClientOptions::default()
        };
        let mut client = Client::connect(&socket, &opts);
        assert!(
            !client.prop_bool("flush-needed"),
            "--writethrough must report a write-through cache (WCE off)"
        );
        let model = workload::run(&mut client, &params);
        workload::verify_disk(&mut client, &model);
        let (queue, _) = client.queue(1);
        expect_ok(flush(queue), "flush in writethrough mode");
        model
    });
    stop(server);
    check_file(&image.path, &model);
}

#[test]
fn discard_reads_back_zeros_and_frees_file_blocks() {
    let image = Image::new();
    let server = ServerProcess::start(&["--image", image.arg(), "--create", "64M"]);
    let socket = server.socket.clone();
    let image_path = image.path.clone();
    let model = within(TEST_DEADLINE, "discard", move || {
        let mut client = Client::connect(&socket, &one_queue());
        assert_eq!(
            client.prop_u64("max-discard-len"),
            32 * MIB,
            "max_discard_sectors != 65536"
        );
        let alignment = client.prop_i32("discard-alignment");
        assert!(
            alignment >= 512 && alignment % 512 == 0,
            "discard alignment {alignment} must be a non-zero multiple of the block size"
        );
        let mut model = DiskModel::new(DISK);
        for mib in 8..12 {
            write_pattern(&mut client, &mut model, mib * MIB, MIB as usize, mib);
        }
        let (queue, _) = client.queue(0);
        expect_ok(flush(queue), "flush");
        let before = allocated_bytes(&image_path);

        expect_ok(discard(queue, 9 * MIB, 2 * MIB), "discard of 2 MiB");
        model.zero(9 * MIB, 2 * MIB);
        // One sector inside a file-system block: the hole punch zeroes it in place.
        expect_ok(
            discard(queue, 8 * MIB + 3 * SECTOR, SECTOR),
            "discard of one sector",
        );
        model.zero(8 * MIB + 3 * SECTOR, SECTOR);
        check_range(
            &mut client,
            &model,
            8 * MIB,
            4 * MIB as usize,
            "data around discarded ranges",
        );

        let after = allocated_bytes(&image_path);
        assert!(
            before.saturating_sub(after) >= 3 * 2 * MIB / 4,
            "discarding 2 MiB should free about 2 MiB of the image: {before} -> {after} bytes allocated"
        );

        let (queue, _) = client.queue(0);
        expect_err(
            discard(queue, DISK - SECTOR, 2 * SECTOR),
            EIO,
            "discard past the end",
        );
        expect_err(discard(queue, DISK, SECTOR), EIO, "discard at the capacity");
        expect_err(
            discard(queue, 0, 32 * MIB + SECTOR),
            EIO,
            "discard longer than max_discard_sectors",
        );
        expect_ok(
            discard(queue, 32 * MIB, 32 * MIB),
            "discard of exactly max_discard_sectors",
        );
        check_range(
            &mut client,
            &model,
            8 * MIB,
            4 * MIB as usize,
            "data after refused discards",
        );
        model
    });
    stop(server);
    check_file(&image.path, &model);
}

#[test]
fn write_zeroes_with_and_without_unmap_read_back_zeros() {
    let image = Image::new();
    let server = ServerProcess::start(&["--image", image.arg(), "--create", "64M"]);
    let socket = server.socket.clone();
    let model = within(TEST_DEADLINE, "write-zeroes", move || {
        let mut client = Client::connect(&socket, &one_queue());
        assert_eq!(
            client.prop_u64("max-write-zeroes-len"),
            32 * MIB,
            "max_write_zeroes_sectors != 65536"
        );
        let mut model = DiskModel::new(DISK);
        for mib in 16..20 {
            write_pattern(&mut client, &mut model, mib * MIB, MIB as usize, mib);
        }
        let (queue, _) = client.queue(0);
        let cases = [
            (
                16 * MIB + 3 * SECTOR,
                64 * 1024 + SECTOR,
                ReqFlags::NO_UNMAP,
                "without unmap",
            ),
            (17 * MIB, MIB, ReqFlags::empty(), "with unmap"),
            (
                18 * MIB + 7 * SECTOR,
                SECTOR,
                ReqFlags::empty(),
                "one sector with unmap",
            ),
            (
                19 * MIB + SECTOR,
                SECTOR,
                ReqFlags::NO_UNMAP,
                "one sector without unmap",
            ),
        ];
        for (offset, len, flags, what) in cases {
            expect_ok(
                write_zeroes(queue, offset, len, flags),
                &format!("write-zeroes {what}"),
            );
            model.zero(offset, len);
        }
        check_range(
            &mut client,
            &model,
            16 * MIB,
            4 * MIB as usize,
            "data around zeroed ranges",
        );

        let (queue, _) = client.queue(0);
        expect_err(
            write_zeroes(queue, DISK - SECTOR, 2 * SECTOR, ReqFlags::NO_UNMAP),
            EIO,
            "write-zeroes past the end",
        );
        expect_err(
            write_zeroes(queue, 0, 32 * MIB + SECTOR, ReqFlags::empty()),
            EIO,
            "write-zeroes longer than max_write_zeroes_sectors",
        );
        check_range(
            &mut client,
            &model,
            16 * MIB,
            4 * MIB as usize,
            "data after refused write-zeroes",
        );
        model
    });
    stop(server);
    check_file(&image.path, &model);
}

#[test]
fn discard_and_write_zeroes_can_be_switched_off() {
    let server = ServerProcess::start(&["--null", "64M", "--no-discard", "--no-write-zeroes"]);
    let socket = server.socket.clone();
    within(TEST_DEADLINE, "no discard", move || {
        let mut client = Client::connect(&socket, &one_queue());
        assert_eq!(
            client.prop_u64("max-discard-len"),
            0,
            "DISCARD still offered"
        );
        assert_eq!(
            client.prop_u64("max-write-zeroes-len"),
            0,
            "WRITE_ZEROES still offered"
        );
        let (queue, _) = client.queue(0);
        // libblkio answers ENOTSUP itself when the feature was not negotiated.
        expect_err(
            discard(queue, 0, 4096),
            -libc::ENOTSUP,
            "discard without the feature",
        );
        expect_err(
            write_zeroes(queue, 0, 4096, ReqFlags::empty()),
            -libc::ENOTSUP,
            "write-zeroes without the feature",
        );
    });
    stop(server);
}

/// Writes and reads back one request of `len` bytes from a single buffer.
fn large_round_trip(client: &mut Client, offset: u64, len: usize) {
    let mut model = DiskModel::new(client.capacity());
    write_pattern(client, &mut model, offset, len, 0xB16);
    let (queue, buf) = client.queue(0);
    let data = read_vec(queue, buf, offset, len);
    if let Err(report) = model.check(offset, &data, &format!("single {len}-byte read")) {
        panic!("{report}");
    }
}

/// Writes and reads back `segments` segments of one sector each at odd addresses.
fn max_segments_round_trip(client: &mut Client, offset: u64, segments: usize) {
    let (queue, buf) = client.queue(0);
    let sector = SECTOR as usize;
    let pieces = |base: usize| -> Vec<(usize, usize)> {
        (0..segments)
            .map(|index| (base + 1 + index * (sector + 5), sector))
            .collect()
    };
    let data = pattern(offset, segments * sector, 0x5E6);
    vectored_round_trip(
        queue,
        buf,
        offset,
        &data,
        &pieces(0),
        &pieces(buf.len() / 2),
    );
}

#[test]
fn capacity_and_limits_match_default_config() {
    let image = Image::new();
    let server = ServerProcess::start(&["--image", image.arg(), "--create", "64M"]);
    let socket = server.socket.clone();
    within(TEST_DEADLINE, "limits", move || {
        let opts = ClientOptions {
            buf_size: 16 * MIB as usize,
            ..ClientOptions::default()
        };
        let mut client = Client::connect(&socket, &opts);
        assert_eq!(client.capacity(), DISK, "capacity");
        assert_eq!(
            client.prop_i32("max-queues"),
            1,
            "max-queues (default --queues 1)"
        );
        assert_eq!(
            client.prop_i32("max-segments"),
            256 - 2,
            "seg_max = queue size - 2"
        );
        assert_eq!(client.prop_i32("request-alignment"), 512, "blk_size");
        assert!(
            client.prop_bool("flush-needed"),
            "writeback cache by default"
        );
        assert!(!client.prop_bool("read-only"));
        let max_transfer = client.prop_i32("max-transfer");
        eprintln!(
            "limits: max-transfer {max_transfer}, max-segment-len {}, optimal-io-size {}",
            client.prop_i32("max-segment-len"),
            client.prop_i32("optimal-io-size")
        );
        // No size_max means no per-request byte limit beyond seg_max segments: a large request
        // from one buffer must be served. With size_max, the advertised maximum must be.
        let large = if max_transfer == 0 {
            4 * MIB as usize
        } else {
            max_transfer as usize
        };
        large_round_trip(&mut client, 8 * MIB, large.min(8 * MIB as usize));
        max_segments_round_trip(&mut client, 20 * MIB, 254);
    });
    stop(server);
}

#[test]
fn null_backend_limits_follow_queue_size() {
    let server = ServerProcess::start(&["--null", "1G", "--queue-size", "128", "--queues", "2"]);
    let socket = server.socket.clone();
    within(TEST_DEADLINE, "null limits", move || {
        let opts = ClientOptions {
            num_queues: 2,
            queue_size: Some(128),
            ..ClientOptions::default()
        };
        let mut client = Client::connect(&socket, &opts);
        assert_eq!(
            client.capacity(),
            1024 * MIB,
            "capacity differs from --null 1G"
        );
        assert_eq!(client.prop_i32("max-queues"), 2);
        assert_eq!(
            client.prop_i32("max-segments"),
            128 - 2,
            "seg_max = queue size - 2"
        );
        // The null backend keeps no data, so only the status is checked.
        let (queue, buf) = client.queue(1);
        let pieces: Vec<(usize, usize)> = (0..126).map(|index| (1 + index * 600, 512)).collect();
        let iovecs = buf.iovecs(&pieces);
        queue.readv(MIB, iovecs.as_ptr(), 126, 1, ReqFlags::empty());
        expect_ok(
            wait_one(queue, 1),
            "readv with seg_max segments on the null backend",
        );
        expect_err(
            read_at(queue, buf, 0, 1024 * MIB - 512, 1024),
            EIO,
            "null read past the end",
        );
    });
    stop(server);
}

#[test]
fn reads_and_writes_past_the_end_fail() {
    let image = Image::new();
    let server = ServerProcess::start(&["--image", image.arg(), "--create", "64M"]);
    let socket = server.socket.clone();
    let model = within(TEST_DEADLINE, "past the end", move || {
        let mut client = Client::connect(&socket, &one_queue());
        let mut model = DiskModel::new(DISK);
        write_pattern(&mut client, &mut model, DISK - 4096, 4096, 9);
        check_range(&mut client, &model, DISK - 4096, 4096, "last 4 KiB");
        let (queue, buf) = client.queue(0);
        buf.copy_in(0, &pattern(DISK - SECTOR, 2 * SECTOR as usize, 10));
        let cases: [(u64, usize, &str); 4] = [
            (DISK - SECTOR, 2 * SECTOR as usize, "crossing the end"),
            (DISK, SECTOR as usize, "at the capacity"),
            (DISK + 1024 * MIB, SECTOR as usize, "far past the end"),
            (1 << 60, SECTOR as usize, "at sector 2^51"),
        ];
        for (offset, len, what) in cases {
            expect_err(
                read_at(queue, buf, 0, offset, len),
                EIO,
                &format!("read {what}"),
            );
            expect_err(
                write_at(queue, buf, 0, offset, len, ReqFlags::empty()),
                EIO,
                &format!("write {what}"),
            );
        }
        // A refused write crossing the end must not have written its in-range part.
        check_range(
            &mut client,
            &model,
            DISK - 4096,
            4096,
            "last 4 KiB after refused writes",
        );
        model
    });
    stop(server);
    check_file(&image.path, &model);
}

#[test]
fn readonly_export_serves_reads_and_refuses_writes() {
    let image = Image::new();
    let mut model = DiskModel::new(DISK);
    let mut content = vec![0u8; DISK as usize];
    for (offset, seed) in [(0, 21u64), (DISK - MIB, 22)] {
        content[offset as usize..(offset + MIB) as usize].copy_from_slice(&pattern(
            offset,
            MIB as usize,
            seed,
        ));
        model.write(offset, MIB, seed);
    }
    std::fs::write(&image.path, &content).expect("write image");
    drop(content);

    let server = ServerProcess::start(&["--image", image.arg(), "--readonly"]);
    let socket = server.socket.clone();
    let expected = model.clone();
    within(TEST_DEADLINE, "read-only", move || {
        // A client that wants to write is refused at start: the server offers VIRTIO_BLK_F_RO.
        let writable = connect(&socket, false);
        match Client::start(writable, &one_queue()) {
            Ok(_) => panic!("a writable client started on a --readonly export (RO not offered)"),
            Err(e) => assert_eq!(e.errno(), blkio::Errno::ROFS, "unexpected start error: {e}"),
        }

        let opts = ClientOptions {
            read_only: true,
            ..ClientOptions::default()
        };
        let mut client = Client::connect(&socket, &opts);
        assert_eq!(client.capacity(), DISK);
        check_range(
            &mut client,
            &expected,
            0,
            2 * MIB as usize,
            "start of a read-only image",
        );
        check_range(
            &mut client,
            &expected,
            DISK - 2 * MIB,
            2 * MIB as usize,
            "end of a read-only image",
        );
        // With RO negotiated libblkio itself fails these (EBADF) before they reach the server;
        // the server-side refusal is covered where raw requests can be built.
        let (queue, buf) = client.queue(0);
        assert_ne!(
            write_at(queue, buf, 0, 0, 4096, ReqFlags::empty()),
            0,
            "write on read-only"
        );
        assert_ne!(discard(queue, 0, 4096), 0, "discard on read-only");
        assert_ne!(
            write_zeroes(queue, 0, 4096, ReqFlags::empty()),
            0,
            "write-zeroes on read-only"
        );
    });
    stop(server);
    check_file(&image.path, &model);
}

#[test]
fn null_backend_serves_reads_and_writes_at_depth_32() {
    let server = ServerProcess::start(&["--null", "1G", "--queues", "2", "--iothreads", "2"]);
    let socket = server.socket.clone();
    within(TEST_DEADLINE, "null backend", move || {
        let opts = ClientOptions {
            num_queues: 2,
            buf_size: 2 * 32 * 128 * 1024,
            ..ClientOptions::default()
        };
        let mut client = Client::connect(&socket, &opts);
        let capacity = client.capacity();
        assert_eq!(capacity, 1024 * MIB, "capacity differs from --null 1G");
        let buf = &client.buf;
        std::thread::scope(|scope| {
            for (index, queue) in client.queues.iter_mut().enumerate() {
                scope.spawn(move || {
                    let depth = 32;
                    let slot_bytes = 128 * 1024usize;
                    let base = index * depth * slot_bytes;
                    let mut rng = Rng::new(index as u64 + 77);
                    let mut in_flight = vec![false; depth];
                    let (mut submitted, mut completed, mut deepest) = (0, 0, 0);
                    let total = 2000;
                    while completed < total {
                        for (slot, busy) in in_flight.iter_mut().enumerate() {
                            if !*busy && submitted < total {
                                let len = (1 + rng.below(32) as usize) * 4096;
                                let offset = rng.below((capacity - len as u64) / 4096) * 4096;
                                let ptr = buf.ptr(base + slot * slot_bytes, len);
                                if rng.below(2) == 0 {
                                    queue.write(offset, ptr, len, slot, ReqFlags::empty());
                                } else {
                                    queue.read(offset, ptr, len, slot, ReqFlags::empty());
                                }
                                *busy = true;
                                submitted += 1;
                            }
                        }
                        deepest = deepest.max(in_flight.iter().filter(|busy| **busy).count());
                        for done in wait(queue, 1) {
                            expect_ok(done.ret, &format!("null request on queue {index}"));
                            assert!(in_flight[done.user_data], "completion for an idle slot");
                            in_flight[done.user_data] = false;
                            completed += 1;
                        }
                    }
                    assert_eq!(deepest, depth, "queue {index} never reached depth {depth}");
                });
            }
        });
        let (queue, _) = client.queue(0);
        expect_ok(flush(queue), "flush on the null backend");
        expect_ok(discard(queue, 0, MIB), "discard on the null backend");
        expect_ok(
            write_zeroes(queue, MIB, MIB, ReqFlags::empty()),
            "write-zeroes on the null backend",
        );
    });
    stop(server);
}

/// One client session: connect with `num_queues`, run `work`, disconnect (drop).
fn session<T>(socket: &Path, num_queues: i32, work: impl FnOnce(&mut Client) -> T) -> T {
    let opts = ClientOptions {
        num_queues,
        ..ClientOptions::default()
    };
    let mut client = Client::connect(socket, &opts);
    work(&mut client)
}

#[test]
fn reconnect_to_same_server_keeps_data() {
    let image = Image::new();
    let mut server = ServerProcess::start(&["--image", image.arg(), "--create", "64M"]);
    let socket = server.socket.clone();
    let model = within(TEST_DEADLINE, "reconnect", move || {
        let mut model = DiskModel::new(DISK);
        session(&socket, 1, |client| {
            write_pattern(client, &mut model, 0, MIB as usize, 31);
            write_pattern(client, &mut model, 32 * MIB, MIB as usize, 32);
            expect_ok(flush(&mut client.queues[0]), "flush before disconnecting");
        });
        session(&socket, 1, |client| {
            check_range(
                client,
                &model,
                0,
                MIB as usize,
                "first client's data, second client",
            );
            check_range(
                client,
                &model,
                32 * MIB,
                MIB as usize,
                "first client's data, second client",
            );
            // No flush: the next client of the same server must still see it.
            write_pattern(client, &mut model, 2 * MIB, MIB as usize, 33);
        });
        session(&socket, 1, |client| {
            for offset in [0, 2 * MIB, 32 * MIB] {
                check_range(
                    client,
                    &model,
                    offset,
                    MIB as usize,
                    "data seen by the third client",
                );
            }
        });
        model
    });
    assert!(
        server.child.try_wait().expect("try_wait").is_none(),
        "uringblk exited after its clients disconnected"
    );
    stop(server);
    check_file(&image.path, &model);
}

/// A frontend that goes away with requests in flight (a VM killed mid-I/O) must not take the
/// server down: the next client is served normally, the cut-off writes left each sector either
/// old or new, and SIGTERM still exits cleanly.
#[test]
fn disconnect_with_requests_in_flight_then_reconnect() {
    let image = Image::new();
    let mut server = ServerProcess::start(&[
        "--image",
        image.arg(),
        "--create",
        "64M",
        "--queues",
        "2",
        "--iothreads",
        "2",
    ]);
    let socket = server.socket.clone();
    let chunk = 64 * 1024usize;
    let cut_off = 2 * 32 * chunk;
    let seeds = [60, 61, 62];
    let model = within(TEST_DEADLINE, "disconnect mid-I/O", move || {
        for seed in seeds {
            session(&socket, 2, |client| {
                for index in 0..2 {
                    let (queue, buf) = client.queue(index);
                    submit_pattern_writes(queue, buf, index * 32 * chunk, chunk, 32, seed);
                    // Submits them; whatever completes by now is not waited for.
                    for done in wait(queue, 0) {
                        expect_ok(done.ret, "write completed before the disconnect");
                    }
                }
            });
        }
        let mut model = DiskModel::new(DISK);
        session(&socket, 2, |client| {
            for index in 0..2 {
                let offset = (8 + index as u64) * MIB;
                let (queue, buf) = client.queue(index);
                write_slice(queue, buf, offset, &pattern(offset, MIB as usize, 70));
                model.write(offset, MIB, 70);
                let data = read_vec(queue, buf, offset, MIB as usize);
                if let Err(report) = model.check(offset, &data, "write after a client vanished") {
                    panic!("{report}");
                }
                let data = read_vec(queue, buf, 0, cut_off);
                check_old_or_new(&data, 0, &seeds, "writes cut off by a disconnect");
            }
        });
        model
    });
    assert!(
        server.child.try_wait().expect("try_wait").is_none(),
        "uringblk exited after a frontend vanished mid-I/O"
    );
    stop(server);
    let file = std::fs::read(&image.path).expect("read image");
    check_old_or_new(&file[..cut_off], 0, &seeds, "image file, cut-off writes");
    let rest = &file[cut_off..];
    if let Err(report) = model.check(cut_off as u64, rest, "image file after the cut-off range") {
        panic!("{report}");
    }
}

#[test]
fn clients_with_one_then_two_queues_in_turn() {
    let image = Image::new();
    let server = ServerProcess::start(&[
        "--image",
        image.arg(),
        "--create",
        "64M",
        "--queues",
        "2",
        "--iothreads",
        "2",
    ]);
    let socket = server.socket.clone();
    let model = within(TEST_DEADLINE, "clients in turn", move || {
        let mut model = DiskModel::new(DISK);
        let chunk = 64 * 1024usize;
        session(&socket, 1, |client| {
            assert_eq!(client.prop_i32("max-queues"), 2);
            // 64 writes of 64 KiB in flight together on the only queue.
            let (queue, buf) = client.queue(0);
            for index in 0..64 {
                let offset = (index * chunk) as u64;
                buf.copy_in(index * chunk, &pattern(offset, chunk, 40 + index as u64));
                queue.write(
                    offset,
                    buf.ptr(index * chunk, chunk),
                    chunk,
                    index,
                    ReqFlags::empty(),
                );
                model.write(offset, chunk as u64, 40 + index as u64);
            }
            let mut pending = 64;
            while pending > 0 {
                for done in wait(queue, 1) {
                    expect_ok(
                        done.ret,
                        &format!("write {} of the first client", done.user_data),
                    );
                    pending -= 1;
                }
            }
        });
        session(&socket, 2, |client| {
            // Each queue reads half of what the first client wrote and writes a new range.
            for index in 0..2 {
                let offset = index as u64 * 2 * MIB;
                let (queue, buf) = client.queue(index);
                let data = read_vec(queue, buf, offset, 2 * MIB as usize);
                if let Err(report) = model.check(
                    offset,
                    &data,
                    &format!("queue {index} of the second client"),
                ) {
                    panic!("{report}");
                }
                let target = (4 + 2 * index as u64) * MIB;
                write_slice(
                    queue,
                    buf,
                    target,
                    &pattern(target, 2 * MIB as usize, 50 + index as u64),
                );
                model.write(target, 2 * MIB, 50 + index as u64);
            }
        });
        session(&socket, 1, |client| {
            check_range(
                client,
                &model,
                0,
                8 * MIB as usize,
                "third client (1 queue) reads all",
            );
        });
        // More queues than --queues: refused when starting.
        let blkio = connect(&socket, false);
        let three = ClientOptions {
            num_queues: 3,
            ..ClientOptions::default()
        };
        assert!(
            Client::start(blkio, &three).is_err(),
            "3 queues started on a 2-queue server"
        );
        model
    });
    stop(server);
    check_file(&image.path, &model);
}
