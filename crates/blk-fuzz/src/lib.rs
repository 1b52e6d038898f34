//! A hostile guest for blk-proto, shared by the cargo-fuzz targets in `fuzz/` and the stable
//! property tests (`tests/`): the same bytes decode to the same guest and face the same
//! assertions on both, so a fuzzer crash replays as a plain test.
//!
//! - [`scenario`] decodes bytes into guest memory (regions with gaps, up to the top of the
//!   address space), a split ring and what the guest wrote into it;
//! - [`guest`] maps that memory with guard pages around every region, so an access one byte
//!   outside guest memory faults;
//! - [`drain`] is the server's drain loop as a pure function over `SplitRing` + `parse_walk`;
//! - [`check_chain`] and [`check_drain`] run them and assert: no panic, nothing outside the
//!   regions (pointers checked, then touched), every walk and drain within its bound, every
//!   popped chain executed, rejected with a status or dropped with a reason, and the walker
//!   agreeing with virtio-queue's reference chain on every ring the server can be handed.

pub mod drain;
pub mod guest;
pub mod scenario;

use std::sync::Arc;

use arbitrary::Unstructured;
use blk_proto::{parse, ChainError, GuestRegions, MappedRing, ParseError, Request, RequestKind};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemory, Permissions};

use crate::drain::{drain, Broken, Disposition, DrainEnd, Popped};
use crate::guest::GuardedGuest;
use crate::scenario::{Focus, Scenario};

/// Most descriptors a chain may yield, direct and indirect together (blk-proto split_ring).
pub fn walk_bound(queue_size: u16) -> usize {
    usize::from(queue_size.max(blk_proto::split_ring::MAX_CHAIN_DESCRIPTORS))
}

/// Fuzz target (a): one chain, as parse sees it. Panics on a broken promise.
pub fn check_chain(data: &[u8]) {
    check(data, Focus::Chain, &mut Stats::default());
}

/// Fuzz target (b): the drain over a whole hostile ring. Panics on a broken promise.
pub fn check_drain(data: &[u8]) {
    check(data, Focus::Drain, &mut Stats::default());
}

/// What the checks saw, counted: the property tests use it to prove their generators reach
/// every outcome (a fuzz twin that only ever sees dropped chains proves little).
#[derive(Clone, Debug, Default)]
pub struct Stats {
    pub scenarios: usize,
    pub executed: std::collections::BTreeMap<String, usize>,
    pub rejected_ioerr: usize,
    pub rejected_unsupp: usize,
    pub dropped: usize,
    /// Why chains were dropped or rejected (the error's variant name).
    pub reasons: std::collections::BTreeMap<String, usize>,
    pub caught_up: usize,
    pub throttled: usize,
    pub stopped_ahead: usize,
    pub stopped_ring: usize,
    pub compared_with_virtio_queue: usize,
}

/// Decodes `data` as `focus` says and runs every check on it, counting into `stats`.
pub fn check(data: &[u8], focus: Focus, stats: &mut Stats) {
    let mut u = Unstructured::new(data);
    let Ok(scenario) = Scenario::decode(&mut u, focus) else {
        return;
    };
    let Some(guest) = GuardedGuest::new(&scenario.regions) else {
        return;
    };
    stats.scenarios += 1;
    run_scenario(&guest, &scenario, stats);
}

/// Applies the scenario's rounds of guest writes, draining after each as the server would,
/// and checks every promise. The snapshot made here is dropped before returning.
pub fn run_scenario(guest: &GuardedGuest, scenario: &Scenario, stats: &mut Stats) {
    let mem = guest.mem();
    let regions = GuestRegions::new(Arc::clone(mem));
    probe_snapshot(guest, &regions, scenario);
    let mut next_avail = scenario.next_avail;
    for writes in &scenario.rounds {
        for w in writes {
            // Bytes outside guest memory are not written, as a guest could not write them.
            let _ = mem.write_slice(&w.bytes, GuestAddress(w.addr));
        }
        // The server does not drain a queue without rings (vhost-server split_ring()).
        if scenario.ring.size == 0 || scenario.ring.avail_ring == 0 {
            return;
        }
        let ring = scenario.ring.map(&regions);
        if scenario.server_shaped() {
            stats.compared_with_virtio_queue += 1;
            compare_with_virtio_queue(guest, scenario, &ring, next_avail);
        }
        if !drain_round(guest, scenario, &ring, &mut next_avail, stats) {
            return;
        }
    }
}

