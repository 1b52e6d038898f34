//! In-flight I/O survives a `kill -9` of the server (issue 10, item 2, protocol level): the
//! real binary serves a test frontend that behaves as QEMU does across a backend crash
//! (restart_support). Large writethrough writes to an O_DIRECT image on a real disk are
//! published with small reads behind them, in one batch; once the reads have completed with
//! writes still in flight (completions out of order) the server is killed, started again on
//! the same socket and image, and the frontend reconnects with the same memory, rings and
//! inflight region (each vring base = its used index). Every request must then complete
//! exactly once (the used rings across both lives: no id twice, none missing), with status
//! OK, and what was written must be on the disk.

mod restart_support;

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use restart_support::{Request, TestFrontend};

const MIB: u64 = 1 << 20;
const WRITES: usize = 4;
const WRITE_LEN: u32 = 8 << 20;
const READS: usize = 8;
const READ_LEN: u32 = 4096;
const IMAGE_LEN: u64 = 64 * MIB;
/// Where on the disk the reads read (prefilled), past the written area.
const READ_AREA: u64 = 48 * MIB;
/// Guest memory: rings and headers below 2 MiB, write data, then read buffers.
const WRITE_DATA: u64 = 2 * MIB;
const READ_DATA: u64 = 40 * MIB;
const GUEST_LEN: usize = 48 << 20;
/// Tries of the kill before the test says the race never landed.
const ATTEMPTS: usize = 6;

fn disk_byte(offset: u64) -> u8 {
    ((offset / 512) as u8) ^ 0x5a
}

fn write_byte(write: usize, pos: usize) -> u8 {
    ((pos / 512) as u8).wrapping_mul(3) ^ (0xa0 + write as u8)
}

/// A server process with its log (stderr) in a file.
struct Server {
    child: Child,
    log: PathBuf,
}

