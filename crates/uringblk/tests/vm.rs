//! A real Linux guest against the real binary: QEMU boots the measurement guest (Debian kernel,
//! busybox, fio, blkdiscard; scripts/build-guest.sh) with `vhost-user-blk-pci` on uringblk's
//! socket, and what the guest kernel sees and does is checked from inside:
//! - fio write + crc32c verify with several jobs at QD 16, on 1 and on 2 queues, then the same
//!   data verified again by a second VM (reconnect to the same server) and by a VM on a new
//!   server process (restart);
//! - the server killed (-9) twice and stopped (SIGTERM) once under fio write+verify on 2
//!   queues with small reads beside it, restarted each time on the same socket and image:
//!   QEMU reconnects (chardev reconnect=1), the requests in flight are resubmitted and the
//!   guest sees no error;
//! - a guest reboot (a machine reset inside one QEMU: same connection, device reset and set up
//!   again) gets a working disk with the data still there;
//! - the guest's sysfs view of the disk matches the flags the server was started with;
//! - blkdiscard and blkdiscard -z succeed and the zeroed ranges read back as zeros;
//! - a read-only export refuses writes.
//!
//! Under TCG (no usable KVM) a guest boots in about 3 s; the runs here move 32 MiB at most so
//! the file stays within a couple of minutes. Without QEMU and friends the tests print
//! "SKIPPED: ..." and pass, except in CI (CI=true), where that is an install failure.

mod common;

use std::path::{Path, PathBuf};
use std::sync::MutexGuard;

use common::{Image, ServerProcess};
use guestvm::testing::{guest_or_skip, vm_lock, write_verify_job};
use guestvm::{fio_io_bytes, fio_job_count, GuestRun, VmConfig};

const MIB: u64 = 1 << 20;

/// A VM slot (one VM at a time) and the built guest.
struct Vm {
    _slot: MutexGuard<'static, ()>,
    guest_dir: PathBuf,
}

fn vm(test_name: &str) -> Option<Vm> {
    let slot = vm_lock();
    let guest_dir = guest_or_skip(test_name, &[])?;
    Some(Vm {
        _slot: slot,
        guest_dir,
    })
}

impl Vm {
    fn config(&self, server: &ServerProcess) -> VmConfig {
        VmConfig::new(&server.socket, &self.guest_dir)
    }
}

/// Runs the VM and prints the accelerator and timing with the result.
fn boot(test: &str, config: &VmConfig) -> GuestRun {
    match guestvm::run(config) {
        Ok(run) => {
            eprintln!(
                "{test}: accel={} elapsed={:.1}s vcpus={} queues={}",
                run.accel,
                run.elapsed.as_secs_f64(),
                config.vcpus,
                config.queues
            );
            run
        }
        Err(e) => panic!("{test}: {e}"),
    }
}

fn assert_fio_wrote_and_verified(test: &str, run: &GuestRun, jobs: u32, bytes: u64) {
    let fio = run.fio().expect("fio result");
    assert_eq!(fio_job_count(fio), jobs as usize, "{test}: fio jobs");
    assert_eq!(fio_io_bytes(fio, "write"), bytes, "{test}: bytes written");
    assert_eq!(
        fio_io_bytes(fio, "read"),
        bytes,
        "{test}: bytes read back and verified"
    );
}

/// With --verify_only fio counts the writes it skips as done, so only the reads tell.
fn assert_fio_verified_only(test: &str, run: &GuestRun, bytes: u64) {
    let fio = run.fio().expect("fio result");
    assert_eq!(fio_io_bytes(fio, "read"), bytes, "{test}: bytes verified");
}

/// A guest command that prints the interrupts each virtqueue of the disk has raised so far
/// (summed over CPUs), one "virtioN-req.Q=count" line per queue.
const INTERRUPTS_PER_QUEUE: &str = "awk '/virtio[0-9]+-req\\./ {
  n = 0
  for (i = 2; i <= NF && $i ~ /^[0-9]+$/; i++) n += $i
  print $NF \"=\" n
}' /proc/interrupts";

