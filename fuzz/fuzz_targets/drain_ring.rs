//! The server's drain over a hostile ring: arbitrary memory layout, descriptor tables,
//! avail index and entries, a second round of guest writes: see blk_fuzz::check_drain.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| blk_fuzz::check_drain(data));