fn new_request(scenario: &Scenario) -> Request {
    match scenario.capacities {
        Some((iovecs, ranges)) => Request::with_capacity(iovecs, ranges),
        None => Request::for_config(&scenario.cfg),
    }
}

/// Drains until caught up or broken, completing what each drain took before the next one
/// (a throttled engine frees room only by completing). False if the queue broke.
fn drain_round(
    guest: &GuardedGuest,
    scenario: &Scenario,
    ring: &MappedRing<'_>,
    next_avail: &mut u16,
    stats: &mut Stats,
) -> bool {
    let size = ring.size();
    // While the ring does not change, a throttled drain pops at least one chain (room >= 1)
    // and a queue holds at most `size`: that many drains and one more reach the end. A
    // completion may rewrite the ring (a guest may point read buffers or status bytes at
    // its own avail index, which is then new work, not a loop): the count starts again, a few
    // times, after which the harness stops following (the server would go on serving it).
    let static_bound = usize::from(size) + 1;
    let mut static_drains = 0;
    let mut ring_rewrites = 0;
    let mut total = 0usize;
    // Rings larger than the server takes (the walker accepts any size) may hold tens of
    // thousands of chains: each drain of one takes a few dozen, as the server never would.
    let room = if size > scenario::MAX_SERVER_QUEUE {
        scenario.room.min(64)
    } else {
        scenario.room
    };
    loop {
        let mut batch = Vec::new();
        let start = *next_avail;
        let end = drain(
            ring,
            &scenario.cfg,
            next_avail,
            room,
            || new_request(scenario),
            |p| batch.push(p),
        );
        assert!(
            batch.len() <= usize::from(size),
            "one drain popped {} chains from a queue of {size}",
            batch.len()
        );
        assert_eq!(
            next_avail.wrapping_sub(start) as usize,
            batch.len(),
            "next_avail moved by a different count than the chains popped"
        );
        if end == DrainEnd::Throttled {
            assert_eq!(batch.len(), room, "throttled before the engine was full");
        }
        for popped in &batch {
            check_walk_bound(ring, popped.head);
            check_popped(guest, scenario, popped);
            count(stats, popped);
        }
        // The batch completes: status bytes written, buffers filled or read.
        let avail_before = ring.avail_idx();
        for popped in &batch {
            complete(popped);
        }
        if ring.avail_idx() != avail_before {
            static_drains = 0;
            ring_rewrites += 1;
            if ring_rewrites > 4 {
                return true;
            }
        }
        total += batch.len();
        // Rings larger than the server takes (the walker accepts any size) may hold tens of
        // thousands of chains whatever the generator wrote: follow a few drains' worth.
        if size > scenario::MAX_SERVER_QUEUE && total > 64 {
            return true;
        }
        match end {
            DrainEnd::CaughtUp => {
                stats.caught_up += 1;
                return true;
            }
            DrainEnd::Throttled => stats.throttled += 1,
            DrainEnd::Broken(Broken::AheadOfQueue { .. }) => {
                stats.stopped_ahead += 1;
                return false;
            }
            DrainEnd::Broken(Broken::Ring(_)) => {
                stats.stopped_ring += 1;
                return false;
            }
        }
        static_drains += 1;
        assert!(
            static_drains <= static_bound,
            "{static_drains} drains of an unchanged queue of {size} did not catch up"
        );
    }
}

/// The variant name of an error's Debug form ("TooLarge { .. }" -> "TooLarge").
fn variant(debug: String) -> String {
    debug
        .split([' ', '(', '{'])
        .next()
        .unwrap_or_default()
        .to_string()
}