fn interrupts_per_queue(run: &GuestRun, command: &str) -> Vec<(String, u64)> {
    let out = run.command(command).expect("interrupt count command");
    assert_eq!(out.exit_code, 0, "{command}: {}", out.output);
    out.output
        .lines()
        .map(|line| {
            let (queue, count) = line
                .split_once('=')
                .unwrap_or_else(|| panic!("{command}: bad line {line:?}"));
            let count = count
                .trim()
                .parse()
                .unwrap_or_else(|_| panic!("{command}: bad count in {line:?}"));
            (queue.to_string(), count)
        })
        .collect()
}

#[test]
fn one_queue_data_survives_reconnect_and_restart() {
    const TEST: &str = "one_queue_data_survives_reconnect_and_restart";
    let Some(vm) = vm(TEST) else { return };
    let image = Image::new();
    let (jobs, per_job_mib) = (4, 8);
    let bytes = u64::from(jobs) * per_job_mib * MIB;
    let job = write_verify_job(jobs, per_job_mib);

    let server = ServerProcess::start(&["--image", image.arg(), "--create", "256M"]);
    let first = boot(TEST, &vm.config(&server).fio_job(&job));
    assert_fio_wrote_and_verified(TEST, &first, jobs, bytes);
    assert_eq!(first.fact_u64("hw_queues").unwrap(), 1);

    // The first VM shut down; a second one connects to the same server and gets a working
    // disk with the data still on it.
    let second = boot(
        TEST,
        &vm.config(&server).fio_job(&job).fio_arg("--verify_only"),
    );
    assert_fio_verified_only(TEST, &second, bytes);
    let status = server.stop();
    assert!(status.success(), "{TEST}: server exit status {status}");

    // A new server process on the same image serves the same data.
    let server = ServerProcess::start(&["--image", image.arg()]);
    let third = boot(
        TEST,
        &vm.config(&server).fio_job(&job).fio_arg("--verify_only"),
    );
    assert_fio_verified_only(TEST, &third, bytes);
}

#[test]
fn two_queues_data_survives_reconnect() {
    const TEST: &str = "two_queues_data_survives_reconnect";
    let Some(vm) = vm(TEST) else { return };
    let image = Image::new();
    let (jobs, per_job_mib) = (4, 8);
    let bytes = u64::from(jobs) * per_job_mib * MIB;
    let job = write_verify_job(jobs, per_job_mib);

    let server = ServerProcess::start(&[
        "--image",
        image.arg(),
        "--create",
        "256M",
        "--queues",
        "2",
        "--iothreads",
        "2",
    ]);
    // The guest uses min(queues, vCPUs) queues, so give it a vCPU per queue.
    let config = vm.config(&server).queues(2).vcpus(2);
    let first = boot(
        TEST,
        &config
            .clone()
            .pre("irqs-before", INTERRUPTS_PER_QUEUE)
            .fio_job(&job)
            .cmd("irqs-after", INTERRUPTS_PER_QUEUE),
    );
    assert_fio_wrote_and_verified(TEST, &first, jobs, bytes);
    assert_eq!(first.fact_u64("hw_queues").unwrap(), 2);
    let before = interrupts_per_queue(&first, "irqs-before");
    let after = interrupts_per_queue(&first, "irqs-after");
    assert_eq!(after.len(), 2, "{TEST}: virtqueue interrupts {after:?}");
    // fio's jobs are spread over both vCPUs, so both queues must have completed many of the
    // thousands of requests; a queue without completions was never served.
    eprintln!("{TEST}: virtqueue interrupts before fio {before:?}, after {after:?}");
    for ((queue, b), (_, a)) in before.iter().zip(&after) {
        assert!(
            a.saturating_sub(*b) >= 10,
            "{TEST}: {queue} completed almost nothing: before {before:?} after {after:?}"
        );
    }

    let second = boot(TEST, &config.fio_job(&job).fio_arg("--verify_only"));
    assert_fio_verified_only(TEST, &second, bytes);
}

