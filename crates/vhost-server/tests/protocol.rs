//! The server as a vhost-user frontend sees it: `serve` on a real unix socket, driven by the
//! vhost crate's own frontend. Feature negotiation and the write cache mode, the reset of
//! that mode for the next driver, and what a refused request gets (an error reply, and the
//! connection goes on).

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use blk_proto::{DeviceConfig, WCE_OFFSET};
use engine::Storage;
use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserHeaderFlag};
use vhost::vhost_user::{Frontend, VhostUserFrontend, VhostUserProtocolFeatures};
use vhost::VhostBackend;
use vhost_server::{ServerConfig, VhostUserBlk};
use virtio_bindings::virtio_blk::{VIRTIO_BLK_F_CONFIG_WCE, VIRTIO_BLK_F_FLUSH};

const FLUSH: u64 = 1 << VIRTIO_BLK_F_FLUSH;
const CONFIG_WCE: u64 = 1 << VIRTIO_BLK_F_CONFIG_WCE;
const QUEUES: u16 = 2;

/// A server on a fresh socket, configured writeback or writethrough; it serves frontends one
/// after another until the test process ends.
fn server(writeback: bool) -> (VhostUserBlk, PathBuf, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("temp dir");
    let socket = dir.path().join("blk.sock");
    let backend = VhostUserBlk::new(
        ServerConfig {
            writeback,
            fixed_buffers: false,
            ..ServerConfig::new(DeviceConfig::new(1 << 20, 512, QUEUES, 64), 64)
        },
        Arc::new(Storage::null(1 << 20)),
    )
    .expect("backend");
    let (tx, rx) = std::sync::mpsc::channel();
    let (b, s) = (backend.clone(), socket.clone());
    std::thread::spawn(move || {
        let stop = Arc::new(AtomicBool::new(false));
        let _ = vhost_server::serve(&b, &s, &stop, || {
            let _ = tx.send(());
        });
    });
    rx.recv_timeout(Duration::from_secs(10))
        .expect("the server listens");
    (backend, socket, dir)
}

/// A frontend that has claimed the device, acked `features` (of those offered) and the
/// protocol features a block frontend uses, with replies (REPLY_ACK) on every request.
fn frontend(socket: &Path, features: impl Fn(u64) -> u64) -> Frontend {
    // More queues than the server has, so that the frontend lets us name one past the end.
    let mut f = Frontend::connect(socket, 8).expect("connect");
    f.set_owner().expect("SET_OWNER");
    let offered = f.get_features().expect("GET_FEATURES");
    let protocol = f.get_protocol_features().expect("GET_PROTOCOL_FEATURES");
    let wanted = VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK;
    f.set_protocol_features(protocol & wanted)
        .expect("SET_PROTOCOL_FEATURES");
    f.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    f.set_features(features(offered)).expect("SET_FEATURES");
    f
}

fn wce(f: &mut Frontend) -> u8 {
    let (_, payload) = f
        .get_config(WCE_OFFSET as u32, 1, VhostUserConfigFlags::WRITABLE, &[0])
        .expect("GET_CONFIG");
    payload[0]
}

fn set_wce(f: &mut Frontend, on: bool) {
    f.set_config(
        WCE_OFFSET as u32,
        VhostUserConfigFlags::WRITABLE,
        &[u8::from(on)],
    )
    .expect("SET_CONFIG");
}