fn count(stats: &mut Stats, p: &Popped) {
    if let Err(e) = &p.result {
        let mut name = variant(format!("{e:?}"));
        if let Some(why) = p.chain_error {
            name = format!("{name}/{}", variant(format!("{why:?}")));
        }
        *stats.reasons.entry(name).or_default() += 1;
    }
    match p.disposition() {
        Disposition::Execute => {
            *stats
                .executed
                .entry(format!("{:?}", p.request.kind))
                .or_default() += 1;
        }
        Disposition::Reject(blk_proto::VIRTIO_BLK_S_UNSUPP) => stats.rejected_unsupp += 1,
        Disposition::Reject(_) => stats.rejected_ioerr += 1,
        Disposition::Drop => stats.dropped += 1,
    }
}

/// A separate walk of the chain at `head`, counting descriptors: it must end (normally or
/// with an error) within the bound.
fn check_walk_bound(ring: &MappedRing<'_>, head: u16) {
    let bound = walk_bound(ring.size());
    let mut walk = ring.chain(head);
    let mut count = 0usize;
    while let Ok(Some(_)) = walk.next_descriptor() {
        count += 1;
        assert!(
            count <= bound,
            "walk of head {head} went past {bound} descriptors"
        );
    }
}

/// What the parser promises about one popped chain.
fn check_popped(guest: &GuardedGuest, scenario: &Scenario, p: &Popped) {
    let req = &p.request;
    let cfg = &scenario.cfg;
    match p.disposition() {
        Disposition::Execute | Disposition::Reject(_) => {
            assert!(
                !req.status.is_null(),
                "a status to write but no status byte"
            );
            assert!(
                guest.inside(req.status, 1),
                "status byte outside guest memory"
            );
        }
        // A drop is logged with the reason: a malformed chain always says why.
        Disposition::Drop => {
            if p.result == Err(ParseError::DescriptorChain) {
                assert!(p.chain_error.is_some(), "chain dropped without a reason");
            }
        }
    }
    if p.chain_error.is_some() {
        assert_eq!(
            p.result,
            Err(ParseError::DescriptorChain),
            "the walk failed ({:?}) but the chain was not dropped",
            p.chain_error
        );
    }
    // Never grown past the capacity it was given.
    let fresh = new_request(scenario);
    assert!(req.iovecs.len() <= fresh.iovecs.capacity().max(req.iovecs.capacity()));
    assert_eq!(
        req.iovecs.capacity(),
        fresh.iovecs.capacity(),
        "iovecs reallocated"
    );
    assert_eq!(
        req.ranges.capacity(),
        fresh.ranges.capacity(),
        "ranges reallocated"
    );
    if p.result.is_ok() {
        let mut total = 0usize;
        for iov in &req.iovecs {
            assert!(
                guest.inside(iov.iov_base as *const u8, iov.iov_len),
                "iovec outside guest memory"
            );
            assert!(iov.iov_len > 0, "empty iovec");
            total += iov.iov_len;
        }
        match req.kind {
            RequestKind::Read | RequestKind::Write => {
                assert_eq!(
                    total, req.data_len as usize,
                    "iovecs do not add up to data_len"
                );
                assert_eq!(
                    req.data_len % cfg.logical_block_size,
                    0,
                    "misaligned length"
                );
                assert_eq!(
                    req.sector % u64::from(cfg.logical_block_size / 512),
                    0,
                    "misaligned sector"
                );
                assert!(req.data_len <= cfg.max_transfer_bytes, "over max transfer");
                // At most Request::for_config's capacity: two iovecs per guest segment
                // (seg_max + 2 of them, split at region boundaries), never past IOV_MAX.
                let max_iovecs = (cfg.seg_max as usize)
                    .saturating_add(2)
                    .saturating_mul(2)
                    .min(blk_proto::request::IOV_MAX);
                assert!(
                    req.iovecs.len() <= max_iovecs,
                    "more iovecs than segments allow"
                );
                let end = req.sector.checked_add(u64::from(req.data_len / 512));
                assert!(
                    end.is_some_and(|e| e <= cfg.capacity_sectors),
                    "past capacity"
                );
                assert!(
                    !(req.kind == RequestKind::Write && cfg.read_only),
                    "write to RO"
                );
            }
            RequestKind::GetId => assert!(total <= 20, "GET_ID iovecs past 20 bytes"),
            RequestKind::Flush => {}
            RequestKind::Discard | RequestKind::WriteZeroes => {
                assert!(!cfg.read_only, "discard on a read-only device");
                let wz = req.kind == RequestKind::WriteZeroes;
                let max = if wz {
                    cfg.max_write_zeroes_seg
                } else {
                    cfg.max_discard_seg
                };
                assert!(req.ranges.len() <= max as usize, "too many ranges");
                for r in &req.ranges {
                    assert!(r.num_sectors > 0, "empty range kept");
                    let end = r.sector.checked_add(u64::from(r.num_sectors));
                    assert!(
                        end.is_some_and(|e| e <= cfg.capacity_sectors),
                        "range past end"
                    );
                    assert!(!r.unmap || wz, "UNMAP on a discard");
                }
            }
        }
    }
}