#[test]
fn guest_reboot_gets_a_working_disk_again() {
    const TEST: &str = "guest_reboot_gets_a_working_disk_again";
    let Some(vm) = vm(TEST) else { return };
    let image = Image::new();
    let (jobs, per_job_mib) = (2, 8);
    let bytes = u64::from(jobs) * per_job_mib * MIB;
    let server =
        ServerProcess::start(&["--image", image.arg(), "--create", "128M", "--queues", "2"]);
    // A reboot resets the machine inside one QEMU process: the vhost-user connection stays,
    // the device is stopped and set up again. The second boot verifies the first one's data.
    let run = boot(
        TEST,
        &vm.config(&server)
            .queues(2)
            .vcpus(2)
            .fio_job(write_verify_job(jobs, per_job_mib))
            .reboots(1, &["--verify_only"]),
    );
    assert_fio_wrote_and_verified(TEST, &run, jobs, bytes);
    let again = run.reboots.first().expect("second boot");
    assert_eq!(again.fact_u64("boot").unwrap(), 1);
    assert_eq!(again.fact_u64("hw_queues").unwrap(), 2);
    let fio = again.fio().expect("fio result of the second boot");
    assert_eq!(
        fio_io_bytes(fio, "read"),
        bytes,
        "{TEST}: bytes verified after the reboot"
    );
}

#[test]
fn guest_sees_the_configured_device() {
    const TEST: &str = "guest_sees_the_configured_device";
    let Some(vm) = vm(TEST) else { return };
    let image = Image::new();
    // 20 bytes: the longest serial, which GET_ID returns without a NUL terminator.
    let serial = "uringblk-vm-serial20";
    assert_eq!(serial.len(), 20);
    let server = ServerProcess::start(&[
        "--image",
        image.arg(),
        "--create",
        "192M",
        "--queues",
        "2",
        "--logical-block-size",
        "4096",
        "--serial",
        serial,
        "--queue-size",
        "128",
    ]);
    let run = boot(
        TEST,
        &vm.config(&server).queues(2).vcpus(2).cmd(
            "read",
            "dd if=/dev/vda of=/dev/null bs=1M count=4 iflag=direct",
        ),
    );
    let fact = |key: &str| run.fact(key).unwrap().to_string();
    let number = |key: &str| run.fact_u64(key).unwrap();
    assert_eq!(number("size_bytes"), 192 * MIB);
    assert_eq!(number("logical_block_size"), 4096);
    assert_eq!(number("ro"), 0);
    assert_eq!(fact("serial"), serial);
    assert_eq!(number("hw_queues"), 2);
    // seg_max = queue size - 2.
    assert_eq!(number("max_segments"), 126);
    // Discard granularity is the logical block size; discard and write-zeroes go up to
    // 32 MiB per request.
    assert_eq!(number("discard_granularity"), 4096);
    assert_eq!(number("discard_max_bytes"), 32 * MIB);
    assert_eq!(number("discard_max_hw_bytes"), 32 * MIB);
    assert_eq!(number("max_discard_segments"), 1);
    assert_eq!(number("write_zeroes_max_bytes"), 32 * MIB);
    assert_eq!(fact("write_cache"), "write back");
    assert_eq!(run.command("read").unwrap().exit_code, 0);
}

#[test]
fn guest_sees_disabled_features() {
    const TEST: &str = "guest_sees_disabled_features";
    let Some(vm) = vm(TEST) else { return };
    let server = ServerProcess::start(&[
        "--null",
        "64M",
        "--no-discard",
        "--no-write-zeroes",
        "--writethrough",
    ]);
    let run = boot(TEST, &vm.config(&server).cmd("noop", "true"));
    let number = |key: &str| run.fact_u64(key).unwrap();
    assert_eq!(number("size_bytes"), 64 * MIB);
    assert_eq!(number("logical_block_size"), 512);
    assert_eq!(run.fact("serial").unwrap(), "uringblk");
    assert_eq!(number("discard_max_bytes"), 0);
    assert_eq!(number("write_zeroes_max_bytes"), 0);
    assert_eq!(run.fact("write_cache").unwrap(), "write through");
}

/// Prints `<label>=<md5>` of `count` MiB of a device or file starting at MiB `skip`.
fn md5_line(label: &str, input: &str, skip: u64, count: u64) -> String {
    let direct = if input.starts_with("/dev/vda") {
        " iflag=direct"
    } else {
        ""
    };
    format!(
        "echo {label}=$(dd if={input} bs=1M skip={skip} count={count}{direct} 2>/dev/null | md5sum | cut -d' ' -f1)\n"
    )
}