/// Waits until `cond` holds (the server handles a disconnect on its own thread).
fn eventually(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn a_driver_without_flush_is_served_writethrough() {
    let (backend, socket, _dir) = server(true);
    let mut f = frontend(&socket, |offered| offered & !FLUSH);
    assert_eq!(wce(&mut f), 0, "config space must say writethrough");
    assert!(
        !backend.write_cache_enabled(),
        "writes must be durable: the driver cannot flush"
    );
    // It cannot switch the cache on either.
    set_wce(&mut f, true);
    assert_eq!(wce(&mut f), 0);
    assert!(!backend.write_cache_enabled());
}

#[test]
fn a_driver_with_flush_but_not_config_wce_keeps_the_configured_mode() {
    for configured in [true, false] {
        let (backend, socket, _dir) = server(configured);
        let mut f = frontend(&socket, |offered| offered & !CONFIG_WCE);
        assert_eq!(wce(&mut f), u8::from(configured));
        set_wce(&mut f, !configured);
        assert_eq!(
            wce(&mut f),
            u8::from(configured),
            "the driver cannot change it"
        );
        assert_eq!(backend.write_cache_enabled(), configured);
    }
}

#[test]
fn a_driver_with_flush_and_config_wce_switches_the_cache() {
    let (backend, socket, _dir) = server(true);
    let mut f = frontend(&socket, |offered| offered);
    assert_eq!(wce(&mut f), 1);
    set_wce(&mut f, false);
    assert_eq!(wce(&mut f), 0);
    assert!(!backend.write_cache_enabled());
    set_wce(&mut f, true);
    assert_eq!(wce(&mut f), 1);
    assert!(backend.write_cache_enabled());
}

#[test]
fn the_next_driver_starts_from_the_configured_mode() {
    for configured in [true, false] {
        let (backend, socket, _dir) = server(configured);
        let mut first = frontend(&socket, |offered| offered);
        set_wce(&mut first, !configured);
        assert_eq!(wce(&mut first), u8::from(!configured));
        drop(first);
        // The reconnecting frontend (a rebooted VM, a new one) does not inherit it.
        let mut second = frontend(&socket, |offered| offered);
        assert_eq!(
            wce(&mut second),
            u8::from(configured),
            "the previous driver's WCE setting was relayed"
        );
        assert_eq!(backend.write_cache_enabled(), configured);
    }
}

/// What a message naming a queue past the configured count gets: an error reply
/// (REPLY_ACK with a non-zero value), and the connection goes on: the next request on the
/// same connection is served, and so is a valid index.
#[test]
fn a_queue_index_out_of_range_gets_an_error_reply_and_the_connection_goes_on() {
    let (backend, socket, _dir) = server(true);
    let mut f = frontend(&socket, |offered| offered);
    let bad = usize::from(QUEUES) + 3;
    assert!(
        f.set_vring_num(bad, 64).is_err(),
        "SET_VRING_NUM {bad} must be refused"
    );
    // The refusal was a reply, not a hang, and the same connection is still served.
    let offered = f
        .get_features()
        .expect("GET_FEATURES on the same connection after the refused request");
    assert_ne!(offered, 0);
    f.set_vring_num(usize::from(QUEUES) - 1, 64)
        .expect("SET_VRING_NUM of the last queue, same connection");
    assert!(
        f.set_vring_num(0, 3).is_err(),
        "a queue size that is not a power of two must be refused"
    );
    assert_eq!(wce(&mut f), 1, "GET_CONFIG, same connection");
    assert_eq!(
        backend.frontend_info().connections,
        1,
        "still the first connection"
    );
    eventually("the server still answers", || backend.write_cache_enabled());
}

/// One raw request: header (request, flags = version 1 | `flags`, size) and body.
fn send_raw(s: &mut std::os::unix::net::UnixStream, code: u32, flags: u32, body: &[u8]) {
    use std::io::Write;
    let mut msg = Vec::new();
    msg.extend_from_slice(&code.to_le_bytes());
    msg.extend_from_slice(&(1 | flags).to_le_bytes());
    msg.extend_from_slice(&(body.len() as u32).to_le_bytes());
    msg.extend_from_slice(body);
    s.write_all(&msg).expect("send a request");
}

/// The reply to `code`: its u64 body.
fn read_u64_reply(s: &mut std::os::unix::net::UnixStream, code: u32) -> u64 {
    use std::io::Read;
    let mut reply = [0u8; 20];
    s.read_exact(&mut reply)
        .expect("a reply, not a hang or EOF");
    assert_eq!(u32::from_le_bytes(reply[0..4].try_into().unwrap()), code);
    assert_eq!(
        u32::from_le_bytes(reply[4..8].try_into().unwrap()) & 0x4,
        0x4,
        "REPLY"
    );
    assert_eq!(u32::from_le_bytes(reply[8..12].try_into().unwrap()), 8);
    u64::from_le_bytes(reply[12..20].try_into().unwrap())
}

/// Requests the vhost crate refuses on its own (an unknown request, one whose protocol
/// feature was not negotiated) still get the REPLY_ACK asked for, with a failure, and the
/// connection goes on: the body left on the socket is skipped, the next request is served.
#[test]
fn requests_the_vhost_crate_refuses_itself_get_an_error_ack_and_the_connection_goes_on() {
    const NEED_REPLY: u32 = 0x8;
    let (_backend, socket, _dir) = server(true);
    let mut s = std::os::unix::net::UnixStream::connect(&socket).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    send_raw(&mut s, 1, 0, &[]); // GET_FEATURES
    let features = read_u64_reply(&mut s, 1);
    send_raw(&mut s, 15, 0, &[]); // GET_PROTOCOL_FEATURES
    let protocol = read_u64_reply(&mut s, 15);
    let reply_ack = VhostUserProtocolFeatures::REPLY_ACK.bits();
    assert_ne!(protocol & reply_ack, 0);
    send_raw(&mut s, 16, NEED_REPLY, &reply_ack.to_le_bytes()); // SET_PROTOCOL_FEATURES
    assert_eq!(read_u64_reply(&mut s, 16), 0, "accepted");
    // An unknown request with a body: refused, body skipped.
    send_raw(&mut s, 99, NEED_REPLY, &[0xee; 24]);
    assert_ne!(
        read_u64_reply(&mut s, 99),
        0,
        "an unknown request is a failure"
    );
    // SET_CONFIG without CONFIG negotiated (offset 0, size 1, flags 0, one byte).
    let mut config = Vec::new();
    config.extend_from_slice(&0u32.to_le_bytes());
    config.extend_from_slice(&1u32.to_le_bytes());
    config.extend_from_slice(&0u32.to_le_bytes());
    config.push(1);
    send_raw(&mut s, 25, NEED_REPLY, &config);
    assert_ne!(read_u64_reply(&mut s, 25), 0, "CONFIG was not negotiated");
    // The same connection is still served.
    send_raw(&mut s, 1, 0, &[]);
    assert_eq!(read_u64_reply(&mut s, 1), features);
}

fn memfd(len: u64) -> std::fs::File {
    use std::os::fd::FromRawFd;
    // SAFETY: a NUL-terminated literal name; the call only creates a descriptor.
    let fd = unsafe { libc::memfd_create(c"guest".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create");
    // SAFETY: `fd` was just created and nothing else owns it.
    let file = unsafe { std::fs::File::from_raw_fd(fd) };
    file.set_len(len).expect("size the memfd");
    file
}

fn region(gpa: u64, len: u64, user: u64, file: &std::fs::File) -> vhost::VhostUserMemoryRegionInfo {
    use std::os::fd::AsRawFd;
    vhost::VhostUserMemoryRegionInfo {
        guest_phys_addr: gpa,
        memory_size: len,
        userspace_addr: user,
        mmap_offset: 0,
        mmap_handle: file.as_raw_fd(),
    }
}

/// A memory table is checked before it is mapped: a region past the end of its file (which
/// would SIGBUS the server on first touch) or overlapping another is refused with an error
/// reply, the table stays as it was, and the connection goes on.
#[test]
fn bad_memory_tables_are_refused_and_the_connection_goes_on() {
    const MIB: u64 = 1 << 20;
    let (_backend, socket, _dir) = server(true);
    let mut f = frontend(&socket, |offered| offered);
    let short = memfd(MIB);
    assert!(
        f.set_mem_table(&[region(0, 2 * MIB, 0x7000_0000, &short)])
            .is_err(),
        "a region past the end of its file"
    );
    let (a, b) = (memfd(2 * MIB), memfd(2 * MIB));
    assert!(
        f.set_mem_table(&[
            region(0, 2 * MIB, 0x7000_0000, &a),
            region(MIB, 2 * MIB, 0x8000_0000, &b),
        ])
        .is_err(),
        "regions overlapping in guest addresses"
    );
    assert!(
        f.set_mem_table(&[
            region(0, 2 * MIB, 0x7000_0000, &a),
            region(4 * MIB, 2 * MIB, 0x7000_1000, &b),
        ])
        .is_err(),
        "regions overlapping in frontend addresses"
    );
    f.set_mem_table(&[
        region(0, 2 * MIB, 0x7000_0000, &a),
        region(4 * MIB, 2 * MIB, 0x8000_0000, &b),
    ])
    .expect("a good table, same connection");
    assert_eq!(wce(&mut f), 1, "still served");
}