/// Does what the engine would: reads the buffers of a write, fills those of a read or
/// GET_ID, writes the status byte. Any pointer outside the guest faults on a guard page.
fn complete(p: &Popped) {
    let req = &p.request;
    let status = match p.disposition() {
        Disposition::Execute => blk_proto::VIRTIO_BLK_S_OK,
        Disposition::Reject(s) => s,
        Disposition::Drop => return,
    };
    for iov in &req.iovecs {
        let base = iov.iov_base.cast::<u8>();
        // The first and last byte and one per page between: the guard pages fault on any
        // page outside the guest, and check_popped already checked the exact bounds.
        let touched = (0..iov.iov_len)
            .step_by(guest::PAGE)
            .chain(iov.iov_len.checked_sub(1));
        for i in touched {
            // SAFETY: check_popped proved [base, base + iov_len) inside a region of the guest,
            // which is mapped read-write for the whole scenario; i < iov_len.
            unsafe {
                match req.kind {
                    RequestKind::Write => {
                        base.add(i).read_volatile();
                    }
                    _ => base.add(i).write_volatile(0x5a),
                }
            }
        }
    }
    // SAFETY: as above, check_popped proved the status byte inside a region.
    unsafe { req.status.write_volatile(status) };
}

/// The reference: virtio-queue pops the same ring from the same next_avail and `parse` reads
/// each chain. Every ring the server can be handed must pop the same heads, parse to the same
/// results and requests, and stop where the walker stops. Nothing is written to memory here.
fn compare_with_virtio_queue(
    guest: &GuardedGuest,
    scenario: &Scenario,
    ring: &MappedRing<'_>,
    next_avail: u16,
) {
    let mem = &**guest.mem();
    let mut queue = match Queue::new(32768) {
        Ok(q) => q,
        Err(_) => return,
    };
    let r = scenario.ring;
    if queue.try_set_size(r.size).is_err()
        || queue
            .try_set_desc_table_address(GuestAddress(r.desc_table))
            .is_err()
        || queue
            .try_set_avail_ring_address(GuestAddress(r.avail_ring))
            .is_err()
    {
        return;
    }
    queue.set_ready(true);
    queue.set_next_avail(next_avail);

    let mut ours = Vec::new();
    let mut walker_next = next_avail;
    let end = drain(
        ring,
        &scenario.cfg,
        &mut walker_next,
        usize::MAX,
        || new_request(scenario),
        |p| ours.push(p),
    );
    let mut theirs: Vec<(u16, Result<(), ParseError>, Request)> = Vec::new();
    let iter_ok = match queue.iter(mem) {
        Ok(iter) => {
            for chain in iter {
                let head = chain.head_index();
                let mut req = new_request(scenario);
                let result = parse(chain, &scenario.cfg, &mut req);
                theirs.push((head, result, req));
            }
            true
        }
        Err(_) => false,
    };
    match end {
        DrainEnd::CaughtUp => {
            assert!(iter_ok, "virtio-queue refused a ring the walker drained");
            assert_eq!(ours.len(), theirs.len(), "popped counts differ");
        }
        DrainEnd::Broken(Broken::AheadOfQueue { .. }) => {
            assert!(
                !iter_ok,
                "virtio-queue accepted an avail index a queue ahead"
            );
        }
        // virtio-queue ends the iteration where the walker stops the queue.
        DrainEnd::Broken(Broken::Ring(_)) => {
            assert!(
                theirs.len() <= ours.len(),
                "virtio-queue popped past a broken ring"
            );
        }
        DrainEnd::Throttled => unreachable!("no room limit"),
    }
    for (p, (head, result, req)) in ours.iter().zip(&theirs) {
        assert_eq!(p.head, *head, "different heads popped");
        // The walker ends a chain at MAX_CHAIN_DESCRIPTORS; virtio-queue follows an indirect
        // table further (blk_proto::split_ring's module doc).
        if let Some(ChainError::TooManyDescriptors { .. }) = p.chain_error {
            assert_eq!(p.result, Err(ParseError::DescriptorChain));
            continue;
        }
        assert_eq!(
            &p.result, result,
            "parse_walk and parse disagree on head {head}"
        );
        assert_same_request(&p.request, req);
    }
}