/// A guest snippet that prints the named field of /sys/block/vda/stat (1-based).
fn stat_field(label: &str, field: u32) -> String {
    format!("echo {label}=$(awk '{{ print ${field} }}' /sys/block/vda/stat)\n")
}

fn key_values(text: &str) -> std::collections::BTreeMap<String, String> {
    text.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn discard_and_write_zeroes_from_the_guest() {
    const TEST: &str = "discard_and_write_zeroes_from_the_guest";
    let Some(vm) = vm(TEST) else { return };
    let image = Image::new();
    let server = ServerProcess::start(&["--image", image.arg(), "--create", "128M"]);

    // The image starts sparse (all zeros), so first fill MiB 0..48 with random data; the
    // checks then show that exactly the zeroed ranges became zeros.
    let fill = "set -e
dd if=/dev/urandom of=/tmp/pattern bs=1M count=8 2>/dev/null
for i in 0 1 2 3 4 5; do
  dd if=/tmp/pattern of=/dev/vda bs=1M seek=$((i * 8)) oflag=direct 2>/dev/null
done";
    // Small range: MiB 1..5 of the first 8 MiB pattern copy.
    let mut check_small = String::new();
    check_small += &md5_line("zeros", "/dev/zero", 0, 4);
    check_small += &md5_line("zeroed", "/dev/vda", 1, 4);
    check_small += &md5_line("zeros_1m", "/dev/zero", 0, 1);
    check_small += &md5_line("pattern_head", "/tmp/pattern", 0, 1);
    check_small += &md5_line("disk_head", "/dev/vda", 0, 1);
    check_small += &md5_line("pattern_tail", "/tmp/pattern", 5, 3);
    check_small += &md5_line("disk_tail", "/dev/vda", 5, 3);
    // Large range: MiB 8..48 (40 MiB, more than one 32 MiB WRITE_ZEROES request). The write
    // request count shows the guest used WRITE_ZEROES (2 requests) instead of falling back to
    // writing zero pages (which the kernel does silently if WRITE_ZEROES fails).
    let mut zero_large = stat_field("writes_before", 5);
    zero_large += "blkdiscard -z -o 8388608 -l 41943040 /dev/vda || exit 1\n";
    zero_large += &stat_field("writes_after", 5);
    zero_large += &md5_line("zeros", "/dev/zero", 0, 40);
    zero_large += &md5_line("zeroed", "/dev/vda", 8, 40);
    let mut discard = stat_field("discards_before", 12);
    discard += "blkdiscard -o 67108864 -l 16777216 /dev/vda || exit 1\n";
    discard += &stat_field("discards_after", 12);

    let run = boot(
        TEST,
        &vm.config(&server)
            .cmd("fill", fill)
            .cmd("zero-small", "blkdiscard -z -o 1048576 -l 4194304 /dev/vda")
            .cmd("check-small", &check_small)
            .cmd("zero-large", &zero_large)
            .cmd("discard", &discard)
            .cmd("discard-all", "blkdiscard /dev/vda"),
    );
    for name in [
        "fill",
        "zero-small",
        "check-small",
        "zero-large",
        "discard",
        "discard-all",
    ] {
        let c = run.command(name).unwrap();
        assert_eq!(c.exit_code, 0, "{TEST}: {name} failed: {}", c.output);
    }

    let small = key_values(&run.command("check-small").unwrap().output);
    assert_eq!(
        small["zeroed"], small["zeros"],
        "{TEST}: MiB 1..5 not zeroed"
    );
    assert_eq!(
        small["disk_head"], small["pattern_head"],
        "{TEST}: MiB 0..1 changed"
    );
    assert_eq!(
        small["disk_tail"], small["pattern_tail"],
        "{TEST}: MiB 5..8 changed"
    );
    assert_ne!(
        small["pattern_head"], small["zeros_1m"],
        "{TEST}: the fill pattern is zeros"
    );

    let large = key_values(&run.command("zero-large").unwrap().output);
    assert_eq!(
        large["zeroed"], large["zeros"],
        "{TEST}: MiB 8..48 not zeroed"
    );
    let write_requests = large["writes_after"].parse::<u64>().unwrap()
        - large["writes_before"].parse::<u64>().unwrap();
    eprintln!("{TEST}: 40 MiB of write-zeroes took {write_requests} write requests");
    assert!(
        (1..=4).contains(&write_requests),
        "{TEST}: 40 MiB of write-zeroes took {write_requests} write requests \
         (the kernel fell back to writing zeros?)"
    );

    let discard = key_values(&run.command("discard").unwrap().output);
    let discard_requests = discard["discards_after"].parse::<u64>().unwrap()
        - discard["discards_before"].parse::<u64>().unwrap();
    eprintln!("{TEST}: 16 MiB of discard took {discard_requests} discard requests");
    assert!(
        discard_requests >= 1,
        "{TEST}: blkdiscard sent no discard request"
    );

    let status = server.stop();
    assert!(status.success(), "{TEST}: server exit status {status}");
}

#[test]
fn read_only_export_refuses_writes() {
    const TEST: &str = "read_only_export_refuses_writes";
    let Some(vm) = vm(TEST) else { return };
    let image = Image::new();
    let size = 32 * MIB;
    std::fs::write(&image.path, vec![0xa5u8; size as usize]).expect("write image");

    let server = ServerProcess::start(&["--image", image.arg(), "--readonly"]);
    let run = boot(
        TEST,
        &vm.config(&server)
            .cmd(
                "write",
                "dd if=/dev/zero of=/dev/vda bs=4096 count=1 oflag=direct",
            )
            .cmd("discard", "blkdiscard -o 0 -l 1048576 /dev/vda")
            .cmd("zeroout", "blkdiscard -z -o 0 -l 1048576 /dev/vda")
            .cmd(
                "read",
                "dd if=/dev/vda bs=4096 count=1 iflag=direct 2>/dev/null | od -An -tx1 | head -n1",
            ),
    );
    assert_eq!(
        run.fact_u64("ro").unwrap(),
        1,
        "{TEST}: the guest sees a writable disk"
    );
    assert_eq!(run.fact_u64("size_bytes").unwrap(), size);
    for name in ["write", "discard", "zeroout"] {
        let c = run.command(name).unwrap();
        assert_ne!(
            c.exit_code, 0,
            "{TEST}: {name} succeeded on a read-only disk: {}",
            c.output
        );
    }
    let read = run.command("read").unwrap();
    assert_eq!(read.exit_code, 0);
    assert_eq!(
        read.output.split_whitespace().collect::<Vec<_>>(),
        vec!["a5"; 16],
        "{TEST}: first bytes read back"
    );
    drop(server);
    let data = std::fs::read(&image.path).expect("read image");
    assert!(
        data.iter().all(|&b| b == 0xa5),
        "{TEST}: the read-only image changed"
    );
}

/// Guest snippet: 4k random reads at QD16 on both vCPUs (so both queues), in the background
/// until READER_STOP, on the half of the disk the writers leave alone.
const READER_START: &str = "fio --name=reader --filename=/dev/vda --rw=randread --bs=4k \
--iodepth=16 --ioengine=libaio --direct=1 --time_based --runtime=900 --offset=128M --size=128M \
--numjobs=2 --cpus_allowed=0-1 --cpus_allowed_policy=split --group_reporting \
--output-format=json --output=/tmp/reader.json >/tmp/reader.log 2>&1 &
echo $! >/tmp/reader.pid";

/// Guest snippet: stops the reader (fio writes its report on SIGTERM) and prints the report.
const READER_STOP: &str = "pid=$(cat /tmp/reader.pid)
kill $pid
i=0
while kill -0 $pid 2>/dev/null && [ $i -lt 200 ]; do sleep 0.1; i=$((i+1)); done
if [ -s /tmp/reader.json ]; then cat /tmp/reader.json; else echo 'no report; log:'; cat /tmp/reader.log; fi";

/// One life of the server in the crash test: its process and its log.
struct ServerLife {
    child: std::process::Child,
    log: PathBuf,
}

impl ServerLife {
    fn start(socket: &Path, control: &Path, image: &Image, log: PathBuf, extra: &[&str]) -> Self {
        let file = std::fs::File::create(&log).expect("server log");
        let mut args = vec![
            "--image",
            image.arg(),
            "--control",
            control.to_str().expect("UTF-8 path"),
            "--queues",
            "2",
            // Every write is durable before it completes, so each stays in flight for a
            // disk write: the kill finds requests in flight.
            "--writethrough",
        ];
        args.extend_from_slice(extra);
        let child = common::spawn_server(socket, &args, file.into());
        ServerLife { child, log }
    }

    fn signal(mut self, signal: libc::c_int) -> String {
        // SAFETY: kill(2) on the pid of a child we spawned and have not reaped yet.
        unsafe { libc::kill(self.child.id() as libc::pid_t, signal) };
        let status = self.child.wait().expect("wait for the server");
        eprintln!("server ended by signal {signal}: {status}");
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for ServerLife {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One request on the control socket; None while the server is not (yet) answering.
fn control_request(control: &Path, command: &str) -> Option<serde_json::Value> {
    use std::io::{BufRead, BufReader, Write};
    let mut stream = std::os::unix::net::UnixStream::connect(control).ok()?;
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .ok()?;
    writeln!(stream, "{{\"command\": \"{command}\"}}").ok()?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line).ok()?;
    let reply: serde_json::Value = serde_json::from_str(&line).ok()?;
    reply.get("result").cloned()
}

/// (write ops completed, requests in flight), summed over the queues.
fn writes_and_in_flight(control: &Path) -> Option<(u64, u64)> {
    let stats = control_request(control, "stats")?;
    let queues = stats["queues"].as_array()?;
    let sum = |f: &dyn Fn(&serde_json::Value) -> Option<u64>| -> u64 {
        queues.iter().filter_map(f).sum()
    };
    Some((
        sum(&|q| q["write"]["ops"].as_u64()),
        sum(&|q| q["in_flight"].as_u64()),
    ))
}

/// The counts of requests a restarted server says it resubmitted ("resubmitted N requests").
fn resubmitted_in(log: &str) -> u64 {
    log.lines()
        .filter_map(|line| {
            let rest = &line[line.find("resubmitted ")? + "resubmitted ".len()..];
            rest.split_whitespace().next()?.parse::<u64>().ok()
        })
        .sum()
}

#[test]
fn the_guest_outlives_server_crashes_and_restarts_under_load() {
    const TEST: &str = "the_guest_outlives_server_crashes_and_restarts_under_load";
    let Some(vm) = vm(TEST) else { return };
    let image = Image::new();
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("blk.sock");
    let control = dir.path().join("control.sock");
    let (jobs, per_job_mib) = (2, 64);
    let bytes = u64::from(jobs) * per_job_mib * MIB;
    let mut life = ServerLife::start(
        &socket,
        &control,
        &image,
        dir.path().join("server-1.log"),
        &["--create", "256M"],
    );
    // QEMU reconnects a second after the server went away, and sets the rings up again on
    // the new server (with the inflight region it kept, when that was negotiated).
    let config = VmConfig::new(&socket, &vm.guest_dir)
        .queues(2)
        .vcpus(2)
        .reconnect(1)
        .timeout(std::time::Duration::from_secs(300))
        // Small reads beside the writes, on both queues, so completions come back out of
        // order: a restart that took the ring up again at the used index would repeat some
        // reads (the guest's driver calls the ring broken) and lose some writes.
        .pre("reader-start", READER_START)
        .fio_job(write_verify_job(jobs, per_job_mib))
        .cmd("reader-stop", READER_STOP)
        .cmd(
            "io-errors",
            "dmesg | grep -i -E 'I/O error|blk_update_request|virtio_blk.*(error|broken)' || true",
        );
    let mut guest = match guestvm::start(&config) {
        Ok(vm) => vm,
        Err(e) => panic!("{TEST}: {e}"),
    };

    // kill -9 at least twice, and again (6 at most) until a restarted server had requests
    // to resubmit; then a clean restart (SIGTERM). Each once the guest has written more and
    // has requests in flight (each server's counters start at zero).
    const MAX_KILLS: usize = 6;
    // The signal that ended each server life, and what each life resubmitted at its start.
    let mut ended_by = Vec::new();
    let mut resubmitted = Vec::new();
    loop {
        let restart = ended_by.len() + 1;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
        loop {
            assert!(
                !guest.is_finished(),
                "{TEST}: the guest finished before restart {restart}: give fio more to do"
            );
            if std::time::Instant::now() >= deadline {
                panic!(
                    "{TEST}: no guest writes with requests in flight before restart {restart}\n\
                     stats: {}\nserver log:\n{}\nguest console:\n{}",
                    control_request(&control, "stats").unwrap_or_default(),
                    std::fs::read_to_string(&life.log).unwrap_or_default(),
                    guest.console_tail(60),
                );
            }
            match writes_and_in_flight(&control) {
                Some((writes, in_flight)) if writes >= 300 && in_flight >= 4 => {
                    eprintln!(
                        "{TEST}: restart {restart}: {writes} writes done, {in_flight} in flight"
                    );
                    break;
                }
                _ => std::thread::sleep(std::time::Duration::from_millis(1)),
            }
        }
        // This life recovered at its first drain, long before it wrote 300 times.
        resubmitted.push(resubmitted_in(
            &std::fs::read_to_string(&life.log).unwrap_or_default(),
        ));
        let kills = ended_by.len();
        let landed = resubmitted.iter().skip(1).any(|&n| n > 0);
        let signal = if kills >= 2 && (landed || kills >= MAX_KILLS) {
            libc::SIGTERM
        } else {
            libc::SIGKILL
        };
        life.signal(signal);
        ended_by.push(signal);
        life = ServerLife::start(
            &socket,
            &control,
            &image,
            dir.path().join(format!("server-{}.log", restart + 1)),
            &[],
        );
        if signal == libc::SIGTERM {
            break;
        }
    }
    let run = match guest.wait() {
        Ok(run) => run,
        Err(e) => panic!("{TEST}: {e}"),
    };
    let log = life.signal(libc::SIGTERM);
    // What each life said about its connections and the inflight region, for the record.
    for n in 1..=ended_by.len() + 1 {
        let text =
            std::fs::read_to_string(dir.path().join(format!("server-{n}.log"))).unwrap_or_default();
        for line in text.lines().filter(|l| {
            ["connected", "in-flight", "resubmitted", "inflight"]
                .iter()
                .any(|w| l.contains(w))
        }) {
            eprintln!("{TEST}: server {n}: {line}");
        }
    }
    resubmitted.push(resubmitted_in(&log));
    let names: Vec<_> = ended_by
        .iter()
        .map(|&s| {
            if s == libc::SIGKILL {
                "kill -9"
            } else {
                "SIGTERM"
            }
        })
        .collect();
    eprintln!(
        "{TEST}: restarts {names:?}; requests each restarted server resubmitted: {:?}",
        &resubmitted[1..]
    );
    assert_fio_wrote_and_verified(TEST, &run, jobs, bytes);
    let errors = run.command("io-errors").expect("dmesg check");
    assert!(
        errors.output.trim().is_empty(),
        "{TEST}: the guest logged I/O errors:\n{}",
        errors.output
    );
    let reader = run.command("reader-stop").expect("reader result");
    // fio may say it is terminating before its JSON report.
    let report = &reader.output[reader.output.find('{').unwrap_or(0)..];
    let reader: serde_json::Value = serde_json::from_str(report).unwrap_or_else(|e| {
        panic!(
            "{TEST}: reader output is not fio JSON ({e}): {}",
            reader.output
        )
    });
    let job = &reader["jobs"][0];
    assert_eq!(job["error"], 0, "{TEST}: the reader saw an error: {job}");
    let reads = job["read"]["total_ios"].as_u64().unwrap_or(0);
    eprintln!("{TEST}: the reader completed {reads} reads beside the writes");
    assert!(
        reads > 1000,
        "{TEST}: the reader did almost nothing: {reads} reads"
    );
    assert!(
        resubmitted[1..ended_by.len()].iter().any(|&n| n > 0),
        "{TEST}: in {} kills -9 the server never had requests in flight to resubmit",
        ended_by.len() - 1
    );
    // A clean stop finishes its requests before it goes: nothing to resubmit after it.
    assert_eq!(
        resubmitted.last(),
        Some(&0),
        "{TEST}: resubmitted after SIGTERM"
    );
    assert!(
        !log.contains("panicked"),
        "{TEST}: the last server panicked"
    );
}
