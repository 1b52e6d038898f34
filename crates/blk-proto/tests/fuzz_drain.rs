//! The fuzz targets' stable twin (fuzz/ runs the same checks under libFuzzer on nightly):
//! random bytes decode, through blk-fuzz's generators, into a hostile guest (memory regions
//! with gaps and guard pages, arbitrary rings, descriptor tables, avail indices, a second
//! round of guest writes), and the server's drain walk over it must keep every promise: no
//! panic, nothing outside guest memory, bounded walks and drains, a status or a reasoned drop
//! for every popped chain, and the same answers as virtio-queue + `parse`. Every input the
//! fuzzer ever failed on is kept in tests/fuzz-regressions/ and replayed here.

use blk_fuzz::scenario::Focus;
use blk_fuzz::{check, Stats};
use proptest::prelude::*;

fn bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(any::<u8>(), 0..max)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1500, ..ProptestConfig::default() })]

    #[test]
    fn drain_ring_keeps_every_promise(data in bytes(2048)) {
        check(&data, Focus::Drain, &mut Stats::default());
    }

    #[test]
    fn parse_chain_keeps_every_promise(data in bytes(1024)) {
        check(&data, Focus::Chain, &mut Stats::default());
    }
}

/// Deterministic pseudo-random bytes (xorshift64*), so the coverage test below sees the same
/// inputs on every run.
fn pseudo_random(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            (x.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 56) as u8
        })
        .collect()
}

/// The twin is only worth its time if its generators reach every outcome: each request kind
/// executed, both reject statuses, drops, throttling, both ways a queue stops, and the
/// comparison with virtio-queue.
#[test]
fn generators_reach_every_outcome() {
    let mut stats = Stats::default();
    for seed in 0..3000u64 {
        let len = 64 + (seed as usize * 37) % 1500;
        check(&pseudo_random(seed, len), Focus::Drain, &mut stats);
        check(&pseudo_random(!seed, len / 2), Focus::Chain, &mut stats);
    }
    for kind in ["Read", "Write", "Flush", "GetId", "Discard", "WriteZeroes"] {
        assert!(
            stats.executed.get(kind).is_some_and(|&n| n > 0),
            "no {kind} request executed: {stats:?}"
        );
    }
    assert!(stats.rejected_ioerr > 0, "{stats:?}");
    assert!(stats.rejected_unsupp > 0, "{stats:?}");
    assert!(stats.dropped > 0, "{stats:?}");
    assert!(stats.throttled > 0, "{stats:?}");
    assert!(stats.stopped_ahead > 0, "{stats:?}");
    assert!(stats.stopped_ring > 0, "{stats:?}");
    assert!(stats.compared_with_virtio_queue > 0, "{stats:?}");
    if std::env::var_os("BLK_PROTO_FUZZ_STATS").is_some() {
        eprintln!("{stats:#?}");
    }
}

/// Every input a fuzzer failed on (fuzz/artifacts/<target>/crash-*, minimized), replayed.
#[test]
fn fuzz_regressions_replay() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz-regressions");
    let mut replayed = 0;
    for (target, focus) in [("drain_ring", Focus::Drain), ("parse_chain", Focus::Chain)] {
        let Ok(entries) = std::fs::read_dir(dir.join(target)) else {
            continue;
        };
        for entry in entries {
            let path = entry.expect("readable directory").path();
            let data = std::fs::read(&path).expect("readable regression input");
            eprintln!("replaying {}", path.display());
            check(&data, focus, &mut Stats::default());
            replayed += 1;
        }
    }
    eprintln!("{replayed} fuzz regression inputs replayed");
}
