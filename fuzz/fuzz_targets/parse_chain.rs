//! One descriptor chain on a server-shaped ring, parsed by `parse_walk` (the server's path)
//! and by `parse` over virtio-queue's chain (the reference): see blk_fuzz::check_chain.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| blk_fuzz::check_chain(data));
