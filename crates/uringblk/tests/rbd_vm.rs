//! A real Linux guest on an RBD export: QEMU boots the measurement guest (scripts/build-guest.sh)
//! with `vhost-user-blk-pci` on `uringblk --rbd`, served from this binary's single-node Ceph
//! cluster (scripts/ceph-cluster.sh). fio writes with 4 jobs at QD 16 on 2 queues and verifies
//! (crc32c) inside the guest; a second VM on a new server process verifies the same data again.
//! Without QEMU or Ceph the test prints SKIPPED (and fails under CI=true).

mod ceph_support;
mod common;

use ceph_support::cluster;
use common::ServerProcess;
use guestvm::testing::{guest_or_skip, vm_lock, write_verify_job};
use guestvm::{fio_io_bytes, fio_job_count, VmConfig};

const MIB: u64 = 1 << 20;

#[test]
fn rbd_guest_fio_write_verify_on_two_queues_then_again_after_a_restart() {
    const TEST: &str = "rbd_guest_fio_write_verify_on_two_queues_then_again_after_a_restart";
    let _slot = vm_lock();
    let Some(guest_dir) = guest_or_skip(TEST, &[]) else {
        return;
    };
    let Some(c) = cluster(TEST) else {
        return;
    };
    let image = c.image("256M");
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
    let (jobs, per_job_mib) = (4u32, 8u64);
    let bytes = u64::from(jobs) * per_job_mib * MIB;
    let job = write_verify_job(jobs, per_job_mib);

    let server = ServerProcess::start(&args);
    let config = VmConfig::new(&server.socket, &guest_dir).queues(2).vcpus(2);
    let run = guestvm::run(&config.clone().fio_job(&job)).unwrap_or_else(|e| panic!("{TEST}: {e}"));
    eprintln!(
        "{TEST}: accel={} elapsed={:.1}s",
        run.accel,
        run.elapsed.as_secs_f64()
    );
    let fio = run.fio().expect("fio result");
    assert_eq!(fio_job_count(fio), jobs as usize, "fio jobs");
    assert_eq!(fio_io_bytes(fio, "write"), bytes, "bytes written");
    assert_eq!(
        fio_io_bytes(fio, "read"),
        bytes,
        "bytes read back and verified"
    );
    assert_eq!(
        run.fact_u64("hw_queues").unwrap(),
        2,
        "the guest uses both queues"
    );
    let status = server.stop();
    assert!(status.success(), "server exit status {status}");

    // A new server process on the same image: the data is in the cluster, not in the server.
    let server = ServerProcess::start(&args);
    let config = VmConfig::new(&server.socket, &guest_dir).queues(2).vcpus(2);
    let again = guestvm::run(&config.fio_job(&job).fio_arg("--verify_only"))
        .unwrap_or_else(|e| panic!("{TEST}: {e}"));
    let fio = again.fio().expect("fio result of the second VM");
    assert_eq!(
        fio_io_bytes(fio, "read"),
        bytes,
        "bytes verified by the second VM"
    );
    let status = server.stop();
    assert!(status.success(), "server exit status {status}");
}
