//! Replays fuzz inputs on stable and says what they decode to and what the checks saw:
//!
//!     cargo run --release -p blk-fuzz --example replay -- drain_ring FILE...
//!     cargo run --release -p blk-fuzz --example replay -- parse_chain FILE...

use std::time::Instant;

use arbitrary::Unstructured;
use blk_fuzz::scenario::{Focus, Scenario};
use blk_fuzz::{check, Stats};

fn main() {
    let mut args = std::env::args().skip(1);
    let focus = match args.next().as_deref() {
        Some("drain_ring") => Focus::Drain,
        Some("parse_chain") => Focus::Chain,
        _ => {
            eprintln!("usage: replay drain_ring|parse_chain FILE...");
            std::process::exit(2);
        }
    };
    for path in args {
        let data = match std::fs::read(&path) {
            Ok(data) => data,
            Err(e) => {
                eprintln!("{path}: {e}");
                std::process::exit(1);
            }
        };
        if let Ok(s) = Scenario::decode(&mut Unstructured::new(&data), focus) {
            println!(
                "{path}: regions {:?}, ring {:?}, next_avail {}, room {}, rounds {}, writes {}",
                s.regions,
                s.ring,
                s.next_avail,
                s.room,
                s.rounds.len(),
                s.rounds.iter().map(Vec::len).sum::<usize>()
            );
        }
        let mut stats = Stats::default();
        let start = Instant::now();
        check(&data, focus, &mut stats);
        println!("  {:?}: {stats:?}", start.elapsed());
    }
}