/// Panics unless the two requests are the same, field by field (iovecs by address and
/// length): what parse and parse_walk must agree on.
pub fn assert_same_request(a: &Request, b: &Request) {
    assert_eq!(a.kind, b.kind, "kind");
    assert_eq!(a.sector, b.sector, "sector");
    let iovecs = |r: &Request| -> Vec<(usize, usize)> {
        r.iovecs
            .iter()
            .map(|v| (v.iov_base as usize, v.iov_len))
            .collect()
    };
    assert_eq!(iovecs(a), iovecs(b), "iovecs");
    assert_eq!(a.data_len, b.data_len, "data_len");
    assert_eq!(a.ranges, b.ranges, "ranges");
    assert_eq!(a.status, b.status, "status");
    assert_eq!(a.used_len, b.used_len, "used_len");
}

/// The snapshot against vm-memory on arbitrary ranges: host() only inside one region,
/// contains() exactly when vm-memory has every byte, read() the same bytes.
fn probe_snapshot(guest: &GuardedGuest, regions: &GuestRegions, scenario: &Scenario) {
    let mem = &**guest.mem();
    for &(addr, len) in &scenario.probes {
        let in_vm_memory = usize::try_from(len)
            .is_ok_and(|l| mem.check_range(GuestAddress(addr), l, Permissions::Read));
        if let Some(p) = regions.host(addr, len) {
            assert!(guest.inside(p, len as usize), "host() outside the regions");
            assert!(
                in_vm_memory,
                "host() mapped a range vm-memory does not have"
            );
        }
        assert_eq!(
            regions.contains(addr, len),
            in_vm_memory || len == 0 && regions.host(addr, 0).is_some(),
            "contains({addr:#x}, {len}) disagrees with vm-memory"
        );
        for piece in regions.pieces(addr, len).flatten() {
            assert!(
                guest.inside(piece.0, piece.1),
                "pieces() outside the regions"
            );
        }
        if len <= 2 * guest::PAGE as u64 {
            let mut ours = vec![0u8; len as usize];
            let mut theirs = vec![0u8; len as usize];
            let ok = regions.read(addr, &mut ours);
            let vm_ok = mem.read_slice(&mut theirs, GuestAddress(addr)).is_ok();
            assert_eq!(
                ok,
                vm_ok || len == 0,
                "read({addr:#x}, {len}) succeeds differently"
            );
            if ok && vm_ok {
                assert_eq!(ours, theirs, "read() returned other bytes than vm-memory");
            }
        }
    }
}