impl Server {
    fn start(socket: &Path, image: &Path, queues: u16, log: PathBuf) -> Server {
        let err = File::create(&log).expect("server log file");
        let child = Command::new(env!("CARGO_BIN_EXE_uringblk"))
            .arg("--socket")
            .arg(socket)
            .arg("--image")
            .arg(image)
            .args(["--writethrough", "--queue-size", "128", "--queues"])
            .arg(queues.to_string())
            .args(["--iothreads", &queues.min(2).to_string()])
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(err))
            .spawn()
            .expect("spawn uringblk");
        Server { child, log }
    }

    fn kill9(&mut self) {
        // SAFETY: kill(2) on the pid of a child we spawned and have not reaped.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGKILL) };
        let _ = self.child.wait();
    }

    fn stop(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        // SAFETY: as in kill9.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        for _ in 0..1000 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill9();
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Requests the server said it resubmitted, summed over its queues.
    fn resubmitted(&self) -> usize {
        self.log_text()
            .lines()
            .filter_map(|l| {
                let rest = l.split("resubmitted ").nth(1)?;
                rest.strip_suffix(" requests in flight when the last server stopped")?
                    .parse::<usize>()
                    .ok()
            })
            .sum()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The large writethrough writes, one after another from the disk's start.
fn large_writes() -> Vec<Request> {
    (0..WRITES)
        .map(|w| Request {
            write: true,
            offset: w as u64 * u64::from(WRITE_LEN),
            data: WRITE_DATA + w as u64 * u64::from(WRITE_LEN),
            len: WRITE_LEN,
        })
        .collect()
}

/// A sparse image in `dir`, and where the server's socket goes.
fn empty_image(dir: &Path) -> (PathBuf, PathBuf) {
    let image = dir.join("disk.img");
    File::create(&image)
        .and_then(|f| f.set_len(IMAGE_LEN))
        .expect("image");
    (image, dir.join("blk.sock"))
}

/// Per queue: its requests (writes first, then reads), spread round-robin over the queues.
fn plan(queues: u16) -> Vec<Vec<(Request, Expect)>> {
    let mut per_queue: Vec<Vec<(Request, Expect)>> = vec![Vec::new(); queues as usize];
    for (w, r) in large_writes().into_iter().enumerate() {
        per_queue[w % queues as usize].push((r, Expect::Write(w)));
    }
    for n in 0..READS {
        let r = Request {
            write: false,
            offset: READ_AREA + n as u64 * 64 * 1024,
            data: READ_DATA + n as u64 * u64::from(READ_LEN),
            len: READ_LEN,
        };
        per_queue[n % queues as usize].push((r, Expect::Read));
    }
    per_queue
}

#[derive(Clone, Copy, Debug)]
enum Expect {
    Write(usize),
    Read,
}

struct Outcome {
    completed_before_kill: usize,
    writes_completed_before_kill: usize,
    resubmitted: usize,
}

/// One try: None when the race was lost (every write had completed before the kill).
fn attempt(queues: u16, ring_size: u16, dir: &Path) -> Option<Outcome> {
    let image = dir.join("disk.img");
    let socket = dir.join("blk.sock");
    {
        let mut f = File::create(&image).expect("image");
        f.set_len(IMAGE_LEN).expect("size image");
        let area: Vec<u8> = (0..MIB).map(|i| disk_byte(READ_AREA + i)).collect();
        use std::io::{Seek, SeekFrom, Write};
        f.seek(SeekFrom::Start(READ_AREA)).unwrap();
        f.write_all(&area).unwrap();
        f.sync_all().unwrap();
    }
    let plan = plan(queues);
    let mut fe = TestFrontend::with_ring_size(GUEST_LEN, queues, ring_size);
    for (r, e) in plan.iter().flatten() {
        if let Expect::Write(w) = e {
            fe.mem
                .fill_with(r.data, r.len as usize, |pos| write_byte(*w, pos));
        }
    }
    let mut first = Server::start(&socket, &image, queues, dir.join("first.log"));
    fe.connect(&socket);
    let mut heads = Vec::new();
    for (q, reqs) in plan.iter().enumerate() {
        let requests: Vec<Request> = reqs.iter().map(|(r, _)| *r).collect();
        heads.push(fe.queues[q].publish(&fe.mem, &requests));
    }
    // The reads sit behind the writes on their rings: wait until every read is on its used
    // ring, then kill at once.
    let reads_done = |fe: &TestFrontend| {
        plan.iter().enumerate().all(|(q, reqs)| {
            let used = fe.queues[q].used_ids(&fe.mem);
            reqs.iter()
                .zip(&heads[q])
                .filter(|((_, e), _)| matches!(e, Expect::Read))
                .all(|(_, h)| used.contains(h))
        })
    };
    let landed = fe.wait_until(Duration::from_secs(30), reads_done);
    first.kill9();
    assert!(
        landed,
        "the reads did not complete within 30 s; server log:\n{}",
        first.log_text()
    );
    fe.disconnect();
    let mut completed_before_kill = 0;
    let mut writes_completed_before_kill = 0;
    for (q, reqs) in plan.iter().enumerate() {
        let used = fe.queues[q].used_ids(&fe.mem);
        completed_before_kill += used.len();
        writes_completed_before_kill += reqs
            .iter()
            .zip(&heads[q])
            .filter(|((_, e), h)| matches!(e, Expect::Write(_)) && used.contains(h))
            .count();
    }
    if writes_completed_before_kill == WRITES {
        eprintln!("race lost: all {WRITES} writes completed before the kill; trying again");
        return None;
    }

    let mut second = Server::start(&socket, &image, queues, dir.join("second.log"));
    fe.connect(&socket);
    let all_done = |fe: &TestFrontend| {
        plan.iter()
            .enumerate()
            .all(|(q, reqs)| fe.queues[q].used_idx(&fe.mem) as usize >= reqs.len())
    };
    let done = fe.wait_until(Duration::from_secs(60), all_done);
    // Anything completed twice would show up as more used elements: give it time to.
    std::thread::sleep(Duration::from_millis(300));
    for (q, reqs) in plan.iter().enumerate() {
        let mut used = fe.queues[q].used_ids(&fe.mem);
        used.sort_unstable();
        let mut want = heads[q].clone();
        want.sort_unstable();
        assert!(
            done && used == want,
            "queue {q}: used ring holds {used:?}, each of {want:?} must be there exactly once \
             ({completed_before_kill} completed before the kill); second server log:\n{}",
            second.log_text()
        );
        for ((r, e), &h) in reqs.iter().zip(&heads[q]) {
            assert_eq!(
                fe.queues[q].status(&fe.mem, h),
                blk_proto::VIRTIO_BLK_S_OK,
                "queue {q} head {h} ({e:?}) status"
            );
            if let Expect::Read = e {
                let got = fe.mem.read(r.data, r.len as usize);
                let expect: Vec<u8> = (0..u64::from(r.len))
                    .map(|i| disk_byte(r.offset + i))
                    .collect();
                assert!(
                    got == expect,
                    "queue {q} head {h}: the read's data is wrong"
                );
            }
        }
    }
    second.stop();
    let resubmitted = second.resubmitted();
    assert_eq!(
        resubmitted,
        WRITES + READS - completed_before_kill,
        "the second server resubmits exactly what the first left in flight; its log:\n{}",
        second.log_text()
    );
    // What the writes wrote is on the disk.
    let mut disk = Vec::new();
    File::open(&image)
        .expect("image")
        .read_to_end(&mut disk)
        .expect("read image");
    for w in 0..WRITES {
        let at = w * WRITE_LEN as usize;
        let region = &disk[at..at + WRITE_LEN as usize];
        if let Some(pos) = (0..region.len()).find(|&p| region[p] != write_byte(w, p)) {
            panic!("write {w}: disk byte {pos} of the written range is wrong");
        }
    }
    Some(Outcome {
        completed_before_kill,
        writes_completed_before_kill,
        resubmitted,
    })
}

fn kill_and_restart(queues: u16, ring_size: u16) {
    for n in 1..=ATTEMPTS {
        // A real disk (not tmpfs), so writethrough writes take real time.
        let dir = tempfile::Builder::new()
            .prefix("uringblk-restart")
            .tempdir_in("/var/tmp")
            .expect("dir under /var/tmp");
        if let Some(o) = attempt(queues, ring_size, dir.path()) {
            eprintln!(
                "{queues} queue(s), try {n}: {} of {} requests completed before the kill ({} of \
                 {WRITES} writes); the restarted server resubmitted {}",
                o.completed_before_kill,
                WRITES + READS,
                o.writes_completed_before_kill,
                o.resubmitted
            );
            return;
        }
    }
    panic!("in {ATTEMPTS} tries the kill never landed with writes still in flight");
}

#[test]
fn requests_in_flight_at_a_kill_9_complete_once_after_the_restart_one_queue() {
    kill_and_restart(1, restart_support::QUEUE_SIZE);
}

#[test]
fn requests_in_flight_at_a_kill_9_complete_once_after_the_restart_two_queues() {
    kill_and_restart(2, restart_support::QUEUE_SIZE);
}

/// A driver may set a ring smaller than the queue size the device offered (and the frontend
/// sized the inflight region for): the ring's heads use the first entries of its part.
#[test]
fn requests_in_flight_at_a_kill_9_complete_once_after_the_restart_ring_smaller_than_region() {
    kill_and_restart(1, restart_support::QUEUE_SIZE / 2);
}

/// A server killed after it published completions but before it signalled them leaves the
/// guest's `used_event` behind the used index. With EVENT_IDX no later completion passes that
/// event again, so the restarted server must signal once as its queue starts, or the guest
/// never hears of anything again (a hung guest after a crash).
#[test]
fn a_restarted_server_signals_what_its_predecessor_published_unsignalled() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (image, socket) = empty_image(dir.path());
    let read = |n: u64| Request {
        write: false,
        offset: n * 4096,
        data: READ_DATA + n * 4096,
        len: 4096,
    };
    let mut fe = TestFrontend::new(GUEST_LEN, 1);
    fe.event_idx = true;
    let mut first = Server::start(&socket, &image, 1, dir.path().join("first.log"));
    fe.connect(&socket);
    // "Signal me once the used index passes 0": the first completion signals.
    fe.queues[0].set_used_event(&fe.mem, 0);
    fe.queues[0].publish(&fe.mem, &[read(0), read(1)]);
    assert!(
        fe.wait_until(Duration::from_secs(10), |fe| fe.queues[0].used_idx(&fe.mem)
            == 2),
        "the first server did not complete 2 reads; its log:\n{}",
        first.log_text()
    );
    first.kill9();
    fe.disconnect();
    // As if that signal had been lost with the server: the guest has seen nothing and its
    // used_event still says 0.
    fe.queues[0].take_signal();
    let second = Server::start(&socket, &image, 1, dir.path().join("second.log"));
    fe.connect(&socket);
    let signalled = fe.wait_until(Duration::from_secs(10), |fe| fe.queues[0].take_signal());
    assert!(
        signalled,
        "the restarted server never signalled the 2 completions the guest has not seen; its \
         log:\n{}",
        second.log_text()
    );
}

/// A clean stop (SIGTERM) with requests in flight finishes them: each is on the used ring
/// with OK before the process goes, and the next server has nothing to resubmit.
#[test]
fn a_clean_stop_puts_what_was_in_flight_on_the_used_ring() {
    for n in 1..=ATTEMPTS {
        let dir = tempfile::Builder::new()
            .prefix("uringblk-clean-stop")
            .tempdir_in("/var/tmp")
            .expect("dir under /var/tmp");
        let (image, socket) = empty_image(dir.path());
        let writes = large_writes();
        let mut fe = TestFrontend::new(GUEST_LEN, 1);
        for (w, r) in writes.iter().enumerate() {
            fe.mem
                .fill_with(r.data, r.len as usize, |pos| write_byte(w, pos));
        }
        let mut first = Server::start(&socket, &image, 1, dir.path().join("first.log"));
        fe.connect(&socket);
        let heads = fe.queues[0].publish(&fe.mem, &writes);
        // Popped (marked in the region) and not all completed yet: then stop.
        fe.wait_until(Duration::from_secs(10), |fe| {
            fe.marked_in_flight(0).len() + fe.queues[0].used_idx(&fe.mem) as usize >= WRITES
        });
        if fe.queues[0].used_idx(&fe.mem) as usize == WRITES {
            eprintln!("try {n}: every write completed before the stop; trying again");
            continue;
        }
        first.stop();
        let mut used = fe.queues[0].used_ids(&fe.mem);
        used.sort_unstable();
        assert_eq!(
            used,
            heads,
            "after SIGTERM every write is on the used ring; the server's log:\n{}",
            first.log_text()
        );
        for &h in &heads {
            assert_eq!(
                fe.queues[0].status(&fe.mem, h),
                blk_proto::VIRTIO_BLK_S_OK,
                "head {h} status"
            );
        }
        fe.disconnect();
        let mut second = Server::start(&socket, &image, 1, dir.path().join("second.log"));
        fe.connect(&socket);
        std::thread::sleep(Duration::from_millis(300));
        second.stop();
        assert_eq!(
            second.resubmitted(),
            0,
            "nothing is left to resubmit after a clean stop; the second server's log:\n{}",
            second.log_text()
        );
        return;
    }
    panic!("in {ATTEMPTS} tries the stop never landed with writes in flight");
}

/// QEMU's first start when the firmware drove the disk first: every queue enabled, only
/// queue 0 started and stopped, then a new inflight region for the driver's start. Queue 1
/// must mark its requests in that new region (the one the frontend keeps), or a kill -9
/// loses them.
#[test]
fn a_queue_enabled_before_a_new_region_marks_its_requests_in_the_new_one() {
    let dir = tempfile::Builder::new()
        .prefix("uringblk-new-region")
        .tempdir_in("/var/tmp")
        .expect("dir under /var/tmp");
    let (image, socket) = empty_image(dir.path());
    let writes = large_writes();
    for n in 1..=ATTEMPTS {
        let mut fe = TestFrontend::new(GUEST_LEN, 2);
        let mut server = Server::start(&socket, &image, 2, dir.path().join(format!("{n}.log")));
        fe.connect_after_firmware(&socket);
        let heads = fe.queues[1].publish(&fe.mem, &writes);
        // While the writes run, the kept region must show them marked.
        let marked_while_running = std::cell::Cell::new(false);
        let done = fe.wait_until(Duration::from_secs(10), |fe| {
            let used = fe.queues[1].used_ids(&fe.mem);
            let marked = fe.marked_in_flight(1);
            if used.len() < WRITES && heads.iter().all(|h| used.contains(h) || marked.contains(h)) {
                marked_while_running.set(true);
            }
            marked_while_running.get() || used.len() == WRITES
        });
        server.stop();
        assert!(
            done,
            "queue 1's writes did not complete; log:\n{}",
            server.log_text()
        );
        if marked_while_running.get() {
            return;
        }
        eprintln!("try {n}: the writes completed and none was seen marked in the kept region; trying again");
    }
    panic!(
        "in {ATTEMPTS} tries queue 1's writes were never seen marked in the region the frontend \
         keeps: they are tracked in one it threw away"
    );
}
