//! How far apart the hypervisor has put the client's and the server's CPUs, measured as the
//! round trip of one cache line between two threads pinned to them.
//!
//! On a VM the two vCPUs can sit on cores that share a cache or on cores that do not, and the
//! hypervisor moves them: on the 2-vCPU AMD machine of 2026-12-04 the round trip was ~93 ns for
//! most of a two-minute probe and ~420 ns in stretches of 3-20 s. A client and a server that
//! both poll a virtqueue trade cache lines on every request, so the null backends ran ~2.7x
//! slower in those stretches, for both servers alike. The harness records the round trip
//! before and after each run so that points can be read with the placement they had.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::stats::Spread;

/// Median round trip, in nanoseconds, of a cache line bounced between `cpu_a` and `cpu_b` over
/// about `length`; `None` when either CPU cannot be pinned to (or is the same CPU, where a
/// round trip would measure the scheduler, not the cache).
pub fn cache_line_round_trip_ns(cpu_a: usize, cpu_b: usize, length: Duration) -> Option<f64> {
    if cpu_a == cpu_b {
        return None;
    }
    // Odd values are the ping's, even ones the pong's; u64::MAX tells the pong to stop.
    let line = Arc::new(AtomicU64::new(0));
    let pong_line = Arc::clone(&line);
    let pong = std::thread::spawn(move || {
        if !pin(cpu_b) {
            pong_line.store(u64::MAX, Ordering::Release);
            return;
        }
        loop {
            let seen = pong_line.load(Ordering::Acquire);
            if seen == u64::MAX {
                return;
            }
            if seen % 2 == 1 {
                pong_line.store(seen + 1, Ordering::Release);
            }
            std::hint::spin_loop();
        }
    });
    // The ping side runs on a thread of its own too, so that the caller's affinity is left
    // as it was.
    let ping_line = Arc::clone(&line);
    let samples = std::thread::spawn(move || {
        if pin(cpu_a) {
            ping(&ping_line, length)
        } else {
            Vec::new()
        }
    })
    .join()
    .unwrap_or_default();
    // Stops the pong however the ping side ended.
    line.store(u64::MAX, Ordering::Release);
    let _ = pong.join();
    Spread::of(samples).map(|s| s.median)
}

/// Timed rounds of bounces until `length` has passed; each sample is one round's nanoseconds
/// per round trip. Empty if the pong side gave up (its pinning failed).
fn ping(line: &AtomicU64, length: Duration) -> Vec<f64> {
    const BOUNCES_PER_SAMPLE: u64 = 200;
    // A pong that never answers must not hang the harness.
    const NO_ANSWER: Duration = Duration::from_secs(1);
    let start = Instant::now();
    let mut next = 1u64;
    let mut samples = Vec::new();
    while start.elapsed() < length || samples.is_empty() {
        let round = Instant::now();
        for _ in 0..BOUNCES_PER_SAMPLE {
            line.store(next, Ordering::Release);
            let mut spins = 0u32;
            loop {
                let seen = line.load(Ordering::Acquire);
                if seen == next + 1 {
                    break;
                }
                // The clock is read only now and then: a read per spin would be counted
                // into the round trip.
                spins = spins.wrapping_add(1);
                if seen == u64::MAX || (spins % 4096 == 0 && round.elapsed() > NO_ANSWER) {
                    return Vec::new();
                }
                std::hint::spin_loop();
            }
            next += 2;
        }
        samples.push(round.elapsed().as_nanos() as f64 / BOUNCES_PER_SAMPLE as f64);
    }
    samples
}

fn pin(cpu: usize) -> bool {
    core_affinity::set_for_current(core_affinity::CoreId { id: cpu })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_round_trip_between_two_cpus_is_measured() {
        if std::thread::available_parallelism().map_or(1, |n| n.get()) < 2 {
            eprintln!("SKIPPED: one CPU");
            return;
        }
        let ns = cache_line_round_trip_ns(0, 1, Duration::from_millis(20))
            .expect("CPUs 0 and 1 can be pinned to");
        // A cache line crosses between cores in tens to hundreds of nanoseconds; the bound
        // only catches a probe that measures nothing or hangs in the scheduler.
        assert!(ns > 1.0 && ns < 1_000_000.0, "round trip {ns} ns");
    }

    #[test]
    fn the_same_cpu_or_a_cpu_that_does_not_exist_gives_no_figure() {
        assert_eq!(
            cache_line_round_trip_ns(0, 0, Duration::from_millis(5)),
            None
        );
        assert_eq!(
            cache_line_round_trip_ns(0, 1000, Duration::from_millis(5)),
            None
        );
    }
}
